// Every library header the kernels use, included by each ISA wrapper (csrc/isa_*.cpp) BEFORE its
// `#pragma GCC target`. Functions and templates defined here are therefore compiled for the
// baseline target in every wrapper, so their weak (COMDAT) copies are the same code whichever one
// the linker keeps, and kernels of any ISA may call or inline them. Only code defined after the
// pragma (the kernels, in namespace lavae_fast::<isa>) uses the wider instruction set.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

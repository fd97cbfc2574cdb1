// The CPU kernels for AVX-512 (F, CD, BW, DQ, VL: x86-64-v4, Skylake-X and later, Zen 4): 64-byte
// vectors, 32 registers. As isa_1_avx2.cpp: library headers first, for the baseline; GCC on x86-64.
#include "kernel_table.h"
#include "kernels/prelude.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse4.2,avx512f,avx512cd,avx512bw,avx512dq,avx512vl")
#define LAVAE_ISA avx512
#define LAVAE_ISA_LEVEL 2
#define LAVAE_ISA_NAME "avx512"
#include "kernels/all.inc"
#pragma GCC pop_options
#include "kernels/table.inc"
#else
namespace lavae_fast::avx512 {
const KernelTable* kernel_table() { return nullptr; }
}  // namespace lavae_fast::avx512
#endif

// The CPU kernels for AVX2 + FMA (x86-64-v3: Haswell and later, Zen): 32-byte vectors, 16
// registers. Library headers come first, compiled for the baseline (kernels/prelude.h); the
// pragma then applies to the kernels alone. Built with GCC on x86-64 only.
#include "kernel_table.h"
#include "kernels/prelude.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse4.2")
#define LAVAE_ISA avx2
#define LAVAE_ISA_LEVEL 1
#define LAVAE_ISA_NAME "avx2"
#include "kernels/all.inc"
#pragma GCC pop_options
#include "kernels/table.inc"
#else
namespace lavae_fast::avx2 {
const KernelTable* kernel_table() { return nullptr; }
}  // namespace lavae_fast::avx2
#endif

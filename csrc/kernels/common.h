// Shared helpers for the CPU kernels: SIMD vector types, vectorisable exp/log, input checks.
//
// This file and the kernels are compiled once per instruction set (csrc/isa_*.cpp), each time in
// its own namespace lavae_fast::LAVAE_ISA, and the op registrations pick one at run time
// (csrc/dispatch.cpp). The hot loops use GCC/Clang vector extensions (`vector_size`) of the
// target's native width (64 bytes with AVX-512, 32 with AVX2, 16 otherwise): a wider type than
// the target has registers for is split by the compiler into pieces, often through memory or one
// lane at a time (measured: the 64-byte build run on AVX2 was 5-30x slower than PyTorch's own ops).
// The register blocking (how many accumulators a tile keeps) follows the register count.
#pragma once

#include "prelude.h"

#if !defined(LAVAE_ISA) || !defined(LAVAE_ISA_LEVEL)
#error "compile the kernels through csrc/isa_*.cpp, which define LAVAE_ISA and LAVAE_ISA_LEVEL"
#endif
// LAVAE_ISA_LEVEL: 0 the baseline, 1 AVX2 + FMA, 2 AVX-512. The wrappers set it: in C++, GCC does
// not update the predefined macros (__AVX2__, __AVX512F__) after `#pragma GCC target`, so the
// kernels cannot ask them which instruction set they are compiled for.

namespace lavae_fast {
namespace LAVAE_ISA {

#if LAVAE_ISA_LEVEL >= 2
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#elif LAVAE_ISA_LEVEL == 1
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#else
constexpr int kVecBytes = 16;
constexpr int kVecRegs = 16;
#endif

// One SIMD vector of the target's width: 16/8/4 floats, 8/4/2 doubles.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  static constexpr int N = kVecBytes / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  static constexpr int N = kVecBytes / 8;
};

// Unaligned load/store: memcpy of a fixed size compiles to a single vector move.
template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// exp and log on whole vectors, for the elementwise loops. glibc's expf/logf are calls the
// auto-vectoriser cannot inline, so a loop calling them runs one lane at a time; these run on a
// full vector. float: Cody-Waite range reduction + Taylor polynomials, within ~2 ulp over the
// ranges used here. double: lane by lane with std::exp/std::log (the float64 path exists for
// gradcheck and accuracy checks, not for speed).
// ---------------------------------------------------------------------------------------------

typedef int32_t VecI32 __attribute__((vector_size(kVecBytes)));

template <typename V>
inline V splat(typename std::remove_reference<decltype(V{}[0])>::type v) {
  return V{} + v;
}

__attribute__((always_inline)) inline Vec<float>::type vexp(Vec<float>::type x) {
  typedef Vec<float>::type V;
  // exp(x) = 2^k · exp(r), k = round(x / ln 2), |r| ≤ ln2/2. ln 2 is split in two parts so that
  // k·ln2_hi is exact. Below −87 the result is set to 0 (exp(−87) ≈ 1.6e−38, the denormal range),
  // above 88 to +inf.
  const V lo = splat<V>(-87.0f), hi = splat<V>(88.0f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Round to nearest by adding and subtracting 1.5·2^23 (exact for |v| < 2^22).
  const V magic = splat<V>(12582912.0f);
  V k = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - k * 0.693145751953125f;
  r = r - k * 1.42860682030941723212e-6f;
  // Taylor series of exp(r) to degree 7: truncation error r^8/8! < 6e-9 for |r| ≤ 0.347.
  V p = splat<V>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  VecI32 bits = (__builtin_convertvector(k, VecI32) + 127) << 23;
  V y = p * (V)bits;
  y = x < lo ? V{} : y;
  y = x > hi ? splat<V>(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;  // NaN propagates
}

__attribute__((always_inline)) inline Vec<float>::type vlog(Vec<float>::type x) {
  typedef Vec<float>::type V;
  // x = 2^e · m with m in [√½, √2); log m = 2·atanh(t), t = (m−1)/(m+1), |t| ≤ 0.1716, whose odd
  // series truncated after t^11 is accurate to 2e-9. Exact for positive normal x (the callers pass
  // λ ∈ [ε, 1−ε]); 0 gives −inf, +inf gives +inf, negative and NaN give NaN, as log does.
  VecI32 bits = (VecI32)x;
  // Subtract the bits of √½ before splitting so that the mantissa range straddles 1.
  VecI32 e = (bits - 0x3f3504f3) >> 23;
  V m = (V)(bits - (e << 23));
  V t = (m - 1.0f) / (m + 1.0f);
  V t2 = t * t;
  V p = splat<V>(1.0f / 11.0f);
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  V y = __builtin_convertvector(e, V) * 0.693147180559945309f + 2.0f * t * p;
  const V inf = splat<V>(std::numeric_limits<float>::infinity());
  y = x == 0.0f ? -inf : y;
  y = x == inf ? inf : y;
  return (x < 0.0f || x != x) ? splat<V>(std::numeric_limits<float>::quiet_NaN()) : y;
}

inline Vec<double>::type vexp(Vec<double>::type x) {
  for (int j = 0; j < Vec<double>::N; ++j) x[j] = std::exp(x[j]);
  return x;
}

inline Vec<double>::type vlog(Vec<double>::type x) {
  for (int j = 0; j < Vec<double>::N; ++j) x[j] = std::log(x[j]);
  return x;
}

// A loop over n values in whole vectors: body(d, lanes) handles values [d, d + lanes), lanes = N
// except in the last call. Use vload_n / vstore_n / lane_mask inside the body.
template <typename T, typename F>
inline void simd_for(int64_t n, F&& body) {
  constexpr int N = Vec<T>::N;
  int64_t d = 0;
  for (; d + N <= n; d += N) body(d, N);
  if (d < n) body(d, n - d);
}

// Load `lanes` values (the rest filled with `fill`), or store only `lanes` values.
template <typename T>
inline typename Vec<T>::type vload_n(const T* p, int64_t lanes, T fill = T(0)) {
  typedef typename Vec<T>::type V;
  if (lanes == Vec<T>::N) return vload<V>(p);
  V v = splat<V>(fill);
  for (int64_t j = 0; j < lanes; ++j) v[j] = p[j];
  return v;
}
template <typename T>
inline void vstore_n(T* p, const typename Vec<T>::type& v, int64_t lanes) {
  if (lanes == Vec<T>::N) return vstore(p, v);
  for (int64_t j = 0; j < lanes; ++j) p[j] = v[j];
}
// v with the lanes ≥ `lanes` set to zero (for sums over a partial vector).
template <typename T>
inline typename Vec<T>::type keep_lanes(const typename Vec<T>::type& v, int64_t lanes) {
  if (lanes == Vec<T>::N) return v;
  typename Vec<T>::type r{};
  for (int64_t j = 0; j < lanes; ++j) r[j] = v[j];
  return r;
}
template <typename V>
inline auto hsum(const V& v) -> typename std::remove_reference<decltype(v[0])>::type {
  typename std::remove_const<typename std::remove_reference<decltype(v[0])>::type>::type s = 0;
  for (int j = 0; j < static_cast<int>(sizeof(V) / sizeof(v[0])); ++j) s += v[j];
  return s;
}

// One vector stored with a non-temporal (streaming) store where the target has one: for a large
// output that is not read back soon, this skips reading every cache line of the destination
// before overwriting it (a third of the memory traffic of a plain store loop). p must be aligned
// to kVecBytes.
#if defined(__x86_64__) || defined(_M_X64)
constexpr bool kHasStreamingStores = true;
#else
constexpr bool kHasStreamingStores = false;
#endif

template <typename T>
inline void stream_store(T* p, const typename Vec<T>::type& v) {
  constexpr bool f32 = std::is_same<T, float>::value;
#if LAVAE_ISA_LEVEL >= 2
  if constexpr (f32) _mm512_stream_ps(p, (__m512)v); else _mm512_stream_pd(p, (__m512d)v);
#elif LAVAE_ISA_LEVEL == 1
  if constexpr (f32) _mm256_stream_ps(p, (__m256)v); else _mm256_stream_pd(p, (__m256d)v);
#elif defined(__SSE2__)
  if constexpr (f32) _mm_stream_ps(p, (__m128)v); else _mm_stream_pd(p, (__m128d)v);
#else
  vstore(p, v);
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// dst[d] = src[d] · c for d < n, with streaming stores (see stream_store). The caller issues
// store_fence() before the data is used by another thread.
template <typename T>
inline void scale_stream(T* dst, const T* src, T c, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int N = Vec<T>::N;
  int64_t d = 0;
  if constexpr (kHasStreamingStores) {
    // Head: plain stores up to a vector boundary.
    while (d < n && (reinterpret_cast<uintptr_t>(dst + d) % kVecBytes) != 0) {
      dst[d] = src[d] * c;
      ++d;
    }
    if ((reinterpret_cast<uintptr_t>(dst + d) % kVecBytes) == 0)
      for (; d + N <= n; d += N) stream_store(dst + d, vload<V>(src + d) * c);
  }
  for (; d + N <= n; d += N) vstore(dst + d, vload<V>(src + d) * c);
  for (; d < n; ++d) dst[d] = src[d] * c;
}

// dst[0..n) = 0 with streaming stores (see stream_store): a large gradient buffer that is zeroed
// and then written at a few places is otherwise read in full before it is overwritten. Fences
// itself, so the caller may write into dst right after.
template <typename T>
inline void zero_stream(T* dst, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int N = Vec<T>::N;
  int64_t d = 0;
  if constexpr (kHasStreamingStores) {
    while (d < n && (reinterpret_cast<uintptr_t>(dst + d) % kVecBytes) != 0) dst[d++] = T(0);
    if ((reinterpret_cast<uintptr_t>(dst + d) % kVecBytes) == 0)
      for (; d + N <= n; d += N) stream_store(dst + d, V{});
    store_fence();
  }
  for (; d < n; ++d) dst[d] = T(0);
}

// ---------------------------------------------------------------------------------------------
// Work distribution
// ---------------------------------------------------------------------------------------------

// Run f(task, scratch) for every task in [0, n) on PyTorch's intra-op threads, in one parallel
// region, handing the tasks out one at a time from a shared counter. A static split (each thread
// takes a fixed half) stalls whenever the machine is shared and one thread is descheduled: the
// other finishes its half and waits. Each worker gets its own default-constructed Scratch for
// buffers reused across its tasks. Every output element must belong to exactly one task, so the
// result does not depend on the schedule.
template <typename Scratch, typename F>
void parallel_tasks(int64_t n, F&& f) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    Scratch scratch;
    for (int64_t i = 0; i < n; ++i) f(i, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      f(i, scratch);
    }
  });
}

struct NoScratch {};

// ---------------------------------------------------------------------------------------------
// Input checks. The Python API validates first; these repeat the checks that guard memory safety
// so that direct calls of torch.ops.lavae_fast.* cannot read or write out of bounds.
// ---------------------------------------------------------------------------------------------

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// n [B] int64 with values in [0, M]; returns a contiguous copy.
inline at::Tensor checked_counts(const at::Tensor& n, int64_t B, int64_t M, const char* op) {
  check_cpu(n, op, "n");
  TORCH_CHECK(n.dim() == 1 && n.size(0) == B, op, ": n must have shape [B] = [", B, "], got ", n.sizes());
  TORCH_CHECK(n.scalar_type() == at::kLong, op, ": n must be int64, got ", n.scalar_type());
  at::Tensor nc = n.contiguous();
  const int64_t* p = nc.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] <= M, op, ": n must lie in [0, M=", M, "], got n[", b, "] = ", p[b]);
  return nc;
}

// index [B,M] int64. For every present slot (i < n[b]) the value must be a pixel in [0, D) or −1
// (an absent draw: gumbel_topk_relaxed returns −1 for slots beyond the D pixels of a tiny canvas,
// and the reference treats −1 as absent). Values of absent slots are never read.
inline at::Tensor checked_index(const at::Tensor& index, const at::Tensor& n, int64_t B, int64_t M, int64_t D,
                                const char* op) {
  check_cpu(index, op, "index");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) == M, op, ": index must have shape [B, M] = [",
              B, ", ", M, "], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  at::Tensor ic = index.contiguous();
  const int64_t* p = ic.const_data_ptr<int64_t>();
  const int64_t* pn = n.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < pn[b]; ++i) {
      const int64_t v = p[b * M + i];
      TORCH_CHECK(v >= -1 && v < D, op, ": index[", b, ", ", i, "] = ", v, " is outside [0, D=", D,
                  ") for a present slot (i < n[b] = ", pn[b], "); use -1 only for an absent draw");
    }
  return ic;
}

}  // namespace LAVAE_ISA
}  // namespace lavae_fast

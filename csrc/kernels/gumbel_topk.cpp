// Gumbel-top-k draws without replacement with relaxed step samples (SPEC §3, §9.2).
//
// Per image: y = logits + g; the top-k of y (k = min(n, D)) are the draws, in order. Step i's
// relaxed sample is softmax(y/τ) over "all minus the first i draws"; its largest allowed value is
// y of the i-th draw itself, so every exponent is ≤ 0 and the normaliser is
//   Z_i = Σ_{j≥i} exp((y_{p_j} − y_{p_i})/τ) + R·exp((y_{p_{k−1}} − y_{p_i})/τ),
//   R   = Σ_{d ∉ draws} exp((y_d − y_{p_{k−1}})/τ),
// a suffix sum over the k draws plus one sum over the rest — never "full sum minus the earlier
// draws", which cancels catastrophically at τ = 0.02. log_q uses b^(i) = softmax(logits) over the
// same sets, normalised in the same way against each step's own maximum (in double).
//
// With an exclusion window w > 1 (SPEC §2) step i's candidates S_i are the pixels outside the w×w
// neighbourhoods of the earlier draws; draw i is the largest y on S_i (k masked passes over D,
// each a vectorised maximum). Each pixel d gets the step fc_d of the first draw whose window covers it (k−1 if none):
// d ∈ S_i ⇔ i ≤ fc_d, and y_d ≤ y_{p_{fc_d}}. Everything is summed by these groups, each against
// its own reference, so no sum is ever formed as "full sum minus the windows" (the window around
// the top peak holds almost all the mass at τ = 0.02): e_d = exp((y_d − y_{p_{fc_d}})/τ) ≤ 1,
// E_j = Σ_{fc_d = j} e_d, Z_i = Σ_{j≥i} E_j·exp((y_{p_j} − y_{p_i})/τ), and step i's value at d is
// e_d·exp((y_{p_{fc_d}} − y_{p_i})/τ)/Z_i for fc_d ≥ i, 0 otherwise. One exp per pixel for all
// steps; the ≤ (k−1)·w² covered pixels are fixed up one by one. log_q and its gradient likewise,
// with the logits' per-group maxima.
#include <algorithm>
#include <vector>

#include "common.h"

namespace lavae_fast {
namespace LAVAE_ISA {
namespace gumbel {
namespace {

constexpr const char* kFwd = "gumbel_topk_relaxed";
constexpr const char* kBwd = "gumbel_topk_relaxed_backward";

// a ranks before b: larger value first, NaN counts as the largest (as torch.topk), ties keep the
// smaller pixel index first (insertion is stable), so the result is deterministic.
template <typename T>
inline bool ranks_before(T a, T b) {
  return a > b || (a != a && b == b);
}

// Whether some lane of v is not ≤ t (larger, or NaN on either side): one compare into a mask, not
// a reduction lane by lane. Every lane that ranks_before t is among them (when t is NaN, all are).
template <typename T>
inline bool any_not_le(const typename Vec<T>::type& v, T t) {
  constexpr bool f32 = std::is_same<T, float>::value;
#if LAVAE_ISA_LEVEL >= 2
  if constexpr (f32) return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(t), _CMP_NLE_UQ) != 0;
  else return _mm512_cmp_pd_mask((__m512d)v, _mm512_set1_pd(t), _CMP_NLE_UQ) != 0;
#elif LAVAE_ISA_LEVEL == 1
  if constexpr (f32) return _mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_set1_ps(t), _CMP_NLE_UQ)) != 0;
  else return _mm256_movemask_pd(_mm256_cmp_pd((__m256d)v, _mm256_set1_pd(t), _CMP_NLE_UQ)) != 0;
#elif defined(__SSE2__)
  if constexpr (f32) return _mm_movemask_ps(_mm_cmpnle_ps((__m128)v, _mm_set1_ps(t))) != 0;
  else return _mm_movemask_pd(_mm_cmpnle_pd((__m128d)v, _mm_set1_pd(t))) != 0;
#else
  bool any = false;
  for (int j = 0; j < Vec<T>::N; ++j) any |= !(v[j] <= t);
  return any;
#endif
}

// The k largest of y[0..D) in decreasing order (k ≤ D), by insertion into a sorted list of k:
// one pass over D. Once the list is full, a whole vector of values is compared with the current
// k-th value at once and skipped when none of them could enter, which is almost always.
template <typename T>
void top_k(const T* y, int64_t D, int64_t k, T* val, int64_t* idx) {
  typedef typename Vec<T>::type V;
  constexpr int N = Vec<T>::N;
  if (k <= 0) return;
  int64_t filled = 0;
  auto offer = [&](int64_t d) {
    const T v = y[d];
    if (filled == k && !ranks_before(v, val[k - 1])) return;
    int64_t j = filled < k ? filled++ : k - 1;
    while (j > 0 && ranks_before(v, val[j - 1])) {
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
      --j;
    }
    val[j] = v;
    idx[j] = d;
  };
  int64_t d = 0;
  for (; d < D && filled < k; ++d) offer(d);
  for (; d + N <= D; d += N) {
    // Skip the vector unless a lane might rank before the k-th value (larger, or NaN: NaN ranks
    // first, as in torch.topk); offer() decides exactly.
    if (!any_not_le<T>(vload<V>(y + d), val[k - 1])) continue;
    for (int j = 0; j < N; ++j) offer(d + j);
  }
  for (; d < D; ++d) offer(d);
}

// Over the pixels that are not draws (rank[d] < 0 marks them): the maximum of the logits and the
// sum of exp(logit − that maximum). Two passes over D; the values stay in cache.
template <typename T>
void rest_logsumexp(const T* l, const T* rank, int64_t D, double& mr, double& sr) {
  typedef typename Vec<T>::type V;
  const T ninf = -std::numeric_limits<T>::infinity();
  // Tail lanes load rank 0 ("a draw"), which excludes them.
  V vm = splat<V>(ninf);
  simd_for<T>(D, [&](int64_t d, int64_t lanes) {
    const V v = vload_n(rank + d, lanes) < T(0) ? vload_n(l + d, lanes) : vm;
    vm = v > vm ? v : vm;
  });
  T m = ninf;
  for (int j = 0; j < Vec<T>::N; ++j) m = std::max(m, vm[j]);
  mr = m;
  sr = 0;
  if (m == ninf) return;  // no rest, or every rest logit is −∞: an empty sum
  V acc{};
  simd_for<T>(D, [&](int64_t d, int64_t lanes) {
    acc += vload_n(rank + d, lanes) < T(0) ? vexp(vload_n(l + d, lanes) - m) : V{};
  });
  sr = hsum(acc);
}

// Σ a[d]·b[d] with four independent vector accumulators, so that the loop is bound by loads
// rather than by the latency of one chain of fused multiply-adds.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int N = Vec<T>::N;
  V acc[4] = {};
  int64_t d = 0;
  for (; d + 4 * N <= n; d += 4 * N)
    for (int j = 0; j < 4; ++j) acc[j] += vload<V>(a + d + j * N) * vload<V>(b + d + j * N);
  simd_for<T>(n - d, [&](int64_t e, int64_t lanes) { acc[0] += vload_n(a + d + e, lanes) * vload_n(b + d + e, lanes); });
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// log of the normaliser of b^(i) for each step i < k: logsumexp of the logits over the draws
// i..k−1 and the rest, against the step's own maximum. Consecutive steps share that maximum
// unless a draw above every later logit and the rest drops out, and then they share its terms:
// each exp(l_j − m) is taken once per maximum, not once per step (ex: scratch for k doubles).
template <typename T>
void step_lse(const T* l, const int64_t* picks, int64_t k, double mr, double sr, double* lse, double* ex) {
  double prev = std::numeric_limits<double>::quiet_NaN(), rest = 0;
  for (int64_t i = 0; i < k; ++i) {
    double m = mr;
    for (int64_t j = i; j < k; ++j) m = std::max(m, static_cast<double>(l[picks[j]]));
    const bool again = m == prev;  // never for a NaN maximum
    if (!again) {
      rest = sr > 0 ? sr * std::exp(mr - m) : 0.0;
      for (int64_t j = i; j < k; ++j) ex[j] = std::exp(static_cast<double>(l[picks[j]]) - m);
    }
    double z = rest;
    for (int64_t j = i; j < k; ++j) z += ex[j];
    lse[i] = m + std::log(z);
    prev = m;
  }
}

// The exclusion windows of a list of draws on an H×W canvas.
struct Windows {
  int64_t H, W, h;  // canvas, half window
  // body(d) for every pixel of the window around p, clipped to the canvas.
  template <typename F>
  void each(int64_t p, F&& body) const {
    const int64_t r = p / W, c = p % W;
    const int64_t r0 = std::max<int64_t>(r - h, 0), r1 = std::min<int64_t>(r + h, H - 1);
    const int64_t c0 = std::max<int64_t>(c - h, 0), c1 = std::min<int64_t>(c + h, W - 1);
    for (int64_t rr = r0; rr <= r1; ++rr)
      for (int64_t cc = c0; cc <= c1; ++cc) body(rr * W + cc);
  }
  // grp[d] = the step of the first of picks[0..k) whose window covers d, k−1 if none (k ≥ 1).
  template <typename T>
  void groups(const int64_t* picks, int64_t k, T* grp, int64_t D) const {
    std::fill(grp, grp + D, static_cast<T>(k - 1));
    for (int64_t j = k - 2; j >= 0; --j) each(picks[j], [&](int64_t d) { grp[d] = static_cast<T>(j); });
  }
};

// Per group j of Windows::groups over the logits: the maximum m[j] and s[j] = Σ exp(l − m[j]);
// then lse[i] = log Σ_{j≥i} s[j]·exp(m[j]) (step i's normaliser), each against its own maximum.
template <typename T>
void window_lse(const T* l, const T* grp, const int64_t* picks, int64_t k, const Windows& win, int64_t D,
                double* m, double* s, double* lse) {
  typedef typename Vec<T>::type V;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T last = static_cast<T>(k - 1);
  V vm = splat<V>(ninf);
  simd_for<T>(D, [&](int64_t d, int64_t lanes) {
    const V v = vload_n(grp + d, lanes, T(-1)) == last ? vload_n(l + d, lanes) : vm;
    vm = v > vm ? v : vm;
  });
  T mk = ninf;
  for (int j = 0; j < Vec<T>::N; ++j) mk = std::max(mk, vm[j]);
  m[k - 1] = mk;
  s[k - 1] = 0;
  if (mk != ninf) {
    V acc{};
    simd_for<T>(D, [&](int64_t d, int64_t lanes) {
      acc += vload_n(grp + d, lanes, T(-1)) == last ? vexp(vload_n(l + d, lanes) - mk) : V{};
    });
    s[k - 1] = hsum(acc);
  }
  for (int64_t j = 0; j + 1 < k; ++j) {
    const T tj = static_cast<T>(j);
    double mj = -std::numeric_limits<double>::infinity(), sj = 0;
    win.each(picks[j], [&](int64_t d) {
      if (grp[d] == tj) mj = std::max(mj, static_cast<double>(l[d]));
    });
    if (mj != -std::numeric_limits<double>::infinity())
      win.each(picks[j], [&](int64_t d) {
        if (grp[d] == tj) sj += std::exp(static_cast<double>(l[d]) - mj);
      });
    m[j] = mj;
    s[j] = sj;
  }
  for (int64_t i = 0; i < k; ++i) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = i; j < k; ++j)
      if (s[j] > 0) mx = std::max(mx, m[j]);
    double z = 0;
    for (int64_t j = i; j < k; ++j)
      if (s[j] > 0) z += s[j] * std::exp(m[j] - mx);
    lse[i] = mx + std::log(z);
  }
}

template <typename T>
void gumbel_forward_window(const at::Tensor& logits, const at::Tensor& gumbel, const int64_t* pn, double tau_d,
                           int64_t M, const Windows& win, at::Tensor& relaxed, at::Tensor& log_q, at::Tensor& index) {
  const int64_t B = logits.size(0), D = logits.size(1);
  const T* pl = logits.const_data_ptr<T>();
  const T* pg = gumbel.const_data_ptr<T>();
  T* pr = relaxed.mutable_data_ptr<T>();
  T* pq = log_q.mutable_data_ptr<T>();
  int64_t* pi = index.mutable_data_ptr<int64_t>();
  typedef typename Vec<T>::type V;
  const T inv_tau = static_cast<T>(1.0 / tau_d);
  struct Scratch {
    std::vector<T> y, e, grp;
    std::vector<int64_t> picks;
    std::vector<double> topv, E, coef, m, s, lse;
  };
  parallel_tasks<Scratch>(B, [&](int64_t b, Scratch& sc) {
    const T* l = pl + b * D;
    const T* g = pg + b * D;
    T* rb = pr + b * M * D;
    const int64_t k = std::min(pn[b], M);
    for (int64_t i = 0; i < M; ++i) pi[b * M + i] = -1;
    if (k == 0) {
      zero_stream(rb, M * D);
      pq[b] = T(0);
      return;
    }
    sc.y.resize(D);
    sc.e.resize(D);
    sc.grp.resize(D);
    sc.picks.resize(k);
    sc.topv.resize(k);
    sc.E.resize(k);
    sc.coef.resize(k);
    sc.m.resize(k);
    sc.s.resize(k);
    sc.lse.resize(k);
    T* y = sc.y.data();
    T* e = sc.e.data();
    T* grp = sc.grp.data();
    int64_t* picks = sc.picks.data();
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] = l[d] + g[d];
    // Step i draws the largest y outside the earlier windows (grp[d] = 1 marks them; ties: the
    // lowest index, as argmax): a vectorised max, then the first pixel that holds it. k passes
    // over D cost less than selecting the top (k−1)·w² + 1 candidates first (an insertion list
    // that long is quadratic in its length: 3.3 against 0.66 ms at B = 64, 64×64, M = 10, w = 5).
    std::fill(grp, grp + D, T(0));
    const T ninf = -std::numeric_limits<T>::infinity();
    constexpr int N = Vec<T>::N;
    for (int64_t i = 0; i < k; ++i) {
      V vm = splat<V>(ninf);
      simd_for<T>(D, [&](int64_t d, int64_t lanes) {
        const V v = vload_n(grp + d, lanes, T(1)) == T(0) ? vload_n(y + d, lanes, ninf) : splat<V>(ninf);
        vm = v > vm ? v : vm;
      });
      T m = ninf;
      for (int j = 0; j < N; ++j) m = std::max(m, vm[j]);
      int64_t p = -1;
      int64_t d = 0;
      for (; d + N <= D && p < 0; d += N) {
        const auto hit = (vload<V>(y + d) == m) & (vload<V>(grp + d) == T(0));
        bool any = false;
        for (int j = 0; j < N; ++j) any |= hit[j] != 0;
        if (!any) continue;
        for (int j = 0; j < N && p < 0; ++j)
          if (hit[j] != 0) p = d + j;
      }
      for (; d < D && p < 0; ++d)
        if (grp[d] == T(0) && y[d] == m) p = d;
      // Nothing equal to the maximum (NaN logits): the first pixel left, so that a draw is made.
      for (d = 0; d < D && p < 0; ++d)
        if (grp[d] == T(0)) p = d;
      picks[i] = p;
      win.each(p, [&](int64_t e) { grp[e] = T(1); });
    }
    for (int64_t i = 0; i < k; ++i) {
      pi[b * M + i] = picks[i];
      sc.topv[i] = y[picks[i]];
    }
    win.groups(picks, k, grp, D);
    // e_d against the last draw for the uncovered pixels (and the last draw's window) ...
    const T last = static_cast<T>(k - 1);
    const T ylast = y[picks[k - 1]];
    V acc{};
    simd_for<T>(D, [&](int64_t d, int64_t lanes) {
      const V ev = vload_n(grp + d, lanes, T(-1)) == last ? vexp((vload_n(y + d, lanes) - ylast) * inv_tau) : V{};
      vstore_n(e + d, ev, lanes);
      acc += ev;
    });
    sc.E[k - 1] = hsum(acc);
    // ... and against their own window's draw for the pixels the earlier windows cover.
    for (int64_t j = 0; j + 1 < k; ++j) {
      const T tj = static_cast<T>(j);
      const T yj = y[picks[j]];
      double Ej = 0;
      win.each(picks[j], [&](int64_t d) {
        if (grp[d] != tj) return;
        e[d] = std::exp((y[d] - yj) * inv_tau);
        Ej += e[d];
      });
      sc.E[j] = Ej;
    }
    for (int64_t i = 0; i < k; ++i) {
      const double yi = sc.topv[i];
      double z = 0;
      for (int64_t j = i; j < k; ++j) z += sc.E[j] * std::exp((sc.topv[j] - yi) * inv_tau);
      for (int64_t j = 0; j < k; ++j) sc.coef[j] = j < i ? 0.0 : std::exp((sc.topv[j] - yi) * inv_tau) / z;
      T* row = rb + i * D;
      scale_stream(row, e, static_cast<T>(sc.coef[k - 1]), D);
      store_fence();  // the streamed row is complete before the covered pixels are overwritten
      for (int64_t j = 0; j + 1 < k; ++j) {
        const T tj = static_cast<T>(j);
        const T cj = static_cast<T>(sc.coef[j]);
        win.each(picks[j], [&](int64_t d) {
          if (grp[d] == tj) row[d] = e[d] * cj;
        });
      }
    }
    zero_stream(rb + k * D, (M - k) * D);  // streamed, as the rows above
    window_lse(l, grp, picks, k, win, D, sc.m.data(), sc.s.data(), sc.lse.data());
    double lq = 0;
    for (int64_t i = 0; i < k; ++i) lq += static_cast<double>(l[picks[i]]) - sc.lse[i];
    pq[b] = static_cast<T>(lq);
  });
}

// Window 1's relaxed rows, in two pieces that the forward writes them from and the backward
// recomputes them with (from logits + gumbel, when it is given the noise: gumbel_backward_recompute):
// both call these same functions, so the backward's rows are the forward's bit for bit (noinline:
// one copy of the machine code, whatever the code around each call).
//
// e_d = exp((y_d − y_last)/τ) over y's pixels that are not draws (rank[d] < 0), 0 at the draws,
// written over y; returns R = Σ e_d.
template <typename T>
__attribute__((noinline)) double rest_exp(T* y, const T* rank, int64_t D, T ylast, T inv_tau) {
  typedef typename Vec<T>::type V;
  V acc{};
  simd_for<T>(D, [&](int64_t d, int64_t lanes) {
    const V e = vload_n(rank + d, lanes) < T(0) ? vexp((vload_n(y + d, lanes) - ylast) * inv_tau) : V{};
    vstore_n(y + d, e, lanes);
    acc += e;
  });
  return hsum(acc);
}

// Step i's relaxed row (i < k): returns c, its value c·e_d at the pixels that are not draws, and
// sets val[j] = its value at draw j (0 for the draws before step i). topv = y of the k draws; ex:
// scratch for k doubles (each exp((y_{p_j} − y_{p_i})/τ) is taken once).
template <typename T>
__attribute__((noinline)) T step_row(const T* topv, int64_t k, int64_t i, double R, T inv_tau, T* val, double* ex) {
  const double yi = topv[i];
  for (int64_t j = i; j < k; ++j) ex[j] = std::exp((static_cast<double>(topv[j]) - yi) * inv_tau);
  double z = R > 0 ? R * ex[k - 1] : 0.0;
  for (int64_t j = i; j < k; ++j) z += ex[j];
  const T c = static_cast<T>(ex[k - 1] / z);
  for (int64_t j = 0; j < k; ++j) val[j] = j < i ? T(0) : static_cast<T>(ex[j] / z);
  return c;
}

// dst[d] = src[d]·c for d < n, except dst[pos[m]] = pv[m] (pos increasing), with streaming stores
// (see scale_stream). The exceptions are put into each vector before it is stored, not written
// afterwards: a store into a line just streamed out of the cache reads the line back from memory.
// The caller issues store_fence() before the data is used by another thread.
template <typename T>
void scale_stream_except(T* dst, const T* src, T c, int64_t n, const int64_t* pos, const T* pv, int64_t npos) {
  typedef typename Vec<T>::type V;
  constexpr int N = Vec<T>::N;
  int64_t d = 0, m = 0;
  auto scalar = [&](int64_t e) {
    T x = src[e] * c;
    if (m < npos && pos[m] == e) x = pv[m++];
    dst[e] = x;
  };
  if constexpr (kHasStreamingStores) {
    while (d < n && (reinterpret_cast<uintptr_t>(dst + d) % kVecBytes) != 0) scalar(d++);
    if ((reinterpret_cast<uintptr_t>(dst + d) % kVecBytes) == 0)
      for (; d + N <= n; d += N) {
        V v = vload<V>(src + d) * c;
        for (; m < npos && pos[m] < d + N; ++m) v[pos[m] - d] = pv[m];
        stream_store(dst + d, v);
      }
  }
  for (; d + N <= n; d += N) {
    V v = vload<V>(src + d) * c;
    for (; m < npos && pos[m] < d + N; ++m) v[pos[m] - d] = pv[m];
    vstore(dst + d, v);
  }
  while (d < n) scalar(d++);
}

template <typename T>
void gumbel_forward(const at::Tensor& logits, const at::Tensor& gumbel, const int64_t* pn, double tau_d, int64_t M,
                    at::Tensor& relaxed, at::Tensor& log_q, at::Tensor& index) {
  const int64_t B = logits.size(0), D = logits.size(1);
  const T* pl = logits.const_data_ptr<T>();
  const T* pg = gumbel.const_data_ptr<T>();
  T* pr = relaxed.mutable_data_ptr<T>();
  T* pq = log_q.mutable_data_ptr<T>();
  int64_t* pi = index.mutable_data_ptr<int64_t>();
  const T inv_tau = static_cast<T>(1.0 / tau_d);
  struct Scratch {
    std::vector<T> y, rank, topv, val, pv;
    std::vector<int64_t> topi, ord, pos;
    std::vector<double> lse, ex;
  };
  parallel_tasks<Scratch>(B, [&](int64_t b, Scratch& sc) {
    std::vector<T>&y = sc.y, &rank = sc.rank, &topv = sc.topv, &val = sc.val, &pv = sc.pv;
    std::vector<int64_t>&topi = sc.topi, &ord = sc.ord, &pos = sc.pos;
    std::vector<double>&lse = sc.lse, &ex = sc.ex;
    y.resize(D);
    rank.resize(D);
    topv.resize(M);
    val.resize(M);
    pv.resize(M);
    topi.resize(M);
    ord.resize(M);
    pos.resize(M);
    lse.resize(M);
    ex.resize(M);
    {
      const T* l = pl + b * D;
      const T* g = pg + b * D;
      T* rb = pr + b * M * D;
      const int64_t k = std::min(pn[b], D);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) y[d] = l[d] + g[d];
      top_k(y.data(), D, k, topv.data(), topi.data());
      // rank[d] = the step at which pixel d is drawn, −1 if never: one compare per pixel tells
      // "drawn before step i" (0 ≤ rank < i) and "not a draw" (rank < 0) in vectorised loops.
      std::fill(rank.begin(), rank.end(), T(-1));
      for (int64_t i = 0; i < k; ++i) rank[topi[i]] = static_cast<T>(i);
      for (int64_t i = 0; i < M; ++i) pi[b * M + i] = i < k ? topi[i] : -1;
      // Every non-drawn pixel lies at or below the last draw, so e_d = exp((y_d − y_{p_{k−1}})/τ)
      // ≤ 1, R = Σ e_d, and step i's value there is e_d · exp((y_{p_{k−1}} − y_{p_i})/τ) / Z_i:
      // one exp per pixel for all steps. Both factors are ≥ their product, so neither underflows
      // unless the value itself does. The k drawn pixels are written separately.
      // y is not needed any more: rest_exp keeps e_d in its place.
      const double R = k > 0 ? rest_exp(y.data(), rank.data(), D, topv[k - 1], inv_tau) : 0.0;
      // The draws in pixel order (ord), for the rows' exceptions.
      for (int64_t j = 0; j < k; ++j) ord[j] = j;
      std::sort(ord.begin(), ord.begin() + k, [&](int64_t a, int64_t b) { return topi[a] < topi[b]; });
      for (int64_t j = 0; j < k; ++j) pos[j] = topi[ord[j]];
      for (int64_t i = 0; i < k; ++i) {
        const T c = step_row(topv.data(), k, i, R, inv_tau, val.data(), ex.data());
        for (int64_t j = 0; j < k; ++j) pv[j] = val[ord[j]];
        scale_stream_except(rb + i * D, y.data(), c, D, pos.data(), pv.data(), k);
      }
      store_fence();
      // The absent slots' rows: streamed zeros, as the rows above (a plain fill reads every line of a
      // buffer that is not in the cache before overwriting it).
      zero_stream(rb + k * D, (M - k) * D);
      double lq = 0;
      if (k > 0) {
        double mr, sr;
        rest_logsumexp(l, rank.data(), D, mr, sr);
        step_lse(l, topi.data(), k, mr, sr, lse.data(), ex.data());
        for (int64_t i = 0; i < k; ++i) lq += static_cast<double>(l[topi[i]]) - lse[i];
      }
      pq[b] = static_cast<T>(lq);
    }
  });
}

void check_logits(const char* op, const at::Tensor& logits) {
  check_cpu(logits, op, "logits");
  check_dim(logits, 2, op, "logits");
  check_float(logits, op, "logits");
}

// The exclusion window's canvas, checked (SPEC §2): window odd ≥ 1; for window > 1 a canvas
// [H, W] with H·W = D and D > (M − 1)·window².
Windows checked_windows(const char* op, int64_t window, at::OptionalIntArrayRef canvas, int64_t D, int64_t M) {
  TORCH_CHECK(window >= 1 && window % 2 == 1, op, ": window must be an odd int >= 1, got ", window);
  if (window == 1) return Windows{0, 0, 0};
  TORCH_CHECK(canvas.has_value() && canvas->size() == 2, op, ": window ", window, " needs canvas = [H, W]");
  const int64_t H = (*canvas)[0], W = (*canvas)[1];
  TORCH_CHECK(H >= 1 && W >= 1 && H * W == D, op, ": canvas [", H, ", ", W, "] does not hold the D = ", D,
              " locations of logits");
  // In double: window² overflows int64 for windows the schema's int allows.
  TORCH_CHECK(static_cast<double>(D) > static_cast<double>(M - 1) * static_cast<double>(window) * window, op,
              ": window ", window, " is too large for the canvas: it needs H·W > (max_objects − 1)·window²");
  return Windows{H, W, window / 2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_topk_relaxed_cpu(const at::Tensor& logits_, const at::Tensor& n_,
                                                                       double tau, int64_t max_objects,
                                                                       const at::Tensor& gumbel_, int64_t window,
                                                                       at::OptionalIntArrayRef canvas) {
  check_logits(kFwd, logits_);
  const int64_t B = logits_.size(0), D = logits_.size(1);
  check_cpu(gumbel_, kFwd, "gumbel");
  check_same_dtype(gumbel_, logits_, kFwd, "gumbel", "logits");
  check_shape(gumbel_, {B, D}, kFwd, "gumbel");
  TORCH_CHECK(max_objects >= 0, kFwd, ": max_objects must be >= 0, got ", max_objects);
  TORCH_CHECK(tau > 0, kFwd, ": tau must be > 0, got ", tau);
  const int64_t M = max_objects;
  const at::Tensor n = checked_counts(n_, B, M, kFwd);
  const Windows win = checked_windows(kFwd, window, canvas, D, M);
  const at::Tensor logits = logits_.contiguous(), gumbel = gumbel_.contiguous();
  at::Tensor relaxed = at::empty({B, M, D}, logits.options());
  at::Tensor log_q = at::empty({B}, logits.options());
  at::Tensor index = at::empty({B, M}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFwd, [&] {
    if (window == 1)
      gumbel_forward<scalar_t>(logits, gumbel, n.const_data_ptr<int64_t>(), tau, M, relaxed, log_q, index);
    else
      gumbel_forward_window<scalar_t>(logits, gumbel, n.const_data_ptr<int64_t>(), tau, M, win, relaxed, log_q,
                                      index);
  });
  return {relaxed, log_q, index};
}

// grad_logits = Σ_{i<n} (1/τ)·r_i⊙(g_i − ⟨g_i, r_i⟩) + g_lq·Σ_{i drawn}(onehot(p_i) − b^(i)).
// The second sum, at a non-drawn pixel d, is exp(l_d − m_r)·Σ_i exp(m_r − lse_i): one exp per
// pixel for all steps; the drawn pixels are fixed up afterwards.
template <typename T>
void gumbel_backward(const at::Tensor& grad_relaxed, const at::Tensor& grad_log_q, const at::Tensor& logits,
                     const int64_t* pidx, const at::Tensor& relaxed, const int64_t* pn, double tau_d, int64_t M,
                     const Windows& win, at::Tensor& grad) {
  const int64_t B = logits.size(0), D = logits.size(1);
  const T* pl = logits.const_data_ptr<T>();
  const T* pgr = grad_relaxed.defined() ? grad_relaxed.const_data_ptr<T>() : nullptr;
  const T* pgq = grad_log_q.defined() ? grad_log_q.const_data_ptr<T>() : nullptr;
  const T* pr = pgr ? relaxed.const_data_ptr<T>() : nullptr;
  T* po = grad.mutable_data_ptr<T>();
  typedef typename Vec<T>::type V;
  const T inv_tau = static_cast<T>(1.0 / tau_d);
  struct Scratch {
    std::vector<T> rank, dots, grp;
    std::vector<int64_t> picks;
    std::vector<double> lse, m, s, ex;
  };
  parallel_tasks<Scratch>(B, [&](int64_t b, Scratch& sc) {
    std::vector<T>&rank = sc.rank, &dots = sc.dots;
    std::vector<int64_t>& picks = sc.picks;
    std::vector<double>& lse = sc.lse;
    rank.resize(D);
    dots.resize(M);
    picks.resize(M);
    lse.resize(M);
    {
      T* out = po + b * D;
      std::fill(out, out + D, T(0));
      const int64_t rows = std::min(pn[b], M);
      if (pgr != nullptr && rows > 0) {
        // Pass 1 reads every row pair once from memory for the dots ⟨g_i, r_i⟩; pass 2 sweeps
        // the image's rows together (now in L2) and writes each output value once.
        const T* r0 = pr + b * M * D;
        const T* g0 = pgr + b * M * D;
        for (int64_t i = 0; i < rows; ++i) dots[i] = dot(g0 + i * D, r0 + i * D, D);
        simd_for<T>(D, [&](int64_t d, int64_t lanes) {
          V acc{};
          for (int64_t i = 0; i < rows; ++i)
            acc += vload_n(r0 + i * D + d, lanes) * (vload_n(g0 + i * D + d, lanes) - dots[i]);
          vstore_n(out + d, acc * inv_tau, lanes);
        });
      }
      if (pgq == nullptr) return;
      const T* l = pl + b * D;
      int64_t k = 0;
      std::fill(rank.begin(), rank.end(), T(-1));
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t p = pidx[b * M + i];
        if (p < 0) continue;
        rank[p] = static_cast<T>(k);
        picks[k++] = p;
      }
      if (k == 0) return;
      const double gq = pgq[b];
      if (win.h > 0) {
        // The window's groups (see the top of the file): −g_lq·Σ_{i ≤ fc_d} exp(l_d − lse_i) at
        // every pixel, + g_lq at each draw. The last group by one vectorised pass against its
        // maximum, the covered pixels one by one.
        sc.grp.resize(D);
        sc.m.resize(k);
        sc.s.resize(k);
        T* grp = sc.grp.data();
        win.groups(picks.data(), k, grp, D);
        window_lse(l, grp, picks.data(), k, win, D, sc.m.data(), sc.s.data(), lse.data());
        const double mk = sc.m[k - 1];
        if (sc.s[k - 1] > 0) {
          double a = 0;
          for (int64_t i = 0; i < k; ++i) a += std::exp(mk - lse[i]);
          const T coef = static_cast<T>(gq * a);
          const T m = static_cast<T>(mk);
          const T last = static_cast<T>(k - 1);
          simd_for<T>(D, [&](int64_t d, int64_t lanes) {
            const V delta = vload_n(grp + d, lanes, T(-1)) == last ? coef * vexp(vload_n(l + d, lanes) - m) : V{};
            vstore_n(out + d, vload_n(out + d, lanes) - delta, lanes);
          });
        }
        for (int64_t j = 0; j + 1 < k; ++j) {
          const T tj = static_cast<T>(j);
          win.each(picks[j], [&](int64_t d) {
            if (grp[d] != tj) return;
            double mass = 0;
            for (int64_t i = 0; i <= j; ++i) mass += std::exp(static_cast<double>(l[d]) - lse[i]);
            out[d] -= static_cast<T>(gq * mass);
          });
        }
        for (int64_t j = 0; j < k; ++j) out[picks[j]] += static_cast<T>(gq);
        return;
      }
      double mr, sr;
      rest_logsumexp(l, rank.data(), D, mr, sr);
      sc.ex.resize(k);
      step_lse(l, picks.data(), k, mr, sr, lse.data(), sc.ex.data());
      if (sr > 0) {
        double a = 0;
        for (int64_t i = 0; i < k; ++i) a += std::exp(mr - lse[i]);
        const T coef = static_cast<T>(gq * a);
        const T m = static_cast<T>(mr);
        simd_for<T>(D, [&](int64_t d, int64_t lanes) {
          const V rk = vload_n(rank.data() + d, lanes);
          const V delta = rk < T(0) ? coef * vexp(vload_n(l + d, lanes) - m) : V{};
          vstore_n(out + d, vload_n(out + d, lanes) - delta, lanes);
        });
      }
      // Draw j is allowed (and so has mass in b^(i)) at the steps i ≤ j.
      for (int64_t j = 0; j < k; ++j) {
        const double lj = l[picks[j]];
        double mass = 0;
        for (int64_t i = 0; i <= j; ++i) mass += std::exp(lj - lse[i]);
        out[picks[j]] += static_cast<T>(gq * (1.0 - mass));
      }
    }
  });
}

// Window 1, given the forward's noise: the relaxed rows are recomputed rather than read. Row i is
// c_i·e_d at the pixels that are not draws and v_ij at draw j (rest_exp, step_row: the forward's
// values bit for bit), so with G_i = grad_relaxed row i, at a pixel that is not a draw
//   grad_d = (1/τ) Σ_i c_i·e_d·(G_i[d] − ⟨G_i, r_i⟩) = (e_d/τ)·(S_d − K),
//   S_d = Σ_i c_i·G_i[d],  K = Σ_i c_i·⟨G_i, r_i⟩,  ⟨G_i, r_i⟩ = c_i·Σ_d G_i[d]·e_d + Σ_{j≥i} G_i[p_j]·v_ij,
// and the k draws are fixed up one by one. One pass reads each row of grad_relaxed once (S_d
// accumulates in the output row, which stays in cache) and the saved relaxed rows are not read at
// all: half the memory traffic of the pass over (grad_relaxed, relaxed). The log_q term is that of
// gumbel_backward, with exp(l_d − m_r) kept from its sum for the output pass (one exp per pixel, not
// two), and is written in the same output pass.
template <typename T>
void gumbel_backward_recompute(const at::Tensor& grad_relaxed, const at::Tensor& grad_log_q, const at::Tensor& logits,
                               const at::Tensor& gumbel, const int64_t* pidx, const int64_t* pn, double tau_d,
                               int64_t M, at::Tensor& grad) {
  const int64_t B = logits.size(0), D = logits.size(1);
  const T* pl = logits.const_data_ptr<T>();
  const T* pg = gumbel.const_data_ptr<T>();
  const T* pgr = grad_relaxed.defined() ? grad_relaxed.const_data_ptr<T>() : nullptr;
  const T* pgq = grad_log_q.defined() ? grad_log_q.const_data_ptr<T>() : nullptr;
  T* po = grad.mutable_data_ptr<T>();
  typedef typename Vec<T>::type V;
  constexpr int N = Vec<T>::N;
  const T inv_tau = static_cast<T>(1.0 / tau_d);
  const T ninf = -std::numeric_limits<T>::infinity();
  struct Scratch {
    std::vector<T> rank, e, w, topv, val, c;
    std::vector<int64_t> picks;
    std::vector<double> lse, dots, ex;
  };
  parallel_tasks<Scratch>(B, [&](int64_t b, Scratch& sc) {
    T* out = po + b * D;
    const int64_t rows = std::min(pn[b], M);
    const bool has_r = pgr != nullptr, has_q = pgq != nullptr;
    if (rows == 0 || (!has_r && !has_q)) {
      std::fill(out, out + D, T(0));
      return;
    }
    const T* l = pl + b * D;
    sc.rank.resize(D);
    sc.picks.resize(rows);
    T* rank = sc.rank.data();
    int64_t* picks = sc.picks.data();
    // The draws (index −1 marks the absent ones, only after the last draw) and rank[d] = the step
    // at which pixel d is drawn, −1 if never.
    std::fill(rank, rank + D, T(-1));
    int64_t k = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t p = pidx[b * M + i];
      if (p < 0) continue;
      rank[p] = static_cast<T>(k);
      picks[k++] = p;
    }
    if (k == 0) {
      std::fill(out, out + D, T(0));
      return;
    }
    // Pass over D: y = logits + g (as the forward), and the largest logit that is not a draw.
    sc.e.resize(D);
    sc.topv.resize(k);
    T* e = sc.e.data();
    T* topv = sc.topv.data();
    const T* g = pg + b * D;
    V vm = splat<V>(ninf);
    simd_for<T>(D, [&](int64_t d, int64_t lanes) {
      const V lv = vload_n(l + d, lanes);
      vstore_n(e + d, lv + vload_n(g + d, lanes), lanes);
      const V v = vload_n(rank + d, lanes, T(0)) < T(0) ? lv : vm;
      vm = v > vm ? v : vm;
    });
    for (int64_t j = 0; j < k; ++j) topv[j] = e[picks[j]];
    double K = 0;
    if (has_r) {
      sc.val.resize(k * k);
      sc.c.resize(k);
      sc.dots.resize(k);
      T* val = sc.val.data();
      T* c = sc.c.data();
      const double R = rest_exp(e, rank, D, topv[k - 1], inv_tau);
      sc.ex.resize(k);
      for (int64_t i = 0; i < k; ++i) c[i] = step_row(topv, k, i, R, inv_tau, val + i * k, sc.ex.data());
      // S_d into the output row, and each row's Σ_d G_i[d]·e_d (e_d = 0 at the draws). The rows are
      // read from memory once; a prefetch 2 KB ahead carries the stream across the 4 KB pages, where
      // the hardware prefetcher stops (measured 3-6% of the fused forward + backward at B = 64).
      constexpr int64_t kPrefetch = 2048 / static_cast<int64_t>(sizeof(T));
      const T* G = pgr + b * M * D;
      for (int64_t i = 0; i < k; ++i) {
        const T* Gi = G + i * D;
        const T ci = c[i];
        V u0{}, u1{};
        int64_t d = 0;
        if (i == 0) {
          for (; d + 2 * N <= D; d += 2 * N) {
            __builtin_prefetch(Gi + d + kPrefetch, 0, 0);
            const V g0 = vload<V>(Gi + d), g1 = vload<V>(Gi + d + N);
            u0 += g0 * vload<V>(e + d);
            u1 += g1 * vload<V>(e + d + N);
            vstore(out + d, ci * g0);
            vstore(out + d + N, ci * g1);
          }
          simd_for<T>(D - d, [&](int64_t x, int64_t lanes) {
            const V gv = vload_n(Gi + d + x, lanes);
            u0 += gv * vload_n(e + d + x, lanes);
            vstore_n(out + d + x, ci * gv, lanes);
          });
        } else {
          for (; d + 2 * N <= D; d += 2 * N) {
            __builtin_prefetch(Gi + d + kPrefetch, 0, 0);
            const V g0 = vload<V>(Gi + d), g1 = vload<V>(Gi + d + N);
            u0 += g0 * vload<V>(e + d);
            u1 += g1 * vload<V>(e + d + N);
            vstore(out + d, vload<V>(out + d) + ci * g0);
            vstore(out + d + N, vload<V>(out + d + N) + ci * g1);
          }
          simd_for<T>(D - d, [&](int64_t x, int64_t lanes) {
            const V gv = vload_n(Gi + d + x, lanes);
            u0 += gv * vload_n(e + d + x, lanes);
            vstore_n(out + d + x, vload_n(out + d + x, lanes) + ci * gv, lanes);
          });
        }
        double dot = static_cast<double>(ci) * static_cast<double>(hsum(u0 + u1));
        for (int64_t j = i; j < k; ++j) dot += static_cast<double>(Gi[picks[j]]) * static_cast<double>(val[i * k + j]);
        sc.dots[i] = dot;
        K += static_cast<double>(ci) * dot;
      }
    }
    // The log_q term: −g_lq·exp(l_d − m_r)·Σ_i exp(m_r − lse_i) at the pixels that are not draws.
    double gq = 0, mr = vm[0], sr = 0;
    T coef_q = T(0);
    if (has_q) {
      gq = pgq[b];
      for (int j = 1; j < N; ++j) mr = std::max<double>(mr, vm[j]);
      sc.w.resize(D);
      T* w = sc.w.data();
      if (mr != -std::numeric_limits<double>::infinity()) {
        const T m = static_cast<T>(mr);
        V acc{};
        simd_for<T>(D, [&](int64_t d, int64_t lanes) {
          const V wv = vload_n(rank + d, lanes, T(0)) < T(0) ? vexp(vload_n(l + d, lanes) - m) : V{};
          vstore_n(w + d, wv, lanes);
          acc += wv;
        });
        sr = hsum(acc);
      }
      sc.lse.resize(k);
      sc.ex.resize(k);
      step_lse(l, picks, k, mr, sr, sc.lse.data(), sc.ex.data());
      if (sr > 0) {
        double a = 0;
        for (int64_t i = 0; i < k; ++i) a += std::exp(mr - sc.lse[i]);
        coef_q = static_cast<T>(gq * a);
      }
    }
    // The output pass: (e_d/τ)·(S_d − K) − coef_q·exp(l_d − m_r) (each term 0 at the draws).
    {
      const T Kt = static_cast<T>(K);
      const T* w = sc.w.data();
      const bool q_rest = has_q && sr > 0;
      if (has_r && q_rest)
        simd_for<T>(D, [&](int64_t d, int64_t lanes) {
          const V v = vload_n(e + d, lanes) * inv_tau * (vload_n(out + d, lanes) - Kt) - coef_q * vload_n(w + d, lanes);
          vstore_n(out + d, v, lanes);
        });
      else if (has_r)
        simd_for<T>(D, [&](int64_t d, int64_t lanes) {
          vstore_n(out + d, vload_n(e + d, lanes) * inv_tau * (vload_n(out + d, lanes) - Kt), lanes);
        });
      else if (q_rest)
        simd_for<T>(D, [&](int64_t d, int64_t lanes) { vstore_n(out + d, -(coef_q * vload_n(w + d, lanes)), lanes); });
      else
        std::fill(out, out + D, T(0));
    }
    // The draws: draw j is in the rows i ≤ j (value v_ij) and in b^(i) for i ≤ j.
    for (int64_t j = 0; j < k; ++j) {
      double v = 0;
      if (has_r) {
        const T* G = pgr + b * M * D;
        const T* val = sc.val.data();
        for (int64_t i = 0; i <= j; ++i)
          v += static_cast<double>(val[i * k + j]) * (static_cast<double>(G[i * D + picks[j]]) - sc.dots[i]);
        v *= static_cast<double>(inv_tau);
      }
      if (has_q) {
        const double lj = l[picks[j]];
        double mass = 0;
        for (int64_t i = 0; i <= j; ++i) mass += std::exp(lj - sc.lse[i]);
        v += gq * (1.0 - mass);
      }
      out[picks[j]] = static_cast<T>(v);
    }
  });
}

at::Tensor gumbel_topk_relaxed_backward_cpu(const std::optional<at::Tensor>& grad_relaxed_,
                                            const std::optional<at::Tensor>& grad_log_q_, const at::Tensor& logits_,
                                            const at::Tensor& index_, const at::Tensor& relaxed_, const at::Tensor& n_,
                                            double tau, int64_t window, at::OptionalIntArrayRef canvas,
                                            const std::optional<at::Tensor>& gumbel_) {
  check_logits(kBwd, logits_);
  const int64_t B = logits_.size(0), D = logits_.size(1);
  check_cpu(index_, kBwd, "index");
  check_dim(index_, 2, kBwd, "index");
  const int64_t M = index_.size(1);
  TORCH_CHECK(tau > 0, kBwd, ": tau must be > 0, got ", tau);
  const at::Tensor n = checked_counts(n_, B, M, kBwd);
  const at::Tensor index = checked_index(index_, n, B, M, D, kBwd);
  const Windows win = checked_windows(kBwd, window, canvas, D, M);
  // The forward's noise, if given: window 1 then recomputes the relaxed rows from it instead of
  // reading them (the other windows read them, and ignore it). It must be the forward's own noise
  // (index the draws it gave): other noise gives other rows, though never an access out of bounds.
  at::Tensor gumbel;
  if (gumbel_.has_value()) {
    check_cpu(*gumbel_, kBwd, "gumbel");
    check_same_dtype(*gumbel_, logits_, kBwd, "gumbel", "logits");
    check_shape(*gumbel_, {B, D}, kBwd, "gumbel");
    if (window == 1) gumbel = gumbel_->contiguous();
  }
  at::Tensor grad_relaxed, relaxed, grad_log_q;
  if (grad_relaxed_.has_value()) {
    check_cpu(*grad_relaxed_, kBwd, "grad_relaxed");
    check_same_dtype(*grad_relaxed_, logits_, kBwd, "grad_relaxed", "logits");
    check_shape(*grad_relaxed_, {B, M, D}, kBwd, "grad_relaxed");
    check_cpu(relaxed_, kBwd, "relaxed");
    check_same_dtype(relaxed_, logits_, kBwd, "relaxed", "logits");
    check_shape(relaxed_, {B, M, D}, kBwd, "relaxed");
    grad_relaxed = grad_relaxed_->contiguous();
    if (!gumbel.defined()) relaxed = relaxed_.contiguous();
  }
  if (grad_log_q_.has_value()) {
    check_cpu(*grad_log_q_, kBwd, "grad_log_q");
    check_same_dtype(*grad_log_q_, logits_, kBwd, "grad_log_q", "logits");
    check_shape(*grad_log_q_, {B}, kBwd, "grad_log_q");
    grad_log_q = grad_log_q_->contiguous();
  }
  const at::Tensor logits = logits_.contiguous();
  at::Tensor grad = at::empty({B, D}, logits.options());
  if (gumbel.defined()) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kBwd, [&] {
      gumbel_backward_recompute<scalar_t>(grad_relaxed, grad_log_q, logits, gumbel, index.const_data_ptr<int64_t>(),
                                          n.const_data_ptr<int64_t>(), tau, M, grad);
    });
    return grad;
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kBwd, [&] {
    gumbel_backward<scalar_t>(grad_relaxed, grad_log_q, logits, index.const_data_ptr<int64_t>(), relaxed,
                              n.const_data_ptr<int64_t>(), tau, M, win, grad);
  });
  return grad;
}

}  // namespace
}  // namespace gumbel
}  // namespace LAVAE_ISA
}  // namespace lavae_fast

// Fused Leaky ReLU → batch norm with batch statistics (lavae_fast/engine/norm.py), forward and backward.
//
// Forward, two passes over y: (1) per-channel Σd and Σd² of d = a − shift_c, a = leaky_relu(y);
// (2) out = (a − mean)·invstd·weight + bias. Backward, two passes over (grad_out, y): (1) Σg and
// Σg·(a − mean) per channel, which give grad_bias and grad_weight; (2) grad_y. a and x̂ are
// recomputed from y each time instead of being stored: a recompute costs a few flops per element,
// a stored tensor costs a write and a read of the whole activation.
//
// Layouts: channels-last (the hot case) is [rows = N·H·W][C]; its loops run over rows in parallel
// blocks with a contiguous inner loop over channels that the compiler vectorises (C = 44 in the
// model, not a multiple of the vector width, so the channel loop, not a fixed width, is the inner
// loop). Contiguous NCHW is [N·C planes][H·W] and runs plane by plane. Anything else is made
// contiguous first.
//
// Accuracy: each channel's sums run over up to ~10^6 values. Values are accumulated in the compute
// type (float for float32/bfloat16) over short chunks of rows, then added into float64 partials;
// each parallel block has its own partials, reduced in block order, so the result does not depend
// on the schedule. The variance comes from sums of d = a − shift_c with shift_c the channel's first
// value: without the shift Σa²/n − mean² loses everything when |mean| ≫ std.
#include <numeric>
#include <vector>

#include "common.h"

namespace lavae_fast {
namespace LAVAE_ISA {
namespace norm {
namespace {

constexpr int64_t kChunkGroups = 8;    // groups summed in the compute type before the float64 flush
constexpr int64_t kTaskElems = 32768;   // elements per parallel block (channels-last)

// Element access in the compute type A. bfloat16 data is handled as raw uint16 bits so that the
// conversions are plain integer shifts.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline double ld(const double* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(double* p, int64_t i, double v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(v != v ? 0x7fc0u : r);
}

// The same on whole vectors (Vec<A>::N values).
typedef uint32_t VecU32 __attribute__((vector_size(kVecBytes)));
typedef uint16_t VecU16 __attribute__((vector_size(kVecBytes / 2)));
inline Vec<float>::type vld(const float* p) { return vload<Vec<float>::type>(p); }
inline Vec<double>::type vld(const double* p) { return vload<Vec<double>::type>(p); }
inline Vec<float>::type vld(const uint16_t* p) {
  const VecU32 u = __builtin_convertvector(vload<VecU16>(p), VecU32) << 16;
  return (Vec<float>::type)u;
}
inline void vst(float* p, const Vec<float>::type& v) { vstore(p, v); }
inline void vst(double* p, const Vec<double>::type& v) { vstore(p, v); }
inline void vst(uint16_t* p, const Vec<float>::type& v) {
  const VecU32 u = (VecU32)v;
  VecU32 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = v != v ? VecU32{} + 0x7fc0u : r;
  vstore(p, __builtin_convertvector(r, VecU16));
}

template <typename A>
inline A lrelu(A y, A slope) {
  return y > A(0) ? y : y * slope;
}
template <typename V, typename A>
inline V vlrelu(V y, A slope) {
  return y > V{} ? y : y * slope;
}

// ---------------------------------------------------------------------------------------------
// Span kernels. A span is `len` contiguous values whose per-value coefficients repeat with period
// P (a multiple of the vector width): for channels-last, P = k·C values (k rows, the fewest whole
// rows that fill whole vectors: k = 16/gcd(C, 16), e.g. 4 rows = 176 values for C = 44), so every
// vector sits at a fixed set of channels and the hot loop has no remainder; for a NCHW plane the
// coefficients are constant and P is one vector. Coefficient arrays hold P values. Sums go into
// f1[P], f2[P] (the caller folds positions into channels); the last len % P values are done one
// by one with the coefficient of their position.
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void span_stats(const T* y, int64_t len, int64_t P, A slope, const A* sh, A* f1, A* f2) {
  typedef typename Vec<A>::type V;
  constexpr int VN = Vec<A>::N;
  int64_t i = 0;
  for (; i + P <= len; i += P)
    for (int64_t p = 0; p < P; p += VN) {
      const V d = vlrelu(vld(y + i + p), slope) - vload<V>(sh + p);
      vstore(f1 + p, vload<V>(f1 + p) + d);
      vstore(f2 + p, vload<V>(f2 + p) + d * d);
    }
  for (int64_t p = 0; i + p < len; ++p) {
    const A d = lrelu(ld(y, i + p), slope) - sh[p];
    f1[p] += d;
    f2[p] += d * d;
  }
}

template <typename T, typename A>
void span_normalise(const T* y, T* out, int64_t len, int64_t P, A slope, const A* mu, const A* sc, const A* b) {
  typedef typename Vec<A>::type V;
  constexpr int VN = Vec<A>::N;
  int64_t i = 0;
  for (; i + P <= len; i += P)
    for (int64_t p = 0; p < P; p += VN)
      vst(out + i + p, (vlrelu(vld(y + i + p), slope) - vload<V>(mu + p)) * vload<V>(sc + p) + vload<V>(b + p));
  for (int64_t p = 0; i + p < len; ++p) st(out, i + p, (lrelu(ld(y, i + p), slope) - mu[p]) * sc[p] + b[p]);
}

template <typename T, typename A>
void span_grad_stats(const T* g, const T* y, int64_t len, int64_t P, A slope, const A* mu, A* f1, A* f2) {
  typedef typename Vec<A>::type V;
  constexpr int VN = Vec<A>::N;
  int64_t i = 0;
  for (; i + P <= len; i += P)
    for (int64_t p = 0; p < P; p += VN) {
      const V gv = vld(g + i + p);
      vstore(f1 + p, vload<V>(f1 + p) + gv);
      vstore(f2 + p, vload<V>(f2 + p) + gv * (vlrelu(vld(y + i + p), slope) - vload<V>(mu + p)));
    }
  for (int64_t p = 0; i + p < len; ++p) {
    const A gv = ld(g, i + p);
    f1[p] += gv;
    f2[p] += gv * (lrelu(ld(y, i + p), slope) - mu[p]);
  }
}

// grad_y = kk·g + k0 + kq·(a − mean), times the Leaky ReLU's slope where y ≤ 0.
template <typename T, typename A>
void span_grad(const T* g, const T* y, T* gy, int64_t len, int64_t P, A slope, const A* mu, const A* kk, const A* k0,
               const A* kq) {
  typedef typename Vec<A>::type V;
  constexpr int VN = Vec<A>::N;
  int64_t i = 0;
  for (; i + P <= len; i += P)
    for (int64_t p = 0; p < P; p += VN) {
      const V yv = vld(y + i + p);
      const V v = vload<V>(kk + p) * vld(g + i + p) + vload<V>(k0 + p) +
                  vload<V>(kq + p) * (vlrelu(yv, slope) - vload<V>(mu + p));
      vst(gy + i + p, yv > V{} ? v : v * slope);
    }
  for (int64_t p = 0; i + p < len; ++p) {
    const A yv = ld(y, i + p);
    const A v = kk[p] * ld(g, i + p) + k0[p] + kq[p] * (lrelu(yv, slope) - mu[p]);
    st(gy, i + p, yv > A(0) ? v : v * slope);
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers: the layout's periods and parallel blocks around the span kernels.
// ---------------------------------------------------------------------------------------------

struct Layout {
  bool cl;
  int64_t N, C, HW;
  int64_t P;      // channels-last period in values (k·C)
  int64_t G;      // whole periods in the tensor (channels-last)
  int64_t gpt;    // periods per parallel block
  int64_t tasks;  // parallel blocks (channels-last) or planes (NCHW)
  Layout(bool cl_, int64_t N_, int64_t C_, int64_t HW_) : cl(cl_), N(N_), C(C_), HW(HW_) {
    const int64_t k = 16 / std::gcd<int64_t>(C, 16);
    P = k * C;
    G = N * HW * C / P;
    gpt = std::max<int64_t>(1, kTaskElems / P);
    tasks = cl ? std::max<int64_t>(1, ceil_div(G, gpt)) : N * C;
  }
  // Channels-last block t: values [begin, end); the last block also takes the tail rows.
  int64_t begin(int64_t t) const { return t * gpt * P; }
  int64_t end(int64_t t) const { return t + 1 == tasks ? N * HW * C : std::min(G, (t + 1) * gpt) * P; }
};

// A coefficient per channel, laid out with the period of the layout (P values for channels-last,
// one vector of the plane's constant for NCHW: `plane_coef` picks it).
template <typename A>
std::vector<A> periodic(const Layout& L, const double* v) {
  std::vector<A> out(L.P);
  for (int64_t p = 0; p < L.P; ++p) out[p] = static_cast<A>(v[p % L.C]);
  return out;
}
template <typename A>
struct PlaneCoef {
  A v[Vec<A>::N];
  explicit PlaneCoef(A x) {
    for (auto& e : v) e = x;
  }
};

template <typename A>
struct Buf {
  std::vector<A> v;
  std::vector<double> d;
};

// Per-channel sums S[0..C), S[C..2C) in float64 of span(x_offset, len, P, f1, f2) over the tensor.
// For channels-last, span gets its block's values; for NCHW, each plane with its channel's index.
template <typename A, typename SpanCL, typename SpanPlane>
void channel_sums(const Layout& L, double* S, const SpanCL& span_cl, const SpanPlane& span_plane) {
  const int64_t C = L.C;
  std::vector<double> part(static_cast<size_t>(L.tasks * 2 * (L.cl ? C : 1)), 0.0);
  if (L.cl) {
    const int64_t P = L.P;
    parallel_tasks<Buf<A>>(L.tasks, [&](int64_t t, Buf<A>& s) {
      s.v.assign(2 * P, A(0));
      s.d.assign(2 * P, 0.0);
      A* f = s.v.data();
      const int64_t b = L.begin(t), e = L.end(t);
      for (int64_t i = b; i < e; i += kChunkGroups * P) {
        std::fill(f, f + 2 * P, A(0));
        span_cl(i, std::min(e - i, kChunkGroups * P), f, f + P);
        for (int64_t p = 0; p < 2 * P; ++p) s.d[p] += f[p];
      }
      double* o = part.data() + t * 2 * C;
      for (int64_t p = 0; p < P; ++p) {
        o[p % C] += s.d[p];
        o[C + p % C] += s.d[P + p];
      }
    });
    for (int64_t c = 0; c < 2 * C; ++c) S[c] = 0.0;
    for (int64_t t = 0; t < L.tasks; ++t)
      for (int64_t c = 0; c < 2 * C; ++c) S[c] += part[t * 2 * C + c];
  } else {
    constexpr int VN = Vec<A>::N;
    const int64_t HW = L.HW;
    parallel_tasks<NoScratch>(L.tasks, [&](int64_t t, NoScratch&) {
      const int64_t c = t % C;
      A f[2 * VN];
      double d1 = 0.0, d2 = 0.0;
      // 16 values per lane in the compute type, then float64.
      for (int64_t i = 0; i < HW; i += 16 * VN) {
        std::fill(f, f + 2 * VN, A(0));
        span_plane(t * HW + i, std::min<int64_t>(HW - i, 16 * VN), c, f, f + VN);
        for (int j = 0; j < VN; ++j) {
          d1 += f[j];
          d2 += f[VN + j];
        }
      }
      part[2 * t] = d1;
      part[2 * t + 1] = d2;
    });
    for (int64_t c = 0; c < 2 * C; ++c) S[c] = 0.0;
    for (int64_t t = 0; t < L.tasks; ++t) {
      S[t % C] += part[2 * t];
      S[C + t % C] += part[2 * t + 1];
    }
  }
}

// map_cl(begin, len) per channels-last block; map_plane(offset, len, c) per NCHW plane.
template <typename MapCL, typename MapPlane>
void elementwise(const Layout& L, const MapCL& map_cl, const MapPlane& map_plane) {
  parallel_tasks<NoScratch>(L.tasks, [&](int64_t t, NoScratch&) {
    if (L.cl)
      map_cl(L.begin(t), L.end(t) - L.begin(t));
    else
      map_plane(t * L.HW, L.HW, t % L.C);
  });
}

// ---------------------------------------------------------------------------------------------
// Forward and backward
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void forward_kernel(const T* y, T* out, const double* w, const double* b, double* mean, double* invstd,
                    const Layout& L, double slope_d, double eps) {
  constexpr int VN = Vec<A>::N;
  const A slope = static_cast<A>(slope_d);
  const int64_t C = L.C, HW = L.HW;
  const double n = static_cast<double>(L.N * HW);
  // Shift: each channel's first value, a cheap estimate of its mean.
  std::vector<double> shift(C), S(2 * C), mu(C), sc(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = lrelu(ld(y, L.cl ? c : c * HW), slope);
  const std::vector<A> sh = periodic<A>(L, shift.data());
  channel_sums<A>(
      L, S.data(), [&](int64_t i, int64_t len, A* f1, A* f2) { span_stats(y + i, len, L.P, slope, sh.data(), f1, f2); },
      [&](int64_t i, int64_t len, int64_t c, A* f1, A* f2) {
        const PlaneCoef<A> s(static_cast<A>(shift[c]));
        span_stats(y + i, len, VN, slope, s.v, f1, f2);
      });
  // mean = shift + Σd/n, var = Σd²/n − (Σd/n)²; out = (a − mean)·invstd·weight + bias.
  for (int64_t c = 0; c < C; ++c) {
    const double md = S[c] / n;
    const double var = std::max(S[C + c] / n - md * md, 0.0);
    mean[c] = shift[c] + md;
    invstd[c] = 1.0 / std::sqrt(var + eps);
    mu[c] = mean[c];
    sc[c] = invstd[c] * w[c];
  }
  const std::vector<A> muP = periodic<A>(L, mu.data()), scP = periodic<A>(L, sc.data()), bP = periodic<A>(L, b);
  elementwise(
      L,
      [&](int64_t i, int64_t len) { span_normalise(y + i, out + i, len, L.P, slope, muP.data(), scP.data(), bP.data()); },
      [&](int64_t i, int64_t len, int64_t c) {
        const PlaneCoef<A> m(static_cast<A>(mu[c])), s(static_cast<A>(sc[c])), bb(static_cast<A>(b[c]));
        span_normalise(y + i, out + i, len, VN, slope, m.v, s.v, bb.v);
      });
}

template <typename T, typename A>
void backward_kernel(const T* g, const T* y, T* gy, const double* w, const double* mean, const double* invstd,
                     double* gw, double* gb, const Layout& L, double slope_d) {
  constexpr int VN = Vec<A>::N;
  const A slope = static_cast<A>(slope_d);
  const int64_t C = L.C;
  const double n = static_cast<double>(L.N * L.HW);
  std::vector<double> S(2 * C);
  const std::vector<A> muP = periodic<A>(L, mean);
  // Σg and Σg·(a − mean); x̂ = (a − mean)·invstd is applied afterwards.
  channel_sums<A>(
      L, S.data(),
      [&](int64_t i, int64_t len, A* f1, A* f2) { span_grad_stats(g + i, y + i, len, L.P, slope, muP.data(), f1, f2); },
      [&](int64_t i, int64_t len, int64_t c, A* f1, A* f2) {
        const PlaneCoef<A> m(static_cast<A>(mean[c]));
        span_grad_stats(g + i, y + i, len, VN, slope, m.v, f1, f2);
      });
  for (int64_t c = 0; c < C; ++c) {
    if (gb) gb[c] = S[c];
    if (gw) gw[c] = S[C + c] * invstd[c];
  }
  if (!gy) return;
  // grad_y = k·g − k·mean(g) − k·invstd²·mean(g·(a − mean))·(a − mean), with k = weight·invstd.
  std::vector<double> kk(C), k0(C), kq(C);
  for (int64_t c = 0; c < C; ++c) {
    const double k = w[c] * invstd[c];
    kk[c] = k;
    k0[c] = -k * S[c] / n;
    kq[c] = -k * invstd[c] * invstd[c] * S[C + c] / n;
  }
  const std::vector<A> kkP = periodic<A>(L, kk.data()), k0P = periodic<A>(L, k0.data()), kqP = periodic<A>(L, kq.data());
  elementwise(
      L,
      [&](int64_t i, int64_t len) {
        span_grad(g + i, y + i, gy + i, len, L.P, slope, muP.data(), kkP.data(), k0P.data(), kqP.data());
      },
      [&](int64_t i, int64_t len, int64_t c) {
        const PlaneCoef<A> m(static_cast<A>(mean[c])), a1(static_cast<A>(kk[c])), a0(static_cast<A>(k0[c])),
            aq(static_cast<A>(kq[c]));
        span_grad(g + i, y + i, gy + i, len, VN, slope, m.v, a1.v, a0.v, aq.v);
      });
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_y(const at::Tensor& y, const char* op) {
  check_cpu(y, op, "y");
  check_dim(y, 4, op, "y");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble || y.scalar_type() == at::kBFloat16,
              op, ": y must be float32, float64 or bfloat16, got ", y.scalar_type());
}

void check_stat(const at::Tensor& t, const at::Tensor& y, const char* op, const char* name) {
  check_cpu(t, op, name);
  check_shape(t, {y.size(1)}, op, name);
  TORCH_CHECK(t.scalar_type() == stats_type(y.scalar_type()), op, ": ", name, " must be ",
              stats_type(y.scalar_type()), " for a ", y.scalar_type(), " y, got ", t.scalar_type());
}

// True for the channels-last path; the same rule as norm.output_memory_format.
bool channels_last(const at::Tensor& y) {
  return !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The stats tensors as contiguous float64 (C values: the copies cost nothing).
std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + d.numel());
}

template <typename F>
void dispatch(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr), static_cast<float*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr), static_cast<double*>(nullptr)); break;
    default: f(static_cast<uint16_t*>(nullptr), static_cast<float*>(nullptr)); break;  // bfloat16
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lrelu_batch_norm_cpu(const at::Tensor& y_in, const at::Tensor& weight,
                                                                    const at::Tensor& bias, double slope, double eps) {
  const char* op = "lrelu_batch_norm";
  check_y(y_in, op);
  check_stat(weight, y_in, op, "weight");
  check_stat(bias, y_in, op, "bias");
  const bool cl = channels_last(y_in);
  const at::Tensor y = cl ? y_in : y_in.contiguous();
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  at::Tensor out = at::empty(y.sizes(), y.options(), cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const auto sopt = weight.options();
  if (C == 0) return {out, at::empty({0}, sopt), at::empty({0}, sopt)};
  std::vector<double> w = as_doubles(weight), b = as_doubles(bias), mean(C), invstd(C);
  if (N * HW == 0) {
    // No values: the statistics are 0/0, as the reference's var_mean gives.
    std::fill(mean.begin(), mean.end(), std::numeric_limits<double>::quiet_NaN());
    std::fill(invstd.begin(), invstd.end(), std::numeric_limits<double>::quiet_NaN());
  } else {
    dispatch(y.scalar_type(), [&](auto* tp, auto* ap) {
      using T = std::remove_pointer_t<decltype(tp)>;
      using A = std::remove_pointer_t<decltype(ap)>;
      forward_kernel<T, A>(static_cast<const T*>(y.const_data_ptr()), static_cast<T*>(out.data_ptr()), w.data(),
                           b.data(), mean.data(), invstd.data(), Layout(cl, N, C, HW), slope, eps);
    });
  }
  at::Tensor m = at::from_blob(mean.data(), {C}, at::kDouble).to(sopt.dtype());
  at::Tensor s = at::from_blob(invstd.data(), {C}, at::kDouble).to(sopt.dtype());
  if (m.scalar_type() == at::kDouble) {  // from_blob memory dies with the vectors: own a copy
    m = m.clone();
    s = s.clone();
  }
  return {out, m, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lrelu_batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y_in, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, double slope, bool need_y, bool need_weight, bool need_bias) {
  const char* op = "lrelu_batch_norm_backward";
  check_y(y_in, op);
  check_cpu(grad_out, op, "grad_out");
  check_shape(grad_out, y_in.sizes(), op, "grad_out");
  check_same_dtype(grad_out, y_in, op, "grad_out", "y");
  check_stat(weight, y_in, op, "weight");
  check_stat(mean, y_in, op, "mean");
  check_stat(invstd, y_in, op, "invstd");
  const bool cl = channels_last(y_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor g = grad_out.contiguous(fmt);
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const auto sopt = weight.options();
  at::Tensor gy = need_y ? at::empty(y.sizes(), y.options(), fmt) : at::empty({0}, y.options());
  at::Tensor gw = at::zeros({need_weight ? C : 0}, sopt.dtype(at::kDouble));
  at::Tensor gb = at::zeros({need_bias ? C : 0}, sopt.dtype(at::kDouble));
  if ((need_y || need_weight || need_bias) && C > 0 && N * HW > 0) {
    std::vector<double> w = as_doubles(weight), mu = as_doubles(mean), is = as_doubles(invstd);
    dispatch(y.scalar_type(), [&](auto* tp, auto* ap) {
      using T = std::remove_pointer_t<decltype(tp)>;
      using A = std::remove_pointer_t<decltype(ap)>;
      backward_kernel<T, A>(static_cast<const T*>(g.const_data_ptr()), static_cast<const T*>(y.const_data_ptr()),
                            need_y ? static_cast<T*>(gy.data_ptr()) : nullptr, w.data(), mu.data(), is.data(),
                            need_weight ? gw.data_ptr<double>() : nullptr, need_bias ? gb.data_ptr<double>() : nullptr,
                            Layout(cl, N, C, HW), slope);
    });
  }
  return {gy, gw.to(sopt.dtype()), gb.to(sopt.dtype())};
}

}  // namespace
}  // namespace norm
}  // namespace LAVAE_ISA
}  // namespace lavae_fast

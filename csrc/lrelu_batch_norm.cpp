// Fused Leaky ReLU → batch norm with batch statistics (lavae_fast/norm.py), forward and backward.
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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace lavae_fast {
namespace {

constexpr int64_t kChunkRows = 16;      // rows summed in the compute type before the float64 flush
constexpr int64_t kTaskElems = 32768;   // elements per parallel block (channels-last)

// Element access in the compute type A. bfloat16 data is handled as raw uint16 bits so that the
// conversions are plain integer shifts the vectoriser understands.
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

template <typename A>
inline A lrelu(A y, A slope) {
  return y > A(0) ? y : y * slope;
}

template <typename A>
struct Buf {
  std::vector<A> v;
};

inline int64_t rows_per_task(int64_t C) { return round_up(std::max<int64_t>(1, kTaskElems / C), kChunkRows); }

// Channels-last sums: for each block of rows, row(r, f1, f2) adds row r's terms into f1[C], f2[C]
// (compute type); S[0..C) and S[C..2C) receive the totals in float64.
template <typename A, typename F>
void rows_sums(int64_t R, int64_t C, double* S, const F& row) {
  const int64_t rpt = rows_per_task(C), ntasks = ceil_div(R, rpt);
  std::vector<double> part(static_cast<size_t>(ntasks * 2 * C), 0.0);
  parallel_tasks<Buf<A>>(ntasks, [&](int64_t t, Buf<A>& s) {
    s.v.resize(2 * C);
    A* __restrict f1 = s.v.data();
    A* __restrict f2 = f1 + C;
    double* __restrict p1 = part.data() + t * 2 * C;
    double* __restrict p2 = p1 + C;
    const int64_t end = std::min(R, (t + 1) * rpt);
    for (int64_t r0 = t * rpt; r0 < end; r0 += kChunkRows) {
      for (int64_t c = 0; c < 2 * C; ++c) f1[c] = A(0);
      const int64_t r1 = std::min(end, r0 + kChunkRows);
      for (int64_t r = r0; r < r1; ++r) row(r, f1, f2);
      for (int64_t c = 0; c < C; ++c) {
        p1[c] += f1[c];
        p2[c] += f2[c];
      }
    }
  });
  for (int64_t c = 0; c < 2 * C; ++c) S[c] = 0.0;
  for (int64_t t = 0; t < ntasks; ++t)
    for (int64_t c = 0; c < 2 * C; ++c) S[c] += part[t * 2 * C + c];
}

// Channels-last element-wise pass: row(r) for every row, in parallel blocks.
template <typename F>
void rows_map(int64_t R, int64_t C, const F& row) {
  const int64_t rpt = rows_per_task(C);
  parallel_tasks<NoScratch>(ceil_div(R, rpt), [&](int64_t t, NoScratch&) {
    const int64_t end = std::min(R, (t + 1) * rpt);
    for (int64_t r = t * rpt; r < end; ++r) row(r);
  });
}

// Sums over one NCHW plane of `len` values: elem(i, u, v) gives the two terms of value i. Lanes of
// one vector width accumulate in the compute type for a few vectors, then flush to float64.
template <typename A, typename F>
inline void plane_sums(int64_t len, const F& elem, double& out1, double& out2) {
  constexpr int L = 64 / sizeof(A);
  double d1[L] = {}, d2[L] = {};
  int64_t i = 0;
  while (i + L <= len) {
    A f1[L] = {}, f2[L] = {};
    const int64_t blocks = std::min<int64_t>(kChunkRows, (len - i) / L);
    for (int64_t b = 0; b < blocks; ++b, i += L)
      for (int j = 0; j < L; ++j) {
        A u, v;
        elem(i + j, u, v);
        f1[j] += u;
        f2[j] += v;
      }
    for (int j = 0; j < L; ++j) {
      d1[j] += f1[j];
      d2[j] += f2[j];
    }
  }
  double s1 = 0.0, s2 = 0.0;
  for (int j = 0; j < L; ++j) {
    s1 += d1[j];
    s2 += d2[j];
  }
  for (; i < len; ++i) {
    A u, v;
    elem(i, u, v);
    s1 += u;
    s2 += v;
  }
  out1 = s1;
  out2 = s2;
}

// NCHW sums: plane(n, c, out1, out2) per plane in parallel, then per channel over n in order.
template <typename F>
void planes_sums(int64_t N, int64_t C, double* S, const F& plane) {
  std::vector<double> part(static_cast<size_t>(N * C * 2), 0.0);
  parallel_tasks<NoScratch>(N * C, [&](int64_t p, NoScratch&) { plane(p / C, p % C, part[2 * p], part[2 * p + 1]); });
  for (int64_t c = 0; c < 2 * C; ++c) S[c] = 0.0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      S[c] += part[2 * (n * C + c)];
      S[C + c] += part[2 * (n * C + c) + 1];
    }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void forward_kernel(const T* y, T* out, const double* w, const double* b, double* mean, double* invstd, int64_t N,
                    int64_t C, int64_t HW, bool cl, double slope_d, double eps) {
  const A slope = static_cast<A>(slope_d);
  const int64_t R = N * HW;
  const double n = static_cast<double>(R);
  std::vector<A> shift(C), coef(2 * C);
  std::vector<double> S(2 * C);
  // Shift: the channel's first value, a cheap estimate of its mean.
  for (int64_t c = 0; c < C; ++c) shift[c] = lrelu(ld(y, cl ? c : c * HW), slope);
  const A* __restrict sh = shift.data();
  if (cl) {
    rows_sums<A>(R, C, S.data(), [&](int64_t r, A* __restrict f1, A* __restrict f2) {
      const T* __restrict yr = y + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const A d = lrelu(ld(yr, c), slope) - sh[c];
        f1[c] += d;
        f2[c] += d * d;
      }
    });
  } else {
    planes_sums(N, C, S.data(), [&](int64_t i, int64_t c, double& o1, double& o2) {
      const T* __restrict yp = y + (i * C + c) * HW;
      const A s = sh[c];
      plane_sums<A>(HW, [&](int64_t k, A& u, A& v) {
        const A d = lrelu(ld(yp, k), slope) - s;
        u = d;
        v = d * d;
      }, o1, o2);
    });
  }
  // mean = shift + Σd/n, var = Σd²/n − (Σd/n)²; out = (a − mean)·scale + bias.
  for (int64_t c = 0; c < C; ++c) {
    const double md = S[c] / n;
    const double var = std::max(S[C + c] / n - md * md, 0.0);
    mean[c] = static_cast<double>(sh[c]) + md;
    invstd[c] = 1.0 / std::sqrt(var + eps);
    coef[c] = static_cast<A>(mean[c]);
    coef[C + c] = static_cast<A>(invstd[c] * w[c]);
  }
  const A* __restrict mu = coef.data();
  const A* __restrict sc = coef.data() + C;
  if (cl) {
    rows_map(R, C, [&](int64_t r) {
      const T* __restrict yr = y + r * C;
      T* __restrict orow = out + r * C;
      for (int64_t c = 0; c < C; ++c) st(orow, c, (lrelu(ld(yr, c), slope) - mu[c]) * sc[c] + static_cast<A>(b[c]));
    });
  } else {
    std::vector<A> bias(b, b + C);
    parallel_tasks<NoScratch>(N * C, [&](int64_t p, NoScratch&) {
      const int64_t c = p % C;
      const A m = mu[c], s = sc[c], bb = bias[c];
      const T* __restrict yp = y + p * HW;
      T* __restrict op = out + p * HW;
      for (int64_t k = 0; k < HW; ++k) st(op, k, (lrelu(ld(yp, k), slope) - m) * s + bb);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void backward_kernel(const T* g, const T* y, T* gy, const double* w, const double* mean, const double* invstd,
                     double* gw, double* gb, int64_t N, int64_t C, int64_t HW, bool cl, double slope_d) {
  const A slope = static_cast<A>(slope_d);
  const int64_t R = N * HW;
  const double n = static_cast<double>(R);
  std::vector<A> mu(mean, mean + C);
  std::vector<double> S(2 * C);
  const A* __restrict m = mu.data();
  // Σg and Σg·(a − mean): x̂ = (a − mean)·invstd is applied afterwards.
  if (cl) {
    rows_sums<A>(R, C, S.data(), [&](int64_t r, A* __restrict f1, A* __restrict f2) {
      const T* __restrict gr = g + r * C;
      const T* __restrict yr = y + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const A gv = ld(gr, c);
        f1[c] += gv;
        f2[c] += gv * (lrelu(ld(yr, c), slope) - m[c]);
      }
    });
  } else {
    planes_sums(N, C, S.data(), [&](int64_t i, int64_t c, double& o1, double& o2) {
      const T* __restrict gp = g + (i * C + c) * HW;
      const T* __restrict yp = y + (i * C + c) * HW;
      const A mc = m[c];
      plane_sums<A>(HW, [&](int64_t k, A& u, A& v) {
        const A gv = ld(gp, k);
        u = gv;
        v = gv * (lrelu(ld(yp, k), slope) - mc);
      }, o1, o2);
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    if (gb) gb[c] = S[c];
    if (gw) gw[c] = S[C + c] * invstd[c];
  }
  if (!gy) return;
  // grad_y = k·g − k·mean(g) − k·invstd²·mean(g·(a − mean))·(a − mean), times the LReLU slope,
  // with k = weight·invstd.
  std::vector<A> coef(3 * C);
  for (int64_t c = 0; c < C; ++c) {
    const double k = w[c] * invstd[c];
    coef[c] = static_cast<A>(k);
    coef[C + c] = static_cast<A>(-k * S[c] / n);
    coef[2 * C + c] = static_cast<A>(-k * invstd[c] * invstd[c] * S[C + c] / n);
  }
  const A* __restrict kk = coef.data();
  const A* __restrict k0 = coef.data() + C;
  const A* __restrict kq = coef.data() + 2 * C;
  if (cl) {
    rows_map(R, C, [&](int64_t r) {
      const T* __restrict gr = g + r * C;
      const T* __restrict yr = y + r * C;
      T* __restrict o = gy + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const A yv = ld(yr, c);
        const A v = kk[c] * ld(gr, c) + k0[c] + kq[c] * (lrelu(yv, slope) - m[c]);
        st(o, c, yv > A(0) ? v : v * slope);
      }
    });
  } else {
    parallel_tasks<NoScratch>(N * C, [&](int64_t p, NoScratch&) {
      const int64_t c = p % C;
      const A a1 = kk[c], a0 = k0[c], aq = kq[c], mc = m[c];
      const T* __restrict gp = g + p * HW;
      const T* __restrict yp = y + p * HW;
      T* __restrict o = gy + p * HW;
      for (int64_t k = 0; k < HW; ++k) {
        const A yv = ld(yp, k);
        const A v = a1 * ld(gp, k) + a0 + aq * (lrelu(yv, slope) - mc);
        st(o, k, yv > A(0) ? v : v * slope);
      }
    });
  }
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
                           b.data(), mean.data(), invstd.data(), N, C, HW, cl, slope, eps);
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
                            N, C, HW, cl, slope);
    });
  }
  return {gy, gw.to(sopt.dtype()), gb.to(sopt.dtype())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lavae_fast, CPU, m) {
  m.impl("lrelu_batch_norm", &lrelu_batch_norm_cpu);
  m.impl("lrelu_batch_norm_backward", &lrelu_batch_norm_backward_cpu);
}

}  // namespace lavae_fast

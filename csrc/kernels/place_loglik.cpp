// Sprite placement fused with the Bernoulli log-likelihood (SPEC §1, §9.1), forward and backward.
//
// Forward: Σ = Σ_{i<n} sprite_i ∗ loc_i (centre pixel (S//2, S//2) on the location, off-canvas
// parts dropped), λ = ε + (1−2ε)·min(Σ, 1), loglik = Σ_{c,d} x log λ + (1−x) log(1−λ). With
// `index` the sprites are added at their pixel (no per-object canvas, no read of `loc`); without
// it the dense maps are convolved with the sprites (correlate.h).
// Backward: dL/dΣ = g·(x−λ)/(λ(1−λ))·(1−2ε)·[Σ ≤ 1] (+ grad_canvas), written once into a
// zero-padded plane Gp; grad_loc (always dense) and dense grad_sprites are correlations of Gp,
// index-mode grad_sprites is the S×S window of Gp at each index.
#include <vector>

#include "correlate.h"

namespace lavae_fast {
namespace LAVAE_ISA {
namespace place {
namespace {

constexpr const char* kFwd = "place_loglik";
constexpr const char* kBwd = "place_loglik_backward";

struct Dims {
  int64_t B, M, C, S, s, H, W, D, Hp, Wq;
};

// Geometry of the padded planes. Rows: S//2 of zeros above and below. Columns: S//2 of zeros on
// the left, and on the right enough zeros for the tile loads, which run up to NX·VL − 1 columns
// past the last tap (NX·VL ≤ TC = max_tile_cols): the row correlations (grad_loc, dense canvas)
// read up to column round_up(W, TC) + S − 2, the sprite-gradient correlation up to
// W + round_up(S, TC) − 2.
// `extra_rows`: zero rows below the bottom padding, for tiles that read past the last output row
// (the dense forward's row groups, kRowGroupFwd − 1 rows).
template <typename T>
Dims make_dims(const at::Tensor& sprites, int64_t H, int64_t W, bool sprite_corr, int64_t extra_rows = 0) {
  constexpr int64_t TC = max_tile_cols<T>();
  Dims d;
  d.B = sprites.size(0);
  d.M = sprites.size(1);
  d.C = sprites.size(2);
  d.S = sprites.size(3);
  d.s = d.S / 2;
  d.H = H;
  d.W = W;
  d.D = H * W;
  d.Hp = H + 2 * d.s + extra_rows;
  d.Wq = round_up(W, TC) + d.S - 1;
  if (sprite_corr) d.Wq = std::max(d.Wq, W + round_up(d.S, TC) - 1);
  return d;
}

void check_place_inputs(const char* op, const at::Tensor& x, const at::Tensor& sprites, const at::Tensor& loc,
                        double eps) {
  check_cpu(sprites, op, "sprites");
  check_cpu(x, op, "x");
  check_cpu(loc, op, "loc");
  check_dim(sprites, 5, op, "sprites");
  check_float(sprites, op, "sprites");
  check_dim(x, 4, op, "x");
  check_dim(loc, 4, op, "loc");
  check_same_dtype(x, sprites, op, "x", "sprites");
  check_same_dtype(loc, sprites, op, "loc", "sprites");
  const int64_t B = sprites.size(0), M = sprites.size(1), C = sprites.size(2), S = sprites.size(3);
  TORCH_CHECK(sprites.size(4) == S && S % 2 == 1, op, ": sprites must be square with an odd side [B,M,C,S,S], got ",
              sprites.sizes());
  TORCH_CHECK(x.size(0) == B && x.size(1) == C, op, ": x must have shape [B=", B, ", C=", C, ", H, W], got ",
              x.sizes());
  const int64_t H = x.size(2), W = x.size(3);
  check_shape(loc, {B, M, H, W}, op, "loc");
  TORCH_CHECK(eps >= 0.0 && eps < 0.5, op, ": eps must lie in [0, 0.5), got ", eps);
}

// ---------------------------------------------------------------------------------------------
// Log-likelihood of one image's canvas: Σ x log λ + (1−x) log(1−λ) over C·D values.
// ---------------------------------------------------------------------------------------------
template <typename T>
double image_loglik(const T* canvas, const T* x, int64_t count, T eps) {
  typedef typename Vec<T>::type V;
  const T scale = T(1) - 2 * eps;
  const V one = splat<V>(T(1));
  double total = 0;
  // Vector partial sums over chunks; the chunk sums are added in double so that the error does
  // not grow with the canvas size.
  constexpr int64_t kChunk = 1024;
  for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
    V acc{};
    simd_for<T>(std::min(kChunk, count - c0), [&](int64_t d, int64_t lanes) {
      const V sv = vload_n(canvas + c0 + d, lanes);
      const V xv = vload_n(x + c0 + d, lanes);
      const V lam = eps + scale * (sv > T(1) ? one : sv);  // min(Σ, 1), NaN propagates
      acc += keep_lanes<T>(xv * vlog(lam) + (T(1) - xv) * vlog(T(1) - lam), lanes);
    });
    total += hsum(acc);
  }
  return total;
}

// Index mode: add each present sprite into the canvas at its pixel, clipped to the canvas.
template <typename T>
void scatter_sprites(T* canvas, const T* spr, const int64_t* idx, int64_t nb, const Dims& d) {
  std::fill(canvas, canvas + d.C * d.D, T(0));
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t p = idx[i];
    if (p < 0) continue;  // an absent draw (checked_index allows only −1)
    const int64_t r = p / d.W, q = p % d.W;
    // Sprite pixel (u, v) lands on canvas pixel (r + u − s, q + v − s).
    const int64_t u0 = std::max<int64_t>(0, d.s - r), u1 = std::min(d.S, d.H + d.s - r);
    const int64_t v0 = std::max<int64_t>(0, d.s - q), v1 = std::min(d.S, d.W + d.s - q);
    for (int64_t c = 0; c < d.C; ++c) {
      const T* sp = spr + (i * d.C + c) * d.S * d.S;
      T* cv = canvas + c * d.D;
      for (int64_t u = u0; u < u1; ++u) {
        T* dst = cv + (r + u - d.s) * d.W + (q + v0 - d.s);
        const T* src = sp + u * d.S + v0;
#pragma omp simd
        for (int64_t v = 0; v < v1 - v0; ++v) dst[v] += src[v];
      }
    }
  }
}

// Copy `planes` planes of H×W into zero-padded planes of Hp×Wq (data at row s, column s).
template <typename T>
void pad_planes(T* dst, const T* src, int64_t planes, const Dims& d) {
  std::fill(dst, dst + planes * d.Hp * d.Wq, T(0));
  for (int64_t k = 0; k < planes; ++k)
    for (int64_t y = 0; y < d.H; ++y)
      std::memcpy(dst + (k * d.Hp + y + d.s) * d.Wq + d.s, src + (k * d.H + y) * d.W, d.W * sizeof(T));
}

// Run the row correlation out[o, y, x] = Σ_{a,u,v} in[a, y+u, x+v] · w[(a,u,v)][o] for the rows
// [y0, y1) and every output channel block, with `na` input planes of Hp×Wq and `mo` outputs.
// `w` holds the blocks one after the other, block k ([na·S·S][ob_k]) at offset o0_k·na·S·S.
template <typename T>
void row_correlation(const T* in, int64_t na, const T* w, int64_t mo, T* out, int64_t y0, int64_t y1, const Dims& d) {
  constexpr int N = Vec<T>::N;
  const int64_t obs = block_size(mo);
  for (int64_t o0 = 0; o0 < mo; o0 += obs) {
    const int64_t ob = std::min(obs, mo - o0);
    const int nx = choose_nx<T>(ob, d.W);
    const TileFn fn = tile_fn<T>(static_cast<int>(ob), nx);
    const int64_t xb = nx * N;
    TileArgs t;
    t.NA = na;
    t.sa = d.Hp * d.Wq;
    t.NR = d.S;
    t.sr = d.Wq;
    t.KW = d.S;
    t.w = w + o0 * na * d.S * d.S;
    t.out_stride = d.D;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x0 = 0; x0 < d.W; x0 += xb) {
        t.in = in + y * d.Wq + x0;
        t.out = out + o0 * d.D + y * d.W + x0;
        t.valid = std::min(xb, d.W - x0);
        fn(t);
      }
    }
  }
}

// Rearrange per-image weights [mo][na][S][S] (read through `at(o, a, u, v)`) into the blocked
// layout of row_correlation.
template <typename T, typename F>
void block_weights(T* w, int64_t mo, int64_t na, int64_t S, F at) {
  const int64_t obs = block_size(mo);
  for (int64_t o0 = 0; o0 < mo; o0 += obs) {
    const int64_t ob = std::min(obs, mo - o0);
    T* wb = w + o0 * na * S * S;
    for (int64_t a = 0; a < na; ++a)
      for (int64_t u = 0; u < S; ++u)
        for (int64_t v = 0; v < S; ++v)
          for (int64_t o = 0; o < ob; ++o) wb[((a * S + u) * S + v) * ob + o] = at(o0 + o, a, u, v);
  }
}

// Work split. With at least kImagesPerThread images per thread, each task is one whole image
// (prepare its padded planes and weights in thread-local buffers, then every row): one parallel
// region per op call, no intermediate buffers for the batch. With fewer images (say B = 1 at
// inference), the rows of an image are split into tasks of kRowsPerTask rows, after a first
// region that prepares the buffers of every image.
constexpr int64_t kImagesPerThread = 2;
constexpr int64_t kRowsPerTask = 8;

inline bool whole_image_tasks(int64_t B) { return B >= kImagesPerThread * at::get_num_threads(); }

template <typename T>
struct ImageScratch {
  std::vector<T> planes, w, wl;
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Dense forward, per image: canvas[c] = Σ_i Σ_{u',v'} Lp[i, y+u', x+v'] · sprite[i, c, S−1−u', S−1−v'],
// a row correlation with the present objects as input planes and the colours as outputs.
//
// With one colour (C = 1) that tile has a single output, so every input vector it loads feeds one
// FMA and the loop is bound by loads (and by loads split across cache lines), at ~half the FMA
// rate. Instead, kRowGroupFwd output rows are computed together: output row y+j reads input rows
// y+r', r' = j+u', so with weights w'[a][r'][v][j] = sprite[a][S−1−(r'−j)][S−1−v] (zero where
// r'−j is outside [0, S)) the same tile computes the group with the rows as its outputs, each
// loaded vector feeding kRowGroupFwd FMAs. The zeros cost (S + kRowGroupFwd − 1)/S more FMAs
// (1.18x at S = 17), far less than the loads saved.
constexpr int64_t kRowGroupFwd = 4;

inline bool row_grouped(const Dims& d) { return d.C == 1; }

inline int64_t dense_weight_size(int64_t nb, const Dims& d) {
  return row_grouped(d) ? nb * (d.S + kRowGroupFwd - 1) * d.S * kRowGroupFwd : nb * d.C * d.S * d.S;
}

template <typename T>
void dense_prepare(T* lp, T* w, const T* sprites_b, const T* loc_b, int64_t nb, const Dims& d) {
  const int64_t SS = d.S * d.S;
  if (row_grouped(d)) {
    const int64_t NR = d.S + kRowGroupFwd - 1;
    for (int64_t a = 0; a < nb; ++a)
      for (int64_t r = 0; r < NR; ++r)
        for (int64_t v = 0; v < d.S; ++v)
          for (int64_t j = 0; j < kRowGroupFwd; ++j) {
            const int64_t u = r - j;
            w[((a * NR + r) * d.S + v) * kRowGroupFwd + j] =
                (u >= 0 && u < d.S) ? sprites_b[a * SS + (d.S - 1 - u) * d.S + (d.S - 1 - v)] : T(0);
          }
  } else {
    block_weights(w, d.C, nb, d.S, [&](int64_t c, int64_t i, int64_t u, int64_t v) {
      return sprites_b[(i * d.C + c) * SS + (d.S - 1 - u) * d.S + (d.S - 1 - v)];
    });
  }
  pad_planes(lp, loc_b, nb, d);
}

// Rows [y0, y1) of a one-colour canvas, kRowGroupFwd rows per tile (see above); a group that runs
// past y1 is computed into a scratch block and only its rows below y1 are kept (the planes carry
// kRowGroupFwd − 1 extra zero rows, so its reads stay inside them).
template <typename T>
void dense_rows_grouped(T* canvas_b, const T* lp, const T* w, int64_t nb, int64_t y0, int64_t y1, const Dims& d) {
  constexpr int N = Vec<T>::N;
  constexpr int64_t G = kRowGroupFwd;
  const int nx = choose_nx<T>(G, d.W);
  const TileFn fn = tile_fn<T>(static_cast<int>(G), nx);
  const int64_t xb = nx * N;
  TileArgs t;
  t.NA = nb;
  t.sa = d.Hp * d.Wq;
  t.NR = d.S + G - 1;
  t.sr = d.Wq;
  t.KW = d.S;
  t.w = w;
  alignas(64) T tmp[G * max_tile_cols<T>()];
  for (int64_t y = y0; y < y1; y += G) {
    const bool whole = y + G <= y1;
    for (int64_t x0 = 0; x0 < d.W; x0 += xb) {
      t.in = lp + y * d.Wq + x0;
      t.valid = std::min(xb, d.W - x0);
      if (whole) {
        t.out = canvas_b + y * d.W + x0;
        t.out_stride = d.W;
        fn(t);
      } else {
        t.out = tmp;
        t.out_stride = xb;
        fn(t);
        for (int64_t j = 0; j < y1 - y; ++j)
          std::copy(tmp + j * xb, tmp + j * xb + t.valid, canvas_b + (y + j) * d.W + x0);
      }
    }
  }
}

template <typename T>
void dense_rows(T* canvas_b, const T* lp, const T* w, int64_t nb, int64_t y0, int64_t y1, const Dims& d) {
  if (nb == 0) {
    for (int64_t c = 0; c < d.C; ++c) std::fill(canvas_b + c * d.D + y0 * d.W, canvas_b + c * d.D + y1 * d.W, T(0));
    return;
  }
  if (row_grouped(d)) return dense_rows_grouped(canvas_b, lp, w, nb, y0, y1, d);
  row_correlation(lp, nb, w, d.C, canvas_b, y0, y1, d);
}

template <typename T>
void place_forward(const at::Tensor& x, const at::Tensor& sprites, const at::Tensor& loc, const int64_t* pn,
                   const int64_t* pidx, double eps_d, at::Tensor& loglik, at::Tensor& canvas) {
  const bool grouped = sprites.size(2) == 1;  // row_grouped(d), known before d is made
  const Dims d = make_dims<T>(sprites, x.size(2), x.size(3), false, grouped ? kRowGroupFwd - 1 : 0);
  const T* px = x.const_data_ptr<T>();
  const T* ps = sprites.const_data_ptr<T>();
  T* pc = canvas.mutable_data_ptr<T>();
  T* pl = loglik.mutable_data_ptr<T>();
  const T eps = static_cast<T>(eps_d);
  const int64_t CD = d.C * d.D, MCSS = d.M * d.C * d.S * d.S, plane = d.Hp * d.Wq;
  if (pidx != nullptr) {
    parallel_tasks<NoScratch>(d.B, [&](int64_t b, NoScratch&) {
      scatter_sprites(pc + b * CD, ps + b * MCSS, pidx + b * d.M, pn[b], d);
      pl[b] = static_cast<T>(image_loglik(pc + b * CD, px + b * CD, CD, eps));
    });
    return;
  }
  const T* pL = loc.const_data_ptr<T>();
  if (whole_image_tasks(d.B)) {
    parallel_tasks<ImageScratch<T>>(d.B, [&](int64_t b, ImageScratch<T>& sc) {
      sc.planes.resize(pn[b] * plane);
      sc.w.resize(dense_weight_size(pn[b], d));
      dense_prepare(sc.planes.data(), sc.w.data(), ps + b * MCSS, pL + b * d.M * d.D, pn[b], d);
      dense_rows(pc + b * CD, sc.planes.data(), sc.w.data(), pn[b], 0, d.H, d);
      pl[b] = static_cast<T>(image_loglik(pc + b * CD, px + b * CD, CD, eps));
    });
    return;
  }
  std::vector<int64_t> woff(d.B + 1, 0), loff(d.B + 1, 0);
  for (int64_t b = 0; b < d.B; ++b) {
    woff[b + 1] = woff[b] + dense_weight_size(pn[b], d);
    loff[b + 1] = loff[b] + pn[b] * plane;
  }
  std::vector<T> wbuf(woff[d.B]), lbuf(loff[d.B]);
  parallel_tasks<NoScratch>(d.B, [&](int64_t b, NoScratch&) {
    dense_prepare(lbuf.data() + loff[b], wbuf.data() + woff[b], ps + b * MCSS, pL + b * d.M * d.D, pn[b], d);
  });
  const int64_t ytasks = ceil_div(d.H, kRowsPerTask);
  parallel_tasks<NoScratch>(d.B * ytasks, [&](int64_t t, NoScratch&) {
    const int64_t b = t / ytasks, y0 = (t % ytasks) * kRowsPerTask, y1 = std::min(d.H, y0 + kRowsPerTask);
    dense_rows(pc + b * CD, lbuf.data() + loff[b], wbuf.data() + woff[b], pn[b], y0, y1, d);
  });
  parallel_tasks<NoScratch>(d.B, [&](int64_t b, NoScratch&) {
    pl[b] = static_cast<T>(image_loglik(pc + b * CD, px + b * CD, CD, eps));
  });
}

std::tuple<at::Tensor, at::Tensor> place_loglik_cpu(const at::Tensor& x_, const at::Tensor& sprites_,
                                                    const at::Tensor& loc_, const at::Tensor& n_,
                                                    const std::optional<at::Tensor>& index_, double eps) {
  check_place_inputs(kFwd, x_, sprites_, loc_, eps);
  const at::Tensor sprites = sprites_.contiguous(), x = x_.contiguous();
  const int64_t B = sprites.size(0), M = sprites.size(1), C = sprites.size(2);
  const int64_t H = x.size(2), W = x.size(3);
  const at::Tensor n = checked_counts(n_, B, M, kFwd);
  at::Tensor index;
  if (index_.has_value()) index = checked_index(*index_, n, B, M, H * W, kFwd);
  // The dense path reads loc; the index path only promises its shape.
  const at::Tensor loc = index_.has_value() ? loc_ : loc_.contiguous();
  at::Tensor loglik = at::empty({B}, sprites.options());
  at::Tensor canvas = at::empty({B, C, H, W}, sprites.options());
  AT_DISPATCH_FLOATING_TYPES(sprites.scalar_type(), kFwd, [&] {
    place_forward<scalar_t>(x, sprites, loc, n.const_data_ptr<int64_t>(),
                            index.defined() ? index.const_data_ptr<int64_t>() : nullptr, eps, loglik, canvas);
  });
  return {loglik, canvas};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// dL/dΣ of one image into its zero-padded planes Gp [C][Hp][Wq].
template <typename T>
void write_grad_canvas(T* gp, const T* canvas, const T* x, const T* gcanvas, T gl, T eps, const Dims& d) {
  std::fill(gp, gp + d.C * d.Hp * d.Wq, T(0));
  const T scale = T(1) - 2 * eps;
  const T gscale = gl * scale;
  for (int64_t c = 0; c < d.C; ++c)
    for (int64_t y = 0; y < d.H; ++y) {
      const int64_t o = (c * d.H + y) * d.W;
      const T* cv = canvas + o;
      const T* xv = x + o;
      T* dst = gp + (c * d.Hp + y + d.s) * d.Wq + d.s;
#pragma omp simd
      for (int64_t k = 0; k < d.W; ++k) {
        const T sv = cv[k];
        const T lam = eps + scale * (sv > T(1) ? T(1) : sv);
        // x/λ − (1−x)/(1−λ) = (x − λ)/(λ(1−λ)): one division. [Σ ≤ 1] is inclusive, as the
        // reference's clamp(max=1) passes the gradient at Σ = 1.
        const T g = gscale * (xv[k] - lam) / (lam * (T(1) - lam));
        dst[k] = sv <= T(1) ? g : T(0);
      }
      if (gcanvas != nullptr) {
        const T* gc = gcanvas + o;
#pragma omp simd
        for (int64_t k = 0; k < d.W; ++k) dst[k] += gc[k];
      }
    }
}

// Backward, per image: Gp (padded dL/dΣ), the sprite weights of grad_loc, and in dense mode the
// loc rows of the present objects as weights [(y, x)][o] of the sprite-gradient correlation.
template <typename T>
struct BackwardImage {
  const Dims& d;
  const T *pgl, *pgc, *px, *ps, *pcv, *pL;
  const int64_t *pn, *pidx;
  T eps;
  bool need_sprites, need_loc, dense_sprites;
  T *pgs, *pgo;

  int64_t w_size(int64_t b) const { return need_loc ? pn[b] * d.C * d.S * d.S : 0; }
  int64_t wl_size(int64_t b) const { return dense_sprites ? pn[b] * d.D : 0; }

  void prepare(int64_t b, T* gp, T* w, T* wl) const {
    const int64_t CD = d.C * d.D, SS = d.S * d.S;
    write_grad_canvas(gp, pcv + b * CD, px + b * CD, pgc ? pgc + b * CD : nullptr, pgl[b], eps, d);
    const T* sb = ps + b * d.M * d.C * SS;
    if (need_loc)
      block_weights(w, pn[b], d.C, d.S, [&](int64_t i, int64_t c, int64_t u, int64_t v) {
        return sb[(i * d.C + c) * SS + u * d.S + v];
      });
    if (dense_sprites) {
      const T* lb = pL + b * d.M * d.D;
      const int64_t obs = block_size(pn[b]);
      for (int64_t o0 = 0; o0 < pn[b]; o0 += obs) {
        const int64_t ob = std::min(obs, pn[b] - o0);
        T* blk = wl + o0 * d.D;
        for (int64_t p = 0; p < d.D; ++p)
          for (int64_t o = 0; o < ob; ++o) blk[p * ob + o] = lb[(o0 + o) * d.D + p];
      }
    }
  }

  // grad_loc[b,i,y,x] = Σ_{c,u,v} Gp[c, y+u, x+v] · sprite[i,c,u,v] for the rows [y0, y1).
  void loc_rows(int64_t b, const T* gp, const T* w, int64_t y0, int64_t y1) const {
    T* ob = pgo + b * d.M * d.D;
    for (int64_t i = pn[b]; i < d.M; ++i) std::fill(ob + i * d.D + y0 * d.W, ob + i * d.D + y1 * d.W, T(0));
    if (pn[b] > 0) row_correlation(gp, d.C, w, pn[b], ob, y0, y1, d);
  }

  // Index mode: the S×S window of Gp whose top-left corner is the location pixel (in padded
  // coordinates the sprite's corner sits exactly there).
  void sprite_windows(int64_t b, const T* gp) const {
    const int64_t CSS = d.C * d.S * d.S;
    T* gb = pgs + b * d.M * CSS;
    std::fill(gb, gb + d.M * CSS, T(0));
    for (int64_t i = 0; i < pn[b]; ++i) {
      const int64_t p = pidx[b * d.M + i];
      if (p < 0) continue;
      const int64_t r = p / d.W, q = p % d.W;
      for (int64_t c = 0; c < d.C; ++c)
        for (int64_t u = 0; u < d.S; ++u)
          std::memcpy(gb + (i * d.C + c) * d.S * d.S + u * d.S, gp + (c * d.Hp + r + u) * d.Wq + q, d.S * sizeof(T));
    }
  }

  // Dense: grad_sprites[i,c,u,:] = Σ_{y,x} Gp[c, u+y, x+v] · loc[i,y,x] for one (c, u): a row
  // correlation with the H rows of Gp as channels, the W pixels of a row as taps and the S
  // columns v as the output row.
  void sprite_row(int64_t b, const T* gp, const T* wl, int64_t c, int64_t u) const {
    constexpr int N = Vec<T>::N;
    const int64_t SS = d.S * d.S, CSS = d.C * SS;
    T* gb = pgs + b * d.M * CSS;
    for (int64_t i = pn[b]; i < d.M; ++i)
      std::fill(gb + (i * d.C + c) * SS + u * d.S, gb + (i * d.C + c) * SS + (u + 1) * d.S, T(0));
    const int64_t m = pn[b];
    const int64_t obs = block_size(m);
    for (int64_t o0 = 0; o0 < m; o0 += obs) {
      const int64_t ob = std::min(obs, m - o0);
      const int nx = choose_nx<T>(ob, d.S);
      const TileFn fn = tile_fn<T>(static_cast<int>(ob), nx);
      const int64_t xb = nx * N;
      TileArgs ta;
      ta.NA = 1;
      ta.sa = 0;
      ta.NR = d.H;
      ta.sr = d.Wq;
      ta.KW = d.W;
      ta.w = wl + o0 * d.D;
      ta.out_stride = CSS;
      for (int64_t v0 = 0; v0 < d.S; v0 += xb) {
        ta.in = gp + (c * d.Hp + u) * d.Wq + v0;
        ta.out = gb + (o0 * d.C + c) * SS + u * d.S + v0;
        ta.valid = std::min(xb, d.S - v0);
        fn(ta);
      }
    }
  }

  void whole(int64_t b, const T* gp, const T* w, const T* wl) const {
    if (need_loc) loc_rows(b, gp, w, 0, d.H);
    if (!need_sprites) return;
    if (!dense_sprites) return sprite_windows(b, gp);
    for (int64_t c = 0; c < d.C; ++c)
      for (int64_t u = 0; u < d.S; ++u) sprite_row(b, gp, wl, c, u);
  }
};

template <typename T>
void place_backward(const at::Tensor& grad_loglik, const at::Tensor& grad_canvas, const at::Tensor& x,
                    const at::Tensor& sprites, const at::Tensor& loc, const int64_t* pn, const int64_t* pidx,
                    const at::Tensor& canvas, double eps_d, bool need_sprites, bool need_loc, at::Tensor& gs,
                    at::Tensor& gloc) {
  const bool dense_sprites = need_sprites && pidx == nullptr;
  const Dims d = make_dims<T>(sprites, x.size(2), x.size(3), dense_sprites);
  const int64_t plane = d.C * d.Hp * d.Wq;
  BackwardImage<T> im{d,
                      grad_loglik.const_data_ptr<T>(),
                      grad_canvas.defined() ? grad_canvas.const_data_ptr<T>() : nullptr,
                      x.const_data_ptr<T>(),
                      sprites.const_data_ptr<T>(),
                      canvas.const_data_ptr<T>(),
                      dense_sprites ? loc.const_data_ptr<T>() : nullptr,
                      pn,
                      pidx,
                      static_cast<T>(eps_d),
                      need_sprites,
                      need_loc,
                      dense_sprites,
                      need_sprites ? gs.mutable_data_ptr<T>() : nullptr,
                      need_loc ? gloc.mutable_data_ptr<T>() : nullptr};
  if (whole_image_tasks(d.B)) {
    parallel_tasks<ImageScratch<T>>(d.B, [&](int64_t b, ImageScratch<T>& sc) {
      sc.planes.resize(plane);
      sc.w.resize(im.w_size(b));
      sc.wl.resize(im.wl_size(b));
      im.prepare(b, sc.planes.data(), sc.w.data(), sc.wl.data());
      im.whole(b, sc.planes.data(), sc.w.data(), sc.wl.data());
    });
    return;
  }
  // Few images: prepare every image first, then split rows (grad_loc) and (c, u) rows
  // (dense grad_sprites) into tasks.
  std::vector<int64_t> woff(d.B + 1, 0), loff(d.B + 1, 0);
  for (int64_t b = 0; b < d.B; ++b) {
    woff[b + 1] = woff[b] + im.w_size(b);
    loff[b + 1] = loff[b] + im.wl_size(b);
  }
  std::vector<T> gbuf(d.B * plane), wbuf(woff[d.B]), lbuf(loff[d.B]);
  parallel_tasks<NoScratch>(d.B, [&](int64_t b, NoScratch&) {
    im.prepare(b, gbuf.data() + b * plane, wbuf.data() + woff[b], lbuf.data() + loff[b]);
  });
  const int64_t ytasks = need_loc ? ceil_div(d.H, kRowsPerTask) : 0;
  const int64_t stasks = !need_sprites ? 0 : dense_sprites ? d.C * d.S : 1;
  parallel_tasks<NoScratch>(d.B * (ytasks + stasks), [&](int64_t t, NoScratch&) {
    const int64_t b = t / (ytasks + stasks), k = t % (ytasks + stasks);
    const T* gp = gbuf.data() + b * plane;
    if (k < ytasks) {
      const int64_t y0 = k * kRowsPerTask;
      im.loc_rows(b, gp, wbuf.data() + woff[b], y0, std::min(d.H, y0 + kRowsPerTask));
    } else if (!dense_sprites) {
      im.sprite_windows(b, gp);
    } else {
      const int64_t cu = k - ytasks;
      im.sprite_row(b, gp, lbuf.data() + loff[b], cu / d.S, cu % d.S);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> place_loglik_backward_cpu(
    const at::Tensor& grad_loglik_, const std::optional<at::Tensor>& grad_canvas_, const at::Tensor& x_,
    const at::Tensor& sprites_, const at::Tensor& loc_, const at::Tensor& n_, const std::optional<at::Tensor>& index_,
    const at::Tensor& canvas_, double eps, bool need_sprites, bool need_loc) {
  check_place_inputs(kBwd, x_, sprites_, loc_, eps);
  const at::Tensor sprites = sprites_.contiguous(), x = x_.contiguous();
  const int64_t B = sprites.size(0), M = sprites.size(1), C = sprites.size(2);
  const int64_t H = x.size(2), W = x.size(3);
  check_cpu(grad_loglik_, kBwd, "grad_loglik");
  check_same_dtype(grad_loglik_, sprites, kBwd, "grad_loglik", "sprites");
  check_shape(grad_loglik_, {B}, kBwd, "grad_loglik");
  check_cpu(canvas_, kBwd, "canvas");
  check_same_dtype(canvas_, sprites, kBwd, "canvas", "sprites");
  check_shape(canvas_, {B, C, H, W}, kBwd, "canvas");
  at::Tensor grad_canvas;
  if (grad_canvas_.has_value()) {
    check_cpu(*grad_canvas_, kBwd, "grad_canvas");
    check_same_dtype(*grad_canvas_, sprites, kBwd, "grad_canvas", "sprites");
    check_shape(*grad_canvas_, {B, C, H, W}, kBwd, "grad_canvas");
    grad_canvas = grad_canvas_->contiguous();
  }
  const at::Tensor n = checked_counts(n_, B, M, kBwd);
  at::Tensor index;
  if (index_.has_value()) index = checked_index(*index_, n, B, M, H * W, kBwd);
  const at::Tensor grad_loglik = grad_loglik_.contiguous(), canvas = canvas_.contiguous();
  const at::Tensor loc = (need_sprites && !index.defined()) ? loc_.contiguous() : loc_;
  at::Tensor gs = need_sprites ? at::empty(sprites.sizes(), sprites.options()) : at::empty({0}, sprites.options());
  at::Tensor gl = need_loc ? at::empty(loc_.sizes(), sprites.options()) : at::empty({0}, sprites.options());
  if (!need_sprites && !need_loc) return {gs, gl};
  AT_DISPATCH_FLOATING_TYPES(sprites.scalar_type(), kBwd, [&] {
    place_backward<scalar_t>(grad_loglik, grad_canvas, x, sprites, loc, n.const_data_ptr<int64_t>(),
                             index.defined() ? index.const_data_ptr<int64_t>() : nullptr, canvas, eps, need_sprites,
                             need_loc, gs, gl);
  });
  return {gs, gl};
}

}  // namespace
}  // namespace place
}  // namespace LAVAE_ISA
}  // namespace lavae_fast

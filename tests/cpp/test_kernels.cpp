// Standalone C++ test of the CPU kernels, built by CMakeLists.txt (optionally with
// -fsanitize=address,undefined). The kernels are called through the dispatcher, as Python calls
// them, and checked against brute-force loops written here from the definitions in SPEC §9 (and,
// for the fused Leaky ReLU + batch norm, lavae_fast/engine/norm.py's formulas), on odd shapes that
// exercise the partial-vector tails, sprites larger than the canvas, more than 12 objects (several
// output blocks), channel counts that are not a multiple of the vector width, both memory layouts
// and every dtype, on every kernel variant this CPU runs.
//
// The op schemas: lavae_fast/op_schemas.inc is their one source. Python defines the ops from it
// (lavae_fast/engine/_schemas.py); this executable has no Python, so it includes the same file and
// defines the ops from it. Before any kernel runs, check_registrations() checks csrc/'s CPU
// registrations against it: every op there has a CPU kernel, and no kernel is registered for an
// op that is not there (a misspelt or stale name in csrc/dispatch.cpp). The dispatcher itself
// checks each kernel's C++ signature against its schema when both are registered, and op<Sig>
// checks the signature this driver calls with. `test_kernels --print-schemas` prints the schemas
// as compiled in, for tests/test_cmake_build.py to compare with the ops Python defined.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "kernel_table.h"  // the kernel variants (csrc/dispatch.cpp): every one this CPU runs is tested

static const char* kSchemas[] = {
#include "op_schemas.inc"
};

TORCH_LIBRARY(lavae_fast, m) {
  for (const char* s : kSchemas) m.def(s);
}

using at::Tensor;
using OptT = std::optional<Tensor>;
using T2 = std::tuple<Tensor, Tensor>;

static int g_failures = 0, g_checks = 0;

#define EXPECT(cond, ...)                                            \
  do {                                                              \
    ++g_checks;                                                     \
    if (!(cond)) {                                                  \
      ++g_failures;                                                 \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                            \
      std::fprintf(stderr, "\n");                                   \
    }                                                               \
  } while (0)

// |got − want| ≤ rtol · max(1, max|want|), compared in double.
static void check_close(const char* what, const Tensor& got, const Tensor& want, double rtol) {
  EXPECT(got.sizes() == want.sizes(), "%s: shape mismatch", what);
  if (got.sizes() != want.sizes() || want.numel() == 0) return;
  const Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const double scale = std::max(1.0, w.abs().max().item<double>());
  const double err = (g - w).abs().max().item<double>();
  EXPECT(err <= rtol * scale, "%s: max error %.3g > %.3g", what, err, rtol * scale);
}

template <typename F>
static void check_throws(const char* what, F f) {
  bool threw = false;
  try {
    f();
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw, "%s: expected a c10::Error", what);
}

template <typename Sig>
static c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// ---------------------------------------------------------------------------------------------
// place_loglik
// ---------------------------------------------------------------------------------------------

struct PlaceCase {
  Tensor x, sprites, loc, n, index;
};

static PlaceCase place_case(int64_t B, int64_t M, int64_t C, int64_t S, int64_t H, int64_t W) {
  const int64_t D = H * W;
  PlaceCase c;
  c.x = (at::rand({B, C, H, W}, at::kDouble) < 0.4).to(at::kDouble);
  c.sprites = at::rand({B, M, C, S, S}, at::kDouble) * 0.6;
  c.n = at::randint(0, M + 1, {B}, at::kLong);
  c.n[0] = M;
  c.index = at::randint(0, D, {B, M}, at::kLong);
  const int64_t corners[4] = {0, W - 1, (H - 1) * W, D - 1};
  for (int64_t i = 0; i < std::min<int64_t>(4, M); ++i) c.index[0][i] = corners[i];
  c.loc = at::zeros({B, M, H, W}, at::kDouble);
  auto n = c.n.accessor<int64_t, 1>();
  auto idx = c.index.accessor<int64_t, 2>();
  auto loc = c.loc.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < M; ++i) {
      if (i < n[b]) loc[b][i][idx[b][i] / W][idx[b][i] % W] = 1;
      else idx[b][i] = b % 2 ? -1 : 1000000;  // absent: never read
    }
  return c;
}

// Σ by definition: sprite pixel (u, v) of object i lands on loc pixel p + (u − s, v − s), times
// the map's value there (a dense map: every pixel is a location).
static Tensor brute_canvas(const PlaceCase& c) {
  const int64_t B = c.sprites.size(0), C = c.sprites.size(2), S = c.sprites.size(3);
  const int64_t H = c.x.size(2), W = c.x.size(3), s = S / 2;
  Tensor canvas = at::zeros({B, C, H, W}, at::kDouble);
  auto cv = canvas.accessor<double, 4>();
  auto sp = c.sprites.accessor<double, 5>();
  auto lo = c.loc.accessor<double, 4>();
  auto n = c.n.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n[b]; ++i)
      for (int64_t py = 0; py < H; ++py)
        for (int64_t px = 0; px < W; ++px) {
          const double l = lo[b][i][py][px];
          if (l == 0) continue;
          for (int64_t ch = 0; ch < C; ++ch)
            for (int64_t u = 0; u < S; ++u)
              for (int64_t v = 0; v < S; ++v) {
                const int64_t y = py + u - s, x = px + v - s;
                if (y >= 0 && y < H && x >= 0 && x < W) cv[b][ch][y][x] += l * sp[b][i][ch][u][v];
              }
        }
  return canvas;
}

static Tensor brute_loglik(const Tensor& x, const Tensor& canvas, double eps) {
  const Tensor lam = eps + (1 - 2 * eps) * canvas.clamp_max(1);
  return (x * lam.log() + (1 - x) * (1 - lam).log()).flatten(1).sum(1);
}

// dL/dΣ, then grad_loc[i,p] = Σ_{c,u,v} G[c, p + (u,v) − s]·sprite[i,c,u,v] and
// grad_sprites[i,c,u,v] = Σ_p loc[i,p]·G[c, p + (u,v) − s], for i < n.
static T2 brute_backward(const PlaceCase& c, const Tensor& canvas, const Tensor& gl, double eps) {
  const int64_t B = c.sprites.size(0), C = c.sprites.size(2), S = c.sprites.size(3);
  const int64_t H = c.x.size(2), W = c.x.size(3), s = S / 2;
  const Tensor lam = eps + (1 - 2 * eps) * canvas.clamp_max(1);
  const Tensor G = (c.x / lam - (1 - c.x) / (1 - lam)) * (1 - 2 * eps) * (canvas <= 1).to(at::kDouble) *
                   gl.view({B, 1, 1, 1});
  Tensor gs = at::zeros_like(c.sprites), gloc = at::zeros_like(c.loc);
  auto g = G.accessor<double, 4>();
  auto sp = c.sprites.accessor<double, 5>();
  auto lo = c.loc.accessor<double, 4>();
  auto n = c.n.accessor<int64_t, 1>();
  auto ags = gs.accessor<double, 5>();
  auto agl = gloc.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n[b]; ++i)
      for (int64_t py = 0; py < H; ++py)
        for (int64_t px = 0; px < W; ++px)
          for (int64_t ch = 0; ch < C; ++ch)
            for (int64_t u = 0; u < S; ++u)
              for (int64_t v = 0; v < S; ++v) {
                const int64_t y = py + u - s, x = px + v - s;
                if (y < 0 || y >= H || x < 0 || x >= W) continue;
                agl[b][i][py][px] += g[b][ch][y][x] * sp[b][i][ch][u][v];
                ags[b][i][ch][u][v] += lo[b][i][py][px] * g[b][ch][y][x];
              }
  return {gs, gloc};
}

static void test_place(int64_t B, int64_t M, int64_t C, int64_t S, int64_t H, int64_t W) {
  using FwdSig = T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&, double);
  using BwdSig = T2(const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    const OptT&, const Tensor&, double, bool, bool);
  auto fwd = op<FwdSig>("lavae_fast::place_loglik");
  auto bwd = op<BwdSig>("lavae_fast::place_loglik_backward");
  const double eps = 1e-4;
  PlaceCase c = place_case(B, M, C, S, H, W);
  const Tensor canvas = brute_canvas(c);
  const Tensor ll = brute_loglik(c.x, canvas, eps);
  const Tensor gl = at::randn({B}, at::kDouble);
  auto [gs_want, gloc_want] = brute_backward(c, canvas, gl, eps);
  // A soft map too: the dense path must convolve real values, not only one-hot ones.
  PlaceCase soft = c;
  soft.loc = at::rand_like(c.loc) * 0.05;
  const Tensor soft_canvas = brute_canvas(soft);
  auto [soft_gs, soft_gloc] = brute_backward(soft, soft_canvas, gl, eps);

  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    const double rtol = dt == at::kDouble ? 1e-10 : 2e-4;
    const Tensor x = c.x.to(dt), sprites = c.sprites.to(dt), loc = c.loc.to(dt), g = gl.to(dt);
    for (bool with_index : {false, true}) {
      const OptT index = with_index ? OptT(c.index) : OptT();
      auto [l, cv] = fwd.call(x, sprites, loc, c.n, index, eps);
      check_close("place canvas", cv, canvas, rtol);
      check_close("place loglik", l, ll, rtol * 10);
      auto [gs, gloc] = bwd.call(g, OptT(), x, sprites, loc, c.n, index, cv, eps, true, true);
      check_close("place grad_sprites", gs, gs_want, rtol);
      check_close("place grad_loc", gloc, gloc_want, rtol);
    }
    const Tensor sloc = soft.loc.to(dt);
    auto [l, cv] = fwd.call(x, sprites, sloc, c.n, OptT(), eps);
    check_close("place soft canvas", cv, soft_canvas, rtol);
    auto [gs, gloc] = bwd.call(g, OptT(), x, sprites, sloc, c.n, OptT(), cv, eps, true, true);
    check_close("place soft grad_sprites", gs, soft_gs, rtol);
    check_close("place soft grad_loc", gloc, soft_gloc, rtol);
  }
  Tensor bad = c.index.clone();
  bad[0][0] = H * W;
  check_throws("place index out of range", [&] { fwd.call(c.x, c.sprites, c.loc, c.n, OptT(bad), eps); });
  check_throws("place n out of range", [&] { fwd.call(c.x, c.sprites, c.loc, c.n + M + 1, OptT(), eps); });
  check_throws("place loc shape", [&] { fwd.call(c.x, c.sprites, c.loc.narrow(3, 0, W - 1 > 0 ? W - 1 : 0), c.n, OptT(), eps); });
}

// ---------------------------------------------------------------------------------------------
// gumbel_topk_relaxed
// ---------------------------------------------------------------------------------------------

// The schemas' trailing `int window=1, int[]? canvas=None` (q's exclusion window, SPEC §2) and the
// backward's `Tensor? gumbel=None` (the forward's noise, from which window 1 recomputes the relaxed
// rows): a C++ caller passes them explicitly.
using GumbelFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, int64_t, const Tensor&,
                                                        int64_t, at::OptionalIntArrayRef);
using GumbelBwdSig = Tensor(const OptT&, const OptT&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                            int64_t, at::OptionalIntArrayRef, const OptT&);

static void test_gumbel(int64_t B, int64_t D, int64_t M, double tau) {
  auto fwd_op = op<GumbelFwdSig>("lavae_fast::gumbel_topk_relaxed");
  auto bwd_op = op<GumbelBwdSig>("lavae_fast::gumbel_topk_relaxed_backward");
  // Window 1 (the paper's op), without a canvas.
  auto fwd = [&](const Tensor& l, const Tensor& n, double t, int64_t m, const Tensor& g) {
    return fwd_op.call(l, n, t, m, g, 1, std::nullopt);
  };
  auto bwd = [&](const OptT& gr, const OptT& gq, const Tensor& l, const Tensor& idx, const Tensor& r, const Tensor& n,
                 double t, const OptT& g = OptT()) { return bwd_op.call(gr, gq, l, idx, r, n, t, 1, std::nullopt, g); };
  const Tensor logits = at::randn({B, D}, at::kDouble) * 3;
  const Tensor gumbel = -(-(at::rand({B, D}, at::kDouble).clamp(1e-12, 1 - 1e-12)).log()).log();
  Tensor n = at::randint(0, M + 1, {B}, at::kLong);
  n[0] = M;
  const Tensor gr = at::randn({B, M, D}, at::kDouble), gq = at::randn({B}, at::kDouble);
  // Brute force, step by step: the drawn pixels, softmax over the rest, and the gradient formula
  // Σ_i (1/τ) r_i ⊙ (g_i − ⟨g_i, r_i⟩) + g_lq Σ_i (onehot(p_i) − b^(i)).
  Tensor relaxed = at::zeros({B, M, D}, at::kDouble), log_q = at::zeros({B}, at::kDouble);
  Tensor index = at::full({B, M}, -1, at::kLong), grad = at::zeros({B, D}, at::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    const Tensor y = logits[b] + gumbel[b];
    const Tensor order = std::get<1>(y.sort(0, /*descending=*/true));
    Tensor allowed = at::ones({D}, at::kBool);
    const int64_t k = std::min<int64_t>(n[b].item<int64_t>(), D);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t p = order[i].item<int64_t>();
      const Tensor r = at::softmax(at::where(allowed, y / tau, -INFINITY), 0);
      const Tensor bi = at::softmax(at::where(allowed, logits[b], -INFINITY), 0);
      relaxed[b][i] = r;
      index[b][i] = p;
      log_q[b] += bi[p].log();
      grad[b] += r * (gr[b][i] - (gr[b][i] * r).sum()) / tau;
      Tensor hit = at::zeros({D}, at::kDouble);
      hit[p] = 1;
      grad[b] += gq[b] * (hit - bi);
      allowed[p] = false;
    }
  }
  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    const double rtol = dt == at::kDouble ? 1e-10 : 1e-4;
    auto [r, lq, idx] = fwd(logits.to(dt), n, tau, M, gumbel.to(dt));
    EXPECT(at::equal(idx, index), "gumbel index (D=%lld, M=%lld)", (long long)D, (long long)M);
    check_close("gumbel relaxed", r, relaxed, rtol);
    check_close("gumbel log_q", lq, log_q, rtol);
    const Tensor g = bwd(OptT(gr.to(dt)), OptT(gq.to(dt)), logits.to(dt), idx, r, n, tau);
    check_close("gumbel grad", g, grad, rtol * 10);
    // Given the noise, the relaxed rows are recomputed rather than read: the same gradient, also
    // when the relaxed tensor passed holds something else.
    const Tensor gn = bwd(OptT(gr.to(dt)), OptT(gq.to(dt)), logits.to(dt), idx, at::zeros_like(r), n, tau,
                          OptT(gumbel.to(dt)));
    check_close("gumbel grad (recomputed rows)", gn, grad, rtol * 10);
  }
  check_throws("gumbel tau", [&] { fwd(logits, n, 0.0, M, gumbel); });
  check_throws("gumbel n", [&] { fwd(logits, n + M + 1, tau, M, gumbel); });
}

// With an exclusion window w > 1 on an H×W canvas (SPEC §2, §9.2): step i's candidates are the
// pixels outside the w×w neighbourhoods (clipped to the canvas) of the earlier draws; draw i is the
// largest y = logits + g among them (the lowest index on ties), relaxed[b,i] the softmax of y/τ over
// them, log_q the sum of log b^(i)[p_i] with b^(i) the softmax of the logits over them.
static void test_gumbel_window(int64_t B, int64_t H, int64_t W, int64_t M, int64_t window, double tau) {
  auto fwd = op<GumbelFwdSig>("lavae_fast::gumbel_topk_relaxed");
  auto bwd = op<GumbelBwdSig>("lavae_fast::gumbel_topk_relaxed_backward");
  const int64_t D = H * W, h = window / 2;
  const std::vector<int64_t> canvas{H, W};
  Tensor logits = at::randn({B, D}, at::kDouble) * 3;
  logits[0][0] = 40.0;           // image 0 draws the top-left corner first,
  logits[0][D - 1] = 35.0;       // then the bottom-right one,
  logits[0][W / 2] = 30.0;       // then the middle of the top border (unless a window covers it)
  if (B > 1) logits[1][(H / 2) * W] = 40.0;  // image 1: the middle of the left border
  const Tensor gumbel = -(-(at::rand({B, D}, at::kDouble).clamp(1e-12, 1 - 1e-12)).log()).log();
  Tensor n = at::randint(0, M + 1, {B}, at::kLong);
  n[0] = M;
  if (B > 2) n[B - 1] = 0;
  const Tensor gr = at::randn({B, M, D}, at::kDouble), gq = at::randn({B}, at::kDouble);
  Tensor relaxed = at::zeros({B, M, D}, at::kDouble), log_q = at::zeros({B}, at::kDouble);
  Tensor index = at::full({B, M}, -1, at::kLong), grad = at::zeros({B, D}, at::kDouble);
  Tensor excluded = at::zeros({B, M, D}, at::kBool);  // inside an earlier draw's window, present rows
  for (int64_t b = 0; b < B; ++b) {
    const Tensor y = (logits[b] + gumbel[b]).contiguous();
    const auto ya = y.accessor<double, 1>();
    std::vector<bool> allowed(D, true);
    const int64_t k = n[b].item<int64_t>();
    for (int64_t i = 0; i < k; ++i) {
      int64_t p = -1;
      for (int64_t d = 0; d < D; ++d)
        if (allowed[d] && (p < 0 || ya[d] > ya[p])) p = d;  // strictly larger: ties keep the lower index
      Tensor mask = at::zeros({D}, at::kBool);
      for (int64_t d = 0; d < D; ++d) mask[d] = static_cast<bool>(allowed[d]);
      excluded[b][i] = mask.logical_not();
      const Tensor r = at::softmax(at::where(mask, y / tau, -INFINITY), 0);
      const Tensor bi = at::softmax(at::where(mask, logits[b], -INFINITY), 0);
      relaxed[b][i] = r;
      index[b][i] = p;
      log_q[b] += bi[p].log();
      grad[b] += r * (gr[b][i] - (gr[b][i] * r).sum()) / tau;
      Tensor hit = at::zeros({D}, at::kDouble);
      hit[p] = 1;
      grad[b] += gq[b] * (hit - bi);
      const int64_t pr = p / W, pc = p % W;
      for (int64_t rr = std::max<int64_t>(pr - h, 0); rr <= std::min<int64_t>(pr + h, H - 1); ++rr)
        for (int64_t cc = std::max<int64_t>(pc - h, 0); cc <= std::min<int64_t>(pc + h, W - 1); ++cc)
          allowed[rr * W + cc] = false;
    }
  }
  EXPECT(index[0][0].item<int64_t>() == 0, "gumbel window: the corner is drawn first");
  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    const double rtol = dt == at::kDouble ? 1e-10 : 1e-4;
    auto [r, lq, idx] = fwd.call(logits.to(dt), n, tau, M, gumbel.to(dt), window, canvas);
    EXPECT(at::equal(idx, index), "gumbel window index (%lldx%lld, M=%lld, w=%lld)", (long long)H, (long long)W,
           (long long)M, (long long)window);
    check_close("gumbel window relaxed", r, relaxed, rtol);
    // Exactly zero inside the earlier draws' windows, not merely small; positive where the value
    // does not underflow.
    EXPECT(!(r.masked_select(excluded) != 0).any().item<bool>(), "gumbel window: mass inside a window (w=%lld)",
           (long long)window);
    EXPECT(!((r == 0) & (relaxed > 1e-30)).any().item<bool>(), "gumbel window: a candidate without mass (w=%lld)",
           (long long)window);
    check_close("gumbel window log_q", lq, log_q, rtol);
    const Tensor g = bwd.call(OptT(gr.to(dt)), OptT(gq.to(dt)), logits.to(dt), idx, r, n, tau, window, canvas, OptT());
    check_close("gumbel window grad", g, grad, rtol * 10);
    // A window > 1 reads relaxed and ignores the noise.
    const Tensor gw = bwd.call(OptT(gr.to(dt)), OptT(gq.to(dt)), logits.to(dt), idx, r, n, tau, window, canvas,
                               OptT(gumbel.to(dt)));
    check_close("gumbel window grad (noise given)", gw, grad, rtol * 10);
    const Tensor gl = bwd.call(OptT(), OptT(gq.to(dt)), logits.to(dt), idx, r, n, tau, window, canvas, OptT());
    Tensor grad_lq = at::zeros({B, D}, at::kDouble);  // the log_q part alone
    for (int64_t b = 0; b < B; ++b) {
      std::vector<bool> allowed(D, true);
      for (int64_t i = 0; i < n[b].item<int64_t>(); ++i) {
        const int64_t p = index[b][i].item<int64_t>();
        Tensor mask = at::zeros({D}, at::kBool);
        for (int64_t d = 0; d < D; ++d) mask[d] = static_cast<bool>(allowed[d]);
        Tensor hit = at::zeros({D}, at::kDouble);
        hit[p] = 1;
        grad_lq[b] += gq[b] * (hit - at::softmax(at::where(mask, logits[b], -INFINITY), 0));
        for (int64_t rr = std::max<int64_t>(p / W - h, 0); rr <= std::min<int64_t>(p / W + h, H - 1); ++rr)
          for (int64_t cc = std::max<int64_t>(p % W - h, 0); cc <= std::min<int64_t>(p % W + h, W - 1); ++cc)
            allowed[rr * W + cc] = false;
      }
    }
    check_close("gumbel window grad (log_q only)", gl, grad_lq, rtol * 10);
  }
  const std::vector<int64_t> other{H + 1, W};
  check_throws("gumbel window even", [&] { fwd.call(logits, n, tau, M, gumbel, 2, canvas); });
  check_throws("gumbel window 0", [&] { fwd.call(logits, n, tau, M, gumbel, 0, canvas); });
  check_throws("gumbel window without canvas", [&] { fwd.call(logits, n, tau, M, gumbel, window, std::nullopt); });
  check_throws("gumbel window canvas", [&] { fwd.call(logits, n, tau, M, gumbel, window, other); });
  int64_t big = window;
  while (D > (M - 1) * big * big) big += 2;  // the smallest odd window the canvas cannot hold
  if (M > 1) check_throws("gumbel window too large", [&] { fwd.call(logits, n, tau, M, gumbel, big, canvas); });
}

// ---------------------------------------------------------------------------------------------
// count_objects and gather_appearance
// ---------------------------------------------------------------------------------------------

static void test_count(int64_t B, int64_t H, int64_t W) {
  auto count = op<Tensor(const Tensor&, double, int64_t, int64_t)>("lavae_fast::count_objects");
  for (int64_t window : {1, 3, 5, 7}) {
    const int64_t r = window / 2;
    for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
      const Tensor h = (at::randn({B, H, W}, at::kDouble) * 3).to(dt);
      const Tensor got = count.call(h, 2.0, 7, window);
      const Tensor hd = h.to(at::kDouble);
      auto a = hd.accessor<double, 3>();
      for (int64_t b = 0; b < B; ++b) {
        int64_t c = 0;
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            bool peak = a[b][y][x] > 2.0;
            for (int64_t dy = -r; dy <= r; ++dy)
              for (int64_t dx = -r; dx <= r; ++dx) {
                const int64_t yy = y + dy, xx = x + dx;
                if (yy >= 0 && yy < H && xx >= 0 && xx < W && a[b][yy][xx] > a[b][y][x]) peak = false;
              }
            c += peak;
          }
        EXPECT(got[b].item<int64_t>() == std::min<int64_t>(c, 7), "count image %lld window %lld", (long long)b,
               (long long)window);
      }
    }
  }
  // Two peaks 2 px apart: two 3x3 maxima, one 5x5 maximum.
  const Tensor two = at::zeros({1, 7, 9}, at::kDouble);
  two[0][3][3] = 5.0;
  two[0][3][5] = 6.0;
  EXPECT(count.call(two, 1.0, 10, 3).item<int64_t>() == 2, "count window 3 of two peaks 2 px apart");
  EXPECT(count.call(two, 1.0, 10, 5).item<int64_t>() == 1, "count window 5 of two peaks 2 px apart");
  check_throws("count even window", [&] { count.call(two, 1.0, 10, 4); });
  check_throws("count zero window", [&] { count.call(two, 1.0, 10, 0); });
}

static void test_gather(int64_t B, int64_t M, int64_t K, int64_t H, int64_t W) {
  using FwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptT&);
  using BwdSig = T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&, bool, bool);
  auto fwd = op<FwdSig>("lavae_fast::gather_appearance");
  auto bwd = op<BwdSig>("lavae_fast::gather_appearance_backward");
  const int64_t D = H * W;
  PlaceCase c = place_case(B, M, 1, 1, H, W);  // for n, index and one-hot maps
  const Tensor h = at::randn({B, K, H, W}, at::kDouble);
  const Tensor g = at::randn({B, M, K}, at::kDouble);
  const Tensor mask = (at::arange(M).view({1, M}) < c.n.view({B, 1})).to(at::kDouble);
  const Tensor maps = c.loc.view({B, M, D}) * mask.view({B, M, 1});
  const Tensor feats = h.view({B, K, D});
  const Tensor gm = g * mask.view({B, M, 1});
  const Tensor out_want = at::bmm(maps, feats.transpose(1, 2));
  const Tensor gh_want = at::bmm(gm.transpose(1, 2), maps).view({B, K, H, W});
  const Tensor gl_want = at::bmm(gm, feats).view({B, M, H, W});
  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    const double rtol = dt == at::kDouble ? 1e-10 : 1e-4;
    for (bool with_index : {false, true}) {
      const OptT index = with_index ? OptT(c.index) : OptT();
      check_close("gather value", fwd.call(h.to(dt), c.loc.to(dt), c.n, index), out_want, rtol);
      auto [gh, gl] = bwd.call(g.to(dt), h.to(dt), c.loc.to(dt), c.n, index, true, true);
      check_close("gather grad_h_app", gh, gh_want, rtol);
      check_close("gather grad_loc", gl, gl_want, rtol);
    }
  }
  Tensor bad = c.index.clone();
  bad[0][0] = -5;
  check_throws("gather index out of range", [&] { fwd.call(h, c.loc, c.n, OptT(bad)); });
}

// ---------------------------------------------------------------------------------------------
// lrelu_batch_norm: fused Leaky ReLU → batch norm with batch statistics
// ---------------------------------------------------------------------------------------------

using T3 = std::tuple<Tensor, Tensor, Tensor>;

static double lrelu(double y, double slope) { return y > 0 ? y : y * slope; }

// By definition, in float64 loops over the logical [N,C,H,W] indices (any strides): a = lrelu(y);
// mean and biased variance of a per channel over (N,H,W); invstd = 1/sqrt(var + eps);
// out = (a − mean)·invstd·weight + bias.
static T3 brute_norm_forward(const Tensor& y, const Tensor& weight, const Tensor& bias, double slope, double eps) {
  const int64_t N = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
  const double n = static_cast<double>(N * H * W);
  const Tensor yd = y.to(at::kDouble), wd = weight.to(at::kDouble), bd = bias.to(at::kDouble);
  Tensor out = at::empty({N, C, H, W}, at::kDouble), mean = at::empty({C}, at::kDouble);
  Tensor invstd = at::empty({C}, at::kDouble);
  auto Y = yd.accessor<double, 4>();
  auto O = out.accessor<double, 4>();
  auto w = wd.accessor<double, 1>(), b = bd.accessor<double, 1>();
  auto m = mean.accessor<double, 1>(), is = invstd.accessor<double, 1>();
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, v = 0;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < W; ++x) s += lrelu(Y[i][c][h][x], slope);
    m[c] = s / n;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < W; ++x) v += std::pow(lrelu(Y[i][c][h][x], slope) - m[c], 2);
    is[c] = 1 / std::sqrt(v / n + eps);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < W; ++x) O[i][c][h][x] = (lrelu(Y[i][c][h][x], slope) - m[c]) * is[c] * w[c] + b[c];
  }
  return {out, mean, invstd};
}

// With the mean and invstd given and x̂ = (a − mean)·invstd: grad_bias = Σg, grad_weight = Σg·x̂
// over (N,H,W), grad_y = weight·invstd·(g − Σg/n − x̂·Σg·x̂/n)·(y > 0 ? 1 : slope).
static T3 brute_norm_backward(const Tensor& grad, const Tensor& y, const Tensor& weight, const Tensor& mean,
                              const Tensor& invstd, double slope) {
  const int64_t N = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
  const double n = static_cast<double>(N * H * W);
  const Tensor yd = y.to(at::kDouble), gd = grad.to(at::kDouble), wd = weight.to(at::kDouble);
  const Tensor md = mean.to(at::kDouble), sd = invstd.to(at::kDouble);
  Tensor gy = at::empty({N, C, H, W}, at::kDouble), gw = at::empty({C}, at::kDouble), gb = at::empty({C}, at::kDouble);
  auto Y = yd.accessor<double, 4>(), G = gd.accessor<double, 4>();
  auto GY = gy.accessor<double, 4>();
  auto w = wd.accessor<double, 1>(), m = md.accessor<double, 1>(), is = sd.accessor<double, 1>();
  auto aw = gw.accessor<double, 1>(), ab = gb.accessor<double, 1>();
  for (int64_t c = 0; c < C; ++c) {
    double sg = 0, sgx = 0;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < W; ++x) {
          sg += G[i][c][h][x];
          sgx += G[i][c][h][x] * (lrelu(Y[i][c][h][x], slope) - m[c]) * is[c];
        }
    ab[c] = sg;
    aw[c] = sgx;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < W; ++x) {
          const double xhat = (lrelu(Y[i][c][h][x], slope) - m[c]) * is[c];
          const double v = w[c] * is[c] * (G[i][c][h][x] - sg / n - xhat * sgx / n);
          GY[i][c][h][x] = Y[i][c][h][x] > 0 ? v : v * slope;
        }
  }
  return {gy, gw, gb};
}

// The layout of out and grad_y (lavae_fast/engine/norm.py output_memory_format): NCHW when y is
// contiguous, channels-last when y is channels-last only, NCHW otherwise.
static at::MemoryFormat norm_output_format(const Tensor& y) {
  if (y.is_contiguous()) return at::MemoryFormat::Contiguous;
  return y.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

static void test_norm(int64_t N, int64_t C, int64_t H, int64_t W, double slope) {
  using FwdSig = T3(const Tensor&, const Tensor&, const Tensor&, double, double);
  using BwdSig = T3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool, bool, bool);
  auto fwd = op<FwdSig>("lavae_fast::lrelu_batch_norm");
  auto bwd = op<BwdSig>("lavae_fast::lrelu_batch_norm_backward");
  const double eps = 1e-5;
  // Each channel with its own offset and spread; the last one (C > 2) far from zero, |mean| ≫ std,
  // which the kernel's shifted sums must survive.
  Tensor offset = at::randn({1, C, 1, 1}, at::kDouble) * 2;
  if (C > 2) offset[0][C - 1] = 30;
  const Tensor y64 = at::randn({N, C, H, W}, at::kDouble) * (0.5 + at::rand({1, C, 1, 1}, at::kDouble)) + offset;
  const Tensor g64 = at::randn({N, C, H, W}, at::kDouble);
  const Tensor w64 = at::randn({C}, at::kDouble), b64 = at::randn({C}, at::kDouble);
  for (at::ScalarType dt : {at::kDouble, at::kFloat, at::kBFloat16}) {
    const at::ScalarType st = dt == at::kDouble ? at::kDouble : at::kFloat;  // weight, bias, mean, invstd
    // The reference starts from exactly the values the kernel gets (y and g rounded to dt).
    const Tensor y = y64.to(dt), g = g64.to(dt), w = w64.to(st), b = b64.to(st);
    auto [out_want, mean_want, invstd_want] = brute_norm_forward(y, w, b, slope, eps);
    const Tensor mean = mean_want.to(st), invstd = invstd_want.to(st);
    auto [gy_want, gw_want, gb_want] = brute_norm_backward(g, y, w, mean, invstd, slope);
    // out and grad_y are rounded to dt (bfloat16: 8 bits); the statistics and sums are in st.
    const double rtol = dt == at::kDouble ? 1e-10 : dt == at::kFloat ? 1e-4 : 1e-2;
    const double stol = dt == at::kDouble ? 1e-10 : 1e-4;
    // NCHW; channels-last (y and grad_out); a strided view that is neither (y, made contiguous by
    // the kernel) with a channels-last grad_out.
    for (int layout = 0; layout < 3; ++layout) {
      Tensor yl, gl;
      if (layout == 0) {
        yl = y.contiguous();
        gl = g.contiguous();
      } else if (layout == 1) {
        yl = y.contiguous(at::MemoryFormat::ChannelsLast);
        gl = g.contiguous(at::MemoryFormat::ChannelsLast);
      } else {
        Tensor wide = at::zeros({N, C, H, 2 * W}, y.options());
        yl = wide.slice(3, 0, 2 * W, 2);
        yl.copy_(y);
        gl = g.contiguous(at::MemoryFormat::ChannelsLast);
      }
      const at::MemoryFormat fmt = norm_output_format(yl);
      auto [out, m, s] = fwd.call(yl, w, b, slope, eps);
      check_close("norm out", out, out_want, rtol);
      check_close("norm mean", m, mean_want, stol);
      check_close("norm invstd", s, invstd_want, stol);
      EXPECT(out.scalar_type() == dt && m.scalar_type() == st && s.scalar_type() == st, "norm forward dtypes (%s)",
             c10::toString(dt));
      EXPECT(out.is_contiguous(fmt), "norm out layout (layout %d, C=%lld)", layout, (long long)C);
      auto [gy, gw, gb] = bwd.call(gl, yl, w, mean, invstd, slope, true, true, true);
      check_close("norm grad_y", gy, gy_want, rtol);
      check_close("norm grad_weight", gw, gw_want, stol);
      check_close("norm grad_bias", gb, gb_want, stol);
      EXPECT(gy.is_contiguous(fmt), "norm grad_y layout (layout %d, C=%lld)", layout, (long long)C);
      // An output not asked for is an empty tensor; the others are unchanged.
      auto [gy_w, gw_w, gb_w] = bwd.call(gl, yl, w, mean, invstd, slope, false, true, false);
      EXPECT(gy_w.numel() == 0 && gb_w.numel() == 0, "norm backward: outputs not asked for are empty");
      check_close("norm grad_weight alone", gw_w, gw_want, stol);
      auto [gy_y, gw_y, gb_y] = bwd.call(gl, yl, w, mean, invstd, slope, true, false, false);
      EXPECT(gw_y.numel() == 0 && gb_y.numel() == 0, "norm backward: outputs not asked for are empty");
      check_close("norm grad_y alone", gy_y, gy_want, rtol);
    }
  }
  check_throws("norm weight shape", [&] { fwd.call(y64, at::randn({C + 1}, at::kDouble), b64, slope, eps); });
  check_throws("norm weight dtype", [&] { fwd.call(y64, w64.to(at::kFloat), b64.to(at::kFloat), slope, eps); });
  check_throws("norm y dim", [&] { fwd.call(y64[0], w64, b64, slope, eps); });
  check_throws("norm y dtype", [&] { fwd.call(y64.to(at::kHalf), w64.to(at::kFloat), b64.to(at::kFloat), slope, eps); });
  check_throws("norm grad_out shape",
               [&] { bwd.call(g64.narrow(0, 0, N - 1), y64, w64, b64, b64, slope, true, true, true); });
}

// No values per channel (N = 0): the statistics are 0/0 (NaN, as the reference's var_mean gives)
// and the sums of the backward pass are 0; and C = 0.
static void test_norm_empty() {
  using FwdSig = T3(const Tensor&, const Tensor&, const Tensor&, double, double);
  using BwdSig = T3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool, bool, bool);
  auto fwd = op<FwdSig>("lavae_fast::lrelu_batch_norm");
  auto bwd = op<BwdSig>("lavae_fast::lrelu_batch_norm_backward");
  const Tensor y = at::empty({0, 3, 4, 5}), w = at::ones({3}), b = at::zeros({3});
  auto [out, m, s] = fwd.call(y, w, b, 0.01, 1e-5);
  EXPECT(out.sizes() == y.sizes() && m.isnan().all().item<bool>() && s.isnan().all().item<bool>(),
         "norm with N = 0: empty out, NaN statistics");
  auto [gy, gw, gb] = bwd.call(y, y, w, b, w, 0.01, true, true, true);
  EXPECT(gy.sizes() == y.sizes() && gw.eq(0).all().item<bool>() && gb.eq(0).all().item<bool>() && gw.numel() == 3,
         "norm backward with N = 0: zero sums");
  const Tensor y0 = at::empty({2, 0, 3, 3});
  auto [out0, m0, s0] = fwd.call(y0, at::empty({0}), at::empty({0}), 0.01, 1e-5);
  EXPECT(out0.sizes() == y0.sizes() && m0.numel() == 0 && s0.numel() == 0, "norm with C = 0");
}

// ---------------------------------------------------------------------------------------------
// The registrations of csrc/ against lavae_fast/op_schemas.inc
// ---------------------------------------------------------------------------------------------

static std::string op_name(const char* schema) { return "lavae_fast::" + std::string(schema, std::strchr(schema, '(')); }

static void check_registrations() {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* schema : kSchemas) {
    const std::string name = op_name(schema);
    const auto handle = dispatcher.findSchema({name, ""});
    EXPECT(handle.has_value(), "%s is not defined", name.c_str());
    if (handle)
      EXPECT(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), "%s has no CPU kernel (csrc/dispatch.cpp)",
             name.c_str());
  }
  // A kernel registered under a name that has no schema: misspelt, or an op removed from the file.
  for (const c10::OperatorHandle& h : dispatcher.findDanglingImpls()) {
    const std::string name = h.operator_name().name;
    EXPECT(name.rfind("lavae_fast::", 0) != 0, "%s has a kernel but no schema in lavae_fast/op_schemas.inc",
           name.c_str());
  }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--print-schemas") == 0) {
    for (const char* s : kSchemas) std::printf("lavae_fast::%s\n", s);
    return 0;
  }
  check_registrations();
  std::printf("registrations: %d ops, %d failures\n", static_cast<int>(sizeof(kSchemas) / sizeof(kSchemas[0])),
              g_failures);
  // Every kernel variant this CPU runs (default, avx2, avx512: each compiled with its own vector
  // width and register tiles), so that the sanitizer build checks the bounds of each.
  for (const std::string& variant : lavae_fast::available_cpu_capabilities()) {
    lavae_fast::set_cpu_capability(variant);
    std::printf("variant %s\n", lavae_fast::cpu_capability().c_str());
    at::manual_seed(0);
    const int before = g_failures;
    test_place(3, 4, 2, 5, 6, 7);
    test_place(2, 13, 1, 9, 5, 3);    // S > canvas, 13 objects: two output blocks
    test_place(2, 3, 1, 3, 1, 1);     // 1×1 canvas
    test_place(2, 2, 3, 21, 40, 37);  // dSprites sprite, odd width (partial vectors)
    test_place(5, 10, 1, 17, 23, 21);  // B >= 2·threads: one task per image; 4-row groups, partial last
    test_place(4, 3, 3, 7, 9, 10);     // the same with three colours
    test_gumbel(4, 37, 5, 0.3);
    test_gumbel(3, 3, 5, 0.5);        // D < M
    test_gumbel(3, 70, 4, 0.02);
    test_gumbel_window(4, 7, 9, 4, 3, 0.3);
    test_gumbel_window(3, 1, 37, 3, 3, 0.5);    // a one-row canvas, partial vectors
    test_gumbel_window(3, 9, 11, 4, 5, 0.02);   // low temperature, 99 > 3·25
    test_gumbel_window(2, 13, 11, 13, 3, 0.1);  // M > 12
    test_gumbel_window(2, 19, 21, 3, 7, 0.5);
    test_count(4, 7, 9);
    test_count(2, 1, 1);
    test_count(3, 2, 5);              // a canvas narrower than the 5x5 and 7x7 windows
    test_gather(3, 4, 5, 5, 7);
    test_gather(2, 13, 64, 6, 11);
    test_gather(2, 13, 37, 19, 23);  // several column chunks, partial chunk, tile and row group
    test_gather(3, 4, 0, 5, 7);       // K = 0: no feature planes, grad_loc must still be written
    test_norm(2, 44, 5, 7, 0.01);    // the model's C = 44: channels-last period of 4 rows
    test_norm(3, 5, 3, 3, 0.2);      // C = 5: one 16-row period and a tail
    test_norm(2, 16, 3, 5, 0.01);    // C a multiple of every vector width
    test_norm(1, 19, 4, 5, 0.01);    // batch 1
    test_norm(6, 13, 1, 1, 0.01);    // spatial size 1 (channels-last is also contiguous)
    test_norm(1, 3, 1, 1, 0.01);     // one value per channel: variance 0
    test_norm(2, 1, 9, 11, 0.01);    // C = 1
    test_norm(4, 44, 20, 21, 0.01);  // several parallel blocks and chunk flushes; planes of many vectors
    test_norm_empty();
    std::printf("variant %s: %d failures\n", variant.c_str(), g_failures - before);
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  if (g_failures == 0) std::printf("ALL OK\n");
  return g_failures == 0 ? 0 : 1;
}

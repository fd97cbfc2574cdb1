// Appearance gather at the drawn locations (SPEC §9.4), forward and backward.
//
// out[b,i,:] = Σ_d loc[b,i,d]·h_app[b,:,d] for i < n[b] (zero rows after). With `index` (the
// one-hot promise) the forward reads the K features at the index and nothing else; the backward's
// grad_loc is always the dense formula grad_loc[b,i,d] = Σ_k h_app[b,k,d]·g[b,i,k] and grad_h_app
// is the scatter of g at the index (dense mode: Σ_i loc[b,i,d]·g[b,i,k]). grad_loc, needed in
// both modes, is computed with the register-blocked tile of correlate.h in one pass over h_app;
// the dense-mode-only products (forward, dense grad_h_app) are batched GEMMs.
#include <vector>

#include "correlate.h"

namespace lavae_fast {
namespace LAVAE_ISA {
namespace gather {
namespace {

constexpr const char* kFwd = "gather_appearance";
constexpr const char* kBwd = "gather_appearance_backward";

void check_gather_inputs(const char* op, const at::Tensor& h_app, const at::Tensor& loc) {
  check_cpu(h_app, op, "h_app");
  check_cpu(loc, op, "loc");
  check_dim(h_app, 4, op, "h_app");
  check_float(h_app, op, "h_app");
  check_dim(loc, 4, op, "loc");
  check_same_dtype(loc, h_app, op, "loc", "h_app");
  TORCH_CHECK(loc.size(0) == h_app.size(0) && loc.size(2) == h_app.size(2) && loc.size(3) == h_app.size(3), op,
              ": loc must have shape [B=", h_app.size(0), ", M, H=", h_app.size(2), ", W=", h_app.size(3), "], got ",
              loc.sizes());
}

// Zero the rows i ≥ n[b] of a [B, M, X] tensor.
template <typename T>
void zero_absent_rows(T* p, const int64_t* pn, int64_t B, int64_t M, int64_t X) {
  for (int64_t b = 0; b < B; ++b) std::fill(p + (b * M + pn[b]) * X, p + (b + 1) * M * X, T(0));
}

// One pass per image over h_app: grad_loc[i,d] = Σ_k g[i,k]·h_app[k,d] for the present rows (a
// 1×1 correlation: the K feature planes are the channels, the present objects the outputs), and
// in index mode the zero-fill and scatter of grad_h_app.
constexpr int64_t kRowGroup = 32;
constexpr int64_t kChunkBytes = 512;  // columns per chunk: 8 AVX-512 vectors

// A block of objects that share a tile: objects [o0, o0 + ob), tiles of xb columns.
struct ObjectBlock {
  int64_t o0, ob, xb;
  TileFn fn, fn_pf;
};

template <typename T>
void gather_backward_fused(const at::Tensor& g, const at::Tensor& h_app, const int64_t* pi, const int64_t* pn,
                           int64_t B, int64_t M, int64_t K, int64_t D, at::Tensor* grad_h, at::Tensor* grad_loc) {
  constexpr int N = Vec<T>::N;
  constexpr int64_t kChunk = kChunkBytes / static_cast<int64_t>(sizeof(T));
  const T* pg = g.const_data_ptr<T>();
  const T* ph = grad_loc ? h_app.const_data_ptr<T>() : nullptr;
  T* pgh = grad_h ? grad_h->mutable_data_ptr<T>() : nullptr;
  T* pgl = grad_loc ? grad_loc->mutable_data_ptr<T>() : nullptr;
  struct Scratch {
    std::vector<T> w, tail;
    std::vector<ObjectBlock> blocks;
  };
  parallel_tasks<Scratch>(B, [&](int64_t b, Scratch& sc) {
    std::vector<T>&w = sc.w, &tail = sc.tail;
    {
      const int64_t m = pn[b];
      const T* gb = pg + b * M * K;
      if (pgh != nullptr) {
        T* hb = pgh + b * K * D;
        zero_stream(hb, K * D);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t p = pi[b * M + i];
          if (p < 0) continue;
          for (int64_t k = 0; k < K; ++k) hb[k * D + p] += gb[i * K + k];
        }
      }
      if (pgl == nullptr) return;
      T* lb = pgl + b * M * D;
      std::fill(lb + m * D, lb + M * D, T(0));
      if (m == 0) return;
      if (K == 0) {  // no feature planes: the present rows are zero (the tiles below never run)
        std::fill(lb, lb + m * D, T(0));
        return;
      }
      const T* hb = ph + b * K * D;
      // Object blocks. With 32 registers all (up to kMaxOB) objects share one tile, 2 vectors
      // wide. With 16, a 10-object tile is one vector wide and issues a weight broadcast (a load)
      // per FMA, so the loop is bound by loads; blocks of at most 6 objects get 2 vectors wide tiles
      // (measured, AVX2 variant on Zen 4, B = 64, M = 10, K = 64: grad_loc 1.5x faster). Each
      // chunk of h_app rows is read once for every block while it sits in L1.
      const int64_t obs = kVecRegs >= 32 ? block_size(m) : ceil_div(m, ceil_div(m, 6));
      w.resize(m * K);
      std::vector<ObjectBlock>& blocks = sc.blocks;
      blocks.clear();
      for (int64_t o0 = 0; o0 < m; o0 += obs) {
        const int64_t ob = std::min(obs, m - o0);
        // Weights [k][o] of this block of objects.
        T* wb = w.data() + o0 * K;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t o = 0; o < ob; ++o) wb[k * ob + o] = gb[(o0 + o) * K + k];
        const int nx = choose_nx<T>(ob, D);
        blocks.push_back({o0, ob, nx * N, tile_fn<T>(static_cast<int>(ob), nx),
                          tile_fn<T>(static_cast<int>(ob), nx, /*prefetch=*/true)});
      }
      TileArgs t;
      t.NA = 1;
      t.sa = 0;
      t.KW = 1;
      t.out_stride = D;
      t.prefetch = kChunk;
      // Columns in chunks of kChunk, and within a chunk the rows of h_app in groups of
      // kRowGroup: the partial sums of a chunk (ob × kChunk) stay in L1 between row groups,
      // and each tile prefetches its rows' columns of the next chunk, so the K rows (one
      // stream per feature plane, too many for the hardware prefetcher) arrive from DRAM
      // while the current chunk computes. (Measured on the bench's shape, 2 Zen 4 cores:
      // 1.7x faster than sweeping whole rows per group, within 1.5x of the same FLOPs on
      // cached data.)
      for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
        const int64_t c1 = std::min(c0 + kChunk, D);
        for (int64_t k0 = 0; k0 < K; k0 += kRowGroup) {
          const int64_t kr = std::min(kRowGroup, K - k0);
          t.NR = kr;
          t.accumulate = k0 > 0;
          for (const ObjectBlock& bl : blocks) {
            t.w = w.data() + bl.o0 * K + k0 * bl.ob;
            for (int64_t x0 = c0; x0 < c1; x0 += bl.xb) {
              t.out = lb + bl.o0 * D + x0;
              t.valid = std::min(bl.xb, D - x0);
              if (t.valid == bl.xb) {
                t.in = hb + k0 * D + x0;
                t.sr = D;
                // Prefetch only inside the row (the next chunk's columns exist).
                (x0 + kChunk + bl.xb <= D ? bl.fn_pf : bl.fn)(t);
              } else {
                // The tile reads whole vectors: copy the last, partial columns into a
                // zero-padded panel rather than reading past the end of h_app.
                tail.assign(kr * bl.xb, T(0));
                for (int64_t k = 0; k < kr; ++k)
                  std::copy(hb + (k0 + k) * D + x0, hb + (k0 + k) * D + D, tail.data() + k * bl.xb);
                t.in = tail.data();
                t.sr = bl.xb;
                bl.fn(t);
              }
            }
          }
        }
      }
    }
  });
}

// ---- channels-last h_app ([B,K,H,W] stored as [B][H·W][K], as the convolution that makes it
// leaves it when the model runs channels-last). The K features of a pixel are one contiguous row,
// so the look-up is a row copy and the scatter a row add; the products are GEMMs on the
// [B,D,K] view. The gradient to h_app keeps h_app's layout, so the convolution's backward reads
// it without a 67 MB conversion (issue 5).

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// [B,K,H,W] channels-last → its [B,D,K] row-major view (no copy).
at::Tensor rows_view(const at::Tensor& t, int64_t B, int64_t K, int64_t D) {
  return t.permute({0, 2, 3, 1}).reshape({B, D, K});
}

// Index mode only (the dense forward is one GEMM on the [B,D,K] view for either layout).
at::Tensor gather_forward_channels_last(const at::Tensor& h_app, const at::Tensor& n,
                                        const std::optional<at::Tensor>& index_, int64_t B, int64_t M, int64_t K,
                                        int64_t D) {
  const int64_t* pn = n.const_data_ptr<int64_t>();
  const at::Tensor hv = rows_view(h_app, B, K, D);
  const at::Tensor index = checked_index(*index_, n, B, M, D, kFwd);
  const int64_t* pi = index.const_data_ptr<int64_t>();
  at::Tensor out = at::zeros({B, M, K}, h_app.options());
  AT_DISPATCH_FLOATING_TYPES(h_app.scalar_type(), kFwd, [&] {
    const scalar_t* ph = hv.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < pn[b]; ++i) {
        const int64_t p = pi[b * M + i];
        if (p >= 0) std::copy(ph + (b * D + p) * K, ph + (b * D + p + 1) * K, po + (b * M + i) * K);
      }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_backward_channels_last(const at::Tensor& g, const at::Tensor& h_app,
                                                                 const at::Tensor& loc, const at::Tensor& n,
                                                                 const at::Tensor& index, int64_t B, int64_t M,
                                                                 int64_t K, int64_t D, bool need_h_app,
                                                                 bool need_loc) {
  const int64_t* pn = n.const_data_ptr<int64_t>();
  at::Tensor grad_h = at::empty({0}, h_app.options()), grad_loc = at::empty({0}, h_app.options());
  if (need_loc) {
    grad_loc = at::empty(loc.sizes(), h_app.options());
    at::Tensor gl = grad_loc.view({B, M, D});
    at::bmm_out(gl, g, rows_view(h_app, B, K, D).transpose(1, 2));
  }
  if (need_h_app) {
    grad_h = at::empty_like(h_app);  // channels-last, like h_app
    at::Tensor gv = rows_view(grad_h, B, K, D);
    if (!index.defined()) {
      at::bmm_out(gv, loc.reshape({B, M, D}).transpose(1, 2), g);
    } else {
      const int64_t* pi = index.const_data_ptr<int64_t>();
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), kBwd, [&] {
        const scalar_t* pg = g.const_data_ptr<scalar_t>();
        scalar_t* ph = gv.mutable_data_ptr<scalar_t>();
        parallel_tasks<NoScratch>(B, [&](int64_t b, NoScratch&) {
          scalar_t* hb = ph + b * D * K;
          zero_stream(hb, D * K);
          for (int64_t i = 0; i < pn[b]; ++i) {
            const int64_t p = pi[b * M + i];
            if (p < 0) continue;
            for (int64_t k = 0; k < K; ++k) hb[p * K + k] += pg[(b * M + i) * K + k];
          }
        });
      });
    }
  }
  return {grad_h, grad_loc};
}

at::Tensor gather_appearance_cpu(const at::Tensor& h_app_, const at::Tensor& loc_, const at::Tensor& n_,
                                 const std::optional<at::Tensor>& index_) {
  check_gather_inputs(kFwd, h_app_, loc_);
  const int64_t B = h_app_.size(0), K = h_app_.size(1), D = h_app_.size(2) * h_app_.size(3), M = loc_.size(1);
  const at::Tensor n = checked_counts(n_, B, M, kFwd);
  const int64_t* pn = n.const_data_ptr<int64_t>();
  const bool cl = is_channels_last(h_app_);
  const at::Tensor h_app = cl ? h_app_ : h_app_.contiguous();
  if (!index_.has_value()) {
    const at::Tensor hv = cl ? rows_view(h_app, B, K, D) : h_app.view({B, K, D}).transpose(1, 2);
    at::Tensor out = at::bmm(loc_.reshape({B, M, D}), hv).contiguous();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), kFwd,
                               [&] { zero_absent_rows(out.mutable_data_ptr<scalar_t>(), pn, B, M, K); });
    return out;
  }
  if (cl) return gather_forward_channels_last(h_app, n, index_, B, M, K, D);
  const at::Tensor index = checked_index(*index_, n, B, M, D, kFwd);
  const int64_t* pi = index.const_data_ptr<int64_t>();
  at::Tensor out = at::zeros({B, M, K}, h_app.options());
  AT_DISPATCH_FLOATING_TYPES(h_app.scalar_type(), kFwd, [&] {
    const scalar_t* ph = h_app.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    parallel_tasks<NoScratch>(B, [&](int64_t b, NoScratch&) {
      // Every value read is on a cache line of its own (one per feature plane and object), and
      // h_app has usually just left the cache: request all of the image's lines first, so that
      // the misses overlap instead of being waited for one after another.
      for (int64_t i = 0; i < pn[b]; ++i) {
        const int64_t p = pi[b * M + i];
        if (p < 0) continue;
        const scalar_t* col = ph + b * K * D + p;
        for (int64_t k = 0; k < K; ++k) __builtin_prefetch(col + k * D, 0, 3);
      }
      for (int64_t i = 0; i < pn[b]; ++i) {
        const int64_t p = pi[b * M + i];
        if (p < 0) continue;
        scalar_t* row = po + (b * M + i) * K;
        const scalar_t* col = ph + b * K * D + p;
        for (int64_t k = 0; k < K; ++k) row[k] = col[k * D];
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_appearance_backward_cpu(const at::Tensor& grad_, const at::Tensor& h_app_,
                                                                  const at::Tensor& loc_, const at::Tensor& n_,
                                                                  const std::optional<at::Tensor>& index_,
                                                                  bool need_h_app, bool need_loc) {
  check_gather_inputs(kBwd, h_app_, loc_);
  const int64_t B = h_app_.size(0), K = h_app_.size(1), D = h_app_.size(2) * h_app_.size(3), M = loc_.size(1);
  check_cpu(grad_, kBwd, "grad");
  check_same_dtype(grad_, h_app_, kBwd, "grad", "h_app");
  check_shape(grad_, {B, M, K}, kBwd, "grad");
  const at::Tensor n = checked_counts(n_, B, M, kBwd);
  const int64_t* pn = n.const_data_ptr<int64_t>();
  at::Tensor index;
  if (index_.has_value()) index = checked_index(*index_, n, B, M, D, kBwd);
  // Rows of absent slots carry no gradient: zero them once, then every product may use all rows.
  at::Tensor g = grad_.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), kBwd, [&] { zero_absent_rows(g.mutable_data_ptr<scalar_t>(), pn, B, M, K); });
  if (is_channels_last(h_app_))
    return gather_backward_channels_last(g, h_app_, loc_, n, index, B, M, K, D, need_h_app, need_loc);
  const bool scatter_h = need_h_app && index.defined();
  at::Tensor grad_h = at::empty({0}, h_app_.options()), grad_loc = at::empty({0}, h_app_.options());
  if (need_h_app && !scatter_h) grad_h = at::bmm(g.transpose(1, 2), loc_.reshape({B, M, D})).view(h_app_.sizes());
  if (!need_loc && !scatter_h) return {grad_h, grad_loc};
  const at::Tensor h_app = need_loc ? h_app_.contiguous() : h_app_;
  if (scatter_h) grad_h = at::empty(h_app_.sizes(), h_app_.options());
  if (need_loc) grad_loc = at::empty(loc_.sizes(), h_app_.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), kBwd, [&] {
    gather_backward_fused<scalar_t>(g, h_app, index.defined() ? index.const_data_ptr<int64_t>() : nullptr, pn, B, M,
                                    K, D, scatter_h ? &grad_h : nullptr, need_loc ? &grad_loc : nullptr);
  });
  return {grad_h, grad_loc};
}

}  // namespace
}  // namespace gather
}  // namespace LAVAE_ISA
}  // namespace lavae_fast

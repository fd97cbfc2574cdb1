// Local-maximum object counting (SPEC §2, §9.3): one pass over each image.
//
// A point counts when it is >= every neighbour of its window x window neighbourhood (window odd,
// radius r = window / 2; 3x3 by default, SPEC §2; neighbours outside the canvas are -inf, i.e.
// ignored) and > threshold; the count is clipped to max_objects. The threshold test comes first
// because almost every pixel fails it, which skips the window^2 - 1 neighbour reads. NaN follows
// the reference: max_pool2d propagates a NaN neighbour, and h >= NaN is false, so a point next to
// a NaN never counts (hence `!(n <= v)` rather than `n > v`).
#include "common.h"

namespace lavae_fast {
namespace LAVAE_ISA {
namespace count {
namespace {

template <typename scalar_t>
int64_t count_one_image(const scalar_t* h, int64_t H, int64_t W, double threshold, int64_t r) {
  int64_t count = 0;
  for (int64_t y = 0; y < H; ++y) {
    const int64_t y0 = y > r ? y - r : 0, y1 = y < H - 1 - r ? y + r : H - 1;
    for (int64_t x = 0; x < W; ++x) {
      const scalar_t v = h[y * W + x];
      if (!(v > threshold)) continue;  // also rejects NaN, as the reference does
      const int64_t x0 = x > r ? x - r : 0, x1 = x < W - 1 - r ? x + r : W - 1;
      bool is_max = true;
      for (int64_t yy = y0; yy <= y1 && is_max; ++yy)
        for (int64_t xx = x0; xx <= x1; ++xx)
          if (!(h[yy * W + xx] <= v)) { is_max = false; break; }
      count += is_max;
    }
  }
  return count;
}

at::Tensor count_objects_cpu(const at::Tensor& h_loc, double threshold, int64_t max_objects, int64_t window) {
  check_cpu(h_loc, "count_objects", "h_loc");
  TORCH_CHECK(h_loc.dim() == 3, "count_objects: h_loc must be [B,H,W], got ", h_loc.sizes());
  check_float(h_loc, "count_objects", "h_loc");
  TORCH_CHECK(max_objects >= 0, "count_objects: max_objects must be >= 0, got ", max_objects);
  TORCH_CHECK(window >= 1 && window % 2 == 1, "count_objects: window must be an odd integer >= 1, got ", window);
  const int64_t r = window / 2;
  const at::Tensor h = h_loc.contiguous();
  const int64_t B = h.size(0), H = h.size(1), W = h.size(2);
  at::Tensor out = at::empty({B}, h.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "count_objects_cpu", [&] {
    const scalar_t* p = h.const_data_ptr<scalar_t>();
    parallel_tasks<NoScratch>(B, [&](int64_t b, NoScratch&) {
      const int64_t c = count_one_image(p + b * H * W, H, W, threshold, r);
      o[b] = c < max_objects ? c : max_objects;
    });
  });
  return out;
}

}  // namespace
}  // namespace count
}  // namespace LAVAE_ISA
}  // namespace lavae_fast

// The CPU kernels of one instruction-set variant, as a table of entry points.
//
// csrc/kernels/ is compiled once per variant (csrc/isa_*.cpp), each copy in its own namespace
// lavae_fast::<variant>, and each exposes its table through <variant>::kernel_table() (nullptr
// where the variant is not built: another architecture, or a compiler without `#pragma GCC
// target`). csrc/dispatch.cpp registers one implementation per op that calls into the table
// chosen for this CPU, as ATen's CPU capability dispatch does.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lavae_fast {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

struct KernelTable {
  const char* name;
  Tensor (*count_objects)(const Tensor& h_loc, double threshold, int64_t max_objects, int64_t window);
  std::tuple<Tensor, Tensor> (*place_loglik)(const Tensor& x, const Tensor& sprites, const Tensor& loc, const Tensor& n,
                                             const OptTensor& index, double eps);
  std::tuple<Tensor, Tensor> (*place_loglik_backward)(const Tensor& grad_loglik, const OptTensor& grad_canvas,
                                                      const Tensor& x, const Tensor& sprites, const Tensor& loc,
                                                      const Tensor& n, const OptTensor& index, const Tensor& canvas,
                                                      double eps, bool need_sprites, bool need_loc);
  Tensor (*gather_appearance)(const Tensor& h_app, const Tensor& loc, const Tensor& n, const OptTensor& index);
  std::tuple<Tensor, Tensor> (*gather_appearance_backward)(const Tensor& grad, const Tensor& h_app, const Tensor& loc,
                                                           const Tensor& n, const OptTensor& index, bool need_h_app,
                                                           bool need_loc);
  std::tuple<Tensor, Tensor, Tensor> (*gumbel_topk_relaxed)(const Tensor& logits, const Tensor& n, double tau,
                                                            int64_t max_objects, const Tensor& gumbel,
                                                            int64_t window, at::OptionalIntArrayRef canvas);
  Tensor (*gumbel_topk_relaxed_backward)(const OptTensor& grad_relaxed, const OptTensor& grad_log_q,
                                         const Tensor& logits, const Tensor& index, const Tensor& relaxed,
                                         const Tensor& n, double tau, int64_t window, at::OptionalIntArrayRef canvas,
                                         const OptTensor& gumbel);
  std::tuple<Tensor, Tensor, Tensor> (*lrelu_batch_norm)(const Tensor& y, const Tensor& weight, const Tensor& bias,
                                                         double slope, double eps);
  std::tuple<Tensor, Tensor, Tensor> (*lrelu_batch_norm_backward)(const Tensor& grad_out, const Tensor& y,
                                                                  const Tensor& weight, const Tensor& mean,
                                                                  const Tensor& invstd, double slope, bool need_y,
                                                                  bool need_weight, bool need_bias);
};

namespace baseline {
const KernelTable* kernel_table();
}
namespace avx2 {
const KernelTable* kernel_table();
}
namespace avx512 {
const KernelTable* kernel_table();
}

// The variant the ops run now. Chosen at the first call: the best variant that is built and that
// this CPU runs, capped by LAVAE_FAST_CPU_CAPABILITY, or else by ATEN_CPU_CAPABILITY
// ("default" = baseline, "avx2", "avx512"), so that ATEN_CPU_CAPABILITY=avx2 reproduces an AVX2
// machine for PyTorch's kernels and ours alike.
const KernelTable& active_kernels();
std::string cpu_capability();
// Switch variants (tests and benchmarks compare them in one process). Throws c10::Error naming
// the reason when `name` is unknown, not built, or not supported by this CPU.
void set_cpu_capability(const std::string& name);
// Variants that are built and that this CPU can run, in increasing order.
std::vector<std::string> available_cpu_capabilities();

}  // namespace lavae_fast

// The autograd formula of gumbel_topk_relaxed for CPU tensors, in C++ (registered to AutogradCPU).
//
// lavae_fast/engine/ops.py registers the op's autograd formula from Python (torch.library.register_autograd,
// the Autograd key): that one serves every device and a build without this extension. For CPU
// tensors this kernel takes precedence (a kernel registered to AutogradCPU itself wins over one
// registered to the Autograd alias) and does the same thing without the Python glue (re-binding
// the arguments, setup_context, the Python backward): measured in bench/throughput.py's setting,
// forward + backward right after the eager reference, 2 threads, it took 2.41 -> 2.17 ms at B = 64,
// 64x64, M = 10 and 0.61-0.89 -> 0.41-0.44 ms at B = 16 with n drawn from 0-3, where the glue is a
// third of the op's time or more. Both formulas must stay the same (tests/test_ops.py checks the
// gradients through both, and what each saves):
//   forward:  (relaxed, log_q, index) = the op below autograd; index is not differentiable;
//             saved: logits, index, relaxed, n, and at window 1 the noise (gumbel), from which
//             the C++ backward recomputes the relaxed rows instead of reading them.
//   backward: grad_logits = gumbel_topk_relaxed_backward(grad_relaxed, grad_log_q, logits, index,
//             relaxed, n, tau, window, canvas, gumbel); nothing for the other inputs. An output
//             whose gradient is absent is passed as None (not materialised as zeros), as the
//             backward op accepts.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lavae_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

using GumbelSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, int64_t, const Tensor&,
                                                     int64_t, at::OptionalIntArrayRef);
using GumbelBwdSig = Tensor(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, double, int64_t, at::OptionalIntArrayRef,
                            const std::optional<Tensor>&);

const c10::TypedOperatorHandle<GumbelSig>& gumbel_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lavae_fast::gumbel_topk_relaxed", "").typed<GumbelSig>();
  return op;
}

const c10::TypedOperatorHandle<GumbelBwdSig>& gumbel_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lavae_fast::gumbel_topk_relaxed_backward", "")
                             .typed<GumbelBwdSig>();
  return op;
}

std::optional<Tensor> present(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

struct GumbelTopkRelaxed : public torch::autograd::Function<GumbelTopkRelaxed> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& n, double tau,
                             int64_t max_objects, const Tensor& gumbel, int64_t window,
                             at::OptionalIntArrayRef canvas) {
    Tensor relaxed, log_q, index;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(relaxed, log_q, index) = gumbel_op().call(logits, n, tau, max_objects, gumbel, window, canvas);
    }
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["window"] = window;
    ctx->saved_data["canvas"] = canvas.has_value() ? c10::IValue(canvas->vec()) : c10::IValue();
    ctx->save_for_backward({logits, index, relaxed, n, window == 1 ? gumbel : Tensor()});
    ctx->mark_non_differentiable({index});
    ctx->set_materialize_grads(false);
    return {relaxed, log_q, index};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const tensor_list saved = ctx->get_saved_variables();
    tensor_list out(7);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const c10::IValue& cv = ctx->saved_data["canvas"];
    std::optional<std::vector<int64_t>> canvas;
    if (!cv.isNone()) canvas = cv.toIntVector();
    out[0] = gumbel_backward_op().call(present(grads[0]), present(grads[1]), saved[0], saved[1], saved[2], saved[3],
                                       ctx->saved_data["tau"].toDouble(), ctx->saved_data["window"].toInt(),
                                       canvas.has_value() ? at::OptionalIntArrayRef(*canvas) : std::nullopt,
                                       present(saved[4]));
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> gumbel_topk_relaxed_autograd(const Tensor& logits, const Tensor& n, double tau,
                                                               int64_t max_objects, const Tensor& gumbel,
                                                               int64_t window, at::OptionalIntArrayRef canvas) {
  const tensor_list out = GumbelTopkRelaxed::apply(logits, n, tau, max_objects, gumbel, window, canvas);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lavae_fast, AutogradCPU, m) {
  m.impl("gumbel_topk_relaxed", &gumbel_topk_relaxed_autograd);
}

}  // namespace lavae_fast

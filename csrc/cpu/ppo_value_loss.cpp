// ppo_value_loss: PPO's clipped value loss per token, in the row loops of clipped_loss.h.
//   values_clipped = clamp(values, old_values - clip, old_values + clip)
//   loss = 0.5 max((values - returns)^2, (values_clipped - returns)^2)     (no clip: 0.5 (values - returns)^2)
// Statistic per token: the clipped term is the larger.
#include <torch/library.h>

#include <optional>

#include "clipped_loss.h"

namespace cai {
namespace {

template <typename V>
inline Token<V> value_token(const V& v, const V& old, const V& ret, const std::optional<double>& clip) {
  const V err = v - ret, unclipped = err * err;
  if (!clip.has_value()) return {V(0.5) * unclipped, {V(0), V(0), V(0), V(0)}, err};
  const V lo = old - V(*clip), hi = old + V(*clip);
  // as torch.clamp with tensor bounds: a NaN bound (NaN old_values) gives NaN (the vector clamp would drop it)
  const V clipped_err = minimum(maximum(v, lo), hi) - ret, clipped = clipped_err * clipped_err;
  return {V(0.5) * maximum(unclipped, clipped), {indicator(clipped > unclipped), V(0), V(0), V(0)},
          max_grad(unclipped, clipped, err, keep(both(v >= lo, v <= hi), clipped_err))};
}

// The per-token formula with the clip of PpoValueLossParams (cai_kernels/_params.py).
auto value_formula(std::optional<double> clip) {
  return [clip](const auto& v, const auto& old, const auto& ret) { return value_token(v, old, ret, clip); };
}

// Returns (loss, stats, row_weights): stats = [clipfrac], fp32 (fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    std::optional<double> clip, int64_t agg) {
  return clipped_loss_forward(values, old_values, returns, mask, value_formula(clip), agg, 2);
}

// d loss / d values (agg is carried by row_weights and not read).
at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                              const at::Tensor& returns, const at::Tensor& mask, const at::Tensor& row_weights,
                              std::optional<double> clip, int64_t /*agg*/) {
  return clipped_loss_backward(grad_loss, values, old_values, returns, mask, row_weights, value_formula(clip));
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, int agg) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
        "Tensor row_weights, float? clip, int agg) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("ppo_value_loss_fwd", &cai::ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &cai::ppo_value_loss_bwd);
}

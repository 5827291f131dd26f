// ppo_policy_loss: PPO's clipped surrogate per token, in the row loops of clipped_loss.h.
//   log_ratio = clamp(logprobs - old_logprobs, -20, 20), ratio = exp(log_ratio)
//   loss = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)), then min(loss, -A dual_clip) where A < 0
// Statistics per token: the clipped term is the larger, the dual bound is taken, k3 and k1 of KL(old || new).
#include <torch/library.h>

#include <optional>

#include "clipped_loss.h"
#include "kl_math.h"

namespace cai {
namespace {

constexpr double kLogRatioLimit = 20.0;  // LOG_RATIO_LIMIT in cai_kernels/_params.py

struct PolicyClip {
  double ratio_low, ratio_high;
  std::optional<double> dual_clip;
};

template <typename V>
inline Token<V> policy_token(const V& lp, const V& old, const V& adv, const PolicyClip& p) {
  const V raw = lp - old, limit(kLogRatioLimit);
  const V log_ratio = clamp(raw, V(0) - limit, limit);
  const V ratio = exp_of(log_ratio), lo(p.ratio_low), hi(p.ratio_high), neg_adv = V(0) - adv;
  const V unclipped = neg_adv * ratio, clipped = neg_adv * clamp(ratio, lo, hi);
  V loss = maximum(unclipped, clipped);
  V grad = max_grad(unclipped, clipped, unclipped, keep(both(ratio >= lo, ratio <= hi), unclipped));
  V dual_hit = V(0);
  if (p.dual_clip.has_value()) {
    const V bound = neg_adv * V(*p.dual_clip);
    const auto negative = adv < V(0);
    dual_hit = indicator(both(negative, loss > bound));
    // min(loss, bound) as torch.minimum, on the A < 0 tokens only (a NaN loss keeps its gradient)
    grad = select(negative, select(loss > bound, V(0), select(loss == bound, V(0.5) * grad, grad)), grad);
    loss = select(negative, minimum(loss, bound), loss);
  }
  grad = keep(both(raw >= V(0) - limit, raw <= limit), grad);
  return {loss, {indicator(clipped > unclipped), dual_hit, exp_minus_1_minus_x(log_ratio), V(0) - log_ratio}, grad};
}

// The per-token formula with the fields of PpoPolicyLossParams (cai_kernels/_params.py).
auto policy_formula(double clip_low, double clip_high, std::optional<double> dual_clip) {
  const PolicyClip p{1.0 - clip_low, 1.0 + clip_high, dual_clip};
  return [p](const auto& lp, const auto& old, const auto& adv) { return policy_token(lp, old, adv, p); };
}

// Returns (loss, stats, row_weights): stats = [clipfrac, dual_clipfrac, approx_kl, approx_kl_k1], fp32
// (fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    double clip_low, double clip_high, std::optional<double> dual_clip, int64_t agg) {
  return clipped_loss_forward(logprobs, old_logprobs, advantages, mask, policy_formula(clip_low, clip_high, dual_clip),
                              agg, 5);
}

// d loss / d logprobs (agg is carried by row_weights and not read).
at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& row_weights,
                               double clip_low, double clip_high, std::optional<double> dual_clip, int64_t /*agg*/) {
  return clipped_loss_backward(grad_loss, logprobs, old_logprobs, advantages, mask, row_weights,
                               policy_formula(clip_low, clip_high, dual_clip));
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("ppo_policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, float clip_low, "
        "float clip_high, float? dual_clip, int agg) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor row_weights, float clip_low, float clip_high, float? dual_clip, int agg) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &cai::ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &cai::ppo_policy_loss_bwd);
}

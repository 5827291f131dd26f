// The clipped PPO losses (policy and value): forward (one read of the inputs; per-row partial sums
// merged in row order, so the result does not depend on the thread count) and backward (one read,
// one write). Both losses share everything but the per-token formula.
//
// Aggregation (agg): 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum. The forward returns
// the per-row weight w_b with loss = sum_b w_b * sum_t loss_bt, which is all the backward needs:
//   token-mean: 1 / N    seq-mean-token-mean: 1 / (n_b R)    seq-mean-token-sum: 1 / R
// (N response tokens, n_b in row b, R rows with n_b > 0; rows without response tokens weigh 0).
//
// Ties follow torch.maximum / torch.minimum: the gradient is split evenly between equal branches.
#include <torch/library.h>

#include <array>

#include "kl_math.h"

namespace cai {
namespace {

constexpr double kLogRatioLimit = 20.0;  // reference/ppo.py LOG_RATIO_LIMIT
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };
enum LossKind : int64_t { kPolicy = 0, kValue = 1 };

// policy: (x, y, z) = (logprobs, old_logprobs, advantages), p0 = 1 - clip_low, p1 = 1 + clip_high,
//         p2 = dual-clip bound c (<= 0: none)
// value:  (x, y, z) = (values, old_values, returns), p0 = clip (< 0: none)
struct LossParams {
  int64_t kind;
  double p0, p1, p2;
};

// Per token: the loss, up to four statistics (policy: clipped, dual-clipped, k3 and k1 of
// KL(old || new); value: clipped) and d loss / d x.
template <typename V>
struct Token {
  V loss;
  std::array<V, 4> stats;
  V grad;
};

// d max(a, b) as torch.maximum: the larger branch's derivative, their mean on a tie.
template <typename V>
inline V max_grad(const V& a, const V& b, const V& da, const V& db) {
  return select(a > b, da, select(b > a, db, V(0.5) * (da + db)));
}

template <typename V>
inline Token<V> policy_token(const V& lp, const V& old, const V& adv, const LossParams& p) {
  const V raw = lp - old, limit(kLogRatioLimit);
  const V log_ratio = clamp(raw, V(0) - limit, limit);
  const V ratio = exp_of(log_ratio), lo(p.p0), hi(p.p1), neg_adv = V(0) - adv;
  const V unclipped = neg_adv * ratio, clipped = neg_adv * clamp(ratio, lo, hi);
  V loss = maximum(unclipped, clipped);
  V grad = max_grad(unclipped, clipped, unclipped, keep(both(ratio >= lo, ratio <= hi), unclipped));
  V dual_hit = V(0);
  if (p.p2 > 0.0) {
    const V bound = neg_adv * V(p.p2);
    const auto negative = adv < V(0);
    dual_hit = indicator(both(negative, loss > bound));
    // min(loss, bound) as torch.minimum, on the A < 0 tokens only
    grad = select(negative, select(loss < bound, grad, keep(loss == bound, V(0.5) * grad)), grad);
    loss = select(negative, minimum(loss, bound), loss);
  }
  grad = keep(both(raw >= V(0) - limit, raw <= limit), grad);
  return {loss, {indicator(clipped > unclipped), dual_hit, exp_minus_1_minus_x(log_ratio), V(0) - log_ratio}, grad};
}

template <typename V>
inline Token<V> value_token(const V& v, const V& old, const V& ret, const LossParams& p) {
  const V err = v - ret, unclipped = err * err;
  if (p.p0 < 0.0) return {V(0.5) * unclipped, {V(0), V(0), V(0), V(0)}, err};
  const V lo = old - V(p.p0), hi = old + V(p.p0);
  const V clipped_err = clamp(v, lo, hi) - ret, clipped = clipped_err * clipped_err;
  return {V(0.5) * maximum(unclipped, clipped), {indicator(clipped > unclipped), V(0), V(0), V(0)},
          max_grad(unclipped, clipped, err, keep(both(v >= lo, v <= hi), clipped_err))};
}

template <typename V>
inline Token<V> loss_token(const V& x, const V& y, const V& z, const LossParams& p) {
  return p.kind == kPolicy ? policy_token(x, y, z, p) : value_token(x, y, z, p);
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask) {
  for (const at::Tensor* t : {&x, &y, &z, &mask}) {
    TORCH_CHECK(t->dim() == 2 && t->sizes() == x.sizes() && (t->size(1) <= 1 || t->stride(1) == 1),
                "the loss inputs and mask must be (B, T) tensors of one shape with unit stride along T");
  }
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(),
              "the loss inputs must have one dtype");
}

// Calls f(b, x_row, y_row, z_row, mask_row) for every row b, in parallel.
template <typename F>
void for_each_row(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask, F&& f) {
  const int64_t B = x.size(0), T = x.size(1);
  dispatch_values_and_mask(x.scalar_type(), mask, [&](auto tag, const auto& ms) {
    using S = decltype(tag);
    const Rows<S> xs = rows_of<S>(x), ys = rows_of<S>(y), zs = rows_of<S>(z);
    at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) f(b, xs.row(b), ys.row(b), zs.row(b), ms.row(b));
    });
  });
}

template <typename P>
using Elem = std::remove_cv_t<std::remove_pointer_t<P>>;

// Per-row sums: [0] loss, [1] response tokens, [2..5] the statistics.
using RowSums = std::array<double, 6>;

// Row weights and the weighted loss; stats[1..] = sums[2..] / N. Returns (stats, weights).
std::tuple<at::Tensor, at::Tensor> finish(const std::vector<RowSums>& sums, int64_t agg, int n_stats,
                                          const at::TensorOptions& options) {
  const int64_t B = static_cast<int64_t>(sums.size());
  double tokens = 0.0, rows = 0.0;
  for (const RowSums& s : sums) {
    tokens += s[1];
    rows += s[1] > 0.0 ? 1.0 : 0.0;
  }
  at::Tensor weights = at::empty({B}, options.dtype(at::kDouble));
  double* w = weights.data_ptr<double>();
  std::vector<double> totals(n_stats, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const double n = sums[b][1];
    if (agg == kTokenMean) {
      w[b] = tokens > 0.0 ? 1.0 / tokens : 0.0;
    } else {
      w[b] = n == 0.0 ? 0.0 : (agg == kSeqMeanTokenMean ? 1.0 / (n * rows) : 1.0 / rows);
    }
    totals[0] += w[b] * sums[b][0];
    for (int i = 1; i < n_stats; ++i) totals[i] += sums[b][i + 1];
  }
  at::Tensor stats = at::empty({n_stats}, options.dtype(at::kDouble));
  double* st = stats.data_ptr<double>();
  st[0] = totals[0];
  for (int i = 1; i < n_stats; ++i) st[i] = tokens > 0.0 ? totals[i] / tokens : 0.0;
  const at::ScalarType dtype = options.dtype().toScalarType();
  return {stats.to(dtype), weights.to(dtype)};
}

// Returns (stats, row_weights): stats = [loss, clipfrac, dual_clipfrac, approx_kl, approx_kl_k1] for
// the policy loss, [loss, clipfrac] for the value loss; fp32 (fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor> ppo_loss_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                                                const at::Tensor& mask, int64_t kind, double p0, double p1, double p2,
                                                int64_t agg) {
  check_inputs(x, y, z, mask);
  const LossParams p{kind, p0, p1, p2};
  const int64_t B = x.size(0), T = x.size(1);
  std::vector<RowSums> sums(B);
  for_each_row(x, y, z, mask, [&](int64_t b, const auto* xr, const auto* yr, const auto* zr, const auto* mr) {
    using S = Elem<decltype(xr)>;
    std::array<LaneSum, 6> row{};
    walk_row<S>(T, [&](int64_t t, int64_t n) {
      const auto m = mask_lanes<S>(mr + t, n);
      const auto token = loss_token(load_lanes(xr + t, n), load_lanes(yr + t, n), load_lanes(zr + t, n), p);
      row[0].add(keep(m, token.loss));
      row[1].add(indicator(m));
      for (int i = 0; i < 4; ++i) row[2 + i].add(keep(m, token.stats[i]));
    });
    for (int i = 0; i < 6; ++i) sums[b][i] = row[i].value();
  });
  const auto options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return finish(sums, agg, kind == kPolicy ? 5 : 2, options);
}

// grad_loss: 0-d; row_weights (B,) from the forward. Returns d loss / d x, (B, T) contiguous, x's
// dtype, 0 on masked positions.
at::Tensor ppo_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                        const at::Tensor& mask, const at::Tensor& row_weights, int64_t kind, double p0, double p1,
                        double p2) {
  check_inputs(x, y, z, mask);
  const int64_t B = x.size(0), T = x.size(1);
  TORCH_CHECK(row_weights.numel() == B && row_weights.is_contiguous(), "row_weights must be (B,) contiguous");
  const LossParams p{kind, p0, p1, p2};
  const double g = grad_loss.item<double>();
  const at::Tensor weights = row_weights.to(at::kDouble);
  const double* w = weights.const_data_ptr<double>();
  at::Tensor grad = at::empty({B, T}, x.options());
  for_each_row(x, y, z, mask, [&](int64_t b, const auto* xr, const auto* yr, const auto* zr, const auto* mr) {
    using S = Elem<decltype(xr)>;
    const Lanes<S> scale(g * w[b]);
    S* out = grad.data_ptr<S>() + b * T;
    walk_row<S>(T, [&](int64_t t, int64_t n) {
      const auto token = loss_token(load_lanes(xr + t, n), load_lanes(yr + t, n), load_lanes(zr + t, n), p);
      store_lanes<S>(out + t, keep(mask_lanes<S>(mr + t, n), scale * token.grad), n);
    });
  });
  return grad;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("ppo_loss_fwd(Tensor x, Tensor y, Tensor z, Tensor mask, int kind, float p0, float p1, float p2, int agg) "
        "-> (Tensor, Tensor)");
  m.def("ppo_loss_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor z, Tensor mask, Tensor row_weights, int kind, "
        "float p0, float p1, float p2) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("ppo_loss_fwd", &cai::ppo_loss_fwd);
  m.impl("ppo_loss_bwd", &cai::ppo_loss_bwd);
}

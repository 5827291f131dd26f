// The PPO clipped losses' shared machinery (ppo_policy_loss.cpp, ppo_value_loss.cpp): the row loops around
// a per-token formula, forward (one read of the inputs; per-row partial sums merged in row order, so the
// result does not depend on the thread count) and backward (one read, one write), and the aggregation.
//
// A per-token formula is a callable token(x, y, z) over Lanes (SIMD floats or one double, see "one
// formula, two forms" in masked_rows.h) returning a Token: the loss, up to four statistics and d loss / d x.
//
// Aggregation (Agg): the forward returns the per-row weight w_b with loss = sum_b w_b * sum_t loss_bt,
// which is all the backward needs:
//   token-mean: 1 / N    seq-mean-token-mean: 1 / (n_b R)    seq-mean-token-sum: 1 / R
// (N response tokens, n_b in row b, R rows with n_b > 0; rows without response tokens weigh 0).
//
// Ties follow torch.maximum / torch.minimum: the gradient is split evenly between equal branches (and goes
// whole to both where one is NaN).
#pragma once

#include <array>

#include "masked_rows.h"

namespace cai {

// Mirrors Agg in cai_kernels/_params.py.
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

template <typename V>
struct Token {
  V loss;
  std::array<V, 4> stats;
  V grad;
};

// d max(a, b) as torch.maximum: the larger branch's derivative, their mean on a tie, their sum when either
// is NaN (neither is smaller: autograd passes the gradient to both).
template <typename V>
inline V max_grad(const V& a, const V& b, const V& da, const V& db) {
  return select(a > b, da, select(b > a, db, select(a == b, V(0.5) * (da + db), da + db)));
}

inline void check_loss_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask) {
  for (const at::Tensor* t : {&x, &y, &z, &mask}) {
    TORCH_CHECK(t->dim() == 2 && t->sizes() == x.sizes() && (t->size(1) <= 1 || t->stride(1) == 1),
                "the loss inputs and mask must be (B, T) tensors of one shape with unit stride along T");
  }
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(),
              "the loss inputs must have one dtype");
}

// Calls f(b, x_row, y_row, z_row, mask_row) for every row b, in parallel.
template <typename F>
void for_each_loss_row(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask, F&& f) {
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
using ElemOf = std::remove_cv_t<std::remove_pointer_t<P>>;

// Per-row sums: [0] loss, [1] response tokens, [2..5] the statistics.
using RowSums = std::array<double, 6>;

// Row weights and the weighted loss; stats = sums[2..] / N. Returns (loss 0-d, stats (n_stats - 1,), weights):
// three tensors, so that autograd hands the loss's gradient to the backward as it is (no select).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_loss(const std::vector<RowSums>& sums, int64_t agg,
                                                                  int n_stats, const at::TensorOptions& options) {
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
  const at::ScalarType dtype = options.dtype().toScalarType();
  at::Tensor loss = at::empty({}, options.dtype(dtype));
  at::Tensor stats = at::empty({n_stats - 1}, options.dtype(dtype));
  if (dtype == at::kDouble) {
    loss.data_ptr<double>()[0] = totals[0];
    for (int i = 1; i < n_stats; ++i) stats.data_ptr<double>()[i - 1] = tokens > 0.0 ? totals[i] / tokens : 0.0;
  } else {
    loss.data_ptr<float>()[0] = static_cast<float>(totals[0]);
    for (int i = 1; i < n_stats; ++i) {
      stats.data_ptr<float>()[i - 1] = static_cast<float>(tokens > 0.0 ? totals[i] / tokens : 0.0);
    }
  }
  return {loss, stats, weights.to(dtype)};
}

// Returns (loss, stats, row_weights): the 0-d loss, the n_stats - 1 statistics, fp32 (fp64 for fp64 inputs).
template <typename TokenFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> clipped_loss_forward(const at::Tensor& x, const at::Tensor& y,
                                                                    const at::Tensor& z, const at::Tensor& mask,
                                                                    const TokenFn& token, int64_t agg, int n_stats) {
  check_loss_inputs(x, y, z, mask);
  TORCH_CHECK(agg == kTokenMean || agg == kSeqMeanTokenMean || agg == kSeqMeanTokenSum, "agg must be 0, 1 or 2");
  const int64_t B = x.size(0), T = x.size(1);
  std::vector<RowSums> sums(B);
  for_each_loss_row(x, y, z, mask, [&](int64_t b, const auto* xr, const auto* yr, const auto* zr, const auto* mr) {
    using S = ElemOf<decltype(xr)>;
    std::array<LaneSum, 6> row{};
    walk_row<S>(T, [&](int64_t t, int64_t n) {
      const auto m = mask_lanes<S>(mr + t, n);
      const auto out = token(load_lanes(xr + t, n), load_lanes(yr + t, n), load_lanes(zr + t, n));
      row[0].add(keep(m, out.loss));
      row[1].add(indicator(m));
      for (int i = 0; i < 4; ++i) row[2 + i].add(keep(m, out.stats[i]));
    });
    for (int i = 0; i < 6; ++i) sums[b][i] = row[i].value();
  });
  return finish_loss(sums, agg, n_stats, acc_options(x));
}

// grad_loss: 0-d; row_weights (B,) from the forward. Returns d loss / d x, (B, T) contiguous, x's dtype,
// 0 on masked positions.
template <typename TokenFn>
at::Tensor clipped_loss_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                                 const at::Tensor& z, const at::Tensor& mask, const at::Tensor& row_weights,
                                 const TokenFn& token) {
  check_loss_inputs(x, y, z, mask);
  const int64_t B = x.size(0), T = x.size(1);
  TORCH_CHECK(row_weights.numel() == B && row_weights.is_contiguous(), "row_weights must be (B,) contiguous");
  const double g = grad_loss.item<double>();
  const at::Tensor weights = row_weights.to(at::kDouble);
  const double* w = weights.const_data_ptr<double>();
  at::Tensor grad = at::empty({B, T}, x.options());
  for_each_loss_row(x, y, z, mask, [&](int64_t b, const auto* xr, const auto* yr, const auto* zr, const auto* mr) {
    using S = ElemOf<decltype(xr)>;
    const Lanes<S> scale(g * w[b]);
    S* out = grad.data_ptr<S>() + b * T;
    walk_row<S>(T, [&](int64_t t, int64_t n) {
      const auto d = token(load_lanes(xr + t, n), load_lanes(yr + t, n), load_lanes(zr + t, n));
      store_lanes<S>(out + t, keep(mask_lanes<S>(mr + t, n), scale * d.grad), n);
    });
  });
  return grad;
}

}  // namespace cai

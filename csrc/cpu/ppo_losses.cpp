// ppo_policy_loss and ppo_value_loss: forward (one read of the inputs, per-row partial sums merged in
// row order, so the result does not depend on the thread count) and backward (one read, one write).
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

constexpr float kLogRatioLimit = 20.f;  // reference/ppo.py LOG_RATIO_LIMIT
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

inline Vec select(const Vec& cond, const Vec& if_true, const Vec& if_false) { return Vec::blendv(if_false, if_true, cond); }

// One of the two maxima / minima in the losses: d max(a, b) = da, db or their mean on a tie.
inline Vec max_grad(const Vec& a, const Vec& b, const Vec& da, const Vec& db) {
  return select(a > b, da, select(b > a, db, Vec(0.5f) * (da + db)));
}
template <typename A>
inline A max_grad(A a, A b, A da, A db) {
  return a > b ? da : (b > a ? db : A(0.5) * (da + db));
}

struct PolicyParams {
  double ratio_lo, ratio_hi, dual;  // ratio clip range [1 - clip_low, 1 + clip_high], dual clip bound c
  bool has_dual;
};

// Per-token loss, branch indicators and d loss / d logprobs (before the row weight).
struct PolicyToken {
  Vec loss, clipped, dual_hit, log_ratio, grad;
};

template <bool kGrad>
inline PolicyToken policy_token(const Vec& lp, const Vec& old, const Vec& adv, const PolicyParams& p) {
  const Vec raw = lp - old;
  const Vec log_ratio = at::vec::clamp(raw, Vec(-kLogRatioLimit), Vec(kLogRatioLimit));
  const Vec ratio = exp_fast(log_ratio);
  const Vec neg_adv = adv.neg();
  const Vec lo(static_cast<float>(p.ratio_lo)), hi(static_cast<float>(p.ratio_hi));
  const Vec unclipped = neg_adv * ratio;
  const Vec clipped = neg_adv * at::vec::clamp(ratio, lo, hi);
  const Vec loss = at::vec::maximum(unclipped, clipped);
  PolicyToken out{loss, clipped > unclipped, Vec(0.f), log_ratio, Vec(0.f)};
  Vec grad;
  if (kGrad) grad = max_grad(unclipped, clipped, unclipped, unclipped & ((ratio >= lo) & (ratio <= hi)));
  if (p.has_dual) {
    const Vec bound = neg_adv * Vec(static_cast<float>(p.dual));
    const Vec negative = adv < Vec(0.f);
    out.dual_hit = negative & (loss > bound);
    out.loss = select(negative, at::vec::minimum(loss, bound), loss);
    if (kGrad) grad = select(negative, select(loss < bound, grad, Vec(0.5f) * grad & (loss == bound)), grad);
  }
  if (kGrad) out.grad = grad & ((raw >= Vec(-kLogRatioLimit)) & (raw <= Vec(kLogRatioLimit)));
  return out;
}

template <typename A>
struct PolicyTokenScalar {
  A loss, clipped, dual_hit, log_ratio, grad;
};

template <typename A>
inline PolicyTokenScalar<A> policy_token(A lp, A old, A adv, const PolicyParams& p) {
  const A raw = lp - old, limit = kLogRatioLimit;
  const A log_ratio = std::min(std::max(raw, -limit), limit);
  const A ratio = std::exp(log_ratio), lo = p.ratio_lo, hi = p.ratio_hi;
  const A unclipped = -adv * ratio, clipped = -adv * std::min(std::max(ratio, lo), hi);
  const A loss = std::max(unclipped, clipped);
  PolicyTokenScalar<A> out{loss, A(clipped > unclipped), A(0), log_ratio, A(0)};
  A grad = max_grad(unclipped, clipped, unclipped, ratio >= lo && ratio <= hi ? unclipped : A(0));
  if (p.has_dual && adv < A(0)) {
    const A bound = -adv * A(p.dual);
    out.dual_hit = A(loss > bound);
    out.loss = std::min(loss, bound);
    grad = loss < bound ? grad : (loss == bound ? A(0.5) * grad : A(0));
  }
  out.grad = raw >= -limit && raw <= limit ? grad : A(0);
  return out;
}

struct ValueParams {
  double clip;
  bool has_clip;
};

struct ValueToken {
  Vec loss, clipped, grad;
};

template <bool kGrad>
inline ValueToken value_token(const Vec& v, const Vec& old, const Vec& ret, const ValueParams& p) {
  const Vec err = v - ret;
  const Vec unclipped = err * err;
  if (!p.has_clip) return {Vec(0.5f) * unclipped, Vec(0.f), err};
  const Vec clip(static_cast<float>(p.clip));
  const Vec lo = old - clip, hi = old + clip;
  const Vec clipped_err = at::vec::clamp(v, lo, hi) - ret;
  const Vec clipped = clipped_err * clipped_err;
  ValueToken out{Vec(0.5f) * at::vec::maximum(unclipped, clipped), clipped > unclipped, Vec(0.f)};
  if (kGrad) out.grad = max_grad(unclipped, clipped, err, clipped_err & ((v >= lo) & (v <= hi)));
  return out;
}

template <typename A>
inline std::array<A, 3> value_token(A v, A old, A ret, const ValueParams& p) {  // loss, clipped, grad
  const A err = v - ret, unclipped = err * err;
  if (!p.has_clip) return {A(0.5) * unclipped, A(0), err};
  const A lo = old - A(p.clip), hi = old + A(p.clip);
  const A clipped_err = std::min(std::max(v, lo), hi) - ret, clipped = clipped_err * clipped_err;
  return {A(0.5) * std::max(unclipped, clipped), A(clipped > unclipped),
          max_grad(unclipped, clipped, err, v >= lo && v <= hi ? clipped_err : A(0))};
}

// Per-row sums: [0] loss, [1] response tokens, then op-specific statistics.
constexpr int kSums = 6;
using RowSums = std::array<double, kSums>;

// Applies `token` to every response token of every row; `token(lp, old, adv, mask, n, sums)` for
// vectors and the scalar path are supplied by the op.
template <typename RowFn>
std::vector<RowSums> row_sums(int64_t B, int64_t T, RowFn&& row_fn) {
  std::vector<RowSums> sums(B);
  at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) sums[b] = row_fn(b);
  });
  return sums;
}

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
  double loss = 0.0;
  std::vector<double> totals(n_stats, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const double n = sums[b][1];
    if (agg == kTokenMean) {
      w[b] = tokens > 0.0 ? 1.0 / tokens : 0.0;
    } else {
      w[b] = n == 0.0 ? 0.0 : (agg == kSeqMeanTokenMean ? 1.0 / (n * rows) : 1.0 / rows);
    }
    loss += w[b] * sums[b][0];
    for (int i = 1; i < n_stats; ++i) totals[i] += sums[b][i + 1];
  }
  at::Tensor stats = at::empty({n_stats}, options.dtype(at::kDouble));
  double* st = stats.data_ptr<double>();
  st[0] = loss;
  for (int i = 1; i < n_stats; ++i) st[i] = tokens > 0.0 ? totals[i] / tokens : 0.0;
  const at::ScalarType dtype = options.dtype().toScalarType();
  return {stats.to(dtype), weights.to(dtype)};
}

void check_inputs(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors, const at::Tensor& mask) {
  const at::Tensor& first = *tensors.begin()->first;
  TORCH_CHECK(first.dim() == 2, "expected (B, T) tensors");
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->sizes() == first.sizes() && t->scalar_type() == first.scalar_type() &&
                    (t->size(1) <= 1 || t->stride(1) == 1),
                name, " must be (B, T) like the first input, of the same dtype, with unit stride along T");
  }
  TORCH_CHECK(mask.sizes() == first.sizes() && (mask.size(1) <= 1 || mask.stride(1) == 1),
              "mask must be (B, T) with unit stride along T");
}

at::TensorOptions acc_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// Walks one row in kLanes steps; f(x0, x1, x2, m, grad_out_offset) gets three input vectors and
// the mask vector (tail lanes off).
template <typename T, typename M, typename F>
inline void for_each_vector(const T* x0, const T* x1, const T* x2, const M* mask, int64_t T_len, F&& f) {
  int64_t t = 0;
  for (; t + kLanes <= T_len; t += kLanes) {
    f(load_floats(x0 + t), load_floats(x1 + t), load_floats(x2 + t), mask_vec(mask + t), t, kLanes);
  }
  if (t < T_len) {
    const int64_t n = T_len - t;
    f(load_floats(x0 + t, n), load_floats(x1 + t, n), load_floats(x2 + t, n), mask_vec(mask + t, n), t, n);
  }
}

template <typename T>
inline void store_floats(T* dst, const Vec& x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) {
      x.store(dst);
    } else {
      x.store(dst, n);
    }
  } else {
    alignas(64) float buf[kLanes];
    x.store(buf);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}

// ---- policy loss ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       double clip_low, double clip_high, double dual_clip,
                                                       int64_t agg) {
  check_inputs({{&logprobs, "logprobs"}, {&old_logprobs, "old_logprobs"}, {&advantages, "advantages"}}, mask);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const PolicyParams p{1.0 - clip_low, 1.0 + clip_high, dual_clip, dual_clip > 0.0};
  std::vector<RowSums> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "ppo_policy_loss_fwd", [&] {
    const Rows<scalar_t> lp = rows_of<scalar_t>(logprobs), old = rows_of<scalar_t>(old_logprobs);
    const Rows<scalar_t> adv = rows_of<scalar_t>(advantages);
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      sums = row_sums(B, T, [&](int64_t b) {
        RowSums s{};
        if constexpr (std::is_same_v<scalar_t, double>) {
          const M* m = ms.row(b);
          for (int64_t t = 0; t < T; ++t) {
            if (m[t] == M(0)) continue;
            const auto tok = policy_token<double>(lp.row(b)[t], old.row(b)[t], adv.row(b)[t], p);
            s[0] += tok.loss, s[1] += 1.0, s[2] += tok.clipped, s[3] += tok.dual_hit;
            s[4] += std::expm1(tok.log_ratio) - tok.log_ratio, s[5] -= tok.log_ratio;
          }
        } else {
          LaneSum loss, count, clipped, dual, kl3, kl1;
          for_each_vector(lp.row(b), old.row(b), adv.row(b), ms.row(b), T,
                          [&](const Vec& x, const Vec& o, const Vec& a, const Vec& m, int64_t, int64_t) {
                            const PolicyToken tok = policy_token<false>(x, o, a, p);
                            loss.add(tok.loss & m);
                            count.add(ones_where(m));
                            clipped.add(ones_where(tok.clipped & m));
                            dual.add(ones_where(tok.dual_hit & m));
                            kl3.add(exp_minus_1_minus_x(tok.log_ratio) & m);
                            kl1.add(tok.log_ratio.neg() & m);
                          });
          s = {loss.value(), count.value(), clipped.value(), dual.value(), kl3.value(), kl1.value()};
        }
        return s;
      });
    });
  });
  return finish(sums, agg, 5, acc_options(logprobs));
}

// grad_loss: 0-d; row_weights (B,) from the forward. Returns d loss / d logprobs, (B, T) contiguous,
// logprobs' dtype, 0 on masked positions.
at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& row_weights,
                               double clip_low, double clip_high, double dual_clip) {
  check_inputs({{&logprobs, "logprobs"}, {&old_logprobs, "old_logprobs"}, {&advantages, "advantages"}}, mask);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  TORCH_CHECK(row_weights.numel() == B && row_weights.is_contiguous(), "row_weights must be (B,) contiguous");
  const PolicyParams p{1.0 - clip_low, 1.0 + clip_high, dual_clip, dual_clip > 0.0};
  const double g = grad_loss.item<double>();
  const at::Tensor weights = row_weights.to(at::kDouble);
  const double* w = weights.const_data_ptr<double>();
  at::Tensor grad = at::empty({B, T}, logprobs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "ppo_policy_loss_bwd", [&] {
    const Rows<scalar_t> lp = rows_of<scalar_t>(logprobs), old = rows_of<scalar_t>(old_logprobs);
    const Rows<scalar_t> adv = rows_of<scalar_t>(advantages);
    scalar_t* out = grad.data_ptr<scalar_t>();
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* o = out + b * T;
          if constexpr (std::is_same_v<scalar_t, double>) {
            const M* m = ms.row(b);
            for (int64_t t = 0; t < T; ++t) {
              o[t] = m[t] == M(0) ? 0.0 : g * w[b] * policy_token<double>(lp.row(b)[t], old.row(b)[t], adv.row(b)[t], p).grad;
            }
          } else {
            const Vec scale(static_cast<float>(g * w[b]));
            for_each_vector(lp.row(b), old.row(b), adv.row(b), ms.row(b), T,
                            [&](const Vec& x, const Vec& ol, const Vec& a, const Vec& m, int64_t t, int64_t n) {
                              store_floats(o + t, (scale * policy_token<true>(x, ol, a, p).grad) & m, n);
                            });
          }
        }
      });
    });
  });
  return grad;
}

// ---- value loss ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask, double clip,
                                                      int64_t agg) {
  check_inputs({{&values, "values"}, {&old_values, "old_values"}, {&returns, "returns"}}, mask);
  const int64_t B = values.size(0), T = values.size(1);
  const ValueParams p{clip, clip >= 0.0};
  std::vector<RowSums> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "ppo_value_loss_fwd", [&] {
    const Rows<scalar_t> vs = rows_of<scalar_t>(values), old = rows_of<scalar_t>(old_values);
    const Rows<scalar_t> rs = rows_of<scalar_t>(returns);
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      sums = row_sums(B, T, [&](int64_t b) {
        RowSums s{};
        if constexpr (std::is_same_v<scalar_t, double>) {
          const M* m = ms.row(b);
          for (int64_t t = 0; t < T; ++t) {
            if (m[t] == M(0)) continue;
            const auto tok = value_token<double>(vs.row(b)[t], old.row(b)[t], rs.row(b)[t], p);
            s[0] += tok[0], s[1] += 1.0, s[2] += tok[1];
          }
        } else {
          LaneSum loss, count, clipped;
          for_each_vector(vs.row(b), old.row(b), rs.row(b), ms.row(b), T,
                          [&](const Vec& v, const Vec& o, const Vec& r, const Vec& m, int64_t, int64_t) {
                            const ValueToken tok = value_token<false>(v, o, r, p);
                            loss.add(tok.loss & m);
                            count.add(ones_where(m));
                            clipped.add(ones_where(tok.clipped & m));
                          });
          s[0] = loss.value(), s[1] = count.value(), s[2] = clipped.value();
        }
        return s;
      });
    });
  });
  return finish(sums, agg, 2, acc_options(values));
}

at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                              const at::Tensor& returns, const at::Tensor& mask, const at::Tensor& row_weights,
                              double clip) {
  check_inputs({{&values, "values"}, {&old_values, "old_values"}, {&returns, "returns"}}, mask);
  const int64_t B = values.size(0), T = values.size(1);
  TORCH_CHECK(row_weights.numel() == B && row_weights.is_contiguous(), "row_weights must be (B,) contiguous");
  const ValueParams p{clip, clip >= 0.0};
  const double g = grad_loss.item<double>();
  const at::Tensor weights = row_weights.to(at::kDouble);
  const double* w = weights.const_data_ptr<double>();
  at::Tensor grad = at::empty({B, T}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "ppo_value_loss_bwd", [&] {
    const Rows<scalar_t> vs = rows_of<scalar_t>(values), old = rows_of<scalar_t>(old_values);
    const Rows<scalar_t> rs = rows_of<scalar_t>(returns);
    scalar_t* out = grad.data_ptr<scalar_t>();
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* o = out + b * T;
          if constexpr (std::is_same_v<scalar_t, double>) {
            const M* m = ms.row(b);
            for (int64_t t = 0; t < T; ++t) {
              o[t] = m[t] == M(0) ? 0.0 : g * w[b] * value_token<double>(vs.row(b)[t], old.row(b)[t], rs.row(b)[t], p)[2];
            }
          } else {
            const Vec scale(static_cast<float>(g * w[b]));
            for_each_vector(vs.row(b), old.row(b), rs.row(b), ms.row(b), T,
                            [&](const Vec& v, const Vec& ol, const Vec& r, const Vec& m, int64_t t, int64_t n) {
                              store_floats(o + t, (scale * value_token<true>(v, ol, r, p).grad) & m, n);
                            });
          }
        }
      });
    });
  });
  return grad;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("ppo_policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, float clip_low, "
        "float clip_high, float dual_clip, int agg) -> (Tensor, Tensor)");
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor row_weights, float clip_low, float clip_high, float dual_clip) -> Tensor");
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, int agg) "
        "-> (Tensor, Tensor)");
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
        "Tensor row_weights, float clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &cai::ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &cai::ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &cai::ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &cai::ppo_value_loss_bwd);
}

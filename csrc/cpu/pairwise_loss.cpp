// pairwise_loss: the soft-label Bradley–Terry loss of a preference model, forward and backward.
//
// Per pair, with d = chosen - rejected - margin and p = P(chosen preferred):
//   loss  = -(p logsigmoid(d) + (1 - p) logsigmoid(-d)) = p softplus(-d) + (1 - p) softplus(d)
//         = log1p(e^-|d|) + d * (d > 0 ? 1 - p : -p)        (both terms >= 0: no cancellation)
//   dloss/dd = sigmoid(d) - p = (1 - p) sigmoid(d) - p sigmoid(-d)
// d is carried as h = d / 2 = chosen / 2 - rejected / 2 - margin / 2 (the same rounding as d, halved):
// chosen - rejected of two finite rewards (3e38, -3e38) overflows fp32, h never does, and d * coef =
// 2 (h * coef) is inf only when the loss itself is. A term whose weight is 0 contributes 0, also at
// d = +-inf (0 log 0 = 0, as the reference).
// Rows are read one SIMD vector at a time in the accumulation type; threads take blocks of kBlock rows.
// Sums go through per-block partials in double, added in block order, so the result does not depend on
// the thread count.
#include <torch/library.h>

#include <vector>

#include "errors.h"
#include "logistic.h"

namespace cai {
namespace {

constexpr int64_t kBlock = 1024;
constexpr int64_t kGrainBlocks = 8;  // ~8k rows per task: below that, threading costs more than it saves
// Mirrors Reduction in cai_kernels/_params.py.
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

// count <= V::size() values of type T as a vector of Acc (zeros past count).
template <typename Acc, typename T>
inline VecOf<Acc> load_as(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, Acc>) {
    return VecOf<Acc>::loadu(p, count);
  } else {
    __at_align__ Acc values[VecOf<Acc>::size()] = {};
    for (int64_t i = 0; i < count; ++i) values[i] = static_cast<Acc>(p[i]);
    return VecOf<Acc>::loadu(values);
  }
}

// Stores the first count lanes of v as T (one rounding from Acc).
template <typename T, typename Acc>
inline void store_as(T* p, const VecOf<Acc>& v, int64_t count) {
  if constexpr (std::is_same_v<T, Acc>) {
    v.store(p, count);
  } else {
    __at_align__ Acc values[VecOf<Acc>::size()];
    v.store(values);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(values[i]);
  }
}

template <typename T, typename Acc>
struct PairInputs {
  using V = VecOf<Acc>;
  const T* chosen;
  const T* rejected;
  const Acc* labels;  // nullptr: every row has label_value
  Acc label_value;
  const Acc* margin;  // nullptr: every row has margin_value
  Acc margin_value;

  // h = d / 2 and p of rows [row, row + count), count <= V::size(); lanes past count hold h = -margin / 2,
  // p = 0 or the label value (callers mask them out).
  void load(int64_t row, int64_t count, V& h, V& p) const {
    const V half(Acc(0.5));
    h = load_as<Acc>(chosen + row, count) * half - load_as<Acc>(rejected + row, count) * half;
    h = h - (margin ? V::loadu(margin + row, count) : V(margin_value)) * half;
    p = labels ? V::loadu(labels + row, count) : V(label_value);
  }

  // The first of rows [row, row + count) whose label is outside [0, 1] (NaN included), or -1.
  int64_t bad_label(int64_t row, int64_t count, const V& p) const {
    const int mask = ((p >= V(0)) & (p <= V(1))).zero_mask();  // bit set: comparison false
    if (labels == nullptr || (mask & ((1 << count) - 1)) == 0) return -1;
    for (int64_t i = 0; i < count; ++i) {
      if (mask & (1 << i)) return row + i;
    }
    return -1;
  }
};

// The loss from h = d / 2, as its two parts: log1p(e^-|d|) in [0, log 2] and half the linear part,
// h * coef (the loss is bounded + 2 * half_linear).
template <typename V>
inline void pair_loss_parts(const V& h, const V& p, V& bounded, V& half_linear) {
  const V coef = V::blendv(V(0) - p, V(1) - p, h > V(0));
  half_linear = V::blendv(h * coef, V(0), coef == V(0));
  bounded = log1p_exp_neg_abs(h * V(2));
}

template <typename V>
inline V pair_loss_grad(const V& h, const V& p) {
  V sig, sig_neg;
  sigmoid_pair(h * V(2), sig, sig_neg);
  return (V(1) - p) * sig - p * sig_neg;
}

struct Shapes {
  int64_t n_rows;
  bool has_labels, has_margin;
};

Shapes check_inputs(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& labels,
                    const at::Tensor& margin) {
  TORCH_CHECK(chosen.dim() == 1 && chosen.is_contiguous() && rejected.is_contiguous() &&
                  rejected.sizes() == chosen.sizes() && rejected.scalar_type() == chosen.scalar_type(),
              "chosen and rejected must be contiguous 1-D tensors of one shape and dtype");
  const int64_t n = chosen.numel();
  const auto acc = chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&labels, &margin}) {
    TORCH_CHECK(t->numel() == 0 || (t->is_contiguous() && t->numel() == n && t->scalar_type() == acc),
                "labels and margin must be empty or contiguous, one per row, in the accumulation dtype");
  }
  return {n, labels.numel() > 0 && n > 0, margin.numel() > 0 && n > 0};
}

template <typename T, typename Acc = at::opmath_type<T>>
PairInputs<T, Acc> pair_inputs(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& labels,
                               const at::Tensor& margin, double label_value, double margin_value, const Shapes& s) {
  return {chosen.const_data_ptr<T>(), rejected.const_data_ptr<T>(),
          s.has_labels ? labels.const_data_ptr<Acc>() : nullptr, static_cast<Acc>(label_value),
          s.has_margin ? margin.const_data_ptr<Acc>() : nullptr, static_cast<Acc>(margin_value)};
}

// chosen, rejected: (N,) contiguous, fp32 / bf16 / fp16 / fp64. labels, margin: (N,) contiguous in the
// accumulation dtype, or empty; then the fields of PairwiseLossParams (cai_kernels/_params.py):
// label_value / margin_value for every row when labels / margin is empty, and the reduction. Returns
// the (N,) per-pair losses (kNone), or their sum (kSum) or mean (kMean) as a 0-d tensor; fp32 (fp64 for fp64).
at::Tensor pairwise_loss_fwd(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& labels,
                             const at::Tensor& margin, double label_value, double margin_value, int64_t reduction) {
  const Shapes s = check_inputs(chosen, rejected, labels, margin);
  TORCH_CHECK(reduction == kNone || reduction == kSum || reduction == kMean, "reduction must be 0, 1 or 2");
  const auto options = chosen.options().dtype(chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor out = reduction == kNone ? at::empty({s.n_rows}, options) : at::empty({}, options);
  const int64_t n_blocks = (s.n_rows + kBlock - 1) / kBlock;
  std::vector<double> block_sums(n_blocks, 0.0);
  FirstBadRow bad_label;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, chosen.scalar_type(), "pairwise_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = VecOf<acc_t>;
    const auto in = pair_inputs<scalar_t>(chosen, rejected, labels, margin, label_value, margin_value, s);
    acc_t* rows_out = reduction == kNone ? out.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const int64_t begin = block * kBlock, end = std::min(begin + kBlock, s.n_rows);
        // a few additions per lane in the working precision, the running total in double; the linear
        // parts (each up to FLT_MAX) are summed scaled by 2^-kLinearShift so that 8 per lane, and then
        // the lanes, never overflow where their double total would not
        constexpr int kLinearShift = 8;
        const V linear_scale(std::ldexp(acc_t(1), -kLinearShift));
        double total = 0.0;
        V bounded_sum(0), linear_sum(0);
        auto flush = [&] {
          total += vec_sum<acc_t>(bounded_sum) + std::ldexp(static_cast<double>(vec_sum<acc_t>(linear_sum)), kLinearShift + 1);
          bounded_sum = linear_sum = V(0);
        };
        for (int64_t row = begin; row < end; row += V::size()) {
          const int64_t count = std::min<int64_t>(V::size(), end - row);
          V h, p;
          in.load(row, count, h, p);
          if (s.has_labels) {
            const int64_t bad = in.bad_label(row, count, p);
            if (bad >= 0) bad_label.record(bad);
          }
          V bounded, half_linear;
          pair_loss_parts(h, p, bounded, half_linear);
          if (rows_out) {
            (bounded + half_linear * V(2)).store(rows_out + row, count);
          } else {
            bounded_sum = bounded_sum + V::set(V(0), bounded, count);
            linear_sum = linear_sum + V::set(V(0), half_linear * linear_scale, count);
            if (((row - begin) / V::size()) % 8 == 7) flush();
          }
        }
        flush();
        block_sums[block] = total;
      }
    });
  });
  const int64_t bad = bad_label.get();
  CAI_CHECK_VALUE(bad < 0, "soft_labels must lie in [0, 1]; got ", bad < 0 ? 0.0 : labels[bad].item<double>(),
                    " for pair ", bad);
  if (reduction != kNone) {
    double total = 0.0;
    for (double b : block_sums) total += b;
    // through a double tensor: a sum beyond the fp32 range rounds to inf (fill_ would refuse it)
    out.copy_(at::scalar_tensor(reduction == kMean ? total / static_cast<double>(s.n_rows) : total, at::kDouble));
  }
  return out;
}

// Gradients of pairwise_loss_fwd w.r.t. chosen and rejected ((N,), their dtype). grad is the (N,)
// upstream gradient for reduction 0, else a 0-d tensor (the gradient of the sum or mean).
std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd(const at::Tensor& grad, const at::Tensor& chosen,
                                                     const at::Tensor& rejected, const at::Tensor& labels,
                                                     const at::Tensor& margin, double label_value,
                                                     double margin_value, int64_t reduction) {
  const Shapes s = check_inputs(chosen, rejected, labels, margin);
  const auto acc = chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.scalar_type() == acc && grad.is_contiguous() &&
                  (reduction == kNone ? grad.numel() == s.n_rows : grad.numel() == 1),
              "grad must be contiguous, in the accumulation dtype, one per row (reduction 0) or one value");
  at::Tensor grad_chosen = at::empty_like(chosen), grad_rejected = at::empty_like(rejected);
  const int64_t n_blocks = (s.n_rows + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, chosen.scalar_type(), "pairwise_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = VecOf<acc_t>;
    const auto in = pair_inputs<scalar_t>(chosen, rejected, labels, margin, label_value, margin_value, s);
    const acc_t* grad_rows = reduction == kNone ? grad.const_data_ptr<acc_t>() : nullptr;
    const double upstream = reduction == kNone || s.n_rows == 0 ? 0.0 : grad.item<double>();
    const V scale(static_cast<acc_t>(reduction == kMean ? upstream / static_cast<double>(s.n_rows) : upstream));
    scalar_t* out_chosen = grad_chosen.data_ptr<scalar_t>();
    scalar_t* out_rejected = grad_rejected.data_ptr<scalar_t>();
    at::parallel_for(0, n_blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
      for (int64_t row = first * kBlock, end = std::min(last * kBlock, s.n_rows); row < end; row += V::size()) {
        const int64_t count = std::min<int64_t>(V::size(), end - row);
        V h, p;
        in.load(row, count, h, p);
        const V g = grad_rows ? V::loadu(grad_rows + row, count) : scale;
        const V grad = pair_loss_grad(h, p) * g;
        store_as(out_chosen + row, grad, count);
        store_as(out_rejected + row, V(0) - grad, count);
      }
    });
  });
  return {grad_chosen, grad_rejected};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("pairwise_loss_fwd(Tensor chosen, Tensor rejected, Tensor labels, Tensor margin, float label_value, "
        "float margin_value, int reduction) -> Tensor");
  m.def("pairwise_loss_bwd(Tensor grad, Tensor chosen, Tensor rejected, Tensor labels, Tensor margin, "
        "float label_value, float margin_value, int reduction) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("pairwise_loss_fwd", &cai::pairwise_loss_fwd);
  m.impl("pairwise_loss_bwd", &cai::pairwise_loss_bwd);
}

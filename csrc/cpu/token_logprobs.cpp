// token_logprobs: log p(target) (and the entropy) of softmax(logits / T) per row, without ever
// materializing a [rows, V] float copy. Forward: one read of the logits. Backward: one read of the
// logits and one write of the gradient, recomputing p from the saved per-row log-sum-exp.
#include <torch/library.h>

#include "softmax_rows.h"
#include "targets.h"

namespace cai {
namespace {

constexpr int64_t kChunk = 4096;  // elements per chunk: 16 KB of fp32, stays in L1 for the 2nd read

template <bool kEntropy, typename T, typename Acc = typename Accumulate<T>::type>
void forward_rows(const T* base, const RowLayout& layout, int64_t n_rows, int64_t V, const int64_t* targets,
                  Acc inv_t, const IgnoreIndex& ignored, Acc* logp, Acc* entropy, Acc* lse,
                  BadTarget& bad) {
  at::parallel_for(0, n_rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = targets[r];
      const bool skip = ignored(t);
      if (skip || t < 0 || t >= V) {
        if (!skip) bad.record(r);
        logp[r] = lse[r] = Acc(0);
        if (kEntropy) entropy[r] = Acc(0);
        continue;
      }
      const T* x = base + layout.offset(r);
      typename Accumulate<T>::softmax stats;
      for (int64_t c = 0; c < V; c += kChunk) stats.template update<kEntropy>(x + c, std::min(kChunk, V - c), inv_t);
      const Acc row_lse = stats.lse();
      lse[r] = row_lse;
      logp[r] = scaled(static_cast<Acc>(x[t]), inv_t) - row_lse;
      if (kEntropy) entropy[r] = stats.entropy();
    }
  });
}

// logits: (outer, inner, V) with stride(2) == 1; targets: (outer * inner,) int64; then the fields of
// TokenLogprobsParams (cai_kernels/_params.py). Returns (logp, entropy, lse), each (outer * inner,) fp32
// (fp64 for fp64 logits); entropy is empty without with_entropy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                  double temperature,
                                                                  std::optional<int64_t> ignore_index,
                                                                  bool with_entropy) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be a (outer, inner, V) row-contiguous view");
  TORCH_CHECK(targets.is_contiguous() && targets.scalar_type() == at::kLong && targets.numel() == logits.size(0) * logits.size(1),
              "targets must be contiguous int64 with one entry per row");
  const int64_t n_rows = targets.numel(), V = logits.size(2);
  auto acc = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty({n_rows}, acc), lse = at::empty({n_rows}, acc);
  at::Tensor entropy = at::empty({with_entropy ? n_rows : 0}, acc);
  const RowLayout layout(logits);
  const IgnoreIndex ignored(ignore_index);
  BadTarget bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    auto run = [&](auto entropy_tag) {
      forward_rows<decltype(entropy_tag)::value>(logits.const_data_ptr<scalar_t>(), layout, n_rows, V,
                                                 targets.const_data_ptr<int64_t>(), static_cast<acc_t>(1.0 / temperature),
                                                 ignored, logp.data_ptr<acc_t>(),
                                                 with_entropy ? entropy.data_ptr<acc_t>() : nullptr,
                                                 lse.data_ptr<acc_t>(), bad);
    };
    with_entropy ? run(std::true_type{}) : run(std::false_type{});
  });
  check_targets(bad, targets.const_data_ptr<int64_t>(), V);
  return {logp, entropy, lse};
}

template <bool kEntropy, typename T, typename Acc = typename Accumulate<T>::type>
void backward_rows(const T* base, const RowLayout& layout, int64_t n_rows, int64_t V, const int64_t* targets,
                   const Acc* grad_logp, const Acc* grad_entropy, const Acc* lse, const Acc* entropy, Acc inv_t,
                   const IgnoreIndex& ignored, T* grad) {
  at::parallel_for(0, n_rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* grad_row = grad + r * V;
      const int64_t t = targets[r];
      const Acc g = grad_logp[r], h = kEntropy ? grad_entropy[r] : Acc(0);
      if (ignored(t) || (g == Acc(0) && h == Acc(0))) {
        std::fill(grad_row, grad_row + V, static_cast<T>(0.f));
        continue;
      }
      const T* x = base + layout.offset(r);
      const Acc row_lse = lse[r];
      const Acc mu = kEntropy ? row_lse - entropy[r] : Acc(0);
      if (kEntropy && h != Acc(0)) {
        softmax_grad_chunk<true>(x, grad_row, V, inv_t, row_lse, mu, g, h);
      } else {
        softmax_grad_chunk<false>(x, grad_row, V, inv_t, row_lse, mu, g, Acc(0));
      }
      grad_row[t] = static_cast<T>(softmax_grad_at_target<Acc>(static_cast<Acc>(x[t]), inv_t, row_lse, mu, g, h));
    }
  });
}

// Gradient of token_logprobs_fwd w.r.t. logits: (outer, inner, V) contiguous, logits' dtype. The entropy
// term only with with_entropy (the caller clears it when no gradient flows into the entropy; grad_entropy
// is empty then).
at::Tensor token_logprobs_bwd(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                              const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                              double temperature, std::optional<int64_t> ignore_index, bool with_entropy) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be a (outer, inner, V) row-contiguous view");
  const int64_t n_rows = targets.numel(), V = logits.size(2);
  TORCH_CHECK(grad_logp.is_contiguous() && grad_logp.numel() == n_rows && grad_logp.scalar_type() == lse.scalar_type(),
              "grad_logp must be contiguous, of the forward's output dtype, with one entry per row");
  if (with_entropy) {
    TORCH_CHECK(grad_entropy.is_contiguous() && grad_entropy.numel() == n_rows && entropy.numel() == n_rows,
                "grad_entropy and entropy must have one entry per row");
  }
  at::Tensor grad = empty_huge_pages({logits.size(0), logits.size(1), V}, logits.options());
  const RowLayout layout(logits);
  const IgnoreIndex ignored(ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    auto run = [&](auto entropy_tag) {
      constexpr bool kEntropy = decltype(entropy_tag)::value;
      backward_rows<kEntropy>(logits.const_data_ptr<scalar_t>(), layout, n_rows, V, targets.const_data_ptr<int64_t>(),
                              grad_logp.const_data_ptr<acc_t>(),
                              kEntropy ? grad_entropy.const_data_ptr<acc_t>() : nullptr, lse.const_data_ptr<acc_t>(),
                              kEntropy ? entropy.const_data_ptr<acc_t>() : nullptr,
                              static_cast<acc_t>(1.0 / temperature), ignored, grad.data_ptr<scalar_t>());
    };
    with_entropy ? run(std::true_type{}) : run(std::false_type{});
  });
  return grad;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor targets, float temperature, int? ignore_index, bool with_entropy) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("token_logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor targets, Tensor lse, "
        "Tensor entropy, float temperature, int? ignore_index, bool with_entropy) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("token_logprobs_fwd", &cai::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &cai::token_logprobs_bwd);
}

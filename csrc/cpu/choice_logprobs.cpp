// choice_logprobs' option step, option_scores (the log-prob step is token_logprobs /
// linear_token_logprobs). Token log-probs are summed per option (a segment sum by option id, tokens in
// any order) and normalized over each question's options:
//   option_logprobs[q, k] = sum of log p over option (first[q] + k)'s tokens   (-inf for k >= n_q)
//   probs[q, k]           = softmax_k(option_logprobs[q, :n_q]), clamped      (0 for k >= n_q)
// Sizes are small (a few tokens per option, at most a few dozen options per question): one serial
// pass over the tokens, then the questions in parallel. Sums and softmax are taken in double.
#include <torch/library.h>

#include <vector>

#include "errors.h"
#include "vec_helpers.h"

namespace cai {
namespace {

template <typename Acc>
void normalize_questions(const std::vector<double>& sums, const std::vector<int64_t>& first, int64_t max_options,
                         bool has_clamp, double lo, double hi, Acc* option_logprobs, Acc* probs) {
  const int64_t num_questions = static_cast<int64_t>(first.size()) - 1;
  at::parallel_for(0, num_questions, 256, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = first[q + 1] - first[q];
      const double* scores = sums.data() + first[q];
      Acc* logp_row = option_logprobs + q * max_options;
      Acc* probs_row = probs + q * max_options;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < n; ++k) m = (scores[k] != scores[k] || m != m) ? NAN : std::max(m, scores[k]);
      double total = 0.0;
      for (int64_t k = 0; k < n; ++k) total += std::exp(scores[k] - m);  // all -inf: NaN, as torch.softmax
      for (int64_t k = 0; k < max_options; ++k) {
        if (k >= n) {
          logp_row[k] = -std::numeric_limits<Acc>::infinity();
          probs_row[k] = Acc(0);
          continue;
        }
        double p = std::exp(scores[k] - m) / total;
        if (has_clamp && p == p) p = std::min(std::max(p, lo), hi);
        logp_row[k] = static_cast<Acc>(scores[k]);
        probs_row[k] = static_cast<Acc>(p);
      }
    }
  });
}

// token_logprobs (N,) fp32 / fp64, option_ids (N,) int64, num_options (Q,) int64; then the fields of
// ChoiceLogprobsParams (cai_kernels/_params.py): the probabilities are clamped to [clamp_lo, clamp_hi]
// when both are given.
// Returns (option_logprobs (Q, K), probs (Q, K)) of token_logprobs' dtype with K = max(num_options),
// and option_slot (N,) int64: q * K + k of each token's option (what the backward gathers).
std::tuple<at::Tensor, at::Tensor, at::Tensor> option_scores(const at::Tensor& token_logprobs,
                                                             const at::Tensor& option_ids,
                                                             const at::Tensor& num_options,
                                                             std::optional<double> clamp_lo,
                                                             std::optional<double> clamp_hi) {
  TORCH_CHECK(clamp_lo.has_value() == clamp_hi.has_value(), "clamp_lo and clamp_hi must be both given or both None");
  TORCH_CHECK(token_logprobs.dim() == 1 && token_logprobs.is_contiguous() &&
                  (token_logprobs.scalar_type() == at::kFloat || token_logprobs.scalar_type() == at::kDouble),
              "token_logprobs must be a contiguous (N,) fp32 / fp64 tensor");
  TORCH_CHECK(option_ids.dim() == 1 && option_ids.is_contiguous() && option_ids.scalar_type() == at::kLong &&
                  option_ids.numel() == token_logprobs.numel(),
              "option_ids must be a contiguous (N,) int64 tensor");
  TORCH_CHECK(num_options.dim() == 1 && num_options.is_contiguous() && num_options.scalar_type() == at::kLong,
              "num_options must be a contiguous (Q,) int64 tensor");
  const int64_t num_tokens = option_ids.numel(), num_questions = num_options.numel();
  const int64_t* ids = option_ids.const_data_ptr<int64_t>();
  const int64_t* counts = num_options.const_data_ptr<int64_t>();

  std::vector<int64_t> first(num_questions + 1, 0);  // each question's first option
  int64_t max_options = 0;
  for (int64_t q = 0; q < num_questions; ++q) {
    CAI_CHECK_VALUE(counts[q] >= 1, "num_options must be >= 1 for every question; got num_options[", q,
                      "] = ", counts[q]);
    first[q + 1] = first[q] + counts[q];
    max_options = std::max(max_options, counts[q]);
  }
  const int64_t total_options = first[num_questions];

  std::vector<double> sums(total_options, 0.0);
  std::vector<int64_t> tokens_per_option(total_options, 0);
  AT_DISPATCH_FLOATING_TYPES(token_logprobs.scalar_type(), "option_scores", [&] {
    const scalar_t* logp = token_logprobs.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < num_tokens; ++i) {
      const int64_t o = ids[i];
      CAI_CHECK_VALUE(o >= 0 && o < total_options, "option_ids must lie in [0, ", total_options,
                        ") (O = num_options.sum()); got option_ids[", i, "] = ", o);
      sums[o] += static_cast<double>(logp[i]);
      ++tokens_per_option[o];
    }
  });
  for (int64_t o = 0; o < total_options; ++o) {
    CAI_CHECK_VALUE(tokens_per_option[o] >= 1, "every option must have at least one token; option ", o,
                      " has none (option_ids must cover [0, O), O = num_options.sum() = ", total_options, ")");
  }

  at::Tensor option_logprobs = at::empty({num_questions, max_options}, token_logprobs.options());
  at::Tensor probs = at::empty({num_questions, max_options}, token_logprobs.options());
  at::Tensor option_slot = at::empty({num_tokens}, option_ids.options());
  std::vector<int64_t> slot_of_option(total_options);
  for (int64_t q = 0; q < num_questions; ++q) {
    for (int64_t o = first[q]; o < first[q + 1]; ++o) slot_of_option[o] = q * max_options + (o - first[q]);
  }
  int64_t* slots = option_slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tokens; ++i) slots[i] = slot_of_option[ids[i]];

  AT_DISPATCH_FLOATING_TYPES(token_logprobs.scalar_type(), "option_scores", [&] {
    normalize_questions<scalar_t>(sums, first, max_options, clamp_lo.has_value(), clamp_lo.value_or(0.0),
                                  clamp_hi.value_or(1.0),
                                  option_logprobs.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>());
  });
  return {option_logprobs, probs, option_slot};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("option_scores(Tensor token_logprobs, Tensor option_ids, Tensor num_options, float? clamp_lo, "
        "float? clamp_hi) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) { m.impl("option_scores", &cai::option_scores); }

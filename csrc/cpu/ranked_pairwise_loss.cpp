// ranked_pairwise_loss: InstructGPT's loss over all pairs of K ranked responses, without a K x K matrix.
//
// Row b holds rewards r[0..K) ranked best first, n = num_valid[b] of them valid; with P = n (n - 1) / 2:
//   row_loss    = (1 / P) sum_{i < j < n} softplus(r_j - r_i)          (= -logsigmoid(r_i - r_j))
//   d/dr_k      = (g / P) [ sum_{i < k} sigmoid(r_k - r_i) - sum_{k < j < n} sigmoid(r_j - r_k) ]
// Each row is copied once into a K-element buffer in the accumulation type; the pair loops run on SIMD
// vectors over the second index. Work O(K^2) per row, memory O(K) per thread.
#include <torch/library.h>

#include <vector>

#include "errors.h"
#include "logistic.h"

namespace cai {
namespace {

inline int64_t num_pairs(int64_t n) { return n * (n - 1) / 2; }

void check_inputs(const at::Tensor& rewards, const at::Tensor& num_valid) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.is_contiguous(), "rewards must be a contiguous (B, K) tensor");
  TORCH_CHECK(num_valid.numel() == 0 || (num_valid.is_contiguous() && num_valid.numel() == rewards.size(0) &&
                                         num_valid.scalar_type() == at::kLong),
              "num_valid must be empty or (B,) contiguous int64");
}

// Rows handed to one thread at a time: ~2k pair evaluations.
inline int64_t ranked_row_grain(int64_t K) { return std::max<int64_t>(1, 2048 / std::max<int64_t>(K * K, 1)); }

// rewards: (B, K) contiguous, fp32 / bf16 / fp16 / fp64; num_valid: (B,) int64 in [0, K], or empty for K.
// Returns row_loss (B,) fp32 (fp64 for fp64); 0 for rows with fewer than two valid responses.
at::Tensor ranked_pairwise_loss_fwd(const at::Tensor& rewards, const at::Tensor& num_valid) {
  check_inputs(rewards, num_valid);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  const auto acc = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({B}, rewards.options().dtype(acc));
  const int64_t* valid = num_valid.numel() ? num_valid.const_data_ptr<int64_t>() : nullptr;
  FirstBadRow bad_row;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "ranked_pairwise_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // pairs in double whatever the input dtype: r_j - r_i of two finite fp32 rewards (3e38, -3e38) and the
    // sums of such pair losses overflow fp32, never double (the row's mean is rounded once at the end)
    using V = VecOf<double>;
    const scalar_t* base = rewards.const_data_ptr<scalar_t>();
    acc_t* out = row_loss.data_ptr<acc_t>();
    at::parallel_for(0, B, ranked_row_grain(K), [&](int64_t begin, int64_t end) {
      std::vector<double> r(K);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = valid ? valid[b] : K;
        if (n < 0 || n > K) {
          bad_row.record(b);
          out[b] = acc_t(0);
          continue;
        }
        for (int64_t k = 0; k < n; ++k) r[k] = static_cast<double>(base[b * K + k]);
        double total = 0.0;
        for (int64_t i = 0; i + 1 < n; ++i) {
          const V r_i(r[i]);
          V partial(0);
          for (int64_t j = i + 1; j < n; j += V::size()) {
            const int64_t count = std::min<int64_t>(V::size(), n - j);
            partial = partial + V::set(V(0), softplus(V::loadu(r.data() + j, count) - r_i), count);
          }
          total += vec_sum<double>(partial);
        }
        const double mean = n < 2 ? 0.0 : total / static_cast<double>(num_pairs(n));
        // beyond the fp32 range: inf, as the rounding of the mean (a plain cast would be undefined)
        out[b] = std::abs(mean) > static_cast<double>(std::numeric_limits<acc_t>::max())
                     ? static_cast<acc_t>(std::copysign(std::numeric_limits<double>::infinity(), mean))
                     : static_cast<acc_t>(mean);
      }
    });
  });
  const int64_t bad = bad_row.get();
  CAI_CHECK_VALUE(bad < 0, "num_valid must lie in [0, ", K, "] (K = rewards.size(1)); got num_valid[", bad,
                    "] = ", bad < 0 ? 0 : valid[bad]);
  return row_loss;
}

// Gradient of ranked_pairwise_loss_fwd w.r.t. rewards for the upstream (B,) grad_rows: (B, K) in the
// rewards' dtype, 0 at invalid positions.
at::Tensor ranked_pairwise_loss_bwd(const at::Tensor& grad_rows, const at::Tensor& rewards,
                                    const at::Tensor& num_valid) {
  check_inputs(rewards, num_valid);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  const auto acc = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rows.is_contiguous() && grad_rows.numel() == B && grad_rows.scalar_type() == acc,
              "grad_rows must be (B,) contiguous in the accumulation dtype");
  at::Tensor grad = at::empty_like(rewards);
  const int64_t* valid = num_valid.numel() ? num_valid.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "ranked_pairwise_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using V = VecOf<acc_t>;
    const scalar_t* base = rewards.const_data_ptr<scalar_t>();
    const acc_t* g = grad_rows.const_data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B, ranked_row_grain(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> r(K);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = std::clamp<int64_t>(valid ? valid[b] : K, 0, K);  // the forward has checked the range
        scalar_t* out_row = out + b * K;
        std::fill(out_row + n, out_row + K, static_cast<scalar_t>(0));
        if (n < 2) {
          std::fill(out_row, out_row + n, static_cast<scalar_t>(0));
          continue;
        }
        for (int64_t k = 0; k < n; ++k) r[k] = static_cast<acc_t>(base[b * K + k]);
        const acc_t scale = static_cast<acc_t>(static_cast<double>(g[b]) / static_cast<double>(num_pairs(n)));
        for (int64_t k = 0; k < n; ++k) {
          const V r_k(r[k]);
          V above(0), below(0);
          for (int64_t i = 0; i < k; i += V::size()) {  // responses ranked above k: k is the loser
            const int64_t count = std::min<int64_t>(V::size(), k - i);
            above = above + V::set(V(0), sigmoid(r_k - V::loadu(r.data() + i, count)), count);
          }
          for (int64_t j = k + 1; j < n; j += V::size()) {  // responses ranked below k: k is the winner
            const int64_t count = std::min<int64_t>(V::size(), n - j);
            below = below + V::set(V(0), sigmoid(V::loadu(r.data() + j, count) - r_k), count);
          }
          out_row[k] = static_cast<scalar_t>(scale * (vec_sum<acc_t>(above) - vec_sum<acc_t>(below)));
        }
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("ranked_pairwise_loss_fwd(Tensor rewards, Tensor num_valid) -> Tensor");
  m.def("ranked_pairwise_loss_bwd(Tensor grad_rows, Tensor rewards, Tensor num_valid) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("ranked_pairwise_loss_fwd", &cai::ranked_pairwise_loss_fwd);
  m.impl("ranked_pairwise_loss_bwd", &cai::ranked_pairwise_loss_bwd);
}

// kl_penalty: the per-token KL estimate of kl_math.h over (..., T) tensors, one read of each input and
// one write, in fp32 whatever the input dtype (fp64 for fp64). The backward returns the gradient
// w.r.t. the log-ratio r = logprobs - ref_logprobs (that of ref_logprobs is its negative).
#include <torch/library.h>

#include "kl_math.h"

namespace cai {
namespace {

void check_views(const at::Tensor& logprobs, const at::Tensor& ref_logprobs) {
  TORCH_CHECK(logprobs.dim() == 3 && logprobs.stride(2) == 1 && ref_logprobs.dim() == 3 && ref_logprobs.stride(2) == 1,
              "logprobs and ref_logprobs must be (outer, inner, T) views with unit stride along T");
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes() && logprobs.scalar_type() == ref_logprobs.scalar_type(),
              "logprobs and ref_logprobs must have the same shape and dtype");
}

// Calls f(row, r, n, offset) in parallel over all rows, where r holds n log-ratios (a SIMD step or one
// fp64 value) at `offset` into the row.
template <typename T, typename F>
void for_each_log_ratio(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, F&& f) {
  const int64_t n_rows = logprobs.size(0) * logprobs.size(1), T_len = logprobs.size(2);
  const RowLayout lp_layout(logprobs), ref_layout(ref_logprobs);
  const T* lp_base = logprobs.const_data_ptr<T>();
  const T* ref_base = ref_logprobs.const_data_ptr<T>();
  at::parallel_for(0, n_rows, ppo_row_grain(T_len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* lp = lp_base + lp_layout.offset(r);
      const T* ref = ref_base + ref_layout.offset(r);
      walk_row<T>(T_len, [&](int64_t t, int64_t n) { f(r, load_lanes(lp + t, n) - load_lanes(ref + t, n), n, t); });
    }
  });
}

// logprobs, ref_logprobs: (outer, inner, T) views; then the fields of KlPenaltyParams
// (cai_kernels/_params.py). Returns the (outer * inner, T) estimate, fp32 (fp64 for fp64 inputs).
at::Tensor kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator,
                          double clamp_lo, double clamp_hi, double output_clamp_lo, double output_clamp_hi) {
  check_views(logprobs, ref_logprobs);
  const int64_t T_len = logprobs.size(2);
  at::Tensor out = at::empty({logprobs.size(0) * logprobs.size(1), T_len}, acc_options(logprobs));
  const KlParams p{estimator, clamp_lo, clamp_hi, output_clamp_lo, output_clamp_hi};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "kl_penalty_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acc_t* o = out.data_ptr<acc_t>();
    for_each_log_ratio<scalar_t>(logprobs, ref_logprobs, [&](int64_t r, const auto& raw, int64_t n, int64_t t) {
      store_lanes<acc_t>(o + r * T_len + t, kl_forward(raw, p), n);
    });
  });
  return out;
}

// grad: (outer * inner, T) contiguous, the forward's output dtype. Returns d loss / d r as an
// (outer * inner, T) tensor of the inputs' dtype.
at::Tensor kl_penalty_bwd(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                          int64_t estimator, double clamp_lo, double clamp_hi, double output_clamp_lo,
                          double output_clamp_hi) {
  check_views(logprobs, ref_logprobs);
  const int64_t T_len = logprobs.size(2);
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == logprobs.numel() &&
                  grad.scalar_type() == acc_options(logprobs).dtype().toScalarType(),
              "grad must be contiguous, of the forward's output dtype, with one entry per token");
  at::Tensor out = at::empty({logprobs.size(0) * logprobs.size(1), T_len}, logprobs.options());
  const KlParams p{estimator, clamp_lo, clamp_hi, output_clamp_lo, output_clamp_hi};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "kl_penalty_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_log_ratio<scalar_t>(logprobs, ref_logprobs, [&](int64_t r, const auto& raw, int64_t n, int64_t t) {
      const int64_t i = r * T_len + t;
      store_lanes<scalar_t>(o + i, kl_backward(raw, load_lanes(g + i, n), p), n);
    });
  });
  return out;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator, float clamp_lo, float clamp_hi, "
        "float output_clamp_lo, float output_clamp_hi) -> Tensor");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator, float clamp_lo, "
        "float clamp_hi, float output_clamp_lo, float output_clamp_hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("kl_penalty_fwd", &cai::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &cai::kl_penalty_bwd);
}

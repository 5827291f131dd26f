// kl_penalty: the per-token KL estimate of kl_math.h over (..., T) tensors, one read of each input and
// one write, in fp32 whatever the input dtype (fp64 for fp64). The backward returns the gradient
// w.r.t. the log-ratio r = logprobs - ref_logprobs (that of ref_logprobs is its negative).
#include <torch/library.h>

#include "kl_math.h"

namespace cai {
namespace {

template <typename T>
void kl_rows_fwd(const T* lp_base, const RowLayout& lp_layout, const T* ref_base, const RowLayout& ref_layout,
                 int64_t n_rows, int64_t T_len, const KlParams<float>& p, float* out) {
  at::parallel_for(0, n_rows, ppo_row_grain(T_len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* lp = lp_base + lp_layout.offset(r);
      const T* ref = ref_base + ref_layout.offset(r);
      float* o = out + r * T_len;
      int64_t t = 0;
      for (; t + kPair <= T_len; t += kPair) {
        Vec a0, a1, b0, b1;
        load_pair(lp + t, a0, a1);
        load_pair(ref + t, b0, b1);
        kl_forward(a0 - b0, p).store(o + t);
        kl_forward(a1 - b1, p).store(o + t + kLanes);
      }
      for (; t < T_len; t += kLanes) {
        const int64_t n = std::min(kLanes, T_len - t);
        kl_forward(load_floats(lp + t, n) - load_floats(ref + t, n), p).store(o + t, n);
      }
    }
  });
}

void kl_rows_fwd(const double* lp_base, const RowLayout& lp_layout, const double* ref_base,
                 const RowLayout& ref_layout, int64_t n_rows, int64_t T_len, const KlParams<double>& p, double* out) {
  at::parallel_for(0, n_rows, ppo_row_grain(T_len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double* lp = lp_base + lp_layout.offset(r);
      const double* ref = ref_base + ref_layout.offset(r);
      for (int64_t t = 0; t < T_len; ++t) out[r * T_len + t] = kl_forward(lp[t] - ref[t], p);
    }
  });
}

template <typename T>
void kl_rows_bwd(const float* grad, const T* lp_base, const RowLayout& lp_layout, const T* ref_base,
                 const RowLayout& ref_layout, int64_t n_rows, int64_t T_len, const KlParams<float>& p, T* out) {
  at::parallel_for(0, n_rows, ppo_row_grain(T_len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* lp = lp_base + lp_layout.offset(r);
      const T* ref = ref_base + ref_layout.offset(r);
      const float* g = grad + r * T_len;
      T* o = out + r * T_len;
      int64_t t = 0;
      for (; t + kPair <= T_len; t += kPair) {
        Vec a0, a1, b0, b1;
        load_pair(lp + t, a0, a1);
        load_pair(ref + t, b0, b1);
        store_pair(o + t, kl_backward(a0 - b0, Vec::loadu(g + t), p),
                   kl_backward(a1 - b1, Vec::loadu(g + t + kLanes), p));
      }
      for (; t < T_len; ++t) {
        o[t] = static_cast<T>(kl_backward<float>(static_cast<float>(lp[t]) - static_cast<float>(ref[t]), g[t],
                                                 {p.estimator, p.lo, p.hi, p.out_lo, p.out_hi}));
      }
    }
  });
}

void kl_rows_bwd(const double* grad, const double* lp_base, const RowLayout& lp_layout, const double* ref_base,
                 const RowLayout& ref_layout, int64_t n_rows, int64_t T_len, const KlParams<double>& p, double* out) {
  at::parallel_for(0, n_rows, ppo_row_grain(T_len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double* lp = lp_base + lp_layout.offset(r);
      const double* ref = ref_base + ref_layout.offset(r);
      for (int64_t t = 0; t < T_len; ++t) {
        out[r * T_len + t] = kl_backward(lp[t] - ref[t], grad[r * T_len + t], p);
      }
    }
  });
}

void check_views(const at::Tensor& logprobs, const at::Tensor& ref_logprobs) {
  TORCH_CHECK(logprobs.dim() == 3 && logprobs.stride(2) == 1 && ref_logprobs.dim() == 3 && ref_logprobs.stride(2) == 1,
              "logprobs and ref_logprobs must be (outer, inner, T) views with unit stride along T");
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes() && logprobs.scalar_type() == ref_logprobs.scalar_type(),
              "logprobs and ref_logprobs must have the same shape and dtype");
}

// logprobs, ref_logprobs: (outer, inner, T) views. Returns the (outer * inner, T) estimate, fp32
// (fp64 for fp64 inputs).
at::Tensor kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator, double lo,
                          double hi, double out_lo, double out_hi) {
  check_views(logprobs, ref_logprobs);
  const int64_t n_rows = logprobs.size(0) * logprobs.size(1), T_len = logprobs.size(2);
  const bool f64 = logprobs.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({n_rows, T_len}, logprobs.options().dtype(f64 ? at::kDouble : at::kFloat));
  const RowLayout lp_layout(logprobs), ref_layout(ref_logprobs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "kl_penalty_fwd", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      kl_rows_fwd(logprobs.const_data_ptr<double>(), lp_layout, ref_logprobs.const_data_ptr<double>(), ref_layout,
                  n_rows, T_len, KlParams<double>{estimator, lo, hi, out_lo, out_hi}, out.data_ptr<double>());
    } else {
      const KlParams<float> p{estimator, float(lo), float(hi), float(out_lo), float(out_hi)};
      kl_rows_fwd(logprobs.const_data_ptr<scalar_t>(), lp_layout, ref_logprobs.const_data_ptr<scalar_t>(), ref_layout,
                  n_rows, T_len, p, out.data_ptr<float>());
    }
  });
  return out;
}

// grad: (outer * inner, T) contiguous, the forward's output dtype. Returns d loss / d r as an
// (outer * inner, T) tensor of the inputs' dtype.
at::Tensor kl_penalty_bwd(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                          int64_t estimator, double lo, double hi, double out_lo, double out_hi) {
  check_views(logprobs, ref_logprobs);
  const int64_t n_rows = logprobs.size(0) * logprobs.size(1), T_len = logprobs.size(2);
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == n_rows * T_len, "grad must be contiguous with one entry per token");
  at::Tensor out = at::empty({n_rows, T_len}, logprobs.options());
  const RowLayout lp_layout(logprobs), ref_layout(ref_logprobs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "kl_penalty_bwd", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      kl_rows_bwd(grad.const_data_ptr<double>(), logprobs.const_data_ptr<double>(), lp_layout,
                  ref_logprobs.const_data_ptr<double>(), ref_layout, n_rows, T_len,
                  KlParams<double>{estimator, lo, hi, out_lo, out_hi}, out.data_ptr<double>());
    } else {
      TORCH_CHECK(grad.scalar_type() == at::kFloat, "grad must be float32 for 16/32-bit inputs");
      const KlParams<float> p{estimator, float(lo), float(hi), float(out_lo), float(out_hi)};
      kl_rows_bwd(grad.const_data_ptr<float>(), logprobs.const_data_ptr<scalar_t>(), lp_layout,
                  ref_logprobs.const_data_ptr<scalar_t>(), ref_layout, n_rows, T_len, p, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator, float lo, float hi, float out_lo, "
        "float out_hi) -> Tensor");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator, float lo, float hi, "
        "float out_lo, float out_hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("kl_penalty_fwd", &cai::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &cai::kl_penalty_bwd);
}

// masked_whiten: (x - mean) / sqrt(var + eps) with batch-global statistics over response tokens
// (see whiten.h). Two reads of x from memory (statistics, then the normalizing pass) and one write.
#include <torch/library.h>

#include "whiten.h"

namespace cai {
namespace {

// x: (B, T) with unit stride along T; mask: (B, T) bool / uint8 / int32 / int64 / float32.
// Returns (B, T) fp32 (fp64 for fp64 x), 0 on masked positions.
at::Tensor masked_whiten_fwd(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased, double eps) {
  TORCH_CHECK(x.dim() == 2 && mask.sizes() == x.sizes(), "x and mask must be (B, T) tensors of the same shape");
  const int64_t B = x.size(0), T = x.size(1);
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, T}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  std::vector<Moments> row_stats(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_whiten_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Rows<scalar_t> xs = rows_of<scalar_t>(x);
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row_stats[r] = row_moments(xs.row(r), ms.row(r), T);
      });
      whiten_batch(xs, ms, out.data_ptr<acc_t>(), B, T, row_stats, shift_mean, unbiased, eps);
    });
  });
  return out;
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("masked_whiten_fwd(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) { m.impl("masked_whiten_fwd", &cai::masked_whiten_fwd); }

// gae: generalized advantage estimation on the row-vectorized reverse scan of gae_scan.h, one read of
// rewards, values and mask and one write of advantages and returns.
#include <torch/library.h>

#include "gae_scan.h"

namespace cai {
namespace {

template <typename T, typename M>
struct TensorStager {
  Rows<T> rewards, values;
  Rows<M> mask;

  void prepare(int64_t) const {}
  void prefetch(int64_t row, int64_t lo, int64_t n) const {
    prefetch_span(rewards.row(row) + lo, n);
    prefetch_span(values.row(row) + lo, n);
    prefetch_span(mask.row(row) + lo, n);
  }
  void stage(int64_t r0, int64_t rows, int64_t lo, int64_t n, ScanTile& tile) const {
    stage_cols(rewards, r0, rows, lo, n, tile.rows[0], tile.cols[0]);
    stage_cols(values, r0, rows, lo, n, tile.rows[1], tile.cols[1]);
    stage_mask_rows(mask, r0, rows, lo, n, tile.rows[2]);
    rows_to_cols(tile.rows[2], kChunk, tile.cols[2], n);
  }
};

// rewards, values: (B, T), same dtype; mask (B, T); then the fields of GaeParams (cai_kernels/_params.py).
// Returns (advantages, returns), (B, T) fp32 (fp64 for fp64 inputs), 0 on masked positions.
std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                           double gamma, double lam) {
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows(rewards, "rewards", B, T);
  check_rows(values, "values", B, T);
  check_rows(mask, "mask", B, T);
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "rewards and values must have the same dtype");
  at::Tensor adv = at::empty({B, T}, acc_options(rewards)), ret = at::empty({B, T}, acc_options(rewards));
  dispatch_values_and_mask(rewards.scalar_type(), mask, [&](auto tag, const auto& ms) {
    using S = decltype(tag);
    const Rows<S> rs = rows_of<S>(rewards), vs = rows_of<S>(values);
    if constexpr (std::is_same_v<S, double>) {
      double *a = adv.data_ptr<double>(), *r = ret.data_ptr<double>();
      at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scan_row_scalar(rs.row(b), vs.row(b), ms.row(b), T, gamma, lam, a + b * T, r + b * T);
        }
      });
    } else {
      const TensorStager<S, typename std::decay_t<decltype(ms)>::Elem> stager{rs, vs, ms};
      scan_all_rows(stager, B, T, ScanParams{float(gamma), float(gamma * lam)}, adv.data_ptr<float>(),
                    ret.data_ptr<float>(), [](int64_t, int64_t) {});
    }
  });
  return {adv, ret};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) { m.impl("gae_fwd", &cai::gae_fwd); }

// gae and the fused ppo_advantages, both on the row-vectorized reverse scan of gae_scan.h.
//
// ppo_advantages reads log-probs, reference log-probs, values and the mask once: the KL estimate,
// the shaped reward (-kl_coef * kl, plus the sequence score at the last response token) and the
// GAE scan happen in the same pass, each row group's advantage moments are taken while its output
// is in cache, and whitening is one more pass over the advantages.
#include <torch/library.h>

#include "gae_scan.h"
#include "kl_math.h"

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

template <typename M>
int64_t last_response_token(const M* mask, int64_t T) {
  for (int64_t t = T - 1; t >= 0; --t) {
    if (mask[t] != M(0)) return t;
  }
  return -1;
}

template <typename T, typename M>
struct PpoStager {
  Rows<T> logprobs, ref_logprobs, values;
  Rows<M> mask;
  const float* scores;
  KlParams<float> kl;
  float neg_kl_coef;
  int64_t steps;       // T
  float* kl_out;       // (B, T) outputs written while staging
  float* rewards_out;
  int64_t* last;       // per row: index of the last response token, -1 if none

  void prepare(int64_t row) const { last[row] = last_response_token(mask.row(row), steps); }
  void prefetch(int64_t row, int64_t lo, int64_t n) const {
    prefetch_span(logprobs.row(row) + lo, n);
    prefetch_span(ref_logprobs.row(row) + lo, n);
    prefetch_span(values.row(row) + lo, n);
    prefetch_span(mask.row(row) + lo, n);
    prefetch_span(kl_out + row * steps + lo, n, true);
    prefetch_span(rewards_out + row * steps + lo, n, true);
  }

  // Rewards of one row's chunk, written to the token_rewards output and to the tile's row `rew`.
  void stage_rewards(int64_t row, int64_t lo, int64_t n, const float* bits, float* rew) const {
    const T* lp = logprobs.row(row) + lo;
    const T* ref = ref_logprobs.row(row) + lo;
    float* kl_row = kl_out + row * steps + lo;
    float* rewards_row = rewards_out + row * steps + lo;
    const Vec coef(neg_kl_coef);
    for (int64_t t = 0; t < n; t += kLanes) {
      const int64_t len = std::min(kLanes, n - t);
      const bool full = len == kLanes;
      const Vec m = full ? Vec::loadu(bits + t) : Vec::loadu(bits + t, len);
      const Vec raw = full ? load_floats(lp + t) - load_floats(ref + t) : load_floats(lp + t, len) - load_floats(ref + t, len);
      const Vec estimate = kl_forward(raw, kl) & m;
      const Vec reward = (estimate * coef) & m;
      if (full) {
        estimate.store(kl_row + t);
        reward.store(rewards_row + t);
        reward.store(rew + t);
      } else {
        estimate.store(kl_row + t, len);
        reward.store(rewards_row + t, len);
        reward.store(rew + t, len);
      }
    }
    const int64_t last_t = last[row];
    if (last_t >= lo && last_t < lo + n) {
      rew[last_t - lo] += scores[row];
      rewards_row[last_t - lo] = rew[last_t - lo];
    }
  }

  void stage(int64_t r0, int64_t rows, int64_t lo, int64_t n, ScanTile& tile) const {
    stage_mask_rows(mask, r0, rows, lo, n, tile.rows[2]);
    for (int64_t k = 0; k < kLanes; ++k) {
      float* rew = tile.rows[0] + k * kChunk;
      if (k < rows) {
        stage_rewards(r0 + k, lo, n, tile.rows[2] + k * kChunk, rew);
      } else {
        std::fill(rew, rew + n, 0.f);
      }
    }
    rows_to_cols(tile.rows[0], kChunk, tile.cols[0], n);
    stage_cols(values, r0, rows, lo, n, tile.rows[1], tile.cols[1]);
    rows_to_cols(tile.rows[2], kChunk, tile.cols[2], n);
  }
};

void check_rows(const at::Tensor& x, const char* name, int64_t B, int64_t T) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == T && (T <= 1 || x.stride(1) == 1), name,
              " must be a (B, T) tensor with unit stride along T");
}

at::TensorOptions acc_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// rewards, values: (B, T), same dtype; mask (B, T). Returns (advantages, returns), (B, T) fp32
// (fp64 for fp64 inputs), 0 on masked positions.
std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                           double gamma, double lam) {
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows(rewards, "rewards", B, T);
  check_rows(values, "values", B, T);
  check_rows(mask, "mask", B, T);
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "rewards and values must have the same dtype");
  at::Tensor adv = at::empty({B, T}, acc_options(rewards)), ret = at::empty({B, T}, acc_options(rewards));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_fwd", [&] {
    const Rows<scalar_t> rs = rows_of<scalar_t>(rewards), vs = rows_of<scalar_t>(values);
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      if constexpr (std::is_same_v<scalar_t, double>) {
        double *a = adv.data_ptr<double>(), *r = ret.data_ptr<double>();
        at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            scan_row_scalar(rs.row(b), vs.row(b), ms.row(b), T, gamma, lam, a + b * T, r + b * T);
          }
        });
      } else {
        const TensorStager<scalar_t, M> stager{rs, vs, ms};
        scan_all_rows(stager, B, T, ScanParams{float(gamma), float(gamma * lam)}, adv.data_ptr<float>(),
                      ret.data_ptr<float>(), [](int64_t, int64_t) {});
      }
    });
  });
  return {adv, ret};
}

template <typename M>
void ppo_advantages_f64(const Rows<double>& lp, const Rows<double>& ref, const Rows<double>& values, const Rows<M>& mask,
                        const double* scores, const KlParams<double>& kl, double kl_coef, double gamma, double lam,
                        int64_t B, int64_t T, double* adv, double* ret, double* rewards, double* kls,
                        std::vector<Moments>* row_stats) {
  at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const M* m = mask.row(b);
      double *k = kls + b * T, *rw = rewards + b * T;
      for (int64_t t = 0; t < T; ++t) {
        k[t] = m[t] != M(0) ? kl_forward(lp.row(b)[t] - ref.row(b)[t], kl) : 0.0;
        rw[t] = m[t] != M(0) ? -kl_coef * k[t] : 0.0;
      }
      const int64_t last = last_response_token(m, T);
      if (last >= 0) rw[last] += scores[b];
      scan_row_scalar(rw, values.row(b), m, T, gamma, lam, adv + b * T, ret + b * T);
      if (row_stats != nullptr) (*row_stats)[b] = row_moments(adv + b * T, m, T);
    }
  });
}

// scores (B,) of the compute dtype; logprobs, ref_logprobs, values (B, T) of one dtype; mask (B, T).
// Returns (advantages, returns, token_rewards, kl), (B, T) fp32 (fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_advantages_fwd(
    const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double lo, double hi,
    double out_lo, double out_hi, bool whiten) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  check_rows(logprobs, "logprobs", B, T);
  check_rows(ref_logprobs, "ref_logprobs", B, T);
  check_rows(values, "values", B, T);
  check_rows(mask, "mask", B, T);
  TORCH_CHECK(ref_logprobs.scalar_type() == logprobs.scalar_type() && values.scalar_type() == logprobs.scalar_type(),
              "logprobs, ref_logprobs and values must have the same dtype");
  const auto options = acc_options(logprobs);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == B && scores.is_contiguous() &&
                  scores.scalar_type() == options.dtype().toScalarType(),
              "scores must be a contiguous (B,) tensor of the compute dtype");
  at::Tensor adv = at::empty({B, T}, options), ret = at::empty({B, T}, options);
  at::Tensor rewards = at::empty({B, T}, options), kls = at::empty({B, T}, options);
  std::vector<Moments> row_stats(whiten ? B : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "ppo_advantages_fwd", [&] {
    const Rows<scalar_t> lp = rows_of<scalar_t>(logprobs), ref = rows_of<scalar_t>(ref_logprobs);
    const Rows<scalar_t> vs = rows_of<scalar_t>(values);
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      const Rows<M> ms{mask_data, mask.stride(0)};
      if constexpr (std::is_same_v<scalar_t, double>) {
        double* a = adv.data_ptr<double>();
        ppo_advantages_f64(lp, ref, vs, ms, scores.const_data_ptr<double>(),
                           KlParams<double>{estimator, lo, hi, out_lo, out_hi}, kl_coef, gamma, lam, B, T, a,
                           ret.data_ptr<double>(), rewards.data_ptr<double>(), kls.data_ptr<double>(),
                           whiten ? &row_stats : nullptr);
        if (whiten) whiten_batch(Rows<double>{a, T}, ms, a, B, T, row_stats, true, true, 1e-8);
      } else {
        std::vector<int64_t> last(B);
        const PpoStager<scalar_t, M> stager{lp, ref, vs, ms, scores.const_data_ptr<float>(),
                                            KlParams<float>{estimator, float(lo), float(hi), float(out_lo), float(out_hi)},
                                            float(-kl_coef), T, kls.data_ptr<float>(), rewards.data_ptr<float>(),
                                            last.data()};
        float* a = adv.data_ptr<float>();
        scan_all_rows(stager, B, T, ScanParams{float(gamma), float(gamma * lam)}, a, ret.data_ptr<float>(),
                      [&](int64_t r0, int64_t rows) {
                        if (!whiten) return;
                        for (int64_t r = r0; r < r0 + rows; ++r) row_stats[r] = row_moments(a + r * T, ms.row(r), T);
                      });
        if (whiten) whiten_batch(Rows<float>{a, T}, ms, a, B, T, row_stats, true, true, 1e-8);
      }
    });
  });
  return {adv, ret, rewards, kls};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("ppo_advantages_fwd(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor mask, "
        "float kl_coef, float gamma, float lam, int estimator, float lo, float hi, float out_lo, float out_hi, "
        "bool whiten) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("gae_fwd", &cai::gae_fwd);
  m.impl("ppo_advantages_fwd", &cai::ppo_advantages_fwd);
}

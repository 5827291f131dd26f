// ppo_advantages: the post-rollout step fused, on the row-vectorized reverse scan of gae_scan.h.
//
// Reads log-probs, reference log-probs, values and the mask once: the KL estimate (kl_math.h), the
// shaped reward (-kl_coef * kl, plus the sequence score at the last response token) and the GAE scan
// happen in the same pass, each row group's advantage moments are taken while its output is in cache,
// and whitening (whiten.h) is one more pass over the advantages.
#include <torch/library.h>

#include "gae_scan.h"
#include "kl_math.h"

namespace cai {
namespace {

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
  KlParams kl;
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

template <typename M>
void ppo_advantages_f64(const Rows<double>& lp, const Rows<double>& ref, const Rows<double>& values, const Rows<M>& mask,
                        const double* scores, const KlParams& kl, double kl_coef, double gamma, double lam,
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

// scores (B,) of the compute dtype; logprobs, ref_logprobs, values (B, T) of one dtype; mask (B, T); then
// the fields of PpoAdvantagesParams (cai_kernels/_params.py). Returns (advantages, returns, token_rewards,
// kl), (B, T) fp32 (fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_advantages_fwd(
    const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double clamp_lo,
    double clamp_hi, double output_clamp_lo, double output_clamp_hi, bool whiten) {
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
  const KlParams kl{estimator, clamp_lo, clamp_hi, output_clamp_lo, output_clamp_hi};
  dispatch_values_and_mask(logprobs.scalar_type(), mask, [&](auto tag, const auto& ms) {
    using S = decltype(tag);
    using M = typename std::decay_t<decltype(ms)>::Elem;
    const Rows<S> lp = rows_of<S>(logprobs), ref = rows_of<S>(ref_logprobs), vs = rows_of<S>(values);
    if constexpr (std::is_same_v<S, double>) {
      double* a = adv.data_ptr<double>();
      ppo_advantages_f64(lp, ref, vs, ms, scores.const_data_ptr<double>(), kl, kl_coef, gamma, lam, B, T, a,
                         ret.data_ptr<double>(), rewards.data_ptr<double>(), kls.data_ptr<double>(),
                         whiten ? &row_stats : nullptr);
      if (whiten) whiten_batch(Rows<double>{a, T}, ms, a, B, T, row_stats, true, true, 1e-8);
    } else {
      std::vector<int64_t> last(B);
      const PpoStager<S, M> stager{lp, ref, vs, ms, scores.const_data_ptr<float>(), kl, float(-kl_coef), T,
                                   kls.data_ptr<float>(), rewards.data_ptr<float>(), last.data()};
      float* a = adv.data_ptr<float>();
      scan_all_rows(stager, B, T, ScanParams{float(gamma), float(gamma * lam)}, a, ret.data_ptr<float>(),
                    [&](int64_t r0, int64_t rows) {
                      if (!whiten) return;
                      for (int64_t r = r0; r < r0 + rows; ++r) row_stats[r] = row_moments(a + r * T, ms.row(r), T);
                    });
      if (whiten) whiten_batch(Rows<float>{a, T}, ms, a, B, T, row_stats, true, true, 1e-8);
    }
  });
  return {adv, ret, rewards, kls};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("ppo_advantages_fwd(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor mask, "
        "float kl_coef, float gamma, float lam, int estimator, float clamp_lo, float clamp_hi, "
        "float output_clamp_lo, float output_clamp_hi, bool whiten) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) { m.impl("ppo_advantages_fwd", &cai::ppo_advantages_fwd); }

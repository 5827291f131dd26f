// The per-token KL estimators (Schulman's k1 / k2 / k3, and |r|) and their derivatives, in SIMD
// (float) and scalar (double) form. r = logprobs - ref_logprobs, clamped to [lo, hi]; the estimate
// is then clamped to [out_lo, out_hi] (infinite bounds = no clamp):
//   k1 = r    k2 = r^2 / 2    k3 = expm1(-r) + r    abs = |r|
// k3 in the expm1 form: exp(-r) - 1 computed as one correctly rounded value, so the estimate stays
// >= 0 and exact for tiny |r| instead of cancelling to noise (the bf16 / fp32 k3 "explosions").
#pragma once

#include "ppo_common.h"

namespace cai {

enum KlEstimator : int64_t { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };

// e^x - 1 - x and e^x - 1, accurate to a few ulp for every x, without Sleef's expm1 (~60 cycles
// a vector here, 10x the whole k1 kernel). For |x| <= 1 the Taylor series of e^x - 1 - x,
//   x^2 * (1/2! + x/3! + ... + x^11/13!)      (truncation error < 1e-9 relative),
// has no cancellation; beyond it e^x - 1 - x loses at most a few ulp (the result is >= 0.36).
inline Vec exp_series_tail(const Vec& x) {  // sum_{k>=0} x^k / (k+2)!, |x| <= 1
  constexpr float c[12] = {1.f / 2,          1.f / 6,           1.f / 24,           1.f / 120,
                           1.f / 720,        1.f / 5040,        1.f / 40320,        1.f / 362880,
                           1.f / 3628800,    1.f / 39916800,    1.f / 479001600,    1.f / 6227020800.f};
  Vec p(c[11]);
  for (int k = 10; k >= 0; --k) p = at::vec::fmadd(p, x, Vec(c[k]));
  return p;
}

inline Vec exp_minus_1_minus_x(const Vec& x) {
  const Vec small = x.abs() <= Vec(1.f);
  const Vec series = x * x * exp_series_tail(x);
  const Vec direct = exp_fast(x) - Vec(1.f) - x;
  return Vec::blendv(direct, series, small);
}

inline Vec exp_minus_1(const Vec& x) {
  const Vec small = x.abs() <= Vec(1.f);
  const Vec series = at::vec::fmadd(x * x, exp_series_tail(x), x);
  return Vec::blendv(exp_fast(x) - Vec(1.f), series, small);
}

template <typename A>
struct KlParams {
  int64_t estimator;
  A lo, hi, out_lo, out_hi;
};

inline Vec kl_value(const Vec& r, int64_t estimator) {
  switch (estimator) {
    case kK1:
      return r;
    case kK2:
      return Vec(0.5f) * r * r;
    case kK3:
      return exp_minus_1_minus_x(r.neg());
    default:
      return r.abs();
  }
}

inline Vec kl_forward(const Vec& raw, const KlParams<float>& p) {
  const Vec r = at::vec::clamp(raw, Vec(p.lo), Vec(p.hi));
  return at::vec::clamp(kl_value(r, p.estimator), Vec(p.out_lo), Vec(p.out_hi));
}

// d estimate / d r_raw times g. Like torch.clamp, a clamp passes the gradient where
// lo <= x <= hi. Where g == 0 the result is 0 even if the derivative is infinite (k3 at r < -88),
// so masked-out positions never turn a loss's gradient into NaN.
inline Vec kl_backward(const Vec& raw, const Vec& g, const KlParams<float>& p) {
  const Vec r = at::vec::clamp(raw, Vec(p.lo), Vec(p.hi));
  const Vec kl = kl_value(r, p.estimator);
  const Vec passes = (raw >= Vec(p.lo)) & (raw <= Vec(p.hi)) & (kl >= Vec(p.out_lo)) & (kl <= Vec(p.out_hi)) &
                     (g != Vec(0.f));
  Vec d;
  switch (p.estimator) {
    case kK1:
      d = Vec(1.f);
      break;
    case kK2:
      d = r;
      break;
    case kK3:
      d = exp_minus_1(r.neg()).neg();
      break;
    default:
      d = ones_where(r > Vec(0.f)) - ones_where(r < Vec(0.f));
  }
  return (g * d) & passes;
}

template <typename A>
inline A kl_value(A r, int64_t estimator) {
  switch (estimator) {
    case kK1:
      return r;
    case kK2:
      return A(0.5) * r * r;
    case kK3:
      return std::expm1(-r) + r;
    default:
      return std::abs(r);
  }
}

template <typename A>
inline A kl_forward(A raw, const KlParams<A>& p) {
  const A r = std::min(std::max(raw, p.lo), p.hi);
  return std::min(std::max(kl_value(r, p.estimator), p.out_lo), p.out_hi);
}

template <typename A>
inline A kl_backward(A raw, A g, const KlParams<A>& p) {
  const A r = std::min(std::max(raw, p.lo), p.hi);
  const A kl = kl_value(r, p.estimator);
  if (g == A(0) || raw < p.lo || raw > p.hi || kl < p.out_lo || kl > p.out_hi) return A(0);
  switch (p.estimator) {
    case kK1:
      return g;
    case kK2:
      return g * r;
    case kK3:
      return -g * std::expm1(-r);
    default:
      return g * A((r > A(0)) - (r < A(0)));
  }
}

}  // namespace cai

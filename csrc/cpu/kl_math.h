// The per-token KL estimators (Schulman's k1 / k2 / k3, and |r|) and their derivatives, written once
// for SIMD floats and fp64 (see "one formula, two forms" in masked_rows.h). r = logprobs -
// ref_logprobs, clamped to [lo, hi]; the estimate is then clamped to [out_lo, out_hi] (bounds
// beyond the float range = no clamp):
//   k1 = r    k2 = r^2 / 2    k3 = e^-r - 1 + r    abs = |r|
// k3 without cancellation: exp(-r) - 1 + r cancels to noise in fp32 for tiny |r| (the bf16 / fp32
// "k3 explosions" of the RLHF stacks); here it is a series there, exact to a few ulp and >= 0.
#pragma once

#include "masked_rows.h"

namespace cai {

// Mirrors KlEstimator in cai_kernels/_params.py.
enum KlEstimator : int64_t { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };

// e^x - 1 - x and e^x - 1, accurate to a few ulp for every x, without Sleef's expm1 (~60 cycles a
// vector here, 10x the whole k1 kernel). For |x| <= 1 the Taylor series of e^x - 1 - x,
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

// +inf at x = +inf (k3 at r = -inf: a token the policy can never sample), where the direct form is inf - inf.
inline Vec exp_minus_1_minus_x(const Vec& x) {
  const Vec small = x.abs() <= Vec(1.f);
  const Vec direct = select(x == Vec(-kNegInf), x, exp_fast(x) - Vec(1.f) - x);
  return select(small, x * x * exp_series_tail(x), direct);
}
inline double exp_minus_1_minus_x(double x) {  // fp64 has digits to spare
  return x == std::numeric_limits<double>::infinity() ? x : std::expm1(x) - x;
}

inline Vec exp_minus_1(const Vec& x) {
  const Vec small = x.abs() <= Vec(1.f);
  return select(small, at::vec::fmadd(x * x, exp_series_tail(x), x), exp_fast(x) - Vec(1.f));
}
inline double exp_minus_1(double x) { return std::expm1(x); }

struct KlParams {
  int64_t estimator;
  double lo, hi, out_lo, out_hi;
};

template <typename V>
inline V kl_value(const V& r, int64_t estimator) {
  switch (estimator) {
    case kK1:
      return r;
    case kK2:
      return V(0.5) * r * r;
    case kK3:
      return exp_minus_1_minus_x(V(0) - r);
    default:
      return abs_of(r);
  }
}

template <typename V>
inline V kl_forward(const V& raw, const KlParams& p) {
  const V r = clamp(raw, V(p.lo), V(p.hi));
  return clamp(kl_value(r, p.estimator), V(p.out_lo), V(p.out_hi));
}

// g * d estimate / d r_raw. Like torch.clamp, a clamp passes the gradient where lo <= x <= hi.
// Where g == 0 the result is 0 even if the derivative is infinite (k3 at r < -88 in fp32), so
// masked-out positions never turn a loss's gradient into NaN.
template <typename V>
inline V kl_backward(const V& raw, const V& g, const KlParams& p) {
  const V r = clamp(raw, V(p.lo), V(p.hi));
  const V kl = kl_value(r, p.estimator);
  const auto passes = both(both(raw >= V(p.lo), raw <= V(p.hi)),
                           both(both(kl >= V(p.out_lo), kl <= V(p.out_hi)), g != V(0)));
  V d;
  switch (p.estimator) {
    case kK1:
      d = V(1);
      break;
    case kK2:
      d = r;
      break;
    case kK3:
      d = V(0) - exp_minus_1(V(0) - r);  // 1 - e^-r
      break;
    default:
      d = indicator(r > V(0)) - indicator(r < V(0));
  }
  return keep(passes, g * d);
}

}  // namespace cai

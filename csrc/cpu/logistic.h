// Logistic-loss building blocks of the preference-model kernels, on at::vec vectors of the
// accumulation type (Vectorized<float> for fp32 / bf16 / fp16 inputs, Vectorized<double> for fp64).
//
//   softplus(x)  = log(1 + e^x) = max(x, 0) + log1p(e^-|x|)     = -logsigmoid(-x)
//   sigmoid(x)   = 1 / (1 + e^-|x|)      for x >= 0,  e^-|x| / (1 + e^-|x|) for x < 0
//
// Both take e^-|x| <= 1, so nothing overflows for any finite x and small results keep their relative
// precision (log1p, not log(1 + .)): softplus(-1e4) = 0 exactly as in fp64, softplus(1e4) = 1e4.
#pragma once

#include <ATen/OpMathType.h>

#include <atomic>

#include "vec_helpers.h"

namespace cai {

template <typename Acc>
using VecOf = at::vec::Vectorized<Acc>;

template <typename Acc>
inline Acc vec_sum(const VecOf<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](const VecOf<Acc>& a, const VecOf<Acc>& b) { return a + b; }, v);
}

// e^-|x| in [0, 1]. fp32: Cody–Waite range reduction, e^-|x| = 2^n e^t with n = round(-|x| log2 e) and
// t = -|x| - n ln2 in [-ln2/2, ln2/2] (ln2 split in two parts so n ln2 is exact), then Cephes' degree-6
// polynomial for e^t (about 1 ulp). Results below 2^-126 (|x| > 87.3) are flushed to 0. Sleef's expf is
// exact too but handles the whole float range, at about twice the cost; fp64 uses it.
template <typename V>
inline V exp_neg_abs(const V& x) {
  return (V(0) - x.abs()).exp();
}
inline Vec exp_neg_abs(const Vec& x) {
  const Vec t = Vec(0.f) - x.abs();  // NaN stays NaN through every step below
  const Vec n = at::vec::clamp_min(t * Vec(kLog2e), Vec(-127.f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), t);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p = at::vec::fmadd(Vec(1.9875691500e-4f), r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + Vec(1.f));
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec exponent_shift = at::vec::convert_to_int_of_same_size(n) << IVec(23);
  const Vec scaled = at::vec::cast<float>(at::vec::cast<int32_t>(p) + exponent_shift);
  return Vec::blendv(scaled, Vec(0.f), n < Vec(-126.f));
}

// log1p(e) for e in [0, 1]. fp32: log1p(e) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = e / (2 + e) in
// [0, 1/3]: seven terms leave a relative error below 1.5e-8, and tiny e keeps full relative precision.
template <typename V>
inline V log1p_unit(const V& e) {
  return e.log1p();
}
inline Vec log1p_unit(const Vec& e) {
  const Vec s = e / (Vec(2.f) + e);
  const Vec z = s * s;
  Vec p = at::vec::fmadd(Vec(1.f / 13), z, Vec(1.f / 11));
  p = at::vec::fmadd(p, z, Vec(1.f / 9));
  p = at::vec::fmadd(p, z, Vec(1.f / 7));
  p = at::vec::fmadd(p, z, Vec(1.f / 5));
  p = at::vec::fmadd(p, z, Vec(1.f / 3));
  p = at::vec::fmadd(p, z, Vec(1.f));
  return Vec(2.f) * s * p;
}

// log1p(e^-|x|), the bounded part of softplus(x) and softplus(-x) alike.
template <typename V>
inline V log1p_exp_neg_abs(const V& x) {
  return log1p_unit(exp_neg_abs(x));
}

template <typename V>
inline V softplus(const V& x) {
  return at::vec::maximum(x, V(0)) + log1p_exp_neg_abs(x);  // NaN-propagating maximum
}

template <typename V>
inline V sigmoid(const V& x) {
  const V e = exp_neg_abs(x);
  const V big = V(1) / (V(1) + e);  // sigmoid(|x|)
  return V::blendv(e * big, big, x >= V(0));
}

// sigmoid(x) and sigmoid(-x) from one exponential.
template <typename V>
inline void sigmoid_pair(const V& x, V& sig, V& sig_neg) {
  const V e = exp_neg_abs(x);
  const V big = V(1) / (V(1) + e);  // sigmoid(|x|)
  const V small = e * big;          // sigmoid(-|x|), not 1 - big: that would cancel
  const V nonneg = x >= V(0);
  sig = V::blendv(small, big, nonneg);
  sig_neg = V::blendv(big, small, nonneg);
}

// The lowest row whose input failed a check inside a parallel loop (the lowest, so the error message
// does not depend on thread timing); the caller raises after the loop, since exceptions must not cross
// OpenMP regions.
struct FirstBadRow {
  std::atomic<int64_t> row{-1};
  void record(int64_t r) {
    int64_t current = row.load();
    while ((current < 0 || r < current) && !row.compare_exchange_weak(current, r)) {
    }
  }
  int64_t get() const { return row.load(); }
};

}  // namespace cai

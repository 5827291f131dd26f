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

// log1p(e^-|x|), the bounded part of softplus(x) and softplus(-x) alike.
template <typename V>
inline V log1p_exp_neg_abs(const V& x) {
  return (V(0) - x.abs()).exp().log1p();
}

template <typename V>
inline V softplus(const V& x) {
  return at::vec::maximum(x, V(0)) + log1p_exp_neg_abs(x);  // NaN-propagating maximum
}

template <typename V>
inline V sigmoid(const V& x) {
  const V e = (V(0) - x.abs()).exp();
  const V big = V(1) / (V(1) + e);  // sigmoid(|x|)
  return V::blendv(e * big, big, x >= V(0));
}

// sigmoid(x) and sigmoid(-x) from one exponential.
template <typename V>
inline void sigmoid_pair(const V& x, V& sig, V& sig_neg) {
  const V e = (V(0) - x.abs()).exp();
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

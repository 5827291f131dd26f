// Row-wise softmax statistics and gradients, the shared core of the log-prob kernels.
//
// For one row of logits x and temperature T, with z = x / T:
//   lse       = log sum_k exp(z_k)
//   log p_t   = z_t - lse
//   entropy H = lse - sum_k p_k z_k
// and for upstream gradients g (of log p_t) and h (of H), with mu = sum_k p_k z_k = lse - H:
//   dL/dz_k   = g * [k == t] - p_k * (g + h * (z_k - mu))
//   dL/dx_k   = dL/dz_k / T
#pragma once

#include <algorithm>

#include "vec_helpers.h"

namespace cai {

// z = x / T (x times the reciprocal) rounded to the accumulation type on its own, as the reference's
// logits / T is. GCC contracts `x * inv_t - c` into one fma by default (-ffp-contract=fast), which subtracts
// c from the *exact* product: with |z| near 1e10 that differs from the rounded z (the row max the
// statistics are taken against, the target's z) by up to half an ulp, hundreds of nats (exp(0) became
// inf). The empty asm hides the product from the contraction; it costs no instruction.
inline Vec scaled(const Vec& x, const Vec& inv_t) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 z = x * inv_t;
  asm("" : "+v"(z));
  return Vec(z);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 z = x * inv_t;
  asm("" : "+x"(z));
  return Vec(z);
#else
  return x * inv_t;
#endif
}
template <typename Acc>
inline Acc scaled(Acc x, Acc inv_t) {
  Acc z = x * inv_t;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  asm("" : "+x"(z));
#endif
  return z;
}

// Up to this |ref| (the row max or log-sum-exp z is compared against) the SIMD loops fold log2 e into one
// fma, x (log2 e / T) - ref log2 e: its two roundings put an error of about |ref| 2^-23 in the exponent,
// below 2e-5 here. Beyond it they round z = x / T first and subtract (exact at any |z|; one multiply more).
constexpr float kFusedRange = 128.f;

// Streaming log-sum-exp over a row fed chunk by chunk, one read of each element and one exp.
// Exponentials are taken against the running maximum known *before* the chunk (a stale reference);
// the chunk's own maximum is tracked alongside and folded in afterwards. That is exact algebra:
// sum exp(z - m_old) * exp(m_old - m_new) = sum exp(z - m_new). Only when a chunk exceeds the stale
// reference by more than kMaxExcess nats (where exp could overflow fp32) is it summed again against
// its own maximum; that happens at most on the first chunks of a row. The very first reference is
// the first chunk's maximum (one extra pass over that chunk only).
struct OnlineSoftmax {
  static constexpr float kMaxExcess = 60.f;  // exp(60) * 2^17 elements is far below FLT_MAX
  float max_z = kNegInf;   // running reference (the max of z over the chunks seen so far)
  float sum_exp = 0.f;     // sum exp(z - max_z)
  float weighted = 0.f;    // sum exp(z - max_z) * (z - max_z), only with entropy

  float lse() const { return max_z + std::log(sum_exp); }
  float entropy() const { return std::log(sum_exp) - weighted / sum_exp; }

  template <typename T>
  static float chunk_max(const T* x, int64_t n) {
    Vec m0(kNegInf), m1(kNegInf);
    int64_t i = 0;
    for (; i + kPair <= n; i += kPair) {
      Vec a, b;
      load_pair(x + i, a, b);
      m0 = at::vec::clamp_min(m0, a);  // max that ignores NaN: NaN is caught by the sum instead
      m1 = at::vec::clamp_min(m1, b);
    }
    float m = hmax(at::vec::clamp_min(m0, m1));
    for (; i < n; ++i) m = std::max(m, static_cast<float>(x[i]));
    return m;
  }

  // Sums of exp(z - ref) and exp(z - ref) * (z - ref) over a chunk, and its max of x.
  template <bool kEntropy, typename T>
  static void chunk_sums(const T* x, int64_t n, float inv_t, float ref, float& sum, float& wsum, float& max_x) {
    if (std::abs(ref) <= kFusedRange) {
      chunk_sums<kEntropy, false>(x, n, inv_t, ref, sum, wsum, max_x);
    } else {
      chunk_sums<kEntropy, true>(x, n, inv_t, ref, sum, wsum, max_x);
    }
  }

  template <bool kEntropy, bool kExact, typename T>
  static void chunk_sums(const T* x, int64_t n, float inv_t, float ref, float& sum, float& wsum, float& max_x) {
    // base 2: exp(z - ref) = 2^((z - ref) log2 e); kExact: with z = x / T rounded to fp32 first, as the tail
    // below, the chunk max (ref) and the target's z are (see kFusedRange)
    const Vec v_inv_t(inv_t), v_ref(ref), v_log2e(kLog2e), v_floor(-125.f);
    const Vec v_scale(inv_t * kLog2e), v_neg_ref(-ref * kLog2e);
    auto exponent = [&](const Vec& v) {
      if constexpr (kExact) {
        return (scaled(v, v_inv_t) - v_ref) * v_log2e;
      } else {
        return at::vec::fmadd(v, v_scale, v_neg_ref);
      }
    };
    Vec s0(0.f), s1(0.f), w0(0.f), w1(0.f), m0(kNegInf), m1(kNegInf);
    int64_t i = 0;
    for (; i + kPair <= n; i += kPair) {
      Vec a, b;
      load_pair(x + i, a, b);
      m0 = at::vec::clamp_min(m0, a);
      m1 = at::vec::clamp_min(m1, b);
      const Vec za = exponent(a), zb = exponent(b);
      const Vec ea = exp2_approx(za), eb = exp2_approx(zb);
      s0 = s0 + ea;
      s1 = s1 + eb;
      if (kEntropy) {  // -inf clamped to -125 like the exp, so 0 * (-inf) never makes a NaN
        w0 = at::vec::fmadd(ea, at::vec::clamp_min(za, v_floor), w0);
        w1 = at::vec::fmadd(eb, at::vec::clamp_min(zb, v_floor), w1);
      }
    }
    sum = hsum(s0 + s1);
    wsum = kEntropy ? hsum(w0 + w1) * kLn2 : 0.f;
    max_x = hmax(at::vec::clamp_min(m0, m1));
    for (; i < n; ++i) {
      const float xi = static_cast<float>(x[i]);
      const float z = scaled(xi, inv_t) - ref, e = std::exp(z);
      max_x = std::max(max_x, xi);
      sum += e;
      if (kEntropy && e > 0.f) wsum += e * z;
    }
  }

  template <bool kEntropy, typename T>
  void update(const T* x, int64_t n, float inv_t) {
    if (max_z == kNegInf) {
      max_z = scaled(chunk_max(x, n), inv_t);  // x -> x / T is monotone, so max commutes with it
      if (max_z == kNegInf) {           // only -inf (or NaN) so far: nothing to add but the NaN
        if (std::any_of(x, x + n, [](T v) { return v != v; })) sum_exp = NAN;
        return;
      }
    }
    float sum, wsum, max_x;
    chunk_sums<kEntropy>(x, n, inv_t, max_z, sum, wsum, max_x);
    const float chunk_max_z = scaled(max_x, inv_t);
    if (chunk_max_z > max_z + kMaxExcess) {  // exps against the stale reference may have overflowed
      rebase(chunk_max_z);
      chunk_sums<kEntropy>(x, n, inv_t, max_z, sum, wsum, max_x);
    }
    sum_exp += sum;
    weighted += wsum;
    if (chunk_max_z > max_z) rebase(chunk_max_z);
  }

  // Moves the reference to new_max: sum' = sum * e^(m - m'), and since z - m' = (z - m) + (m - m'),
  // weighted' = e^(m - m') * (weighted + sum * (m - m')).
  void rebase(float new_max) {
    const float shift = max_z - new_max, scale = std::exp(shift);
    weighted = sum_exp > 0.f ? scale * (weighted + sum_exp * shift) : 0.f;
    sum_exp *= scale;
    max_z = new_max;
  }

  // Folds in the statistics of another part of the same row (another vocabulary block), exactly
  // as if its elements had been fed to update(): both move to the larger reference, then add.
  void merge(OnlineSoftmax other) {
    if (max_z == kNegInf || other.max_z == kNegInf) {  // a side that saw only -inf (or NaN, kept in sum_exp)
      const bool nan = sum_exp != sum_exp || other.sum_exp != other.sum_exp;
      if (max_z == kNegInf) *this = other;
      if (nan) sum_exp = NAN;
      return;
    }
    if (other.max_z > max_z) {
      rebase(other.max_z);
    } else {
      other.rebase(max_z);
    }
    sum_exp += other.sum_exp;
    weighted += other.weighted;
  }
};

// Writes dL/dx_k for k in [0, n) of one row chunk (the target correction g / T is the caller's:
// it must be added in fp32 before the single rounding to the output dtype). `x` and `grad` may
// alias (in-place on an fp32 block). Entropy terms only when kEntropy.
template <bool kEntropy, bool kExact, typename TIn, typename TOut>
inline void softmax_grad_chunk_impl(const TIn* x, TOut* grad, int64_t n, float inv_t, float lse, float mu,
                                    float g, float h) {
  // p = exp(z - lse); kExact: with z = x / T rounded first (see kFusedRange)
  const Vec v_inv_t(inv_t), v_log2e(kLog2e), v_lse(lse), v_mu(mu), v_g(g), v_h(h);
  const Vec v_scale(inv_t * kLog2e), v_neg_lse(-lse * kLog2e);
  // z - mu floored where p = 0 (z = -inf: a token that can never be produced): p > 0 needs z - lse > -87, so
  // z - mu = (z - lse) + H > -87 there; a floor of -1e4 (not the lowest float) keeps h (z - mu) finite, which
  // p * coef = 0 * inf would turn into NaN
  const Vec v_neg_g_inv_t(-g * inv_t), v_lowest(-1e4f);
  int64_t i = 0;
  for (; i + kPair <= n; i += kPair) {
    Vec a, b;
    load_pair(x + i, a, b);
    Vec za, zb, pa, pb;
    if constexpr (kExact) {
      za = scaled(a, v_inv_t), zb = scaled(b, v_inv_t);
      pa = exp2_approx_exact_zero((za - v_lse) * v_log2e);  // p = exp(z - lse)
      pb = exp2_approx_exact_zero((zb - v_lse) * v_log2e);
    } else {
      za = a * v_inv_t, zb = b * v_inv_t;
      pa = exp2_approx_exact_zero(at::vec::fmadd(a, v_scale, v_neg_lse));
      pb = exp2_approx_exact_zero(at::vec::fmadd(b, v_scale, v_neg_lse));
    }
    if (kEntropy) {
      const Vec coef_a = at::vec::fmadd(v_h, vmax(za - v_mu, v_lowest), v_g);
      const Vec coef_b = at::vec::fmadd(v_h, vmax(zb - v_mu, v_lowest), v_g);
      store_pair(grad + i, Vec(0.f) - pa * coef_a * v_inv_t, Vec(0.f) - pb * coef_b * v_inv_t);
    } else {
      store_pair(grad + i, pa * v_neg_g_inv_t, pb * v_neg_g_inv_t);
    }
  }
  for (; i < n; ++i) {
    const float z = scaled(static_cast<float>(x[i]), inv_t);
    const float p = std::exp(z - lse);
    const float coef = kEntropy && p > 0.f ? g + h * (z - mu) : g;
    grad[i] = static_cast<TOut>(-p * coef * inv_t);
  }
}

template <bool kEntropy, typename TIn, typename TOut>
inline void softmax_grad_chunk(const TIn* x, TOut* grad, int64_t n, float inv_t, float lse, float mu,
                               float g, float h) {
  if (std::abs(lse) <= kFusedRange) {
    softmax_grad_chunk_impl<kEntropy, false>(x, grad, n, inv_t, lse, mu, g, h);
  } else {
    softmax_grad_chunk_impl<kEntropy, true>(x, grad, n, inv_t, lse, mu, g, h);
  }
}

// float64 inputs (gradcheck, exactness tests) take this plain scalar path, computed in double,
// with the same chunked update as the SIMD one.
struct OnlineSoftmax64 {
  double max_z = -std::numeric_limits<double>::infinity();
  double sum_exp = 0.0, weighted = 0.0;

  double lse() const { return max_z + std::log(sum_exp); }
  double entropy() const { return std::log(sum_exp) - weighted / sum_exp; }

  template <bool kEntropy>
  void update(const double* x, int64_t n, double inv_t) {
    double chunk_max_x = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) chunk_max_x = (x[i] != x[i] || chunk_max_x != chunk_max_x) ? NAN : std::max(chunk_max_x, x[i]);
    if (chunk_max_x != chunk_max_x || max_z != max_z) {
      max_z = NAN;
      return;
    }
    if (chunk_max_x == -std::numeric_limits<double>::infinity()) return;
    const double chunk_max_z = chunk_max_x * inv_t;
    if (chunk_max_z > max_z) {
      const double scale = std::exp(max_z - chunk_max_z);
      if (kEntropy) weighted = sum_exp > 0.0 ? scale * (weighted + sum_exp * (max_z - chunk_max_z)) : 0.0;
      sum_exp *= scale;
      max_z = chunk_max_z;
    }
    for (int64_t i = 0; i < n; ++i) {
      const double z = x[i] * inv_t - max_z, e = std::exp(z);
      sum_exp += e;
      if (kEntropy && e > 0.0) weighted += e * z;
    }
  }

  void merge(const OnlineSoftmax64& other) {
    if (max_z != max_z || other.max_z != other.max_z) {
      max_z = NAN;
      return;
    }
    if (other.max_z == -std::numeric_limits<double>::infinity()) return;
    if (max_z == -std::numeric_limits<double>::infinity()) {
      *this = other;
      return;
    }
    const double m = std::max(max_z, other.max_z), shift = max_z - m, other_shift = other.max_z - m;
    const double scale = std::exp(shift), other_scale = std::exp(other_shift);
    weighted = scale * (weighted + sum_exp * shift) + other_scale * (other.weighted + other.sum_exp * other_shift);
    sum_exp = scale * sum_exp + other_scale * other.sum_exp;
    max_z = m;
  }
};

template <bool kEntropy>
inline void softmax_grad_chunk(const double* x, double* grad, int64_t n, double inv_t, double lse, double mu, double g,
                               double h) {
  for (int64_t i = 0; i < n; ++i) {
    const double z = x[i] * inv_t, p = std::exp(z - lse);
    grad[i] = -p * (kEntropy && p > 0.0 ? g + h * (z - mu) : g) * inv_t;
  }
}

// The accumulator type and online-softmax state for an input dtype: fp32 for 16/32-bit floats,
// fp64 for fp64.
template <typename T>
struct Accumulate {
  using type = float;
  using softmax = OnlineSoftmax;
};
template <>
struct Accumulate<double> {
  using type = double;
  using softmax = OnlineSoftmax64;
};

// dL/dx at the target itself, in fp32: (g * (1 - p_t) - h * p_t * (z_t - mu)) / T. Computing the
// whole value before rounding keeps `p - 1` exact in bf16 (adding g/T to a rounded -p/T would not).
template <typename Acc>
inline Acc softmax_grad_at_target(Acc x_t, Acc inv_t, Acc lse, Acc mu, Acc g, Acc h) {
  const Acc z = scaled(x_t, inv_t);
  const Acc p = std::exp(z - lse);
  const Acc entropy_term = (h != Acc(0) && p > Acc(0)) ? h * p * (z - mu) : Acc(0);
  return (g * (Acc(1) - p) - entropy_term) * inv_t;
}

}  // namespace cai

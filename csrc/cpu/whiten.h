// Masked whitening over a whole batch: per-row moments (two passes over a row, the second from
// cache), merged in row order into batch moments (Chan et al.), then one normalizing pass.
//   out = (x - mean) / sqrt(var + eps) (+ mean when !shift_mean) on response tokens, 0 elsewhere;
//   var = M2 / (n - 1) if unbiased (M2 / n if n <= 1), M2 / n otherwise; n = 0 gives all zeros.
#pragma once

#include "masked_rows.h"

namespace cai {

template <typename T, typename M>
Moments row_moments(const T* x, const M* mask, int64_t n) {
  // Sums of x - shift, the shift being the row's first response value: with values like 1e4 +- 1
  // a float sum of x itself would lose the mean's last digits, and every whitened value with them.
  int64_t first = 0;
  while (first < n && mask[first] == M(0)) ++first;
  Moments out;
  if (first == n) return out;
  const float shift = static_cast<float>(x[first]);
  const Vec s(shift);
  LaneSum sum, count;
  Vec spread(0.f);  // max |x - shift|: sizes the scaling of the squares below
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const Vec m = mask_vec(mask + t);
    const Vec d = (load_floats(x + t) - s) & m;
    sum.add(d);
    spread = at::vec::maximum(spread, d.abs());
    count.add(ones_where(m));
  }
  if (t < n) {
    const Vec m = mask_vec(mask + t, n - t);
    const Vec d = (load_floats(x + t, n - t) - s) & m;
    sum.add(d);
    spread = at::vec::maximum(spread, d.abs());
    count.add(ones_where(m));
  }
  out.count = count.value();
  out.mean = shift + sum.value() / out.count;
  // sum (x - c)^2 about the float-rounded mean c, corrected to M2 = sum (x - mean)^2 exactly. The squares
  // of deviations beyond 2^57 (inputs near 1e20) overflow fp32: they are taken of d 2^-k instead, k chosen
  // so that |d| 2^-k < 2^58 (|x - c| <= 2 max |x - shift|) and a lane's kFlush squares stay finite.
  const float widest = hmax(spread);
  const int k = std::isfinite(widest) && widest > 0x1p56f ? std::ilogb(widest) - 56 : 0;
  const float center = static_cast<float>(out.mean);
  const Vec c(center), down(std::ldexp(1.f, -k));
  LaneSum squares;
  for (t = 0; t + kLanes <= n; t += kLanes) {
    const Vec d = ((load_floats(x + t) - c) & mask_vec(mask + t)) * down;
    squares.add(d * d);
  }
  if (t < n) {
    const Vec d = ((load_floats(x + t, n - t) - c) & mask_vec(mask + t, n - t)) * down;
    squares.add(d * d);
  }
  const double offset = out.mean - center;
  out.m2 = std::max(0.0, std::ldexp(squares.value(), 2 * k) - out.count * offset * offset);
  return out;
}

template <typename M>
Moments row_moments(const double* x, const M* mask, int64_t n) {
  Moments out;
  double sum = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    if (mask[t] != M(0)) {
      out.count += 1.0;
      sum += x[t];
    }
  }
  if (out.count == 0.0) return out;
  out.mean = sum / out.count;
  for (int64_t t = 0; t < n; ++t) {
    if (mask[t] != M(0)) out.m2 += (x[t] - out.mean) * (x[t] - out.mean);
  }
  return out;
}

// The affine map applied to response tokens: out = ((x - mean_hi) - mean_lo) * scale + add_back.
// The mean is split into its rounded value and the rounding error: x - mean_hi is exact for x
// near the mean, so a large offset (1e4 +- 1) costs no precision.
template <typename A>
struct WhitenMap {
  A mean_hi, mean_lo, scale, add_back;
};

template <typename A>
WhitenMap<A> whiten_map(const Moments& batch, bool shift_mean, bool unbiased, double eps) {
  const double n = batch.count;
  const double var = n == 0.0 ? 0.0 : batch.m2 / (unbiased && n > 1.0 ? n - 1.0 : n);
  const double scale = 1.0 / std::sqrt(var + eps);
  const A mean_hi = static_cast<A>(batch.mean);
  return {mean_hi, static_cast<A>(batch.mean - static_cast<double>(mean_hi)), static_cast<A>(scale),
          static_cast<A>(shift_mean ? 0.0 : batch.mean)};
}

template <typename T, typename M>
void whiten_row(const T* x, const M* mask, float* out, int64_t n, const WhitenMap<float>& map) {
  const Vec mean_hi(map.mean_hi), mean_lo(map.mean_lo), scale(map.scale), add_back(map.add_back);
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const Vec centered = (load_floats(x + t) - mean_hi) - mean_lo;
    (at::vec::fmadd(centered, scale, add_back) & mask_vec(mask + t)).store(out + t);
  }
  if (t < n) {
    const Vec centered = (load_floats(x + t, n - t) - mean_hi) - mean_lo;
    (at::vec::fmadd(centered, scale, add_back) & mask_vec(mask + t, n - t)).store(out + t, n - t);
  }
}

template <typename M>
void whiten_row(const double* x, const M* mask, double* out, int64_t n, const WhitenMap<double>& map) {
  for (int64_t t = 0; t < n; ++t) out[t] = mask[t] != M(0) ? (x[t] - map.mean_hi) * map.scale + map.add_back : 0.0;
}

// Normalizes rows [0, B) of x into out ((B, T) contiguous; out may be x itself) with the batch
// moments merged from the per-row ones.
template <typename X, typename M, typename A>
void whiten_batch(const Rows<X>& x, const Rows<M>& mask, A* out, int64_t B, int64_t T,
                  const std::vector<Moments>& row_stats, bool shift_mean, bool unbiased, double eps) {
  const WhitenMap<A> map = whiten_map<A>(merge_rows(row_stats), shift_mean, unbiased, eps);
  at::parallel_for(0, B, ppo_row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) whiten_row(x.row(r), mask.row(r), out + r * T, T, map);
  });
}

}  // namespace cai

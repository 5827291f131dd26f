// (B, T) rows with a response mask, shared by the PPO kernels (kl_penalty, gae, masked_whiten,
// ppo_advantages, ppo_policy_loss, ppo_value_loss): row access, response masks of any dtype, masked
// sums, and the overloads that let one per-token formula serve both the SIMD and the fp64 path.
//
// Every PPO tensor is (B, T) with a unit stride along T (the Python side makes a copy only when that
// is not so) and any row stride. A response mask is read in its own dtype (bool / uint8, int32,
// int64, float32): nonzero = response token. In SIMD code a mask becomes a vector of all-ones /
// all-zeros lanes, so `keep(mask, x)` zeroes masked lanes *and* any NaN or inf that padding held.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec_helpers.h"

namespace cai {

constexpr int64_t kLanes = Vec::size();

// A (B, T) tensor's data with its row stride (elements); column stride 1.
template <typename T>
struct Rows {
  using Elem = T;
  const T* data;
  int64_t stride;
  const T* row(int64_t r) const { return data + r * stride; }
};

// Checks that x is a (B, T) tensor with a unit stride along T (the layout the Python side guarantees).
inline void check_rows(const at::Tensor& x, const char* name, int64_t B, int64_t T) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == T && (T <= 1 || x.stride(1) == 1), name,
              " must be a (B, T) tensor with unit stride along T");
}

// The options of an op's output: fp32, or fp64 for fp64 inputs.
inline at::TensorOptions acc_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), "expected a (B, T) tensor with unit stride along T");
  return {x.const_data_ptr<T>(), x.stride(0)};
}

// Calls f(const M* mask_data) with the mask's element type: bool is read as uint8.
template <typename F>
void dispatch_mask(const at::Tensor& mask, F&& f) {
  switch (mask.scalar_type()) {
    case at::kBool:
    case at::kByte:
      return f(static_cast<const uint8_t*>(mask.const_data_ptr()));
    case at::kInt:
      return f(mask.const_data_ptr<int32_t>());
    case at::kLong:
      return f(mask.const_data_ptr<int64_t>());
    case at::kFloat:
      return f(mask.const_data_ptr<float>());
    default:
      TORCH_CHECK(false, "response_mask must be bool, uint8, int32, int64 or float32 here; got ", mask.scalar_type());
  }
}

// Calls f(T{}, Rows<M>) for the values' dtype T (float, BFloat16, Half, double) and the mask's rows.
template <typename F>
void dispatch_values_and_mask(at::ScalarType values, const at::Tensor& mask, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values, "cai_kernels PPO op", [&] {
    dispatch_mask(mask, [&](const auto* mask_data) {
      using M = std::remove_cv_t<std::remove_pointer_t<decltype(mask_data)>>;
      f(scalar_t{}, Rows<M>{mask_data, mask.stride(0)});
    });
  });
}

// All-ones lanes where p[i] != 0. A fixed-size loop the compiler turns into a vector compare.
template <typename M>
inline Vec mask_vec(const M* p) {
  alignas(64) int32_t bits[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) bits[i] = p[i] != M(0) ? -1 : 0;
  return Vec::loadu(bits);
}

// Same for n < kLanes elements (row tails); the other lanes are off.
template <typename M>
inline Vec mask_vec(const M* p, int64_t n) {
  alignas(64) int32_t bits[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) bits[i] = p[i] != M(0) ? -1 : 0;
  return Vec::loadu(bits);
}

// Loads n <= kLanes elements of a float / bf16 / fp16 row as floats (zeros past n).
template <typename T>
inline Vec load_floats(const T* p, int64_t n) {
  alignas(64) float buf[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  return Vec::loadu(buf);
}
template <typename T>
inline Vec load_floats(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    return load_floats(p, kLanes);
  }
}

// e^x in about 15 instructions, within 2 ulp: x = n ln2 + f with the Cody-Waite split of ln2 (exact
// f for |x| < 2^12), e^f by its Taylor polynomial on |f| <= ln2 / 2 (truncation < 6e-9), 2^n
// added into the exponent bits. Overflows to +inf above 88.72, flushes to 0 below -87.3 (no
// denormals); NaN stays NaN. Sleef's exp took ~50 cycles a vector on this machine.
inline Vec exp_fast(const Vec& x) {
  const Vec n = (x * Vec(kLog2e)).round();
  Vec f = at::vec::fmadd(n, Vec(-0.693145751953125f), x);  // ln2 = 0.693145751953125 + 1.428606765330187e-06
  f = at::vec::fmadd(n, Vec(-1.428606765330187e-06f), f);
  Vec p(1.f / 5040);
  p = at::vec::fmadd(p, f, Vec(1.f / 720));
  p = at::vec::fmadd(p, f, Vec(1.f / 120));
  p = at::vec::fmadd(p, f, Vec(1.f / 24));
  p = at::vec::fmadd(p, f, Vec(1.f / 6));
  p = at::vec::fmadd(p, f, Vec(0.5f));
  p = at::vec::fmadd(p, f, Vec(1.f));
  p = at::vec::fmadd(p, f, Vec(1.f));
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec n_clamped = at::vec::clamp(n, Vec(-126.f), Vec(127.f));  // keeps the exponent add in range
  const IVec shifted = at::vec::convert_to_int_of_same_size(n_clamped) << IVec(23);
  const Vec scaled = at::vec::cast<float>(at::vec::cast<int32_t>(p) + shifted);
  const Vec overflow = x > Vec(88.72283935546875f), underflow = x < Vec(-87.33654022216797f);
  return Vec::blendv(Vec::blendv(scaled, Vec(0.f), underflow), Vec(std::numeric_limits<float>::infinity()), overflow);
}

// ---- one formula, two forms ----------------------------------------------------------------------
// Per-token formulas are templates over V: Vec (fp32 SIMD lanes; a comparison gives all-ones lanes)
// for fp32 / bf16 / fp16 inputs, or double (the fp64 path; a comparison gives bool). The overloads
// below bridge the two, so each formula is written once.
template <typename T>
using Lanes = std::conditional_t<std::is_same_v<T, double>, double, Vec>;

inline Vec select(const Vec& cond, const Vec& if_true, const Vec& if_false) { return Vec::blendv(if_false, if_true, cond); }
inline double select(bool cond, double if_true, double if_false) { return cond ? if_true : if_false; }
inline Vec keep(const Vec& cond, const Vec& x) { return x & cond; }  // x where cond, else 0 (even for NaN x)
inline double keep(bool cond, double x) { return cond ? x : 0.0; }
inline Vec both(const Vec& a, const Vec& b) { return a & b; }
inline bool both(bool a, bool b) { return a && b; }
inline Vec indicator(const Vec& cond) { return Vec(1.f) & cond; }
inline double indicator(bool cond) { return cond ? 1.0 : 0.0; }
inline Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
inline double maximum(double a, double b) { return a != a || b != b ? a + b : std::max(a, b); }  // NaN in, NaN out
inline Vec minimum(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
inline double minimum(double a, double b) { return a != a || b != b ? a + b : std::min(a, b); }
inline Vec clamp(const Vec& x, const Vec& lo, const Vec& hi) { return at::vec::clamp(x, lo, hi); }
inline double clamp(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }
inline Vec exp_of(const Vec& x) { return exp_fast(x); }
inline double exp_of(double x) { return std::exp(x); }
inline Vec abs_of(const Vec& x) { return x.abs(); }
inline double abs_of(double x) { return std::abs(x); }

// Calls f(offset, count) over a row of n elements: kLanes at a time (a partial step at the tail)
// for fp32 / bf16 / fp16 rows, one at a time for fp64 rows.
template <typename T, typename F>
inline void walk_row(int64_t n, F&& f) {
  const int64_t step = std::is_same_v<T, double> ? 1 : kLanes;
  int64_t t = 0;
  for (; t + step <= n; t += step) f(t, step);
  if (t < n) f(t, n - t);
}

template <typename T>
inline Lanes<T> load_lanes(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    return *p;
  } else {
    return n == kLanes ? load_floats(p) : load_floats(p, n);
  }
}

template <typename T, typename M>
inline auto mask_lanes(const M* p, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    return *p != M(0);
  } else {
    return n == kLanes ? mask_vec(p) : mask_vec(p, n);
  }
}

// Stores n lanes of x (floats, rounded once to T) or the one double.
template <typename T>
inline void store_lanes(T* dst, const Lanes<T>& x, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    *dst = x;
  } else if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) {
      x.store(dst);
    } else {
      x.store(dst, n);
    }
  } else {
    alignas(64) float buf[kLanes];
    x.store(buf);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}

// A sum of many floats kept in SIMD lanes and flushed into a double every kFlush additions, so a
// long row (T = 32768) loses no more precision than a 1024-element float sum.
struct LaneSum {
  static constexpr int kFlush = 128;
  Vec lanes = Vec(0.f);
  double total = 0.0;
  int pending = 0;
  void add(const Vec& x) {
    lanes = lanes + x;
    if (++pending == kFlush) flush();
  }
  void add(double x) { total += x; }  // the fp64 path
  void flush() {
    alignas(64) float buf[kLanes];
    lanes.store(buf);
    for (int64_t i = 0; i < kLanes; ++i) total += buf[i];
    lanes = Vec(0.f);
    pending = 0;
  }
  double value() {
    flush();
    return total;
  }
};

inline Vec ones_where(const Vec& mask) { return Vec(1.f) & mask; }

// Rows handed to one thread at a time for (B, T) work: enough elements to amortize the threading.
inline int64_t ppo_row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

// Count, mean and sum of squared deviations (M2) of a set of numbers; merged with Chan et al.'s
// pairwise update, so per-row statistics combine into batch statistics without cancellation.
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
  void merge(const Moments& other) {
    if (other.count == 0.0) return;
    const double total = count + other.count, delta = other.mean - mean;
    mean += delta * other.count / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }
};

// Moments merged in row order after a parallel pass: the result does not depend on the thread count.
inline Moments merge_rows(const std::vector<Moments>& rows) {
  Moments total;
  for (const Moments& m : rows) total.merge(m);
  return total;
}

}  // namespace cai

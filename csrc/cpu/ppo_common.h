// Shared pieces of the PPO kernels: (B, T) row access, response masks of any dtype, masked sums.
//
// Every PPO tensor is (B, T) with a unit stride along T (the Python side makes a copy only when that
// is not so) and any row stride. A response mask is read in its own dtype (bool / uint8, int32,
// int64, float32): nonzero = response token. In SIMD code a mask becomes a vector of all-ones /
// all-zeros lanes, so `x & mask` zeroes masked lanes *and* any NaN or inf that padding held.
#pragma once

#include <vector>

#include "vec_helpers.h"

namespace cai {

constexpr int64_t kLanes = Vec::size();

// A (B, T) tensor's data with its row stride (elements); column stride 1.
template <typename T>
struct Rows {
  const T* data;
  int64_t stride;
  const T* row(int64_t r) const { return data + r * stride; }
};

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

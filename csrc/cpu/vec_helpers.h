// Shared SIMD helpers for the CPU kernels.
//
// Every kernel reads fp32 / bf16 / fp16 and computes in fp32. The helpers below load and store
// "a pair" of float vectors: 2 * Vec::size() elements, which is exactly one Vectorized<BFloat16>
// (or Half) register, so the same loop body serves all three dtypes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>

#include <cmath>
#include <cstdlib>
#include <limits>

namespace cai {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kPair = 2 * Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();

template <typename T>
inline void load_pair(const T* p, Vec& a, Vec& b) {
  static_assert(at::vec::Vectorized<T>::size() == kPair, "16-bit vector must hold two float vectors");
  std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}
template <>
inline void load_pair<float>(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + Vec::size());
}

template <typename T>
inline void store_pair(T* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}
template <>
inline void store_pair<float>(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + Vec::size());
}

// NaN-propagating maximum: a NaN anywhere in a row must make that row's result NaN.
inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
inline float hmax(const Vec& v) { return at::vec::vec_reduce_all<float>(vmax, v); }
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}
inline float nan_max(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }

// 2^x, about 2 ulp, for x <= 126: 2^x = 2^n * 2^f with n = round(x), f in [-0.5, 0.5], a degree-5
// minimax polynomial for 2^f (max relative error 2.3e-7), and n added straight into the exponent
// bits. Inputs below -125 (including -inf) are clamped there and give ~2^-125 instead of 0; NaN
// stays NaN. About half the instructions of Sleef / exp_u20, which matters: on AVX2 the softmax
// loops are bound by this function, not by memory.
inline Vec exp2_approx(const Vec& x) {
  const Vec clamped = at::vec::clamp_min(x, Vec(-125.f));  // NaN-propagating
  const Vec n = clamped.round();
  const Vec f = clamped - n;
  Vec p = at::vec::fmadd(Vec(0.001327647129073739f), f, Vec(0.009675540961325169f));
  p = at::vec::fmadd(p, f, Vec(0.05550713092088699f));
  p = at::vec::fmadd(p, f, Vec(0.24022120237350464f));
  p = at::vec::fmadd(p, f, Vec(0.6931469440460205f));
  p = at::vec::fmadd(p, f, Vec(1.0000001192092896f));
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec exponent_shift = at::vec::convert_to_int_of_same_size(n) << IVec(23);
  return at::vec::cast<float>(at::vec::cast<int32_t>(p) + exponent_shift);
}

// Same, but exactly 0 below -125 (so exp(-inf) == 0, as a probability must be).
inline Vec exp2_approx_exact_zero(const Vec& x) {
  return Vec::blendv(exp2_approx(x), Vec(0.f), x < Vec(-125.f));
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows of a (outer, inner, V) tensor whose last dim is contiguous: row r lives at
// (r / inner) * stride_outer + (r % inner) * stride_inner. Python collapses any (..., V) view
// into this form without copying (see cai_kernels/ops/_layout.py).
struct RowLayout {
  int64_t inner, stride_outer, stride_inner;
  explicit RowLayout(const at::Tensor& x3d)
      : inner(x3d.size(1)), stride_outer(x3d.stride(0)), stride_inner(x3d.stride(1)) {}
  int64_t offset(int64_t row) const { return (row / inner) * stride_outer + (row % inner) * stride_inner; }
};

// An uninitialized tensor for a large output (a [rows, V] gradient), backed by transparent huge
// pages where the OS allows it. Fresh memory is faulted in page by page on first write; with 4 KB
// pages that costs more than the kernel itself (measured: 0.27 s to allocate and fill 805 MB, 0.055 s
// with 2 MB pages). Small outputs use the regular allocator.
inline at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < 4 * kHugePage) return at::empty(sizes, options);
  const size_t padded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, padded);
  if (data == nullptr) return at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  madvise(data, padded, MADV_HUGEPAGE);  // advisory: failure just means 4 KB pages
#endif
  return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
}

// Rows handed to one thread at a time: enough elements that the threading overhead is amortized.
inline int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_length, 1)); }

}  // namespace cai

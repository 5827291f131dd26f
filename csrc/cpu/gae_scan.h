// The GAE reverse scan, vectorized across rows.
//
// GAE is sequential in t but independent across rows. Each SIMD lane owns one row: a group of
// kLanes rows is staged chunk by chunk (kChunk time steps, walking from the end of the rows) into
// an L1-resident tile, transposed so that one vector holds one time step of every row, scanned
// with one FMA chain per step for all rows at once, and transposed back. Per step and lane, with
// m the response mask (all-ones lanes on response tokens):
//   delta   = r + gamma * next_value - v
//   running = m ? delta + gamma * lam * running : running        (carried through masked steps)
//   next_value = m ? v : next_value
//   advantage = running & m,  return = (running + v) & m         (0 on masked steps)
// A "stager" fills the tile's column form (rewards, values, mask bits) for each chunk: from plain
// tensors for gae(), with rewards computed on the fly from log-probs for the fused ppo_advantages().
#pragma once

#include <cstring>
#include <memory>

#include "whiten.h"

namespace cai {

constexpr int64_t kChunk = 64;  // time steps per tile; a multiple of kLanes for 8- and 16-lane builds
static_assert(kChunk % kLanes == 0, "a chunk must hold whole kLanes x kLanes blocks");

struct alignas(64) ScanTile {
  // Row form (kLanes rows of kChunk steps): staged rewards, values, mask bits; reused for outputs.
  float rows[3][kLanes * kChunk];
  // Column form (kChunk steps of kLanes rows): rewards, values, mask bits, advantages, returns.
  float cols[5][kChunk * kLanes];
};

// rows (kLanes rows of n steps, leading dimension ld) -> cols (n x kLanes), and back. The rows may
// be the tensors themselves (fp32 inputs, (B, T) fp32 outputs) or the tile's row buffers.
inline void rows_to_cols(const float* rows, int64_t ld, float* cols, int64_t n) {
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) at::vec::transpose_mxn<float, kLanes, kLanes>(rows + t, ld, cols + t * kLanes, kLanes);
  for (; t < n; ++t) {
    for (int64_t k = 0; k < kLanes; ++k) cols[t * kLanes + k] = rows[k * ld + t];
  }
}

inline void cols_to_rows(const float* cols, float* rows, int64_t ld, int64_t n) {
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) at::vec::transpose_mxn<float, kLanes, kLanes>(cols + t * kLanes, kLanes, rows + t, ld);
  for (; t < n; ++t) {
    for (int64_t k = 0; k < kLanes; ++k) rows[k * ld + t] = cols[t * kLanes + k];
  }
}

// Element copies and conversions as explicit vector loops: GCC turns a plain copy loop into a
// `rep movsq`, which was 70 % of gae's time on this AMD machine at these 256-byte sizes.
template <typename T>
inline void to_floats(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kPair <= n; i += kPair) {
    Vec a, b;
    load_pair(src + i, a, b);
    a.store(dst + i);
    b.store(dst + i + kLanes);
  }
  for (; i < n; i += kLanes) load_floats(src + i, std::min(kLanes, n - i)).store(dst + i, std::min(kLanes, n - i));
}

// Mask bits as floats: all-ones (a NaN pattern, only ever moved and used as a blend mask) or zero.
template <typename M>
inline void to_mask_bits(const M* src, float* dst, int64_t n) {
  auto* bits = reinterpret_cast<int32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) bits[i] = src[i] != M(0) ? -1 : 0;
}

// Column form of steps [lo, lo + n) of rows [r0, r0 + rows): straight from the tensor when it is
// fp32 and the group is full, else through the row buffer (converted; missing rows are zeros).
template <typename T>
inline void stage_cols(const Rows<T>& x, int64_t r0, int64_t rows, int64_t lo, int64_t n, float* row_buf, float* cols) {
  if constexpr (std::is_same_v<T, float>) {
    if (rows == kLanes) return rows_to_cols(x.row(r0) + lo, x.stride, cols, n);
  }
  for (int64_t k = 0; k < kLanes; ++k) {
    if (k < rows) {
      to_floats(x.row(r0 + k) + lo, row_buf + k * kChunk, n);
    } else {
      std::fill(row_buf + k * kChunk, row_buf + k * kChunk + n, 0.f);
    }
  }
  rows_to_cols(row_buf, kChunk, cols, n);
}

template <typename M>
inline void stage_mask_rows(const Rows<M>& mask, int64_t r0, int64_t rows, int64_t lo, int64_t n, float* row_buf) {
  for (int64_t k = 0; k < kLanes; ++k) {
    if (k < rows) {
      to_mask_bits(mask.row(r0 + k) + lo, row_buf + k * kChunk, n);
    } else {
      std::fill(row_buf + k * kChunk, row_buf + k * kChunk + n, 0.f);
    }
  }
}

// Prefetches n elements from p into the cache (for_write: a line about to be written).
template <typename T>
inline void prefetch_span(const T* p, int64_t n, bool for_write = false) {
  const char* begin = reinterpret_cast<const char*>(p);
  const char* end = reinterpret_cast<const char*>(p + n);
  for (const char* line = begin; line < end; line += 64) {
    if (for_write) {
      __builtin_prefetch(line, 1);
    } else {
      __builtin_prefetch(line, 0);
    }
  }
}

struct ScanParams {
  float gamma, gamma_lambda;
};

// Scans rows [r0, r0 + rows) (rows <= kLanes) over all T steps; advantages and returns are written
// to (B, T) contiguous fp32 outputs.
template <typename Stager>
void scan_row_group(const Stager& stager, int64_t r0, int64_t rows, int64_t T, const ScanParams& p, float* adv,
                    float* ret, ScanTile& tile) {
  const Vec v_gamma(p.gamma), v_gamma_lambda(p.gamma_lambda);
  Vec next_value(0.f), running(0.f);
  for (int64_t hi = T; hi > 0;) {
    const int64_t n = std::min(kChunk, hi), lo = hi - n;
    // The walk goes backwards through memory, one short span per row: the hardware prefetchers
    // do not follow it, so the next chunk of every row is requested while this one is scanned.
    const int64_t next_n = std::min(kChunk, lo), next_lo = lo - next_n;
    for (int64_t k = 0; k < rows && next_n > 0; ++k) {
      stager.prefetch(r0 + k, next_lo, next_n);
      prefetch_span(adv + (r0 + k) * T + next_lo, next_n, true);
      prefetch_span(ret + (r0 + k) * T + next_lo, next_n, true);
    }
    stager.stage(r0, rows, lo, n, tile);
    const float *rew = tile.cols[0], *val = tile.cols[1], *bits = tile.cols[2];
    float *adv_cols = tile.cols[3], *ret_cols = tile.cols[4];
    for (int64_t t = n - 1; t >= 0; --t) {
      const Vec m = Vec::loadu(bits + t * kLanes);
      const Vec v = Vec::loadu(val + t * kLanes);
      const Vec delta = at::vec::fmadd(v_gamma, next_value, Vec::loadu(rew + t * kLanes)) - v;
      running = Vec::blendv(running, at::vec::fmadd(v_gamma_lambda, running, delta), m);
      next_value = Vec::blendv(next_value, v, m);
      (running & m).store(adv_cols + t * kLanes);
      ((running + v) & m).store(ret_cols + t * kLanes);
    }
    if (rows == kLanes) {
      cols_to_rows(adv_cols, adv + r0 * T + lo, T, n);
      cols_to_rows(ret_cols, ret + r0 * T + lo, T, n);
    } else {
      cols_to_rows(adv_cols, tile.rows[0], kChunk, n);
      cols_to_rows(ret_cols, tile.rows[1], kChunk, n);
      for (int64_t k = 0; k < rows; ++k) {
        to_floats(tile.rows[0] + k * kChunk, adv + (r0 + k) * T + lo, n);
        to_floats(tile.rows[1] + k * kChunk, ret + (r0 + k) * T + lo, n);
      }
    }
    hi = lo;
  }
}

// The same recursion for one row in double (fp64 inputs: gradcheck-grade exactness tests).
template <typename M>
void scan_row_scalar(const double* rewards, const double* values, const M* mask, int64_t T, double gamma,
                     double lam, double* adv, double* ret) {
  double next_value = 0.0, running = 0.0;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (mask[t] != M(0)) {
      const double delta = rewards[t] + gamma * next_value - values[t];
      running = delta + gamma * lam * running;
      next_value = values[t];
      adv[t] = running;
      ret[t] = running + values[t];
    } else {
      adv[t] = ret[t] = 0.0;
    }
  }
}

// Runs the scan over all rows in parallel, groups of kLanes rows per task step. After each group,
// `after_group(r0, rows)` runs on the same thread (while the group's outputs are still in cache).
template <typename Stager, typename AfterGroup>
void scan_all_rows(const Stager& stager, int64_t B, int64_t T, const ScanParams& p, float* adv, float* ret,
                   AfterGroup&& after_group) {
  const int64_t groups = (B + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, ppo_row_grain(T) / kLanes);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<ScanTile> tile(new ScanTile);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t r0 = g * kLanes, rows = std::min(kLanes, B - r0);
      for (int64_t k = 0; k < rows; ++k) stager.prepare(r0 + k);
      scan_row_group(stager, r0, rows, T, p, adv, ret, *tile);
      after_group(r0, rows);
    }
  });
}

}  // namespace cai

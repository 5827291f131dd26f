// Target-index bookkeeping shared by the log-prob kernels: ignore_index, and the range check that
// turns a bad target into a Python ValueError instead of an out-of-bounds read.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <optional>

#include "errors.h"

namespace cai {

// The rows the caller asks to skip: those whose target equals its ignore_index (none when it is unset).
struct IgnoreIndex {
  bool set;
  int64_t index;
  explicit IgnoreIndex(const std::optional<int64_t>& ignore_index)
      : set(ignore_index.has_value()), index(ignore_index.value_or(0)) {}
  bool operator()(int64_t t) const { return set && t == index; }
};

// A target outside [0, V) that is not ignore_index: record the first offending row, then raise
// after the parallel loop (exceptions must not cross OpenMP regions).
struct BadTarget {
  std::atomic<int64_t> row{-1};
  void record(int64_t r) {
    int64_t expected = -1;
    row.compare_exchange_strong(expected, r);
  }
};

inline void check_targets(const BadTarget& bad, const int64_t* targets, int64_t V) {
  const int64_t r = bad.row.load();
  CAI_CHECK_VALUE(r < 0, "targets must lie in [0, ", V, ") or equal ignore_index; got targets[", r,
                    "] = ", r < 0 ? 0 : targets[r]);
}

// The same check as a serial pass up front, for kernels that would otherwise do expensive work
// (GEMMs) before reaching the bad row.
inline void check_targets_in_range(const int64_t* targets, int64_t n_rows, int64_t V, const IgnoreIndex& ignored) {
  BadTarget bad;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t t = targets[r];
    if ((t < 0 || t >= V) && !ignored(t)) {
      bad.record(r);
      break;
    }
  }
  check_targets(bad, targets, V);
}

}  // namespace cai

// How the CPU kernels share out work across threads (at::parallel_for, i.e. torch's OpenMP pool, so that
// torch.set_num_threads applies). The only kernel-side header that sees ATen; the math lives elsewhere.
//
//   * row reductions (row_stats, jsd_rows): one task per row; when there are few rows for the threads, each row is
//     cut into a few block-aligned column segments whose partial states are merged afterwards (row_state.h);
//   * gradients (logits_grad, jsd_grad): elementwise once the row statistics are known, so the tasks are
//     (row, column tile) pairs, which also balances rows of different cost (inactive rows, rows that need p).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace minillm {
namespace cpu {

// Enough work per task to amortise scheduling (elements).
constexpr int64_t kMinTaskElements = 1 << 15;

template <class F>
inline void parallel_for(int64_t n_tasks, int64_t grain, const F& f) {
  at::parallel_for(0, n_tasks, std::max<int64_t>(grain, 1), f);
}

// Tasks per chunk handed to a thread so that each chunk holds at least kMinTaskElements elements.
inline int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(elements_per_task, 1));
}

// Number of column segments per row for a row reduction: 1 unless rows are scarce (< 4 per thread).
inline int64_t segments_per_row(int64_t n_rows, int64_t vocab, int64_t block) {
  const int64_t threads = at::get_num_threads();
  if (n_rows <= 0 || threads <= 1 || n_rows >= 4 * threads) return 1;
  const int64_t wanted = (4 * threads + n_rows - 1) / n_rows;
  const int64_t blocks = (vocab + block - 1) / block;
  const int64_t most = std::max<int64_t>(1, std::min(blocks, vocab / kMinTaskElements));
  return std::max<int64_t>(1, std::min(wanted, most));
}

// Start column of segment j of `segments` over [0, vocab), aligned to `block` (segment `segments` ends at vocab).
inline int64_t segment_begin(int64_t j, int64_t segments, int64_t vocab, int64_t block) {
  if (j >= segments) return vocab;
  const int64_t blocks = (vocab + block - 1) / block;
  return std::min(vocab, (blocks * j / segments) * block);
}

}  // namespace cpu
}  // namespace minillm

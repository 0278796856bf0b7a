// CPU kernel of sample_rows (kernels.h): an inverse-CDF draw per row, from the teacher's or the student's softmax.
//
// Pass 1 (online, row_state.h): the row's max m and normaliser s = sum_v exp(x'_v - m), one exp per element.
// Pass 2: e_v = exp(x'_v - m) block by block; a block whose sum keeps the running cumulative sum at or below
// uniform * s is skipped with one vector sum, and the block where it crosses is scanned in order for the first v
// with cumsum_v > uniform * s and e_v > 0. If rounding leaves the total just below the target, the draw falls back
// to the last entry with e_v > 0. A row whose chosen distribution is empty (all -inf) gives -1. Only the chosen row
// is read; cumulative sums are in double.
#include <cmath>

#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/row_loops.h"
#include "cpu/row_state.h"
#include "cpu/simd.h"

namespace minillm {
namespace cpu {
namespace {

using simd::Vec;

template <class T>
int64_t sample_row(const T* x, int64_t vocab, float inv_temp, double uniform) {
  const Vec it = simd::set1(inv_temp);
  OnlineSoftmax dist(inv_temp);  // the raw m and s (c unused)
  for (int64_t b = 0; b < vocab; b += kBlock) {
    const int64_t e = std::min(vocab, b + kBlock);
    dist.rescale_to(std::max(dist.m, range_max(x, b, e)));
    const Vec shift = simd::set1(dist.shift());
    Vec acc = simd::zero();
    for_each_vector(b, e, [&](int64_t i, int n, auto tag) {
      acc = acc + simd::exp(simd::centre(ld(x + i, n, tag), shift, it));
    });
    dist.s += simd::reduce_add(acc);
  }
  if (!(dist.s > 0.0)) return -1;  // empty row (or NaN)

  const double target = uniform * dist.s;
  const Vec shift = simd::set1(dist.shift());
  alignas(64) float e_block[kBlock + simd::kWidth];
  double cumulative = 0.0;
  int64_t last_positive = -1;
  for (int64_t b = 0; b < vocab; b += kBlock) {
    const int64_t e = std::min(vocab, b + kBlock);
    Vec acc = simd::zero();
    for_each_vector(b, e, [&](int64_t i, int n, auto tag) {
      const Vec ev = simd::exp(simd::centre(ld(x + i, n, tag), shift, it));  // padded lanes: exp(-inf) = 0
      acc = acc + ev;
      simd::store(e_block + (i - b), ev);
    });
    const double block_sum = simd::reduce_add(acc);
    if (block_sum > 0.0) {
      for (int64_t k = e - b - 1; k >= 0; --k) {
        if (e_block[k] > 0.0f) {
          last_positive = b + k;
          break;
        }
      }
    }
    // Scan when the crossing may lie in this block (with slack for the different summation order).
    if (cumulative + block_sum * (1.0 + 1e-5) >= target) {
      double c = cumulative;
      for (int64_t k = 0; k < e - b; ++k) {
        c += e_block[k];
        if (c > target && e_block[k] > 0.0f) return b + k;
      }
      cumulative = c;
    } else {
      cumulative += block_sum;
    }
  }
  return last_positive;
}

}  // namespace

template <class TZ, class TU>
void sample_rows(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const bool* use_teacher,
                 const double* uniform, float inv_temp, int64_t* out) {
  parallel_for(n_rows, grain_for(2 * vocab), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      out[r] = use_teacher[r] ? sample_row(u.row(r), vocab, inv_temp, uniform[r])
                              : sample_row(z.row(r), vocab, inv_temp, uniform[r]);
    }
  });
}

#define MINILLM_INSTANTIATE_SAMPLING(TZ, TU)                                                                 \
  template void sample_rows<TZ, TU>(Rows<TZ>, Rows<TU>, int64_t, int64_t, const bool*, const double*, float, \
                                    int64_t*);
MINILLM_CPU_INSTANTIATE_ALL(MINILLM_INSTANTIATE_SAMPLING)
#undef MINILLM_INSTANTIATE_SAMPLING

}  // namespace cpu
}  // namespace minillm

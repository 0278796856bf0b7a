// Loops over the columns of one row, shared by the CPU kernels: vector-at-a-time iteration with a masked tail,
// and the block max that starts every block of an online pass. Knows nothing of PyTorch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/simd.h"

namespace minillm {
namespace cpu {

// Columns per block of an online pass: 2 x 8 KiB of float32 logits, so the second sweep over a block (after its
// max) reads from L1.
constexpr int64_t kBlock = 2048;

using FullVector = std::false_type;
using TailVector = std::true_type;

// ld / st pick the full or the masked (tail) access at compile time; a tail load reads lanes past n as -inf.
template <class T>
inline simd::Vec ld(const T* p, int, FullVector) {
  return simd::load(p);
}
template <class T>
inline simd::Vec ld(const T* p, int n, TailVector) {
  return simd::load_tail(p, n);
}
template <class T>
inline void st(T* p, simd::Vec v, int, FullVector) {
  simd::store(p, v);
}
template <class T>
inline void st(T* p, simd::Vec v, int n, TailVector) {
  simd::store_tail(p, v, n);
}

// f(i, n, tag) for the vectors covering columns [begin, end): n = kWidth with tag FullVector, then at most one
// final partial vector of n < kWidth lanes with tag TailVector.
template <class F>
inline void for_each_vector(int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + simd::kWidth <= end; i += simd::kWidth) f(i, simd::kWidth, FullVector{});
  if (i < end) f(i, static_cast<int>(end - i), TailVector{});
}

// max of x[begin, end) as stored (raw, unscaled: the kernels centre on it before scaling, simd::centre); -inf for
// an empty range or all -inf.
template <class T>
inline float range_max(const T* x, int64_t begin, int64_t end) {
  using simd::Vec;
  Vec m0 = simd::set1(simd::kNegInf), m1 = m0, m2 = m0, m3 = m0;  // four chains hide the latency of max
  int64_t i = begin;
  for (; i + 4 * simd::kWidth <= end; i += 4 * simd::kWidth) {
    m0 = simd::max(m0, simd::load(x + i));
    m1 = simd::max(m1, simd::load(x + i + simd::kWidth));
    m2 = simd::max(m2, simd::load(x + i + 2 * simd::kWidth));
    m3 = simd::max(m3, simd::load(x + i + 3 * simd::kWidth));
  }
  for_each_vector(i, end, [&](int64_t j, int n, auto tag) { m0 = simd::max(m0, ld(x + j, n, tag)); });
  return simd::reduce_max(simd::max(simd::max(m0, m1), simd::max(m2, m3)));
}

// The seven sums a block of row_stats adds to a row's state (row_state.h), lane by lane: with the centred logits
// xq = centre(z, sh_q), xp = centre(u, sh_p), d = xq - xp and their exps eq = exp(xq), ep = exp(xp),
//     sq += eq   cq += eq xq   aq += eq d   an += eq (d - d_a)     sp += ep   cp += ep xp   ap -= ep d,
// products with e = 0 masked (0 * inf = 0: -inf logits, and the -inf padding of a tail vector). d - d_a is formed
// as d + anchor_off, anchor_off = centre(u_a, sh_p) = -d_a (the block's constant): exactly 0 at the anchor itself,
// where xq = 0 and xp = anchor_off.
struct StatsSums {
  simd::Vec sq = simd::zero(), cq = simd::zero(), aq = simd::zero(), an = simd::zero();
  simd::Vec sp = simd::zero(), cp = simd::zero(), ap = simd::zero();
  simd::Vec dqp = simd::zero();  // eq - ep: the kept difference of the normalisers (row_state.h)

  void add(simd::Vec xq, simd::Vec xp, simd::Vec eq, simd::Vec ep, simd::Vec anchor_off) {
    const simd::Vec d = xq - xp, zero = simd::zero();
    const simd::Mask kq = simd::gt(eq, zero), kp = simd::gt(ep, zero);
    sq = sq + eq;
    cq = simd::mask_fmadd(eq, xq, cq, kq);
    aq = simd::mask_fmadd(eq, d, aq, kq);
    an = simd::mask_fmadd(eq, d + anchor_off, an, kq);
    sp = sp + ep;
    cp = simd::mask_fmadd(ep, xp, cp, kp);
    ap = simd::mask_fnmadd(ep, d, ap, kp);
    dqp = dqp + (eq - ep);
  }
};

}  // namespace cpu
}  // namespace minillm

// row_stats and logits_grad for vocabulary-major float32 logits (kernels.h: VocabMajor): entry (r, v) of the row
// set at data[v * ld + r], i.e. a row-major [V, ld] buffer seen as [N, V] through a transpose. The fused-linear ops
// form a block's logits this way on a CPU: W h^T ([V, H] x [H, n]) runs ~1.5x faster in MKL than h W^T for the
// narrow blocks (n ~ 100 rows) their memory budget allows, and the kernels read the result as it is, with no copy.
//
// The rows are cut into tiles of kTileRows = 16 rows: one 64-byte cache line per vocabulary entry, kVecs vectors
// whose lanes are 16 different rows. The arithmetic per element is the row-major kernels' (divergence_kernels.cpp)
// lane for lane, with every per-row quantity (shifts, log-normalisers, coefficients) a vector of 16 rows' values:
//   * row_stats: per block of kStatsBlock entries the block maxima first, each row's state moved to them
//     (row_state.h, one rescale per row per block), then one exp per element per distribution, summed in float32
//     per row and block, in double across blocks (the row-major kernel sums 2048 columns in kWidth lanes per block:
//     a comparable float32 sum length);
//   * logits_grad: the row-major kernel's formula, each term masked to the rows whose coefficient is nonzero, so
//     that every element of dz is bit-identical to the row-major kernel's; rows whose four coefficients are zero
//     are zero, columns >= vocab are zero, and the token term is added to the stored gradient afterwards (the same
//     float32 addition the row-major kernel makes before its store).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/row_loops.h"
#include "cpu/row_state.h"
#include "cpu/simd.h"

namespace minillm {
namespace cpu {
namespace {

using simd::Mask;
using simd::Vec;

constexpr int kTileRows = 16;
constexpr int kVecs = kTileRows / simd::kWidth;  // 2 (8-lane build) or 1 (AVX-512)
static_assert(kVecs * simd::kWidth == kTileRows, "a tile is a whole number of vectors");
// Vocabulary entries per online-rescale block: 256 x 64 bytes per distribution, so the second sweep over a block
// (after its maxima) reads from L1.
constexpr int64_t kStatsBlock = 256;
// Vocabulary entries per task: one tile's 64 KiB per distribution (1024 measured no slower than 4096 or 16384 here;
// each row's chunk states are merged afterwards: 126 merges per row at V = 128256, about a millisecond in all).
constexpr int64_t kChunk = 1024;

// ---------------------------------------------------------------------------------------------------------------
// row_stats: the online pass of stats_range (divergence_kernels.cpp) for one vector of rows r, r + 1, ...
// (`lanes` of them) over one block of vocabulary entries [b, e) (at most kStatsBlock); `state` holds their row
// states. One vector at a time, two entries per step (four exps interleaved, as the row-major kernel does): the
// six running sums stay in registers.

template <bool FullVec>
inline Vec load_vector(const float* p, int lanes) {
  if constexpr (FullVec) return simd::load(p);
  else return simd::load_tail(p, lanes);
}

// u(r, v) at the first v in [b, e) with z(r, v) = m (row r's raw block max).
inline float u_at_first_max(VocabMajor z, VocabMajor u, int64_t r, int64_t b, int64_t e, float m) {
  for (int64_t v = b; v < e; ++v) {
    if (*z.at(r, v) == m) return *u.at(r, v);
  }
  return std::numeric_limits<float>::quiet_NaN();  // not reached: m is the block's max
}

template <bool FullVec>
void stats_vector(VocabMajor z, VocabMajor u, int64_t r, int lanes, int64_t b, int64_t e, float inv_temp,
                  OnlinePair* state) {
  const Vec it = simd::set1(inv_temp);
  Vec max_q[2] = {simd::set1(simd::kNegInf), simd::set1(simd::kNegInf)}, max_p[2] = {max_q[0], max_q[0]};
  for (int64_t v = b; v < e; ++v) {
    max_q[v & 1] = simd::max(max_q[v & 1], load_vector<FullVec>(z.at(r, v), lanes));
    max_p[v & 1] = simd::max(max_p[v & 1], load_vector<FullVec>(u.at(r, v), lanes));
  }
  alignas(64) float lane_q[simd::kWidth], lane_p[simd::kWidth], lane_anchor[simd::kWidth] = {};
  simd::store(lane_q, simd::max(max_q[0], max_q[1]));
  simd::store(lane_p, simd::max(max_p[0], max_p[1]));
  for (int l = 0; l < lanes; ++l) {
    const float m_q = lane_q[l];
    const float ua = m_q > state[l].q.m ? u_at_first_max(z, u, r + l, b, e, m_q) : state[l].ua;
    state[l].rescale_to(m_q, lane_p[l], ua);
    lane_q[l] = state[l].q.shift();
    lane_p[l] = state[l].p.shift();
    lane_anchor[l] = simd::centre(state[l].ua, state[l].p.shift(), inv_temp);
  }
  const Vec shift_q = simd::load(lane_q), shift_p = simd::load(lane_p), anchor_off = simd::load(lane_anchor);
  StatsSums sums;
  int64_t v = b;
  for (; v + 2 <= e; v += 2) {
    const Vec x[4] = {simd::centre(load_vector<FullVec>(z.at(r, v), lanes), shift_q, it),
                      simd::centre(load_vector<FullVec>(z.at(r, v + 1), lanes), shift_q, it),
                      simd::centre(load_vector<FullVec>(u.at(r, v), lanes), shift_p, it),
                      simd::centre(load_vector<FullVec>(u.at(r, v + 1), lanes), shift_p, it)};
    Vec ex[4] = {x[0], x[1], x[2], x[3]};
    simd::exp_n<4>(ex);
    sums.add(x[0], x[2], ex[0], ex[2], anchor_off);
    sums.add(x[1], x[3], ex[1], ex[3], anchor_off);
  }
  if (v < e) {
    const Vec x[2] = {simd::centre(load_vector<FullVec>(z.at(r, v), lanes), shift_q, it),
                      simd::centre(load_vector<FullVec>(u.at(r, v), lanes), shift_p, it)};
    Vec ex[2] = {x[0], x[1]};
    simd::exp_n<2>(ex);
    sums.add(x[0], x[1], ex[0], ex[1], anchor_off);
  }
  alignas(64) float lane_sums[8][simd::kWidth];
  const Vec parts[8] = {sums.sq, sums.cq, sums.aq, sums.an, sums.sp, sums.cp, sums.ap, sums.dqp};
  for (int j = 0; j < 8; ++j) simd::store(lane_sums[j], parts[j]);
  for (int l = 0; l < lanes; ++l) {
    state[l].add(lane_sums[0][l], lane_sums[1][l], lane_sums[2][l], lane_sums[3][l], lane_sums[4][l],
                 lane_sums[5][l], lane_sums[6][l], lane_sums[7][l]);
  }
}

// The tile of `rows` rows from r0, vector by vector (the second reads the lines the first brought in).
void stats_block(VocabMajor z, VocabMajor u, int64_t r0, int rows, int64_t b, int64_t e, float inv_temp,
                 OnlinePair* state) {
  for (int k = 0; k < kVecs; ++k) {
    const int lanes = std::min(simd::kWidth, rows - k * simd::kWidth);
    if (lanes <= 0) break;
    const int64_t r = r0 + k * simd::kWidth;
    if (lanes == simd::kWidth) stats_vector<true>(z, u, r, lanes, b, e, inv_temp, state + k * simd::kWidth);
    else stats_vector<false>(z, u, r, lanes, b, e, inv_temp, state + k * simd::kWidth);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// logits_grad: a whole tile per vocabulary entry (kVecs vectors), with its rows' parameters as vectors (rows past
// the tile: inactive) and the masks of the rows whose coefficients are nonzero.

struct GradTile {
  Vec shift_q[kVecs], logs_q[kVecs], shift_p[kVecs], logs_p[kVecs], eq_d[kVecs], anchor_off[kVecs];
  Vec minus_eq_d_anchor[kVecs];
  Vec c_kl[kVecs], c_q[kVecs], c_p[kVecs];
  Mask active[kVecs], kl[kVecs], p[kVecs];
  bool any_active = false, any_kl = false, any_p = false;
};

GradTile grad_tile(const float* stats, const float* coef, int64_t r0, int rows, float inv_temp) {
  alignas(64) float lanes[13][kTileRows] = {};
  GradTile g;
  for (int l = 0; l < rows; ++l) {
    // the token term: added afterwards
    const LogitsGradRow row = logits_grad_row(stats, coef, nullptr, r0 + l, inv_temp);
    const float values[13] = {row.shift_q, row.logs_q, row.shift_p, row.logs_p, row.eq_d, row.c_kl, row.c_q, row.c_p,
                              row.active ? 1.0f : 0.0f, row.c_kl != 0.0f ? 1.0f : 0.0f, row.c_p != 0.0f ? 1.0f : 0.0f,
                              row.anchor_off, row.minus_eq_d_anchor};
    for (int j = 0; j < 13; ++j) lanes[j][l] = values[j];
    g.any_active |= row.active;
    g.any_kl |= row.c_kl != 0.0f;
    g.any_p |= row.c_p != 0.0f;
  }
  const Vec zero = simd::zero();
  for (int k = 0; k < kVecs; ++k) {
    const int o = k * simd::kWidth;
    g.shift_q[k] = simd::load(lanes[0] + o);
    g.logs_q[k] = simd::load(lanes[1] + o);
    g.shift_p[k] = simd::load(lanes[2] + o);
    g.logs_p[k] = simd::load(lanes[3] + o);
    g.eq_d[k] = simd::load(lanes[4] + o);
    g.c_kl[k] = simd::load(lanes[5] + o);
    g.c_q[k] = simd::load(lanes[6] + o);
    g.c_p[k] = simd::load(lanes[7] + o);
    g.active[k] = simd::gt(simd::load(lanes[8] + o), zero);
    g.kl[k] = simd::gt(simd::load(lanes[9] + o), zero);
    g.p[k] = simd::gt(simd::load(lanes[10] + o), zero);
    g.anchor_off[k] = simd::load(lanes[11] + o);
    g.minus_eq_d_anchor[k] = simd::load(lanes[12] + o);
  }
  return g;
}

// A tile's rows fill its first `Whole` vectors (Whole = kVecs: a full tile) and `tail` lanes (0 <= tail < kWidth)
// of the next one; the vectors past those are empty. Whole vectors are loaded and stored as they are, the partial
// one lane-masked (lanes past the tile read as -inf and are never written), the empty ones not at all.
template <int Whole>
inline Vec load_lanes(const float* p, int tail, int k) {
  if (k < Whole) return simd::load(p);
  if (k == Whole && tail > 0) return simd::load_tail(p, tail);
  return simd::set1(simd::kNegInf);
}
template <int Whole>
inline void store_lanes(float* p, Vec v, int tail, int k) {
  if (k < Whole) simd::store(p, v);
  else if (k == Whole && tail > 0) simd::store_tail(p, v, tail);
}

// dz of a tile with active rows over vocabulary entries [begin, end) (< vocab).
template <bool KL, bool P, int Whole>
void grad_span(VocabMajor z, VocabMajor u, const GradTile& g, int64_t r0, int tail, int64_t begin, int64_t end,
               float inv_temp, float* dz, int64_t ld_dz) {
  const Vec it = simd::set1(inv_temp), zero = simd::zero();
  for (int64_t v = begin; v < end; ++v) {
    Vec xq[kVecs], q[kVecs];
    for (int k = 0; k < kVecs; ++k) {
      xq[k] = simd::centre(load_lanes<Whole>(z.at(r0 + k * simd::kWidth, v), tail, k), g.shift_q[k], it);
      q[k] = xq[k] - g.logs_q[k];
    }
    simd::exp_n<kVecs>(q);
    Vec grad[kVecs];
    for (int k = 0; k < kVecs; ++k) grad[k] = g.c_q[k] * q[k];
    if constexpr (KL || P) {
      Vec xp[kVecs], p[kVecs];
      for (int k = 0; k < kVecs; ++k) {
        xp[k] = simd::centre(load_lanes<Whole>(u.at(r0 + k * simd::kWidth, v), tail, k), g.shift_p[k], it);
        p[k] = xp[k] - g.logs_p[k];
      }
      if constexpr (KL) {
        for (int k = 0; k < kVecs; ++k) {
          const Vec centred = simd::select(simd::eq(xq[k], zero) & simd::eq(xp[k], g.anchor_off[k]),
                                           g.minus_eq_d_anchor[k], (xq[k] - xp[k]) - g.eq_d[k]);
          grad[k] = simd::mask_fmadd(g.c_kl[k], q[k] * centred, grad[k], simd::gt(q[k], zero) & g.kl[k]);
        }
      }
      if constexpr (P) {
        simd::exp_n<kVecs>(p);
        for (int k = 0; k < kVecs; ++k) grad[k] = simd::mask_fmadd(g.c_p[k], p[k], grad[k], g.p[k]);
      }
    }
    float* out = dz + v * ld_dz + r0;
    for (int k = 0; k < kVecs; ++k) {
      store_lanes<Whole>(out + k * simd::kWidth, simd::select_or_zero(g.active[k], grad[k]), tail, k);
    }
  }
}

// dz of a tile over vocabulary entries [begin, end) (< dz_cols): computed below vocab where a row is active, zero
// elsewhere.
template <int Whole>
void grad_tile_span(VocabMajor z, VocabMajor u, const GradTile& g, int64_t r0, int tail, int64_t vocab, int64_t begin,
                    int64_t end, float inv_temp, float* dz, int64_t ld_dz) {
  const int64_t v1 = g.any_active ? std::clamp(vocab, begin, end) : begin;
  if (g.any_kl && g.any_p) grad_span<true, true, Whole>(z, u, g, r0, tail, begin, v1, inv_temp, dz, ld_dz);
  else if (g.any_kl) grad_span<true, false, Whole>(z, u, g, r0, tail, begin, v1, inv_temp, dz, ld_dz);
  else if (g.any_p) grad_span<false, true, Whole>(z, u, g, r0, tail, begin, v1, inv_temp, dz, ld_dz);
  else grad_span<false, false, Whole>(z, u, g, r0, tail, begin, v1, inv_temp, dz, ld_dz);
  for (int64_t v = v1; v < end; ++v) {
    for (int k = 0; k < kVecs; ++k) store_lanes<Whole>(dz + v * ld_dz + r0 + k * simd::kWidth, simd::zero(), tail, k);
  }
}

// f(std::integral_constant<int, Whole>{}, tail) for a tile of `rows` rows (1 <= rows <= kTileRows).
template <class F>
inline void with_tile_shape(int rows, F&& f) {
  const int whole = rows / simd::kWidth, tail = rows % simd::kWidth;
  if (whole == kVecs) return f(std::integral_constant<int, kVecs>{}, 0);
  if constexpr (kVecs == 2) {
    if (whole == 1) return f(std::integral_constant<int, 1>{}, tail);
  }
  f(std::integral_constant<int, 0>{}, tail);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Work split: a task is one tile over one chunk of kChunk vocabulary entries, tasks numbered chunk by chunk, so
// that the threads work on neighbouring tiles of the same chunk at a time (the lines one tile leaves are read by
// the next from cache) and each task streams at a constant stride for long enough for the hardware prefetcher.

void row_stats_vocab_major(VocabMajor z, VocabMajor u, int64_t n_rows, int64_t vocab, const int64_t* tokens,
                           float inv_temp, float* stats) {
  if (n_rows <= 0) return;
  const int64_t tiles = (n_rows + kTileRows - 1) / kTileRows;
  const int64_t chunks = std::max<int64_t>(1, (vocab + kChunk - 1) / kChunk);
  // Each (chunk, tile) task's row states, merged chunk by chunk below.
  std::vector<OnlinePair> parts(static_cast<size_t>(chunks * tiles * kTileRows), OnlinePair(inv_temp));
  parallel_for(chunks * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t % tiles) * kTileRows, c0 = (t / tiles) * kChunk, c1 = std::min(vocab, c0 + kChunk);
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n_rows - r0));
      OnlinePair* state = parts.data() + t * kTileRows;
      for (int64_t b = c0; b < c1; b += kStatsBlock) {
        stats_block(z, u, r0, rows, b, std::min(c1, b + kStatsBlock), inv_temp, state);
      }
    }
  });
  for (int64_t r = 0; r < n_rows; ++r) {
    OnlinePair state(inv_temp);
    for (int64_t j = 0; j < chunks; ++j) state.merge(parts[(j * tiles + r / kTileRows) * kTileRows + r % kTileRows]);
    const int64_t y = tokens != nullptr ? tokens[r] : -1;
    store_row_stats(stats + r * NUM_STATS, state, y >= 0 ? *z.at(r, y) : 0.0f, y >= 0 ? *u.at(r, y) : 0.0f);
  }
}

void logits_grad_vocab_major(VocabMajor z, VocabMajor u, int64_t n_rows, int64_t vocab, const int64_t* tokens,
                             const float* stats, const float* coef, float inv_temp, float* dz, int64_t ld_dz,
                             int64_t dz_cols) {
  if (n_rows <= 0 || dz_cols <= 0) return;
  const int64_t tiles = (n_rows + kTileRows - 1) / kTileRows;
  const int64_t chunks = (dz_cols + kChunk - 1) / kChunk;
  parallel_for(chunks * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t % tiles) * kTileRows, c0 = (t / tiles) * kChunk, c1 = std::min(dz_cols, c0 + kChunk);
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n_rows - r0));
      const GradTile g = grad_tile(stats, coef, r0, rows, inv_temp);
      with_tile_shape(rows, [&](auto whole, int tail) {
        grad_tile_span<decltype(whole)::value>(z, u, g, r0, tail, vocab, c0, c1, inv_temp, dz, ld_dz);
      });
    }
  });
  if (tokens == nullptr) return;
  for (int64_t r = 0; r < n_rows; ++r) {  // the token term, after every store (no task writes these entries again)
    const float c_y = coef[r * NUM_COEFS + C_Y];
    if (c_y != 0.0f) dz[tokens[r] * ld_dz + r] += c_y;
  }
}

}  // namespace cpu
}  // namespace minillm

// CPU kernels of the divergence primitives: row_stats, logits_grad, jsd_rows, jsd_grad (kernels.h).
//
// Cost model: on a CPU these kernels are bound by exp, so each is arranged to evaluate the fewest exps the
// algebra allows, vectorised (simd.h):
//   row_stats    one exp per element per distribution (online pass, row_state.h);
//   logits_grad  exp for q; exp for p only in rows with c_p != 0; u read only in rows with c_kl or c_p != 0;
//   jsd_rows     exp for q and p, plus exp and log1p for log m;
//   jsd_grad     exp for q, plus exp and log1p for log m.
// Log-probabilities are formed as x - log s from the saved statistics, with the centred logit x = (z - m) / tau
// (simd::centre: the raw max subtracted before scaling), so logits of magnitude ~1e4, or offset by ~1e3 at
// tau != 1, keep their precision (z / tau - lse with a rounded lse would not).
#include <cmath>
#include <cstring>
#include <limits>
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

// Columns per gradient task.
constexpr int64_t kTile = 16384;

// ---------------------------------------------------------------------------------------------------------------
// row_stats
//
// Per block: the block maxima of z and u first, the pair state moved to the new maxima (one rescale per block,
// row_state.h; when q's max moves, its anchor moves to the first entry reaching it), then, with the shifts sh_q,
// sh_p, x_q = (z - sh_q) / tau, x_p = (u - sh_p) / tau (simd::centre), d = x_q - x_p and one exp per element per
// distribution, e_q = exp(x_q), e_p = exp(x_p), the seven sums of StatsSums (row_loops.h), so that E_q[d] =
// a_q / s_q, E_q[x_q] = c_q / s_q, E_q[d - d_a] = a_anchor / s_q, E_p[-d] = a_p / s_p, E_p[x_p] = c_p / s_p.
// Products with e = 0 are masked (0 * inf = 0: -inf logits, and the -inf padding of the tail vector).

// u_v at the first v in [begin, end) with z_v = m (the block's raw max).
template <class TZ, class TU>
float u_at_first_max(const TZ* z, const TU* u, int64_t begin, int64_t end, float m) {
  for (int64_t i = begin; i < end; ++i) {
    if (to_float(z[i]) == m) return to_float(u[i]);
  }
  return std::numeric_limits<float>::quiet_NaN();  // not reached: m is the block's max
}

template <class TZ, class TU>
void stats_range(const TZ* z, const TU* u, int64_t begin, int64_t end, float inv_temp, OnlinePair& state) {
  const Vec it = simd::set1(inv_temp);
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    const float m_q = range_max(z, b, e);
    const float ua = m_q > state.q.m ? u_at_first_max(z, u, b, e, m_q) : state.ua;
    state.rescale_to(m_q, range_max(u, b, e), ua);
    const Vec shift_q = simd::set1(state.q.shift()), shift_p = simd::set1(state.p.shift());
    const Vec anchor_off = simd::set1(simd::centre(state.ua, state.p.shift(), inv_temp));
    StatsSums sums;
    // Two vectors of each row per step, their four exps interleaved (exp_n); the remainder one at a time.
    int64_t i0 = b;
    for (; i0 + 2 * simd::kWidth <= e; i0 += 2 * simd::kWidth) {
      const Vec x[4] = {simd::centre(simd::load(z + i0), shift_q, it),
                        simd::centre(simd::load(z + i0 + simd::kWidth), shift_q, it),
                        simd::centre(simd::load(u + i0), shift_p, it),
                        simd::centre(simd::load(u + i0 + simd::kWidth), shift_p, it)};
      Vec ex[4] = {x[0], x[1], x[2], x[3]};
      simd::exp_n<4>(ex);
      sums.add(x[0], x[2], ex[0], ex[2], anchor_off);
      sums.add(x[1], x[3], ex[1], ex[3], anchor_off);
    }
    for_each_vector(i0, e, [&](int64_t i, int n, auto tag) {
      const Vec x[2] = {simd::centre(ld(z + i, n, tag), shift_q, it), simd::centre(ld(u + i, n, tag), shift_p, it)};
      Vec ex[2] = {x[0], x[1]};
      simd::exp_n<2>(ex);
      sums.add(x[0], x[1], ex[0], ex[1], anchor_off);
    });
    state.add(simd::reduce_add(sums.sq), simd::reduce_add(sums.cq), simd::reduce_add(sums.aq),
              simd::reduce_add(sums.an), simd::reduce_add(sums.sp), simd::reduce_add(sums.cp),
              simd::reduce_add(sums.ap), simd::reduce_add(sums.dqp));
  }
}

template <class TZ, class TU>
void write_stats(float* out, const OnlinePair& state, const TZ* z, const TU* u, const int64_t* tokens, int64_t r) {
  const int64_t y = tokens != nullptr ? tokens[r] : -1;
  store_row_stats(out, state, y >= 0 ? to_float(z[y]) : 0.0f, y >= 0 ? to_float(u[y]) : 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients: tasks are (row, column tile); `prepare(r)` returns the row's parameters (with `.active`), `span`
// writes the gradient for columns [c0, c1) of the row, and every other column of the tile is zero-filled
// (inactive rows entirely, without reading z or u; columns >= vocab).

template <class TZ, class Prepare, class Span>
void grad_tiles(int64_t n_rows, int64_t vocab, TZ* dz, int64_t dz_cols, const Prepare& prepare, const Span& span) {
  if (n_rows <= 0 || dz_cols <= 0) return;
  const int64_t tiles = (dz_cols + kTile - 1) / kTile;
  parallel_for(n_rows * tiles, grain_for(std::min(dz_cols, kTile)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / tiles;
      const int64_t c0 = (t % tiles) * kTile;
      const int64_t c1 = std::min(dz_cols, c0 + kTile);
      TZ* out = dz + r * dz_cols;
      const auto params = prepare(r);
      const int64_t v1 = params.active ? std::min(c1, vocab) : c0;
      if (c0 < v1) span(params, r, c0, v1, out);
      const int64_t zero_from = std::max(c0, v1);
      if (zero_from < c1) std::memset(static_cast<void*>(out + zero_from), 0, (c1 - zero_from) * sizeof(TZ));
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// logits_grad: dz_v = c_kl q_v (d_v - E_q[d]) + c_q q_v + c_p p_v + c_y [v == y], with x_q = (z - sh_q) / tau,
// x_p = (u - sh_p) / tau (simd::centre; sh = the raw max m, or 0 for an empty distribution), d = x_q - x_p,
// q_v = exp(x_q - log s_q), p_v = exp(x_p - log s_p); the c_kl product is masked where q_v = 0. At the anchor
// (x_q = 0 and x_p = centre(u_a, sh_p), as row_stats forms it: d_v = d_a) d_v - E_q[d] is -E_q[d - d_a]
// (kernels.h).

template <bool KL, bool P, class TZ, class TU>
void logits_grad_span(const TZ* z, const TU* u, int64_t begin, int64_t end, const LogitsGradRow& g, float inv_temp,
                      TZ* out) {
  const Vec it = simd::set1(inv_temp), zero = simd::zero();
  const Vec shift_q = simd::set1(g.shift_q), logs_q = simd::set1(g.logs_q);
  const Vec shift_p = simd::set1(g.shift_p), logs_p = simd::set1(g.logs_p);
  const Vec eq_d = simd::set1(g.eq_d), c_kl = simd::set1(g.c_kl), c_q = simd::set1(g.c_q);
  const Vec anchor_off = simd::set1(g.anchor_off), minus_eq_d_anchor = simd::set1(g.minus_eq_d_anchor);
  const Vec c_p = simd::set1(g.c_p), c_y = simd::set1(g.c_y);
  for_each_vector(begin, end, [&](int64_t i, int n, auto tag) {
    const Vec xq = simd::centre(ld(z + i, n, tag), shift_q, it);
    const Vec q = simd::exp(xq - logs_q);
    Vec grad = c_q * q;
    if constexpr (KL || P) {
      const Vec xp = simd::centre(ld(u + i, n, tag), shift_p, it);
      if constexpr (KL) {
        const Vec centred = simd::select(simd::eq(xq, zero) & simd::eq(xp, anchor_off), minus_eq_d_anchor,
                                         (xq - xp) - eq_d);
        grad = simd::mask_fmadd(c_kl, q * centred, grad, simd::gt(q, zero));
      }
      if constexpr (P) grad = simd::fmadd(c_p, simd::exp(xp - logs_p), grad);
    }
    if (static_cast<uint64_t>(g.y - i) < static_cast<uint64_t>(simd::kWidth)) {
      grad = simd::mask_add(grad, c_y, simd::lane_mask(static_cast<int>(g.y - i)));
    }
    st(out + i, grad, n, tag);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// JSD. With the mixture m = beta p + (1 - beta) q, g_v = log q_v - log m_v and h_v = log p_v - log m_v depend
// on the log-ratio r_v = log p_v - log q_v alone:
//     g = -logaddexp(r + log beta, log(1 - beta)),   h = -logaddexp(log beta, log(1 - beta) - r),
// with r = (x_p - x_q) - (log s_p - log s_q) from the centred logits x_q, x_p (simd::centre): never the log
// of a sum of rounded probabilities, nor the difference of two log-probabilities each rounded at ulp(|log q|)
// ~ 1e-6 (a bias of ~4e-7 per row when q ~ p). Both logaddexp share L = log1p(exp(-|delta|)), delta =
// r + log beta - log(1 - beta) (logaddexp(a, b) = hi + log1p(exp(lo - hi))), so one exp and one log1p give both:
//     delta > 0:  g = -(r + log beta + L),   h = -(log beta + L);
//     else:       g = -(log(1 - beta) + L),  h = (r - log(1 - beta)) - L.
// An infinite r (one probability 0) gives the finite value where the other is > 0; the term of a 0 probability is
// masked.
//
// The gradient's E_q[g] is taken relative to the anchor a of row_stats (z_a = m_q, u_a = UA):
// g_v - E_q[g] = (g_v - g_a) - E_q[g - g_a], with g_v - g_a exactly 0 at the anchor's entries (x_q = 0 and
// x_p = centre(UA, sh_p)). In rows where q is nearly one-hot, q_a (g_a - E_q[g]) = -q_a E_q[g - g_a] is far smaller
// than |g_a|, and g_a - E_q[g], both rounded at ulp(|g_a|), would lose it (kernels.h: jsd_rows). With g = -c - L,
// c = (delta > 0 ? r + log beta : log(1 - beta)), g_v - g_a is formed as (c_a - c_v) + (L_a - L_v): where both
// sit on the log(1 - beta) branch (p << q, as around a student's peak) that is L_a - L_v, exact however small,
// not the difference of two numbers near -log(1 - beta). c_a and L_a come from the anchor's own (x_q, x_p) through
// the same vector code as every entry's, so that g - g_a is exactly 0 at the anchor's entries with no test for
// them. Rows without an anchor (UA NaN) take c_a = L_a = 0.
//
// Near q = p (|r| < kNearRatio) the value's g and h come from g = -log1p(beta expm1(r)) and h = r + g
// (= -log1p((1 - beta) expm1(-r))) instead: there g ~ -beta r and h ~ (1 - beta) r are small, and -c - L, a
// difference of two numbers near log 2 (beta = 1/2), would round them at ~6e-8 absolute, which the JSD of close
// distributions (~beta (1 - beta) E[r^2] / 2 per row: 1e-5 at |r| ~ 0.01) cannot afford (errors of 1e-3 and more).
// Only rows whose reverse KL (from row_stats) is below kNearRowKl take it: elsewhere the JSD is large enough for
// those roundings, and the extra expm1 and log1p would cost ~2x in jsd_rows. The gradient keeps g - g_a from c, L.

constexpr float kNearRatio = 0.5f;
constexpr float kNearRowKl = 0.05f;

// beta and what the mixture's formulas take of it, as vectors.
struct MixtureWeights {
  explicit MixtureWeights(double beta)
      : log_beta(simd::set1(static_cast<float>(std::log(beta)))),
        log_1m_beta(simd::set1(static_cast<float>(std::log1p(-beta)))),
        beta(simd::set1(static_cast<float>(beta))) {}
  Vec log_beta, log_1m_beta, beta;
};

// (c, L, h) of a vector of log-ratios: g = -c - L.
struct Mixture {
  Vec c, l, h;
};

inline Mixture mixture(Vec r, const MixtureWeights& w) {
  const Vec zero = simd::zero();
  const Vec a = r + w.log_beta, delta = a - w.log_1m_beta;
  const Vec l = simd::log1p_small(simd::exp(simd::min(delta, zero - delta)));
  const auto a_above = simd::gt(delta, zero);
  return {simd::select(a_above, a, w.log_1m_beta), l,
          simd::select(a_above, zero - w.log_beta, r - w.log_1m_beta) - l};
}

inline Vec log_ratio(Vec xq, Vec xp, float logs_p_minus_q) { return (xp - xq) - simd::set1(logs_p_minus_q); }

struct JsdRow {
  float shift_q, logs_q, shift_p, logs_p, logs_p_minus_q;
  float c_a, l_a;  // g_a = -c_a - l_a (0: no anchor)
  bool near;       // KL(q || p) < kNearRowKl: the value takes the near-ratio terms
};

inline JsdRow jsd_row(const float* st, float inv_temp, const MixtureWeights& w) {
  const float kl = st[EQ_D] - st[LOG_RATIO];
  JsdRow row{OnlineSoftmax::shift_of(st[M_Q]), st[LOGS_Q], OnlineSoftmax::shift_of(st[M_P]), st[LOGS_P],
             st[LOGS_P] - st[LOGS_Q], 0.0f, 0.0f, kl < kNearRowKl};
  const float anchor_off = simd::centre(st[UA], row.shift_p, inv_temp);  // the anchor's x_p; its x_q is 0
  if (!std::isnan(anchor_off)) {
    const Mixture m = mixture(log_ratio(simd::zero(), simd::set1(anchor_off), row.logs_p_minus_q), w);
    row.c_a = simd::first_lane(m.c);
    row.l_a = simd::first_lane(m.l);
  }
  return row;
}

// (q, g, g - g_a, p, h) of a vector of entries from their centred logits, and their log-ratio r.
struct JsdTerms {
  Vec q, g, g_rel, p, h, r;
};

inline JsdTerms jsd_terms(Vec xq, Vec xp, const JsdRow& row, const MixtureWeights& w) {
  const Vec r = log_ratio(xq, xp, row.logs_p_minus_q);
  const Mixture m = mixture(r, w);
  return {simd::exp(xq - simd::set1(row.logs_q)), simd::zero() - m.c - m.l,
          (simd::set1(row.c_a) - m.c) + (simd::set1(row.l_a) - m.l), simd::exp(xp - simd::set1(row.logs_p)), m.h,
          r};
}

// The value's g and h where |r| < kNearRatio: g = -log1p(beta expm1(r)) and h = log p - log m = r + g. Vectors
// with no such lane skip it.
inline void take_near_ratio_terms(JsdTerms& t, const MixtureWeights& w) {
  const Vec zero = simd::zero();
  const Mask near = simd::gt(simd::set1(kNearRatio), simd::max(t.r, zero - t.r));
  if (!simd::any(near)) return;
  const Vec r = simd::select_or_zero(near, t.r);
  const Vec g = zero - simd::log1p_small(w.beta * simd::expm1_small(r));
  t.g = simd::select(near, g, t.g);
  t.h = simd::select(near, r + g, t.h);
}

// Per-row sums of jsd_rows: q_v g_v, p_v h_v and q_v (g_v - g_a), 0 where the probability is 0.
struct JsdSums {
  double kl_q = 0.0, kl_p = 0.0, eq_g_rel = 0.0;
  void add(const JsdSums& o) {
    kl_q += o.kl_q;
    kl_p += o.kl_p;
    eq_g_rel += o.eq_g_rel;
  }
};

// Adds the sums over columns [begin, end) to `sums`.
template <class TZ, class TU>
void jsd_range(const TZ* z, const TU* u, int64_t begin, int64_t end, const JsdRow& row, float inv_temp,
               const MixtureWeights& w, JsdSums& sums) {
  const Vec it = simd::set1(inv_temp), zero = simd::zero();
  const Vec shift_q = simd::set1(row.shift_q), shift_p = simd::set1(row.shift_p);
  for (int64_t b = begin; b < end; b += kBlock) {
    Vec aq = zero, ap = zero, an = zero;
    for_each_vector(b, std::min(end, b + kBlock), [&](int64_t i, int n, auto tag) {
      JsdTerms t = jsd_terms(simd::centre(ld(z + i, n, tag), shift_q, it),
                             simd::centre(ld(u + i, n, tag), shift_p, it), row, w);
      if (row.near) take_near_ratio_terms(t, w);
      const Mask q_pos = simd::gt(t.q, zero);
      aq = simd::mask_fmadd(t.q, t.g, aq, q_pos);
      an = simd::mask_fmadd(t.q, t.g_rel, an, q_pos);
      ap = simd::mask_fmadd(t.p, t.h, ap, simd::gt(t.p, zero));
    });
    sums.kl_q += simd::reduce_add(aq);
    sums.kl_p += simd::reduce_add(ap);
    sums.eq_g_rel += simd::reduce_add(an);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

template <class TZ, class TU>
void row_stats(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const int64_t* tokens, float inv_temp,
               float* stats) {
  const int64_t segments = segments_per_row(n_rows, vocab, kBlock);
  if (segments == 1) {
    parallel_for(n_rows, grain_for(2 * vocab), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        OnlinePair state(inv_temp);
        stats_range(z.row(r), u.row(r), 0, vocab, inv_temp, state);
        write_stats(stats + r * NUM_STATS, state, z.row(r), u.row(r), tokens, r);
      }
    });
    return;
  }
  // Few rows: each row in `segments` column ranges on different threads, merged in order afterwards.
  std::vector<OnlinePair> parts(static_cast<size_t>(n_rows * segments), OnlinePair(inv_temp));
  parallel_for(n_rows * segments, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / segments, j = t % segments;
      stats_range(z.row(r), u.row(r), segment_begin(j, segments, vocab, kBlock),
                  segment_begin(j + 1, segments, vocab, kBlock), inv_temp, parts[t]);
    }
  });
  for (int64_t r = 0; r < n_rows; ++r) {
    OnlinePair state(inv_temp);
    for (int64_t j = 0; j < segments; ++j) state.merge(parts[r * segments + j]);
    write_stats(stats + r * NUM_STATS, state, z.row(r), u.row(r), tokens, r);
  }
}

template <class TZ, class TU>
void logits_grad(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const int64_t* tokens, const float* stats,
                 const float* coef, float inv_temp, TZ* dz, int64_t dz_cols) {
  auto prepare = [&](int64_t r) { return logits_grad_row(stats, coef, tokens, r, inv_temp); };
  auto span = [&](const LogitsGradRow& g, int64_t r, int64_t c0, int64_t c1, TZ* out) {
    const TZ* zr = z.row(r);
    const TU* ur = u.row(r);
    if (g.c_kl != 0.0f) {
      if (g.c_p != 0.0f) logits_grad_span<true, true>(zr, ur, c0, c1, g, inv_temp, out);
      else logits_grad_span<true, false>(zr, ur, c0, c1, g, inv_temp, out);
    } else {
      if (g.c_p != 0.0f) logits_grad_span<false, true>(zr, ur, c0, c1, g, inv_temp, out);
      else logits_grad_span<false, false>(zr, ur, c0, c1, g, inv_temp, out);
    }
  };
  grad_tiles(n_rows, vocab, dz, dz_cols, prepare, span);
}

template <class TZ, class TU>
void jsd_rows(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const float* stats, double beta,
              float inv_temp, float* out) {
  const MixtureWeights w(beta);
  const float beta_f = static_cast<float>(beta), one_m_beta_f = static_cast<float>(1.0 - beta);
  auto row_of = [&](int64_t r) {
    return jsd_row(stats + r * NUM_STATS, inv_temp, w);
  };
  auto finish = [&](int64_t r, const JsdSums& sums) {
    out[2 * r] = beta_f * static_cast<float>(sums.kl_p) + one_m_beta_f * static_cast<float>(sums.kl_q);
    out[2 * r + 1] = static_cast<float>(sums.eq_g_rel);
  };
  const int64_t segments = segments_per_row(n_rows, vocab, kBlock);
  if (segments == 1) {
    parallel_for(n_rows, grain_for(2 * vocab), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        JsdSums sums;
        jsd_range(z.row(r), u.row(r), 0, vocab, row_of(r), inv_temp, w, sums);
        finish(r, sums);
      }
    });
    return;
  }
  std::vector<JsdSums> parts(static_cast<size_t>(n_rows * segments));
  parallel_for(n_rows * segments, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / segments, j = t % segments;
      jsd_range(z.row(r), u.row(r), segment_begin(j, segments, vocab, kBlock),
                segment_begin(j + 1, segments, vocab, kBlock), row_of(r), inv_temp, w, parts[t]);
    }
  });
  for (int64_t r = 0; r < n_rows; ++r) {
    JsdSums sums;
    for (int64_t j = 0; j < segments; ++j) sums.add(parts[r * segments + j]);
    finish(r, sums);
  }
}

template <class TZ, class TU>
void jsd_grad(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const float* stats, const float* jsd,
              const float* coef, double beta, float inv_temp, TZ* dz, int64_t dz_cols) {
  const MixtureWeights w(beta);
  struct Row {
    bool active;
    JsdRow row;
    float coef, eq_g_rel;
  };
  auto prepare = [&](int64_t r) {
    return Row{coef[r] != 0.0f, jsd_row(stats + r * NUM_STATS, inv_temp, w), coef[r],
               jsd[2 * r + 1]};
  };
  // dz_v = (coef q_v) ((g_v - g_a) - E_q[g - g_a]), 0 where q_v = 0.
  auto span = [&](const Row& g, int64_t r, int64_t c0, int64_t c1, TZ* out) {
    const TZ* zr = z.row(r);
    const TU* ur = u.row(r);
    const Vec it = simd::set1(inv_temp), zero = simd::zero();
    const Vec shift_q = simd::set1(g.row.shift_q), shift_p = simd::set1(g.row.shift_p);
    const Vec c = simd::set1(g.coef), eq_g_rel = simd::set1(g.eq_g_rel);
    for_each_vector(c0, c1, [&](int64_t i, int n, auto tag) {
      const JsdTerms t = jsd_terms(simd::centre(ld(zr + i, n, tag), shift_q, it),
                                   simd::centre(ld(ur + i, n, tag), shift_p, it), g.row, w);
      const Vec grad = simd::select_or_zero(simd::gt(t.q, zero), (c * t.q) * (t.g_rel - eq_g_rel));
      st(out + i, grad, n, tag);
    });
  };
  grad_tiles(n_rows, vocab, dz, dz_cols, prepare, span);
}

#define MINILLM_INSTANTIATE_DIVERGENCE(TZ, TU)                                                                    \
  template void row_stats<TZ, TU>(Rows<TZ>, Rows<TU>, int64_t, int64_t, const int64_t*, float, float*);          \
  template void logits_grad<TZ, TU>(Rows<TZ>, Rows<TU>, int64_t, int64_t, const int64_t*, const float*,          \
                                    const float*, float, TZ*, int64_t);                                           \
  template void jsd_rows<TZ, TU>(Rows<TZ>, Rows<TU>, int64_t, int64_t, const float*, double, float, float*);     \
  template void jsd_grad<TZ, TU>(Rows<TZ>, Rows<TU>, int64_t, int64_t, const float*, const float*, const float*, \
                                 double, float, TZ*, int64_t);
MINILLM_CPU_INSTANTIATE_ALL(MINILLM_INSTANTIATE_DIVERGENCE)
#undef MINILLM_INSTANTIATE_DIVERGENCE

}  // namespace cpu
}  // namespace minillm

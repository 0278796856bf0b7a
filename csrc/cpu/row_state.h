// The online-softmax state of a row and its merge rules: written once, shared by every CPU kernel (row_stats,
// the split of a row across threads when rows are few, sample_rows).
//
// One distribution softmax(x / tau) over the entries seen so far keeps the running max m of the RAW logits x and,
// with the shift sh = m (or sh = 0 while m = -inf, i.e. before any entry with mass, so that -inf - sh stays -inf)
// and the centred logits c_v = (x_v - sh) / tau (formed as simd::centre: fl(fl(x_v - sh) * inv_temp)),
//
//     s = sum_v exp(c_v)                   (the normaliser)
//     c = sum_v exp(c_v) c_v               (centred first moment: E[(x - m) / tau] = c / s <= 0)
//
// Moving the max from m to m_new shifts every c_v by -delta, delta = (m_new - m) / tau >= 0 (in double), and
// multiplies every exp by exp(-delta):
//
//     s' = exp(-delta) s,   c' = exp(-delta) (c - delta s).
//
// The pair (q = softmax(z / tau), p = softmax(u / tau)) adds the two cross sums of row_stats, with the difference
// of the *centred* logits d_v = (z_v - sh_q) / tau - (u_v - sh_p) / tau (each centred logit rounded relative to
// itself, so rows near |z| ~ 1e4 keep the precision of their differences):
//
//     a_q = sum_v exp(c_q,v) d_v,      a_p = sum_v exp(c_p,v) (-d_v).
//
// When the shifts grow by (delta_q, delta_p), d_v becomes d_v - (delta_q - delta_p), so
//
//     a_q' = exp(-delta_q) (a_q - (delta_q - delta_p) s_q),   a_p' = exp(-delta_p) (a_p - (delta_p - delta_q) s_p).
//
// The anchor. In a nearly one-hot row q_a ~ 1 at the argmax a of z, and the reverse-KL gradient there,
// q_a (d_a - E_q[d]) = -q_a sum_w q_w (d_w - d_a), is far smaller than d_a itself (|d_a| ~ 1e4 where the logits
// are ~1e4): taken as d_a - E_q[d], both rounded at ulp(|d_a|) ~ 1e-3, it is lost. So the state also keeps the
// sum anchored at a = the first entry reaching q's max, with the raw u_a (ua):
//
//     a_anchor = sum_v exp(c_q,v) (d_v - d_a),  d_v - d_a = c_q,v - (c_p,v - c_p,a)   (exactly 0 at v = a),
//
// which depends on no shift but q's. When q's max moves to a new entry a' (z_a' = m_q + tau delta_q),
// d - d_a' = (d - d_a) - (delta_q - (u_a' - u_a) / tau), so a_anchor' = exp(-delta_q) (a_anchor - (delta_q -
// (u_a' - u_a) / tau) s_q). A state whose u_a is infinite (the teacher is -inf at the student's argmax: an
// infinite reverse KL) or NaN carries a non-finite a_anchor, which the stats store as "no anchor" (UA = NaN).
//
// The difference of the normalisers. For close distributions log s_q and log s_p nearly cancel in the KL, and the
// stats' float32 LOGS_Q, LOGS_P are each rounded at ulp(log s) ~ 5e-7, as large as a reverse KL of ~1e-3 times
// the design's 2e-5. So the state also keeps
//
//     d_qp = sum_v (exp(c_q,v) - exp(c_p,v)) = s_q - s_p,
//
// accumulated from the per-entry differences (small where q ~ p, so its rounding is relative to the difference,
// not to s), from which log(s_q / s_p) = log1p(d_qp / s_p). Rescaled: d_qp' = f_q s_q - f_p s_p =
// f_q d_qp + (f_q - f_p) s_p, with f the two factors exp(-delta).
//
// Two states over disjoint parts of a row merge by moving both to the larger maxima and adding. A block of a row
// is folded in by first moving the state to the maxima including the block (one rescale per block) and then
// adding the block's sums taken directly with the new shifts: one exp per element per distribution.
//
// 0 * inf = 0: an entry with exp(c_v) = 0 (in particular x_v = -inf) contributes nothing to c, a_q, a_p; the
// kernels mask those products. A distribution that has seen only -inf has m = -inf and s = c = 0 and stays at
// zero when it is moved. The running sums are double, so the rescalings and merges add no rounding of their own;
// the per-block sums are float32.
#pragma once

#include <cmath>
#include <limits>

namespace minillm {

struct OnlineSoftmax {
  explicit OnlineSoftmax(float inv_temp_) : inv_temp(inv_temp_) {}

  float inv_temp;  // 1 / tau
  float m = -std::numeric_limits<float>::infinity();  // raw max
  double s = 0.0;
  double c = 0.0;

  // The shift subtracted from the raw x: m, or 0 while m is not finite.
  static float shift_of(float m) { return std::isfinite(m) ? m : 0.0f; }
  float shift() const { return shift_of(m); }

  // Move the max to m_new (no-op unless m_new > m). Returns the factor exp(-delta) applied to the sums (0 when
  // the state was empty, 1 when unchanged), for the cross sums that ride on this distribution.
  double rescale_to(float m_new) {
    if (!(m_new > m)) return 1.0;
    double factor = 0.0;
    if (s != 0.0 && std::isfinite(m)) {
      const double delta = (static_cast<double>(m_new) - static_cast<double>(m)) * inv_temp;
      factor = std::exp(-delta);
      c = factor * (c - delta * s);
      s *= factor;
    } else {
      s = c = 0.0;
    }
    m = m_new;
    return factor;
  }

  // log s and E[(x - m) / tau] = c / s. An empty distribution (s = 0) gives log s = -inf and 0/0 = NaN, as the
  // reference backend does; callers treat such rows as masked.
  float log_s() const { return static_cast<float>(std::log(s)); }
  float mean_centred() const { return static_cast<float>(c / s); }
};

struct OnlinePair {
  explicit OnlinePair(float inv_temp) : q(inv_temp), p(inv_temp) {}

  OnlineSoftmax q, p;
  double a_q = 0.0;       // sum exp(c_q) d
  double a_p = 0.0;       // sum exp(c_p) (-d)
  double a_anchor = 0.0;  // sum exp(c_q) (d - d_a), a = q's anchor
  double d_qp = 0.0;      // sum exp(c_q) - exp(c_p) = q.s - p.s
  float ua = std::numeric_limits<float>::quiet_NaN();  // raw u_a (NaN while q is empty)

  // (b - a) / tau in double, for raw logits a, b.
  double scaled_difference(float b, float a) const {
    return (static_cast<double>(b) - static_cast<double>(a)) * q.inv_temp;
  }

  // Move to raw maxima that include m_q_seen and m_p_seen (e.g. a block's maxima); ua_seen is u at the first
  // entry reaching m_q_seen, q's new anchor if m_q_seen > q.m.
  void rescale_to(float m_q_seen, float m_p_seen, float ua_seen) {
    const float m_q = m_q_seen > q.m ? m_q_seen : q.m;
    const float m_p = m_p_seen > p.m ? m_p_seen : p.m;
    if (!(m_q > q.m) && !(m_p > p.m)) return;
    const double delta_q = scaled_difference(OnlineSoftmax::shift_of(m_q), q.shift());
    const double delta_p = scaled_difference(OnlineSoftmax::shift_of(m_p), p.shift());
    const double s_q = q.s, s_p = p.s;
    const bool q_moves = m_q > q.m;
    const double f_q = q.rescale_to(m_q), f_p = p.rescale_to(m_p);
    d_qp = f_q * d_qp + (f_q - f_p) * s_p;
    // A part whose factor is 0 in float32 (empty, or moved by more than ~104: every exp(c_v) of its entries
    // would underflow in float32, as the per-entry masks and the torch backend take them) vanishes: its cross sums
    // become 0, also where they were +inf (mass where the other distribution is -inf), not 0 * inf = NaN, and
    // whether such an entry counts does not depend on whether it comes before or after the max.
    const bool q_vanishes = static_cast<float>(f_q) == 0.0f, p_vanishes = static_cast<float>(f_p) == 0.0f;
    a_q = q_vanishes ? 0.0 : f_q * (a_q - (delta_q - delta_p) * s_q);
    a_p = p_vanishes ? 0.0 : f_p * (a_p - (delta_p - delta_q) * s_p);
    if (q_moves) {
      const double moved = delta_q - scaled_difference(ua_seen, ua);
      a_anchor = q_vanishes ? 0.0 : f_q * (a_anchor - moved * s_q);
      ua = ua_seen;
    }
  }

  // Add sums over new entries taken with the current shifts (a_anchor_new: at the current anchor).
  void add(double s_q, double c_q, double a_q_new, double a_anchor_new, double s_p, double c_p, double a_p_new,
           double d_qp_new) {
    d_qp += d_qp_new;
    q.s += s_q;
    q.c += c_q;
    a_q += a_q_new;
    a_anchor += a_anchor_new;
    p.s += s_p;
    p.c += c_p;
    a_p += a_p_new;
  }

  // Fold in the state of a disjoint part of the row. The anchor is the earlier part's unless the later one's max
  // is larger (this state is the earlier part); on a tie of the maxima the other part's sum is re-anchored:
  // d - d_a = (d - d_o) + (u_a - u_o) / tau.
  void merge(OnlinePair other) {
    rescale_to(other.q.m, other.p.m, other.ua);
    other.rescale_to(q.m, p.m, ua);
    if (other.q.s != 0.0 && !(other.ua == ua)) {
      other.a_anchor += scaled_difference(ua, other.ua) * other.q.s;
    }
    add(other.q.s, other.q.c, other.a_q, other.a_anchor, other.p.s, other.p.c, other.a_p, other.d_qp);
  }

  // log(s_q / s_p) = log1p(d_qp / s_p) (where s_q < s_p / 2 the two logs, of doubles, lose nothing); with an empty
  // distribution log s_q - log s_p (+-inf, or NaN for two), as LOGS_Q - LOGS_P gives.
  float log_ratio() const {
    const double r = d_qp / p.s;
    if (q.s > 0.0 && p.s > 0.0 && r > -0.5) return static_cast<float>(std::log1p(r));
    return static_cast<float>(std::log(q.s) - std::log(p.s));
  }

  // E_q[d] and E_p[-d] (NaN for an empty distribution, as above).
  float mean_d_q() const { return static_cast<float>(a_q / q.s); }
  float mean_d_p() const { return static_cast<float>(a_p / p.s); }
  // E_q[d - d_a] and the raw u_a, both NaN where the anchor is not finite (no anchor: the gradient takes E_q[d]).
  float mean_d_anchor() const {
    const double mean = a_anchor / q.s;
    if (!std::isfinite(mean) || !std::isfinite(ua)) return std::numeric_limits<float>::quiet_NaN();
    return static_cast<float>(mean);
  }
  float anchor_u() const { return std::isnan(mean_d_anchor()) ? std::numeric_limits<float>::quiet_NaN() : ua; }
};

}  // namespace minillm

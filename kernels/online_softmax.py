"""Per-row softmax math shared by every Triton kernel: loads of raw logits, their centring and scaling, the online
(one-pass) max / rescaled sums update, the merge of two partial states and the JSD's element terms.

The logits are read raw (float32 of the input, before the temperature). Every centred logit anywhere is
``c = fl(fl(x - m) * inv_temp)`` (``centre``): the raw max m is subtracted first, exactly or rounded relative to
|x - m|, then the difference is scaled. fl(x * inv_temp) - m' would round each logit at ulp(|x / tau|) before the
cancellation (~3e-5 with logits near -1000 at tau = 2.7). With inv_temp = 1 the result is bitwise x - m.

A row is processed block by block. The state of one distribution after some blocks is a scalar running (raw) max
``m`` and per-lane partial sums (vectors of the block's shape, reduced once at the end of the row), all relative to
``m``, with c = fl(fl(x - m) * inv_temp)::

    s = sum exp(c)                       (the normaliser)
    a = sum exp(c) * v                   (numerator of E[v], for one value v per entry)
    b = sum exp(c) * c                   (numerator of E[c], the "centred" mean, <= 0)

When the max grows from m to m', by delta = fl(fl(m' - m) * inv_temp) in scaled units, every term is multiplied by
exp(-delta); the centred sum also moves its origin, c' = c - delta, hence::

    s' = exp(-delta) s,   a' = exp(-delta) a,   b' = exp(-delta) (b - delta s).

Each block costs one block max (``tl.max``) and one ``exp`` per element (plus one scalar exp). Entries of zero weight
(exp(c) == 0, e.g. x = -inf) contribute nothing even where v or c is infinite: 0 * inf = 0 here, as everywhere in
the library. A row with no finite entry keeps m = -inf (shift 0) and s = 0 (log s = -inf).
"""
import triton
import triton.language as tl

# Columns of a stats row (minillm_fast.backends: M_Q, LOGS_Q, M_P, LOGS_P, EQ_D, EQ_ZC, EP_D, EP_UC, ZY, UY, UA, EQ_DA,
# LOG_RATIO).
NUM_STATS = tl.constexpr(13)
# |log p - log q| below which the JSD value takes g and h from expm1 and log1p (``near_ratio_terms``).
NEAR_RATIO = tl.constexpr(0.5)

# Keyword arguments of every launch of these kernels: no contraction of a product and a following sum into an FMA,
# so each float operation rounds on its own, as in Triton's interpreter (which CI runs) and in the cpu and cuda
# backends. The argmax anchor (UA, EQ_DA) depends on it: every pass must form bitwise the same centred logit
# c = fl(fl(x - m) * inv_temp) (``centre``), and a product contracted into the following subtraction or addition
# (fma(fl(x - m), inv_temp, -c_p), say) would differ from the rounded c by its rounding error wherever
# temperature != 1. Triton 3.9 contracts unless told otherwise. The kernels are bound by memory (or by tl.dot), so
# the unfused arithmetic should cost little; not yet measured on a GPU.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def load_logits(row_ptr, cols, mask):
    """x = float32(logits[cols]) (raw, before the temperature), -inf outside ``mask``. The logits are read exactly
    once per kernel, so they are marked evict-first."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first")
    return x.to(tl.float32)


@triton.jit
def centre(x, shift, inv_temp):
    """The centred, scaled logit c = fl(fl(x - shift) * inv_temp) of raw logits x and a raw (finite) shift: two
    separately rounded operations (``LAUNCH_OPTIONS`` keeps the product out of any FMA), the same expression in every
    pass, so that forward and backward see bitwise the same c."""
    return (x - shift) * inv_temp


@triton.jit
def finite_or_zero(m):
    """m where it is finite, else 0 (the shift used for an empty row, whose max is -inf)."""
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def move_factors(m, m_new, inv_temp):
    """For a state of raw max m moving to the raw max m_new >= m: (alpha = exp(-delta), delta) with
    delta = fl(fl(m_new - m) * inv_temp) the growth in scaled units. alpha is 0 and delta is 0 while nothing finite
    has been seen (m = -inf), so the empty sums stay exactly 0."""
    alpha = tl.exp(centre(m, finite_or_zero(m_new), inv_temp))
    delta = tl.where(m > float("-inf"), (m_new - m) * inv_temp, 0.0)
    return alpha, delta


@triton.jit
def rescale_factors(m, block_max, inv_temp):
    """For a new block of raw maximum block_max: (m' = max(m, block_max), shift = finite m', alpha = exp(-delta),
    delta = fl(fl(m' - m) * inv_temp)) (``move_factors``)."""
    m_new = tl.maximum(m, block_max)
    alpha, delta = move_factors(m, m_new, inv_temp)
    return m_new, finite_or_zero(m_new), alpha, delta


@triton.jit
def block_max2(x, y):
    """(max x, max y) in one CTA-wide reduction (one round trip through shared memory instead of two)."""
    return tl.split(tl.max(tl.join(x, y), 0))


@triton.jit
def online_max_sum(m, s, x, inv_temp):
    """Online update of (m, s = sum exp(c)) with one block x of raw logits; s is per-lane."""
    m_new, shift, alpha, delta = rescale_factors(m, tl.max(x, 0), inv_temp)
    e = tl.exp(centre(x, shift, inv_temp))
    return m_new, s * alpha + e


@triton.jit
def online_update(m, s, a, b, x, v, block_max, inv_temp):
    """Online update of (m, s, a, b) (see the module docstring) with one block of raw logits x, its maximum
    block_max (computed by the caller, so that two distributions can share one reduction) and values v.

    ``a`` is rescaled with a guard so that a term which was +-inf (v infinite where the weight was positive) but whose
    weight has since underflowed to 0 does not turn into inf * 0 = NaN."""
    m_new, shift, alpha, delta = rescale_factors(m, block_max, inv_temp)
    c = centre(x, shift, inv_temp)
    e = tl.exp(c)
    positive = e > 0
    a = tl.where(alpha > 0, a * alpha, 0.0) + tl.where(positive, e * v, 0.0)
    b = (b - delta * s) * alpha + tl.where(positive, e * c, 0.0)
    s = s * alpha + e
    return m_new, s, a, b


@triton.jit
def block_anchor(x, y, max_x, m_q, ua):
    """The anchor after a block (minillm_fast.backends: a = the first entry reaching q's max): the raw u at the
    block's first lane with x = max_x where the block raises the max, else the running ``ua``. The lane search costs
    two reductions, so it runs only in the (few) blocks that raise the max."""
    if max_x > m_q:
        lanes = tl.arange(0, x.shape[0])
        first = tl.min(tl.where(x == max_x, lanes, x.shape[0]), 0)
        ua_new = tl.sum(tl.where(lanes == first, y, 0.0), 0)
    else:
        ua_new = ua
    return ua_new


@triton.jit
def anchor_moved(an, s_q, alpha, delta, ua_old, ua_new, inv_temp):
    """The anchored cross sum of a state whose q max grows by delta (scaled units, alpha = exp(-delta)) to an entry
    with raw u = ua_new: d - d_a' = (d - d_a) - (delta - (u_a' - u_a) / tau), so
    an' = alpha (an - (delta - fl(fl(ua_new - ua_old) * inv_temp)) s_q); 0 for an empty state (alpha = 0)."""
    return tl.where(alpha > 0, (an - (delta - (ua_new - ua_old) * inv_temp) * s_q) * alpha, 0.0)


@triton.jit
def difference_moved(d_qp, s_p, alpha_q, alpha_p):
    """d_qp = s_q - s_p (each relative to its own max) after the maxima move with factors alpha = exp(-delta):
    alpha_q s_q - alpha_p s_p = alpha_q d_qp + (alpha_q - alpha_p) s_p. Kept apart from s_q and s_p because for
    close distributions it is small, so its rounding is relative to the difference (``log_ratio``)."""
    return alpha_q * d_qp + (alpha_q - alpha_p) * s_p


@triton.jit
def online_update_pair(m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, an, ua, d_qp, x, y, max_x, max_y, inv_temp):
    """Online update of both distributions' states with one block of raw student (x) and teacher (y) logits.

    The cross sums are kept relative to BOTH running maxima, a_q = sum e_q (c_q - c_p) and a_p = sum e_p (c_p - c_q)
    with the centred logits c_q = fl(fl(x - m_q) * inv_temp), c_p = fl(fl(y - m_p) * inv_temp) (``centre``),
    because each centred logit is exact to its own size while x / tau - y / tau would lose all precision when both
    rows sit near 1e4. When the raw maxima grow, by (delta_q, delta_p) in scaled units, every term moves by
    -(delta_q - delta_p), hence a_q' = exp(-delta_q) (a_q - (delta_q - delta_p) s_q), symmetrically for a_p.

    The anchored cross sum an = sum e_q (d - d_a), d - d_a = d + fl(fl(u_a - m_p) * inv_temp) (exactly 0 at the
    anchor a, the first entry reaching q's max, whose raw u is ua: minillm_fast.backends) moves with the anchor:
    an' = exp(-delta_q) (an - (delta_q - (u_a' - u_a) / tau) s_q) when the block raises q's max (``anchor_moved``).

    d_qp = sum (e_q - e_p) = s_q - s_p, summed entry by entry for ``log_ratio`` (``difference_moved``)."""
    m_q_new, shift_q, alpha_q, delta_q = rescale_factors(m_q, max_x, inv_temp)
    m_p_new, shift_p, alpha_p, delta_p = rescale_factors(m_p, max_y, inv_temp)
    ua_new = block_anchor(x, y, max_x, m_q, ua)
    xc = centre(x, shift_q, inv_temp)
    yc = centre(y, shift_p, inv_temp)
    e_q = tl.exp(xc)
    e_p = tl.exp(yc)
    d = xc - yc
    a_q = tl.where(alpha_q > 0, (a_q - (delta_q - delta_p) * s_q) * alpha_q, 0.0) + tl.where(e_q > 0, e_q * d, 0.0)
    a_p = tl.where(alpha_p > 0, (a_p - (delta_p - delta_q) * s_p) * alpha_p, 0.0) + tl.where(e_p > 0, -e_p * d, 0.0)
    b_q = (b_q - delta_q * s_q) * alpha_q + tl.where(e_q > 0, e_q * xc, 0.0)
    b_p = (b_p - delta_p * s_p) * alpha_p + tl.where(e_p > 0, e_p * yc, 0.0)
    an = tl.where(max_x > m_q, anchor_moved(an, s_q, alpha_q, delta_q, ua, ua_new, inv_temp), an)
    an = an + tl.where(e_q > 0, e_q * (d + centre(ua_new, shift_p, inv_temp)), 0.0)
    d_qp = difference_moved(d_qp, s_p, alpha_q, alpha_p) + (e_q - e_p)
    s_q = s_q * alpha_q + e_q
    s_p = s_p * alpha_p + e_p
    return m_q_new, s_q, a_q, b_q, m_p_new, s_p, a_p, b_p, an, ua_new, d_qp


@triton.jit
def anchor_stats(an_sum, s_sum, ua):
    """(UA, EQ_DA) from a row's reduced anchored sum: both NaN where either is not finite (no anchor)."""
    mean = an_sum / s_sum
    ok = (tl.abs(mean) < float("inf")) & (tl.abs(ua) < float("inf"))
    return tl.where(ok, ua, float("nan")), tl.where(ok, mean, float("nan"))


@triton.jit
def merge_states(m1, s1, a1, b1, m2, s2, a2, b2, inv_temp):
    """Merge two reduced (scalar) states of disjoint parts of a row into one (for split-row reductions): each moves
    from its raw max m_i to the merged raw max m by delta_i = fl(fl(m - m_i) * inv_temp) (``move_factors``)."""
    m = tl.maximum(m1, m2)
    alpha1, delta1 = move_factors(m1, m, inv_temp)
    alpha2, delta2 = move_factors(m2, m, inv_temp)
    s = s1 * alpha1 + s2 * alpha2
    a = tl.where(alpha1 > 0, a1 * alpha1, 0.0) + tl.where(alpha2 > 0, a2 * alpha2, 0.0)
    b = (b1 - delta1 * s1) * alpha1 + (b2 - delta2 * s2) * alpha2
    return m, s, a, b


@triton.jit
def log1p_accurate(t):
    """log(1 + t) for t > -1, accurate also for tiny t: with w = fl(1 + t), log(1 + t) = log(w) + (t - (w - 1)) / w
    to first order, the correction being exact enough with an approximate division."""
    w = 1.0 + t
    return tl.log(w) + tl.fdiv(t - (w - 1.0), w)


@triton.jit
def online_update_pair_rows(m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, an, ua, d_qp, x, y, inv_temp):
    """``online_update_pair`` for a 2-D tile: rows of raw student (x) and teacher (y) logits [R, C], one state
    per row ([R] vectors, already reduced over the columns seen so far). The tile's own terms are reduced along
    its columns at once, so the state stays [R] whatever the tile width (the fused-linear kernels, whose tiles
    come out of a matmul, cannot afford per-lane [R, C] sums next to two logit tiles).

    Same math as ``online_update_pair``: with the new raw maxima m' = max(m, tile max) and the growth
    (delta_q, delta_p) of each in scaled units, every old term is multiplied by exp(-delta) and the cross sums move
    by -(delta_q - delta_p) s; the anchor moves to the tile's first column reaching a new row max (``tl.argmax``
    breaks ties to the left)."""
    max_x = tl.max(x, 1)
    m_q_new, shift_q, alpha_q, delta_q = rescale_factors(m_q, max_x, inv_temp)
    m_p_new, shift_p, alpha_p, delta_p = rescale_factors(m_p, tl.max(y, 1), inv_temp)
    moves = max_x > m_q
    cols = tl.arange(0, x.shape[1])
    ua_tile = tl.sum(tl.where(cols[None, :] == tl.argmax(x, 1)[:, None], y, 0.0), 1)
    ua_new = tl.where(moves, ua_tile, ua)
    xc = centre(x, shift_q[:, None], inv_temp)
    yc = centre(y, shift_p[:, None], inv_temp)
    e_q = tl.exp(xc)
    e_p = tl.exp(yc)
    d = xc - yc
    a_q = (tl.where(alpha_q > 0, (a_q - (delta_q - delta_p) * s_q) * alpha_q, 0.0)
           + tl.sum(tl.where(e_q > 0, e_q * d, 0.0), 1))
    a_p = (tl.where(alpha_p > 0, (a_p - (delta_p - delta_q) * s_p) * alpha_p, 0.0)
           + tl.sum(tl.where(e_p > 0, -e_p * d, 0.0), 1))
    b_q = (b_q - delta_q * s_q) * alpha_q + tl.sum(tl.where(e_q > 0, e_q * xc, 0.0), 1)
    b_p = (b_p - delta_p * s_p) * alpha_p + tl.sum(tl.where(e_p > 0, e_p * yc, 0.0), 1)
    an = tl.where(moves, anchor_moved(an, s_q, alpha_q, delta_q, ua, ua_new, inv_temp), an)
    an = an + tl.sum(tl.where(e_q > 0, e_q * (d + centre(ua_new, shift_p, inv_temp)[:, None]), 0.0), 1)
    d_qp = difference_moved(d_qp, s_p, alpha_q, alpha_p) + tl.sum(e_q - e_p, 1)
    s_q = s_q * alpha_q + tl.sum(e_q, 1)
    s_p = s_p * alpha_p + tl.sum(e_p, 1)
    return m_q_new, s_q, a_q, b_q, m_p_new, s_p, a_p, b_p, an, ua_new, d_qp


@triton.jit
def merge_anchors(an1, s_q1, m_q1, ua1, an2, s_q2, m_q2, ua2, inv_temp):
    """The anchored sums of two reduced states of disjoint parts of a row, part 1 first (its anchor wins ties),
    merged: the anchor a is the part with the larger raw max, and part i moves to it and to the merged max M by
    d - d_a = (d - d_ai) - (fl(fl(M - m_qi) * inv_temp) - fl(fl(u_a - u_ai) * inv_temp)) (``anchor_moved``).
    Returns (an, ua)."""
    m_q = tl.maximum(m_q1, m_q2)
    ua = tl.where(m_q2 > m_q1, ua2, ua1)
    alpha1, delta1 = move_factors(m_q1, m_q, inv_temp)
    alpha2, delta2 = move_factors(m_q2, m_q, inv_temp)
    an = (anchor_moved(an1, s_q1, alpha1, delta1, ua1, ua, inv_temp)
          + anchor_moved(an2, s_q2, alpha2, delta2, ua2, ua, inv_temp))
    return an, ua


@triton.jit
def merge_differences(d1, s_p1, m_q1, m_p1, d2, s_p2, m_q2, m_p2, inv_temp):
    """The kept differences d_qp = s_q - s_p of two reduced states of disjoint parts of a row, merged: each moved to
    the merged raw maxima (``move_factors``, ``difference_moved``) and added."""
    m_q = tl.maximum(m_q1, m_q2)
    m_p = tl.maximum(m_p1, m_p2)
    alpha_q1, _ = move_factors(m_q1, m_q, inv_temp)
    alpha_q2, _ = move_factors(m_q2, m_q, inv_temp)
    alpha_p1, _ = move_factors(m_p1, m_p, inv_temp)
    alpha_p2, _ = move_factors(m_p2, m_p, inv_temp)
    return difference_moved(d1, s_p1, alpha_q1, alpha_p1) + difference_moved(d2, s_p2, alpha_q2, alpha_p2)


@triton.jit
def merge_state_pairs(m_q1, s_q1, a_q1, b_q1, m_p1, s_p1, a_p1, b_p1,
                      m_q2, s_q2, a_q2, b_q2, m_p2, s_p2, a_p2, b_p2, inv_temp):
    """Merge two reduced pair states (``online_update_pair``'s, of disjoint parts of a row) into one.

    ``merge_states`` does not fit the cross sums: a_q = sum e_q (c_q - c_p) is relative to both maxima, so moving
    part i from its raw maxima (m_qi, m_pi) to the merged (m_q, m_p), by (delta_qi, delta_pi) >= 0 in scaled units
    (``move_factors``: fl(fl(m_q - m_qi) * inv_temp), ...), also shifts every term by -(delta_qi - delta_pi):
    a_q = sum_i exp(-delta_qi) (a_qi - (delta_qi - delta_pi) s_qi), and symmetrically for a_p. A part with no
    finite entry (m = -inf, sums 0) contributes exactly 0."""
    m_q = tl.maximum(m_q1, m_q2)
    m_p = tl.maximum(m_p1, m_p2)
    alpha_q1, delta_q1 = move_factors(m_q1, m_q, inv_temp)
    alpha_q2, delta_q2 = move_factors(m_q2, m_q, inv_temp)
    alpha_p1, delta_p1 = move_factors(m_p1, m_p, inv_temp)
    alpha_p2, delta_p2 = move_factors(m_p2, m_p, inv_temp)
    s_q = s_q1 * alpha_q1 + s_q2 * alpha_q2
    s_p = s_p1 * alpha_p1 + s_p2 * alpha_p2
    a_q = (tl.where(alpha_q1 > 0, (a_q1 - (delta_q1 - delta_p1) * s_q1) * alpha_q1, 0.0)
           + tl.where(alpha_q2 > 0, (a_q2 - (delta_q2 - delta_p2) * s_q2) * alpha_q2, 0.0))
    a_p = (tl.where(alpha_p1 > 0, (a_p1 - (delta_p1 - delta_q1) * s_p1) * alpha_p1, 0.0)
           + tl.where(alpha_p2 > 0, (a_p2 - (delta_p2 - delta_q2) * s_p2) * alpha_p2, 0.0))
    b_q = (b_q1 - delta_q1 * s_q1) * alpha_q1 + (b_q2 - delta_q2 * s_q2) * alpha_q2
    b_p = (b_p1 - delta_p1 * s_p1) * alpha_p1 + (b_p2 - delta_p2 * s_p2) * alpha_p2
    return m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p


@triton.jit
def log_ratio(s_q, s_p, d_qp):
    """LOG_RATIO = log(s_q / s_p) as log1p(d_qp / s_p), with d_qp = s_q - s_p summed entry by entry
    (``difference_moved``): neither the float32 roundings of log s_q and log s_p (ulp ~5e-7 at log s ~ 10, as large
    as a KL of 1e-3 times 2e-5) nor those of the sums s_q and s_p enter; log s_q - log s_p where s_q < s_p / 2 or
    either is 0."""
    r = d_qp / s_p
    close = (s_q > 0) & (s_p > 0) & (r > -0.5)
    return tl.where(close, log1p_accurate(tl.where(close, r, 0.0)), tl.log(s_q) - tl.log(s_p))


@triton.jit
def mixture_terms(r, log_beta, log_1m_beta):
    """(c, L, h) of the log-ratio r = log p - log q: g = log q - log m = -c - L = -logaddexp(r + log beta,
    log(1 - beta)), with c its larger argument and L = log1p(exp(-|delta|)), delta = r + log beta - log(1 - beta);
    h = log p - log m = -logaddexp(log beta, log(1 - beta) - r), sharing that exp and log1p: where delta > 0,
    c = r + log beta and h = -(log beta + L), else c = log(1 - beta) and h = (r - log(1 - beta)) - L."""
    a = r + log_beta
    delta = a - log_1m_beta
    l = log1p_accurate(tl.exp(-tl.abs(delta)))
    return tl.where(delta > 0, a, log_1m_beta), l, tl.where(delta > 0, -log_beta, r - log_1m_beta) - l


@triton.jit
def jsd_anchor(m_q, log_s_q, m_p, log_s_p, ua, log_beta, log_1m_beta, inv_temp):
    """(c_a, L_a, x_p,a) of a row's anchor a (z_a = M_Q, u_a = UA, raw; ``mixture_terms`` of
    r_a = x_p,a - (log s_p - log s_q) with its centred teacher logit x_p,a = fl(fl(UA - m_p) * inv_temp)):
    g_a = -c_a - L_a. c_a = L_a = 0 where the row has none (UA NaN; then no entry matches x_p,a either)."""
    anchor_off = centre(ua, finite_or_zero(m_p), inv_temp)
    c_a, l_a, _ = mixture_terms(anchor_off - (log_s_p - log_s_q), log_beta, log_1m_beta)
    return tl.where(ua == ua, c_a, 0.0), tl.where(ua == ua, l_a, 0.0), anchor_off


@triton.jit
def expm1_small(r):
    """exp(r) - 1 for |r| <= 1/2, with full relative precision however small r is: r (1 + r/2! + ... + r^8/9!) in
    Horner form (truncation below 6e-10 relative). exp(r) - 1 would not do: ``tl.exp`` is ex2.approx on the GPU,
    and its result, rounded near 1, leaves an absolute error of ~6e-8 in the difference."""
    s = 1.0 / 362880.0
    s = s * r + 1.0 / 40320.0
    s = s * r + 1.0 / 5040.0
    s = s * r + 1.0 / 720.0
    s = s * r + 1.0 / 120.0
    s = s * r + 1.0 / 24.0
    s = s * r + 1.0 / 6.0
    s = s * r + 0.5
    s = s * r + 1.0
    return s * r


@triton.jit
def near_ratio_terms(r, g, h, beta, one_m_beta):
    """(g, h) with, where |r| < NEAR_RATIO, g = -log1p(beta expm1(r)) and h = -log1p((1 - beta) expm1(-r)) instead
    of the given ones (``mixture_terms``' -c - L and h, the same functions of r): there g ~ -beta r and
    h ~ (1 - beta) r are small, and -c - L, a difference of two numbers near log 2 for beta = 1/2, rounds them at
    ~6e-8 absolute, which the JSD of close distributions (~beta (1 - beta) E_q[r^2] / 2 per row) cannot afford.
    Here each is rounded relative to itself (beta expm1(r) lies in (-0.4, 0.65)). The near forms are evaluated on
    r set to 0 outside the window, so that they never overflow where they are not selected."""
    near = tl.abs(r) < NEAR_RATIO
    rn = tl.where(near, r, 0.0)
    g_near = -log1p_accurate(beta * expm1_small(rn))
    h_near = -log1p_accurate(one_m_beta * expm1_small(-rn))
    return tl.where(near, g_near, g), tl.where(near, h_near, h)


@triton.jit
def jsd_mixture_terms(x, y, m_q, log_s_q, m_p, log_s_p, log_beta, log_1m_beta, c_a, l_a, anchor_off, inv_temp):
    """Element terms of the generalised JSD for raw student (x) and teacher (y) logits, their row statistics and
    anchor (``jsd_anchor``; scalars for a 1-D block, [R, 1] columns for an [R, C] tile): (q, g - g_a, p, r, -c - L,
    h) with q, p the probabilities, r = (x_p - x_q) - (log s_p - log s_q) the log-ratio log p - log q
    (x_q = fl(fl(x - M_Q) * inv_temp) and x_p likewise, ``centre``: the difference of the centred logits, not of
    two log-probs each rounded at ulp(|log q|) ~ 1e-6, a bias of ~4e-7 per row when q ~ p) and, with
    m = beta p + (1 - beta) q, g = log q - log m = -c - L and h = log p - log m from r alone (``mixture_terms``).
    g - g_a = (c_a - c) + (L_a - L), exactly 0 at the anchor's entries (x_q = 0, x_p = x_p,a) and 0 where q = 0
    (0 * inf = 0: an entry of zero probability contributes nothing): the gradient's g - E_q[g] is taken as
    (g - g_a) - E_q[g - g_a], so that in nearly one-hot rows the anchor's -q_a E_q[g - g_a], far below
    ulp(|g_a|), is not lost to the difference of two rounded numbers near g_a; where both terms sit on the
    log(1 - beta) branch it is L_a - L, exact however small (minillm_fast.backends: jsd_rows). The gradient
    kernels take (q, g - g_a) alone; -c - L and h are the value's only far from q = p (``jsd_terms``)."""
    xq = centre(x, finite_or_zero(m_q), inv_temp)
    yp = centre(y, finite_or_zero(m_p), inv_temp)
    r = (yp - xq) - (log_s_p - log_s_q)
    c, l, h = mixture_terms(r, log_beta, log_1m_beta)
    q = tl.exp(xq - log_s_q)
    p = tl.exp(yp - log_s_p)
    g_rel = tl.where((xq == 0.0) & (yp == anchor_off), 0.0, (c_a - c) + (l_a - l))
    return q, tl.where(q > 0, g_rel, 0.0), p, r, -c - l, h


@triton.jit
def jsd_terms(x, y, m_q, log_s_q, m_p, log_s_p, log_beta, log_1m_beta, beta, one_m_beta, c_a, l_a, anchor_off,
              inv_temp):
    """The JSD value's element terms (q, g, g - g_a, p, h) (``jsd_mixture_terms``; beta and one_m_beta = 1 - beta
    as float32): g = log q - log m and h = log p - log m where q (resp. p) > 0, else 0, taken near q = p
    (|r| < NEAR_RATIO) as -log1p(beta expm1(r)) and -log1p((1 - beta) expm1(-r)) (``near_ratio_terms``), else as
    -c - L and h. g - g_a, the gradient's, is ``jsd_mixture_terms``' as it is."""
    q, g_rel, p, r, g, h = jsd_mixture_terms(x, y, m_q, log_s_q, m_p, log_s_p, log_beta, log_1m_beta, c_a, l_a,
                                             anchor_off, inv_temp)
    g, h = near_ratio_terms(r, g, h, beta, one_m_beta)
    return q, tl.where(q > 0, g, 0.0), g_rel, p, tl.where(p > 0, h, 0.0)

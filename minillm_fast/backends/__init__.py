"""Backends: interchangeable implementations of five row-wise primitives.

Every public op in ``minillm_fast.loss`` and ``minillm_fast.sampling`` is written on top of these primitives, so a
backend is a small module (``torch``, ``cpu``, ``triton``, ``cuda``) that provides exactly them. Inputs are 2-D
``[N, V_s]`` student and ``[N, V_t]`` teacher logits with unit stride along the vocabulary (any row stride), in
float32/bfloat16/float16, possibly of different dtypes; the distributions are taken over the first
``V = min(V_s, V_t)`` columns; ``inv_temp`` is 1/tau; all accumulation is float32.

``row_stats(z, u, tokens, inv_temp) -> float32 [N, NUM_STATS]``
    One pass over both rows (online max and rescaled sums). With the raw row maxima m_q = max z, m_p = max u and
    the *centred* logits x_q = (z - m_q)/tau, x_p = (u - m_p)/tau, ``s_q = sum exp(x_q)``, ``s_p = sum exp(x_p)``,
    q = exp(x_q)/s_q and p = exp(x_p)/s_p, the columns are::

        M_Q   max_v z_v   (raw)         LOGS_Q  log s_q
        M_P   max_v u_v   (raw)         LOGS_P  log s_p
        EQ_D  E_q[d]                    EQ_ZC   E_q[x_q]          (<= 0)
        EP_D  E_p[-d]                   EP_UC   E_p[x_p]          (<= 0)
        ZY    z_y         (raw)         UY      u_y  (raw)        (0 when tokens is None)
        UA    u_a         (raw)         EQ_DA   E_q[d - d_a]      (the anchor; NaN: none)
        LOG_RATIO  log(s_q / s_p)     (= LOGS_Q - LOGS_P, without their float32 roundings)

    so log q_v = x_q,v - LOGS_Q, log q(y) = (ZY - M_Q)/tau - LOGS_Q, and the log-sum-exp of z/tau is
    M_Q/tau + LOGS_Q. Every backend forms a centred logit as x = fl(fl(z - m) * inv_temp): the raw max is
    subtracted first (exact, or rounded relative to |z - m|), then the result is scaled, the two operations never
    fused, so that every pass forms bitwise the same x. Scaling first, fl(z * inv_temp) - m/tau, would round each
    logit at ulp(|z/tau|) before the cancellation (~3e-5 with logits near -1000 at tau = 2.7: gradients off by
    2e-4). d = x_q - x_p: z/tau - u/tau up to a per-row constant, but built from the two centred logits, so that
    rows sitting near |z| ~ 1e4 keep the precision of their differences (z/tau - u/tau itself would be rounded at
    1e4 before the cancellation). Then KL(q||p) = EQ_D - LOGS_Q + LOGS_P and
    KL(p||q) = EP_D - LOGS_P + LOGS_Q; the ops take them as EQ_D - LOG_RATIO and EP_D + LOG_RATIO. LOG_RATIO exists
    for close distributions (KL ~ 1e-3 per row): LOGS_Q and LOGS_P, each rounded to float32 at ulp(log s) ~ 5e-7,
    would by themselves exceed the design's 2e-5 there. Every backend forms it as log1p(D / s_p) from
    D = sum (exp(x_q) - exp(x_p)) = s_q - s_p accumulated entry by entry (small where q ~ p, so rounded
    relative to the difference; online D' = f_q D + (f_q - f_p) s_p with the two rescale factors f), and as
    log s_q - log s_p where s_q < s_p / 2 or either is 0 (minillm_fast.distributed sums D too). Online, when the
    raw maxima grow, by delta_q = fl(fl(m_q,new - m_q,old) * inv_temp) in centred units (and delta_p), the cross
    sum A_q = sum exp(x_q) d becomes exp(-delta_q) (A_q - (delta_q - delta_p) S_q) (symmetrically for A_p) and the
    centred sum B_q = sum exp(x_q) x_q becomes exp(-delta_q) (B_q - delta_q S_q).
    0 * inf = 0 throughout (an entry of zero probability contributes nothing). An empty row (all -inf) has
    M = -inf and LOGS = -inf; the ops treat it as masked.

    The anchor a is the first v with z_v = m_q (the student's argmax), and d - d_a = x_q - (x_p - x_p,a)
    depends on no shift of p. It exists for the gradient at a in nearly one-hot rows: there
    q_a (d_a - E_q[d]) = -q_a E_q[d - d_a] = -q_a sum_w q_w (d_w - d_a) is far smaller than |d_a| (~1e4 where the
    logits are ~1e4), and d_a - E_q[d], both rounded at ulp(|d_a|), would lose it entirely (an exactly one-hot row
    would get a gradient of ~1e-3 instead of 0). Online, when q's max moves to a new entry a', A = sum exp(x_q)
    (d - d_a) becomes exp(-delta_q) (A - (delta_q - (u_a' - u_a)/tau) S_q). Any entry with z_a = m_q serves: the
    cpu, torch and triton kernels take the first, the cuda kernels' merges the largest u among tied maxima. UA and
    EQ_DA are NaN where the anchor is not finite (u_a = -inf: an infinite reverse KL; an empty row); the gradient
    then takes d_v - E_q[d] everywhere. (minillm_fast.distributed carries the anchor across vocabulary shards.)

``logits_grad(z, u, tokens, stats, coef, inv_temp) -> [N, V_s] in z.dtype``
    coef is float32 [N, 4] = (c_kl, c_q, c_p, c_y) and the gradient is
    ``dz_v = c_kl q_v (d_v - E_q[d]) + c_q q_v + c_p p_v + c_y [v == y]`` with d as above, where d_v - E_q[d] is
    taken as -EQ_DA at the anchor's entries: x_q,v = 0 and x_p,v = fl(fl(UA - m_p) * inv_temp) (d_v = d_a).
    Every gradient of every op is such a combination (the 1/tau factor is folded into coef). Rows whose four
    coefficients are all zero are written as zeros without reading the logits; columns >= V are zero.

    The ``cpu`` backend also reads float32 logits stored *vocabulary-major* in row_stats, logits_grad and
    logits_grad_ (``z.stride(0) == 1``, ``z.stride(1) >= N``: a [V, ld] buffer seen through a transpose, as the
    fused-linear ops form their CPU blocks), in place, and then returns dz in that layout too.

``jsd_rows(z, u, stats, beta, inv_temp) -> float32 [N, 2]``
    Second pass for 0 < beta < 1: (JSD_beta, E_q[g - g_a]) with g_v = log q_v - log m_v, m = beta p + (1-beta) q.
    g and h = log p - log m are functions of the log-ratio r = log p - log q alone, and are computed from it:
    g = -logaddexp(r + log beta, log(1 - beta)), h = -logaddexp(log beta, log(1 - beta) - r), with
    r = (x_p - x_q) - (log s_p - log s_q). (log q - log m from two log-probabilities, each rounded at
    ulp(|log q|) ~ 1e-6, biased every row by ~4e-7: 5e-4 relative when q ~ p.) For the first column, where
    |r| < 1/2, g = -log1p(beta expm1(r)) and h = -log1p((1 - beta) expm1(-r)): the same functions, but small
    there (~ -beta r, (1 - beta) r) and rounded relative to themselves, not at ulp(log 2) as the logaddexp forms
    are, which the JSD of close distributions (~beta (1 - beta) E_q[r^2] / 2) cannot afford. (The cpu kernels
    take them only in rows whose reverse KL, EQ_D - LOG_RATIO, is below 0.05, where those roundings matter.)
    The second column is the gradient's mean taken relative to row_stats' anchor a, as for the reverse KL:
    g_a = g(r_a), r_a = x_p,a - (log s_p - log s_q) with x_p,a = fl(fl(UA - m_p) * inv_temp), evaluated from the
    statistics (so every vocabulary shard uses the same g_a), and g_v - g_a taken as exactly 0 at the anchor's
    entries (x_q,v = 0 and x_p,v = x_p,a); g_a = 0 where the row has no anchor (UA NaN), making it E_q[g]. In
    nearly one-hot rows (logits ~30 apart or more, the student peaked where the teacher is not, or both peaked
    alike) the gradient at a, q_a (g_a - E_q[g]) = -q_a E_q[g - g_a], is far below ulp(|g_a|); g_a - E_q[g] formed
    from two rounded numbers would lose it (relative errors of 1e-2 and more).

``jsd_grad(z, u, stats, jsd, coef, beta, inv_temp) -> [N, V_s] in z.dtype``
    ``dz_v = coef q_v ((g_v - g_a) - E_q[g - g_a])`` (= coef q_v (g_v - E_q[g])) with coef float32 [N] (it includes
    (1-beta)/tau), g_a and the anchor's entries as in jsd_rows.

``sample_rows(z, u, use_teacher, uniform, inv_temp) -> int64 [N]``
    Inverse-CDF draw from softmax(u/tau) where use_teacher else softmax(z/tau), with one float64 uniform in [0, 1)
    per row: the first v with cumsum(exp(fl(fl(x - m) * inv_temp))) > uniform * s (m the raw max). Never returns
    an entry of probability 0. Rows whose chosen distribution is empty return -1.

Optional (a backend may have them; the ops fall back without them):

``row_stats_grad(z, u, tokens, coef, policy, clip_eps, inv_temp, grad_dtype) -> (stats, dz)`` (CUDA)
    row_stats and logits_grad in one pass, each row read once: for coefficients known before the statistics.
    With ``policy`` (float32 [N, 3] = advantage, old log-prob, importance weight) the c_q and c_y columns are first
    multiplied by MiniLLM's clipped policy-gradient factor d pg / d log q(y) of the row (``_policy_gradient_rows``
    in minillm_fast.loss); rows with an empty distribution get dz = 0. dz is in ``grad_dtype`` (default z's).
    Where the kernel has no plan for the rows (too long, not aligned for vector loads, ...) dz comes back empty
    and the caller runs logits_grad itself. Reference: ``minillm_fast.loss.row_stats_grad_composed``.
``row_stats_grad_into(z, u, tokens, coef, policy, clip_eps, inv_temp, out) -> stats`` (CUDA): row_stats_grad with
    dz written into ``out`` ([N, V_s], unit column stride, any row stride, dtype as ``logits_grad_into``'s), for any
    rows (always the two passes chunk by chunk of rows held in L2): the fused-linear blocked path's opt-in.
``scale_unless_one_(x, factor)`` (CUDA): x *= factor in place, skipped on the device when factor (a float32
    scalar tensor) is 1, so that the common upstream gradient 1.0 costs neither a pass nor a host sync.
``logits_grad_(z, u, tokens, stats, coef, inv_temp)`` (CPU): logits_grad written over z.
``advise_huge_pages_(x)`` (CPU): a hint that x's pages be transparent huge pages (Linux ``madvise``; a no-op
    elsewhere, for buffers under 8 MiB, or with ``MINILLM_FAST_NO_HUGEPAGES=1``), given before x is first touched.
``logits_grad_into(z, u, tokens, stats, coef, inv_temp, out)`` (CUDA): logits_grad written into ``out`` ([N, V_s],
    unit column stride, any row stride), in z's dtype or, for float32 rows, bfloat16 / float16: the fused-linear
    blocked path writes a block's gradient straight into its 16-bit group buffer.
"""
from __future__ import annotations

M_Q, LOGS_Q, M_P, LOGS_P, EQ_D, EQ_ZC, EP_D, EP_UC, ZY, UY, UA, EQ_DA, LOG_RATIO = range(13)
NUM_STATS = 13
C_KL, C_Q, C_P, C_Y = range(4)
NUM_COEFS = 4

"""row_stats: per-row statistics of q = softmax(z / tau) and p = softmax(u / tau) in one pass over both rows.

With the raw row maxima M_Q = max z, M_P = max u, the centred logits c_q = fl(fl(z - M_Q) * inv_temp),
c_p = fl(fl(u - M_P) * inv_temp) (``online_softmax.centre``: the raw max subtracted before the scaling) and
d = c_q - c_p (z / tau - u / tau up to a per-row constant), one program reads row ``row`` of z and u once, block by
block, and keeps for each distribution the online state of ``online_softmax`` (running raw max, normaliser,
E-numerator of one value, centred numerator), and the cross sum anchored at the argmax. At the end of the row
(layout of ``minillm_fast.backends``)::

    M_Q = max z (raw)   LOGS_Q = log sum exp(c_q)   EQ_D = E_q[d]    EQ_ZC = E_q[c_q]
    M_P = max u (raw)   LOGS_P = log sum exp(c_p)   EP_D = E_p[-d]   EP_UC = E_p[c_p]
    ZY = z_y, UY = u_y (raw; HAS_TOKENS), else 0;   UA = u_a (raw), EQ_DA = E_q[d - d_a] (the argmax anchor).

Entries of zero probability contribute nothing (0 * inf = 0); an all -inf row gives M = -inf, LOGS = -inf and
0 / 0 for its means, exactly as the reference PyTorch backend. Offsets are int64 (row * stride).
"""
import triton
import triton.language as tl

from .online_softmax import NUM_STATS, anchor_stats, block_max2, log_ratio, online_update_pair



@triton.jit
def row_stats_kernel(z_ptr, u_ptr, tok_ptr, out_ptr,
                     stride_z, stride_u, stride_tok, V, inv_temp,
                     HAS_TOKENS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    lanes = tl.arange(0, BLOCK)

    m_q = tl.full([], float("-inf"), tl.float32)
    m_p = tl.full([], float("-inf"), tl.float32)
    s_q = tl.zeros([BLOCK], tl.float32)
    a_q = tl.zeros([BLOCK], tl.float32)
    b_q = tl.zeros([BLOCK], tl.float32)
    s_p = tl.zeros([BLOCK], tl.float32)
    a_p = tl.zeros([BLOCK], tl.float32)
    b_p = tl.zeros([BLOCK], tl.float32)
    an = tl.zeros([BLOCK], tl.float32)  # the anchored cross sum and its raw u_a (online_update_pair)
    ua = tl.full([], float("nan"), tl.float32)
    d_qp = tl.zeros([BLOCK], tl.float32)  # s_q - s_p, summed entry by entry (online_update_pair)
    # The next block's loads are issued before this block's max (a CTA-wide reduction), so that memory stays busy
    # while the warps wait for each other.
    z_next = tl.load(z_row + lanes, mask=lanes < V, other=float("-inf"), eviction_policy="evict_first")
    u_next = tl.load(u_row + lanes, mask=lanes < V, other=float("-inf"), eviction_policy="evict_first")
    for start in range(0, V, BLOCK):
        x = z_next.to(tl.float32)
        y = u_next.to(tl.float32)
        cols = start + BLOCK + lanes
        z_next = tl.load(z_row + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_first")
        u_next = tl.load(u_row + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_first")
        max_x, max_y = block_max2(x, y)
        m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, an, ua, d_qp = online_update_pair(
            m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, an, ua, d_qp, x, y, max_x, max_y, inv_temp)

    sum_q = tl.sum(s_q, 0)
    sum_p = tl.sum(s_p, 0)
    out_row = out_ptr + row * NUM_STATS
    tl.store(out_row + 0, m_q)
    tl.store(out_row + 1, tl.log(sum_q))
    tl.store(out_row + 2, m_p)
    tl.store(out_row + 3, tl.log(sum_p))
    tl.store(out_row + 4, tl.sum(a_q, 0) / sum_q)
    tl.store(out_row + 5, tl.sum(b_q, 0) / sum_q)
    tl.store(out_row + 6, tl.sum(a_p, 0) / sum_p)
    tl.store(out_row + 7, tl.sum(b_p, 0) / sum_p)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * stride_tok).to(tl.int64)
        ok = (tok >= 0) & (tok < V)
        zy = tl.load(z_row + tok, mask=ok, other=0.0).to(tl.float32)
        uy = tl.load(u_row + tok, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_row + 8, zy)
        tl.store(out_row + 9, uy)
    else:
        tl.store(out_row + 8, 0.0)
        tl.store(out_row + 9, 0.0)
    ua_out, eq_da = anchor_stats(tl.sum(an, 0), sum_q, ua)
    tl.store(out_row + 10, ua_out)
    tl.store(out_row + 11, eq_da)
    tl.store(out_row + 12, log_ratio(sum_q, sum_p, tl.sum(d_qp, 0)))

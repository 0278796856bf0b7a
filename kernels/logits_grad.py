"""logits_grad: the student-logit gradient of every op, one pass per row.

With the row's statistics (``row_stats``) and coefficients (c_kl, c_q, c_p, c_y)::

    x_q,v = fl(fl(z_v - M_Q) * inv_temp),   x_p,v = fl(fl(u_v - M_P) * inv_temp)      (raw maxima: ``centre``)
    q_v  = exp(x_q,v - LOGS_Q),   p_v = exp(x_p,v - LOGS_P),   d_v = x_q,v - x_p,v
    dz_v = c_kl q_v (d_v - E_q[d]) + c_q q_v + c_p p_v + c_y [v == y]      (v < V;  dz_v = 0 for V <= v < V_s)

with d_v - E_q[d] taken as -EQ_DA at the argmax anchor's entries (x_q,v = 0, x_p,v = fl(fl(UA - M_P) * inv_temp)),
the same expressions as in ``row_stats``, so that the anchor's entries match bitwise.

The KL term is 0 where q_v = 0 (0 * inf = 0), and a term whose coefficient is 0 is skipped, not multiplied by 0
(so an infinite d or an empty teacher row cannot leak NaN into a row that does not use them). A row whose four
coefficients are all zero is written as zeros without reading any logits; the teacher row is read only when c_kl or
c_p is non-zero for that row. The output is rounded to z's dtype (round to nearest even on the GPU).
"""
import triton
import triton.language as tl

from .online_softmax import NUM_STATS, centre, finite_or_zero, load_logits

NUM_COEFS = tl.constexpr(4)


@triton.jit
def _grad_row(z_row, u_row, dz_row, V, Vs, inv_temp, m_q, log_s_q, m_p, log_s_p, eq_d, ua, eq_da,
              c_kl, c_q, c_p, c_y, tok,
              MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Write one gradient row. MODE 0: zeros; 1: student terms only (c_q, c_y); 2: all terms (reads u)."""
    lanes = tl.arange(0, BLOCK)
    for start in range(0, Vs, BLOCK):
        cols = start + lanes
        in_v = cols < V
        if MODE == 0:
            g = tl.zeros([BLOCK], tl.float32)
        else:
            xq = centre(load_logits(z_row, cols, in_v), finite_or_zero(m_q), inv_temp)
            q = tl.exp(xq - log_s_q)
            g = c_q * q
            if MODE == 2:
                xp = centre(load_logits(u_row, cols, in_v), finite_or_zero(m_p), inv_temp)
                at_anchor = (xq == 0.0) & (xp == centre(ua, finite_or_zero(m_p), inv_temp))  # d_v = d_a: E_q[d - d_a]
                centred = tl.where(q > 0, q * tl.where(at_anchor, -eq_da, (xq - xp) - eq_d), 0.0)
                g = tl.where(c_kl != 0, g + c_kl * centred, g)
                p = tl.exp(xp - log_s_p)
                g = tl.where(c_p != 0, g + c_p * p, g)
            g = g + tl.where(cols == tok, c_y, 0.0)
            g = tl.where(in_v, g, 0.0)
        tl.store(dz_row + cols, g.to(dz_row.dtype.element_ty), mask=cols < Vs)


@triton.jit
def logits_grad_kernel(z_ptr, u_ptr, tok_ptr, stats_ptr, coef_ptr, dz_ptr,
                       stride_z, stride_u, stride_tok, stride_dz, V, Vs, inv_temp,
                       HAS_TOKENS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    dz_row = dz_ptr + row * stride_dz

    coef_row = coef_ptr + row * NUM_COEFS
    c_kl = tl.load(coef_row + 0)
    c_q = tl.load(coef_row + 1)
    c_p = tl.load(coef_row + 2)
    c_y = tl.load(coef_row + 3)
    active = (c_kl != 0) | (c_q != 0) | (c_p != 0) | (c_y != 0)
    needs_teacher = (c_kl != 0) | (c_p != 0)

    stats_row = stats_ptr + row * NUM_STATS
    m_q = tl.load(stats_row + 0)
    log_s_q = tl.load(stats_row + 1)
    m_p = tl.load(stats_row + 2)
    log_s_p = tl.load(stats_row + 3)
    eq_d = tl.load(stats_row + 4)
    ua = tl.load(stats_row + 10)
    eq_da = tl.load(stats_row + 11)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * stride_tok).to(tl.int32)
    else:
        tok = tl.full([], -1, tl.int32)

    if needs_teacher:
        _grad_row(z_row, u_row, dz_row, V, Vs, inv_temp, m_q, log_s_q, m_p, log_s_p, eq_d, ua, eq_da,
                  c_kl, c_q, c_p, c_y, tok, 2, BLOCK)
    elif active:
        _grad_row(z_row, u_row, dz_row, V, Vs, inv_temp, m_q, log_s_q, m_p, log_s_p, eq_d, ua, eq_da,
                  c_kl, c_q, c_p, c_y, tok, 1, BLOCK)
    else:
        _grad_row(z_row, u_row, dz_row, V, Vs, inv_temp, m_q, log_s_q, m_p, log_s_p, eq_d, ua, eq_da,
                  c_kl, c_q, c_p, c_y, tok, 0, BLOCK)

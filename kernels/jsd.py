"""jsd_rows and jsd_grad: the generalised Jensen-Shannon divergence for 0 < beta < 1 (a second pass after
``row_stats``).

With log q_v = x_q,v - LOGS_Q, log p_v = x_p,v - LOGS_P, the centred logits x_q,v = fl(fl(z_v - M_Q) * inv_temp)
and x_p,v = fl(fl(u_v - M_P) * inv_temp) (raw maxima: ``online_softmax.centre``), and the mixture
m = beta p + (1 - beta) q::

    log m_v = logaddexp(log beta + log p_v, log(1 - beta) + log q_v)         (never the log of a rounded sum)
    g_v     = log q_v - log m_v,   h_v = log p_v - log m_v                   (0 where the prob is 0)
            = -log1p(beta expm1(r_v)),  -log1p((1 - beta) expm1(-r_v))       (the value's, where |r_v| < 1/2)
    jsd_rows:  JSD = beta sum_v p_v h_v + (1 - beta) sum_v q_v g_v,   E_q[g - g_a] = sum_v q_v (g_v - g_a)
    jsd_grad:  dz_v = coef q_v ((g_v - g_a) - E_q[g - g_a])   (v < V; 0 for V <= v < V_s and for rows with coef 0)

with g_a the g of row_stats' anchor (``jsd_anchor``; 0 where the row has none) and g_v - g_a exactly 0 at the
anchor's entries (``jsd_mixture_terms``). r_v = log p_v - log q_v = (x_p,v - x_q,v) - (LOGS_P - LOGS_Q): near
q = p the expm1 / log1p forms keep g ~ -beta r and h ~ (1 - beta) r accurate relative to themselves, where the
logaddexp forms round them at ~6e-8 absolute (``near_ratio_terms``); the gradient's g - g_a is the logaddexp one.
"""
import triton
import triton.language as tl

from .online_softmax import NUM_STATS, jsd_anchor, jsd_mixture_terms, jsd_terms, load_logits


@triton.jit
def jsd_rows_kernel(z_ptr, u_ptr, stats_ptr, out_ptr, stride_z, stride_u, V, inv_temp,
                    beta, one_m_beta, log_beta, log_1m_beta, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    stats_row = stats_ptr + row * NUM_STATS
    m_q = tl.load(stats_row + 0)
    log_s_q = tl.load(stats_row + 1)
    m_p = tl.load(stats_row + 2)
    log_s_p = tl.load(stats_row + 3)
    c_a, l_a, anchor_off = jsd_anchor(m_q, log_s_q, m_p, log_s_p, tl.load(stats_row + 10), log_beta, log_1m_beta,
                                      inv_temp)

    lanes = tl.arange(0, BLOCK)
    acc_q = tl.zeros([BLOCK], tl.float32)
    acc_p = tl.zeros([BLOCK], tl.float32)
    acc_a = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        in_v = cols < V
        q, g, g_rel, p, h = jsd_terms(load_logits(z_row, cols, in_v), load_logits(u_row, cols, in_v), m_q, log_s_q,
                                      m_p, log_s_p, log_beta, log_1m_beta, beta, one_m_beta, c_a, l_a, anchor_off,
                                      inv_temp)
        acc_q += q * g
        acc_p += p * h
        acc_a += q * g_rel
    tl.store(out_ptr + row * 2, beta * tl.sum(acc_p, 0) + one_m_beta * tl.sum(acc_q, 0))
    tl.store(out_ptr + row * 2 + 1, tl.sum(acc_a, 0))


@triton.jit
def jsd_grad_kernel(z_ptr, u_ptr, stats_ptr, jsd_ptr, coef_ptr, dz_ptr, stride_z, stride_u, stride_dz, V, Vs,
                    inv_temp, log_beta, log_1m_beta, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    dz_row = dz_ptr + row * stride_dz
    coef = tl.load(coef_ptr + row)
    lanes = tl.arange(0, BLOCK)
    if coef != 0:
        stats_row = stats_ptr + row * NUM_STATS
        m_q = tl.load(stats_row + 0)
        log_s_q = tl.load(stats_row + 1)
        m_p = tl.load(stats_row + 2)
        log_s_p = tl.load(stats_row + 3)
        c_a, l_a, anchor_off = jsd_anchor(m_q, log_s_q, m_p, log_s_p, tl.load(stats_row + 10), log_beta,
                                          log_1m_beta, inv_temp)
        eq_g_rel = tl.load(jsd_ptr + row * 2 + 1)
        for start in range(0, Vs, BLOCK):
            cols = start + lanes
            in_v = cols < V
            q, g_rel, _, _, _, _ = jsd_mixture_terms(load_logits(z_row, cols, in_v), load_logits(u_row, cols, in_v),
                                                     m_q, log_s_q, m_p, log_s_p, log_beta, log_1m_beta, c_a, l_a,
                                                     anchor_off, inv_temp)
            g = (coef * q) * (g_rel - eq_g_rel)
            g = tl.where(in_v, g, 0.0)
            tl.store(dz_row + cols, g.to(dz_row.dtype.element_ty), mask=cols < Vs)
    else:
        for start in range(0, Vs, BLOCK):
            cols = start + lanes
            tl.store(dz_row + cols, tl.zeros([BLOCK], dz_row.dtype.element_ty), mask=cols < Vs)

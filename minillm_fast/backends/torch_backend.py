"""Pure-PyTorch backend: runs anywhere, processes rows in chunks so that at most one chunk of full-vocabulary
float32 temporaries exists at a time. The primitives are specified in ``minillm_fast.backends``."""
from __future__ import annotations

import math

import torch

from . import NUM_STATS, C_KL, C_Q, C_P, C_Y, UA, EQ_DA, LOG_RATIO

name = "torch"

# At most this many float32 elements per temporary (16 MiB each).
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _raw(x: torch.Tensor, vocab: int) -> torch.Tensor:
    return x[:, :vocab].float()


def _finite(m: torch.Tensor) -> torch.Tensor:
    """The row maximum as a shift: m where finite, else 0 (an empty row's max is -inf)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _centred(x: torch.Tensor, m: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """c = fl(fl(x - m) * inv_temp): the raw logits centred on the raw row maximum m (0 where m = -inf), then
    scaled; the subtraction is exact or rounded relative to |x - m|, never at ulp(|x / tau|)."""
    return (x - _finite(m)[:, None]) * inv_temp


def _max_and_logsum(x: torch.Tensor, inv_temp: float):
    """(raw max m, c = centred x, e = exp(c), log sum e, sum e); an all -inf row gives m = -inf, e = 0,
    log sum = -inf."""
    m = x.amax(dim=1)
    c = _centred(x, m, inv_temp)
    e = torch.exp(c)
    s = e.sum(1)
    return m, c, e, torch.log(s), s


def _weighted_mean(e: torch.Tensor, s: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_v e_v values_v / s, where entries with e_v = 0 contribute 0 even if values_v is infinite or NaN."""
    terms = torch.where(e > 0, e * values, torch.zeros_like(values))
    return terms.sum(1) / s


def row_stats(z, u, tokens, inv_temp):
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    out = torch.zeros(n_rows, NUM_STATS, dtype=torch.float32, device=z.device)
    for a, b in _row_chunks(n_rows, vocab):
        zr, ur = _raw(z[a:b], vocab), _raw(u[a:b], vocab)
        m_q, xq, e_q, logs_q, s_q = _max_and_logsum(zr, inv_temp)
        m_p, xp, e_p, logs_p, s_p = _max_and_logsum(ur, inv_temp)
        d = xq - xp
        out[a:b, 0], out[a:b, 1], out[a:b, 2], out[a:b, 3] = m_q, logs_q, m_p, logs_p
        out[a:b, 4] = _weighted_mean(e_q, s_q, d)
        out[a:b, 5] = _weighted_mean(e_q, s_q, xq)
        out[a:b, 6] = _weighted_mean(e_p, s_p, -d)
        out[a:b, 7] = _weighted_mean(e_p, s_p, xp)
        if tokens is not None:
            y = tokens[a:b, None]
            out[a:b, 8] = zr.gather(1, y)[:, 0]
            out[a:b, 9] = ur.gather(1, y)[:, 0]
        out[a:b, UA], out[a:b, EQ_DA] = _anchor(zr, ur, d, m_p, e_q, s_q, inv_temp)
        out[a:b, LOG_RATIO] = _log_ratio(e_q, e_p, s_q, s_p)
    return out


def _log_ratio(e_q, e_p, s_q, s_p):
    """log(s_q / s_p) = log1p(D / s_p) with D = sum (e_q - e_p) = s_q - s_p summed entry by entry (small where q ~ p),
    in float64 from the float32 sums; log s_q - log s_p where s_q < s_p / 2 or either is 0 (-inf, +inf, NaN)."""
    r = (e_q - e_p).sum(1).double() / s_p.double()
    logs = torch.log(s_q.double()) - torch.log(s_p.double())
    use_diff = (s_q > 0) & (s_p > 0) & (r > -0.5)
    return torch.where(use_diff, torch.log1p(torch.where(use_diff, r, 0.0)), logs).float()


def _anchor(zr, ur, d, m_p, e_q, s_q, inv_temp):
    """(u_a, E_q[d - d_a]) at the first argmax a of the raw z, d - d_a = d + c_p(u_a) as the CPU kernels form it
    (exactly 0 at a), with row_stats' centred difference d; both NaN where either is not finite."""
    ua = ur.gather(1, zr.argmax(dim=1, keepdim=True))
    mean = _weighted_mean(e_q, s_q, d + _centred(ua, m_p, inv_temp))
    ua = ua[:, 0]
    ok = torch.isfinite(mean) & torch.isfinite(ua)
    nan = torch.full_like(mean, math.nan)
    return torch.where(ok, ua, nan), torch.where(ok, mean, nan)


def logits_grad(z, u, tokens, stats, coef, inv_temp):
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    dz = torch.zeros(z.shape, dtype=z.dtype, device=z.device)
    for a, b in _row_chunks(n_rows, vocab):
        c = coef[a:b]
        active = (c != 0).any(1)
        if not bool(active.any()):
            continue
        st = stats[a:b]
        xq = _centred(_raw(z[a:b], vocab), st[:, 0], inv_temp)
        q = torch.exp(xq - st[:, 1, None])
        grad = c[:, C_Q, None] * q
        needs_kl, needs_p = bool((c[:, C_KL] != 0).any()), bool((c[:, C_P] != 0).any())
        xp = _centred(_raw(u[a:b], vocab), st[:, 2], inv_temp) if needs_kl or needs_p else None
        if needs_kl:
            at_anchor = (xq == 0) & (xp == _centred(st[:, UA, None], st[:, 2], inv_temp))
            centred = torch.where(at_anchor, -st[:, EQ_DA, None], (xq - xp) - st[:, 4, None])
            centred = torch.where(q > 0, q * centred, torch.zeros_like(q))
            grad = grad + c[:, C_KL, None] * centred
        if needs_p:
            grad = grad + c[:, C_P, None] * torch.exp(xp - st[:, 3, None])
        if tokens is not None:
            grad.scatter_add_(1, tokens[a:b, None], c[:, C_Y, None])
        grad = torch.where(active[:, None], grad, torch.zeros_like(grad))
        dz[a:b, :vocab] = grad.to(z.dtype)
    return dz


def _mixture_log_ratios(r, beta):
    """(c, l, h) of the log-ratio r = log p - log q: g = -c - l = -logaddexp(r + log beta, log(1 - beta)), with c
    the larger argument and l = log1p(exp(-|delta|)), delta = r + log beta - log(1 - beta), and
    h = -logaddexp(log beta, log(1 - beta) - r), sharing that exp and log1p (kernels/online_softmax.py jsd_terms)."""
    log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)
    a = r + log_beta
    delta = a - log_1m_beta
    l = torch.log1p(torch.exp(-delta.abs()))
    above = delta > 0
    return torch.where(above, a, log_1m_beta), l, torch.where(above, -log_beta, r - log_1m_beta) - l


NEAR_RATIO = 0.5  # |log p - log q| below which jsd_rows takes g and h from expm1 and log1p


def _near_ratio_terms(r, g, h, beta):
    """(g, h) with, where |r| < NEAR_RATIO, g = -log1p(beta expm1(r)) and h = -log1p((1 - beta) expm1(-r)): there
    g ~ -beta r and h ~ (1 - beta) r are small, and -c - l (two numbers near log 2 for beta = 1/2) would round them
    at ~6e-8 absolute, which the JSD value (~beta (1 - beta) E[r^2] / 2 where q ~ p) cannot afford."""
    near = r.abs() < NEAR_RATIO
    rn = torch.where(near, r, torch.zeros_like(r))
    g_near, h_near = -torch.log1p(beta * torch.expm1(rn)), -torch.log1p((1 - beta) * torch.expm1(-rn))
    return torch.where(near, g_near, g), torch.where(near, h_near, h)


def _jsd_terms(zr, ur, st, beta, inv_temp):
    """(q, g, g - g_a, p, h) for one chunk: g = log q - log m and h = log p - log m (0 where q, resp. p, is 0), from
    the log-ratio r = log p - log q alone; g - g_a relative to g at the anchor, as (c_a - c) + (l_a - l), exactly 0
    at the anchor's entries (minillm_fast.backends: jsd_rows)."""
    xq = _centred(zr, st[:, 0], inv_temp)
    xp = _centred(ur, st[:, 2], inv_temp)
    log_ratio_of_sums = st[:, 3] - st[:, 1]
    c, l, h = _mixture_log_ratios((xp - xq) - log_ratio_of_sums[:, None], beta)
    anchor_xp = _centred(st[:, UA, None], st[:, 2], inv_temp)[:, 0]
    c_a, l_a, _ = _mixture_log_ratios(anchor_xp - log_ratio_of_sums, beta)
    no_anchor = torch.isnan(st[:, UA])
    c_a, l_a = torch.where(no_anchor, 0.0, c_a), torch.where(no_anchor, 0.0, l_a)
    at_anchor = (xq == 0) & (xp == anchor_xp[:, None])
    g_rel = torch.where(at_anchor, torch.zeros_like(c), (c_a[:, None] - c) + (l_a[:, None] - l))
    q, p = torch.exp(xq - st[:, 1, None]), torch.exp(xp - st[:, 3, None])
    g, h = _near_ratio_terms((xp - xq) - log_ratio_of_sums[:, None], -c - l, h, beta)
    zero = torch.zeros_like(q)
    return q, torch.where(q > 0, g, zero), torch.where(q > 0, g_rel, zero), p, torch.where(p > 0, h, zero)


def jsd_rows(z, u, stats, beta, inv_temp):
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    out = torch.zeros(n_rows, 2, dtype=torch.float32, device=z.device)
    for a, b in _row_chunks(n_rows, vocab):
        q, g_q, g_rel, p, g_p = _jsd_terms(_raw(z[a:b], vocab), _raw(u[a:b], vocab), stats[a:b], beta,
                                           inv_temp)
        out[a:b, 0] = beta * (p * g_p).sum(1) + (1 - beta) * (q * g_q).sum(1)
        out[a:b, 1] = (q * g_rel).sum(1)
    return out


def jsd_grad(z, u, stats, jsd, coef, beta, inv_temp):
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    dz = torch.zeros(z.shape, dtype=z.dtype, device=z.device)
    for a, b in _row_chunks(n_rows, vocab):
        c = coef[a:b]
        if not bool((c != 0).any()):
            continue
        q, _, g_rel, _, _ = _jsd_terms(_raw(z[a:b], vocab), _raw(u[a:b], vocab), stats[a:b], beta,
                                       inv_temp)
        grad = c[:, None] * q * (g_rel - jsd[a:b, 1, None])
        grad = torch.where((c != 0)[:, None], grad, torch.zeros_like(grad))
        dz[a:b, :vocab] = grad.to(z.dtype)
    return dz


def sample_rows(z, u, use_teacher, uniform, inv_temp):
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    out = torch.empty(n_rows, dtype=torch.int64, device=z.device)
    for a, b in _row_chunks(n_rows, vocab):
        x = torch.where(use_teacher[a:b, None], _raw(u[a:b], vocab), _raw(z[a:b], vocab))
        m = x.amax(1)
        e = torch.exp(_centred(x, m, inv_temp))
        cum = e.cumsum(1)
        target = (uniform[a:b].to(torch.float32) * cum[:, -1])[:, None]
        crossed = (cum > target) & (e > 0)
        # Rounding can leave the last positive entry just below the target: fall back to it.
        last_positive = vocab - 1 - (e > 0).flip(1).to(torch.int8).argmax(1)
        first = crossed.to(torch.int8).argmax(1)
        idx = torch.where(crossed.any(1), first, last_positive)
        out[a:b] = torch.where(torch.isfinite(m), idx, torch.full_like(idx, -1))
    return out

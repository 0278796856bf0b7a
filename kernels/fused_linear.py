"""Fused-linear row statistics, JSD rows and gradients: logits formed tile by tile in on-chip memory, never written
anywhere.

Each model's logits are what its lm_head produces (``minillm_fast.fused_linear``), every step optional::

    logits = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)      (raw: before the temperature)

for the student (hidden [N, H_s], weight [V_s, H_s]: z) and the teacher ([N, H_t], [V_t, H_t]: u); the
distributions are over the first V = min(V_s, V_t) columns. A tile of BLOCK_N rows x BLOCK_V columns of one model's
logits is an on-chip matmul: sum over H in chunks of BLOCK_K of tl.dot(hidden[rows, k], weight[cols, k]^T) with
float32 accumulation (full-precision IEEE dots for float32 inputs, not TF32: the library promises 2e-5 relative
accuracy for float32; bf16/fp16 operands go to the tensor cores as they are), then bias, scale and soft-cap in
float32. The temperature is never applied to a tile: every centred logit is x = fl(fl(logit - M) * inv_temp) with M
the row's raw max (``online_softmax.centre``), as in the row kernels. No [N, V] tensor of any dtype exists at any
time.

``fused_linear_stats_kernel`` (grid (cdiv(N, BLOCK_N), SPLIT)): program (i, j) forms the student and teacher tiles
of row block i for the vocabulary tiles of split j and folds each pair of tiles into per-row online states
(``online_update_pair_rows``: running raw maxima m_q, m_p and sums s, a, b relative to them, the argmax anchor
and s_q - s_p, the same state as the ``row_stats`` kernel's, reduced along the tile's columns), and picks the raw
ZY = z_y, UY = u_y out of the tile that holds the row's token y (0 where no tile does: no tokens, y = -1 or y
outside [0, V)). It writes that partial state, 13 floats per row. Splitting the vocabulary fills the GPU when N is
small (N / BLOCK_N programs alone would not).

``fused_linear_merge_kernel`` (grid cdiv(N, BLOCK_R)): merges the SPLIT partial states of each row
(``merge_state_pairs``, ``merge_anchors`` and ``merge_differences``: each moved to the merged raw maxima M by
fl(fl(M - m) * inv_temp) in scaled units; ZY and UY summed since exactly one split can hold the token) and writes
the row statistics [N, 13] of ``minillm_fast.backends`` (M_Q, LOGS_Q, M_P, LOGS_P, EQ_D, EQ_ZC, EP_D, EP_UC, ZY, UY,
UA, EQ_DA, LOG_RATIO), exactly what ``row_stats`` returns on the materialised logits, to float32 rounding: an
empty row (all -inf) gets M = LOGS = -inf and 0/0 for its means, as there.

``fused_linear_jsd_rows_kernel`` (grid (cdiv(N, BLOCK_N), SPLIT), the generalised JSD for 0 < beta < 1: a second
pass, after the statistics, over the same tiles): program (i, j) recomputes the student and teacher tiles of row
block i for the vocabulary tiles of split j and, from the final statistics, sums per row (``jsd_terms``, the element
math of ``jsd_rows``)::

    x_q = fl(fl(z - M_Q) * inv_temp),  x_p = fl(fl(u - M_P) * inv_temp),  log q = x_q - LOGS_Q,  log p = x_p - LOGS_P,
    log m = logaddexp(log beta + log p, log(1 - beta) + log q)      (m = beta p + (1 - beta) q, never log of a sum)
    g = log q - log m,  h = log p - log m                           (0 where the probability is 0: 0 * inf = 0)
      = -log1p(beta expm1(r)),  -log1p((1 - beta) expm1(-r))        (where |r| < 1/2, r = log p - log q)
    S_Q = sum_v q_v g_v,  S_P = sum_v p_v h_v,  S_A = sum_v q_v (g_v - g_a)    (over the split's columns v < V)

with g_a the g of the statistics' anchor (``jsd_anchor``, ``jsd_mixture_terms``: g_v - g_a is exactly 0 at the
anchor's entries; the near forms, ``near_ratio_terms``, keep the small g and h of close distributions accurate
relative to themselves, with beta = exp(log beta) and 1 - beta = exp(log(1 - beta)) formed once per program from
the launch's two logs), and writes (S_Q, S_P, S_A), 3 floats per (row, split). ``fused_linear_jsd_merge_kernel``
adds the splits' partial sums (plain sums: the statistics are final, nothing to rescale) and writes ``jsd_rows``'s
[N, 2]: (JSD_beta = beta S_P + (1 - beta) S_Q, E_q[g - g_a] = S_A), to float32 rounding.

``fused_linear_grad_kernel`` (grid cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V), grouped): program (i, j) recomputes the
student tile (and the teacher tile, only if some row of the block has c_kl or c_p != 0) from the final statistics
and coefficients (c_kl, c_q, c_p, c_y), forms the logit gradient as ``logits_grad`` does::

    q = exp(x_q - LOGS_Q),  p = exp(x_p - LOGS_P),  d = x_q - x_p        (x_q, x_p centred as above)
    dz = c_kl q (d - EQ_D) + c_q q + c_p p + c_y [v == y]          (0 for v >= V, 0 on rows whose c are all 0)

(0 * inf = 0: the KL term is 0 where q = 0, a term whose coefficient is 0 is skipped, not multiplied by 0). With
``JSD`` (constexpr) it forms ``jsd_grad``'s instead, from one coefficient per row (float32 [N], (1 - beta) / tau
folded in) and E_q[g - g_a] (column 1 of the ``jsd_rows`` output), always with the teacher tile (g needs m)::

    dz = c q ((g - g_a) - E_q[g - g_a])                             (0 for v >= V, 0 on rows whose c is 0)

Either way it takes dz through the soft-cap and scale, dx = dz * logit_scale * (1 - tanh^2(t)) with t the
soft-cap's argument (``tanh_and_slope``: from t itself, not from the rounded logits), and pulls the tile back (one
code path for both)::

    d hidden[rows] += dx @ W[cols]      d W[cols] += dx^T @ hidden[rows]      d b[cols] += sum_rows dx

looping over H_s in BLOCK_K chunks. These go into float32 buffers (zeroed by the launcher) with ``tl.atomic_add``,
as Cut Cross-Entropy does: d hidden[rows] receives one addition per vocabulary tile, d W[cols] one per row block.
Atomics make the float32 sums' order, hence their last bits, vary from run to run (not bitwise deterministic).
The alternative, one program owning all vocabulary tiles of its rows (d hidden without atomics), leaves the GPU
idle when N / BLOCK_N is small and still needs atomics (or an [N/BLOCK_N, V, H] buffer) for d W. Tiles whose dx is
exactly 0 (every row inactive, or all of q, p underflowed) skip the pull-back. For bf16/fp16 inputs dx is rounded
to the inputs' dtype before its two matmuls (as the blocked path does on the GPU); for float32 the dots are IEEE.

Cost, per logit of the shared vocabulary: the statistics pass runs 2 tile matmuls (student and teacher logits,
2 (H_s + H_t) FLOPs), the gradient pass 3 or 4 (the student tile again, the teacher's where needed, then d hidden
and d W: 2 (3 H_s + H_t) FLOPs). Against the blocked path's 4 matmuls, the 2 recomputed tiles are the price of
holding no logits. The JSD adds its rows pass, 2 more tile matmuls (2 (H_s + H_t) FLOPs), and its gradient pass
always runs all 4 (the teacher tile is needed on every active row): 8 tile matmuls in all against the blocked
path's 4, i.e. 4 recomputed tiles. Offsets are int64 (row * stride).
"""
import triton
import triton.language as tl

from .online_softmax import (NUM_STATS, anchor_stats, centre, finite_or_zero, jsd_anchor, jsd_mixture_terms, jsd_terms,
                             log_ratio, merge_anchors, merge_differences, merge_state_pairs, online_update_pair_rows)

NUM_COEFS = tl.constexpr(4)
# The partial state of one (row, split): m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, zy, uy, ua, an, d_qp (maxima, zy, uy
# and ua raw).
NUM_PARTIAL = tl.constexpr(13)
# The partial JSD sums of one (row, split): sum q g, sum p h, sum q (g - g_a).
NUM_JSD_PARTIAL = tl.constexpr(3)


@triton.jit
def tanh_and_slope(t):
    """(tanh t, 1 - tanh^2 t) in float32 from exp alone (libdevice's tanh has no interpreter implementation, and
    one code path for the GPU and the CPU tests is worth more than its last ulp). For |t| >= 0.6, with
    e = 1 - |tanh t| = 2 / (exp(2|t|) + 1): tanh = +-(1 - e), which loses nothing to cancellation, and the slope
    e (2 - e), accurate also where tanh rounds to +-1 (1 - tanh^2 of the rounded tanh is off by 7e-4 relative at
    |t| = 5 and all wrong beyond |t| ~ 9). Below, an odd minimax polynomial (CUDA's tanhf coefficients). tanh within
    3 ulp of the exact one; tanh(+-inf) = +-1 with slope 0 (a -inf logit soft-capped is -softcap, as in the
    model)."""
    a = tl.abs(t)
    e = 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(t < 0, e - 1.0, 1.0 - e)
    s = t * t
    p = -5.70498872e-3
    p = p * s + 2.06390828e-2
    p = p * s - 5.37397955e-2
    p = p * s + 1.33314422e-1
    p = p * s - 3.33332986e-1
    small = (p * s) * t + t
    th = tl.where(a >= 0.6, big, small)
    return th, tl.where(a >= 0.6, e * (2.0 - e), 1.0 - small * small)


@triton.jit
def tile_dot(a, b, acc, PRECISION: tl.constexpr, BF16_UPCAST: tl.constexpr):
    """tl.dot(a, b, acc) with float32 accumulation. ``BF16_UPCAST`` (set by the launcher under Triton's
    interpreter only) multiplies bf16 operands as float32: the interpreter's tl.dot (Triton 3.x) multiplies the raw
    bits of bf16 (stored as uint16). The products are exact either way, so the result is the tensor cores' up to
    the order of the float32 sums."""
    if BF16_UPCAST:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def head_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_h, stride_w, H, scale, softcap,
              HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
              BF16_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(logits, slope) of one [BLOCK_N, BLOCK_V] tile: logits = softcap tanh(scale (h W^T + b) / softcap) in float32
    (before the temperature), and the soft-cap's derivative 1 - tanh^2 (``tanh_and_slope``; the logits where there
    is no soft-cap, never read). Rows outside ``row_ok`` and columns outside ``col_ok`` read zeros (finite, never
    stored)."""
    # Row starts only ([BLOCK_N] / [BLOCK_V] int64 addresses): 2-D address tensors carried through the loop would
    # cost 2 registers per element next to two logit tiles.
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows.to(tl.int64) * stride_h
    w_cols = w_ptr + cols.to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < H
        h = tl.load(h_rows[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # W^T's tile
        acc = tile_dot(h, w, acc, PRECISION, BF16_UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc = acc * scale
    slope = acc
    if HAS_SOFTCAP:
        th, slope = tanh_and_slope(acc / softcap)
        acc = softcap * th
    return acc, slope


@triton.jit
def empty_pair_states(ROWS: tl.constexpr):
    """Per-row online states of both distributions before any column: (m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p) with
    maxima -inf and sums 0, [ROWS] each."""
    m_q = tl.full([ROWS], float("-inf"), tl.float32)
    m_p = tl.full([ROWS], float("-inf"), tl.float32)
    s_q = tl.zeros([ROWS], tl.float32)
    return m_q, s_q, s_q, s_q, m_p, s_q, s_q, s_q


@triton.jit
def logit_tile_pair(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                    stride_hs, stride_ws, stride_ht, stride_wt, H_s, H_t, scale_s, cap_s, scale_t, cap_t,
                    HAS_BIAS_S: tl.constexpr, HAS_SCALE_S: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr,
                     PRECISION_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_SCALE_T: tl.constexpr,
                    HAS_SOFTCAP_T: tl.constexpr, PRECISION_T: tl.constexpr, BF16_UPCAST: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x, y) = the student's and the teacher's raw logit tiles (before the temperature), -inf in columns >= V
    (outside ``col_ok``): what the statistics and JSD-rows passes fold into their per-row sums."""
    z, _ = head_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_ok, col_ok, stride_hs, stride_ws, H_s,
                     scale_s, cap_s, HAS_BIAS_S, HAS_SCALE_S, HAS_SOFTCAP_S, PRECISION_S, BF16_UPCAST,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    u, _ = head_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, stride_ht, stride_wt, H_t,
                     scale_t, cap_t, HAS_BIAS_T, HAS_SCALE_T, HAS_SOFTCAP_T, PRECISION_T, BF16_UPCAST,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    x = tl.where(col_ok[None, :], z, float("-inf"))
    y = tl.where(col_ok[None, :], u, float("-inf"))
    return x, y


@triton.jit
def fused_linear_stats_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tok_ptr, part_ptr,
        N, V, H_s, H_t, stride_hs, stride_ws, stride_ht, stride_wt, stride_tok,
        scale_s, cap_s, scale_t, cap_t, inv_temp, tiles_per_split,
        HAS_BIAS_S: tl.constexpr, HAS_SCALE_S: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, PRECISION_S: tl.constexpr,
        HAS_BIAS_T: tl.constexpr, HAS_SCALE_T: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr, PRECISION_T: tl.constexpr,
        HAS_TOKENS: tl.constexpr, BF16_UPCAST: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    lanes = tl.arange(0, BLOCK_V)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + rows.to(tl.int64) * stride_tok, mask=row_ok, other=-1).to(tl.int64)
    else:
        tok = tl.full([BLOCK_N], -1, tl.int64)

    m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p = empty_pair_states(BLOCK_N)
    zy = tl.zeros([BLOCK_N], tl.float32)
    uy = tl.zeros([BLOCK_N], tl.float32)
    an = tl.zeros([BLOCK_N], tl.float32)  # the anchored cross sum and its raw u_a (online_update_pair_rows)
    ua = tl.full([BLOCK_N], float("nan"), tl.float32)
    d_qp = tl.zeros([BLOCK_N], tl.float32)  # s_q - s_p, summed entry by entry

    num_tiles = tl.cdiv(V, BLOCK_V)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_V + lanes
        col_ok = cols < V
        x, y = logit_tile_pair(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                               stride_hs, stride_ws, stride_ht, stride_wt, H_s, H_t, scale_s, cap_s, scale_t, cap_t,
                               HAS_BIAS_S, HAS_SCALE_S, HAS_SOFTCAP_S, PRECISION_S, HAS_BIAS_T, HAS_SCALE_T,
                               HAS_SOFTCAP_T, PRECISION_T, BF16_UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        if HAS_TOKENS:
            # Exactly one tile of one split holds a row's token (none when y is -1 or >= V): the merge sums these.
            hit = (cols[None, :].to(tl.int64) == tok[:, None]) & col_ok[None, :]
            zy += tl.sum(tl.where(hit, x, 0.0), 1)
            uy += tl.sum(tl.where(hit, y, 0.0), 1)
        m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, an, ua, d_qp = online_update_pair_rows(
            m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p, an, ua, d_qp, x, y, inv_temp)

    # Partial states as [N, SPLIT, 13] (row-major in the rows: the int64 row index carries the offset).
    out = part_ptr + (rows.to(tl.int64) * tl.num_programs(1) + split) * NUM_PARTIAL
    tl.store(out + 0, m_q, mask=row_ok)
    tl.store(out + 1, s_q, mask=row_ok)
    tl.store(out + 2, a_q, mask=row_ok)
    tl.store(out + 3, b_q, mask=row_ok)
    tl.store(out + 4, m_p, mask=row_ok)
    tl.store(out + 5, s_p, mask=row_ok)
    tl.store(out + 6, a_p, mask=row_ok)
    tl.store(out + 7, b_p, mask=row_ok)
    tl.store(out + 8, zy, mask=row_ok)
    tl.store(out + 9, uy, mask=row_ok)
    tl.store(out + 10, ua, mask=row_ok)
    tl.store(out + 11, an, mask=row_ok)
    tl.store(out + 12, d_qp, mask=row_ok)


@triton.jit
def fused_linear_merge_kernel(part_ptr, out_ptr, N, num_splits, inv_temp, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p = empty_pair_states(BLOCK_R)
    zy = tl.zeros([BLOCK_R], tl.float32)
    uy = tl.zeros([BLOCK_R], tl.float32)
    an = tl.zeros([BLOCK_R], tl.float32)
    ua = tl.full([BLOCK_R], float("nan"), tl.float32)
    d_qp = tl.zeros([BLOCK_R], tl.float32)
    for split in range(0, num_splits):
        part = part_ptr + (rows.to(tl.int64) * num_splits + split) * NUM_PARTIAL
        d_qp = merge_differences(d_qp, s_p, m_q, m_p,
                                 tl.load(part + 12, mask=row_ok, other=0.0), tl.load(part + 5, mask=row_ok, other=0.0),
                                 tl.load(part + 0, mask=row_ok, other=float("-inf")),
                                 tl.load(part + 4, mask=row_ok, other=float("-inf")), inv_temp)
        an, ua = merge_anchors(an, s_q, m_q, ua,
                               tl.load(part + 11, mask=row_ok, other=0.0), tl.load(part + 1, mask=row_ok, other=0.0),
                               tl.load(part + 0, mask=row_ok, other=float("-inf")),
                               tl.load(part + 10, mask=row_ok, other=float("nan")), inv_temp)
        m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p = merge_state_pairs(
            m_q, s_q, a_q, b_q, m_p, s_p, a_p, b_p,
            tl.load(part + 0, mask=row_ok, other=float("-inf")), tl.load(part + 1, mask=row_ok, other=0.0),
            tl.load(part + 2, mask=row_ok, other=0.0), tl.load(part + 3, mask=row_ok, other=0.0),
            tl.load(part + 4, mask=row_ok, other=float("-inf")), tl.load(part + 5, mask=row_ok, other=0.0),
            tl.load(part + 6, mask=row_ok, other=0.0), tl.load(part + 7, mask=row_ok, other=0.0), inv_temp)
        zy += tl.load(part + 8, mask=row_ok, other=0.0)
        uy += tl.load(part + 9, mask=row_ok, other=0.0)

    out = out_ptr + rows.to(tl.int64) * NUM_STATS
    tl.store(out + 0, m_q, mask=row_ok)
    tl.store(out + 1, tl.log(s_q), mask=row_ok)
    tl.store(out + 2, m_p, mask=row_ok)
    tl.store(out + 3, tl.log(s_p), mask=row_ok)
    tl.store(out + 4, a_q / s_q, mask=row_ok)
    tl.store(out + 5, b_q / s_q, mask=row_ok)
    tl.store(out + 6, a_p / s_p, mask=row_ok)
    tl.store(out + 7, b_p / s_p, mask=row_ok)
    tl.store(out + 8, zy, mask=row_ok)
    tl.store(out + 9, uy, mask=row_ok)
    ua_out, eq_da = anchor_stats(an, s_q, ua)
    tl.store(out + 10, ua_out, mask=row_ok)
    tl.store(out + 11, eq_da, mask=row_ok)
    tl.store(out + 12, log_ratio(s_q, s_p, d_qp), mask=row_ok)


@triton.jit
def fused_linear_jsd_rows_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, stats_ptr, part_ptr,
        N, V, H_s, H_t, stride_hs, stride_ws, stride_ht, stride_wt,
        scale_s, cap_s, scale_t, cap_t, inv_temp, log_beta, log_1m_beta, beta, one_m_beta, tiles_per_split,
        HAS_BIAS_S: tl.constexpr, HAS_SCALE_S: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, PRECISION_S: tl.constexpr,
        HAS_BIAS_T: tl.constexpr, HAS_SCALE_T: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr, PRECISION_T: tl.constexpr,
        BF16_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    stats = stats_ptr + rows64 * NUM_STATS
    m_q = tl.load(stats + 0, mask=row_ok, other=0.0)[:, None]
    log_s_q = tl.load(stats + 1, mask=row_ok, other=0.0)[:, None]
    m_p = tl.load(stats + 2, mask=row_ok, other=0.0)[:, None]
    log_s_p = tl.load(stats + 3, mask=row_ok, other=0.0)[:, None]
    ua = tl.load(stats + 10, mask=row_ok, other=float("nan"))[:, None]
    c_a, l_a, anchor_off = jsd_anchor(m_q, log_s_q, m_p, log_s_p, ua, log_beta, log_1m_beta, inv_temp)

    sum_q = tl.zeros([BLOCK_N], tl.float32)  # sum_v q_v g_v over this split's columns
    sum_p = tl.zeros([BLOCK_N], tl.float32)  # sum_v p_v h_v
    sum_a = tl.zeros([BLOCK_N], tl.float32)  # sum_v q_v (g_v - g_a)
    num_tiles = tl.cdiv(V, BLOCK_V)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_V + lanes
        col_ok = cols < V
        x, y = logit_tile_pair(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                               stride_hs, stride_ws, stride_ht, stride_wt, H_s, H_t, scale_s, cap_s, scale_t, cap_t,
                               HAS_BIAS_S, HAS_SCALE_S, HAS_SOFTCAP_S, PRECISION_S, HAS_BIAS_T, HAS_SCALE_T,
                               HAS_SOFTCAP_T, PRECISION_T, BF16_UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        q, g, g_rel, p, h = jsd_terms(x, y, m_q, log_s_q, m_p, log_s_p, log_beta, log_1m_beta, beta, one_m_beta,
                                      c_a, l_a, anchor_off, inv_temp)
        sum_q += tl.sum(q * g, 1)
        sum_p += tl.sum(p * h, 1)
        sum_a += tl.sum(q * g_rel, 1)

    # Partial sums as [N, SPLIT, NUM_JSD_PARTIAL].
    out = part_ptr + (rows64 * tl.num_programs(1) + split) * NUM_JSD_PARTIAL
    tl.store(out + 0, sum_q, mask=row_ok)
    tl.store(out + 1, sum_p, mask=row_ok)
    tl.store(out + 2, sum_a, mask=row_ok)


@triton.jit
def fused_linear_jsd_merge_kernel(part_ptr, out_ptr, N, num_splits, beta, one_m_beta, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    sum_q = tl.zeros([BLOCK_R], tl.float32)
    sum_p = tl.zeros([BLOCK_R], tl.float32)
    sum_a = tl.zeros([BLOCK_R], tl.float32)
    for split in range(0, num_splits):
        part = part_ptr + (rows.to(tl.int64) * num_splits + split) * NUM_JSD_PARTIAL
        sum_q += tl.load(part + 0, mask=row_ok, other=0.0)
        sum_p += tl.load(part + 1, mask=row_ok, other=0.0)
        sum_a += tl.load(part + 2, mask=row_ok, other=0.0)
    out = out_ptr + rows.to(tl.int64) * 2
    tl.store(out + 0, beta * sum_p + one_m_beta * sum_q, mask=row_ok)
    tl.store(out + 1, sum_a, mask=row_ok)


@triton.jit
def fused_linear_grad_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tok_ptr, stats_ptr, coef_ptr, jsd_ptr,
        dh_ptr, dw_ptr, db_ptr,
        N, V, H_s, H_t, stride_hs, stride_ws, stride_ht, stride_wt, stride_tok, stride_dh, stride_dw,
        scale_s, cap_s, scale_t, cap_t, inv_temp, log_beta, log_1m_beta,
        HAS_BIAS_S: tl.constexpr, HAS_SCALE_S: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, PRECISION_S: tl.constexpr,
        HAS_BIAS_T: tl.constexpr, HAS_SCALE_T: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr, PRECISION_T: tl.constexpr,
        HAS_TOKENS: tl.constexpr, JSD: tl.constexpr, NEEDS_DH: tl.constexpr, NEEDS_DW: tl.constexpr,
        NEEDS_DB: tl.constexpr, BF16_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    # Grouped order: GROUP_N row blocks sweep the vocabulary tiles together, so that the programs in flight share
    # weight tiles and hidden rows in L2.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    tiles_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * tiles_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    rows64 = rows.to(tl.int64)

    if JSD:
        # One coefficient per row; every active row needs the teacher tile (the mixture m).
        c_jsd = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
        active = c_jsd != 0
        any_active = tl.max(active.to(tl.int32), 0) > 0
    else:
        coef = coef_ptr + rows64 * NUM_COEFS
        c_kl = tl.load(coef + 0, mask=row_ok, other=0.0)
        c_q = tl.load(coef + 1, mask=row_ok, other=0.0)
        c_p = tl.load(coef + 2, mask=row_ok, other=0.0)
        c_y = tl.load(coef + 3, mask=row_ok, other=0.0)
        active = (c_kl != 0) | (c_q != 0) | (c_p != 0) | (c_y != 0)
        any_active = tl.max(active.to(tl.int32), 0) > 0
        any_teacher = tl.max(((c_kl != 0) | (c_p != 0)).to(tl.int32), 0) > 0
    if any_active:
        stats = stats_ptr + rows64 * NUM_STATS
        m_q = finite_or_zero(tl.load(stats + 0, mask=row_ok, other=0.0))
        log_s_q = tl.load(stats + 1, mask=row_ok, other=0.0)
        m_p = finite_or_zero(tl.load(stats + 2, mask=row_ok, other=0.0))
        log_s_p = tl.load(stats + 3, mask=row_ok, other=0.0)

        z, slope_s = head_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_ok, col_ok, stride_hs, stride_ws, H_s,
                            scale_s, cap_s, HAS_BIAS_S, HAS_SCALE_S, HAS_SOFTCAP_S, PRECISION_S, BF16_UPCAST,
                            BLOCK_N, BLOCK_V, BLOCK_K)
        if JSD:
            eq_g_rel = tl.load(jsd_ptr + rows64 * 2 + 1, mask=row_ok, other=0.0)
            ua = tl.load(stats + 10, mask=row_ok, other=float("nan"))
            c_a, l_a, anchor_off = jsd_anchor(m_q, log_s_q, m_p, log_s_p, ua, log_beta, log_1m_beta, inv_temp)
            u, _ = head_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, stride_ht, stride_wt, H_t,
                             scale_t, cap_t, HAS_BIAS_T, HAS_SCALE_T, HAS_SOFTCAP_T, PRECISION_T, BF16_UPCAST,
                             BLOCK_N, BLOCK_V, BLOCK_K)
            q, g_rel, _, _, _, _ = jsd_mixture_terms(z, u, m_q[:, None], log_s_q[:, None], m_p[:, None],
                                                     log_s_p[:, None], log_beta, log_1m_beta, c_a[:, None],
                                                     l_a[:, None], anchor_off[:, None], inv_temp)
            g = (c_jsd[:, None] * q) * (g_rel - eq_g_rel[:, None])
        else:
            eq_d = tl.load(stats + 4, mask=row_ok, other=0.0)
            ua = tl.load(stats + 10, mask=row_ok, other=float("nan"))
            eq_da = tl.load(stats + 11, mask=row_ok, other=0.0)
            if HAS_TOKENS:
                tok = tl.load(tok_ptr + rows64 * stride_tok, mask=row_ok, other=-1).to(tl.int64)
            else:
                tok = tl.full([BLOCK_N], -1, tl.int64)
            xq = centre(z, m_q[:, None], inv_temp)
            q = tl.exp(xq - log_s_q[:, None])
            g = c_q[:, None] * q
            if any_teacher:
                u, _ = head_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, stride_ht, stride_wt, H_t,
                                 scale_t, cap_t, HAS_BIAS_T, HAS_SCALE_T, HAS_SOFTCAP_T, PRECISION_T, BF16_UPCAST,
                                 BLOCK_N, BLOCK_V, BLOCK_K)
                xp = centre(u, m_p[:, None], inv_temp)
                at_anchor = (xq == 0.0) & (xp == centre(ua, m_p, inv_temp)[:, None])  # d_v = d_a: use E_q[d - d_a]
                centred = tl.where(q > 0, q * tl.where(at_anchor, -eq_da[:, None], (xq - xp) - eq_d[:, None]), 0.0)
                g = tl.where(c_kl[:, None] != 0, g + c_kl[:, None] * centred, g)
                p = tl.exp(xp - log_s_p[:, None])
                g = tl.where(c_p[:, None] != 0, g + c_p[:, None] * p, g)
            g += tl.where(cols[None, :].to(tl.int64) == tok[:, None], c_y[:, None], 0.0)
        # Columns >= V and rows whose coefficients are all 0 (an empty row's q is NaN; the statistics of such a row
        # are never used, they may be anything) get exactly 0.
        g = tl.where(col_ok[None, :] & active[:, None], g, 0.0)
        # Through the soft-cap, d softcap tanh(t / softcap) / dt = 1 - tanh^2, and the scale.
        if HAS_SOFTCAP_S:
            g = g * slope_s
        if HAS_SCALE_S:
            g = g * scale_s

        if tl.sum((g != 0).to(tl.int32)) > 0:  # NaN != 0: a NaN tile is pulled back, not hidden
            if NEEDS_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(g, 0), mask=col_ok, sem="relaxed")
            g_mm = g.to(hs_ptr.dtype.element_ty)
            ks = tl.arange(0, BLOCK_K)
            # Row starts only ([BLOCK_N] / [BLOCK_V] int64 addresses): 2-D address tensors carried through the
            # loop would cost 2 registers per element.
            h_rows = hs_ptr + rows64 * stride_hs
            w_rows = ws_ptr + cols.to(tl.int64) * stride_ws
            dh_rows = dh_ptr + rows64 * stride_dh
            dw_rows = dw_ptr + cols.to(tl.int64) * stride_dw
            for k0 in range(0, H_s, BLOCK_K):
                kk = k0 + ks
                k_ok = kk < H_s
                if NEEDS_DH:
                    w = tl.load(w_rows[:, None] + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    dh = tile_dot(g_mm, w, None, PRECISION_S, BF16_UPCAST)
                    tl.atomic_add(dh_rows[:, None] + kk[None, :], dh, mask=row_ok[:, None] & k_ok[None, :],
                                  sem="relaxed")
                if NEEDS_DW:
                    h = tl.load(h_rows[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    dw = tile_dot(tl.trans(g_mm), h, None, PRECISION_S, BF16_UPCAST)
                    tl.atomic_add(dw_rows[:, None] + kk[None, :], dw, mask=col_ok[:, None] & k_ok[None, :],
                                  sem="relaxed")

"""Vocabulary parallelism: merging the row statistics of vocabulary shards across ranks.

A tensor-parallel lm_head leaves each rank of a process group with a *shard* of every logit row: the columns
``[offset, offset + size)`` of the global vocabulary (shards of different sizes are fine). Every op of
``minillm_fast.loss`` is an O(rows) expression of the row statistics of ``minillm_fast.backends`` plus, for the
gradient, one pass over the row that needs only those statistics, so a sharded op needs no logits from other
ranks: each rank runs the backend's one-pass ``row_stats`` on its local columns, the ranks merge those statistics
with two all-reduces of a few numbers per row, and each rank writes the gradient of its own columns from the merged
statistics (the backward pass needs no communication at all).

The merge, per row (written once here, in pure functions that need no process group)
-----------------------------------------------------------------------------------
Rank r's statistics are relative to its local maxima m_q, m_p of the raw logits (over its columns only), with
the centred logits x_q = (z - m_q)/tau and x_p = (u - m_p)/tau::

    s_q = sum_v exp(x_q,v)    EQ_D = E_q[d]  with d = x_q - x_p    EQ_ZC = E_q[x_q]
    s_p = sum_v exp(x_p,v)    EP_D = E_p[-d]                        EP_UC = E_p[x_p]
    UA = u_a (a: the shard's argmax of z)    EQ_DA = E_q[d - d_a]  (the anchor, minillm_fast.backends)

1. ``all_reduce(MAX)`` of two int64 keys per row: (m_q, UA) ordered lexicographically, and m_p. Each key holds
   the float32 values' bits remapped so that integer order is float order (``_order_key``), the first one m_q's
   key in its high 32 bits and UA's in its low 32 bits. So one integer MAX gives the global maxima (M_q, M_p) and
   the global anchor's U_A = u at the global argmax of z (of all tied maxima, the largest u; any tied entry is
   a valid anchor). One collective, 2 int64 per row.
2. Each rank re-expresses its statistics as *unnormalised* sums relative to the global maxima, with the globally
   centred logits X_q = (z - M_q)/tau = x_q + delta_q and X_p = x_p + delta_p, delta_q = (m_q - M_q)/tau <= 0 and
   delta_p = (m_p - M_p)/tau <= 0 (so ``inv_temp`` = 1/tau is an argument). The global centred difference is
   G = X_q - X_p = d + delta_q - delta_p, and G - G_A = (d - d_a) + delta_q - (u_a - U_A)/tau::

       S_q = sum exp(X_q)                   = exp(log s_q + delta_q)
       A_q = sum exp(X_q) G                 = S_q (EQ_D + delta_q - delta_p)
       B_q = sum exp(X_q) X_q               = S_q (EQ_ZC + delta_q)
       N_q = sum exp(X_q) (G - G_A)         = S_q (EQ_DA + delta_q - (u_a - U_A)/tau)
       S_p = sum exp(X_p)                   = exp(log s_p + delta_p)
       A_p = sum exp(X_p) (-G)              = S_p (EP_D + delta_p - delta_q)     (EP_D is E_p[-d]: signs swap)
       B_p = sum exp(X_p) X_p               = S_p (EP_UC + delta_p)
       D   = sum exp(X_q) - exp(X_p)        = S_q - S_p = S_p expm1(LOG_RATIO + delta_q - delta_p)
       ZY, UY: z_y, u_y on the rank whose shard holds the row's token y, 0 on every other rank.

   D is the shard's s_q - s_p (LOG_RATIO = log1p((s_q - s_p) / s_p), minillm_fast.backends) against the global
   maxima, rounded relative to the difference, not to S (as S_q - S_p of the two rounded sums would be): where the
   two models are close it is what keeps their KL's log-ratio accurate (S_q - S_p itself where |LOG_RATIO +
   delta_q - delta_p| >= 1, or either shard distribution is empty). These are plain sums over columns, so
   ``all_reduce(SUM)`` of the 10 values (8 without tokens) gives the global ones. One collective, at most 10
   floats per row. N_q keeps the anchor's precision: on the shard holding
   the global anchor delta_q = 0 and u_a = U_A exactly, so its term is S_q EQ_DA, with no 1e4-sized part that
   the sum could round; every other shard's term is weighted by exp(delta_q), negligible in the nearly one-hot
   rows the anchor exists for.
3. Back to statistics: LOGS_Q = log S_q, EQ_D = A_q / S_q, EQ_ZC = B_q / S_q, EQ_DA = N_q / S_q, and the same for
   p, LOG_RATIO = log1p(D / S_p) (log S_q - log S_p where S_q < S_p / 2 or either is 0); M_Q, M_P are the global
   maxima, UA = U_A; ZY, UY the owner's values. UA and EQ_DA are NaN where either is not
   finite, as in the backends (a shard whose anchor is NaN, e.g. u_a = -inf, makes the row's NaN: its reverse KL
   is infinite anyway).

The shift conventions are the backends': a maximum that is not finite shifts by 0 (``shift(m) = m if finite else
0``), so delta = (shift(m) - shift(M))/tau. A shard whose row is empty (all -inf: m = -inf, log s = -inf) contributes
exactly 0 to every sum (its expectations, 0/0 in the backends, are never read: 0 * inf and NaN are guarded); a row
empty on every rank keeps M = -inf and LOGS = -inf (the ops treat it as masked) and gets 0 expectations. Entries of
+inf in the sums (a student with mass where the teacher is -inf: G = +inf) stay +inf, as unsharded, unless their
shard vanishes (its max ~104 tau or more below the global one: every exp(X) of it is 0 in float32, as the
backends take it, so it contributes 0 to the cross sums); NaN inputs stay NaN. The conversions run in float64 and
the wire format is float32, as the statistics are: the merged statistics equal the unsharded ones to float32
rounding.

Communication per op call, every op of ``minillm_fast.loss``: the two collectives above (2 int64 + 8 float32 per
row without tokens, 2 int64 + 10 float32 with tokens), plus ``jsd``'s second pass (its two per-row sums are sums
over columns: one more all_reduce(SUM) of 2 floats per row), plus, for the ops with token ids, one all_reduce of
``world_size`` int64 that tells each rank where its shard starts (``vocab_shard``). Nothing of size V is ever sent.

Token ids stay global. ``vocab_shard`` finds a shard's offset from the local sizes of all ranks, once per op call
(shards are laid out in rank order within the group, as Megatron-style vocabulary-parallel lm_heads do); the
alternative, an explicit ``vocab_offset=`` argument, would save that tiny collective but let a wrong offset pass
silently, and the sizes also give the global vocabulary that token ids are range-checked against.
``local_tokens`` maps global ids to this shard's local indices; the gradient's token term c_y e_y is written only
by the owner (``zero_unowned_token_coef``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .backends import (C_Y, EP_D, EP_UC, EQ_D, EQ_DA, EQ_ZC, LOG_RATIO, LOGS_P, LOGS_Q, M_P, M_Q, NUM_STATS, UA, UY,
                       ZY)

__all__ = ["VocabShard", "vocab_shard", "local_tokens", "zero_unowned_token_coef", "max_keys", "global_maxima",
           "to_partial_sums", "from_partial_sums", "merge_row_stats", "all_reduce_row_stats", "all_reduce_sum",
           "NUM_SUMS"]

# Columns of the partial sums (step 2 above).
S_Q, A_Q, B_Q, N_Q, S_P, A_P, B_P, D_QP, SUM_ZY, SUM_UY = range(10)
NUM_SUMS = 10
_WITHOUT_TOKENS = 8  # the first eight columns: what is summed when the op has no token ids
# Columns of the global maxima (step 1 above).
GLOBAL_M_Q, GLOBAL_M_P, GLOBAL_UA = range(3)


def _dist():
    import torch.distributed as dist
    return dist


# ----------------------------------------------------------------------------------------------------------
# Where a rank's shard lies in the global vocabulary
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VocabShard:
    """This rank's columns ``[offset, offset + size)`` of a global vocabulary of ``vocab`` columns."""

    offset: int
    size: int
    vocab: int


def vocab_shard(local_size: int, group, *, device=None) -> VocabShard:
    """This rank's shard, from every rank's ``local_size`` (shards in rank order within ``group``).

    One all_reduce(SUM) of ``world_size`` int64 (each rank writes its size into its own slot), on ``device``
    (the collective's device: CPU for gloo, the rank's GPU for NCCL; default CPU). Ends with a host sync.
    """
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = int(local_size)
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    sizes = sizes.tolist()
    return VocabShard(offset=sum(sizes[:rank]), size=int(local_size), vocab=sum(sizes))


def local_tokens(tokens: torch.Tensor, offset: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local index, owned) for global token ids: owned where ``offset <= id < offset + size``; the local index is
    ``id - offset`` there and 0 elsewhere (in range, so any backend can read it; its token term must be dropped
    with ``zero_unowned_token_coef`` and its ZY/UY statistics zeroed, as ``all_reduce_row_stats(owned=...)`` does)."""
    local = tokens.to(torch.int64) - offset
    owned = (local >= 0) & (local < size)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def zero_unowned_token_coef(coef: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """``logits_grad`` coefficients [N, 4] with the token term c_y zeroed where this rank does not own the token."""
    coef = coef.clone()
    coef[:, C_Y] = torch.where(owned, coef[:, C_Y], torch.zeros_like(coef[:, C_Y]))
    return coef


# ----------------------------------------------------------------------------------------------------------
# The merge, as pure functions (tensor in, tensor out)
# ----------------------------------------------------------------------------------------------------------

def _shift(m: torch.Tensor) -> torch.Tensor:
    """The backends' shift: the maximum where finite, else 0."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _weighted(weight: torch.Tensor, mean: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """weight * mean, exactly 0 for an empty shard (whose mean is 0/0 or 0 * inf)."""
    return torch.where(empty, torch.zeros_like(weight), weight * mean)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 values, ordered as the floats are (-0 just below +0; a NaN with its sign bit clear
    above +inf): the bits read as a signed int32, with a negative value's magnitude bits flipped."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _from_order_key(key: torch.Tensor) -> torch.Tensor:
    """The float32 values of ``_order_key`` keys (its inverse)."""
    return torch.where(key >= 0, key, key ^ 0x7FFFFFFF).to(torch.int32).view(torch.float32)


def max_keys(stats: torch.Tensor) -> torch.Tensor:
    """int64 [n, 2] keys of one shard's statistics whose elementwise maximum over shards encodes the global maxima
    and anchor (step 1 of the module docstring): (key(m_q) * 2^32 + key(UA) + 2^31, key(m_p))."""
    anchor = _order_key(stats[:, M_Q]) * 2 ** 32 + (_order_key(stats[:, UA]) + 2 ** 31)
    return torch.stack([anchor, _order_key(stats[:, M_P])], dim=1)


def global_maxima(keys: torch.Tensor) -> torch.Tensor:
    """float32 [n, 3] (M_q, M_p, U_A) from the elementwise maximum over shards of their ``max_keys``."""
    m_q = _from_order_key(keys[:, 0] >> 32)  # arithmetic shift: the high half, sign included
    u_a = _from_order_key((keys[:, 0] & 0xFFFFFFFF) - 2 ** 31)
    return torch.stack([m_q, _from_order_key(keys[:, 1]), u_a], dim=1)


def to_partial_sums(stats: torch.Tensor, global_max: torch.Tensor, *, inv_temp: float) -> torch.Tensor:
    """float32 [n, 10] unnormalised sums (S_q, A_q, B_q, N_q, S_p, A_p, B_p, D, ZY, UY) of one shard's statistics
    ``stats`` [n, NUM_STATS], relative to the rows' global maxima and anchor ``global_max`` [n, 3] = (M_q, M_p, U_A)
    (``global_maxima``; raw logits, so the shifts are scaled by ``inv_temp`` = 1/tau, the one the statistics were
    computed with). See the module docstring; summing these over shards and ``from_partial_sums`` give the
    statistics of the whole rows."""
    s, gm = stats.to(torch.float64), global_max.to(torch.float64)
    delta_q = (_shift(s[:, M_Q]) - _shift(gm[:, GLOBAL_M_Q])) * inv_temp
    delta_p = (_shift(s[:, M_P]) - _shift(gm[:, GLOBAL_M_P])) * inv_temp
    # A shard whose maximum lies ~104 or more below the global one vanishes: every exp(x' - M) of its entries
    # underflows in float32, as the backends' kernels take them, so its cross sums count 0, also where they are
    # +inf (mass where the other model is -inf)
    empty_q = (s[:, M_Q] == -math.inf) | (torch.exp(delta_q).to(torch.float32) == 0)
    empty_p = (s[:, M_P] == -math.inf) | (torch.exp(delta_p).to(torch.float32) == 0)
    s_q = torch.exp(s[:, LOGS_Q] + delta_q)
    s_p = torch.exp(s[:, LOGS_P] + delta_p)
    log_ratio = s[:, LOG_RATIO] + (delta_q - delta_p)
    close = (s_q > 0) & (s_p > 0) & (log_ratio.abs() < 1)
    difference = torch.where(close, s_p * torch.expm1(torch.where(close, log_ratio, 0.0)), s_q - s_p)
    return torch.stack([
        s_q,
        _weighted(s_q, s[:, EQ_D] + (delta_q - delta_p), empty_q),
        _weighted(s_q, s[:, EQ_ZC] + delta_q, empty_q),
        _weighted(s_q, s[:, EQ_DA] + (delta_q - (s[:, UA] - gm[:, GLOBAL_UA]) * inv_temp), empty_q),
        s_p,
        _weighted(s_p, s[:, EP_D] + (delta_p - delta_q), empty_p),
        _weighted(s_p, s[:, EP_UC] + delta_p, empty_p),
        difference,
        s[:, ZY],
        s[:, UY],
    ], dim=1).to(torch.float32)


def _mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """total / weight, 0 for a row with no mass at all (NaN stays NaN)."""
    return torch.where(weight == 0, torch.zeros_like(total), total / weight)


def from_partial_sums(sums: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    """float32 [n, NUM_STATS] row statistics from the partial sums [n, 10] (or [n, 8]: ZY = UY = 0) summed over all
    shards, and the global maxima and anchor [n, 3]."""
    t, gm = sums.to(torch.float64), global_max.to(torch.float64)
    out = torch.zeros(t.shape[0], NUM_STATS, dtype=torch.float64, device=t.device)
    out[:, M_Q], out[:, M_P] = gm[:, GLOBAL_M_Q], gm[:, GLOBAL_M_P]
    out[:, LOGS_Q], out[:, LOGS_P] = torch.log(t[:, S_Q]), torch.log(t[:, S_P])
    ratio = t[:, D_QP] / t[:, S_P]
    use_difference = (t[:, S_Q] > 0) & (t[:, S_P] > 0) & (ratio > -0.5)
    out[:, LOG_RATIO] = torch.where(use_difference, torch.log1p(torch.where(use_difference, ratio, 0.0)),
                                    out[:, LOGS_Q] - out[:, LOGS_P])
    out[:, EQ_D], out[:, EQ_ZC] = _mean(t[:, A_Q], t[:, S_Q]), _mean(t[:, B_Q], t[:, S_Q])
    out[:, EP_D], out[:, EP_UC] = _mean(t[:, A_P], t[:, S_P]), _mean(t[:, B_P], t[:, S_P])
    if t.shape[1] > SUM_UY:
        out[:, ZY], out[:, UY] = t[:, SUM_ZY], t[:, SUM_UY]
    out = out.to(torch.float32)
    u_a, eq_da = gm[:, GLOBAL_UA].to(torch.float32), _mean(t[:, N_Q], t[:, S_Q]).to(torch.float32)
    anchored = torch.isfinite(u_a) & torch.isfinite(eq_da)
    out[:, UA] = torch.where(anchored, u_a, math.nan)
    out[:, EQ_DA] = torch.where(anchored, eq_da, math.nan)
    return out


def merge_row_stats(shard_stats: Sequence[torch.Tensor], *, inv_temp: float) -> torch.Tensor:
    """The statistics of whole rows from those of their column shards, all computed with ``inv_temp``, in one
    process (what ``all_reduce_row_stats`` computes across ranks; ZY/UY must already be 0 in the shards not owning
    the token)."""
    global_max = global_maxima(torch.stack([max_keys(s) for s in shard_stats]).amax(0))
    sums = torch.stack([to_partial_sums(s, global_max, inv_temp=inv_temp) for s in shard_stats]).sum(0)
    return from_partial_sums(sums, global_max)


# ----------------------------------------------------------------------------------------------------------
# The merge across ranks
# ----------------------------------------------------------------------------------------------------------

def all_reduce_row_stats(stats: torch.Tensor, group, *, inv_temp: float, owned: torch.Tensor | None = None,
                         with_tokens: bool = True) -> torch.Tensor:
    """Global row statistics float32 [n, NUM_STATS] from this rank's ``stats`` [n, NUM_STATS] of its vocabulary shard
    (the backend's ``row_stats`` on the local columns, with ``inv_temp`` = 1/tau). Identical on every rank of
    ``group``.

    ZY/UY must hold this rank's token logits where it owns the row's token and 0 elsewhere; pass ``owned`` (bool
    [n], from ``local_tokens``) to have them zeroed here. ``with_tokens=False`` (no token ids) sums 8 columns
    instead of 10 and returns ZY = UY = 0. Two collectives, on ``stats``' device: all_reduce(MAX) of [n, 2] int64,
    all_reduce(SUM) of [n, 10] (or [n, 8]) float32.
    """
    dist = _dist()
    if owned is not None:
        stats = stats.clone()
        stats[:, [ZY, UY]] = torch.where(owned[:, None], stats[:, [ZY, UY]], torch.zeros_like(stats[:, [ZY, UY]]))
    keys = max_keys(stats)
    dist.all_reduce(keys, op=dist.ReduceOp.MAX, group=group)
    global_max = global_maxima(keys)
    sums = to_partial_sums(stats, global_max, inv_temp=inv_temp)
    if not with_tokens:
        sums = sums[:, :_WITHOUT_TOKENS].contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return from_partial_sums(sums, global_max)


def all_reduce_sum(partial: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of per-row partial sums over each shard's columns (e.g. ``jsd_rows`` computed with the
    global statistics); a new contiguous tensor, identical on every rank."""
    dist = _dist()
    total = partial.contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total

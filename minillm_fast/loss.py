"""Distillation losses over full vocabularies, fused: no softmax is ever materialised.

Drop-in use::

    from minillm_fast import loss
    kl = loss.reverse_kl(student_logits, teacher_logits, mask=attention_mask)   # KL(q || p), token mean
    kl.backward()

Notation: ``q = softmax(student_logits / tau)`` (the student), ``p = softmax(teacher_logits / tau)`` (the teacher).

Common semantics (every op):

* logits are ``[..., V]``, float32, bfloat16 or float16, student and teacher may differ in dtype; everything
  accumulates in float32, losses come back float32 and the student's gradient in the student's dtype;
* the teacher never receives a gradient: a ``teacher_logits`` that requires grad is a ValueError (compute the
  teacher under ``torch.no_grad()``);
* padded vocabularies: when V_s != V_t both distributions are taken over the first ``min(V_s, V_t)`` columns;
  the student's extra columns get zero gradient;
* ``mask`` has the leading shape; masked positions contribute nothing and are not counted;
* ``-inf`` logits are legal (masked vocabulary entries, with 0 log 0 = 0). Where the student has mass on an
  entry the teacher gives ``-inf``, the reverse KL is ``+inf`` (and the forward KL symmetrically); such a row
  then has a non-finite gradient too. A row whose student or teacher logits are *all* ``-inf`` (an empty
  distribution) is treated as masked: it contributes 0 and is not counted;
* ``reduction``: ``"mean"`` (sum over valid positions / their number; 0.0 with a zero gradient when none is
  valid), ``"sum"``, or ``"none"`` (leading shape, 0 at masked positions);
* ``backend``: ``"auto"`` (fastest for the tensors' device), ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``;
  see ``minillm_fast.available_backends()``;
* the MiniLLM losses take ``num_tokens``: when given, token sums are divided by it instead of the local number
  of valid tokens (pass the global count under gradient accumulation or data parallelism);
* ``process_group`` (every op; default None): vocabulary-parallel logits, as tensor-parallel lm_heads produce
  them. Each rank of the group passes its shard ``[..., V_local]`` of the student's and the teacher's logits;
  shards are consecutive column ranges in rank order within the group, of any sizes >= 1, and the student's and
  teacher's shards on a rank must cover the same global columns (``V_s_local == V_t_local``, else ValueError:
  with a padded vocabulary, slice the padded model's shard to the shared columns first). Token ids are *global*
  (range-checked against the sum of the shard sizes). The token axis is not sharded: every rank passes all
  positions, with the same mask, tokens, temperature and other arguments. Results are identical on every rank
  and equal the unsharded op to float32 rounding; the student's gradient is the local shard's. The ranks
  exchange only per-row statistics (two all-reduces of at most 2 + 8 floats per row, see
  ``minillm_fast.distributed``), never logits, and the backward pass needs no communication. A ValueError on
  some ranks only (e.g. inconsistent arguments) leaves the others waiting in a collective, as with any
  collective code;
* ``torch.compile``: every op traces without a graph break (``fullgraph=True`` works), forward and backward; the
  primitives are custom ops (``torch.ops.minillm_fast.backend_*``) with fake implementations, so the compiled
  backward still runs the fused gradient pass, and the O(rows) loss math around them is compiled. Data-dependent
  argument checks (token ids in range, a tensor ``num_tokens`` > 0) run inside ops when the graph runs, with the
  same ValueError; whether ``backend`` can run on the device is also checked there. Not traced: ``process_group``
  (the collectives break the graph) and the fused-linear twins.

How it works: one pass over both rows computes a few float32 statistics per row (``backends.row_stats``);
every loss above is an O(rows) expression of them, and every gradient is one more pass
(``backends.logits_grad``) writing ``dz = c_kl q (d - E_q[d]) + c_q q + c_p p + c_y e_y`` with per-row
coefficients. Only [N, 12] statistics are saved for backward.

Gradient in the forward pass (opt-in: ``MINILLM_FAST_GRAD_IN_PASS=1``; backend "cuda", eager): for
``reverse_kl``, ``forward_kl``, ``minillm_loss`` and ``pt_loss`` with a scalar reduction, when the student's logits
require grad and no process group is given, the coefficients are known before the statistics (up to minillm_loss's
per-row policy-gradient factor, which the kernel computes), so one kernel (``row_stats_grad``, rows split across a
thread-block cluster) can read each row once and write the statistics *and* dz: 6 bytes per bf16 element instead
of 10. dz is then held from the forward pass to backward (the memory logits_grad would allocate in backward anyway)
and backward only scales it by the upstream gradient, on the device and not at all when that is 1.0. It is off by
default because it is slower today: on an H100, reverse_kl forward+backward at [8192, 128256] bf16 takes 6.4-8.1 ms
with it against 3.8 ms with the two passes, over two kernel designs and every block shape tried (``python -m
benchmarks.logits_fused_plans``; the per-row latencies of the cluster kernel dominate, see the README). Under
``torch.compile``, with ``reduction="none"``, for ``jsd``, on other backends and by default, the two passes run as
above.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import torch

from . import _dispatch, _library, _validate, distributed
from .backends import (C_KL, C_P, C_Q, C_Y, EP_D, EP_UC, EQ_D, EQ_ZC, LOG_RATIO, LOGS_P, LOGS_Q, M_P, M_Q, NUM_COEFS,
                       ZY, UY)

__all__ = ["reverse_kl", "forward_kl", "jsd", "token_stats", "minillm_loss", "pt_loss",
           "fused_linear_reverse_kl", "fused_linear_forward_kl", "fused_linear_jsd", "fused_linear_token_stats",
           "fused_linear_minillm_loss", "fused_linear_pt_loss", "TokenStats", "MiniLLMLoss", "PTLoss"]


class TokenStats(NamedTuple):
    """Per-position float32 statistics of a sampled token y (no gradient; 0 at masked positions)."""

    student_logprob: torch.Tensor  # log q(y)
    teacher_logprob: torch.Tensor  # log p(y)
    mix_logprob: torch.Tensor  # log(alpha p(y) + (1 - alpha) q(y))
    log_ratio: torch.Tensor  # log p(y) - log q(y)
    importance_weight: torch.Tensor  # q(y) / (alpha p(y) + (1 - alpha) q(y)), in (0, 1 / (1 - alpha)]
    reverse_kl: torch.Tensor  # KL(q || p) over the whole vocabulary
    student_entropy: torch.Tensor  # -sum_v q_v log q_v


class MiniLLMLoss(NamedTuple):
    loss: torch.Tensor  # pg_loss (+ reg_loss when single_step): the only one with a gradient
    pg_loss: torch.Tensor
    reg_loss: torch.Tensor
    clip_fraction: torch.Tensor


class PTLoss(NamedTuple):
    loss: torch.Tensor  # (1 - kd_ratio) lm_loss + kd_ratio kd_loss: the only one with a gradient
    lm_loss: torch.Tensor
    kd_loss: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# Row statistics -> per-position quantities (see minillm_fast.backends for the column meanings)
# ----------------------------------------------------------------------------------------------------------

def _row_stats(rows: _validate.Rows, tokens=None, owned=None) -> torch.Tensor:
    """The rows' statistics; with a process group, merged across the vocabulary shards (``owned``: whether this
    rank's shard holds each row's token, from ``_token_ids``). They carry no gradient (the pass reads detached
    logits; the gradient is attached afterwards, see below), so the math on them needs no ``torch.no_grad()``
    block, and has none: a compiled graph that turns grad mode off and raises inside (a ValueError from an op)
    leaves it off under some torch.compile backends."""
    stats = _library.primitive("row_stats", rows.student.detach(), rows.teacher, tokens, rows.inv_temp,
                               backend=rows.backend_name)
    if rows.group is not None:
        with torch.no_grad():
            stats = distributed.all_reduce_row_stats(stats, rows.group, inv_temp=rows.inv_temp, owned=owned,
                                                     with_tokens=tokens is not None)
    return stats


def _token_ids(name: str, tokens, rows: _validate.Rows):
    """(ids the backend reads, owned): validated int64 [N] token ids and None; with a process group, this shard's
    local indices (0 where another rank owns the token) and a bool [N] of the tokens this rank owns."""
    device = rows.student.device
    if rows.group is None:
        return _validate.check_tokens(name, tokens, rows.lead_shape, device, rows.vocab, rows.mask), None
    shard = distributed.vocab_shard(rows.vocab, rows.group, device=device)
    flat = _validate.check_tokens(name, tokens, rows.lead_shape, device, shard.vocab, rows.mask,
                                  vocab_is="the global vocabulary: the sum of the shards' sizes")
    return distributed.local_tokens(flat, shard.offset, shard.size)


def _own_token_terms(coef: torch.Tensor, owned) -> torch.Tensor:
    """Sharded: only the rank holding a row's token writes its token term c_y e_y."""
    return coef if owned is None else distributed.zero_unowned_token_coef(coef, owned)


def _valid_rows(mask: torch.Tensor | None, stats: torch.Tensor) -> torch.Tensor:
    """Positions that count: allowed by the mask, and neither distribution empty (a NaN row stays valid, so
    that NaN inputs show up as NaN instead of being dropped silently)."""
    nonempty = (stats[:, M_Q] != -math.inf) & (stats[:, M_P] != -math.inf)
    return nonempty if mask is None else nonempty & mask


def _reverse_kl_rows(s):
    # KL(q||p) = E_q[(z' - m_q) - (u' - m_p)] - log(s_q / s_p): no large logit ever enters the sum, and the log-ratio
    # is not the difference of two rounded logs (minillm_fast.backends: LOG_RATIO).
    return s[:, EQ_D] - s[:, LOG_RATIO]


def _forward_kl_rows(s):
    return s[:, EP_D] + s[:, LOG_RATIO]


def _student_logprob_rows(s, inv_temp: float):
    """log q(y) = (z_y - m_q) / tau - log s_q per row (raw z_y and m_q), in float64: the difference of two float32
    logits is exact there, and so is its product with 1/tau, so what is built on it (log q(y) - old, the log-ratio,
    the mixture) is rounded neither at ulp(|log q(y)|), ~1e-3 where logits are ~1e4, nor at ulp(|z_y / tau|)."""
    s = s.double()
    return (s[:, ZY] - s[:, M_Q]) * inv_temp - s[:, LOGS_Q]


def _teacher_logprob_rows(s, inv_temp: float):
    """log p(y), in float64 as ``_student_logprob_rows``."""
    s = s.double()
    return (s[:, UY] - s[:, M_P]) * inv_temp - s[:, LOGS_P]


def _zero_where_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def _denominator(valid, reduction, num_tokens=None):
    """What a token sum is divided by: the number of valid rows (at least 1) or ``num_tokens`` for "mean"."""
    if reduction != "mean":
        return 1.0
    return valid.sum().clamp(min=1).to(torch.float32) if num_tokens is None else num_tokens


def _reduce(per_row, valid, reduction, lead_shape, num_tokens=None):
    """(value, weight): the reduced loss and d value / d per_row for each row (before the upstream grad)."""
    per_row = _zero_where_invalid(per_row, valid)
    weight = valid.to(torch.float32)
    if reduction == "none":
        return per_row.reshape(lead_shape), weight
    weight = weight / _denominator(valid, reduction, num_tokens)
    return (per_row * weight).sum(), weight


# ----------------------------------------------------------------------------------------------------------
# Attaching the fused gradient
# ----------------------------------------------------------------------------------------------------------
# A loss is computed from row statistics that carry no gradient (the row pass reads detached logits); its gradient
# is attached afterwards by an autograd.Function that returns the loss value unchanged and whose backward is one
# fused pass. Every loss is linear in its per-row values, so for an upstream gradient g
#
#     dz = logits_grad(coef * g),  coef = (d value / d per-row value) * (the loss's per-unit logits_grad columns),
#
# with g a scalar for reduced losses and one value per row for reduction="none" (JSD likewise with jsd_grad).
# Everything the backward needs is an argument (tensors, the float 1/tau, the backend's name; no closure), and the
# backward calls the primitive through ``_library.primitive`` (its custom op while torch.compile traces): dynamo
# traces a loss, forward and backward, without a graph break, and the compiled backward runs the fused primitive;
# no torch math is differentiated. Saved: the rows of both logits (views), token ids, [N, 12] statistics and
# coefficients; autograd frees them after backward, so a second backward through the same loss raises autograd's
# RuntimeError ("Trying to backward through the graph a second time"), and works under retain_graph=True.
#
# The fused-linear ops (``minillm_fast.fused_linear``) attach their gradients with ``_attach_grad`` below instead:
# closures over gradients formed in the forward pass (or recomputed block by block), not traced by torch.compile.

def _per_row_upstream(upstream: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The upstream gradient as a float32 [N] or [] tensor that broadcasts against per-row weights."""
    upstream = upstream.to(torch.float32)
    return upstream.reshape(n_rows) if upstream.dim() > 0 else upstream


class _LogitsGrad(torch.autograd.Function):
    """``value`` unchanged; d/dz = logits_grad(z, u, tokens, stats, coef * upstream), one fused pass (coef per
    unit of upstream gradient, float32 [N, 4]). Nothing else receives a gradient."""

    @staticmethod
    def forward(ctx, value, z, u, tokens, stats, coef, inv_temp: float, backend: str):
        ctx.save_for_backward(z, u, tokens, stats, coef)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        return value.clone()

    @staticmethod
    def backward(ctx, upstream):
        z, u, tokens, stats, coef = ctx.saved_tensors
        coef = coef * _per_row_upstream(upstream, coef.shape[0])[..., None]
        dz = _library.primitive("logits_grad", z, u, tokens, stats, coef.contiguous(), ctx.inv_temp,
                                backend=ctx.backend)
        return None, dz, None, None, None, None, None, None


class _JSDGrad(torch.autograd.Function):
    """``value`` unchanged; d/dz = jsd_grad(z, u, stats, jsd, coef * upstream), one fused pass (coef float32 [N])."""

    @staticmethod
    def forward(ctx, value, z, u, stats, jsd, coef, beta: float, inv_temp: float, backend: str):
        ctx.save_for_backward(z, u, stats, jsd, coef)
        ctx.beta, ctx.inv_temp, ctx.backend = beta, inv_temp, backend
        return value.clone()

    @staticmethod
    def backward(ctx, upstream):
        z, u, stats, jsd, coef = ctx.saved_tensors
        coef = coef * _per_row_upstream(upstream, coef.shape[0])
        dz = _library.primitive("jsd_grad", z, u, stats, jsd, coef.contiguous(), ctx.beta, ctx.inv_temp,
                                backend=ctx.backend)
        return None, dz, None, None, None, None, None, None, None


def _needs_grad(student_logits: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and student_logits.requires_grad


def _with_logits_grad(value, rows: _validate.Rows, stats, tokens, coef) -> torch.Tensor:
    """``value`` whose gradient with respect to the student's logits is one ``logits_grad`` pass with ``coef``
    (float32 [N, 4], per unit of upstream gradient)."""
    if not _needs_grad(rows.student):
        return value
    return _LogitsGrad.apply(value, rows.student, rows.teacher, tokens, stats, coef, rows.inv_temp, rows.backend_name)


class _FusedGrad(torch.autograd.Function):
    """Returns ``value`` unchanged; its backward is ``grad_fn(upstream)``: fused kernel calls, one gradient per
    input in ``inputs`` (None for those that do not require grad).

    The fused-linear ops' glue (``minillm_fast.fused_linear``): each hands it a closure over what it saved
    (gradients formed in the forward pass, or what it takes to recompute them block by block).
    """

    @staticmethod
    def forward(ctx, value, grad_fn, *inputs):
        ctx.grad_fn = grad_fn
        return value.clone()

    @staticmethod
    def backward(ctx, upstream):
        # Like autograd's saved tensors, the closure (which holds the logits) is freed by the backward pass, so
        # a loss tensor kept alive after backward() does not keep a micro-batch of logits alive with it.
        grad_fn, ctx.grad_fn = ctx.grad_fn, None
        if grad_fn is None:
            raise RuntimeError("minillm_fast: trying to backward through a fused loss a second time; its saved "
                               "row statistics were freed by the first backward (retain_graph is not supported)")
        return (None, None, *grad_fn(upstream))


def _attach_grad(value: torch.Tensor, grad_fn: Callable[[torch.Tensor], tuple], *inputs) -> torch.Tensor:
    """``value`` with a fused backward: ``grad_fn(upstream)`` returns one gradient per tensor in ``inputs``."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _FusedGrad.apply(value, grad_fn, *inputs)
    return value


class _RowPass(NamedTuple):
    """The row pass's results: statistics, and where it formed it, the student's gradient."""

    stats: torch.Tensor
    dz: torch.Tensor | None = None  # d loss / d logits per unit of upstream gradient, if formed in the pass
    denominator: object = 1.0  # what dz's coefficients were divided by (``_denominator`` of the mask)


GRAD_IN_PASS_ENV = "MINILLM_FAST_GRAD_IN_PASS"


def _grad_in_pass_backend(rows: _validate.Rows, reduction: str):
    """The backend that forms the gradient in the row pass (``row_stats_grad``), or None: needs the opt-in
    (``MINILLM_FAST_GRAD_IN_PASS=1``, read on each call), a scalar reduction (a per-row upstream gradient would need
    a second pass anyway), no process group, a student that requires grad, eager mode (the compiled graph keeps the
    two passes, whose custom ops it traces), and a backend with the primitive."""
    if reduction == "none" or rows.group is not None or not _needs_grad(rows.student):
        return None
    if torch.compiler.is_compiling() or os.environ.get(GRAD_IN_PASS_ENV) != "1":
        return None
    backend = _dispatch.get_backend(rows.backend_name, rows.student.device)
    return backend if hasattr(backend, "row_stats_grad") else None


def _row_pass(rows: _validate.Rows, reduction: str, grad_columns: dict, tokens=None, owned=None, num_tokens=None,
              policy=None, clip_eps: float = 0.0) -> _RowPass:
    """The rows' statistics (as ``_row_stats``), and where the backend can, the student's gradient from the same
    pass. Its coefficients are those of ``_reduce``'s weights with the *mask* in place of the valid rows (rows
    found empty are dropped by the kernel; ``_with_grad_from_pass`` corrects the denominator) times
    ``grad_columns``; ``policy`` ((advantage, old log-prob, importance weight), float32 [N] each) makes the kernel
    multiply the q and y columns by each row's policy-gradient factor (minillm_loss)."""
    backend = _grad_in_pass_backend(rows, reduction)
    if backend is None:
        return _RowPass(_row_stats(rows, tokens, owned))
    n_rows, device = rows.student.shape[0], rows.student.device
    planned = rows.mask if rows.mask is not None else torch.ones(n_rows, dtype=torch.bool, device=device)
    denominator = _denominator(planned, reduction, num_tokens)
    coef = _coefs(n_rows, device, planned.to(torch.float32) / denominator * rows.inv_temp, grad_columns)
    policy = None if policy is None else torch.stack(policy, 1).to(torch.float32)
    stats, dz = backend.row_stats_grad(rows.student.detach(), rows.teacher, tokens, coef, policy, clip_eps,
                                       rows.inv_temp, None)
    return _RowPass(stats, dz if dz.numel() > 0 else None, denominator)


def _with_grad_from_pass(value: torch.Tensor, rows: _validate.Rows, row_pass: _RowPass, valid: torch.Tensor,
                         reduction: str, num_tokens=None) -> torch.Tensor:
    """``value`` whose gradient is the pass's dz times upstream * (planned / actual denominator): the two differ
    only for "mean" over the local valid rows when a row the mask allowed is empty (not counted). The product is
    formed on the device and dz scaled in place, by nothing when it is 1 (``scale_unless_one_``)."""
    correction = 1.0
    if reduction == "mean" and num_tokens is None:
        correction = row_pass.denominator / _denominator(valid, reduction)
    dz = row_pass.dz
    scale = getattr(rows.backend, "scale_unless_one_", None)

    def grad_fn(upstream):
        factor = (upstream.to(torch.float32) * correction).reshape(())
        if scale is not None:
            scale(dz, factor)
        else:
            dz.mul_(factor)
        return (dz,)
    return _attach_grad(value, grad_fn, rows.student)


def row_stats_grad_composed(backend, z, u, tokens, coef, policy, clip_eps, inv_temp, grad_dtype=None):
    """What the optional primitive ``row_stats_grad`` returns (``minillm_fast.backends``), composed of
    ``backend``'s row_stats and logits_grad: the reference its kernels are tested against."""
    stats = backend.row_stats(z, u, tokens, inv_temp)
    nonempty = _valid_rows(None, stats)
    coef = torch.where(nonempty[:, None], coef, torch.zeros_like(coef))
    if policy is not None:
        _, factor, _ = _policy_gradient_rows(stats, inv_temp, nonempty, policy[:, 0], policy[:, 1], policy[:, 2],
                                             clip_eps)
        coef[:, C_Q] *= factor
        coef[:, C_Y] *= factor
    dz = backend.logits_grad(z, u, tokens, stats, coef.contiguous(), inv_temp)
    return stats, dz.to(grad_dtype or z.dtype)


def _coefs(n_rows: int, device, scale, columns: dict) -> torch.Tensor:
    """float32 [N, 4] logits_grad coefficients: ``scale`` (per row or scalar) times each named column."""
    coef = torch.zeros(n_rows, NUM_COEFS, dtype=torch.float32, device=device)
    index = {"kl": C_KL, "q": C_Q, "p": C_P, "y": C_Y}
    for key, value in columns.items():
        coef[:, index[key]] = scale * value
    return coef


# The gradient of each loss per unit of its per-row value and of 1/tau, as logits_grad columns:
# dz = c_kl q (d - E_q d) + c_q q + c_p p + c_y e_y.
REVERSE_KL_GRAD = {"kl": 1.0}  # d KL(q||p) = q (log q - log p - KL)
FORWARD_KL_GRAD = {"q": 1.0, "p": -1.0}  # d KL(p||q) = q - p


def _minillm_grad_columns(d_pg_d_logq, single_step: bool) -> dict:
    # d log q(y) = e_y - q; the single-step term is the reverse KL's.
    return {"y": d_pg_d_logq, "q": -d_pg_d_logq, "kl": float(bool(single_step))}


def _pt_grad_columns(kd_ratio: float) -> dict:
    # (1 - lambda)(q - e_y) + lambda (q - p)
    return {"q": 1.0, "p": -kd_ratio, "y": -(1 - kd_ratio)}


def _policy_gradient_rows(s, inv_temp, valid, adv, old, w, clip_eps):
    """Per row: (clipped PG loss, its derivative with respect to log q(y), the ratio rho). See minillm_loss."""
    log_ratio = _zero_where_invalid(_student_logprob_rows(s, inv_temp) - old.double(), valid)
    rho = torch.exp(log_ratio) * w.double()
    adv = adv.double()
    unclipped, clipped = -adv * rho, -adv * rho.clamp(1 - clip_eps, 1 + clip_eps)
    pg = torch.maximum(unclipped, clipped)
    d_pg_d_logq = torch.where(unclipped >= clipped, -adv * rho, torch.zeros_like(rho))
    return pg.float(), d_pg_d_logq.float(), rho.float()


def _pt_rows(s, inv_temp):
    """Per row: (-log q(label), -sum_v p_v log q_v). See pt_loss."""
    lm = (-_student_logprob_rows(s, inv_temp)).float()
    # -sum p log q = -E_p[z' - m_q] + log s_q, with E_p[z' - m_q] = E_p[u' - m_p] - E_p[(u'-m_p) - (z'-m_q)].
    kd = s[:, EP_D] - s[:, EP_UC] + s[:, LOGS_Q]
    return lm, kd


# ----------------------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------------------

def _divergence(student_logits, teacher_logits, per_row_fn, grad_columns, *, temperature, mask, reduction,
                backend, process_group):
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=mask, backend=backend,
                             process_group=process_group)
    reduction = _validate.check_reduction(reduction)
    row_pass = _row_pass(rows, reduction, grad_columns)
    stats = row_pass.stats
    valid = _valid_rows(rows.mask, stats)
    value, weight = _reduce(per_row_fn(stats), valid, reduction, rows.lead_shape)
    if row_pass.dz is not None:
        return _with_grad_from_pass(value, rows, row_pass, valid, reduction)
    coef = _coefs(stats.shape[0], stats.device, weight * rows.inv_temp, grad_columns)
    return _with_logits_grad(value, rows, stats, None, coef)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", backend="auto",
               process_group=None):
    """Reverse KL per position: KL(q || p) = sum_v q_v (log q_v - log p_v), the MiniLLM objective.

    Gradient: d/dz KL = (1/tau) q * (log q - log p - KL). +inf where the student has mass on an entry whose
    teacher logit is -inf. See the module docstring for masks, reductions, dtypes, padded vocabularies and
    ``process_group`` (vocabulary-parallel logits).
    """
    return _divergence(student_logits, teacher_logits, _reverse_kl_rows, REVERSE_KL_GRAD, temperature=temperature,
                       mask=mask, reduction=reduction, backend=backend, process_group=process_group)


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", backend="auto",
               process_group=None):
    """Forward KL per position: KL(p || q) = sum_v p_v (log p_v - log q_v) (word-level KD).

    Gradient: d/dz KL = (1/tau) (q - p). +inf where the teacher has mass on an entry whose student logit is
    -inf. See the module docstring for the common semantics.
    """
    return _divergence(student_logits, teacher_logits, _forward_kl_rows, FORWARD_KL_GRAD,
                       temperature=temperature, mask=mask, reduction=reduction, backend=backend,
                       process_group=process_group)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean", backend="auto",
        process_group=None):
    """Generalised Jensen-Shannon divergence of GKD / TRL: with m = beta p + (1 - beta) q,

        JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m).

    That formula tends to 0 at both ends, so the endpoints are *defined* (as TRL does):
    ``beta=0`` is ``forward_kl`` (KL(p||q)) and ``beta=1`` is ``reverse_kl`` (KL(q||p)).
    Gradient for 0 < beta < 1: d/dz = ((1 - beta)/tau) q * (g - E_q[g]) with g = log q - log m.
    Needs two passes over the rows (the mixture needs both normalisers first); with ``process_group`` the second
    pass's two per-row sums are summed over the shards (one more all-reduce of 2 floats per row).
    """
    beta = _validate.check_range("beta", beta, 0.0, 1.0, high_inclusive=True)
    common = dict(temperature=temperature, mask=mask, reduction=reduction, backend=backend,
                  process_group=process_group)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, **common)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, **common)
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=mask, backend=backend,
                             process_group=process_group)
    reduction = _validate.check_reduction(reduction)
    stats = _row_stats(rows)
    # Expectations over the row under the (global) q, p and m: sums over columns, so shards add up.
    jsd_rows = _library.primitive("jsd_rows", rows.student.detach(), rows.teacher, stats, beta, rows.inv_temp,
                                  backend=rows.backend_name)
    if rows.group is not None:
        with torch.no_grad():
            jsd_rows = distributed.all_reduce_sum(jsd_rows, rows.group)
    valid = _valid_rows(rows.mask, stats)
    value, weight = _reduce(jsd_rows[:, 0], valid, reduction, rows.lead_shape)
    if not _needs_grad(rows.student):
        return value
    coef = weight * ((1.0 - beta) * rows.inv_temp)
    return _JSDGrad.apply(value, rows.student, rows.teacher, stats, jsd_rows, coef, beta, rows.inv_temp,
                          rows.backend_name)


# ----------------------------------------------------------------------------------------------------------
# MiniLLM's token kernels
# ----------------------------------------------------------------------------------------------------------

def token_stats(student_logits, teacher_logits, tokens, *, alpha=0.2, temperature=1.0, mask=None, backend="auto",
                process_group=None):
    """Per-position statistics of the sampled tokens y, from one pass over both rows (no gradient).

    Returns ``TokenStats`` of float32 tensors with the leading shape (0 at masked positions):
    ``student_logprob`` log q(y), ``teacher_logprob`` log p(y), ``mix_logprob`` log(alpha p(y) + (1-alpha) q(y))
    (computed with logaddexp, never by exponentiating), ``log_ratio`` log p(y) - log q(y) (MiniLLM's per-token
    reward before scaling), ``importance_weight`` q(y) / p~(y) in (0, 1/(1-alpha)], ``reverse_kl`` KL(q||p) over
    the whole vocabulary, ``student_entropy`` -sum q log q. ``alpha`` is in [0, 1). With ``process_group``
    (vocabulary-parallel logits) ``tokens`` are global ids.
    """
    alpha = _validate.check_range("alpha", alpha, 0.0, 1.0, high_inclusive=False)
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=mask, backend=backend,
                             process_group=process_group)
    flat_tokens, owned = _token_ids("tokens", tokens, rows)
    s = _row_stats(rows, flat_tokens, owned)
    return _token_stats_from_rows(s, rows.inv_temp, _valid_rows(rows.mask, s), alpha, rows.lead_shape)


def _token_stats_from_rows(s, inv_temp, valid, alpha: float, lead_shape) -> TokenStats:
    lq, lp = _student_logprob_rows(s, inv_temp), _teacher_logprob_rows(s, inv_temp)  # float64
    mix = lq if alpha == 0 else torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
    log_ratio = lp - lq
    # q / (alpha p + (1 - alpha) q) = 1 / ((1 - alpha) + alpha exp(log p - log q)): never above 1 / (1 - alpha),
    # 0 where q(y) = 0, and not exp(lq - mix), whose two rounded terms differ by ~1e-3 at log q(y) ~ -1e4; exactly
    # 1 for alpha = 0 (not 1 / (1 + 0 * inf) where p/q overflows)
    weight = torch.exp(lq - mix) if alpha == 0 else 1.0 / ((1.0 - alpha) + alpha * torch.exp(log_ratio))
    fields = TokenStats(
        student_logprob=lq.float(), teacher_logprob=lp.float(), mix_logprob=mix.float(), log_ratio=log_ratio.float(),
        importance_weight=weight.float(), reverse_kl=_reverse_kl_rows(s),
        student_entropy=s[:, LOGS_Q] - s[:, EQ_ZC],
    )
    return TokenStats(*(_zero_where_invalid(f, valid).reshape(lead_shape) for f in fields))


def minillm_loss(student_logits, teacher_logits, tokens, advantages, old_logprobs, importance_weights, *, mask,
                 clip_eps=0.2, temperature=1.0, single_step=True, num_tokens=None, backend="auto", process_group=None):
    """MiniLLM's training micro-step (policy gradient + single-step reverse KL) as one fused op.

    With log q(y) the current student's log-prob of the rollout token and N the number of valid tokens
    (or ``num_tokens``)::

        rho     = exp(log q(y) - old_logprob) * w          (w: importance_weights; exp(0) at masked positions)
        pg_loss = (1/N) sum_valid max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
        reg_loss= (1/N) sum_valid KL(q || p)               (exact, whole vocabulary; reported always)
        loss    = pg_loss + reg_loss if single_step else pg_loss

    ``advantages``, ``old_logprobs`` and ``importance_weights`` are constants (never differentiated).
    ``clip_fraction`` is the share of valid tokens with |rho - 1| > eps. Gradient, one fused pass:
    dz = (1/(N tau)) [ g (e_y - q) + single_step * q (log q - log p - KL) ], g = -A rho where the unclipped
    branch is active, else 0. Returns ``MiniLLMLoss(loss, pg_loss, reg_loss, clip_fraction)``. With
    ``process_group`` (vocabulary-parallel logits) ``tokens`` are global ids.
    """
    clip_eps = _validate.check_positive("clip_eps", clip_eps)
    num_tokens = _validate.check_num_tokens(num_tokens)
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=mask, backend=backend,
                             process_group=process_group)
    device, lead = student_logits.device, rows.lead_shape
    flat_tokens, owned = _token_ids("tokens", tokens, rows)
    # float64: per-row constants, cheap, and an old log-prob ~ -1e4 given in float64 keeps its digits in rho
    adv, old, w = (_validate.per_position(name, x, lead, device).detach().to(torch.float64)
                   for name, x in (("advantages", advantages), ("old_logprobs", old_logprobs),
                                   ("importance_weights", importance_weights)))
    row_pass = _row_pass(rows, "mean", _minillm_grad_columns(1.0, single_step), flat_tokens, owned, num_tokens,
                         policy=(adv, old, w), clip_eps=clip_eps)
    s = row_pass.stats
    valid = _valid_rows(rows.mask, s)
    pg, d_pg_d_logq, rho = _policy_gradient_rows(s, rows.inv_temp, valid, adv, old, w, clip_eps)
    pg_loss, weight = _reduce(pg, valid, "mean", lead, num_tokens)
    reg_loss, _ = _reduce(_reverse_kl_rows(s), valid, "mean", lead, num_tokens)
    clip_fraction, _ = _reduce(((rho - 1).abs() > clip_eps).to(torch.float32), valid, "mean", lead, num_tokens)
    value = pg_loss + reg_loss if single_step else pg_loss.clone()
    if row_pass.dz is not None:
        loss = _with_grad_from_pass(value, rows, row_pass, valid, "mean", num_tokens)
        return MiniLLMLoss(loss, pg_loss, reg_loss, clip_fraction)
    coef = _coefs(s.shape[0], device, weight * rows.inv_temp, _minillm_grad_columns(d_pg_d_logq, single_step))
    coef = _own_token_terms(coef, owned)
    loss = _with_logits_grad(value, rows, s, flat_tokens, coef)
    return MiniLLMLoss(loss, pg_loss, reg_loss, clip_fraction)


def pt_loss(student_logits, teacher_logits, labels, *, kd_ratio=0.5, ignore_index=-100, temperature=1.0,
            num_tokens=None, backend="auto", process_group=None):
    """MiniLLM's PT loss on plain text: language modelling mixed with word-level distillation, one fused pass.

        lm_loss = (1/N) sum_valid -log q(label)            (cross-entropy of softmax(z / tau))
        kd_loss = (1/N) sum_valid -sum_v p_v log q_v       (p = softmax(u / tau); same tau, no tau^2 factor)
        loss    = (1 - kd_ratio) lm_loss + kd_ratio kd_loss

    Positions whose label is ``ignore_index`` are not valid. **Labels are aligned with the logits: there is no
    shift inside** (shift them yourself for next-token prediction). Gradient:
    dz = (1/(N tau)) [ (1 - lambda)(q - e_y) + lambda (q - p) ]. Returns ``PTLoss(loss, lm_loss, kd_loss)``.
    With ``process_group`` (vocabulary-parallel logits) ``labels`` are global ids.
    """
    kd_ratio = _validate.check_range("kd_ratio", kd_ratio, 0.0, 1.0, high_inclusive=True)
    num_tokens = _validate.check_num_tokens(num_tokens)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    _validate.check_logits(student_logits, teacher_logits)
    lead, device = student_logits.shape[:-1], student_logits.device
    flat_labels = _validate.per_position("labels", labels, lead, device, integer=True)
    label_mask = (flat_labels != ignore_index).reshape(lead)
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=label_mask,
                             backend=backend, process_group=process_group)
    flat_tokens, owned = _token_ids("labels", labels, rows)
    row_pass = _row_pass(rows, "mean", _pt_grad_columns(kd_ratio), flat_tokens, owned, num_tokens)
    s = row_pass.stats
    valid = _valid_rows(rows.mask, s)
    lm, kd = _pt_rows(s, rows.inv_temp)
    lm_loss, weight = _reduce(lm, valid, "mean", lead, num_tokens)
    kd_loss, _ = _reduce(kd, valid, "mean", lead, num_tokens)
    value = (1 - kd_ratio) * lm_loss + kd_ratio * kd_loss
    if row_pass.dz is not None:
        return PTLoss(_with_grad_from_pass(value, rows, row_pass, valid, "mean", num_tokens), lm_loss, kd_loss)
    coef = _coefs(s.shape[0], device, weight * rows.inv_temp, _pt_grad_columns(kd_ratio))
    coef = _own_token_terms(coef, owned)
    loss = _with_logits_grad(value, rows, s, flat_tokens, coef)
    return PTLoss(loss, lm_loss, kd_loss)


# The fused-linear twins (hidden states and lm_head weights instead of logits) live in fused_linear.py.
from .fused_linear import (fused_linear_forward_kl, fused_linear_jsd, fused_linear_minillm_loss,  # noqa: E402
                           fused_linear_pt_loss, fused_linear_reverse_kl, fused_linear_token_stats)

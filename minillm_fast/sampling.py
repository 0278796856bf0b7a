"""Teacher-mixed sampling without materialising the mixture.

MiniLLM draws each next token from p~ = (1 - alpha) q + alpha p. The same distribution, exactly: per row, pick
the teacher with probability alpha (else the student), then draw from that one softmax by inverse CDF. Only the
chosen row is read (two passes over it), and only 2 uniforms per row are drawn from ``generator``.

Vocabulary-parallel logits (``process_group``): the inverse CDF of a row split into consecutive shards is a
two-level draw with the same uniform u: the shard r whose cumulative mass interval [C_{r-1}, C_r) holds u * C
(C the row's total mass), then, inside that shard, the inverse CDF at u' = (u C - C_{r-1}) / (C_r - C_{r-1}).
Each rank needs only every shard's mass, i.e. every rank's (max, log-sum) of the row: one all-reduce of a few
floats per row, then the owning rank draws inside its shard and a second all-reduce (one int64 per row) hands the
token to every rank. No logits are exchanged.
"""
from __future__ import annotations

import torch

from . import _validate
from .backends import LOGS_P, LOGS_Q, M_P, M_Q

__all__ = ["sample_mixture"]


def sample_mixture(student_logits, teacher_logits, *, alpha=0.2, temperature=1.0, generator=None, backend="auto",
                   process_group=None):
    """Draw token ids of the leading shape from (1 - alpha) softmax(z / tau) + alpha softmax(u / tau).

    Deterministic given ``generator`` (a ``torch.Generator`` on the logits' device, or None for the global RNG).
    Padded vocabularies: both softmaxes are over the first min(V_s, V_t) columns. An entry of probability 0
    (logit -inf) is never drawn. A row whose chosen distribution is empty (all -inf) gets -1.
    Returns int64 token ids.

    ``process_group``: vocabulary-parallel logits (each rank passes its shard ``[..., V_local]``, shards in rank
    order, ``V_s_local == V_t_local``; see ``minillm_fast.loss``). Returns the same *global* token ids on every
    rank: the uniforms of the group's first rank are used (they travel with the shard masses, so the ranks' RNG
    states need not agree; every rank still draws its 2 uniforms per row, keeping generators in step). The draw
    is the unsharded one with the same uniforms, up to float rounding at the boundaries of the inverse CDF.
    Two collectives: an all-reduce of 2 + 4 * world_size float64 per row and one of 1 int64 per row.
    """
    alpha = _validate.check_range("alpha", alpha, 0.0, 1.0, high_inclusive=False)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=None, backend=backend,
                             process_group=process_group)
    n_rows = rows.student.shape[0]
    device = generator.device if generator is not None else student_logits.device
    with torch.no_grad():
        draws = torch.rand(2, n_rows, generator=generator, dtype=torch.float64, device=device)
        draws = draws.to(student_logits.device)
        if rows.group is not None:
            tokens = _sample_sharded(rows, draws, alpha)
        else:
            use_teacher = draws[0] < alpha
            tokens = rows.backend.sample_rows(rows.student, rows.teacher, use_teacher, draws[1].contiguous(),
                                              rows.inv_temp)
    return tokens.reshape(rows.lead_shape)


def _sample_sharded(rows: _validate.Rows, draws: torch.Tensor, alpha: float) -> torch.Tensor:
    import torch.distributed as dist

    group = rows.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_rows, device = rows.student.shape[0], rows.student.device
    # This shard's (max, log-sum) of both rows: the backend's one pass (ZY/UY unused).
    stats = rows.backend.row_stats(rows.student, rows.teacher, None, rows.inv_temp)

    # One all-reduce(SUM) as a gather: each rank writes into its own slots, zeros elsewhere (-inf + 0 = -inf).
    per_row = torch.zeros(n_rows, 2 + 4 * world, dtype=torch.float64, device=device)
    if rank == 0:
        per_row[:, :2] = draws.t()
    per_row[:, 2 + 4 * rank: 6 + 4 * rank] = stats[:, [M_Q, LOGS_Q, M_P, LOGS_P]].to(torch.float64)
    sizes = torch.zeros(world, dtype=torch.float64, device=device)
    sizes[rank] = rows.vocab
    flat = torch.cat([per_row.reshape(-1), sizes])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    per_row, sizes = flat[:-world].reshape(n_rows, 2 + 4 * world), flat[-world:]
    offset = int(sizes[:rank].sum().item())

    use_teacher, uniform = per_row[:, 0] < alpha, per_row[:, 1]
    shard = per_row[:, 2:].reshape(n_rows, world, 4)
    m = torch.where(use_teacher[:, None], shard[..., 2], shard[..., 0])
    logs = torch.where(use_teacher[:, None], shard[..., 3], shard[..., 1])
    # log of each shard's mass (the backends' shift: log s is relative to the raw max m, as m / tau, where m is
    # finite)
    log_mass = torch.where(torch.isfinite(m), m, torch.zeros_like(m)) * rows.inv_temp + logs
    top = log_mass.amax(1, keepdim=True)
    mass = torch.exp(log_mass - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # [n, world]
    cum = mass.cumsum(1)
    target = uniform * cum[:, -1]
    crossed = (cum > target[:, None]) & (mass > 0)
    # Rounding can leave the last shard with mass just below the target: fall back to it.
    last_positive = world - 1 - (mass > 0).flip(1).to(torch.int8).argmax(1)
    chosen = torch.where(crossed.any(1), crossed.to(torch.int8).argmax(1), last_positive)
    empty = ~(mass > 0).any(1)

    mine = torch.nonzero((chosen == rank) & ~empty).flatten()
    tokens = torch.zeros(n_rows, dtype=torch.int64, device=device)
    if mine.numel():
        mass_mine = mass[mine, rank]
        below = cum[mine, rank] - mass_mine
        inner = ((target[mine] - below) / mass_mine).clamp(0.0, 1.0 - 2.0 ** -53)
        local = rows.backend.sample_rows(rows.student[mine], rows.teacher[mine], use_teacher[mine],
                                         inner.contiguous(), rows.inv_temp)
        tokens[mine] = torch.where(local >= 0, local + offset, torch.full_like(local, -1))
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM, group=group)
    return torch.where(empty, torch.full_like(tokens, -1), tokens)

"""Vocabulary-parallel ops (``process_group=``) against the unsharded ops, on this CPU with gloo.

Two kinds of tests:

* the merge of row statistics (``minillm_fast.distributed``), as pure functions in this process: split rows into
  column shards, merge the shards' statistics, compare with the statistics of the whole rows;
* 4- and 2-rank runs: one launch of 4 processes running this file as a script (``worker``; gloo, file://
  rendezvous) runs every check (``CHECKS``) on the 4-rank group, then on two 2-rank subgroups {0, 1} and {2, 3}
  at once (in {2, 3} a rank's group rank differs from its global rank: a bug that mixes them up shows there).
  Each rank compares, on the same seeded inputs, the sharded op on its columns with the unsharded op on the whole
  tensors (value, every returned field, and the rank's slice of the gradient), and the shards' outputs are also
  compared bitwise across ranks. A check never raises between collectives (failures are collected, so no rank
  leaves the others waiting); each rank writes its outcomes to a JSON report, and one pytest item per (group size,
  check) reads them. One launch rather than one per size: on this 2-core machine the processes' start-up (torch's
  import) costs more than all the checks.

Tolerances: values 2e-5 relative (float32 rounding: the sharded and unsharded ops see the same float32 inputs,
only the order of the sums differs), gradients as in the design's table for the student's dtype.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from _helpers import CPU, NEG_INF, assert_close_rel, backend_unavailable_reason, grad_tol, make_logits
from minillm_fast import _dispatch, distributed, loss, reference, sampling
from minillm_fast.backends import (C_Y, EP_D, EP_UC, EQ_D, EQ_DA, EQ_ZC, LOG_RATIO, LOGS_P, LOGS_Q, M_P, M_Q,
                                   NUM_COEFS, NUM_STATS, UA, UY, ZY)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
WORLDS = (2, 4)  # group sizes: the 4 processes of one launch, then its two 2-rank subgroups {0, 1} and {2, 3}
PROCESSES = 4
VOCAB = 1001
LEAD = (3, 7)
VALUE_TOL = 2e-5
# Column shard sizes per world size: even-ish, and uneven ones with a 1-column shard.
SPLITS = {2: [(501, 500), (1, 1000)], 4: [(251, 250, 250, 250), (300, 1, 450, 250)]}
DTYPES = [(F32, F32), (BF16, F32), (F16, BF16)]


def fast_backends() -> list[str]:
    return ["torch"] + (["cpu"] if _dispatch.is_available("cpu", CPU) else [])


def bounds_of(sizes) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


# ------------------------------------------------------------------------------------------------------------
# Inputs (identical on every rank: seeded)
# ------------------------------------------------------------------------------------------------------------

def make_inputs(seed, s_dtype, t_dtype, *, lead=LEAD, vocab=VOCAB, inf_rows=False):
    """Student and teacher logits with -inf entries: 10% of the columns in both models; row 1 -inf in both on
    its first 60% columns (whole shards empty for that row); row 4 an empty student row (masked by the ops).
    ``inf_rows``: also row 5 with teacher -inf where the student has mass (reverse KL +inf), and row 6 with
    a student -inf where the teacher has mass (forward KL +inf)."""
    gen = torch.Generator().manual_seed(seed)
    z = make_logits(gen, (*lead, vocab), F32)
    u = make_logits(gen, (*lead, vocab), F32, scale=2.5) + 0.3 * z
    zf, uf = z.view(-1, vocab), u.view(-1, vocab)
    cols = torch.rand(vocab, generator=gen) < 0.1
    cols[0] = cols[-1] = False  # the first and last ids stay finite (tests put tokens there)
    zf[:, cols] = NEG_INF
    uf[:, cols] = NEG_INF
    zf[1, : int(0.6 * vocab)] = NEG_INF
    uf[1, : int(0.6 * vocab)] = NEG_INF
    if zf.shape[0] > 4:
        zf[4] = NEG_INF
    if inf_rows:
        uf[5, 200:300] = NEG_INF
        zf[6, 700:720] = NEG_INF
    return z.to(s_dtype), u.to(t_dtype)


def make_tokens(seed, z, u, bounds):
    """Token ids at finite entries of both rows, spread over every shard, some on the shards' first and last
    columns."""
    gen = torch.Generator().manual_seed(seed + 1)
    zf, uf = z.reshape(-1, z.shape[-1]), u.reshape(-1, u.shape[-1])
    finite = (zf != NEG_INF) & (uf != NEG_INF)
    tokens = torch.zeros(zf.shape[0], dtype=torch.int64)
    edges = [b for k in bounds[1:-1] for b in (k - 1, k)]
    for r in range(zf.shape[0]):
        ok = torch.nonzero(finite[r]).flatten()
        if ok.numel() == 0:
            continue
        pick = [e for e in edges if bool(finite[r, e])]
        if pick and r % 3 == 0:
            tokens[r] = pick[(r // 3) % len(pick)]
        else:
            tokens[r] = ok[torch.randint(ok.numel(), (1,), generator=gen)].item()
    return tokens.reshape(z.shape[:-1])


# ------------------------------------------------------------------------------------------------------------
# Pure tests of the merge (no processes)
# ------------------------------------------------------------------------------------------------------------

def _stats_of_shards(backend, z, u, tokens, inv_temp, bounds):
    shards = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        local, owned = distributed.local_tokens(tokens, a, b - a)
        s = backend.row_stats(z[:, a:b].contiguous(), u[:, a:b].contiguous(), local, inv_temp)
        s[:, [ZY, UY]] = torch.where(owned[:, None], s[:, [ZY, UY]], torch.zeros_like(s[:, [ZY, UY]]))
        shards.append(s)
    return shards


def _assert_stats_close(merged, whole, valid):
    """Maxima and token logits exact; the log-sums and expectations to float32 rounding (relative to the
    row's magnitude); only rows that the ops use (both distributions nonempty)."""
    m, w = merged[valid].double(), whole[valid].double()
    for col in (M_Q, M_P, ZY, UY):
        assert torch.equal(m[:, col], w[:, col]), col
    for col in (LOGS_Q, LOGS_P, EQ_D, EQ_ZC, EP_D, EP_UC):
        finite = torch.isfinite(w[:, col])
        assert torch.equal(torch.isfinite(m[:, col]), finite) and torch.equal(m[~finite, col], w[~finite, col])
        scale = 1.0 + w[finite][:, [LOGS_Q, LOGS_P, EQ_D, EQ_ZC, EP_D, EP_UC]].abs().nan_to_num(0, 0, 0).amax(1)
        err = (m[finite, col] - w[finite, col]).abs() / scale
        assert err.max().item() < 2e-6 if err.numel() else True, (col, err.max().item())
    # the anchor: the same argmax's u' (random rows have no tied maxima) and E_q[d - d_a] to float32 rounding of
    # its own size (plus the row's, for rows where d_a ~ E_q[d]); NaN exactly where the whole rows have none
    for col in (UA, EQ_DA):
        assert torch.equal(torch.isnan(m[:, col]), torch.isnan(w[:, col])), col
    anchored = ~torch.isnan(w[:, UA])
    assert torch.equal(m[anchored, UA], w[anchored, UA])
    scale = 1e-6 * (w[anchored, EQ_DA].abs() + w[anchored][:, [EQ_D, EQ_ZC]].abs().amax(1))
    assert ((m[anchored, EQ_DA] - w[anchored, EQ_DA]).abs() <= 2 * scale).all()


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("sizes", [(1001,), (500, 501), (1, 1000), (251, 250, 250, 250), (300, 1, 450, 250),
                                   (100, 100, 100, 100, 100, 501)], ids=lambda s: "-".join(map(str, s)))
def test_merged_shard_stats_equal_the_whole_rows(backend_name, sizes):
    if not _dispatch.is_available(backend_name, CPU):
        pytest.skip(f"backend {backend_name!r} not available")
    backend = _dispatch.get_backend(backend_name, CPU)
    z, u = make_inputs(3, F32, F32, lead=(10,), inf_rows=True)
    z[7] *= 5000.0  # near one-hot rows with logits ~1e4
    u[7] = z[7] + torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    u[8] = NEG_INF  # an empty teacher row
    z[9] = NEG_INF  # an all-empty row
    u[9] = NEG_INF
    tokens = make_tokens(3, z, u, bounds_of(sizes))
    whole = backend.row_stats(z, u, tokens, 1 / 0.7)
    merged = distributed.merge_row_stats(_stats_of_shards(backend, z, u, tokens, 1 / 0.7, bounds_of(sizes)),
                                      inv_temp=1 / 0.7)
    assert merged.dtype == torch.float32 and merged.shape == (10, NUM_STATS)
    valid = (whole[:, M_Q] != NEG_INF) & (whole[:, M_P] != NEG_INF)
    assert int(valid.sum()) == 7
    _assert_stats_close(merged, whole, valid)
    # empty rows: maxima and log-sums -inf, expectations 0 (never NaN), as the ops expect of masked rows, and no
    # argmax anchor (UA = EQ_DA = NaN), nor where the reverse KL is infinite (row 5)
    assert not torch.isnan(merged[:, :UA]).any()
    assert torch.isnan(merged[[4, 5, 8, 9]][:, [UA, EQ_DA]]).all()
    assert not torch.isnan(merged[[0, 2, 3, 7]][:, [UA, EQ_DA]]).any()
    for r in (4, 8, 9):
        empty_q, empty_p = bool((z[r] == NEG_INF).all()), bool((u[r] == NEG_INF).all())
        assert (merged[r, M_Q] == NEG_INF) == empty_q and (merged[r, LOGS_Q] == NEG_INF) == empty_q
        assert (merged[r, M_P] == NEG_INF) == empty_p and (merged[r, LOGS_P] == NEG_INF) == empty_p


@pytest.mark.parametrize("backend_name", ["torch", "cpu", "triton"])
def test_shard_gradients_and_jsd_sums_from_merged_stats(backend_name):
    """The backend contract a sharded op relies on, for every backend (triton too, interpreted): ``logits_grad``,
    ``jsd_rows`` and ``jsd_grad`` of a shard, given the merged (global) statistics, are the shard's columns of the
    whole rows' gradient and partial sums that add up to the whole rows' sums."""
    reason = backend_unavailable_reason(backend_name)
    if reason is not None:
        pytest.skip(reason)
    backend = _dispatch.get_backend(backend_name, CPU)
    vocab, bounds, inv_temp, beta = 301, [0, 150, 301], 1 / 0.8, 0.3
    z, u = make_inputs(21, BF16, F32, lead=(6,), vocab=vocab)
    tokens = make_tokens(21, z, u, bounds)
    tokens[0], tokens[1] = 149, 150  # both sides of the shard edge
    gen = torch.Generator().manual_seed(21)
    coef = torch.randn(6, NUM_COEFS, generator=gen)
    whole = backend.row_stats(z, u, tokens, inv_temp)
    merged = distributed.merge_row_stats(_stats_of_shards(backend, z, u, tokens, inv_temp, bounds), inv_temp=inv_temp)
    valid = (whole[:, M_Q] != NEG_INF) & (whole[:, M_P] != NEG_INF)
    coef[~valid] = 0.0
    grad = backend.logits_grad(z, u, tokens, whole, coef, inv_temp)
    jsd = backend.jsd_rows(z, u, whole, beta, inv_temp)
    jsd_coef = coef[:, 0].contiguous()
    jsd_grad = backend.jsd_grad(z, u, whole, jsd, jsd_coef, beta, inv_temp)
    jsd_parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        zs, us = z[:, a:b].contiguous(), u[:, a:b].contiguous()
        local, owned = distributed.local_tokens(tokens, a, b - a)
        shard_grad = backend.logits_grad(zs, us, local, merged, distributed.zero_unowned_token_coef(coef, owned),
                                         inv_temp)
        assert_close_rel(shard_grad, grad[:, a:b], grad_tol(BF16), what=f"logits_grad of columns {a}:{b}")
        jsd_parts.append(backend.jsd_rows(zs, us, merged, beta, inv_temp))
    jsd_sharded = torch.stack(jsd_parts).sum(0)
    assert_close_rel(jsd_sharded[valid], jsd[valid], VALUE_TOL, what="jsd_rows summed over shards")
    for a, b in zip(bounds[:-1], bounds[1:]):
        zs, us = z[:, a:b].contiguous(), u[:, a:b].contiguous()
        assert_close_rel(backend.jsd_grad(zs, us, merged, jsd_sharded, jsd_coef, beta, inv_temp), jsd_grad[:, a:b],
                         grad_tol(BF16), what=f"jsd_grad of columns {a}:{b}")
    assert not bool((coef[:, C_Y] == 0).all())


def test_an_empty_shard_contributes_exactly_zero():
    backend = _dispatch.get_backend("torch", CPU)
    z, u = make_inputs(5, F32, F32, lead=(6,))
    z[:, :100] = NEG_INF
    u[:, :100] = NEG_INF
    shard = backend.row_stats(z[:, :100].contiguous(), u[:, :100].contiguous(), None, 1.0)
    assert torch.isnan(shard[:, EQ_D]).all()  # the backends' 0/0: must never be read
    global_max = distributed.global_maxima(distributed.max_keys(backend.row_stats(z, u, None, 1.0)))
    sums = distributed.to_partial_sums(shard, global_max, inv_temp=1.0)
    assert torch.equal(sums, torch.zeros_like(sums))


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sharded_one_hot_rows_keep_the_anchor(backend_name, temperature):
    """randn * 1e4 logits (every row exactly one-hot in float32; the float64 gradient ~0): the gradient of each
    shard from the merged statistics is the whole rows' gradient, ~0 at the argmax too, because the merge carries
    the argmax anchor across shards (distributed.py). Dropping it (UA = EQ_DA = NaN) leaves ~ulp(1e4) there,
    which the same check catches."""
    if not _dispatch.is_available(backend_name, CPU):
        pytest.skip(f"backend {backend_name!r} not available")
    backend = _dispatch.get_backend(backend_name, CPU)
    gen = torch.Generator().manual_seed(11)
    z, u = torch.randn(64, 3000, generator=gen) * 1e4, torch.randn(64, 3000, generator=gen) * 1e4
    bounds, inv_temp = [0, 700, 701, 1900, 3000], 1 / temperature
    coef = torch.zeros(64, NUM_COEFS)
    coef[:, 0] = 1.0  # the reverse KL's c_kl
    whole = backend.logits_grad(z, u, None, backend.row_stats(z, u, None, inv_temp), coef, inv_temp)
    merged = distributed.merge_row_stats(_stats_of_shards(backend, z, u, torch.zeros(64, dtype=torch.int64),
                                                          inv_temp, bounds), inv_temp=inv_temp)
    unanchored = merged.clone()
    unanchored[:, [UA, EQ_DA]] = math.nan

    def sharded_grad(stats):
        return torch.cat([backend.logits_grad(z[:, a:b].contiguous(), u[:, a:b].contiguous(), None, stats, coef,
                                              inv_temp) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    assert_close_rel(sharded_grad(merged), whole, 2e-2, abs_slack=1e-9, what="sharded one-hot gradient")
    with pytest.raises(AssertionError):
        assert_close_rel(sharded_grad(unanchored), whole, 2e-2, abs_slack=1e-9, what="without the anchor")


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_a_vanishing_shard_counts_as_unsharded(backend_name):
    """A shard whose only student entry lies 150 below the row's max (mass 0 in float32, ~1e-65 in float64) where
    the teacher is -inf: its E_q[d] is +inf, yet it adds nothing, as in the backends' kernels (which take exp in
    float32), so the merged reverse KL is the unsharded finite one, not +inf."""
    if not _dispatch.is_available(backend_name, CPU):
        pytest.skip(f"backend {backend_name!r} not available")
    backend = _dispatch.get_backend(backend_name, CPU)
    z, u = torch.full((1, 400), NEG_INF), torch.full((1, 400), NEG_INF)
    z[0, 10], z[0, 300], z[0, 301] = -150.0, 0.0, -2.0
    u[0, 300], u[0, 301] = 1.0, -1.0
    tokens = torch.tensor([301])
    whole = backend.row_stats(z, u, tokens, 1.0)
    merged = distributed.merge_row_stats(_stats_of_shards(backend, z, u, tokens, 1.0, [0, 200, 400]), inv_temp=1.0)
    assert torch.isfinite(whole[:, EQ_D]).all()
    _assert_stats_close(merged, whole, torch.ones(1, dtype=torch.bool))


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("noise", [0.1, 0.03])
def test_sharded_kl_of_close_distributions(backend_name, noise):
    """Teacher = student + noise * randn (KL ~ 5e-3, 5e-4 per row): the merged LOG_RATIO comes from the shards'
    s_q - s_p (the D column), so the sharded reverse KL, EQ_D - LOG_RATIO, keeps the unsharded accuracy (2e-5
    against float64). Taken as log S_q - log S_p of the summed shards, it was off by ~3e-5 and ~2e-4."""
    if not _dispatch.is_available(backend_name, CPU):
        pytest.skip(f"backend {backend_name!r} not available")
    backend = _dispatch.get_backend(backend_name, CPU)
    gen = torch.Generator().manual_seed(5)
    z = 2.0 * torch.randn(16, 6000, generator=gen)
    u = z + noise * torch.randn(16, 6000, generator=gen)
    inv_temp = 1 / 1.3
    merged = distributed.merge_row_stats(_stats_of_shards(backend, z, u, torch.zeros(16, dtype=torch.int64), inv_temp,
                                                          [0, 1000, 1001, 3500, 6000]), inv_temp=inv_temp)
    assert_close_rel(merged[:, EQ_D] - merged[:, LOG_RATIO],
                     reference.reverse_kl(z, u, temperature=1.3, reduction="none"), 2e-5, what="sharded reverse KL")
    assert_close_rel(merged[:, EP_D] + merged[:, LOG_RATIO],
                     reference.forward_kl(z, u, temperature=1.3, reduction="none"), 2e-5, what="sharded forward KL")


def test_merging_merged_shards_is_merging_all():
    """A merged pair is itself a valid shard: the merge is associative (to rounding), so any reduction tree
    (ring, tree, hierarchical) gives the same statistics."""
    backend = _dispatch.get_backend("torch", CPU)
    z, u = make_inputs(6, F32, F32, lead=(8,))
    tokens = make_tokens(6, z, u, [0, 300, 301, 800, VOCAB])
    inv_temp = 1 / 0.7
    parts = _stats_of_shards(backend, z, u, tokens, inv_temp, [0, 300, 301, 800, VOCAB])
    flat = distributed.merge_row_stats(parts, inv_temp=inv_temp)
    tree = distributed.merge_row_stats([distributed.merge_row_stats(parts[:2], inv_temp=inv_temp),
                                        distributed.merge_row_stats(parts[2:], inv_temp=inv_temp)], inv_temp=inv_temp)
    valid = (flat[:, M_Q] != NEG_INF) & (flat[:, M_P] != NEG_INF)
    _assert_stats_close(tree, flat, valid)


def test_local_tokens():
    local, owned = distributed.local_tokens(torch.tensor([0, 99, 100, 349, 350, 1000]), 100, 250)
    assert owned.tolist() == [False, False, True, True, False, False]
    assert local.tolist() == [0, 0, 0, 249, 0, 0]


def test_process_group_without_torch_distributed_is_a_value_error():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    z, u = make_inputs(1, F32, F32, lead=(2,))
    with pytest.raises(ValueError, match="process_group"):
        loss.reverse_kl(z, u, process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        sampling.sample_mixture(z, u, process_group=object())


# ------------------------------------------------------------------------------------------------------------
# The worker: every rank of a launch runs every check
# ------------------------------------------------------------------------------------------------------------

class Context:
    """What a check needs: the group, this rank's place, and a collector of failures (never raises)."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)  # within the group
        self.failures: list[str] = []
        self.comparisons = 0
        self.notes: dict = {}
        self._replicated: list[tuple[str, torch.Tensor]] = []

    def close(self, what, out, ref, tol, abs_slack=1e-7):
        self.comparisons += 1
        try:
            assert_close_rel(out, ref, tol, abs_slack=abs_slack, what=what)
        except AssertionError as e:
            self.failures.append(str(e))

    def true(self, ok, what):
        self.comparisons += 1
        if not ok:
            self.failures.append(what)

    def same_on_every_rank(self, what, x):
        """x (a tensor) must be bitwise identical on every rank: checked by ``finish`` (one all_gather for the
        whole check, so that the test's own collectives stay few)."""
        self._replicated.append((what, x.detach().to(torch.float64).reshape(-1)))

    def finish(self):
        """Every rank must call it once per check, whatever happened in the check."""
        sizes = torch.tensor([x.numel() for _, x in self._replicated], dtype=torch.int64)
        flat = torch.cat([sizes.to(torch.float64)] + [x for _, x in self._replicated])
        parts = [torch.empty_like(flat) for _ in range(self.world)] if self._all_same_length(flat) else None
        if parts is None:
            self.failures.append("the ranks compared different numbers of outputs")
            return
        self.dist.all_gather(parts, flat, group=self.group)
        for other in parts[1:]:
            differ = (other != parts[0]) & ~(other.isnan() & parts[0].isnan())
            if bool(differ.any()):
                first = int(differ.nonzero()[0]) - sizes.numel()
                ends = sizes.cumsum(0)
                index = int((ends <= first).sum()) if first >= 0 else -1
                what = self._replicated[index][0] if index >= 0 else "(output sizes)"
                self.failures.append(f"{what}: not identical on every rank")
                return

    def _all_same_length(self, flat):
        n = torch.tensor([flat.numel()], dtype=torch.int64)
        lengths = [torch.empty_like(n) for _ in range(self.world)]
        self.dist.all_gather(lengths, n, group=self.group)
        return all(int(x) == flat.numel() for x in lengths)

    def shard(self, x, sizes):
        b = bounds_of(sizes)
        return x[..., b[self.rank]:b[self.rank + 1]].contiguous(), b[self.rank], b[self.rank + 1]


def _fields(out):
    return out._asdict() if hasattr(out, "_asdict") else {"value": out}


def compare_op(ctx, what, fn, z, u, sizes, *, upstream=None, grad=True, grad_dtol=None, **kwargs):
    """Sharded ``fn(z_local, u_local, process_group=...)`` against ``fn(z, u)``: every output field, and this
    rank's slice of the gradient of the first field (``loss`` or the value)."""
    z_loc, a, b = ctx.shard(z, sizes)
    u_loc, _, _ = ctx.shard(u, sizes)
    z_full = z.detach().clone().requires_grad_(grad)
    z_loc = z_loc.detach().clone().requires_grad_(grad)
    ref = _fields(fn(z_full, u, **kwargs))
    out = _fields(fn(z_loc, u_loc, process_group=ctx.group, **kwargs))
    for key, value in ref.items():
        ctx.close(f"{what} [{key}]", out[key], value, VALUE_TOL)
        ctx.same_on_every_rank(f"{what} [{key}]", out[key])
    if grad:
        first = next(iter(ref))
        # (value * upstream).sum() rather than value.backward(upstream): the same gradient, without torch's import
        # of sympy on the first explicit grad_tensors (seconds per process on this machine)
        for value in (ref[first], out[first]):
            (value if upstream is None else (value * upstream).sum()).backward()
        ctx.true(z_loc.grad is not None and z_loc.grad.dtype == z.dtype and z_loc.grad.shape == z_loc.shape,
                 f"{what}: gradient missing, or wrong dtype/shape")
        if z_loc.grad is not None:
            tol = grad_dtol if grad_dtol is not None else grad_tol(z.dtype)
            ctx.close(f"{what} [grad of columns {a}:{b}]", z_loc.grad, z_full.grad[..., a:b], tol)


def check_divergences(ctx):
    gen = torch.Generator().manual_seed(11)
    mask = torch.rand(LEAD, generator=gen) < 0.75
    upstream = torch.rand(LEAD, generator=gen) * 2 - 0.5
    ops = [("reverse_kl", loss.reverse_kl, {}), ("forward_kl", loss.forward_kl, {}),
           ("jsd(0.3)", loss.jsd, {"beta": 0.3})]
    reductions = (("mean", {"mask": mask}, None), ("sum", {}, None), ("none", {"mask": mask}, upstream))
    case = 0
    for backend in fast_backends():
        for d, (s_dtype, t_dtype) in enumerate(DTYPES):
            z, u = make_inputs(100 + case, s_dtype, t_dtype)
            for k, (name, fn, extra) in enumerate(ops):
                # every reduction for every op and every dtype pair, in rotation (not the whole product: time)
                reduction, kw, up = reductions[(d + k) % 3]
                sizes = SPLITS[ctx.world][case % 2]
                tau = (0.7, 1.3)[case % 2]
                compare_op(ctx, f"{name} {backend} {s_dtype}/{t_dtype} {reduction} tau={tau} shards={sizes}",
                           fn, z, u, sizes, upstream=up, reduction=reduction, temperature=tau,
                           backend=backend, **kw, **extra)
                case += 1
    z, u = make_inputs(7, F32, F32)
    for beta in (0.0, 1.0):  # the endpoints: forward and reverse KL, sharded too
        compare_op(ctx, f"jsd(beta={beta})", loss.jsd, z, u, SPLITS[ctx.world][1], beta=beta, backend="torch")


def check_infinite_rows(ctx):
    """+inf divergences (student mass where the teacher is -inf, and the reverse): same rows, same values."""
    z, u = make_inputs(8, F32, F32, inf_rows=True)
    for backend in fast_backends():
        for name, fn in (("reverse_kl", loss.reverse_kl), ("forward_kl", loss.forward_kl)):
            for sizes in SPLITS[ctx.world]:
                compare_op(ctx, f"{name} {backend} none shards={sizes}", fn, z, u, sizes, grad=False,
                           reduction="none", backend=backend)
                ref = fn(z, u, reduction="none", backend=backend)
                ctx.true(bool(torch.isinf(ref).any()), f"{name}: the test has no +inf row")


def check_token_stats(ctx):
    case = 0
    for backend in fast_backends():
        for s_dtype, t_dtype in DTYPES:
            for alpha in (0.2, 0.5)[case % 2:][:1]:
                sizes = SPLITS[ctx.world][case % 2]
                z, u = make_inputs(200 + case, s_dtype, t_dtype, inf_rows=True)
                tokens = make_tokens(200 + case, z, u, bounds_of(sizes))
                tokens.view(-1)[2] = 0  # an id on the first rank...
                tokens.view(-1)[3] = VOCAB - 1  # ...and on the last, whatever the shard sizes
                gen = torch.Generator().manual_seed(case)
                mask = torch.rand(LEAD, generator=gen) < 0.8
                compare_op(ctx, f"token_stats {backend} {s_dtype}/{t_dtype} alpha={alpha} shards={sizes}",
                           loss.token_stats, z, u, sizes, grad=False, tokens=tokens, alpha=alpha, mask=mask,
                           temperature=(0.8, 1.0)[case % 2], backend=backend)
                case += 1
    # a token whose student logit is -inf (log q(y) = -inf, weight 0), in whichever shard holds column 777
    z, u = make_inputs(9, F32, F32)
    z.view(-1, VOCAB)[0, 777] = NEG_INF
    u.view(-1, VOCAB)[0, 777] = 1.0
    tokens = make_tokens(9, z, u, [0, VOCAB])
    tokens.view(-1)[0] = 777
    compare_op(ctx, "token_stats, token of probability 0", loss.token_stats, z, u, SPLITS[ctx.world][1], grad=False,
               tokens=tokens, backend="torch")


def _minillm_args(seed, z, u, tokens):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lq = loss.token_stats(z, u, tokens, backend="torch").student_logprob
    old = lq + 0.3 * torch.randn(LEAD, generator=gen)
    return dict(advantages=torch.randn(LEAD, generator=gen), old_logprobs=old,
                importance_weights=0.8 + 0.45 * torch.rand(LEAD, generator=gen),
                mask=torch.rand(LEAD, generator=gen) < 0.8)


def check_minillm_loss(ctx):
    case = 0
    for backend in fast_backends():
        for s_dtype, t_dtype in DTYPES:
            for single_step, num_tokens in ((True, None), (False, 40.0), (True, 40.0))[case % 3:][:1]:
                sizes = SPLITS[ctx.world][case % 2]
                z, u = make_inputs(300 + case, s_dtype, t_dtype)
                tokens = make_tokens(300 + case, z, u, bounds_of(sizes))
                compare_op(ctx, f"minillm_loss {backend} {s_dtype}/{t_dtype} single_step={single_step} "
                                f"num_tokens={num_tokens} shards={sizes}",
                           loss.minillm_loss, z, u, sizes, tokens=tokens, **_minillm_args(case, z, u, tokens),
                           single_step=single_step, num_tokens=num_tokens, temperature=(1.0, 0.9)[case % 2],
                           clip_eps=0.2, backend=backend)
                case += 1


def check_pt_loss(ctx):
    case = 0
    for backend in fast_backends():
        for s_dtype, t_dtype in DTYPES:
            for kd_ratio, num_tokens in ((0.3, None), (1.0, 30), (0.0, None))[case % 3:][:1]:
                sizes = SPLITS[ctx.world][case % 2]
                z, u = make_inputs(400 + case, s_dtype, t_dtype)
                labels = make_tokens(400 + case, z, u, bounds_of(sizes))
                gen = torch.Generator().manual_seed(case)
                labels[torch.rand(LEAD, generator=gen) < 0.2] = -100
                compare_op(ctx, f"pt_loss {backend} {s_dtype}/{t_dtype} kd_ratio={kd_ratio} shards={sizes}",
                           loss.pt_loss, z, u, sizes, labels=labels, kd_ratio=kd_ratio, num_tokens=num_tokens,
                           temperature=(1.0, 1.2)[case % 2], backend=backend)
                case += 1


def check_empty_and_nan_rows(ctx):
    sizes = SPLITS[ctx.world][1]
    z, u = make_inputs(12, F32, F32)
    nothing = torch.zeros(LEAD, dtype=torch.bool)
    for backend in fast_backends():
        for fn in (loss.reverse_kl, loss.forward_kl, loss.jsd):
            # nothing valid: 0.0 with a zero gradient, sharded too
            compare_op(ctx, f"{fn.__name__} {backend} all masked", fn, z, u, sizes, mask=nothing, backend=backend)
            # a NaN logit in one shard: NaN in that row (never dropped silently), as unsharded
            zn = z.clone()
            zn.view(-1, VOCAB)[2, 613] = math.nan
            z_loc, a, b = ctx.shard(zn, sizes)
            u_loc, _, _ = ctx.shard(u, sizes)
            ref = fn(zn, u, reduction="none", backend=backend)
            out = fn(z_loc, u_loc, reduction="none", backend=backend, process_group=ctx.group)
            ctx.true(torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(ref).any()),
                     f"{fn.__name__} {backend}: NaN rows {torch.isnan(out).nonzero().tolist()} != unsharded "
                     f"{torch.isnan(ref).nonzero().tolist()}")
            fine = ~torch.isnan(ref)
            ctx.close(f"{fn.__name__} {backend} rows without NaN", out[fine], ref[fine], VALUE_TOL)


def check_large_logits(ctx):
    """Nearly one-hot rows with logits ~1e4: loss to 2e-5, gradient finite and within 2e-2 (design table)."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(*LEAD, VOCAB, generator=gen) * 2e3
    u = z + torch.randn(*LEAD, VOCAB, generator=gen) * 3
    for backend in fast_backends():
        for k, (name, fn) in enumerate((("reverse_kl", loss.reverse_kl), ("forward_kl", loss.forward_kl),
                                        ("jsd", loss.jsd))):
            sizes = SPLITS[ctx.world][k % 2]
            compare_op(ctx, f"{name} {backend} logits ~1e4 shards={sizes}", fn, z, u, sizes, grad_dtol=2e-2,
                       backend=backend)


def check_validation(ctx):
    z, u = make_inputs(14, F32, F32)
    sizes = SPLITS[ctx.world][0]
    z_loc, _, _ = ctx.shard(z, sizes)
    u_loc, _, _ = ctx.shard(u, sizes)

    def raises(what, match, fn):
        try:
            fn()
        except ValueError as e:
            ctx.true(match in str(e), f"{what}: message {str(e)!r} does not name {match!r}")
            return
        except Exception as e:  # noqa: BLE001
            ctx.failures.append(f"{what}: raised {type(e).__name__}: {e}")
            return
        ctx.failures.append(f"{what}: no ValueError")

    # shards of different widths (before any collective, on every rank)
    raises("V_s_local != V_t_local", "teacher_logits",
           lambda: loss.reverse_kl(z_loc, u_loc[..., :-1], process_group=ctx.group))
    # token ids are global: the global vocabulary is the range, on every rank (after the offset collective)
    bad = make_tokens(14, z, u, [0, VOCAB])
    bad.view(-1)[5] = VOCAB
    raises("token == global vocabulary", f"[0, {VOCAB})",
           lambda: loss.token_stats(z_loc, u_loc, bad, process_group=ctx.group))
    raises("label < 0", "labels", lambda: loss.pt_loss(z_loc, u_loc, bad - VOCAB, process_group=ctx.group))
    raises("not a process group", "process_group", lambda: loss.forward_kl(z_loc, u_loc, process_group="world"))


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------

def check_sample_mixture(ctx):
    """The sharded draw equals the unsharded one with the same uniforms (group rank 0's generator), is the
    inverse CDF of the float64 mixture component at that uniform, and is identical on every rank."""
    n_rows, alpha, tau = 64, 0.3, 0.9
    for backend in fast_backends():
        for sizes in SPLITS[ctx.world]:
            z, u = make_inputs(15, F32, BF16, lead=(n_rows,))
            z[10] = NEG_INF  # student row empty: -1 where the student is chosen
            u[10] = NEG_INF
            z[11, : VOCAB - 3] = NEG_INF  # all the student's mass in the last shard
            ref = sampling.sample_mixture(z, u, alpha=alpha, temperature=tau, backend=backend,
                                          generator=torch.Generator().manual_seed(7))
            z_loc, _, _ = ctx.shard(z, sizes)
            u_loc, _, _ = ctx.shard(u, sizes)
            # only the first rank's generator matters
            gen = torch.Generator().manual_seed(7 if ctx.rank == 0 else 1000 + ctx.rank)
            out = sampling.sample_mixture(z_loc, u_loc, alpha=alpha, temperature=tau, backend=backend, generator=gen,
                                          process_group=ctx.group)
            what = f"sample_mixture {backend} shards={sizes}"
            ctx.same_on_every_rank(what, out)
            ctx.true(out.dtype == torch.int64 and out.shape == (n_rows,), f"{what}: dtype/shape")
            draws = torch.rand(2, n_rows, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            bad = []
            for r in range(n_rows):
                x = (u[r] if draws[0, r] < alpha else z[r]).to(torch.float64) / tau
                if bool((x == NEG_INF).all()):
                    if out[r] != -1:
                        bad.append((r, "empty row", out[r].item()))
                    continue
                probs = torch.softmax(x, 0)
                cdf = probs.cumsum(0)
                t = int(out[r])
                lo = cdf[t - 1].item() if t > 0 else 0.0
                if not (0 <= t < VOCAB and probs[t] > 0 and lo <= draws[1, r] + 1e-5 and cdf[t] >= draws[1, r] - 1e-5):
                    bad.append((r, t, draws[1, r].item(), lo, cdf[t].item() if 0 <= t < VOCAB else None))
            ctx.true(not bad, f"{what}: not the inverse CDF at the first rank's uniforms: {bad[:5]}")
            same = int((out == ref).sum())
            ctx.true(same >= n_rows - 1, f"{what}: {n_rows - same} of {n_rows} rows differ from the unsharded draw")


# --------------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------------

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv", "all_gather_object", "broadcast_object_list", "barrier", "all_reduce_coalesced")


class CountCollectives:
    """Records (name, elements, dtype) of every torch.distributed collective while active."""

    def __enter__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        self.calls, self._saved = [], []
        for module in (dist, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is None:
                    continue
                self._saved.append((module, name, original))
                setattr(module, name, self._wrap(name, original))
        return self

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple))]
            numel = sum(t.numel() for t in tensors) + sum(t.numel() for lst in lists for t in lst
                                                          if isinstance(t, torch.Tensor))
            dtype = str(tensors[0].dtype).replace("torch.", "") if tensors else "-"
            self.calls.append((name, numel, dtype))
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)


def check_communication(ctx):
    """Per op call: which collectives, how many elements; backward sends nothing; nothing grows with V."""
    n = LEAD[0] * LEAD[1]
    measured = {}
    for vocab in (VOCAB, 4 * VOCAB):
        sizes = [vocab // ctx.world] * (ctx.world - 1)
        sizes.append(vocab - sum(sizes))
        z, u = make_inputs(16, F32, F32, vocab=vocab)
        tokens = make_tokens(16, z, u, bounds_of(sizes))
        z_loc, _, _ = ctx.shard(z, sizes)
        u_loc, _, _ = ctx.shard(u, sizes)
        args = _minillm_args(16, z, u, tokens)
        calls = {
            "reverse_kl": lambda x: loss.reverse_kl(x, u_loc, process_group=ctx.group),
            "forward_kl": lambda x: loss.forward_kl(x, u_loc, process_group=ctx.group),
            "jsd": lambda x: loss.jsd(x, u_loc, beta=0.4, process_group=ctx.group),
            "token_stats": lambda x: loss.token_stats(x, u_loc, tokens, process_group=ctx.group).reverse_kl.sum(),
            "minillm_loss": lambda x: loss.minillm_loss(x, u_loc, tokens, **args, process_group=ctx.group).loss,
            "pt_loss": lambda x: loss.pt_loss(x, u_loc, tokens, process_group=ctx.group).loss,
            "sample_mixture": lambda x: sampling.sample_mixture(x, u_loc, process_group=ctx.group).sum(),
        }
        for name, call in calls.items():
            x = z_loc.clone().requires_grad_(name not in ("token_stats", "sample_mixture"))
            with CountCollectives() as forward:
                value = call(x)
            with CountCollectives() as backward:
                if value.requires_grad:
                    value.backward()
            measured.setdefault(name, {})[vocab] = forward.calls
            ctx.true(not backward.calls, f"{name}: backward communicates: {backward.calls}")
    w = ctx.world
    expected = {
        "reverse_kl": [("all_reduce", 2 * n, "int64"), ("all_reduce", 8 * n, "float32")],
        "forward_kl": [("all_reduce", 2 * n, "int64"), ("all_reduce", 8 * n, "float32")],
        "jsd": [("all_reduce", 2 * n, "int64"), ("all_reduce", 8 * n, "float32"), ("all_reduce", 2 * n, "float32")],
        "sample_mixture": [("all_reduce", (2 + 4 * w) * n + w, "float64"), ("all_reduce", n, "int64")],
    }
    for name in ("token_stats", "minillm_loss", "pt_loss"):
        expected[name] = [("all_reduce", w, "int64"), ("all_reduce", 2 * n, "int64"),
                          ("all_reduce", 10 * n, "float32")]
    for name, by_vocab in measured.items():
        small, big = by_vocab[VOCAB], by_vocab[4 * VOCAB]
        ctx.true(small == big, f"{name}: communication depends on the vocabulary: {small} vs {big}")
        ctx.true([tuple(c) for c in small] == expected[name], f"{name}: collectives {small} != {expected[name]}")
    ctx.notes["communication"] = {name: by_vocab[VOCAB] for name, by_vocab in measured.items()}
    ctx.notes["rows"] = n


def check_fused_linear(ctx):
    """The fused-linear twins with lm_head weights (and biases) sharded along the vocabulary: values, this rank's
    weight and bias gradient rows, and the hidden states' gradient (all-reduced: every rank holds all of them),
    with blocks of a few rows so that every block's merge runs."""
    _check_fused_linear(ctx, "auto", ("reverse_kl", "jsd", "minillm_loss", "pt_loss", "token_stats"))


def check_fused_linear_on_chip(ctx):
    """The same on the on-chip kernels (backend="triton", interpreted): their statistics merged across ranks, the
    token terms of the rows whose token another rank holds dropped (skipped where Triton cannot run)."""
    if backend_unavailable_reason("triton") is None:
        _check_fused_linear(ctx, "triton", ("reverse_kl", "jsd", "minillm_loss", "token_stats"))


def _check_fused_linear(ctx, backend, names):
    from minillm_fast import fused_linear
    saved = fused_linear.MAX_BLOCK_BYTES
    fused_linear.MAX_BLOCK_BYTES = 6 * VOCAB * fused_linear.BYTES_PER_LOGIT  # 6-row blocks (uneven last one)
    options = {"reverse_kl": {}, "jsd": {"beta": 0.4}, "minillm_loss": {}, "pt_loss": {}, "token_stats": {}}
    try:
        for case, (name, extra) in enumerate((name, options[name]) for name in names):
            sizes = SPLITS[ctx.world][case % 2]
            b = bounds_of(sizes)
            lo, hi = b[ctx.rank], b[ctx.rank + 1]
            gen = torch.Generator().manual_seed(700 + case)
            hs, ht = torch.randn(*LEAD, 12, generator=gen), torch.randn(*LEAD, 9, generator=gen)
            ws, wt = torch.randn(VOCAB, 12, generator=gen) * 0.4, torch.randn(VOCAB, 9, generator=gen) * 0.4
            bias = torch.randn(VOCAB, generator=gen)
            tokens = torch.randint(0, VOCAB, LEAD, generator=gen)
            args, kwargs = [], {"softcap": (8.0, None), "temperature": 1.3, "backend": backend, **extra}
            if name == "minillm_loss":
                z, u = hs @ ws.T + bias, ht @ wt.T
                args = [tokens, *(_minillm_args(case, (8.0 * torch.tanh(z / 8.0)), u, tokens)[k]
                                  for k in ("advantages", "old_logprobs", "importance_weights"))]
                kwargs["mask"] = torch.rand(LEAD, generator=gen) < 0.8
            elif name == "pt_loss":
                args = [torch.where(torch.rand(LEAD, generator=gen) < 0.2, -100, tokens)]
            elif name == "token_stats":
                args = [tokens]
            else:
                kwargs["mask"] = torch.rand(LEAD, generator=gen) < 0.8
            fn = getattr(loss, "fused_linear_" + name)
            full = [x.clone().requires_grad_(name != "token_stats") for x in (hs, ws, bias)]
            mine = [hs.clone(), ws[lo:hi].clone(), bias[lo:hi].clone()]
            mine = [x.requires_grad_(name != "token_stats") for x in mine]
            ref = _fields(fn(full[0], full[1], ht, wt, *args, student_bias=full[2], **kwargs))
            out = _fields(fn(mine[0], mine[1], ht, wt[lo:hi].contiguous(), *args, student_bias=mine[2],
                             process_group=ctx.group, **kwargs))
            what = f"fused_linear_{name} backend={backend} shards={sizes}"
            for key, value in ref.items():
                ctx.close(f"{what} [{key}]", out[key], value, VALUE_TOL)
                ctx.same_on_every_rank(f"{what} [{key}]", out[key])
            if name != "token_stats":
                first = next(iter(ref))
                ref[first].backward()
                out[first].backward()
                for label, got, want in (("hidden", mine[0].grad, full[0].grad),
                                         ("weight rows", mine[1].grad, full[1].grad[lo:hi]),
                                         ("bias", mine[2].grad, full[2].grad[lo:hi])):
                    ctx.close(f"{what} [grad of {label}]", got, want, grad_tol(F32))
    finally:
        fused_linear.MAX_BLOCK_BYTES = saved


CHECKS = {f.__name__[len("check_"):]: f for f in (
    check_divergences, check_infinite_rows, check_token_stats, check_minillm_loss, check_pt_loss,
    check_empty_and_nan_rows, check_large_logits, check_validation, check_sample_mixture, check_communication,
    check_fused_linear, check_fused_linear_on_chip)}


def run_checks(group) -> dict:
    report = {}
    for name, check in CHECKS.items():
        ctx = Context(group)
        start = time.perf_counter()
        try:
            check(ctx)
        except Exception:  # noqa: BLE001  (an exception inside an op: reported, the other checks still run)
            ctx.failures.append(traceback.format_exc())
        ctx.finish()
        report[name] = {"failures": ctx.failures, "comparisons": ctx.comparisons, "notes": ctx.notes,
                        "seconds": round(time.perf_counter() - start, 3)}
    return report


def worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of the PROCESSES ranks: every check on the whole group, then on two 2-rank subgroups at once."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=PROCESSES,
                            timeout=timedelta(seconds=120))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    report = {4: run_checks(dist.group.WORLD), 2: run_checks(pairs[rank // 2])}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# The launches and the tests that read their reports
# ------------------------------------------------------------------------------------------------------------

def launch(work: Path) -> list[subprocess.Popen]:
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([repo, str(Path(__file__).parent)]
                                          + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    work.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, __file__, str(rank), str(work / "rendezvous"), str(work)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for rank in range(PROCESSES)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{world size: [report of each rank]} (for 2: the ranks of both subgroups), or the processes' output if one
    failed."""
    work = tmp_path_factory.mktemp("vocab_parallel")
    procs, logs = launch(work), []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            logs.append(proc.communicate()[0] + "\n[killed after 300 s]")
    if any(p.returncode != 0 for p in procs):
        failed = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{log[-4000:]}"
                           for r, (p, log) in enumerate(zip(procs, logs)))
        return {world: failed for world in WORLDS}
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    return {world: [r[str(world)] for r in ranks] for world in WORLDS}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_op_equals_unsharded(reports, world, check):
    if check == "fused_linear_on_chip" and backend_unavailable_reason("triton"):
        pytest.skip(backend_unavailable_reason("triton"))
    ranks = reports[world]
    assert not isinstance(ranks, str), f"the launch failed:\n{ranks}"
    for rank, report in enumerate(ranks):
        result = report[check]
        assert result["comparisons"] > 0 or result["failures"], f"rank {rank}: {check} compared nothing"
        assert not result["failures"], f"process {rank}, {world}-rank group: " + "\n".join(result["failures"][:8])


if __name__ == "__main__":
    rank_, init_file_, out_dir_ = sys.argv[1:4]
    worker(int(rank_), init_file_, out_dir_)

"""reverse_kl, forward_kl and jsd on every backend against the float64 reference (values and gradients).

Each test draws fresh random logits (seeded per test), rounds them to the tested dtype, and compares the library
with ``minillm_fast.reference`` evaluated in float64 on the same rounded inputs, using the design's criterion
||out - ref|| <= tol ||ref|| + slack and the tolerances of its accuracy table.
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from minillm_fast import loss, reference
from _helpers import (NEG_INF, assert_close_rel, grad_tol, lib_value_and_grad, loss_tol, make_logits,
                      ref_value_and_grad, seeded_mask, upstream_weight)

OPS = {
    "reverse_kl": (loss.reverse_kl, reference.reverse_kl),
    "forward_kl": (loss.forward_kl, reference.forward_kl),
    "jsd_0.5": (partial(loss.jsd, beta=0.5), partial(reference.jsd, beta=0.5)),
    "jsd_0.1": (partial(loss.jsd, beta=0.1), partial(reference.jsd, beta=0.1)),
    "jsd_0.9": (partial(loss.jsd, beta=0.9), partial(reference.jsd, beta=0.9)),
}
OP_NAMES = list(OPS)
FEW_OPS = ["reverse_kl", "forward_kl", "jsd_0.5"]

DTYPE_PAIRS = {  # student / teacher
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16": (torch.float16, torch.float16),
    "bf16/f32": (torch.bfloat16, torch.float32),
    "f32/f16": (torch.float32, torch.float16),
    "f16/bf16": (torch.float16, torch.bfloat16),
}


def vocab_for(backend, big=1000, small=257):
    """Triton runs under the (slow) interpreter: keep its rows short."""
    return small if backend == "triton" else big


def check_op(op, backend, z, u, *, tol_loss=None, tol_grad=None, upstream=None, abs_slack=1e-7, **kwargs):
    """Library vs reference, value and student gradient; returns (value, grad) of the library. ``abs_slack``: the
    criterion's absolute term (the default 1e-7 would hide errors of values that are themselves ~1e-5)."""
    fn, ref_fn = OPS[op]
    kwargs.setdefault("reduction", "none")
    if upstream is None and kwargs["reduction"] == "none":
        upstream = upstream_weight(torch.Generator().manual_seed(z.numel()), z.shape[:-1])
    lib_kwargs = dict(kwargs, backend=backend)
    out, grad = lib_value_and_grad(fn, z, u, upstream=upstream, **lib_kwargs)
    ref, ref_grad = ref_value_and_grad(ref_fn, z, u, upstream=upstream, **kwargs)
    assert_close_rel(out, ref, tol_loss if tol_loss is not None else loss_tol(z.dtype, u.dtype), abs_slack,
                     what=f"{op} value")
    assert_close_rel(grad, ref_grad, tol_grad if tol_grad is not None else grad_tol(z.dtype), abs_slack,
                     what=f"{op} gradient")
    return out, grad


# ----------------------------------------------------------------------------------------------------------
# dtypes, reductions, temperatures, masks
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(dtypes=["f32", "bf16", "f16/bf16"])
@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS))
@pytest.mark.parametrize("op", OP_NAMES)
def test_matches_reference_every_dtype(backend, op, dtypes, gen):
    dz, du = DTYPE_PAIRS[dtypes]
    v = vocab_for(backend)
    z = make_logits(gen, (2, 4, v), dz)
    u = make_logits(gen, (2, 4, v), du)
    mask = seeded_mask(gen, (2, 4))
    out, grad = check_op(op, backend, z, u, mask=mask)
    assert out.shape == (2, 4)
    assert (out[~mask] == 0).all(), "masked positions must be exactly 0 with reduction='none'"
    assert (grad[~mask] == 0).all(), "masked positions must get exactly zero gradient"


@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.5"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_reductions(backend, op, reduction, gen):
    n, v = 8, vocab_for(backend)
    z, u = make_logits(gen, (n, v)), make_logits(gen, (n, v))
    mask = seeded_mask(gen, (n,))
    upstream = upstream_weight(gen, (n,)) if reduction == "none" else torch.tensor(-1.7)
    out, _ = check_op(op, backend, z, u, mask=mask, reduction=reduction, upstream=upstream)
    per_row = OPS[op][0](z, u, mask=mask, reduction="none", backend=backend)
    if reduction == "mean":
        assert out.shape == ()
        torch.testing.assert_close(out, per_row.sum() / mask.sum(), rtol=1e-6, atol=1e-7)
    elif reduction == "sum":
        assert out.shape == ()
        torch.testing.assert_close(out, per_row.sum(), rtol=1e-6, atol=1e-7)
    else:
        assert out.shape == (n,)


@pytest.mark.triton_subset(op=["reverse_kl", "forward_kl", "jsd_0.5"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.3])
@pytest.mark.parametrize("op", OP_NAMES)
def test_temperatures(backend, op, temperature, gen):
    v = vocab_for(backend)
    z, u = make_logits(gen, (6, v), scale=3.0), make_logits(gen, (6, v), scale=3.0)
    check_op(op, backend, z, u, temperature=temperature, mask=seeded_mask(gen, (6,)))


@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.5"])
@pytest.mark.parametrize("offset,temperature", [(-1000.0, 2.7), (700.0, 0.37), (3e4, 1.3)])
@pytest.mark.parametrize("op", OP_NAMES)
def test_temperature_with_logits_far_from_zero(backend, op, offset, temperature, gen):
    """Logits offset by a common ~1e3 (the same distributions) at tau != 1. Scaling first, fl(z / tau), rounds each
    logit at ulp(|z / tau|) (3e-5 at -1000 / 2.7, 1e-3 at 3e4 / 1.3) before the max is subtracted: gradients were
    off by ~2e-4 relative and more. Centred on the raw max first, (z - m) / tau, nothing is rounded at that scale."""
    v = vocab_for(backend, 1000, 257)
    z = offset + 3.0 * torch.randn(6, v, generator=gen)
    u = offset + 3.0 * torch.randn(6, v, generator=gen)
    check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=1e-4, temperature=temperature)


@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5"])
def test_temperature_applies_to_both_rows(backend, op, gen):
    """tau divides student AND teacher: loss(z, u, tau) == loss(z / tau, u / tau, 1) (exact powers of two)."""
    v = vocab_for(backend, 300, 64)
    z, u = make_logits(gen, (5, v)), make_logits(gen, (5, v))
    fn = OPS[op][0]
    a = fn(z, u, temperature=2.0, reduction="none", backend=backend)
    b = fn(z / 2.0, u / 2.0, temperature=1.0, reduction="none", backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.5"], mask_kind=["bool"])
@pytest.mark.parametrize("mask_kind", ["bool", "long", "float", "all_true", "none"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_masks(backend, op, mask_kind, gen):
    v = vocab_for(backend, 300, 100)
    z, u = make_logits(gen, (3, 5, v)), make_logits(gen, (3, 5, v))
    bool_mask = seeded_mask(gen, (3, 5), 0.5)
    mask = {"bool": bool_mask, "long": bool_mask.long(), "float": bool_mask.float(),
            "all_true": torch.ones(3, 5, dtype=torch.bool), "none": None}[mask_kind]
    ref_mask = None if mask is None else (mask != 0)
    fn, ref_fn = OPS[op]
    for reduction in ("none", "mean", "sum"):
        up = upstream_weight(gen, (3, 5)) if reduction == "none" else None
        out, grad = lib_value_and_grad(fn, z, u, mask=mask, reduction=reduction, backend=backend, upstream=up)
        ref, ref_grad = ref_value_and_grad(ref_fn, z, u, mask=ref_mask, reduction=reduction, upstream=up)
        assert_close_rel(out, ref, loss_tol(torch.float32), what=f"{reduction} value")
        assert_close_rel(grad, ref_grad, grad_tol(torch.float32), what=f"{reduction} gradient")
        if ref_mask is not None:
            assert (grad[~ref_mask] == 0).all()
    if mask_kind == "all_true":
        no_mask = fn(z, u, mask=None, backend=backend)
        torch.testing.assert_close(fn(z, u, mask=mask, backend=backend), no_mask, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# JSD endpoints and KL directions
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta,same_as", [(0.0, "forward_kl"), (0, "forward_kl"), (1.0, "reverse_kl"),
                                          (1, "reverse_kl")])
def test_jsd_endpoints_are_the_kls(backend, beta, same_as, gen):
    """jsd(beta=0) is defined as forward_kl and jsd(beta=1) as reverse_kl (the formula itself tends to 0)."""
    v = vocab_for(backend, 200, 50)
    z, u = make_logits(gen, (6, v), scale=3.0), make_logits(gen, (6, v), scale=3.0)
    mask = seeded_mask(gen, (6,))
    up = upstream_weight(gen, (6,))
    out, grad = lib_value_and_grad(loss.jsd, z, u, beta=beta, mask=mask, reduction="none", backend=backend,
                                   upstream=up)
    kl, kl_grad = lib_value_and_grad(getattr(loss, same_as), z, u, mask=mask, reduction="none", backend=backend,
                                     upstream=up)
    torch.testing.assert_close(out, kl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, kl_grad, rtol=1e-6, atol=1e-8)
    ref, ref_grad = ref_value_and_grad(getattr(reference, same_as), z, u, mask=mask, reduction="none", upstream=up)
    assert_close_rel(out, ref, 2e-5)
    assert_close_rel(grad, ref_grad, 1e-4)
    assert (out[mask] > 1e-3).all(), "an endpoint must be a KL, not the (vanishing) JSD formula"


def test_jsd_near_endpoints_is_the_formula(backend, gen):
    """Just inside (0, 1) the generalised JSD formula applies and is small, unlike the endpoint KLs."""
    z, u = make_logits(gen, (4, 40), scale=3.0), make_logits(gen, (4, 40), scale=3.0)
    for beta, kl in ((1e-3, loss.forward_kl), (1 - 1e-3, loss.reverse_kl)):
        out = loss.jsd(z, u, beta=beta, reduction="none", backend=backend)
        ref = reference.jsd(z, u, beta=beta, reduction="none")
        assert_close_rel(out, ref, 1e-4)
        assert (out < 0.05 * kl(z, u, reduction="none", backend=backend)).all()


def test_kl_directions_by_hand(backend):
    """Two-token example worked by hand: q = (1/4, 3/4), p = (1/2, 1/2)."""
    z = torch.tensor([[0.0, math.log(3.0)]])
    u = torch.tensor([[5.0, 5.0]])
    q, p = torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    rev = (q * (q / p).log()).sum()
    fwd = (p * (p / q).log()).sum()
    m = 0.3 * p + 0.7 * q
    js = 0.3 * (p * (p / m).log()).sum() + 0.7 * (q * (q / m).log()).sum()
    torch.testing.assert_close(loss.reverse_kl(z, u, backend=backend).double(), rev, rtol=2e-5, atol=0)
    torch.testing.assert_close(loss.forward_kl(z, u, backend=backend).double(), fwd, rtol=2e-5, atol=0)
    torch.testing.assert_close(loss.jsd(z, u, beta=0.3, backend=backend).double(), js, rtol=2e-5, atol=0)
    # temperature 2: q = softmax(z / 2) = (1, sqrt 3) / (1 + sqrt 3)
    q2 = torch.tensor([1.0, math.sqrt(3.0)], dtype=torch.float64) / (1 + math.sqrt(3.0))
    rev2 = (q2 * (q2 / p).log()).sum()
    torch.testing.assert_close(loss.reverse_kl(z, u, temperature=2.0, backend=backend).double(), rev2, rtol=2e-5,
                               atol=0)
    # gradient of the reverse KL, by the formula of the algorithm page: q * (log q - log p - KL) / tau
    zz = z.clone().requires_grad_(True)
    loss.reverse_kl(zz, u, backend=backend).backward()
    want = q * ((q / p).log() - rev)
    torch.testing.assert_close(zz.grad[0].double(), want, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Padded vocabularies
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(op=["reverse_kl"])
@pytest.mark.parametrize("vs,vt", [(130, 117), (117, 130), (152, 151), (1, 9)])
@pytest.mark.parametrize("op", OP_NAMES)
def test_padded_vocabulary(backend, op, vs, vt, gen):
    z, u = make_logits(gen, (2, 3, vs)), make_logits(gen, (2, 3, vt))
    mask = seeded_mask(gen, (2, 3))
    _, grad = check_op(op, backend, z, u, mask=mask)
    v = min(vs, vt)
    assert (grad[..., v:] == 0).all(), "student columns beyond min(V_s, V_t) must get exactly zero gradient"
    # Whatever sits in the columns beyond the shared vocabulary is ignored.
    z2, u2 = z.clone(), u.clone()
    z2[..., v:] = 1e4
    u2[..., v:] = -1e4
    fn = OPS[op][0]
    torch.testing.assert_close(fn(z2, u2, mask=mask, reduction="none", backend=backend),
                               fn(z, u, mask=mask, reduction="none", backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("dtypes", ["bf16/f32", "f16"])
def test_padded_vocabulary_low_precision(backend, dtypes, gen):
    dz, du = DTYPE_PAIRS[dtypes]
    z, u = make_logits(gen, (5, 160), dz), make_logits(gen, (5, 152), du)
    _, grad = check_op("reverse_kl", backend, z, u)
    assert grad.dtype == dz and (grad[:, 152:] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# -inf entries, empty rows, nothing valid
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(dtypes=["f32", "bf16/f32"])
@pytest.mark.parametrize("dtypes", ["f32", "bf16/f32", "f16"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_neg_inf_at_the_same_positions(backend, op, dtypes, gen):
    """Masked vocabulary entries (-inf in both rows) carry no mass: 0 log 0 = 0 and zero gradient there."""
    dz, du = DTYPE_PAIRS[dtypes]
    n, v = 6, vocab_for(backend, 400, 120)
    z, u = make_logits(gen, (n, v), dz), make_logits(gen, (n, v), du)
    banned = torch.rand(n, v, generator=gen) < 0.3
    banned[:, 3] = True  # a whole column masked
    banned[0, :-1] = True  # a row with one live entry: q = p = one-hot, every divergence is 0
    z[banned], u[banned] = NEG_INF, NEG_INF
    out, grad = check_op(op, backend, z, u, mask=seeded_mask(gen, (n,), 0.8))
    assert (grad[banned] == 0).all()
    assert out[0].abs() <= 1e-6  # q = p = one-hot


@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5"])
def test_student_only_neg_inf_entries(backend, op, gen):
    """-inf in the student only: reverse KL and JSD stay finite, forward KL is +inf (not NaN) on those rows."""
    n, v = 5, vocab_for(backend, 300, 90)
    z, u = make_logits(gen, (n, v)), make_logits(gen, (n, v))
    z[1:3, 10:20] = NEG_INF
    fn, ref_fn = OPS[op]
    out = fn(z, u, reduction="none", backend=backend)
    ref = ref_fn(z, u, reduction="none")
    if op == "forward_kl":
        assert torch.isposinf(out[1:3]).all() and torch.isposinf(ref[1:3]).all()
    else:
        assert torch.isfinite(out).all()
        check_op(op, backend, z, u)
    assert_close_rel(out, ref, 2e-5)


@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5"])
def test_teacher_only_neg_inf_entries(backend, op, gen):
    """-inf in the teacher where the student has mass: reverse KL is +inf (documented), never NaN; forward KL
    and JSD stay finite. Masking the infinite rows gives a finite mean with the reference's gradient."""
    n, v = 5, vocab_for(backend, 300, 90)
    z, u = make_logits(gen, (n, v)), make_logits(gen, (n, v))
    u[1:3, 10:20] = NEG_INF
    fn, ref_fn = OPS[op]
    out = fn(z, u, reduction="none", backend=backend)
    ref = ref_fn(z, u, reduction="none")
    assert not torch.isnan(out).any()
    assert_close_rel(out, ref, 2e-5)
    if op == "reverse_kl":
        assert torch.isposinf(out[1:3]).all()
        assert torch.isposinf(fn(z, u, reduction="mean", backend=backend))
        assert torch.isposinf(fn(z, u, reduction="sum", backend=backend))
        mask = torch.tensor([True, False, False, True, True])
        out_m, grad_m = check_op(op, backend, z, u, mask=mask, reduction="mean")
        assert torch.isfinite(out_m) and torch.isfinite(grad_m).all() and (grad_m[1:3] == 0).all()
    else:
        assert torch.isfinite(out).all()
        check_op(op, backend, z, u)


@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.5"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_rows_are_masked(backend, op, gen):
    """Rows whose student or teacher logits are all -inf are treated as masked: 0 and not counted, zero
    gradient, and no NaN anywhere (they must not poison the batch mean)."""
    n, v = 7, vocab_for(backend, 200, 70)
    z, u = make_logits(gen, (n, v)), make_logits(gen, (n, v))
    z[1] = NEG_INF                      # empty student
    u[3] = NEG_INF                      # empty teacher
    z[5], u[5] = NEG_INF, NEG_INF       # both empty
    empty = torch.zeros(n, dtype=torch.bool)
    empty[[1, 3, 5]] = True
    fn = OPS[op][0]
    out, grad = check_op(op, backend, z, u)
    assert (out[empty] == 0).all()
    assert (grad[empty] == 0).all()
    for reduction in ("mean", "sum"):
        value, grad = check_op(op, backend, z, u, reduction=reduction)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        assert (grad[empty] == 0).all()
    per_row = fn(z, u, reduction="none", backend=backend)
    torch.testing.assert_close(fn(z, u, reduction="mean", backend=backend), per_row[~empty].mean(),
                               rtol=1e-6, atol=1e-7)


def test_empty_over_the_shared_vocabulary(backend, gen):
    """A student row that is -inf over the shared columns is empty even if its padding columns are finite."""
    z, u = make_logits(gen, (3, 40)), make_logits(gen, (3, 32))
    z[1, :32] = NEG_INF
    out, grad = check_op("reverse_kl", backend, z, u)
    assert out[1] == 0 and (grad[1] == 0).all()


@pytest.mark.triton_subset(how=["mask", "empty_rows"], op=["reverse_kl", "jsd_0.5"])
@pytest.mark.parametrize("how", ["mask", "empty_rows", "zero_rows"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_mean_with_nothing_valid_is_zero(backend, op, how, gen):
    """mean over no valid position is 0.0 (not NaN), and backward() through it gives a zero gradient."""
    fn = OPS[op][0]
    if how == "zero_rows":
        z, u, mask = torch.zeros(0, 11), torch.zeros(0, 11), None
    else:
        z, u = make_logits(gen, (2, 3, 11)), make_logits(gen, (2, 3, 11))
        mask = torch.zeros(2, 3, dtype=torch.bool)
        if how == "empty_rows":
            z[0], u[1], mask = NEG_INF, NEG_INF, None
    for reduction in ("mean", "sum"):
        zz = z.clone().requires_grad_(True)
        out = fn(zz, u, mask=mask, reduction=reduction, backend=backend)
        assert out.dtype == torch.float32 and out.shape == ()
        assert out.item() == 0.0
        out.backward()
        assert zz.grad is not None and zz.grad.dtype == z.dtype
        assert (zz.grad == 0).all(), "zero gradient expected (and no NaN)"
    out = fn(z, u, mask=mask, reduction="none", backend=backend)
    assert out.shape == z.shape[:-1] and (out == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Extreme logits
# ----------------------------------------------------------------------------------------------------------

def _nearly_one_hot(gen, n, v, base, gap, top):
    """Rows of magnitude ~|base| whose entry ``top`` leads the others by at least ``gap``."""
    base = torch.as_tensor(base, dtype=torch.float64).reshape(-1, 1).expand(n, 1)
    x = base - gap - 4.0 * torch.rand(n, v, generator=gen, dtype=torch.float64)
    x[torch.arange(n), top] = base[:, 0]
    return x.to(torch.float32)


@pytest.mark.triton_subset(op=["reverse_kl", "forward_kl", "jsd_0.5"])
@pytest.mark.parametrize("base", [1e4, -1e4])
@pytest.mark.parametrize("op", OP_NAMES)
def test_nearly_one_hot_extreme_logits(backend, op, base, gen):
    """Design table: nearly one-hot rows with logits ~1e4: loss to 2e-5, gradient finite and within 2e-2."""
    n, v = 8, vocab_for(backend, 500, 200)
    top = torch.randint(0, v, (n,), generator=gen)
    z = _nearly_one_hot(gen, n, v, base, 8.0, top)
    u = _nearly_one_hot(gen, n, v, base + (torch.rand(n, 1, generator=gen) * 4 - 2).to(torch.float64), 6.0, top)
    # Rows 0-1: the teacher prefers another token (large divergences); rows 2+: same mode (small ones).
    u[0], u[1] = u[0].roll(7), u[1].roll(-3)
    out, grad = check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=2e-2)
    assert torch.isfinite(grad).all()
    mean, grad_mean = check_op(op, backend, z, u, reduction="mean", tol_loss=2e-5, tol_grad=2e-2)
    assert torch.isfinite(grad_mean).all()


@pytest.mark.parametrize("op", OP_NAMES)
def test_exactly_one_hot_extreme_logits(backend, op, gen):
    """Logits ~ +-1e4 apart: each softmax is exactly one-hot in float32; no NaN from exp(-huge) or inf - inf."""
    n, v = 6, vocab_for(backend, 300, 100)
    z = (torch.randn(n, v, generator=gen) * 1e4)
    u = (torch.randn(n, v, generator=gen) * 1e4)
    u[:3] = z[:3] + torch.randn(3, v, generator=gen)  # same mode for half the rows
    out, grad = check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=2e-2)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("scale", [1e4, 3e3])
@pytest.mark.parametrize("op", ["reverse_kl", "jsd_0.5"])
def test_one_hot_rows_gradient_at_the_argmax(backend, op, scale, gen, monkeypatch):
    """randn * 1e4 logits: every row exactly (or all but exactly) one-hot in float32, the float64 gradient ~0 or
    tiny. The reverse-KL gradient at the argmax, q_a (d_a - E_q[d]), must not come out as an ulp of |d_a| ~ 1e4
    (the online sums round d_a at each max shift): the backends anchor E_q[d] at the argmax. V = 5000 spans
    several blocks of the CPU kernels (their maxima move after the argmax's block); with 64 rows the unanchored
    formula missed in 1 to 9 rows of every draw tried (seeds 0-4, cpu backend; triton, 32 rows of 600 in blocks of
    128: in 7 of 8 draws). Tolerance: the design's 2e-2 with an
    absolute slack of 1e-9 instead of the usual 1e-7 (the float64 reference itself rounds the gradient at the
    argmax at ~2^-52 |d_a|)."""
    n, v, cases = 64, 5000, [(1.0, "none"), (1.0, "mean"), (0.7, "none"), (0.7, "mean")]
    if backend == "triton":  # the interpreter is slow: shorter rows in as many blocks, fewer cases
        from minillm_fast.backends import triton_backend
        monkeypatch.setattr(triton_backend, "CONFIG", {k: (128, 4) for k in triton_backend.CONFIG})
        n, v, cases = 32, 600, [(0.7, "none")]
    z = torch.randn(n, v, generator=gen) * scale
    u = torch.randn(n, v, generator=gen) * scale
    fn, ref_fn = OPS[op]
    for temperature, reduction in cases:
        kwargs = dict(temperature=temperature, reduction=reduction)
        upstream = torch.ones(n) if reduction == "none" else None
        out, grad = lib_value_and_grad(fn, z, u, upstream=upstream, backend=backend, **kwargs)
        ref, ref_grad = ref_value_and_grad(ref_fn, z, u, upstream=upstream, **kwargs)
        assert_close_rel(out, ref, 2e-5, what=f"{op} value T={temperature} {reduction}")
        assert_close_rel(grad, ref_grad, 2e-2, abs_slack=1e-9, what=f"{op} gradient T={temperature} {reduction}")


@pytest.mark.parametrize("op", ["jsd_0.1", "jsd_0.5", "jsd_0.9"])
def test_jsd_of_close_distributions(backend, op, gen):
    """Student ~ teacher (correlation 0.99, V = 32003): the JSD is ~1e-3 per row. Its terms come from the log-ratio
    log p - log q of the centred logits; taken as log q - log m from two log-probabilities each rounded at
    ulp(|log q|) ~ 1e-6, they carried a bias of ~4e-7 per row that no reduction averages out (relative error
    4.8e-4 at beta = 0.1 on cpu and torch; 3.5e-6 now)."""
    n, v = 8, vocab_for(backend, 32003, 600)
    z = torch.randn(n, v, generator=gen)
    u = 0.99 * z + math.sqrt(1 - 0.99 ** 2) * torch.randn(n, v, generator=gen)
    for reduction in ("none", "mean"):
        check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=1e-4, abs_slack=1e-15, reduction=reduction)


@pytest.mark.parametrize("op", ["jsd_0.1", "jsd_0.5", "jsd_0.9"])
@pytest.mark.parametrize("noise", [0.03, 0.01])
def test_jsd_of_very_close_distributions(backend, op, noise, gen):
    """Teacher = student + noise * randn: JSD ~ beta (1 - beta) noise^2 / 2 per row (4e-5 to 1e-4, 4e-6 to 1e-5).
    g = log q - log m ~ -beta r and h ~ (1 - beta) r (r = log p - log q) were formed as -c - L, differences of two
    numbers near log 2, rounded at ~6e-8 absolute: 1e-4 relative at noise 0.03 and 8e-4 at 0.01 on cpu and torch.
    Taken as -log1p(beta expm1(r)) and -log1p((1 - beta) expm1(-r)) where |r| < 1/2: ~1e-6 and ~5e-6."""
    n, v = 16, vocab_for(backend, 32000, 600)
    z = 2.0 * torch.randn(n, v, generator=gen)
    u = z + noise * torch.randn(n, v, generator=gen)
    for reduction in ("none", "mean"):
        check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=1e-4, abs_slack=1e-15, reduction=reduction)


@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("noise", [0.1, 0.03])
def test_kl_of_close_distributions(backend, op, noise, gen):
    """Teacher = student + noise * randn: KL ~ noise^2 / 2 per row (5e-3, 5e-4). KL = E_q[d] - log(s_q / s_p) with
    the log-ratio taken from LOGS_Q - LOGS_P, each rounded to float32 at ulp(log s) ~ 5e-7, was off by 3e-5 and
    4e-4 relative; from LOG_RATIO (log1p of s_q - s_p summed entry by entry) by ~1e-6 and ~1e-5 on cpu, torch and
    triton (cuda, through its emulator: ~6e-6 and ~6e-5, README)."""
    n, v = 16, vocab_for(backend, 32000, 600)
    z = 2.0 * torch.randn(n, v, generator=gen)
    u = z + noise * torch.randn(n, v, generator=gen)
    for reduction in ("none", "mean"):
        check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=1e-4, reduction=reduction)


@pytest.mark.parametrize("op", ["jsd_0.1", "jsd_0.5", "jsd_0.9"])
@pytest.mark.parametrize("scale", [10.0, 30.0])
def test_jsd_of_a_student_peaked_where_the_teacher_is_not(backend, op, scale, gen):
    """Independent logits ~ scale * randn: the student's mass sits almost all on its argmax a, where the teacher's
    is ~0, so the gradient there, q_a (g_a - E_q[g]) = -q_a E_q[g - g_a], is far below ulp(|g_a|) ~ 6e-8 (the
    gradient's norm is ~1e-6 at scale 10, ~1e-8 at scale 30 and T = 2). Formed as g_a - E_q[g] from two rounded
    numbers it was off by 1e-3 to 1 relative (~1e-9 absolute: hidden by the usual 1e-7 slack, hence none here);
    taken relative to the anchor, with g - g_a = L_a - L on the log(1 - beta) branch, it is within 1e-5."""
    n, v = 8, vocab_for(backend, 3001, 300)
    z, u = scale * torch.randn(n, v, generator=gen), scale * torch.randn(n, v, generator=gen)
    kwargs = dict(temperature=2.0 if scale == 30.0 else 1.0, reduction="none")
    upstream = upstream_weight(torch.Generator().manual_seed(3), (n,))
    fn, ref_fn = OPS[op]
    out, grad = lib_value_and_grad(fn, z, u, upstream=upstream, backend=backend, **kwargs)
    ref, ref_grad = ref_value_and_grad(ref_fn, z, u, upstream=upstream, **kwargs)
    assert_close_rel(out, ref, 2e-5, what=f"{op} value")
    assert_close_rel(grad, ref_grad, 1e-4, abs_slack=1e-15, what=f"{op} gradient")


@pytest.mark.parametrize("op", FEW_OPS)
def test_vanishing_mass_against_neg_inf_before_or_after_the_max(backend, op, monkeypatch):
    """An entry 2000 below the row's max (its mass underflows even in float64) where the other model is -inf
    contributes nothing, in an earlier block than the max or a later one. The cpu kernels once rescaled such a
    block's +inf cross sum by exp(-2000) = 0 and returned NaN; an entry 150 below the max (mass ~1e-65: +inf in
    float64, 0 in float32) must count the same wherever it lies."""
    v = 4096
    if backend == "triton":  # short rows in several blocks
        from minillm_fast.backends import triton_backend
        monkeypatch.setattr(triton_backend, "CONFIG", {k: (128, 4) for k in triton_backend.CONFIG})
        v = 600
    values = {}
    for gap in (2000.0, 150.0):
        for col in (10, v - 10):
            z, u = torch.full((2, v), NEG_INF), torch.full((2, v), NEG_INF)
            z[:, v // 2], u[:, v // 2] = 0.0, 1.0  # the maxima
            z[:, v // 2 + 7], u[:, v // 2 + 7] = -3.0, -2.0
            z[0, col] = -gap  # student mass that vanishes where the teacher is -inf
            u[1, col] = 1.0 - gap  # teacher mass that vanishes where the student is -inf (forward KL)
            if gap == 2000.0:
                out, grad = check_op(op, backend, z, u, tol_loss=2e-5, tol_grad=1e-4)
            else:
                fn = OPS[op][0]
                out, grad = lib_value_and_grad(fn, z, u, upstream=torch.ones(2), backend=backend, reduction="none")
            assert not torch.isnan(out).any() and not torch.isnan(grad).any(), (gap, col, out)
            values[gap, col] = out
    assert torch.equal(values[150.0, 10], values[150.0, v - 10])


@pytest.mark.triton_subset(op=["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("offsets", [(0.0, 1e4), (1e4, 0.0), (-1e4, 1e4)], ids=["teacher+1e4", "student+1e4",
                                                                                "opposite"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_large_logit_offsets(backend, op, offsets, gen):
    """Logits ~1e4 that are not one-hot: softmax is shift-invariant, so an offset between the student's and the
    teacher's logits must not cost precision (the algorithm page: keep the shifted logits apart from the log of
    the sum). Ordinary float32 accuracy: loss 2e-5, gradient 1e-4."""
    n, v = 8, vocab_for(backend, 1000, 200)
    z = make_logits(gen, (n, v), offset=offsets[0])
    u = make_logits(gen, (n, v), offset=offsets[1])
    check_op(op, backend, z, u)


@pytest.mark.triton_subset(op=["reverse_kl", "forward_kl", "jsd_0.5"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_identical_distributions_with_offset_logits(backend, op, gen):
    """Teacher logits = student logits + a constant: the same distribution, so every divergence is 0 (and never
    negative). Found by the property tests: computing E_q[z' - u'] - (m_q - m_p) cancels at the offset's
    magnitude and returns KL < 0."""
    n, v = 6, vocab_for(backend, 300, 64)
    z = make_logits(gen, (n, v), scale=3.0)
    offsets = torch.tensor([0.0, 7.0, -21.0, 34.6856, 52.0, -80.0])[:, None]
    u = z + offsets  # exact enough: the rounding of z + c moves p by ~1e-7, so KL ~ 1e-14
    for temperature in (0.5, 1.0):
        out = OPS[op][0](z, u, temperature=temperature, reduction="none", backend=backend)
        ref = OPS[op][1](z, u, temperature=temperature, reduction="none")
        assert ref.abs().max() < 1e-9
        assert (out >= -1e-6).all(), f"negative divergence: {out.tolist()}"
        assert out.abs().max() <= 1e-6, out.tolist()
    # Uniform rows at different levels: exactly the same (uniform) distribution.
    z = torch.full((4, 24), 0.0)
    u = torch.tensor([[-34.6856], [22.0], [18.587], [-31.0]]).expand(4, 24)
    out = OPS[op][0](z, u, temperature=0.5, reduction="none", backend=backend)
    assert out.abs().max() <= 1e-6, out.tolist()


# ----------------------------------------------------------------------------------------------------------
# Vocabulary sizes, leading shapes, memory layouts
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.5"])
@pytest.mark.parametrize("v", [1, 2, 7, 31, 32003])
@pytest.mark.parametrize("op", OP_NAMES)
def test_odd_vocabulary_sizes(backend, op, v, gen):
    n = 2 if (v > 1000 and backend == "triton") else 5
    z, u = make_logits(gen, (n, v)), make_logits(gen, (n, v))
    out, grad = check_op(op, backend, z, u)
    if v == 1:  # one token: q = p = 1, every divergence is 0
        assert out.abs().max() <= 1e-6 and grad.abs().max() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("op", OP_NAMES)
def test_vocabulary_128256(fast_backend, op, gen):
    z, u = make_logits(gen, (2, 128256), torch.bfloat16), make_logits(gen, (2, 128256), torch.float32)
    check_op(op, fast_backend, z, u)
    z, u = make_logits(gen, (2, 128256)), make_logits(gen, (2, 128256))
    check_op(op, fast_backend, z, u, reduction="mean")


@pytest.mark.slow
@pytest.mark.triton
def test_vocabulary_128256_triton(gen):
    from _helpers import backend_unavailable_reason
    reason = backend_unavailable_reason("triton")
    if reason:
        pytest.skip(reason)
    z, u = make_logits(gen, (1, 128256)), make_logits(gen, (1, 128256))
    check_op("reverse_kl", "triton", z, u)


@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.5"])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3), (2, 1, 3)], ids=["1d", "n1", "2x3", "2x1x3"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_leading_shapes(backend, op, lead, gen):
    v = 37
    z, u = make_logits(gen, (*lead, v)), make_logits(gen, (*lead, v))
    mask = seeded_mask(gen, lead) if lead else torch.tensor(True)
    out, _ = check_op(op, backend, z, u, mask=mask, upstream=upstream_weight(gen, lead))
    assert out.shape == lead
    check_op(op, backend, z, u, mask=mask, reduction="mean")


LAYOUTS = ["transposed", "column_slice", "row_step", "permuted_3d", "expanded_teacher", "expanded_student"]


def _layout(kind, gen, n, v, dtype=torch.float32):
    """(student leaf, student view [.., V], teacher view) for a non-contiguous layout."""
    if kind == "transposed":
        leaf = make_logits(gen, (v, n), dtype).requires_grad_(True)
        return leaf, leaf.t(), make_logits(gen, (v, n), dtype).t()
    if kind == "column_slice":
        leaf = make_logits(gen, (n, v + 9), dtype).requires_grad_(True)
        return leaf, leaf[:, 4:4 + v], make_logits(gen, (n, v + 5), dtype)[:, :v]
    if kind == "row_step":
        leaf = make_logits(gen, (2 * n, v), dtype).requires_grad_(True)
        return leaf, leaf[::2], make_logits(gen, (3 * n, v), dtype)[1::3]
    if kind == "permuted_3d":
        leaf = make_logits(gen, (2, v, n), dtype).requires_grad_(True)
        return leaf, leaf.transpose(1, 2), make_logits(gen, (n, 2, v), dtype).transpose(0, 1)
    if kind == "expanded_teacher":
        leaf = make_logits(gen, (n, v), dtype).requires_grad_(True)
        return leaf, leaf, make_logits(gen, (1, v), dtype).expand(n, v)
    if kind == "expanded_student":
        leaf = make_logits(gen, (1, v), dtype).requires_grad_(True)
        return leaf, leaf.expand(n, v), make_logits(gen, (n, v), dtype)
    raise AssertionError(kind)


@pytest.mark.triton_subset(op=["reverse_kl"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OP_NAMES)
def test_non_contiguous_inputs(backend, op, layout, gen):
    n, v = 6, 53
    leaf, z, u = _layout(layout, gen, n, v)
    assert not (z.is_contiguous() and u.is_contiguous())
    up = upstream_weight(gen, z.shape[:-1])
    fn, ref_fn = OPS[op]
    out = fn(z, u, reduction="none", backend=backend)
    out.backward(up)
    leaf64 = leaf.detach().double().requires_grad_(True)
    z64 = {"transposed": lambda x: x.t(), "column_slice": lambda x: x[:, 4:4 + v], "row_step": lambda x: x[::2],
           "permuted_3d": lambda x: x.transpose(1, 2), "expanded_teacher": lambda x: x,
           "expanded_student": lambda x: x.expand(n, v)}[layout](leaf64)
    ref = ref_fn(z64, u, reduction="none")
    ref.backward(up.double())
    assert_close_rel(out, ref, 2e-5, what="value")
    assert_close_rel(leaf.grad, leaf64.grad, 1e-4, what="gradient")
    # And the same as on contiguous copies.
    torch.testing.assert_close(out, fn(z.detach().contiguous(), u.contiguous(), reduction="none", backend=backend),
                               rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Autograd contract
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5"])
def test_autograd_contract(backend, op, gen):
    """float32 loss, gradient in the student's dtype, nothing for the teacher; no graph without grad."""
    fn = OPS[op][0]
    teacher_leaf = make_logits(gen, (4, 33)).requires_grad_(True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        z = make_logits(gen, (4, 33), dtype).requires_grad_(True)
        out = fn(z, teacher_leaf.detach().to(torch.bfloat16), backend=backend)
        assert out.dtype == torch.float32 and out.requires_grad
        out.backward()
        assert z.grad.dtype == dtype
    assert teacher_leaf.grad is None
    # A student that does not require grad, or no_grad mode: a plain value, no graph.
    z = make_logits(gen, (4, 33))
    assert not fn(z, teacher_leaf.detach(), backend=backend).requires_grad
    with torch.no_grad():
        zz = z.clone().requires_grad_(True)
        assert not fn(zz, teacher_leaf.detach(), backend=backend).requires_grad


def test_gradient_accumulates_and_graph_composes(backend, gen):
    """The loss is an ordinary autograd node: it composes with other ops and accumulates into .grad."""
    w = make_logits(gen, (16, 40)).requires_grad_(True)
    h = make_logits(gen, (5, 16))
    u = make_logits(gen, (5, 40))
    total = 2.0 * loss.reverse_kl(h @ w, u, backend=backend) + loss.forward_kl(h @ w, u, backend=backend)
    total.backward()
    w64 = w.detach().double().requires_grad_(True)
    ref = 2.0 * reference.reverse_kl(h.double() @ w64, u) + reference.forward_kl(h.double() @ w64, u)
    ref.backward()
    assert_close_rel(total.detach(), ref.detach(), 2e-5)
    assert_close_rel(w.grad, w64.grad, 1e-4)
    before = w.grad.clone()
    loss.reverse_kl(h @ w, u, backend=backend).backward()
    assert not torch.equal(before, w.grad)

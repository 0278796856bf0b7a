"""Helpers shared by the test modules (``from _helpers import ...``): backend availability, random inputs, the
design's accuracy criterion and tolerances, and value + gradient of reference and library ops."""
from __future__ import annotations

import importlib.util
import math
import os

import torch

from minillm_fast import _dispatch

ALL_BACKENDS = ("torch", "cpu", "triton")
CPU = torch.device("cpu")
NEG_INF = -math.inf
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------

def backend_unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run on CPU tensors here, else why not."""
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "TRITON_INTERPRET is not 1: the triton backend cannot run on CPU tensors"
        if importlib.util.find_spec("minillm_fast.backends.triton_backend") is None:
            return "minillm_fast/backends/triton_backend.py does not exist (yet)"
    if not _dispatch.is_available(name, CPU):
        return f"backend {name!r} is not available for CPU tensors (see minillm_fast's RuntimeWarning)"
    if name == "cpu":
        missing = missing_cpu_kernels()
        if missing:  # reported as a failure by test_backends.py::test_available_cpu_backend_has_its_kernels
            return f"the cpu extension loads but registers no CPU kernel for {missing}"
    return None


def missing_cpu_kernels() -> list[str]:
    """Operators of torch.ops.minillm_fast without a CPU kernel (after loading the cpu extension)."""
    from minillm_fast._library import SCHEMAS
    return [op for op in SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"minillm_fast::{op}", "CPU")]


def available_cpu_backends() -> list[str]:
    return [b for b in ALL_BACKENDS if backend_unavailable_reason(b) is None]


# ----------------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------------

def make_logits(gen, shape, dtype=torch.float32, scale=2.0, offset=0.0):
    """Random logits (normal, std ``scale``) rounded to ``dtype``; the reference sees the rounded values."""
    return (torch.randn(tuple(shape), generator=gen) * scale + offset).to(dtype)


def seeded_mask(gen, shape, frac_valid=0.7, ensure_one=True) -> torch.Tensor:
    m = torch.rand(tuple(shape), generator=gen) < frac_valid
    if ensure_one and m.numel():
        m.view(-1)[0] = True
    return m


def upstream_weight(gen, shape) -> torch.Tensor:
    """A random upstream gradient for reduction="none" (signed, so that rows are not all weighted alike)."""
    return torch.rand(tuple(shape), generator=gen) * 2 - 0.5


# ----------------------------------------------------------------------------------------------------------
# Accuracy criteria (docs/design.md)
# ----------------------------------------------------------------------------------------------------------

LOW_PRECISION_GRAD_EXTRA = {torch.bfloat16: 6e-3, torch.float16: 2e-3}


def loss_tol(*dtypes) -> float:
    """Losses and per-token statistics: 2e-5 for float32 inputs, 1e-4 when an input is bf16/fp16."""
    return 2e-5 if all(d == torch.float32 for d in dtypes) else 1e-4


def grad_tol(dtype) -> float:
    """Student gradient: 1e-4 in float32; in bf16/fp16 the rounding of the gradient's own dtype (unit roundoff
    eps/2: 2^-8 for bf16, 2^-11 for fp16) plus 6e-3 (bf16) / 2e-3 (fp16)."""
    if dtype == torch.float32:
        return 1e-4
    return torch.finfo(dtype).eps / 2 + LOW_PRECISION_GRAD_EXTRA[dtype]


def assert_close_rel(out, ref, tol, abs_slack=1e-7, what="value"):
    """The design's criterion ||out - ref|| <= tol * ||ref|| + abs_slack, over the finite entries of ``ref``.

    Infinities must match exactly (same positions and signs); any NaN in ``out`` fails.
    """
    out = torch.as_tensor(out).detach().to(torch.float64).cpu()
    ref = torch.as_tensor(ref).detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(ref).any(), f"{what}: the reference itself has NaN (test bug)"
    n_nan = int(torch.isnan(out).sum())
    assert n_nan == 0, f"{what}: {n_nan} NaN value(s) in the output (the reference has none)"
    ref_inf, out_inf = torch.isinf(ref), torch.isinf(out)
    assert torch.equal(out_inf, ref_inf) and torch.equal(out[ref_inf], ref[ref_inf]), (
        f"{what}: infinities differ: out {out[ref_inf | out_inf].tolist()} vs ref {ref[ref_inf | out_inf].tolist()}")
    finite = ~ref_inf
    diff = out[finite] - ref[finite]
    err, scale = diff.norm().item(), ref[finite].norm().item()
    bound = tol * scale + abs_slack
    assert err <= bound, (
        f"{what}: ||out - ref|| = {err:.3e} > {tol:.1e} * ||ref|| ({scale:.3e}) + {abs_slack:.0e} = {bound:.3e} "
        f"(relative error {err / max(scale, 1e-300):.3e}, max abs diff "
        f"{diff.abs().max().item() if diff.numel() else 0.0:.3e})")


# ----------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------

def invalid_rows(student, teacher, mask=None) -> torch.Tensor:
    """Positions the ops treat as masked: mask False, or an empty (all -inf) student or teacher row over the
    shared vocabulary."""
    v = min(student.shape[-1], teacher.shape[-1])
    empty = (student[..., :v] == NEG_INF).all(-1) | (teacher[..., :v] == NEG_INF).all(-1)
    return empty if mask is None else empty | (mask == 0)


FINITE_NEG = -1e300  # stands in for -inf when differentiating the reference: exp(-1e300 - m) == 0 exactly


def finite_surrogate(x: torch.Tensor) -> torch.Tensor:
    """float64 copy with -inf replaced by -1e300 (same zero probability, but differentiable without NaN)."""
    x = x.detach().to(torch.float64)
    return torch.where(x == NEG_INF, torch.full_like(x, FINITE_NEG), x)


def ref_value_and_grad(ref_fn, student, teacher, *args, upstream=None, mask=None, **kwargs):
    """(value, d(sum value * upstream)/d student) of a float64 reference op on the (already rounded) inputs.

    The value is the reference's own. For the gradient, autograd through -inf entries gives NaN
    (logaddexp(-inf, -inf), 0 * inf), so it is taken with -inf replaced by -1e300 (which has exactly the same
    zero mass in float64) and with the dropped rows (masked or empty, whose gradient is zero by definition)
    passed as masked."""
    value = ref_fn(student.detach().to(torch.float64), teacher.detach(), *args, mask=mask, **kwargs)
    keep = ~invalid_rows(student, teacher, mask)
    z = finite_surrogate(student).requires_grad_(True)
    u = finite_surrogate(teacher)
    surrogate = ref_fn(z, u, *args, mask=keep, **kwargs)
    surrogate.backward(None if upstream is None else upstream.detach().to(torch.float64))
    grad = z.grad if z.grad is not None else torch.zeros_like(z)
    grad = torch.where(keep[..., None], grad, torch.zeros_like(grad))
    assert not torch.isnan(grad).any(), "the reference gradient has NaN (test bug)"
    return value.detach(), grad


def lib_value_and_grad(fn, student, teacher, *args, upstream=None, **kwargs):
    """(value, student gradient) of a library op; checks the dtype contract (float32 loss, gradient in the
    student's dtype and shape) and that the teacher receives nothing."""
    z = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach()
    value = fn(z, teacher, *args, **kwargs)
    assert value.dtype == torch.float32, f"loss dtype {value.dtype}, expected float32"
    value.backward(upstream)
    assert z.grad is not None, "no gradient reached the student logits"
    assert z.grad.dtype == student.dtype, f"gradient dtype {z.grad.dtype} != student dtype {student.dtype}"
    assert z.grad.shape == student.shape
    assert teacher.grad is None
    return value.detach(), z.grad

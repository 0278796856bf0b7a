"""The fused-linear twins (``loss.fused_linear_*``): hidden states and lm_head weights in, no [N, V] logits.

Oracles:

* the float64 reference (``minillm_fast.reference``) applied to logits computed in float64 from the same (already
  rounded) hidden states, weights and biases, ``z = softcap * tanh(logit_scale * (h @ W.T + b) / softcap)``, with
  the design's tolerances: values, and gradients with respect to the student's hidden states, weight and bias;
* the logits ops (``loss.<op>``) on float32 logits built by autograd from the same inputs (consistency: a fused
  op is documented to return exactly ``loss.<op>`` of those logits).

Then every option (biases, soft-capping, logit scale, temperature, masks, reductions, padded vocabularies,
H_s != H_t, leading shapes, odd sizes, many blocks, -inf, extreme logits, frozen tensors, num_tokens, single_step,
ignore_index, gradient accumulation, no_grad, double backward), argument validation, and the memory claim
(measured in a child process from its peak RSS). The option tests run on every backend (``fused_backend``): the
blocked path on torch and cpu, the on-chip kernels on triton (interpreted). Last, the blocked path's CUDA variant
for bf16/fp16 weights (16-bit matmuls, the logit gradient pulled back once per group of blocks), run on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch

from minillm_fast import fused_linear, loss, reference
from minillm_fast.backends import torch_backend
from _helpers import (NEG_INF, assert_close_rel, backend_unavailable_reason, grad_tol, loss_tol, seeded_mask,
                      upstream_weight)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name), id=name)
                        for name in ("torch", "cpu", "triton")])
def fused_backend(request):
    """Every backend a fused-linear op runs on here: the blocked path on ``torch`` and ``cpu``, the on-chip kernels
    on ``triton`` (interpreted; tiny shapes, so the whole matrix stays cheap). Unavailable ones are skipped."""
    reason = backend_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _module_setup(request, tmp_path_factory):
    """The shapes here are tiny: intra-op threads only add overhead, and on a shared machine their spin-waits
    made these tests 20x slower. Also starts the memory measurement's child process (when a memory test is
    selected) so that it runs on the other core while the rest of the module runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    module = sys.modules[__name__]
    if any(getattr(item, "module", None) is module and item.originalname.startswith("test_memory")
           for item in request.session.items):
        _start_memory_child(tmp_path_factory)
    yield
    torch.set_num_threads(before)
    proc = _MEMORY_CHILD.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Head:
    """One model's last hidden states and lm_head."""

    hidden: torch.Tensor  # [..., H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None

    def tensors(self):
        return (self.hidden, self.weight, self.bias)


def make_head(gen, lead, hidden_size, vocab, dtype=F32, *, bias=False, scale=2.0) -> Head:
    """Random head whose logits have a standard deviation of about ``scale`` (h ~ N(0, 1), W ~ N(0, scale^2 / H)),
    rounded to ``dtype``: the reference sees the rounded values."""
    h = torch.randn(*lead, hidden_size, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden_size, generator=gen) * (scale / math.sqrt(hidden_size))).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    return Head(h, w, b)


def per_model(option):
    """A fused-linear option (``softcap``, ``logit_scale``) as a (student, teacher) pair."""
    return tuple(option) if isinstance(option, (tuple, list)) else (option, option)


def head_logits(hidden, weight, bias, logit_scale, softcap, dtype):
    """``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` in ``dtype``, differentiable.

    -inf bias entries become -1e300 (the same zero probability in float64, but differentiable without NaN; in
    float32 they stay -inf, as the logits op accepts them)."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        b = bias.to(dtype)
        if dtype == torch.float64:
            b = torch.where(torch.isneginf(b.detach()), torch.full_like(b, -1e300), b)
        z = z + b
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


# ----------------------------------------------------------------------------------------------------------
# The ops, their logits versions and their references, behind one calling convention
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    kind: str  # "div" (reverse_kl, forward_kl, jsd), "stats", "minillm" or "pt"
    fused: Callable
    logits: Callable
    ref: Callable


def _jsd(beta):
    return Op("div", partial(loss.fused_linear_jsd, beta=beta), partial(loss.jsd, beta=beta),
              partial(reference.jsd, beta=beta))


OPS = {
    "reverse_kl": Op("div", loss.fused_linear_reverse_kl, loss.reverse_kl, reference.reverse_kl),
    "forward_kl": Op("div", loss.fused_linear_forward_kl, loss.forward_kl, reference.forward_kl),
    "jsd_0": _jsd(0.0),
    "jsd_0.3": _jsd(0.3),
    "jsd_0.5": _jsd(0.5),
    "jsd_1": _jsd(1.0),
    "token_stats": Op("stats", loss.fused_linear_token_stats, loss.token_stats, reference.token_stats),
    "minillm": Op("minillm", loss.fused_linear_minillm_loss, loss.minillm_loss, reference.minillm_loss),
    "pt": Op("pt", loss.fused_linear_pt_loss, loss.pt_loss, reference.pt_loss),
}
GRAD_OPS = ["reverse_kl", "forward_kl", "jsd_0", "jsd_0.3", "jsd_0.5", "jsd_1", "minillm", "pt"]
DIV_OPS = ["reverse_kl", "forward_kl", "jsd_0", "jsd_0.3", "jsd_0.5", "jsd_1"]


def make_aux(op: Op, gen, lead, vocab, z_ref, *, mask=None, temperature=1.0, ignore_index=-100,
             token_pool=None) -> tuple:
    """The op's per-position positional arguments: tokens / (tokens, advantages, old_logprobs,
    importance_weights) / labels, drawn from ``token_pool`` (default: the shared vocabulary). MiniLLM's old
    log-probs are the reference's plus noise, so that some ratios are clipped and some are not."""
    if token_pool is None:
        tokens = torch.randint(0, vocab, tuple(lead), generator=gen)
    else:
        tokens = token_pool[torch.randint(0, len(token_pool), tuple(lead), generator=gen)]
    if op.kind == "stats":
        return (tokens,)
    if op.kind == "minillm":
        logq = reference.log_softmax(z_ref, temperature, vocab).gather(-1, tokens[..., None]).squeeze(-1)
        old = (logq + 0.3 * torch.randn(tuple(lead), generator=gen, dtype=torch.float64)).float()
        advantages = torch.randn(tuple(lead), generator=gen)
        weights = 0.5 + torch.rand(tuple(lead), generator=gen)
        return tokens, advantages, old, weights
    if op.kind == "pt":
        labels = tokens if mask is None else torch.where(mask.bool(), tokens, torch.full_like(tokens, ignore_index))
        return (labels,)
    return ()


def op_kwargs(op: Op, kw: dict, *, fused: bool) -> dict:
    """The keyword arguments this op takes: pt's labels carry the mask; only divergences have a reduction."""
    kw = dict(kw)
    if op.kind == "pt":
        kw.pop("mask", None)
    if op.kind != "div":
        assert kw.pop("reduction", "mean") == "mean", "test bug: only divergences take a reduction"
    if not fused:
        for key in ("softcap", "logit_scale", "student_bias", "teacher_bias"):
            kw.pop(key, None)
    if op.kind != "minillm":
        for key in ("single_step", "clip_eps"):
            assert key not in kw, f"test bug: {key} is a minillm_loss option"
    return kw


def outputs(op: Op, result):
    """(the value carrying the gradient or None, {field: tensor})."""
    if op.kind == "div":
        return result, {"value": result}
    fields = result._asdict() if hasattr(result, "_asdict") else dict(result)
    return (None if op.kind == "stats" else fields["loss"]), fields


def call_fused(op: Op, s: Head, t: Head, aux, **kw):
    result = op.fused(s.hidden, s.weight, t.hidden, t.weight, *aux, student_bias=s.bias, teacher_bias=t.bias,
                      **op_kwargs(op, kw, fused=True))
    return outputs(op, result)


def leaves(head: Head, needs, dtype=None) -> Head:
    """Fresh leaf copies (``dtype``: converted first), requiring grad where ``needs`` says so."""
    return Head(*(None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_(bool(need))
                  for x, need in zip(head.tensors(), needs)))


def grads_of(head: Head):
    return tuple(None if x is None else x.grad for x in head.tensors())


@dataclass
class Result:
    value: torch.Tensor | None
    out: dict
    student: Head  # the leaves, with .grad
    teacher: Head
    aux: tuple
    upstream: torch.Tensor | None


def run_fused(op_name, s: Head, t: Head, aux, *, needs=(True, True, True), upstream=None, **kw) -> Result:
    """Value and student gradients of a fused op on fresh leaves."""
    op = OPS[op_name]
    student, teacher = leaves(s, needs), leaves(t, (False, False, False))
    value, out = call_fused(op, student, teacher, aux, **kw)
    for name, x in out.items():
        assert x.dtype == F32, f"{name}: dtype {x.dtype}, expected float32"
    if value is not None and value.requires_grad:
        value.backward(upstream)
    for x in teacher.tensors():
        assert x is None or x.grad is None
    return Result(value, out, student, teacher, aux, upstream)


def check_fused(op_name, backend, s: Head, t: Head, *, gen, needs=(True, True, True), softcap=None,
                logit_scale=None, upstream=None, compare_logits_op=False, tol_loss=None, tol_grad=None,
                token_pool=None, float32_slack=False, **kw) -> Result:
    """The fused op against the float64 reference (and optionally the logits op): values and the gradients
    with respect to every student tensor that requires grad (None for the others).

    ``float32_slack``: each tolerance (values and gradients) grows by twice the relative error of the plain
    float32 logits path (float32 matmuls and autograd, the torch backend's logits op): the part of the error that
    float32 matmuls cause whatever their order (the forward's logits |z| 2^-24 off, the pull-back summing over V
    terms), large where the gradients nearly cancel (logits ~1e4, nearly one-hot rows). The gradients also get an
    absolute slack (``rounding_slack``): one-pass kernels hold E_q[d] (d = centred z - centred u, |d| up to ~2e4
    there) as online sums whose max shifts round it by a unit in |d|'s last place, so an exactly one-hot row's logit
    gradient q_y (d_y - E_q[d]) is that unit instead of 0 (the algorithm page: it "cancels strongly in float32
    whatever you do")."""
    op = OPS[op_name]
    (cap_s, cap_t), (scale_s, scale_t) = per_model(softcap), per_model(logit_scale)
    lead, vocab = s.hidden.shape[:-1], min(s.weight.shape[0], t.weight.shape[0])
    if kw.get("reduction") == "none" and upstream is None:
        upstream = upstream_weight(gen, lead)

    # Reference: float64 logits from the rounded inputs, float64 op, autograd.
    s64 = leaves(s, needs, torch.float64)
    t64 = leaves(t, (False, False, False), torch.float64)
    z64 = head_logits(*s64.tensors(), scale_s, cap_s, torch.float64)
    u64 = head_logits(*t64.tensors(), scale_t, cap_t, torch.float64)
    aux = make_aux(op, gen, lead, vocab, z64.detach(), mask=kw.get("mask"), temperature=kw.get("temperature", 1.0),
                   ignore_index=kw.get("ignore_index", -100), token_pool=token_pool)
    ref_value, ref_out = outputs(op, op.ref(z64, u64, *aux, **op_kwargs(op, kw, fused=False)))
    if ref_value is not None and ref_value.requires_grad:
        ref_value.backward(None if upstream is None else upstream.to(torch.float64))

    if float32_slack:
        float32 = leaves(s, needs)
        z32 = head_logits(*float32.tensors(), scale_s, cap_s, F32)
        with torch.no_grad():
            u32 = head_logits(*t.tensors(), scale_t, cap_t, F32)
        value, out32 = outputs(op, op.logits(z32, u32, *aux, backend="torch", **op_kwargs(op, kw, fused=False)))
        loss_slack = {name: 2 * float(relative_error(out32[name], ref)) for name, ref in ref_out.items()}
        value.backward(upstream)
        changes = [relative_error(x.grad, y.grad) for x, y in zip(float32.tensors(), s64.tensors())
                   if x is not None and x.grad is not None]
        tol_grad = (tol_grad if tol_grad is not None else grad_tol(s.hidden.dtype)) + 2 * float(max(changes))
        abs_slack = rounding_slack(s64, z64.detach(), u64, kw.get("temperature", 1.0))
    else:
        abs_slack, loss_slack = None, {}
    res = run_fused(op_name, s, t, aux, needs=needs, upstream=upstream, softcap=softcap, logit_scale=logit_scale,
                    backend=backend, **kw)
    default_tol = loss_tol(s.hidden.dtype, t.hidden.dtype)
    if not isinstance(tol_loss, dict):
        tol_loss = {} if tol_loss is None else {name: tol_loss for name in ref_out}
    assert set(res.out) == set(ref_out), f"fields {sorted(res.out)} != reference {sorted(ref_out)}"
    for name in ref_out:
        assert_close_rel(res.out[name], ref_out[name], tol_loss.get(name, default_tol) + loss_slack.get(name, 0.0),
                         what=f"{op_name} {name}")
    check_grads(res, s64, needs, tol_grad, what=f"{op_name} vs reference", abs_slack=abs_slack)
    if compare_logits_op:
        check_against_logits_op(op_name, backend, s, t, res, needs=needs, softcap=softcap, logit_scale=logit_scale,
                                **kw)
    return res


def relative_error(out, ref) -> torch.Tensor:
    """||out - ref|| / ||ref|| in float64 (0-safe), detached."""
    ref = ref.detach().double()
    return (out.detach().double() - ref).norm() / ref.norm().clamp(min=1e-300)


def rounding_slack(s64: Head, z64, u64, temperature) -> tuple:
    """Absolute slacks (hidden, weight, bias) for ``check_fused(float32_slack=True)``: per row, a logit-gradient
    error eps_r = 4 max_v |d_rv| 2^-23 (4 to 8 units in the last place; d = centred z' - centred u', z' = z / tau)
    divided by the row count and by tau (mean reduction, d/dz = d/dz' / tau), landing on one vocabulary entry;
    pulled back through the head: ||eps|| max_v ||W_v|| for the hidden states, sum_r eps_r ||h_r|| for the weight
    and sum_r eps_r for the bias."""
    z = (z64 / temperature).reshape(-1, z64.shape[-1])
    u = (u64 / temperature).reshape(-1, u64.shape[-1])
    width = min(z.shape[-1], u.shape[-1])
    d = (z[:, :width] - z.amax(-1, keepdim=True)) - (u[:, :width] - u.amax(-1, keepdim=True))
    eps = 4 * 2.0 ** -23 * d.abs().amax(-1) / (z.shape[0] * temperature)
    hidden = s64.hidden.detach().reshape(-1, s64.hidden.shape[-1])
    return (float(eps.norm() * s64.weight.detach().norm(dim=-1).max()),
            float((eps * hidden.norm(dim=-1)).sum()), float(eps.sum()))


def check_grads(res: Result, expected: Head, needs, tol_grad=None, what="", abs_slack=None):
    """``res``'s student gradients against ``expected``'s (.grad; None counts as zero), in the input's dtype;
    ``abs_slack``: (hidden, weight, bias) absolute slacks instead of ``assert_close_rel``'s default."""
    names = ("hidden", "weight", "bias")
    slacks = abs_slack or (1e-7, 1e-7, 1e-7)
    for name, x, ref, need, slack in zip(names, res.student.tensors(), expected.tensors(), needs, slacks):
        if x is None:
            continue
        if not need or res.value is None:
            assert x.grad is None, f"{what}: student {name} got a gradient it did not ask for"
            continue
        assert x.grad is not None, f"{what}: no gradient reached the student {name}"
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, f"{what}: student {name} gradient dtype/shape"
        want = ref.grad if ref.grad is not None else torch.zeros(ref.shape, dtype=torch.float64)
        assert_close_rel(x.grad, want, tol_grad if tol_grad is not None else grad_tol(x.dtype), abs_slack=slack,
                         what=f"{what}: d/d student {name}")


def check_against_logits_op(op_name, backend, s, t, res: Result, *, needs, softcap, logit_scale, **kw):
    """``loss.<op>`` on float32 logits built by autograd from the same inputs: same values and gradients."""
    op = OPS[op_name]
    (cap_s, cap_t), (scale_s, scale_t) = per_model(softcap), per_model(logit_scale)
    student = leaves(s, needs)
    z = head_logits(*student.tensors(), scale_s, cap_s, F32)
    with torch.no_grad():
        u = head_logits(*t.tensors(), scale_t, cap_t, F32)
    value, out = outputs(op, op.logits(z, u, *res.aux, backend=backend, **op_kwargs(op, kw, fused=False)))
    if value is not None and value.requires_grad:
        value.backward(res.upstream)
    for name in out:
        assert_close_rel(res.out[name], out[name], loss_tol(F32), abs_slack=1e-6, what=f"{op_name} {name} vs logits op")
    for name, x, y, need in zip(("hidden", "weight", "bias"), res.student.tensors(), student.tensors(), needs):
        if x is not None and need and value is not None:
            assert_close_rel(x.grad, y.grad, grad_tol(x.dtype), abs_slack=1e-6,
                             what=f"{op_name}: d/d student {name} vs logits op")


def masked_rows_get_zero_grad(res: Result, mask):
    g = res.student.hidden.grad
    if g is not None and mask is not None:
        assert (g[~mask.bool()] == 0).all(), "masked positions must get exactly zero hidden-state gradient"


# ----------------------------------------------------------------------------------------------------------
# Every op and dtype against the float64 reference and the logits op
# ----------------------------------------------------------------------------------------------------------

DTYPES = {"f32": (F32, F32), "bf16": (BF16, BF16), "f16": (F16, F16), "bf16/f32": (BF16, F32)}


@pytest.mark.triton_subset(op=["reverse_kl", "jsd_0.3", "minillm", "pt"], dtypes=["f32", "bf16", "bf16/f32"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("op", GRAD_OPS)
def test_matches_reference(backend, op, dtypes, gen):
    ds, dt = DTYPES[dtypes]
    lead, v = (2, 3), (45 if backend == "triton" else 257)
    s = make_head(gen, lead, 16, v, ds, bias=True)
    t = make_head(gen, lead, 24, v, dt, bias=True)
    mask = seeded_mask(gen, lead)
    res = check_fused(op, backend, s, t, gen=gen, mask=mask, temperature=1.3, compare_logits_op=True)
    assert res.value.shape == ()
    masked_rows_get_zero_grad(res, mask)


@pytest.mark.triton_subset(dtypes=["f32"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_token_stats_matches_reference(backend, dtypes, gen):
    ds, dt = DTYPES[dtypes]
    lead, v = (2, 3), (45 if backend == "triton" else 257)
    s = make_head(gen, lead, 16, v, ds, bias=True)
    t = make_head(gen, lead, 12, v, dt)
    mask = seeded_mask(gen, lead)
    res = check_fused("token_stats", backend, s, t, gen=gen, mask=mask, alpha=0.3, temperature=0.8,
                      softcap=(None, 4.0), compare_logits_op=True)
    for name, x in res.out.items():
        assert x.shape == lead and not x.requires_grad, name
        assert (x[~mask] == 0).all(), name
    assert res.student.hidden.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", DIV_OPS)
def test_reductions(fused_backend, op, reduction, gen):
    lead = (9,)
    s, t = make_head(gen, lead, 12, 100, bias=True), make_head(gen, lead, 12, 100, bias=True)
    mask = seeded_mask(gen, lead, 0.6)
    res = check_fused(op, fused_backend, s, t, gen=gen, mask=mask, reduction=reduction, compare_logits_op=True)
    masked_rows_get_zero_grad(res, mask)
    per_row = run_fused(op, s, t, (), needs=(False, False, False), mask=mask, reduction="none",
                        backend=fused_backend).value
    assert per_row.shape == lead and (per_row[~mask] == 0).all()
    if reduction == "mean":
        torch.testing.assert_close(res.value, per_row.sum() / mask.sum(), rtol=1e-6, atol=1e-7)
    elif reduction == "sum":
        torch.testing.assert_close(res.value, per_row.sum(), rtol=1e-6, atol=1e-7)
    else:
        assert res.value.shape == lead


@pytest.mark.parametrize("op", ["jsd_0.3", "reverse_kl", "forward_kl"])
def test_triton_reduction_none(op, gen, monkeypatch):
    """reduction="none" on the triton backend (interpreter: tiny cases): the on-chip kernels run the gradient pass
    in backward with the saved statistics."""
    reason = backend_unavailable_reason("triton")
    if reason is not None:
        pytest.skip(reason)
    from minillm_fast.backends import triton_fused_linear
    calls = []
    for name in ("row_stats", "logits_grad_pullback", "jsd_rows", "jsd_grad_pullback"):
        original = getattr(triton_fused_linear, name)
        monkeypatch.setattr(triton_fused_linear, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    s, t = make_head(gen, (5,), 8, 40, bias=True), make_head(gen, (5,), 8, 40)
    check_fused(op, "triton", s, t, gen=gen, reduction="none", softcap=3.0, mask=seeded_mask(gen, (5,)))
    grad = "jsd_grad_pullback" if op.startswith("jsd") else "logits_grad_pullback"
    assert calls.count("row_stats") == 1 and calls.count(grad) == 1, calls  # forward stats, backward gradient
    assert calls.count("jsd_rows") == (1 if op.startswith("jsd") else 0), calls  # backward reuses the forward's


# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------

HEAD_OPTIONS = {
    "plain": dict(bias=(False, False)),
    "student_bias": dict(bias=(True, False)),
    "teacher_bias": dict(bias=(False, True)),
    "softcap": dict(bias=(True, True), softcap=3.0),
    "softcap_student": dict(bias=(False, False), softcap=(2.5, None)),
    "softcap_teacher": dict(bias=(True, False), softcap=(None, 2.0)),
    "scale": dict(bias=(True, True), logit_scale=0.5),
    "scale_student": dict(bias=(False, True), logit_scale=(1.7, None)),
    "scale_teacher": dict(bias=(False, False), logit_scale=[None, 0.25]),
    "everything": dict(bias=(True, True), softcap=(4.0, 6.0), logit_scale=(1.5, 0.3)),
}


@pytest.mark.parametrize("option", list(HEAD_OPTIONS))
@pytest.mark.parametrize("op", ["reverse_kl", "jsd_0.3", "minillm", "pt"])
def test_bias_softcap_logit_scale(fused_backend, op, option, gen):
    cfg = dict(HEAD_OPTIONS[option])
    bias = cfg.pop("bias")
    lead = (2, 4)
    s = make_head(gen, lead, 10, 90, bias=bias[0], scale=3.0)
    t = make_head(gen, lead, 14, 90, bias=bias[1], scale=3.0)
    kw = dict(mask=seeded_mask(gen, lead)) if op != "pt" else {}
    check_fused(op, fused_backend, s, t, gen=gen, compare_logits_op=True, **cfg, **kw)


def test_softcap_and_scale_change_the_result(gen):
    """The options are applied (not silently ignored), per model."""
    s, t = make_head(gen, (4,), 8, 50, scale=4.0), make_head(gen, (4,), 8, 50, scale=4.0)
    base = loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight)
    for kw in (dict(softcap=2.0), dict(softcap=(2.0, None)), dict(softcap=(None, 2.0)), dict(logit_scale=0.5),
               dict(logit_scale=(None, 0.5)), dict(logit_scale=(0.5, None))):
        assert abs(loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight, **kw) - base) > 1e-3, kw
    # None in both places is "not applied"
    same = loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight, softcap=(None, None),
                                        logit_scale=None)
    torch.testing.assert_close(same, base, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.3])
@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5", "minillm", "pt", "token_stats"])
def test_temperature(fused_backend, op, temperature, gen):
    lead = (7,)
    s, t = make_head(gen, lead, 8, 64, bias=True, scale=3.0), make_head(gen, lead, 8, 64, scale=3.0)
    kw = dict(mask=seeded_mask(gen, lead)) if op != "pt" else {}
    check_fused(op, fused_backend, s, t, gen=gen, temperature=temperature, softcap=5.0, **kw)


@pytest.mark.parametrize("mask_kind", ["bool", "long", "float"])
@pytest.mark.parametrize("op", ["reverse_kl", "minillm", "token_stats"])
def test_mask_dtypes(fused_backend, op, mask_kind, gen):
    lead = (3, 4)
    s, t = make_head(gen, lead, 8, 50, bias=True), make_head(gen, lead, 8, 50)
    mask = seeded_mask(gen, lead, 0.5)
    typed = {"bool": mask, "long": mask.long(), "float": mask.float()}[mask_kind]
    res = check_fused(op, fused_backend, s, t, gen=gen, mask=typed)
    masked_rows_get_zero_grad(res, mask)


@pytest.mark.parametrize("op,reduction", [(op, r) for op in ("reverse_kl", "jsd_0.3") for r in ("mean", "sum", "none")]
                         + [("minillm", "mean"), ("pt", "mean")])
def test_everything_masked(fused_backend, op, reduction, gen):
    """Nothing valid: 0.0 (not NaN), and backward() still works and gives exactly zero gradients."""
    lead = (2, 3)
    s, t = make_head(gen, lead, 8, 40, bias=True), make_head(gen, lead, 8, 40)
    student = leaves(s, (True, True, True))
    mask = torch.zeros(lead, dtype=torch.bool)
    tokens = torch.full(lead, 10_000)  # out of range, but never read at masked positions
    op_ = OPS[op]
    aux = {"div": (), "minillm": (tokens, torch.ones(lead), torch.zeros(lead), torch.ones(lead)),
           "pt": (torch.full(lead, -100),)}[op_.kind]
    kw = dict(mask=mask, reduction=reduction) if op_.kind == "div" else (dict(mask=mask) if op == "minillm" else {})
    value, out = call_fused(op_, student, Head(t.hidden, t.weight), aux, backend=fused_backend, **kw)
    for name, x in out.items():
        assert not torch.isnan(x).any() and (x == 0).all(), f"{name}: {x}"
    value.backward(torch.ones_like(value))
    for name, x in zip(("hidden", "weight", "bias"), student.tensors()):
        assert x.grad is not None and (x.grad == 0).all(), name


@pytest.mark.parametrize("vs,vt", [(257, 250), (250, 257), (1, 9), (33, 32)])
@pytest.mark.parametrize("op", ["reverse_kl", "jsd_0.3", "minillm", "pt", "token_stats"])
def test_padded_vocabulary(fused_backend, op, vs, vt, gen):
    """V_s != V_t: both distributions over the first min(V_s, V_t) entries; the student's weight rows and bias
    entries beyond it get exactly zero gradient, whatever sits there."""
    lead = (2, 3)
    s, t = make_head(gen, lead, 8, vs, bias=True), make_head(gen, lead, 12, vt, bias=True)
    kw = dict(mask=seeded_mask(gen, lead)) if op != "pt" else {}
    res = check_fused(op, fused_backend, s, t, gen=gen, softcap=(3.0, None), compare_logits_op=True, **kw)
    v = min(vs, vt)
    if op != "token_stats":
        assert (res.student.weight.grad[v:] == 0).all() and (res.student.bias.grad[v:] == 0).all()
    # whatever sits beyond the shared vocabulary is ignored
    s2, t2 = Head(s.hidden, s.weight.clone(), s.bias.clone()), Head(t.hidden, t.weight.clone(), t.bias.clone())
    s2.weight[v:], s2.bias[v:], t2.weight[v:], t2.bias[v:] = 50.0, 1e4, -50.0, -1e4
    again = run_fused(op, s2, t2, res.aux, softcap=(3.0, None), backend=fused_backend, **kw)
    for name in res.out:
        torch.testing.assert_close(again.out[name], res.out[name], rtol=0, atol=0)


@pytest.mark.parametrize("hs,ht", [(5, 33), (33, 5), (1, 1)])
def test_hidden_sizes_differ(fused_backend, hs, ht, gen):
    s, t = make_head(gen, (6,), hs, 70, bias=True), make_head(gen, (6,), ht, 70, bias=True)
    check_fused("reverse_kl", fused_backend, s, t, gen=gen)
    check_fused("minillm", fused_backend, s, t, gen=gen, mask=None)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 3), (1,)], ids=str)
@pytest.mark.parametrize("op", ["reverse_kl", "minillm", "pt", "token_stats"])
def test_leading_shapes(fused_backend, op, lead, gen):
    s, t = make_head(gen, lead, 8, 30, bias=True), make_head(gen, lead, 8, 30)
    kw = dict(mask=seeded_mask(gen, lead)) if op != "pt" else {}
    res = check_fused(op, fused_backend, s, t, gen=gen, **kw)
    if op == "token_stats":
        assert all(x.shape == lead for x in res.out.values())
    else:
        assert res.student.hidden.grad.shape == lead + (8,)
    if op == "reverse_kl":
        res = check_fused(op, fused_backend, s, t, gen=gen, reduction="none", **kw)
        assert res.value.shape == lead


def test_non_contiguous_inputs(fused_backend, gen):
    """Strided hidden states ([T, B, H] transposed to [B, T, H]) and a transposed weight storage."""
    big = make_head(gen, (4, 3), 10, 60, bias=True)
    s = Head(big.hidden.transpose(0, 1), big.weight.T.contiguous().T, big.bias)
    assert not s.hidden.is_contiguous() and not s.weight.is_contiguous()
    t = make_head(gen, (3, 4), 6, 60)
    res = run_fused("reverse_kl", s, t, (), backend=fused_backend)
    ref = run_fused("reverse_kl", Head(*(x.contiguous() for x in s.tensors())), t, (), backend=fused_backend)
    torch.testing.assert_close(res.value, ref.value, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_of(res.student), grads_of(ref.student)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op,lead", [("reverse_kl", (0,)), ("reverse_kl", (2, 0)), ("minillm", (2, 0)),
                                     ("pt", (2, 0)), ("token_stats", (0,))], ids=str)
def test_no_rows(fused_backend, op, lead, gen):
    """No positions at all: like the logits ops (0.0 with a zero gradient), not an exception."""
    s, t = make_head(gen, lead, 8, 30, bias=True), make_head(gen, lead, 8, 30)
    z = torch.zeros(lead + (30,), requires_grad=True)
    op_ = OPS[op]
    aux = make_aux(op_, gen, lead, 30, z.detach().double())
    _, logits_out = outputs(op_, op_.logits(z, torch.zeros(lead + (30,)), *aux, backend=fused_backend,
                                            **({"mask": None} if op == "minillm" else {})))
    res = run_fused(op, s, t, aux, backend=fused_backend, **({"mask": None} if op == "minillm" else {}))
    for name in logits_out:
        torch.testing.assert_close(res.out[name], logits_out[name])
    if res.value is not None:
        assert res.student.hidden.grad.shape == s.hidden.shape
        assert (res.student.weight.grad == 0).all()


@pytest.mark.parametrize("v", [1, 3, 257, 1001])
@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("op", ["reverse_kl", "minillm"])
def test_odd_sizes(fused_backend, op, n, v, gen):
    s, t = make_head(gen, (n,), 7, v, bias=True), make_head(gen, (n,), 5, v, bias=True)
    kw = dict(mask=seeded_mask(gen, (n,), 0.8))
    res = check_fused(op, fused_backend, s, t, gen=gen, **kw)
    if v == 1:  # one entry: q = p = 1, the divergence and its gradient vanish
        assert res.out["reg_loss" if op == "minillm" else "value"].abs() <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------

def test_rows_per_block():
    for n in (1, 2, 7, 37, 100, 1000, 8192):
        for v in (1, 7, 1000, 32000, 152064):
            r = fused_linear.rows_per_block(n, v)
            assert 1 <= r <= n
            assert r < 16 or r % 8 == 0 or r == n
            budget = min(fused_linear.MAX_BLOCK_BYTES,
                         max(fused_linear.MIN_BLOCK_BYTES, n * v * 4 / fused_linear.BLOCK_SHARE))
            assert r == 1 or r * v * fused_linear.BYTES_PER_LOGIT <= budget
    rows = fused_linear.rows_per_block(8192, 128256)
    assert rows * 128256 * fused_linear.BYTES_PER_LOGIT <= fused_linear.MAX_BLOCK_BYTES


def test_rows_per_block_and_group():
    """16-bit matmuls forming a gradient: a block's temporaries (BYTES_PER_LOGIT per logit) and its group's 16-bit
    logit gradient (2 bytes per logit of min(G, N) rows) together within the block budget with MAX_GROUPED_BYTES;
    G = GROUP_BLOCKS blocks. At N = 8192, V = 128256 (bf16 Llama 3): blocks of 256 rows, groups of 2048, so the
    [V, H] weight gradient is read and written by 4 pull-backs (32 with one per block)."""
    for n in (1, 2, 7, 37, 100, 1000, 8192, 65536):
        for v in (1, 7, 1000, 32000, 128256, 152064):
            r, g = fused_linear.rows_per_block_and_group(n, v)
            assert 1 <= r <= n and g == fused_linear.GROUP_BLOCKS * r
            assert r < 16 or r % 8 == 0 or r == n
            budget = min(fused_linear.MAX_GROUPED_BYTES,
                         max(fused_linear.MIN_BLOCK_BYTES, n * v * 4 / fused_linear.BLOCK_SHARE))
            assert r == 1 or (fused_linear.BYTES_PER_LOGIT * r + 2 * min(g, n)) * v <= budget
    n, v = 8192, 128256
    r, g = fused_linear.rows_per_block_and_group(n, v)
    assert (r, g) == (256, 2048) and -(-n // g) == 4
    block_bytes, group_bytes = fused_linear.BYTES_PER_LOGIT * r * v, 2 * g * v
    assert (block_bytes, group_bytes) == (295501824, 525336576)  # 281.8 MiB + 501.0 MiB
    assert block_bytes + group_bytes <= fused_linear.MAX_GROUPED_BYTES


def _count_blocks(monkeypatch):
    calls = []
    original = fused_linear._Problem.block

    def block(self, a, b, *args, **kwargs):
        calls.append((a, b))
        return original(self, a, b, *args, **kwargs)

    monkeypatch.setattr(fused_linear._Problem, "block", block)
    return calls


# rows * 9 / 8 rounds down to rows: the same blocks from the budget with the vocabulary-major blocks' 8 bytes per
# logit (the cpu backend; fused_linear.VOCAB_MAJOR_BYTES_PER_LOGIT) as with BYTES_PER_LOGIT.
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "jsd_0.3", "minillm", "pt", "token_stats"])
def test_many_blocks_equal_one_block(fast_backend, op, rows, gen, monkeypatch):
    """Blocks of 1..7 rows (N = 37: a partial last block), by the budget or by the knob, give the single-block
    result."""
    op, _, reduction = op.partition("/")
    n, vs, vt = 37, 61, 64
    s, t = make_head(gen, (n,), 8, vs, bias=True), make_head(gen, (n,), 6, vt, bias=True)
    kw = dict(mask=seeded_mask(gen, (n,))) if op != "pt" else {}
    if reduction:
        kw["reduction"] = reduction
    calls = _count_blocks(monkeypatch)
    monkeypatch.setattr(fused_linear, "BLOCK_SHARE", 0.25)  # budget: the whole problem
    assert fused_linear.rows_per_block(n, vt) == n
    one = check_fused(op, fast_backend, s, t, gen=gen, softcap=(None, 5.0), **kw)
    assert {b - a for a, b in calls} == {n}

    monkeypatch.setattr(fused_linear, "BLOCK_SHARE", 1)
    monkeypatch.setattr(fused_linear, "MAX_BLOCK_BYTES", rows * vt * fused_linear.BYTES_PER_LOGIT)
    assert fused_linear.rows_per_block(n, vt) == rows
    calls.clear()
    many = run_fused(op, s, t, one.aux, upstream=one.upstream, softcap=(None, 5.0), backend=fast_backend, **kw)
    assert len([c for c in calls if c[0] == 0]) >= 1 and max(b - a for a, b in calls) == rows
    blocks = [(a, min(n, a + rows)) for a in range(0, n, rows)]
    assert sorted({c for c in calls}) == blocks
    assert_same_results(many, one, 1e-6)

    # The knob (MINILLM_FAST_FUSED_LINEAR_BLOCKS: "n", or "n,G" whose G float32 matmuls do not use) sets the same
    # blocks whatever the budget.
    monkeypatch.setattr(fused_linear, "BLOCK_SHARE", 0.25)
    for knob in (f"{rows}", f"{rows},{2 * rows}"):
        monkeypatch.setenv(fused_linear.BLOCKS_ENV, knob)
        calls.clear()
        forced = run_fused(op, s, t, one.aux, upstream=one.upstream, softcap=(None, 5.0), backend=fast_backend, **kw)
        assert sorted({c for c in calls}) == blocks
        assert_same_results(forced, one, 1e-6)


def assert_same_results(got: Result, want: Result, tol_grad: float) -> None:
    """Two runs of one op on the same inputs: the same values (to 1e-6, and 1e-6 absolute: MiniLLM's pg_loss is a
    mean of O(1) terms that nearly cancel, so float32 rounding of the logits, which differs with the block shape,
    moves it by ~2e-7 on ~0.06) and student gradients (to ``tol_grad``)."""
    for name in want.out:
        assert_close_rel(got.out[name], want.out[name], 1e-6, abs_slack=1e-6, what=name)
    for name, x, y in zip(("hidden", "weight", "bias"), grads_of(got.student), grads_of(want.student)):
        if y is not None:
            assert_close_rel(x, y, tol_grad, what=f"d/d {name}")


# ----------------------------------------------------------------------------------------------------------
# -inf and extreme logits
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5", "pt"])
def test_neg_inf_bias(fused_backend, op, softcap, gen):
    """-inf bias entries (masked vocabulary entries) carry no mass (unless soft-capped, which maps -inf to
    -softcap, as the model itself would): 0 log 0 = 0 and zero gradient there."""
    lead, v = (2, 3), 80
    s, t = make_head(gen, lead, 8, v, bias=True), make_head(gen, lead, 8, v, bias=True)
    banned = torch.zeros(v, dtype=torch.bool)
    banned[[0, 5, 6, 7, 40, 79]] = True
    s.bias[banned], t.bias[banned] = NEG_INF, NEG_INF
    if op in ("reverse_kl", "jsd_0.5"):
        s.bias[[20, 21]] = NEG_INF  # the student only: reverse KL and JSD stay finite
    kw = dict(mask=seeded_mask(gen, lead)) if op != "pt" else {}
    live = (s.bias != NEG_INF).nonzero().squeeze(-1)  # labels on a -inf entry would make the LM loss infinite
    res = check_fused(op, fused_backend, s, t, gen=gen, softcap=softcap, compare_logits_op=True, token_pool=live,
                      **kw)
    assert torch.isfinite(res.value)
    assert (res.student.weight.grad[s.bias == NEG_INF] == 0).all()
    assert (res.student.bias.grad[s.bias == NEG_INF] == 0).all()


def test_teacher_only_neg_inf_gives_inf_reverse_kl(fused_backend, gen):
    """-inf in the teacher where the student has mass: +inf reverse KL on those rows, never NaN."""
    s, t = make_head(gen, (4,), 8, 40), make_head(gen, (4,), 8, 40, bias=True)
    t.bias[3] = NEG_INF
    out = loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight, teacher_bias=t.bias,
                                       reduction="none", backend=fused_backend)
    ref = reference.reverse_kl(s.hidden.double() @ s.weight.double().T,
                               t.hidden.double() @ t.weight.double().T + t.bias.double(), reduction="none")
    assert torch.isposinf(out).all() and torch.isposinf(ref).all()
    fwd = loss.fused_linear_forward_kl(s.hidden, s.weight, t.hidden, t.weight, teacher_bias=t.bias,
                                       backend=fused_backend)
    assert torch.isfinite(fwd)


@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd_0.5", "minillm", "pt"])
def test_extreme_logits(fused_backend, op, gen):
    """Logits ~1e3-1e4 (nearly one-hot rows): the loss within 2e-5, the gradient finite and within 2e-2, each
    plus twice the plain float32 logits path's own error, the gradient also plus a few units in the last place of
    the rows' logits (``float32_slack``: the gradients of such rows nearly cancel, so float32 matmuls move them by a
    few percent or more, depending on the draw and on the matmuls' summation order, and exactly one-hot rows, whose
    float64 gradient is ~0, keep an ulp of the online sums).

    MiniLLM's policy-gradient term starts from 2e-3: its ratio exp(log q(y) - old_logprob) inherits the absolute
    error of float32 logits of size |z| (|z| 2^-24 ~ 1e-3 at 1e4, a relative error of the ratio that no float32
    lm_head avoids; the reference computes the logits in float64), so pg_loss and loss are held to 2e-3 there."""
    lead = (6,)
    s, t = make_head(gen, lead, 16, 300, scale=3000.0, bias=True), make_head(gen, lead, 16, 300, scale=3000.0)
    assert (s.hidden @ s.weight.T).abs().max() > 5e3
    kw = dict(mask=None) if op == "minillm" else {}
    tol = dict(pg_loss=2e-3, loss=2e-3) if op == "minillm" else {}
    res = check_fused(op, fused_backend, s, t, gen=gen, tol_loss=dict(dict.fromkeys(("value", "reg_loss", "lm_loss",
                      "kd_loss", "clip_fraction"), 2e-5), **tol), tol_grad=2e-2, float32_slack=True, **kw)
    for x in grads_of(res.student):
        assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------------------
# Which tensors get a gradient; MiniLLM and PT options
# ----------------------------------------------------------------------------------------------------------

NEEDS = {"hidden_only": (True, False, False), "weight_only": (False, True, False), "weight_bias": (False, True, True),
         "hidden_bias": (True, False, True), "nothing": (False, False, False)}


@pytest.mark.parametrize("needs", list(NEEDS))
@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "jsd_0.3", "minillm", "pt"])
def test_frozen_tensors(fused_backend, op, needs, gen):
    """Frozen lm_head (only the hidden states train, as with LoRA below it), frozen trunk (only the head trains),
    and nothing trainable (no graph at all)."""
    op, _, reduction = op.partition("/")
    lead = (2, 5)
    s, t = make_head(gen, lead, 8, 50, bias=True), make_head(gen, lead, 8, 50)
    kw = dict(mask=seeded_mask(gen, lead)) if op != "pt" else {}
    if reduction:
        kw["reduction"] = reduction
    res = check_fused(op, fused_backend, s, t, gen=gen, needs=NEEDS[needs], **kw)
    if needs == "nothing":
        assert not res.value.requires_grad


@pytest.mark.parametrize("num_tokens", [50, 11.5, "tensor"])
@pytest.mark.parametrize("op", ["minillm", "minillm/multi_step", "pt"])
def test_num_tokens_and_single_step(fused_backend, op, num_tokens, gen):
    op, _, multi = op.partition("/")
    lead = (3, 4)
    s, t = make_head(gen, lead, 8, 40, bias=True), make_head(gen, lead, 8, 40)
    kw = dict(mask=seeded_mask(gen, lead)) if op == "minillm" else {}
    if multi:
        kw["single_step"] = False
    n = torch.tensor(13.0) if num_tokens == "tensor" else num_tokens
    res = check_fused(op, fused_backend, s, t, gen=gen, num_tokens=n, **kw)
    if op == "minillm":
        torch.testing.assert_close(res.out["loss"].detach(),
                                   res.out["pg_loss"] + (0 if multi else res.out["reg_loss"]))
        # reg_loss is reported even when it is not part of the loss
        assert res.out["reg_loss"] > 0


@pytest.mark.parametrize("clip_eps", [0.05, 0.5])
def test_minillm_clip_eps(fused_backend, clip_eps, gen):
    lead = (4, 5)
    s, t = make_head(gen, lead, 8, 40, bias=True), make_head(gen, lead, 8, 40)
    res = check_fused("minillm", fused_backend, s, t, gen=gen, clip_eps=clip_eps, mask=seeded_mask(gen, lead))
    assert 0 <= res.out["clip_fraction"] <= 1 + 1e-6


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_pt_ignore_index(fused_backend, ignore_index, gen):
    lead = (3, 5)
    s, t = make_head(gen, lead, 8, 20, bias=True), make_head(gen, lead, 8, 20)
    mask = seeded_mask(gen, lead, 0.6)
    res = check_fused("pt", fused_backend, s, t, gen=gen, mask=mask, ignore_index=ignore_index, kd_ratio=0.3)
    labels = res.aux[0]
    masked_rows_get_zero_grad(res, labels != ignore_index)


# ----------------------------------------------------------------------------------------------------------
# Autograd behaviour
# ----------------------------------------------------------------------------------------------------------

def _call_simple(op, s: Head, t: Head, aux, backend, reduction="mean"):
    kw = dict(reduction=reduction) if OPS[op].kind == "div" else {}
    if op == "minillm":
        kw["mask"] = None
    return call_fused(OPS[op], s, t, aux, backend=backend, **kw)[0]


@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "minillm", "pt"])
def test_gradient_accumulation(fused_backend, op, gen):
    """backward() on two separate losses accumulates into .grad: two micro-batches through one lm_head, and the
    same loss computed twice."""
    op, _, reduction = op.partition("/")
    lead, v = (6,), 40
    s1, s2 = make_head(gen, lead, 8, v, bias=True), make_head(gen, lead, 8, v)
    t = make_head(gen, lead, 8, v)
    aux = make_aux(OPS[op], gen, lead, v, torch.zeros(lead + (v,), dtype=torch.float64))
    up = upstream_weight(gen, lead) if reduction else None

    def separately(hidden):
        head = leaves(Head(hidden, s1.weight, s1.bias), (True, True, True))
        _call_simple(op, head, t, aux, fused_backend, reduction or "mean").backward(up)
        return grads_of(head)

    g1, g2 = separately(s1.hidden), separately(s2.hidden)
    w = leaves(s1, (True, True, True))
    h2 = s2.hidden.clone().requires_grad_(True)
    _call_simple(op, w, t, aux, fused_backend, reduction or "mean").backward(up)
    _call_simple(op, Head(h2, w.weight, w.bias), t, aux, fused_backend, reduction or "mean").backward(up)
    torch.testing.assert_close(w.weight.grad, g1[1] + g2[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.bias.grad, g1[2] + g2[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.hidden.grad, g1[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(h2.grad, g2[0], rtol=1e-6, atol=1e-8)

    twice = leaves(s1, (True, True, True))
    for _ in range(2):
        _call_simple(op, twice, t, aux, fused_backend, reduction or "mean").backward(up)
    for x, y in zip(grads_of(twice), g1):
        torch.testing.assert_close(x, 2 * y, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "jsd_0.3", "minillm", "pt", "token_stats"])
def test_no_grad(fused_backend, op, gen):
    """Under torch.no_grad(): the same value, no graph, no gradients."""
    op, _, reduction = op.partition("/")
    lead, v = (2, 3), 40
    s, t = make_head(gen, lead, 8, v, bias=True), make_head(gen, lead, 8, v)
    aux = make_aux(OPS[op], gen, lead, v, torch.zeros(lead + (v,), dtype=torch.float64))
    kw = dict(reduction=reduction) if reduction else {}
    if op == "minillm":
        kw["mask"] = None
    with_grad = call_fused(OPS[op], leaves(s, (True, True, True)), t, aux, backend=fused_backend, **kw)[1]
    student = leaves(s, (True, True, True))
    with torch.no_grad():
        without = call_fused(OPS[op], student, t, aux, backend=fused_backend, **kw)[1]
    for name in with_grad:
        assert not without[name].requires_grad
        torch.testing.assert_close(without[name], with_grad[name].detach(), rtol=0, atol=0)
    assert all(x.grad is None for x in student.tensors())


@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "minillm", "pt"])
def test_second_backward_raises(fused_backend, op, gen):
    op, _, reduction = op.partition("/")
    lead, v = (4,), 30
    s, t = make_head(gen, lead, 8, v, bias=True), make_head(gen, lead, 8, v)
    aux = make_aux(OPS[op], gen, lead, v, torch.zeros(lead + (v,), dtype=torch.float64))
    up = torch.ones(lead) if reduction else None
    for retain in (False, True):
        value = _call_simple(op, leaves(s, (True, True, True)), t, aux, fused_backend, reduction or "mean")
        value.backward(up, retain_graph=retain)
        with pytest.raises(RuntimeError):
            value.backward(up)


def test_auto_backend_is_a_fused_backend(gen):
    s, t = make_head(gen, (5,), 8, 30, bias=True), make_head(gen, (5,), 8, 30)
    auto = loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight, student_bias=s.bias)
    torch_ = loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight, student_bias=s.bias,
                                          backend="torch")
    torch.testing.assert_close(auto, torch_, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Validation: ValueError naming the argument
# ----------------------------------------------------------------------------------------------------------

V_VAL, LEAD_VAL = 11, (2, 3)
VAL_OPS = ["reverse_kl", "forward_kl", "jsd_0.5", "token_stats", "minillm", "pt"]


def _valid_kwargs(op: str, vs=V_VAL, vt=V_VAL) -> dict:
    g = torch.Generator().manual_seed(0)
    s, t = make_head(g, LEAD_VAL, 4, vs, bias=True), make_head(g, LEAD_VAL, 5, vt, bias=True)
    kw = dict(student_hidden=s.hidden.requires_grad_(), student_weight=s.weight.requires_grad_(),
              student_bias=s.bias.requires_grad_(), teacher_hidden=t.hidden, teacher_weight=t.weight,
              teacher_bias=t.bias)
    tokens = torch.zeros(LEAD_VAL, dtype=torch.long)
    kind = OPS[op].kind
    if kind == "stats":
        kw["tokens"] = tokens
    elif kind == "minillm":
        kw.update(tokens=tokens, advantages=torch.zeros(LEAD_VAL), old_logprobs=torch.zeros(LEAD_VAL),
                  importance_weights=torch.ones(LEAD_VAL), mask=None)
    elif kind == "pt":
        kw["labels"] = tokens
    return kw


def _set(**changes):
    return lambda kw: kw.update(changes)


def _grad(name):
    return lambda kw: kw.update({name: kw[name].detach().clone().requires_grad_(True)})


def _tensor(*shape, dtype=F32):
    return torch.zeros(shape, dtype=dtype)


# name: (op kinds it applies to or None for all, how to break the arguments, the argument the message names)
BAD = {
    "teacher_hidden_grad": (None, _grad("teacher_hidden"), "teacher_hidden"),
    "teacher_weight_grad": (None, _grad("teacher_weight"), "teacher_weight"),
    "teacher_bias_grad": (None, _grad("teacher_bias"), "teacher_bias"),
    "student_weight_H": (None, _set(student_weight=_tensor(V_VAL, 5)), "student_weight"),
    "teacher_weight_H": (None, _set(teacher_weight=_tensor(V_VAL, 4)), "teacher_weight"),
    "student_weight_1d": (None, _set(student_weight=_tensor(4)), "student_weight"),
    "student_weight_3d": (None, _set(student_weight=_tensor(1, V_VAL, 4)), "student_weight"),
    "student_weight_no_rows": (None, _set(student_weight=_tensor(0, 4), student_bias=None), "student_weight"),
    "student_bias_shape": (None, _set(student_bias=_tensor(V_VAL + 1)), "student_bias"),
    "teacher_bias_shape": (None, _set(teacher_bias=_tensor(V_VAL, 1)), "teacher_bias"),
    "student_dtype_mismatch": (None, _set(student_weight=_tensor(V_VAL, 4, dtype=BF16)), "student_weight"),
    "teacher_dtype_mismatch": (None, _set(teacher_hidden=_tensor(*LEAD_VAL, 5, dtype=F16)), "teacher_"),
    "student_hidden_int": (None, _set(student_hidden=_tensor(*LEAD_VAL, 4, dtype=torch.long)), "student_hidden"),
    "student_weight_f64": (None, _set(student_weight=_tensor(V_VAL, 4, dtype=torch.float64)), "student_weight"),
    "student_hidden_0d": (None, _set(student_hidden=torch.tensor(1.0)), "student_hidden"),
    "leading_shape": (None, _set(teacher_hidden=_tensor(3, 2, 5)), "teacher_hidden"),
    "leading_shape_rows": (None, _set(teacher_hidden=_tensor(6, 5)), "teacher_hidden"),
    "student_hidden_list": (None, _set(student_hidden=[[0.0] * 4] * 6), "student_hidden"),
    "student_weight_list": (None, _set(student_weight=[[0.0] * 4] * V_VAL), "student_weight"),
    "teacher_hidden_none": (None, _set(teacher_hidden=None), "teacher_hidden"),
    "teacher_weight_float": (None, _set(teacher_weight=1.0), "teacher_weight"),
    "student_bias_list": (None, _set(student_bias=[0.0] * V_VAL), "student_bias"),
    "temperature_0": (None, _set(temperature=0.0), "temperature"),
    "temperature_neg": (None, _set(temperature=-1.0), "temperature"),
    "temperature_nan": (None, _set(temperature=math.nan), "temperature"),
    "temperature_str": (None, _set(temperature="1"), "temperature"),
    "softcap_0": (None, _set(softcap=0.0), "softcap"),
    "softcap_neg": (None, _set(softcap=-30.0), "softcap"),
    "softcap_pair_neg": (None, _set(softcap=(30.0, -1.0)), "softcap"),
    "softcap_triple": (None, _set(softcap=(1.0, 2.0, 3.0)), "softcap"),
    "softcap_str": (None, _set(softcap="30"), "softcap"),
    "logit_scale_0": (None, _set(logit_scale=0), "logit_scale"),
    "logit_scale_inf": (None, _set(logit_scale=math.inf), "logit_scale"),
    "logit_scale_pair": (None, _set(logit_scale=(None, -0.5)), "logit_scale"),
    "logit_scale_single": (None, _set(logit_scale=[0.5]), "logit_scale"),
    "logit_scale_bool": (None, _set(logit_scale=True), "logit_scale"),
    "backend_name": (None, _set(backend="nope"), "backend"),
    "backend_type": (None, _set(backend=3), "backend"),
    "backend_cuda_on_cpu": (None, _set(backend="cuda"), "backend"),
    "reduction": (("div",), _set(reduction="avg"), "reduction"),
    "mask_shape": (("div", "stats", "minillm"), _set(mask=torch.ones(6, dtype=torch.bool)), "mask"),
    "mask_list": (("div", "stats", "minillm"), _set(mask=[True] * 6), "mask"),
    "tokens_high": (("stats", "minillm"), _set(tokens=torch.full(LEAD_VAL, V_VAL)), "tokens"),
    "tokens_negative": (("stats", "minillm"), _set(tokens=torch.full(LEAD_VAL, -1)), "tokens"),
    "tokens_float": (("stats", "minillm"), _set(tokens=torch.zeros(LEAD_VAL)), "tokens"),
    "tokens_shape": (("stats", "minillm"), _set(tokens=torch.zeros(6, dtype=torch.long)), "tokens"),
    "labels_high": (("pt",), _set(labels=torch.full(LEAD_VAL, V_VAL)), "labels"),
    "labels_shape": (("pt",), _set(labels=torch.zeros(6, dtype=torch.long)), "labels"),
    "alpha": (("stats",), _set(alpha=1.0), "alpha"),
    "advantages_shape": (("minillm",), _set(advantages=torch.zeros(6)), "advantages"),
    "old_logprobs_list": (("minillm",), _set(old_logprobs=[0.0] * 6), "old_logprobs"),
    "importance_weights_int": (("minillm",), _set(importance_weights=torch.ones(LEAD_VAL, dtype=torch.long)),
                               "importance_weights"),
    "clip_eps": (("minillm",), _set(clip_eps=0.0), "clip_eps"),
    "num_tokens_minillm": (("minillm",), _set(num_tokens=0), "num_tokens"),
    "num_tokens_pt": (("pt",), _set(num_tokens=torch.tensor(-1.0)), "num_tokens"),
    "kd_ratio": (("pt",), _set(kd_ratio=1.5), "kd_ratio"),
    "ignore_index": (("pt",), _set(ignore_index=-1.5), "ignore_index"),
}
BAD_CASES = [pytest.param(op, case, id=f"{op}-{case}") for op in VAL_OPS for case, (kinds, _, _) in BAD.items()
             if kinds is None or OPS[op].kind in kinds]


def raises_naming(name, fn, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(**kwargs)
    assert name in str(info.value), f"the ValueError does not name {name!r}: {str(info.value)!r}"


@pytest.mark.parametrize("op,case", BAD_CASES)
def test_bad_arguments(op, case):
    _, breaks, name = BAD[case]
    kw = _valid_kwargs(op)
    OPS[op].fused(**kw)  # valid as given
    breaks(kw)
    raises_naming(name, OPS[op].fused, **kw)


@pytest.mark.parametrize("vs,vt", [(13, 11), (11, 13)])
@pytest.mark.parametrize("op", ["token_stats", "minillm", "pt"])
def test_tokens_out_of_the_shared_vocabulary(op, vs, vt):
    """Token ids must lie in [0, min(V_s, V_t)): id 11 is out of range with V_s, V_t = 13, 11 and 11, 13."""
    kw = _valid_kwargs(op, vs, vt)
    key = "labels" if op == "pt" else "tokens"
    kw[key] = torch.full(LEAD_VAL, 10)
    OPS[op].fused(**kw)
    kw[key] = torch.full(LEAD_VAL, 11)
    raises_naming(key, OPS[op].fused, **kw)


def test_beta_out_of_range():
    for beta in (-0.1, 1.5, math.nan):
        raises_naming("beta", loss.fused_linear_jsd, beta=beta, **_valid_kwargs("reverse_kl"))


# ----------------------------------------------------------------------------------------------------------
# The memory claim, measured in a child process
# ----------------------------------------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from minillm_fast import loss

    # One thread: the peaks measured with 2 threads were the same to 0.1 MB, and a shared machine runs this
    # several times faster.
    torch.set_num_threads(1)

    libc = ctypes.CDLL("libc.so.6")

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    def reset_peak():
        libc.malloc_trim(0)  # hand freed pages back: RSS = live memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    N, H = 256, 64
    cases = json.loads(sys.argv[1])
    results = {}
    g = torch.Generator().manual_seed(0)
    # warm-up (thread pools, kernel registration, lazy imports) on a small problem
    for name in ("reverse_kl", "minillm"):
        hs, ws = torch.randn(8, H, requires_grad=True), torch.randn(100, H, requires_grad=True)
        ht, wt = torch.randn(8, H), torch.randn(100, H)
        if name == "reverse_kl":
            loss.fused_linear_reverse_kl(hs, ws, ht, wt).backward()
            loss.fused_linear_jsd(hs, ws, ht, wt, softcap=3.0).backward()
            loss.fused_linear_reverse_kl(hs, ws, ht, wt, reduction="none").sum().backward()
        else:
            z = torch.zeros(8, dtype=torch.long)
            loss.fused_linear_minillm_loss(hs, ws, ht, wt, z, torch.ones(8), torch.zeros(8), torch.ones(8),
                                           mask=None).loss.backward()
            loss.fused_linear_pt_loss(hs, ws, ht, wt, z).loss.backward()
            loss.reverse_kl(hs @ ws.T, ht @ wt.T).backward()
    for case in cases:
        name, V, trains_weight = case["op"], case["V"], case["weight_grad"]
        hs = torch.randn(N, H, generator=g).requires_grad_()
        ws = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(trains_weight)
        ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
        tokens = torch.randint(0, V, (N,), generator=g)
        adv, old, w = torch.randn(N, generator=g), -torch.rand(N, generator=g) * 10, torch.ones(N)
        student = [x for x in (hs, ws) if x.requires_grad]
        for x in student:  # .grad buffers of the right size exist (a later micro-batch)
            x.grad = torch.zeros_like(x).fill_(1.0)
        kw = case.get("kwargs", {})

        def run():
            if name == "minillm":
                return loss.fused_linear_minillm_loss(hs, ws, ht, wt, tokens, adv, old, w, mask=None, **kw).loss
            if name == "pt":
                return loss.fused_linear_pt_loss(hs, ws, ht, wt, tokens, **kw).loss
            if name == "logits_path":
                return loss.reverse_kl(hs @ ws.T, ht @ wt.T, **kw)
            value = getattr(loss, "fused_linear_" + name)(hs, ws, ht, wt, **kw)
            return value.sum() if value.dim() else value

        reset_peak()
        base = status("VmRSS")
        run().backward()
        peak = status("VmHWM")
        results[case["id"]] = dict(extra=peak - base, grad_bytes=sum(x.numel() * x.element_size() for x in student),
                                   logits_bytes=N * V * 4)
        del hs, ws, ht, wt, student
    print(json.dumps(results))
""")

# reverse KL and MiniLLM (the logits_grad kernel, as forward KL and PT), JSD (its own kernels) with soft-capping
# (its own temporaries), reduction="none" (recomputes the blocks in backward) with a frozen lm_head.
MEMORY_OPS = {
    "reverse_kl": dict(op="reverse_kl", weight_grad=True),
    "minillm": dict(op="minillm", weight_grad=True),
    "jsd_softcap": dict(op="jsd", weight_grad=True, kwargs=dict(beta=0.5, softcap=3.0)),
    "reverse_kl_none_frozen_head": dict(op="reverse_kl", weight_grad=False, kwargs=dict(reduction="none")),
}
MEMORY_VOCABS = (32000, 128256)


_MEMORY_CHILD: dict = {}


def _start_memory_child(tmp_path_factory):
    if "proc" in _MEMORY_CHILD or not os.path.exists("/proc/self/clear_refs"):
        return
    cases = [dict(MEMORY_OPS[key], id=f"{key}/{v}", V=v) for key in MEMORY_OPS for v in MEMORY_VOCABS]
    cases.append(dict(op="logits_path", weight_grad=True, id="logits_path/32000", V=32000))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # every big allocation is its own mmap, returned to the OS when freed: RSS tracks live memory
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    script = tmp_path_factory.mktemp("memory") / "measure.py"
    script.write_text(MEMORY_CHILD)
    _MEMORY_CHILD["proc"] = subprocess.Popen([sys.executable, str(script), json.dumps(cases)], env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def memory_results(tmp_path_factory):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    _start_memory_child(tmp_path_factory)  # normally already running (see _module_setup)
    proc = _MEMORY_CHILD["proc"]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _mb(x):
    return f"{x / 1e6:.1f} MB"


def test_memory_measurement_sees_logits(memory_results):
    """The method is sound: the logits path (materialised [N, V] logits, their gradient, the op's temporaries)
    shows up as several logits buffers."""
    r = memory_results["logits_path/32000"]
    assert r["extra"] - r["grad_bytes"] > 1.5 * r["logits_bytes"], r


@pytest.mark.parametrize("key", list(MEMORY_OPS))
def test_memory_claim(memory_results, key):
    """Peak RSS during forward + backward beyond the inputs, the weights, their .grad buffers and the gradient the
    op hands to autograd (accumulated into .grad) stays below half of one [N, V] float32 logits buffer, and grows
    by less than a quarter of the logits' growth from V = 32000 to 128256 (N = 256, H = 64, float32, CPU)."""
    small, big = (memory_results[f"{key}/{v}"] for v in MEMORY_VOCABS)
    extra = {v: r["extra"] - r["grad_bytes"] for v, r in zip(MEMORY_VOCABS, (small, big))}
    report = (f"{key}: extra {_mb(extra[32000])} at V=32000 (logits {_mb(small['logits_bytes'])}), "
              f"{_mb(extra[128256])} at V=128256 (logits {_mb(big['logits_bytes'])}); raw peak-minus-baseline "
              f"{_mb(small['extra'])} / {_mb(big['extra'])}, gradient bytes {_mb(small['grad_bytes'])} / "
              f"{_mb(big['grad_bytes'])}")
    print(report)
    for v, r in zip(MEMORY_VOCABS, (small, big)):
        assert extra[v] < 0.5 * r["logits_bytes"], f"peak beyond inputs exceeds half a logits buffer: {report}"
    growth, logits_growth = extra[128256] - extra[32000], big["logits_bytes"] - small["logits_bytes"]
    assert growth < 0.25 * logits_growth, (f"grows by {growth / logits_growth:.3f} of the logits' growth "
                                           f"(limit 0.25): {report}")


# ----------------------------------------------------------------------------------------------------------
# 16-bit matmuls (the CUDA path for bf16/fp16 weights), run on the CPU
# ----------------------------------------------------------------------------------------------------------

def sixteen_bit_matmuls(monkeypatch, rows, blocks_per_group, vocab):
    """The CUDA path for bf16/fp16 weights (16-bit matmuls with float32 output, the logit gradient gathered in a
    16-bit group buffer), run on the CPU: the weight is not upcast and the float32-output matmul is emulated exactly
    (products of 16-bit numbers are exact in float32). Blocks of ``rows`` rows, groups of ``blocks_per_group``
    blocks; returns the list that records each pull-back's (a, b, dtype of dz, rows of dz)."""
    monkeypatch.setattr(fused_linear._Head, "__post_init__", lambda self: setattr(self, "_fp32_weight", None))
    monkeypatch.setattr(fused_linear, "_mm_float32_out", lambda x, w_t: x.float() @ w_t.float())
    monkeypatch.setattr(fused_linear, "GROUP_BLOCKS", blocks_per_group)
    monkeypatch.setattr(fused_linear, "MAX_GROUPED_BYTES",
                        rows * vocab * (fused_linear.BYTES_PER_LOGIT + 2 * blocks_per_group))
    pulled = []
    original = fused_linear._Head.pull_back

    def pull_back(self, dx, a, b, grads):
        pulled.append((a, b, dx.dtype, dx.shape[0]))
        return original(self, dx, a, b, grads)
    monkeypatch.setattr(fused_linear._Head, "pull_back", pull_back)
    return pulled


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["reverse_kl", "jsd", "minillm"])
def test_sixteen_bit_matmul_path(monkeypatch, dtype, op):
    """The CUDA path for bf16/fp16 weights run on the CPU (``sixteen_bit_matmuls``): values and gradients against
    the float64 reference, blocks of 8 rows in groups of 16 (N = 37)."""
    pulled = sixteen_bit_matmuls(monkeypatch, 8, 2, 1003)
    gen = torch.Generator().manual_seed(5)
    n, h_dim, v = 37, 16, 1003
    h = torch.randn(n, h_dim, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(v, h_dim, generator=gen) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen).to(dtype).requires_grad_()
    th, tw = torch.randn(n, 12, generator=gen).to(dtype), (torch.randn(v - 4, 12, generator=gen) * 0.5).to(dtype)
    tokens = torch.randint(0, v - 4, (n,), generator=gen)
    adv, old, iw = torch.randn(n, generator=gen), torch.randn(n, generator=gen) - 7, torch.ones(n)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    z, u = 10.0 * torch.tanh((h64 @ w64.t() + b64) / 10.0), th.double() @ tw.double().t()
    kw = dict(student_bias=b, softcap=(10.0, None), backend="torch")
    if op == "minillm":
        out = loss.fused_linear_minillm_loss(h, w, th, tw, tokens, adv, old, iw, mask=None, **kw).loss
        want = reference.minillm_loss(z, u, tokens, adv.double(), old.double(), iw.double(), mask=None)["loss"]
    else:
        extra = {"beta": 0.3} if op == "jsd" else {}
        out = getattr(loss, "fused_linear_" + op)(h, w, th, tw, **kw, **extra)
        want = getattr(reference, op)(z, u, **extra)
    assert_close_rel(out, want, loss_tol(dtype))
    got = torch.autograd.grad(out, (h, w, b))
    wanted = torch.autograd.grad(want, (h64, w64, b64))
    for x, y in zip(got, wanted):
        assert x.dtype == dtype
        assert_close_rel(x, y, grad_tol(dtype))
    assert [p[:2] for p in pulled] == [(0, 16), (16, 32), (32, 37)]


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/sum", "reverse_kl/none", "jsd_0.3", "jsd_0.3/none",
                                "minillm", "pt"])
def test_sixteen_bit_groups(fast_backend, op, softcap, gen, monkeypatch):
    """16-bit matmuls (``sixteen_bit_matmuls``) pull the logit gradient back once per group of blocks: N = 41 in
    blocks of 3 rows and groups of 4 blocks (12 rows), the last group partial (36:41, two blocks, the last one of 2
    rows). Each group is pulled back once (reduction="none": in backward), over its rows, in 16 bits; values and the
    gradients of the student's hidden states, weight and bias match the float64 reference and the logits op on
    materialised logits. Soft-capping forms dz a slice at a time; without it reverse KL takes the backend's in-place
    primitive where it has one (cpu)."""
    op, _, reduction = op.partition("/")
    n, vs, vt = 41, 61, 64
    pulled = sixteen_bit_matmuls(monkeypatch, 3, 4, vt)
    assert fused_linear.rows_per_block_and_group(n, vt) == (3, 12)
    calls = _count_blocks(monkeypatch)
    s, t = make_head(gen, (n,), 8, vs, BF16, bias=True), make_head(gen, (n,), 6, vt, BF16, bias=True)
    kw = dict(mask=seeded_mask(gen, (n,))) if op != "pt" else {}
    if reduction:
        kw["reduction"] = reduction
    check_fused(op, fast_backend, s, t, gen=gen, softcap=(softcap, None), compare_logits_op=True, **kw)
    groups = [(0, 12), (12, 24), (24, 36), (36, 41)]
    assert pulled == [(a, b, BF16, b - a) for a, b in groups]
    # The gradient's sweep (reduction="none": backward's; the forward's, with no gradient to form, is in blocks of
    # rows_per_block rows).
    blocks = [(a, min(n, a + 3)) for a in range(0, n, 3)]
    assert calls[-len(blocks):] == blocks


@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "minillm", "pt", "jsd_0.3"])
@pytest.mark.parametrize("logit_scale", [None, 0.7])
def test_sixteen_bit_groups_written_into(op, logit_scale, gen, monkeypatch):
    """Where the backend writes a block's gradient straight into its rows of the 16-bit group buffer
    (``logits_grad_into``, the CUDA extension's; here the torch backend given its composition), the blocked path
    uses it once per block instead of forming float32 slices and copying them (JSD, whose gradient has no such form,
    keeps the slices), with the logit scale folded into the weights. Values and gradients against the float64
    reference and the logits op."""
    op, _, reduction = op.partition("/")
    n, vs, vt = 41, 61, 64
    pulled = sixteen_bit_matmuls(monkeypatch, 3, 4, vt)
    written = []

    def logits_grad_into(z, u, tokens, stats, coef, inv_temp, out):
        assert out.dtype == BF16 and out.shape == z.shape
        written.append(out.shape[0])
        out.copy_(torch_backend.logits_grad(z, u, tokens, stats, coef, inv_temp))
    monkeypatch.setattr(torch_backend, "logits_grad_into", logits_grad_into, raising=False)
    s, t = make_head(gen, (n,), 8, vs, BF16, bias=True), make_head(gen, (n,), 6, vt, BF16, bias=True)
    kw = dict(mask=seeded_mask(gen, (n,))) if op != "pt" else {}
    if reduction:
        kw["reduction"] = reduction
    check_fused(op, "torch", s, t, gen=gen, logit_scale=logit_scale, compare_logits_op=True, **kw)
    assert pulled == [(a, b, BF16, b - a) for a, b in [(0, 12), (12, 24), (24, 36), (36, 41)]]
    blocks = [min(n, a + 3) - a for a in range(0, n, 3)]
    assert written == ([] if op.startswith("jsd") else blocks)


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process (an in-memory store), destroyed afterwards."""
    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "minillm"])
def test_sixteen_bit_groups_vocabulary_parallel(op, gen, monkeypatch, one_rank_group):
    """The vocabulary-parallel path (``process_group``; one rank here, tests/test_distributed_ops.py runs 2 and 4 in
    float32) on 16-bit matmuls: the groups are pulled back as without a group, and the results are the same."""
    op, _, reduction = op.partition("/")
    n, v = 41, 64
    pulled = sixteen_bit_matmuls(monkeypatch, 3, 4, v)
    s, t = make_head(gen, (n,), 8, v, BF16, bias=True), make_head(gen, (n,), 6, v, BF16)
    aux = make_aux(OPS[op], gen, (n,), v, (s.hidden.double() @ s.weight.double().T).detach())
    kw = dict(softcap=(5.0, None), backend="torch", mask=seeded_mask(gen, (n,)),
              **({"reduction": reduction} if reduction else {}))
    upstream = upstream_weight(gen, (n,)) if reduction else None
    alone = run_fused(op, s, t, aux, upstream=upstream, **kw)
    sharded = run_fused(op, s, t, aux, upstream=upstream, process_group=one_rank_group, **kw)
    groups = [(0, 12), (12, 24), (24, 36), (36, 41)]
    assert pulled == 2 * [(a, b, BF16, b - a) for a, b in groups]
    for name in alone.out:  # the same up to the order of float32 sums (the statistics are merged over ranks)
        assert_close_rel(sharded.out[name], alone.out[name], 1e-6, what=name)
    for name, x, y in zip(("hidden", "weight", "bias"), grads_of(sharded.student), grads_of(alone.student)):
        assert_close_rel(x, y, 1e-3, what=f"d/d {name}")  # and a few 16-bit roundings of dz


def test_sixteen_bit_no_rows(monkeypatch, gen):
    """N = 0 on the 16-bit path: 0.0 with zero gradients (one empty block closes one empty group)."""
    pulled = sixteen_bit_matmuls(monkeypatch, 3, 4, 30)
    s, t = make_head(gen, (0,), 8, 30, BF16, bias=True), make_head(gen, (0,), 8, 30, BF16)
    res = run_fused("reverse_kl", s, t, (), backend="torch")
    assert res.value == 0 and pulled == [(0, 0, BF16, 0)]
    assert (res.student.weight.grad == 0).all() and (res.student.bias.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------
# The block-size knob (MINILLM_FAST_FUSED_LINEAR_BLOCKS)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, want", [("", None), ("  ", None), ("8,16", (8, 16)), (" 8 , 24 ", (8, 24)),
                                         ("8", (8, None)), ("1,1", (1, 1)), ("512,1536", (512, 1536))])
def test_blocks_knob_parses(value, want, monkeypatch):
    monkeypatch.setenv(fused_linear.BLOCKS_ENV, value)
    assert fused_linear.blocks_override() == want


def test_blocks_knob_unset(monkeypatch):
    monkeypatch.delenv(fused_linear.BLOCKS_ENV, raising=False)
    assert fused_linear.blocks_override() is None


@pytest.mark.parametrize("value", ["a", "8,x", "8.0", "8;16", "0", "-1", "0,8", "8,12", "8,0", "8,-8", "8,4",
                                   "8,16,32", ",16", "8,"])
def test_blocks_knob_rejects_malformed_values(value, monkeypatch, gen):
    """A malformed value is a ValueError naming the variable: from the parser and from an op (read per call)."""
    monkeypatch.setenv(fused_linear.BLOCKS_ENV, value)
    with pytest.raises(ValueError, match=fused_linear.BLOCKS_ENV):
        fused_linear.blocks_override()
    s, t = make_head(gen, (5,), 4, 11), make_head(gen, (5,), 4, 11)
    with pytest.raises(ValueError, match=fused_linear.BLOCKS_ENV):
        loss.fused_linear_reverse_kl(s.hidden, s.weight, t.hidden, t.weight, backend="torch")


def test_block_sizes():
    """Without the knob, ``block_sizes`` is ``rows_per_block`` / ``rows_per_block_and_group`` (the default is
    unchanged); with it, the knob's sizes clamped to [1, N], G = GROUP_BLOCKS n where it gives only n, and no
    group where the matmuls run in float32."""
    for n_rows, v in ((1, 7), (37, 1000), (8192, 128256), (65536, 152064), (0, 30)):
        assert fused_linear.block_sizes(n_rows, v, False) == (fused_linear.rows_per_block(n_rows, v), None)
        assert fused_linear.block_sizes(n_rows, v, True) == fused_linear.rows_per_block_and_group(n_rows, v)
    n, v = 8192, 128256
    assert fused_linear.block_sizes(n, v, True, (512, 1024)) == (512, 1024)
    assert fused_linear.block_sizes(n, v, False, (512, 1024)) == (512, None)
    assert fused_linear.block_sizes(n, v, True, (384, None)) == (384, 384 * fused_linear.GROUP_BLOCKS)
    assert fused_linear.block_sizes(n, v, False, (384, None)) == (384, None)
    assert fused_linear.block_sizes(100, v, True, (64, 128)) == (64, 100)  # one group of all rows
    assert fused_linear.block_sizes(100, v, True, (512, 1024)) == (100, 100)
    assert fused_linear.block_sizes(100, v, False, (512, None)) == (100, None)
    assert fused_linear.block_sizes(0, v, True, (8, 16)) == (1, 1)


@pytest.mark.parametrize("knob, groups", [("5,10", [(0, 10), (10, 20), (20, 30), (30, 40), (40, 41)]),
                                          ("5,15", [(0, 15), (15, 30), (30, 41)]),
                                          ("5", [(0, 20), (20, 40), (40, 41)]),  # G = GROUP_BLOCKS (4 here) n
                                          ("64,128", [(0, 41)])])
@pytest.mark.parametrize("op", ["reverse_kl", "reverse_kl/none", "minillm"])
def test_blocks_knob_sets_the_groups(op, knob, groups, gen, monkeypatch):
    """16-bit matmuls (``sixteen_bit_matmuls``: blocks of 3 rows in groups of 12 by default, N = 41): the knob's
    blocks and groups are the ones run; values and gradients those of the default blocks (checked against the
    float64 reference), the weight gradient, accumulated in bf16 once per group, to bf16 rounding."""
    op, _, reduction = op.partition("/")
    n, vs, vt = 41, 61, 64
    pulled = sixteen_bit_matmuls(monkeypatch, 3, 4, vt)
    calls = _count_blocks(monkeypatch)
    s, t = make_head(gen, (n,), 8, vs, BF16, bias=True), make_head(gen, (n,), 6, vt, BF16, bias=True)
    kw = dict(mask=seeded_mask(gen, (n,)), **({"reduction": reduction} if reduction else {}))
    monkeypatch.delenv(fused_linear.BLOCKS_ENV, raising=False)
    default = check_fused(op, "torch", s, t, gen=gen, **kw)
    assert [p[:2] for p in pulled] == [(0, 12), (12, 24), (24, 36), (36, 41)]
    monkeypatch.setenv(fused_linear.BLOCKS_ENV, knob)
    pulled.clear()
    calls.clear()
    forced = run_fused(op, s, t, default.aux, upstream=default.upstream, backend="torch", **kw)
    assert pulled == [(a, b, BF16, b - a) for a, b in groups]
    step = min(n, int(knob.split(",")[0]))
    assert calls[-len(range(0, n, step)):] == [(a, min(n, a + step)) for a in range(0, n, step)]
    assert_same_results(forced, default, grad_tol(BF16))


def test_blocks_knob_is_read_when_the_call_begins(gen, monkeypatch):
    """reduction="none" recomputes the blocks in backward with the sizes read when the call began."""
    n = 23
    s, t = make_head(gen, (n,), 8, 30), make_head(gen, (n,), 6, 30)
    calls = _count_blocks(monkeypatch)
    monkeypatch.setenv(fused_linear.BLOCKS_ENV, "4")
    student = leaves(s, (True, True, False))
    out = loss.fused_linear_reverse_kl(student.hidden, student.weight, t.hidden, t.weight, reduction="none",
                                       backend="torch")
    monkeypatch.delenv(fused_linear.BLOCKS_ENV)
    calls.clear()
    out.backward(torch.ones(n))
    assert calls == [(a, min(n, a + 4)) for a in range(0, n, 4)]


@pytest.mark.parametrize("op,extra", [("reverse_kl", {}), ("reverse_kl/sum", {}), ("reverse_kl/none", {}),
                                      ("forward_kl", {}), ("minillm", {}), ("minillm", {"single_step": False}),
                                      ("pt", {}), ("jsd_0.3", {})])
@pytest.mark.parametrize("logit_scale", [None, 0.7])
def test_sixteen_bit_groups_grad_in_pass(op, extra, logit_scale, gen, monkeypatch):
    """Opted in (``MINILLM_FAST_GRAD_IN_PASS=1``), where the backend has ``row_stats_grad_into`` (the CUDA
    extension's; here the torch backend given its composition), a block's statistics' pass also writes its dz into
    its rows of the 16-bit group buffer, with coefficients planned from the mask (policy factor in the kernel for
    MiniLLM, logit scale folded in): once per block of the forward's sweep; not for reduction="none" (backward
    recomputes the blocks with the forward's statistics) nor JSD. Values and gradients against the float64
    reference and the logits op (the kernel itself, empty rows included: tests/test_cuda_backend.py)."""
    from minillm_fast.loss import row_stats_grad_composed
    op, _, reduction = op.partition("/")
    n, vs, vt = 41, 61, 64
    pulled = sixteen_bit_matmuls(monkeypatch, 3, 4, vt)
    monkeypatch.setenv("MINILLM_FAST_GRAD_IN_PASS", "1")
    passes = []

    def row_stats_grad_into(z, u, tokens, coef, policy, clip_eps, inv_temp, out):
        assert out.dtype == BF16 and out.shape == z.shape and coef.shape == (z.shape[0], 4)
        passes.append(out.shape[0])
        stats, dz = row_stats_grad_composed(torch_backend, z, u, tokens, coef, policy, clip_eps, inv_temp, out.dtype)
        out.copy_(dz)
        return stats
    monkeypatch.setattr(torch_backend, "row_stats_grad_into", row_stats_grad_into, raising=False)
    s, t = make_head(gen, (n,), 8, vs, BF16, bias=True), make_head(gen, (n,), 6, vt, BF16, bias=True)
    kw = dict(mask=seeded_mask(gen, (n,))) if op != "pt" else {}
    kw.update(extra)
    if reduction:
        kw["reduction"] = reduction
    check_fused(op, "torch", s, t, gen=gen, logit_scale=logit_scale, compare_logits_op=True, **kw)
    assert pulled == [(a, b, BF16, b - a) for a, b in [(0, 12), (12, 24), (24, 36), (36, 41)]]
    blocks = [min(n, a + 3) - a for a in range(0, n, 3)]
    assert passes == ([] if op.startswith("jsd") or reduction == "none" else blocks)

"""The gradient-in-the-forward-pass glue of ``minillm_fast.loss`` (``_row_pass`` / ``_with_grad_from_pass``).

The CUDA backend's optional ``row_stats_grad`` primitive forms the student's gradient in the row pass (opt-in:
``MINILLM_FAST_GRAD_IN_PASS=1``); its kernel is tested in tests/test_cuda_backend.py (GPU, or the CPU emulator).
Here the torch backend is given the primitive's reference composition (``loss.row_stats_grad_composed``), so
that on any machine every op that can take the path is checked against the same op without it: values and
gradients, masks with empty rows (the denominator the kernel assumed is corrected), ``num_tokens``, "sum", upstream
gradients other than 1, ``single_step``, and the cases that must not take the path.
"""
from __future__ import annotations

import pytest
import torch

from minillm_fast import loss
from minillm_fast.backends import torch_backend


@pytest.fixture
def fused(monkeypatch):
    """Opts in, and gives the torch backend row_stats_grad; returns the call log."""
    monkeypatch.setenv(loss.GRAD_IN_PASS_ENV, "1")
    calls = {"row_stats_grad": 0}

    def row_stats_grad(z, u, tokens, coef, policy, clip_eps, inv_temp, grad_dtype):
        calls["row_stats_grad"] += 1
        return loss.row_stats_grad_composed(torch_backend, z, u, tokens, coef, policy, clip_eps, inv_temp,
                                            grad_dtype)

    monkeypatch.setattr(torch_backend, "row_stats_grad", row_stats_grad, raising=False)
    return calls


def _inputs(n=12, v=37, seed=0, empty_rows=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 2).to(dtype)
    u = (torch.randn(n, v, generator=g) * 2).to(dtype)
    for r in empty_rows:
        u[r] = float("-inf")  # an empty teacher distribution: the row is treated as masked
    tokens = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    mask[0] = True
    return z, u, tokens, mask


def _run(op, z, u, upstream=1.0):
    zz = z.clone().requires_grad_(True)
    out = op(zz, u)
    value = out if isinstance(out, torch.Tensor) else out[0]
    (value * upstream).sum().backward()
    return out, zz.grad


def _compare(op, z, u, upstream=1.0, fused_calls=None, expect_fused=True):
    before = fused_calls["row_stats_grad"]
    got, got_grad = _run(op, z, u, upstream)
    assert fused_calls["row_stats_grad"] == before + (1 if expect_fused else 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.delattr(torch_backend, "row_stats_grad")
        want, want_grad = _run(op, z, u, upstream)
    got_t = [got] if isinstance(got, torch.Tensor) else list(got)
    want_t = [want] if isinstance(want, torch.Tensor) else list(want)
    for a, b in zip(got_t, want_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert got_grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("which", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("empty_rows", [(), (3, 5)])
def test_divergences(fused, which, reduction, empty_rows):
    z, u, _, mask = _inputs(empty_rows=empty_rows)
    mask[3] = True  # an empty row the mask allows: the kernel's planned denominator counts it, the op does not
    fn = getattr(loss, which)
    _compare(lambda a, b: fn(a, b, mask=mask, reduction=reduction, temperature=1.7, backend="torch"), z, u,
             fused_calls=fused)


@pytest.mark.parametrize("upstream", [1.0, 0.25, -3.0])
def test_upstream_gradient_scales_the_formed_gradient(fused, upstream):
    z, u, _, mask = _inputs(seed=1, empty_rows=(2,))
    _compare(lambda a, b: loss.reverse_kl(a, b, mask=mask, backend="torch"), z, u, upstream, fused_calls=fused)


@pytest.mark.parametrize("single_step", [True, False])
@pytest.mark.parametrize("num_tokens", [None, 40])
@pytest.mark.parametrize("empty_rows", [(), (4,)])
def test_minillm_loss(fused, single_step, num_tokens, empty_rows):
    z, u, tokens, mask = _inputs(seed=2, empty_rows=empty_rows)
    n = z.shape[0]
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(n, generator=g)
    old = torch.randn(n, generator=g) - 3.0
    w = torch.rand(n, generator=g) + 0.5

    def op(a, b):
        return loss.minillm_loss(a, b, tokens, adv, old, w, mask=mask, clip_eps=0.2, temperature=1.3,
                                 single_step=single_step, num_tokens=num_tokens, backend="torch")
    _compare(op, z, u, 2.0, fused_calls=fused)


@pytest.mark.parametrize("num_tokens", [None, 30])
def test_pt_loss(fused, num_tokens):
    z, u, tokens, _ = _inputs(seed=3, empty_rows=(1,))
    tokens[5] = -100
    _compare(lambda a, b: loss.pt_loss(a, b, tokens, kd_ratio=0.3, num_tokens=num_tokens, backend="torch"), z, u,
             fused_calls=fused)


def test_bf16_logits(fused):
    z, u, _, mask = _inputs(seed=4, dtype=torch.bfloat16)
    _compare(lambda a, b: loss.reverse_kl(a, b, mask=mask, backend="torch"), z, u, fused_calls=fused)


def test_paths_that_keep_two_passes(fused):
    z, u, _, mask = _inputs(seed=5)
    # reduction="none": a per-row upstream gradient; jsd: a second statistics pass first
    _compare(lambda a, b: loss.reverse_kl(a, b, mask=mask, reduction="none", backend="torch"), z, u,
             torch.arange(12.0), fused_calls=fused, expect_fused=False)
    _compare(lambda a, b: loss.jsd(a, b, beta=0.3, backend="torch"), z, u, fused_calls=fused, expect_fused=False)
    # no gradient needed: nothing is formed
    loss.reverse_kl(z, u, backend="torch")
    with torch.no_grad():
        loss.reverse_kl(z.clone().requires_grad_(True), u, backend="torch")
    assert fused["row_stats_grad"] == 0


def test_scale_primitive_used_and_second_backward_raises(fused, monkeypatch):
    factors = []

    def scale_unless_one_(x, factor):
        factors.append(float(factor))
        if float(factor) != 1.0:
            x.mul_(factor)
    monkeypatch.setattr(torch_backend, "scale_unless_one_", scale_unless_one_, raising=False)
    z, u, _, mask = _inputs(seed=6, empty_rows=(2,))
    mask[2] = True
    zz = z.clone().requires_grad_(True)
    kl = loss.reverse_kl(zz, u, mask=mask, backend="torch")
    (kl * 0.5).backward(retain_graph=True)
    planned, actual = int(mask.sum()), int(mask.sum()) - 1
    assert factors == [pytest.approx(0.5 * planned / actual)]
    with pytest.raises(RuntimeError, match="second time"):
        kl.backward()


def test_off_unless_opted_in(fused, monkeypatch):
    monkeypatch.delenv(loss.GRAD_IN_PASS_ENV)
    z, u, _, _ = _inputs(seed=7)
    _run(lambda a, b: loss.reverse_kl(a, b, backend="torch"), z, u)
    assert fused["row_stats_grad"] == 0

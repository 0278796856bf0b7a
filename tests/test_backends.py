"""Backend selection and cross-backend agreement: available_backends(), backend="auto", every available backend
against the torch backend on the same inputs, and a cheap 64-bit-offset check (rows beyond 2^31 elements of a
sparse memory-mapped file)."""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import pytest
import torch

import minillm_fast
from minillm_fast import _dispatch, loss, sampling
from _helpers import (assert_close_rel, backend_unavailable_reason, make_logits, missing_cpu_kernels, seeded_mask,
                      upstream_weight)

REPO = Path(__file__).resolve().parents[1]


def test_available_backends():
    names = minillm_fast.available_backends()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert "torch" in names
    assert set(names) <= {"cuda", "triton", "cpu", "torch"}
    assert len(set(names)) == len(names)


def test_cpu_backend_builds_when_its_sources_exist():
    """If csrc/cpu has C++ sources, the cpu backend must build and load (a silent fallback would hide a broken
    build from every other test, which then only runs the torch backend)."""
    if os.environ.get("MINILLM_FAST_NO_JIT"):
        pytest.skip("MINILLM_FAST_NO_JIT is set")
    if not glob.glob(str(REPO / "csrc" / "cpu" / "*.cpp")):
        pytest.skip("no C++ sources under csrc/cpu (yet)")
    assert "cpu" in minillm_fast.available_backends(), "csrc/cpu exists but the cpu extension did not build/load"


def test_available_cpu_backend_has_its_kernels():
    """'cpu' listed as available must mean its operators are registered for CPU tensors (an extension that
    builds from the module stub alone would otherwise be 'available' and fail on first use)."""
    if "cpu" not in minillm_fast.available_backends():
        pytest.skip("the cpu backend is not available")
    missing = missing_cpu_kernels()
    assert not missing, (f"available_backends() lists 'cpu' (and backend='auto' picks it for CPU tensors), but the "
                         f"extension registers no CPU kernel for: {missing}")


def test_triton_backend_runs_under_the_interpreter():
    if (REPO / "minillm_fast" / "backends" / "triton_backend.py").exists() and not torch.cuda.is_available():
        reason = backend_unavailable_reason("triton")
        assert reason is None or "not installed" in reason, reason
    else:
        pytest.skip("no triton backend, or a GPU is present")


def test_auto_picks_a_cpu_backend_for_cpu_tensors():
    chosen = _dispatch.get_backend("auto", torch.device("cpu"))
    expected = "cpu" if "cpu" in minillm_fast.available_backends() else "torch"
    assert getattr(chosen, "name", None) == expected, "auto must pick the fastest backend for CPU tensors"


@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd", "token_stats", "minillm_loss", "pt_loss",
                                "sample_mixture"])
def test_auto_works_for_every_op(op, gen):
    z, u = make_logits(gen, (2, 3, 29)), make_logits(gen, (2, 3, 29))
    tokens = torch.randint(0, 29, (2, 3), generator=gen)
    mask = seeded_mask(gen, (2, 3))
    expected = "cpu" if "cpu" in minillm_fast.available_backends() else "torch"
    zeros, ones = torch.zeros(2, 3), torch.ones(2, 3)
    calls = {
        "reverse_kl": lambda b: loss.reverse_kl(z, u, mask=mask, backend=b),
        "forward_kl": lambda b: loss.forward_kl(z, u, mask=mask, backend=b),
        "jsd": lambda b: loss.jsd(z, u, mask=mask, backend=b),
        "token_stats": lambda b: torch.stack(list(loss.token_stats(z, u, tokens, mask=mask, backend=b))),
        "minillm_loss": lambda b: torch.stack(list(loss.minillm_loss(z, u, tokens, ones, zeros - 3, ones, mask=mask,
                                                                     backend=b))),
        "pt_loss": lambda b: torch.stack(list(loss.pt_loss(z, u, tokens, backend=b))),
        "sample_mixture": lambda b: sampling.sample_mixture(z, u, generator=torch.Generator().manual_seed(1),
                                                            backend=b),
    }
    auto = calls[op]("auto")
    torch.testing.assert_close(auto, calls[op](expected), rtol=0, atol=0)
    # The default is "auto".
    if op in ("reverse_kl", "forward_kl", "jsd"):
        torch.testing.assert_close(getattr(loss, op)(z, u, mask=mask), auto, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Every backend agrees with the torch backend
# ----------------------------------------------------------------------------------------------------------

def _skip_torch(backend):
    if backend == "torch":
        pytest.skip("the torch backend is the baseline of this comparison")


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16)], ids=["f32", "bf16/f32", "f16"])
def test_backends_agree_on_divergences(backend, dtypes, gen):
    _skip_torch(backend)
    dz, du = dtypes
    n, v = 6, 230
    z, u = make_logits(gen, (n, v + 3), dz), make_logits(gen, (n, v), du)
    z[1, :5], u[1, :5] = -math.inf, -math.inf
    z[2] = -math.inf
    mask = seeded_mask(gen, (n,), 0.8)
    up = upstream_weight(gen, (n,))
    for op, kw in (("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.3})):
        results = {}
        for b in ("torch", backend):
            zz = z.clone().requires_grad_(True)
            out = getattr(loss, op)(zz, u, mask=mask, temperature=1.4, reduction="none", backend=b, **kw)
            out.backward(up)
            results[b] = (out.detach(), zz.grad)
        tol_loss = 2e-5 if dz == du == torch.float32 else 1e-4
        assert_close_rel(results[backend][0], results["torch"][0], tol_loss, what=f"{op} value")
        grad_tol = 1e-4 if dz == torch.float32 else torch.finfo(dz).eps + 1e-3  # both round to dz
        assert_close_rel(results[backend][1], results["torch"][1], grad_tol, what=f"{op} gradient")


def test_backends_agree_on_minillm_ops(backend, gen):
    _skip_torch(backend)
    n, v = 7, 150
    z, u = make_logits(gen, (n, v)), make_logits(gen, (n, v))
    tokens = torch.randint(0, v, (n,), generator=gen)
    mask = seeded_mask(gen, (n,))
    a = {b: loss.token_stats(z, u, tokens, alpha=0.2, mask=mask, backend=b) for b in ("torch", backend)}
    for name in a["torch"]._fields:
        assert_close_rel(getattr(a[backend], name), getattr(a["torch"], name), 2e-5, what=name)
    adv = torch.randn(n, generator=gen)
    old = a["torch"].student_logprob + 0.2 * torch.randn(n, generator=gen)
    w = a["torch"].importance_weight
    outs, grads = {}, {}
    for b in ("torch", backend):
        zz = z.clone().requires_grad_(True)
        outs[b] = loss.minillm_loss(zz, u, tokens, adv, old, w, mask=mask, backend=b)
        outs[b].loss.backward()
        grads[b] = zz.grad
    for name in outs["torch"]._fields:
        assert_close_rel(getattr(outs[backend], name), getattr(outs["torch"], name), 2e-5, what=name)
    assert_close_rel(grads[backend], grads["torch"], 1e-4, what="minillm_loss gradient")
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    outs, grads = {}, {}
    for b in ("torch", backend):
        zz = z.clone().requires_grad_(True)
        outs[b] = loss.pt_loss(zz, u, labels, kd_ratio=0.4, backend=b)
        outs[b].loss.backward()
        grads[b] = zz.grad
    for name in outs["torch"]._fields:
        assert_close_rel(getattr(outs[backend], name), getattr(outs["torch"], name), 2e-5, what=name)
    assert_close_rel(grads[backend], grads["torch"], 1e-4, what="pt_loss gradient")


def test_backends_agree_on_sampling(backend, gen):
    """Same generator, same uniforms, same inverse-CDF draw (backends/__init__.py): the tokens agree, up to rare
    float32 ties at a CDF boundary."""
    _skip_torch(backend)
    n = 24 if backend == "triton" else 2000
    z, u = make_logits(gen, (n, 37)), make_logits(gen, (n, 37))
    z[:, 3] = -math.inf
    a = sampling.sample_mixture(z, u, alpha=0.3, generator=torch.Generator().manual_seed(4), backend="torch")
    b = sampling.sample_mixture(z, u, alpha=0.3, generator=torch.Generator().manual_seed(4), backend=backend)
    assert (a == b).float().mean().item() >= 0.98, (a != b).sum()


# ----------------------------------------------------------------------------------------------------------
# 64-bit offsets
# ----------------------------------------------------------------------------------------------------------

def _rows_beyond_2_31(tmp_path, values: torch.Tensor, name: str):
    """A [2, V] float32 view whose second row starts 2^31 + 64 elements after the first, in a sparse
    memory-mapped file: only the touched pages exist, so this costs kilobytes, not 8 GB."""
    gap = 2 ** 31 + 64
    v = values.shape[1]
    size = gap + v
    path = tmp_path / f"{name}.bin"
    try:
        with open(path, "wb") as f:
            f.truncate(size * 4)
        flat = torch.from_file(str(path), shared=True, size=size, dtype=torch.float32)
    except (OSError, RuntimeError) as exc:  # no sparse files or no address space: out of scope here
        pytest.skip(f"cannot map a sparse 8 GiB file: {exc}")
    view = flat.as_strided((2, v), (gap, 1))
    view.copy_(values)
    return view


def test_64bit_row_offsets(backend, gen, tmp_path):
    """Rows whose element offset exceeds 2^31 (design: offsets are 64-bit). Reading the second row with a
    32-bit offset would read the wrong memory (or crash)."""
    v = 300
    zv, uv = make_logits(gen, (2, v)), make_logits(gen, (2, v))
    z_big = _rows_beyond_2_31(tmp_path, zv, "student").detach().requires_grad_(True)
    u_big = _rows_beyond_2_31(tmp_path, uv, "teacher")
    assert z_big.stride(0) > 2 ** 31
    tokens = torch.tensor([3, 250])
    for op in ("reverse_kl", "jsd"):
        out = getattr(loss, op)(z_big, u_big, reduction="none", backend=backend)
        want = getattr(loss, op)(zv, uv, reduction="none", backend="torch")
        torch.testing.assert_close(out, want, rtol=2e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(out.sum(), z_big)
        zz = zv.clone().requires_grad_(True)
        getattr(loss, op)(zz, uv, reduction="none", backend="torch").sum().backward()
        torch.testing.assert_close(grad, zz.grad, rtol=1e-4, atol=1e-7)
    stats = loss.token_stats(z_big.detach(), u_big, tokens, backend=backend)
    want = loss.token_stats(zv, uv, tokens, backend="torch")
    for name in want._fields:
        torch.testing.assert_close(getattr(stats, name), getattr(want, name), rtol=2e-5, atol=1e-6)
    a = sampling.sample_mixture(z_big.detach(), u_big, generator=torch.Generator().manual_seed(2), backend=backend)
    b = sampling.sample_mixture(zv, uv, generator=torch.Generator().manual_seed(2), backend="torch")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# Triton: rows spanning many blocks (the other tests use rows that fit one block, for the interpreter's sake)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton
def test_triton_public_ops_with_multi_block_rows(gen, monkeypatch):
    reason = backend_unavailable_reason("triton")
    if reason:
        pytest.skip(reason)
    from minillm_fast.backends import triton_backend
    if not hasattr(triton_backend, "CONFIG"):
        pytest.skip("triton_backend.CONFIG (block sizes) not found")
    monkeypatch.setattr(triton_backend, "CONFIG", {k: (32, 1) for k in triton_backend.CONFIG})
    from minillm_fast import reference
    n, v = 4, 203  # 7 blocks of 32 per row
    z, u = make_logits(gen, (n, v + 5)), make_logits(gen, (n, v))
    z[0, 150:160] += 30.0  # the running max grows in a late block (rescaling of the partial sums)
    u[1, 190:] += 40.0
    z[2, :40], u[2, :40] = -math.inf, -math.inf  # whole leading blocks masked
    tokens = torch.tensor([155, 3, 100, 202])
    mask = torch.tensor([True, True, True, False])
    up = upstream_weight(gen, (n,))
    for op, kw in (("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.4})):
        zz = z.clone().requires_grad_(True)
        out = getattr(loss, op)(zz, u, mask=mask, temperature=0.9, reduction="none", backend="triton", **kw)
        out.backward(up)
        ref_fn = getattr(reference, op)
        z64 = z.double().clamp(min=-1e300).requires_grad_(True)
        ref = ref_fn(z64, u.double().clamp(min=-1e300), mask=mask, temperature=0.9, reduction="none", **kw)
        ref.backward(up.double())
        assert_close_rel(out, ref_fn(z, u, mask=mask, temperature=0.9, reduction="none", **kw), 2e-5, what=op)
        assert_close_rel(zz.grad, z64.grad, 1e-4, what=f"{op} gradient")
    stats = loss.token_stats(z, u, tokens, mask=mask, backend="triton")
    ref = reference.token_stats(z, u, tokens, mask=mask)
    for name in stats._fields:
        assert_close_rel(getattr(stats, name), ref[name], 2e-5, what=name)
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    zz = z.clone().requires_grad_(True)
    out = loss.pt_loss(zz, u, labels, backend="triton")
    out.loss.backward()
    z64 = z.double().clamp(min=-1e300).requires_grad_(True)
    ref = reference.pt_loss(z64, u.double().clamp(min=-1e300), labels)
    ref["loss"].backward()
    assert_close_rel(out.loss, ref["loss"], 2e-5, what="pt_loss")
    assert_close_rel(zz.grad, z64.grad, 1e-4, what="pt_loss gradient")
    a = sampling.sample_mixture(z, u, alpha=0.3, generator=torch.Generator().manual_seed(3), backend="triton")
    b = sampling.sample_mixture(z, u, alpha=0.3, generator=torch.Generator().manual_seed(3), backend="torch")
    assert torch.equal(a, b)

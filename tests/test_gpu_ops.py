"""The public ops on CUDA tensors, for every GPU backend, against the float64 reference (skipped without a GPU).

The CPU suite already covers the semantics in depth; this file checks that the GPU kernels compute the same
functions: every op, every dtype, odd and padded vocabularies, -inf entries, extreme logits, one large row set.
"""
import math

import pytest
import torch

import minillm_fast
from minillm_fast import loss, reference, sampling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in minillm_fast.available_backends()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSS_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2 ** -8 + 6e-3, torch.float16: 2 ** -11 + 2e-3}


def grad_tol(ref_grad, dtype):
    """The rounding of the gradient's own dtype (measured on the reference: tiny gradients are subnormal in
    float16) plus the design table's slack."""
    if dtype == torch.float32:
        return GRAD_TOL[dtype]
    rounding = rel_err(ref_grad.to(dtype), ref_grad)
    return rounding + {torch.bfloat16: 6e-3, torch.float16: 2e-3}[dtype]


def finite_reference_logits(x):
    """-inf -> -1e300 for the float64 reference: autograd through log(0) gives NaN gradients (the values are
    identical, since exp(-1e300) is 0 in float64 too)."""
    x = x.detach().double()
    return torch.where(torch.isneginf(x), torch.full_like(x, -1e300), x)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def make_logits(n, v, dtype, *, scale=3.0, neg_inf=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, v, device="cuda", generator=g) * scale
    if neg_inf:
        x[:, ::7] = -math.inf
    return x.to(dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vs,vt", [(7, 7), (1003, 1003), (32003, 32000), (128256, 128256)])
@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence_matches_reference(backend, dtype, vs, vt, op):
    n = 64 if vs < 100000 else 16
    z = make_logits(n, vs, dtype, seed=1).requires_grad_()
    u = make_logits(n, vt, torch.bfloat16 if dtype == torch.float32 else dtype, seed=2, neg_inf=(vs == 1003))
    if vs == 1003:
        with torch.no_grad():
            z[:, ::7] = -math.inf
    mask = torch.rand(n, device="cuda") > 0.2
    kwargs = {"beta": 0.3} if op == "jsd" else {}
    upstream = torch.rand(n, device="cuda")
    out = getattr(loss, op)(z, u, temperature=1.3, mask=mask, reduction="none", backend=backend, **kwargs)
    (out * upstream).sum().backward()
    z64 = finite_reference_logits(z).requires_grad_()
    ref = getattr(reference, op)(z64, finite_reference_logits(u), temperature=1.3, mask=mask, reduction="none",
                                 **kwargs)
    (ref * upstream.double()).sum().backward()
    assert out.dtype == torch.float32 and z.grad.dtype == dtype
    assert rel_err(out, ref) <= LOSS_TOL[dtype]
    assert rel_err(z.grad, z64.grad) <= grad_tol(z64.grad, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_extreme_logits(backend, offset):
    """Nearly one-hot rows sitting at |z| ~ 1e4: a few entries within ~10 of the maximum carry all the mass."""
    n, v = 32, 50000
    z = offset + torch.randn(n, v, device="cuda") * 8
    u = z + torch.randn(n, v, device="cuda") * 2
    z.requires_grad_()
    out = loss.reverse_kl(z, u, reduction="none", backend=backend)
    out.sum().backward()
    z64 = z.detach().double().requires_grad_()
    ref = reference.reverse_kl(z64, u, reduction="none")
    ref.sum().backward()
    assert rel_err(out, ref) <= 2e-5 + 1e-6
    assert torch.isfinite(z.grad).all() and rel_err(z.grad, z64.grad) <= 2e-2


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_minillm_ops_match_reference(backend, dtype):
    n, v = 96, 32003
    z = make_logits(n, v, dtype, seed=3).requires_grad_()
    u = make_logits(n, v + 61, dtype, seed=4)
    tokens = torch.randint(0, v, (n,), device="cuda")
    mask = torch.rand(n, device="cuda") > 0.2
    stats = loss.token_stats(z.detach(), u, tokens, mask=mask, temperature=0.8, backend=backend)
    ref = reference.token_stats(z.detach(), u, tokens, mask=mask, temperature=0.8)
    for name, value in ref.items():
        assert rel_err(getattr(stats, name), value) <= LOSS_TOL[dtype], name

    adv = torch.randn(n, device="cuda")
    old = (stats.student_logprob + 0.3 * torch.randn(n, device="cuda")).detach()
    w = stats.importance_weight
    out = loss.minillm_loss(z, u, tokens, adv, old, w, mask=mask, temperature=0.8, backend=backend)
    out.loss.backward()
    z64 = z.detach().double().requires_grad_()
    ref = reference.minillm_loss(z64, u, tokens, adv, old, w, mask=mask, temperature=0.8)
    ref["loss"].backward()
    assert rel_err(out.loss, ref["loss"]) <= LOSS_TOL[dtype]
    assert rel_err(z.grad, z64.grad) <= grad_tol(z64.grad, dtype)

    z.grad = None
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    out = loss.pt_loss(z, u, labels, temperature=0.8, backend=backend)
    out.loss.backward()
    z64 = z.detach().double().requires_grad_()
    ref = reference.pt_loss(z64, u, labels, temperature=0.8)
    ref["loss"].backward()
    assert rel_err(out.loss, ref["loss"]) <= LOSS_TOL[dtype]
    assert rel_err(z.grad, z64.grad) <= grad_tol(z64.grad, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sampler_distribution(backend):
    v, n = 6, 200000
    z = torch.tensor([[0.0, 1.0, -math.inf, 2.0, 0.5, -1.0]], device="cuda").expand(n, v)
    u = torch.tensor([[2.0, -math.inf, 0.0, 0.0, 1.0, 3.0]], device="cuda").expand(n, v)
    g = torch.Generator(device="cuda").manual_seed(0)
    draws = sampling.sample_mixture(z, u, alpha=0.3, generator=g, backend=backend)
    counts = torch.bincount(draws, minlength=v).double().cpu()
    expected = reference.mixture_probs(z[:1].cpu(), u[:1].cpu(), alpha=0.3)[0] * n
    assert counts[expected == 0].sum() == 0
    chi2 = (((counts - expected) ** 2) / expected.clamp(min=1e-12))[expected > 0].sum().item()
    assert chi2 < 40.0  # 4 degrees of freedom: P(chi2 > 40) ~ 4e-8


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_offsets_beyond_int32(backend):
    """N * V > 2^31 elements: the last rows must be computed from the right memory."""
    n, v = 16800, 128256
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs a large GPU")
    z = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    z.requires_grad_()
    out = loss.reverse_kl(z, u, reduction="none", backend=backend)
    out[-4:].sum().backward()
    tail = slice(n - 4, n)
    z64 = z[tail].detach().double().requires_grad_()
    ref = reference.reverse_kl(z64, u[tail], reduction="none")
    ref.sum().backward()
    assert rel_err(out[tail], ref) <= 1e-4
    assert rel_err(z.grad[tail], z64.grad) <= grad_tol(z64.grad, torch.bfloat16)
    assert z.grad[: n - 4].abs().max().item() == 0.0


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="the cuda extension did not build")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [4096, 32000, 128256])
@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "minillm_loss", "pt_loss"])
@pytest.mark.parametrize("plan", ["default", "l2:5"])
def test_gradient_formed_in_the_row_pass(op, v, dtype, plan, monkeypatch):
    """The cuda backend's statistics + gradient in one call (row_stats_grad; opt-in) behind the scalar losses, with
    the one-pass kernel (rows split across a cluster) and the two passes chunk by chunk in L2 (5 rows per chunk):
    against float64, with a mask, an empty teacher row the mask allows (the denominator is corrected in backward), a
    temperature and an upstream gradient other than 1."""
    from minillm_fast import _dispatch
    monkeypatch.setenv(loss.GRAD_IN_PASS_ENV, "1")
    if plan != "default":
        monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", plan)
    backend = _dispatch.get_backend("cuda", torch.device("cuda"))
    calls = []
    original = backend.row_stats_grad

    def counted(*args):
        stats, dz = original(*args)
        calls.append(dz.numel() > 0)
        return stats, dz
    monkeypatch.setattr(backend, "row_stats_grad", counted)
    n = 48 if v < 100000 else 12
    z = make_logits(n, v, dtype, seed=5).requires_grad_()
    u = make_logits(n, v, dtype, seed=6)
    with torch.no_grad():
        u[2] = -math.inf
    mask = torch.rand(n, device="cuda") > 0.2
    mask[2] = True
    tokens = torch.randint(0, v, (n,), device="cuda")
    z64 = z.detach().double().requires_grad_()
    if op in ("reverse_kl", "forward_kl"):
        out = getattr(loss, op)(z, u, temperature=1.3, mask=mask, backend="cuda")
        ref = getattr(reference, op)(z64, u, temperature=1.3, mask=mask)
    elif op == "minillm_loss":
        stats = loss.token_stats(z.detach(), u, tokens, mask=mask, temperature=1.3, backend="cuda")
        adv = torch.randn(n, device="cuda")
        old = (stats.student_logprob + 0.3 * torch.randn(n, device="cuda")).detach()
        w = stats.importance_weight
        out = loss.minillm_loss(z, u, tokens, adv, old, w, mask=mask, temperature=1.3, backend="cuda").loss
        ref = reference.minillm_loss(z64, u, tokens, adv, old, w, mask=mask, temperature=1.3)["loss"]
    else:
        labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
        out = loss.pt_loss(z, labels=labels, teacher_logits=u, temperature=1.3, backend="cuda").loss
        ref = reference.pt_loss(z64, u, labels, temperature=1.3)["loss"]
    (out * 0.75).backward()
    (ref * 0.75).backward()
    assert calls == [True], "the gradient was not formed in the row pass"
    assert rel_err(out, ref) <= LOSS_TOL[dtype]
    # the empty row: exactly 0 here (the float64 reference's autograd gives NaN through log p = -inf)
    assert bool((z.grad[2] == 0).all())
    keep = torch.arange(n, device="cuda") != 2
    assert rel_err(z.grad[keep], z64.grad[keep]) <= grad_tol(z64.grad[keep], dtype)

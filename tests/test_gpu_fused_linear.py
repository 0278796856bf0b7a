"""The fused-linear ops on CUDA tensors (skipped without a GPU): float64 reference, every GPU backend, bf16/fp16
matmuls with float32 logits, soft-capping, reduction="none" (recomputed blocks), several blocks; and the memory
claim with ``torch.cuda.max_memory_allocated``. The CPU suite (test_fused_linear.py) covers the semantics."""
import pytest
import torch

import minillm_fast
from minillm_fast import fused_linear, loss, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("cuda", "triton", "torch")
                if torch.cuda.is_available() and b in minillm_fast.available_backends()]
LOSS_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_SLACK = {torch.float32: 1e-4, torch.bfloat16: 2 ** -8 + 6e-3, torch.float16: 2 ** -11 + 2e-3}


def rel(out, want):
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    return float((out - want).norm() / want.norm().clamp(min=1e-30))


def inputs(n, hs, ht, vs, vt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()
    return (rand(n, hs).requires_grad_(), rand(vs, hs, scale=hs ** -0.5 * 2).requires_grad_(),
            rand(vs).requires_grad_(), rand(n, ht), rand(vt, ht, scale=ht ** -0.5 * 2))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,reduction,softcap", [("reverse_kl", "mean", None), ("reverse_kl", "none", 20.0),
                                                  ("jsd", "sum", None), ("minillm", "mean", 15.0),
                                                  ("pt", "mean", None)])
def test_matches_float64(backend, dtype, op, reduction, softcap, monkeypatch):
    monkeypatch.setattr(fused_linear, "MAX_BLOCK_BYTES", 40 * 5003 * fused_linear.BYTES_PER_LOGIT)  # 40-row blocks
    check_matches_float64(backend, dtype, op, reduction, softcap)


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="the cuda extension did not build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["reverse_kl", "minillm", "pt"])
def test_gradient_formed_in_the_row_pass(dtype, op, monkeypatch):
    """Opted in (MINILLM_FAST_GRAD_IN_PASS=1): the cuda backend's row_stats_grad_into writes each block's dz into
    its rows of the 16-bit group buffer during the statistics' pass (the two passes in L2, 7 rows per chunk); 40-row
    blocks in groups of 80 rows, the last group partial."""
    from minillm_fast import _dispatch
    monkeypatch.setenv(loss.GRAD_IN_PASS_ENV, "1")
    monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", "l2:7")
    monkeypatch.setenv(fused_linear.BLOCKS_ENV, "40,80")
    backend = _dispatch.get_backend("cuda", torch.device("cuda"))
    calls = []
    original = backend.row_stats_grad_into

    def counted(z, *args):
        calls.append(z.shape[0])
        return original(z, *args)
    monkeypatch.setattr(backend, "row_stats_grad_into", counted)
    check_matches_float64("cuda", dtype, op, "mean", None)
    assert calls == [40, 40, 40, 37], calls


def check_matches_float64(backend, dtype, op, reduction, softcap):
    n, hs, ht, vs, vt = 157, 64, 96, 5003, 4999
    h, w, b, th, tw = inputs(n, hs, ht, vs, vt, dtype)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, min(vs, vt), (n,), generator=g).cuda()
    mask = (torch.rand(n, generator=g) < 0.8).cuda()
    adv, old = torch.randn(n, generator=g).cuda(), (torch.randn(n, generator=g) - 8).cuda()
    iw = (0.8 + 0.4 * torch.rand(n, generator=g)).cuda()
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    z = h64 @ w64.t() + b64
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    u = th.double() @ tw.double().t()
    common = dict(student_bias=b, softcap=(softcap, None), temperature=1.3, backend=backend)
    if op in ("reverse_kl", "jsd"):
        kw = dict(mask=mask, reduction=reduction) | ({"beta": 0.4} if op == "jsd" else {})
        out = getattr(loss, "fused_linear_" + op)(h, w, th, tw, **common, **kw)
        want = getattr(reference, op)(z, u, temperature=1.3, **kw)
    elif op == "minillm":
        out = loss.fused_linear_minillm_loss(h, w, th, tw, tokens, adv, old, iw, mask=mask, **common).loss
        want = reference.minillm_loss(z, u, tokens, adv.double(), old.double(), iw.double(), mask=mask,
                                      temperature=1.3)["loss"]
    else:
        labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
        out = loss.fused_linear_pt_loss(h, w, th, tw, labels, **common).loss
        want = reference.pt_loss(z, u, labels, temperature=1.3)["loss"]
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert rel(out, want) <= LOSS_TOL[dtype] + 1e-7
    upstream = torch.randn(out.shape, generator=g).cuda() if out.dim() else torch.tensor(1.7, device="cuda")
    got = torch.autograd.grad(out, (h, w, b), upstream)
    wanted = torch.autograd.grad(want, (h64, w64, b64), upstream.double())
    for name, x, y in zip(("hidden", "weight", "bias"), got, wanted):
        assert x.dtype == dtype and torch.isfinite(x).all(), name
        rounding = rel(y.to(dtype), y) if dtype != torch.float32 else 0.0
        assert rel(x, y) <= rounding + GRAD_SLACK[dtype], (name, rel(x, y))


@pytest.mark.parametrize("backend", GPU_BACKENDS[:1])
def test_memory_beyond_inputs_and_gradients(backend):
    """Below half of one [N, V] float32 logits buffer, and growing by less than a quarter of its growth from
    V = 32000 to 128256 (bf16, N = 4096, H = 512)."""
    extra = {}
    n, hidden = 4096, 512
    for v in (32000, 128256):
        h, w, _, th, tw = inputs(n, hidden, hidden, v, v, torch.bfloat16)
        loss.fused_linear_reverse_kl(h, w, th, tw, backend=backend).backward()  # warm-up; allocates .grad
        grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in (h, w))
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss.fused_linear_reverse_kl(h, w, th, tw, backend=backend).backward()
        torch.cuda.synchronize()
        extra[v] = torch.cuda.max_memory_allocated() - base - grad_bytes
        del h, w, th, tw
        torch.cuda.empty_cache()
    logits = {v: n * v * 4 for v in extra}
    assert extra[128256] < logits[128256] / 2, extra
    assert extra[128256] - extra[32000] < (logits[128256] - logits[32000]) / 4, extra

"""torch.compile traces the public logits ops without graph breaks, forward and backward, the compiled results
equal the eager ones, and the compiled backward runs the fused gradient primitive (no torch math differentiated).

Compiling is slow on a small CPU: most cases use AOTAutograd with the traced graphs run as they are (what the
"aot_eager" backend does, plus keeping the graphs to inspect them); that traces forward and backward exactly as
inductor would see them. One case compiles with inductor for real.
"""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from _helpers import backend_unavailable_reason, make_logits, seeded_mask, upstream_weight
from minillm_fast import _dispatch, loss, sampling

LEAD, HIDDEN, V_S, V_T = (3, 5), 8, 37, 35  # padded vocabularies: the student has two extra columns


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """A torch.compile backend: AOTAutograd's forward and backward graphs, kept, and run as traced."""

    def __init__(self):
        self.graphs = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))

    def _keep(self, kind):
        def compiler(gm, example_inputs):
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def calls(self, kind) -> set[str]:
        return {str(node.target) for gm in self.graphs[kind] for node in gm.graph.nodes if node.op == "call_function"}


class Inputs:
    """A student lm_head (nn.Linear) over hidden states gives the logits; the teacher's logits and the per-token
    arguments are fixed."""

    def __init__(self, gen, dtype):
        self.head = torch.nn.Linear(HIDDEN, V_S).to(dtype)
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(torch.randn(p.shape, generator=gen).to(dtype))
        self.hidden = make_logits(gen, LEAD + (HIDDEN,), dtype, scale=0.5).requires_grad_()
        self.teacher = make_logits(gen, LEAD + (V_T,), dtype)
        self.mask = seeded_mask(gen, LEAD)
        self.tokens = torch.randint(0, V_T, LEAD, generator=gen)
        self.labels = torch.where(self.mask, self.tokens, torch.full_like(self.tokens, -100))
        self.advantages = torch.randn(LEAD, generator=gen)
        self.old_logprobs = -3 + 0.3 * torch.randn(LEAD, generator=gen)
        self.weights = 0.7 + 0.6 * torch.rand(LEAD, generator=gen)
        self.upstream = upstream_weight(gen, LEAD)

    def leaves(self):
        return [self.hidden, *self.head.parameters()]

    def to(self, device) -> "Inputs":
        """The same inputs on ``device`` (new leaves there)."""
        self.head = self.head.to(device)
        for name in ("teacher", "mask", "tokens", "labels", "advantages", "old_logprobs", "weights", "upstream"):
            setattr(self, name, getattr(self, name).to(device))
        self.hidden = self.hidden.detach().to(device).requires_grad_()
        return self


def _call(op: str, x: Inputs, backend: str, reduction: str):
    z = x.head(x.hidden)
    common = dict(temperature=0.7, backend=backend)
    if op in ("reverse_kl", "forward_kl"):
        return getattr(loss, op)(z, x.teacher, mask=x.mask, reduction=reduction, **common)
    if op == "jsd":
        return loss.jsd(z, x.teacher, beta=0.3, mask=x.mask, reduction=reduction, **common)
    if op == "minillm":
        return loss.minillm_loss(z, x.teacher, x.tokens, x.advantages, x.old_logprobs, x.weights, mask=x.mask,
                                 **common)
    if op == "minillm_num_tokens":  # a tensor num_tokens is checked (> 0) inside an op
        return loss.minillm_loss(z, x.teacher, x.tokens, x.advantages, x.old_logprobs, x.weights, mask=x.mask,
                                 single_step=False, num_tokens=torch.tensor(40.0), **common)
    if op == "pt":
        return loss.pt_loss(z, x.teacher, x.labels, kd_ratio=0.4, **common)
    if op == "token_stats":
        return loss.token_stats(z, x.teacher, x.tokens, alpha=0.2, mask=x.mask, **common)
    raise AssertionError(op)


def _run(fn, x: Inputs):
    """(every output, the leaves' gradients) of one forward + backward."""
    for leaf in x.leaves():
        leaf.grad = None
    out = fn()
    outputs = list(out) if isinstance(out, tuple) else [out]
    differentiable = outputs[0]
    if differentiable.requires_grad:
        weighted = differentiable * x.upstream if differentiable.dim() else differentiable * 1.3
        weighted.sum().backward()
    return [o.detach() for o in outputs], [leaf.grad for leaf in x.leaves()]


def _assert_compiled_equals_eager(op, backend, reduction, dtype, gen, compiler, device="cpu"):
    x = Inputs(gen, dtype).to(device)
    eager_out, eager_grads = _run(lambda: _call(op, x, backend, reduction), x)
    compiled = torch.compile(lambda: _call(op, x, backend, reduction), fullgraph=True, backend=compiler)
    out, grads = _run(compiled, x)
    for a, b in zip(out, eager_out):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        if op == "token_stats":
            assert a is None and b is None
        else:
            assert a.dtype == dtype
            torch.testing.assert_close(a, b)  # the dtype's own tolerance (bf16: 1.6e-2)
            assert b.abs().max() > 0


def _fused_calls(op):
    grad = "minillm_fast.backend_jsd_grad.default" if op == "jsd" else "minillm_fast.backend_logits_grad.default"
    return "minillm_fast.backend_row_stats.default", grad


# ----------------------------------------------------------------------------------------------------------
# No graph breaks
# ----------------------------------------------------------------------------------------------------------

OPS = ["reverse_kl", "forward_kl", "jsd", "minillm", "minillm_num_tokens", "pt", "token_stats"]


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
@pytest.mark.parametrize("op", OPS)
def test_no_graph_breaks(op, backend, gen):
    if backend != "auto" and backend_unavailable_reason(backend):
        pytest.skip(backend_unavailable_reason(backend))
    x = Inputs(gen, torch.float32)
    explanation = torch._dynamo.explain(lambda: _call(op, x, backend, "mean"))()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------------------------------------
# Compiled forward + backward equals eager, and the backward is the fused pass
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", ["reverse_kl", "forward_kl", "jsd"])
def test_divergences_compiled_equal_eager(op, reduction, fast_backend, gen):
    recorder = Recorder()
    _assert_compiled_equals_eager(op, fast_backend, reduction, torch.float32, gen, recorder.backend)
    row_pass, grad_pass = _fused_calls(op)
    assert row_pass in recorder.calls("forward")
    backward = recorder.calls("backward")
    assert grad_pass in backward
    # The gradient is the fused pass: no softmax, exp or log is differentiated in the backward graph.
    assert not any(name.split(".")[1] in ("exp", "log", "_softmax", "_log_softmax", "logsumexp")
                   for name in backward if name.startswith("aten."))


@pytest.mark.parametrize("op", ["minillm", "minillm_num_tokens", "pt", "token_stats"])
def test_minillm_ops_compiled_equal_eager(op, fast_backend, gen):
    recorder = Recorder()
    _assert_compiled_equals_eager(op, fast_backend, "mean", torch.float32, gen, recorder.backend)
    assert "minillm_fast.checked_token_ids.default" in recorder.calls("forward")
    if op != "token_stats":
        assert "minillm_fast.backend_logits_grad.default" in recorder.calls("backward")


@pytest.mark.parametrize("op", ["reverse_kl", "jsd", "minillm", "pt", "token_stats"])
def test_bfloat16_compiled_equal_eager(op, fast_backend, gen):
    _assert_compiled_equals_eager(op, fast_backend, "mean", torch.bfloat16, gen, Recorder().backend)


def test_auto_backend_compiled_equal_eager(gen):
    _assert_compiled_equals_eager("minillm", "auto", "mean", torch.float32, gen, Recorder().backend)


def test_inductor(gen):
    """One real compile: inductor generates the code around the ops (the loss math, the lm_head's matmuls)."""
    backend = "cpu" if _dispatch.is_available("cpu", torch.device("cpu")) else "torch"
    _assert_compiled_equals_eager("minillm", backend, "mean", torch.float32, gen, "inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", ["reverse_kl", "jsd", "minillm", "pt", "token_stats"])
def test_gpu_backends_compile(op, backend, gen):
    """On CUDA tensors (GPU machines; benchmarks/gpu_check.sh runs it): no graph breaks and inductor's compiled
    forward + backward equal eager, on the CUDA C++ and the Triton backends."""
    if not _dispatch.is_available(backend, torch.device("cuda")):
        pytest.skip(f"backend {backend!r} is not available for CUDA tensors")
    x = Inputs(gen, torch.bfloat16).to("cuda")
    explanation = torch._dynamo.explain(lambda: _call(op, x, backend, "mean"))()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    _assert_compiled_equals_eager(op, backend, "mean", torch.bfloat16, gen, "inductor", device="cuda")


def test_new_shapes_recompile_dynamic(fast_backend, gen):
    """A second batch size recompiles with symbolic shapes (the ops' fake implementations take them)."""
    compiled = torch.compile(lambda z, u, m: loss.reverse_kl(z, u, mask=m, reduction="none", backend=fast_backend),
                             fullgraph=True, backend=Recorder().backend)
    for n in (6, 9, 13):
        z = make_logits(gen, (n, V_S)).requires_grad_()
        u, mask, up = make_logits(gen, (n, V_T)), seeded_mask(gen, (n,)), upstream_weight(gen, (n,))
        eager = loss.reverse_kl(z, u, mask=mask, reduction="none", backend=fast_backend)
        (eager_grad,) = torch.autograd.grad((eager * up).sum(), z)
        out = compiled(z, u, mask)
        (grad,) = torch.autograd.grad((out * up).sum(), z)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Checks that need the tensors' values run when the compiled graph runs, with the eager ValueError
# ----------------------------------------------------------------------------------------------------------

def test_compiled_value_checks_raise_value_error(gen):
    x = Inputs(gen, torch.float32)
    bad = x.tokens.clone()
    bad[x.mask.nonzero()[0].tolist()] = V_T + 4  # out of range at a valid position
    stats = torch.compile(lambda t: loss.token_stats(x.head(x.hidden), x.teacher, t, mask=x.mask, backend="torch"),
                          fullgraph=True, backend="eager")
    stats(x.tokens)
    with pytest.raises(ValueError, match=f"tokens: token id {V_T + 4} is out of range"):
        stats(bad)

    def minillm(num_tokens):
        return loss.minillm_loss(x.head(x.hidden), x.teacher, x.tokens, x.advantages, x.old_logprobs, x.weights,
                                 mask=x.mask, num_tokens=num_tokens, backend="torch").loss

    compiled = torch.compile(minillm, fullgraph=True, backend="eager")
    compiled(torch.tensor(3.0))
    with pytest.raises(ValueError, match="num_tokens: expected a count > 0"):
        compiled(torch.tensor(0.0))


def test_compiled_unavailable_backend_raises_value_error(gen):
    x = Inputs(gen, torch.float32)
    compiled = torch.compile(lambda: loss.reverse_kl(x.head(x.hidden), x.teacher, backend="cuda"), fullgraph=True,
                             backend="eager")
    if _dispatch.is_available("cuda", torch.device("cpu")):
        pytest.skip("the cuda backend runs on CPU tensors here")
    with pytest.raises(ValueError, match="backend: 'cuda' is not available"):
        compiled()
    assert torch.is_grad_enabled()  # the error left no grad-mode switch behind


# ----------------------------------------------------------------------------------------------------------
# Autograd semantics of the glue (eager)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["reverse_kl", "jsd", "minillm"])
def test_second_backward(op, fast_backend, gen):
    """Saved tensors are freed by backward: a second backward raises autograd's RuntimeError; with
    retain_graph=True it gives the same gradient again."""
    x = Inputs(gen, torch.float32)
    value = _call(op, x, fast_backend, "mean")
    value = value.loss if op == "minillm" else value
    (first,) = torch.autograd.grad(value, x.hidden, retain_graph=True)
    (again,) = torch.autograd.grad(value, x.hidden)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(value, x.hidden)


# ----------------------------------------------------------------------------------------------------------
# Fused-linear ops: not traced (graph breaks), but correct inside a compiled function
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["reverse_kl", "minillm"])
def test_fused_linear_inside_compiled_function(op, fast_backend, gen):
    """torch.compile of a function that calls a fused-linear op: dynamo breaks the graph around the op (its Python
    sweep over row blocks is not traced), and values and gradients equal eager."""
    x = Inputs(gen, torch.float32)
    teacher_hidden = torch.randn(LEAD + (HIDDEN + 3,), generator=gen)
    teacher_weight = torch.randn(V_T, HIDDEN + 3, generator=gen)

    def fn():
        hidden = x.hidden * 1.5  # traced code on both sides of the op
        if op == "reverse_kl":
            return loss.fused_linear_reverse_kl(hidden, x.head.weight, teacher_hidden, teacher_weight,
                                                student_bias=x.head.bias, mask=x.mask, backend=fast_backend) * 2.0
        return loss.fused_linear_minillm_loss(hidden, x.head.weight, teacher_hidden, teacher_weight, x.tokens,
                                              x.advantages, x.old_logprobs, x.weights, mask=x.mask,
                                              student_bias=x.head.bias, backend=fast_backend).loss * 2.0

    eager_out, eager_grads = _run(fn, x)
    out, grads = _run(torch.compile(fn, backend=Recorder().backend), x)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert b.abs().max() > 0


def test_sample_mixture_inside_compiled_function(fast_backend, gen):
    """torch.compile of a function that samples with an explicit torch.Generator: dynamo breaks the graph around
    the generator (it cannot be traced), and the draws equal eager's, token for token."""
    z, u = make_logits(gen, LEAD + (V_S,)), make_logits(gen, LEAD + (V_T,))

    def fn(seed):
        generator = torch.Generator().manual_seed(seed)
        return sampling.sample_mixture(z * 1.0, u, alpha=0.3, temperature=0.9, generator=generator,
                                       backend=fast_backend)

    compiled = torch.compile(fn, backend=Recorder().backend)
    for seed in (3, 4):
        eager = fn(seed)
        assert torch.equal(compiled(seed), eager) and eager.dtype == torch.int64 and eager.shape == LEAD

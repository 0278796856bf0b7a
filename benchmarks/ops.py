"""What is benchmarked: every op of minillm_fast, its inputs, its must-move bytes, its float64 reference, and the
alternatives people would otherwise use, written the way they write them.

Implementations (``ImplSpec``):

* ``ours:<backend>``  minillm_fast with ``backend=`` that backend;
* ``eager``           plain PyTorch. For the divergences: log_softmax of both, exp, multiply, sum (the usual
                      code). For the MiniLLM ops: the unfused style of MiniLLM's reference code (microsoft/LMOps),
                      which materialises float32 softmaxes and log-softmaxes over the whole vocabulary;
* ``compile``         ``torch.compile`` of exactly that eager function; the token dimension is marked dynamic (one
                      graph per vocabulary size and grad mode, reused across token counts and for the error check);
* ``liger``           Liger-Kernel's ``LigerJSD`` (beta=1 reverse KL, beta=0 forward KL, beta=0.5 JSD) on CUDA,
                      including the float32 log-softmax of both inputs it needs.

Every implementation returns a dict of outputs; for differentiable ops ``"loss"`` carries the gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from minillm_fast import hf
from minillm_fast import loss as mloss
from minillm_fast import reference as ref
from minillm_fast import sampling as msampling

MODES = ("fwd", "fwd+bwd")
ALPHA, CLIP_EPS, KD_RATIO, JSD_BETA, IGNORE = 0.2, 0.2, 0.5, 0.5, -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One input set. ``z`` (student logits) requires grad; per-token tensors are None when the op needs none."""
    z: torch.Tensor
    u: torch.Tensor
    tokens: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def per_token_names(self):
        return [k for k in ("tokens", "advantages", "old_logprobs", "weights", "mask", "labels")
                if getattr(self, k) is not None]

    def head(self, rows: int) -> "Inputs":
        """The first ``rows`` positions, as fresh leaf tensors (the error check runs on these)."""
        fields = {k: getattr(self, k)[:rows].clone() for k in self.per_token_names()}
        return Inputs(z=self.z[:rows].detach().clone().requires_grad_(True), u=self.u[:rows].clone(), **fields)

    def as_float64(self) -> "Inputs":
        return replace(self, z=self.z.detach().to(torch.float64).requires_grad_(True), u=self.u.to(torch.float64))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.z, self.u, *(getattr(self, k) for k in
                                                                           self.per_token_names())))


def _row_logsumexp(x: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    step = max(1, chunk_elements // x.shape[1])
    return torch.cat([torch.logsumexp(x[a:a + step].float(), dim=-1) for a in range(0, x.shape[0], step)])


BASE_ROWS = 256


def _random_logits(n: int, v: int, g: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normal logits with std 2. Beyond the first BASE_ROWS rows, each block of rows is the first block rolled
    along the vocabulary by a different amount: the work per row is the same, and it is ~10x cheaper to build on
    a CPU (randn costs ~3 s per GB there, and every memory child builds its own inputs)."""
    base = torch.randn(min(n, BASE_ROWS), v, generator=g, device=device, dtype=torch.float32).mul_(2.0)
    if n <= BASE_ROWS:
        return base.to(dtype)
    out = torch.empty(n, v, device=device, dtype=dtype)
    for block, start in enumerate(range(0, n, BASE_ROWS)):
        rows, shift = min(n, start + BASE_ROWS) - start, (block * 7919) % v
        # out rows = base rows rolled right by `shift` along the vocabulary, copied without a temporary
        out[start:start + rows, shift:] = base[:rows, :v - shift]
        out[start:start + rows, :shift] = base[:rows, v - shift:]
    return out


def make_inputs(needs: tuple[str, ...], n: int, v: int, dtype: torch.dtype, device: torch.device,
                seed: int) -> Inputs:
    """Random logits (std 2, like trained LM heads), sampled tokens, old log-probs near the current ones."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    z = _random_logits(n, v, g, device, dtype).requires_grad_(True)
    u = _random_logits(n, v, g, device, dtype)
    inp = Inputs(z, u)
    if "tokens" in needs:
        inp.tokens = torch.randint(0, v, (n,), generator=g, device=device)
    if "minillm" in needs:  # old log-probs within ~0.1 of the current ones, so rho ~ 1 and clipping is exercised
        with torch.no_grad():
            # Row i of z is a permutation of row i % BASE_ROWS (see _random_logits): same logsumexp, computed once.
            rows = min(n, BASE_ROWS)
            lse = _row_logsumexp(z.detach()[:rows]).repeat(math.ceil(n / rows))[:n]
            lq = z.detach().gather(1, inp.tokens[:, None])[:, 0].float() - lse
        inp.old_logprobs = lq + 0.1 * torch.randn(n, generator=g, device=device)
        inp.advantages = torch.randn(n, generator=g, device=device)
        inp.weights = torch.empty(n, device=device).uniform_(0.8, 1.25, generator=g)
        inp.mask = torch.rand(n, generator=g, device=device) > 0.05
    if "labels" in needs:
        labels = torch.randint(0, v, (n,), generator=g, device=device)
        inp.labels = torch.where(torch.rand(n, generator=g, device=device) < 0.05, IGNORE, labels)
    return inp


# ----------------------------------------------------------------------------------------------------------
# Alternatives, written the way people write them
# ----------------------------------------------------------------------------------------------------------

def eager_reverse_kl(z, u):
    log_q = torch.log_softmax(z.float(), dim=-1)
    log_p = torch.log_softmax(u.float(), dim=-1)
    return {"loss": (log_q.exp() * (log_q - log_p)).sum(-1).mean()}


def eager_forward_kl(z, u):
    log_q = torch.log_softmax(z.float(), dim=-1)
    log_p = torch.log_softmax(u.float(), dim=-1)
    return {"loss": (log_p.exp() * (log_p - log_q)).sum(-1).mean()}


def eager_jsd(z, u):
    # GKD / TRL style: the mixture in log space by logsumexp of a stack, then two kl_div calls.
    beta = JSD_BETA
    log_q = torch.log_softmax(z.float(), dim=-1)
    log_p = torch.log_softmax(u.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)  # p (log p - log m)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    return {"loss": (beta * kl_p + (1 - beta) * kl_q).sum(-1).mean()}


def eager_token_stats(z, u, tokens):
    # Reference style: full float32 softmax and log-softmaxes, then gathers and full-vocabulary sums.
    probs_s = torch.softmax(z, dim=-1, dtype=torch.float32)
    logprobs_s = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    logprobs_t = torch.log_softmax(u, dim=-1, dtype=torch.float32)
    y = tokens[:, None]
    lq = logprobs_s.gather(-1, y)[:, 0]
    lp = logprobs_t.gather(-1, y)[:, 0]
    mix = torch.log(ALPHA * lp.exp() + (1 - ALPHA) * lq.exp())
    return {"student_logprob": lq, "teacher_logprob": lp, "mix_logprob": mix, "log_ratio": lp - lq,
            "importance_weight": torch.exp(lq - mix),
            "reverse_kl": (probs_s * (logprobs_s - logprobs_t)).sum(-1),
            "student_entropy": -(probs_s * logprobs_s).sum(-1)}


def eager_minillm_loss(z, u, tokens, advantages, old_logprobs, weights, mask):
    # LMOps' _pg_loss + _reg_loss: a log-softmax in the logits' dtype for the policy gradient, then float32
    # softmax / log-softmaxes for the single-step reverse KL (cross-entropy minus entropy).
    maskf = mask.float()
    n = maskf.sum()
    logprobs = torch.log_softmax(z, dim=-1).gather(-1, tokens[:, None])[:, 0].masked_fill(~mask, 0)
    log_ratio = (logprobs.float() - old_logprobs) * maskf
    ratio = torch.exp(log_ratio) * weights
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS))
    pg_loss = (pg * maskf).sum() / n
    probs_s = torch.softmax(z, dim=-1, dtype=torch.float32)
    logprobs_s = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    logprobs_t = torch.log_softmax(u, dim=-1, dtype=torch.float32)
    xent = -(probs_s * logprobs_t).sum(-1)
    neg_ent = (probs_s * logprobs_s).sum(-1)
    reg_loss = ((xent + neg_ent) * maskf).sum() / n
    return {"loss": pg_loss + reg_loss, "pg_loss": pg_loss, "reg_loss": reg_loss}


def eager_pt_loss(z, u, labels):
    # LMOps' finetune: CrossEntropyLoss on float logits + get_distil_loss (float32 teacher softmax x student
    # log-softmax, summed over the vocabulary, token mean over labels != -100).
    lm_loss = F.cross_entropy(z.float(), labels, ignore_index=IGNORE)
    teacher_probs = torch.softmax(u, dim=-1, dtype=torch.float32)
    logprobs = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    x = (teacher_probs * logprobs).sum(-1)
    valid = (labels != IGNORE).float()
    kd_loss = -(x * valid).sum() / valid.sum()
    return {"loss": (1 - KD_RATIO) * lm_loss + KD_RATIO * kd_loss, "lm_loss": lm_loss, "kd_loss": kd_loss}


def eager_sample_mixture(z, u):
    # The reference mixes the two float32 softmaxes, then samples.
    probs = (1 - ALPHA) * torch.softmax(z, dim=-1, dtype=torch.float32) + ALPHA * torch.softmax(
        u, dim=-1, dtype=torch.float32)
    return {"tokens": torch.multinomial(probs, 1)[:, 0]}


def _liger_jsd(beta: float):
    module = []

    def run(z, u):
        if not module:
            hf.unshadow_hf_kernels()  # liger_kernel.transformers imports transformers
            from liger_kernel.transformers import LigerJSD  # imported lazily: optional, CUDA only
            module.append(LigerJSD(beta=beta))
        return {"loss": module[0](torch.log_softmax(z, dim=-1, dtype=torch.float32),
                                  torch.log_softmax(u, dim=-1, dtype=torch.float32))}
    return run


# ----------------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Op:
    name: str
    differentiable: bool
    needs: tuple[str, ...]  # per-token inputs: "tokens", "minillm" (advantages, old log-probs, weights, mask), "labels"
    ours: Callable[[Inputs, str], dict]  # (inputs, backend) -> outputs
    reference: Callable[[Inputs], dict] | None  # float64 inputs -> outputs (same keys, compared on shared keys)
    eager: Callable  # tensor-argument function, also what "compile" compiles
    eager_args: Callable[[Inputs], tuple]
    eager_note: str
    liger: Callable | None = None
    ours_check: Callable[[Inputs, str], dict] | None = None  # extra outputs only for the error check
    per_token_bytes: int = 0  # bytes per position of per-token inputs and outputs
    # FLOPs that must be done, (n, v, mode) -> int, for ops bound by matmuls (fused-linear twins); None for
    # memory-bound ops. Where set, the floor is max(bytes / copy bandwidth, FLOPs / measured matmul rate).
    flops: Callable[[int, int, str], int] | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.differentiable else ("fwd",)

    def bytes_moved(self, n: int, v: int, elem: int, mode: str) -> int:
        """Bytes that must move: read student and teacher logits once (+ per-token data), and for fwd+bwd
        write the student gradient once."""
        logits = n * v * elem
        return 2 * logits + n * self.per_token_bytes + (logits if mode == "fwd+bwd" else 0)

    def alternatives(self) -> list[str]:
        return ["eager", "compile"] + (["liger"] if self.liger is not None else [])


def _zu(inp):
    return inp.z, inp.u


def _divergence(name, fn, eager, liger_beta, ref_fn):
    return Op(
        name=name, differentiable=True, needs=(),
        ours=lambda inp, b: {"loss": fn(inp.z, inp.u, backend=b)},
        ours_check=lambda inp, b: {"per_row": fn(inp.z, inp.u, reduction="none", backend=b)},
        reference=lambda inp: {"loss": ref_fn(inp.z, inp.u), "per_row": ref_fn(inp.z, inp.u, reduction="none")},
        eager=eager, eager_args=_zu, eager_note="log_softmax both, exp, multiply, sum",
        liger=_liger_jsd(liger_beta))


def _ours_jsd(z, u, **kw):
    return mloss.jsd(z, u, beta=JSD_BETA, **kw)


def _ref_jsd(z, u, **kw):
    return ref.jsd(z, u, beta=JSD_BETA, **kw)


def _ours_minillm(inp, b):
    out = mloss.minillm_loss(inp.z, inp.u, inp.tokens, inp.advantages, inp.old_logprobs, inp.weights,
                             mask=inp.mask, clip_eps=CLIP_EPS, backend=b)
    return {"loss": out.loss, "pg_loss": out.pg_loss, "reg_loss": out.reg_loss}


def _ref_minillm(inp):
    out = ref.minillm_loss(inp.z, inp.u, inp.tokens, inp.advantages, inp.old_logprobs, inp.weights,
                           mask=inp.mask, clip_eps=CLIP_EPS)
    return {k: out[k] for k in ("loss", "pg_loss", "reg_loss")}


def _ours_pt(inp, b):
    out = mloss.pt_loss(inp.z, inp.u, inp.labels, kd_ratio=KD_RATIO, ignore_index=IGNORE, backend=b)
    return {"loss": out.loss, "lm_loss": out.lm_loss, "kd_loss": out.kd_loss}


OPS: dict[str, Op] = {op.name: op for op in [
    _divergence("reverse_kl", mloss.reverse_kl, eager_reverse_kl, 1.0, ref.reverse_kl),
    _divergence("forward_kl", mloss.forward_kl, eager_forward_kl, 0.0, ref.forward_kl),
    _divergence("jsd", _ours_jsd, eager_jsd, JSD_BETA, _ref_jsd),
    Op(name="token_stats", differentiable=False, needs=("tokens",),
       ours=lambda inp, b: mloss.token_stats(inp.z, inp.u, inp.tokens, alpha=ALPHA, backend=b)._asdict(),
       reference=lambda inp: ref.token_stats(inp.z, inp.u, inp.tokens, alpha=ALPHA),
       eager=eager_token_stats, eager_args=lambda inp: (inp.z, inp.u, inp.tokens),
       eager_note="MiniLLM reference style (materialised fp32 softmaxes)", per_token_bytes=8 + 7 * 4),
    Op(name="minillm_loss", differentiable=True, needs=("tokens", "minillm"),
       ours=_ours_minillm, reference=_ref_minillm, eager=eager_minillm_loss,
       eager_args=lambda inp: (inp.z, inp.u, inp.tokens, inp.advantages, inp.old_logprobs, inp.weights, inp.mask),
       eager_note="MiniLLM reference style (_pg_loss + _reg_loss)", per_token_bytes=8 + 4 + 4 + 4 + 1),
    Op(name="pt_loss", differentiable=True, needs=("labels",),
       ours=_ours_pt,
       reference=lambda inp: ref.pt_loss(inp.z, inp.u, inp.labels, kd_ratio=KD_RATIO, ignore_index=IGNORE),
       eager=eager_pt_loss, eager_args=lambda inp: (inp.z, inp.u, inp.labels),
       eager_note="MiniLLM reference style (CE + get_distil_loss)", per_token_bytes=8),
    Op(name="sample_mixture", differentiable=False, needs=(),
       ours=lambda inp, b: {"tokens": msampling.sample_mixture(inp.z, inp.u, alpha=ALPHA, backend=b)},
       reference=None, eager=eager_sample_mixture, eager_args=_zu,
       eager_note="mix the fp32 softmaxes, torch.multinomial", per_token_bytes=8),
]}


# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImplSpec:
    kind: str  # "ours", "eager", "compile", "liger"
    backend: str | None = None

    @property
    def label(self) -> str:
        return f"ours:{self.backend}" if self.kind == "ours" else self.kind


def ours_unavailable(backend: str, device: torch.device) -> str | None:
    """Why our ``backend`` cannot run on ``device`` (None: it can). Build failures carry the build's message."""
    import warnings
    from minillm_fast import _dispatch, _extension
    if backend not in _dispatch.BACKENDS:
        return f"unknown backend (known: {', '.join(_dispatch.BACKENDS)})"
    if backend in ("cpu", "cuda") and (backend == "cuda") == (device.type == "cuda"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = _extension.load(backend)
        if module is None:
            reason = next((str(w.message) for w in caught), "") or "extension not built"
            return "unavailable: " + reason.replace("minillm_fast: ", "")[:200]
    try:
        ok = _dispatch.is_available(backend, device)
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return None if ok else f"unavailable on {device.type}"


def alternative_unavailable(kind: str, device: torch.device) -> str | None:
    if kind == "liger":
        if device.type != "cuda":
            return "n/a (Liger-Kernel needs a CUDA GPU)"
        try:
            hf.unshadow_hf_kernels()
            import liger_kernel.transformers  # noqa: F401
        except Exception:  # noqa: BLE001
            return "n/a (not installed)"
    if kind == "compile" and not hasattr(torch, "compile"):
        return "n/a (this torch has no torch.compile)"
    return None


_COMPILED: dict[str, Callable] = {}


def _configure_dynamo():
    import torch._dynamo.config as dcfg
    # Each (op, vocabulary, grad mode) is its own graph; the default limit of 8 would silently fall back to eager.
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, key):
            setattr(dcfg, key, 256)
    for key in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dcfg, key):
            setattr(dcfg, key, 4096)
    dcfg.automatic_dynamic_shapes = False  # a new vocabulary is a new static graph, not a dynamic one


def _mark_token_dim_dynamic(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            torch._dynamo.mark_dynamic(a, 0)
    return args


def build_impl(op: Op, spec: ImplSpec) -> Callable[[Inputs], dict]:
    if spec.kind == "ours":
        return lambda inp: op.ours(inp, spec.backend)
    if spec.kind == "eager":
        return lambda inp: op.eager(*op.eager_args(inp))
    if spec.kind == "compile":
        if op.name not in _COMPILED:
            _configure_dynamo()
            _COMPILED[op.name] = torch.compile(op.eager)
        compiled = _COMPILED[op.name]
        return lambda inp: compiled(*_mark_token_dim_dynamic(op.eager_args(inp)))
    if spec.kind == "liger":
        return lambda inp: op.liger(*_zu(inp))
    raise ValueError(f"unknown implementation kind {spec.kind!r}")


def make_call(op: Op, impl: Callable[[Inputs], dict], input_sets: list[Inputs], mode: str) -> Callable[[], object]:
    """A zero-argument call running ``impl`` once, on the next input set of the rotation."""
    state = {"i": 0}

    def next_inputs():
        inp = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        return inp

    if mode == "fwd":
        def call():
            with torch.no_grad():
                return impl(next_inputs())
    else:
        def call():
            inp = next_inputs()
            return torch.autograd.grad(impl(inp)["loss"], inp.z)
    return call


# ----------------------------------------------------------------------------------------------------------
# Error against the float64 reference
# ----------------------------------------------------------------------------------------------------------

def _relative_max_error(out: torch.Tensor, want: torch.Tensor) -> float:
    """max |out - want| / max |want| (absolute when want is all zeros); inf if out is not finite where want is."""
    out, want = out.detach().to(torch.float64).reshape(-1), want.detach().to(torch.float64).reshape(-1)
    diff = (out - want).abs()
    if not torch.isfinite(diff).all():
        return math.inf
    scale = want.abs().max().item() if want.numel() else 0.0
    return diff.max().item() / scale if scale > 0 else diff.max().item()


def check_error(op: Op, spec: ImplSpec, impl: Callable[[Inputs], dict], inputs: Inputs, mode: str,
                rows: int = 8, cache: dict | None = None) -> dict:
    """Error of ``impl`` on the first ``rows`` positions against minillm_fast.reference in float64.

    ``fwd``: the outputs (per-row values for our divergences, losses / statistics otherwise).
    ``fwd+bwd``: also the student gradient. Returns {"err": max over all, "detail": {name: err}}.
    ``cache``: a dict kept across the implementations checked on the same ``inputs`` (the reference values are
    then computed once).
    """
    if op.reference is None:
        return {"err": None, "detail": {}, "note": "stochastic: no reference value"}
    head = inputs.head(min(rows, inputs.z.shape[0]))
    cache = {} if cache is None else cache
    if "want" not in cache:
        with torch.no_grad():
            cache["want"] = op.reference(head.as_float64())
    want = cache["want"]
    detail = {}
    grad_enabled = mode == "fwd+bwd"
    with torch.set_grad_enabled(grad_enabled):
        got = dict(impl(head))
        if spec.kind == "ours" and op.ours_check is not None:
            with torch.no_grad():
                got.update(op.ours_check(head, spec.backend))
    for key in sorted(set(got) & set(want)):
        detail[key] = _relative_max_error(got[key], want[key])
    if grad_enabled:
        (grad,) = torch.autograd.grad(got["loss"], head.z)
        if "want_grad" not in cache:
            head64 = head.as_float64()
            (cache["want_grad"],) = torch.autograd.grad(op.reference(head64)["loss"], head64.z)
        detail["grad"] = _relative_max_error(grad, cache["want_grad"])
    return {"err": max(detail.values()) if detail else None, "detail": detail}


# ----------------------------------------------------------------------------------------------------------
# The CPU memory children's job (see harness.cpu_peaks_in_children)
# ----------------------------------------------------------------------------------------------------------

def memory_cell_job(op: Op, runs: list[tuple[ImplSpec, str]], n: int, v: int, dtype: torch.dtype,
                    seed: int) -> dict:
    """A cell child's work: build the inputs of ``op`` at [n, v] once, then measure each (implementation, pass)
    of ``runs`` in its own fresh fork."""
    return {"op": op.name, "n": n, "v": v, "dtype": str(dtype).replace("torch.", ""), "seed": seed,
            "runs": [{"kind": spec.kind, "backend": spec.backend, "mode": mode} for spec, mode in runs]}


def memory_job(op: Op, spec: ImplSpec, n: int, v: int, dtype: torch.dtype, mode: str, seed: int) -> dict:
    """A child's work for one implementation and pass (see ``memory_cell_job``)."""
    return memory_cell_job(op, [(spec, mode)], n, v, dtype, seed)


def build_memory_runs(job: dict) -> list[tuple[int, Callable[[], tuple]]]:
    """In the child: build the CPU inputs once; [(run index, build)], where ``build()`` gives (call, warmup)
    for that run. Indices are the parent's (``job["indices"]`` when it resends the rest of a failed child)."""
    op = OPS[job["op"]]
    device = torch.device("cpu")
    inputs = make_inputs(op.needs, job["n"], job["v"], DTYPES[job["dtype"]], device, job["seed"])
    head = inputs.head(8)

    def builder(run):
        def build():
            impl = build_impl(op, ImplSpec(run["kind"], run["backend"]))
            # 8 rows load the same code paths; for "compile" they build the very graph the full call uses (the
            # token dimension is dynamic), from the parent's on-disk Inductor cache.
            return make_call(op, impl, [inputs], run["mode"]), make_call(op, impl, [head], run["mode"])
        return build

    indices = job.get("indices") or list(range(len(job["runs"])))
    return [(i, builder(run)) for i, run in zip(indices, job["runs"])]

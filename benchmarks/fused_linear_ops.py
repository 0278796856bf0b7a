"""Fused-linear ops in the benchmark table: losses from hidden states and lm_head weights (issue 7's targets).

For each shape (N tokens, hidden size H, vocabulary V) and forward+backward:

* ``ours``      ``loss.fused_linear_reverse_kl`` / ``fused_linear_minillm_loss`` (gradients to the student's hidden
                states and weight);
* ``ours-in-pass`` the same, opted in to forming each block's logit gradient in its statistics' pass
                (``MINILLM_FAST_GRAD_IN_PASS=1``: ``row_stats_grad_into``, the rows read once from memory), CUDA only;
* ``ours-on-chip`` the same ops with ``backend="triton"``: the on-chip kernels (logit tiles never leave the chip;
                the gradient pass recomputes them: 6 matmul-equivalents instead of 4), CUDA only;
* ``matmuls``   the four matmuls alone (student and teacher logits, then d hidden and d weight from a logits-sized
                gradient): what any exact method must at least compute, measured, not typed;
* ``matmuls-blocked`` the same four matmuls in the shapes ours runs them (``fused_linear.block_sizes``, the tuning
                knob included): per block of n rows both models' float32 logits [n, H] x [H, V] (each reads a
                whole [V, H] weight); per group of G rows (16-bit matmuls; float32: per block, dz = the block's
                student logits) d hidden = dz [G, V] @ W and d W += dz^T @ h[G rows] (each reads and writes the
                whole [V, H] weight gradient). ours' own matmul calls (``_Head.logits`` / ``pull_back``) with
                nothing else but ours' zeroed weight gradient and d hidden copies (bf16, H100 shape: ~1.3 GB
                written, ~0.4 ms): no row kernels, no dz formed (16 bits: a [G, V] dz buffer filled once, outside
                the timed calls), so ``ours`` minus this is the passes over the logits;
* ``eager``     plain PyTorch: materialise both logits, log-softmax, reverse KL, autograd;
* ``liger``     Liger-Kernel's chunked fused-linear JSD loss (``LigerFusedLinearJSDLoss``, beta=1 = reverse KL, hard
                loss weight 0), and on CUDA also ``LigerFusedLinearJSD`` (beta=1), when liger-kernel is installed.

``--blocks "256,2048;512,1024"``: ``ours[n,G]`` and ``matmuls-blocked[n,G]`` once per configuration, with
``MINILLM_FAST_FUSED_LINEAR_BLOCKS`` set to it around each call (see ``minillm_fast/fused_linear.py``: "n,G" tokens
per block and per group, or "n"), timed and measured like the others; "ours is × faster" of an ``ours[n,G]`` row is
its time over the default ``ours``'s (below 1: that configuration is faster).

Timing: one warm-up call each, then rounds in which every implementation runs once (interleaved, so that a noisy moment
hits all alike; each call synchronised on a GPU); the median over rounds. Columns: median time; TFLOP/s counting 8 N V H
(four matmuls); % of the FLOP floor (8 N V H over a measured square-GEMM rate); ratio to each alternative (the median
over rounds of its time / ours' in the same round: steadier than the ratio of the medians where the machine's speed
drifts); extra peak memory beyond inputs, weights and their gradients (CPU: a child process's peak RSS; GPU:
``torch.cuda.max_memory_allocated``); the relative error of the loss and of the hidden states' gradient against the
float64 reference on the first rows.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks import harness
from minillm_fast import _dispatch, fused_linear, hf
from minillm_fast import loss as mloss
from minillm_fast import reference

# (N, H, V): CPU shapes from issue 7's CPU target; GPU: its H100 target shape and a vocabulary sweep.
CPU_SHAPES = [(1024, 256, 32000), (1024, 256, 128256)]
CPU_DEFAULT_SHAPES = [(256, 256, 128256)]  # the suite's default CPU plan: within its 3-minute budget
GPU_SHAPES = [(8192, 4096, 128256), (8192, 4096, 32000), (8192, 4096, 152064)]
QUICK_SHAPES = [(64, 32, 2000)]
ERROR_ROWS = 32


@dataclass
class Problem:
    h: torch.Tensor  # student hidden [N, H], requires grad
    w: torch.Tensor  # student weight [V, H], requires grad
    ht: torch.Tensor  # teacher hidden
    wt: torch.Tensor  # teacher weight
    tokens: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def make(cls, n, h, v, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        # Weights scaled so that logits have a std of about 2, as trained lm_heads give.
        return cls(h=rand(n, h).requires_grad_(), w=rand(v, h, scale=2 / math.sqrt(h)).requires_grad_(),
                   ht=rand(n, h), wt=rand(v, h, scale=2 / math.sqrt(h)),
                   tokens=torch.randint(0, v, (n,), generator=g).to(device),
                   advantages=torch.randn(n, generator=g).to(device),
                   old_logprobs=(-8 + torch.randn(n, generator=g)).to(device),
                   weights=torch.ones(n, device=device), mask=torch.ones(n, dtype=torch.bool, device=device))

    def head(self, rows):
        return Problem(h=self.h[:rows].detach().clone().requires_grad_(), w=self.w.detach().clone().requires_grad_(),
                       ht=self.ht[:rows], wt=self.wt, tokens=self.tokens[:rows], advantages=self.advantages[:rows],
                       old_logprobs=self.old_logprobs[:rows], weights=self.weights[:rows], mask=self.mask[:rows])


def ours_reverse_kl(p: Problem, backend: str = "auto"):
    return mloss.fused_linear_reverse_kl(p.h, p.w, p.ht, p.wt, backend=backend)


def ours_minillm_loss(p: Problem, backend: str = "auto"):
    return mloss.fused_linear_minillm_loss(p.h, p.w, p.ht, p.wt, p.tokens, p.advantages, p.old_logprobs, p.weights,
                                           mask=p.mask, backend=backend).loss


def _on_chip(op: str, device):
    """Our on-chip Triton kernels (backend="triton": no logits block in memory), or why not."""
    if device.type != "cuda":
        return "CUDA only (on-chip Triton kernels)"
    fn = ours_reverse_kl if op == "fused_linear_reverse_kl" else ours_minillm_loss
    return lambda p: fn(p, backend="triton")


def eager_reverse_kl(p: Problem):
    log_q = torch.log_softmax((p.h @ p.w.t()).float(), -1)
    log_p = torch.log_softmax((p.ht @ p.wt.t()).float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def four_matmuls(p: Problem):
    """The FLOPs any exact method computes: both logits, then d hidden and d weight from a logits-sized tensor."""
    with torch.no_grad():
        z = p.h @ p.w.t()
        u = p.ht @ p.wt.t()
        del u
        return z @ p.w, z.t() @ p.h


def blocked_matmuls():
    """``matmuls-blocked``: a callable(problem) running the four matmuls as ours does, block by block and group by
    group (``fused_linear``'s own head: the same matmul calls), sizes from ``fused_linear.block_sizes`` and the
    knob as set at the call. Its 16-bit dz buffer ([G, V], random, as a logit gradient is) is made on first use
    and kept for later calls (not in the timings)."""
    dz_buffers: dict = {}

    def call(p: Problem):
        with torch.no_grad():
            head = fused_linear._Head(p.h.detach(), p.w.detach(), None, None, None)
            teacher = fused_linear._Head(p.ht, p.wt, None, None, None)
            n_rows, vocab = p.h.shape[0], max(p.w.shape[0], p.wt.shape[0])
            grouped = head.matmul_dtype != torch.float32  # where ours groups (a gradient is always formed here)
            backend = _dispatch.get_backend("auto", p.h.device)
            vocab_major = fused_linear.vocab_major_blocks(backend, grouped)
            step, group = fused_linear.block_sizes(n_rows, vocab, grouped, fused_linear.blocks_override(), vocab_major)
            grads = fused_linear._Grads.zeros_for(head, (True, True, False), backend)
            buffers = [x.logit_buffer(min(step, n_rows), vocab_major, backend) for x in (head, teacher)]
            if grouped:
                key = (min(group, n_rows), p.w.shape[0], head.matmul_dtype, p.w.device)
                if key not in dz_buffers:
                    dz_buffers.clear()
                    dz_buffers[key] = (torch.randn(key[:2], device=key[3]) * 1e-3).to(key[2])
                dz_group = dz_buffers[key]
            for a in range(0, n_rows, step):
                b = min(n_rows, a + step)
                z = head.logits(a, b, buffers[0], vocab_major)
                teacher.logits(a, b, buffers[1], vocab_major)
                if not grouped:
                    head.pull_back(z, a, b, grads)
                elif b == min(n_rows, a - a % group + group):  # the group's last block: pull the group back
                    start = a - a % group
                    head.pull_back(dz_group[: b - start], start, b, grads)
            return None
    return call


def blocks_env(blocks: str | None):
    """``MINILLM_FAST_FUSED_LINEAR_BLOCKS`` set to ``blocks`` (None: unset) inside, restored after."""
    return env_var(fused_linear.BLOCKS_ENV, blocks)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Environment variable ``name`` set to ``value`` (None: unset) inside, restored after."""
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _with_env(fn, name: str, value: str):
    """``fn`` called with environment variable ``name`` set to ``value`` (a scalar loss's gradient is formed inside
    the call, so the forward is all that needs it)."""
    def call(p: Problem):
        with env_var(name, value):
            return fn(p)
    return call


def _with_blocks(fn, blocks: str):
    """``fn`` called with the block-size knob set to ``blocks``."""
    return _with_env(fn, fused_linear.BLOCKS_ENV, blocks)


def _in_pass(fn, device):
    """``fn`` opted in to forming each block's gradient in its statistics' pass (``MINILLM_FAST_GRAD_IN_PASS=1``:
    the cuda backend's ``row_stats_grad_into``, the two passes chunk by chunk in L2), or why not."""
    if device.type != "cuda":
        return "CUDA only (row_stats_grad_into)"
    return _with_env(fn, mloss.GRAD_IN_PASS_ENV, "1")


def parse_blocks(text: str) -> tuple[str, ...]:
    """``--blocks`` "n,G;n,G;...": the configurations (spaces dropped), each checked by ``fused_linear``'s parser
    (ValueError naming the variable where one is malformed)."""
    configs = tuple(c.replace(" ", "") for c in text.split(";") if c.strip())
    for config in configs:
        with blocks_env(config):
            fused_linear.blocks_override()
    return configs


def _liger(kind: str, device):
    """A callable for Liger's fused-linear JSD with beta = 1 (reverse KL), or a string saying why not."""
    hf.unshadow_hf_kernels()  # Liger's modules import transformers
    try:
        if kind == "liger-chunked":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
            # torch.compile of each chunk on CUDA (Liger's default); eager on a CPU (its compile costs minutes there).
            module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                             compiled=device.type == "cuda")
            return lambda p: module(p.h, p.w, p.ht, p.wt, p.tokens)
        if device.type != "cuda":
            return "CUDA only (Triton kernels)"
        from liger_kernel.transformers import LigerFusedLinearJSD
        module = LigerFusedLinearJSD(jsd_beta=1.0)
        return lambda p: module(p.h, p.w, p.ht, p.wt, None)  # shift_labels=None: every token counts
    except ImportError:
        return "liger-kernel not installed"


def implementations(op: str, device, blocks: tuple[str, ...] = ()) -> dict:
    """name -> callable(problem) returning a differentiable scalar (None: no backward), or a reason string;
    ``blocks``: also ``ours[n,G]`` and ``matmuls-blocked[n,G]`` per configuration (``parse_blocks``)."""
    ours = ours_reverse_kl if op == "fused_linear_reverse_kl" else ours_minillm_loss
    impls = {"ours": ours, "ours-in-pass": _in_pass(ours, device)}
    impls.update({f"ours[{config}]": _with_blocks(ours, config) for config in blocks})
    impls.update({"ours-on-chip": _on_chip(op, device), "matmuls": four_matmuls,
                  "matmuls-blocked": blocked_matmuls()})
    impls.update({f"matmuls-blocked[{config}]": _with_blocks(blocked_matmuls(), config) for config in blocks})
    if op == "fused_linear_reverse_kl":
        impls["eager"] = eager_reverse_kl
        impls["liger-chunked"] = _liger("liger-chunked", device)
        impls["liger"] = _liger("liger", device)
    return impls


def _step(fn, p: Problem):
    def call():
        p.h.grad = p.w.grad = None
        out = fn(p)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward()
        return out
    return call


def _reference(op: str, p: Problem):
    """float64 loss and hidden-state gradient on ``p`` (small)."""
    h = p.h.detach().double().requires_grad_()
    z, u = h @ p.w.detach().double().t(), p.ht.double() @ p.wt.double().t()
    if op == "fused_linear_reverse_kl":
        value = reference.reverse_kl(z, u)
    else:
        value = reference.minillm_loss(z, u, p.tokens, p.advantages.double(), p.old_logprobs.double(),
                                       p.weights.double(), mask=p.mask)["loss"]
    value.backward()
    return value.detach(), h.grad


def _error(op: str, fn, p: Problem, cache: dict | None = None) -> float:
    """``cache``: kept across the implementations of one op on ``p``, so the float64 reference runs once."""
    small = p.head(ERROR_ROWS)
    out = fn(small)
    out.backward()
    cache = {} if cache is None else cache
    if "want" not in cache:
        cache["want"] = _reference(op, small)
    want, want_grad = cache["want"]
    err_value = abs(float(out.detach()) - float(want)) / max(abs(float(want)), 1e-12)
    err_grad = float((small.h.grad.double() - want_grad).norm() / want_grad.norm().clamp(min=1e-30))
    return max(err_value, err_grad)


def build_memory_runs(job: dict) -> list:
    """In the suite's cell child (``harness.cpu_peaks_in_children``): the problem built once; for each run
    (op, implementation) a ``build()`` giving (call, warmup) for ``harness.rss_peak_of`` in a fresh fork. The
    warm-up is one full call whose gradients stay alive: the baseline holds one set of gradients, the measured
    call makes the next (``_cpu_extra_memory`` subtracts them)."""
    device = torch.device("cpu")
    p = Problem.make(job["n"], job["h"], job["v"], getattr(torch, job["dtype"]), device)

    def builder(run):
        def build():
            call = _step(implementations(run["op"], device, tuple(job.get("blocks", ())))[run["impl"]], p)
            kept = []
            return call, lambda: kept.append((call(), p.h.grad, p.w.grad))
        return build

    indices = job.get("indices") or list(range(len(job["runs"])))
    return [(i, builder(run)) for i, run in zip(indices, job["runs"])]


def _cpu_extra_memory(runs, n, h, v, dtype, blocks=(), timeout_s=120.0) -> list:
    """Peak RSS growth beyond inputs, weights and one set of gradients of each (op, impl) in ``runs``, each in
    its own fresh process (forks of one child that builds the problem once); None where it failed."""
    job = {"builder": "benchmarks.fused_linear_ops:build_memory_runs", "n": n, "h": h, "v": v,
           "dtype": str(dtype).split(".")[-1], "threads": torch.get_num_threads(),
           "runs": [{"op": op, "impl": name} for op, name in runs], "blocks": list(blocks)}
    grad_bytes = (n * h + v * h) * torch.empty((), dtype=dtype).element_size()  # d hidden and d weight
    measured = harness.cpu_peaks_in_children(job, [timeout_s] * len(runs))
    return [peak - grad_bytes if peak is not None else None for peak, _ in measured]


def _cuda_extra_memory(fn, p: Problem, device) -> int:
    call = _step(fn, p)
    call()
    grad_bytes = sum(x.numel() * x.element_size() for x in (p.h.grad, p.w.grad) if x is not None)
    p.h.grad = p.w.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base - grad_bytes


OPS = ("fused_linear_reverse_kl", "fused_linear_minillm_loss")


def _interleaved_medians(impls: dict, p: Problem, device, repeats: int) -> tuple[dict, dict]:
    """(name -> median seconds or the reason it did not run, name -> the seconds of each round): one warm-up call
    each, then ``repeats`` rounds in which every implementation runs once, so that a noisy moment on a shared
    machine hits all of them alike."""
    calls, out = {}, {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            out[name] = fn
            continue
        call = _step(fn, p)
        try:
            call()
            calls[name] = call
        except Exception as exc:  # noqa: BLE001  (an alternative that fails is shown, not dropped)
            out[name] = f"failed: {harness.describe_error(exc)}"
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            harness.sync(device)
            start = time.perf_counter()
            call()
            harness.sync(device)
            samples[name].append(time.perf_counter() - start)
    out.update({name: statistics.median(times) for name, times in samples.items()})
    return {name: out[name] for name in impls}, samples


def _round_ratio(samples: dict, name: str, base: str = "ours") -> float | None:
    """The median over rounds of name's time / base's time in the same round (None where either did not run): on
    a machine whose speed drifts from minute to minute this holds better than the ratio of the two medians."""
    if name not in samples or base not in samples:
        return None
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


def run(device: torch.device, dtype: torch.dtype, shapes, *, ops=OPS, repeats: int = 3, memory: bool = True,
        progress=None, blocks: tuple[str, ...] = ()) -> list[dict]:
    """Rows of the fused-linear table (one per op, shape and implementation; ``blocks``: ``parse_blocks``)."""
    rate = harness.matmul_rate(device, dtype)
    rows = []
    for n, h, v in shapes:
        p = Problem.make(n, h, v, dtype, device)
        flops = 8 * n * v * h
        cpu_memory = []  # (op, impl, row): measured together after the timings (one child builds the problem once)
        for op in ops:
            impls = implementations(op, device, blocks)
            timings, samples = _interleaved_medians(impls, p, device, repeats)
            if progress is not None:
                progress(f"{op} {n}x{h}x{v}")
            reference_cache: dict = {}
            for name, t in timings.items():
                row = {"op": op, "n": n, "h": h, "v": v, "dtype": str(dtype).split(".")[-1], "impl": name,
                       "mode": "fwd+bwd", "time_s": t if isinstance(t, float) else None,
                       "note": t if isinstance(t, str) else "",
                       "floor_s": flops / rate, "matmul_rate_tflops": rate / 1e12}
                if isinstance(t, float):
                    row["tflops"] = flops / t / 1e12
                    row["pct_of_floor"] = 100 * (flops / rate) / t
                    row["ours_speedup"] = _round_ratio(samples, name)
                    fn = impls[name]
                    if not name.startswith("matmuls"):  # no loss: nothing to check, no memory claim
                        try:
                            row["max_rel_error"] = _error(op, fn, p, reference_cache)
                        except Exception as exc:  # noqa: BLE001
                            row["note"] = f"error check failed: {harness.describe_error(exc)}"
                    if memory and not name.startswith("matmuls"):
                        if device.type == "cuda":
                            row["extra_peak_bytes"] = _cuda_extra_memory(fn, p, device)
                        else:
                            cpu_memory.append((op, name, row))
                    row["logits_buffer_bytes"] = n * v * 4
                rows.append(row)
        if cpu_memory:
            peaks = _cpu_extra_memory([(op, name) for op, name, _ in cpu_memory], n, h, v, dtype, blocks)
            for (_, _, row), peak in zip(cpu_memory, peaks):
                row["extra_peak_bytes"] = peak
        del p
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| op | N×H×V | dtype | impl | fwd+bwd | TFLOP/s | % of FLOP floor | ours is × faster | extra peak memory "
           "(beyond inputs, weights, grads) | max rel. error |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, speed, mem, err = r.get("time_s"), r.get("ours_speedup"), r.get("extra_peak_bytes"), r.get("max_rel_error")
        cells = [r["op"], f"{r['n']}×{r['h']}×{r['v']}", r["dtype"], r["impl"],
                 harness.human_seconds(t) if t else r["note"],
                 f"{r['tflops']:.2f}" if "tflops" in r else "-",
                 f"{r['pct_of_floor']:.0f}%" if "pct_of_floor" in r else "-",
                 f"{speed:.2f}×" if speed is not None and r["impl"] != "ours" else "",
                 harness.human_bytes(mem) if mem is not None else "-",
                 f"{err:.1e}" if err is not None else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", default=None, help="comma-separated NxHxV, e.g. 8192x4096x128256 (default: the "
                                                       "device's list)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    parser.add_argument("--blocks", default="", help='semicolon-separated block configurations "n,G" (or "n"), '
                                                     'e.g. "256,2048;512,1024": ours[n,G] and matmuls-blocked[n,G] '
                                                     'rows with MINILLM_FAST_FUSED_LINEAR_BLOCKS set to each')
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median over them; default 3)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    ops = tuple(args.ops.split(","))
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; expected some of {', '.join(OPS)}")
    try:
        blocks = parse_blocks(args.blocks)
    except ValueError as exc:
        parser.error(f"--blocks: {exc}")
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")
    start = time.perf_counter()
    rows = []
    for shape in shapes:  # the table so far after each shape: a run cut short keeps what it measured
        rows += run(device, dtype, [shape], ops=ops, repeats=args.repeats, blocks=blocks)
        print(markdown(rows), flush=True)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()


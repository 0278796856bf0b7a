"""The benchmark suite: every op against every alternative and the physical floor, in one table.

    python -m benchmarks.run            # or: python benchmarks/run.py
    python -m benchmarks.run --quick    # tiny shapes, < 1 minute on a CPU (CI smoke)

See ``--help`` for the options and the meaning of every column.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root (benchmarks, minillm_fast) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import torch  # noqa: E402

import minillm_fast  # noqa: E402
from benchmarks import fused_linear_ops, harness, ops, report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------
# What runs by default
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One op at one shape, and the passes to run there.

    ``heavy``: on a CPU, leave out the slow chunked ``torch`` fallback unless it was asked for by name (~30 s per
    call at [2048, 128256] on 2 cores); ``fallback=False``: the same, to keep the default plan within its time
    budget (the fallback's calls and memory child cost ~2 s per op at [512, 32000]). ``compile=False``: the
    default plan leaves torch.compile out here to keep within its time budget (each graph costs seconds to
    compile); an explicit ``--alts`` or ``--shapes`` puts it back. Either way the table shows the row as skipped,
    with the reason."""
    op: str
    n: int
    v: int
    modes: tuple[str, ...]
    heavy: bool = False
    compile: bool = True
    fallback: bool = True


BOTH, FWD, FWDBWD = ("fwd", "fwd+bwd"), ("fwd",), ("fwd+bwd",)
HEADLINE = ("reverse_kl", "minillm_loss")

# A 2-core CPU, < 3 minutes when idle (the fused-linear table, ~30 s, included): the targets' shape
# [2048, 128256] for the two headline ops (fwd+bwd), every op at [512, 32000] (reverse_kl fwd too: token_stats'
# target is relative to it). torch.compile for the headline ops at the targets' shape only (its one-time start-up
# alone is ~15 s, then seconds per graph: at [512, 32000] its three graphs and their memory children cost ~15 s
# more); the chunked torch fallback for the headline ops at [512, 32000] only (~10 s more for the other five).
_SMALL = dict(compile=False, fallback=False)
CPU_PLAN = (
    [Cell(op, 2048, 128256, FWDBWD, heavy=True) for op in HEADLINE]
    + [Cell("reverse_kl", 512, 32000, BOTH, compile=False), Cell("minillm_loss", 512, 32000, FWDBWD, compile=False)]
    + [Cell("forward_kl", 512, 32000, FWDBWD, **_SMALL), Cell("jsd", 512, 32000, FWDBWD, **_SMALL),
       Cell("token_stats", 512, 32000, FWD, **_SMALL), Cell("pt_loss", 512, 32000, FWDBWD, **_SMALL),
       Cell("sample_mixture", 512, 32000, FWD, **_SMALL)]
)

# A GPU, most important first (a --time-limit or a `timeout` keeps what was measured): every op at [8192, 128256],
# then a vocabulary sweep and a token sweep of the two headline ops. With the token dimension dynamic, torch.compile
# builds one graph per (op, vocabulary, pass): 16 graphs in all.
GPU_PLAN = (
    [Cell(op, 8192, 128256, BOTH) for op in HEADLINE]
    + [Cell(op, 8192, 128256, ops.OPS[op].modes) for op in ops.OPS if op not in HEADLINE]
    + [Cell(op, 8192, v, FWDBWD) for v in (32000, 152064) for op in HEADLINE]
    + [Cell(op, n, 128256, FWDBWD) for n in (2048, 16384) for op in HEADLINE]
)

QUICK_PLAN = [Cell(op, 64, 4096, ops.OPS[op].modes) for op in ops.OPS]

DEFAULT_BACKENDS = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}

COLUMN_HELP = """\
columns of the table (one row per implementation; a group per op, shape and pass):
  op, shape     the op and its logits shape [tokens x vocabulary] (student and teacher alike)
  pass          fwd = forward only (under torch.no_grad); fwd+bwd = forward, then the student gradient
                (torch.autograd.grad of the loss)
  impl          ours:<backend> = minillm_fast with backend=<backend>; eager = plain PyTorch as people write it
                (divergences: log_softmax both, exp, multiply, sum; MiniLLM ops: the unfused style of MiniLLM's
                reference code, materialising fp32 softmaxes); compile = torch.compile of that same eager code
                (token dimension dynamic, vocabulary static); liger = Liger-Kernel's LigerJSD (beta=1 reverse KL,
                beta=0 forward KL, beta=0.5 JSD) including the fp32 log_softmax of both inputs, CUDA only
  time          median time of one call. GPU: triton.testing.do_bench (median), several interleaved rounds.
                CPU: wall clock after a warm-up; implementations are interleaved call by call and input sets
                are rotated (several copies of the inputs, so no call finds its data in cache; one when a
                single copy is beyond the caches)
  GB/s          bytes that must move / time. Must move = read student and teacher logits once (+ per-token
                inputs and outputs), and for fwd+bwd write the student gradient once. (TF/s instead for
                matmul-bound ops: FLOPs that must be done / time)
  %floor        floor time / time; floor = must-move bytes / copy bandwidth measured at startup on this
                device (a large tensor copy, read + write counted); for matmul-bound ops the larger of that
                and FLOPs / measured GEMM rate. 100% = at the physical floor. (sample_mixture's floor is
                reading both rows once, as its target is stated; drawing from one chosen row can beat it)
  xeager, xcompile, xliger
                on our rows: that alternative's median time / ours (>1: ours is faster); n/a where the
                alternative could not run (see its row)
  peak mem      peak memory beyond the inputs during one call (the gradient counts). GPU:
                torch.cuda.max_memory_allocated minus what was allocated before the call. CPU: in a fresh
                process running only that op (a fork of a child that built the op's inputs, one fork per
                implementation and pass): VmHWM after the call minus VmRSS before it (peak reset first)
  /grad         peak mem in units of one student-gradient buffer [tokens x vocabulary] in the logits' dtype
  err           max |out - ref| / max |ref| against minillm_fast.reference in float64 on the first rows
                (--check-rows) of the inputs: per-row values for our divergences, losses / statistics
                otherwise; fwd+bwd rows include the student gradient. "-" where there is no reference
                (sampling is stochastic)
  notes         compile <t>* = first call minus median (compile time, reported apart, not in "time");
                n = timed calls, and why fewer than wanted: "n=1 of 3: >5x ours:cpu" (an alternative more
                than --slow-factor times slower than our fast path, and over 0.2 s a call, stops after
                --slow-repeats calls) or "n=1 of 3: 3 s budget" (--budget-s reached); why a row has no
                numbers (not installed, unavailable, error, skipped)
"""


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
        epilog=COLUMN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", help=f"comma-separated ops (default: all of the plan): {', '.join(ops.OPS)}")
    parser.add_argument("--shapes", help="comma-separated TOKENSxVOCAB, e.g. 2048x128256,512x32000: every selected "
                                         "op at every shape, every pass (default: the device's plan)")
    parser.add_argument("--modes", help="comma-separated passes: fwd, fwd+bwd (default: the plan's)")
    parser.add_argument("--dtype", help="logits dtype: float32, bfloat16, float16 (default: bfloat16 on GPU, "
                                        "float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile: a smoke run (< 1 min)")
    parser.add_argument("--backends", help="comma-separated backends of ours (default: every one for the device: "
                                           "cpu,torch on CPU; cuda,triton,torch on GPU)")
    parser.add_argument("--alts", help="comma-separated alternatives: eager, compile, liger (default: all; "
                                       "--quick: eager, liger)")
    parser.add_argument("--out", help="output directory (default: benchmarks/results/<device>/, "
                                      "with --quick: .../<device>/quick/)")
    parser.add_argument("--repeats", type=int, help="CPU: timed calls of ours (default 5, --quick 3)")
    parser.add_argument("--alt-repeats", type=int, help="CPU: timed calls of an alternative and of the chunked "
                                                        "torch fallback (default 3, --quick 2)")
    parser.add_argument("--budget-s", type=float, default=3.0,
                        help="CPU: stop repeating an implementation once its timed calls add up to this many "
                             "seconds (default 3; at least one call, at least 3 for ours)")
    parser.add_argument("--slow-factor", type=float, default=5.0,
                        help="CPU: an alternative whose median so far exceeds this many times our fast path's "
                             "(and 0.2 s) stops after --slow-repeats calls (default 5; 0: never)")
    parser.add_argument("--slow-repeats", type=int, default=1,
                        help="CPU: timed calls of an alternative slower than --slow-factor x ours (default 1)")
    parser.add_argument("--input-sets", type=int, help="input sets rotated through (default: enough to exceed "
                                                       "the caches, at most 4, within a quarter of free memory)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument("--no-check", action="store_true", help="skip the error check against float64")
    parser.add_argument("--check-rows", type=int, default=8, help="rows compared with the float64 reference")
    parser.add_argument("--reuse-compile-cache", action="store_true",
                        help="keep Inductor's on-disk cache (default: a fresh one, so compile times are cold)")
    parser.add_argument("--time-limit", type=float, help="seconds: cells not started by then are skipped "
                                                         "(results so far are written)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any of our implementations failed")
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: all cores; --quick: 1, which "
                                                    "keeps a smoke run steady on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _parse_shape(text):
    try:
        n, v = text.lower().split("x")
        return int(n), int(v)
    except ValueError:
        raise SystemExit(f"--shapes: expected TOKENSxVOCAB like 2048x128256, got {text!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return device


def _fused_linear_ops(args) -> tuple[str, ...]:
    """The fused-linear ops to run (their own table, benchmarks/fused_linear_ops.py): all unless --ops names others."""
    names = _split(args.ops)
    return fused_linear_ops.OPS if names is None else tuple(n for n in names if n in fused_linear_ops.OPS)


def build_plan(args, device) -> list[Cell]:
    op_names = _split(args.ops)
    for name in op_names or []:
        if name not in ops.OPS and name not in fused_linear_ops.OPS:
            raise SystemExit(f"--ops: unknown op {name!r} (known: {', '.join(ops.OPS + fused_linear_ops.OPS)})")
    if op_names is not None:
        op_names = [n for n in op_names if n in ops.OPS]
    modes = _split(args.modes)
    for m in modes or []:
        if m not in ops.MODES:
            raise SystemExit(f"--modes: unknown pass {m!r} (known: {', '.join(ops.MODES)})")
    if args.shapes:
        shapes = [_parse_shape(s) for s in _split(args.shapes)]
        plan = [Cell(op, n, v, ops.OPS[op].modes) for (n, v) in shapes for op in (op_names or ops.OPS)]
    else:
        plan = QUICK_PLAN if args.quick else (GPU_PLAN if device.type == "cuda" else CPU_PLAN)
        plan = [c for c in plan if op_names is None or c.op in op_names]
    if args.alts:  # asked for by name: everywhere
        plan = [replace(c, compile=True) for c in plan]
    if modes:
        plan = [replace(c, modes=tuple(m for m in c.modes if m in modes)) for c in plan]
    return [c for c in plan if c.modes]


# ----------------------------------------------------------------------------------------------------------
# Running one cell
# ----------------------------------------------------------------------------------------------------------

class Interrupted(BaseException):  # not an Exception: the per-implementation error handlers must not swallow it
    pass


def _on_sigterm(signum, frame):  # `timeout` sends SIGTERM: stop, but still write what was measured
    raise Interrupted()


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def input_set_count(set_bytes: int, device, requested: int | None) -> int:
    if requested:
        return requested
    flush = (1 << 30) if device.type == "cuda" else (256 << 20)  # comfortably beyond L2 / last-level cache
    # One set that alone is beyond the caches needs no rotation (no call can find it in cache); smaller sets
    # rotate through enough copies to exceed the flush size.
    count = 1 if set_bytes >= flush else min(4, max(2, math.ceil(flush / max(set_bytes, 1))))
    # Leave room for the alternatives' temporaries (eager needs several fp32 copies of the logits).
    share = 8 if device.type == "cuda" else 4
    while count > 1 and count * set_bytes > _free_bytes(device) // share:
        count -= 1
    return count


class Runner:
    def __init__(self, args, device, dinfo, dtype, backends, explicit_backends, alts, progress):
        self.args, self.device, self.dinfo, self.dtype = args, device, dinfo, dtype
        self.backends, self.explicit_backends, self.alts = backends, explicit_backends, alts
        self.progress = progress
        self.unavailable = {b: ops.ours_unavailable(b, device) for b in backends}
        self.alt_unavailable = {a: ops.alternative_unavailable(a, device) for a in alts}
        self.cell_seconds: list[dict] = []  # where the wall time went (results.json meta), for sizing plans
        self._pending = None  # the last cell's memory children, running in a thread (see finish())
        quick = args.quick
        self.repeats = args.repeats or (3 if quick else 5)
        self.alt_repeats = args.alt_repeats or (2 if quick else 3)

    # -- which implementations, and why some cannot run --------------------------------------------------
    def impls(self, cell: Cell, op: ops.Op):
        """[(ImplSpec, reason-not-run or None)] for this cell."""
        out = []
        for b in self.backends:
            reason = self.unavailable[b]
            if reason is None and b == "torch" and self.device.type == "cpu" and "torch" not in self.explicit_backends:
                if cell.heavy:
                    reason = "skipped: chunked fallback, ~30 s per call here (--backends torch to include)"
                elif not cell.fallback:
                    reason = "skipped: chunked fallback (default plan's time budget; --backends cpu,torch to include)"
            out.append((ops.ImplSpec("ours", b), reason))
        for a in op.alternatives():
            if a not in self.alts:
                if self.args.quick and a == "compile":
                    out.append((ops.ImplSpec(a), "skipped (--quick; --alts compile to include)"))
                continue
            if a == "compile" and not cell.compile:
                out.append((ops.ImplSpec(a), "skipped (time budget of the default plan; --alts eager,compile "
                                             "to include)"))
                continue
            out.append((ops.ImplSpec(a), self.alt_unavailable[a]))
        return out

    def units(self, cell: Cell) -> int:
        op = ops.OPS[cell.op]
        runnable = sum(1 for _, why in self.impls(cell, op) if why is None)
        return runnable * len(cell.modes) * (1 if self.args.no_memory else 2)

    # -- one cell: all passes, all implementations --------------------------------------------------------
    def run_cell(self, cell: Cell) -> list[dict]:
        op = ops.OPS[cell.op]
        elem = torch.empty((), dtype=self.dtype).element_size()
        records = {}
        for mode in cell.modes:
            for spec, why in self.impls(cell, op):
                rec = {"op": cell.op, "n": cell.n, "v": cell.v, "shape": f"{cell.n}x{cell.v}",
                       "dtype": str(self.dtype).replace("torch.", ""), "mode": mode, "impl": spec.label,
                       "kind": spec.kind, "backend": spec.backend, "status": "ok", "note": None,
                       "bytes": op.bytes_moved(cell.n, cell.v, elem, mode),
                       "flops": op.flops(cell.n, cell.v, mode) if op.flops else None,
                       "grad_bytes": cell.n * cell.v * elem}
                if spec.kind == "eager":
                    rec["note"] = op.eager_note
                if why is not None:
                    rec["status"] = "skipped" if why.startswith("skipped") else "unavailable"
                    rec["note"] = why
                records[(mode, spec)] = rec
        runnable = [(mode, spec) for (mode, spec), r in records.items() if r["status"] == "ok"]
        if not runnable:
            self._derive(records)
            return list(records.values())
        t0 = time.perf_counter()
        # Building the inputs is not measured: it overlaps the previous cell's memory children (a CPU's peak
        # RSS does not depend on the load). Those must be done before any timing starts, though.
        sets = self._make_sets(cell, op, records, runnable)
        t1 = time.perf_counter()
        self.finish()
        t2 = time.perf_counter()
        if sets is not None:
            self._time_and_check(cell, op, records, runnable, sets)
        del sets
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        t3 = time.perf_counter()
        seconds = {"op": cell.op, "shape": f"{cell.n}x{cell.v}", "inputs_s": round(t1 - t0, 1),
                   "timing_and_check_s": round(t3 - t2, 1)}
        self.cell_seconds.append(seconds)
        if not self.args.no_memory and self.device.type == "cpu":
            self._start_cpu_memory(cell, op, records, runnable, seconds)  # finish() collects it
        else:
            self._derive(records)
        return list(records.values())

    def _make_sets(self, cell, op, records, runnable):
        device, args = self.device, self.args
        self.progress.set_postfix_str(f"{cell.op} {cell.n}x{cell.v}: inputs")
        set_bytes = ops.make_inputs(op.needs, 1, cell.v, self.dtype, device, 0).nbytes() * cell.n
        count = input_set_count(set_bytes, device, args.input_sets)
        try:
            return [ops.make_inputs(op.needs, cell.n, cell.v, self.dtype, device, args.seed + i)
                    for i in range(count)]
        except Exception as exc:  # noqa: BLE001
            for key in runnable:
                records[key].update(status="error", note="inputs: " + harness.describe_error(exc))
            return None

    def finish(self) -> None:
        """Wait for the last cell's memory children and fill in its records (call before using them)."""
        if self._pending is None:
            return
        thread, records, todo, box, seconds, started = self._pending
        thread.join()  # (an interrupt here leaves it pending, for abandon())
        self._pending = None
        measured = box.get("measured") or [(None, box.get("error", "not measured"))] * len(todo)
        for key, (peak, error) in zip(todo, measured):
            if error:
                records[key]["mem_note"] = error
            else:
                records[key]["peak_bytes"] = peak
        seconds["memory_children_s"] = round(box.get("total", time.perf_counter() - started), 1)
        detail = box["seconds"]
        if detail:  # where that went: the cell child's inputs, then each fork
            seconds["memory_detail_s"] = {"inputs": round(detail.get("inputs", 0.0), 1), **{
                f"{mode} {spec.label}": (round(t, 1) if t is not None else None)
                for (mode, spec), t in zip(todo, detail.get("runs") or [])}}
        self._derive(records)

    def abandon(self, why: str) -> None:
        """Interrupted: give up on the last cell's memory children (daemonic: they end with us)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            _, records, todo, box, _, _ = pending
            for i, key in enumerate(todo):
                peak, error = dict(box["partial"]).get(i, (None, why))  # what arrived before the interrupt
                if error:
                    records[key]["mem_note"] = error
                else:
                    records[key]["peak_bytes"] = peak
            self._derive(records)

    def _time_and_check(self, cell, op, records, runnable, sets):
        device, args = self.device, self.args
        count = len(sets)
        impls = {spec: ops.build_impl(op, spec) for _, spec in runnable}
        for mode in cell.modes:
            specs = [spec for m, spec in runnable if m == mode]
            candidates, reference = [], None
            for spec in specs:
                call = ops.make_call(op, impls[spec], sets, mode)
                warmup = None
                if device.type == "cpu" and spec.kind != "compile":  # same code paths, 8 rows: cheap
                    warmup = ops.make_call(op, impls[spec], [sets[0].head(8)], mode)
                # The chunked torch fallback is not the fast path: it gets the alternatives' (fewer) repeats.
                # Ours never gets fewer than 3 calls (the time budget notwithstanding); an alternative that proves
                # more than --slow-factor times slower than our fast path stops after --slow-repeats calls.
                fast_path = spec.kind == "ours" and spec.backend != "torch"
                if fast_path and reference is None:
                    reference = spec.label
                candidates.append(harness.Candidate(
                    spec.label, call, warmup, self.repeats if fast_path else self.alt_repeats,
                    min_repeats=min(3, self.repeats) if spec.kind == "ours" else 1,
                    slow_repeats=args.slow_repeats if spec.kind != "ours" and args.slow_factor > 0 else None))
            self.progress.set_postfix_str(f"{cell.op} {cell.n}x{cell.v} {mode}: timing")
            timings = harness.time_candidates(candidates, device, budget_s=args.budget_s, reference=reference,
                                              slow_factor=args.slow_factor)
            reference_values: dict = {}  # float64 reference outputs of this pass, computed once for all impls
            for spec in specs:
                rec, t = records[(mode, spec)], timings[spec.label]
                rec["input_sets"] = count
                if t.error:
                    rec.update(status="error", note=t.error)
                else:
                    rec.update(median_s=t.median_s, samples=t.samples, first_call_s=t.first_call_s)
                    if t.repeats is not None:
                        rec["repeats_wanted"] = t.repeats
                    if t.fewer_calls == "slow":  # why it got fewer timed calls than repeats_wanted
                        rec["fewer_calls"] = f">{args.slow_factor:g}x {reference}"
                    elif t.fewer_calls == "budget":
                        rec["fewer_calls"] = f"{args.budget_s:g} s budget"
                    if spec.kind == "compile" and t.first_call_s is not None:
                        rec["compile_s"] = max(0.0, t.first_call_s - t.median_s)
                self.progress.update(1)
                if rec["status"] != "ok":
                    continue
                if not args.no_check:
                    try:
                        checked = ops.check_error(op, spec, impls[spec], sets[0], mode, rows=args.check_rows,
                                                  cache=reference_values)
                        rec["err"], rec["err_detail"] = checked["err"], checked["detail"]
                    except Exception as exc:  # noqa: BLE001
                        rec["err_note"] = "check failed: " + harness.describe_error(exc)
                if device.type == "cuda" and not args.no_memory:
                    self.progress.set_postfix_str(f"{cell.op} {cell.n}x{cell.v} {mode} {spec.label}: memory")
                    try:
                        rec["peak_bytes"] = harness.cuda_peak_bytes(ops.make_call(op, impls[spec], sets, mode),
                                                                    device)
                    except Exception as exc:  # noqa: BLE001
                        rec["mem_note"] = harness.describe_error(exc)
                        torch.cuda.empty_cache()
                    self.progress.update(1)
        del impls
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _start_cpu_memory(self, cell, op, records, runnable, seconds):
        """Every implementation and pass of the cell: one child builds the inputs once, and a fresh fork of it
        measures each (see harness.cpu_peaks_in_children). Runs in a thread, while the next cell's inputs are
        built; ``finish()`` waits for it."""
        todo = []
        for mode, spec in runnable:
            if records[(mode, spec)]["status"] == "ok":
                todo.append((mode, spec))
            else:
                self.progress.update(1)
        if not todo:
            self._derive(records)
            return
        # Cheapest first (a slow one that hangs or runs out of memory then holds up nothing else).
        todo.sort(key=lambda key: records[key].get("median_s") or 0.0)
        job = ops.memory_cell_job(op, [(spec, mode) for mode, spec in todo], cell.n, cell.v, self.dtype,
                                  self.args.seed)
        job["threads"] = torch.get_num_threads()
        timeouts = []
        for key in todo:
            rec = records[key]
            slowest = max(rec.get("first_call_s") or 0.0, rec.get("median_s") or 0.0)
            timeouts.append(max(120.0, 6 * slowest + 60))

        def label(i):
            mode, spec = todo[i]
            return f"{cell.op} {cell.n}x{cell.v} {mode} {spec.label}: memory (child)"

        box: dict = {"seconds": {}, "partial": {}}

        def on_result(i, result):  # in the thread
            box["partial"][i] = result
            self.progress.update(1)
            if i + 1 < len(todo):
                self.progress.set_postfix_str(label(i + 1))

        started = time.perf_counter()

        def measure():  # in the thread: touches only `box` and the progress bar, never the records
            try:
                box["measured"] = harness.cpu_peaks_in_children(job, timeouts, on_result=on_result,
                                                                seconds=box["seconds"])
            except Exception as exc:  # noqa: BLE001
                box["error"] = harness.describe_error(exc)
            box["total"] = time.perf_counter() - started

        self.progress.set_postfix_str(label(0))
        thread = threading.Thread(target=measure, name="memory-children", daemon=True)
        thread.start()
        self._pending = (thread, records, todo, box, seconds, started)

    def _derive(self, records):
        bw = self.dinfo.copy_bytes_per_s
        for rec in records.values():
            rec["floor_s"] = rec["bytes"] / bw if bw and not math.isnan(bw) else None
            if rec.get("flops"):
                if self.dinfo.matmul_flop_per_s is None:  # measured once, on first need
                    self.dinfo.matmul_flop_per_s = harness.matmul_rate(self.device, self.dtype)
                rec["floor_s"] = max(rec["floor_s"] or 0.0, rec["flops"] / self.dinfo.matmul_flop_per_s)
            if rec.get("peak_bytes") is not None:
                rec["peak_grad_buffers"] = rec["peak_bytes"] / rec["grad_bytes"]
            t = rec.get("median_s")
            if rec["status"] == "ok" and t:
                rec["gbps"] = rec["bytes"] / t / 1e9
                if rec.get("flops"):
                    rec["tflops"] = rec["flops"] / t / 1e12
                rec["pct_floor"] = 100 * rec["floor_s"] / t if rec["floor_s"] else None
        for (mode, spec), rec in records.items():
            if spec.kind != "ours" or rec["status"] != "ok":
                continue
            rec["speedup"] = {}
            for (m2, other), alt in records.items():
                if m2 == mode and other.kind != "ours":
                    alt_t = alt.get("median_s") if alt["status"] == "ok" else None
                    rec["speedup"][other.kind] = alt_t / rec["median_s"] if alt_t else None


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def _probe_vec_isas_in_parallel(device) -> None:
    """Part of Inductor's CPU start-up: it compiles and loads one test program per vector ISA the CPU has (AMX,
    AVX512-VNNI, AVX512, AVX2 on a recent Xeon: seconds each, one after another). Run those same checks two at a
    time (threads; the compiler runs outside the GIL): Inductor caches their results, so its own sequential
    pass then finds them done and picks the same ISA. Any failure leaves that pass to do the work as usual."""
    if device.type != "cpu":
        return
    try:
        from concurrent.futures import ThreadPoolExecutor

        from torch._inductor import cpu_vec_isa
        supported = cpu_vec_isa.x86_isa_checker()
        isas = [isa for isa in cpu_vec_isa.supported_vec_isa_list
                if all(flag in supported for flag in str(isa).split())]
        if len(isas) > 1:
            with ThreadPoolExecutor(max_workers=min(len(isas), os.cpu_count() or 1)) as pool:
                list(pool.map(bool, isas))  # VecISA.__bool__ = the (cached) build-and-load check
    except Exception:  # noqa: BLE001 - private API: whatever goes wrong, Inductor does it itself below
        pass


def _compile_init(device) -> float | None:
    """Time Inductor's one-time start-up (imports, toolchain probes) on a trivial graph, so that the compile
    times reported per op are the op's own."""
    try:
        ops._configure_dynamo()
        t0 = time.perf_counter()
        _probe_vec_isas_in_parallel(device)
        torch.compile(lambda x: (x.exp() + 1).sum())(torch.randn(8, 8, device=device))
        harness.sync(device)
        return time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - the compile rows will show the error
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ops.DTYPES:
        raise SystemExit(f"--dtype: expected float32, bfloat16 or float16, got {dtype_name!r}")
    dtype = ops.DTYPES[dtype_name]
    explicit_backends = _split(args.backends) or []
    backends = explicit_backends or list(DEFAULT_BACKENDS.get(device.type, ("torch",)))
    alts = _split(args.alts) or (["eager", "liger"] if args.quick else ["eager", "compile", "liger"])
    for a in alts:
        if a not in ("eager", "compile", "liger"):
            raise SystemExit(f"--alts: unknown alternative {a!r} (known: eager, compile, liger)")
    threads = args.threads or (1 if args.quick else None)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    plan = build_plan(args, device)
    if not plan and not _fused_linear_ops(args):
        raise SystemExit("nothing to run: --ops / --shapes / --modes select no cell")

    from tqdm.auto import tqdm

    started = time.perf_counter()
    dinfo = harness.describe_device(device)
    out_dir = Path(args.out) if args.out else RESULTS_DIR / dinfo.slug / ("quick" if args.quick else "")
    compile_dir = None
    if "compile" in alts and not args.reuse_compile_cache:
        compile_dir = tempfile.mkdtemp(prefix="minillm_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_dir  # read lazily by Inductor; inherited by children
    print(f"minillm_fast benchmark on {dinfo.name} ({device}), {dtype_name}; {len(plan)} cells -> {out_dir}",
          file=sys.stderr)
    dinfo.copy_bytes_per_s = harness.copy_bandwidth(device)
    memory_children = device.type == "cpu" and not args.no_memory
    compile_measured = "compile" in alts and ops.alternative_unavailable("compile", device) is None
    if memory_children:  # start the children's fork server now: its imports overlap with our start-up
        harness.prepare_children(warm_inductor=compile_measured)
        harness.start_children()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    meta = {
        "device": dinfo.name, "device_slug": dinfo.slug, "device_extra": dinfo.extra, "dtype": dtype_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                                 " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__, "triton": triton_version, "minillm_fast": minillm_fast.__version__,
        "git": _git_commit(), "copy_gb_per_s": dinfo.copy_bytes_per_s / 1e9,
        "backends": backends, "alternatives": alts, "quick": args.quick,
    }
    if compile_measured:
        print("warming up torch.compile (one-time Inductor start-up, excluded from compile times)...",
              file=sys.stderr)
        meta["compile_init_s"] = _compile_init(device)
    if memory_children:  # before any timing: the server's start-up must not overlap a measurement
        why = harness.wait_for_children()
        if why:
            print(f"warning: {why}", file=sys.stderr)

    gc.collect()
    gc.freeze()  # torch, dynamo and sympy leave millions of objects: keep the collections between calls cheap
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    results: list[dict] = []
    progress = tqdm(total=1, desc="benchmark", unit="step", file=sys.stderr, dynamic_ncols=True)
    interrupted = False
    try:
        runner = Runner(args, device, dinfo, dtype, backends, explicit_backends, alts, progress)
        progress.reset(total=sum(runner.units(c) for c in plan))
        done = 0
        try:
            for cell in plan:
                if args.time_limit and time.perf_counter() - started > args.time_limit:
                    results += _not_run(plan[done:], runner, "skipped (--time-limit reached)")
                    break
                results += runner.run_cell(cell)  # its memory may still be measuring: run_cell / finish wait
                done += 1
                report.write(results, meta, out_dir)  # after every cell: a killed run still leaves its results
            runner.finish()
        except (Interrupted, KeyboardInterrupt):
            interrupted = True
            runner.abandon("not measured (interrupted)")
            results += _not_run(plan[done:], runner, "not run (interrupted)")
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous)
        gc.unfreeze()
        if compile_dir:
            shutil.rmtree(compile_dir, ignore_errors=True)

    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["cell_seconds"] = runner.cell_seconds
    if dinfo.matmul_flop_per_s:
        meta["matmul_tflop_per_s"] = dinfo.matmul_flop_per_s / 1e12
    report.write(results, meta, out_dir)
    plots = [] if args.no_plots or not results else report.plot(results, meta, out_dir)
    fused_started = time.perf_counter()
    fused_table = _run_fused_linear(args, device, dtype, meta, out_dir)
    if fused_table:
        meta["fused_linear_s"] = round(time.perf_counter() - fused_started, 1)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report.write(results, meta, out_dir)  # again: the wall time now counts the fused-linear table too
    print()
    print("\n".join(report.header_lines(meta)))
    print()
    print(report.text_table(results))
    print()
    print(report.FOOTNOTE)
    if fused_table:
        print("\nFused-linear ops (from hidden states and lm_head weights; FLOP floor = 8 N V H over the measured "
              "matmul rate):\n" + fused_table)
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
          + "".join(f", {p}" for p in plots) + f"  ({meta['wall_s']:.0f} s)")
    failed = [r for r in results if r["kind"] == "ours" and r["status"] == "error"]
    if interrupted:
        return 130
    return 1 if (args.strict and failed) else 0


def _run_fused_linear(args, device, dtype, meta, out_dir) -> str | None:
    """The fused-linear ops' table (benchmarks/fused_linear_ops.py) into fused_linear.md / .json beside the results."""
    names = _fused_linear_ops(args)
    if not names:
        return None
    if args.shapes:
        return None  # --shapes are [N, V] logits shapes; run `python -m benchmarks.fused_linear_ops` for others
    shapes = (fused_linear_ops.QUICK_SHAPES if args.quick else fused_linear_ops.GPU_SHAPES if device.type == "cuda"
              else fused_linear_ops.CPU_DEFAULT_SHAPES)
    rows = fused_linear_ops.run(device, dtype, shapes, ops=names, repeats=3 if device.type == "cuda" else 2,
                                memory=not args.no_memory)
    table = fused_linear_ops.markdown(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fused_linear.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out_dir / "fused_linear.md").write_text("\n".join(report.header_lines(meta)) + "\n\n" + table + "\n")
    return table


def _not_run(cells, runner, why) -> list[dict]:
    out = []
    for cell in cells:
        for mode in cell.modes:
            for spec, _ in runner.impls(cell, ops.OPS[cell.op]):
                out.append({"op": cell.op, "n": cell.n, "v": cell.v, "shape": f"{cell.n}x{cell.v}",
                            "dtype": str(runner.dtype).replace("torch.", ""), "mode": mode, "impl": spec.label,
                            "kind": spec.kind, "backend": spec.backend, "status": "skipped", "note": why})
    return out


if __name__ == "__main__":
    sys.exit(main())

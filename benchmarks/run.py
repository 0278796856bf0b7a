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
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import torch  # noqa: E402

import minillm_fast  # noqa: E402
from benchmarks import harness, ops, report  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------
# What runs by default
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One op at one shape, and the passes to run there.

    ``heavy``: on a CPU, leave out the slow chunked ``torch`` fallback unless it was asked for by name (~30 s per
    call at [2048, 128256] on 2 cores). ``compile=False``: the default plan leaves torch.compile out here to keep
    within its time budget (each graph costs seconds to compile); an explicit ``--alts`` or ``--shapes`` puts it
    back. Either way the table shows the row as skipped, with the reason."""
    op: str
    n: int
    v: int
    modes: tuple[str, ...]
    heavy: bool = False
    compile: bool = True


BOTH, FWD, FWDBWD = ("fwd", "fwd+bwd"), ("fwd",), ("fwd+bwd",)
HEADLINE = ("reverse_kl", "minillm_loss")

# A 2-core CPU, ~3 minutes when idle: the targets' shape [2048, 128256] for the two headline ops (fwd+bwd),
# every op at [512, 32000] (reverse_kl fwd too: token_stats' target is relative to it), torch.compile for the
# headline ops only (its one-time start-up alone is ~20 s, then seconds per graph).
CPU_PLAN = (
    [Cell(op, 2048, 128256, FWDBWD, heavy=True) for op in HEADLINE]
    + [Cell("reverse_kl", 512, 32000, BOTH), Cell("minillm_loss", 512, 32000, FWDBWD)]
    + [Cell("forward_kl", 512, 32000, FWDBWD, compile=False), Cell("jsd", 512, 32000, FWDBWD, compile=False),
       Cell("token_stats", 512, 32000, FWD, compile=False), Cell("pt_loss", 512, 32000, FWDBWD, compile=False),
       Cell("sample_mixture", 512, 32000, FWD, compile=False)]
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
                are rotated (several copies of the inputs, so no call finds its data in cache)
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
                torch.cuda.max_memory_allocated minus what was allocated before the call. CPU: in a fresh child
                process running only that op: VmHWM after the call minus VmRSS before it (peak reset first)
  /grad         peak mem in units of one student-gradient buffer [tokens x vocabulary] in the logits' dtype
  err           max |out - ref| / max |ref| against minillm_fast.reference in float64 on the first rows
                (--check-rows) of the inputs: per-row values for our divergences, losses / statistics
                otherwise; fwd+bwd rows include the student gradient. "-" where there is no reference
                (sampling is stochastic)
  notes         compile <t>* = first call minus median (compile time, reported apart, not in "time");
                n = timed calls; why a row has no numbers (not installed, unavailable, error, skipped)
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
                             "seconds (default 3; at least one call)")
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


def build_plan(args, device) -> list[Cell]:
    op_names = _split(args.ops)
    for name in op_names or []:
        if name not in ops.OPS:
            raise SystemExit(f"--ops: unknown op {name!r} (known: {', '.join(ops.OPS)})")
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
    count = min(4, max(2, math.ceil(flush / max(set_bytes, 1))))
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
        quick = args.quick
        self.repeats = args.repeats or (3 if quick else 5)
        self.alt_repeats = args.alt_repeats or (2 if quick else 3)

    # -- which implementations, and why some cannot run --------------------------------------------------
    def impls(self, cell: Cell, op: ops.Op):
        """[(ImplSpec, reason-not-run or None)] for this cell."""
        out = []
        for b in self.backends:
            reason = self.unavailable[b]
            if reason is None and cell.heavy and b == "torch" and self.device.type == "cpu" \
                    and "torch" not in self.explicit_backends:
                reason = "skipped: chunked fallback, ~30 s per call here (--backends torch to include)"
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
        t0 = time.perf_counter()
        if runnable:
            self._time_and_check(cell, op, records, runnable)
            t1 = time.perf_counter()
            if not self.args.no_memory and self.device.type == "cpu":
                self._cpu_memory(cell, op, records, runnable)
            self.cell_seconds.append({"op": cell.op, "shape": f"{cell.n}x{cell.v}",
                                      "timing_and_check_s": round(t1 - t0, 1),
                                      "memory_children_s": round(time.perf_counter() - t1, 1)})
        self._derive(records)
        return list(records.values())

    def _time_and_check(self, cell, op, records, runnable):
        device, args = self.device, self.args
        set_bytes = ops.make_inputs(op.needs, 1, cell.v, self.dtype, device, 0).nbytes() * cell.n
        count = input_set_count(set_bytes, device, args.input_sets)
        try:
            sets = [ops.make_inputs(op.needs, cell.n, cell.v, self.dtype, device, args.seed + i)
                    for i in range(count)]
        except Exception as exc:  # noqa: BLE001
            for key in runnable:
                records[key].update(status="error", note="inputs: " + harness.describe_error(exc))
            return
        impls = {spec: ops.build_impl(op, spec) for _, spec in runnable}
        for mode in cell.modes:
            specs = [spec for m, spec in runnable if m == mode]
            candidates = []
            for spec in specs:
                call = ops.make_call(op, impls[spec], sets, mode)
                warmup = None
                if device.type == "cpu" and spec.kind != "compile":  # same code paths, 8 rows: cheap
                    warmup = ops.make_call(op, impls[spec], [sets[0].head(8)], mode)
                # The chunked torch fallback is not the fast path: it gets the alternatives' (fewer) repeats.
                fast_path = spec.kind == "ours" and spec.backend != "torch"
                candidates.append(harness.Candidate(spec.label, call, warmup,
                                                    self.repeats if fast_path else self.alt_repeats))
            self.progress.set_postfix_str(f"{cell.op} {cell.n}x{cell.v} {mode}: timing")
            timings = harness.time_candidates(candidates, device, budget_s=args.budget_s)
            for spec in specs:
                rec, t = records[(mode, spec)], timings[spec.label]
                rec["input_sets"] = count
                if t.error:
                    rec.update(status="error", note=t.error)
                else:
                    rec.update(median_s=t.median_s, samples=t.samples, first_call_s=t.first_call_s)
                    if spec.kind == "compile" and t.first_call_s is not None:
                        rec["compile_s"] = max(0.0, t.first_call_s - t.median_s)
                self.progress.update(1)
                if rec["status"] != "ok":
                    continue
                if not args.no_check:
                    try:
                        checked = ops.check_error(op, spec, impls[spec], sets[0], mode, rows=args.check_rows)
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
        del sets, impls
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _cpu_memory(self, cell, op, records, runnable):
        for mode, spec in runnable:
            rec = records[(mode, spec)]
            if rec["status"] != "ok":
                self.progress.update(1)
                continue
            self.progress.set_postfix_str(f"{cell.op} {cell.n}x{cell.v} {mode} {spec.label}: memory (child)")
            job = ops.memory_job(op, spec, cell.n, cell.v, self.dtype, mode, self.args.seed)
            job["threads"] = torch.get_num_threads()
            slowest = max(rec.get("first_call_s") or 0.0, rec.get("median_s") or 0.0)
            peak, error = harness.cpu_peak_bytes_in_child(job, timeout_s=max(120.0, 6 * slowest + 60))
            if error:
                rec["mem_note"] = error
            else:
                rec["peak_bytes"] = peak
            self.progress.update(1)

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


def _compile_init(device) -> float | None:
    """Time Inductor's one-time start-up (imports, toolchain probes) on a trivial graph, so that the compile
    times reported per op are the op's own."""
    try:
        ops._configure_dynamo()
        t0 = time.perf_counter()
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
    if not plan:
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
    if "compile" in alts and ops.alternative_unavailable("compile", device) is None:
        print("warming up torch.compile (one-time Inductor start-up, excluded from compile times)...",
              file=sys.stderr)
        meta["compile_init_s"] = _compile_init(device)
        harness.prepare_children(warm_inductor=device.type == "cpu" and not args.no_memory)

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
                results += runner.run_cell(cell)
                done += 1
                report.write(results, meta, out_dir)  # after every cell: a killed run still leaves its results
        except (Interrupted, KeyboardInterrupt):
            interrupted = True
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
    plots = [] if args.no_plots else report.plot(results, meta, out_dir)
    print()
    print("\n".join(report.header_lines(meta)))
    print()
    print(report.text_table(results))
    print()
    print(report.FOOTNOTE)
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
          + "".join(f", {p}" for p in plots) + f"  ({meta['wall_s']:.0f} s)")
    failed = [r for r in results if r["kind"] == "ours" and r["status"] == "error"]
    if interrupted:
        return 130
    return 1 if (args.strict and failed) else 0


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

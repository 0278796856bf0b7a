"""Measuring: the device and its floors, wall-clock / do_bench timing, peak memory.

Nothing here knows about losses: callers hand in zero-argument callables (``call()`` runs the op once on the next
input set of a rotation) and get numbers back.

* **Floors are measured, not typed.** ``copy_bandwidth`` times a large ``dst.copy_(src)`` on the device (bytes
  moved = read + write); a memory-bound op's floor is its must-move bytes over that rate. ``matmul_rate`` times a
  large GEMM, for the FLOP floors of fused-linear ops.
* **Timing.** On a GPU, ``triton.testing.do_bench`` (median); on a CPU a wall clock (median) after a warm-up.
  Candidates of one measurement are interleaved (round-robin), so that a noisy neighbour slows all of them alike.
* **Memory.** On a GPU, ``torch.cuda.max_memory_allocated`` around one call, minus what was allocated before it
  (the inputs). On a CPU, a *child process* (forked from a lean fork server) builds the op's inputs once; then,
  for each implementation and pass, a fresh fork of that child runs the op once as warm-up, returns freed memory
  to the OS, resets its peak-RSS mark (``/proc/self/clear_refs``) and runs the op once more: peak = ``VmHWM``
  after it minus ``VmRSS`` before it. Each measurement is thus a process that has built its inputs and run only
  that op (as with one child per measurement), while big inputs are built once per (op, shape) instead of once
  per measurement. ``ru_maxrss`` is not used: it would carry the parent's peak.
"""
from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing as mp
import os
import pickle
import re
import select
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


# ----------------------------------------------------------------------------------------------------------
# The device
# ----------------------------------------------------------------------------------------------------------

@dataclass
class DeviceInfo:
    device: torch.device
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "Intel(R) Xeon(R) Processor, 2 cores"
    slug: str  # directory name for results: "nvidia-h100-80gb-hbm3", "cpu-intel-xeon-processor-2c"
    copy_bytes_per_s: float = float("nan")
    matmul_flop_per_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


def describe_device(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(device, name, slugify(name),
                          extra={"memory_gib": round(props.total_memory / 2**30, 1),
                                 "cuda": torch.version.cuda})
    threads = torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    model = _cpu_model()
    return DeviceInfo(device, f"{model}, {cpus} CPUs, {threads} threads used", f"cpu-{slugify(model)}-{cpus}c",
                      extra={"threads": threads, "cpus": cpus})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).zero_()  # touched: no page faults in the timed copies
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, repeats=7)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP per second of a large square GEMM in ``dtype`` (the FLOP floor of fused-linear ops)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, repeats=5)
    return 2 * n ** 3 / t


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------

def median_time(call: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``call`` (one untimed warm-up call first)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(call, return_mode="median") / 1e3
    call()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@dataclass
class Candidate:
    """One implementation to time. ``call`` runs it once on the next input set of the rotation.

    ``warmup``: a cheap call that loads the same code paths (e.g. the op on 8 rows), or None to warm up with a
    full ``call`` whose time is then reported as ``first_call_s`` (a compiled candidate: that call compiles).
    ``repeats``: timed calls wanted; ``min_repeats``: the time budget never stops it before this many;
    ``slow_repeats``: if set, and its median so far is more than ``slow_factor`` times the reference candidate's
    (see ``time_candidates``), it stops after this many calls instead (a far slower alternative).
    """
    name: str
    call: Callable[[], object]
    warmup: Callable[[], object] | None = None
    repeats: int = 5
    min_repeats: int = 1
    slow_repeats: int | None = None


@dataclass
class Timing:
    median_s: float | None = None
    samples: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    error: str | None = None
    repeats: int | None = None  # the timed calls wanted
    fewer_calls: str | None = None  # why it got fewer: "budget" (time budget) or "slow" (> slow_factor x reference)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}"[:160]


def _timed(call, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - t0


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_candidates(candidates: list[Candidate], device: torch.device, *, budget_s: float = 10.0,
                    rounds_gpu: int = 3, on_sample: Callable[[str], None] | None = None,
                    reference: str | None = None, slow_factor: float = 5.0,
                    slow_min_s: float = 0.2) -> dict[str, Timing]:
    """Time every candidate, interleaved. Returns name -> Timing (median over samples, or the error).

    CPU: each candidate warms up, then rounds of one timed call per candidate until it has ``repeats`` samples,
    or has spent ``budget_s`` (after at least ``min_repeats`` samples), or - a candidate with ``slow_repeats`` -
    has ``slow_repeats`` samples whose median is more than ``slow_factor`` times the median of the ``reference``
    candidate's samples so far (the reference is timed first in every round) and at least ``slow_min_s`` (below
    that, more calls cost little). ``Timing.fewer_calls`` says which rule cut a candidate short.
    GPU: ``rounds_gpu`` rounds, each one ``do_bench`` (median) per candidate; the result is the median of the
    rounds.
    """
    results = {c.name: Timing(repeats=c.repeats if device.type != "cuda" else None) for c in candidates}
    ordered = sorted(candidates, key=lambda c: c.name != reference)  # the reference first in every round
    live = []
    for c in ordered:  # warm-up (and the compile of a compiled candidate)
        timing = results[c.name]
        try:
            if c.warmup is not None:
                c.warmup()
                sync(device)
            else:
                timing.first_call_s = _timed(c.call, device)
            live.append(c)
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a table entry, not a crash
            timing.error = describe_error(exc)
            _release(device)
    if device.type == "cuda":
        import triton.testing
        for _ in range(rounds_gpu):
            for c in list(live):
                try:
                    ms = triton.testing.do_bench(c.call, return_mode="median")
                    results[c.name].samples.append(ms / 1e3)
                except Exception as exc:  # noqa: BLE001
                    results[c.name].error = describe_error(exc)
                    live.remove(c)
                    _release(device)
                if on_sample:
                    on_sample(c.name)
    else:
        spent = {c.name: 0.0 for c in live}
        while live:
            for c in list(live):
                gc.collect()
                try:
                    t = _timed(c.call, device)
                except Exception as exc:  # noqa: BLE001
                    results[c.name].error = describe_error(exc)
                    live.remove(c)
                    continue
                timing = results[c.name]
                timing.samples.append(t)
                spent[c.name] += t
                n = len(timing.samples)
                ref = results[reference].samples if reference and c.name != reference else None
                if n >= c.repeats:
                    live.remove(c)
                elif (c.slow_repeats is not None and ref and n >= c.slow_repeats
                      and statistics.median(timing.samples) > max(slow_factor * statistics.median(ref), slow_min_s)):
                    timing.fewer_calls = "slow"
                    live.remove(c)
                elif spent[c.name] >= budget_s and n >= c.min_repeats:
                    timing.fewer_calls = "budget"
                    live.remove(c)
                if on_sample:
                    on_sample(c.name)
    for timing in results.values():
        if timing.samples and timing.error is None:
            timing.median_s = statistics.median(timing.samples)
    return results


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------

def cuda_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one ``call`` beyond what was allocated before it (the inputs)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _return_freed_memory_to_os() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size to the current one" (Linux >= 4.0)
        return True
    except OSError:
        return False


def rss_peak_of(call: Callable[[], object], warmup: Callable[[], object] | None) -> dict:
    """In *this* process (meant to be a fresh child): peak RSS growth during one ``call``, in bytes."""
    if warmup is not None:
        warmup()
    _return_freed_memory_to_os()
    reset = _reset_peak_rss()
    base_kib = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
    out = call()
    peak_kib = _status_kib("VmHWM")
    del out
    return {"peak_bytes": max(0, peak_kib - base_kib) * 1024, "hwm_reset": reset}


_SERVER_CONTEXT = None


def prepare_children(warm_inductor: bool) -> None:
    """Before the first child: also warm Inductor up in the fork server (when torch.compile is measured)."""
    os.environ["MINILLM_BENCH_WARM_INDUCTOR"] = "1" if warm_inductor else "0"


def _child_context():
    """A fork server that has imported torch and the suite once (benchmarks/_child_server.py): each child is a
    cheap fork of a lean process that has run nothing."""
    global _SERVER_CONTEXT
    if _SERVER_CONTEXT is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["benchmarks._child_server"])
        _SERVER_CONTEXT = ctx
    return _SERVER_CONTEXT


def start_children() -> None:
    """Start the fork server now, without waiting for it: its imports (and Inductor warm-up) then overlap with
    the caller's own start-up. ``wait_for_children`` blocks until it can fork. Call ``prepare_children`` and set
    the environment the children need (e.g. ``TORCHINDUCTOR_CACHE_DIR``) first: the server inherits it now."""
    from multiprocessing import forkserver
    _child_context()
    forkserver.ensure_running()


def _noop(conn) -> None:
    conn.send("ok")
    conn.close()


def wait_for_children(timeout_s: float = 300.0) -> str | None:
    """Block until the fork server has finished preloading (a trivial child answers). None, or why not."""
    ctx = _child_context()
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_noop, args=(child_end,), daemon=True)
    proc.start()
    child_end.close()
    try:
        ok = parent_end.poll(timeout_s) and parent_end.recv() == "ok"
    except EOFError:
        ok = False
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return None if ok else "the memory children's fork server did not start"


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the process that forked us dies (a killed cell child takes its fork along)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _measure_in_fork(build: Callable[[], tuple], threads: int | None, timeout_s: float) -> tuple[str, object]:
    """Fork; in the fork: ``call, warmup = build()`` and ``rss_peak_of(call, warmup)``. ("ok", result) or
    ("error", message). The fork is a fresh process that has the inputs and nothing else of its own."""
    parent_pid = os.getpid()
    started = time.perf_counter()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fork: never returns
        code = 1
        try:
            os.close(read_fd)
            _die_with_parent()
            if os.getppid() != parent_pid:
                os._exit(1)
            try:
                if threads:
                    torch.set_num_threads(threads)
                call, warmup = build()
                payload = ("ok", rss_peak_of(call, warmup))
            except BaseException as exc:  # noqa: BLE001 - reported, not raised
                payload = ("error", describe_error(exc))
            data = pickle.dumps(payload)
            while data:
                data = data[os.write(write_fd, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks, deadline, timed_out = [], time.monotonic() + timeout_s, False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                os.kill(pid, 9)
                break
            if select.select([read_fd], [], [], remaining)[0]:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return "error", f"timed out after {timeout_s:.0f} s"
    if chunks:
        status, payload = pickle.loads(b"".join(chunks))
        if status == "ok":
            payload["seconds"] = time.perf_counter() - started  # the fork's whole life: warm-up, call, exit
        return status, payload
    if os.WIFSIGNALED(status):
        signal_number = os.WTERMSIG(status)
        return "error", "killed (out of memory?)" if signal_number == 9 else f"killed by signal {signal_number}"
    return "error", f"child exited with code {os.WEXITSTATUS(status)}"


def _children_main(conn, job: dict) -> None:
    """The cell child: build the inputs once and send ("ready",), then for each of ``job["runs"]`` fork a fresh
    process that measures that run alone (``_measure_in_fork``), sending ("ok", index, result) or ("error",
    index, message) after each, and ("done",) at the end.

    The inputs are built on one thread, so that this process never starts an OpenMP thread pool: a fork of a
    process whose pool has run hangs on its first parallel region (GNU libgomp). Each fork then starts its own
    pool with the parent's thread count. Every fork starts from the same state, that of a fresh process that has
    just built its inputs, whatever ran before it."""
    try:
        import importlib
        module_name, function = job.get("builder", "benchmarks.ops:build_memory_runs").split(":")
        torch.set_num_threads(1)
        runs = getattr(importlib.import_module(module_name), function)(job)  # builds the inputs
        conn.send(("ready",))
        timeouts = job.get("timeouts") or [600.0] * len(runs)
        for (index, build), timeout_s in zip(runs, timeouts):
            status, payload = _measure_in_fork(build, job.get("threads"), timeout_s)
            conn.send((status, index, payload))
        conn.send(("done",))
    except BaseException as exc:  # noqa: BLE001 - report anything, even SystemExit, to the parent
        try:
            conn.send(("fatal", describe_error(exc)))
        except OSError:  # the parent has gone (or given up on us): nothing to report to
            pass
    finally:
        conn.close()


def cpu_peaks_in_children(job: dict, timeouts_s: list[float], *, setup_timeout_s: float = 120.0,
                          on_result: Callable[[int, tuple], None] | None = None,
                          seconds: dict | None = None) -> list[tuple[int | None, str | None]]:
    """Peak RSS growth of each of ``job["runs"]`` (see ``benchmarks.ops.memory_cell_job``): one cell child
    builds the inputs once, and each run is measured in its own fresh fork of it (see ``_children_main``).
    ``job["builder"]`` ("module:function", default ``benchmarks.ops:build_memory_runs``) builds them: it takes
    the job and returns [(run index, build)], ``build()`` giving (call, warmup) for ``rss_peak_of``.
    Returns [(peak bytes, None) or (None, error)] in run order.

    ``timeouts_s[i]``: how long run i may take (its warm-up and measured call); building the inputs may take
    ``setup_timeout_s``. A run that hangs or is killed is reported as an error and the others go on (in a new
    cell child if the cell child itself died); if the inputs cannot be built, every run reports why.
    ``on_result(i, (peak, error))`` is called as each run's result arrives. ``seconds``, if given, gets where
    the time went: "inputs" (building them in the cell child) and "runs" (each fork's, None where it failed)."""
    runs = job["runs"]
    if seconds is not None:
        seconds.update(inputs=0.0, runs=[None] * len(runs))
    out: list[tuple[int | None, str | None]] = [(None, "not measured")] * len(runs)
    pending = list(range(len(runs)))
    ctx = _child_context()
    while pending:
        parent_end, child_end = ctx.Pipe(duplex=False)
        sub = dict(job, runs=[runs[i] for i in pending], indices=list(pending),
                   timeouts=[timeouts_s[i] for i in pending])
        proc = ctx.Process(target=_children_main, args=(child_end, sub), daemon=True)
        proc.start()
        child_end.close()
        failure, ready, child_started = None, False, time.perf_counter()
        try:
            while True:
                # (the cell child enforces each run's timeout itself; this is the backstop)
                wait = (timeouts_s[pending[0]] + 30.0 if pending else 30.0) if ready else setup_timeout_s
                if not parent_end.poll(wait):
                    failure = f"timed out after {wait:.0f} s" + ("" if ready else " building the inputs")
                    break  # (with nothing pending: a child slow to exit, killed below)
                message = parent_end.recv()
                if message[0] == "ready":
                    ready = True
                    if seconds is not None:
                        seconds["inputs"] += time.perf_counter() - child_started
                    continue
                if message[0] == "done":
                    break
                if message[0] == "fatal":
                    failure = message[1]
                    break
                status, index, payload = message
                out[index] = (payload["peak_bytes"], None) if status == "ok" else (None, payload)
                if seconds is not None and status == "ok":
                    seconds["runs"][index] = payload.get("seconds")
                pending.remove(index)
                if on_result:
                    on_result(index, out[index])
        except EOFError:
            failure = ""
        parent_end.close()
        proc.join(5 if failure is None else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if failure is not None and pending:  # the run in progress failed; the rest go on in a fresh child
            if failure == "":
                code = proc.exitcode
                failure = "killed (out of memory?)" if code == -9 else f"child exited with code {code}"
            # Before "ready" the inputs themselves failed (or the child could not start): all runs share that.
            for index in list(pending) if not ready else [pending[0]]:
                pending.remove(index)
                out[index] = (None, failure)
                if on_result:
                    on_result(index, out[index])
    return out


def cpu_peak_bytes_in_child(job: dict, timeout_s: float) -> tuple[int | None, str | None]:
    """Run one ``benchmarks.ops.memory_job(...)`` in a fresh child; (peak bytes, None) or (None, error)."""
    return cpu_peaks_in_children(job, [timeout_s])[0]


def human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def human_seconds(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms" if t * 1e3 < 100 else f"{t * 1e3:.0f} ms"
    return f"{t * 1e6:.3g} us"

"""Measuring: the device and its floors, wall-clock / do_bench timing, peak memory.

Nothing here knows about losses: callers hand in zero-argument callables (``call()`` runs the op once on the next
input set of a rotation) and get numbers back.

* **Floors are measured, not typed.** ``copy_bandwidth`` times a large ``dst.copy_(src)`` on the device (bytes
  moved = read + write); a memory-bound op's floor is its must-move bytes over that rate. ``matmul_rate`` times a
  large GEMM, for the FLOP floors of fused-linear ops.
* **Timing.** On a GPU, ``triton.testing.do_bench`` (median); on a CPU a wall clock (median) after a warm-up.
  Candidates of one measurement are interleaved (round-robin), so that a noisy neighbour slows all of them alike.
* **Memory.** On a GPU, ``torch.cuda.max_memory_allocated`` around one call, minus what was allocated before it
  (the inputs). On a CPU, a *child process* (forked from a lean fork server) builds its own inputs, runs the op once
  as warm-up, returns freed memory to the OS, resets its peak-RSS mark (``/proc/self/clear_refs``) and runs the op
  once more: peak = ``VmHWM`` after it minus ``VmRSS`` before it. ``ru_maxrss`` is not used: it would carry the
  parent's peak.
"""
from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing as mp
import os
import re
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
    """
    name: str
    call: Callable[[], object]
    warmup: Callable[[], object] | None = None
    repeats: int = 5


@dataclass
class Timing:
    median_s: float | None = None
    samples: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    error: str | None = None


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
                    rounds_gpu: int = 3, on_sample: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Time every candidate, interleaved. Returns name -> Timing (median over samples, or the error).

    CPU: each candidate warms up, then rounds of one timed call per candidate until it has ``repeats`` samples
    or has spent ``budget_s`` (at least one sample each). GPU: ``rounds_gpu`` rounds, each one
    ``do_bench`` (median) per candidate; the result is the median of the rounds.
    """
    results = {c.name: Timing() for c in candidates}
    live = []
    for c in candidates:  # warm-up (and the compile of a compiled candidate)
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
                results[c.name].samples.append(t)
                spent[c.name] += t
                if len(results[c.name].samples) >= c.repeats or spent[c.name] >= budget_s:
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


def _child_main(conn, job: dict) -> None:
    try:
        from benchmarks import ops
        call, warmup = ops.build_memory_job(job)
        conn.send(("ok", rss_peak_of(call, warmup)))
    except BaseException as exc:  # noqa: BLE001 - report anything, even SystemExit, to the parent
        conn.send(("error", describe_error(exc)))
    finally:
        conn.close()


def cpu_peak_bytes_in_child(job: dict, timeout_s: float) -> tuple[int | None, str | None]:
    """Run ``benchmarks.ops.build_memory_job(job)`` in a fresh child; (peak bytes, None) or (None, error)."""
    ctx = _child_context()
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child_end, job), daemon=True)
    proc.start()
    child_end.close()
    try:
        if parent_end.poll(timeout_s):
            status, payload = parent_end.recv()
        else:
            status, payload = "error", f"timed out after {timeout_s:.0f} s"
    except EOFError:
        status, payload = "error", None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if status == "ok":
        return payload["peak_bytes"], None
    if payload is None:
        code = proc.exitcode
        payload = "killed (out of memory?)" if code == -9 else f"child exited with code {code}"
    return None, payload


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

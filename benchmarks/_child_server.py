"""Imported once by the fork server that the CPU memory children are forked from (see harness.py).

Everything a child needs is imported here once; with MINILLM_BENCH_WARM_INDUCTOR=1 (torch.compile is measured)
Inductor's imports and its CPU-ISA probe (which compiles test programs: ~25 s cold) run here too, instead of in
every child. That starts no threads (the probe runs the compiler as a subprocess), so forking stays safe.
Finally ``gc.freeze()``: a child's garbage collections then skip these objects instead of touching, and so
copying, every page that holds them.
"""
import atexit
import gc
import os

import torch  # noqa: F401

import minillm_fast  # noqa: F401
from benchmarks import harness, ops  # noqa: F401

if os.environ.get("MINILLM_BENCH_WARM_INDUCTOR") == "1":
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.valid_vec_isa_list()

# tqdm (which Inductor uses while compiling) would otherwise create a multiprocessing semaphore in every child;
# the measuring forks exit with os._exit, which leaves them to the resource tracker ("leaked semaphore" warnings).
import threading  # noqa: E402

from tqdm import tqdm  # noqa: E402

tqdm.set_lock(threading.RLock())

gc.collect()
gc.freeze()
atexit.register(gc.unfreeze)  # let the server's own shutdown free them (else nanobind reports "leaks")

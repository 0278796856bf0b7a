"""pytest-benchmark micro-benchmarks: every op, pass and implementation at one moderate shape.

    pytest benchmarks/test_bench_ops.py                       # all of them (a few minutes on a CPU)
    pytest benchmarks/test_bench_ops.py -k "reverse_kl and fwd+bwd" --benchmark-group-by=group

Kept out of the default test run (``pytest`` collects ``tests/`` only). Shape: BENCH_SHAPE=TOKENSxVOCAB
(default 256x32000), dtype: BENCH_DTYPE (default float32 on CPU, bfloat16 on GPU). The one-command table with
floors, memory and errors is ``python -m benchmarks.run``.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, V = (int(x) for x in os.environ.get("BENCH_SHAPE", "256x32000").lower().split("x"))
DTYPE = ops.DTYPES[os.environ.get("BENCH_DTYPE", "bfloat16" if DEVICE.type == "cuda" else "float32")]
IMPLS = [ops.ImplSpec("ours", b) for b in ("cuda", "triton", "cpu", "torch")] + [ops.ImplSpec("eager"),
                                                                                 ops.ImplSpec("liger")]


@pytest.fixture(scope="module")
def input_sets():
    cache = {}

    def get(op):
        key = op.needs
        if key not in cache:
            cache[key] = [ops.make_inputs(op.needs, N, V, DTYPE, DEVICE, seed) for seed in range(2)]
        return cache[key]
    return get


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS, ids=lambda s: s.label)
@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("op_name", list(ops.OPS))
def test_bench(benchmark, input_sets, op_name, mode, impl):
    op = ops.OPS[op_name]
    if mode not in op.modes:
        pytest.skip(f"{op_name} has no backward")
    if impl.kind == "ours":
        why = ops.ours_unavailable(impl.backend, DEVICE)
    elif impl.kind == "liger" and op.liger is None:
        why = "no Liger equivalent"
    else:
        why = ops.alternative_unavailable(impl.kind, DEVICE)
    if why:
        pytest.skip(why)
    call = ops.make_call(op, ops.build_impl(op, impl), input_sets(op), mode)
    benchmark.group = f"{op_name} {mode} {N}x{V} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info["bytes"] = op.bytes_moved(N, V, torch.empty((), dtype=DTYPE).element_size(), mode)

    def timed():
        call()
        _sync()
    benchmark(timed)

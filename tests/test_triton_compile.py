"""Every Triton kernel compiles for the GPU (sm_80 and sm_90) with the launchers' real argument types, on a machine
without one (``kernels/compile_check.py``: Triton's compiler and bundled ptxas, nothing executes). The interpreter
that runs the kernels in CI accepts code the GPU compiler rejects; this is the check that it does not.

Runs in a subprocess: the compiler needs TRITON_INTERPRET unset, and conftest.py sets it for this process."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(code_or_args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One process per architecture, side by side (the compiles are single-threaded).
    procs = {arch: subprocess.Popen([sys.executable, str(ROOT / "kernels" / "compile_check.py"), "--arch", arch],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ("80", "90")}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch}:\n" + out[-3000:] + err[-3000:]
        for kernel in ("row_stats_kernel", "logits_grad_kernel", "jsd_rows_kernel", "jsd_grad_kernel",
                       "sample_rows_kernel", "fused_linear_stats_kernel", "fused_linear_merge_kernel",
                       "fused_linear_grad_kernel", "fused_linear_jsd_rows_kernel", "fused_linear_jsd_merge_kernel"):
            assert kernel in out, f"{kernel} was never launched by the check: {out[:500]}"
        assert f"sm_{arch}:" in out


BAD_KERNEL = '''
import sys, torch, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
import compile_check as cc

def twice(x):  # a plain Python helper: the interpreter runs it, the compiler cannot
    return x * 2


@triton.jit
def bad(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, twice(tl.load(x_ptr + offs)))


x = torch.zeros(64)
signature, constexprs, attrs, options = cc.launch_spec(bad, (x, x), {"BLOCK": 64, "num_warps": 4})
try:
    triton.compile(triton.compiler.ASTSource(fn=bad, signature=signature, constexprs=constexprs, attrs=attrs),
                   target=cc.GPUTarget("cuda", 90, 32), options=options)
except Exception as exc:
    print("rejected:", type(exc).__name__)
else:
    print("compiled")
'''


def test_the_check_can_fail(tmp_path):
    """A kernel the GPU compiler rejects (it calls a plain Python function, which the interpreter would simply
    run) is rejected through the same path."""
    script = tmp_path / "bad_kernel.py"  # Triton reads a kernel's source from its file
    script.write_text(BAD_KERNEL)
    result = _run([str(script), str(ROOT / "kernels")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rejected:" in result.stdout, result.stdout + result.stderr[-2000:]

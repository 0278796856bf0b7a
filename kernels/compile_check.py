"""Compile every Triton kernel for the GPU without a GPU: sm_80 and sm_90, through Triton's own compiler and its
bundled ptxas, with exactly the argument types and constexprs the launchers pass.

Triton's interpreter (how CI runs the kernels) executes the kernels as NumPy: it accepts code that the GPU compiler
rejects (and the reverse), so a kernel can pass every interpreted test and still fail to compile on the first GPU
machine. This check closes that gap the way ``csrc/cuda/compile_check.sh`` does for the CUDA sources: each launcher
of ``minillm_fast.backends.triton_backend`` and ``triton_fused_linear`` runs once on small CPU tensors with its
kernels replaced by recorders (nothing executes), and every distinct launch (kernel, argument types, constexprs,
num_warps, num_stages, enable_fp_fusion) is compiled to a cubin, whose shared memory must fit the GPU's; every
launch must pass ``LAUNCH_OPTIONS`` (no FMA contraction, as the interpreter computes). Pointers are declared
16-byte aligned (as PyTorch allocates them); integers are left unspecialised (odd sizes and strides). Must run
without ``TRITON_INTERPRET=1``.

    python kernels/compile_check.py [--arch 80,90]        # exit 1 on the first kernel that fails to compile
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from minillm_fast.backends import NUM_STATS, triton_backend, triton_fused_linear  # noqa: E402

# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB. A launch above it
# fails on the GPU with OutOfResources although it compiles.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.uint8: "*u8", torch.float64: "*fp64"}


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn: JITFunction, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _arg_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise TypeError(f"{name}: no Triton pointer type for {value.dtype}")
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{name}: cannot type a {type(value).__name__} argument")


def launch_spec(fn: JITFunction, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of one recorded launch, as triton.compile takes them."""
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3),
               "enable_fp_fusion": kwargs.pop("enable_fp_fusion", None)}
    values = dict(zip(fn.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        signature[param.name] = _arg_type(param.name, value)
        if isinstance(value, torch.Tensor):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _heads(dtype, *, options: bool):
    """A (student, teacher) pair of small lm_heads, with bias / scale / soft-cap on the student when ``options``."""
    from types import SimpleNamespace

    def head(h, v, **kw):
        return SimpleNamespace(hidden=torch.randn(9, h).to(dtype), weight=torch.randn(v, h).to(dtype),
                               bias=kw.get("bias"), logit_scale=kw.get("scale"), softcap=kw.get("softcap"))
    student = head(32, 70, **(dict(bias=torch.randn(70).to(dtype), scale=0.5, softcap=20.0) if options else {}))
    return student, head(48, 64)


def record_launches() -> list:
    """Run every launcher on small CPU tensors with the kernels replaced by recorders; the recorded launches."""
    launches = []
    modules = [triton_backend._k, triton_fused_linear._k]
    saved = {(m, name): getattr(m, name) for m in modules for name in dir(m)
             if isinstance(getattr(m, name), JITFunction)}
    for (module, name), fn in saved.items():
        setattr(module, name, Recorder(fn, launches))
    try:
        n, v = 9, 70
        tokens = torch.randint(0, 64, (n,))
        dtype_pairs = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32))
        for zd, ud in dtype_pairs:
            z, u = torch.randn(n, v).to(zd), torch.randn(n, v - 3).to(ud)
            stats, coef = torch.zeros(n, NUM_STATS), torch.ones(n, 4)
            for tok in (tokens, None):
                triton_backend.row_stats(z, u, tok, 0.5)
                triton_backend.logits_grad(z, u, tok, stats, coef, 0.5)
            jsd = torch.zeros(n, 2)
            triton_backend.jsd_rows(z, u, stats, 0.3, 0.5)
            triton_backend.jsd_grad(z, u, stats, jsd, torch.ones(n), 0.3, 0.5)
            triton_backend.sample_rows(z, u, torch.zeros(n, dtype=torch.bool), torch.rand(n, dtype=torch.float64),
                                       0.5)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for options in (True, False):
                student, teacher = _heads(dtype, options=options)
                stats, coef = torch.zeros(n, NUM_STATS), torch.ones(n, 4)
                for tok in (tokens, None):
                    triton_fused_linear.row_stats(student, teacher, tok, 0.5)
                    triton_fused_linear.logits_grad_pullback(student, teacher, tok, stats, coef, 0.5)
                triton_fused_linear.logits_grad_pullback(student, teacher, tokens, stats, coef, 0.5,
                                                         needs=(True, False, False))
                for extra in ("jsd_rows", "jsd_grad_pullback"):  # when the on-chip JSD launchers exist
                    if hasattr(triton_fused_linear, extra):
                        args = (stats, 0.3, 0.5) if extra == "jsd_rows" else (stats, torch.zeros(n, 2),
                                                                             torch.ones(n), 0.3, 0.5)
                        getattr(triton_fused_linear, extra)(student, teacher, *args)
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    args = parser.parse_args(argv)
    specs, seen = [], set()
    for fn, a, kw in record_launches():
        if kw.get("enable_fp_fusion") is not False:
            print(f"FAILED {fn.__name__}: launched without kernels.LAUNCH_OPTIONS (enable_fp_fusion=False); a "
                  "contracted fl(z - m_q) * inv_temp breaks the argmax anchor", file=sys.stderr)
            return 1
        signature, constexprs, attrs, options = launch_spec(fn, a, kw)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
               tuple(options.items()))
        if key not in seen:
            seen.add(key)
            specs.append((fn, signature, constexprs, attrs, options))
    kernels = sorted({fn.__name__ for fn, *_ in specs})
    print(f"{len(specs)} distinct launches of {len(kernels)} kernels: {', '.join(kernels)}", flush=True)
    start = time.perf_counter()
    for arch in (int(a) for a in args.arch.split(",")):
        target = GPUTarget("cuda", arch, 32)
        for fn, signature, constexprs, attrs, options in specs:
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            try:
                compiled = triton.compile(source, target=target, options=options)
            except Exception as exc:  # noqa: BLE001 - report which launch failed, then fail
                flags = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK")}
                print(f"FAILED sm_{arch} {fn.__name__} {flags} {options}:\n{exc}", file=sys.stderr)
                return 1
            if not compiled.asm.get("cubin"):
                print(f"FAILED sm_{arch} {fn.__name__}: no cubin", file=sys.stderr)
                return 1
            shared = compiled.metadata.shared
            if shared > SHARED_MEMORY_LIMIT.get(arch, shared):
                print(f"FAILED sm_{arch} {fn.__name__} {options}: needs {shared} bytes of shared memory, the GPU has "
                      f"{SHARED_MEMORY_LIMIT[arch]}", file=sys.stderr)
                return 1
        print(f"sm_{arch}: {len(specs)} launches compiled ({time.perf_counter() - start:.0f} s so far)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

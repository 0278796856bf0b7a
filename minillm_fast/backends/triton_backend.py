"""Triton backend: the five row primitives of ``minillm_fast.backends`` as Triton kernels (``kernels/``, installed as
``minillm_fast.kernels``), one program per row. This module only allocates outputs, picks block sizes and launches;
the math and its docstrings live with the kernels. Runs on CUDA tensors, or on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which is how CI tests it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import pathlib
import sys

import torch
import triton

from . import NUM_STATS

name = "triton"


def _load_kernels():
    """``minillm_fast.kernels``; in a source checkout (before setup.py maps ``kernels/`` into the package) the
    top-level ``kernels/`` folder is loaded by path under that same name."""
    try:
        return importlib.import_module("minillm_fast.kernels")
    except ImportError:
        pass
    folder = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location("minillm_fast.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"minillm_fast.kernels: not installed and no kernels/ folder at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


_k = _load_kernels()

# (largest block over the vocabulary, num_warps) per kernel, chosen for Hopper: blocks of 2k-4k float32 lanes keep
# 8-16 values per thread in flight with no register spills. Tests shrink the blocks to exercise multi-block rows.
CONFIG = {
    "row_stats": (1024, 4),
    "logits_grad": (2048, 8),
    "jsd_rows": (2048, 8),
    "jsd_grad": (2048, 8),
    "sample_rows": (4096, 8),
}
MIN_BLOCK = 16


def _launch_params(kernel: str, width: int):
    """(BLOCK, num_warps) for rows of ``width`` columns: the configured block, or less for short rows."""
    cap, warps = CONFIG[kernel]
    block = max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(width, 1))))
    return block, max(1, min(warps, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along the vocabulary (the contract; copies only if a caller breaks it)."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def row_stats(z, u, tokens, inv_temp):
    z, u = _rows(z), _rows(u)
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    out = torch.empty(n_rows, NUM_STATS, dtype=torch.float32, device=z.device)
    if n_rows == 0:
        return out
    has_tokens = tokens is not None
    tok = tokens if has_tokens else z
    block, warps = _launch_params("row_stats", vocab)
    with _device(z):
        _k.row_stats_kernel[(n_rows,)](
            z, u, tok, out, z.stride(0), u.stride(0), tok.stride(0) if has_tokens else 0, vocab, float(inv_temp),
            HAS_TOKENS=has_tokens, BLOCK=block, num_warps=warps, **_k.LAUNCH_OPTIONS)
    return out


def logits_grad(z, u, tokens, stats, coef, inv_temp):
    z, u = _rows(z), _rows(u)
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if n_rows == 0:
        return dz
    stats = _stats_rows(stats, n_rows)
    coef = coef.to(torch.float32).contiguous()
    has_tokens = tokens is not None
    tok = tokens if has_tokens else z
    block, warps = _launch_params("logits_grad", z.shape[1])
    with _device(z):
        _k.logits_grad_kernel[(n_rows,)](
            z, u, tok, stats, coef, dz, z.stride(0), u.stride(0), tok.stride(0) if has_tokens else 0, dz.stride(0),
            vocab, z.shape[1], float(inv_temp), HAS_TOKENS=has_tokens, BLOCK=block, num_warps=warps,
            **_k.LAUNCH_OPTIONS)
    return dz


def _stats_rows(stats, n_rows):
    """stats as the kernels read them (float32, contiguous [n_rows, NUM_STATS]); ValueError naming ``stats`` for any
    other shape (the kernels index rows by NUM_STATS)."""
    if tuple(stats.shape) != (n_rows, NUM_STATS):
        raise ValueError(f"stats: expected shape ({n_rows}, {NUM_STATS}), got {tuple(stats.shape)}")
    return stats.to(torch.float32).contiguous()


def _beta_args(beta: float):
    beta = float(beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta: expected 0 < beta < 1 for the mixture JSD kernels; got {beta}")
    return math.log(beta), math.log1p(-beta)


def jsd_rows(z, u, stats, beta, inv_temp):
    z, u = _rows(z), _rows(u)
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    out = torch.empty(n_rows, 2, dtype=torch.float32, device=z.device)
    if n_rows == 0:
        return out
    log_beta, log_1m_beta = _beta_args(beta)
    stats = _stats_rows(stats, n_rows)
    block, warps = _launch_params("jsd_rows", vocab)
    with _device(z):
        _k.jsd_rows_kernel[(n_rows,)](
            z, u, stats, out, z.stride(0), u.stride(0), vocab, float(inv_temp), float(beta), 1.0 - float(beta),
            log_beta, log_1m_beta, BLOCK=block, num_warps=warps, **_k.LAUNCH_OPTIONS)
    return out


def jsd_grad(z, u, stats, jsd, coef, beta, inv_temp):
    z, u = _rows(z), _rows(u)
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if n_rows == 0:
        return dz
    log_beta, log_1m_beta = _beta_args(beta)
    stats = _stats_rows(stats, n_rows)
    jsd = jsd.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    block, warps = _launch_params("jsd_grad", z.shape[1])
    with _device(z):
        _k.jsd_grad_kernel[(n_rows,)](
            z, u, stats, jsd, coef, dz, z.stride(0), u.stride(0), dz.stride(0), vocab, z.shape[1], float(inv_temp),
            log_beta, log_1m_beta, BLOCK=block, num_warps=warps, **_k.LAUNCH_OPTIONS)
    return dz


def sample_rows(z, u, use_teacher, uniform, inv_temp):
    z, u = _rows(z), _rows(u)
    n_rows, vocab = z.shape[0], min(z.shape[1], u.shape[1])
    out = torch.empty(n_rows, dtype=torch.int64, device=z.device)
    if n_rows == 0:
        return out
    use_teacher = use_teacher.contiguous()
    use_teacher = use_teacher.view(torch.uint8) if use_teacher.dtype == torch.bool else (use_teacher != 0).to(
        torch.uint8)
    uniform = uniform.to(torch.float64).contiguous()
    block, warps = _launch_params("sample_rows", vocab)
    with _device(z):
        _k.sample_rows_kernel[(n_rows,)](
            z, u, use_teacher, uniform, out, z.stride(0), u.stride(0), vocab, float(inv_temp),
            BLOCK=block, num_warps=warps, **_k.LAUNCH_OPTIONS)
    return out

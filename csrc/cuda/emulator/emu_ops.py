"""``torch.ops.minillm_fast.*`` look-alike that runs the CUDA kernels under the CPU emulator, on CPU tensors.

The library is built by ``csrc/cuda/emulator/build.sh`` and named by ``MINILLM_FAST_CUDA_EMULATOR``; the argument
handling mirrors ``csrc/cuda/binding.cpp`` (the launch plans themselves are chosen in C++, by the same code).
``NUM_SMS`` (default 132, an H100) steers the split-row decisions as on that GPU.
"""
import ctypes
import math
import os

import torch

from minillm_fast.backends import NUM_STATS

_lib = ctypes.CDLL(os.environ["MINILLM_FAST_CUDA_EMULATOR"])
NUM_SMS = int(os.environ.get("MINILLM_FAST_CUDA_EMULATOR_SMS", "132"))
L2_BYTES = 50 << 20  # an H100's L2 cache
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
P = ctypes.c_void_p
I64 = ctypes.c_int64
LAST_PLAN = {}

def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)

def _rows(x):
    assert x.dim() == 2
    if x.size(1) > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x

def _stride(x):
    return x.stride(0) if x.size(0) > 1 else 0

def _plan(entries=4):
    return (ctypes.c_int * entries)()

def row_stats(z, u, tokens, inv_temp):
    z, u = _rows(z), _rows(u)
    n, vocab = z.size(0), min(z.size(1), u.size(1))
    tok = tokens.to(torch.int64).contiguous() if tokens is not None else None
    out = torch.full((n, NUM_STATS), 777.0)
    pl = _plan()
    if n:
        r = _lib.emu_row_stats(CODE[z.dtype], CODE[u.dtype], _ptr(z), _ptr(u), _ptr(tok), _ptr(out), I64(n),
                               I64(_stride(z)), I64(_stride(u)), ctypes.c_int(vocab), ctypes.c_float(inv_temp),
                               ctypes.c_int(NUM_SMS), pl)
        assert r == 0
    LAST_PLAN["row_stats"] = list(pl)
    return out

def logits_grad(z, u, tokens, stats, coef, inv_temp):
    dz = torch.full(z.shape, 555.0).to(z.dtype)
    logits_grad_into(z, u, tokens, stats, coef, inv_temp, dz)
    return dz

def logits_grad_into(z, u, tokens, stats, coef, inv_temp, out):
    z, u = _rows(z), _rows(u)
    n, vocab = z.size(0), min(z.size(1), u.size(1))
    tok = tokens.to(torch.int64).contiguous() if tokens is not None else None
    stats, coef = stats.contiguous(), coef.contiguous()
    assert out.shape == z.shape and (out.size(1) <= 1 or out.stride(1) == 1)
    pl = _plan()
    if n and z.size(1):
        r = _lib.emu_logits_grad(CODE[z.dtype], CODE[u.dtype], CODE[out.dtype], _ptr(z), _ptr(u), _ptr(tok),
                                 _ptr(stats), _ptr(coef), _ptr(out), I64(_stride(out)), I64(n), I64(_stride(z)),
                                 I64(_stride(u)), ctypes.c_int(vocab), ctypes.c_int(z.size(1)),
                                 ctypes.c_float(inv_temp), ctypes.c_int(NUM_SMS), pl)
        assert r == 0
    LAST_PLAN["logits_grad"] = list(pl)

def _jsd(which, z, u, stats, jsd, coef, beta, inv_temp):
    z, u = _rows(z), _rows(u)
    n, vocab = z.size(0), min(z.size(1), u.size(1))
    stats = stats.contiguous()
    out = torch.full((n, 2), 777.0)
    dz = torch.full(z.shape, 555.0).to(z.dtype)
    jsd = jsd.contiguous() if jsd is not None else None
    coef = coef.contiguous() if coef is not None else None
    pl = _plan()
    if n:
        r = _lib.emu_jsd(ctypes.c_int(which), CODE[z.dtype], CODE[u.dtype], _ptr(z), _ptr(u), _ptr(stats), _ptr(jsd),
                         _ptr(coef), _ptr(out), _ptr(dz), I64(n), I64(_stride(z)), I64(_stride(u)),
                         ctypes.c_int(vocab), ctypes.c_int(z.size(1)), ctypes.c_float(inv_temp),
                         ctypes.c_float(beta), ctypes.c_float(1.0 - beta), ctypes.c_float(math.log(beta)),
                         ctypes.c_float(math.log1p(-beta)), ctypes.c_int(NUM_SMS), pl)
        assert r == 0
    LAST_PLAN["jsd"] = list(pl)
    return out if which == 0 else dz

def jsd_rows(z, u, stats, beta, inv_temp):
    return _jsd(0, z, u, stats, None, None, beta, inv_temp)

def jsd_grad(z, u, stats, jsd, coef, beta, inv_temp):
    return _jsd(1, z, u, stats, jsd, coef, beta, inv_temp)

def sample_rows(z, u, use_teacher, uniform, inv_temp):
    z, u = _rows(z), _rows(u)
    n, vocab = z.size(0), min(z.size(1), u.size(1))
    ut = use_teacher.to(torch.bool).contiguous()
    un = uniform.to(torch.float64).contiguous()
    out = torch.full((n,), 999, dtype=torch.int64)
    pl = _plan()
    if n:
        r = _lib.emu_sample_rows(CODE[z.dtype], CODE[u.dtype], _ptr(z), _ptr(u), _ptr(ut), _ptr(un), _ptr(out), I64(n),
                                 I64(_stride(z)), I64(_stride(u)), ctypes.c_int(vocab), ctypes.c_float(inv_temp), pl)
        assert r == 0
    LAST_PLAN["sample"] = list(pl)
    return out

def _row_stats_grad(into, z, u, tokens, coef, policy, clip_eps, inv_temp, dz, max_cluster, max_smem):
    z, u = _rows(z), _rows(u)
    n, vocab = z.size(0), min(z.size(1), u.size(1))
    tok = tokens.to(torch.int64).contiguous() if tokens is not None else None
    coef = coef.contiguous()
    policy = policy.contiguous() if policy is not None else None
    stats = torch.full((n, NUM_STATS), 777.0)
    pl = _plan(6)
    if n and z.size(1):
        r = _lib.emu_row_stats_grad(ctypes.c_int(into), CODE[z.dtype], CODE[u.dtype], CODE[dz.dtype], _ptr(z), _ptr(u),
                                    _ptr(tok), _ptr(coef), _ptr(policy), ctypes.c_float(1.0 - clip_eps),
                                    ctypes.c_float(1.0 + clip_eps), _ptr(stats), _ptr(dz), I64(_stride(dz)), I64(n),
                                    I64(_stride(z)), I64(_stride(u)), ctypes.c_int(vocab), ctypes.c_int(z.size(1)),
                                    ctypes.c_float(inv_temp), ctypes.c_int(max_cluster), ctypes.c_int(max_smem),
                                    ctypes.c_int(NUM_SMS), I64(L2_BYTES), pl)
        assert r == 0
    LAST_PLAN["row_stats_grad"] = list(pl)
    return stats, pl

def row_stats_grad(z, u, tokens, coef, policy, clip_eps, inv_temp, grad_dtype=None, max_cluster=8,
                   max_smem=232448):
    """(stats, dz) as the CUDA op (max_cluster, max_smem: an H100's limits by default); dz is empty when there is no
    fused plan (then stats come from row_stats). LAST_PLAN["row_stats_grad"] = (vec, cluster, slice, stages,
    chunk_rows, chained)."""
    out_dtype = grad_dtype or z.dtype
    dz = torch.full(z.shape, 555.0).to(out_dtype)
    stats, pl = _row_stats_grad(0, z, u, tokens, coef, policy, clip_eps, inv_temp, dz, max_cluster, max_smem)
    if not z.size(0) or not z.size(1) or (pl[1] == 0 and pl[4] == 0):
        return row_stats(z, u, tokens, inv_temp), torch.empty(0, dtype=out_dtype)
    return stats, dz

def row_stats_grad_into(z, u, tokens, coef, policy, clip_eps, inv_temp, out):
    """The CUDA op: stats returned, dz written into ``out`` (any row stride) by the two passes in L2."""
    assert out.shape == z.shape and (out.size(1) <= 1 or out.stride(1) == 1)
    return _row_stats_grad(1, z, u, tokens, coef, policy, clip_eps, inv_temp, out, 8, 232448)[0]

def scale_unless_one_(x, factor):
    assert x.is_contiguous()
    f = factor.to(torch.float32).reshape(1).contiguous()
    r = _lib.emu_scale_unless_one(CODE[x.dtype], _ptr(x), I64(x.numel()), _ptr(f))
    assert r == 0

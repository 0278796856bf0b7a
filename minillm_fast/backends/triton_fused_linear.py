"""Launchers of the fused-linear Triton kernels (``kernels/fused_linear.py``, installed as
``minillm_fast.kernels.fused_linear``): row statistics, the generalised JSD's rows and the pulled-back logit
gradients computed straight from hidden states and lm_head weights, the logits existing only as on-chip tiles.
The math and its docstrings live with the kernels; this module allocates outputs, picks tiles and grids and
launches. Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how CI tests it.

A *head* is any object with the attributes of ``minillm_fast.fused_linear._Head``: ``hidden`` [N, H] (2-D),
``weight`` [V, H] (same dtype as ``hidden``: float32, bfloat16 or float16), ``bias`` [V] or None, ``logit_scale``
and ``softcap`` (a float, or None for "not applied"). Its logits are
``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (the raw logits, whose maxima, ZY, UY and UA
the statistics hold); the primitives below then apply the temperature (``inv_temp`` = 1/tau) exactly as the row
primitives of ``minillm_fast.backends`` do, to the logits centred on their raw row maximum.

``row_stats(student, teacher, tokens, inv_temp) -> float32 [N, NUM_STATS]``
    ``backends.row_stats`` of the two heads' logits (same layout and semantics; ``tokens`` int [N] or None, ids
    outside [0, V) give ZY = UY = 0).
``logits_grad_pullback(student, teacher, tokens, stats, coef, inv_temp, needs=(True, True, True))``
    ``(d hidden float32 [N, H_s], d weight [V_s, H_s], d bias float32 [V_s])`` (each None where ``needs`` says so,
    the bias's also when the student has none; d weight in float32 for a float32 weight, else in the weight's
    dtype: float32 sums over vocabulary chunks of ``WEIGHT_GRAD_CHUNK_BYTES``, each rounded once): the gradients
    of sum(dz * logits_s) through the student head, where dz is ``backends.logits_grad(z, u, tokens, stats, coef,
    inv_temp)``. Columns >= V = min(V_s, V_t) of d weight and d bias are 0. Accumulated with float32 atomics: the
    last bits vary from run to run.
``jsd_rows(student, teacher, stats, beta, inv_temp) -> float32 [N, 2]``
    ``backends.jsd_rows`` of the two heads' logits (0 < beta < 1): (JSD_beta, E_q[g - g_a]) per row, from the final
    ``row_stats``; a second pass over the tiles, vocabulary-split like the statistics. Deterministic.
``jsd_grad_pullback(student, teacher, stats, jsd, coef, beta, inv_temp, needs=(True, True, True))``
    As ``logits_grad_pullback`` (same returns, chunks and atomics) for dz = ``backends.jsd_grad(z, u, stats, jsd,
    coef, beta, inv_temp)``: coef float32 [N] ((1 - beta) / tau folded in; rows with coef 0 get exactly 0 and their
    statistics and jsd rows are never used), jsd the ``jsd_rows`` output (its E_q[g - g_a] column).
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
import triton

from . import NUM_COEFS, NUM_STATS
from .triton_backend import _beta_args, _device, _load_kernels

# Loading registers minillm_fast.kernels (installed, or the source checkout's kernels/ folder).
_LAUNCH_OPTIONS = _load_kernels().LAUNCH_OPTIONS
_k = importlib.import_module("minillm_fast.kernels.fused_linear")


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tiles: rows x vocabulary columns per program, the hidden dimension's chunk, warps, stages."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


# Chosen for Hopper (H100: 228 KB shared memory, 64K registers per SM). 16-bit inputs (wgmma): 128 x 128 x 64 with
# 8 warps and 4 stages, the fastest of a sweep on an H100 (benchmarks/fused_linear_tiles.py, N=8192 H=4096 V=128256
# bf16, 2026-11-28: statistics 46 ms = 372 TFLOP/s, gradient 133 ms = 259 TFLOP/s, against 78 / 197 ms at
# 64 x 128 x 64 x 8 x 3; 128 x 256 and 64 x 256 exceed the shared memory; results in
# benchmarks/results/nvidia-h100-2026-11-28/onchip_tile_sweep.log). float32 inputs (IEEE dots run on the FMA units
# and hold their operands in registers): 64 x 64 x 32 with 8 warps, checked by compiling for sm_90a offline (180
# registers per thread for the statistics, 255 with 64 bytes of spills for the gradient; 64 x 128 spills hundreds
# of bytes), not tuned on a GPU. The float32 tiles apply when either head is float32. Tests shrink everything
# (tl.dot's minimum, 16, in the interpreter) to exercise many tiles, row blocks, chunks and splits.
CONFIG = {
    "stats_16bit": TileConfig(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=4),
    "stats_fp32": TileConfig(block_n=64, block_v=64, block_k=32, num_warps=8, num_stages=3),
    "grad_16bit": TileConfig(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=4),
    "grad_fp32": TileConfig(block_n=64, block_v=64, block_k=32, num_warps=8, num_stages=3),
    # The JSD rows pass holds the same two logit tiles as the statistics pass (its per-row state is 2 sums, not 10,
    # its element math a logaddexp more): the statistics' tiles. Seen on an H100 (Triton 3.6, H and strides
    # multiples of 16): 186 registers (16-bit) and 154 (float32), no spills; the gradient kernel's JSD mode 201 and
    # 190, no spills.
    "jsd_rows_16bit": TileConfig(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=4),
    "jsd_rows_fp32": TileConfig(block_n=64, block_v=64, block_k=32, num_warps=8, num_stages=3),
}
# Rows per program of the merge of the split statistics (13 floats per row and split: negligible work).
MERGE_BLOCK = 128
# Vocabulary splits of the statistics pass: None = enough programs for PROGRAMS_PER_SM per SM (at most one split
# per vocabulary tile); an int forces it (tests). The partial states cost 48 bytes per row and split.
SPLIT_V: int | None = None
PROGRAMS_PER_SM = 2
# 16-bit student weights: the gradient pass runs over the vocabulary in chunks whose float32 weight-gradient sums
# (scratch) stay within this many bytes, each rounded once into the weight's dtype.
WEIGHT_GRAD_CHUNK_BYTES = 256 << 20
# Row blocks that sweep the vocabulary together in the gradient pass (L2 reuse of weight tiles and hidden rows).
GROUP_N = 8


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x [R, C] with unit stride along C (any row stride); copies only if it has not."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


class _HeadArgs:
    """A head as the kernels take it: pointers, strides, scalars and constexpr flags."""

    def __init__(self, head):
        hidden, weight, bias = head.hidden, head.weight, head.bias
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"fused-linear head: expected hidden [N, H] and weight [V, H], got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        if hidden.dtype != weight.dtype:
            raise ValueError(f"fused-linear head: hidden is {hidden.dtype} but weight is {weight.dtype}")
        self.hidden = _unit_stride(hidden.detach())
        self.weight = _unit_stride(weight.detach())
        self.bias = None if bias is None else bias.detach().contiguous()
        self.scale = head.logit_scale
        self.softcap = head.softcap
        self.vocab, self.size = weight.shape

    def columns(self, c0: int, c1: int) -> "_HeadArgs":
        """This head restricted to vocabulary rows c0:c1 of its weight and bias (views)."""
        part = copy.copy(self)
        part.weight = self.weight[c0:c1]
        part.bias = None if self.bias is None else self.bias[c0:c1]
        part.vocab = c1 - c0
        return part

    def pointers(self):
        return self.hidden, self.weight, self.bias if self.bias is not None else self.weight

    def strides(self):
        return self.hidden.stride(0), self.weight.stride(0)

    def scalars(self):
        return (1.0 if self.scale is None else float(self.scale), 1.0 if self.softcap is None else float(self.softcap))

    def flags(self):
        # IEEE float32 dots (not TF32) for float32 inputs; bf16/fp16 operands go to the tensor cores as they are.
        precision = "ieee" if self.hidden.dtype == torch.float32 else None
        return self.bias is not None, self.scale is not None, self.softcap is not None, precision


def _tiles(kernel: str, s: "_HeadArgs", t: "_HeadArgs") -> TileConfig:
    fp32 = torch.float32 in (s.hidden.dtype, t.hidden.dtype)
    return CONFIG[f"{kernel}_{'fp32' if fp32 else '16bit'}"]


def _bf16_upcast(x: torch.Tensor) -> bool:
    """Under Triton's interpreter (CPU tensors) bf16 tiles are multiplied as float32: its tl.dot multiplies bf16's
    raw bits. Never on the GPU."""
    return not x.is_cuda


def _split_count(n_rows: int, num_tiles: int, device: torch.device, block_n: int) -> int:
    if SPLIT_V is not None:
        return max(1, min(int(SPLIT_V), num_tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n_rows, block_n)
    return max(1, min(num_tiles, triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks)))


def _splits(n_rows: int, vocab: int, device: torch.device, cfg: TileConfig):
    """(splits, tiles_per_split) of a vocabulary-split pass (statistics, JSD rows)."""
    num_tiles = triton.cdiv(vocab, cfg.block_v)
    splits = _split_count(n_rows, num_tiles, device, cfg.block_n)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split  # no split left without a tile


def _tokens(tokens, like: torch.Tensor):
    """(pointer, stride, HAS_TOKENS)."""
    if tokens is None:
        return like, 0, False
    if tokens.dim() != 1 or tokens.shape[0] != like.shape[0]:
        raise ValueError(f"tokens: expected shape ({like.shape[0]},), got {tuple(tokens.shape)}")
    return tokens, tokens.stride(0), True


def _head_pair(student, teacher) -> tuple:
    """(student, teacher) as the kernels take them, and their common number of rows."""
    s, t = _HeadArgs(student), _HeadArgs(teacher)
    n_rows = s.hidden.shape[0]
    if t.hidden.shape[0] != n_rows:
        raise ValueError(f"teacher hidden has {t.hidden.shape[0]} rows, student hidden {n_rows}")
    return s, t, n_rows


def row_stats(student, teacher, tokens, inv_temp) -> torch.Tensor:
    s, t, n_rows = _head_pair(student, teacher)
    device = s.hidden.device
    out = torch.empty(n_rows, NUM_STATS, dtype=torch.float32, device=device)
    if n_rows == 0:
        return out
    vocab = min(s.vocab, t.vocab)
    cfg = _tiles("stats", s, t)
    splits, tiles_per_split = _splits(n_rows, vocab, device, cfg)
    partial = torch.empty(n_rows, splits, _k.NUM_PARTIAL.value, dtype=torch.float32, device=device)
    tok, stride_tok, has_tokens = _tokens(tokens, s.hidden)
    with _device(s.hidden):
        _k.fused_linear_stats_kernel[(triton.cdiv(n_rows, cfg.block_n), splits)](
            *s.pointers(), *t.pointers(), tok, partial,
            n_rows, vocab, s.size, t.size, *s.strides(), *t.strides(), stride_tok,
            *s.scalars(), *t.scalars(), float(inv_temp), tiles_per_split,
            *s.flags(), *t.flags(), has_tokens, _bf16_upcast(s.hidden),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS)
        _k.fused_linear_merge_kernel[(triton.cdiv(n_rows, MERGE_BLOCK),)](
            partial, out, n_rows, splits, float(inv_temp), BLOCK_R=MERGE_BLOCK, num_warps=4, **_LAUNCH_OPTIONS)
    return out


def logits_grad_pullback(student, teacher, tokens, stats, coef, inv_temp, needs=(True, True, True)):
    return _pullback(student, teacher, tokens, stats, coef, None, inv_temp, needs)


def jsd_rows(student, teacher, stats, beta, inv_temp) -> torch.Tensor:
    log_beta, log_1m_beta = _beta_args(beta)
    s, t, n_rows = _head_pair(student, teacher)
    device = s.hidden.device
    out = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    if n_rows == 0:
        return out
    if tuple(stats.shape) != (n_rows, NUM_STATS):
        raise ValueError(f"stats: expected ({n_rows}, {NUM_STATS}), got {tuple(stats.shape)}")
    stats = stats.to(torch.float32).contiguous()
    vocab = min(s.vocab, t.vocab)
    cfg = _tiles("jsd_rows", s, t)
    splits, tiles_per_split = _splits(n_rows, vocab, device, cfg)
    partial = torch.empty(n_rows, splits, _k.NUM_JSD_PARTIAL.value, dtype=torch.float32, device=device)
    with _device(s.hidden):
        _k.fused_linear_jsd_rows_kernel[(triton.cdiv(n_rows, cfg.block_n), splits)](
            *s.pointers(), *t.pointers(), stats, partial,
            n_rows, vocab, s.size, t.size, *s.strides(), *t.strides(),
            *s.scalars(), *t.scalars(), float(inv_temp), log_beta, log_1m_beta, float(beta), 1.0 - float(beta),
            tiles_per_split,
            *s.flags(), *t.flags(), _bf16_upcast(s.hidden),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS)
        _k.fused_linear_jsd_merge_kernel[(triton.cdiv(n_rows, MERGE_BLOCK),)](
            partial, out, n_rows, splits, float(beta), 1.0 - float(beta), BLOCK_R=MERGE_BLOCK, num_warps=4,
            **_LAUNCH_OPTIONS)
    return out


def jsd_grad_pullback(student, teacher, stats, jsd, coef, beta, inv_temp, needs=(True, True, True)):
    log_beta, log_1m_beta = _beta_args(beta)
    return _pullback(student, teacher, None, stats, coef, (jsd, log_beta, log_1m_beta), inv_temp, needs)


def _pullback(student, teacher, tokens, stats, coef, jsd, inv_temp, needs):
    """``logits_grad_pullback`` (jsd None; coef [N, 4]) or ``jsd_grad_pullback`` (jsd = (jsd rows [N, 2],
    log beta, log(1 - beta)); coef [N]): the gradient buffers, then one gradient launch per vocabulary chunk."""
    s, t, n_rows = _head_pair(student, teacher)
    device = s.hidden.device
    need_dh, need_dw, need_db = (bool(x) for x in needs)
    need_db = need_db and s.bias is not None
    # d weight comes back in float32 for float32 weights, else in the weight's dtype (see WEIGHT_GRAD_CHUNK_BYTES).
    dw_dtype = torch.float32 if s.weight.dtype == torch.float32 else s.weight.dtype
    d_hidden = torch.zeros(n_rows, s.size, dtype=torch.float32, device=device) if need_dh else None
    d_weight = torch.zeros(s.vocab, s.size, dtype=dw_dtype, device=device) if need_dw else None
    d_bias = torch.zeros(s.vocab, dtype=torch.float32, device=device) if need_db else None
    if n_rows == 0 or not (need_dh or need_dw or need_db):
        return d_hidden, d_weight, d_bias
    coef_shape = (n_rows, NUM_COEFS) if jsd is None else (n_rows,)
    if tuple(stats.shape) != (n_rows, NUM_STATS) or tuple(coef.shape) != coef_shape:
        raise ValueError(f"stats / coef: expected ({n_rows}, {NUM_STATS}) and {coef_shape}, got "
                         f"{tuple(stats.shape)} and {tuple(coef.shape)}")
    if jsd is not None:
        if tuple(jsd[0].shape) != (n_rows, 2):
            raise ValueError(f"jsd rows: expected ({n_rows}, 2), got {tuple(jsd[0].shape)}")
        jsd = (jsd[0].to(torch.float32).contiguous(), *jsd[1:])
    stats = stats.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    vocab = min(s.vocab, t.vocab)
    # Columns in chunks when d weight is 16-bit: each chunk's float32 sums in a scratch buffer of at most
    # WEIGHT_GRAD_CHUNK_BYTES, rounded once into d weight (a float32 [V, H] buffer beside a 16-bit gradient would
    # cost twice the gradient's memory: 2 GB at V = 128256, H = 4096).
    chunk = vocab if dw_dtype == torch.float32 or not need_dw else max(1, WEIGHT_GRAD_CHUNK_BYTES // (4 * s.size))
    for c0 in range(0, vocab, chunk):
        c1 = min(vocab, c0 + chunk)
        scratch = None
        if need_dw:
            scratch = d_weight[c0:c1] if dw_dtype == torch.float32 else torch.zeros(
                c1 - c0, s.size, dtype=torch.float32, device=device)
        _launch_grad(s.columns(c0, c1), t.columns(c0, c1), None if tokens is None else tokens - c0, stats, coef,
                     jsd, inv_temp, d_hidden, scratch, None if d_bias is None else d_bias[c0:c1])
        if scratch is not None and scratch.dtype != dw_dtype:
            d_weight[c0:c1].copy_(scratch)
    return d_hidden, d_weight, d_bias


def _launch_grad(s: "_HeadArgs", t: "_HeadArgs", tokens, stats, coef, jsd, inv_temp, d_hidden, d_weight, d_bias):
    """One gradient-kernel launch over all rows and the heads' (common) columns, adding into the float32 buffers
    (None: not needed; d_weight / d_bias cover exactly those columns, with unit column stride). ``jsd`` None: the
    ``logits_grad`` combination (coef [N, 4]); else (jsd rows, log beta, log(1 - beta)): ``jsd_grad``'s (coef [N])."""
    n_rows = s.hidden.shape[0]
    vocab = min(s.vocab, t.vocab)
    cfg = _tiles("grad", s, t)
    tok, stride_tok, has_tokens = _tokens(tokens, s.hidden)
    dummy = stats  # never dereferenced where a gradient is not needed
    jsd_rows_, log_beta, log_1m_beta = (dummy, 0.0, 0.0) if jsd is None else jsd
    need_dh, need_dw, need_db = d_hidden is not None, d_weight is not None, d_bias is not None
    grid = (triton.cdiv(n_rows, cfg.block_n) * triton.cdiv(vocab, cfg.block_v),)
    with _device(s.hidden):
        _k.fused_linear_grad_kernel[grid](
            *s.pointers(), *t.pointers(), tok, stats, coef, jsd_rows_,
            d_hidden if need_dh else dummy, d_weight if need_dw else dummy, d_bias if need_db else dummy,
            n_rows, vocab, s.size, t.size, *s.strides(), *t.strides(), stride_tok,
            d_hidden.stride(0) if need_dh else 0, d_weight.stride(0) if need_dw else 0,
            *s.scalars(), *t.scalars(), float(inv_temp), log_beta, log_1m_beta,
            *s.flags(), *t.flags(), has_tokens, jsd is not None, need_dh, need_dw, need_db, _bf16_upcast(s.hidden),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=GROUP_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS)

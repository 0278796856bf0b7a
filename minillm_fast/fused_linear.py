"""Fused-linear twins of the losses: from hidden states and lm_head weights, never materialising [N, V] logits.

Each model's logits are what its lm_head would produce (every step optional, in this order, as models apply them)::

    logits = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)

and each ``fused_linear_<op>`` returns exactly ``loss.<op>`` of those logits: same semantics (masks, reductions,
temperature, padded vocabularies, -inf), same row kernels, same backends. Hidden states are ``[..., H_s]`` and
``[..., H_t]`` (H_s != H_t is fine), weights ``[V_s, H_s]`` and ``[V_t, H_t]``, biases ``[V_s]`` / ``[V_t]``.
``softcap`` and ``logit_scale`` are a number (both models) or a ``(student, teacher)`` pair, None meaning "not
applied" (e.g. Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's 1/``logits_scaling``).
Gradients reach the student's hidden states, weight and bias; every teacher tensor must not require grad (compute
the teacher under ``torch.no_grad()`` and pass ``lm_head.weight.detach()``).

How (the blocked path): rows are processed in blocks of n tokens. For a block, the two models' logits exist only
as float32 [n, V] (computed from the inputs' dtype with float32 accumulation and output), with n chosen so that a
block's temporaries stay below 1/BLOCK_SHARE (1/5) of one [N, V] float32 buffer and below ``MAX_BLOCK_BYTES``. The
backend's one-pass row kernel gives the block's row statistics and, when a student input requires grad, the
block's logit gradient dz is formed at once and pulled back through the lm_head::

    d hidden[rows] = dz @ W        d W += dz^T @ hidden[rows]        d b += sum_rows dz

(dz first through the soft-cap and scale: d logits / d x = logit_scale * (1 - (logits / softcap)^2)). Where the
matmuls run in float32 (CPU, float32 weights), dz replaces the block's student logits and is pulled back block by
block. With the CPU extension's kernels the block is vocabulary-major (``vocab_major_blocks``): formed as (W h^T)^T
in a [V, n] buffer, which MKL computes ~1.5x faster than h W^T for the ~100-row blocks the budget allows and the
kernels read in place; such a block takes VOCAB_MAJOR_BYTES_PER_LOGIT (8) bytes per logit and a multiple of 16 rows
(N = 1024, V = 128256: 96 rows). Where the matmuls run in bf16/fp16 (CUDA), each pull-back reads and writes the
whole 16-bit [V, H] weight gradient, so dz is gathered, in 16 bits, over GROUP_BLOCKS consecutive blocks into one
buffer of G = GROUP_BLOCKS n rows (a group) and pulled back once per group; a block's temporaries and the group's
buffer together stay below the same share and ``MAX_GROUPED_BYTES`` (``rows_per_block_and_group``; N = 8192, V =
128256: blocks of 256 rows, groups of 2048, 4 weight-gradient matmuls). The CUDA backend writes a block's dz
straight into its 16-bit rows of that buffer (``logits_grad_into``; not with a soft-cap, whose derivative needs the
logits). Each logit is computed once: 4 matmuls in all (8 N V H FLOPs with the teacher's). A scalar loss's gradient
is linear in the upstream gradient g, so backward only multiplies the saved gradients by g / (number of valid
tokens). Computing them in the forward pass costs the two backward matmuls even if backward never runs; under
``torch.no_grad()`` or with no student tensor requiring grad they are skipped. ``reduction="none"`` (an upstream
gradient per row) cannot be applied to a weight gradient after the fact: it recomputes the logits block by block in
backward instead (6 matmuls in all).

Opt-in (``MINILLM_FAST_GRAD_IN_PASS=1``, as for the logits ops; CUDA backend, 16-bit matmuls, no student soft-cap,
no process group): the statistics' pass of a block also writes its dz into the group buffer (``row_stats_grad_into``:
the two passes chunk by chunk of rows held in L2), with coefficients planned from the mask (the kernel drops rows
found empty, as ``valid`` does, and forms MiniLLM's policy factor), so that the block's float32 logits are read once
from memory instead of twice (``_Problem.block``). Not yet measured on a GPU.

Tuning knob (read on each call): ``MINILLM_FAST_FUSED_LINEAR_BLOCKS="n,G"`` sets the tokens per block n and per
group G (a multiple of n) in place of what ``rows_per_block`` / ``rows_per_block_and_group`` choose, both clamped to
N rows; "n" alone sets the block size (where 16-bit matmuls form a gradient, with groups of GROUP_BLOCKS blocks).
The budgets above then no longer apply: a block takes BYTES_PER_LOGIT n V bytes (8 n V where the backend writes dz
into the group's buffer) and the group's 16-bit buffer 2 G V; each block's forward matmuls read both [V, H] weights
once, and each group's pull-back reads and writes the whole [V, H] weight gradient once. Unset or empty: the
defaults. A malformed value raises ``ValueError`` naming the variable. With ``process_group`` every rank must set the
same value (the ranks' blocks run the same collectives). The on-chip path (``backend="triton"``) has no blocks and
ignores it (``benchmarks/fused_linear_ops.py --blocks`` measures candidates).

``backend="triton"``: the on-chip path (``backends/triton_fused_linear.py``, kernels in ``kernels/fused_linear.py``).
No block of logits exists in any memory: a statistics kernel forms logit tiles in registers (one tile matmul per
model) and folds them into the per-row online-softmax state; a gradient kernel recomputes the tiles from those
statistics, forms dz in registers and pulls it back into float32 gradient buffers (d hidden, d W, d b). Extra memory
is those buffers and [N, 13] statistics; the price is recomputing both models' logits (6 matmuls in all, also for
``reduction="none"``, whose backward runs the gradient kernel with the saved statistics; JSD with 0 < beta < 1
adds a second statistics pass: 8). Other backends ("cuda", "cpu", "torch"; "auto") take the blocked path.

``process_group`` (every op): vocabulary-parallel lm_heads, as tensor parallelism shards them. Each rank passes all
hidden states and its rows ``[V_local, H]`` of both weights (and biases), covering the same global columns; the
block's row statistics are merged across ranks exactly as the logits ops merge theirs (``minillm_fast.distributed``:
two all-reduces of a few floats per token per block, never logits). Results are identical on every rank; the weight
and bias gradients are the local rows'; the hidden states' gradient is summed over ranks (one all-reduce of
[N, H_s]) because the loss reads them through every shard.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _dispatch, _validate, distributed
from .loss import (FORWARD_KL_GRAD, GRAD_IN_PASS_ENV, REVERSE_KL_GRAD, MiniLLMLoss, PTLoss, TokenStats, _attach_grad,
                   _coefs,
                   _denominator, _forward_kl_rows, _minillm_grad_columns, _own_token_terms, _policy_gradient_rows,
                   _pt_grad_columns, _pt_rows, _reduce, _reverse_kl_rows, _token_stats_from_rows, _valid_rows)

__all__ = ["fused_linear_reverse_kl", "fused_linear_forward_kl", "fused_linear_jsd", "fused_linear_token_stats",
           "fused_linear_minillm_loss", "fused_linear_pt_loss"]

# A block's temporaries per logit: the student's and teacher's float32 logits (the student's buffer then receives
# the logit gradient, formed a quarter of the block at a time: 1 more byte per logit).
BYTES_PER_LOGIT = 9
# Vocabulary-major blocks (``vocab_major_blocks``) without a student soft-cap: the two float32 logits only (dz is
# formed over the student's in place), in blocks of a multiple of 16 rows (the CPU kernels' tiles; MKL's GEMMs
# also run faster there: in one profile at N = 1024, H = 256, V = 128256, 96-row blocks took 3.7 s, 88-row ones 4.2 s).
VOCAB_MAJOR_BYTES_PER_LOGIT = 8
VOCAB_MAJOR_ROWS_MULTIPLE = 16
# Where the matmuls run in bf16/fp16 (CUDA) and a gradient is formed, the pull-back matmuls read the logit gradient
# in 16 bits, gathered over GROUP_BLOCKS consecutive blocks (a group: 2 bytes per logit of its rows), so that the
# weight gradient, read and written whole by each pull-back, is accumulated once per group instead of once per block.
GROUP_BLOCKS = 8
# At most 1/BLOCK_SHARE of one [N, V] float32 logits buffer per block (16-bit matmuls forming a gradient: per block
# and its group's buffer), and at most MAX_BLOCK_BYTES (with the group's buffer: MAX_GROUPED_BYTES).
BLOCK_SHARE = 5
MAX_BLOCK_BYTES = 512 << 20
MAX_GROUPED_BYTES = 800 << 20  # N = 8192, V = 128256: blocks of 256 rows and groups of 2048 (4 of them)
# ... but at least this much (unless that is all N rows): tiny blocks cost more in per-call overhead than they save.
MIN_BLOCK_BYTES = 1 << 20
GRAD_SLICES = 4


def rows_per_block(n_rows: int, vocab: int, bytes_per_logit: int = BYTES_PER_LOGIT,
                   max_bytes: int | None = None, multiple: int = 8) -> int:
    """Tokens per block: the temporaries (``bytes_per_logit`` per logit of the block) within max(N V 4 / BLOCK_SHARE,
    MIN_BLOCK_BYTES), capped at ``max_bytes`` (default MAX_BLOCK_BYTES); a multiple of ``multiple`` when at least
    twice that, else of 8 when >= 16 (matmul-friendly); at least 1."""
    cap = MAX_BLOCK_BYTES if max_bytes is None else max_bytes
    budget = min(cap, max(MIN_BLOCK_BYTES, int(n_rows * vocab * 4 / BLOCK_SHARE)))
    rows = int(budget // (vocab * bytes_per_logit))
    if rows >= 2 * multiple:
        rows -= rows % multiple
    elif rows >= 16:
        rows -= rows % 8
    return max(1, min(n_rows, rows))


def rows_per_block_and_group(n_rows: int, vocab: int) -> tuple[int, int]:
    """16-bit matmuls forming a gradient: (n, G), tokens per block and per group, G = GROUP_BLOCKS n. A block's
    temporaries take BYTES_PER_LOGIT n V bytes and the group's 16-bit logit gradient 2 min(G, N) V bytes, together
    at most::

        (BYTES_PER_LOGIT + 2 GROUP_BLOCKS) n V = 25 n V  <=  min(MAX_GROUPED_BYTES, max(N V 4 / BLOCK_SHARE,
                                                                                    MIN_BLOCK_BYTES))

    (``rows_per_block`` with 25 bytes per logit of a block). N = 8192, V = 128256: n = 256 (float32 logits 2 x 125.2
    MiB, gradient slices 31.3 MiB), G = 2048 (a 501.0 MiB buffer): 782.8 MiB in all, and 4 weight-gradient matmuls.
    Soft-capping's second gradient slice, or the transient 16-bit product where torch lacks ``mm(out_dtype=)``,
    adds 1 byte per logit of a block (31.3 MiB)."""
    rows = rows_per_block(n_rows, vocab, BYTES_PER_LOGIT + 2 * GROUP_BLOCKS, MAX_GROUPED_BYTES)
    return rows, GROUP_BLOCKS * rows


BLOCKS_ENV = "MINILLM_FAST_FUSED_LINEAR_BLOCKS"


def blocks_override() -> tuple[int, int | None] | None:
    """``MINILLM_FAST_FUSED_LINEAR_BLOCKS`` as (n, G), G None where only "n" is given; None where unset or empty.
    Raises ``ValueError`` naming the variable unless it is "n" or "n,G" with integers n >= 1 and G a positive
    multiple of n."""
    text = os.environ.get(BLOCKS_ENV, "").strip()
    if not text:
        return None
    expected = 'expected "n,G" (tokens per block, tokens per group: integers, n >= 1, G a multiple of n) or "n"'
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{BLOCKS_ENV}={text!r}: not integers; {expected}") from None
    if len(values) > 2:
        raise ValueError(f"{BLOCKS_ENV}={text!r}: {len(values)} numbers; {expected}")
    if values[0] < 1:
        raise ValueError(f"{BLOCKS_ENV}={text!r}: n = {values[0]} < 1; {expected}")
    if len(values) == 1:
        return values[0], None
    if values[1] < 1 or values[1] % values[0]:
        raise ValueError(f"{BLOCKS_ENV}={text!r}: G = {values[1]} is not a positive multiple of n = {values[0]}; "
                         f"{expected}")
    return values[0], values[1]


def block_sizes(n_rows: int, vocab: int, grouped: bool, override: tuple[int, int | None] | None = None,
                in_place_vocab_major: bool = False) -> tuple[int, int | None]:
    """(n, G): tokens per block, and per group where 16-bit matmuls form a gradient (``grouped``; else G is None).
    Without ``override`` (``blocks_override()``: the tuning knob), ``rows_per_block_and_group`` or
    ``rows_per_block`` (``in_place_vocab_major``: vocabulary-major blocks with dz formed over the student's logits,
    VOCAB_MAJOR_BYTES_PER_LOGIT and VOCAB_MAJOR_ROWS_MULTIPLE); with it, its n and G (G = GROUP_BLOCKS n where it
    gives only n), each clamped to [1, N] (G = N is one group of all rows, whatever n)."""
    if override is None:
        if grouped:
            return rows_per_block_and_group(n_rows, vocab)
        if in_place_vocab_major:
            return rows_per_block(n_rows, vocab, VOCAB_MAJOR_BYTES_PER_LOGIT,
                                  multiple=VOCAB_MAJOR_ROWS_MULTIPLE), None
        return rows_per_block(n_rows, vocab), None
    n, group = override
    if not grouped:
        return max(1, min(n_rows, n)), None
    group = GROUP_BLOCKS * n if group is None else group
    return max(1, min(n_rows, n)), max(1, min(n_rows, group))


def vocab_major_blocks(backend, grouped: bool) -> bool:
    """Whether the blocks' float32 logits are formed vocabulary-major ((W h^T)^T, ``_Head.logit_buffer``): where
    the backend's kernels read them so in place (``reads_vocab_major``: the CPU extension) and the matmuls run in
    float32 (no 16-bit groups). On a CPU, W h^T runs ~1.5x faster than h W^T for ~100-row blocks."""
    return not grouped and getattr(backend, "reads_vocab_major", False)


# ----------------------------------------------------------------------------------------------------------
# One model's lm_head
# ----------------------------------------------------------------------------------------------------------

_MM_OUT_DTYPE_WORKS: dict = {}  # device type -> whether torch.mm(..., out_dtype=torch.float32) runs there (tried once)


def _mm_float32_out(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x @ w_t for bf16/fp16 CUDA tensors with float32 accumulation and float32 output (no rounding of the logits
    to 16 bits). Where this torch lacks ``mm(out_dtype=)``, the 16-bit product is upcast instead (rounded logits)."""
    works = _MM_OUT_DTYPE_WORKS.get(x.device.type)
    if works is not False:
        try:
            out = torch.mm(x, w_t, out_dtype=torch.float32)
            _MM_OUT_DTYPE_WORKS[x.device.type] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            if works:
                raise
            _MM_OUT_DTYPE_WORKS[x.device.type] = False
    return torch.mm(x, w_t).float()


def _fresh(shape, dtype, device, backend, zero: bool = False) -> torch.Tensor:
    """torch.empty (or zeros), with the backend's ``advise_huge_pages_`` hint given before the first touch where it
    has one (the CPU extension: a 4 KiB page fault on a VM costs more than the work on its floats)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise = getattr(backend, "advise_huge_pages_", None)
    if advise is not None:
        advise(out)
    return out.zero_() if zero else out


@dataclass
class _Head:
    """One model's last hidden states (as rows) and lm_head, with what it takes to form and pull back logits."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    logit_scale: float | None
    softcap: float | None

    def __post_init__(self):
        # bf16/fp16 matmuls with float32 output: cuBLAS does it in place; elsewhere the weight is upcast once.
        self._fp32_weight = None
        if self.weight.dtype != torch.float32 and not self.weight.is_cuda:
            self._fp32_weight = self.weight.detach().float()

    @property
    def matmul_dtype(self) -> torch.dtype:
        """float32, or (CUDA) the weight's bf16/fp16: the dtype the matmuls read."""
        return torch.float32 if self.weight.dtype == torch.float32 or self._fp32_weight is not None else \
            self.weight.dtype

    def logit_buffer(self, rows: int, vocab_major: bool, backend=None) -> torch.Tensor | None:
        """The float32 buffer every block's logits are formed in (fresh pages cost more than the matmul on a CPU):
        [rows, V], or [V, rows] for vocabulary-major logits; None where a 16-bit matmul makes its own."""
        if self.matmul_dtype != torch.float32:
            return None
        shape = (self.weight.shape[0], rows) if vocab_major else (rows, self.weight.shape[0])
        return _fresh(shape, torch.float32, self.weight.device, backend)

    def _matmul_weight_t(self, x: torch.Tensor, out: torch.Tensor | None, vocab_major: bool) -> torch.Tensor:
        """x @ W^T in float32, written into ``out`` (``logit_buffer``) where the matmul runs in float32; a new tensor
        from a 16-bit matmul. ``vocab_major``: computed as (W x^T)^T, into a contiguous [V, n] view of the buffer
        (MKL runs W x^T ~1.5x faster than x W^T for the ~100-row blocks of a CPU; the CPU kernels read the
        transposed result in place)."""
        if self.weight.dtype == torch.float32 or self._fp32_weight is not None:
            weight = self.weight.detach() if self._fp32_weight is None else self._fp32_weight
            x = x.float()
            if vocab_major:
                out_t = out.view(-1)[: weight.shape[0] * x.shape[0]].view(weight.shape[0], x.shape[0])
                return torch.mm(weight, x.t(), out=out_t).t()
            return torch.mm(x, weight.t(), out=None if out is None else out[: x.shape[0]])
        return _mm_float32_out(x, self.weight.detach().t())

    def logits(self, a: int, b: int, out: torch.Tensor | None, vocab_major: bool = False) -> torch.Tensor:
        """float32 [b - a, V]: the model's logits for rows a:b (in ``out``, a ``logit_buffer``, if given;
        vocabulary-major: a transposed view of its first (b - a) V entries)."""
        z = self._matmul_weight_t(self.hidden[a:b].detach(), out, vocab_major)
        if self.bias is not None:
            z += self.bias.detach().float()
        if self.logit_scale is not None:
            z *= self.logit_scale
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def chain(self, dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """d loss / d (h W^T + b) from dz = d loss / d logits (in place on dz): through the soft-cap
        (d/dx c tanh(x / c) = 1 - (logits / c)^2) and the scale."""
        if self.softcap is not None:
            dz.mul_(1.0 - (z / self.softcap).square_())
        if self.logit_scale is not None:
            dz.mul_(self.logit_scale)
        return dz

    def pull_back(self, dx: torch.Tensor, a: int, b: int, grads: "_Grads") -> None:
        """Accumulate into ``grads`` the gradients of sum(dx * (h W^T + b)[a:b]) (dx [b - a, V]: float32, or the
        16-bit matmul dtype; the bias gradient summed in float32)."""
        weight = self._fp32_weight if self._fp32_weight is not None else self.weight.detach()
        dx_mm = dx.to(weight.dtype)
        if grads.hidden is not None and dx_mm.dtype == torch.float32:
            torch.mm(dx_mm, weight, out=grads.hidden[a:b])
        elif grads.hidden is not None:
            grads.hidden[a:b] = dx_mm @ weight
        if grads.weight is not None:
            grads.weight.addmm_(dx_mm.t(), self.hidden[a:b].detach().to(weight.dtype))
        if grads.bias is not None:
            grads.bias += dx.sum(0, dtype=torch.float32)


@dataclass
class _Grads:
    """Gradient buffers of the student's hidden rows, weight and bias (None where not required)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros_for(cls, head: _Head, needs: tuple[bool, bool, bool], backend=None) -> "_Grads":
        # The weight gradient accumulates over blocks: in float32 where the matmuls run in float32, else (CUDA
        # bf16/fp16) in its own dtype, rounded once per group of blocks.
        acc = head.matmul_dtype
        return cls(
            hidden=torch.empty(head.hidden.shape, dtype=torch.float32, device=head.hidden.device) if needs[0] else None,
            weight=_fresh(head.weight.shape, acc, head.weight.device, backend, zero=True) if needs[1] else None,
            bias=torch.zeros(head.bias.shape[0], dtype=torch.float32, device=head.weight.device) if needs[2] else None,
        )

    def scaled(self, scale: torch.Tensor, head: _Head, hidden_shape) -> tuple:
        """(d hidden, d weight, d bias) times ``scale`` (a float32 scalar tensor), in the inputs' dtypes."""
        out = []
        for grad, like in ((self.hidden, head.hidden), (self.weight, head.weight), (self.bias, head.bias)):
            # An in-place multiply by a float32 scalar tensor computes in float32 and rounds once.
            out.append(None if grad is None else grad.mul_(scale).to(like.dtype))
        if out[0] is not None:
            out[0] = out[0].reshape(hidden_shape)
        return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# What each loss needs from a block of rows
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Block:
    """One block of rows a:b: both models' float32 logits, the tokens, row statistics and validity."""

    a: int
    b: int
    z: torch.Tensor
    u: torch.Tensor
    tokens: torch.Tensor | None
    stats: torch.Tensor
    valid: torch.Tensor
    backend: object
    inv_temp: float
    group: object = None  # vocabulary-parallel: the process group
    owned: torch.Tensor | None = None  # vocabulary-parallel: whether this rank's shard holds each row's token
    grad_written: bool = False  # the statistics' pass also wrote the block's dz into its group buffer rows

    def rows(self, i: int, j: int) -> "_Block":
        """Rows i:j of this block (views)."""
        return _Block(self.a + i, self.a + j, self.z[i:j], self.u[i:j],
                      None if self.tokens is None else self.tokens[i:j], self.stats[i:j], self.valid[i:j],
                      self.backend, self.inv_temp, self.group, None if self.owned is None else self.owned[i:j])

    def coefs(self, weight: torch.Tensor, columns: dict) -> torch.Tensor:
        """float32 [n, 4] logits_grad coefficients of sum_r weight_r (row value r) for these columns."""
        return _own_token_terms(_coefs(self.b - self.a, self.stats.device, weight * self.inv_temp, columns),
                                self.owned)

    def logits_grad(self, weight: torch.Tensor, columns: dict, out: torch.Tensor | None = None) -> torch.Tensor:
        """dz of sum_r weight_r (row value r) for a loss with these logits_grad columns. With ``out``, written there
        by the backend's optional primitives (callers check first): over the student logits themselves
        (``out is z``, ``has_in_place_grad``) or into rows of a 16-bit buffer (``writes_grad_into``)."""
        coef = self.coefs(weight, columns)
        if out is None:
            return self.backend.logits_grad(self.z, self.u, self.tokens, self.stats, coef, self.inv_temp)
        if out is self.z:
            self.backend.logits_grad_(self.z, self.u, self.tokens, self.stats, coef, self.inv_temp)
        else:
            self.backend.logits_grad_into(self.z, self.u, self.tokens, self.stats, coef, self.inv_temp, out)
        return out

    @property
    def has_in_place_grad(self) -> bool:
        return hasattr(self.backend, "logits_grad_") and self.z.dtype == torch.float32

    @property
    def writes_grad_into(self) -> bool:
        return hasattr(self.backend, "logits_grad_into")

    def jsd_rows(self, beta: float) -> torch.Tensor:
        """float32 [n, 2] (JSD_beta, E_q[g - g_a]) of the block's rows (the backend's second pass over the logits)."""
        return self.backend.jsd_rows(self.z, self.u, self.stats, beta, self.inv_temp)


@dataclass
class _OnChipBlock(_Block):
    """All rows, with no logits anywhere: the on-chip kernels (``backends/triton_fused_linear.py``) recompute logit
    tiles from the two heads for every pass, and pull gradients back through the student's head as they go."""

    student: _Head = None
    teacher: _Head = None

    def jsd_rows(self, beta):
        from .backends import triton_fused_linear
        return triton_fused_linear.jsd_rows(self.student, self.teacher, self.stats, beta, self.inv_temp)

    def pull_back(self, coef: torch.Tensor, needs: tuple) -> tuple:
        """(d hidden, d weight, d bias) of sum(dz * logits) with dz = logits_grad(..., coef)."""
        from .backends import triton_fused_linear
        return triton_fused_linear.logits_grad_pullback(self.student, self.teacher, self.tokens, self.stats, coef,
                                                        self.inv_temp, needs=needs)

    def pull_back_jsd(self, jsd: torch.Tensor, coef: torch.Tensor, beta: float, needs: tuple) -> tuple:
        """The same with dz = jsd_grad(..., jsd, coef)."""
        from .backends import triton_fused_linear
        return triton_fused_linear.jsd_grad_pullback(self.student, self.teacher, self.stats, jsd, coef, beta,
                                                     self.inv_temp, needs=needs)


class _Loss:
    """A loss as a sum over rows: ``rows`` gives a block's per-row values (a dict of float32 [n] tensors), and
    ``grad(block, values, weight, out)`` the logit gradient dz of sum_r weight_r * (the loss's row value r),
    written into ``out`` when given (the block's student logits, or rows of a 16-bit buffer: only asked of losses
    with ``in_place = True``, whose dz is a ``logits_grad`` combination).
    Most losses' dz is a ``logits_grad`` combination: ``grad_columns(values)`` names its columns, which is also
    what the on-chip kernels (they never hold dz) take; ``on_chip_grads`` pulls it back through those kernels."""

    in_place = True
    vocab_major = True  # its primitives (row_stats, logits_grad) read vocabulary-major blocks where the backend can

    def rows(self, block: _Block) -> dict:
        raise NotImplementedError

    def grad_columns(self, values: dict) -> dict:
        raise NotImplementedError

    def grad(self, block: _Block, values: dict, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return block.logits_grad(weight, self.grad_columns(values), out)

    def on_chip_grads(self, block: "_OnChipBlock", values: dict, weight: torch.Tensor, needs: tuple) -> tuple:
        """(d hidden, d weight, d bias) of sum_r weight_r (row value r), from the on-chip gradient kernel."""
        return block.pull_back(block.coefs(weight, self.grad_columns(values)), needs)

    def in_pass(self, a: int, b: int):
        """(logits_grad columns, policy [b - a, 3] or None, clip_eps) with which rows a:b's dz can be formed in
        their statistics' pass (``row_stats_grad_into``: coefficients known before the statistics, or such times
        MiniLLM's per-row policy factor, which the kernel forms); None where it cannot."""
        return None


class _Divergence(_Loss):
    def __init__(self, per_row_fn, columns):
        self.per_row_fn, self.columns = per_row_fn, columns

    def rows(self, block):
        return {"value": self.per_row_fn(block.stats)}

    def grad_columns(self, values):
        return self.columns

    def in_pass(self, a, b):
        return self.columns, None, 0.0


class _JSD(_Loss):
    """0 < beta < 1: a second pass over the logits (``jsd_rows``) and its own gradient primitive (``jsd_grad``,
    dz = coef q (g - E_q[g]) with coef = weight (1 - beta) / tau, E_q[g] taken relative to the anchor)."""

    in_place = False  # jsd_grad has no form that writes into a given buffer
    vocab_major = False  # jsd_rows / jsd_grad would copy vocabulary-major blocks

    def __init__(self, beta: float):
        self.beta = beta

    def rows(self, block):
        jsd = block.jsd_rows(self.beta)
        if block.group is not None:  # sums over columns: add the shards'
            jsd = distributed.all_reduce_sum(jsd, block.group)
        return {"value": jsd[:, 0], "jsd_rows": jsd}

    def _coef(self, block, weight):
        return (weight * ((1.0 - self.beta) * block.inv_temp)).contiguous()

    def grad(self, block, values, weight, out=None):
        return block.backend.jsd_grad(block.z, block.u, block.stats, values["jsd_rows"], self._coef(block, weight),
                                      self.beta, block.inv_temp)

    def on_chip_grads(self, block, values, weight, needs):
        return block.pull_back_jsd(values["jsd_rows"], self._coef(block, weight), self.beta, needs)


class _MiniLLM(_Loss):
    def __init__(self, adv, old, w, clip_eps, single_step):
        self.adv, self.old, self.w, self.clip_eps, self.single_step = adv, old, w, clip_eps, single_step

    def rows(self, block):
        sl = slice(block.a, block.b)
        pg, d_pg, rho = _policy_gradient_rows(block.stats, block.inv_temp, block.valid, self.adv[sl], self.old[sl],
                                              self.w[sl], self.clip_eps)
        return {"pg": pg, "d_pg": d_pg, "clipped": ((rho - 1).abs() > self.clip_eps).to(torch.float32),
                "kl": _reverse_kl_rows(block.stats)}

    def grad_columns(self, values):
        return _minillm_grad_columns(values["d_pg"], self.single_step)

    def in_pass(self, a, b):
        policy = torch.stack((self.adv[a:b], self.old[a:b], self.w[a:b]), 1).to(torch.float32)
        return _minillm_grad_columns(1.0, self.single_step), policy, self.clip_eps


class _PT(_Loss):
    def __init__(self, kd_ratio):
        self.kd_ratio = kd_ratio

    def rows(self, block):
        lm, kd = _pt_rows(block.stats, block.inv_temp)
        return {"lm": lm, "kd": kd}

    def grad_columns(self, values):
        return _pt_grad_columns(self.kd_ratio)

    def in_pass(self, a, b):
        return _pt_grad_columns(self.kd_ratio), None, 0.0


class _Stats(_Loss):
    def rows(self, block):
        return {"stats": block.stats}


# ----------------------------------------------------------------------------------------------------------
# The sweep over blocks, and the autograd glue
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Problem:
    """Validated inputs of one fused-linear call."""

    student: _Head
    teacher: _Head
    hidden_shape: torch.Size  # the student hidden states' shape
    lead_shape: torch.Size
    vocab: int  # min(V_s, V_t)
    inv_temp: float
    mask: torch.Tensor | None  # bool [N]
    backend: object
    student_inputs: tuple  # (hidden, weight, bias): the tensors a gradient may reach
    group: object = None  # vocabulary-parallel: the process group (weights are this rank's vocabulary shard)
    shard: distributed.VocabShard | None = None  # and this rank's columns of the global vocabulary
    owned: torch.Tensor | None = None  # set with the token ids: whether this rank's shard holds each row's token
    block_override: tuple | None = None  # BLOCKS_ENV as read when the call began (blocks_override())
    # While blocks() runs: the float32 logit buffers (per head, None where a 16-bit matmul makes its own) and, where
    # 16-bit matmuls form a gradient, the 16-bit logit gradient of a group of group_rows rows.
    _buffers = None
    grad_buffer = None
    group_rows = None
    vocab_major = False  # the blocks' float32 logits are vocabulary-major (``vocab_major_blocks``)

    @property
    def n_rows(self) -> int:
        return self.student.hidden.shape[0]

    def needs_grad(self) -> tuple[bool, bool, bool]:
        enabled = torch.is_grad_enabled()
        return tuple(enabled and x is not None and x.requires_grad for x in self.student_inputs)

    def blocks(self, with_grad: bool, loss: "_Loss"):
        """Row ranges (a, b), and the buffers every block reuses: sized by ``rows_per_block``, or where 16-bit
        matmuls form a gradient (``with_grad``) by ``rows_per_block_and_group``, with the group's buffer (either
        overridden by ``block_override``: ``block_sizes``); vocabulary-major where ``vocab_major_blocks`` says."""
        # Sharded: sized by the global vocabulary, so that every rank runs the same blocks (and collectives).
        vocab = self.shard.vocab if self.shard is not None else max(head.weight.shape[0]
                                                                    for head in (self.student, self.teacher))
        grouped = with_grad and self.student.matmul_dtype != torch.float32
        self.vocab_major = vocab_major_blocks(self.backend, grouped) and loss.vocab_major
        in_place = self.vocab_major and loss.in_place and self.student.softcap is None  # no dz slices
        step, self.group_rows = block_sizes(self.n_rows, vocab, grouped, self.block_override, in_place)
        rows = min(step, self.n_rows)
        self._buffers = [head.logit_buffer(rows, self.vocab_major, self.backend)
                         for head in (self.student, self.teacher)]
        self.grad_buffer = None
        if grouped:
            self.grad_buffer = torch.empty(min(self.group_rows, self.n_rows), self.student.weight.shape[0],
                                           dtype=self.student.matmul_dtype, device=self.student.weight.device)
        try:
            for a in range(0, max(self.n_rows, 1), step):  # N = 0: one empty block (0.0 with zero gradients)
                yield a, min(self.n_rows, a + step)
        finally:
            self._buffers = self.grad_buffer = self.group_rows = None

    def group_of(self, a: int) -> tuple[int, int]:
        """Rows (start, end) of the group holding the block that starts at row a: groups of ``group_rows`` rows (a
        multiple of the block's) from row 0, the last one partial."""
        start = a - a % self.group_rows
        return start, min(self.n_rows, start + self.group_rows)

    def grad_target(self, a: int, b: int) -> tuple:
        """Where the logit gradient of the block a:b goes: (start, end, gathered, target), ``gathered`` the dz of
        rows start:end that one pull-back takes (the group's rows of the 16-bit buffer) and ``target`` the block's
        rows of it. Without a group buffer (a, b, None, None): the block's own float32 student logits take dz."""
        if self.grad_buffer is None:
            return a, b, None, None
        start, end = self.group_of(a)
        gathered = self.grad_buffer[: end - start]
        return start, end, gathered, gathered[a - start: b - start]

    def grad_in_pass(self, loss: "_Loss", a: int, b: int):
        """``loss.in_pass(a, b)`` where the block's dz is to be written into its group buffer rows by its statistics'
        pass (``row_stats_grad_into``, the CUDA extension's; opt-in: ``MINILLM_FAST_GRAD_IN_PASS=1``, as for the
        logits ops), else None: needs 16-bit matmuls forming a gradient (a group buffer), no soft-cap on the
        student (its derivative needs the logits), no process group (the statistics are merged across ranks
        first), eager mode, and a loss whose coefficients are known before the statistics."""
        if (self.grad_buffer is None or self.student.softcap is not None or self.group is not None
                or not hasattr(self.backend, "row_stats_grad_into") or os.environ.get(GRAD_IN_PASS_ENV) != "1"
                or torch.compiler.is_compiling()):
            return None
        return loss.in_pass(a, b)

    def block(self, a, b, tokens, stats=None, grad_loss: "_Loss | None" = None) -> _Block:
        """The block of rows a:b: both models' logits, and their statistics (given, or computed; merged across
        ranks). With ``grad_loss`` (the forward's sweep forming a gradient), the statistics' pass also writes the
        loss's dz (per valid token, times the logit scale) into the block's group buffer rows where
        ``grad_in_pass`` allows: the rows are then read once from memory (the second pass finds them in L2).
        Its coefficients take the mask for the valid rows; the kernel zeroes rows found empty, as ``valid`` does."""
        z, u = (head.logits(a, b, buf, self.vocab_major)
                for head, buf in zip((self.student, self.teacher), self._buffers))
        tok = None if tokens is None else tokens[a:b]
        owned = None if self.owned is None else self.owned[a:b]
        in_pass = None if stats is not None or grad_loss is None else self.grad_in_pass(grad_loss, a, b)
        if in_pass is not None:
            columns, policy, clip_eps = in_pass
            planned = torch.ones(b - a, device=z.device) if self.mask is None else self.mask[a:b].to(torch.float32)
            scale = self.inv_temp * (1.0 if self.student.logit_scale is None else self.student.logit_scale)
            coef = _coefs(b - a, z.device, planned * scale, columns)
            stats = self.backend.row_stats_grad_into(z, u, tok, coef, policy, clip_eps, self.inv_temp,
                                                     self.grad_target(a, b)[3])
        elif stats is None:
            stats = self.backend.row_stats(z, u, tok, self.inv_temp)
            if self.group is not None:
                stats = distributed.all_reduce_row_stats(stats, self.group, inv_temp=self.inv_temp, owned=owned,
                                                          with_tokens=tok is not None)
        valid = _valid_rows(None if self.mask is None else self.mask[a:b], stats)
        return _Block(a, b, z, u, tok, stats, valid, self.backend, self.inv_temp, self.group, owned,
                      grad_written=in_pass is not None)

    def hidden_grad_over_ranks(self, grads: "_Grads") -> None:
        """Sharded: every rank holds all hidden states, and the loss depends on them through every shard, so
        their gradient is the sum of the ranks' parts (one all-reduce of [N, H_s])."""
        if self.group is not None and grads.hidden is not None:
            grads.hidden = distributed.all_reduce_sum(grads.hidden, self.group)


def _accumulate_grad(problem: _Problem, loss: _Loss, block: _Block, values: dict, weight: torch.Tensor,
                     grads: _Grads) -> None:
    """Add the gradient of sum_r weight_r * (row value r) over the block to ``grads``. The logit gradient replaces
    the block's student logits (by the backend's in-place primitive where it has one and the soft-cap's derivative
    does not need the logits; else formed a slice of rows at a time and copied) and feeds both matmuls whole. Where
    the matmuls are 16-bit it goes to the block's rows of the group's 16-bit buffer instead -- written there
    directly by the backend where it can (``logits_grad_into``, CUDA; without a soft-cap, whose derivative needs
    the logits, the logit scale folded into the weights) -- and the matmuls run once per group, with its last block
    (so the sweep's last block pulls back the last group). Where the statistics' pass already wrote it
    (``block.grad_written``), only the pull-back is left."""
    head, n = problem.student, block.b - block.a
    start, end, gathered, target = problem.grad_target(block.a, block.b)
    if gathered is None:
        gathered = target = block.z
    if block.grad_written:  # by the statistics' pass (_Problem.block)
        pass
    elif loss.in_place and problem.grad_buffer is not None and block.writes_grad_into and head.softcap is None:
        scale = 1.0 if head.logit_scale is None else head.logit_scale
        loss.grad(block, values, weight * scale, out=target)
    elif loss.in_place and block.has_in_place_grad and head.softcap is None:
        dz = head.chain(loss.grad(block, values, weight, out=block.z), block.z)
        if problem.grad_buffer is not None:
            target.copy_(dz)
    else:
        step = max(1, -(-n // GRAD_SLICES))
        for i in range(0, n, step):
            j = min(n, i + step)
            part = block.rows(i, j)
            dz = loss.grad(part, {key: v[i:j] for key, v in values.items()}, weight[i:j])
            target[i:j].copy_(head.chain(dz.float(), part.z))
    if block.b == end:
        head.pull_back(gathered, start, end, grads)


def _sweep(problem: _Problem, loss: _Loss, tokens, grads: _Grads | None):
    """One pass over the row blocks: (per-row values concatenated, row stats [N, NUM_STATS], validity [N]). With
    ``grads``, also accumulates the gradient of sum over valid rows of the loss's row value (the "sum" form)."""
    values, stats, valid = [], [], []
    for a, b in problem.blocks(grads is not None, loss):
        block = problem.block(a, b, tokens, grad_loss=None if grads is None else loss)
        row_values = loss.rows(block)
        if grads is not None:
            _accumulate_grad(problem, loss, block, row_values, block.valid.to(torch.float32), grads)
        values.append(row_values)
        stats.append(block.stats)
        valid.append(block.valid)
        del block  # before the next block's logits exist (16-bit matmuls allocate them anew)
    merged = {key: torch.cat([v[key] for v in values]) for key in values[0]} if values else {}
    return merged, torch.cat(stats) if stats else None, torch.cat(valid) if valid else None


# ----------------------------------------------------------------------------------------------------------
# On-chip (backend="triton"): logit tiles never leave the GPU's registers and shared memory
# ----------------------------------------------------------------------------------------------------------

def _on_chip(problem: _Problem) -> bool:
    """Whether the on-chip kernels (``backends/triton_fused_linear.py``) run this call: backend "triton" (N = 0
    takes the blocked path, which returns 0.0 with zero gradients)."""
    return getattr(problem.backend, "name", None) == "triton" and problem.n_rows > 0


def _on_chip_block(problem: _Problem, tokens, stats=None) -> _OnChipBlock:
    """All rows as one block without logits: the row statistics from the stats kernel (merged across ranks)."""
    from .backends import triton_fused_linear
    owned = problem.owned
    if stats is None:
        stats = triton_fused_linear.row_stats(problem.student, problem.teacher, tokens, problem.inv_temp)
        if problem.group is not None:
            stats = distributed.all_reduce_row_stats(stats, problem.group, inv_temp=problem.inv_temp, owned=owned,
                                                     with_tokens=tokens is not None)
    valid = _valid_rows(problem.mask, stats)
    return _OnChipBlock(0, problem.n_rows, None, None, tokens, stats, valid, problem.backend, problem.inv_temp,
                        problem.group, owned, student=problem.student, teacher=problem.teacher)


def _pull_back_on_chip(problem: _Problem, loss: _Loss, block: _OnChipBlock, values: dict, weight: torch.Tensor,
                       needs: tuple) -> _Grads:
    """The gradients of sum_r weight_r * (row value r), from the gradient kernel (it recomputes the logit tiles
    and pulls dz back through the lm_head as it goes), summed over ranks where the vocabulary is sharded."""
    grads = _Grads(*loss.on_chip_grads(block, values, weight, needs))
    problem.hidden_grad_over_ranks(grads)
    return grads


def _sweep_on_chip(problem: _Problem, loss: _Loss, tokens, needs):
    """``_sweep``'s results (values, stats, valid) and the gradients of the "sum" form (None without ``needs``)."""
    block = _on_chip_block(problem, tokens)
    values = loss.rows(block)
    grads = None
    if needs is not None:
        grads = _pull_back_on_chip(problem, loss, block, values, block.valid.to(torch.float32), needs)
    return values, block.stats, block.valid, grads


def _forward(problem: _Problem, loss: _Loss, tokens, needs, on_chip: bool):
    """(per-row values, row stats, validity, and with ``needs`` the gradients of the "sum" form): from the on-chip
    kernels (``on_chip``), else from the blocks."""
    if on_chip:
        return _sweep_on_chip(problem, loss, tokens, needs)
    grads = None if needs is None else _Grads.zeros_for(problem.student, needs, problem.backend)
    values, stats, valid = _sweep(problem, loss, tokens, grads)
    if grads is not None:
        problem.hidden_grad_over_ranks(grads)
    return values, stats, valid, grads


def _run(problem: _Problem, loss: _Loss, tokens, finish):
    """Sweep, reduce with ``finish(values, valid) -> (outputs, value, 1 / denominator)`` and attach the gradient:
    for a scalar loss (``finish.scalar``) the gradients formed in the forward pass, scaled in backward by
    upstream / denominator; for reduction="none" the blocks recomputed in backward with per-row upstream weights.
    With backend="triton" the on-chip kernels replace the blocks (one stats pass; one gradient pass)."""
    needs = problem.needs_grad()
    scalar_output = finish.scalar
    on_chip = _on_chip(problem)
    with torch.no_grad():
        values, stats, valid, grads = _forward(problem, loss, tokens, needs if any(needs) and scalar_output else None,
                                               on_chip)
        outputs, value, inv_denominator = finish(values, valid)
    if not any(needs):
        return outputs

    if scalar_output:
        def grad_fn(upstream):
            return grads.scaled(upstream.to(torch.float32) * inv_denominator, problem.student, problem.hidden_shape)
    else:
        def grad_fn(upstream):
            row_weight = valid.to(torch.float32) * upstream.to(torch.float32).reshape(-1)
            with torch.no_grad():
                if on_chip:  # the forward's statistics and rows: only the gradient pass runs
                    deferred = _pull_back_on_chip(problem, loss, _on_chip_block(problem, tokens, stats), values,
                                                  row_weight, needs)
                else:
                    deferred = _recompute_blocks(problem, loss, tokens, stats, row_weight, needs)
            return deferred.scaled(torch.ones((), device=valid.device), problem.student, problem.hidden_shape)

    return finish.attach(outputs, _attach_grad(value, grad_fn, *problem.student_inputs))


def _recompute_blocks(problem: _Problem, loss: _Loss, tokens, stats, row_weight, needs) -> _Grads:
    """reduction="none" on the blocked path: the gradients of sum_r row_weight_r * (row value r), each block's
    logits recomputed (with the forward's statistics)."""
    grads = _Grads.zeros_for(problem.student, needs, problem.backend)
    for a, b in problem.blocks(True, loss):
        block = problem.block(a, b, tokens, stats[a:b])
        _accumulate_grad(problem, loss, block, loss.rows(block), row_weight[a:b], grads)
        del block
    problem.hidden_grad_over_ranks(grads)
    return grads


class _Finish:
    """How a loss's per-row values become its outputs. ``__call__(values, valid) -> (outputs, value carrying the
    gradient, 1/denominator)``; ``attach(outputs, value_with_grad)`` puts the differentiable value in place."""

    scalar = True

    def __call__(self, values, valid):
        raise NotImplementedError

    def attach(self, outputs, loss):
        return loss


class _ReduceValue(_Finish):
    def __init__(self, reduction, lead_shape):
        self.reduction, self.lead_shape = reduction, lead_shape
        self.scalar = reduction != "none"

    def __call__(self, values, valid):
        value, _ = _reduce(values["value"], valid, self.reduction, self.lead_shape)
        return value, value, 1.0 / _denominator(valid, self.reduction)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------

def _pair(name: str, value) -> tuple:
    """A per-model option: one number for both models or a (student, teacher) pair; None = not applied."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name}: expected a number, None or a (student, teacher) pair, got {value!r}")
    return tuple(None if v is None else _validate.check_positive(name, v) for v in pair)


def _check_head(who: str, hidden, weight, bias) -> None:
    names = (f"{who}_hidden", f"{who}_weight", f"{who}_bias")
    for name, x in zip(names, (hidden, weight, bias)):
        if x is None and name.endswith("bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _validate.LOGIT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{names[0]}: expected shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{names[1]}: expected shape [V, H] with H = {hidden.shape[-1]} (the last dimension of "
                         f"{names[0]}) and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{names[1]}: dtype {weight.dtype} differs from {names[0]}'s {hidden.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{names[2]}: expected shape ({weight.shape[0]},) (one entry per vocabulary row of "
                         f"{names[1]}), got {tuple(bias.shape)}")
    for name, x in zip(names, (hidden, weight, bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name}: on {x.device}, but {names[0]} is on {hidden.device}")
    if who == "teacher":
        for name, x in zip(names, (hidden, weight, bias)):
            if x is not None and x.requires_grad:
                raise ValueError(f"{name}: requires grad, but the teacher never receives a gradient; compute the "
                                 f"teacher under torch.no_grad() and pass its lm_head tensors detached "
                                 f"({name}.detach())")


def _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias, teacher_bias,
             temperature, softcap, logit_scale, mask, backend, process_group) -> _Problem:
    _check_head("student", student_hidden, student_weight, student_bias)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    group = _validate.check_process_group(process_group)
    if group is not None and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"teacher_weight: with process_group (vocabulary-parallel lm_heads) both shards must cover "
                         f"the same global columns, but this rank holds {student_weight.shape[0]} student and "
                         f"{teacher_weight.shape[0]} teacher rows; slice the padded model's shard first")
    _validate.check_same_positions("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    tau = _validate.check_positive("temperature", temperature)
    caps, scales = _pair("softcap", softcap), _pair("logit_scale", logit_scale)
    lead = student_hidden.shape[:-1]
    device = student_hidden.device
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a string, got {type(backend).__name__}")
    heads = [
        _Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, scale, cap)
        for hidden, weight, bias, scale, cap in ((student_hidden, student_weight, student_bias, scales[0], caps[0]),
                                                 (teacher_hidden, teacher_weight, teacher_bias, scales[1], caps[1]))
    ]
    return _Problem(
        student=heads[0], teacher=heads[1], hidden_shape=student_hidden.shape, lead_shape=lead,
        vocab=min(student_weight.shape[0], teacher_weight.shape[0]), inv_temp=1.0 / tau,
        mask=_validate.check_mask(mask, lead, device), backend=_dispatch.get_backend(backend, device),
        student_inputs=(student_hidden, student_weight, student_bias), group=group,
        shard=None if group is None else distributed.vocab_shard(student_weight.shape[0], group, device=device),
        block_override=blocks_override(),
    )


# ----------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------

def _divergence(loss: _Loss, args, kwargs, reduction):
    reduction = _validate.check_reduction(reduction)
    problem = _prepare(*args, **kwargs)
    return _run(problem, loss, None, _ReduceValue(reduction, problem.lead_shape))


def _options(student_bias, teacher_bias, temperature, softcap, logit_scale, mask, backend, process_group) -> dict:
    return dict(student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature, softcap=softcap,
                logit_scale=logit_scale, mask=mask, backend=backend, process_group=process_group)


def fused_linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                            teacher_bias=None, temperature=1.0, softcap=None, logit_scale=None, mask=None,
                            reduction="mean", backend="auto", process_group=None):
    """``loss.reverse_kl`` (KL(q || p)) of the logits the two lm_heads produce; see the module docstring."""
    return _divergence(_Divergence(_reverse_kl_rows, REVERSE_KL_GRAD),
                       (student_hidden, student_weight, teacher_hidden, teacher_weight),
                       _options(student_bias, teacher_bias, temperature, softcap, logit_scale, mask, backend,
                                process_group), reduction)


def fused_linear_forward_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                            teacher_bias=None, temperature=1.0, softcap=None, logit_scale=None, mask=None,
                            reduction="mean", backend="auto", process_group=None):
    """``loss.forward_kl`` (KL(p || q)) of the logits the two lm_heads produce; see the module docstring."""
    return _divergence(_Divergence(_forward_kl_rows, FORWARD_KL_GRAD),
                       (student_hidden, student_weight, teacher_hidden, teacher_weight),
                       _options(student_bias, teacher_bias, temperature, softcap, logit_scale, mask, backend,
                                process_group), reduction)


def fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, *, beta=0.5, student_bias=None,
                     teacher_bias=None, temperature=1.0, softcap=None, logit_scale=None, mask=None, reduction="mean",
                     backend="auto", process_group=None):
    """``loss.jsd`` of the logits the two lm_heads produce: beta KL(p||m) + (1-beta) KL(q||m), m = beta p +
    (1-beta) q, with ``beta=0`` defined as forward KL and ``beta=1`` as reverse KL; see the module docstring."""
    beta = _validate.check_range("beta", beta, 0.0, 1.0, high_inclusive=True)
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    kwargs = _options(student_bias, teacher_bias, temperature, softcap, logit_scale, mask, backend, process_group)
    if beta == 0.0:
        return fused_linear_forward_kl(*args, reduction=reduction, **kwargs)
    if beta == 1.0:
        return fused_linear_reverse_kl(*args, reduction=reduction, **kwargs)
    return _divergence(_JSD(beta), args, kwargs, reduction)


class _TokenStatsFinish(_Finish):
    def __init__(self, alpha, lead_shape, inv_temp):
        self.alpha, self.lead_shape, self.inv_temp = alpha, lead_shape, inv_temp

    def __call__(self, values, valid):
        return _token_stats_from_rows(values["stats"], self.inv_temp, valid, self.alpha, self.lead_shape), None, None


def fused_linear_token_stats(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, *,
                             student_bias=None, teacher_bias=None, alpha=0.2, temperature=1.0, softcap=None,
                             logit_scale=None, mask=None, backend="auto", process_group=None):
    """``loss.token_stats`` of the logits the two lm_heads produce (no gradient); see the module docstring."""
    alpha = _validate.check_range("alpha", alpha, 0.0, 1.0, high_inclusive=False)
    problem = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
                       teacher_bias=teacher_bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                       mask=mask, backend=backend, process_group=process_group)
    flat_tokens = _token_ids("tokens", tokens, problem)
    with torch.no_grad():
        values, stats, valid, _ = _forward(problem, _Stats(), flat_tokens, None, _on_chip(problem))
        return _TokenStatsFinish(alpha, problem.lead_shape, problem.inv_temp)(values, valid)[0]


def _token_ids(name, tokens, problem: _Problem) -> torch.Tensor:
    """Validated int64 [N] token ids as the backend reads them (sharded: this shard's local indices, and
    ``problem.owned`` says which rows' tokens this rank holds)."""
    device = problem.student.hidden.device
    if problem.group is None:
        return _validate.check_tokens(name, tokens, problem.lead_shape, device, problem.vocab, problem.mask)
    flat = _validate.check_tokens(name, tokens, problem.lead_shape, device, problem.shard.vocab, problem.mask,
                                  vocab_is="the global vocabulary: the sum of the shards' sizes")
    local, problem.owned = distributed.local_tokens(flat, problem.shard.offset, problem.shard.size)
    return local


class _MiniLLMFinish(_Finish):
    def __init__(self, lead_shape, num_tokens, single_step):
        self.lead_shape, self.num_tokens, self.single_step = lead_shape, num_tokens, single_step

    def __call__(self, values, valid):
        def mean(key):
            return _reduce(values[key], valid, "mean", self.lead_shape, self.num_tokens)[0]
        pg_loss, reg_loss = mean("pg"), mean("kl")
        value = pg_loss + reg_loss if self.single_step else pg_loss.clone()
        outputs = MiniLLMLoss(value, pg_loss, reg_loss, mean("clipped"))
        return outputs, value, 1.0 / _denominator(valid, "mean", self.num_tokens)

    def attach(self, outputs, loss):
        return outputs._replace(loss=loss)


def fused_linear_minillm_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, advantages,
                              old_logprobs, importance_weights, *, mask, student_bias=None, teacher_bias=None,
                              clip_eps=0.2, temperature=1.0, softcap=None, logit_scale=None, single_step=True,
                              num_tokens=None, backend="auto", process_group=None):
    """``loss.minillm_loss`` (clipped policy gradient + single-step reverse KL) of the logits the two lm_heads
    produce; returns ``MiniLLMLoss(loss, pg_loss, reg_loss, clip_fraction)``. See the module docstring."""
    clip_eps = _validate.check_positive("clip_eps", clip_eps)
    num_tokens = _validate.check_num_tokens(num_tokens)
    problem = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
                       teacher_bias=teacher_bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                       mask=mask, backend=backend, process_group=process_group)
    flat_tokens = _token_ids("tokens", tokens, problem)
    lead, device = problem.lead_shape, student_hidden.device
    adv, old, w = (_validate.per_position(name, x, lead, device).detach().to(torch.float64)  # as loss.minillm_loss
                   for name, x in (("advantages", advantages), ("old_logprobs", old_logprobs),
                                   ("importance_weights", importance_weights)))
    return _run(problem, _MiniLLM(adv, old, w, clip_eps, single_step), flat_tokens,
                _MiniLLMFinish(lead, num_tokens, single_step))


class _PTFinish(_Finish):
    def __init__(self, lead_shape, num_tokens, kd_ratio):
        self.lead_shape, self.num_tokens, self.kd_ratio = lead_shape, num_tokens, kd_ratio

    def __call__(self, values, valid):
        lm_loss = _reduce(values["lm"], valid, "mean", self.lead_shape, self.num_tokens)[0]
        kd_loss = _reduce(values["kd"], valid, "mean", self.lead_shape, self.num_tokens)[0]
        value = (1 - self.kd_ratio) * lm_loss + self.kd_ratio * kd_loss
        return PTLoss(value, lm_loss, kd_loss), value, 1.0 / _denominator(valid, "mean", self.num_tokens)

    def attach(self, outputs, loss):
        return outputs._replace(loss=loss)


def fused_linear_pt_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                         student_bias=None, teacher_bias=None, kd_ratio=0.5, ignore_index=-100, temperature=1.0,
                         softcap=None, logit_scale=None, num_tokens=None, backend="auto", process_group=None):
    """``loss.pt_loss`` ((1 - kd_ratio) LM loss + kd_ratio word-level KD; labels aligned with the hidden states, no
    shift inside) of the logits the two lm_heads produce; returns ``PTLoss(loss, lm_loss, kd_loss)``."""
    kd_ratio = _validate.check_range("kd_ratio", kd_ratio, 0.0, 1.0, high_inclusive=True)
    num_tokens = _validate.check_num_tokens(num_tokens)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    _check_head("student", student_hidden, student_weight, student_bias)
    lead = student_hidden.shape[:-1]
    flat_labels = _validate.per_position("labels", labels, lead, student_hidden.device, integer=True)
    problem = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
                       teacher_bias=teacher_bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                       mask=(flat_labels != ignore_index).reshape(lead), backend=backend,
                       process_group=process_group)
    flat_tokens = _token_ids("labels", labels, problem)
    return _run(problem, _PT(kd_ratio), flat_tokens, _PTFinish(lead, num_tokens, kd_ratio))


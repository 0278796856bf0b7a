"""Argument checks shared by every public op. Each failure is a ValueError that names the argument."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _dispatch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class Rows:
    """Both logit tensors seen as 2-D rows, plus what every op needs to know about them."""

    student: torch.Tensor  # [N, V_s], unit stride along the vocabulary
    teacher: torch.Tensor  # [N, V_t]
    lead_shape: torch.Size
    vocab: int  # min(V_s, V_t)
    inv_temp: float
    mask: torch.Tensor | None  # bool [N] or None (all valid)
    backend_name: str  # as given ("auto" included); each primitive call resolves it for the device
    group: object = None  # the process group of a vocabulary-parallel op (logits are this rank's shard), or None

    @property
    def backend(self):
        """The backend module itself (for eager-only callers: sampling, the sharded paths)."""
        return _dispatch.get_backend(self.backend_name, self.student.device)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def check_logits(student_logits, teacher_logits) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{name}: expected shape [..., V] with V >= 1, got {tuple(x.shape)}")
    check_same_positions("student_logits", student_logits, "teacher_logits", teacher_logits)
    if teacher_logits.requires_grad:
        raise ValueError("teacher_logits: requires grad, but the teacher never receives a gradient; compute the "
                         "teacher's forward under torch.no_grad() (or pass teacher_logits.detach())")


def check_same_positions(student_name: str, student, teacher_name: str, teacher) -> None:
    """Student and teacher tensors ``[..., X]`` must have the same leading shape and device."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"{teacher_name}: leading shape {tuple(teacher.shape[:-1])} does not match "
                         f"{student_name}'s {tuple(student.shape[:-1])}")
    if student.device != teacher.device:
        raise ValueError(f"{teacher_name}: on {teacher.device}, but {student_name} is on {student.device}; both "
                         f"must be on the same device")


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_range(name: str, value, low: float, high: float, *, high_inclusive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_num_tokens(num_tokens):
    if num_tokens is None:
        return None
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens: expected a scalar, got a tensor of shape {tuple(num_tokens.shape)}")
        if num_tokens.dtype == torch.bool or num_tokens.is_complex():
            raise ValueError(f"num_tokens: expected a real number, got a {num_tokens.dtype} tensor")
        count = num_tokens.detach().to(torch.float32).reshape(())
        # A wrong normaliser would silently scale every gradient: worth one host sync (in an op when compiled).
        if torch.compiler.is_compiling():
            return torch.ops.minillm_fast.checked_token_count(count)
        _check_token_count(count)
        return count
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float)) or not num_tokens > 0:
        raise ValueError(f"num_tokens: expected a number > 0 (the global count of valid tokens), got {num_tokens!r}")
    return float(num_tokens)


def per_position(name: str, x, lead_shape, device, *, integer: bool = False) -> torch.Tensor:
    """A tensor with the logits' leading shape (tokens, advantages, ...), flattened to [N]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {tuple(lead_shape)}, got {type(x).__name__}")
    if x.shape != lead_shape:
        raise ValueError(f"{name}: expected shape {tuple(lead_shape)} (the logits' leading shape), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, but the logits are on {device}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor (token ids), got {x.dtype}")
    if not integer and not x.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x.reshape(-1)


def check_mask(mask, lead_shape, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a torch.Tensor of shape {tuple(lead_shape)} or None, "
                         f"got {type(mask).__name__}")
    if mask.shape != lead_shape:
        raise ValueError(f"mask: expected shape {tuple(lead_shape)} (the logits' leading shape), got "
                         f"{tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask: on {mask.device}, but the logits are on {device}")
    return (mask.reshape(-1) != 0) if mask.dtype != torch.bool else mask.reshape(-1)


def check_tokens(name: str, tokens, lead_shape, device, vocab: int, valid,
                 vocab_is: str = "min(V_s, V_t)") -> torch.Tensor:
    """Token ids as int64 [N], in [0, vocab) wherever ``valid``; elsewhere replaced by 0 (never read).
    ``vocab_is`` says in the error message what the vocabulary is."""
    flat = per_position(name, tokens, lead_shape, device, integer=True).to(torch.int64)
    if valid is not None:
        flat = torch.where(valid, flat, torch.zeros_like(flat))
    if torch.compiler.is_compiling():
        return torch.ops.minillm_fast.checked_token_ids(flat, vocab, name, vocab_is)
    _check_token_range(flat, vocab, name, vocab_is)
    return flat


def _check_token_range(tokens, vocab, name, vocab_is):
    out_of_range = (tokens < 0) | (tokens >= vocab)
    if tokens.numel() and bool(out_of_range.any()):
        bad = tokens[out_of_range][0].item()
        raise ValueError(f"{name}: token id {bad} is out of range [0, {vocab}) (vocabulary = {vocab_is})")


def _check_token_count(count):
    if not bool(count > 0):
        raise ValueError(f"num_tokens: expected a count > 0 (the global number of valid tokens), got {count.item()!r}")


# Checks of tensor *values* need a host sync, which torch.compile cannot trace (a graph break). While it traces,
# they run inside these two custom ops instead, opaque to the compiler (which sees their fake implementations) and
# run with the graph, raising the same ValueError. Each returns a copy of its input (an op's output may not alias
# an input), which the caller uses in place of the input, so that no compiler removes the check as dead code.

@torch.library.custom_op("minillm_fast::checked_token_ids", mutates_args=(),
                         schema="(Tensor tokens, SymInt vocab, str name, str vocab_is) -> Tensor")
def _checked_token_ids(tokens, vocab, name, vocab_is):
    _check_token_range(tokens, vocab, name, vocab_is)
    return tokens.clone()


@torch.library.custom_op("minillm_fast::checked_token_count", mutates_args=(), schema="(Tensor count) -> Tensor")
def _checked_token_count(count):
    _check_token_count(count)
    return count.clone()


_checked_token_ids.register_fake(lambda tokens, vocab, name, vocab_is: torch.empty_like(tokens))
_checked_token_count.register_fake(lambda count: torch.empty_like(count))


def check_process_group(process_group):
    """None, or a ``torch.distributed`` process group that this process belongs to."""
    if process_group is None:
        return None
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group() first, or pass process_group=None (unsharded logits)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group: expected a torch.distributed.ProcessGroup (e.g. the tensor-parallel group "
                         f"of the lm_head) or None, got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group: this process is not a member of the group")
    return process_group


def prepare(student_logits, teacher_logits, *, temperature, mask, backend, process_group=None) -> Rows:
    """Validate the common arguments and view both logit tensors as rows. With ``process_group``, the logits are
    this rank's vocabulary shard, and both shards must cover the same global columns."""
    check_logits(student_logits, teacher_logits)
    group = check_process_group(process_group)
    if group is not None and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher_logits: with process_group (vocabulary-parallel logits) both shards must cover "
                         f"the same global columns, but this rank holds {student_logits.shape[-1]} student and "
                         f"{teacher_logits.shape[-1]} teacher columns; slice the padded model's shard to the "
                         f"shared columns first")
    tau = check_positive("temperature", temperature)
    lead_shape = student_logits.shape[:-1]
    flat_mask = check_mask(mask, lead_shape, student_logits.device)
    return Rows(
        student=_as_rows(student_logits),
        teacher=_as_rows(teacher_logits.detach()),
        lead_shape=lead_shape,
        vocab=min(student_logits.shape[-1], teacher_logits.shape[-1]),
        inv_temp=1.0 / tau,
        mask=flat_mask,
        backend_name=_dispatch.check_backend(backend, student_logits.device),
        group=group,
    )

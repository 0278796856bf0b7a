"""MiniLLM's rewards and length-normalised, whitened returns for right-padded [B, R] rollouts."""
from __future__ import annotations


import torch

from . import _validate

__all__ = ["rewards", "advantages"]


def _rollout_tensor(name: str, x, shape=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is None and x.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, R] (batch, response length), got {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def rewards(teacher_logprobs, old_logprobs, mask=None, *, scale=0.5, clip=100.0):
    """Per-token reward of the reference code: r_t = clip((log p(y_t) - log q_old(y_t)) / scale, -clip, clip).

    float32, detached; 0 where ``mask`` (optional, same shape) is False.
    """
    scale = _validate.check_positive("scale", scale)
    clip = _validate.check_positive("clip", clip)
    if not isinstance(teacher_logprobs, torch.Tensor):
        raise ValueError(f"teacher_logprobs: expected a torch.Tensor, got {type(teacher_logprobs).__name__}")
    _rollout_tensor("old_logprobs", old_logprobs, teacher_logprobs.shape)
    r = ((teacher_logprobs.detach().float() - old_logprobs.detach().float()) / scale).clamp(-clip, clip)
    if mask is not None:
        valid = _rollout_tensor("mask", mask, teacher_logprobs.shape).to(torch.bool)
        r = torch.where(valid, r, torch.zeros_like(r))
    return r


def advantages(rewards, mask, *, gamma=0.95, length_norm=True, whiten=True, process_group=None):
    """Length-normalised discounted returns, whitened over valid tokens, as MiniLLM's reference computes them.

    For each row, over its valid (unpadded) tokens, with positions counted *within the response*::

        G_t = sum_{t' >= t} gamma^(t' - t) r_t'          (includes r_t itself; gamma = 0.95)
        A_t = G_t / L_t  when length_norm, L_t = number of valid tokens at positions >= t (undiscounted)
        A   = (A - mean) / sqrt(var + 1e-8)  when whiten, mean and population variance over valid tokens only

    Deliberate deviation from the reference: it whitens over the whole [B, R] tensor, padding included; this
    library uses valid tokens only, so padding never changes the statistics. Whatever sits in padded reward
    positions (even NaN) never leaks: the result is 0 there. Returns a detached float32 [B, R] tensor.
    """
    rewards = _rollout_tensor("rewards", rewards)
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards: expected a floating-point tensor, got {rewards.dtype}")
    valid = _rollout_tensor("mask", mask, rewards.shape).to(torch.bool)
    gamma = _validate.check_range("gamma", gamma, 0.0, 1.0, high_inclusive=True)
    with torch.no_grad():
        r = torch.where(valid, rewards.detach().float(), torch.zeros_like(rewards, dtype=torch.float32))
        returns = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        remaining = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            # Padded positions neither add a reward nor advance the discount: positions are within the response.
            v = valid[:, t]
            running = torch.where(v, r[:, t] + gamma * running, running)
            remaining = remaining + v.to(torch.float32)
            returns[:, t] = running / remaining.clamp(min=1) if length_norm else running
        if whiten and process_group is not None:
            mean, var = _global_mean_var(returns, valid, process_group)
            returns = (returns - mean) / torch.sqrt(var + 1e-8)
        elif whiten:
            count = valid.sum().clamp(min=1).to(torch.float32)
            mean = torch.where(valid, returns, torch.zeros_like(returns)).sum() / count
            var = torch.where(valid, (returns - mean) ** 2, torch.zeros_like(returns)).sum() / count
            returns = (returns - mean) / torch.sqrt(var + 1e-8)
        return torch.where(valid, returns, torch.zeros_like(returns))


def _global_mean_var(returns, valid, process_group):
    """Mean and population variance over the valid entries of every rank's ``returns`` (two all-reduces)."""
    import torch.distributed as dist

    zero = torch.zeros_like(returns)
    totals = torch.stack([torch.where(valid, returns, zero).sum(), valid.sum().to(torch.float32)])
    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=process_group)
    count = totals[1].clamp(min=1)
    mean = totals[0] / count
    squares = torch.where(valid, (returns - mean) ** 2, zero).sum().reshape(1)
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=process_group)
    return mean, squares[0] / count

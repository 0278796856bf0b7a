"""The loss of each method on one micro-batch, and gradient accumulation over an optimizer step.

Every loss is a sum over valid tokens divided by the token count of the whole optimizer step (``num_tokens``),
so the accumulated gradient is the step's token mean however the step is split into micro-batches.

Temperatures: sampling, MiniLLM's losses and GKD's JSD use ``cfg.temperature``; the PT, SFT and KD losses use
tau = 1, as the reference's LM and distillation losses do.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .. import hf, loss, rl
from .data import Sequences, ceil_div
from .models import response_hidden, response_logits, text_hidden, text_logits


def _models(cfg, student, teacher, data, *, text=False) -> dict:
    """The two models' outputs on ``data`` as keyword arguments of a loss op: their logits, or with
    ``cfg.fused_linear`` their last hidden states and lm_heads (for the ``loss.fused_linear_*`` twin). A teacher
    of None stands for the detached student (the LM loss as pt_loss with kd_ratio = 0)."""
    outputs = (text_hidden if text else response_hidden) if cfg.fused_linear else \
        (text_logits if text else response_logits)
    mine = outputs(student, data)
    if teacher is None:
        theirs, teacher = mine.detach(), student
    else:
        with torch.no_grad():
            theirs = outputs(teacher, data)
    if cfg.fused_linear:
        return hf.fused_linear_args(student, mine, teacher, theirs)
    return {"student_logits": mine, "teacher_logits": theirs}


def _op(cfg, name: str):
    return getattr(loss, "fused_linear_" + name if cfg.fused_linear else name)


def minillm(cfg, student, teacher, mb: Sequences, num_tokens):
    """Algorithm steps 4-5: clipped policy gradient (importance weight folded into the ratio) + single-step KL."""
    out = _op(cfg, "minillm_loss")(**_models(cfg, student, teacher, mb), tokens=mb.response,
                                   advantages=mb.advantages, old_logprobs=mb.old_logprobs,
                                   importance_weights=mb.importance_weights, mask=mb.mask, clip_eps=cfg.clip_eps,
                                   temperature=cfg.temperature, single_step=cfg.single_step, num_tokens=num_tokens,
                                   backend=cfg.backend)
    return out.loss, {"pg_loss": out.pg_loss, "reg_loss": out.reg_loss, "clip_fraction": out.clip_fraction}


def sft(cfg, student, teacher, mb: Sequences, num_tokens):
    """Cross-entropy on the response tokens (seqkd: on the teacher's responses). pt_loss with kd_ratio = 0 is
    exactly the LM loss; the detached student stands in for the teacher it never reads into the gradient."""
    out = _op(cfg, "pt_loss")(**_models(cfg, student, None, mb), labels=mb.labels(), kd_ratio=0.0,
                              num_tokens=num_tokens, backend=cfg.backend)
    return out.loss, {"lm_loss": out.lm_loss}


def kd(cfg, student, teacher, mb: Sequences, num_tokens):
    """Word-level KD on the data's responses: (1 - lambda) LM loss + lambda (-sum_v p_v log q_v)."""
    out = _op(cfg, "pt_loss")(**_models(cfg, student, teacher, mb), labels=mb.labels(), kd_ratio=cfg.kd_ratio,
                              num_tokens=num_tokens, backend=cfg.backend)
    return out.loss, {"lm_loss": out.lm_loss, "kd_loss": out.kd_loss}


def gkd(cfg, student, teacher, mb: Sequences, num_tokens):
    """On-policy GKD: generalised JSD_beta between student and teacher on the student's own samples."""
    value = _op(cfg, "jsd")(**_models(cfg, student, teacher, mb), beta=cfg.gkd_beta, temperature=cfg.temperature,
                            mask=mb.mask, reduction="sum", backend=cfg.backend) / num_tokens
    return value, {"jsd": value.detach()}


LOSSES = {"minillm": minillm, "sft": sft, "seqkd": sft, "kd": kd, "gkd": gkd}


def pt(cfg, student, teacher, blocks: torch.Tensor, num_tokens):
    """Algorithm step 6, MiniLLM's PT loss on plain text: (1 - lambda) LM loss + lambda word-level distillation."""
    inputs, labels = blocks[:, :-1], blocks[:, 1:]
    out = _op(cfg, "pt_loss")(**_models(cfg, student, teacher, inputs, text=True), labels=labels,
                              kd_ratio=cfg.kd_ratio, num_tokens=num_tokens, backend=cfg.backend)
    return out.loss, {"pt_loss": out.loss.detach(), "pt_lm_loss": out.lm_loss, "pt_kd_loss": out.kd_loss}


def accumulate_gradients(cfg, student, teacher, batch: Sequences, pt_blocks: torch.Tensor | None, *, dist=None,
                         pt_tokens: int | None = None) -> dict:
    """Forward and backward over the micro-batches of one optimizer step; returns the step's (float) metrics.

    Each micro-batch's loss is backpropagated on its own, so at most one micro-batch's logits are alive at a time.

    Several processes (``dist``, a ``parallel.Dist``): ``batch`` and ``pt_blocks`` are this rank's slices of the
    step. The valid-token count and the whitening statistics are all-reduced first, so each rank's losses are its
    share of the global token mean; the wrapped student sums the gradients over ranks (DDP: once, on the last
    micro-batch), and the metrics are all-reduced, so both equal one process's on the whole step batch.
    ``pt_tokens``: the step's PT-loss target count (default: ``pt_blocks``' own).
    """
    from .parallel import Dist, gradient_sync

    dist = dist or Dist()
    if cfg.method == "minillm":  # algorithm step 3, over this step's batch (the reference: over its micro-batch)
        batch.advantages = rl.advantages(batch.rewards, batch.mask, gamma=cfg.gamma, length_norm=cfg.length_norm,
                                         whiten=cfg.whiten, process_group=dist.group)
    tokens = batch.num_tokens()
    if dist.enabled:
        tokens = int(dist.all_reduce_sum(torch.tensor([tokens], dtype=torch.float64,
                                                      device=batch.mask.device)).item())
    num_tokens = max(tokens, 1)
    steps = [(LOSSES[cfg.method], mb.trim(), num_tokens, 1.0) for mb in batch.split(cfg.batch_size)]
    if pt_blocks is not None:
        pt_tokens = pt_tokens if pt_tokens is not None else pt_blocks[:, 1:].numel()
        steps += [(pt, blocks, pt_tokens, cfg.pt_weight)
                  for blocks in pt_blocks.split(ceil_div(len(pt_blocks), cfg.grad_accum_steps))]
    metrics = defaultdict(float)  # values stay tensors until the end: no device sync per micro-batch
    for i, (objective, data, count, weight) in enumerate(steps):
        with gradient_sync(student, last=i == len(steps) - 1):
            value, parts = objective(cfg, student, teacher, data, count)
            (value if weight == 1.0 else weight * value).backward()
        metrics["loss"] += value.detach() if weight == 1.0 else weight * value.detach()
        for key, part in parts.items():
            metrics[key] += part
        del value  # its graph holds this micro-batch's logits until released
    if dist.enabled:  # every value so far is a share of a global token mean: the sum over ranks is the mean
        keys = sorted(metrics)
        totals = dist.all_reduce_sum(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32,
                                                                  device=batch.mask.device) for k in keys]))
        metrics = dict(zip(keys, totals.unbind()))
    valid = batch.mask
    if not dist.enabled:  # what the reference logs about the rollouts in this step
        if cfg.method == "minillm":
            metrics["reward"] = float(batch.rewards[valid].mean()) if valid.any() else 0.0
            metrics["rollout_reverse_kl"] = float(batch.reverse_kl[valid].mean()) if valid.any() else 0.0
        metrics["response_length"] = float(valid.sum(1).float().mean())
    else:  # the same means over every rank's slice: sums, all-reduced
        sums = [valid.sum(1).float().sum(), torch.tensor(float(len(batch)), device=valid.device)]
        if cfg.method == "minillm":
            sums += [batch.rewards[valid].sum(), batch.reverse_kl[valid].sum()]
        sums = dist.all_reduce_sum(torch.stack([x.to(torch.float64) for x in sums])).tolist()
        if cfg.method == "minillm":
            metrics["reward"] = sums[2] / tokens if tokens else 0.0
            metrics["rollout_reverse_kl"] = sums[3] / tokens if tokens else 0.0
        metrics["response_length"] = sums[0] / sums[1]
    metrics["num_tokens"] = float(num_tokens)
    return {key: float(value) for key, value in metrics.items()}

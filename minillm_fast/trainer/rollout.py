"""Rollouts: token-by-token sampling with the models' own KV caches, then one scoring pass.

No forked ``generate``: at every step each model involved runs on the newest token with its cache, and
``sampling.sample_mixture`` draws from (1 - alpha) q + alpha p without building the mixture. Sampling from one
model alone is the same call with alpha = 0 and that model's logits in both slots.
"""
from __future__ import annotations

import torch

from .. import loss, rl, sampling
from .data import Sequences, response_mask
from .models import forward, response_logits

SOURCES = ("mixture", "student", "teacher")


@torch.no_grad()
def generate(student, teacher, prompts: Sequences, *, source: str, max_new_tokens, eos_id: int, pad_id: int,
             alpha: float = 0.2, temperature: float = 1.0, generator=None, backend: str = "auto",
             lockstep=None) -> Sequences:
    """Sample a response for every (left-padded) prompt; stops when every row has produced EOS.

    ``source``: ``"mixture"`` (MiniLLM's teacher-mixed sampling: both models run, each with its KV cache),
    ``"student"`` or ``"teacher"`` (that model alone). Position ids continue the prompt's cumulative attention
    mask, so left padding does not shift positions. After a row's EOS it is fed ``pad_id`` (masked later).

    ``max_new_tokens``: one budget for the batch, or a LongTensor of one per row (``row_budgets``): a row whose
    budget is spent stops there (its later positions are masked), so its length does not depend on the other
    prompts in the batch. ``generator``: one ``torch.Generator`` for the batch, or a list of one per row: each
    row's tokens then depend on its own generator only (one sampler call per unfinished row and step).
    Together, per-row budgets and generators make a row's response independent of how prompts are batched.
    ``lockstep`` (``parallel.Lockstep``, with sharded models): keep stepping, with dummy forwards once this
    batch is done, until every rank's batch is done, so that the models' collectives stay matched.
    """
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != len(prompts):
        raise ValueError(f"generator: expected one per prompt ({len(prompts)}), got {len(generator)}")
    budgets = max_new_tokens if isinstance(max_new_tokens, torch.Tensor) else None
    if budgets is not None:
        max_new_tokens = int(budgets.max()) if len(budgets) else 0
    models = {"mixture": (student, teacher), "student": (student,), "teacher": (teacher,)}[source]
    alpha = alpha if source == "mixture" else 0.0
    attention = prompts.prompt_mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    tokens_in, caches, steps = prompts.prompt, [None] * len(models), []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.prompt.device)
    finished = False
    while _any_running(lockstep, not finished and len(steps) < max_new_tokens):
        if finished or len(steps) >= max_new_tokens:
            lockstep.idle_forward(models)  # only with a lockstep: some other rank is still generating
            continue
        logits = []
        for i, model in enumerate(models):
            out, caches[i] = forward(model, tokens_in, attention, positions, cache=caches[i], use_cache=True,
                                     logits_to_keep=1)
            logits.append(out[:, -1])
        student_logits, teacher_logits = logits[0], logits[-1]
        if per_row:
            token = _sample_rows(student_logits, teacher_logits, done, generator, pad_id, alpha=alpha,
                                 temperature=temperature, backend=backend)
        else:
            token = sampling.sample_mixture(student_logits, teacher_logits, alpha=alpha, temperature=temperature,
                                            generator=generator, backend=backend)
        if bool((token < 0).any()):
            raise FloatingPointError("sampling failed: a next-token distribution is empty or not finite (NaN or "
                                     "-inf logits from the student or the teacher)")
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps.append(token)
        done = done | (token == eos_id)
        if budgets is not None:
            done = done | (budgets <= len(steps))
        if bool(done.all()):
            finished = True
            continue
        tokens_in = token[:, None]
        positions = positions[:, -1:] + 1
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
    response = torch.stack(steps, 1) if steps else prompts.prompt.new_zeros(len(prompts), 0)
    mask = response_mask(response, eos_id)
    if budgets is not None:
        mask = mask & (torch.arange(response.shape[1], device=mask.device)[None, :] < budgets[:, None])
    return Sequences(prompts.prompt, prompts.prompt_mask, response, mask)


def _any_running(lockstep, running: bool) -> bool:
    return running if lockstep is None else lockstep.any_running(running)


def _sample_rows(student_logits, teacher_logits, done, generators, pad_id, **kw):
    """Each unfinished row drawn with its own generator (finished rows get ``pad_id`` and draw nothing)."""
    token = torch.full((len(generators),), pad_id, dtype=torch.long, device=student_logits.device)
    for row, is_done in enumerate(done.tolist()):
        if not is_done:
            token[row] = sampling.sample_mixture(student_logits[row:row + 1], teacher_logits[row:row + 1],
                                                 generator=generators[row], **kw)[0]
    return token


@torch.no_grad()
def score(student, teacher, seq: Sequences, cfg) -> Sequences:
    """One pass of both models over the sampled sequences: log q_old(y), the importance weight q_old / p~ and the
    per-token reward clip((log p - log q_old) / scale) (algorithm page, step 2). Advantages are left to the
    optimisation phase, which whitens them over each optimizer step's batch."""
    stats = loss.token_stats(response_logits(student, seq), response_logits(teacher, seq), seq.response,
                             alpha=cfg.sampling_alpha, temperature=cfg.temperature, mask=seq.mask,
                             backend=cfg.backend)
    rewards = rl.rewards(stats.teacher_logprob, stats.student_logprob, seq.mask, scale=cfg.reward_scale,
                         clip=cfg.reward_clip)
    return seq.with_fields(old_logprobs=stats.student_logprob, importance_weights=stats.importance_weight,
                           rewards=rewards, reverse_kl=stats.reverse_kl)


def max_new_tokens(cfg, prompts: Sequences, budget: int = 0) -> int:
    """One budget for the batch: what its widest (padded) prompt leaves of ``max_length``, capped by ``budget``."""
    room = cfg.max_length - prompts.prompt.shape[1]
    return max(1, min(room, budget) if budget else room)


def row_budgets(cfg, prompts: Sequences, budget: int = 0) -> torch.Tensor:
    """One budget per row: what the row's own prompt leaves of ``max_length`` (so not a function of the batch),
    capped by ``budget``; at least 1."""
    room = cfg.max_length - prompts.prompt_mask.sum(1)
    if budget:
        room = room.clamp(max=budget)
    return room.clamp(min=1)

"""The executable specification: every op in plain float64 PyTorch, written for reading.

Every backend is tested against these functions on fresh random inputs. They materialise full-vocabulary
tensors on purpose (clarity over speed) and upcast the *already rounded* inputs to float64, so a test measures
only the kernel's own accumulation error.

Conventions shared with the fast ops (see ``minillm_fast.loss`` for the user-facing docs):

* logits are ``[..., V]``; when student and teacher vocabularies differ, both distributions are taken over the
  first ``min(V_s, V_t)`` columns and the student's extra columns get zero gradient;
* ``q = softmax(z / tau)`` is the student, ``p = softmax(u / tau)`` the teacher;
* ``0 * log 0 = 0``: entries that are ``-inf`` in a row carry no mass and contribute nothing;
* a row whose student or teacher logits are all ``-inf`` (an empty distribution) is treated as masked: it
  contributes 0 and is not counted;
* ``mean`` divides by the number of valid positions and returns 0.0 when there are none.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "log_softmax",
    "reverse_kl",
    "forward_kl",
    "jsd",
    "token_stats",
    "minillm_loss",
    "pt_loss",
    "mixture_probs",
    "advantages",
    "rewards",
]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64) if not x.requires_grad else x.to(torch.float64)


def log_softmax(logits: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
    """log softmax(logits[..., :vocab] / tau) in float64; an all -inf row gives all -inf (no NaN)."""
    x = _f64(logits)[..., :vocab] / temperature
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = torch.log(torch.exp(x - m).sum(-1, keepdim=True)) + m
    return x - lse


def _xlogy_diff(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """sum_v exp(a) (a - b) with 0 log 0 = 0: entries where exp(a) = 0 contribute nothing."""
    pa = torch.exp(a_log)
    diff = torch.where(pa > 0, a_log - b_log, torch.zeros_like(a_log))
    return (pa * diff).sum(-1)


def _valid_rows(student: torch.Tensor, teacher: torch.Tensor, vocab: int, mask) -> torch.Tensor:
    """A row counts when the mask allows it and neither distribution is empty."""
    nonempty = (student[..., :vocab] > -math.inf).any(-1) & (teacher[..., :vocab] > -math.inf).any(-1)
    if mask is not None:
        nonempty = nonempty & mask.to(torch.bool)
    return nonempty


def _reduce(per_row: torch.Tensor, valid: torch.Tensor, reduction: str, num_tokens=None) -> torch.Tensor:
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = valid.sum() if num_tokens is None else torch.tensor(float(num_tokens), dtype=torch.float64)
    return total / count.clamp(min=1)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean"):
    """KL(q || p) = sum_v q_v (log q_v - log p_v) per position."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = log_softmax(student_logits, temperature, vocab)
    log_p = log_softmax(teacher_logits, temperature, vocab)
    per_row = _xlogy_diff(log_q, log_p)
    return _reduce(per_row, _valid_rows(student_logits, teacher_logits, vocab, mask), reduction)


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean"):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = log_softmax(student_logits, temperature, vocab)
    log_p = log_softmax(teacher_logits, temperature, vocab)
    per_row = _xlogy_diff(log_p, log_q)
    return _reduce(per_row, _valid_rows(student_logits, teacher_logits, vocab, mask), reduction)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean"):
    """Generalised JSD: m = beta p + (1 - beta) q, loss beta KL(p||m) + (1 - beta) KL(q||m).

    The endpoints are defined, not limits: beta = 0 is forward_kl, beta = 1 is reverse_kl.
    """
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = log_softmax(student_logits, temperature, vocab)
    log_p = log_softmax(teacher_logits, temperature, vocab)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    per_row = beta * _xlogy_diff(log_p, log_m) + (1 - beta) * _xlogy_diff(log_q, log_m)
    return _reduce(per_row, _valid_rows(student_logits, teacher_logits, vocab, mask), reduction)


def token_stats(student_logits, teacher_logits, tokens, *, alpha=0.2, temperature=1.0, mask=None):
    """Per-position statistics of the sampled token y (float64 dict, 0 at masked positions)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = log_softmax(student_logits, temperature, vocab)
    log_p = log_softmax(teacher_logits, temperature, vocab)
    valid = _valid_rows(student_logits, teacher_logits, vocab, mask)
    y = torch.where(valid, tokens, torch.zeros_like(tokens)).unsqueeze(-1)
    lq = log_q.gather(-1, y).squeeze(-1)
    lp = log_p.gather(-1, y).squeeze(-1)
    if alpha > 0:
        mix = torch.logaddexp(lp + math.log(alpha), lq + math.log(1 - alpha))
    else:
        mix = lq.clone()
    out = {
        "student_logprob": lq,
        "teacher_logprob": lp,
        "mix_logprob": mix,
        "log_ratio": lp - lq,
        "importance_weight": torch.exp(lq - mix),
        "reverse_kl": _xlogy_diff(log_q, log_p),
        "student_entropy": -_xlogy_diff(log_q, torch.zeros_like(log_q)),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def minillm_loss(student_logits, teacher_logits, tokens, advantages, old_logprobs, importance_weights, *,
                 mask, clip_eps=0.2, temperature=1.0, single_step=True, num_tokens=None):
    """One MiniLLM micro-step (algorithm page, section 3 steps 4-5), as a dict of float64 tensors.

    rho = exp(log q(y) - old_logprob) * w, pg = token mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)),
    reg = token mean of KL(q || p); loss = pg + reg (reg only when single_step).
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = log_softmax(student_logits, temperature, vocab)
    log_p = log_softmax(teacher_logits, temperature, vocab)
    valid = _valid_rows(student_logits, teacher_logits, vocab, mask)
    y = torch.where(valid, tokens, torch.zeros_like(tokens)).unsqueeze(-1)
    lq = log_q.gather(-1, y).squeeze(-1)
    adv = advantages.detach().to(torch.float64)
    old = old_logprobs.detach().to(torch.float64)
    w = importance_weights.detach().to(torch.float64)
    log_ratio = torch.where(valid, lq - old, torch.zeros_like(lq))
    rho = torch.exp(log_ratio) * w
    pg = torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip_eps, 1 + clip_eps))
    kl = _xlogy_diff(log_q, log_p)
    pg_loss = _reduce(pg, valid, "mean", num_tokens)
    reg_loss = _reduce(kl, valid, "mean", num_tokens)
    clipped = ((rho - 1).abs() > clip_eps).to(torch.float64)
    clip_fraction = _reduce(clipped, valid, "mean", num_tokens)
    loss = pg_loss + reg_loss if single_step else pg_loss
    return {"loss": loss, "pg_loss": pg_loss, "reg_loss": reg_loss, "clip_fraction": clip_fraction}


def pt_loss(student_logits, teacher_logits, labels, *, kd_ratio=0.5, ignore_index=-100, temperature=1.0,
            num_tokens=None):
    """PT loss: (1 - lam) * CE(softmax(z/tau), labels) + lam * (-sum_v p_v log q_v); labels aligned, no shift."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = log_softmax(student_logits, temperature, vocab)
    log_p = log_softmax(teacher_logits, temperature, vocab)
    valid = _valid_rows(student_logits, teacher_logits, vocab, labels != ignore_index)
    y = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    lm = -log_q.gather(-1, y).squeeze(-1)
    p = torch.exp(log_p)
    kd = -(p * torch.where(p > 0, log_q, torch.zeros_like(log_q))).sum(-1)
    lm_loss = _reduce(lm, valid, "mean", num_tokens)
    kd_loss = _reduce(kd, valid, "mean", num_tokens)
    return {"loss": (1 - kd_ratio) * lm_loss + kd_ratio * kd_loss, "lm_loss": lm_loss, "kd_loss": kd_loss}


def mixture_probs(student_logits, teacher_logits, *, alpha=0.2, temperature=1.0):
    """The teacher-mixed sampling distribution (1 - alpha) q + alpha p, float64, over min(V_s, V_t) columns."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    q = torch.exp(log_softmax(student_logits, temperature, vocab))
    p = torch.exp(log_softmax(teacher_logits, temperature, vocab))
    return (1 - alpha) * q + alpha * p


def rewards(teacher_logprobs, old_logprobs, *, scale=0.5, clip=100.0):
    """r_t = clip((log p(y_t) - log q_old(y_t)) / scale, -clip, clip), as the reference code does."""
    r = (teacher_logprobs.to(torch.float64) - old_logprobs.to(torch.float64)) / scale
    return r.clamp(-clip, clip)


def advantages(rewards_, mask, *, gamma=0.95, length_norm=True, whiten=True):
    """Returns of right-padded [B, R] rollouts, written as a plain double loop.

    G_t = sum_{t' >= t, valid} gamma^(t' - t) r_t'; divided by the number of valid tokens at positions >= t
    when length_norm; whitened over valid tokens only (mean, population variance + 1e-8); 0 where padded.
    """
    r = rewards_.detach().to(torch.float64)
    valid = mask.to(torch.bool)
    batch, length = r.shape
    out = torch.zeros_like(r)
    for b in range(batch):
        running, remaining = 0.0, 0
        for t in reversed(range(length)):
            if not valid[b, t]:
                continue
            running = float(r[b, t]) + gamma * running
            remaining += 1
            out[b, t] = running / remaining if length_norm else running
    if whiten and valid.any():
        values = out[valid]
        mean = values.mean()
        var = ((values - mean) ** 2).mean()
        out = (out - mean) / torch.sqrt(var + 1e-8)
    return torch.where(valid, out, torch.zeros_like(out))

"""MiniLLM's token ops: token_stats, minillm_loss, pt_loss, on every backend.

Two oracles:
* ``minillm_fast.reference`` (float64, the executable spec), with the design's tolerances;
* a plain transcription of the losses of MiniLLM's published code (microsoft/LMOps, ``minillm/minillm/losses.py``,
  ``utils.py``, ``sampler.py``, ``reward.py``) that materialises full-vocabulary softmaxes: the
  ``_reference_code_style_*`` functions below, evaluated in float64, to demonstrate parity (values and gradients).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm_fast import loss, reference
from _helpers import (NEG_INF, assert_close_rel, finite_surrogate, grad_tol, invalid_rows, loss_tol, make_logits,
                      seeded_mask)

FIELDS = ("student_logprob", "teacher_logprob", "mix_logprob", "log_ratio", "importance_weight", "reverse_kl",
          "student_entropy")

DTYPE_PAIRS = {
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16/f32": (torch.float16, torch.float32),
}


def vocab_for(backend, big=700, small=150):
    return small if backend == "triton" else big


# ----------------------------------------------------------------------------------------------------------
# A transcription of MiniLLM's reference code (microsoft/LMOps minillm), softmaxes materialised.
# Everything runs in ``dtype`` (the reference uses float32; the tests pass float64 to compare tightly).
# ----------------------------------------------------------------------------------------------------------

def _reference_code_style_get_log_probs(logits, ids, mask, dtype):
    """utils.get_log_probs: log_softmax, gather the sampled token, 0 where masked."""
    logprobs = F.log_softmax(logits.to(dtype), dim=-1)
    logprobs = torch.gather(logprobs, dim=-1, index=ids.unsqueeze(-1)).squeeze(-1)
    return logprobs.masked_fill(~(mask.bool()), 0)


def _reference_code_style_get_entropy(gen_logits, mask, dtype):
    """utils.get_entropy: -sum softmax * log_softmax (inf entries filled with 0)."""
    inf_mask = torch.isinf(gen_logits)
    full_probs = F.softmax(gen_logits, dim=-1, dtype=dtype)
    full_logprobs = F.log_softmax(gen_logits, dim=-1, dtype=dtype)
    full_logprobs = full_logprobs.masked_fill(inf_mask, 0)
    ent = -torch.sum(full_probs * full_logprobs, dim=-1)
    return ent * mask


def _reference_code_style_get_x_entropy(logits_1, logits_2, mask, dtype):
    """utils.get_x_entropy: -sum softmax(logits_1) * log_softmax(logits_2)."""
    inf_mask = torch.isinf(logits_1) | torch.isinf(logits_2)
    full_probs = F.softmax(logits_1, dim=-1, dtype=dtype)
    full_logprobs = F.log_softmax(logits_2, dim=-1, dtype=dtype)
    full_logprobs = full_logprobs.masked_fill(inf_mask, 0)
    xent = -torch.sum(full_probs * full_logprobs, dim=-1)
    return xent * mask


def _reference_code_style_teacher_logprobs(teacher_logits, ids, mask, dtype):
    """reward.reward_fn: mean-centred teacher logits, gathered logit minus logsumexp (the per-token score)."""
    logits = teacher_logits.to(dtype)
    logits = logits - torch.mean(logits, dim=-1, keepdim=True)
    selection_value = torch.gather(logits, -1, ids[..., None]).squeeze(-1)
    next_state_value = torch.logsumexp(logits, dim=-1)
    return (selection_value - next_state_value) * mask


def _reference_code_style_token_stats(student_logits, teacher_logits, tokens, mask, *, alpha, temperature,
                                      dtype=torch.float64):
    """sampler.run_sample: logprobs, teacher scores, mixed probabilities and the importance weight w."""
    logits = student_logits.to(dtype) / temperature
    t_logits = teacher_logits.to(dtype) / temperature
    mask = mask.to(dtype)
    logprobs = _reference_code_style_get_log_probs(logits, tokens, mask, dtype)
    t_logprobs = _reference_code_style_teacher_logprobs(t_logits, tokens, mask, dtype)
    mix_probs = (1 - alpha) * torch.exp(logprobs) + alpha * torch.exp(t_logprobs)
    mix_logprobs = torch.log(mix_probs)
    w = torch.exp(logprobs - mix_logprobs)
    t_rewards, ent_rewards = t_logprobs, -logprobs
    xent = _reference_code_style_get_x_entropy(logits, t_logits, mask, dtype)
    s_ent = _reference_code_style_get_entropy(logits, mask, dtype)
    return {"student_logprob": logprobs, "teacher_logprob": t_logprobs, "mix_logprob": mix_logprobs,
            "log_ratio": t_rewards + ent_rewards, "importance_weight": w, "reverse_kl": xent - s_ent,
            "student_entropy": s_ent}


def _reference_code_style_pg_loss(logprobs, old_logprobs, advantages, mask, w, cliprange):
    """losses.Loss._pg_loss, verbatim up to naming (plus trlx's clip fraction)."""
    n = mask.sum()
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    ratio = ratio * w
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / n
    clipfrac = torch.sum(((ratio - 1).abs() > cliprange).to(ratio.dtype) * mask) / n
    return pg_loss, clipfrac


def _reference_code_style_reg_loss(logits, t_logits, mask, dtype):
    """losses.Loss._reg_loss: token mean of xent - entropy = KL(q || p)."""
    xent = _reference_code_style_get_x_entropy(logits, t_logits, mask, dtype)
    s_ent = _reference_code_style_get_entropy(logits, mask, dtype)
    return torch.sum((xent - s_ent) * mask) / mask.sum()


def _reference_code_style_ppo_loss(student_logits, teacher_logits, tokens, advantages, old_logprobs, w, mask, *,
                                   cliprange, temperature, single_step_reg, dtype=torch.float64):
    """losses.Loss.ppo_loss (advantages given): logits / temperature, PG loss, + single-step reg loss."""
    mask = mask.to(dtype)
    logits = student_logits.to(dtype) / temperature
    t_logits = teacher_logits.to(dtype) / temperature
    logprobs = _reference_code_style_get_log_probs(logits, tokens, mask, dtype)
    loss_, clipfrac = _reference_code_style_pg_loss(logprobs, old_logprobs.to(dtype), advantages.to(dtype), mask,
                                                    w.to(dtype), cliprange)
    pg_loss = loss_.detach()
    reg_loss = _reference_code_style_reg_loss(logits, t_logits, mask, dtype)
    if single_step_reg:
        loss_ = loss_ + reg_loss
    return {"loss": loss_, "pg_loss": pg_loss, "reg_loss": reg_loss.detach(), "clip_fraction": clipfrac}


def _reference_code_style_pt_loss(logits, teacher_logits, labels, *, kd_ratio, temperature=1.0,
                                  dtype=torch.float64):
    """losses.Loss.pt_loss (non model-parallel branch); the reference has no temperature here, the library
    divides both logits by the same tau, so that is done up front."""
    logits = logits.to(dtype) / temperature
    teacher_logits = teacher_logits.to(dtype) / temperature
    loss_mask = (labels != -100).int()
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    lm_loss = loss_fn(logits.view(-1, logits.size(-1)), labels.view(-1))
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=dtype)
    inf_mask = torch.isinf(logits)
    logprobs = F.log_softmax(logits, dim=-1, dtype=dtype)
    prod_probs = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    distil_loss = -torch.sum(x * loss_mask.view(-1), dim=0) / torch.sum(loss_mask.view(-1), dim=0)
    loss_ = (1 - kd_ratio) * lm_loss + kd_ratio * distil_loss
    return {"loss": loss_, "lm_loss": lm_loss.detach(), "kd_loss": distil_loss.detach()}


# ----------------------------------------------------------------------------------------------------------
# Input builders
# ----------------------------------------------------------------------------------------------------------

def _tokens(gen, lead, vocab, mask=None, garbage=None):
    t = torch.randint(0, vocab, tuple(lead), generator=gen)
    if mask is not None and garbage is not None:
        t = torch.where(mask, t, torch.full_like(t, garbage))
    return t


def _rollout(gen, z, u, tokens, mask, temperature=1.0, clip_eps=0.2):
    """advantages, old_logprobs and importance weights with ratios rho spread over both PPO branches, kept at
    least 5e-3 away from the clip boundaries (float32 rounding must not flip a branch)."""
    lead = z.shape[:-1]
    vocab = min(z.shape[-1], u.shape[-1])
    logq = reference.log_softmax(z, temperature, vocab).gather(-1, tokens.clamp(0, vocab - 1)[..., None])[..., 0]
    rho = torch.rand(tuple(lead), generator=gen, dtype=torch.float64) * 1.2 + 0.4
    for edge in (1 - clip_eps, 1 + clip_eps):
        near = (rho - edge).abs() < 5e-3
        rho = torch.where(near, edge + 1e-2, rho)
    w = torch.rand(tuple(lead), generator=gen, dtype=torch.float64) * 0.95 + 0.3
    old = logq - torch.log(rho) + torch.log(w)
    adv = torch.randn(tuple(lead), generator=gen, dtype=torch.float64)
    return adv.float(), old.float(), w.float()


def _lib_minillm(backend, z, u, tokens, adv, old, w, **kw):
    zz = z.detach().clone().requires_grad_(True)
    out = loss.minillm_loss(zz, u, tokens, adv, old, w, backend=backend, **kw)
    for name in ("loss", "pg_loss", "reg_loss", "clip_fraction"):
        assert getattr(out, name).dtype == torch.float32 and getattr(out, name).shape == ()
    assert out.loss.requires_grad
    assert not (out.pg_loss.requires_grad or out.reg_loss.requires_grad or out.clip_fraction.requires_grad)
    out.loss.backward()
    assert zz.grad.dtype == z.dtype
    return out, zz.grad


def _ref_minillm(z, u, tokens, adv, old, w, *, mask, **kw):
    """reference.minillm_loss value, and its gradient (taken on a -inf-free surrogate, see _helpers)."""
    value = reference.minillm_loss(z, u, tokens, adv, old, w, mask=mask, **kw)
    keep = ~invalid_rows(z, u, mask)
    zz = finite_surrogate(z).requires_grad_(True)
    reference.minillm_loss(zz, finite_surrogate(u), tokens, adv, old, w, mask=keep, **kw)["loss"].backward()
    return value, torch.where(keep[..., None], zz.grad, torch.zeros_like(zz.grad))


# ----------------------------------------------------------------------------------------------------------
# token_stats
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(dtypes=["f32", "bf16"], temperature=[1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.3])
@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS))
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.9])
def test_token_stats_matches_reference(backend, alpha, dtypes, temperature, gen):
    dz, du = DTYPE_PAIRS[dtypes]
    v = vocab_for(backend)
    z, u = make_logits(gen, (2, 5, v), dz, scale=3.0), make_logits(gen, (2, 5, v), du, scale=3.0)
    mask = seeded_mask(gen, (2, 5))
    tokens = _tokens(gen, (2, 5), v, mask, garbage=-100)  # masked positions may hold anything
    zz = z.clone().requires_grad_(True)
    out = loss.token_stats(zz, u, tokens, alpha=alpha, temperature=temperature, mask=mask, backend=backend)
    assert type(out).__name__ == "TokenStats" and out._fields == FIELDS
    ref = reference.token_stats(z, u, tokens, alpha=alpha, temperature=temperature, mask=mask)
    for name in FIELDS:
        got = getattr(out, name)
        assert got.dtype == torch.float32 and got.shape == (2, 5) and not got.requires_grad, name
        assert (got[~mask] == 0).all(), f"{name}: masked positions must be 0"
        assert_close_rel(got, ref[name], loss_tol(dz, du), what=name)
    iw = out.importance_weight[mask]
    assert (iw > 0).all() and (iw <= torch.tensor(1 / (1 - alpha), dtype=torch.float32)).all()
    if alpha == 0:
        torch.testing.assert_close(out.mix_logprob, out.student_logprob, rtol=0, atol=0)
        assert (iw == 1).all()


@pytest.mark.triton_subset(alpha=[0.2])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.9])
def test_token_stats_matches_reference_code(backend, alpha, gen):
    """Parity with MiniLLM's sampler/reward code: logprobs, teacher scores, mixed log-prob, w, rewards, KL."""
    v = vocab_for(backend)
    z, u = make_logits(gen, (3, 4, v), scale=3.0), make_logits(gen, (3, 4, v), scale=3.0)
    mask = seeded_mask(gen, (3, 4))
    tokens = _tokens(gen, (3, 4), v)
    out = loss.token_stats(z, u, tokens, alpha=alpha, temperature=1.3, mask=mask, backend=backend)
    ref = _reference_code_style_token_stats(z, u, tokens, mask, alpha=alpha, temperature=1.3)
    for name in FIELDS:
        assert_close_rel(getattr(out, name)[mask], ref[name][mask], 2e-5, what=name)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.9])
def test_token_stats_and_policy_gradient_of_very_unlikely_tokens(backend, alpha, gen):
    """Tokens with log q(y) ~ -5000 (and log p(y) a few nats off, or -inf): the importance weight
    1 / ((1 - alpha) + alpha p/q), the mixture and the PG ratio exp(log q(y) - old) must not inherit the rounding
    of log q(y) at ulp(5000) ~ 5e-4 (exp(lq - mix) was off by 2e-4 relative, and above its bound 1 / (1 - alpha)
    where p(y) = 0: the per-row expressions run in float64)."""
    v, n = 64, 6
    z, u = make_logits(gen, (n, v), scale=3.0), make_logits(gen, (n, v), scale=3.0)
    tokens = torch.full((n,), 5)
    z[:, 5] = -5000.0 + torch.randn(n, generator=gen)
    u[:, 5] = z[:, 5] + torch.tensor([-3.0, 0.0, 0.5, 2.0, -40.0, NEG_INF])
    u[3, 5] = 3.0  # p(y) / q(y) ~ e^5000: overflows even in float64
    out = loss.token_stats(z, u, tokens, alpha=alpha, backend=backend)
    ref = reference.token_stats(z, u, tokens, alpha=alpha)
    for name in FIELDS:
        assert_close_rel(getattr(out, name)[:5], ref[name][:5], 2e-5, what=name)
    assert out.importance_weight[5] == torch.tensor(1 / (1 - alpha), dtype=torch.float32)
    assert (out.importance_weight <= torch.tensor(1 / (1 - alpha), dtype=torch.float32)).all()
    mask = torch.ones(n, dtype=torch.bool)
    mask[5] = False
    adv = torch.randn(n, generator=gen)
    old = ref["student_logprob"] + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64)  # kept in float64
    w = out.importance_weight
    kw = dict(mask=mask, clip_eps=0.2, single_step=False)
    got, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, **kw)
    want, want_grad = _ref_minillm(z, u, tokens, adv, old, w, **kw)
    assert_close_rel(got.pg_loss, want["pg_loss"], 2e-5, what="pg_loss")
    assert_close_rel(grad, want_grad, 1e-4, what="gradient")


def test_token_stats_stable_mix_logprob(backend, gen):
    """log(alpha p(y) + (1 - alpha) q(y)) in log space: tokens of probability ~e^-150 (float32 exp underflows)."""
    v = 64
    z, u = make_logits(gen, (4, v)), make_logits(gen, (4, v))
    tokens = torch.tensor([5, 9, 17, 33])
    z[torch.arange(4), tokens] = torch.tensor([-150.0, -60.0, -170.0, 0.0])
    u[torch.arange(4), tokens] = torch.tensor([-160.0, -150.0, -20.0, -140.0])
    out = loss.token_stats(z, u, tokens, alpha=0.2, backend=backend)
    ref = reference.token_stats(z, u, tokens, alpha=0.2)
    for name in FIELDS:
        assert torch.isfinite(getattr(out, name)).all(), name
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)


@pytest.mark.parametrize("vs,vt", [(90, 80), (80, 90)])
def test_token_stats_padded_vocab_and_neg_inf(backend, vs, vt, gen):
    z, u = make_logits(gen, (6, vs)), make_logits(gen, (6, vt))
    v = min(vs, vt)
    banned = torch.rand(6, v, generator=gen) < 0.2
    tokens = _tokens(gen, (6,), v)
    banned[torch.arange(6), tokens] = False
    z[:, :v][banned], u[:, :v][banned] = NEG_INF, NEG_INF
    z[4, :v] = NEG_INF  # empty student row: treated as masked (0 everywhere)
    out = loss.token_stats(z, u, tokens.int(), backend=backend)  # int32 tokens are fine
    ref = reference.token_stats(z, u, tokens)
    for name in FIELDS:
        got = getattr(out, name)
        assert got[4] == 0 and not torch.isnan(got).any(), name
        assert_close_rel(got, ref[name], 2e-5, what=name)


def test_token_stats_3d_and_no_mask(backend, gen):
    z, u = make_logits(gen, (2, 2, 3, 41)), make_logits(gen, (2, 2, 3, 41))
    tokens = _tokens(gen, (2, 2, 3), 41)
    out = loss.token_stats(z, u, tokens, backend=backend)
    ref = reference.token_stats(z, u, tokens)
    for name in FIELDS:
        assert getattr(out, name).shape == (2, 2, 3)
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)


# ----------------------------------------------------------------------------------------------------------
# minillm_loss
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(dtypes=["f32", "bf16"], clip_eps=[0.2])
@pytest.mark.parametrize("clip_eps", [0.2, 0.05])
@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS))
@pytest.mark.parametrize("single_step", [True, False])
def test_minillm_loss_matches_reference(backend, single_step, dtypes, clip_eps, gen):
    dz, du = DTYPE_PAIRS[dtypes]
    v = vocab_for(backend)
    z, u = make_logits(gen, (3, 4, v), dz), make_logits(gen, (3, 4, v), du)
    mask = seeded_mask(gen, (3, 4))
    tokens = _tokens(gen, (3, 4), v, mask, garbage=v + 7)
    adv, old, w = _rollout(gen, z, u, tokens, mask, temperature=1.2, clip_eps=clip_eps)
    kw = dict(mask=mask, clip_eps=clip_eps, temperature=1.2, single_step=single_step)
    out, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, **kw)
    ref, ref_grad = _ref_minillm(z, u, tokens, adv, old, w, **kw)
    tol = loss_tol(dz, du)
    for name in ("loss", "pg_loss", "reg_loss"):
        assert_close_rel(getattr(out, name), ref[name], tol, what=name)
    assert_close_rel(out.clip_fraction, ref["clip_fraction"], 1e-6, what="clip_fraction")
    assert_close_rel(grad, ref_grad, grad_tol(dz), what="gradient")
    assert (grad[~mask] == 0).all()
    if single_step:
        torch.testing.assert_close(out.loss, out.pg_loss + out.reg_loss, rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(out.loss, out.pg_loss, rtol=0, atol=0)


@pytest.mark.triton_subset(single_step=[True])
@pytest.mark.parametrize("single_step", [True, False])
def test_minillm_loss_matches_reference_code(backend, single_step, gen):
    """Parity with losses.Loss.ppo_loss of MiniLLM's code (PG with w folded in the ratio + single-step KL)."""
    v = vocab_for(backend)
    z, u = make_logits(gen, (2, 6, v)), make_logits(gen, (2, 6, v))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False  # right padding, as rollouts are
    mask[1, 5:] = False
    tokens = _tokens(gen, (2, 6), v)
    adv, old, w = _rollout(gen, z, u, tokens, mask, temperature=0.8)
    old = torch.where(mask, old, torch.zeros_like(old))
    out, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask, temperature=0.8,
                             single_step=single_step)
    zz = z.detach().double().requires_grad_(True)
    ref = _reference_code_style_ppo_loss(zz, u, tokens, adv, old, w, mask, cliprange=0.2, temperature=0.8,
                                         single_step_reg=single_step)
    ref["loss"].backward()
    for name in ("loss", "pg_loss", "reg_loss"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)
    assert_close_rel(out.clip_fraction, ref["clip_fraction"], 1e-6, what="clip_fraction")
    assert_close_rel(grad, zz.grad, 1e-4, what="gradient")


@pytest.mark.triton_subset(num_tokens=[50])
@pytest.mark.parametrize("num_tokens", [50, 7.5, "tensor"])
def test_minillm_loss_num_tokens(backend, num_tokens, gen):
    """num_tokens replaces the local count of valid tokens as the normaliser (values and gradient)."""
    v = vocab_for(backend, 300, 100)
    z, u = make_logits(gen, (4, 5, v)), make_logits(gen, (4, 5, v))
    mask = seeded_mask(gen, (4, 5))
    tokens = _tokens(gen, (4, 5), v)
    adv, old, w = _rollout(gen, z, u, tokens, mask)
    n = torch.tensor(33.0) if num_tokens == "tensor" else num_tokens
    out, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask, num_tokens=n)
    ref, ref_grad = _ref_minillm(z, u, tokens, adv, old, w, mask=mask, num_tokens=float(n))
    for name in ("loss", "pg_loss", "reg_loss", "clip_fraction"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)
    assert_close_rel(grad, ref_grad, 1e-4, what="gradient")
    # Splitting a batch in two micro-batches with the global count gives the same sum (gradient accumulation).
    total = int(mask.sum())
    halves = [_lib_minillm(backend, z[i:i + 2], u[i:i + 2], tokens[i:i + 2], adv[i:i + 2], old[i:i + 2],
                           w[i:i + 2], mask=mask[i:i + 2], num_tokens=total) for i in (0, 2)]
    whole, whole_grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask)
    torch.testing.assert_close(halves[0][0].loss + halves[1][0].loss, whole.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([halves[0][1], halves[1][1]]), whole_grad, rtol=1e-4, atol=1e-7)


def test_minillm_loss_masks_and_empty_rows(backend, gen):
    """Masked positions and empty (all -inf) rows contribute nothing, are not counted and get zero gradient;
    a mask with nothing valid gives 0.0 for every output and a zero gradient."""
    v = vocab_for(backend, 200, 80)
    z, u = make_logits(gen, (8, v)), make_logits(gen, (8, v))
    tokens = _tokens(gen, (8,), v)
    banned = torch.rand(8, v, generator=gen) < 0.2
    banned[torch.arange(8), tokens] = False
    z[banned], u[banned] = NEG_INF, NEG_INF
    z[2], u[5] = NEG_INF, NEG_INF
    mask = torch.tensor([True, True, True, False, True, True, True, False])
    adv, old, w = _rollout(gen, z.clamp(min=-1e30), u, tokens, mask)
    out, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask)
    ref, ref_grad = _ref_minillm(z, u, tokens, adv, old, w, mask=mask)
    for name in ("loss", "pg_loss", "reg_loss", "clip_fraction"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)
    assert_close_rel(grad, ref_grad, 1e-4, what="gradient")
    assert (grad[[2, 3, 5, 7]] == 0).all() and (grad[banned] == 0).all()

    nothing = torch.zeros(8, dtype=torch.bool)
    out, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=nothing)
    for name in ("loss", "pg_loss", "reg_loss", "clip_fraction"):
        assert getattr(out, name).item() == 0.0, name
    assert (grad == 0).all()


def test_minillm_loss_inputs_are_constants(backend, gen):
    """advantages, old_logprobs and importance_weights are never differentiated (even if they require grad)."""
    v = 60
    z, u = make_logits(gen, (5, v)), make_logits(gen, (5, v))
    tokens = _tokens(gen, (5,), v)
    mask = torch.ones(5, dtype=torch.bool)
    adv, old, w = (x.clone().requires_grad_(True) for x in _rollout(gen, z, u, tokens, mask))
    out, _ = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask)
    assert adv.grad is None and old.grad is None and w.grad is None


def test_minillm_loss_gradient_formula(backend, gen):
    """dz = (1/(N tau)) [g (e_y - q) + q (log q - log p - KL)], g = -A rho on unclipped tokens, 0 on clipped."""
    v, tau = 30, 1.5
    z, u = make_logits(gen, (6, v)), make_logits(gen, (6, v))
    tokens = _tokens(gen, (6,), v)
    mask = torch.ones(6, dtype=torch.bool)
    adv, old, w = _rollout(gen, z, u, tokens, mask, temperature=tau)
    _, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask, temperature=tau)
    logq = reference.log_softmax(z, tau, v)
    logp = reference.log_softmax(u, tau, v)
    q = logq.exp()
    kl = (q * (logq - logp)).sum(-1, keepdim=True)
    rho = torch.exp(logq.gather(-1, tokens[:, None])[:, 0] - old.double()) * w.double()
    unclipped = -adv.double() * rho >= -adv.double() * rho.clamp(0.8, 1.2)
    g = torch.where(unclipped, -adv.double() * rho, torch.zeros_like(rho))
    e_y = F.one_hot(tokens, v).double()
    want = (g[:, None] * (e_y - q) + q * (logq - logp - kl)) / (6 * tau)
    assert_close_rel(grad, want, 1e-4)


# ----------------------------------------------------------------------------------------------------------
# pt_loss
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.triton_subset(dtypes=["f32", "bf16"], temperature=[1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS))
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
def test_pt_loss_matches_reference(backend, kd_ratio, dtypes, temperature, gen):
    dz, du = DTYPE_PAIRS[dtypes]
    v = vocab_for(backend)
    z, u = make_logits(gen, (2, 6, v), dz), make_logits(gen, (2, 6, v), du)
    labels = _tokens(gen, (2, 6), v)
    labels[0, :2] = -100
    labels[1, 5] = -100
    zz = z.clone().requires_grad_(True)
    out = loss.pt_loss(zz, u, labels, kd_ratio=kd_ratio, temperature=temperature, backend=backend)
    assert type(out).__name__ == "PTLoss" and out._fields == ("loss", "lm_loss", "kd_loss")
    assert not (out.lm_loss.requires_grad or out.kd_loss.requires_grad)
    out.loss.backward()
    z64 = z.detach().double().requires_grad_(True)
    ref = reference.pt_loss(z64, u, labels, kd_ratio=kd_ratio, temperature=temperature)
    ref["loss"].backward()
    tol = loss_tol(dz, du)
    for name in ("loss", "lm_loss", "kd_loss"):
        assert getattr(out, name).dtype == torch.float32
        assert_close_rel(getattr(out, name), ref[name], tol, what=name)
    assert zz.grad.dtype == dz
    assert_close_rel(zz.grad, z64.grad, grad_tol(dz), what="gradient")
    assert (zz.grad[labels == -100] == 0).all()


@pytest.mark.triton_subset(kd_ratio=[0.5])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
def test_pt_loss_matches_reference_code(backend, kd_ratio, gen):
    """Parity with losses.Loss.pt_loss of MiniLLM's code (CrossEntropyLoss + word-level distillation)."""
    v = vocab_for(backend)
    z, u = make_logits(gen, (3, 5, v)), make_logits(gen, (3, 5, v))
    labels = _tokens(gen, (3, 5), v)
    labels[:, -1] = -100
    zz = z.clone().requires_grad_(True)
    out = loss.pt_loss(zz, u, labels, kd_ratio=kd_ratio, backend=backend)
    out.loss.backward()
    z64 = z.detach().double().requires_grad_(True)
    ref = _reference_code_style_pt_loss(z64, u, labels, kd_ratio=kd_ratio)
    ref["loss"].backward()
    for name in ("loss", "lm_loss", "kd_loss"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)
    assert_close_rel(zz.grad, z64.grad, 1e-4, what="gradient")


def test_pt_loss_is_not_shifted(backend, gen):
    """Labels are aligned with the logits: lm_loss is the mean of -log q(labels[i]) at row i."""
    v = 20
    z, u = make_logits(gen, (5, v)), make_logits(gen, (5, v))
    labels = _tokens(gen, (5,), v)
    out = loss.pt_loss(z, u, labels, kd_ratio=0.0, backend=backend)
    want = F.cross_entropy(z.double(), labels)
    torch.testing.assert_close(out.lm_loss.double(), want, rtol=2e-5, atol=0)
    torch.testing.assert_close(out.loss, out.lm_loss, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [-1, 0, 7])
def test_pt_loss_ignore_index(backend, ignore_index, gen):
    v = 40
    z, u = make_logits(gen, (10, v)), make_logits(gen, (10, v))
    labels = _tokens(gen, (10,), v)
    labels[[1, 4, 8]] = ignore_index
    labels[labels == ignore_index] = ignore_index  # any other occurrence is ignored too
    out = loss.pt_loss(z, u, labels, ignore_index=ignore_index, backend=backend)
    valid = labels != ignore_index
    ref = reference.pt_loss(z[valid], u[valid], labels[valid])
    for name in ("loss", "lm_loss", "kd_loss"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)


def test_pt_loss_num_tokens_and_nothing_valid(backend, gen):
    v = 50
    z, u = make_logits(gen, (6, v)), make_logits(gen, (6, v))
    labels = _tokens(gen, (6,), v)
    labels[0] = -100
    zz = z.clone().requires_grad_(True)
    out = loss.pt_loss(zz, u, labels, num_tokens=20, backend=backend)
    out.loss.backward()
    z64 = z.double().requires_grad_(True)
    ref = reference.pt_loss(z64, u, labels, num_tokens=20)
    ref["loss"].backward()
    for name in ("loss", "lm_loss", "kd_loss"):
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)
    assert_close_rel(zz.grad, z64.grad, 1e-4)
    # Every label ignored: zeros, and a zero gradient.
    zz = z.clone().requires_grad_(True)
    out = loss.pt_loss(zz, u, torch.full((6,), -100), backend=backend)
    assert out.loss.item() == 0.0 and out.lm_loss.item() == 0.0 and out.kd_loss.item() == 0.0
    out.loss.backward()
    assert (zz.grad == 0).all()


def test_pt_loss_padded_vocab_and_shared_neg_inf(backend, gen):
    z, u = make_logits(gen, (2, 4, 70)), make_logits(gen, (2, 4, 64))
    labels = _tokens(gen, (2, 4), 64)
    banned = torch.rand(2, 4, 64, generator=gen) < 0.2
    banned.scatter_(-1, labels[..., None], False)
    z[..., :64][banned], u[banned] = NEG_INF, NEG_INF
    zz = z.clone().requires_grad_(True)
    out = loss.pt_loss(zz, u, labels, backend=backend)
    out.loss.backward()
    z64 = finite_surrogate(z).requires_grad_(True)
    ref = reference.pt_loss(z64, finite_surrogate(u), labels)
    ref["loss"].backward()
    for name in ("loss", "lm_loss", "kd_loss"):
        assert_close_rel(getattr(out, name), reference.pt_loss(z, u, labels)[name], 2e-5, what=name)
    assert_close_rel(zz.grad, z64.grad, 1e-4)
    assert (zz.grad[..., 64:] == 0).all() and (zz.grad[..., :64][banned] == 0).all()


def test_pt_loss_gradient_formula(backend, gen):
    """dz = (1/(N tau)) [(1 - lambda)(q - e_y) + lambda (q - p)]."""
    v, tau, lam = 25, 1.7, 0.3
    z, u = make_logits(gen, (4, v)), make_logits(gen, (4, v))
    labels = _tokens(gen, (4,), v)
    zz = z.clone().requires_grad_(True)
    loss.pt_loss(zz, u, labels, kd_ratio=lam, temperature=tau, backend=backend).loss.backward()
    q = torch.softmax(z.double() / tau, -1)
    p = torch.softmax(u.double() / tau, -1)
    want = ((1 - lam) * (q - F.one_hot(labels, v)) + lam * (q - p)) / (4 * tau)
    assert_close_rel(zz.grad, want, 1e-4)


@pytest.mark.triton_subset(temperature=[2.7])
@pytest.mark.parametrize("temperature", [1.0, 2.7])
@pytest.mark.parametrize("offsets", [(0.0, 1e4), (1e4, -1e4), (-1000.0, -1000.0)],
                         ids=["teacher+1e4", "opposite", "both-1000"])
def test_large_logit_offsets_keep_float32_accuracy(backend, offsets, temperature, gen):
    """Softmax is shift-invariant: teacher and student logits ~1e4 apart, or both ~1e3 from 0, must not cost
    precision in the KL terms and the token log-probs of token_stats, minillm_loss and pt_loss (loss 2e-5,
    gradient 1e-4), at tau != 1 too: there the kernels centre on the raw max before scaling (z / tau rounded first
    is off by ulp(|z / tau|), 2.4e-4 at 1e4 / 2.7)."""
    v = vocab_for(backend, 500, 120)
    z = make_logits(gen, (6, v), offset=offsets[0])
    u = make_logits(gen, (6, v), offset=offsets[1])
    tokens = _tokens(gen, (6,), v)
    mask = torch.ones(6, dtype=torch.bool)
    out = loss.token_stats(z, u, tokens, temperature=temperature, backend=backend)
    ref = reference.token_stats(z, u, tokens, temperature=temperature)
    for name in FIELDS:
        assert_close_rel(getattr(out, name), ref[name], 2e-5, what=name)
    adv, old, w = _rollout(gen, z, u, tokens, mask, temperature=temperature)
    got, grad = _lib_minillm(backend, z, u, tokens, adv, old, w, mask=mask, temperature=temperature)
    want, want_grad = _ref_minillm(z, u, tokens, adv, old, w, mask=mask, temperature=temperature)
    for name in ("loss", "pg_loss", "reg_loss"):
        assert_close_rel(getattr(got, name), want[name], 2e-5, what=name)
    assert_close_rel(grad, want_grad, 1e-4, what="minillm_loss gradient")
    zz = z.clone().requires_grad_(True)
    pt = loss.pt_loss(zz, u, tokens, temperature=temperature, backend=backend)
    pt.loss.backward()
    z64 = z.double().requires_grad_(True)
    ref_pt = reference.pt_loss(z64, u, tokens, temperature=temperature)
    ref_pt["loss"].backward()
    for name in ("loss", "lm_loss", "kd_loss"):
        assert_close_rel(getattr(pt, name), ref_pt[name], 2e-5, what=name)
    assert_close_rel(zz.grad, z64.grad, 1e-4, what="pt_loss gradient")

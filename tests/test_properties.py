"""Property-based tests (hypothesis) over shapes and values, -inf entries included, for the torch and cpu backends.

Properties: every divergence is finite and >= 0 except where the documented +inf applies (never NaN), matches
the float64 reference, is invariant to a constant shift of a row's logits, and its gradient rows sum to ~0 (each
row's gradient is a softmax-weighted centred vector); token statistics stay in their mathematical ranges; the
sampler only returns tokens of positive mixture probability.

The accuracy bound here is absolute-plus-relative (hypothesis is good at finding rows with tiny divergences, whose
float32 error is set by the size of the logits, not of the result); the relative accuracy of the design's table is
tested on random inputs in test_divergences.py.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minillm_fast import loss, reference, sampling

# Deterministic by default (CI must not flake); MINILLM_FAST_HYPOTHESIS_EXAMPLES=500 and
# MINILLM_FAST_HYPOTHESIS_RANDOM=1 explore more (and new) inputs.
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("MINILLM_FAST_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
    derandomize=not os.environ.get("MINILLM_FAST_HYPOTHESIS_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

LIMIT = 60.0


@st.composite
def logit_pairs(draw, max_rows=5, max_vocab=40, inf_frac=True):
    n = draw(st.integers(1, max_rows))
    vs = draw(st.integers(1, max_vocab))
    vt = draw(st.one_of(st.just(vs), st.integers(1, max_vocab)))  # mostly equal, sometimes padded
    elems = st.floats(-LIMIT, LIMIT, width=32, allow_nan=False, allow_infinity=False)
    z = draw(hnp.arrays(np.float32, (n, vs), elements=elems))
    u = draw(hnp.arrays(np.float32, (n, vt), elements=elems))
    if inf_frac:
        # -inf entries: ~1 in 6, independently in each row, sometimes the same positions in both.
        zi = draw(hnp.arrays(np.int8, (n, vs), elements=st.integers(0, 5)))
        ui = draw(hnp.arrays(np.int8, (n, vt), elements=st.integers(0, 5)))
        shared = draw(st.booleans())
        z = np.where(zi == 0, -np.inf, z).astype(np.float32)
        if shared:
            v = min(vs, vt)
            ui[:, :v] = zi[:, :v]
        u = np.where(ui == 0, -np.inf, u).astype(np.float32)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    return torch.from_numpy(z).to(dtype), torch.from_numpy(u).to(dtype)


temperatures = st.sampled_from([0.5, 1.0, 2.3]) | st.floats(0.25, 4.0)
betas = st.floats(0.01, 0.99)
OPS = ["reverse_kl", "forward_kl", "jsd"]


def _ops(op, beta):
    if op == "jsd":
        return (lambda z, u, **k: loss.jsd(z, u, beta=beta, **k)), (lambda z, u, **k: reference.jsd(z, u, beta=beta,
                                                                                                   **k))
    return getattr(loss, op), getattr(reference, op)


def _logit_scale(z, u, tau):
    """1 + the largest finite |logit| / tau: float32 rounding of the inputs' magnitude sets the absolute error."""
    finite = torch.cat([z[torch.isfinite(z)].float().abs().flatten(), u[torch.isfinite(u)].float().abs().flatten(),
                        torch.zeros(1)])
    return 1.0 + finite.max().item() / tau


def _bound(ref, z, u, tau):
    """Per-row error allowed: relative 1e-4 plus float32 rounding at the logits' magnitude."""
    return 1e-4 * ref.abs() + 4e-6 * _logit_scale(z, u, tau)


def _mass_against_neg_inf(op, z, u, tau):
    """Per row, the float64 mass that makes the divergence infinite: q on the teacher's -inf entries (reverse
    KL), p on the student's -inf entries (forward KL); 0 for the JSD (never infinite)."""
    v = min(z.shape[-1], u.shape[-1])
    if op == "reverse_kl":
        return torch.where(u[:, :v] == -math.inf, reference.log_softmax(z, tau, v).exp(), 0.0).sum(-1)
    if op == "forward_kl":
        return torch.where(z[:, :v] == -math.inf, reference.log_softmax(u, tau, v).exp(), 0.0).sum(-1)
    return torch.zeros(z.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("op", OPS)
@PROPERTY_SETTINGS
@given(pair=logit_pairs(), tau=temperatures, beta=betas)
def test_divergence_is_nonnegative_and_never_nan(fast_backend, op, pair, tau, beta):
    """KL and JSD are >= 0 (to -1e-6); +inf exactly where documented (teacher -inf under student mass for the
    reverse KL, the converse for the forward KL), never NaN; masked/empty rows are 0."""
    z, u = pair
    fn, ref_fn = _ops(op, beta)
    out = fn(z, u, temperature=tau, reduction="none", backend=fast_backend)
    ref = ref_fn(z, u, temperature=tau, reduction="none")
    assert not torch.isnan(out).any(), "NaN loss"
    # +inf comes from mass on an entry that the other distribution gives -inf; when that mass is below float32's
    # smallest subnormal (e.g. exp(-104)), a float32 kernel legitimately sees 0 mass and a finite divergence.
    must_be_inf = torch.isinf(ref) & (_mass_against_neg_inf(op, z, u, tau) > 1e-37)
    assert torch.isinf(out)[must_be_inf].all(), (out, ref)
    assert not (torch.isinf(out) & ~torch.isinf(ref)).any(), (out, ref)
    assert (out[torch.isinf(out)] > 0).all()
    assert (out >= -1e-6).all(), out


@pytest.mark.parametrize("op", OPS)
@PROPERTY_SETTINGS
@given(pair=logit_pairs(), tau=temperatures, beta=betas)
def test_divergence_matches_reference(fast_backend, op, pair, tau, beta):
    z, u = pair
    fn, ref_fn = _ops(op, beta)
    out = fn(z, u, temperature=tau, reduction="none", backend=fast_backend)
    ref = ref_fn(z, u, temperature=tau, reduction="none")
    fin = torch.isfinite(ref)
    assert torch.isfinite(out[fin]).all()
    err = (out[fin].double() - ref[fin]).abs()
    assert (err <= _bound(ref[fin], z, u, tau)).all(), (out, ref)
    mean = fn(z, u, temperature=tau, backend=fast_backend)
    ref_mean = ref_fn(z, u, temperature=tau)
    if torch.isfinite(ref_mean):
        assert abs(mean.item() - ref_mean.item()) <= 1e-4 * abs(ref_mean.item()) + 4e-6 * _logit_scale(z, u, tau)


@pytest.mark.parametrize("op", OPS)
@PROPERTY_SETTINGS
@given(pair=logit_pairs(), tau=temperatures, beta=betas)
def test_gradient_rows_sum_to_zero(fast_backend, op, pair, tau, beta):
    """Each row's gradient is a centred softmax-weighted vector (q - p, or q * (g - E_q[g])): it sums to 0, is
    finite on rows of finite loss, and is 0 on entries the student gives probability 0 and beyond the shared
    vocabulary."""
    z, u = pair
    fn, _ = _ops(op, beta)
    zz = z.clone().requires_grad_(True)
    out = fn(zz, u, temperature=tau, reduction="none", backend=fast_backend)
    fin = torch.isfinite(out.detach())
    # Weight 1 on the rows of finite loss and 0 on the others (no inf * 0 question).
    (grad,) = torch.autograd.grad(out, zz, fin.to(torch.float32))
    assert grad.dtype == z.dtype
    g = grad.float()
    assert torch.isfinite(g[fin]).all(), g
    v = min(z.shape[-1], u.shape[-1])
    assert (g[:, v:] == 0).all(), "columns beyond the shared vocabulary get no gradient"
    assert (g[:, :v][z[:, :v] == -math.inf] == 0).all(), "entries of zero student probability get no gradient"
    sums = g[fin, :v].double().sum(-1).abs()
    scale = g[fin, :v].double().abs().sum(-1)
    eps = 1e-5 if z.dtype == torch.float32 else 2 * torch.finfo(z.dtype).eps
    assert (sums <= eps * scale + 4e-7 * _logit_scale(z, u, tau) / tau).all(), (sums, scale)


@pytest.mark.parametrize("op", OPS)
@PROPERTY_SETTINGS
@given(pair=logit_pairs(inf_frac=False), tau=temperatures, beta=betas, shift=st.floats(-20, 20, width=32),
       student=st.booleans())
def test_shift_invariance(fast_backend, op, pair, tau, beta, shift, student):
    """Softmax ignores a constant added to a row: so does every divergence (within float32 rounding)."""
    z, u = pair
    z, u = z.float(), u.float()
    fn, _ = _ops(op, beta)
    a = fn(z, u, temperature=tau, reduction="none", backend=fast_backend)
    b = fn(z + shift, u, temperature=tau, reduction="none", backend=fast_backend) if student else \
        fn(z, u + shift, temperature=tau, reduction="none", backend=fast_backend)
    bound = _bound(a.double(), z + abs(shift), u + abs(shift), tau) * 2
    assert ((a - b).abs().double() <= bound).all(), (a, b)


@PROPERTY_SETTINGS
@given(pair=logit_pairs(), tau=temperatures, alpha=st.floats(0.0, 0.95), data=st.data())
def test_token_stats_ranges(fast_backend, pair, tau, alpha, data):
    z, u = pair
    v = min(z.shape[-1], u.shape[-1])
    # Tokens the mixture can draw (positive probability): q(y) = p~(y) = 0 has no importance weight.
    live = (z[:, :v] > -math.inf) | ((u[:, :v] > -math.inf) if alpha > 0 else False)
    tokens = []
    for row in live:
        choices = torch.nonzero(row)[:, 0].tolist() or [0]
        tokens.append(data.draw(st.sampled_from(choices)))
    tokens = torch.tensor(tokens)
    out = loss.token_stats(z, u, tokens, alpha=alpha, temperature=tau, backend=fast_backend)
    ref = reference.token_stats(z, u, tokens, alpha=alpha, temperature=tau)
    for name in out._fields:
        got = getattr(out, name)
        assert not torch.isnan(got).any(), name
        if name == "reverse_kl":  # +inf unless the offending mass underflows float32 (see the divergence test)
            must_be_inf = torch.isinf(ref[name]) & (_mass_against_neg_inf("reverse_kl", z, u, tau) > 1e-37)
            assert torch.isinf(got)[must_be_inf].all() and not (torch.isinf(got) & ~torch.isinf(ref[name])).any()
        else:
            assert torch.equal(torch.isinf(got), torch.isinf(ref[name])), (name, got, ref[name])
    lq, lp, mix = out.student_logprob, out.teacher_logprob, out.mix_logprob
    fin = torch.isfinite(lq) & torch.isfinite(lp)
    assert (lq <= 1e-6).all() and (lp <= 1e-6).all()
    assert (mix[fin] >= torch.minimum(lq, lp)[fin] - 1e-4).all() and (mix[fin] <= torch.maximum(lq, lp)[fin] +
                                                                       1e-4).all()
    w = out.importance_weight
    assert (w >= 0).all() and (w <= 1 / (1 - alpha) * (1 + 1e-5)).all()
    assert (out.student_entropy >= -1e-5).all() and (out.student_entropy <= math.log(v) + 1e-4).all()
    assert (out.reverse_kl >= -1e-6).all()
    for name in ("student_entropy",):
        err = (getattr(out, name).double() - ref[name]).abs()
        assert (err <= _bound(ref[name], z, u, tau)).all(), name


@PROPERTY_SETTINGS
@given(pair=logit_pairs(max_rows=8), tau=temperatures, alpha=st.floats(0.0, 0.95), seed=st.integers(0, 2 ** 31))
def test_sampler_support(fast_backend, pair, tau, alpha, seed):
    z, u = pair
    tokens = sampling.sample_mixture(z, u, alpha=alpha, temperature=tau, generator=torch.Generator().manual_seed(seed),
                                     backend=fast_backend)
    v = min(z.shape[-1], u.shape[-1])
    assert tokens.dtype == torch.int64 and tokens.shape == z.shape[:-1]
    q_live = (z[:, :v] > -math.inf)
    p_live = (u[:, :v] > -math.inf)
    for i, t in enumerate(tokens.tolist()):
        if t == -1:
            # Only when the chosen component is empty.
            assert not q_live[i].any() or not p_live[i].any()
            continue
        assert 0 <= t < v
        assert q_live[i, t] or (alpha > 0 and p_live[i, t]), "drew a token of probability 0"
        if alpha == 0:
            assert q_live[i, t]

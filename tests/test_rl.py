"""rl.rewards and rl.advantages (length-normalised, discounted, whitened returns of right-padded rollouts),
against ``reference`` and against a transcription of MiniLLM's ``Loss._get_advantages_and_returns``, with the
pitfalls of the algorithm page pinned: absolute-position discounting, padding leaking into returns or into the
whitening statistics, advantages that are not detached."""
from __future__ import annotations

import math

import pytest
import torch

from minillm_fast import reference, rl
from _helpers import assert_close_rel

TOL = 2e-5


def _right_padded_mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _reference_code_style_whiten(xs):
    """minillm/utils.whiten (single process): torch.var_mean over the whole tensor, padding included."""
    var, mean = torch.var_mean(xs)
    return (xs - mean) * torch.rsqrt(var + 1e-8)


def _reference_code_style_advantages(rewards, response_length, mask, gamma=0.95, use_whitening=True):
    """minillm/losses.Loss._get_advantages_and_returns, verbatim up to naming."""
    last_rw = 0
    rw_reversed = []
    rewards = rewards.float()
    mask = mask.float()
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    for t in reversed(range(response_length)):
        rw_delta = rewards[:, t]
        last_rw = rw_delta + gamma * last_rw
        rw_reversed.append(last_rw)
    rw = torch.stack(rw_reversed[::-1], dim=1)
    rw = rw / lens
    advantages = rw
    if use_whitening:
        advantages = _reference_code_style_whiten(advantages)
    return advantages.detach()


# ----------------------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("length_norm", [True, False])
@pytest.mark.parametrize("gamma", [0.95, 1.0, 0.5, 0.0])
def test_advantages_match_reference(gamma, length_norm, whiten):
    g = torch.Generator().manual_seed(int(gamma * 100) + 2 * length_norm + whiten)
    lengths = [7, 1, 12, 0, 5, 12]
    mask = _right_padded_mask(lengths, 12)
    rewards = torch.randn(6, 12, generator=g) * 3
    out = rl.advantages(rewards, mask, gamma=gamma, length_norm=length_norm, whiten=whiten)
    ref = reference.advantages(rewards, mask, gamma=gamma, length_norm=length_norm, whiten=whiten)
    assert out.dtype == torch.float32 and out.shape == (6, 12)
    assert_close_rel(out, ref, TOL)
    assert (out[~mask] == 0).all()


def test_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    g = 0.5
    returns = torch.tensor([1 + g * 2 + g * g * 3, 2 + g * 3, 3.0, 0.0], dtype=torch.float64)
    out = rl.advantages(rewards, mask, gamma=g, length_norm=False, whiten=False)
    torch.testing.assert_close(out[0].double(), returns, rtol=1e-6, atol=0)
    normed = returns / torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # valid tokens at positions >= t
    normed[3] = 0
    out = rl.advantages(rewards, mask, gamma=g, length_norm=True, whiten=False)
    torch.testing.assert_close(out[0].double(), normed, rtol=1e-6, atol=0)
    # Default gamma is the reference's 0.95; whitening uses mean and population variance of the valid tokens.
    out = rl.advantages(rewards, mask)
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ret = torch.stack([r[0] + 0.95 * r[1] + 0.95 ** 2 * r[2], r[1] + 0.95 * r[2], r[2]]) / torch.tensor(
        [3.0, 2.0, 1.0], dtype=torch.float64)
    want = (ret - ret.mean()) / torch.sqrt(ret.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(out[0, :3].double(), want, rtol=1e-5, atol=1e-6)
    assert out[0, 3] == 0


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf, 1e30, -7.0])
def test_garbage_in_padded_rewards_does_not_leak(garbage):
    g = torch.Generator().manual_seed(3)
    mask = _right_padded_mask([4, 9, 2], 9)
    rewards = torch.randn(3, 9, generator=g)
    clean = torch.where(mask, rewards, torch.zeros_like(rewards))
    dirty = torch.where(mask, rewards, torch.full_like(rewards, garbage))
    for length_norm in (True, False):
        for whiten in (True, False):
            a = rl.advantages(dirty, mask, length_norm=length_norm, whiten=whiten)
            b = rl.advantages(clean, mask, length_norm=length_norm, whiten=whiten)
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert_close_rel(a, reference.advantages(clean, mask, length_norm=length_norm, whiten=whiten), TOL)


def test_discounting_is_relative_to_the_position_not_absolute():
    """Pitfall: gamma^(absolute position). A long response (gamma^3000 underflows float32) must give finite
    returns equal to the reference, and a response's returns must not depend on where the batch pads it."""
    g = torch.Generator().manual_seed(4)
    r = torch.randn(3000, generator=g)
    rewards, mask = r[None, :], torch.ones(1, 3000, dtype=torch.bool)
    for length_norm in (True, False):
        out = rl.advantages(rewards, mask, length_norm=length_norm, whiten=False)
        assert torch.isfinite(out).all()
        assert_close_rel(out, reference.advantages(rewards, mask, length_norm=length_norm, whiten=False), TOL)
    # The same 6-token response in batches of different widths: identical returns on its tokens.
    resp = torch.randn(6, generator=g)
    for width in (6, 9, 40):
        rewards = torch.zeros(2, width)
        rewards[0, :6] = resp
        rewards[1, :] = torch.randn(width, generator=g)  # a longer neighbour does not matter either
        mask = _right_padded_mask([6, width], width)
        out = rl.advantages(rewards, mask, gamma=0.9, whiten=False)
        ref = reference.advantages(resp[None], torch.ones(1, 6), gamma=0.9, whiten=False)
        torch.testing.assert_close(out[0, :6].double(), ref[0], rtol=1e-5, atol=1e-6)
        assert (out[0, 6:] == 0).all()


def test_padding_does_not_leak_into_whitening():
    """Deliberate deviation from the reference code: mean and variance over valid tokens only, so the amount of
    padding never changes the advantages; the valid tokens come out with mean 0 and (population) std 1."""
    g = torch.Generator().manual_seed(5)
    lengths = [5, 3, 8]
    responses = [torch.randn(n, generator=g) * 2 + 1 for n in lengths]
    results = []
    for width in (8, 13, 64):
        rewards = torch.full((3, width), 5.0)  # padding holds a constant that would shift the statistics
        for i, resp in enumerate(responses):
            rewards[i, :len(resp)] = resp
        mask = _right_padded_mask(lengths, width)
        out = rl.advantages(rewards, mask)
        valid = out[mask]
        assert abs(valid.mean().item()) < 1e-5
        assert abs(valid.double().var(unbiased=False).item() - 1) < 1e-4
        results.append(torch.cat([out[i, :n] for i, n in enumerate(lengths)]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=1e-6)


def test_advantages_are_detached_float32():
    """Pitfall: advantages that carry a graph back into the policy."""
    leaf = torch.randn(2, 5, requires_grad=True)
    rewards = leaf * 2.0
    mask = _right_padded_mask([5, 3], 5)
    out = rl.advantages(rewards, mask)
    assert not out.requires_grad and out.grad_fn is None
    assert out.dtype == torch.float32
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = rl.advantages(rewards.detach().to(dtype), mask)
        assert out.dtype == torch.float32 and not out.requires_grad
        assert_close_rel(out, reference.advantages(rewards.detach().to(dtype), mask), 2e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_dtypes(mask_dtype):
    g = torch.Generator().manual_seed(6)
    mask = _right_padded_mask([3, 5, 1], 5)
    rewards = torch.randn(3, 5, generator=g)
    out = rl.advantages(rewards, mask.to(mask_dtype))
    torch.testing.assert_close(out, rl.advantages(rewards, mask), rtol=0, atol=0)


def test_degenerate_batches():
    rewards = torch.randn(2, 4)
    out = rl.advantages(rewards, torch.zeros(2, 4, dtype=torch.bool))
    assert (out == 0).all()
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[0, 0] = True
    out = rl.advantages(rewards, one)
    assert torch.isfinite(out).all() and (out == 0).all()  # a single valid token whitens to 0
    out = rl.advantages(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool))
    assert out.shape == (0, 4)


@pytest.mark.parametrize("gamma", [0.95, 0.8])
def test_advantages_match_reference_code(gamma):
    """Parity with MiniLLM's Loss._get_advantages_and_returns on right-padded rollouts whose padded rewards are
    0 (as the reference produces them): identical returns without whitening; with whitening the reference uses
    the whole tensor (padding included, unbiased variance), the library the valid tokens (population variance)."""
    g = torch.Generator().manual_seed(7)
    lengths = [10, 4, 7, 1]
    mask = _right_padded_mask(lengths, 10)
    rewards = torch.where(mask, torch.randn(4, 10, generator=g), torch.zeros(4, 10))
    code = _reference_code_style_advantages(rewards, 10, mask, gamma=gamma, use_whitening=False)
    out = rl.advantages(rewards, mask, gamma=gamma, whiten=False)
    assert_close_rel(out[mask], code[mask], TOL)
    # The documented deviation, made explicit: whiten the reference code's returns over the valid tokens only.
    valid = code[mask].double()
    want = (code.double() - valid.mean()) / torch.sqrt(valid.var(unbiased=False) + 1e-8)
    out = rl.advantages(rewards, mask, gamma=gamma)
    assert_close_rel(out[mask], want[mask], TOL)
    # ... which differs from the reference code's whitening whenever there is padding.
    code_whitened = _reference_code_style_advantages(rewards, 10, mask, gamma=gamma)
    assert (out[mask] - code_whitened[mask]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# rewards
# ----------------------------------------------------------------------------------------------------------

def test_rewards_match_reference():
    g = torch.Generator().manual_seed(8)
    lp = -torch.rand(3, 6, generator=g) * 10
    lq = -torch.rand(3, 6, generator=g) * 10
    out = rl.rewards(lp, lq)
    assert out.dtype == torch.float32 and out.shape == (3, 6)
    assert_close_rel(out, reference.rewards(lp, lq), TOL)
    torch.testing.assert_close(out.double(), (lp.double() - lq.double()) / 0.5, rtol=1e-6, atol=1e-6)
    out = rl.rewards(lp, lq, scale=2.0, clip=1.5)
    assert_close_rel(out, reference.rewards(lp, lq, scale=2.0, clip=1.5), TOL)
    assert out.abs().max() <= 1.5


def test_rewards_clip_and_mask():
    lp = torch.tensor([[-1.0, -300.0, 0.0, -2.0]])
    lq = torch.tensor([[-300.0, -1.0, 0.0, -1.0]])
    out = rl.rewards(lp, lq)
    torch.testing.assert_close(out, torch.tensor([[100.0, -100.0, 0.0, -2.0]]))  # defaults: scale 0.5, clip 100
    mask = torch.tensor([[True, True, False, True]])
    lp_garbage = lp.clone()
    lp_garbage[0, 2] = math.nan
    out = rl.rewards(lp_garbage, lq, mask)
    assert out[0, 2] == 0 and torch.isfinite(out).all()


def test_rewards_are_detached():
    lp = torch.randn(2, 3, requires_grad=True)
    lq = torch.randn(2, 3, requires_grad=True)
    out = rl.rewards(lp * 1.0, lq * 1.0)
    assert not out.requires_grad and out.grad_fn is None


def test_rewards_then_advantages_pipeline():
    """rewards -> advantages end to end equals the reference composition."""
    g = torch.Generator().manual_seed(9)
    mask = _right_padded_mask([6, 2, 4], 6)
    lp, lq = -torch.rand(3, 6, generator=g) * 5, -torch.rand(3, 6, generator=g) * 5
    out = rl.advantages(rl.rewards(lp, lq, mask), mask)
    ref = reference.advantages(reference.rewards(lp, lq), mask)
    assert_close_rel(out, ref, TOL)

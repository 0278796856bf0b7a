"""Every bad input raises ValueError with a message that names the offending argument (design: "bad input ...
raises ValueError with a message that names the argument and what was expected")."""
from __future__ import annotations

import math

import pytest
import torch

from minillm_fast import loss, rl, sampling

V = 11


def _logits(*lead, v=V, dtype=torch.float32, device="cpu"):
    return torch.randn(*lead, v, dtype=dtype if dtype.is_floating_point else torch.float32,
                       device=device).to(dtype)


def raises_naming(name, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert name in message, f"the ValueError does not name {name!r}: {message!r}"
    hints = ("expected", "must", "out of range", "does not match", "torch.no_grad", "available", "but ")
    assert any(h in message for h in hints), f"the ValueError does not say what was expected: {message!r}"
    return message


def _call(op, student, teacher, **kw):
    """Call any logits op with valid extra arguments for its leading shape."""
    lead = student.shape[:-1] if isinstance(student, torch.Tensor) else (3,)
    dev = student.device if isinstance(student, torch.Tensor) else "cpu"
    kw.setdefault("backend", "torch")
    if op in ("reverse_kl", "forward_kl", "jsd"):
        return getattr(loss, op)(student, teacher, **kw)
    if op == "token_stats":
        return loss.token_stats(student, teacher, kw.pop("tokens", torch.zeros(lead, dtype=torch.long, device=dev)),
                                **kw)
    if op == "minillm_loss":
        zeros = torch.zeros(lead, device=dev)
        kw.setdefault("mask", None)
        return loss.minillm_loss(student, teacher, kw.pop("tokens", torch.zeros(lead, dtype=torch.long, device=dev)),
                                 kw.pop("advantages", zeros), kw.pop("old_logprobs", zeros),
                                 kw.pop("importance_weights", torch.ones(lead, device=dev)), **kw)
    if op == "pt_loss":
        kw.pop("mask", None)
        return loss.pt_loss(student, teacher, kw.pop("labels", torch.zeros(lead, dtype=torch.long, device=dev)), **kw)
    if op == "sample_mixture":
        kw.pop("mask", None)
        kw.pop("reduction", None)
        return sampling.sample_mixture(student, teacher, **kw)
    raise AssertionError(op)


ALL_OPS = ["reverse_kl", "forward_kl", "jsd", "token_stats", "minillm_loss", "pt_loss", "sample_mixture"]
MASKED_OPS = ["reverse_kl", "forward_kl", "jsd", "token_stats", "minillm_loss"]
REDUCTION_OPS = ["reverse_kl", "forward_kl", "jsd"]


def test_valid_calls_do_not_raise():
    for op in ALL_OPS:
        _call(op, _logits(3), _logits(3))


# ----------------------------------------------------------------------------------------------------------
# Logits: type, dtype, shape, device, teacher gradient
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32, torch.bool, torch.complex64])
def test_wrong_logits_dtype(op, dtype):
    bad = _logits(3, dtype=dtype) if dtype != torch.complex64 else torch.randn(3, V, dtype=dtype)
    raises_naming("student_logits", _call, op, bad, _logits(3))
    raises_naming("teacher_logits", _call, op, _logits(3), bad)


@pytest.mark.parametrize("op", ALL_OPS)
def test_logits_not_tensors(op):
    raises_naming("student_logits", _call, op, [[0.0] * V] * 3, _logits(3))
    raises_naming("teacher_logits", _call, op, _logits(3), [[0.0] * V] * 3)


@pytest.mark.parametrize("op", ALL_OPS)
def test_leading_shape_mismatch(op):
    msg = raises_naming("_logits", _call, op, _logits(3), _logits(4))
    assert "teacher_logits" in msg or "student_logits" in msg
    raises_naming("_logits", _call, op, _logits(2, 3), _logits(3, 2))
    raises_naming("_logits", _call, op, _logits(6), _logits(2, 3))


@pytest.mark.parametrize("op", ALL_OPS)
def test_degenerate_logits_shapes(op):
    raises_naming("student_logits", _call, op, torch.tensor(1.0), _logits(3))  # 0-d: no vocabulary dimension
    raises_naming("student_logits", _call, op, torch.zeros(3, 0), _logits(3))  # V = 0
    raises_naming("teacher_logits", _call, op, _logits(3), torch.zeros(3, 0))


@pytest.mark.parametrize("op", ALL_OPS)
def test_device_mismatch(op):
    msg = raises_naming("teacher_logits", _call, op, _logits(3), _logits(3, device="meta"))
    assert "device" in msg or "meta" in msg


@pytest.mark.parametrize("op", ALL_OPS)
def test_teacher_requiring_grad_is_an_error(op):
    teacher = _logits(3).requires_grad_(True)
    msg = raises_naming("teacher_logits", _call, op, _logits(3).requires_grad_(True), teacher)
    assert "torch.no_grad" in msg


# ----------------------------------------------------------------------------------------------------------
# Scalars: temperature, reduction, backend, beta, alpha, kd_ratio, clip_eps, num_tokens, ignore_index
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, -math.inf, "1.0", None, True])
def test_bad_temperature(op, temperature):
    raises_naming("temperature", _call, op, _logits(3), _logits(3), temperature=temperature)


@pytest.mark.parametrize("op", REDUCTION_OPS)
@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "batchmean"])
def test_unknown_reduction(op, reduction):
    raises_naming("reduction", _call, op, _logits(3), _logits(3), reduction=reduction)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", ["foo", "Torch", "", None, 3])
def test_unknown_backend(op, backend):
    raises_naming("backend", _call, op, _logits(3), _logits(3), backend=backend)


@pytest.mark.parametrize("op", ALL_OPS)
def test_backend_unavailable_for_the_device(op):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda backend may run")
    raises_naming("backend", _call, op, _logits(3), _logits(3), backend="cuda")


@pytest.mark.parametrize("beta", [-0.1, 1.1, math.nan, math.inf, "0.5", None])
def test_bad_beta(beta):
    raises_naming("beta", loss.jsd, _logits(3), _logits(3), beta=beta, backend="torch")


@pytest.mark.parametrize("op", ["token_stats", "sample_mixture"])
@pytest.mark.parametrize("alpha", [1.0, 1.5, -0.1, -1e-9, math.nan, math.inf, None, "0.2"])
def test_bad_alpha(op, alpha):
    raises_naming("alpha", _call, op, _logits(3), _logits(3), alpha=alpha)


@pytest.mark.parametrize("kd_ratio", [-0.1, 1.0001, math.nan, None, "0.5"])
def test_bad_kd_ratio(kd_ratio):
    raises_naming("kd_ratio", _call, "pt_loss", _logits(3), _logits(3), kd_ratio=kd_ratio)


@pytest.mark.parametrize("clip_eps", [0.0, -0.2, math.nan, None])
def test_bad_clip_eps(clip_eps):
    raises_naming("clip_eps", _call, "minillm_loss", _logits(3), _logits(3), clip_eps=clip_eps)


@pytest.mark.parametrize("op", ["minillm_loss", "pt_loss"])
@pytest.mark.parametrize("num_tokens", [0, -3, 0.0, -1e-3, math.nan, "12", torch.tensor([1.0, 2.0])])
def test_bad_num_tokens(op, num_tokens):
    raises_naming("num_tokens", _call, op, _logits(3), _logits(3), num_tokens=num_tokens)


@pytest.mark.parametrize("op", ["minillm_loss", "pt_loss"])
@pytest.mark.parametrize("num_tokens", [torch.tensor(0.0), torch.tensor(-4.0), torch.tensor([0])])
def test_bad_num_tokens_tensor(op, num_tokens):
    """num_tokens <= 0 is an error whether it is passed as a number or as a one-element tensor (the global
    count under data parallelism is typically an all-reduced tensor); dividing by it gives inf/NaN losses."""
    raises_naming("num_tokens", _call, op, _logits(3), _logits(3), num_tokens=num_tokens)


@pytest.mark.parametrize("ignore_index", [-100.0, "x", None, True])
def test_bad_ignore_index(ignore_index):
    raises_naming("ignore_index", _call, "pt_loss", _logits(3), _logits(3), ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", MASKED_OPS)
def test_bad_mask(op):
    raises_naming("mask", _call, op, _logits(3), _logits(3), mask=torch.ones(4, dtype=torch.bool))
    raises_naming("mask", _call, op, _logits(2, 3), _logits(2, 3), mask=torch.ones(6, dtype=torch.bool))
    raises_naming("mask", _call, op, _logits(2, 3), _logits(2, 3), mask=torch.ones(2, 3, V, dtype=torch.bool))
    raises_naming("mask", _call, op, _logits(3), _logits(3), mask=[True, True, False])
    raises_naming("mask", _call, op, _logits(3), _logits(3), mask=torch.ones(3, dtype=torch.bool, device="meta"))


# ----------------------------------------------------------------------------------------------------------
# Tokens, labels and per-position tensors
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["token_stats", "minillm_loss"])
def test_bad_tokens(op):
    z, u = _logits(3), _logits(3)
    raises_naming("tokens", _call, op, z, u, tokens=torch.tensor([0, V, 1]))          # == V: out of range
    raises_naming("tokens", _call, op, z, u, tokens=torch.tensor([0, -1, 1]))         # negative
    raises_naming("tokens", _call, op, z, u, tokens=torch.tensor([0.0, 1.0, 2.0]))    # float ids
    raises_naming("tokens", _call, op, z, u, tokens=torch.tensor([True, False, True]))
    raises_naming("tokens", _call, op, z, u, tokens=torch.tensor([0, 1]))             # shape
    raises_naming("tokens", _call, op, z, u, tokens=[0, 1, 2])                        # not a tensor
    raises_naming("tokens", _call, op, z, u, tokens=torch.zeros(3, dtype=torch.long, device="meta"))
    # Padded vocabularies: the vocabulary is min(V_s, V_t).
    raises_naming("tokens", _call, op, _logits(3, v=V + 5), u, tokens=torch.tensor([0, V, 1]))


@pytest.mark.parametrize("op", ["token_stats", "minillm_loss"])
def test_out_of_range_tokens_at_masked_positions_are_fine(op):
    mask = torch.tensor([True, False, True])
    _call(op, _logits(3), _logits(3), tokens=torch.tensor([0, 10 ** 6, 1]), mask=mask)
    _call(op, _logits(3), _logits(3), tokens=torch.tensor([0, -100, 1]), mask=mask)


def test_bad_labels():
    z, u = _logits(3), _logits(3)
    raises_naming("labels", _call, "pt_loss", z, u, labels=torch.tensor([0, V, -100]))
    raises_naming("labels", _call, "pt_loss", z, u, labels=torch.tensor([0, -1, 2]))   # only ignore_index may be < 0
    raises_naming("labels", _call, "pt_loss", z, u, labels=torch.tensor([0.0, 1.0, 2.0]))
    raises_naming("labels", _call, "pt_loss", z, u, labels=torch.tensor([0, 1]))
    raises_naming("labels", _call, "pt_loss", z, u, labels=torch.zeros(3, dtype=torch.long, device="meta"))
    _call("pt_loss", z, u, labels=torch.tensor([0, -100, 2]))  # ignore_index is fine


@pytest.mark.parametrize("name", ["advantages", "old_logprobs", "importance_weights"])
def test_bad_per_position_inputs(name):
    z, u = _logits(3), _logits(3)
    raises_naming(name, _call, "minillm_loss", z, u, **{name: torch.zeros(4)})
    raises_naming(name, _call, "minillm_loss", z, u, **{name: torch.zeros(3, 1)})
    raises_naming(name, _call, "minillm_loss", z, u, **{name: torch.zeros(3, dtype=torch.long)})
    raises_naming(name, _call, "minillm_loss", z, u, **{name: [0.0, 0.0, 0.0]})
    raises_naming(name, _call, "minillm_loss", z, u, **{name: torch.zeros(3, device="meta")})


def test_bad_generator():
    raises_naming("generator", sampling.sample_mixture, _logits(3), _logits(3), generator=1234, backend="torch")
    raises_naming("generator", sampling.sample_mixture, _logits(3), _logits(3), generator="seed", backend="torch")


# ----------------------------------------------------------------------------------------------------------
# rl
# ----------------------------------------------------------------------------------------------------------

def test_bad_advantages_inputs():
    r, m = torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    raises_naming("rewards", rl.advantages, torch.randn(10), torch.ones(10, dtype=torch.bool))
    raises_naming("rewards", rl.advantages, torch.randn(2, 5, 1), m)
    raises_naming("rewards", rl.advantages, torch.ones(2, 5, dtype=torch.long), m)
    raises_naming("rewards", rl.advantages, [[0.0] * 5] * 2, m)
    raises_naming("mask", rl.advantages, r, torch.ones(2, 6, dtype=torch.bool))
    raises_naming("mask", rl.advantages, r, [[1] * 5] * 2)
    for gamma in (-0.1, 1.5, math.nan, None):
        raises_naming("gamma", rl.advantages, r, m, gamma=gamma)


def test_bad_rewards_inputs():
    lp, lq = torch.randn(2, 5), torch.randn(2, 5)
    raises_naming("old_logprobs", rl.rewards, lp, torch.randn(2, 4))
    raises_naming("teacher_logprobs", rl.rewards, [0.0], lq)
    raises_naming("mask", rl.rewards, lp, lq, torch.ones(3, 5, dtype=torch.bool))
    for scale in (0, -0.5, math.nan, None):
        raises_naming("scale", rl.rewards, lp, lq, scale=scale)
    for clip in (0, -1.0, math.nan):
        raises_naming("clip", rl.rewards, lp, lq, clip=clip)

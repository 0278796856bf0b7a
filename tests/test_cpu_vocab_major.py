"""The CPU kernels on vocabulary-major float32 logits (csrc/cpu/vocab_major_kernels.cpp): a [V, ld] buffer seen as
[N, V] through a transpose, as the fused-linear ops form their CPU blocks.

row_stats must agree with the pure-PyTorch backend and with the row-major kernel (to rounding: the sums run in a
different order); logits_grad must equal the row-major kernel's gradient bit for bit (the same arithmetic per
element), come back vocabulary-major, and write in place. Odd row counts (partial tiles of 16 rows), a leading
dimension larger than N, padded student vocabularies, -inf entries, empty rows, logits ~1e4, temperatures, tokens
given or absent, inactive rows and every coefficient pattern.
"""
from __future__ import annotations

import pytest
import torch

from minillm_fast import _extension
from minillm_fast.backends import torch_backend as ref

_LIB = _extension.load("cpu")
pytestmark = pytest.mark.skipif(_LIB is None, reason="the CPU extension could not be built")
ops = torch.ops.minillm_fast
NAN_FILL = 12345.0  # NaN compared as a value: torch.equal is False on NaN


def vocab_major(x: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """x's values in a [V, N + pad] buffer (NaN in the padding columns, which no kernel may read), seen as [N, V]."""
    n, v = x.shape
    buf = torch.full((v, n + pad), float("nan"))
    buf[:, :n] = x.t()
    out = buf[:, :n].t()
    assert n <= 1 or (out.stride(0) == 1 and not out.is_contiguous())
    return out


def special_logits(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3.0
    x[0, ::5] = float("-inf")  # masked entries
    if n > 2:
        x[2] = x[2] * 3000.0  # |z| ~ 1e4: nearly one-hot
    if n > 9:
        x[9, 1] = 60.0  # one dominant entry
    return x


def coefficients(n: int, seed: int) -> torch.Tensor:
    """Random (c_kl, c_q, c_p, c_y) with inactive rows, rows without c_kl, without c_p, with c_p only."""
    coef = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    coef[1::4] = 0.0
    coef[2::5, 0] = 0.0
    coef[3::3, 2] = 0.0
    if n > 6:
        coef[6] = torch.tensor([0.0, 0.0, 0.7, 0.0])
    return coef


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.equal(got.nan_to_num(NAN_FILL), want.nan_to_num(NAN_FILL))


@pytest.mark.parametrize("n", [1, 5, 8, 16, 17, 37])
@pytest.mark.parametrize("vs,vt", [(33, 33), (4099, 4096), (1000, 1003)])
@pytest.mark.parametrize("pad", [0, 3])
def test_matches_row_major_kernels(n, vs, vt, pad):
    z, u = special_logits(n, vs, 1), special_logits(n, vt, 2)
    if n > 4:
        z[3] = float("-inf")  # an empty student row
        u[4] = float("-inf")  # an empty teacher row
    zv, uv = vocab_major(z, pad), vocab_major(u, pad)
    tokens = torch.randint(0, min(vs, vt), (n,), generator=torch.Generator().manual_seed(3))
    coef = coefficients(n, 4)
    for toks in (tokens, None):
        for inv_temp in (1.0, 1 / 1.7):
            what = f"n={n} V=({vs},{vt}) pad={pad} tokens={toks is not None} inv_temp={inv_temp:.3f}"
            stats = ops.row_stats(zv, uv, toks, inv_temp)
            row_major = ops.row_stats(z, u, toks, inv_temp)
            want = ref.row_stats(z, u, toks, inv_temp)
            assert torch.equal(stats.isnan(), want.isnan()), what
            assert torch.equal(stats[torch.isinf(want)], want[torch.isinf(want)]), what
            finite = torch.isfinite(want)
            scale = max(1.0, float(z.abs().nan_to_num(0, 0, 0).max()), float(u.abs().nan_to_num(0, 0, 0).max()))
            torch.testing.assert_close(stats[finite], want[finite], rtol=2e-5, atol=2e-6 * scale * inv_temp,
                                       msg=lambda m: f"row_stats vs reference, {what}: {m}")
            torch.testing.assert_close(stats[finite], row_major[finite], rtol=2e-5, atol=2e-6 * scale * inv_temp,
                                       msg=lambda m: f"row_stats vs row-major kernel, {what}: {m}")

            # logits_grad from the same stats: bit-identical to the row-major kernel, vocabulary-major
            want_grad = ops.logits_grad(z, u, toks, row_major, coef, inv_temp)
            grad = ops.logits_grad(zv, uv, toks, row_major, coef, inv_temp)
            assert grad.shape == (n, vs) and grad.dtype == torch.float32, what
            assert grad.stride(0) == 1 or n == 1, f"{what}: dz strides {grad.stride()}"
            assert same(grad, want_grad), f"{what}: logits_grad differs from the row-major kernel's"
            assert torch.all(grad[1::4] == 0) and torch.all(grad[:, min(vs, vt):] == 0), what

            in_place = zv.clone(memory_format=torch.preserve_format)
            if n > 1:
                in_place = vocab_major(z, pad)
            ops.logits_grad_(in_place, uv, toks, row_major, coef, inv_temp)
            assert same(in_place, want_grad), f"{what}: logits_grad_ differs from the row-major kernel's"


def test_mixed_layouts():
    """Vocabulary-major z with row-major u: row_stats and logits_grad copy to unit stride; logits_grad_ (which must
    write z in its own layout) reads a vocabulary-major copy of u."""
    n, v = 19, 2050
    z, u = special_logits(n, v, 5), special_logits(n, v, 6)
    zv = vocab_major(z, 2)
    tokens = torch.arange(n) * 7
    stats = ops.row_stats(z, u, tokens, 0.8)
    torch.testing.assert_close(ops.row_stats(zv, u, tokens, 0.8), stats, rtol=2e-5, atol=1e-4, equal_nan=True)
    coef = coefficients(n, 7)
    want = ops.logits_grad(z, u, tokens, stats, coef, 0.8)
    got = ops.logits_grad(zv, u, tokens, stats, coef, 0.8)
    assert got.is_contiguous() and same(got, want)
    ops.logits_grad_(zv, u, tokens, stats, coef, 0.8)
    assert zv.stride(0) == 1 and same(zv, want)


def test_a_transposed_row_set_that_is_not_vocabulary_major_is_refused_in_place():
    z = torch.randn(6, 10)[:, ::2]  # column stride 2, row stride 10: neither layout
    u = torch.randn(6, 5)
    stats = ops.row_stats(z, u, None, 1.0)
    with pytest.raises(RuntimeError, match="logits_grad_"):
        ops.logits_grad_(z, u, None, stats, torch.ones(6, 4), 1.0)


def test_many_rows_and_threads():
    """More tiles than threads, a partial last tile, a vocabulary of several tasks' chunks."""
    n, v = 200, 9001
    z, u = special_logits(n, v, 8), special_logits(n, v, 9)
    zv, uv = vocab_major(z), vocab_major(u)
    stats = ops.row_stats(zv, uv, None, 1.0)
    want = ref.row_stats(z, u, None, 1.0)
    finite = torch.isfinite(want)
    torch.testing.assert_close(stats[finite], want[finite], rtol=2e-5, atol=2e-2)
    coef = coefficients(n, 10)
    assert same(ops.logits_grad(zv, uv, None, stats, coef, 1.0), ops.logits_grad(z, u, None, stats, coef, 1.0))


@pytest.mark.parametrize("n", [1, 6])
def test_fake_implementation_has_the_real_layout(n):
    """torch.compile traces with the ops' fake implementations: logits_grad's must give dz the real strides."""
    z, u = special_logits(n, 40, 11), special_logits(n, 40, 12)
    zv, uv = vocab_major(z), vocab_major(u, 1)
    stats = ops.row_stats(z, u, None, 1.0)
    coef = coefficients(n, 13)
    for args in ((zv, uv), (zv, u), (z, uv), (z, u)):
        torch.library.opcheck(ops.logits_grad, (*args, None, stats, coef, 1.0), test_utils="test_faketensor")
        torch.library.opcheck(ops.row_stats, (*args, None, 1.0), test_utils="test_faketensor")

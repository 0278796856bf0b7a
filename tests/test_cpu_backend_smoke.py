"""Smoke tests of the C++ CPU backend (csrc/cpu) against the chunked pure-PyTorch backend, primitive by primitive.

Covers every dtype pair, odd and padded vocabularies, -inf entries, empty rows, logits ~1e4, a non-unit row
stride, temperature != 1, tokens given or absent, rows with zero coefficients, and sampling.
"""
from __future__ import annotations

import pytest
import torch

from minillm_fast import _extension
from minillm_fast.backends import NUM_STATS
from minillm_fast.backends import torch_backend as ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LIB = _extension.load("cpu")
pytestmark = pytest.mark.skipif(_LIB is None, reason="the CPU extension could not be built")
ops = torch.ops.minillm_fast


def _logits(n, v, dtype, *, scale=3.0, seed=0, row_stride_pad=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v + row_stride_pad, generator=g) * scale
    x = x.to(dtype)
    return x[:, :v] if row_stride_pad else x


def _assert_close(got, want, rtol, atol, what):
    assert got.shape == want.shape, what
    assert got.dtype == want.dtype, what
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN pattern differs"
    inf_w = torch.isinf(want)
    assert torch.equal(got[inf_w], want[inf_w]), f"{what}: inf entries differ"
    ok = ~(nan_w | inf_w)
    torch.testing.assert_close(got[ok].double(), want[ok].double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_stats(z, u, tokens, inv_temp, what):
    got = ops.row_stats(z, u, tokens, inv_temp)
    want = ref.row_stats(z, u, tokens, inv_temp)
    scale = max(1.0, float(z.float().abs().nan_to_num(0, 0, 0).max()), float(u.float().abs().nan_to_num(0, 0, 0).max()))
    _assert_close(got, want, 2e-5, 2e-6 * scale * inv_temp, what)
    return got


def _grad_tol(dtype):
    return {torch.float32: (2e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-4), torch.float16: (2e-3, 1e-5)}[dtype]


@pytest.mark.parametrize("zdt", DTYPES)
@pytest.mark.parametrize("udt", DTYPES)
@pytest.mark.parametrize("vs,vt", [(1, 1), (7, 7), (33, 40), (32003, 32003), (2100, 2048)])
def test_row_stats_and_grad(zdt, udt, vs, vt):
    n = 5
    z = _logits(n, vs, zdt, seed=1)
    u = _logits(n, vt, udt, seed=2)
    v = min(vs, vt)
    tokens = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    for toks in (tokens, None):
        for inv_temp in (1.0, 1 / 1.7):
            stats = _check_stats(z, u, toks, inv_temp, f"row_stats {zdt} {udt} {vs} {vt} {inv_temp}")
            coef = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.5, 0.7], [0.0, 0.0, 0.0, 0.0],
                                 [0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
            got = ops.logits_grad(z, u, toks, stats, coef, inv_temp)
            want = ref.logits_grad(z, u, toks, stats, coef, inv_temp)
            rtol, atol = _grad_tol(zdt)
            _assert_close(got.float(), want.float(), rtol, atol, f"logits_grad {zdt} {udt} {vs} {vt}")
            assert got.dtype == zdt and got.is_contiguous() and got.shape == z.shape
            assert torch.all(got[2] == 0) and torch.all(got[:, v:] == 0)


@pytest.mark.parametrize("zdt", DTYPES)
@pytest.mark.parametrize("udt", DTYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd(zdt, udt, beta):
    n, vs, vt = 4, 3001, 2999
    z = _logits(n, vs, zdt, seed=4)
    u = _logits(n, vt, udt, seed=5)
    u[1, :100] = float("-inf")
    z[2, 50:70] = float("-inf")
    for inv_temp in (1.0, 0.5):
        stats = ref.row_stats(z, u, None, inv_temp)
        got = ops.jsd_rows(z, u, stats, beta, inv_temp)
        want = ref.jsd_rows(z, u, stats, beta, inv_temp)
        _assert_close(got, want, 2e-5, 1e-6, f"jsd_rows {zdt} {udt} {beta}")
        coef = torch.tensor([0.5, 0.0, -1.0, 2.0])
        gg = ops.jsd_grad(z, u, stats, got, coef, beta, inv_temp)
        gw = ref.jsd_grad(z, u, stats, want, coef, beta, inv_temp)
        rtol, atol = _grad_tol(zdt)
        _assert_close(gg.float(), gw.float(), rtol, atol, f"jsd_grad {zdt} {udt} {beta}")
        assert torch.all(gg[1] == 0) and torch.all(gg[:, 2999:] == 0)


def test_inf_entries_empty_rows_and_extremes():
    n, v = 6, 5003
    z = _logits(n, v, torch.float32, seed=6)
    u = _logits(n, v, torch.float32, seed=7)
    z[0, ::3] = float("-inf")            # masked student vocabulary
    u[0, ::3] = float("-inf")
    u[1, 1::2] = float("-inf")            # teacher -inf where the student has mass: KL = +inf
    z[2] = float("-inf")                  # empty student row
    u[3] = float("-inf")                  # empty teacher row
    z[4] = z[4] * 3000.0                  # |z| ~ 1e4: nearly one-hot
    u[4] = u[4] * 3000.0
    z[5, 17] = 40.0                       # one dominant entry
    tokens = torch.tensor([1, 0, 2, 3, 4, 5])
    for inv_temp in (1.0, 0.25):
        stats = _check_stats(z, u, tokens, inv_temp, "row_stats specials")
        # the row near |z| ~ 1e4 agrees tightly (centred logits are exact in both backends)
        want4 = ref.row_stats(z[4:5], u[4:5], tokens[4:5], inv_temp)[0]
        torch.testing.assert_close(stats[4], want4, rtol=1e-6, atol=1e-6)
        assert stats[2, 0] == float("-inf") and stats[2, 1] == float("-inf")
        assert stats[3, 2] == float("-inf") and stats[3, 3] == float("-inf")
        coef = torch.tensor([[1.0, 0.1, 0.2, 0.3]] * n)
        coef[2] = 0.0
        coef[3] = 0.0
        got = ops.logits_grad(z, u, tokens, stats, coef, inv_temp)
        want = ref.logits_grad(z, u, tokens, stats, coef, inv_temp)
        _assert_close(got, want, 1e-4, 1e-6, "logits_grad specials")
    # extreme logits: the loss statistics keep float32 precision against a float64 computation
    zz, uu = z[4:5].double(), u[4:5].double()
    lq = torch.log_softmax(zz, 1)
    lp = torch.log_softmax(uu, 1)
    kl = (lq.exp() * (lq - lp)).sum()
    st = ops.row_stats(z[4:5], u[4:5], None, 1.0)[0]
    kl_cpu = st[4].double() - st[1].double() + st[3].double()  # KL(q||p) = E_q[d] - log s_q + log s_p
    assert abs(kl_cpu - kl) <= 2e-5 * abs(kl) + 1e-3, (kl_cpu, kl)


def test_row_stride_and_large_offsets_layout():
    z = _logits(7, 1000, torch.bfloat16, seed=8, row_stride_pad=37)   # row stride 1037
    u = _logits(14, 1200, torch.float32, seed=9)[::2]                  # row stride 2400
    assert z.stride(0) == 1037 and u.stride(0) == 2400
    tokens = torch.arange(7) * 100
    stats = _check_stats(z, u, tokens, 1.3, "row_stats strided")
    coef = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    got = ops.logits_grad(z, u, tokens, stats, coef, 1.3)
    want = ref.logits_grad(z, u, tokens, stats, coef, 1.3)
    _assert_close(got.float(), want.float(), *_grad_tol(torch.bfloat16), "logits_grad strided")
    # a transposed (non-unit last stride) input still works (copied by the binding)
    zt = _logits(1000, 7, torch.float32, seed=10).t()
    _check_stats(zt, u[:, :1000], None, 1.0, "row_stats transposed")


def test_small_batch_split_rows():
    # fewer rows than threads: rows are split into column segments and merged (row_state.h merge rule)
    z = _logits(1, 200003, torch.float32, seed=11)
    u = _logits(1, 200003, torch.float16, seed=12)
    z[0, 150000:] += 8.0  # the max arrives late: the merge must rescale the early segments
    _check_stats(z, u, torch.tensor([150001]), 1.0, "row_stats split")
    stats = ref.row_stats(z, u, None, 0.7)
    _assert_close(ops.jsd_rows(z, u, stats, 0.3, 0.7), ref.jsd_rows(z, u, stats, 0.3, 0.7), 2e-5, 1e-6, "jsd split")


@pytest.mark.parametrize("zdt", DTYPES)
@pytest.mark.parametrize("udt", DTYPES)
def test_sample_rows(zdt, udt):
    n, v = 64, 3001
    z = _logits(n, v + 5, zdt, seed=13)
    u = _logits(n, v, udt, seed=14)
    z[3] = float("-inf")
    u[5, :-1] = float("-inf")           # teacher: one entry only
    z[7, ::2] = float("-inf")
    g = torch.Generator().manual_seed(15)
    use_teacher = torch.rand(n, generator=g) < 0.5
    use_teacher[3] = False
    use_teacher[5] = True
    uniform = torch.rand(n, generator=g, dtype=torch.float64)
    uniform[0] = 0.0
    uniform[1] = 1.0 - 2.0 ** -53
    for inv_temp in (1.0, 0.8):
        got = ops.sample_rows(z, u, use_teacher, uniform, inv_temp)
        want = ref.sample_rows(z, u, use_teacher, uniform, inv_temp)
        assert got.dtype == torch.int64
        assert got[3] == -1 and got[5] == v - 1
        # exact agreement except where the uniform sits within rounding of a CDF step
        x = torch.where(use_teacher[:, None], u[:, :v].float(), z[:, :v].float()).double() * inv_temp
        p = torch.softmax(x, 1)
        cdf = p.cumsum(1)
        for r in range(n):
            if got[r] == want[r]:
                continue
            i = int(got[r])
            assert p[r, i] > 0
            lo = cdf[r, i - 1] if i > 0 else 0.0
            assert lo - 1e-5 <= uniform[r] <= cdf[r, i] + 1e-5, (r, i, int(want[r]))


def test_sample_distribution():
    # a single row drawn many times follows its softmax
    v = 50
    z = _logits(1, v, torch.float32, seed=16, scale=1.0).expand(200000, v)
    u = torch.zeros(1, v).expand(200000, v)
    uniform = torch.rand(200000, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    got = ops.sample_rows(z, u, torch.zeros(200000, dtype=torch.bool), uniform, 1.0)
    freq = torch.bincount(got, minlength=v).double() / 200000
    p = torch.softmax(z[0].double(), 0)
    assert (freq - p).abs().max() < 5e-3


def test_exp_accuracy_through_logits_grad():
    # with M_Q = LOGS_Q = 0 and only c_q set, logits_grad returns exp(z) itself
    x = torch.linspace(-110.0, 88.0, 1_000_003, dtype=torch.float32)[None]
    stats = torch.zeros(1, NUM_STATS)
    coef = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    got = ops.logits_grad(x, x, None, stats, coef, 1.0)[0].double()
    want = torch.exp(x[0].double())
    normal = want > 1.2e-38
    rel = ((got - want).abs() / want)[normal]
    assert float(rel.max()) < 2.5e-7
    assert torch.all(got[want < 1e-46] == 0)


def test_input_errors():
    z = torch.zeros(3, 5)
    with pytest.raises(RuntimeError, match="tokens"):
        ops.row_stats(z, z, torch.tensor([0, 5, 1]), 1.0)
    with pytest.raises(RuntimeError, match="rows"):
        ops.row_stats(z, torch.zeros(2, 5), None, 1.0)
    with pytest.raises(RuntimeError, match="dtype|float32"):
        ops.row_stats(z.double(), z, None, 1.0)
    with pytest.raises(RuntimeError, match="coef"):
        ops.logits_grad(z, z, None, torch.zeros(3, NUM_STATS), torch.zeros(3, 3), 1.0)


def test_online_rescale_cross_terms():
    # maxima that grow in later blocks, for q and p at different places: exercises the rescale rule of the cross
    # sums a_q' = exp(-delta_q) (a_q - (delta_q - delta_p) s_q) (row_state.h), in one pass and in the row split
    v = 40000
    z = _logits(4, v, torch.float32, seed=20)
    u = _logits(4, v, torch.float32, seed=21)
    z[0, 20000:] += 10.0
    u[1, 5000:6000] += 12.0
    z[1, 30000:] += 6.0
    u[2, :4096] = -1e4           # p essentially empty in the first blocks, q not
    z[3, :2048] = float("-inf")  # q empty in the first block, p not
    u[3, 35000:] += 9.0
    for zz, uu in ((z, u), (z.bfloat16(), u.half())):
        _check_stats(zz, uu, None, 1.0, "row_stats rescale")
        _check_stats(zz, uu, None, 0.6, "row_stats rescale tau")
        for r in range(4):
            _check_stats(zz[r:r + 1], uu[r:r + 1], None, 1.0, f"row_stats rescale split row {r}")


@pytest.mark.skipif(not __import__("os").environ.get("MINILLM_FAST_BIG_TESTS"),
                    reason="needs ~5 GB of memory; set MINILLM_FAST_BIG_TESTS=1")
def test_offsets_beyond_2_pow_31():
    # N * V > 2^31 elements: inputs are stride-0 expansions of one row (no memory), the bf16 gradient is real
    v = 128256
    n = (1 << 31) // v + 3
    g = torch.Generator().manual_seed(30)
    z_row = (torch.randn(1, v, generator=g) * 3).bfloat16()
    u_row = (torch.randn(1, v, generator=g) * 3).bfloat16()
    z, u = z_row.expand(n, v), u_row.expand(n, v)
    tokens = torch.full((n,), 7)
    tokens[-1] = v - 1
    stats = ops.row_stats(z, u, tokens, 1.0)
    want = ref.row_stats(z_row, u_row, tokens[-1:], 1.0)
    _assert_close(stats[-1:], want, 2e-5, 1e-4, "row_stats last row")
    coef = torch.zeros(n, 4)
    coef[-1] = torch.tensor([0.5, 0.1, 0.2, -1.0])
    coef[0] = torch.tensor([0.5, 0.1, 0.2, -1.0])
    dz = ops.logits_grad(z, u, tokens, stats, coef, 1.0)
    assert n * v > 2 ** 31 and dz.shape == (n, v)
    want_last = ref.logits_grad(z_row, u_row, tokens[-1:], stats[-1:], coef[-1:], 1.0)
    _assert_close(dz[-1:].float(), want_last.float(), *_grad_tol(torch.bfloat16), "logits_grad last row")
    assert dz[-1, v - 1] != 0 and bool((dz[1:-1] == 0).all())
    del dz
    # a row that starts beyond element 2^31 of its storage (row stride > 2^31 / 2)
    big = torch.empty(3 * (1 << 30) + v, dtype=torch.float32)  # virtual: only the touched rows get pages
    zz = big.as_strided((2, v), ((1 << 31) + 5, 1))
    zz.copy_(torch.randn(2, v, generator=g))
    uu = torch.randn(2, v, generator=g)
    _check_stats(zz, uu, None, 1.0, "row_stats row offset > 2^31")


def test_advise_huge_pages_keeps_values():
    """advise_huge_pages_ (the fused-linear ops' CPU buffers) is only a hint: values and shape are untouched, small
    and odd-sized tensors included."""
    for numel in (3, (8 << 20) // 4 + 5):
        x = torch.arange(numel, dtype=torch.float32)
        ops.advise_huge_pages_(x)
        assert torch.equal(x, torch.arange(numel, dtype=torch.float32))

"""The Triton backend against the PyTorch backend, primitive by primitive. Without a GPU it runs the kernels under
Triton's interpreter on CPU tensors (small shapes); on a CUDA machine the same tests run the compiled kernels."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (imported)

pytest.importorskip("triton")

from minillm_fast.backends import NUM_STATS  # noqa: E402
from minillm_fast.backends import torch_backend as ref  # noqa: E402
from minillm_fast.backends import triton_backend as tri  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from minillm_fast.kernels.online_softmax import merge_states, online_update  # noqa: E402  (loaded by tri)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(params=["one_block", "many_blocks"])
def blocks(request, monkeypatch):
    """Run each test with the configured blocks and with tiny ones, so that rows span many blocks."""
    if request.param == "many_blocks":
        monkeypatch.setattr(tri, "CONFIG", {k: (32, 1) for k in tri.CONFIG})
    return request.param


def _logits(n, v, dtype, scale=3.0, seed=0, row_pad=0):
    """Random logits [n, v] in ``dtype``; with row_pad > 0 a view whose row stride is v + row_pad."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v + row_pad, generator=g) * scale).to(dtype)
    return x[:, :v].to(DEVICE) if row_pad else x.to(DEVICE)


def _masks(shape, seed, frac):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < frac).to(DEVICE)


def _close(a, b, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def _grad_close(a, b):
    """Equal up to float32 rounding before the cast to the gradient's dtype (one unit in its last place)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    eps = torch.finfo(a.dtype).eps if a.dtype != torch.float32 else 1e-5
    scale = b.float().abs().amax().item() if b.numel() else 0.0
    _close(a, b, rtol=eps, atol=eps * scale + 1e-7)


CASES = [  # (n, v_s, v_t, dtype_z, dtype_u, temperature, row_pad)
    (3, 1, 1, torch.float32, torch.float32, 1.0, 0),
    (4, 7, 7, torch.bfloat16, torch.float32, 1.0, 3),
    (5, 33, 40, torch.float16, torch.bfloat16, 0.7, 0),
    (6, 1031, 1027, torch.float32, torch.float16, 2.0, 5),
    (4, 200, 200, torch.bfloat16, torch.bfloat16, 1.0, 0),
]


def _inputs(case, seed, inf=True):
    n, vs, vt, dz, du, tau, pad = case
    z = _logits(n, vs, dz, seed=seed, row_pad=pad)
    u = _logits(n, vt, du, seed=seed + 1)
    if inf and min(vs, vt) > 2:
        # A vocabulary mask shared by both rows (0 log 0 = 0), plus entries masked in the student only (finite
        # reverse KL, infinite forward KL), a column masked everywhere and one empty student row.
        v = min(vs, vt)
        shared = _masks((n, v), seed + 2, 0.15)
        shared[:, 0] = True
        z, u = z.clone(), u.clone()
        z[:, :v][shared | _masks((n, v), seed + 3, 0.15)] = -math.inf
        u[:, :v][shared] = -math.inf
        z[n - 1] = -math.inf
    g = torch.Generator().manual_seed(seed + 4)
    tokens = torch.randint(0, min(vs, vt), (n,), generator=g).to(DEVICE)
    return z, u, tokens, 1.0 / tau


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_tokens", [False, True])
def test_row_stats(case, with_tokens, blocks):
    z, u, tokens, it = _inputs(case, seed=1)
    tokens = tokens if with_tokens else None
    _close(tri.row_stats(z, u, tokens, it), ref.row_stats(z, u, tokens, it))


def test_row_stats_extreme_logits(blocks):
    n, v = 4, 300
    z = torch.randn(n, v) * 5
    z[:, 7] = 1e4
    z[1, 250] = 1e4 - 3.0
    z[2] = z[2] - 2e4
    u = torch.randn(n, v) * 5 + 1e4
    u[:, 11] = 2e4
    z, u = z.to(DEVICE), u.to(DEVICE)
    tokens = torch.tensor([7, 250, 3, 11], device=DEVICE)
    got, want = tri.row_stats(z, u, tokens, 1.0), ref.row_stats(z, u, tokens, 1.0)
    _close(got, want, rtol=1e-6, atol=1e-5)
    assert torch.isfinite(got).all()


def test_row_stats_online_rescale_with_inf_teacher(blocks):
    # The student has mass where the teacher is -inf only before the max grows by ~200: that mass underflows
    # to 0 in the final normalisation, so E_q[d] must stay finite (no inf * 0 = NaN from the rescale).
    v = 100
    z = torch.zeros(1, v)
    z[0, 90:] = 200.0
    u = torch.zeros(1, v)
    u[0, :10] = -math.inf
    z, u = z.to(DEVICE), u.to(DEVICE)
    got, want = tri.row_stats(z, u, None, 1.0), ref.row_stats(z, u, None, 1.0)
    assert torch.isfinite(got).all()
    _close(got, want)


COEF_ROWS = torch.tensor([[1.0, 0.0, 0.0, 0.0],    # reverse-KL row
                          [0.0, 0.5, -0.5, 0.0],   # forward-KL row (teacher read)
                          [0.0, 0.0, 0.0, 0.0],    # inactive: zeros, logits not read
                          [0.3, -0.2, 0.0, 0.2],   # KL + policy-gradient row
                          [0.0, 0.7, 0.0, -0.7],   # cross-entropy row: teacher not read
                          [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_tokens", [False, True])
def test_logits_grad(case, with_tokens, blocks):
    z, u, tokens, it = _inputs(case, seed=2)
    tokens = tokens if with_tokens else None
    stats = ref.row_stats(z, u, tokens, it)
    coef = COEF_ROWS[torch.arange(z.shape[0]) % len(COEF_ROWS)].to(DEVICE)
    coef[-1] = 0.0  # the empty student row is masked
    got = tri.logits_grad(z, u, tokens, stats, coef, it)
    want = ref.logits_grad(z, u, tokens, stats, coef, it)
    _grad_close(got, want)
    assert torch.isfinite(got.float()).all()
    inactive = (coef == 0).all(1)
    assert (got[inactive] == 0).all()
    assert (got[:, min(z.shape[1], u.shape[1]):] == 0).all()


def test_logits_grad_zero_rows_do_not_read_logits(blocks):
    z = torch.full((3, 50), math.nan, device=DEVICE)
    u = torch.full((3, 50), math.nan, device=DEVICE)
    stats = torch.zeros(3, NUM_STATS, device=DEVICE)
    coef = torch.zeros(3, 4, device=DEVICE)
    coef[1, 1] = 1.0
    z[1] = 0.0
    stats[1, 1] = math.log(50.0)
    got = tri.logits_grad(z, u, None, stats, coef, 1.0)  # u is NaN: only a row with c_kl or c_p may read it
    assert (got[0] == 0).all() and (got[2] == 0).all()
    _close(got[1], torch.full((50,), 1 / 50, device=DEVICE))
    with pytest.raises(ValueError, match="stats"):  # the kernels index stats rows by NUM_STATS
        tri.logits_grad(z, u, None, stats[:, :10], coef, 1.0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd(case, beta, blocks):
    z, u, tokens, it = _inputs(case, seed=3)
    stats = ref.row_stats(z, u, None, it)
    got, want = tri.jsd_rows(z, u, stats, beta, it), ref.jsd_rows(z, u, stats, beta, it)
    valid = torch.isfinite(stats[:, 1]) & torch.isfinite(stats[:, 3])
    _close(got[valid], want[valid], atol=1e-6)
    coef = torch.linspace(-1, 1, z.shape[0], device=DEVICE) * valid
    coef[0] = 0.0
    g_got = tri.jsd_grad(z, u, stats, want, coef, beta, it)
    g_want = ref.jsd_grad(z, u, stats, want, coef, beta, it)
    _grad_close(g_got, g_want)
    assert (g_got[coef == 0] == 0).all()


def _jsd_float64(z, u, beta):
    lq, lp = torch.log_softmax(z.double(), 1), torch.log_softmax(u.double(), 1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return beta * (lp.exp() * (lp - lm)).sum(1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(1)


def test_jsd_nearly_equal_rows():
    # p ~ q: JSD ~ 1e-6 is a sum of terms that cancel. g and h taken near q = p from expm1 / log1p: both backends
    # within ~1e-4 of it (triton lost 6% with -c - L, rounded at ~6e-8 absolute).
    z = _logits(3, 500, torch.float32, seed=5)
    u = z + 1e-3 * _logits(3, 500, torch.float32, seed=6)
    stats = ref.row_stats(z, u, None, 1.0)
    got, want = tri.jsd_rows(z, u, stats, 0.5, 1.0), ref.jsd_rows(z, u, stats, 0.5, 1.0)
    exact = _jsd_float64(z.cpu(), u.cpu(), 0.5)
    err_tri = (got[:, 0].cpu().double() - exact).abs().max().item()
    err_ref = (want[:, 0].cpu().double() - exact).abs().max().item()
    assert err_tri <= 4 * err_ref + 1e-4 * exact.abs().max().item(), (err_tri, err_ref)


@pytest.mark.parametrize("case", CASES)
def test_sample_rows_matches_reference(case, blocks):
    z, u, _, it = _inputs(case, seed=4)
    n = z.shape[0]
    g = torch.Generator().manual_seed(9)
    use_teacher = (torch.rand(n, generator=g) < 0.5).to(DEVICE)
    uniform = torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE)
    got = tri.sample_rows(z, u, use_teacher, uniform, it)
    want = ref.sample_rows(z, u, use_teacher, uniform, it)
    assert got.dtype == torch.int64
    assert (got == want).all(), (got, want)


def test_sample_rows_edges(blocks):
    v = 70
    z = torch.zeros(4, v, device=DEVICE)
    u = torch.zeros(4, v, device=DEVICE)
    z[0] = -math.inf                 # empty student row, student chosen: -1
    u[1] = -math.inf                 # empty teacher row, teacher chosen: -1
    z[2, :] = -math.inf
    z[2, 41] = 0.0                   # one-hot: always 41, whatever the uniform
    u[3, 60:] = -math.inf            # draws near 1 must land on the last positive entry, 59
    use_teacher = torch.tensor([False, True, False, True], device=DEVICE)
    for un in (0.0, 0.5, 1.0 - 1e-12):
        uniform = torch.full((4,), un, dtype=torch.float64, device=DEVICE)
        got = tri.sample_rows(z, u, use_teacher, uniform, 1.0).tolist()
        assert got[:3] == [-1, -1, 41]
        assert 0 <= got[3] < 60
    uniform = torch.full((4,), 1.0 - 1e-12, dtype=torch.float64, device=DEVICE)
    assert tri.sample_rows(z, u, use_teacher, uniform, 1.0)[3].item() == 59


def test_sample_rows_distribution():
    v, n = 5, 800 if DEVICE == "cpu" else 100_000  # the interpreter runs one program at a time
    logits = torch.tensor([0.0, 1.0, -math.inf, 2.0, -1.0])
    z = logits.expand(n, v).contiguous().to(DEVICE)
    u = torch.flip(logits, (0,)).expand(n, v).contiguous().to(DEVICE)
    g = torch.Generator().manual_seed(3)
    use_teacher = (torch.arange(n) % 4 == 0).to(DEVICE)  # one row in four samples the teacher
    uniform = torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE)
    got = tri.sample_rows(z, u, use_teacher, uniform, 1.0).cpu()
    probs = 0.75 * torch.softmax(logits.double(), 0) + 0.25 * torch.softmax(torch.flip(logits, (0,)).double(), 0)
    counts = torch.bincount(got, minlength=v).double()
    assert counts[2] == 0
    keep = probs > 0
    expected = probs[keep] * n
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.0, (counts, expected)  # 3 degrees of freedom: P(chi2 > 20) ~ 2e-4


@triton.jit
def merge_kernel(x_ptr, v_ptr, out_ptr, V, SPLIT, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    m1 = tl.full([], float("-inf"), tl.float32)
    m2 = tl.full([], float("-inf"), tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    a1 = tl.zeros([BLOCK], tl.float32)
    b1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    a2 = tl.zeros([BLOCK], tl.float32)
    b2 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, SPLIT, BLOCK):
        cols = start + lanes
        x = tl.load(x_ptr + row * V + cols, mask=cols < SPLIT, other=float("-inf"))
        v = tl.load(v_ptr + row * V + cols, mask=cols < SPLIT, other=0.0)
        m1, s1, a1, b1 = online_update(m1, s1, a1, b1, x, v, tl.max(x, 0), inv_temp)
    for start in range(SPLIT, V, BLOCK):
        cols = start + lanes
        x = tl.load(x_ptr + row * V + cols, mask=cols < V, other=float("-inf"))
        v = tl.load(v_ptr + row * V + cols, mask=cols < V, other=0.0)
        m2, s2, a2, b2 = online_update(m2, s2, a2, b2, x, v, tl.max(x, 0), inv_temp)
    m, s, a, b = merge_states(m1, tl.sum(s1, 0), tl.sum(a1, 0), tl.sum(b1, 0),
                              m2, tl.sum(s2, 0), tl.sum(a2, 0), tl.sum(b2, 0), inv_temp)
    tl.store(out_ptr + row * 4 + 0, m)
    tl.store(out_ptr + row * 4 + 1, tl.log(s))
    tl.store(out_ptr + row * 4 + 2, a / s)
    tl.store(out_ptr + row * 4 + 3, b / s)


@pytest.mark.parametrize("tau", [1.0, 0.37])
def test_merge_states(tau):
    """merge_states (for split-row reductions) of two halves equals the one-pass state of the whole row: the raw
    max, and the sums of c = (x - m) / tau."""
    n, v, split = 4, 90, 37
    x = _logits(n, v, torch.float32, seed=11)
    x[0, :split] = -math.inf        # empty first half
    x[1, split:] = -math.inf        # empty second half
    x[2, 5] = 60.0                  # the max in the first half, far above the second
    x[3, ::3] = -math.inf
    vals = _logits(n, v, torch.float32, seed=12)
    out = torch.empty(n, 4, device=DEVICE)
    merge_kernel[(n,)](x, vals, out, v, split, 1.0 / tau, BLOCK=16)
    m = x.amax(1)
    c = (x - m[:, None]) / tau
    e = torch.exp(c)
    s = e.sum(1)
    want = torch.stack([m, s.log(), (e * vals).sum(1) / s, torch.where(e > 0, e * c, torch.zeros_like(e)).sum(1) / s],
                       1)
    _close(out, want)


def _offset_rows(v, seed):
    """float32 rows on a common offset far from 0 (the student's and the teacher's each their own), the teacher close
    to the student (d small, so that the KL gradient is small against the roundings of the logits): rows 0-1 at
    -1000 + 3 randn, rows 2-3 at +700 + 3 randn, row 4 student at -1000 and teacher at +700; row 5 student at
    +3000 and an unrelated teacher at -3000."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([[-1000.0, -1000.0], [-1000.0, -1000.0], [700.0, 700.0], [700.0, 700.0], [-1000.0, 700.0],
                            [3000.0, -3000.0]])
    base = 3.0 * torch.randn(len(offsets), v, generator=g)
    z = offsets[:, :1] + base
    u = offsets[:, 1:] + base + 0.1 * torch.randn(len(offsets), v, generator=g)
    u[-1] = offsets[-1, 1] + 3.0 * torch.randn(v, generator=g)
    return z, u


def _stats_float64(z, u, tokens, inv_temp):
    """row_stats by definition in float64 from the float32 rows (minillm_fast.backends: maxima, ZY, UY, UA raw)."""
    z, u = z.double(), u.double()
    m_q, m_p = z.amax(1), u.amax(1)
    xc, yc = (z - m_q[:, None]) * inv_temp, (u - m_p[:, None]) * inv_temp
    q, p = torch.softmax(xc, 1), torch.softmax(yc, 1)
    logs_q, logs_p = torch.logsumexp(xc, 1), torch.logsumexp(yc, 1)
    ua = u.gather(1, z.argmax(1, keepdim=True))
    d = xc - yc
    y = tokens[:, None]
    return torch.stack([m_q, logs_q, m_p, logs_p, (q * d).sum(1), (q * xc).sum(1), -(p * d).sum(1), (p * yc).sum(1),
                        z.gather(1, y)[:, 0], u.gather(1, y)[:, 0], ua[:, 0],
                        (q * (d + (ua - m_p[:, None]) * inv_temp)).sum(1), logs_q - logs_p], 1)


@pytest.mark.parametrize("tau", [2.7, 0.37])
def test_offset_rows_against_float64(tau, blocks):
    """Rows far from 0 (|z| ~ 1e3) at a temperature != 1: the kernels centre the raw logits on the raw maximum
    before scaling, c = fl(fl(z - M) / tau), so the statistics keep 1e-5 and the gradients 1e-4 relative to float64
    (z / tau rounded first carries ulp(|z / tau|) ~ 3e-5 .. 1e-4 into every centred logit)."""
    from _helpers import assert_close_rel
    v, it = 300, 1.0 / tau
    z, u = _offset_rows(v, seed=21)
    tokens = torch.tensor([3, 250, 7, 299, 100, 42])
    stats = tri.row_stats(z.to(DEVICE), u.to(DEVICE), tokens.to(DEVICE), it).cpu()
    want = _stats_float64(z, u, tokens, it)
    for j in range(NUM_STATS):
        assert_close_rel(stats[:, j], want[:, j], 1e-5, abs_slack=1e-6, what=f"stats column {j}")

    zd, ud = z.double(), u.double()
    xc, yc = (zd - want[:, :1]) * it, (ud - want[:, 2:3]) * it
    q, p = torch.softmax(xc, 1), torch.softmax(yc, 1)
    d = xc - yc
    coef = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.5, 0.2], [1.0, 0.0, 0.0, 0.0], [0.0, 0.7, -0.4, -0.7],
                         [0.6, 0.1, 0.0, 0.0], [0.5, 0.0, -0.5, 0.0]])
    grad = tri.logits_grad(z.to(DEVICE), u.to(DEVICE), tokens.to(DEVICE), stats.to(DEVICE), coef.to(DEVICE), it)
    c = coef.double()
    want_grad = (c[:, :1] * q * (d - (q * d).sum(1, keepdim=True)) + c[:, 1:2] * q + c[:, 2:3] * p
                 + c[:, 3:] * torch.nn.functional.one_hot(tokens, v))
    for r in range(z.shape[0]):
        assert_close_rel(grad[r].cpu(), want_grad[r], 1e-4, abs_slack=0.0, what=f"logits_grad row {r}")

    beta = 0.3
    log_m = torch.logaddexp(math.log(beta) + torch.log_softmax(yc, 1), math.log1p(-beta) + torch.log_softmax(xc, 1))
    g = torch.log_softmax(xc, 1) - log_m
    h = torch.log_softmax(yc, 1) - log_m
    rows = tri.jsd_rows(z.to(DEVICE), u.to(DEVICE), stats.to(DEVICE), beta, it).cpu()
    assert_close_rel(rows[:, 0], beta * (p * h).sum(1) + (1 - beta) * (q * g).sum(1), 1e-5, abs_slack=1e-7,
                     what="JSD")
    jcoef = torch.tensor([1.0, -0.5, 0.8, 1.2, -1.0, 0.7])
    jgrad = tri.jsd_grad(z.to(DEVICE), u.to(DEVICE), stats.to(DEVICE), rows.to(DEVICE), jcoef.to(DEVICE), beta, it)
    want_jgrad = jcoef.double()[:, None] * q * (g - (q * g).sum(1, keepdim=True))
    for r in range(z.shape[0]):
        assert_close_rel(jgrad[r].cpu(), want_jgrad[r], 1e-4, abs_slack=0.0, what=f"jsd_grad row {r}")

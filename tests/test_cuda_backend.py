"""The CUDA C++ backend's five row primitives (``torch.ops.minillm_fast.*`` on CUDA tensors) against
``minillm_fast.backends.torch_backend`` run on the same GPU tensors (same float32 math, other summation order),
plus one N*V > 2^31 case checked against float64 math. Skipped without a GPU or when the extension does not build.

Covers: the 9 (student, teacher) dtype pairs, odd vocabularies (1, 7, 33, 32003, 128256), padded vocabularies,
-inf entries and empty rows, extreme logits, non-contiguous and misaligned rows (scalar path), rows split across
blocks (small N, large V) and one block per row (large N), zero-coefficient rows, no host synchronisation, rows with
a large common offset under a temperature (against float64); and the optional row_stats_grad (rows split across a
thread-block cluster; against row_stats + logits_grad composed by ``loss.row_stats_grad_composed``) and
scale_unless_one_.

Without a GPU the same tests can run the kernels' logic through the CPU emulator (csrc/cuda/emulator/build.sh):
``MINILLM_FAST_CUDA_EMULATOR=/path/libminillm_cuda_emu.so pytest tests/test_cuda_backend.py`` (slow: minutes).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from minillm_fast import _extension
from minillm_fast.backends import (C_KL, C_P, C_Q, C_Y, EP_D, EP_UC, EQ_D, EQ_DA, EQ_ZC, LOG_RATIO, LOGS_P, LOGS_Q,
                                   M_P, M_Q, NUM_STATS, UA, UY, ZY, torch_backend)

EMULATOR = os.environ.get("MINILLM_FAST_CUDA_EMULATOR")
DEVICE = "cpu" if EMULATOR else "cuda"
pytestmark = pytest.mark.skipif(not (EMULATOR or torch.cuda.is_available()), reason="needs a CUDA GPU")


def _emulated_ops():
    path = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "emulator" / "emu_ops.py"
    spec = importlib.util.spec_from_file_location("minillm_fast_cuda_emu_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = [(a, b) for a in DTYPES for b in DTYPES]
SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# Gradient comparison (norm-wise, relative): one rounding of the output dtype on a few elements at most.
GRAD_RTOL = {torch.float32: 3e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}
STATS_RTOL = 2e-5
STAT_NAMES = ["M_Q", "LOGS_Q", "M_P", "LOGS_P", "EQ_D", "EQ_ZC", "EP_D", "EP_UC", "ZY", "UY"]  # row_stats columns


def pair_id(p):
    return f"{SHORT[p[0]]}-{SHORT[p[1]]}"


@pytest.fixture(scope="module", autouse=True)
def cuda_ext():
    if not EMULATOR and _extension.load("cuda") is None:
        pytest.skip("the cuda extension did not build (see the RuntimeWarning)")


ops = _emulated_ops() if EMULATOR else torch.ops.minillm_fast


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def gen_for(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def logits(n, v, dtype, seed, scale=3.0, offset=0.0):
    g = gen_for(seed)
    return (torch.randn(n, v, device=DEVICE, generator=g) * scale + offset).to(dtype)


def assert_close(actual, expected, rtol, what, atol=1e-6):
    """Same non-finite entries (same infinities, NaN where NaN) and ||a - e|| <= rtol ||e|| + atol sqrt(n) on the
    finite ones."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    fin_a, fin_e = torch.isfinite(a), torch.isfinite(e)
    bad = (fin_a != fin_e).nonzero()
    assert bad.numel() == 0, f"{what}: finite/non-finite differ at {bad[:5].tolist()}: {a[fin_a != fin_e][:5]} " \
                             f"vs {e[fin_a != fin_e][:5]}"
    nf = ~fin_e
    same = (a[nf] == e[nf]) | (torch.isnan(a[nf]) & torch.isnan(e[nf]))
    assert bool(same.all()), f"{what}: non-finite values differ: {a[nf][~same][:5]} vs {e[nf][~same][:5]}"
    if bool(fin_e.any()):
        diff = (a[fin_e] - e[fin_e]).norm().item()
        ref = e[fin_e].norm().item()
        bound = rtol * ref + atol * math.sqrt(int(fin_e.sum()))
        assert diff <= bound, f"{what}: ||diff|| = {diff:.3e} > {bound:.3e} (||ref|| = {ref:.3e})"


def check_stats(z, u, tokens, inv_temp, what=""):
    out = ops.row_stats(z, u, tokens, inv_temp)
    ref = torch_backend.row_stats(z, u, tokens, inv_temp)
    assert out.dtype == torch.float32 and out.shape == (z.shape[0], NUM_STATS)
    for col, name in enumerate(STAT_NAMES):
        assert_close(out[:, col], ref[:, col], STATS_RTOL, f"{what} row_stats[{name}]")
    check_anchor(z, u, inv_temp, out, what)
    return out, ref


def check_anchor(z, u, inv_temp, stats, what=""):
    """UA and EQ_DA (minillm_fast.backends): where finite, UA is the raw u at an entry with z = M_Q (the kernels may
    pick another entry of a tied max than torch's first one) and EQ_DA = E_q[(z - m_q) / tau - (u - UA) / tau] in
    float64; NaN together, and only where the float64 value is not finite."""
    vocab = min(z.shape[1], u.shape[1])
    it = torch.tensor(inv_temp, dtype=torch.float32).item()
    zs = z[:, :vocab].double().cpu()
    us = u[:, :vocab].double().cpu()
    st = stats.double().cpu()
    ua, eq_da = st[:, UA], st[:, EQ_DA]
    assert torch.equal(torch.isnan(ua), torch.isnan(eq_da)), f"{what}: UA and EQ_DA NaN apart"
    m_q = zs.amax(1, keepdim=True)
    at_max = zs == m_q
    is_anchor = at_max & (us == ua[:, None])
    has = ~torch.isnan(ua)
    assert bool(is_anchor[has].any(1).all()), f"{what}: UA is not u at an argmax of z"
    e_q = torch.exp((zs - torch.where(torch.isfinite(m_q), m_q, 0.0)) * it)
    terms = torch.where(e_q > 0, e_q * ((zs - m_q) * it - (us - ua[:, None]) * it), 0.0)
    want = terms.sum(1) / e_q.sum(1)
    assert_close(eq_da[has], want[has], STATS_RTOL, f"{what} row_stats[EQ_DA]", atol=1e-6)
    # the anchor is dropped only where it cannot be finite: an empty student row, the teacher -inf at every argmax
    droppable = ~torch.isfinite(m_q[:, 0]) | ~torch.isfinite(torch.where(at_max, us, 0.0)).all(1)
    assert bool(droppable[~has].all()), f"{what}: anchor dropped in a row where it is finite"


def random_coef(n, seed, zero_rows=()):
    g = gen_for(seed)
    coef = torch.randn(n, 4, device=DEVICE, generator=g)
    for r in zero_rows:
        coef[r] = 0.0
    return coef


def check_grad(z, u, tokens, stats, coef, inv_temp, what=""):
    out = ops.logits_grad(z, u, tokens, stats, coef, inv_temp)
    ref = torch_backend.logits_grad(z, u, tokens, stats, coef, inv_temp)
    assert out.dtype == z.dtype and out.shape == z.shape and out.is_contiguous()
    assert_close(out, ref, GRAD_RTOL[z.dtype], f"{what} logits_grad", atol=1e-7)
    vocab = min(z.shape[1], u.shape[1])
    assert bool((out[:, vocab:] == 0).all()), f"{what}: columns >= V must be exactly 0"
    zero_rows = (coef == 0).all(1)
    assert bool((out[zero_rows] == 0).all()), f"{what}: rows with zero coefs must be exactly 0"
    return out


# ----------------------------------------------------------------------------------------------------------
# row_stats + logits_grad: every dtype pair, odd vocabularies, split and unsplit rows
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("n,v", [(5, 1), (9, 7), (37, 33), (6, 32003), (3, 128256)])
def test_stats_and_grad_match_torch_backend(pair, n, v):
    zt, ut = pair
    z = logits(n, v, zt, seed=v * 7 + 1)
    u = logits(n, v, ut, seed=v * 7 + 2, scale=2.5)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(v))
    inv_temp = 1.0 / 1.3
    stats, _ = check_stats(z, u, tokens, inv_temp, f"{pair_id(pair)} V={v}")
    coef = random_coef(n, seed=v, zero_rows=(0,))
    check_grad(z, u, tokens, stats, coef, inv_temp, f"{pair_id(pair)} V={v}")
    # only c_q and c_y: the teacher row is not read
    coef2 = coef.clone()
    coef2[:, C_KL] = 0
    coef2[:, C_P] = 0
    check_grad(z, u, tokens, stats, coef2, inv_temp, f"{pair_id(pair)} V={v} (no teacher)")


@pytest.mark.parametrize("pair", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)], ids=pair_id)
@pytest.mark.parametrize("v", [32003, 32000])
def test_many_rows_one_block_per_row(pair, v):
    # N above one wave of resident blocks (132 SMs x 4): no split path (scalar rows for the odd V, vector loads
    # for the even).
    n = 540 if EMULATOR else 1100
    z = logits(n, v, pair[0], seed=11)
    u = logits(n, v, pair[1], seed=12)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(13))
    stats, _ = check_stats(z, u, tokens, 1.0, "many rows")
    check_grad(z, u, tokens, stats, random_coef(n, 14, zero_rows=(3, 500)), 1.0, "many rows")


@pytest.mark.parametrize("vs,vt", [(32003 + 125, 32003), (1000, 1024), (152064, 151936)])
@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
def test_padded_vocab(dtype, vs, vt):
    n = 4
    z = logits(n, vs, dtype, seed=vs)
    u = logits(n, vt, torch.bfloat16, seed=vt)
    vocab = min(vs, vt)
    tokens = torch.randint(0, vocab, (n,), device=DEVICE, generator=gen_for(3))
    stats, _ = check_stats(z, u, tokens, 1.0, f"padded {vs}/{vt}")
    check_grad(z, u, tokens, stats, random_coef(n, 5), 1.0, f"padded {vs}/{vt}")


@pytest.mark.parametrize("layout", ["odd_stride", "aligned_stride", "misaligned_start", "single_row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=SHORT.get)
def test_row_strides_and_alignment(dtype, layout):
    n, v = 12, 4099
    if layout == "odd_stride":
        z = logits(n, v + 3, dtype, seed=1)[:, :v]
        u = logits(n, v + 5, dtype, seed=2)[:, :v]
    elif layout == "aligned_stride":
        z = logits(n, v + 13, dtype, seed=1)[:, :v]  # stride 4112: a multiple of 8 and 4
        u = logits(n, v + 29, dtype, seed=2)[:, :v]
    elif layout == "misaligned_start":
        z = logits(n, v + 9, dtype, seed=1)[:, 1:v + 1]
        u = logits(n, v + 9, dtype, seed=2)[:, 3:v + 3]
    else:
        z = logits(n, v + 1, dtype, seed=1)[5:6, 1:]
        u = logits(n, v + 1, dtype, seed=2)[7:8, :v]
    tokens = torch.randint(0, v, (z.shape[0],), device=DEVICE, generator=gen_for(7))
    stats, _ = check_stats(z, u, tokens, 1.0, layout)
    check_grad(z, u, tokens, stats, random_coef(z.shape[0], 8), 1.0, layout)
    # a transposed view (vocabulary stride != 1) is copied by the binding
    zc = z.contiguous().t().contiguous().t()
    assert zc.stride(1) != 1 or zc.shape[0] == 1
    check_stats(zc, u, tokens, 1.0, layout + " transposed")


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("v", [7, 33, 32003])
def test_neg_inf_entries_and_empty_rows(dtype, v):
    n = 8
    z = logits(n, v, torch.float32, seed=v + 1)
    u = logits(n, v, torch.float32, seed=v + 2)
    g = gen_for(v + 3)
    both = torch.rand(n, v, device=DEVICE, generator=g) < 0.3
    student_only = torch.rand(n, v, device=DEVICE, generator=g) < 0.2
    both[:, 0] = False  # column 0 stays finite in both rows (token 0)
    student_only[:, 0] = False
    z[both | student_only] = -math.inf
    u[both] = -math.inf
    z[2] = -math.inf  # empty student row
    u[3] = -math.inf  # empty teacher row
    z[4] = -math.inf  # both empty
    u[4] = -math.inf
    u[5, 1:] = -math.inf  # teacher -inf where the student has mass: E_q[z - u] = +inf
    z, u = z.to(dtype), u.to(dtype)
    tokens = torch.zeros(n, dtype=torch.long, device=DEVICE)
    stats, ref = check_stats(z, u, tokens, 1.0, f"-inf V={v}")
    for r, (mcol, lcol) in ((2, (M_Q, LOGS_Q)), (3, (M_P, LOGS_P)), (4, (M_Q, LOGS_Q)), (4, (M_P, LOGS_P))):
        assert stats[r, mcol].item() == -math.inf and stats[r, lcol].item() == -math.inf
    assert stats[5, EQ_D].item() == math.inf
    finite_cols = [M_Q, LOGS_Q, M_P, LOGS_P, EQ_D, EQ_ZC, EP_UC]  # EP_D = +inf: the student has -inf under p's mass
    assert bool(torch.isfinite(stats[[0, 1, 6, 7]][:, finite_cols]).all())
    # gradients: the ops treat empty rows and rows with an infinite divergence as masked (zero coefs)
    coef = random_coef(n, v)
    coef[[2, 3, 4, 5]] = 0.0
    out = check_grad(z, u, tokens, stats, coef, 1.0, f"-inf V={v}")
    assert bool(torch.isfinite(out.float()).all())
    # where both rows are -inf, q = p = 0: only the c_y term can be nonzero there (token 0 is finite)
    assert bool((out[both & (torch.arange(n, device=DEVICE) != 5)[:, None]] == 0).all())


@pytest.mark.parametrize("v", [33, 32003])
def test_extreme_logits(v):
    n = 6
    g = gen_for(v)
    z = torch.randn(n, v, device=DEVICE, generator=g) * 3e3  # nearly one-hot rows, |z| ~ 1e4
    u = torch.randn(n, v, device=DEVICE, generator=g) * 3e3
    z[0] = 1e4
    z[0, 5] = 1e4 + 1.0
    u[1] = -1e4
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    stats, ref = check_stats(z, u, tokens, 1.0, "extreme")
    # float64 check of log s near 0 (one-hot rows): keeps precision
    x = z.double()
    lse = torch.logsumexp(x - x.amax(1, keepdim=True), 1)
    assert torch.allclose(stats[:, LOGS_Q].double(), lse, rtol=1e-5, atol=1e-6)
    coef = random_coef(n, 3)
    out = ops.logits_grad(z, u, tokens, stats, coef, 1.0)
    expect = torch_backend.logits_grad(z, u, tokens, stats, coef, 1.0)
    assert bool(torch.isfinite(out).all())
    assert_close(out, expect, 2e-2, "extreme grad")


def test_one_hot_rows_gradient_at_the_argmax():
    """randn * 1e4 rows are exactly one-hot in float32; the reverse-KL gradient at the argmax must come from the
    anchored sum (EQ_DA), not d_a - E_q[d] rounded at ulp(|d_a|) ~ 1e-3: float64 to 2e-2 with a 1e-9 slack, through
    row_stats + logits_grad and through row_stats_grad."""
    n, v = 16, 20000
    g = gen_for(v + 1)
    z = torch.randn(n, v, device=DEVICE, generator=g) * 1e4
    u = torch.randn(n, v, device=DEVICE, generator=g) * 1e4
    zz = z.double().cpu().requires_grad_()
    lq, lp = torch.log_softmax(zz, 1), torch.log_softmax(u.double().cpu(), 1)
    torch.where(lq > -math.inf, lq.exp() * (lq - lp), 0.0).sum().backward()
    coef = torch.zeros(n, 4, device=DEVICE)
    coef[:, C_KL] = 1.0
    stats, _ = check_stats(z, u, None, 1.0, "one-hot")
    for name, dz in (("logits_grad", ops.logits_grad(z, u, None, stats, coef, 1.0)),
                     ("row_stats_grad", ops.row_stats_grad(z, u, None, coef, None, 0.0, 1.0, None)[1])):
        if dz.numel() == 0:  # row_stats_grad without a plan for these rows
            continue
        err = (dz.double().cpu() - zz.grad).norm().item()
        assert err <= 2e-2 * zz.grad.norm().item() + 1e-9, f"{name}: {err:.3e} vs ||ref|| {zz.grad.norm().item():.3e}"


def test_teacher_not_read_and_zero_rows_not_read():
    n, v = 6, 1000
    z = logits(n, v, torch.bfloat16, seed=1)
    u = logits(n, v, torch.bfloat16, seed=2)
    stats = ops.row_stats(z, u, None, 1.0)
    coef = random_coef(n, 3, zero_rows=(1, 4))
    coef[:, C_KL] = 0
    coef[:, C_P] = 0
    u_nan = torch.full_like(u, float("nan"))
    z_poisoned = z.clone()
    z_poisoned[[1, 4]] = float("nan")
    out = ops.logits_grad(z_poisoned, u_nan, None, stats, coef, 1.0)
    ref = torch_backend.logits_grad(z, u, None, stats, coef, 1.0)
    assert_close(out, ref, GRAD_RTOL[torch.bfloat16], "teacher not read")
    assert bool((out[[1, 4]] == 0).all())


def test_tokens_none_and_out_of_range():
    n, v = 4, 50
    z, u = logits(n, v, torch.float32, 1), logits(n, v, torch.float32, 2)
    stats = ops.row_stats(z, u, None, 1.0)
    assert bool((stats[:, ZY] == 0).all() and (stats[:, UY] == 0).all())
    tokens = torch.tensor([0, v - 1, -100, v + 3], device=DEVICE)
    stats = ops.row_stats(z, u, tokens, 1.0)
    assert stats[0, ZY].item() == z[0, 0].item() and stats[1, UY].item() == u[1, v - 1].item()
    assert stats[2, ZY].item() == 0 and stats[3, UY].item() == 0  # out of range: 0 (the ops mask such rows)
    # int32 tokens are accepted
    s32 = ops.row_stats(z, u, tokens[:2].to(torch.int32).repeat(2), 1.0)
    assert s32[0, ZY].item() == z[0, 0].item()


# ----------------------------------------------------------------------------------------------------------
# jsd_rows / jsd_grad
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                  (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=pair_id)
@pytest.mark.parametrize("n,v", [(9, 7), (5, 32003), (3, 128256), (700, 4096)])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_torch_backend(pair, n, v, beta):
    z = logits(n, v + 8, pair[0], seed=v + 1)  # padded student vocabulary (rows aligned when v is)
    u = logits(n, v, pair[1], seed=v + 2)
    if v > 7:
        z[1, ::5] = -math.inf
        u[1, ::5] = -math.inf
        z[2, 1::7] = -math.inf
    inv_temp = 1 / 0.8
    stats = torch_backend.row_stats(z, u, None, inv_temp)
    out = ops.jsd_rows(z, u, stats, beta, inv_temp)
    ref = torch_backend.jsd_rows(z, u, stats, beta, inv_temp)
    assert out.dtype == torch.float32 and out.shape == (n, 2)
    assert_close(out[:, 0], ref[:, 0], STATS_RTOL, f"jsd_rows JSD beta={beta}", atol=1e-7)
    assert_close(out[:, 1], ref[:, 1], STATS_RTOL, f"jsd_rows E_q[g] beta={beta}", atol=1e-7)
    coef = torch.randn(n, device=DEVICE, generator=gen_for(v))
    coef[0] = 0.0
    dz = ops.jsd_grad(z, u, stats, ref, coef, beta, inv_temp)
    dz_ref = torch_backend.jsd_grad(z, u, stats, ref, coef, beta, inv_temp)
    assert dz.dtype == z.dtype and dz.shape == z.shape
    assert_close(dz, dz_ref, GRAD_RTOL[z.dtype], f"jsd_grad beta={beta}", atol=1e-7)
    assert bool((dz[:, v:] == 0).all()) and bool((dz[0] == 0).all())


@pytest.mark.parametrize("v", [1000, 128256])
@pytest.mark.parametrize("noise,tol", [(0.1, 2e-5), (0.03, 1.5e-4)])
def test_kl_of_close_distributions(v, noise, tol):
    """Teacher = student + noise * randn (KL ~ 5e-3, 5e-4 per row): KL = EQ_D - LOG_RATIO against float64, with
    LOG_RATIO from s_q - s_p summed entry by entry (RowPairState::dqp; rows of 128256 split across blocks). From
    LOGS_Q - LOGS_P the errors were 2.5e-5..6e-5 and 3.6e-4..5.4e-4; now ~6e-6 and 2.5e-5..6e-5."""
    from minillm_fast import reference
    g = gen_for(v)
    z = 2.0 * torch.randn(8, v, device=DEVICE, generator=g)
    u = z + noise * torch.randn(8, v, device=DEVICE, generator=g)
    stats = ops.row_stats(z, u, None, 1.0)
    ref = reference.reverse_kl(z.double(), u.double(), reduction="none")
    assert_close(stats[:, EQ_D].double() - stats[:, LOG_RATIO].double(), ref, tol, "KL(q||p)", atol=0.0)
    ref = reference.forward_kl(z.double(), u.double(), reduction="none")
    assert_close(stats[:, EP_D].double() + stats[:, LOG_RATIO].double(), ref, tol, "KL(p||q)", atol=0.0)


@pytest.mark.parametrize("v", [1000, 128256])
@pytest.mark.parametrize("noise", [0.03, 0.01])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_of_very_close_distributions(v, noise, beta):
    """Teacher = student + noise * randn (JSD ~ 4e-5..1e-4, 4e-6..1e-5 per row): the value's g and h near q = p
    come from -log1p(beta expm1(r)) and r + g (jsd.cu kNearRatio; rows of 128256 split across blocks). From the
    logaddexp forms (-c - l, near log 2) they were 1e-4 and 1e-3 off; the test asserts 2e-5 against float64."""
    from minillm_fast import reference
    g = gen_for(v)
    z = 2.0 * torch.randn(8, v, device=DEVICE, generator=g)
    u = z + noise * torch.randn(8, v, device=DEVICE, generator=g)
    stats = ops.row_stats(z, u, None, 1.0)
    out = ops.jsd_rows(z, u, stats, beta, 1.0)
    ref = reference.jsd(z.double(), u.double(), beta=beta, reduction="none")
    assert_close(out[:, 0].double(), ref, 2e-5, "JSD", atol=0.0)


@pytest.mark.parametrize("n,v", [(8, 3001), (2, 128256)])
def test_jsd_of_a_student_peaked_where_the_teacher_is_not(n, v):
    """Independent logits ~ 10 randn: the gradient at the student's argmax, -q_a E_q[g - g_a], is far below
    ulp(|g_a|), and both kernels take g relative to row_stats' anchor (jsd.cu; the float64 comparison is
    test_divergences'); rows of 128256 are split across blocks, whose anchored sums the merge adds."""
    z, u = logits(n, v, torch.float32, seed=41, scale=10.0), logits(n, v, torch.float32, seed=42, scale=10.0)
    stats = torch_backend.row_stats(z, u, None, 1.0)
    out = ops.jsd_rows(z, u, stats, 0.5, 1.0)
    ref = torch_backend.jsd_rows(z, u, stats, 0.5, 1.0)
    assert_close(out, ref, STATS_RTOL, "jsd_rows", atol=1e-12)
    coef = torch.full((n,), 0.5, device=DEVICE)
    dz = ops.jsd_grad(z, u, stats, ref, coef, 0.5, 1.0)
    dz_ref = torch_backend.jsd_grad(z, u, stats, ref, coef, 0.5, 1.0)
    assert_close(dz, dz_ref, 1e-4, "jsd_grad", atol=1e-15)


# ----------------------------------------------------------------------------------------------------------
# sample_rows
# ----------------------------------------------------------------------------------------------------------

def check_samples(z, u, use_teacher, uniform, inv_temp, idx, what, min_agree=0.9):
    """Every draw is a valid inverse-CDF index in float64 (up to float32 summation error), of positive
    probability; most agree exactly with torch_backend (they may differ where the target sits on a boundary)."""
    vocab = min(z.shape[1], u.shape[1])
    x = torch.where(use_teacher[:, None], u[:, :vocab].double(), z[:, :vocab].double()) * inv_temp
    m = x.amax(1, keepdim=True)
    valid = torch.isfinite(m[:, 0])
    assert bool((idx[~valid] == -1).all()), f"{what}: empty rows must give -1"
    rows = valid.nonzero()[:, 0]
    if rows.numel() == 0:
        return
    xv, iv = x[rows], idx[rows]
    assert bool(((iv >= 0) & (iv < vocab)).all()), f"{what}: index out of range"
    e = torch.exp(xv - m[rows])
    cum = e.cumsum(1)
    total = cum[:, -1]
    target = uniform[rows].double() * total
    tol = 1e-4 * total
    chosen = iv[:, None]
    assert bool((e.gather(1, chosen)[:, 0] > 0).all()), f"{what}: a zero-probability entry was drawn"
    hi = cum.gather(1, chosen)[:, 0]
    lo = torch.where(iv > 0, cum.gather(1, (iv - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(hi))
    ok = (hi >= target - tol) & (lo <= target + tol)
    assert bool(ok.all()), f"{what}: not an inverse-CDF draw at rows {rows[~ok][:5].tolist()}"
    ref = torch_backend.sample_rows(z, u, use_teacher, uniform, inv_temp)
    agree = (ref == idx).double().mean().item()
    assert agree >= min_agree, f"{what}: only {agree:.3f} of the draws agree with torch_backend"


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("n,v", [(64, 1), (64, 7), (64, 33), (32, 32003), (8, 128256)])
def test_sample_rows(pair, n, v):
    z = logits(n, v, pair[0], seed=v + 11)
    u = logits(n, v + 8, pair[1], seed=v + 12)  # padded teacher
    g = gen_for(v)
    use_teacher = torch.rand(n, device=DEVICE, generator=g) < 0.4
    uniform = torch.rand(n, device=DEVICE, generator=g, dtype=torch.float64)
    if v > 7:
        z[0, 1:] = -math.inf  # one possible entry
        use_teacher[0] = False
        u[1] = -math.inf  # empty teacher row
        use_teacher[1] = True
        z[2] = -math.inf  # empty student row
        use_teacher[2] = False
        z[3, ::2] = -math.inf  # never draw these
        use_teacher[3] = False
        uniform[4] = 0.0  # first entry of positive probability
        uniform[5] = 1.0 - 1e-17  # rounds to 1.0 in float32: the last entry of positive probability
        z[5, -3:] = -math.inf
        use_teacher[5] = False
    idx = ops.sample_rows(z, u, use_teacher, uniform, 0.9)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    check_samples(z, u, use_teacher, uniform, 0.9, idx, f"{pair_id(pair)} V={v}")
    if v > 7:
        assert idx[0].item() == 0 and idx[1].item() == -1 and idx[2].item() == -1
        assert idx[3].item() % 2 == 1
        assert idx[4].item() == 0
        assert idx[5].item() == v - 4


def test_sample_rows_distribution():
    # Inverse CDF of evenly spread uniforms reproduces the mixture alpha p + (1 - alpha) q.
    v, n, alpha = 7, (20_000 if EMULATOR else 200_000), 0.2
    zrow = torch.tensor([[0.0, 1.0, -math.inf, 2.0, -1.0, 0.5, 3.0]], device=DEVICE)
    urow = torch.tensor([[1.0, 0.0, 0.5, -2.0, 2.5, -math.inf, 0.0]], device=DEVICE)
    z, u = zrow.expand(n, v), urow.expand(n, v)  # row stride 0
    g = gen_for(1)
    use_teacher = torch.rand(n, device=DEVICE, generator=g) < alpha
    uniform = torch.rand(n, device=DEVICE, generator=g, dtype=torch.float64)
    idx = ops.sample_rows(z, u, use_teacher, uniform, 1.0)
    freq = torch.bincount(idx, minlength=v).double() / n
    probs = alpha * torch.softmax(urow[0].double(), 0) + (1 - alpha) * torch.softmax(zrow[0].double(), 0)
    sigma = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() <= 6 * sigma + 1e-12).all()), (freq, probs)


# ----------------------------------------------------------------------------------------------------------
# no host synchronisation, N * V > 2^31
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=lambda d: SHORT[d])
@pytest.mark.parametrize("v", [33, 4099, 32000])
def test_logits_grad_into_rows_of_a_buffer(rows_dtype, out_dtype, v):
    # logits_grad_into: dz written straight into rows of a larger buffer the caller owns, in 16 bits from float32
    # rows (the fused-linear group buffer); the buffer's other rows are left alone.
    n = 6
    z, u = logits(n, v, rows_dtype, seed=v + 81), logits(n, v, rows_dtype, seed=v + 82)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(v + 83))
    stats = torch_backend.row_stats(z, u, tokens, 0.8)
    coef = random_coef(n, v + 84, zero_rows=(2,))
    buffer = torch.full((n + 3, v), 7.0, dtype=out_dtype, device=DEVICE)
    target = buffer[2:2 + n]
    ops.logits_grad_into(z, u, tokens, stats, coef, 0.8, target)
    ref = torch_backend.logits_grad(z, u, tokens, stats, coef, 0.8)
    assert_close(target, ref, GRAD_RTOL[out_dtype], f"logits_grad_into {SHORT[rows_dtype]}->{SHORT[out_dtype]}",
                 atol=1e-7)
    assert bool((target[2] == 0).all())
    assert bool((buffer[:2] == 7).all() and (buffer[2 + n:] == 7).all()), "rows outside out were written"


@pytest.mark.skipif(bool(EMULATOR), reason="the binding's checks")
def test_logits_grad_into_rejects_other_dtypes():
    z, u = logits(2, 64, torch.bfloat16, 1), logits(2, 64, torch.bfloat16, 2)
    stats = ops.row_stats(z, u, None, 1.0)
    with pytest.raises(RuntimeError, match="logits_grad_into"):
        ops.logits_grad_into(z, u, None, stats, random_coef(2, 3), 1.0, torch.empty(2, 64, device=DEVICE))


# ----------------------------------------------------------------------------------------------------------
# row_stats_grad (statistics and gradient in one pass, row split across a cluster) and scale_unless_one_
# ----------------------------------------------------------------------------------------------------------

def _policy_near_ratio_one(z, u, tokens, inv_temp, seed):
    """(advantage, old log-prob, weight) with old = log q(y) + noise, so that rho falls inside and outside the clip
    band [0.8, 1.2] (both branches of the policy-gradient factor)."""
    g = gen_for(seed)
    n = z.shape[0]
    st = torch_backend.row_stats(z, u, tokens, inv_temp)
    logq = (st[:, ZY] - st[:, M_Q]) * inv_temp - st[:, LOGS_Q]
    old = torch.nan_to_num(logq, neginf=0.0) + 0.3 * torch.randn(n, device=DEVICE, generator=g)
    adv = torch.randn(n, device=DEVICE, generator=g)
    w = 0.5 + torch.rand(n, device=DEVICE, generator=g)
    return torch.stack((adv, old, w), 1)


def check_row_stats_grad(z, u, tokens, coef, policy, inv_temp, what, grad_dtype=None, fused=True, **emu_kwargs):
    """The op against loss.row_stats_grad_composed on torch_backend; ``fused``: whether a plan must exist (else dz
    comes back empty and the statistics are row_stats')."""
    from minillm_fast.loss import row_stats_grad_composed
    out_stats, out_dz = ops.row_stats_grad(z, u, tokens, coef, policy, 0.2, inv_temp, grad_dtype, **emu_kwargs)
    ref_stats, ref_dz = row_stats_grad_composed(torch_backend, z, u, tokens, coef.clone(), policy, 0.2, inv_temp,
                                                grad_dtype)
    for col, name in enumerate(STAT_NAMES):
        assert_close(out_stats[:, col], ref_stats[:, col], STATS_RTOL, f"{what} row_stats_grad stats[{name}]")
    out_type = grad_dtype or z.dtype
    assert out_dz.dtype == out_type
    if not fused:
        assert out_dz.numel() == 0, f"{what}: expected no fused plan"
        return
    assert out_dz.shape == z.shape and out_dz.is_contiguous(), f"{what}: dz shape {tuple(out_dz.shape)}"
    assert_close(out_dz, ref_dz, GRAD_RTOL[out_type], f"{what} row_stats_grad dz", atol=1e-7)
    vocab = min(z.shape[1], u.shape[1])
    assert bool((out_dz[:, vocab:] == 0).all()), f"{what}: columns >= V must be exactly 0"
    empty = (ref_stats[:, M_Q] == -math.inf) | (ref_stats[:, M_P] == -math.inf)
    zero_rows = (coef == 0).all(1) | empty
    assert bool((out_dz[zero_rows] == 0).all()), f"{what}: zero-coefficient and empty rows must be exactly 0"


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("n,v", [(5, 40), (4, 4096), (3, 32000), (2, 128256)])
def test_row_stats_grad_matches_two_passes(pair, n, v):
    zt, ut = pair
    z = logits(n, v, zt, seed=v + 1)
    u = logits(n, v, ut, seed=v + 2, scale=2.5)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(v))
    inv_temp = 1.0 / 1.3
    coef = random_coef(n, seed=v + 3, zero_rows=(1,))
    policy = _policy_near_ratio_one(z, u, tokens, inv_temp, seed=v + 4)
    check_row_stats_grad(z, u, tokens, coef, policy, inv_temp, f"{pair_id(pair)} V={v}")
    check_row_stats_grad(z, u, None, coef, None, inv_temp, f"{pair_id(pair)} V={v} no tokens, no policy")


@pytest.mark.parametrize("vs,vt", [(1032, 1000), (152064, 151936)])
@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
def test_row_stats_grad_padded_vocab(dtype, vs, vt):
    n = 3
    z, u = logits(n, vs, dtype, seed=vs), logits(n, vt, torch.bfloat16, seed=vt)
    tokens = torch.randint(0, vt, (n,), device=DEVICE, generator=gen_for(3))
    check_row_stats_grad(z, u, tokens, random_coef(n, 5), None, 1.0, f"padded {vs}/{vt}")


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
def test_row_stats_grad_neg_inf_empty_and_extreme_rows(dtype):
    n, v = 8, 20000
    g = gen_for(21)
    z = torch.randn(n, v, device=DEVICE, generator=g) * 3
    u = torch.randn(n, v, device=DEVICE, generator=g) * 3
    z[0] = -math.inf  # empty student row
    u[1] = -math.inf  # empty teacher row
    z[2, ::3] = -math.inf  # scattered -inf in both
    u[2, 1::5] = -math.inf
    u[3, 17] = -math.inf  # teacher -inf where the student has mass: KL = +inf, non-finite gradient
    z[4] = z[4] * 1e3 + 1e4  # extreme, nearly one-hot
    u[5, :] = -1e4
    z, u = z.to(dtype), u.to(dtype)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    coef = random_coef(n, 22)
    check_row_stats_grad(z, u, tokens, coef, _policy_near_ratio_one(z, u, tokens, 1.0, 23), 1.0,
                         f"-inf {SHORT[dtype]}")


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=SHORT.get)
@pytest.mark.parametrize("v", [1000, 50000])
def test_row_stats_grad_16_bit_gradient_of_float32_rows(grad_dtype, v):
    n = 4
    z, u = logits(n, v, torch.float32, seed=31), logits(n, v, torch.float32, seed=32)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(33))
    check_row_stats_grad(z, u, tokens, random_coef(n, 34), None, 0.8, f"f32 -> {SHORT[grad_dtype]}",
                         grad_dtype=grad_dtype)


def test_row_stats_grad_without_a_plan():
    # rows not aligned for 16-byte copies, a vocabulary below one vector, or rows too long for any cluster's shared
    # memory: dz is empty (the loss then runs logits_grad) and the statistics are still right
    n = 3
    z, u = logits(n, 32003, torch.bfloat16, seed=41), logits(n, 32003, torch.bfloat16, seed=42)
    coef = random_coef(n, 43)
    check_row_stats_grad(z, u, None, coef, None, 1.0, "odd stride", fused=False)
    check_row_stats_grad(z[:, :7], u[:, :7], None, coef, None, 1.0, "V < vector", fused=False)
    z, u = logits(1, 300000, torch.float32, seed=44), logits(1, 300000, torch.float32, seed=45)
    check_row_stats_grad(z, u, None, coef[:1], None, 1.0, "V too long", fused=False)


@pytest.mark.skipif(not EMULATOR, reason="the emulator's limits stand in for other GPUs")
def test_row_stats_grad_plans():
    # An H100's limits (8-block clusters, 227 KB of shared memory per block): bf16 [*, 128256] rows in 5 blocks of
    # 28672 columns with two row buffers each.
    n = 3
    z, u = logits(n, 128256, torch.bfloat16, seed=61), logits(n, 128256, torch.bfloat16, seed=62)
    check_row_stats_grad(z, u, None, random_coef(n, 63), None, 1.0, "H100 plan")
    assert ops.LAST_PLAN["row_stats_grad"] == [8, 5, 28672, 2, 0, 0]
    # An A100's (no clusters, 163 KB): one block per row, two buffers up to 20480 bf16 columns, one up to 40960, no
    # plan beyond.
    a100 = dict(max_cluster=1, max_smem=166912)
    for v, plan in ((20000, [8, 1, 20480, 2, 0, 0]), (40000, [8, 1, 40960, 1, 0, 0])):
        z, u = logits(n, v, torch.bfloat16, seed=v), logits(n, v, torch.bfloat16, seed=v + 1)
        tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(v + 2))
        check_row_stats_grad(z, u, tokens, random_coef(n, v + 3), None, 1.0, f"A100 V={v}", **a100)
        assert ops.LAST_PLAN["row_stats_grad"] == plan
    z, u = logits(n, 60000, torch.bfloat16, seed=64), logits(n, 60000, torch.bfloat16, seed=65)
    check_row_stats_grad(z, u, None, random_coef(n, 66), None, 1.0, "A100 V=60000", fused=False, **a100)


def test_row_stats_grad_one_buffer(monkeypatch):
    # MINILLM_FAST_FUSED_PLAN=1: one row buffer per block (no copy of the next row during this one's math).
    monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", "1")
    n, v = 7, 40000
    z, u = logits(n, v, torch.bfloat16, seed=71), logits(n, v, torch.float32, seed=72)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(73))
    check_row_stats_grad(z, u, tokens, random_coef(n, 74), _policy_near_ratio_one(z, u, tokens, 1.0, 75), 1.0,
                         "one buffer")
    if EMULATOR:
        assert ops.LAST_PLAN["row_stats_grad"][3] == 1
    monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", "off")
    check_row_stats_grad(z, u, tokens, random_coef(n, 74), None, 1.0, "off", fused=False)


@pytest.mark.parametrize("plan", ["l2", "l2:2", "l2s:3"])
def test_row_stats_grad_two_passes_in_l2(monkeypatch, plan):
    # MINILLM_FAST_FUSED_PLAN=l2[s][:R]: row_stats then logits_grad per chunk of R rows (the last one partial),
    # split rows' states merged by logits_grad; the kernels chained (programmatic dependent launch) unless "l2s".
    # Every dtype pair at a size that splits rows (few rows: many blocks per row) and one that does not, odd strides
    # (no vector loads: this plan needs none), -inf and empty rows, both policy branches, a padded student and
    # 16-bit dz of float32 rows.
    monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", plan)
    n = 7
    for (zt, ut), v in zip(PAIRS, [40, 4096, 32003, 50000, 40, 4096, 32003, 50000, 1000]):
        z = logits(n, v, zt, seed=v + 11)
        u = logits(n, v, ut, seed=v + 12, scale=2.5)
        z[1] = -math.inf
        u[2, ::2] = -math.inf
        u[3] = -math.inf
        tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(v + 13))
        coef = random_coef(n, seed=v + 14, zero_rows=(4,))
        policy = _policy_near_ratio_one(z, u, tokens, 0.8, seed=v + 15)
        what = f"{plan} {pair_id((zt, ut))} V={v}"
        check_row_stats_grad(z, u, tokens, coef, policy, 0.8, what)
        if EMULATOR:
            rows = int(plan.split(":")[1]) if ":" in plan else n
            assert ops.LAST_PLAN["row_stats_grad"][1] == 0 and ops.LAST_PLAN["row_stats_grad"][4] == rows
            assert ops.LAST_PLAN["row_stats_grad"][5] == (plan[2:3] != "s")
        check_row_stats_grad(z, u, None, coef, None, 0.8, what + " no tokens, no policy")
    z, u = logits(n, 1032, torch.bfloat16, seed=81), logits(n, 1000, torch.float32, seed=82)
    check_row_stats_grad(z, u, None, random_coef(n, 83), None, 1.0, f"{plan} padded student")
    z, u = logits(n, 5000, torch.float32, seed=84), logits(n, 5000, torch.float32, seed=85)
    for grad_dtype in (torch.bfloat16, torch.float16):
        check_row_stats_grad(z, u, None, random_coef(n, 86), None, 1.0, f"{plan} f32 -> {SHORT[grad_dtype]}",
                             grad_dtype=grad_dtype)


@pytest.mark.skipif(not EMULATOR, reason="the emulator's limits stand in for an H100")
def test_two_passes_in_l2_default_chunk(monkeypatch):
    # By default a chunk's rows and dz fill half the L2 cache: bf16 [*, 128256] rows (769.5 KB with a bf16 dz) on
    # an H100's 50 MB: 34 rows per chunk.
    monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", "l2")
    z, u = logits(40, 128256, torch.bfloat16, seed=91), logits(40, 128256, torch.bfloat16, seed=92)
    check_row_stats_grad(z, u, None, random_coef(40, 93), None, 1.0, "default chunk")
    assert ops.LAST_PLAN["row_stats_grad"][4] == (50 << 20) // 2 // (128256 * 6) == 34


@pytest.mark.parametrize("plan", [None, "l2:2", "l2s:3", "1,8"])
def test_row_stats_grad_into(monkeypatch, plan):
    # dz written into the caller's buffer (rows of a wider one: a row stride of its own), always by the two passes
    # in L2 (a one-pass MINILLM_FAST_FUSED_PLAN is ignored); the buffer's other columns untouched. As the fused-linear
    # path uses it: float32 rows, bf16/fp16 dz, a padded student; and a bf16 pair into bf16.
    from minillm_fast.loss import row_stats_grad_composed
    if plan:
        monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", plan)
    n = 7
    cases = [(torch.float32, torch.float32, torch.bfloat16, 5000, 5000), (torch.float32, torch.float32, torch.float16,
             1032, 1000), (torch.bfloat16, torch.bfloat16, torch.bfloat16, 40000, 40000)]
    for zt, ut, ot, vs, vt in cases:
        z, u = logits(n, vs, zt, seed=vs + 1), logits(n, vt, ut, seed=vt + 2, scale=2.5)
        z[1] = -math.inf
        u[3, ::3] = -math.inf
        tokens = torch.randint(0, min(vs, vt), (n,), device=DEVICE, generator=gen_for(vs + 3))
        coef = random_coef(n, seed=vs + 4, zero_rows=(4,))
        policy = _policy_near_ratio_one(z, u, tokens, 0.9, seed=vs + 5)
        buffer = torch.full((n, vs + 8), 3.0, device=DEVICE, dtype=ot)
        out = buffer[:, 8:]
        stats = ops.row_stats_grad_into(z, u, tokens, coef, policy, 0.2, 0.9, out)
        ref_stats, ref_dz = row_stats_grad_composed(torch_backend, z, u, tokens, coef.clone(), policy, 0.2, 0.9,
                                                    ot)
        what = f"into {plan} {SHORT[zt]}/{SHORT[ut]} -> {SHORT[ot]} {vs}/{vt}"
        for col, name in enumerate(STAT_NAMES):
            assert_close(stats[:, col], ref_stats[:, col], STATS_RTOL, f"{what} stats[{name}]")
        assert_close(out, ref_dz, GRAD_RTOL[ot], f"{what} dz", atol=1e-7)
        assert bool((buffer[:, :8] == 3.0).all()), f"{what}: wrote outside out"
        if EMULATOR:
            assert ops.LAST_PLAN["row_stats_grad"][4] > 0, f"{what}: not the L2 plan"


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("numel", [1, 13, 4096 * 3 + 5])
def test_scale_unless_one(dtype, numel):
    x = logits(1, numel, dtype, seed=numel).reshape(-1)
    before = x.clone()
    ops.scale_unless_one_(x, torch.ones((), device=DEVICE))
    assert torch.equal(x, before)
    ops.scale_unless_one_(x, torch.full((), -0.75, device=DEVICE))
    assert torch.equal(x, (before.float() * -0.75).to(dtype))


@pytest.mark.skipif(bool(EMULATOR), reason="GPU only")
def test_no_host_sync():
    n, v = 8, 32003
    z, u = logits(n, v, torch.bfloat16, 1), logits(n, v, torch.bfloat16, 2)
    tokens = torch.zeros(n, dtype=torch.long, device=DEVICE)
    coef = random_coef(n, 3)
    use_teacher = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    uniform = torch.rand(n, device=DEVICE, dtype=torch.float64)
    jcoef = torch.ones(n, device=DEVICE)
    ops.row_stats(z, u, tokens, 1.0)  # first call: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = ops.row_stats(z, u, tokens, 1.0)
        ops.logits_grad(z, u, tokens, stats, coef, 1.0)
        j = ops.jsd_rows(z, u, stats, 0.5, 1.0)
        ops.jsd_grad(z, u, stats, j, jcoef, 0.5, 1.0)
        ops.sample_rows(z, u, use_teacher, uniform, 1.0)
        _, dz = ops.row_stats_grad(z[:, :32000], u[:, :32000], tokens, coef, None, 0.2, 1.0, None)
        ops.scale_unless_one_(dz, jcoef[0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _f64_row_stats(zr, ur, y):
    x, w = zr.double(), ur.double()
    out = []
    for a, b in ((x, w), (w, x)):
        m, mb = a.max(), b.max()
        e = torch.exp(a - m)
        s = e.sum()
        q = e / s
        out.append((m, torch.log(s), (q * ((a - m) - (b - mb))).sum(), (q * (a - m)).sum()))
    (mq, lq, eqd, eqz), (mp, lp, epd, epu) = out
    return torch.stack([mq, lq, mp, lp, eqd, eqz, epd, epu, x[y], w[y]])


@pytest.mark.skipif(bool(EMULATOR), reason="GPU only")
def test_more_than_2_pow_31_elements():
    n, v = 17000, 128256  # 2.18e9 elements per tensor, 4.4 GB each in bf16
    assert n * v > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 16e9:
        pytest.skip("needs ~16 GB of free GPU memory")
    g = gen_for(5)
    z = torch.randn(n, v, device=DEVICE, generator=g, dtype=torch.bfloat16)
    u = torch.randn(n, v, device=DEVICE, generator=g, dtype=torch.bfloat16)
    rows = torch.tensor([0, 8191, 16744, n - 1], device=DEVICE)  # 16744 * 128256 > 2^31
    z[n - 1, 5] = 12.0  # a distinctive last row
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    stats = ops.row_stats(z, u, tokens, 1.0)
    for r in rows.tolist():
        ref = _f64_row_stats(z[r], u[r], tokens[r].item())
        assert_close(stats[r], ref, 1e-4, f"row {r} stats vs float64")
    coef = torch.zeros(n, 4, device=DEVICE)
    coef[rows] = torch.tensor([0.7, -0.3, 0.2, 0.5], device=DEVICE)
    dz = ops.logits_grad(z, u, tokens, stats, coef, 1.0)
    for r in rows.tolist():
        x, w = z[r].double(), u[r].double()
        q, p = torch.softmax(x, 0), torch.softmax(w, 0)
        d = (x - x.max()) - (w - w.max())
        ref = 0.7 * q * (d - (q * d).sum()) - 0.3 * q + 0.2 * p
        ref[tokens[r]] += 0.5
        assert_close(dz[r], ref, 2 ** -8 + 6e-3, f"row {r} grad vs float64", atol=0)
    assert bool((dz[1:8191] == 0).all())
    del dz
    use_teacher = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    uniform = torch.rand(n, device=DEVICE, generator=g, dtype=torch.float64)
    idx = ops.sample_rows(z, u, use_teacher, uniform, 1.0)
    check_samples(z[rows], u[rows], use_teacher[rows], uniform[rows], 1.0, idx[rows], "2^31 sample", min_agree=0.0)


# ----------------------------------------------------------------------------------------------------------
# a common offset under a temperature: against float64
# ----------------------------------------------------------------------------------------------------------

def _f64_centred_rows(z, u, tokens, inv_temp):
    """Float64 truth from each entry's float32 value and the float32 1/tau the kernels get: the 13 row_stats
    columns (UA: the first argmax's u) and q, p, d, log q, log p over the first V columns."""
    vocab = min(z.shape[1], u.shape[1])
    it = torch.tensor(inv_temp, dtype=torch.float32).item()
    x, w = z[:, :vocab].double().cpu(), u[:, :vocab].double().cpu()
    m_q, m_p = x.amax(1, keepdim=True), w.amax(1, keepdim=True)
    cq, cp = (x - m_q) * it, (w - m_p) * it
    lse_q, lse_p = torch.logsumexp(cq, 1, keepdim=True), torch.logsumexp(cp, 1, keepdim=True)
    log_q, log_p = cq - lse_q, cp - lse_p
    q, p = log_q.exp(), log_p.exp()
    d = cq - cp
    y = tokens.cpu()[:, None]
    ua = w.gather(1, x.argmax(1, keepdim=True))
    eq_da = (q * (d + (ua - m_p) * it)).sum(1)
    cols = [m_q[:, 0], lse_q[:, 0], m_p[:, 0], lse_p[:, 0], (q * d).sum(1), (q * cq).sum(1), -(p * d).sum(1),
            (p * cp).sum(1), x.gather(1, y)[:, 0], w.gather(1, y)[:, 0], ua[:, 0], eq_da, (lse_q - lse_p)[:, 0]]
    return torch.stack(cols, 1), dict(q=q, p=p, d=d, log_q=log_q, log_p=log_p, it=it, x=x, w=w)


@pytest.mark.parametrize("tau", [2.7, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
def test_offset_logits_under_temperature_against_float64(monkeypatch, dtype, tau):
    """Rows of 3 randn around -1000, 700, -2e4 and 3e4: the centred logits are fl(fl(z - M) * inv_temp) from the
    raw max, exact up to one rounding relative to |z - M|. Scaling first (fl(z * inv_temp) - M', the kernels before
    the raw maxima) rounded them at ulp(|z / tau|) before the cancellation (3e-5 for -1000 at tau = 2.7, 7.8e-3 for
    3e4 at tau = 0.37): float32 stats were off by up to 2e-4 (tau = 2.7) and 1.2e-3 (0.37) relative, gradients by
    2.5e-4 and 1e-3; now ~4e-7 and ~5e-7 (bf16: LOG_RATIO 3.5e-6; emulator). Stats of row_stats and row_stats_grad (both
    plans) to 1e-5, float32 gradients (logits_grad, jsd_grad, row_stats_grad with a policy factor) to 1e-4 of
    float64; bf16 rows (coarse at these offsets: ties at the max) to their output rounding."""
    n, v, beta = 4, 32000, 0.5
    inv_temp = 1.0 / tau
    offset = torch.tensor([-1000.0, 700.0, -2e4, 3e4], device=DEVICE)[:, None]
    z = (logits(n, v, torch.float32, seed=101) + offset).to(dtype)
    u = (logits(n, v, torch.float32, seed=102) + offset).to(dtype)
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=gen_for(103))
    ref, f = _f64_centred_rows(z, u, tokens, inv_temp)
    q, p, d, it = f["q"], f["p"], f["d"], f["it"]
    grad_rtol = 1e-4 if dtype == torch.float32 else GRAD_RTOL[dtype]

    def check_f64_stats(stats, what):
        stats = stats.double().cpu()
        for col, name in enumerate(STAT_NAMES + ["UA", "EQ_DA", "LOG_RATIO"]):
            if col in (UA, EQ_DA):
                continue
            assert_close(stats[:, col], ref[:, col], 1e-5, f"{what} [{name}]", atol=0.0)
        # UA: u at an argmax of z (the kernels may take another tied entry); EQ_DA relative to that UA
        ua = stats[:, UA, None]
        assert bool(((f["x"] == ref[:, M_Q, None]) & (f["w"] == ua)).any(1).all()), f"{what}: UA"
        eq_da = (q * (d + (ua - ref[:, M_P, None]) * it)).sum(1)
        assert_close(stats[:, EQ_DA], eq_da, 1e-5, f"{what} [EQ_DA]", atol=0.0)

    stats = ops.row_stats(z, u, tokens, inv_temp)
    check_f64_stats(stats, "row_stats")

    coef = random_coef(n, 104)
    coef[:, C_Y] = 0.0  # the token's constant term would dominate the norms
    cf = coef.double().cpu()
    ref_dz = cf[:, C_KL, None] * q * (d - ref[:, EQ_D, None]) + cf[:, C_Q, None] * q + cf[:, C_P, None] * p
    dz = ops.logits_grad(z, u, tokens, stats, coef, inv_temp)
    assert_close(dz.double().cpu(), ref_dz, grad_rtol, "logits_grad", atol=0.0)

    m = torch.logaddexp(f["log_p"] + math.log(beta), f["log_q"] + math.log(1 - beta))
    g, h = f["log_q"] - m, f["log_p"] - m
    at_anchor = (f["x"] == ref[:, M_Q, None]) & (f["w"] == stats.double().cpu()[:, UA, None])
    g_a = torch.where(at_anchor, g, 0.0).sum(1, keepdim=True) / at_anchor.sum(1, keepdim=True)
    ref_jsd = torch.stack((beta * (p * h).sum(1) + (1 - beta) * (q * g).sum(1), (q * (g - g_a)).sum(1)), 1)
    jsd = ops.jsd_rows(z, u, stats, beta, inv_temp)
    assert_close(jsd[:, 0].double().cpu(), ref_jsd[:, 0], 1e-5, "jsd_rows JSD", atol=0.0)
    assert_close(jsd[:, 1].double().cpu(), ref_jsd[:, 1], 1e-5, "jsd_rows E_q[g - g_a]", atol=0.0)
    jcoef = torch.full((n,), 0.7, device=DEVICE)
    ref_jdz = 0.7 * q * (g - (q * g).sum(1, keepdim=True))
    assert_close(ops.jsd_grad(z, u, stats, jsd, jcoef, beta, inv_temp).double().cpu(), ref_jdz, grad_rtol,
                 "jsd_grad", atol=0.0)

    # row_stats_grad with MiniLLM's policy factor inside the clip band (rho = exp(log q(y) - old) w, w = 1):
    # d pg / d log q(y) = -A rho multiplies c_q, so log q(y) = (ZY - M_Q) inv_temp - LOGS_Q enters the gradient
    log_q_y = f["log_q"].gather(1, tokens.cpu()[:, None])[:, 0]
    noise = torch.randn(2, n, device=DEVICE, generator=gen_for(105)).double().cpu()
    policy = torch.stack((noise[0], log_q_y + 0.02 * noise[1], torch.ones(n, dtype=torch.float64)), 1)
    policy = policy.float().to(DEVICE)
    pol = policy.double().cpu()
    factor = -pol[:, 0] * torch.exp(log_q_y - pol[:, 1])
    ref_pdz = cf[:, C_KL, None] * q * (d - ref[:, EQ_D, None]) + (cf[:, C_Q] * factor)[:, None] * q \
        + cf[:, C_P, None] * p
    for plan in ("one pass", "l2:3"):  # a cluster per row; two passes over chunks of rows in L2
        if plan == "one pass":
            monkeypatch.delenv("MINILLM_FAST_FUSED_PLAN", raising=False)
        else:
            monkeypatch.setenv("MINILLM_FAST_FUSED_PLAN", plan)
        st, pdz = ops.row_stats_grad(z, u, tokens, coef, policy, 0.2, inv_temp, None)
        check_f64_stats(st, f"row_stats_grad {plan}")
        if pdz.numel() == 0:  # no one-pass plan on this GPU (no clusters, less shared memory than an H100's)
            assert plan == "one pass" and not EMULATOR, f"row_stats_grad {plan}: no plan"
            continue
        assert_close(pdz.double().cpu(), ref_pdz, grad_rtol, f"row_stats_grad {plan} dz", atol=0.0)

    use_teacher = torch.tensor([False, True, False, True], device=DEVICE)
    uniform = torch.rand(n, device=DEVICE, generator=gen_for(106), dtype=torch.float64)
    idx = ops.sample_rows(z, u, use_teacher, uniform, inv_temp)
    check_samples(z, u, use_teacher, uniform, inv_temp, idx, "sample_rows", min_agree=0.75)

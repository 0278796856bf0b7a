"""The fused-linear Triton kernels (``minillm_fast.backends.triton_fused_linear``): row statistics and the pulled-back
logit gradient straight from hidden states and lm_head weights, the logits existing only as tiles.

Oracle: float64 computed here from the same (already rounded) inputs, independently of every kernel and backend:

* statistics: the logits ``softcap * tanh(logit_scale * (h @ W.T + b) / softcap)`` in float64, then the 10 columns
  of ``minillm_fast.backends`` by their definitions (maxima, log-normalisers, the four means, the token's logits);
* gradients: autograd in float64 through the lm_head of the row loss
  ``A KL(q || p) + C logsumexp(z') + P (stop-grad p) . z' + Y z'_y`` (z' = z / tau), whose logit gradient is
  ``inv_temp (A q (d - E_q[d]) + C q + P p + Y [v == y])``: the kernel gets coef = inv_temp (A, C, P, Y).

Tolerances are the design's (``loss_tol`` for the statistics, column by column; ``grad_tol`` for d hidden,
d weight and d bias). Tiles are shrunk to tl.dot's minimum (16) so that every case runs several row blocks,
vocabulary tiles, hidden-size chunks and vocabulary splits. Without a GPU the kernels run under Triton's interpreter
on CPU tensors; on a CUDA machine the same tests run the compiled kernels on the GPU (``test_default_tiles`` then
also runs the configured H100 tiles).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch

from _helpers import assert_close_rel, backend_unavailable_reason, grad_tol, loss_tol

# On a CUDA machine the compiled kernels run on the GPU (the oracle stays on the CPU, in float64); elsewhere the
# kernels run on CPU tensors under Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    _REASON = None if importlib.util.find_spec("triton") is not None else "triton is not installed"
else:
    _REASON = backend_unavailable_reason("triton")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

if _REASON is None:
    from minillm_fast.backends import triton_fused_linear as tfl
    from minillm_fast.backends import M_P, M_Q, EQ_D, EQ_DA, EP_D, LOGS_P, LOGS_Q, NUM_STATS, UA, UY, ZY

    DEFAULT_CONFIG = dict(tfl.CONFIG)  # before the fixture shrinks the tiles

    import triton
    import triton.language as tl
    tanh_and_slope = tfl._k.tanh_and_slope

    @triton.jit
    def _tanh_and_slope_kernel(x_ptr, th_ptr, slope_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        th, slope = tanh_and_slope(tl.load(x_ptr + i, mask=i < n, other=0.0))
        tl.store(th_ptr + i, th, mask=i < n)
        tl.store(slope_ptr + i, slope, mask=i < n)


def run_tanh_and_slope(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tanh x, 1 - tanh^2 x) from the soft-cap's ``tanh_and_slope``, back on the host."""
    x_dev = on_device(x)
    th, slope = torch.empty_like(x_dev), torch.empty_like(x_dev)
    _tanh_and_slope_kernel[(triton.cdiv(x.numel(), 1024),)](x_dev, th, slope, x.numel(), BLOCK=1024)
    return th.cpu(), slope.cpu()

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NEG_INF = -math.inf


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16 (tl.dot's minimum) unless a test sets others; SPLIT_V per test."""
    small = tfl.TileConfig(block_n=16, block_v=16, block_k=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(tfl, "CONFIG", dict.fromkeys(tfl.CONFIG, small))
    monkeypatch.setattr(tfl, "SPLIT_V", 3)
    monkeypatch.setattr(tfl, "MERGE_BLOCK", 16)
    # 16-bit weights: vocabulary chunks of 40 rows in the gradient pass (not a multiple of the 16-wide tiles).
    monkeypatch.setattr(tfl, "WEIGHT_GRAD_CHUNK_BYTES", 40 * 4 * 40)


# ----------------------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ----------------------------------------------------------------------------------------------------------

def on_device(x):
    """A tensor (or None), or a Head, on DEVICE (the kernels' side; everything else stays on the CPU)."""
    if x is None or isinstance(x, torch.Tensor):
        if x is None or x.device.type == DEVICE:
            return x
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=DEVICE).copy_(x)  # keeps strides
    return Head(on_device(x.hidden), on_device(x.weight), on_device(x.bias), x.logit_scale, x.softcap)


def cpu(xs):
    return tuple(None if x is None else x.cpu() for x in xs)


@dataclass
class Head:
    """The fields of ``fused_linear._Head`` (what the launchers read)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None


def make_head(gen, n, h, v, dtype, *, bias=False, scale=None, softcap=None, logit_std=2.0) -> Head:
    """Random head whose logits have a standard deviation of about ``logit_std``, rounded to ``dtype``."""
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * (logit_std / math.sqrt(h))).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    return Head(hidden, weight, b, scale, softcap)


def logits64(head: Head, hidden=None, weight=None, bias=None, surrogate=False) -> torch.Tensor:
    """float64 logits of ``head`` (or of the given float64 leaves); with ``surrogate`` -inf bias entries become
    -1e300 (the same zero probability, differentiable without NaN)."""
    h = head.hidden.double() if hidden is None else hidden
    w = head.weight.double() if weight is None else weight
    z = h @ w.T
    if head.bias is not None:
        b = head.bias.double() if bias is None else bias
        if surrogate:
            b = surrogate_bias(b)
        z = z + b
    if head.logit_scale is not None:
        z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


def ref_stats(student: Head, teacher: Head, tokens, inv_temp) -> torch.Tensor:
    """float64 [N, NUM_STATS] row statistics by definition (the layout of ``minillm_fast.backends``: the maxima, ZY,
    UY and UA of the raw logits, the rest of the centred ones (logits - max) / tau)."""
    vocab = min(student.weight.shape[0], teacher.weight.shape[0])
    z = logits64(student)[:, :vocab]
    u = logits64(teacher)[:, :vocab]
    out = torch.zeros(z.shape[0], NUM_STATS, dtype=torch.float64)
    m_q, m_p = z.amax(1), u.amax(1)
    xc = (z - torch.where(torch.isfinite(m_q), m_q, 0.0)[:, None]) * inv_temp
    yc = (u - torch.where(torch.isfinite(m_p), m_p, 0.0)[:, None]) * inv_temp
    e_q, e_p = xc.exp(), yc.exp()
    s_q, s_p = e_q.sum(1), e_p.sum(1)

    def mean(e, s, v):
        return torch.where(e > 0, e * v, 0.0).sum(1) / s
    out[:, M_Q], out[:, LOGS_Q], out[:, M_P], out[:, LOGS_P] = m_q, s_q.log(), m_p, s_p.log()
    out[:, EQ_D], out[:, EQ_D + 1] = mean(e_q, s_q, xc - yc), mean(e_q, s_q, xc)
    out[:, EP_D], out[:, EP_D + 1] = mean(e_p, s_p, yc - xc), mean(e_p, s_p, yc)
    out[:, UA] = u.gather(1, z.argmax(1, keepdim=True))[:, 0]  # the anchor: u at the (first) argmax of z
    out[:, EQ_DA] = mean(e_q, s_q, xc - (u - out[:, UA, None]) * inv_temp)
    if tokens is not None:
        ok = (tokens >= 0) & (tokens < vocab)
        idx = torch.where(ok, tokens, 0)[:, None]
        out[:, ZY] = torch.where(ok, z.gather(1, idx)[:, 0], 0.0)
        out[:, UY] = torch.where(ok, u.gather(1, idx)[:, 0], 0.0)
    return out


def surrogate_bias(b: torch.Tensor) -> torch.Tensor:
    b = b.double()
    return torch.where(torch.isneginf(b), torch.full_like(b, -1e300), b)


def student_leaves_and_logits(student: Head, teacher: Head, inv_temp):
    """float64 leaves (hidden, weight, bias) of the student's head and both models' logits / tau over the shared
    vocabulary, x from those leaves (autograd reaches them), y constant."""
    leaves = [student.hidden.double().requires_grad_(), student.weight.double().requires_grad_(),
              None if student.bias is None else surrogate_bias(student.bias).requires_grad_()]
    vocab = min(student.weight.shape[0], teacher.weight.shape[0])
    x = logits64(student, *leaves, surrogate=True)[:, :vocab] * inv_temp
    y = logits64(teacher, surrogate=True)[:, :vocab] * inv_temp
    return leaves, x, y


def ref_grads(student: Head, teacher: Head, tokens, weights, inv_temp):
    """float64 (d hidden, d weight, d bias) of sum over rows of A KL(q||p) + C lse(z') + P sg(p).z' + Y z'_y, by
    autograd through the student's lm_head; ``weights`` = float64 [N, 4] rows (A, C, P, Y)."""
    # A -inf bias entry enters as a leaf of -1e300, not as a constant: its gradient is the limit one (e.g. -p_v
    # for forward KL where only the student is -inf), which is what the logit-gradient formula gives.
    leaves, x, y = student_leaves_and_logits(student, teacher, inv_temp)
    vocab = x.shape[1]
    log_q, log_p = torch.log_softmax(x, 1), torch.log_softmax(y, 1)
    q, p = log_q.exp(), log_p.exp()
    a, c, pw, yw = weights.unbind(1)
    total = (a * (q * (log_q - log_p)).sum(1) + c * torch.logsumexp(x, 1) + pw * (p * x).sum(1)).sum()
    if tokens is not None:
        ok = (tokens >= 0) & (tokens < vocab)
        total = total + (torch.where(ok, yw, 0.0) * x.gather(1, torch.where(ok, tokens, 0)[:, None])[:, 0]).sum()
    total.backward()
    grads = [None if t is None else t.grad for t in leaves]
    assert all(g is None or torch.isfinite(g).all() for g in grads), "reference gradient not finite (test bug)"
    return grads


def row_weights(gen, n, *, zero_rows=(), no_kl=slice(0, 0), student_only_from=None) -> torch.Tensor:
    """float64 [N, 4] random (A, C, P, Y): rows ``zero_rows`` all 0; rows ``no_kl`` A = 0 (the teacher is still
    needed, for P); rows from ``student_only_from`` on A = P = 0 (no teacher term: a whole row block of those
    skips the teacher tile)."""
    w = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    w[list(zero_rows)] = 0.0
    w[no_kl, 0] = 0.0
    if student_only_from is not None:
        w[student_only_from:, 0] = 0.0
        w[student_only_from:, 2] = 0.0
    return w


def run_and_check(student, teacher, tokens, weights, inv_temp, *, stats_tol=None, stats_slack=1e-6,
                  grad_tol_=None, needs=(True, True, True)):
    """Kernel statistics and gradients against the float64 oracle; returns (stats, grads)."""
    dtypes = (student.hidden.dtype, teacher.hidden.dtype)
    stats = tfl.row_stats(on_device(student), on_device(teacher), on_device(tokens), inv_temp).cpu()
    assert stats.dtype == torch.float32 and stats.shape == (student.hidden.shape[0], NUM_STATS)
    want = ref_stats(student, teacher, tokens, inv_temp)
    tol = loss_tol(*dtypes) if stats_tol is None else stats_tol
    for j in range(UA):
        assert_close_rel(stats[:, j], want[:, j], tol, abs_slack=stats_slack, what=f"stats column {j}")
    # The anchor: NaN (none) where it is not finite (an empty row, the teacher -inf at the argmax: -1e300 here).
    anchored = (want[:, [UA, EQ_DA]].abs() < 1e30).all(1)
    for j in (UA, EQ_DA):
        assert_close_rel(stats[anchored, j], want[anchored, j], tol, abs_slack=stats_slack, what=f"stats column {j}")
    assert torch.isnan(stats[~anchored][:, [UA, EQ_DA]]).all()

    coef = (weights * inv_temp).to(torch.float32)
    # Rows whose coefficients are all zero must not read their statistics (an empty row's are -inf and NaN).
    poisoned = stats.clone()
    poisoned[(coef == 0).all(1)] = math.nan
    grads = cpu(tfl.logits_grad_pullback(on_device(student), on_device(teacher), on_device(tokens),
                                         on_device(poisoned), on_device(coef), inv_temp, needs=needs))
    check_pulled_back(grads, ref_grads(student, teacher, tokens, weights, inv_temp), student, needs, grad_tol_)
    return stats, grads


def check_pulled_back(grads, ref, student, needs, grad_tol_=None):
    """A launcher's (d hidden, d weight, d bias) against the float64 ones: None where not needed, dtypes, shapes,
    values within the gradient tolerance."""
    gtol = grad_tol(student.hidden.dtype) if grad_tol_ is None else grad_tol_
    for name, got, exp, need in zip(("hidden", "weight", "bias"), grads, ref, needs):
        if exp is None or not need:
            assert got is None, f"d {name}: expected None"
            continue
        # d weight of a 16-bit weight comes back in its dtype (float32 sums per vocabulary chunk, rounded once).
        want_dtype = student.weight.dtype if name == "weight" else torch.float32
        assert got.dtype == want_dtype and got.shape == exp.shape, f"d {name}: {got.dtype} {tuple(got.shape)}"
        assert_close_rel(got, exp, gtol, what=f"d {name}")


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    n: int = 37  # three row blocks of 16
    hs: int = 24  # two chunks of 16
    ht: int = 40  # three chunks
    vs: int = 97  # seven vocabulary tiles of 16 (the shared V = 97)
    vt: int = 103
    bias: tuple = (True, False)
    scale: tuple = (1.3, None)
    softcap: tuple = (5.0, 7.0)
    temperature: float = 0.7
    tokens: bool = True
    split: int = 3


CASES = {
    "f32": Case(F32),
    "bf16": Case(BF16, bias=(False, True), scale=(None, 0.8), softcap=(4.0, None), temperature=1.5, split=2),
    "f16": Case(F16, hs=40, ht=24, bias=(True, True), scale=(0.9, 1.1), softcap=(None, None), temperature=1.0,
                tokens=False, split=7),
    # Student vocabulary padded beyond the teacher's: its columns >= V_t get no gradient; split 1 (no merge work).
    "f32_padded_student": Case(F32, vs=103, vt=97, bias=(True, True), softcap=(None, 6.0), temperature=2.0, split=1),
    "f32_plain": Case(F32, hs=16, ht=16, bias=(False, False), scale=(None, None), softcap=(None, None),
                      temperature=1.0, split=4),
}


def make_case(gen, case: Case):
    s = make_head(gen, case.n, case.hs, case.vs, case.dtype, bias=case.bias[0], scale=case.scale[0],
                  softcap=case.softcap[0])
    t = make_head(gen, case.n, case.ht, case.vt, case.dtype, bias=case.bias[1], scale=case.scale[1],
                  softcap=case.softcap[1])
    vocab = min(case.vs, case.vt)
    tokens = None
    if case.tokens:
        tokens = torch.randint(0, vocab, (case.n,), generator=gen)
        tokens[[1, 17]] = -1  # rows that own no token (vocabulary-parallel: another rank's)
        tokens[2] = vocab  # just outside the shared vocabulary
        tokens[3] = vocab - 1  # the last column, in the last (partial) tile
    return s, t, tokens


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, gen, monkeypatch):
    """Statistics and all three gradients against float64; dtypes, bias / scale / soft-cap combinations
    (different per model), temperature, H_s != H_t, V_s != V_t, odd sizes, tokens -1 / out of range / absent, rows
    with all-zero coefficients (and NaN statistics), a row block with c_p but no c_kl and one without teacher
    terms."""
    case = CASES[name]
    monkeypatch.setattr(tfl, "SPLIT_V", case.split)
    s, t, tokens = make_case(gen, case)
    weights = row_weights(gen, case.n, zero_rows=(0, 5, 20), no_kl=slice(16, 32), student_only_from=32)
    _, (dh, dw, db) = run_and_check(s, t, tokens, weights, 1.0 / case.temperature)
    vocab = min(case.vs, case.vt)
    assert (dw[vocab:] == 0).all() and (db is None or (db[vocab:] == 0).all())
    assert (dh[[0, 5, 20]] == 0).all(), "rows whose coefficients are all zero must get exactly zero"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_default_tiles(dtype, gen, monkeypatch):
    """The configured (H100) tiles, float32 and 16-bit, larger than the problem in every dimension, and the
    automatic split."""
    monkeypatch.setattr(tfl, "CONFIG", DEFAULT_CONFIG)
    monkeypatch.setattr(tfl, "SPLIT_V", None)
    monkeypatch.setattr(tfl, "MERGE_BLOCK", 128)
    s, t, tokens = make_case(gen, Case(dtype, n=21, vs=45, vt=50, hs=20, ht=36))
    run_and_check(s, t, tokens, row_weights(gen, 21, zero_rows=(4,)), 1.0 / 0.7)


def test_configured_tiles_are_valid():
    """The module's own tiles (as configured, before this file shrinks them) are usable by tl.dot."""
    for cfg in DEFAULT_CONFIG.values():
        for block in (cfg.block_n, cfg.block_v, cfg.block_k):
            assert block >= 16 and block & (block - 1) == 0, cfg
        assert cfg.num_warps & (cfg.num_warps - 1) == 0 and cfg.num_stages >= 1, cfg


# ----------------------------------------------------------------------------------------------------------
# -inf, extreme logits, empty rows
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [1, 7])
def test_neg_inf_bias(split, gen, monkeypatch):
    """-inf bias entries (masked vocabulary): a whole vocabulary tile of -inf in both models (with one split per
    tile it is a split with no finite entry at all; with one split, a tile that leaves the running state as it
    is), scattered -inf columns in both, student-only -inf columns, a soft-capped teacher (-inf becomes -softcap
    there, as in the model) and a token on a -inf column (ZY = -inf). No mass and exactly zero gradient where both
    models are -inf."""
    monkeypatch.setattr(tfl, "SPLIT_V", split)
    n, v = 37, 97
    s = make_head(gen, n, 24, v, F32, bias=True)
    t = make_head(gen, n, 40, v, F32, bias=True)
    both = torch.zeros(v, dtype=torch.bool)
    both[16:32] = True
    both[[0, 40, 41, 96]] = True
    s.bias[both], t.bias[both] = NEG_INF, NEG_INF
    s.bias[[50, 51, 70]] = NEG_INF  # student only: q = 0 there, the teacher keeps mass
    live = (~both).nonzero().squeeze(1)
    tokens = live[torch.randint(0, live.numel(), (n,), generator=gen)]
    tokens[4] = 50  # a student -inf column: ZY = -inf
    weights = row_weights(gen, n, zero_rows=(9,))
    _, (dh, dw, db) = run_and_check(s, t, tokens, weights, 1.0 / 1.3)
    assert (dw[both] == 0).all() and (db[both] == 0).all()

    t.softcap = 3.0  # the teacher's -inf entries become -3: finite, with mass
    stats, _ = run_and_check(s, t, tokens, weights, 1.0)
    assert torch.isneginf(stats[4, ZY]) and torch.isfinite(stats[:, M_P]).all()


def test_extreme_logits(gen, monkeypatch):
    """float32 logits ~1e4 (nearly one-hot rows): the per-row KLs (EQ_D - LOGS_Q + LOGS_P, EP_D - LOGS_P + LOGS_Q)
    and the statistics within 2e-5; the gradients finite and within 2e-2, as for the blocked path (float32 logits
    of size |z| carry an absolute error |z| 2^-24 ~ 1e-3 that no float32 lm_head avoids)."""
    n, v = 21, 70
    s = make_head(gen, n, 24, v, F32, bias=True, logit_std=3000.0)
    t = make_head(gen, n, 40, v, F32, logit_std=3000.0)
    assert (s.hidden @ s.weight.T).abs().max() > 5e3
    tokens = torch.randint(0, v, (n,), generator=gen)
    # Statistics near 0 (LOGS, the centred means of one-hot rows) carry that absolute error: slack 1e-3.
    stats, grads = run_and_check(s, t, tokens, row_weights(gen, n, zero_rows=(3,)), 1.0, stats_slack=1e-3,
                                 grad_tol_=2e-2)
    want = ref_stats(s, t, tokens, 1.0)
    for name, got, exp in (("KL(q||p)", stats[:, EQ_D] - stats[:, LOGS_Q] + stats[:, LOGS_P],
                            want[:, EQ_D] - want[:, LOGS_Q] + want[:, LOGS_P]),
                           ("KL(p||q)", stats[:, EP_D] - stats[:, LOGS_P] + stats[:, LOGS_Q],
                            want[:, EP_D] - want[:, LOGS_P] + want[:, LOGS_Q])):
        assert_close_rel(got, exp, loss_tol(F32), what=name)
    assert all(torch.isfinite(x).all() for x in grads)


def test_empty_student_rows(gen):
    """A student whose every entry is -inf: M_Q = LOGS_Q = -inf on every row (the ops treat such rows as masked
    and give them zero coefficients), the teacher's statistics unaffected, and zero gradients without NaN."""
    n, v = 20, 40
    s = make_head(gen, n, 16, v, F32, bias=True, scale=2.0)
    t = make_head(gen, n, 16, v, F32)
    s.bias.fill_(NEG_INF)
    stats = tfl.row_stats(on_device(s), on_device(t), None, 1.0).cpu()
    assert torch.isneginf(stats[:, M_Q]).all() and torch.isneginf(stats[:, LOGS_Q]).all()
    want = ref_stats(s, t, None, 1.0)
    for j in (M_P, LOGS_P, EP_D + 1):
        assert_close_rel(stats[:, j], want[:, j], loss_tol(F32), what=f"stats column {j}")
    dh, dw, db = cpu(tfl.logits_grad_pullback(on_device(s), on_device(t), None, on_device(stats),
                                              on_device(torch.zeros(n, 4)), 1.0))
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Which gradients, zero coefficients, no rows, strides
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_needs(needs, gen):
    """Only the requested gradients are formed (None for the others), each still right."""
    s, t, tokens = make_case(gen, Case(F32, n=20, vs=50, vt=50, hs=16, ht=16))
    run_and_check(s, t, tokens, row_weights(gen, 20, student_only_from=16), 1.0 / 0.7, needs=needs)


def test_all_zero_coefficients(gen):
    """Rows whose four coefficients are all zero contribute exactly nothing (the tiles are skipped)."""
    s, t, tokens = make_case(gen, Case(F32, n=20, vs=50, vt=50, hs=16, ht=16))
    s, t, tokens = on_device(s), on_device(t), on_device(tokens)
    stats = tfl.row_stats(s, t, tokens, 1.0)
    dh, dw, db = cpu(tfl.logits_grad_pullback(s, t, tokens, stats, on_device(torch.zeros(20, 4)), 1.0))
    assert dh.shape == (20, 16) and dw.shape == (50, 16) and db.shape == (50,)
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


def test_no_rows(gen):
    s, t, tokens = make_case(gen, Case(F32, n=0, tokens=False))
    s, t = on_device(s), on_device(t)
    assert tfl.row_stats(s, t, None, 1.0).shape == (0, NUM_STATS)
    dh, dw, db = cpu(tfl.logits_grad_pullback(s, t, None, on_device(torch.zeros(0, NUM_STATS)),
                                              on_device(torch.zeros(0, 4)), 1.0))
    assert dh.shape == (0, 24) and (dw == 0).all() and dw.shape == (97, 24) and (db == 0).all()


def test_strided_inputs(gen):
    """Hidden states with a row stride (a view of wider rows), a weight that is a transposed copy's transpose
    (column-major: copied) and int32 tokens with a stride (``on_device`` keeps the strides)."""
    s, t, tokens = make_case(gen, Case(F32, n=20, vs=50, vt=50, hs=16, ht=16))
    wide = torch.randn(20, 16 + 5, generator=gen)
    wide[:, :16] = s.hidden
    s.hidden = wide[:, :16]
    t.weight = t.weight.T.contiguous().T
    assert s.hidden.stride(0) == 21 and t.weight.stride(1) != 1
    tok = torch.stack([tokens, tokens], 1).to(torch.int32)[:, 0]
    run_and_check(s, t, tok, row_weights(gen, 20), 1.0)


def test_soft_cap_tanh():
    """The soft-cap's tanh (exp and a polynomial, one code path for GPU and interpreter) within 8 float32 ulp of
    the exact one (3 measured with numpy's exp; the GPU's exp is an approximation of a few ulp), on both sides of
    the switch at |t| = 0.6, tiny, huge and infinite arguments."""
    x = torch.cat([torch.linspace(-3, 3, 2001), torch.linspace(0.59, 0.61, 501), -torch.linspace(0.59, 0.61, 501),
                   torch.tensor([0.0, 1e-30, -1e-8, 1e-3, 20.0, -1e4, 3e38, math.inf, -math.inf])])
    out, _ = run_tanh_and_slope(x)
    want = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps / 2 * want.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((out.double() - want).abs() <= 8 * ulp).all(), (out.double() - want).abs().div(ulp).max()


def test_soft_cap_slope():
    """The soft-cap's derivative 1 - tanh^2 t = 1 / cosh^2 t from t itself, within 1e-5 relative of the exact one
    out to |t| = 40 (from the rounded tanh it would be off by 7e-4 at |t| = 5 and 0 beyond |t| ~ 9)."""
    x = torch.cat([torch.linspace(-40, 40, 4001), torch.linspace(0.59, 0.61, 101), torch.tensor([0.0, math.inf])])
    _, out = run_tanh_and_slope(x)
    want = 1.0 / torch.cosh(x.double()) ** 2
    rel = (out.double() - want).abs() / want.clamp(min=1e-300)
    assert rel[torch.isfinite(x)].max() < 1e-5, rel.max()
    assert out[-1] == 0.0


def test_saturated_soft_cap_gradient(gen):
    """Student logits far past the soft-cap (pre-cap logits ~6 softcap in every column, as a large bias gives
    them, so that the whole gradient goes through the saturated cap): it matches float64 to the usual tolerance
    (1 - (logits / softcap)^2 from the rounded logits missed by ~1e-2)."""
    s = make_head(gen, 12, 16, 60, F32, bias=True, softcap=30.0)
    s.bias = torch.randn(60, generator=gen) * 5.0 + 180.0
    t = make_head(gen, 12, 16, 60, F32)
    tokens = torch.randint(0, 60, (12,), generator=gen)
    # The capped logits sit within ~1e-3 of the cap, where float32 logits are rounded at 2e-6: the statistics
    # that centre them on the max (E_q[(z - m_q) / tau], ...) inherit that rounding, as any float32 logits would.
    run_and_check(s, t, tokens, row_weights(gen, 12), 1.0, stats_tol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# Generalised JSD (0 < beta < 1): jsd_rows and jsd_grad_pullback
# ----------------------------------------------------------------------------------------------------------

def ref_jsd(student: Head, teacher: Head, weights, beta, inv_temp, stats):
    """float64 (rows [N, 2] = (JSD_beta, E_q[g - g_a]), (d hidden, d weight, d bias)) by definition, the gradients
    by autograd through the student's lm_head of sum over rows of w JSD_beta (``weights`` float64 [N]):
    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, g = log q - log m, g_a its value
    at the student's argmax (0 where ``stats`` has no anchor, UA NaN). Its logit
    gradient is w (1 - beta) inv_temp q (g - E_q[g]): the kernel gets coef = w (1 - beta) inv_temp."""
    leaves, x, y = student_leaves_and_logits(student, teacher, inv_temp)
    log_q, log_p = torch.log_softmax(x, 1), torch.log_softmax(y, 1)
    q, p = log_q.exp(), log_p.exp()
    log_m = torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
    g = torch.where(q > 0, log_q - log_m, 0.0)
    kl_q = (q * g).sum(1)
    kl_p = (p * torch.where(p > 0, log_p - log_m, 0.0)).sum(1)
    jsd = beta * kl_p + (1 - beta) * kl_q
    (weights * jsd).sum().backward()
    grads = [None if t is None else t.grad for t in leaves]
    assert all(g is None or torch.isfinite(g).all() for g in grads), "reference gradient not finite (test bug)"
    g_a = g.gather(1, x.argmax(1, keepdim=True))[:, 0]
    g_a = torch.where(torch.isnan(stats[:, 10].double()), 0.0, g_a)
    return torch.stack([jsd, (q * (g - g_a[:, None])).sum(1)], 1).detach(), grads


def run_and_check_jsd(student, teacher, weights, beta, inv_temp, *, stats=None, grad_tol_=None, value_tol=None,
                      value_slack=1e-6, needs=(True, True, True)):
    """Kernel jsd_rows and jsd_grad_pullback against the float64 oracle, from the oracle's statistics (float32)
    unless ``stats`` is given (JSD_beta within ``value_tol``, default ``loss_tol``, and ``value_slack``); the
    pull-back gets the kernel's jsd rows, with the statistics and jsd rows of the rows whose weight is 0 poisoned
    with NaN. Returns (jsd rows, grads)."""
    n = student.hidden.shape[0]
    dtypes = (student.hidden.dtype, teacher.hidden.dtype)
    if stats is None:
        stats = ref_stats(student, teacher, None, inv_temp).to(torch.float32)
    want_rows, ref = ref_jsd(student, teacher, weights, beta, inv_temp, stats)
    rows = tfl.jsd_rows(on_device(student), on_device(teacher), on_device(stats), beta, inv_temp).cpu()
    assert rows.dtype == torch.float32 and rows.shape == (n, 2)
    assert_close_rel(rows[:, 0], want_rows[:, 0], loss_tol(*dtypes) if value_tol is None else value_tol,
                     abs_slack=value_slack, what="JSD_beta")
    assert_close_rel(rows[:, 1], want_rows[:, 1], loss_tol(*dtypes), abs_slack=1e-6, what="E_q[g - g_a]")

    coef = (weights * ((1.0 - beta) * inv_temp)).to(torch.float32)
    off = coef == 0
    poisoned_stats, poisoned_rows = stats.clone(), rows.clone()
    poisoned_stats[off], poisoned_rows[off] = math.nan, math.nan  # must not be read (or must not matter)
    grads = cpu(tfl.jsd_grad_pullback(on_device(student), on_device(teacher), on_device(poisoned_stats),
                                      on_device(poisoned_rows), on_device(coef), beta, inv_temp, needs=needs))
    check_pulled_back(grads, ref, student, needs, grad_tol_)
    if grads[0] is not None:
        assert (grads[0][off] == 0).all(), "rows whose coefficient is 0 must get exactly zero"
    return rows, grads


JSD_ZERO_ROWS = (0, 5, 20, 32, 33, 34, 35, 36)  # scattered, and the whole last row block (its tiles are skipped)


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("name", list(CASES))
def test_jsd_matches_float64(name, beta, gen, monkeypatch):
    """JSD rows and the three gradients against float64, for the cases of ``test_matches_float64`` (dtypes,
    bias / scale / soft-cap per model, temperature, H_s != H_t, V_s < V_t and V_s > V_t, several row blocks,
    vocabulary tiles, K chunks and splits, 16-bit weight-gradient chunks) and two betas; rows with coef 0 (and
    NaN statistics), a whole row block of them."""
    case = CASES[name]
    monkeypatch.setattr(tfl, "SPLIT_V", case.split)
    s, t, _ = make_case(gen, case)
    weights = torch.randn(case.n, generator=gen, dtype=torch.float64)
    weights[list(JSD_ZERO_ROWS)] = 0.0
    _, (dh, dw, db) = run_and_check_jsd(s, t, weights, beta, 1.0 / case.temperature)
    vocab = min(case.vs, case.vt)
    assert (dw[vocab:] == 0).all() and (db is None or (db[vocab:] == 0).all())


@pytest.mark.parametrize("split", [1, 7])
def test_jsd_neg_inf_bias(split, gen, monkeypatch):
    """-inf bias entries: a whole vocabulary tile of -inf in both models (a split with no mass at all when there is
    one split per tile), scattered -inf columns in both (g = h = 0 there, log m = -inf), student-only (q = 0,
    h = -log beta) and teacher-only (p = 0, g = -log(1 - beta)) -inf columns; then a soft-capped teacher (its -inf
    entries become -softcap: finite, with mass). Exactly zero gradient where both models are -inf."""
    monkeypatch.setattr(tfl, "SPLIT_V", split)
    n, v = 37, 97
    s = make_head(gen, n, 24, v, F32, bias=True, scale=1.3)
    t = make_head(gen, n, 40, v, F32, bias=True)
    both = torch.zeros(v, dtype=torch.bool)
    both[16:32] = True
    both[[0, 40, 41, 96]] = True
    s.bias[both], t.bias[both] = NEG_INF, NEG_INF
    s.bias[[50, 51, 70]] = NEG_INF
    t.bias[[60, 61, 80]] = NEG_INF
    weights = torch.randn(n, generator=gen, dtype=torch.float64)
    weights[[9, 16]] = 0.0
    _, (dh, dw, db) = run_and_check_jsd(s, t, weights, 0.3, 1.0 / 1.3)
    assert (dw[both] == 0).all() and (db[both] == 0).all()
    assert (dw[[50, 51, 70]] == 0).all() and (db[[50, 51, 70]] == 0).all()  # q = 0: no gradient either

    t.softcap = 3.0
    run_and_check_jsd(s, t, weights, 0.8, 1.0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True)])
def test_jsd_after_row_stats(needs, gen, monkeypatch):
    """The chain the loss runs: the kernels' statistics, then jsd rows, then the requested gradients (None for the
    others); bf16 with 16-bit weight-gradient chunks."""
    monkeypatch.setattr(tfl, "SPLIT_V", 2)
    s, t, _ = make_case(gen, Case(BF16, n=20, vs=50, vt=45, hs=16, ht=32, bias=(True, False)))
    stats = tfl.row_stats(on_device(s), on_device(t), None, 1.0 / 0.7).cpu()
    weights = torch.randn(20, generator=gen, dtype=torch.float64)
    weights[3] = 0.0
    run_and_check_jsd(s, t, weights, 0.4, 1.0 / 0.7, stats=stats, needs=needs)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_jsd_default_tiles(dtype, gen, monkeypatch):
    """The configured (H100) tiles, larger than the problem in every dimension, and the automatic split."""
    monkeypatch.setattr(tfl, "CONFIG", DEFAULT_CONFIG)
    monkeypatch.setattr(tfl, "SPLIT_V", None)
    monkeypatch.setattr(tfl, "MERGE_BLOCK", 128)
    s, t, _ = make_case(gen, Case(dtype, n=21, vs=45, vt=50, hs=20, ht=36))
    weights = torch.randn(21, generator=gen, dtype=torch.float64)
    weights[4] = 0.0
    run_and_check_jsd(s, t, weights, 0.5, 1.0 / 0.7)


def test_jsd_beta_and_shapes(gen):
    """beta outside (0, 1) is refused (the endpoints are KLs: their own kernels); wrong shapes of coef / jsd rows
    are refused; no rows gives empty rows and zero gradients."""
    s, t, _ = make_case(gen, Case(F32, n=20, vs=50, vt=50, hs=16, ht=16, tokens=False))
    s, t = on_device(s), on_device(t)
    stats = on_device(torch.zeros(20, NUM_STATS))
    rows = on_device(torch.zeros(20, 2))
    for beta in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="beta"):
            tfl.jsd_rows(s, t, stats, beta, 1.0)
        with pytest.raises(ValueError, match="beta"):
            tfl.jsd_grad_pullback(s, t, stats, rows, on_device(torch.ones(20)), beta, 1.0)
    with pytest.raises(ValueError, match="coef"):
        tfl.jsd_grad_pullback(s, t, stats, rows, on_device(torch.ones(20, 4)), 0.5, 1.0)
    with pytest.raises(ValueError, match="jsd rows"):
        tfl.jsd_grad_pullback(s, t, stats, on_device(torch.zeros(20)), on_device(torch.ones(20)), 0.5, 1.0)

    s0, t0, _ = make_case(gen, Case(F32, n=0, tokens=False))
    s0, t0 = on_device(s0), on_device(t0)
    assert tfl.jsd_rows(s0, t0, on_device(torch.zeros(0, NUM_STATS)), 0.5, 1.0).shape == (0, 2)
    dh, dw, db = cpu(tfl.jsd_grad_pullback(s0, t0, on_device(torch.zeros(0, NUM_STATS)),
                                           on_device(torch.zeros(0, 2)), on_device(torch.zeros(0)), 0.5, 1.0))
    assert dh.shape == (0, 24) and (dw == 0).all() and dw.shape == (97, 24) and (db == 0).all()


def test_jsd_shifted_logits(gen, monkeypatch):
    """Rows far from 0 (student logits ~ -200 / tau, teacher's ~ +150 / tau): the tiles are centred by the row
    maxima, and the columns past V of a tile (whose logits read 0, where exp(0 - M_Q) overflows) get nothing."""
    monkeypatch.setattr(tfl, "SPLIT_V", 2)
    n, v = 20, 45
    s = make_head(gen, n, 16, v, F32, bias=True)
    t = make_head(gen, n, 32, v + 6, F32, bias=True, softcap=400.0)
    s.bias -= 200.0
    t.bias += 150.0
    weights = torch.randn(n, generator=gen, dtype=torch.float64)
    weights[7] = 0.0
    run_and_check_jsd(s, t, weights, 0.6, 1.0 / 0.5)


@pytest.mark.parametrize("tau", [2.7, 0.37])
def test_offset_logits_centred_before_temperature(tau, gen):
    """Logits far from 0 (student ~ -1000 + 3 randn, teacher ~ +700 and close to the student) at a temperature
    != 1: the kernels centre the raw logits on the raw row maximum before scaling, fl(fl(z - M) * inv_temp), so the
    statistics keep 1e-5 and the (reverse-KL and JSD) gradients 1e-4 relative to float64; z / tau rounded before the
    centring carries ulp(|z / tau|) ~ 3e-5 .. 1e-4 into every centred logit (errors of 4e-4 .. 1e-3 here). Hidden
    states, weights and biases are dyadic with few bits, so that the float32 logits are exact and nothing else
    differs from the oracle."""
    n, h, v = 20, 16, 70
    hidden = torch.randint(-4, 5, (n, h), generator=gen) / 4.0
    weight = torch.randint(-8, 9, (v, h), generator=gen) / 8.0
    bias = torch.randint(-96, 97, (v,), generator=gen) / 32.0
    s = Head(hidden, weight, bias - 1000.0)
    t = Head(hidden.clone(), weight + torch.randint(-1, 2, (v, h), generator=gen) / 64.0, bias + 700.0)
    assert torch.equal(logits64(s).float().double(), logits64(s))  # exact in float32
    tokens = torch.randint(0, v, (n,), generator=gen)
    weights = torch.zeros(n, 4, dtype=torch.float64)
    weights[:, 0] = torch.randn(n, generator=gen, dtype=torch.float64)  # the reverse KL alone: the cancelling term
    weights[3] = 0.0
    run_and_check(s, t, tokens, weights, 1.0 / tau, stats_tol=1e-5, stats_slack=1e-7, grad_tol_=1e-4)
    jsd_weights = torch.randn(n, generator=gen, dtype=torch.float64)
    run_and_check_jsd(s, t, jsd_weights, 0.3, 1.0 / tau, grad_tol_=1e-4)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("step", [1 / 64, 1 / 128])
def test_jsd_of_close_heads(step, beta, gen, monkeypatch):
    """Teacher weight = student weight + step * {-1, 0, 1}, the same hidden states: r = log p - log q ~ 0.03 and
    0.016, JSD ~ beta (1 - beta) E_q[r^2] / 2 per row (1e-5 .. 1.4e-4). g = log q - log m ~ -beta r and
    h ~ (1 - beta) r formed as -c - L, differences of two numbers near log 2, were rounded at ~6e-8 absolute:
    7e-5 .. 6e-4 relative error in the value; taken near q = p as -log1p(beta expm1(r)) and
    -log1p((1 - beta) expm1(-r)): 2e-6 .. 4e-6. Dyadic inputs with few bits make the float32 logits exact (and
    tau = 1 the centring), so that nothing else differs from the oracle."""
    monkeypatch.setattr(tfl, "SPLIT_V", 3)
    n, h, v = 37, 16, 97
    hidden = torch.randint(-4, 5, (n, h), generator=gen) / 4.0
    weight = torch.randint(-8, 9, (v, h), generator=gen) / 8.0
    s = Head(hidden, weight)
    t = Head(hidden.clone(), weight + torch.randint(-1, 2, (v, h), generator=gen) * step)
    assert torch.equal(logits64(t).float().double(), logits64(t))  # exact in float32
    weights = torch.randn(n, generator=gen, dtype=torch.float64)
    run_and_check_jsd(s, t, weights, beta, 1.0, value_tol=2e-5, value_slack=0.0)

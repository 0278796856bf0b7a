"""sample_mixture: draws from (1 - alpha) softmax(z / tau) + alpha softmax(u / tau), checked statistically.

Goodness of fit: Pearson's chi-square against the float64 mixture (``reference.mixture_probs``) over the tokens of
nonzero probability, rejected when its p-value is below 1e-6 (a correct sampler fails one run in a million).
Every such test also shows that the same samples reject the mixture with a wrong alpha, so the test has power.
Triton runs under its interpreter at ~30 ms per row, so its statistical test uses fewer draws.
"""
from __future__ import annotations

import math

import pytest
import torch

from minillm_fast import reference, sampling
from _helpers import NEG_INF, make_logits

P_REJECT = 1e-6

# Small vocabulary: 0-2 shared, 3 -inf in both (never drawn), 4 finite in both, 5 -inf in the teacher only,
# 6 -inf in the student only (drawn only through the teacher), 7 finite.
STUDENT = torch.tensor([2.0, 1.0, 0.0, NEG_INF, -1.0, 0.5, NEG_INF, -0.5])
TEACHER = torch.tensor([-1.0, 0.0, 2.0, NEG_INF, 1.5, NEG_INF, 0.3, -2.0])


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): 1 - P(df/2, x/2), with the lower regularised gamma by its series."""
    a, y = df / 2.0, x / 2.0
    if y <= 0:
        return 1.0
    term = 1.0 / a
    total = term
    n = 0
    while term > total * 1e-17 and n < 100000:
        n += 1
        term *= y / (a + n)
        total += term
    lower = math.exp(-y + a * math.log(y) - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


def test_chi2_sf_sanity():
    # Closed form for df = 2: exp(-x/2); and the classic 95% points.
    assert abs(chi2_sf(3.0, 2) - math.exp(-1.5)) < 1e-12
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-6
    assert abs(chi2_sf(11.070498, 5) - 0.05) < 1e-6
    assert chi2_sf(50.0, 5) < 1e-8


def goodness_of_fit(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(chi-square, p-value) of integer ``samples`` against ``probs``; a draw of a probability-0 token fails."""
    probs = probs.to(torch.float64)
    counts = torch.bincount(samples.reshape(-1), minlength=probs.numel()).to(torch.float64)
    assert counts.numel() == probs.numel(), f"token ids beyond the vocabulary: {samples.max().item()}"
    zero = probs == 0
    assert counts[zero].sum() == 0, f"drew tokens of probability 0: {torch.nonzero(zero & (counts > 0)).tolist()}"
    expected = probs[~zero] * samples.numel()
    assert expected.min() >= 5, "test design: expected counts too small for the chi-square approximation"
    chi2 = (((counts[~zero] - expected) ** 2) / expected).sum().item()
    return chi2, chi2_sf(chi2, int((~zero).sum()) - 1)


def _rows(row, n):
    return row.unsqueeze(0).repeat(n, 1)


@pytest.mark.triton_subset(alpha=[0.2], temperature=[1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.9])
def test_mixture_goodness_of_fit(backend, alpha, temperature):
    n = 400 if backend == "triton" else 40000
    z, u = _rows(STUDENT, n), _rows(TEACHER, n)
    g = torch.Generator().manual_seed(1234)
    tokens = sampling.sample_mixture(z, u, alpha=alpha, temperature=temperature, generator=g, backend=backend)
    assert tokens.dtype == torch.int64 and tokens.shape == (n,)
    probs = reference.mixture_probs(STUDENT, TEACHER, alpha=alpha, temperature=temperature)
    assert ((tokens != 3)).all(), "token 3 is -inf in both rows"
    if alpha == 0:
        assert (tokens != 6).all(), "alpha = 0 is the pure student: its -inf entries are never drawn"
    chi2, p = goodness_of_fit(tokens, probs)
    assert p > P_REJECT, f"chi-square {chi2:.1f}, p = {p:.2e}: samples do not follow the alpha={alpha} mixture"
    # Power: the same samples reject a mixture with a clearly wrong alpha (e.g. alpha and 1 - alpha swapped).
    wrong_alpha = {0.0: 0.5, 0.2: 0.8, 0.9: 0.3}[alpha]
    wrong = reference.mixture_probs(STUDENT, TEACHER, alpha=wrong_alpha, temperature=temperature)
    counts = torch.bincount(tokens, minlength=8).double()
    support = wrong > 0
    expected = wrong[support] * n
    chi2_wrong = (((counts[support] - expected) ** 2) / expected).sum().item()
    assert chi2_sf(chi2_wrong, int(support.sum()) - 1) < P_REJECT or counts[~support].sum() > 0


def test_mixture_goodness_of_fit_distinct_rows(fast_backend):
    """Rows with different distributions in one call, padded vocabularies (V_s = 8 > V_t = 6)."""
    n = 20000
    student2 = torch.tensor([0.0, 0.0, 3.0, -1.0, NEG_INF, 1.0, 9.0, 9.0])
    teacher2 = torch.tensor([1.0, -1.0, NEG_INF, 0.5, 2.0, 0.0])
    z = torch.cat([_rows(STUDENT, n), _rows(student2, n)])
    u = torch.cat([_rows(TEACHER[:6], n), _rows(teacher2, n)])
    g = torch.Generator().manual_seed(99)
    tokens = sampling.sample_mixture(z, u, alpha=0.3, generator=g, backend=fast_backend)
    assert (tokens >= 0).all() and (tokens < 6).all(), "only the first min(V_s, V_t) columns exist"
    for half, (zs, ut) in enumerate(((STUDENT, TEACHER[:6]), (student2, teacher2))):
        probs = reference.mixture_probs(zs, ut, alpha=0.3)
        chi2, p = goodness_of_fit(tokens[half * n:(half + 1) * n], probs)
        assert p > P_REJECT, f"row kind {half}: chi-square {chi2:.1f}, p = {p:.2e}"


def test_mixture_low_precision_and_3d(fast_backend):
    n = 3000
    z = _rows(STUDENT, 2 * n).reshape(2, n, 8).to(torch.bfloat16)
    u = _rows(TEACHER, 2 * n).reshape(2, n, 8).to(torch.float16)
    g = torch.Generator().manual_seed(5)
    tokens = sampling.sample_mixture(z, u, alpha=0.2, generator=g, backend=fast_backend)
    assert tokens.shape == (2, n) and tokens.dtype == torch.int64
    probs = reference.mixture_probs(z[0, 0], u[0, 0], alpha=0.2)
    chi2, p = goodness_of_fit(tokens, probs)
    assert p > P_REJECT, f"chi-square {chi2:.1f}, p = {p:.2e}"


def test_never_draws_probability_zero(backend):
    """-inf entries, and entries whose probability underflows to exactly 0, are never drawn; uniforms close to
    1 must not run past the last entry of positive probability."""
    n = 64 if backend == "triton" else 4000
    z = torch.full((n, 50), NEG_INF)
    z[:, 10] = 0.0
    z[:, 11] = 0.5
    z[:, 20:] = -1e4  # exp(-1e4) == 0: probability exactly 0
    u = torch.full((n, 50), NEG_INF)
    u[:, 30] = 3.0
    u[:, 45:] = -1e30
    u[:, 31] = 2.0
    g = torch.Generator().manual_seed(7)
    tokens = sampling.sample_mixture(z, u, alpha=0.5, generator=g, backend=backend)
    assert set(tokens.tolist()) <= {10, 11, 30, 31}
    only_student = sampling.sample_mixture(z, u, alpha=0.0, generator=g, backend=backend)
    assert set(only_student.tolist()) <= {10, 11}


def test_empty_rows_give_minus_one(backend):
    z = make_logits(torch.Generator().manual_seed(0), (6, 12))
    u = make_logits(torch.Generator().manual_seed(1), (6, 12))
    z[1] = NEG_INF               # empty student
    z[3], u[3] = NEG_INF, NEG_INF  # both empty
    g = torch.Generator().manual_seed(3)
    tokens = sampling.sample_mixture(z, u, alpha=0.0, generator=g, backend=backend)
    assert tokens[1] == -1 and tokens[3] == -1
    assert ((tokens[[0, 2, 4, 5]] >= 0) & (tokens[[0, 2, 4, 5]] < 12)).all()
    tokens = sampling.sample_mixture(z, u, alpha=0.5, generator=g, backend=backend)
    assert tokens[3] == -1
    # An empty teacher row gives -1 exactly when the teacher is chosen: with alpha=0.99, nearly always.
    u2 = u.clone()
    u2[:] = NEG_INF
    tokens = sampling.sample_mixture(z[:1].expand(8, 12), u2[:1].expand(8, 12), alpha=0.999999, generator=g,
                                     backend=backend)
    assert (tokens == -1).sum() >= 7


def test_deterministic_given_generator(backend):
    n = 16 if backend == "triton" else 500
    gen = torch.Generator().manual_seed(11)
    z, u = make_logits(gen, (n, 33)), make_logits(gen, (n, 33))
    a = sampling.sample_mixture(z, u, generator=torch.Generator().manual_seed(5), backend=backend)
    b = sampling.sample_mixture(z, u, generator=torch.Generator().manual_seed(5), backend=backend)
    c = sampling.sample_mixture(z, u, generator=torch.Generator().manual_seed(6), backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The global RNG is used without a generator: reproducible under torch.manual_seed.
    torch.manual_seed(21)
    d = sampling.sample_mixture(z, u, backend=backend)
    torch.manual_seed(21)
    e = sampling.sample_mixture(z, u, backend=backend)
    assert torch.equal(d, e)


def test_shapes_dtypes_and_layouts(backend):
    gen = torch.Generator().manual_seed(0)
    z, u = make_logits(gen, (2, 3, 17)), make_logits(gen, (2, 3, 17))
    t = sampling.sample_mixture(z, u, generator=gen, backend=backend)
    assert t.shape == (2, 3) and t.dtype == torch.int64
    t = sampling.sample_mixture(z[0, 0], u[0, 0], generator=gen, backend=backend)  # one row [V]
    assert t.shape == () and t.dtype == torch.int64
    # Non-contiguous inputs and a student that requires grad (the sampler never differentiates).
    zt = make_logits(gen, (17, 4)).t().requires_grad_(False)
    ut = make_logits(gen, (1, 17)).expand(4, 17)
    leaf = zt.detach().clone().requires_grad_(True)
    t = sampling.sample_mixture(leaf, ut, alpha=0.3, generator=gen, backend=backend)
    assert t.shape == (4,) and ((t >= 0) & (t < 17)).all()
    t = sampling.sample_mixture(torch.zeros(0, 17), torch.zeros(0, 17), generator=gen, backend=backend)
    assert t.shape == (0,) and t.dtype == torch.int64


def test_one_hot_rows(backend):
    """A row with one live entry always gives that entry, whatever the draw and the component."""
    n = 32 if backend == "triton" else 2000
    z = torch.full((n, 40), NEG_INF)
    u = torch.full((n, 40), NEG_INF)
    z[:, 17] = 1e4
    u[:, 17] = -1e4
    g = torch.Generator().manual_seed(8)
    assert (sampling.sample_mixture(z, u, alpha=0.5, generator=g, backend=backend) == 17).all()
    assert (sampling.sample_mixture(z, u, alpha=0.5, temperature=0.01, generator=g, backend=backend) == 17).all()

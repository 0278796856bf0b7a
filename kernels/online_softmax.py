"""Per-row softmax math shared by every Triton kernel: loads of scaled logits, the online (one-pass) max / rescaled
sums update, the merge of two partial states, log-probabilities and a stable logaddexp.

A row is processed block by block. The state of one distribution after some blocks is a scalar running max ``m``
and per-lane partial sums (vectors of the block's shape, reduced once at the end of the row), all relative to
``m``::

    s = sum exp(x - m)                   (the normaliser)
    a = sum exp(x - m) * v               (numerator of E[v], for one value v per entry)
    b = sum exp(x - m) * (x - m)         (numerator of E[x - m], the "centred" mean, <= 0)

When the max grows from m to m' = m + delta, every term is multiplied by exp(-delta); the centred sum also moves
its origin, ``(x - m') = (x - m) - delta``, hence::

    s' = exp(-delta) s,   a' = exp(-delta) a,   b' = exp(-delta) (b - delta s).

Each block costs one ``tl.max`` and one ``exp`` per element (plus one scalar exp). Entries of zero weight
(exp(x - m) == 0, e.g. x = -inf) contribute nothing even where v or x - m is infinite: 0 * inf = 0 here, as
everywhere in the library. A row with no finite entry keeps m = -inf and s = 0 (log s = -inf).
"""
import triton
import triton.language as tl


@triton.jit
def load_scaled(row_ptr, cols, mask, inv_temp):
    """x = float32(logits[cols]) * inv_temp, -inf outside ``mask``. The logits are read exactly once per kernel, so
    they are marked evict-first."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first")
    return x.to(tl.float32) * inv_temp


@triton.jit
def finite_or_zero(m):
    """m where it is finite, else 0 (the shift used for an empty row, whose max is -inf)."""
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def rescale_factors(m, x):
    """For a new block x: (m' = max(m, max x), shift = finite m', alpha = exp(m - m'), delta = m' - m).

    alpha is 0 and delta is 0 while nothing finite has been seen (m = -inf), so the empty sums stay exactly 0."""
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = finite_or_zero(m_new)
    alpha = tl.exp(m - shift)
    delta = tl.where(m > float("-inf"), m_new - m, 0.0)
    return m_new, shift, alpha, delta


@triton.jit
def online_max_sum(m, s, x):
    """Online update of (m, s = sum exp(x - m)) with one block x; s is per-lane."""
    m_new, shift, alpha, delta = rescale_factors(m, x)
    e = tl.exp(x - shift)
    return m_new, s * alpha + e


@triton.jit
def online_update(m, s, a, b, x, v):
    """Online update of (m, s, a, b) (see the module docstring) with one block of scaled logits x and values v.

    ``a`` is rescaled with a guard so that a term which was +-inf (v infinite where the weight was positive) but whose
    weight has since underflowed to 0 does not turn into inf * 0 = NaN."""
    m_new, shift, alpha, delta = rescale_factors(m, x)
    e = tl.exp(x - shift)
    positive = e > 0
    a = tl.where(alpha > 0, a * alpha, 0.0) + tl.where(positive, e * v, 0.0)
    b = (b - delta * s) * alpha + tl.where(positive, e * (x - shift), 0.0)
    s = s * alpha + e
    return m_new, s, a, b


@triton.jit
def merge_states(m1, s1, a1, b1, m2, s2, a2, b2):
    """Merge two reduced (scalar) states of disjoint parts of a row into one (for split-row reductions)."""
    m = tl.maximum(m1, m2)
    shift = finite_or_zero(m)
    alpha1 = tl.exp(m1 - shift)
    alpha2 = tl.exp(m2 - shift)
    delta1 = tl.where(m1 > float("-inf"), m - m1, 0.0)
    delta2 = tl.where(m2 > float("-inf"), m - m2, 0.0)
    s = s1 * alpha1 + s2 * alpha2
    a = tl.where(alpha1 > 0, a1 * alpha1, 0.0) + tl.where(alpha2 > 0, a2 * alpha2, 0.0)
    b = (b1 - delta1 * s1) * alpha1 + (b2 - delta2 * s2) * alpha2
    return m, s, a, b


@triton.jit
def log_prob(x, m, log_s):
    """log softmax as (x - m) - log s: the shift is exact for nearby values, so |x| ~ 1e4 keeps its precision
    (x - lse with a rounded lse would not)."""
    return (x - finite_or_zero(m)) - log_s


@triton.jit
def log1p_small(t):
    """log(1 + t) for t >= 0, accurate to a few ulps also for tiny t (Goldberg's trick: log(w) * t / (w - 1)
    with w = fl(1 + t) cancels the rounding of w)."""
    w = 1.0 + t
    return tl.where(w == 1.0, t, tl.log(w) * (t / (w - 1.0)))


@triton.jit
def log_add_exp(a, b):
    """log(exp a + exp b) = max + log1p(exp(min - max)); -inf when both are -inf (no inf - inf)."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    res = hi + log1p_small(tl.exp(lo - hi))
    return tl.where(hi == float("-inf"), float("-inf"), res)

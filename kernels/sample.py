"""sample_rows: one inverse-CDF draw per row from softmax(u / tau) where use_teacher else softmax(z / tau).

Only the chosen row is read. Pass 1: online raw max m and s = sum e_v, e_v = exp(fl(fl(x_v - m) * inv_temp)) (the
raw max subtracted before the scaling: ``centre``). Pass 2: a block-wise running cumulative sum S_v of e_v; the draw
is the first v with S_v > U * s and e_v > 0 (U the row's uniform in [0, 1), given as float64 and used in float32
like the reference backend), so an entry of probability 0 is never returned. Pass 2 stops at the block that holds
the draw. If rounding leaves every S_v <= U * s, the last entry with e_v > 0 is returned; an empty row (all -inf)
gives -1.
"""
import triton
import triton.language as tl

from .online_softmax import centre, finite_or_zero, load_logits, online_max_sum


@triton.jit
def _sample_row(x_row, V, inv_temp, uniform, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        m, s = online_max_sum(m, s, load_logits(x_row, cols, cols < V), inv_temp)
    shift = finite_or_zero(m)
    target = uniform * tl.sum(s, 0)

    running = tl.full([], 0.0, tl.float32)
    found = tl.full([], -1, tl.int32)
    last = tl.full([], -1, tl.int32)
    start = tl.full([], 0, tl.int32)
    while (start < V) & (found < 0):
        cols = start + lanes
        e = tl.exp(centre(load_logits(x_row, cols, cols < V), shift, inv_temp))
        cum = tl.cumsum(e, 0) + running
        hit = (cum > target) & (e > 0)
        first = tl.min(tl.where(hit, cols, V), 0)
        found = tl.where(first < V, first, -1)
        last = tl.maximum(last, tl.max(tl.where(e > 0, cols, -1), 0))
        running += tl.sum(e, 0)
        start += BLOCK
    return tl.where(found >= 0, found, last)


@triton.jit
def sample_rows_kernel(z_ptr, u_ptr, use_teacher_ptr, uniform_ptr, out_ptr, stride_z, stride_u, V, inv_temp,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    uniform = tl.load(uniform_ptr + row).to(tl.float32)
    if tl.load(use_teacher_ptr + row) != 0:
        idx = _sample_row(u_ptr + row * stride_u, V, inv_temp, uniform, BLOCK)
    else:
        idx = _sample_row(z_ptr + row * stride_z, V, inv_temp, uniform, BLOCK)
    tl.store(out_ptr + row, idx.to(tl.int64))

// jsd_rows and jsd_grad: the generalised JSD for 0 < beta < 1, a second pass given row_stats.
//
// With log q_v = fl(fl(z_v - m_q) / tau) - log s_q (m_q: row_stats' raw max; the centred logit as every kernel forms
// it, row_state.cuh centred), log p_v likewise, and log m_v = logaddexp(log p_v + log beta,
// log q_v + log(1 - beta)) (never the log of a sum of rounded probabilities):
//   g_v = log q_v - log m_v (0 where q_v = 0), h_v = log p_v - log m_v (0 where p_v = 0)
//   jsd_rows: (beta * sum p h + (1 - beta) * sum q g, sum q (g - g_a))    (split rows: partial sums + merge)
//   jsd_grad: dz_v = coef * q_v * ((g_v - g_a) - E_q[g - g_a]) on v < V; zeros for v >= V and rows with coef = 0,
// with g_a the g of row_stats' anchor (z_a = m_q, u_a = UA raw; 0 where UA is NaN) and g_v - g_a exactly 0 at the
// anchor's entries: in nearly one-hot rows the anchor's gradient -q_a E_q[g - g_a] is far below ulp(|g_a|)
// (minillm_fast/backends/__init__.py: jsd_rows).
#include "launchers.h"
#include "row_state.cuh"

namespace minillm_fast {
namespace cuda {
namespace {

enum : int { M_Q = 0, LOGS_Q, M_P, LOGS_P, EQ_D, UA = 10, LOG_RATIO = 12 };

// Near q = p (|r| < kNearRatio, in rows whose reverse KL is below kNearRowKl) the value's g and h are taken as
// g = -log1p(beta expm1(r)) and h = r + g: there g ~ -beta r and h ~ (1 - beta) r are small, and -c - l, a
// difference of two numbers near log 2, would round them at ~6e-8 absolute, which the JSD of close distributions
// (~beta (1 - beta) E[r^2] / 2 per row) cannot afford. Other rows' JSD is large enough for those roundings
// (csrc/cpu/divergence_kernels.cpp takes the same rule). The gradient keeps g - g_a from c and l.
constexpr float kNearRatio = 0.5f;
constexpr float kNearRowKl = 0.05f;

struct JsdRow {
  float shift_q, logs_q, shift_p, logs_p, beta, log_beta, log1m_beta, it;
  float anchor_off, c_a, l_a;  // fl(fl(UA - m_p) / tau) (NaN: no anchor) and g_a = -c_a - l_a (0: no anchor)
  bool near;                   // KL(q || p) = EQ_D - LOG_RATIO < kNearRowKl: the value takes the near forms

  __device__ __forceinline__ void load(const JsdArgs& args, int64_t row) {
    const float* st = args.stats + row * kNumStats;
    shift_q = finite_or_zero(st[M_Q]);
    logs_q = st[LOGS_Q];
    shift_p = finite_or_zero(st[M_P]);
    logs_p = st[LOGS_P];
    beta = args.beta;
    log_beta = args.log_beta;
    log1m_beta = args.log1m_beta;
    it = args.inv_temp;
    near = st[EQ_D] - st[LOG_RATIO] < kNearRowKl;
    anchor_off = centred(st[UA], shift_p, it);
    float h;
    mixture(anchor_off - (logs_p - logs_q), c_a, l_a, h);  // the anchor's entry: x_q = 0, x_p = anchor_off
    if (!is_finite(anchor_off)) c_a = l_a = 0.0f;
  }

  // Of the log-ratio r = log p - log q: g = log q - log m = -c - l = -logaddexp(r + log beta, log(1 - beta)), with
  // c its larger argument and l = log1p(exp(-|delta|)), delta = r + log beta - log(1 - beta), and
  // h = log p - log m = -logaddexp(log beta, log(1 - beta) - r), sharing that exp and log1p.
  __device__ __forceinline__ void mixture(float r, float& c, float& l, float& h) const {
    const float a = r + log_beta, delta = a - log1m_beta;
    l = log1pf(fast_exp(-fabsf(delta)));
    c = delta > 0.0f ? a : log1m_beta;
    h = (delta > 0.0f ? -log_beta : r - log1m_beta) - l;
  }

  // q, g and g - g_a (0 where q = 0), p, h (0 where p = 0) at the raw logits x, xu, from r = (x_p - x_q) -
  // (log s_p - log s_q) with the centred x_q = fl(fl(x - m_q) / tau), x_p = fl(fl(xu - m_p) / tau)
  // (minillm_fast.backends: jsd_rows). g - g_a = (c_a - c) + (l_a - l), exactly 0 at the anchor's entries; where
  // both sit on the log(1 - beta) branch it is l_a - l, exact however small. g and h near q = p: see kNearRatio.
  __device__ __forceinline__ void terms(float x, float xu, float& q, float& g, float& g_rel, float& p,
                                        float& h) const {
    const float xq = centred(x, shift_q, it), xp = centred(xu, shift_p, it);
    const float r = (xp - xq) - (logs_p - logs_q);
    float c, l;
    mixture(r, c, l, h);
    q = fast_exp(xq - logs_q);
    p = fast_exp(xp - logs_p);
    g = -c - l;
    if (near && fabsf(r) < kNearRatio) {
      g = -log1pf(beta * expm1f(r));
      h = r + g;
    }
    g = q > 0.0f ? g : 0.0f;
    g_rel = q > 0.0f && !(xq == 0.0f && xp == anchor_off) ? (c_a - c) + (l_a - l) : 0.0f;
    h = p > 0.0f ? h : 0.0f;
  }
};

template <typename Tz, typename Tu, int E>
__global__ void __launch_bounds__(kMaxThreads) jsd_rows_kernel(const JsdArgs args) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const Tz* __restrict__ z = static_cast<const Tz*>(args.z) + row * args.z_stride;
  const Tu* __restrict__ u = static_cast<const Tu*>(args.u) + row * args.u_stride;
  JsdRow r;
  r.load(args, row);

  const int c0 = split * args.plan.chunk;
  const int c1 = min(args.vocab, c0 + args.plan.chunk);
  const int cv = c1 > c0 ? c0 + (c1 - c0) / E * E : c0;

  SumState<kJsdPartialFloats> acc = SumState<kJsdPartialFloats>::empty();
  for (int c = c0 + static_cast<int>(threadIdx.x) * E; c < cv; c += blockDim.x * E) {
    float x[E], y[E];
    load_floats<Tz, E>(z + c, x);
    load_floats<Tu, E>(u + c, y);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float q, g, g_rel, p, h;
      r.terms(x[i], y[i], q, g, g_rel, p, h);
      acc.v[0] += q * g;
      acc.v[1] += p * h;
      acc.v[2] += q * g_rel;
    }
  }
  for (int c = cv + static_cast<int>(threadIdx.x); c < c1; c += blockDim.x) {
    float q, g, g_rel, p, h;
    r.terms(load_one(z + c), load_one(u + c), q, g, g_rel, p, h);
    acc.v[0] += q * g;
    acc.v[1] += p * h;
    acc.v[2] += q * g_rel;
  }

  __shared__ SumState<kJsdPartialFloats> smem[32];
  acc = block_reduce(acc, smem);
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) {
      args.out[row * 2 + 0] = args.beta * acc.v[1] + args.one_minus_beta * acc.v[0];
      args.out[row * 2 + 1] = acc.v[2];
    } else {
      float* w = args.workspace + (row * gridDim.y + split) * kJsdPartialFloats;
#pragma unroll
      for (int k = 0; k < kJsdPartialFloats; ++k) w[k] = acc.v[k];
    }
  }
}

constexpr int kMergeThreads = 128;

__global__ void __launch_bounds__(kMergeThreads) jsd_rows_merge_kernel(const JsdArgs args) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kMergeThreads / 32) + (threadIdx.x >> 5);
  if (row >= args.n_rows) return;
  const int splits = args.plan.splits;
  const float* w = args.workspace + row * splits * kJsdPartialFloats;
  SumState<kJsdPartialFloats> acc = SumState<kJsdPartialFloats>::empty();
  for (int j = lane; j < splits; j += 32) {
#pragma unroll
    for (int k = 0; k < kJsdPartialFloats; ++k) acc.v[k] += w[j * kJsdPartialFloats + k];
  }
  acc = warp_reduce(acc);
  if (lane == 0) {
    args.out[row * 2 + 0] = args.beta * acc.v[1] + args.one_minus_beta * acc.v[0];
    args.out[row * 2 + 1] = acc.v[2];
  }
}

template <typename Tz, typename Tu, int E>
__global__ void __launch_bounds__(kMaxThreads) jsd_grad_kernel(const JsdArgs args) {
  const int64_t row = blockIdx.x;
  const int c0 = static_cast<int>(blockIdx.y) * args.plan.chunk;
  const int c1 = min(args.z_cols, c0 + args.plan.chunk);
  Tz* __restrict__ out = static_cast<Tz*>(args.dz) + row * static_cast<int64_t>(args.z_cols);
  const float coef = args.coef[row];
  if (coef == 0.0f) {
    store_zeros<Tz, E>(out, c0, c1);
    return;
  }
  const float mean_g_rel = args.jsd[row * 2 + 1];  // E_q[g - g_a]
  const Tz* __restrict__ z = static_cast<const Tz*>(args.z) + row * args.z_stride;
  const Tu* __restrict__ u = static_cast<const Tu*>(args.u) + row * args.u_stride;
  const int vocab = args.vocab;
  JsdRow r;
  r.load(args, row);

  const int ve = max(c0, min(c1, vocab / E * E));
  for (int c = c0 + static_cast<int>(threadIdx.x) * E; c < ve; c += blockDim.x * E) {
    float x[E], y[E], o[E];
    load_floats<Tz, E>(z + c, x);
    load_floats<Tu, E>(u + c, y);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float q, g, g_rel, p, h;
      r.terms(x[i], y[i], q, g, g_rel, p, h);
      o[i] = (coef * q) * (g_rel - mean_g_rel);
    }
    store_vec<Tz, E>(out + c, o);
  }
  for (int c = ve + static_cast<int>(threadIdx.x); c < c1; c += blockDim.x) {
    float o = 0.0f;
    if (c < vocab) {
      float q, g, g_rel, p, h;
      r.terms(load_one(z + c), load_one(u + c), q, g, g_rel, p, h);
      o = (coef * q) * (g_rel - mean_g_rel);
    }
    store_one<Tz>(out + c, o);
  }
}

}  // namespace

template <typename Tz, typename Tu>
cudaError_t launch_jsd_rows(const JsdArgs& args, cudaStream_t stream) {
  if (args.n_rows <= 0) return cudaSuccess;
  constexpr int kVec = 16 / (sizeof(Tz) > sizeof(Tu) ? sizeof(Tz) : sizeof(Tu));
  const dim3 grid(static_cast<unsigned>(args.n_rows), static_cast<unsigned>(args.plan.splits));
  const dim3 block(static_cast<unsigned>(args.plan.threads));
  if (args.plan.vec == kVec) {
    jsd_rows_kernel<Tz, Tu, kVec><<<grid, block, 0, stream>>>(args);
  } else {
    jsd_rows_kernel<Tz, Tu, 1><<<grid, block, 0, stream>>>(args);
  }
  if (args.plan.splits > 1) {
    const int64_t rows_per_block = kMergeThreads / 32;
    const unsigned blocks = static_cast<unsigned>((args.n_rows + rows_per_block - 1) / rows_per_block);
    jsd_rows_merge_kernel<<<blocks, kMergeThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename Tz, typename Tu>
cudaError_t launch_jsd_grad(const JsdArgs& args, cudaStream_t stream) {
  if (args.n_rows <= 0 || args.z_cols <= 0) return cudaSuccess;
  constexpr int kVec = 16 / (sizeof(Tz) > sizeof(Tu) ? sizeof(Tz) : sizeof(Tu));
  const dim3 grid(static_cast<unsigned>(args.n_rows), static_cast<unsigned>(args.plan.splits));
  const dim3 block(static_cast<unsigned>(args.plan.threads));
  if (args.plan.vec == kVec) {
    jsd_grad_kernel<Tz, Tu, kVec><<<grid, block, 0, stream>>>(args);
  } else {
    jsd_grad_kernel<Tz, Tu, 1><<<grid, block, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

MINILLM_FAST_INSTANTIATE_PAIRS(launch_jsd_rows, JsdArgs)
MINILLM_FAST_INSTANTIATE_PAIRS(launch_jsd_grad, JsdArgs)

}  // namespace cuda
}  // namespace minillm_fast

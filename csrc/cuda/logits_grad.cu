// logits_grad: dz_v = c_kl q_v (d_v - E_q[d]) + c_q q_v + c_p p_v + c_y [v == y], one pass, with the centred
// difference d = fl(fl(z - m_q) / tau) - fl(fl(u - m_p) / tau) of row_stats (m: the raw row max where finite,
// else 0); the formula is GradRow (row_state.cuh).
//
// Elementwise given the row statistics, so any number of blocks may share a row (grid = (rows, column chunks)).
// q_v = exp(fl(fl(z_v - m_q) / tau) - log s_q): the shift is exact, so logits ~1e4 (or a common offset under a
// temperature) keep their precision. The teacher row is read only when c_kl or c_p is nonzero; rows whose four
// coefficients are zero, and columns >= V, are written as zeros without reading anything. Matches
// torch_backend.logits_grad to float32 rounding. dz is written in the student's dtype, or (logits_grad_into) in
// bfloat16 / float16 from float32 rows, with any row stride.
// row_stats_grad's two-pass plan runs it in_pass (LogitsGradArgs): coefficients completed from the statistics, and
// split rows' statistics merged here rather than by row_stats' merge kernel (one launch less per chunk of rows).
#include "cluster.cuh"
#include "launchers.h"
#include "row_state.cuh"

namespace minillm_fast {
namespace cuda {
namespace {

enum : int { M_Q = 0, LOGS_Q, M_P, LOGS_P, EQ_D, ZY = 8, UA = 10, EQ_DA };

template <bool kNeedU, typename Tz, typename Tu, typename To, int E>
__device__ __forceinline__ void grad_columns(const GradRow& g, const Tz* __restrict__ z, const Tu* __restrict__ u,
                                             To* __restrict__ out, int c0, int c1, int vocab) {
  // Whole vectors inside the vocabulary: [c0, ve); ve - c0 is a multiple of E (see make_plan's chunking).
  const int ve = max(c0, min(c1, vocab / E * E));
  for (int c = c0 + static_cast<int>(threadIdx.x) * E; c < ve; c += blockDim.x * E) {
    float x[E], xu[E], r[E];
    load_floats<Tz, E>(z + c, x);
    if constexpr (kNeedU) {
      load_floats<Tu, E>(u + c, xu);
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) xu[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < E; ++i) r[i] = g(x[i], xu[i], c + i);
    store_vec<To, E>(out + c, r);
  }
  // The rest: < E columns of the vocabulary, then the padded columns >= V (zeros).
  for (int c = ve + static_cast<int>(threadIdx.x); c < c1; c += blockDim.x) {
    float r = 0.0f;
    if (c < vocab) r = g(load_one(z + c), kNeedU ? load_one(u + c) : 0.0f, c);
    store_one<To>(out + c, r);
  }
}

template <typename Tz, typename Tu, typename To, int E>
__global__ void __launch_bounds__(kMaxThreads) logits_grad_kernel(const LogitsGradArgs args) {
  if (args.plan.chained) chained_grid_begin();  // row_stats_grad's two passes in L2 (cluster.cuh)
  const int64_t row = blockIdx.x;
  const int c0 = static_cast<int>(blockIdx.y) * args.plan.chunk;
  const int c1 = min(args.z_cols, c0 + args.plan.chunk);
  To* __restrict__ out = static_cast<To*>(args.dz) + row * args.dz_stride;
  const Tz* __restrict__ z = static_cast<const Tz*>(args.z) + row * args.z_stride;
  const Tu* __restrict__ u = static_cast<const Tu*>(args.u) + row * args.u_stride;
  const int64_t y = args.tokens != nullptr ? args.tokens[row] : -1;

  const float* st = args.stats + row * kNumStats;
  __shared__ float merged[kNumStats];
  if (args.partials != nullptr) {  // row_stats_grad's two-pass plan with split rows: merge the row's states here
    if (threadIdx.x < 32) {
      const RowPairState state = warp_merge_partials(
          args.partials + row * args.partial_splits * kRowStatsPartialFloats, args.partial_splits, args.inv_temp);
      if (threadIdx.x == 0) {
        float zy, uy;
        token_logits(z, u, y, args.vocab, zy, uy);
        write_row_stats(merged, state, zy, uy);
        if (blockIdx.y == 0) write_row_stats(args.stats_out + row * kNumStats, state, zy, uy);
      }
    }
    __syncthreads();
    st = merged;
  }
  float cf[kNumCoefs];
  for (int i = 0; i < kNumCoefs; ++i) cf[i] = args.coef[row * kNumCoefs + i];
  if (args.in_pass) {
    in_pass_coefs(cf, is_neg_inf(st[M_Q]) || is_neg_inf(st[M_P]), st[ZY], st[M_Q], st[LOGS_Q], args.inv_temp,
                  args.policy != nullptr ? args.policy + row * 3 : nullptr, args.clip_low, args.clip_high);
  }
  if (cf[0] == 0.0f && cf[1] == 0.0f && cf[2] == 0.0f && cf[3] == 0.0f) {
    store_zeros<To, E>(out, c0, c1);
    return;
  }
  const GradRow g =
      GradRow::make(st[M_Q], st[LOGS_Q], st[M_P], st[LOGS_P], st[EQ_D], st[UA], st[EQ_DA], cf, y, args.inv_temp);
  if (g.needs_teacher()) {
    grad_columns<true, Tz, Tu, To, E>(g, z, u, out, c0, c1, args.vocab);
  } else {
    grad_columns<false, Tz, Tu, To, E>(g, z, u, out, c0, c1, args.vocab);
  }
}

}  // namespace

template <typename Tz, typename Tu, typename To>
cudaError_t launch_logits_grad(const LogitsGradArgs& args, cudaStream_t stream) {
  if (args.n_rows <= 0 || args.z_cols <= 0) return cudaSuccess;
  constexpr int kVec = 16 / (sizeof(Tz) > sizeof(Tu) ? sizeof(Tz) : sizeof(Tu));
  const dim3 grid(static_cast<unsigned>(args.n_rows), static_cast<unsigned>(args.plan.splits));
  const dim3 block(static_cast<unsigned>(args.plan.threads));
  const auto kernel = args.plan.vec == kVec ? logits_grad_kernel<Tz, Tu, To, kVec> : logits_grad_kernel<Tz, Tu, To, 1>;
  return launch_chained(kernel, grid, block, stream, args.plan.chained, args);
}

MINILLM_FAST_INSTANTIATE_FUSED(launch_logits_grad, LogitsGradArgs)

}  // namespace cuda
}  // namespace minillm_fast

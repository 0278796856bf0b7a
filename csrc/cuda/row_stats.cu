// row_stats: one pass over the student and teacher rows, both online softmaxes at once.
//
// Per row over the first V columns (see minillm_fast/backends/__init__.py), with the centred logits
// c_q = fl(fl(z - M_Q) / tau), c_p = fl(fl(u - M_P) / tau) (the raw max subtracted first, exactly, then scaled):
//   M_Q = max z (raw), LOGS_Q = log sum exp(c_q), EQ_D = E_q[d], EQ_ZC = E_q[c_q], and the same for p with u
//   (EP_D = E_p[-d], EP_UC = E_p[c_p]); ZY = z_y, UY = u_y (raw); d = c_q - c_p.
// Each thread folds its columns into a RowPairState (row_state.cuh); the block reduces the states. When the
// rows alone cannot fill the GPU, a row is split across gridDim.y blocks that write partial states, and
// row_stats_merge_kernel (one warp per row) merges and finalises them (or, for row_stats_grad's two-pass plan,
// logits_grad's blocks do: leave_partials).
#include "cluster.cuh"
#include "launchers.h"
#include "row_state.cuh"

namespace minillm_fast {
namespace cuda {
namespace {

template <typename Tz, typename Tu>
__device__ __forceinline__ void finalize_row(const RowStatsArgs& args, int64_t row, const RowPairState& st) {
  float zy = 0.0f, uy = 0.0f;
  if (args.tokens != nullptr) {
    token_logits(static_cast<const Tz*>(args.z) + row * args.z_stride,
                 static_cast<const Tu*>(args.u) + row * args.u_stride, args.tokens[row], args.vocab, zy, uy);
  }
  write_row_stats(args.stats + row * kNumStats, st, zy, uy);
}

template <typename Tz, typename Tu, int E>
__global__ void __launch_bounds__(kMaxThreads) row_stats_kernel(const RowStatsArgs args) {
  if (args.plan.chained) chained_grid_begin();  // row_stats_grad's two passes in L2 (cluster.cuh)
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const Tz* __restrict__ z = static_cast<const Tz*>(args.z) + row * args.z_stride;
  const Tu* __restrict__ u = static_cast<const Tu*>(args.u) + row * args.u_stride;

  const int c0 = split * args.plan.chunk;
  const int c1 = min(args.vocab, c0 + args.plan.chunk);
  const int cv = c1 > c0 ? c0 + (c1 - c0) / E * E : c0;  // end of whole vectors

  RowPairState st = RowPairState::empty(args.inv_temp);
  const int step = static_cast<int>(blockDim.x) * E;
  int c = c0 + static_cast<int>(threadIdx.x) * E;
  for (; c + step < cv; c += 2 * step) {  // two vectors per side in flight before the math
    float x0[E], y0[E], x1[E], y1[E];
    load_floats<Tz, E>(z + c, x0);
    load_floats<Tu, E>(u + c, y0);
    load_floats<Tz, E>(z + c + step, x1);
    load_floats<Tu, E>(u + c + step, y1);
    st.add<E>(x0, y0);
    st.add<E>(x1, y1);
  }
  if (c < cv) {
    float x[E], y[E];
    load_floats<Tz, E>(z + c, x);
    load_floats<Tu, E>(u + c, y);
    st.add<E>(x, y);
  }
  for (c = cv + static_cast<int>(threadIdx.x); c < c1; c += blockDim.x) {  // < E leftover columns
    float x[1], y[1];
    load_floats<Tz, 1>(z + c, x);
    load_floats<Tu, 1>(u + c, y);
    st.add<1>(x, y);
  }

  __shared__ RowPairState smem[32];
  st = block_reduce(st, smem);
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) {
      finalize_row<Tz, Tu>(args, row, st);
    } else {
      st.store(args.workspace + (row * gridDim.y + split) * kRowStatsPartialFloats);
    }
  }
}

constexpr int kMergeThreads = 128;  // 4 rows (warps) per block

template <typename Tz, typename Tu>
__global__ void __launch_bounds__(kMergeThreads) row_stats_merge_kernel(const RowStatsArgs args) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kMergeThreads / 32) + (threadIdx.x >> 5);
  if (row >= args.n_rows) return;  // whole warps only
  const int splits = args.plan.splits;
  const RowPairState st =
      warp_merge_partials(args.workspace + row * splits * kRowStatsPartialFloats, splits, args.inv_temp);
  if (lane == 0) finalize_row<Tz, Tu>(args, row, st);
}

}  // namespace

template <typename Tz, typename Tu>
cudaError_t launch_row_stats(const RowStatsArgs& args, cudaStream_t stream) {
  if (args.n_rows <= 0) return cudaSuccess;
  constexpr int kVec = 16 / (sizeof(Tz) > sizeof(Tu) ? sizeof(Tz) : sizeof(Tu));
  const dim3 grid(static_cast<unsigned>(args.n_rows), static_cast<unsigned>(args.plan.splits));
  const dim3 block(static_cast<unsigned>(args.plan.threads));
  const auto kernel = args.plan.vec == kVec ? row_stats_kernel<Tz, Tu, kVec> : row_stats_kernel<Tz, Tu, 1>;
  const cudaError_t err = launch_chained(kernel, grid, block, stream, args.plan.chained, args);
  if (err != cudaSuccess) return err;
  if (args.plan.splits > 1 && !args.leave_partials) {
    const int64_t rows_per_block = kMergeThreads / 32;
    const unsigned blocks = static_cast<unsigned>((args.n_rows + rows_per_block - 1) / rows_per_block);
    row_stats_merge_kernel<Tz, Tu><<<blocks, kMergeThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

MINILLM_FAST_INSTANTIATE_PAIRS(launch_row_stats, RowStatsArgs)

}  // namespace cuda
}  // namespace minillm_fast

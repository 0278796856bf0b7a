// row_stats_grad: row_stats and logits_grad in one kernel, each row read from memory once.
//
// When a loss's logits_grad coefficients are known before its row statistics (reverse_kl, forward_kl, pt_loss:
// the mask and the denominator give them), or are such coefficients times a per-row factor of those statistics
// (minillm_loss's clipped policy gradient), the gradient can be written in the same pass as the statistics:
// bf16 rows then cost 6 bytes per element (read z and u, write dz) instead of 10 (row_stats reads both rows, the
// backward's logits_grad reads them again and writes dz).
//
// The whole row must be on chip between the two halves, so a row is split across a cluster of k <= 8 blocks
// (sm_90; k = 1 covers short rows on any GPU) of kFusedThreads threads. Block r of a cluster holds columns
// [r S, (r + 1) S) of both rows in shared memory (plan.slice = S). The kernel is persistent: the grid is as many
// clusters as the GPU runs at once, and cluster c handles rows c, c + C, c + 2C, ... With two row buffers
// (plan.stages = 2) the next row's slice is copied in (cp.async) while this one is computed, so that the per-row
// latencies -- the block reduction, the cluster barrier, one round trip to L2 for the k partial states -- hide behind
// the copies. Per row: fold the slice into a RowPairState (row_state.cuh), reduce it over the block and store it in
// the workspace; after the cluster barrier every block merges the k states in the same order (one per lane of warp
// 0, then the warp's butterfly) so that all k agree bit for bit; block 0 writes the row's statistics; each block
// computes dz for its columns from shared memory (GradRow) and writes it. Columns in [V, z_cols) (a padded student)
// get zeros, and so do rows whose coefficients are all zero or whose student or teacher distribution is empty (the
// ops count those rows as masked).
//
// Status: correct, but on an H100 slower than the two passes it replaces (bf16 [8192, 128256]: 6.4-7.6 ms against
// 3.8 ms; benchmarks/logits_fused_plans.py), so the losses use it only when opted in (MINILLM_FAST_GRAD_IN_PASS=1).
// An earlier version that held the rows in registers, one short-lived cluster per row, measured 6.9-10.7 ms.
//
// The other plan (MINILLM_FAST_FUSED_PLAN=l2[s][:R], launch_two_passes_in_l2) keeps the two passes but runs them
// chunk by chunk of R rows (by default as many as fill half the L2 cache with their rows and dz: 34 bf16 rows of
// 128256 on an H100), so that the second pass finds its rows in L2: 6 bytes per element from memory as here, with
// the two-pass kernels' simple, fully parallel structure, at the price of two launches per chunk, which on sm_90 are
// chained (programmatic dependent launch, cluster.cuh; "l2s": not) so that each hides behind the previous one's
// tail. Not yet measured on a GPU.
#include "cluster.cuh"
#include "launchers.h"
#include "row_state.cuh"

namespace minillm_fast {
namespace cuda {
namespace {

// What a row's gradient needs besides its merged state (thread 0 of each block loads it while the row's copies are
// in flight, so that these few dependent loads -- the token, then its logits -- cost no extra latency).
struct RowInputs {
  int64_t y = -1;  // -1 without tokens
  float zy = 0.0f, uy = 0.0f;  // the raw z_y and u_y (0 for y out of [0, V))
  float coef[kNumCoefs];
  float policy[3];
};

template <typename Tz, typename Tu>
__device__ __forceinline__ RowInputs load_row_inputs(const RowStatsGradArgs& args, int64_t row,
                                                     const Tz* __restrict__ z, const Tu* __restrict__ u) {
  RowInputs in;
  for (int i = 0; i < kNumCoefs; ++i) in.coef[i] = args.coef[row * kNumCoefs + i];
  if (args.policy != nullptr) {
    for (int i = 0; i < 3; ++i) in.policy[i] = args.policy[row * 3 + i];
  }
  if (args.tokens != nullptr) {
    in.y = args.tokens[row];
    token_logits(z, u, in.y, args.vocab, in.zy, in.uy);
  }
  return in;
}

// The row's gradient functor from its merged state (in_pass_coefs: empty rows, policy factor).
__device__ __forceinline__ GradRow row_grad(const RowStatsGradArgs& args, const RowInputs& in, const RowPairState& st) {
  float cf[kNumCoefs];
  for (int i = 0; i < kNumCoefs; ++i) cf[i] = in.coef[i];
  in_pass_coefs(cf, st.has_empty(), in.zy, st.q.m, st.q.log_s(), args.inv_temp,
                args.policy != nullptr ? in.policy : nullptr, args.clip_low, args.clip_high);
  return GradRow::make(st.q.m, st.q.log_s(), st.p.m, st.p.log_s(), st.q.mean_a(), st.anchor_u(), st.anchor_mean(), cf,
                       in.y, args.inv_temp);
}

template <typename To, int E>
__device__ __forceinline__ void store_bounded(To* __restrict__ out, int c, int n, const float (&r)[E]) {
  if (c + E <= n && n % E == 0) {  // a whole vector, aligned (dz rows are contiguous and start aligned)
    store_vec<To, E>(out + c, r);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if (c + i < n) store_one<To>(out + c + i, r[i]);
    }
  }
}

// E elements of a row's slice in shared memory (column c at p), as floats; columns >= vocab read as -inf (the
// copies zero-filled them).
template <typename T, int E>
__device__ __forceinline__ void shared_floats(const T* p, int c, int vocab, float (&out)[E]) {
  to_floats<T, E>(*reinterpret_cast<const BitsVec<T, E>*>(p), out);
  if (c + E > vocab) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if (c + i >= vocab) out[i] = neg_inf();
    }
  }
}

template <typename Tz, typename Tu, typename To, int E>
__global__ void __launch_bounds__(kFusedThreads) row_stats_grad_kernel(const RowStatsGradArgs args) {
  const FusedPlan& plan = args.plan;
  const int k = plan.cluster;
  const int rank = static_cast<int>(blockIdx.x) % k;
  const int64_t clusters = gridDim.x / k;
  const int c0 = rank * plan.slice;  // this block's columns: [c0, c0 + slice)
  const int end_v = min(c0 + plan.slice, args.vocab);
  const int end_z = min(c0 + plan.slice, args.z_cols);
  const int first = c0 + static_cast<int>(threadIdx.x) * E;  // this thread's first column; then every kStep
  constexpr int kStep = kFusedThreads * E;
  constexpr int kZBytes = E * static_cast<int>(sizeof(Tz)), kUBytes = E * static_cast<int>(sizeof(Tu));

  // Row buffers: per stage, the slice's z words then its u words.
  MINILLM_FAST_DYNAMIC_SHARED(buffers);
  const size_t stage_bytes = static_cast<size_t>(plan.slice) * (sizeof(Tz) + sizeof(Tu));
  const auto z_slice = [&](int stage) { return reinterpret_cast<Tz*>(buffers + stage * stage_bytes); };
  const auto u_slice = [&](int stage) {
    return reinterpret_cast<Tu*>(buffers + stage * stage_bytes + static_cast<size_t>(plan.slice) * sizeof(Tz));
  };
  const auto copy_in = [&](int64_t row, int stage) {  // this thread's vectors of the row, then one commit
    const Tz* z = static_cast<const Tz*>(args.z) + row * args.z_stride;
    const Tu* u = static_cast<const Tu*>(args.u) + row * args.u_stride;
    Tz* zs = z_slice(stage);
    Tu* us = u_slice(stage);
    for (int c = first; c < end_v; c += kStep) {
      const int n = min(E, args.vocab - c);
      cp_async<kZBytes>(zs + (c - c0), z + c, n * static_cast<int>(sizeof(Tz)));
      cp_async<kUBytes>(us + (c - c0), u + c, n * static_cast<int>(sizeof(Tu)));
    }
    cp_async_commit();
  };
  MINILLM_FAST_BLOCK_SHARED(RowPairState, reduce_smem, 32);
  MINILLM_FAST_BLOCK_SHARED(GradRow, grad_smem, 1);

  int64_t row = static_cast<int64_t>(blockIdx.x) / k;
  if (row < args.n_rows) copy_in(row, 0);
  for (int iter = 0; row < args.n_rows; ++iter, row += clusters) {
    const int stage = plan.stages == 2 ? (iter & 1) : 0;
    const int64_t next = row + clusters;
    const Tz* __restrict__ z = static_cast<const Tz*>(args.z) + row * args.z_stride;
    const Tu* __restrict__ u = static_cast<const Tu*>(args.u) + row * args.u_stride;
    To* __restrict__ out = static_cast<To*>(args.dz) + row * args.dz_stride;

    RowInputs in;
    if (threadIdx.x == 0) in = load_row_inputs<Tz, Tu>(args, row, z, u);
    if (plan.stages == 2 && next < args.n_rows) {
      copy_in(next, stage ^ 1);  // that buffer's last reader (row - clusters) finished before the last barrier
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Tz* zs = z_slice(stage);
    const Tu* us = u_slice(stage);

    // 1. The row's online state: this block's, then (k > 1) the cluster's.
    RowPairState st = RowPairState::empty(args.inv_temp);
    for (int c = first; c < end_v; c += kStep) {
      float x[E], y[E];
      shared_floats<Tz, E>(zs + (c - c0), c, args.vocab, x);
      shared_floats<Tu, E>(us + (c - c0), c, args.vocab, y);
      st.add<E>(x, y);
    }
    st = block_reduce(st, reduce_smem);
    if (k > 1) {
      float* partials = args.workspace + row * k * kRowStatsPartialFloats;
      if (threadIdx.x == 0) st.store(partials + rank * kRowStatsPartialFloats);
      cluster_sync();
      if (threadIdx.x < 32) {  // warp 0; k <= kMaxCluster <= 32
        const int lane = static_cast<int>(threadIdx.x);
        RowPairState merged = lane < k ? RowPairState::load_cg(partials + lane * kRowStatsPartialFloats, args.inv_temp)
                                       : RowPairState::empty(args.inv_temp);
        merged = warp_reduce(merged);
        if (lane == 0) reduce_smem[0] = merged;
      }
      __syncthreads();
      st = reduce_smem[0];
    }

    // 2. dz for this block's columns (block 0 also writes the row's statistics).
    if (threadIdx.x == 0) {
      grad_smem[0] = row_grad(args, in, st);
      if (rank == 0) write_row_stats(args.stats + row * kNumStats, st, in.zy, in.uy);
    }
    __syncthreads();
    const GradRow g = grad_smem[0];
    const bool zero = g.all_zero();
    for (int c = first; c < end_z; c += kStep) {
      float r[E];
#pragma unroll
      for (int j = 0; j < E; ++j) r[j] = 0.0f;
      if (!zero && c < args.vocab) {
        float x[E], y[E];
        shared_floats<Tz, E>(zs + (c - c0), c, args.vocab, x);
        shared_floats<Tu, E>(us + (c - c0), c, args.vocab, y);
#pragma unroll
        for (int j = 0; j < E; ++j) {
          if (c + j < args.vocab) r[j] = g(x[j], y[j], c + j);
        }
      }
      store_bounded<To, E>(out, c, args.z_cols, r);
    }
    __syncthreads();  // the buffer, reduce_smem and grad_smem are free again
    if (plan.stages == 1 && next < args.n_rows) copy_in(next, 0);
  }
}

template <typename T, int E>
__global__ void __launch_bounds__(256) scale_unless_one_kernel(const ScaleArgs args) {
  const float f = *args.factor;
  if (f == 1.0f) return;
  T* x = static_cast<T*>(args.x);
  const int64_t whole = args.n / E * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * E;
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * E; c < whole; c += stride) {
    float v[E];
    load_floats<T, E>(x + c, v);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] *= f;
    store_vec<T, E>(x + c, v);
  }
  if (blockIdx.x == 0) {
    for (int64_t c = whole + threadIdx.x; c < args.n; c += blockDim.x) store_one<T>(x + c, load_one(x + c) * f);
  }
}

// The fields row_stats' and logits_grad's arguments share, for rows [a, a + rows) of row_stats_grad's.
template <typename Tz, typename Tu, typename ChunkArgs>
void chunk_of(const RowStatsGradArgs& args, int64_t a, int64_t rows, ChunkArgs& out) {
  out.z = static_cast<const Tz*>(args.z) + a * args.z_stride;
  out.u = static_cast<const Tu*>(args.u) + a * args.u_stride;
  out.tokens = args.tokens != nullptr ? args.tokens + a : nullptr;
  out.stats = args.stats + a * kNumStats;
  out.n_rows = rows;
  out.z_stride = args.z_stride;
  out.u_stride = args.u_stride;
  out.vocab = args.vocab;
  out.inv_temp = args.inv_temp;
}

// The two-pass plan over chunks of rows held in L2: per chunk, row_stats (its split rows' states left unmerged) and
// then logits_grad in_pass, which merges them, writes the statistics and reads the chunk's rows back from L2.
template <typename Tz, typename Tu, typename To>
cudaError_t launch_two_passes_in_l2(const RowStatsGradArgs& args, cudaStream_t stream) {
  const FusedPlan& plan = args.plan;
  const bool split = plan.stats_plan.splits > 1;
  if (split && !args.workspace) return cudaErrorInvalidValue;
  for (int64_t a = 0; a < args.n_rows; a += plan.chunk_rows) {
    const int64_t rows = args.n_rows - a < plan.chunk_rows ? args.n_rows - a : plan.chunk_rows;
    RowStatsArgs stats;
    chunk_of<Tz, Tu>(args, a, rows, stats);
    stats.workspace = args.workspace;  // reused by every chunk: the launches are ordered on the stream
    stats.plan = plan.stats_plan;
    stats.leave_partials = true;
    cudaError_t err = launch_row_stats<Tz, Tu>(stats, stream);
    if (err != cudaSuccess) return err;

    LogitsGradArgs grad;
    chunk_of<Tz, Tu>(args, a, rows, grad);
    grad.coef = args.coef + a * kNumCoefs;
    grad.dz = static_cast<To*>(args.dz) + a * args.dz_stride;
    grad.dz_stride = args.dz_stride;
    grad.z_cols = args.z_cols;
    grad.plan = plan.grad_plan;
    grad.in_pass = true;
    grad.policy = args.policy != nullptr ? args.policy + a * 3 : nullptr;
    grad.clip_low = args.clip_low;
    grad.clip_high = args.clip_high;
    if (split) {
      grad.partials = args.workspace;
      grad.partial_splits = plan.stats_plan.splits;
      grad.stats_out = stats.stats;
    }
    err = launch_logits_grad<Tz, Tu, To>(grad, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

template <typename Tz, typename Tu, typename To>
cudaError_t launch_row_stats_grad(const RowStatsGradArgs& args, cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(Tz) > sizeof(Tu) ? sizeof(Tz) : sizeof(Tu));
  const FusedPlan& plan = args.plan;
  if (args.n_rows <= 0 || args.z_cols <= 0) return cudaSuccess;
  if (plan.chunk_rows > 0) return launch_two_passes_in_l2<Tz, Tu, To>(args, stream);
  if (plan.cluster < 1 || plan.cluster > kMaxCluster || plan.vec != kVec || plan.slice % (kFusedThreads * kVec) != 0 ||
      (plan.cluster > 1 && !args.workspace) || (args.n_rows > 1 && args.dz_stride != args.z_cols)) {
    return cudaErrorInvalidValue;
  }
  const auto kernel = row_stats_grad_kernel<Tz, Tu, To, kVec>;
  const dim3 block(kFusedThreads);
  const size_t smem = static_cast<size_t>(plan.smem);
  int64_t clusters = resident_clusters(kernel, block, plan.cluster, smem);
  if (clusters <= 0 || clusters > args.n_rows) clusters = args.n_rows;
  const dim3 grid(static_cast<unsigned>(clusters * plan.cluster));
  return launch_clustered(kernel, grid, block, plan.cluster, smem, stream, args);
}

template <typename T>
cudaError_t launch_scale_unless_one(const ScaleArgs& args, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t vectors = (args.n + kVec - 1) / kVec;
  const unsigned blocks = static_cast<unsigned>(vectors < 256 * 1024 ? (vectors + 255) / 256 : 1024);
  scale_unless_one_kernel<T, kVec><<<blocks, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

MINILLM_FAST_INSTANTIATE_FUSED(launch_row_stats_grad, RowStatsGradArgs)
template cudaError_t launch_scale_unless_one<float>(const ScaleArgs&, cudaStream_t);
template cudaError_t launch_scale_unless_one<__nv_bfloat16>(const ScaleArgs&, cudaStream_t);
template cudaError_t launch_scale_unless_one<__half>(const ScaleArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace minillm_fast

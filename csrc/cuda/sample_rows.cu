// sample_rows: one inverse-CDF draw per row from softmax(u / tau) where use_teacher, else softmax(z / tau).
//
// One block per row, two passes over the chosen row x:
//   1. online raw max m and normaliser s = sum exp(fl(fl(x - m) / tau)) (MaxSum, row_state.cuh), block-reduced; a
//      row whose max is not finite (all -inf) returns -1;
//   2. target = float(uniform) * s; the row is scanned tile by tile (blockDim * E columns per tile, E per
//      thread, block-wide exclusive scan of the per-thread sums carried across tiles), and the answer is the first
//      v with cumsum(e)_v > target and e_v > 0, e = exp(fl(fl(x - m) / tau)), as torch_backend.sample_rows (the
//      raw max subtracted before the scaling, as in every kernel: row_state.cuh centred). The scan stops at
//      the first tile that crosses. If rounding leaves the whole row just below the target, the last entry of
//      positive probability is returned. An entry of probability 0 is never returned.
#include <climits>

#include "launchers.h"
#include "row_state.cuh"

namespace minillm_fast {
namespace cuda {
namespace {

struct SampleShared {
  MaxSum reduce[32];
  float warp_sums[32];
  int found;
  int last_positive;
};

__device__ __forceinline__ float warp_inclusive_scan(float v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float o = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += o;
  }
  return v;
}

// Called by the whole block (block-uniform control flow); every thread gets the same result.
template <typename T, int E>
__device__ int64_t sample_row(const T* __restrict__ x, int vocab, float it, float uniform, SampleShared& sh) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  const int step = static_cast<int>(blockDim.x) * E;

  // Pass 1: max and normaliser.
  MaxSum ms = MaxSum::empty(it);
  for (int c = tid * E; c < vocab; c += step) {
    float v[E];
    load_floats_bounded<T, E>(x, c, vocab, v);
    ms.add<E>(v);
  }
  ms = block_reduce(ms, sh.reduce);
  if (!is_finite(ms.m)) return -1;  // empty row (or +inf / NaN logits)
  const float m = ms.m;
  // uniform rounded to 1.0f (or NaN): nothing crosses, as in torch_backend, where cumsum never exceeds its own
  // last element; +inf makes that explicit here, where the scan's sums are not bitwise the pass-1 normaliser.
  const float target = uniform < 1.0f ? uniform * ms.s : pos_inf();

  // Pass 2: scan until the cumulative sum crosses the target.
  float carry = 0.0f;
  int last_positive = -1;
  for (int t0 = 0; t0 < vocab; t0 += step) {
    const int c = t0 + tid * E;
    float e[E], run[E];
    float total = 0.0f;
    if (c < vocab) {
      float v[E];
      load_floats_bounded<T, E>(x, c, vocab, v);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const float ei = fast_exp(centred(v[i], m, it));  // v = -inf (or padding) -> 0
        e[i] = ei > 0.0f ? ei : 0.0f;
        total += e[i];
        run[i] = total;
        if (e[i] > 0.0f) last_positive = c + i;
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) e[i] = run[i] = 0.0f;
    }
    // Block-wide exclusive scan of the per-thread totals.
    const float incl = warp_inclusive_scan(total);
    float excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0f;
    if (lane == 31) sh.warp_sums[warp] = incl;
    if (tid == 0) sh.found = INT_MAX;
    __syncthreads();
    if (warp == 0) {
      const float w = lane < n_warps ? sh.warp_sums[lane] : 0.0f;
      const float wi = warp_inclusive_scan(w);
      sh.warp_sums[lane] = wi;  // inclusive prefix over warps (lanes >= n_warps hold the total, unused)
    }
    __syncthreads();
    const float prefix = carry + ((warp > 0 ? sh.warp_sums[warp - 1] : 0.0f) + excl);
    const float tile_total = sh.warp_sums[n_warps - 1];
    int candidate = INT_MAX;
#pragma unroll
    for (int i = E - 1; i >= 0; --i) {  // descending: the smallest crossing index wins
      if (e[i] > 0.0f && prefix + run[i] > target) candidate = c + i;
    }
    if (candidate != INT_MAX) atomicMin(&sh.found, candidate);
    __syncthreads();
    const int found = sh.found;
    if (found != INT_MAX) return found;
    carry += tile_total;
    __syncthreads();  // warp_sums and found are rewritten by the next tile
  }

  // No crossing (rounding): the last entry of positive probability.
  if (tid == 0) sh.last_positive = -1;
  __syncthreads();
  if (last_positive >= 0) atomicMax(&sh.last_positive, last_positive);
  __syncthreads();
  return sh.last_positive;
}

template <typename Tz, typename Tu, int EZ, int EU>
__global__ void __launch_bounds__(kMaxThreads) sample_rows_kernel(const SampleArgs args) {
  __shared__ SampleShared sh;
  const int64_t row = blockIdx.x;
  const bool teacher = args.use_teacher[row];
  const float uniform = static_cast<float>(args.uniform[row]);  // as torch_backend: uniform.to(float32)
  int64_t result;
  if (teacher) {  // block-uniform branch
    result = sample_row<Tu, EU>(static_cast<const Tu*>(args.u) + row * args.u_stride, args.vocab, args.inv_temp,
                                uniform, sh);
  } else {
    result = sample_row<Tz, EZ>(static_cast<const Tz*>(args.z) + row * args.z_stride, args.vocab, args.inv_temp,
                                uniform, sh);
  }
  if (threadIdx.x == 0) args.out[row] = result;
}

}  // namespace

template <typename Tz, typename Tu>
cudaError_t launch_sample_rows(const SampleArgs& args, cudaStream_t stream) {
  if (args.n_rows <= 0) return cudaSuccess;
  constexpr int kVz = 16 / sizeof(Tz), kVu = 16 / sizeof(Tu);
  const dim3 grid(static_cast<unsigned>(args.n_rows));
  const dim3 block(static_cast<unsigned>(args.threads));
  if (args.z_vec && args.u_vec) {
    sample_rows_kernel<Tz, Tu, kVz, kVu><<<grid, block, 0, stream>>>(args);
  } else if (args.z_vec) {
    sample_rows_kernel<Tz, Tu, kVz, 1><<<grid, block, 0, stream>>>(args);
  } else if (args.u_vec) {
    sample_rows_kernel<Tz, Tu, 1, kVu><<<grid, block, 0, stream>>>(args);
  } else {
    sample_rows_kernel<Tz, Tu, 1, 1><<<grid, block, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

MINILLM_FAST_INSTANTIATE_PAIRS(launch_sample_rows, SampleArgs)

}  // namespace cuda
}  // namespace minillm_fast

// Thread-block clusters (sm_90), in the three places a kernel meets them: the launch, the barrier, and per-block
// shared scratch. The CPU emulator (csrc/cuda/emulator) runs a cluster's blocks side by side and provides its own
// versions of all three (MINILLM_FAST_EMULATOR).
//
// A kernel launched by launch_clustered(kernel, grid, block, k, ...) gets a 1-D grid whose consecutive groups of k
// blocks form one cluster each: the cluster's rank of a block is blockIdx.x % k, and all k blocks are resident at
// once, so they may wait for each other (cluster_sync). k = 1 is a plain launch, valid on every architecture; k > 1
// needs compute capability 9.0 (the caller checks; on older GPUs cluster_sync traps), and k > 8 (at most 16) the
// non-portable cluster sizes of sm_90.
#pragma once

#include <cuda_runtime.h>

namespace minillm_fast {
namespace cuda {

#ifdef MINILLM_FAST_EMULATOR

__device__ __forceinline__ void cluster_sync() { emu_cluster_sync(); }

template <typename Args>
cudaError_t launch_clustered(void (*kernel)(Args), dim3 grid, dim3 block, int k, cudaStream_t, const Args& args) {
  emu_launch_cluster(kernel, grid, block, static_cast<unsigned>(k), args);
  return cudaSuccess;
}

// The emulator's __shared__ is one static object per kernel, which the blocks of a cluster would share.
#define MINILLM_FAST_BLOCK_SHARED(T, name, n) T* name = emu_block_shared<T>(n)

#else

// Every thread of every block of the cluster arrives, then waits for all of them: the barrier releases the
// threads' earlier memory writes (global included) to the cluster and acquires the others'.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched with clusters below sm_90 (see make_fused_plan)
#endif
}

template <typename Args>
cudaError_t launch_clustered(void (*kernel)(Args), dim3 grid, dim3 block, int k, cudaStream_t stream,
                             const Args& args) {
  if (k == 1) {
    kernel<<<grid, block, 0, stream>>>(args);
    return cudaGetLastError();
  }
  if (k > 8) {  // above the portable limit: sm_90 allows 16 once the kernel opts in
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(k);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args);
}

#define MINILLM_FAST_BLOCK_SHARED(T, name, n) __shared__ T name[n]

#endif

}  // namespace cuda
}  // namespace minillm_fast

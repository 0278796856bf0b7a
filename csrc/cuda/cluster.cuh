// The newer-GPU pieces, in one place: for the persistent one-pass kernel (row_stats_grad.cu), thread-block clusters
// (sm_90: the launch, the barrier, how many fit), asynchronous copies from global to shared memory (cp.async, sm_80)
// and shared arrays; for chains of short kernels (row_stats_grad's two passes in L2), programmatic dependent launch
// (sm_90). The CPU emulator (csrc/cuda/emulator) runs a cluster's blocks side by side and provides its own versions
// of all of them (MINILLM_FAST_EMULATOR).
//
// A kernel launched by launch_chained(..., chained = true, ...) may be scheduled before the kernel ahead of it on the
// stream has finished: as soon as every block of that kernel has started and called chained_grid_begin. Each block
// of a chained kernel calls chained_grid_begin before it touches memory: it lets the next kernel be scheduled, then
// waits until the kernel ahead has completed and its writes are visible (griddepcontrol.wait), so that the results
// are those of plain stream order. What is gained is the launch latency and block scheduling of each kernel, hidden
// behind the tail of the one before.
//
// A kernel launched by launch_clustered(kernel, grid, block, k, smem, ...) gets a 1-D grid whose consecutive groups
// of k blocks form one cluster each: the cluster's rank of a block is blockIdx.x % k, and all k blocks are resident
// at once, so they may wait for each other (cluster_sync). k = 1 is a plain launch, valid on every architecture;
// k > 1 (at most 8, the portable size) needs compute capability 9.0 (the caller checks; below it cluster_sync traps).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace minillm_fast {
namespace cuda {

#ifdef MINILLM_FAST_EMULATOR

__device__ __forceinline__ void cluster_sync() { emu_cluster_sync(); }

template <typename Args>
cudaError_t launch_clustered(void (*kernel)(Args), dim3 grid, dim3 block, int k, size_t, cudaStream_t,
                             const Args& args) {
  emu_launch_cluster(kernel, grid, block, static_cast<unsigned>(k), args);
  return cudaSuccess;
}

// The emulator runs kernels one after another: nothing to wait for.
__device__ __forceinline__ void chained_grid_begin() {}

template <typename Args>
cudaError_t launch_chained(void (*kernel)(Args), dim3 grid, dim3 block, cudaStream_t, bool, const Args& args) {
  emu_launch(kernel, grid, block, args);
  return cudaSuccess;
}

// A few clusters, so that the emulated persistent kernel loops over several rows per cluster.
template <typename Args>
int resident_clusters(void (*)(Args), dim3, int, size_t) { return 3; }

// The emulator's __shared__ is one static object per kernel, which the blocks of a cluster would share: each block
// gets its own arrays instead, carved from its scratch in declaration order.
#define MINILLM_FAST_BLOCK_SHARED(T, name, n) T* name = emu_block_shared<T>(n)
#define MINILLM_FAST_DYNAMIC_SHARED(name) unsigned char* name = emu_block_shared<unsigned char>(kEmuDynamicShared)

// Copies are done at once (the zero fill included); there is nothing to wait for.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  std::memcpy(dst, src, static_cast<size_t>(src_bytes));
  std::memset(static_cast<char*>(dst) + src_bytes, 0, static_cast<size_t>(BYTES - src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {}

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

// The kernel may use smem bytes of dynamic shared memory: needed above 48 KB minus its static shared memory (an
// H100 ran into "invalid argument" at exactly 48 KB of dynamic memory), so asked for whatever the size.
template <typename Args>
cudaError_t allow_dynamic_shared(void (*kernel)(Args), size_t smem) {
  if (smem == 0) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// A launch configuration with clusters of k blocks along x (`attribute` holds the cluster size; keep it alive).
inline cudaLaunchConfig_t cluster_config(dim3 grid, dim3 block, int k, size_t smem, cudaStream_t stream,
                                         cudaLaunchAttribute& attribute) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(k);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// smem: dynamic shared memory bytes.
template <typename Args>
cudaError_t launch_clustered(void (*kernel)(Args), dim3 grid, dim3 block, int k, size_t smem, cudaStream_t stream,
                             const Args& args) {
  const cudaError_t err = allow_dynamic_shared(kernel, smem);
  if (err != cudaSuccess) return err;
  if (k == 1) {
    kernel<<<grid, block, smem, stream>>>(args);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(grid, block, k, smem, stream, attribute);
  return cudaLaunchKernelEx(&config, kernel, args);
}

// How many clusters of k blocks (block threads, smem bytes each) the GPU runs at once: the grid of a persistent
// kernel. 0 when the query fails (the caller then launches one cluster per work item).
template <typename Args>
int resident_clusters(void (*kernel)(Args), dim3 block, int k, size_t smem) {
  if (allow_dynamic_shared(kernel, smem) != cudaSuccess) return 0;
  int device = 0, sms = 0, per_sm = 0;
  if (k == 1) {
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, static_cast<int>(block.x), smem) !=
            cudaSuccess) {
      return 0;
    }
    return sms * per_sm;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(dim3(static_cast<unsigned>(k)), block, k, smem, nullptr, attribute);
  int clusters = 0;
  return cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess ? clusters : 0;
}

// See the header. Below sm_90 chains are never launched (make_l2_plan), and this compiles to nothing.
__device__ __forceinline__ void chained_grid_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n\tgriddepcontrol.wait;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, 0, stream>>>(args), allowed to start early when `chained` (see the header; sm_90).
template <typename Args>
cudaError_t launch_chained(void (*kernel)(Args), dim3 grid, dim3 block, cudaStream_t stream, bool chained,
                           const Args& args) {
  if (!chained) {
    kernel<<<grid, block, 0, stream>>>(args);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args);
}

#define MINILLM_FAST_BLOCK_SHARED(T, name, n) __shared__ T name[n]
#define MINILLM_FAST_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

// BYTES (4, 8 or 16) from global src to shared dst, asynchronously; only the first src_bytes are read, the rest of
// dst is zero-filled. Both addresses aligned to BYTES.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES), "r"(src_bytes)
                 : "memory");
  }
}
// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most PENDING of this thread's groups are still in flight (then __syncthreads shares the data).
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

#endif

}  // namespace cuda
}  // namespace minillm_fast

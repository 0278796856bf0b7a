// CPU emulation of the small part of CUDA that csrc/cuda/*.cu use, so that the kernels' logic (indexing, vector
// and scalar paths, split rows, block/warp reductions, scans, -inf handling) runs on a machine without a GPU.
// Every CUDA thread of a block is a cooperative fiber (ucontext) on one OS thread; __syncthreads and the warp
// shuffles yield to a scheduler (emu_sched.cpp) that releases a warp barrier when all live lanes of the warp wait
// on it and the block barrier when all live threads wait on it (a divergent barrier aborts as a deadlock).
// Thread-block clusters (cluster.cuh, MINILLM_FAST_EMULATOR): the k blocks of a cluster run as one set of fibers,
// each block with its own barrier and shared scratch, and the cluster barrier releases when every live thread of
// the cluster waits on it.
// What it cannot check: data races (execution is sequential), fast-math rounding (host expf is exact-ish),
// memory-model and alignment faults of the real GPU (build with -fsanitize=address,undefined for the latter).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#define MINILLM_FAST_EMULATOR 1

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef struct CUstream_st* cudaStream_t;
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }

using std::max;
using std::min;

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __expf(float x) { return std::exp(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }  // -std=c++20 (ISO) builds do not contract
inline float __fsub_rn(float a, float b) { return a - b; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

#include <ucontext.h>
#include <cstdio>
#include <cstdlib>
#include <functional>

struct EmuFiber {
  ucontext_t ctx;
  char* stack;
  int state;      // 0 runnable, 1 waits on block barrier, 2 waits on warp barrier, 3 done, 4 waits on cluster barrier
  unsigned tid;   // threadIdx.x
  unsigned gid;   // index among the cluster's fibers: block * threads + tid
  unsigned block; // the block's rank in its cluster
  size_t shared_used;  // bytes of the block's scratch this thread's emu_block_shared calls have handed out
};
struct EmuBlock {  // the fibers of one cluster of blocks (one block without clusters)
  std::vector<EmuFiber> fibers;
  std::vector<float> shfl;  // [warps][32]
  std::vector<std::vector<char>> scratch;  // per block: emu_block_shared
  ucontext_t sched;
  EmuFiber* cur = nullptr;
  std::function<void()> body;
};
constexpr int kEmuDynamicShared = 227 * 1024;  // what MINILLM_FAST_DYNAMIC_SHARED gets (an H100's opt-in limit)
constexpr size_t kEmuBlockScratch = kEmuDynamicShared + 64 * 1024;
extern EmuBlock* emu_block;

inline void emu_wait(int kind) {
  EmuFiber* f = emu_block->cur;
  f->state = kind;
  swapcontext(&f->ctx, &emu_block->sched);
}
inline void __syncthreads() { emu_wait(1); }
inline void emu_cluster_sync() { emu_wait(4); }
inline int emu_lane() { return threadIdx.x & 31; }
inline int emu_warp() { return static_cast<int>(emu_block->cur->gid >> 5); }  // warps of the whole cluster

// A block's shared array of n T: every thread of the block declares the kernel's arrays in the same order, so each
// call hands out the next 16-byte-aligned piece of the block's scratch, the same one to every thread.
template <typename T>
T* emu_block_shared(size_t n) {
  EmuFiber* f = emu_block->cur;
  const size_t at = f->shared_used;
  f->shared_used += (n * sizeof(T) + 15) / 16 * 16;
  if (f->shared_used > kEmuBlockScratch) { std::fprintf(stderr, "emu: shared arrays too large\n"); std::abort(); }
  return reinterpret_cast<T*>(emu_block->scratch[f->block].data() + at);
}
inline float emu_exchange(float v, int x, int mode, unsigned delta) {
  const int lane = emu_lane(), warp = emu_warp();
  float* buf = emu_block->shfl.data() + warp * 32;
  buf[lane] = v;
  emu_wait(2);
  float r = mode == 0 ? buf[lane ^ x] : (lane >= static_cast<int>(delta) ? buf[lane - delta] : v);
  emu_wait(2);
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu_exchange(v, m, 0, 0); }
inline float __shfl_up_sync(unsigned, float v, unsigned d) { return emu_exchange(v, 0, 1, d); }
inline int atomicMin(int* p, int v) { int o = *p; if (v < o) *p = v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; if (v > o) *p = v; return o; }

// Runs `cluster` blocks (blockIdx.x = first.x, first.x + 1, ...) of nthreads threads each, side by side.
void emu_run_cluster(EmuBlock& b, unsigned nthreads, unsigned cluster, uint3 first, dim3 grid, dim3 block);

template <typename A>
void emu_launch_cluster(void (*k)(A), dim3 grid, dim3 block, unsigned cluster, const A& args) {
  if (block.x % 32 != 0 || block.x > 1024) { std::fprintf(stderr, "emu: bad blockDim %u\n", block.x); std::abort(); }
  if (cluster == 0 || grid.x % cluster != 0) { std::fprintf(stderr, "emu: bad cluster %u\n", cluster); std::abort(); }
  EmuBlock b;
  b.body = [&]() { k(args); };
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; bx += cluster)
      emu_run_cluster(b, block.x, cluster, uint3{bx, by, 0}, grid, block);
}

template <typename A>
void emu_launch(void (*k)(A), dim3 grid, dim3 block, const A& args) {
  emu_launch_cluster(k, grid, block, 1, args);
}

// Host-side interface of the CUDA kernels: argument structs, the launch plan, and the launcher templates that
// csrc/cuda/*.cu instantiate for every (student, teacher) dtype pair of {float, __nv_bfloat16, __half}.
// No PyTorch header: binding.cpp (the only file that knows about at::Tensor) fills these structs.
//
// Conventions: logits rows have unit stride along the vocabulary and an arbitrary row stride (in elements);
// vocab = min(V_s, V_t); row offsets are 64-bit; column indices are int (vocab < 2^31 - 2^20 is checked by the
// binding). No launcher synchronises with the host; each returns cudaGetLastError() after its launches.
#pragma once

#include <cstdint>
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace minillm_fast {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------------
// Launch plan: grid = (n_rows, splits), blockDim = threads; block (row, j) covers columns
// [j * chunk, min(cols, (j + 1) * chunk)) with chunk a multiple of vec. vec is the number of elements one thread
// loads per step: 16 bytes of the widest input type when every row start is aligned for it, else 1.
// ---------------------------------------------------------------------------------------------------------------
struct RowPlan {
  int vec = 1;
  int threads = 64;
  int splits = 1;
  int chunk = 1;
  bool chained = false;  // launched by launch_chained (cluster.cuh): may start before the kernel ahead has finished
};

constexpr int kMaxThreads = 512;
constexpr int kMaxSplits = 1024;

// Elements per 16-byte vector of the widest of the given element sizes.
inline int vector_elems(int max_elem_size) { return 16 / max_elem_size; }

// Whether every row of a tensor (base pointer p, row stride in elements) starts on an e-element boundary.
inline bool rows_aligned(const void* p, int64_t row_stride, int elem_size, int e) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(e * elem_size) == 0 && row_stride % e == 0;
}

// n_rows: grid rows; cols: columns to cover; vec: 1 or the vector width; num_sms: the device's SM count;
// may_split: whether the kernel supports several blocks per row. Splits only when the rows alone cannot fill
// one wave of resident blocks, and never below 2 vectors per thread per block.
inline RowPlan make_plan(int64_t n_rows, int64_t cols, int vec, int num_sms, bool may_split) {
  RowPlan plan;
  plan.vec = vec;
  const int64_t vecs = (cols + vec - 1) / vec;
  int threads = 64;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 4 < vecs) threads *= 2;
  plan.threads = threads;
  if (cols <= 0) {
    plan.splits = 1;
    plan.chunk = vec;
    return plan;
  }
  int64_t splits = 1;
  if (may_split && num_sms > 0 && n_rows > 0) {
    const int64_t resident = static_cast<int64_t>(num_sms) * (2048 / threads);
    if (n_rows < resident) {
      const int64_t want = (resident + n_rows - 1) / n_rows;
      const int64_t most = vecs / (static_cast<int64_t>(threads) * 2);
      splits = want < most ? want : most;
      if (splits < 1) splits = 1;
      if (splits > kMaxSplits) splits = kMaxSplits;
    }
  }
  int64_t chunk = (cols + splits - 1) / splits;
  chunk = (chunk + vec - 1) / vec * vec;
  plan.chunk = static_cast<int>(chunk);
  plan.splits = static_cast<int>((cols + chunk - 1) / chunk);
  return plan;
}

// ---------------------------------------------------------------------------------------------------------------
// row_stats: stats[N, kNumStats] (layout in minillm_fast/backends/__init__.py). When plan.splits > 1, workspace holds
// n_rows * splits * 8 floats (partial online states) and a second small kernel merges them (unless leave_partials:
// then logits_grad merges them, see LogitsGradArgs.partials).
// ---------------------------------------------------------------------------------------------------------------
struct RowStatsArgs {
  const void* z = nullptr;
  const void* u = nullptr;
  const int64_t* tokens = nullptr;  // [N] or null
  float* stats = nullptr;           // [N, kNumStats], contiguous
  float* workspace = nullptr;       // [N, splits, kRowStatsPartialFloats] when plan.splits > 1
  int64_t n_rows = 0;
  int64_t z_stride = 0, u_stride = 0;  // row strides in elements
  int vocab = 0;
  float inv_temp = 1.0f;
  RowPlan plan;
  bool leave_partials = false;
};
constexpr int kNumStats = 13;  // the layout of minillm_fast.backends (row_state.cuh: write_row_stats)
constexpr int kRowStatsPartialFloats = 11;  // RowPairState::kFloats

// ---------------------------------------------------------------------------------------------------------------
// logits_grad: dz[N, z_cols] (row stride dz_stride, dtype To); columns >= vocab and rows with four zero coefs are
// zeros.
// ---------------------------------------------------------------------------------------------------------------
struct LogitsGradArgs {
  const void* z = nullptr;
  const void* u = nullptr;
  const int64_t* tokens = nullptr;  // [N] or null
  const float* stats = nullptr;     // [N, kNumStats]
  const float* coef = nullptr;      // [N, 4] = (c_kl, c_q, c_p, c_y)
  void* dz = nullptr;               // [N, z_cols]
  int64_t dz_stride = 0;            // dz's row stride in elements
  int64_t n_rows = 0;
  int64_t z_stride = 0, u_stride = 0;
  int vocab = 0;
  int z_cols = 0;  // V_s
  float inv_temp = 1.0f;
  RowPlan plan;  // over z_cols columns
  // row_stats_grad's two-pass plan (in_pass): the coefficients as the one-pass kernel forms them (in_pass_coefs in
  // row_state.cuh: zeros for a row with an empty distribution; with policy [N, 3], c_q and c_y times the clipped
  // policy-gradient factor). With partials ([N, partial_splits, kRowStatsPartialFloats]: row_stats' split states,
  // left unmerged), each block merges its row's states itself and block 0 of the row writes the statistics to
  // stats_out.
  bool in_pass = false;
  const float* policy = nullptr;
  float clip_low = 0.8f, clip_high = 1.2f;
  const float* partials = nullptr;
  int partial_splits = 0;
  float* stats_out = nullptr;
};
constexpr int kNumCoefs = 4;

// ---------------------------------------------------------------------------------------------------------------
// jsd_rows: out[N, 2] = (JSD_beta, E_q[g - g_a]) (g_a: g at row_stats' anchor, jsd.cu); split rows use workspace
// [N, splits, kJsdPartialFloats].
// jsd_grad: dz[N, z_cols] = coef_row * q * ((g - g_a) - E_q[g - g_a]) on columns < vocab, zeros elsewhere and where
// coef = 0.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kJsdPartialFloats = 3;  // per (row, split): sum q g, sum p h, sum q (g - g_a)
struct JsdArgs {
  const void* z = nullptr;
  const void* u = nullptr;
  const float* stats = nullptr;  // [N, kNumStats]
  const float* jsd = nullptr;    // [N, 2]   (jsd_grad only)
  const float* coef = nullptr;   // [N]      (jsd_grad only)
  float* out = nullptr;          // [N, 2]   (jsd_rows only)
  float* workspace = nullptr;    // [N, splits, kJsdPartialFloats] (jsd_rows, when plan.splits > 1)
  void* dz = nullptr;            // [N, z_cols] (jsd_grad only)
  int64_t n_rows = 0;
  int64_t z_stride = 0, u_stride = 0;
  int vocab = 0;
  int z_cols = 0;
  float inv_temp = 1.0f;
  float beta = 0.5f;            // as float32, like torch_backend's python-scalar arithmetic
  float one_minus_beta = 0.5f;  // (float)(1 - beta) computed in double
  float log_beta = 0.0f;        // (float)log(beta)
  float log1m_beta = 0.0f;      // (float)log1p(-beta)
  RowPlan plan;
};

// ---------------------------------------------------------------------------------------------------------------
// row_stats_grad: row_stats and logits_grad in one call that reads each row once from memory (row_stats_grad.cu),
// for coefficients known before the statistics. stats[N, 10] as row_stats; dz[N, z_cols] (row stride dz_stride,
// dtype To) as logits_grad with coef[N, 4], where with policy [N, 3] = (advantage, old log-prob, importance weight)
// the c_q and c_y columns are first multiplied by the row's clipped policy-gradient factor, and rows with an empty
// distribution get zeros. Two plans:
// - one pass (cluster > 0): a row is split across a cluster of plan.cluster blocks of kFusedThreads threads, each
//   holding plan.slice columns of both rows in shared memory (plan.stages row buffers); workspace
//   [N, cluster, kRowStatsPartialFloats].
// - two passes over rows held in L2 (chunk_rows > 0): row_stats, then logits_grad, on each chunk of chunk_rows rows
//   in turn, a chunk small enough for its rows and dz to stay in the L2 cache, so that the second pass reads them
//   from L2 instead of memory (plans stats_plan and grad_plan; workspace
//   [chunk_rows, stats_plan.splits, kRowStatsPartialFloats]).
// ---------------------------------------------------------------------------------------------------------------
struct FusedPlan {
  int vec = 1;
  int cluster = 0;  // 0: no one-pass plan (rows too long, or not aligned for vector copies)
  int slice = 0;    // columns per block: a multiple of kFusedThreads * vec
  int stages = 1;   // row buffers per block (2: the next row is copied in while this one is computed)
  int smem = 0;     // dynamic shared memory per block, bytes
  int64_t chunk_rows = 0;  // > 0: the two-pass plan over chunks of rows held in L2 (cluster is then 0)
  RowPlan stats_plan, grad_plan;  // that plan's row_stats and logits_grad launch plans for a chunk

  bool any() const { return cluster > 0 || chunk_rows > 0; }  // none: the caller runs two passes itself
  int64_t workspace_floats(int64_t n_rows) const {
    if (chunk_rows > 0) return stats_plan.splits > 1 ? chunk_rows * stats_plan.splits * kRowStatsPartialFloats : 0;
    return cluster > 1 ? n_rows * cluster * kRowStatsPartialFloats : 0;
  }
};

constexpr int kFusedThreads = 512;
constexpr int kMaxCluster = 8;  // the portable cluster size
constexpr int kFusedStaticShared = 2048;  // room left in max_smem for the kernel's static arrays (1600 bytes)

// vec: the pair's vector width (1 when rows are not aligned for 16-byte copies: then no plan); elem_bytes: the
// student's plus the teacher's element size; max_cluster: kMaxCluster on sm_90 and later, else 1; max_smem: the
// opt-in shared memory per block. The fewest blocks per row whose slices fit two row buffers, else one; none beyond.
// bf16 [*, 128256] rows on an H100 (227 KB): 5 blocks of 28672 columns, 2 x 112 KB. `forced`
// (MINILLM_FAST_FUSED_PLAN, for tuning: benchmarks/logits_fused_plans.py): "S" (row buffers) or "S,K" (and blocks
// per row) restricts the choice to those; any other text gives no plan ("off").
inline FusedPlan make_fused_plan(int64_t z_cols, int vec, int elem_bytes, int max_cluster, int64_t max_smem,
                                 const char* forced = nullptr) {
  FusedPlan plan;
  plan.vec = vec;
  if (vec == 1 || z_cols <= 0) return plan;
  int forced_stages = 0, forced_k = 0;
  if (forced != nullptr && std::sscanf(forced, "%d,%d", &forced_stages, &forced_k) < 1) return plan;
  const int64_t unit = static_cast<int64_t>(kFusedThreads) * vec;
  for (int stages = 2; stages >= 1; --stages) {
    if (forced_stages != 0 && stages != forced_stages) continue;
    for (int k = 1; k <= max_cluster; ++k) {
      if (forced_k != 0 && k != forced_k) continue;
      const int64_t slice = ((z_cols + k - 1) / k + unit - 1) / unit * unit;
      const int64_t bytes = stages * slice * elem_bytes;
      if (bytes <= max_smem - kFusedStaticShared) {
        plan.cluster = k;
        plan.slice = static_cast<int>(slice);
        plan.stages = stages;
        plan.smem = static_cast<int>(bytes);
        return plan;
      }
    }
  }
  return plan;
}

// MINILLM_FAST_FUSED_PLAN "l2[s][:R]": the two-pass plan over chunks of rows held in L2, R rows per chunk (rows;
// 0: the default), its kernels chained (launch_chained) where the GPU can, or with "l2s" in plain stream order
// (serial). requested = false for any other value.
struct L2Request {
  bool requested = false;
  bool serial = false;
  int64_t rows = 0;
};

inline L2Request forced_l2(const char* forced) {
  L2Request r;
  if (forced == nullptr || forced[0] != 'l' || forced[1] != '2') return r;
  r.requested = true;
  r.serial = forced[2] == 's';
  const char* rest = forced + (r.serial ? 3 : 2);
  long long rows = 0;
  if (rest[0] == ':' && std::sscanf(rest + 1, "%lld", &rows) == 1 && rows > 0) r.rows = rows;
  return r;
}

// The two-pass plan over chunks held in L2: chunk_rows = R, by default as many rows as keep a chunk's student and
// teacher rows and its dz (row_bytes per row) within half of the l2_bytes cache (bf16 [*, 128256] on an H100's
// 50 MB: 34 rows), at least 1 and at most n_rows; row_stats' plan over vocab columns (stats_vec: the rows' vector
// width) and logits_grad's over z_cols (grad_vec: also dz's), each sized by make_plan for chunk_rows rows; the
// kernels chained (launch_chained) when `chained` (sm_90 and later only).
inline FusedPlan make_l2_plan(int64_t n_rows, int64_t z_cols, int64_t vocab, int stats_vec, int grad_vec,
                              int64_t row_bytes, int64_t l2_bytes, int num_sms, int64_t forced_rows, bool chained) {
  FusedPlan plan;
  plan.vec = grad_vec;
  if (n_rows <= 0 || z_cols <= 0) return plan;
  int64_t rows = forced_rows > 0 ? forced_rows : l2_bytes / 2 / (row_bytes > 0 ? row_bytes : 1);
  plan.chunk_rows = rows < 1 ? 1 : (rows > n_rows ? n_rows : rows);
  plan.stats_plan = make_plan(plan.chunk_rows, vocab, stats_vec, num_sms, /*may_split=*/true);
  plan.grad_plan = make_plan(plan.chunk_rows, z_cols, grad_vec, num_sms, /*may_split=*/true);
  plan.stats_plan.chained = plan.grad_plan.chained = chained;
  return plan;
}

// What row_stats_grad's plans depend on besides the shapes: the device's limits.
struct FusedDevice {
  int max_cluster = 1;    // kMaxCluster on sm_90 and later, else 1 (also: whether kernels can be chained)
  int64_t max_smem = 0;   // opt-in shared memory per block, bytes
  int num_sms = 0;
  int64_t l2_bytes = 0;
};

// row_stats_grad's plan: make_l2_plan's when `forced` (MINILLM_FAST_FUSED_PLAN) is "l2[s][:R]" or `l2_only`
// (row_stats_grad_into, whose variant an "l2[s][:R]" value still picks), else make_fused_plan's. z_bytes, u_bytes,
// out_bytes: element sizes of the student, teacher and dz.
inline FusedPlan choose_fused_plan(int64_t n_rows, int64_t z_cols, int64_t vocab, int stats_vec, int grad_vec,
                                   int z_bytes, int u_bytes, int out_bytes, const FusedDevice& device,
                                   const char* forced, bool l2_only = false) {
  const L2Request l2 = forced_l2(forced);
  if (!l2.requested && !l2_only) {
    return make_fused_plan(z_cols, grad_vec, z_bytes + u_bytes, device.max_cluster, device.max_smem, forced);
  }
  return make_l2_plan(n_rows, z_cols, vocab, stats_vec, grad_vec, z_cols * (z_bytes + out_bytes) + vocab * u_bytes,
                      device.l2_bytes, device.num_sms, l2.rows, !l2.serial && device.max_cluster > 1);
}

struct RowStatsGradArgs {
  const void* z = nullptr;
  const void* u = nullptr;
  const int64_t* tokens = nullptr;  // [N] or null
  const float* coef = nullptr;      // [N, 4] = (c_kl, c_q, c_p, c_y)
  const float* policy = nullptr;    // [N, 3] or null
  float clip_low = 0.8f, clip_high = 1.2f;  // (float)(1 - eps), (float)(1 + eps)
  float* stats = nullptr;           // [N, 10]
  float* workspace = nullptr;       // plan.workspace_floats(n_rows) floats
  void* dz = nullptr;               // [N, z_cols]
  int64_t dz_stride = 0;            // dz's row stride in elements (the one-pass plan: z_cols)
  int64_t n_rows = 0;
  int64_t z_stride = 0, u_stride = 0;
  int vocab = 0;
  int z_cols = 0;
  float inv_temp = 1.0f;
  FusedPlan plan;
};

// scale_unless_one: x[n] *= *factor, on the device, unless *factor == 1 (then nothing is read or written). No host
// synchronisation: the test happens in the kernel.
struct ScaleArgs {
  void* x = nullptr;
  int64_t n = 0;
  const float* factor = nullptr;
};

// ---------------------------------------------------------------------------------------------------------------
// sample_rows: out[N] int64, one block per row.
// ---------------------------------------------------------------------------------------------------------------
struct SampleArgs {
  const void* z = nullptr;
  const void* u = nullptr;
  const bool* use_teacher = nullptr;  // [N]
  const double* uniform = nullptr;    // [N], in [0, 1)
  int64_t* out = nullptr;             // [N]
  int64_t n_rows = 0;
  int64_t z_stride = 0, u_stride = 0;
  int vocab = 0;
  float inv_temp = 1.0f;
  int threads = 256;
  bool z_vec = false;  // rows of z aligned for 16-byte loads
  bool u_vec = false;
};

inline int sample_threads(int64_t vocab) {
  int threads = 64;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 16 < vocab) threads *= 2;
  return threads;
}

// Tz: student dtype, Tu: teacher dtype, each one of float, __nv_bfloat16, __half.
template <typename Tz, typename Tu>
cudaError_t launch_row_stats(const RowStatsArgs& args, cudaStream_t stream);
// To (logits_grad, row_stats_grad): dz's dtype, Tz, or bfloat16 / float16 for float32 rows
// (MINILLM_FAST_INSTANTIATE_FUSED lists the combinations).
template <typename Tz, typename Tu, typename To>
cudaError_t launch_logits_grad(const LogitsGradArgs& args, cudaStream_t stream);
template <typename Tz, typename Tu>
cudaError_t launch_jsd_rows(const JsdArgs& args, cudaStream_t stream);
template <typename Tz, typename Tu>
cudaError_t launch_jsd_grad(const JsdArgs& args, cudaStream_t stream);
template <typename Tz, typename Tu>
cudaError_t launch_sample_rows(const SampleArgs& args, cudaStream_t stream);
template <typename Tz, typename Tu, typename To>
cudaError_t launch_row_stats_grad(const RowStatsGradArgs& args, cudaStream_t stream);
template <typename T>
cudaError_t launch_scale_unless_one(const ScaleArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace minillm_fast

// Explicit instantiation of a launcher template for the 9 dtype pairs (used in the .cu files).
#define MINILLM_FAST_INSTANTIATE_PAIRS(LAUNCHER, ARGS)                                                  \
  template cudaError_t LAUNCHER<float, float>(const ARGS&, cudaStream_t);                             \
  template cudaError_t LAUNCHER<float, __nv_bfloat16>(const ARGS&, cudaStream_t);                     \
  template cudaError_t LAUNCHER<float, __half>(const ARGS&, cudaStream_t);                            \
  template cudaError_t LAUNCHER<__nv_bfloat16, float>(const ARGS&, cudaStream_t);                     \
  template cudaError_t LAUNCHER<__nv_bfloat16, __nv_bfloat16>(const ARGS&, cudaStream_t);             \
  template cudaError_t LAUNCHER<__nv_bfloat16, __half>(const ARGS&, cudaStream_t);                    \
  template cudaError_t LAUNCHER<__half, float>(const ARGS&, cudaStream_t);                            \
  template cudaError_t LAUNCHER<__half, __nv_bfloat16>(const ARGS&, cudaStream_t);                    \
  template cudaError_t LAUNCHER<__half, __half>(const ARGS&, cudaStream_t);

// (student, teacher, dz) dtypes of the gradient launchers: dz in the student's dtype for the 9 pairs, and bfloat16 /
// float16 dz from float32 rows (fused-linear blocks whose matmuls run in 16 bits).
#define MINILLM_FAST_INSTANTIATE_FUSED(LAUNCHER, ARGS)                                                            \
  template cudaError_t LAUNCHER<float, float, float>(const ARGS&, cudaStream_t);                                \
  template cudaError_t LAUNCHER<float, __nv_bfloat16, float>(const ARGS&, cudaStream_t);                        \
  template cudaError_t LAUNCHER<float, __half, float>(const ARGS&, cudaStream_t);                               \
  template cudaError_t LAUNCHER<__nv_bfloat16, float, __nv_bfloat16>(const ARGS&, cudaStream_t);                \
  template cudaError_t LAUNCHER<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(const ARGS&, cudaStream_t);        \
  template cudaError_t LAUNCHER<__nv_bfloat16, __half, __nv_bfloat16>(const ARGS&, cudaStream_t);               \
  template cudaError_t LAUNCHER<__half, float, __half>(const ARGS&, cudaStream_t);                              \
  template cudaError_t LAUNCHER<__half, __nv_bfloat16, __half>(const ARGS&, cudaStream_t);                      \
  template cudaError_t LAUNCHER<__half, __half, __half>(const ARGS&, cudaStream_t);                             \
  template cudaError_t LAUNCHER<float, float, __nv_bfloat16>(const ARGS&, cudaStream_t);                        \
  template cudaError_t LAUNCHER<float, float, __half>(const ARGS&, cudaStream_t);

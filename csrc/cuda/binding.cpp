// The CUDA implementations of the torch.ops.minillm_fast.* schemas (defined in minillm_fast/_library.py).
//
// A thin layer: argument checks, dtype dispatch to the launcher templates of launchers.h (instantiated in
// csrc/cuda/*.cu), output and workspace allocation through PyTorch's caching allocator, and the current stream
// (c10::cuda::getCurrentCUDAStream, which at::cuda::getCurrentCUDAStream forwards to; c10 only, so that the build
// needs no cuBLAS/cuSPARSE headers). Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>

#include "launchers.h"

namespace minillm_fast {
namespace cuda {
namespace {

constexpr int64_t kMaxVocab = (int64_t{1} << 31) - (int64_t{1} << 20);  // column indices are int in the kernels

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_one(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;
    default: TORCH_CHECK(false, "minillm_fast (cuda): ", what, " must be float32, bfloat16 or float16, got ", t);
  }
}

// f(TypeTag<Tz>, TypeTag<Tu>) for the student and teacher dtypes.
template <typename F>
void dispatch_pair(const at::Tensor& z, const at::Tensor& u, F&& f) {
  dispatch_one(z.scalar_type(), "student logits z", [&](auto zt) {
    dispatch_one(u.scalar_type(), "teacher logits u", [&](auto ut) { f(zt, ut); });
  });
}

void check_cuda_ok(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "minillm_fast (cuda) ", op, ": ", cudaGetErrorString(err));
}

// SM count of the current device, read once per device (cudaDeviceGetAttribute does not synchronise).
int num_sms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device < 0 || device >= kMaxDevices) return 0;  // make_plan then never splits
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    check_cuda_ok(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "num_sms");
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// A device attribute of the current device, read once per device (cudaDeviceGetAttribute does not synchronise).
template <cudaDeviceAttr kAttribute>
int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device < 0 || device >= kMaxDevices) return 0;
  int value = cache[device].load(std::memory_order_relaxed);
  if (value == 0) {
    check_cuda_ok(cudaDeviceGetAttribute(&value, kAttribute, device), "cudaDeviceGetAttribute");
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Clusters of more than one block need compute capability 9.0.
int max_cluster() { return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9 ? kMaxCluster : 1; }

// Logit rows: 2-D, on the same CUDA device, unit stride along the vocabulary (else a contiguous copy).
at::Tensor logits_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.is_cuda(), "minillm_fast (cuda): ", what, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "minillm_fast (cuda): ", what, " must be 2-D [N, V], got ", x.dim(), "-D");
  if (x.size(1) > 1 && x.stride(1) != 1) return x.contiguous();
  return x;
}

// Row stride in elements; a single row is never offset, so 0 (which keeps it eligible for vector loads).
int64_t row_stride(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : 0; }

struct Rows {
  at::Tensor z, u;
  int64_t n_rows;
  int vocab;
};

Rows check_rows(const at::Tensor& z_in, const at::Tensor& u_in) {
  Rows r;
  r.z = logits_rows(z_in, "student logits z");
  r.u = logits_rows(u_in, "teacher logits u");
  TORCH_CHECK(r.z.device() == r.u.device(), "minillm_fast (cuda): z and u must be on the same device, got ",
              r.z.device(), " and ", r.u.device());
  TORCH_CHECK(r.z.size(0) == r.u.size(0), "minillm_fast (cuda): z and u must have the same number of rows, got ",
              r.z.size(0), " and ", r.u.size(0));
  TORCH_CHECK(r.z.size(0) < (int64_t{1} << 31), "minillm_fast (cuda): at most 2^31 - 1 rows");
  const int64_t vocab = std::min(r.z.size(1), r.u.size(1));
  TORCH_CHECK(r.z.size(1) < kMaxVocab && r.u.size(1) < kMaxVocab, "minillm_fast (cuda): vocabulary too large");
  r.n_rows = r.z.size(0);
  r.vocab = static_cast<int>(vocab);
  return r;
}

// A float32 [N, cols] (or [N]) side tensor, contiguous, on z's device.
at::Tensor side_f32(const at::Tensor& t, const at::Tensor& z, int64_t cols, const char* what) {
  TORCH_CHECK(t.device() == z.device(), "minillm_fast (cuda): ", what, " must be on ", z.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "minillm_fast (cuda): ", what, " must be float32, got ",
              t.scalar_type());
  if (cols > 0) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == z.size(0) && t.size(1) == cols, "minillm_fast (cuda): ", what,
                " must have shape [", z.size(0), ", ", cols, "], got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == z.size(0), "minillm_fast (cuda): ", what, " must have shape [",
                z.size(0), "], got ", t.sizes());
  }
  return t.contiguous();
}

std::optional<at::Tensor> tokens_i64(const std::optional<at::Tensor>& tokens, const at::Tensor& z) {
  if (!tokens.has_value() || !tokens->defined()) return std::nullopt;
  const at::Tensor& t = *tokens;
  TORCH_CHECK(t.device() == z.device(), "minillm_fast (cuda): tokens must be on ", z.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == z.size(0), "minillm_fast (cuda): tokens must have shape [", z.size(0),
              "], got ", t.sizes());
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kBool,
              "minillm_fast (cuda): tokens must be an integer tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// Vector width usable for reading both rows (and writing an output with out_stride, when given).
int pair_vec(const Rows& r, int64_t out_stride = -1) {
  const int e = vector_elems(static_cast<int>(std::max(r.z.element_size(), r.u.element_size())));
  bool ok = r.vocab >= e && rows_aligned(r.z.data_ptr(), row_stride(r.z), static_cast<int>(r.z.element_size()), e) &&
            rows_aligned(r.u.data_ptr(), row_stride(r.u), static_cast<int>(r.u.element_size()), e);
  if (out_stride >= 0) ok = ok && out_stride % e == 0;  // outputs come from the allocator: 256-byte aligned
  return ok ? e : 1;
}

at::Tensor row_stats_cuda(const at::Tensor& z_in, const at::Tensor& u_in, const std::optional<at::Tensor>& tokens,
                          double inv_temp) {
  const Rows r = check_rows(z_in, u_in);
  const c10::cuda::CUDAGuard guard(r.z.device());
  const auto tok = tokens_i64(tokens, r.z);
  at::Tensor stats = at::empty({r.n_rows, kNumStats}, r.z.options().dtype(at::kFloat));
  if (r.n_rows == 0) return stats;

  RowStatsArgs args;
  args.z = r.z.data_ptr();
  args.u = r.u.data_ptr();
  args.tokens = tok ? tok->data_ptr<int64_t>() : nullptr;
  args.stats = stats.data_ptr<float>();
  args.n_rows = r.n_rows;
  args.z_stride = row_stride(r.z);
  args.u_stride = row_stride(r.u);
  args.vocab = r.vocab;
  args.inv_temp = static_cast<float>(inv_temp);
  args.plan = make_plan(r.n_rows, r.vocab, pair_vec(r), num_sms(), /*may_split=*/true);
  at::Tensor workspace;
  if (args.plan.splits > 1) {
    workspace = at::empty({r.n_rows * args.plan.splits * kRowStatsPartialFloats}, stats.options());
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(r.z, r.u, [&](auto zt, auto ut) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    check_cuda_ok(launch_row_stats<Tz, Tu>(args, stream), "row_stats");
  });
  return stats;
}

// dz's dtype: z's, or bfloat16 / float16 from float32 rows (what the gradient launchers are instantiated for).
void check_grad_dtype(at::ScalarType out_type, const Rows& r, const char* op) {
  TORCH_CHECK(out_type == r.z.scalar_type() ||
                  (r.z.scalar_type() == at::kFloat && r.u.scalar_type() == at::kFloat &&
                   (out_type == at::kBFloat16 || out_type == at::kHalf)),
              "minillm_fast (cuda): ", op, " writes dz in the student's dtype, or in bfloat16/float16 from float32 "
              "rows; got ", out_type, " for ", r.z.scalar_type(), " and ", r.u.scalar_type(), " rows");
}

// f(TypeTag<Tz>, TypeTag<Tu>, TypeTag<To>) for the rows' dtypes and dz's (checked by check_grad_dtype).
template <typename F>
void dispatch_grad(const Rows& r, at::ScalarType out_type, F&& f) {
  dispatch_pair(r.z, r.u, [&](auto zt, auto ut) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    if constexpr (std::is_same_v<Tz, float> && std::is_same_v<Tu, float>) {
      dispatch_one(out_type, "dz", [&](auto ot) { f(zt, ut, ot); });
    } else {
      f(zt, ut, zt);
    }
  });
}

// A gradient buffer the caller owns: [N, V_s] on z's device, unit column stride, a dtype check_grad_dtype allows.
void check_grad_out(const at::Tensor& out, const Rows& r, const char* op) {
  TORCH_CHECK(out.device() == r.z.device(), "minillm_fast (cuda): out must be on ", r.z.device(), ", got ",
              out.device());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == r.n_rows && out.size(1) == r.z.size(1) &&
                  (out.size(1) <= 1 || out.stride(1) == 1),
              "minillm_fast (cuda): out must be [", r.n_rows, ", ", r.z.size(1), "] with unit column stride, got ",
              out.sizes(), " with strides ", out.strides());
  check_grad_dtype(out.scalar_type(), r, op);
}

// Vector width for reading both rows and writing dz (its base and row stride aligned too).
int out_vec(const Rows& r, const at::Tensor& dz) {
  const int64_t dz_stride = row_stride(dz);
  const int e = vector_elems(static_cast<int>(std::max(r.z.element_size(), r.u.element_size())));
  const int vec = pair_vec(r, dz_stride);
  return rows_aligned(dz.data_ptr(), dz_stride, static_cast<int>(dz.element_size()), e) ? vec : 1;
}

// logits_grad into dz ([N, z_cols], unit column stride, any row stride, on z's device).
void logits_grad_to(const Rows& r, const std::optional<at::Tensor>& tokens, const at::Tensor& stats_in,
                    const at::Tensor& coef_in, double inv_temp, at::Tensor& dz) {
  const c10::cuda::CUDAGuard guard(r.z.device());
  const auto tok = tokens_i64(tokens, r.z);
  const at::Tensor stats = side_f32(stats_in, r.z, kNumStats, "stats");
  const at::Tensor coef = side_f32(coef_in, r.z, kNumCoefs, "coef");
  const int64_t z_cols = r.z.size(1);
  if (r.n_rows == 0 || z_cols == 0) return;
  const int64_t dz_stride = row_stride(dz);
  const int vec = out_vec(r, dz);

  LogitsGradArgs args;
  args.z = r.z.data_ptr();
  args.u = r.u.data_ptr();
  args.tokens = tok ? tok->data_ptr<int64_t>() : nullptr;
  args.stats = stats.data_ptr<float>();
  args.coef = coef.data_ptr<float>();
  args.dz = dz.data_ptr();
  args.dz_stride = dz_stride;
  args.n_rows = r.n_rows;
  args.z_stride = row_stride(r.z);
  args.u_stride = row_stride(r.u);
  args.vocab = r.vocab;
  args.z_cols = static_cast<int>(z_cols);
  args.inv_temp = static_cast<float>(inv_temp);
  args.plan = make_plan(r.n_rows, z_cols, vec, num_sms(), /*may_split=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad(r, dz.scalar_type(), [&](auto zt, auto ut, auto ot) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    using To = typename decltype(ot)::type;
    check_cuda_ok(launch_logits_grad<Tz, Tu, To>(args, stream), "logits_grad");
  });
}

at::Tensor logits_grad_cuda(const at::Tensor& z_in, const at::Tensor& u_in, const std::optional<at::Tensor>& tokens,
                            const at::Tensor& stats_in, const at::Tensor& coef_in, double inv_temp) {
  const Rows r = check_rows(z_in, u_in);
  at::Tensor dz = at::empty({r.n_rows, r.z.size(1)}, r.z.options());
  logits_grad_to(r, tokens, stats_in, coef_in, inv_temp, dz);
  return dz;
}

// logits_grad written into `out` (e.g. rows of a 16-bit buffer the caller owns): [N, V_s], unit column stride.
void logits_grad_into_cuda(const at::Tensor& z_in, const at::Tensor& u_in, const std::optional<at::Tensor>& tokens,
                           const at::Tensor& stats_in, const at::Tensor& coef_in, double inv_temp, at::Tensor& out) {
  const Rows r = check_rows(z_in, u_in);
  check_grad_out(out, r, "logits_grad_into");
  logits_grad_to(r, tokens, stats_in, coef_in, inv_temp, out);
}

// The device's limits for row_stats_grad's plans.
FusedDevice fused_device() {
  FusedDevice device;
  device.max_cluster = max_cluster();
  device.max_smem = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
  device.num_sms = num_sms();
  device.l2_bytes = device_attribute<cudaDevAttrL2CacheSize>();
  return device;
}

// Runs row_stats_grad's `plan` on the rows: statistics returned, dz written into `dz` ([N, V_s], unit column
// stride, checked by the callers).
at::Tensor row_stats_grad_to(const Rows& r, const std::optional<at::Tensor>& tokens, const at::Tensor& coef_in,
                             const std::optional<at::Tensor>& policy_in, double clip_eps, double inv_temp,
                             const FusedPlan& plan, at::Tensor& dz) {
  const auto tok = tokens_i64(tokens, r.z);
  const at::Tensor coef = side_f32(coef_in, r.z, kNumCoefs, "coef");
  std::optional<at::Tensor> policy;
  if (policy_in.has_value() && policy_in->defined()) policy = side_f32(*policy_in, r.z, 3, "policy");
  at::Tensor stats = at::empty({r.n_rows, kNumStats}, r.z.options().dtype(at::kFloat));
  at::Tensor workspace;

  RowStatsGradArgs args;
  args.z = r.z.data_ptr();
  args.u = r.u.data_ptr();
  args.tokens = tok ? tok->data_ptr<int64_t>() : nullptr;
  args.coef = coef.data_ptr<float>();
  args.policy = policy ? policy->data_ptr<float>() : nullptr;
  args.clip_low = static_cast<float>(1.0 - clip_eps);
  args.clip_high = static_cast<float>(1.0 + clip_eps);
  args.stats = stats.data_ptr<float>();
  args.dz = dz.data_ptr();
  args.dz_stride = row_stride(dz);
  args.n_rows = r.n_rows;
  args.z_stride = row_stride(r.z);
  args.u_stride = row_stride(r.u);
  args.vocab = r.vocab;
  args.z_cols = static_cast<int>(r.z.size(1));
  args.inv_temp = static_cast<float>(inv_temp);
  args.plan = plan;
  if (plan.workspace_floats(r.n_rows) > 0) {
    workspace = at::empty({plan.workspace_floats(r.n_rows)}, stats.options());
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad(r, dz.scalar_type(), [&](auto zt, auto ut, auto ot) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    using To = typename decltype(ot)::type;
    check_cuda_ok(launch_row_stats_grad<Tz, Tu, To>(args, stream), "row_stats_grad");
  });
  return stats;
}

// row_stats and, where choose_fused_plan finds a plan, dz in the same call (else an empty dz: the caller runs
// logits_grad later). dz's dtype: grad_dtype, by default z's; other than z's only for float32 rows.
std::tuple<at::Tensor, at::Tensor> row_stats_grad_cuda(const at::Tensor& z_in, const at::Tensor& u_in,
                                                       const std::optional<at::Tensor>& tokens,
                                                       const at::Tensor& coef_in,
                                                       const std::optional<at::Tensor>& policy_in, double clip_eps,
                                                       double inv_temp, std::optional<at::ScalarType> grad_dtype) {
  const Rows r = check_rows(z_in, u_in);
  const c10::cuda::CUDAGuard guard(r.z.device());
  const at::ScalarType out_type = grad_dtype.value_or(r.z.scalar_type());
  check_grad_dtype(out_type, r, "row_stats_grad");
  const int64_t z_cols = r.z.size(1);
  const FusedPlan plan = choose_fused_plan(
      r.n_rows, z_cols, r.vocab, pair_vec(r), pair_vec(r, z_cols), static_cast<int>(r.z.element_size()),
      static_cast<int>(r.u.element_size()), static_cast<int>(c10::elementSize(out_type)), fused_device(),
      std::getenv("MINILLM_FAST_FUSED_PLAN"));
  const bool fused = plan.any() && r.n_rows > 0 && r.n_rows * plan.cluster < (int64_t{1} << 31);
  if (!fused) {
    return {row_stats_cuda(z_in, u_in, tokens, inv_temp), at::empty({0}, r.z.options().dtype(out_type))};
  }
  at::Tensor dz = at::empty({r.n_rows, z_cols}, r.z.options().dtype(out_type));
  return {row_stats_grad_to(r, tokens, coef_in, policy_in, clip_eps, inv_temp, plan, dz), dz};
}

// row_stats_grad with dz written into `out` (e.g. rows of a 16-bit buffer the caller owns: [N, V_s], unit column
// stride, any row stride), always by the two passes in L2 (choose_fused_plan's l2_only; MINILLM_FAST_FUSED_PLAN
// "l2[s][:R]" still picks its variant), which take any rows. Returns the statistics.
at::Tensor row_stats_grad_into_cuda(const at::Tensor& z_in, const at::Tensor& u_in,
                                    const std::optional<at::Tensor>& tokens, const at::Tensor& coef_in,
                                    const std::optional<at::Tensor>& policy_in, double clip_eps, double inv_temp,
                                    at::Tensor& out) {
  const Rows r = check_rows(z_in, u_in);
  check_grad_out(out, r, "row_stats_grad_into");
  const c10::cuda::CUDAGuard guard(r.z.device());
  const int64_t z_cols = r.z.size(1);
  const FusedPlan plan = choose_fused_plan(
      r.n_rows, z_cols, r.vocab, pair_vec(r), out_vec(r, out), static_cast<int>(r.z.element_size()),
      static_cast<int>(r.u.element_size()), static_cast<int>(out.element_size()), fused_device(),
      std::getenv("MINILLM_FAST_FUSED_PLAN"), /*l2_only=*/true);
  if (r.n_rows == 0 || z_cols == 0) return at::empty({r.n_rows, kNumStats}, r.z.options().dtype(at::kFloat));
  return row_stats_grad_to(r, tokens, coef_in, policy_in, clip_eps, inv_temp, plan, out);
}

// x *= factor in place (factor: a float32 scalar on x's device), skipped on the device when factor is 1.
void scale_unless_one_cuda(at::Tensor& x, const at::Tensor& factor_in) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "minillm_fast (cuda): scale_unless_one_ needs a contiguous CUDA x");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "minillm_fast (cuda): x must be 16-byte aligned");
  TORCH_CHECK(factor_in.numel() == 1 && factor_in.device() == x.device(),
              "minillm_fast (cuda): factor must be one value on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor factor = factor_in.to(at::kFloat).contiguous();
  ScaleArgs args;
  args.x = x.data_ptr();
  args.n = x.numel();
  args.factor = factor.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_one(x.scalar_type(), "x", [&](auto t) {
    using T = typename decltype(t)::type;
    check_cuda_ok(launch_scale_unless_one<T>(args, stream), "scale_unless_one_");
  });
}

void fill_beta(JsdArgs& args, double beta) {
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "minillm_fast (cuda): jsd needs 0 < beta < 1, got ", beta);
  args.beta = static_cast<float>(beta);
  args.one_minus_beta = static_cast<float>(1.0 - beta);
  args.log_beta = static_cast<float>(std::log(beta));
  args.log1m_beta = static_cast<float>(std::log1p(-beta));
}

at::Tensor jsd_rows_cuda(const at::Tensor& z_in, const at::Tensor& u_in, const at::Tensor& stats_in, double beta,
                         double inv_temp) {
  const Rows r = check_rows(z_in, u_in);
  const c10::cuda::CUDAGuard guard(r.z.device());
  const at::Tensor stats = side_f32(stats_in, r.z, kNumStats, "stats");
  at::Tensor out = at::empty({r.n_rows, 2}, r.z.options().dtype(at::kFloat));
  JsdArgs args;
  fill_beta(args, beta);
  if (r.n_rows == 0) return out;

  args.z = r.z.data_ptr();
  args.u = r.u.data_ptr();
  args.stats = stats.data_ptr<float>();
  args.out = out.data_ptr<float>();
  args.n_rows = r.n_rows;
  args.z_stride = row_stride(r.z);
  args.u_stride = row_stride(r.u);
  args.vocab = r.vocab;
  args.z_cols = static_cast<int>(r.z.size(1));
  args.inv_temp = static_cast<float>(inv_temp);
  args.plan = make_plan(r.n_rows, r.vocab, pair_vec(r), num_sms(), /*may_split=*/true);
  at::Tensor workspace;
  if (args.plan.splits > 1) {
    workspace = at::empty({r.n_rows * args.plan.splits * kJsdPartialFloats}, out.options());
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(r.z, r.u, [&](auto zt, auto ut) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    check_cuda_ok(launch_jsd_rows<Tz, Tu>(args, stream), "jsd_rows");
  });
  return out;
}

at::Tensor jsd_grad_cuda(const at::Tensor& z_in, const at::Tensor& u_in, const at::Tensor& stats_in,
                         const at::Tensor& jsd_in, const at::Tensor& coef_in, double beta, double inv_temp) {
  const Rows r = check_rows(z_in, u_in);
  const c10::cuda::CUDAGuard guard(r.z.device());
  const at::Tensor stats = side_f32(stats_in, r.z, kNumStats, "stats");
  const at::Tensor jsd = side_f32(jsd_in, r.z, 2, "jsd");
  const at::Tensor coef = side_f32(coef_in, r.z, 0, "coef");
  const int64_t z_cols = r.z.size(1);
  at::Tensor dz = at::empty({r.n_rows, z_cols}, r.z.options());
  JsdArgs args;
  fill_beta(args, beta);
  if (r.n_rows == 0 || z_cols == 0) return dz;

  args.z = r.z.data_ptr();
  args.u = r.u.data_ptr();
  args.stats = stats.data_ptr<float>();
  args.jsd = jsd.data_ptr<float>();
  args.coef = coef.data_ptr<float>();
  args.dz = dz.data_ptr();
  args.n_rows = r.n_rows;
  args.z_stride = row_stride(r.z);
  args.u_stride = row_stride(r.u);
  args.vocab = r.vocab;
  args.z_cols = static_cast<int>(z_cols);
  args.inv_temp = static_cast<float>(inv_temp);
  args.plan = make_plan(r.n_rows, z_cols, pair_vec(r, z_cols), num_sms(), /*may_split=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(r.z, r.u, [&](auto zt, auto ut) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    check_cuda_ok(launch_jsd_grad<Tz, Tu>(args, stream), "jsd_grad");
  });
  return dz;
}

at::Tensor sample_rows_cuda(const at::Tensor& z_in, const at::Tensor& u_in, const at::Tensor& use_teacher_in,
                            const at::Tensor& uniform_in, double inv_temp) {
  const Rows r = check_rows(z_in, u_in);
  const c10::cuda::CUDAGuard guard(r.z.device());
  TORCH_CHECK(use_teacher_in.device() == r.z.device() && uniform_in.device() == r.z.device(),
              "minillm_fast (cuda): use_teacher and uniform must be on ", r.z.device());
  TORCH_CHECK(use_teacher_in.dim() == 1 && use_teacher_in.size(0) == r.n_rows,
              "minillm_fast (cuda): use_teacher must have shape [", r.n_rows, "], got ", use_teacher_in.sizes());
  TORCH_CHECK(uniform_in.dim() == 1 && uniform_in.size(0) == r.n_rows,
              "minillm_fast (cuda): uniform must have shape [", r.n_rows, "], got ", uniform_in.sizes());
  const at::Tensor use_teacher = use_teacher_in.to(at::kBool).contiguous();
  const at::Tensor uniform = uniform_in.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({r.n_rows}, r.z.options().dtype(at::kLong));
  if (r.n_rows == 0) return out;

  SampleArgs args;
  args.z = r.z.data_ptr();
  args.u = r.u.data_ptr();
  args.use_teacher = use_teacher.data_ptr<bool>();
  args.uniform = uniform.data_ptr<double>();
  args.out = out.data_ptr<int64_t>();
  args.n_rows = r.n_rows;
  args.z_stride = row_stride(r.z);
  args.u_stride = row_stride(r.u);
  args.vocab = r.vocab;
  args.inv_temp = static_cast<float>(inv_temp);
  args.threads = sample_threads(r.vocab);
  const int ez = vector_elems(static_cast<int>(r.z.element_size()));
  const int eu = vector_elems(static_cast<int>(r.u.element_size()));
  args.z_vec = r.vocab >= ez && rows_aligned(r.z.data_ptr(), args.z_stride, static_cast<int>(r.z.element_size()), ez);
  args.u_vec = r.vocab >= eu && rows_aligned(r.u.data_ptr(), args.u_stride, static_cast<int>(r.u.element_size()), eu);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(r.z, r.u, [&](auto zt, auto ut) {
    using Tz = typename decltype(zt)::type;
    using Tu = typename decltype(ut)::type;
    check_cuda_ok(launch_sample_rows<Tz, Tu>(args, stream), "sample_rows");
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace minillm_fast

TORCH_LIBRARY_IMPL(minillm_fast, CUDA, m) {
  m.impl("row_stats", &minillm_fast::cuda::row_stats_cuda);
  m.impl("logits_grad", &minillm_fast::cuda::logits_grad_cuda);
  m.impl("logits_grad_into", &minillm_fast::cuda::logits_grad_into_cuda);
  m.impl("jsd_rows", &minillm_fast::cuda::jsd_rows_cuda);
  m.impl("jsd_grad", &minillm_fast::cuda::jsd_grad_cuda);
  m.impl("sample_rows", &minillm_fast::cuda::sample_rows_cuda);
  m.impl("row_stats_grad", &minillm_fast::cuda::row_stats_grad_cuda);
  m.impl("row_stats_grad_into", &minillm_fast::cuda::row_stats_grad_into_cuda);
  m.impl("scale_unless_one_", &minillm_fast::cuda::scale_unless_one_cuda);
}

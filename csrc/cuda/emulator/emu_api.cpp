// extern "C" mirror of csrc/cuda/binding.cpp for the CPU emulator: the same launch plans and launcher calls, on
// raw pointers of CPU tensors (emu_ops.py calls these through ctypes).
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>
#include "cuda/launchers.h"


using namespace minillm_fast::cuda;

template <typename F>
void dispatch_one(int code, F&& f) {
  if (code == 0) f(float{});
  else if (code == 1) f(__nv_bfloat16{});
  else f(__half{});
}
template <typename F>
void dispatch_pair(int zc, int uc, F&& f) {
  dispatch_one(zc, [&](auto zt) { dispatch_one(uc, [&](auto ut) { f(zt, ut); }); });
}
// f(Tz, Tu, To) for the rows' and dz's dtype codes, where the gradient launchers have that combination: dz in the
// student's dtype, or bfloat16 / float16 from float32 rows (binding.cpp's dispatch_grad).
template <typename F>
void dispatch_grad(int zc, int uc, int oc, F&& f) {
  dispatch_pair(zc, uc, [&](auto zt, auto ut) {
    if constexpr (std::is_same_v<decltype(zt), float> && std::is_same_v<decltype(ut), float>) {
      dispatch_one(oc, [&](auto ot) { f(zt, ut, ot); });
    } else if (oc == zc) {
      f(zt, ut, zt);
    }
  });
}
static int esize(int code) { return code == 0 ? 4 : 2; }
static int pair_vec(const void* z, int64_t zs, int zc, const void* u, int64_t us, int uc, int vocab,
                    int64_t out_stride) {
  const int e = vector_elems(std::max(esize(zc), esize(uc)));
  bool ok = vocab >= e && rows_aligned(z, zs, esize(zc), e) && rows_aligned(u, us, esize(uc), e);
  if (out_stride >= 0) ok = ok && out_stride % e == 0;
  return ok ? e : 1;
}

extern "C" {
int emu_row_stats(int zc, int uc, const void* z, const void* u, const int64_t* tokens, float* stats, int64_t n,
                  int64_t zs, int64_t us, int vocab, float it, int num_sms, int* plan_out) {
  RowStatsArgs a;
  a.z = z; a.u = u; a.tokens = tokens; a.stats = stats; a.n_rows = n; a.z_stride = zs; a.u_stride = us;
  a.vocab = vocab; a.inv_temp = it;
  a.plan = make_plan(n, vocab, pair_vec(z, zs, zc, u, us, uc, vocab, -1), num_sms, true);
  std::vector<float> ws;
  if (a.plan.splits > 1) { ws.assign(n * a.plan.splits * kRowStatsPartialFloats, 12345.0f); a.workspace = ws.data(); }
  plan_out[0] = a.plan.vec; plan_out[1] = a.plan.threads; plan_out[2] = a.plan.splits; plan_out[3] = a.plan.chunk;
  int err = 0;
  dispatch_pair(zc, uc, [&](auto zt, auto ut) { err = launch_row_stats<decltype(zt), decltype(ut)>(a, nullptr); });
  return err;
}
// oc: dz's dtype code (zc, or 1 / 2 for float32 rows); ds: dz's row stride (the binding's logits_grad_to).
int emu_logits_grad(int zc, int uc, int oc, const void* z, const void* u, const int64_t* tokens, const float* stats,
                    const float* coef, void* dz, int64_t ds, int64_t n, int64_t zs, int64_t us, int vocab, int z_cols,
                    float it, int num_sms, int* plan_out) {
  LogitsGradArgs a;
  a.z = z; a.u = u; a.tokens = tokens; a.stats = stats; a.coef = coef; a.dz = dz; a.dz_stride = ds; a.n_rows = n;
  a.z_stride = zs; a.u_stride = us; a.vocab = vocab; a.z_cols = z_cols; a.inv_temp = it;
  int vec = pair_vec(z, zs, zc, u, us, uc, vocab, ds);
  if (vec > 1 && !rows_aligned(dz, ds, esize(oc), vec)) vec = 1;
  a.plan = make_plan(n, z_cols, vec, num_sms, true);
  plan_out[0] = a.plan.vec; plan_out[1] = a.plan.threads; plan_out[2] = a.plan.splits; plan_out[3] = a.plan.chunk;
  int err = 1;  // a dz dtype the launchers are not instantiated for
  dispatch_grad(zc, uc, oc, [&](auto zt, auto ut, auto ot) {
    err = launch_logits_grad<decltype(zt), decltype(ut), decltype(ot)>(a, nullptr);
  });
  return err;
}
int emu_jsd(int which, int zc, int uc, const void* z, const void* u, const float* stats, const float* jsd,
            const float* coef, float* out, void* dz, int64_t n, int64_t zs, int64_t us, int vocab, int z_cols,
            float it, float beta, float omb, float lb, float l1mb, int num_sms, int* plan_out) {
  JsdArgs a;
  a.z = z; a.u = u; a.stats = stats; a.jsd = jsd; a.coef = coef; a.out = out; a.dz = dz; a.n_rows = n;
  a.z_stride = zs; a.u_stride = us; a.vocab = vocab; a.z_cols = z_cols; a.inv_temp = it; a.beta = beta;
  a.one_minus_beta = omb; a.log_beta = lb; a.log1m_beta = l1mb;
  std::vector<float> ws;
  if (which == 0) {
    a.plan = make_plan(n, vocab, pair_vec(z, zs, zc, u, us, uc, vocab, -1), num_sms, true);
    if (a.plan.splits > 1) { ws.assign(n * a.plan.splits * kJsdPartialFloats, 12345.0f); a.workspace = ws.data(); }
  } else {
    a.plan = make_plan(n, z_cols, pair_vec(z, zs, zc, u, us, uc, vocab, z_cols), num_sms, true);
  }
  plan_out[0] = a.plan.vec; plan_out[1] = a.plan.threads; plan_out[2] = a.plan.splits; plan_out[3] = a.plan.chunk;
  int err = 0;
  dispatch_pair(zc, uc, [&](auto zt, auto ut) {
    err = which == 0 ? launch_jsd_rows<decltype(zt), decltype(ut)>(a, nullptr)
                     : launch_jsd_grad<decltype(zt), decltype(ut)>(a, nullptr);
  });
  return err;
}
int emu_sample_rows(int zc, int uc, const void* z, const void* u, const bool* use_teacher, const double* uniform,
                    int64_t* out, int64_t n, int64_t zs, int64_t us, int vocab, float it, int* plan_out) {
  SampleArgs a;
  a.z = z; a.u = u; a.use_teacher = use_teacher; a.uniform = uniform; a.out = out; a.n_rows = n; a.z_stride = zs;
  a.u_stride = us; a.vocab = vocab; a.inv_temp = it; a.threads = sample_threads(vocab);
  const int ez = vector_elems(esize(zc)), eu = vector_elems(esize(uc));
  a.z_vec = vocab >= ez && rows_aligned(z, zs, esize(zc), ez);
  a.u_vec = vocab >= eu && rows_aligned(u, us, esize(uc), eu);
  plan_out[0] = a.z_vec; plan_out[1] = a.threads; plan_out[2] = a.u_vec; plan_out[3] = 0;
  int err = 0;
  dispatch_pair(zc, uc, [&](auto zt, auto ut) { err = launch_sample_rows<decltype(zt), decltype(ut)>(a, nullptr); });
  return err;
}
// max_cluster: 8 as on sm_90, or 1 as on older GPUs; max_smem: the opt-in shared memory per block (H100: 232448);
// num_sms, l2_bytes: for the two-pass plan in L2. into: row_stats_grad_into (dz with row stride ds; always the L2
// plan), else row_stats_grad (contiguous dz). plan_out = (vec, cluster, slice, stages, chunk_rows, chained); neither
// a cluster nor chunk_rows: no plan (nothing launched).
int emu_row_stats_grad(int into, int zc, int uc, int oc, const void* z, const void* u, const int64_t* tokens,
                       const float* coef, const float* policy, float clip_low, float clip_high, float* stats, void* dz,
                       int64_t ds, int64_t n, int64_t zs, int64_t us, int vocab, int z_cols, float it,
                       int max_cluster, int max_smem, int num_sms, int64_t l2_bytes, int* plan_out) {
  RowStatsGradArgs a;
  a.z = z; a.u = u; a.tokens = tokens; a.coef = coef; a.policy = policy; a.clip_low = clip_low;
  a.clip_high = clip_high; a.stats = stats; a.dz = dz; a.dz_stride = ds; a.n_rows = n; a.z_stride = zs;
  a.u_stride = us; a.vocab = vocab; a.z_cols = z_cols; a.inv_temp = it;
  FusedDevice device;
  device.max_cluster = max_cluster; device.max_smem = max_smem; device.num_sms = num_sms; device.l2_bytes = l2_bytes;
  const int stats_vec = pair_vec(z, zs, zc, u, us, uc, vocab, -1);
  int grad_vec = pair_vec(z, zs, zc, u, us, uc, vocab, ds);
  if (grad_vec > 1 && !rows_aligned(dz, ds, esize(oc), grad_vec)) grad_vec = 1;
  a.plan = choose_fused_plan(n, z_cols, vocab, stats_vec, grad_vec, esize(zc), esize(uc), esize(oc), device,
                             std::getenv("MINILLM_FAST_FUSED_PLAN"), into != 0);
  plan_out[0] = a.plan.vec; plan_out[1] = a.plan.cluster; plan_out[2] = a.plan.slice; plan_out[3] = a.plan.stages;
  plan_out[4] = static_cast<int>(a.plan.chunk_rows);
  plan_out[5] = a.plan.stats_plan.chained;
  if (!a.plan.any()) return 0;
  if (a.plan.smem > kEmuDynamicShared) return 1;
  std::vector<float> ws(a.plan.workspace_floats(n), 12345.0f);
  if (!ws.empty()) a.workspace = ws.data();
  int err = 1;  // a dz dtype the launchers are not instantiated for
  dispatch_grad(zc, uc, oc, [&](auto zt, auto ut, auto ot) {
    err = launch_row_stats_grad<decltype(zt), decltype(ut), decltype(ot)>(a, nullptr);
  });
  return err;
}
int emu_scale_unless_one(int code, void* x, int64_t n, const float* factor) {
  ScaleArgs a;
  a.x = x; a.n = n; a.factor = factor;
  int err = 0;
  dispatch_one(code, [&](auto t) { err = launch_scale_unless_one<decltype(t)>(a, nullptr); });
  return err;
}
}

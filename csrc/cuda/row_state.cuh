// Per-row math shared by every CUDA kernel of minillm_fast: the online-softmax state and its merge, special
// float values that survive --use_fast_math, element loads/stores for float / bf16 / fp16, and warp and block
// reductions. No PyTorch header here: the kernels compile with plain nvcc.
//
// Semantics of the primitives: minillm_fast/backends/__init__.py; the float32 behaviour to match:
// minillm_fast/backends/torch_backend.py.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace minillm_fast {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------------
// Special values and tests by bit pattern. nvcc's --use_fast_math does not assume finite math, but building
// infinities from bits and testing the exponent field keeps these correct under any flag set.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_neg_inf(float x) { return __float_as_uint(x) == 0xff800000u; }

// exp: the hardware ex2 path (what --use_fast_math makes of expf anyway), used knowingly. Its relative error is
// a few ulp for the arguments that matter (x - max in [-20, 0]); exp(-inf) = +0 and exp(NaN) = NaN.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

// log of a sum s >= 1 (a sum of exp(x - max) always contains exp(0) = 1), or s = 0 for an empty row.
// log1pf is not among the functions --use_fast_math replaces, so this keeps full precision near s = 1 (nearly
// one-hot rows), where __logf has an absolute error of ~2^-21. s - 1 is exact for s in [1, 2] (Sterbenz).
// log_sum(0) = log1p(-1) = -inf.
__device__ __forceinline__ float log_sum(float s) { return log1pf(s - 1.0f); }

// torch.logaddexp(a, b) in float32: -inf when both are -inf, max + log1p(exp(min - max)) otherwise.
__device__ __forceinline__ float log_add_exp(float a, float b) {
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  if (!(lo > neg_inf())) return hi;  // lo = -inf: exp(lo - hi) = 0 exactly; also covers both -inf
  return hi + log1pf(fast_exp(lo - hi));
}

// f * x where f = 0 means "this part vanished": 0 * inf would be NaN, torch's `e > 0` masks give 0.
__device__ __forceinline__ float scale_by(float f, float x) { return f > 0.0f ? f * x : 0.0f; }

// The shift torch_backend subtracts before exp: the max where finite, else 0.
__device__ __forceinline__ float finite_or_zero(float m) { return is_finite(m) ? m : 0.0f; }

// ---------------------------------------------------------------------------------------------------------------
// Element types: loads and stores go through raw integer words so that a vector of E elements is one aligned
// load/store instruction (16 bytes: LDG.128) whatever the element type.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float f) { return __float_as_uint(f); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <>
struct Elem<__half> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// The centred logit fl(fl(x - shift) * scale) of a raw logit x (float32, as stored) with the raw row max as the shift
// and scale = 1/tau: the subtraction first, rounded relative to |x - shift| (exact where x and the shift are within
// a factor of 2: Sterbenz), never at ulp(|x / tau|), which with logits ~-1e3 and tau = 2.7 would already be 3e-5
// before the cancellation. __fsub_rn / __fmul_rn are never contracted into an FMA (nvcc and ptxas contract plain
// operations under the default --fmad=true), so every pass of every kernel forms the same bits, as the other
// backends do (minillm_fast/backends/__init__.py), and the centred logit is exactly 0 at the argmax, which the
// anchor (UA, EQ_DA) relies on. With scale = 1 it is x - shift.
__device__ __forceinline__ float centred(float x, float shift, float scale) {
  return __fmul_rn(__fsub_rn(x, shift), scale);
}

template <typename T, int E>
struct alignas(sizeof(typename Elem<T>::Bits) * E) BitsVec {
  typename Elem<T>::Bits v[E];
};

// E consecutive elements starting at p, converted to float. p must be aligned to E * sizeof(T) bytes (the
// launchers pick E = 1 when a row start or stride does not allow it).
template <typename T, int E>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[E]) {
  using Bits = typename Elem<T>::Bits;
  if constexpr (E == 1) {
    out[0] = Elem<T>::to_float(*reinterpret_cast<const Bits*>(p));
  } else {
    const BitsVec<T, E> w = *reinterpret_cast<const BitsVec<T, E>*>(p);
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = Elem<T>::to_float(w.v[i]);
  }
}

// The raw words of the E elements at columns [c, c + E) of a row of n columns; columns >= n read as -inf
// (probability 0). One vector load when the whole vector is in bounds (row + c aligned as for load_floats).
template <typename T, int E>
__device__ __forceinline__ BitsVec<T, E> load_bits_bounded(const T* __restrict__ row, int c, int n) {
  using Bits = typename Elem<T>::Bits;
  if (c + E <= n) return *reinterpret_cast<const BitsVec<T, E>*>(row + c);
  BitsVec<T, E> w;
  const Bits* r = reinterpret_cast<const Bits*>(row);
  const Bits minus_inf = Elem<T>::from_float(neg_inf());  // -inf is exact in every element type
#pragma unroll
  for (int i = 0; i < E; ++i) w.v[i] = (c + i < n) ? r[c + i] : minus_inf;
  return w;
}

// Raw words to float.
template <typename T, int E>
__device__ __forceinline__ void to_floats(const BitsVec<T, E>& w, float (&out)[E]) {
#pragma unroll
  for (int i = 0; i < E; ++i) out[i] = Elem<T>::to_float(w.v[i]);
}

// Like load_floats for the E elements at columns [c, c + E) of a row of n columns; columns >= n read as -inf
// (probability 0). Vector load when the whole vector is in bounds.
template <typename T, int E>
__device__ __forceinline__ void load_floats_bounded(const T* __restrict__ row, int c, int n, float (&out)[E]) {
  to_floats<T, E>(load_bits_bounded<T, E>(row, c, n), out);
}

template <typename T>
__device__ __forceinline__ float load_one(const T* __restrict__ p) {
  return Elem<T>::to_float(*reinterpret_cast<const typename Elem<T>::Bits*>(p));
}

template <typename T, int E>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&v)[E]) {
  using Bits = typename Elem<T>::Bits;
  if constexpr (E == 1) {
    *reinterpret_cast<Bits*>(p) = Elem<T>::from_float(v[0]);
  } else {
    BitsVec<T, E> w;
#pragma unroll
    for (int i = 0; i < E; ++i) w.v[i] = Elem<T>::from_float(v[i]);
    *reinterpret_cast<BitsVec<T, E>*>(p) = w;
  }
}

template <typename T>
__device__ __forceinline__ void store_one(T* __restrict__ p, float v) {
  *reinterpret_cast<typename Elem<T>::Bits*>(p) = Elem<T>::from_float(v);
}

// Zeros over columns [c0, c1) of an output row, by the whole block: c0 a multiple of E, the row start aligned
// for E elements (vector stores), the < E leftover columns one by one.
template <typename T, int E>
__device__ __forceinline__ void store_zeros(T* __restrict__ out, int c0, int c1) {
  const int cv = c1 > c0 ? c0 + (c1 - c0) / E * E : c0;
  float zeros[E];
#pragma unroll
  for (int i = 0; i < E; ++i) zeros[i] = 0.0f;
  for (int c = c0 + static_cast<int>(threadIdx.x) * E; c < cv; c += blockDim.x * E) store_vec<T, E>(out + c, zeros);
  for (int c = cv + static_cast<int>(threadIdx.x); c < c1; c += blockDim.x) store_one<T>(out + c, 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Online softmax state of both distributions of a row, read in one pass: q over z * it and p over u * it (it: the
// launch's float32 1/tau).
//
// The maxima are tracked raw (of z and u as stored), and every quantity is taken relative to the running *shifts*
// sq = m_q and sp = m_p (the running maxima where finite; 0 while a distribution has seen only -inf, exactly like
// torch_backend's _finite(m)). With the centred logits tq = fl(fl(z - sq) * it), tp = fl(fl(u - sp) * it)
// (centred(); scaled units from here on) and the centred difference d = tq - tp (contract:
// minillm_fast/backends/__init__.py), per distribution (q shown; p is the mirror image with tp and -d):
//   s = sum exp(tq)             the normaliser                        -> LOGS_Q = log s
//   a = sum exp(tq) d           the cross sum                         -> EQ_D   = a / s
//   b = sum exp(tq) tq          the centred sum                       -> EQ_ZC  = b / s
// Entries with exp(t) = 0 contribute nothing, even where d or t is infinite (0 * inf = 0, torch's `e > 0` masks).
// When the raw shifts grow to m_new, by dq = fl(fl(m_new - sq) * it) >= 0 in scaled units (dp likewise), with
// f = exp(-dq):
//   s' = f s,   b' = f (b - dq s),   a' = f (a - (dq - dp) s)      (d itself moves by -(dq - dp))
// and symmetrically for p with f = exp(-dp), a' = f (a - (dp - dq) s). The cross sums couple the two states, so
// they are always raised together. A distribution that has seen only -inf has m = -inf and s = a = b = 0. Merges
// (threads, blocks, split rows) raise each state to the merged maxima this way, so every state carries it.
//
// The anchor (minillm_fast/backends/__init__.py: UA, EQ_DA): an entry a with z_a = m_q, its raw u_a (ua), and
//   an = sum exp(tq) (d - d_a),   d - d_a = d + c_a,   c_a = fl(fl(u_a - sp) * it) (a's tp; tq = 0 at a),
// exactly 0 at a itself, which keeps the reverse-KL gradient at the argmax of nearly one-hot rows
// (q_a (d_a - E_q d) = -q_a an / s) from being rounded at ulp(|d_a|). When q's max moves by dq to a new entry a',
// an' = f (an - (dq - fl(fl(u_a' - u_a) * it)) s) (the difference of the raw anchors, scaled as dq is).
// Within a thread a is the first entry reaching the max; a merge keeps the anchor of the part with the larger max,
// on a tie the larger u (so that merging is commutative: the butterflies give every lane the same bits).
// ---------------------------------------------------------------------------------------------------------------
struct OnlineSoftmax {
  float m, s, a, b;

  __device__ __forceinline__ static OnlineSoftmax empty() { return OnlineSoftmax{neg_inf(), 0.0f, 0.0f, 0.0f}; }

  __device__ __forceinline__ float shift() const { return finite_or_zero(m); }

  // New max m_new >= m; own shift grew by delta, the centred difference d by -cross.
  __device__ __forceinline__ void rescale(float m_new, float delta, float cross) {
    if (!is_neg_inf(m) && (delta != 0.0f || cross != 0.0f)) {
      const float f = fast_exp(-delta);
      b = scale_by(f, b - delta * s);
      a = scale_by(f, a - cross * s);
      s = f * s;
    }  // an empty state has s = a = b = 0 whatever the shifts
    m = m_new;
  }

  // One entry with centred logit t = x - shift() and cross weight w (d for q, -d for p); returns exp(t).
  __device__ __forceinline__ float accumulate(float t, float w) {
    const float e = fast_exp(t);  // t = -inf (a -inf logit) gives 0
    const bool pos = e > 0.0f;    // false for 0 and NaN
    s += pos ? e : 0.0f;
    a += pos ? e * w : 0.0f;
    b += pos ? e * t : 0.0f;
    return e;
  }

  // log s, and the expectations a / s and b / s: NaN for an empty distribution (0 / 0, as torch_backend gives).
  __device__ __forceinline__ float log_s() const { return log_sum(s); }
  __device__ __forceinline__ float mean_a() const { return s > 0.0f ? __fdiv_rn(a, s) : quiet_nan(); }
  __device__ __forceinline__ float mean_b() const { return s > 0.0f ? __fdiv_rn(b, s) : quiet_nan(); }

  __device__ __forceinline__ OnlineSoftmax shfl_xor(int lane_mask) const {
    return OnlineSoftmax{__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask),
                         __shfl_xor_sync(0xffffffffu, a, lane_mask), __shfl_xor_sync(0xffffffffu, b, lane_mask)};
  }
};

struct RowPairState {
  OnlineSoftmax q, p;
  float ua, an;  // the anchor's raw u_a (NaN while q is empty) and the anchored cross sum
  // s_q - s_p summed entry by entry (log_ratio): small for close distributions, so rounded relative to the
  // difference. When the maxima move with factors f = exp(-delta): f_q s_q - f_p s_p = f_q dqp + (f_q - f_p) s_p.
  float dqp;
  float it;  // 1/tau: the same in every state of a launch (not stored with the partial states)

  __device__ __forceinline__ static RowPairState empty(float inv_temp) {
    return RowPairState{OnlineSoftmax::empty(), OnlineSoftmax::empty(), quiet_nan(), 0.0f, 0.0f, inv_temp};
  }
  // The empty state of this one's launch (block_reduce's idle lanes).
  __device__ __forceinline__ RowPairState empty_like() const { return empty(it); }

  // The growth of a shift to the raw max m_new (>= the max), in scaled units; 0 while m_new = -inf.
  __device__ __forceinline__ float growth(float m_new, float shift) const {
    return centred(finite_or_zero(m_new), shift, it);
  }

  // an moved to q's max m_new (>= q.m) and the anchor ua_new there (unchanged state: an itself).
  __device__ __forceinline__ float anchored_at(float m_new, float ua_new) const {
    if (is_neg_inf(q.m)) return 0.0f;  // an empty q contributes nothing
    const float dq = growth(m_new, q.shift());
    if (dq == 0.0f && ua_new == ua) return an;
    return scale_by(fast_exp(-dq), an - (dq - centred(ua_new, ua, it)) * q.s);
  }

  // Raise both maxima to at least (mq, mp) (raw; NaN candidates are ignored by fmaxf); ua_seen is u at an entry
  // reaching mq, the new anchor if mq raises q's max.
  __device__ __forceinline__ void raise_to(float mq, float mp, float ua_seen) {
    const float mq_new = fmaxf(q.m, mq), mp_new = fmaxf(p.m, mp);
    if (mq_new > q.m) {
      an = anchored_at(mq_new, ua_seen);
      ua = ua_seen;
    }
    const float dq = growth(mq_new, q.shift());
    const float dp = growth(mp_new, p.shift());
    if (dq != 0.0f || dp != 0.0f) {  // an empty distribution's factor is 0 (its sum is 0 whatever the shift)
      const float fq = is_neg_inf(q.m) ? 0.0f : fast_exp(-dq), fp = is_neg_inf(p.m) ? 0.0f : fast_exp(-dp);
      dqp = scale_by(fq, dqp) + (fq - fp) * p.s;
    }
    q.rescale(mq_new, dq, dq - dp);
    p.rescale(mp_new, dp, dp - dq);
  }

  // E raw entries of each row: one rescale for the vectors' maxima, then per entry the two centred logits and one
  // exp per distribution.
  template <int E>
  __device__ __forceinline__ void add(const float (&x)[E], const float (&y)[E]) {
    float mx = x[0], my = y[0];
#pragma unroll
    for (int i = 1; i < E; ++i) {
      mx = fmaxf(mx, x[i]);
      my = fmaxf(my, y[i]);
    }
    float ua_seen = y[E - 1];  // u at the first entry reaching mx
#pragma unroll
    for (int i = E - 2; i >= 0; --i) ua_seen = x[i] == mx ? y[i] : ua_seen;
    raise_to(mx, my, ua_seen);
    const float sq = q.shift(), sp = p.shift(), anchor_off = centred(ua, sp, it);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float tq = centred(x[i], sq, it), tp = centred(y[i], sp, it);  // the float operations of torch_backend
      const float d = tq - tp;
      const float e = q.accumulate(tq, d);
      an += e > 0.0f ? e * (d + anchor_off) : 0.0f;
      const float e_p = p.accumulate(tp, -d);
      dqp += (e > 0.0f ? e : 0.0f) - (e_p > 0.0f ? e_p : 0.0f);
    }
  }

  // Merge the state of other entries of the same row: both raised to the common maxima, then summed; the anchor
  // as the header says (commutative).
  __device__ __forceinline__ void merge(const RowPairState& other) {
    RowPairState o = other;
    const float mq = fmaxf(q.m, o.q.m), mp = fmaxf(p.m, o.p.m);
    const float ua_m = o.q.m > q.m ? o.ua : (q.m > o.q.m ? ua : fmaxf(ua, o.ua));
    const float an_m = anchored_at(mq, ua_m) + o.anchored_at(mq, ua_m);
    raise_to(mq, mp, ua_m);
    o.raise_to(mq, mp, ua_m);
    q.s += o.q.s; q.a += o.q.a; q.b += o.q.b;
    p.s += o.p.s; p.a += o.p.a; p.b += o.p.b;
    dqp += o.dqp;
    ua = ua_m;
    an = an_m;
  }

  __device__ __forceinline__ RowPairState shfl_xor(int lane_mask) const {
    return RowPairState{q.shfl_xor(lane_mask), p.shfl_xor(lane_mask), __shfl_xor_sync(0xffffffffu, ua, lane_mask),
                        __shfl_xor_sync(0xffffffffu, an, lane_mask), __shfl_xor_sync(0xffffffffu, dqp, lane_mask),
                        it};
  }

  // Partial states of a split row travel through global memory as kFloats floats (inv_temp: the launch's 1/tau).
  static constexpr int kFloats = 11;
  __device__ __forceinline__ void store(float* w) const {
    w[0] = q.m; w[1] = q.s; w[2] = q.a; w[3] = q.b;
    w[4] = p.m; w[5] = p.s; w[6] = p.a; w[7] = p.b;
    w[8] = ua; w[9] = an; w[10] = dqp;
  }
  __device__ __forceinline__ static RowPairState load(const float* w, float inv_temp) {
    return RowPairState{OnlineSoftmax{w[0], w[1], w[2], w[3]}, OnlineSoftmax{w[4], w[5], w[6], w[7]}, w[8], w[9],
                        w[10], inv_temp};
  }
  // The same, bypassing L1 (__ldcg): for states another block of the cluster stored (see row_stats_grad.cu).
  __device__ __forceinline__ static RowPairState load_cg(const float* w, float inv_temp) {
    return RowPairState{OnlineSoftmax{__ldcg(w), __ldcg(w + 1), __ldcg(w + 2), __ldcg(w + 3)},
                        OnlineSoftmax{__ldcg(w + 4), __ldcg(w + 5), __ldcg(w + 6), __ldcg(w + 7)}, __ldcg(w + 8),
                        __ldcg(w + 9), __ldcg(w + 10), inv_temp};
  }

  // (UA, EQ_DA) = (u_a, an / s_q), both NaN where either is not finite (no anchor: empty q, u_a = -inf).
  __device__ __forceinline__ float anchor_mean() const {
    const float mean = q.s > 0.0f ? __fdiv_rn(an, q.s) : quiet_nan();
    return is_finite(mean) && is_finite(ua) ? mean : quiet_nan();
  }
  __device__ __forceinline__ float anchor_u() const { return is_finite(anchor_mean()) ? ua : quiet_nan(); }

  // Whether either distribution is empty (all -inf): the ops treat such a row as masked.
  __device__ __forceinline__ bool has_empty() const { return is_neg_inf(q.m) || is_neg_inf(p.m); }
};

// LOG_RATIO = log(s_q / s_p) as log1p(dqp / s_p), dqp = s_q - s_p summed entry by entry: neither the float32
// roundings of log s_q and log s_p (ulp ~5e-7 at log s ~ 10, as large as a KL of 1e-3 times 2e-5) nor those of the
// sums s_q, s_p enter; log s_q - log s_p where s_q < s_p / 2 or either is 0.
__device__ __forceinline__ float log_ratio(float s_q, float s_p, float dqp) {
  const float r = __fdiv_rn(dqp, s_p);
  return (s_q > 0.0f && s_p > 0.0f && r > -0.5f) ? log1pf(r) : log_sum(s_q) - log_sum(s_p);
}

// The row_stats columns of a row (layout: minillm_fast/backends/__init__.py) from its merged state and the raw
// zy = z_y, uy = u_y (0 without tokens): M_Q, M_P, ZY, UY and UA raw, the others in scaled units.
__device__ __forceinline__ void write_row_stats(float* o, const RowPairState& st, float zy, float uy) {
  o[0] = st.q.m;         // M_Q
  o[1] = st.q.log_s();   // LOGS_Q
  o[2] = st.p.m;         // M_P
  o[3] = st.p.log_s();   // LOGS_P
  o[4] = st.q.mean_a();  // EQ_D
  o[5] = st.q.mean_b();  // EQ_ZC
  o[6] = st.p.mean_a();  // EP_D
  o[7] = st.p.mean_b();  // EP_UC
  o[8] = zy;             // ZY
  o[9] = uy;             // UY
  o[10] = st.anchor_u();     // UA
  o[11] = st.anchor_mean();  // EQ_DA
  o[12] = log_ratio(st.q.s, st.p.s, st.dqp);  // LOG_RATIO
}

// The raw z_y and u_y of a row for token y (both 0 when y is out of [0, vocab): e.g. an ignore index).
template <typename Tz, typename Tu>
__device__ __forceinline__ void token_logits(const Tz* __restrict__ z, const Tu* __restrict__ u, int64_t y, int vocab,
                                             float& zy, float& uy) {
  zy = 0.0f;
  uy = 0.0f;
  if (y >= 0 && y < vocab) {
    zy = load_one(z + y);
    uy = load_one(u + y);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The logits_grad formula of one row: dz_v = c_kl q_v (d_v - E_q[d]) + c_q q_v + c_p p_v + c_y [v == y], with the
// centred logits tq = fl(fl(z - m_q) / tau), tp = fl(fl(u - m_p) / tau) (centred(); m: the raw row max where
// finite, else 0), d = tq - tp and q_v = exp(tq_v - log s_q): the shift is exact, so logits ~1e4 (or an offset
// under a temperature) keep their precision. At the anchor's entries (tq = 0 and tp = fl(fl(UA - m_p) / tau):
// d_v = d_a) d_v - E_q[d] is -EQ_DA.
// ---------------------------------------------------------------------------------------------------------------
struct GradRow {
  float shift_q, logs_q, shift_p, logs_p, eq_d, anchor_off, minus_eq_da, it;
  float c_kl, c_q, c_p, c_y;
  int64_t y;  // -1 without tokens

  // From a row's raw maxima m (-inf for an empty distribution), log-normalisers, E_q[d], anchor (raw UA, EQ_DA;
  // NaN: none), its coefficients cf = (c_kl, c_q, c_p, c_y) and 1/tau.
  __device__ __forceinline__ static GradRow make(float m_q, float logs_q, float m_p, float logs_p, float eq_d,
                                                 float ua, float eq_da, const float* cf, int64_t y, float it) {
    const float shift_p = finite_or_zero(m_p);
    return GradRow{finite_or_zero(m_q), logs_q, shift_p, logs_p, eq_d, centred(ua, shift_p, it), -eq_da, it,
                   cf[0], cf[1], cf[2], cf[3], y};
  }

  __device__ __forceinline__ bool all_zero() const {
    return c_kl == 0.0f && c_q == 0.0f && c_p == 0.0f && c_y == 0.0f;
  }
  // Whether the teacher row enters dz.
  __device__ __forceinline__ bool needs_teacher() const { return c_kl != 0.0f || c_p != 0.0f; }

  // The gradient at raw logits x (student) and xu (teacher; unread unless needs_teacher()) of column col.
  __device__ __forceinline__ float operator()(float x, float xu, int col) const {
    const float tq = centred(x, shift_q, it);
    const float q = fast_exp(tq - logs_q);
    float g = c_q * q;
    // d = tq - tp: each logit centred on its own row max first (exact), then scaled, as in row_stats
    if (c_kl != 0.0f) {
      const float tp = centred(xu, shift_p, it);
      const float rel = tq == 0.0f && tp == anchor_off ? minus_eq_da : (tq - tp) - eq_d;
      g += c_kl * (q > 0.0f ? q * rel : 0.0f);
    }
    if (c_p != 0.0f) g += c_p * fast_exp(centred(xu, shift_p, it) - logs_p);
    if (col == y) g += c_y;
    return g;
  }
};

// The coefficients of a row whose gradient is formed together with its statistics (row_stats_grad), from the
// loss's cf = (c_kl, c_q, c_p, c_y): zeros when the student's or the teacher's distribution is empty (the ops count
// such rows as masked), and with policy = (A, old, w) (minillm_loss), c_q and c_y times d pg / d log q(y) of the
// clipped policy-gradient loss (minillm_fast.loss._policy_gradient_rows): with rho = exp(log q(y) - old) w,
// pg = max(-A rho, -A clip(rho, clip_low, clip_high)), whose derivative is -A rho where the unclipped branch is the
// max (ties included) and 0 where the clipped one is; NaN rho gives 0, as in torch.
// log q(y) = (z_y - m_q) / tau - log s_q from the raw z_y and m_q (minillm_fast.loss._student_logprob_rows);
// log rho = log q(y) - old is formed in double, as loss.py does: z_y - m_q is not exact in float32 when the two
// differ in magnitude (z_y ~ 4e3, m_q ~ 2e4), nor is its product with 1/tau, and a rounding at ulp(2e4) ~ 2e-3
// would go straight into rho. One per row.
__device__ __forceinline__ void in_pass_coefs(float* cf, bool empty, float zy, float m_q, float logs_q, float it,
                                              const float* policy, float clip_low, float clip_high) {
  if (empty) {
    cf[0] = cf[1] = cf[2] = cf[3] = 0.0f;
    return;
  }
  if (policy == nullptr) return;
  const float adv = policy[0], old = policy[1], w = policy[2];
  const double log_rho = ((static_cast<double>(zy) - m_q) * it - logs_q) - old;
  const float rho = fast_exp(static_cast<float>(log_rho)) * w;
  const float clipped = -adv * fminf(fmaxf(rho, clip_low), clip_high);
  const float g = -adv * rho >= clipped ? -adv * rho : 0.0f;
  cf[1] *= g;
  cf[3] *= g;
}

// Raw max m and normaliser s = sum exp(fl(fl(x - m) / tau)) only (the sampler's first pass).
struct MaxSum {
  float m, s;
  float it;  // 1/tau
  __device__ __forceinline__ static MaxSum empty(float inv_temp) { return MaxSum{neg_inf(), 0.0f, inv_temp}; }
  __device__ __forceinline__ MaxSum empty_like() const { return empty(it); }
  template <int E>
  __device__ __forceinline__ void add(const float (&x)[E]) {
    float mx = x[0];
#pragma unroll
    for (int i = 1; i < E; ++i) mx = fmaxf(mx, x[i]);
    if (mx > m) {
      s = is_neg_inf(m) ? 0.0f : s * fast_exp(centred(m, mx, it));
      m = mx;
    }
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float e = fast_exp(centred(x[i], m, it));
      s += e > 0.0f ? e : 0.0f;
    }
  }
  __device__ __forceinline__ void merge(const MaxSum& o) {
    const float mn = fmaxf(m, o.m);
    if (is_neg_inf(mn)) return;
    const float s1 = is_neg_inf(m) ? 0.0f : s * fast_exp(centred(m, mn, it));
    const float s2 = is_neg_inf(o.m) ? 0.0f : o.s * fast_exp(centred(o.m, mn, it));
    m = mn;
    s = s1 + s2;
  }
  __device__ __forceinline__ MaxSum shfl_xor(int lane_mask) const {
    return MaxSum{__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask), it};
  }
};

// Plain float sums (jsd_rows' two KL parts).
template <int K>
struct SumState {
  float v[K];
  __device__ __forceinline__ static SumState empty() {
    SumState r;
#pragma unroll
    for (int i = 0; i < K; ++i) r.v[i] = 0.0f;
    return r;
  }
  __device__ __forceinline__ SumState empty_like() const { return empty(); }
  __device__ __forceinline__ void merge(const SumState& o) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] += o.v[i];
  }
  __device__ __forceinline__ SumState shfl_xor(int lane_mask) const {
    SumState r;
#pragma unroll
    for (int i = 0; i < K; ++i) r.v[i] = __shfl_xor_sync(0xffffffffu, v[i], lane_mask);
    return r;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Reductions over any state type S with merge(), shfl_xor() and empty_like() (an empty state with the same launch
// parameters: 1/tau). blockDim.x must be a multiple of 32 (at most 1024); every thread of the block must call
// block_reduce. The result is returned to every thread.
// ---------------------------------------------------------------------------------------------------------------
template <typename S>
__device__ __forceinline__ S warp_reduce(S s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s.merge(s.shfl_xor(offset));
  return s;
}

template <typename S>
__device__ __forceinline__ S block_reduce(S s, S* smem /* >= 32 entries */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  s = warp_reduce(s);
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    S t = lane < n_warps ? smem[lane] : s.empty_like();
    t = warp_reduce(t);
    if (lane == 0) smem[0] = t;  // every lane has read smem[lane] before the shuffles above
  }
  __syncthreads();
  const S r = smem[0];
  __syncthreads();  // smem may be reused right after
  return r;
}

// A row's state from its `splits` partial states at w (kRowStatsPartialFloats floats each), merged by one whole
// warp: lane j folds states j, j + 32, ... in order, then the butterfly. Every lane gets the result, and any warp
// merging the same partials gets the same bits. inv_temp: 1/tau.
__device__ __forceinline__ RowPairState warp_merge_partials(const float* w, int splits, float inv_temp) {
  RowPairState st = RowPairState::empty(inv_temp);
  for (int j = static_cast<int>(threadIdx.x & 31); j < splits; j += 32) {
    st.merge(RowPairState::load(w + j * RowPairState::kFloats, inv_temp));
  }
  return warp_reduce(st);
}

}  // namespace cuda
}  // namespace minillm_fast

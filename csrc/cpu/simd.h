// A minimal SIMD layer for the CPU kernels: one float32 vector type `Vec` of kWidth lanes, loads that widen the
// storage types of dtypes.h, masked arithmetic, and the two transcendental functions the kernels need (exp and
// log1p on [0, 1]).
//
// Two implementations with the same interface:
//   * AVX-512 (F, BW, VL, DQ): 16 lanes; chosen whenever the compiler targets it (the JIT build uses -march=native);
//   * portable: 8 lanes as a GCC vector type, which the compiler maps to the target's instructions (AVX2 on an
//     AVX2-only CPU with -march=native; MINILLM_FAST_PORTABLE=1 builds for generic x86-64 or any other CPU). Several
//     lanes also keep the row sums' rounding error near the AVX-512 build's (one sequential float32 sum over 10^5
//     columns does not meet the accuracy table).
// The kernels are written once against this interface. Knows nothing of PyTorch.
//
// Padding convention: `load_tail` fills the lanes past the end of a row with -inf. Every kernel treats a -inf
// logit as an entry of probability 0 (exp(-inf) = 0, masked out of every product), so a padded lane contributes
// nothing and the tail needs no special code.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, the Cephes expf polynomial for e^r, then scaling by 2^n
// (vscalefps, which also produces the denormal results); measured over every float in [-110, 90]: max error
// 0.9 ulp, relative error < 8e-8 in the normal range. Inputs are clamped to [-104, 88.8]: exactly 0 below -104
// (the true value rounds to 0 there) and for -inf, +inf above 88.73; NaN propagates. The scalar exp_scalar evaluates
// the very same formula (explicit fma), and so does the portable build's, so all builds round the same way.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/dtypes.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MINILLM_SIMD_AVX512 1
#include <immintrin.h>
#else
#define MINILLM_SIMD_AVX512 0
#if defined(__AVX__)
#include <immintrin.h>
#endif
#endif

namespace minillm {
namespace simd {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Constants of exp (Cephes expf).
constexpr float kExpLo = -104.0f;  // exp(-104) < 2^-150: rounds to 0
constexpr float kExpHi = 88.8f;    // exp(88.8) > FLT_MAX: rounds to +inf
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact for |n| <= 2^9
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

// Constants of log on [sqrt(1/2), sqrt(2)) (Cephes logf).
constexpr float kSqrt2 = 1.41421356237f;
constexpr float kLogP[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                            -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                            2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

// Scalar exp with exactly the arithmetic of the vector one (used by the scalar build and by scalar paths).
inline float exp_scalar(float x) {
  if (x != x) return x;
  x = std::fmin(std::fmax(x, kExpLo), kExpHi);
  const float n = std::fma(x, kLog2e, kRoundMagic) - kRoundMagic;
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  const float coeffs[7] = {kExpP1, kExpP2, kExpP3, kExpP4, kExpP5, 1.0f, 1.0f};
  float p = kExpP0;
  for (float c : coeffs) p = std::fma(p, r, c);
  return std::ldexp(p, static_cast<int>(n));
}

#if MINILLM_SIMD_AVX512

constexpr int kWidth = 16;
using Mask = __mmask16;

struct Vec {
  __m512 v;
};

inline Vec set1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
// x * inv_temp rounded to float32 on its own, never fused into a following operation (-ffp-contract=fast would
// fuse a plain product): the centred logits (centre, below) must be the same float32 values in every kernel.
inline Vec scale(Vec x, Vec inv_temp) {
  return {_mm512_mul_round_ps(x.v, inv_temp.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a*b + c
inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Mask gt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline Vec select(Mask k, Vec a, Vec b) { return {_mm512_mask_blend_ps(k, b.v, a.v)}; }     // k ? a : b
inline Vec select_or_zero(Mask k, Vec a) { return {_mm512_maskz_mov_ps(k, a.v)}; }         // k ? a : 0
inline Vec mask_fmadd(Vec a, Vec b, Vec c, Mask k) { return {_mm512_mask3_fmadd_ps(a.v, b.v, c.v, k)}; }
inline Vec mask_fnmadd(Vec a, Vec b, Vec c, Mask k) { return {_mm512_mask3_fnmadd_ps(a.v, b.v, c.v, k)}; }
inline Vec mask_add(Vec a, Vec b, Mask k) { return {_mm512_mask_add_ps(a.v, k, a.v, b.v)}; }  // k ? a+b : a
inline Mask lane_mask(int lane) { return static_cast<Mask>(1u << lane); }
inline bool any(Mask k) { return k != 0; }
inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float first_lane(Vec a) { return _mm512_cvtss_f32(a.v); }
inline float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline Mask tail_mask(int n) { return static_cast<Mask>((1u << n) - 1u); }  // 0 <= n < 16

// Widening loads. `load_tail` reads lanes [0, n) and fills the others with -inf (0 < n < 16).
inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec load(const bf16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline Vec load(const fp16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline Vec load_tail(const float* p, int n) { return {_mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), tail_mask(n), p)}; }
inline Vec load_tail(const bf16* p, int n) {
  const __m256i h = _mm256_mask_loadu_epi16(_mm256_set1_epi16(static_cast<short>(0xff80)), tail_mask(n), p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline Vec load_tail(const fp16* p, int n) {
  return {_mm512_cvtph_ps(_mm256_mask_loadu_epi16(_mm256_set1_epi16(static_cast<short>(0xfc00)), tail_mask(n), p))};
}

// Narrowing stores, rounding to nearest even (bit-for-bit like dtypes.h / c10).
inline __m256i to_bf16_bits(Vec a) {
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i fixed = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(fixed);
}
inline __m256i to_fp16_bits(Vec a) { return _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline void store(bf16* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(a)); }
inline void store(fp16* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_fp16_bits(a)); }
inline void store_tail(float* p, Vec a, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), a.v); }
inline void store_tail(bf16* p, Vec a, int n) { _mm256_mask_storeu_epi16(p, tail_mask(n), to_bf16_bits(a)); }
inline void store_tail(fp16* p, Vec a, int n) { _mm256_mask_storeu_epi16(p, tail_mask(n), to_fp16_bits(a)); }

// e^x for K vectors at once, in place (see the header comment), the K evaluations interleaved step by step so
// that more independent instructions are in flight: the kernels are bound by the throughput of this code. min/max
// take x as their second operand so that a NaN passes through.
template <int K>
inline void exp_n(Vec* x) {
  const __m512 lo = _mm512_set1_ps(kExpLo), hi = _mm512_set1_ps(kExpHi), one = _mm512_set1_ps(1.0f);
  // n = round-to-nearest-even(x log2e): adding 1.5 * 2^23 leaves no fraction bits (one fma and one sub, cheaper
  // than vrndscaleps); exact for |x log2e| < 2^22, which the clamp guarantees.
  const __m512 magic = _mm512_set1_ps(kRoundMagic);
  __m512 n[K], r[K], p[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    r[k] = _mm512_min_ps(hi, _mm512_max_ps(lo, x[k].v));
    n[k] = _mm512_sub_ps(_mm512_fmadd_ps(r[k], _mm512_set1_ps(kLog2e), magic), magic);
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r[k] = _mm512_fnmadd_ps(n[k], _mm512_set1_ps(kLn2Hi), r[k]);
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r[k] = _mm512_fnmadd_ps(n[k], _mm512_set1_ps(kLn2Lo), r[k]);
  // e^r = 1 + r (1 + r (P5 + r (P4 + ... + r P0))), Horner down to the constant term.
  const float coeffs[7] = {kExpP1, kExpP2, kExpP3, kExpP4, kExpP5, 1.0f, 1.0f};
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) p[k] = _mm512_set1_ps(kExpP0);
#pragma GCC unroll 7
  for (int j = 0; j < 7; ++j) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) p[k] = _mm512_fmadd_ps(p[k], r[k], _mm512_set1_ps(coeffs[j]));
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) x[k].v = _mm512_scalef_ps(p[k], n[k]);
}

inline Vec exp(Vec x) {
  exp_n<1>(&x);
  return x;
}

// log1p(t) for t in [-0.4, 1]: log(w) for w = 1 + t (exponent/mantissa split, Cephes logf polynomial), plus the
// first-order correction (t - (w - 1)) / w for the rounding of w, which keeps full relative precision for tiny t
// (1/w from a 14-bit reciprocal and one Newton step, cheaper than a division). Max error 1.3 ulp.
inline Vec log1p_small(Vec t) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 w = _mm512_add_ps(one, t.v);
  __m512 e = _mm512_getexp_ps(w);
  __m512 m = _mm512_getmant_ps(w, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, one);
  const __m512 f = _mm512_sub_ps(m, one);
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(kLogP[0]);
  for (int i = 1; i < 9; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kLogP[i]));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Lo), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  __m512 lw = _mm512_add_ps(f, y);
  lw = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Hi), lw);
  const __m512 r14 = _mm512_rcp14_ps(w);
  const __m512 inv_w = _mm512_mul_ps(r14, _mm512_fnmadd_ps(w, r14, _mm512_set1_ps(2.0f)));
  const __m512 correction = _mm512_mul_ps(_mm512_sub_ps(t.v, _mm512_sub_ps(w, one)), inv_w);
  return {_mm512_add_ps(lw, correction)};
}

#else  // portable: 8 lanes as a GCC vector, compiled for the target (AVX2 with -march=native there, else SSE/scalar)

constexpr int kWidth = 8;
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
using Mask = I8;  // -1 where true, 0 where false

struct Vec {
  F8 v;
};

inline Vec set1(float x) { return {F8{} + x}; }
inline Vec zero() { return {F8{}}; }
inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
// See the AVX-512 version: the product passes through an empty asm statement, so that -ffp-contract=fast cannot
// fuse it into a following subtraction; in a ymm register where the target has AVX (through memory it cost a store
// and a reload per vector), else in memory.
inline Vec scale(Vec x, Vec inv_temp) {
  F8 product = x.v * inv_temp.v;
#if defined(__AVX__)
  asm("" : "+x"(product));
#else
  asm("" : "+m"(product));
#endif
  return {product};
}
inline F8 fma8(F8 a, F8 b, F8 c) {  // lane-wise fma (vfmadd where the target has it)
  F8 r;
  for (int i = 0; i < kWidth; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
}
inline Vec fmadd(Vec a, Vec b, Vec c) { return {fma8(a.v, b.v, c.v)}; }
inline Vec max(Vec a, Vec b) { return {b.v != b.v ? b.v : (a.v > b.v ? a.v : b.v)}; }  // like maxps: NaN b wins
inline Vec min(Vec a, Vec b) { return {b.v != b.v ? b.v : (a.v < b.v ? a.v : b.v)}; }
inline Mask gt(Vec a, Vec b) { return a.v > b.v; }
inline Mask eq(Vec a, Vec b) { return a.v == b.v; }
inline Vec select(Mask k, Vec a, Vec b) { return {k ? a.v : b.v}; }
inline Vec select_or_zero(Mask k, Vec a) { return {k ? a.v : F8{}}; }
inline Vec mask_fmadd(Vec a, Vec b, Vec c, Mask k) { return {k ? fma8(a.v, b.v, c.v) : c.v}; }
inline Vec mask_fnmadd(Vec a, Vec b, Vec c, Mask k) { return {k ? fma8(-a.v, b.v, c.v) : c.v}; }
inline Vec mask_add(Vec a, Vec b, Mask k) { return {k ? a.v + b.v : a.v}; }
inline Mask lane_mask(int lane) {
  Mask k{};
  k[lane] = -1;
  return k;
}
inline bool any(Mask k) {
  for (int i = 0; i < kWidth; ++i) {
    if (k[i]) return true;
  }
  return false;
}
inline float first_lane(Vec a) { return a.v[0]; }
inline float reduce_add(Vec a) {  // a fixed pairwise tree
  return ((a.v[0] + a.v[4]) + (a.v[2] + a.v[6])) + ((a.v[1] + a.v[5]) + (a.v[3] + a.v[7]));
}
inline float reduce_max(Vec a) {
  Vec r = set1(a.v[0]);
  for (int i = 1; i < kWidth; ++i) r = max(r, set1(a.v[i]));
  return r.v[0];
}

// Widening loads. `load_tail` reads lanes [0, n) and fills the others with -inf (0 < n < 8).
template <class T>
inline Vec load(const T* p) {
  Vec r;
  for (int i = 0; i < kWidth; ++i) r.v[i] = to_float(p[i]);
  return r;
}
template <class T>
inline Vec load_tail(const T* p, int n) {
  Vec r = set1(kNegInf);
  for (int i = 0; i < n; ++i) r.v[i] = to_float(p[i]);
  return r;
}
template <class T>
inline void store(T* p, Vec a) {
  for (int i = 0; i < kWidth; ++i) p[i] = from_float<T>(a.v[i]);
}
template <class T>
inline void store_tail(T* p, Vec a, int n) {
  for (int i = 0; i < n; ++i) p[i] = from_float<T>(a.v[i]);
}

// x clamped to [kExpLo, kExpHi]. With AVX: vmaxps / vminps taking x as the second operand, so NaN lanes stay NaN
// and carry through the arithmetic below to a NaN result; without: NaN lanes become 0 here and exp_n puts x back.
#if defined(__AVX__)
constexpr bool kExpArgKeepsNaN = true;
inline F8 exp_arg(F8 x) {
  return (F8)_mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(_mm256_set1_ps(kExpLo), (__m256)x));
}
#else
constexpr bool kExpArgKeepsNaN = false;
inline F8 exp_arg(F8 x) {
  F8 c = x < kExpLo ? F8{} + kExpLo : x;
  c = c > kExpHi ? F8{} + kExpHi : c;
  return x != x ? F8{} : c;
}
#endif

// e^x for K vectors at once, in place: exp_scalar's arithmetic lane by lane, the K evaluations interleaved step by
// step and every loop unrolled, as the AVX-512 build does (GCC had left a range-for over the coefficients rolled,
// which serialised the polynomial and kept the vectors on the stack: row_stats ran ~1.8x slower per core on an AVX2
// EPYC). The final ldexp(p, n) (one rounding, n in [-150, 128]) as (p 2^a) 2^b with a = floor(n / 2), b = n - a:
// both powers of two are normal floats built from their bits, the first product is exact, the second rounds once,
// as ldexp does. NaN lanes return NaN.
template <int K>
inline void exp_n(Vec* x) {
  const float coeffs[7] = {kExpP1, kExpP2, kExpP3, kExpP4, kExpP5, 1.0f, 1.0f};
  F8 n[K], r[K], p[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    r[k] = exp_arg(x[k].v);
    n[k] = fma8(r[k], F8{} + kLog2e, F8{} + kRoundMagic) - kRoundMagic;
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r[k] = fma8(-n[k], F8{} + kLn2Hi, r[k]);
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r[k] = fma8(-n[k], F8{} + kLn2Lo, r[k]);
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) p[k] = F8{} + kExpP0;
#pragma GCC unroll 7
  for (int j = 0; j < 7; ++j) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) p[k] = fma8(p[k], r[k], F8{} + coeffs[j]);
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const I8 ni = __builtin_convertvector(n[k], I8);
    const I8 a = ni >> 1, b = ni - a;
    const F8 pa = (F8)((a + 127) << 23);  // a vector cast reinterprets the bits
    const F8 pb = (F8)((b + 127) << 23);
    const F8 e = (p[k] * pa) * pb;
    x[k].v = kExpArgKeepsNaN ? e : (x[k].v != x[k].v ? x[k].v : e);
  }
}
inline Vec exp(Vec x) {
  exp_n<1>(&x);
  return x;
}
// log1p(t) for t in [-0.4, 1]: the AVX-512 build's formula (see there), with the exponent and mantissa of w = 1 + t
// taken from its bits (w is a normal positive float) and an exact division for the correction's 1 / w.
inline Vec log1p_small(Vec t) {
  const F8 one = F8{} + 1.0f;
  const F8 w = one + t.v;
  const I8 bits = (I8)w;  // a vector cast reinterprets the bits
  F8 e = __builtin_convertvector((bits >> 23) - 127, F8);
  F8 m = (F8)((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const Mask big = m > kSqrt2;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const F8 f = m - one;
  const F8 z = f * f;
  F8 y = F8{} + kLogP[0];
#pragma GCC unroll 8
  for (int i = 1; i < 9; ++i) y = fma8(y, f, F8{} + kLogP[i]);
  y = (y * f) * z;
  y = fma8(e, F8{} + kLn2Lo, y);
  y = fma8(F8{} - 0.5f, z, y);
  F8 lw = f + y;
  lw = fma8(e, F8{} + kLn2Hi, lw);
  return {lw + (t.v - (w - one)) / w};
}

#endif

// expm1(r) for |r| <= 0.5, with full relative precision for tiny r: r (1 + r/2! + r^2/3! + ... + r^8/9!)
// (truncation below 6e-10 relative).
inline Vec expm1_small(Vec r) {
  Vec s = set1(1.0f / 362880.0f);
  constexpr float kInverseFactorials[8] = {1.0f / 40320.0f, 1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f,
                                           1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f};
  for (float c : kInverseFactorials) s = fmadd(s, r, set1(c));
  return s * r;
}

// The centred, scaled logit x = fl(fl(v - shift) * inv_temp): the raw row max subtracted first (exact, or rounded
// relative to |v - shift|), then scaled unfused (scale), so that every kernel and every pass forms bitwise the same
// x. Scaling first would round v * inv_temp at ulp(|v / tau|) before the cancellation.
inline Vec centre(Vec v, Vec shift, Vec inv_temp) { return scale(v - shift, inv_temp); }
// The same for one value, through the vector code so that it equals the lanes' results bit for bit.
inline float centre(float v, float shift, float inv_temp) {
  return first_lane(centre(set1(v), set1(shift), set1(inv_temp)));
}

}  // namespace simd
}  // namespace minillm

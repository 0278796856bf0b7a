// Entry points of the CPU kernels: the five row-wise primitives specified in minillm_fast/backends/__init__.py,
// on raw pointers (the binding, binding.cpp, checks and allocates; the kernels only compute).
//
// Shared conventions:
//   * z (student) and u (teacher) are row sets of n_rows rows with unit stride along the vocabulary and any row
//     stride; TZ, TU are float, bf16 or fp16 (dtypes.h), independently; only the first `vocab` = min(V_s, V_t)
//     columns are read; the centred logits are x_q = (z - m_q) * inv_temp, x_p = (u - m_p) * inv_temp with the raw
//     row maxima, subtracted before scaling (simd::centre, float32, as the reference backend forms them);
//   * q = softmax(z / tau), p = softmax(u / tau); all sums in float32 per block, double across blocks;
//   * stats is float32 [n_rows, 13] in the layout of minillm_fast.backends (M_Q, LOGS_Q, M_P, LOGS_P, EQ_D, EQ_ZC,
//     EP_D, EP_UC, ZY, UY, UA, EQ_DA, LOG_RATIO; M, ZY, UY, UA raw); log-probabilities are always formed as
//     x - log s, never z / tau - lse;
//   * gradients are written for the whole [n_rows, dz_cols] contiguous output, zeros included;
//   * float32 logits may also be vocabulary-major (VocabMajor): row_stats and logits_grad have versions for them.
#pragma once

#include <cstdint>

#include "cpu/dtypes.h"
#include "cpu/row_state.h"
#include "cpu/simd.h"

namespace minillm {
namespace cpu {

// Column indices of the stats rows and of the coefficient rows.
enum Stat : int { M_Q = 0, LOGS_Q, M_P, LOGS_P, EQ_D, EQ_ZC, EP_D, EP_UC, ZY, UY, UA, EQ_DA, LOG_RATIO, NUM_STATS };
enum Coef : int { C_KL = 0, C_Q, C_P, C_Y, NUM_COEFS };

// A row's stats from its finished online state; z_y, u_y are the token's raw logits (0 without tokens).
inline void store_row_stats(float* out, const OnlinePair& state, float z_y, float u_y) {
  out[M_Q] = state.q.m;
  out[LOGS_Q] = state.q.log_s();
  out[M_P] = state.p.m;
  out[LOGS_P] = state.p.log_s();
  out[EQ_D] = state.mean_d_q();
  out[EQ_ZC] = state.q.mean_centred();
  out[EP_D] = state.mean_d_p();
  out[EP_UC] = state.p.mean_centred();
  out[ZY] = z_y;
  out[UY] = u_y;
  out[UA] = state.anchor_u();
  out[EQ_DA] = state.mean_d_anchor();
  out[LOG_RATIO] = state.log_ratio();
}

// A row's logits_grad parameters from its stats and coefficients (shared by the row-major and vocabulary-major
// kernels): the shifts sh = m (0 for an empty distribution), the log-normalisers, E_q[d], the anchor as the
// kernels test and use it (anchor_off = centre(u_a, sh_p), the x_p of the anchor's entries, and -E_q[d - d_a];
// row_state.h; NaN: none), the four coefficients, whether any is nonzero (`active`: else the row's gradient is
// zero) and the token (-1: none, or c_y = 0).
struct LogitsGradRow {
  bool active;
  float shift_q, logs_q, shift_p, logs_p, eq_d, anchor_off, minus_eq_d_anchor;
  float c_kl, c_q, c_p, c_y;
  int64_t y;
};

inline LogitsGradRow logits_grad_row(const float* stats, const float* coef, const int64_t* tokens, int64_t r,
                                     float inv_temp) {
  const float* c = coef + r * NUM_COEFS;
  const float* s = stats + r * NUM_STATS;
  LogitsGradRow g;
  g.active = c[C_KL] != 0.0f || c[C_Q] != 0.0f || c[C_P] != 0.0f || c[C_Y] != 0.0f;
  g.shift_q = OnlineSoftmax::shift_of(s[M_Q]);
  g.logs_q = s[LOGS_Q];
  g.shift_p = OnlineSoftmax::shift_of(s[M_P]);
  g.logs_p = s[LOGS_P];
  g.eq_d = s[EQ_D];
  g.anchor_off = simd::centre(s[UA], g.shift_p, inv_temp);
  g.minus_eq_d_anchor = -s[EQ_DA];
  g.c_kl = c[C_KL];
  g.c_q = c[C_Q];
  g.c_p = c[C_P];
  g.c_y = c[C_Y];
  g.y = (tokens != nullptr && c[C_Y] != 0.0f) ? tokens[r] : -1;
  return g;
}

template <class T>
struct Rows {
  const T* data;
  int64_t stride;  // elements between consecutive rows
  const T* row(int64_t r) const { return data + r * stride; }
};

// One pass over both rows: online max and rescaled sums (row_state.h). tokens may be null (ZY = UY = 0).
template <class TZ, class TU>
void row_stats(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const int64_t* tokens, float inv_temp,
               float* stats);

// dz_v = c_kl q_v (d_v - E_q[d]) + c_q q_v + c_p p_v + c_y [v == y], d = x_q - x_p; coef float32 [n_rows, 4]; at
// the entries with z_v = m_q and x_p = centre(UA, m_p) (d_v = d_a exactly) d_v - E_q[d] is taken as -E_q[d - d_a]
// (row_state.h).
// Reads u only for rows with c_kl or c_p nonzero and evaluates p only where c_p is nonzero; rows whose four
// coefficients are zero are written as zeros without reading z or u; columns >= vocab are zero.
template <class TZ, class TU>
void logits_grad(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const int64_t* tokens, const float* stats,
                 const float* coef, float inv_temp, TZ* dz, int64_t dz_cols);

// (JSD_beta, E_q[g - g_a]) per row, g = log q - log m, m = beta p + (1 - beta) q, g_a = g at row_stats' anchor
// (0 where UA is NaN) and g_v - g_a = 0 exactly at the anchor's entries; out float32 [n_rows, 2].
template <class TZ, class TU>
void jsd_rows(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const float* stats, double beta,
              float inv_temp, float* out);

// dz_v = coef_r q_v ((g_v - g_a) - E_q[g - g_a]) (= coef_r q_v (g_v - E_q[g]), exact at the anchor in nearly one-hot
// rows); coef float32 [n_rows]; jsd float32 [n_rows, 2] from jsd_rows.
template <class TZ, class TU>
void jsd_grad(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const float* stats, const float* jsd,
              const float* coef, double beta, float inv_temp, TZ* dz, int64_t dz_cols);

// Vocabulary-major float32 logits: entry (r, v) at data[v * ld + r], ld >= n_rows (a row-major [V, ld] buffer seen
// as [N, V] through a transpose, as the fused-linear ops form a block's logits on a CPU). vocab_major_kernels.cpp.
struct VocabMajor {
  const float* data;
  int64_t ld;
  const float* at(int64_t r, int64_t v) const { return data + v * ld + r; }
};

// row_stats of vocabulary-major rows: the same statistics (summed in a different order: equal to rounding).
void row_stats_vocab_major(VocabMajor z, VocabMajor u, int64_t n_rows, int64_t vocab, const int64_t* tokens,
                           float inv_temp, float* stats);

// logits_grad of vocabulary-major rows into vocabulary-major dz ([dz_cols, ld_dz], ld_dz >= n_rows; dz may be z
// itself, with ld_dz = z.ld): every element bit-identical to logits_grad's.
void logits_grad_vocab_major(VocabMajor z, VocabMajor u, int64_t n_rows, int64_t vocab, const int64_t* tokens,
                             const float* stats, const float* coef, float inv_temp, float* dz, int64_t ld_dz,
                             int64_t dz_cols);

// Inverse-CDF draw per row from softmax(u / tau) where use_teacher[r] else softmax(z / tau), uniform[r] in [0, 1);
// -1 for a row whose chosen distribution is empty. Only the chosen row is read.
template <class TZ, class TU>
void sample_rows(Rows<TZ> z, Rows<TU> u, int64_t n_rows, int64_t vocab, const bool* use_teacher,
                 const double* uniform, float inv_temp, int64_t* out);

}  // namespace cpu
}  // namespace minillm

// Explicit instantiation for the nine (TZ, TU) pairs; used by the kernel files.
#define MINILLM_CPU_INSTANTIATE_ALL(MACRO) \
  MACRO(float, float)                      \
  MACRO(float, ::minillm::bf16)            \
  MACRO(float, ::minillm::fp16)            \
  MACRO(::minillm::bf16, float)            \
  MACRO(::minillm::bf16, ::minillm::bf16)  \
  MACRO(::minillm::bf16, ::minillm::fp16)  \
  MACRO(::minillm::fp16, float)            \
  MACRO(::minillm::fp16, ::minillm::bf16)  \
  MACRO(::minillm::fp16, ::minillm::fp16)

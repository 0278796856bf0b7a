// Storage types of the CPU kernels and their scalar conversions to and from float32.
//
// The kernels know nothing of PyTorch: bfloat16 and float16 tensors are seen as arrays of these 16-bit
// structs (same layout as c10::BFloat16 / c10::Half), and the binding reinterprets data pointers. Conversions
// to float32 are exact; conversions from float32 round to nearest even, bit-for-bit like c10 (so the gradient
// written in a 16-bit dtype equals torch's `grad_fp32.to(dtype)`).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace minillm {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && sizeof(fp16) == 2, "16-bit storage types must be 2 bytes");

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

inline float to_float(fp16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent == 0) {                                                              // zero / subnormal
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24, exact
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <class T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

// Round to nearest even; NaN becomes the canonical quiet NaN 0x7fc0 (as c10::BFloat16 does).
template <>
inline bf16 from_float<bf16>(float x) {
  if (x != x) return bf16{0x7fc0};
  const uint32_t u = float_bits(x);
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

// Round to nearest even (IEEE); overflow gives inf, NaN a quiet NaN with the input's sign.
template <>
inline fp16 from_float<fp16>(float x) {
#if defined(__F16C__)
  return fp16{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  uint32_t f = float_bits(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t out;
  if (f >= (143u << 23)) {  // >= 65536 before rounding: inf, or nan
    out = f > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {  // subnormal or zero in fp16: let a float addition do the rounding
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = static_cast<uint16_t>(float_bits(bits_float(f) + bits_float(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mantissa_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mantissa_odd;
    out = static_cast<uint16_t>(f >> 13);
  }
  return fp16{static_cast<uint16_t>(out | (sign >> 16))};
#endif
}

}  // namespace minillm

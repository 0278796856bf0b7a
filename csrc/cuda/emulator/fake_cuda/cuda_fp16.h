#pragma once
#include "emu_runtime.h"
struct __half { uint16_t x; };
inline __half __float2half_rn(float f) { _Float16 h = static_cast<_Float16>(f); __half r; std::memcpy(&r.x, &h, 2); return r; }
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.x, 2); return static_cast<float>(v); }
inline __half __ushort_as_half(unsigned short s) { return __half{s}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }

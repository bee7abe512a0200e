// Helpers of the kernels that stream operands through shared memory with cp.async
// (text_head.cu, distill.cu): 16-byte pieces of 16-bit or float32 values, and bit casts.
// The asynchronous copies themselves are cuda_pipeline.h's primitives
// (__pipeline_memcpy_async / __pipeline_commit / __pipeline_wait_prior: cp.async and
// cp.async.wait_group on sm_80+); the CPU emulation supplies them (tests/cuda_emu).
#pragma once

#include <cuda_pipeline.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace demul {

// Bit casts (memcpy: a register move on the device, defined behaviour on the host).
__device__ __forceinline__ float float_of(uint32_t b) {
  float x;
  memcpy(&x, &b, 4);
  return x;
}
__device__ __forceinline__ uint32_t bits_of(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
}
__device__ __forceinline__ float half_bits_to_f(unsigned short b, __half*) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}
__device__ __forceinline__ float half_bits_to_f(unsigned short b, __nv_bfloat16*) {
  __nv_bfloat16_raw r;
  r.x = b;
  return __bfloat162float(__nv_bfloat16(r));
}
__device__ __forceinline__ unsigned short f_to_bits(float x, __half*) {
  return static_cast<__half_raw>(__float2half_rn(x)).x;
}
__device__ __forceinline__ unsigned short f_to_bits(float x, __nv_bfloat16*) {
  return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x;
}

// Loads 16 / sizeof(T) values of T from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&x)[16 / sizeof(T)]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = float_of(w[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[2 * e] = half_bits_to_f(static_cast<unsigned short>(w[e] & 0xffffu), static_cast<T*>(nullptr));
      x[2 * e + 1] = half_bits_to_f(static_cast<unsigned short>(w[e] >> 16), static_cast<T*>(nullptr));
    }
  }
}

// Stores n = 16 / sizeof(TC) values rounded to TC at a 16-byte aligned address.
template <typename TC>
__device__ __forceinline__ void store16(TC* p, const float* x) {
  uint4 u;
  if constexpr (std::is_same_v<TC, float>) {
    u = make_uint4(bits_of(x[0]), bits_of(x[1]), bits_of(x[2]), bits_of(x[3]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      w[e] = static_cast<uint32_t>(f_to_bits(x[2 * e], static_cast<TC*>(nullptr))) |
             (static_cast<uint32_t>(f_to_bits(x[2 * e + 1], static_cast<TC*>(nullptr))) << 16);
    u = make_uint4(w[0], w[1], w[2], w[3]);
  }
  *reinterpret_cast<uint4*>(p) = u;
}

// Loads 4 values of T (16 bytes of float32, 8 of a 16-bit type) from an address aligned to
// their size.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&x)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    x[0] = half_bits_to_f(static_cast<unsigned short>(u.x & 0xffffu), static_cast<T*>(nullptr));
    x[1] = half_bits_to_f(static_cast<unsigned short>(u.x >> 16), static_cast<T*>(nullptr));
    x[2] = half_bits_to_f(static_cast<unsigned short>(u.y & 0xffffu), static_cast<T*>(nullptr));
    x[3] = half_bits_to_f(static_cast<unsigned short>(u.y >> 16), static_cast<T*>(nullptr));
  }
}

// Stores 4 values rounded to TC at an address aligned to their size.
template <typename TC>
__device__ __forceinline__ void store4(TC* p, const float (&x)[4]) {
  if constexpr (std::is_same_v<TC, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
    const uint32_t lo = static_cast<uint32_t>(f_to_bits(x[0], static_cast<TC*>(nullptr))) |
                        (static_cast<uint32_t>(f_to_bits(x[1], static_cast<TC*>(nullptr))) << 16);
    const uint32_t hi = static_cast<uint32_t>(f_to_bits(x[2], static_cast<TC*>(nullptr))) |
                        (static_cast<uint32_t>(f_to_bits(x[3], static_cast<TC*>(nullptr))) << 16);
    *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace demul

// Shared device helpers of the demul_fast kernels (SPEC.md section 4).
//
// Every kernel reads float32, bfloat16 or float16 and accumulates in float32. The
// GEMM-shaped parts (cosine logits, the distillation projection) use one plain SIMT
// tile product, `tile_dot`, with shared-memory tiles and fp32 FMAs: this is the only
// matrix path (no tensor-core path), chosen because it can be checked by reading.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops.h"

// Runs the lambda with `scalar_t` bound to the CUDA type of a DType.
#define DEMUL_DISPATCH(DTYPE, ...)            \
  switch (DTYPE) {                            \
    case DType::kFloat: {                     \
      using scalar_t = float;                 \
      __VA_ARGS__();                          \
      break;                                  \
    }                                         \
    case DType::kHalf: {                      \
      using scalar_t = __half;                \
      __VA_ARGS__();                          \
      break;                                  \
    }                                         \
    case DType::kBFloat16: {                  \
      using scalar_t = __nv_bfloat16;         \
      __VA_ARGS__();                          \
      break;                                  \
    }                                         \
  }

namespace demul {

constexpr float kEps = 1e-6f;  // the norm floor of SPEC 4

// Tile shape of every GEMM-shaped kernel: a block of 256 threads (16 x 16) computes a
// 64 x 64 tile, 4 x 4 values per thread, over the shared dimension in steps of 16.
constexpr int kTile = static_cast<int>(kTileRows);
constexpr int kStep = 16;
constexpr int kThreads = 256;
constexpr int kPer = 4;  // kTile / 16 values per thread along each side

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
// Contains __syncthreads: every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// 1 / max(norm, eps) and the normalize backward of SPEC 4.1:
// dv = (dv^ - v^ <v^, dv^>) / ||v||, or dv^ / eps where ||v|| < eps (the floor is a constant).
__device__ __forceinline__ float inv_floor(float norm) { return 1.f / fmaxf(norm, kEps); }

__device__ __forceinline__ float normalize_backward(float v_hat, float dv_hat, float dot, float norm) {
  return norm >= kEps ? (dv_hat - v_hat * dot) / norm : dv_hat / kEps;
}

// Shared memory of tile_dot: both operands transposed, [kStep][kTile + 1] (the +1 keeps
// the transposing stores free of bank conflicts).
struct DotSmem {
  float a[kStep][kTile + 1];
  float b[kStep][kTile + 1];
};

// acc[i][j] = sum_d A[r0 + ty + 16 i, d] * B[c0 + tx + 16 j, d] for a 64 x 64 tile.
// A: [rows, D] and B: [cols, D], row-major, D contiguous. Out-of-range rows/columns
// read as zero. Contains __syncthreads: the whole block calls it.
template <typename TA, typename TB>
__device__ __forceinline__ void tile_dot(const TA* __restrict__ A, int64_t rows, int64_t r0,
                                         const TB* __restrict__ B, int64_t cols, int64_t c0, int64_t D,
                                         DotSmem& sm, float acc[kPer][kPer]) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = 0.f;
  // Loader mapping: 256 threads cover a [64 rows x 16 d] slice, 4 rows apart; the 16
  // consecutive threads of a row read consecutive d (coalesced).
  const int ld_d = tid & 15, ld_r = tid >> 4;
  for (int64_t d0 = 0; d0 < D; d0 += kStep) {
    const int64_t d = d0 + ld_d;
#pragma unroll
    for (int p = 0; p < kPer; ++p) {
      const int rr = ld_r + 16 * p;
      const int64_t ra = r0 + rr, rb = c0 + rr;
      sm.a[ld_d][rr] = (ra < rows && d < D) ? to_f(A[ra * D + d]) : 0.f;
      sm.b[ld_d][rr] = (rb < cols && d < D) ? to_f(B[rb * D + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kStep; ++k) {
      float av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = sm.a[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = sm.b[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

}  // namespace demul

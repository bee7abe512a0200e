// Shared device helpers of the demul_fast kernels (docs/SPEC.md section 4).
//
// Every kernel reads float32, bfloat16 or float16 and accumulates in float32. The
// GEMM-shaped parts (cosine logits, the distillation projection, the backward sweeps) go
// through one tile product, `tile_dot`, with two implementations chosen at compile time
// by the operand types (`MmaType`):
//  * a bfloat16 or float16 operand: tensor cores (WMMA 16x16x16, `mma.sync`, HMMA in
//    SASS), both operands rounded to that type in shared memory, float32 accumulation;
//  * float32 operands only: plain SIMT fp32 FMAs. Tensor cores would need TF32 (10-bit
//    mantissa), which is not float32 arithmetic; float32 inputs keep float32 products.
// Both hand the epilogues the same per-thread layout (acc[i][j] is row ty + 16 i, column
// tx + 16 j of the 64 x 64 tile), so the epilogues are shared.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// Dynamic shared memory a kernel of this extension may ask for on the current device: the
// device's per-block opt-in limit (227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89) less
// kStaticSmemReserve for the kernel's static __shared__ arrays, at most `cap`. Read from the
// properties ATen caches per device (no synchronisation). The text backward narrows its G
// panel to it, the distillation forward falls back to its streaming kernel beyond it.
constexpr int64_t kStaticSmemReserve = 4 * 1024;  // > the static shared memory of text_backward_kernel
                                                  // (2.6 KB) and distill_forward_tile_kernel (0.5 KB)
inline int64_t dynamic_smem_budget(int64_t cap) {
  const int64_t optin = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  return std::min(cap, optin - kStaticSmemReserve);
}

// Constants of demul_fast/common.py, passed by setup.py as macros (one source of truth).
#ifndef DEMUL_EPS
#error "DEMUL_EPS (demul_fast.common.EPS) must be defined by the build (setup.py)"
#endif
constexpr float kEps = static_cast<float>(DEMUL_EPS);  // the norm floor of SPEC 4

// Tile shape of every GEMM-shaped kernel: a block of 256 threads (16 x 16) computes a
// 64 x 64 tile, 4 x 4 values per thread, over the shared dimension in steps of 16.
constexpr int kTile = static_cast<int>(kTileRows);
constexpr int kStep = 16;
constexpr int kThreads = 256;
constexpr int kPer = 4;  // kTile / 16 values per thread along each side
// The GEMM-bearing kernels are declared __launch_bounds__(kThreads, 1): with the bare
// thread count, ptxas of CUDA 13 held them to 64-80 registers and spilled (-Xptxas -v:
// up to 24 bytes of spill stores, 148 of spill loads); with it they take 96-134, no spill.

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

// Sum of the 16 lanes that share a row of a 64 x 64 tile (lanes tx = 0..15 of a half-warp).
__device__ __forceinline__ float row_sum16(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// w = softmax(a[0 .. M-1]) (SPEC 4, one class's prompt weights) by one warp: put(m, w[m])
// is called on the lane that owns m. Every lane of the warp must call it.
template <class Put>
__device__ __forceinline__ void warp_softmax(const float* __restrict__ a, int64_t M, Put put) {
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int64_t m = lane; m < M; m += 32) mx = fmaxf(mx, a[m]);
  mx = warp_max(mx);
  float s = 0.f;
  for (int64_t m = lane; m < M; m += 32) s += expf(a[m] - mx);
  s = warp_sum(s);
  for (int64_t m = lane; m < M; m += 32) put(m, expf(a[m] - mx) / s);
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

// Maximum over the block; every thread gets the result. Same contract as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// 1 / max(norm, eps) and the normalize backward of SPEC 4.1:
// dv = (dv^ - v^ <v^, dv^>) / ||v||, or dv^ / eps where ||v|| < eps (the floor is a constant).
__device__ __forceinline__ float inv_floor(float norm) { return 1.f / fmaxf(norm, kEps); }

__device__ __forceinline__ float normalize_backward(float v_hat, float dv_hat, float dot, float norm) {
  return norm >= kEps ? (dv_hat - v_hat * dot) / norm : dv_hat / kEps;
}

// Shared memory of simt_tile_dot: both operands transposed, [kStep][kTile + 1] (the +1 keeps
// the transposing stores free of bank conflicts).
struct DotSmem {
  float a[kStep][kTile + 1];
  float b[kStep][kTile + 1];
};

// acc[i][j] = sum_d A[r0 + ty + 16 i, d] * B[c0 + tx + 16 j, d] for a 64 x 64 tile.
// A: [rows, D] and B: [cols, D], row-major, D contiguous. Out-of-range rows/columns
// read as zero. Contains __syncthreads: the whole block calls it.
template <typename TA, typename TB>
__device__ __forceinline__ void simt_tile_dot(const TA* __restrict__ A, int64_t rows, int64_t r0,
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

// ---- Tensor-core path ------------------------------------------------------------------

// The tensor-core operand type of a product of TA and TB: the 16-bit one if either is
// 16-bit (the other is rounded to it), float (the SIMT path) if both are float32.
template <typename TA, typename TB>
struct MmaType {
  using type = std::conditional_t<std::is_same_v<TA, __nv_bfloat16> || std::is_same_v<TB, __nv_bfloat16>,
                                  __nv_bfloat16,
                                  std::conditional_t<std::is_same_v<TA, __half> || std::is_same_v<TB, __half>,
                                                     __half, float>>;
};
template <typename TA, typename TB>
constexpr bool kUseMma = !std::is_same_v<typename MmaType<TA, TB>::type, float>;

constexpr int kMmaStep = 32;       // shared dimension per shared-memory stage
constexpr int kMmaLd = kMmaStep + 8;  // row stride (elements) of the operand tiles: 80 bytes
constexpr int kAccLd = kTile + 4;  // row stride (floats) of the accumulator staging tile
constexpr int kTileLd = kTile + 8;  // row stride (elements) of a 16-bit 64 x 64 tile

// Shared memory of mma_tile_dot: A and B tiles [64 rows][kMmaStep] (the shared dimension
// contiguous), and the float32 staging tile through which the accumulators reach the
// epilogue layout. WMMA pointers must be 32-byte aligned: every fragment offset below is.
template <typename TC>
struct alignas(128) MmaSmem {
  TC a[kTile][kMmaLd];
  TC b[kTile][kMmaLd];
  float c[kTile][kAccLd];
};

template <typename TA, typename TB>
using TileSmem = std::conditional_t<kUseMma<TA, TB>, MmaSmem<typename MmaType<TA, TB>::type>, DotSmem>;

// Warp w of the 8 owns rows 16 (w % 4) .. +15 and columns 32 (w / 4) .. +31 of a 64 x 64
// tile: two 16 x 16 accumulator fragments.
using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// Stores the warp's two fragments into c [64][kAccLd] and hands every thread its
// epilogue-layout values acc[i][j] = c[ty + 16 i][tx + 16 j]. Contains __syncthreads.
__device__ __forceinline__ void unstage(AccFrag (&f)[2], float (*c)[kAccLd], float acc[kPer][kPer]) {
  const int warp = threadIdx.x >> 5, wr = 16 * (warp & 3), wc = 32 * (warp >> 2);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  nvcuda::wmma::store_matrix_sync(&c[wr][wc], f[0], kAccLd, nvcuda::wmma::mem_row_major);
  nvcuda::wmma::store_matrix_sync(&c[wr][wc + 16], f[1], kAccLd, nvcuda::wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = c[ty + 16 * i][tx + 16 * j];
  __syncthreads();  // c may be rewritten next
}

// tile_dot on tensor cores: the same contract as simt_tile_dot, operands rounded to TC.
template <typename TC, typename TA, typename TB>
__device__ __forceinline__ void mma_tile_dot(const TA* __restrict__ A, int64_t rows, int64_t r0,
                                             const TB* __restrict__ B, int64_t cols, int64_t c0, int64_t D,
                                             MmaSmem<TC>& sm, float acc[kPer][kPer]) {
  using namespace nvcuda;
  const int tid = threadIdx.x, warp = tid >> 5, wr = 16 * (warp & 3), wc = 32 * (warp >> 2);
  AccFrag f[2];
  wmma::fill_fragment(f[0], 0.f);
  wmma::fill_fragment(f[1], 0.f);
  // Loader mapping: 256 threads cover [64 rows x 32 d], 8 rows apart; a warp reads 32
  // consecutive d of one row (coalesced).
  const int ld_d = tid & 31, ld_r = tid >> 5;
  for (int64_t d0 = 0; d0 < D; d0 += kMmaStep) {
    const int64_t d = d0 + ld_d;
#pragma unroll
    for (int p = 0; p < kTile / 8; ++p) {
      const int rr = ld_r + 8 * p;
      const int64_t ra = r0 + rr, rb = c0 + rr;
      sm.a[rr][ld_d] = from_f<TC>((ra < rows && d < D) ? to_f(A[ra * D + d]) : 0.f);
      sm.b[rr][ld_d] = from_f<TC>((rb < cols && d < D) ? to_f(B[rb * D + d]) : 0.f);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMmaStep; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TC, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &sm.a[wr][k], kMmaLd);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // B tile rows are columns of the product: read as a column-major [k x n] operand.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TC, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, &sm.b[wc + 16 * h][k], kMmaLd);
        wmma::mma_sync(f[h], fa, fb, f[h]);
      }
    }
    __syncthreads();
  }
  unstage(f, sm.c, acc);
}

// acc = A_tile B_tile^T (see simt_tile_dot), on tensor cores when an operand is 16-bit.
template <typename TA, typename TB>
__device__ __forceinline__ void tile_dot(const TA* __restrict__ A, int64_t rows, int64_t r0,
                                         const TB* __restrict__ B, int64_t cols, int64_t c0, int64_t D,
                                         TileSmem<TA, TB>& sm, float acc[kPer][kPer]) {
  if constexpr (kUseMma<TA, TB>) {
    mma_tile_dot(A, rows, r0, B, cols, c0, D, sm, acc);
  } else {
    simt_tile_dot(A, rows, r0, B, cols, c0, D, sm, acc);
  }
}

// norm[r] = ||v[r]|| for the rows r0 .. r0 + count - 1 (below R) of v [R, D], a warp per row
// (warp w: rows w, w + warps, ...; lane l: elements l, l + 32, ...): aggregate.cu's
// row_norms_kernel and the image-norm blocks of distill.cu, the same bits. Whole warps call it.
template <typename T>
__device__ __forceinline__ void warp_row_norms(const T* __restrict__ v, int64_t R, int64_t D, int64_t r0,
                                               int64_t count, float* __restrict__ norm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t il = warp; il < count && r0 + il < R; il += warps) {  // warp-uniform
    const int64_t r = r0 + il;
    float s = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float x = to_f(v[r * D + d]);
      s = fmaf(x, x, s);
    }
    s = warp_sum(s);
    if (lane == 0) norm[r] = sqrtf(s);
  }
}

}  // namespace demul

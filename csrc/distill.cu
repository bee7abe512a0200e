// Distillation loss with a fused GEMM + cosine epilogue, SPEC.md section 4 / 4.1 / 4.2.
//
// Rows r = c * M + m of T viewed as [R = C*M, D]:
//   z[r,k]  = <t[r], W[k]> / max(n[r], eps) + b[k]         (n = ||t[r]||)
//   cos[r]  = <z[r], e^[c]> / max(||z[r]||, eps),  L_dist = mean_r (1 - cos[r])
// Forward: blocks own 64 rows x a range of K and keep sum z^2 and sum z e^ per row; a
// one-block kernel merges the ranges. z ([R, K]) is never stored. Backward: one sweep
// (sweep.cuh) recomputes z tile by tile with
//   dz[r,k] = -(g / R) normalize_backward(z^, e^, cos, ||z||)[k],   dt^[r] = sum_k dz[r,k] W[k].
#include "common.cuh"
#include "ops.h"
#include "sweep.cuh"

namespace demul {
namespace {

// Per-(split, row) partial state: sum_k z^2, sum_k z e^.
template <typename T>
__global__ void __launch_bounds__(kThreads)
distill_forward_partial_kernel(const T* __restrict__ t, const T* __restrict__ w, const float* __restrict__ bias,
                               const float* __restrict__ e, const float* __restrict__ n,
                               const float* __restrict__ en, int64_t R, int64_t M, int64_t K, int64_t D,
                               int64_t cols_per_split, float* __restrict__ partial) {
  __shared__ DotSmem sm;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < K ? k_begin + cols_per_split : K;
  float ninv[kPer], einv[kPer], zz[kPer], ze[kPer];
  int64_t cls[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    const bool in = r < R;
    cls[i] = in ? r / M : 0;
    ninv[i] = in ? inv_floor(n[r]) : 0.f;
    einv[i] = in ? inv_floor(en[cls[i]]) : 0.f;
    zz[i] = 0.f;
    ze[i] = 0.f;
  }
  float acc[kPer][kPer];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
    tile_dot(t, R, r0, w, K, k0, D, sm, acc);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t k = k0 + tx + 16 * j;
      if (k < k_end) {
        const float bk = bias ? bias[k] : 0.f;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float z = fmaf(acc[i][j], ninv[i], bk);
          zz[i] = fmaf(z, z, zz[i]);
          ze[i] = fmaf(z, e[cls[i] * K + k] * einv[i], ze[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    zz[i] = row_sum16(zz[i]);
    ze[i] = row_sum16(ze[i]);
    const int64_t r = r0 + ty + 16 * i;
    if (tx == 0 && r < R) {
      float* p = partial + (static_cast<int64_t>(blockIdx.y) * R + r) * 2;
      p[0] = zz[i];
      p[1] = ze[i];
    }
  }
}

// One block: zn[r] = ||z[r]||, cos[r], dist = mean_r (1 - cos); loss_out (optional) =
// ce[0] + alpha * dist (the head).
__global__ void __launch_bounds__(1024)
distill_finalize_kernel(const float* __restrict__ partial, int64_t splits, int64_t R, float* __restrict__ cos_out,
                        float* __restrict__ zn_out, float* __restrict__ dist, const float* __restrict__ ce,
                        float alpha, float* __restrict__ loss_out) {
  __shared__ float scratch[32];
  float total = 0.f;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    float zz = 0.f, ze = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      zz += partial[(s * R + r) * 2];
      ze += partial[(s * R + r) * 2 + 1];
    }
    const float zn = sqrtf(zz);
    const float cs = ze * inv_floor(zn);
    zn_out[r] = zn;
    cos_out[r] = cs;
    total += 1.f - cs;
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) {
    const float mean = total / static_cast<float>(R);
    dist[0] = mean;
    if (loss_out != nullptr) loss_out[0] = ce[0] + alpha * mean;
  }
}

// dz[r,k] for the sweep (rows: prompts r, columns: k of the LLM space).
struct DistillRows {
  const float* n;
  const float* bias;  // [K] or null
  const float* e;     // [C, K]
  const float* en;
  const float* cos;
  const float* zn;
  GradWeight gw;
  int64_t M, K, R;
  float g_over_r;

  __device__ __forceinline__ void prepare() { g_over_r = gw.value() / static_cast<float>(R); }
  __device__ __forceinline__ float operator()(float dot, int64_t r, int64_t k, float&) const {
    const float z = fmaf(dot, inv_floor(n[r]), bias ? bias[k] : 0.f);
    const int64_t c = r / M;
    const float eh = e[c * K + k] * inv_floor(en[c]);
    const float znr = zn[r];
    return -g_over_r * normalize_backward(z * inv_floor(znr), eh, cos[r], znr);
  }
};

}  // namespace

void launch_distill_forward(const DistillArgs& a, Split split, float* partial, float* cos, float* zn, float* dist,
                            const float* ce, float alpha, float* loss_out, cudaStream_t stream) {
  const int64_t R = a.C * a.M;
  const dim3 grid(static_cast<unsigned>(ceil_div(R, kTile)), static_cast<unsigned>(split.splits));
  DEMUL_DISPATCH(a.dtype, [&] {
    distill_forward_partial_kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(a.t), static_cast<const scalar_t*>(a.w), a.bias, a.e, a.n, a.en, R, a.M, a.K,
        a.D, split.cols_per_split, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  distill_finalize_kernel<<<1, 1024, 0, stream>>>(partial, split.splits, R, cos, zn, dist, ce, alpha, loss_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_distill_backward(const DistillArgs& a, const float* cos, const float* zn, GradWeight gw, float* dth,
                             Split split, float* work, cudaStream_t stream) {
  const int64_t R = a.C * a.M;
  const DistillRows epi{a.n, a.bias, a.e, a.en, cos, zn, gw, a.M, a.K, R, 0.f};
  DEMUL_DISPATCH(a.dtype, [&] {
    run_sweep(static_cast<const scalar_t*>(a.t), R, static_cast<const scalar_t*>(a.w), a.K, a.D, split, epi, dth,
              work, nullptr, stream);
  });
}

}  // namespace demul

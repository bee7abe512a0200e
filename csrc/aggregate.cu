// Prompt-weighted aggregation, docs/SPEC.md section 4 (forward; its backward is part of the
// fused text backward, text_head.cu), and the row norms of the image side.
//
// One block per class c; T[c] ([M, D]) is read twice (norms, then the weighted sum), the
// second read mostly from L2.
#include "common.cuh"
#include "ops.h"

namespace demul {
namespace {

constexpr int kAggThreads = 256;

// n[c,m] = ||t[c,m]||, w[c,:] = softmax(A[c,:]), u = sum_m w t^, r[c] = ||u||,
// u^ = u / max(r, eps), written as float32 (u32) and, if out is given, in the input dtype.
// Dynamic shared memory: 2 * M floats.
template <typename T>
__global__ void __launch_bounds__(kAggThreads)
aggregate_forward_kernel(const T* __restrict__ t, const float* __restrict__ a, T* __restrict__ out,
                         float* __restrict__ u32, float* __restrict__ w_out, float* __restrict__ n_out,
                         float* __restrict__ r_out, int64_t M, int64_t D) {
  extern __shared__ float sh[];
  __shared__ float scratch[32];
  float* ninv = sh;
  float* w = sh + M;
  const int64_t c = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const T* tc = t + c * M * D;

  for (int64_t m = warp; m < M; m += nwarps) {
    float s = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float v = to_f(tc[m * D + d]);
      s = fmaf(v, v, s);
    }
    s = warp_sum(s);
    if (lane == 0) {
      const float nn = sqrtf(s);
      n_out[c * M + m] = nn;
      ninv[m] = inv_floor(nn);
    }
  }
  if (warp == 0) {
    warp_softmax(a + c * M, M, [&](int64_t m, float wm) {
      w[m] = wm;
      w_out[c * M + m] = wm;
    });
  }
  __syncthreads();

  // u = sum_m w t^, kept unnormalised in u32 until ||u|| is known; each thread re-reads
  // only what it wrote itself.
  float ss = 0.f;
  for (int64_t d = tid; d < D; d += blockDim.x) {
    float u = 0.f;
    for (int64_t m = 0; m < M; ++m) u = fmaf(w[m] * ninv[m], to_f(tc[m * D + d]), u);
    u32[c * D + d] = u;
    ss = fmaf(u, u, ss);
  }
  const float r = sqrtf(block_sum(ss, scratch));
  if (tid == 0) r_out[c] = r;
  const float rinv = inv_floor(r);
  for (int64_t d = tid; d < D; d += blockDim.x) {
    const float uh = u32[c * D + d] * rinv;
    u32[c * D + d] = uh;
    if (out != nullptr) out[c * D + d] = from_f<T>(uh);
  }
}

// norm[r] = ||v[r]|| for v: [R, D]; one warp per row (common.cuh warp_row_norms, which the
// head's distillation forward also runs for the image norms).
template <typename T>
__global__ void __launch_bounds__(kAggThreads)
row_norms_kernel(const T* __restrict__ v, int64_t R, int64_t D, float* __restrict__ norm) {
  warp_row_norms(v, R, D, static_cast<int64_t>(blockIdx.x) * (kAggThreads / 32), kAggThreads / 32, norm);
}

}  // namespace

void launch_row_norms(DType dt, const void* v, int64_t R, int64_t D, float* norm, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(R, kAggThreads / 32));
  DEMUL_DISPATCH(dt, [&] {
    row_norms_kernel<<<blocks, kAggThreads, 0, stream>>>(static_cast<const scalar_t*>(v), R, D, norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_aggregate_forward(DType dt, const void* t, const float* a, int64_t C, int64_t M, int64_t D, void* out,
                              float* u32, float* w, float* n, float* r, cudaStream_t stream) {
  const size_t smem = 2 * M * sizeof(float);
  DEMUL_DISPATCH(dt, [&] {
    aggregate_forward_kernel<<<static_cast<unsigned>(C), kAggThreads, smem, stream>>>(
        static_cast<const scalar_t*>(t), a, static_cast<scalar_t*>(out), u32, w, n, r, M, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace demul

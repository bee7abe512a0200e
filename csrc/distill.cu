// The distillation without K (docs/SPEC.md section 4.3): a fused GEMM + cosine epilogue against
// the frozen-phi basis (R [r, D], c [r], F [C, r], delta [C], beta), r = min(K, D).
//
// Rows i = c * M + m of T viewed as [C*M, D]:
//   v[i,k]  = <t[i], R[k]> / max(n[i], eps) + c[k]               (n = ||t[i]||)
//   ||z[i]||^2 = ||v[i]||^2 + beta,   <z[i], e^[c]> = <v[i], F[c]> + delta[c]
//   cos[i]  = <z[i], e^[c]> / max(||z[i]||, eps),  L_dist = mean_i (1 - cos[i])
// Forward: blocks own up to 64 rows x a range of r and keep sum v^2 and sum v F per row; a
// one-block kernel merges the ranges and adds beta and delta. The forward also stores
// p = R t^ = v - c ([C*M, r] in T's dtype) for the backward (text_head.cu, one product
// instead of two: v is not recomputed; p rather than v so that the backward's
// <t^, R^T G> = <p, G> has no cancellation v - c in it). In the head it also aggregates
// (SPEC 4) whole classes in the same pass over T.
// The product runs on tensor cores for 16-bit T (R rounded to T's type), in fp32 SIMT for
// float32 T (common.cuh).
#include "common.cuh"
#include "ops.h"

namespace demul {
namespace {

// Per-(split, row) partial state: sum_k v^2, sum_k v F. Block (x, y) owns rows
// tile_rows x .. (at most 64; whole classes when the aggregation is fused) and split y of r.
// Every block takes the norms of its rows itself (a warp per row, as aggregate.cu does, so
// the values agree bit for bit); with `agg` the blocks of split 0 also aggregate their
// classes (SPEC 4: w = softmax(A), u = sum_m w t^, u^ = u / max(||u||, eps); a warp per
// class), so that the head's forward reads T in one kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
distill_forward_partial_kernel(const T* __restrict__ t, const float* __restrict__ basis_r,
                               const float* __restrict__ basis_c, const float* __restrict__ f, int64_t rows,
                               int64_t M, int64_t rank, int64_t D, int64_t tile_rows, int64_t cols_per_split,
                               float* __restrict__ partial, T* __restrict__ proj, float* __restrict__ n_out,
                               FusedAggregate agg) {
  __shared__ TileSmem<T, float> sm;
  __shared__ float s_ninv[kTile], s_wn[kTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int64_t r_end = r0 + tile_rows < rows ? r0 + tile_rows : rows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < rank ? k_begin + cols_per_split : rank;
  const bool lead = blockIdx.y == 0;

  for (int il = warp; il < kTile; il += kThreads / 32) {
    const int64_t r = r0 + il;
    float nn = 0.f;
    if (r < r_end) {
      float ss = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float x = to_f(t[r * D + d]);
        ss = fmaf(x, x, ss);
      }
      nn = sqrtf(warp_sum(ss));
      if (lane == 0 && lead && n_out != nullptr) n_out[r] = nn;
    }
    if (lane == 0) s_ninv[il] = r < r_end ? inv_floor(nn) : 0.f;
  }
  __syncthreads();

  if (agg.a != nullptr && lead) {  // whole classes: r0 and r_end are multiples of M
    const int64_t c_begin = r0 / M, classes = (r_end - r0) / M;
    for (int64_t cl = warp; cl < classes; cl += kThreads / 32) {
      const int64_t c = c_begin + cl;
      warp_softmax(agg.a + c * M, M, [&](int64_t m, float wm) {
        agg.w[c * M + m] = wm;
        s_wn[cl * M + m] = wm * s_ninv[cl * M + m];
      });
      __syncwarp();
      const T* tc = t + c * M * D;
      float uu = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        float u = 0.f;
        for (int64_t m = 0; m < M; ++m) u = fmaf(s_wn[cl * M + m], to_f(tc[m * D + d]), u);
        agg.u32[c * D + d] = u;  // normalised below, by the same thread
        uu = fmaf(u, u, uu);
      }
      const float rc = sqrtf(warp_sum(uu));
      if (lane == 0) agg.r[c] = rc;
      const float rinv = inv_floor(rc);
      for (int64_t d = lane; d < D; d += 32) agg.u32[c * D + d] *= rinv;
    }
  }

  float ninv[kPer], vv[kPer], vf[kPer];
  int64_t cls[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    cls[i] = r < r_end ? r / M : 0;
    ninv[i] = s_ninv[ty + 16 * i];
    vv[i] = 0.f;
    vf[i] = 0.f;
  }
  float acc[kPer][kPer];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
    tile_dot(t, r_end, r0, basis_r, rank, k0, D, sm, acc);  // rows past r_end read as zero
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t k = k0 + tx + 16 * j;
      if (k < k_end) {
        const float ck = basis_c[k];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float p = acc[i][j] * ninv[i];  // (R t^)[k]
          const float v = p + ck;
          const int64_t r = r0 + ty + 16 * i;
          if (proj != nullptr && r < r_end) proj[r * rank + k] = from_f<T>(p);
          vv[i] = fmaf(v, v, vv[i]);
          vf[i] = fmaf(v, f[cls[i] * rank + k], vf[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    vv[i] = row_sum16(vv[i]);
    vf[i] = row_sum16(vf[i]);
    const int64_t r = r0 + ty + 16 * i;
    if (tx == 0 && r < r_end) {
      float* p = partial + (static_cast<int64_t>(blockIdx.y) * rows + r) * 2;
      p[0] = vv[i];
      p[1] = vf[i];
    }
  }
}

// One block: zn[i] = ||z[i]||, cos[i], dist = mean_i (1 - cos); loss_out (optional) =
// ce[0] + alpha * dist (the head).
__global__ void __launch_bounds__(1024)
distill_finalize_kernel(const float* __restrict__ partial, int64_t splits, int64_t rows, int64_t M,
                        const float* __restrict__ delta, const float* __restrict__ beta, float* __restrict__ cos_out,
                        float* __restrict__ zn_out, float* __restrict__ dist, const float* __restrict__ ce,
                        float alpha, float* __restrict__ loss_out) {
  __shared__ float scratch[32];
  const float b = beta[0];
  float total = 0.f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    float vv = 0.f, vf = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      vv += partial[(s * rows + r) * 2];
      vf += partial[(s * rows + r) * 2 + 1];
    }
    const float zn = sqrtf(vv + b);
    const float cs = (vf + delta[r / M]) * inv_floor(zn);
    zn_out[r] = zn;
    cos_out[r] = cs;
    total += 1.f - cs;
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) {
    const float mean = total / static_cast<float>(rows);
    dist[0] = mean;
    if (loss_out != nullptr) loss_out[0] = ce[0] + alpha * mean;
  }
}

}  // namespace

void launch_distill_partial(const DistillArgs& a, int64_t tile_rows, Split split, float* partial, void* proj,
                            float* n_out, FusedAggregate agg, cudaStream_t stream) {
  const int64_t rows = a.C * a.M;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, tile_rows)), static_cast<unsigned>(split.splits));
  DEMUL_DISPATCH(a.dtype, [&] {
    distill_forward_partial_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const scalar_t*>(a.t), a.basis_r,
                                                                  a.basis_c, a.f, rows, a.M, a.rank, a.D, tile_rows,
                                                                  split.cols_per_split, partial,
                                                                  static_cast<scalar_t*>(proj), n_out, agg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_distill_finalize(const DistillArgs& a, Split split, const float* partial, float* cos, float* zn,
                             float* dist, const float* ce, float alpha, float* loss_out, cudaStream_t stream) {
  distill_finalize_kernel<<<1, 1024, 0, stream>>>(partial, split.splits, a.C * a.M, a.M, a.delta, a.beta, cos, zn,
                                                  dist, ce, alpha, loss_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace demul

// The fused backward of the text side of the head: the aggregation's backward (docs/SPEC.md
// section 4.1) and the distillation's without K (section 4.3) in one pass, writing dL/dT
// in T's dtype directly (no float32 [C*M, D] intermediate).
//
// Rows i = c * M + m of T viewed as [C*M, D], t^ = t / max(n, eps), n = ||t||. The forward
// (distill.cu) saved p = R t^ ([C*M, r] in T's dtype), so v = p + c is not recomputed:
//   G[i,k]   = F[c,k] - cos[i] v[i,k] / ||z[i]||       (|G| <= 2: no scaling in float16)
//            = F[c,k] where ||z[i]|| < eps             (the eps floor of SPEC 4.1)
//   dt^_d[i] = s[i] (G R)[i],   s[i] = -(dL/dL_dist) / (C*M) / max(||z[i]||, eps)
//   dt^_a[i] = w[i] du[c],      du = normalize_backward(u^, dL/du^, ||u||)
//   dT[i]    = normalize_backward(t^[i], dt^_d + dt^_a, <t^[i], dt^_d + dt^_a>, n[i])
// with <t^[i], dt^_d[i]> = s[i] sum_k G[i,k] p[i,k] (taken in r-space, so a block needs only
// its own columns of the output) and <t^[i], dt^_a[i]> = w[i] dw[i], dw[i] = <du[c], t^[i]>.
// Block (x, y) owns rows 64x .. 64x+63 and columns 64y .. 64y+63 of dT: the product G R
// runs over r in 64-wide chunks on tensor cores for 16-bit T (G and R rounded to T's
// type, float32 accumulation across the chunks), in fp32 SIMT for float32 T. No atomics:
// deterministic. dA = w (dw - sum_m w dw) follows in a small per-class kernel.
#include "common.cuh"
#include "ops.h"
#include "sweep.cuh"

namespace demul {
namespace {

constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
text_backward_kernel(TextBackwardArgs a, T* __restrict__ dt, float* __restrict__ dw_out) {
  constexpr bool kMma = kUseMma<T, float>;
  using TC = std::conditional_t<kMma, typename MmaType<T, float>::type, float>;
  __shared__ SweepSmem<T, float> sm;
  // per row of the tile: n, w, dw, <u^, dL/du^> and ||u|| of its class, s, cos/||z||, sum_k G p
  __shared__ float s_n[kTile], s_w[kTile], s_dw[kTile], s_ug[kTile], s_rc[kTile], s_s[kTile], s_coef[kTile];
  __shared__ float s_gp[2][kTile];
  const T* __restrict__ t = static_cast<const T*>(a.t);
  const T* __restrict__ proj = static_cast<const T*>(a.proj);
  const bool agg = a.g != nullptr, dist = proj != nullptr;
  const int64_t rows = a.C * a.M, D = a.D, rank = a.rank, M = a.M;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile, d0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const float g_over_rows = dist ? a.gw.value() / static_cast<float>(rows) : 0.f;

  // 1. Per-row scalars; the aggregation's need whole rows of t (a warp per row).
  for (int il = warp; il < kTile; il += kWarps) {
    const int64_t i = r0 + il;
    float ni = 1.f, wi = 0.f, dwi = 0.f, ug = 0.f, rc = 1.f;
    if (i < rows) {
      ni = a.n[i];
      if (agg) {
        const int64_t c = i / M;
        const T* ti = t + i * D;
        const float* gc = a.g + c * D;
        const float* uc = a.u32 + c * D;
        float tg = 0.f, tu = 0.f, gu = 0.f;
        for (int64_t d = lane; d < D; d += 32) {
          const float tv = to_f(ti[d]), gv = gc[d], uv = uc[d];
          tg = fmaf(tv, gv, tg);
          tu = fmaf(tv, uv, tu);
          gu = fmaf(uv, gv, gu);
        }
        tg = warp_sum(tg);
        tu = warp_sum(tu);
        ug = warp_sum(gu);
        rc = a.r[c];
        wi = a.w[i];
        // dw = <normalize_backward(u^, dL/du^, ||u||), t> / max(n, eps)
        dwi = (rc >= kEps ? (tg - ug * tu) / rc : tg / kEps) * inv_floor(ni);
      }
    }
    if (lane == 0) {
      s_n[il] = ni;
      s_w[il] = wi;
      s_dw[il] = dwi;
      s_ug[il] = ug;
      s_rc[il] = rc;
      if (agg && blockIdx.y == 0 && i < rows) dw_out[i] = dwi;
    }
  }
  if (dist && tid < kTile) {
    const int64_t i = r0 + tid;
    const float zn = i < rows ? a.zn[i] : 1.f;
    s_coef[tid] = (i < rows && zn >= kEps) ? a.cos[i] / zn : 0.f;
    s_s[tid] = -g_over_rows * inv_floor(zn);
  }
  __syncthreads();

  // 2. dt^_d = s (G R) over this block's columns; G built chunk by chunk from the saved p.
  float o[kPer][kPer];
  if (dist) {
    ChunkAcc<kMma, TC> acc;
    acc.zero();
    // Loader mapping: 64 consecutive threads on one row (coalesced), 4 rows apart.
    const int ld_c = tid & 63, ld_r = tid >> 6;
    float gp[kTile / 4];  // sum_k G p of rows ld_r + 4 q, this thread's k only
#pragma unroll
    for (int q = 0; q < kTile / 4; ++q) gp[q] = 0.f;
    for (int64_t k0 = 0; k0 < rank; k0 += kTile) {
      const int64_t k = k0 + ld_c;
      const float ck = k < rank ? a.basis_c[k] : 0.f;
#pragma unroll  // fully: gp stays in registers
      for (int q = 0; q < kTile / 4; ++q) {
        const int il = ld_r + 4 * q;
        const int64_t i = r0 + il;
        float gv = 0.f;
        if (i < rows && k < rank) {
          const float p = to_f(proj[i * rank + k]);
          gv = a.f[(i / M) * rank + k] - s_coef[il] * (p + ck);
          gp[q] = fmaf(gv, p, gp[q]);
        }
        put_g(sm, il, ld_c, gv);
      }
      const int64_t d = d0 + ld_c;
#pragma unroll 4
      for (int q = 0; q < kTile / 4; ++q) {
        const int kl = ld_r + 4 * q;
        const int64_t kk = k0 + kl;
        put_v(sm, kl, ld_c, (kk < rank && d < D) ? a.basis_r[kk * D + d] : 0.f);
      }
      __syncthreads();
      acc.add(sm);
      __syncthreads();  // the chunk is rewritten next
    }
    // The 64 threads of a row are warps 2 ld_r and 2 ld_r + 1.
#pragma unroll
    for (int q = 0; q < kTile / 4; ++q) {
      const float v = warp_sum(gp[q]);
      if (lane == 0) s_gp[warp & 1][ld_r + 4 * q] = v;
    }
    acc.finish(sm, o);  // ends with a barrier for the tensor-core flavour
    __syncthreads();    // s_gp
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) o[i][j] = 0.f;
  }

  // 3. Epilogue: dt^ = dt^_d + dt^_a, then the normalize backward of t^.
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int il = ty + 16 * i;
    const int64_t row = r0 + il;
    if (row >= rows) continue;
    const int64_t c = row / M;
    const float ni = s_n[il], inv_n = inv_floor(ni), wi = s_w[il], si = dist ? s_s[il] : 0.f;
    const float proj_t = (agg ? wi * s_dw[il] : 0.f) + (dist ? si * (s_gp[0][il] + s_gp[1][il]) : 0.f);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (d >= D) continue;
      float dth = si * o[i][j];
      if (agg) dth = fmaf(wi, normalize_backward(a.u32[c * D + d], a.g[c * D + d], s_ug[il], s_rc[il]), dth);
      const float th = to_f(t[row * D + d]) * inv_n;
      dt[row * D + d] = from_f<T>(normalize_backward(th, dth, proj_t, ni));
    }
  }
}

// dA[c, m] = w (dw - sum_m' w dw) for each class; a warp per class.
__global__ void __launch_bounds__(kThreads)
prompt_logits_backward_kernel(const float* __restrict__ w, const float* __restrict__ dw, int64_t C, int64_t M,
                              float* __restrict__ da) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warps leave together
  float s = 0.f;
  for (int64_t m = lane; m < M; m += 32) s = fmaf(w[c * M + m], dw[c * M + m], s);
  s = warp_sum(s);
  for (int64_t m = lane; m < M; m += 32) da[c * M + m] = w[c * M + m] * (dw[c * M + m] - s);
}

}  // namespace

void launch_text_backward(const TextBackwardArgs& a, void* dt, float* dw, float* da, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.C * a.M, kTile)), static_cast<unsigned>(ceil_div(a.D, kTile)));
  DEMUL_DISPATCH(a.dtype, [&] {
    text_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a, static_cast<scalar_t*>(dt), dw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (a.g != nullptr) {
    prompt_logits_backward_kernel<<<static_cast<unsigned>(ceil_div(a.C, kWarps)), kThreads, 0, stream>>>(
        a.w, dw, a.C, a.M, da);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace demul

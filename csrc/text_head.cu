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
//
// Block (x, y) owns rows 64x .. 64x+63 and the y-th group of 64-wide column chunks of dT
// (ops.h text_backward_split: one group when the row tiles fill the device, and at least
// two chunks per group). It builds its rows' G once, for the whole rank, into (dynamic)
// shared memory (16-byte loads of p, F and c where rank and the bases allow, the class
// index once per row), and keeps it there for every chunk of its group; ranks too large
// for the shared memory budget go in panels, rebuilt per chunk. The basis R streams
// through a two-stage cp.async pipeline (__pipeline_memcpy_async, 16-byte copies where D
// and the base allow, 4-byte otherwise) in [32 x 64] chunks, one barrier per chunk; the
// product G R runs on tensor cores for 16-bit T (G and R rounded to T's type, float32
// accumulation: each chunk of R is converted while the previous one multiplies), in fp32
// SIMT for float32 T. No atomics: deterministic. dA = w (dw - sum_m w dw) follows in a
// small per-class kernel.
#include "common.cuh"
#include "ops.h"
#include "pipeline.cuh"
#include "sweep.cuh"

namespace demul {
namespace {

constexpr int kWarps = kThreads / 32;

// The shared memory of text_backward_kernel, in bytes from a 128-byte aligned base: G [64]
// [g_ld] (T's tensor-core type, or float32), the two float32 stages of the R chunks [32][68],
// and for the tensor-core flavour the two converted chunks [32][72] and the accumulator
// staging tile [64][kAccLd].
constexpr int kKStep = 32;                  // rows of R per pipeline stage
constexpr int kStageLd = kTile + 4;         // floats per row of a stage (16-byte rows)
constexpr int kConvLd = kTile + 8;          // elements per row of a converted chunk
constexpr int64_t kTextBwdSmemCap = 160 * 1024;  // at most this much (under the sm_80/90 opt-in); less where the device has less

template <typename T>
struct BwdSmem {
  static constexpr bool kMma = kUseMma<T, float>;
  using TC = std::conditional_t<kMma, typename MmaType<T, float>::type, float>;
  int64_t kp;  // G's columns in shared memory (a multiple of kKStep)
  __host__ __device__ int64_t g_ld() const { return kp + (kMma ? 8 : 4); }
  __host__ __device__ int64_t g_bytes() const { return (kTile * g_ld() * int64_t(sizeof(TC)) + 127) / 128 * 128; }
  static constexpr int64_t kStageBytes = int64_t(kKStep) * kStageLd * 4;
  static constexpr int64_t kConvBytes = kMma ? int64_t(kKStep) * kConvLd * int64_t(sizeof(TC)) : 0;
  static constexpr int64_t kAccBytes = kMma ? int64_t(kTile) * kAccLd * 4 : 0;
  __host__ __device__ int64_t stage_off(int b) const { return g_bytes() + b * kStageBytes; }
  __host__ __device__ int64_t conv_off(int b) const { return g_bytes() + 2 * kStageBytes + b * kConvBytes; }
  __host__ __device__ int64_t acc_off() const { return g_bytes() + 2 * kStageBytes + 2 * kConvBytes; }
  __host__ __device__ int64_t bytes() const { return acc_off() + kAccBytes + 128; }  // + the alignment
  // The widest panel within the budget (the whole rank when it fits).
  static int64_t panel(int64_t rank, int64_t budget) {
    int64_t kp = (rank + kKStep - 1) / kKStep * kKStep;
    while (kp > kKStep && BwdSmem{kp}.bytes() > budget) kp -= kKStep;
    return kp;
  }
};

// Accumulator of G R over the k steps of one column chunk: G rows from shared memory
// (g_ld elements per row, this step's 32 columns at g), the step's R chunk [32][64] at v
// (v_ld per row). The SIMT flavour keeps o[i][j] (row ty + 16 i, column tx + 16 j) in
// registers; the tensor-core flavour two WMMA fragments per warp (rows 16 (w % 4), columns
// 32 (w / 4)), handed over in the epilogue layout by finish (through c, with barriers).
template <bool kMma, typename TC>
struct ChunkAccK;

template <typename TC>
struct ChunkAccK<false, TC> {
  float o[kPer][kPer];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) o[i][j] = 0.f;
  }
  __device__ __forceinline__ void add(const float* g, int64_t g_ld, const float* v, int v_ld) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 8
    for (int k = 0; k < kKStep; ++k) {
      float gv[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) gv[i] = g[(ty + 16 * i) * g_ld + k];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = v[k * v_ld + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) o[i][j] = fmaf(gv[i], bv[j], o[i][j]);
    }
  }
  __device__ __forceinline__ void finish(float (*)[kAccLd], float out[kPer][kPer]) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[i][j] = o[i][j];
  }
};

template <typename TC>
struct ChunkAccK<true, TC> {
  AccFrag f[2];
  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(f[0], 0.f);
    nvcuda::wmma::fill_fragment(f[1], 0.f);
  }
  __device__ __forceinline__ void add(const TC* g, int64_t g_ld, const TC* v, int v_ld) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, wr = 16 * (warp & 3), wc = 32 * (warp >> 2);
#pragma unroll
    for (int k = 0; k < kKStep; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TC, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, g + wr * g_ld + k, static_cast<unsigned>(g_ld));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TC, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, v + k * v_ld + wc + 16 * h, static_cast<unsigned>(v_ld));
        wmma::mma_sync(f[h], fa, fb, f[h]);
      }
    }
  }
  // Contains __syncthreads.
  __device__ __forceinline__ void finish(float (*c)[kAccLd], float out[kPer][kPer]) { unstage(f, c, out); }
};


template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
text_backward_kernel(TextBackwardArgs a, T* __restrict__ dt, float* __restrict__ dw_out, int64_t chunks_per_group,
                     int64_t kp) {
  using L = BwdSmem<T>;
  constexpr bool kMma = L::kMma;
  using TC = typename L::TC;
  extern __shared__ float4 text_bwd_dyn[];
  // per row of the tile: n, w, dw, <u^, dL/du^> and ||u|| of its class, s, cos/||z||, sum_k G p, class
  __shared__ float s_n[kTile], s_w[kTile], s_dw[kTile], s_ug[kTile], s_rc[kTile], s_s[kTile], s_coef[kTile];
  __shared__ float s_gp[kTile];
  __shared__ int64_t s_cls[kTile];
  const L lay{kp};
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(text_bwd_dyn) + 127) & ~uintptr_t(127));
  TC* g_sm = reinterpret_cast<TC*>(base);
  const int64_t g_ld = lay.g_ld();
  const T* __restrict__ t = static_cast<const T*>(a.t);
  const T* __restrict__ proj = static_cast<const T*>(a.proj);
  const bool agg = a.g != nullptr, dist = proj != nullptr;
  const int64_t rows = a.C * a.M, D = a.D, rank = a.rank, M = a.M;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t chunks = (D + kTile - 1) / kTile;
  const int64_t dc_begin = static_cast<int64_t>(blockIdx.y) * chunks_per_group;
  const int64_t dc_end = dc_begin + chunks_per_group < chunks ? dc_begin + chunks_per_group : chunks;
  const float g_over_rows = dist ? a.gw.value() / static_cast<float>(rows) : 0.f;
  const int64_t nks = dist ? (rank + kKStep - 1) / kKStep : 0;  // k steps per column chunk
  const int64_t steps = (dc_end - dc_begin) * nks;
  const int64_t panel_steps = kp / kKStep;
  const bool rebuild = nks > panel_steps;  // G in panels: rebuilt for every column chunk

  // The R chunk of pipeline step s -> stage b: rows kKStep ks .. +31, columns 64 dc .. +63;
  // rows past the rank and columns past D as zeros. One commit per step (maybe empty).
  const float* __restrict__ basis_r = a.basis_r;
  const bool vec_r = dist && D % 4 == 0 && aligned16(basis_r);
  auto issue = [&](int64_t s, int b) {
    if (s < steps) {
      float* st = reinterpret_cast<float*>(base + lay.stage_off(b));
      const int64_t k0 = (s % nks) * kKStep, d0 = (dc_begin + s / nks) * kTile;
#pragma unroll
      for (int q = 0; q < kKStep * kTile / 4 / kThreads; ++q) {
        const int u = tid + kThreads * q, kl = u >> 4, c4 = (u & 15) * 4;
        const int64_t k = k0 + kl, d = d0 + c4;
        float* dst = st + kl * kStageLd + c4;
        if (vec_r) {
          if (k < rank && d < D) {
            __pipeline_memcpy_async(dst, basis_r + k * D + d, 16);
          } else {
            *reinterpret_cast<float4*>(dst) = make_float4(0.f, 0.f, 0.f, 0.f);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (k < rank && d + e < D) {
              __pipeline_memcpy_async(dst + e, basis_r + k * D + d + e, 4);
            } else {
              dst[e] = 0.f;
            }
          }
        }
      }
    }
    __pipeline_commit();
  };
  // Stage b -> converted chunk b (tensor-core flavour): 8 values per thread.
  auto convert = [&](int b) {
    if constexpr (kMma) {
      const float* st = reinterpret_cast<const float*>(base + lay.stage_off(b));
      TC* cv = reinterpret_cast<TC*>(base + lay.conv_off(b));
      const int kl = tid >> 3, c8 = (tid & 7) * 8;
      float x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = st[kl * kStageLd + c8 + e];
      store16(cv + kl * kConvLd + c8, x);
    }
  };

  if (dist) {  // the first chunks load while the per-row scalars are taken
    issue(0, 0);
    issue(1, 1);
  }

  // 1. Per-row scalars; the aggregation's need whole rows of t (a warp per row).
  for (int il = warp; il < kTile; il += kWarps) {
    const int64_t i = r0 + il;
    const int64_t c = i < rows ? i / M : 0;  // the class of the row, once
    float ni = 1.f, wi = 0.f, dwi = 0.f, ug = 0.f, rc = 1.f;
    if (i < rows) {
      ni = a.n[i];
      if (agg) {
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
      s_cls[il] = c;
      s_gp[il] = 0.f;
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

  // G's columns kb .. kb + kp of this tile's rows into shared memory (zeros past the rank
  // and past the rows); with `acc_gp`, sum_k G p into s_gp. A warp per row, 16-byte pieces
  // where the rank and the bases allow.
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_g = dist && rank % kVec == 0 && aligned16(proj) && aligned16(a.f) && aligned16(a.basis_c);
  auto build_g = [&](int64_t kb, bool acc_gp) {
    for (int il = warp; il < kTile; il += kWarps) {
      const int64_t i = r0 + il;
      const bool live = i < rows;
      const float cf = s_coef[il];
      const float* __restrict__ fc = a.f + s_cls[il] * rank;
      const T* __restrict__ pi = proj + (live ? i : 0) * rank;
      TC* gr = g_sm + il * g_ld;
      float gp = 0.f;
      if (vec_g) {
        for (int64_t kl = lane * kVec; kl < kp; kl += 32 * kVec) {
          const int64_t k = kb + kl;
          float gv[kVec];
          if (live && k < rank) {  // rank % kVec == 0: the whole piece is in range
            float p[kVec];
            load16(pi + k, p);
#pragma unroll
            for (int e = 0; e < kVec; e += 4) {
              const float4 f4 = *reinterpret_cast<const float4*>(fc + k + e);
              const float4 c4 = *reinterpret_cast<const float4*>(a.basis_c + k + e);
              gv[e] = f4.x - cf * (p[e] + c4.x);
              gv[e + 1] = f4.y - cf * (p[e + 1] + c4.y);
              gv[e + 2] = f4.z - cf * (p[e + 2] + c4.z);
              gv[e + 3] = f4.w - cf * (p[e + 3] + c4.w);
            }
#pragma unroll
            for (int e = 0; e < kVec; ++e) gp = fmaf(gv[e], p[e], gp);
          } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) gv[e] = 0.f;
          }
#pragma unroll
          for (int e = 0; e < kVec; e += 16 / sizeof(TC)) store16(gr + kl + e, gv + e);
        }
      } else {
        for (int64_t kl = lane; kl < kp; kl += 32) {
          const int64_t k = kb + kl;
          float gv = 0.f;
          if (live && k < rank) {
            const float p = to_f(pi[k]);
            gv = fc[k] - cf * (p + a.basis_c[k]);
            gp = fmaf(gv, p, gp);
          }
          gr[kl] = from_f<TC>(gv);
        }
      }
      gp = warp_sum(gp);
      if (acc_gp && lane == 0) s_gp[il] += gp;
    }
  };

  // 3. Epilogue of one column chunk: dt^ = dt^_d + dt^_a, then the normalize backward of t^.
  auto epilogue = [&](int64_t dc, const float (&o)[kPer][kPer]) {
    const int64_t d0 = dc * kTile;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int il = ty + 16 * i;
      const int64_t row = r0 + il;
      if (row >= rows) continue;
      const int64_t c = s_cls[il];
      const float ni = s_n[il], inv_n = inv_floor(ni), wi = s_w[il], si = dist ? s_s[il] : 0.f;
      const float proj_t = (agg ? wi * s_dw[il] : 0.f) + (dist ? si * s_gp[il] : 0.f);
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
  };

  if (!dist) {
    float o[kPer][kPer] = {};
    for (int64_t dc = dc_begin; dc < dc_end; ++dc) epilogue(dc, o);
    return;
  }

  // 2. dt^_d = s (G R) over this group's column chunks, G from shared memory.
  if constexpr (kMma) {
    __pipeline_wait_prior(0);  // chunks 0 and 1
    __syncthreads();
    convert(0);  // published by the barrier after G's build
    __syncthreads();  // stage 0 read: free for chunk 2
    issue(2, 0);
  } else {
    __pipeline_wait_prior(1);  // chunk 0
  }
  ChunkAccK<kMma, TC> acc;
  acc.zero();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t ks = s % nks, dc = dc_begin + s / nks;
    if (ks % panel_steps == 0 && (rebuild || s < nks)) {
      // Every thread passed the previous step's barrier: the old G is no longer read.
      build_g((ks / panel_steps) * kp, s < nks);
      __syncthreads();
    }
    const TC* gk = g_sm + (ks % panel_steps) * kKStep;
    if constexpr (kMma) {
      acc.add(gk, g_ld, reinterpret_cast<const TC*>(base + lay.conv_off(s & 1)), kConvLd);
      if (s + 1 < steps) convert((s + 1) & 1);  // converted chunk (s+1)&1 was last read at step s-1
      __pipeline_wait_prior(0);                 // chunk s + 2
      __syncthreads();
      issue(s + 3, (s + 1) & 1);  // its stage was read by the conversion above
    } else {
      acc.add(gk, g_ld, reinterpret_cast<const float*>(base + lay.stage_off(s & 1)), kStageLd);
      __pipeline_wait_prior(0);  // chunk s + 1
      __syncthreads();
      issue(s + 2, s & 1);  // its stage was read by this step's product
    }
    if (ks == nks - 1) {
      float o[kPer][kPer];
      acc.finish(reinterpret_cast<float(*)[kAccLd]>(base + lay.acc_off()), o);
      epilogue(dc, o);
      acc.zero();
    }
  }
  __pipeline_wait_prior(0);  // nothing left in flight (the tail's commits are empty)
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

void launch_text_backward(const TextBackwardArgs& a, Split columns, void* dt, float* dw, float* da,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.C * a.M, kTile)), static_cast<unsigned>(columns.splits));
  DEMUL_DISPATCH(a.dtype, [&] {
    const int64_t kp = a.proj != nullptr ? BwdSmem<scalar_t>::panel(a.rank, dynamic_smem_budget(kTextBwdSmemCap)) : kKStep;
    const int64_t smem = a.proj != nullptr ? BwdSmem<scalar_t>{kp}.bytes() : 0;
    if (smem > 48 * 1024) {  // the opt-in beyond 48 KB of dynamic shared memory (no sync)
      C10_CUDA_CHECK(cudaFuncSetAttribute(text_backward_kernel<scalar_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    text_backward_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(a, static_cast<scalar_t*>(dt), dw,
                                                                     columns.cols_per_split / kTile, kp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (a.g != nullptr) {
    prompt_logits_backward_kernel<<<static_cast<unsigned>(ceil_div(a.C, kWarps)), kThreads, 0, stream>>>(
        a.w, dw, a.C, a.M, da);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace demul

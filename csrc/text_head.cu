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
// shared memory (a warp per 8 consecutive rows, 4-wide pieces: every warp access reads 128
// contiguous columns of p, F and c where rank and the bases allow; c once per warp, F once
// per class change, the class index once per row), and keeps it there for every chunk of
// its group, and per column chunk du of its classes (each class row of dL/du^ and u^ read once
// per chunk, not once per row); where shared memory allows (one panel of G and the whole under
// kTextBwdStashCap: imagenet in 16-bit types on an sm_90) the per-row phase also keeps its rows
// of T there for the epilogues, which then read T from shared memory; ranks too large
// for the shared memory budget go in panels, rebuilt per chunk. The basis R (in T's dtype:
// cast once per basis by demul_fast/ops/cuda_ops.py) streams through a two-stage cp.async
// pipeline (__pipeline_memcpy_async, 16-byte copies where D and the base allow; else 4-byte
// copies for float32 and plain element loads for 16-bit R, cp.async having no 2-byte copy) in
// [32 x 64] chunks of T's type, one barrier per chunk; the product G R runs on tensor cores
// for 16-bit T (G rounded to T's type, float32 accumulation), in fp32 SIMT for float32 T. No
// atomics: deterministic. dA = w (dw - sum_m w dw): by the blocks of group 0 from their rows'
// dw when every class lies within one tile (M divides 64), else in a small per-class kernel.
#include "common.cuh"
#include "ops.h"
#include "pipeline.cuh"
#include "sweep.cuh"

namespace demul {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kRows = kTile / kWarps;  // rows of the tile per warp in the per-row phases

// The shared memory of text_backward_kernel, in bytes from a 128-byte aligned base: du of the
// tile's classes for one column chunk [64][64] (float32), G [64][g_ld] and the two stages of
// the R chunks [32][kStageLd] (T's type), and for the tensor-core flavour the accumulator
// staging tile [64][kAccLd]; then, where it fits (`stash`), the row tile of T [64][D + 16] in
// T's type, kept from the per-row phase for the epilogues (T read once, not twice).
constexpr int kKStep = 32;                  // rows of R per pipeline stage
constexpr int64_t kTextBwdSmemCap = 160 * 1024;  // at most this much (under the sm_80/90 opt-in); less where the device has less
constexpr int64_t kTextBwdStashCap = 220 * 1024;  // with the tile of T: at most this much (sm_90's opt-in is 227 KB)

template <typename T>
struct BwdSmem {
  static constexpr bool kMma = kUseMma<T, float>;
  using TC = std::conditional_t<kMma, typename MmaType<T, float>::type, float>;  // == T
  int64_t kp;  // G's columns in shared memory (a multiple of kKStep)
  static constexpr int64_t kDuBytes = int64_t(kTile) * kTile * 4;  // a multiple of 128
  __host__ __device__ int64_t g_ld() const { return kp + (kMma ? 8 : 4); }
  __host__ __device__ int64_t g_bytes() const { return (kTile * g_ld() * int64_t(sizeof(TC)) + 127) / 128 * 128; }
  __host__ __device__ int64_t g_off() const { return kDuBytes; }
  // elements per row of a stage: 16-byte rows (144 bytes for 16-bit T, 272 for float32)
  static constexpr int kStageLd = kTile + (kMma ? 8 : 4);
  static constexpr int64_t kStageBytes = int64_t(kKStep) * kStageLd * int64_t(sizeof(TC));
  static constexpr int64_t kAccBytes = kMma ? int64_t(kTile) * kAccLd * 4 : 0;
  __host__ __device__ int64_t stage_off(int b) const { return g_off() + g_bytes() + b * kStageBytes; }
  __host__ __device__ int64_t acc_off() const { return g_off() + g_bytes() + 2 * kStageBytes; }
  __host__ __device__ int64_t bytes() const { return acc_off() + kAccBytes + 128; }  // + the alignment
  // the tile of T after the rest; 16 elements of padding per row (32 or 64 bytes: the two rows
  // a warp's epilogue reads fall on different banks)
  __host__ __device__ static int64_t t_ld(int64_t D) { return D + 16; }
  __host__ __device__ int64_t t_off() const { return acc_off() + kAccBytes; }
  __host__ __device__ int64_t bytes_with_t(int64_t D) const {
    return t_off() + (kTile * t_ld(D) * int64_t(sizeof(T)) + 127) / 128 * 128 + 128;
  }
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
text_backward_kernel(TextBackwardArgs a, T* __restrict__ dt, float* __restrict__ dw_out, float* __restrict__ da,
                     int64_t chunks_per_group, int64_t kp, bool stash) {
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
  float* du_sm = reinterpret_cast<float*>(base);  // [64 classes][64 columns]
  TC* g_sm = reinterpret_cast<TC*>(base + lay.g_off());
  const int64_t g_ld = lay.g_ld();
  const T* __restrict__ t = static_cast<const T*>(a.t);
  const T* __restrict__ proj = static_cast<const T*>(a.proj);
  const bool agg = a.g != nullptr, dist = proj != nullptr;
  const int64_t rows = a.C * a.M, D = a.D, rank = a.rank, M = a.M;
  // the row tile of T, written by the per-row phase, read by the epilogues (with `stash`)
  T* t_sm = stash ? reinterpret_cast<T*>(base + lay.t_off()) : nullptr;
  const int64_t t_ld = L::t_ld(D);
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

  // The R chunk of pipeline step s -> stage b: rows kKStep ks .. +31, columns 64 dc .. +63,
  // in T's type as R is; rows past the rank and columns past D as zeros. 16-byte pieces
  // (kVec values) where D and the base allow, else value by value (cp.async of 4 bytes for
  // float32, plain loads for 16-bit R: cp.async has no 2-byte copy). One commit per step
  // (maybe empty).
  const T* __restrict__ basis_r = static_cast<const T*>(a.basis_r);
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kStageLd = L::kStageLd;
  constexpr int kPieces = kTile / kVec;  // 16-byte pieces per row of a chunk
  const bool vec_r = dist && D % kVec == 0 && aligned16(basis_r);
  auto issue = [&](int64_t s, int b) {
    if (s < steps) {
      TC* st = reinterpret_cast<TC*>(base + lay.stage_off(b));
      const int64_t k0 = (s % nks) * kKStep, d0 = (dc_begin + s / nks) * kTile;
#pragma unroll
      for (int q = 0; q < kKStep * kPieces / kThreads; ++q) {
        const int u = tid + kThreads * q, kl = u / kPieces, c = (u % kPieces) * kVec;
        const int64_t k = k0 + kl, d = d0 + c;
        TC* dst = st + kl * kStageLd + c;
        if (vec_r) {
          if (k < rank && d < D) {
            __pipeline_memcpy_async(dst, basis_r + k * D + d, 16);
          } else {
            const float z[kVec] = {};
            store16(dst, z);
          }
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (k < rank && d + e < D) {
              if constexpr (sizeof(T) == 4) {
                __pipeline_memcpy_async(dst + e, basis_r + k * D + d + e, 4);
              } else {
                dst[e] = basis_r[k * D + d + e];
              }
            } else {
              dst[e] = from_f<TC>(0.f);
            }
          }
        }
      }
    }
    __pipeline_commit();
  };

  if (dist) {  // the first chunks load while the per-row scalars are taken
    issue(0, 0);
    issue(1, 1);
  }

  // 1. Per-row scalars; the aggregation's need whole rows of t. Warp w takes the tile's rows
  // kRows w .. kRows w + kRows - 1 (consecutive: mostly one class), lane l their columns l,
  // l + 32, ...; the class rows of dL/du^ and u^ are loaded once per column and class, not
  // once per row (the same sums in the same order per row as a warp per row).
  {
    int64_t cls[kRows];
    float tg[kRows], tu[kRows], gu[kRows];
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      const int64_t i = r0 + warp * kRows + q;
      cls[q] = i < rows ? i / M : 0;  // the class of the row, once
      tg[q] = tu[q] = gu[q] = 0.f;
    }
    if (agg || stash) {
      for (int64_t d = lane; d < D; d += 32) {
        float gv = 0.f, uv = 0.f;
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          const int64_t i = r0 + warp * kRows + q;
          if (i >= rows) break;  // warp-uniform: the rows past the end are the last ones
          const T tr = t[i * D + d];
          if (stash) t_sm[(warp * kRows + q) * t_ld + d] = tr;
          if (agg) {
            if (q == 0 || cls[q] != cls[q - 1]) {
              gv = a.g[cls[q] * D + d];
              uv = a.u32[cls[q] * D + d];
            }
            const float tv = to_f(tr);
            tg[q] = fmaf(tv, gv, tg[q]);
            tu[q] = fmaf(tv, uv, tu[q]);
            gu[q] = fmaf(uv, gv, gu[q]);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      const int il = warp * kRows + q;
      const int64_t i = r0 + il;
      float ni = 1.f, wi = 0.f, dwi = 0.f, ug = 0.f, rc = 1.f;
      if (agg) {
        tg[q] = warp_sum(tg[q]);
        tu[q] = warp_sum(tu[q]);
        ug = warp_sum(gu[q]);
      }
      if (i < rows) {
        ni = a.n[i];
        if (agg) {
          rc = a.r[cls[q]];
          wi = a.w[i];
          // dw = <normalize_backward(u^, dL/du^, ||u||), t> / max(n, eps)
          dwi = (rc >= kEps ? (tg[q] - ug * tu[q]) / rc : tg[q] / kEps) * inv_floor(ni);
        }
      }
      if (lane == 0) {
        s_n[il] = ni;
        s_w[il] = wi;
        s_dw[il] = dwi;
        s_ug[il] = ug;
        s_rc[il] = rc;
        s_cls[il] = cls[q];
        s_gp[il] = 0.f;
        if (agg && dw_out != nullptr && blockIdx.y == 0 && i < rows) dw_out[i] = dwi;
      }
    }
  }
  if (dist && tid < kTile) {
    const int64_t i = r0 + tid;
    const float zn = i < rows ? a.zn[i] : 1.f;
    s_coef[tid] = (i < rows && zn >= kEps) ? a.cos[i] / zn : 0.f;
    s_s[tid] = -g_over_rows * inv_floor(zn);
  }
  __syncthreads();
  if (agg && da != nullptr && blockIdx.y == 0) {  // dA of the tile's classes (M divides 64: r0 % M == 0), a warp per class
    for (int64_t cl = warp; cl < kTile / M; cl += kWarps) {
      const int64_t c = r0 / M + cl;
      if (c >= a.C) break;  // warp-uniform
      float sw = 0.f;
      for (int64_t m = lane; m < M; m += 32) sw = fmaf(s_w[cl * M + m], s_dw[cl * M + m], sw);
      sw = warp_sum(sw);
      for (int64_t m = lane; m < M; m += 32) da[c * M + m] = s_w[cl * M + m] * (s_dw[cl * M + m] - sw);
    }
  }

  // G's columns kb .. kb + kp of this tile's rows into shared memory (zeros past the rank
  // and past the rows); with `acc_gp`, sum_k G p into s_gp. Warp w builds rows kRows w ..
  // kRows w + kRows - 1, lane l the 4-wide pieces 4 l, 4 l + 128, ... of each (16-byte loads of
  // F and c, 4 values of p: every warp access reads a contiguous 128 columns) where the rank
  // and the bases allow, else element l, l + 32, ...; c is read once per piece for the warp's
  // rows, F once per piece and class.
  const bool vec_g = dist && rank % 4 == 0 && aligned16(proj) && aligned16(a.f) && aligned16(a.basis_c);
  auto build_g = [&](int64_t kb, bool acc_gp) {
    float gp[kRows];
#pragma unroll
    for (int q = 0; q < kRows; ++q) gp[q] = 0.f;
    const int step = vec_g ? 128 : 32;
    for (int64_t kl = vec_g ? 4 * lane : lane; kl < kp; kl += step) {
      const int64_t k = kb + kl;
      const bool in_rank = k < rank;  // vec_g: rank % 4 == 0, the whole piece is in range
      float c4[4] = {0.f, 0.f, 0.f, 0.f}, f4[4] = {0.f, 0.f, 0.f, 0.f};
      if (in_rank) {
        if (vec_g) {
          load4(a.basis_c + k, c4);
        } else {
          c4[0] = a.basis_c[k];
        }
      }
#pragma unroll
      for (int q = 0; q < kRows; ++q) {
        const int il = warp * kRows + q;
        const int64_t i = r0 + il;
        const bool live = i < rows && in_rank;
        const float cf = s_coef[il];
        if (live && (q == 0 || s_cls[il] != s_cls[il - 1])) {  // a new class (rows past the end come last)
          if (vec_g) {
            load4(a.f + s_cls[il] * rank + k, f4);
          } else {
            f4[0] = a.f[s_cls[il] * rank + k];
          }
        }
        TC* gr = g_sm + il * g_ld + kl;
        if (vec_g) {
          float gv[4] = {0.f, 0.f, 0.f, 0.f};
          if (live) {
            float pv[4];
            load4(proj + i * rank + k, pv);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              gv[e] = f4[e] - cf * (pv[e] + c4[e]);
              gp[q] = fmaf(gv[e], pv[e], gp[q]);
            }
          }
          store4(gr, gv);
        } else {
          float gv = 0.f;
          if (live) {
            const float pv = to_f(proj[i * rank + k]);
            gv = f4[0] - cf * (pv + c4[0]);
            gp[q] = fmaf(gv, pv, gp[q]);
          }
          *gr = from_f<TC>(gv);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      const float sum = warp_sum(gp[q]);
      if (acc_gp && lane == 0) s_gp[warp * kRows + q] += sum;
    }
  };

  // du = normalize_backward(u^, dL/du^, <u^, dL/du^>, ||u||) of the tile's classes (at most 64:
  // class cl - the tile's first) for the 64 columns of chunk dc into du_sm, each class row of
  // dL/du^ and u^ read once per chunk (a warp: 32 consecutive columns of one class), not once
  // per row as the epilogue would. The caller publishes it with a barrier.
  const int64_t c_first = s_cls[0];
  auto fill_du = [&](int64_t dc) {
    const int64_t d0 = dc * kTile;
    const int64_t last = (r0 + kTile < rows ? r0 + kTile : rows) - 1 - r0;  // the tile's last live row
    const int ncls = static_cast<int>(s_cls[last] - c_first + 1);
    for (int e = tid; e < ncls * kTile; e += kThreads) {
      const int cl = e / kTile, j = e % kTile;
      const int64_t c = c_first + cl, d = d0 + j;
      const int64_t il = c * M - r0 > 0 ? c * M - r0 : 0;  // the class's first row in the tile
      du_sm[cl * kTile + j] = d < D ? normalize_backward(a.u32[c * D + d], a.g[c * D + d], s_ug[il], s_rc[il]) : 0.f;
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
      const float* du_row = du_sm + (s_cls[il] - c_first) * kTile;
      const float ni = s_n[il], inv_n = inv_floor(ni), wi = s_w[il], si = dist ? s_s[il] : 0.f;
      const float proj_t = (agg ? wi * s_dw[il] : 0.f) + (dist ? si * s_gp[il] : 0.f);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t d = d0 + tx + 16 * j;
        if (d >= D) continue;
        float dth = si * o[i][j];
        if (agg) dth = fmaf(wi, du_row[tx + 16 * j], dth);
        const float th = to_f(stash ? t_sm[il * t_ld + d] : t[row * D + d]) * inv_n;
        dt[row * D + d] = from_f<T>(normalize_backward(th, dth, proj_t, ni));
      }
    }
  };

  if (!dist) {
    float o[kPer][kPer] = {};
    for (int64_t dc = dc_begin; dc < dc_end; ++dc) {
      if (agg) fill_du(dc);
      __syncthreads();  // du published
      epilogue(dc, o);
      __syncthreads();  // du is rewritten next
    }
    return;
  }

  // 2. dt^_d = s (G R) over this group's column chunks, G from shared memory.
  __pipeline_wait_prior(1);  // chunk 0, published by the barrier after G's build
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
    acc.add(gk, g_ld, reinterpret_cast<const TC*>(base + lay.stage_off(s & 1)), kStageLd);
    __pipeline_wait_prior(0);  // chunk s + 1
    __syncthreads();
    issue(s + 2, s & 1);  // its stage was read by this step's product
    if (ks == nks - 1) {
      float o[kPer][kPer];
      // the previous chunk's epilogue read du before this step's barrier
      if (agg) fill_du(dc);
      acc.finish(reinterpret_cast<float(*)[kAccLd]>(base + lay.acc_off()), o);
      __syncthreads();  // du published
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
  const bool fold = a.g != nullptr && text_backward_takes_prompt_logits(a.M);  // dA in the kernel
  DEMUL_DISPATCH(a.dtype, [&] {
    using L = BwdSmem<scalar_t>;
    const int64_t kp = a.proj != nullptr ? L::panel(a.rank, dynamic_smem_budget(kTextBwdSmemCap)) : kKStep;
    // the tile of T too where G is one panel and the whole fits (the distillation's path only)
    const bool stash = a.proj != nullptr && kp >= a.rank &&
                       L{kp}.bytes_with_t(a.D) <= dynamic_smem_budget(kTextBwdStashCap);
    // without the distillation only du (and the alignment)
    const int64_t smem = a.proj == nullptr ? L::kDuBytes + 128 : stash ? L{kp}.bytes_with_t(a.D) : L{kp}.bytes();
    if (smem > 48 * 1024) {  // the opt-in beyond 48 KB of dynamic shared memory (no sync)
      C10_CUDA_CHECK(cudaFuncSetAttribute(text_backward_kernel<scalar_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    text_backward_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(a, static_cast<scalar_t*>(dt), fold ? nullptr : dw,
                                                                     fold ? da : nullptr,
                                                                     columns.cols_per_split / kTile, kp, stash);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (a.g != nullptr && !fold) {
    prompt_logits_backward_kernel<<<static_cast<unsigned>(ceil_div(a.C, kWarps)), kThreads, 0, stream>>>(
        a.w, dw, a.C, a.M, da);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace demul

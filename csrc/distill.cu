// The distillation without K (docs/SPEC.md section 4.3): a fused GEMM + cosine epilogue against
// the frozen-phi basis (R [r, D], c [r], F [C, r], delta [C], beta), r = min(K, D).
//
// Rows i = c * M + m of T viewed as [C*M, D]:
//   v[i,k]  = <t[i], R[k]> / max(n[i], eps) + c[k]               (n = ||t[i]||)
//   ||z[i]||^2 = ||v[i]||^2 + beta,   <z[i], e^[c]> = <v[i], F[c]> + delta[c]
//   cos[i]  = <z[i], e^[c]> / max(||z[i]||, eps),  L_dist = mean_i (1 - cos[i])
// Forward: blocks own up to 64 rows x a range of r and keep sum v^2 and sum v F per row;
// cross_entropy.cu's loss_merge_kernel merges the ranges and adds beta and delta. The forward also stores
// p = R t^ = v - c ([C*M, r] in T's dtype) for the backward (text_head.cu, one product
// instead of two: v is not recomputed; p rather than v so that the backward's
// <t^, R^T G> = <p, G> has no cancellation v - c in it). In the head it also aggregates
// (SPEC 4) whole classes in the same pass over T.
// R comes in T's dtype (cast once per basis by demul_fast/ops/cuda_ops.py; the bindings
// refuse another). The product runs on tensor cores for 16-bit T, in fp32 SIMT for float32 T
// (common.cuh).
//
// Two kernels compute the partial pass. distill_forward_tile_kernel (whenever the tile fits
// the shared memory budget, DistillSmem) reads its [tile_rows, D] tile of T once, with
// 16-byte cp.async copies where D and the base allow, into shared memory, where it stays
// for the norms, the fused aggregation and every 64-wide chunk of its r range (per chunk the F
// rows of its classes go to shared memory too: F read once per class, not per row); the basis R
// streams through a two-stage cp.async pipeline in [64 x 32] slices of T's type (16-byte
// copies where D and the base allow; for 16-bit R otherwise plain element loads, cp.async
// having no 2-byte copy), one barrier per slice. distill_forward_partial_kernel (larger D)
// streams both operands through tile_dot.
#include "common.cuh"
#include "ops.h"
#include "pipeline.cuh"

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
distill_forward_partial_kernel(const T* __restrict__ t, const T* __restrict__ basis_r,
                               const float* __restrict__ basis_c, const float* __restrict__ f, int64_t rows,
                               int64_t M, int64_t rank, int64_t D, int64_t tile_rows, int64_t cols_per_split,
                               float* __restrict__ partial, T* __restrict__ proj, float* __restrict__ n_out,
                               FusedAggregate agg, ImageNorms img, unsigned* __restrict__ ticket) {
  __shared__ TileSmem<T, T> sm;
  __shared__ float s_ninv[kTile], s_wn[kTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int64_t r_end = r0 + tile_rows < rows ? r0 + tile_rows : rows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < rank ? k_begin + cols_per_split : rank;
  const bool lead = blockIdx.y == 0;
  if (ticket != nullptr && blockIdx.x == 0 && lead && tid == 0) *ticket = 0u;  // for loss_merge_kernel
  const int64_t d_tiles = (rows + tile_rows - 1) / tile_rows;
  if (static_cast<int64_t>(blockIdx.x) >= d_tiles) {  // an image-norm block (ImageNorms): 64 rows of x, then leave
    if (lead) warp_row_norms(static_cast<const T*>(img.x), img.B, D, (blockIdx.x - d_tiles) * kTile, kTile, img.norm);
    return;
  }

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

// Shared memory of distill_forward_tile_kernel, in bytes from a 128-byte aligned base: the
// F rows of the tile's classes for one 64-wide chunk of r [64][64] (float32), the tile of T
// [64][a_ld] and the two stages of the R slices [64][kSliceLd] (T's type), and for the
// tensor-core flavour the accumulator staging tile [64][kAccLd].
constexpr int kDStep = 32;                       // columns of D per pipeline stage
constexpr int64_t kDistillSmemCap = 160 * 1024;  // at most this much (under the sm_80/90 opt-in); less where the device has less

template <typename T>
struct DistillSmem {
  static constexpr bool kMma = kUseMma<T, float>;
  using TC = std::conditional_t<kMma, typename MmaType<T, float>::type, float>;  // == T
  int64_t dp;  // D rounded up to kDStep
  static constexpr int64_t kFBytes = int64_t(kTile) * kTile * 4;  // a multiple of 128
  __host__ __device__ int64_t a_ld() const { return dp + (kMma ? 8 : 4); }
  __host__ __device__ int64_t a_bytes() const { return (kTile * a_ld() * int64_t(sizeof(TC)) + 127) / 128 * 128; }
  __host__ __device__ int64_t a_off() const { return kFBytes; }
  // elements per row of a stage: 16-byte rows (80 bytes for 16-bit T, 144 for float32)
  static constexpr int kSliceLd = kDStep + (kMma ? 8 : 4);
  static constexpr int64_t kStageBytes = int64_t(kTile) * kSliceLd * int64_t(sizeof(TC));
  static constexpr int64_t kAccBytes = kMma ? int64_t(kTile) * kAccLd * 4 : 0;
  __host__ __device__ int64_t stage_off(int b) const { return a_off() + a_bytes() + b * kStageBytes; }
  __host__ __device__ int64_t acc_off() const { return a_off() + a_bytes() + 2 * kStageBytes; }
  __host__ __device__ int64_t bytes() const { return acc_off() + kAccBytes + 128; }  // + the alignment
  __host__ __device__ static DistillSmem of(int64_t D) { return {(D + kDStep - 1) / kDStep * kDStep}; }
  static bool fits(int64_t D, int64_t budget) { return of(D).bytes() <= budget; }
};

// acc[i][j] += A_tile[ty + 16 i, d0 .. d0+31] . S[tx + 16 j, 0 .. 31] (SIMT, float32), or the
// tensor-core fragments of the same product (warp w: rows 16 (w % 4), columns 32 (w / 4)).
template <bool kMma, typename TC>
struct SliceAcc;

template <typename TC>
struct SliceAcc<false, TC> {
  float o[kPer][kPer];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) o[i][j] = 0.f;
  }
  __device__ __forceinline__ void add(const float* a, int64_t a_ld, const float* v, int v_ld) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 8
    for (int k = 0; k < kDStep; ++k) {
      float av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = a[(ty + 16 * i) * a_ld + k];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = v[(tx + 16 * j) * v_ld + k];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) o[i][j] = fmaf(av[i], bv[j], o[i][j]);
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
struct SliceAcc<true, TC> {
  AccFrag f[2];
  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(f[0], 0.f);
    nvcuda::wmma::fill_fragment(f[1], 0.f);
  }
  __device__ __forceinline__ void add(const TC* a, int64_t a_ld, const TC* v, int v_ld) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, wr = 16 * (warp & 3), wc = 32 * (warp >> 2);
#pragma unroll
    for (int k = 0; k < kDStep; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TC, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a + wr * a_ld + k, static_cast<unsigned>(a_ld));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // rows of the slice are columns of the product: a column-major [k x n] operand
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TC, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, v + (wc + 16 * h) * v_ld + k, static_cast<unsigned>(v_ld));
        wmma::mma_sync(f[h], fa, fb, f[h]);
      }
    }
  }
  // Contains __syncthreads.
  __device__ __forceinline__ void finish(float (*c)[kAccLd], float out[kPer][kPer]) { unstage(f, c, out); }
};

// distill_forward_partial_kernel's contract, with the tile of T resident in shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
distill_forward_tile_kernel(const T* __restrict__ t, const T* __restrict__ basis_r,
                            const float* __restrict__ basis_c, const float* __restrict__ f, int64_t rows,
                            int64_t M, int64_t rank, int64_t D, int64_t tile_rows, int64_t cols_per_split,
                            float* __restrict__ partial, T* __restrict__ proj, float* __restrict__ n_out,
                            FusedAggregate agg, ImageNorms img, unsigned* __restrict__ ticket) {
  using L = DistillSmem<T>;
  constexpr bool kMma = L::kMma;
  using TC = typename L::TC;
  extern __shared__ float4 distill_dyn[];
  __shared__ float s_ninv[kTile], s_wn[kTile];
  const L lay = L::of(D);
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(distill_dyn) + 127) & ~uintptr_t(127));
  float* f_sm = reinterpret_cast<float*>(base);  // [64 classes][64 columns of r]
  TC* a_sm = reinterpret_cast<TC*>(base + lay.a_off());
  const int64_t a_ld = lay.a_ld(), dp = lay.dp;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int64_t r_end = r0 + tile_rows < rows ? r0 + tile_rows : rows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < rank ? k_begin + cols_per_split : rank;
  const bool lead = blockIdx.y == 0;
  if (ticket != nullptr && blockIdx.x == 0 && lead && tid == 0) *ticket = 0u;  // for loss_merge_kernel
  const int64_t d_tiles = (rows + tile_rows - 1) / tile_rows;
  if (static_cast<int64_t>(blockIdx.x) >= d_tiles) {  // an image-norm block (ImageNorms): 64 rows of x, then leave
    if (lead) warp_row_norms(static_cast<const T*>(img.x), img.B, D, (blockIdx.x - d_tiles) * kTile, kTile, img.norm);
    return;
  }
  const int64_t nds = dp / kDStep;                                 // D steps per chunk of r
  const int64_t steps = (k_end - k_begin + kTile - 1) / kTile * nds;  // k_begin is a multiple of 64

  // The tile of T: rows r0 .. r_end (zeros below, up to 64) and columns 0 .. dp (zeros past D).
  constexpr int kVec = 16 / sizeof(T);
  if (D % kVec == 0 && aligned16(t)) {
    for (int64_t u = tid; u < kTile * (dp / kVec); u += kThreads) {
      const int64_t il = u / (dp / kVec), d = (u % (dp / kVec)) * kVec;
      TC* dst = a_sm + il * a_ld + d;
      if (r0 + il < r_end && d < D) {
        __pipeline_memcpy_async(dst, t + (r0 + il) * D + d, 16);
      } else {
        const float z[kVec] = {};
        store16(dst, z);
      }
    }
  } else {
    for (int64_t u = tid; u < kTile * dp; u += kThreads) {
      const int64_t il = u / dp, d = u % dp;
      a_sm[il * a_ld + d] = (r0 + il < r_end && d < D) ? t[(r0 + il) * D + d] : from_f<TC>(0.f);
    }
  }
  __pipeline_commit();

  // The R slice of pipeline step s -> stage b: rows 64 kc .. +63 of the block's r range,
  // columns kDStep ds .. +31, in T's type as R is; rows past k_end and columns past D as zeros.
  // 16-byte pieces (kVec values) where D and the base allow, else value by value (cp.async of
  // 4 bytes for float32, plain loads for 16-bit R: cp.async has no 2-byte copy).
  constexpr int kSliceLd = L::kSliceLd;
  constexpr int kPieces = kDStep / kVec;  // 16-byte pieces per row of a slice
  const bool vec_r = D % kVec == 0 && aligned16(basis_r);
  auto issue = [&](int64_t s, int b) {
    if (s < steps) {
      TC* st = reinterpret_cast<TC*>(base + lay.stage_off(b));
      const int64_t k0 = k_begin + (s / nds) * kTile, d0 = (s % nds) * kDStep;
#pragma unroll
      for (int q = 0; q < kTile * kPieces / kThreads; ++q) {
        const int u = tid + kThreads * q, kl = u / kPieces, c = (u % kPieces) * kVec;
        const int64_t k = k0 + kl, d = d0 + c;
        TC* dst = st + kl * kSliceLd + c;
        if (vec_r) {
          if (k < k_end && d < D) {
            __pipeline_memcpy_async(dst, basis_r + k * D + d, 16);
          } else {
            const float z[kVec] = {};
            store16(dst, z);
          }
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (k < k_end && d + e < D) {
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
  issue(0, 0);
  issue(1, 1);
  __pipeline_wait_prior(2);  // the tile of T
  __syncthreads();

  // Norms from the tile (a warp per row, the order of aggregate.cu: the same bits).
  for (int il = warp; il < kTile; il += kThreads / 32) {
    const int64_t r = r0 + il;
    float nn = 0.f;
    if (r < r_end) {
      float ss = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float x = to_f(a_sm[il * a_ld + d]);
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
      const TC* tc = a_sm + cl * M * a_ld;
      // u from the resident tile twice (the same sums in the same order: the same values),
      // once for ||u||, once to store u^: u is written once, never read back from global memory
      auto class_sum = [&](int64_t d) {
        float u = 0.f;
        for (int64_t m = 0; m < M; ++m) u = fmaf(s_wn[cl * M + m], to_f(tc[m * a_ld + d]), u);
        return u;
      };
      float uu = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float u = class_sum(d);
        uu = fmaf(u, u, uu);
      }
      const float rc = sqrtf(warp_sum(uu));
      if (lane == 0) agg.r[c] = rc;
      const float rinv = inv_floor(rc);
      for (int64_t d = lane; d < D; d += 32) agg.u32[c * D + d] = class_sum(d) * rinv;
    }
  }

  // The F rows of the tile's classes (class cl - the first, at most 64) for the columns k0 ..
  // k0 + 63 of r into f_sm, each read once per chunk (a warp: 32 consecutive columns of one
  // class), not once per pair of rows as the epilogue would; the caller publishes it.
  const int64_t c_first = r0 / M, ncls = (r_end - 1) / M - c_first + 1;
  auto fill_f = [&](int64_t k0) {
    for (int64_t e = tid; e < ncls * kTile; e += kThreads) {
      const int64_t cl = e / kTile, k = k0 + e % kTile;
      f_sm[e] = k < k_end ? f[(c_first + cl) * rank + k] : 0.f;
    }
  };

  float ninv[kPer], vv[kPer], vf[kPer];
  int64_t cls[kPer];  // the row's class less the tile's first (0 for rows past the end: unused)
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    cls[i] = r < r_end ? r / M - c_first : 0;
    ninv[i] = s_ninv[ty + 16 * i];
    vv[i] = 0.f;
    vf[i] = 0.f;
  }
  // P = T_tile R_chunk^T per 64-wide chunk of r, over D in 32-wide slices.
  __pipeline_wait_prior(1);  // slice 0
  __syncthreads();
  SliceAcc<kMma, TC> acc;
  acc.zero();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t ds = s % nds;
    const TC* ak = a_sm + ds * kDStep;
    acc.add(ak, a_ld, reinterpret_cast<const TC*>(base + lay.stage_off(s & 1)), kSliceLd);
    __pipeline_wait_prior(0);  // slice s + 1
    __syncthreads();
    issue(s + 2, s & 1);  // its stage was read by this step's product
    if (ds == nds - 1) {
      const int64_t k0 = k_begin + (s / nds) * kTile;
      float o[kPer][kPer];
      fill_f(k0);  // the previous chunk's epilogue read f_sm before this step's barrier
      acc.finish(reinterpret_cast<float(*)[kAccLd]>(base + lay.acc_off()), o);
      acc.zero();
      __syncthreads();  // f_sm published
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t k = k0 + tx + 16 * j;
        if (k < k_end) {
          const float ck = basis_c[k];
#pragma unroll
          for (int i = 0; i < kPer; ++i) {
            const float p = o[i][j] * ninv[i];  // (R t^)[k]
            const float v = p + ck;
            const int64_t r = r0 + ty + 16 * i;
            if (proj != nullptr && r < r_end) proj[r * rank + k] = from_f<T>(p);
            vv[i] = fmaf(v, v, vv[i]);
            vf[i] = fmaf(v, f_sm[cls[i] * kTile + tx + 16 * j], vf[i]);
          }
        }
      }
    }
  }
  __pipeline_wait_prior(0);  // nothing left in flight (the tail's commits are empty)
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

}  // namespace

void launch_distill_partial(const DistillArgs& a, int64_t tile_rows, Split split, float* partial, void* proj,
                            float* n_out, FusedAggregate agg, ImageNorms img, unsigned* ticket, cudaStream_t stream) {
  const int64_t rows = a.C * a.M;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, tile_rows) + (img.x != nullptr ? image_norm_blocks(img.B) : 0)),
                  static_cast<unsigned>(split.splits));
  DEMUL_DISPATCH(a.dtype, [&] {
    if (DistillSmem<scalar_t>::fits(a.D, dynamic_smem_budget(kDistillSmemCap))) {  // the tile of T resident in shared memory
      const int64_t smem = DistillSmem<scalar_t>::of(a.D).bytes();
      if (smem > 48 * 1024) {  // the opt-in beyond 48 KB of dynamic shared memory (no sync)
        C10_CUDA_CHECK(cudaFuncSetAttribute(distill_forward_tile_kernel<scalar_t>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      distill_forward_tile_kernel<<<grid, kThreads, smem, stream>>>(
          static_cast<const scalar_t*>(a.t), static_cast<const scalar_t*>(a.basis_r), a.basis_c, a.f, rows, a.M, a.rank, a.D, tile_rows,
          split.cols_per_split, partial, static_cast<scalar_t*>(proj), n_out, agg, img, ticket);
    } else {
      distill_forward_partial_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const scalar_t*>(a.t),
                                                                    static_cast<const scalar_t*>(a.basis_r),
                                                                    a.basis_c, a.f, rows, a.M, a.rank, a.D, tile_rows,
                                                                    split.cols_per_split, partial,
                                                                    static_cast<scalar_t*>(proj), n_out, agg, img, ticket);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace demul

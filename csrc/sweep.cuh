// The backward sweep of the cross-entropy's image side (dL/dx^, d tau; cross_entropy.cu),
// and the chunked product accumulator (ChunkAcc) of every backward product.
//
// For a 64-row tile of A [R, D] it walks over a range of rows of B [J, D] in 64-row chunks:
//   P = A_tile B_chunk^T                       (tile_dot, reduced over D)
//   G[r, j] = epi(P[r, j], r, j)               (the loss's gradient w.r.t. P, in shared memory)
//   out[r, :] += sum_j G[r, j] B[j, :]         (a second product, accumulated in float32)
// Both products run on tensor cores when A or B is 16-bit (G is then rounded to that type,
// as the operands are), in SIMT fp32 when both are float32 (common.cuh).
// So the [R, J] matrix of logits is never stored. Block (x, y) owns rows
// 64x .. 64x+63 of its split y's output, out + y * R * D, for the whole range
// [y * cols_per_split, (y+1) * cols_per_split) of J: no atomics, so the result is
// deterministic; the caller adds the splits in a fixed order (cross_entropy.cu
// sum_normalize_rows_kernel). The output is overwritten (the first chunk stores, later
// chunks add). Each epilogue may also accumulate a per-block scalar (`extra`), summed over
// the block into extra_out[y * gridDim.x + x].
#pragma once

#include "common.cuh"

namespace demul {

// Shared memory of the SIMT sweep: the operand tiles of tile_dot and the B chunk of the
// second product are never live together (barriers separate them), so they share memory;
// G is float32.
struct SimtSweepSmem {
  union {
    DotSmem dot;
    float v[kTile][kTile + 1];
  };
  float g[kTile][kTile + 1];
};

// Shared memory of the tensor-core sweep: G and the B chunk in the operand type TC, the
// product staged through c; the tile_dot operands share memory with the chunk.
template <typename TC>
struct MmaSweepSmem {
  union {
    MmaSmem<TC> dot;
    struct {
      TC v[kTile][kTileLd];
      float c[kTile][kAccLd];
    } prod;
  };
  alignas(32) TC g[kTile][kTileLd];
};

template <typename TA, typename TB>
using SweepSmem =
    std::conditional_t<kUseMma<TA, TB>, MmaSweepSmem<typename MmaType<TA, TB>::type>, SimtSweepSmem>;

// Accumulator of a product summed over 64-wide chunks: o[i][k] += sum_j g[ty + 16 i][j]
// v[j][tx + 16 k] for the chunk in sm.g / sm.v (the caller fills both and publishes them
// with a barrier before add). The SIMT flavour keeps o in registers (fp32 FMAs); the
// tensor-core flavour keeps two WMMA accumulator fragments per warp across chunks and
// hands the epilogue layout over in finish.
template <bool kMma, typename TC>
struct ChunkAcc;

template <typename TC>
struct ChunkAcc<false, TC> {
  float o[kPer][kPer];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int k = 0; k < kPer; ++k) o[i][k] = 0.f;
  }
  __device__ __forceinline__ void add(SimtSweepSmem& sm) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 8
    for (int jl = 0; jl < kTile; ++jl) {
      float gv[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) gv[i] = sm.g[ty + 16 * i][jl];
#pragma unroll
      for (int k = 0; k < kPer; ++k) bv[k] = sm.v[jl][tx + 16 * k];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int k = 0; k < kPer; ++k) o[i][k] = fmaf(gv[i], bv[k], o[i][k]);
    }
  }
  __device__ __forceinline__ void finish(SimtSweepSmem&, float out[kPer][kPer]) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[i][k] = o[i][k];
  }
};

template <typename TC>
struct ChunkAcc<true, TC> {
  AccFrag f[2];
  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(f[0], 0.f);
    nvcuda::wmma::fill_fragment(f[1], 0.f);
  }
  __device__ __forceinline__ void add(MmaSweepSmem<TC>& sm) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, wr = 16 * (warp & 3), wc = 32 * (warp >> 2);
#pragma unroll
    for (int k = 0; k < kTile; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TC, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &sm.g[wr][k], kTileLd);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TC, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &sm.prod.v[k][wc + 16 * h], kTileLd);
        wmma::mma_sync(f[h], fa, fb, f[h]);
      }
    }
  }
  // Contains __syncthreads (the fragments reach the epilogue layout through sm.prod.c).
  __device__ __forceinline__ void finish(MmaSweepSmem<TC>& sm, float out[kPer][kPer]) { unstage(f, sm.prod.c, out); }
};

// Stores into the chunk's operands: g[i][j] (first operand) and v[j][d] (second), rounded
// to the flavour's type.
template <typename TC>
__device__ __forceinline__ void put_g(MmaSweepSmem<TC>& sm, int i, int j, float x) { sm.g[i][j] = from_f<TC>(x); }
__device__ __forceinline__ void put_g(SimtSweepSmem& sm, int i, int j, float x) { sm.g[i][j] = x; }
template <typename TC>
__device__ __forceinline__ void put_v(MmaSweepSmem<TC>& sm, int j, int d, float x) { sm.prod.v[j][d] = from_f<TC>(x); }
__device__ __forceinline__ void put_v(SimtSweepSmem& sm, int j, int d, float x) { sm.v[j][d] = x; }

// o = the product of one chunk (the sweep's second product). Contains __syncthreads for
// the tensor-core flavour.
template <class Smem>
__device__ __forceinline__ void chunk_product(Smem& sm, float o[kPer][kPer]) {
  constexpr bool kMma = !std::is_same_v<Smem, SimtSweepSmem>;
  using TC = std::remove_reference_t<decltype(sm.g[0][0])>;
  ChunkAcc<kMma, TC> acc;
  acc.zero();
  acc.add(sm);
  acc.finish(sm, o);
}

// The power of two that brings a largest magnitude m into [2^13, 2^14) when G is stored in
// float16 (1 for other types, or when m is 0 or not finite); its inverse is exact.
template <typename TG>
__device__ __forceinline__ float storage_scale(float m) {
  if constexpr (std::is_same_v<TG, __half>) {
    if (!(m > 0.f) || !isfinite(m)) return 1.f;
    int e;
    frexpf(m, &e);  // m = f 2^e, f in [0.5, 1)
    return ldexpf(1.f, min(max(14 - e, -100), 100));  // 2^k and 2^-k are normal floats
  } else {
    return 1.f;
  }
}

// G is stored in TG for the second product. float16 has 5 exponent bits: gradients of the
// order of 1/B or 1/(C*M) would fall into its subnormal range and lose their mantissa, so
// for float16 the tile is first scaled by a power of two (exact) that brings its largest
// |G| to [2^13, 2^14); the product is scaled back by the returned factor. float32 and
// bfloat16 (float32's exponent range) store G as it is. Contains __syncthreads for float16.
template <typename TG>
__device__ __forceinline__ float scale_for_storage(float g[kPer][kPer], float* scratch) {
  if constexpr (std::is_same_v<TG, __half>) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) m = fmaxf(m, fabsf(g[i][j]));
    const float up = storage_scale<TG>(block_max(m, scratch));
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) g[i][j] *= up;
    return 1.f / up;
  } else {
    return 1.f;
  }
}

template <typename TA, typename TB, class Epi>
__global__ void __launch_bounds__(kThreads, 1)
sweep_kernel(const TA* __restrict__ A, int64_t R, const TB* __restrict__ B, int64_t J, int64_t D,
             int64_t cols_per_split, Epi epi, float* __restrict__ out, float* __restrict__ extra_out) {
  constexpr bool kMma = kUseMma<TA, TB>;
  using TG = std::conditional_t<kMma, typename MmaType<TA, TB>::type, float>;  // G and chunk storage
  __shared__ SweepSmem<TA, TB> sm;
  __shared__ float scratch[32];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t j_end = j_begin + cols_per_split < J ? j_begin + cols_per_split : J;
  out += static_cast<int64_t>(blockIdx.y) * R * D;
  Epi e = epi;
  e.prepare();
  float extra = 0.f;
  float acc[kPer][kPer];

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTile) {
    tile_dot(A, R, r0, B, J, j0, D, sm.dot, acc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t r = r0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t jj = j0 + tx + 16 * j;
        acc[i][j] = (r < R && jj < j_end) ? e(acc[i][j], r, jj, extra) : 0.f;
      }
    }
    const float unscale = scale_for_storage<TG>(acc, scratch);
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) put_g(sm, ty + 16 * i, tx + 16 * j, acc[i][j]);
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      // B[j0 .. j0+64, d0 .. d0+64] -> the chunk, 64 consecutive threads on one row (coalesced).
      const int ld_d = tid & 63, ld_j = tid >> 6;
#pragma unroll 4
      for (int p = 0; p < kTile / 4; ++p) {
        const int jl = ld_j + 4 * p;
        const int64_t jj = j0 + jl, d = d0 + ld_d;
        put_v(sm, jl, ld_d, (jj < j_end && d < D) ? to_f(B[jj * D + d]) : 0.f);
      }
      __syncthreads();  // also publishes g
      float o[kPer][kPer];
      chunk_product(sm, o);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t r = r0 + ty + 16 * i;
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int64_t d = d0 + tx + 16 * k;
          if (r < R && d < D) {
            // Same thread, same (r, d) in every chunk: it re-reads its own store.
            float* dst = out + r * D + d;
            *dst = (j0 == j_begin ? 0.f : *dst) + o[i][k] * unscale;
          }
        }
      }
      __syncthreads();  // the chunk and g are rewritten next
    }
  }
  if (extra_out != nullptr) {
    const float s = block_sum(extra, scratch);
    if (tid == 0) extra_out[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s;
  }
}

// Online log-sum-exp state merge: (m, l) represents l * exp(m); m = -inf means empty.
__device__ __forceinline__ void lse_merge(float& m, float& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    l = l2;
    return;
  }
  const float mx = fmaxf(m, m2);
  l = l * expf(m - mx) + l2 * expf(m2 - mx);
  m = mx;
}

}  // namespace demul

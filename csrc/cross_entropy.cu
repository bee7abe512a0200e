// Cosine logits + cross-entropy with an online log-sum-exp, docs/SPEC.md section 4 / 4.1 / 4.2.
//
//   s[b,c] = tau <x[b], u[c]> / max(||x[b]||, eps)      (u: class features, float32)
//   L_ce   = (1/B) sum_b (logsumexp_c s[b,:] - sum_c q[b,c] s[b,c]),  q = (1-ls)[c==y_b] + ls/C
// Forward: blocks own 64 images x a range of classes and keep (max, sum-exp, sum q s) per
// row; the merge of the ranges (loss_merge_kernel, shared with the distillation's, one
// launch of several blocks) gives lse and the mean, so the [B, C] logits are written only
// when asked for. Backward, with G = dL/ds = g (softmax(s) - q) / B (+ the logits' own
// gradient, if any): dL/dx^ and dL/dtau by a sweep (sweep.cuh) that recomputes s tile by
// tile; dL/du by two kernels: G^T (scaled by tau / ||x||) is written once ([C, B], small),
// then multiplied by x, a block per 64 x 64 tile of du (no split partials):
//   dL/du[c] = tau sum_b G[b,c] x^[b],  dL/dx^[b] = tau sum_c G[b,c] u[c],
//   dL/dtau  = sum_{b,c} G[b,c] s[b,c] / tau.
// The products run on tensor cores for 16-bit x (the float32 u rounded to x's type), in
// fp32 SIMT for float32 x (common.cuh). Labels are only compared with class indices,
// never used to address memory.
#include "common.cuh"
#include "ops.h"
#include "sweep.cuh"

namespace demul {
namespace {

// Per-(split, image) partial state: max, sum of exp(s - max), sum of q s.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
ce_forward_partial_kernel(const T* __restrict__ x, const float* __restrict__ u, const int64_t* __restrict__ labels,
                          const float* __restrict__ scale, const float* __restrict__ xnorm, float ls, int64_t B,
                          int64_t C, int64_t D, int64_t cols_per_split, T* __restrict__ logits,
                          float* __restrict__ partial, unsigned* __restrict__ ticket) {
  __shared__ TileSmem<T, float> sm;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  if (ticket != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) *ticket = 0u;  // for loss_merge_kernel
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t c_end = c_begin + cols_per_split < C ? c_begin + cols_per_split : C;
  const float tau = scale[0];
  const float q_off = ls / static_cast<float>(C), q_on = 1.f - ls + q_off;
  float rowf[kPer], m[kPer], l[kPer], qs[kPer];
  int64_t lab[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    rowf[i] = r < B ? tau * inv_floor(xnorm[r]) : 0.f;
    lab[i] = r < B ? labels[r] : -1;
    m[i] = -INFINITY;
    l[i] = 0.f;
    qs[i] = 0.f;
  }
  float acc[kPer][kPer];
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTile) {
    tile_dot(x, B, r0, u, C, c0, D, sm, acc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t r = r0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t c = c0 + tx + 16 * j;
        if (c < c_end) {
          const float s = acc[i][j] * rowf[i];
          lse_merge(m[i], l[i], s, 1.f);
          qs[i] = fmaf(c == lab[i] ? q_on : q_off, s, qs[i]);
          if (logits != nullptr && r < B) logits[r * C + c] = from_f<T>(s);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[i], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[i], o);
      lse_merge(m[i], l[i], m2, l2);
    }
    qs[i] = row_sum16(qs[i]);
    const int64_t r = r0 + ty + 16 * i;
    if (tx == 0 && r < B) {
      float* p = partial + (static_cast<int64_t>(blockIdx.y) * B + r) * 3;
      p[0] = m[i];
      p[1] = l[i];
      p[2] = qs[i];
    }
  }
}

// The losses' merge (ops.h launch_loss_merge): blocks 0 .. ce_blocks - 1 take the images
// (group lanes per image over the splits, then a shuffle tree: lse[b] = m + log l, and
// lse - sum q s), the others the distillation's rows (sum v^2 and sum v F over the splits:
// ||z||, cos, 1 - cos). Each block writes its sum; the last block to take a ticket adds the
// blocks' sums (a thread per block sum, then warps, then the 8 warp sums: a fixed order) and
// writes ce = mean_b, dist = mean_i and loss_out.
__global__ void __launch_bounds__(kMergeThreads)
loss_merge_kernel(CeMerge ce, DistillMerge d, MergePlan plan, float alpha, float* __restrict__ loss_out,
                  float* __restrict__ block_partials, unsigned* __restrict__ ticket) {
  __shared__ float scratch[32];
  __shared__ int s_last;
  const int tid = threadIdx.x;
  const int64_t blk = blockIdx.x, nblocks = plan.ce_blocks + plan.distill_blocks;
  float term = 0.f;
  if (blk < plan.ce_blocks) {
    const int g = static_cast<int>(plan.ce_group), sub = tid & (g - 1);
    const int64_t b = blk * (kMergeThreads / g) + tid / g;
    float m = -INFINITY, l = 0.f, qs = 0.f;
    if (b < ce.B)
      for (int64_t s = sub; s < ce.splits; s += g) {
        const float* p = ce.partial + (s * ce.B + b) * 3;
        lse_merge(m, l, p[0], p[1]);
        qs += p[2];
      }
    for (int o = g / 2; o > 0; o >>= 1) {  // block-uniform g: every lane shuffles
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
      lse_merge(m, l, m2, l2);
      qs += __shfl_xor_sync(0xffffffffu, qs, o);
    }
    if (sub == 0 && b < ce.B) {
      const float v = m + logf(l);
      ce.lse[b] = v;
      term = v - qs;
    }
  } else {
    const int g = static_cast<int>(plan.distill_group), sub = tid & (g - 1);
    const int64_t r = (blk - plan.ce_blocks) * (kMergeThreads / g) + tid / g;
    float vv = 0.f, vf = 0.f;
    if (r < d.rows)
      for (int64_t s = sub; s < d.splits; s += g) {
        vv += d.partial[(s * d.rows + r) * 2];
        vf += d.partial[(s * d.rows + r) * 2 + 1];
      }
    for (int o = g / 2; o > 0; o >>= 1) {
      vv += __shfl_xor_sync(0xffffffffu, vv, o);
      vf += __shfl_xor_sync(0xffffffffu, vf, o);
    }
    if (sub == 0 && r < d.rows) {
      const float zn = sqrtf(vv + d.beta[0]);
      const float cs = (vf + d.delta[r / d.M]) * inv_floor(zn);
      d.zn[r] = zn;
      d.cos[r] = cs;
      term = 1.f - cs;
    }
  }
  term = block_sum(term, scratch);
  if (tid == 0) {
    block_partials[blk] = term;
    __threadfence();  // the sum before the ticket
    s_last = atomicAdd(ticket, 1u) == static_cast<unsigned>(nblocks - 1);
  }
  __syncthreads();
  if (!s_last) return;  // the whole block leaves
  __threadfence();
  const volatile float* bp = block_partials;  // the other blocks' sums: not from a stale cache
  float sc = 0.f, sd = 0.f;
  for (int64_t i = tid; i < plan.ce_blocks; i += kMergeThreads) sc += bp[i];
  for (int64_t i = plan.ce_blocks + tid; i < nblocks; i += kMergeThreads) sd += bp[i];
  sc = warp_sum(sc);
  sd = warp_sum(sd);
  constexpr int kWarps = kMergeThreads / 32;
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) {  // scratch was last read by block_sum, before the ticket's barrier
    scratch[warp] = sc;
    scratch[kWarps + warp] = sd;
  }
  __syncthreads();
  if (tid == 0) {
    sc = 0.f;
    sd = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      sc += scratch[w];
      sd += scratch[kWarps + w];
    }
    const float ce_mean = ce.partial != nullptr ? sc / static_cast<float>(ce.B) : 0.f;
    if (ce.partial != nullptr) ce.ce[0] = ce_mean;
    float loss = ce_mean;
    if (d.partial != nullptr) {
      const float mean = sd / static_cast<float>(d.rows);
      d.dist[0] = mean;
      loss = ce_mean + alpha * mean;
    }
    if (loss_out != nullptr) loss_out[0] = loss;
  }
}

// G[b,c] = dL/ds[b,c], shared by both sweeps.
struct CeGrad {
  const float* xnorm;
  const float* lse;
  const int64_t* labels;
  const float* scale;
  const float* grad_logits;  // [B, C] float32 or null
  GradWeight gw;
  float ls;
  int64_t B, C;
  float tau, g_over_b, q_off, q_on;

  __device__ __forceinline__ void prepare() {
    tau = scale[0];
    g_over_b = gw.value() / static_cast<float>(B);
    q_off = ls / static_cast<float>(C);
    q_on = 1.f - ls + q_off;
  }
  // cosine cos = <x^[b], u[c]> -> G
  __device__ __forceinline__ float grad(float cos, int64_t b, int64_t c) const {
    const float s = tau * cos;
    const float q = labels[b] == c ? q_on : q_off;
    float gv = (expf(s - lse[b]) - q) * g_over_b;
    if (grad_logits != nullptr) gv += grad_logits[b * C + c];
    return gv;
  }
};

// Rows are images, columns classes: returns tau G (dL/dx^ = sum_c tau G u[c]) and adds
// G cos to `extra` (dL/dtau).
struct CeImageRows {
  CeGrad g;
  __device__ __forceinline__ void prepare() { g.prepare(); }
  __device__ __forceinline__ float operator()(float dot, int64_t b, int64_t c, float& extra) const {
    const float cos = dot * inv_floor(g.xnorm[b]);
    const float gv = g.grad(cos, b, c);
    extra = fmaf(gv, cos, extra);
    return g.tau * gv;
  }
};

// G^T for the class gradient: gt[c, b] = tau G[b,c] / max(||x[b]||, eps) in TG (a 64 x 64
// tile per block, classes as rows, so that the stores run along b).
template <typename T, typename TG>
__global__ void __launch_bounds__(kThreads, 1)
ce_grad_kernel(const float* __restrict__ u, const T* __restrict__ x, CeGrad g, int64_t D, TG* __restrict__ gt) {
  __shared__ TileSmem<float, T> sm;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, b0 = static_cast<int64_t>(blockIdx.y) * kTile;
  g.prepare();
  float acc[kPer][kPer];
  tile_dot(u, g.C, c0, x, g.B, b0, D, sm, acc);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = c0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t b = b0 + tx + 16 * j;
      if (c < g.C && b < g.B) {
        const float xi = inv_floor(g.xnorm[b]);
        gt[c * g.B + b] = from_f<TG>(g.tau * xi * g.grad(acc[i][j] * xi, b, c));
      }
    }
  }
}

// du[c, d] = sum_b gt[c, b] x[b, d]: block (x, y) owns classes 64x.. and columns 64y.., the
// images in 64-wide chunks (ChunkAcc: tensor cores for 16-bit x, fp32 SIMT for float32).
// For float16 x the float32 gt of the block's classes is scaled by one power of two before
// rounding (sweep.cuh storage_scale), so that small gradients stay out of float16's
// subnormals; the result is scaled back exactly.
template <typename T, typename TG>
__global__ void __launch_bounds__(kThreads, 1)
ce_class_grad_kernel(const TG* __restrict__ gt, const T* __restrict__ x, int64_t B, int64_t C, int64_t D,
                     float* __restrict__ du) {
  constexpr bool kMma = kUseMma<T, float>;
  using TC = std::conditional_t<kMma, typename MmaType<T, float>::type, float>;
  __shared__ SweepSmem<T, float> sm;
  __shared__ float scratch[32];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, d0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int ld_c = tid & 63, ld_r = tid >> 6;  // 64 consecutive threads on one row (coalesced)
  float up = 1.f;
  if constexpr (std::is_same_v<T, __half>) {
    float m = 0.f;
    for (int il = ld_r; il < kTile; il += 4)
      if (c0 + il < C)
        for (int64_t b = ld_c; b < B; b += 64) m = fmaxf(m, fabsf(to_f(gt[(c0 + il) * B + b])));
    up = storage_scale<TC>(block_max(m, scratch));
  }
  ChunkAcc<kMma, TC> acc;
  acc.zero();
  for (int64_t bb = 0; bb < B; bb += kTile) {
#pragma unroll 4
    for (int q = 0; q < kTile / 4; ++q) {
      const int il = ld_r + 4 * q;
      const int64_t c = c0 + il, b = bb + ld_c, d = d0 + ld_c;
      put_g(sm, il, ld_c, (c < C && b < B) ? to_f(gt[c * B + b]) * up : 0.f);
      const int64_t bj = bb + il;  // il doubles as the chunk row of x
      put_v(sm, il, ld_c, (bj < B && d < D) ? to_f(x[bj * D + d]) : 0.f);
    }
    __syncthreads();
    acc.add(sm);
    __syncthreads();
  }
  float o[kPer][kPer];
  acc.finish(sm, o);
  const float down = 1.f / up;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = c0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (c < C && d < D) du[c * D + d] = o[i][j] * down;
    }
  }
}

// dx[b] = normalize_backward(x^[b], dx^[b], <x^[b], dx^[b]>, ||x[b]||) with dx^[b] = sum_s
// partial[s * B * D + b * D + d], the splits added in order (deterministic): the split sum and
// the normalisation backward of the image side in one launch, a block per image (the sums and
// the dot in the order the two kernels took them before: same bits). The row's sums stay in
// shared memory for its first kRowStash columns, the rest go to `spill` ([B, D] float32; the
// thread that writes a value is the one that reads it back).
constexpr int kRowStash = 2048;

template <typename T>
__global__ void __launch_bounds__(kThreads)
sum_normalize_rows_kernel(const float* __restrict__ partial, int64_t splits, int64_t B, int64_t D,
                          const T* __restrict__ x, const float* __restrict__ xnorm, float* spill, T* __restrict__ dx) {
  __shared__ float row[kRowStash];
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x, n = B * D;
  const float nb = xnorm[b], ni = inv_floor(nb);
  float p = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += partial[k * n + b * D + d];
    if (d < kRowStash) {
      row[d] = s;
    } else {
      spill[b * D + d] = s;
    }
    p = fmaf(to_f(x[b * D + d]) * ni, s, p);
  }
  const float dot = block_sum(p, scratch);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float s = d < kRowStash ? row[d] : spill[b * D + d];
    dx[b * D + d] = from_f<T>(normalize_backward(to_f(x[b * D + d]) * ni, s, dot, nb));
  }
}

// out[0] = sum of n partial values (one block).
__global__ void __launch_bounds__(1024) sum_kernel(const float* __restrict__ p, int64_t n, float* __restrict__ out) {
  __shared__ float scratch[32];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += p[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = s;
}

}  // namespace

void launch_ce_partial(const CeArgs& a, Split split, float* partial, void* logits, unsigned* ticket,
                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.B, kTile)), static_cast<unsigned>(split.splits));
  DEMUL_DISPATCH(a.dtype, [&] {
    ce_forward_partial_kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(a.x), a.u, a.labels, a.scale, a.xnorm, a.ls, a.B, a.C, a.D,
        split.cols_per_split, static_cast<scalar_t*>(logits), partial, ticket);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_loss_merge(const CeMerge& ce, const DistillMerge& d, float alpha, float* loss_out,
                       float* block_partials, unsigned* ticket, cudaStream_t stream) {
  const MergePlan plan = merge_plan(ce.partial ? ce.splits : 0, ce.B, d.partial ? d.splits : 0, d.rows);
  loss_merge_kernel<<<static_cast<unsigned>(plan.blocks()), kMergeThreads, 0, stream>>>(ce, d, plan, alpha, loss_out,
                                                                                         block_partials, ticket);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_ce_backward(const CeArgs& a, const float* lse, GradWeight gw, const float* grad_logits, void* dx,
                        float* dxh, Split split_x, float* work_x, float* scale_partial, float* dscale, float* du,
                        void* gt_work, cudaStream_t stream) {
  const CeGrad g{a.xnorm, lse, a.labels, a.scale, grad_logits, gw, a.ls, a.B, a.C, 0.f, 0.f, 0.f, 0.f};
  DEMUL_DISPATCH(a.dtype, [&] {
    const auto* x = static_cast<const scalar_t*>(a.x);
    if (dxh != nullptr) {
      // the sweep's splits (in dxh itself when there is one), then their sum and the
      // normalisation backward in one launch when dx is wanted (else only d tau is)
      float* parts = split_x.splits > 1 ? work_x : dxh;
      const dim3 grid(static_cast<unsigned>(ceil_div(a.B, kTile)), static_cast<unsigned>(split_x.splits));
      sweep_kernel<<<grid, kThreads, 0, stream>>>(x, a.B, a.u, a.C, a.D, split_x.cols_per_split, CeImageRows{g}, parts,
                                                  dscale ? scale_partial : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (dx != nullptr) {
        sum_normalize_rows_kernel<<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
            parts, split_x.splits, a.B, a.D, x, a.xnorm, dxh, static_cast<scalar_t*>(dx));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (dscale != nullptr) {
        sum_kernel<<<1, 1024, 0, stream>>>(scale_partial, split_x.splits * ceil_div(a.B, kTile), dscale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (du != nullptr) {
      // ce_grad_type (ops.h): bfloat16 for bfloat16 features, float32 otherwise
      using TG = std::conditional_t<std::is_same_v<scalar_t, __nv_bfloat16>, __nv_bfloat16, float>;
      auto* gt = static_cast<TG*>(gt_work);
      const dim3 grid_g(static_cast<unsigned>(ceil_div(a.C, kTile)), static_cast<unsigned>(ceil_div(a.B, kTile)));
      ce_grad_kernel<<<grid_g, kThreads, 0, stream>>>(a.u, x, g, a.D, gt);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grid_u(static_cast<unsigned>(ceil_div(a.C, kTile)), static_cast<unsigned>(ceil_div(a.D, kTile)));
      ce_class_grad_kernel<<<grid_u, kThreads, 0, stream>>>(static_cast<const TG*>(gt), x, a.B, a.C, a.D, du);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace demul

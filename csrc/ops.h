// Kernel launchers of the extension (defined in the .cu files), on raw pointers so that the
// .cu files need no PyTorch headers (they compile in seconds). bindings.cpp checks the
// tensors, allocates outputs and scratch, and calls these with the current CUDA stream.
// None of them synchronises with the host. Shapes follow docs/SPEC.md section 2: C classes,
// M prompts, D joint dim, B images, r = min(K, D) the rank of the distillation basis
// (SPEC 4.3), C * M prompt rows. "Features" pointers
// (t, x, w, v, out, dt, dv, logits) and the distillation basis R have the DType; every other
// pointer is float32.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace demul {

enum class DType : int { kFloat, kHalf, kBFloat16 };

// Rows of one GEMM-shaped block; also the granularity of the split over columns.
constexpr int64_t kTileRows = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scalar gradient weight of a loss, read on the device (no host sync):
// ca * a[0] + cb * b[0], a null pointer counting as zero.
struct GradWeight {
  const float* a;
  const float* b;
  float ca;
  float cb;
#ifdef __CUDACC__
  __device__ __forceinline__ float value() const { return (a ? ca * a[0] : 0.f) + (b ? cb * b[0] : 0.f); }
#endif
};

// How a row-reducing forward kernel splits its columns over blocks: enough blocks to fill
// the device about twice, every split non-empty.
struct Split {
  int64_t splits;
  int64_t cols_per_split;
};

inline Split split_into(int64_t cols, int64_t want) {
  const int64_t col_tiles = ceil_div(cols, kTileRows);
  const int64_t per = ceil_div(col_tiles, std::min<int64_t>(col_tiles, std::max<int64_t>(1, want))) * kTileRows;
  return {ceil_div(cols, per), per};
}

// rows are cut into blocks of tile_rows (64, or fewer for the distillation's whole classes).
inline Split plan_split(int64_t rows, int64_t cols, int64_t sms, int64_t tile_rows = kTileRows) {
  return split_into(cols, ceil_div(2 * sms, ceil_div(rows, tile_rows)));
}

// The backward sweeps' split: every extra split writes (and the sum reads) a whole float32
// [rows, D] partial, so split only as far as one wave of blocks needs (none once the row
// tiles alone fill the SMs).
inline Split plan_sweep_split(int64_t rows, int64_t cols, int64_t sms) {
  return split_into(cols, sms / ceil_div(rows, kTileRows));
}

// norm[r] = ||v[r]|| for v: [R, D].
void launch_row_norms(DType dt, const void* v, int64_t R, int64_t D, float* norm, cudaStream_t stream);


// t: [C, M, D], a: [C, M] -> u32 [C, D] (u^), w, n [C, M], r [C]; out [C, D] (u^ in t's dtype) if non-null.
void launch_aggregate_forward(DType dt, const void* t, const float* a, int64_t C, int64_t M, int64_t D, void* out,
                              float* u32, float* w, float* n, float* r, cudaStream_t stream);

// Cosine cross-entropy operands: x [B, D], u [C, D] (class features, float32), labels [B]
// int64, scale [1], xnorm [B] = ||x||.
struct CeArgs {
  DType dtype;
  const void* x;
  const float* u;
  const int64_t* labels;
  const float* scale;
  const float* xnorm;
  float ls;
  int64_t B, C, D;
};

// partial: [split.splits, B, 3] scratch (per split and image: max, sum of exp, sum of q s);
// logits [B, C] when non-null; *ticket = 0 when ticket is non-null (launch_loss_merge's
// counter, zeroed on the stream by the kernel before the merge). Then launch_loss_merge.
void launch_ce_partial(const CeArgs& a, Split split, float* partial, void* logits, unsigned* ticket,
                       cudaStream_t stream);

// dx [B, D] = dL/dx in x's type (the normalisation backward of dL/dx^ applied), dscale [1],
// du [C, D] = dL/du; each null when not wanted. dxh: B * D floats of work, required when dx or
// dscale is wanted (the sweep's output with one split, the spill of rows past 2048 columns).
// The dL/dx^ sweep splits the classes by split_x (work_x: split_x.splits * B * D floats if
// split_x.splits > 1; scale_partial: split_x.splits * ceil(B / 64) floats if dscale); one more
// launch adds the splits and applies the normalisation backward. du takes two kernels: G^T =
// dL/ds^T [C, B] into gt_work (ce_grad_elements(B, C) elements of ce_grad_type(dtype)), then
// du = G^T x.
void launch_ce_backward(const CeArgs& a, const float* lse, GradWeight gw, const float* grad_logits, void* dx,
                        float* dxh, Split split_x, float* work_x, float* scale_partial, float* dscale, float* du,
                        void* gt_work, cudaStream_t stream);

// The stored dL/ds of the du product: bfloat16 for bfloat16 features (float32's exponent
// range: no scaling needed), float32 otherwise (float16 is rounded per block after a
// power-of-two scaling, see sweep.cuh).
inline DType ce_grad_type(DType features) { return features == DType::kBFloat16 ? DType::kBFloat16 : DType::kFloat; }

// Distillation operands (SPEC 4.3): t [C, M, D] and the frozen-phi basis: basis_r [r, D]
// (R, in t's dtype: the products' operand, cast once per basis by the caller), and float32
// basis_c [r] (c), f [C, r] (F), delta [C], beta [1]. The forward takes the norms of t
// itself; the backward is launch_text_backward's.
struct DistillArgs {
  DType dtype;
  const void* t;
  const void* basis_r;
  const float* basis_c;
  const float* f;
  const float* delta;
  const float* beta;
  int64_t C, M, D, rank;
};

// The aggregation fused into the distillation's forward (a null: not fused): logits a
// [C, M] -> w [C, M], ||u|| r [C], u^ u32 [C, D] float32.
struct FusedAggregate {
  const float* a;
  float* w;
  float* r;
  float* u32;
};

// The image features' norms taken by extra blocks of the distillation's forward (x null:
// none): x [B, D] in t's dtype -> norm [B] = ||x||, 64 rows per block (a warp per row, the
// bits of launch_row_norms), so that the head's forward needs no launch of its own for them.
struct ImageNorms {
  const void* x;
  int64_t B;
  float* norm;
};
inline int64_t image_norm_blocks(int64_t B) { return ceil_div(B, kTileRows); }

// Rows per block of the distillation's forward: whole classes (the largest multiple of M
// up to 64) when M <= 64, so that the aggregation can be fused; 64 otherwise (not fused).
inline bool can_fuse_aggregate(int64_t M) { return M <= kTileRows; }
inline int64_t distill_tile_rows(int64_t M) { return can_fuse_aggregate(M) ? (kTileRows / M) * M : kTileRows; }

// The launch plan, one place: bindings.cpp asks these when it launches, and the extension
// exports them (head_launch_plan) for the compiled-code report (benchmarks/compiled_cuda.py).
inline Split ce_forward_split(int64_t B, int64_t C, int64_t sms) { return plan_split(B, C, sms); }
inline int64_t distill_rows_per_block(bool fused_aggregate, int64_t M) {
  return fused_aggregate ? distill_tile_rows(M) : kTileRows;
}
inline Split distill_split(int64_t CM, int64_t rank, int64_t sms, int64_t tile_rows) {
  return plan_split(CM, rank, sms, tile_rows);
}
inline Split ce_image_split(int64_t B, int64_t C, int64_t sms) { return plan_sweep_split(B, C, sms); }
// The text backward's groups of 64-wide column chunks of dT (text_head.cu): each block
// builds its rows' G once and reuses it over its group, so split D only as far as one wave
// of blocks needs, and keep at least two chunks per group (G built at most once per two
// chunks); one group when the row tiles alone fill the SMs.
inline Split text_backward_split(int64_t CM, int64_t D, int64_t sms) {
  return split_into(D, std::min(sms / ceil_div(CM, kTileRows), ceil_div(ceil_div(D, kTileRows), 2)));
}

// partial: [split.splits, C*M, 2] scratch; n_out [C*M] = ||t|| when non-null; proj
// [C*M, r] = R t^ in t's dtype (for the fused backward, launch_text_backward) when non-null;
// agg (tile_rows a multiple of M) the fused aggregation; img the image norms (grid x grows by
// image_norm_blocks(B), those blocks of split 0 take them, the others leave); *ticket = 0 when
// ticket is non-null (as launch_ce_partial). Then launch_loss_merge.
void launch_distill_partial(const DistillArgs& a, int64_t tile_rows, Split split, float* partial, void* proj,
                            float* n_out, FusedAggregate agg, ImageNorms img, unsigned* ticket, cudaStream_t stream);

// The merge of the forwards' partial states into the losses, both in one launch of several
// blocks (cross_entropy.cu loss_merge_kernel): `group` lanes per row (a power of two, up to
// 32) merge its splits, a shuffle tree joins them; each block writes its share of the loss
// sum, and the last block to finish (a ticket: an atomic counter that the kernel launched just
// before zeroed, no host sync) adds the blocks' shares in block order: deterministic.
constexpr int64_t kMergeThreads = 256;
inline int64_t merge_group(int64_t splits) {
  int64_t g = 1;
  while (g < splits && g < 32) g *= 2;
  return g;
}
// The cross-entropy's part (partial null: none): [splits, B, 3] -> lse [B], ce [1].
struct CeMerge {
  const float* partial;
  int64_t splits, B;
  float* lse;
  float* ce;
};
// The distillation's part (partial null: none): [splits, C*M, 2] -> cos, zn [C*M], dist [1].
struct DistillMerge {
  const float* partial;
  int64_t splits, rows, M;
  const float* delta;
  const float* beta;
  float* cos;
  float* zn;
  float* dist;
};
struct MergePlan {
  int64_t ce_group, ce_blocks, distill_group, distill_blocks;
  int64_t blocks() const { return ce_blocks + distill_blocks; }
};
// splits == 0: that part is absent.
inline MergePlan merge_plan(int64_t ce_splits, int64_t B, int64_t distill_splits, int64_t rows) {
  const int64_t gc = merge_group(ce_splits), gd = merge_group(distill_splits);
  return {gc, ce_splits > 0 ? ceil_div(B, kMergeThreads / gc) : 0, gd,
          distill_splits > 0 ? ceil_div(rows, kMergeThreads / gd) : 0};
}
// -> the parts' outputs; loss_out [1] (when non-null) = ce + alpha * dist (ce alone without the
// distillation). block_partials: plan.blocks() floats of scratch; ticket: zeroed by the kernel
// launched before this one on the stream (launch_ce_partial / launch_distill_partial).
void launch_loss_merge(const CeMerge& ce, const DistillMerge& d, float alpha, float* loss_out,
                       float* block_partials, unsigned* ticket, cudaStream_t stream);

// The fused backward of the text side (text_head.cu): the aggregation's (SPEC 4.1) and the
// distillation's (SPEC 4.3) in one kernel; block (x, y) owns rows 64x .. 64x+63 and the
// y-th group of `columns` (text_backward_split) of dT.
struct TextBackwardArgs {
  DType dtype;
  const void* t;  // [C, M, D]
  const float* n;  // [C*M] ||t||
  // aggregation (g null: none): dL/du^ [C, D], u^ [C, D], w [C*M], ||u|| [C]
  const float* g;
  const float* u32;
  const float* w;
  const float* r;
  // distillation (proj null: none): proj [C*M, r] = R t^ in t's dtype (the forward's), the
  // basis R [r, D] in t's dtype, c [r], F [C, r], the saved cos and ||z|| [C*M], the loss
  // weight
  const void* proj;
  const void* basis_r;
  const float* basis_c;
  const float* f;
  const float* cos;
  const float* zn;
  GradWeight gw;
  int64_t C, M, D, rank;
};

// Whether the text backward takes dA itself (every class within one 64-row tile: M divides
// 64), instead of a second kernel over the dw it stores.
inline bool text_backward_takes_prompt_logits(int64_t M) { return kTileRows % M == 0; }

// -> dt [C, M, D] in t's dtype; with the aggregation also da [C, M] (dw: C*M floats scratch,
// needed only when !text_backward_takes_prompt_logits(M), else null).
void launch_text_backward(const TextBackwardArgs& a, Split columns, void* dt, float* dw, float* da,
                          cudaStream_t stream);

// The decisions of one demul_head forward + backward with the distillation (C classes, M
// prompts, B images, basis rank r) on a device of `sms` SMs.
struct HeadPlan {
  int64_t tile_rows;          // kTileRows
  bool fused_aggregate;       // the aggregation rides on the distillation's forward
  int64_t distill_tile_rows;  // rows per block of the distillation's forward
  Split distill;              // its split of r
  Split ce;                   // the cross-entropy forward's split of the classes
  Split ce_image;             // the dL/dx^ sweep's split of the classes (X trained)
  Split text_backward;        // the text backward's groups of column chunks of dT (D wide)
  bool image_norms_fused;     // ||x|| by extra blocks of the distillation's forward (no launch)
  MergePlan merge;            // the losses' merge (cross-entropy and distillation)
  bool prompt_logits_fused;   // dA taken by the text backward (no prompt-logits kernel)
};

inline HeadPlan plan_head(int64_t C, int64_t M, int64_t B, int64_t rank, int64_t D, int64_t sms) {
  const bool fused = can_fuse_aggregate(M);
  const int64_t rows = distill_rows_per_block(fused, M);
  const Split dist = distill_split(C * M, rank, sms, rows), ce = ce_forward_split(B, C, sms);
  return {kTileRows, fused, rows, dist, ce, ce_image_split(B, C, sms), text_backward_split(C * M, D, sms), true,
          merge_plan(ce.splits, B, dist.splits, C * M), text_backward_takes_prompt_logits(M)};
}

}  // namespace demul

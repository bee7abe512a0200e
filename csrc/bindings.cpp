// Entry points of demul_fast._C: argument checks (each error names the argument), output
// allocation, and the DeMul head chained from the kernels of aggregate.cu,
// cross_entropy.cu and distill.cu (docs/SPEC.md section 4). Everything runs on the current
// CUDA stream without a host synchronisation.
//
// Dtypes: the features (text_features, image_features) are float32, bfloat16 or float16,
// both alike, and so is the distillation basis' R (the products' operand); the other small
// operands (prompt_logits, class_features, the rest of the basis of SPEC 4.3, scale, gradient
// scalars) and saved statistics are float32; losses are float32
// 0-dim tensors. Unused outputs are empty tensors. Saved statistics come in SPEC order:
// n = ||t||, w, r = ||u||, lse, ||x||, ||z||, cos (those kept), then u^ in float32.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace demul {
namespace {

using OptTensor = std::optional<at::Tensor>;

#ifndef DEMUL_MAX_PROMPTS
#error "DEMUL_MAX_PROMPTS (demul_fast.common.MAX_PROMPTS) must be defined by the build (setup.py)"
#endif
constexpr int64_t kMaxPrompts = DEMUL_MAX_PROMPTS;  // the aggregation kernels keep 2 * M floats in shared memory

at::TensorOptions f32(const at::Tensor& like) { return like.options().dtype(at::kFloat); }
at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }
float* fp(at::Tensor& t) { return t.data_ptr<float>(); }
const float* cfp(const at::Tensor& t) { return t.data_ptr<float>(); }
const void* cvp(const at::Tensor& t) { return t.data_ptr(); }
cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat;  // the checks admitted only float32 otherwise
  }
}

CeArgs ce_args(const at::Tensor& x, const at::Tensor& u32, const at::Tensor& labels, const at::Tensor& scale,
               const at::Tensor& xnorm, double ls) {
  return {dtype_of(x), x.data_ptr(), cfp(u32), labels.data_ptr<int64_t>(), cfp(scale), cfp(xnorm),
          static_cast<float>(ls), x.size(0), u32.size(0), x.size(1)};
}

// The frozen-phi basis of SPEC 4.3 (demul_fast.ops.distill_basis.DistillBasis): R in
// text_features' dtype, the rest float32.
struct Basis {
  at::Tensor R, c, F, delta, beta;  // [r, D], [r], [C, r], [C], []
};

DistillArgs distill_args(const at::Tensor& t, const Basis& b) {
  return {dtype_of(t), t.data_ptr(), cvp(b.R), cfp(b.c), cfp(b.F), cfp(b.delta), cfp(b.beta),
          t.size(0), t.size(1), t.size(2), b.R.size(0)};
}

// A forward's partial pass (launch_ce_partial, launch_distill_partial): the split and the
// partial states, for the losses' merge.
struct Partial {
  Split split;
  at::Tensor partial;
};

// The counter of the losses' merge (launch_loss_merge's ticket): one int32, zeroed on the
// stream by the partial kernel launched just before the merge (each call its own).
struct Ticket {
  at::Tensor holder;
  unsigned* ptr() { return reinterpret_cast<unsigned*>(holder.data_ptr<int32_t>()); }
};
Ticket make_ticket(const at::Tensor& like) { return {at::empty({1}, like.options().dtype(at::kInt))}; }

// The cross-entropy's partial pass (and the logits) from x and u32; ticket zeroed if non-null.
Partial run_ce_partial(const CeArgs& a, const at::Tensor& like, void* logits, unsigned* ticket) {
  const Split split = ce_forward_split(a.B, a.C, sm_count());
  at::Tensor partial = at::empty({split.splits, a.B, 3}, f32(like));
  launch_ce_partial(a, split, fp(partial), logits, ticket, stream());
  return {split, partial};
}

// The distillation's partial pass (and the image norms, img.x non-null); ticket zeroed if non-null.
Partial run_distill_partial(const DistillArgs& a, const at::Tensor& like, void* proj, float* n_out,
                            FusedAggregate agg, ImageNorms img, unsigned* ticket) {
  const int64_t tile_rows = distill_rows_per_block(agg.a != nullptr, a.M);
  const Split split = distill_split(a.C * a.M, a.rank, sm_count(), tile_rows);
  at::Tensor partial = at::empty({split.splits, a.C * a.M, 2}, f32(like));
  launch_distill_partial(a, tile_rows, split, fp(partial), proj, n_out, agg, img, ticket, stream());
  return {split, partial};
}

// The losses' merge, one launch: the cross-entropy's part (ce_part null: none) -> lse, ce; the
// distillation's (dist_part null: none) -> cos, zn, dist; loss_out = ce + alpha dist if non-null.
void run_loss_merge(const at::Tensor& like, const Partial* ce_part, float* lse, float* ce, int64_t B,
                    const DistillArgs* da, const Partial* dist_part, float* cos, float* zn, float* dist, float alpha,
                    float* loss_out, unsigned* ticket) {
  const CeMerge cm{ce_part ? cfp(ce_part->partial) : nullptr, ce_part ? ce_part->split.splits : 0,
                   ce_part ? B : 0, lse, ce};
  const DistillMerge dm{dist_part ? cfp(dist_part->partial) : nullptr, dist_part ? dist_part->split.splits : 0,
                        dist_part ? da->C * da->M : 0, dist_part ? da->M : 1, dist_part ? da->delta : nullptr,
                        dist_part ? da->beta : nullptr, cos, zn, dist};
  const MergePlan plan = merge_plan(cm.splits, cm.B, dm.splits, dm.rows);
  at::Tensor block_partials = at::empty({plan.blocks()}, f32(like));
  launch_loss_merge(cm, dm, alpha, loss_out, fp(block_partials), ticket, stream());
}

// Float32 scratch of n floats, or an undefined tensor (null pointer) when n == 0.
float* scratch(at::Tensor& holder, int64_t n, const at::Tensor& like) {
  if (n == 0) return nullptr;
  holder = at::empty({n}, f32(like));
  return fp(holder);
}

// The fused text backward (aggregation with dL/du^ = g [C, D] float32 if g, distillation
// from the forward's proj if proj) -> dt (t's dtype), da [C, M] float32 if g.
void run_text_backward(const at::Tensor& t, const at::Tensor& n, const float* g, const float* u32, const float* w,
                       const float* r, const Basis* basis, const at::Tensor* proj, const float* cos, const float* zn,
                       GradWeight gw, at::Tensor& dt, float* da) {
  TextBackwardArgs a{dtype_of(t), t.data_ptr(), cfp(n), g, u32, w, r,
                     proj ? proj->data_ptr() : nullptr,
                     basis ? cvp(basis->R) : nullptr, basis ? cfp(basis->c) : nullptr, basis ? cfp(basis->F) : nullptr,
                     cos, zn, gw, t.size(0), t.size(1), t.size(2), basis ? basis->R.size(0) : 0};
  at::Tensor dw;
  float* dw_ptr = g && !text_backward_takes_prompt_logits(a.M) ? scratch(dw, t.size(0) * t.size(1), t) : nullptr;
  launch_text_backward(a, text_backward_split(a.C * a.M, a.D, sm_count()), dt.data_ptr(), dw_ptr, da, stream());
}

// Backward of the cross-entropy into dxh (dL/dx^, also when only dscale is wanted), du, dscale.
// dx (dL/dx in x's type, the image side's normalisation backward applied), du and dscale,
// each written where given.
void run_ce_backward(const CeArgs& a, const at::Tensor& like, const at::Tensor& lse, GradWeight gw,
                     const float* grad_logits, at::Tensor* dx, at::Tensor* du, at::Tensor* dscale) {
  at::Tensor dxh_buf, partial, work_x, gt;
  float* dxh_ptr = dx != nullptr || dscale != nullptr ? scratch(dxh_buf, a.B * a.D, like) : nullptr;
  const Split split_x = ce_image_split(a.B, a.C, sm_count());
  float* wx = dxh_ptr && split_x.splits > 1 ? scratch(work_x, split_x.splits * a.B * a.D, like) : nullptr;
  float* sp = dscale ? scratch(partial, split_x.splits * ceil_div(a.B, kTileRows), like) : nullptr;
  if (du != nullptr)  // dL/ds transposed, [C, B]
    gt = at::empty({a.C, a.B}, like.options().dtype(ce_grad_type(a.dtype) == DType::kBFloat16 ? at::kBFloat16
                                                                                              : at::kFloat));
  launch_ce_backward(a, cfp(lse), gw, grad_logits, dx ? dx->data_ptr() : nullptr, dxh_ptr, split_x, wx, sp,
                     dscale ? fp(*dscale) : nullptr, du ? fp(*du) : nullptr, du ? gt.data_ptr() : nullptr, stream());
}

void check_text(const at::Tensor& t) {
  check_features(t, "text_features", 3, "[C, M, D]");
  TORCH_CHECK(t.size(1) <= kMaxPrompts, "text_features has M=", t.size(1), " prompts, at most ", kMaxPrompts,
              " are supported");
}

void check_labels(const at::Tensor& labels, const at::Tensor& x) {
  check_input(labels, "labels", 1, "[B]");
  check_dtype(labels, "labels", at::kLong);
  check_same_device(labels, "labels", x, "image_features");
  check_size(labels, 0, x.size(0), "labels", "B");
}

void check_aggregate_saved(const at::Tensor& t, const at::Tensor& w, const at::Tensor& n, const at::Tensor& r,
                           const at::Tensor& u32) {
  const int64_t C = t.size(0), M = t.size(1), D = t.size(2);
  check_f32(w, "prompt_weights", 2, "[C, M]");
  check_f32(n, "prompt_norms", 2, "[C, M]");
  check_f32(r, "class_norms", 1, "[C]");
  check_f32(u32, "class_features", 2, "[C, D]");
  for (const auto* p : {&w, &n, &r, &u32}) check_same_device(*p, "a saved statistic", t, "text_features");
  check_size(w, 0, C, "prompt_weights", "C");
  check_size(w, 1, M, "prompt_weights", "M");
  check_size(n, 0, C, "prompt_norms", "C");
  check_size(n, 1, M, "prompt_norms", "M");
  check_size(r, 0, C, "class_norms", "C");
  check_size(u32, 0, C, "class_features", "C");
  check_size(u32, 1, D, "class_features", "D");
}

// The basis of SPEC 4.3 for text_features [C, M, D]: R [r, D] in text_features' dtype (the
// kernels' product operand, staged as it is: demul_fast/ops/cuda_ops.py casts it once per
// basis), c [r], F [C, r], delta [C], beta [] (1 element) float32, all on text_features' device.
Basis check_basis(const at::Tensor& t, const at::Tensor& R, const at::Tensor& c, const at::Tensor& F,
                  const at::Tensor& delta, const at::Tensor& beta) {
  check_input(R, "basis.R", 2, "[r, D]");
  TORCH_CHECK(R.scalar_type() == t.scalar_type(), "basis.R must have the dtype of text_features (",
              t.scalar_type(), "), got ", R.scalar_type());
  check_size(R, 1, t.size(2), "basis.R", "D");
  const int64_t rank = R.size(0);
  check_f32(c, "basis.c", 1, "[r]");
  check_size(c, 0, rank, "basis.c", "r");
  check_f32(F, "basis.F", 2, "[C, r]");
  check_size(F, 0, t.size(0), "basis.F", "C");
  check_size(F, 1, rank, "basis.F", "r");
  check_f32(delta, "basis.delta", 1, "[C]");
  check_size(delta, 0, t.size(0), "basis.delta", "C");
  TORCH_CHECK(beta.defined() && beta.numel() == 1, "basis.beta must be a 1-element tensor");
  TORCH_CHECK(beta.is_cuda(), "basis.beta must be a CUDA tensor, got a tensor on ", beta.device());
  check_dtype(beta, "basis.beta", at::kFloat);
  check_same_device(R, "basis.R", t, "text_features");
  check_same_device(c, "basis.c", t, "text_features");
  check_same_device(F, "basis.F", t, "text_features");
  check_same_device(delta, "basis.delta", t, "text_features");
  check_same_device(beta, "basis.beta", t, "text_features");
  return {R, c, F, delta, beta};
}

// All five basis tensors or none of them -> the checked basis, or nullopt.
std::optional<Basis> check_opt_basis(const at::Tensor& t, const OptTensor& R, const OptTensor& c,
                                     const OptTensor& F, const OptTensor& delta, const OptTensor& beta) {
  const int given = has(R) + has(c) + has(F) + has(delta) + has(beta);
  TORCH_CHECK(given == 0 || given == 5, "the distillation basis needs all of R, c, F, delta, beta, got ", given,
              " of them");
  if (given == 0) return std::nullopt;
  return check_basis(t, *R, *c, *F, *delta, *beta);
}

void check_distill_saved(const at::Tensor& t, const at::Tensor& n, const at::Tensor& zn, const at::Tensor& cos) {
  const int64_t R = t.size(0) * t.size(1);
  check_f32(zn, "projection_norms", 1, "[C*M]");
  check_f32(cos, "prompt_cosines", 1, "[C*M]");
  TORCH_CHECK(n.numel() == R && n.scalar_type() == at::kFloat && n.is_contiguous() && n.is_cuda(),
              "prompt_norms must be a contiguous float32 CUDA tensor of C*M=", R, " elements");
  for (const auto* p : {&cos, &zn, &n}) check_same_device(*p, "a saved statistic", t, "text_features");
  check_size(cos, 0, R, "prompt_cosines", "C*M");
  check_size(zn, 0, R, "projection_norms", "C*M");
}

// p = R t^ saved by a forward: [C*M, r] in text_features' dtype, contiguous, on its device.
void check_projections(const at::Tensor& t, const Basis& basis, const at::Tensor& proj) {
  TORCH_CHECK(proj.dim() == 2 && proj.size(0) == t.size(0) * t.size(1) && proj.size(1) == basis.R.size(0) &&
                  proj.scalar_type() == t.scalar_type() && proj.is_contiguous(),
              "prompt_projections must be a contiguous [C*M, r] tensor of text_features' dtype, got ", proj.sizes(),
              " ", proj.scalar_type());
  check_same_device(proj, "prompt_projections", t, "text_features");
}

void check_image_side(const at::Tensor& t, const at::Tensor& x, const at::Tensor& labels, const at::Tensor& scale) {
  check_features(x, "image_features", 2, "[B, D]");
  check_same_device(x, "image_features", t, "text_features");
  TORCH_CHECK(x.scalar_type() == t.scalar_type(), "image_features (", x.scalar_type(),
              ") must have the dtype of text_features (", t.scalar_type(), ")");
  check_size(x, 1, t.size(2), "image_features", "D");
  check_labels(labels, x);
  check_scale(scale, x, "image_features");
}

}  // namespace

// -> [class features [C, D] (text_features' dtype), n [C, M], w [C, M], r [C], u^ float32 [C, D]]
std::vector<at::Tensor> aggregate_prompts_forward(const at::Tensor& text_features, const at::Tensor& prompt_logits) {
  check_text(text_features);
  check_f32(prompt_logits, "prompt_logits", 2, "[C, M]");
  check_same_device(prompt_logits, "prompt_logits", text_features, "text_features");
  check_size(prompt_logits, 0, text_features.size(0), "prompt_logits", "C");
  check_size(prompt_logits, 1, text_features.size(1), "prompt_logits", "M");
  const c10::cuda::OptionalCUDAGuard guard(text_features.device());
  const int64_t C = text_features.size(0), M = text_features.size(1), D = text_features.size(2);
  at::Tensor out = at::empty({C, D}, text_features.options());
  at::Tensor u32 = at::empty({C, D}, f32(text_features));
  at::Tensor w = at::empty({C, M}, f32(text_features));
  at::Tensor n = at::empty({C, M}, f32(text_features));
  at::Tensor r = at::empty({C}, f32(text_features));
  launch_aggregate_forward(dtype_of(text_features), text_features.data_ptr(), cfp(prompt_logits), C, M, D,
                           out.data_ptr(), fp(u32), fp(w), fp(n), fp(r), stream());
  return {out, n, w, r, u32};
}

// grad_class_features: [C, D] float32 (dL/du^) -> [dL/dtext_features, dL/dprompt_logits (float32)]
std::vector<at::Tensor> aggregate_prompts_backward(const at::Tensor& grad_class_features, const at::Tensor& text_features,
                                           const at::Tensor& n, const at::Tensor& w, const at::Tensor& r,
                                           const at::Tensor& u32) {
  check_text(text_features);
  check_aggregate_saved(text_features, w, n, r, u32);
  check_f32(grad_class_features, "grad_class_features", 2, "[C, D]");
  check_same_device(grad_class_features, "grad_class_features", text_features, "text_features");
  TORCH_CHECK(grad_class_features.sizes() == u32.sizes(), "grad_class_features must have shape ", u32.sizes(),
              ", got ", grad_class_features.sizes());
  const c10::cuda::OptionalCUDAGuard guard(text_features.device());
  at::Tensor dt = at::empty_like(text_features);
  at::Tensor da = at::empty_like(w);
  run_text_backward(text_features, n, cfp(grad_class_features), cfp(u32), cfp(w), cfp(r), nullptr, nullptr, nullptr,
                    nullptr, GradWeight{nullptr, nullptr, 0.f, 0.f}, dt, fp(da));
  return {dt, da};
}

// class_features: [C, D] float32 -> [ce [], lse [B], ||x|| [B]]
std::vector<at::Tensor> cosine_cross_entropy_forward(const at::Tensor& image_features, const at::Tensor& class_features,
                                              const at::Tensor& labels, const at::Tensor& scale,
                                              double label_smoothing) {
  check_features(image_features, "image_features", 2, "[B, D]");
  check_f32(class_features, "class_features", 2, "[C, D]");
  check_same_device(class_features, "class_features", image_features, "image_features");
  check_size(class_features, 1, image_features.size(1), "class_features", "D");
  check_labels(labels, image_features);
  check_scale(scale, image_features, "image_features");
  const c10::cuda::OptionalCUDAGuard guard(image_features.device());
  const int64_t B = image_features.size(0), D = image_features.size(1);
  at::Tensor xnorm = at::empty({B}, f32(image_features));
  at::Tensor lse = at::empty({B}, f32(image_features));
  at::Tensor ce = at::empty({}, f32(image_features));
  launch_row_norms(dtype_of(image_features), image_features.data_ptr(), B, D, fp(xnorm), stream());
  Ticket ticket = make_ticket(image_features);
  const Partial part = run_ce_partial(ce_args(image_features, class_features, labels, scale, xnorm, label_smoothing),
                                      image_features, nullptr, ticket.ptr());
  run_loss_merge(image_features, &part, fp(lse), fp(ce), B, nullptr, nullptr, nullptr, nullptr, nullptr, 0.f, nullptr,
                 ticket.ptr());
  return {ce, lse, xnorm};
}

// -> [dL/dimage_features or empty, dL/dclass_features (float32) or empty, dL/dscale [] or empty]
std::vector<at::Tensor> cosine_cross_entropy_backward(const OptTensor& grad_loss, const at::Tensor& image_features,
                                               const at::Tensor& class_features, const at::Tensor& labels,
                                               const at::Tensor& scale, double label_smoothing, const at::Tensor& lse,
                                               const at::Tensor& xnorm, bool need_image, bool need_class,
                                               bool need_scale) {
  check_features(image_features, "image_features", 2, "[B, D]");
  check_f32(class_features, "class_features", 2, "[C, D]");
  check_same_device(class_features, "class_features", image_features, "image_features");
  check_size(class_features, 1, image_features.size(1), "class_features", "D");
  check_labels(labels, image_features);
  check_scale(scale, image_features, "image_features");
  check_grad_scalar(grad_loss, "grad_loss", image_features);
  const int64_t B = image_features.size(0), D = image_features.size(1), C = class_features.size(0);
  check_f32(lse, "lse", 1, "[B]");
  check_f32(xnorm, "image_norms", 1, "[B]");
  check_size(lse, 0, B, "lse", "B");
  check_size(xnorm, 0, B, "image_norms", "B");
  const c10::cuda::OptionalCUDAGuard guard(image_features.device());
  at::Tensor dx = need_image ? at::empty_like(image_features) : empty0(image_features);
  at::Tensor du = need_class ? at::empty({C, D}, f32(image_features)) : empty0(class_features);
  at::Tensor dscale = need_scale ? at::empty({}, f32(image_features)) : empty0(class_features);
  const GradWeight gw{opt_ptr(grad_loss), nullptr, 1.f, 0.f};
  run_ce_backward(ce_args(image_features, class_features, labels, scale, xnorm, label_smoothing), image_features, lse,
                  gw, nullptr, need_image ? &dx : nullptr, need_class ? &du : nullptr,
                  need_scale ? &dscale : nullptr);
  return {dx, du, dscale};
}

// The distillation of SPEC 4.3 against the basis (R [r, D], c [r], F [C, r], delta [C], beta [])
// -> [dist [], ||t|| [C*M], ||z|| [C*M], cos [C*M], p = R t^ [C*M, r] in text_features' dtype]
std::vector<at::Tensor> prompt_distill_loss_forward(const at::Tensor& text_features, const at::Tensor& basis_r,
                                        const at::Tensor& basis_c, const at::Tensor& basis_f,
                                        const at::Tensor& basis_delta, const at::Tensor& basis_beta) {
  check_text(text_features);
  const Basis basis = check_basis(text_features, basis_r, basis_c, basis_f, basis_delta, basis_beta);
  const c10::cuda::OptionalCUDAGuard guard(text_features.device());
  const int64_t R = text_features.size(0) * text_features.size(1);
  at::Tensor n = at::empty({R}, f32(text_features));
  at::Tensor zn = at::empty({R}, f32(text_features));
  at::Tensor cos = at::empty({R}, f32(text_features));
  at::Tensor dist = at::empty({}, f32(text_features));
  at::Tensor proj = at::empty({R, basis.R.size(0)}, text_features.options());
  const DistillArgs da = distill_args(text_features, basis);
  Ticket ticket = make_ticket(text_features);
  const Partial part = run_distill_partial(da, text_features, proj.data_ptr(), fp(n), FusedAggregate{}, ImageNorms{},
                                           ticket.ptr());
  run_loss_merge(text_features, nullptr, nullptr, nullptr, 0, &da, &part, fp(cos), fp(zn), fp(dist), 0.f, nullptr,
                 ticket.ptr());
  return {dist, n, zn, cos, proj};
}

// -> dL/dtext_features (the fused text backward without its aggregation part)
at::Tensor prompt_distill_loss_backward(const OptTensor& grad_loss, const at::Tensor& text_features, const at::Tensor& basis_r,
                            const at::Tensor& basis_c, const at::Tensor& basis_f, const at::Tensor& basis_delta,
                            const at::Tensor& basis_beta, const at::Tensor& n, const at::Tensor& zn,
                            const at::Tensor& cos, const at::Tensor& proj) {
  check_text(text_features);
  const Basis basis = check_basis(text_features, basis_r, basis_c, basis_f, basis_delta, basis_beta);
  check_distill_saved(text_features, n, zn, cos);
  check_projections(text_features, basis, proj);
  check_grad_scalar(grad_loss, "grad_loss", text_features);
  const c10::cuda::OptionalCUDAGuard guard(text_features.device());
  at::Tensor dt = at::empty_like(text_features);
  run_text_backward(text_features, n, nullptr, nullptr, nullptr, nullptr, &basis, &proj, cfp(cos), cfp(zn),
                    GradWeight{opt_ptr(grad_loss), nullptr, 1.f, 0.f}, dt, nullptr);
  return dt;
}

// The whole head, L = L_ce + alpha L_dist (no distillation without a basis).
// -> [loss, ce, dist, logits [B, C] or empty, n [C, M], w [C, M], r [C], lse [B], ||x|| [B],
//     ||z|| [C*M], cos [C*M] (these two empty without a basis), u^ [C, D] float32,
//     p = R t^ [C*M, r] in text_features' dtype (empty without a basis)]
std::vector<at::Tensor> demul_head_forward(const at::Tensor& text_features, const at::Tensor& prompt_logits,
                                     const at::Tensor& image_features, const at::Tensor& labels,
                                     const at::Tensor& scale, const OptTensor& basis_r, const OptTensor& basis_c,
                                     const OptTensor& basis_f, const OptTensor& basis_delta,
                                     const OptTensor& basis_beta, double alpha, double label_smoothing,
                                     bool return_logits) {
  check_text(text_features);
  check_f32(prompt_logits, "prompt_logits", 2, "[C, M]");
  check_same_device(prompt_logits, "prompt_logits", text_features, "text_features");
  check_size(prompt_logits, 0, text_features.size(0), "prompt_logits", "C");
  check_size(prompt_logits, 1, text_features.size(1), "prompt_logits", "M");
  check_image_side(text_features, image_features, labels, scale);
  const std::optional<Basis> basis =
      check_opt_basis(text_features, basis_r, basis_c, basis_f, basis_delta, basis_beta);
  const c10::cuda::OptionalCUDAGuard guard(text_features.device());
  const int64_t C = text_features.size(0), M = text_features.size(1), D = text_features.size(2);
  const int64_t B = image_features.size(0);
  at::Tensor u32 = at::empty({C, D}, f32(text_features));
  at::Tensor w = at::empty({C, M}, f32(text_features));
  at::Tensor n = at::empty({C, M}, f32(text_features));
  at::Tensor r = at::empty({C}, f32(text_features));
  at::Tensor xnorm = at::empty({B}, f32(text_features));
  at::Tensor lse = at::empty({B}, f32(text_features));
  at::Tensor loss = at::empty({}, f32(text_features));
  at::Tensor ce = at::empty({}, f32(text_features));
  at::Tensor logits = return_logits ? at::empty({B, C}, image_features.options()) : empty0(image_features);
  // Text side first: the aggregation (fused into the distillation's pass over T when a block
  // can hold whole classes), the distillation's partial sums and p = R t^.
  at::Tensor dist, cos, zn, proj;
  std::optional<DistillArgs> dargs;
  Partial part;
  const bool fused = basis && can_fuse_aggregate(M);
  if (!fused)
    launch_aggregate_forward(dtype_of(text_features), text_features.data_ptr(), cfp(prompt_logits), C, M, D, nullptr,
                             fp(u32), fp(w), fp(n), fp(r), stream());
  if (basis) {
    proj = at::empty({C * M, basis->R.size(0)}, text_features.options());
    dargs = distill_args(text_features, *basis);
    const FusedAggregate agg = fused ? FusedAggregate{cfp(prompt_logits), fp(w), fp(r), fp(u32)} : FusedAggregate{};
    // the image norms ride on the distillation's pass too (extra blocks)
    part = run_distill_partial(*dargs, text_features, proj.data_ptr(), fused ? fp(n) : nullptr, agg,
                               ImageNorms{image_features.data_ptr(), B, fp(xnorm)}, nullptr);
  } else {
    proj = empty0(text_features);
    launch_row_norms(dtype_of(image_features), image_features.data_ptr(), B, D, fp(xnorm), stream());
  }
  // the cross-entropy's partial pass zeroes the merge's ticket; one merge for both losses
  Ticket ticket = make_ticket(text_features);
  const Partial ce_part = run_ce_partial(ce_args(image_features, u32, labels, scale, xnorm, label_smoothing),
                                         text_features, return_logits ? logits.data_ptr() : nullptr, ticket.ptr());
  if (basis) {
    cos = at::empty({C * M}, f32(text_features));
    zn = at::empty({C * M}, f32(text_features));
    dist = at::empty({}, f32(text_features));
    run_loss_merge(text_features, &ce_part, fp(lse), fp(ce), B, &*dargs, &part, fp(cos), fp(zn), fp(dist),
                   static_cast<float>(alpha), fp(loss), ticket.ptr());
  } else {
    run_loss_merge(text_features, &ce_part, fp(lse), fp(ce), B, nullptr, nullptr, nullptr, nullptr, nullptr, 0.f,
                   fp(loss), ticket.ptr());
    dist = at::zeros({}, f32(text_features));
    cos = empty0(u32);
    zn = empty0(u32);
  }
  return {loss, ce, dist, logits, n, w, r, lse, xnorm, zn, cos, u32, proj};
}

// Gradients of the head given the output gradients (each None or a float32 scalar; grad_logits
// None or [B, C] float32) and the saved statistics of demul_head_forward.
// -> [dL/dtext_features, dL/dprompt_logits (float32), dL/dimage_features, dL/dscale []],
//    the first two only if need_text, the third only if need_image, the last only if need_scale.
std::vector<at::Tensor> demul_head_backward(const OptTensor& grad_loss, const OptTensor& grad_ce, const OptTensor& grad_dist,
                                      const OptTensor& grad_logits, const at::Tensor& text_features,
                                      const at::Tensor& image_features, const at::Tensor& labels,
                                      const at::Tensor& scale, const OptTensor& basis_r, const OptTensor& basis_c,
                                      const OptTensor& basis_f, const OptTensor& basis_delta,
                                      const OptTensor& basis_beta, double alpha, double label_smoothing,
                                      const at::Tensor& n, const at::Tensor& w, const at::Tensor& r,
                                      const at::Tensor& lse, const at::Tensor& xnorm, const at::Tensor& zn,
                                      const at::Tensor& cos, const at::Tensor& u32, const at::Tensor& proj,
                                      bool need_text,
                                      bool need_image, bool need_scale) {
  check_text(text_features);
  check_aggregate_saved(text_features, w, n, r, u32);
  check_image_side(text_features, image_features, labels, scale);
  const int64_t C = text_features.size(0), D = text_features.size(2);
  const int64_t B = image_features.size(0);
  check_f32(xnorm, "image_norms", 1, "[B]");
  check_f32(lse, "lse", 1, "[B]");
  check_size(xnorm, 0, B, "image_norms", "B");
  check_size(lse, 0, B, "lse", "B");
  const std::optional<Basis> basis =
      check_opt_basis(text_features, basis_r, basis_c, basis_f, basis_delta, basis_beta);
  if (basis) {
    check_distill_saved(text_features, n, zn, cos);
    check_projections(text_features, *basis, proj);
  }
  check_grad_scalar(grad_loss, "grad_loss", text_features);
  check_grad_scalar(grad_ce, "grad_ce", text_features);
  check_grad_scalar(grad_dist, "grad_dist", text_features);
  if (has(grad_logits)) {
    check_f32(*grad_logits, "grad_logits", 2, "[B, C]");
    check_same_device(*grad_logits, "grad_logits", text_features, "text_features");
    check_size(*grad_logits, 0, B, "grad_logits", "B");
    check_size(*grad_logits, 1, C, "grad_logits", "C");
  }
  const c10::cuda::OptionalCUDAGuard guard(text_features.device());
  at::Tensor dt = empty0(text_features), da = empty0(w), dx = empty0(image_features), dscale = empty0(w);
  at::Tensor du = need_text ? at::empty({C, D}, f32(text_features)) : empty0(w);
  if (need_image) dx = at::empty_like(image_features);
  if (need_scale) dscale = at::empty({}, f32(text_features));
  if (need_text || need_image || need_scale) {
    const GradWeight gw_ce{opt_ptr(grad_loss), opt_ptr(grad_ce), 1.f, 1.f};
    run_ce_backward(ce_args(image_features, u32, labels, scale, xnorm, label_smoothing), text_features, lse, gw_ce,
                    opt_ptr(grad_logits), need_image ? &dx : nullptr, need_text ? &du : nullptr,
                    need_scale ? &dscale : nullptr);
  }
  if (need_text) {
    dt = at::empty_like(text_features);
    da = at::empty_like(w);
    const GradWeight gw_dist{opt_ptr(grad_loss), opt_ptr(grad_dist), static_cast<float>(alpha), 1.f};
    run_text_backward(text_features, n, cfp(du), cfp(u32), cfp(w), cfp(r), basis ? &*basis : nullptr,
                      basis ? &proj : nullptr, basis ? cfp(cos) : nullptr, basis ? cfp(zn) : nullptr, gw_dist, dt,
                      fp(da));
  }
  return {dt, da, dx, dscale};
}

}  // namespace demul

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace demul;
  m.doc() = "demul_fast CUDA kernels of the DeMul head (docs/SPEC.md section 4); see demul_fast/ops/cuda_ops.py";
  // The constants the kernels were compiled with (demul_fast.common; tests/test_constants.py).
  m.attr("EPS") = static_cast<double>(DEMUL_EPS);
  m.attr("MAX_PROMPTS") = static_cast<int64_t>(DEMUL_MAX_PROMPTS);
  m.def("compiled_with", []() { return std::string("CUDA ") + std::to_string(CUDA_VERSION); },
        "CUDA toolkit version the extension was compiled with");
  m.def(
      "head_launch_plan",
      [](int64_t C, int64_t M, int64_t B, int64_t rank, int64_t sms, int64_t D) {
        const HeadPlan p = plan_head(C, M, B, rank, D > 0 ? D : 1, sms);
        auto split = [](const Split& s) {
          py::dict d;
          d["splits"] = s.splits;
          d["cols_per_split"] = s.cols_per_split;
          return d;
        };
        py::dict d;
        d["tile_rows"] = p.tile_rows;
        d["fused_aggregate"] = p.fused_aggregate;
        d["distill_tile_rows"] = p.distill_tile_rows;
        d["distill"] = split(p.distill);
        d["ce"] = split(p.ce);
        d["ce_image"] = split(p.ce_image);
        if (D > 0) d["text_backward"] = split(p.text_backward);  // D = 0: not asked for
        py::dict mg;
        mg["ce_group"] = p.merge.ce_group;
        mg["ce_blocks"] = p.merge.ce_blocks;
        mg["distill_group"] = p.merge.distill_group;
        mg["distill_blocks"] = p.merge.distill_blocks;
        mg["threads"] = kMergeThreads;
        d["merge"] = mg;
        d["prompt_logits_fused"] = p.prompt_logits_fused;
        d["image_norms_fused"] = p.image_norms_fused;
        d["image_norm_blocks"] = image_norm_blocks(B);
        return d;
      },
      py::arg("C"), py::arg("M"), py::arg("B"), py::arg("rank"), py::arg("sms"), py::arg("D") = 0,
      "The launch plan of demul_head (csrc/ops.h plan_head), as the launchers use it, for the compiled-code report");
  m.def("aggregate_prompts_forward", &aggregate_prompts_forward, py::arg("text_features"), py::arg("prompt_logits"));
  m.def("aggregate_prompts_backward", &aggregate_prompts_backward, py::arg("grad_class_features"), py::arg("text_features"),
        py::arg("prompt_norms"), py::arg("prompt_weights"), py::arg("class_norms"), py::arg("class_features32"));
  m.def("cosine_cross_entropy_forward", &cosine_cross_entropy_forward, py::arg("image_features"), py::arg("class_features"),
        py::arg("labels"), py::arg("scale"), py::arg("label_smoothing"));
  m.def("cosine_cross_entropy_backward", &cosine_cross_entropy_backward, py::arg("grad_loss"), py::arg("image_features"),
        py::arg("class_features"), py::arg("labels"), py::arg("scale"), py::arg("label_smoothing"), py::arg("lse"),
        py::arg("image_norms"), py::arg("need_image"), py::arg("need_class"), py::arg("need_scale"));
  m.def("prompt_distill_loss_forward", &prompt_distill_loss_forward, py::arg("text_features"), py::arg("basis_r"), py::arg("basis_c"),
        py::arg("basis_f"), py::arg("basis_delta"), py::arg("basis_beta"));
  m.def("prompt_distill_loss_backward", &prompt_distill_loss_backward, py::arg("grad_loss"), py::arg("text_features"), py::arg("basis_r"),
        py::arg("basis_c"), py::arg("basis_f"), py::arg("basis_delta"), py::arg("basis_beta"),
        py::arg("prompt_norms"), py::arg("projection_norms"), py::arg("prompt_cosines"),
        py::arg("prompt_projections"));
  m.def("demul_head_forward", &demul_head_forward, py::arg("text_features"), py::arg("prompt_logits"), py::arg("image_features"),
        py::arg("labels"), py::arg("scale"), py::arg("basis_r"), py::arg("basis_c"), py::arg("basis_f"),
        py::arg("basis_delta"), py::arg("basis_beta"), py::arg("alpha"), py::arg("label_smoothing"),
        py::arg("return_logits"));
  m.def("demul_head_backward", &demul_head_backward, py::arg("grad_loss"), py::arg("grad_ce"), py::arg("grad_dist"),
        py::arg("grad_logits"), py::arg("text_features"), py::arg("image_features"), py::arg("labels"),
        py::arg("scale"), py::arg("basis_r"), py::arg("basis_c"), py::arg("basis_f"), py::arg("basis_delta"),
        py::arg("basis_beta"), py::arg("alpha"), py::arg("label_smoothing"), py::arg("prompt_norms"),
        py::arg("prompt_weights"), py::arg("class_norms"), py::arg("lse"), py::arg("image_norms"),
        py::arg("projection_norms"), py::arg("prompt_cosines"), py::arg("class_features32"),
        py::arg("prompt_projections"), py::arg("need_text"),
        py::arg("need_image"), py::arg("need_scale"));
}

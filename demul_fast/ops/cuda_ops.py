"""The "cuda" backend: the hand-written CUDA kernels of ``demul_fast._C`` (csrc/).

Each kernel entry point is registered as a ``torch.library`` custom op named after the
public function it implements (``demul_fast::cuda_<function>`` and ``..._backward``,
demul_fast/ops/custom_op_conventions.py) with a fake (meta) implementation and, for the forward ops, an
autograd formula whose backward is again a custom op (not differentiable again); so the
ops run under ``torch.compile`` without graph breaks. ``OPS`` lists them (for
``torch.library.opcheck``). The four backend functions below take the distillation as the
frozen-phi basis of SPEC 4.3 (``DISTILL_BASIS = True``, demul_fast/ops/distill_basis.py); the
math is docs/SPEC.md section 4, the gradients 4.1, the K-free distillation 4.3.

Numerics: bfloat16 and float16 inputs run every matrix product on tensor cores (operands
in that type, the float32 class features and basis R rounded to it, float32 accumulation);
float32 inputs run them in float32 on the SIMT cores, not TF32 (csrc/common.cuh).

Inputs arrive validated (demul_fast/ops/validate.py). Here they are only made contiguous and
brought to the extension's dtypes: the features (text_features, image_features) in their
dtype (float32, bfloat16 or float16), the small operands (prompt_logits, class_features,
the basis, scale) in float32; the custom ops hand the extension the basis R in T's dtype
(``_basis_r``: the float32 R rounded once per basis and dtype, kept, not once per step).
Gradients flow back to the caller's tensors through those casts. Losses are float32; the basis (frozen phi and LLM embeddings) gets no gradient
(SPEC 4.1), and asking for one is refused by ``capability``.

If the extension was not built, ``UNAVAILABLE_REASON`` says why and the backend layer
never picks this module.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import custom_op_conventions as conventions
from .capability import Call, Capability, frozen_basis, frozen_operands, kernel_dtype
from ..common import MAX_PROMPTS, HeadOutput
from .distill_basis import DistillBasis
from .distill_basis import basis_r_in as _basis_r  # one cached cast of R per basis and dtype

try:
    from .. import _C
except ImportError as exc:  # the backend layer reports UNAVAILABLE_REASON
    _C = None
    UNAVAILABLE_REASON = (f"the CUDA extension demul_fast._C is not built ({exc}); "
                          "reinstall with DEMUL_FAST_BUILD_CUDA=1 to see why")

DISTILL_BASIS = True  # the distillation takes a DistillBasis (SPEC 4.3), not phi and E

Tensor = torch.Tensor
_F32 = torch.float32
_saved = conventions.saved_tensors


def _f32(like: Tensor, *shape: int) -> Tensor:
    return like.new_empty(shape, dtype=_F32)


def _grad_scalar(g: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None else g.to(_F32).reshape(()).contiguous()


def _basis_operands(basis: DistillBasis):
    """The basis as the custom ops' five float32 operands (R [r, D], c [r], F [C, r], delta [C], beta [])."""
    return tuple(t.detach().to(_F32).contiguous() for t in basis)


# ---------------------------------------------------------------------------------------
# Aggregation: T [C, M, D], A [C, M] -> u^ [C, D]


@torch.library.custom_op("demul_fast::cuda_aggregate_prompts", mutates_args=())
def _aggregate(text_features: Tensor, prompt_logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (u^ [C, D] in T's dtype, n [C, M], w [C, M], r [C], u^ float32 [C, D])"""
    return tuple(_C.aggregate_prompts_forward(text_features, prompt_logits))


@_aggregate.register_fake
def _(text_features, prompt_logits):
    c, m, d = text_features.shape
    t = text_features
    return t.new_empty((c, d)), _f32(t, c, m), _f32(t, c, m), _f32(t, c), _f32(t, c, d)


@torch.library.custom_op("demul_fast::cuda_aggregate_prompts_backward", mutates_args=())
def _aggregate_backward(grad: Tensor, text_features: Tensor, n: Tensor, w: Tensor, r: Tensor,
                        u32: Tensor) -> tuple[Tensor, Tensor]:
    """grad: dL/du^ [C, D] float32 -> (dL/dT [C, M, D], dL/dA [C, M] float32)"""
    return tuple(_C.aggregate_prompts_backward(grad, text_features, n, w, r, u32))


@_aggregate_backward.register_fake
def _(grad, text_features, n, w, r, u32):
    return torch.empty_like(text_features), torch.empty_like(w)


def _aggregate_setup(ctx, inputs, output):
    _, n, w, r, u32 = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(n, w, r, u32)
    ctx.save_for_backward(inputs[0], n, w, r, u32)


def _aggregate_grad(ctx, g_out, *unused):
    if g_out is None:
        return None, None
    t, n, w, r, u32 = _saved(ctx)
    dt, da = _aggregate_backward(g_out.to(_F32).contiguous(), t, n, w, r, u32)
    return dt, da


_aggregate.register_autograd(_aggregate_grad, setup_context=_aggregate_setup)


# ---------------------------------------------------------------------------------------
# Cosine cross-entropy: X [B, D], U [C, D] (float32), labels [B] -> scalar


@torch.library.custom_op("demul_fast::cuda_cosine_cross_entropy", mutates_args=())
def _cross_entropy(image_features: Tensor, class_features: Tensor, labels: Tensor, scale: Tensor,
                   label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss [], lse [B], ||x|| [B]), all float32"""
    return tuple(_C.cosine_cross_entropy_forward(image_features, class_features, labels, scale, label_smoothing))


@_cross_entropy.register_fake
def _(image_features, class_features, labels, scale, label_smoothing):
    b = image_features.shape[0]
    return _f32(image_features), _f32(image_features, b), _f32(image_features, b)


@torch.library.custom_op("demul_fast::cuda_cosine_cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(grad: Optional[Tensor], image_features: Tensor, class_features: Tensor, labels: Tensor,
                            scale: Tensor, label_smoothing: float, lse: Tensor, xnorm: Tensor, need_image: bool,
                            need_class: bool, need_scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dL/dX or [0], dL/dU float32 or [0], dL/dscale [] or [0])"""
    return tuple(_C.cosine_cross_entropy_backward(grad, image_features, class_features, labels, scale, label_smoothing, lse,
                                           xnorm, need_image, need_class, need_scale))


@_cross_entropy_backward.register_fake
def _(grad, image_features, class_features, labels, scale, label_smoothing, lse, xnorm, need_image, need_class,
      need_scale):
    x, u = image_features, class_features
    return (torch.empty_like(x) if need_image else x.new_empty(0),
            torch.empty_like(u) if need_class else u.new_empty(0),
            _f32(u) if need_scale else u.new_empty(0))


def _cross_entropy_setup(ctx, inputs, output):
    x, u, labels, scale, ls = inputs
    _, lse, xnorm = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, xnorm)
    ctx.label_smoothing = ls
    ctx.save_for_backward(x, u, labels, scale, lse, xnorm)


def _cross_entropy_grad(ctx, g_loss, *unused):
    need_x, need_u, _, need_s, _ = ctx.needs_input_grad
    if g_loss is None or not (need_x or need_u or need_s):
        return None, None, None, None, None
    x, u, labels, scale, lse, xnorm = _saved(ctx)
    dx, du, ds = _cross_entropy_backward(_grad_scalar(g_loss), x, u, labels, scale, ctx.label_smoothing, lse, xnorm,
                                         need_x, need_u, need_s)
    return dx if need_x else None, du if need_u else None, None, ds if need_s else None, None


_cross_entropy.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


# ---------------------------------------------------------------------------------------
# Distillation without K (SPEC 4.3): T [C, M, D] and the basis R [r, D], c [r], F [C, r],
# delta [C], beta [] (float32) -> scalar


@torch.library.custom_op("demul_fast::cuda_prompt_distill_loss", mutates_args=())
def _distill(text_features: Tensor, basis_r: Tensor, basis_c: Tensor, basis_f: Tensor, basis_delta: Tensor,
             basis_beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [], ||t|| [C*M], ||z|| [C*M], cos [C*M]), all float32, and p = R t^ [C*M, r] in
    text_features' dtype (the backward's operand)"""
    return tuple(_C.prompt_distill_loss_forward(text_features, _basis_r(basis_r, text_features.dtype), basis_c,
                                                basis_f, basis_delta, basis_beta))


@_distill.register_fake
def _(text_features, basis_r, basis_c, basis_f, basis_delta, basis_beta):
    c, m, _ = text_features.shape
    t = text_features
    return _f32(t), _f32(t, c * m), _f32(t, c * m), _f32(t, c * m), t.new_empty((c * m, basis_r.shape[0]))


@torch.library.custom_op("demul_fast::cuda_prompt_distill_loss_backward", mutates_args=())
def _distill_backward(grad: Optional[Tensor], text_features: Tensor, basis_r: Tensor, basis_c: Tensor,
                      basis_f: Tensor, basis_delta: Tensor, basis_beta: Tensor, n: Tensor, zn: Tensor,
                      cos: Tensor, proj: Tensor) -> Tensor:
    """-> dL/dT [C, M, D]"""
    return _C.prompt_distill_loss_backward(grad, text_features, _basis_r(basis_r, text_features.dtype), basis_c,
                                           basis_f, basis_delta, basis_beta, n, zn, cos, proj)


@_distill_backward.register_fake
def _(grad, text_features, basis_r, basis_c, basis_f, basis_delta, basis_beta, n, zn, cos, proj):
    return torch.empty_like(text_features)


def _distill_setup(ctx, inputs, output):
    _, n, zn, cos, proj = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(n, zn, cos, proj)
    ctx.save_for_backward(*inputs, n, zn, cos, proj)


def _distill_grad(ctx, g_loss, *unused):
    if g_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    t, *basis, n, zn, cos, proj = _saved(ctx)
    return (_distill_backward(_grad_scalar(g_loss), t, *basis, n, zn, cos, proj),) + (None,) * 5


_distill.register_autograd(_distill_grad, setup_context=_distill_setup)


# ---------------------------------------------------------------------------------------
# The whole head


@torch.library.custom_op("demul_fast::cuda_demul_head", mutates_args=())
def _head(text_features: Tensor, prompt_logits: Tensor, image_features: Tensor, labels: Tensor, scale: Tensor,
          basis_r: Optional[Tensor], basis_c: Optional[Tensor], basis_f: Optional[Tensor],
          basis_delta: Optional[Tensor], basis_beta: Optional[Tensor], alpha: float, label_smoothing: float,
          return_logits: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                        Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, ce, dist, logits [B, C] or [0], then saved statistics: n [C, M], w [C, M], r [C], lse [B],
    ||x|| [B], ||z|| [C*M], cos [C*M] (these two [0] without a basis), u^ float32 [C, D], and
    p = R t^ [C*M, r] in text_features' dtype ([0] without a basis: the fused backward's operand))"""
    if basis_r is not None:
        basis_r = _basis_r(basis_r, text_features.dtype)
    return tuple(_C.demul_head_forward(text_features, prompt_logits, image_features, labels, scale, basis_r, basis_c,
                                 basis_f, basis_delta, basis_beta, alpha, label_smoothing, return_logits))


@_head.register_fake
def _(text_features, prompt_logits, image_features, labels, scale, basis_r, basis_c, basis_f, basis_delta,
      basis_beta, alpha, label_smoothing, return_logits):
    c, m, d = text_features.shape
    b = image_features.shape[0]
    t = text_features
    logits = image_features.new_empty((b, c)) if return_logits else image_features.new_empty(0)
    rows = c * m if basis_r is not None else 0
    proj = t.new_empty((rows, basis_r.shape[0])) if basis_r is not None else t.new_empty(0)
    return (_f32(t), _f32(t), _f32(t), logits, _f32(t, c, m), _f32(t, c, m), _f32(t, c), _f32(t, b), _f32(t, b),
            _f32(t, rows), _f32(t, rows), _f32(t, c, d), proj)


@torch.library.custom_op("demul_fast::cuda_demul_head_backward", mutates_args=())
def _head_backward(grad_loss: Optional[Tensor], grad_ce: Optional[Tensor], grad_dist: Optional[Tensor],
                   grad_logits: Optional[Tensor], text_features: Tensor, image_features: Tensor, labels: Tensor,
                   scale: Tensor, basis_r: Optional[Tensor], basis_c: Optional[Tensor], basis_f: Optional[Tensor],
                   basis_delta: Optional[Tensor], basis_beta: Optional[Tensor], alpha: float, label_smoothing: float,
                   n: Tensor, w: Tensor, r: Tensor, lse: Tensor, xnorm: Tensor, zn: Tensor, cos: Tensor, u32: Tensor,
                   proj: Tensor, need_text: bool, need_image: bool,
                   need_scale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dL/dT, dL/dA float32, dL/dX, dL/dscale []), each [0] when not needed"""
    if basis_r is not None:
        basis_r = _basis_r(basis_r, text_features.dtype)
    return tuple(_C.demul_head_backward(grad_loss, grad_ce, grad_dist, grad_logits, text_features, image_features, labels,
                                  scale, basis_r, basis_c, basis_f, basis_delta, basis_beta, alpha, label_smoothing,
                                  n, w, r, lse, xnorm, zn, cos, u32, proj, need_text, need_image, need_scale))


@_head_backward.register_fake
def _(grad_loss, grad_ce, grad_dist, grad_logits, text_features, image_features, labels, scale, basis_r, basis_c,
      basis_f, basis_delta, basis_beta, alpha, label_smoothing, n, w, r, lse, xnorm, zn, cos, u32, proj, need_text,
      need_image, need_scale):
    t, x = text_features, image_features
    return (torch.empty_like(t) if need_text else t.new_empty(0),
            torch.empty_like(w) if need_text else w.new_empty(0),
            torch.empty_like(x) if need_image else x.new_empty(0),
            _f32(w) if need_scale else w.new_empty(0))


def _head_setup(ctx, inputs, output):
    t, _, x, labels, scale, *basis = inputs[:10]
    alpha, ls, return_logits = inputs[10:]
    saved = output[4:]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*saved)
    ctx.alpha, ctx.label_smoothing, ctx.return_logits = alpha, ls, return_logits
    ctx.has_basis = basis[0] is not None  # saved only when given (saved tensors cannot be None)
    ctx.save_for_backward(t, x, labels, scale, *(basis if ctx.has_basis else ()), *saved)


def _head_grad(ctx, g_loss, g_ce, g_dist, g_logits, *unused):
    need_t, need_a, need_x, _, need_s = ctx.needs_input_grad[:5]
    if all(g is None for g in (g_loss, g_ce, g_dist, g_logits)) or not (need_t or need_a or need_x or need_s):
        return (None,) * 13
    t, x, labels, scale, *rest = _saved(ctx)
    basis, saved = (rest[:5], rest[5:]) if ctx.has_basis else ((None,) * 5, rest)
    # Without return_logits the logits output is a [0] placeholder; a traced backward may
    # still hand it a [0] zero gradient, which is not a [B, C] one: ignore it.
    gl = None if g_logits is None or not ctx.return_logits else g_logits.to(_F32).contiguous()
    dt, da, dx, ds = _head_backward(_grad_scalar(g_loss), _grad_scalar(g_ce), _grad_scalar(g_dist), gl, t, x, labels,
                                    scale, *basis, ctx.alpha, ctx.label_smoothing, *saved, need_t or need_a, need_x,
                                    need_s)
    return (dt if need_t else None, da if need_a else None, dx if need_x else None, None, ds if need_s else None,
            *(None,) * 8)


_head.register_autograd(_head_grad, setup_context=_head_setup)

for _op in (_aggregate_backward, _cross_entropy_backward, _distill_backward, _head_backward):
    conventions.register_backward_op(_op, "cuda")

OPS = [_aggregate, _aggregate_backward, _cross_entropy, _cross_entropy_backward, _distill, _distill_backward,
       _head, _head_backward]


# ---------------------------------------------------------------------------------------
# The backend functions (the DISTILL_BASIS API of demul_fast.ops.functional)


def capability(call: Call) -> Capability:
    """Whether this backend can run ``call`` (demul_fast.ops.capability).

    Device and dtype first (CUDA tensors of float32, bfloat16, float16), then frozen
    operands that require grad, then the prompt limit M <= MAX_PROMPTS. No plan: the
    extension works out its launches itself (``_C.head_launch_plan``). The extension's
    entry points check their operands again in C++ (csrc/checks.h): they are callable
    directly, and they receive internal operands (saved statistics) that no capability
    question sees; those checks guard memory, they choose nothing.
    """
    reason = kernel_dtype("cuda", call.dtype)
    if reason is None and call.device is not None and torch.device(call.device).type != "cuda":
        reason = f"the cuda backend needs CUDA tensors, got tensors on {torch.device(call.device)}"
    if reason is not None or call.fn is None:
        return Capability(reason)
    reason = frozen_operands("cuda", call) or frozen_basis("cuda", call)
    T = call.arg("text_features")
    if reason is None and T is not None and T.shape[1] > MAX_PROMPTS:
        reason = f"the cuda kernels take at most M={MAX_PROMPTS} prompts, got M={T.shape[1]}"
    return Capability(reason)


def aggregate_prompts(text_features: Tensor, prompt_logits: Tensor) -> Tensor:
    """text_features: [C, M, D], prompt_logits: [C, M] -> unit-norm class features [C, D]"""
    return _aggregate(text_features.contiguous(), prompt_logits.to(_F32).contiguous())[0]


def cosine_cross_entropy(image_features: Tensor, class_features: Tensor, labels: Tensor, scale,
                         label_smoothing: float = 0.0) -> Tensor:
    """image_features: [B, D], class_features: [C, D], labels: [B] -> scalar float32 loss"""
    x = image_features.contiguous()
    return _cross_entropy(x, class_features.to(_F32).contiguous(), labels.to(torch.int64).contiguous(),
                          conventions.scale_tensor(scale, x.device), float(label_smoothing))[0]


def prompt_distill_loss(text_features: Tensor, basis: DistillBasis) -> Tensor:
    """text_features: [C, M, D], basis: DistillBasis (R [r, D], c [r], F [C, r], delta [C], beta [])
    -> scalar float32 loss (SPEC 4.3)"""
    return _distill(text_features.contiguous(), *_basis_operands(basis))[0]


def demul_head(text_features: Tensor, prompt_logits: Tensor, image_features: Tensor, labels: Tensor, scale,
               basis: Optional[DistillBasis] = None, alpha: float = 1.0, label_smoothing: float = 0.0,
               return_logits: bool = False) -> HeadOutput:
    """The whole head in one custom op (SPEC 4), the distillation against ``basis`` (none without one):
    HeadOutput(loss, ce_loss, distill_loss, logits [B, C] or None)"""
    t = text_features.contiguous()
    operands = _basis_operands(basis) if basis is not None else (None,) * 5
    out = _head(t, prompt_logits.to(_F32).contiguous(), image_features.contiguous(),
                labels.to(torch.int64).contiguous(), conventions.scale_tensor(scale, t.device), *operands,
                float(alpha), float(label_smoothing), bool(return_logits))
    return HeadOutput(out[0], out[1], out[2], out[3] if return_logits else None)


__all__ = ["aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head", "HeadOutput", "OPS",
           "DISTILL_BASIS", "capability"]

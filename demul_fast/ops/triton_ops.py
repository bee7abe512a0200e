"""The "triton" backend: the DeMul head on the Triton kernels of ``demul_fast.kernels``.

Each function has the signature of its twin in ``demul_fast.ops.torch_ops`` in the K-free
form of SPEC 4.3 (``DISTILL_BASIS = True``: the distillation takes a ``DistillBasis``;
inputs are validated by ``demul_fast.ops.functional`` before they get here). Every kernel launch
sits inside a ``torch.library.custom_op`` named ``demul_fast::triton_<function>`` (and
``..._backward``) with a fake implementation, tied by ``register_autograd``; forward ops
return ``(outputs, *statistics)`` with the statistics in SPEC order (n, r, lse, |z|, cos;
u^ and v, the saved features, beside |u| and |z|). ``OPS`` lists them.

Launches of ``demul_head`` (SPEC 4.2), forward: the text kernel (one read of T: n, u^, |u|
and v = R t^ + c with its partial sums), the distillation finish, the CE forward and its
merge, and one kernel for the three losses; backward: the CE grad pass, dU, dX and its
finish, and one text kernel that produces dT and dA together (du, dw, dA, dv and R^T dv
from the saved v, no recompute of the product); the loss gradients are read by the kernels.
The basis is turned once so that R is upper triangular (``triangular_basis``; the forward
skips R's zero blocks) and half-precision inputs cast R to T's dtype once per basis (both
kept while the basis lives); d
scale is one torch sum, only when scale requires grad. Autograd does not zero-fill the
gradients of the saved statistics (``set_materialize_grads(False)``).

phi, b, E and the labels get no gradient (frozen, SPEC 4.3); a tensor ``scale`` that
requires grad gets d scale.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import custom_op_conventions as conventions
from .capability import Call, Capability, distill_rank, frozen_basis, frozen_operands, kernel_dtype
from ..common import HeadOutput, interpreting
from .distill_basis import DistillBasis
from .distill_basis import basis_r_in as _basis_r  # one cached cast of R per basis and dtype
from .distill_basis import kept, tensor_fingerprint

try:
    from ..kernels import cosine_ce as _ce
    from ..kernels import launch as _launch
    from ..kernels import text_head as _text
    UNAVAILABLE_REASON = None
except Exception as exc:  # noqa: BLE001 - reported by demul_fast.ops.backends
    _ce = _launch = _text = None
    UNAVAILABLE_REASON = f"triton kernels cannot be imported: {type(exc).__name__}: {exc}"

DISTILL_BASIS = True
_empty = conventions.empty_like_placeholder
_saved = conventions.saved_tensors
f32 = torch.float32


_ZEROS: dict = {}  # device -> a float32 [1] zero, made once (never written: the kernels only read it)


def _zero(device) -> Tensor:
    """The [1] float32 zero a backward passes for a loss gradient autograd left out: one per
    device, kept, so that a step makes no fill for it (a launch of its own per step before)."""
    z = _ZEROS.get(device)
    if z is None:
        z = _ZEROS[device] = torch.zeros(1, dtype=f32, device=device)
    return z


_TRI_CACHE: dict = {}  # fingerprints of (R, c, F) -> ((R, c, F), their triangular form)


def triangular_basis(R: Tensor, c: Tensor, F: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The basis turned so that R is upper triangular (exact algebra, SPEC 4.3): with the QR
    factorisation R = P R' (P [r, r] orthogonal, R' [r, D] upper triangular, r <= D),
    v' = R' t^ + P^T c = P^T v, so |v'| = |v| and <v', P^T F[c]> = <v, F[c]>: the loss and the
    gradient of T are those of (R, c, F). The 128-row forward skips R's zero blocks
    (text_head.text_forward(..., triangular=True)). A basis from build_distill_basis is already
    triangular (R is the QR factor of phi's W; P is then +-1 on the diagonal); one built by
    hand need not be. Computed once per basis in float64 and kept (R', P^T c and F P in float32,
    R' in R's dtype), like the cast of R; nothing is read back to the host."""
    def turn():
        p, r2 = torch.linalg.qr(R.detach().to(torch.float64), mode="reduced")  # p [r, r], r2 [r, D]
        return (R, c, F), (r2.to(R.dtype).contiguous(), (p.transpose(0, 1) @ c.detach().to(torch.float64)).to(f32),
                           (F.detach().to(torch.float64) @ p).to(f32).contiguous())
    return kept(_TRI_CACHE, tuple(tensor_fingerprint(t) for t in (R, c, F)), turn)[1]


def _kernel_basis(T: Tensor, R: Tensor, c: Tensor, F: Tensor) -> Tuple[Tensor, Tensor, Tensor, bool]:
    """(R in T's dtype (the dot operand), c, F fp32, triangular): the forward and the backward
    take the same (turned when r <= D: ``triangular_basis``)."""
    tri = R.shape[0] <= R.shape[1]
    if tri:
        R, c, F = triangular_basis(R, c, F)
    return _basis_r(R, T.dtype), c.to(f32).contiguous(), F.to(f32).contiguous(), tri


def _basis_args(T: Tensor, R: Tensor, c: Tensor, F: Tensor, delta: Tensor, beta: Tensor):
    """The basis as the kernels take it: R in T's dtype (the dot operand), the rest fp32, and
    whether R is triangular."""
    Rk, ck, Fk, tri = _kernel_basis(T, R, c, F)
    return (Rk, ck, Fk, delta.to(f32).contiguous(), beta.to(f32).reshape(1)), tri


# ---------------------------------------------------------------- aggregation

@torch.library.custom_op("demul_fast::triton_aggregate_prompts", mutates_args=())
def _aggregate(text_features: Tensor, prompt_logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (u^ [C, D] in T's dtype; saved: n [C*M], |u| [C] fp32)."""
    n, u, r, *_ = _text.text_forward(text_features, prompt_logits, None, None, None, None, None,
                                     agg=True, dist=False)
    return u, n, r


@_aggregate.register_fake
def _(text_features, prompt_logits):
    C, M, D = text_features.shape
    f = text_features.new_empty
    return f((C, D)), f((C * M,), dtype=f32), f((C,), dtype=f32)


@torch.library.custom_op("demul_fast::triton_aggregate_prompts_backward", mutates_args=())
def _aggregate_bwd(text_features: Tensor, prompt_logits: Tensor, n: Tensor, u: Tensor, r: Tensor,
                   grad: Tensor) -> Tuple[Tensor, Tensor]:
    return _text.text_backward(text_features, prompt_logits, n, u, r, grad.contiguous(), None, None, None, None,
                               None, None, None, agg=True, dist=False)


@_aggregate_bwd.register_fake
def _(text_features, prompt_logits, n, u, r, grad):
    return torch.empty_like(text_features, memory_format=torch.contiguous_format), torch.empty_like(prompt_logits)


def _aggregate_setup(ctx, inputs, output):
    u, n, r = output
    ctx.set_materialize_grads(False)  # the statistics' gradients are never used: no zero-filled tensors
    ctx.save_for_backward(inputs[0], inputs[1], n, u, r)


def _aggregate_backward(ctx, grad, *_unused_stats):
    if grad is None:
        return None, None
    T, A, n, u, r = _saved(ctx)
    return torch.ops.demul_fast.triton_aggregate_prompts_backward(T, A, n, u, r, grad)


_aggregate.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


# ---------------------------------------------------------------- distillation (K-free, SPEC 4.3)

@torch.library.custom_op("demul_fast::triton_prompt_distill_loss", mutates_args=())
def _distill(text_features: Tensor, R: Tensor, c: Tensor, F: Tensor, delta: Tensor,
             beta: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [] fp32; saved: n [C*M], v [C*M, r] in T's dtype, |z|, cos [C*M], and the
    backward's <v - c, dv |z|> [C*M])."""
    T = text_features
    (Rk, ck, Fk, dk, bk), tri = _basis_args(T, R, c, F, delta, beta)
    n, _, _, v, zn, cos, parts, pv = _text.text_forward(T, None, Rk, ck, Fk, dk, bk, agg=False, dist=True,
                                                        triangular=tri)
    return _ce.losses(None, parts, zn.shape[0], 1.0, T.device)[2], n, v, zn, cos, pv


@_distill.register_fake
def _(text_features, R, c, F, delta, beta):
    C, M, _ = text_features.shape
    f = text_features.new_empty
    rows = C * M
    return (f((), dtype=f32), f((rows,), dtype=f32), f((rows, R.shape[0])), f((rows,), dtype=f32),
            f((rows,), dtype=f32), f((rows,), dtype=f32))


@torch.library.custom_op("demul_fast::triton_prompt_distill_loss_backward", mutates_args=())
def _distill_bwd(text_features: Tensor, R: Tensor, c: Tensor, F: Tensor, n: Tensor, v: Tensor, zn: Tensor,
                 cos: Tensor, pv: Tensor, grad: Tensor) -> Tensor:
    T = text_features
    Rk, ck, Fk, tri = _kernel_basis(T, R, c, F)  # the forward's (v is in its coordinates)
    g = grad.to(f32).reshape(1)
    return _text.text_backward(T, None, n, None, None, None, Rk, ck, Fk, v, zn, cos, g, agg=False, dist=True, pv=pv,
                               triangular=tri)[0]


@_distill_bwd.register_fake
def _(text_features, R, c, F, n, v, zn, cos, pv, grad):
    return torch.empty_like(text_features, memory_format=torch.contiguous_format)


def _distill_setup(ctx, inputs, output):
    T, R, c, F, _, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(T, R, c, F, *output[1:])


def _distill_backward(ctx, grad, *_unused_stats):
    if grad is None:
        return None, None, None, None, None, None
    T, R, c, F, n, v, zn, cos, pv = _saved(ctx)
    dT = torch.ops.demul_fast.triton_prompt_distill_loss_backward(T, R, c, F, n, v, zn, cos, pv, grad)
    return dT, None, None, None, None, None


_distill.register_autograd(_distill_backward, setup_context=_distill_setup)


# ---------------------------------------------------------------- cosine cross-entropy

@torch.library.custom_op("demul_fast::triton_cosine_cross_entropy", mutates_args=())
def _cosine_ce(image_features: Tensor, class_features: Tensor, labels: Tensor, scale: Tensor,
               label_smoothing: float) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (loss [] fp32; saved: lse [B], |x| [B] fp32)."""
    X, U, y = (t.contiguous() for t in (image_features, class_features, labels))
    rows, lse, xn, _ = _ce.ce_forward(X, U, y, scale, label_smoothing, False)
    return _ce.losses(rows, None, 1, 0.0, X.device)[1], lse, xn


@_cosine_ce.register_fake
def _(image_features, class_features, labels, scale, label_smoothing):
    f = image_features.new_empty
    B = image_features.shape[0]
    return f((), dtype=f32), f((B,), dtype=f32), f((B,), dtype=f32)


@torch.library.custom_op("demul_fast::triton_cosine_cross_entropy_backward", mutates_args=())
def _cosine_ce_bwd(image_features: Tensor, class_features: Tensor, labels: Tensor, scale: Tensor, lse: Tensor,
                   xn: Tensor, grad: Tensor, label_smoothing: float, need_dx: bool,
                   need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (d class_features [C, D], d scale [] fp32 (empty unless need_scale), d image_features [B, D] or empty)."""
    X, U, y = (t.contiguous() for t in (image_features, class_features, labels))
    dU, dscale, dX = _ce.ce_backward(X, U, y, scale, lse, xn, grad.to(f32).reshape(1), None, label_smoothing,
                                     need_dx, need_scale=need_scale)
    return dU, dscale if dscale is not None else _empty(lse), dX if dX is not None else _empty(X)


@_cosine_ce_bwd.register_fake
def _(image_features, class_features, labels, scale, lse, xn, grad, label_smoothing, need_dx, need_scale):
    dX = torch.empty_like(image_features) if need_dx else image_features.new_empty((0,))
    dscale = image_features.new_empty((), dtype=f32) if need_scale else image_features.new_empty((0,), dtype=f32)
    return torch.empty_like(class_features), dscale, dX


def _cosine_ce_setup(ctx, inputs, output):
    X, U, y, scale, ls = inputs
    ctx.ls = ls
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(X, U, y, scale, output[1], output[2])


def _cosine_ce_backward(ctx, grad, _grad_lse, _grad_xn):
    if grad is None:
        return None, None, None, None, None
    X, U, y, scale, lse, xn = _saved(ctx)
    need_dx, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dU, dscale, dX = torch.ops.demul_fast.triton_cosine_cross_entropy_backward(X, U, y, scale, lse, xn, grad,
                                                                               ctx.ls, need_dx, need_scale)
    return (dX if need_dx else None), dU, None, (dscale if need_scale else None), None


_cosine_ce.register_autograd(_cosine_ce_backward, setup_context=_cosine_ce_setup)


# ---------------------------------------------------------------- the whole head

@torch.library.custom_op("demul_fast::triton_demul_head", mutates_args=())
def _head(text_features: Tensor, prompt_logits: Tensor, image_features: Tensor, labels: Tensor, scale: Tensor,
          R: Optional[Tensor], c: Optional[Tensor], F: Optional[Tensor], delta: Optional[Tensor],
          beta: Optional[Tensor], alpha: float, label_smoothing: float, return_logits: bool) -> List[Tensor]:
    """-> [loss, ce, dist (all [] fp32), logits [B, C] or empty; saved for the backward:
    n [C*M], u^ [C, D] fp32, |u| [C], lse [B], |x| [B], v [C*M, r], |z|, cos, <v - c, dv |z|>
    [C*M] (the last four empty without distillation), u^ in X's type for the cross-entropy's
    dots (empty when X is float32: u^ itself)]."""
    T = text_features
    X, y = image_features.contiguous(), labels.contiguous()
    dist = R is not None
    basis, tri = _basis_args(T, R, c, F, delta, beta) if dist else ((None,) * 5, False)
    # the distillation's finish runs in the cross-entropy merge's launch (one launch fewer)
    # u^ once more in X's type: the cross-entropy passes round it to that type for their dots
    # anyway (the same operands), and read half the bytes of the float32 u^ per image tile
    C, _, D = T.shape
    ul = _launch.new_output((C, D), X.dtype, X.device) if X.dtype != f32 else None
    n, U, r, v, partials, *_ = _text.text_forward(T, prompt_logits, *basis, agg=True, dist=dist, u_dtype=f32,
                                                    finish=False, triangular=tri, u_low=ul)
    # ... and so do the losses (the program of that launch that finishes last reduces them)
    rows, lse, xn, logits, zn, cos, parts, pv, loss, ce, dl = _ce.ce_forward(
        X, U if ul is None else ul, y, scale, label_smoothing, return_logits, dist=partials, alpha=alpha,
        rows_dist=T.shape[0] * T.shape[1] if dist else 1)
    if not dist:
        v, zn, cos, pv = _empty(U), _empty(U), _empty(U), _empty(U)
    return [loss, ce, dl, logits if return_logits else _empty(X), n, U, r, lse, xn, v, zn, cos, pv,
            _empty(U) if ul is None else ul]


@_head.register_fake
def _(text_features, prompt_logits, image_features, labels, scale, R, c, F, delta, beta, alpha, label_smoothing,
      return_logits):
    C, M, D = text_features.shape
    B = image_features.shape[0]
    f = text_features.new_empty
    rows = C * M if R is not None else 0
    logits = f((B, C), dtype=image_features.dtype) if return_logits else f((0,), dtype=image_features.dtype)
    v = f((rows, R.shape[0])) if R is not None else f((0,), dtype=f32)
    return [f((), dtype=f32), f((), dtype=f32), f((), dtype=f32), logits, f((C * M,), dtype=f32),
            f((C, D), dtype=f32), f((C,), dtype=f32), f((B,), dtype=f32), f((B,), dtype=f32), v, f((rows,), dtype=f32),
            f((rows,), dtype=f32), f((rows,), dtype=f32),
            f((C, D), dtype=image_features.dtype) if image_features.dtype != f32 else f((0,), dtype=f32)]


@torch.library.custom_op("demul_fast::triton_demul_head_backward", mutates_args=())
def _head_bwd(text_features: Tensor, prompt_logits: Tensor, image_features: Tensor, labels: Tensor, scale: Tensor,
              R: Optional[Tensor], c: Optional[Tensor], F: Optional[Tensor], n: Tensor, class_features: Tensor,
              class_features_low: Tensor, r: Tensor, lse: Tensor, xn: Tensor, v: Tensor, zn: Tensor, cos: Tensor, pv: Tensor,
              grad_loss: Optional[Tensor],
              grad_ce: Optional[Tensor], grad_dist: Optional[Tensor], grad_logits: Optional[Tensor], alpha: float,
              label_smoothing: float, need_dx: bool, need_scale: bool) -> List[Tensor]:
    """grad_loss, grad_ce, grad_dist: [] fp32 gradients of the three losses (None: zero),
    combined inside the kernels (dL/dL_ce = grad_loss + grad_ce, dL/dL_dist = alpha grad_loss
    + grad_dist). -> [dT, dA, d scale [] fp32 (empty unless need_scale), d image_features
    (empty unless need_dx)]."""
    T = text_features
    X, y = image_features.contiguous(), labels.contiguous()
    GL = grad_logits.contiguous() if grad_logits is not None else None
    grads = []
    for g in (grad_loss, grad_ce, grad_dist):
        if g is None:  # autograd left it out (set_materialize_grads(False)): the device's kept zero
            g = _zero(T.device)
        grads.append(g.to(f32).reshape(1))
    g_loss, g_ce, g_dist = grads
    # the dU pass also makes the text backward's sums over D (T's rows read once, not per output chunk)
    U_ce = class_features_low if class_features_low.numel() else class_features  # the forward's (u^ in X's type)
    dU, dscale, dX, swept = _ce.ce_backward(X, U_ce, y, scale, lse, xn, g_ce, GL, label_smoothing,
                                            need_dx, du_dtype=f32, grad_loss=g_loss, w_loss=1.0,
                                            need_scale=need_scale, sweep_t=T, sweep_u=class_features)
    dist = R is not None
    Rk, ck, Fk, tri = _kernel_basis(T, R, c, F) if dist else (None, None, None, False)  # the forward's
    dT, dA = _text.text_backward(T, prompt_logits, n, class_features, r, dU, Rk, ck, Fk, v if dist else None,
                                 zn if dist else None, cos if dist else None, g_dist if dist else None, agg=True,
                                 dist=dist, grad_loss=g_loss, w_loss=alpha, pv=pv if dist else None, triangular=tri,
                                 swept=swept)
    return [dT, dA, dscale if dscale is not None else _empty(lse), dX if dX is not None else _empty(X)]


@_head_bwd.register_fake
def _(text_features, prompt_logits, image_features, labels, scale, R, c, F, n, class_features, class_features_low,
      r, lse, xn, v, zn, cos, pv, grad_loss, grad_ce, grad_dist, grad_logits, alpha, label_smoothing, need_dx, need_scale):
    dX = torch.empty_like(image_features) if need_dx else image_features.new_empty((0,))
    dscale = text_features.new_empty((), dtype=f32) if need_scale else text_features.new_empty((0,), dtype=f32)
    return [torch.empty_like(text_features, memory_format=torch.contiguous_format),
            torch.empty_like(prompt_logits), dscale, dX]


def _head_setup(ctx, inputs, output):
    T, A, X, y, scale, R, c, F, delta, beta, alpha, ls, return_logits = inputs
    ctx.alpha, ctx.ls, ctx.return_logits = alpha, ls, return_logits
    ctx.dist = R is not None
    # the saved statistics' gradients are never used: autograd passes None instead of
    # zero-filling each of them (v alone is C*M*r elements)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(T, A, X, y, scale, *output[4:], *((R, c, F) if ctx.dist else ()))


def _head_backward(ctx, grads):
    g_loss, g_ce, g_dist, g_logits = grads[:4]  # the saved outputs' gradients are unused
    nothing = (None,) * 13
    if g_loss is None and g_ce is None and g_dist is None and (g_logits is None or not ctx.return_logits):
        return nothing
    T, A, X, y, scale, n, U, r, lse, xn, v, zn, cos, pv, ul, *basis = _saved(ctx)
    R, c, F = basis if ctx.dist else (None, None, None)
    need_dx, need_scale = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
    dT, dA, dscale, dX = torch.ops.demul_fast.triton_demul_head_backward(
        T, A, X, y, scale, R, c, F, n, U, ul, r, lse, xn, v, zn, cos, pv, g_loss, g_ce, g_dist,
        g_logits if ctx.return_logits else None, ctx.alpha, ctx.ls, need_dx, need_scale)
    return (dT, dA, dX if need_dx else None, None, dscale if need_scale else None,
            None, None, None, None, None, None, None, None)


_head.register_autograd(_head_backward, setup_context=_head_setup)
for _op in (_aggregate_bwd, _distill_bwd, _cosine_ce_bwd, _head_bwd):
    conventions.register_backward_op(_op, "triton")

OPS = [getattr(torch.ops.demul_fast, f"triton_{name}{suffix}").default
       for name in ("aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head")
       for suffix in ("", "_backward")]


# ---------------------------------------------------------------- the backend's four functions

def capability(call: Call) -> Capability:
    """Whether this backend can run ``call`` (demul_fast.ops.capability), and its plan.

    Device and dtype first (CUDA tensors, or CPU tensors under the interpreter; float32,
    bfloat16, float16), then frozen operands that require grad, then the kernels' size
    limits, which are the launch configurations failing to build: the plan is
    ``{"text": text_config, "ce": ce_config}`` for the call's shapes (each present where the
    call launches those kernels), and the launches read the same configurations back
    (text_head.text_config and cosine_ce.ce_config keep them by shape).
    """
    reason = kernel_dtype("triton", call.dtype)
    if reason is None and call.device is not None:
        device = torch.device(call.device)
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            reason = (f"the triton backend needs CUDA tensors, got tensors on {device} "
                      "(CPU tensors run only under the interpreter, TRITON_INTERPRET=1)")
    if reason is None and call.fn is not None:
        reason = frozen_operands("triton", call)
    if reason is not None or call.fn is None:
        return Capability(reason)
    plan = {}
    T = call.arg("text_features")
    try:
        if T is not None:
            c, m, d = T.shape
            plan["text"] = _text.text_config(c, m, d, distill_rank(call), T.element_size(),
                                             _text.wide_tiles_fit(T.device))
        feats = call.arg("image_features")
        if call.fn in ("cosine_cross_entropy", "demul_head") and feats is not None:
            classes = call.arg("class_features")
            cls = classes.shape[0] if classes is not None else T.shape[0]
            plan["ce"] = _ce.ce_config(feats.shape[0], cls, feats.shape[1])
    except ValueError as exc:
        return Capability(str(exc))
    return Capability(frozen_basis("triton", call), plan)


def aggregate_prompts(text_features, prompt_logits):
    """T [C, M, D], A [C, M] -> unit-norm class features [C, D] in T's dtype (SPEC 4)."""
    return torch.ops.demul_fast.triton_aggregate_prompts(text_features, prompt_logits)[0]


def cosine_cross_entropy(image_features, class_features, labels, scale, label_smoothing=0.0):
    """X [B, D], class features [C, D], labels [B] -> scalar fp32 loss (SPEC 4)."""
    s = conventions.scale_tensor(scale, image_features.device)
    return torch.ops.demul_fast.triton_cosine_cross_entropy(image_features, class_features, labels, s,
                                                            float(label_smoothing))[0]


def prompt_distill_loss(text_features, basis: DistillBasis):
    """T [C, M, D] and the frozen-phi basis (SPEC 4.3) -> scalar fp32 loss mean(1 - cos)."""
    return torch.ops.demul_fast.triton_prompt_distill_loss(text_features, *basis)[0]


def demul_head(text_features, prompt_logits, image_features, labels, scale, basis: Optional[DistillBasis] = None,
               alpha=1.0, label_smoothing=0.0, return_logits=False):
    """The whole head (SPEC 4, distillation by SPEC 4.3; basis None: none) as one op:
    HeadOutput(loss, ce_loss, distill_loss, logits or None)."""
    s = conventions.scale_tensor(scale, text_features.device)
    parts = tuple(basis) if basis is not None else (None,) * 5
    out = torch.ops.demul_fast.triton_demul_head(text_features, prompt_logits, image_features, labels, s, *parts,
                                                 float(alpha), float(label_smoothing), bool(return_logits))
    return HeadOutput(out[0], out[1], out[2], out[3] if return_logits else None)


__all__ = ["aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head", "HeadOutput",
           "DISTILL_BASIS", "OPS", "UNAVAILABLE_REASON", "capability"]

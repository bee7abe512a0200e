"""The "triton" backend: the DeMul head on the Triton kernels of ``demul_fast.kernels``.

Each function has the signature of its twin in ``demul_fast._torch_backend`` (inputs are
validated by ``demul_fast.functional`` before they get here). Every kernel launch sits
inside a ``torch.library.custom_op`` ("demul_fast::triton_*", no mutated arguments) with a
fake (meta) implementation, and each forward op is tied to a backward op by
``register_autograd``, so torch.compile traces them as opaque ops. ``OPS`` lists them.

Passes over T [C, M, D] (SPEC 4.2), for ``demul_head``:

* forward: one read of T (``text_forward``: aggregation and the distillation GEMM's
  epilogue statistics from the same register tile), then the CE sweep over X and u^;
* backward: the CE second sweep gives dL/du^ [C, D]; then one read of T
  (``text_backward``) produces dT and dA together, recomputing t^, w, u^ and z in
  registers. dz is finished from the saved per-row |z|, cos, |e| (no [C*M, K] tensor).

That is the floor for this design: the forward must read T once; dT[c, m] needs t^[c, m]
and du[c], and du depends on the CE over all classes, which can only start once the
forward has seen all of T, so T (or a T-sized saved copy, no fewer bytes) is read once
more in the backward. Gradient-in-forward for the distillation would save the backward's
two K-sweeps but would have to write and read a T-sized dT buffer, and the backward would
still read T for the aggregation term.

W, b, E and the labels get no gradient (SPEC 4.1: frozen); asking for one raises.
A tensor ``scale`` that requires grad gets d scale.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._validate import refuse_frozen_grads
from .common import HeadOutput

try:
    from .kernels import cosine_ce as _ce
    from .kernels import text_head as _text
    UNAVAILABLE_REASON = None
except Exception as exc:  # noqa: BLE001 - reported by demul_fast.backends
    _ce = _text = None
    UNAVAILABLE_REASON = f"triton kernels cannot be imported: {type(exc).__name__}: {exc}"


def _empty(like: Tensor) -> Tensor:
    """A placeholder output (custom ops cannot return None)."""
    return like.new_empty((0,))


def _contig(*ts):
    return [None if t is None else t.contiguous() for t in ts]


def _saved(ctx):
    """The saved tensors for a backward op. In a plain backward (grad mode off) they are
    detached: the backward ops are not differentiable. Under create_graph=True they stay
    attached so that differentiating a gradient reaches _no_double_backward and raises."""
    ts = ctx.saved_tensors
    return ts if torch.is_grad_enabled() else tuple(t.detach() for t in ts)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("the triton backend has no second derivatives (double backward); "
                              "use backend='torch' for higher-order gradients")


def _register_backward_op(op):
    op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------- aggregation

@torch.library.custom_op("demul_fast::triton_aggregate", mutates_args=())
def _aggregate(text_features: Tensor, prompt_logits: Tensor) -> Tensor:
    T, A = _contig(text_features, prompt_logits)
    return _text.text_forward(T, A, None, None, None, agg=True, dist=False)[0]


@_aggregate.register_fake
def _(text_features, prompt_logits):
    C, _, D = text_features.shape
    return text_features.new_empty((C, D))


@torch.library.custom_op("demul_fast::triton_aggregate_bwd", mutates_args=())
def _aggregate_bwd(text_features: Tensor, prompt_logits: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor]:
    T, A, G = _contig(text_features, prompt_logits, grad)
    return _text.text_backward(T, A, None, None, None, None, None, None, G, None, agg=True, dist=False)


@_aggregate_bwd.register_fake
def _(text_features, prompt_logits, grad):
    return torch.empty_like(text_features), torch.empty_like(prompt_logits)


def _aggregate_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _aggregate_backward(ctx, grad):
    T, A = _saved(ctx)
    dT, dA = torch.ops.demul_fast.triton_aggregate_bwd(T, A, grad)
    return dT, dA


_aggregate.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


# ---------------------------------------------------------------- distillation

@torch.library.custom_op("demul_fast::triton_distill", mutates_args=())
def _distill(text_features: Tensor, phi_weight: Tensor, phi_bias: Optional[Tensor],
             llm_embeddings: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [] fp32, |z|, cos, |e| [C*M] fp32 saved for the backward)."""
    T, W, b, E = _contig(text_features, phi_weight, phi_bias, llm_embeddings)
    _, zn, cos, en = _text.text_forward(T, None, W, b, E, agg=False, dist=True)
    return (1.0 - cos).mean(), zn, cos, en


@_distill.register_fake
def _(text_features, phi_weight, phi_bias, llm_embeddings):
    C, M, _ = text_features.shape
    f = text_features.new_empty
    return (f((), dtype=torch.float32), f((C * M,), dtype=torch.float32), f((C * M,), dtype=torch.float32),
            f((C * M,), dtype=torch.float32))


@torch.library.custom_op("demul_fast::triton_distill_bwd", mutates_args=())
def _distill_bwd(text_features: Tensor, phi_weight: Tensor, phi_bias: Optional[Tensor], llm_embeddings: Tensor,
                 zn: Tensor, cos: Tensor, en: Tensor, grad: Tensor) -> Tensor:
    T, W, b, E = _contig(text_features, phi_weight, phi_bias, llm_embeddings)
    g = grad.to(torch.float32).reshape(1)
    return _text.text_backward(T, None, W, b, E, zn, cos, en, None, g, agg=False, dist=True)[0]


@_distill_bwd.register_fake
def _(text_features, phi_weight, phi_bias, llm_embeddings, zn, cos, en, grad):
    return torch.empty_like(text_features)


def _distill_setup(ctx, inputs, output):
    T, W, b, E = inputs
    _, zn, cos, en = output
    ctx.has_bias = b is not None
    ctx.save_for_backward(T, W, E, zn, cos, en, *([b] if b is not None else []))


def _distill_backward(ctx, grad, *_unused_stats):
    T, W, E, zn, cos, en, *rest = _saved(ctx)
    b = rest[0] if ctx.has_bias else None
    dT = torch.ops.demul_fast.triton_distill_bwd(T, W, b, E, zn, cos, en, grad)
    return dT, None, None, None


_distill.register_autograd(_distill_backward, setup_context=_distill_setup)


# ---------------------------------------------------------------- cosine cross-entropy

@torch.library.custom_op("demul_fast::triton_cosine_ce", mutates_args=())
def _cosine_ce(image_features: Tensor, class_features: Tensor, labels: Tensor, scale: Tensor,
               label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """-> (loss [] fp32, lse [B] fp32 saved for the backward)."""
    X, U, y = _contig(image_features, class_features, labels)
    rows, lse, _ = _ce.ce_forward(X, U, y, scale, label_smoothing, False)
    return rows.mean(), lse


@_cosine_ce.register_fake
def _(image_features, class_features, labels, scale, label_smoothing):
    f = image_features.new_empty
    return f((), dtype=torch.float32), f((image_features.shape[0],), dtype=torch.float32)


@torch.library.custom_op("demul_fast::triton_cosine_ce_bwd", mutates_args=())
def _cosine_ce_bwd(image_features: Tensor, class_features: Tensor, labels: Tensor, scale: Tensor, lse: Tensor,
                   grad: Tensor, label_smoothing: float, need_dx: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (d class_features [C, D], d scale [] fp32, d image_features [B, D] or empty)."""
    X, U, y = _contig(image_features, class_features, labels)
    g = (grad.to(torch.float32) / X.shape[0]).reshape(1)
    dU, dscale, dX = _ce.ce_backward(X, U, y, scale, lse, g, None, label_smoothing, need_dx)
    return dU, dscale, dX if dX is not None else _empty(X)


@_cosine_ce_bwd.register_fake
def _(image_features, class_features, labels, scale, lse, grad, label_smoothing, need_dx):
    dX = torch.empty_like(image_features) if need_dx else image_features.new_empty((0,))
    return torch.empty_like(class_features), image_features.new_empty((), dtype=torch.float32), dX


def _cosine_ce_setup(ctx, inputs, output):
    X, U, y, scale, ls = inputs
    ctx.ls = ls
    ctx.save_for_backward(X, U, y, scale, output[1])


def _cosine_ce_backward(ctx, grad, _grad_lse):
    X, U, y, scale, lse = _saved(ctx)
    need_dx = ctx.needs_input_grad[0]
    dU, dscale, dX = torch.ops.demul_fast.triton_cosine_ce_bwd(X, U, y, scale, lse, grad, ctx.ls, need_dx)
    return (dX if need_dx else None), dU, None, (dscale if ctx.needs_input_grad[3] else None), None


_cosine_ce.register_autograd(_cosine_ce_backward, setup_context=_cosine_ce_setup)


# ---------------------------------------------------------------- the whole head

@torch.library.custom_op("demul_fast::triton_head", mutates_args=())
def _head(text_features: Tensor, prompt_logits: Tensor, image_features: Tensor, labels: Tensor, scale: Tensor,
          llm_embeddings: Optional[Tensor], phi_weight: Optional[Tensor], phi_bias: Optional[Tensor],
          alpha: float, label_smoothing: float, return_logits: bool) -> List[Tensor]:
    """-> [loss, ce, dist (all [] fp32), logits [B, C] or empty, then saved for the
    backward: u^ [C, D] fp32, lse [B], |z|, cos, |e| [C*M] (empty without distillation)]."""
    T, A, X, y, E, W, b = _contig(text_features, prompt_logits, image_features, labels, llm_embeddings,
                                  phi_weight, phi_bias)
    dist = E is not None
    U, zn, cos, en = _text.text_forward(T, A, W, b, E, agg=True, dist=dist, u_dtype=torch.float32)
    rows, lse, logits = _ce.ce_forward(X, U, y, scale, label_smoothing, return_logits)
    ce = rows.mean()
    if dist:
        dl = (1.0 - cos).mean()
        loss = ce + alpha * dl
    else:
        dl = torch.zeros_like(ce)
        loss = ce.clone()
        zn, cos, en = _empty(U), _empty(U), _empty(U)
    return [loss, ce, dl, logits if return_logits else _empty(X), U, lse, zn, cos, en]


@_head.register_fake
def _(text_features, prompt_logits, image_features, labels, scale, llm_embeddings, phi_weight, phi_bias,
      alpha, label_smoothing, return_logits):
    C, M, D = text_features.shape
    B = image_features.shape[0]
    f = text_features.new_empty
    f32 = torch.float32
    rows = C * M if llm_embeddings is not None else 0
    logits = f((B, C), dtype=image_features.dtype) if return_logits else f((0,), dtype=image_features.dtype)
    return [f((), dtype=f32), f((), dtype=f32), f((), dtype=f32), logits, f((C, D), dtype=f32),
            f((B,), dtype=f32), f((rows,), dtype=f32), f((rows,), dtype=f32), f((rows,), dtype=f32)]


@torch.library.custom_op("demul_fast::triton_head_bwd", mutates_args=())
def _head_bwd(text_features: Tensor, prompt_logits: Tensor, image_features: Tensor, labels: Tensor, scale: Tensor,
              llm_embeddings: Optional[Tensor], phi_weight: Optional[Tensor], phi_bias: Optional[Tensor],
              class_features: Tensor, lse: Tensor, zn: Tensor, cos: Tensor, en: Tensor, grad_ce: Tensor,
              grad_dist: Tensor, grad_logits: Optional[Tensor], label_smoothing: float,
              need_dx: bool) -> List[Tensor]:
    """grad_ce, grad_dist: [] dL/dL_ce and dL/dL_dist in total. -> [dT, dA, d scale [] fp32,
    d image_features (empty unless need_dx)]."""
    T, A, X, y, E, W, b, GL = _contig(text_features, prompt_logits, image_features, labels, llm_embeddings,
                                      phi_weight, phi_bias, grad_logits)
    g = (grad_ce.to(torch.float32) / X.shape[0]).reshape(1)
    dU, dscale, dX = _ce.ce_backward(X, class_features, y, scale, lse, g, GL, label_smoothing, need_dx,
                                     du_dtype=torch.float32)
    dist = E is not None
    gd = grad_dist.to(torch.float32).reshape(1) if dist else None
    dT, dA = _text.text_backward(T, A, W, b, E, zn, cos, en, dU, gd, agg=True, dist=dist)
    return [dT, dA, dscale, dX if dX is not None else _empty(X)]


@_head_bwd.register_fake
def _(text_features, prompt_logits, image_features, labels, scale, llm_embeddings, phi_weight, phi_bias,
      class_features, lse, zn, cos, en, grad_ce, grad_dist, grad_logits, label_smoothing, need_dx):
    dX = torch.empty_like(image_features) if need_dx else image_features.new_empty((0,))
    return [torch.empty_like(text_features), torch.empty_like(prompt_logits),
            text_features.new_empty((), dtype=torch.float32), dX]


def _head_setup(ctx, inputs, output):
    T, A, X, y, scale, E, W, b, alpha, ls, return_logits = inputs
    ctx.alpha, ctx.ls, ctx.return_logits = alpha, ls, return_logits
    ctx.optional = (E is not None, W is not None, b is not None)
    ctx.save_for_backward(T, A, X, y, scale, *output[4:], *[t for t in (E, W, b) if t is not None])


def _head_backward(ctx, grads):
    g_loss, g_ce, g_dist, g_logits = grads[:4]  # the saved outputs' gradients are unused
    T, A, X, y, scale, U, lse, zn, cos, en, *rest = _saved(ctx)
    E, W, b = (rest.pop(0) if present else None for present in ctx.optional)
    grad_ce = g_loss + g_ce
    grad_dist = ctx.alpha * g_loss + g_dist
    need_dx = ctx.needs_input_grad[2]
    dT, dA, dscale, dX = torch.ops.demul_fast.triton_head_bwd(
        T, A, X, y, scale, E, W, b, U, lse, zn, cos, en, grad_ce, grad_dist,
        g_logits if ctx.return_logits else None, ctx.ls, need_dx)
    return (dT, dA, dX if need_dx else None, None, dscale if ctx.needs_input_grad[4] else None,
            None, None, None, None, None, None)


_head.register_autograd(_head_backward, setup_context=_head_setup)
for _op in (_aggregate_bwd, _distill_bwd, _cosine_ce_bwd, _head_bwd):
    _register_backward_op(_op)

OPS = [
    torch.ops.demul_fast.triton_aggregate.default,
    torch.ops.demul_fast.triton_aggregate_bwd.default,
    torch.ops.demul_fast.triton_distill.default,
    torch.ops.demul_fast.triton_distill_bwd.default,
    torch.ops.demul_fast.triton_cosine_ce.default,
    torch.ops.demul_fast.triton_cosine_ce_bwd.default,
    torch.ops.demul_fast.triton_head.default,
    torch.ops.demul_fast.triton_head_bwd.default,
]


# ---------------------------------------------------------------- the backend's four functions

def _check_frozen(**tensors) -> None:
    refuse_frozen_grads("triton", **tensors)


def _scale_tensor(scale, device: torch.device) -> Tensor:
    """scale as a 0-dim fp32 tensor on ``device`` (autograd flows back to a tensor scale)."""
    if isinstance(scale, Tensor):
        return scale.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(scale), dtype=torch.float32, device=device)


def unsupported(fn: str, text_features=None, image_features=None, class_features=None,
                phi_weight=None, phi_bias=None, llm_embeddings=None, **_) -> Optional[str]:
    """Why this backend cannot run the call ``fn`` on these inputs (None if it can).

    Read by demul_fast.backends.select: an explicit backend="triton" raises with the reason,
    the automatic choice falls back to the next backend.
    """
    try:
        _check_frozen(phi_weight=phi_weight, phi_bias=phi_bias, llm_embeddings=llm_embeddings)
        if text_features is not None:
            c, m, d = text_features.shape
            _text.check_shape(c, m, d, text_features.dtype, text_features.device)
        feats = image_features if image_features is not None else class_features
        if fn in ("cosine_cross_entropy", "demul_head") and feats is not None:
            _ce.check_shape(feats.shape[1], feats.dtype, feats.device)
    except ValueError as exc:
        return str(exc)
    return None


def aggregate_prompts(text_features, prompt_logits):
    """T [C, M, D], A [C, M] -> unit-norm class features [C, D] in T's dtype (SPEC 4)."""
    return torch.ops.demul_fast.triton_aggregate(text_features, prompt_logits)


def cosine_cross_entropy(image_features, class_features, labels, scale, label_smoothing=0.0):
    """X [B, D], class features [C, D], labels [B] -> scalar fp32 loss (SPEC 4)."""
    s = _scale_tensor(scale, image_features.device)
    return torch.ops.demul_fast.triton_cosine_ce(image_features, class_features, labels, s,
                                                 float(label_smoothing))[0]


def prompt_distill_loss(text_features, phi_weight, phi_bias, llm_embeddings):
    """T [C, M, D], W [K, D], b [K] or None, E [C, K] -> scalar fp32 loss (SPEC 4)."""
    _check_frozen(phi_weight=phi_weight, phi_bias=phi_bias, llm_embeddings=llm_embeddings)
    return torch.ops.demul_fast.triton_distill(text_features, phi_weight, phi_bias, llm_embeddings)[0]


def demul_head(text_features, prompt_logits, image_features, labels, scale, llm_embeddings=None,
               phi_weight=None, phi_bias=None, alpha=1.0, label_smoothing=0.0, return_logits=False):
    """The whole head (SPEC 4) as one op: HeadOutput(loss, ce_loss, distill_loss, logits or None)."""
    _check_frozen(phi_weight=phi_weight, phi_bias=phi_bias, llm_embeddings=llm_embeddings)
    s = _scale_tensor(scale, text_features.device)
    out = torch.ops.demul_fast.triton_head(text_features, prompt_logits, image_features, labels, s,
                                           llm_embeddings, phi_weight, phi_bias, float(alpha),
                                           float(label_smoothing), bool(return_logits))
    return HeadOutput(out[0], out[1], out[2], out[3] if return_logits else None)


__all__ = ["aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head", "HeadOutput",
           "OPS", "UNAVAILABLE_REASON", "unsupported"]

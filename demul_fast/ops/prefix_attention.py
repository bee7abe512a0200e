"""``demul_fast::prefix_attention``: one layer's prefix-shared attention as one custom op on
packed rows (docs/SPEC.md section 3.1; the layout: demul_fast/prefix_attention.py).

    prefix_attention(q, k, v, seq_table, grp_table, q_rows, kv_rows, out_rows, mask,
                     heads, p, g, rows) -> (out [rows, W], lse [rows, heads])

lse (the log-sum-exp of each row's scaled scores) is float32 (float64 for float64 inputs,
which only the CPU composite takes).
    prefix_attention_backward(q, k, v, out, lse, grad, <the same layout>) -> dqkv [rows, 3W]

q, k, v: [R, W] input rows (row stride free, unit column stride: views of the qkv product),
R = rows, or R = G*P + Ts/G when the inputs hold group 0's suffix rows for every group (the
first layer's shared suffix): the outputs and the backward's dq, dk, dv are in the ``rows``
packed rows; autograd sums the gradient of the shared rows over the groups. The backward
writes dq, dk, dv side by side in one [rows, 3W] tensor and autograd hands out its three
column blocks (``split``): where q, k, v are the ``chunk`` of one qkv product, the chunk's
backward (a ``cat`` of those blocks) is the tensor itself, which inductor recognises
(cat of a split, in order), so no copy kernel joins dq, dk and dv. Two descriptions
of the same layout travel with the call, both built at plan time
(``PackedLayout.attention_tables`` / ``attention_maps``):

* on CUDA tensors: ONE Triton launch forward and ONE backward
  (``demul_fast.kernels.prefix_attention``: reads the packed rows through ``seq_table`` and
  ``grp_table``; prefix key/value gradients summed over the group's queries inside the
  kernel, no atomics);
* on CPU tensors: the composite the compiled path ran before (the query slots and broadcast
  key/value blocks of ``q_rows`` / ``kv_rows`` / ``mask``, ATen's CPU flash attention forward
  and backward, the gradients gathered back to packed rows), unless ``TRITON_ON_CPU`` is set
  (the tests run the Triton kernels in the interpreter that way).

Under torch.compile the op is opaque: one call in the graph forward and one backward, so the
compiled step's launch count counts it as one launch each, which is what the CUDA path
launches. The backward op is not differentiable again.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..common import accumulation_dtype
from . import custom_op_conventions as conventions

try:
    from ..kernels import prefix_attention as _kernel
    UNAVAILABLE_REASON = None
except Exception as exc:  # noqa: BLE001 - the CPU composite still runs
    _kernel = None
    UNAVAILABLE_REASON = f"triton kernels cannot be imported: {type(exc).__name__}: {exc}"

# Tests set this (with TRITON_INTERPRET=1) to run the Triton kernels on CPU tensors.
TRITON_ON_CPU = False


def _use_triton(x: Tensor) -> bool:
    if x.is_cuda or TRITON_ON_CPU:
        if _kernel is None:
            raise RuntimeError(f"prefix_attention: {UNAVAILABLE_REASON}")
        return True
    return False


# ---------------------------------------------------------------- the CPU composite

def _blocks(x: Tensor, kv_rows: Tensor, g: int, p: int, items: int, s: int, heads: int) -> Tensor:
    """[G*items, H, P + S, hd]: each item's keys (values): its group's prefix, then its S slots."""
    hd = x.shape[-1] // heads
    buf = x.index_select(0, kv_rows)
    pre = buf[:g * p].view(g, 1, p, heads, hd).transpose(2, 3).expand(g, items, heads, p, hd)
    suf = buf[g * p:].view(g, items, s, heads, hd).transpose(2, 3)
    return torch.cat([pre, suf], dim=3).reshape(g * items, heads, p + s, hd)


def _slots(q: Tensor, q_rows: Tensor, b: int, s: int, heads: int) -> Tensor:
    return q.index_select(0, q_rows).view(b, s, heads, q.shape[1] // heads).transpose(1, 2)


def _composite_forward(q, k, v, q_rows, kv_rows, out_rows, mask, heads, p, g):
    b, s = mask.shape[0], mask.shape[2]
    w = q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _slots(q, q_rows, b, s, heads), _blocks(k, kv_rows, g, p, b // g, s, heads),
        _blocks(v, kv_rows, g, p, b // g, s, heads), attn_mask=mask, scale=(w // heads) ** -0.5)
    out = out.transpose(1, 2).reshape(b * s, w).index_select(0, out_rows)
    lse = lse.transpose(1, 2).reshape(b * s, heads).index_select(0, out_rows).to(accumulation_dtype(q.dtype))
    return out, lse


def _composite_backward(q, k, v, out, lse, grad, q_rows, kv_rows, out_rows, mask, heads, p, g):
    b, s = mask.shape[0], mask.shape[2]
    w = q.shape[1]
    hd = w // heads
    items = b // g

    def to_slots(x: Tensor, fill: float) -> Tensor:  # [rows, C] -> [B, C/hd-heads, S, .] query-slot layout
        buf = x.new_full((b * s, x.shape[1]), fill)
        buf[out_rows] = x
        return buf

    lse_s = to_slots(lse, float("inf")).view(b, s, heads).transpose(1, 2)  # pad slots: p = 0
    o_s = to_slots(out, 0.0).view(b, s, heads, hd).transpose(1, 2)
    g_s = to_slots(grad, 0.0).view(b, s, heads, hd).transpose(1, 2)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g_s, _slots(q, q_rows, b, s, heads), _blocks(k, kv_rows, g, p, items, s, heads),
        _blocks(v, kv_rows, g, p, items, s, heads), o_s, lse_s, 0.0, False, attn_mask=mask, scale=hd ** -0.5)
    dq = dq.transpose(1, 2).reshape(b * s, w).index_select(0, out_rows)

    def to_rows(d: Tensor) -> Tensor:  # [B, H, P + S, hd] -> [rows, W]: prefix summed over the items
        pre = d[:, :, :p].reshape(g, items, heads, p, hd).sum(1).transpose(1, 2).reshape(g * p, w)
        suf = d[:, :, p:].transpose(1, 2).reshape(b * s, w).index_select(0, out_rows[g * p:])
        return torch.cat([pre, suf])
    return dq, to_rows(dk), to_rows(dv)


# ---------------------------------------------------------------- the custom ops

@torch.library.custom_op("demul_fast::prefix_attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, seq_table: Tensor, grp_table: Tensor, q_rows: Tensor,
               kv_rows: Tensor, out_rows: Tensor, mask: Tensor, heads: int, p: int, g: int,
               rows: int) -> Tuple[Tensor, Tensor]:
    if _use_triton(q):
        return _kernel.forward(q, k, v, seq_table, grp_table, heads, p, rows)
    return _composite_forward(q, k, v, q_rows, kv_rows, out_rows, mask, heads, p, g)


@_attention.register_fake
def _(q, k, v, seq_table, grp_table, q_rows, kv_rows, out_rows, mask, heads, p, g, rows):
    return q.new_empty((rows, q.shape[1])), q.new_empty((rows, heads), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("demul_fast::prefix_attention_backward", mutates_args=())
def _attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad: Tensor, seq_table: Tensor,
                   grp_table: Tensor, q_rows: Tensor, kv_rows: Tensor, out_rows: Tensor, mask: Tensor, heads: int,
                   p: int, g: int, rows: int) -> Tensor:
    if _use_triton(q):
        return _kernel.backward(q, k, v, out, lse, grad, seq_table, grp_table, heads, p, rows, _grad_dtype(q, rows))
    d = _composite_backward(q, k, v, out, lse, grad, q_rows, kv_rows, out_rows, mask, heads, p, g)
    return torch.cat(d, 1).to(_grad_dtype(q, rows))


def _grad_dtype(q: Tensor, rows: int) -> torch.dtype:
    """The backward's dtype: q's, or float32 when the input rows are shared (the gradient of a
    shared row is then summed over the groups in float32 and rounded once)."""
    return q.dtype if q.shape[0] == rows else torch.promote_types(q.dtype, torch.float32)


@_attention_bwd.register_fake
def _(q, k, v, out, lse, grad, seq_table, grp_table, q_rows, kv_rows, out_rows, mask, heads, p, g, rows):
    return q.new_empty((rows, 3 * q.shape[1]), dtype=_grad_dtype(q, rows))


conventions.register_backward_op(_attention_bwd, "prefix_attention")


def _setup(ctx, inputs, output):
    q, k, v, seq_table, grp_table, q_rows, kv_rows, out_rows, mask, heads, p, g, rows = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, output[0], output[1], seq_table, grp_table, q_rows, kv_rows, out_rows, mask)
    ctx.args = (heads, p, g, rows)


def _to_inputs(d: Tensor, n_in: int, g: int, p: int, rows: int, dtype: torch.dtype) -> Tensor:
    """The gradient of the [rows, W] packed rows as that of the [n_in, W] input rows: the same
    rows, or (shared suffix) group 0's suffix rows standing for every group's: summed over them."""
    if n_in == rows:
        return d
    return torch.cat([d[:g * p], d[g * p:].view(g, (rows - g * p) // g, d.shape[1]).sum(0)]).to(dtype)


def _backward(ctx, grad, _grad_lse):
    if grad is None:
        return (None,) * 13
    q, k, v, out, lse, seq_table, grp_table, q_rows, kv_rows, out_rows, mask = conventions.saved_tensors(ctx)
    heads, p, g, rows = ctx.args
    dqkv = torch.ops.demul_fast.prefix_attention_backward(
        q, k, v, out, lse, grad, seq_table, grp_table, q_rows, kv_rows, out_rows, mask, heads, p, g, rows)
    w = q.shape[1]
    # split_with_sizes along dim 1, written as 1: inductor's post-grad pattern cat(split(x)) -> x
    # compares the split's and the cat's dims as written, and the qkv chunk's backward cat
    # reaches it with dim 1 (counted on a 4-layer tower: split(w, 1) and dims -1 both left a
    # copy kernel per layer; split_with_sizes(.., 1) removes it)
    return tuple(_to_inputs(dqkv, q.shape[0], g, p, rows, q.dtype).split_with_sizes([w, w, w], 1)) + (None,) * 10


_attention.register_autograd(_backward, setup_context=_setup)

OPS = [torch.ops.demul_fast.prefix_attention.default, torch.ops.demul_fast.prefix_attention_backward.default]


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, maps: Tuple[Tensor, ...], heads: int, p: int, g: int,
                     rows: int) -> Tuple[Tensor, Tensor]:
    """(out [rows, W], lse [rows, heads]) of the layer's attention; ``maps`` = (seq_table,
    grp_table, q_rows, kv_rows, out_rows, mask), ``PackedLayout.op_maps``. Checks the
    arguments (shapes, dtypes, devices) before any kernel runs."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 2 or x.shape[1] != q.shape[1] or x.stride(-1) != 1:
            raise ValueError(f"prefix_attention: {name} must be [R, W={q.shape[-1]}] with unit column stride, "
                             f"got shape {tuple(x.shape)} strides {x.stride()}")
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"prefix_attention: {name} is {x.dtype} on {x.device}, q is {q.dtype} on {q.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"prefix_attention: q, k, v must have the same rows, got {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    if heads < 1 or q.shape[1] % heads:
        raise ValueError(f"prefix_attention: heads={heads} must divide W={q.shape[1]}")
    if not q.dtype.is_floating_point or q.dtype == torch.float64 and _use_triton(q):
        raise TypeError(f"prefix_attention: q's dtype {q.dtype} is not supported by the kernel "
                        "(float32, bfloat16, float16)")
    if len(maps) != 6:
        raise ValueError(f"prefix_attention: maps must be the 6 tensors of PackedLayout.op_maps, got {len(maps)}")
    seq_table, grp_table = maps[0], maps[1]
    for name, t in (("seq_table", seq_table), ("grp_table", grp_table)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[1] != 4 or t.device != q.device:
            raise ValueError(f"prefix_attention: {name} must be int32 [n, 4] on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if grp_table.shape[0] != g:
        raise ValueError(f"prefix_attention: grp_table has {grp_table.shape[0]} groups, g={g}")
    return torch.ops.demul_fast.prefix_attention(q, k, v, *maps, heads, p, g, rows)


__all__ = ["prefix_attention", "OPS", "TRITON_ON_CPU", "UNAVAILABLE_REASON"]

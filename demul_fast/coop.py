"""A drop-in, exact and faster replacement for CoOp's ``TextEncoder`` (docs/SPEC.md section 3.1).

CoOp-style code bases encode prompts with

    x = prompts + positional_embedding            # prompts [N, 77, width]
    x = ln_final(transformer(x, attn_mask))
    out = x[arange(N), tokenized_prompts.argmax(-1)] @ text_projection     # [N, D]

``CoOpTextEncoder(clip_model)`` has the same ``forward(prompts, tokenized_prompts)`` and
returns the same ``[N, D]`` up to float rounding, doing less work:

* **truncation**: only the first ``max(EOT) + 1`` positions run (positions after a row's
  EOT never reach its pooled output: the tower is causal);
* **prefix sharing**: when every row starts with the same block of embeddings ([SOT] and
  the learned context in CoOp's unified-context layout), that block runs once and the N
  suffixes attend to its keys and values (``text_encoder.prefix_shared_forward``).
* **packing**: the rows' positions up to their own EOT are packed into one batch of
  tokens for the linear layers (no padding to the longest row); ``prefix_shared_forward``
  does this, with an empty shared block when nothing is shared.

When is sharing gradient-safe?  The shared block is computed from row 0's copy, so in the
backward pass the gradients of all N rows' copies arrive summed, in row 0. That is exactly
what a parameter broadcast to the rows expects (CoOp's ``ctx.unsqueeze(0).expand(n_cls,
-1, -1)``: the backward of ``expand`` sums over rows anyway). It is wrong for rows that
are *different* parameters which merely hold equal values (class-specific contexts, CSC,
initialised from one phrase): each needs its own gradient. Value equality alone therefore
never decides. A leading block is shared only if both hold:

1. its embeddings are bitwise equal in every row (checked on the values, every call);
2. the gradient that reaches it is consumed only as a sum over rows: ``prompts`` needs no
   gradient at all, or its autograd graph shows that, at those positions, it is built
   (through ``cat`` along the sequence, dtype casts and copies) from tensors that need no
   gradient or are broadcast along the rows by ``expand``. Anything else (a per-row leaf
   such as a CSC context, an unknown op) ends the shareable block: no sharing, rows only
   truncated and packed, still exact. The graph walk reads autograd node attributes
   (``_input_metadata``, ``_saved_dim``, ``_saved_self_sym_sizes``); a torch version
   without them gets no sharing, never a wrong gradient.

So gradients w.r.t. parameters (leaves) are exact in every case. The gradient w.r.t. the
intermediate ``prompts`` tensor itself (e.g. with ``prompts.retain_grad()``) differs from
CoOp's in the shared block: only its row-sum is the same.

Groups (CoCoOp): ``prompts [B, N, L, W]`` are B groups of N rows with one tokenization
(CoCoOp's per-image contexts ``ctx + meta_net(x_b)``, each expanded over the C classes).
One call runs all groups: each group's shared block once (from its row 0), all suffixes
packed. The walk then asks the same question per group: the block's gradient must be
consumed as a sum over the rows of each group. It follows ``stack`` / ``unsqueeze`` of groups,
``unbind`` / ``select`` of one group (CoCoOp's ``for pts_i in prompts`` loop), ``cat`` along
groups, features or the sequence, and ``expand`` (of the rows: shareable; of the groups
only: its source is asked); anything else ends the block.

Deep prompts (MaPLe): ``compound_prompts_deeper_text`` (J blocks ``[n_ctx, W]``) replace
positions 1..n_ctx of every row at layers 1..J. Those positions precede the class tokens
and the tower is causal, so the shared block stays shared at every layer.

Cost and synchronisation: a plan (token analysis, the walk's result, the shared length P,
the index maps) is made once per ``tokenized_prompts`` object/version, shapes and walk
result, with host reads (the EOT positions, one bitwise comparison of the ``[B, N, P, W]``
block, the index maps' sizes). A reused plan reads nothing on the host: the block's equality
is asserted on the device (``torch._assert_async``), so an eager step has no host
synchronisation after the first, and a ``torch.compile(fullgraph=True)`` step (CUDA-graph
capturable) runs the plan made by an eager call (``CoOpTextEncoder.plan`` or one eager
forward), guarded on the device by the EOT positions of ``tokenized_prompts``. Without a
recorded gradient (evaluation), the equality is read on the host every eager call unless
``assume_shared=True`` (values of a class-specific context may have changed since the plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import towers
from .prefix_attention import PackedLayout
from .text_encoder import TextTower, prefix_shared_forward, text_tower

Tensor = torch.Tensor

__all__ = ["CoOpTextEncoder", "CoOpPlan"]


@dataclass(frozen=True)
class CoOpPlan:
    """What the last ``CoOpTextEncoder.forward`` ran.

    rows:       N, sequences encoded
    seq_len:    positions of the longest row after truncation (max EOT + 1)
    shared_len: leading positions computed once for all rows (0: no sharing)
    tokens:     token positions the linear layers ran: per group, shared_len + sum over rows
                of (EOT + 1 - shared_len), against N * 77 for CoOp
    groups:     B, groups of N rows (1 for prompts [N, L, W])
    """

    rows: int
    seq_len: int
    shared_len: int
    tokens: int
    groups: int = 1


@dataclass
class _TokenInfo:
    ids: Tensor        # the tokenized_prompts tensor this was computed from (kept alive)
    version: Optional[int]  # its _version when computed (None: not cached)
    device: torch.device
    eot: Tensor        # [N] int64 on `device`: pooled position of each row
    lengths: List[int]  # eot + 1 per row (host copy)
    seq_len: int       # max(eot) + 1
    min_eot: int


# --------------------------------------------------------------------------------------
# Gradient safety: which leading positions receive a gradient that is only used summed
# over rows?
# --------------------------------------------------------------------------------------

_PASS_THROUGH = ("ToCopyBackward0", "CloneBackward0")  # elementwise, shape-preserving
_PICK = ("UnbindBackward0", "SelectBackward0")  # one slice of a tensor with one more dim


def _node_shape(node, output_nr: int = 0):
    """Shape of the gradient ``node`` receives at ``output_nr`` (= its forward output)."""
    return tuple(node._input_metadata[output_nr].shape)


def _row_summed_len(node, output_nr: int = 0, rdim: int = 0) -> float:
    """Leading positions of a tensor ``[*groups, N, L, W]`` produced by ``node`` (``rdim`` =
    number of group dims: the rows are dim ``rdim``, the sequence dim ``rdim + 1``) whose
    gradient reaches the leaves only through its sum over the rows of each group.
    Conservative: 0 whenever the graph is not recognised. ``math.inf``: every position."""
    if node is None:  # the input needs no gradient
        return math.inf
    try:
        shape = _node_shape(node, output_nr)
        nd = len(shape)
        if nd != rdim + 3:
            return 0
        if shape[rdim] == 1:
            return math.inf
        name = node.name()
        if name == "ExpandBackward0":
            src = tuple(node._saved_self_sym_sizes)
            lead = nd - len(src)  # dims expand created in front
            if rdim < lead or int(src[rdim - lead]) == 1:
                return math.inf  # the rows are one row broadcast: its gradient is their sum
            if int(src[rdim + 1 - lead]) == shape[rdim + 1]:  # only groups (or features) broadcast
                nxt, nr = node.next_functions[0]
                return _row_summed_len(nxt, nr, rdim - lead)
            return 0
        if name in _PASS_THROUGH:
            nxt, nr = node.next_functions[0]
            return _row_summed_len(nxt, nr, rdim)
        if name in ("StackBackward0", "UnsqueezeBackward0"):
            # a group dim stacked or inserted in front of the rows: the inputs have one
            # group dim fewer (each input of a stack is one group, or a block of groups)
            if node._saved_dim % nd >= rdim:
                return 0
            return min(_row_summed_len(nxt, nr, rdim - 1) for nxt, nr in node.next_functions)
        if name in _PICK:
            # one slice along a dim before the rows: the same question, one group dim more
            if node._saved_dim % (nd + 1) > rdim:
                return 0
            nxt, nr = node.next_functions[0]
            return _row_summed_len(nxt, nr, rdim + 1)
        if name == "CatBackward0":
            dim = node._saved_dim % nd
            if dim == rdim:
                return 0  # rows from different tensors
            if dim != rdim + 1:  # groups or features from several tensors: each piece alike
                return min(_row_summed_len(nxt, nr, rdim) for nxt, nr in node.next_functions)
            # pieces along the sequence. A piece that needs no gradient has no node, so its
            # length is unknown here; counting it as 0 gives a lower bound of the positions
            # where later pieces start.
            start_lb, safe = 0, math.inf
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                length = _node_shape(nxt, nr)[rdim + 1]
                r = _row_summed_len(nxt, nr, rdim)
                if r < length:
                    safe = min(safe, start_lb + r)
                start_lb += length
            return safe
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return 0  # private autograd attributes missing in this torch version: no sharing
    return 0


def gradient_shareable_len(prompts: Tensor) -> float:
    """Leading positions of ``prompts [N, L, W]`` (or ``[B, N, L, W]``: B groups of N rows)
    that may be computed from each group's row 0 alone without changing any leaf's
    gradient (see the module docstring)."""
    rdim = prompts.dim() - 3
    if not (prompts.requires_grad and torch.is_grad_enabled()) or prompts.shape[rdim] <= 1:
        return math.inf
    if prompts.grad_fn is None:
        return 0  # a leaf of N rows: every row is its own parameter
    return _row_summed_len(prompts.grad_fn, 0, rdim)


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _rows_equal(prompts: Tensor, limit: int) -> Tensor:
    """[limit] bool on the device: True where every row of each group of ``prompts``
    ``[*groups, N, L, W]`` holds the bits of the group's row 0 (-0.0 != 0.0, a NaN equals
    the same NaN)."""
    head = prompts.detach()[..., :limit, :]
    if head.is_floating_point():
        head = head.view(_BITS[head.element_size()])
    rdim = head.dim() - 3
    return (head == head.narrow(rdim, 0, 1)).all(dim=-1).reshape(-1, limit).all(dim=0)


def equal_prefix_len(prompts: Tensor, limit: int) -> int:
    """Number of leading positions (at most ``limit``) at which all rows of each group of
    ``prompts [N, L, W]`` / ``[B, N, L, W]`` are bitwise equal. One host read."""
    if limit <= 0:
        return 0
    return int(_rows_equal(prompts, limit).cumprod(0).sum())


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------

def _version_of(t: Tensor) -> Optional[int]:
    """The in-place version counter, None for tensors without one (inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass
class _Plan:
    """One decision of ``CoOpTextEncoder``, made on the host once and reused without host
    reads while its key (shapes, dtype, device, whether a gradient is recorded), its token
    analysis (the same ``tokenized_prompts`` object and version) and the gradient walk's
    result stay the same."""

    info: _TokenInfo
    limit: float          # leading positions the gradient walk allowed (inf: no gradient recorded)
    shared: int           # P, the shared leading block of each group
    suffix_eot: Tensor    # [B, N] EOT positions relative to the suffix start
    layout: Optional[PackedLayout]    # the "prefix" attention's index maps
    masked: Optional["_GroupRows"]    # the "masked" attention's (one of the two is set)
    summary: CoOpPlan


@dataclass
class _GroupRows:
    """Index maps of the "masked" attention: each group's rows packed, in the same order
    for every group (one tokenization): [its P shared positions ; each row's positions P..EOT],
    R = P + sum(EOT + 1 - P) rows. One scaled-dot-product attention per layer runs on all
    groups with one additive mask [R, R] (0 where visible: the shared block causally, each
    row's own positions causally; -inf elsewhere), so the groups need no gather or scatter
    between layers."""

    slots: Tensor       # [R - P] index into a group's suffix block [N * S] (valid positions)
    positions: Tensor   # [R] position of each packed row (for the positional embedding)
    mask: Tensor        # [R, R] additive, the prompts' dtype
    eot: Tensor         # [N] packed row of each row's EOT
    eot_mask: Tensor    # [N, R] additive: the keys each EOT query sees
    p: int
    seq_eot: Tensor     # [N] EOT position of each row
    deep: Optional[Tuple[int, Tensor, Tensor]] = None  # deep_rows(k) of the tower's k, built at plan time

    def deep_rows(self, k: int) -> Tuple[Tensor, Tensor]:
        """(packed rows holding positions 1..k, the deep prompt's row for each): index
        arithmetic, no host read (positions 1..k must precede every EOT)."""
        if self.deep is not None and self.deep[0] == k:
            return self.deep[1], self.deep[2]
        p, dev = self.p, self.eot.device
        pre = torch.arange(1, max(1, min(1 + k, p)), device=dev)                    # in the shared block
        suf = torch.arange(max(1, p), max(1 + k, p), device=dev)                    # in each row's part
        starts = self.eot - (self.seq_eot - p)                                      # packed row of position P
        rows = torch.cat([pre, (starts.view(-1, 1) + (suf - p).view(1, -1)).flatten()])
        src = torch.cat([pre - 1, (suf - 1).repeat(self.seq_eot.numel())])
        return rows, src

    @staticmethod
    def build(p: int, n: int, s: int, eot: Tensor, dtype: torch.dtype, deep_ctx: Optional[int]) -> "_GroupRows":
        dev = eot.device
        pos = torch.arange(s, device=dev)
        valid = (pos.view(1, s) + p <= eot.view(n, 1))                                  # [N, S]
        slots = valid.flatten().nonzero().flatten()                                      # host sync: plan time only
        seq = torch.cat([torch.full((p,), -1, device=dev), slots // s])                  # -1: the shared block
        positions = torch.cat([torch.arange(p, device=dev), p + slots % s])
        r = positions.numel()
        order = torch.arange(r, device=dev)
        visible = (order.view(1, r) <= order.view(r, 1)) & ((seq.view(1, r) == -1) | (seq.view(1, r) == seq.view(r, 1)))
        zero, ninf = torch.zeros((), dtype=dtype, device=dev), torch.tensor(float("-inf"), dtype=dtype, device=dev)
        eot_rows = torch.cumsum(eot + 1 - p, 0) - 1 + p
        out = _GroupRows(slots=slots, positions=positions, mask=torch.where(visible, zero, ninf), eot=eot_rows,
                         eot_mask=torch.where(visible[eot_rows], zero, ninf), p=p, seq_eot=eot)
        if deep_ctx:
            out.deep = (deep_ctx, *out.deep_rows(deep_ctx))
        return out


def masked_group_forward(tower: TextTower, x: Tensor, p: int, rows: _GroupRows, deep: List[Tensor]) -> Tensor:
    """The tower on groups x [G, N, S', W] (positions 0..S'-1; positions [0, P) taken from
    each group's row 0) through ``_GroupRows``: [G, N, D]. Exact: the same sums as the
    full-length tower on each row (causal; positions after each EOT dropped)."""
    g, n, _, w = x.shape
    s = x.shape[2] - p
    pos = tower.positional_embedding.to(x.dtype).index_select(0, rows.positions)          # [R, W]
    h = torch.cat([x[:, 0, :p], x[:, :, p:].reshape(g, n * s, w).index_select(1, rows.slots)], dim=1) + pos
    last = len(tower.layers) - 1
    deep_rows, deep_src = rows.deep_rows(deep[0].shape[0]) if deep else (None, None)
    for i, layer in enumerate(tower.layers):
        if 1 <= i <= len(deep):  # MaPLe: positions 1..k of layer i's input are deep[i - 1]
            d = deep[i - 1].to(h.dtype).index_select(0, deep_src)
            h = h.index_copy(1, deep_rows, d.unsqueeze(0).expand(g, -1, -1))
        q, k, v = (t.view(g, -1, layer.heads, w // layer.heads).transpose(1, 2) for t in layer.qkv(layer.ln_1(h)))
        mask = rows.mask
        if i == last:  # only the EOT rows are pooled: their queries, attention output and MLP
            h, q, mask = h.index_select(1, rows.eot), q.index_select(2, rows.eot), rows.eot_mask
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(g, -1, w)
        h = h + layer.ls_1(layer.out_proj(a))
        h = h + layer.ls_2(layer.mlp(layer.ln_2(h)))
    if last < 0:
        h = h.index_select(1, rows.eot)
    return tower.project(tower.ln_final(h))


class CoOpTextEncoder(nn.Module):
    """CoOp's ``TextEncoder``, exact, truncated after the last EOT and prefix-shared.

    clip_model:     open_clip ``CLIP`` / ``CustomTextCLIP``, transformers ``CLIPModel`` or
                    OpenAI ``clip.model.CLIP`` (float16-cast weights compute in float16, as
                    CoOp does; MaPLe's deep-prompt blocks are recognised) with a causal,
                    EOT-pooled text tower (else ``text_encoder.UnsupportedTextTower``). Its
                    text modules are registered here as submodules, as CoOp's ``TextEncoder``
                    does, so ``.to()`` / ``.half()`` of the enclosing model move them and
                    ``nn.DataParallel`` replicas use their own copies; weights are not copied.
    share_prefix:   False turns prefix sharing off (truncation stays).
    min_shared_len: share only a common block of at least this many positions.
    attention:      how the rows attend (both exact). "prefix": ``prefix_shared_forward``
                    (the shared block's keys once, each row's suffix apart; work linear in N).
                    "masked": each group's R = P + sum(EOT + 1 - P) packed positions in one
                    scaled-dot-product attention per layer with a fixed [R, R] mask (fewest
                    launches, no gathers between layers; attention work R^2). "auto" (default):
                    "masked" when R <= width (its attention then costs at most ~1/6 of the
                    layer's linear work), else "prefix".
    assume_shared:  True: skip the gradient walk (the caller states that a leading block equal
                    in every row of a group is a broadcast, consumed as a sum over the rows),
                    and reuse the plan without a host read in evaluation (no gradient) too.

    ``forward(prompts, tokenized_prompts, compound_prompts_deeper_text=None)``:

    * ``prompts [N, L, width]`` -> ``[N, D]``; or ``[B, N, L, width]`` (B groups of N rows
      sharing one tokenization, CoCoOp's per-image prompts) -> ``[B, N, D]`` in one pass, each
      group's shared leading block once;
    * ``tokenized_prompts [N, L]`` (L <= the context length, 77 for CLIP);
    * ``compound_prompts_deeper_text``: MaPLe's deep prompts, J tensors ``[n_ctx, width]``
      that replace positions 1..n_ctx at layers 1..J (J < layers).

    Unnormalised, CoOp's (MaPLe's) result up to float rounding, in the dtype of ``prompts``.
    ``last_plan`` (a ``CoOpPlan``) says what the last eager call ran.

    Host reads happen only when a plan is made: a new ``tokenized_prompts`` (or one modified
    in place), new shapes, or a different result of the gradient walk (a host-only walk over
    autograd nodes, every eager call that records a gradient). A reused plan checks its
    shared block's bitwise equality on the device (``torch._assert_async``, no host read).
    Without a recorded gradient (evaluation) the equality is read on the host every call
    unless ``assume_shared``. Under ``torch.compile`` the walk cannot run: the encoder uses
    the plan its last eager call made for the same shapes (call it eagerly once, e.g. one
    step, before compiling with ``fullgraph=True``), guarded on the device by the EOT
    positions of ``tokenized_prompts`` and the shared block's equality; with no such plan it
    runs eagerly (a graph break).
    """

    def __init__(self, clip_model: nn.Module, share_prefix: bool = True, min_shared_len: int = 2,
                 assume_shared: bool = False, attention: str = "auto"):
        super().__init__()
        if not isinstance(min_shared_len, int) or min_shared_len < 1:
            raise ValueError(f"min_shared_len must be an int >= 1, got {min_shared_len!r}")
        if attention not in ("auto", "masked", "prefix"):
            raise ValueError(f"attention must be 'auto', 'masked' or 'prefix', got {attention!r}")
        self.attention = attention
        text_tower(clip_model)  # raises UnsupportedTextTower with the reason
        self._register_text_modules(clip_model)
        self.share_prefix = bool(share_prefix)
        self.min_shared_len = min_shared_len
        self.assume_shared = bool(assume_shared)
        self.last_plan: Optional[CoOpPlan] = None
        self._tokens: Optional[_TokenInfo] = None
        self._plans: Dict[tuple, _Plan] = {}
        self.tower  # build the view of the registered modules now (refusals surface here)

    def _register_text_modules(self, clip_model: nn.Module) -> None:
        """Register what the text tower uses (no copies), under the names its family reads
        (``towers.TowerFamily.text_modules``), so that the tower view is built from this
        module's own submodules."""
        for name, value in towers.family(clip_model).text_modules(clip_model).items():
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() may replace parameter objects: rebuild the tower view after it.
        out = super()._apply(fn, *args, **kwargs)
        self.__dict__.pop("_tower", None)
        self._tokens = None
        self._plans = {}
        return out

    @property
    def tower(self) -> TextTower:
        """The view of this module's text modules (rebuilt for a copy or a DataParallel
        replica, whose attribute dict is copied from the original's)."""
        if self.__dict__.get("_tower_owner") != id(self) or "_tower" not in self.__dict__:
            self.__dict__["_tower"] = text_tower(self)
            self.__dict__["_tower_owner"] = id(self)
            self._tokens = None
            self._plans = {}
        return self.__dict__["_tower"]

    def _token_info(self, ids: Tensor, device: torch.device) -> _TokenInfo:
        info = self._tokens
        version = _version_of(ids)
        if (info is not None and info.ids is ids and version is not None and info.version == version
                and info.device == device):
            return info
        eot = self.tower.pool_positions(ids).to(dtype=torch.long)
        lengths = (eot + 1).tolist()  # one host read per new tokenized_prompts tensor
        info = _TokenInfo(ids=ids, version=version, device=device, eot=eot.to(device), lengths=lengths,
                          seq_len=max(lengths), min_eot=min(lengths) - 1)
        self._tokens = info
        return info

    def _check_inputs(self, prompts: Tensor, tokenized_prompts: Tensor, deeper) -> List[Tensor]:
        tower = self.tower
        if (not isinstance(prompts, Tensor) or prompts.dim() not in (3, 4) or prompts.shape[-1] != tower.width):
            raise ValueError(f"prompts must be a tensor [N, L, width={tower.width}] or [B, N, L, width], got "
                             f"{tuple(prompts.shape) if isinstance(prompts, Tensor) else type(prompts).__name__}")
        if not prompts.is_floating_point():
            raise TypeError(f"prompts must be floating point, got {prompts.dtype}")
        n, length = prompts.shape[-3], prompts.shape[-2]
        if n == 0 or prompts.shape[0] == 0 or length > tower.context_length:
            raise ValueError(f"prompts must have N >= 1 rows (B >= 1 groups) and L <= {tower.context_length} "
                             f"positions, got {tuple(prompts.shape)}")
        if (not isinstance(tokenized_prompts, Tensor) or tokenized_prompts.is_floating_point()
                or tuple(tokenized_prompts.shape) != (n, length)):
            raise ValueError(f"tokenized_prompts must be integer token ids [N={n}, L={length}], got "
                             f"{getattr(tokenized_prompts, 'dtype', type(tokenized_prompts).__name__)} "
                             f"{tuple(getattr(tokenized_prompts, 'shape', ()))}")
        deep = [] if deeper is None else list(deeper)
        if not deep:
            return deep
        if len(deep) > len(tower.layers) - 1:
            raise ValueError(f"compound_prompts_deeper_text has {len(deep)} blocks, but a tower of "
                             f"{len(tower.layers)} layers takes at most {len(tower.layers) - 1} (layers 1..J)")
        k = deep[0].shape[0] if isinstance(deep[0], Tensor) and deep[0].dim() == 2 else None
        want = tower.deep_ctx if tower.deep_ctx is not None else k
        for j, d in enumerate(deep):
            if (not isinstance(d, Tensor) or not d.is_floating_point() or d.dim() != 2
                    or tuple(d.shape) != (want, tower.width) or want is None or want < 1):
                raise ValueError(f"compound_prompts_deeper_text[{j}] must be a floating tensor [n_ctx={want}, "
                                 f"width={tower.width}] (n_ctx the same for every block"
                                 f"{', as the tower blocks replace' if tower.deep_ctx is not None else ''}), got "
                                 f"{getattr(d, 'dtype', type(d).__name__)} {tuple(getattr(d, 'shape', ()))}")
        return deep

    def _make_plan(self, x: Tensor, info: _TokenInfo, limit: float, old: Optional[_Plan]) -> _Plan:
        """Decide the shared block of ``x [B, N, L, W]`` (one host read of the comparison)."""
        b, n = x.shape[0], x.shape[1]
        shared = 0
        if self.share_prefix and n > 1:
            cap = min(info.min_eot, limit)  # EOT rows stay in the suffix
            if cap >= self.min_shared_len:
                shared = equal_prefix_len(x, int(cap))
                if shared < self.min_shared_len:
                    shared = 0
        group_rows = shared + sum(info.lengths) - n * shared
        masked = self.attention == "masked" or (self.attention == "auto" and group_rows <= self.tower.width)
        if old is not None and old.info is info and old.shared == shared and (old.masked is not None) == masked:
            # built once: building reads the device
            layout, rows, suffix_eot = old.layout, old.masked, old.suffix_eot
        else:
            suffix_eot = (info.eot - shared).unsqueeze(0).expand(b, n)
            deep_ctx = self.tower.deep_ctx if self.tower.deep_ctx and 1 + self.tower.deep_ctx <= info.min_eot else None
            layout = rows = None
            if masked:
                rows = _GroupRows.build(shared, n, info.seq_len - shared, info.eot, x.dtype, deep_ctx)
            else:
                layout = PackedLayout.build(b, shared, n, info.seq_len - shared, suffix_eot)
                layout.prepare(x.dtype, [layer.heads for layer in self.tower.layers])  # built here, not in a trace
                if deep_ctx:
                    layout.deep_rows(deep_ctx)
        summary = CoOpPlan(rows=n, seq_len=info.seq_len, shared_len=shared,
                           tokens=b * (shared + sum(info.lengths) - n * shared), groups=b)
        return _Plan(info=info, limit=limit, shared=shared, suffix_eot=suffix_eot, layout=layout, masked=rows,
                     summary=summary)

    @staticmethod
    def _assert_rows_equal(x: Tensor, shared: int) -> None:
        """The plan's shared block is still equal in every row of each group: checked on the
        device (an error there, no host read)."""
        if shared > 0:
            torch._assert_async(_rows_equal(x, shared).all(),
                                "CoOpTextEncoder: the planned shared block is no longer equal in every row")

    def plan(self, prompts: Tensor, tokenized_prompts: Tensor) -> CoOpPlan:
        """Make (or confirm) the plan for inputs like these, eagerly, without running the
        tower: what a compiled forward will use. Returns its summary."""
        self._check_inputs(prompts, tokenized_prompts, None)
        x = prompts if prompts.dim() == 4 else prompts.unsqueeze(0)
        return self._eager_plan(x, tokenized_prompts, self._plan_key(x)).summary

    @staticmethod
    def _plan_key(x: Tensor) -> tuple:
        tracking = bool(x.requires_grad and torch.is_grad_enabled())
        return (x.shape[0], x.shape[1], x.shape[2], str(x.dtype), str(x.device), tracking)

    def _eager_plan(self, x: Tensor, ids: Tensor, key: tuple) -> _Plan:
        info = self._token_info(ids, x.device)
        tracking = key[-1]
        limit = gradient_shareable_len(x) if tracking and not self.assume_shared else math.inf
        plan = self._plans.get(key)
        if (plan is not None and plan.info is info and plan.limit == limit
                and (tracking or self.assume_shared)):
            self._assert_rows_equal(x, plan.shared)
        else:
            plan = self._make_plan(x, info, limit, plan)
            self._plans[key] = plan
        return plan

    def _compiled_plan(self, x: Tensor, ids: Tensor, key: tuple) -> Optional[_Plan]:
        """The plan an eager call made for these shapes, guarded on the device (traceable)."""
        plan = self._plans.get(key)
        if plan is None and not key[-1]:  # evaluation may use a training plan: the guards below hold it
            plan = self._plans.get(key[:-1] + (True,))
        if plan is None:
            return None
        torch._assert_async((self.tower.pool_positions(ids).to(torch.long) == plan.info.eot).all(),
                            "CoOpTextEncoder: tokenized_prompts differ from those of the plan")
        self._assert_rows_equal(x, plan.shared)
        return plan

    @torch.compiler.disable
    def _forward_eagerly(self, prompts: Tensor, tokenized_prompts: Tensor, deeper) -> Tensor:
        return self.forward(prompts, tokenized_prompts, deeper)

    def forward(self, prompts: Tensor, tokenized_prompts: Tensor, compound_prompts_deeper_text=None) -> Tensor:
        """prompts [N, L, width] or [B, N, L, width], tokenized_prompts [N, L], optional deep
        prompts J x [n_ctx, width] -> [N, D] or [B, N, D]."""
        deep = self._check_inputs(prompts, tokenized_prompts, compound_prompts_deeper_text)
        x = prompts if prompts.dim() == 4 else prompts.unsqueeze(0)
        key = self._plan_key(x)
        if torch.compiler.is_compiling():
            plan = self._compiled_plan(x, tokenized_prompts, key)
            if plan is None:  # no plan yet: the eager path makes one (a graph break)
                return self._forward_eagerly(prompts, tokenized_prompts, compound_prompts_deeper_text)
        else:
            plan = self._eager_plan(x, tokenized_prompts, key)
            self.last_plan = plan.summary
        if deep and 1 + deep[0].shape[0] > plan.info.min_eot:
            raise ValueError(f"compound_prompts_deeper_text replaces positions 1..{deep[0].shape[0]}, but a row of "
                             f"tokenized_prompts has its EOT at {plan.info.min_eot}")
        # [0, P) from each group's row 0 (the gradients of the group's rows arrive summed
        # there); with nothing shared, P = 0 and the rows are only truncated and packed.
        p = plan.shared
        if plan.masked is not None:
            out = masked_group_forward(self.tower, x[:, :, :plan.info.seq_len], p, plan.masked, deep)
        else:
            out = prefix_shared_forward(self.tower, x[:, 0, :p], x[:, :, p:plan.info.seq_len], plan.suffix_eot,
                                        layout=plan.layout, deep_prompts=deep)
        return out if prompts.dim() == 4 else out[0]

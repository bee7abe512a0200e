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

Cost of the detection: a walk over a few autograd nodes and one bitwise comparison of the
``[N, P, width]`` block, negligible next to the transformer; the comparison result is read
on the host (one synchronisation per call on a GPU). The token-id analysis (EOT positions,
truncated length) is cached per ``tokenized_prompts`` tensor (CoOp passes the same buffer
every step) and recomputed if that tensor is modified in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from . import towers
from .text_encoder import TextTower, prefix_shared_forward, text_tower

Tensor = torch.Tensor

__all__ = ["CoOpTextEncoder", "CoOpPlan"]


@dataclass(frozen=True)
class CoOpPlan:
    """What the last ``CoOpTextEncoder.forward`` ran.

    rows:       N, sequences encoded
    seq_len:    positions of the longest row after truncation (max EOT + 1)
    shared_len: leading positions computed once for all rows (0: no sharing)
    tokens:     token positions the linear layers ran: shared_len + sum over rows of
                (EOT + 1 - shared_len), against N * 77 for CoOp
    """

    rows: int
    seq_len: int
    shared_len: int
    tokens: int


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


def _node_shape(node, output_nr: int = 0):
    """Shape of the gradient ``node`` receives at ``output_nr`` (= its forward output)."""
    return tuple(node._input_metadata[output_nr].shape)


def _row_summed_len(node, output_nr: int = 0) -> float:
    """Leading positions (dim 1 of a [N, L, W] tensor produced by ``node``) whose gradient
    reaches the leaves only through its sum over rows (dim 0). Conservative: 0 whenever
    the graph is not recognised. ``math.inf`` means every position."""
    if node is None:  # the input needs no gradient
        return math.inf
    try:
        shape = _node_shape(node, output_nr)
        if len(shape) != 3:
            return 0
        if shape[0] == 1:
            return math.inf
        name = node.name()
        if name == "ExpandBackward0":
            src = tuple(node._saved_self_sym_sizes)
            broadcast = len(src) < 3 or int(src[0]) == 1
            return math.inf if broadcast else 0
        if name in _PASS_THROUGH:
            nxt, nr = node.next_functions[0]
            return _row_summed_len(nxt, nr)
        if name == "CatBackward0":
            dim = node._saved_dim % 3
            if dim == 0:
                return 0  # rows from different tensors
            if dim == 2:
                return min(_row_summed_len(nxt, nr) for nxt, nr in node.next_functions)
            # dim 1: pieces along the sequence. A piece that needs no gradient has no node,
            # so its length is unknown here; counting it as 0 gives a lower bound of the
            # positions where later pieces start.
            start_lb, safe = 0, math.inf
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                length = _node_shape(nxt, nr)[1]
                r = _row_summed_len(nxt, nr)
                if r < length:
                    safe = min(safe, start_lb + r)
                start_lb += length
            return safe
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return 0  # private autograd attributes missing in this torch version: no sharing
    return 0


def gradient_shareable_len(prompts: Tensor) -> float:
    """Leading positions of ``prompts [N, L, W]`` that may be computed from row 0 alone
    without changing any leaf's gradient (see the module docstring)."""
    if not (prompts.requires_grad and torch.is_grad_enabled()) or prompts.shape[0] <= 1:
        return math.inf
    if prompts.grad_fn is None:
        return 0  # a leaf of N rows: every row is its own parameter
    return _row_summed_len(prompts.grad_fn, 0)


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def equal_prefix_len(prompts: Tensor, limit: int) -> int:
    """Number of leading positions (at most ``limit``) at which all rows of
    ``prompts [N, L, W]`` are bitwise equal. One host read of the result."""
    if limit <= 0:
        return 0
    head = prompts.detach()[:, :limit]
    if head.is_floating_point():
        head = head.view(_BITS[head.element_size()])  # bitwise: -0.0 != 0.0, NaN == same NaN
    same = (head == head[:1]).all(dim=2).all(dim=0)        # [limit]
    return int(same.cumprod(0).sum())


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------

def _version_of(t: Tensor) -> Optional[int]:
    """The in-place version counter, None for tensors without one (inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


class CoOpTextEncoder(nn.Module):
    """CoOp's ``TextEncoder``, exact, truncated after the last EOT and prefix-shared.

    clip_model:     open_clip ``CLIP`` / ``CustomTextCLIP``, transformers ``CLIPModel`` or
                    OpenAI ``clip.model.CLIP`` (float16-cast weights compute in float16, as
                    CoOp does) with a causal, EOT-pooled text tower (else
                    ``text_encoder.UnsupportedTextTower``). Its text modules are registered
                    here as submodules, as CoOp's ``TextEncoder`` does, so ``.to()`` /
                    ``.half()`` of the enclosing model move them and ``nn.DataParallel``
                    replicas use their own copies; weights are not copied.
    share_prefix:   False turns prefix sharing off (truncation stays).
    min_shared_len: share only a common block of at least this many positions.

    ``forward(prompts [N, L, width], tokenized_prompts [N, L]) -> [N, D]`` (L <= the
    context length, 77 for CLIP), unnormalised, CoOp's result up to float rounding, in the
    dtype of ``prompts``. ``last_plan`` (a ``CoOpPlan``) says what the last call ran.
    """

    def __init__(self, clip_model: nn.Module, share_prefix: bool = True, min_shared_len: int = 2):
        super().__init__()
        if not isinstance(min_shared_len, int) or min_shared_len < 1:
            raise ValueError(f"min_shared_len must be an int >= 1, got {min_shared_len!r}")
        text_tower(clip_model)  # raises UnsupportedTextTower with the reason
        self._register_text_modules(clip_model)
        self.share_prefix = bool(share_prefix)
        self.min_shared_len = min_shared_len
        self.last_plan: Optional[CoOpPlan] = None
        self._tokens: Optional[_TokenInfo] = None
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
        return out

    @property
    def tower(self) -> TextTower:
        """The view of this module's text modules (rebuilt for a copy or a DataParallel
        replica, whose attribute dict is copied from the original's)."""
        if self.__dict__.get("_tower_owner") != id(self) or "_tower" not in self.__dict__:
            self.__dict__["_tower"] = text_tower(self)
            self.__dict__["_tower_owner"] = id(self)
            self._tokens = None
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

    # Its decisions are data-dependent host logic (autograd graph walk, value check,
    # cached lengths): inside a torch.compile'd model it runs eagerly (a graph break).
    @torch.compiler.disable
    def forward(self, prompts: Tensor, tokenized_prompts: Tensor) -> Tensor:
        """prompts [N, L, width], tokenized_prompts [N, L] -> [N, D]."""
        tower = self.tower
        if not isinstance(prompts, Tensor) or prompts.dim() != 3 or prompts.shape[2] != tower.width:
            raise ValueError(f"prompts must be a tensor [N, L, width={tower.width}], got "
                             f"{tuple(prompts.shape) if isinstance(prompts, Tensor) else type(prompts).__name__}")
        if not prompts.is_floating_point():
            raise TypeError(f"prompts must be floating point, got {prompts.dtype}")
        n, length, _ = prompts.shape
        if n == 0 or length > tower.context_length:
            raise ValueError(f"prompts must have N >= 1 rows and L <= {tower.context_length} positions, "
                             f"got {tuple(prompts.shape)}")
        if (not isinstance(tokenized_prompts, Tensor) or tokenized_prompts.is_floating_point()
                or tuple(tokenized_prompts.shape) != (n, length)):
            raise ValueError(f"tokenized_prompts must be integer token ids [N={n}, L={length}], got "
                             f"{getattr(tokenized_prompts, 'dtype', type(tokenized_prompts).__name__)} "
                             f"{tuple(getattr(tokenized_prompts, 'shape', ()))}")
        info = self._token_info(tokenized_prompts, prompts.device)
        seq_len = info.seq_len

        shared = 0
        if self.share_prefix and n > 1:
            limit = min(info.min_eot, gradient_shareable_len(prompts))  # EOT rows stay in the suffix
            if limit >= self.min_shared_len:
                shared = equal_prefix_len(prompts, int(limit))
                if shared < self.min_shared_len:
                    shared = 0
        self.last_plan = CoOpPlan(rows=n, seq_len=seq_len, shared_len=shared,
                                  tokens=shared + sum(info.lengths) - n * shared)
        # [0, P) from row 0's copy (the gradients of all rows arrive summed there); with
        # nothing shared, P = 0 and the rows are only truncated and packed.
        prefix = prompts[:1, :shared]                                   # [1, P, W]
        suffix = prompts[:, shared:seq_len].unsqueeze(0)                # [1, N, S, W]
        return prefix_shared_forward(tower, prefix, suffix, (info.eot - shared).unsqueeze(0))[0]

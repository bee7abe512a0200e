"""The frozen-phi basis of the K-free distillation (SPEC 4.3).

phi (W [K, D], b [K]) and the LLM embeddings E [C, K] are frozen while DeMul trains, so
everything the distillation needs from the K-dimensional LLM space is computed once. With
the reduced QR factorisation W = Q R (Q [K, r] orthonormal columns, R [r, D],
r = min(K, D)):

    c      = Q^T b             [r]       b_perp = b - Q c       beta = ||b_perp||^2
    F[c]   = Q^T e^[c]         [C, r]    delta[c] = <b_perp, e^[c]>

and for every row v[c,m] = R t^[c,m] + c:

    ||z[c,m]||^2 = ||v[c,m]||^2 + beta        <z[c,m], e^[c]> = <v[c,m], F[c]> + delta[c]

so a training step needs one [C*M, D] x [D, r] product instead of [C*M, D] x [D, K].
The factorisation runs in float64; the basis is stored in float32 (float64 when the
inputs are float64), whatever the dtype of T: the kernels accumulate in float32 anyway.

Caching (``cached_distill_basis``): a basis built from raw tensors is kept under a key
that a changed tensor cannot hit stale. For each of W, b, E the key holds the tensor
itself (a weak reference: a freed tensor's entry dies with it, so a new tensor at the
same address never matches), its version counter ``_version`` (every in-place edit
through autograd-visible tensors bumps it: ``copy_``, ``mul_``, ``load_state_dict``,
edits under ``no_grad``, edits of a view or a ``detach()``ed alias), and its data
pointer, storage offset, shape, strides, dtype and device (``set_``, a move, a cast).
What the version counter cannot see is not seen: writes through ``.data``, a NumPy
view or DLPack. After such a write, call ``clear_distill_basis_cache()`` or pass the
basis explicitly.
"""

from __future__ import annotations

import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..common import EPS, accumulation_dtype, l2_normalize


class DistillBasis(NamedTuple):
    """The frozen-phi basis of SPEC 4.3.

    R:     [r, D]   the triangular factor of W = Q R (r = min(K, D))
    c:     [r]      Q^T b (zeros without a bias)
    F:     [C, r]   Q^T e^[c] per class
    delta: [C]      <b_perp, e^[c]> per class
    beta:  []       ||b_perp||^2 (0-dim tensor)
    """

    R: torch.Tensor
    c: torch.Tensor
    F: torch.Tensor
    delta: torch.Tensor
    beta: torch.Tensor

    @property
    def rank(self) -> int:
        return self.R.shape[0]

    def to(self, *args, **kwargs) -> "DistillBasis":
        return DistillBasis(*(t.to(*args, **kwargs) for t in self))


def build_distill_basis(phi_weight: torch.Tensor, phi_bias: Optional[torch.Tensor],
                        llm_embeddings: torch.Tensor, dtype: Optional[torch.dtype] = None) -> DistillBasis:
    """Factor the frozen phi and project the LLM embeddings (SPEC 4.3), once.

    phi_weight: [K, D], phi_bias: [K] or None, llm_embeddings: [C, K]
    dtype: storage dtype of the basis (default float32, float64 for float64 inputs)
    returns: DistillBasis(R [r, D], c [r], F [C, r], delta [C], beta []) with r = min(K, D),
             on phi_weight's device, detached (phi and E are frozen)
    """
    if dtype is None:
        dtype = accumulation_dtype(phi_weight.dtype)
    w = phi_weight.detach().to(torch.float64)
    q, r = torch.linalg.qr(w, mode="reduced")  # q [K, r], r [r, D]
    e_hat = l2_normalize(llm_embeddings.detach().to(torch.float64), eps=EPS)  # [C, K]
    f = e_hat @ q  # [C, r]
    if phi_bias is None:
        c = torch.zeros(q.shape[1], dtype=torch.float64, device=w.device)
        delta = torch.zeros(e_hat.shape[0], dtype=torch.float64, device=w.device)
        beta = torch.zeros((), dtype=torch.float64, device=w.device)
    else:
        b = phi_bias.detach().to(torch.float64)
        c = q.transpose(0, 1) @ b
        b_perp = b - q @ c
        delta = e_hat @ b_perp
        beta = b_perp.square().sum()
    return DistillBasis(r, c, f, delta, beta).to(dtype)


def tensor_fingerprint(t: Optional[torch.Tensor]) -> Tuple:
    """What identifies a tensor's current values without reading them (the module docstring);
    the key of every cache of a frozen tensor's derivative (this basis, its cast R, the
    Triton path's triangular turn)."""
    if t is None:
        return (None,)
    return (t._version, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


class _Entry(NamedTuple):
    refs: Tuple  # weak references to (W, b or None, E)
    key: Tuple  # their fingerprints and the basis dtype
    basis: DistillBasis


class DistillBasisCache:
    """At most ``size`` bases, most recently used first, each kept while its W, b, E live
    and are unchanged (the module docstring's rule). Not pickled: a copy starts empty."""

    def __init__(self, size: int):
        self.size = size
        self._entries: List[_Entry] = []

    def get(self, phi_weight: torch.Tensor, phi_bias: Optional[torch.Tensor], llm_embeddings: torch.Tensor,
            dtype: Optional[torch.dtype] = None) -> DistillBasis:
        """The cached basis of (W [K, D], b [K] or None, E [C, K]) in ``dtype``, built if absent."""
        tensors = (phi_weight, phi_bias, llm_embeddings)
        key = tuple(tensor_fingerprint(t) for t in tensors) + (dtype,)
        self._entries = [e for e in self._entries if all(r is None or r() is not None for r in e.refs)]
        for i, entry in enumerate(self._entries):
            if entry.key == key and all((r is None and t is None) or (r is not None and r() is t)
                                        for r, t in zip(entry.refs, tensors)):
                self._entries.insert(0, self._entries.pop(i))
                return entry.basis
        basis = build_distill_basis(phi_weight, phi_bias, llm_embeddings, dtype)
        refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._entries = [_Entry(refs, key, basis)] + self._entries[: self.size - 1]
        return basis

    def clear(self) -> None:
        self._entries = []

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self):
        return {"size": self.size, "_entries": []}


_CACHE = DistillBasisCache(4)  # the functional API's: one basis per frozen phi/E in use


def cached_distill_basis(phi_weight: torch.Tensor, phi_bias: Optional[torch.Tensor],
                         llm_embeddings: torch.Tensor, dtype: Optional[torch.dtype] = None) -> DistillBasis:
    """``build_distill_basis`` once per frozen (W [K, D], b [K] or None, E [C, K]): the basis
    of the same tensors with unchanged values is reused (the module docstring's rule)."""
    return _CACHE.get(phi_weight, phi_bias, llm_embeddings, dtype)


def frozen_basis(phi_weight: Optional[torch.Tensor], phi_bias: Optional[torch.Tensor],
                 llm_embeddings: Optional[torch.Tensor], dtype: torch.dtype,
                 cache: Optional[DistillBasisCache] = None,
                 pinned: Optional[DistillBasis] = None) -> Optional[DistillBasis]:
    """The basis of SPEC 4.3 a call runs with when the caller gives none, or None for the
    direct form of SPEC 4.1 -- the one rule, used by the functional API and by DeMulHead:
    None without LLM embeddings or when autograd is to differentiate W, b or E; inside
    torch.compile the basis ``pinned`` outside the graph (DeMulHead.plan) when there is one,
    else built in the graph (compiled code cannot key a cache on storage); else from
    ``cache`` (default: the functional API's), rebuilt when a tensor changes."""
    tensors = (phi_weight, phi_bias, llm_embeddings)
    if llm_embeddings is None or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                  for t in tensors)):
        return None
    if torch.compiler.is_compiling():
        return pinned if pinned is not None else build_distill_basis(*tensors, dtype=dtype)
    return (_CACHE if cache is None else cache).get(*tensors, dtype=dtype)


def clear_distill_basis_cache() -> None:
    """Forget every basis the functional API cached (after writing phi or E behind the
    version counter: through ``.data``, NumPy or DLPack)."""
    _CACHE.clear()


def kept(cache: dict, key, make, size: int = 4):
    """cache[key], made by make() on a miss; the oldest entry goes when ``size`` are kept.
    The entries hold the tensors their keys fingerprint (so an address cannot be reused by
    another tensor while its entry lives)."""
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        hit = cache[key] = make()
    return hit


_R_CACHE: dict = {}  # (R's fingerprint, dtype) -> (R, R in that dtype)


def basis_r_in(R, dtype):
    """The basis R as the kernels' dot operand: in T's dtype, contiguous (both kernel
    backends: the Triton text kernels and csrc/distill.cu, text_head.cu stage it as it is).
    The frozen basis is the same tensor every step, so its cast is made once and kept (with R
    itself, whose memory therefore cannot be reused by another tensor while the entry lives;
    an in-place change of R bumps its version and misses). Called inside the custom ops, on
    real tensors."""
    if R.dtype == dtype and R.is_contiguous():
        return R
    return kept(_R_CACHE, (tensor_fingerprint(R), dtype), lambda: (R, R.to(dtype).contiguous()))[1]


__all__ = ["DistillBasis", "DistillBasisCache", "build_distill_basis", "cached_distill_basis", "frozen_basis",
           "clear_distill_basis_cache"]

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
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .common import EPS, l2_normalize


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
        dtype = torch.float64 if phi_weight.dtype == torch.float64 else torch.float32
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


__all__ = ["DistillBasis", "build_distill_basis"]

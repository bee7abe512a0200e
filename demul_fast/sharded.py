"""The class-sharded DeMul training step on torch.distributed: classes sharded, images data-parallel.

World size W, rank r. The classes are split into W contiguous shards (C_r = C // W or one
more; ``shard_bounds``). Each rank

* encodes the prompts of its own classes only: all M prompts, the per-prompt prefix on
  every rank (``T_r [C_r, M, D]``, the text encoder's rows and activations divided by W);
* computes its share of the class features ``u^_r = aggregate_prompts(T_r, A_r)`` and of
  the distillation sum; the class features of all ranks are all-gathered with autograd
  (``_AllGatherRows``: the backward sums every rank's cotangent of u^_r back onto rank r,
  a reduce-scatter);
* runs the cross-entropy of its own image batch (B_r images; ``data.sampling.KeyedBatchSampler``)
  against all C classes.

Scaling (SPEC 4). With B = sum_r B_r images in the global batch,

    L_ce   = (1/B) sum_b ce_b                = sum_r (B_r / B)      * mean_{b in r} ce_b
    L_dist = (1/(C*M)) sum_{c,m} (1 - cos)   = sum_r (C_r / C)      * mean_{c in r, m} (1 - cos)
    L_ent  = mean_c sum_m w log w            = sum_r (C_r / C)      * mean_{c in r} sum_m w log w

so rank r's share is ``l_r = (B_r/B) ce_r + alpha (C_r/C) dist_r + lambda (C_r/C) ent_r`` and
L = sum_r l_r. Rank r's backward of l_r gives dL/dctx through its own T_r (the all-gather's
backward has already brought every rank's dL/du^_r onto u^_r) and the rows of dL/dA of its
own classes; the full gradient is the SUM over ranks (``reduce_gradients``), not the mean
that DistributedDataParallel takes (each l_r is already weighted by its share). Every rank
then holds the same gradient and takes the same optimizer step.

``ShardedDeMul`` wraps a ``DeMul`` (or ``model.DeMulReference``) module and runs any head
backend (the head's ``backend``). Joining the process group that ``torchrun`` describes, and
the global-batch sampler, are the application's (``demul_fast.app.processes``).
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from . import reference
from .common import HeadOutput
from .nn import accumulation_dtype, compose_head, linear_phi, mlp_distill
from .ops import functional
from .prompt_learner import logit_scale
from .text_encoder import FullTextEncoder

Tensor = torch.Tensor


def shard_bounds(total: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[lo, hi) of rank's contiguous share of ``total`` items: the first ``total % world_size``
    ranks hold one more (the split of ``torch.tensor_split``)."""
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: the current CUDA device under NCCL."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -------------------------------------------------------------------------------------------
# class-sharded DeMul


# torch renamed the tensor collectives (all_gather_into_tensor now warns on every call); the
# package supports torch versions from before the rename
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherRows(torch.autograd.Function):
    """[n, D] on each of W ranks -> [W*n, D] on every rank; the backward gives each rank the
    SUM over ranks of the cotangents of its own rows (a reduce-scatter: NCCL's, or an
    all-reduce and a slice where the backend has none, as gloo)."""

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        local = local.contiguous()
        out = local.new_empty(dist.get_world_size(group) * local.shape[0], *local.shape[1:])
        _all_gather_single(out, local, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = grad.new_empty(n, *grad.shape[1:])
            _reduce_scatter_single(mine, grad, group=ctx.group)
            return mine, None
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total[rank * n:(rank + 1) * n], None


def gather_class_features(local: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """All ranks' class features, in class order, with autograd.

    local: [C_r, D] this rank's share; sizes: C_r of every rank -> [C, D]. Uneven shares are
    padded to the largest for the collective (the padding rows get no gradient).
    """
    width = max(sizes)
    padded = local if local.shape[0] == width else torch.cat([local, local.new_zeros(width - local.shape[0],
                                                                                    *local.shape[1:])])
    gathered = _AllGatherRows.apply(padded, group)
    return torch.cat([gathered[r * width:r * width + n] for r, n in enumerate(sizes)])


def _shard_text_encoder(module: nn.Module, tokenizer: Callable, classnames: List[str]) -> nn.Module:
    """A text encoder of the same kind and options as ``module.text_encoder``, for some classes."""
    encoder = module.text_encoder
    n_ctx = module.config["n_ctx"]
    if isinstance(encoder, FullTextEncoder):
        return FullTextEncoder(module.clip_model, tokenizer, classnames, n_ctx)
    return type(encoder)(module.clip_model, tokenizer, classnames, n_ctx,
                         fallback="full" if getattr(encoder, "mode", "prefix") == "full" else None,
                         checkpoint=getattr(encoder, "checkpoint", False))


class ShardedDeMul(nn.Module):
    """One rank's part of a class-sharded DeMul training step (see the module docstring).

    module:    a ``DeMul`` or ``DeMulReference``, identical on every rank (its
               parameters ``ctx`` and ``head.prompt_logits`` are the ones trained)
    tokenizer: the CLIP model's tokenizer (to build this rank's text encoder)
    group:     the process group (default: the whole world)

    ``forward(image_features [B_r, D], labels [B_r])`` -> ``HeadOutput(loss, ce_loss,
    distill_loss, logits [B_r, C])``: ``ce_loss`` and ``distill_loss`` are the global batch's
    values (no gradient); ``loss`` has the global value and the gradient of this rank's share
    l_r, so that ``loss.backward()`` followed by ``reduce_gradients()`` leaves on every rank
    the gradient of the single-process step on the whole global batch.
    """

    def __init__(self, module: nn.Module, tokenizer: Callable, group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ShardedDeMul needs an initialised torch.distributed process group")
        self.module, self.group = module, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        classnames = module.config["classnames"]
        c = len(classnames)
        if c < self.world_size:
            raise ValueError(f"{c} classes cannot be sharded over {self.world_size} processes: every process "
                             "needs at least one class")
        self.sizes = [hi - lo for lo, hi in (shard_bounds(c, self.world_size, r) for r in range(self.world_size))]
        self.lo, self.hi = shard_bounds(c, self.world_size, self.rank)
        self.text_encoder = _shard_text_encoder(module, tokenizer, classnames[self.lo:self.hi])
        self.backend = getattr(module.head, "backend", "torch")  # the reference head: torch

    def text_features(self) -> Tensor:
        """T_r [C_r, M, D] of this rank's classes."""
        return self.text_encoder(self.module.ctx)

    def forward(self, image_features: Tensor, labels: Tensor) -> HeadOutput:
        head = self.module.head
        scale = logit_scale(self.module.clip_model)
        t = self.text_features()                                                  # [C_r, M, D]
        dtype = t.dtype
        logits_a = head.prompt_logits[self.lo:self.hi]
        u_all = gather_class_features(functional.aggregate_prompts(t, logits_a.to(dtype), backend=self.backend),
                                      self.sizes, self.group)                     # [C, D]
        x = image_features.to(dtype)
        ce = functional.cosine_cross_entropy(x, u_all, labels, scale, head.label_smoothing, backend=self.backend)
        count = torch.tensor([float(labels.numel())], device=collective_device())
        dist.all_reduce(count, group=self.group)                                  # B, the global batch
        ce_part = ce * (labels.numel() / count.to(ce.device, ce.dtype)[0])
        class_share = (self.hi - self.lo) / head.num_classes
        rows = slice(self.lo, self.hi)
        dist_part = torch.zeros((), dtype=ce.dtype, device=ce.device)
        if linear_phi(head):
            b = None if head.phi_bias is None else head.phi_bias.to(dtype)
            d = functional.prompt_distill_loss(t, head.phi_weight.to(dtype), b, head.llm_embeddings[rows].to(dtype),
                                               backend=self.backend)
            dist_part = class_share * d.to(ce.dtype)
        a32 = logits_a.to(accumulation_dtype(logits_a.dtype))
        out = compose_head(head, HeadOutput(ce_part + head.alpha * dist_part, ce_part, dist_part), t, a32,
                           lambda t: mlp_distill(head, t, rows), share=class_share)
        local, dist_part = out.loss, out.distill_loss
        totals = torch.stack([local, ce_part, dist_part]).detach()
        dist.all_reduce(totals, group=self.group)
        with torch.no_grad():
            logits = reference.cosine_logits(x, u_all, scale)
        return HeadOutput(local + (totals[0] - local.detach()), totals[1], totals[2], logits)

    def reduce_gradients(self) -> None:
        """Sum the gradients of the trained parameters over the ranks (one all-reduce)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def broadcast_parameters(self) -> None:
        """Make the context, the head's parameters and frozen buffers rank 0's on every rank."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in [self.module.ctx, *self.module.head.state_dict(keep_vars=True).values()]:
                if t is not None:
                    dist.broadcast(t.data, src, group=self.group)

    @torch.no_grad()
    def class_features(self) -> Tensor:
        """Unit-norm class features u^ [C, D] of all classes, each rank encoding its share."""
        head = self.module.head
        t = self.text_features()
        u = functional.aggregate_prompts(t, head.prompt_logits[self.lo:self.hi].to(t.dtype), backend=self.backend)
        return gather_class_features(u, self.sizes, self.group)

    @torch.no_grad()
    def accuracy(self, feats: Tensor, labels: Tensor) -> float:
        """Top-1 (%) over the images of all ranks: feats [N_r, D], labels [N_r] on each rank."""
        u = self.class_features().float()
        correct = torch.zeros((), dtype=torch.long, device=labels.device)
        if labels.numel():  # a rank without an image of a small split contributes nothing
            correct = ((nn.functional.normalize(feats.float(), dim=-1) @ u.T).argmax(-1) == labels).sum()
        counts = torch.stack([correct, torch.tensor(labels.numel(), device=labels.device)])
        counts = counts.to(collective_device(), torch.float64)
        dist.all_reduce(counts, group=self.group)
        return 100.0 * float(counts[0]) / max(1.0, float(counts[1]))

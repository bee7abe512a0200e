"""The specification in code: SPEC.md section 4 in plain eager PyTorch.

Every function here computes in the dtype of its inputs (it is also the "plain PyTorch
path" whose own low-precision error the fast paths are measured against) and is
differentiable by autograd. Nothing here imports a kernel.

Shapes (SPEC.md section 2): C classes, M prompts, D joint embedding dim, B images,
K LLM embedding dim.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

EPS = 1e-6  # norm floor, SPEC.md section 4

Scale = Union[float, torch.Tensor]


class HeadOutput(NamedTuple):
    """What the DeMul head returns.

    loss:         scalar, ``ce_loss + alpha * distill_loss``
    ce_loss:      scalar, cosine-logit cross-entropy
    distill_loss: scalar, mean (1 - cos) of the projected prompt features against the LLM
                  embeddings (a zero tensor when no LLM embeddings were given)
    logits:       [B, C] scaled cosine logits, or None unless ``return_logits=True``
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    distill_loss: torch.Tensor
    logits: Optional[torch.Tensor] = None


def l2_normalize(v: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """v / max(||v||, eps) along ``dim`` (the floor is a constant for autograd)."""
    return v / torch.linalg.vector_norm(v, dim=dim, keepdim=True).clamp_min(eps)


def aggregate_prompts(text_features: torch.Tensor, prompt_logits: torch.Tensor) -> torch.Tensor:
    """Prompt-weighted class features (SPEC 4: t^, w, u, u^).

    text_features: [C, M, D]  per-prompt text features t (unnormalised)
    prompt_logits: [C, M]     prompt weight logits A
    returns:       [C, D]     unit-norm class features u^
    """
    t_hat = l2_normalize(text_features)
    w = torch.softmax(prompt_logits, dim=-1)
    u = torch.einsum("cm,cmd->cd", w, t_hat)
    return l2_normalize(u)


def cosine_logits(image_features: torch.Tensor, class_features: torch.Tensor, scale: Scale) -> torch.Tensor:
    """s = scale * <x^, class_features>: [B, D] x [C, D] -> [B, C].

    ``class_features`` are used as given (aggregate_prompts returns them unit norm).
    """
    return scale * (l2_normalize(image_features) @ class_features.transpose(0, 1))


def _smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1/B) sum_b ( logsumexp_c s[b,:] - sum_c q[b,c] s[b,c] ), written out (SPEC 4)."""
    num_classes = logits.shape[-1]
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * target
    if label_smoothing:
        loss = loss - (label_smoothing / num_classes) * logits.sum(dim=-1)
    return loss.mean()


def cosine_cross_entropy(
    image_features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor,
    scale: Scale,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of scaled cosine logits (SPEC 4: x^, s, q, L_ce).

    image_features: [B, D]  image features x (normalised here)
    class_features: [C, D]  class features (used as given; unit norm from aggregate_prompts)
    labels:         [B]     int64 in [0, C)
    scale:          float or 0-dim tensor, the logit multiplier tau (= logit_scale.exp())
    returns:        scalar loss
    """
    return _smoothed_ce(cosine_logits(image_features, class_features, scale), labels, label_smoothing)


def prompt_distill_loss(
    text_features: torch.Tensor,
    phi_weight: torch.Tensor,
    phi_bias: Optional[torch.Tensor],
    llm_embeddings: torch.Tensor,
) -> torch.Tensor:
    """Distillation of LLM class-name embeddings into the prompts (SPEC 4: z, cos, L_dist).

    text_features:  [C, M, D]  per-prompt text features t (normalised here)
    phi_weight:     [K, D]     W of the frozen affine map phi
    phi_bias:       [K] or None
    llm_embeddings: [C, K]     LLM embedding e of each class name (normalised here)
    returns:        scalar, mean over (c, m) of 1 - cos(W t^ + b, e)
    """
    t_hat = l2_normalize(text_features)
    z = t_hat @ phi_weight.transpose(0, 1)  # [C, M, K]
    if phi_bias is not None:
        z = z + phi_bias
    e_hat = l2_normalize(llm_embeddings)  # [C, K]
    cos = (l2_normalize(z) * e_hat.unsqueeze(1)).sum(dim=-1)  # [C, M]
    return (1.0 - cos).mean()


def demul_head(
    text_features: torch.Tensor,
    prompt_logits: torch.Tensor,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    scale: Scale,
    llm_embeddings: Optional[torch.Tensor] = None,
    phi_weight: Optional[torch.Tensor] = None,
    phi_bias: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    return_logits: bool = False,
) -> HeadOutput:
    """The whole DeMul head: L = L_ce + alpha * L_dist (SPEC 4).

    text_features:  [C, M, D]   prompt_logits: [C, M]   image_features: [B, D]
    labels: [B]   scale: float or 0-dim tensor   llm_embeddings: [C, K] or None
    phi_weight: [K, D] (required with llm_embeddings)   phi_bias: [K] or None
    returns: HeadOutput(loss, ce_loss, distill_loss, logits [B, C] or None)
    """
    class_features = aggregate_prompts(text_features, prompt_logits)
    logits = cosine_logits(image_features, class_features, scale)
    ce = _smoothed_ce(logits, labels, label_smoothing)
    if llm_embeddings is not None:
        if phi_weight is None:
            raise ValueError("phi_weight is required when llm_embeddings is given")
        dist = prompt_distill_loss(text_features, phi_weight, phi_bias, llm_embeddings)
        loss = ce + alpha * dist
    else:
        dist = torch.zeros((), dtype=ce.dtype, device=ce.device)
        loss = ce
    return HeadOutput(loss, ce, dist, logits if return_logits else None)


# --------------------------------------------------------------------------------------
# SPEC.md section 3: the text encoder the CoOp way, and the whole DeMul module
# --------------------------------------------------------------------------------------

import copy  # noqa: E402  (the module-level part of the reference starts here)
import json  # noqa: E402
import os  # noqa: E402
from typing import Callable, Sequence, Tuple  # noqa: E402

import torch.nn as nn  # noqa: E402

from .prompts import build_prompts, init_phrase_tokens, token_embedding_module  # noqa: E402  (tokenisation only)


def _hf_text_model(model: nn.Module) -> Optional[nn.Module]:
    """The transformers CLIP text transformer inside ``model``, or None for open_clip."""
    text = getattr(model, "text_model", model)
    text = getattr(text, "text_model", text)
    if hasattr(text, "embeddings") and hasattr(text, "encoder") and hasattr(text, "final_layer_norm"):
        return text
    return None


def _openclip_text_parts(model: nn.Module) -> dict:
    """The pieces of an open_clip text tower that ``encode_text`` uses."""
    text = getattr(model, "text", None)
    src, pool_attr, eos_attr = (text, "pool_type", "eos_id") if text is not None else (model, "text_pool_type",
                                                                                        "text_eos_id")
    if text is not None and getattr(text, "cls_emb", None) is not None:
        raise ValueError("open_clip text towers with a class token (embed_cls) are not supported")
    return dict(token_embedding=src.token_embedding, positional_embedding=src.positional_embedding,
                transformer=src.transformer, ln_final=src.ln_final, text_projection=src.text_projection,
                attn_mask=getattr(src, "attn_mask", None), pool_type=getattr(src, pool_attr, "argmax"),
                eos_id=getattr(src, eos_attr, None))


def _pool_positions(ids: torch.Tensor, pool_type: str, eos_id: Optional[int]) -> torch.Tensor:
    """The position each tokenised prompt is pooled at, by the tower's rule."""
    if pool_type == "argmax":
        return ids.argmax(dim=-1)
    if pool_type == "eos":
        return (ids == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    if pool_type == "last":
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    raise ValueError(f"unsupported text pooling {pool_type!r}")


class FullTextEncoder(nn.Module):
    """Per-prompt text features the CoOp way (SPEC 3): all C*M prompts at full context
    length through the CLIP text tower.

    clip_model: open_clip ``CLIP`` / ``CustomTextCLIP`` or transformers ``CLIPModel`` (used in
                place, not registered as a submodule)
    tokenizer, classnames, n_ctx: as ``demul_fast.prompts.build_prompts``

    ``forward(ctx [M, n_ctx, width]) -> T [C, M, D]``: token embeddings with positions
    1..n_ctx replaced by ctx[m], + positional embedding, the transformer with the model's
    own attention mask, ln_final, the hidden state at the pooled (EOT) position,
    text_projection.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, classnames, n_ctx: int):
        super().__init__()
        self.__dict__["clip_model"] = clip_model
        hf = _hf_text_model(clip_model)
        if hf is not None:
            eos = getattr(hf, "eos_token_id", None)
            pool_type, eos_id = ("argmax", None) if eos in (None, 2) else ("eos", eos)
            context_length = hf.embeddings.position_embedding.weight.shape[0]
        else:
            parts = _openclip_text_parts(clip_model)
            pool_type, eos_id = parts["pool_type"], parts["eos_id"]
            context_length = parts["positional_embedding"].shape[0]
        prompts = build_prompts(classnames, n_ctx, tokenizer, lambda ids: _pool_positions(ids, pool_type, eos_id),
                                context_length)
        self.n_ctx = n_ctx
        self.classnames = prompts.classnames
        self.register_buffer("ids", prompts.ids, persistent=False)    # [C, L]
        self.register_buffer("eot", prompts.eot, persistent=False)    # [C]

    def _embed(self, token_embedding: nn.Module, ctx: torch.Tensor) -> torch.Tensor:
        """[C*M, L, W] prompt embeddings with ctx[m] at positions 1..n_ctx."""
        x = token_embedding(self.ids).to(ctx.dtype)                           # [C, L, W]
        c, length, w = x.shape
        m = ctx.shape[0]
        x = x.unsqueeze(1).expand(c, m, length, w)
        x = torch.cat([x[:, :, :1], ctx.unsqueeze(0).expand(c, m, self.n_ctx, w), x[:, :, 1 + self.n_ctx:]], dim=2)
        return x.reshape(c * m, length, w)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [M, n_ctx, width] -> T [C, M, D]."""
        model = self.clip_model
        m = ctx.shape[0]
        c = self.ids.shape[0]
        pool = self.eot.repeat_interleave(m)                                  # rows are (c, m), m fastest
        hf = _hf_text_model(model)
        if hf is not None:
            ctx = ctx.to(hf.embeddings.position_embedding.weight.dtype)
            x = self._embed(hf.embeddings.token_embedding, ctx)
            length = x.shape[1]
            x = x + hf.embeddings.position_embedding.weight[:length]
            mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
            for layer in hf.encoder.layers:
                out = layer(x, mask[None, None])
                x = out[0] if isinstance(out, tuple) else out
            x = hf.final_layer_norm(x)
            x = x[torch.arange(c * m, device=x.device), pool]
            proj = getattr(model, "text_projection", None)
            x = proj(x) if proj is not None else x
        else:
            p = _openclip_text_parts(model)
            ctx = ctx.to(p["positional_embedding"].dtype)
            x = self._embed(p["token_embedding"], ctx)
            x = x + p["positional_embedding"][:x.shape[1]]
            # open_clip >= 2.23's Transformer takes [N, L, W] (it has ``batch_first``); older ones [L, N, W]
            batch_first = hasattr(p["transformer"], "batch_first")
            if not batch_first:
                x = x.permute(1, 0, 2)
            x = p["transformer"](x, attn_mask=p["attn_mask"])
            if not batch_first:
                x = x.permute(1, 0, 2)
            x = p["ln_final"](x)
            x = x[torch.arange(c * m, device=x.device), pool]
            proj = p["text_projection"]
            if proj is not None:
                x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.view(c, m, -1)


# -- the DeMul module ------------------------------------------------------------------

PROMPTS_FILE = "prompts.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def split_phi(phi) -> Tuple[Optional[nn.Module], torch.Tensor, Optional[torch.Tensor]]:
    """phi -> (layers before the last linear map or None, W [K, D], b [K] or None), detached.

    phi: ``nn.Linear(D, K)``, a pair ``(W [K, D], b [K] or None)``, or an ``nn.Sequential``
    whose last layer is an ``nn.Linear`` (its earlier layers run on t^ first, SPEC 4).
    """
    if isinstance(phi, nn.Linear):
        return None, phi.weight.detach(), None if phi.bias is None else phi.bias.detach()
    if isinstance(phi, nn.Sequential):
        if len(phi) == 0 or not isinstance(phi[-1], nn.Linear):
            raise ValueError("phi as nn.Sequential must end with an nn.Linear (its W, b enter the fused loss)")
        pre = phi[:-1] if len(phi) > 1 else None
        return pre, phi[-1].weight.detach(), None if phi[-1].bias is None else phi[-1].bias.detach()
    if isinstance(phi, (tuple, list)) and len(phi) == 2 and isinstance(phi[0], torch.Tensor):
        w, b = phi
        if w.dim() != 2 or (b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0])):
            raise ValueError(f"phi as (W, b) needs W [K, D] and b [K] or None, got {tuple(w.shape)} and "
                             f"{None if b is None else tuple(b.shape)}")
        return None, w.detach(), None if b is None else b.detach()
    raise TypeError(f"phi must be nn.Linear, nn.Sequential ending in nn.Linear, or a (W, b) pair; got {type(phi)}")


def mlp_distill_loss(text_features: torch.Tensor, pre: nn.Module, phi_weight: torch.Tensor,
                     phi_bias: Optional[torch.Tensor], llm_embeddings: torch.Tensor) -> torch.Tensor:
    """SPEC 4's L_dist when phi is an MLP: z = W pre(t^) + b, mean over (c, m) of 1 - cos(z, e).

    text_features [C, M, D], llm_embeddings [C, K] -> scalar, computed in the dtype of
    text_features (the MLP's hidden features are not unit norm, so the fused loss, which
    normalises its input, does not apply).
    """
    dtype = text_features.dtype
    h = pre(l2_normalize(text_features).to(phi_weight.dtype)).to(dtype)
    z = h @ phi_weight.to(dtype).transpose(0, 1)
    if phi_bias is not None:
        z = z + phi_bias.to(dtype)
    cos = (l2_normalize(z) * l2_normalize(llm_embeddings.to(dtype)).unsqueeze(1)).sum(-1)
    return (1.0 - cos).mean()


def neg_entropy(prompt_logits: torch.Tensor) -> torch.Tensor:
    """mean_c sum_m w log w of w = softmax_m(A) (the optional regulariser of SPEC 4): [C, M] -> scalar."""
    log_w = torch.log_softmax(prompt_logits, -1)
    return (log_w.exp() * log_w).sum(-1).mean()


class HeadParameters(nn.Module):
    """What the DeMul head learns and keeps frozen (SPEC 4), with the names every DeMul
    head uses: ``prompt_logits [C, M]`` (a Parameter, init 0; a zero buffer when
    ``learn_weights=False``), buffers ``llm_embeddings [C, K]``, ``phi_weight [K, D]``,
    ``phi_bias [K]`` and the frozen ``phi_pre`` (an MLP phi's earlier layers)."""

    def __init__(self, num_classes: int, num_prompts: int, llm_embeddings: Optional[torch.Tensor] = None,
                 phi=None, alpha: float = 1.0, learn_weights: bool = True, label_smoothing: float = 0.0,
                 entropy_weight: float = 0.0):
        super().__init__()
        if num_classes < 1 or num_prompts < 1:
            raise ValueError(f"num_classes and num_prompts must be >= 1, got {num_classes}, {num_prompts}")
        self.num_classes, self.num_prompts = num_classes, num_prompts
        self.alpha, self.label_smoothing = float(alpha), float(label_smoothing)
        self.entropy_weight, self.learn_weights = float(entropy_weight), bool(learn_weights)
        logits = torch.zeros(num_classes, num_prompts)
        if learn_weights:
            self.prompt_logits = nn.Parameter(logits)
        else:
            self.register_buffer("prompt_logits", logits)
        self.phi_pre = None
        w = b = e = None
        if llm_embeddings is not None:
            if phi is None:
                raise ValueError("phi is required when llm_embeddings is given (it maps CLIP text features "
                                 "into the LLM embedding space)")
            if llm_embeddings.dim() != 2 or llm_embeddings.shape[0] != num_classes:
                raise ValueError(f"llm_embeddings must be [C={num_classes}, K], got {tuple(llm_embeddings.shape)}")
            pre, w, b = split_phi(phi)
            if w.shape[0] != llm_embeddings.shape[1]:
                raise ValueError(f"phi maps to K={w.shape[0]} but llm_embeddings has K={llm_embeddings.shape[1]}")
            if pre is not None:  # a frozen copy: the caller's module is left as it is
                self.phi_pre = copy.deepcopy(pre).requires_grad_(False)
            e, w, b = llm_embeddings.detach().clone(), w.clone(), None if b is None else b.clone()
        self.register_buffer("llm_embeddings", e)
        self.register_buffer("phi_weight", w)
        self.register_buffer("phi_bias", b)


class ReferenceHead(HeadParameters):
    """The DeMul head as a module, computed by ``demul_head`` above in the input dtype."""

    def class_features(self, text_features: torch.Tensor) -> torch.Tensor:
        """T [C, M, D] -> u^ [C, D]."""
        return aggregate_prompts(text_features, self.prompt_logits.to(text_features.dtype))

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor,
                labels: Optional[torch.Tensor] = None, scale: Scale = 100.0, return_logits: bool = False) -> HeadOutput:
        dtype = text_features.dtype
        if labels is None:
            return HeadOutput(None, None, None, cosine_logits(image_features.to(dtype),
                                                              self.class_features(text_features), scale))
        fused = self.llm_embeddings is not None and self.phi_pre is None
        out = demul_head(text_features, self.prompt_logits.to(dtype), image_features.to(dtype), labels, scale,
                         llm_embeddings=self.llm_embeddings.to(dtype) if fused else None,
                         phi_weight=self.phi_weight.to(dtype) if fused else None,
                         phi_bias=self.phi_bias.to(dtype) if fused and self.phi_bias is not None else None,
                         alpha=self.alpha, label_smoothing=self.label_smoothing, return_logits=return_logits)
        if self.phi_pre is not None:
            dist = mlp_distill_loss(text_features, self.phi_pre, self.phi_weight, self.phi_bias, self.llm_embeddings)
            out = out._replace(loss=out.ce_loss + self.alpha * dist, distill_loss=dist)
        if self.entropy_weight and self.learn_weights:
            out = out._replace(loss=out.loss + self.entropy_weight * neg_entropy(self.prompt_logits.to(dtype)))
        return out


def init_context(clip_model: nn.Module, tokenizer: Callable, n_prompts: int, n_ctx: int,
                 ctx_init: Union[None, str, Sequence[str]] = None, generator: Optional[torch.Generator] = None,
                 ) -> torch.Tensor:
    """Initial context ``[M, n_ctx, width]`` (CoOp): normal(std 0.02), or the token
    embeddings of a phrase (one phrase for all prompts, or one per prompt) whose token
    count must equal n_ctx. Float32, or float64 for a float64 model."""
    emb = token_embedding_module(clip_model)
    width = emb.weight.shape[1]
    dtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
    if ctx_init is None:
        ctx = torch.empty(n_prompts, n_ctx, width, dtype=dtype, device=emb.weight.device)
        return nn.init.normal_(ctx, std=0.02, generator=generator)
    phrases = [ctx_init] * n_prompts if isinstance(ctx_init, str) else list(ctx_init)
    if len(phrases) != n_prompts:
        raise ValueError(f"ctx_init has {len(phrases)} phrases but n_prompts={n_prompts}")
    rows = []
    for phrase in phrases:
        ids = init_phrase_tokens(phrase, tokenizer, context_length=emb_context_length(clip_model))
        if ids.numel() != n_ctx:
            raise ValueError(f"ctx_init {phrase!r} has {ids.numel()} tokens but n_ctx={n_ctx}: they must match")
        with torch.no_grad():
            rows.append(emb(ids.to(emb.weight.device)).to(dtype))
    return torch.stack(rows)


def emb_context_length(clip_model: nn.Module) -> Optional[int]:
    """The text context length of a CLIP model (for padding a Hugging Face tokenizer)."""
    text = getattr(clip_model, "text_model", None)
    if text is not None:
        text = getattr(text, "text_model", text)
        return text.embeddings.position_embedding.weight.shape[0]
    text = getattr(clip_model, "text", clip_model)
    pos = getattr(text, "positional_embedding", None)
    return None if pos is None else pos.shape[0]


def encode_images(clip_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Frozen CLIP image features [B, D] (open_clip ``encode_image`` or transformers
    ``get_image_features``), without gradient."""
    with torch.no_grad():
        if hasattr(clip_model, "encode_image"):
            return clip_model.encode_image(images)
        out = clip_model.get_image_features(pixel_values=images)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def logit_scale(clip_model: nn.Module) -> torch.Tensor:
    """tau = exp(logit_scale), detached (CLIP is frozen)."""
    return clip_model.logit_scale.detach().exp()


class DeMulModule(nn.Module):
    """What ``DeMul`` and ``reference.DeMulReference`` share: parameters, the frozen CLIP
    model, forward, cached class features, saving/loading the learned prompts. A subclass
    sets ``self.text_encoder`` and ``self.head``."""

    def _setup(self, clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_prompts: int,
               n_ctx: int, ctx_init, alpha: float, learn_weights: bool) -> None:
        if len(list(classnames)) == 0:
            raise ValueError("classnames is empty: at least one class is needed")
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        self.clip_model = clip_model.requires_grad_(False).eval()
        self.config = dict(classnames=[str(c) for c in classnames], n_prompts=int(n_prompts), n_ctx=int(n_ctx),
                           ctx_init=ctx_init, alpha=float(alpha), learn_weights=bool(learn_weights))
        self.ctx = nn.Parameter(init_context(clip_model, tokenizer, n_prompts, n_ctx, ctx_init))
        self._cache = None

    # -- training / inference --------------------------------------------------------
    def train(self, mode: bool = True):
        """Train mode for the prompt learner; CLIP itself stays in eval mode (frozen)."""
        super().train(mode)
        self.clip_model.eval()
        self._cache = None
        return self

    def text_features(self) -> torch.Tensor:
        """Per-prompt text features T [C, M, D] of the current context."""
        return self.text_encoder(self.ctx)

    def _cache_key(self):
        a = self.head.prompt_logits
        return (id(self.ctx), self.ctx._version, id(a), a._version, self.ctx.device, self.ctx.dtype)

    def class_features(self) -> torch.Tensor:
        """Unit-norm class features u^ [C, D]. In eval mode computed once without gradient and
        cached until ``ctx`` or ``prompt_logits`` change (in place or replaced) or the
        module goes back to training mode."""
        if self.training:
            self._cache = None
            return self.head.class_features(self.text_features())
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.head.class_features(self.text_features()))
        return self._cache[1]

    def forward(self, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None) -> HeadOutput:
        """images [B, 3, H, W] (encoded by the frozen image tower) or image_features [B, D];
        labels [B] or None.

        returns ``HeadOutput(loss, ce_loss, distill_loss, logits [B, C])``; without labels
        only the logits (loss fields None). In eval mode without labels the cached class
        features are used (the text encoder does not run, SPEC 5).
        """
        if image_features is None:
            if images is None:
                raise ValueError("give images or image_features")
            image_features = encode_images(self.clip_model, images)
        scale = logit_scale(self.clip_model)
        if labels is None and not self.training:
            u = self.class_features()
            x = l2_normalize(image_features.to(u.dtype))
            return HeadOutput(None, None, None, scale.to(u.dtype) * (x @ u.transpose(0, 1)))
        return self.head(self.text_features(), image_features, labels, scale=scale, return_logits=True)

    # -- saving / loading the learned prompts -------------------------------------------
    def save_prompts(self, directory: str) -> None:
        """Write ``prompts.safetensors`` (ctx [M, n_ctx, width], prompt_logits [C, M]) and
        ``config.json`` (class names, n_prompts, n_ctx, ctx_init, alpha, learn_weights)."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        save_file({"ctx": self.ctx.detach().cpu().contiguous(),
                   "prompt_logits": self.head.prompt_logits.detach().cpu().contiguous()},
                  os.path.join(directory, PROMPTS_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **self.config}, f, indent=1)

    def load_prompts(self, directory: str) -> "DeMulModule":
        """Read prompts saved by ``save_prompts`` into this module (same class names and
        shapes, else ValueError). Returns self."""
        from safetensors.torch import load_file
        config = read_prompt_config(directory)
        if config["classnames"] != self.config["classnames"]:
            raise ValueError("saved prompts are for other class names than this module's")
        tensors = load_file(os.path.join(directory, PROMPTS_FILE))
        with torch.no_grad():
            for name, dst in (("ctx", self.ctx), ("prompt_logits", self.head.prompt_logits)):
                if tuple(tensors[name].shape) != tuple(dst.shape):
                    raise ValueError(f"saved {name} has shape {tuple(tensors[name].shape)}, "
                                     f"this module's {tuple(dst.shape)}")
                dst.copy_(tensors[name])
        return self

    @classmethod
    def from_saved_prompts(cls, directory: str, clip_model: nn.Module, tokenizer: Callable,
                           llm_embeddings: Optional[torch.Tensor] = None, phi=None, **kwargs):
        """Build a module from ``config.json`` (class names, sizes) and load the prompts."""
        config = read_prompt_config(directory)
        kw = dict(n_prompts=config["n_prompts"], n_ctx=config["n_ctx"], alpha=config["alpha"],
                  learn_weights=config["learn_weights"])
        kw.update(kwargs)
        return cls(clip_model, tokenizer, config["classnames"], llm_embeddings=llm_embeddings, phi=phi,
                   **kw).load_prompts(directory)


def read_prompt_config(directory: str) -> dict:
    """The ``config.json`` written by ``save_prompts``."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown prompt file format {config.get('format_version')!r} in {directory}")
    return config




class DeMulReference(DeMulModule):
    """DeMul built from ``FullTextEncoder`` (all prompts at full length) and ``demul_head``
    above: the specification of ``demul_fast.DeMul``, with the same constructor and
    ``state_dict`` keys (``ctx``, ``head.prompt_logits``, the head's frozen buffers and the
    CLIP model's weights under ``clip_model.``). ``text_encoder`` and ``backend`` are
    accepted for the same signature; the reference always runs the full path in eager
    PyTorch.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                 llm_embeddings: Optional[torch.Tensor] = None, phi=None, n_prompts: int = 4, n_ctx: int = 16,
                 ctx_init=None, alpha: float = 1.0, learn_weights: bool = True, text_encoder: str = "full",
                 backend: Optional[str] = None, label_smoothing: float = 0.0, entropy_weight: float = 0.0):
        super().__init__()
        self._setup(clip_model, tokenizer, classnames, n_prompts, n_ctx, ctx_init, alpha, learn_weights)
        self.text_encoder = FullTextEncoder(clip_model, tokenizer, classnames, n_ctx)
        self.head = ReferenceHead(len(self.config["classnames"]), n_prompts, llm_embeddings=llm_embeddings, phi=phi,
                                  alpha=alpha, learn_weights=learn_weights, label_smoothing=label_smoothing,
                                  entropy_weight=entropy_weight)

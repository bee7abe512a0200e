"""The ``encoder`` and ``step`` suites: the text encoder and a whole DeMul training step.

``encoder``: T [C, M, D] = encoder(ctx [M, n_ctx, width]) and d ctx (the output gradient
G [C, M, D] is random), providers ``eager`` (``text_encoder.FullTextEncoder``: all C*M
prompts at 77 tokens), ``compile`` (torch.compile of it), ``prefix``
(``demul_fast.PrefixSharedTextEncoder``).

``step``: loss = model(image_features=X, labels=y) and its backward into ``ctx`` and
``head.prompt_logits`` (image features given; the optimizer update, over those two small
tensors, is left out); with ``image_tower`` also op ``step+images``, the same from random
images through the frozen image tower, providers ``eager`` (``model.DeMulReference``), ``compile``
(torch.compile of it), ``demul-<backend>`` (``demul_fast.DeMul(backend=...)`` for each head
backend available here). All models share one frozen CLIP model and start from the same
``ctx`` and prompt logits.

The CLIP model is an open_clip model with random weights (no downloads): ``clip="tiny"``
is a small tower (width 128, 2 layers) for the CPU preset, ``"micro"`` (width 32, 1 layer)
for the tests; any open_clip model name (e.g. ``ViT-B-16``) builds that architecture. The gold reference runs ``FullTextEncoder`` on a
float64 copy of the model (float32 on CUDA, where float64 is slow), in chunks of classes so
that it fits where the eager reference itself may not: T chunk by chunk, then d ctx as the
sum of the chunks' vector-Jacobian products; for ``step`` the head in between is
``reference.demul_head`` (docs/SPEC.md section 4) on the gold T.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Dict, List, Optional

import torch

import demul_fast
from demul_fast import model as modules
from demul_fast import reference as ref
from demul_fast import text_encoder
from demul_fast.prompt_learner import encode_images
from demul_fast.ops.backends import why_not

from . import launches
from .floors import Cost, encoder_cost
from .head import _interpret_requested
from .workload import Inputs, Provider, Workload, unavailable

CUSTOM_TOWERS = {
    "tiny": dict(embed_dim=128, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)),
    "micro": dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)),
}
WORDS = ("tabby", "cat", "golden", "retriever", "sports", "car", "red", "fox", "stone", "bridge", "great",
         "white", "shark", "espresso", "machine", "snow", "leopard", "paper", "towel", "grand", "piano")


def classnames(n: int) -> List[str]:
    """n distinct synthetic class names of 1 to 3 words (different token lengths)."""
    return [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(1 + i % 3)) + f" {i}" for i in range(n)]


@functools.lru_cache(maxsize=4)
def clip_model(name: str, device_str: str, dtype: torch.dtype):
    """(model, tokenizer) with random weights, frozen, eval mode, on device in dtype."""
    import open_clip
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        if name in CUSTOM_TOWERS:
            cfg = CUSTOM_TOWERS[name]
            model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
            tokenizer = open_clip.get_tokenizer("ViT-B-16")
        else:
            model = open_clip.create_model(name, pretrained=None)
            tokenizer = open_clip.get_tokenizer(name)
    finally:
        torch.random.set_rng_state(gen_state)
    model = model.to(device=torch.device(device_str), dtype=dtype).eval().requires_grad_(False)
    return model, tokenizer


def _tower_sizes(model) -> Dict[str, int]:
    width = model.token_embedding.weight.shape[1]
    layers = len(model.transformer.resblocks)
    proj = model.text_projection
    embed_dim = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.weight.shape[0]
    n_text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    return dict(width=width, layers=layers, embed_dim=embed_dim, text_params=n_text)


def suffix_lengths(tokenizer, names: List[str], n_ctx: int) -> List[int]:
    """Per class: tokens after the context up to and including EOT (argmax pooling)."""
    ids = tokenizer([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "." for n in names])
    return [int(e) - n_ctx for e in ids.argmax(dim=-1)]


def _encoder_cost(mode: str, model, tokenizer, names, M, n_ctx, dtype) -> Cost:
    s = _tower_sizes(model)
    e = torch.empty((), dtype=dtype).element_size()
    return encoder_cost(mode, n_prompts=M, n_ctx=n_ctx, suffix_lengths=suffix_lengths(tokenizer, names, n_ctx),
                        width=s["width"], layers=s["layers"], embed_dim=s["embed_dim"],
                        weight_bytes=s["text_params"] * e, e=e)


class ChunkedGold:
    """FullTextEncoder on a higher-precision copy of the model, over class chunks."""

    def __init__(self, model, tokenizer, names, n_ctx, gold_dtype, seqs_per_chunk: int, M: int):
        self.model = copy.deepcopy(model).to(gold_dtype)
        per = max(1, seqs_per_chunk // max(M, 1))
        self.chunks = [(i, text_encoder.FullTextEncoder(self.model, tokenizer, names[i:i + per], n_ctx))
                       for i in range(0, len(names), per)]
        self.dtype = gold_dtype

    def features(self, ctx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([enc(ctx.detach().to(self.dtype)) for _, enc in self.chunks], dim=0)

    def ctx_grad(self, ctx: torch.Tensor, grad_T: torch.Tensor) -> torch.Tensor:
        c = ctx.detach().to(self.dtype).requires_grad_(True)
        for start, enc in self.chunks:
            t = enc(c)
            t.backward(grad_T[start:start + t.shape[0]].to(self.dtype))
        return c.grad


def _gold_setup(model, tokenizer, names, n_ctx, M, device):
    gold_dtype = torch.float64 if device.type == "cpu" else torch.float32
    seqs = 1 << 30 if device.type == "cpu" else 1024
    return ChunkedGold(model, tokenizer, names, n_ctx, gold_dtype, seqs, M)


class _LazyGold:
    """A ChunkedGold built on first use (a count-only run never builds its float64 copy)."""

    def __init__(self, build, device):
        self._build, self._gold = build, None
        self.dtype = torch.float64 if device.type == "cpu" else torch.float32

    def __getattr__(self, name):
        if self._gold is None:
            self._gold = self._build()
        return getattr(self._gold, name)


def _compile_or_skip(allow: bool) -> Optional[str]:
    if not allow:
        return ("torch.compile is off for this run (on a CPU it costs about a minute per graph: "
                "pass --compile to include it)")
    return None


# -- encoder -----------------------------------------------------------------------------------

def encoder_workload(sizes, dtype, device, allow_compile: bool) -> Workload:
    C = sizes.get("enc_C") or sizes["C"]
    M = sizes.get("enc_M") or sizes["M"]
    n_ctx = sizes["n_ctx"]
    model, tokenizer = clip_model(sizes["clip"], str(device), dtype)
    names = classnames(C)
    width = _tower_sizes(model)["width"]
    D = _tower_sizes(model)["embed_dim"]
    wsizes = dict(C=C, M=M, n_ctx=n_ctx, clip=sizes["clip"], width=width, D=D)
    gold_enc = _gold_setup(model, tokenizer, names, n_ctx, M, device)

    def make_inputs(i: int) -> Inputs:
        g = torch.Generator().manual_seed(100 + i)
        ctx = (torch.randn(M, n_ctx, width, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_(True)
        return {"ctx": ctx, "G": torch.randn(C, M, D, generator=g).to(device=device, dtype=dtype)}

    def gold(inputs: Inputs) -> Dict[str, torch.Tensor]:
        return {"T": gold_enc.features(inputs["ctx"]), "grad:ctx": gold_enc.ctx_grad(inputs["ctx"], inputs["G"])}

    provs = []
    full = text_encoder.FullTextEncoder(model, tokenizer, names, n_ctx)
    provs.append(Provider("eager", lambda i: full(i["ctx"]), note="text_encoder.FullTextEncoder"))
    reason = _compile_or_skip(allow_compile)
    if reason:
        provs.append(unavailable("compile", reason))
    else:
        compiled = torch.compile(full)
        provs.append(Provider("compile", lambda i: compiled(i["ctx"]), note="torch.compile(FullTextEncoder)"))
    enc_cls = getattr(demul_fast, "PrefixSharedTextEncoder", None)
    if enc_cls is None:
        provs.append(unavailable("prefix", "demul_fast.PrefixSharedTextEncoder is not in this build"))
    else:
        try:
            enc = enc_cls(model, tokenizer, names, n_ctx)
            provs.append(Provider("prefix", lambda i: enc(i["ctx"]), note="demul_fast.PrefixSharedTextEncoder"))
        except Exception as exc:  # noqa: BLE001
            provs.append(unavailable("prefix", f"construction failed: {type(exc).__name__}: {exc}"))
    e = torch.empty((), dtype=dtype).element_size()
    return Workload(
        suite="encoder", op="encoder", sizes=wsizes, dtype=dtype, device=device, make_inputs=make_inputs,
        outputs=lambda T: {"T": T}, root=lambda T, i: (T, i["G"]), gold=gold,
        cost=lambda mode: _encoder_cost(mode, model, tokenizer, names, M, n_ctx, dtype),
        input_bytes=e * (M * n_ctx * width + C * M * D) + _tower_sizes(model)["text_params"] * e,
        grad_names=("ctx",), providers=provs, gold_dtype=gold_enc.dtype, modes=("fwd", "fwd+bwd"))


# -- step --------------------------------------------------------------------------------------

def _head_tensors(C, D, K, B, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(C, K, generator=g).to(device=device, dtype=dtype)
    W = (torch.randn(K, D, generator=g) / math.sqrt(D)).to(device=device, dtype=dtype)
    b = (torch.randn(K, generator=g) * 0.1).to(device=device, dtype=dtype)
    return E, W, b


def _image_cost(model, B: int, e: int) -> Cost:
    """Lower bound of the frozen image tower's forward: 2 x weights x tokens per image (the
    linear layers; attention left out), weights read once, images read, features written."""
    visual = model.visual
    n_params = sum(p.numel() for p in visual.parameters())
    grid = getattr(visual, "grid_size", (1, 1))
    tokens = grid[0] * grid[1] + 1
    size = getattr(visual, "image_size", (224, 224))
    return Cost(e * (n_params + B * 3 * size[0] * size[1]), 2 * n_params * tokens * B)


REF_COUNT_C = 37  # eager launch counts run at most this many classes (full-length reference) ...
DEMUL_COUNT_C = 37  # ... and this many (DeMul): the same ops at any C (eager_launches)
_EAGER_COUNTS: Dict[tuple, dict] = {}  # eager counts by what they depend on (not C above the cap)


def compile_name(backend: str, mode: str) -> str:
    """Provider name of DeMul(backend) compiled in ``mode``: demul-<backend>-compile for the
    default mode, demul-<backend>-compile-<mode> for the others."""
    return f"demul-{backend}-compile" + ("" if mode == "default" else f"-{mode}")


def step_workload(sizes, dtype, device, allow_compile: bool, image_tower: bool = False,
                  compile_modes=("default",)) -> Workload:
    C = sizes.get("enc_C") or sizes["C"]
    M = sizes.get("enc_M") or sizes["M"]
    n_ctx, B, K = sizes["n_ctx"], sizes["B"], sizes["K"]
    model, tokenizer = clip_model(sizes["clip"], str(device), dtype)
    tw = _tower_sizes(model)
    D = tw["embed_dim"]
    names = classnames(C)
    wsizes = dict(C=C, M=M, n_ctx=n_ctx, B=B, K=K, D=D, clip=sizes["clip"], width=tw["width"])
    E, W, b = _head_tensors(C, D, K, B, dtype, device, seed=7)
    gold_enc = _LazyGold(lambda: _gold_setup(model, tokenizer, names, n_ctx, M, device), device)  # built when first used
    scale = model.logit_scale.detach().exp()

    ref_cls = getattr(modules, "DeMulReference", None)
    fast_cls = getattr(demul_fast, "DeMul", None)
    provs: List[Provider] = []
    g = torch.Generator().manual_seed(11)
    ctx0 = (torch.randn(M, n_ctx, tw["width"], generator=g) * 0.02).to(device=device, dtype=dtype)
    a0 = (torch.randn(C, M, generator=g) * 0.5).to(device=device)

    def build(cls, names=names, E=E, **kw):
        m = cls(model, tokenizer, names, llm_embeddings=E, phi=(W, b), n_prompts=M, n_ctx=n_ctx, **kw)
        m = m.to(device).train()
        with torch.no_grad():
            m.ctx.copy_(ctx0.to(m.ctx.dtype))
            m.head.prompt_logits.copy_(a0[:len(names)].to(m.head.prompt_logits.dtype))
        return m

    def params(m):
        return lambda inputs: {"ctx": m.ctx, "prompt_logits": m.head.prompt_logits}

    def call(m, i):
        if image_tower:
            return m(images=i["images"], labels=i["y"])
        return m(image_features=i["X"], labels=i["y"])

    def backward(out):
        out.loss.backward()

    def eager_launches(m, cap):
        """Eager launches of one step, counted by running it. Above ``cap`` classes it runs on
        the first ``cap`` classes: an eager step dispatches the same ops at any C (batched
        over classes; tests/test_benchmarks.py checks it), and running the full-length
        reference at C=1000 takes hours on a CPU. The count records the C it ran at."""
        def count(i):
            key = (type(m).__name__, getattr(m.head, "backend", None), sizes["clip"], M, n_ctx, B, str(device),
                   str(dtype), min(C, cap))
            if key in _EAGER_COUNTS:  # counted for another C of the same tower: the same ops
                return _EAGER_COUNTS[key]
            mc, inp = m, i
            if C > cap:
                mc = build(type(m), names=names[:cap], E=E[:cap], **({} if not hasattr(m.head, "backend") else
                                                                       {"backend": m.head.backend}))
                inp = dict(i, y=i["y"] % cap)
            backward(call(mc, inp))  # warm: the one-time caches (distill basis) are not per step
            out = launches.count_eager(lambda: backward(call(mc, inp)))
            _EAGER_COUNTS[key] = dict(out, counted_at_C=min(C, cap))
            return _EAGER_COUNTS[key]
        return count

    def step_provider(name, m, note, cap):
        return Provider(name, lambda i: call(m, i), params=params(m), note=note, launches=eager_launches(m, cap))

    def compiled_provider(name, m, mode, note):
        if hasattr(m, "plan"):  # as TrainStep does: packed layout and distillation basis decided outside the step
            m.plan()
        compiled = torch.compile(m, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
        graphs = mode == "reduce-overhead" and device.type == "cuda"

        def fn(i):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return call(compiled, i)

        def count(i):
            # on a CPU the code is generated, not built or run (launches.count_compiled)
            return launches.count_compiled(lambda: backward(fn(i)), run=device.type == "cuda")[1]
        return Provider(name, fn, params=params(m), note=note, launches=count)

    if ref_cls is None:
        provs.append(unavailable("eager", "demul_fast.model.DeMulReference is not in this build"))
    else:
        eager = build(ref_cls)
        provs.append(step_provider("eager", eager, "model.DeMulReference", REF_COUNT_C))
        reason = _compile_or_skip(allow_compile)
        if reason:
            provs.append(unavailable("compile", reason))
        else:
            provs.append(compiled_provider("compile", build(ref_cls), "default", "torch.compile(DeMulReference)"))
    for backend in ("torch", "triton", "cuda"):
        name = f"demul-{backend}"
        if fast_cls is None:
            provs.append(unavailable(name, "demul_fast.DeMul is not in this build"))
            continue
        reason = why_not(backend, device, dtype)
        if reason is None and backend == "triton" and device.type != "cuda" and not _interpret_requested():
            reason = "the Triton interpreter is a correctness tool, not a performance path (needs a CUDA device)"
        if reason:
            provs.append(unavailable(name, reason))
            continue
        try:
            provs.append(step_provider(name, build(fast_cls, backend=backend), f"demul_fast.DeMul(backend={backend!r})",
                                       DEMUL_COUNT_C))
        except Exception as exc:  # noqa: BLE001
            provs.append(unavailable(name, f"construction failed: {type(exc).__name__}: {exc}"))
            continue
        for mode in compile_modes:
            cname = compile_name(backend, mode)
            if reason := _compile_or_skip(allow_compile):
                provs.append(unavailable(cname, reason))
                continue
            provs.append(compiled_provider(cname, build(fast_cls, backend=backend), mode,
                                           f"torch.compile(DeMul(backend={backend!r}), fullgraph=True, mode={mode!r})"))

    size = getattr(model.visual, "image_size", (224, 224))

    def make_inputs(i: int) -> Inputs:
        gi = torch.Generator().manual_seed(200 + i)
        inputs = {"X": torch.randn(B, D, generator=gi).to(device=device, dtype=dtype),
                  "y": torch.randint(0, C, (B,), generator=gi).to(device)}
        if image_tower:
            inputs["images"] = torch.randn(B, 3, size[0], size[1], generator=gi).to(device=device, dtype=dtype)
        return inputs

    def gold(inputs: Inputs) -> Dict[str, torch.Tensor]:
        gd = gold_enc.dtype
        T = gold_enc.features(ctx0).requires_grad_(True)
        A = a0.detach().to(gd).requires_grad_(True)
        # with the image tower, its features come from the run's own (frozen) model: the gold
        # checks what the providers compute from them
        X = encode_images(model, inputs["images"]) if image_tower else inputs["X"]
        out = ref.demul_head(T, A, X.to(gd), inputs["y"], scale.to(gd), E.to(gd), W.to(gd), b.to(gd))
        out.loss.backward()
        return {"loss": out.loss.detach(), "grad:ctx": gold_enc.ctx_grad(ctx0, T.grad),
                "grad:prompt_logits": A.grad}

    e = torch.empty((), dtype=dtype).element_size()
    image_cost = _image_cost(model, B, e) if image_tower else Cost(0, 0)
    return Workload(
        suite="step", op="step+images" if image_tower else "step", sizes=wsizes, dtype=dtype, device=device, make_inputs=make_inputs,
        outputs=lambda out: {"loss": out.loss}, root=lambda out, i: (out.loss, None), gold=gold,
        cost=lambda mode: (_encoder_cost(mode, model, tokenizer, names, M, n_ctx, dtype)
                           + _head_step_cost(mode, C, M, D, B, K, e) + image_cost),
        input_bytes=e * (B * D + C * K + K * D) + tw["text_params"] * e + image_cost.bytes,
        providers=provs, gold_dtype=gold_enc.dtype, modes=("fwd+bwd",))


def _head_step_cost(mode, C, M, D, B, K, e) -> Cost:
    from .floors import head_cost
    return head_cost("demul_head", mode, C, M, D, B, K, e)


def _not_buildable(suite: str, op: str, sizes, dtype, device, names, reason: str) -> Workload:
    """A workload whose providers are all skipped with ``reason`` (it never runs)."""
    def never(*_):
        raise RuntimeError(reason)

    return Workload(suite=suite, op=op, sizes=dict(sizes), dtype=dtype, device=device, make_inputs=never,
                    outputs=never, root=never, gold=never, cost=never, input_bytes=0,
                    providers=[unavailable(n, reason) for n in names],
                    modes=("fwd", "fwd+bwd") if suite == "encoder" else ("fwd+bwd",))


def workloads(suites, sizes, dtype, device, allow_compile: bool = False, image_tower: bool = False,
              compile_modes=("default",), step_C=None) -> List[Workload]:
    """The encoder and step workloads; where one cannot be built (open_clip missing, say),
    a workload whose providers are listed as skipped with the reason. step_C: class counts
    of the step suite (one workload each; default the preset's)."""
    jobs = []
    if "encoder" in suites:
        jobs.append(("encoder", "encoder", ("eager", "compile", "prefix"),
                     lambda: encoder_workload(sizes, dtype, device, allow_compile)))
    step_names = ("eager", "compile") + tuple(n for b in ("torch", "triton", "cuda")
                                              for n in [f"demul-{b}"] + [compile_name(b, m) for m in compile_modes])
    if "step" in suites:
        for c in step_C or [None]:
            sz = dict(sizes, **({"enc_C": c} if c else {}))
            jobs.append(("step", "step", step_names,
                         lambda sz=sz: step_workload(sz, dtype, device, allow_compile, compile_modes=compile_modes)))
            if image_tower:
                jobs.append(("step", "step+images", step_names,
                             lambda sz=sz: step_workload(sz, dtype, device, allow_compile, image_tower=True,
                                                         compile_modes=compile_modes)))
    out = []
    for suite, op, names, build in jobs:
        try:
            out.append(build())
        except ImportError as exc:
            reason = (f"{exc.name or 'a module'} is not installed ({exc}); the encoder and step suites need "
                      "open_clip_torch (pip install open_clip_torch, or the [clip] extra)")
            out.append(_not_buildable(suite, op, sizes, dtype, device, names, reason))
        except Exception as exc:  # noqa: BLE001 - reported in the rows, the run goes on
            out.append(_not_buildable(suite, op, sizes, dtype, device, names,
                                      f"could not build the workload: {type(exc).__name__}: {exc}"))
    return out

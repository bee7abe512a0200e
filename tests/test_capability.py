"""One capability question per backend, asked once per call (demul_fast.ops.capability).

* each backend's ``capability`` is asked exactly once per public call, counted, for every
  public function: the automatic choice asks the default order up to the first backend that
  can, an explicit request asks that backend alone;
* the Triton backend's answer carries the launch configurations it had to compute, and the
  launches of that call (forward and backward) read the same configurations back: each is
  built once per shape, counted;
* refusals name their reason (explicit requests raise it);
* dispatch picks what it picked before the capability functions replaced the four
  overlapping checks: ``EXPECTED`` is the old ``select``'s outcome on these cases (the old
  and the new ``select`` agreed on a table of 3840 cases, every function x device x dtype x
  request x shape limit x frozen operand, but for the SPEC section the CUDA refusal of a
  basis that requires grad cites: 4.3 now, as the Triton one did).

The cuda backend's capability needs no extension (it reads shapes and flags only), so the
tests put its module in the backend table where the extension is not built, to ask it.
"""

import pytest
import torch

import demul_fast as df
from demul_fast.kernels import cosine_ce, text_head
from demul_fast.ops import backends, cuda_ops, torch_ops, triton_ops
from demul_fast.ops.capability import Call
from demul_fast.ops.distill_basis import DistillBasis

MODULES = {"cuda": cuda_ops, "triton": triton_ops, "torch": torch_ops}


@pytest.fixture
def asked(monkeypatch):
    """Counts each backend's capability question; every backend module is loadable (cuda's
    checks run without the extension)."""
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    counts = {name: 0 for name in MODULES}
    for name, module in MODULES.items():
        monkeypatch.setitem(backends._loaded, name, (module, None))
        original = module.capability

        def counted(call, name=name, original=original):
            counts[name] += 1
            return original(call)

        monkeypatch.setattr(module, "capability", counted)
    return counts


def _inputs(gen, C=5, M=3, D=8, B=4, K=6, dtype=torch.float32):
    T = torch.randn(C, M, D, generator=gen).to(dtype)
    return dict(T=T, A=torch.randn(C, M, generator=gen).to(dtype), X=torch.randn(B, D, generator=gen).to(dtype),
                y=torch.randint(0, C, (B,), generator=gen), E=torch.randn(C, K, generator=gen).to(dtype),
                W=torch.randn(K, D, generator=gen).to(dtype), U=df.reference.l2_normalize(T[:, 0].float()).to(dtype))


def _calls(v):
    """Each public function on the inputs ``v``."""
    return {
        "aggregate_prompts": lambda backend: df.aggregate_prompts(v["T"], v["A"], backend=backend),
        "cosine_cross_entropy": lambda backend: df.cosine_cross_entropy(v["X"], v["U"], v["y"], 10.0,
                                                                        backend=backend),
        "prompt_distill_loss": lambda backend: df.prompt_distill_loss(v["T"], v["W"], None, v["E"], backend=backend),
        "demul_head": lambda backend: df.demul_head(v["T"], v["A"], v["X"], v["y"], 10.0, v["E"], v["W"],
                                                    backend=backend),
    }


@pytest.mark.parametrize("fn", ["aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head"])
def test_each_backend_is_asked_once_per_call(gen, asked, monkeypatch, fn):
    # M = 129 is beyond the triton text tiles, D = 1025 beyond its D limit (cosine_cross_entropy
    # has no text features): triton refuses, cuda refuses CPU tensors, torch runs
    v = _inputs(gen, C=2, M=129, D=8) if fn != "cosine_cross_entropy" else _inputs(gen, C=2, M=1, D=1025)
    monkeypatch.setattr(backends, "default_order", lambda device: ("triton", "cuda", "torch"))
    _calls(v)[fn](None)
    assert asked == {"triton": 1, "cuda": 1, "torch": 1}
    for name in MODULES:  # an explicit request asks the requested backend alone, once
        counts_before = dict(asked)
        try:
            _calls(v)[fn](name)
        except backends.BackendUnavailable:
            assert name != "torch"
        assert {k: asked[k] - counts_before[k] for k in asked} == {k: int(k == name) for k in asked}


def test_the_first_backend_that_can_is_the_last_asked(gen, asked, monkeypatch):
    """A call triton can run (CPU tensors under the interpreter): triton is asked once and
    nothing after it."""
    monkeypatch.setattr(backends, "default_order", lambda device: ("triton", "cuda", "torch"))
    v = _inputs(gen)
    _calls(v)["demul_head"](None)
    assert asked == {"triton": 1, "cuda": 0, "torch": 0}


def test_the_triton_plan_is_what_the_launches_use(gen, monkeypatch):
    """The launch configurations the capability question computes are the ones the forward
    and backward launches read: each built once for the call's shapes."""
    monkeypatch.setattr(text_head, "_CONFIGS", {})
    monkeypatch.setattr(cosine_ce, "_CONFIGS", {})
    built = {"text": [], "ce": []}
    build_text, build_ce = text_head.build_text_config, cosine_ce.build_ce_config
    monkeypatch.setattr(text_head, "build_text_config",
                        lambda *a: built["text"].append(a) or build_text(*a))
    monkeypatch.setattr(cosine_ce, "build_ce_config", lambda *a: built["ce"].append(a) or build_ce(*a))
    used = []
    text_config, ce_config = text_head.text_config, cosine_ce.ce_config
    monkeypatch.setattr(text_head, "text_config", lambda *a: used.append(text_config(*a)) or used[-1])
    monkeypatch.setattr(cosine_ce, "ce_config", lambda *a: used.append(ce_config(*a)) or used[-1])

    C, M, D, B, K = 5, 3, 8, 4, 6
    v = _inputs(gen, C=C, M=M, D=D, B=B, K=K)
    T = v["T"].requires_grad_()
    args = dict(text_features=T, prompt_logits=v["A"], image_features=v["X"], llm_embeddings=v["E"],
                phi_weight=v["W"], phi_bias=None)
    choice = backends.select("triton", T.device, T.dtype, ("demul_head", args))
    rank = min(K, D)
    wide = text_head.wide_tiles_fit(T.device)  # the device's shared memory picks the forward's row tile
    assert built == {"text": [(C, M, D, rank, 4, wide)], "ce": [(B, C, D)]}
    plan = choice.answer.plan
    out = df.demul_head(T, v["A"], v["X"], v["y"], 10.0, v["E"], v["W"], backend="triton")
    out.loss.backward()
    # no configuration was built again: the call's own question and its launches (text
    # forward and backward, CE forward and backward) all read the two planned ones
    assert built == {"text": [(C, M, D, rank, 4, wide)], "ce": [(B, C, D)]}
    assert len(used) >= 6 and all(cfg is plan["text"] or cfg is plan["ce"] for cfg in used)
    assert sum(cfg is plan["text"] for cfg in used) >= 3 and sum(cfg is plan["ce"] for cfg in used) >= 3


def test_refusals_name_their_reason(monkeypatch):
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    monkeypatch.setitem(backends._loaded, "cuda", (cuda_ops, None))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    T = torch.zeros(3, 2, 8)
    W = torch.zeros(6, 8, requires_grad=True)
    E = torch.zeros(3, 6)
    basis = DistillBasis(torch.zeros(6, 8, requires_grad=True), torch.zeros(6), torch.zeros(3, 6), torch.zeros(3),
                         torch.zeros(()))
    cases = [
        ("triton", cuda, torch.float64, "aggregate_prompts", dict(text_features=T), "float64"),
        ("cuda", cpu, torch.float32, "aggregate_prompts", dict(text_features=T), "needs CUDA tensors"),
        ("triton", cuda, torch.float32, "aggregate_prompts", dict(text_features=torch.zeros(2, 129, 8)), "M <= 128"),
        ("triton", cuda, torch.float32, "cosine_cross_entropy",
         dict(image_features=torch.zeros(2, 1025), class_features=torch.zeros(3, 1025)), "D <= 1024"),
        ("cuda", cuda, torch.float32, "aggregate_prompts", dict(text_features=torch.zeros(1, 4097, 2)), "M=4096"),
        ("triton", cuda, torch.float32, "prompt_distill_loss",
         dict(text_features=T, phi_weight=W, llm_embeddings=E), "phi_weight requires grad"),
        ("cuda", cuda, torch.float32, "demul_head",
         dict(text_features=T, phi_weight=W.detach(), llm_embeddings=E.requires_grad_()), "llm_embeddings requires"),
        ("cuda", cuda, torch.float32, "demul_head", dict(text_features=T, distill_basis=basis), "basis no gradient"),
        ("triton", cuda, torch.float32, "demul_head", dict(text_features=T, distill_basis=basis), "basis no gradient"),
    ]
    for name, device, dtype, fn, args, reason in cases:
        answer = MODULES[name].capability(Call(device, dtype, fn, args)).reason
        assert answer is not None and reason in answer, (name, fn, answer)
        with pytest.raises(backends.BackendUnavailable, match=f"backend '{name}' is unavailable: .*{reason}"):
            backends.select(name, device, dtype, (fn, args))
    with pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        df.aggregate_prompts(torch.randn(3, 2, 8), torch.randn(3, 2), backend="cuda")


def _case(fn, device, dtype, shape="plain", grad=None):
    C, M, D = dict(plain=(5, 3, 8), M129=(5, 129, 8), D1025=(3, 2, 1025), M5000=(2, 5000, 4))[shape]
    T, X = torch.zeros(C, M, D), torch.zeros(3, D)
    W, E = torch.zeros(6, D, requires_grad=grad == "phi"), torch.zeros(C, 6)
    args = dict(aggregate_prompts=dict(text_features=T, prompt_logits=T[..., 0]),
                cosine_cross_entropy=dict(image_features=X, class_features=T[:, 0]),
                prompt_distill_loss=dict(text_features=T, phi_weight=W, phi_bias=None, llm_embeddings=E),
                demul_head=dict(text_features=T, prompt_logits=T[..., 0], image_features=X, llm_embeddings=E,
                                phi_weight=W, phi_bias=None))[fn]
    return torch.device(device), dtype, (fn, args)


f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
# (request, case) -> the backend picked, or a fragment of the refusal: the old select's outcomes
EXPECTED = [
    (None, _case("demul_head", "cpu", f32), "torch"),
    (None, _case("demul_head", "cpu", bf16), "torch"),
    (None, _case("demul_head", "cuda", f32), "triton"),
    (None, _case("demul_head", "cuda", bf16), "triton"),
    (None, _case("demul_head", "cuda", f64), "torch"),
    (None, _case("demul_head", "cuda", f32, "M129"), "cuda"),
    (None, _case("aggregate_prompts", "cuda", f32, "M5000"), "torch"),
    (None, _case("cosine_cross_entropy", "cuda", f32, "D1025"), "cuda"),
    (None, _case("prompt_distill_loss", "cuda", f32, "D1025"), "cuda"),
    (None, _case("prompt_distill_loss", "cuda", f32, grad="phi"), "torch"),
    ("triton", _case("demul_head", "cpu", f32), "triton"),
    ("triton", _case("demul_head", "cpu", f64), "takes float32, bfloat16 or float16 inputs, got torch.float64"),
    ("triton", _case("demul_head", "cuda", f32, "M129"), "M <= 128"),
    ("triton", _case("aggregate_prompts", "cuda", f32, "D1025"), "D <= 1024"),
    ("cuda", _case("demul_head", "cpu", f32), "the cuda backend needs CUDA tensors, got tensors on cpu"),
    ("cuda", _case("aggregate_prompts", "cuda", f32, "M5000"), "at most M=4096 prompts, got M=5000"),
    ("cuda", _case("demul_head", "cuda", f32, grad="phi"), "phi_weight requires grad"),
    ("torch", _case("demul_head", "cuda", f64), "torch"),
]


@pytest.mark.parametrize("request_, case, expected", EXPECTED)
def test_dispatch_picks_what_it_picked_before(monkeypatch, request_, case, expected):
    """On CPU the default order is torch alone; on a CUDA device (asked here with CPU tensors:
    the answers read shapes, dtype and the device named) triton, cuda, torch."""
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    monkeypatch.setitem(backends._loaded, "cuda", (cuda_ops, None))
    device, dtype, call = case
    if expected in backends.BACKENDS:
        assert backends.select(request_, device, dtype, call).name == expected
    else:
        with pytest.raises(backends.BackendUnavailable, match=expected.replace(".", r"\.")):
            backends.select(request_, device, dtype, call)

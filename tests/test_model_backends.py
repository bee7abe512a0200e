"""DeMul with each head backend against DeMulReference, over a few training steps.

``DeMul(backend=...)`` (prefix-shared encoder + the backend's fused head) and
``DeMulReference`` (full encoder + reference head) start from the same parameters and take
the same SGD steps on the same batches; after every step the prompts (ctx, prompt_logits)
and the loss must meet the error rule (tests/numerics.py) against the float64 reference's
trajectory, with the float32 reference's trajectory as the yardstick. On the CPU: the torch
backend and triton under the interpreter; on a GPU every backend (marked ``gpu``).
A run with the head's dT scaled by 1.05 must fail the same check (it can fail), and
bfloat16 autocast on the CPU trains like the reference under the same autocast.
"""

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from backend_cases import backend_module, backend_params
from demul_fast import DeMul
from demul_fast.model import DeMulReference
from numerics import assert_error_rule

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VISION = dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
NAMES = ["cat", "golden_retriever", "sea anemone", "x", "a long class name"]
C, M, N_CTX, D, K, B = len(NAMES), 3, 4, 40, 24, 6
STEPS, LR = 3, 2.0


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def clip64():
    torch.manual_seed(0)
    return CLIP(embed_dim=D, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT).double()


def _modules(clip64, tokenizer, gen, backend, device):
    """(float64 reference, float32 module with ``backend`` on ``device``, float32 reference),
    all with the same parameters."""
    kw = dict(llm_embeddings=torch.randn(C, K, generator=gen, dtype=torch.float64),
              phi=torch.nn.Linear(D, K).double(), n_prompts=M, n_ctx=N_CTX, alpha=0.7, label_smoothing=0.1)
    ref64 = DeMulReference(clip64, tokenizer, NAMES, **kw).double()
    with torch.no_grad():
        ref64.ctx.normal_(0, 0.3, generator=gen)
        ref64.head.prompt_logits.normal_(generator=gen)
    clip32 = copy.deepcopy(clip64).float()
    kw32 = dict(kw, llm_embeddings=kw["llm_embeddings"].float(), phi=copy.deepcopy(kw["phi"]).float())
    fast = DeMul(clip32, tokenizer, NAMES, backend=backend, **kw32).float()
    plain = DeMulReference(copy.deepcopy(clip32), tokenizer, NAMES, **kw32).float()
    state = {k: v for k, v in ref64.state_dict().items() if not k.startswith("clip_model.")}
    fast.load_state_dict(state, strict=False)
    plain.load_state_dict(state, strict=False)
    return ref64, fast.to(device), plain


def _step(module, x, y, autocast=False):
    """One SGD step; returns the loss before it."""
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module(labels=y, image_features=x).loss
    loss.backward()
    with torch.no_grad():
        for p in (module.ctx, module.head.prompt_logits):
            p -= LR * p.grad
    return loss.detach()


def _train_and_compare(clip64, tokenizer, gen, backend, device, autocast=False):
    ref64, fast, plain = _modules(clip64, tokenizer, gen, backend, device)
    start = {name: ref64.get_parameter(name).detach().clone() for name in ("ctx", "head.prompt_logits")}
    compute = torch.bfloat16 if autocast else None  # under autocast the layers run in bf16 by design
    for step in range(STEPS):
        x = torch.randn(B, D, generator=gen, dtype=torch.float64)
        y = torch.randint(0, C, (B,), generator=gen)
        want = _step(ref64, x, y)
        got = _step(fast, x.float().to(device), y.to(device), autocast)
        base = _step(plain, x.float(), y, autocast)
        assert_error_rule(f"{backend} step {step} loss", got.cpu(), want, base, k=2.0, compute_dtype=compute)
        for name in ("ctx", "head.prompt_logits"):
            f, r, p = (m.get_parameter(name).detach().cpu() for m in (fast, ref64, plain))
            assert_error_rule(f"{backend} step {step} {name}", f, r, p, k=3.0, compute_dtype=compute)
    for name, before in start.items():  # the steps moved the prompts: the check is about training
        moved = float((ref64.get_parameter(name).detach() - before).abs().max() / before.abs().max())
        assert moved > 1e-3, f"{name} moved by only {moved:.1e} (relative) in {STEPS} steps"


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32,)))
def test_training_steps_match_the_reference(clip64, tokenizer, gen, backend, device, dtype):
    _train_and_compare(clip64, tokenizer, gen, backend, device)


def test_a_wrong_gradient_fails_the_training_check(clip64, tokenizer, gen, monkeypatch):
    """The check above can fail: the torch head with its dT scaled by 1.05 is refused."""
    module = backend_module("torch")
    original = module.demul_head

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.05

    monkeypatch.setattr(module, "demul_head", lambda t, *a, **k: original(ScaleGrad.apply(t), *a, **k))
    with pytest.raises(AssertionError, match="exceeds the rule"):
        _train_and_compare(clip64, tokenizer, gen, "torch", "cpu")


def test_bfloat16_autocast_on_cpu(clip64, tokenizer, gen):
    """Under CPU autocast the text layers run in bfloat16 and hand the head bfloat16 features;
    DeMul trains like DeMulReference under the same autocast (the yardstick), and its
    parameters and their gradients stay float32."""
    ref64, fast, plain = _modules(clip64, tokenizer, gen, None, "cpu")
    x = torch.randn(B, D, generator=gen)
    y = torch.randint(0, C, (B,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = fast.text_features()
        out = fast(labels=y, image_features=x)
    assert features.dtype == torch.bfloat16, "autocast did not reach the text encoder"
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert fast.ctx.grad.dtype == torch.float32 and torch.isfinite(fast.ctx.grad).all()
    _train_and_compare(clip64, tokenizer, gen, None, "cpu", autocast=True)

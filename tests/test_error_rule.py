"""A mutation test of the error rule (tests/numerics.py): deliberately wrong heads must fail it.

Each mutation wraps a CPU backend's ``demul_head`` (the torch backend, and the triton backend
under the interpreter) so that it computes something slightly wrong, then runs the same
check every backend test uses (``backend_cases.assert_head_matches_reference``: loss parts,
logits and the gradients of T, A, X) on bfloat16 inputs, and expects the rule to refuse it.
The unmutated backend passes the same check at the same shapes (the control), so a refusal
is the mutation's doing.

Mutations: alpha x1.05, scale x1.01, phi_bias dropped, label smoothing ignored, dT x1.05,
dX x1.05, and a path that computes in bfloat16 (torch: the reference run on the bfloat16
tensors as they are, every intermediate rounded to bfloat16; triton: every tl.dot's result
rounded to bfloat16 before it is accumulated, i.e. a bf16 accumulator per tile).

Shapes. "imagenet-like" keeps ImageNet's proportions where they matter for the bound: many
more classes than images in a batch (C/B = 12), M = 8 prompts, K/D = 6 (3072/512), tau = 100
(CLIP's logit scale), label smoothing 0.1; "odd" has no power of two anywhere. Small sizes
suffice because the bound does not loosen with size the way a wrong path's error does not
shrink: every mutation is a relative change of 1 to 5 % (or bfloat16's 2^-8 per operation),
while the rule allows one bfloat16 rounding of each stored value (2^-8 relative, element by
element) plus 16 float32 eps of the terms' magnitude, which grows only with log C and tau.
The interpreter runs every program in Python, so its shapes are the smallest that keep those
proportions and still span several tiles.

The Triton backend runs these checks on float32 inputs. On bfloat16 inputs its kernels round
every tl.dot operand (the normalised features, the distillation basis) to bfloat16 by design,
as the tensor cores take them; at tau = 100 that rounding alone moves the loss by more than
alpha x1.05 does, so no rule can tell those apart there. Its bfloat16 paths are checked with
the rule's explicit operand allowance (tests/test_triton.py) and their float32 accumulation
from the compiled code (tests/test_compiled_report.py); here, in float32, the strict rule
catches every mutation, a bf16-rounding tl.dot included.
"""

import inspect

import pytest
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # then the triton backend is not available and has no cases here
    triton = None

from backend_cases import assert_head_matches_reference, available_backends, backend_module, make_head_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {
    "imagenet-like": dict(C=96, M=8, D=64, B=8, K=384, scale=100.0),
    "odd": dict(C=37, M=3, D=100, B=5, K=70, scale=30.0),
}
INTERPRETER_SHAPES = {  # the same proportions, a few seconds per run in the interpreter
    "imagenet-like": dict(C=24, M=8, D=32, B=2, K=192, scale=100.0),
    "odd": dict(C=19, M=3, D=45, B=5, K=51, scale=30.0),
}
OPTS = dict(alpha=1.0, label_smoothing=0.1, return_logits=True)
BACKENDS = available_backends("cpu")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _set(**changes):
    def mutate(kw):
        for name, fn in changes.items():
            kw[name] = fn(kw[name])
    return mutate


MUTATIONS = {
    "alpha_x1.05": _set(alpha=lambda a: a * 1.05),
    "scale_x1.01": _set(scale=lambda s: s * 1.01),
    # with frozen phi the backends get the K-free basis of SPEC 4.3: b lives in c, delta, beta
    "phi_bias_dropped": _set(basis=lambda B: B._replace(c=torch.zeros_like(B.c), delta=torch.zeros_like(B.delta),
                                                        beta=torch.zeros_like(B.beta))),
    "label_smoothing_ignored": _set(label_smoothing=lambda ls: 0.0),
    "dT_x1.05": _set(text_features=lambda t: _ScaleGrad.apply(t, 1.05)),
    "dX_x1.05": _set(image_features=lambda x: _ScaleGrad.apply(x, 1.05)),
}


def _mutated(original, mutate):
    signature = inspect.signature(original)

    def head(*args, **kwargs):
        kw = signature.bind(*args, **kwargs).arguments
        mutate(kw)
        return original(**kw)
    return head


def _half_accumulating(backend, monkeypatch):
    module = backend_module(backend)
    if backend == "torch":  # no float32 upcast: every intermediate in the inputs' dtype
        monkeypatch.setattr(module, "_compute_dtype", lambda x: x.dtype)
        return
    from demul_fast.kernels import cosine_ce, text_head  # noqa: PLC0415

    for kernels in (cosine_ce, text_head):
        monkeypatch.setattr(kernels, "_dot", _bf16_dot)


if triton is not None:
    @triton.jit
    def _bf16_dot(a, b, acc, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
        """The kernels' _dot with bfloat16 operands and a bfloat16 result: each tile's
        partial product rounded to bfloat16 before it is accumulated."""
        a16, b16 = a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32)
        return acc + tl.dot(a16, b16, input_precision="ieee").to(tl.bfloat16).to(tl.float32)


def _inputs(gen, backend, shape):
    dims = dict((INTERPRETER_SHAPES if backend == "triton" else SHAPES)[shape])
    scale = dims.pop("scale")
    dtype = torch.float32 if backend == "triton" else torch.bfloat16  # see the module docstring
    inputs = make_head_inputs(gen, dtype=dtype, **dims)
    inputs["scale"] = scale
    return inputs


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_correct_head_passes(gen, backend, shape):
    """The control: the unmutated backend meets the rule on the inputs the mutations get."""
    assert_head_matches_reference(_inputs(gen, backend, shape), backend, **OPTS)


@pytest.mark.parametrize("mutation", list(MUTATIONS) + ["half_accumulation"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_rule_catches_a_wrong_head(gen, backend, shape, mutation, monkeypatch):
    module = backend_module(backend)
    if mutation == "half_accumulation":
        _half_accumulating(backend, monkeypatch)
    else:
        monkeypatch.setattr(module, "demul_head", _mutated(module.demul_head, MUTATIONS[mutation]))
    with pytest.raises(AssertionError, match="exceeds the rule"):
        assert_head_matches_reference(_inputs(gen, backend, shape), backend, **OPTS)

"""Numerical edge cases of the head, on every backend available for the device.

Each case runs the whole head (loss parts, logits, gradients w.r.t. T, A, X) on the backend
and checks it against the float64 reference with the package's error rule
(tests/numerics.py), so a case passes only if the backend is right, not merely finite.
Without a GPU: torch on CPU, and triton under the interpreter (tiny shapes); the CUDA
variants are marked ``gpu``.
"""

import pytest
import torch

import demul_fast as df
from demul_fast.ops import backends
from backend_cases import (assert_head_matches_reference, backend_params, make_head_inputs, run_head,
                           strided_view)
from numerics import assert_error_rule, head_magnitudes

F32 = backend_params((torch.float32,))
LOW = backend_params((torch.bfloat16, torch.float16))


def _inputs(gen, device, dtype, **dims):
    return make_head_inputs(gen, dtype=dtype, device=device, **dims)


# ---- degenerate shapes ---------------------------------------------------------------

SHAPES = {
    "C1": dict(C=1),
    "M1": dict(M=1),
    "B1": dict(B=1),
    "C1-M1-B1": dict(C=1, M=1, B=1),
    "D1-K1": dict(D=1, K=1),
}


@pytest.mark.parametrize("dims", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("backend,device,dtype", F32)
def test_degenerate_shapes(gen, backend, device, dtype, dims):
    inputs = _inputs(gen, device, dtype, **dims)
    assert_head_matches_reference(inputs, backend, label_smoothing=0.1, return_logits=True)


@pytest.mark.parametrize("backend,device,dtype", F32 + LOW)
def test_degenerate_shapes_low_precision(gen, backend, device, dtype):
    inputs = _inputs(gen, device, dtype, C=1, M=1, B=1)
    assert_head_matches_reference(inputs, backend, label_smoothing=0.1)


# ---- zero features: the eps floor, no NaN ----------------------------------------------

def _zero_prompt(inp):
    inp["text_features"][1, 0] = 0  # one prompt of class 1: t^ = 0, n = eps


def _zero_class(inp):
    inp["text_features"][2] = 0  # every prompt of class 2: u = 0, u^ = 0 and, without b, z = 0
    inp["phi_bias"] = None


def _zero_image(inp):
    inp["image_features"][0] = 0  # x^ = 0: that row's logits are all 0


def _zero_llm_row(inp):
    inp["llm_embeddings"][3] = 0  # e^ = 0: cos = 0 for that class


ZEROS = {"prompt": _zero_prompt, "class": _zero_class, "image": _zero_image, "llm": _zero_llm_row}


@pytest.mark.parametrize("case", list(ZEROS.values()), ids=list(ZEROS))
@pytest.mark.parametrize("backend,device,dtype", F32)
def test_zero_features_use_the_eps_floor(gen, backend, device, dtype, case):
    inputs = _inputs(gen, device, dtype)
    case(inputs)
    out = assert_head_matches_reference(inputs, backend, label_smoothing=0.1, return_logits=True)
    assert torch.isfinite(out.loss)


# ---- saturation and extremes ---------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype", F32 + LOW)
def test_extreme_prompt_logits(gen, backend, device, dtype):
    """|A| = 80: exp(80) overflows float16 and nearly float32's exp sum; softmax saturates."""
    inputs = _inputs(gen, device, dtype)
    sign = torch.randn(inputs["prompt_logits"].shape, generator=gen).sign().to(device)
    inputs["prompt_logits"] = (80 * sign).to(dtype)
    inputs["prompt_logits"][0] = 80  # a row where every logit is +80
    inputs["prompt_logits"][1] = -80  # and one where every logit is -80
    assert_head_matches_reference(inputs, backend)


@pytest.mark.parametrize("backend,device,dtype", F32 + LOW)
def test_large_scale_with_label_smoothing(gen, backend, device, dtype):
    """scale 1000: logits up to +-1000, the log-sum-exp must subtract the row max."""
    inputs = _inputs(gen, device, dtype)
    inputs["scale"] = 1000.0
    assert_head_matches_reference(inputs, backend, label_smoothing=0.1, return_logits=True)


@pytest.mark.parametrize("backend,device,dtype", F32)
def test_tensor_scale(gen, backend, device, dtype):
    inputs = _inputs(gen, device, dtype)
    inputs["scale"] = torch.tensor(4.6, device=device).exp()  # logit_scale.exp() as CLIP gives it
    assert_head_matches_reference(inputs, backend, label_smoothing=0.2)


SCALARS = [("label_smoothing", 1e-300), ("label_smoothing", 1e-42), ("alpha", 1e-300), ("alpha", 1e-42),
           ("alpha", 1e4), ("scale", 1e-300), ("scale", 1e-42)]


@pytest.mark.parametrize("name,value", SCALARS, ids=[f"{n}={v:g}" for n, v in SCALARS])
@pytest.mark.parametrize("backend,device,dtype", F32)
def test_tiny_and_huge_scalar_options(gen, backend, device, dtype, name, value):
    """Python floats beyond float32's range or in its subnormals (1e-300 rounds to 0 in float32,
    1e-42 is subnormal) are legal options; a backend must not choke on them (e.g. Triton types
    a Python float argument it cannot represent in float32 as float64)."""
    inputs = _inputs(gen, device, dtype)
    opts = dict(label_smoothing=0.1, alpha=1.0)
    if name == "scale":
        inputs["scale"] = value
    else:
        opts[name] = value
    assert_head_matches_reference(inputs, backend, return_logits=True, **opts)


@pytest.mark.parametrize("backend,device,dtype", F32)
def test_numpy_scalar_options(gen, backend, device, dtype):
    """numpy scalars (what a config loaded with numpy gives) are accepted for scale, alpha and
    label_smoothing, like Python floats."""
    import numpy as np  # noqa: PLC0415 - a dependency of the package

    inputs = _inputs(gen, device, dtype)
    inputs["scale"] = np.float32(30.0)
    assert_head_matches_reference(inputs, backend, alpha=np.float32(0.5), label_smoothing=np.float64(0.1))


# ---- labels --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype", F32)
def test_labels_at_both_ends(gen, backend, device, dtype):
    inputs = _inputs(gen, device, dtype, C=7, B=4)
    inputs["labels"] = torch.tensor([0, 6, 6, 0], device=device)
    assert_head_matches_reference(inputs, backend, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device,dtype", F32)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_all_labels_the_same_class(gen, backend, device, dtype, label_dtype):
    inputs = _inputs(gen, device, dtype, C=6, B=5)
    inputs["labels"] = torch.full((5,), 4, dtype=label_dtype, device=device)
    assert_head_matches_reference(inputs, backend, label_smoothing=0.1)


# ---- memory layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype", F32 + LOW)
def test_non_contiguous_views(gen, backend, device, dtype):
    inputs = _inputs(gen, device, dtype, C=5, M=3, D=9, B=4, K=6)
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor):
            view = strided_view(name, t)
            assert not view.is_contiguous() and torch.equal(view, t), name
    assert_head_matches_reference(inputs, backend, view=strided_view, label_smoothing=0.1, return_logits=True)


def _broadcast(name, t):
    """Stride-0 views: uniform prompt logits as ``zeros(M).expand(C, M)`` (the fixed-weight
    ablation), one image feature repeated over the batch, one bias repeated over K."""
    if name == "prompt_logits":
        return t[:1].expand_as(t)
    if name == "image_features":
        return t[:1].expand_as(t)
    if name == "phi_bias":
        return t[:1].expand_as(t)
    return t


@pytest.mark.parametrize("backend,device,dtype", F32)
def test_broadcast_views_with_zero_strides(gen, backend, device, dtype):
    inputs = _inputs(gen, device, dtype)
    assert _broadcast("prompt_logits", inputs["prompt_logits"]).stride(0) == 0
    assert_head_matches_reference(inputs, backend, view=_broadcast, label_smoothing=0.1, return_logits=True)


@pytest.mark.parametrize("backend", ["torch"])
def test_meta_tensors_give_shapes_without_values(gen, backend):
    """Meta tensors have no values: the validator skips its value checks and the torch backend
    infers the output shapes (useful for tracing and memory planning)."""
    inputs = make_head_inputs(gen, C=5, B=4, device="meta")
    inputs["scale"] = torch.tensor(30.0, device="meta")
    out = df.demul_head(**inputs, backend=backend, return_logits=True)
    assert out.loss.shape == () and out.logits.shape == (4, 5) and out.loss.device.type == "meta"


# ---- float16 range ------------------------------------------------------------------------------

# the Triton kernels in float16 on the interpreter too (their dots round the operands as a GPU's)
F16_INTERPRETED = [pytest.param("triton", "cpu", torch.float16, id="triton-cpu-f16")] \
    if backends.why_not("triton", torch.device("cpu"), torch.float32) is None else []


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float16,)) + F16_INTERPRETED)
def test_float16_products_overflow_without_float32_accumulation(gen, backend, device, dtype):
    """Feature norms beyond float16's range (65504): a float16 accumulator overflows to inf;
    accumulating in float32 gives the right, finite answer. The yardstick is the float64
    reference itself (the rule allows the one rounding of each stored result and its floor);
    for the kernel backends, whose tensor-core operands are rounded to float16 by design,
    the yardstick that rounds the same operands (tests/rounded_yardstick.py)."""
    inputs = _inputs(gen, device, dtype, C=4, M=2, D=16, B=3, K=16)
    big = {"text_features": 6e4, "image_features": 6e4, "llm_embeddings": 6e4, "phi_weight": 2e3}
    for name, factor in big.items():
        inputs[name] = (inputs[name].float() * factor / inputs[name].float().abs().amax()).to(dtype)
        inputs[name].view(-1)[0] = factor  # at least one element at the full magnitude
    t = inputs["text_features"]
    assert not torch.isfinite((t * t).sum(-1)).all()  # the premise: float16 sums of squares overflow
    assert not torch.isfinite(torch.linalg.vector_norm(t.float(), dim=-1).to(dtype)).all()  # and norms
    if backend in ("triton", "cuda"):
        assert_head_matches_reference(inputs, backend, label_smoothing=0.1, return_logits=True)
        return
    fast, fast_g = run_head(inputs, backend, label_smoothing=0.1, return_logits=True)
    ref, ref_g = run_head(inputs, None, reference=True, cast=torch.float64, label_smoothing=0.1,
                          return_logits=True)
    mags = head_magnitudes(inputs, label_smoothing=0.1)
    for part in ("loss", "ce_loss", "distill_loss", "logits"):
        r = getattr(ref, part)
        assert_error_rule(f"{backend}:{part}", getattr(fast, part), r, r, k=2.0, dtype=dtype, magnitude=mags[part])
    for k, g in fast_g.items():
        assert_error_rule(f"{backend}:d{k}", g, ref_g[k], ref_g[k], k=3.0, dtype=dtype, magnitude=mags[k])


# ---- NaN / inf propagate, never masked ----------------------------------------------------------

POISON = [
    ("text_features", float("nan")), ("text_features", float("inf")),
    ("prompt_logits", float("nan")), ("prompt_logits", float("inf")), ("prompt_logits", float("-inf")),
    ("image_features", float("nan")), ("image_features", float("-inf")),
    ("llm_embeddings", float("nan")), ("llm_embeddings", float("inf")),
    ("phi_weight", float("nan")), ("phi_bias", float("nan")),
]


@pytest.mark.parametrize("name,value", POISON, ids=[f"{n}={v}" for n, v in POISON])
@pytest.mark.parametrize("backend,device,dtype", F32)
def test_non_finite_input_propagates_like_the_reference(gen, backend, device, dtype, name, value):
    """A NaN or inf in an input makes exactly the loss parts non-finite that the reference
    makes non-finite; a NaN always reaches the total loss. (-inf in a prompt logit is a legal
    zero weight: the reference stays finite, and so must the backend.)"""
    inputs = _inputs(gen, device, dtype)
    inputs[name].view(-1)[1] = value
    with torch.no_grad():
        out = df.demul_head(**inputs, backend=backend, label_smoothing=0.1, return_logits=True)
        ref = df.reference.demul_head(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                         else v for k, v in inputs.items()}, label_smoothing=0.1,
                                      return_logits=True)
    for part in ("loss", "ce_loss", "distill_loss"):
        fast_finite, ref_finite = bool(torch.isfinite(getattr(out, part))), bool(torch.isfinite(getattr(ref, part)))
        assert fast_finite == ref_finite, f"{part}: finite={fast_finite}, reference finite={ref_finite}"
    assert torch.equal(torch.isfinite(out.logits), torch.isfinite(ref.logits))
    if value != value:  # NaN
        assert torch.isnan(out.loss), "a NaN input was masked out of the loss"

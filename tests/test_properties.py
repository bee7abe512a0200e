"""Property tests (hypothesis).

1. Agreement: over random shapes, dtypes, label smoothing, alpha, with or without
   distillation and phi_bias, contiguous or strided inputs, every available backend
   matches the float64 reference within the package's error rule (tests/numerics.py): loss
   parts, logits and gradients.
2. Refusal: every malformed call (wrong rank, mismatched C/M/D/K/B, wrong dtype, labels out
   of range, mixed devices, empty, non-tensor, wrong layout) of each public function raises a
   ValueError or TypeError naming the bad argument, whatever backend is asked for, and no
   backend function is ever called.

The shapes cross the kernels' tiles: sizes are drawn either small or just around a tile
edge (the triton kernels' tiles as their launchers choose them: ``text_head.text_config``,
whole classes in 64+-row programs, D in 64-column chunks, and ``cosine_ce.ce_config``,
64-image tiles and 16-64-class tiles; the CUDA kernels' tiles are 64 wide and step 16
along D). Most examples distil (alpha > 0), and the half
dtypes are drawn on every backend that takes them (the triton interpreter included).
``test_the_strategy_crosses_tiles`` checks those proportions, so a change to the strategy
cannot quietly stop crossing tiles.

Example counts come from the hypothesis profile (tests/conftest.py): ``ci`` (the default,
derandomized unless DEMUL_FAST_TEST_SEED is set) or ``slow`` (hundreds of examples):
``pytest tests/test_properties.py --hypothesis-profile slow``.
"""

from contextlib import ExitStack, contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import demul_fast as df
from backend_cases import (DTYPE_IDS, HAS_GPU, KERNEL_DTYPES, assert_head_matches_reference,
                           assert_parts_match_reference, available_backends, backend_module, make_head_inputs,
                           strided_view)
from demul_fast.ops import backends
from demul_fast.kernels import cosine_ce, text_head
from rounded_yardstick import TooManyBoundaryElements

EXAMPLES = settings.default.max_examples  # of the loaded profile


# ---- 1. agreement with the reference --------------------------------------------------------

def _agreement_params():
    """(backend, device, dtypes it is tested in): on CPU the torch backend in every dtype and
    triton (interpreter) in the kernel dtypes; on a GPU every backend in the kernel dtypes."""
    params = []
    for name in available_backends("cpu"):
        dtypes = KERNEL_DTYPES if name != "torch" else KERNEL_DTYPES + (torch.float64,)
        params.append(pytest.param(name, "cpu", dtypes, id=f"{name}-cpu"))
    for name in backends.BACKENDS:
        marks = [pytest.mark.gpu]
        if HAS_GPU and backends.why_not(name, torch.device("cuda")) is not None:
            marks.append(pytest.mark.skip(reason=f"{name}: {backends.why_not(name, torch.device('cuda'))}"))
        params.append(pytest.param(name, "cuda", KERNEL_DTYPES, id=f"{name}-cuda", marks=marks))
    return params


@st.composite
def _size(draw, small, edges):
    """A size just around a tile edge (about half the time), or a small one. (Hypothesis
    leans towards its first and simplest choices, hence the explicit proportions.)"""
    if draw(st.sampled_from((True, False))):
        return draw(st.sampled_from(edges))
    return draw(st.integers(1, small))


@st.composite
def head_cases(draw, dtypes, big=False):
    edges = (63, 64, 65, 129, 257, 1000) if big else (33, 65, 66, 97)
    dims = dict(C=draw(_size(12, edges)), M=draw(_size(5, (8, 9, 17))),
                D=draw(_size(40, (63, 64, 65, 129, 513) if big else (63, 64, 65, 129))),
                B=draw(_size(8, edges)), K=draw(_size(24, edges)))
    distill = draw(st.sampled_from((True,) * 6 + (False,)))  # six in seven distil
    return dict(
        dims=dims,
        dtype=draw(st.sampled_from(dtypes)),
        distill=distill,
        bias=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([1.0, 30.0, 100.0])),
        opts=dict(
            # values below 1e-6 (float32 subnormals, or beyond float32's range) are edge cases of
            # their own: tests/test_edge_cases.py::test_tiny_and_huge_scalar_options
            label_smoothing=draw(st.sampled_from([0.0, 0.1]) | st.floats(1e-6, 1.0)),
            alpha=draw(st.sampled_from((1.0, 0.5, 2.0, 0.0)) | st.floats(1e-3, 4.0)),
            return_logits=draw(st.booleans()),
        ),
    )


def crosses_a_tile(dims) -> bool:
    """Whether a head of these sizes spans more than one tile of some kernel: triton's
    cross-entropy tiles (B or C) or K tiles, or the CUDA kernels' 64-wide tiles."""
    C, M, D, B, K = (dims[k] for k in ("C", "M", "D", "B", "K"))
    if max(B, C, K) > 64:  # the CUDA kernels' 64-wide tiles
        return True
    try:
        text, ce = text_head.text_config(C, M, D, min(K, D)), cosine_ce.ce_config(B, C, D)
    except ValueError:  # beyond the triton kernels' limits: no tile of theirs to cross
        return False
    return (text["tiles"] > 1 or text["splits"] > 1 or D > text["BLOCK_K"] or ce["b_tiles"] > 1
            or C > ce["BLOCK_C"] or ce["splits"] > 1)


def test_the_strategy_crosses_tiles():
    """What the CPU strategy draws, over 200 examples: most cross a tile, most distil with
    alpha > 0, and every kernel dtype comes up."""
    cases = []

    @settings(max_examples=200, database=None)
    @given(head_cases(KERNEL_DTYPES))
    def collect(case):
        cases.append(case)

    collect()
    n = len(cases)
    crossing = sum(crosses_a_tile(c["dims"]) for c in cases) / n
    distilling = sum(c["distill"] and c["opts"]["alpha"] > 0 for c in cases) / n
    dtypes = {c["dtype"] for c in cases}
    print(f"{n} examples: {crossing:.0%} cross a tile, {distilling:.0%} distil with alpha > 0, dtypes {dtypes}")
    assert crossing >= 0.5 and distilling >= 0.6 and dtypes == set(KERNEL_DTYPES)


@contextmanager
def _bounded_yardstick():
    """A draw whose half-precision inputs put more operand elements on a rounding boundary than
    the rounded yardstick's cap (its boundary allowance reruns the op once per element; e.g.
    C=97, M=17, D=129, K=97 in float16: 78,000 for the distillation alone) is rejected as an
    invalid example (hypothesis counts those, and fails its health check if they are common),
    not judged with a weaker rule."""
    try:
        yield
    except TooManyBoundaryElements as e:
        print(f"rejected: {e}")
        reject()


@pytest.mark.parametrize("backend,device,dtypes", _agreement_params())
@given(data=st.data())
def test_every_backend_agrees_with_the_reference(backend, device, dtypes, data):
    case = data.draw(head_cases(dtypes, big=device == "cuda"))
    gen = torch.Generator().manual_seed(case["seed"])
    inputs = make_head_inputs(gen, dtype=case["dtype"], device=device, bias=case["bias"], distill=case["distill"],
                              **case["dims"])
    inputs["scale"] = case["scale"]
    print(f"{backend} {DTYPE_IDS[case['dtype']]} {case['dims']} distill={case['distill']} bias={case['bias']} "
          f"strided={case['strided']} {case['opts']}")
    with _bounded_yardstick():
        assert_head_matches_reference(inputs, backend, view=strided_view if case["strided"] else None,
                                      **case["opts"])


@pytest.mark.parametrize("backend,device,dtypes", _agreement_params())
@settings(max_examples=max(EXAMPLES // 2, 5))
@given(data=st.data())
def test_every_backend_agrees_with_the_reference_part_by_part(backend, device, dtypes, data):
    """aggregate_prompts, cosine_cross_entropy and prompt_distill_loss on their own (they are
    separate ops from the fused head), forward and gradients (backend_cases.assert_parts_match_reference:
    a kernel backend in half precision against the yardstick that rounds what its kernels round)."""
    case = data.draw(head_cases(dtypes, big=device == "cuda"))
    gen = torch.Generator().manual_seed(case["seed"])
    inputs = make_head_inputs(gen, dtype=case["dtype"], device=device, bias=case["bias"], **case["dims"])
    print(f"{backend} {DTYPE_IDS[case['dtype']]} {case['dims']} bias={case['bias']} {case['opts']}")
    with _bounded_yardstick():
        assert_parts_match_reference(inputs, gen, backend, case["opts"]["label_smoothing"])


# ---- 2. malformed input is refused before any backend runs -----------------------------------

# each public function: its tensor arguments with their symbolic shapes ("i" marks labels)
SIGNATURES = {
    "demul_head": dict(text_features="CMD", prompt_logits="CM", image_features="BD", labels="B",
                       llm_embeddings="CK", phi_weight="KD", phi_bias="K"),
    "aggregate_prompts": dict(text_features="CMD", prompt_logits="CM"),
    "cosine_cross_entropy": dict(image_features="BD", class_features="CD", labels="B"),
    "prompt_distill_loss": dict(text_features="CMD", phi_weight="KD", phi_bias="K", llm_embeddings="CK"),
}
SCALARS = {"demul_head": dict(scale=30.0, alpha=1.0, label_smoothing=0.1),
           "cosine_cross_entropy": dict(scale=30.0, label_smoothing=0.1)}


def _good_call(fn, dims, seed):
    gen = torch.Generator().manual_seed(seed)
    kwargs = {}
    for arg, shape in SIGNATURES[fn].items():
        if arg == "labels":
            kwargs[arg] = torch.randint(0, dims["C"], (dims["B"],), generator=gen)
        else:
            kwargs[arg] = torch.randn(*(dims[s] for s in shape), generator=gen)
    kwargs.update(SCALARS.get(fn, {}))
    return kwargs


def _shared_symbols(fn):
    """Symbols that appear in two or more arguments: changing one side is a mismatch."""
    count = {}
    for shape in SIGNATURES[fn].values():
        for s in set(shape):
            count[s] = count.get(s, 0) + 1
    return {s for s, n in count.items() if n > 1}


def _kinds(fn):
    kinds = ["rank", "dtype", "device", "empty", "not_tensor", "layout", "mismatch"]
    if "labels" in SIGNATURES[fn]:
        kinds.append("label_range")
    if fn in SCALARS:
        kinds.append("scalar")
    return kinds


MALFORMED = [(fn, kind) for fn in sorted(SIGNATURES) for kind in _kinds(fn)]


@st.composite
def malformed_calls(draw, fn, kind):
    """(kwargs, the argument the error must name) for a call of ``fn`` broken in a ``kind`` way."""
    dims = {s: draw(st.integers(1, 6)) for s in "CMDBK"}
    kwargs = _good_call(fn, dims, draw(st.integers(0, 2**16)))
    arg = draw(st.sampled_from(sorted(SIGNATURES[fn])))
    t = kwargs.get(arg)
    if kind == "rank":
        kwargs[arg] = t.unsqueeze(-1) if draw(st.booleans()) or t.dim() == 0 else t[..., 0]
    elif kind == "dtype":
        if arg == "labels":
            bad = draw(st.sampled_from([torch.float32, torch.bool, torch.float64]))
        else:
            bad = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]))
        kwargs[arg] = t.to(bad)
    elif kind == "device":
        kwargs[arg] = t.to("meta")
    elif kind == "empty":
        axis = draw(st.integers(0, t.dim() - 1))
        kwargs[arg] = t.narrow(axis, 0, 0)
    elif kind == "not_tensor":
        kwargs[arg] = draw(st.sampled_from([t.tolist(), t.numpy(), 1.0]))
    elif kind == "layout":
        kwargs[arg] = t.to_sparse()
    elif kind == "mismatch":
        shape = SIGNATURES[fn][arg]
        axes = [i for i, s in enumerate(shape) if s in _shared_symbols(fn)]
        if not axes:  # this argument has no shared axis: pick one that has
            arg = draw(st.sampled_from(sorted(a for a, sh in SIGNATURES[fn].items()
                                              if set(sh) & _shared_symbols(fn))))
            shape, t = SIGNATURES[fn][arg], kwargs[arg]
            axes = [i for i, s in enumerate(shape) if s in _shared_symbols(fn)]
        axis = draw(st.sampled_from(axes))
        new = list(t.shape)
        new[axis] += draw(st.integers(1, 3))
        kwargs[arg] = (torch.zeros(new, dtype=t.dtype) if arg == "labels" else torch.randn(new))
    elif kind == "label_range":
        arg = "labels"
        y = kwargs["labels"].clone()
        y[draw(st.integers(0, y.numel() - 1))] = draw(st.sampled_from([-1, -100, dims["C"], dims["C"] + 7]))
        kwargs["labels"] = y
    elif kind == "scalar":
        arg, bad = draw(st.sampled_from(
            [("scale", float("nan")), ("scale", float("inf")), ("scale", torch.tensor(float("nan"))),
             ("scale", "30"), ("scale", torch.ones(3)), ("scale", torch.tensor(30.0, device="meta")),
             ("label_smoothing", -0.5), ("label_smoothing", 1.5), ("label_smoothing", float("nan"))]
            + ([("alpha", float("inf")), ("alpha", "1")] if fn == "demul_head" else [])))
        kwargs[arg] = bad
    return kwargs, arg


class KernelReached(AssertionError):
    pass


def _forbid_backends():
    """Replace the four functions of every importable backend module, and its capability
    question (asked only after validation), with a stub that fails."""
    stack = ExitStack()
    for name in backends.BACKENDS:
        if backends._load(name)[0] is None:
            continue
        module = backend_module(name)
        for fn in ("capability", "aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head"):
            def stub(*args, _where=f"{name}.{fn}", **kwargs):
                raise KernelReached(f"malformed input reached {_where}")
            stack.enter_context(mock.patch.object(module, fn, stub))
    return stack


@pytest.mark.parametrize("fn,kind", MALFORMED, ids=[f"{f}-{k}" for f, k in MALFORMED])
@settings(max_examples=max(EXAMPLES // 2, 5))
@given(data=st.data())
def test_malformed_input_is_refused_before_any_backend(fn, kind, data):
    kwargs, arg = data.draw(malformed_calls(fn, kind))
    backend = data.draw(st.sampled_from([None] + available_backends("cpu")))
    with _forbid_backends():
        with pytest.raises((ValueError, TypeError)) as info:
            getattr(df, fn)(**kwargs, backend=backend)
    assert arg in str(info.value), f"{fn}: the error does not name {arg}: {info.value}"


def test_forbidding_backends_is_effective():
    """The stubs above do intercept a well-formed call (so the refusal test can fail)."""
    kwargs = _good_call("demul_head", dict(C=3, M=2, D=4, B=2, K=5), 0)
    with _forbid_backends(), pytest.raises(KernelReached):
        df.demul_head(**kwargs)
    assert torch.isfinite(df.demul_head(**kwargs).loss)

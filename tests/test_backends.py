"""The backend layer: explicit requests, the env override, the report, and the torch
backend's float32 accumulation."""

import pytest
import torch

import demul_fast as df
from demul_fast.ops import backends
from numerics import assert_error_rule


def _head_inputs(gen, dtype=torch.float32, C=5, M=3, D=8, B=4, K=6):
    return (torch.randn(C, M, D, generator=gen).to(dtype), torch.randn(C, M, generator=gen).to(dtype),
            torch.randn(B, D, generator=gen).to(dtype), torch.randint(0, C, (B,), generator=gen), 30.0,
            torch.randn(C, K, generator=gen).to(dtype), torch.randn(K, D, generator=gen).to(dtype),
            torch.randn(K, generator=gen).to(dtype))


def test_torch_backend_always_available_and_default_on_cpu():
    info = backends.report(torch.device("cpu"))
    assert info["torch"]["available"]
    assert backends.select(None, torch.device("cpu"), torch.float32).name == "torch"


def test_describe_lists_every_backend():
    text = backends.describe(torch.device("cpu"))
    for name in backends.BACKENDS:
        assert name in text
    assert "default:" in text


def test_explicit_unavailable_backend_raises_with_reason(gen, monkeypatch):
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _head_inputs(gen)
    # cuda never runs CPU tensors; triton needs CUDA tensors without the interpreter
    for name in ("cuda", "triton"):
        with pytest.raises(backends.BackendUnavailable, match=name):
            df.demul_head(*args, backend=name)


def test_float64_refused_by_kernel_backends(gen):
    reason = backends.why_not("triton", torch.device("cuda"), torch.float64)
    assert reason is not None and "float64" in reason or "not part of this build" in reason


def test_unknown_backend_name_raises(gen):
    with pytest.raises(ValueError, match="backend"):
        df.demul_head(*_head_inputs(gen), backend="numpy")


def test_env_override(gen, monkeypatch):
    args = _head_inputs(gen)
    monkeypatch.setenv("DEMUL_FAST_BACKEND", "torch")
    assert backends.select(None, torch.device("cpu"), torch.float32)[0] == "torch"
    df.demul_head(*args)
    monkeypatch.setenv("DEMUL_FAST_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match="DEMUL_FAST_BACKEND"):
        df.demul_head(*args)
    assert "DEMUL_FAST_BACKEND" in backends.describe(torch.device("cpu"))
    monkeypatch.setenv("DEMUL_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DEMUL_FAST_BACKEND"):
        df.demul_head(*args)
    # an explicit argument wins over the environment
    df.demul_head(*args, backend="torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_accumulates_in_float32(gen, dtype):
    T, A, X, y, tau, E, W, b = _head_inputs(gen, dtype, C=37, M=3, D=100, B=5, K=70)
    leaves = [t.clone().requires_grad_() for t in (T, A, X)]
    out = df.demul_head(*leaves, y, tau, E, W, b, alpha=1.0, label_smoothing=0.1, return_logits=True,
                        backend="torch")
    assert out.loss.dtype == torch.float32 and out.logits.dtype == dtype
    out.loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in (T, A, X)]
    ref = df.reference.demul_head(*ref_leaves, y, tau, E.double(), W.double(), b.double(), 1.0, 0.1, True)
    ref.loss.backward()
    # the yardstick: the reference on the same rounded inputs, accumulated in float32
    plain_leaves = [t.float().requires_grad_() for t in (T, A, X)]
    plain = df.reference.demul_head(*plain_leaves, y, tau, E.float(), W.float(), b.float(), 1.0, 0.1, True)
    plain.loss.backward()
    assert_error_rule("loss", out.loss, ref.loss, plain.loss, dtype=dtype)
    assert_error_rule("logits", out.logits, ref.logits, plain.logits, dtype=dtype)
    for name, a, r, p in zip(("dT", "dA", "dX"), leaves, ref_leaves, plain_leaves):
        assert a.grad.dtype == dtype
        assert_error_rule(name, a.grad, r.grad, p.grad, k=3.0, dtype=dtype)


def test_backend_capability_refuses_a_call(gen, monkeypatch):
    """A backend's ``capability`` answer: an explicit request raises with its reason, the
    automatic choice falls back to the next backend."""
    import types

    from demul_fast.ops.capability import Capability

    def capability(call):
        t = call.arg("text_features")
        return Capability("D too large for the fake kernels" if t is not None and t.shape[2] > 4 else None)

    monkeypatch.setitem(backends._loaded, "cuda", (types.SimpleNamespace(capability=capability), None))
    monkeypatch.setattr(backends, "default_order", lambda device: ("cuda", "torch"))
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    big = ("demul_head", dict(text_features=torch.zeros(2, 3, 8)))
    small = ("demul_head", dict(text_features=torch.zeros(2, 3, 4)))
    assert backends.select(None, torch.device("cpu"), torch.float32, big).name == "torch"
    assert backends.select(None, torch.device("cpu"), torch.float32, small).name == "cuda"
    with pytest.raises(backends.BackendUnavailable, match="D too large"):
        backends.select("cuda", torch.device("cpu"), torch.float32, big)


def test_triton_refuses_frozen_inputs_that_require_grad(gen):
    module = backends._load("triton")[0]
    if module is None:
        pytest.skip(f"triton backend not importable: {backends._load('triton')[1]}")
    from demul_fast.ops.capability import Call

    T, W, E = torch.randn(5, 3, 8), torch.randn(6, 8, requires_grad=True), torch.randn(5, 6)

    def ask(weight):
        args = dict(text_features=T, phi_weight=weight, llm_embeddings=E)
        return module.capability(Call(torch.device("cuda"), torch.float32, "prompt_distill_loss", args)).reason

    assert "frozen" in ask(W)
    assert ask(W.detach()) is None

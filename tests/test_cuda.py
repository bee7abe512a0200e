"""The "cuda" backend on a machine without a GPU: the extension was built and imports
(a compile error fails here), its entry points refuse CPU tensors with an error naming the
argument, the backend layer reports that "cuda" needs CUDA tensors, and the custom ops'
fake implementations and autograd wiring give the right shapes and dtypes (under
FakeTensorMode: nothing runs on a device). The numerics are in test_cuda_gpu.py."""

import inspect
import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import demul_fast as df
from demul_fast.ops import backends
from demul_fast.ops.distill_basis import DistillBasis


def _toolchain():
    """Why the extension should have been built here, or None if it need not have been."""
    if not torch.version.cuda:
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return f"torch {torch.__version__} (CUDA {torch.version.cuda}) and nvcc in {home}"
    nvcc = shutil.which("nvcc")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) and {nvcc}" if nvcc else None


HAVE_TOOLCHAIN = _toolchain()
try:
    from demul_fast import _C
except ImportError as exc:
    _C, C_ERROR = None, exc
needs_ext = pytest.mark.skipif(_C is None, reason="demul_fast._C is not built here")


@pytest.mark.skipif(HAVE_TOOLCHAIN is None, reason="no CUDA build of torch or no nvcc: the extension is not built")
def test_extension_built_and_importable():
    assert _C is not None, (f"{HAVE_TOOLCHAIN} are present but demul_fast._C does not import ({C_ERROR}); "
                            "build it with DEMUL_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    assert _C.compiled_with().startswith("CUDA ")
    from demul_fast.ops import cuda_ops
    assert getattr(cuda_ops, "UNAVAILABLE_REASON", None) is None


# The backend API of demul_fast.ops.functional for modules with DISTILL_BASIS (the K-free
# distillation of SPEC 4.3 takes a DistillBasis instead of phi and E).
API = {
    "aggregate_prompts": ["text_features", "prompt_logits"],
    "cosine_cross_entropy": ["image_features", "class_features", "labels", "scale", "label_smoothing"],
    "prompt_distill_loss": ["text_features", "basis"],
    "demul_head": ["text_features", "prompt_logits", "image_features", "labels", "scale", "basis", "alpha",
                   "label_smoothing", "return_logits"],
}


@needs_ext
def test_backend_functions_have_the_basis_api_signatures():
    from demul_fast.ops import cuda_ops
    assert cuda_ops.DISTILL_BASIS is True
    for name, params in API.items():
        assert list(inspect.signature(getattr(cuda_ops, name)).parameters) == params, name


@needs_ext
def test_ops_are_registered_custom_ops_named_after_the_public_functions():
    from demul_fast.ops import cuda_ops
    names = {op._qualname for op in cuda_ops.OPS}
    assert names == {f"demul_fast::cuda_{fn}{suffix}" for fn in API for suffix in ("", "_backward")}
    for name in names:
        torch._C._dispatch_find_schema_or_throw(name, "")


def _cpu_inputs(C=5, M=3, D=8, B=4, K=6):
    f = torch.float32
    r = min(K, D)
    z = dict(t=torch.randn(C, M, D), a=torch.randn(C, M), x=torch.randn(B, D), u=torch.randn(C, D),
             y=torch.randint(0, C, (B,)), s=torch.tensor(30.0), wc=torch.rand(C, M), nc=torch.rand(C, M),
             rc=torch.rand(C), vb=torch.rand(B), vr=torch.rand(C * M), g=torch.ones((), dtype=f),
             basis=(torch.randn(r, D), torch.randn(r), torch.randn(C, r), torch.randn(C), torch.rand(())))
    return z


@needs_ext
def test_direct_calls_on_cpu_tensors_raise_naming_the_argument():
    z = _cpu_inputs()
    calls = {
        "aggregate_prompts_forward": lambda: _C.aggregate_prompts_forward(z["t"], z["a"]),
        "aggregate_prompts_backward": lambda: _C.aggregate_prompts_backward(z["u"], z["t"], z["nc"], z["wc"], z["rc"], z["u"]),
        "cosine_cross_entropy_forward": lambda: _C.cosine_cross_entropy_forward(z["x"], z["u"], z["y"], z["s"], 0.0),
        "cosine_cross_entropy_backward": lambda: _C.cosine_cross_entropy_backward(z["g"], z["x"], z["u"], z["y"], z["s"], 0.0,
                                                                    z["vb"], z["vb"], True, True, True),
        "prompt_distill_loss_forward": lambda: _C.prompt_distill_loss_forward(z["t"], *z["basis"]),
        "prompt_distill_loss_backward": lambda: _C.prompt_distill_loss_backward(None, z["t"], *z["basis"], z["vr"], z["vr"], z["vr"], z["u"]),
        "demul_head_forward": lambda: _C.demul_head_forward(z["t"], z["a"], z["x"], z["y"], z["s"], *z["basis"], 1.0, 0.0, True),
        "demul_head_backward": lambda: _C.demul_head_backward(z["g"], None, None, None, z["t"], z["x"], z["y"], z["s"],
                                                  *z["basis"], 1.0, 0.0, z["nc"], z["wc"], z["rc"], z["vb"],
                                                  z["vb"], z["vr"], z["vr"], z["u"], z["u"], True, True, True),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"(text_features|image_features) must be a CUDA tensor, got a tensor "
                                               r"on cpu"):
            call()


@needs_ext
def test_non_tensor_argument_is_refused():
    z = _cpu_inputs()
    with pytest.raises(TypeError):  # pybind refuses it before any check
        _C.aggregate_prompts_forward(z["t"], "prompt_logits")


def test_backend_report_says_cuda_needs_cuda_tensors(gen, monkeypatch):
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    reason = backends.why_not("cuda", torch.device("cpu"), torch.float32)
    if _C is None:
        assert reason is not None
        return
    assert reason == "the cuda backend needs CUDA tensors, got tensors on cpu"
    assert "extension demul_fast._C: built" in backends.describe(torch.device("cpu"))
    T, A = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, generator=gen)
    with pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        df.aggregate_prompts(T, A, backend="cuda")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("distill", [True, False], ids=["distill", "ce-only"])
def test_fake_head_shapes_dtypes_and_gradients(dtype, distill):
    """Fake tensors run the fake implementations and the autograd formulas end to end."""
    from demul_fast.ops import cuda_ops
    C, M, D, B, K = 7, 3, 10, 4, 6
    with FakeTensorMode():
        T = torch.randn(C, M, D, dtype=dtype, requires_grad=True)
        A = torch.randn(C, M, requires_grad=True)
        X = torch.randn(B, D, dtype=dtype, requires_grad=True)
        s = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, C, (B,))
        r = min(K, D)
        basis = DistillBasis(torch.randn(r, D), torch.randn(r), torch.randn(C, r), torch.randn(C),
                             torch.rand(())) if distill else None
        out = cuda_ops.demul_head(T, A, X, y, s, basis, alpha=0.5, label_smoothing=0.1, return_logits=True)
        assert out.logits.shape == (B, C) and out.logits.dtype == dtype
        assert all(v.shape == () and v.dtype == torch.float32 for v in out[:3])
        (out.loss + out.logits.float().sum()).backward()
        for leaf, shape in ((T, (C, M, D)), (A, (C, M)), (X, (B, D)), (s, ())):
            assert leaf.grad is not None and leaf.grad.shape == shape and leaf.grad.dtype == leaf.dtype
        u = cuda_ops.aggregate_prompts(T, A)
        assert u.shape == (C, D) and u.dtype == dtype
        ce = cuda_ops.cosine_cross_entropy(X, u, y, 20.0, 0.0)
        dist = cuda_ops.prompt_distill_loss(T, DistillBasis(torch.randn(r, D), torch.zeros(r), torch.randn(C, r),
                                                            torch.zeros(C), torch.zeros(())))
        gT, gA, gX = torch.autograd.grad(ce + dist, [T, A, X])
        assert (gT.shape, gA.shape, gX.shape) == ((C, M, D), (C, M), (B, D))
        assert ce.dtype == dist.dtype == torch.float32


@needs_ext
def test_frozen_operands_requiring_grad_are_refused():
    """phi/E (or a basis) that require grad are refused by the backend's capability: the
    kernels give them no gradient (SPEC 4.1); functional then runs the direct form on torch."""
    from demul_fast.ops import cuda_ops
    T = torch.randn(5, 3, 8)
    W = torch.randn(6, 8, requires_grad=True)
    from demul_fast.ops.capability import Call

    def refusal(fn, **args):
        return cuda_ops.capability(Call(torch.device("cuda"), torch.float32, fn, args)).reason

    reason = refusal("prompt_distill_loss", text_features=T, phi_weight=W, llm_embeddings=torch.randn(5, 6))
    assert reason is not None and "phi_weight" in reason
    basis = DistillBasis(torch.randn(6, 8, requires_grad=True), torch.randn(6), torch.randn(5, 6), torch.randn(5),
                         torch.rand(()))
    assert "basis" in refusal("demul_head", text_features=T, distill_basis=basis)
    frozen = DistillBasis(*(t.detach() for t in basis))
    assert refusal("demul_head", text_features=T, distill_basis=frozen) is None


def test_default_order_on_a_gpu_is_triton_first_and_says_why(monkeypatch):
    """Until a GPU measurement compares the kernel backends, triton comes first (docs/kernels.md, "Backends");
    ``python -m demul_fast`` prints the reason."""
    monkeypatch.delenv("DEMUL_FAST_BACKEND", raising=False)
    assert backends.default_order(torch.device("cuda")) == ("triton", "cuda", "torch")
    assert backends.default_order(torch.device("cpu")) == ("torch",)
    assert f"why: {backends.DEFAULT_ORDER_REASON}" in backends.describe(torch.device("cuda"))

"""torch.compile: the head and a DeMul training step compile, in one graph where the code
allows it, and give eager's loss and gradients; the registered custom ops pass
``torch.library.opcheck``.

Compiles are slow on a 2-core CI machine, so there are few of them: one inductor compile of
``demul_head`` (reused for the bad-input checks, which must not recompile), one ``aot_eager``
compile per kernel backend that runs here, and one ``aot_eager`` DeMul training step.
"""

import functools
import os
import subprocess
import sys

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import demul_fast as df
from backend_cases import GRAD_ARGS, HAS_GPU, available_backends, backend_module, make_head_inputs, run_head
from demul_fast.ops import backends

OPTS = dict(alpha=0.5, label_smoothing=0.1, return_logits=True)


def _head_call(fn, inputs, **opts):
    """Call ``fn`` (demul_head or a compiled one) on fresh leaves; (output, grads of loss)."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in GRAD_ARGS}
    out = fn(**{**inputs, **leaves}, **opts)
    grads = torch.autograd.grad(out.loss, [leaves[k] for k in GRAD_ARGS])
    return out, dict(zip(GRAD_ARGS, grads))


def _assert_same(compiled, eager, rtol=1e-5, atol=1e-5):
    (out_c, g_c), (out_e, g_e) = compiled, eager
    for part in ("loss", "ce_loss", "distill_loss", "logits"):
        torch.testing.assert_close(getattr(out_c, part), getattr(out_e, part), rtol=rtol, atol=atol, msg=part)
    for k in GRAD_ARGS:
        torch.testing.assert_close(g_c[k], g_e[k], rtol=rtol, atol=atol, msg=f"d{k}")


@functools.lru_cache(maxsize=None)
def _inductor_head():
    """demul_head compiled once with inductor, fullgraph=True: a graph break fails the compile."""
    return torch.compile(df.demul_head, fullgraph=True)


def _cpu_inputs(seed=0, **dims):
    gen = torch.Generator().manual_seed(seed)
    inputs = make_head_inputs(gen, **dims)
    inputs["scale"] = torch.tensor(30.0)  # a tensor scale exercises the asynchronous finiteness check
    return inputs


def test_compiled_head_matches_eager_inductor():
    inputs = _cpu_inputs()
    eager = _head_call(df.demul_head, inputs, backend="torch", **OPTS)
    compiled = _head_call(_inductor_head(), inputs, backend="torch", **OPTS)
    _assert_same(compiled, eager)
    # new values of the same shapes reuse the graph and still agree
    other = _cpu_inputs(seed=1)
    _assert_same(_head_call(_inductor_head(), other, backend="torch", **OPTS),
                 _head_call(df.demul_head, other, backend="torch", **OPTS))


@pytest.mark.parametrize("labels,scale", [([0, 1, 2, 5], 30.0), ([-1, 0, 0, 0], 30.0),
                                          ([0, 1, 2, 3], float("nan")), ([0, 1, 2, 3], float("inf"))])
def test_compiled_head_refuses_bad_values_at_run_time(labels, scale):
    """Under torch.compile the label-range and scale checks are asynchronous device asserts
    (no graph break, no host sync): bad values raise a RuntimeError instead of a ValueError.
    For labels it comes from the validator's assert or from the compiled gather's own bounds
    check, whichever the scheduler runs first; either way no loss is returned."""
    inputs = _cpu_inputs()
    inputs["labels"] = torch.tensor(labels)
    inputs["scale"] = torch.tensor(scale)
    with pytest.raises(RuntimeError, match="labels|scale|index out of bounds"):
        _head_call(_inductor_head(), inputs, backend="torch", **OPTS)  # the graph compiled above


def _counting_compile(backend_name):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend_name)
    return counter, torch.compile(df.demul_head, backend=counter, fullgraph=True)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_compiled_head_one_graph_aot_eager(backend):
    """aot_eager runs the real ops (custom ops of a kernel backend run their kernels, under the
    Triton interpreter on CPU) through AOT autograd: one graph, no recompile for new values."""
    dims = dict(C=5, M=3, D=8, B=4, K=6)
    torch._dynamo.reset()
    counter, fn = _counting_compile("aot_eager")
    for seed in (0, 3):
        inputs = _cpu_inputs(seed=seed, **dims)
        _assert_same(_head_call(fn, inputs, backend=backend, **OPTS),
                     _head_call(df.demul_head, inputs, backend=backend, **OPTS))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled (graph break or recompile)"


def test_compile_before_any_eager_call():
    """In a fresh process, the very first call of demul_head is a compiled fullgraph one:
    demul_fast imports its backend modules at import, so selection inside the traced code
    imports nothing."""
    code = (
        "import torch, demul_fast as df\n"
        "g = torch.Generator().manual_seed(0)\n"
        "T, A, X = torch.randn(5, 3, 8, generator=g), torch.zeros(5, 3), torch.randn(4, 8, generator=g)\n"
        "y = torch.tensor([0, 4, 2, 1])\n"
        "fn = torch.compile(df.demul_head, fullgraph=True, backend='eager')\n"
        "out = fn(T, A, X, y, 10.0)\n"
        "ref = df.reference.demul_head(T, A, X, y, 10.0)\n"
        "assert torch.allclose(out.loss, ref.loss, rtol=1e-6, atol=1e-6), (out.loss, ref.loss)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEMUL_FAST_BACKEND"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("dtype,compiler", [(torch.float32, "inductor"), (torch.bfloat16, "aot_eager")])
def test_compiled_head_matches_eager_gpu(backend, dtype, compiler):
    """Each backend compiled on a GPU: inductor in float32, aot_eager (cheap; checks the fake
    implementations' low-precision dtypes) in bfloat16."""
    reason = backends.why_not(backend, torch.device("cuda"), dtype)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable on cuda: {reason}")
    gen = torch.Generator().manual_seed(0)
    inputs = make_head_inputs(gen, C=37, M=3, D=100, B=5, K=70, dtype=dtype, device="cuda")
    eager = run_head(inputs, backend, **OPTS)  # also imports the backend before tracing
    fn = torch.compile(df.demul_head, fullgraph=True, backend=compiler)
    compiled = _head_call(fn, inputs, backend=backend, **OPTS)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_same(compiled, eager, rtol=tol, atol=tol)


# ---- registration: torch.library.opcheck on every op of every backend here -------------------

class _OpRecorder(TorchDispatchMode):
    """Records the arguments of every call of the given custom ops (forward and backward ops
    alike), as detached copies. Below autograd every tensor looks frozen, so the caller says
    which tensors require grad (``track``) and when the backward pass runs (``backward``):
    in forward calls those tensors are recorded with requires_grad (opcheck then tests the
    op's autograd too); backward ops, not themselves differentiable, get plain tensors."""

    def __init__(self, ops):
        super().__init__()
        self.ops = set(ops)
        self.calls = {}
        self.grad_ptrs = set()
        self.in_backward = False

    def track(self, *tensors):
        self.grad_ptrs.update(t.data_ptr() for t in tensors)

    def backward(self, loss, inputs):
        self.in_backward = True
        try:
            torch.autograd.grad(loss, inputs)
        finally:
            self.in_backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:
            def snap(x):
                if not isinstance(x, torch.Tensor):
                    return x
                y = x.detach().clone()
                grad = not self.in_backward and y.is_floating_point() and x.data_ptr() in self.grad_ptrs
                return y.requires_grad_() if grad else y
            self.calls.setdefault(func, []).append((tree_map(snap, args), tree_map(snap, kwargs)))
        return func(*args, **kwargs)


def _exercise(rec, backend, device):
    """Call every public function of ``backend`` forward and backward on tiny inputs, in the
    variants that reach different ops or arguments: with and without distillation and
    phi_bias, logits in the loss, gradients for X and for a tensor scale."""
    gen = torch.Generator().manual_seed(0)
    for distill, bias, logits in ((True, True, True), (True, False, False), (False, False, True)):
        inputs = make_head_inputs(gen, C=3, M=2, D=5, B=3, K=4, device=device, bias=bias, distill=distill)
        inputs["scale"] = torch.tensor(10.0, device=device)
        leaves = [inputs[k].requires_grad_() for k in GRAD_ARGS + ("scale",)]
        rec.track(*leaves)
        out = df.demul_head(**inputs, backend=backend, alpha=0.5, label_smoothing=0.1, return_logits=logits)
        rec.backward(out.loss + (out.logits.sum() * 1e-2 if logits else 0), leaves)
    inputs = make_head_inputs(gen, C=3, M=2, D=5, B=3, K=4, device=device)
    T, A, X = (inputs[k].requires_grad_() for k in GRAD_ARGS)
    rec.track(T, A, X)
    U = df.aggregate_prompts(T, A, backend=backend)
    rec.track(U)
    ce = df.cosine_cross_entropy(X, U, inputs["labels"], 10.0, 0.1, backend=backend)
    dist = df.prompt_distill_loss(T, inputs["phi_weight"], inputs["phi_bias"], inputs["llm_embeddings"],
                                  backend=backend)
    rec.backward(ce + dist, [T, A, X])


def _overload(op):
    """The OpOverload of an OPS entry (an OpOverload, an OpOverloadPacket or a CustomOpDef)."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default
    return getattr(op, "_opoverload", op)


def _recorded_calls(backend, device):
    ops = [_overload(op) for op in getattr(backend_module(backend), "OPS", None) or []]
    if not ops:
        return []
    recorder = _OpRecorder(ops)
    with recorder:
        _exercise(recorder, backend, device)
    return [(op, recorder.calls.get(op, [])) for op in ops]


def _distinct(samples):
    """One sample per pattern of arguments (which are None or empty, which are bools and their
    values, which tensors require grad): repeated calls of the same kind add nothing."""
    seen, out = set(), []
    for args, kwargs in samples:
        def kind(x):
            if isinstance(x, torch.Tensor):
                return ("t", x.numel() == 0, x.requires_grad)
            return x if isinstance(x, bool) or x is None else type(x).__name__
        key = tuple(kind(a) for a in args) + tuple((k, kind(v)) for k, v in sorted(kwargs.items()))
        if key not in seen:
            seen.add(key)
            out.append((args, kwargs))
    return out


def _opcheck_params():
    params = []
    for device in ("cpu", "cuda"):
        for name in available_backends(device):
            if name == "torch":  # plain PyTorch, no custom ops: it compiles directly (tests above)
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    if not HAS_GPU:  # listed (and skipped at collection) so the GPU runs are visible here
        params += [pytest.param(n, "cuda", id=f"{n}-cuda", marks=pytest.mark.gpu) for n in ("triton", "cuda")]
    return params


@pytest.mark.parametrize("backend,device", _opcheck_params())
def test_opcheck_every_registered_op(backend, device):
    """Samples are derived, not hand-written: the backend's own public functions are run
    forward and backward on tiny inputs while a dispatch mode records each call of an op in
    the module's ``OPS``; every distinct recorded call then goes through opcheck
    (schema, fake/meta implementation, autograd registration, AOT dispatch)."""
    calls = _recorded_calls(backend, device)
    assert calls, f"the {backend} backend module lists no OPS (custom ops are how it compiles)"
    missing = [str(op) for op, samples in calls if not samples]
    for op, samples in calls:
        for args, kwargs in _distinct(samples):
            torch.library.opcheck(op, args, kwargs)
    assert not missing, f"ops in {backend}.OPS never called by the public functions, so not opchecked: {missing}"


# ---- a compiled DeMul training step ---------------------------------------------------------------

def _tiny_demul(backend=None, text_encoder="prefix"):
    import open_clip  # noqa: PLC0415 - the test extra (checked by conftest)
    from open_clip.model import CLIP

    torch.manual_seed(0)
    d, k = 16, 12
    clip = CLIP(embed_dim=d, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32),
                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    names = ["cat", "golden_retriever", "sea anemone"]
    model = df.DeMul(clip, open_clip.get_tokenizer("ViT-B-16"), names, llm_embeddings=torch.randn(3, k),
                     phi=torch.nn.Linear(d, k), n_prompts=2, n_ctx=4, label_smoothing=0.1, backend=backend,
                     text_encoder=text_encoder)
    with torch.no_grad():
        model.head.prompt_logits.normal_()
    return model.train(), d


def _step(module, params, x, y):
    out = module(labels=y, image_features=x)
    return [out.loss.detach(), out.ce_loss.detach()] + list(torch.autograd.grad(out.loss, params))


@pytest.mark.parametrize("text_encoder", ["prefix", "full"])
def test_compiled_demul_training_step_matches_eager(text_encoder):
    """A DeMul forward (text encoder + head) compiled with aot_eager and fullgraph=True is one
    graph, gives eager's loss and gradients (ctx, prompt logits) and does not recompile for a
    new batch; with the prefix-shared encoder (the default) and the full-length one."""
    model, d = _tiny_demul(backend="torch", text_encoder=text_encoder)
    params = [model.ctx, model.head.prompt_logits]
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(4, d, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        eager = _step(model, params, x, y)
        got = _step(compiled, params, x, y)
        # under compile the prefix-shared attention is one custom op per layer
        # (demul_fast::prefix_attention; on a CPU its body is the query-slot
        # scaled_dot_product_attention composite; the last layer _attend), eager its batched
        # products: the same sums in
        # another order, so they agree to float32 rounding at each quantity's magnitude (32 eps
        # of its largest entry: 2e-5 on dctx here, measured difference 7e-6), far inside what a
        # 1% error or a wrong mask moves (test_text_encoder checks the two against float64)
        for name, a, b in zip(["loss", "ce_loss", "dctx", "dprompt_logits"], got, eager):
            bound = 32 * torch.finfo(torch.float32).eps * float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=0, atol=bound, msg=lambda m, name=name: f"{name}: {m}")
    assert counter.frame_count == 1, f"{counter.frame_count} graphs (graph break or recompile)"


@pytest.mark.gpu
def test_compiled_demul_training_step_gpu():
    """One inductor compile of a DeMul step on the GPU, with the default (best) head backend."""
    model, d = _tiny_demul()
    model = model.cuda()
    params = [model.ctx, model.head.prompt_logits]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, d, generator=gen).cuda(), torch.randint(0, 3, (4,), generator=gen).cuda()
    eager = _step(model, params, x, y)
    got = _step(torch.compile(model, fullgraph=True), params, x, y)
    for name, a, b in zip(["loss", "ce_loss", "dctx", "dprompt_logits"], got, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

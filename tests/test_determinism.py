"""Same inputs, same bits: every backend's outputs and gradients are bitwise identical
across runs (torch.equal, not a tolerance).

Shapes cross several blocks so that a backend reducing across blocks with atomics (whose
order varies between runs) would show it; a backend that needs a deterministic mode for this
must document it and set it here. Without a GPU: torch on CPU and triton under the
interpreter (smaller shapes); the CUDA variants are marked ``gpu``.

On the CPU both backends are deterministic by construction, so
``test_a_varying_reduction_order_is_caught`` checks that these tests can fail: a backend
that sums the batch in a different order on each call (what atomics do) is refused.
"""

import itertools

import pytest
import torch

import demul_fast as df
from backend_cases import KERNEL_DTYPES, backend_module, backend_params, make_head_inputs, run_head

RUNS = 3


def _dims(backend, device):
    if device == "cpu" and backend != "torch":  # the Triton interpreter is slow
        return dict(C=11, M=3, D=40, B=6, K=24)
    if device == "cpu":
        return dict(C=37, M=3, D=100, B=5, K=70)
    return dict(C=300, M=8, D=512, B=128, K=1024)


def _assert_bitwise(name, runs):
    first = runs[0]
    for i, other in enumerate(runs[1:], 1):
        if first is None:
            assert other is None
            continue
        assert torch.equal(first, other), (f"{name}: run {i} differs from run 0 by up to "
                                           f"{float((first.double() - other.double()).abs().max()):.3e}")


def _assert_head_deterministic(inputs, backend):
    outs = [run_head(inputs, backend, alpha=0.7, label_smoothing=0.1, return_logits=True) for _ in range(RUNS)]
    for part in ("loss", "ce_loss", "distill_loss", "logits"):
        _assert_bitwise(part, [getattr(o, part) for o, _ in outs])
    for k in outs[0][1]:
        _assert_bitwise(f"d{k}", [g[k] for _, g in outs])


@pytest.mark.parametrize("backend,device,dtype", backend_params(KERNEL_DTYPES))
def test_head_bitwise_deterministic(gen, backend, device, dtype):
    _assert_head_deterministic(make_head_inputs(gen, dtype=dtype, device=device, **_dims(backend, device)), backend)


def _reordering(original):
    """``original`` demul_head with the batch permuted differently on every call (the rows
    mapped back afterwards): the same math, summed over the batch in a varying order."""
    calls = itertools.count()

    def head(text_features, prompt_logits, image_features, labels, scale, *args, **kwargs):
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(next(calls)))
        order = order.to(labels.device)
        out = original(text_features, prompt_logits, image_features[order], labels[order], scale, *args, **kwargs)
        if out.logits is None:
            return out
        return out._replace(logits=out.logits[torch.argsort(order)])
    return head


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32,)))
def test_a_varying_reduction_order_is_caught(gen, backend, device, dtype, monkeypatch):
    module = backend_module(backend)
    monkeypatch.setattr(module, "demul_head", _reordering(module.demul_head))
    inputs = make_head_inputs(gen, dtype=dtype, device=device, **_dims(backend, device))
    with pytest.raises(AssertionError, match="differs from run 0"):
        _assert_head_deterministic(inputs, backend)


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32,)))
def test_parts_bitwise_deterministic(gen, backend, device, dtype):
    inp = make_head_inputs(gen, dtype=dtype, device=device, **_dims(backend, device))
    T, A, X, E, W, b = (inp[k] for k in ("text_features", "prompt_logits", "image_features", "llm_embeddings",
                                         "phi_weight", "phi_bias"))
    U = df.reference.aggregate_prompts(T, A).detach()

    def once():
        leaves = [t.clone().requires_grad_() for t in (T, A, X, U)]
        t, a, x, u = leaves
        agg = df.aggregate_prompts(t, a, backend=backend)
        ce = df.cosine_cross_entropy(x, u, inp["labels"], 30.0, 0.1, backend=backend)
        dist = df.prompt_distill_loss(t, W, b, E, backend=backend)
        (agg * torch.linspace(-1, 1, agg.numel(), device=device).view_as(agg)).sum().backward(retain_graph=True)
        (ce + dist).backward()
        return [agg.detach(), ce.detach(), dist.detach()] + [leaf.grad for leaf in leaves]

    runs = [once() for _ in range(RUNS)]
    names = ["aggregate", "cross_entropy", "distill", "dT", "dA", "dX", "dU"]
    for i, name in enumerate(names):
        _assert_bitwise(name, [r[i] for r in runs])

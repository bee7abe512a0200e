"""Helpers shared by the tests of the kernels on a GPU (test_cuda_gpu.py, test_triton_gpu.py)
and on the CPU (the CUDA emulation, test_cuda_emulated.py; the Triton interpreter): one call
with its gradients, and the error rule of tests/numerics.py over all outputs and gradients,
against the float32 reference (float32 inputs) or the yardstick that rounds what the kernels
round (half precision, tests/rounded_yardstick.py). tests/test_kernel_checks.py runs the
per-op checks on the CPU and shows that wrong results fail them."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops.distill_basis import build_distill_basis
import rounded_yardstick
from numerics import assert_error_rule, ce_magnitudes, default_compute_dtype, head_magnitudes


def run(fn, args, diff, dtype, cotangents, before: Optional[Callable] = None, after: Optional[Callable] = None):
    """fn on copies of args (floating ones cast to dtype, those in diff made leaves) ->
    (outputs, gradients of sum(<output, cotangent>) w.r.t. the diff leaves). ``before`` runs
    before the call (e.g. poisoning the allocator), ``after`` after the gradients."""
    leaves, call = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).clone()
            if i in diff:
                a.requires_grad_()
                leaves.append(a)
        call.append(a)
    if before is not None:
        before()
    outs = fn(*call)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.double() * c).sum() for o, c in zip(outs, cotangents) if o is not None)
    grads = torch.autograd.grad(total, leaves)
    if after is not None:
        after()
    return [o.detach() for o in outs if o is not None], [g.detach() for g in grads]


def assert_outputs_and_gradients(name, dtype, fast, exact, plain, grad_names, magnitudes=None):
    """The error rule (k=2 outputs, k=3 gradients) for (outputs, gradients) pairs of the fast
    path, the float64 reference and the yardstick, all on the same rounded inputs, with float32
    floors and no operand allowance. For float32 (and float64) inputs only: a kernel path in
    half precision rounds some operands by design, and its checks (``check_aggregate`` ...
    below) use the yardstick that rounds them (tests/rounded_yardstick.py). ``magnitudes``: the
    terms' size behind each output, then each gradient (tests/numerics.py; None: max |reference|)."""
    assert dtype not in HALF, f"{name}: {dtype} inputs need the rounded yardstick (kernel_checks.check_aggregate ...)"
    (fo, fg), (ro, rg), (po, pg) = fast, exact, plain
    mags = list(magnitudes) if magnitudes is not None else [None] * (len(fo) + len(fg))
    for i, (f, r, p) in enumerate(zip(fo, ro, po)):
        assert_error_rule(f"{name} out{i}", f, r, p, k=2.0, dtype=dtype, magnitude=mags[i])
    for j, (label, f, r, p) in enumerate(zip(grad_names, fg, rg, pg)):
        assert_error_rule(f"{name} {label}", f, r, p, k=3.0, dtype=dtype, magnitude=mags[len(fo) + j])


def reference_runs(ref_fn, args, diff, dtype, cotangents, before=None, after=None):
    """(exact, plain): the reference in float64 and in the compute dtype on the inputs rounded
    to ``dtype``, with the cotangents as autograd hands them to the fast path's outputs."""
    rounded = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    exact = run(ref_fn, rounded, diff, torch.float64, cotangents, before, after)
    plain = run(ref_fn, rounded, diff, default_compute_dtype(dtype), cotangents, before, after)
    return exact, plain


def check_against_reference(name, fast_fn, ref_fn, args, diff, dtype, cotangents, grad_names, before=None,
                            after=None, magnitudes=None):
    """fast_fn against ref_fn under the error rule: the float64 reference and the yardstick
    (the reference in the compute dtype) on the same rounded inputs (float32 / float64 inputs;
    half precision: the functions below). Returns (fast, exact, plain, cotangents as autograd
    handed them), each (outputs, gradients)."""
    assert dtype not in HALF, f"{name}: {dtype} inputs need the rounded yardstick (kernel_checks.check_aggregate ...)"
    fast = run(fast_fn, args, diff, dtype, cotangents, before, after)
    # autograd hands a half-precision output its cotangent rounded to that precision
    cotangents = [c.to(f.dtype).double() for c, f in zip(cotangents, fast[0])]
    exact, plain = reference_runs(ref_fn, args, diff, dtype, cotangents, before, after)
    assert_outputs_and_gradients(name, dtype, fast, exact, plain, grad_names, magnitudes)
    return fast, exact, plain, cotangents


# ---- one check per op, for every kernel path (the GPU tests, the emulated CUDA kernels, the
# Triton interpreter): float32 against the float32 reference as yardstick; bfloat16 / float16
# against the yardstick that rounds what the family's kernels round (tests/rounded_yardstick.py),
# float32 floors, no operand allowance. ``family``: "cuda" (csrc/) or "triton"; ``interpreted``:
# the Triton interpreter, whose float32 -> bfloat16 conversion truncates (a GPU rounds to
# nearest). tests/test_kernel_checks.py runs each on the CPU (emulated CUDA, interpreter) and
# shows that mutated results fail it. ``before``/``after`` as for ``run``. Each returns the fast
# path's (outputs, gradients). ``mutations`` (the checks' own mutation test): {name: f}, f
# taking and returning the results as a dict by the keys of the op's yardstick
# (tests/rounded_yardstick.py); after the control passes, each mutated result is judged as
# well, and ``refused[name]`` records the failure's message ('' if it passed the check).

HALF = (torch.bfloat16, torch.float16)


def skipping_unboundable(check):
    """``check`` (one of the functions below), skipping the test where the rounded yardstick
    cannot be computed at the inputs' shape (rounded_yardstick.TooManyBoundaryElements: more
    operand elements on a rounding boundary than its cap; e.g. the GPU tests' ImageNet-scale
    shape in half precision, 0.27 M to 2.9 M of them), with the counts as the reason."""
    def checked(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except rounded_yardstick.TooManyBoundaryElements as e:
            pytest.skip(f"the rounded yardstick cannot be computed at this shape (its boundary allowance "
                        f"reruns the op once per element): {e}; float32 and the smaller shapes are checked")
    return checked


def rounding(family, dtype, interpreted=False):
    """(mode, stored_ulps) of the family's float32 -> dtype conversions."""
    if interpreted:
        return ("truncate" if dtype == torch.bfloat16 else "nearest"), 1.0
    return "nearest", 0.5


def _mutated(judge, name, fast, keys, mutations, refused):
    """judge(name, fast) for the control, then for each mutation of the results."""
    judge(name, fast)
    n_out = len(fast[0])
    for label, change in (mutations or {}).items():
        got = change(dict(zip(keys, list(fast[0]) + list(fast[1]))))
        vals = [got[k] for k in keys]
        try:
            judge(f"{name} [{label}]", (vals[:n_out], vals[n_out:]))
            refused[label] = ""
        except AssertionError as e:
            refused[label] = str(e).split("\n")[0] or "refused"


def _judge_rounded(name, op, family, dtype, interpreted, fast, keys, yard_args, magnitudes, mutations=None,
                   refused=None):
    mode, ulps = rounding(family, dtype, interpreted)
    memo = {}  # the yardstick of these inputs, computed once for the control and every mutation

    def judge(label, got):
        results = dict(zip(keys, list(got[0]) + list(got[1])))
        if op is rounded_yardstick.head:
            rounded_yardstick.check_head(label, family, dtype, mode, results, *yard_args, magnitudes,
                                         stored_ulps=ulps, memo=memo)
        else:
            rounded_yardstick.check_op(label, op, family, dtype, mode, results, yard_args, magnitudes,
                                       stored_ulps=ulps, memo=memo)
    _mutated(judge, name, fast, keys, mutations, refused)


def _judge_plain(name, fast, exact, plain, dtype, keys, magnitudes, mutations=None, refused=None):
    mags = None if magnitudes is None else [magnitudes.get(k) for k in keys]

    def judge(label, got):
        assert_outputs_and_gradients(label, dtype, got, exact, plain, keys[len(got[0]):], mags)
    _mutated(judge, name, fast, keys, mutations, refused)


def check_aggregate(name, family, fn, T, A, cot, dtype, interpreted=False, before=None, after=None, mutations=None,
                    refused=None):
    """fn(t, a) -> u^ [C, D] (aggregate_prompts), its gradients for the cotangent ``cot`` [C, D]
    (float64), T [C, M, D] and A [C, M] float64."""
    keys = ["class_features", "text_features", "prompt_logits"]
    cot = cot.to(dtype).double()  # autograd hands u^ (in T's dtype) its cotangent in that dtype
    fast = run(fn, [T, A], [0, 1], dtype, [cot], before, after)
    if dtype in HALF:
        _judge_rounded(name, rounded_yardstick.aggregate, family, dtype, interpreted, fast, keys,
                       (T.to(dtype), A.to(dtype), cot), {}, mutations, refused)
    else:
        exact, plain = reference_runs(ref.aggregate_prompts, [T, A], [0, 1], dtype, [cot], before, after)
        _judge_plain(name, fast, exact, plain, dtype, keys, None, mutations, refused)
    return fast


def check_cross_entropy(name, family, fn, X, U, y, tau, ls, g, dtype, interpreted=False, before=None, after=None,
                        mutations=None, refused=None):
    """fn(x, u, s) -> scalar loss (cosine_cross_entropy with labels y and smoothing ls), its
    gradients w.r.t. X [B, D], U [C, D] and the scale tau (a 0-dim float64 tensor, cast to
    ``dtype`` like the features) for the cotangent g (a float)."""
    keys = ["ce_loss", "image_features", "class_features", "scale"]
    cot = [torch.tensor(float(g), dtype=torch.float64, device=X.device)]
    fast = run(fn, [X, U, tau], [0, 1, 2], dtype, cot, before, after)
    Xh, Uh, t = X.to(dtype), U.to(dtype), float(tau.to(dtype))
    mags = ce_magnitudes(Xh, Uh, y, t, ls, g)
    if dtype in HALF:
        _judge_rounded(name, rounded_yardstick.cross_entropy, family, dtype, interpreted, fast, keys,
                       (Xh, Uh, y, t, ls, float(g)), mags, mutations, refused)
    else:
        exact, plain = reference_runs(lambda x, u, s: ref.cosine_cross_entropy(x, u, y, s, ls), [X, U, tau],
                                      [0, 1, 2], dtype, cot, before, after)
        _judge_plain(name, fast, exact, plain, dtype, keys, mags, mutations, refused)
    return fast


def check_distill(name, family, fn, T, E, W, b, g, dtype, interpreted=False, before=None, after=None, mutations=None,
                  refused=None):
    """fn(t) -> scalar loss (prompt_distill_loss on the float32 basis of E, W, b), its gradient
    w.r.t. T [C, M, D] for the cotangent g; E, W, b float64, already rounded to ``dtype``
    (numerics.round_trip: frozen operands the reference casts to the inputs' dtype)."""
    keys = ["distill_loss", "text_features"]
    cot = [torch.tensor(float(g), dtype=torch.float64, device=T.device)]
    fast = run(fn, [T], [0], dtype, cot, before, after)
    mags = {"distill_loss": 2.0}
    if dtype in HALF:
        basis = build_distill_basis(W, b, E, dtype=torch.float32)
        _judge_rounded(name, rounded_yardstick.distillation, family, dtype, interpreted, fast, keys,
                       (T.to(dtype), basis, float(g)), mags, mutations, refused)
    else:
        exact, plain = reference_runs(
            lambda t: ref.prompt_distill_loss(t, W.to(t.dtype), None if b is None else b.to(t.dtype), E.to(t.dtype)),
            [T], [0], dtype, cot, before, after)
        _judge_plain(name, fast, exact, plain, dtype, keys, mags, mutations, refused)
    return fast


HEAD_KEYS = ["loss", "ce_loss", "distill_loss", "logits", "text_features", "prompt_logits", "image_features", "scale"]


def check_head(name, family, fn, T, A, X, y, tau, E, W, b, alpha, ls, cot, dtype, interpreted=False, before=None,
               after=None, mutations=None, refused=None):
    """fn(t, a, x, s) -> (loss, ce_loss, distill_loss, logits) of the head (labels y, the float32
    basis of E, W, b or no distillation when E is None, alpha, smoothing ls), its gradients
    w.r.t. T, A, X and the scale tau (0-dim float64) for the cotangents
    cot = [g_loss, g_ce, g_dist (0-dim float64), G_logits [B, C] float64]. The magnitudes are
    the terms' of numerics.head_magnitudes for this objective; d tau = <G, cos> summed has
    terms sum |B G| / B <= 2 (|g_loss| + |g_ce|) + sum |G_logits| (|cos| <= 1)."""
    distill = E is not None
    fast = run(fn, [T, A, X, tau], [0, 1, 2, 3], dtype, cot, before, after)
    GL = cot[3].to(dtype)  # autograd hands the logits their cotangent in their dtype
    g = [float(c) for c in cot[:3]]
    t = float(tau.to(dtype))
    rounded = dict(text_features=T.to(dtype), prompt_logits=A.to(dtype), image_features=X.to(dtype), labels=y,
                   scale=t, llm_embeddings=E if distill else None, phi_weight=W if distill else None,
                   phi_bias=b if distill else None)
    mags = head_magnitudes(rounded, alpha, ls, cotangents=(*g, GL))
    mags["scale"] = 2 * (abs(g[0]) + abs(g[1])) + float(GL.double().abs().sum())
    if dtype in HALF:
        basis = build_distill_basis(W, b, E, dtype=torch.float32) if distill else None
        _judge_rounded(name, rounded_yardstick.head, family, dtype, interpreted, fast, HEAD_KEYS,
                       (T.to(dtype), A.to(dtype), X.to(dtype), y, t, basis, alpha, ls, (*g, GL)), mags, mutations,
                       refused)
    else:
        def reference(t_, a_, x_, s_):
            cast = (lambda v: None if v is None or not distill else v.to(t_.dtype))
            return tuple(ref.demul_head(t_, a_, x_, y, s_, cast(E), cast(W), cast(b), alpha=alpha, label_smoothing=ls,
                                        return_logits=True))
        exact, plain = reference_runs(reference, [T, A, X, tau], [0, 1, 2, 3], dtype,
                                      [c.to(o.dtype).double() for c, o in zip(cot, fast[0])], before, after)
        _judge_plain(name, fast, exact, plain, dtype, HEAD_KEYS, mags, mutations, refused)
    return fast


def check_head_distillation(name, family, fn, T, A, X, y, tau, E, W, b, alpha, ls, g, dtype, interpreted=False,
                            before=None, after=None, mutations=None, refused=None, prompt_grad=False):
    """fn(t, a) -> the head's distill_loss alone (X, y, the scale tau (a float), alpha, ls
    frozen), its gradient w.r.t. T for the cotangent g: the fused backward's distillation part,
    which the cross-entropy's larger terms hide in ``check_head``. ``prompt_grad``: the same
    backward also gives the gradient w.r.t. A (returned after the results: the caller checks
    it is zero, as the loss does not depend on A)."""
    keys = ["distill_loss", "text_features"]
    cot = [torch.tensor(float(g), dtype=torch.float64, device=T.device)]
    fast = run(fn, [T, A], [0, 1] if prompt_grad else [0], dtype, cot, before, after)
    dA = fast[1].pop() if prompt_grad else None
    rounded = dict(text_features=T.to(dtype), prompt_logits=A.to(dtype), image_features=X.to(dtype), labels=y,
                   scale=tau, llm_embeddings=E, phi_weight=W, phi_bias=b)
    mags = head_magnitudes(rounded, alpha, ls, cotangents=(0.0, 0.0, float(g), None))
    if dtype in HALF:
        basis = build_distill_basis(W, b, E, dtype=torch.float32)
        _judge_rounded(name, rounded_yardstick.head, family, dtype, interpreted, fast, keys,
                       (T.to(dtype), A.to(dtype), X.to(dtype), y, tau, basis, alpha, ls, (0.0, 0.0, float(g), None)),
                       mags, mutations, refused)
    else:
        exact, plain = reference_runs(
            lambda t_, a_: ref.demul_head(t_, a_, X.to(t_.dtype), y, tau, E.to(t_.dtype), W.to(t_.dtype),
                                          None if b is None else b.to(t_.dtype), alpha=alpha,
                                          label_smoothing=ls).distill_loss,
            [T, A], [0], dtype, cot, before, after)
        _judge_plain(name, fast, exact, plain, dtype, keys, mags, mutations, refused)
    return (fast, dA) if prompt_grad else fast

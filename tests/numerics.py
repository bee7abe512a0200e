"""The package's error rule, shared by the tests of every fast path.

For every element i of a result, against the float64 reference on the *same* (already
rounded) inputs:

    |fast_i - ref64_i|  <=  k * max_j |plain_j - ref64_j|        the yardstick's own error
                          + u(stored) * |ref64_i|                 rounding of the stored result
                          + 16 * eps(compute) * magnitude_i       floor (4 for half compute)

* ``plain`` (the yardstick) is the plain PyTorch path on the same inputs, computed in the
  precision the fast path promises to accumulate in (``compute_dtype``: float32 for
  float32/bfloat16/float16 inputs, float64 for float64). For half-precision inputs that is
  the reference on the inputs upcast to float32, never the reference run in
  half precision: a half-precision yardstick would let a half-accumulating kernel pass by
  construction, so the rule refuses one unless the caller says that the path stores its
  intermediates in half precision by design (``compute_dtype=torch.bfloat16``, e.g. a model
  whose layers run in bfloat16).
* ``u(stored)`` = eps/2 of ``fast``'s dtype, when that is coarser than the yardstick's: a
  float32 result rounded once to bfloat16 is allowed its one rounding, element by element,
  and nothing more (``stored_ulps=1`` where the conversion truncates: the Triton
  interpreter's float32 -> bfloat16). Outputs stored in float32 get float32's eps.
* ``magnitude`` is the size of the terms that produce a value, not the value itself (a loss's
  summands, the logits' scale |tau|): a value that cancels to ~0 (cross-entropy with C=1 is
  exactly 0) still carries the rounding of its terms. Default max|ref64|, for values that do
  not cancel. A float or a tensor broadcastable to the result (e.g. one magnitude per row).
* ``k`` = 2 for outputs, 3 for gradients, as in flash-attention's tests.
* Kernel paths in half precision round some operands by design (tensor cores; saved
  tensors). Their checks (backend_cases, kernel_checks (the GPU tests, the emulated CUDA
  kernels, tests/test_kernel_checks.py), test_triton, test_mutations, test_edge_cases,
  test_properties) use ``plain``/``ref64`` from tests/rounded_yardstick.py, which round
  exactly those values and compute the rest in float32/float64: the float32 floor above then
  applies unchanged, with no operand allowance, plus ``extra``: that module's derived
  allowance for operand elements that lie on a rounding boundary. (The former operand
  allowance, 4 units of the half dtype at the terms' magnitude, is gone: 1.6 % of the
  magnitude in bfloat16, it passed a 1 % error.)

When ``fast`` *is* the yardstick (bitwise, after its rounding to ``fast``'s dtype), ``k *
plain error`` would be a reference agreeing with itself: such a comparison is recorded in
``SELF_COMPARISONS`` and judged by the rounding and floor terms alone, i.e. as an accuracy
claim against float64.

tests/test_error_rule.py breaks the head on purpose (alpha x1.05, scale x1.01, a dropped
phi_bias, dT or dX x1.05, label smoothing ignored, a half-accumulating path) and checks
that this rule catches each; tests/test_mutations.py does so for every path (torch, Triton
interpreter, CUDA emulation) and dtype with the rounded yardstick (docs/testing-precision.md).
"""

from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

# Units of eps(compute) in the floor. Derivation for float32: every value of the head is a
# sum of products of normalised vectors (each normalisation costs ~D/2 + 2 roundings relative,
# ~sqrt(D) in practice) followed by at most a few scalar operations (softmax, log-sum-exp,
# the normalize backward); the rounding errors, relative to the terms' magnitude, add to a few
# eps each: ~8 eps measured on the reference itself, doubled for the margin -> 16;
# a path that computes in half precision by design already has a half-sized yardstick error,
# and its floor only keeps an exactly rounded yardstick from making the bound zero.
FLOOR_UNITS = {torch.float64: 16.0, torch.float32: 16.0, torch.bfloat16: 4.0, torch.float16: 4.0}
SELF_COMPARISONS: List[str] = []  # names of checks where fast was bitwise the yardstick

Magnitude = Union[float, torch.Tensor, None]


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref.detach().double()).abs().max())


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation precision the package promises for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_trip(dtype: torch.dtype, *tensors):
    """Each tensor rounded to ``dtype`` and back to its own dtype (None passes): frozen
    operands that a test casts to the inputs' dtype inside its call, so that the float64
    reference sees the same rounded values as the fast path."""
    out = tuple(None if t is None else t.to(dtype).to(t.dtype) for t in tensors)
    return out if len(out) != 1 else out[0]


def _unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def error_bound(fast: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, k: float,
                compute_dtype: torch.dtype, magnitude: Magnitude, stored_ulps: float = 0.5,
                extra: Optional[torch.Tensor] = None):
    """(excess, bound, parts): excess = max_i(|fast_i - ref_i| - stored rounding_i - floor_i),
    which must be <= bound = k * plain error (0 for a self-comparison)."""
    ref = ref64.detach().double()
    diff = (fast.detach().double() - ref).abs()
    stored = 0.0
    if _unit(fast.dtype) > _unit(plain.dtype):
        info = torch.finfo(fast.dtype)  # one rounding; below info.tiny, the subnormals' spacing
        stored = stored_ulps * info.eps * (ref.abs() + info.tiny)
    if magnitude is None:
        magnitude = float(ref.abs().max()) if ref.numel() else 0.0
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.detach().double().to(ref.device)
    info = torch.finfo(compute_dtype)  # below info.tiny, underflow
    floor = FLOOR_UNITS[compute_dtype] * info.eps * magnitude + info.tiny
    if extra is not None:  # the rounded yardstick's boundary allowance (tests/rounded_yardstick.py)
        floor = floor + extra.detach().double().to(ref.device)
    excess = float((diff - stored - floor).max()) if diff.numel() else 0.0
    plain_err = max_err(plain, ref64)
    self_compare = torch.equal(fast.detach(), plain.detach().to(fast.dtype)) if fast.numel() else False
    bound = 0.0 if self_compare else k * plain_err
    max_floor = float(torch.as_tensor(floor).max())
    return excess, bound, dict(fast_err=float(diff.max()) if diff.numel() else 0.0, plain_err=plain_err,
                               floor=max_floor, self_compare=self_compare)


def assert_error_rule(name: str, fast: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor,
                      k: float = 2.0, dtype: Optional[torch.dtype] = None, *, magnitude: Magnitude = None,
                      compute_dtype: Optional[torch.dtype] = None, stored_ulps: float = 0.5,
                      extra: Optional[torch.Tensor] = None) -> None:
    """The rule above, with the statistics printed before the assert.

    dtype: the inputs' dtype (default plain's); compute_dtype: the accumulation precision the
    fast path promises (default float32, float64 for float64 inputs); magnitude: the size of
    the terms that produce each value (default max|ref64|); stored_ulps: units in the last place
    of fast's dtype that storing a result may cost (0.5: round to nearest; the Triton
    interpreter converts float32 to bfloat16 by truncation, a whole unit); extra: the rounded
    yardstick's boundary allowance, per element (see above).
    """
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert plain.shape == ref64.shape, f"{name}: yardstick shape {tuple(plain.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values in the fast result"
    dtype = dtype or plain.dtype
    compute_dtype = compute_dtype or default_compute_dtype(dtype)
    assert _unit(plain.dtype) <= _unit(compute_dtype), (
        f"{name}: the yardstick is in {plain.dtype} but the path promises {compute_dtype} accumulation: "
        f"compute it on the same inputs upcast to {compute_dtype}, or pass compute_dtype={plain.dtype} "
        "for a path that stores its intermediates in that precision by design")
    excess, bound, p = error_bound(fast, ref64, plain, k, compute_dtype, magnitude, stored_ulps, extra)
    if p["self_compare"]:
        SELF_COMPARISONS.append(name)
    what = "fast is the yardstick itself: judged by rounding + floor only" if p["self_compare"] else \
        f"{k} x yardstick err {p['plain_err']:.3e}"
    print(f"{name}: fast err {p['fast_err']:.3e}, {what}, floor {p['floor']:.3e} "
          f"({dtype} inputs, {compute_dtype} compute, stored {fast.dtype}"
          f"); excess {excess:.3e} <= {bound:.3e}?")
    assert excess <= bound, (
        f"{name}: error {p['fast_err']:.3e} exceeds the rule: excess over stored rounding + floor "
        f"{p['floor']:.3e} is {excess:.3e} > {bound:.3e} ({what})")


def head_magnitudes(inputs: dict, alpha: float = 1.0, label_smoothing: float = 0.0,
                    cotangents: Optional[tuple] = None) -> dict:
    """Magnitude of the terms behind each output of the head (SPEC 4 and 4.1), keyed like
    ``HeadOutput``'s fields and the gradients' argument names, for inputs as
    ``backend_cases.make_head_inputs`` gives them:

    * logits s = tau <x^, u^>: |tau|;
    * ce_loss: its summands logsumexp_c s and sum_c q s are each up to |tau| + log C;
    * distill_loss: summands 1 - cos in [0, 2]; loss: ce + |alpha| distill;
    * a gradient through v^ = v / max(|v|, eps) (T, X) is (dv^ - v^ <v^, dv^>) / max(|v|, eps):
      its terms are |dv^| / max(|v|, eps), per row, with dv^ the float64 gradient reaching
      v^ (summed over the uses of v), plus the cross-entropy's cancelling sums (below);
    * dA[c, m] = w (dw - sum w dw) with |dw| <= |du[c]|: twice w |du[c]|'s terms.
    The gradients reaching each v^ come from one float64 reference run with
    ``reference.l2_normalize`` wrapped to record them.

    ``cotangents`` = (g_loss, g_ce, g_dist, G_logits or None): the gradients are those of
    g_loss loss + g_ce ce_loss + g_dist distill_loss + <G_logits, logits> (default: of loss).
    """
    from demul_fast import reference  # noqa: PLC0415

    scale = inputs["scale"]
    tau = abs(float(scale.detach().double()) if isinstance(scale, torch.Tensor) else float(scale))
    C = inputs["text_features"].shape[0]
    ce = tau + math.log(C) + 1.0
    dist = 2.0 if inputs.get("llm_embeddings") is not None else 0.0
    mags = {"logits": tau, "ce_loss": ce, "distill_loss": dist, "loss": ce + abs(float(alpha)) * dist}

    args = {k: (v.detach().to(device="cpu", dtype=torch.float64) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in inputs.items()}
    if isinstance(args["labels"], torch.Tensor):
        args["labels"] = args["labels"].cpu()
    T = args["text_features"].requires_grad_()
    X = args["image_features"].requires_grad_()
    A = args["prompt_logits"].requires_grad_()
    calls = []
    original = reference.l2_normalize

    def recording(v, dim=-1, eps=reference.EPS):
        out = original(v, dim, eps)
        if out.requires_grad:
            out.retain_grad()
        calls.append((v, out))
        return out

    reference.l2_normalize = recording
    try:
        out = reference.demul_head(**args, alpha=alpha, label_smoothing=label_smoothing,
                                   return_logits=cotangents is not None and cotangents[3] is not None)
        g_loss, g_ce, g_dist, GL = cotangents if cotangents is not None else (1.0, 0.0, 0.0, None)
        objective = float(g_loss) * out.loss + float(g_ce) * out.ce_loss + float(g_dist) * out.distill_loss
        if GL is not None:
            objective = objective + (out.logits * GL.detach().to(out.logits)).sum()
        objective.backward()
    finally:
        reference.l2_normalize = original

    def terms(v):
        total = torch.zeros_like(v[..., :1])
        for inp, o in calls:
            if inp is v and o.grad is not None:
                norm = torch.linalg.vector_norm(v.detach(), dim=-1, keepdim=True).clamp_min(reference.EPS)
                total = total + torch.linalg.vector_norm(o.grad, dim=-1, keepdim=True) / norm
        return total

    # The cross-entropy part reaches T, A, X through dL/du^[c] = tau sum_b G[b,c] x^[b] and
    # dL/dx^[b] = tau sum_c G[b,c] u^[c], sums that cancel; B G = g (p - q) + B G_logits with
    # p = softmax(s), g the cross-entropy's total cotangent. The terms of those sums, from the
    # float64 reference's p and q (their actual size, not a worst case):
    # * p = exp(s - lse) carries the absolute rounding of its exponent, eps |s| <= tau eps, so p
    #   has the relative error (1 + tau) eps where a product of terms would have eps: p enters
    #   with (1 + tau) eps, and once more with eps as a summand of the sum (|x^| = |u^| = 1);
    #   q is exact and enters as a summand only; B G_logits is an input (a summand only);
    # * so one entry's terms are T[b,c] = |g| ((2 + tau) p + q) + B |G_logits|, and (with the
    #   prefactor tau / B) dL/du^[c] has the terms tau / B sum_b T[b,c], dL/dx^[b] has
    #   tau / B sum_c T[b,c]; a normalisation divides them by |u| (= r[c]) or |x[b]|.
    # The per-class sum replaces the old worst case (every |G| at its bound 1/B: tau (1 + tau)
    # for every class), which is ~C/2 times larger on average and put the float32 floor of dA
    # at 1.2 % of max |dA| (a 1 % dA error passed). The floor's units (16) multiply these terms
    # as they multiply every other eps; the factor multiplies eps(compute) only (no half-
    # precision operand allowance on top: the old bf16 checks made the floors 100-700x too wide).
    with torch.no_grad():
        B = X.shape[0]
        w = torch.softmax(A, dim=-1)
        t_hat = original(T)
        u = torch.einsum("cm,cmd->cd", w, t_hat)
        r = torch.linalg.vector_norm(u, dim=-1).clamp_min(reference.EPS)
        n = torch.linalg.vector_norm(T, dim=-1).clamp_min(reference.EPS)
        xn = torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(reference.EPS)
        signed_tau = float(scale.detach().double()) if isinstance(scale, torch.Tensor) else float(scale)
        s = signed_tau * original(X) @ original(u).T
        p = torch.softmax(s, dim=-1)
        y = torch.as_tensor(args["labels"]).long()  # int32 labels are accepted by the ops
        q = torch.nn.functional.one_hot(y, C).double() * (1 - label_smoothing) + label_smoothing / C
        g_loss, g_ce, _, GL = cotangents if cotangents is not None else (1.0, 0.0, 0.0, None)
        g = abs(float(g_loss) + float(g_ce))
        terms_g = g * ((2 + tau) * p + q)
        if GL is not None:
            terms_g = terms_g + B * GL.detach().double().cpu().abs()
        du = (tau / B) * terms_g.sum(0) / r  # [C]: terms of du[c]
        mags["text_features"] = terms(T) + (w * du[:, None] / n)[..., None]
        mags["image_features"] = terms(X) + (tau / B) * terms_g.sum(1, keepdim=True) / xn
        mags["prompt_logits"] = 2 * w * du[:, None]
    return {k: (v.to(inputs["text_features"].device) if isinstance(v, torch.Tensor) else v)
            for k, v in mags.items()}


def ce_magnitudes(X: torch.Tensor, U: torch.Tensor, labels: torch.Tensor, scale: float, label_smoothing: float,
                  g: float) -> dict:
    """Magnitude of the terms behind the standalone cosine cross-entropy's output and gradients
    (class features U used as given), for the loss's cotangent g, from the float64 values:

    * ce_loss: summands up to |tau| + log C (logsumexp and the smoothed target's sum), + 1;
    * B G[b,c] = g (p - q) has the terms T[b,c] = |g| ((2 + tau) p + q) (derived in
      ``head_magnitudes``: p = exp(s - lse) carries (1 + tau) eps relative, and each entry is
      once more a summand);
    * dU[c] = tau / B sum_b B G[b,c] x^[b]: terms tau / B sum_b T[b,c] (|x^| = 1);
    * dX[b] = (dx^ - x^ <x^, dx^>) / |x[b]| with dx^ = tau / B sum_c B G[b,c] U[c]: terms
      tau / B sum_c T[b,c] |U[c]| / |x[b]| (the projection's terms are as large);
    * d tau = 1 / B sum B G cos: terms 1 / B sum_{b,c} T[b,c] |cos| <= 1 / B sum T (|cos| <= 1
      up to U's rounding).
    """
    tau = abs(float(scale))
    x, u = X.detach().double().cpu(), U.detach().double().cpu()
    B, C = x.shape[0], u.shape[0]
    xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    s = float(scale) * (x / xn) @ u.T
    p = torch.softmax(s, dim=-1)
    q = torch.nn.functional.one_hot(labels.cpu().long(), C).double() * (1 - label_smoothing) + label_smoothing / C
    terms = abs(float(g)) * ((2 + tau) * p + q)
    un = torch.linalg.vector_norm(u, dim=-1)
    return dict(ce_loss=tau + math.log(C) + 1.0, class_features=(tau / B) * terms.sum(0)[:, None],
                image_features=(tau / B) * (terms * un).sum(1, keepdim=True) / xn,
                scale=float(terms.sum()) / B)


def assert_same_trained_prompts(base: dict, got: dict, what: str, ulps: float = 64.0) -> None:
    """Trained prompts (``{"ctx", "prompt_logits"}`` as saved) of two runs that took the same
    steps on the same data and differ only in the order of float32 reductions (the world
    size): every element within ``ulps`` float32 epsilons of the prompts' scale, max |ctx|.

    The scale is the context's for both parameters: the reductions' rounding enters the
    gradients through the shared text features, whose size is the context's, and the prompt
    logits themselves can end small by cancellation over the epochs (then a bound on their
    own magnitude measures the cancellation, not the rounding). Data drawn differently on
    another world size (rank-dependent augmentation) gives errors of 1e-2 relative."""
    scale = float(base["ctx"].abs().max())
    for key in ("ctx", "prompt_logits"):
        err = float((base[key] - got[key]).abs().max())
        print(f"{what}, {key}: max |difference| {err:.3e}, max |ctx| {scale:.3e}")
        assert err <= ulps * torch.finfo(torch.float32).eps * scale, (what, key, err, scale)

"""Which implementation runs a call, and why.

Three backends implement the same four functions (aggregate_prompts,
cosine_cross_entropy, prompt_distill_loss, demul_head):

* ``"cuda"``   the compiled extension ``demul_fast._C`` (module ``demul_fast.ops.cuda_ops``),
               CUDA tensors of float32/bfloat16/float16;
* ``"triton"`` Triton kernels (module ``demul_fast.ops.triton_ops``), CUDA tensors, or CPU
               tensors under the Triton interpreter (``TRITON_INTERPRET=1``);
* ``"torch"``  the head in few eager PyTorch passes (``demul_fast.ops.torch_ops``: the
               K-free distillation of SPEC 4.3), computed in float32 (float64 stays
               float64): every device and dtype.

``backend=None`` picks the first available of a static order (``DEFAULT_ORDER_REASON``
says why): triton, then cuda, then torch on a GPU; torch on the CPU. ``DEMUL_FAST_BACKEND`` overrides that default. An explicitly
requested backend that cannot run the call raises ``BackendUnavailable`` saying why; the
automatic choice falls back. Whether a backend can run a call is its module's one
``capability`` function (demul_fast.ops.capability), asked once per call by ``select``. ``describe()`` reports all of this;
``python -m demul_fast`` prints it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .capability import Call, Capability

BACKENDS = ("cuda", "triton", "torch")
_MODULES = {
    "cuda": "demul_fast.ops.cuda_ops",
    "triton": "demul_fast.ops.triton_ops",
    "torch": "demul_fast.ops.torch_ops",
}
_loaded: Dict[str, Tuple[Optional[ModuleType], Optional[str]]] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    """Import a backend's module once; return (module, None) or (None, reason)."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = getattr(module, "UNAVAILABLE_REASON", None)
            _loaded[name] = (None, reason) if reason else (module, None)
        except ModuleNotFoundError as exc:
            if exc.name == _MODULES[name]:
                _loaded[name] = (None, f"{_MODULES[name]} is not part of this build")
            else:
                _loaded[name] = (None, f"import failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - the reason is reported to the user
            _loaded[name] = (None, f"import failed: {type(exc).__name__}: {exc}")
    return _loaded[name]


def preload() -> None:
    """Import every backend module now (demul_fast's import calls this), so that selecting a
    backend inside torch.compile'd code never has to import anything (dynamo cannot trace
    an import). Failures are recorded as reasons, never raised. ``TRITON_INTERPRET`` must
    therefore be set before demul_fast is imported."""
    for name in BACKENDS:
        _load(name)


def ask(name: str, call: Call) -> Capability:
    """Backend ``name``'s answer to ``call``: its module's ``capability(call)``
    (demul_fast.ops.capability), or why the module is not there."""
    if name not in BACKENDS:
        return Capability(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, reason = _load(name)
    if module is None:
        return Capability(reason)
    return module.capability(call)


def why_not(name: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if backend ``name`` can run a call on (device, dtype); else the reason it cannot."""
    return ask(name, Call(device, dtype)).reason


# Why the order on a GPU is what it is; printed by describe(). Evidence so far is
# compiled-code analysis only (modelled, docs/kernel-model.md): no GPU measurement has
# compared the two kernel backends yet. Change the order when one does.
DEFAULT_ORDER_REASON = (
    "static order, triton first: no GPU measurement compares the kernel backends yet; the Triton head "
    "is modelled from a trace of its loads and stores (docs/kernel-model.md), while the CUDA head's "
    "rows are formula counts that undercount its text backward's re-reads (its rewrite is pending), "
    "and the CUDA kernels use mma.sync with scalar operand loads against Triton's warpgroup MMA and "
    "vector loads, so cuda comes second until benchmarks/run.py on a GPU says otherwise")


def default_order(device: torch.device) -> Tuple[str, ...]:
    return ("triton", "cuda", "torch") if torch.device(device).type == "cuda" else ("torch",)


class Choice(NamedTuple):
    """The backend that runs a call: its name, its module, and its answer (whose ``plan``
    is what it worked out to answer)."""

    name: str
    module: ModuleType
    answer: Capability


def select(backend: Optional[str], device: torch.device, dtype: torch.dtype,
           call: Optional[Tuple[str, dict]] = None) -> Choice:
    """The backend that runs a call on (device, dtype).

    ``backend`` (or else ``DEMUL_FAST_BACKEND``) is an explicit request: it runs or raises
    ``BackendUnavailable`` with the backend's reason. With neither, the first of
    ``default_order(device)`` whose answer is yes. ``call`` = (function name, its tensor
    arguments by name) lets a backend refuse a particular call (a shape beyond its kernels'
    limits, a frozen input that requires grad); without it only (device, dtype) is asked.
    Each backend considered is asked once (``ask``): the requested one, or each of the
    default order up to the first that can.
    """
    fn, args = call if call is not None else (None, {})
    question = Call(device, dtype, fn, args)
    requested = backend if backend is not None else (os.environ.get("DEMUL_FAST_BACKEND") or None)
    if requested is not None:
        if not isinstance(requested, str) or requested not in BACKENDS:
            source = "backend" if backend is not None else "DEMUL_FAST_BACKEND"
            raise ValueError(f"{source} must be one of {', '.join(BACKENDS)} or None, got {requested!r}")
        answer = ask(requested, question)
        if answer.reason is not None:
            source = "" if backend is not None else " (from DEMUL_FAST_BACKEND)"
            raise BackendUnavailable(f"backend {requested!r}{source} is unavailable: {answer.reason}")
        return Choice(requested, _load(requested)[0], answer)
    for name in default_order(device):
        answer = ask(name, question)
        if answer.reason is None:
            return Choice(name, _load(name)[0], answer)
    raise BackendUnavailable("no backend can run this call")  # unreachable: torch always can


def report(device: Optional[torch.device] = None) -> Dict[str, dict]:
    """{backend: {"available": bool, "reason": str or None}} for ``device``
    (default: the current CUDA device if there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = {}
    for name in BACKENDS:
        reason = why_not(name, device)
        out[name] = {"available": reason is None, "reason": reason}
    return out


def describe(device: Optional[torch.device] = None) -> str:
    """A human-readable report: what is available, what is not and why, and the default."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    lines = [f"demul_fast backends for device {device} (torch {torch.__version__}, CUDA build {torch.version.cuda}):"]
    for name, info in report(device).items():
        status = "available" if info["available"] else f"unavailable: {info['reason']}"
        lines.append(f"  {name:7s} {status}")
    env = os.environ.get("DEMUL_FAST_BACKEND")
    if env:
        lines.append(f"  default: {env} (DEMUL_FAST_BACKEND)")
    else:
        default = next(n for n in default_order(device) if why_not(n, device) is None)
        lines.append(f"  default: {default}")
        if device.type == "cuda":
            lines.append(f"  why: {DEFAULT_ORDER_REASON}")
        else:
            lines.append("  why: the kernel backends are for GPUs (triton runs CPU tensors only in its interpreter)")
    ext, reason = _extension()
    lines.append(f"  extension demul_fast._C: {'built, ' + ext.compiled_with() if ext else reason}")
    return "\n".join(lines)


def _extension():
    """(the compiled extension module, None) or (None, why it is not there)."""
    try:
        from demul_fast import _C  # noqa: PLC0415
        return _C, None
    except ImportError as exc:
        return None, f"not built ({exc}); reinstall with DEMUL_FAST_BUILD_CUDA=1 to see why"


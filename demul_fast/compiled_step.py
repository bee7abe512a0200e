"""A whole DeMul training step as compiled code: forward, backward, optimizer (docs/step.md).

On a GPU a DeMul step at the sizes of CoOp's benchmarks is launch-bound: about a thousand
eager kernel launches around about a millisecond of matrix work. ``TrainStep`` runs it as

* the forward (the frozen image tower when given images, the text encoder, the head) as
  one ``torch.compile(fullgraph=True, dynamic=False)`` graph; its backward is the graph
  AOTAutograd derived from it (``loss.backward()`` runs that compiled graph);
* the optimizer update as one compiled graph of the optimizer's ``step`` (fullgraph; the
  learning rate is a 0-dim tensor, so a new rate per epoch changes a value, not the graph;
  the very first update, which creates the optimizer's state, runs eagerly);
* with ``mode="reduce-overhead"`` the forward and backward graphs replay as CUDA graphs.

Nothing in a step reads the device: the prompt plan (packed layout, distillation basis)
is decided outside the step (``DeMulModule.plan``, guarded by identity and version
counters and re-checked on the host before every step), value checks are device asserts
under compile (``demul_fast.ops.validate``), and the per-step loss, its parts and the
correct count are summed on the device (``totals``) and read only when asked
(``read_totals``: every N steps for a progress line, and at the end of an epoch).

Static shapes: a batch whose size differs from ``batch_size`` (the last, partial batch of
an epoch) runs the *eager* forward and backward of the same module, then the same compiled
optimizer update: no recompile, and every image contributes to that step exactly as in an
eager run (same batches, same order; compiled code differs from eager only by float
rounding in the full batches).

``mode="none"`` runs the same loop eagerly (the default on a CPU); ``compile_mode(...)``
resolves the default per device. GradScaler (float16 autocast) keeps the eager optimizer
step: its found-inf check reads the device (bfloat16 needs no scaler).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
TOTAL_KEYS = ("loss", "ce_loss", "distill_loss", "correct", "n")


def compile_mode(requested: Optional[str], device: torch.device) -> str:
    """The compile mode a run uses: ``requested``, or the default for the device
    (``reduce-overhead`` on CUDA, ``none`` elsewhere: on a CPU the step is matmul-bound
    and a compile costs about a minute)."""
    if requested is None:
        return "reduce-overhead" if torch.device(device).type == "cuda" else "none"
    if requested not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {requested!r}")
    return requested


def _env_backend() -> Optional[str]:
    """``DEMUL_FAST_COMPILE_BACKEND`` (e.g. aot_eager: the same graphs without inductor's code
    generation, for tests and debugging), or None for inductor."""
    return os.environ.get("DEMUL_FAST_COMPILE_BACKEND") or None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor rate is filled in place (a compiled
    optimizer step guards on the tensor, not its value: no recompile per epoch)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Make every group's learning rate a 0-dim float32 tensor on its parameters' device
    (after ``load_state_dict``, which writes the saved float back)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=group["params"][0].device)


def lr_value(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr)


class TrainStep:
    """Forward + backward + optimizer update of a DeMul module, compiled or eager.

    module:       a ``DeMulModule`` (``demul_fast.DeMul`` or ``model.DeMulReference``)
    optimizer:    its optimizer (SGD as CoOp; any ``torch.optim`` optimizer whose ``step``
                  compiles). Its learning rate becomes a tensor when compiled (``set_lr``)
    mode:         one of ``COMPILE_MODES``; "none" is the eager step
    batch_size:   the full batch; other sizes (the last batch) run eagerly (module docstring)
    encode_images: images -> features [B, D] of the frozen image tower (run without
                  gradient, inside the compiled forward), or None when steps get features
    autocast:     a dtype for ``torch.autocast`` on the module's device, or None
    scaler:       a ``torch.amp.GradScaler`` (float16), or None
    backend:      torch.compile backend (default inductor; tests pass a counting backend)
    forward, after_backward: eager mode only: (features, labels) -> HeadOutput instead of
                  ``module(image_features=..., labels=...)``, and a call after the backward
                  (a sharded module and its gradient reduction, ``demul_fast.sharded``)
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, mode: str = "default",
                 batch_size: Optional[int] = None, encode_images: Optional[Callable] = None,
                 autocast: Optional[torch.dtype] = None, scaler=None, backend=None,
                 forward: Optional[Callable] = None, after_backward: Optional[Callable] = None):
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        if mode != "none" and (forward is not None or after_backward is not None):
            raise ValueError("a custom forward or after_backward (several processes) runs eagerly only: "
                             "use mode='none'")
        self.module, self.optimizer, self.mode = module, optimizer, mode
        self.forward_fn, self.after_backward = forward, after_backward
        self.batch_size, self.encode_images = batch_size, encode_images
        self.autocast, self.scaler = autocast, scaler
        self.device = module.ctx.device
        self.totals = torch.zeros(len(TOTAL_KEYS), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.eager_steps = 0
        self._t0 = time.perf_counter()
        self._steps_at_t0 = 0
        self._opt_step = None  # the compiled update (None: the optimizer's own step)
        if mode == "none":
            self._forward = self._forward_eager
            return
        backend = backend or _env_backend()
        opts = {} if backend is not None else {"mode": None if mode == "default" else mode}
        kw = dict(fullgraph=True, dynamic=False, **({"backend": backend} if backend is not None else opts))
        self._forward = torch.compile(self._forward_eager, **kw)
        if scaler is None:
            tensor_lr(optimizer)
            # the update is a handful of foreach kernels: no CUDA graph of its own
            okw = dict(fullgraph=True, dynamic=False)
            if backend is not None:
                okw["backend"] = backend
            self._opt_step = torch.compile(self._update, **okw)

    # -- the step ------------------------------------------------------------------------
    def _update(self) -> None:
        """The optimizer's own update, without the wrapper ``torch.optim`` puts around
        ``step`` (it inserts graph breaks around the update so that AOTAutograd sees no_grad;
        here no_grad is set inside the one graph). Hooks registered on the step do not run."""
        with torch.no_grad():
            inspect.unwrap(type(self.optimizer).step)(self.optimizer)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _forward_eager(self, inputs: torch.Tensor, labels: torch.Tensor):
        """(loss, stats [5] float64: loss*n, ce*n, distill*n, correct, n) of one batch."""
        with self._autocast():
            if self.encode_images is not None:
                with torch.no_grad():
                    feats = self.encode_images(inputs)
            else:
                feats = inputs
            if self.forward_fn is None:
                out = self.module(image_features=feats, labels=labels)
            else:
                out = self.forward_fn(feats, labels)
        n = labels.shape[0]
        with torch.no_grad():
            correct = (out.logits.argmax(-1) == labels).sum()
            parts = torch.stack([out.loss.detach().double(), out.ce_loss.detach().double(),
                                 out.distill_loss.detach().double()]) * n
            stats = torch.cat([parts, torch.stack([correct.double(), parts.new_full((), n)])])
        return out.loss, stats

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """One training step on a batch (images if ``encode_images`` was given, else image
        features [B, D]) and labels [B]. Reads nothing back from the device."""
        self.module.plan()  # host-side key checks; re-plans only if the frozen state changed
        full = self.batch_size is None or labels.shape[0] == self.batch_size
        forward = self._forward if full else self._forward_eager
        if not full or self.mode == "none":
            self.eager_steps += 1
        if self.mode == "reduce-overhead" and full and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        loss, stats = forward(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.after_backward is not None:
            self.after_backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self._opt_step is not None and self.steps > 0:
            self._opt_step()
        else:  # eager; and the first update of a compiled run, which creates the optimizer's state
            self.optimizer.step()
        self.totals.add_(stats)  # consumes the graph's output before its next replay
        self.steps += 1

    # -- reading the totals ----------------------------------------------------------------
    def read_totals(self, reset: bool = False) -> Dict[str, float]:
        """The summed loss parts, correct count and images since the last reset, and
        ``steps_per_s`` since the last read: one host synchronisation (call it every N
        steps and at the end of an epoch, never per step)."""
        values = self.totals.tolist()
        now = time.perf_counter()
        out = dict(zip(TOTAL_KEYS, values))
        out["steps_per_s"] = (self.steps - self._steps_at_t0) / max(now - self._t0, 1e-9)
        self._t0, self._steps_at_t0 = now, self.steps
        if reset:
            self.totals.zero_()
        return out

    def reset_totals(self) -> None:
        self.totals.zero_()

    def load_totals(self, totals: Dict[str, float]) -> None:
        """Set the totals (``read_totals``' TOTAL_KEYS), e.g. an epoch's sums at a checkpoint."""
        self.totals.copy_(torch.tensor([float(totals[k]) for k in TOTAL_KEYS], dtype=torch.float64))

    @staticmethod
    def means(totals: Dict[str, float]) -> Dict[str, float]:
        """Per-image means of the loss parts and the accuracy (%) of summed totals."""
        n = max(totals["n"], 1.0)
        return {"loss": totals["loss"] / n, "ce_loss": totals["ce_loss"] / n,
                "distill_loss": totals["distill_loss"] / n, "train_acc": 100.0 * totals["correct"] / n}


class CompiledEval:
    """Evaluation with the same compile mode: the frozen image tower over batches of
    ``batch_size`` (a smaller last batch runs eagerly) and the class features u^ [C, D]
    of the current prompts (one text-encoder forward without gradient)."""

    def __init__(self, module: nn.Module, encode_images: Optional[Callable], mode: str,
                 batch_size: Optional[int] = None, autocast: Optional[torch.dtype] = None, backend=None):
        self.module, self.mode, self.batch_size, self.autocast = module, mode, batch_size, autocast
        self._encode_eager = encode_images
        self.device = module.ctx.device
        if mode == "none":
            self._encode, self._features = encode_images, self._class_features_eager
            return
        kw = dict(fullgraph=True, dynamic=False)
        backend = backend or _env_backend()
        if backend is not None:
            kw["backend"] = backend
        elif mode != "default":
            kw["mode"] = mode
        self._encode = None if encode_images is None else torch.compile(encode_images, **kw)
        self._features = torch.compile(self._class_features_eager, **kw)

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        full = self.batch_size is None or images.shape[0] == self.batch_size
        if self.mode == "reduce-overhead" and full and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with self._ctx():
            out = (self._encode if full else self._encode_eager)(images)
        return out.float().clone()  # a CUDA graph's output is overwritten by its next replay

    def _class_features_eager(self) -> torch.Tensor:
        return self.module.head.class_features(self.module.text_features())

    @torch.no_grad()
    def class_features(self) -> torch.Tensor:
        self.module.plan()
        if self.mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._features().float().clone()


__all__ = ["COMPILE_MODES", "CompiledEval", "TrainStep", "compile_mode", "lr_value", "set_lr", "tensor_lr"]

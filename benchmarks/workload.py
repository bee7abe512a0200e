"""What a benchmark case is: a workload (inputs, reference, cost) and its providers.

A *workload* is one computation at one size, dtype and device (the head's ``distill``
op, the text encoder, a training step). It makes input sets, knows which outputs and
gradients to compare, computes the gold reference (float64, or float32 where float64 does
not fit), and gives the floor's cost model per mode. A *provider* is one implementation
of it: a callable ``fn(inputs) -> result`` or the reason it cannot run here.

Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (the backward
of a forward run beforehand, ``retain_graph=True``), ``fwd+bwd``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .floors import Cost

MODES = ("fwd", "bwd", "fwd+bwd")
Inputs = Dict[str, object]


@dataclass
class Provider:
    """One implementation of a workload.

    fn:      inputs -> result (None when unavailable)
    reason:  why it cannot run here (None when available)
    params:  inputs -> {name: tensor whose .grad is compared and reset}; default: the
             workload's ``grad_names`` in the inputs
    note:    how the provider was set up (for the JSON)
    launches: inputs -> {"launches": kernel launches of one call, ...} counted (not timed:
             benchmarks/launches.py), or None; run before the provider's first call
    """

    name: str
    fn: Optional[Callable[[Inputs], object]] = None
    reason: Optional[str] = None
    params: Optional[Callable[[Inputs], Dict[str, torch.Tensor]]] = None
    note: str = ""
    launches: Optional[Callable[[Inputs], Dict[str, object]]] = None


def unavailable(name: str, reason: str) -> Provider:
    return Provider(name=name, reason=reason)


@dataclass
class Workload:
    """One computation at one size; see the module docstring.

    make_inputs(i):     the i-th input set (fresh random values, never zeros)
    outputs(result):    {name: tensor} forward outputs compared by the gate
    root(result, inp):  (tensor, gradient or None) that backward starts from
    gold(inp):          {name: tensor} reference outputs and ``grad:<name>`` gradients
    cost(mode):         floors.Cost of one call
    input_bytes:        bytes of one input set (decides the rotation)
    """

    suite: str
    op: str
    sizes: Dict[str, object]
    dtype: torch.dtype
    device: torch.device
    make_inputs: Callable[[int], Inputs]
    outputs: Callable[[object], Dict[str, torch.Tensor]]
    root: Callable[[object, Inputs], Tuple[torch.Tensor, Optional[torch.Tensor]]]
    gold: Callable[[Inputs], Dict[str, torch.Tensor]]
    cost: Callable[[str], Cost]
    input_bytes: int
    grad_names: Tuple[str, ...] = ()
    providers: List[Provider] = field(default_factory=list)
    gold_dtype: torch.dtype = torch.float64
    modes: Tuple[str, ...] = MODES

    def params(self, provider: Provider, inputs: Inputs) -> Dict[str, torch.Tensor]:
        if provider.params is not None:
            return provider.params(inputs)
        return {n: inputs[n] for n in self.grad_names}


def run_once(workload: Workload, provider: Provider, inputs: Inputs) -> Dict[str, torch.Tensor]:
    """Forward and backward once on fresh gradients; {output name: tensor, grad:<name>: grad}."""
    params = workload.params(provider, inputs)
    for p in params.values():
        p.grad = None
    result = provider.fn(inputs)
    out = dict(workload.outputs(result))
    root, grad = workload.root(result, inputs)
    root.backward(grad)
    for name, p in params.items():
        out[f"grad:{name}"] = p.grad
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def gold_inputs(inputs: Inputs, dtype: torch.dtype, grad_names: Tuple[str, ...]) -> Inputs:
    """Copies of the floating inputs in ``dtype`` (leaves; grad_names require grad)."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype).requires_grad_(name in grad_names)
        out[name] = value
    return out

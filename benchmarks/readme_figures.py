"""The README's modelled headline figures, rendered from the committed reports.

    python -m benchmarks.readme_figures            # rewrite README.md's headline rows in place
    python -m benchmarks.readme_figures --check    # exit 1 if README.md differs from its rendering

The headline table of README.md sits between ``<!-- headline -->`` and ``<!-- /headline -->``.
The rows this module renders (keyed by their first cell's start, ``ROWS``) are rewritten
from:

* ``benchmarks/results/compiled/imagenet.json`` (the trace-based kernel model,
  docs/kernel-model.md): the Triton head at the ImageNet preset, H100 SXM / H200, X frozen;
  its floor, the eager reference and torch.compile of it; the old per-tensor model's figure;
* ``benchmarks/results/compiled/imagenet21k.json`` (the same model at ImageNet-21k; an old-format
  report of the per-tensor model is rendered as such);
* the step model (benchmarks/step_model.py) on ``benchmarks/results/step-cpu.jsonl`` and
  ``benchmarks/results/step_fixed_counts.json``: a training step from image features at C=100
  on the H100, and the counted launches of eager and compiled DeMul.

The table between ``<!-- kernel-model -->`` and ``<!-- /kernel-model -->`` is rendered whole
(``kernel_model_table``): the head per backend and mode, modelled per card from the same
reports, beside a measured-on-GPU column filled from ``benchmarks/results/gpu/*/imagenet-cuda.jsonl``
(benchmarks/gpu_check.sh's rows, committed per device and date) and empty until then.

Every other row (the measured ones) is kept as written. tests/test_readme_figures.py fails
when README.md differs from its rendering: a regenerated report that changes a figure fails
CI until this command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, Optional

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here] + [os.path.dirname(_here)]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- headline -->", "<!-- /headline -->"
STEP_C, STEP_MACHINE = 100, "H100 SXM"
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "f32"}


def _load(name: str) -> dict:
    with open(os.path.join(RESULTS, "compiled", name)) as f:
        return json.load(f)


def _sizes(rep: dict, keys: str = "CMDBK") -> str:
    return ", ".join(f"{k}={rep['sizes'][k]}" for k in keys)


def _int(x: float) -> str:
    return f"{round(x):,}"


def _pair(a: float, b: float, fmt: Callable[[float], str]) -> str:
    """'a / b', or one figure where the two cards agree at the printed precision."""
    return fmt(a) if fmt(a) == fmt(b) else f"{fmt(a)} / {fmt(b)}"


def imagenet_row() -> str:
    rep = _load("imagenet.json")
    h100, h200 = rep["cards"]["h100"], rep["cards"]["h200"]
    mode = "frozen"

    def one(d):
        return f"{d:.1f}"
    head = f"{one(h100['head_fwd_bwd_us_by_backend']['triton'][mode])} / " \
           f"{one(h200['head_fwd_bwd_us_by_backend']['triton'][mode])}"
    floor = _pair(h100["floor_by_mode"][mode], h200["floor_by_mode"][mode], one)
    eager = f"{_int(h100['eager_by_mode'][mode])} / {_int(h200['eager_by_mode'][mode])}"
    comp = f"{_int(h100['compile_by_mode'][mode])} / {_int(h200['compile_by_mode'][mode])}"
    old = rep["old_model"]["head_fwd_bwd_us"]["triton"]
    return (f"| `demul_head` fwd+bwd, Triton, ImageNet preset ({_sizes(rep)}), {DTYPE_SHORT.get(rep['dtype'], rep['dtype'])}, X frozen, "
            f"H100 SXM / H200 | {head} us (floor {floor}; eager {eager} us; torch.compile of the reference "
            f"{comp} us); the old per-tensor model said {one(old)} us | modelled from a trace of the kernels' "
            "loads and stores | [docs/kernel-model.md](docs/kernel-model.md) |")


def imagenet21k_row() -> str:
    rep = _load("imagenet21k.json")
    if "cards" in rep:  # the trace-based model (issue 26)
        h100, h200 = rep["cards"]["h100"], rep["cards"]["h200"]
        mode = "frozen"
        head = _pair(h100["head_fwd_bwd_us_by_backend"]["triton"][mode],
                     h200["head_fwd_bwd_us_by_backend"]["triton"][mode], _int)
        floor = _pair(h100["floor_by_mode"][mode], h200["floor_by_mode"][mode], _int)
        eager = f"{_int(h100['eager_by_mode'][mode])} / {_int(h200['eager_by_mode'][mode])}"
        comp = f"{_int(h100['compile_by_mode'][mode])} / {_int(h200['compile_by_mode'][mode])}"
        return (f"| the same at ImageNet-21k ({_sizes(rep, 'CMB')}), H100 SXM / H200 | {head} us (floor {floor} us; "
                f"eager {eager} us; torch.compile of the reference {comp} us) | modelled from a trace of the "
                "kernels' loads and stores | [docs/kernel-model.md](docs/kernel-model.md) |")
    return (f"| the same at ImageNet-21k ({_sizes(rep, 'CMB')}), old per-tensor model (not yet regenerated) | "
            f"{_int(rep['head_fwd_bwd_us_by_backend']['triton'])} us (floor {_int(rep['floor_us'])} us; "
            f"eager {_int(rep['eager_fwd_bwd_us'])} us) | modelled (old model, optimistic) | "
            "[docs/kernels.md](docs/kernels.md#compiled-code-modelled-not-measured) |")


def step_row() -> str:
    from benchmarks import step_model

    counts = step_model.load_counts(os.path.join(RESULTS, "step-cpu.jsonl"))
    with open(os.path.join(RESULTS, "step_fixed_counts.json")) as f:
        fixed = json.load(f)
    rows = {r.way: r for r in step_model.model_rows({STEP_C: counts[STEP_C]}, fixed) if r.machine == STEP_MACHINE}
    ms = " / ".join(f"{rows[w].step_ms_features:.2f}" for w in ("eager", "compiled", "graphs"))
    c = counts[STEP_C]
    return (f"| a DeMul training step from image features, C={STEP_C}, ViT-B/16, {STEP_MACHINE.split()[0]}: "
            f"eager / compiled / compiled + CUDA graphs | {ms} ms (full-length reference "
            f"{rows['reference'].step_ms_features:.2f} ms) | modelled from counted launches "
            f"({c['demul-torch']} eager, {c['demul-torch-compile']} compiled) | [docs/step.md](docs/step.md) |")


KM_BEGIN, KM_END = "<!-- kernel-model -->", "<!-- /kernel-model -->"
GPU_RESULTS = os.path.join(RESULTS, "gpu")  # benchmarks/gpu_check.sh's files, committed per device and date


def measured_heads() -> Dict[str, str]:
    """{backend: "<time> us (<device>, <date>)"}: the newest committed GPU measurement of
    demul_head fwd+bwd at the imagenet preset in bfloat16 (X frozen, as benchmarks/head.py
    runs it), from benchmarks/results/gpu/*/imagenet-cuda.jsonl (benchmarks/gpu_check.sh's
    rows); {} while no GPU has run it."""
    import glob

    found: Dict[str, tuple] = {}
    for path in sorted(glob.glob(os.path.join(GPU_RESULTS, "*", "imagenet-cuda.jsonl"))):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if (r.get("suite"), r.get("op"), r.get("mode"), r.get("dtype"), r.get("preset"), r.get("status")) != \
                        ("head", "demul_head", "fwd+bwd", "bfloat16", "imagenet", "ok"):
                    continue
                date = r.get("date", "")
                if r["provider"] not in found or date > found[r["provider"]][0]:
                    found[r["provider"]] = (date, f"{r['time_ms'] * 1e3:.1f} us ({r.get('device_name', '?')}, "
                                                  f"{date[:10]})")
    return {k: v[1] for k, v in found.items()}


def kernel_model_table() -> str:
    """The head at the ImageNet preset, each backend and mode: the trace-based model per card
    beside the measured-on-GPU column (empty until benchmarks/gpu_check.sh's results are
    committed under benchmarks/results/gpu/), and ImageNet-21k."""
    rep, rep21 = _load("imagenet.json"), _load("imagenet21k.json")
    measured = measured_heads()
    lines = [f"| `demul_head` fwd+bwd, {DTYPE_SHORT.get(rep['dtype'], rep['dtype'])} | H100 SXM, modelled | "
             "H200, modelled | measured on GPU |", "|---|---:|---:|---|"]
    for r, name in ((rep, f"ImageNet preset ({_sizes(rep)})"), (rep21, f"ImageNet-21k ({_sizes(rep21, 'CMB')})")):
        if "cards" not in r:
            continue
        h100, h200 = r["cards"]["h100"], r["cards"]["h200"]
        for backend in ("triton", "cuda"):
            if backend not in h100["head_fwd_bwd_us_by_backend"]:
                continue
            for mode, what in (("frozen", "X frozen"), ("trained", "X trained")):
                a = h100["head_fwd_bwd_us_by_backend"][backend][mode]
                b = h200["head_fwd_bwd_us_by_backend"][backend][mode]
                meas = measured.get(backend, "") if r is rep and mode == "frozen" else ""
                lines.append(f"| {name}, {'Triton' if backend == 'triton' else 'CUDA'}, {what} | {a:.1f} us | "
                             f"{b:.1f} us | {meas} |")
        floor = (r["cards"]["h100"]["floor_by_mode"], r["cards"]["h200"]["floor_by_mode"])
        lines.append(f"| {name}, floor (the SPEC 4.3 work at the ceilings), X frozen / trained | "
                     f"{floor[0]['frozen']:.1f} / {floor[0]['trained']:.1f} us | "
                     f"{floor[1]['frozen']:.1f} / {floor[1]['trained']:.1f} us | |")
    return "\n".join(lines)


# first cell's start -> renderer
ROWS: Dict[str, Callable[[], str]] = {
    "| `demul_head` fwd+bwd, Triton, ImageNet preset": imagenet_row,
    "| the same at ImageNet-21k": imagenet21k_row,
    "| a DeMul training step from image features": step_row,
}


def render(readme: str) -> str:
    """README text with the rendered rows replaced between the markers; every key of ROWS
    must match exactly one row there."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README.md needs one {BEGIN} ... {END} block around the headline table")
    start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    lines = readme[start:stop].split("\n")
    for key, fn in ROWS.items():
        hits = [i for i, ln in enumerate(lines) if ln.startswith(key)]
        if len(hits) != 1:
            raise ValueError(f"the headline table has {len(hits)} rows starting with {key!r} (want 1)")
        lines[hits[0]] = fn()
    readme = readme[:start] + "\n".join(lines) + readme[stop:]
    if readme.count(KM_BEGIN) != 1 or readme.count(KM_END) != 1 or readme.index(KM_BEGIN) > readme.index(KM_END):
        raise ValueError(f"README.md needs one {KM_BEGIN} ... {KM_END} block around the kernel-model table")
    start, stop = readme.index(KM_BEGIN) + len(KM_BEGIN), readme.index(KM_END)
    return readme[:start] + "\n" + kernel_model_table() + "\n" + readme[stop:]


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 (printing the rows) if the README differs")
    args = p.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = render(text)
    if args.check:
        if new != text:
            changed = [ln for ln in new.split("\n") if ln not in text.split("\n")]
            print("README.md's headline figures differ from the reports; run python -m benchmarks.readme_figures\n"
                  + "\n".join(changed))
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    print("README.md headline rows " + ("rewritten" if new != text else "unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

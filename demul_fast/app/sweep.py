"""The paper's protocol (``demul-fast sweep``): DeMul on datasets x shot counts x seeds in
CoOp's layouts, zero-shot CLIP beside it, then the table and the plot.

    out/<dataset>/shots_<K>/seed_<S>/   one ``demul-fast train`` run folder each
    out/<dataset>/zeroshot.json         zero-shot CLIP on the test split
    out/results.md, out/results.csv     top-1 (%) per dataset and the average over datasets,
                                        mean ± std over seeds per shot count
    out/accuracy_vs_shots.png           top-1 against shots, one panel per dataset + average

Resumable: a finished run (its log reaches the requested epochs) is read, not retrained; an
interrupted one continues from its last epoch (``train --resume``); one that never finished
an epoch starts again. A run folder trained with other settings stops the sweep before
anything runs. A run's number is its last epoch's test top-1 (CoOp evaluates the last
model). The std is the population std over seeds (numpy's default, as CoOp's
parse_test_res.py); the average's mean and std are over seeds of the per-seed mean over
datasets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Sequence

from ..data import DataError, coop_layouts
from . import runtime
from .runtime import MissingExtra
from .checkpoint import write_json
from .config import TrainConfig
from .run_folder import RUN_FILE, run_log
from .train import train
from .zeroshot import zeroshot

RESULTS_MD, RESULTS_CSV, PLOT_FILE = "results.md", "results.csv", "accuracy_vs_shots.png"
ZEROSHOT_FILE = "zeroshot.json"
METHOD, ZS_METHOD, AVERAGE = "DeMul", "Zero-shot CLIP", "Average"
# settings that do not change a run's result (where it is, how it is loaded and shown)
RUN_ONLY = ("data", "out", "root", "resume", "overwrite", "progress", "workers", "device", "eval_batch_size", "extra")


def parse_ints(text: str, what: str) -> List[int]:
    """"1,2,4" -> [1, 2, 4]: distinct integers >= 1, in the given order."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"{what} must be distinct integers >= 1, got {text!r}")
    return values


def run_folder(out, dataset: str, shots: int, seed: int) -> Path:
    return Path(out) / dataset / f"shots_{shots}" / f"seed_{seed}"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra("the sweep's plot needs matplotlib: pip install matplotlib (the 'sweep' extra)") from None


def _differing(saved: dict, cfg: TrainConfig) -> str:
    """The first setting (other than RUN_ONLY) in which a saved run's config differs, or ""."""
    for key, value in asdict(cfg).items():
        if key not in RUN_ONLY and saved.get(key) != value:
            return f"{key} {saved.get(key)!r} (asked: {value!r})"
    return ""


def run_state(folder: Path, cfg: TrainConfig) -> str:
    """"new", "done", "resume" (an epoch or more finished) or "restart" (none finished);
    raises DataError for a run folder trained with other settings."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return "new"
    try:
        epochs = run_log(folder)
        if epochs is None:
            return "restart"
        saved = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"run folder {folder} cannot be read ({type(exc).__name__}: {exc}); move it away") from exc
    diff = _differing(saved, cfg)
    if diff:
        raise DataError(f"run folder {folder} was trained with other settings: {diff}; use another --out")
    return "done" if epochs and epochs[-1]["epoch"] >= cfg.epochs else "resume"


def final_top1(folder: Path) -> float:
    """The test top-1 (%) of a finished run's last epoch."""
    epochs = run_log(folder)
    last = epochs[-1] if epochs else {}
    if "test_acc" not in last:
        raise DataError(f"run folder {folder} has no test accuracy in its log")
    return float(last["test_acc"])


def _check_zeroshot(path: Path, base: TrainConfig) -> dict:
    """A saved zero-shot result ({} when none), refused when it is of another model."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        float(saved["top1"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}); move it away") from exc
    if (saved.get("model"), saved.get("pretrained")) != (base.model, base.pretrained):
        raise DataError(f"{path} holds zero-shot CLIP of {saved.get('model')} / {saved.get('pretrained')}, not "
                        f"{base.model} / {base.pretrained}; use another --out")
    return saved


def _zeroshot_result(path: Path, base: TrainConfig, name: str) -> dict:
    """The saved zero-shot result, computed and saved first when missing."""
    saved = _check_zeroshot(path, base)
    if saved:
        return saved
    result = zeroshot(name, base.root, model=base.model, pretrained=base.pretrained, device=base.device,
                      precision=base.precision, batch_size=base.eval_batch_size, workers=base.workers,
                      init_seed=base.init_seed, progress=base.progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


def sweep(base: TrainConfig, names: Sequence[str], shots: Sequence[int], seeds: Sequence[int], out,
          with_zeroshot: bool = True) -> dict:
    """Run the grid (``base`` gives every training setting but dataset, shots, seed, out),
    write the table and the plot to ``out``; returns ``summarize``'s result.

    Every dataset's split, the shot counts, matplotlib and the existing run folders are
    checked before the first run starts."""
    _require_matplotlib()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    for name in names:
        coop_layouts.check_shots(coop_layouts.read(name, base.root), max(shots), base.allow_fewer)
    grid = [(name, k, s) for name in names for k in shots for s in seeds]
    configs = {key: replace(base, dataset=key[0], shots=key[1], seed=key[2], data=None, out=str(run_folder(out, *key)),
                            resume=False, overwrite=False) for key in grid}
    states = {key: run_state(Path(cfg.out), cfg) for key, cfg in configs.items()}
    for name in names if with_zeroshot else ():
        _check_zeroshot(out / name / ZEROSHOT_FILE, base)

    zs = {}
    for i, key in enumerate(grid):
        name, k, s = key
        if with_zeroshot and name not in zs:
            zs[name] = _zeroshot_result(out / name / ZEROSHOT_FILE, base, name)["top1"]
            runtime.log(f"{name}: zero-shot CLIP {zs[name]:.2f}%", base.progress)
        state = states[key]
        runtime.log(f"[{i + 1}/{len(grid)}] {name}, {k} shots, seed {s}: "
             + {"done": "finished before", "resume": "resuming", "restart": "restarting", "new": "training"}[state],
             base.progress)
        if state != "done":
            train(replace(configs[key], resume=state == "resume", overwrite=state == "restart"))
    records = [{"dataset": name, "shots": k, "seed": s, "top1": final_top1(run_folder(out, name, k, s))}
               for name, k, s in grid]
    summary = summarize(records, zs, names, shots, seeds)
    header = (f"{base.model} ({base.pretrained}), {base.prompts} prompts x {base.n_ctx} context tokens, "
              f"{base.epochs} epochs, alpha {base.alpha}")
    _write_text(out / RESULTS_MD, markdown_table(summary, header))
    _write_text(out / RESULTS_CSV, csv_table(summary))
    plot(summary, out / PLOT_FILE)
    runtime.log(f"results: {out / RESULTS_MD}, {out / RESULTS_CSV}, {out / PLOT_FILE}", base.progress)
    return summary


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "values": list(values)}


def summarize(records: Sequence[dict], zs: Dict[str, float], names: Sequence[str], shots: Sequence[int],
              seeds: Sequence[int]) -> dict:
    """Mean ± std over seeds per (dataset, shots), and the average over datasets.

    records: [{"dataset", "shots", "seed", "top1"}] covering names x shots x seeds
    zs:      {dataset: zero-shot top-1}, empty without zero-shot
    returns {"datasets", "shots", "seeds", "demul": {dataset: {shots: cell}}, "average": {shots: cell},
             "zeroshot": {dataset: top1}, "zeroshot_average": top1 or None}
             with cell = {"mean", "std", "values" (one per seed, in seed order)}"""
    acc = {(r["dataset"], r["shots"], r["seed"]): r["top1"] for r in records}
    demul = {d: {k: _cell([acc[d, k, s] for s in seeds]) for k in shots} for d in names}
    average = {k: _cell([statistics.fmean(acc[d, k, s] for d in names) for s in seeds]) for k in shots}
    return {"datasets": list(names), "shots": list(shots), "seeds": list(seeds), "demul": demul, "average": average,
            "zeroshot": dict(zs), "zeroshot_average": statistics.fmean(zs[d] for d in names) if zs else None}


def _shot_label(k: int) -> str:
    return f"{k} shot" if k == 1 else f"{k} shots"


def markdown_table(summary: dict, header: str) -> str:
    """The paper's table: one row per dataset and the average, a column per shot count."""
    has_zs = summary["zeroshot_average"] is not None
    cols = ["Dataset"] + ([ZS_METHOD] if has_zs else []) + [f"{METHOD} {_shot_label(k)}" for k in summary["shots"]]
    lines = [f"# {METHOD} few-shot top-1 accuracy (%)", "",
             f"{header}; seeds {', '.join(map(str, summary['seeds']))}: mean ± std over seeds (population std, as "
             "CoOp's parse_test_res.py); the average is over datasets.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    rows = [(coop_layouts.LAYOUTS[d].title, summary["demul"][d], summary["zeroshot"].get(d))
            for d in summary["datasets"]]
    rows.append((f"**{AVERAGE}**", summary["average"], summary["zeroshot_average"]))
    for title, cells, zs in rows:
        values = ([f"{zs:.2f}"] if has_zs else []) + [f"{cells[k]['mean']:.2f} ± {cells[k]['std']:.2f}"
                                                        for k in summary["shots"]]
        lines.append("| " + " | ".join([title] + values) + " |")
    return "\n".join(lines) + "\n"


def csv_table(summary: dict) -> str:
    """One row per (method, dataset, shots): mean, std, seed count and the per-seed values;
    zero-shot CLIP as shots 0."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "dataset", "shots", "mean", "std", "n_seeds", "values"])
    rows = [(d, summary["demul"][d], summary["zeroshot"].get(d)) for d in summary["datasets"]]
    rows.append((AVERAGE, summary["average"], summary["zeroshot_average"]))
    for name, cells, zs in rows:
        if zs is not None:
            w.writerow([ZS_METHOD, name, 0, f"{zs:.4f}", "", "", ""])
        for k in summary["shots"]:
            c = cells[k]
            w.writerow([METHOD, name, k, f"{c['mean']:.4f}", f"{c['std']:.4f}", len(c["values"]),
                        ";".join(f"{v:.4f}" for v in c["values"])])
    return buf.getvalue()


def plot(summary: dict, path) -> Dict[str, Dict[str, tuple]]:
    """Top-1 against shots (log2 axis), the average first and then one panel per dataset:
    DeMul's mean with ± std bars, zero-shot CLIP as a dashed line. Writes a PNG; returns
    the lines each panel holds, read back from the figure: {panel title: {method: (x values,
    y values)}} (zero-shot's x values are the axes fractions 0 and 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{AVERAGE} over {len(summary['datasets'])} datasets", summary["average"], summary["zeroshot_average"])]
    panels += [(coop_layouts.LAYOUTS[d].title, summary["demul"][d], summary["zeroshot"].get(d))
               for d in summary["datasets"]]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.3 * nrows), squeeze=False)
    shots = summary["shots"]
    drawn = {}
    for ax, (title, cells, zs) in zip(axes.flat, panels):
        means = [cells[k]["mean"] for k in shots]
        bars = ax.errorbar(shots, means, yerr=[cells[k]["std"] for k in shots], marker="o", capsize=3, label=METHOD)
        lines = {METHOD: bars.lines[0]}
        if zs is not None:
            lines[ZS_METHOD] = ax.axhline(zs, color="gray", linestyle="--", label=ZS_METHOD)
        drawn[title] = {m: ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
                        for m, ln in lines.items()}
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_title(title)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(loc="lower right")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return drawn

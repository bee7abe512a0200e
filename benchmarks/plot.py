"""PNG charts of benchmark rows (matplotlib, headless).

* ``<tag>-time.png``:   median time per provider, one group of bars per (suite, op, mode);
* ``<tag>-memory.png``: peak memory per provider, the same groups;
* ``<tag>-scaling.png`` (when the rows hold several C for a head op, ``--sweep-C``): time of
  the head's fwd+bwd against C per provider, log-log.

Only ``ok`` rows are drawn. Rows come from this run or from a JSON lines file
(``python benchmarks/plot.py FILE.jsonl [--run-id ID]``).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List


def _get(r, k):
    return r[k] if isinstance(r, dict) else getattr(r, k)


def _bars(rows, value_key: str, ylabel: str, path: str, scale: float = 1.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, Dict[str, float]] = {}
    for r in rows:
        v = _get(r, value_key)
        if v is None:
            continue
        key = f"{_get(r, 'op')} {_get(r, 'mode')}\nC={_get(r, 'sizes').get('C', '')}"
        groups.setdefault(key, {})[_get(r, "provider")] = v * scale
    providers = list(dict.fromkeys(p for g in groups.values() for p in g))
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.6 * len(groups) * max(1, len(providers)))), 4.5))
    width = 0.8 / max(1, len(providers))
    for j, prov in enumerate(providers):
        xs = [i + j * width for i, g in enumerate(groups.values()) if prov in g]
        ys = [g[prov] for g in groups.values() if prov in g]
        ax.bar(xs, ys, width=width, label=prov)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scaling(rows, path: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts: Dict[str, List[tuple]] = {}
    for r in rows:
        if _get(r, "suite") == "head" and _get(r, "op") == "demul_head" and _get(r, "mode") == "fwd+bwd":
            pts.setdefault(_get(r, "provider"), []).append((_get(r, "sizes")["C"], _get(r, "time_ms")))
    if not any(len({c for c, _ in v}) > 1 for v in pts.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for prov, v in pts.items():
        v.sort()
        ax.plot([c for c, _ in v], [t for _, t in v], marker="o", label=prov)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes C")
    ax.set_ylabel("head fwd+bwd, ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_rows(rows, out_dir: str, tag: str) -> List[str]:
    """Write the charts for ``rows`` (Row objects or JSON dicts); return their paths."""
    ok = [r for r in rows if _get(r, "status") == "ok"]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, f"{tag}-time.png")
    _bars(ok, "time_ms", "median time, ms", p)
    paths.append(p)
    p = os.path.join(out_dir, f"{tag}-memory.png")
    _bars([r for r in ok if _get(r, "peak_mem_bytes")], "peak_mem_bytes", "peak memory, MiB", p, scale=2.0**-20)
    paths.append(p)
    p = os.path.join(out_dir, f"{tag}-scaling.png")
    if _scaling(ok, p):
        paths.append(p)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Charts from a benchmark JSON lines file")
    ap.add_argument("jsonl")
    ap.add_argument("--run-id", default=None, help="default: the last run in the file")
    ap.add_argument("--out", default=None, help="default: the file's folder")
    args = ap.parse_args(argv)
    with open(args.jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    run_id = args.run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    for p in plot_rows(rows, args.out or os.path.dirname(os.path.abspath(args.jsonl)), f"run-{run_id}"):
        print(p)


if __name__ == "__main__":
    main()

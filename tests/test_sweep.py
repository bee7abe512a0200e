"""`demul-fast sweep` and `zeroshot` end to end on CPU: two miniature datasets in CoOp's
layout x 2 shot counts x 2 seeds with a tiny random CLIP, one epoch each. The table, the CSV
and the plot must hold the runs' own numbers; a second call trains nothing."""

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from clip_tiny import tiny_config
from coop_mini import make_dataset
from demul_fast.app import cli, sweep
from demul_fast.app.config import TrainConfig
from demul_fast.app.run_folder import run_log
from demul_fast.data import DataError
from demul_fast.data.coop_layouts import LAYOUTS

NAMES, SHOTS, SEEDS = ("dtd", "eurosat"), (1, 2), (1, 2)


@pytest.fixture(scope="module")
def done(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEMUL_FAST_CACHE", str(root / "cache"))
        model = str(tiny_config(root))
        for name in NAMES:
            make_dataset(root / "data", name, counts={"train": 4, "val": 2, "test": 5})
        # alpha 0: no LLM; the sweep logic does not depend on the distillation (test_cli covers it).
        # One epoch at lr 0.1 without warm-up: the runs' numbers differ by seed and shot count
        options = ["--model", model, "--pretrained", "none", "--prompts", "2", "--n-ctx", "4", "--workers", "0",
                   "--device", "cpu", "--alpha", "0", "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.1",
                   "--batch-size", "4",
                   "--eval-batch-size", "8", "--no-progress"]
        argv = ["sweep", "--root", str(root / "data"), "--datasets", ",".join(NAMES), "--shots", "1,2",
                "--seeds", "1,2", "--out", str(root / "out")] + options
        assert cli.main(argv) == 0
        yield {"root": root, "out": root / "out", "argv": argv}


def _runs(out):
    """{(dataset, shots, seed): last-epoch test top-1} read from the run folders themselves."""
    acc = {}
    for name in NAMES:
        for k in SHOTS:
            for s in SEEDS:
                folder = out / name / f"shots_{k}" / f"seed_{s}"
                split = json.loads((folder / "split.json").read_text())
                assert split["layout"] == f"coop:{name}"
                assert all(len(v) == k for v in split["train"].values())
                log = run_log(folder)
                assert [r["epoch"] for r in log] == [1]
                acc[name, k, s] = log[-1]["test_acc"]
    return acc


def test_table_and_csv_hold_the_runs_numbers(done):
    out = done["out"]
    acc = _runs(out)
    # the runs differ by seed and by shot count: a swapped cell would show
    assert any(acc[n, 1, s] != acc[n, 2, s] for n in NAMES for s in SEEDS)
    assert any(acc[n, k, 1] != acc[n, k, 2] for n in NAMES for k in SHOTS)
    zs = {n: json.loads((out / n / "zeroshot.json").read_text())["top1"] for n in NAMES}
    rows = list(csv.DictReader((out / "results.csv").open()))
    table = {(r["method"], r["dataset"], int(r["shots"])): r for r in rows}
    assert len(rows) == 3 * (1 + len(SHOTS))  # two datasets and the average, zero-shot + 2 shot counts
    md = (out / "results.md").read_text()
    for name in NAMES:
        assert float(table["Zero-shot CLIP", name, 0]["mean"]) == pytest.approx(zs[name], abs=1e-4)
        for k in SHOTS:
            values = [acc[name, k, s] for s in SEEDS]
            row = table["DeMul", name, k]
            assert [float(v) for v in row["values"].split(";")] == pytest.approx(values, abs=1e-4)
            assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-4)
            assert float(row["std"]) == pytest.approx(np.std(values), abs=1e-4)  # population std, as CoOp
            assert f"{np.mean(values):.2f} ± {np.std(values):.2f}" in md
    for k in SHOTS:
        per_seed = [np.mean([acc[n, k, s] for n in NAMES]) for s in SEEDS]
        row = table["DeMul", "Average", k]
        assert float(row["mean"]) == pytest.approx(np.mean(per_seed), abs=1e-4)
        assert float(row["std"]) == pytest.approx(np.std(per_seed), abs=1e-4)
    average_line = next(line for line in md.splitlines() if line.startswith("| **Average**"))
    assert f"{np.mean(list(zs.values())):.2f}" in average_line
    assert "| DTD |" in md and "| EuroSAT |" in md and "DeMul 2 shots" in md


def test_plot_draws_the_runs_numbers(done):
    out = done["out"]
    acc = _runs(out)
    with Image.open(out / "accuracy_vs_shots.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 200
    summary = sweep.summarize([{"dataset": n, "shots": k, "seed": s, "top1": v} for (n, k, s), v in acc.items()],
                              {n: json.loads((out / n / "zeroshot.json").read_text())["top1"] for n in NAMES},
                              NAMES, SHOTS, SEEDS)
    drawn = sweep.plot(summary, out / "again.png")
    assert list(drawn) == ["Average over 2 datasets", "DTD", "EuroSAT"]
    for name in NAMES:
        xs, ys = drawn[LAYOUTS[name].title]["DeMul"]
        assert xs == list(SHOTS)
        assert ys == pytest.approx([np.mean([acc[name, k, s] for s in SEEDS]) for k in SHOTS], abs=1e-9)
    assert (out / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_call_trains_nothing_and_other_settings_are_refused(done, capsys, monkeypatch):
    out = done["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("log.json")}
    assert len(before) == len(NAMES) * len(SHOTS) * len(SEEDS)
    trained = []
    monkeypatch.setattr(sweep, "train", lambda cfg: trained.append(cfg))
    monkeypatch.setattr(sweep, "zeroshot", lambda *a, **k: trained.append(a))
    assert cli.main(done["argv"]) == 0
    assert trained == [] and {p: p.stat().st_mtime_ns for p in out.rglob("log.json")} == before
    assert "finished before" in capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert cli.main(done["argv"] + ["--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with other settings: lr 0.1 (asked: 0.5); use another --out" in err[0]
    assert trained == [] and (out / "results.md").read_text() == table


def test_zeroshot_command(done, capsys, tmp_path):
    out = done["out"]
    target = tmp_path / "zs.json"
    model = done["argv"][done["argv"].index("--model") + 1]
    argv = ["zeroshot", "--dataset", "eurosat", "--root", str(done["root"] / "data"), "--model", model,
            "--pretrained", "none", "--device", "cpu", "--workers", "0", "--no-progress", "--json", str(target)]
    assert cli.main(argv) == 0
    result = json.loads(target.read_text())
    assert result["n"] == 15 and result["template"] == "a centered satellite photo of {}."
    assert result["top1"] == json.loads((out / "eurosat" / "zeroshot.json").read_text())["top1"]
    assert f"{result['top1']:.2f}%" in capsys.readouterr().out


def test_summary_puts_every_number_in_its_cell():
    """Distinct numbers per (dataset, shots, seed): a swapped row, column or seed shows."""
    names, shots, seeds = ["caltech101", "dtd", "ucf101"], [1, 4, 16], [1, 2, 3]
    top1 = {(n, k, s): 10.0 * i + k + 0.1 * s * s for i, n in enumerate(names) for k in shots for s in seeds}
    summary = sweep.summarize([{"dataset": n, "shots": k, "seed": s, "top1": v} for (n, k, s), v in top1.items()],
                              {"caltech101": 90.5, "dtd": 44.25, "ucf101": 61.0}, names, shots, seeds)
    md = sweep.markdown_table(summary, "header").splitlines()
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in md if line.startswith("| ")}
    assert rows["Dataset"] == ["Zero-shot CLIP", "DeMul 1 shot", "DeMul 4 shots", "DeMul 16 shots"]
    # seeds add 0.1, 0.4, 0.9: mean 0.4667, population std 0.3300
    assert rows["Caltech101"] == ["90.50", "1.47 ± 0.33", "4.47 ± 0.33", "16.47 ± 0.33"]
    assert rows["UCF101"] == ["61.00", "21.47 ± 0.33", "24.47 ± 0.33", "36.47 ± 0.33"]
    assert rows["**Average**"] == ["65.25", "11.47 ± 0.33", "14.47 ± 0.33", "26.47 ± 0.33"]
    table = list(csv.DictReader(sweep.csv_table(summary).splitlines()))
    row = next(r for r in table if r["dataset"] == "dtd" and r["shots"] == "16")
    assert row["values"] == "26.1000;26.4000;26.9000" and row["n_seeds"] == "3"


def test_run_state(done, tmp_path):
    run = tmp_path / "r"
    saved = json.loads((done["out"] / "dtd" / "shots_1" / "seed_1" / "run.json").read_text())["config"]
    cfg = TrainConfig(**dict(saved, out=str(run)))
    assert sweep.run_state(run, cfg) == "new"
    run.mkdir()
    (run / "split.json").write_text("{}")
    assert sweep.run_state(run, cfg) == "restart"  # no epoch finished
    shutil.rmtree(run)
    shutil.copytree(done["out"] / "dtd" / "shots_1" / "seed_1", run)
    assert sweep.run_state(run, cfg) == "done"
    with pytest.raises(DataError, match="other settings: n_ctx 4 .asked: 8."):
        sweep.run_state(run, replace(cfg, n_ctx=8))
    # a run of 2 epochs interrupted after its first
    info = json.loads((run / "run.json").read_text())
    info["config"]["epochs"] = 2
    (run / "run.json").write_text(json.dumps(info))
    assert sweep.run_state(run, replace(cfg, epochs=2)) == "resume"
    assert sweep.parse_ints("1,2, 4", "--shots") == [1, 2, 4]
    for bad in ("1,x", "0,1", "1,1", ""):
        with pytest.raises(ValueError, match="--shots must be"):
            sweep.parse_ints(bad, "--shots")


def test_a_coop_run_resumes_with_its_dataset(done, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done["out"] / "eurosat" / "shots_2" / "seed_1", run)
    split = (run / "split.json").read_text()
    options = done["argv"][done["argv"].index("--model"):]
    argv = ["train", "--dataset", "eurosat", "--root", str(done["root"] / "data"), "--out", str(run), "--shots", "2",
            "--seed", "1", "--resume"] + options + ["--epochs", "2"]
    assert cli.main(argv) == 0
    assert [r["epoch"] for r in run_log(run)] == [1, 2]
    assert (run / "split.json").read_text() == split
    assert cli.main(argv[:argv.index("--seed")] + ["--seed", "2"] + argv[argv.index("--seed") + 2:]) == 2


def test_missing_matplotlib_stops_the_sweep_before_anything(done, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    argv = done["argv"][:done["argv"].index("--out") + 1] + [str(tmp_path / "o")] + done["argv"][
        done["argv"].index("--out") + 2:]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["demul-fast: error: the sweep's plot needs matplotlib: pip install matplotlib (the 'sweep' extra)"]
    assert not (tmp_path / "o").exists()

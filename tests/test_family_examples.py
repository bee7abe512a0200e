"""examples/cocoop_batched.py and examples/maple_deep_prompts.py run (CI, tiny towers): the
batched / prefix-shared call agrees with CoCoOp's loop / MaPLe's full-length encoder on every
step of a short training run, and the prompts train; the family benchmark suite runs at its
tiny preset."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ as a package

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cocoop_example_runs_and_agrees(capsys):
    report = load("cocoop_batched").main(["--steps", "3"])
    assert "batched vs loop" in capsys.readouterr().out
    assert report["max_rel_diff"] < 1e-4  # float32 rounding; a wrong gradient is O(1)
    assert report["losses"][-1] != report["losses"][0]
    assert report["plan"].groups == 3 and report["plan"].shared_len == 1 + 4


def test_maple_example_runs_and_agrees(capsys):
    report = load("maple_deep_prompts").main(["--steps", "3"])
    assert "prefix-shared vs MaPLe" in capsys.readouterr().out
    assert report["max_rel_diff"] < 1e-4
    assert report["losses"][-1] < report["losses"][0]
    assert report["plan"].shared_len == 1 + 2


def test_family_suite_tiny(tmp_path, capsys):
    from benchmarks import run

    assert run.main(["--suite", "family", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "[family] cocoop" in printed and "[family] maple" in printed
    rows = [json.loads(line) for line in (tmp_path / "family-cpu.jsonl").read_text().splitlines()]
    assert {(r["layout"], r["provider"]) for r in rows} == {("cocoop", "cocoop-loop"), ("cocoop", "batched"),
                                                            ("maple", "maple-full"), ("maple", "prefix-shared")}
    for r in rows:
        assert r["launches"] > 0 and len(r["times_s"]) == 3
        if r["max_rel_diff"] is not None:
            assert r["max_rel_diff"] < 1e-4

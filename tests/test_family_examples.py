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


def test_compare_then_step_compares_gradients_and_trains_on_the_candidate():
    """The examples' shared step (tests/support/family.py): a gradient-only difference of 1%
    is reported, and the step uses the candidate's gradient."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from support.family import compare_then_step, min_times, new_report

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    report = new_report("ref", "fast")
    # same loss value, candidate gradient 1.01x the reference's: (1.01 w - 0.01 w.detach())^2 summed
    ref = ("ref", lambda: (w * w).sum())
    fast = ("fast", lambda: ((1.01 * w - 0.01 * w.detach()) ** 2).sum())
    compare_then_step(report, [w], opt, ref, fast)
    assert abs(report["max_rel_diff"] - 0.01) < 1e-6
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.5 * 2 * 1.01))
    assert report["losses"] == [5.0] and len(min_times(report)) == 2

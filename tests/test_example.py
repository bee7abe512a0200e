"""examples/coop_integration.py runs (CI) and its swap does not change training."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coop_integration.py"
ARGS = ["--classes", "6", "--prompts", "2", "--n-ctx", "3", "--batch", "4", "--steps", "3", "--lr", "0.05"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("coop_integration", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_and_plain_encoders_train_the_same(example, capsys):
    fast = example.main(ARGS + ["--encoder", "fast"])
    plain = example.main(ARGS + ["--encoder", "plain"])
    assert "losses" in capsys.readouterr().out
    assert len(fast["losses"]) == 3 and all(torch.isfinite(torch.tensor(fast["losses"])))
    # same initialisation and data: the fast encoder follows the plain one step by step
    torch.testing.assert_close(torch.tensor(fast["losses"]), torch.tensor(plain["losses"]), rtol=1e-4, atol=1e-5)
    fm, pm = fast["model"], plain["model"]
    torch.testing.assert_close(fm.prompt_learner.ctx, pm.prompt_learner.ctx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fm.head.prompt_logits, pm.head.prompt_logits, rtol=1e-4, atol=1e-6)
    # the prompt learner was trained and the fast encoder shared [SOT] + ctx
    assert fast["losses"][-1] != fast["losses"][0]
    assert fm.text_encoder.last_plan.shared_len == 1 + 3
    assert isinstance(fm.text_encoder, example.dnn.CoOpTextEncoder)


def test_compare_option_reports_a_ratio(example, capsys):
    r = example.main(ARGS + ["--compare", "1"])
    assert r["ratio"] > 0 and r["cpu_ratio"] > 0 and r["plan"].shared_len == 1 + 3
    # 6 classes x 2 prompts x 77 tokens for CoOp, against [SOT] + ctx once per prompt
    assert r["tokens"]["plain"] == 6 * 2 * 77 and r["tokens"]["fast"] < r["tokens"]["plain"] // 5
    assert "ratio plain / fast" in capsys.readouterr().out

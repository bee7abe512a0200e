"""examples/coop_openai_clip.py runs (CI): CoOp over OpenAI's clip with the one-line swap
trains exactly as with CoOp's TextEncoder, in float32 and with float16-cast weights."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coop_openai_clip.py"
ARGS = ["--classes", "5", "--n-ctx", "3", "--batch", "4", "--steps", "3", "--lr", "0.05"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("coop_openai_clip", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_swap_trains_like_coop(example, capsys):
    fast = example.main(ARGS + ["--encoder", "fast"])
    plain = example.main(ARGS + ["--encoder", "plain"])
    assert "losses" in capsys.readouterr().out
    assert fast["losses"][-1] != fast["losses"][0]
    torch.testing.assert_close(torch.tensor(fast["losses"]), torch.tensor(plain["losses"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast["model"].prompt_learner.ctx, plain["model"].prompt_learner.ctx,
                               rtol=1e-4, atol=1e-6)
    enc = fast["model"].text_encoder
    assert isinstance(enc, example.dnn.CoOpTextEncoder) and enc.last_plan.shared_len == 1 + 3


def test_compare_with_float16_weights(example, capsys):
    r = example.main(ARGS + ["--compare", "1", "--fp16"])
    assert "ratio plain / fast" in capsys.readouterr().out
    assert r["tokens"]["fast"] < r["tokens"]["plain"]
    assert r["features_rel_err"] < 2e-2 and r["dctx_rel_err"] < 2e-2  # float16 rounding, both paths

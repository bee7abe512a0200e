"""A whole DeMul training step compiled (demul_fast.compiled_step, docs/step.md): forward,
backward and optimizer update in compiled graphs with fullgraph=True, no graph break, no
recompile across batches (a partial last batch included, which runs eagerly), and the same
prompts as the eager loop within the error rule (tests/numerics.py) against a float64 run.

The prefix plan is decided once: a compiled forward never builds the packed layout or the
distillation basis (both come from ``DeMulModule.plan``, guarded by identity and version
counters), and a changed ``suffix_eot`` or phi is re-planned on the host before the step.
"""

import copy

import pytest
import torch

import demul_fast as df
from demul_fast.compiled_step import TrainStep, compile_mode, set_lr
from numerics import assert_error_rule

D, K, C, B = 16, 12, 3, 4


def _tiny_demul(dtype=torch.float32):
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=D, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32),
                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)).to(dtype)
    names = ["cat", "golden_retriever", "sea anemone"]
    model = df.DeMul(clip, open_clip.get_tokenizer("ViT-B-16"), names, llm_embeddings=torch.randn(C, K),
                     phi=torch.nn.Linear(D, K), n_prompts=2, n_ctx=4, label_smoothing=0.1, backend="torch")
    gen = torch.Generator().manual_seed(5)  # the same starting values in every dtype
    with torch.no_grad():
        model.ctx.copy_(torch.randn(model.ctx.shape, generator=gen) * 0.02)
        model.head.prompt_logits.copy_(torch.randn(C, 2, generator=gen))
    return model.to(dtype).train()


def _batches(n_full=3, partial=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    sizes = [B] * n_full + ([partial] if partial else [])
    return [(torch.randn(b, D, generator=gen).to(dtype), torch.randint(0, C, (b,), generator=gen)) for b in sizes]


def _train(model, mode, batches, backend=None, epochs=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(model, opt, mode=mode, batch_size=B, backend=backend)
    totals = []
    for epoch in range(epochs):
        set_lr(opt, 0.05 / (1 + epoch))  # a new rate per epoch: a value, not a recompile
        for x, y in batches:
            step(x, y)
        totals.append(step.read_totals(reset=True))
    return step, totals


def _graph_breaks():
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


def test_compile_mode_defaults():
    assert compile_mode(None, torch.device("cpu")) == "none"
    assert compile_mode(None, torch.device("cuda")) == "reduce-overhead"
    assert compile_mode("max-autotune", torch.device("cpu")) == "max-autotune"
    with pytest.raises(ValueError, match="--compile"):
        compile_mode("fast", torch.device("cpu"))


def test_whole_step_one_graph_each_no_recompile():
    """Forward (its backward from AOTAutograd) and the optimizer update each compile once,
    fullgraph=True, for every full batch of two epochs (a new learning rate included); the
    partial last batch runs eagerly; no graph breaks anywhere."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    model = _tiny_demul()
    step, totals = _train(model, "default", _batches(), backend=counter)
    assert counter.frame_count == 2, f"{counter.frame_count} graphs: a graph break or a recompile"
    assert _graph_breaks() == 0, dict(counters["graph_break"])
    assert step.steps == 8 and step.eager_steps == 2  # the two partial batches
    assert [t["n"] for t in totals] == [3 * B + 2] * 2
    assert all(0 <= t["correct"] <= t["n"] for t in totals)


def test_compiled_forward_uses_the_plan_and_replans_on_the_host():
    """Inside the compiled forward no layout or basis is built (no nonzero, no QR in the
    graph); editing suffix_eot in place changes its version counter, so the host-side key
    check before the next step re-plans (and dynamo recompiles for the new layout)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    counter = CompileCounterWithBackend(keep)
    model = _tiny_demul()
    _train(model, "default", _batches(partial=0), backend=counter, epochs=1)
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not any("nonzero" in o or "linalg_qr" in o or "qr" == o.split(".")[-1] for o in ops), ops
    enc = model.text_encoder
    layout = enc._layout[1]
    assert enc.plan(2) is layout  # unchanged key: the same layout, nothing rebuilt
    with torch.no_grad():
        enc.suffix_eot.add_(0)  # same values, new version: the plan is re-made
    assert enc.plan(2) is not layout


def test_compiled_forward_without_plan_is_a_clear_error():
    model = _tiny_demul()
    model.text_encoder.__dict__["_layout"] = None
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y: model(image_features=x, labels=y).loss, backend="eager", fullgraph=True)
    x, y = _batches(1, 0)[0]
    with pytest.raises(Exception, match=r"plan\(2\)"):
        fn(x, y)


def test_move_replans_for_the_new_device():
    model = _tiny_demul()
    before = model.text_encoder._layout[1]
    model.to(torch.float64)  # a cast keeps the device: same plan
    assert model.text_encoder._layout[1] is before


def test_compiled_training_matches_eager_within_the_error_rule():
    """Two epochs (full batches compiled, the partial one eager) give the prompts of the
    eager loop: |compiled - float64 run| within the rule's bound from the eager float32
    run's own error (k=3 for trained parameters), and the same summed losses."""
    torch._dynamo.reset()
    batches = _batches()
    base = _tiny_demul()
    eager_model, comp_model, ref_model = copy.deepcopy(base), copy.deepcopy(base), _tiny_demul(torch.float64)
    _, eager_tot = _train(eager_model, "none", batches)
    _, comp_tot = _train(comp_model, "default", batches, backend="aot_eager")
    _, ref_tot = _train(ref_model, "none", [(x.double(), y) for x, y in batches])
    for name in ("ctx", "head.prompt_logits"):
        get = lambda m: m.get_parameter(name).detach()  # noqa: E731
        assert_error_rule(name, get(comp_model), get(ref_model), get(eager_model), k=3)
    for a, b in zip(comp_tot, eager_tot):
        for key in ("loss", "ce_loss", "distill_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["correct"] == b["correct"] and a["n"] == b["n"]
    # the bound refuses a loop that drops the partial last batch (the other static-shape choice)
    dropped = copy.deepcopy(base)
    _train(dropped, "none", [(x, y) for x, y in batches if y.numel() == B])
    with pytest.raises(AssertionError, match="exceeds the rule"):
        assert_error_rule("ctx (partial batch dropped)", dropped.ctx.detach(), ref_model.ctx.detach(),
                          eager_model.ctx.detach(), k=3)


@pytest.mark.slow
def test_inductor_training_matches_eager():
    """The same with inductor (C++ kernels on a CPU; about a minute of compiling)."""
    torch._dynamo.reset()
    batches = _batches()
    base = _tiny_demul()
    eager_model, comp_model, ref_model = copy.deepcopy(base), copy.deepcopy(base), _tiny_demul(torch.float64)
    _train(eager_model, "none", batches)
    _train(comp_model, "default", batches)
    _train(ref_model, "none", [(x.double(), y) for x, y in batches])
    for name in ("ctx", "head.prompt_logits"):
        get = lambda m: m.get_parameter(name).detach()  # noqa: E731
        assert_error_rule(name, get(comp_model), get(ref_model), get(eager_model), k=3)


# ---- demul-fast train --compile -----------------------------------------------------------------

def test_cli_compile_records_mode_matches_eager_and_resumes(tmp_path, monkeypatch):
    """``demul-fast train --compile default`` (aot_eager through DEMUL_FAST_COMPILE_BACKEND: the
    same graphs without a minute of C++ compilation per graph here) records its mode in
    run.json, logs steps/s, trains the prompts of the eager run (``--compile none``, the CPU
    default) with a partial last batch (24 images, batches of 10), and resumes."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from clip_tiny import tiny_config
    from demul_fast.app import checkpoint, cli
    from image_folder import make_folder

    monkeypatch.setenv("DEMUL_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEMUL_FAST_COMPILE_BACKEND", "aot_eager")
    model = str(tiny_config(tmp_path))
    data = tmp_path / "data"
    make_folder(data / "train", per_class=8)
    make_folder(data / "test", per_class=3, seed=9)
    common = ["--data", str(data), "--model", model, "--pretrained", "none", "--prompts", "2", "--n-ctx", "4",
              "--workers", "0", "--device", "cpu", "--phi-names", "task", "--shots", "8", "--batch-size", "10",
              "--lr", "0.05", "--warmup-epochs", "0", "--no-progress"]
    runs = {}
    for mode in ("none", "default"):
        out = tmp_path / f"run-{mode}"
        assert cli.main(["train", "--out", str(out), "--epochs", "2", "--compile", mode] + common) == 0
        runs[mode] = out
        assert json.loads((out / "run.json").read_text())["compile"] == mode
    logs = {m: json.loads((checkpoint.current(Path(o)) / "log.json").read_text())["epochs"] for m, o in runs.items()}
    for a, b in zip(logs["default"], logs["none"]):
        assert a["steps_per_s"] > 0
        for key in ("loss", "ce_loss", "distill_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    prompts = {m: load_file(checkpoint.current(Path(o)) / "prompts" / "prompts.safetensors") for m, o in runs.items()}
    for name in ("ctx", "prompt_logits"):
        torch.testing.assert_close(prompts["default"][name], prompts["none"][name], rtol=1e-5, atol=1e-6)
    assert cli.main(["train", "--out", str(runs["default"]), "--epochs", "3", "--compile", "default", "--resume"]
                    + common) == 0
    log = json.loads((checkpoint.current(runs["default"]) / "log.json").read_text())["epochs"]
    assert [r["epoch"] for r in log] == [1, 2, 3]

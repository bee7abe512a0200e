"""demul-fast train / eval end to end on CPU: a generated image folder, a tiny random open_clip
model, the shipped MiniLM, phi fitted on the spot. Then every bad input of issue 7."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demul_fast.app import checkpoint, cli, llm
from demul_fast.app.checkpoint import CheckpointError
from demul_fast.app.config import TrainConfig
from demul_fast.app.evaluate import evaluate
from demul_fast.app.run_folder import OutputExistsError
from demul_fast.app.train import train
from demul_fast.data import DataError
from clip_tiny import tiny_config
from image_folder import CLASSES, make_folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The model config, an isolated embeddings cache, a dataset and one trained run."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEMUL_FAST_CACHE", str(root / "cache"))
        model = str(tiny_config(root))
        data = root / "data"  # the train/test layout; the plain layout is used by the other tests
        make_folder(data / "train", per_class=8)
        make_folder(data / "test", per_class=3, seed=9)
        common = ["--model", model, "--pretrained", "none", "--prompts", "2", "--n-ctx", "4", "--workers", "0",
                  "--device", "cpu", "--phi-names", "task"]
        out = root / "run"
        argv = ["train", "--data", str(data), "--out", str(out), "--shots", "8", "--epochs", "12",
                "--batch-size", "8", "--lr", "0.05", "--warmup-epochs", "0"] + common
        assert cli.main(argv) == 0
        yield {"root": root, "data": data, "out": out, "common": common, "model": model, "mp": mp}


def _log(out):
    return json.loads((checkpoint.current(Path(out)) / "log.json").read_text())["epochs"]


def test_training_learns_and_writes_a_complete_run(env):
    out = env["out"]
    for f in ("run.json", "split.json", "checkpoint.json", "phi.safetensors", "phi.json",
              "llm_embeddings.safetensors", "checkpoint-0012/log.json", "checkpoint-0012/trainer_state.pt",
              "checkpoint-0012/prompts/prompts.safetensors", "checkpoint-0012/prompts/config.json"):
        assert (out / f).is_file(), f
    # one checkpoint (the last), and nothing left beside the run by its staging folder
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-0012"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".run.")] == []
    log = _log(out)
    assert [r["epoch"] for r in log] == list(range(1, 13))
    ce = [r["ce_loss"] for r in log]
    print("ce loss per epoch:", [round(v, 4) for v in ce], "test acc:", [round(r["test_acc"]) for r in log])
    # a real learning signal: the cross-entropy falls well below its start (chance is ln 3 = 1.10)
    # and the test images, never trained on, are classified above chance
    assert min(ce[-3:]) < 0.8 * ce[0], ce
    assert log[-1]["test_acc"] > 50.0, log[-1]
    assert all(0.0 < r["distill_loss"] < 2.0 for r in log)  # the distillation term is active
    split = json.loads((out / "split.json").read_text())
    assert split["classes"] == list(CLASSES)
    assert split["layout"] == "splits" and list(split["eval"]) == ["test"]
    assert all(len(v) == 8 for v in split["train"].values()) and all(len(v) == 3 for v in split["eval"]["test"].values())
    run = json.loads((out / "run.json").read_text())
    assert run["module"] == "DeMul" and run["n_train"] == 24
    phi = json.loads((out / "phi.json").read_text())
    assert phi["report"]["method"] == "ridge" and phi["arch"]["out_dim"] == 384


def test_eval_reproduces_the_final_accuracy(env, tmp_path, capsys):
    out = env["out"]
    target = tmp_path / "result.json"
    assert cli.main(["eval", "--checkpoint", str(out), "--json", str(target), "--no-progress"]) == 0
    result = json.loads(target.read_text())
    assert result["split"] == "test" and result["n"] == 9
    assert result["top1"] == _log(out)[-1]["test_acc"]
    assert f"top-1 on test (9 images): {result['top1']:.2f}%" in capsys.readouterr().out
    # the sampled training shots, and another folder with the same classes
    train_acc = evaluate(out, split="train", progress=False)
    assert train_acc["n"] == 24
    other = make_folder(tmp_path / "other", per_class=3, seed=5)
    res = evaluate(out, data=str(other), progress=False)
    assert res["split"] == "all" and res["n"] == 9


def test_same_seed_same_shots_and_resume_continues(env):
    out = env["out"]
    argv = ["train", "--data", str(env["data"]), "--out", str(out), "--shots", "8", "--epochs", "13",
            "--batch-size", "8", "--lr", "0.05", "--warmup-epochs", "0", "--resume", "--no-progress"] + env["common"]
    before = (out / "split.json").read_text()
    assert cli.main(argv) == 0
    log = _log(out)
    assert [r["epoch"] for r in log] == list(range(1, 14))
    assert (out / "split.json").read_text() == before
    state = torch.load(checkpoint.current(out) / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 12 and checkpoint.current(out).name == "checkpoint-0013"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-0013"]


def test_reference_module_and_no_distillation(env, tmp_path):
    argv = ["train", "--data", str(env["data"]), "--out", str(tmp_path / "ref"), "--shots", "2", "--epochs", "1",
            "--batch-size", "6", "--reference", "--alpha", "0", "--no-progress"] + env["common"]
    assert cli.main(argv) == 0
    run = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert run["module"] == "DeMulReference"
    assert _log(tmp_path / "ref")[0]["distill_loss"] == 0.0
    assert not (tmp_path / "ref" / "phi.safetensors").exists()


def _cfg(env, data, out, **kw):
    base = dict(data=str(data), out=str(out), shots=2, epochs=1, batch_size=6, model=env["model"],
                pretrained="none", prompts=2, n_ctx=4, workers=0, device="cpu", phi_names="task", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_bad_dataset_folders(env, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(env, tmp_path / "nowhere", tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        train(_cfg(env, tmp_path / "empty", tmp_path / "o"))
    data = make_folder(tmp_path / "d", per_class=2)
    (data / "zebra").mkdir()
    (data / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="without images.*'zebra'"):
        train(_cfg(env, data, tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing written on refusal


def test_too_few_shots_and_allow_fewer(env, tmp_path, capsys):
    data = make_folder(tmp_path / "d", per_class=3)
    for f in sorted((data / "red_plain").iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match=r"fewer than --shots=2 images: 'red_plain' \(1\).*--allow-fewer"):
        train(_cfg(env, data, tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    train(_cfg(env, data, tmp_path / "o", allow_fewer=True))
    printed = capsys.readouterr().out
    assert "--allow-fewer: 1 class(es) have fewer than 2 images" in printed
    # same CLIP weights, LLM, names and seed as the module's first run: phi comes from the cache
    assert "phi loaded from the cache" in printed
    from safetensors.torch import load_file
    a, b = (load_file(str(o / "phi.safetensors")) for o in (env["out"], tmp_path / "o"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    split = json.loads((tmp_path / "o" / "split.json").read_text())
    assert split["short"] == {"red_plain": 1} and len(split["train"]["red_plain"]) == 1


def test_unreadable_images_are_reported_by_path(env, tmp_path):
    data = make_folder(tmp_path / "d", per_class=3)
    bad = data / "green_stripes" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    for shots in (3, 1):  # a sampled training image, or an evaluation image
        with pytest.raises(DataError, match="broken.png"):
            train(_cfg(env, data, tmp_path / "o", shots=shots, seed=shots))
    assert not (tmp_path / "o").exists()


def test_existing_output_folder(env, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        train(_cfg(env, env["data"], out))
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="exclude"):
        train(_cfg(env, env["data"], out, resume=True, overwrite=True))
    with pytest.raises(CheckpointError, match="not a resumable run folder"):
        train(_cfg(env, env["data"], out, resume=True))
    # --overwrite replaces a whole run folder, so it refuses a folder that holds no run
    with pytest.raises(OutputExistsError, match="--overwrite replaces a run folder.*no run.json"):
        train(_cfg(env, env["data"], out, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_checkpoint_that_does_not_fit(env, tmp_path):
    out = env["out"]
    other = make_folder(tmp_path / "other", per_class=2, classes=("blue_checks", "green_stripes", "yellow_dot"))
    with pytest.raises(CheckpointError, match=r"class 2 is 'yellow_dot'.*'red_plain'"):
        evaluate(out, data=str(other), progress=False)
    with pytest.raises(CheckpointError, match=r"class 2 is 'yellow_dot'"):
        train(_cfg(env, other, out, resume=True))
    # other shapes: a resumed run with another n_ctx, and prompts of another shape on disk
    with pytest.raises(CheckpointError, match="n_ctx is 8 but .* trained with 4"):
        train(_cfg(env, env["data"], out, resume=True, n_ctx=8, shots=8, batch_size=8, seed=1))
    import shutil
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    prompts = checkpoint.current(copy) / "prompts" / "prompts.safetensors"
    tensors = load_file(str(prompts))
    tensors["ctx"] = torch.zeros(2, 5, tensors["ctx"].shape[-1])
    save_file(tensors, str(prompts))
    with pytest.raises(CheckpointError, match="ctx"):
        evaluate(copy, progress=False)
    with pytest.raises(CheckpointError, match="not a run folder"):
        evaluate(tmp_path, progress=False)


def test_embeddings_file_with_other_names_is_refused(env, tmp_path, capsys):
    names = ["blue checks", "green stripes", "purple haze"]
    emb_file = llm.save_embeddings(tmp_path / "openai.safetensors", names, torch.randn(3, 3072))
    argv = ["train", "--data", str(env["data"]), "--out", str(tmp_path / "o"), "--shots", "2", "--epochs", "1",
            "--llm", str(emb_file), "--no-progress"] + env["common"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("demul-fast: error:") and "class 2 is 'purple haze'" in err and "'red_plain'" in err
    assert not (tmp_path / "o").exists()
    # the same file with the right names trains, phi fitted on the file's own pairs (K = 3072)
    llm.save_embeddings(emb_file, list(CLASSES), torch.randn(3, 3072))
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "o" / "phi.json").read_text())["arch"]["out_dim"] == 3072


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "demul_fast.cli", "train", "--data", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "o"), "--pretrained", "none"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 2
    assert "demul-fast: error: dataset folder" in proc.stderr and "does not exist" in proc.stderr
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0


def test_fit_phi_command_and_training_with_it(env, tmp_path):
    from demul_fast import phi as phi_mod
    from demul_fast.data import classnames

    names = tmp_path / "names.txt"
    names.write_text("\n".join(list(CLASSES) + classnames.dataset_classnames("dtd")[:17]) + "\n")
    target = tmp_path / "phi.safetensors"
    argv = ["fit-phi", "--out", str(target), "--model", env["model"], "--pretrained", "none", "--names", str(names),
            "--device", "cpu"]
    assert cli.main(argv) == 0
    phi, info = phi_mod.load_phi(target)
    assert isinstance(phi, torch.nn.Linear) and phi.weight.shape == (384, 32)
    assert info["report"]["n_fit"] + info["report"]["n_heldout"] == 20 and info["report"]["n_heldout"] == 2
    run = ["train", "--data", str(env["data"]), "--shots", "2", "--epochs", "1", "--no-progress"] + env["common"]
    assert cli.main(run + ["--out", str(tmp_path / "o"), "--phi", str(target)]) == 0
    used, _ = phi_mod.load_phi(tmp_path / "o" / "phi.safetensors")
    assert torch.equal(used.weight, phi.weight) and torch.equal(used.bias, phi.bias)
    phi_mod.save_phi(tmp_path / "wrong", torch.nn.Linear(16, 384))
    with pytest.raises(ValueError, match="maps D=16 to K=384, but this CLIP model has D=32"):
        train(_cfg(env, env["data"], tmp_path / "o2", phi=str(tmp_path / "wrong.safetensors")))
    assert not (tmp_path / "o2").exists()

"""demul-fast train loses nothing (issue 13): unreadable images (a truncated JPEG included)
stop it before any write; a checkpoint is replaced as one unit, so a run interrupted at any
write resumes to the uninterrupted run's prompts; --overwrite keeps the old run until the new
one has its first checkpoint. CPU, a tiny random open_clip model, 9 generated images."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from demul_fast.app import checkpoint, cli, runtime
from demul_fast.app import config as config_mod
from demul_fast.app import train as train_mod
from demul_fast.prompt_learner import DeMulModule
from demul_fast.app.checkpoint import CheckpointError
from demul_fast.app.config import TrainConfig, default_workers
from demul_fast.app.evaluate import evaluate
from demul_fast.app.train import train
from demul_fast.data import DataError
from clip_tiny import tiny_config
from image_folder import make_folder, truncated_jpeg

EPOCHS = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The model config, an isolated cache, a dataset and one finished run of EPOCHS epochs."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEMUL_FAST_CACHE", str(root / "cache"))
        env = {"model": str(tiny_config(root)), "data": make_folder(root / "data", per_class=3)}
        train(_cfg(env, root / "straight"))
        env["straight"] = root / "straight"
        yield env


def _cfg(env, out, **kw):
    base = dict(data=str(env["data"]), out=str(out), shots=2, epochs=EPOCHS, batch_size=3, lr=0.05,
                warmup_epochs=0, model=env["model"], pretrained="none", prompts=2, n_ctx=4, workers=0,
                device="cpu", phi_names="task", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _argv(env, data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--shots", "2", "--epochs", str(EPOCHS),
            "--batch-size", "3", "--model", env["model"], "--pretrained", "none", "--prompts", "2", "--n-ctx", "4",
            "--workers", "0", "--device", "cpu", "--phi-names", "task", "--no-progress", *extra]


def _files(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _beside(out: Path) -> list:
    """Staging or replaced folders left beside ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _log(out: Path) -> list:
    return json.loads((checkpoint.current(out) / "log.json").read_text())["epochs"]


def _prompts(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint.current(out) / "prompts" / "prompts.safetensors"))


def _finished_run(env, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(env["straight"], out)
    return out


class Crash(Exception):
    """The failure a test injects (a full disk, a killed process)."""


def _crash_on(monkeypatch, owner, name: str, when, after: bool = False):
    """Make ``owner.name`` raise Crash on the first call where ``when(*args)`` holds (after
    doing its work when ``after``)."""
    real = getattr(owner, name)

    def failing(*args, **kwargs):
        if when(*args):
            if after:
                real(*args, **kwargs)
            raise Crash(f"{name} crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


# -------------------------------------------------------------------------------------------
# unreadable images


def test_truncated_jpeg_stops_training_before_any_write(env, tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    make_folder(data / "train", per_class=2)
    make_folder(data / "test", per_class=2, seed=3)
    cut = truncated_jpeg(data / "test" / "red_plain" / "cut.jpg")
    with Image.open(cut) as im:
        im.verify()  # the header-only check that used to let this file through
    broken = data / "train" / "green_stripes" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert cli.main(_argv(env, data, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("demul-fast: error: 2 image file(s) cannot be read"), err
    assert f"{cut} (OSError: image file is truncated" in err and f"{broken} (" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output, no staging folder


def test_unreadable_image_refuses_overwrite_resume_and_eval_leaving_the_run(env, tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    out = tmp_path / "run"
    train(_cfg(env, out, data=str(data), epochs=1))
    before = _files(out)
    split = json.loads((out / "split.json").read_text())
    for part in (split["train"], split["eval"]["test"]):  # a sampled shot and a test image, cut in place
        truncated_jpeg(Path(part["blue_checks"][0]))
    for extra in (["--overwrite"], ["--resume"]):
        assert cli.main(_argv(env, data, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "2 image file(s) cannot be read" in err, (extra, err)
        assert _files(out) == before and _beside(out) == [], extra
    with pytest.raises(DataError, match="1 image file.*image file is truncated"):
        evaluate(out, progress=False)


# -------------------------------------------------------------------------------------------
# a checkpoint is one unit


def _in_checkpoint_2(path, *rest) -> bool:
    return "checkpoint-0002" in str(path)


def _stop_in_epoch_2(monkeypatch, where: str) -> None:
    """Crash during epoch 2's checkpoint at ``where`` (after the prompts are written, at the
    trainer state, after the log is written, at the pointer), or between epochs 1 and 2, just
    after epoch 1's checkpoint ("between")."""
    if where == "prompts":
        _crash_on(monkeypatch, DeMulModule, "save_prompts", lambda self, d: _in_checkpoint_2(d), after=True)
    elif where == "state":
        _crash_on(monkeypatch, torch, "save", lambda obj, path, *rest: _in_checkpoint_2(path))
    elif where == "log":
        _crash_on(monkeypatch, checkpoint, "write_json", lambda path, obj: _in_checkpoint_2(path) and path.name == "log.json",
                  after=True)
    elif where == "pointer":
        _crash_on(monkeypatch, checkpoint, "write_json",
                  lambda path, obj: path.name == checkpoint.POINTER_FILE and obj["epoch"] == 2)
    else:
        _crash_on(monkeypatch, runtime, "log", lambda msg, progress: msg.startswith("epoch 1/"), after=True)


@pytest.mark.parametrize("where", ["prompts", "state", "log", "pointer", "between"])
def test_run_interrupted_at_a_checkpoint_write_resumes_cleanly(env, tmp_path, where):
    """The run keeps its last complete checkpoint, can be evaluated, and resumes to the
    uninterrupted run's prompts bit for bit (shuffle, augmentation, optimizer restored)."""
    out = tmp_path / "stopped"
    with pytest.MonkeyPatch.context() as mp:
        _stop_in_epoch_2(mp, where)
        with pytest.raises(Crash):
            train(_cfg(env, out))
    assert checkpoint.current(out).name == "checkpoint-0001"
    assert [r["epoch"] for r in _log(out)] == [1]
    assert torch.load(checkpoint.current(out) / "trainer_state.pt", weights_only=True)["epoch"] == 0
    assert evaluate(out, progress=False)["n"] == 3

    train(_cfg(env, out, resume=True))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{EPOCHS:04d}"]
    a, b = _prompts(env["straight"]), _prompts(out)
    assert all(torch.equal(a[k], b[k]) for k in ("ctx", "prompt_logits"))
    straight = _log(env["straight"])
    # everything but the timings (seconds, steps_per_s)
    assert _log(out) == [dict(r, seconds=s["seconds"], steps_per_s=s["steps_per_s"]) for r, s in zip(straight, _log(out))]


def test_damaged_pointer_is_a_checkpoint_error(env, tmp_path):
    out = _finished_run(env, tmp_path)
    (out / checkpoint.POINTER_FILE).write_text('{"folder": "checkpoint-0099", "epoch": 99}')
    with pytest.raises(CheckpointError, match="names the checkpoint 'checkpoint-0099'"):
        evaluate(out, progress=False)
    (out / checkpoint.POINTER_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="damaged"):
        train(_cfg(env, out, resume=True))


# -------------------------------------------------------------------------------------------
# --overwrite


@pytest.mark.parametrize("where", ["start", "first checkpoint"])
def test_overwrite_that_crashes_before_its_first_checkpoint_keeps_the_old_run(env, tmp_path, where):
    out = _finished_run(env, tmp_path)
    before = _files(out)
    seen = {}

    def look(msg, progress):  # the new run is under way: the old one is untouched
        seen["beside"], seen["old"] = _beside(out), _files(out) == before

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "log", look)
        if where == "start":
            _crash_on(mp, train_mod, "lr_at", lambda cfg, epoch: True)
        else:
            _crash_on(mp, torch, "save", lambda obj, path, *rest: "checkpoint-0001" in str(path))
        with pytest.raises(Crash):
            train(_cfg(env, out, overwrite=True, seed=2, epochs=1))
    assert seen["old"] and len(seen["beside"]) == 1 and seen["beside"][0].startswith(".run.partial-")
    assert _files(out) == before and _beside(out) == []
    assert evaluate(out, progress=False)["top1"] == _log(out)[-1]["test_acc"]


def test_overwrite_replaces_the_run_at_its_first_checkpoint(env, tmp_path):
    out = _finished_run(env, tmp_path)
    before = _files(out)
    seen = []
    real_swap = checkpoint.swap_in

    def swap(staging, target):
        seen.append((_files(out) == before, checkpoint.current(staging).name))
        real_swap(staging, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "swap_in", swap)
        train(_cfg(env, out, overwrite=True, seed=2, epochs=3))
    assert seen == [(True, "checkpoint-0001")]  # once, with the old run intact until then
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 2
    assert [r["epoch"] for r in _log(out)] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-0003"]
    assert _beside(out) == []


# -------------------------------------------------------------------------------------------
# data loader workers


def test_workers_default_to_the_available_cores_up_to_4(monkeypatch):
    for cores, expected in ((1, 1), (2, 2), (4, 4), (64, 4)):
        monkeypatch.setattr(config_mod.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers() == expected
        assert TrainConfig(data="d", out="o").workers == expected
    monkeypatch.delattr(config_mod.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(config_mod.os, "cpu_count", lambda: 3)
    assert default_workers() == 3
    monkeypatch.setattr(config_mod.os, "cpu_count", lambda: None)
    assert default_workers() == 1


# -------------------------------------------------------------------------------------------
# app/checkpoint.py on its own


def test_swap_in_needs_a_checkpoint_and_replaces_the_folder_a_link_points_to(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "run.json").write_text("old run")
    link = tmp_path / "link"
    link.symlink_to(target)
    staging = checkpoint.staging_folder(link)
    assert staging.parent == target.parent.resolve() and staging.name.startswith(".real.partial-")
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        checkpoint.swap_in(staging, link)
    assert (target / "run.json").read_text() == "old run"
    checkpoint.write(staging, 1, lambda folder: (folder / "x").write_text("1"))
    checkpoint.swap_in(staging, link)
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["checkpoint-0001", "checkpoint.json"]
    assert (checkpoint.current(link) / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    with pytest.raises(CheckpointError, match="cannot be rewritten in place"):
        checkpoint.write(link, 1, lambda folder: None)

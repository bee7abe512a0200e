"""``demul-fast train`` under torchrun: the same prompts at any world size with augmentation, a
killed process restarted by the elastic agent and resumed bit for bit, an evaluation split
smaller than the world, one writer and no torn checkpoint.

Every multi-process run is started by torchrun itself (``python -m torch.distributed.run
--standalone``, gloo on the CPU) through tests/elastic_entry.py, which plants the faults
(SIGKILL before an optimizer step, or inside a checkpoint write), makes any write below
the runs' folder by a rank other than 0 fail the run, and logs when things happen. Each
launch is bounded (LAUNCH_TIMEOUT, then its whole process group is killed).

The data: 3 classes of generated 36x36 images, 4 shots (12 training images, a global
batch of 4: 3 steps per epoch at every world size), and 1 test image (one class has a
fifth image), so with 2 or 3 processes some ranks evaluate no image.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clip_tiny import tiny_config
from demul_fast.app import checkpoint, cli
from demul_fast.app.run_folder import run_log
from numerics import assert_same_trained_prompts

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 420  # seconds for one torchrun launch, restarts included (a loaded 2-core machine)
EPOCHS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("elastic")
    rng = np.random.default_rng(0)
    for i, (name, count) in enumerate([("blue", 5), ("green", 4), ("red", 4)]):
        (root / "data" / name).mkdir(parents=True)
        for j in range(count):
            pixels = rng.normal(60 + 60 * i, 40, (36, 36, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{j}.png")
    (root / "runs").mkdir()
    args = ["--data", str(root / "data"), "--model", str(tiny_config(root)), "--pretrained", "none",
            "--prompts", "2", "--n-ctx", "4", "--workers", "0", "--device", "cpu", "--phi-names", "task",
            "--shots", "4", "--batch-size", "4", "--epochs", str(EPOCHS), "--lr", "0.05", "--warmup-epochs", "0",
            "--no-progress"]
    env = dict(os.environ, DEMUL_FAST_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               DEMUL_TEST_GUARD=str(root / "runs"))
    return {"root": root, "args": args, "env": env, "runs": {}}


# -------------------------------------------------------------------------------------------
# which run a restarted process resumes (no processes)


def _run_folder(out, run_id, **config):
    base = {"shots": 4, "seed": 1, "lr": 0.05, "resume": False, "overwrite": True, "workers": 2}
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": dict(base, **config),
                                              "elastic": {"run_id": run_id, "restart": 0}}))
    checkpoint.write(out, 1, lambda folder: None)
    return dict(base)


def test_a_restart_resumes_only_its_own_checkpointed_run(tmp_path, monkeypatch):
    from demul_fast.app import elastic

    mine = _run_folder(tmp_path / "mine", "job-7")
    other = _run_folder(tmp_path / "other", "job-6")
    changed = _run_folder(tmp_path / "changed", "job-7", lr=0.1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not elastic.resumes_own_run(tmp_path / "mine", mine)  # the first attempt starts as asked
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert elastic.resumes_own_run(tmp_path / "mine", dict(mine, resume=False, overwrite=False, workers=0))
    assert not elastic.resumes_own_run(tmp_path / "other", other)  # another job's run
    assert not elastic.resumes_own_run(tmp_path / "changed", changed)  # other settings
    assert not elastic.resumes_own_run(tmp_path / "nothing", mine)  # died before its first checkpoint
    (tmp_path / "mine" / checkpoint.POINTER_FILE).unlink()
    assert not elastic.resumes_own_run(tmp_path / "mine", mine)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert not elastic.resumes_own_run(tmp_path / "other", other)  # not under torchrun


def test_a_restart_removes_only_the_staging_its_own_job_left(tmp_path, monkeypatch):
    """A SIGKILLed first attempt (or one the agent's SIGTERM reached too late) leaves its
    staging folder; the restart of the same job removes it before it starts again, and
    nothing else: another job's staging, an untagged one, the run folder itself."""
    from demul_fast.app import elastic

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    mine = checkpoint.staging_folder(tmp_path / "run", elastic.job_tag())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-6")
    theirs = checkpoint.staging_folder(tmp_path / "run", elastic.job_tag())
    untagged = checkpoint.staging_folder(tmp_path / "run")
    other_run = checkpoint.staging_folder(tmp_path / "run2", elastic.job_tag())
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert mine.name.startswith(".run.partial-" + elastic.job_tag() + "-") and elastic.job_tag() not in theirs.name
    assert checkpoint.remove_staging(tmp_path / "run", elastic.job_tag()) == [mine]
    assert not mine.exists() and theirs.is_dir() and untagged.is_dir() and other_run.is_dir()
    assert (tmp_path / "run").is_dir()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert elastic.job_tag() is None


def test_negative_checkpoint_every_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(out), "--checkpoint-every", "-1"]) == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err and not out.exists()


# -------------------------------------------------------------------------------------------
# torchrun


def torchrun(ws, name, world, *extra, restarts=0, kill=None, expect_rc=0):
    """Train ``runs/name`` on ``world`` processes started by torchrun; returns (stdout, the
    events elastic_entry.py logged, wall seconds)."""
    out = ws["root"] / "runs" / name
    events = ws["root"] / f"{name}.events"
    env = dict(ws["env"], DEMUL_TEST_EVENTS=str(events))
    if kill:
        env["DEMUL_TEST_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "--max-restarts", str(restarts), "--monitor-interval", "0.5", str(HERE / "elastic_entry.py"),
           "train", "--out", str(out), *ws["args"], *extra]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and every worker
        proc.communicate()
        pytest.fail(f"torchrun {name} ({world} processes) did not finish within {LAUNCH_TIMEOUT} s")
    wall = time.monotonic() - t0
    (ws["root"] / f"{name}.stderr").write_text(stderr)
    assert proc.returncode == expect_rc, stderr[-4000:]
    assert "changed" not in stderr, stderr[-2000:]  # elastic_entry.py's guard: a rank > 0 wrote
    log = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    return stdout, log, wall


def one_process(ws, name="one"):
    os.environ["DEMUL_FAST_CACHE"] = ws["env"]["DEMUL_FAST_CACHE"]
    try:
        assert cli.main(["train", "--out", str(ws["root"] / "runs" / name)] + ws["args"]) == 0
    finally:
        del os.environ["DEMUL_FAST_CACHE"]


def uninterrupted(ws, world):
    """The run folder of the plain ``world``-process run (made once per module)."""
    name = f"w{world}"
    if name not in ws["runs"]:
        if world == 1:
            t0 = time.monotonic()
            one_process(ws, name)
            ws["runs"][name] = time.monotonic() - t0
        else:
            stdout, _, wall = torchrun(ws, name, world)
            assert stdout.count('"final"') == 1  # rank 0 alone prints the result
            ws["runs"][name] = wall
    return ws["root"] / "runs" / name


def prompts(run):
    return load_file(str(checkpoint.current(run) / "prompts" / "prompts.safetensors"))


def trainer_state(run):
    return torch.load(checkpoint.current(run) / "trainer_state.pt", weights_only=True)


def assert_same_run(a, b):
    """Bit for bit: the prompts, the optimizer state and the log (but its times and speeds)."""
    pa, pb = prompts(a), prompts(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key
    sa, sb = trainer_state(a), trainer_state(b)
    assert sa["epoch"] == sb["epoch"] == EPOCHS - 1 and sa.get("step") is None
    for (ka, va), (kb, vb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        assert ka == kb and torch.equal(va["momentum_buffer"], vb["momentum_buffer"])
    timed = ("seconds", "steps_per_s")
    la, lb = ([{k: v for k, v in r.items() if k not in timed} for r in run_log(run)] for run in (a, b))
    assert la == lb


@pytest.mark.slow
def test_augmented_prompts_do_not_depend_on_the_world_size(workspace):
    """With augmentation on, 1, 2 and 3 processes train the same prompts: the same images,
    crops and flips in every step; only the reductions' order differs (float32 rounding).
    The 1-image test split is evaluated by 2 and 3 processes, the ranks without an image
    contributing nothing."""
    runs = {w: uninterrupted(workspace, w) for w in (1, 2, 3)}
    config = json.loads((runs[1] / "run.json").read_text())["config"]
    assert config["augment"] and json.loads((runs[3] / "run.json").read_text())["world_size"] == 3
    logs = {w: run_log(r) for w, r in runs.items()}
    assert [r["epoch"] for r in logs[3]] == list(range(1, EPOCHS + 1))
    base = prompts(runs[1])
    for world in (2, 3):
        for a, b in zip(logs[1], logs[world]):
            for key in ("loss", "ce_loss", "distill_loss"):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (world, key, a[key], b[key])
            assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert_same_trained_prompts(base, prompts(runs[world]), f"{world} processes against 1")
    print("wall seconds of the uninterrupted runs:", {w: round(t, 1) for w, t in workspace["runs"].items()})


def _restart_times(events):
    """(seconds from the kill to the restarted attempt's start, from that start to its first
    optimizer step)."""
    kill = next(e["time"] for e in events if e["event"] == "kill")
    start = next(e["time"] for e in events if e["event"] == "start" and e["attempt"] == 1)
    step = next(e["time"] for e in events if e["event"] == "step" and e["attempt"] == 1)
    return start - kill, step - start


@pytest.mark.slow
def test_killed_rank_is_restarted_and_resumes_from_its_step_checkpoint(workspace):
    """2 processes, a checkpoint after every step: rank 1 is SIGKILLed before the 5th step
    (epoch 2, step 2). torchrun --max-restarts 1 restarts both; the new group finds its run
    folder by itself (no --resume; and --overwrite does not replace the job's own run),
    resumes after epoch 2's step 1 and finishes with the uninterrupted run's prompts,
    optimizer state and log, bit for bit."""
    reference = uninterrupted(workspace, 2)
    stdout, events, wall = torchrun(workspace, "killed2", 2, "--checkpoint-every", "1", "--overwrite", restarts=1,
                                    kill="step:1:5")
    assert "restart 1 of this torchrun job: resuming" in stdout
    assert [e["event"] for e in events if e["event"] in ("kill", "start")] == ["start", "kill", "start"]
    restart = next(e for e in events if e["event"] == "start" and e["attempt"] == 1)
    assert restart["checkpoint"] == "checkpoint-0002-step0001"  # taken after epoch 2's first step (step 4)
    assert stdout.count('"final"') == 1
    assert_same_run(reference, workspace["root"] / "runs" / "killed2")
    lost, back = _restart_times(events)
    print(f"restart: kill -> new attempt started {lost:.1f} s, start -> first step {back:.1f} s; whole run "
          f"{wall:.1f} s against {workspace['runs']['w2']:.1f} s uninterrupted")


@pytest.mark.slow
def test_a_job_killed_before_its_first_checkpoint_starts_again(workspace):
    """2 processes with --overwrite over a finished 1-process run: rank 1 is SIGKILLed before
    the 2nd step, before any checkpoint. The restarted group finds no run of its own in
    --out (the old run is another job's), so it starts the run again, replaces the old run
    at its first checkpoint as the first attempt would have, and ends as the uninterrupted
    2-process run; the first attempt's hidden staging folder is gone."""
    import shutil

    reference = uninterrupted(workspace, 2)
    shutil.copytree(uninterrupted(workspace, 1), workspace["root"] / "runs" / "again2")
    stdout, events, _ = torchrun(workspace, "again2", 2, "--overwrite", restarts=1, kill="step:1:2")
    restart = next(e for e in events if e["event"] == "start" and e["attempt"] == 1)
    assert restart["checkpoint"] == f"checkpoint-{EPOCHS:04d}"  # the old run, untouched by attempt 0
    assert "resuming" not in stdout
    out = workspace["root"] / "runs" / "again2"
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert_same_run(reference, out)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".again2.")]


@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(workspace):
    """3 processes, a checkpoint per epoch: rank 0 is SIGKILLed inside the write of epoch 2's
    checkpoint, after its files and before the pointer. The restarted group finds the
    pointer on epoch 1's complete checkpoint (the torn folder beside it ignored), re-runs
    epoch 2 from its start and ends bit for bit as the uninterrupted 3-process run."""
    reference = uninterrupted(workspace, 3)
    stdout, events, wall = torchrun(workspace, "torn3", 3, restarts=1, kill="write:0:2")
    restart = next(e for e in events if e["event"] == "start" and e["attempt"] == 1)
    assert restart["checkpoint"] == "checkpoint-0001" and "checkpoint-0002" in restart["folders"]
    assert stdout.count('"final"') == 1
    out = workspace["root"] / "runs" / "torn3"
    assert_same_run(reference, out)
    assert sorted(p.name for p in out.glob(checkpoint.PREFIX + "*")) == [f"checkpoint-{EPOCHS:04d}"]
    lost, back = _restart_times(events)
    print(f"restart: kill -> new attempt started {lost:.1f} s, start -> first step {back:.1f} s; whole run "
          f"{wall:.1f} s against {workspace['runs']['w3']:.1f} s uninterrupted")


def test_running_sums_of_a_step_checkpoint_go_back_to_their_ranks():
    from demul_fast.app.run_folder import resumed_sums

    state = {"step": 2, "partial": [{"loss": 1.5, "n": 4.0}, {"loss": 2.5, "n": 3.0}]}
    assert [resumed_sums(state, r, 2) for r in (0, 1)] == [(2, {"loss": 1.5, "n": 4.0}), (2, {"loss": 2.5, "n": 3.0})]
    # another world size (an elastic job that lost a node): the totals restart on rank 0
    assert [resumed_sums(state, r, 3) for r in range(3)] == [(2, {"loss": 4.0, "n": 7.0}),
                                                            (2, {"loss": 0.0, "n": 0.0}), (2, {"loss": 0.0, "n": 0.0})]


@pytest.mark.slow
def test_one_process_resumes_a_step_checkpoint_bit_for_bit(workspace, monkeypatch):
    """One process, a checkpoint after every step, stopped (an exception) before its 5th step;
    ``--resume`` continues after epoch 2's first step and ends as the uninterrupted run."""
    reference = uninterrupted(workspace, 1)
    step, count = torch.optim.SGD.step, [0]

    def stop_at_5(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    args = ["--out", str(workspace["root"] / "runs" / "stopped1"), *workspace["args"], "--checkpoint-every", "1"]
    monkeypatch.setenv("DEMUL_FAST_CACHE", workspace["env"]["DEMUL_FAST_CACHE"])
    monkeypatch.setattr(torch.optim.SGD, "step", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", *args])
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = workspace["root"] / "runs" / "stopped1"
    assert checkpoint.current(out).name == "checkpoint-0002-step0001"
    assert cli.main(["train", "--resume", *args]) == 0
    assert_same_run(reference, out)

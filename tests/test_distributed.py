"""Class-sharded DeMul on torch.distributed (gloo on the CPU), 2 and 3 processes spawned here.

The step of W processes (each: its share of the classes, its share of the global batch)
must give the loss and the gradients of the single-process step on the whole global batch:
checked against a float64 single-process reference, within the multiple of the float32
single-process step's own error that tests/numerics.py allows, for C divisible and not
divisible by W, the torch and triton (interpreted) head backends, a linear and an MLP phi,
label smoothing and the entropy regulariser.
"""

import copy
import datetime
import os
import socket
import time

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.model import CLIP

from demul_fast import DeMul
from demul_fast.app import checkpoint
from demul_fast.app.run_folder import run_log
from demul_fast.sharded import ShardedDeMul, shard_bounds
from demul_fast.model import DeMulReference
from numerics import assert_error_rule, assert_same_trained_prompts

TINY_VISION = dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32)
SMALL_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
NAMES = ["cat", "golden_retriever", "x", "sea anemone", "a rather long class name with many words",
         "dog", "tree frog"]
M, N_CTX, D, K, B = 3, 4, 48, 20, 7  # B = 7: no world size divides the global batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, *args, timeout: float = 300.0) -> None:
    """Run worker(rank, world, *args) in ``world`` gloo processes; a failure in any is raised
    here, and all are killed after ``timeout`` seconds."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), worker, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout:.0f} s")


def _models(c, kind, backend, gen, reference=False, **kw):
    """(float64 single-process reference, float32 single-process, float32 to shard); with
    ``reference`` the float32 modules are DeMulReference (full-length encoder, reference head)."""
    torch.manual_seed(0)
    clip64 = CLIP(embed_dim=D, vision_cfg=TINY_VISION, text_cfg=SMALL_TEXT).double().eval()
    tok = open_clip.get_tokenizer("ViT-B-16")
    e = torch.randn(c, K, generator=gen, dtype=torch.float64)
    if kind == "linear":
        phi = torch.nn.Linear(D, K).double()
    else:
        phi = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, K)).double()
    kw = dict(kw, n_prompts=M, n_ctx=N_CTX)
    ref64 = DeMul(clip64, tok, NAMES[:c], llm_embeddings=e, phi=phi, backend="torch", **kw).double()
    with torch.no_grad():
        ref64.ctx.normal_(0, 0.3, generator=gen)
        ref64.head.prompt_logits.normal_(generator=gen)
    clip32 = copy.deepcopy(clip64).float()
    state = {k: v for k, v in ref64.state_dict().items() if not k.startswith("clip_model.")}
    built = []
    cls = DeMulReference if reference else DeMul
    for _ in range(2):
        m = cls(clip32, tok, NAMES[:c], llm_embeddings=e.float(), phi=copy.deepcopy(phi).float(),
                backend=backend, **kw).float()
        m.load_state_dict(state, strict=False)
        built.append(m)
    return ref64, built[0], built[1], tok


def _loss_and_grads(out, module):
    params = [module.ctx, module.head.prompt_logits]
    return [out.loss.detach()] + [g.clone() for g in torch.autograd.grad(out.loss, params)]


def _check_case(rank, world, c, backend, kind="linear", **kw):
    gen = torch.Generator().manual_seed(100 * c + len(backend))  # the same inputs on every rank
    ref64, single, sharded, tok = _models(c, kind, backend, gen, **kw)
    kw.pop("reference", None)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (B,), generator=gen)
    want = _loss_and_grads(ref64(image_features=x, labels=y), ref64)
    base = _loss_and_grads(single(image_features=x.float(), labels=y), single)
    lo, hi = shard_bounds(B, world, rank)
    step = ShardedDeMul(sharded, tok)
    out = step(x[lo:hi].float(), y[lo:hi])
    out.loss.backward()
    step.reduce_gradients()
    got = [out.loss.detach(), sharded.ctx.grad, sharded.head.prompt_logits.grad]
    for name, f, r, p, k in zip(["loss", "dctx", "dA"], got, want, base, [2.0, 3.0, 3.0]):
        assert_error_rule(f"W={world} C={c} {backend} {kind} {kw} {name}", f, r, p, k=k, dtype=torch.float32)
    ref_out = ref64(image_features=x, labels=y)
    assert_error_rule("ce_loss", out.ce_loss, ref_out.ce_loss, single(image_features=x.float(), labels=y).ce_loss,
                      dtype=torch.float32)
    assert torch.equal(out.logits.argmax(-1), ref_out.logits[lo:hi].argmax(-1))
    gathered = [torch.empty_like(got[1]) for _ in range(world)]
    dist.all_gather(gathered, got[1])
    assert all(torch.equal(g, got[1]) for g in gathered), "ranks hold different gradients"


def _head_worker(rank, world, cases):
    for case in cases:
        _check_case(rank, world, **case)


CASES = {  # C divisible and not divisible by the world size, both backends, both kinds of phi
    2: [dict(c=6, backend="torch", entropy_weight=0.2), dict(c=5, backend="triton", label_smoothing=0.1),
        dict(c=5, backend="torch", reference=True)],
    3: [dict(c=6, backend="triton"), dict(c=7, backend="torch", kind="mlp", label_smoothing=0.1,
                                          entropy_weight=0.2)],
}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_step_equals_single_process_step(world):
    spawn(_head_worker, world, CASES[world])


def test_shard_bounds_cover_everything_once():
    for total in range(1, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(total, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


# the global batches at any world size: tests/test_sampling.py


# -------------------------------------------------------------------------------------------
# demul-fast train under torchrun


def _image_folder(root, classes=("blue_checks", "green_stripes", "red_plain"), per_class=6, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            img = rng.normal(60 + 60 * i, 40, (36, 36, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{j}.png")
    return root


def test_train_under_torchrun_equals_one_process(tmp_path):
    """2 processes (3 classes: not divisible; global batch 5 of 12 shots: split 3 + 2) give
    the prompts of the 1-process run within float32 rounding; only rank 0 writes and prints;
    world_size is recorded; a run stopped after epoch 1 resumes under torchrun; the 2-process
    run checkpoints the text encoder's activations, the 1-process run does not."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from clip_tiny import tiny_config
    from demul_fast.app import cli

    data = _image_folder(tmp_path / "data")
    common = ["--data", str(data), "--model", str(tiny_config(tmp_path)), "--pretrained", "none", "--prompts", "2",
              "--n-ctx", "4", "--workers", "0", "--device", "cpu", "--phi-names", "task", "--shots", "4",
              "--batch-size", "5", "--lr", "0.05", "--warmup-epochs", "0", "--no-augment", "--no-progress"]
    env = dict(os.environ, DEMUL_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    os.environ["DEMUL_FAST_CACHE"] = env["DEMUL_FAST_CACHE"]
    try:
        assert cli.main(["train", "--out", str(tmp_path / "one"), "--epochs", "2"] + common) == 0
    finally:
        del os.environ["DEMUL_FAST_CACHE"]

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "demul_fast.cli", "train", "--out", str(tmp_path / "two")] + list(args) + common
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    # The cosine schedule's first epoch has lr = --lr for any --epochs (no warm-up), so 1 epoch
    # and a resume to 2 follow the same schedule as the straight 2-epoch run.
    first = torchrun("--epochs", "1", "--checkpoint-text")  # exact: the same prompts
    assert first.count('"final"') == 1  # rank 0 alone prints
    out = torchrun("--epochs", "2", "--resume", "--checkpoint-text")
    assert out.count('"final"') == 1
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["config"]["checkpoint_text"] and run["world_size"] == 2 and json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1
    logs = [run_log(tmp_path / d) for d in ("one", "two")]
    assert [r["world_size"] for r in logs[1]] == [2, 2] and [r["epoch"] for r in logs[1]] == [1, 2]
    for a, b in zip(*logs):
        for key in ("loss", "ce_loss", "distill_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a[key], b[key])
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
    one = load_file(str(checkpoint.current(tmp_path / "one") / "prompts" / "prompts.safetensors"))
    two = load_file(str(checkpoint.current(tmp_path / "two") / "prompts" / "prompts.safetensors"))
    assert_same_trained_prompts(one, two, "2 processes against 1")

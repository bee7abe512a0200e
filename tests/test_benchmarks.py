"""The benchmark harness (benchmarks/): a smoke run on a tiny preset, the floor arithmetic,
and the correctness gate catching a provider that computes the wrong thing."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import floors, harness, head, measure, run  # noqa: E402
from benchmarks.workload import Provider  # noqa: E402

FAST = ["--budget", "0", "--warmup", "0", "--quiet", "--no-compile", "--ceiling-mib", "4", "--ceiling-n", "128"]
ROW_FIELDS = {"suite", "op", "mode", "provider", "status", "sizes", "dtype", "time_ms", "q20_ms", "q80_ms",
              "speedup_vs_eager", "peak_mem_bytes", "floor_ms", "floor_bound", "frac_of_floor", "max_rel_error",
              "tolerance", "note"}
META_FIELDS = {"run_id", "date", "device", "device_name", "torch", "triton", "git", "preset", "ceilings"}


def test_smoke_all_suites_tiny_preset(tmp_path, capsys):
    rc = run.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path), *FAST])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for suite in ("head", "encoder", "step"):
        assert f"[{suite}] rows:" in printed
    lines = (tmp_path / "tiny-cpu.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for r in rows:
        assert ROW_FIELDS | META_FIELDS <= set(r), sorted(ROW_FIELDS | META_FIELDS - set(r))
        assert r["status"] in ("ok", "skipped"), r
        assert r["preset"] == "tiny" and r["device"] == "cpu"
    ok = {(r["suite"], r["op"], r["mode"], r["provider"]) for r in rows if r["status"] == "ok"}
    for op in head.OPS:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert ("head", op, mode, "eager") in ok
            assert ("head", op, mode, "torch") in ok  # the torch backend (K-free with the basis)
    assert "one-time distill basis" in printed
    assert all(r["distill_basis"]["basis_mb"] > 0 for r in rows)
    assert ("encoder", "encoder", "fwd+bwd", "eager") in ok
    assert ("step", "step", "fwd+bwd", "eager") in ok
    steps = [r for r in rows if r["suite"] == "step" and r["status"] == "ok"]
    assert {r["provider"] for r in steps} >= {"eager", "demul-torch"}
    assert all(r["launches_per_step"] > 0 and r["launches"]["syncs"] >= 0 for r in steps), steps
    for r in rows:
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["floor_ms"] > 0 and 0 < r["frac_of_floor"]
            assert r["max_rel_error"] <= r["tolerance"]
            if r["provider"] == "eager":
                assert r["speedup_vs_eager"] == pytest.approx(1.0)
        else:
            assert r["note"], r  # a skip always says why
    skipped = {r["provider"]: r["note"] for r in rows if r["status"] == "skipped"}
    assert "compile" in skipped and "--compile" in skipped["compile"]


def test_head_cost_known_sizes():
    C, M, D, B, K, e = 10, 2, 4, 3, 5, 4
    agg = floors.head_cost("aggregate_prompts", "fwd", C, M, D, B, K, e)
    assert agg.bytes == e * (C * M * D + C * M + C * D) == 4 * (80 + 20 + 40)
    assert agg.flops == 5 * C * M * D + 4 * C * D
    r = min(K, D)  # the K-free form of SPEC 4.3: the float32 basis R, c, F, delta, beta is read
    dist_f = floors.head_cost("prompt_distill_loss", "fwd", C, M, D, B, K, e)
    assert dist_f.bytes == e * C * M * D + 4 * (r * D + r + C * r + C + 1) + 4
    assert dist_f.flops == 2 * C * M * D * r + 6 * C * M * r + 3 * C * M * D
    dist_b = floors.head_cost("prompt_distill_loss", "bwd", C, M, D, B, K, e)
    both = floors.head_cost("prompt_distill_loss", "fwd+bwd", C, M, D, B, K, e)
    assert both.bytes == dist_f.bytes + dist_b.bytes and both.flops == dist_f.flops + dist_b.flops
    ce = floors.head_cost("cosine_cross_entropy", "bwd", C, M, D, B, K, 2)
    assert ce.bytes == 2 * (B * D + C * D) + 8 * B + 2 * C * D
    with pytest.raises(ValueError):
        floors.head_cost("nope", "fwd", C, M, D, B, K, e)


def test_imagenet_distill_floor_numbers():
    # ImageNet distillation in the K-free form: 2*C*M*D*r = 2*1000*8*512*512 = 4.2 GFLOP (the
    # direct form's 25.2 / 6). At 100 TFLOP/s and 1 TB/s the compute term (42 us) beats the
    # memory term (bf16 T 8.2 MB + the float32 basis 3.1 MB).
    cost = floors.head_cost("prompt_distill_loss", "fwd", 1000, 8, 512, 256, 3072, 2)
    assert cost.flops == pytest.approx(2 * 1000 * 8 * 512 * 512 + 6 * 8000 * 512 + 3 * 8000 * 512)
    ceil = floors.Ceilings(bandwidth=1e12, matmul_rate=100e12, copy_bytes=1, matmul_n=1, dtype="bfloat16")
    fl = floors.floor(cost, ceil)
    assert fl.bound == "compute"
    assert fl.compute_s == pytest.approx(cost.flops / 100e12)
    basis = 4 * (512 * 512 + 512 + 1000 * 512 + 1000 + 1)
    assert fl.memory_s == pytest.approx((2 * 8000 * 512 + basis) / 1e12 + 4e-12)
    assert floors.fraction_of_floor(2 * fl.seconds, fl) == pytest.approx(0.5)


def test_encoder_cost_counts_prefix_once():
    # 2 prompts, 3 context tokens (P = 4), suffixes of 2 and 3 tokens; width 8, 1 layer.
    cost = floors.encoder_cost("fwd", n_prompts=2, n_ctx=3, suffix_lengths=[2, 3], width=8, layers=1,
                               embed_dim=6, weight_bytes=1000, e=4)
    tokens = 2 * 4 + 2 * (2 + 3)
    keys = 2 * (4 * 5 // 2) + 2 * ((4 * 2 + 3) + (4 * 3 + 6))
    assert cost.flops == tokens * 2 * (4 * 64 + 8 * 64) + 4 * 8 * keys + 2 * 2 * 2 * 8 * 6
    assert cost.bytes == 1000 + 4 * (2 * 3 * 8 + 2 * 2 * 6)


def test_ceilings_measured_on_cpu():
    c = floors.measure_ceilings(torch.device("cpu"), torch.float32, copy_bytes=1 << 20, matmul_n=64, reps=1)
    assert c.bandwidth > 0 and c.matmul_rate > 0 and c.dtype == "float32"


def test_wrong_provider_is_reported_wrong_not_timed():
    sizes = dict(C=7, M=3, D=16, B=5, K=12, label_smoothing=0.0)
    wl, = head.workloads(sizes, torch.float32, torch.device("cpu"), ops=("demul_head",))
    wl.modes = ("fwd+bwd",)
    good = Provider("good-copy", lambda i: head.REFERENCE["demul_head"](*head._args("demul_head", i)))

    def off_by_a_little(i):  # alpha read as 1.1: a plausible bug, a few percent off
        args = list(head._args("demul_head", i))
        args[8] = 1.1
        return head.REFERENCE["demul_head"](*args)

    def no_prompt_gradient(i):  # the loss is right but A receives no gradient
        args = list(head._args("demul_head", i))
        args[1] = args[1].detach()
        return head.REFERENCE["demul_head"](*args)

    wl.providers = [wl.providers[0], good, Provider("bad-alpha", off_by_a_little),
                    Provider("bad-grad", no_prompt_gradient)]
    ceil = floors.Ceilings(bandwidth=1e10, matmul_rate=1e10, copy_bytes=1, matmul_n=1, dtype="float32")
    rows = {r.provider: r for r in harness.run_workload(wl, ceil, harness.Settings(warmup_s=0, budget_s=0))}
    assert rows["eager"].status == "ok" and rows["good-copy"].status == "ok"
    assert rows["good-copy"].time_ms > 0
    for name in ("bad-alpha", "bad-grad"):
        assert rows[name].status == "wrong", rows[name]
        assert rows[name].time_ms is None  # not timed
        assert rows[name].max_rel_error > rows[name].tolerance
        assert "disagrees with the reference" in rows[name].note
    assert rows["bad-grad"].errors["grad:A"] == float("inf")  # no gradient at all


def test_raising_provider_is_an_error_row():
    sizes = dict(C=5, M=2, D=8, B=3, K=4, label_smoothing=0.0)
    wl, = head.workloads(sizes, torch.float32, torch.device("cpu"), ops=("prompt_distill_loss",))

    def boom(i):
        raise RuntimeError("kernel launch failed")

    wl.providers = [wl.providers[0], Provider("boom", boom)]
    ceil = floors.Ceilings(bandwidth=1e10, matmul_rate=1e10, copy_bytes=1, matmul_n=1, dtype="float32")
    rows = harness.run_workload(wl, ceil, harness.Settings(warmup_s=0, budget_s=0))
    boom_rows = [r for r in rows if r.provider == "boom"]
    assert len(boom_rows) == 3 and all(r.status == "error" and "kernel launch failed" in r.note for r in boom_rows)


def test_gate_tolerance_and_errors():
    g = torch.tensor([3.0, 4.0])
    assert measure.rel_error(torch.tensor([3.0, 4.5]), g) == pytest.approx(0.1)
    assert measure.rel_error(torch.tensor([float("nan"), 4.0]), g) == float("inf")
    assert measure.rel_error(torch.tensor([3.0]), g) == float("inf")
    assert measure.gate_tolerance(torch.float32, 1e-7) == measure.GATE_FLOOR[torch.float32]
    assert measure.gate_tolerance(torch.bfloat16, 0.1) == pytest.approx(1.0)


def test_rotation_count():
    s = harness.Settings(rotate_bytes=100)
    assert harness.n_rotations(1000, s) == 1
    assert harness.n_rotations(50, s) == 2
    assert harness.n_rotations(1, s) == 8


def test_timing_statistics():
    calls = []
    t = measure.time_calls(lambda i: calls.append(i), lambda i: None, torch.device("cpu"), warmup_s=0,
                           budget_s=0, min_reps=5)
    assert t.reps == 5 and t.q20_s <= t.median_s <= t.q80_s
    assert calls == list(range(len(calls))) and len(calls) == 7  # first call, one warm-up, 5 timed


def test_triton_provider_wired_under_interpreter(tmp_path, capsys, monkeypatch):
    # run.main sets both variables; monkeypatch puts them back afterwards
    monkeypatch.setenv("DEMUL_FAST_BENCH_INTERPRET", "0")
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    from demul_fast.ops.backends import why_not
    if why_not("triton", torch.device("cpu"), torch.float32) is not None and torch.cuda.is_available():
        pytest.skip("the interpreter check is for CPU machines")
    rc = run.main(["--preset", "tiny", "--device", "cpu", "--suite", "head", "--op", "aggregate_prompts",
                   "--op", "prompt_distill_loss",
                   "--providers", "eager,triton", "--interpret", "--out", str(tmp_path), *FAST])
    assert rc == 0, capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "tiny-cpu.jsonl").read_text().splitlines()]
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert len(triton_rows) == 6 and all(r["status"] == "ok" for r in triton_rows), triton_rows


def test_missing_open_clip_is_a_skip_not_a_crash(monkeypatch):
    from benchmarks import models

    def no_open_clip(*args, **kwargs):
        raise ImportError("No module named 'open_clip'", name="open_clip")

    monkeypatch.setattr(models, "encoder_workload", no_open_clip)
    monkeypatch.setattr(models, "step_workload", no_open_clip)
    sizes = dict(run.PRESETS["tiny"], label_smoothing=0.0)
    wls = models.workloads(("encoder", "step"), sizes, torch.float32, torch.device("cpu"))
    ceil = floors.Ceilings(bandwidth=1e10, matmul_rate=1e10, copy_bytes=1, matmul_n=1, dtype="float32")
    rows = harness.run(wls, ceil, harness.Settings(), quiet=True)
    assert {r.suite for r in rows} == {"encoder", "step"}
    assert all(r.status == "skipped" and "open_clip" in r.note for r in rows)

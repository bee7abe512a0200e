"""The compiled-code report (benchmarks/compiled.py) at the imagenet preset, checked in CI
without a GPU: the Triton kernels are compiled for sm_90a and read back with ptxas -v, the
step is traced in Triton's interpreter (benchmarks/compiled_trace.py), the reference on
the meta device, and the time model (benchmarks/compiled_model.py) applied per card.

Checks: the report's fields (per kernel l2_bytes, hbm_bytes, latency_us, launch_us,
modelled_us; per card the ceilings, head, eager, compile and floor times); the traced bytes
against what the kernels must move (a kernel re-reading more than the bound allows fails);
latency terms present where loops run without a dot; every matmul on wgmma with float32
accumulators, no spills, no ptxas performance warning (C7515: serialised wgmma); no
zero-filled gradient, no per-step cast of the basis, no d-scale work with a frozen scale
(host ops of the trace); the modelled goals of issue 26 (10x eager, 3x torch.compile and 2.5x
the floor for the Triton head, the CUDA head within 1.5x of Triton's, on both cards and, for
the CUDA goal, in both modes); and the committed report
(benchmarks/results/compiled/imagenet.json) equal to the regenerated one up to rounding.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks import compiled, compiled_model, compiled_trace, compiled_triton  # noqa: E402
from demul_fast.kernels import cosine_ce, text_head  # noqa: E402
if compiled_triton.unavailable_reason():
    pytest.skip(compiled_triton.unavailable_reason(), allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "compiled", "imagenet.json")
CARDS = ("h100", "h200")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report as the command line writes it, in a process without TRITON_INTERPRET
    (the compiler must see the kernels; the trace runs in its own subprocess)."""
    out = tmp_path_factory.mktemp("compiled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compiled.py"), "--preset", "imagenet",
                          "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    print(run.stdout[-3000:], run.stderr[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MODELLED" in run.stdout
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    rep["dir"] = str(out)
    return rep


def _kernels(report, mode="frozen", backend="triton"):
    return {k["name"]: k for k in report["kernels"] if k["backend"] == backend and k["mode"] == mode}


MATMUL = ["text_fwd", "text_bwd", "ce_fwd", "ce_grad", "ce_du"]
# fwd_finish: the CE merge, the distillation finish and (its last program) the losses, one launch
FROZEN = MATMUL + ["fwd_finish"]
TRAINED = FROZEN + ["ce_dx", "ce_dx_finish"]


def test_report_schema(report):
    assert set(_kernels(report, "frozen")) == set(FROZEN)
    assert set(_kernels(report, "trained")) == set(TRAINED)
    for k in report["kernels"]:
        assert {"name", "backend", "mode", "grid", "mma", "flops", "l2_bytes", "hbm_bytes", "rounds", "latency_us",
                "launch_us", "modelled_us"} <= set(k)
        for card in CARDS:
            assert k["modelled_us"][card] == pytest.approx(
                k["launch_us"][card] + k["latency_us"][card]
                + max(k["l2_bytes"] / (report["cards"][card]["ceilings"]["l2_tb_s"] * 1e6),
                      k["hbm_bytes"] / (report["cards"][card]["ceilings"]["hbm_tb_s"] * 1e6),
                      k["flops"] / (report["cards"][card]["ceilings"]["peak_tflops"][k["mma"]] * 1e6)), rel=1e-3)
            assert k["launch_us"][card] > 0
    for card in CARDS:
        c = report["cards"][card]
        assert {"ceilings", "head_fwd_bwd_us", "eager_fwd_bwd_us", "compile_fwd_bwd_us", "floor_us"} <= set(c)
        assert {"hbm_tb_s", "l2_tb_s", "peak_tflops", "launch_us", "round_us"} <= set(c["ceilings"])
    # the old figure, kept once beside the new
    assert report["old_model"]["head_fwd_bwd_us"]["triton"] < report["cards"]["h100"]["head_fwd_bwd_us"]
    for k in _kernels(report).values():
        assert os.path.getsize(os.path.join(report["dir"], k["ptx"])) > 0


def test_head_total_is_its_kernels_and_host_ops(report):
    for card in CARDS:
        for mode in compiled.MODES:
            ks = _kernels(report, mode).values()
            host = [h for h in report["host_ops"] if h["backend"] == "triton" and h["mode"] == mode]
            total = sum(k["modelled_us"][card] for k in ks) + sum(h["modelled_us"][card] for h in host)
            assert report["cards"][card]["head_fwd_bwd_us_by_backend"]["triton"][mode] == pytest.approx(total, rel=1e-3)


def test_traced_bytes_bound_what_the_kernels_must_move(report):
    """The trace's device-memory bytes cover each kernel's compulsory traffic (a trace that
    misses loads fails), and L2 traffic stays within a stated factor of it (a kernel that
    re-reads its tiles more, e.g. T once per r chunk as before issue 26, fails)."""
    s = report["sizes"]
    C, M, D, B, K = s["C"], s["M"], s["D"], s["B"], s["K"]
    r, e = min(K, D), 2
    k = _kernels(report)
    t_bytes, v_bytes = e * C * M * D, e * C * M * r
    must = {"text_fwd": t_bytes + v_bytes + e * r * D, "text_bwd": 2 * t_bytes + v_bytes + e * r * D,
            "ce_fwd": e * B * D + e * C * D, "ce_grad": e * B * D + e * C * D + e * B * C}  # u^ in X's type
    for name, nbytes in must.items():
        # the sampled trace: within 10%, 15% for the CE passes (5 of their 32 class splits
        # sampled, the last one partial: U's extrapolated reads come out low)
        assert k[name]["hbm_bytes"] >= (0.85 if name.startswith("ce_") else 0.9) * nbytes, name
    cfg = text_head.text_config(C, M, D, r)
    # text_fwd: its row tile once per program (tiles x splits programs) and once more for the
    # aggregation of the 128-row tiles, v written once, each program's share of R and F once;
    # R triangular (the head's basis): of the 4 x groups piece products of a row tile, the
    # blocks of R below the diagonal are never read (10 of 16 at D = r)
    # (before issue 26: T 3-5 times per program, 143.8 MB; 64-row tiles: R once per 64 rows, 94.6 MB;
    # 128-row tiles, all of R: 70.2 MB)
    tiles, splits = cfg["fwd_tiles"], cfg["splits"]
    assert k["text_fwd"]["grid"] == tiles * splits
    assert cfg["TRI"]
    groups = -(-r // (cfg["BLOCK_D"] // 4))
    r_share = sum(4 - g for g in range(groups)) / (4 * groups)
    bound = (splits + (1 if cfg["AGG_PARTS"] else 0)) * t_bytes + v_bytes + r_share * tiles * e * r * D + 4 * C * r
    assert k["text_fwd"]["l2_bytes"] <= 1.1 * bound, (k["text_fwd"]["l2_bytes"], bound)
    # text_bwd: per output chunk the row tile's v and F once (at most: R triangular, a chunk
    # reads the columns of r left of its diagonal), its own chunk of T, gu, u^ once, the dU
    # pass's partial sums over D per chunk, R once per row tile, dT written once; no sweep of T
    # per chunk (64-row tiles: 131.8 MB; 128-row tiles with the sweep per chunk: 99.1 MB)
    ce = cosine_ce.ce_config(B, C, D)
    chunks, tiles = cfg["out_chunks"], cfg["bwd_tiles"]
    assert k["text_bwd"]["grid"] == tiles * chunks
    partials = ce["du_chunks"] * (2 * 4 * C * M + 4 * C)
    bound = chunks * (v_bytes + 4 * C * r + partials) + 2 * t_bytes + 8 * C * D + tiles * e * r * D
    assert k["text_bwd"]["l2_bytes"] <= 1.1 * bound, (k["text_bwd"]["l2_bytes"], bound)
    # the CE passes: the image tile once per program, u^ (in X's type) once per image tile
    for name in ("ce_fwd", "ce_grad"):
        bound = ce["b_tiles"] * ce["splits"] * e * 64 * D + ce["b_tiles"] * e * C * D + (e * B * C if name == "ce_grad"
                                                                                          else 0)
        assert k[name]["l2_bytes"] <= 1.1 * bound + 1e6, (name, k[name]["l2_bytes"], bound)
    # the dU pass: per program its column chunk of X and its classes' columns of BG, dU written
    # once; its sweep for the text backward: T, the float32 u^ once, the partial sums written
    programs = ce["du_tiles"] * ce["du_chunks"]
    assert k["ce_du"]["grid"] == programs
    bound = programs * e * B * (ce["BLOCK_DU"] + cosine_ce.BLOCK_CU) + 4 * C * D + t_bytes + 4 * C * D + partials
    assert k["ce_du"]["l2_bytes"] <= 1.1 * bound, (k["ce_du"]["l2_bytes"], bound)
    assert k["fwd_finish"]["l2_bytes"] < 1e6


def test_latency_terms(report):
    """Loops without a dot pay dependent-load rounds: the forward finish (the CE merge, the
    distillation finish, the losses in its last program) has some; the CE merge loads its
    splits in one round (issue 26: one round per split before); latency_us = waves x rounds x
    round time."""
    k = _kernels(report)
    assert k["fwd_finish"]["rounds"] >= 1 and k["fwd_finish"]["latency_us"]["h100"] > 0
    assert k["fwd_finish"]["rounds"] <= 3, k["fwd_finish"]["rounds"]  # the merge 1, the distillation finish 2
    for row in k.values():
        card = report["cards"]["h100"]["ceilings"]
        assert row["latency_us"]["h100"] >= row["rounds"] * card["round_us"] - 1e-9


@pytest.mark.parametrize("name", MATMUL + ["ce_dx"])
def test_matmul_kernels_use_wgmma(report, name):
    assert _kernels(report, "trained")[name]["mma"] == "wgmma"


@pytest.mark.parametrize("name", TRAINED)
def test_no_spills_no_performance_warnings(report, name):
    """No spills, and no ptxas performance warning: C7515 (wgmma serialised because a
    non-wgmma instruction defines accumulator registers mid-pipeline) came from the text
    backward's runtime loop bound over r; RANK and D are compile-time constants now."""
    k = _kernels(report, "trained")[name]
    assert k["spill_bytes"] == 0
    assert not k["ptxas_warnings"], k["ptxas_warnings"]


def test_shared_memory_fits(report):
    for k in _kernels(report, "trained").values():
        assert k["smem_bytes"] <= compiled.SMEM_LIMIT, k["name"]


def test_host_ops_of_a_step(report):
    """No zero-filled gradient (set_materialize_grads(False): before, 11 fills, v's 8 MB
    among them), no cast of the basis per step, no d-scale reduction with a frozen scale."""
    for mode in compiled.MODES:
        host = [h for h in report["host_ops"] if h["backend"] == "triton" and h["mode"] == mode]
        fills = [h for h in host if h["op"] in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros")]
        assert not fills, fills  # the zero for a loss gradient autograd leaves out is kept per device
        assert not [h for h in host if h["op"] in ("to", "_to_copy") and h["read_bytes"] > 1e5], host
        assert not [h for h in host if h["op"] in ("sum", "div")], host


@pytest.mark.parametrize("card", CARDS)
def test_eager_and_compile_goals(report, card):
    """Issue 26's goals against the baselines, modelled with the new model on both cards:
    the Triton head at least 10x under the eager reference and 3x under torch.compile of it
    (docs/kernel-model.md)."""
    c = report["cards"][card]
    assert c["eager_fwd_bwd_us"] >= 10 * c["head_fwd_bwd_us"], (c["eager_fwd_bwd_us"], c["head_fwd_bwd_us"])
    assert c["compile_fwd_bwd_us"] >= 3 * c["head_fwd_bwd_us"], (c["compile_fwd_bwd_us"], c["head_fwd_bwd_us"])


def test_floor_goal(report):
    """Issue 26's goal against the floor, on both cards: the Triton head within 2.5x of the
    floor at the stated ceilings."""
    for card in CARDS:
        c = report["cards"][card]
        assert c["head_fwd_bwd_us"] <= 2.5 * c["floor_us"], (card, c["head_fwd_bwd_us"], c["floor_us"])


def test_cuda_goal(report):
    """Issue 26's goal for the CUDA head, on both cards and both modes: within 1.5x of the
    Triton head's modelled time (1.42x / 1.45x X frozen / trained on the H100, 1.44x / 1.46x
    on the H200 at the committed report)."""
    for card in CARDS:
        by = report["cards"][card]["head_fwd_bwd_us_by_backend"]
        if "cuda" not in by:
            pytest.skip("no CUDA rows in the report: neither the built extension nor nvcc and cuobjdump were found")
        for mode in ("frozen", "trained"):
            assert by["cuda"][mode] <= 1.5 * by["triton"][mode], (card, mode, by["cuda"][mode], by["triton"][mode])


@pytest.mark.parametrize("name", MATMUL + ["ce_dx"])
def test_tensor_core_products_accumulate_in_float32(report, name):
    """Float32 accumulation, read from the compiled code: every warpgroup MMA of a Triton
    kernel has a .f32 accumulator (wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16)."""
    k = _kernels(report, "trained")[name]
    with open(os.path.join(report["dir"], k["ptx"])) as f:
        mma = [line.strip() for line in f if "wgmma.mma_async" in line]
    assert mma, f"{name}: no wgmma in its PTX"
    bad = [line for line in mma if not re.search(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.f32\.", line)]
    assert not bad, f"{name}: wgmma without an f32 accumulator: {bad[:3]}"


def _numbers(x, path=""):
    """{path: number} of every number in a JSON value (lists by index, dicts by key)."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return {}
    if isinstance(x, (int, float)):
        return {path: float(x)}
    items = x.items() if isinstance(x, dict) else enumerate(x)
    out = {}
    for k, v in items:
        out.update(_numbers(v, f"{path}/{k}"))
    return out


def test_committed_report_is_regenerated(report):
    """benchmarks/results/compiled/imagenet.json is what this code generates: every number
    of the committed file equal to the regenerated one within 1% (the trace's per-tensor
    extrapolation and ptxas versions aside), for the backends regenerated here."""
    with open(COMMITTED) as f:
        saved = json.load(f)
    backends = {k["backend"] for k in report["kernels"]}
    # formula rows (no CPU emulation here to trace the CUDA kernels) are not compared with the
    # committed traced ones; test_cuda_rows_are_traced says why they are formulas
    if any(k["backend"] == "cuda" and not k.get("traced") for k in report["kernels"]):
        backends.discard("cuda")
    pick = (lambda rep: [k for k in rep["kernels"] if k["backend"] in backends])
    assert [(k["name"], k["backend"], k["mode"]) for k in pick(saved)] == \
        [(k["name"], k["backend"], k["mode"]) for k in pick(report)], "the committed report lists other launches"
    keys = ("grid", "flops", "l2_bytes", "hbm_bytes", "rounds", "modelled_us", "latency_us")
    new = _numbers([{k: x.get(k) for k in keys} for x in pick(report)] + [report["host_ops"]])
    old = _numbers([{k: x.get(k) for k in keys} for x in pick(saved)] + [saved["host_ops"]])
    assert new.keys() == old.keys()
    bad = {p: (old[p], new[p]) for p in new if not math.isclose(old[p], new[p], rel_tol=0.01, abs_tol=1e-3)}
    assert not bad, f"regenerate benchmarks/results/compiled (python benchmarks/compiled.py): {list(bad.items())[:8]}"
    for card in CARDS:
        for key in ("eager_fwd_bwd_us", "compile_fwd_bwd_us", "floor_us"):
            assert math.isclose(saved["cards"][card][key], report["cards"][card][key], rel_tol=0.01), (card, key)


def test_cuda_rows_are_traced(report):
    """Issue 26: the CUDA kernels' bytes come from a trace of their loads and stores (the
    instrumented CPU emulation, benchmarks/compiled_cuda.trace_head), not from formulas; the
    formulas, kept as ``bytes``, agree with the trace within 5% for every kernel over 1 MB
    (a formula that forgets a re-read, or a kernel that re-reads what its formula says it
    reads once, fails here)."""
    from benchmarks import compiled_cuda  # noqa: PLC0415

    rows = [k for k in report["kernels"] if k["backend"] == "cuda"]
    if not rows:
        pytest.skip("no CUDA rows in the report: neither the built extension nor nvcc and cuobjdump were found")
    reason = compiled_cuda.trace_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CUDA rows are formulas here: the trace needs the CPU emulation: {reason}")
    assert all(k["traced"] for k in rows), [k["name"] for k in rows if not k["traced"]]
    off = {(k["mode"], k["name"]): round(k["l2_bytes"] / k["bytes"], 3) for k in rows
           if k["bytes"] > 1e6 and not 0.95 <= k["l2_bytes"] / k["bytes"] <= 1.05}
    assert not off, f"formula and trace disagree (trace / formula): {off}"


def test_sample_grid_weights():
    """The tracer runs first, last and spaced programs of each axis; the weights add up to the grid."""
    for grid in [(1, 1, 1), (5, 1, 1), (125, 2, 1), (4, 63, 1), (16, 16, 1)]:
        w = compiled_trace.sample_grid(grid, 5)
        assert sum(w.values()) == pytest.approx(math.prod(grid))
        assert (0, 0, 0) in w and tuple(g - 1 for g in grid) in w

"""Evidence without a GPU: the extension's machine code (SASS, read with cuobjdump from the
built extension, or from csrc/*.cu compiled here for sm_90a by nvcc when it is not built).

* Every GEMM-bearing kernel (a ``__global__`` function of csrc/ whose body calls
  ``tile_dot`` or accumulates with a ``ChunkAcc``, the two tile products of common.cuh and
  sweep.cuh, found by reading the sources, so a new one cannot escape) has tensor-core
  instructions (HMMA: ``mma.sync``, HGMMA: warpgroup MMA) in each of its bfloat16 and
  float16 instantiations. Float32 instantiations run the float32 SIMT path by design (no
  TF32): they have FFMA and no HMMA.
* No kernel spills: no local memory, no stack frame, no LDL/STL instruction.

Runs in CI without a GPU (cuobjdump ships with Triton's NVIDIA backend).
"""

import pathlib
import re

import pytest

from benchmarks import compiled_cuda as cc

REASON = cc.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))
CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
SIXTEEN_BIT = {"bfloat16": "13__nv_bfloat16", "float16": "6__half"}


def gemm_kernels_in_source():
    """Names of the __global__ functions of csrc/ whose body calls tile_dot or uses a ChunkAcc."""
    names = set()
    for path in sorted(CSRC.glob("*.cu*")):
        text = path.read_text()
        for chunk in text.split("__global__")[1:]:
            head = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", chunk)
            name = re.search(r"(\w+)\s*\(", head).group(1)
            # the body runs to the next kernel, or the end of the file: enough to see a call
            if any(call in chunk for call in ("tile_dot(", "ChunkAcc<", "ChunkAccK<", "SliceAcc<")):
                names.add(name)
    return names


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return cc.read_binaries(str(tmp_path_factory.mktemp("cuda_sass")))


def instantiations(sass, name):
    return {k: v for k, v in sass.items() if re.search(rf"\d+{name}I", k)}


def test_the_source_scan_finds_the_gemm_kernels():
    assert {"ce_forward_partial_kernel", "distill_forward_partial_kernel", "distill_forward_tile_kernel",
            "sweep_kernel", "ce_grad_kernel", "ce_class_grad_kernel", "text_backward_kernel"} <= gemm_kernels_in_source()


@pytest.mark.parametrize("dtype", sorted(SIXTEEN_BIT))
def test_every_gemm_kernel_uses_tensor_cores_in_16_bit(binary, dtype):
    sass, _ = binary
    for name in sorted(gemm_kernels_in_source()):
        found = {k: v for k, v in instantiations(sass, name).items() if SIXTEEN_BIT[dtype] in k}
        assert found, f"no {dtype} instantiation of {name} in the extension"
        for symbol, code in found.items():
            assert cc.mma_kind(code) in ("mma.sync", "wgmma"), f"{symbol} has no HMMA/HGMMA instruction"


def test_float32_gemm_kernels_stay_float32(binary):
    """Float32 inputs keep float32 products (TF32 would show as HMMA.1684.F32.TF32)."""
    sass, _ = binary
    for name in sorted(gemm_kernels_in_source()):
        found = {k: v for k, v in instantiations(sass, name).items()
                 if not any(tag in k for tag in SIXTEEN_BIT.values())}
        assert found, f"no float32 instantiation of {name}"
        for symbol, code in found.items():
            assert cc.count(code, "FFMA") > 0 and cc.mma_kind(code) == "none", symbol


def test_no_kernel_spills(binary):
    sass, res = binary
    assert len(sass) >= 20, f"only {len(sass)} kernels found: is this the demul_fast extension?"
    for symbol, code in sass.items():
        use = res[symbol]
        assert use.get("LOCAL", 0) == 0 and use.get("STACK", 0) == 0, f"{symbol} uses local memory: {use}"
        assert cc.count(code, "LDL") == 0 and cc.count(code, "STL") == 0, f"{symbol} spills (LDL/STL)"


def test_count_reads_opcodes_not_operands():
    line = "        /*0a30*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;"
    assert cc.count(line, "HMMA") == 1
    assert cc.count(line, "FFMA") == 0
    assert cc.count("        /*0040*/              @P0 STL [R1], R2 ;", "STL") == 1


def test_compiled_report_lists_every_launch(tmp_path):
    """benchmarks/compiled_cuda.collect: one entry per kernel launch of the head (X frozen;
    X trained adds the image-side sweep and normalisation), its SASS written out, the GEMM
    launches on tensor cores in bfloat16, the grids from the extension's own launch plan
    (_C.head_launch_plan: csrc/ops.h plan_head)."""
    sizes = cc.preset_sizes("imagenet")
    plan = cc.launch_plan(sizes["C"], sizes["M"], sizes["B"], min(sizes["K"], sizes["D"]), D=sizes["D"])
    # the formula rows (trace=False): the traced ones are test_compiled_report's
    frozen = cc.collect("imagenet", str(tmp_path), "bfloat16", trace=False)
    trained = cc.collect("imagenet", str(tmp_path), "bfloat16", mode="trained", trace=False)
    keys = {"name", "backend", "sass", "grid", "mma", "regs", "spill_bytes", "smem_bytes", "flops", "bytes",
            "l2_bytes", "hbm_bytes", "rounds", "traced", "time_kind"}
    # six launches at imagenet, X frozen (M = 8: the aggregation, the image norms and dA ride on
    # other kernels; one merge for both losses)
    assert [x["name"] for x in frozen] == ["cuda fwd distill + aggregate + image norms", "cuda fwd cosine ce",
                                           "cuda fwd loss merge", "cuda bwd ce grad", "cuda bwd ce class grad",
                                           "cuda bwd text"]
    assert len(trained) > len(frozen)
    for x in frozen + trained:
        assert keys <= set(x) and x["backend"] == "cuda" and x["time_kind"] == "modelled" and not x["traced"]
        assert (tmp_path / x["sass"]).read_text() and isinstance(x["grid"], int) and x["grid"] >= 1
        assert x["spill_bytes"] == 0
        gemm = any(re.search(rf"\d+{k}I", x["kernel"]) for k in gemm_kernels_in_source())
        assert (x["mma"] == "mma.sync") == gemm, x["name"]
    by = {x["name"]: x for x in frozen}
    tiles = -(-sizes["C"] * sizes["M"] // plan["distill_tile_rows"])
    # the image norms ride on the distillation's forward: image_norm_blocks extra columns of blocks
    assert plan["image_norms_fused"] and "cuda fwd image norms" not in by
    assert by["cuda fwd distill + aggregate + image norms"]["grid_dims"] == [tiles + plan["image_norm_blocks"],
                                                                             plan["distill"]["splits"]]
    assert plan["prompt_logits_fused"] and "cuda bwd prompt logits" not in by  # M = 8 divides 64
    assert by["cuda fwd loss merge"]["grid_dims"] == [plan["merge"]["ce_blocks"] + plan["merge"]["distill_blocks"]]
    assert by["cuda bwd text"]["grid_dims"] == [-(-sizes["C"] * sizes["M"] // plan["tile_rows"]),
                                                plan["text_backward"]["splits"]]
    assert by["cuda fwd cosine ce"]["grid_dims"] == [-(-sizes["B"] // plan["tile_rows"]), plan["ce"]["splits"]]
    assert plan["fused_aggregate"] == (sizes["M"] <= plan["tile_rows"])

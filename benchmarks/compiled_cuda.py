"""Compiled-code report of the CUDA extension (csrc/): one entry per kernel launch of the
DeMul head (forward + backward) at a preset, from the built extension's SASS, with a
*modelled* time. Nothing here runs on a GPU.

For each kernel the SASS (``cuobjdump -sass`` of the built extension, or of csrc/*.cu
compiled here to sm_90a cubins by nvcc when the extension is not built) gives the matrix
instructions (HGMMA: warpgroup MMA, HMMA: ``mma.sync``, neither: SIMT FMAs), and
``cuobjdump -res-usage`` the registers, shared memory and local memory (spills).

The launch plan (splits, rows per block, whether the aggregation is fused) is not
re-derived here: it is the extension's own ``head_launch_plan`` (csrc/ops.h ``plan_head``,
the functions its launchers call), read from demul_fast._C, or from the CPU build of the
same sources (tests/cuda_emu) when the extension is not built; 132 SMs (H100/H200 SXM).
The launches are those of the training call of DeMul: the text side needs gradients, the
logit scale does not; X frozen (mode "frozen") or trained ("trained": the dL/dx^ sweep,
its split sum and the normalisation backward are added); the distillation runs against
the basis of SPEC 4.3 (r = min(K, D)).

FLOPs and bytes per launch are formulas from the kernels' code; the bytes the model uses are
the instrumented emulation's trace (``trace_head``: ``l2_bytes``, ``hbm_bytes``, ``traced``
True), the L2 formula kept beside them as ``bytes`` (tests/test_compiled_report.py compares
the two). The formulas count each tensor a block reads once per block that reads it
where the kernel re-reads it per block: the text backward's rows of T and G build per column
group, its class rows once per class of its tile, the distillation's T per split, the basis R
once per row tile in both, the CE GEMMs' operands once per row / column tile. At imagenet
(bf16) the formulas of the kernels over 1 MB agree with the trace within 3% (text backward
1.000, distillation forward about 1.00 since its aggregation stopped re-reading u, CE GEMMs
1.000, image sweep 1.03); the losses' merge (under 0.5 MB) counts each tensor once and
traces about 7x that at imagenet (its lanes read the partials of one row across splits:
sectors part-used). Where the emulation cannot be built (``trace_unavailable_reason``) the
rows carry the formulas (``traced`` False).
``rounds`` counts the dependent load rounds of the losses' merge (its split loads, the
ticket, the last block's read of the blocks' sums).
Times are modelled by benchmarks/compiled_model.py.

``collect(preset, out_dir, mode=...)`` is what benchmarks/compiled.py calls; it returns []
when neither the extension nor nvcc, or no cuobjdump, is found (``unavailable_reason``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

SMS = 132  # H100/H200 SXM
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_MANGLED = {"float32": "f", "bfloat16": "13__nv_bfloat16", "float16": "6__half"}



def preset_sizes(preset: str) -> Dict[str, int]:
    """(C, M, D, B, K) of a preset of benchmarks/run.py."""
    from .run import PRESETS

    return {k: PRESETS[preset][k] for k in ("C", "M", "D", "B", "K")}


def cuobjdump() -> Optional[str]:
    """Path of cuobjdump: Triton's NVIDIA backend ships one; else the CUDA toolkit's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    return shutil.which("cuobjdump")


def extension_path() -> Optional[str]:
    """File of the built demul_fast._C of THIS checkout (an extension built from another
    checkout's csrc/ is not the code read here), or None."""
    spec = importlib.util.find_spec("demul_fast._C")
    if spec is None or not spec.origin:
        return None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return spec.origin if os.path.realpath(spec.origin).startswith(os.path.realpath(here) + os.sep) else None


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def unavailable_reason() -> Optional[str]:
    if extension_path() is None and nvcc() is None:
        return ("neither demul_fast._C (DEMUL_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .) nor nvcc "
                "to compile csrc/ for sm_90a")
    if cuobjdump() is None:
        return "no cuobjdump (neither Triton's NVIDIA backend nor a CUDA toolkit)"
    if extension_path() is None:
        from tests.cuda_emu import build as emu_build

        why = emu_build.unavailable_reason()
        if why:
            return f"the launch plan needs demul_fast._C or its CPU build: {why}"
    return None


def _nvidia_pip_includes() -> List[str]:
    """site-packages/nvidia/*/include: with a pip-installed torch, ATen/cuda/CUDAContext.h's
    cuBLAS/cuSPARSE headers live there, not in the toolkit (setup.py adds them the same way)."""
    import glob
    try:
        import nvidia
    except ImportError:
        return []
    return [d for base in getattr(nvidia, "__path__", []) for d in sorted(glob.glob(os.path.join(base, "*", "include")))]


def cubins(out_dir: str) -> List[str]:
    """csrc/*.cu compiled by nvcc to sm_90a cubins (the flags of setup.py), for the SASS
    when the extension is not built."""
    import glob

    import torch.utils.cpp_extension as cpp
    from demul_fast import common

    from tests.cuda_emu.build import cuda_include

    os.makedirs(out_dir, exist_ok=True)
    out = []
    newest = max(os.path.getmtime(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))
                 if p.endswith((".cu", ".cuh", ".h", ".cpp")))
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))):
        dst = os.path.join(out_dir, os.path.basename(src) + ".cubin")
        out.append(dst)
        if os.path.exists(dst) and os.path.getmtime(dst) > newest:  # already compiled from these sources
            continue
        cmd = [nvcc(), "-cubin", "-arch=sm_90a", "-O3", "-std=c++20", "--expt-relaxed-constexpr",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", f"-DDEMUL_EPS={float(common.EPS)!r}",
               f"-DDEMUL_MAX_PROMPTS={int(common.MAX_PROMPTS)}", "-I", os.path.join(ROOT, "csrc"),
               *[f"-I{p}" for p in cpp.include_paths()], f"-I{cuda_include()}",
               *[f"-I{p}" for p in _nvidia_pip_includes()], src, "-o", dst]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def read_binaries(out_dir: str) -> Tuple[Dict[str, str], Dict[str, Dict[str, int]]]:
    """({kernel: SASS}, {kernel: resources}) of the built extension, or of the cubins of
    csrc/ compiled into out_dir/cuda_cubin when it is not built."""
    binaries = [extension_path()] if extension_path() else cubins(os.path.join(out_dir, "cuda_cubin"))
    sass, res = {}, {}
    for binary in binaries:
        sass.update(sass_by_kernel(binary))
        res.update(resources_by_kernel(binary))
    return sass, res


_PLAN_MODULE = None


def plan_module():
    """demul_fast._C, or (not built) the CPU build of the same sources (tests/cuda_emu)."""
    global _PLAN_MODULE
    if _PLAN_MODULE is None:
        if extension_path() is not None:
            from demul_fast import _C as mod
        else:  # the cached build of these sources (a fixed folder would keep a stale build's sources)
            from tests.cuda_emu import build as emu_build

            mod = emu_build.build()
        _PLAN_MODULE = mod
    return _PLAN_MODULE


def launch_plan(C: int, M: int, B: int, rank: int, sms: int = SMS, D: int = 0) -> dict:
    """The extension's head_launch_plan (csrc/ops.h plan_head); with D, also the text
    backward's groups of column chunks ("text_backward")."""
    return dict(plan_module().head_launch_plan(C, M, B, rank, sms, D))


def distill_tile_smem(D: int, dtype: str) -> int:
    """Dynamic shared memory of distill_forward_tile_kernel (csrc/distill.cu DistillSmem: the F
    rows of the tile's classes [64, 64] in float32, the [64, D] tile of T, two R stages [64, 32]
    in T's type, and for 16-bit T the staging tile)."""
    e, dp = ELEMENT_BYTES[dtype], -(-D // 32) * 32
    mma = dtype != "float32"
    pad = 8 if mma else 4
    a = -(-(64 * (dp + pad) * e) // 128) * 128
    return 64 * 64 * 4 + a + 2 * 64 * (32 + pad) * e + (64 * 68 * 4 if mma else 0) + 128


def distill_tile_fits(D: int, dtype: str) -> bool:
    """Whether distill_forward_tile_kernel runs (its tile within the 160 KB budget), else
    distill_forward_partial_kernel."""
    return distill_tile_smem(D, dtype) <= 160 * 1024


def text_backward_smem(kp: int, dtype: str) -> int:
    """Dynamic shared memory of text_backward_kernel with kp columns of G (csrc/text_head.cu
    BwdSmem: du of the tile's classes [64, 64] in float32, G, two R stages [32, 64] in T's type,
    and for 16-bit T the staging tile)."""
    e = ELEMENT_BYTES[dtype]
    mma = dtype != "float32"
    pad = 8 if mma else 4
    g = -(-(64 * (kp + pad) * e) // 128) * 128
    return 64 * 64 * 4 + g + 2 * 32 * (64 + pad) * e + (64 * 68 * 4 if mma else 0) + 128


def text_backward_stash_bytes(D: int, dtype: str) -> int:
    """The tile of T that text_backward_kernel keeps in shared memory where it fits
    (BwdSmem::bytes_with_t: [64, D + 16] in T's type, 128-byte aligned)."""
    return -(-(64 * (D + 16) * ELEMENT_BYTES[dtype]) // 128) * 128


def text_backward_stash(rank: int, D: int, dtype: str) -> bool:
    """Whether text_backward_kernel keeps its rows of T in shared memory (csrc/text_head.cu
    launch_text_backward: G in one panel and the whole within kTextBwdStashCap, 220 KB, under
    an H100/H200's opt-in)."""
    kp = text_backward_panel(rank, dtype)
    return kp >= rank and text_backward_smem(kp, dtype) + text_backward_stash_bytes(D, dtype) <= 220 * 1024


def text_backward_panel(rank: int, dtype: str) -> int:
    """Columns of G in shared memory per build (BwdSmem::panel): the whole rank (rounded up
    to 32) when it fits the 160 KB budget."""
    kp = -(-rank // 32) * 32
    while kp > 32 and text_backward_smem(kp, dtype) > 160 * 1024:
        kp -= 32
    return kp


# ---------------------------------------------------------------------------------------
# Reading the binary


def sass_by_kernel(binary: str) -> Dict[str, str]:
    """{mangled kernel name: its SASS text} of every kernel in ``binary``."""
    out = subprocess.run([cuobjdump(), "-sass", binary], check=True, capture_output=True, text=True).stdout
    kernels: Dict[str, List[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = []
        elif current is not None:
            kernels[current].append(line)
    return {k: "\n".join(v) for k, v in kernels.items()}


def resources_by_kernel(binary: str) -> Dict[str, Dict[str, int]]:
    """{mangled kernel name: {"REG", "STACK", "SHARED", "LOCAL", ...}} from ``cuobjdump -res-usage``."""
    out = subprocess.run([cuobjdump(), "-res-usage", binary], check=True, capture_output=True, text=True).stdout
    res: Dict[str, Dict[str, int]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            res[current] = {k: int(v) for k, v in re.findall(r"([A-Z_]+)(?:\[\d+\])?:(\d+)", line)}
            current = None
    return res


def count(sass: str, opcode: str) -> int:
    """Instructions of ``sass`` whose opcode starts with ``opcode`` (HMMA.16816.F32.BF16 counts as HMMA)."""
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?" + re.escape(opcode) + r"\b", sass))


def mma_kind(sass: str) -> str:
    if count(sass, "HGMMA"):
        return "wgmma"
    if count(sass, "HMMA"):
        return "mma.sync"
    return "none"


# ---------------------------------------------------------------------------------------
# The launch plan of the head (csrc/bindings.cpp)


def head_launches(C: int, M: int, D: int, B: int, K: int, dtype: str, mode: str = "frozen",
                  plan: Optional[dict] = None) -> List[dict]:
    """The kernel launches of demul_head_forward + demul_head_backward (need_text; need_image
    in mode "trained"), in order, each {"name", "symbol" (a mangled-name pattern), "grid",
    "flops", "bytes", "rounds"}, on the extension's launch plan."""
    e = ELEMENT_BYTES[dtype]
    t = _MANGLED[dtype]
    g = 2 if dtype == "bfloat16" else 4  # ops.h ce_grad_type: the stored dL/ds
    r = min(K, D)
    R = C * M
    plan = plan or launch_plan(C, M, B, r, D=D)
    TILE = plan["tile_rows"]
    ce_s = plan["ce"]["splits"]
    fused = plan["fused_aggregate"]
    tile_rows = plan["distill_tile_rows"]
    dist_s = plan["distill"]["splits"]
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    L = []

    def add(name, symbol, grid, flops, nbytes, rounds=1, dyn_smem=0, hbm=None):
        L.append(dict(name=name, symbol=symbol, grid=list(grid), flops=int(flops), bytes=int(nbytes), rounds=rounds,
                      dyn_smem=int(dyn_smem), hbm=int(nbytes if hbm is None else hbm)))

    # forward
    agg_flops, agg_bytes = 5 * R * D + 4 * C * D, 4 * (R + C * D + 2 * R + C)  # logits in; u^, w, n, |u| out
    if not fused:
        add("fwd aggregate", rf"24aggregate_forward_kernelI{t}E", (C,), agg_flops, e * R * D + agg_bytes)
    # the head's distillation also stores p = R t^ [C*M, r] in T's dtype for the fused backward,
    # takes the norms of T and (fused) aggregates. Bytes as the blocks read them: block (x, y)
    # reads its tile of T once (the resident-tile kernel; the streamed kernel re-reads it per
    # 64-wide chunk of r), its r range of R ([r/splits, D] in T's dtype: all of R once per row
    # tile), c per warp and the F rows of its classes: once per class of the tile (the
    # resident-tile kernel stages them per chunk), per pair of rows a warp access covers (the
    # streamed kernel).
    d_tiles = cdiv(R, tile_rows)
    t_reads = dist_s if distill_tile_fits(D, dtype) else cdiv(r, TILE)
    if distill_tile_fits(D, dtype):
        f_pairs = sum((min(R, t0 + tile_rows) - 1) // M - t0 // M + 1 for t0 in range(0, R, tile_rows))
    else:  # the epilogue's F reads: a warp access covers two rows (one class or two) of a tile
        f_pairs = sum(len({i // M for i in range(q, min(q + 2, t0 + tile_rows, R))})
                      for t0 in range(0, R, tile_rows) for q in range(t0, min(t0 + tile_rows, R), 2))
    # with plan "image_norms_fused" the grid has image_norm_blocks extra columns of blocks: those of
    # split 0 take ||x|| (a warp per row, 64 rows a block: X read once), the others leave at once
    img = plan.get("image_norms_fused", False)
    img_blocks = plan["image_norm_blocks"] if img else 0
    img_flops, img_bytes = (2 * B * D, e * B * D + 4 * B) if img else (0, 0)
    add("fwd distill" + (" + aggregate" if fused else "") + (" + image norms" if img else ""),
        rf"{'27distill_forward_tile_kernel' if distill_tile_fits(D, dtype) else '30distill_forward_partial_kernel'}"
        rf"I{t}E",
        # (the fused aggregation forms u twice from the resident tile: for ||u||, then to store u^)
        (d_tiles + img_blocks, dist_s), 2 * R * D * r + 6 * R * r + 2 * R * D + (agg_flops + 2 * R * D if fused else 0)
        + img_flops,
        t_reads * e * R * D + e * R * r + d_tiles * (e * r * D + 4 * r) + 4 * f_pairs * r + 4 * 8 * d_tiles * r
        + 8 * dist_s * R
        + (agg_bytes if fused else 0) + img_bytes,
        dyn_smem=distill_tile_smem(D, dtype) if distill_tile_fits(D, dtype) else 0,
        hbm=e * R * D + e * R * r + e * r * D + 4 * (r + C * r) + 8 * dist_s * R + (agg_bytes if fused else 0)
        + img_bytes)
    if not img:
        add("fwd image norms", rf"16row_norms_kernelI{t}E", (cdiv(B, 8),), 2 * B * D, e * B * D + 4 * B)
    # The tile_dot GEMMs (cross-entropy, its gradients): L2 bytes per block as the trace counts
    # them (each block reads its rows of both operands, a 16-lane row read is whole sectors:
    # X once per 64-class tile (tile_dot reloads both operands per tile: a block's class split of
    # more than 64 classes re-reads its X rows per tile), u^ and dL/ds once per row tile / column
    # tile), plus the per-row partials and scalars the trace shows (2-lane stores, broadcast
    # reads); HBM bytes count each tensor once.
    def class_tiles(split: dict) -> int:  # 64-class tiles summed over a plan's class splits
        per = split["cols_per_split"]
        return sum(cdiv(min(per, C - c0), TILE) for c0 in range(0, C, per))
    add("fwd cosine ce", rf"25ce_forward_partial_kernelI{t}E", (cdiv(B, TILE), ce_s),
        2 * B * C * D + 8 * B * C, class_tiles(plan["ce"]) * e * B * D + ce_s * 100 * B + cdiv(B, TILE) * 4 * C * D,
        hbm=e * B * D + 4 * C * D + 8 * B + 12 * ce_s * B)
    # the losses' merge, one launch (csrc/cross_entropy.cu loss_merge_kernel, plan "merge"):
    # `group` lanes per row take its splits (ceil(splits / group) independent loads each, one
    # round), a shuffle tree joins them; then per block one ticket (an atomic: a round) and the
    # last block reads the blocks' sums (a thread each: ceil(blocks / threads) rounds). Each tensor
    # once: the partials, lse, delta, cos, ||z||, the block sums written and read, the ticket.
    mg = plan["merge"]
    m_blocks = mg["ce_blocks"] + mg["distill_blocks"]
    add("fwd loss merge", r"17loss_merge_kernel", (m_blocks,), 10 * ce_s * B + 4 * dist_s * R + 6 * R,
        12 * ce_s * B + 4 * B + 8 * dist_s * R + 4 * (C + 2 * R) + 8 * m_blocks + 4 + 12,
        rounds=max(cdiv(ce_s, mg["ce_group"]), cdiv(dist_s, mg["distill_group"])) + 1 + cdiv(m_blocks, mg["threads"]))
    # backward: dL/ds^T (class rows), dL/du^ = G^T x, then the fused text backward and dA
    add("bwd ce grad", rf"14ce_grad_kernelI{t}", (cdiv(C, TILE), cdiv(B, TILE)), 2 * B * C * D + 12 * B * C,
        cdiv(B, TILE) * 4 * C * D + cdiv(C, TILE) * e * B * D + 8 * C * B + g * C * B + 128 * B,
        hbm=4 * C * D + e * B * D + 16 * B + g * C * B)
    add("bwd ce class grad", rf"20ce_class_grad_kernelI{t}", (cdiv(C, TILE), cdiv(D, TILE)), 2 * B * C * D,
        cdiv(D, TILE) * g * C * B + cdiv(C, TILE) * e * B * D + 4 * C * D, hbm=g * C * B + e * B * D + 4 * C * D)
    if mode == "trained":  # dL/dx^ = G u (a sweep over the classes), then its split sum and normalisation
        xs = plan["ce_image"]["splits"]
        xt = class_tiles(plan["ce_image"])
        # per block: its X rows once per 64-class chunk (tile_dot), u^ once per row tile, the rows
        # of B G once per 64-wide column chunk, its float32 partial written by the first chunk of
        # its split and read and written again by every later one (sweep.cuh: out += per chunk)
        add("bwd image sweep", rf"12sweep_kernelI{t}.*CeImageRows", (cdiv(B, TILE), xs), 2 * B * C * D + 12 * B * C,
            xt * (e * B * D) + cdiv(B, TILE) * 4 * C * D + cdiv(D, TILE) * 4 * B * C + 4 * (2 * xt - xs) * B * D
            + 16 * B,
            hbm=xs * (e * B * D) + 4 * C * D + 4 * xs * B * D + 16 * B)
        # one block per image (csrc/cross_entropy.cu sum_normalize_rows_kernel): the xs partials
        # of its row added in order, x read twice (the dot, then dx), dx written in x's type; the
        # sums stay in shared memory (columns past 2048 go through a float32 spill, written and
        # read back); each of its 8 warps reads the row's norm (a sector)
        spill = 2 * 4 * B * max(0, D - 2048)
        add("bwd image split sum + normalize", rf"25sum_normalize_rows_kernelI{t}E", (B,), xs * B * D + 6 * B * D,
            4 * xs * B * D + 3 * e * B * D + 8 * 32 * B + spill, hbm=4 * xs * B * D + 2 * e * B * D + 4 * B + spill)
    # the text backward: block (x, y) owns 64 rows and group y of the 64-wide column chunks
    # (plan "text_backward"). Counted per warp access as the code issues them (32-byte
    # sectors; csrc/text_head.cu): per group, its rows of T once for the per-row scalars
    # (warp w takes 8 consecutive rows) with the dL/du^ and u^ columns once per class change
    # in the warp's rows; G built from p (T's dtype), F once per class change and c once per
    # warp (per chunk when G goes in panels); R's columns of the group streamed by cp.async
    # ([r, D / groups] in T's dtype: all of R once per row tile); du of the tile's classes per
    # column chunk (dL/du^ and u^ once per class of the tile and column), the epilogue's t
    # (none where the rows of T stay in shared memory from the per-row phase), dT written once;
    # per row a sector
    # for each of n, w, |u| of its class and dw (lane 0 reads / writes 4 B of one).
    # With M dividing 64 (plan "prompt_logits_fused") the blocks of group 0 also take dA of their
    # classes (a warp per class from the rows' w and dw in shared memory): dw is not stored (a
    # sector per row fewer), dA written (a sector per 8 prompts of a class); else dw per row as
    # above and a kernel for dA.
    tb = plan["text_backward"]["splits"]
    pl_fused = plan["prompt_logits_fused"]
    stash = text_backward_stash(r, D, dtype)  # the epilogues read T from shared memory
    tiles = cdiv(R, TILE)
    chunks = cdiv(D, TILE)
    builds = tb if text_backward_panel(r, dtype) >= r else chunks  # G builds per row tile
    warps = cdiv(R, 8)
    warp_classes = sum(len({i // M for i in range(8 * q, min(R, 8 * q + 8))}) for q in range(warps))
    tile_classes = sum((min(R, t0 + TILE) - 1) // M - t0 // M + 1 for t0 in range(0, R, TILE))
    add("bwd text", rf"20text_backward_kernelI{t}E", (tiles, tb),
        2 * R * r * D + 4 * R * r * builds + 6 * R * D * tb + 16 * R * D,
        tb * (e * R * D + 4 * 2 * warp_classes * D) + builds * (e * R * r + 4 * (warp_classes + 8 * tiles) * r)
        + e * tiles * r * D + (0 if stash else e * R * D) + 4 * 2 * tile_classes * D + e * R * D + 32 * (3 if pl_fused else 4) * R
        + 8 * R + (32 * cdiv(4 * M, 32) * C if pl_fused else 0),
        dyn_smem=text_backward_smem(text_backward_panel(r, dtype), dtype)
        + (text_backward_stash_bytes(D, dtype) if stash else 0),
        hbm=2 * e * R * D + e * R * r + e * r * D + 4 * (r + C * r) + 4 * 2 * C * D + 4 * (5 * R + C))
    if not pl_fused:  # dA = w (dw - sum_m w dw) by a kernel of its own (M does not divide 64)
        add("bwd prompt logits", r"29prompt_logits_backward_kernel", (cdiv(C, 8),), 3 * R, 4 * 3 * R)
    return L


# ---------------------------------------------------------------------------------------
# The trace: the head's launches in the instrumented CPU emulation (tests/cuda_emu)


def _kernel_name(symbol: str) -> str:
    """The kernel's name in a mangled-name pattern: "20text_backward_kernelI..." -> text_backward_kernel."""
    m = re.match(r"(\d+)", symbol)
    n = int(m.group(1))
    return symbol[m.end():m.end() + n]


def trace_unavailable_reason() -> Optional[str]:
    from tests.cuda_emu import build as emu_build

    return emu_build.unavailable_reason()


def trace_head(preset: str, mode: str = "frozen", dtype: str = "bfloat16", sample: int = 5,
               sizes: Optional[Dict[str, int]] = None, lines: bool = False) -> List[dict]:
    """Every CUDA launch of one demul_head forward + backward (X frozen or trained), run in the
    instrumented emulation (tests/cuda_emu, ``build(instrument=True)``; include/emu_instrument.h)
    at the preset's sizes: per launch {"kernel", "grid", "sampled_blocks", "l2_read_bytes",
    "l2_write_bytes", "l2_bytes", "hbm_read_bytes", "hbm_write_bytes"}, counted the way
    benchmarks/compiled_trace.py counts the Triton programs: a warp-level access (the lanes of a
    warp at one instruction) moves the 32-byte sectors it touches; ``l2_bytes`` sums them over the
    blocks (a sector read by every block, or twice by one, counts each time); HBM bytes are the
    distinct sectors of the launch, per tensor. ``sample`` blocks per grid axis run (the first
    two, the last two, evenly spaced ones between, each standing for its share: compiled_trace's
    ``sample_grid``; 0: all); HBM bytes per tensor are extrapolated from them, at most the tensor.
    Each launch's ``sites`` (``parse_trace``) break the L2 bytes down per access site; ``lines``:
    with their source lines."""
    import torch

    from benchmarks.compiled_trace import head_inputs
    from demul_fast.ops import cuda_ops
    from tests.cuda_emu import build as emu_build

    module = emu_build.build(instrument=True)
    lib = emu_build.instrumented_library(module)
    T, A, X, y, scale, basis = head_inputs(sizes or preset_sizes(preset), getattr(torch, dtype), mode == "trained")
    saved_env = {k: os.environ.get(k) for k in ("DEMUL_EMU_RACE", "DEMUL_EMU_POISON", "DEMUL_EMU_SCHEDULE")}
    os.environ.update(DEMUL_EMU_RACE="0", DEMUL_EMU_POISON="0", DEMUL_EMU_SCHEDULE="forward")
    saved, cuda_ops._C = cuda_ops._C, module
    lib.emu_trace_start(sample)
    try:
        out = cuda_ops.demul_head(T, A, X, y, scale, basis)
        out.loss.backward()
    finally:
        text = lib.emu_trace_take().decode()
        cuda_ops._C = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return parse_trace(text, module.__file__ if lines else None)


def parse_trace(text: str, library: Optional[str] = None) -> List[dict]:
    """The instrumented emulation's trace (one JSON object per launch, include/emu_hooks.cpp)
    as launches {"kernel", "grid", "blocks", "sampled_blocks", "l2_read_bytes",
    "l2_write_bytes", "l2_bytes", "hbm_read_bytes", "hbm_write_bytes", "sites"}; ``sites``: per
    access site (code address) {"pc", "write", "warp_accesses", "lane_accesses", "bytes" (asked
    by the lanes), "sector_bytes" (moved)}, weighted like the L2 bytes; with ``library`` (the
    instrumented build's file) each site also gets its "line" (``site_lines``)."""
    import json

    launches = []
    for line in text.splitlines():
        x = json.loads(line)
        blocks = math.prod(x["grid"])
        scale_blocks = blocks / max(1, x["sampled_blocks"])
        hbm = [0.0, 0.0]
        for sectors, nr, nw in x["tensors"]:
            hbm[0] += min(nr * scale_blocks, sectors)
            hbm[1] += min(nw * scale_blocks, sectors)
        hbm[0] += x["outside_sectors"][0] * scale_blocks  # none expected: every tensor is registered
        hbm[1] += x["outside_sectors"][1] * scale_blocks
        launches.append(dict(kernel=x["kernel"].split("<")[0], grid=[g for g in x["grid"] if g > 1] or [1],
                             blocks=blocks, sampled_blocks=x["sampled_blocks"],
                             l2_read_bytes=int(round(x["l2_read_bytes"])), l2_write_bytes=int(round(x["l2_write_bytes"])),
                             l2_bytes=int(round(x["l2_read_bytes"] + x["l2_write_bytes"])),
                             hbm_read_bytes=int(round(hbm[0])) * 32, hbm_write_bytes=int(round(hbm[1])) * 32,
                             sites=[dict(pc=int(pc), write=bool(w), warp_accesses=g, lane_accesses=a, bytes=b,
                                         sector_bytes=sb) for pc, w, g, a, b, sb in x.get("sites", [])]))
    if library:
        where = site_lines(library, sorted({s["pc"] for x in launches for s in x["sites"]}))
        for x in launches:
            for s in x["sites"]:
                s["line"] = where.get(s["pc"], "?")
    return launches


def site_lines(library: str, pcs: List[int]) -> Dict[int, str]:
    """{code address relative to ``library``: "file:line"} of the trace's access sites (the
    return addresses of the instrumentation's calls), by addr2line: the inlined frames in csrc/'s
    files from the innermost out to the kernel's .cu file ("common.cuh:80 < text_head.cu:336"), else the innermost frame."""
    out: Dict[int, str] = {}
    if not pcs or shutil.which("addr2line") is None:
        return out
    text = subprocess.run(["addr2line", "-a", "-i", "-e", library] + [hex(pc - 1) for pc in pcs],
                          capture_output=True, text=True, check=False).stdout
    frames: Dict[int, List[str]] = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("0x"):
            cur = int(line, 16) + 1
            frames[cur] = []
        elif cur is not None:
            frames[cur].append(os.path.basename(line.split(" ")[0]))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = set(os.listdir(os.path.join(here, "csrc")))
    for pc, fs in frames.items():
        own = [f for f in fs if f.rsplit(":", 1)[0] in csrc]
        chain = []
        for f in own:  # from the innermost helper out to the first .cu frame (the kernel's file)
            if f not in chain:
                chain.append(f)
            if re.search(r"\.cu:\d+$", f):
                break
        out[pc] = " < ".join(chain) if chain else (fs[0] if fs else "?")
    return out


def match_trace(launches: List[dict], traced: List[dict]) -> List[Optional[dict]]:
    """For each planned launch (``head_launches``), in order, the first traced launch of that
    kernel not matched yet (None if none): the plan and the code must agree on the launches,
    not on their order (X trained: the code runs the image sweep and its split sum before the
    CE gradient kernels and the image normalisation last; the plan lists them together)."""
    out, used = [], set()
    for launch in launches:
        name = _kernel_name(launch["symbol"])
        j = next((k for k in range(len(traced)) if k not in used and traced[k]["kernel"] == name), None)
        out.append(traced[j] if j is not None else None)
        if j is not None:
            used.add(j)
            if traced[j]["blocks"] != math.prod(launch["grid"]):
                raise RuntimeError(f"{launch['name']}: the plan launches {launch['grid']} blocks, the code {traced[j]['grid']}")
    return out


def collect(preset: str, out_dir: str, dtype: str = "bfloat16", mode: str = "frozen",
            trace: Optional[bool] = None) -> List[dict]:
    """One entry per CUDA kernel launch of the head fwd+bwd at ``preset`` in ``dtype`` (X
    frozen or trained): {"name", "backend": "cuda", "kernel" (mangled), "sass" (file under
    out_dir), "grid", "mma", "regs", "spill_bytes", "smem_bytes", "flops", "bytes",
    "l2_bytes", "hbm_bytes", "rounds", "traced", "time_kind": "modelled"}. [] when
    ``unavailable_reason()``. ``trace``: ``l2_bytes`` and ``hbm_bytes`` from ``trace_head``
    (``traced``: True), else both the formula's ``bytes`` (kept in ``bytes`` either way, so that
    the two can be compared); default: traced, unless DEMUL_FAST_CUDA_TRACE=0 or the CPU
    emulation cannot be built here (``trace_unavailable_reason``: formula rows, said on stderr).
    The committed reports are traced."""
    if unavailable_reason() is not None:
        return []
    if trace is None:
        trace = os.environ.get("DEMUL_FAST_CUDA_TRACE", "1") != "0"
        if trace and trace_unavailable_reason() is not None:
            import sys

            print(f"compiled_cuda: formula rows, not traced: the CUDA trace needs the CPU emulation: "
                  f"{trace_unavailable_reason()}", file=sys.stderr)
            trace = False
    if trace and trace_unavailable_reason() is not None:
        raise RuntimeError(f"the CUDA trace needs the CPU emulation: {trace_unavailable_reason()}")
    sass, res = read_binaries(out_dir)
    sass_dir = os.path.join(out_dir, "cuda_sass")
    os.makedirs(sass_dir, exist_ok=True)
    entries = []
    launches = head_launches(**preset_sizes(preset), dtype=dtype, mode=mode)
    traced = match_trace(launches, trace_head(preset, mode, dtype)) if trace else [None] * len(launches)
    for launch, tr in zip(launches, traced):
        symbol = next((k for k in sass if re.search(launch["symbol"], k)), None)
        if symbol is None:
            raise RuntimeError(f"kernel {launch['symbol']!r} ({launch['name']}) is not in the built extension "
                               "or the cubins of csrc/")
        path = os.path.join(sass_dir, re.sub(r"\W+", "_", launch["name"]) + ".sass")
        with open(path, "w") as f:
            f.write(sass[symbol])
        kind = mma_kind(sass[symbol])
        use = res.get(symbol, {})
        entries.append(dict(name=f"cuda {launch['name']}", backend="cuda", kernel=symbol,
                            sass=os.path.relpath(path, out_dir), grid=math.prod(launch["grid"]),
                            grid_dims=launch["grid"], mma=kind, regs=use.get("REG"),
                            spill_bytes=use.get("LOCAL", 0) + use.get("STACK", 0),
                            smem_bytes=use.get("SHARED", 0) + launch["dyn_smem"],  # static + dynamic
                            num_warps=8, flops=launch["flops"], bytes=launch["bytes"], l2_bytes=launch["bytes"],
                            hbm_bytes=launch["hbm"], rounds=launch["rounds"], traced=False,
                            time_kind="modelled", preset=preset, dtype=dtype))
        if tr is not None:
            entries[-1].update(l2_bytes=tr["l2_bytes"], hbm_bytes=tr["hbm_read_bytes"] + tr["hbm_write_bytes"],
                               hbm_read_bytes=tr["hbm_read_bytes"], hbm_write_bytes=tr["hbm_write_bytes"],
                               sampled_blocks=tr["sampled_blocks"], traced=True)
    return entries


def main() -> None:
    """python -m benchmarks.compiled_cuda [--preset imagenet] [--dtype bfloat16]: print the table, write JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="imagenet")
    p.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="bfloat16")
    p.add_argument("--out", default="benchmarks/results/compiled_cuda")
    args = p.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    entries = collect(args.preset, args.out, args.dtype)
    for x in entries:
        print(f"{x['name']:24s} {x['mma']:9s} regs {x['regs']:4d} spill {x['spill_bytes']:3d} "
              f"smem {x['smem_bytes']:6d}  {x['flops'] / 1e9:8.3f} GFLOP {x['bytes'] / 1e6:8.3f} MB (counted)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"compiled_cuda_{args.preset}_{args.dtype}.json"), "w") as f:
        json.dump(entries, f, indent=1)


if __name__ == "__main__":
    main()

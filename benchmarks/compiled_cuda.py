"""Compiled-code report of the CUDA extension (csrc/): one entry per kernel launch of the
DeMul head (forward + backward) at a preset, from the built extension's SASS, with a
*modelled* time. Nothing here runs on a GPU.

For each kernel the SASS (``cuobjdump -sass``, the binary shipped with Triton's NVIDIA
backend) gives the matrix instructions (HGMMA: warpgroup MMA, HMMA: ``mma.sync``, neither:
SIMT FMAs), and ``cuobjdump -res-usage`` the registers, shared memory and local memory
(spills). The launch plan (grid, FLOPs, bytes) repeats the host code of csrc/bindings.cpp
(``plan_split``) for an H200 (132 SMs) and the training call of DeMul: the text side needs
gradients, the image features and the logit scale do not (frozen CLIP), the distillation
runs against the basis of SPEC 4.3 (r = min(K, D)).

modelled_us = max(bytes / 4.3 TB/s, FLOPs / peak of the kernel's MMA kind): the roofline
of the kernel's own work, a lower bound for that kernel, not a measurement. Peaks (dense,
H100/H200 SXM datasheet; the ``mma.sync`` figure is an assumption: Hopper's warp-level MMA
reaches about two thirds of the warpgroup MMA rate): wgmma 989 TFLOP/s, mma.sync
660 TFLOP/s (16-bit operands, float32 accumulation), none 67 TFLOP/s (FP32 FMAs).

``collect(preset, out_dir)`` is what benchmarks/compiled.py calls; it returns [] when the
extension is not built or no cuobjdump is found (``unavailable_reason`` says why).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

BANDWIDTH = 4.3e12  # bytes/s, H200 HBM3e (achievable copy rate, modelled)
PEAK_FLOPS = {"wgmma": 989e12, "mma.sync": 660e12, "none": 67e12}
SMS = 132  # H200 SXM
TILE = 64  # kTileRows of csrc/ops.h
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
    """File of the built demul_fast._C, or None."""
    spec = importlib.util.find_spec("demul_fast._C")
    return spec.origin if spec is not None else None


def unavailable_reason() -> Optional[str]:
    if extension_path() is None:
        return "demul_fast._C is not built (DEMUL_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .)"
    if cuobjdump() is None:
        return "no cuobjdump (neither Triton's NVIDIA backend nor a CUDA toolkit)"
    return None


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


def _split_into(cols: int, want: int) -> Tuple[int, int]:
    col_tiles = math.ceil(cols / TILE)
    per = math.ceil(col_tiles / min(col_tiles, max(1, want))) * TILE
    return math.ceil(cols / per), per


def plan_split(rows: int, cols: int, sms: int = SMS, tile_rows: int = TILE) -> Tuple[int, int]:
    """(splits, cols_per_split) of a forward kernel, as ops.h plan_split."""
    return _split_into(cols, math.ceil(2 * sms / math.ceil(rows / tile_rows)))


def head_launches(C: int, M: int, D: int, B: int, K: int, dtype: str) -> List[dict]:
    """The kernel launches of demul_head_forward + demul_head_backward (need_text only), in order, each
    {"name", "symbol" (a mangled-name pattern), "grid", "flops", "bytes"}."""
    e = ELEMENT_BYTES[dtype]
    t = _MANGLED[dtype]
    g = 2 if dtype == "bfloat16" else 4  # ops.h ce_grad_type: the stored dL/ds
    r = min(K, D)
    R = C * M
    ce_s, _ = plan_split(B, C)
    fused = M <= TILE  # ops.h can_fuse_aggregate: the aggregation rides on the distillation's pass over T
    tile_rows = (TILE // M) * M if fused else TILE  # ops.h distill_tile_rows
    dist_s, _ = plan_split(R, r, tile_rows=tile_rows)
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    L = []

    def add(name, symbol, grid, flops, nbytes):
        L.append(dict(name=name, symbol=symbol, grid=list(grid), flops=int(flops), bytes=int(nbytes)))

    # forward
    agg_flops, agg_bytes = 5 * R * D + 4 * C * D, 4 * (R + C * D + 2 * R + C)  # logits in; u^, w, n, |u| out
    if not fused:
        add("fwd aggregate", rf"24aggregate_forward_kernelI{t}E", (C,), agg_flops, e * R * D + agg_bytes)
    # the head's distillation also stores p = R t^ [C*M, r] in T's dtype for the fused backward,
    # takes the norms of T and (fused) aggregates
    add("fwd distill" + (" + aggregate" if fused else ""), rf"30distill_forward_partial_kernelI{t}E",
        (cdiv(R, tile_rows), dist_s), 2 * R * D * r + 6 * R * r + 2 * R * D + (agg_flops if fused else 0),
        e * R * D + e * R * r + 4 * (r * D + r + C * r) + 8 * dist_s * R + (agg_bytes if fused else 0))
    add("fwd image norms", rf"16row_norms_kernelI{t}E", (cdiv(B, 8),), 2 * B * D, e * B * D + 4 * B)
    add("fwd cosine ce", rf"25ce_forward_partial_kernelI{t}E", (cdiv(B, TILE), ce_s),
        2 * B * C * D + 8 * B * C, e * B * D + 4 * C * D + 8 * B + 12 * ce_s * B)
    add("fwd ce finalize", r"18ce_finalize_kernelE", (1,), 10 * ce_s * B, 12 * ce_s * B + 4 * B + 8)
    add("fwd distill finalize", r"23distill_finalize_kernelE", (1,), 4 * dist_s * R + 6 * R,
        8 * dist_s * R + 4 * (C + 2 * R) + 8)
    # backward: dL/ds^T (class rows), dL/du^ = G^T x, then the fused text backward and dA
    add("bwd ce grad", rf"14ce_grad_kernelI{t}", (cdiv(C, TILE), cdiv(B, TILE)), 2 * B * C * D + 12 * B * C,
        4 * C * D + e * B * D + 16 * B + g * C * B)
    add("bwd ce class grad", rf"20ce_class_grad_kernelI{t}", (cdiv(C, TILE), cdiv(D, TILE)), 2 * B * C * D,
        g * C * B + e * B * D + 4 * C * D)
    add("bwd text", rf"20text_backward_kernelI{t}E", (cdiv(R, TILE), cdiv(D, TILE)),
        2 * R * r * D + 4 * R * r * cdiv(D, TILE) + 16 * R * D,
        2 * e * R * D + e * R * r + 4 * (r * D + r + C * r) + 4 * 2 * C * D + 4 * (5 * R + C))
    add("bwd prompt logits", r"29prompt_logits_backward_kernel", (cdiv(C, 8),), 3 * R, 4 * 3 * R)
    return L


def collect(preset: str, out_dir: str, dtype: str = "bfloat16") -> List[dict]:
    """One entry per CUDA kernel launch of the head fwd+bwd at ``preset`` in ``dtype``:
    {"name", "backend": "cuda", "kernel" (mangled), "sass" (file under out_dir), "grid",
    "mma", "regs", "spill_bytes", "smem_bytes", "flops", "bytes", "modelled_us",
    "time_kind": "modelled"}. [] when the extension or cuobjdump is missing."""
    if unavailable_reason() is not None:
        return []
    binary = extension_path()
    sass, res = sass_by_kernel(binary), resources_by_kernel(binary)
    sass_dir = os.path.join(out_dir, "cuda_sass")
    os.makedirs(sass_dir, exist_ok=True)
    entries = []
    for launch in head_launches(**preset_sizes(preset), dtype=dtype):
        symbol = next((k for k in sass if re.search(launch["symbol"], k)), None)
        if symbol is None:
            raise RuntimeError(f"kernel {launch['symbol']!r} ({launch['name']}) is not in {binary}")
        path = os.path.join(sass_dir, re.sub(r"\W+", "_", launch["name"]) + ".sass")
        with open(path, "w") as f:
            f.write(sass[symbol])
        kind = mma_kind(sass[symbol])
        use = res.get(symbol, {})
        modelled = max(launch["bytes"] / BANDWIDTH, launch["flops"] / PEAK_FLOPS[kind]) * 1e6
        entries.append(dict(name=f"cuda {launch['name']}", backend="cuda", kernel=symbol,
                            sass=os.path.relpath(path, out_dir), grid=math.prod(launch["grid"]),
                            grid_dims=launch["grid"], mma=kind, regs=use.get("REG"),
                            spill_bytes=use.get("LOCAL", 0) + use.get("STACK", 0), smem_bytes=use.get("SHARED", 0),
                            flops=launch["flops"], bytes=launch["bytes"], modelled_us=round(modelled, 3),
                            time_kind="modelled", preset=preset, dtype=dtype))
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
              f"smem {x['smem_bytes']:6d}  {x['flops'] / 1e9:8.3f} GFLOP {x['bytes'] / 1e6:8.3f} MB  "
              f"{x['modelled_us']:8.2f} us (modelled)")
    print(f"total {sum(x['modelled_us'] for x in entries):.1f} us modelled (fwd+bwd, {args.preset}, {args.dtype})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"compiled_cuda_{args.preset}_{args.dtype}.json"), "w") as f:
        json.dump(entries, f, indent=1)


if __name__ == "__main__":
    main()

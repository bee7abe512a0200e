"""The Triton kernels' rows of the compiled-code report (benchmarks/compiled.py).

Each kernel of one ``demul_head`` forward + backward is compiled for sm_90a (no GPU needed)
at the block sizes its launcher chooses for the preset, in bfloat16, with the argument
specialisations a launch would get (pointers and sizes divisible by 16, unit strides).
FLOPs and bytes are the kernel's own (every byte it must move through device memory once,
L2 re-reads not counted): the inputs of a "modelled" time, never a measurement.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Dict, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.run import PRESETS
from demul_fast.kernels import cosine_ce, text_head

TARGET = GPUTarget("cuda", 90, 32)  # sm_90a: Triton targets the "a" variant for capability 9.0
BF16 = 2


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _signature(kernel, pointers: Dict[str, str], constexprs: Dict[str, object], floats=()):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32") for n in names}
    aligned = [n for n in names if n in pointers or n in ("D", "RANK", "stc", "stm", "sac")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    return ASTSource(kernel, sig, constexprs=consts, attrs=attrs)


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def compile_kernel(name, kernel, pointers, constexprs, num_warps, out_dir, floats=()) -> dict:
    """Compile for sm_90a, save NAME.ptx in out_dir, read ptxas -v: mma kind, regs, spills, smem."""
    compiled = triton.compile(_signature(kernel, pointers, constexprs, floats), target=TARGET,
                              options=dict(num_warps=num_warps))
    ptx = compiled.asm["ptx"]
    ptx_file = f"{name}.ptx"
    path = os.path.join(out_dir, ptx_file)
    with open(path, "w") as f:
        f.write(ptx)
    info = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    return dict(name=name, backend="triton", ptx=ptx_file, mma=_mma_kind(ptx),
                regs=int(regs.group(1)) if regs else None, spill_bytes=sum(spills),
                smem_bytes=int(compiled.metadata.shared), num_warps=num_warps,
                ptxas_warnings=[line.strip() for line in info.splitlines() if "Performance" in line])


def collect(preset: str, out_dir: str) -> List[dict]:
    """Rows (without modelled_us) for the Triton kernels of one head step at ``preset`` (a
    preset name of benchmarks/run.py) in bfloat16; [] when ``unavailable_reason()``."""
    if unavailable_reason() is not None:
        return []
    C, M, D, B, K = (PRESETS[preset][k] for k in ("C", "M", "D", "B", "K"))
    r = min(K, D)
    CM = C * M
    cfg = text_head.text_config(C, M, D, r)
    text_ptrs = dict(T="*bf16", A="*bf16", R="*bf16", CV="*fp32", F="*fp32", NORM="*fp32", U="*fp32",
                     RN="*fp32", V="*bf16", VV="*fp32", VF="*fp32", GU="*fp32", ZN="*fp32", COS="*fp32",
                     GDIST="*fp32", GLOSS="*fp32", DT="*bf16", DA="*bf16")
    blocks = dict(BLOCK_CLS=cfg["BLOCK_CLS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
                  EMULATE=False, AGG=True, DIST=True, std=1, sam=1)
    rows = []
    row = compile_kernel("text_fwd", text_head._text_fwd_kernel, text_ptrs,
                         dict(blocks, BLOCK_N=cfg["BLOCK_N"]), cfg["num_warps"], out_dir)
    row.update(grid=cfg["tiles"] * cfg["splits"], pass_="fwd", flops=2 * CM * r * D,
               bytes=BF16 * (CM * D + CM * r + r * D + CM) + 4 * (C * r + C * D + C + CM * (1 + 2 * cfg["splits"])))
    rows.append(row)
    finish_programs = triton.cdiv(CM, text_head.FINISH_BLOCK)
    row = compile_kernel("distill_finish", text_head._distill_finish_kernel,
                         dict(VV="*fp32", VF="*fp32", DELTA="*fp32", BETA="*fp32", ZN="*fp32", COS="*fp32",
                              LOSSP="*fp32"), dict(BLOCK=text_head.FINISH_BLOCK), 4, out_dir)
    row.update(grid=finish_programs, pass_="fwd", flops=8 * CM, bytes=4 * (CM * (2 * cfg["splits"] + 2) + C),
               merge=True)
    rows.append(row)
    ce = cosine_ce.ce_config(B, C, D)
    ce_ptrs = dict(X="*bf16", U="*fp32", Y="*i64", SCALE="*fp32", PM="*fp32", PL="*fp32", PT="*fp32", PS="*fp32",
                   XN="*fp32", LOGITS="*bf16", LSE="*fp32", ROWS="*fp32", GLOSS="*fp32", GCE="*fp32", GL="*bf16",
                   BG="*bf16",
                   DSCALE="*fp32", DU="*fp32", PDX="*fp32", DX="*bf16", DISTP="*fp32", LOSS="*fp32", CE="*fp32",
                   DIST="*fp32")
    tiles = dict(EMULATE=False, BLOCK_B=cosine_ce.BLOCK_B, BLOCK_C=ce["BLOCK_C"], BLOCK_K=ce["BLOCK_K"])
    x_bytes, u_bytes, g_bytes = BF16 * B * D, 4 * C * D, BF16 * B * C
    part_bytes = 4 * 4 * ce["splits"] * B
    specs = [
        ("ce_fwd", cosine_ce._ce_fwd_kernel, dict(tiles, STORE_LOGITS=False), ce["b_tiles"] * ce["splits"], "fwd",
         2 * B * C * D, x_bytes + u_bytes + part_bytes + 4 * B, False),
        ("ce_merge", cosine_ce._ce_merge_kernel, dict(BLOCK=cosine_ce.MERGE_ROWS), ce["merge_programs"], "fwd",
         6 * ce["splits"] * B, part_bytes + 8 * B, True),
        ("losses", cosine_ce._losses_kernel, dict(BLOCK=256), 1, "fwd", B, 4 * B + 4 * finish_programs, True),
        ("ce_grad", cosine_ce._ce_grad_kernel, dict(tiles, HAS_GL=False), ce["b_tiles"] * ce["splits"], "bwd",
         2 * B * C * D, x_bytes + u_bytes + g_bytes + 12 * B, False),
        ("ce_du", cosine_ce._ce_du_kernel, dict(EMULATE=False, BLOCK_B=cosine_ce.BLOCK_B, BLOCK_C=cosine_ce.BLOCK_CU,
                                                BLOCK_DO=cosine_ce.BLOCK_DO),
         ce["du_tiles"] * ce["out_chunks"], "bwd", 2 * B * C * D, x_bytes + g_bytes + u_bytes + 4 * B, False),
        ("ce_dx", cosine_ce._ce_dx_kernel, dict(EMULATE=False, BLOCK_B=cosine_ce.BLOCK_B, BLOCK_C=cosine_ce.BLOCK_CU,
                                                BLOCK_DO=cosine_ce.BLOCK_DO),
         ce["b_tiles"] * ce["out_chunks"] * ce["dx_splits"], "bwd", 2 * B * C * D,
         g_bytes + u_bytes + 4 * ce["dx_splits"] * B * D, False),
        ("ce_dx_finish", cosine_ce._ce_dx_finish_kernel, dict(BLOCK_D=ce["BLOCK_D"]), B, "bwd", 8 * B * D,
         4 * ce["dx_splits"] * B * D + 2 * x_bytes + 4 * B, False),
    ]
    for name, kernel, consts, grid, pass_, flops, nbytes, merge in specs:
        row = compile_kernel(name, kernel, ce_ptrs, consts, 1 if name == "ce_merge" else 4, out_dir,
                             floats=("ls", "inv_cm", "alpha", "w_loss"))
        row.update(grid=grid, pass_=pass_, flops=flops, bytes=nbytes, merge=merge)
        rows.append(row)
    row = compile_kernel("text_bwd", text_head._text_bwd_kernel, dict(text_ptrs),
                         dict(blocks, BLOCK_N=cfg["BLOCK_NB"], BLOCK_DO=cfg["BLOCK_DO"]), cfg["num_warps"], out_dir,
                         floats=("inv_cm", "w_loss"))
    row.update(grid=cfg["tiles"] * cfg["out_chunks"], pass_="bwd", flops=2 * CM * r * D,
               bytes=BF16 * (2 * CM * D + CM * r + r * D + CM) + 4 * (C * r + 2 * C * D + C + 3 * CM))
    rows.append(row)
    for row in rows:
        row["pass"] = row.pop("pass_")
        row.setdefault("merge", False)
    return rows


def unavailable_reason() -> Optional[str]:
    """Why this collector cannot run here (None if it can)."""
    if not os.path.exists(ptxas_path()):
        return "ptxas not found in triton's nvidia backend"
    return None

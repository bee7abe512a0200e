"""The Triton kernels' rows of the compiled-code report (benchmarks/compiled.py).

Each kernel of one ``demul_head`` forward + backward is compiled for sm_90a (no GPU needed)
at the block sizes its launcher chooses for the preset, in bfloat16, with the argument
specialisations a launch would get (pointers and sizes divisible by 16, unit strides).
Grids, FLOPs and bytes are not computed here: they come from the trace of the launches
(benchmarks/compiled_trace.py). This file reads what the compiler makes of each kernel.
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
    aligned = [n for n in names if n not in constexprs and (n in pointers or n in ("D", "RANK", "stc", "stm", "sac"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    return ASTSource(kernel, sig, constexprs=consts, attrs=attrs)


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def compile_kernel(name, kernel, pointers, constexprs, num_warps, out_dir, floats=(), num_stages=3) -> dict:
    """Compile for sm_90a, save NAME.ptx in out_dir, read ptxas -v: mma kind, regs, spills, smem."""
    compiled = triton.compile(_signature(kernel, pointers, constexprs, floats), target=TARGET,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    ptx_file = f"{name}.ptx"
    path = os.path.join(out_dir, ptx_file)
    with open(path, "w") as f:
        f.write(ptx)
    info = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    return dict(name=name, backend="triton", ptx=ptx_file, mma=_mma_kind(ptx), num_stages=num_stages,
                regs=int(regs.group(1)) if regs else None, spill_bytes=sum(spills),
                smem_bytes=int(compiled.metadata.shared), num_warps=num_warps,
                ptxas_warnings=[line.strip() for line in info.splitlines() if "Performance" in line])


def collect(preset: str, out_dir: str) -> Dict[str, dict]:
    """{kernel function name: its compiled row (mma, regs, spills, smem, warps, ptxas warnings,
    PTX file)} for every Triton kernel of a head step at ``preset`` (benchmarks/run.py) in
    bfloat16, at the block sizes its launcher chooses; {} when ``unavailable_reason()``.
    Grids, FLOPs and bytes come from the trace (benchmarks/compiled_trace.py), not from here."""
    if unavailable_reason() is not None:
        return {}
    C, M, D, B, K = (PRESETS[preset][k] for k in ("C", "M", "D", "B", "K"))
    r = min(K, D)
    cfg = text_head.text_config(C, M, D, r)
    text_ptrs = dict(T="*bf16", A="*bf16", R="*bf16", CV="*fp32", F="*fp32", NORM="*fp32", U="*fp32",
                     RN="*fp32", V="*bf16", VV="*fp32", VF="*fp32", VA="*fp32", VB="*fp32", GU="*fp32", ZN="*fp32",
                     COS="*fp32", PV="*fp32",
                     GDIST="*fp32", GLOSS="*fp32", DT="*bf16", DA="*bf16", PTG="*fp32", PUT="*fp32", PUG="*fp32",
                     UL="*bf16")
    blocks = dict(BLOCK_CLS=cfg["BLOCK_CLS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
                  EMULATE=False, AGG=True, DIST=True, std=1, sam=1, **text_head.shape_constexprs(D, r))
    ce = cosine_ce.ce_config(B, C, D)
    ce_ptrs = dict(X="*bf16", U="*bf16", Y="*i64", SCALE="*fp32", PM="*fp32", PL="*fp32", PT="*fp32", PS="*fp32",
                   XN="*fp32", LOGITS="*bf16", LSE="*fp32", ROWS="*fp32", GLOSS="*fp32", GCE="*fp32", GL="*bf16",
                   BG="*bf16", DSCALE="*fp32", DU="*fp32", PDX="*fp32", DX="*bf16", DISTP="*fp32", LOSS="*fp32",
                   CE="*fp32", DIST="*fp32", TICKET="*i32", T="*bf16", PTG="*fp32", PUT="*fp32", PUG="*fp32")
    tiles = dict(EMULATE=False, BLOCK_B=cosine_ce.BLOCK_B, BLOCK_C=ce["BLOCK_C"], BLOCK_K=ce["BLOCK_K"])
    cu = dict(EMULATE=False, BLOCK_B=cosine_ce.BLOCK_B, BLOCK_C=cosine_ce.BLOCK_CU, BLOCK_DO=cosine_ce.BLOCK_DO)
    floats = ("ls", "inv_cm", "alpha", "w_loss")
    specs = [  # (row name, kernel, pointers, constexprs, warps[, stages])
        ("text_fwd", text_head._text_fwd_kernel, text_ptrs,
         dict(blocks, BLOCK_CLS=cfg["fwd_BLOCK_CLS"], BLOCK_N=cfg["BLOCK_N"], RESIDENT=cfg["RESIDENT"],
              BLOCK_D=cfg["BLOCK_D"], AGG_PARTS=cfg["AGG_PARTS"], TRI=cfg["TRI"], OWNERS=cfg["OWNERS"], STORE_UL=True),
         cfg["fwd_warps"],
         cfg["fwd_stages"]),
        ("distill_finish", text_head._distill_finish_kernel,
         dict(VV="*fp32", VF="*fp32", VA="*fp32", VB="*fp32", DELTA="*fp32", BETA="*fp32", ZN="*fp32", COS="*fp32",
              PV="*fp32", LOSSP="*fp32"),
         dict(BLOCK=text_head.FINISH_BLOCK), 4),
        ("ce_fwd", cosine_ce._ce_fwd_kernel, ce_ptrs, dict(tiles, STORE_LOGITS=False, ZERO_TICKET=True), 4),
        ("ce_merge", cosine_ce._ce_merge_kernel, ce_ptrs, cosine_ce.merge_constexprs(ce), cosine_ce.MERGE_WARPS),
        ("fwd_finish", cosine_ce._fwd_finish_kernel,
         dict(ce_ptrs, VV="*fp32", VF="*fp32", VA="*fp32", VB="*fp32", DELTA="*fp32", BETA="*fp32", ZN="*fp32",
              COS="*fp32", PV="*fp32", LOSSP="*fp32"),
         dict(cosine_ce.merge_constexprs(ce), DIST_BLOCK=text_head.FINISH_BLOCK, LOSS_BLOCK=cosine_ce.LOSS_BLOCK),
         cosine_ce.MERGE_WARPS),
        ("losses", cosine_ce._losses_kernel, ce_ptrs, dict(BLOCK=cosine_ce.LOSS_BLOCK), 4),
        ("ce_grad", cosine_ce._ce_grad_kernel, ce_ptrs, dict(tiles, HAS_GL=False, NEED_SCALE=False), 4),
        ("ce_du", cosine_ce._ce_du_kernel, dict(ce_ptrs, U="*fp32"),
         dict(cu, BLOCK_DO=ce["BLOCK_DU"], SWEEP=True, SWEEP_M=cosine_ce.sweep_rows(M, ce["BLOCK_DU"]), std=1),
         cosine_ce.SWEEP_WARPS),
        ("ce_dx", cosine_ce._ce_dx_kernel, ce_ptrs, cu, 4),
        ("ce_dx_finish", cosine_ce._ce_dx_finish_kernel, ce_ptrs, dict(BLOCK_D=ce["BLOCK_D"]), 4),
        ("text_bwd", text_head._text_bwd_kernel, text_ptrs,
         dict(blocks, BLOCK_CLS=cfg["bwd_BLOCK_CLS"], BLOCK_K=cfg["BLOCK_KB"], BLOCK_N=cfg["BLOCK_NB"],
              BLOCK_DO=cfg["BLOCK_DO"], TRI=True, OUT_CHUNKS=cfg["out_chunks"], SWEPT=True, SW_CHUNKS=ce["du_chunks"],
              SW_P2=triton.next_power_of_2(ce["du_chunks"])), cfg["bwd_warps"]),
    ]
    out = {}
    for name, kernel, ptrs, consts, warps, *stages in specs:
        row = compile_kernel(name, kernel, ptrs, consts, warps, out_dir, floats=floats, num_stages=(stages or [3])[0])
        out[kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__] = row
    return out


def unavailable_reason() -> Optional[str]:
    """Why this collector cannot run here (None if it can)."""
    if not os.path.exists(ptxas_path()):
        return "ptxas not found in triton's nvidia backend"
    return None

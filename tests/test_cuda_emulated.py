"""The "cuda" backend's kernels (csrc/) run on the CPU, in CI, without a GPU.

tests/cuda_emu/build.py compiles the same kernel sources as the GPU build with the host
compiler and a small CUDA emulation (tests/cuda_emu/include/emu_prelude.h: one fiber per
thread, barriers, warp shuffles, WMMA fragments multiplied in float32), and the bindings
with CPU tensors admitted; demul_fast.ops.cuda_ops then runs unchanged on top of it. The
launch plans are those of an H200 (132 SMs). What this checks: the kernels' indexing, tile
bounds, masks, barriers (a barrier that cannot release aborts), the fused algebra, the
class-aligned blocks of the fused forward, the float16 scaling and the rounding of the
tensor-core operands to the input dtype. What it cannot: timing, the tensor cores' own
accumulation order, real concurrency between blocks (tests/test_cuda_gpu.py, on a GPU).

Every function and the head against the float64 reference with the error rule
(tests/numerics.py; half inputs against the yardstick that rounds what the kernels round,
tests/rounded_yardstick.py, with float32 floors and no operand allowance; the checks of
tests/kernel_checks.py, which the GPU tests call too), on shapes that cross every 64-wide tile, in
float32 (SIMT path), bfloat16 and float16 (WMMA path), forward and gradients, with the
launch plans split as on the GPU (C > 64: class ranges split over blocks and merged).
"""

import os
import re

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import cuda_ops
from demul_fast.ops.distill_basis import build_distill_basis
import kernel_checks
from numerics import round_trip

from cuda_emu import build as emu_build

REASON = emu_build.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CUDA emulation unavailable: {REASON}")

ODD = dict(C=37, M=3, D=100, B=5, K=70)      # 63-row blocks of whole classes, r = 70 < D
PRIMES = dict(C=23, M=5, D=131, B=67, K=193)  # every dimension crosses a 64-wide tile, K > D
M64 = dict(C=3, M=64, D=72, B=7, K=40)       # one class per block of the fused forward
MANY = dict(C=2, M=70, D=80, B=9, K=50)      # M > 64: the aggregation runs apart, blocks cross classes
WIDE = dict(C=150, M=2, D=40, B=20, K=30)    # C > 64: the split class ranges and their merges
# B > 64 with 3 class splits: the cross-entropy's part of the losses' merge in 5 blocks (4 lanes
# per image, 64 images per block), the distillation's in 2 (csrc/cross_entropy.cu loss_merge_kernel)
TALL = dict(C=150, M=2, D=40, B=300, K=30)
# D and r past the 160 KB shared-memory budget of the resident tiles (csrc/distill.cu
# DistillSmem: 64 x 936 x 2 B + 46 KB for 16-bit T; text_head.cu BwdSmem: G of r = 930 in
# two panels, rebuilt per column chunk): the forward's streamed kernel, the backward's panels
BIG = dict(C=2, M=3, D=930, B=3, K=950)
# between the 99 KB of shared memory of sm_86/89 and the 160 KB cap: 16-bit T's resident tile
# (64 x 520 x 2 B + 46 KB) and a one-panel G of r = 512 fit an H100/H200, not an sm_86/89
# (test_smaller_shared_memory_narrows_the_tiles)
MID = dict(C=2, M=3, D=512, B=3, K=600)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def emulated_extension():
    """cuda_ops on the emulated extension (built once per source hash, cached between runs:
    tests/cuda_emu/build.py) for this module's tests."""
    module = emu_build.build()
    saved = cuda_ops._C
    cuda_ops._C = module
    yield module
    cuda_ops._C = saved


def make_inputs(gen, C, M, D, B, K, bias=True):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=gen)
    return r(C, M, D), r(C, M), r(B, D), y, r(C, K), r(K, D) / D ** 0.5, (r(K) if bias else None)


def basis_of(E, W, b):
    return build_distill_basis(W, b, E, dtype=torch.float32)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# The checks are tests/kernel_checks.py's, the very ones the GPU tests (test_cuda_gpu.py) call:
# float32 against the float32 reference as yardstick, bfloat16 / float16 against the yardstick
# that rounds what csrc/ rounds (tests/rounded_yardstick.py), float32 floors.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,distill", [(ODD, True), (PRIMES, True), (PRIMES, False), (M64, True),
                                           (MANY, True), (WIDE, True), (TALL, True)],
                         ids=["odd", "primes", "primes-ce-only", "m=64", "m>64", "wide", "tall"])
def test_demul_head(gen, shape, distill, dtype):
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    basis = basis_of(E, W, b) if distill else None
    tau = torch.tensor(100.0, dtype=torch.float64)
    B, C = shape["B"], shape["C"]

    def fast(t, a, x, s):
        return tuple(cuda_ops.demul_head(t, a, x, y, s, basis, 0.7, 0.1, True))
    # A cotangent on every output (loss, ce, dist, logits): every gradient path of the kernels.
    cot = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 0.5, -0.25)] + [rand(gen, B, C) / (B * C)]
    fo, _ = kernel_checks.check_head(f"emulated head {dtype}", "cuda", fast, T, A, X, y, tau,
                                     *((E, W, b) if distill else (None, None, None)), 0.7, 0.1, cot, dtype)
    assert [o.dtype for o in fo] == [torch.float32] * 3 + [dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [ODD, PRIMES, M64, MANY, BIG, MID],
                         ids=["odd", "primes", "m=64", "m>64", "big-d", "mid-d"])
def test_demul_head_distillation_gradient(gen, shape, dtype):
    """The head with a cotangent on distill_loss alone: dT is the fused backward's distillation
    part only (G R, the r-space projection <p, G>, the saved p), which the cross-entropy's
    larger terms would hide in the test above; dA must be zero."""
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    basis = basis_of(E, W, b)

    def fast(t, a):
        return cuda_ops.demul_head(t, a, X.to(t.dtype), y, 30.0, basis, 0.7, 0.1).distill_loss
    _, dA = kernel_checks.check_head_distillation(f"emulated head distillation {dtype}", "cuda", fast, T, A, X, y,
                                                  30.0, E, W, b, 0.7, 0.1, 1.3, dtype, prompt_grad=True)
    assert dA.shape == A.shape and not dA.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [ODD, MANY], ids=["odd", "m>64"])
def test_aggregate_prompts(gen, shape, dtype):
    T, A, *_ = make_inputs(gen, **shape)
    (fo,), _ = kernel_checks.check_aggregate(f"emulated aggregate {dtype}", "cuda", cuda_ops.aggregate_prompts, T, A,
                                             rand(gen, shape["C"], shape["D"]), dtype)
    assert fo.dtype == dtype


# C > 64 splits the image sweep's classes (the split sum of sum_normalize_rows_kernel), and
# D > 2048 sends the row's sums past its shared-memory stash through the float32 spill
WIDE_ROWS = dict(C=70, M=1, D=2085, B=3, K=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [PRIMES, WIDE_ROWS], ids=["primes", "d>2048"])
def test_cosine_cross_entropy(gen, shape, dtype):
    _, _, X, y, *_ = make_inputs(gen, **shape)
    U = ref.l2_normalize(rand(gen, shape["C"], shape["D"]))
    (fo,), _ = kernel_checks.check_cross_entropy(
        f"emulated ce {dtype}", "cuda", lambda x, u, s: cuda_ops.cosine_cross_entropy(x, u, y, s, 0.1), X, U, y,
        torch.tensor(57.0, dtype=torch.float64), 0.1, 0.7, dtype)
    assert fo.dtype == torch.float32 and fo.dim() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# WIDE: D = 40 is two 32-wide slices of R per chunk, the second one's first use past D (the
# zero fill of the slices past D is checked on poisoned shared memory, not on stale values)
@pytest.mark.parametrize("shape,bias", [(ODD, True), (PRIMES, False), (WIDE, True)], ids=["k<d", "k>d-nobias", "d=40"])
def test_prompt_distill_loss(gen, shape, bias, dtype):
    T, _, _, _, E, W, b = make_inputs(gen, bias=bias, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    basis = basis_of(E, W, b)
    (fo,), _ = kernel_checks.check_distill(f"emulated distill {dtype}", "cuda",
                                           lambda t: cuda_ops.prompt_distill_loss(t, basis), T, E, W, b, 1.3, dtype)
    assert fo.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_basis_r_of_another_dtype_is_refused_naming_it(emulated_extension, dtype):
    """The kernels stage the basis R as it comes, in T's type (16-byte cp.async of T's values):
    a direct caller's R of another dtype (the float32 R of the custom ops, which cast it once
    per basis, or a 16-bit R for float32 T) is refused by every entry point that takes the
    basis, with an error naming basis.R; the forward's and backward's other operands valid."""
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    T, A, X, y = torch.randn(5, 3, 8).to(dtype), torch.randn(5, 3), torch.randn(4, 8).to(dtype), torch.arange(4)
    s = torch.tensor(30.0)
    good = (torch.randn(4, 8).to(dtype), torch.randn(4), torch.randn(5, 4), torch.randn(5), torch.rand(()))
    bad = (good[0].to(other),) + good[1:]
    _, n, zn, cos, proj = emulated_extension.prompt_distill_loss_forward(T, *good)
    saved = emulated_extension.demul_head_forward(T, A, X, y, s, *good, 1.0, 0.0, False)[4:]
    g = torch.ones(())
    calls = [lambda b: emulated_extension.prompt_distill_loss_forward(T, *b),
             lambda b: emulated_extension.prompt_distill_loss_backward(g, T, *b, n, zn, cos, proj),
             lambda b: emulated_extension.demul_head_forward(T, A, X, y, s, *b, 1.0, 0.0, False),
             lambda b: emulated_extension.demul_head_backward(g, None, None, None, T, X, y, s, *b, 1.0, 0.0, *saved,
                                                              True, False, False)]
    for call in calls:
        assert torch.isfinite(call(good)[0]).all()
        with pytest.raises(RuntimeError, match=rf"basis\.R must have the dtype of text_features \({_aten(dtype)}\), "
                                               rf"got {_aten(other)}"):
            call(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_loss_merge_ticket_is_zeroed_for_every_call(gen, emulated_extension, dtype):
    """The losses' merge (one launch of several blocks) lets the last block to take a ticket
    write the means; the ticket is an atomic counter that the partial kernel launched just
    before the merge zeroes on the stream. Every forward that merges (the head with and without
    the distillation, the cross-entropy, the distillation alone), called twice in a row on
    TALL (several merge blocks per part): the same bits both times, all finite (a counter not
    zeroed, here poisoned to -1 as a reused one would hold the last call's count, never reaches
    the last block: the losses stay NaN), and loss = ce + alpha dist exactly as the merge forms it."""
    T, A, X, y, E, W, b = make_inputs(gen, **TALL)
    basis = basis_of(E, W, b)
    t, x, s = T.to(dtype), X.to(dtype), torch.tensor(30.0)
    good = (basis.R.to(dtype).contiguous(), basis.c.contiguous(), basis.F.contiguous(), basis.delta, basis.beta)
    U = ref.l2_normalize(rand(gen, TALL["C"], TALL["D"])).float()
    ext = emulated_extension
    calls = [lambda: ext.demul_head_forward(t, A.float(), x, y, s, *good, 0.7, 0.1, False)[:4],
             lambda: ext.demul_head_forward(t, A.float(), x, y, s, None, None, None, None, None, 0.7, 0.1, False)[:3],
             lambda: ext.cosine_cross_entropy_forward(x, U, y, s, 0.1)[:2],
             lambda: ext.prompt_distill_loss_forward(t, *good)[:4]]
    for call in calls:
        first = [v.clone() for v in call()]
        second = call()
        assert all(torch.isfinite(v).all() for v in first + list(second))
        assert all(torch.equal(a, c) for a, c in zip(first, second))
    # the head's image norms (extra blocks of the distillation's forward) are the bits of the
    # row-norm kernel that the cross-entropy alone launches
    assert torch.equal(ext.demul_head_forward(t, A.float(), x, y, s, *good, 0.7, 0.1, False)[8],
                       ext.cosine_cross_entropy_forward(x, U, y, s, 0.1)[2])
    loss, ce, dist = calls[0]()[:3]
    alpha = torch.tensor(0.7, dtype=torch.float32)
    assert torch.equal(loss, ce + alpha * dist) or torch.equal(loss, torch.addcmul(ce, alpha, dist))  # fma or not


def _aten(dtype):
    """ATen's name of a dtype, as the extension's messages print it."""
    return {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half"}[dtype]


def test_smaller_shared_memory_narrows_the_tiles():
    """On a device with 99 KB of opt-in shared memory per block (sm_86/89; the emulated device
    is told so through $DEMUL_EMU_SMEM_OPTIN, and its cudaFuncSetAttribute aborts on a request
    over the limit, as the driver refuses it), the "mid-d" head asks for less: the text
    backward narrows its G panel and the distillation forward takes its streaming kernel
    (common.cuh dynamic_smem_budget). Same test as in-process, in bf16 and float32."""
    import subprocess
    import sys

    env = dict(os.environ, DEMUL_EMU_SMEM_OPTIN=str(99 * 1024))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "test_demul_head_distillation_gradient and mid-d and (bfloat16 or float32)"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=1800)
    emu_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("emu:")]
    assert proc.returncode == 0, "\n".join(emu_lines) or proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_scale_exactly_with_the_loss_weight(gen, dtype):
    """A loss weighted by 2^16 (a mixed-precision loss scaler's default) gives exactly 2^16 x dA:
    float16's stored dL/ds is rescaled by powers of two (no overflow past 65504)."""
    T, A, X, y, E, W, b = make_inputs(gen, **ODD)
    basis = basis_of(E, W, b)
    grads = []
    for weight in (1.0, 2.0 ** 16):
        t, a = T.to(dtype).requires_grad_(), A.float().requires_grad_()
        out = cuda_ops.demul_head(t, a, X.to(dtype), y, 100.0, basis, 0.7, 0.1)
        (out.loss * weight).backward()
        grads.append(a.grad)
    assert torch.isfinite(grads[1]).all()
    assert torch.equal(grads[1], grads[0] * 2.0 ** 16)


@pytest.fixture
def schedule(monkeypatch):
    """Sets the emulation's schedule (include/emu_adversary.h) for the launches that follow."""
    def set_schedule(name):
        monkeypatch.setenv("DEMUL_EMU_SCHEDULE", name)
    return set_schedule


def test_head_is_bitwise_deterministic(gen, schedule):
    """The same bits under two schedules (blocks and threads in id order, then reversed):
    no atomics, no order-dependent reduction, no race."""
    T, A, X, y, E, W, b = make_inputs(gen, **ODD)
    basis = basis_of(E, W, b)
    results = []
    for name in ("forward", "reverse"):
        schedule(name)
        leaves = [T.to(torch.bfloat16).requires_grad_(), A.float().requires_grad_(),
                  X.to(torch.bfloat16).requires_grad_()]
        out = cuda_ops.demul_head(*leaves, y, 30.0, basis, 0.5, 0.1, True)
        (out.loss + out.logits.float().square().sum()).backward()
        results.append([out.loss, out.logits] + [v.grad for v in leaves])
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_every_op_gives_the_same_bits_under_every_schedule(schedule):
    """Every op, forward and backward, float32 / bfloat16 / float16, on shapes that split the
    class ranges, under the adversarial emulation (NaN-poisoned shared memory and outputs,
    strict barriers, WMMA checks) and two schedules (ids in order; blocks and threads
    reshuffled at every barrier): all finite, all bitwise identical (the head's determinism
    test adds the reversed schedule; tests/cuda_emu/race_probe.py runs all five)."""
    from cuda_emu import race_probe  # noqa: PLC0415

    first = None
    for name in ("forward", "shuffle:1"):
        schedule(name)
        got = race_probe._run_ops(cuda_ops._C)
        assert all(torch.isfinite(t).all() for t in got), f"schedule {name}: a non-finite value (a poisoned read)"
        first = first or got
        assert all(torch.equal(a, c) for a, c in zip(first, got)), f"schedule {name} changes the bits: a race"


def _line_after(name, marker):
    """The first barrier of csrc/<name> after the line holding ``marker``."""
    with open(os.path.join(emu_build.CSRC, name)) as f:
        at = next(i for i, text in enumerate(f, 1) if marker in text)
    return next(ln for f, ln in emu_build.barriers() if f == name and ln > at)


def test_the_planted_race_after_the_row_scalars_is_caught():
    """The barrier after the text backward's per-row scalars in text_head.cu (threads 0-63
    write s_coef, every warp reads it in the G build) removed: the adversarial emulation
    must notice (a subprocess: an abort of the emulation ends only it). The same build as
    the other tests: the barrier is turned off at run time (DEMUL_EMU_SKIP_BARRIERS)."""
    from cuda_emu import race_probe  # noqa: PLC0415

    where = f"text_head.cu:{_line_after('text_head.cu', 's_s[tid] = -g_over_rows')}"
    # float32 (the SIMT path) under two schedules suffices
    report = race_probe.probe([where], dtypes=("float32",), schedules=("forward", "reverse"))
    assert report["skipped"].get(where, 0) > 0 or report["aborted"], f"the runs never reached {where}: {report}"
    assert race_probe.caught(report), f"the removed barrier went unnoticed: {report}"


# Barriers whose removal must be caught: all of them (tests/cuda_emu/race_probe.py; the table
# in docs/testing-precision.md). One build serves them all (the barrier is turned off at run
# time), but each runs every op under five schedules and three dtypes (about a minute of CPU),
# so the sweep runs when DEMUL_FAST_BARRIER_SWEEP=1.
SWEEP = os.environ.get("DEMUL_FAST_BARRIER_SWEEP") == "1"


# The first barrier of block_sum / block_max ("scratch may still be read by a previous call")
# guards a second call in a row; every kernel calls them once, or (sweep.cuh) between other
# barriers: removing it is no race today (measured: not caught). unstage's last barrier
# ("c may be rewritten next") was not caught either: where c is rewritten, other barriers
# come first. strict: a caller that makes one necessary turns it into a failure. The
# shadow-memory race check (race_probe --race, three shapes, three dtypes) agrees: with any
# one of the three removed, no shared-memory access races on any path the ops take. Found by
# their code, not by line numbers (which move with every edit of common.cuh).
def _barrier_at(name, marker):
    """The barrier of csrc/<name> on the line holding ``marker``, else the first one after it."""
    with open(os.path.join(emu_build.CSRC, name)) as f:
        at = next(i for i, text in enumerate(f, 1) if marker in text)
    return next(ln for f, ln in emu_build.barriers() if f == name and ln >= at)


NOT_A_RACE_TODAY = {f"common.cuh:{_barrier_at('common.cuh', marker)}"
                    for marker in ("float block_sum(", "float block_max(", "c may be rewritten next")}


def _barrier_param(f, ln):
    where = f"{f}:{ln}"
    marks = [pytest.mark.xfail(strict=True, reason="defensive barrier, no race with today's callers")] \
        if where in NOT_A_RACE_TODAY else []
    return pytest.param(where, id=where, marks=marks)


@pytest.mark.skipif(not SWEEP, reason="about a minute of emulation per barrier: set DEMUL_FAST_BARRIER_SWEEP=1")
@pytest.mark.parametrize("where", [_barrier_param(f, ln) for f, ln in emu_build.barriers()])
def test_each_removed_barrier_is_caught(where):
    from cuda_emu import race_probe  # noqa: PLC0415

    report = race_probe.probe([where])
    if not race_probe.caught(report):  # the shadow-memory check sees races the schedules hide
        assert report["skipped"].get(where, 0) > 0, f"the probe's runs never reach {where}: {report}"
        report = race_probe.probe([where], race=True)
        assert report["aborted"], f"removing the barrier at {where} went unnoticed: {report}"


def test_the_emulated_extension_reports_the_built_constants(emulated_extension):
    from demul_fast import common
    assert emulated_extension.EPS == common.EPS and emulated_extension.MAX_PROMPTS == common.MAX_PROMPTS
    assert os.path.basename(emulated_extension.__file__).startswith("demul_fast_cuda_emu_")


# ---------------------------------------------------------------- the instrumented build
# tests/cuda_emu/include/emu_instrument.h: the kernels compiled with GCC's kernel-address
# instrumentation, every access through include/emu_hooks.cpp (one more cached build).


def _csrc_line(name, pattern):
    """The first line of csrc/<name> that matches ``pattern``."""
    with open(os.path.join(emu_build.CSRC, name)) as f:
        return next(i for i, text in enumerate(f, 1) if re.search(pattern, text))


def test_the_race_check_passes_every_kernel_unchanged():
    """Every op, forward and backward, in float32, bfloat16 and float16 on the shapes of
    race_probe, under the shadow-memory race check: no shared-memory access races with
    another thread's since the last barrier (warp barriers, shuffles, WMMA for one warp)."""
    from cuda_emu import race_probe  # noqa: PLC0415

    report = race_probe.probe([], race=True)
    assert not report["aborted"], f"the race check fires on the unchanged sources: {report.get('message')}"
    assert not report["nonfinite"], report


def test_the_race_check_names_both_lines_of_the_g_build_race():
    """The barrier after the text backward's G build removed (each warp writes its rows of G
    into dynamic shared memory, every warp then reads all of them in the product): a race on
    a GPU that the schedules and NaN poisoning do not show (the build's warp shuffles keep the
    emulated warps in step). The race check aborts at the first shared-memory read that the
    barrier ordered after another thread's write (of G, or of the R stage that thread's
    cp.async wait completed), naming the kernel, the writer's line and the reader's csrc
    file:line (float32)."""
    from cuda_emu import race_probe  # noqa: PLC0415

    line = _line_after("text_head.cu", "build_g((ks")
    # the build of test_the_race_check_passes_every_kernel_unchanged, the barrier turned off at run time
    report = race_probe.probe([f"text_head.cu:{line}"], dtypes=("float32",), race=True)
    assert report["aborted"], f"the race check missed the removed barrier: {report}"
    msg = report["message"]
    assert "race in text_backward_kernel" in msg and "dynamic shared memory" in msg, msg
    # the first race met is in G, or in the R stage the same barrier published (written by its
    # thread's cp.async wait: named by include/emu_async.h's line, where the emulated copy
    # lands), read by another thread at a line of the kernel's source
    found = re.search(r"written by thread \d+ at ([\w.]+):(\d+), then read by thread \d+ at (\w+\.cuh?):(\d+) ", msg)
    assert found, msg
    assert found.group(1) in ("text_head.cu", "pipeline.cuh", "common.cuh", "emu_async.h"), msg
    assert found.group(3) in ("text_head.cu", "pipeline.cuh", "common.cuh"), msg
    with open(os.path.join(emu_build.CSRC, found.group(3))) as f:
        assert int(found.group(4)) <= sum(1 for _ in f), msg


def _sectors(lo, hi):
    return set(range(lo // 32, (hi - 1) // 32 + 1))


def test_the_cuda_trace_counts_sectors_per_warp_access():
    """benchmarks/compiled_cuda.trace_head on the instrumented build, every block traced: the
    image norms (a warp per row, lane l reading elements l, l + 32, ...; extra blocks of the
    distillation's forward) move, per row and per 32 elements, the sectors those bytes cover; the
    text backward reads p = R t^ and the basis R in T's dtype (its cp.async copies included)."""
    from benchmarks import compiled_cuda  # noqa: PLC0415

    sizes = dict(C=37, M=3, D=100, B=5, K=70)
    got = compiled_cuda.trace_head("tiny", "frozen", "bfloat16", sample=0, sizes=sizes, lines=True)
    names = [x["kernel"] for x in got]
    planned = compiled_cuda.head_launches(**sizes, dtype="bfloat16", mode="frozen")
    assert all(m is not None for m in compiled_cuda.match_trace(planned, got)), names
    # the image norms ride on the distillation's forward (common.cuh warp_row_norms, extra blocks):
    # its sites there, by source line
    assert "row_norms_kernel" not in names
    dist = next(x for x in got if x["kernel"].startswith("distill_forward"))
    with open(os.path.join(emu_build.CSRC, "common.cuh")) as f:
        text = f.read().splitlines()
    start = next(i for i, ln in enumerate(text, 1) if "void warp_row_norms(" in ln)
    read_at = next(i for i, ln in enumerate(text, 1) if i > start and "to_f(v[r * D + d])" in ln)
    write_at = next(i for i, ln in enumerate(text, 1) if i > start and "norm[r] = sqrtf(s)" in ln)
    sites = lambda at, w: [s for s in dist["sites"] if s["write"] == w and s["line"].split(" ")[0] == f"common.cuh:{at}"]  # noqa: E731
    B, D, e = sizes["B"], sizes["D"], 2
    want = 0
    for r in range(B):
        for k in range(0, D, 32):
            want += 32 * len(_sectors(e * (r * D + k), e * (r * D + min(D, k + 32))))
    assert sites(read_at, False) and sum(s["sector_bytes"] for s in sites(read_at, False)) == want
    assert sum(s["sector_bytes"] for s in sites(write_at, True)) == 32 * B  # lane 0 writes one float per row
    text = next(x for x in got if x["kernel"] == "text_backward_kernel")
    rows, rank = sizes["C"] * sizes["M"], min(sizes["K"], sizes["D"])
    assert text["grid"][0] == -(-rows // 64)
    # G is built once per row tile and group of column chunks: p = R t^ is read once per group,
    # and R (the cp.async copies, counted at their issue) once per row tile and group
    groups = text["grid"][1] if len(text["grid"]) > 1 else 1
    assert text["l2_read_bytes"] >= groups * (e * rows * rank + text["grid"][0] * e * rank * sizes["D"])


# (kernel, L2 read bytes, L2 write bytes) of include/emu_probe.cpp's probes, counted by hand:
# one block of two warps, each warp on its own 2 KB; a warp access moves the 32-byte sectors
# its lanes touch.
PROBES = [
    ("probe_scalar", 2 * 4 * 32, 2 * 4 * 32),        # 32 lanes x 4 B contiguous: 4 sectors, read and written
    ("probe_strided", 2 * 32 * 32, 0),               # lanes 32 B apart: 32 sectors for 128 B
    ("probe_vec16", 2 * 16 * 32, 2 * 4 * 32),        # one 16-byte load a lane: 512 B in 16 sectors (not 4 x 16)
    ("probe_vec16_pairs", 2 * 2 * 32 * 32, 2 * 4 * 32),  # two 16-byte loads 32 B apart a lane: 32 sectors each
    ("probe_half_store", 0, 2 * 2 * 32),             # 32 lanes x 2 B: 2 sectors
    ("probe_divergent", 2 * (4 + 4) * 32, 2 * 4 * 32),  # every lane once, the odd lanes again: 4 + 4 sectors
    ("probe_cp_async", 2 * (16 + 4) * 32, 0),        # 16-byte then 4-byte cp.async copies, counted at the issue
]


def test_the_trace_counts_the_probe_kernels_by_hand():
    """The instrumented emulation's trace on the probe kernels of include/emu_probe.cpp: the L2
    bytes of each equal the sectors counted by hand, each site groups the 32 lanes of a warp
    (64 lane accesses over the two warps; 32 for the odd lanes' second pass), and a float4 load
    is one 16-byte access (the kernels are compiled with -fno-tree-sra: else four 4-byte
    accesses of 16 sectors each would count 4x the sectors of the coalesced load)."""
    from benchmarks import compiled_cuda  # noqa: PLC0415

    module = emu_build.build(instrument=True)
    lib = emu_build.instrumented_library(module)
    buf, out = torch.zeros(1024), torch.zeros(64)
    assert buf.data_ptr() % 32 == 0 and out.data_ptr() % 32 == 0
    lib.emu_trace_start(0)
    try:
        lib.emu_probe_run(buf.data_ptr(), buf.numel() * 4, out.data_ptr())
    finally:
        got = compiled_cuda.parse_trace(lib.emu_trace_take().decode())
    assert [x["kernel"] for x in got] == [p[0] for p in PROBES]
    for x, (name, read, written) in zip(got, PROBES):
        assert (x["l2_read_bytes"], x["l2_write_bytes"]) == (read, written), name
        assert sum(s["sector_bytes"] for s in x["sites"]) == read + written, name
        for s in x["sites"]:
            assert s["warp_accesses"] == 2, (name, s)
            second_pass = name == "probe_divergent" and s["lane_accesses"] == 32
            assert s["lane_accesses"] == 64 or second_pass, (name, s)
    vec = next(x for x in got if x["kernel"] == "probe_vec16")
    assert max(s["bytes"] / s["lane_accesses"] for s in vec["sites"]) == 16  # one float4 a lane
    # HBM: the distinct sectors; the pairs' second load re-reads the first's sectors
    pairs = next(x for x in got if x["kernel"] == "probe_vec16_pairs")
    assert pairs["hbm_read_bytes"] == 2 * 1024

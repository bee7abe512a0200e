"""Launch counting (benchmarks/launches.py) and the step model (benchmarks/step_model.py):
the counters count what they claim, eager counts do not depend on C (which lets the step
suite count the eager steps at C=37 for every workload), and the model's arithmetic."""

import pytest
import torch

from benchmarks import launches, models, step_model


def test_eager_counter_separates_views_allocations_and_syncs():
    x = torch.randn(4, 5)

    def fn():
        y = x.t()  # view: no launch
        z = torch.empty(3)  # allocation: no launch
        w = (y * 2).sum()  # two launches
        float(w)  # a host read: a launch that is also a sync
        return z

    c = launches.count_eager(fn)
    assert c["views"] == 1 and c["allocations"] == 1
    assert c["launches"] == 3 and c["syncs"] == 1


def test_code_counter_reads_the_call_function_only():
    code = '''
cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], r"""...""")
def helper():
    cpp_fused_add_0(buf)
class Runner:
    def call(self, args):
        buf0 = empty_strided_cpu((4, ), (1, ), torch.float32)
        cpp_fused_add_0(buf0)
        extern_kernels.mm(a, b, out=buf1)
        triton_poi_fused_1.run(buf0, buf1, 4, stream=stream0)
        buf2 = torch.ops.demul_fast.cuda_demul_head.default(x, y)
        buf3 = reinterpret_tensor(buf1, (2, 2), (2, 1), 0)
        torch.ops.aten.index_put_.default(buf0, [i], v)
        del buf1
        return (buf0, )
def benchmark_compiled_module():
    cpp_fused_add_0(buf)
'''
    c = launches.count_code(code)
    assert c == dict(kernels=2, extern=1, ops=2, custom_ops=1, launches=5)


def _step_count(cls, C, **kw):
    model, tok = models.clip_model("micro", "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    E, W, b = torch.randn(C, 12, generator=gen), torch.randn(12, 16, generator=gen), torch.randn(12, generator=gen)
    m = cls(model, tok, models.classnames(C), llm_embeddings=E, phi=(W, b), n_prompts=2, n_ctx=4, **kw).train()
    x, y = torch.randn(5, 16, generator=gen), torch.randint(0, C, (5,), generator=gen)

    def step():
        m(image_features=x, labels=y).loss.backward()
    step()
    return launches.count_eager(step)


@pytest.mark.parametrize("which", ["reference", "demul"])
def test_eager_step_count_does_not_depend_on_C(which):
    """The step suite counts eager steps at C <= 37 and reuses the count for larger C: a step
    dispatches the same ops for any number of classes (batched over them)."""
    import demul_fast as df
    from demul_fast import reference as ref
    cls, kw = (ref.DeMulReference, {}) if which == "reference" else (df.DeMul, {"backend": "torch"})
    counts = [_step_count(cls, C, **kw) for C in (3, 11, 40)]
    assert counts[0] == counts[1] == counts[2], counts
    assert counts[0]["launches"] > 50


def test_step_model_arithmetic():
    """Launch-bound and device-bound steps, from the model's own definitions."""
    m = step_model.MACHINES["H100"]
    lengths = [8] * 100
    few = dict(text_head=10, image=0, optim=2, graphs=2)
    many = dict(text_head=5000, image=400, optim=10, graphs=0)
    r = step_model.breakdown(m, 100, "graphs", lengths, few)
    assert r.bound == "device" and r.host_ms == pytest.approx(2 * 10e-3 + 2 * 3e-3)
    work = r.image_ms + r.text_ms + r.head_ms + r.optim_ms
    assert r.step_ms == pytest.approx(work + 12 * 1e-3)
    e = step_model.breakdown(m, 100, "eager", lengths, many)
    assert e.bound == "launch" and e.step_ms == pytest.approx(5410 * 5e-3)
    # the full-length text tower does C*M*77 tokens of work, the prefix-shared one far fewer
    full = step_model.text_cost(lengths, full=True)
    short = step_model.text_cost(lengths, full=False)
    assert full.flops > 5 * short.flops
    # what the code runs beyond floors.encoder_cost, worked by hand for C=100 suffixes of 8,
    # M=4, P=17, W=512: T = 68 + 3200 = 3268 rows; every way skips out_proj + MLP (9 W^2) of
    # the last layer's T - 400 non-EOT rows; compiled ways also skip layer 0's q/k/v (3 W^2)
    # of 3 x 800 shared suffix rows (out_proj runs on the T packed rows: the attention op writes
    # them); 2 multiply-add FLOPs each, forward and backward
    w2 = 512 * 512
    assert step_model.text_linear_adjustment(lengths, "eager") == -2 * 2 * 2868 * 9 * w2
    assert step_model.text_linear_adjustment(lengths, "graphs") == -2 * 2 * (2868 * 9 + 2400 * 3) * w2
    eager, graphs = (step_model.text_cost(lengths, full=False, way=w) for w in ("eager", "graphs"))
    assert eager.flops == short.flops - 2 * 2 * 2868 * 9 * w2 and graphs.flops < eager.flops


def _tiny_compiled_step(tower: str):
    """One training step (forward + backward, torch head) of a planned DeMul over the named
    random-weight tower of benchmarks/models.py (5 classes, 2 prompts, n_ctx 4, 3 images),
    compiled whole (fullgraph, static shapes): the callable count_compiled counts."""
    import demul_fast as df

    model, tok = models.clip_model(tower, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    E, W, b = torch.randn(5, 12, generator=gen), torch.randn(12, 128, generator=gen), torch.randn(12, generator=gen)
    m = df.DeMul(model, tok, models.classnames(5), llm_embeddings=E, phi=(W, b), n_prompts=2, n_ctx=4,
                 backend="torch").train()
    m.plan()
    x, y = torch.randn(3, 128, generator=gen), torch.randint(0, 5, (3,), generator=gen)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    return lambda: compiled(image_features=x, labels=y).loss.backward()


def test_max_autotune_cpp_gemm_template_is_not_offered_for_the_training_step():
    """max-autotune's C++ GEMM template (``max_autotune_gemm_backends="CPP,ATEN"``), the only
    way inductor fuses an epilogue into a matrix product on a CPU, is offered only for a
    constant weight (``use_cpp_gemm_template(require_constant_mat2=True)`` in mm/addmm's
    lowering: a frozen inference graph). In a training graph the frozen tower's weights are
    graph inputs, so every product stays an extern call and the step counts what the default
    mode counts (docs/step.md: 242 at C=100 for ViT-B/16 when counted, before the attention op). If a torch release starts offering
    it, this fails: recount the step with max-autotune. Two-layer tower, code generated, not
    built; with "CPP" alone inductor has no choice for a product at all."""
    from torch._inductor import config

    step = _tiny_compiled_step("tiny")

    def count(**patch):
        codes = []
        with config.patch(**patch):
            out = launches.count_compiled(step, run=False, codes=codes)[1]
        return out, codes

    default, _ = count()
    tuned, codes = count(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    assert codes and not any("micro_gemm" in c for c in codes), "a C++ GEMM template was chosen"
    assert tuned == default and tuned["extern"] > 10, (tuned, default)


def test_a_middle_text_layer_compiles_to_16_launches(monkeypatch):
    """docs/step.md: under torch.compile a text layer that is neither the first (shared suffix
    rows) nor the last (EOT queries) is 8 launches forward (qkv, the prefix_attention op,
    out_proj, residual + ln_2, fc1, GELU, fc2, residual + ln_1) and 8 backward (4 input-gradient
    products, GELU's and the two layer norms' backward, the op's backward, whose [T, 3W] output
    is the qkv product's gradient as it is: no cat kernel). Counted as the difference between
    a 4- and a 3-layer tiny tower (one middle layer more), code generated, not built; the
    attention op is one launch each way (custom_ops)."""
    def count(layers):
        cfg = dict(models.CUSTOM_TOWERS["tiny"], text_cfg=dict(models.CUSTOM_TOWERS["tiny"]["text_cfg"], layers=layers))
        monkeypatch.setitem(models.CUSTOM_TOWERS, f"tiny-{layers}-layers", cfg)  # clip_model caches by name
        return launches.count_compiled(_tiny_compiled_step(f"tiny-{layers}-layers"), run=False)[1]

    three, four = count(3), count(4)
    assert four["launches"] - three["launches"] == 16, (three, four)
    assert four["custom_ops"] - three["custom_ops"] == 2 and four["extern"] - three["extern"] == 8, (three, four)

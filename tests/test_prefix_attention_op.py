"""``demul_fast::prefix_attention`` (demul_fast/ops/prefix_attention.py): one layer's
prefix-shared attention on packed rows, against a float64 full-length attention (each
sequence's [prefix ; suffix] causally, one softmax: the function the encoder must compute)
and the eager ``_SharedPrefixAttention``, forward (out, lse) and every gradient, under the
error rule (tests/numerics.py).

Paths: the Triton kernels (``TRITON_ON_CPU``: the interpreter without a GPU; every output
buffer NaN-poisoned, so a missing write fails) in float32, bfloat16 and float16, and the CPU
composite (ATen's CPU flash attention on query slots) in float32 (in half precision ATen's CPU
kernel rounds its probabilities; the compiled CPU path ran that kernel before this op too). Layouts: several groups,
ragged suffixes (length 1 and the full S), P = 1, P > S, P and S beyond one 16-row block,
1 and 2 heads, head dims 16 and 32, and the first layer's shared suffix (q, k, v hold group
0's suffix rows for every group; their gradient is summed over the groups).

Half precision: the kernels compute every product in float32 from the stored operands, so
the yardstick is the float32 reference on the same inputs; the one value they round by
design is the stored output O that the backward's delta = rowsum(dO * O) reads (as flash
attention does), so the gradients' yardstick and float64 reference read O in the
dtype too: the op's own stored output (tests/rounded_yardstick.py's rule: round exactly what
the kernel rounds; the output itself is checked on its own).
"""

from __future__ import annotations

import pytest
import torch

from numerics import assert_error_rule

from demul_fast.common import interpreting
from demul_fast.kernels import launch
from demul_fast.ops import prefix_attention as pa
from demul_fast.prefix_attention import PackedLayout, _SharedPrefixAttention

# (G, P, N, S, heads, head dim)
LAYOUTS = [(2, 3, 3, 5, 2, 16), (3, 1, 2, 4, 1, 32), (2, 20, 2, 3, 2, 16), (2, 3, 2, 21, 1, 16)]
HALF = [torch.bfloat16, torch.float16]


def _eot(g, n, s, gen):
    eot = torch.randint(0, s, (g, n), generator=gen)
    eot[0, 0] = 0          # a suffix of one row
    eot[-1, -1] = s - 1    # one of the full S rows
    return eot


def _layout(g, p, n, s, heads, eot, dtype=torch.float32):
    layout = PackedLayout.build(g, p, n, s, eot)
    layout.prepare(dtype, [heads])
    return layout


def full_length(q, k, v, layout, heads, o_rounded=None, grad=None):
    """Float64/float32 reference on packed rows: each sequence's full-length causal attention
    ([group prefix ; own suffix]), each prefix's own causal attention. Returns (out, lse) and,
    with ``grad``, (dq, dk, dv) by the closed form, delta from ``o_rounded`` (else out)."""
    g, p, n = layout.g, layout.p, layout.n
    t, w = q.shape
    hd = w // heads
    scale = hd ** -0.5
    out, lse = torch.zeros_like(q), q.new_zeros(t, heads)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lens = (layout.eot + 1).flatten().tolist()
    spans = []  # (query rows, key rows)
    row = g * p
    for gi in range(g):
        pre = list(range(gi * p, gi * p + p))
        spans.append((pre, pre))
        for ni in range(n):
            suf = list(range(row, row + lens[gi * n + ni]))
            row += len(suf)
            spans.append((suf, pre + suf))
    for qr, kr in spans:
        qi, ki = torch.tensor(qr), torch.tensor(kr)
        off = len(kr) - len(qr)
        mask = torch.arange(len(kr)).view(1, -1) <= torch.arange(len(qr)).view(-1, 1) + off
        for h in range(heads):
            c = slice(h * hd, (h + 1) * hd)
            qq, kk, vv = q[qi, c], k[ki, c], v[ki, c]
            sc = (qq @ kk.T * scale).masked_fill(~mask, float("-inf"))
            lse[qi, h] = torch.logsumexp(sc, -1)
            pr = torch.softmax(sc, -1)
            out[qi, c] = pr @ vv
            if grad is not None:
                o = (o_rounded if o_rounded is not None else out)[qi, c]
                do = grad[qi, c]
                ds = pr * (do @ vv.T - (do * o).sum(-1, keepdim=True))
                dq[qi, c] += ds @ kk * scale
                dk[ki, c] += ds.T @ qq * scale
                dv[ki, c] += pr.T @ do
    return (out, lse) if grad is None else (out, lse, dq, dk, dv)


def _op(q, k, v, layout, heads, dtype, shared=False):
    t = layout.g * layout.p + layout.suffix_rows
    return pa.prefix_attention(q, k, v, layout.op_maps(dtype, shared), heads, layout.p, layout.g, t)


def _run_op(x, layout, heads, grad, shared=False):
    x = x.detach().requires_grad_()
    q, k, v = x.chunk(3, -1)
    out, lse = _op(q, k, v, layout, heads, x.dtype, shared)
    out.backward(grad)
    dq, dk, dv = x.grad.chunk(3, -1)
    return out.detach(), lse.detach(), dq, dk, dv


def _ulps(triton):
    """Units of the stored dtype a result may lose: the Triton interpreter converts float32 to
    bfloat16 by truncation (a whole unit), a GPU and torch round to nearest."""
    return 1.0 if triton and interpreting() else 0.5


def _check(name, got, x, layout, heads, grad, dtype, ulps=0.5):
    """got = (out, lse, dq, dk, dv) of the op on x (dtype) against the references."""
    x64, g64 = x.double(), grad.double()
    o_r = got[0].double() if dtype in HALF else None   # the stored output the backward's delta reads
    ref = full_length(*x64.chunk(3, -1), layout, heads, o_rounded=o_r, grad=g64)
    plain = full_length(*x.float().chunk(3, -1), layout, heads,
                        o_rounded=None if o_r is None else o_r.float(), grad=grad.float())
    for what, f, r, pl, kk in zip(("out", "lse", "dq", "dk", "dv"), got, ref, plain, (2, 2, 3, 3, 3)):
        assert_error_rule(f"{name} {what}", f, r, pl, k=kk, dtype=dtype, stored_ulps=ulps)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(pa, "TRITON_ON_CPU", True)
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "G%dP%dN%dS%dH%dhd%d" % s)
def test_triton_kernels_match_full_length_attention(triton_on_cpu, shape, dtype, gen):
    g, p, n, s, heads, hd = shape
    layout = _layout(g, p, n, s, heads, _eot(g, n, s, gen), dtype)
    t, w = g * p + layout.suffix_rows, heads * hd
    x = torch.randn(t, 3 * w, generator=gen).to(dtype)
    grad = torch.randn(t, w, generator=gen).to(dtype)
    _check(f"triton {shape} {dtype}", _run_op(x, layout, heads, grad), x, layout, heads, grad, dtype,
           _ulps(True))


@pytest.mark.parametrize("shape", LAYOUTS, ids=lambda s: "G%dP%dN%dS%dH%dhd%d" % s)
def test_cpu_composite_matches_full_length_attention(shape, gen):
    g, p, n, s, heads, hd = shape
    layout = _layout(g, p, n, s, heads, _eot(g, n, s, gen))
    t, w = g * p + layout.suffix_rows, heads * hd
    x = torch.randn(t, 3 * w, generator=gen)
    grad = torch.randn(t, w, generator=gen)
    got = _run_op(x, layout, heads, grad)
    _check(f"composite {shape}", got, x, layout, heads, grad, torch.float32)
    # and the eager batched-product op (the encoder's eager path) on the same rows
    xe = x.detach().requires_grad_()
    out = _SharedPrefixAttention.apply(*xe.chunk(3, -1), layout, heads, False)
    out.backward(grad)
    torch.testing.assert_close(got[0], out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(got[2:], -1), xe.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("triton,dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)],
                         ids=["triton-float32", "triton-bfloat16", "composite-float32"])
def test_shared_suffix_rows_give_every_groups_attention(monkeypatch, triton, dtype, gen):
    """The first layer's shared suffix: q, k, v on G*P + Ts/G rows (group 0's suffix rows stand
    for every group's) give the attention of the expanded rows, and the gradient of the shared
    rows is the sum over the groups."""
    monkeypatch.setattr(pa, "TRITON_ON_CPU", triton)
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    g, p, n, s, heads, hd = 3, 4, 3, 6, 2, 16
    eot = _eot(1, n, s, gen).expand(g, n)
    layout = _layout(g, p, n, s, heads, eot, dtype)
    maps = layout.shared_suffix_maps(dtype)
    assert maps is not None
    ts1 = layout.suffix_rows // g
    t, w = g * p + layout.suffix_rows, heads * hd
    xc = torch.randn(maps[2], 3 * w, generator=gen).to(dtype)          # the compact rows
    grad = torch.randn(t, w, generator=gen).to(dtype)
    remap = torch.cat([torch.arange(g * p), g * p + torch.arange(layout.suffix_rows) % ts1])
    out, lse, dq, dk, dv = _run_op(xc, layout, heads, grad, shared=True)
    # the reference on the expanded rows, its gradient summed back onto the compact rows
    x = xc.index_select(0, remap)
    x64 = x.double()
    o_r = out.double() if dtype in HALF else None
    ref = full_length(*x64.chunk(3, -1), layout, heads, o_rounded=o_r, grad=grad.double())
    plain = full_length(*x.float().chunk(3, -1), layout, heads, o_rounded=None if o_r is None else o_r.float(),
                        grad=grad.float())

    def compact(d):
        return torch.zeros(maps[2], d.shape[1], dtype=d.dtype).index_add_(0, remap, d)
    ulps = _ulps(triton)
    assert_error_rule("shared out", out, ref[0], plain[0], k=2, dtype=dtype, stored_ulps=ulps)
    assert_error_rule("shared lse", lse, ref[1], plain[1], k=2, dtype=dtype)
    for what, f, r, pl in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:], plain[2:]):
        assert_error_rule(f"shared {what}", f, compact(r), compact(pl), k=3, dtype=dtype, stored_ulps=ulps)


def test_bad_arguments_are_refused_before_any_kernel(gen):
    layout = _layout(2, 3, 2, 4, 2, _eot(2, 2, 4, gen))
    t = 6 + layout.suffix_rows
    q = torch.randn(t, 32)
    maps = layout.op_maps(torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        pa.prefix_attention(q, torch.randn(t, 16), q, maps, 2, 3, 2, t)
    with pytest.raises(TypeError, match="v is torch.float16"):
        pa.prefix_attention(q, q, q.half(), maps, 2, 3, 2, t)
    with pytest.raises(ValueError, match="heads=3"):
        pa.prefix_attention(q, q, q, maps, 3, 3, 2, t)
    with pytest.raises(ValueError, match="seq_table"):
        pa.prefix_attention(q, q, q, (maps[0].long(),) + maps[1:], 2, 3, 2, t)
    with pytest.raises(ValueError, match="grp_table has 2 groups"):
        pa.prefix_attention(q, q, q, maps, 2, 3, 3, t)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "composite"])
def test_opcheck(monkeypatch, triton, gen):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    monkeypatch.setattr(pa, "TRITON_ON_CPU", triton)
    g, p, n, s, heads, hd = 2, 3, 2, 4, 2, 16
    layout = _layout(g, p, n, s, heads, _eot(g, n, s, gen))
    t, w = g * p + layout.suffix_rows, heads * hd
    x = torch.randn(t, 3 * w, generator=gen, requires_grad=True)
    q, k, v = x.chunk(3, -1)
    args = (q, k, v, *layout.op_maps(torch.float32), heads, p, g, t)
    torch.library.opcheck(torch.ops.demul_fast.prefix_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

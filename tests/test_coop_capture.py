"""A whole training step with ``CoOpTextEncoder`` inside CoOp's prompt-learner layout (and
CoCoOp's batched one) under ``torch.compile(fullgraph=True)``: one graph for the forward
(its backward through AOTAutograd), one for the optimizer step (SGD with momentum written
with foreach ops: ``torch.optim``'s ``step`` breaks the graph on purpose), no graph break, no
recompile across batches (``error_on_recompile`` after the first), and the eager run's
losses and parameters. ``fullgraph=True`` fails on any host read inside the step (a
``.item()``, ``.tolist()`` or a data-dependent branch would break the graph), so the plan's
decisions are made once, eagerly, and guarded on the device afterwards."""

import copy

import pytest
import torch
import torch.nn.functional as F

from demul_fast.coop import CoOpTextEncoder
from clip_tiny import tiny_openai_clip
from support.family import ConditionalPromptLearner, PromptLearner

NAMES = ["cat", "golden retriever", "sea anemone", "x", "red-winged blackbird"]
N_CTX = 3

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_setup(layout, attention="auto"):
    model = tiny_openai_clip(seed=2, dtype=torch.float64)
    cls = PromptLearner if layout == "coop" else ConditionalPromptLearner
    learner = cls(NAMES, model, N_CTX, seed=3)
    encoder = CoOpTextEncoder(model, attention=attention)
    return model, learner, encoder


def batches(model, n, b=3):
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        feats = torch.randn(b, model.visual.output_dim, generator=gen, dtype=torch.float64)
        out.append((feats / feats.norm(dim=-1, keepdim=True), torch.randint(0, len(NAMES), (b,), generator=gen)))
    return out


def loss_fn(layout, learner, encoder):
    def forward(feats, labels):
        if layout == "coop":
            text = encoder(learner(), learner.tokenized_prompts)                        # [C, D]
            text = text / text.norm(dim=-1, keepdim=True)
            logits = 20.0 * feats @ text.t()
        else:
            text = encoder(learner(feats), learner.tokenized_prompts)                   # [B, C, D]
            text = text / text.norm(dim=-1, keepdim=True)
            logits = 20.0 * torch.einsum("bd,bcd->bc", feats, text)
        return F.cross_entropy(logits, labels)
    return forward


class CountingBackend:
    """aot_eager, counting the graphs it is handed (one per compile)."""

    def __init__(self):
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.mark.parametrize("layout, attention", [("coop", "prefix"), ("cocoop", "prefix"), ("cocoop", "masked")])
def test_whole_step_compiles_in_one_graph_without_recompiles(layout, attention):
    torch._dynamo.reset()
    model, learner, encoder = make_setup(layout, attention)
    eager_learner = copy.deepcopy(learner)
    data = batches(model, 4)

    # eager twin: the reference losses and parameters
    eager_fwd = loss_fn(layout, eager_learner, encoder)
    eager_opt = torch.optim.SGD(eager_learner.parameters(), lr=0.5, momentum=0.9, foreach=True)
    eager_losses = []
    for feats, labels in data:
        loss = eager_fwd(feats, labels)
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad()
        eager_losses.append(loss.detach())

    fwd = loss_fn(layout, learner, encoder)
    params = [p for p in learner.parameters() if p.requires_grad]
    bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def sgd_step():
        """torch.optim.SGD(lr=0.5, momentum=0.9)'s update (its first buffer is the gradient)."""
        grads = [p.grad for p in params]
        torch._foreach_mul_(bufs, 0.9)
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-0.5)
    # the plan: one eager forward (host reads happen here, once)
    plan = encoder.plan(learner() if layout == "coop" else learner(data[0][0]), learner.tokenized_prompts)
    assert plan.shared_len == 1 + N_CTX
    explain = torch._dynamo.explain(fwd)(*data[0])
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()

    backend = CountingBackend()
    step_fwd = torch.compile(fwd, backend=backend, fullgraph=True)
    step_opt = torch.compile(sgd_step, backend=backend, fullgraph=True)
    losses = []
    for i, (feats, labels) in enumerate(data):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            loss = step_fwd(feats, labels)
            loss.backward()
            step_opt()
        learner.zero_grad(set_to_none=False)
        losses.append(loss.detach())
        if i == 0:
            graphs_after_first = backend.graphs
    assert graphs_after_first == 2  # the forward (+ AOT backward) and the optimizer step
    assert backend.graphs == graphs_after_first  # no recompile across batches
    for got, want in zip(losses, eager_losses):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for p, q in zip(learner.parameters(), eager_learner.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert losses[-1] < losses[0]  # it trains


def test_compiled_guard_catches_other_token_ids():
    """A compiled call with token ids whose EOT positions differ from the plan's fails on the
    device guard instead of silently reusing the plan."""
    torch._dynamo.reset()
    model, learner, encoder = make_setup("coop")
    ids = learner.tokenized_prompts.clone()
    encoder.plan(learner(), ids)
    fn = torch.compile(lambda ids: encoder(learner(), ids), backend="aot_eager", fullgraph=True)
    fn(ids)
    other = ids.clone()
    other[0] = ids[1]  # a different class name: another EOT position
    with pytest.raises(RuntimeError, match="tokenized_prompts differ"):
        fn(other)

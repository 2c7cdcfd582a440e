"""qkv's models inside ``torch.compile`` and ``torch.export``: no graph break in qkv's code, no recompile for a
new batch of one shape, and the compiled or exported output equal to the formula.

Graph breaks are counted with ``torch._dynamo.explain`` and attributed to qkv's files; recompiles are
counted with a backend that counts the graphs it is handed. The oracle for every compiled output is
the same model run eagerly in float64 on the ``reference`` backend (the formula as written). Tiny
models and short sequences: compiling on a shared CPU is slow, so every test but one uses dynamo's
``eager``/``aot_eager`` backends or a counting backend, and one test compiles with inductor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import qkv
from qkv import masks as M
from qkv.models import GPT, TransformerEncoder

QKV_DIR = str(Path(qkv.__file__).parent)
L = 64
V = 50


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gpt(window: int | None = None) -> GPT:
    return GPT(V, 32, 2, 2, max_len=L, window=window).eval()


def encoder() -> TransformerEncoder:
    return TransformerEncoder(2, 32, 2).eval()


def doc_ids(cuts: tuple[int, ...], B: int = 2) -> Tensor:
    """``(B, L)`` document ids that start a new document at each cut (row 1 reversed: other lengths)."""
    d = torch.zeros(B, L, dtype=torch.long)
    for c in cuts:
        d[:, c:] += 1
    d[1] = d[1].flip(0).max() - d[1].flip(0)
    return d


# each case: the model, the mask built from the batch's tensors, and a batch maker (inputs, mask tensor)
def _tokens(B: int = 2) -> Tensor:
    return torch.randint(0, V, (B, L))


def _embeds(B: int = 2) -> Tensor:
    return torch.randn(B, L, 32)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[Tensor | None], Any], Callable[[], Tensor]]] = {
    "gpt-causal": (gpt, lambda t: None, _tokens),
    "gpt-window": (lambda: gpt(window=16), lambda t: None, _tokens),
    "gpt-document": (gpt, lambda t: M.document(t), _tokens),
    "gpt-window-document": (lambda: gpt(window=16), lambda t: M.document(t), _tokens),
    "gpt-padding": (gpt, lambda t: M.padding(t), _tokens),
    "encoder-full": (encoder, lambda t: None, _embeds),
    "encoder-causal": (encoder, lambda t: M.causal(), _embeds),
    "encoder-window": (encoder, lambda t: M.sliding_window(8, 8), _embeds),
    "encoder-document": (encoder, lambda t: M.document(t), _embeds),
    "encoder-padding": (encoder, lambda t: M.padding(t), _embeds),
}


def mask_tensor(case: str, variant: int = 0) -> Tensor:
    """The tensor the case's mask is built from: document ids or lengths (a new batch per variant)."""
    if case.endswith("padding"):
        return torch.tensor([[L, 40], [17, L - 1]][variant])
    return doc_ids(((20,), (7, 30, 50))[variant])


def forward(model: nn.Module, case: str) -> Callable[[Tensor, Tensor], Tensor]:
    make_mask = CASES[case][1]

    def f(x: Tensor, t: Tensor) -> Tensor:
        return model(x, mask=make_mask(t))  # the mask is built inside: its tensor is a graph input

    return f


def qkv_breaks(explanation: Any) -> list[str]:
    """The graph breaks whose stack passes through qkv's files, as ``reason @ file:line`` strings."""
    out = []
    for br in explanation.break_reasons:
        frames = [f"{fs.filename}:{fs.lineno}" for fs in br.user_stack if fs.filename.startswith(QKV_DIR)]
        if frames:
            out.append(f"{br.reason.splitlines()[0]} @ {frames[-1]}")
    return out


def oracle(model: nn.Module, case: str, x: Tensor, t: Tensor) -> Tensor:
    """The model in float64 on the reference backend, eager."""
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    m64 = CASES[case][0]()
    m64.load_state_dict(ref)
    m64 = qkv.nn.set_backend(m64.double(), "reference")
    x64 = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        return forward(m64, case)(x64, t)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_graph_break_in_qkv(case: str) -> None:
    model = CASES[case][0]()
    x, t = CASES[case][2](), mask_tensor(case)
    with torch.no_grad():
        ex = torch._dynamo.explain(forward(model, case))(x, t)
    assert qkv_breaks(ex) == []
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason) for r in ex.break_reasons]


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it compiles and which attention ops they hold."""

    def __init__(self) -> None:
        self.graphs = 0
        self.ops: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        self.graphs += 1
        self.ops += [str(n.target) for n in gm.graph.nodes if "attention" in str(n.target)]
        return gm.forward


@pytest.mark.parametrize("case", ["gpt-document", "gpt-window-document", "gpt-padding", "encoder-document"])
def test_new_batch_with_other_ids_does_not_recompile(case: str) -> None:
    model = CASES[case][0]()
    counter = CountingBackend()
    f = forward(model, case)
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    x = CASES[case][2]()
    for variant in (0, 1):
        t = mask_tensor(case, variant)
        with torch.no_grad():
            got = compiled(x, t)
        # the graph follows each batch's ids or lengths: it matches the float64 formula for both
        torch.testing.assert_close(got.double(), oracle(model, case, x, t), atol=2e-5, rtol=1e-4)
    assert counter.graphs == 1
    assert any("scaled_dot_product_attention" in op for op in counter.ops), counter.ops


def test_a_mask_object_passed_in_does_not_recompile() -> None:
    model = gpt()
    counter = CountingBackend()
    compiled = torch.compile(lambda x, m: model(x, mask=m), backend=counter, fullgraph=True)
    x = _tokens()
    for lengths in ([L, 40], [3, L - 5]):
        with torch.no_grad():
            got = compiled(x, M.padding(torch.tensor(lengths)))
            want = model(x, mask=M.padding(torch.tensor(lengths)))
        torch.testing.assert_close(got, want)
    assert counter.graphs == 1


def test_fullgraph_training_step_on_the_sdpa_path() -> None:
    """A compiled forward and backward (aot_eager: AOTAutograd's joint graph) give eager's gradients."""
    model = gpt(window=16).train()
    x, t = _tokens(), mask_tensor("gpt-document")

    def loss(m: nn.Module) -> Tensor:
        return m(x, mask=M.document(t)).float().logsumexp(-1).mean()

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss(compiled).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss(model).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_fullgraph_with_inductor_matches_the_formula() -> None:
    """The one inductor compile of this file: a sliding window with documents, on the sdpa path."""
    model = gpt(window=16)
    f = forward(model, "gpt-window-document")
    compiled = torch.compile(f, fullgraph=True)
    x = _tokens()
    for variant in (0, 1):
        t = mask_tensor("gpt-window-document", variant)
        with torch.no_grad():
            got = compiled(x, t)
        torch.testing.assert_close(got.double(), oracle(model, "gpt-window-document", x, t), atol=2e-5, rtol=1e-4)


def test_fullgraph_on_flex_when_opted_in() -> None:
    """With flex's CPU compile allowed, auto puts FlexAttention (its BlockMask built in the graph from
    the ids) into the graph for a window over 4 key blocks; the result follows each batch's ids."""
    if not qkv.backends.get("flex").available():
        pytest.skip("FlexAttention is not in this torch")
    n = 4 * qkv.backends.flex.BLOCK
    model = GPT(V, 32, 1, 2, max_len=n, window=64).eval()
    x = torch.randint(0, V, (1, n))
    old = qkv.backends.flex.allow_compile(True)
    try:
        counter = CountingBackend()
        compiled = torch.compile(lambda x, t: model(x, mask=M.document(t)), backend=counter, fullgraph=True)
        for cut in (100, 300):
            t = (torch.arange(n) >= cut).long().view(1, n)
            with torch.no_grad():
                got = compiled(x, t)
            m64 = GPT(V, 32, 1, 2, max_len=n, window=64).eval()
            m64.load_state_dict(model.state_dict())
            with torch.no_grad():
                want = qkv.nn.set_backend(m64.double(), "reference")(x, mask=M.document(t))
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    finally:
        qkv.backends.flex.allow_compile(old)
    assert counter.graphs == 1
    assert counter.ops and all("flex_attention" in op for op in counter.ops), counter.ops


class Packed(nn.Module):
    """GPT over packed documents: the ids are an input of the exported program."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: Tensor, ids: Tensor) -> Tensor:
        return self.model(idx, mask=M.document(ids))


def test_export_on_the_sdpa_path() -> None:
    model = Packed(gpt(window=16))
    x, t = _tokens(), mask_tensor("gpt-document")
    ep = torch.export.export(model, (x, t))
    targets = [str(n.target) for n in ep.graph.nodes]
    assert sum("scaled_dot_product_attention" in s for s in targets) == 2  # one per layer
    t2 = mask_tensor("gpt-document", 1)
    with torch.no_grad():
        got = ep.module()(x, t2)
    torch.testing.assert_close(got.double(), oracle(model.model, "gpt-window-document", x, t2), atol=2e-5, rtol=1e-4)


def test_export_on_flex_where_nothing_needs_gradients() -> None:
    """FlexAttention exports as its higher-order op (run eagerly by the exported program on the CPU);
    with parameters that require grad, flex declines on the CPU (no backward there), by name too."""
    if not qkv.backends.get("flex").available():
        pytest.skip("FlexAttention is not in this torch")
    model = Packed(qkv.nn.set_backend(gpt(window=16), "flex"))
    x, t = _tokens(), mask_tensor("gpt-document")
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        torch.export.export(model, (x, t))
    model.requires_grad_(False)
    ep = torch.export.export(model, (x, t))
    assert sum("flex_attention" in str(n.target) for n in ep.graph.nodes) == 2
    t2 = mask_tensor("gpt-document", 1)
    with torch.no_grad():
        got = ep.module()(x, t2)
    torch.testing.assert_close(got.double(), oracle(model.model, "gpt-window-document", x, t2), atol=2e-5, rtol=1e-4)


def test_hooks_read_and_intervene_inside_a_graph_without_a_break() -> None:
    """Hook points (TransformerLens-style) trace: a hook that halves the weights and one that reads the
    heads run inside the one graph, and the compiled output equals the hooked eager one (not the plain one)."""
    from qkv.nn.hooks import hooked

    model, x = gpt(window=16), _tokens()
    seen: list[torch.Size] = []

    def halve(w: Tensor, name: str) -> Tensor:
        return w * 0.5

    def read(h: Tensor, name: str) -> None:
        seen.append(h.shape)

    with torch.no_grad():
        plain = model(x)
        with hooked(model, ("*.hook_weights", halve), ("*.hook_heads", read)):
            eager = model(x)
            ex = torch._dynamo.explain(model)(x)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason) for r in ex.break_reasons]
    assert len(seen) >= 2 * 2  # both layers' heads were read, eagerly and while tracing
    assert (eager - plain).abs().max() > 1e-3  # the intervention changes the output...
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)  # ...and the graph keeps it


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_a_decoding_step_whose_mask_is_dropped_traces_without_a_break(backend: str) -> None:
    """One query under causal(): the mask is dropped while tracing too (from shapes alone), and the
    graph holds one SDPA call with no mask and gives the formula's answer."""
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 7, 8)

    def step(q: Tensor, k: Tensor) -> Tensor:
        return qkv.attention(q, k, k, mask=M.causal(), backend=backend)

    counter = CountingBackend()
    with torch.no_grad():
        got = torch.compile(step, backend=counter, fullgraph=True)(q, k)
    torch.testing.assert_close(got, qkv.attention(q.double(), k.double(), k.double(), backend="reference").float())
    assert counter.graphs == 1 and counter.ops == ["<built-in function scaled_dot_product_attention>"], counter.ops

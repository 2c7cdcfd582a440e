"""``auto`` inside ``torch.compile``: the choice among backends that trace, made from shapes and mask
structure (``qkv.explain(..., compiled=True)`` shows it), and backends that do not trace run outside
the graph. Oracle: ``reference`` in float64, eager."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import qkv
from qkv import backends
from qkv import masks as M
from qkv.backends import Backend, Request
from qkv.backends.base import tracing


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def qkv_inputs(B: int = 2, H: int = 2, L: int = 64, D: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    return torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)


def ref64(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    return qkv.attention(q.double(), k.double(), v.double(), backend="reference", **kw)


def close(got: Tensor, want: Tensor) -> None:
    """float32 against the float64 formula."""
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def explain(fn: Callable[..., Any], *args: Any) -> Any:
    with torch.no_grad():
        return torch._dynamo.explain(fn)(*args)


def test_explain_compiled_says_what_auto_does_inside_torch_compile() -> None:
    q, k, v = qkv_inputs(L=256)
    mask = M.causal() & M.sliding_window(63)
    inside = qkv.explain(q, k, v, mask=mask, compiled=True)
    assert inside.backend == "sdpa"
    assert inside.reason.startswith("inside torch.compile")
    assert "tiled" not in inside.costs and "inside torch.compile" in inside.declined["tiled"]
    assert "allow_compile" in inside.declined["flex"]  # on the CPU flex's own kernel compile is opt-in
    eager = qkv.explain(q, k, v, mask=mask)
    assert "tiled" in eager.costs and not eager.reason.startswith("inside")
    with pytest.raises(TypeError, match="compiled must be a bool"):
        qkv.explain(q, k, v, compiled="yes")  # type: ignore[arg-type]


def test_auto_prefers_flex_in_a_graph_for_a_narrow_window_once_opted_in() -> None:
    if not backends.get("flex").available():
        pytest.skip("FlexAttention is not in this torch")
    q, k, v = qkv_inputs(B=1, L=2048)
    old = backends.flex.allow_compile(True)
    try:
        narrow = qkv.explain(q, k, v, mask=M.causal() & M.sliding_window(127), compiled=True)
        docs = qkv.explain(q, k, v, mask=M.document(torch.arange(2048) // 512), compiled=True)
    finally:
        backends.flex.allow_compile(old)
    assert narrow.backend == "flex", str(narrow)
    assert "BlockMask built in the graph" in narrow.reason
    # a document mask's blocks depend on the ids, which the graph does not know: it is costed as dense
    assert docs.costs["flex"] > narrow.costs["flex"]


def test_a_named_backend_that_does_not_trace_runs_outside_the_graph() -> None:
    q, k, v = qkv_inputs()
    mask = M.document(torch.arange(64) // 20) & M.causal()

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return qkv.attention(q * 1.5, k, v, mask=mask, backend="tiled") * 2  # ops on both sides of the break

    ex = explain(f, q, k, v)
    assert ex.graph_break_count == 1
    assert any("policy.py" in fs.filename for br in ex.break_reasons for fs in br.user_stack)
    got = torch.compile(f, backend="eager")(q, k, v)
    close(got, 2 * ref64(q * 1.5, k, v, mask=mask))


def test_rows_that_see_nothing_give_zeros_inside_a_graph() -> None:
    """sdpa's repair of empty rows runs unconditionally when traced (it cannot ask whether any row is empty)."""
    q, k, v = qkv_inputs()

    def f(q: Tensor, k: Tensor, v: Tensor, kv: Tensor, ql: Tensor) -> Tensor:
        return qkv.attention(q, k, v, mask=M.padding(kv, ql))

    kv, ql = torch.tensor([64, 0]), torch.tensor([30, 64])
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, kv, ql)
    assert torch.isfinite(got).all()
    assert (got[1] == 0).all() and (got[0, :, 30:] == 0).all()
    close(got, ref64(q, k, v, mask=M.padding(kv, ql)))


class _Opaque(Backend):
    """A backend from outside that says nothing about tracing, with an option only it takes."""

    name = "opaque"
    options = frozenset({"opaque_flag"})

    def supports(self, req: Request) -> str | None:
        assert not tracing(), "an untraceable backend must be asked outside the graph"
        return None

    def cost(self, req: Request) -> float:
        return 1.0

    def run(self, req: Request, plan: Any = None) -> Tensor:
        return backends.get("reference").run(req)  # type: ignore[return-value]


@pytest.fixture
def opaque() -> Iterator[Backend]:
    b = backends.register(_Opaque())
    yield b
    backends.unregister("opaque")


def test_a_backend_that_does_not_say_is_not_traced_and_auto_runs_outside(opaque: Backend) -> None:
    q, k, v = qkv_inputs()
    inside = qkv.explain(q, k, v, mask=M.causal(), compiled=True)
    assert "Backend.traceable" in inside.declined["opaque"]
    only = qkv.explain(q, k, v, mask=M.causal(), compiled=True, opaque_flag=True)
    assert only.backend == "auto" and "outside the graph" in only.reason

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return qkv.attention(q * 1.5, k, v, mask=M.causal(), opaque_flag=True) + 1

    ex = explain(f, q, k, v)
    assert ex.graph_break_count == 1
    got = torch.compile(f, backend="eager")(q, k, v)
    close(got, ref64(q * 1.5, k, v, mask=M.causal()) + 1)


def test_mask_values_are_still_checked_in_eager_calls() -> None:
    q, k, v = qkv_inputs()
    with pytest.raises(ValueError, match="kv_lengths must lie in"):
        qkv.attention(q, k, v, mask=M.padding(torch.tensor([65, 3])))


def test_too_large_for_a_dense_mask_in_a_graph_runs_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where sdpa's dense mask (and reference's scores) would not fit in the free memory the graph was
    traced against, auto runs outside the graph (tiled, eager: one graph break) rather than build it."""
    from qkv.backends import sdpa

    monkeypatch.setattr(sdpa, "CHECK_MEMORY_ABOVE", 0)  # shrink the problem: any dense mask is checked,
    monkeypatch.setitem(sdpa._FREE_SEEN, "cpu", 1 << 19)  # and 512 KiB are free
    q = torch.randn(1, 2, 256, 16)  # its dense mask: 1x2x256x256 float32 = 512 KiB
    mask = M.causal() & M.sliding_window(50)
    inside = qkv.explain(q, q, q, mask=mask, compiled=True)
    assert inside.backend == "auto" and "outside the graph" in inside.reason
    assert "GiB free" in inside.declined["sdpa"] and "GiB free" in inside.declined["reference"]

    def f(q: Tensor) -> Tensor:
        return qkv.attention(q * 1.5, q, q, mask=mask) + 1

    assert explain(f, q).graph_break_count == 1
    got = torch.compile(f, backend="eager")(q)
    close(got, ref64(q * 1.5, q, q, mask=mask) + 1)

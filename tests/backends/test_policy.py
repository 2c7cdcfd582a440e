"""``auto`` reads the backend protocol (supports / cost / plan / run) and names no backend."""

from __future__ import annotations

import ast
import inspect
from typing import Any

import pytest
import torch

import qkv
from qkv import backends
from qkv import masks as M
from qkv.backends import Backend, Request, policy


class _Toy(Backend):
    """Says it is the cheapest for everything it serves; computes with the reference formula."""

    name = "toy"
    options = frozenset({"toy_flag"})

    def __init__(self) -> None:
        self.plans = 0
        self.runs: list[Any] = []

    def supports(self, req: Request) -> str | None:
        return None if req.mask is None else "toy serves unmasked requests only"

    def plan(self, req: Request) -> Any:
        self.plans += 1
        return ("toy plan", req.Lq)

    def cost(self, req: Request) -> float:
        return 0.0

    def describe(self, req: Request) -> str:
        return "the toy backend"

    def run(self, req: Request, plan: Any = None) -> torch.Tensor:
        self.runs.append(plan)
        return backends.get("reference").run(req)  # type: ignore[return-value]


@pytest.fixture
def toy():
    t = backends.register(_Toy())
    yield t
    backends.unregister("toy")


def test_a_registered_backend_takes_part_in_auto_and_explain(toy):
    q = torch.randn(1, 2, 16, 8)
    e = qkv.explain(q, q, q)
    assert e.backend == "toy" and "toy" in str(e) and e.costs["toy"] == 0.0
    out = qkv.attention(q, q, q)
    assert toy.runs == [("toy plan", 16)]  # run() got the plan auto made
    torch.testing.assert_close(out, qkv.attention(q, q, q, backend="reference"))
    # what it declines, it declines with its reason, and auto goes elsewhere
    e = qkv.explain(q, q, q, mask=M.causal())
    assert e.backend != "toy" and e.declined["toy"] == "toy serves unmasked requests only"
    # its options route requests to it; unknown options still fail clearly
    assert qkv.explain(q, q, q, toy_flag=1).backend == "toy"
    with pytest.raises(TypeError, match="does not take the option"):
        qkv.attention(q, q, q, backend="sdpa", toy_flag=1)


def test_backends_that_auto_may_not_pick_say_so():
    q = torch.randn(1, 2, 16, 8)
    e = qkv.explain(q, q, q)
    for name in ("linear", "performer", "nystrom"):
        assert "only when asked for by name" in e.declined[name]
        assert name not in e.costs


def test_register_rejects_what_is_not_a_backend():
    """As its docstring says: TypeError for what is not a Backend or has a name or preference of the
    wrong type, ValueError for an empty name or 'auto'; nothing is registered."""
    before = dict(backends.registered())
    with pytest.raises(TypeError, match="Backend instance"):
        backends.register(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a string, got int"):
        backends.register(type("Numbered", (Backend,), {"name": 3})())
    with pytest.raises(TypeError, match="preference must be an int"):
        backends.register(type("Vague", (Backend,), {"name": "vague", "preference": 0.5})())
    with pytest.raises(ValueError, match="non-empty name other than 'auto', got ''"):
        backends.register(type("Nameless", (Backend,), {"name": ""})())
    with pytest.raises(ValueError, match="got 'auto'"):
        backends.register(type("Auto", (Backend,), {"name": "auto"})())
    assert backends.registered() == before
    doc = backends.register.__doc__ or ""
    assert "TypeError" in doc and "ValueError" in doc


class _Flat(Backend):
    """Costs the same as every other _Flat: only the tie-break rule can choose between them."""

    def __init__(self, name: str, preference: int = 0) -> None:
        self.name, self.preference = name, preference

    def cost(self, req: Request) -> float:
        return 0.0

    def run(self, req: Request, plan: Any = None) -> torch.Tensor:
        return backends.get("reference").run(req)  # type: ignore[return-value]


@pytest.mark.parametrize("order", [("tie-b", "tie-a", "tie-c"), ("tie-a", "tie-c", "tie-b"), ("tie-c", "tie-b", "tie-a")])
def test_ties_are_broken_by_preference_then_name_never_by_registration_order(order):
    q = torch.randn(1, 2, 8, 4)
    try:
        for name in order:
            backends.register(_Flat(name))
        e = qkv.explain(q, q, q)
        assert e.backend == "tie-a", str(e)  # equal costs, equal preference: the name decides
        assert "a tie with tie-b, tie-c, broken by preference, then name" in e.reason
        backends.register(_Flat("tie-c", preference=1))  # re-registered in place: order unchanged
        assert qkv.explain(q, q, q).backend == "tie-c"
        backends.register(_Flat("tie-b", preference=2))
        assert qkv.explain(q, q, q).backend == "tie-b"
        assert policy.resolve(policy_request(q))[0].name == "tie-b"  # the call picks as explain does
    finally:
        for name in order:
            backends.unregister(name)


def policy_request(q: torch.Tensor) -> Request:
    return Request(q, q, q, None, None, 1.0, 0.0, False)


def test_the_policy_names_no_backend():
    """No string in the policy or in attention() is a backend's name: auto reads the protocol."""
    import sys

    names = set(backends.registered())
    for mod in (policy, sys.modules["qkv.attention"]):
        tree = ast.parse(inspect.getsource(mod))
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not (literals & names), f"{mod.__name__} names backends {sorted(literals & names)}"


def test_no_backend_can_serve_raises_with_every_reason(monkeypatch):
    q = torch.randn(1, 2, 16, 8)
    req = Request(q, q, q, None, None, 1.0, 0.0, False)
    monkeypatch.setattr(policy, "registered", lambda: {"toy": _Toy()} | {})
    monkeypatch.setattr(_Toy, "supports", lambda self, req: "never")
    with pytest.raises(NotImplementedError, match="toy: never"):
        policy.choose(req)


def test_a_call_picks_what_explain_shows():
    """``qkv.attention`` chooses without writing reasons (and remembers plain choices); on every kind of
    request it serves with the backends ``candidates`` lists and picks the backend ``choose`` (explain's
    path) picks, with and without gradients, inside a trace too."""
    from qkv.attention import _validate
    from qkv.backends.base import assume_traced
    from qkv.scores import alibi, softcap

    q, k = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 80, 16)
    cases = [
        {},
        {"mask": M.causal()},
        {"mask": M.causal() & M.sliding_window(8)},
        {"mask": M.padding(torch.tensor([80, 40]))},
        {"score_mod": alibi(4)},
        {"score_mod": softcap(20.0)},
        {"return_weights": True},
        {"dropout_p": 0.1},
        {"options": {"block_q": 32}},
        {"options": {"compile": False}},
        {"sinks": torch.zeros(4)},
    ]
    for kw in cases:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                qq = q.clone().requires_grad_(grad)
                req, _ = _validate(
                    qq, k, k, kw.get("mask"), kw.get("score_mod"), None, kw.get("dropout_p", 0.0),
                    kw.get("return_weights", False), kw.get("options", {}), kw.get("sinks"), True,
                )  # fmt: skip
                assert set(policy._serving(req)) == set(policy.candidates(req)[0]), kw
                try:
                    want = policy.choose(req).backend
                except NotImplementedError as e:  # none serves it: the call says so with the same reasons
                    with pytest.raises(NotImplementedError) as got:
                        policy.resolve(req)
                    assert str(got.value) == str(e)
                    continue
                for _ in range(2):  # the second call may come from the memo
                    assert policy.resolve(req)[0].name == want, (kw, grad)
                with assume_traced():
                    c = policy.choose(req)
                    assert set(policy._serving(req)) == set(policy.candidates(req)[0]), kw
                    got = policy.resolve(req)[0].name
                    assert got == (c.backend if not c.outside else "outside"), (kw, grad)


def test_a_decoding_step_goes_to_one_fused_call():
    """One query under causal() over a KV cache: the mask is dropped and auto picks SDPA's one fused
    call; tiled would make the same call (its plan is one call) plus its own per-call cost."""
    q, k = torch.randn(1, 8, 1, 32), torch.randn(1, 8, 512, 32)
    e = qkv.explain(q, k, k, mask=M.causal())
    assert e.backend == "sdpa" and e.costs["tiled"] > e.costs["sdpa"], str(e)
    assert "PyTorch's fused kernel, no mask" in e.reason

"""``auto`` remembers its choice for plain requests (no mask, score mod, sinks or options), keyed on
everything that can change it: every remembered choice is the choice made afresh, and each part of the
key (the request's sizes, dtype, device, grad flag, return_weights, dropout; the registry; every
automatic backend's flags, availability and ``choice_state()``: flex's compile permission, compiled
kernels and recompile limit) changes the choice when it should."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv import backends
from qkv import masks as M
from qkv.attention import _validate
from qkv.backends import Backend, Request, policy
from qkv.backends import flex as FX


def _req(B=1, H=4, Hkv=2, Lq=1, Lk=16, D=8, Dv=8, dtype=torch.float32, grad=False, weights=False, p=0.0):
    q = torch.randn(B, H, Lq, D, dtype=dtype, requires_grad=grad)
    k, v = torch.randn(B, Hkv, Lk, D, dtype=dtype), torch.randn(B, Hkv, Lk, Dv, dtype=dtype)
    return _validate(q, k, v, None, None, None, p, weights, {}, None, True)[0]


def _auto(req: Request) -> str:
    return policy.resolve(req)[0].name


def _fresh(req: Request) -> str:
    return policy.choose(req).backend  # explain's path: never remembered


@pytest.fixture(autouse=True)
def _empty_memo():
    policy._MEMO.clear()
    yield
    policy._MEMO.clear()


@given(
    B=st.integers(1, 3),
    G=st.sampled_from([1, 2]),
    Lq=st.sampled_from([1, 2, 64, 700]),
    Lk=st.sampled_from([1, 16, 300, 2000]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    grad=st.booleans(),
    weights=st.booleans(),
    p=st.sampled_from([0.0, 0.1]),
)
def test_a_remembered_choice_is_the_choice_made_afresh(B, G, Lq, Lk, dtype, grad, weights, p):
    """Drawn one after another, so the memo holds the choices of earlier draws that differ from this one
    in some parts of the key: each call still picks what a fresh choice picks, the first time and again."""
    req = _req(B=B, H=2 * G, Lq=Lq, Lk=Lk, D=8, Dv=8, dtype=dtype, grad=grad, weights=weights, p=p)
    with torch.set_grad_enabled(grad):
        want = _fresh(req)
        assert _auto(req) == want
        assert _auto(req) == want  # from the memo now
        assert policy._memo_key(req) in policy._MEMO


class _Picky(Backend):
    """Costs nothing, so ``auto`` picks it wherever it serves; serves what ``accept`` says."""

    name = "picky"

    def __init__(self, accept: Any, state: Any = ()) -> None:
        self.accept, self.state = accept, state

    def choice_state(self) -> Any:
        return self.state() if callable(self.state) else self.state

    def supports(self, req: Request) -> str | None:
        return None if self.accept(req) else "not this one"

    def cost(self, req: Request) -> float:
        return 0.0

    def run(self, req: Request, plan: Any = None) -> torch.Tensor:
        return backends.get("reference").run(req)  # type: ignore[return-value]


@pytest.fixture
def picky():
    made: list[str] = []

    def register(b: _Picky) -> _Picky:
        made.append(b.name)
        return backends.register(b)  # type: ignore[return-value]

    yield register
    for name in made:
        backends.unregister(name)


PAIRS = {  # two requests that differ in one part of the key, and which the picky backend serves
    "B": (dict(B=1), dict(B=2), lambda r: r.B == 1),
    "H": (dict(H=4), dict(H=8), lambda r: r.H == 4),
    "Hkv": (dict(Hkv=2), dict(Hkv=4), lambda r: r.Hkv == 2),
    "Lq": (dict(Lq=1), dict(Lq=2), lambda r: r.Lq == 1),
    "Lk": (dict(Lk=16), dict(Lk=17), lambda r: r.Lk == 16),
    "D": (dict(D=8), dict(D=16), lambda r: r.D == 8),
    "Dv": (dict(Dv=8), dict(Dv=4), lambda r: r.Dv == 8),
    "dtype": (dict(dtype=torch.float32), dict(dtype=torch.float64), lambda r: r.dtype == torch.float32),
    "grad": (dict(grad=False), dict(grad=True), lambda r: not r.requires_grad),
    "return_weights": (dict(weights=False), dict(weights=True), lambda r: not r.return_weights),
    "dropout": (dict(p=0.0), dict(p=0.25), lambda r: r.dropout_p == 0.0),
}


@pytest.mark.parametrize("part", sorted(PAIRS))
@pytest.mark.parametrize("first", ["served", "declined"])
def test_every_part_of_the_request_in_the_key_changes_the_choice(picky, part, first):
    a_kw, b_kw, accept = PAIRS[part]
    picky(_Picky(accept))
    a, b = _req(**a_kw), _req(**b_kw)
    order = (a, b) if first == "served" else (b, a)
    for req in order + order:  # each twice: the second from the memo
        assert _auto(req) == ("picky" if req is a else _fresh(req)), (part, req is a)
        assert _auto(req) == _fresh(req)


def test_the_device_is_in_the_key(picky, monkeypatch):
    picky(_Picky(lambda r: r.device.type == "cpu"))
    req = _req()
    assert _auto(req) == "picky"
    monkeypatch.setattr(Request, "device", property(lambda self: torch.device("cuda")))
    assert _auto(req) != "picky"


def test_registering_and_unregistering_change_the_choice(picky):
    req = _req()
    before = _auto(req)
    picky(_Picky(lambda r: True))
    assert _auto(req) == "picky"
    backends.unregister("picky")
    assert _auto(req) == before
    picky(_Picky(lambda r: True))  # the same name again, a new backend
    assert _auto(req) == "picky"
    picky(_Picky(lambda r: False))  # replaced by one with the same flags and state that declines
    assert _auto(req) == before


def test_flags_availability_and_preference_are_read_on_every_call(picky):
    """Flags changed on a registered backend (no new registration) still change the choice."""
    req = _req()
    b = picky(_Picky(lambda r: True))
    assert _auto(req) == "picky"
    b.automatic = False
    assert _auto(req) != "picky"
    b.automatic = True
    assert _auto(req) == "picky"
    b.available = lambda: False  # type: ignore[method-assign]
    assert _auto(req) != "picky"
    del b.available
    b.local_shards = True
    assert _auto(req) != "picky"
    b.local_shards = False
    twin = _Picky(lambda r: True)
    twin.name = "a-twin"  # equal cost: preference, then the name decide
    picky(twin)
    assert _auto(req) == "a-twin"
    b.preference = 1
    assert _auto(req) == "picky"


def test_a_backend_that_does_not_name_its_state_turns_the_memo_off(picky):
    """Its supports() reads something outside the request: every call asks it again."""
    open_ = {"now": True}
    picky(_Picky(lambda r: open_["now"], state=None))
    req = _req()
    assert policy._memo_key(req) is None
    assert _auto(req) == "picky"
    open_["now"] = False
    assert _auto(req) != "picky"
    open_["now"] = True
    assert _auto(req) == "picky"


def test_state_a_backend_names_is_read_on_every_call(picky):
    open_ = {"now": True}
    picky(_Picky(lambda r: open_["now"], state=lambda: open_["now"]))
    req = _req()
    assert _auto(req) == "picky"
    open_["now"] = False
    assert _auto(req) != "picky"
    open_["now"] = True
    assert _auto(req) == "picky"


@pytest.mark.skipif(not backends.get("flex").available(), reason="no FlexAttention in this torch")
def test_flex_compile_permission_and_compiled_kernels_change_the_choice(monkeypatch):
    """With flex made the cheapest: on the CPU auto may pick it only where it may compile or its kernel
    for this shape ran; allow_compile, a newly recorded kernel, a fresh record and the recompile limit
    each change the choice (no kernel is compiled here: the record is what auto reads)."""
    monkeypatch.setattr(FX.Flex, "cost", lambda self, req: 0.0)
    monkeypatch.setattr(FX, "KERNELS", FX._Kernels())
    old = FX.allow_compile(False)
    try:
        fx = backends.get("flex")
        req = _req(Lk=48)
        if fx.supports(req) is not None:
            pytest.skip(f"flex declines here: {fx.supports(req)}")
        assert _auto(req) != "flex"
        FX.allow_compile(True)
        assert _auto(req) == "flex"
        FX.allow_compile(False)
        assert _auto(req) != "flex"
        FX.KERNELS.record(fx.kernel_key(req), fx._sig(req), True)  # its kernel ran
        assert _auto(req) == "flex"
        assert _auto(_req(Lk=49)) != "flex"  # another shape: not compiled
        monkeypatch.setattr(FX.STATS, "compiles", FX.RECOMPILE_LIMIT)
        assert _auto(req) == "flex"  # at the limit, a ready kernel still serves
        FX.allow_compile(True)
        assert _auto(_req(Lk=49)) != "flex"  # at the limit, a new kernel may not be compiled
        monkeypatch.setattr(FX.STATS, "compiles", 0)
        assert _auto(_req(Lk=49)) == "flex"
        FX.allow_compile(False)
        monkeypatch.setattr(FX, "KERNELS", FX._Kernels())  # what ran is forgotten
        assert _auto(req) != "flex"
    finally:
        FX.allow_compile(old)


def test_only_plain_eager_requests_are_remembered():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    plain = _validate(q, k, k, None, None, None, 0.0, False, {}, None, True)[0]
    assert policy._memo_key(plain) is not None
    for kw in (
        dict(mask=M.causal()),  # two queries: kept
        dict(score_mod=qkv.scores.alibi(2)),
        dict(sinks=torch.zeros(2)),
        dict(options={"block_q": 64}),
    ):
        mask, sm, sinks = kw.get("mask"), kw.get("score_mod"), kw.get("sinks")
        req = _validate(q, k, k, mask, sm, None, 0.0, False, kw.get("options", {}), sinks, True)[0]
        assert policy._memo_key(req) is None, kw
    from qkv.backends.base import assume_traced

    with assume_traced():
        assert policy._memo_key(plain) is None


def test_the_memo_is_bounded():
    for Lk in range(1, policy.MEMO_SIZE + 20):
        _auto(_req(Lk=Lk))
    assert 0 < len(policy._MEMO) <= policy.MEMO_SIZE

"""A mask that allows every pair of the problem is dropped by ``qkv.attention`` (``Mask.allows_all``),
so a decoding step under ``causal()`` runs as an unmasked call: checked against the float64 oracle,
which applies every mask as given; and the mask is kept where the request is not the whole problem
(a backend of local shards) or where the backend is an approximation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from oracle import check_backend
from qkv import backends
from qkv import masks as M
from qkv.attention import _validate
from qkv.backends import Backend, Request
from qkv.backends.base import unsupported

EXACT = [n for n, b in backends.registered().items() if b.exact and b.available() and not b.local_shards]


def _declined(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: M.Mask, grad: bool) -> str | None:
    """Why ``name`` would not serve the request as ``qkv.attention`` hands it over (mask dropped)."""
    b = backends.get(name)
    with torch.set_grad_enabled(grad):
        ins = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        req, _ = _validate(*ins, mask, None, None, 0.0, False, {}, None, True)
        return unsupported(b, req) or b.supports(req) or b.auto_blocker(req)


@pytest.mark.parametrize("name", EXACT)
@settings(max_examples=12)
@given(
    Lk=st.integers(1, 300),
    groups=st.sampled_from([1, 2, 4]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    kind=st.sampled_from(["causal", "window", "full", "window-and-causal"]),
    seed=st.integers(0, 2**16),
)
def test_a_decoding_step_meets_the_oracle_that_applies_the_mask(name, Lk, groups, dtype, kind, seed):
    """One query against ``Lk`` keys, under masks that allow every pair of it, on every exact backend,
    forward and backward where it takes gradients: the same answer as the oracle that applies the mask."""
    mask = {
        "causal": M.causal(),
        "window": M.sliding_window(Lk - 1),
        "full": M.full(),
        "window-and-causal": M.causal() & M.sliding_window(Lk + 3),
    }[kind]
    g = torch.Generator().manual_seed(seed)
    Hkv = 2
    q = torch.randn(2, Hkv * groups, 1, 16, generator=g).to(dtype)
    k = torch.randn(2, Hkv, Lk, 16, generator=g).to(dtype)
    v = torch.randn(2, Hkv, Lk, 12, generator=g).to(dtype)
    for grad in (True, False):
        why = _declined(name, q, k, v, mask, grad)
        if why is None:
            check_backend(name, q, k, v, grad=grad, mask=mask)
            return
    pytest.skip(f"{name} declines: {why}")


@pytest.mark.parametrize("name", EXACT)
def test_a_mask_that_does_not_allow_every_pair_is_applied(name):
    """Two queries under causal(), a window one key short of the cache: kept, and each backend's answer
    is the masked one (it differs from the unmasked answer by far more than the tolerance)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 2, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    one = q[:, :, -1:]
    for qq, mask in ((q, M.causal()), (one, M.causal() & M.sliding_window(7))):
        why = _declined(name, qq, k, v, mask, False)
        if why is not None:
            pytest.skip(f"{name} declines: {why}")
        check_backend(name, qq, k, v, grad=False, mask=mask)
        unmasked = qkv.attention(qq, k, v, backend="reference")
        assert (qkv.attention(qq, k, v, mask=mask, backend=name) - unmasked).abs().max() > 1e-2


class _Spy(Backend):
    """Records the mask each request reaches it with; the formula by the reference."""

    name = "spy"
    automatic = False

    def __init__(self, exact: bool, local_shards: bool) -> None:
        self.exact, self.local_shards = exact, local_shards
        self.masks: list[Any] = []

    def run(self, req: Request, plan: Any = None) -> torch.Tensor:
        self.masks.append(req.mask)
        return backends.get("reference").run(req)  # type: ignore[return-value]


@pytest.mark.parametrize(
    "exact,local_shards,dropped", [(True, False, True), (True, True, False), (False, False, False)]
)
def test_the_mask_is_dropped_only_for_a_whole_problem_computed_exactly(exact, local_shards, dropped):
    """A named exact backend gets no mask; one whose inputs are local shards (ring, ulysses: a decoding
    step of one token per rank is not the problem) and an approximation get the mask as given."""
    spy = backends.register(_Spy(exact, local_shards))
    try:
        q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
        mask = M.causal()
        qkv.attention(q, k, k, mask=mask, backend="spy")
        assert spy.masks == [None] if dropped else spy.masks == [mask]
    finally:
        backends.unregister("spy")
    for name, b in backends.registered().items():  # the built-ins say which they are
        if b.local_shards:
            assert not b.automatic, f"{name} holds local shards: auto must never pick it"


def test_explain_says_the_mask_was_dropped_and_sdpa_builds_no_dense_mask(monkeypatch):
    """The decoding step goes to SDPA with no mask (no dense Lq x Lk mask built) or to tiled as one call;
    explain says why the mask is gone."""
    q, k = torch.randn(1, 8, 1, 32), torch.randn(1, 8, 128, 32)
    e = qkv.explain(q, k, k, mask=M.causal())
    assert e.mask == "causal, which allows every pair here (Lq=1, Lk=128): computed without a mask", e.mask
    assert e.backend == "sdpa", str(e)  # one fused call: tiled's estimate adds its own per-call cost

    def no_dense(*a: Any, **kw: Any) -> None:
        raise AssertionError("a dense mask was built")

    monkeypatch.setattr(M.Mask, "to_dense", no_dense)
    monkeypatch.setattr(M.Mask, "tile", no_dense)
    for name in ("sdpa", "tiled", "reference", "auto"):
        out = qkv.attention(q, k, k, mask=M.causal(), backend=name)
        torch.testing.assert_close(out, qkv.attention(q, k, k, backend=name))
    plan = backends.get("tiled").plan(_validate(q, k, k, M.causal(), None, None, 0.0, False, {}, None, True)[0])
    assert plan.single == "full"  # one fused call

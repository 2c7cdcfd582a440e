"""The conformance suite: every exact backend meets the contract of ``qkv.attention``.

It runs over the backends registered and available here whose ``exact`` flag is set, and the backends that
tests add in one file (``tests/backends/*_backend.py``, registered for the length of a test:
``tests/backend_files.py``); it names none of them. Each is held to the float64 oracle (``tests/oracle.py``;
the rule of docs/DESIGN.md "Tests": an error at most twice the same formula's error in the same dtype, plus
a small floor), forward and, where the backend takes gradients, backward: every mask kind (none, causal,
sliding window, documents, padding, a custom ``mask_mod``, rows that see nothing: zeros and zero gradient,
never NaN), grouped-query heads, ``Lq != Lk`` (aligned bottom-right), score mods, ``return_weights``, sinks
(for ``takes_sinks`` backends), dtypes (float32; bfloat16, float16 and float64 where the backend takes
them), dropout, empty inputs and bad input. Backends that say they trace (``traceable``) are traced with
``fullgraph=True``.

A request a backend declines (``supports`` gives a reason, or ``auto_blocker``: a one-time cost ``auto``
would not pay unasked, such as compiling a kernel per shape) is skipped with that reason, not failed; in
the hypothesis-drawn tests such an example counts as a hypothesis ``event`` and the test goes on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor

import backend_files
import qkv
from oracle import FLOOR, check_backend
from qkv import backends
from qkv import masks as M
from qkv import scores as S
from qkv.attention import _validate
from qkv.backends.base import assume_traced, unsupported
from strategies import DTYPES, problems, sink_problems

EXTRA = backend_files.extra()
EXACT = [n for n, b in {**backends.registered(), **EXTRA}.items() if b.exact and b.available()]
"""What the suite runs over: read from the flags, never written out."""

DRAWN = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
)
"""The suite's fixture registers a test backend once per test, not per example: that is intended."""


@pytest.fixture(params=EXACT)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.param
    if name in EXTRA:
        with backend_files.registered(EXTRA[name]):
            yield name
    else:
        yield name


# ------------------------------------------------------------------------------------------------
# how a backend is held to the oracle


def declined(name: str, q: Tensor, k: Tensor, v: Tensor, *, grad: bool, **kw: Any) -> str | None:
    """Why ``name`` would not serve ``qkv.attention(q, k, v, **kw)`` (with gradients when ``grad``), or
    ``None``: its ``supports``, the sinks it does not take, or its ``auto_blocker``."""
    b = backends.get(name)
    a, bk, c = (t.detach().requires_grad_(grad) for t in (q, k, v))
    sinks = kw.get("sinks")
    if sinks is not None:
        sinks = sinks.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        req, _ = _validate(
            a,
            bk,
            c,
            kw.get("mask"),
            kw.get("score_mod"),
            kw.get("scale"),
            kw.get("dropout_p", 0.0),
            kw.get("return_weights", False),
            {},
            sinks,
        )
        return unsupported(b, req) or b.supports(req) or b.auto_blocker(req)


def conform(name: str, q: Tensor, k: Tensor, v: Tensor, *, drawn: bool = False, **kw: Any) -> None:
    """``name`` meets the rule against the oracle, forward and backward (forward only where it takes no
    gradients for this request). Declined: skipped with the reason (``drawn``: a hypothesis event)."""
    why = declined(name, q, k, v, grad=True, **kw)
    if why is None:
        check_backend(name, q, k, v, grad=True, **kw)
        return
    why_fwd = declined(name, q, k, v, grad=False, **kw)
    if why_fwd is None:
        event(f"forward only: {why}") if drawn else None
        check_backend(name, q, k, v, grad=False, **kw)
        return
    if drawn:
        event(f"declined: {why_fwd}")
        return
    pytest.skip(f"{name} declines: {why_fwd}")


def skip_unless_served(name: str, q: Tensor, k: Tensor, v: Tensor, *, grad: bool = False, **kw: Any) -> None:
    why = declined(name, q, k, v, grad=grad, **kw)
    if why is not None:
        pytest.skip(f"{name} declines: {why}")


def inputs(
    seed: int = 0, B: int = 2, H: int = 4, Hkv: int = 2, Lq: int = 5, Lk: int = 7, D: int = 8, Dv: int = 6, dtype=torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Small grouped-query inputs with ``Lq != Lk`` and ``Dv != D``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _custom(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """A FlexAttention ``mask_mod`` as users write them, taken as it is."""
    return (q_idx + kv_idx + h) % 3 != 0


MASKS: dict[str, Any] = {
    "none": None,
    "causal": M.causal(),
    "sliding-window": M.sliding_window(2, 1),
    "causal-window": M.causal() & M.sliding_window(2),
    "documents": M.document([0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 2, 2]) & M.causal(),
    "padding-with-empty-rows": M.padding([7, 0]),  # batch row 1 sees no key at all
    "custom-mask-mod": _custom,
    "nothing-for-some-rows": M.causal() & ~M.padding(3),  # bottom-right: query 0 stands at key 2
    "dense-bool": torch.tensor([[1, 0, 1, 1, 0, 0, 1]] * 5, dtype=torch.bool),
}


# ------------------------------------------------------------------------------------------------
# the oracle, on drawn and on chosen problems


@DRAWN
@given(problems())
def test_meets_the_oracle_on_drawn_problems(backend, p):
    """Every mask constructor, GQA, ``Lq != Lk``, ``Dv != D``, float32/64, bfloat16, float16."""
    q, k, v, mask = p
    conform(backend, q, k, v, mask=mask, drawn=True)


SCORE_MODS = ["alibi", "bias", "relative", "softcap", "function"]


@DRAWN
@given(problems(dtypes=[torch.float32]), st.sampled_from(SCORE_MODS))
def test_meets_the_oracle_with_score_mods(backend, p, which):
    q, k, v, mask = p
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mod = {
        "alibi": lambda: S.alibi(H),
        "bias": lambda: S.bias(torch.randn(B, 1, Lq, Lk)),
        "relative": lambda: S.relative_bias(torch.randn(32, H)),
        "softcap": lambda: S.softcap(2.0),
        "function": lambda: lambda score, b, h, q_idx, kv_idx: score - 0.1 * (q_idx - kv_idx).abs() * (h + 1),
    }[which]()
    conform(backend, q, k, v, mask=mask, score_mod=mod, drawn=True)


@pytest.mark.parametrize("kind", list(MASKS))
def test_every_mask_kind(backend, kind):
    q, k, v = inputs(1)
    conform(backend, q, k, v, mask=MASKS[kind])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype(backend, dtype):
    """float32 everywhere; the others where the backend takes them (it declines the rest, with its reason)."""
    q, k, v = inputs(2, dtype=dtype)
    conform(backend, q, k, v, mask=M.causal() & M.sliding_window(3))


@pytest.mark.parametrize(
    "mask",
    [M.sliding_window(2, 1), M.document([0, 0, 1, 1, 1]) & M.causal(), M.padding([2, 0])],
    ids=["window", "doc-causal", "padding-with-empty-row"],
)
def test_gradcheck_float64(backend, mask):
    """Gradients against finite differences (an oracle of their own), where the backend takes float64
    gradients: a two-sided window, causal documents, and a batch row that sees nothing (every other mask
    kind's gradients are held to the float64 oracle above)."""
    q, k, v = (t.double().requires_grad_() for t in inputs(3, B=2, H=2, Hkv=1, Lq=5, Lk=5, D=4, Dv=3))
    skip_unless_served(backend, q, k, v, grad=True, mask=mask)
    assert torch.autograd.gradcheck(lambda a, b, c: qkv.attention(a, b, c, mask=mask, backend=backend), (q, k, v))


def test_serves_the_plain_float32_request(backend):
    """What every backend must serve (docs/DESIGN.md: every backend supports float32), so that the suite
    cannot pass by declining everything."""
    q, k, v = inputs(4)
    req, _ = _validate(q, k, v, None, None, None, 0.0, False, {}, None)
    assert backends.get(backend).supports(req) is None


# ------------------------------------------------------------------------------------------------
# what the contract says in words


def test_rows_that_see_nothing_give_zeros_and_zero_gradient(backend):
    q, k, v = (t.requires_grad_() for t in inputs(5, B=1, H=2, Hkv=2, Lq=4, Lk=4, D=8, Dv=8))
    for kw in ({"mask": M.padding(4, q_lengths=2)}, {"score_mod": S.bias(torch.tensor([0.0, -math.inf]).view(2, 1, 1))}):
        # queries 2 and 3 see nothing; then every query of head 1, through a -inf bias
        skip_unless_served(backend, q, k, v, grad=True, **kw)
        out = qkv.attention(q, k, v, backend=backend, **kw)
        dead = (slice(None), slice(None), slice(2, None)) if "mask" in kw else (slice(None), 1)
        assert torch.isfinite(out).all() and not out[dead].any()
        q.grad = k.grad = v.grad = None
        out.sum().backward()
        assert q.grad is not None and not q.grad[dead].any()
        for t in (q, k, v):
            assert t.grad is not None and torch.isfinite(t.grad).all()


def test_causal_is_bottom_right_when_lq_differs(backend):
    """Query 0 of 2 stands at key position 3 of 5: it sees keys 0..3; query 1 sees all five (against the
    same backend on the slices, unmasked: no other oracle needed)."""
    q, k, v = inputs(6, B=1, H=1, Hkv=1, Lq=2, Lk=5, D=4, Dv=4)
    skip_unless_served(backend, q, k, v, mask=M.causal())
    out = qkv.attention(q, k, v, mask=M.causal(), backend=backend)
    want0 = qkv.attention(q[:, :, :1], k[:, :, :4], v[:, :, :4], backend=backend)
    want1 = qkv.attention(q[:, :, 1:], k, v, backend=backend)
    torch.testing.assert_close(out, torch.cat([want0, want1], 2), atol=1e-6, rtol=0)


def test_empty_inputs_and_huge_logits(backend):
    """No key: zeros (and zero gradient); no query: an empty output; huge scores: finite. Each part where
    the backend serves it."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 5)
    q0, k3, v3 = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)
    served = 0
    if declined(backend, q, k, v, grad=False) is None:
        out = qkv.attention(q, k, v, backend=backend)
        assert out.shape == (1, 2, 3, 5) and not out.any()
        assert qkv.attention(q0, k3, v3, backend=backend).shape == (1, 2, 0, 5)
        served += 1
    if declined(backend, q, k, v, grad=True) is None:
        qg = q.clone().requires_grad_()
        qkv.attention(qg, k, v, backend=backend).sum().backward()
        assert qg.grad is not None and not qg.grad.any()
        served += 1
    for dtype, big in ((torch.float32, 1e8), (torch.bfloat16, 1e4)):  # finite, however large the scores
        qh = (torch.randn(1, 2, 6, 8) * big).to(dtype)
        if declined(backend, qh, qh, qh, grad=False, mask=M.causal()) is None:
            assert torch.isfinite(qkv.attention(qh, qh, qh.clone(), mask=M.causal(), backend=backend).float()).all()
            served += 1
    if not served:
        pytest.skip(f"{backend} declines: {declined(backend, q, k, v, grad=False)}")


def test_dropout_is_unbiased(backend):
    q, k, v = inputs(7, B=1, H=1, Hkv=1, Lq=4, Lk=6, D=8, Dv=8)
    skip_unless_served(backend, q, k, v, dropout_p=0.3)
    exact = qkv.attention(q, k, v, backend=backend)
    torch.manual_seed(0)
    runs = torch.stack([qkv.attention(q, k, v, dropout_p=0.3, backend=backend) for _ in range(2000)])
    assert not torch.equal(runs[0], exact)
    torch.testing.assert_close(runs.mean(0), exact, atol=0.1, rtol=0)


@pytest.mark.parametrize("kind", ["none", "causal-window", "padding-with-empty-rows", "custom-mask-mod"])
def test_returned_weights_meet_the_oracle(backend, kind):
    """Weights ``(B, H, Lq, Lk)`` against the float64 reference's under the rule (baseline: the reference
    in float32); each row sums to 1, or is all zero where the query sees nothing."""
    q, k, v = inputs(8)
    mask = MASKS[kind]
    skip_unless_served(backend, q, k, v, mask=mask, return_weights=True)
    out, w = qkv.attention(q, k, v, mask=mask, return_weights=True, backend=backend)
    want = qkv.attention(q.double(), k.double(), v.double(), mask=mask, return_weights=True, backend="reference")[1]
    base = qkv.attention(q, k, v, mask=mask, return_weights=True, backend="reference")[1]
    assert w.shape == want.shape and torch.isfinite(w).all()
    err, base_err = (w.double() - want).abs().max().item(), (base.double() - want).abs().max().item()
    assert err <= 2 * base_err + FLOOR[torch.float32], f"{backend} weights: error {err:.3g} > 2 x {base_err:.3g}"
    sums = w.sum(-1)
    assert ((sums - 1).abs() < 1e-5).logical_or(sums == 0).all()
    check_backend(backend, q, k, v, grad=False, mask=mask)  # and the output alongside them


# ------------------------------------------------------------------------------------------------
# sinks (backends with takes_sinks; the others decline them, with that reason)


@DRAWN
@given(sink_problems())
def test_sinks_meet_the_oracle_on_drawn_problems(backend, p):
    """``out``, ``dq``, ``dk``, ``dv`` and the sinks' gradient, every mask kind and dtype."""
    q, k, v, s, mask = p
    conform(backend, q, k, v, mask=mask, sinks=s, drawn=True)


@pytest.mark.parametrize("case", ["none", "square-causal", "causal-window", "bias", "softcap"])
def test_sinks_on_each_path(backend, case):
    """The paths with no dense mask (none, square causal: sdpa's flags), a window, an additive bias and a
    score mod that is not one."""
    q, k, v = inputs(9, B=2, H=6, Hkv=2, Lq=17, Lk=17, D=16, Dv=16)
    kw: dict[str, Any] = {
        "none": {},
        "square-causal": {"mask": M.causal()},
        "causal-window": {"mask": M.causal() & M.sliding_window(3)},
        "bias": {"mask": M.causal(), "score_mod": S.bias(torch.randn(1, 6, 17, 17))},
        "softcap": {"mask": M.sliding_window(4), "score_mod": S.softcap(3.0)},
    }[case]
    conform(backend, q, k, v, sinks=torch.randn(6), **kw)


@pytest.mark.parametrize("mask", [None, M.causal(), M.causal() & M.sliding_window(2) | M.global_tokens(1)], ids=["none", "causal", "window"])
def test_sinks_gradcheck_float64(backend, mask):
    q, k, v = (t.double().requires_grad_() for t in inputs(10, B=1, H=4, Hkv=2, Lq=6, Lk=6, D=4, Dv=3))
    s = torch.randn(4, dtype=torch.float64, requires_grad=True)
    skip_unless_served(backend, q, k, v, grad=True, mask=mask, sinks=s)
    fn = lambda a, b, c, d: qkv.attention(a, b, c, mask=mask, sinks=d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, s))


def test_a_row_that_sees_no_key_puts_its_weight_on_the_sink(backend):
    """A query that may attend to no key gives 0 (its weight on the sink, whose value is 0): zero gradient
    for it, nothing added to the sinks' gradient. With no sink for the head (``-inf``): the usual empty row."""
    q, k, v = inputs(11, B=2, H=2, Hkv=2, Lq=4, Lk=5, D=8, Dv=8)
    s = torch.tensor([0.5, float("-inf")])
    mask = M.padding([0, 5])  # batch row 0 sees no key at all
    skip_unless_served(backend, q, k, v, grad=True, mask=mask, sinks=s)

    def run(a, b, c, d, m):
        a, b, c, d = (t.detach().clone().requires_grad_() for t in (a, b, c, d))
        out = qkv.attention(a, b, c, mask=m, sinks=d, backend=backend)
        out.backward(torch.ones_like(out))
        return out, a.grad, b.grad, c.grad, d.grad

    out, dq, dk, dv, ds = run(q, k, v, s, mask)
    assert not out[0].any() and not dq[0].any() and not dk[0].any() and not dv[0].any()
    assert torch.isfinite(out).all() and torch.isfinite(ds).all()
    ds1 = run(q[1:], k[1:], v[1:], s, None)[4]  # batch row 1 alone gives the same sink gradient
    torch.testing.assert_close(ds, ds1)
    assert ds[1] == 0  # no sink: no gradient
    e = torch.zeros(1, 2, 0, 8)
    sg = s.clone().requires_grad_()
    out0 = qkv.attention(q[:1], e, e, sinks=sg, backend=backend)  # Lk == 0: every row is empty
    assert out0.shape == (1, 2, 4, 8) and not out0.any()
    out0.sum().backward()
    assert sg.grad is not None and not sg.grad.any()


def test_no_sink_is_no_sinks_and_a_sink_only_shrinks_the_output(backend):
    q, k, v = inputs(12, B=1, H=3, Hkv=3, Lq=5, Lk=5, D=8, Dv=8)
    skip_unless_served(backend, q, k, v, mask=M.causal(), sinks=torch.zeros(3))
    plain = qkv.attention(q, k, v, mask=M.causal(), backend=backend)
    none = qkv.attention(q, k, v, mask=M.causal(), sinks=torch.full((3,), float("-inf")), backend=backend)
    torch.testing.assert_close(none, plain)
    # a sink scales each row by the weight left to the keys, a number in (0, 1): direction unchanged
    some = qkv.attention(q, k, v, mask=M.causal(), sinks=torch.zeros(3), backend=backend)
    c = (some * plain).sum(-1, keepdim=True) / (plain * plain).sum(-1, keepdim=True)
    assert ((c > 0) & (c < 1)).all()
    torch.testing.assert_close(some, c * plain)


def test_weights_with_sinks_meet_the_oracle(backend):
    """Over the keys: a row sums to less than 1 (the rest is on the sink), 0 where the query sees nothing."""
    q, k, v = inputs(13, B=1, H=4, Hkv=2, Lq=6, Lk=7, D=8, Dv=8)
    s, mask = torch.randn(4), M.causal() & ~M.padding(2)  # the first query (at key position 1) sees nothing
    skip_unless_served(backend, q, k, v, mask=mask, sinks=s, return_weights=True)
    _, w = qkv.attention(q, k, v, mask=mask, sinks=s, return_weights=True, backend=backend)
    want = qkv.attention(q.double(), k.double(), v.double(), mask=mask, sinks=s.double(), return_weights=True, backend="reference")[1]
    torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=1e-5)
    assert (w.sum(-1) < 1).all() and not w[:, :, 0].any()


# ------------------------------------------------------------------------------------------------
# traced


def test_traces_into_a_graph_if_it_says_so(backend):
    """A backend whose ``traceable`` says None runs inside ``torch.compile(fullgraph=True)`` (no graph
    break; dynamo's eager compiler, so no kernel is generated) and gives its eager output."""
    q, k, v = inputs(14)
    mask = M.causal() & M.sliding_window(3)
    req, _ = _validate(q, k, v, mask, None, None, 0.0, False, {}, None)
    b = backends.get(backend)
    with assume_traced():
        why = b.traceable(req) or b.auto_blocker(req)
    if why is not None:
        pytest.skip(f"{backend} is not traced here: {why}")
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda a, b, c: qkv.attention(a, b, c, mask=mask, backend=backend), backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(fn(q, k, v), qkv.attention(q, k, v, mask=mask, backend=backend))
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# bad input: qkv.attention's errors, whatever the backend named

Q = torch.randn(2, 4, 5, 8)
K = torch.randn(2, 2, 6, 8)
V = torch.randn(2, 2, 6, 3)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((Q, K.unsqueeze(0), V), {}, ValueError, r"same number of dims.*q \(2, 4, 5, 8\), k \(1, 2, 2, 6, 8\)"),
        ((Q, torch.randn(2, 2, 6, 7), V), {}, ValueError, r"same head dim D.*k \(2, 2, 6, 7\)"),
        ((Q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 3)), {}, ValueError, r"H=4 must be a multiple of.*Hkv=3"),
        ((Q, K, torch.randn(2, 2, 7, 3)), {}, ValueError, r"k and v must have the same length Lk.*v \(2, 2, 7, 3\)"),
        ((Q, torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 3)), {}, ValueError, r"same batch size B.*k \(3, 2, 6, 8\)"),
        ((Q[0], K[0], V[0].unsqueeze(0)), {}, ValueError, r"same number of dims.*q \(4, 5, 8\)"),
        ((Q, K.double(), V), {}, TypeError, r"share one dtype.*k torch.float64"),
        ((Q.long(), K, V), {}, TypeError, r"q must be a floating-point tensor, got dtype torch.int64"),
        (([1.0], K, V), {}, TypeError, r"q must be a torch.Tensor, got list"),
        (
            (Q, K, V),
            {"mask": torch.ones(3, 5, 6, dtype=torch.bool)},
            ValueError,
            r"\(3, 5, 6\) does not broadcast.*\(2, 4, 5, 6\)",
        ),
        ((Q, K, V), {"mask": torch.ones(5, 6)}, TypeError, r"mask must be a bool tensor.*torch.float32"),
        ((Q, K, V), {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
        ((Q, K, V), {"dropout_p": -0.1}, ValueError, r"dropout_p"),
        ((Q, K, V), {"scale": float("nan")}, ValueError, r"scale must be a finite number"),
        ((Q, K, V), {"return_weights": 1}, TypeError, r"return_weights must be a bool"),
        ((Q, K, V), {"mask": M.document([0, 1, 1])}, ValueError, r"q_ids has length 3 but the sequence has Lq=5"),
        ((Q, K, V), {"mask": M.padding([1, 2, 3])}, ValueError, r"kv_lengths.*shape \(3,\) for batch size B=2"),
        ((Q, K, V), {"mask": M.padding([1, 7])}, ValueError, r"kv_lengths must lie in \[0, 6\]"),
        ((Q, K, V), {"mask": "causal"}, TypeError, r"mask must be a qkv.masks.Mask"),
        ((Q, K, V), {"bogus": 1}, TypeError, r"does not take the option\(s\) bogus"),
    ],
)
def test_bad_input_gets_a_clear_error_whatever_the_backend(args, kwargs, exc, match):
    """Checked once, in qkv.attention, before any backend: the same error under ``auto`` and under every
    exact backend named."""
    for name in ["auto", *EXACT]:
        with backend_files.registered(EXTRA[name]) if name in EXTRA else contextlib.nullcontext():
            with pytest.raises(exc, match=match):
                qkv.attention(*args, backend=name, **kwargs)


def test_an_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; valid backends: auto, .*reference.*sdpa"):
        qkv.attention(Q, K, V, backend="nope")

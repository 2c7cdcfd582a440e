"""Attention sinks (``qkv.attention(..., sinks=s)``, gpt-oss): one logit per query head joins the softmax
denominator. The oracle itself (``reference``) is checked against the formula written here in float64
(softmax over the scores with the sink concatenated as one more column, that column dropped), forward and
backward (``dq``, ``dk``, ``dv`` and the sinks' gradient), with every mask kind, grouped-query heads, Lq !=
Lk, Dv != D and rows that see no key, under FlashAttention's tolerance rule; then what only some engines
do (tiled's tiles and fused kernel, flex's correction after its kernel), who serves sinks, and the errors.
Every backend that takes sinks is held to the oracle with them by the conformance suite
(``tests/backends/test_conformance.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
import qkv.backends.tiled as T
from qkv import backends
from qkv import masks as M
from qkv import scores as S
from qkv.backends import Backend
from strategies import sink_problems

SINK_BACKENDS = [name for name, b in backends.registered().items() if b.takes_sinks and b.available()]
"""The backends that take sinks, from their flag."""
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def formula(q, k, v, sinks, allowed, scale=None, dtype=torch.float64, bias=None, cap=None):
    """``softmax([q kᵀ · scale (+ bias, softcap), s_h]) [:, :-1] v``, all computed in ``dtype``; rows with
    nothing at all to attend (no key and ``s_h = -inf``) give zeros. Returns ``(out, weights)``."""
    q, k, v, s = (t.to(dtype) for t in (q, k, v, sinks))
    B, H, Lq, D = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sc = (q @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    if cap is not None:
        sc = cap * torch.tanh(sc / cap)
    if bias is not None:
        sc = sc + bias.to(dtype)
    sc = sc.masked_fill(~allowed, float("-inf"))
    sc = torch.cat((sc, s.view(1, H, 1, 1).expand(B, H, Lq, 1)), dim=-1)
    m = sc.detach().amax(-1, keepdim=True)
    p = torch.exp(sc - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
    tot = p.sum(-1, keepdim=True)
    w = (p / torch.where(tot == 0, torch.ones_like(tot), tot))[..., :-1]
    return w @ v, w


def dense(mask, B, H, Lq, Lk):
    if mask is None:
        return torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    return M.as_mask(mask).to_dense(B, H, Lq, Lk).expand(B, H, Lq, Lk)


def run(fn, q, k, v, s, dout):
    q, k, v, s = (t.detach().clone().requires_grad_() for t in (q, k, v, s))
    out = fn(q, k, v, s)
    grads = torch.autograd.grad(out, (q, k, v, s), dout.to(out.dtype), allow_unused=True)
    return (out.detach(), *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v, s))))


def check(backend, q, k, v, s, mask=None, **kw):
    """The tolerance rule against the float64 formula: error <= 2 x (the formula in the inputs' dtype) + floor."""
    B, H, Lq, _ = q.shape
    allowed = dense(mask, B, H, Lq, k.shape[2])
    extra = {key: kw.pop(key) for key in ("bias", "cap") if key in kw}
    dout = torch.randn(B, H, Lq, v.shape[-1]).to(q.dtype)
    got = run(lambda a, b, c, d: qkv.attention(a, b, c, mask=mask, sinks=d, backend=backend, **kw), q, k, v, s, dout)
    ref = run(
        lambda a, b, c, d: formula(a, b, c, d, allowed, **extra)[0],
        q.double(),
        k.double(),
        v.double(),
        s.double(),
        dout.double(),
    )
    low = run(lambda a, b, c, d: formula(a, b, c, d, allowed, dtype=q.dtype, **extra)[0], q, k, v, s, dout)
    for name, g, r, b in zip(("out", "dq", "dk", "dv", "dsinks"), got, ref, low):
        assert g.shape == r.shape, f"{backend} {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{backend} {name}: non-finite values"
        err = (g.double() - r).abs().max().item() if g.numel() else 0.0
        base = (b.double() - r).abs().max().item() if b.numel() else 0.0
        assert err <= 2 * base + FLOOR[q.dtype], f"{backend} {name} ({q.dtype}): error {err:.3g} > 2 x {base:.3g}"


@settings(max_examples=60, deadline=None)
@given(sink_problems())
def test_the_oracle_meets_the_formula_with_every_mask(p):
    q, k, v, s, mask = p
    check("reference", q, k, v, s, mask)


@settings(max_examples=40, deadline=None)
@given(sink_problems(dtypes=[torch.float32, torch.float64]), st.integers(1, 5), st.integers(1, 5))
def test_tiled_sinks_across_tile_boundaries(p, bq, bk):
    q, k, v, s, mask = p
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "BLOCK_Q", bq)
        mp.setattr(T, "BLOCK_K", bk)
        check("tiled", q, k, v, s, mask)


def test_softcap_with_sinks_on_tiled_eager_engine_across_tiles():
    """A score mod sends tiled to its eager engine (autograd through the checkpointed tiles and the
    correction), here over tiles of 4 queries and 5 keys."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 11, 8) * 2, torch.randn(2, 4, 13, 8) * 2, torch.randn(2, 4, 13, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "BLOCK_Q", 4)
        mp.setattr(T, "BLOCK_K", 5)
        check("tiled", q, k, v, torch.randn(4), M.sliding_window(4), score_mod=S.softcap(3.0), cap=3.0)


def test_tiled_weights_of_chosen_heads_with_sinks():
    torch.manual_seed(6)
    q, k, v, s = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(4)
    mask = M.causal() & ~M.padding(2)  # the first query (at key position 1) sees nothing
    _, w = qkv.attention(q, k, v, mask=mask, sinks=s, return_weights=True, backend="tiled")
    torch.testing.assert_close(w.double(), formula(q, k, v, s, dense(mask, 1, 4, 6, 7))[1], atol=1e-6, rtol=1e-5)
    _, w2 = qkv.attention(q, k, v, mask=mask, sinks=s, return_weights=True, backend="tiled", weights_heads=[2])
    torch.testing.assert_close(w2, w[:, 2:3])


def test_tiled_materialises_no_extra_key(monkeypatch):
    """The correction works on (out, lse): every span the kernel core is given holds real keys only."""
    seen: list[int] = []
    real = T.span_forward

    def spy(q, k, v, *a, **kw):
        seen.append(k.shape[2])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(T, "span_forward", spy)
    q = torch.randn(1, 2, 300, 16)
    for mask in (None, M.causal() & M.sliding_window(50)):
        seen.clear()
        qkv.attention(q, q, q, mask=mask, sinks=torch.randn(2), backend="tiled")
        assert seen and max(seen) <= 300 and sum(seen) > 0


def test_auto_serves_sinks_and_explain_names_who_cannot():
    q = torch.randn(1, 4, 32, 8)
    s = torch.randn(4)
    e = qkv.explain(q, q, q, mask=M.causal(), sinks=s)
    assert e.backend in SINK_BACKENDS
    others = [n for n, b in backends.registered().items() if not b.takes_sinks]
    assert others  # the approximations at least
    for name in others:
        assert name not in e.costs
        assert any(w in e.declined[name] for w in ("sinks", "not available", "only when asked")), e.declined[name]
    out = qkv.attention(q, q, q, mask=M.causal(), sinks=s)
    torch.testing.assert_close(
        out.double(), formula(q, q, q, s, dense(M.causal(), 1, 4, 32, 32))[0], atol=1e-5, rtol=1e-5
    )
    for name in others:
        if backends.get(name).available():
            with pytest.raises(NotImplementedError, match=f"{name}.*does not take attention sinks"):
                qkv.attention(q, q, q, sinks=s, backend=name)


def test_a_backend_that_does_not_declare_sinks_is_never_handed_them():
    class Toy(Backend):
        name = "toy-cheap"

        def cost(self, req):
            return 0.0

        def run(self, req, plan=None):
            return torch.zeros(req.B, req.H, req.Lq, req.Dv)

    backends.register(Toy())
    try:
        q = torch.randn(1, 2, 8, 4)
        assert qkv.explain(q, q, q).backend == "toy-cheap"
        e = qkv.explain(q, q, q, sinks=torch.zeros(2))
        assert e.backend != "toy-cheap" and "does not take attention sinks" in e.declined["toy-cheap"]
        with pytest.raises(NotImplementedError, match="toy-cheap.*sinks"):
            qkv.attention(q, q, q, sinks=torch.zeros(2), backend="toy-cheap")
    finally:
        backends.unregister("toy-cheap")


Q = torch.randn(2, 4, 5, 8)
K = torch.randn(2, 2, 6, 8)


@pytest.mark.parametrize(
    "sinks,exc,match",
    [
        (torch.zeros(2), ValueError, r"sinks must be \(H,\) = \(4,\).*got shape \(2,\) for q \(2, 4, 5, 8\)"),
        (torch.zeros(1, 4), ValueError, r"sinks must be \(H,\).*got shape \(1, 4\)"),
        (torch.zeros(4, dtype=torch.long), TypeError, r"sinks must have the dtype of q \(torch.float32\) or float32"),
        (torch.zeros(4, dtype=torch.float64), TypeError, r"sinks must have the dtype.*got torch.float64"),
        ([0.0] * 4, TypeError, r"sinks must be a torch.Tensor of shape \(H,\), got list"),
        (torch.zeros(4, device="meta"), ValueError, r"sinks must be on the device of q \(cpu\), got meta"),
    ],
)
def test_bad_sinks_get_a_clear_error(sinks, exc, match):
    with pytest.raises(exc, match=match):
        qkv.attention(Q, K, K, sinks=sinks)
    with pytest.raises(exc, match=match):
        qkv.explain(Q, K, K, sinks=sinks)


def test_three_dim_inputs_take_sinks_per_head():
    q, k = torch.randn(4, 5, 8), torch.randn(4, 6, 8)
    s = torch.randn(4)
    torch.testing.assert_close(qkv.attention(q, k, k, sinks=s), qkv.attention(q[None], k[None], k[None], sinks=s)[0])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(sink_problems(dtypes=[torch.float32, torch.float64]))
def test_flex_adds_sinks_after_its_kernel(p):
    """flex (uncompiled, inference): the kernel's logsumexp, then the sink in the denominator."""
    q, k, v, s, mask = p
    B, H, Lq, _ = q.shape
    allowed = dense(mask, B, H, Lq, k.shape[2])
    with torch.no_grad():
        got = qkv.attention(q, k, v, mask=mask, sinks=s, backend="flex", compile=False)
        ref = formula(q.double(), k.double(), v.double(), s.double(), allowed)[0]
        low = formula(q, k, v, s, allowed, dtype=q.dtype)[0]
    err, base = (got.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()
    assert err <= 2 * base + FLOOR[q.dtype], f"flex sinks ({q.dtype}): error {err:.3g} > 2 x {base:.3g}"


def test_flex_weights_with_sinks_and_its_declines():
    torch.manual_seed(8)
    q, k, v, s = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(4)
    mask = M.causal() & ~M.padding(2)
    with torch.no_grad():
        _, w = qkv.attention(q, k, v, mask=mask, sinks=s, return_weights=True, backend="flex", compile=False)
    torch.testing.assert_close(w.double(), formula(q, k, v, s, dense(mask, 1, 4, 6, 7))[1], atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="gradients through FlexAttention's logsumexp"):
        qkv.attention(q.requires_grad_(True), k, v, sinks=s, backend="flex", compile=False)
    with pytest.raises(NotImplementedError, match="sinks need"):
        qkv.attention(q.detach(), k, v, sinks=s, backend="flex")  # the compiled CPU kernel gives no logsumexp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [None, "causal", "window", "documents"])
def test_half_precision_sinks_on_the_fused_kernel(monkeypatch, dtype, mask):
    """bf16/fp16 with sinks on tiled's fused engine: every kernel call (one call, triangles, a causal
    window's batched band, partial tiles; forward and backward) gets the inputs' dtype, the correction and
    the sinks' gradient are float32, and out, dq, dk, dv and dsinks meet the rule against the formula in
    float64 (baseline: the formula computed entirely in the low dtype). GQA, Dv != D, sinks in float32."""
    from qkv.backends import kernels as K

    L = 1100
    m = {
        None: None,
        "causal": M.causal(),
        "window": M.causal() & M.sliding_window(100),
        "documents": M.document(torch.arange(L) * 3 // L),
    }[mask]
    if mask == "window":
        assert T.tile_plan(m, M.Shape(1, 4, L, L), T.BLOCK_Q, T.BLOCK_K).band is not None
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, L, 16).to(dtype), torch.randn(1, 2, L, 16).to(dtype), torch.randn(1, 2, L, 12).to(dtype)
    s = torch.randn(4) * 2
    seen: list[torch.dtype] = []
    for name, arg in (("FLASH", 0), ("FLASH_BWD", 1)):
        real = getattr(K, name)

        def spy(*a, _real=real, _arg=arg, **kw):
            seen.append(a[_arg].dtype)
            return _real(*a, **kw)

        monkeypatch.setattr(K, name, spy)
    check("tiled", q, k, v, s, m)
    assert seen and set(seen) == {dtype}
    out = qkv.attention(q, k, v, mask=m, sinks=s.to(dtype), backend="tiled")
    assert out.dtype == dtype

"""``sdpa``'s repair of rows that may attend to nothing, tested whatever torch is installed: the repair
functions directly, and the backend around a stand-in for an older ``scaled_dot_product_attention``
that gives NaN rows (torch 2.13 already gives zeros there, so the real kernel cannot show the repair).

Half-precision training on the CPU: PyTorch's backward accumulates ``dK``/``dV`` in the low dtype, so the
backend computes such calls in float32 (``qkv.backends.sdpa.upcasts``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qkv
from oracle import check_backend
from qkv import masks as M
from qkv import scores as S
from qkv.backends import sdpa
from qkv.backends.base import Request
from qkv.backends.sdpa import open_dead_rows, zero_dead_rows


def _nan_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as older torch computed it: ``softmax`` of an all ``-inf`` row is NaN, forward and backward."""
    assert dropout_p == 0.0
    if enable_gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, dim=-1) @ v


def test_the_stand_in_gives_nan_rows_like_old_torch():
    q = torch.randn(1, 1, 2, 4)
    allowed = torch.tensor([[True, False, True], [False, False, False]])
    out = _nan_sdpa(q, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), attn_mask=allowed)
    assert torch.isfinite(out[:, :, 0]).all() and torch.isnan(out[:, :, 1]).all()


def test_open_dead_rows_opens_only_the_rows_that_see_nothing():
    allowed = torch.tensor([[[[True, False, False], [False, False, False], [False, True, True]]]])
    opened, live = open_dead_rows(allowed, allowed)
    assert live is not None and live.squeeze(-1).tolist() == [[[True, False, True]]]
    assert opened.tolist() == [[[[True, False, False], [True, True, True], [False, True, True]]]]
    bias = torch.tensor([[1.0, -math.inf], [-math.inf, -math.inf]])
    opened, live = open_dead_rows(bias, ~torch.isneginf(bias))
    assert live is not None and live.squeeze(-1).tolist() == [True, False]
    assert opened.tolist() == [[1.0, -math.inf], [0.0, 0.0]]
    first = bias[:1]
    same, none = open_dead_rows(first, ~torch.isneginf(first))  # every row sees a key: untouched
    assert none is None and same is first


def test_zero_dead_rows_zeros_rows_and_their_gradient():
    out = torch.randn(1, 2, 3, 4, requires_grad=True)
    live = torch.tensor([True, False, True]).view(1, 1, 3, 1)
    got = zero_dead_rows(out, live)
    assert torch.equal(got[:, :, 1], torch.zeros(1, 2, 4)) and torch.equal(got[:, :, 0], out[:, :, 0])
    got.sum().backward()
    assert out.grad is not None and out.grad[:, :, 1].abs().sum() == 0 and (out.grad[:, :, 0] == 1).all()
    assert zero_dead_rows(out, None) is out


@pytest.mark.parametrize(
    "kind",
    ["padding", "bias", "alibi-padding", "gqa-window"],
)
def test_backend_repairs_nan_rows_of_an_older_sdpa(monkeypatch, kind):
    """Through ``qkv.attention``: dead rows are zeros with zero gradient, live rows meet the float64 oracle."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _nan_sdpa)
    torch.manual_seed(0)
    H, Hkv = (4, 2) if kind == "gqa-window" else (2, 2)
    q = torch.randn(2, H, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, 6, 3, dtype=torch.float64, requires_grad=True)
    kw: dict = {}
    if kind == "padding":
        kw["mask"] = M.padding([6, 0])  # batch row 1 sees no key at all
    elif kind == "bias":
        b = torch.zeros(5, 6, dtype=torch.float64)
        b[2] = -math.inf
        kw["score_mod"] = S.bias(b)
    elif kind == "alibi-padding":
        kw["mask"], kw["score_mod"] = M.padding([6, 4], q_lengths=[3, 5]), S.alibi(H)
    else:
        kw["mask"] = M.sliding_window(0) & M.padding(6, q_lengths=[5, 2])  # GQA, a dense mask, dead rows
    out = qkv.attention(q, k, v, backend="sdpa", **kw)
    with torch.no_grad():
        want = qkv.attention(q, k, v, backend="reference", **kw)
    dead = want.abs().sum(-1) == 0
    assert dead.any() and not dead.all()
    assert torch.isfinite(out).all(), "NaN rows reached the output"
    assert (out[dead] == 0).all()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all(), "NaN reached a gradient"
    assert q.grad is not None and (q.grad[dead] == 0).all()
    g_ref = torch.autograd.grad(qkv.attention(q, k, v, backend="reference", **kw).square().sum(), (q, k, v))
    for g, r in zip((q.grad, k.grad, v.grad), g_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask", [None, "causal", "window"])
def test_a_custom_scale_reaches_every_sdpa_call(mask):
    """``scale`` on the ``is_causal``/no-mask path and on the dense-mask path (a default-only test
    would not see it dropped)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    m = {None: None, "causal": M.causal(), "window": M.sliding_window(2)}[mask]
    for scale in (0.05, 3.0):
        got = qkv.attention(q, k, v, mask=m, scale=scale, backend="sdpa")
        s = (q @ k.transpose(-1, -2)) * scale
        if m is not None:
            s = s.masked_fill(~m.to_dense(1, 2, 6, 6), -math.inf)
        torch.testing.assert_close(got, torch.softmax(s, -1) @ v, rtol=1e-12, atol=1e-12)


def test_grouped_query_attention_on_a_torch_without_enable_gqa(monkeypatch):
    """torch < 2.5 has no ``enable_gqa``: K/V are repeated per query head, head ``h`` on K/V ``h // G``."""
    import qkv.backends.sdpa as sdpa_mod

    flag = next(n for n in ("HAS_GQA", "_HAS_GQA") if hasattr(sdpa_mod, n))  # public once backends/ is reshaped
    monkeypatch.setattr(sdpa_mod, flag, False)
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 3, dtype=torch.float64)
    for m in (None, M.causal() & M.sliding_window(3)):
        got = qkv.attention(q, k, v, mask=m, backend="sdpa")
        for h in range(6):
            s = (q[:, h] @ k[:, h // 3].transpose(-1, -2)) / math.sqrt(8)
            if m is not None:
                s = s.masked_fill(~m.to_dense(1, 1, 5, 7)[0, 0], -math.inf)
            torch.testing.assert_close(got[:, h], torch.softmax(s, -1) @ v[:, h // 3], rtol=1e-12, atol=1e-12)


def test_dropout_applies_on_the_dense_mask_path_too():
    """With a mask (a dense mask for SDPA) dropout still drops: the mean of many runs is the exact output."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    m = M.sliding_window(3, 1)
    exact = qkv.attention(q, k, v, mask=m, backend="sdpa")
    runs = torch.stack([qkv.attention(q, k, v, mask=m, dropout_p=0.5, backend="sdpa") for _ in range(2000)])
    changed = (runs - exact).abs().amax(dim=(1, 2, 3, 4)) > 1e-3
    assert changed.float().mean() > 0.9  # nearly every run dropped something
    torch.testing.assert_close(runs.mean(0), exact, atol=0.1, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_with_grouped_heads_meets_the_rule(monkeypatch, dtype):
    """Grouped-query training in half precision: B=2, H=8, Hkv=2, 512 tokens, D=128, causal. Straight
    through PyTorch (bf16 or fp16 in, enable_gqa) dV's error is 2.7-3.6x that of the formula computed in the
    low dtype, over the rule; computed in float32 it meets it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 512, 128, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 512, 128, generator=g).to(dtype) for _ in range(2))
    torch.manual_seed(0)  # dout
    check_backend("sdpa", q, k, v, mask=M.causal())
    monkeypatch.setattr(sdpa, "upcasts", lambda req: False)
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="sdpa d[kv]"):
        check_backend("sdpa", q, k, v, mask=M.causal())


def test_only_half_precision_training_on_the_cpu_is_upcast():
    q = torch.randn(1, 4, 16, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 16, 8, dtype=torch.bfloat16)

    def req(x: torch.Tensor) -> Request:
        return Request(x, k, k, None, None, 1.0, 0.0, False)

    assert not sdpa.upcasts(req(q))  # inference stays in bf16
    assert sdpa.upcasts(req(q.clone().requires_grad_(True)))
    assert not sdpa.upcasts(Request(q.float().requires_grad_(True), k.float(), k.float(), None, None, 1.0, 0.0, False))
    out = qkv.attention(q.requires_grad_(True), k, k, mask=M.causal(), backend="sdpa")
    assert out.dtype == torch.bfloat16

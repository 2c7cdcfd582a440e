"""The contract of ``qkv.attention``: conformance of ``reference`` and ``sdpa`` with the float64 oracle
(hypothesis-drawn shapes, masks, dtypes), gradients, edge cases, and every bad input's error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qkv
from oracle import check_backend
from qkv import masks as M
from qkv import scores as S
from strategies import problems


@given(problems())
def test_reference_meets_oracle(p):
    q, k, v, mask = p
    check_backend("reference", q, k, v, mask=mask)


@given(problems())
def test_sdpa_meets_oracle(p):
    q, k, v, mask = p
    check_backend("sdpa", q, k, v, mask=mask)


@given(problems(dtypes=[torch.float32]), st.sampled_from(["alibi", "bias", "relative"]))
def test_sdpa_with_additive_score_mods(p, which):
    q, k, v, mask = p
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mod = {
        "alibi": lambda: S.alibi(H),
        "bias": lambda: S.bias(torch.randn(B, 1, Lq, Lk)),
        "relative": lambda: S.relative_bias(torch.randn(32, H)),
    }[which]()
    check_backend("sdpa", q, k, v, mask=mask, score_mod=mod)


def test_reference_agrees_with_pytorch_sdpa_math_directly():
    """An outside oracle: PyTorch's own formula with repeated K/V and a dense bool mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    m = M.sliding_window(3, 1) | M.global_tokens(1)
    dense = m.to_dense(2, 6, 9, 11)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=dense)
    torch.testing.assert_close(qkv.attention(q, k, v, mask=m, backend="reference"), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize(
    "mask",
    [None, M.causal(), M.sliding_window(2, 1), M.document([0, 0, 1, 1, 1]) & M.causal(), M.padding([2, 0])],
    ids=["none", "causal", "window", "doc-causal", "padding-with-empty-row"],
)
def test_gradcheck_float64(backend, mask):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: qkv.attention(a, b, c, mask=mask, backend=backend), (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_rows_with_nothing_to_attend_give_zeros_and_zero_gradient(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = M.padding(4, q_lengths=2)  # queries 2 and 3 see nothing
    out = qkv.attention(q, k, v, mask=mask, backend=backend)
    assert torch.equal(out[:, :, 2:], torch.zeros_like(out[:, :, 2:]))
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad[:, :, 2:], torch.zeros_like(q.grad[:, :, 2:]))
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    # fully masked via a -inf additive bias too
    bias = torch.zeros(4, 4)
    bias[1] = -math.inf
    out = qkv.attention(q, k, v, score_mod=S.bias(bias), backend=backend)
    assert torch.isfinite(out).all() and torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causal_is_bottom_right_when_lq_differs(backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    out = qkv.attention(q, k, v, mask=M.causal(), backend=backend)
    # query 0 stands at position 3: it sees keys 0..3, query 1 sees all 5
    want0 = qkv.attention(q[:, :, :1], k[:, :, :4], v[:, :, :4], backend="reference")
    want1 = qkv.attention(q[:, :, 1:], k, v, backend="reference")
    torch.testing.assert_close(out, torch.cat([want0, want1], 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_edge_cases(backend):
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 5)
    out = qkv.attention(q, k, v, backend=backend)
    assert out.shape == (1, 2, 3, 5) and not out.any()
    q0 = torch.randn(1, 2, 0, 4)
    assert qkv.attention(q0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), backend=backend).shape == (1, 2, 0, 5)
    qg = torch.randn(1, 2, 3, 4, requires_grad=True)
    qkv.attention(qg, k, v, backend=backend).sum().backward()
    assert qg.grad is not None and not qg.grad.any()
    # huge logits stay finite: 1e8 in fp32, 1e4 in bf16
    for dtype, big in ((torch.float32, 1e8), (torch.bfloat16, 1e4)):
        qh = (torch.randn(1, 2, 6, 8) * big).to(dtype)
        out = qkv.attention(qh, qh, qh.clone(), mask=M.causal(), backend=backend)
        assert torch.isfinite(out.float()).all()


def test_three_and_two_dim_inputs_follow_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 6, 8), torch.randn(3, 6, 4)
    out = qkv.attention(q, k, v)
    assert out.shape == (3, 5, 4)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert qkv.attention(q[0], k[0], v[0], return_weights=True)[1].shape == (5, 6)


def test_return_weights_sum_to_one_and_auto_takes_a_backend_that_returns_them():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8)
    out, w = qkv.attention(q, q, q, mask=M.causal(), return_weights=True)
    assert w.shape == (1, 2, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 5))
    assert not w.triu(1).any()
    with pytest.raises(NotImplementedError, match="sdpa.*does not return attention weights"):
        qkv.attention(q, q, q, backend="sdpa", return_weights=True)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_dropout_is_unbiased(backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    exact = qkv.attention(q, k, v, backend=backend)
    runs = torch.stack([qkv.attention(q, k, v, dropout_p=0.3, backend=backend) for _ in range(3000)])
    assert not torch.equal(runs[0], exact)
    torch.testing.assert_close(runs.mean(0), exact, atol=0.08, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled", "tiled-eager"])
def test_grouped_query_attention_does_not_copy_kv(monkeypatch, backend):
    """Query head ``h`` attends with K/V head ``h // G`` (against a float64 loop over heads, forward and
    backward), and no copy of K or V per query head is made: every tensor torch allocates is watched
    (``TorchDispatchMode``), and none may be larger than K or V, as a copy for ``G = 4`` heads would be."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    B, H, Hkv, Lq, Lk, D = 1, 8, 2, 3, 64, 16  # K, V: 2048 numbers each; the scores only 1536
    G = H // Hkv
    q = torch.randn(B, H, Lq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, D, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, H, Lq, D, dtype=torch.float64)
    i, j = torch.arange(Lq).view(-1, 1) + Lk - Lq, torch.arange(Lk).view(1, -1)
    allowed = (j <= i) & (j >= i - 2)  # causal() & sliding_window(2), bottom-right
    want = []
    for h in range(H):  # the oracle: one head at a time, K/V head h // G
        s = (q[:, h] @ k[:, h // G].transpose(-1, -2)) / math.sqrt(D)
        want.append(torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v[:, h // G])
    want_out = torch.stack(want, 1)
    want_grads = torch.autograd.grad(want_out, (q, k, v), dout)

    name, kw = backend, {}
    if backend == "tiled-eager":  # a zero bias sends tiled down its eager engine
        name, kw = "tiled", {"score_mod": S.bias(torch.zeros(Lq, Lk, dtype=torch.float64))}
    biggest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    biggest[0] = max(biggest[0], t.numel())
            return out

    def no_copy(*a, **k):
        raise AssertionError("K/V were repeated per head")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_copy)
    monkeypatch.setattr(torch.Tensor, "repeat", no_copy)
    with Watch():
        out = qkv.attention(q, k, v, mask=M.causal() & M.sliding_window(2), backend=name, **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert biggest[0] <= B * Hkv * Lk * D, f"a tensor of {biggest[0]} numbers: K or V copied per query head"
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_explain_and_backends():
    q = torch.randn(1, 4, 16, 8)
    assert set(qkv.BACKENDS) >= {"reference", "sdpa"}
    assert qkv.explain(q, q, q).backend in qkv.BACKENDS
    e = qkv.explain(q, q, q, score_mod=S.softcap(20.0))
    assert e.backend != "sdpa" and "sdpa" in e.declined and "softcap" in str(e)
    assert qkv.explain(q, q, q, return_weights=True).backend != "sdpa"


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
        (
            (Q, K, V),
            {"backend": "nope"},
            ValueError,
            r"unknown backend 'nope'; valid backends: auto, .*reference.*sdpa",
        ),
        ((Q, K, V), {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
        ((Q, K, V), {"dropout_p": -0.1}, ValueError, r"dropout_p"),
        ((Q, K, V), {"scale": float("nan")}, ValueError, r"scale must be a finite number"),
        ((Q, K, V), {"mask": M.document([0, 1, 1])}, ValueError, r"q_ids has length 3 but the sequence has Lq=5"),
        ((Q, K, V), {"mask": M.padding([1, 2, 3])}, ValueError, r"kv_lengths.*shape \(3,\) for batch size B=2"),
        ((Q, K, V), {"mask": M.padding([1, 7])}, ValueError, r"kv_lengths must lie in \[0, 6\]"),
        ((Q, K, V), {"mask": "causal"}, TypeError, r"mask must be a qkv.masks.Mask"),
        ((Q, K, V), {"bogus": 1}, TypeError, r"does not take the option\(s\) bogus"),
    ],
)
def test_bad_input_gets_a_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        qkv.attention(*args, **kwargs)

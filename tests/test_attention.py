"""The contract of ``qkv.attention`` beyond any one backend: the oracle against PyTorch's own formula, 2-D and
3-D inputs, weights, grouped-query heads without copies of K/V, ``explain``. What every exact backend must
meet (masks, dtypes, gradients, edge cases, bad input) is the conformance suite,
``tests/backends/test_conformance.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv import masks as M
from qkv import scores as S
from qkv.attention import _validate


def test_reference_agrees_with_pytorch_sdpa_math_directly():
    """An outside oracle: PyTorch's own formula with repeated K/V and a dense bool mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    m = M.sliding_window(3, 1) | M.global_tokens(1)
    dense = m.to_dense(2, 6, 9, 11)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=dense)
    torch.testing.assert_close(qkv.attention(q, k, v, mask=m, backend="reference"), want, atol=1e-5, rtol=0)


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


EXACT = [name for name, b in qkv.backends.registered().items() if b.exact and b.available()]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "zero-bias"])
@pytest.mark.parametrize("backend", EXACT)
def test_grouped_query_attention_does_not_copy_kv(monkeypatch, backend, bias):
    """Query head ``h`` attends with K/V head ``h // G`` (against a float64 loop over heads, forward and
    backward), and no copy of K or V per query head is made: every tensor torch allocates is watched
    (``TorchDispatchMode``), and none may be larger than K or V, as a copy for ``G = 4`` heads would be.
    Every built-in exact backend, with and without an additive bias (which sends ``tiled`` down its eager
    engine and ``sdpa`` to a dense float mask)."""
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

    kw = {"score_mod": S.bias(torch.zeros(Lq, Lk, dtype=torch.float64))} if bias else {}
    req, _ = _validate(q, k, v, M.causal() & M.sliding_window(2), kw.get("score_mod"), None, 0.0, False, {}, None)
    impl = qkv.backends.get(backend)
    why = impl.supports(req) or impl.auto_blocker(req)
    if why is not None:
        pytest.skip(f"{backend} declines: {why}")
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
        out = qkv.attention(q, k, v, mask=M.causal() & M.sliding_window(2), backend=backend, **kw)
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

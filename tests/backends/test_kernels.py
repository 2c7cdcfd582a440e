"""The kernel core (qkv.backends.kernels): spans with their logsumexp, the merge, the backward."""

from __future__ import annotations

import pytest
import torch

from qkv.backends import kernels as K

from ..oracle import oracle


def _problem():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 6)
    allowed = torch.rand(2, 1, 9, 20) > 0.5
    allowed[:, :, 3] = False  # a row that sees nothing
    allowed[:, :, 4, 7:] = False  # a row that sees nothing in the second half
    return q, k, v, allowed


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_merge_of_spans_split_keys_exactly(engine):
    q, k, v, allowed = _problem()
    mod = (lambda s: s) if engine == "eager" else None  # any score mod forces the eager engine
    a = K.span_forward(q, k[:, :, :7], v[:, :, :7], 0.3, allowed[..., :7], mod=mod)
    b = K.span_forward(q, k[:, :, 7:], v[:, :, 7:], 0.3, allowed[..., 7:], mod=mod)
    out, lse = K.merge(*a, *b)
    s = (q.double().reshape(2, 2, 2, 9, 8) @ k.double().unsqueeze(2).transpose(-1, -2)).reshape(2, 4, 9, 20) * 0.3
    s = s.masked_fill(~allowed, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    torch.testing.assert_close(lse.double(), ref_lse)
    ref = oracle(q, k, v, scale=0.3, mask=allowed)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()
    acc_o, acc_l = a[0].clone(), a[1].clone()
    K.merge_into(acc_o, acc_l, *b)
    torch.testing.assert_close(acc_o, out)
    torch.testing.assert_close(acc_l, lse)
    with pytest.raises(ValueError, match="merge"):
        K.merge(a[0], a[1], b[0][..., :3], b[1])
    with pytest.raises(ValueError, match="merge"):  # the logsumexps agree with each other, not with the outputs
        K.merge(a[0], a[1][..., :3], b[0], b[1][..., :3])


@pytest.mark.parametrize("engine", ["fused", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_span_backward_sums_to_the_exact_gradient(dtype, causal, engine, monkeypatch):
    """Per-span backward with the final output and logsumexp, summed over spans, equals autograd of
    the whole attention, on the fused CPU kernel and on the eager engine (other devices)."""
    if engine == "eager":
        monkeypatch.setattr(K, "fused_ok", lambda t: False)
    q, k, v, allowed = _problem()
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if causal:
        k, v, allowed = k[:, :, :9], v[:, :, :9], None
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = oracle(qa, ka, va, torch.ones(2, 4, 9, 6), scale=0.3, mask=allowed if not causal else torch.ones(9, 9).tril().bool())
    out, lse = K.span_forward(q, k, v, 0.3, allowed, causal)
    dout = torch.ones_like(out)
    n = k.shape[2]
    halves = [(0, n // 2), (n // 2, n)] if not causal else [(0, n)]
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for a, b in halves:
        m = None if allowed is None else allowed[..., a:b]
        gq, gk, gv = K.span_backward(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse, 0.3, m, causal)
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(dq.double(), ref[1], **tol)
    torch.testing.assert_close(torch.cat(dks, 2).double(), ref[2], **tol)
    torch.testing.assert_close(torch.cat(dvs, 2).double(), ref[3], **tol)


def test_safe_softmax_gives_zero_rows_and_zero_gradient():
    s = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]], requires_grad=True)
    p = K.safe_softmax(s)
    assert torch.equal(p[1], torch.zeros(2))
    p.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()

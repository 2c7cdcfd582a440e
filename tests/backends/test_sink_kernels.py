"""The kernel core's sink correction (``sink_forward``, ``sink_backward``), as ring attention or a flex
wrapper would use it: spans over disjoint keys, merged, corrected, and the per-span FlashAttention-2
backward given the final output and logsumexp, against autograd of the formula in float64."""

from __future__ import annotations

import pytest
import torch

from qkv.backends import kernels as K


def _formula(q, k, v, s, allowed, scale):
    B, H, Lq, _ = q.shape
    G = H // k.shape[1]
    sc = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * scale
    sc = sc.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(torch.cat((sc, s.view(1, H, 1, 1).expand(B, H, Lq, 1)), -1), -1)[..., :-1]
    return w @ v.repeat_interleave(G, 1)


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_spans_merged_then_corrected_give_the_formula_and_its_gradients(engine):
    torch.manual_seed(0)
    B, H, Hkv, Lq, Lk, D, Dv, scale = 2, 4, 2, 7, 12, 8, 6, 0.4
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, Dv)
    s = torch.randn(H)
    allowed = torch.rand(B, 1, Lq, Lk) > 0.4
    allowed[:, :, 2] = False  # a row with no key: all its weight on the sink
    mod = (lambda x: x) if engine == "eager" else None
    parts = [
        K.span_forward(q, k[:, :, a:b], v[:, :, a:b], scale, allowed[..., a:b], mod=mod) for a, b in ((0, 5), (5, 12))
    ]
    out, lse = K.merge(*parts[0], *parts[1])
    out, lse = K.sink_forward(out, lse, s)
    qd, kd, vd, sd = (t.double().requires_grad_() for t in (q, k, v, s))
    want = _formula(qd, kd, vd, sd, allowed, scale)
    torch.testing.assert_close(out.double(), want.detach(), atol=1e-6, rtol=1e-5)
    assert not out[:, :, 2].any()
    torch.testing.assert_close(lse[:, :, 2], s.view(1, H).expand(B, H))  # lse' of an empty row is the sink
    dout = torch.randn_like(out)
    want.backward(dout.double())
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b in ((0, 5), (5, 12)):
        gq, gk, gv = K.span_backward(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse, scale, allowed[..., a:b])
        dq += gq
        dk[:, :, a:b] += gk
        dv[:, :, a:b] += gv
    ds = K.sink_backward(dout, out, lse, s)
    for got, ref in ((dq, qd), (dk, kd), (dv, vd), (ds, sd)):
        assert ref.grad is not None
        torch.testing.assert_close(got.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_sink_forward_is_differentiable_and_handles_no_sink():
    torch.manual_seed(1)
    out, lse = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64)
    lse[0, 0, 1] = float("-inf")  # a row that saw no key
    out[0, 0, 1] = 0
    s = torch.tensor([0.3, float("-inf")], dtype=torch.float64)
    o2, l2 = K.sink_forward(out, lse, s)
    torch.testing.assert_close(o2[0, 1], out[0, 1])  # no sink: unchanged
    torch.testing.assert_close(l2[0, 1], lse[0, 1])
    torch.testing.assert_close(l2[0, 0], torch.logaddexp(lse[0, 0], s[0].expand(3)))
    o, l_, ss = (t.clone().requires_grad_() for t in (out, lse, torch.tensor([0.3, -2.0], dtype=torch.float64)))
    assert torch.autograd.gradcheck(lambda a, b, c: K.sink_forward(a, b, c)[0], (o, l_, ss))
    with pytest.raises(ValueError, match="sink_forward"):
        K.sink_forward(out, lse, torch.zeros(3, dtype=torch.float64))

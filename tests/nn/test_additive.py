"""AdditiveAttention and LuongAttention against the papers' formulas, computed by hand in float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from qkv import masks
from qkv.nn import AdditiveAttention, LuongAttention


def _softmax(xs: list[float], keep: list[bool]) -> list[float]:
    kept = [x for x, k in zip(xs, keep) if k]
    if not kept:
        return [0.0] * len(xs)
    m = max(kept)
    e = [math.exp(x - m) if k else 0.0 for x, k in zip(xs, keep)]
    s = sum(e)
    return [x / s for x in e]


def _hand(score_fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """Loops: for each batch b and query i, e_j = score(q_i, k_j), a = softmax(e), c = sum_j a_j v_j."""
    B, Lq, _ = q.shape
    Lk = k.shape[1]
    ctx = torch.zeros(B, Lq, v.shape[-1], dtype=torch.float64)
    wts = torch.zeros(B, Lq, Lk, dtype=torch.float64)
    for b in range(B):
        for i in range(Lq):
            e = [score_fn(q[b, i], k[b, j]) for j in range(Lk)]
            a = _softmax(e, [bool(keep[b, i, j]) for j in range(Lk)])
            for j in range(Lk):
                wts[b, i, j] = a[j]
                ctx[b, i] += a[j] * v[b, j]
    return ctx, wts


def _data(B=2, Lq=3, Lk=5, Dq=4, Dk=6, Dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Dq, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, Dv, generator=g, dtype=torch.float64)
    return q, k, v


def test_additive_matches_bahdanau_formula_with_key_mask():
    q, k, v = _data()
    att = AdditiveAttention(4, 6, 7).double()
    W, U, bU, va = (p.detach() for p in (att.W.weight, att.U.weight, att.U.bias, att.v.weight[0]))

    def score(qi, kj):
        return float(va @ torch.tanh(W @ qi + U @ kj + bU))

    key_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    ctx, w = att(q, k, v, mask=key_mask)
    keep = key_mask[:, None, :].expand(2, 3, 5)
    ctx_ref, w_ref = _hand(score, q, k, v, keep)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ctx, ctx_ref, rtol=1e-12, atol=1e-12)
    assert (w[0, :, 3:] == 0).all()
    # one decoder step: query (B, Dq) gives (B, Dv) and (B, Lk), equal to the first row
    c1, w1 = att(q[:, 0], k, v, mask=key_mask)
    torch.testing.assert_close(c1, ctx_ref[:, 0])
    torch.testing.assert_close(w1, w_ref[:, 0])
    # projected keys reused across steps give the same answer
    c2, _ = att(q, k, v, mask=key_mask, projected_keys=att.project_keys(k))
    torch.testing.assert_close(c2, ctx_ref)


@pytest.mark.parametrize("kind", ["dot", "general", "concat"])
def test_luong_matches_formula_with_qkv_mask(kind):
    Dk = 4 if kind == "dot" else 6
    q, k, v = _data(Dk=Dk, seed=1)
    att = LuongAttention(4, Dk, score=kind, hidden_dim=5).double()
    if kind == "dot":

        def score(qi, kj):
            return float(qi @ kj)
    elif kind == "general":
        Wa = att.W_a.weight.detach()  # type: ignore[union-attr]

        def score(qi, kj):
            return float(qi @ (Wa @ kj))
    else:
        Wa, va = att.W_a.weight.detach(), att.v_a.weight[0].detach()  # type: ignore[union-attr]

        def score(qi, kj):
            return float(va @ torch.tanh(Wa @ torch.cat([qi, kj])))

    m = masks.causal()  # Lq=3, Lk=5: bottom-right aligned, query i sees keys j <= i + 2
    ctx, w = att(q, k, v, mask=m)
    keep = torch.tensor([[j <= i + 2 for j in range(5)] for i in range(3)])[None].expand(2, 3, 5)
    ctx_ref, w_ref = _hand(score, q, k, v, keep)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ctx, ctx_ref, rtol=1e-12, atol=1e-12)


def test_fully_masked_row_is_zero_with_zero_grad():
    q, k, v = _data()
    q.requires_grad_(True)
    att = LuongAttention(4, 6, score="general").double()
    key_mask = torch.zeros(2, 5, dtype=torch.bool)
    key_mask[1, 0] = True
    ctx, w = att(q, k, v, mask=key_mask)
    assert (ctx[0] == 0).all() and (w[0] == 0).all()
    torch.testing.assert_close(w[1, :, 0], torch.ones(3, dtype=torch.float64))
    ctx.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and (q.grad[0] == 0).all()


def test_errors_name_argument_and_shapes():
    att = AdditiveAttention(4, 6)
    with pytest.raises(ValueError, match=r"keys.*\(2, 5\)"):
        att(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="query_dim=4"):
        att(torch.randn(2, 3), torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="mask"):
        att(torch.randn(2, 4), torch.randn(2, 5, 6), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        att(torch.randn(2, 4), torch.randn(2, 5, 6), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="score"):
        LuongAttention(4, score="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_dim == query_dim"):
        LuongAttention(4, 6, score="dot")

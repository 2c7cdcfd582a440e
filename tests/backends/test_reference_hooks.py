"""``reference``'s ``scores_hook``/``weights_hook`` options, the one seam through which the hook points of
``qkv.nn`` read and replace scores and weights: what they see (against the formula written out in
float64), what a replacement does (against independent oracles: a bias score mod, uniform weights), that
``auto`` routes a request carrying them to ``reference``, and their errors."""

from __future__ import annotations

import math

import pytest
import torch

import qkv
from qkv import masks as M
from qkv import scores as S

D64 = torch.float64


def _qkv(seed: int = 0, H: int = 4, Hkv: int = 2, Lq: int = 5, Lk: int = 7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, h, n, 8, generator=g, dtype=D64) for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))


def test_the_hooks_see_the_masked_scores_and_the_weights():
    q, k, v = _qkv()
    seen = {}
    qkv.attention(
        q, k, v, mask=M.causal(), scores_hook=lambda s: seen.setdefault("s", s), weights_hook=lambda w: seen.setdefault("w", w)
    )
    kk = k.repeat_interleave(2, 1)
    want = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
    allowed = torch.ones(5, 7, dtype=torch.bool).tril(2)  # bottom-right: query i sees keys <= i + 2
    want = want.masked_fill(~allowed, -math.inf)
    torch.testing.assert_close(seen["s"], want)
    torch.testing.assert_close(seen["w"], torch.softmax(want, -1))


def test_adding_a_bias_through_the_scores_hook_equals_the_bias_score_mod():
    q, k, v = _qkv(1)
    bias = torch.randn(2, 4, 5, 7, dtype=D64)
    got = qkv.attention(q, k, v, mask=M.sliding_window(2), scores_hook=lambda s: s + bias)
    want = qkv.attention(q, k, v, mask=M.sliding_window(2), score_mod=S.bias(bias), backend="reference")
    torch.testing.assert_close(got, want)


def test_replaced_weights_give_dropout_of_them_times_v_with_grouped_heads():
    q, k, v = _qkv(2)
    uniform = torch.full((2, 4, 5, 7), 1 / 7, dtype=D64)
    out, w = qkv.attention(q, k, v, weights_hook=lambda w: uniform, return_weights=True)
    assert torch.equal(w, uniform)  # the returned weights are the replaced ones
    torch.testing.assert_close(out, v.mean(2, keepdim=True).repeat_interleave(2, 1).expand(2, 4, 5, 8))
    # with sinks the hook sees the weights over the keys (rows sum to less than 1)
    sums = []
    qkv.attention(q, k, v, sinks=torch.zeros(4, dtype=D64), weights_hook=lambda w: sums.append(w.sum(-1)))
    assert (sums[0] < 1).all() and (sums[0] > 0).all()


def test_a_hook_that_returns_none_changes_nothing_and_auto_picks_reference():
    q, k, v = _qkv(3)
    plain = qkv.attention(q, k, v, mask=M.causal(), backend="reference")
    torch.testing.assert_close(qkv.attention(q, k, v, mask=M.causal(), scores_hook=lambda s: None), plain, rtol=0, atol=0)
    e = qkv.explain(q, k, v, weights_hook=lambda w: None)
    assert e.backend == "reference" and "does not take the option(s) weights_hook" in e.declined["sdpa"]


def test_gradients_flow_through_a_replacement():
    q, k, v = (t.requires_grad_() for t in _qkv(4))
    out = qkv.attention(q, k, v, scores_hook=lambda s: 2 * s)
    assert torch.autograd.gradcheck(lambda a, b, c: qkv.attention(a, b, c, scores_hook=lambda s: 2 * s), (q, k, v))
    want = qkv.attention(q, k, v, scale=2 / math.sqrt(8), backend="reference")
    torch.testing.assert_close(out, want)


def test_bad_hooks_get_clear_errors():
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match=r"scores_hook must return a tensor of shape \(2, 4, 5, 7\), got \(2, 4, 5, 6\)"):
        qkv.attention(q, k, v, scores_hook=lambda s: s[..., :-1])
    with pytest.raises(TypeError, match="weights_hook must return None or a tensor.*got float"):
        qkv.attention(q, k, v, weights_hook=lambda w: 1.0)
    with pytest.raises(TypeError, match="scores_hook must be a function of one tensor, got int"):
        qkv.attention(q, k, v, scores_hook=3)
    with pytest.raises(TypeError, match="backend 'sdpa' does not take the option"):
        qkv.attention(q, k, v, scores_hook=lambda s: None, backend="sdpa")

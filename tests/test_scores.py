"""Every score mod against its paper's formula, written out independently."""

from __future__ import annotations

import math

import pytest
import torch

import qkv
from qkv import masks as M
from qkv import scores as S


def plain_scores(q, k, scale=None):
    scale = scale or 1 / math.sqrt(q.shape[-1])
    return q.double() @ k.double().transpose(-1, -2) * scale


def attend(s, v):
    return torch.softmax(s, -1) @ v.double()


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(S.alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)], dtype=torch.float64))
    # not a power of two: the 4-head slopes, then every other slope of the 8-head list
    want6 = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert torch.allclose(S.alibi_slopes(6), torch.tensor(want6, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_heads"):
        S.alibi_slopes(0)


@pytest.mark.parametrize("Lq,Lk", [(6, 6), (3, 7)])
def test_alibi_matches_formula(Lq, Lk):
    torch.manual_seed(0)
    H = 4
    q, k, v = torch.randn(2, H, Lq, 8), torch.randn(2, H, Lk, 8), torch.randn(2, H, Lk, 5)
    slopes = [2.0 ** (-8 * (h + 1) / H) for h in range(H)]
    s = plain_scores(q, k)
    for h in range(H):
        for i in range(Lq):
            for j in range(Lk):
                s[:, h, i, j] += slopes[h] * (j - (i + Lk - Lq))
                if j > i + Lk - Lq:
                    s[:, h, i, j] = -math.inf
    want = attend(s, v)
    for backend in ("reference", "sdpa"):
        got = qkv.attention(q, k, v, mask=M.causal(), score_mod=S.alibi(H), backend=backend)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_alibi_slopes_equal_bloom_for_every_head_count():
    """An outside oracle: Hugging Face's BLOOM builds its ALiBi from the same recipe (1 to 20 heads)."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for n in range(1, 21):
        ref = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]  # slope * position 1
        torch.testing.assert_close(S.alibi_slopes(n).float(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("Lq,Lk", [(6, 6), (3, 7)])
def test_symmetric_alibi_matches_formula(Lq, Lk):
    """``-slope * |j - p|`` with ``p = i + Lk - Lq``: no mask, so every key's distance counts."""
    torch.manual_seed(0)
    H = 4
    q, k, v = torch.randn(2, H, Lq, 8), torch.randn(2, H, Lk, 8), torch.randn(2, H, Lk, 5)
    slopes = [2.0 ** (-8 * (h + 1) / H) for h in range(H)]
    s = plain_scores(q, k)
    for h in range(H):
        for i in range(Lq):
            for j in range(Lk):
                s[:, h, i, j] -= slopes[h] * abs(j - (i + Lk - Lq))
    want = attend(s, v)
    mod = S.alibi(H, symmetric=True)
    assert mod.name == "alibi(4)"
    for backend in ("reference", "sdpa", "tiled"):
        got = qkv.attention(q, k, v, score_mod=mod, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_softcap_matches_formula_and_keeps_huge_scores_finite():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4) * 30, torch.randn(1, 2, 5, 4) * 30, torch.randn(1, 2, 5, 3)
    want = attend(20.0 * torch.tanh(plain_scores(q, k) / 20.0), v)
    got = qkv.attention(q, k, v, score_mod=S.softcap(20.0))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="cap"):
            S.softcap(bad)


def test_relative_bias_buckets_equal_t5():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300).view(1, -1)
    for bidirectional in (True, False):
        want = t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
        )
        got = S.t5_relative_bucket(rel, 32, 128, bidirectional)
        assert torch.equal(got, want)


def test_relative_bias_adds_table_entries_and_trains():
    torch.manual_seed(0)
    H, Lq, Lk = 3, 4, 6
    table = torch.randn(32, H, dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(1, H, n, 8, dtype=torch.float64) for n in (Lq, Lk, Lk))
    rel = torch.arange(Lk).view(1, -1) - (torch.arange(Lq).view(-1, 1) + Lk - Lq)
    bucket = S.t5_relative_bucket(rel, 32, 128, True)
    want = attend(plain_scores(q, k) + table[bucket].permute(2, 0, 1).unsqueeze(0), v)
    got = qkv.attention(q, k, v, score_mod=S.relative_bias(table))
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_bias_is_additive_and_gradients_reach_it(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    b = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    got = qkv.attention(q, k, v, score_mod=S.bias(b), backend=backend)
    want = attend(plain_scores(q, k) + b, v)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), b)
    (g_want,) = torch.autograd.grad(want.sum(), b)
    torch.testing.assert_close(g_got, g_want)
    with pytest.raises(TypeError, match="floating-point"):
        S.bias(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not broadcast"):
        qkv.attention(q, k, v, score_mod=S.bias(torch.zeros(3, 5, 5)))


def test_compose_applies_in_order_and_bare_functions_work():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 4) for _ in range(3))
    H = 2

    def add_one(score, b, h, q_idx, kv_idx):  # FlexAttention signature
        return score + (q_idx == kv_idx).to(score.dtype)

    mod = S.compose(S.alibi(H), add_one, S.softcap(3.0))
    s = plain_scores(q, k)
    slopes = S.alibi_slopes(H).view(1, H, 1, 1)
    rel = (torch.arange(4).view(1, -1) - torch.arange(4).view(-1, 1)).double()
    s = 3.0 * torch.tanh((s + slopes * rel + torch.eye(4, dtype=torch.float64)) / 3.0)
    torch.testing.assert_close(qkv.attention(q, k, v, score_mod=mod).double(), attend(s, v), atol=1e-5, rtol=0)
    assert S.alibi(H).then(S.softcap(3.0)).name == "alibi(2) -> softcap(3)"
    assert not mod.additive and S.compose(S.alibi(H), S.bias(torch.zeros(4, 4))).additive
    with pytest.raises(TypeError, match="score_mod must be"):
        qkv.attention(q, k, v, score_mod=3)  # type: ignore[arg-type]


def test_alibi_head_count_must_match():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="alibi: built for 8 heads but q has H=4"):
        qkv.attention(q, q, q, score_mod=S.alibi(8))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_score_mod_runs_in_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))
    mod = S.compose(S.alibi(4), S.softcap(5.0))
    m = M.causal() & M.sliding_window(5)
    want = qkv.attention(q, k, v, mask=m, score_mod=mod, backend="reference")
    block_mask = m.to_flex_block_mask(1, 4, 16, 16, BLOCK_SIZE=16)
    got = flex.flex_attention(q, k, v, score_mod=mod.score_mod(16, 16), block_mask=block_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

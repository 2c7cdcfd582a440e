"""DifferentialAttention against the paper's equations (Ye et al. 2024) written out here in float64,
head by head: two softmax maps subtracted with the re-parameterised lambda, per-head RMSNorm and the
(1 - lambda_init) scale."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.masks import causal, sliding_window
from qkv.models import GPT
from qkv.nn import DifferentialAttention, FixedKVCache, RotaryEmbedding
from qkv.nn.differential import lambda_init_for

D64 = torch.float64


def naive(m: DifferentialAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The equations of section 2.1, one head at a time; ``allowed (L, L)`` is the mask."""
    B, L, E = x.shape
    h, kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    Wq = m.q_proj.weight.view(h, 2, d, E)
    Wk = m.k_proj.weight.view(kv, 2, d, E)
    Wv = m.v_proj.weight.view(kv, 2 * d, E)
    lam = math.exp((m.lambda_q1 @ m.lambda_k1).item()) - math.exp((m.lambda_q2 @ m.lambda_k2).item()) + m.lambda_init
    heads = []
    for i in range(h):
        j = i // (h // kv)  # the key/value head of head i (grouped-query)
        Q1, Q2 = x @ Wq[i, 0].T, x @ Wq[i, 1].T
        K1, K2 = x @ Wk[j, 0].T, x @ Wk[j, 1].T
        if m.rope is not None:  # RoPE on each (B, 1, L, d) half at positions 0..L-1
            Q1, K1, Q2, K2 = (m.rope.rotate(t[:, None])[:, 0] for t in (Q1, K1, Q2, K2))
        V = x @ Wv[j].T

        def softmax(Q, K):
            s = (Q @ K.transpose(-1, -2)) / math.sqrt(d)
            return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)

        a = (softmax(Q1, K1) - lam * softmax(Q2, K2)) @ V  # (B, L, 2d)
        g = m.subln.weight
        rms = torch.sqrt((a * a).mean(-1, keepdim=True) + 1e-5)
        heads.append((1 - m.lambda_init) * a / rms * g)
    return (torch.cat(heads, -1) @ m.out_proj.weight.T).detach()


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("mask", ["causal", "window", None])
def test_matches_the_papers_equations(kv, rope, mask):
    torch.manual_seed(0)
    m = DifferentialAttention(32, 4, num_kv_heads=kv, depth=3, rope=rope).double()
    with torch.no_grad():
        m.subln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 32, dtype=D64)
    mk = {None: None, "causal": causal(), "window": causal() & sliding_window(2)}[mask]
    i, j = torch.arange(9).view(-1, 1), torch.arange(9).view(1, -1)
    allowed = {None: torch.ones(9, 9, dtype=torch.bool), "causal": j <= i, "window": (j <= i) & (j >= i - 2)}[mask]
    torch.testing.assert_close(m(x, mask=mk), naive(m, x, allowed), rtol=1e-10, atol=1e-10)


def test_lambda_init_and_gradients_reach_lambda():
    assert lambda_init_for(0) == pytest.approx(0.2) and lambda_init_for(100) == pytest.approx(0.8)
    assert DifferentialAttention(16, 2, depth=2).lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.6))
    assert DifferentialAttention(16, 2, lambda_init=0.5).lambda_init == 0.5
    m = DifferentialAttention(16, 2)
    m(torch.randn(1, 5, 16), mask=causal()).square().sum().backward()
    for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2, m.subln.weight, m.q_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="2 \\* num_heads=6 must divide"):
        DifferentialAttention(16, 3)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        DifferentialAttention(24, 2, num_kv_heads=3)


def test_decoding_with_a_cache_equals_the_whole_sequence():
    torch.manual_seed(1)
    m = DifferentialAttention(32, 4, num_kv_heads=2, rope=RotaryEmbedding(4)).double().eval()
    x = torch.randn(2, 10, 32, dtype=D64)
    cache = FixedKVCache(10)
    with torch.no_grad():
        steps = [m(x[:, :4], mask=causal(), cache=cache)] + [
            m(x[:, t : t + 1], mask=causal(), cache=cache) for t in range(4, 10)
        ]
        torch.testing.assert_close(torch.cat(steps, 1), m(x, mask=causal()), rtol=1e-10, atol=1e-10)


def test_a_gpt_of_differential_layers_trains_and_generates():
    torch.manual_seed(2)
    g = GPT(40, 32, 2, 2, max_len=32, mixer_factory=lambda i: DifferentialAttention(32, 2, depth=i, rope=True))
    ids = torch.randint(0, 40, (2, 12))
    loss = torch.nn.functional.cross_entropy(g(ids[:, :-1]).reshape(-1, 40), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in g.parameters() if p.requires_grad)
    a = g.generate(ids[:, :3], 8, temperature=0)
    b = g.generate(ids[:, :3], 8, temperature=0, use_cache=False)
    assert torch.equal(a, b)

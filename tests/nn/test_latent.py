"""LatentAttention (MLA, DeepSeek-V2) against the paper's equations (9)-(19) written out here in float64
(RoPE included), its absorbed decoding against the expanded form (same outputs, same greedy tokens), and
its cache: only [c_KV, k_R] per token."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.masks import causal, sliding_window
from qkv.models import GPT
from qkv.nn import FixedKVCache, LatentAttention, LatentKVCache, MultiHeadAttention

D64 = torch.float64


def rope(x, positions, base=10000.0):
    """RoPE on the last dim (pairs (i, i + n/2), as GPT-NeoX/Llama and qkv), at integer ``positions``."""
    n = x.shape[-1]
    theta = base ** (-torch.arange(0, n, 2, dtype=D64) / n)
    a = positions.to(D64)[:, None] * theta[None]  # (L, n/2)
    cos, sin = torch.cat((a.cos(), a.cos()), -1), torch.cat((a.sin(), a.sin()), -1)
    rot = torch.cat((-x[..., n // 2 :], x[..., : n // 2]), -1)
    return x * cos + rot * sin


def rms(x, g, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def naive(m: LatentAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Eqs. (9)-(19) of DeepSeek-V2, head by head (plus the released models' latent RMSNorm)."""
    B, L, _ = x.shape
    h, d, dr, dv = m.num_heads, m.head_dim, m.rope_dim, m.v_head_dim
    pos = torch.arange(L)
    c_kv = x @ m.kv_down.weight.T  # (9)
    c_q = x @ m.q_down.weight.T if m.q_down is not None else x  # (12)
    if isinstance(m.kv_norm, torch.nn.RMSNorm):
        c_kv = rms(c_kv, m.kv_norm.weight)
    if m.q_down is not None and isinstance(m.q_norm, torch.nn.RMSNorm):
        c_q = rms(c_q, m.q_norm.weight)
    k_r = rope(x @ m.k_rope.weight.T, pos)  # (15): one RoPE key for every head
    Wuk, Wuv = m.k_up.weight.view(h, d, -1), m.v_up.weight.view(h, dv, -1)
    Wuq, Wqr = m.q_up.weight.view(h, d, -1), m.q_rope.weight.view(h, dr, -1)
    outs = []
    for i in range(h):
        k_c, v_c = c_kv @ Wuk[i].T, c_kv @ Wuv[i].T  # (10), (11)
        q_c, q_r = c_q @ Wuq[i].T, rope(c_q @ Wqr[i].T, pos)  # (13), (14)
        q, k = torch.cat((q_c, q_r), -1), torch.cat((k_c, k_r), -1)  # (16), (17)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d + dr)
        outs.append(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v_c)  # (18)
    return (torch.cat(outs, -1) @ m.out_proj.weight.T).detach()  # (19)


def _mla(q_latent=16, norm=True, **kw):
    torch.manual_seed(0)
    return LatentAttention(
        32, 4, kv_latent_dim=12, q_latent_dim=q_latent, head_dim=6, rope_dim=4, latent_norm=norm, **kw
    )


@pytest.mark.parametrize("q_latent", [16, None])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("mask", ["causal", "window"])
def test_matches_the_papers_equations(q_latent, norm, mask):
    m = _mla(q_latent, norm, v_head_dim=5).double()
    for p in m.parameters():  # non-trivial norm gains
        if p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    x = torch.randn(2, 9, 32, dtype=D64)
    mk = causal() if mask == "causal" else causal() & sliding_window(3)
    i, j = torch.arange(9).view(-1, 1), torch.arange(9).view(1, -1)
    allowed = (j <= i) if mask == "causal" else (j <= i) & (j >= i - 3)
    want = naive(m, x, allowed)
    torch.testing.assert_close(m(x, mask=mk), want, rtol=1e-10, atol=1e-10)
    # decoding on the cached latents, absorbed and expanded, gives the same outputs
    for absorb in (True, False):
        m.absorb = absorb
        cache = LatentKVCache(9)
        with torch.no_grad():
            steps = [m(x[:, :3], mask=mk, cache=cache)] + [
                m(x[:, t : t + 1], mask=mk, cache=cache) for t in range(3, 9)
            ]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-10, atol=1e-10)


def test_absorbed_decoding_gives_the_same_tokens_as_the_expanded_form():
    torch.manual_seed(1)
    g = GPT(50, 32, 2, 4, max_len=64, mixer_factory=lambda i: _mla(None if i else 16))
    prompt = torch.randint(0, 50, (2, 5))
    absorbed = g.generate(prompt, 40, temperature=0)
    for blk in g.blocks:
        blk.mixer.absorb = False
    expanded = g.generate(prompt, 40, temperature=0)
    uncached = g.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(absorbed, expanded) and torch.equal(absorbed, uncached)


def test_the_cache_holds_only_the_latent_and_the_rope_key():
    torch.manual_seed(2)
    E, H, d = 64, 8, 8
    x = torch.randn(1, 10, E)
    mla = LatentAttention(E, H, kv_latent_dim=4 * d, rope_dim=d // 2).eval()
    mha = MultiHeadAttention(E, H).eval()
    gqa = MultiHeadAttention(E, H, num_kv_heads=2).eval()
    lc, fc, gc = LatentKVCache(10), FixedKVCache(10), FixedKVCache(10)
    with torch.no_grad():
        mla(x, mask=causal(), cache=lc)
        mha(x, mask=causal(), cache=fc)
        gqa(x, mask=causal(), cache=gc)
    assert lc.latent is not None and lc.latent.shape == (1, 10, 4 * d + d // 2)
    assert lc.nbytes_per_token() == (4 * d + d // 2) * 4 == 144
    per_token = lambda c: (c.k.nbytes + c.v.nbytes) // c.max_len  # noqa: E731
    assert per_token(fc) == 2 * H * d * 4 == 512 and per_token(gc) == 2 * 2 * d * 4 == 128


def test_training_reaches_every_weight_and_bad_arguments_are_refused():
    m = _mla()
    m(torch.randn(2, 5, 32), mask=causal()).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match="rope_dim must be even"):
        LatentAttention(32, 4, kv_latent_dim=8, rope_dim=3)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="exceed max_len=4"):
        with torch.no_grad():
            m(torch.randn(1, 5, 32), cache=LatentKVCache(4))

"""Positional encodings against their papers' formulas, computed directly."""

from __future__ import annotations

import math

import pytest
import torch

import qkv
from qkv.masks import causal
from qkv.nn import (
    ALiBi,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
)
from qkv.scores import t5_relative_bucket

D64 = torch.float64


def test_sinusoidal_is_vaswanis_formula() -> None:
    dim, n = 10, 23
    pe = SinusoidalPositionalEncoding(dim, max_len=50)
    x = torch.zeros(1, n, dim)
    got = pe(x, offset=4)[0]
    for p in range(n):
        for i in range(dim // 2):
            angle = (p + 4) / 10000 ** (2 * i / dim)
            assert got[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert got[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        pe(torch.zeros(1, 60, dim))


def test_learned_adds_the_row_of_each_position() -> None:
    pe = LearnedPositionalEmbedding(12, 4)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(pe(x, offset=3), x + pe.weight[3:8])
    with pytest.raises(ValueError, match="x must be"):
        pe(torch.randn(2, 5, 3))


def _rotation_matrix(dim: int, m: float, base: float) -> torch.Tensor:
    """RoFormer eq. (15): block-diagonal ``R_{Theta,m}`` with 2x2 rotations by ``m * theta_i`` on
    channel pairs ``(2i, 2i+1)``, ``theta_i = base^(-2i/dim)``."""
    R = torch.zeros(dim, dim, dtype=D64)
    for i in range(dim // 2):
        a = m * base ** (-2 * i / dim)
        R[2 * i, 2 * i], R[2 * i, 2 * i + 1] = math.cos(a), -math.sin(a)
        R[2 * i + 1, 2 * i], R[2 * i + 1, 2 * i + 1] = math.sin(a), math.cos(a)
    return R


@pytest.mark.parametrize(
    ("scaling", "pos_factor", "base"),
    [(None, 1.0, 10000.0), (("linear", 4.0), 0.25, 10000.0), (("ntk", 4.0), 1.0, 10000.0 * 4.0 ** (8 / 6))],
)
def test_rope_is_the_rotation_matrix(scaling: tuple[str, float] | None, pos_factor: float, base: float) -> None:
    dim, L = 8, 6
    rope_i = RotaryEmbedding(dim, scaling=scaling, interleaved=True)
    rope_h = RotaryEmbedding(dim, scaling=scaling)
    x = torch.randn(2, 3, L, dim, dtype=D64)
    want = torch.stack([x[:, :, p] @ _rotation_matrix(dim, (p + 5) * pos_factor, base).T for p in range(L)], dim=2)
    torch.testing.assert_close(rope_i.rotate(x, 5), want, rtol=1e-5, atol=1e-5)
    # the half-split layout is the same rotation on channels permuted (0, 2, 4, .., 1, 3, ..)
    perm = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
    torch.testing.assert_close(rope_h.rotate(x[..., perm], 5), want[..., perm], rtol=1e-5, atol=1e-5)
    # positions given as a tensor mean the same as the offset
    torch.testing.assert_close(rope_h.rotate(x, torch.arange(5, 5 + L)), rope_h.rotate(x, 5))


def test_rope_scores_depend_on_relative_position_only() -> None:
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=D64), torch.randn(1, 1, 1, 16, dtype=D64)
    s1 = (rope.rotate(q, 7) * rope.rotate(k, 3)).sum()
    s2 = (rope.rotate(q, 104) * rope.rotate(k, 100)).sum()
    assert s1.item() == pytest.approx(s2.item(), rel=1e-4)


def test_rope_partial_dim_leaves_the_rest() -> None:
    rope = RotaryEmbedding(4)
    x = torch.randn(1, 2, 3, 8)
    y = rope.rotate(x, 2)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_alibi_bias_is_the_papers_formula() -> None:
    """Press et al.: H=8 slopes are 1/2, 1/4, ..., 1/256; bias = slope * (j - i) for keys j <= i."""
    H, L, d = 8, 6, 4
    mod = ALiBi(H).score_mod()
    q, k, v = (torch.randn(1, H, L, d, dtype=D64) for _ in range(3))
    got = qkv.attention(q, k, v, mask=causal(), score_mod=mod, backend="reference")
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(H)], dtype=D64)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    bias = slopes[:, None, None] * (j - i)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d) + bias
    s = s.masked_fill(j > i, float("-inf"))
    torch.testing.assert_close(got, s.softmax(-1) @ v, rtol=1e-10, atol=1e-10)


def test_t5_relative_bias_learns_through_the_table() -> None:
    H, L = 2, 5
    t5 = T5RelativeBias(H, num_buckets=8, max_distance=16).double()
    m = MultiHeadAttention(8, H).double()
    x = torch.randn(1, L, 8, dtype=D64)
    out = m(x, score_mod=t5.score_mod())
    out.sum().backward()
    assert t5.weight.grad is not None and t5.weight.grad.abs().sum() > 0
    # against adding the looked-up table as a bias by hand
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    table = t5.weight.detach()[t5_relative_bucket(rel, 8, 16, True)].permute(2, 0, 1)
    with torch.no_grad():
        want = m(x, score_mod=qkv.scores.bias(table))
        torch.testing.assert_close(m(x, score_mod=t5.score_mod()), want)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="scaling"):
        RotaryEmbedding(8, scaling=("yarn", 2.0))
    with pytest.raises(ValueError, match="D >= 8"):
        RotaryEmbedding(8).rotate(torch.randn(1, 1, 2, 4))

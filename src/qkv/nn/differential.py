"""Differential attention (Ye et al. 2024, "Differential Transformer"): the difference of two softmax
maps, which cancels the attention both maps give to irrelevant context (common-mode noise)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..masks import MaskLike, as_mask
from ..scores import ScoreMod, ScoreModFn, as_score_mod
from .base import AttentionModule
from .cache import KVCache, at_positions
from .positional import RotaryEmbedding

__all__ = ["DifferentialAttention", "lambda_init_for"]


def lambda_init_for(depth: int) -> float:
    """The paper's ``lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))`` for layer ``l = depth + 1`` (``depth``
    counts from 0, as in the authors' code)."""
    if depth < 0:
        raise ValueError(f"lambda_init_for: depth must be >= 0, got {depth}")
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DifferentialAttention(AttentionModule):
    """Multi-head differential attention (Ye et al. 2024), each softmax computed by :func:`qkv.attention`.

    Per head ``i``, with ``d = embed_dim / (2 num_heads)``::

        [Q1; Q2] = X W_Q^i,  [K1; K2] = X W_K^i,  V = X W_V^i         (Q*, K*: d wide; V: 2d wide)
        DiffAttn = (softmax(Q1 K1ᵀ / sqrt(d)) - lambda softmax(Q2 K2ᵀ / sqrt(d))) V
        lambda   = exp(lambda_q1 · lambda_k1) - exp(lambda_q2 · lambda_k2) + lambda_init
        head_i   = (1 - lambda_init) · RMSNorm(DiffAttn)                 (per head, over 2d)
        out      = [head_1, ..., head_h] W_O

    ``lambda`` is re-parameterised by four learned ``(d,)`` vectors shared by the heads of the layer
    (initialised ``N(0, 0.1)``) and ``lambda_init`` depends on the layer's depth (:func:`lambda_init_for`).
    Masks and score mods see ``num_heads`` heads (both maps of a head use them); each call of
    ``qkv.attention`` is one of the two maps, so :func:`qkv.nn.capture_weights` records two maps per layer.

    Args:
        embed_dim: model width ``E``; ``2 * num_heads`` must divide it.
        num_heads: differential heads ``h``.
        num_kv_heads: key/value heads (grouped-query; must divide ``num_heads``); default ``num_heads``.
        depth: the layer's index from 0 (sets ``lambda_init``); or give ``lambda_init`` directly.
        lambda_init: overrides the depth rule.
        rope: a :class:`RotaryEmbedding` over ``d`` (or ``True``), applied to both query/key halves.
        bias: biases in the projections (the paper's code has none).

    The projections are named ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; ``q_proj``'s output is
    laid out per head as ``[Q1 | Q2]``, and ``k_proj``'s likewise, as in the authors' code.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        depth: int = 0,
        lambda_init: float | None = None,
        rope: RotaryEmbedding | bool | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % (2 * num_heads):
            raise ValueError(f"DifferentialAttention: 2 * num_heads={2 * num_heads} must divide embed_dim={embed_dim}")
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if kv < 1 or num_heads % kv:
            raise ValueError(f"DifferentialAttention: num_kv_heads={kv} must be >= 1 and divide num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv
        self.head_dim = d = embed_dim // num_heads // 2
        self.lambda_init = lambda_init_for(depth) if lambda_init is None else float(lambda_init)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv * 2 * d, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv * 2 * d, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.lambda_q1 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(d) * 0.1)
        self.subln = nn.RMSNorm(2 * d, eps=1e-5)
        if rope is True:
            rope = RotaryEmbedding(d)
        elif rope is False:
            rope = None
        if rope is not None and (not isinstance(rope, RotaryEmbedding) or rope.dim > d):
            raise ValueError(f"DifferentialAttention: rope must be a RotaryEmbedding with dim <= head_dim={d}")
        self.rope: RotaryEmbedding | None = rope

    def lam(self) -> Tensor:
        """The scalar ``lambda`` (differentiable)."""
        l1 = torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
        l2 = torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
        return l1 - l2 + self.lambda_init

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Self-attention of ``x (B, L, embed_dim)`` -> ``(B, L, embed_dim)``.

        ``mask`` and ``score_mod`` as for :class:`MultiHeadAttention` (over ``num_heads`` heads); ``cache``
        a :class:`KVCache` for decoding (it holds ``[K1 | K2]`` and ``V`` per key/value head)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"DifferentialAttention: x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, h, 2, d).permute(3, 0, 2, 1, 4)  # (2, B, h, L, d)
        k = self.k_proj(x).view(B, L, kv, 2, d).permute(3, 0, 2, 1, 4)
        v = self.v_proj(x).view(B, L, kv, 2 * d).transpose(1, 2)  # (B, kv, L, 2d)
        q1, q2, k1, k2 = q[0], q[1], k[0], k[1]
        if self.rope is not None:
            offset = cache.seen if cache is not None else 0
            q1, k1 = self.rope(q1, k1, offset)
            q2, k2 = self.rope(q2, k2, offset)
        if cache is not None:
            seen = cache.seen
            kc, v, positions = cache.update(torch.cat((k1, k2), -1), v)
            k1, k2 = kc[..., :d], kc[..., d:]
            m, sm = as_mask(mask), as_score_mod(score_mod)
            if positions is not None and (m is not None or sm is not None):
                m, sm = at_positions(m, sm, B, h, L, positions, seen + L)
            mask, score_mod = m, sm
        a1 = self.attend(q1, k1, v, mask=mask, score_mod=score_mod)
        a2 = self.attend(q2, k2, v, mask=mask, score_mod=score_mod)
        heads = self.subln(a1 - self.lam() * a2) * (1.0 - self.lambda_init)  # (B, h, L, 2d)
        return self.out_proj(heads.transpose(1, 2).reshape(B, L, self.embed_dim))

    def init_cache(self, max_len: int) -> KVCache:
        """A decoding cache for :class:`qkv.models.GPT`'s ``mixer_factory`` (``max_len`` tokens)."""
        from .cache import FixedKVCache

        return FixedKVCache(max_len)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads},"
            f" head_dim={self.head_dim}, lambda_init={self.lambda_init:.3f}, rope={self.rope is not None}"
        )

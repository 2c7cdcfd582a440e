"""Linformer self-attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the sequence to ``k`` rows by learned matrices ``E, F (k, max_len)``::

    out = softmax(q (E kᵀ)ᵀ · scale) (F v)          # (L, k) scores instead of (L, L)

then attended exactly through :func:`qkv.attention`, so the cost is ``O(L · k · D)``. Because ``E`` and
``F`` mix all positions the layer has no causal form, and it needs ``L <= max_len`` (sequences shorter
than ``max_len`` use the first ``L`` columns of ``E`` and ``F``). There is deliberately no ``linformer``
backend: with untrained (random) ``E, F`` the result is not an approximation of softmax attention;
Linformer's projections are learned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import MaskLike
from ..scores import ScoreMod, ScoreModFn
from .base import AttentionModule

__all__ = ["LinformerSelfAttention"]


class LinformerSelfAttention(AttentionModule):
    """Multi-head Linformer self-attention, ``(B, L, E) -> (B, L, E)`` for ``L <= max_len``.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads (must divide ``E``).
        max_len: the longest sequence the projections cover.
        k: projected length (rows of ``E`` and ``F``).
        share_kv: one matrix for keys and values (``E = F``), as in the paper's "key-value sharing".
        bias: biases of the q/k/v/out projections.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, max_len: int, k: int = 64, *, share_kv: bool = False, bias: bool = True
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"LinformerSelfAttention: num_heads={num_heads} must be >= 1 and divide embed_dim={embed_dim}"
            )
        if max_len < 1 or k < 1:
            raise ValueError(f"LinformerSelfAttention: max_len and k must be >= 1, got max_len={max_len}, k={k}")
        self.embed_dim, self.num_heads, self.head_dim, self.max_len = (
            embed_dim,
            num_heads,
            embed_dim // num_heads,
            max_len,
        )
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.E = nn.Parameter(torch.randn(k, max_len) / math.sqrt(k))
        self.F: nn.Parameter | None = None if share_kv else nn.Parameter(torch.randn(k, max_len) / math.sqrt(k))

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: Any = None,
    ) -> Tensor:
        """``x (B, L, E) -> (B, L, E)``. ``mask``, ``score_mod`` and ``cache`` must be ``None`` (the
        projected keys are mixtures of positions, which no positional mask can address)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"LinformerSelfAttention: x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if L > self.max_len:
            raise ValueError(f"LinformerSelfAttention: sequence length {L} exceeds max_len={self.max_len}")
        if mask is not None or score_mod is not None or cache is not None:
            raise ValueError("LinformerSelfAttention: takes no mask, score_mod or cache (it has no causal form)")
        H, Dh = self.num_heads, self.head_dim
        q, k, v = (p(x).view(B, L, H, Dh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        e = self.E[:, :L]
        f = e if self.F is None else self.F[:, :L]
        out = self.attend(q, e @ k, f @ v)  # (k, L) @ (B, H, L, Dh) -> (B, H, k, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

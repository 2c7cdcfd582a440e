"""Minimal pre-norm transformer pieces used by ViT, the demo's Transformer and the ``qkv train`` tasks.

Attention goes through :class:`qkv.nn.AttentionModule`, so ``qkv.nn.set_backend`` and
``qkv.nn.capture_weights`` work on every model built from these blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..masks import MaskLike
from ..nn.base import AttentionModule

__all__ = ["Attention", "Block"]


class Attention(AttentionModule):
    """Multi-head attention on ``(B, L, E)`` tensors through :func:`qkv.attention`.

    Args:
        dim: ``E``, the model width; must be divisible by ``heads``.
        heads: number of heads ``H``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: MaskLike | None = None) -> Tensor:
        """``x`` ``(B, Lq, E)`` attends over ``context`` ``(B, Lk, E)`` (default: ``x``); ``mask`` as in
        :func:`qkv.attention` (a bool tensor broadcastable to ``(B, H, Lq, Lk)`` or a Mask). Returns ``(B, Lq, E)``."""
        ctx = x if context is None else context
        B, Lq, E = x.shape
        Lk = ctx.shape[1]
        h = self.heads
        q = self.q(x).view(B, Lq, h, E // h).transpose(1, 2)
        k, v = self.kv(ctx).view(B, Lk, 2, h, E // h).permute(2, 0, 3, 1, 4)
        o = self.attend(q, k, v, mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, Lq, E))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, GELU feed-forward.

    Args:
        dim: model width ``E``.
        heads: attention heads.
        ff: hidden width of the feed-forward (default ``4 * dim``).
        cross: add a cross-attention sub-layer over ``memory``.
        dropout: dropout after each sub-layer.
    """

    def __init__(self, dim: int, heads: int, ff: int | None = None, *, cross: bool = False, dropout: float = 0.0):
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross: Attention | None = Attention(dim, heads) if cross else None
        self.nc = nn.LayerNorm(dim) if cross else None
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ff or 4 * dim), nn.GELU(), nn.Linear(ff or 4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        memory: Tensor | None = None,
        memory_mask: MaskLike | None = None,
    ) -> Tensor:
        """``x`` ``(B, L, E)``; ``memory`` ``(B, Lm, E)`` for the cross-attention. Returns ``(B, L, E)``."""
        x = x + self.drop(self.attn(self.n1(x), mask=mask))
        if self.cross is not None and self.nc is not None:
            if memory is None:
                raise ValueError("Block: a block with cross=True needs memory (B, Lm, E)")
            x = x + self.drop(self.cross(self.nc(x), memory, mask=memory_mask))
        return x + self.drop(self.mlp(self.n2(x)))

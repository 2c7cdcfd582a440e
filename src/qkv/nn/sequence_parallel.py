"""A multi-head self-attention layer whose input is this rank's shard of a sequence split over ranks."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..backends.seqpar import check_layout
from ..masks import Mask
from .base import AttentionModule

__all__ = ["SequenceParallelAttention"]


class SequenceParallelAttention(AttentionModule):
    """Multi-head (grouped-query) self-attention over local sequence shards: ring or Ulysses.

    Every rank of ``group`` holds the same weights and passes ``x (B, n, E)``, its ``n`` tokens of a
    sequence of ``n * world`` tokens split by ``layout``; the output is the same layer applied to the
    whole sequence, restricted to those tokens.

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``H`` (``E % H == 0``).
        num_kv_heads: key/value heads ``Hkv`` (``H % Hkv == 0``); defaults to ``H``.
        strategy: ``"ring"`` (K/V blocks around the ring) or ``"ulysses"`` (all-to-all over heads,
            needs ``H`` divisible by the group size).
        layout: ``"zigzag"`` (default, balanced under causal masks) or ``"contiguous"``.
        group: the ``torch.distributed`` process group (``None`` = default).
        bias: whether the projections have biases.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        strategy: str = "ring",
        layout: str = "zigzag",
        group: Any = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} (>= 1)")
        if kv < 1 or num_heads % kv:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv} (>= 1)")
        if strategy not in ("ring", "ulysses"):
            raise ValueError(f"strategy must be 'ring' or 'ulysses', got {strategy!r}")
        check_layout(layout)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv
        self.head_dim = embed_dim // num_heads
        self.backend = strategy
        self.layout, self.group = layout, group
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv_proj = nn.Linear(embed_dim, 2 * kv * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, mask: Mask | None = None) -> Tensor:
        """``x (B, n, E)``, this rank's tokens -> ``(B, n, E)``. ``mask`` on global positions
        (``qkv.masks.causal()`` for a decoder; ``document`` takes the local ids)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, n, E={self.embed_dim}), got shape {tuple(x.shape)}")
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, n, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, mask=mask, group=self.group, layout=self.layout)
        return self.out_proj(out.transpose(1, 2).reshape(B, n, self.embed_dim))

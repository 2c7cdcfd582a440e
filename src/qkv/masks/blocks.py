"""Block-sparse masks: :func:`block_sparse` (a layout of blocks that may meet) and :func:`random_blocks`
(BigBird's random key blocks, seeded).

Tiles are classified from the layout by 2-D prefix sums over it: exact when the tiles are the layout's
blocks, conservative otherwise, and never from ``Lq x Lk`` elements.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
from torch import Tensor

from .base import Mask, Shape, _tied_to_layout, tensor_key


class _BlockSparse(Mask):
    """``layout[..., i // block_q, j // block_k]`` decides; ``layout`` is ``(nqb, nkb)`` or
    ``(B|1, H|1, nqb, nkb)``."""

    def __init__(self, layout: Tensor, block_q: int, block_k: int, name: str = "block_sparse"):
        self.layout, self.block_q, self.block_k, self.name = layout, block_q, block_k, name

    def _layout_at(self, s: Shape) -> Tensor:
        """The layout for a problem of shape ``s`` (read only: evaluated inside FlexAttention's trace)."""
        return self.layout

    def _layout4(self, device: torch.device, s: Shape) -> Tensor:
        lay = self._layout_at(s).to(device)
        while lay.dim() < 4:
            lay = lay.unsqueeze(0)
        return lay

    def check(self, s: Shape) -> None:
        lay = self._layout4(torch.device("cpu"), s)
        need = (math.ceil(s.Lq / self.block_q), math.ceil(s.Lk / self.block_k))
        if tuple(lay.shape[-2:]) != need or lay.shape[0] not in (1, s.B) or lay.shape[1] not in (1, s.H):
            raise ValueError(
                f"block_sparse: layout of shape {tuple(self.layout.shape)} does not fit (B={s.B}, H={s.H},"
                f" Lq={s.Lq}, Lk={s.Lk}) with blocks of {self.block_q}x{self.block_k}: it needs"
                f" (..., {need[0]}, {need[1]})"
            )

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        lay = self._layout4(q.device, s)
        bb = b if lay.shape[0] > 1 else torch.zeros_like(b)
        hh = h if lay.shape[1] > 1 else torch.zeros_like(h)
        return lay[bb, hh, q // self.block_q, k // self.block_k]

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        lay = self._layout4(qlo.device, s).long()
        # 2-D prefix sums over the layout count true blocks in any rectangle of blocks
        P = torch.nn.functional.pad(lay.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        r0, r1 = qlo // self.block_q, (qhi - 1) // self.block_q + 1  # (nq, 1)
        c0, c1 = klo // self.block_k, (khi - 1) // self.block_k + 1  # (1, nk)
        count = P[..., r1, c1] - P[..., r0, c1] - P[..., r1, c0] + P[..., r0, c0]
        return count > 0, count == (r1 - r0) * (c1 - c0)

    def to(self, device: torch.device | str) -> Mask:
        self.layout = self.layout.to(device)
        return self

    def shard_blocker(self) -> str | None:
        return _tied_to_layout(self)

    def cache_key(self) -> Hashable | None:
        lay = tensor_key(self.layout)
        return None if lay is None else ("block_sparse", lay, self.block_q, self.block_k)


def block_sparse(layout: Tensor, block_size: int | tuple[int, int]) -> Mask:
    """Block-sparse attention: query ``i`` sees key ``j`` iff ``layout[..., i // bq, j // bk]``.

    Args:
        layout: bool tensor ``(n_q_blocks, n_k_blocks)`` or ``(B|1, H|1, n_q_blocks, n_k_blocks)``
            with ``n_q_blocks = ceil(Lq / bq)`` and ``n_k_blocks = ceil(Lk / bk)``.
        block_size: ``b`` or ``(bq, bk)``, in tokens.
    """
    if not isinstance(layout, Tensor):
        raise TypeError(f"block_sparse: layout must be a bool tensor, got {type(layout).__name__}")
    if layout.dim() not in (2, 4):
        raise ValueError(
            f"block_sparse: layout must be (nqb, nkb) or (B, H, nqb, nkb), got shape {tuple(layout.shape)}"
        )
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    if bq < 1 or bk < 1:
        raise ValueError(f"block_sparse: block_size must be >= 1, got {block_size}")
    return _BlockSparse(layout.to(torch.bool), bq, bk)


class _RandomBlocks(_BlockSparse):
    def __init__(self, num_blocks: int, block_size: int, seed: int):
        super().__init__(torch.zeros(0, 0, dtype=torch.bool), block_size, block_size)
        self.num_blocks, self.seed = num_blocks, seed
        self.name = f"random_blocks({num_blocks}, {block_size}, seed={seed})"
        self._cache: dict[tuple[int, int], Tensor] = {}

    def _layout_for(self, s: Shape) -> Tensor:
        key = (math.ceil(s.Lq / self.block_q), math.ceil(s.Lk / self.block_k))
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed)
            nqb, nkb = key
            lay = torch.zeros(nqb, nkb, dtype=torch.bool)
            r = min(self.num_blocks, nkb)
            if r:
                pick = torch.rand(nqb, nkb, generator=g).argsort(dim=-1)[:, :r]
                lay.scatter_(1, pick, True)
            self._cache[key] = lay
        return self._cache[key]

    def check(self, s: Shape) -> None:
        self.layout = self._layout_for(s)

    def cache_key(self) -> Hashable | None:
        return ("random_blocks", self.num_blocks, self.block_q, self.seed)

    def _layout_at(self, s: Shape) -> Tensor:
        return self._layout_for(s)

    def to(self, device: torch.device | str) -> Mask:
        super().to(device)
        self._cache = {key: lay.to(device) for key, lay in self._cache.items()}
        return self


def random_blocks(num_blocks: int, block_size: int, seed: int = 0) -> Mask:
    """BigBird's random attention: each query block sees ``num_blocks`` key blocks drawn at random
    (the same draw for every batch row and head), reproducibly from ``seed``."""
    if num_blocks < 0 or block_size < 1:
        raise ValueError(f"random_blocks: need num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}")
    return _RandomBlocks(num_blocks, block_size, seed)

"""Masks that compare positions: :func:`full`, :func:`causal`, :func:`sliding_window`, :func:`dilated`,
:func:`global_tokens`, and :class:`PositionalMask`, the base of a mask of your own that is a formula of
the indices.

Positions are aligned bottom-right: query ``i`` stands at key position ``p = i + Lk - Lq``. Tiles are
classified from the formula (:meth:`~qkv.masks.Mask.bounds`) in ``O(tiles)`` work, without touching
``Lq x Lk`` elements, and the masks shard over ranks as they are (they hold no per-position data).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Mask, Shape, _as_index_tensor, _tracing, tensor_key


class PositionalMask(Mask):
    """Base of masks that only compare positions (no per-position data of a shard): they apply to a
    sequence split over ranks as they are, and their type and ``params`` (a tuple of the numbers that
    define them; set it in ``__init__``) are their cache key. Subclass it for a mask of your own that
    is a formula of the indices; subclass :class:`Mask` when it holds per-position data."""

    params: tuple[Any, ...] = ()

    def shard_blocker(self) -> str | None:
        return None

    def cache_key(self) -> Hashable | None:
        return (type(self).__qualname__, self.params)


class _Full(PositionalMask):
    name = "full"

    def window(self) -> tuple[int | None, int | None] | None:
        return None, None

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return torch.ones_like(q - k, dtype=torch.bool)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.ones_like(qlo + klo, dtype=torch.bool)
        return t, t


def full() -> Mask:
    """Every query sees every key (the same as no mask); useful as a neutral element."""
    return _Full()


class _Window(PositionalMask):
    """Keys ``j`` with ``p - left <= j <= p + right`` where ``p = i + Lk - Lq``; ``None`` = unbounded."""

    def __init__(self, left: int | None, right: int | None, name: str):
        self.left, self.right, self.name = left, right, name
        self.params = (left, right)

    def window(self) -> tuple[int | None, int | None] | None:
        return self.left, self.right

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        d = k - (q + s.offset)  # how far right of the query's own position the key lies
        ok = torch.ones_like(d, dtype=torch.bool)
        if self.right is not None:
            ok = ok & (d <= self.right)
        if self.left is not None:
            ok = ok & (d >= -self.left)
        return ok

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        off = s.offset
        # d = k - q - off ranges over [klo - (qhi-1) - off, (khi-1) - qlo - off] in a tile
        dmin = klo - (qhi - 1) - off
        dmax = (khi - 1) - qlo - off
        any_ = torch.ones_like(dmin, dtype=torch.bool)
        all_ = torch.ones_like(dmin, dtype=torch.bool)
        if self.right is not None:
            any_ &= dmin <= self.right
            all_ &= dmax <= self.right
        if self.left is not None:
            any_ &= dmax >= -self.left
            all_ &= dmin >= -self.left
        return any_, all_


def causal() -> Mask:
    """Query ``i`` sees keys ``j <= i + Lk - Lq`` (bottom-right aligned when ``Lq != Lk``).

    Two new queries after two cached keys (decoding with a KV cache) see the keys before them:

    >>> from qkv import masks
    >>> masks.causal().to_dense(Lq=2, Lk=4)[0, 0].int()
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    return _Window(None, 0, "causal")


def sliding_window(left: int, right: int = 0) -> Mask:
    """Local attention: query ``i`` sees keys ``j`` with ``p - left <= j <= p + right``, ``p = i + Lk - Lq``.

    flash-attn's ``window_size=(left, right)`` convention; ``right=0`` (the default) makes it causal
    and ``sliding_window(n, n)`` symmetric. A window of ``left`` keys back sees ``left + 1`` keys
    including its own position.

    Args:
        left: how many keys before the query's own position it may see (``>= 0``).
        right: how many keys after it (``>= 0``).

    Example:
        >>> from qkv import masks
        >>> masks.sliding_window(1, 1).to_dense(Lq=4, Lk=4)[0, 0].int()
        tensor([[1, 1, 0, 0],
                [1, 1, 1, 0],
                [0, 1, 1, 1],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    for arg, val in (("left", left), ("right", right)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"sliding_window: {arg} must be an int, got {type(val).__name__}")
        if val < 0:
            raise ValueError(f"sliding_window: {arg} must be >= 0, got {arg}={val}")
    return _Window(left, right, f"sliding_window({left}, {right})")


class _Dilated(_Window):
    def __init__(self, left: int | None, right: int | None, dilation: int):
        super().__init__(left, right, f"dilated({left}, {right}, dilation={dilation})")
        self.dilation = dilation
        self.params = (left, right, dilation)

    def window(self) -> tuple[int | None, int | None] | None:
        return (self.left, self.right) if self.dilation == 1 else None

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return super().evaluate(s, b, h, q, k) & ((q + s.offset - k) % self.dilation == 0)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        any_, all_ = super().bounds(s, qlo, qhi, klo, khi)
        if self.dilation == 1:
            return any_, all_
        # a tile of width >= dilation (or a query tile of height >= 2) always holds a gap; only a
        # single cell can be full, and we do not bother to prove that.
        return any_, torch.zeros_like(all_)


def dilated(left: int | None, dilation: int, right: int = 0) -> Mask:
    """Dilated (strided) local attention, Child et al. 2019: query at position ``p = i + Lk - Lq``
    sees keys ``j`` with ``p - left <= j <= p + right`` and ``(p - j) % dilation == 0``.

    ``dilated(None, L)`` (no left limit) is Child et al.'s strided pattern; combine it with
    ``sliding_window`` for their two-head factorisation.
    """
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilated: dilation must be an int >= 1, got {dilation!r}")
    for arg, val in (("left", left), ("right", right)):
        if val is None and arg == "left":
            continue
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"dilated: {arg} must be an int >= 0, got {arg}={val!r}")
    return _Dilated(left, right, dilation)


class _Global(PositionalMask):
    """Longformer's global tokens: global positions see everything and are seen by everything."""

    def __init__(self, idx: Tensor):
        self.idx = idx.flatten().unique()
        self.name = f"global_tokens({self.idx.numel()})"

    def cache_key(self) -> Hashable | None:
        idx = tensor_key(self.idx)
        return None if idx is None else ("global", idx)

    def check(self, s: Shape) -> None:
        if self.idx.numel() and not _tracing() and (int(self.idx.min()) < 0 or int(self.idx.max()) >= s.Lk):
            raise ValueError(
                f"global_tokens: positions must lie in [0, Lk={s.Lk}), got [{int(self.idx.min())}, "
                f"{int(self.idx.max())}]"
            )

    def _is_global(self, pos: Tensor) -> Tensor:
        idx = self.idx.to(pos.device)
        if idx.numel() == 0:
            return torch.zeros_like(pos, dtype=torch.bool)
        return torch.isin(pos, idx) if pos.dim() else (pos == idx).any()

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self._is_global(k) | self._is_global(q + s.offset)

    def _count(self, lo: Tensor, hi: Tensor, offset: int = 0) -> Tensor:
        idx = self.idx.to(lo.device)
        return torch.searchsorted(idx, hi + offset) - torch.searchsorted(idx, lo + offset)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        kc, qc = self._count(klo, khi), self._count(qlo, qhi, s.offset)
        any_ = (kc > 0) | (qc > 0)
        all_ = (kc == (khi - klo)) | (qc == (qhi - qlo))
        return any_, all_

    def to(self, device: torch.device | str) -> Mask:
        self.idx = self.idx.to(device)
        return self


def global_tokens(tokens: int | Sequence[int] | Tensor) -> Mask:
    """Longformer/BigBird global attention: the given key positions are seen by every query, and
    queries at those positions (aligned: ``i + Lk - Lq``) see every key.

    Args:
        tokens: an int ``n`` (the first ``n`` positions, e.g. ``[CLS]``) or the positions themselves.
    """
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        if tokens < 0:
            raise ValueError(f"global_tokens: the number of global tokens must be >= 0, got {tokens}")
        return _Global(torch.arange(tokens))
    return _Global(_as_index_tensor(tokens, "global_tokens: tokens"))

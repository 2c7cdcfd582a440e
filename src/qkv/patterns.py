"""Sparse attention patterns from the literature, as :class:`qkv.masks.Mask` objects.

Each pattern is built from mask primitives, so it knows its tiles: the ``tiled`` backend skips the
empty ones and runs sub-quadratic work for a pattern whose tiles are mostly empty::

    qkv.attention(q, k, v, mask=qkv.patterns.longformer(256, 1), backend="tiled")

- :func:`longformer`: a symmetric sliding window plus global tokens (Beltagy et al. 2020).
- :func:`bigbird`: window, global tokens and random key blocks (Zaheer et al. 2020).
- :func:`strided` and :func:`fixed`: the causal factorised patterns of Child et al. 2019 ("Generating
  Long Sequences with Sparse Transformers"), each the union of its two heads' patterns.
- :func:`dilated <qkv.masks.dilated>` (in :mod:`qkv.masks`) is the dilated sliding window.

Positions are aligned bottom-right as everywhere in qkv: query ``i`` stands at key position
``p = i + Lk - Lq``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import masks as M
from .masks import Mask, PositionalMask, Shape

__all__ = ["bigbird", "fixed", "longformer", "strided"]


def _int(name: str, val: object, lo: int) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    return val


def longformer(window: int, global_tokens: int | list[int] | Tensor = 0) -> Mask:
    """Longformer attention: every position sees the ``window`` keys on each side of it, and the global
    tokens see and are seen by every position.

    Args:
        window: one-sided window width ``w`` (query at ``p`` sees keys ``p - w .. p + w``), ``>= 0``.
        global_tokens: an int ``n`` (the first ``n`` positions, e.g. ``[CLS]``) or the positions.
    """
    w = _int("longformer: window", window, 0)
    return M.sliding_window(w, w) | M.global_tokens(global_tokens)


def bigbird(window: int, num_global: int, num_random_blocks: int, block_size: int, seed: int = 0) -> Mask:
    """BigBird attention (ITC variant): sliding window, global tokens and random key blocks.

    Args:
        window: one-sided window width in tokens (``>= 0``).
        num_global: the first ``num_global`` positions are global (``>= 0``).
        num_random_blocks: key blocks each query block sees at random (``>= 0``), the same draw for
            every batch row and head.
        block_size: the random blocks' size in tokens (``>= 1``).
        seed: seeds the random blocks.
    """
    w = _int("bigbird: window", window, 0)
    g = _int("bigbird: num_global", num_global, 0)
    r = _int("bigbird: num_random_blocks", num_random_blocks, 0)
    bs = _int("bigbird: block_size", block_size, 1)
    return M.sliding_window(w, w) | M.global_tokens(g) | M.random_blocks(r, bs, seed)


def strided(stride: int) -> Mask:
    """Child et al.'s strided pattern (causal): query at ``p`` sees key ``j <= p`` when ``p - j < stride``
    (the local head) or ``(p - j) % stride == 0`` (the strided head).

    Args:
        stride: ``l >= 1``, about ``sqrt(L)`` in the paper.
    """
    s = _int("strided: stride", stride, 1)
    return M.sliding_window(s - 1, 0) | M.dilated(None, s)


class _SameBlock(PositionalMask):
    """Query at ``p`` and key ``j`` in the same block of ``size``: ``floor(p / size) == floor(j / size)``."""

    def __init__(self, size: int):
        self.size = size
        self.params = (size,)
        self.name = f"same_block({size})"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return torch.div(q + s.offset, self.size, rounding_mode="floor") == torch.div(
            k, self.size, rounding_mode="floor"
        )

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        n = self.size
        q0 = torch.div(qlo + s.offset, n, rounding_mode="floor")
        q1 = torch.div(qhi - 1 + s.offset, n, rounding_mode="floor")
        k0 = torch.div(klo, n, rounding_mode="floor")
        k1 = torch.div(khi - 1, n, rounding_mode="floor")
        return (q0 <= k1) & (k0 <= q1), (q0 == q1) & (k0 == k1) & (q0 == k0)


class _SummaryColumns(PositionalMask):
    """Keys ``j`` with ``j % size >= size - c``: the last ``c`` positions of every block."""

    def __init__(self, size: int, c: int):
        self.size, self.c = size, c
        self.params = (size, c)
        self.name = f"summary_columns({size}, {c})"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k % self.size >= self.size - self.c) & torch.ones_like(q, dtype=torch.bool)

    def _count_below(self, n: Tensor) -> Tensor:
        """How many ``j < n`` are summary columns."""
        per, rem = torch.div(n, self.size, rounding_mode="floor"), n % self.size
        return per * self.c + torch.clamp(rem - (self.size - self.c), min=0)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        cnt = self._count_below(khi) - self._count_below(klo)
        ref = torch.zeros_like(qlo + klo)
        return (cnt > 0) | (ref > 0), (cnt == khi - klo) | (ref > 0)


def fixed(stride: int, c: int) -> Mask:
    """Child et al.'s fixed pattern (causal): query at ``p`` sees key ``j <= p`` in its own block of
    ``stride`` positions, and every key in the last ``c`` positions of any block (the summary cells).

    Args:
        stride: block length ``l >= 1``.
        c: summary positions per block, ``1 <= c <= stride`` (the paper uses 8 to 32).
    """
    s = _int("fixed: stride", stride, 1)
    cc = _int("fixed: c", c, 1)
    if cc > s:
        raise ValueError(f"fixed: c must be <= stride, got c={cc}, stride={s}")
    return M.causal() & (_SameBlock(s) | _SummaryColumns(s, cc))

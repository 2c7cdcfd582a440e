"""Masks from one number per batch row: :func:`padding` (real keys end at a length), :func:`left_padding`
(real keys begin at a start) and :func:`prefix_lm` (a prefix every query sees, causal after it).

The numbers are raw key indices, global positions, so the masks shard over ranks as they are. Tiles are
classified from the numbers alone (a tile of keys is empty for a row when it starts at or past the row's
length), whatever ``Lq x Lk``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from .base import Mask, Shape, _as_index_tensor, _Or, _tracing, tensor_key
from .positional import PositionalMask, causal


def _check_per_row(t: Tensor, what: str, unit: str, s: Shape, axis: str = "k", bounded: bool = True) -> None:
    """``t`` is a scalar or holds one ``unit`` per batch row, each in ``[0, L]`` (``L``: ``Lk`` or ``Lq`` by
    ``axis``; no upper bound unless ``bounded``); a ``ValueError`` naming ``what`` otherwise."""
    L = s.Lk if axis == "k" else s.Lq
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, s.B)):
        raise ValueError(
            f"{what} must be an int or hold one {unit} per batch row: got shape {tuple(t.shape)}"
            f" for batch size B={s.B}"
        )
    if t.numel() and not _tracing() and (int(t.min()) < 0 or (bounded and int(t.max()) > L)):
        raise ValueError(
            f"{what} must lie in [0, {L}] ({'Lk' if axis == 'k' else 'Lq'}={L}),"
            f" got values in [{int(t.min())}, {int(t.max())}]"
        )


def _of_row(t: Tensor, b: Tensor) -> Tensor:
    """The value of batch row ``b`` (a scalar ``t``, or one of length 1, holds for every row)."""
    t = t.to(b.device)
    if t.dim() == 0:
        return t
    return t[0] if t.shape[0] == 1 else t[b]


def _against_tiles(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, shaped to broadcast against ``(B, H, nq, nk)`` tile bounds."""
    t = t.to(device)
    return t.view(-1, 1, 1, 1) if t.dim() == 1 else t


class _KeyBelow(PositionalMask):
    """Keys ``j < n`` (per batch row when ``n`` is a ``(B,)`` tensor); raw key indices. Lengths are
    global, so the mask shards as it is."""

    def __init__(self, n: Tensor, what: str, name: str, axis: str = "k", bounded: bool = True):
        self.n, self.what, self.name, self.axis, self.bounded = n, what, name, axis, bounded

    def cache_key(self) -> Hashable | None:
        n = tensor_key(self.n)
        return None if n is None else ("below", self.axis, self.bounded, n)

    def check(self, s: Shape) -> None:
        _check_per_row(self.n, self.what, "length", s, self.axis, self.bounded)

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        idx = k if self.axis == "k" else q
        return (idx < _of_row(self.n, b)) & torch.ones_like(q + k, dtype=torch.bool)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        n = _against_tiles(self.n, qlo.device)
        lo, hi = (klo, khi) if self.axis == "k" else (qlo, qhi)
        shape_ref = torch.zeros_like(qlo + klo)
        return (lo < n) | (shape_ref > 0), ((hi - 1) < n) | (shape_ref > 0)

    def to(self, device: torch.device | str) -> Mask:
        self.n = self.n.to(device)
        return self


def padding(kv_lengths: int | Sequence[int] | Tensor, q_lengths: int | Sequence[int] | Tensor | None = None) -> Mask:
    """Right-padded batches: batch row ``b`` has ``kv_lengths[b]`` real keys (``j < kv_lengths[b]``).

    Args:
        kv_lengths: an int, or one length per batch row, shape ``(B,)``; each in ``[0, Lk]``.
        q_lengths: optionally, real queries per row; padded query rows attend to nothing and
            return zeros.

    Example:
        >>> from qkv import masks
        >>> masks.padding([3, 5]).to_dense(B=2, Lq=1, Lk=5)[:, 0, 0].int()
        tensor([[1, 1, 1, 0, 0],
                [1, 1, 1, 1, 1]], dtype=torch.int32)
    """
    m: Mask = _KeyBelow(_as_index_tensor(kv_lengths, "padding: kv_lengths"), "padding: kv_lengths", "padding")
    if q_lengths is not None:
        m = m & _KeyBelow(_as_index_tensor(q_lengths, "padding: q_lengths"), "padding: q_lengths", "q_padding", "q")
    return m


class _KeyFrom(PositionalMask):
    """Keys ``j >= start`` (per batch row when ``start`` is a ``(B,)`` tensor); raw key indices. The starts
    are global positions, so the mask shards as it is."""

    def __init__(self, start: Tensor):
        self.start = start
        self.name = "left_padding"

    def cache_key(self) -> Hashable | None:
        st = tensor_key(self.start)
        return None if st is None else ("from", st)

    def check(self, s: Shape) -> None:
        _check_per_row(self.start, "left_padding: starts", "start", s)

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k >= _of_row(self.start, b)) & torch.ones_like(q + k, dtype=torch.bool)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        st = _against_tiles(self.start, qlo.device)
        shape_ref = torch.zeros_like(qlo + klo)
        return ((khi - 1) >= st) | (shape_ref > 0), (klo >= st) | (shape_ref > 0)

    def to(self, device: torch.device | str) -> Mask:
        self.start = self.start.to(device)
        return self


def left_padding(starts: int | Sequence[int] | Tensor) -> Mask:
    """Left-padded batches: batch row ``b``'s real keys begin at ``starts[b]`` (keys ``j >= starts[b]``).

    What a decoder's batch looks like when its prompts are padded on the left (Hugging Face's
    ``generate``): the padding sits before the first real token and stays there while the KV cache
    grows, so the start, not the length, is what stays fixed. Combine with :func:`causal` (and with
    :func:`padding` when a row is padded on both sides). Tiles are classified from the starts alone.

    Args:
        starts: an int, or one start per batch row, shape ``(B,)``; each in ``[0, Lk]`` (``Lk``: no key).
    """
    return _KeyFrom(_as_index_tensor(starts, "left_padding: starts"))


def prefix_lm(prefix_len: int | Sequence[int] | Tensor) -> Mask:
    """Prefix LM (T5, UniLM): every query sees the first ``prefix_len`` keys, and the rest causally.

    Args:
        prefix_len: an int, or one per batch row, shape ``(B,)``.

    Example:
        >>> from qkv import masks
        >>> masks.prefix_lm(2).to_dense(Lq=4, Lk=4)[0, 0].int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 0],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    n = _as_index_tensor(prefix_len, "prefix_lm: prefix_len")
    return _Or(
        causal(),
        _KeyBelow(
            n, "prefix_lm: prefix_len", f"prefix({prefix_len if isinstance(prefix_len, int) else '...'})", bounded=False
        ),
    )

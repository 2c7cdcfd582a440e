"""Masks: which (query, key) pairs may meet.

A :class:`Mask` is a small object around a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``
that returns ``True`` where query ``q_idx`` may attend to key ``kv_idx``. Masks compose with
``&``, ``|`` and ``~``::

    causal() & sliding_window(256)          # causal local attention
    document(ids) & causal()                # packed sequences
    ~padding(lengths) | global_tokens(4)    # anything goes

Alignment: when ``Lq != Lk`` query ``i`` stands at key position ``i + Lk - Lq`` (bottom-right
alignment, what decoding with a KV cache needs, and flash-attn's convention). Every named mask that
compares positions (``causal``, ``sliding_window``, ``prefix_lm``, ``dilated``, ``global_tokens``)
uses that aligned position; masks over ids (``document``, ``padding``, ``block_sparse``) use raw
indices.

Every mask also classifies a (query tile, key tile) pair as :data:`EMPTY`, :data:`FULL` or
:data:`PARTIAL` (:meth:`Mask.block_kinds`). Named masks answer from their formula in ``O(tiles)``
work; custom masks (``from_fn``, ``from_dense``, a bare function) answer by evaluating the tiles.
The answer is conservative: a tile called ``FULL`` is full and a tile called ``EMPTY`` is empty, while
``PARTIAL`` may occasionally be either. Backends skip empty tiles and apply no mask on full ones.

Internally each mask evaluates on broadcast index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``,
``q_idx (1,1,Lq,1)`` and ``kv_idx (1,1,1,Lk)`` (or on scalars, under FlexAttention's vmap), so a
mask never builds an ``Lq x Lk`` tensor unless asked to with :meth:`Mask.to_dense` or on one tile
with :meth:`Mask.tile`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from .fingerprint import Ref, Unkeyable, content_key, fingerprint_or_none, keyed_by_cache_key

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Mask",
    "PositionalMask",
    "MaskLike",
    "MaskMod",
    "Shape",
    "as_mask",
    "block_sparse",
    "causal",
    "dilated",
    "document",
    "from_cu_seqlens",
    "from_dense",
    "from_fn",
    "full",
    "global_tokens",
    "left_padding",
    "padding",
    "prefix_lm",
    "random_blocks",
    "sliding_window",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: PyTorch FlexAttention's convention."""

EMPTY, FULL, PARTIAL = 0, 1, 2
"""Tile kinds returned by :meth:`Mask.block_kinds`."""


@dataclass(frozen=True)
class Shape:
    """The problem a mask is applied to: batch, query heads, query and key lengths, device."""

    B: int
    H: int
    Lq: int
    Lk: int
    device: torch.device = torch.device("cpu")

    @property
    def offset(self) -> int:
        """Key position of query 0 under bottom-right alignment: ``Lk - Lq``."""
        return self.Lk - self.Lq


def _grid(n: int, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Start (inclusive) and end (exclusive) of each block of a length-``n`` axis."""
    lo = torch.arange(0, n, block, device=device)
    return lo, torch.clamp(lo + block, max=n)


@keyed_by_cache_key
class Mask:
    """Which (query, key) pairs may attend. Subclasses define ``evaluate`` and, ideally, ``bounds``.

    Masks combine with ``&`` (both allow), ``|`` (either allows) and ``~`` (the complement), and
    :meth:`to_dense` shows one as a bool tensor (True = may attend):

    >>> from qkv import masks
    >>> m = masks.causal() & masks.sliding_window(2)
    >>> m
    (causal & sliding_window(2, 0))
    >>> m.to_dense(Lq=5, Lk=5)[0, 0].int()
    tensor([[1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1]], dtype=torch.int32)
    >>> (~masks.causal()).to_dense(Lq=3, Lk=3)[0, 0].int()
    tensor([[0, 1, 1],
            [0, 0, 1],
            [0, 0, 0]], dtype=torch.int32)
    >>> (masks.causal() | masks.global_tokens(1)).to_dense(Lq=3, Lk=3)[0, 0].int()
    tensor([[1, 1, 1],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)

    Each (query tile, key tile) is classified from the formula, without building the tile
    (``EMPTY`` 0, ``FULL`` 1, ``PARTIAL`` 2):

    >>> masks.causal().block_kinds(masks.Shape(B=1, H=1, Lq=8, Lk=8), 4, 4)
    tensor([[[[2, 0],
              [1, 2]]]], dtype=torch.int8)
    """

    #: a short human name shown in ``repr`` and by :func:`qkv.explain`
    name: str = "mask"

    # ---- what subclasses define -------------------------------------------------------------
    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool tensor broadcast from the index tensors: True where query ``q`` may see key ``k``."""
        raise NotImplementedError

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(any, all)`` for tiles ``[qlo, qhi) x [klo, khi)`` (``qlo`` is ``(nq, 1)``, ``klo`` is
        ``(1, nk)``), broadcastable to ``(B, H, nq, nk)``. ``any`` may over-state, ``all`` may
        under-state. ``None`` means: evaluate the tiles."""
        return None

    def check(self, s: Shape) -> None:
        """Raise ``ValueError`` if this mask cannot apply to a problem of shape ``s``."""

    def window(self) -> tuple[int | None, int | None] | None:
        """``(left, right)`` when this mask is exactly a sliding window: query at aligned position
        ``p`` sees keys ``p - left <= j <= p + right`` (``None`` = unbounded on that side). ``causal()``
        is ``(None, 0)``, ``full()`` is ``(None, None)``, ``causal() & sliding_window(256)`` is
        ``(256, 0)``. ``None`` for every other mask. Kernels with a causal flag or a window size read it."""
        return None

    @property
    def is_causal(self) -> bool:
        """True when this mask is exactly :func:`causal` (what kernels with an ``is_causal`` flag take)."""
        return self.window() == (None, 0)

    @property
    def is_full(self) -> bool:
        """True when this mask lets every query see every key (:func:`full`)."""
        return self.window() == (None, None)

    def shard_blocker(self) -> str | None:
        """``None`` when the mask can be evaluated on GLOBAL positions of a sequence split over ranks
        (ring and Ulysses attention) after :meth:`globalize`; otherwise the reason it cannot.

        A mask that only compares positions can; one that holds per-position data of the local shard
        must say how to gather it (override :meth:`globalize` and this method). The default is the
        safe answer: a mask that does not say cannot be sharded."""
        return (
            f"mask {self.name} does not say how it maps to global positions of a sequence split over ranks"
            " (a Mask subclass must override shard_blocker() and globalize() to be used with ring/ulysses)"
        )

    def globalize(self, gather: Callable[[Tensor], Tensor]) -> Mask:
        """The mask of the whole sequence, from this mask built with a LOCAL shard's tensors.

        Args:
            gather: all-gathers a per-position tensor of the local shard ``(..., n)`` along its last
                dim into the global sequence ``(..., L)`` in natural order.

        Raises ``NotImplementedError`` with :meth:`shard_blocker`'s reason when it cannot."""
        why = self.shard_blocker()
        if why is not None:
            raise NotImplementedError(why)
        return self

    def cache_key(self) -> Hashable | None:
        """A hashable that is equal for two masks only when they allow the same pairs on every problem,
        or ``None`` when the mask cannot establish that. Backends cache their per-mask plans (tile
        classifications, ``BlockMask``s, ring kinds) under it; ``None`` means the plan is built again for
        the call and kept nowhere (:meth:`cache_blocker` says why).

        Named masks key on their parameters and the contents of the tensors they hold (at any size:
        a tensor changed in place changes the key); :func:`from_fn` masks on a fingerprint of everything
        the function can read (:mod:`qkv.fingerprint`). A subclass that holds data must key on all of it
        (the default, ``None``, is always safe). While ``torch.compile`` traces, masks that hold tensors
        answer ``None``: their values are not known then."""
        return None

    def cache_blocker(self) -> str | None:
        """``None`` when :meth:`cache_key` names this mask (its plans are cached); otherwise why not, in
        words: plans for it are then built on every call (:func:`qkv.explain` shows this)."""
        if self.cache_key() is not None:
            return None
        if _tracing():
            return f"mask {self.name}: its tensors are not read while torch.compile traces"
        return f"mask {self.name} names no cache key (a Mask subclass keys itself with cache_key())"

    # ---- public API --------------------------------------------------------------------------
    def tile(self, s: Shape, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """The mask on queries ``[q0, q1)`` and keys ``[k0, k1)`` of problem ``s``: a bool tensor
        broadcastable to ``(B, H, q1 - q0, k1 - k0)``."""
        dev = s.device
        b = torch.arange(s.B, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(s.H, device=dev).view(1, -1, 1, 1)
        q = torch.arange(q0, q1, device=dev).view(1, 1, -1, 1)
        k = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
        out = self.evaluate(s, b, h, q, k)
        if not isinstance(out, Tensor):
            out = torch.tensor(bool(out), device=dev)
        while out.dim() < 4:
            out = out.unsqueeze(0)
        return out.to(torch.bool).expand(*out.shape[:2], q1 - q0, k1 - k0)

    def to_dense(
        self, B: int = 1, H: int = 1, Lq: int = 1, Lk: int = 1, device: torch.device | str | None = None
    ) -> Tensor:
        """The whole mask as a bool tensor of shape ``(B or 1, H or 1, Lq, Lk)`` (True = may attend).

        This is the only place a mask builds ``Lq x Lk`` elements; backends call it only where the
        kernel they feed needs a dense mask (PyTorch SDPA, ``reference``)."""
        s = Shape(B, H, Lq, Lk, torch.device(device) if device is not None else torch.device("cpu"))
        self.check(s)
        t = self.tile(s, 0, Lq, 0, Lk)
        while t.dim() < 4:
            t = t.unsqueeze(0)
        return t

    def block_kinds(self, s: Shape, block_q: int, block_k: int) -> Tensor:
        """Classify every (query tile, key tile) of a regular grid as ``EMPTY``, ``FULL`` or
        ``PARTIAL``: an ``int8`` tensor of shape ``(B or 1, H or 1, ceil(Lq/block_q), ceil(Lk/block_k))``.

        Named masks answer from their formula; custom masks evaluate each tile (one row of tiles at
        a time, so memory stays ``O(block_q * Lk)``)."""
        any_, all_ = self._any_all(s, block_q, block_k)
        kinds = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
        while kinds.dim() < 4:
            kinds = kinds.unsqueeze(0)
        return kinds

    def mask_mod(self, Lq: int, Lk: int, B: int = 1, H: int = 1) -> MaskMod:
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for a problem with these lengths (the
        lengths fix the bottom-right alignment)."""
        s = Shape(B, H, Lq, Lk)

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self.evaluate(s, b, h, q_idx, kv_idx)

        return mod

    def to_flex_block_mask(
        self, B: int, H: int, Lq: int, Lk: int, device: torch.device | str = "cpu", BLOCK_SIZE: int = 128
    ) -> Any:
        """A ``torch.nn.attention.flex_attention.BlockMask`` for this mask (torch >= 2.5).

        ``B``/``H`` may be ``None``-like 1 when the mask does not depend on them."""
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except ImportError as e:  # pragma: no cover - depends on the installed torch
            raise NotImplementedError("to_flex_block_mask needs torch >= 2.5 (FlexAttention)") from e
        dev = torch.device(device)
        s = Shape(B, H, Lq, Lk, dev)
        self.check(s)
        self._to_device(dev)
        return create_block_mask(self.mask_mod(Lq, Lk, B, H), B, H, Lq, Lk, device=str(dev), BLOCK_SIZE=BLOCK_SIZE)

    def to(self, device: torch.device | str) -> Mask:
        """Move the tensors this mask holds (ids, lengths, layouts) to ``device`` in place, as
        ``nn.Module.to`` does, and return the mask. Kernels that capture them (a compiled
        FlexAttention ``mask_mod``) need them on the device of the queries; evaluating works anywhere."""
        self._to_device(torch.device(device))
        return self

    def _to_device(self, device: torch.device) -> None:
        """Move tensors the mask holds (ids, lengths, layouts) to ``device``; default: nothing."""

    # ---- algebra -----------------------------------------------------------------------------
    def __and__(self, other: MaskLike) -> Mask:
        return _And(self, _need(other))

    def __rand__(self, other: MaskLike) -> Mask:
        return _And(_need(other), self)

    def __or__(self, other: MaskLike) -> Mask:
        return _Or(self, _need(other))

    def __ror__(self, other: MaskLike) -> Mask:
        return _Or(_need(other), self)

    def __invert__(self) -> Mask:
        return _Not(self)

    def __repr__(self) -> str:
        return self.name

    # ---- helpers -----------------------------------------------------------------------------
    def _any_all(self, s: Shape, bq: int, bk: int) -> tuple[Tensor, Tensor]:
        qlo, qhi = _grid(s.Lq, bq, s.device)
        klo, khi = _grid(s.Lk, bk, s.device)
        got = self.bounds(s, qlo[:, None], qhi[:, None], klo[None, :], khi[None, :])
        if got is not None:
            return got
        return _evaluate_tiles(self, s, bq, bk)


def _evaluate_tiles(m: Mask, s: Shape, bq: int, bk: int) -> tuple[Tensor, Tensor]:
    """``(any, all)`` per tile by evaluating the mask, one row of query tiles at a time."""
    nk = math.ceil(s.Lk / bk) if s.Lk else 0
    pad = nk * bk - s.Lk
    anys, alls = [], []
    for q0 in range(0, s.Lq, bq):
        t = m.tile(s, q0, min(q0 + bq, s.Lq), 0, s.Lk)  # (B?, H?, tq, Lk)
        while t.dim() < 4:
            t = t.unsqueeze(0)
        if pad:
            # padded keys count as True for `all` and False for `any`
            t_any = torch.nn.functional.pad(t, (0, pad), value=False)
            t_all = torch.nn.functional.pad(t, (0, pad), value=True)
        else:
            t_any = t_all = t
        shp = (*t.shape[:2], t.shape[2], nk, bk)
        anys.append(t_any.reshape(shp).any(dim=-1).any(dim=2))
        alls.append(t_all.reshape(shp).all(dim=-1).all(dim=2))
    if not anys:
        z = torch.zeros(1, 1, 0, nk, dtype=torch.bool, device=s.device)
        return z, z
    return torch.stack(anys, dim=2), torch.stack(alls, dim=2)


# ------------------------------------------------------------------------------------------------
# algebra


def _tracing() -> bool:
    """Whether this code is being traced into a graph (``torch.compile``, ``torch.export``): then masks
    read no tensor values (checks of ids, lengths and positions against the shape are skipped there;
    they run in eager calls)."""
    return torch.compiler.is_compiling()


def _tensor_key(t: Tensor) -> Hashable | None:
    """The content key of a tensor a mask holds (ids, lengths, layouts, a dense mask), at any size
    (:func:`qkv.fingerprint.content_key`); ``None`` while tracing (a compiled region must not read
    tensor contents) or for a tensor whose contents are not plain data."""
    try:
        return content_key(t)
    except Unkeyable:
        return None


class _Binary(Mask):
    """``a & b`` or ``a | b``: every question is answered from the two operands' answers."""

    op = "&"

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.name = f"({a.name} {self.op} {b.name})"

    def check(self, s: Shape) -> None:
        self.a.check(s)
        self.b.check(s)

    def shard_blocker(self) -> str | None:
        return self.a.shard_blocker() or self.b.shard_blocker()

    def globalize(self, gather: Callable[[Tensor], Tensor]) -> Mask:
        return type(self)(self.a.globalize(gather), self.b.globalize(gather))

    def cache_key(self) -> Hashable | None:
        ka = self.a.cache_key()
        kb = None if ka is None else self.b.cache_key()
        return None if ka is None or kb is None else (self.op, ka, kb)

    def cache_blocker(self) -> str | None:
        return self.a.cache_blocker() or self.b.cache_blocker()

    def _to_device(self, device: torch.device) -> None:
        self.a._to_device(device)
        self.b._to_device(device)


class _And(_Binary):
    op = "&"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.a.evaluate(s, b, h, q, k) & self.b.evaluate(s, b, h, q, k)

    def _any_all(self, s: Shape, bq: int, bk: int) -> tuple[Tensor, Tensor]:
        a_any, a_all = self.a._any_all(s, bq, bk)
        b_any, b_all = self.b._any_all(s, bq, bk)
        return a_any & b_any, a_all & b_all

    def window(self) -> tuple[int | None, int | None] | None:
        wa, wb = self.a.window(), self.b.window()
        if wa is None or wb is None:
            return None
        return _tighter(wa[0], wb[0]), _tighter(wa[1], wb[1])


def _tighter(x: int | None, y: int | None) -> int | None:
    return y if x is None else x if y is None else min(x, y)


class _Or(_Binary):
    op = "|"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.a.evaluate(s, b, h, q, k) | self.b.evaluate(s, b, h, q, k)

    def _any_all(self, s: Shape, bq: int, bk: int) -> tuple[Tensor, Tensor]:
        a_any, a_all = self.a._any_all(s, bq, bk)
        b_any, b_all = self.b._any_all(s, bq, bk)
        return a_any | b_any, a_all | b_all


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a
        self.name = f"~{a.name}"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return ~self.a.evaluate(s, b, h, q, k)

    def check(self, s: Shape) -> None:
        self.a.check(s)

    def _any_all(self, s: Shape, bq: int, bk: int) -> tuple[Tensor, Tensor]:
        a_any, a_all = self.a._any_all(s, bq, bk)
        return ~a_all, ~a_any

    def shard_blocker(self) -> str | None:
        return self.a.shard_blocker()

    def globalize(self, gather: Callable[[Tensor], Tensor]) -> Mask:
        return _Not(self.a.globalize(gather))

    def cache_key(self) -> Hashable | None:
        k = self.a.cache_key()
        return None if k is None else ("~", k)

    def cache_blocker(self) -> str | None:
        return self.a.cache_blocker()

    def _to_device(self, device: torch.device) -> None:
        self.a._to_device(device)


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


# ------------------------------------------------------------------------------------------------
# positional masks (formula in aligned positions: query i stands at i + Lk - Lq)


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


def _as_index_tensor(x: int | Sequence[int] | Tensor, what: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{what} must hold integers, got dtype {x.dtype}")
        return x.long()
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an int or a sequence of ints, got bool")
    if isinstance(x, int):
        return torch.tensor(x, dtype=torch.long)
    try:
        return torch.as_tensor(list(x), dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be an int, a sequence of ints or an integer tensor, got {x!r}") from e


class _KeyBelow(PositionalMask):
    """Keys ``j < n`` (per batch row when ``n`` is a ``(B,)`` tensor); raw key indices. Lengths are
    global, so the mask shards as it is."""

    def __init__(self, n: Tensor, what: str, name: str, axis: str = "k", bounded: bool = True):
        self.n, self.what, self.name, self.axis, self.bounded = n, what, name, axis, bounded

    def cache_key(self) -> Hashable | None:
        n = _tensor_key(self.n)
        return None if n is None else ("below", self.axis, self.bounded, n)

    def check(self, s: Shape) -> None:
        n = self.n
        L = s.Lk if self.axis == "k" else s.Lq
        if n.dim() > 1 or (n.dim() == 1 and n.shape[0] not in (1, s.B)):
            raise ValueError(
                f"{self.what} must be an int or hold one length per batch row: got shape {tuple(n.shape)}"
                f" for batch size B={s.B}"
            )
        if n.numel() and not _tracing() and (int(n.min()) < 0 or (self.bounded and int(n.max()) > L)):
            raise ValueError(
                f"{self.what} must lie in [0, {L}] ({'Lk' if self.axis == 'k' else 'Lq'}={L}),"
                f" got values in [{int(n.min())}, {int(n.max())}]"
            )

    def _n(self, b: Tensor) -> Tensor:
        n = self.n.to(b.device)
        if n.dim() == 0:
            return n
        if n.shape[0] == 1:
            return n[0]
        return n[b]

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        idx = k if self.axis == "k" else q
        return (idx < self._n(b)) & torch.ones_like(q + k, dtype=torch.bool)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        n = self.n.to(qlo.device)
        if n.dim() == 1:
            n = n.view(-1, 1, 1, 1)
        lo, hi = (klo, khi) if self.axis == "k" else (qlo, qhi)
        shape_ref = torch.zeros_like(qlo + klo)
        return (lo < n) | (shape_ref > 0), ((hi - 1) < n) | (shape_ref > 0)

    def _to_device(self, device: torch.device) -> None:
        self.n = self.n.to(device)


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
        st = _tensor_key(self.start)
        return None if st is None else ("from", st)

    def check(self, s: Shape) -> None:
        st = self.start
        if st.dim() > 1 or (st.dim() == 1 and st.shape[0] not in (1, s.B)):
            raise ValueError(
                f"left_padding: starts must be an int or hold one start per batch row: got shape {tuple(st.shape)}"
                f" for batch size B={s.B}"
            )
        if st.numel() and not _tracing() and (int(st.min()) < 0 or int(st.max()) > s.Lk):
            raise ValueError(
                f"left_padding: starts must lie in [0, {s.Lk}] (Lk={s.Lk}), got values in"
                f" [{int(st.min())}, {int(st.max())}]"
            )

    def _start(self, b: Tensor) -> Tensor:
        st = self.start.to(b.device)
        if st.dim() == 0:
            return st
        return st[0] if st.shape[0] == 1 else st[b]

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k >= self._start(b)) & torch.ones_like(q + k, dtype=torch.bool)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        st = self.start.to(qlo.device)
        if st.dim() == 1:
            st = st.view(-1, 1, 1, 1)
        shape_ref = torch.zeros_like(qlo + klo)
        return ((khi - 1) >= st) | (shape_ref > 0), (klo >= st) | (shape_ref > 0)

    def _to_device(self, device: torch.device) -> None:
        self.start = self.start.to(device)


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
        idx = _tensor_key(self.idx)
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

    def _to_device(self, device: torch.device) -> None:
        self.idx = self.idx.to(device)


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


# ------------------------------------------------------------------------------------------------
# id masks


def _ids_2d(ids: Tensor) -> Tensor:
    return ids if ids.dim() == 2 else ids.view(1, -1)


class _Document(Mask):
    """Packed sequences: query ``i`` sees key ``j`` iff ``q_ids[b, i] == kv_ids[b, j]``."""

    def __init__(self, q_ids: Tensor, kv_ids: Tensor):
        self.q_ids, self.kv_ids = q_ids, kv_ids
        self.name = "document"

    def check(self, s: Shape) -> None:
        for what, ids, L, n in (("q_ids", self.q_ids, s.Lq, "Lq"), ("kv_ids", self.kv_ids, s.Lk, "Lk")):
            if ids.dim() not in (1, 2):
                raise ValueError(f"document: {what} must be (L,) or (B, L), got shape {tuple(ids.shape)}")
            if ids.shape[-1] != L:
                raise ValueError(
                    f"document: {what} has length {ids.shape[-1]} but the sequence has {n}={L}"
                    f" (shape {tuple(ids.shape)})"
                )
            if ids.dim() == 2 and ids.shape[0] not in (1, s.B):
                raise ValueError(f"document: {what} has batch {ids.shape[0]} but B={s.B} (shape {tuple(ids.shape)})")

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        qi, ki = _ids_2d(self.q_ids.to(q.device)), _ids_2d(self.kv_ids.to(q.device))
        bq = b if qi.shape[0] > 1 else torch.zeros_like(b)
        bk = b if ki.shape[0] > 1 else torch.zeros_like(b)
        return qi[bq, q] == ki[bk, k]

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor]:
        bq, bk = int((qhi - qlo).max()), int((khi - klo).max())
        return self._minmax_bounds(s, bq, bk, qlo.shape[0], klo.shape[1], qlo.device)

    def _any_all(self, s: Shape, bq: int, bk: int) -> tuple[Tensor, Tensor]:
        # the block sizes as numbers: no tensor value is read, so this traces into a compiled graph
        return self._minmax_bounds(s, bq, bk, -(-s.Lq // bq), -(-s.Lk // bk), s.device)

    def _minmax_bounds(
        self, s: Shape, bq: int, bk: int, nq: int, nk: int, dev: torch.device
    ) -> tuple[Tensor, Tensor]:
        qmin, qmax = _block_minmax(_ids_2d(self.q_ids.to(dev)), s.Lq, nq, bq)
        kmin, kmax = _block_minmax(_ids_2d(self.kv_ids.to(dev)), s.Lk, nk, bk)
        # (Bi, nq, 1) against (Bi, 1, nk)
        qmin, qmax, kmin, kmax = qmin[:, :, None], qmax[:, :, None], kmin[:, None, :], kmax[:, None, :]
        any_ = (qmin <= kmax) & (kmin <= qmax)
        all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return any_[:, None], all_[:, None]

    def _to_device(self, device: torch.device) -> None:
        self.q_ids, self.kv_ids = self.q_ids.to(device), self.kv_ids.to(device)

    def shard_blocker(self) -> str | None:
        return None

    def globalize(self, gather: Callable[[Tensor], Tensor]) -> Mask:
        """The ids are the local shard's: gather them into the whole sequence's."""
        qi = gather(self.q_ids)
        return _Document(qi, qi if self.kv_ids is self.q_ids else gather(self.kv_ids))

    def cache_key(self) -> Hashable | None:
        qk = _tensor_key(self.q_ids)
        kk = qk if self.kv_ids is self.q_ids else _tensor_key(self.kv_ids)  # self-attention: read once
        return None if qk is None or kk is None else ("document", qk, kk)


def _block_minmax(ids: Tensor, L: int, n: int, block: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of ``ids (Bi, L)`` over blocks of ``block``: two ``(Bi, n)`` tensors."""
    pad = n * block - L
    info = torch.iinfo(ids.dtype)  # padding that never wins a min or a max (read from no tensor value)
    lo = torch.cat((ids, ids.new_full((ids.shape[0], pad), info.max)), dim=1).view(ids.shape[0], n, block)
    hi = torch.cat((ids, ids.new_full((ids.shape[0], pad), info.min)), dim=1).view(ids.shape[0], n, block)
    return lo.amin(-1), hi.amax(-1)


def document(q_ids: Sequence[int] | Tensor, kv_ids: Sequence[int] | Tensor | None = None) -> Mask:
    """Packed sequences (document masking): query ``i`` sees key ``j`` only within one document.

    Args:
        q_ids: document id of every query, shape ``(Lq,)`` or ``(B, Lq)``.
        kv_ids: document id of every key, shape ``(Lk,)`` or ``(B, Lk)``; defaults to ``q_ids``
            (self-attention).

    Combine with :func:`causal` for packed causal language modelling. Tiles are classified from
    each tile's min and max id: exact for sorted ids (the packed layout), conservative otherwise.

    Example:
        >>> import torch
        >>> from qkv import masks
        >>> ids = torch.tensor([0, 0, 1, 1, 1])             # two documents packed in one row
        >>> (masks.document(ids) & masks.causal()).to_dense(Lq=5, Lk=5)[0, 0].int()
        tensor([[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
    """
    qi = _as_index_tensor(q_ids, "document: q_ids")
    ki = qi if kv_ids is None else _as_index_tensor(kv_ids, "document: kv_ids")
    if qi.dim() == 0 or ki.dim() == 0:
        raise ValueError("document: ids must be (L,) or (B, L) tensors, got a scalar")
    return _Document(qi, ki)


def from_cu_seqlens(
    cu_seqlens_q: Sequence[int] | Tensor, cu_seqlens_k: Sequence[int] | Tensor | None = None, causal: bool = False
) -> Mask:
    """flash-attn's varlen layout: sequences packed end to end, delimited by cumulative offsets
    ``cu_seqlens = [0, len_0, len_0 + len_1, ...]`` (shape ``(n_seqs + 1,)``).

    With ``causal=True`` each sequence is causal on its own, aligned bottom-right when its query
    and key lengths differ, exactly as ``flash_attn_varlen_func(..., causal=True)``.
    """
    cq = _as_index_tensor(cu_seqlens_q, "from_cu_seqlens: cu_seqlens_q")
    ck = cq if cu_seqlens_k is None else _as_index_tensor(cu_seqlens_k, "from_cu_seqlens: cu_seqlens_k")
    for what, c in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        if c.dim() != 1 or c.numel() < 2 or int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
            raise ValueError(
                f"from_cu_seqlens: {what} must be a non-decreasing 1-D tensor starting at 0, got {c.tolist()}"
            )
    if cq.numel() != ck.numel():
        raise ValueError(f"from_cu_seqlens: cu_seqlens_q has {cq.numel()} entries but cu_seqlens_k has {ck.numel()}")

    def ids(c: Tensor) -> Tensor:
        return torch.searchsorted(c[1:], torch.arange(int(c[-1])), right=True)

    doc: Mask = _Document(ids(cq), ids(ck))
    if not causal:
        return doc
    return doc & _VarlenCausal(cq, ck)


class _VarlenCausal(Mask):
    """Causal within each packed sequence, aligned bottom-right per sequence."""

    name = "varlen_causal"

    def __init__(self, cq: Tensor, ck: Tensor):
        self.cq, self.ck = cq, ck
        nq, nk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
        # key position allowed: j - ck[d] <= i - cq[d] + nk[d] - nq[d]  <=>  j - i <= shift[d]
        self.shift = ck[:-1] - cq[:-1] + nk - nq

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        d = torch.searchsorted(self.cq[1:].to(q.device), q, right=True).clamp(max=self.shift.numel() - 1)
        return (k - q) <= self.shift.to(q.device)[d]

    def shard_blocker(self) -> str | None:
        return _tied_to_layout(self)

    def cache_key(self) -> Hashable | None:
        cq = _tensor_key(self.cq)
        ck = cq if self.ck is self.cq else _tensor_key(self.ck)
        return None if cq is None or ck is None else ("varlen_causal", cq, ck)


def _tied_to_layout(m: Mask) -> str:
    return (
        f"mask {m.name} is tied to a layout of the whole sequence; sequence-parallel attention takes"
        " positional masks (causal, sliding_window, ...), document(local ids) and mask_mod functions"
    )


# ------------------------------------------------------------------------------------------------
# block and dense masks


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

    def _to_device(self, device: torch.device) -> None:
        self.layout = self.layout.to(device)

    def shard_blocker(self) -> str | None:
        return _tied_to_layout(self)

    def cache_key(self) -> Hashable | None:
        lay = _tensor_key(self.layout)
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

    def _to_device(self, device: torch.device) -> None:
        super()._to_device(device)
        self._cache = {key: lay.to(device) for key, lay in self._cache.items()}


def random_blocks(num_blocks: int, block_size: int, seed: int = 0) -> Mask:
    """BigBird's random attention: each query block sees ``num_blocks`` key blocks drawn at random
    (the same draw for every batch row and head), reproducibly from ``seed``."""
    if num_blocks < 0 or block_size < 1:
        raise ValueError(f"random_blocks: need num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}")
    return _RandomBlocks(num_blocks, block_size, seed)


class _Dense(Mask):
    def __init__(self, t: Tensor):
        self.t = t
        self.name = f"dense{tuple(t.shape)}"

    def _t4(self, device: torch.device) -> Tensor:
        t = self.t.to(device)
        while t.dim() < 4:
            t = t.unsqueeze(0)
        return t

    def check(self, s: Shape) -> None:
        want = (s.B, s.H, s.Lq, s.Lk)
        got = tuple(self.t.shape)
        if len(got) > 4 or any(g not in (1, w) for g, w in zip(reversed(got), reversed(want))):
            raise ValueError(f"mask of shape {got} does not broadcast to (B, H, Lq, Lk) = {want}")

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        t = self._t4(q.device)
        idx = [x if t.shape[i] > 1 else torch.zeros_like(x) for i, x in enumerate((b, h, q, k))]
        return t[idx[0], idx[1], idx[2], idx[3]]

    def tile(self, s: Shape, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        t = self._t4(s.device)
        t = t.expand(*t.shape[:2], s.Lq, s.Lk) if t.shape[-2:] != (s.Lq, s.Lk) else t
        return t[..., q0:q1, k0:k1]

    def _to_device(self, device: torch.device) -> None:
        self.t = self.t.to(device)

    def shard_blocker(self) -> str | None:
        return _tied_to_layout(self)

    def cache_key(self) -> Hashable | None:
        t = _tensor_key(self.t)
        return None if t is None else ("dense", t)


def from_dense(mask: Tensor) -> Mask:
    """A mask from a bool tensor broadcastable to ``(B, H, Lq, Lk)`` (True = may attend).

    An additive float mask is not a ``Mask``: pass it as ``score_mod=qkv.scores.bias(t)``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"from_dense: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}; pass an additive"
            " float mask as score_mod=qkv.scores.bias(tensor)"
        )
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dims (B, H, Lq, Lk), got shape {tuple(mask.shape)}")
    return _Dense(mask)


class _Fn(Mask):
    def __init__(self, fn: MaskMod, name: str, key: object = None):
        self.fn, self.name, self.key = fn, name, key

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = self.fn(b, h, q, k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"mask_mod {self.name} must return a bool tensor, got "
                f"{out.dtype if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out

    def shard_blocker(self) -> str | None:
        return None  # a mask_mod speaks global indices

    def _key(self) -> tuple[Hashable | None, str | None]:
        if self.key is None:
            k, why = fingerprint_or_none(self.fn)
            return (None, f"mask_mod {self.name}: {why}") if k is None else (("fn", k), None)
        # the user named what the function depends on: its code (or the callable itself) and that key
        code = getattr(self.fn, "__code__", None)
        k, why = fingerprint_or_none(self.key, max_bytes=None)
        if k is None:
            return None, f"mask_mod {self.name}: its key= cannot be keyed: {why}"
        return ("fn-key", code if code is not None else Ref(self.fn), k), None

    def cache_key(self) -> Hashable | None:
        return self._key()[0]

    def cache_blocker(self) -> str | None:
        return self._key()[1]


def from_fn(mask_mod: MaskMod, name: str | None = None, *, key: object = None) -> Mask:
    """A mask from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

    The function receives raw indices (no bottom-right shift) as broadcastable integer tensors and
    must be built from tensor operations (as FlexAttention requires). Tiles are classified by
    evaluating them, and that classification (the plan) is cached under a fingerprint of everything
    the function can read, so FlexAttention's idiom is safe: a ``mask_mod`` that reads the current
    batch's document ids from a tensor it closes over or names as a global may be passed again after
    the ids changed (in place, or the global or closure cell rebound), and the plan follows them.
    The fingerprint (:mod:`qkv.fingerprint`) covers the code, closure cells, defaults and the globals
    the code names, followed through functions it calls, ``functools.partial``, bound methods and
    objects, with tensors by contents; attributes of modules and ``nn.Module`` objects by the names the code
    spells. Where it meets state it cannot read (a ``torch.Generator``, ``globals()``, a tensor while
    ``torch.compile`` traces) the plan is built again on every call (:func:`qkv.explain` says so).

    Args:
        mask_mod: the function; ``mask_mod(b, h, q_idx, kv_idx)`` with ``b (B,1,1,1)``, ``h (1,H,1,1)``,
            ``q_idx (1,1,Lq,1)``, ``kv_idx (1,1,1,Lk)`` integer tensors (or scalars under FlexAttention's
            vmap) returns a bool tensor broadcastable to ``(B, H, Lq, Lk)``, True = may attend.
        name: shown by ``repr`` and :func:`qkv.explain` (default: the function's ``__name__``).
        key: for a function that reads state qkv cannot fingerprint: the values its answer depends on
            (a tensor, numbers, a tuple of them), keyed by contents like the function's own state. The
            fingerprint is then not taken: plans are cached per (the function's code, ``key``), so
            ``key`` must name everything the answer depends on. ``None`` (the default): fingerprint.

    >>> from qkv import masks
    >>> def every_other(b, h, q_idx, kv_idx):
    ...     return (q_idx - kv_idx) % 2 == 0
    >>> masks.from_fn(every_other).to_dense(Lq=3, Lk=3)[0, 0].int()
    tensor([[1, 0, 1],
            [0, 1, 0],
            [1, 0, 1]], dtype=torch.int32)
    """
    if not callable(mask_mod):
        raise TypeError(f"from_fn: mask_mod must be callable, got {type(mask_mod).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"from_fn: name must be a string, got {type(name).__name__}")
    return _Fn(mask_mod, name or str(getattr(mask_mod, "__name__", "mask_mod")), key)


MaskLike = Union[Mask, Tensor, MaskMod]
"""What ``mask=`` accepts: a :class:`Mask`, a bool tensor broadcastable to ``(B, H, Lq, Lk)`` (True = may
attend), or a FlexAttention ``mask_mod`` (:data:`MaskMod`)."""


def _need(mask: MaskLike) -> Mask:
    m = as_mask(mask)
    if m is None:
        raise TypeError("cannot combine a mask with None")
    return m


def as_mask(mask: MaskLike | None) -> Mask | None:
    """Turn whatever a user passed as ``mask=`` into a :class:`Mask` (or ``None``)."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        return from_dense(mask)
    if callable(mask):
        return from_fn(mask)
    raise TypeError(
        "mask must be a qkv.masks.Mask, a bool tensor broadcastable to (B, H, Lq, Lk) or a "
        f"mask_mod(b, h, q_idx, kv_idx) function, got {type(mask).__name__}"
    )

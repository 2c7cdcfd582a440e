"""The :class:`Mask` type, the questions backends ask it, its algebra (``&``, ``|``, ``~``), and the
vocabulary every mask shares: :class:`Shape`, the tile kinds, :data:`MaskMod`, :func:`tensor_key`.

The algebra lives here, beside the base class, because ``Mask.__and__`` must build an ``_And``:
defined in another module, that module would import this one (to subclass ``Mask``) and this one it
(to build the result), a circle. Turning an operand that is not a mask (a bool tensor, a
``mask_mod``) into one is :func:`qkv.masks.as_mask`'s work, in ``custom.py``, which registers it
here when the package loads (``_convert_operands_with``), for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from ..fingerprint import Unkeyable, content_key, keyed_by_cache_key

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: PyTorch FlexAttention's convention (documented as
:data:`qkv.masks.MaskMod`)."""

_CPU = torch.device("cpu")

EMPTY, FULL, PARTIAL = 0, 1, 2
"""Tile kinds returned by :meth:`Mask.block_kinds` (documented as :data:`qkv.masks.EMPTY`, ``FULL``,
``PARTIAL``)."""


@dataclass(frozen=True, init=False)
class Shape:
    """The problem a mask is applied to: batch, query heads, query and key lengths, device."""

    B: int
    H: int
    Lq: int
    Lk: int
    device: torch.device = torch.device("cpu")

    def __init__(self, B: int, H: int, Lq: int, Lk: int, device: torch.device = _CPU) -> None:
        # frozen: set once, here (one call: a shape is made per attention call)
        self.__dict__.update(B=B, H=H, Lq=Lq, Lk=Lk, device=device)

    @property
    def offset(self) -> int:
        """Key position of query 0 under bottom-right alignment: ``Lk - Lq``."""
        return self.Lk - self.Lq


def tensor_key(t: Tensor) -> Hashable | None:
    """The cache key of a tensor a mask holds (ids, lengths, a layout, a dense mask), by its contents at
    any size: dtype, shape and the bytes (a SHA-256 digest above 64 KiB; :func:`qkv.fingerprint.content_key`),
    so a tensor changed in place gives a new key. ``None`` while ``torch.compile`` traces (a traced region
    reads no tensor values) and for tensors whose contents are not plain data (subclasses, meta, sparse).

    What a :meth:`Mask.cache_key` of a mask that holds data is built from; a ``None`` part makes the
    whole key ``None``:

    >>> import torch
    >>> from qkv.masks import tensor_key
    >>> ids = torch.tensor([0, 0, 1])
    >>> tensor_key(ids) == tensor_key(ids.clone())
    True
    >>> before = tensor_key(ids)
    >>> ids[2] = 0                                      # in place: the key follows the contents
    >>> tensor_key(ids) == before
    False
    """
    try:
        return content_key(t)
    except Unkeyable:
        return None


def _tracing() -> bool:
    """Whether this code is being traced into a graph (``torch.compile``, ``torch.export``): then masks
    read no tensor values (checks of ids, lengths and positions against the shape are skipped there;
    they run in eager calls)."""
    return torch.compiler.is_compiling()


def _grid(n: int, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Start (inclusive) and end (exclusive) of each block of a length-``n`` axis."""
    lo = torch.arange(0, n, block, device=device)
    return lo, torch.clamp(lo + block, max=n)


@keyed_by_cache_key
class Mask:
    """Which (query, key) pairs may attend. Subclasses define :meth:`evaluate` and, to let backends skip
    work, :meth:`tile_bounds` or :meth:`bounds`.

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

    **Writing a mask** (a worked example: ``docs/masks.md``, "Adding a mask"). Backends ask a mask
    questions only through the methods below; a subclass answers those it can, and each default is
    safe (it costs speed, never a wrong answer). What each answer must guarantee:

    - :meth:`evaluate` (required): True exactly where query ``q`` may see key ``k``. The ground truth
      every other answer must agree with.
    - :meth:`tile_bounds` ``(any, all)`` per tile of a regular grid: ``any`` may over-state (a tile
      called live may hold no live pair: it is computed and masked), ``all`` may under-state (a full
      tile may be called partial: the mask is applied on it); never the other way round, or a backend
      skips live pairs or leaves dead ones unmasked. The default asks :meth:`bounds`, else evaluates the
      tiles. A mask that holds data (ids, limits, a layout) overrides it to reduce its data per block.
    - :meth:`bounds`: the same for tiles with any edges, from a formula; ``None`` (the default) when
      there is none.
    - :meth:`cache_key`: equal for two masks only when they allow the same pairs on every problem: the
      mask's type, every parameter, and every tensor it holds by contents (:func:`tensor_key`), so a
      tensor changed in place gives a new key and a new plan. ``None`` (the default) when it cannot say:
      plans are then built on every call, never reused.
    - :meth:`window`: ``None`` unless the mask is exactly a sliding window (kernels with a causal flag
      or a window size trust it and apply no mask).
    - :meth:`allows_all`: ``True`` only when the mask allows every pair of the problem at hand (then
      :func:`qkv.attention` drops it); the default reads :meth:`window`.
    - :meth:`to`: moves every tensor the mask holds to a device, in place, and returns the mask.
    - :meth:`check`: raises ``ValueError`` naming the argument when the mask cannot apply to a shape.
    - :meth:`shard_blocker` / :meth:`globalize`: how it maps to global positions of a sequence split over
      ranks; by default it is refused there.

    **The tracing rule.** While ``torch.compile`` or ``torch.export`` traces
    (``torch.compiler.is_compiling()``), nothing may read a tensor's values (``.item()``, ``.tolist()``,
    ``int(t)``, ``bool(t)``, a Python ``if`` on a tensor): :meth:`evaluate` and :meth:`tile_bounds` must
    be tensor operations on shapes and block sizes only (they run in the graph: ``sdpa`` builds its
    dense mask there, ``flex`` its ``BlockMask``); :meth:`check` reads values only when not tracing;
    :meth:`cache_key` answers ``None`` then (:func:`tensor_key` does so itself).
    """

    #: a short human name shown in ``repr`` and by :func:`qkv.explain`
    name: str = "mask"

    # ---- what subclasses define -------------------------------------------------------------
    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool tensor broadcast from the index tensors: True where query ``q`` may see key ``k``.

        Args:
            s: the problem (its ``offset`` is the bottom-right shift ``Lk - Lq``).
            b: batch index, ``(B, 1, 1, 1)``.
            h: head index, ``(1, H, 1, 1)``.
            q: query index, ``(1, 1, Lq, 1)`` (raw, not shifted).
            k: key index, ``(1, 1, 1, Lk)``.

        Any of them may be a 0-d tensor instead (FlexAttention's vmap); the result broadcasts to
        ``(B, H, Lq, Lk)`` and may keep size-1 dims where the mask does not depend on them."""
        raise NotImplementedError

    def tile_bounds(self, s: Shape, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        """``(any, all)`` for every tile of the regular grid of ``block_q`` queries by ``block_k`` keys:
        two bool tensors broadcastable to ``(B, H, ceil(Lq/block_q), ceil(Lk/block_k))`` (the last tile
        of each axis may be shorter). ``any``: some pair of the tile may attend; ``all``: every pair may.

        ``any`` may over-state and ``all`` may under-state, never the other way round. The default asks
        :meth:`bounds` on the grid and otherwise evaluates the tiles, one row of query tiles at a time
        (memory ``O(block_q * Lk)``). Override it when the mask can answer from its data per block (the
        block sizes are numbers, so the data can be reshaped into blocks without reading its values);
        :meth:`block_kinds` and the algebra (``&``, ``|``, ``~``) call it."""
        qlo, qhi = _grid(s.Lq, block_q, s.device)
        klo, khi = _grid(s.Lk, block_k, s.device)
        got = self.bounds(s, qlo[:, None], qhi[:, None], klo[None, :], khi[None, :])
        if got is not None:
            return got
        return _evaluate_tiles(self, s, block_q, block_k)

    def bounds(self, s: Shape, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(any, all)`` for tiles ``[qlo, qhi) x [klo, khi)`` (``qlo`` is ``(nq, 1)``, ``klo`` is
        ``(1, nk)``), broadcastable to ``(B, H, nq, nk)``, from the mask's formula. ``any`` may
        over-state, ``all`` may under-state. ``None`` (the default) means: no formula (the default
        :meth:`tile_bounds` then evaluates the tiles)."""
        return None

    def check(self, s: Shape) -> None:
        """Raise ``ValueError`` if this mask cannot apply to a problem of shape ``s``."""

    def window(self) -> tuple[int | None, int | None] | None:
        """``(left, right)`` when this mask is exactly a sliding window: query at aligned position
        ``p`` sees keys ``p - left <= j <= p + right`` (``None`` = unbounded on that side). ``causal()``
        is ``(None, 0)``, ``full()`` is ``(None, None)``, ``causal() & sliding_window(256)`` is
        ``(256, 0)``. ``None`` for every other mask. Kernels with a causal flag or a window size read it."""
        return None

    def allows_all(self, s: Shape) -> bool:
        """True only when this mask lets every query of problem ``s`` see every key of it: then the
        request is the same problem with no mask, and :func:`qkv.attention` runs it without one (SDPA
        with no dense mask, ``tiled`` as one call). ``False`` is always safe (the mask is applied);
        ``True`` must be certain, from the mask's structure alone (no tensor values: it is asked while
        ``torch.compile`` traces too).

        The default reads :meth:`window`: a window ``(left, right)`` under bottom-right alignment (query
        ``i`` at position ``p = i + Lk - Lq`` sees keys ``p - left <= j <= p + right``) allows every pair
        exactly when ``right >= Lq - 1`` (the first query reaches the last key: ``Lk - 1 - (0 + Lk - Lq)``)
        and ``left >= Lk - 1`` (the last query reaches key 0: ``Lq - 1 + Lk - Lq - 0``), ``None`` being
        unbounded. So ``causal()`` allows every pair when ``Lq <= 1`` (one decoding step against a KV
        cache), ``full()`` always, ``causal() & sliding_window(w)`` when ``Lq <= 1`` and ``Lk <= w + 1``.
        Empty problems (``Lq == 0`` or ``Lk == 0``) have no pair to forbid.

        >>> from qkv import masks
        >>> masks.causal().allows_all(masks.Shape(B=1, H=8, Lq=1, Lk=128))
        True
        >>> masks.causal().allows_all(masks.Shape(B=1, H=8, Lq=2, Lk=128))
        False
        """
        if s.Lq == 0 or s.Lk == 0:
            return True
        w = self.window()
        if w is None:
            return False
        left, right = w
        return (right is None or right >= s.Lq - 1) and (left is None or left >= s.Lk - 1)

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
        the function can read (:mod:`qkv.fingerprint`). A subclass that holds data must key on all of it,
        with :func:`tensor_key` for its tensors (the default, ``None``, is always safe). While
        ``torch.compile`` traces, masks that hold tensors answer ``None``: their values are not known then."""
        return None

    def cache_blocker(self) -> str | None:
        """``None`` when :meth:`cache_key` names this mask (its plans are cached); otherwise why not, in
        words: plans for it are then built on every call (:func:`qkv.explain` shows this)."""
        if self.cache_key() is not None:
            return None
        if _tracing():
            return f"mask {self.name}: its tensors are not read while torch.compile traces"
        return f"mask {self.name} names no cache key (a Mask subclass keys itself with cache_key())"

    def to(self, device: torch.device | str) -> Mask:
        """Move the tensors this mask holds (ids, lengths, layouts) to ``device`` in place, as
        ``nn.Module.to`` does, and return the mask. Kernels that capture them (a compiled
        FlexAttention ``mask_mod``) need them on the device of the queries; evaluating works anywhere.

        A subclass that holds tensors overrides it (moving each, then ``return self``); the default
        holds none."""
        return self

    # ---- what backends call ------------------------------------------------------------------
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

        From :meth:`tile_bounds`: named masks answer from their formula or their data; custom masks
        evaluate each tile (one row of tiles at a time, so memory stays ``O(block_q * Lk)``)."""
        any_, all_ = self.tile_bounds(s, block_q, block_k)
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
        self.to(dev)
        return create_block_mask(self.mask_mod(Lq, Lk, B, H), B, H, Lq, Lk, device=str(dev), BLOCK_SIZE=BLOCK_SIZE)

    # ---- algebra -----------------------------------------------------------------------------
    def __and__(self, other: MaskLike) -> Mask:
        return _And(self, _operand(other))

    def __rand__(self, other: MaskLike) -> Mask:
        return _And(_operand(other), self)

    def __or__(self, other: MaskLike) -> Mask:
        return _Or(self, _operand(other))

    def __ror__(self, other: MaskLike) -> Mask:
        return _Or(_operand(other), self)

    def __invert__(self) -> Mask:
        return _Not(self)

    def __repr__(self) -> str:
        return self.name


MaskLike = Union[Mask, Tensor, MaskMod]
"""What ``mask=`` accepts (documented as :data:`qkv.masks.MaskLike`)."""


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
# operands of & and |: a Mask, or what as_mask turns into one


_as_mask: Callable[[Any], Mask | None] | None = None


def _convert_operands_with(as_mask: Callable[[Any], Mask | None]) -> None:
    """Register :func:`qkv.masks.as_mask` as the conversion of operands of ``&`` and ``|`` that are not
    masks (``custom.py`` calls it on import; it subclasses ``Mask``, so this module cannot import it)."""
    global _as_mask
    _as_mask = as_mask


def _operand(mask: MaskLike) -> Mask:
    if isinstance(mask, Mask):
        return mask
    if mask is None:
        raise TypeError("cannot combine a mask with None")
    if _as_mask is None:  # pragma: no cover - the package's __init__ loads custom.py before any mask exists
        raise RuntimeError("qkv.masks.custom is not loaded: import qkv.masks")
    m = _as_mask(mask)
    assert m is not None
    return m


# ------------------------------------------------------------------------------------------------
# algebra


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

    def to(self, device: torch.device | str) -> Mask:
        self.a.to(device)
        self.b.to(device)
        return self


class _And(_Binary):
    op = "&"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.a.evaluate(s, b, h, q, k) & self.b.evaluate(s, b, h, q, k)

    def tile_bounds(self, s: Shape, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        a_any, a_all = self.a.tile_bounds(s, block_q, block_k)
        b_any, b_all = self.b.tile_bounds(s, block_q, block_k)
        return a_any & b_any, a_all & b_all

    def allows_all(self, s: Shape) -> bool:
        return self.a.allows_all(s) and self.b.allows_all(s)

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

    def allows_all(self, s: Shape) -> bool:
        return self.a.allows_all(s) or self.b.allows_all(s)

    def tile_bounds(self, s: Shape, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        a_any, a_all = self.a.tile_bounds(s, block_q, block_k)
        b_any, b_all = self.b.tile_bounds(s, block_q, block_k)
        return a_any | b_any, a_all | b_all


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a
        self.name = f"~{a.name}"

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return ~self.a.evaluate(s, b, h, q, k)

    def check(self, s: Shape) -> None:
        self.a.check(s)

    def tile_bounds(self, s: Shape, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        a_any, a_all = self.a.tile_bounds(s, block_q, block_k)
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

    def to(self, device: torch.device | str) -> Mask:
        self.a.to(device)
        return self


# ------------------------------------------------------------------------------------------------
# helpers the named masks share


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


def _tied_to_layout(m: Mask) -> str:
    return (
        f"mask {m.name} is tied to a layout of the whole sequence; sequence-parallel attention takes"
        " positional masks (causal, sliding_window, ...), document(local ids) and mask_mod functions"
    )

"""Plans: what a backend decides before computing, as data, built once and cached.

The lesson of FlexAttention's ``BlockMask``: the block structure of a mask is computed once and handed
to a kernel that never inspects the mask. A :class:`TilePlan` is that for ``tiled`` (and what ``auto``
reads the live fraction from): for a mask and a problem shape, which (query tile, key block) pairs are
empty, full or partial, and the key segments each query tile visits.

Plans are cached (:data:`PLANS`) under the mask's :meth:`~qkv.masks.Mask.cache_key` (its parameters
and the contents of every tensor it holds or, for a ``mask_mod``, can read), so the layers of a model
that share a mask, and the next step of a training loop over the same data, reuse the plan, and a mask
whose data changed gets a new one. A mask that cannot name itself (``cache_key() is None``: a
``mask_mod`` reading state qkv cannot fingerprint, any mask while ``torch.compile`` traces) has its plan
built again for each call and kept nowhere: never the plan of another call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, PARTIAL, Mask, Shape

__all__ = ["PLANS", "Band", "PlanCache", "PlanScope", "Segment", "Tile", "TilePlan", "block_codes", "plan_tiles", "tile_plan"]

T = TypeVar("T")

MERGE_FULL = 4
"""A run of at most this many full key blocks next to partial ones is computed with them in one call."""

BAND_ROWS = 64
"""Query rows per batch entry of a :class:`Band`, at least (0: no bands)."""


_MISSING = object()


class PlanScope:
    """The context of :meth:`PlanCache.scope` (a class: cheaper than a generator per call)."""

    __slots__ = ("local", "outer")

    def __init__(self, local: Any) -> None:
        self.local = local  # the cache's threading.local
        self.outer = False

    def __enter__(self) -> None:
        self.outer = getattr(self.local, "memo", None) is None
        if self.outer:
            self.local.memo = {}

    def __exit__(self, *exc: object) -> None:
        if self.outer:
            self.local.memo = None


class PlanCache:
    """A bounded cache of plans keyed by (mask, what): ``get(mask, key, build)`` returns the plan built
    by ``build()`` for the mask's :meth:`~qkv.masks.Mask.cache_key`. A mask without a key gets a plan
    built for the call (kept only for the rest of the call, inside :meth:`scope`), never a stored one.

    ``builds``, ``hits`` and ``uncached`` (builds for masks without a key) count what happened (tests
    and benchmarks read them)."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._lru: OrderedDict[Hashable, Any] = OrderedDict()
        self._local = threading.local()
        self.builds = 0
        self.hits = 0
        self.uncached = 0

    def scope(self) -> PlanScope:
        """One call of attention (``auto``'s choice, a backend's plan and its run): inside it a mask's key
        is computed once however many backends ask (a ``mask_mod``'s fingerprint reads its tensors), and
        a plan is looked up (or, for a mask without a key, built) once. Nested scopes join the outermost.
        Use as ``with PLANS.scope(): ...``."""
        return PlanScope(self._local)

    def key(self, mask: Mask) -> Hashable | None:
        """``mask.cache_key()``, computed once per :meth:`scope`."""
        memo: dict[Hashable, Any] | None = getattr(self._local, "memo", None)
        if memo is None:
            return mask.cache_key()
        got = memo.get(id(mask))
        if got is None or got[0] is not mask:  # the memo holds the mask: its id is not reused in the scope
            got = memo[id(mask)] = (mask, mask.cache_key())
        return got[1]

    def get(self, mask: Mask | None, key: Hashable, build: Callable[[], T]) -> T:
        memo: dict[Hashable, Any] | None = getattr(self._local, "memo", None)
        mk = None if mask is None else self.key(mask)  # in a scope, the memo now holds the mask
        here = None if memo is None or mask is None else ("plan", id(mask), key)
        if here is not None and memo is not None and here in memo:  # asked again within the call (auto's cost, then its run)
            return memo[here]  # type: ignore[no-any-return]
        if mask is not None and mk is None:  # unknowable: built for this call, stored nowhere else
            value = build()
            self.builds += 1
            self.uncached += 1
        else:
            full_key = (mk, key)
            value = self._lru.get(full_key, _MISSING)
            if value is not _MISSING:
                self._lru.move_to_end(full_key)
                self.hits += 1
            else:
                value = build()
                self.builds += 1
                self._lru[full_key] = value
                if len(self._lru) > self.size:
                    self._lru.popitem(last=False)
        if here is not None and memo is not None:
            memo[here] = value
        return value  # type: ignore[no-any-return]

    def clear(self) -> None:
        self._lru.clear()
        self.builds = self.hits = self.uncached = 0


PLANS = PlanCache()
"""The process-wide plan cache every backend uses."""


# ------------------------------------------------------------------------------------------------
# tile plans


@dataclass(frozen=True)
class Segment:
    """Keys ``[k0, k1)`` of one query tile, computed with the mask (``partial``) or without it.

    ``tri`` marks a square segment whose mask is exactly a triangle, which a fused kernel computes
    with ``is_causal`` (skipping the other half): ``"lower"`` (key ``j`` allowed iff ``j - k0 <= i - q0``,
    the diagonal of causal attention) or ``"upper"`` (``j - k0 >= i - q0``, the far edge of a causal
    sliding window; computed with rows and keys reversed)."""

    k0: int
    k1: int
    partial: bool
    tri: str = ""


@dataclass(frozen=True)
class Tile:
    """Query rows ``[q0, q1)`` and the key segments they visit (none: every row sees nothing)."""

    q0: int
    q1: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Band:
    """Query rows ``[q0, q1)`` of a causal sliding window computed as ONE call of a fused kernel.

    The rows are cut into ``(q1 - q0) / rows`` tiles of ``rows`` queries; each tile is one batch entry
    of the call and sees the ``span = reach + rows`` keys that end at its own last position (strided,
    overlapping views of K and V: no copy), under one additive mask ``(rows, span)`` that every tile
    shares: row ``r`` may see key ``c`` of its span iff ``r + reach - window <= c <= r + reach``.
    ``reach`` is the window rounded up to a multiple of ``rows`` (so that the keys of the tiles fall
    on a grid of ``rows``); the tile of queries starting at ``p`` spans keys ``[p + offset - reach,
    p + offset + rows)``. Against triangles computed with a causal flag, it computes ``span`` keys per
    row instead of ``window + block_q`` (PyTorch's CPU kernel skips causal work only in blocks of
    hundreds of keys), with no flipped copies and no merges, in one call instead of two per tile."""

    q0: int
    q1: int
    rows: int
    window: int
    reach: int

    @property
    def span(self) -> int:
        """Keys each tile sees."""
        return self.reach + self.rows

    @property
    def tiles(self) -> int:
        """Batch entries of the call."""
        return (self.q1 - self.q0) // self.rows


@dataclass(frozen=True)
class TilePlan:
    """The work of one (mask, shape, block sizes): see the module docstring.

    ``codes`` is ``(ceil(Lq/block_q), ceil(Lk/block_k))`` int8 (:data:`~qkv.masks.EMPTY`, ``FULL``,
    ``PARTIAL``, each for every batch row and head together); ``single`` is ``"full"`` when the whole
    problem is one unmasked call, ``"causal"`` when it is one square causal call, else ``""``."""

    shape: Shape
    block_q: int
    block_k: int
    codes: Tensor
    tiles: tuple[Tile, ...]
    single: str
    band: Band | None = None
    """Query rows a fused kernel may compute as one batched band (their tiles are then skipped)."""

    def in_band(self, t: Tile) -> bool:
        """Whether tile ``t`` lies in :attr:`band`."""
        return self.band is not None and self.band.q0 <= t.q0 and t.q1 <= self.band.q1

    @property
    def blocks(self) -> int:
        """How many (query tile, key block) pairs the grid has."""
        return int(self.codes.numel())

    @property
    def live_fraction(self) -> float:
        """The fraction of (query tile, key block) pairs that are not empty."""
        return float((self.codes != EMPTY).float().mean()) if self.codes.numel() else 1.0

    @property
    def pairs(self) -> float:
        """(query, key) pairs the segments compute (a triangle counts half): the work, per batch row and head."""
        n = 0.0
        for t in self.tiles:
            rows = t.q1 - t.q0
            for s in t.segments:
                n += rows * (s.k1 - s.k0) * (0.5 if s.tri else 1.0)
        return n

    @property
    def partial_pairs(self) -> float:
        """(query, key) pairs in segments computed with the mask evaluated on the tile."""
        return float(sum((t.q1 - t.q0) * (s.k1 - s.k0) for t in self.tiles for s in t.segments if s.partial))

    @property
    def calls(self) -> int:
        """Kernel calls (one per segment)."""
        return 1 if self.single else sum(len(t.segments) for t in self.tiles)

    @property
    def fused_pairs(self) -> float:
        """:attr:`pairs` where a fused kernel computes the band in one call (the band's whole spans)."""
        b = self.band
        if b is None:
            return self.pairs
        out = sum(
            (t.q1 - t.q0) * (s.k1 - s.k0) * (0.5 if s.tri else 1.0)
            for t in self.tiles
            if not self.in_band(t)
            for s in t.segments
        )
        return out + (b.q1 - b.q0) * b.span

    @property
    def fused_partial_pairs(self) -> float:
        """:attr:`partial_pairs` outside the band (where a fused kernel computes the band in one call)."""
        return float(
            sum(
                (t.q1 - t.q0) * (s.k1 - s.k0)
                for t in self.tiles
                if not self.in_band(t)
                for s in t.segments
                if s.partial
            )
        )

    @property
    def band_pairs(self) -> float:
        """(query, key) pairs the band's one call computes, all under its shared mask (0 without a band)."""
        b = self.band
        return 0.0 if b is None or self.single else float((b.q1 - b.q0) * b.span)

    @property
    def merged_rows(self) -> float:
        """Query rows merged by logsumexp outside the band, once per segment after the first."""
        return float(
            sum((t.q1 - t.q0) * (len(t.segments) - 1) for t in self.tiles if not self.in_band(t) and t.segments)
        )

    @property
    def fused_calls(self) -> int:
        """:attr:`calls` where a fused kernel computes the band in one call."""
        if self.band is None or self.single:
            return self.calls
        return 1 + sum(len(t.segments) for t in self.tiles if not self.in_band(t))


def block_codes(mask: Mask, shape: Shape, block_q: int, block_k: int) -> Tensor:
    """Per (query tile, key block): EMPTY for every batch row and head, FULL for all, PARTIAL else:
    an int8 tensor ``(ceil(Lq/block_q), ceil(Lk/block_k))`` on the CPU."""
    kinds = mask.block_kinds(shape, block_q, block_k)  # (B|1, H|1, nq, nk)
    all_empty = (kinds == EMPTY).flatten(0, 1).all(dim=0)
    all_full = (kinds == FULL).flatten(0, 1).all(dim=0)
    return torch.where(all_empty, EMPTY, torch.where(all_full, FULL, PARTIAL)).to(torch.int8).cpu()


def _band_tile(q0: int, q1: int, W: int, shape: Shape) -> Tile | None:
    """Query rows ``[q0, q1)`` of a causal window ``W`` as triangles and a full run (no mask at all):
    keys ``[p0 - W, p0 - W + t)`` upper triangle, ``[p0 - W + t, p0)`` full, ``[p0, p0 + t)`` lower
    triangle, where ``p0 = q0 + Lk - Lq`` and ``t = q1 - q0`` (where key 0 cuts the upper triangle, the
    cut corner is a partial segment). None where that layout does not apply."""
    t = q1 - q0
    p0 = q0 + shape.offset
    if p0 < 0 or p0 + t > shape.Lk:
        return None
    diag = Segment(p0, p0 + t, True, "lower")
    if W >= p0 + t:  # plain causal reach: everything before the diagonal is full
        return Tile(q0, q1, ((Segment(0, p0, False),) if p0 else ()) + (diag,))
    if t > W:
        return None
    if p0 - W < 0:  # the window's far edge is cut off by key 0: that corner with the mask on the tile
        e = p0 - W + t
        return Tile(q0, q1, (Segment(0, e, True), *((Segment(e, p0, False),) if p0 > e else ()), diag))
    segs = [Segment(p0 - W, p0 - W + t, True, "upper")]
    if W > t:
        segs.append(Segment(p0 - W + t, p0, False))
    return Tile(q0, q1, (*segs, diag))


MIN_BAND = 64
"""A causal window at least this wide but narrower than the query tile is planned in query tiles no taller
than the window (triangles and full runs, no mask); narrower windows keep one partial segment per tile."""


def _band_tiles(q0: int, q1: int, W: int, shape: Shape) -> list[Tile] | None:
    """Query rows ``[q0, q1)`` of a causal window ``W`` as band tiles (:func:`_band_tile`), cut into tiles no
    taller than ``W`` when the window is narrower than the rows. None where that layout does not apply."""
    one = _band_tile(q0, q1, W, shape)
    if one is not None:
        return [one]
    if W < MIN_BAND or q1 - q0 <= W:
        return None
    out = []
    for a in range(q0, q1, W):
        t = _band_tile(a, min(a + W, q1), W, shape)
        if t is None:
            return None
        out.append(t)
    return out


def _causal_reach(mask: Mask) -> int | None:
    """``W`` when ``mask`` is exactly a causal sliding window (keys ``p - W <= j <= p``), a large number
    for plain causal, else None."""
    w = mask.window()
    if w is None or w[1] != 0:
        return None
    return 1 << 62 if w[0] is None else w[0]


def _segments(row: list[int], block_k: int, Lk: int) -> tuple[Segment, ...]:
    """Key segments of one query tile from its row of block codes: runs of equal non-empty kinds, a
    short full run touching a partial one joined to it (one call instead of three)."""
    runs: list[list[int]] = []  # [kind, first block, last block + 1]
    for j, c in enumerate(row):
        if c == EMPTY:
            continue
        if runs and runs[-1][0] == c and runs[-1][2] == j:
            runs[-1][2] = j + 1
        else:
            runs.append([c, j, j + 1])
    merged: list[list[int]] = []
    for r in runs:
        if merged and merged[-1][2] == r[1]:
            last = merged[-1]
            short = (r[0] == FULL and r[2] - r[1] <= MERGE_FULL) or (
                last[0] == FULL and last[2] - last[1] <= MERGE_FULL
            )
            if short and PARTIAL in (r[0], last[0]):
                last[0], last[2] = PARTIAL, r[2]
                continue
        merged.append(list(r))
    return tuple(Segment(a * block_k, min(b * block_k, Lk), c == PARTIAL) for c, a, b in merged)


def plan_tiles(mask: Mask | None, shape: Shape, block_q: int, block_k: int, codes: Tensor | None = None) -> list[Tile]:
    """The tiles and key segments for ``mask`` on a problem of ``shape``.

    Args:
        mask: the request's mask, or ``None`` (every pair meets).
        shape: the problem (``B, H, Lq, Lk``).
        block_q: query-tile rows.
        block_k: key-block length (the grain at which empty and full blocks are found).
        codes: :func:`block_codes` if already computed.

    Returns:
        One :class:`Tile` per query tile. Empty key blocks appear in no segment; a block that is full
        for every batch row and head is in a segment with ``partial=False``."""
    if mask is None:
        return [Tile(0, shape.Lq, (Segment(0, shape.Lk, False),))]
    reach = _causal_reach(mask)
    code = (codes if codes is not None else block_codes(mask, shape, block_q, block_k)).tolist()
    tiles: list[Tile] = []
    for i, row in enumerate(code):
        q0, q1 = i * block_q, min((i + 1) * block_q, shape.Lq)
        band = _band_tiles(q0, q1, reach, shape) if reach is not None else None
        tiles.extend(band if band is not None else [Tile(q0, q1, _segments(row, block_k, shape.Lk))])
    return tiles


def _band(reach: int | None, shape: Shape, block_q: int) -> Band | None:
    """The :class:`Band` of a causal window ``reach`` keys wide: the whole query tiles from the first whose
    span starts at key 0 or later to the last full one (None when fewer than two tiles qualify). Its
    rows: :data:`BAND_ROWS` doubled while at most a quarter of the window and a divisor of ``block_q``
    (each tile then computes at most 1.25x the keys it needs, and its span is at most 5x its rows, for
    windows of 4 rows or more)."""
    rows = BAND_ROWS
    if reach is None or reach >= 1 << 62 or rows < 1 or block_q % rows:
        return None
    while 2 * rows <= reach // 4 and block_q % (2 * rows) == 0:
        rows *= 2
    wide = -(-reach // rows) * rows
    q0 = max(0, -(-(wide - shape.offset) // block_q) * block_q)
    q1 = shape.Lq // block_q * block_q
    if q1 - q0 < 2 * block_q:
        return None
    return Band(q0, q1, rows, reach, wide)


def _build(mask: Mask | None, shape: Shape, block_q: int, block_k: int) -> TilePlan:
    nq, nk = -(-shape.Lq // block_q), -(-shape.Lk // block_k)
    if mask is None:
        codes = torch.full((nq, nk), FULL, dtype=torch.int8)
        return TilePlan(shape, block_q, block_k, codes, tuple(plan_tiles(None, shape, block_q, block_k)), "full")
    codes = block_codes(mask, shape, block_q, block_k)
    tiles = tuple(plan_tiles(mask, shape, block_q, block_k, codes))
    single = ""
    if mask.is_causal and shape.Lq == shape.Lk:
        single = "causal"
    elif codes.numel() and bool((codes == FULL).all()):
        single = "full"
    band = None if single else _band(_causal_reach(mask), shape, block_q)
    return TilePlan(shape, block_q, block_k, codes, tiles, single, band)


def tile_plan(mask: Mask | None, shape: Shape, block_q: int, block_k: int) -> TilePlan:
    """The :class:`TilePlan` of ``mask`` on ``shape`` with these block sizes, from :data:`PLANS`."""
    key = ("tiles", shape, block_q, block_k, BAND_ROWS)
    return PLANS.get(mask, key, lambda: _build(mask, shape, block_q, block_k))

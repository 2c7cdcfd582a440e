"""What ring and Ulysses attention share: process groups, sequence layouts, global masks, traffic counts,
and failing together instead of hanging. (Public names are re-exported by :mod:`qkv.distributed`.)"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ..masks import Mask

Layout = Literal["zigzag", "contiguous"]
"""How a sequence is split over ranks: ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2R - 1 - r`` of
``2R``: balanced under causal masks) or ``"contiguous"`` (rank ``r`` holds the ``r``-th ``n`` tokens)."""
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")

__all__ = [
    "CommStats",
    "Layout",
    "RankFailedError",
    "comm_stats",
    "fail_together",
    "global_positions",
    "globalize_mask",
    "unsupported_mask",
    "zigzag_gather",
    "zigzag_split",
]


@dataclass
class CommStats:
    """Bytes and messages this process has sent in ring and Ulysses attention since the last ``reset``."""

    bytes_sent: int = 0
    messages: int = 0

    def add(self, t: Tensor) -> None:
        self.bytes_sent += t.numel() * t.element_size()
        self.messages += 1

    def reset(self) -> None:
        self.bytes_sent = 0
        self.messages = 0


comm_stats = CommStats()
"""The process-wide traffic counter (read it in benchmarks; ``comm_stats.reset()`` between steps)."""


class RankFailedError(RuntimeError):
    """Raised on every rank when any rank of the group failed inside :func:`fail_together`."""


# ------------------------------------------------------------------------------------------------
# groups


def group_rank_world(group: Any) -> tuple[int, int]:
    """This process's rank in ``group`` (``None`` = the default group) and the group's size."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: Any, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (what ``isend``/``irecv`` take as peer)."""
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


# ------------------------------------------------------------------------------------------------
# layouts


def check_layout(layout: Any) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def chunks(layout: str, rank: int, world: int, n: int) -> list[tuple[int, int, int]]:
    """The pieces of the global sequence a rank holds: ``(global_chunk_index, local_start, length)``.

    ``contiguous``: one chunk of ``n`` tokens, index ``rank`` (chunks of ``n``). ``zigzag``: chunks
    ``rank`` and ``2 * world - 1 - rank`` of ``n // 2`` tokens each (Brandon et al., "striped"/zigzag
    load balancing for causal attention), so every rank has as much work under a causal mask."""
    if layout == "contiguous":
        return [(rank, 0, n)]
    c = n // 2
    return [(rank, 0, c), (2 * world - 1 - rank, c, c)]


def chunk_size(layout: str, n: int) -> int:
    return n if layout == "contiguous" else n // 2


def global_positions(layout: str, rank: int, world: int, n: int, device: torch.device | None = None) -> Tensor:
    """Global sequence positions ``(n,)`` of the ``n`` tokens rank ``rank`` holds under ``layout``."""
    check_layout(layout)
    c = chunk_size(layout, n)
    return torch.cat([torch.arange(i * c, i * c + ln, device=device) for i, _, ln in chunks(layout, rank, world, n)])


def zigzag_split(x: Tensor, rank: int, world: int, dim: int = 2) -> Tensor:
    """The zigzag shard of ``x`` that rank ``rank`` of ``world`` holds: chunks ``rank`` and
    ``2 * world - 1 - rank`` of ``2 * world`` equal chunks along ``dim`` (2 = the ``L`` of
    ``(B, H, L, D)``; use ``dim=-1`` for ``(B, L)`` ids, ``dim=1`` for ``(B, L, E)`` activations).

    Raises ``ValueError`` unless ``x.shape[dim]`` is divisible by ``2 * world``."""
    L = x.shape[dim]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"zigzag_split: need 0 <= rank < world, got rank={rank}, world={world}")
    if L % (2 * world):
        raise ValueError(
            f"zigzag_split: the length along dim {dim} must be divisible by 2 * world = {2 * world}, got shape"
            f" {tuple(x.shape)}"
        )
    parts = x.chunk(2 * world, dim=dim)
    return torch.cat([parts[rank], parts[2 * world - 1 - rank]], dim=dim)


def zigzag_unshuffle(shards: list[Tensor], dim: int = 2) -> Tensor:
    """The global tensor from every rank's zigzag shard (in rank order), along ``dim``."""
    world = len(shards)
    first: list[Tensor] = []
    second: list[Tensor] = []
    for s in shards:
        a, b = s.chunk(2, dim=dim)
        first.append(a)
        second.append(b)
    return torch.cat(first + second[::-1], dim=dim) if world else torch.empty(0)


def zigzag_gather(x: Tensor, dim: int = 2, group: Any = None) -> Tensor:
    """All-gather every rank's zigzag shard ``x`` along ``dim`` and return the global tensor, on every rank
    (the inverse of :func:`zigzag_split`; not differentiable)."""
    _, world = group_rank_world(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return zigzag_unshuffle(shards, dim=dim)


def gather_sequence(x: Tensor, layout: str, dim: int, group: Any) -> Tensor:
    """All-gather local shards along ``dim`` into the global sequence in natural order."""
    if layout == "zigzag":
        return zigzag_gather(x, dim=dim, group=group)
    _, world = group_rank_world(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return torch.cat(shards, dim=dim)


def check_shards(q: Tensor, k: Tensor, v: Tensor, layout: str, world: int) -> None:
    """``ValueError`` unless ``q``, ``k``, ``v`` are equal-length 4-D local shards fit for ``layout``."""
    check_layout(layout)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sequence-parallel attention takes 4-D local shards (B, H, n, D), got {shapes}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"sequence-parallel attention is self-attention over one split sequence: q and k must hold the"
            f" same number of local tokens n (dim 2), got {shapes}"
        )
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"layout='zigzag' needs an even local length n (two chunks per rank), got {shapes}")


# ------------------------------------------------------------------------------------------------
# masks on global positions


def unsupported_mask(m: Mask | None) -> str | None:
    """Why a mask cannot be evaluated on global positions from local shards, or ``None`` if it can."""
    return None if m is None else m.shard_blocker()


def globalize_mask(m: Mask | None, layout: str, group: Any) -> Mask | None:
    """The mask of the whole sequence from the mask given with local shards (:meth:`Mask.globalize`):
    positional masks and ``mask_mod`` functions already speak global positions; per-position data
    (a ``document`` mask's ids) is gathered, in natural order, from every rank. A mask that cannot
    say how raises ``NotImplementedError`` with its reason."""
    if m is None:
        return None
    return m.globalize(lambda t: gather_sequence(t, layout, -1, group))


# ------------------------------------------------------------------------------------------------
# failing together


_generation: dict[int, int] = {}


def _store() -> Any:
    """The default group's key-value store (a side channel that works when the gloo pairs are broken)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    return get() if get is not None else None


@contextmanager
def fail_together(group: Any = None, timeout: timedelta = timedelta(seconds=30)) -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, raise :class:`RankFailedError` on all ranks.

    At the end of the block every rank posts a report (its error or nothing) to the process group's
    store and waits for everyone's, so a rank whose peer failed does not hang in its next collective:
    it raises with the peer's message. A rank blocked inside the block on a peer that failed (a ring
    ``recv``) is released by the process group's own timeout (pass ``timeout=timedelta(seconds=30)`` to
    ``init_process_group``) and then reports too. A rank that never reports (its process died) is
    named after ``timeout``.

    Args:
        group: the process group (``None`` = default); every member must enter the block.
        timeout: how long to wait for the other ranks' reports.
    """
    rank, world = group_rank_world(group)
    err: str | None = None
    exc: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        exc = e
        tb = "".join(traceback.format_tb(e.__traceback__)[-2:])
        err = f"{type(e).__name__}: {e}\n{tb}"
    members = [global_rank(group, r) for r in range(world)]
    key = tuple(members)
    gen = _generation.get(hash(key), 0)
    _generation[hash(key)] = gen + 1
    prefix = f"qkv/fail_together/{'-'.join(map(str, members))}/{gen}/"
    store = _store()
    reports: list[tuple[int, str | None]] = []
    if store is not None:
        store.set(prefix + str(rank), err or "")
        missing: list[int] = []
        try:
            store.wait([prefix + str(r) for r in range(world)], timeout)
        except Exception:  # noqa: BLE001 - some rank never reported; find out which
            missing = [r for r in range(world) if not store.check([prefix + str(r)])]
        for r in range(world):
            if r in missing:
                reports.append((r, f"did not report within {timeout.total_seconds():g} s (its process may have died)"))
            else:
                msg = store.get(prefix + str(r)).decode()
                reports.append((r, msg or None))
    else:  # no store to talk through: use the group itself
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (rank, err), group=group)
        reports = list(gathered)
    failed = [(r, m) for r, m in reports if m is not None]
    if failed:
        lines = "\n".join(f"  rank {r}: {m.strip()}" for r, m in failed)
        raise RankFailedError(f"{len(failed)} of {world} ranks failed:\n{lines}") from exc

"""Head-parallel attention (DeepSpeed-Ulysses, Jacobs et al. 2023).

Every rank holds all heads for ``n`` tokens. One ``all_to_all`` turns that into all ``L = n * world``
tokens for ``H / world`` heads; each rank runs exact attention on its heads with :func:`qkv.attention`
(any mask it supports, on global positions); a second ``all_to_all`` returns the output to sequence
shards. The backward pass is the same two exchanges in reverse (a custom ``autograd.Function``).
Needs ``H % world == 0``; key/value heads are repeated for grouped-query attention only when
``Hkv % world != 0``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..masks import MaskLike, as_mask
from .base import Request
from .policy import resolve
from .registry import register
from .ring import Ring
from .seqpar import check_shards, comm_stats, globalize_mask, group_rank_world, unsupported_mask, zigzag_unshuffle

__all__ = ["Ulysses", "heads_to_seq", "seq_to_heads", "ulysses_attention"]


def _a2a(x: Tensor, group: Any) -> Tensor:
    """``all_to_all_single`` along dim 0 (``x`` is ``(world, ...)``)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _, world = group_rank_world(group)
    comm_stats.add(x[: world - 1])  # what leaves this process: all slices but our own
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: Tensor, group: Any) -> Tensor:
    """``(B, H, n, D)`` sequence shard -> ``(B, H / world, world * n, D)`` head shard (rank order of shards)."""
    _, world = group_rank_world(group)
    B, H, n, D = x.shape
    y = _a2a(x.reshape(B, world, H // world, n, D).transpose(0, 1), group)  # (world, B, h, n, D)
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * n, D)


def _heads_to_seq(x: Tensor, group: Any) -> Tensor:
    """The inverse of :func:`_seq_to_heads`: ``(B, h, world * n, D)`` -> ``(B, h * world, n, D)``."""
    _, world = group_rank_world(group)
    B, h, L, D = x.shape
    n = L // world
    y = _a2a(x.reshape(B, h, world, n, D).permute(2, 0, 1, 3, 4), group)  # (world, B, h, n, D)
    return y.transpose(0, 1).reshape(B, world * h, n, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _heads_to_seq(g, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _seq_to_heads(g, ctx.group), None


def seq_to_heads(x: Tensor, group: Any = None) -> Tensor:
    """Differentiable all-to-all: local sequence shard ``(B, H, n, D)`` -> head shard
    ``(B, H / world, world * n, D)`` whose tokens are every rank's shard in rank order."""
    out: Tensor = _SeqToHeads.apply(x, group)
    return out


def heads_to_seq(x: Tensor, group: Any = None) -> Tensor:
    """Differentiable all-to-all, the inverse of :func:`seq_to_heads`."""
    out: Tensor = _HeadsToSeq.apply(x, group)
    return out


def _natural_order(world: int, n: int, layout: str, device: torch.device) -> Tensor:
    """Index that sorts the rank-order concatenation of shards into global positions."""
    idx = torch.arange(world * n, device=device).view(1, 1, -1, 1)
    if layout == "contiguous":
        return idx.view(-1)
    return zigzag_unshuffle(list(idx.chunk(world, dim=2)), dim=2).view(-1)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | None = None,
    scale: float | None = None,
    group: Any = None,
    layout: str = "zigzag",
    inner_backend: str = "auto",
) -> Tensor:
    """Exact attention over a sequence split across ranks, by all-to-all head parallelism.

    Args:
        q: local queries ``(B, H, n, D)``, ``H`` divisible by the group size.
        k: local keys ``(B, Hkv, n, D)``, ``H % Hkv == 0``.
        v: local values ``(B, Hkv, n, Dv)``.
        mask: as for :func:`qkv.distributed.ring_attention` (global positions; ``document`` takes the
            local shard's ids).
        scale: defaults to ``1 / sqrt(D)``.
        group: the process group (``None`` = default).
        layout: ``"zigzag"`` or ``"contiguous"``, how the sequence is split (the same as the ring's).
        inner_backend: the backend (``"auto"`` or a name) that each rank runs on its heads.

    Returns:
        the local output ``(B, H, n, Dv)``.
    """
    _, world = group_rank_world(group)
    check_shards(q, k, v, layout, world)
    H, Hkv = q.shape[1], k.shape[1]
    if H % world:
        raise ValueError(
            f"ulysses attention needs the heads H divisible by the group size {world}, got q {tuple(q.shape)}"
        )
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"the query heads must be a multiple of the key heads, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if Hkv % world:
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    m = as_mask(mask)
    why = unsupported_mask(m)
    if why is not None:
        raise NotImplementedError(why)
    gmask = globalize_mask(m, layout, group)
    n = q.shape[2]
    order = _natural_order(world, n, layout, q.device)
    qh, kh, vh = (seq_to_heads(t, group).index_select(2, order) for t in (q, k, v))
    sc = float(scale) if scale is not None else q.shape[-1] ** -0.5
    req = Request(qh, kh, vh, gmask, None, sc, 0.0, False)
    if gmask is not None:
        gmask.check(req.shape)
    impl, plan = resolve(req, inner_backend)
    oh = impl.run(req, plan)
    assert isinstance(oh, Tensor)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return heads_to_seq(oh.index_select(2, inv), group)


class Ulysses(Ring):
    """The ``ulysses`` backend: :func:`ulysses_attention` as ``qkv.attention(..., backend="ulysses",
    group=..., layout=...)`` on each rank's local shards; never picked by ``auto``."""

    name = "ulysses"

    def supports(self, req: Request) -> str | None:
        import torch.distributed as dist

        why = super().supports(req)
        world = dist.get_world_size(req.options.get("group"))
        if why is None and req.H % world:
            return f"ulysses attention needs the heads H={req.H} divisible by the group size {world}"
        return why

    def run(self, req: Request, plan: Any = None) -> Tensor:
        return ulysses_attention(req.q, req.k, req.v, mask=req.mask, scale=req.scale, **req.options)


register(Ulysses())

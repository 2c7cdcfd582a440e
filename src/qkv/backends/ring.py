"""Ring attention (Liu et al., 2023): exact attention with the sequence split over ``torch.distributed`` ranks.

Every rank holds ``q``, ``k``, ``v`` for ``n`` tokens of the global sequence of ``L = n * world`` tokens.
Key/value blocks travel around the ring (rank ``r`` sends to ``r + 1`` and receives from ``r - 1``)
with non-blocking ``isend``/``irecv`` posted before each step's compute, so communication overlaps
computation; each rank merges the partial outputs of the blocks it sees by their per-row logsumexp.
The backward pass recomputes each block's scores from the saved logsumexp and sends the key/value
gradients around the ring with the blocks, then home to their owner.

Masks are evaluated on global positions. Every (query chunk, key chunk) pair is classified once from
the mask's tile kinds (``Mask.block_kinds``): empty pairs are skipped, full pairs run the fused kernel
with no mask, partial pairs run with the mask's tile. The ring stops after the last step on which any
rank has a non-empty pair, so a sliding window only talks to the neighbours it can reach. The
``zigzag`` layout (rank ``r`` holds chunks ``r`` and ``2R - 1 - r`` of ``2R``) gives every rank the same
work under a causal mask.

Each block is one span of the kernel core (:mod:`qkv.backends.kernels`), the same forward, backward and
merge as ``tiled``. Also ``qkv.attention(..., backend="ring", group=..., layout=...)``: ``q``, ``k``,
``v`` are then each rank's LOCAL shards (``auto`` never picks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..masks import EMPTY, FULL, Mask, MaskLike, Shape, as_mask
from .base import Backend, Request
from .kernels import compute_dtype, merge_into, span_backward, span_forward
from .plan import PLANS, block_codes
from .registry import register
from .seqpar import (
    LAYOUTS,
    check_shards,
    chunk_size,
    chunks,
    comm_stats,
    global_rank,
    globalize_mask,
    group_rank_world,
    unsupported_mask,
)

__all__ = ["Ring", "ring_attention"]

_TAG_KV, _TAG_DKV, _TAG_HOME = 11, 12, 13


@dataclass
class _Plan:
    """Who computes what: for every step, every rank's non-empty (query chunk, key chunk) pairs."""

    rank: int
    world: int
    group: Any
    layout: str
    n: int
    mask: Mask | None
    shape: Shape  # the global problem
    scale: float
    steps: int
    pairs: list[list[tuple[slice, slice, int, int, int, int, int]]]  # per step: (q, k, kind, q0, q1, k0, k1)

    @property
    def next(self) -> int:
        return global_rank(self.group, (self.rank + 1) % self.world)

    @property
    def prev(self) -> int:
        return global_rank(self.group, (self.rank - 1) % self.world)


TILE = 256
"""Largest sub-tile (tokens) a partial chunk pair is cut into: bounds the eager scores of masked work."""

_Item = tuple[slice, slice, int, int, int, int, int]  # (q local, k local, kind, global q0, q1, k0, k1)
_CAUSAL = 3  # a diagonal pair under a plain causal mask: the fused kernel with is_causal


def _sub_tile(c: int) -> int:
    t = c
    while t > TILE and t % 2 == 0:
        t //= 2
    return t


def _items(kinds: Tensor, qi: int, ql: int, ki: int, kl: int, c: int, t: int, causal: bool) -> list[_Item]:
    """The work of one (query chunk, key chunk) pair from the sub-tile kinds: one fused call when the
    whole pair is full, else per query sub-tile one call per run of equal non-empty kinds."""
    per = c // t
    sub = kinds[qi * per : (qi + 1) * per, ki * per : (ki + 1) * per]
    if bool((sub == EMPTY).all()):
        return []
    if bool((sub == FULL).all()) or (causal and qi == ki):
        kind = FULL if bool((sub == FULL).all()) else _CAUSAL
        return [(slice(ql, ql + c), slice(kl, kl + c), kind, qi * c, qi * c + c, ki * c, ki * c + c)]
    items: list[_Item] = []
    for a in range(per):
        row = sub[a].tolist()
        b = 0
        while b < per:
            e = b
            while e + 1 < per and row[e + 1] == row[b]:
                e += 1
            if row[b] != EMPTY:
                q0, k0 = qi * c + a * t, ki * c + b * t
                n_k = (e - b + 1) * t
                items.append(
                    (
                        slice(ql + a * t, ql + a * t + t),
                        slice(kl + b * t, kl + b * t + n_k),
                        row[b],
                        q0,
                        q0 + t,
                        k0,
                        k0 + n_k,
                    )
                )
            b = e + 1
    return items


def _make_plan(q: Tensor, mask: Mask | None, scale: float, group: Any, layout: str) -> _Plan:
    rank, world = group_rank_world(group)
    B, H, n = q.shape[0], q.shape[1], q.shape[2]
    c = chunk_size(layout, n)
    t = _sub_tile(c)
    causal = mask is not None and mask.is_causal
    shape = Shape(B, H, n * world, n * world, q.device)
    nb = n * world // t
    if mask is None:
        kinds = torch.full((nb, nb), FULL, dtype=torch.int8)
    else:
        kinds = PLANS.get(mask, ("ring-kinds", shape, t), lambda: block_codes(mask, shape, t, t))
    last = 0
    mine: list[list[_Item]] = []
    for s in range(world):
        for r in range(world):
            src = (r - s) % world
            qcs, kcs = chunks(layout, r, world, n), chunks(layout, src, world, n)
            per = c // t
            if any(
                bool((kinds[qi * per : (qi + 1) * per, ki * per : (ki + 1) * per] != EMPTY).any())
                for qi, _, _ in qcs
                for ki, _, _ in kcs
            ):
                last = max(last, s)
            if r == rank:
                mine.append(
                    [it for qi, ql, _ in qcs for ki, kl, _ in kcs for it in _items(kinds, qi, ql, ki, kl, c, t, causal)]
                )
    return _Plan(rank, world, group, layout, n, mask, shape, scale, last + 1, mine[: last + 1])


# ------------------------------------------------------------------------------------------------
# one block: queries of a chunk against keys of a chunk


def _block(plan: _Plan, kind: int, q0: int, q1: int, k0: int, k1: int) -> tuple[Tensor | None, bool]:
    """The mask tile on global positions (``None`` for a full block) and whether it is a causal diagonal."""
    if kind == FULL:
        return None, False
    if kind == _CAUSAL:
        return None, True
    assert plan.mask is not None
    return plan.mask.tile(plan.shape, q0, q1, k0, k1), False


# ------------------------------------------------------------------------------------------------
# communication


def _pack(*ts: Tensor) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf: Tensor, like: tuple[Tensor, ...]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(buf[i : i + t.numel()].view(t.shape))
        i += t.numel()
    return out


def _exchange(send: Tensor, to: int, frm: int, tag: int, group: Any) -> tuple[Tensor, list[Any]]:
    """Post ``isend(send -> to)`` and ``irecv(<- frm)`` without waiting; returns the buffer and the works."""
    recv = torch.empty_like(send)
    comm_stats.add(send)
    works = [dist.isend(send, to, group=group, tag=tag), dist.irecv(recv, frm, group=group, tag=tag)]
    return recv, works


def _wait(works: list[Any]) -> None:
    for w in works:
        w.wait()


# ------------------------------------------------------------------------------------------------
# forward and backward


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, H, n, _ = q.shape
    Dv = v.shape[3]
    dt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dt), k.to(dt).contiguous(), v.to(dt).contiguous()
    acc_o = torch.zeros(B, H, n, Dv, dtype=dt, device=q.device)
    acc_l = torch.full((B, H, n), float("-inf"), dtype=dt, device=q.device)
    buf = _pack(kc, vc)
    for s in range(plan.steps):
        works: list[Any] = []
        if s + 1 < plan.steps:
            nxt, works = _exchange(buf, plan.next, plan.prev, _TAG_KV, plan.group)
        kb, vb = _unpack(buf, (kc, vc))
        for qsl, ksl, kind, q0, q1, k0, k1 in plan.pairs[s]:
            tile, causal = _block(plan, kind, q0, q1, k0, k1)
            o, lse = span_forward(qc[:, :, qsl], kb[:, :, ksl], vb[:, :, ksl], plan.scale, tile, causal)
            merge_into(acc_o[:, :, qsl], acc_l[:, :, qsl], o, lse)
        if works:
            _wait(works)
            buf = nxt
    return acc_o, acc_l


def _backward(
    plan: _Plan, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dt = out.dtype
    qc, do = q.to(dt), dout.to(dt).contiguous()
    kc, vc = k.to(dt).contiguous(), v.to(dt).contiguous()
    dq = torch.zeros_like(qc)
    buf = _pack(kc, vc)
    dkv_works: list[Any] = []
    dkv_in: Tensor | None = None
    dkv = torch.zeros_like(buf)
    for s in range(plan.steps):
        works: list[Any] = []
        if s + 1 < plan.steps:
            nxt, works = _exchange(buf, plan.next, plan.prev, _TAG_KV, plan.group)
        kb, vb = _unpack(buf, (kc, vc))
        dkv = torch.zeros_like(buf)
        dkb, dvb = _unpack(dkv, (kc, vc))
        for qsl, ksl, kind, q0, q1, k0, k1 in plan.pairs[s]:
            tile, causal = _block(plan, kind, q0, q1, k0, k1)
            dq_b, dk_b, dv_b = span_backward(
                do[:, :, qsl],
                qc[:, :, qsl],
                kb[:, :, ksl],
                vb[:, :, ksl],
                out[:, :, qsl],
                lse[:, :, qsl],
                plan.scale,
                tile,
                causal,
            )
            dq[:, :, qsl] += dq_b
            dkb[:, :, ksl] += dk_b
            dvb[:, :, ksl] += dv_b
        if dkv_works:  # the gradients of this block accumulated by the ranks it visited before
            _wait(dkv_works)
            assert dkv_in is not None
            dkv += dkv_in
            dkv_works = []
        if s + 1 < plan.steps:
            dkv_in, dkv_works = _exchange(dkv, plan.next, plan.prev, _TAG_DKV, plan.group)
        if works:
            _wait(works)
            buf = nxt
    if plan.steps > 1:  # the block now here belongs to rank (r - steps + 1); send its gradients home
        back = plan.steps - 1
        home = global_rank(plan.group, (plan.rank - back) % plan.world)
        frm = global_rank(plan.group, (plan.rank + back) % plan.world)
        mine, works = _exchange(dkv, home, frm, _TAG_HOME, plan.group)
        _wait(works)
        dkv = mine
    dk, dv = _unpack(dkv, (kc, vc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> Tensor:  # type: ignore[override]
        out, lse = _forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.plan, q, k, v, out, lse, dout)
        return dq, dk, dv, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | None = None,
    scale: float | None = None,
    group: Any = None,
    layout: str = "zigzag",
) -> Tensor:
    """Exact attention over a sequence split across the ranks of ``group``, by ring attention.

    Every rank passes its LOCAL shards; all ranks must pass the same shapes and the same mask.

    Args:
        q: local queries ``(B, H, n, D)``; the global sequence has ``L = n * world`` tokens.
        k: local keys ``(B, Hkv, n, D)``, ``H % Hkv == 0`` (grouped-query heads share blocks; K/V are
            never repeated).
        v: local values ``(B, Hkv, n, Dv)``.
        mask: a :class:`qkv.masks.Mask` on GLOBAL positions (``causal()``, ``sliding_window(w)``,
            ``padding(global lengths)``, ``from_fn(...)``); a ``document(ids)`` mask takes the ids of
            the LOCAL shard ``(n,)`` or ``(B, n)``, which are gathered. Dense bool masks and
            block-sparse layouts are refused (``NotImplementedError``). Through ``qkv.attention`` a mask
            is first validated against the local shapes, so lengths above ``n`` (``padding``,
            ``prefix_lm``) need this function.
        scale: multiplies ``q kᵀ``; defaults to ``1 / sqrt(D)``.
        group: the ``torch.distributed`` process group (``None`` = the default group).
        layout: how the sequence is split: ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2R-1-r`` of
            ``2R``, see :func:`qkv.distributed.zigzag_split`; balanced under causal masks) or
            ``"contiguous"`` (rank ``r`` holds tokens ``[r n, (r+1) n)``).

    Returns:
        the local output ``(B, H, n, Dv)``, differentiable with respect to ``q``, ``k``, ``v``.
    """
    _, world = group_rank_world(group)
    check_shards(q, k, v, layout, world)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the query heads must be a multiple of the key heads, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    m = as_mask(mask)
    why = unsupported_mask(m)
    if why is not None:
        raise NotImplementedError(why)
    gmask = globalize_mask(m, layout, group)
    sc = float(scale) if scale is not None else q.shape[-1] ** -0.5
    plan = _make_plan(q, gmask, sc, group, layout)
    out: Tensor = _RingFunction.apply(q, k, v, plan)
    return out


class Ring(Backend):
    """The ``ring`` backend: :func:`ring_attention` as ``qkv.attention(..., backend="ring", group=...,
    layout=...)`` on each rank's local shards; never picked by ``auto``."""

    name = "ring"
    options = frozenset({"group", "layout"})
    automatic = False  # its q, k, v are local shards of a longer sequence: only when asked for by name
    local_shards = True  # ... so a mask is never judged against the local shapes

    def available(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def supports(self, req: Request) -> str | None:
        if req.return_weights:
            return f"{self.name} attention does not return attention weights"
        if req.dropout_p > 0:
            return f"{self.name} attention does not apply dropout"
        if req.score_mod is not None:
            return f"{self.name} attention takes no score mod"
        if req.Lq != req.Lk:
            return f"{self.name} attention is self-attention over local shards: q and k must hold as many tokens"
        layout = req.options.get("layout", "zigzag")
        if layout not in LAYOUTS:
            return f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}"
        if layout == "zigzag" and req.Lq % 2:
            return "layout='zigzag' needs an even local length (two chunks per rank)"
        return unsupported_mask(req.mask)

    def cost(self, req: Request) -> float:
        return 0.0  # the only backend for local shards of this kind

    def run(self, req: Request, plan: Any = None) -> Tensor:
        return ring_attention(req.q, req.k, req.v, mask=req.mask, scale=req.scale, **req.options)


register(Ring())

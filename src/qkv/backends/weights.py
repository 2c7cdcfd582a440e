"""Weights on demand: the attention weights of chosen heads and rows, recomputed from the row
logsumexp a chunk of rows at a time, for backends whose kernels never build ``Lq x Lk`` (``tiled``,
``flex``).

Options every backend that returns weights this way takes (keyword arguments of :func:`qkv.attention`
with ``return_weights=True``):

* ``weights_heads`` (sequence of int): return the weights of these query heads only.
* ``weights_rows`` (slice, sequence of int or 1-D integer tensor): return the weights of these query
  rows only.

So the weights of 2 heads of a 32k sequence cost ``2 · 32k · 32k`` numbers, not ``H`` times that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Request
from .kernels import safe_softmax

__all__ = ["OPTIONS", "heads_index", "rows_index", "weights"]

OPTIONS = frozenset({"weights_heads", "weights_rows"})
"""The options that choose which weights come back."""


def rows_index(rows: Any, Lq: int, device: torch.device) -> Tensor:
    """The query rows ``weights_rows`` names, as a 1-D long tensor in ``[0, Lq)`` (all rows for None)."""
    if rows is None:
        return torch.arange(Lq, device=device)
    if isinstance(rows, slice):
        return torch.arange(Lq, device=device)[rows]
    if isinstance(rows, Tensor):
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise TypeError(
                f"weights_rows must be a slice or a 1-D integer tensor, got {rows.dtype} {tuple(rows.shape)}"
            )
        idx = rows.long().to(device)
    elif isinstance(rows, Sequence) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        idx = torch.tensor(list(rows), dtype=torch.long, device=device)
    else:
        raise TypeError(f"weights_rows must be a slice, a sequence of ints or a 1-D integer tensor, got {rows!r}")
    if idx.numel() and (int(idx.min()) < -Lq or int(idx.max()) >= Lq):
        raise ValueError(f"weights_rows: row indices must lie in [-{Lq}, {Lq}) for Lq={Lq}, got {idx.tolist()}")
    return idx % Lq if Lq else idx


def heads_index(heads: Any, H: int) -> list[int]:
    """The query heads ``weights_heads`` names, in ``[0, H)`` (all heads for None)."""
    if heads is None:
        return list(range(H))
    if (
        isinstance(heads, int)
        or not isinstance(heads, Sequence)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in heads)
    ):
        raise TypeError(f"weights_heads must be a sequence of head indices (ints), got {heads!r}")
    bad = [x for x in heads if not -H <= x < H]
    if bad:
        raise ValueError(f"weights_heads: head indices must lie in [-{H}, {H}) for H={H}, got {list(heads)}")
    return [x % H for x in heads]


def key_ranges(tiles: Sequence[Any], Lq: int, Lk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per query row, the first and one past the last key its tile's segments visit (``lo >= hi``: none),
    from a :class:`~qkv.backends.plan.TilePlan`'s tiles. Outside that range every weight of the row is
    zero, for every batch row and head."""
    lo = torch.full((Lq,), Lk, dtype=torch.long)
    hi = torch.zeros(Lq, dtype=torch.long)
    for t in tiles:
        if t.segments:
            lo[t.q0 : t.q1] = min(s.k0 for s in t.segments)
            hi[t.q0 : t.q1] = max(s.k1 for s in t.segments)
    return lo.to(device), hi.to(device)


def weights(
    req: Request,
    q: Tensor,
    k: Tensor,
    lse: Tensor | None,
    dt: torch.dtype,
    block_q: int,
    sinks: Tensor | None = None,
    ranges: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Weights ``(B, len(heads), len(rows), Lk)`` of the heads and rows the request's options name.

    Args:
        req: the request (mask, score mod, scale, options ``weights_heads`` / ``weights_rows``).
        q: ``(B, H, Lq, D)`` queries in the compute dtype ``dt``.
        k: ``(B, Hkv, Lk, D)`` keys in ``dt``.
        lse: ``(B, H, Lq)`` row logsumexp of the masked, modified scores (``-inf`` for rows that see
            nothing), or ``None`` when the kernel gave none (then each chunk's rows are normalised
            by their own softmax, which is exact because a chunk holds whole rows).
        dt: the compute dtype.
        block_q: rows per chunk (memory is ``O(len(heads) · block_q · Lk)`` per chunk).
        sinks: ``(H,)`` sink logits in ``dt`` when the request has them (``lse`` then includes them);
            the weights are over the keys, so a row sums to less than 1.
        ranges: ``(lo, hi)``, each ``(Lq,)``: the keys ``[lo, hi)`` outside which a row's weights are
            known to be zero (:func:`key_ranges` of a tile plan); only those are computed.

    Returns:
        The weights in ``dt``; rows that see nothing are zeros. Differentiable (a plain softmax over
        the chosen rows) when gradients are on.
    """
    heads = heads_index(req.options.get("weights_heads"), req.H)
    rows = rows_index(req.options.get("weights_rows"), req.Lq, q.device)
    shape = req.shape
    G = req.groups
    hq = torch.tensor(heads, dtype=torch.long, device=q.device)
    kv_heads = hq // G
    dev = q.device
    b = torch.arange(req.B, device=dev).view(-1, 1, 1, 1)
    h = hq.view(1, -1, 1, 1)
    grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or (sinks is not None and sinks.requires_grad)
    )
    out = q.new_zeros(req.B, len(heads), rows.numel(), req.Lk)
    for c0 in range(0, rows.numel(), block_q):
        r = rows[c0 : c0 + block_q]
        k0, k1 = (int(ranges[0][r].min()), int(ranges[1][r].max())) if ranges is not None else (0, req.Lk)
        if k1 <= k0:  # these rows see no key: their weights stay zero
            continue
        qi = r.view(1, 1, -1, 1)
        ki = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
        qs = q[:, hq][:, :, r]  # (B, nh, nr, D)
        s = (qs @ k[:, kv_heads, k0:k1].transpose(-1, -2)) * req.scale
        if req.score_mod is not None:
            s = req.score_mod.apply(shape, s, b, h, qi, ki).to(dt).expand(s.shape)
        if req.mask is not None:
            allowed = req.mask.evaluate(shape, b, h, qi, ki)
            if not isinstance(allowed, Tensor):
                allowed = torch.tensor(bool(allowed), device=dev)
            s = s.masked_fill(~allowed.to(torch.bool), float("-inf"))
        # a plain softmax over the computed keys is exact: the keys outside them are masked for these rows
        if (grad or lse is None) and sinks is not None:  # the sink's column joins the softmax, then goes
            col = sinks[hq].view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
            w = safe_softmax(torch.cat((s, col), dim=-1))[..., :-1]
        elif grad or lse is None:
            w = safe_softmax(s)
        else:
            ls = lse[:, hq][:, :, r].unsqueeze(-1).to(dt)
            w = torch.exp(s - torch.where(torch.isneginf(ls), torch.zeros_like(ls), ls))
        out[:, :, c0 : c0 + r.numel(), k0:k1] = w
    return out

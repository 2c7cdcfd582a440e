"""``tiled``: exact attention in ``O(L · D)`` memory that skips what the mask rules out.

The FlashAttention-2 algorithm in PyTorch. Queries are cut into tiles of ``block_q`` rows and keys
into blocks of ``block_k``; the mask classifies every (query tile, key block) pair as empty, full or
partial (:meth:`qkv.masks.Mask.block_kinds`, from the mask's formula). For each query tile the
non-empty key blocks form *segments*: runs of full blocks are computed with no mask at all, partial
blocks with the mask evaluated on that tile only (:meth:`qkv.masks.Mask.tile`), empty blocks never.
Each segment gives a partial output and the per-row logsumexp, and segments merge exactly by
logsumexp (:func:`merge`), as ring attention merges the results of different ranks. No
``Lq x Lk`` tensor is ever built.

Two engines compute a segment:

* **fused** (CPU, no score mod): PyTorch's flash kernel for the CPU,
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the output *and* the row
  logsumexp. The backward is a custom :class:`torch.autograd.Function` that, per segment, calls the
  fused flash backward with the *global* output and logsumexp: the FlashAttention-2 backward
  (``P = exp(S - lse)``, ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``), exact and ``O(L · D)``.
  A request the fused kernel serves in one call (no mask, or square ``causal()``) is handed to it
  whole: the kernel tiles internally, and is as fast as SDPA.
* **eager** (score mods, devices the fused kernel does not serve, or when the private op is missing
  from the installed torch): per tile ``S = Q Kᵀ · scale``, the score mod evaluated with that tile's
  index tensors, the mask, ``exp(S - lse)``. The backward recomputes each query tile
  (``torch.utils.checkpoint``), so memory stays ``O(block_q · Lk)`` and gradients reach tensors a
  score mod holds (a learned relative bias).

Grouped-query attention never repeats K/V (the fused kernel takes ``Hkv < H``; the eager engine views
``q`` as ``(B, Hkv, G·L, D)``). ``Dv != D`` is served by zero-padding the shorter head dim (which
changes neither scores nor outputs). float16/bfloat16 inputs are computed in float32; float32 and
float64 in their own dtype.

Options (keyword arguments of :func:`qkv.attention` with ``backend="tiled"`` or ``"auto"``):

* ``block_q`` / ``block_k`` (int): tile sizes (defaults :data:`BLOCK_Q`, :data:`BLOCK_K`).
* ``weights_heads`` (sequence of int): with ``return_weights=True``, return the weights of these
  query heads only.
* ``weights_rows`` (slice, sequence of int or 1-D integer tensor): with ``return_weights=True``,
  return the weights of these query rows only.

With ``return_weights=True`` the weights ``(B, len(heads), len(rows), Lk)`` are recomputed tile by
tile from the saved logsumexp, so the weights of 2 heads of a 32k sequence cost ``2 · 32k · 32k``
numbers, not ``H`` times that. Dropout is declined (``sdpa`` and ``reference`` apply it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..masks import EMPTY, FULL, Mask, Shape, _And, _Window
from . import register
from .base import Backend, Request

__all__ = ["BLOCK_K", "BLOCK_Q", "Segment", "Tiled", "attention_with_lse", "merge", "plan_tiles"]

BLOCK_Q = 256
"""Default query-tile rows."""
BLOCK_K = 128
"""Default key-block length (the grain at which empty and full blocks are found)."""
_MERGE_FULL = 4
"""A run of at most this many full key blocks between partial ones is computed with them in one call."""

_OPTIONS = frozenset({"block_q", "block_k", "weights_heads", "weights_rows"})


def _flash_op() -> Callable[..., Any] | None:
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the installed torch
        return None


def _flash_bwd_op() -> Callable[..., Any] | None:
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the installed torch
        return None


_FLASH = _flash_op()
_FLASH_BWD = _flash_bwd_op()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# the merge helper (also used by ring attention)


def merge(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets into the result over their union.

    Args:
        out1: ``(..., L, Dv)`` softmax-weighted output over the first key set (rows that saw no key:
            any finite value, usually 0).
        lse1: ``(..., L)`` row logsumexp of the scores over the first key set; ``-inf`` for rows that
            saw no key.
        out2: ``(..., L, Dv)`` the same over the second key set.
        lse2: ``(..., L)`` the same over the second key set.

    Returns:
        ``(out, lse)``: the output over both key sets and its logsumexp; rows that saw no key in
        either get zeros and ``-inf``. Computed in the dtype of the inputs (pass float32 or float64).
    """
    if out1.shape != out2.shape or lse1.shape != lse2.shape or out1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"merge: out1 {tuple(out1.shape)}, lse1 {tuple(lse1.shape)}, out2 {tuple(out2.shape)} and"
            f" lse2 {tuple(lse2.shape)} must be (..., L, Dv), (..., L), (..., L, Dv), (..., L)"
        )
    m = torch.maximum(lse1, lse2).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e1, e2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # exp(-inf) = 0 for a key set a row did not see
    tot = e1 + e2
    dead = tot == 0
    tot = torch.where(dead, torch.ones_like(tot), tot)
    lse = torch.where(dead, torch.full_like(tot, float("-inf")), m + torch.log(tot))
    out = (out1 * e1.unsqueeze(-1) + out2 * e2.unsqueeze(-1)) / tot.unsqueeze(-1)
    return out, lse


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    mask: Tensor | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention over one key span, returning the output and the row logsumexp (no autograd).

    The building block of :class:`Tiled` and of ring attention: results over disjoint key spans
    combine with :func:`merge`. Uses PyTorch's fused CPU flash kernel where it serves the inputs,
    else computes the scores of the span eagerly.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)`` with ``H % Hkv == 0`` (grouped-query: no copy of K/V).
        v: values ``(B, Hkv, Lk, Dv)``.
        scale: multiplies ``q kᵀ``.
        mask: ``None`` or a bool tensor broadcastable to ``(B, H, Lq, Lk)``, True = may attend, in the
            span's own coordinates.
        is_causal: top-left aligned causal mask within the span (query ``i`` sees keys ``j <= i``).

    Returns:
        ``out (B, H, Lq, Dv)`` and ``lse (B, H, Lq)``, float32 (float64 for float64 inputs); rows
        that may attend to nothing get zeros and ``lse = -inf``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"attention_with_lse: {name} must be 4-D (B, H, L, D), got q {tuple(q.shape)},"
                f" k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
    if q.shape[1] % k.shape[1] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention_with_lse: shapes do not fit, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    dt = _compute_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if is_causal:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else mask & causal
    with torch.no_grad():
        if _fused_ok(q):
            D, Dv = q.shape[-1], v.shape[-1]
            if Dv < D:
                v = F.pad(v, (0, D - Dv))
            elif D < Dv:
                q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
            out, lse = _fused_span(q, k, v, scale, mask, False)
            return out[..., :Dv], lse
        return _eager_span(q, k, v, scale, mask, None)


def _fused_ok(t: Tensor) -> bool:
    return _FLASH is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _fused_span(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None, is_causal: bool
) -> tuple[Tensor, Tensor]:
    """One fused flash call; ``mask`` bool (broadcastable to ``(B, H, tq, tk)``) or None."""
    assert _FLASH is not None
    if mask is None:
        out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=None, scale=scale)
        return out, lse
    add = _additive(mask, q.dtype)
    out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=add, scale=scale)
    live = mask.any(dim=-1)
    return out, lse.masked_fill(~live, float("-inf"))


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _eager_span(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    mask: Tensor | None,
    mod: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Scores of one span computed eagerly (autograd-friendly); ``mod`` changes the scores."""
    s = _scores(q, k, scale)
    if mod is not None:
        s = mod(s)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    tot = p.sum(dim=-1)
    dead = tot == 0  # a row that sees no key of this span: lse = -inf, output 0, zero gradient
    safe = torch.where(dead, torch.ones_like(tot), tot)
    lse = torch.where(dead, torch.full_like(tot, float("-inf")), m.squeeze(-1) + torch.log(safe))
    return _pv(p, v) / safe.unsqueeze(-1), lse


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``q kᵀ · scale`` ``(B, H, tq, tk)`` with grouped-query heads sharing K (no copy: the query rows
    of a group are stacked, ``(B, Hkv, G·tq, D)``)."""
    B, H, tq, D = q.shape
    Hkv = k.shape[1]
    s = q.reshape(B, Hkv, H // Hkv * tq, D) @ k.transpose(-1, -2)
    return s.reshape(B, H, tq, k.shape[2]) * scale


def _pv(p: Tensor, v: Tensor) -> Tensor:
    B, H, tq, tk = p.shape
    Hkv = v.shape[1]
    return (p.reshape(B, Hkv, H // Hkv * tq, tk) @ v).reshape(B, H, tq, v.shape[-1])


# ------------------------------------------------------------------------------------------------
# the plan: which key spans each query tile visits


@dataclass(frozen=True)
class Segment:
    """Keys ``[k0, k1)`` of one query tile, computed with the mask (``partial``) or without it.

    ``tri`` marks a square segment whose mask is exactly a triangle, which the fused kernel computes
    with ``is_causal`` (skipping the other half): ``"lower"`` (key ``j`` allowed iff ``j - k0 <= i - q0``,
    the diagonal of causal attention) or ``"upper"`` (``j - k0 >= i - q0``, the far edge of a causal
    sliding window; computed with rows and keys reversed). The eager engine evaluates the mask."""

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


def _is_causal(mask: Mask | None) -> bool:
    return mask is not None and mask.is_causal


def _block_codes(mask: Mask, shape: Shape, block_q: int, block_k: int) -> list[list[int]]:
    """Per (query tile, key block): 0 empty for every batch row and head, 1 full for all, 2 else."""
    kinds = mask.block_kinds(shape, block_q, block_k)  # (B|1, H|1, nq, nk)
    all_empty = (kinds == EMPTY).flatten(0, 1).all(dim=0)
    all_full = (kinds == FULL).flatten(0, 1).all(dim=0)
    code: list[list[int]] = torch.where(all_empty, 0, torch.where(all_full, 1, 2)).tolist()
    return code


def _causal_window(mask: Mask) -> int | None:
    """``W`` when ``mask`` is exactly a causal sliding window (keys ``p - W <= j <= p``), else None;
    a large ``W`` stands for plain causal."""
    parts: list[Mask] = [mask]
    if type(mask) is _And:
        parts = [mask.a, mask.b]
    if not all(type(m) is _Window for m in parts):
        return None
    rights = [m.right for m in parts if m.right is not None]  # type: ignore[attr-defined]
    lefts = [m.left for m in parts if m.left is not None]  # type: ignore[attr-defined]
    if not rights or min(rights) != 0:
        return None
    return min(lefts) if lefts else 1 << 62


def _band_tile(q0: int, q1: int, W: int, shape: Shape) -> Tile | None:
    """Query rows ``[q0, q1)`` of a causal window ``W`` as triangles and a full run (no mask at all):
    keys ``[p0 - W, p0 - W + t)`` upper triangle, ``[p0 - W + t, p0)`` full, ``[p0, p0 + t)`` lower
    triangle, where ``p0 = q0 + Lk - Lq`` and ``t = q1 - q0``. None where that layout does not apply."""
    t = q1 - q0
    p0 = q0 + shape.offset
    if p0 < 0 or p0 + t > shape.Lk:
        return None
    diag = Segment(p0, p0 + t, True, "lower")
    if W >= p0 + t:  # plain causal reach: everything before the diagonal is full
        return Tile(q0, q1, ((Segment(0, p0, False),) if p0 else ()) + (diag,))
    if t > W or p0 - W < 0:
        return None
    segs = [Segment(p0 - W, p0 - W + t, True, "upper")]
    if W > t:
        segs.append(Segment(p0 - W + t, p0, False))
    return Tile(q0, q1, (*segs, diag))


def plan_tiles(
    mask: Mask | None,
    shape: Shape,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    codes: list[list[int]] | None = None,
) -> list[Tile]:
    """The tiles and key segments that ``tiled`` computes for ``mask`` on a problem of ``shape``.

    Args:
        mask: the request's mask, or ``None`` (every pair meets).
        shape: the problem (``B, H, Lq, Lk``).
        block_q: query-tile rows.
        block_k: key-block length (the grain at which empty and full blocks are found).
        codes: the block classification if already computed (``Tiled.live_fraction``).

    Returns:
        One :class:`Tile` per query tile. Empty key blocks appear in no segment; a block that is full
        for every batch row and head is in a segment with ``partial=False``."""
    if mask is None:
        return [Tile(0, shape.Lq, (Segment(0, shape.Lk, False),))]
    window = _causal_window(mask)
    code = codes if codes is not None else _block_codes(mask, shape, block_q, block_k)
    tiles = []
    for i, row in enumerate(code):
        q0, q1 = i * block_q, min((i + 1) * block_q, shape.Lq)
        if window is not None:
            band = _band_tile(q0, q1, window, shape)
            if band is not None:
                tiles.append(band)
                continue
        runs: list[list[int]] = []  # [kind, first block, last block + 1]
        for j, c in enumerate(row):
            if c == 0:
                continue
            if runs and runs[-1][0] == c and runs[-1][2] == j:
                runs[-1][2] = j + 1
            else:
                runs.append([c, j, j + 1])
        # a short run of full blocks touching a partial run joins it: one call instead of three
        merged: list[list[int]] = []
        for r in runs:
            if merged and merged[-1][2] == r[1]:
                last = merged[-1]
                short = (r[0] == 1 and r[2] - r[1] <= _MERGE_FULL) or (
                    last[0] == 1 and last[2] - last[1] <= _MERGE_FULL
                )
                if short and (r[0] == 2 or last[0] == 2):
                    last[0], last[2] = 2, r[2]
                    continue
            merged.append(list(r))
        segs = tuple(Segment(a * block_k, min(b * block_k, shape.Lk), c == 2) for c, a, b in merged)
        tiles.append(Tile(q0, q1, segs))
    return tiles


# ------------------------------------------------------------------------------------------------
# fused engine with its FlashAttention-2 backward


def _segment_mask(mask: Mask | None, shape: Shape, t: Tile, seg: Segment) -> Tensor | None:
    if not seg.partial or mask is None:
        return None
    return mask.tile(shape, t.q0, t.q1, seg.k0, seg.k1)


def _fused_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Mask | None, shape: Shape, tiles: list[Tile]
) -> tuple[Tensor, Tensor]:
    B, H, Lq = q.shape[:3]
    if (
        len(tiles) == 1
        and len(tiles[0].segments) == 1
        and not tiles[0].segments[0].partial
        and tiles[0].segments[0].k0 == 0
        and tiles[0].segments[0].k1 == k.shape[2]
        and tiles[0].q0 == 0
        and tiles[0].q1 == Lq
    ):
        out, lse = _fused_span(q, k, v, scale, None, False)
        return out, lse
    if _is_causal(mask) and shape.Lq == shape.Lk:
        out, lse = _fused_span(q, k, v, scale, None, True)
        return out, lse
    out = q.new_zeros(B, H, Lq, v.shape[-1])
    lse = q.new_full((B, H, Lq), float("-inf"))
    for t in tiles:
        qt = q[:, :, t.q0 : t.q1]
        acc: tuple[Tensor, Tensor] | None = None
        for seg in t.segments:
            ks, vs = k[:, :, seg.k0 : seg.k1], v[:, :, seg.k0 : seg.k1]
            if seg.tri == "lower":
                part = _fused_span(qt, ks, vs, scale, None, True)
            elif seg.tri == "upper":  # reversing rows and keys turns the upper triangle into a lower one
                o, ls = _fused_span(qt.flip(2), ks.flip(2), vs.flip(2), scale, None, True)
                part = o.flip(2), ls.flip(-1)
            else:
                part = _fused_span(qt, ks, vs, scale, _segment_mask(mask, shape, t, seg), False)
            acc = part if acc is None else merge(acc[0], acc[1], part[0], part[1])
        if acc is not None:
            out[:, :, t.q0 : t.q1] = acc[0]
            lse[:, :, t.q0 : t.q1] = acc[1]
    return out, lse


class _FusedTiled(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Mask | None, shape: Shape, tiles: list[Tile]
    ) -> tuple[Tensor, Tensor]:
        out, lse = _fused_forward(q, k, v, scale, mask, shape, tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.mask, ctx.shape, ctx.tiles = scale, mask, shape, tiles
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        assert _FLASH_BWD is not None
        q, k, v, out, lse = ctx.saved_tensors
        scale, mask, shape, tiles = ctx.scale, ctx.mask, ctx.shape, ctx.tiles
        dout = dout.contiguous()
        # rows that saw nothing: out = 0, every score masked, so any finite lse gives P = 0
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        whole = len(tiles) == 1 and len(tiles[0].segments) == 1 and not tiles[0].segments[0].partial
        whole = whole and tiles[0].segments[0].k0 == 0 and tiles[0].segments[0].k1 == k.shape[2]
        causal = _is_causal(mask) and shape.Lq == shape.Lk
        if whole or causal:
            dq, dk, dv = _FLASH_BWD(dout, q, k, v, out, lse, 0.0, causal and not whole, attn_mask=None, scale=scale)
            return dq, dk, dv, None, None, None, None
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for t in tiles:
            sl = slice(t.q0, t.q1)
            qt, dot, ot, lt = q[:, :, sl], dout[:, :, sl], out[:, :, sl], lse[:, :, sl].contiguous()
            for seg in t.segments:
                ks = slice(seg.k0, seg.k1)
                if seg.tri == "lower":
                    gq, gk, gv = _FLASH_BWD(dot, qt, k[:, :, ks], v[:, :, ks], ot, lt, 0.0, True, scale=scale)
                elif seg.tri == "upper":
                    f = [x.flip(2) for x in (dot, qt, k[:, :, ks], v[:, :, ks], ot)]
                    gq, gk, gv = (g.flip(2) for g in _FLASH_BWD(*f, lt.flip(-1), 0.0, True, scale=scale))
                else:
                    m = _segment_mask(mask, shape, t, seg)
                    add = None if m is None else _additive(m, q.dtype)
                    gq, gk, gv = _FLASH_BWD(
                        dot, qt, k[:, :, ks], v[:, :, ks], ot, lt, 0.0, False, attn_mask=add, scale=scale
                    )
                dq[:, :, sl] += gq
                dk[:, :, ks] += gk
                dv[:, :, ks] += gv
        return dq, dk, dv, None, None, None, None


# ------------------------------------------------------------------------------------------------
# eager engine (score mods, other devices)


def _tile_mod(
    sm: Any, shape: Shape, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor, dt: torch.dtype
) -> Callable[[Tensor], Tensor]:
    def mod(s: Tensor) -> Tensor:
        return sm._apply(shape, s, b, h, qi, ki).to(dt).expand(s.shape)  # type: ignore[no-any-return]

    return mod


def _eager_tile(qt: Tensor, k: Tensor, v: Tensor, req: Request, t: Tile, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Output and logsumexp of one query tile over its segments (differentiable, checkpointable)."""
    shape = req.shape
    acc: tuple[Tensor, Tensor] | None = None
    dev = qt.device
    b = torch.arange(req.B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(req.H, device=dev).view(1, -1, 1, 1)
    qi = torch.arange(t.q0, t.q1, device=dev).view(1, 1, -1, 1)
    sm = req.score_mod
    for seg in t.segments:
        ki = torch.arange(seg.k0, seg.k1, device=dev).view(1, 1, 1, -1)
        mod = None if sm is None else _tile_mod(sm, shape, b, h, qi, ki, dt)
        m = _segment_mask(req.mask, shape, t, seg)
        part = _eager_span(qt, k[:, :, seg.k0 : seg.k1], v[:, :, seg.k0 : seg.k1], req.scale, m, mod)
        acc = part if acc is None else merge(acc[0], acc[1], part[0], part[1])
    if acc is None:
        return qt.new_zeros(*qt.shape[:3], v.shape[-1]), qt.new_full(qt.shape[:3], float("-inf"))
    return acc


def _eager_forward(
    q: Tensor, k: Tensor, v: Tensor, req: Request, tiles: list[Tile], dt: torch.dtype
) -> tuple[Tensor, Tensor]:
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for t in tiles:
        qt = q[:, :, t.q0 : t.q1]
        if grad:
            o, lse = checkpoint(_eager_tile, qt, k, v, req, t, dt, use_reentrant=False)
        else:
            o, lse = _eager_tile(qt, k, v, req, t, dt)
        outs.append(o)
        lses.append(lse.detach())
    out = torch.cat(outs, dim=2)
    if grad and not out.requires_grad:  # every tile empty: keep the graph, gradients are zeros
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, torch.cat(lses, dim=2)


# ------------------------------------------------------------------------------------------------
# weights on demand


def _rows_index(rows: Any, Lq: int, device: torch.device) -> Tensor:
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


def _heads_index(heads: Any, H: int) -> list[int]:
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


def _weights(req: Request, q: Tensor, k: Tensor, lse: Tensor, dt: torch.dtype, block_q: int) -> Tensor:
    """Weights ``(B, len(heads), len(rows), Lk)`` recomputed from the row logsumexp, a chunk of rows
    at a time; differentiable (a plain softmax over the chosen rows) when gradients are on."""
    heads = _heads_index(req.options.get("weights_heads"), req.H)
    rows = _rows_index(req.options.get("weights_rows"), req.Lq, q.device)
    shape = req.shape
    G = req.groups
    hq = torch.tensor(heads, dtype=torch.long, device=q.device)
    kv_heads = hq // G
    dev = q.device
    b = torch.arange(req.B, device=dev).view(-1, 1, 1, 1)
    h = hq.view(1, -1, 1, 1)
    ki = torch.arange(req.Lk, device=dev).view(1, 1, 1, -1)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    chunks = []
    for c0 in range(0, rows.numel(), block_q):
        r = rows[c0 : c0 + block_q]
        qi = r.view(1, 1, -1, 1)
        qs = q[:, hq][:, :, r]  # (B, nh, nr, D)
        s = (qs @ k[:, kv_heads].transpose(-1, -2)) * req.scale
        if req.score_mod is not None:
            s = req.score_mod._apply(shape, s, b, h, qi, ki).to(dt).expand(s.shape)
        if req.mask is not None:
            allowed = req.mask._eval(shape, b, h, qi, ki)
            if not isinstance(allowed, Tensor):
                allowed = torch.tensor(bool(allowed), device=dev)
            s = s.masked_fill(~allowed.to(torch.bool), float("-inf"))
        if grad:
            from .reference import softmax_rows

            w = softmax_rows(s)
        else:
            ls = lse[:, hq][:, :, r].unsqueeze(-1)
            w = torch.exp(s - torch.where(torch.isneginf(ls), torch.zeros_like(ls), ls))
        chunks.append(w)
    if not chunks:
        return q.new_zeros(req.B, len(heads), 0, req.Lk)
    return torch.cat(chunks, dim=2)


# ------------------------------------------------------------------------------------------------
# the backend


def _block(req: Request, name: str, default: int) -> int:
    val = req.options.get(name, default)
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    return val


class Tiled(Backend):
    """FlashAttention-2 in PyTorch over the mask's non-empty tiles; see the module docstring."""

    name = "tiled"
    options = _OPTIONS

    def supports(self, req: Request) -> str | None:
        if req.dropout_p > 0:
            return "tiled does not apply dropout (sdpa and reference do)"
        if (req.options.get("weights_heads") is not None or req.options.get("weights_rows") is not None) and not (
            req.return_weights
        ):
            return "weights_heads/weights_rows need return_weights=True"
        return None

    def fused(self, req: Request) -> bool:
        """Whether ``req`` runs on the fused CPU flash kernel (else the eager engine)."""
        return req.score_mod is None and _FLASH is not None and _FLASH_BWD is not None and req.device.type == "cpu"

    def live_fraction(self, req: Request) -> tuple[float, int]:
        """The fraction of (query tile, key block) pairs that ``req``'s mask leaves non-empty, and
        how many pairs there are (``auto`` compares it with SDPA's dense work)."""
        if req.mask is None:
            return 1.0, 1
        bq, bk = _block(req, "block_q", BLOCK_Q), _block(req, "block_k", BLOCK_K)
        code = _block_codes(req.mask, req.shape, bq, bk)
        req.__dict__["_tiled_codes"] = (bq, bk, code)  # this call's run() reuses it (a custom mask costs a pass)
        n = sum(len(r) for r in code)
        return (sum(c != 0 for r in code for c in r) / n if n else 1.0), n

    def run(self, req: Request) -> Tensor | tuple[Tensor, Tensor]:
        why = self.supports(req)
        if why is not None:
            raise NotImplementedError(why)
        bq, bk = _block(req, "block_q", BLOCK_Q), _block(req, "block_k", BLOCK_K)
        dt = _compute_dtype(req.dtype)
        q, k, v = req.q.to(dt), req.k.to(dt), req.v.to(dt)
        D, Dv = req.D, req.Dv
        shape = req.shape
        known = req.__dict__.get("_tiled_codes")
        codes = known[2] if known is not None and known[:2] == (bq, bk) else None
        tiles = plan_tiles(req.mask, shape, bq, bk, codes)
        if self.fused(req):
            if Dv < D:
                v = F.pad(v, (0, D - Dv))
            elif D < Dv:
                q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
            out, lse = _FusedTiled.apply(q, k, v, req.scale, req.mask, shape, tiles)
            out = out[..., :Dv]
            q, k = q[..., :D], k[..., :D]
        else:
            out, lse = _eager_forward(q, k, v, req, tiles, dt)
        out = out.to(req.dtype)
        if req.return_weights:
            return out, _weights(req, q, k, lse, dt, bq).to(req.dtype)
        return out


register(Tiled())

"""``tiled``: exact attention in ``O(L · D)`` memory that skips what the mask rules out.

The FlashAttention-2 algorithm in PyTorch. Queries are cut into tiles of ``block_q`` rows and keys
into blocks of ``block_k``; the mask classifies every (query tile, key block) pair as empty, full or
partial (:meth:`qkv.masks.Mask.block_kinds`, from the mask's formula). For each query tile the
non-empty key blocks form *segments*: runs of full blocks are computed with no mask at all, partial
blocks with the mask evaluated on that tile only (:meth:`qkv.masks.Mask.tile`), empty blocks never.
That decision is a :class:`~qkv.backends.plan.TilePlan`, built once per (mask, shape, block sizes) and
cached. Each segment gives a partial output and the per-row logsumexp from the kernel core
(:mod:`qkv.backends.kernels`), and segments merge exactly by logsumexp (:func:`merge`), as ring
attention merges the results of different ranks. No ``Lq x Lk`` tensor is ever built.

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

Grouped-query attention never repeats K/V in the forward (the fused kernel takes ``Hkv < H``; the eager
engine views ``q`` as ``(B, Hkv, G, L, D)``); the half-precision backward repeats them per call to
reduce the group in float32 (:func:`~qkv.backends.kernels.span_backward`). ``Dv != D`` is served by
zero-padding the shorter head dim (which changes neither scores nor outputs). float32 and float64 are
computed in their own dtype. float16/bfloat16 go to the fused kernel as they are (it accumulates in
float32 and rounds ``P`` to the low dtype, as flash-attn does) unless it runs clearly slower in them
than in float32 on this machine (:func:`~qkv.backends.kernels.half_speed`); logsumexps, merges
and the sums of gradients are float32, outputs in the inputs' dtype. The eager engine, and the fused
one where half precision is slower, compute in float32.

Options (keyword arguments of :func:`qkv.attention` with ``backend="tiled"`` or ``"auto"``):

* ``block_q`` / ``block_k`` (int): tile sizes (defaults :data:`BLOCK_Q`, :data:`BLOCK_K`).
* ``weights_heads`` (sequence of int): with ``return_weights=True``, return the weights of these
  query heads only.
* ``weights_rows`` (slice, sequence of int or 1-D integer tensor): with ``return_weights=True``,
  return the weights of these query rows only.

Attention sinks (``sinks=``, one logit per query head in the softmax denominator) cost no extra key:
the finished ``(out, lse)`` is corrected, ``lse' = logaddexp(lse, s_h)`` and ``out' = out * exp(lse -
lse')`` (:func:`~qkv.backends.kernels.sink_forward`); the backward runs the same per-segment
FlashAttention-2 backward given the final ``out'`` and ``lse'``, which is exact for ``q``, ``k`` and
``v``, and :func:`~qkv.backends.kernels.sink_backward` gives the sinks' gradient. In float16/bfloat16
the sinks, the correction and the sinks' gradient are float32 and ``out'`` is rounded once to the input dtype.

With ``return_weights=True`` the weights ``(B, len(heads), len(rows), Lk)`` are recomputed tile by
tile from the saved logsumexp (:mod:`qkv.backends.weights`, shared with ``flex``), so the weights of 2 heads of a 32k sequence cost ``2 · 32k · 32k``
numbers, not ``H`` times that. Dropout is declined (``sdpa`` and ``reference`` apply it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..masks import Mask, Shape
from ..scores import ScoreMod
from .base import Backend, Request
from .kernels import (
    CAST_S,
    FLASH,
    FLASH_BWD,
    FUSED_CALL_S,
    FUSED_CAUSAL_SHARE,
    FUSED_FLOPS,
    HALF,
    band_backward,
    band_forward,
    compute_dtype,
    half_speed,
    merge,
    sink_backward,
    sink_forward,
    span_backward,
    span_forward,
)
from .plan import Segment, Tile, TilePlan, plan_tiles, tile_plan
from .registry import register
from .weights import OPTIONS as WEIGHT_OPTIONS
from .weights import key_ranges, weights

__all__ = ["BLOCK_K", "BLOCK_Q", "Segment", "Tiled", "merge", "plan_tiles"]

BLOCK_Q = 256
"""Default query-tile rows."""
BLOCK_K = 128
"""Default key-block length (the grain at which empty and full blocks are found)."""

_OPTIONS = frozenset({"block_q", "block_k"}) | WEIGHT_OPTIONS


# ------------------------------------------------------------------------------------------------
# fused engine with its FlashAttention-2 backward


def _segment_mask(mask: Mask | None, shape: Shape, t: Tile, seg: Segment) -> Tensor | None:
    if not seg.partial or mask is None:
        return None
    return mask.tile(shape, t.q0, t.q1, seg.k0, seg.k1)


def _fused_segment(
    qt: Tensor, ks: Tensor, vs: Tensor, scale: float, mask: Mask | None, shape: Shape, t: Tile, seg: Segment
) -> tuple[Tensor, Tensor]:
    if seg.tri == "lower":
        return span_forward(qt, ks, vs, scale, causal=True)
    if seg.tri == "upper":  # reversing rows and keys turns the upper triangle into a lower one
        o, ls = span_forward(qt.flip(2), ks.flip(2), vs.flip(2), scale, causal=True)
        return o.flip(2), ls.flip(-1)
    return span_forward(qt, ks, vs, scale, _segment_mask(mask, shape, t, seg))


def _fused_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Mask | None, plan: TilePlan
) -> tuple[Tensor, Tensor]:
    """Output (in the dtype of ``q``) and logsumexp (float32 for half precision) over the plan's segments,
    merged in float32 (or float64)."""
    if plan.single:
        return span_forward(q, k, v, scale, causal=plan.single == "causal")
    B, H, Lq = q.shape[:3]
    acc_dt = torch.float32 if q.dtype in HALF else q.dtype
    out = q.new_empty(B, H, Lq, v.shape[-1])
    lse = q.new_empty((B, H, Lq), dtype=acc_dt)
    b = plan.band
    if b is not None:
        band_forward(q, k, v, scale, b.q0, b.q1, b.rows, b.window, b.reach, plan.shape.offset, into=(out, lse))
    for t in plan.tiles:
        if plan.in_band(t):
            continue
        qt = q[:, :, t.q0 : t.q1]
        acc: tuple[Tensor, Tensor] | None = None
        for seg in t.segments:
            ks, vs = k[:, :, seg.k0 : seg.k1], v[:, :, seg.k0 : seg.k1]
            part = _fused_segment(qt, ks, vs, scale, mask, plan.shape, t, seg)
            acc = part if acc is None else merge(acc[0].to(acc_dt), acc[1], part[0].to(acc_dt), part[1])
        if acc is None:  # every row of the tile sees nothing
            out[:, :, t.q0 : t.q1] = 0.0
            lse[:, :, t.q0 : t.q1] = float("-inf")
        else:
            out[:, :, t.q0 : t.q1] = acc[0]
            lse[:, :, t.q0 : t.q1] = acc[1]
    return out, lse


class _FusedTiled(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        mask: Mask | None,
        plan: TilePlan,
        sinks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        out, lse = _fused_forward(q, k, v, scale, mask, plan)
        if sinks is not None:  # the final output and logsumexp, from which the backward works
            out, lse = sink_forward(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.scale, ctx.mask, ctx.plan = scale, mask, plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse, sinks = ctx.saved_tensors
        scale, mask, plan = ctx.scale, ctx.mask, ctx.plan
        dt = q.dtype
        bdt = compute_dtype(dt, fused=True, backward=True)
        if bdt != dt:  # a half-precision forward whose backward runs faster in float32 on this machine
            q, k, v, out, dout = (t.to(bdt) for t in (q, k, v, out, dout))
        dout = dout.contiguous()
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[6]:
            dsinks = sink_backward(dout, out, lse, sinks)
        if plan.single:
            dq, dk, dv = span_backward(dout, q, k, v, out, lse, scale, causal=plan.single == "causal")
            return dq.to(dt), dk.to(dt), dv.to(dt), None, None, None, dsinks
        acc = torch.float32 if q.dtype in HALF else q.dtype  # gradients are summed in float32 (or float64)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
        b = plan.band
        if b is not None:
            off = plan.shape.offset
            band_backward(dout, q, k, v, out, lse, scale, b.q0, b.q1, b.rows, b.window, b.reach, off, (dq, dk, dv))
        for t in plan.tiles:
            if plan.in_band(t):
                continue
            sl = slice(t.q0, t.q1)
            qt, dot, ot, lt = q[:, :, sl], dout[:, :, sl], out[:, :, sl], lse[:, :, sl]
            for seg in t.segments:
                ks = slice(seg.k0, seg.k1)
                kt, vt = k[:, :, ks], v[:, :, ks]
                if seg.tri == "lower":
                    gq, gk, gv = span_backward(dot, qt, kt, vt, ot, lt, scale, causal=True)
                elif seg.tri == "upper":
                    fd, fq, fk, fv, fo = (x.flip(2) for x in (dot, qt, kt, vt, ot))
                    grads = span_backward(fd, fq, fk, fv, fo, lt.flip(-1), scale, causal=True)
                    gq, gk, gv = (g.flip(2) for g in grads)
                else:
                    m = _segment_mask(mask, plan.shape, t, seg)
                    gq, gk, gv = span_backward(dot, qt, kt, vt, ot, lt, scale, m)
                dq[:, :, sl] += gq
                dk[:, :, ks] += gk
                dv[:, :, ks] += gv
        return dq.to(dt), dk.to(dt), dv.to(dt), None, None, None, dsinks


# ------------------------------------------------------------------------------------------------
# eager engine (score mods, other devices)


def _tile_mod(
    sm: ScoreMod, shape: Shape, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor, dt: torch.dtype
) -> Callable[[Tensor], Tensor]:
    def mod(s: Tensor) -> Tensor:
        return sm.apply(shape, s, b, h, qi, ki).to(dt).expand(s.shape)

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
        ks, vs = k[:, :, seg.k0 : seg.k1], v[:, :, seg.k0 : seg.k1]
        part = span_forward(qt, ks, vs, req.scale, m, mod=mod if mod is not None else _eager)
        acc = part if acc is None else merge(acc[0], acc[1], part[0], part[1])
    if acc is None:
        return qt.new_zeros(*qt.shape[:3], v.shape[-1]), qt.new_full(qt.shape[:3], float("-inf"))
    return acc


def _eager(s: Tensor) -> Tensor:
    """The identity score mod: forces :func:`span_forward`'s eager engine (differentiable by autograd)."""
    return s


def _eager_forward(
    q: Tensor, k: Tensor, v: Tensor, req: Request, plan: TilePlan, dt: torch.dtype, sinks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v) + (() if sinks is None else (sinks,)))
    outs, lses = [], []
    for t in plan.tiles:
        qt = q[:, :, t.q0 : t.q1]
        if grad:
            o, lse = checkpoint(_eager_tile, qt, k, v, req, t, dt, use_reentrant=False)
        else:
            o, lse = _eager_tile(qt, k, v, req, t, dt)
        outs.append(o)
        lses.append(lse if sinks is not None else lse.detach())  # out' depends on lse through the sink
    out, lse_all = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    if grad and not out.requires_grad:  # every tile empty: keep the graph, gradients are zeros
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    if sinks is not None:  # differentiable by autograd here
        out, lse_all = sink_forward(out, lse_all, sinks)
    return out, lse_all.detach()


# ------------------------------------------------------------------------------------------------
# the backend

#: measured constants of the cost model (``python benchmarks/auto_regret.py`` checks them); the fused
#: kernel's own rate and call cost are :data:`~qkv.backends.kernels.FUSED_FLOPS` and ``FUSED_CALL_S``
EAGER_FLOPS = 40e9
"""Floating-point operations per second of the eager engine (matmuls, exp and a softmax written out)."""
MASK_PAIR_S = 1.5e-9
"""Seconds per (query, key) pair of a partial tile: the mask evaluated, turned additive, applied."""
MERGE_S = 4e-9
"""Seconds per output element of a logsumexp merge."""
BAND_PAIR_S = 0.3e-9
"""Seconds per (query, key) pair of a batched band: its one shared additive mask applied."""
RUN_S = 50e-6
"""Fixed seconds per call of the backend (plan lookup, the autograd function, casts)."""
SINK_S = 1e-9
"""Seconds per output element of the sink correction (``out * exp(lse - lse')``; measured 0.7-0.8 ns)."""


def _block(req: Request, name: str, default: int) -> int:
    val = req.options.get(name, default)
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    return val


class Tiled(Backend):
    """FlashAttention-2 in PyTorch over the mask's non-empty tiles; see the module docstring."""

    name = "tiled"
    options = _OPTIONS
    takes_sinks = True

    def supports(self, req: Request) -> str | None:
        if req.dropout_p > 0:
            return "tiled does not apply dropout (sdpa and reference do)"
        if (req.options.get("weights_heads") is not None or req.options.get("weights_rows") is not None) and not (
            req.return_weights
        ):
            return "weights_heads/weights_rows need return_weights=True"
        return None

    def choice_state(self) -> tuple[()]:
        return ()  # a plain request: supports() and cost() read the request alone (and measured constants)

    def traceable(self, req: Request) -> str | None:
        return (
            "its loop over tiles is planned from tensor values (the mask's block codes, read with .tolist()),"
            " which a compiled graph cannot read: asked for by name it runs outside the graph (one graph break"
            " per call)"
        )

    def fused(self, req: Request) -> bool:
        """Whether ``req`` runs on the fused CPU flash kernel (else the eager engine)."""
        return req.score_mod is None and FLASH is not None and FLASH_BWD is not None and req.device.type == "cpu"

    def plan(self, req: Request) -> TilePlan:
        """The cached :class:`~qkv.backends.plan.TilePlan` of the request's mask, shape and block sizes."""
        bq, bk = _block(req, "block_q", BLOCK_Q), _block(req, "block_k", BLOCK_K)
        return tile_plan(req.mask, req.shape, bq, bk)

    def cost(self, req: Request) -> float:
        plan = self.plan(req)
        heads = req.B * req.H
        per_pair = 2.0 * (req.D + req.Dv)  # flops of one (query, key) pair in the forward
        fused = self.fused(req)
        dt = compute_dtype(req.dtype, fused=fused)
        speed = half_speed(dt) if dt in HALF else 1.0  # the fused kernel's rate in half precision here
        if fused and plan.single:  # one call of the fused kernel, as sdpa makes
            share = FUSED_CAUSAL_SHARE if plan.single == "causal" else 1.0
            s = req.flops * share / (FUSED_FLOPS * speed) + FUSED_CALL_S
        elif fused:
            s = heads * plan.fused_pairs * per_pair / (FUSED_FLOPS * speed) + plan.fused_calls * FUSED_CALL_S
            s += heads * (plan.fused_partial_pairs * MASK_PAIR_S + plan.band_pairs * BAND_PAIR_S)
            s += heads * plan.merged_rows * req.Dv * MERGE_S
        else:
            s = heads * plan.pairs * per_pair / EAGER_FLOPS + plan.calls * 4 * FUSED_CALL_S
            s += heads * plan.partial_pairs * MASK_PAIR_S
            s += heads * req.Lq * req.Dv * MERGE_S * max(0.0, plan.calls / max(1, len(plan.tiles)) - 1)
        s += RUN_S
        half = req.dtype in HALF
        casts = 2 * (req.q.numel() + req.k.numel() + req.v.numel()) * CAST_S if half else 0.0
        if half and dt not in HALF:  # cast to float32 and back
            s += casts
        if req.sinks is not None:  # the logsumexp correction of every output row
            s += heads * req.Lq * req.Dv * SINK_S
        if req.requires_grad:  # the backward: about twice the forward's work
            bdt = compute_dtype(req.dtype, fused=fused, backward=True)
            slower = speed / half_speed(bdt, backward=True) if bdt in HALF else speed
            s += 2.0 * s * slower + (casts if dt in HALF and bdt not in HALF else 0.0)
        if req.return_weights:
            s += heads * req.Lq * req.Lk * (per_pair / 2 / EAGER_FLOPS + MASK_PAIR_S)
        return s

    def describe(self, req: Request) -> str:
        plan = self.plan(req)
        fused = self.fused(req)
        engine = "fused CPU flash kernel" if fused else "eager engine"
        if req.dtype in HALF:
            dt = compute_dtype(req.dtype, fused=fused)
            name = str(req.dtype).removeprefix("torch.")
            engine += f" in {name}" if dt == req.dtype else f" in float32 ({name} is slower here)" if fused else ""
        if fused and plan.band is not None and not plan.single:
            engine += f", the window's band in one call of {plan.band.tiles} tiles"
        if req.mask is None or plan.single:
            what = "one call" if plan.single else f"{len(plan.tiles)} query tiles"
        else:
            what = (
                f"mask {req.mask!r} leaves {plan.live_fraction:.0%} of {plan.blocks} tiles non-empty; tiled skips"
                " the rest"
            )
        extra = "; weights recomputed tile by tile from its logsumexp" if req.return_weights else ""
        return f"{what} ({engine}, O(L*D) memory){extra}"

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        why = self.supports(req)
        if why is not None:
            raise NotImplementedError(why)
        plan = plan if isinstance(plan, TilePlan) else self.plan(req)
        fused = self.fused(req)
        dt = compute_dtype(req.dtype, fused=fused)
        q, k, v = (req.q, req.k, req.v) if dt == req.dtype else (req.q.to(dt), req.k.to(dt), req.v.to(dt))
        wdt = compute_dtype(req.dtype)  # float32 for half precision: sinks, their correction, weights
        sinks = None if req.sinks is None else req.sinks.to(wdt)
        if fused and req.requires_grad:
            out, lse = _FusedTiled.apply(q, k, v, req.scale, req.mask, plan, sinks)
        elif fused:  # no graph to record: the same forward without the autograd.Function around it
            out, lse = _fused_forward(q, k, v, req.scale, req.mask, plan)
            if sinks is not None:
                out, lse = sink_forward(out, lse, sinks)
        else:
            out, lse = _eager_forward(q, k, v, req, plan, dt, sinks)
        out = out if out.dtype == req.dtype else out.to(req.dtype)
        if req.return_weights:
            wq, wk = req.q.to(wdt), req.k.to(wdt)  # weights recomputed in float32 for half precision
            ranges = key_ranges(plan.tiles, req.Lq, req.Lk, q.device)
            return out, weights(req, wq, wk, lse.to(wdt), wdt, plan.block_q, sinks, ranges).to(req.dtype)
        return out


register(Tiled())

"""The kernel core: exact attention over one key span with its logsumexp, forward and backward, and
the merge of spans. ``tiled`` and the sequence-parallel backends (``ring``) are built from these.

A *span* is a block of queries ``q (B, H, m, D)`` against a block of keys ``k (B, Hkv, n, D)`` and values
``v (B, Hkv, n, Dv)`` (``H % Hkv == 0``: grouped-query heads share K/V, never copied). Its result is
the softmax-normalised output ``(B, H, m, Dv)`` and the row logsumexp ``(B, H, m)`` (``-inf`` for rows
that see no key of the span). Results over disjoint key spans combine exactly with :func:`merge`.

Two engines compute a span:

* **fused** (CPU): PyTorch's flash kernel for the CPU, ``aten._scaled_dot_product_flash_attention_for_cpu``,
  which returns the output *and* the logsumexp, and its backward, the FlashAttention-2 backward given
  the *global* output and logsumexp (``P = exp(S - lse)``, ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``).
  Both are private ops: :data:`FLASH` is ``None`` where the installed torch lacks them.
* **eager** (any device, score mods): the same formulas written with matmuls, differentiable by
  autograd; ``mod`` changes the scores of the span before the softmax.

Half precision: the fused kernel takes bfloat16/float16 as they are (its matmuls accumulate in float32,
``P`` is rounded to the low dtype before ``P V``, the logsumexp comes back in float32) unless it runs
clearly slower in that dtype than in float32 on this machine (:func:`half_speed`, measured once); there,
and on the eager engine, spans are computed in float32. Logsumexps and merges are float32. Its
backward accumulates ``dK``/``dV`` in the low dtype, once per block of 64 or 256 query rows and per
query head of a group; :func:`span_backward` bounds that to :data:`BWD_ROWS` rows and one head per call
and adds the calls' results in float32 (see its docstring).

The compute dtype rule (:func:`compute_dtype`) and the one safe softmax (:func:`safe_softmax`) live here,
and the attention-sink correction (:func:`sink_forward`, :func:`sink_backward`): a learned logit per head
that joins the softmax denominator, applied to a finished ``(out, lse)`` with no extra key materialised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLASH",
    "FLASH_BWD",
    "CAST_S",
    "FUSED_CALL_S",
    "FUSED_CAUSAL_SHARE",
    "FUSED_FLOPS",
    "HALF",
    "compute_dtype",
    "fused_ok",
    "half_speed",
    "merge",
    "merge_into",
    "safe_softmax",
    "sink_backward",
    "sink_forward",
    "span_backward",
    "span_forward",
]


def _op(name: str) -> Callable[..., Any] | None:
    try:
        return getattr(torch.ops.aten, name)  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the installed torch
        return None


FLASH = _op("_scaled_dot_product_flash_attention_for_cpu")
"""``(q, k, v, dropout_p, is_causal, *, attn_mask, scale) -> (out, lse)`` on the CPU, or ``None``."""
FLASH_BWD = _op("_scaled_dot_product_flash_attention_for_cpu_backward")
"""``(dout, q, k, v, out, lse, dropout_p, is_causal, *, attn_mask, scale) -> (dq, dk, dv)``, or ``None``."""


#: measured constants of the CPU flash kernel (``python benchmarks/auto_regret.py`` checks the cost
#: model built on them); ``sdpa`` on the CPU runs the same kernel
FUSED_FLOPS = 150e9
"""Floating-point operations per second on unmasked work (2 cores, fp32)."""
FUSED_CAUSAL_SHARE = 0.55
"""The share of a dense call's time that a square ``is_causal`` call takes (it skips in 64-row steps)."""
FUSED_CALL_S = 20e-6
"""Fixed seconds per call (dispatch, slicing, allocation)."""
CAST_S = 1e-9
"""Seconds per element cast between half precision and float32."""


HALF = (torch.float16, torch.bfloat16)
"""The half-precision dtypes."""

BWD_ROWS = 1024
"""Query rows per call of the fused backward in half precision (see :func:`span_backward`)."""
BAND_BWD_BYTES = 16 << 20
"""Bytes of the kernel's per-tile ``dK`` of one call of :func:`band_backward` (its tiles are grouped)."""

HALF_MIN_SPEED = 0.75
"""Half-precision inputs go to the fused kernel as they are unless it runs slower than this fraction of
its float32 speed (then spans are computed in float32): clearly slower, not within the noise of a
machine where the two run alike."""

_HALF_SPEED: dict[tuple[torch.dtype, bool], float] = {}


def _measure_half_speed(dtype: torch.dtype) -> tuple[float, float]:
    """``(forward, backward)`` speed of the fused kernel in ``dtype`` relative to float32: the float32
    time over the ``dtype`` time, best of 5 interleaved runs on ``(1, 2, 512, 64)`` (tens of ms)."""
    assert FLASH is not None and FLASH_BWD is not None
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, 512, 64, generator=g) for _ in range(4)]
    best = {(dt, bwd): float("inf") for dt in (torch.float32, dtype) for bwd in (False, True)}
    for _ in range(5):
        for dt in (torch.float32, dtype):
            q, k, v, do = (t.to(dt) for t in base)
            t0 = time.perf_counter()
            out, lse = FLASH(q, k, v, 0.0, False, scale=0.125)
            t1 = time.perf_counter()
            FLASH_BWD(do, q, k, v, out, lse, 0.0, False, scale=0.125)
            t2 = time.perf_counter()
            best[dt, False] = min(best[dt, False], t1 - t0)
            best[dt, True] = min(best[dt, True], t2 - t1)
    return tuple(best[torch.float32, b] / max(best[dtype, b], 1e-9) for b in (False, True))  # type: ignore[return-value]


def half_speed(dtype: torch.dtype, backward: bool = False) -> float:
    """How many times faster the fused CPU kernel runs in ``dtype`` (float16 or bfloat16) than in
    float32 on this machine, forward or ``backward``: measured the first time it is asked (tens of ms),
    then cached for the process. Machines differ: an Intel Xeon with AMX runs bf16 matmuls ~3.7x faster
    than fp32; an AMD EPYC without AMX gains little, and its float16 backward is several times slower."""
    if FLASH is None or FLASH_BWD is None or dtype not in HALF:
        return 1.0
    if (dtype, backward) not in _HALF_SPEED:
        fwd, bwd = _measure_half_speed(dtype)
        _HALF_SPEED[dtype, False], _HALF_SPEED[dtype, True] = fwd, bwd
    return _HALF_SPEED[dtype, backward]


def compute_dtype(dtype: torch.dtype, fused: bool = False, backward: bool = False) -> torch.dtype:
    """The dtype spans are computed in: float64 stays float64; float16/bfloat16 stay as they are on the
    ``fused`` CPU kernel unless it runs clearly slower in them than in float32 on this machine
    (:func:`half_speed` below :data:`HALF_MIN_SPEED`, for the forward, and for the ``backward`` too
    when asked about it); everything else is float32."""
    if dtype == torch.float64:
        return torch.float64
    if (
        fused
        and dtype in HALF
        and half_speed(dtype) >= HALF_MIN_SPEED
        and (not backward or half_speed(dtype, True) >= HALF_MIN_SPEED)
    ):
        return dtype
    return torch.float32


def fused_ok(t: Tensor) -> bool:
    """Whether the fused CPU flash kernel (forward and backward) serves tensors like ``t``."""
    return (
        FLASH is not None
        and FLASH_BWD is not None
        and t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.float64, *HALF)
    )


def safe_softmax(s: Tensor) -> Tensor:
    """Softmax over the last dim where a row of only ``-inf`` gives zeros (and zero gradient)."""
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------
# merging results over disjoint key sets


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
        Differentiable with respect to ``out1`` and ``out2``.
    """
    if out1.shape != out2.shape or lse1.shape != lse2.shape or out1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"merge: out1 {tuple(out1.shape)}, lse1 {tuple(lse1.shape)}, out2 {tuple(out2.shape)} and"
            f" lse2 {tuple(lse2.shape)} must be (..., L, Dv), (..., L), (..., L, Dv), (..., L)"
        )
    m = _finite_or_zero(torch.maximum(lse1, lse2).detach())
    e1, e2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # exp(-inf) = 0 for a key set a row did not see
    tot = e1 + e2
    dead = tot == 0
    tot = torch.where(dead, torch.ones_like(tot), tot)
    lse = torch.where(dead, torch.full_like(tot, float("-inf")), m + torch.log(tot))
    out = (out1 * e1.unsqueeze(-1) + out2 * e2.unsqueeze(-1)) / tot.unsqueeze(-1)
    return out, lse


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """``acc ⊕= (out, lse)`` in place (no autograd): :func:`merge` for accumulators, as ring attention
    and the tiled loop keep them."""
    m = _finite_or_zero(torch.maximum(acc_lse, lse))
    wa, wb = torch.exp(acc_lse - m), torch.exp(lse - m)
    tot = wa + wb
    safe = torch.where(tot == 0, torch.ones_like(tot), tot)
    acc_out.mul_((wa / safe).unsqueeze(-1)).add_(out * (wb / safe).unsqueeze(-1))
    acc_lse.copy_(torch.where(tot == 0, torch.full_like(tot, float("-inf")), m + torch.log(safe)))


# ------------------------------------------------------------------------------------------------
# one span


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _pad_dv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused kernel wants one head dim: zero-pad the shorter of ``D`` and ``Dv`` (changes nothing)."""
    D, Dv = q.shape[-1], v.shape[-1]
    if Dv < D:
        v = F.pad(v, (0, D - Dv))
    elif D < Dv:
        q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
    return q, k, v


def scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``q kᵀ · scale`` ``(B, H, m, n)`` with grouped-query heads sharing K (no copy of K: the query rows
    of a group are stacked, ``(B, Hkv, G·m, D) @ Kᵀ``)."""
    B, H, m, D = q.shape
    Hkv = k.shape[1]
    s = q.reshape(B, Hkv, H // Hkv * m, D) @ k.transpose(-1, -2)
    return s.reshape(B, H, m, k.shape[2]) * scale


def weighted_values(p: Tensor, v: Tensor) -> Tensor:
    """``p v`` ``(B, H, m, Dv)`` for weights ``p (B, H, m, n)`` and grouped-query values ``v (B, Hkv, n, Dv)``."""
    B, H, m, n = p.shape
    Hkv = v.shape[1]
    return (p.reshape(B, Hkv, H // Hkv * m, n) @ v).reshape(B, H, m, v.shape[-1])


def span_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    mask: Tensor | None = None,
    causal: bool = False,
    mod: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q (B, H, m, D)`` over one span ``k (B, Hkv, n, D)``, ``v (B, Hkv, n, Dv)``.

    Args:
        scale: multiplies ``q kᵀ``.
        mask: ``None`` or a bool tensor broadcastable to ``(B, H, m, n)`` (True = may attend), in the
            span's own coordinates.
        causal: a top-left triangle within the span (query ``i`` sees keys ``j <= i``).
        mod: changes the span's scores ``(B, H, m, n)`` before the softmax (forces the eager engine).

    Returns:
        ``out (B, H, m, Dv)`` in the dtype of the inputs (call with :func:`compute_dtype` tensors) and
        ``lse (B, H, m)`` in that dtype, or float32 for float16/bfloat16 inputs; rows that see nothing
        get zeros and ``lse = -inf``. The fused
        engine runs without autograd (wrap it in an ``autograd.Function`` with :func:`span_backward`);
        the eager engine is differentiable.
    """
    if mod is None and fused_ok(q):
        assert FLASH is not None
        Dv = v.shape[-1]
        qp, kp, vp = _pad_dv(q, k, v)
        add = None if mask is None else _additive(mask, q.dtype)
        out, lse = FLASH(qp, kp, vp, 0.0, causal, attn_mask=add, scale=scale)
        if mask is not None:
            lse = lse.masked_fill(~mask.any(dim=-1), float("-inf"))
        return out[..., :Dv], lse
    s = scores(q, k, scale)
    if mod is not None:
        s = mod(s)
    if causal:
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = _finite_or_zero(s.detach().amax(dim=-1, keepdim=True))
    p = torch.exp(s - m)
    tot = p.sum(dim=-1)
    dead = tot == 0  # a row that sees no key of this span: lse = -inf, output 0, zero gradient
    safe = torch.where(dead, torch.ones_like(tot), tot)
    lse = torch.where(dead, torch.full_like(tot, float("-inf")), m.squeeze(-1) + torch.log(safe))
    return weighted_values(p, v) / safe.unsqueeze(-1), lse


def span_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    mask: Tensor | None = None,
    causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of one span, given the FINAL output ``out (B, H, m, Dv)`` of these
    queries over all their spans, its gradient ``dout`` and the final logsumexp ``lse (B, H, m)``.

    The FlashAttention-2 backward: ``P = exp(S - lse)``, ``dV = Pᵀ dO``, ``dS = P (dO Vᵀ - rowsum(dO O))``.
    Summing the results of every span a query visits gives the exact gradient. ``dk``, ``dv`` are
    ``(B, Hkv, n, ·)``: grouped-query heads are reduced. Rows with ``lse = -inf`` get zero gradient.

    float16/bfloat16 inputs (fused kernel): PyTorch's CPU kernel adds each block of 32, 64 or (from
    768 rows on) 256 query rows of every query head into ``dK``/``dV`` in the low dtype, rounding each
    time: ``G · m / 256`` roundings with ``G`` query heads per key head (``G · m / 64`` below 768 rows),
    which breaks the half-precision tolerance rule (2x the error of the formula computed in bf16) with
    grouped heads at any length and without them from a few thousand rows on. Here each call sees at
    most :data:`BWD_ROWS` rows (4 roundings) and one query head per key head (K/V repeated over the
    group), and the calls' results are added, and the group reduced, in float32: gradients in float32
    where more than one call or head was summed, else as the kernel gives them (callers accumulate in
    float32)."""
    lse = _finite_or_zero(lse)
    if fused_ok(q):
        if q.dtype in HALF:
            return _half_backward(dout, q, k, v, out, lse, scale, mask, causal)
        return _fused_backward(dout, q, k, v, out, lse, scale, mask, causal)
    B, H, m, _ = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    s = scores(q, k, scale)
    if causal:
        tri = torch.ones(m, k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))  # (B, H, m, n)
    delta = (dout * out).sum(-1, keepdim=True)
    rows = (B, Hkv, G * m)  # a group's query rows stacked: the sums over its heads are one matmul
    dv = p.reshape(*rows, -1).transpose(-1, -2) @ dout.reshape(*rows, -1)
    dp = weighted_values(dout, v.transpose(-1, -2))  # dO Vᵀ: (B, H, m, n)
    ds = p * (dp - delta) * scale
    dq = weighted_values(ds, k)
    dk = ds.reshape(*rows, -1).transpose(-1, -2) @ q.reshape(*rows, -1)
    return dq, dk, dv


def _fused_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    mask: Tensor | None,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One call of the fused backward (gradients in the inputs' dtype)."""
    assert FLASH_BWD is not None
    D, Dv = q.shape[-1], v.shape[-1]
    qp, kp, vp = _pad_dv(q, k, v)
    if D < Dv or Dv < D:
        width = qp.shape[-1]
        dop, op = F.pad(dout, (0, width - Dv)), F.pad(out, (0, width - Dv))
    else:
        dop, op = dout, out
    add = None if mask is None else _additive(mask, q.dtype)
    # slices of longer rows are fine as they are: the kernel reads by strides (and copies dout itself)
    dq, dk, dv = FLASH_BWD(dop, qp, kp, vp, op, lse, 0.0, causal, attn_mask=add, scale=scale)
    return dq[..., :D], dk[..., :D], dv[..., :Dv]


def _half_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    mask: Tensor | None,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`span_backward` in float16/bfloat16 on the fused kernel (see there)."""
    B, H, m, _ = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = H // Hkv
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    # rows [a, b) see all keys; under the top-left causal flag, keys [0, a) whole and [a, b) as a triangle
    calls: list[tuple[int, int, int, int, bool]] = []
    for a in range(0, m, BWD_ROWS):
        b = min(a + BWD_ROWS, m)
        parts = [(0, min(a, n), False), (a, min(b, n), True)] if causal else [(0, n, False)]
        calls += [(a, b, k0, k1, tri) for k0, k1, tri in parts if k1 > k0]

    def call(a: int, b: int, k0: int, k1: int, tri: bool) -> tuple[Tensor, Tensor, Tensor]:
        mk = None
        if mask is not None:
            mk = mask if mask.shape[-2] == 1 else mask[..., a:b, :]
            mk = mk if mk.shape[-1] == 1 else mk[..., k0:k1]
        rows = slice(a, b)
        return _fused_backward(
            dout[:, :, rows],
            q[:, :, rows],
            k[:, :, k0:k1],
            v[:, :, k0:k1],
            out[:, :, rows],
            lse[:, :, rows],
            scale,
            mk,
            tri,
        )

    f32 = torch.float32
    if len(calls) == 1 and calls[0][2:4] == (0, n):
        dq, dk, dv = call(*calls[0])
    elif not calls:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    else:
        dk = torch.zeros(k.shape, dtype=f32, device=q.device)
        dv = torch.zeros(v.shape, dtype=f32, device=q.device)
        dqs: dict[int, Tensor] = {}
        for a, b, k0, k1, tri in calls:
            gq, gk, gv = call(a, b, k0, k1, tri)
            dqs[a] = gq.float() if a not in dqs else dqs[a] + gq
            dk[:, :, k0:k1] += gk
            dv[:, :, k0:k1] += gv
        row_starts = range(0, m, BWD_ROWS)
        dq = torch.cat(
            [dqs[a] if a in dqs else q.new_zeros(B, H, min(BWD_ROWS, m - a), q.shape[-1]) for a in row_starts], 2
        )
    if G > 1:
        dk = dk.view(B, Hkv, G, n, -1).sum(2, dtype=f32)
        dv = dv.view(B, Hkv, G, n, -1).sum(2, dtype=f32)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# a band of a causal sliding window in one call


def _band_mask(rows: int, span: int, lo: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive ``(rows, span)``: 0 where ``r + lo <= c <= r + span - rows``, else ``-inf``."""
    r = torch.arange(rows, device=device).view(-1, 1)
    c = torch.arange(span, device=device).view(1, -1)
    ok = (c >= r + lo) & (c <= r + span - rows)
    return torch.zeros(rows, span, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))


def _band_views(x: Tensor, start: int, tiles: int, rows: int, length: int) -> Tensor:
    """``x (B, h, L, d)`` (contiguous) as ``(tiles, B*h, length, d)``: entry ``i`` is rows
    ``[start + i*rows, start + i*rows + length)`` of every head (overlapping when ``length > rows``)."""
    B, h, L, d = x.shape
    return x.as_strided((tiles, B * h, length, d), (rows * d, L * d, d, 1), x.storage_offset() + start * d)


def _band_lse(lse: Tensor, start: int, tiles: int, rows: int) -> Tensor:
    B, H, L = lse.shape
    return lse.as_strided((tiles, B * H, rows), (rows, L, 1), lse.storage_offset() + start)


def _unband(x: Tensor, B: int, H: int) -> Tensor:
    """``(tiles, B*H, rows, ...)`` back to ``(B, H, tiles*rows, ...)``."""
    n, _, rows = x.shape[:3]
    x = x.reshape(n, B, H, rows, *x.shape[3:]).movedim(0, 2)
    return x.reshape(B, H, n * rows, *x.shape[4:])


def band_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    q0: int,
    q1: int,
    rows: int,
    window: int,
    reach: int,
    offset: int,
    into: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Queries ``[q0, q1)`` of ``q (B, H, Lq, D)`` under a causal sliding ``window`` (query at position
    ``p = i + offset`` sees keys ``p - window <= j <= p``) in one call of the fused CPU kernel: the rows in
    tiles of ``rows`` as batch entries, each over the ``reach + rows`` keys ending at its last position
    (``reach >= window``, a multiple of ``rows``; ``q0 + offset >= reach``), with one shared additive mask.
    See :class:`~qkv.backends.plan.Band`.

    Returns:
        ``out (B, H, q1 - q0, Dv)`` in the inputs' dtype and ``lse (B, H, q1 - q0)`` (float32 for half
        precision), written into rows ``[q0, q1)`` of ``into = (out, lse)`` (whole-length, contiguous)
        when given (and then views of them returned)."""
    assert FLASH is not None
    B, H = q.shape[:2]
    Dv = v.shape[-1]
    n, span = (q1 - q0) // rows, reach + rows
    qp, kp, vp = (t.contiguous() for t in _pad_dv(q, k, v))
    qb = _band_views(qp, q0, n, rows, rows)
    kb, vb = (_band_views(t, q0 + offset - reach, n, rows, span) for t in (kp, vp))
    add = _band_mask(rows, span, reach - window, q.dtype, q.device)
    out, lse = FLASH(qb, kb, vb, 0.0, False, attn_mask=add, scale=scale)
    if into is None:
        return _unband(out, B, H)[..., :Dv], _unband(lse, B, H)
    o_all, l_all = into
    o_dst, l_dst = o_all[:, :, q0:q1], l_all[:, :, q0:q1]
    o_dst.view(B, H, n, rows, Dv).copy_(out[..., :Dv].reshape(n, B, H, rows, Dv).movedim(0, 2))
    l_dst.view(B, H, n, rows).copy_(lse.reshape(n, B, H, rows).movedim(0, 2))
    return o_dst, l_dst


def band_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    q0: int,
    q1: int,
    rows: int,
    window: int,
    reach: int,
    offset: int,
    grads: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Gradients of :func:`band_forward`'s queries, given the whole ``dout``, ``out (B, H, Lq, Dv)`` and
    ``lse (B, H, Lq)`` (final: these rows see no other keys), added into ``grads = (dq, dk, dv)``, shaped
    like ``q``, ``k``, ``v`` and in float32 for half precision (else in their dtype).

    The kernel's ``dK``/``dV`` hold every tile's whole span (``span / rows`` times the size of K), so the
    tiles go in groups of at most :data:`BAND_BWD_BYTES` of them per call; each key's shares from the
    tiles whose spans overlap it are added in float32 (grouped heads: K/V repeated per query head and
    the group reduced in float32, as :func:`span_backward` does)."""
    assert FLASH_BWD is not None
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    G = H // Hkv
    D, Dv = q.shape[-1], v.shape[-1]
    n, span = (q1 - q0) // rows, reach + rows
    half = q.dtype in HALF
    if half and G > 1:  # one head per key head, so the kernel adds no group into a low-precision row
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    qp, kp, vp = (t.contiguous() for t in _pad_dv(q, k, v))
    width = qp.shape[-1]
    dop, op = (F.pad(t, (0, width - Dv)) if width != Dv else t for t in (dout, out))
    dop, op, lse = dop.contiguous(), op.contiguous(), _finite_or_zero(lse).contiguous()
    k0 = q0 + offset - reach
    add = _band_mask(rows, span, reach - window, q.dtype, q.device)
    hk = kp.shape[1]
    m = reach // rows
    keys = slice(k0, k0 + (n + m) * rows)
    dq_acc, dk_acc, dv_acc = grads
    # fold targets (B * hk, n + m, rows, width): views of dk, dv where their layout allows, else buffers
    inplace = [hk == Hkv and width == d and dst.is_contiguous() for dst, d in ((dk_acc, D), (dv_acc, Dv))]
    accs = [
        dst[:, :, keys].view(B * hk, n + m, rows, width)
        if ok
        else torch.zeros(B * hk, n + m, rows, width, dtype=dst.dtype, device=q.device)
        for dst, ok in zip((dk_acc, dv_acc), inplace)
    ]
    group = max(1, BAND_BWD_BYTES // (B * hk * span * width * q.element_size()))
    for i0 in range(0, n, group):
        g = min(group, n - i0)
        a = q0 + i0 * rows
        dqb, dkb, dvb = FLASH_BWD(
            _band_views(dop, a, g, rows, rows),
            _band_views(qp, a, g, rows, rows),
            _band_views(kp, k0 + i0 * rows, g, rows, span),
            _band_views(vp, k0 + i0 * rows, g, rows, span),
            _band_views(op, a, g, rows, rows),
            _band_lse(lse, a, g, rows),
            0.0,
            False,
            attn_mask=add,
            scale=scale,
        )
        dq_acc[:, :, a : a + g * rows] += _unband(dqb, B, H)[..., :D]
        for acc, gk in zip(accs, (dkb, dvb)):  # tile i's key block c is block i + c of the run from k0
            gk = gk.reshape(g, B * hk, m + 1, rows, width)
            for c in range(m + 1):
                acc[:, i0 + c : i0 + c + g] += gk[:, :, c].transpose(0, 1)
    for dst, acc, d, ok in zip((dk_acc, dv_acc), accs, (D, Dv), inplace):
        if ok:
            continue
        acc = acc.view(B, hk, (n + m) * rows, width)
        if hk != Hkv:
            acc = acc.view(B, Hkv, G, (n + m) * rows, width).sum(2)
        dst[:, :, keys] += acc[..., :d]


# ------------------------------------------------------------------------------------------------
# attention sinks: one logit per query head in the softmax denominator (gpt-oss)


def sink_forward(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Add a sink to a finished result: the softmax over ``[scores, s_h]`` with the sink's column dropped.

    The sink is a key with logit ``s_h`` and a zero value vector, so it only enlarges the denominator:
    ``lse' = logaddexp(lse, s_h)`` and ``out' = out * exp(lse - lse')``.

    Args:
        out: ``(B, H, L, Dv)`` attention output over all the keys (rows that saw no key: zeros).
        lse: ``(B, H, L)`` its row logsumexp (``-inf`` for rows that saw no key).
        sinks: ``(H,)`` one logit per query head, in the dtype of ``lse`` (``-inf``: no sink).

    Returns:
        ``(out', lse')``, ``out'`` in the dtype of ``out`` (for float16/bfloat16 the correction is computed
        in the float32 of ``lse`` and rounded once), ``lse'`` in that of ``lse``. A row that saw no key gets ``out' = 0`` and ``lse' = s_h`` (its whole weight
        is on the sink); with ``s_h = -inf`` as well, ``lse' = -inf``. Differentiable in ``out``,
        ``lse`` and ``sinks`` (the eager engine uses autograd); the fused engine calls it without
        autograd and takes its gradients from :func:`span_backward` and :func:`sink_backward`.
    """
    if sinks.shape != (out.shape[1],) or lse.shape != out.shape[:-1]:
        raise ValueError(
            f"sink_forward: out {tuple(out.shape)}, lse {tuple(lse.shape)} and sinks {tuple(sinks.shape)} must be"
            " (B, H, L, Dv), (B, H, L) and (H,)"
        )
    s = sinks.view(1, -1, 1)
    m = _finite_or_zero(torch.maximum(lse, s).detach())
    e_out, e_sink = torch.exp(lse - m), torch.exp(s - m)
    tot = e_out + e_sink
    dead = tot == 0
    safe = torch.where(dead, torch.ones_like(tot), tot)
    new_lse = torch.where(dead, torch.full_like(tot, float("-inf")), m + torch.log(safe))
    return (out * (e_out / safe).unsqueeze(-1)).to(out.dtype), new_lse


def sink_backward(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Gradient ``(H,)`` of the sink logits, given the FINAL output ``out (B, H, L, Dv)`` (after
    :func:`sink_forward`), its gradient ``dout`` and the final logsumexp ``lse (B, H, L)``.

    The sink is one more column of the softmax with a zero value, so ``dP_sink = 0`` and
    ``dS_sink = P_sink (0 - rowsum(dO * O))``: ``ds_h = -sum over batch and rows of
    exp(s_h - lse') * rowsum(dO' * O')``. The keys' gradients are :func:`span_backward`'s, given the
    same final ``out`` and ``lse``. ``rowsum(dO' * O')`` is taken in the dtype of ``lse`` (float32 for
    float16/bfloat16 ``out``, as flash-attn's backward does); the gradient comes in that of ``sinks``."""
    s = sinks.view(1, -1, 1)
    p = torch.where(torch.isfinite(lse), torch.exp(s - _finite_or_zero(lse)), torch.zeros_like(lse))
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    return -(p * delta).sum(dim=(0, 2))

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

The compute dtype rule (:func:`compute_dtype`) and the one safe softmax (:func:`safe_softmax`) live here,
and the attention-sink correction (:func:`sink_forward`, :func:`sink_backward`): a learned logit per head
that joins the softmax denominator, applied to a finished ``(out, lse)`` with no extra key materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLASH",
    "FLASH_BWD",
    "FUSED_CALL_S",
    "FUSED_CAUSAL_SHARE",
    "FUSED_FLOPS",
    "compute_dtype",
    "fused_ok",
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype spans are computed in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_ok(t: Tensor) -> bool:
    """Whether the fused CPU flash kernel (forward and backward) serves tensors like ``t``."""
    return (
        FLASH is not None
        and FLASH_BWD is not None
        and t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.float64)
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
        ``out (B, H, m, Dv)`` and ``lse (B, H, m)`` in the compute dtype of the inputs (call with
        :func:`compute_dtype` tensors); rows that see nothing get zeros and ``lse = -inf``. The fused
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
        return out[..., :Dv], lse.to(q.dtype)
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
    ``(B, Hkv, n, ·)``: grouped-query heads are reduced. Rows with ``lse = -inf`` get zero gradient."""
    lse = _finite_or_zero(lse)
    if fused_ok(q):
        assert FLASH_BWD is not None
        D, Dv = q.shape[-1], v.shape[-1]
        qp, kp, vp = _pad_dv(q, k, v)
        if D < Dv or Dv < D:
            width = qp.shape[-1]
            dop, op = F.pad(dout, (0, width - Dv)), F.pad(out, (0, width - Dv))
        else:
            dop, op = dout, out
        add = None if mask is None else _additive(mask, q.dtype)
        dq, dk, dv = FLASH_BWD(
            dop.contiguous(), qp, kp, vp, op.contiguous(), lse.contiguous(), 0.0, causal, attn_mask=add, scale=scale
        )
        return dq[..., :D], dk[..., :D], dv[..., :Dv]
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


# ------------------------------------------------------------------------------------------------
# attention sinks: one logit per query head in the softmax denominator (gpt-oss)


def sink_forward(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Add a sink to a finished result: the softmax over ``[scores, s_h]`` with the sink's column dropped.

    The sink is a key with logit ``s_h`` and a zero value vector, so it only enlarges the denominator:
    ``lse' = logaddexp(lse, s_h)`` and ``out' = out * exp(lse - lse')``.

    Args:
        out: ``(B, H, L, Dv)`` attention output over all the keys (rows that saw no key: zeros).
        lse: ``(B, H, L)`` its row logsumexp (``-inf`` for rows that saw no key).
        sinks: ``(H,)`` one logit per query head, in the dtype of ``out`` (``-inf``: no sink).

    Returns:
        ``(out', lse')``. A row that saw no key gets ``out' = 0`` and ``lse' = s_h`` (its whole weight
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
    return out * (e_out / safe).unsqueeze(-1), new_lse


def sink_backward(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Gradient ``(H,)`` of the sink logits, given the FINAL output ``out (B, H, L, Dv)`` (after
    :func:`sink_forward`), its gradient ``dout`` and the final logsumexp ``lse (B, H, L)``.

    The sink is one more column of the softmax with a zero value, so ``dP_sink = 0`` and
    ``dS_sink = P_sink (0 - rowsum(dO * O))``: ``ds_h = -sum over batch and rows of
    exp(s_h - lse') * rowsum(dO' * O')``. The keys' gradients are :func:`span_backward`'s, given the
    same final ``out`` and ``lse``."""
    s = sinks.view(1, -1, 1)
    p = torch.where(torch.isfinite(lse), torch.exp(s - _finite_or_zero(lse)), torch.zeros_like(lse))
    delta = (dout * out).sum(-1)
    return -(p * delta).sum(dim=(0, 2))

"""``sdpa``: hands the request to ``torch.nn.functional.scaled_dot_product_attention``.

What maps onto SDPA: any mask (as ``is_causal`` for square causal attention, otherwise a dense
bool mask), additive score mods (ALiBi, relative bias, ``bias``) as a float mask, grouped-query
attention (``enable_gqa``), dropout. What it repairs: rows that may attend to nothing give zeros and
zero gradient on every torch release (older ones gave NaN); half-precision training on the CPU, whose
gradients PyTorch's kernel accumulates in the low dtype, is computed in float32 (:func:`upcasts`).
What it declines: non-additive score mods (softcap, custom functions) and ``return_weights``.

Attention sinks (one logit ``s_h`` per query head in the softmax denominator) become one more key in
front of the others, with a zero value vector, whose score is ``s_h`` for every query of head ``h``. A
score that depends on the head and not on the query cannot come from a shared key by a dot product
alone, so the head dim is padded by ``P`` channels (``G = H / Hkv`` rounded up to 8, which keeps PyTorch's
fused kernel on its fast path): query head ``h`` carries a one-hot of ``h % G`` there and the sink key of
key head ``c`` carries ``s_(c G + g) / scale``. Gradients reach ``s`` through the key (every fused
kernel differentiates ``k``; a float ``attn_mask`` that needs a gradient would drop PyTorch to its
``O(Lq Lk)`` math path). Masks gain an always-allowed column for the sink; square causal attention gets
a dummy query row in front so that ``is_causal`` still applies (query ``i + 1`` sees the sink and keys
``0 .. i``). A row that may see no key then puts its weight on the sink and gives 0, with no repair.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Backend, Request, tracing
from .kernels import CAST_S, FUSED_CALL_S, FUSED_CAUSAL_SHARE, FUSED_FLOPS, HALF, compute_dtype, half_speed
from .registry import register

HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def is_square_causal(req: Request) -> bool:
    """True when the mask is exactly ``causal()`` on a square problem (SDPA's ``is_causal``)."""
    return req.mask is not None and req.mask.is_causal and req.Lq == req.Lk


def _available_memory(device: Any) -> int:
    """Bytes free for new tensors on ``device`` (CUDA: the allocator's view; else MemAvailable)."""
    if getattr(device, "type", "cpu") == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - a device without the query
            pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 1 << 34


def upcasts(req: Request) -> bool:
    """Whether ``sdpa`` computes ``req`` in float32: half-precision training on the CPU.

    PyTorch's CPU flash backward adds each block of 64 (from 768 rows on, 256) query rows of every query
    head into ``dK``/``dV`` in bfloat16/float16, rounding each time; with ``G`` query heads per key head
    (``enable_gqa``) the ``G`` heads add into the same low-precision rows. Measured against the formula
    computed entirely in bf16 (the tolerance rule allows 2x its error): ``dV`` 2.7-3.6x with ``G = 4`` at
    512 tokens (B=2, H=8, D=128, causal), 4-5.8x with ``G = 4`` at 2k, and 3.9-4x without groups at 4k
    (bf16; fp16 alike). Repeating K/V per query head leaves ``dV`` at 1.5-2.2x (one seed in three over
    the rule); computing in float32 brings every gradient under 1x. ``tiled`` keeps bf16 on the same
    kernel and sums its calls in float32 (:func:`qkv.backends.kernels.span_backward`)."""
    return req.requires_grad and req.dtype in HALF and req.device.type == "cpu"


_FREE_SEEN: dict[str, int] = {"cpu": _available_memory(torch.device("cpu"))}
"""The free memory first read per device type (the CPU's at import, a GPU's at its first eager
check): what a request traced into a graph is checked against, as reading it there would be a graph
break. Written once per device type, so ``torch.compile``'s guard on it never fails."""


def _free_memory(device: Any) -> int | None:
    """Bytes free on ``device``: read now in eager calls; while tracing, :data:`_FREE_SEEN` (None
    where no eager call has read it yet: then no check)."""
    kind = getattr(device, "type", "cpu")
    if tracing():
        return _FREE_SEEN.get(kind)
    free = _available_memory(device)
    _FREE_SEEN.setdefault(kind, free)
    return free


def _dense(req: Request) -> bool:
    """Whether SDPA needs a dense ``(B, H, Lq, Lk)`` mask or bias for ``req``."""
    return not (req.score_mod is None and (req.mask is None or is_square_causal(req)))


#: measured constants of the cost model (``python benchmarks/auto_regret.py`` checks them); with no mask
#: SDPA runs the CPU flash kernel of :mod:`qkv.backends.kernels` (its rate: ``FUSED_FLOPS``)
MASKED_SLOWDOWN = 2.2
"""How much slower the fused kernel runs with an explicit mask or bias than without one."""
DENSE_PAIR_S = 1.2e-9
"""Seconds per element of the dense mask or bias built and read (per broadcast row of B*H)."""
DENSE_CALL_S = 80e-6
"""Fixed seconds to build a dense mask or bias and check it for rows that see nothing."""
SINK_SLOWDOWN = 1.2
"""How much slower a request with sinks runs (head dim padded by 8, one more key, copies of q/k/v):
1.13-1.22x measured by ``python benchmarks/sinks.py`` (L=2048, H=8, Hkv=2, D=64, fwd and fwd+bwd)."""
CHECK_MEMORY_ABOVE = 64 << 20
"""Dense masks above this many bytes are checked against the memory free on the device."""


def _sink_key(req: Request, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q (B, H, Lq, W)``, ``k (B, Hkv, 1 + Lk, W)``, ``v (B, Hkv, 1 + Lk, W)`` with the sink as key 0:
    its value is zero and its score ``q · k_sink · scale`` is ``s_h`` for every query of head ``h``."""
    assert req.sinks is not None
    B, H, Hkv, G, D, Dv = req.B, req.H, req.Hkv, req.groups, req.D, req.Dv
    P = -(-G // 8) * 8
    W = max(D + P, Dv)
    dt = q.dtype
    # -inf (no sink) must stay finite here: 0 * -inf in the other heads' channels would be NaN
    big = torch.finfo(dt).max * req.scale / 4
    sk = (req.sinks.to(compute_dtype(dt)).clamp(min=-big) / req.scale).to(dt)
    sel = torch.eye(G, W - D, dtype=dt, device=q.device).repeat(Hkv, 1)  # (H, W - D): one-hot of h % G
    q2 = torch.cat((q, sel.view(1, H, 1, W - D).expand(B, H, req.Lq, W - D)), dim=-1)
    ksink = torch.cat((sk.new_zeros(Hkv, D), F.pad(sk.view(Hkv, G), (0, W - D - G))), dim=-1)
    k2 = torch.cat((ksink.view(1, Hkv, 1, W).expand(B, Hkv, 1, W), F.pad(k, (0, W - D))), dim=2)
    v2 = torch.cat((v.new_zeros(B, Hkv, 1, W), F.pad(v, (0, W - Dv))), dim=2)
    return q2, k2, v2


def open_dead_rows(attn_mask: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor | None]:
    """The first half of the dead-row repair: let rows that may attend to nothing see every key.

    Older torch releases (and some devices) give NaN for a row whose scores are all ``-inf``, forward
    and backward; with every key open the row is finite and harmless, and :func:`zero_dead_rows` then
    sets it (and so its gradient) to zero.

    Args:
        attn_mask: the mask handed to SDPA, bool (True = may attend) or additive float,
            broadcastable to ``(B, H, Lq, Lk)``.
        allowed: bool ``(B|1, H|1, Lq, Lk)``, which pairs may meet.

    Returns:
        ``(attn_mask, live)``: the mask with the dead rows opened and ``live (B|1, H|1, Lq, 1)``, which
        rows see a key; ``live`` is None (and the mask unchanged) when every row sees one.
    """
    live = allowed.any(dim=-1, keepdim=True)
    if not tracing() and bool(live.all()):  # traced: always repair (reading `live` would be a graph break)
        return attn_mask, None
    if attn_mask.dtype == torch.bool:
        return attn_mask | ~live, live
    return attn_mask.masked_fill(~live, 0.0), live


def zero_dead_rows(out: Tensor, live: Tensor | None) -> Tensor:
    """The second half of the repair: zeros in the rows of ``out (B, H, Lq, Dv)`` where ``live`` (from
    :func:`open_dead_rows`) is False, with zero gradient; ``out`` itself when ``live`` is None."""
    return out if live is None else out.masked_fill(~live, 0.0)


class SDPA(Backend):
    name = "sdpa"
    takes_sinks = True

    def supports(self, req: Request) -> str | None:
        if req.return_weights:
            return "SDPA does not return attention weights"
        if req.score_mod is not None and not req.score_mod.additive:
            return f"score mod {req.score_mod.name} is not an additive bias, which is all SDPA takes"
        if _dense(req):
            dense = req.B * req.H * req.Lq * req.Lk * 4
            if dense > CHECK_MEMORY_ABOVE:
                free = _free_memory(req.device)
                if free is not None and dense > free // 2:
                    return (
                        f"sdpa would build a dense {req.B}x{req.H}x{req.Lq}x{req.Lk} mask/bias"
                        f" (~{dense / 2**30:.1f} GiB) against {free / 2**30:.1f} GiB free"
                    )
        return None

    def choice_state(self) -> tuple[()]:
        return ()  # a plain request: supports() and cost() read the request alone (and measured constants)

    def traceable(self, req: Request) -> str | None:
        return None  # a dense mask is built in the graph from the mask's formula and tensors

    def cost(self, req: Request) -> float:
        up = upcasts(req)
        half = req.dtype in HALF and req.device.type == "cpu" and not up
        speed = half_speed(req.dtype) if half else 1.0  # the fused kernel's rate in half precision here
        s = req.flops / (FUSED_FLOPS * speed) + FUSED_CALL_S
        if not _dense(req):
            s *= FUSED_CAUSAL_SHARE if req.mask is not None else 1.0
        else:
            rows = req.B * req.H if req.score_mod is not None else max(1, req.B)
            s = s * MASKED_SLOWDOWN + rows * req.Lq * req.Lk * DENSE_PAIR_S + DENSE_CALL_S
        if req.sinks is not None:
            s *= SINK_SLOWDOWN
        if req.requires_grad:
            s *= 3.0
        if up:  # q, k, v to float32, the output back, and the gradients back
            s += 3 * (req.q.numel() + req.k.numel() + req.v.numel()) * CAST_S
        return s

    def describe(self, req: Request) -> str:
        up = "; in float32 (half-precision training on the CPU)" if upcasts(req) else ""
        if not _dense(req):
            what = "no mask" if req.mask is None else "square causal (is_causal)"
            return f"PyTorch's fused kernel, {what}, nothing to skip{up}"
        return f"PyTorch's fused kernel with a dense mask/bias (Lq x Lk per batch row){up}"

    def run(self, req: Request, plan: Any = None) -> Tensor:
        q, k, v = req.q, req.k, req.v
        if upcasts(req):
            q, k, v = q.float(), k.float(), v.float()
        run = self._run if req.sinks is None else self._run_sinks
        out = run(req, q, k, v)
        return out if out.dtype == req.dtype else out.to(req.dtype)

    def _run(self, req: Request, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        shape = req.shape
        gqa: dict[str, Any] = {}
        if req.groups > 1:
            if HAS_GQA:
                gqa["enable_gqa"] = True
            else:  # torch < 2.5: copy K/V per query head
                k, v = k.repeat_interleave(req.groups, 1), v.repeat_interleave(req.groups, 1)
        if not _dense(req):
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=req.dropout_p, is_causal=req.mask is not None, scale=req.scale, **gqa
            )
        allowed = req.mask.to_dense(req.B, req.H, req.Lq, req.Lk, req.device) if req.mask is not None else None
        attn_mask: Tensor | None = allowed
        if req.score_mod is not None:
            bias = req.score_mod.additive_bias(shape)
            assert bias is not None
            bias = bias.to(device=q.device, dtype=q.dtype)
            if allowed is not None:
                bias = bias.masked_fill(~allowed, float("-inf"))
            allowed = ~torch.isneginf(bias)
            attn_mask = bias
        assert allowed is not None and attn_mask is not None
        attn_mask, live = open_dead_rows(attn_mask, allowed)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=req.dropout_p, scale=req.scale, **gqa
        )
        return zero_dead_rows(out, live)

    def _run_sinks(self, req: Request, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = _sink_key(req, q, k, v)
        gqa: dict[str, Any] = {}
        if req.groups > 1:
            if HAS_GQA:
                gqa["enable_gqa"] = True
            else:  # torch < 2.5: copy K/V per query head
                k, v = k.repeat_interleave(req.groups, 1), v.repeat_interleave(req.groups, 1)
        Dv, p = req.Dv, req.dropout_p
        if not _dense(req):
            if req.mask is None:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=req.scale, **gqa)[..., :Dv]
            q = torch.cat((q.new_zeros(req.B, req.H, 1, q.shape[-1]), q), dim=2)  # a dummy query: square again
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=req.scale, **gqa)
            return out[:, :, 1:, :Dv]
        attn_mask: Tensor
        if req.score_mod is not None:
            bias = req.score_mod.additive_bias(req.shape)
            assert bias is not None
            attn_mask = bias.to(device=q.device, dtype=q.dtype)
            if req.mask is not None:
                allowed = req.mask.to_dense(req.B, req.H, req.Lq, req.Lk, req.device)
                attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
            first = attn_mask.new_zeros(*attn_mask.shape[:-1], 1)
        else:
            assert req.mask is not None
            attn_mask = req.mask.to_dense(req.B, req.H, req.Lq, req.Lk, req.device)
            first = attn_mask.new_ones(*attn_mask.shape[:-1], 1)
        attn_mask = torch.cat((first, attn_mask), dim=-1)  # the sink's column: always allowed
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=req.scale, **gqa)[
            ..., :Dv
        ]


register(SDPA())

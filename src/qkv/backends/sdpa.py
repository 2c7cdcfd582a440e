"""``sdpa``: hands the request to ``torch.nn.functional.scaled_dot_product_attention``.

What maps onto SDPA: any mask (as ``is_causal`` for square causal attention, otherwise a dense
bool mask), additive score mods (ALiBi, relative bias, ``bias``) as a float mask, grouped-query
attention (``enable_gqa``), dropout. What it repairs: rows that may attend to nothing give zeros and
zero gradient on every torch release (older ones gave NaN). What it declines: non-additive score mods
(softcap, custom functions) and ``return_weights``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register
from .base import Backend, Request

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def is_square_causal(req: Request) -> bool:
    """True when the mask is exactly ``causal()`` on a square problem (SDPA's ``is_causal``)."""
    return req.mask is not None and req.mask.is_causal and req.Lq == req.Lk


class SDPA(Backend):
    name = "sdpa"

    def supports(self, req: Request) -> str | None:
        if req.return_weights:
            return "SDPA does not return attention weights"
        if req.score_mod is not None and not req.score_mod.additive:
            return f"score mod {req.score_mod.name} is not an additive bias, which is all SDPA takes"
        return None

    def run(self, req: Request) -> Tensor:
        q, k, v = req.q, req.k, req.v
        shape = req.shape
        gqa: dict[str, Any] = {}
        if req.groups > 1:
            if _HAS_GQA:
                gqa["enable_gqa"] = True
            else:  # torch < 2.5: copy K/V per query head
                k, v = k.repeat_interleave(req.groups, 1), v.repeat_interleave(req.groups, 1)
        if req.score_mod is None and (req.mask is None or is_square_causal(req)):
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
    if bool(live.all()):
        return attn_mask, None
    if attn_mask.dtype == torch.bool:
        return attn_mask | ~live, live
    return attn_mask.masked_fill(~live, 0.0), live


def zero_dead_rows(out: Tensor, live: Tensor | None) -> Tensor:
    """The second half of the repair: zeros in the rows of ``out (B, H, Lq, Dv)`` where ``live`` (from
    :func:`open_dead_rows`) is False, with zero gradient; ``out`` itself when ``live`` is None."""
    return out if live is None else out.masked_fill(~live, 0.0)


register(SDPA())

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
        live = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, Lq, 1): rows with something to see
        dead = not bool(live.all())
        if dead:  # let dead rows see everything (finite, harmless), then zero them and their gradient
            attn_mask = attn_mask | ~live if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~live, 0.0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=req.dropout_p, scale=req.scale, **gqa
        )
        return out.masked_fill(~live, 0.0) if dead else out


register(SDPA())

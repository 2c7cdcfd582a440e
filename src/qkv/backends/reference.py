"""``reference``: the formula as written, ``softmax(Q Kᵀ · scale + bias) V``; the oracle.

Builds the full ``(B, H, Lq, Lk)`` score matrix, so memory is ``O(Lq · Lk)``. Runs in float32 for
half-precision inputs and in float64 for float64 inputs; returns the weights on request.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .base import Backend, Request


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scores(req: Request, dtype: torch.dtype | None = None) -> Tensor:
    """``Q Kᵀ · scale`` with the score mod applied and masked pairs at ``-inf``: ``(B, H, Lq, Lk)``.

    Grouped-query heads share K without copying it: ``q`` is viewed as ``(B, Hkv, G·Lq, D)``, the
    query rows of a group stacked (a broadcast ``(B, Hkv, G, Lq, D) @ (B, Hkv, 1, D, Lk)`` would
    copy K ``G`` times inside ``matmul``)."""
    dt = dtype or compute_dtype(req.dtype)
    B, H, Hkv, G, Lq, Lk = req.B, req.H, req.Hkv, req.groups, req.Lq, req.Lk
    q = req.q.to(dt).reshape(B, Hkv, G * Lq, req.D)
    s = (q @ req.k.to(dt).transpose(-1, -2)).reshape(B, H, Lq, Lk) * req.scale
    shape = req.shape
    if req.score_mod is not None or req.mask is not None:
        dev = req.device
        b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, -1, 1, 1)
        qi = torch.arange(Lq, device=dev).view(1, 1, -1, 1)
        ki = torch.arange(Lk, device=dev).view(1, 1, 1, -1)
        if req.score_mod is not None:
            s = req.score_mod._apply(shape, s, b, h, qi, ki).to(dt).expand(B, H, Lq, Lk)
        if req.mask is not None:
            s = s.masked_fill(~req.mask.tile(shape, 0, Lq, 0, Lk), float("-inf"))
    return s


def softmax_rows(s: Tensor) -> Tensor:
    """Softmax over the last dim where a row of only ``-inf`` gives zeros (and zero gradient)."""
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def reference_attention(req: Request, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Output ``(B, H, Lq, Dv)`` and weights ``(B, H, Lq, Lk)``, both in the compute dtype."""
    dt = dtype or compute_dtype(req.dtype)
    w = softmax_rows(scores(req, dt))
    wd = torch.nn.functional.dropout(w, req.dropout_p) if req.dropout_p > 0 else w
    B, H, Hkv, G, Lq, Lk = req.B, req.H, req.Hkv, req.groups, req.Lq, req.Lk
    out = wd.reshape(B, Hkv, G * Lq, Lk) @ req.v.to(dt)  # (B, Hkv, G·Lq, Dv): V is not copied per head
    return out.reshape(B, H, Lq, req.Dv), w


class Reference(Backend):
    name = "reference"

    def run(self, req: Request) -> Tensor | tuple[Tensor, Tensor]:
        out, w = reference_attention(req)
        if req.return_weights:
            return out.to(req.dtype), w.to(req.dtype)
        return out.to(req.dtype)


register(Reference())

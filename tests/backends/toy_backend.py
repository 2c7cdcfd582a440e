"""A backend in one file, as someone adding one would write it: the formula in a few lines of float64.

Nothing else names it. ``tests/backend_files.py`` finds this file, the conformance suite
(``tests/backends/test_conformance.py``) holds it to the float64 oracle on every request it serves, and
``tests/apps/test_bench.py`` finds it in the rows of ``qkv bench``: each registers it for one test and
unregisters it after. It takes no sinks and says nothing about tracing, so the suite skips those requests
with that reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkv.backends import Backend, Request


class Toy(Backend):
    name = "toy"

    def cost(self, req: Request) -> float:
        return 0.01 + req.flops / 1e9  # 10 ms a call and 1 GFLOP/s: auto never prefers it to a built-in

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        B, H, Hkv, Lq, Lk = req.B, req.H, req.Hkv, req.Lq, req.Lk
        q = req.q.double().reshape(B, Hkv, req.groups * Lq, req.D)  # query heads of a group share K and V
        s = (q @ req.k.double().transpose(-1, -2)).reshape(B, H, Lq, Lk) * req.scale
        if req.score_mod is not None:
            b, h, i, j = (torch.arange(n, device=req.device) for n in (B, H, Lq, Lk))
            idx = (b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), i.view(1, 1, -1, 1), j.view(1, 1, 1, -1))
            s = req.score_mod.apply(req.shape, s, *idx).double().expand(B, H, Lq, Lk)
        if req.mask is not None:
            s = s.masked_fill(~req.mask.to_dense(B, H, Lq, Lk, req.device), float("-inf"))
        top = s.amax(-1, keepdim=True).detach()
        e = torch.exp(s - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # a row of -inf: all 0
        w = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        wd = torch.nn.functional.dropout(w, req.dropout_p) if req.dropout_p > 0 else w
        out = (wd.reshape(B, Hkv, -1, Lk) @ req.v.double()).reshape(B, H, Lq, req.Dv).to(req.dtype)
        return (out, w.to(req.dtype)) if req.return_weights else out


BACKEND = Toy()

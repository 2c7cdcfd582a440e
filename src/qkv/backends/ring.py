"""``ring`` and ``ulysses``: exact attention with the sequence split over ``torch.distributed`` ranks.

``q``, ``k``, ``v`` are each rank's LOCAL shards ``(B, H, n, D)`` of one global sequence of
``n * world`` tokens; masks speak global positions (a ``document`` mask takes the local shard's ids).
Options: ``group`` (the process group, default the global one) and ``layout`` (``"zigzag"``, the
default, balanced under causal masks, or ``"contiguous"``). Available once
``torch.distributed.init_process_group`` has run. See :mod:`qkv.distributed`.
"""

from __future__ import annotations

from torch import Tensor

from . import register
from .base import Backend, Request


class Ring(Backend):
    name = "ring"
    options = frozenset({"group", "layout"})

    def available(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def supports(self, req: Request) -> str | None:
        from ..distributed._common import LAYOUTS, unsupported_mask

        if req.return_weights:
            return f"{self.name} attention does not return attention weights"
        if req.dropout_p > 0:
            return f"{self.name} attention does not apply dropout"
        if req.score_mod is not None:
            return f"{self.name} attention takes no score mod"
        if req.Lq != req.Lk:
            return f"{self.name} attention is self-attention over local shards: q and k must hold as many tokens"
        layout = req.options.get("layout", "zigzag")
        if layout not in LAYOUTS:
            return f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}"
        if layout == "zigzag" and req.Lq % 2:
            return "layout='zigzag' needs an even local length (two chunks per rank)"
        return unsupported_mask(req.mask)

    def run(self, req: Request) -> Tensor:
        from ..distributed.ring import ring_attention

        return ring_attention(req.q, req.k, req.v, mask=req.mask, scale=req.scale, **req.options)


class Ulysses(Ring):
    name = "ulysses"

    def supports(self, req: Request) -> str | None:
        import torch.distributed as dist

        why = super().supports(req)
        world = dist.get_world_size(req.options.get("group"))
        if why is None and req.H % world:
            return f"ulysses attention needs the heads H={req.H} divisible by the group size {world}"
        return why

    def run(self, req: Request) -> Tensor:
        from ..distributed.ulysses import ulysses_attention

        return ulysses_attention(req.q, req.k, req.v, mask=req.mask, scale=req.scale, **req.options)


register(Ring())
register(Ulysses())

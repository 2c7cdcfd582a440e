"""What every backend receives (a validated :class:`Request`) and what it must provide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..masks import Mask, Shape
from ..scores import ScoreMod


@dataclass
class Request:
    """One validated call of :func:`qkv.attention`, in 4-D layout.

    ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``; ``H % Hkv == 0``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    score_mod: ScoreMod | None
    scale: float
    dropout_p: float
    return_weights: bool
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def H(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 for multi-head, ``H`` for multi-query attention)."""
        return self.H // self.Hkv

    @property
    def Lq(self) -> int:
        return self.q.shape[2]

    @property
    def Lk(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def shape(self) -> Shape:
        return Shape(self.B, self.H, self.Lq, self.Lk, self.q.device)

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


class Backend:
    """A way of computing attention. Subclasses set ``name`` and implement ``supports`` and ``run``."""

    name: str = "backend"
    #: extra keyword arguments of ``qkv.attention`` this backend understands
    options: frozenset[str] = frozenset()

    def available(self) -> bool:
        """Whether this backend can run on this machine at all (installed packages, devices)."""
        return True

    def supports(self, req: Request) -> str | None:
        """``None`` if this backend can compute ``req``; otherwise the reason it cannot."""
        return None

    def run(self, req: Request) -> Tensor | tuple[Tensor, Tensor]:
        """The output ``(B, H, Lq, Dv)`` or, with ``req.return_weights``, ``(out, weights)``."""
        raise NotImplementedError

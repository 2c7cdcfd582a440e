"""Interventions on attention heads through the modules' hook points (:mod:`qkv.nn.hooks`).

:func:`scale_heads` multiplies each head's output by a factor before the heads are merged (the head
mask ``ξ`` of Michel et al. 2019): ``ξ = 0`` ablates a head, and the gradient with respect to ``ξ`` at
``ξ = 1`` is the head's importance. :func:`attention_modules` lists the modules it addresses, in the
order of the rows of ``ξ``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ..nn.base import AttentionModule

__all__ = ["attention_modules", "scale_heads"]


def attention_modules(model: nn.Module) -> list[tuple[str, AttentionModule]]:
    """Every qkv attention module of ``model`` with its name, in module order (row ``i`` of a head mask)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]


@contextmanager
def scale_heads(model: nn.Module, xi: Tensor) -> Iterator[list[tuple[str, AttentionModule]]]:
    """Multiply head ``h`` of the ``i``-th attention module of ``model`` by ``xi[i, h]`` while inside.

    A hook on each module's ``hook_heads`` point scales its per-head output ``(B, H, Lq, Dv)`` before the
    output projection. ``xi`` may require grad (head importance) and may be changed in place between
    forward passes (ablation one head at a time).

    Args:
        model: a model with qkv attention modules.
        xi: ``(layers, H)``, one row per module of :func:`attention_modules`.

    Yields:
        The modules, as :func:`attention_modules` lists them.

    Raises:
        ValueError: ``xi`` has not one row per attention module, or a module has another number of heads
            (raised in the forward pass).
    """
    mods = attention_modules(model)
    if xi.dim() != 2 or xi.shape[0] != len(mods):
        raise ValueError(f"xi must be (layers={len(mods)}, H), one row per attention module, got {tuple(xi.shape)}")
    handles = [m.hook_heads.register_forward_hook(_scaler(xi, i)) for i, (_, m) in enumerate(mods)]
    try:
        yield mods
    finally:
        for h in handles:
            h.remove()


def _scaler(xi: Tensor, i: int) -> Any:
    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        if out.shape[1] != xi.shape[1]:
            raise ValueError(f"attention module {i} has {out.shape[1]} heads, xi has {xi.shape[1]} columns")
        return out * xi[i].to(out.dtype).view(1, -1, 1, 1)

    return hook

"""What every qkv module that calls :func:`qkv.attention` shares: a backend switch and hook points.

A module that attends subclasses :class:`AttentionModule` and calls ``self.attend(q, k, v, ...)``
instead of ``qkv.attention`` directly. Then, for any model built from such modules:

- ``qkv.nn.set_backend(model, "tiled")`` switches every attention layer's backend;
- every layer has the named hook points of :mod:`qkv.nn.hooks` (``hook_scores``, ``hook_weights``,
  ``hook_heads``, ...) where torch's forward hooks read and replace values;
- ``with qkv.nn.capture_weights(model) as maps:`` records every layer's attention weights
  ``(B, H, Lq, Lk)`` in forward order (``maps`` is a list of ``(layer_name, weights)``) through the
  ``hook_weights`` points.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import attention
from .hooks import HOOK_POINTS, HookPoint, hooked_attention

__all__ = ["AttentionModule", "BackendSwitch", "capture_weights", "set_backend"]


class AttentionModule(nn.Module):
    """Base of every qkv module that attends. ``backend`` picks the backend of ``qkv.attention``; the
    hook points ``hook_q``, ``hook_k``, ``hook_v``, ``hook_scores``, ``hook_weights`` and ``hook_heads``
    (:class:`qkv.nn.hooks.HookPoint`, see :mod:`qkv.nn.hooks`) are where analysis reads and intervenes.
    They are made once, here: register hooks on them rather than replacing them."""

    def __init__(self) -> None:
        super().__init__()
        self.backend: str = "auto"
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_scores = HookPoint()
        self.hook_weights = HookPoint()
        self.hook_heads = HookPoint()
        # the hook points' hook dicts (torch adds and removes hooks in place): the fast path's one check
        points = (self.hook_q, self.hook_k, self.hook_v, self.hook_scores, self.hook_weights, self.hook_heads)
        self._hook_dicts = tuple(d for hp in points for d in hp.hook_dicts())

    @property
    def has_hooks(self) -> bool:
        """Whether a hook is registered on any of this module's hook points."""
        return any(self._hook_dicts)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        """``qkv.attention(q, k, v, backend=self.backend, **kwargs)``: ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk,
        D)``, ``v (B, Hkv, Lk, Dv)`` -> ``(B, H, Lq, Dv)``, through the hook points when any is hooked."""
        if not any(self._hook_dicts):
            return attention(q, k, v, backend=self.backend, **kwargs)
        points = {name: self._modules[name] for name in HOOK_POINTS}
        return hooked_attention(points, self.backend, q, k, v, kwargs)  # type: ignore[arg-type]


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every :class:`AttentionModule` inside ``model``; returns ``model``."""
    from ..backends import get

    if backend != "auto":
        get(backend)  # raises ValueError listing the valid names
    for m in model.modules():
        if isinstance(m, AttentionModule):
            m.backend = backend
    return model


@contextmanager
def capture_weights(model: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """Record the attention weights of every :class:`AttentionModule` in ``model`` while inside (under
    ``torch.no_grad()``), through their ``hook_weights`` points.

    Yields a list that fills, in forward order, with ``(module_name, weights (B, H, Lq, Lk))``."""
    sink: list[tuple[str, Tensor]] = []
    handles = [
        m.hook_weights.register_forward_hook(_recorder(sink, name))
        for name, m in model.named_modules()
        if isinstance(m, AttentionModule)
    ]
    try:
        with torch.no_grad():
            yield sink
    finally:
        for h in handles:
            h.remove()


def _recorder(sink: list[tuple[str, Tensor]], name: str) -> Any:
    def hook(module: nn.Module, args: Any, w: Tensor) -> None:
        sink.append((name, w.detach()))

    return hook


class BackendSwitch:
    """Mixin for qkv models (with ``nn.Module``): ``model.set_backend("tiled")`` switches every
    attention layer inside, as :func:`set_backend` does; returns the model."""

    def set_backend(self, backend: str) -> Any:
        """Use ``backend`` (``"auto"`` or a name in ``qkv.BACKENDS``) in every attention layer."""
        if not isinstance(self, nn.Module):
            raise TypeError("BackendSwitch must be mixed into an nn.Module")
        return set_backend(self, backend)

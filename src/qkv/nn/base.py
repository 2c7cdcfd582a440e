"""What every qkv module that calls :func:`qkv.attention` shares: a backend switch and weight capture.

A module that attends subclasses :class:`AttentionModule` and calls ``self.attend(q, k, v, ...)``
instead of ``qkv.attention`` directly. Then, for any model built from such modules:

- ``qkv.nn.set_backend(model, "tiled")`` switches every attention layer's backend;
- ``with qkv.nn.capture_weights(model) as maps:`` records every layer's attention weights
  ``(B, H, Lq, Lk)`` in forward order (``maps`` is a list of ``(layer_name, weights)``), switching
  the layers to a backend that returns weights for the duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import attention

__all__ = ["AttentionModule", "BackendSwitch", "capture_weights", "set_backend"]


class AttentionModule(nn.Module):
    """Base of every qkv module that attends. ``backend`` picks the backend of ``qkv.attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.backend: str = "auto"
        #: when set (by :func:`capture_weights`), ``attend`` hands each call's weights to it
        self._weights_sink: list[tuple[str, Tensor]] | None = None
        self._capture_name: str = ""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        """``qkv.attention(q, k, v, backend=self.backend, **kwargs)``, recording weights when capturing."""
        if self._weights_sink is None:
            return attention(q, k, v, backend=self.backend, **kwargs)
        try:  # the module's own backend, if it returns weights (reference, tiled, linear, ...)
            out, w = attention(q, k, v, backend=self.backend, return_weights=True, **kwargs)
        except NotImplementedError:  # e.g. sdpa: fall back to an exact backend that returns weights
            common = {key: kwargs[key] for key in ("mask", "score_mod", "scale", "dropout_p") if key in kwargs}
            out, w = attention(q, k, v, backend="auto", return_weights=True, **common)
        self._weights_sink.append((self._capture_name, w.detach()))
        return out


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
    """Record the attention weights of every :class:`AttentionModule` in ``model`` while inside.

    Yields a list that fills, in forward order, with ``(module_name, weights (B, H, Lq, Lk))``."""
    sink: list[tuple[str, Tensor]] = []
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]
    for name, m in mods:
        m._weights_sink, m._capture_name = sink, name
    try:
        with torch.no_grad():
            yield sink
    finally:
        for _, m in mods:
            m._weights_sink = None


class BackendSwitch:
    """Mixin for qkv models (with ``nn.Module``): ``model.set_backend("tiled")`` switches every
    attention layer inside, as :func:`set_backend` does; returns the model."""

    def set_backend(self, backend: str) -> Any:
        """Use ``backend`` (``"auto"`` or a name in ``qkv.BACKENDS``) in every attention layer."""
        if not isinstance(self, nn.Module):
            raise TypeError("BackendSwitch must be mixed into an nn.Module")
        return set_backend(self, backend)

"""qkv: the attention mechanism behind one call.

    import qkv
    out = qkv.attention(q, k, v, mask=qkv.masks.causal())

``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` -> ``(B, H, Lq, Dv)``.

``qkv.nn`` (modules), ``qkv.models``, ``qkv.analysis`` and ``qkv.distributed`` are imported on first use
(PEP 562), so ``import qkv`` loads only the attention call, masks, score mods and backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import masks, patterns, scores
from .attention import Explanation, attention, explain
from .backends import available as _available

if TYPE_CHECKING:
    from . import analysis, distributed, models, nn

__version__ = "0.1.0"

BACKENDS: tuple[str, ...]  # annotated only: no global, so the module's __getattr__ answers each access
"""Names of the backends that can run on this machine now (``backend=`` accepts them and ``"auto"``), read
afresh at each access: after ``torch.distributed.init_process_group`` they include ``ring`` and
``ulysses``, after ``qkv.backends.register(...)`` the new backend. ``from qkv import BACKENDS`` copies the
tuple of that moment."""

_LAZY = ("analysis", "distributed", "models", "nn")

__all__ = [
    "BACKENDS",
    "Explanation",
    "analysis",
    "attention",
    "distributed",
    "explain",
    "masks",
    "models",
    "nn",
    "patterns",
    "scores",
]


def __getattr__(name: str) -> Any:
    """``qkv.BACKENDS``, read afresh on every access: the names of the backends that can run on this
    machine now (``qkv.backends.available()``), so it includes ``ring`` and ``ulysses`` once
    ``torch.distributed`` is initialised, and a backend registered later (``qkv.backends.register``).
    (``from qkv import BACKENDS`` copies the tuple of that moment.) And ``qkv.nn``, ``qkv.models``,
    ``qkv.analysis`` or ``qkv.distributed``, imported on first access."""
    if name == "BACKENDS":
        return _available()
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)  # also binds it as an attribute of qkv
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "BACKENDS"})

"""qkv: the attention mechanism behind one call.

    import qkv
    out = qkv.attention(q, k, v, mask=qkv.masks.causal())

``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` -> ``(B, H, Lq, Dv)``.
"""

from . import masks, patterns, scores
from .attention import Explanation, attention, explain
from .backends import available as _available

__version__ = "0.1.0"

BACKENDS: tuple[str, ...] = _available()
"""Names of the backends that can run on this machine (``backend=`` accepts them and ``"auto"``)."""

__all__ = ["BACKENDS", "Explanation", "attention", "explain", "masks", "patterns", "scores"]

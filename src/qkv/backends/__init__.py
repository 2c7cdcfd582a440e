"""Backends: who computes attention. Each registers itself here under a name."""

from __future__ import annotations

from .base import Backend, Request

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend under ``backend.name`` (a later registration replaces an earlier one)."""
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The backend registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(['auto', *_REGISTRY])}")
    return _REGISTRY[name]


def registered() -> dict[str, Backend]:
    """All registered backends, available here or not."""
    return dict(_REGISTRY)


def available() -> tuple[str, ...]:
    """Names of the backends that can run on this machine."""
    return tuple(n for n, b in _REGISTRY.items() if b.available())


from . import reference, sdpa, tiled  # noqa: E402,F401  (registration)

# isort: split
from . import linear, nystrom, performer  # noqa: E402,F401  (approximations, issue 5)

# isort: split
from . import ring  # noqa: E402,F401  (registration)

__all__ = ["Backend", "Request", "available", "get", "register", "registered"]

"""The backends known by name. Each backend module registers one instance on import; a backend from
outside the package registers the same way (``qkv.backends.register(MyBackend())``) and then takes
part in ``auto`` and :func:`qkv.explain` like the built-in ones."""

from __future__ import annotations

from .base import Backend

_REGISTRY: dict[str, Backend] = {}
_VERSION = 0
"""Bumped by every :func:`register` and :func:`unregister` (what ``auto``'s memo of its choices is keyed on)."""


def register(backend: Backend) -> Backend:
    """Add ``backend`` under ``backend.name`` (a later registration replaces an earlier one) and return it.

    The order of registration decides nothing: ``auto`` breaks cost ties by :attr:`Backend.preference`
    and then by name.

    Raises:
        TypeError: ``backend`` is not a :class:`qkv.backends.Backend` instance, its ``name`` is not a
            string, or its ``preference`` is not an int.
        ValueError: its ``name`` is empty or ``"auto"`` (the name of the policy).
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register: expected a qkv.backends.Backend instance, got {type(backend).__name__}")
    if not isinstance(backend.name, str):
        raise TypeError(f"register: a backend's name must be a string, got {type(backend.name).__name__}")
    if not backend.name or backend.name == "auto":
        raise ValueError(f"register: a backend needs a non-empty name other than 'auto', got {backend.name!r}")
    if isinstance(backend.preference, bool) or not isinstance(backend.preference, int):
        raise TypeError(f"register: {backend.name}.preference must be an int, got {backend.preference!r}")
    global _VERSION
    _REGISTRY[backend.name] = backend
    _VERSION += 1
    return backend


def unregister(name: str) -> None:
    """Remove the backend registered as ``name`` (no error if there is none)."""
    global _VERSION
    _REGISTRY.pop(name, None)
    _VERSION += 1


def version() -> int:
    """A number that changes with every :func:`register` and :func:`unregister`: the registry as ``auto``
    last saw it (its memo of choices is keyed on it)."""
    return _VERSION


def get(name: str) -> Backend:
    """The backend registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(['auto', *_REGISTRY])}")
    return _REGISTRY[name]


def lookup(name: str) -> Backend | None:
    """The backend registered as ``name``, or ``None`` (no error: for callers that check names later)."""
    return _REGISTRY.get(name)


def registered() -> dict[str, Backend]:
    """All registered backends by name, available here or not (in registration order, which decides
    nothing: read their flags)."""
    return dict(_REGISTRY)


def available() -> tuple[str, ...]:
    """Names of the backends that can run on this machine now (asked each call: ``ring`` and ``ulysses``
    become available once ``torch.distributed`` is initialised)."""
    return tuple(n for n, b in _REGISTRY.items() if b.available())

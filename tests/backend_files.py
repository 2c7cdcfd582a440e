"""Backends that tests add, one file each: every ``tests/backends/*_backend.py`` defines ``BACKEND``, an
instance of a :class:`qkv.backends.Backend` subclass, and does not register it. The conformance suite
(``tests/backends/test_conformance.py``) runs every one of them next to the registered backends, and
``tests/apps/test_bench.py`` checks that ``qkv bench`` times it, each registering it only for the length
of a test (:func:`registered`). Adding a file here is the only edit a new backend needs to be tested."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from qkv import backends
from qkv.backends import Backend

FOLDER = Path(__file__).parent / "backends"


def extra() -> dict[str, Backend]:
    """The backends of ``tests/backends/*_backend.py`` by name (imported, not registered)."""
    found: dict[str, Backend] = {}
    for path in sorted(FOLDER.glob("*_backend.py")):
        spec = importlib.util.spec_from_file_location(f"qkv_test_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        backend = module.BACKEND
        assert isinstance(backend, Backend), f"{path.name}: BACKEND must be a qkv.backends.Backend instance"
        assert backend.name not in backends.registered(), f"{path.name}: {backend.name!r} is already registered"
        found[backend.name] = backend
    return found


@contextlib.contextmanager
def registered(backend: Backend) -> Iterator[str]:
    """``backend`` registered inside the block (its name yielded), unregistered after."""
    backends.register(backend)
    try:
        yield backend.name
    finally:
        backends.unregister(backend.name)

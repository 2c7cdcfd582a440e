"""Backends: who computes attention.

Each backend is one module that defines a :class:`Backend` and registers an instance; ``auto``
(:mod:`qkv.backends.policy`) picks the cheapest that supports a request and names none of them. The
kernel core they share is :mod:`qkv.backends.kernels`; the plans they cache, :mod:`qkv.backends.plan`.
"""

from __future__ import annotations

from .base import Backend, Request
from .registry import available, get, register, registered, unregister

# isort: split
# registration, in the order explain lists them: exact, approximations, sequence-parallel
from . import flex, linear, nystrom, performer, reference, ring, sdpa, tiled, ulysses  # noqa: E402,F401

__all__ = ["Backend", "Request", "available", "get", "register", "registered", "unregister"]

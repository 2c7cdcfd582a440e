"""``auto``: the cheapest backend that supports a request. It names no backend.

Every registered backend that is available here, may be picked automatically (``Backend.automatic``)
and takes the request's options is asked :meth:`~qkv.backends.Backend.supports` (and
:meth:`~qkv.backends.Backend.auto_blocker`, whether ``auto`` may pick it unasked); those that can serve
the request are asked their :meth:`~qkv.backends.Backend.cost` (estimated seconds, from measured
constants), and the cheapest runs with the plan it made. :class:`Choice` keeps every candidate's cost
and every other backend's reason, which :func:`qkv.explain` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .base import Backend, Request, unsupported
from .registry import get, registered

__all__ = ["Choice", "candidates", "choose", "resolve"]


@dataclass
class Choice:
    """What ``auto`` does with a request: the backend, its plan, and why."""

    backend: str
    plan: Any
    reason: str
    costs: dict[str, float] = field(default_factory=dict)
    """Every candidate's estimated seconds."""
    declined: dict[str, str] = field(default_factory=dict)
    """Backends that cannot (or may not) serve the request, with their reasons."""


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def candidates(req: Request) -> tuple[dict[str, Backend], dict[str, str]]:
    """The backends that may serve ``req`` under ``auto``, and the reasons of all others."""
    ok: dict[str, Backend] = {}
    declined: dict[str, str] = {}
    for name, b in registered().items():
        if not b.available():
            declined[name] = "not available on this machine"
            continue
        if not b.automatic:
            declined[name] = "only when asked for by name (backend=...)"
            continue
        unknown = set(req.options) - b.options
        if unknown:
            declined[name] = f"does not take the option(s) {', '.join(sorted(unknown))}"
            continue
        why = unsupported(b, req) or b.supports(req) or b.auto_blocker(req)
        if why is not None:
            declined[name] = why
            continue
        ok[name] = b
    return ok, declined


def choose(req: Request) -> Choice:
    """The backend ``auto`` runs for ``req``. Raises ``NotImplementedError`` (with every backend's
    reason) when none can serve it."""
    ok, declined = candidates(req)
    if not ok:
        reasons = "; ".join(f"{n}: {w}" for n, w in declined.items())
        raise NotImplementedError(f"no backend can serve this request ({reasons})")
    costs = {name: b.cost(req) for name, b in ok.items()}
    name = min(costs, key=lambda n: costs[n])
    best = ok[name]
    others = sorted((c, n) for n, c in costs.items() if n != name)
    reason = best.describe(req) or name
    reason += f"; estimated {_ms(costs[name])}" if math.isfinite(costs[name]) else ""
    if others:
        reason += ", against " + ", ".join(f"{n} {_ms(c)}" for c, n in others)
    skipped = [
        f"{n} declined ({w})" for n, w in declined.items() if registered()[n].automatic and registered()[n].available()
    ]
    if skipped:
        reason += "; " + "; ".join(skipped)
    return Choice(name, best.plan(req), reason, costs, declined)


def resolve(req: Request, backend: str = "auto") -> tuple[Backend, Any]:
    """The backend (and its plan) that computes ``req`` when the caller asked for ``backend``
    (``"auto"`` or a registered name).

    Raises:
        TypeError: ``backend`` is not a string, or the request carries options the backend does not take.
        ValueError: an unknown backend, or one not available on this machine.
        NotImplementedError: the backend cannot serve this request (the message says why and which can).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        known = set().union(*(b.options for b in registered().values()))
        unknown = set(req.options) - known
        if unknown:
            raise TypeError(
                f"qkv.attention does not take the option(s) {', '.join(sorted(unknown))}: no registered backend"
                " understands them"
            )
        c = choose(req)
        return get(c.backend), c.plan
    impl = get(backend)
    if not impl.available():
        names = ", ".join(n for n, b in registered().items() if b.available())
        raise ValueError(f"backend {backend!r} is not available on this machine; available: {names}")
    unknown = set(req.options) - impl.options
    if unknown:
        raise TypeError(f"backend {backend!r} does not take the option(s) {', '.join(sorted(unknown))}")
    why = unsupported(impl, req) or impl.supports(req)
    if why is not None:
        try:
            alt = f"; backend {choose(req).backend!r} can"
        except NotImplementedError:
            alt = ""
        raise NotImplementedError(f"backend {backend!r} cannot serve this request: {why}{alt}")
    return impl, impl.plan(req)

"""``auto``: the cheapest backend that supports a request. It names no backend.

Every registered backend that is available here, may be picked automatically (``Backend.automatic``)
and takes the request's options is asked :meth:`~qkv.backends.Backend.supports` (and
:meth:`~qkv.backends.Backend.auto_blocker`, whether ``auto`` may pick it unasked); those that can serve
the request are asked their :meth:`~qkv.backends.Backend.cost` (estimated seconds, from measured
constants), and the cheapest runs with the plan it made. Equal estimates go to the backend with the
higher :attr:`~qkv.backends.Backend.preference`, then to the name that sorts first (:func:`rank`): the
order of registration never decides. :class:`Choice` keeps every candidate's cost and every other
backend's reason, which :func:`qkv.explain` prints; a call of ``qkv.attention`` makes the same choice
without writing those reasons (:func:`resolve`).

Inside ``torch.compile`` (or ``torch.export``; :func:`~qkv.backends.base.tracing`) the choice is Python
that runs once while the graph is traced and is cached with it under ``torch.compile``'s guards (mask
structure, shapes, dtype, device): ``auto`` then picks among the backends that trace into the graph
(:meth:`~qkv.backends.Backend.traceable`), costed from shapes and the mask's structure alone (the
graph serves every batch of those shapes, whatever its document ids or lengths). A backend that does
not trace (``tiled``: its tile loop is planned from tensor values) runs outside the graph when named,
or when no traceable backend serves the request: one graph break per call, the result unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .base import Backend, Request, tracing, unsupported
from .plan import PLANS
from .registry import get, registered, version

__all__ = ["Choice", "candidates", "choose", "rank", "resolve"]


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
    outside: bool = False
    """Inside a traced region: no traceable backend serves the request, so ``auto`` runs outside the
    graph (``backend`` is then ``"auto"``: it is chosen at run time from the values)."""


TRACED = "inside torch.compile"
"""How :class:`Choice` reasons begin for a request traced into a graph."""


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def rank(backend: Backend, cost: float) -> tuple[float, int, str]:
    """The key ``auto`` minimises: the estimated seconds, then the higher
    :attr:`~qkv.backends.Backend.preference`, then the name. Registration order plays no part."""
    return (cost, -backend.preference, backend.name)


_NOT_AVAILABLE = "not available on this machine"
_BY_NAME = "only when asked for by name (backend=...)"


def _screen(b: Backend, req: Request, traced: bool) -> str | None:
    """Why ``auto`` may not pick ``b`` for ``req`` (the first reason, in the order :func:`explain` reports
    them), or ``None``. ``supports`` is asked only of a backend that is available, automatic and takes the
    request's options (it may validate them and raise)."""
    if not b.available():
        return _NOT_AVAILABLE
    if not b.automatic or b.local_shards:  # a backend of local shards never sees a request auto made
        return _BY_NAME
    opts = req.options
    if opts:
        unknown = set(opts) - b.options
        if unknown:
            return f"does not take the option(s) {', '.join(sorted(unknown))}"
    if traced:  # asked first: a backend that does not trace may read values in supports() too
        why = b.traceable(req)
        if why is not None:
            return f"{TRACED}: {why}"
    return unsupported(b, req) or b.supports(req) or b.auto_blocker(req)


def candidates(req: Request) -> tuple[dict[str, Backend], dict[str, str]]:
    """The backends that may serve ``req`` under ``auto``, and the reasons of all others."""
    ok: dict[str, Backend] = {}
    declined: dict[str, str] = {}
    traced = tracing()
    for name, b in registered().items():
        why = _screen(b, req, traced)
        if why is None:
            ok[name] = b
        else:
            declined[name] = why
    return ok, declined


def _serving(req: Request) -> dict[str, Backend]:
    """The backends of :func:`candidates` without their reasons (what a call of ``qkv.attention`` needs):
    a backend ``auto`` may never pick is passed over before ``available()`` is asked, which is the only
    difference; :func:`_screen` decides every other one, so the set is the same."""
    traced = tracing()
    return {
        name: b
        for name, b in registered().items()
        if b.automatic and not b.local_shards and _screen(b, req, traced) is None
    }


def _cheapest(req: Request, ok: dict[str, Backend]) -> tuple[str | None, dict[str, float]]:
    """The name ``auto`` picks among ``ok`` (``None`` when it is empty) and every candidate's cost."""
    costs = {name: b.cost(req) for name, b in ok.items()}
    best, best_rank = None, None
    for name, c in costs.items():  # a plain loop: torch.compile traces it (min(key=...) over a dict it does not)
        r = rank(ok[name], c)
        if best_rank is None or r < best_rank:
            best, best_rank = name, r
    return best, costs


def _pick(req: Request) -> tuple[str | None, dict[str, Backend], dict[str, float], dict[str, str]]:
    """The name ``auto`` picks for ``req`` (``None``: none can serve it), the candidates, their costs and
    the other backends' reasons."""
    ok, declined = candidates(req)
    best, costs = _cheapest(req, ok)
    return best, ok, costs, declined


def _none_serves(declined: dict[str, str]) -> Choice:
    """Traced: run ``auto`` outside the graph. Eager: ``NotImplementedError`` with every reason."""
    if tracing():
        reasons = "; ".join(f"{n}: {w}" for n, w in declined.items() if registered()[n].automatic)
        why = f"{TRACED}, no backend traces this request into the graph ({reasons}); auto chooses at run time,"
        return Choice("auto", None, why + " outside the graph (a graph break per call)", {}, declined, True)
    raise _no_backend(declined)


def _no_backend(declined: dict[str, str]) -> NotImplementedError:
    reasons = "; ".join(f"{n}: {w}" for n, w in declined.items())
    return NotImplementedError(f"no backend can serve this request ({reasons})")


def choose(req: Request) -> Choice:
    """The backend ``auto`` runs for ``req``, with every candidate's cost and every other backend's
    reason in words. Raises ``NotImplementedError`` (with every backend's reason) when none can serve it."""
    with PLANS.scope():  # the mask's key is computed once, however many backends cost it
        return _choose(req)


def _choose(req: Request) -> Choice:
    name, ok, costs, declined = _pick(req)
    if name is None:
        return _none_serves(declined)
    best = ok[name]
    others = sorted((c, n) for n, c in costs.items() if n != name)
    reason = best.describe(req) or name
    reason += f"; estimated {_ms(costs[name])}" if math.isfinite(costs[name]) else ""
    if others:
        reason += ", against " + ", ".join(f"{n} {_ms(c)}" for c, n in others)
    tied = [n for c, n in others if c == costs[name]]
    if tied:
        reason += f" (a tie with {', '.join(tied)}, broken by preference, then name)"
    skipped = [
        f"{n} declined ({w})" for n, w in declined.items() if registered()[n].automatic and registered()[n].available()
    ]
    if skipped:
        reason += "; " + "; ".join(skipped)
    if tracing():
        reason = f"{TRACED} (chosen once per graph, from shapes and the mask's structure): {reason}"
    return Choice(name, best.plan(req), reason, costs, declined)


MEMO_SIZE = 256
"""Choices ``auto`` remembers (:func:`resolve`); the memo is emptied when full."""
_MEMO: dict[Hashable, str] = {}


def _memo_key(req: Request) -> Hashable | None:
    """What ``auto``'s choice for ``req`` depends on, or ``None`` where it cannot be known cheaply (then
    the choice is made afresh).

    Only a *plain* request is remembered: no mask (a decoding step's causal mask is dropped before this:
    :meth:`qkv.masks.Mask.allows_all`), no score mod, no sinks, no options, not traced. For it every
    backend's ``supports``/``auto_blocker``/``cost`` read the sizes, dtype, device, whether gradients are
    taken, ``return_weights`` and ``dropout_p``, and state each backend names in
    :meth:`~qkv.backends.Backend.choice_state` (flex: whether it may compile, the kernels compiled, the
    recompile limit); the registry's version changes with every (un)registration, and the flags the
    policy reads, availability and state are read on every call. A backend that does not name its state
    (``choice_state() is None``, the default) turns the memo off while it is registered and automatic."""
    if req.mask is not None or req.score_mod is not None or req.sinks is not None or req.options or tracing():
        return None
    state = []
    for name, b in registered().items():
        if not b.automatic or b.local_shards:  # never a candidate (read on every call, as _screen does)
            continue
        st = b.choice_state()
        if st is None:
            return None
        state.append((name, b.preference, b.available(), st))
    return (
        version(), tuple(state), req.B, req.H, req.Hkv, req.Lq, req.Lk, req.D, req.Dv,
        req.dtype, req.device, req.requires_grad, req.return_weights, req.dropout_p,
    )  # fmt: skip


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
    if req.mask is None:  # no mask key to compute once: the scope would hold nothing
        return _resolve(req, backend)
    with PLANS.scope():
        return _resolve(req, backend)


def _resolve(req: Request, backend: str) -> tuple[Backend, Any]:
    if tracing():
        return _resolve_traced(req, backend)
    if backend == "auto":
        known = set().union(*(b.options for b in registered().values())) if req.options else set()
        unknown = set(req.options) - known
        if unknown:
            raise TypeError(
                f"qkv.attention does not take the option(s) {', '.join(sorted(unknown))}: no registered backend"
                " understands them"
            )
        key = _memo_key(req)
        name = _MEMO.get(key) if key is not None else None
        if name is not None:  # the same plain request, registry and backend state as a choice made before
            impl = get(name)
            return impl, impl.plan(req)
        ok = _serving(req)  # no reasons written on the way: they are read only when none serves
        name, _ = _cheapest(req, ok)
        if name is None:
            raise _no_backend(candidates(req)[1])
        if key is not None:
            if len(_MEMO) >= MEMO_SIZE:
                _MEMO.clear()
            _MEMO[key] = name
        impl = ok[name]
        return impl, impl.plan(req)
    impl = get(backend)
    if not impl.available():
        names = ", ".join(n for n, b in registered().items() if b.available())
        raise ValueError(f"backend {backend!r} is not available on this machine; available: {names}")
    if req.options:
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


class _Outside(Backend):
    """A backend that does not trace, run outside the graph being traced: ``run`` is
    ``torch.compiler.disable``'d, so the graph breaks there and the call runs eagerly (plan from the
    values, cached, as in any eager call)."""

    name = "outside"

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        # disabled here, where dynamo is already tracing, not with a decorator: that would import
        # torch._dynamo (seconds) with qkv, in every process, spawned ranks and commands included
        return torch.compiler.disable(_run_outside)(self.backend, req)  # type: ignore[no-any-return]


def _run_outside(backend: str, req: Request) -> Tensor | tuple[Tensor, Tensor]:
    impl, plan = resolve(req, backend)
    return impl.run(req, plan)


def _resolve_traced(req: Request, backend: str) -> tuple[Backend, Any]:
    """:func:`resolve` while tracing: a backend that traces runs in the graph with the plan it makes
    there; any other runs outside it (:class:`_Outside`), where :func:`resolve` checks it as usual."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        c = choose(req)
        return (_Outside("auto"), None) if c.outside else (get(c.backend), c.plan)
    impl = get(backend)
    if impl.traceable(req) is not None or not impl.available() or set(req.options) - impl.options:
        return _Outside(backend), None  # errors, if any, are raised there as in an eager call
    why = unsupported(impl, req) or impl.supports(req)
    if why is not None:
        raise NotImplementedError(f"backend {backend!r} cannot serve this request: {why}")
    return impl, impl.plan(req)

"""What every backend receives (a validated :class:`Request`) and what it must provide."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..masks import Mask, Shape
from ..scores import ScoreMod

_assume_traced = False


def tracing() -> bool:
    """Whether the caller is being traced into a graph (``torch.compile``, ``torch.export``), or
    :func:`assume_traced` is on. Then nothing may read tensor values (``.item()``, ``.tolist()``,
    ``bool(t)``) or files: each would be a graph break, or an error under ``fullgraph=True``. The
    backend choice made while tracing is Python run once at trace time, not part of the graph;
    ``torch.compile`` caches it with the graph, under its guards (mask structure, shapes, dtype,
    device)."""
    return _assume_traced or torch.compiler.is_compiling()


@contextlib.contextmanager
def assume_traced(flag: bool = True) -> Iterator[None]:
    """Make :func:`tracing` answer ``flag`` (or the truth, when ``False``) inside: how
    :func:`qkv.explain` (``compiled=True``) shows what ``auto`` does inside ``torch.compile``
    without compiling."""
    global _assume_traced
    old, _assume_traced = _assume_traced, flag
    try:
        yield
    finally:
        _assume_traced = old


@dataclass(frozen=True, init=False)
class Request:
    """One validated call of :func:`qkv.attention`, in 4-D layout.

    ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``; ``H % Hkv == 0``. ``sinks``:
    ``None`` or ``(H,)``, one logit per query head that joins the softmax denominator (served only by
    backends with :attr:`Backend.takes_sinks`). The sizes (``B``, ``H``, ``Hkv``, ``Lq``, ``Lk``, ``D``,
    ``Dv``), ``shape`` and ``flops`` are read from the tensors once, when the request is made (every
    backend asked by ``auto`` reads them).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    score_mod: ScoreMod | None
    scale: float
    dropout_p: float
    return_weights: bool
    options: dict[str, Any] = field(default_factory=dict)
    sinks: Tensor | None = None
    B: int = field(init=False, repr=False, compare=False)
    H: int = field(init=False, repr=False, compare=False)
    Hkv: int = field(init=False, repr=False, compare=False)
    """Key/value heads."""
    Lq: int = field(init=False, repr=False, compare=False)
    Lk: int = field(init=False, repr=False, compare=False)
    D: int = field(init=False, repr=False, compare=False)
    Dv: int = field(init=False, repr=False, compare=False)
    shape: Shape = field(init=False, repr=False, compare=False)
    """The problem as a mask sees it: ``Shape(B, H, Lq, Lk, device)``."""
    flops: float = field(init=False, repr=False, compare=False)
    """Forward floating-point operations if every pair met: ``2 B H Lq Lk (D + Dv)``."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Mask | None,
        score_mod: ScoreMod | None,
        scale: float,
        dropout_p: float,
        return_weights: bool,
        options: dict[str, Any] | None = None,
        sinks: Tensor | None = None,
    ) -> None:
        B, H, Lq, D = q.shape
        _, Hkv, Lk, _ = k.shape
        opts = {} if options is None else options
        self._fill(q, k, v, mask, score_mod, scale, dropout_p, return_weights, opts, sinks, B, H, Hkv, Lq, Lk, D, v.shape[3])

    @classmethod
    def _sized(
        cls, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, score_mod: ScoreMod | None, scale: float,
        dropout_p: float, return_weights: bool, options: dict[str, Any], sinks: Tensor | None,
        B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int,
    ) -> Request:
        """A request whose sizes the caller has read already (:func:`qkv.attention`'s validation, which
        checked them): the tensors' shapes are not read again."""  # fmt: skip
        req = cls.__new__(cls)
        req._fill(q, k, v, mask, score_mod, scale, dropout_p, return_weights, options, sinks, B, H, Hkv, Lq, Lk, D, Dv)
        return req

    def _fill(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, score_mod: ScoreMod | None, scale: float,
        dropout_p: float, return_weights: bool, options: dict[str, Any], sinks: Tensor | None,
        B: int, H: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int,
    ) -> None:
        # frozen: every field set once, here, into __dict__ (one call: a request is made per attention call)
        self.__dict__.update(
            q=q, k=k, v=v, mask=mask, score_mod=score_mod, scale=scale, dropout_p=dropout_p,
            return_weights=return_weights, options=options, sinks=sinks,
            B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
            shape=Shape(B, H, Lq, Lk, q.device), flops=2.0 * B * H * Lq * Lk * (D + Dv),
        )  # fmt: skip

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 for multi-head, ``H`` for multi-query attention)."""
        return self.H // self.Hkv

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def requires_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        s = self.sinks
        return self.q.requires_grad or self.k.requires_grad or self.v.requires_grad or (s is not None and s.requires_grad)


class Backend:
    """A way of computing attention: the protocol every backend implements, and ``auto`` reads.

    A backend is one file that defines a subclass and registers an instance
    (:func:`qkv.backends.register`). ``auto`` never names a backend: it asks every available,
    ``automatic`` backend whether it ``supports`` the request and what it would ``cost``, and runs the
    cheapest with the ``plan`` it made. :func:`qkv.explain` prints every candidate's cost or reason.

    Subclasses set :attr:`name` (and :attr:`options`, the flags below) and implement :meth:`supports`,
    :meth:`cost` and :meth:`run`; :meth:`plan` when they decide something before computing that is worth
    caching (cache it in :data:`qkv.backends.plan.PLANS`).

    **Flags** say what a backend is without a request, and everything that needs to know reads them
    from the registry (:func:`qkv.backends.registered`), never from a list of names: the policy
    (``automatic``, ``local_shards``, ``takes_sinks``, :meth:`available`, :meth:`traceable`),
    :func:`qkv.attention` (``exact`` and ``local_shards``: whether a mask that allows every pair of the
    request is dropped before a named backend sees it), the hook points of
    :mod:`qkv.nn` (``exact``: only an exact backend has scores to hook), ``qkv bench`` and the
    benchmarks (every exact backend is timed), and the conformance suite
    (``tests/backends/test_conformance.py``: every available exact backend is held to the float64 oracle
    on every request it :meth:`supports`, with sinks if it ``takes_sinks``).

    **Ties.** ``auto`` runs the backend with the lowest :meth:`cost`; between equal estimates the
    higher :attr:`preference` wins, then the name in alphabetical order. The order in which backends
    were registered (or imported) never decides.
    """

    name: str = "backend"
    #: extra keyword arguments of ``qkv.attention`` this backend understands
    options: frozenset[str] = frozenset()
    #: whether ``auto`` may pick it (False for approximations, and for backends whose inputs mean
    #: something else, such as ring attention's local shards)
    automatic: bool = True
    #: whether it computes the softmax of the exact scores (False for approximations: they have no
    #: scores for a hook to read)
    exact: bool = True
    #: whether its ``q``, ``k``, ``v`` are one rank's shards of a longer sequence (``ring``, ``ulysses``),
    #: so the request's shape is not the problem's: ``auto`` never picks it, and a mask is handed to it
    #: as given, never dropped for allowing every pair of the local shapes (:meth:`qkv.masks.Mask.allows_all`)
    local_shards: bool = False
    #: whether :meth:`run` honours ``req.sinks``; a backend that does not is never handed a request
    #: with sinks (the policy declines it with a reason, see :func:`unsupported`)
    takes_sinks: bool = False
    #: what breaks a tie between equal cost estimates under ``auto``: the higher preference wins, then
    #: the name in alphabetical order (never the order of registration). ``0`` for every built-in
    #: backend; raise it for a backend that should win ties (say, one that wraps the same kernel as
    #: another with less Python around it), lower it for one that should lose them.
    preference: int = 0

    def available(self) -> bool:
        """Whether this backend can run on this machine at all (installed packages, devices)."""
        return True

    def supports(self, req: Request) -> str | None:
        """``None`` if this backend can compute ``req``; otherwise the reason it cannot, in words."""
        return None

    def auto_blocker(self, req: Request) -> str | None:
        """``None`` when ``auto`` may pick this backend for ``req`` (which it :meth:`supports`); otherwise
        why only a caller who names it may (say, it would first compile for tens of seconds). Default:
        ``None``."""
        return None

    def choice_state(self) -> Hashable | None:
        """What, besides the request, :meth:`available`, :meth:`supports`, :meth:`auto_blocker` and
        :meth:`cost` read for a *plain* request (no mask, score mod, sinks or options: a decoding step
        once its causal mask is dropped): state that can change while the process runs (a setting, the
        kernels compiled so far), as a hashable read afresh on each call. ``auto`` remembers its choice
        for plain requests under their shapes, dtype, device, grad flags, ``return_weights`` and
        ``dropout_p``, the registry's version (``qkv.backends.registry.version()``) and every automatic
        backend's flags, availability and ``choice_state()``, so a choice is never reused across a change
        of any of them. ``None`` (the default): not known, and ``auto`` chooses afresh on every call while
        this backend is registered and automatic. The built-in backends return ``()``, or their state."""
        return None

    def traceable(self, req: Request) -> str | None:
        """``None`` when :meth:`plan` and :meth:`run` trace into a ``torch.compile`` / ``torch.export``
        graph for ``req`` with no graph break: they read no tensor values and no files, and decide only
        from shapes, dtypes, devices and the mask's structure (see :func:`tracing`). Otherwise the
        reason. Inside a compiled region ``auto`` picks among the backends that say ``None``; a backend
        named there that does not runs outside the graph (``torch.compiler.disable``: one graph break
        per call). Default: the reason that the backend did not say (a backend registered from outside
        must opt in)."""
        return f"{self.name} does not say that it traces into a torch.compile graph (Backend.traceable)"

    def plan(self, req: Request) -> Any:
        """What this backend decides before computing ``req`` (tile classification, a block mask), as
        data; ``None`` when there is nothing to decide. Called once per call by ``auto`` and handed to
        :meth:`run`; implementations cache it per (mask, shape, ...) so repeated calls and the layers
        of a model that share a mask reuse it."""
        return None

    def cost(self, req: Request) -> float:
        """Estimated seconds to compute ``req`` on this machine (from measured constants); only
        compared with other backends' estimates. Called only when :meth:`supports` said ``None``."""
        return math.inf

    def describe(self, req: Request) -> str:
        """One phrase on how this backend would compute ``req`` (shown by :func:`qkv.explain`)."""
        return ""

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        """The output ``(B, H, Lq, Dv)`` or, with ``req.return_weights``, ``(out, weights)``.

        ``plan`` is what :meth:`plan` returned for ``req`` (``None``: build it)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def unsupported(backend: Backend, req: Request) -> str | None:
    """Why ``backend`` cannot serve ``req`` because of a part of the request it does not declare it
    takes (attention sinks), or ``None``. The policy asks this before :meth:`Backend.supports`, so a
    backend written before a feature existed, or registered from outside, never ignores it silently."""
    if req.sinks is not None and not backend.takes_sinks:
        return f"{backend.name} does not take attention sinks"
    return None

"""``reference``: the formula as written, ``softmax(Q Kᵀ · scale + bias) V``; the oracle.

With attention sinks the softmax runs over ``[scores, s_h]`` (one more column per row, the head's sink
logit) and the sink's column is dropped before multiplying by ``V``.

Builds the full ``(B, H, Lq, Lk)`` score matrix, so memory is ``O(Lq · Lk)``. Runs in float32 for
half-precision inputs and in float64 for float64 inputs; returns the weights on request.

Options (keyword arguments of :func:`qkv.attention`; ``auto`` then picks ``reference``, the only backend
that takes them), the seams of the hook points of :mod:`qkv.nn`:

* ``scores_hook``: ``fn(scores) -> Tensor | None``, called with the scores ``(B, H, Lq, Lk)`` in the
  compute dtype (``q kᵀ · scale`` with the score mod applied and masked pairs at ``-inf``, before the
  softmax); a tensor it returns (same shape) replaces them.
* ``weights_hook``: ``fn(weights) -> Tensor | None``, called with the weights ``(B, H, Lq, Lk)`` in the
  compute dtype (over the keys: with sinks a row sums to less than 1; a row that sees nothing is 0),
  before dropout; a tensor it returns (same shape) replaces them, and the output is ``dropout(that) V``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import Backend, Request
from .kernels import compute_dtype, safe_softmax
from .registry import register

#: measured constants of the cost model: the formula as written runs its matmuls at about this rate,
#: spends about this long per element of the ``Lq x Lk`` tensors it builds (scores, mask, weights) and
#: has this fixed cost per call (a dozen small ops)
FLOPS = 60e9
PAIR_S = 6e-9
CALL_S = 200e-6


def scores(req: Request, dtype: torch.dtype | None = None) -> Tensor:
    """``Q Kᵀ · scale`` with the score mod applied and masked pairs at ``-inf``: ``(B, H, Lq, Lk)``.

    Grouped-query heads share K without copying it: ``q`` is viewed as ``(B, Hkv, G·Lq, D)``, the
    query rows of a group stacked (a broadcast ``(B, Hkv, G, Lq, D) @ (B, Hkv, 1, D, Lk)`` would
    copy K ``G`` times inside ``matmul``)."""
    dt = dtype or compute_dtype(req.dtype)
    B, H, Hkv, G, Lq, Lk = req.B, req.H, req.Hkv, req.groups, req.Lq, req.Lk
    q = req.q.to(dt).reshape(B, Hkv, G * Lq, req.D)
    s = (q @ req.k.to(dt).transpose(-1, -2)).reshape(B, H, Lq, Lk) * req.scale
    shape = req.shape
    if req.score_mod is not None or req.mask is not None:
        dev = req.device
        b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, -1, 1, 1)
        qi = torch.arange(Lq, device=dev).view(1, 1, -1, 1)
        ki = torch.arange(Lk, device=dev).view(1, 1, 1, -1)
        if req.score_mod is not None:
            s = req.score_mod.apply(shape, s, b, h, qi, ki).to(dt).expand(B, H, Lq, Lk)
        if req.mask is not None:
            s = s.masked_fill(~req.mask.tile(shape, 0, Lq, 0, Lk), float("-inf"))
    return s


HOOKS = ("scores_hook", "weights_hook")
"""The options through which a caller reads or replaces the scores and the weights."""


def _hook(name: str, fn: Callable[[Tensor], Any] | None, t: Tensor) -> Tensor:
    """``fn(t)``, checked: ``t`` itself when ``fn`` is ``None`` or returns ``None``, else the tensor it
    returned (same shape, cast to ``t``'s dtype)."""
    if fn is None:
        return t
    got = fn(t)
    if got is None:
        return t
    if not isinstance(got, Tensor):
        raise TypeError(f"{name} must return None or a tensor of shape {tuple(t.shape)}, got {type(got).__name__}")
    if got.shape != t.shape:
        raise ValueError(f"{name} must return a tensor of shape {tuple(t.shape)}, got {tuple(got.shape)}")
    return got.to(t.dtype)


def reference_attention(req: Request, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Output ``(B, H, Lq, Dv)`` and weights ``(B, H, Lq, Lk)``, both in the compute dtype (through the
    request's ``scores_hook`` and ``weights_hook`` options, when it has them)."""
    dt = dtype or compute_dtype(req.dtype)
    on_scores, on_weights = (req.options.get(name) for name in HOOKS)
    for name, fn in zip(HOOKS, (on_scores, on_weights)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function of one tensor, got {type(fn).__name__}")
    s = _hook("scores_hook", on_scores, scores(req, dt))
    if req.sinks is None:
        w = safe_softmax(s)
    else:
        sink = req.sinks.to(dt).view(1, -1, 1, 1).expand(req.B, req.H, req.Lq, 1)
        w = safe_softmax(torch.cat((s, sink), dim=-1))[..., :-1]
    w = _hook("weights_hook", on_weights, w)
    return weights_times_values(w, req.v, req.dropout_p, dt), w


def weights_times_values(w: Tensor, v: Tensor, dropout_p: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
    """The second half of the formula, ``dropout(w) V``: weights ``w (B, H, Lq, Lk)``, values ``v (B, Hkv,
    Lk, Dv)``, query head ``h`` reading value head ``h // (H // Hkv)`` (V is not copied per head); computed
    in ``dtype`` (default: the compute dtype of ``v``, float32 or float64) -> ``(B, H, Lq, Dv)``. What
    :func:`reference_attention` runs after the softmax, and what the hook points of :mod:`qkv.nn` run on
    weights a hook replaced."""
    dt = dtype or compute_dtype(v.dtype)
    B, H, Lq, Lk = w.shape
    Hkv, Dv = v.shape[1], v.shape[3]
    w = w.to(dt)
    wd = torch.nn.functional.dropout(w, dropout_p) if dropout_p > 0 else w
    out = wd.reshape(B, Hkv, (H // Hkv) * Lq, Lk) @ v.to(dt)  # (B, Hkv, G·Lq, Dv)
    return out.reshape(B, H, Lq, Dv)


class Reference(Backend):
    name = "reference"
    takes_sinks = True
    options = frozenset(HOOKS)

    def choice_state(self) -> tuple[()]:
        return ()  # a plain request: supports() and cost() read the request alone (and measured constants)

    def traceable(self, req: Request) -> str | None:
        # tensor operations only; but in a graph auto would pick it where sdpa declined a dense mask too
        # large for memory, and its scores are larger still: then it declines, and auto runs outside
        from . import sdpa  # here, not above: backends register in import order, which explain shows

        dense = req.B * req.H * req.Lq * req.Lk * 4
        free = sdpa._free_memory(req.device) if dense > sdpa.CHECK_MEMORY_ABOVE else None
        if free is not None and dense > free // 2:
            return f"its {req.B}x{req.H}x{req.Lq}x{req.Lk} scores (~{dense / 2**30:.1f} GiB) against {free / 2**30:.1f} GiB free"
        return None

    def cost(self, req: Request) -> float:
        s = req.flops / FLOPS + req.B * req.H * req.Lq * req.Lk * PAIR_S + CALL_S
        return 3.0 * s if req.requires_grad else s

    def describe(self, req: Request) -> str:
        return "the formula as written, O(Lq*Lk) memory"

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        out, w = reference_attention(req)
        if req.return_weights:
            return out.to(req.dtype), w.to(req.dtype)
        return out.to(req.dtype)


register(Reference())

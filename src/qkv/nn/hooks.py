"""Hook points: named places inside every attention module where analysis reads and changes values.

Every :class:`qkv.nn.AttentionModule` (``MultiHeadAttention``, the attention of every qkv block and
model, BERT's self-attention, the linear-attention layers, ...) owns these :class:`HookPoint` s, as
TransformerLens's ``HookPoint`` s. A hook point is an identity ``nn.Module``: register a hook on it with
torch's own ``register_forward_hook``; ``hook(hook_point, (value,), value)`` sees the value and, by
returning a tensor, replaces it (an intervention); returning ``None`` only reads it.

=================  ====================  =====================================================  ================
name               shape                 the value                                              TransformerLens
=================  ====================  =====================================================  ================
``hook_q``         ``(B, H, Lq, D)``     queries as attention receives them (after projection,  ``hook_q``
                                         QK-norm and RoPE)
``hook_k``         ``(B, Hkv, Lk, D)``   keys (with a KV cache: every cached key)               ``hook_k``
``hook_v``         ``(B, Hkv, Lk, Dv)``  values                                                 ``hook_v``
``hook_scores``    ``(B, H, Lq, Lk)``    ``q kᵀ · scale`` with the score mod applied and        ``hook_attn_scores``
                                         masked pairs at ``-inf``, before the softmax
``hook_weights``   ``(B, H, Lq, Lk)``    the attention weights (rows sum to 1, or 0 for a       ``hook_pattern``
                                         query that sees nothing), before dropout
``hook_heads``     ``(B, H, Lq, Dv)``    each head's output, before the heads are merged and    ``hook_z``
                                         projected (``out_proj``)
=================  ====================  =====================================================  ================

What a hook costs and changes:

- No hook registered: the module calls its backend exactly as it would without hook points (any
  backend, no weights); the only cost is checking the hook points' hook dicts.
- ``hook_q``/``hook_k``/``hook_v``/``hook_heads`` cost only the hook itself; the backend still computes.
- ``hook_weights``: the module asks its backend for the weights too (``return_weights=True``; a backend
  that cannot, such as ``sdpa``, is replaced by ``auto`` for the call, unless the module passes it
  options of its own, as the sequence-parallel ``ring``/``ulysses`` layers do: then ``ValueError``). If
  the hook replaced the weights (or changed them in place), the output is recomputed from them by the
  second half of the reference formula (``qkv.backends.reference.weights_times_values``, the code the
  ``reference`` backend runs after its softmax): ``dropout(weights) @ v``, grouped-query heads sharing their
  value head, dropout (training only) applied to the new weights.
- ``hook_scores``: the module computes attention by the formula as written whatever its backend:
  ``qkv.attention(..., backend="reference", scores_hook=..., weights_hook=...)`` (float32, float64 for
  float64 inputs): scores, hook, softmax (a row of ``-inf`` gives zeros), ``hook_weights``, dropout,
  ``@ v``. A module on a backend that is not ``exact`` (an approximation: ``linear``, ``performer``,
  ``nystrom``) has no softmax scores and refuses the hook with a ``ValueError``.

Every path is a call of :func:`qkv.attention`, so the inputs are validated once, there; the formula has one
copy, the ``reference`` backend's (its ``scores_hook``/``weights_hook`` options are the seams, and
replaced weights go through its ``weights_times_values``).

Gradients flow through every hook point (``capture_weights`` and ``qkv.analysis.capture`` detach
their copies). A hook may return the value's ``detach().requires_grad_()`` leaf to read gradients with
respect to the weights or a head's output.

:func:`hooked` registers ``fn(value, name)`` hooks by full name for the length of a ``with`` block, and
:func:`hook_points` lists a model's hook points::

    with qkv.nn.hooked(model, ("*.hook_weights", lambda w, name: torch.ones_like(w) / w.shape[-1])):
        out = model(x)                               # every layer attends uniformly
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Union

from torch import Tensor, nn

from ..attention import attention
from ..backends.reference import weights_times_values
from ..backends.registry import get as get_backend

__all__ = ["HOOK_POINTS", "HookFn", "HookPoint", "hook_points", "hooked"]

HOOK_POINTS = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_weights", "hook_heads")
"""The hook points of every attention module, in the order a forward pass reaches them."""

HookFn = Callable[[Tensor, str], Union[Tensor, None]]
"""``fn(value, name) -> Tensor | None`` as :func:`hooked` takes it: return a tensor to replace the value."""

_COMMON = ("mask", "score_mod", "scale", "dropout_p", "sinks")
"""The arguments of ``qkv.attention`` that mean the same to every backend (the rest are a backend's options)."""

_FORMULA = "reference"
"""The backend that computes the formula as written, with the ``scores_hook``/``weights_hook`` seams."""


class HookPoint(nn.Module):
    """An identity module at a named place of a computation; torch's forward hooks read and replace
    the value passing through it (see the table in :mod:`qkv.nn.hooks`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    @property
    def active(self) -> bool:
        """Whether a forward (pre-)hook is registered here."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def hook_dicts(self) -> tuple[dict[int, Any], dict[int, Any]]:
        """The dicts torch keeps this module's forward hooks and pre-hooks in (non-empty = hooked)."""
        return self._forward_hooks, self._forward_pre_hooks


def _checked(name: str, before: Tensor, after: Any) -> Tensor:
    if not isinstance(after, Tensor) or after.shape != before.shape:
        got = tuple(after.shape) if isinstance(after, Tensor) else type(after).__name__
        raise ValueError(f"{name}: a hook must return a tensor of shape {tuple(before.shape)}, got {got}")
    return after


def checked_call(hp: HookPoint, name: str, x: Tensor) -> Tensor:
    """``hp(x)``: the value after ``hp``'s hooks, checked to keep ``x``'s shape (``ValueError`` naming ``name``)."""
    return _checked(name, x, hp(x))


def _run(hp: HookPoint, name: str, x: Tensor) -> tuple[Tensor, bool]:
    """``hp(x)`` checked, and whether the hook replaced ``x`` or changed it in place."""
    version = x._version
    y = _checked(name, x, hp(x))
    return y, y is not x or y._version != version


def hooked_attention(
    points: dict[str, HookPoint], backend: str, q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any]
) -> Tensor:
    """``qkv.attention(q, k, v, backend=backend, **kwargs)`` through the hook points ``points`` (the
    :data:`HOOK_POINTS` of one module), with the semantics in the table above."""
    hq, hk, hv, hs, hw, hh = (points[n] for n in HOOK_POINTS)
    if hq.active:
        q = _run(hq, "hook_q", q)[0]
    if hk.active:
        k = _run(hk, "hook_k", k)[0]
    if hv.active:
        v = _run(hv, "hook_v", v)[0]
    if hs.active:
        out = _by_formula(hs, hw, backend, q, k, v, kwargs)
    elif hw.active:
        try:  # the module's own backend when it returns weights (reference, tiled, linear, ...)
            out, w = attention(q, k, v, backend=backend, return_weights=True, **kwargs)
        except NotImplementedError as e:  # e.g. sdpa: an exact backend that returns weights
            extra = sorted(set(kwargs) - set(_COMMON))
            if extra:  # ring/ulysses (group=, layout=): another backend would see only this rank's shard
                raise ValueError(
                    f"hook_weights: backend {backend!r} returns no weights ({e}), and its option(s)"
                    f" {', '.join(extra)} mean nothing to another backend"
                ) from e
            out, w = attention(q, k, v, backend="auto", return_weights=True, **_common(kwargs))
        w, changed = _run(hw, "hook_weights", w)
        if changed:  # the output from the new weights: the second half of the formula, reference's own
            out = weights_times_values(w, v, float(kwargs.get("dropout_p", 0.0))).to(out.dtype)
    else:
        out = attention(q, k, v, backend=backend, **kwargs)
    if hh.active:
        out = _run(hh, "hook_heads", out)[0]
    return out


def _common(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in _COMMON if key in kwargs}


def _by_formula(
    hs: HookPoint, hw: HookPoint, backend: str, q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any]
) -> Tensor:
    """Attention by the formula, through ``hook_scores`` (and ``hook_weights`` when hooked)."""
    if backend != "auto" and not get_backend(backend).exact:
        raise ValueError(f"hook_scores: backend {backend!r} approximates attention and computes no softmax scores")
    extra = sorted(set(kwargs) - set(_COMMON))
    if extra:
        raise ValueError(f"hook_scores: the formula takes no backend options, got {', '.join(extra)}")
    hooks: dict[str, Any] = {"scores_hook": lambda s: _run(hs, "hook_scores", s)[0]}
    if hw.active:
        hooks["weights_hook"] = lambda w: _run(hw, "hook_weights", w)[0]
    return attention(q, k, v, backend=_FORMULA, **hooks, **kwargs)


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every hook point of ``model`` by full name (``"blocks.0.mixer.hook_weights"``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


@contextmanager
def hooked(model: nn.Module, *fwd: tuple[str | Callable[[str], bool], HookFn]) -> Iterator[dict[str, HookPoint]]:
    """Hook ``model``'s hook points while inside the ``with`` block.

    Args:
        model: any module tree with qkv attention modules.
        *fwd: ``(names, fn)`` pairs. ``names`` is a full hook-point name, a shell pattern
            (``"*.hook_weights"``, ``"encoder.layer.3.*.hook_heads"``) or a predicate on the name;
            ``fn(value, name)`` returns a tensor to replace the value, or ``None`` to leave it.

    Yields:
        The hooked points by name.

    Raises:
        ValueError: a pattern matches no hook point (the message shows a few names).
    """
    points = hook_points(model)
    handles = []
    hooked: dict[str, HookPoint] = {}
    try:
        for names, fn in fwd:
            match = names if callable(names) else (lambda n, pat=names: fnmatch.fnmatchcase(n, pat))
            found = [n for n in points if match(n)]
            if not found:
                some = ", ".join(list(points)[:3]) or "none: the model has no qkv attention module"
                raise ValueError(f"hooked: {names!r} matches no hook point of the model; names look like {some}")
            for n in found:
                handles.append(points[n].register_forward_hook(_adapt(fn, n)))
                hooked[n] = points[n]
        yield hooked
    finally:
        for h in handles:
            h.remove()


def _adapt(fn: HookFn, name: str) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
    def hook(module: nn.Module, args: Any, value: Tensor) -> Tensor | None:
        return fn(value, name)

    return hook

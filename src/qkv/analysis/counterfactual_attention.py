"""Does the output depend on the attention weights? Run the model on counterfactual attention: the
permutation test (Jain and Wallace 2019) and the uniform-attention baseline (Wiegreffe and Pinter 2019),
through the hook points.

While inside :func:`permuted_attention`, every hooked attention layer shuffles each query row's weights among
the keys that row may attend (the masked keys stay at 0; a fresh permutation at every call); inside
:func:`uniform_attention` each row attends uniformly to its allowed keys. The output is then computed from
the new weights. Compare the task metric (or :func:`total_variation` between output distributions) with and
without: a small change means the model did not need *these* weights.

Works on every :class:`qkv.nn.AttentionModule` (``hook_scores`` tells which keys are allowed, ``hook_weights``
replaces the weights; the module computes attention by the reference formula while hooked) and on
:class:`qkv.nn.AdditiveAttention` / :class:`qkv.nn.LuongAttention` (their own two hook points). Trees of
``torch.nn.MultiheadAttention`` and Hugging Face models have no hook points: the context managers refuse them
with a ``ValueError`` (their weights can still be captured, scored and compared: :mod:`qkv.analysis.token_importance`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..nn.hooks import hook_points, hooked

__all__ = ["permute_rows", "permuted_attention", "total_variation", "uniform_attention", "uniform_rows"]


def permute_rows(w: Tensor, allowed: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Shuffle each row of ``w (..., Lk)`` among its ``allowed`` keys (bool, broadcastable); other entries keep
    their value. Every allowed key of a row gets the weight of another allowed key of the same row."""
    allowed = allowed.expand_as(w)
    r = torch.rand(w.shape, generator=generator, dtype=torch.float64).to(w.device)
    big = torch.full_like(r, 2.0)
    pos = torch.arange(w.shape[-1], dtype=torch.float64, device=w.device).expand_as(r) / w.shape[-1]
    perm = torch.argsort(torch.where(allowed, r, big + pos), dim=-1, stable=True)  # allowed in random order first
    ident = torch.argsort(torch.where(allowed, pos, big + pos), dim=-1, stable=True)  # allowed in order first
    return w.scatter(-1, ident, w.gather(-1, perm))


def uniform_rows(w: Tensor, allowed: Tensor) -> Tensor:
    """Each row of ``w (..., Lk)`` replaced by the uniform distribution over its ``allowed`` keys (a row with none: 0)."""
    a = allowed.expand_as(w).to(w.dtype)
    return a / a.sum(-1, keepdim=True).clamp(min=1.0)


def _owner(point: str) -> str:
    """The attention module's name of a hook point's full name (``""`` for the model itself)."""
    return point.rsplit(".", 1)[0] if "." in point else ""


def _intervene(
    model: nn.Module, pattern: str, change: Callable[[Tensor, Tensor], Tensor]
) -> tuple[
    tuple[Callable[[str], bool], Callable[[Tensor, str], None]],
    tuple[Callable[[str], bool], Callable[[Tensor, str], Tensor]],
]:
    """The ``(names, fn)`` pairs for :func:`qkv.nn.hooked`: record which keys each layer allows (finite scores),
    then replace its weights by ``change(weights, allowed)``."""
    points = hook_points(model)
    layers = {_owner(n) for n in points if n.rsplit(".", 1)[-1] == "hook_weights"}
    chosen = {n for n in layers if fnmatch.fnmatchcase(n, pattern)}
    if not chosen:
        some = ", ".join(sorted(layers)[:4]) or "none: the model has no hookable attention"
        raise ValueError(f"pattern {pattern!r} matches no attention layer of the model; layers: {some}")
    allowed: dict[str, Tensor] = {}

    def is_point(kind: str) -> Callable[[str], bool]:
        return lambda n: n.rsplit(".", 1)[-1] == kind and _owner(n) in chosen

    def on_scores(s: Tensor, name: str) -> None:
        allowed[_owner(name)] = torch.isfinite(s)

    def on_weights(w: Tensor, name: str) -> Tensor:
        ok = allowed.pop(_owner(name), None)
        return change(w, w > 0 if ok is None else ok)

    return (is_point("hook_scores"), on_scores), (is_point("hook_weights"), on_weights)


@contextmanager
def permuted_attention(
    model: nn.Module, pattern: str = "*", generator: torch.Generator | None = None
) -> Iterator[None]:
    """While inside, the attention layers of ``model`` whose names match ``pattern`` (shell pattern on the
    module name, e.g. ``"dec.*.cross_attn"``) shuffle each query row's weights among its allowed keys.

    Raises:
        ValueError: ``pattern`` matches no layer with hook points.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    a, b = _intervene(model, pattern, lambda w, ok: permute_rows(w, ok, gen))
    with hooked(model, a, b):
        yield


@contextmanager
def uniform_attention(model: nn.Module, pattern: str = "*") -> Iterator[None]:
    """While inside, the matching attention layers (see :func:`permuted_attention`) attend uniformly to the keys
    each query may see."""
    a, b = _intervene(model, pattern, uniform_rows)
    with hooked(model, a, b):
        yield


def total_variation(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Total variation distance ``0.5 * sum |p - q|`` between the softmax distributions of two logits
    ``(..., V)``: ``(...)`` float64 in ``[0, 1]`` (Jain and Wallace's measure of output change)."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits must have one shape, got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    p = torch.softmax(logits_a.double(), -1)
    q = torch.softmax(logits_b.double(), -1)
    return 0.5 * (p - q).abs().sum(-1)

"""Masks from what a user has at hand: :func:`from_dense` (a bool tensor), :func:`from_fn` (a
FlexAttention ``mask_mod``), and :func:`as_mask`, which reads whatever ``mask=`` was given.

These masks have no formula: they classify their tiles by evaluating them (the default
:meth:`~qkv.masks.Mask.tile_bounds`), once per plan. A dense mask is keyed by its contents; a
``mask_mod`` by a fingerprint of everything it can read (:mod:`qkv.fingerprint`).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from ..fingerprint import Ref, fingerprint_or_none
from .base import Mask, MaskLike, MaskMod, Shape, _convert_operands_with, _tied_to_layout, tensor_key


class _Dense(Mask):
    def __init__(self, t: Tensor):
        self.t = t
        self.name = f"dense{tuple(t.shape)}"

    def _t4(self, device: torch.device) -> Tensor:
        t = self.t.to(device)
        while t.dim() < 4:
            t = t.unsqueeze(0)
        return t

    def check(self, s: Shape) -> None:
        want = (s.B, s.H, s.Lq, s.Lk)
        got = tuple(self.t.shape)
        if len(got) > 4 or any(g not in (1, w) for g, w in zip(reversed(got), reversed(want))):
            raise ValueError(f"mask of shape {got} does not broadcast to (B, H, Lq, Lk) = {want}")

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        t = self._t4(q.device)
        idx = [x if t.shape[i] > 1 else torch.zeros_like(x) for i, x in enumerate((b, h, q, k))]
        return t[idx[0], idx[1], idx[2], idx[3]]

    def tile(self, s: Shape, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        t = self._t4(s.device)
        t = t.expand(*t.shape[:2], s.Lq, s.Lk) if t.shape[-2:] != (s.Lq, s.Lk) else t
        return t[..., q0:q1, k0:k1]

    def to(self, device: torch.device | str) -> Mask:
        self.t = self.t.to(device)
        return self

    def shard_blocker(self) -> str | None:
        return _tied_to_layout(self)

    def cache_key(self) -> Hashable | None:
        t = tensor_key(self.t)
        return None if t is None else ("dense", t)


def from_dense(mask: Tensor) -> Mask:
    """A mask from a bool tensor broadcastable to ``(B, H, Lq, Lk)`` (True = may attend).

    An additive float mask is not a ``Mask``: pass it as ``score_mod=qkv.scores.bias(t)``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"from_dense: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}; pass an additive"
            " float mask as score_mod=qkv.scores.bias(tensor)"
        )
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dims (B, H, Lq, Lk), got shape {tuple(mask.shape)}")
    return _Dense(mask)


class _Fn(Mask):
    def __init__(self, fn: MaskMod, name: str, key: object = None):
        self.fn, self.name, self.key = fn, name, key

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = self.fn(b, h, q, k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"mask_mod {self.name} must return a bool tensor, got "
                f"{out.dtype if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out

    def shard_blocker(self) -> str | None:
        return None  # a mask_mod speaks global indices

    def _key(self) -> tuple[Hashable | None, str | None]:
        if self.key is None:
            k, why = fingerprint_or_none(self.fn)
            return (None, f"mask_mod {self.name}: {why}") if k is None else (("fn", k), None)
        # the user named what the function depends on: its code (or the callable itself) and that key
        code = getattr(self.fn, "__code__", None)
        k, why = fingerprint_or_none(self.key, max_bytes=None)
        if k is None:
            return None, f"mask_mod {self.name}: its key= cannot be keyed: {why}"
        return ("fn-key", code if code is not None else Ref(self.fn), k), None

    def cache_key(self) -> Hashable | None:
        return self._key()[0]

    def cache_blocker(self) -> str | None:
        return self._key()[1]


def from_fn(mask_mod: MaskMod, name: str | None = None, *, key: object = None) -> Mask:
    """A mask from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

    The function receives raw indices (no bottom-right shift) as broadcastable integer tensors and
    must be built from tensor operations (as FlexAttention requires). Tiles are classified by
    evaluating them, and that classification (the plan) is cached under a fingerprint of everything
    the function can read, so FlexAttention's idiom is safe: a ``mask_mod`` that reads the current
    batch's document ids from a tensor it closes over or names as a global may be passed again after
    the ids changed (in place, or the global or closure cell rebound), and the plan follows them.
    The fingerprint (:mod:`qkv.fingerprint`) covers the code, closure cells, defaults and the globals
    the code names, followed through functions it calls, ``functools.partial``, bound methods and
    objects, with tensors by contents; attributes of modules and ``nn.Module`` objects by the names the code
    spells. Where it meets state it cannot read (a ``torch.Generator``, ``globals()``, a tensor while
    ``torch.compile`` traces) the plan is built again on every call (:func:`qkv.explain` says so).

    Args:
        mask_mod: the function; ``mask_mod(b, h, q_idx, kv_idx)`` with ``b (B,1,1,1)``, ``h (1,H,1,1)``,
            ``q_idx (1,1,Lq,1)``, ``kv_idx (1,1,1,Lk)`` integer tensors (or scalars under FlexAttention's
            vmap) returns a bool tensor broadcastable to ``(B, H, Lq, Lk)``, True = may attend.
        name: shown by ``repr`` and :func:`qkv.explain` (default: the function's ``__name__``).
        key: for a function that reads state qkv cannot fingerprint: the values its answer depends on
            (a tensor, numbers, a tuple of them), keyed by contents like the function's own state. The
            fingerprint is then not taken: plans are cached per (the function's code, ``key``), so
            ``key`` must name everything the answer depends on. ``None`` (the default): fingerprint.

    >>> from qkv import masks
    >>> def every_other(b, h, q_idx, kv_idx):
    ...     return (q_idx - kv_idx) % 2 == 0
    >>> masks.from_fn(every_other).to_dense(Lq=3, Lk=3)[0, 0].int()
    tensor([[1, 0, 1],
            [0, 1, 0],
            [1, 0, 1]], dtype=torch.int32)
    """
    if not callable(mask_mod):
        raise TypeError(f"from_fn: mask_mod must be callable, got {type(mask_mod).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"from_fn: name must be a string, got {type(name).__name__}")
    return _Fn(mask_mod, name or str(getattr(mask_mod, "__name__", "mask_mod")), key)


def as_mask(mask: MaskLike | None) -> Mask | None:
    """Turn whatever a user passed as ``mask=`` into a :class:`Mask` (or ``None``)."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        return from_dense(mask)
    if callable(mask):
        return from_fn(mask)
    raise TypeError(
        "mask must be a qkv.masks.Mask, a bool tensor broadcastable to (B, H, Lq, Lk) or a "
        f"mask_mod(b, h, q_idx, kv_idx) function, got {type(mask).__name__}"
    )


_convert_operands_with(as_mask)  # `causal() & bool_tensor`, `causal() | mask_mod`: see base.py

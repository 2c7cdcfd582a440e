"""Masks: which (query, key) pairs may meet.

A :class:`Mask` is a small object around a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``
that returns ``True`` where query ``q_idx`` may attend to key ``kv_idx``. Masks compose with
``&``, ``|`` and ``~``::

    causal() & sliding_window(256)          # causal local attention
    document(ids) & causal()                # packed sequences
    ~padding(lengths) | global_tokens(4)    # anything goes

>>> import torch
>>> from qkv import masks
>>> (masks.document(torch.tensor([0, 0, 1])) & masks.causal()).to_dense(Lq=3, Lk=3)[0, 0].int()
tensor([[1, 0, 0],
        [1, 1, 0],
        [0, 0, 1]], dtype=torch.int32)

Alignment: when ``Lq != Lk`` query ``i`` stands at key position ``i + Lk - Lq`` (bottom-right
alignment, what decoding with a KV cache needs, and flash-attn's convention). Every named mask that
compares positions (``causal``, ``sliding_window``, ``prefix_lm``, ``dilated``, ``global_tokens``)
uses that aligned position; masks over ids (``document``, ``padding``, ``block_sparse``) use raw
indices.

Every mask also classifies a (query tile, key tile) pair as :data:`EMPTY`, :data:`FULL` or
:data:`PARTIAL` (:meth:`Mask.block_kinds`). Named masks answer from their formula or their data in
``O(tiles)`` work; custom masks (``from_fn``, ``from_dense``, a bare function) answer by evaluating the
tiles. The answer is conservative: a tile called ``FULL`` is full and a tile called ``EMPTY`` is empty,
while ``PARTIAL`` may occasionally be either. Backends skip empty tiles and apply no mask on full ones.

Internally each mask evaluates on broadcast index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``,
``q_idx (1,1,Lq,1)`` and ``kv_idx (1,1,1,Lk)`` (or on scalars, under FlexAttention's vmap), so a
mask never builds an ``Lq x Lk`` tensor unless asked to with :meth:`Mask.to_dense` or on one tile
with :meth:`Mask.tile`.

A mask of your own subclasses :class:`Mask` (or :class:`PositionalMask`); the contract of each method
is in :class:`Mask`'s docstring, and a worked example, a mask that holds data and classifies its tiles
from it, in the docs ("Masks and score mods", "Adding a mask").

The package, one concept per module: ``base`` (:class:`Mask`, its algebra, :class:`Shape`, the tile
kinds, :func:`tensor_key`), ``positional`` (``full``, ``causal``, ``sliding_window``, ``dilated``,
``global_tokens``, :class:`PositionalMask`), ``lengths`` (``padding``, ``left_padding``, ``prefix_lm``),
``documents`` (``document``, ``from_cu_seqlens``), ``blocks`` (``block_sparse``, ``random_blocks``),
``custom`` (``from_dense``, ``from_fn``, ``as_mask``). Import from ``qkv.masks``: the modules are the
layout, not the interface.
"""

from __future__ import annotations

from . import base as _base
from .base import Mask, Shape, tensor_key
from .blocks import block_sparse, random_blocks
from .custom import as_mask, from_dense, from_fn
from .documents import document, from_cu_seqlens
from .lengths import left_padding, padding, prefix_lm
from .positional import PositionalMask, causal, dilated, full, global_tokens, sliding_window

# The data names are bound here, where the reference reads their documentation (Sphinx reads the
# documentation of data from the module that assigns it); they are base's objects.
EMPTY: int = _base.EMPTY
"""Tile kind 0 (:meth:`Mask.block_kinds`): no (query, key) pair of the tile may attend; backends skip it."""
FULL: int = _base.FULL
"""Tile kind 1: every pair of the tile may attend; backends apply no mask on it."""
PARTIAL: int = _base.PARTIAL
"""Tile kind 2: some pairs may attend, or the mask could not tell (then it may be either); backends
evaluate the mask on it."""
MaskMod = _base.MaskMod
"""``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: PyTorch FlexAttention's convention."""
MaskLike = _base.MaskLike
"""What ``mask=`` accepts: a :class:`Mask`, a bool tensor broadcastable to ``(B, H, Lq, Lk)`` (True = may
attend), or a FlexAttention ``mask_mod`` (:data:`MaskMod`)."""

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Mask",
    "PositionalMask",
    "MaskLike",
    "MaskMod",
    "Shape",
    "as_mask",
    "block_sparse",
    "causal",
    "dilated",
    "document",
    "from_cu_seqlens",
    "from_dense",
    "from_fn",
    "full",
    "global_tokens",
    "left_padding",
    "padding",
    "prefix_lm",
    "random_blocks",
    "sliding_window",
    "tensor_key",
]

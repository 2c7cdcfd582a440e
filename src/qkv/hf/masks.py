"""The mask builder of ``attn_implementation="qkv"``: what Hugging Face knows about a mask, as a qkv ``Mask``.

``transformers`` builds every attention mask through one registered function per implementation
(``AttentionMaskInterface``; ``masking_utils.create_causal_mask`` and its siblings call it) with what it
knows: the batch size, the query and key lengths and their offsets in the sequence (a KV cache, a sliding
window cache), a ``mask_function`` (``causal_mask_function``, ``sliding_window_overlay(w)`` and
``bidirectional`` ones combined with ``and_masks``/``or_masks``, packed sequences found from
``position_ids``) and the 2-D padding ``attention_mask`` ``(B, kv_offset + kv_length)``. Its ``sdpa`` and
``eager`` builders turn all that into a dense ``(B, 1, Lq, Lk)`` tensor. :func:`build_mask` reads the
same arguments as structure instead:

* ``causal_mask_function`` -> :func:`~qkv.masks.causal`, ``sliding_window_overlay(w)`` ->
  :func:`~qkv.masks.sliding_window` ``(w - 1)``, ``sliding_window_bidirectional_overlay(w)`` ->
  ``sliding_window(w, w)``, ``bidirectional_mask_function`` -> no mask, ``and_masks``/``or_masks`` ->
  ``&``/``|``;
* packed sequences (``packed_sequence_mask_function`` with the positions remapped per sequence) ->
  :func:`~qkv.masks.document` of the sequence ids;
* the padding mask: rows whose real keys form one run ``[start, end)`` (left padding, right padding, or
  both) -> :func:`~qkv.masks.left_padding` ``(start) &`` :func:`~qkv.masks.padding` ``(end)``; rows with
  holes -> a ``document`` mask over per-key ids (real keys id 0, padding -1), still ``O(B · Lk)``.

HF's positions are absolute (query ``i`` stands at ``q_offset + i``, key ``j`` at ``kv_offset + j``);
qkv's positional masks align queries bottom-right (query ``i`` at key position ``i + Lk - Lq``). The two
agree whenever ``q_offset - kv_offset == Lk - Lq``, which holds for no cache, ``DynamicCache`` and its
sliding-window layers. Anything else (a static cache, whose keys include unwritten slots; a mask function
this module does not know, such as Llama 4's chunks or a model's own ``or_mask_function``) is kept as
HF's own function, evaluated on tiles as :func:`~qkv.masks.from_fn`, and the reason is in the mask's
name (``qkv.explain`` and :meth:`HFMask.describe` show it). Nothing builds ``Lq x Lk``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import masking_utils as mu

from ..masks import Mask, causal, document, from_fn, left_padding, padding, sliding_window

__all__ = ["HFMask", "build_mask"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFMask:
    """What :func:`build_mask` hands to the attention function through HF's ``attention_mask`` argument.

    Attributes:
        mask: the qkv mask of the layer's problem ``(B, H, q_length, kv_length)``; ``None`` when every
            query may see every key.
        q_length: the query length HF sized the mask for.
        kv_length: the key length HF sized the mask for (the keys the attention function receives).
        fallbacks: why parts of the mask are HF's own function evaluated on tiles rather than structure;
            empty when all of it is structure.
    """

    mask: Mask | None
    q_length: int
    kv_length: int
    fallbacks: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """The mask in words: its structure, and the reasons of any fallback."""
        what = "no mask (every query sees every key)" if self.mask is None else repr(self.mask)
        if self.fallbacks:
            what += "; fallback to HF's mask function on tiles: " + "; ".join(self.fallbacks)
        return f"{what} [Lq={self.q_length}, Lk={self.kv_length}]"

    def __repr__(self) -> str:
        return f"HFMask({self.describe()})"


class _Fallback(Exception):
    """A mask function (or part of one) that has no qkv structure; the message is the reason."""


def _cells(fn: Callable[..., Any]) -> dict[str, Any]:
    """The variables a closure captured, by name."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    return {} if code is None else {n: c.cell_contents for n, c in zip(code.co_freevars, cells)}


def _kind(fn: Callable[..., Any]) -> str:
    """``masking_utils``'s name for a mask function: the function itself or the factory of the closure."""
    if getattr(fn, "__module__", None) != mu.__name__:
        return ""
    qual = getattr(fn, "__qualname__", "")
    return qual.split(".<locals>.")[0] if ".<locals>." in qual else qual


@dataclass
class _Problem:
    """The layer's problem as HF sized it."""

    B: int
    Lq: int
    Lk: int
    q_offset: int
    kv_offset: int
    use_vmap: bool = False
    fallbacks: list[str] = field(default_factory=list)
    """The reasons of every part kept as HF's function (filled while translating)."""

    @property
    def aligned(self) -> bool:
        """Whether HF's absolute positions and qkv's bottom-right alignment agree on this problem."""
        return self.q_offset - self.kv_offset == self.Lk - self.Lq

    @property
    def unbounded(self) -> int:
        """A window side that never binds on this problem (qkv's ``sliding_window`` takes ints)."""
        return self.Lq + self.Lk


def _translate(fn: Callable[..., Any], p: _Problem) -> Mask | None:
    """The qkv mask of one of ``masking_utils``' mask functions (``None``: all pairs). Raises
    :class:`_Fallback` with the reason when it (or a part of it) has no qkv structure."""
    kind = _kind(fn)
    positional = {
        "causal_mask_function",
        "sliding_window_overlay",
        "sliding_window_bidirectional_overlay",
    }
    if kind in positional and not p.aligned:
        raise _Fallback(
            f"queries stand at q_offset - kv_offset = {p.q_offset - p.kv_offset} keys from the first key, not"
            f" Lk - Lq = {p.Lk - p.Lq} (a static cache): qkv's positional masks align bottom-right"
        )
    if fn is mu.causal_mask_function:
        return causal()
    if fn is mu.bidirectional_mask_function:
        return None
    cells = _cells(fn)
    if kind == "sliding_window_overlay":  # kv_idx > q_idx - w
        w = int(cells["sliding_window"])
        if w < 1:
            raise _Fallback(f"sliding_window_overlay({w}) lets no key in")
        return sliding_window(w - 1, p.unbounded)
    if kind == "sliding_window_bidirectional_overlay":  # |q_idx - kv_idx| <= w
        w = int(cells["sliding_window"])
        if w < 0:
            raise _Fallback(f"sliding_window_bidirectional_overlay({w}) lets no key in")
        return sliding_window(w, w)
    if kind == "packed_sequence_mask_function":
        return _packed(cells["packed_sequence_mask"], p)
    if kind == "padding_mask_function":
        return _padding(cells["padding_mask"], p)
    if kind == "and_masks":
        return _and(list(cells["mask_functions"]), p)
    if kind == "or_masks":
        parts = [_translate(f, p) for f in cells["mask_functions"]]
        if any(m is None for m in parts):
            return None
        out = parts[0]
        for m in parts[1:]:
            out = out | m  # type: ignore[operator]
        return out
    name = getattr(fn, "__qualname__", type(fn).__name__)
    raise _Fallback(f"mask function {name} has no qkv equivalent")


def _and(fns: list[Callable[..., Any]], p: _Problem) -> Mask | None:
    """``and_masks(...)``: the intersection, each known part as structure and each unknown part as HF's
    function on tiles. A part remapped to per-sequence positions (packed sequences) is the plain part when
    the same ``and`` holds the packed-sequence mask of those positions: within one sequence the positions
    step by one, so relative positions are unchanged, and pairs across sequences are cut by the ids."""
    packed = [_cells(f)["packed_sequence_mask"] for f in fns if _kind(f) == "packed_sequence_mask_function"]
    out: Mask | None = None
    for f in fns:
        if _kind(f) == "remap_positions_for_packed_sequence":
            c = _cells(f)
            ids = mu.find_packed_sequence_indices(c["position_ids"])
            ids = torch.zeros_like(c["position_ids"]) if ids is None else ids
            if not any(t.shape == ids.shape and torch.equal(t.to(ids.device), ids) for t in packed):
                raise _Fallback("positions remapped per sequence without the matching packed-sequence mask")
            part = _part(c["mask_function"], p)
        else:
            part = _part(f, p)
        if part is not None:
            out = part if out is None else out & part
    return out


def _part(fn: Callable[..., Any], p: _Problem) -> Mask | None:
    """One operand of an ``and``: its structure, or HF's function on tiles with the reason in its name."""
    try:
        return _translate(fn, p)
    except _Fallback as e:
        return _hf_function(fn, p, str(e))


def _hf_function(fn: Callable[..., Any], p: _Problem, reason: str) -> Mask:
    """HF's mask function as a qkv mask on absolute positions, evaluated tile by tile the way ``sdpa_mask``
    evaluates it whole (broadcast index tensors, or ``vmap`` when HF asked for it)."""
    q_off, kv_off = p.q_offset, p.kv_offset
    expand = getattr(mu, "_vmap_expansion_sdpa", None) if p.use_vmap else None

    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if expand is not None and all(t.dim() == 4 for t in (b, h, q, k)):
            # each index tensor varies along its own dim only: vmap over the four 1-D ranges
            with mu.TransformGetItemToIndex():
                out = expand(fn)(b.reshape(-1), h.reshape(-1), q.reshape(-1) + q_off, k.reshape(-1) + kv_off)
        else:
            out = fn(b, h, q + q_off, k + kv_off)
        if not isinstance(out, Tensor):
            out = torch.as_tensor(bool(out))
        return out.to(torch.bool)

    p.fallbacks.append(reason)
    log.info("qkv.hf: part of a mask falls back to HF's mask function on tiles: %s", reason)
    return from_fn(mod, name=f"hf_mask_function[{reason}]")


def _packed(ids: Tensor, p: _Problem) -> Mask:
    """``packed_sequence_mask_function(ids)``: ``ids[b, q_idx] == ids[b, kv_idx]`` on absolute positions."""
    ids = ids.long()
    if ids.dim() != 2 or ids.shape[1] < max(p.q_offset + p.Lq, p.kv_offset + p.Lk):
        raise _Fallback(f"packed-sequence ids of shape {tuple(ids.shape)} do not cover the problem")
    q_ids = ids[:, p.q_offset : p.q_offset + p.Lq]
    kv_ids = ids[:, p.kv_offset : p.kv_offset + p.Lk]
    return document(q_ids, kv_ids)


def _padding(pm: Tensor, p: _Problem) -> Mask | None:
    """The 2-D padding mask ``(B, >= kv_offset + kv_length)`` (True = a real key) on this layer's keys."""
    pm = pm.to(torch.bool)
    if pm.dim() != 2:
        raise ValueError(f"attention_mask: the 2-D padding mask must be (B, L), got shape {tuple(pm.shape)}")
    real = pm[:, p.kv_offset : p.kv_offset + p.Lk]
    if real.shape[1] < p.Lk:  # as prepare_padding_mask does: keys beyond the mask are padding
        real = torch.nn.functional.pad(real, (0, p.Lk - real.shape[1]), value=False)
    if bool(real.all()):
        return None
    Lk = p.Lk
    idx = torch.arange(Lk, device=real.device)
    seen = real.any(dim=1)
    start = torch.where(real, idx, Lk).amin(dim=1)
    end = torch.where(real, idx + 1, 0).amax(dim=1)
    start = torch.where(seen, start, torch.full_like(start, Lk))
    end = torch.where(seen, end, torch.full_like(end, Lk))
    one_run = bool((real.sum(dim=1) == (end - start).clamp(min=0)).all())
    if not one_run:  # holes: real keys id 0, padding -1, every query id 0
        kv_ids = torch.where(real, 0, -1).long()
        return document(torch.zeros(real.shape[0], p.Lq, dtype=torch.long, device=real.device), kv_ids)
    out: Mask | None = None
    if bool((start > 0).any()):
        out = left_padding(start.cpu())
    if bool((end < Lk).any()):
        right = padding(end.cpu())
        out = right if out is None else out & right
    return out


def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = mu.causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> HFMask:
    """The mask builder registered as ``AttentionMaskInterface["qkv"]``; HF passes its result to the
    attention function as ``attention_mask``.

    Args:
        batch_size: ``B``.
        q_length: queries of this forward, ``Lq``.
        kv_length: keys the attention function will receive, ``Lk``.
        q_offset: absolute position of query 0 (the tokens already in the cache).
        kv_offset: absolute position of key 0 (a sliding-window cache drops the oldest keys).
        mask_function: HF's ``mask_function(batch_idx, head_idx, q_idx, kv_idx)`` on absolute positions.
        attention_mask: the 2-D padding mask ``(B, N)`` (True/1 = a real token), ``N >= kv_offset`` + the
            keys it covers, or ``None``.
        **kwargs: what HF passes to every builder (``allow_is_causal_skip``, ``local_size``, ``dtype``,
            ``config``, ``use_vmap``, ``device``); the structure above makes them unnecessary.

    Returns:
        :class:`HFMask`: the qkv mask, the lengths it was built for, and the reasons of any fallback.
    """
    p = _Problem(
        int(batch_size), int(q_length), int(kv_length), int(q_offset), int(kv_offset), bool(kwargs.get("use_vmap"))
    )
    try:
        m = _translate(mask_function, p)
    except _Fallback as e:
        m = _hf_function(mask_function, p, str(e))
    if attention_mask is not None:
        pad = _padding(attention_mask, p)
        if pad is not None:
            m = pad if m is None else m & pad
    return HFMask(m, p.Lq, p.Lk, tuple(dict.fromkeys(p.fallbacks)))

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
this module does not know, such as Llama 4's chunks or a model's own ``or_mask_function``; a closure
whose variables are not the ones this module reads, as a later ``transformers`` may rename them) is kept
as HF's own function, evaluated on tiles as :func:`~qkv.masks.from_fn`, and the reason is in the mask's
name (``qkv.explain`` shows it on its ``mask:`` line, :meth:`HFMask.describe` too). Every read of a
closure goes through :func:`_cell`, which turns a missing variable or an unexpected type into that
fallback, never into an exception.

What the builder returns is a :class:`HFMask`: a ``torch.Tensor`` with the shape, dtype and device of
the mask HF's own ``eager`` builder returns for the same call (``(B, 1, Lq, Lk)``, additive, the
model's dtype), holding no data. The ``"qkv"`` attention function reads the qkv mask it carries; a model
whose own code reads the mask (a sparse-attention indexer, a dynamic mask, a concatenated sink block)
gets, at its first torch operation on it, exactly the tensor HF's ``eager`` builder returns, made by
calling that builder with the same arguments. Where HF's builder returns ``None`` (a bidirectional mask
with nothing to mask), so does this one. Nothing of ``Lq x Lk`` is built unless the model touches it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from transformers import masking_utils as mu

from ..masks import Mask, causal, document, from_fn, left_padding, padding, sliding_window

__all__ = ["HFMask", "build_mask"]

log = logging.getLogger(__name__)

HF_BUILDER = "eager"
"""The HF builder whose result a model that reads its mask gets: ``eager``'s additive mask, which every
model takes (``eager`` is the implementation every ``transformers`` model has), never ``None`` for a
causal mask."""


def _meta_shape(shape: torch.Size, index: Any) -> torch.Size | None:
    """The shape ``t[index]`` would have for a tensor of ``shape`` (on the meta device: no data), or
    ``None`` when the index is not made of plain slices and ``...`` only."""
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if it is Ellipsis:
            continue
        if not isinstance(it, slice) or it.step not in (None, 1) or it.start not in (None, 0):
            return None
        if it.stop is not None and not isinstance(it.stop, int):
            return None
    try:
        return torch.empty(shape, device="meta")[index].shape
    except (IndexError, TypeError, RuntimeError):
        return None


class HFMask(Tensor):
    """What :func:`build_mask` returns to HF: a tensor that stands for HF's mask and carries qkv's.

    To the model it is the ``(B, 1, Lq, Lk)`` mask HF's builder would have made (``.shape``, ``.dtype``,
    ``.device``, ``.dim()`` answer from metadata); any torch operation on it computes, once, that exact
    tensor (the ``dense`` function: HF's own builder called with the builder's arguments) and runs on
    it, so the result is a plain tensor. Slicing that keeps every element (``mask[:, :, :, :Lk]``) and a
    ``.to()`` that changes nothing return the mask itself. The ``"qkv"`` attention function reads
    :attr:`mask` and builds nothing.

    Args:
        mask: the qkv mask of the layer's problem ``(B, H, q_length, kv_length)``; ``None`` when every
            query may see every key.
        q_length: the query length HF sized the mask for.
        kv_length: the key length HF sized the mask for (the keys the attention function receives).
        fallbacks: why parts of the mask are HF's own function evaluated on tiles rather than structure;
            empty when all of it is structure.
        batch_size: ``B`` of the tensor it stands for (1: broadcast over the batch).
        dtype: its dtype: ``torch.bool`` (True = may attend) or a floating dtype (additive: 0 where a
            pair may meet, the dtype's most negative value where not).
        device: its device.
        dense: a function returning the tensor it stands for, ``(batch_size, 1, q_length, kv_length)``
            of ``dtype``; by default made from ``mask`` (for masks built by hand).
    """

    mask: Mask | None
    q_length: int
    kv_length: int
    fallbacks: tuple[str, ...]
    _dense_fn: Callable[[], Tensor]
    _dense: Tensor | None

    @staticmethod
    def __new__(
        cls,
        mask: Mask | None,
        q_length: int,
        kv_length: int,
        fallbacks: tuple[str, ...] = (),
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.bool,
        device: torch.device | str | None = None,
        dense: Callable[[], Tensor] | None = None,
    ) -> HFMask:
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"HFMask: mask must be a qkv.masks.Mask or None, got {type(mask).__name__}")
        if dtype != torch.bool and not dtype.is_floating_point:
            raise TypeError(f"HFMask: dtype must be torch.bool or a floating dtype, got {dtype}")
        shape = (int(batch_size), 1, int(q_length), int(kv_length))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        t = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=dev)  # type: ignore[attr-defined]
        t.mask, t.q_length, t.kv_length, t.fallbacks = mask, shape[2], shape[3], tuple(fallbacks)
        t._dense_fn = dense if dense is not None else t._from_structure
        t._dense = None
        return t  # type: ignore[no-any-return]

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the fields are set in __new__
        super().__init__()

    def _from_structure(self) -> Tensor:
        B, _, Lq, Lk = self.shape
        keep = (
            torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=self.device)
            if self.mask is None
            else self.mask.to_dense(B, 1, Lq, Lk, device=self.device)
        )
        keep = keep.expand(B, 1, Lq, Lk)
        if self.dtype == torch.bool:
            return keep
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(keep, zero, torch.finfo(self.dtype).min)

    def dense(self) -> Tensor:
        """The tensor this mask stands for (HF's own builder's result), computed once, plain."""
        if self._dense is None:
            out = self._dense_fn()
            if not isinstance(out, Tensor) or out.shape != self.shape or out.dtype != self.dtype:
                got = f"{type(out).__name__} {tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else repr(out)
                raise RuntimeError(
                    f"qkv.hf: HF's mask builder returned {got} where the mask it stands for was sized"
                    f" {tuple(self.shape)} {self.dtype}; this transformers release builds masks differently"
                )
            self._dense = out
        return self._dense

    def describe(self) -> str:
        """The mask in words: its structure, and the reasons of any fallback."""
        what = "no mask (every query sees every key)" if self.mask is None else repr(self.mask)
        if self.fallbacks:
            what += "; fallback to HF's mask function on tiles: " + "; ".join(self.fallbacks)
        return f"{what} [Lq={self.q_length}, Lk={self.kv_length}]"

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"HFMask({self.describe()}, standing for {tuple(self.shape)} {self.dtype})"

    def __reduce_ex__(self, proto: Any) -> Any:  # pickling (and deepcopy of what holds it): the tensor itself
        return (_plain, (self.dense(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> HFMask:
        new = HFMask(
            self.mask,
            self.q_length,
            self.kv_length,
            self.fallbacks,
            batch_size=self.shape[0],
            dtype=self.dtype,
            device=self.device,
            dense=self._dense_fn,
        )
        new._dense = self._dense
        memo[id(self)] = new
        return new

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if args and isinstance(args[0], HFMask):
            self = args[0]
            if func is Tensor.__getitem__ and len(args) == 2 and _meta_shape(self.shape, args[1]) == self.shape:
                return self  # a slice that keeps everything (HF's eager/sdpa slice to the keys)
            if func is Tensor.to and not any(isinstance(a, Tensor) for a in (*args[1:], *kwargs.values())):
                probe = torch.empty((), dtype=self.dtype, device="meta" if self.device.type == "meta" else self.device)
                try:
                    moved = probe.to(*args[1:], **kwargs)
                except (TypeError, RuntimeError):
                    moved = None
                if moved is not None and moved.dtype == self.dtype and moved.device == self.device:
                    if not kwargs.get("copy", False):
                        return self
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        def plain(x: Any) -> Any:
            return x.dense() if isinstance(x, HFMask) else x

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


def _plain(t: Tensor) -> Tensor:
    return t


class _Fallback(Exception):
    """A mask function (or part of one) that has no qkv structure; the message is the reason."""


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _cell(fn: Callable[..., Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """The variable ``name`` that HF's closure ``fn`` captured, checked to be a ``kind``.

    The only place this module reads inside HF's closures: a variable that is missing (renamed in a later
    ``transformers``), a closure cell that is empty, or a value of another type raises :class:`_Fallback`
    with the reason, so the part becomes HF's own function on tiles instead of an error."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    names = tuple(getattr(code, "co_freevars", ()))
    if name not in names or len(cells) != len(names):
        have = ", ".join(names) or "nothing"
        raise _Fallback(
            f"{_name(fn)} does not capture {name!r} (it captures {have}): a transformers release this"
            " bridge does not know"
        )
    try:
        value = cells[names.index(name)].cell_contents
    except ValueError:  # an empty cell
        raise _Fallback(f"{_name(fn)}'s {name!r} is not set yet") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Fallback(f"{_name(fn)}'s {name!r} is a {type(value).__name__}, not a {want}")
    return value


def _kind(fn: Callable[..., Any]) -> str:
    """``masking_utils``'s name for a mask function: the function itself or the factory of the closure."""
    if getattr(fn, "__module__", None) != mu.__name__:
        return ""
    qual = getattr(fn, "__qualname__", "")
    return qual.split(".<locals>.")[0] if ".<locals>." in qual else qual


def _hf(name: str) -> Any:
    """A function of ``masking_utils`` by name, or ``None`` when this release has none by that name."""
    return getattr(mu, name, None)


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


_POSITIONAL = ("causal_mask_function", "sliding_window_overlay", "sliding_window_bidirectional_overlay")


def _translate(fn: Callable[..., Any], p: _Problem) -> Mask | None:
    """The qkv mask of one of ``masking_utils``' mask functions (``None``: all pairs). Raises
    :class:`_Fallback` with the reason when it (or a part of it) has no qkv structure."""
    kind = _kind(fn)
    if kind in _POSITIONAL and not p.aligned:
        raise _Fallback(
            f"queries stand at q_offset - kv_offset = {p.q_offset - p.kv_offset} keys from the first key, not"
            f" Lk - Lq = {p.Lk - p.Lq} (a static cache): qkv's positional masks align bottom-right"
        )
    if kind == "causal_mask_function" and fn is _hf("causal_mask_function"):
        return causal()
    if kind == "bidirectional_mask_function" and fn is _hf("bidirectional_mask_function"):
        return None
    if kind == "sliding_window_overlay":  # kv_idx > q_idx - w
        w = _cell(fn, "sliding_window", int)
        if w < 1:
            raise _Fallback(f"sliding_window_overlay({w}) lets no key in")
        return sliding_window(w - 1, p.unbounded)
    if kind == "sliding_window_bidirectional_overlay":  # |q_idx - kv_idx| <= w
        w = _cell(fn, "sliding_window", int)
        if w < 0:
            raise _Fallback(f"sliding_window_bidirectional_overlay({w}) lets no key in")
        return sliding_window(w, w)
    if kind == "packed_sequence_mask_function":
        return _packed(_cell(fn, "packed_sequence_mask", Tensor), p)
    if kind == "padding_mask_function":
        pm = _cell(fn, "padding_mask", Tensor)
        if pm.dim() != 2:
            raise _Fallback(f"a padding mask of shape {tuple(pm.shape)}, not (B, L)")
        return _padding(pm, p)
    if kind == "and_masks":
        return _and(list(_cell(fn, "mask_functions", tuple)), p)
    if kind == "or_masks":
        out: Mask | None = None
        for f in _cell(fn, "mask_functions", tuple):
            part = _part(f, p)
            if part is None:  # one operand lets every pair in: so does the union
                return None
            out = part if out is None else out | part
        if out is None:
            raise _Fallback("or_masks() of no mask function")
        return out
    raise _Fallback(f"mask function {_name(fn)} has no qkv equivalent")


def _and(fns: list[Callable[..., Any]], p: _Problem) -> Mask | None:
    """``and_masks(...)``: the intersection, each known part as structure and each unknown part as HF's
    function on tiles. A part remapped to per-sequence positions (packed sequences) is the plain part when
    the same ``and`` holds the packed-sequence mask of those positions: within one sequence the positions
    step by one, so relative positions are unchanged, and pairs across sequences are cut by the ids."""
    packed = [_cell(f, "packed_sequence_mask", Tensor) for f in fns if _kind(f) == "packed_sequence_mask_function"]
    out: Mask | None = None
    for f in fns:
        if _kind(f) == "remap_positions_for_packed_sequence":
            part = _remapped(f, packed, p)
        else:
            part = _part(f, p)
        if part is not None:
            out = part if out is None else out & part
    return out


def _remapped(f: Callable[..., Any], packed: list[Tensor], p: _Problem) -> Mask | None:
    """``remap_positions_for_packed_sequence(fn, position_ids)`` inside an ``and`` with ``packed``."""
    try:
        position_ids = _cell(f, "position_ids", Tensor)
        inner = _cell(f, "mask_function", object)
        find = _hf("find_packed_sequence_indices")
        if find is None:
            raise _Fallback("masking_utils has no find_packed_sequence_indices in this release")
        ids = find(position_ids)
        ids = torch.zeros_like(position_ids) if ids is None else ids
        if not any(t.shape == ids.shape and torch.equal(t.to(ids.device), ids) for t in packed):
            raise _Fallback("positions remapped per sequence without the matching packed-sequence mask")
    except _Fallback as e:
        return _hf_function(f, p, str(e))
    return _part(inner, p)


def _part(fn: Callable[..., Any], p: _Problem) -> Mask | None:
    """One operand of an ``and``/``or``: its structure, or HF's function on tiles with the reason in its name."""
    try:
        return _translate(fn, p)
    except _Fallback as e:
        return _hf_function(fn, p, str(e))


def _hf_function(fn: Callable[..., Any], p: _Problem, reason: str) -> Mask:
    """HF's mask function as a qkv mask on absolute positions, evaluated tile by tile the way ``sdpa_mask``
    evaluates it whole (broadcast index tensors, or ``vmap`` when HF asked for it)."""
    q_off, kv_off = p.q_offset, p.kv_offset
    expand = _hf("_vmap_expansion_sdpa") if p.use_vmap else None
    to_index = _hf("TransformGetItemToIndex")

    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if expand is not None and to_index is not None and all(t.dim() == 4 for t in (b, h, q, k)):
            # each index tensor varies along its own dim only: vmap over the four 1-D ranges
            with to_index():
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


def _hf_builder() -> Callable[..., Tensor | None]:
    """HF's own builder whose result :class:`HFMask` stands for (``eager``'s)."""
    return mu.ALL_MASK_ATTENTION_FUNCTIONS[HF_BUILDER]  # type: ignore[no-any-return]


def _hf_skips(attention_mask: Tensor | None, p: _Problem, kwargs: dict[str, Any]) -> bool | None:
    """Whether HF's ``eager`` builder returns ``None`` for this call (a bidirectional mask with no padding
    and no local window), read from the padding mask alone as HF does; ``None`` when this release has no
    such test (then the builder is run to see)."""
    if not kwargs.get("allow_is_bidirectional_skip", False):
        return False
    test, prepare = _hf("_ignore_bidirectional_mask_sdpa"), _hf("prepare_padding_mask")
    if test is None or prepare is None:
        return None
    try:
        pm = prepare(attention_mask, p.Lk, p.kv_offset)
        return bool(test(pm, p.Lk, kwargs.get("local_size")))
    except TypeError:  # another signature in this release
        return None


def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> HFMask | None:
    """The mask builder registered as ``AttentionMaskInterface["qkv"]``; HF passes its result to the
    attention function as ``attention_mask``.

    Args:
        batch_size: ``B``.
        q_length: queries of this forward, ``Lq``.
        kv_length: keys the attention function will receive, ``Lk``.
        q_offset: absolute position of query 0 (the tokens already in the cache).
        kv_offset: absolute position of key 0 (a sliding-window cache drops the oldest keys).
        mask_function: HF's ``mask_function(batch_idx, head_idx, q_idx, kv_idx)`` on absolute positions
            (default: ``causal_mask_function``).
        attention_mask: the 2-D padding mask ``(B, N)`` (True/1 = a real token), ``N >= kv_offset`` + the
            keys it covers, or ``None``.
        **kwargs: what HF passes to every builder (``allow_is_causal_skip``, ``allow_is_bidirectional_skip``,
            ``local_size``, ``dtype``, ``config``, ``use_vmap``, ``device``): passed on unchanged to HF's
            builder when the model reads the mask; ``dtype`` and ``device`` size the :class:`HFMask`.

    Returns:
        :class:`HFMask` (the qkv mask, standing for HF's ``eager`` mask of the same call), or ``None``
        where HF's ``eager`` builder returns ``None``.
    """
    if mask_function is None:
        mask_function = _hf("causal_mask_function")
    args = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )
    p = _Problem(
        int(batch_size), int(q_length), int(kv_length), int(q_offset), int(kv_offset), bool(kwargs.get("use_vmap"))
    )
    dense: Tensor | None = None
    skip = _hf_skips(attention_mask, p, kwargs)
    if skip is None:  # this release's test is unknown: HF's builder decides (and its result is kept)
        dense = _hf_builder()(**args)
        skip = dense is None
    if skip:
        return None
    try:
        m = _translate(mask_function, p)
    except _Fallback as e:
        m = _hf_function(mask_function, p, str(e))
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: the 2-D padding mask must be (B, L), got shape {tuple(attention_mask.shape)}")
        pad = _padding(attention_mask, p)
        if pad is not None:
            m = pad if m is None else m & pad
    dtype = kwargs.get("dtype") or torch.float32
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else "cpu")

    def hf_dense() -> Tensor:
        out = _hf_builder()(**args)
        if out is None:  # HF would have skipped the mask: every pair may meet
            out = torch.zeros(p.B, 1, p.Lq, p.Lk, dtype=dtype, device=device)
        return out  # type: ignore[no-any-return]

    out = HFMask(
        m, p.Lq, p.Lk, tuple(dict.fromkeys(p.fallbacks)), batch_size=p.B, dtype=dtype, device=device, dense=hf_dense
    )
    if dense is not None:
        out._dense = dense
    return out

"""Capture every attention layer's weights from one forward pass of any model.

:func:`capture` works on three kinds of model, found by looking at the model:

- qkv models (any tree of :class:`qkv.nn.AttentionModule`): through :func:`qkv.nn.capture_weights`, a hook on
  each layer's ``hook_weights`` point (the layer asks its backend for the weights while it is hooked);
- any module tree that contains ``torch.nn.MultiheadAttention`` (``nn.Transformer*`` layers included): each
  such module is called with ``need_weights=True, average_attn_weights=False`` and PyTorch's fused fast path
  is switched off for the pass;
- Hugging Face ``transformers`` models: run with ``output_attentions=True, return_dict=True``. Models whose attention
  layers call HF's attention interface (``model.is_backend_compatible()``) run the pass on ``attn_implementation="qkv"``
  (:mod:`qkv.hf`: qkv's weights on demand, the mask as structure); other models are switched to ``eager`` for the pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.base import AttentionModule, capture_weights

__all__ = ["AttentionMaps", "capture"]


@dataclass
class AttentionMaps:
    """The attention weights of one forward pass.

    Attributes:
        weights: one tensor ``(B, H, Lq, Lk)`` per attention layer, in forward order (float, on the CPU).
        names: each layer's name (its module path, or ``attentions.i`` for Hugging Face outputs).
        tokens: per batch row, the token strings aligned with the key positions (padding included), or None.
        attention_mask: ``(B, L)`` bool, True at real tokens, when the model was given one; else None.
        output: what the model returned.
    """

    weights: list[Tensor]
    names: list[str]
    tokens: list[list[str]] | None = None
    attention_mask: Tensor | None = None
    output: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def num_heads(self) -> list[int]:
        """Heads of each layer."""
        return [w.shape[1] for w in self.weights]

    def stack(self) -> Tensor:
        """All layers as one tensor ``(layers, B, H, Lq, Lk)``; the layers must share their shape."""
        shapes = {tuple(w.shape) for w in self.weights}
        if len(shapes) != 1:
            raise ValueError(f"layers have different shapes {sorted(shapes)}; cannot stack them")
        return torch.stack(self.weights)

    def valid(self, b: int | None = None) -> Tensor | None:
        """The real-token mask ``(B, L)`` (or row ``b``'s ``(L,)``), None when there was no padding."""
        if self.attention_mask is None:
            return None
        return self.attention_mask if b is None else self.attention_mask[b]


def _is_hf(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


_MHA_SIG = inspect.signature(nn.MultiheadAttention.forward)


def _bind_args(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def capture(
    model: nn.Module, *args: Any, tokens: Sequence[Sequence[str]] | None = None, **kwargs: Any
) -> AttentionMaps:
    """Run ``model(*args, **kwargs)`` once under ``torch.no_grad()`` and record every attention layer's weights.

    Args:
        model: a qkv model, a module tree with ``torch.nn.MultiheadAttention`` layers, or a Hugging Face model.
        *args: the model's positional inputs, passed through unchanged.
        **kwargs: the model's keyword inputs, passed through unchanged (for Hugging Face models
            ``output_attentions=True, return_dict=True`` are added).
        tokens: the token strings of each batch row (not passed to the model). When omitted and the model
            has a ``tokenizer`` with ``convert_ids_to_tokens`` (as :class:`qkv.models.BertEncoder` has), they
            are read from the ``input_ids`` argument.

    Returns:
        :class:`AttentionMaps` with one ``(B, H, Lq, Lk)`` tensor per layer, in forward order. The model's
        ``attention_mask`` argument, when given, is kept as ``maps.attention_mask``.

    Raises:
        ValueError: the model has no attention layer that can be captured, or returned no weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bound = _bind_args(model, args, kwargs)
    if _is_hf(model):
        names, weights, out = _capture_hf(model, args, kwargs)
    else:
        names, weights, out = _capture_modules(model, args, kwargs)
    if not weights:
        raise ValueError(
            f"{type(model).__name__} has no attention layer that capture() can read "
            "(qkv AttentionModule, torch.nn.MultiheadAttention, or a Hugging Face model)"
        )
    am = bound.get("attention_mask")
    mask = am.detach().bool().cpu() if isinstance(am, Tensor) and am.dim() == 2 else None
    toks: list[list[str]] | None = [list(t) for t in tokens] if tokens is not None else None
    ids = bound.get("input_ids")
    tok = getattr(model, "tokenizer", None)
    if toks is None and isinstance(ids, Tensor) and ids.dim() == 2 and hasattr(tok, "convert_ids_to_tokens"):
        toks = [list(tok.convert_ids_to_tokens(row)) for row in ids]  # type: ignore[union-attr]
    return AttentionMaps(weights=weights, names=names, tokens=toks, attention_mask=mask, output=out)


def _weights_implementation(model: nn.Module, current: str | None) -> str | None:
    """The attention implementation that returns weights for ``model``: the current one when it does (``eager``, a
    ``qkv.hf`` one), ``"qkv"`` when the model's layers call HF's attention interface, ``"eager"`` otherwise."""
    compatible = getattr(model, "is_backend_compatible", None)
    if callable(compatible) and compatible():
        from ..hf import is_qkv, register

        return current if is_qkv(current) else register()
    return current if current in (None, "eager") else "eager"


def _capture_hf(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[str], list[Tensor], Any]:
    cfg = getattr(model, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    target = _weights_implementation(model, before)
    switch = target != before and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation(target)  # type: ignore[operator]
    try:
        with torch.no_grad():
            out = model(*args, **{**kwargs, "output_attentions": True, "return_dict": True})
    finally:
        if switch:
            model.set_attn_implementation(before)  # type: ignore[operator]
    names: list[str] = []
    weights: list[Tensor] = []
    for key in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        got = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        for i, w in enumerate(got or ()):
            if isinstance(w, Tensor):
                names.append(f"{key}.{i}")
                weights.append(w.detach().float().cpu())
    return names, weights, out


def _capture_modules(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[str], list[Tensor], Any]:
    mhas = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    has_qkv = any(isinstance(m, AttentionModule) for m in model.modules())
    if not mhas and not has_qkv:
        return [], [], None
    handles = []
    fast = torch.backends.mha.get_fastpath_enabled()
    asked: list[tuple[bool, bool]] = []  # what each pending MultiheadAttention call asked for
    with capture_weights(model) as sink:  # qkv layers through their hook_weights; also turns on no_grad
        for name, m in mhas:
            handles.append(m.register_forward_pre_hook(_force_weights(asked), with_kwargs=True))
            handles.append(m.register_forward_hook(_make_sink(sink, name, asked)))
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            out = model(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
            for h in handles:
                h.remove()
    return [n for n, _ in sink], [w.float().cpu() for _, w in sink], out


def _force_weights(asked: list[tuple[bool, bool]]) -> Any:
    """A pre-hook: call with per-head weights; remember what the caller asked for, so the output it gets
    is unchanged."""

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        b = _MHA_SIG.bind(module, *args, **kwargs)
        b.apply_defaults()
        asked.append((bool(b.arguments["need_weights"]), bool(b.arguments["average_attn_weights"])))
        b.arguments["need_weights"] = True
        b.arguments["average_attn_weights"] = False
        return tuple(b.args[1:]), dict(b.kwargs)

    return hook


def _make_sink(sink: list[tuple[str, Tensor]], name: str, asked: list[tuple[bool, bool]]) -> Any:
    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        need, average = asked.pop()
        w = out[1]
        if not isinstance(w, Tensor):
            return None
        sink.append((name, (w if w.dim() == 4 else w.unsqueeze(0)).detach()))
        if not need:
            return out[0], None
        return out[0], (w.mean(dim=-3) if average else w)

    return hook

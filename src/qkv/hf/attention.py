"""The attention function of ``attn_implementation="qkv"``: a Hugging Face attention layer's call, on
:func:`qkv.attention`.

HF's attention modules call ``attention_interface(module, query, key, value, attention_mask, dropout=,
scaling=, **kwargs)`` with ``query (B, H, Lq, D)``, ``key``/``value (B, Hkv, Lk, D)`` (fewer K/V heads
under grouped-query attention, never repeated here) and expect ``(output (B, Lq, H, Dv), weights or
None)``. The mask arrives as what the registered builder returned (:class:`~qkv.hf.masks.HFMask`), so no
dense mask exists; a model that hands over a tensor instead (a user's 4-D mask) gets it as a dense mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import output_capturing as _output_capturing

from ..attention import attention
from ..masks import Mask, causal, from_dense, sliding_window
from ..scores import ScoreMod, bias
from ..scores import softcap as softcap_score
from .masks import HFMask

__all__ = ["attention_forward", "sinks_to_qkv", "wants_weights"]


def sinks_to_qkv(s_aux: Tensor) -> dict[str, Any]:
    """The keyword arguments of :func:`qkv.attention` that carry HF's attention sinks ``s_aux``: one logit
    per query head that takes part in the softmax and is dropped from the output (GPT-OSS's eager
    attention concatenates it to the scores and drops its column), which is what ``sinks=`` means."""
    return {"sinks": s_aux}


def wants_weights(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether HF asked this forward for attention weights: ``output_attentions`` when the model passed it
    down to the layer, else whether HF's output recorder (``transformers.utils.output_capturing``, which
    reads the weights from the attention modules' outputs) is collecting attentions for this call, else
    the model config's ``output_attentions``."""
    asked = kwargs.get("output_attentions")
    if asked is not None:
        return bool(asked)
    collector = getattr(_output_capturing, "_active_collector", None)
    collecting = collector.get() if collector is not None and hasattr(collector, "get") else None
    if isinstance(collecting, dict):
        return any(str(key).endswith("attentions") for key in collecting)
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


_REFUSED = {
    "position_bias": "a T5-style additive position bias",
    "block_indices": "a block-sparse indexer's selection, MiniMax-M3's",
    "sinks": "per-token attention sinks; per-head sinks come as s_aux",
}
"""Arguments some HF models pass that would change the answer and are not mapped: refused, not ignored."""


def _mask_from_tensor(t: Tensor, query: Tensor, Lk: int) -> tuple[Mask | None, ScoreMod | None]:
    """A 4-D mask tensor a model passed instead of the builder's result (a mask it edited, sliced or made
    itself): bool (True = may attend) as a dense mask; an additive float mask as a mask when it only holds
    0 and very negative values (what HF's eager builder makes), else as a bias. Key columns beyond the
    layer's ``Lk`` are dropped, as HF's eager and sdpa functions do."""
    if t.dim() != 4:
        raise ValueError(
            f"attention_mask: the qkv attention function takes the mask its builder made or a 4-D tensor"
            f" (B|1, 1|H, Lq, Lk), got shape {tuple(t.shape)}"
        )
    if t.shape[-1] > Lk:
        t = t[..., :Lk]
    if t.dtype == torch.bool:
        return from_dense(t), None
    if not t.dtype.is_floating_point:
        raise TypeError(f"attention_mask: a mask tensor must be bool or an additive float, got dtype {t.dtype}")
    keep = t > torch.finfo(t.dtype).min / 2
    if bool((t[keep] == 0).all()):
        return from_dense(keep), None
    return None, bias(t.to(query.dtype))


def _selected(indices: Tensor, query: Tensor, Lk: int) -> Mask:
    """The keys a sparse-attention indexer selected (DeepSeek-V3.2's DSA and its kin): ``indices``
    ``(B, Lq, topk)`` or ``(B, H|1, Lq, topk)`` of key positions, ``-1`` for none, as the model hands its
    non-eager implementations (eager and sdpa get the same selection folded into the mask)."""
    B, H, Lq = query.shape[0], query.shape[1], query.shape[2]
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    if indices.dim() != 4 or indices.shape[0] != B or indices.shape[1] not in (1, H) or indices.shape[2] != Lq:
        raise ValueError(
            f"indices: the selected keys must be (B, Lq, topk) or (B, H|1, Lq, topk) for query"
            f" {tuple(query.shape)}, got shape {tuple(indices.shape)}"
        )
    idx = indices.long()
    idx = torch.where((idx < 0) | (idx >= Lk), Lk, idx)  # -1 (none) lands in a column that is dropped
    sel = torch.zeros(*idx.shape[:3], Lk + 1, dtype=torch.bool, device=query.device)
    sel.scatter_(-1, idx.to(query.device), True)
    return from_dense(sel[..., :Lk])


def _mask_without_builder(module: nn.Module, is_causal: bool | None, window: int | None) -> Mask | None:
    """No mask from the builder: the module's own causality and window (flash-attn's convention for HF's
    ``sliding_window`` argument: ``window - 1`` keys back, and forward too when not causal)."""
    causal_ = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    if window is not None:
        w = int(window) - 1
        return causal() & sliding_window(w) if causal_ else sliding_window(w, w)
    return causal() if causal_ else None


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: HFMask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    s_aux: Tensor | None = None,
    *,
    backend: str = "auto",
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """One HF attention layer on :func:`qkv.attention`.

    Args:
        module: the calling attention module (read: ``training``, ``is_causal``, ``config.output_attentions``).
        query: ``(B, H, Lq, D)``.
        key: ``(B, Hkv, Lk, D)``, ``H % Hkv == 0``.
        value: ``(B, Hkv, Lk, Dv)``.
        attention_mask: what the ``"qkv"`` mask builder returned (:class:`~qkv.hf.masks.HFMask`), a 4-D
            mask tensor, or ``None`` (the module's causality and ``sliding_window`` decide).
        dropout: dropout on the weights, applied while ``module.training``.
        scaling: multiplies ``q kᵀ`` (HF passes ``head_dim ** -0.5`` or the model's own).
        is_causal: overrides ``module.is_causal`` when there is no mask from the builder.
        softcap: logit soft-capping (Gemma 2): ``softcap * tanh(score / softcap)`` before the mask.
        sliding_window: used only when there is no mask from the builder (the builder's mask holds it).
        s_aux: attention sinks; see :func:`sinks_to_qkv`.
        backend: the qkv backend (``"auto"`` unless registered otherwise).
        options: backend options for :func:`qkv.attention` (``block_q``, ``block_k``).
        **kwargs: HF's other arguments. ``output_attentions`` asks for the weights; ``indices`` (the keys a
            sparse-attention indexer selected per query, ``(B, Lq, topk)``: DeepSeek-V3.2 and its kin hand
            them to every implementation but eager and sdpa) narrows the mask to those keys.
            ``position_bias``, ``block_indices`` and per-token ``sinks`` are refused (not mapped yet: an
            error, not a different answer); the rest (positions, cache flags, flash-attn's varlen lengths,
            which the builder's mask already holds) are ignored.

    Returns:
        ``(out (B, Lq, H, Dv), weights (B, H, Lq, Lk) or None)``, in ``query``'s dtype. The weights are the
        softmax before dropout; a query row that may see no key (a left-padded position) gets zero output
        and zero weights, where HF's ``eager`` spreads it evenly over every key.
    """
    extra: dict[str, Any] = dict(options or {})
    if s_aux is not None:
        extra.update(sinks_to_qkv(s_aux))
    for name, what in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the qkv attention function does not take {name} ({what}) yet")
    Lq, Lk = query.shape[2], key.shape[2]
    score_mod: ScoreMod | None = softcap_mod(softcap)
    if isinstance(attention_mask, HFMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (Lq, Lk):
            raise ValueError(
                f"attention_mask: the qkv mask was built for Lq={attention_mask.q_length},"
                f" Lk={attention_mask.kv_length} but the layer has query {tuple(query.shape)} and key {tuple(key.shape)}"
            )
        mask = attention_mask.mask
    elif isinstance(attention_mask, Tensor):
        mask, extra_bias = _mask_from_tensor(attention_mask, query, Lk)
        if extra_bias is not None:
            score_mod = extra_bias if score_mod is None else score_mod.then(extra_bias)
    elif attention_mask is None:
        mask = _mask_without_builder(module, is_causal, sliding_window)
    else:
        raise TypeError(
            "attention_mask: the qkv attention function takes what its mask builder returned, a 4-D tensor or"
            f" None, got {type(attention_mask).__name__}; was the model switched to 'qkv' with qkv.hf.register()"
            " called first?"
        )
    if kwargs.get("indices") is not None:
        selected = _selected(kwargs["indices"], query, Lk)
        mask = selected if mask is None else mask & selected
    p = float(dropout) if module.training else 0.0
    args: dict[str, Any] = dict(mask=mask, score_mod=score_mod, scale=scaling, dropout_p=p, backend=backend, **extra)
    if wants_weights(module, kwargs):
        out, w = attention(query, key, value, return_weights=True, **args)
        return out.transpose(1, 2).contiguous(), w
    out = attention(query, key, value, **args)
    return out.transpose(1, 2).contiguous(), None


def softcap_mod(cap: float | None) -> ScoreMod | None:
    """HF's ``softcap`` argument as a qkv score mod (``None`` or 0: none)."""
    return softcap_score(float(cap)) if cap else None

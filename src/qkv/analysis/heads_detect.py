"""Head detectors: previous-token, duplicate-token and induction heads (after TransformerLens's head detector
and Olsson et al. 2022).

A head's score for a pattern is the attention mass its query rows put on the pattern's target keys, averaged
over the query rows that have a target:

- ``previous``: the key just before the query (``j = i - 1``);
- ``duplicate``: earlier keys holding the query's own token (``j < i``, ``ids[j] == ids[i]``);
- ``induction``: the keys just after an earlier occurrence of the query's token (``ids[j - 1] == ids[i]``,
  ``j < i``): "last time this token came, that token followed it".

On repeated random tokens (:func:`repeated_tokens`, a random sequence followed by itself) an induction head
scores near 1 and every other head near 0, as the second half has exactly one target per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .capture import capture
from .measures import _as_layers

if TYPE_CHECKING:
    from .capture import AttentionMaps

__all__ = ["PATTERNS", "detect_heads", "head_scores", "repeated_tokens", "strong_heads", "target_mask"]

PATTERNS = ("previous", "duplicate", "induction")
"""The patterns :func:`head_scores` knows."""


def repeated_tokens(
    vocab: int,
    length: int,
    batch: int = 1,
    *,
    generator: torch.Generator | None = None,
    prefix: Sequence[int] = (),
    low: int = 0,
) -> Tensor:
    """``batch`` rows of ``length`` random tokens in ``[low, vocab)`` (no token twice in a row's first half)
    followed by the same tokens again, after an optional ``prefix`` (e.g. a BOS id): ``(batch, len(prefix) + 2 length)``."""
    if not 0 <= low < vocab or length < 1 or length > vocab - low:
        raise ValueError(
            f"need 0 <= low < vocab and 1 <= length <= vocab - low, got vocab={vocab}, low={low}, length={length}"
        )
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    half = torch.stack([torch.randperm(vocab - low, generator=g)[:length] + low for _ in range(batch)])
    pre = torch.tensor(list(prefix), dtype=torch.long).expand(batch, -1)
    return torch.cat([pre, half, half], dim=1)


def target_mask(ids: Tensor, pattern: str) -> Tensor:
    """The target keys of ``pattern`` for each query of token ids ``(B, L)``: bool ``(B, L, L)`` (query, key)."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, L) token ids, got shape {tuple(ids.shape)}")
    B, L = ids.shape
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    before = (j < i).expand(B, L, L)
    if pattern == "previous":
        return (j == i - 1).expand(B, L, L).clone()
    if pattern == "duplicate":
        return before & (ids[:, None, :] == ids[:, :, None])
    if pattern == "induction":
        prev = torch.cat([torch.full((B, 1), -1, dtype=ids.dtype), ids[:, :-1]], dim=1)  # ids[j - 1]; none at j = 0
        return before & (prev[:, None, :] == ids[:, :, None]) & (j >= 1)
    raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")


def head_scores(
    maps: AttentionMaps | Sequence[Tensor], ids: Tensor, pattern: str, valid: Tensor | None = None
) -> Tensor:
    """Each head's mean attention mass on ``pattern``'s target keys, over the query rows that have one.

    Args:
        maps: self-attention layers ``(B, H, L, L)`` (:func:`qkv.analysis.capture`'s maps) of one pass on ``ids``.
        ids: the token ids ``(B, L)`` of that pass.
        pattern: ``"previous"``, ``"duplicate"`` or ``"induction"``.
        valid: ``(B, L)`` real tokens (padding is neither query nor target, nor, for ``induction``, the earlier
            occurrence before a target: left padding with a real token's id finds nothing).

    Returns:
        ``(layers, H)`` float64 in ``[0, 1]``; NaN where no query row has a target.
    """
    layers = _as_layers(maps)
    ids = ids.cpu()
    B, L = ids.shape
    tgt = target_mask(ids, pattern)
    if valid is not None:
        v = valid.bool().cpu()
        if tuple(v.shape) != (B, L):
            raise ValueError(f"valid must be (B, L) = {(B, L)} like ids, got {tuple(v.shape)}")
        tgt = tgt & v[:, :, None] & v[:, None, :]
        if pattern == "induction":  # the earlier occurrence (key j - 1) must be a real token too
            earlier = torch.cat([torch.zeros(B, 1, dtype=torch.bool), v[:, :-1]], dim=1)
            tgt = tgt & earlier[:, None, :]
    rows = tgt.any(-1)  # (B, L) queries with a target
    n = rows.sum().double()
    out = []
    for li, w in enumerate(layers):
        if tuple(w.shape[-2:]) != (L, L) or w.shape[0] != B:
            raise ValueError(f"layer {li} has weights {tuple(w.shape)}; ids are {(B, L)} (self-attention needed)")
        mass = (w * tgt[:, None].to(w.dtype)).sum(-1)  # (B, H, L)
        out.append(
            (mass * rows[:, None].to(w.dtype)).sum(dim=(0, 2)) / n
            if n > 0
            else torch.full((w.shape[1],), float("nan"), dtype=torch.float64)
        )
    return torch.stack(out)


def detect_heads(
    model: nn.Module, ids: Tensor, *args: Any, patterns: Sequence[str] = PATTERNS, **kwargs: Any
) -> dict[str, Tensor]:
    """Run ``model(ids, *args, **kwargs)`` once (through :func:`qkv.analysis.capture`: qkv models, ``nn.MultiheadAttention``
    trees, Hugging Face models) and score every head for each pattern: ``{pattern: (layers, H)}``."""
    maps = capture(model, ids, *args, **kwargs)
    valid = maps.attention_mask
    return {p: head_scores(maps, ids, p, valid) for p in patterns}


def strong_heads(scores: Tensor, threshold: float = 0.4) -> list[tuple[int, int, float]]:
    """The heads whose score exceeds ``threshold``, strongest first: ``(layer, head, score)``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (layers, H), got {tuple(scores.shape)}")
    found = [(int(l), int(h), float(scores[l, h])) for l, h in torch.nonzero(scores > threshold).tolist()]
    return sorted(found, key=lambda t: -t[2])

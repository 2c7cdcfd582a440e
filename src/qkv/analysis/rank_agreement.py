"""Agreement between two token importances: Kendall's tau and top-k overlap, per example and summarised.

Jain and Wallace (2019) compare attention with gradient and leave-one-out importance by Kendall's tau per
example; top-k overlap asks only whether the few most important tokens are the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
from torch import Tensor

__all__ = ["agreement", "kendall_tau", "topk_overlap"]


def _pair(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(a, dtype=torch.float64).flatten()
    y = torch.as_tensor(b, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"the two importances must have one length, got {x.numel()} and {y.numel()}")
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("importances must be finite (no NaN or inf)")
    return x, y


def kendall_tau(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> float:
    """Kendall's tau-b between two rankings of the same items (ties counted as in scipy's default):
    ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` over all pairs, ``n1``/``n2`` the pairs tied in ``a``/``b``.

    Returns NaN when either side is constant (or has fewer than 2 items), as scipy does. O(n²) memory:
    meant for the tokens of one example."""
    x, y = _pair(a, b)
    n = x.numel()
    if n < 2:
        return math.nan
    i, j = torch.triu_indices(n, n, 1)
    sx, sy = torch.sign(x[i] - x[j]), torch.sign(y[i] - y[j])
    s = float((sx * sy).sum())
    tx, ty = float((sx != 0).sum()), float((sy != 0).sum())
    if tx == 0 or ty == 0:
        return math.nan
    return s / math.sqrt(tx * ty)


def topk_overlap(a: Tensor | Sequence[float], b: Tensor | Sequence[float], k: int) -> float:
    """``|top_k(a) ∩ top_k(b)| / k``: the share of the ``k`` largest items of ``a`` that are among the ``k``
    largest of ``b`` (ties broken by position, the earlier first). ``k`` is clipped to the number of items."""
    x, y = _pair(a, b)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = min(k, x.numel())

    def top(t: Tensor) -> set[int]:
        order = sorted(range(t.numel()), key=lambda i: (-float(t[i]), i))
        return set(order[:k])

    return len(top(x) & top(y)) / k


def agreement(
    importances: Mapping[str, Tensor],
    *,
    valid: Tensor | None = None,
    k: int = 3,
    absolute: bool = True,
) -> list[dict[str, Any]]:
    """Kendall's tau and top-k overlap between every pair of importance methods, per example, then averaged.

    Args:
        importances: method name -> ``(B, L)`` (or ``(L,)``) importance of each token.
        valid: ``(B, L)`` (or ``(L,)``) bool, the tokens to compare (e.g. not padding, not ``[CLS]``); all by default.
        k: for the top-k overlap.
        absolute: rank by magnitude (``abs()``), as gradients are signed.

    Returns:
        One dict per pair (in the order of ``importances``): ``method_a``, ``method_b``, ``kendall_tau`` (mean over
        the examples where it is defined), ``kendall_tau_std``, ``topk_overlap`` (mean), ``k``, ``examples``.
    """
    if len(importances) < 2:
        raise ValueError(f"agreement needs at least two methods, got {list(importances)}")
    mats = {name: torch.as_tensor(t, dtype=torch.float64) for name, t in importances.items()}
    mats = {name: (t.unsqueeze(0) if t.dim() == 1 else t) for name, t in mats.items()}
    shapes = {tuple(t.shape) for t in mats.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"importances must all be (B, L) of one shape, got { {n: tuple(t.shape) for n, t in mats.items()} }"
        )
    B, L = next(iter(shapes))
    if valid is None:
        keep = torch.ones(B, L, dtype=torch.bool)
    else:
        keep = torch.as_tensor(valid).bool()
        keep = keep.expand(B, -1) if keep.dim() == 1 else keep
        if tuple(keep.shape) != (B, L):
            raise ValueError(f"valid must be (B, L) = {(B, L)}, got {tuple(torch.as_tensor(valid).shape)}")
    rows = []
    for a, b in combinations(mats, 2):
        taus, overlaps = [], []
        for r in range(B):
            x, y = mats[a][r][keep[r]], mats[b][r][keep[r]]
            if absolute:
                x, y = x.abs(), y.abs()
            if x.numel() == 0:
                continue
            t = kendall_tau(x, y)
            if not math.isnan(t):
                taus.append(t)
            overlaps.append(topk_overlap(x, y, k))
        mean = sum(taus) / len(taus) if taus else math.nan
        std = math.sqrt(sum((t - mean) ** 2 for t in taus) / len(taus)) if taus else math.nan
        rows.append(
            {
                "method_a": a,
                "method_b": b,
                "kendall_tau": mean,
                "kendall_tau_std": std,
                "topk_overlap": sum(overlaps) / len(overlaps) if overlaps else math.nan,
                "k": k,
                "examples": len(taus),
            }
        )
    return rows

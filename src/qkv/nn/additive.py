"""Additive (Bahdanau 2015) and multiplicative (Luong 2015) attention for RNN encoder-decoders.

These modules score a query against each key with a small network of their own (``v . tanh(W q + U k)``,
``q . W k``, ...), not with the scaled dot product that :func:`qkv.attention` computes, so they do not
go through :func:`qkv.attention` and are not :class:`qkv.nn.AttentionModule` s: backends and weight
capture do not apply. They return their weights with every call instead.

Each has two hook points (:class:`qkv.nn.hooks.HookPoint`), as the attention modules have, so that
analysis can read and replace what they compute (``qkv.nn.hooked(model, ("*.hook_weights", fn))``):
``hook_scores`` ``(B, Lq, Lk)``, the scores with masked keys at ``-inf``, before the softmax, and
``hook_weights`` ``(B, Lq, Lk)``, the weights; a tensor a hook returns replaces the value, and the context
is computed from it. Without a hook they cost nothing.

Both take a query ``(B, Dq)`` (one decoder step) or ``(B, Lq, Dq)`` (all steps), keys ``(B, Lk, Dk)``
and optional values ``(B, Lk, Dv)`` (default: the keys), and return ``(context, weights)``.
A mask is either a bool key mask ``(B, Lk)`` (True = real token, may be attended) or a
:class:`qkv.masks.Mask` (evaluated on the problem ``(B, 1, Lq, Lk)``). A query that may attend to
nothing gets zero weights and a zero context, never NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..masks import Mask, Shape
from .hooks import HookPoint, checked_call

__all__ = ["AdditiveAttention", "LuongAttention"]


def _check_inputs(
    query: Tensor, keys: Tensor, values: Tensor | None, dq: int, dk: int, who: str
) -> tuple[Tensor, Tensor, bool]:
    """Validate shapes; return (query as (B, Lq, Dq), values, whether query was 2-D)."""
    if not isinstance(query, Tensor) or not isinstance(keys, Tensor):
        raise TypeError(f"{who}: query and keys must be tensors, got {type(query).__name__}, {type(keys).__name__}")
    if keys.dim() != 3:
        raise ValueError(f"{who}: keys must be (B, Lk, {dk}), got shape {tuple(keys.shape)}")
    if query.dim() not in (2, 3):
        raise ValueError(f"{who}: query must be (B, {dq}) or (B, Lq, {dq}), got shape {tuple(query.shape)}")
    single = query.dim() == 2
    q3 = query.unsqueeze(1) if single else query
    if q3.shape[0] != keys.shape[0]:
        raise ValueError(
            f"{who}: query batch {q3.shape[0]} != keys batch {keys.shape[0]} (query {tuple(query.shape)}, keys {tuple(keys.shape)})"
        )
    if q3.shape[-1] != dq:
        raise ValueError(f"{who}: query's last dim must be query_dim={dq}, got shape {tuple(query.shape)}")
    if keys.shape[-1] != dk:
        raise ValueError(f"{who}: keys' last dim must be key_dim={dk}, got shape {tuple(keys.shape)}")
    if keys.shape[1] == 0:
        raise ValueError(f"{who}: keys must have at least one position, got shape {tuple(keys.shape)}")
    v = keys if values is None else values
    if v.dim() != 3 or v.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"{who}: values must be (B, Lk, Dv) = ({keys.shape[0]}, {keys.shape[1]}, Dv), got shape {tuple(v.shape)}"
        )
    return q3, v, single


def _key_mask(mask: Tensor | Mask | None, B: int, Lq: int, Lk: int, device: torch.device, who: str) -> Tensor | None:
    """The mask as a bool tensor broadcastable to ``(B, Lq, Lk)``, or None."""
    if mask is None:
        return None
    if isinstance(mask, Mask):
        return mask.tile(Shape(B, 1, Lq, Lk, device), 0, Lq, 0, Lk)[:, 0]
    if not isinstance(mask, Tensor):
        raise TypeError(f"{who}: mask must be a bool tensor (B, Lk) or a qkv.masks.Mask, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{who}: mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if mask.shape != (B, Lk):
        raise ValueError(f"{who}: mask must be a key mask (B, Lk) = ({B}, {Lk}), got shape {tuple(mask.shape)}")
    return mask.to(device)[:, None, :]


def _hooked_weights(hs: HookPoint, hw: HookPoint, scores: Tensor, keep: Tensor | None, who: str) -> Tensor:
    """Softmax of ``scores (B, Lq, Lk)`` under ``keep``, through the hook points when either is hooked."""
    if hs.active:
        if keep is not None:
            scores = scores.masked_fill(~keep.expand_as(scores), float("-inf"))
        scores = checked_call(hs, f"{who}.hook_scores", scores)
        keep = torch.isfinite(scores) if keep is None else keep & torch.isfinite(scores)
    w = _masked_softmax(scores, keep)
    if hw.active:
        w = checked_call(hw, f"{who}.hook_weights", w)
    return w


def _masked_softmax(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax over the last dim of ``scores (B, Lq, Lk)``; rows with nothing kept are all zeros."""
    if keep is None:
        return torch.softmax(scores, dim=-1)
    keep = keep.expand_as(scores)
    scores = scores.masked_fill(~keep, float("-inf"))
    any_kept = keep.any(dim=-1, keepdim=True)
    scores = torch.where(any_kept, scores, torch.zeros_like(scores))
    w = torch.softmax(scores, dim=-1)
    return torch.where(keep, w, torch.zeros_like(w))


class AdditiveAttention(nn.Module):
    """Bahdanau et al. (2015) additive attention: ``e_j = v . tanh(W q + U k_j)``, ``a = softmax(e)``,
    ``context = sum_j a_j value_j``.

    Scores come from this small network, not a dot product, so this does not call :func:`qkv.attention`.

    Args:
        query_dim: ``Dq``, size of the query (decoder state).
        key_dim: ``Dk``, size of each key (encoder annotation).
        hidden_dim: size of the ``tanh`` layer (``W``: ``Dq -> hidden``, ``U``: ``Dk -> hidden``,
            ``v``: ``hidden -> 1``). Defaults to ``key_dim``.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            if val is not None and (not isinstance(val, int) or val <= 0):
                raise ValueError(f"AdditiveAttention: {name} must be a positive int, got {val!r}")
        hidden = key_dim if hidden_dim is None else hidden_dim
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden
        self.W = nn.Linear(query_dim, hidden, bias=False)
        self.U = nn.Linear(key_dim, hidden, bias=True)
        self.v = nn.Linear(hidden, 1, bias=False)
        self.hook_scores = HookPoint()
        self.hook_weights = HookPoint()

    def project_keys(self, keys: Tensor) -> Tensor:
        """``U k`` for keys ``(B, Lk, Dk)`` -> ``(B, Lk, hidden)``; pass it as ``projected_keys`` to
        reuse it across decoder steps."""
        return self.U(keys)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        mask: Tensor | Mask | None = None,
        projected_keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attend from ``query`` over ``keys``.

        Args:
            query: ``(B, Dq)`` or ``(B, Lq, Dq)``.
            keys: ``(B, Lk, Dk)``.
            values: ``(B, Lk, Dv)``; defaults to ``keys``.
            mask: bool key mask ``(B, Lk)`` (True = may attend) or a :class:`qkv.masks.Mask`.
            projected_keys: ``self.project_keys(keys)`` computed once, ``(B, Lk, hidden)``.

        Returns:
            ``context`` ``(B, Dv)`` or ``(B, Lq, Dv)`` and ``weights`` ``(B, Lk)`` or ``(B, Lq, Lk)``.
        """
        q3, v, single = _check_inputs(query, keys, values, self.query_dim, self.key_dim, "AdditiveAttention")
        B, Lq, Lk = q3.shape[0], q3.shape[1], keys.shape[1]
        uk = self.U(keys) if projected_keys is None else projected_keys
        if uk.shape != (B, Lk, self.hidden_dim):
            raise ValueError(
                f"AdditiveAttention: projected_keys must be (B, Lk, hidden) = ({B}, {Lk}, {self.hidden_dim}), "
                f"got shape {tuple(uk.shape)}"
            )
        scores = self.v(torch.tanh(self.W(q3)[:, :, None, :] + uk[:, None, :, :])).squeeze(-1)  # (B, Lq, Lk)
        keep = _key_mask(mask, B, Lq, Lk, keys.device, "AdditiveAttention")
        w = _hooked_weights(self.hook_scores, self.hook_weights, scores, keep, "AdditiveAttention")
        ctx = torch.bmm(w, v)
        return (ctx[:, 0], w[:, 0]) if single else (ctx, w)


class LuongAttention(nn.Module):
    """Luong et al. (2015) global attention with score ``dot`` (``q . k``), ``general`` (``q . W_a k``)
    or ``concat`` (``v_a . tanh(W_a [q; k])``); weights ``softmax(score)`` and
    ``context = sum_j a_j value_j``.

    Scores come from these formulas (no ``1/sqrt(D)`` scaling, ``concat`` is not a dot product), so
    this does not call :func:`qkv.attention`.

    Args:
        query_dim: ``Dq``, size of the query (decoder state ``h_t``).
        key_dim: ``Dk``, size of each key (encoder state ``h_s``); ``dot`` needs ``Dk == Dq``.
        score: ``"dot"``, ``"general"`` or ``"concat"``.
        hidden_dim: size of the ``tanh`` layer of ``concat``; defaults to ``query_dim``.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        score: Literal["dot", "general", "concat"] = "general",
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        kd = query_dim if key_dim is None else key_dim
        for name, val in (("query_dim", query_dim), ("key_dim", kd), ("hidden_dim", hidden_dim)):
            if val is not None and (not isinstance(val, int) or val <= 0):
                raise ValueError(f"LuongAttention: {name} must be a positive int, got {val!r}")
        if score not in ("dot", "general", "concat"):
            raise ValueError(f"LuongAttention: score must be 'dot', 'general' or 'concat', got {score!r}")
        if score == "dot" and kd != query_dim:
            raise ValueError(f"LuongAttention: score='dot' needs key_dim == query_dim, got {kd} and {query_dim}")
        self.query_dim, self.key_dim, self.score = query_dim, kd, score
        hidden = query_dim if hidden_dim is None else hidden_dim
        self.W_a: nn.Linear | None = None
        self.v_a: nn.Linear | None = None
        if score == "general":
            self.W_a = nn.Linear(kd, query_dim, bias=False)
        elif score == "concat":
            self.W_a = nn.Linear(query_dim + kd, hidden, bias=False)
            self.v_a = nn.Linear(hidden, 1, bias=False)
        self.hook_scores = HookPoint()
        self.hook_weights = HookPoint()

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor | None = None, *, mask: Tensor | Mask | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attend from ``query`` over ``keys``.

        Args:
            query: ``(B, Dq)`` or ``(B, Lq, Dq)``.
            keys: ``(B, Lk, Dk)``.
            values: ``(B, Lk, Dv)``; defaults to ``keys``.
            mask: bool key mask ``(B, Lk)`` (True = may attend) or a :class:`qkv.masks.Mask`.

        Returns:
            ``context`` ``(B, Dv)`` or ``(B, Lq, Dv)`` and ``weights`` ``(B, Lk)`` or ``(B, Lq, Lk)``.
        """
        q3, v, single = _check_inputs(query, keys, values, self.query_dim, self.key_dim, "LuongAttention")
        B, Lq, Lk = q3.shape[0], q3.shape[1], keys.shape[1]
        if self.score == "dot":
            scores = torch.bmm(q3, keys.transpose(1, 2))
        elif self.score == "general":
            assert self.W_a is not None
            scores = torch.bmm(q3, self.W_a(keys).transpose(1, 2))
        else:
            assert self.W_a is not None and self.v_a is not None
            # W_a [q; k] = W_q q + W_k k: split the matrix instead of building (B, Lq, Lk, Dq + Dk)
            wq = q3 @ self.W_a.weight[:, : self.query_dim].T
            wk = keys @ self.W_a.weight[:, self.query_dim :].T
            scores = self.v_a(torch.tanh(wq[:, :, None, :] + wk[:, None, :, :])).squeeze(-1)
        keep = _key_mask(mask, B, Lq, Lk, keys.device, "LuongAttention")
        w = _hooked_weights(self.hook_scores, self.hook_weights, scores, keep, "LuongAttention")
        ctx = torch.bmm(w, v)
        return (ctx[:, 0], w[:, 0]) if single else (ctx, w)

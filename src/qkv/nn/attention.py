"""Multi-head attention (Vaswani et al. 2017) with grouped-query and multi-query attention, RoPE,
QK-norm and KV caches, computed by :func:`qkv.attention` through :class:`qkv.nn.AttentionModule`."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch import Tensor, nn

from ..masks import Mask, MaskLike, as_mask, from_dense
from ..scores import ScoreMod, ScoreModFn, as_score_mod, bias
from .base import AttentionModule
from .cache import CrossAttentionKVCache, KVCache, at_positions
from .positional import RotaryEmbedding

__all__ = ["MultiHeadAttention", "TorchMasks", "masks_from_torch"]

Cache = Union[KVCache, CrossAttentionKVCache]


class TorchMasks(NamedTuple):
    """``torch.nn.MultiheadAttention``'s masks in qkv's terms: pass both to ``qkv.attention`` /
    :meth:`MultiHeadAttention.forward`."""

    mask: Mask | None
    """Boolean: True where a query may attend."""
    score_mod: ScoreMod | None
    """The float (additive) parts, as :func:`qkv.scores.bias`."""


def masks_from_torch(
    attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, num_heads: int | None = None
) -> TorchMasks:
    """Convert PyTorch's ``attn_mask`` / ``key_padding_mask`` conventions into a qkv mask and score mod.

    PyTorch's boolean masks say True where attention is NOT allowed (qkv's say the opposite); float
    masks are added to the scores.

    Args:
        attn_mask: ``(L, S)`` or ``(B * num_heads, L, S)``, bool (True = blocked) or float (added).
        key_padding_mask: ``(B, S)``, bool (True = padding, blocked) or float (added).
        num_heads: needed to unflatten a 3-D ``attn_mask``.
    """
    allowed: Tensor | None = None
    add: Tensor | None = None

    def merge(t: Tensor) -> None:
        nonlocal allowed, add
        if t.dtype == torch.bool:
            allowed = ~t if allowed is None else allowed & ~t
        elif t.dtype.is_floating_point:
            add = t if add is None else add + t
        else:
            raise TypeError(f"masks_from_torch: masks must be bool or float tensors, got dtype {t.dtype}")

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            merge(attn_mask[None, None])
        elif attn_mask.dim() == 3:
            if num_heads is None or attn_mask.shape[0] % num_heads:
                raise ValueError(
                    f"masks_from_torch: a 3-D attn_mask {tuple(attn_mask.shape)} needs num_heads dividing its first"
                    f" dim, got num_heads={num_heads}"
                )
            merge(attn_mask.view(-1, num_heads, *attn_mask.shape[1:]))
        else:
            raise ValueError(f"masks_from_torch: attn_mask must be (L, S) or (B*H, L, S), got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2:
            raise ValueError(f"masks_from_torch: key_padding_mask must be (B, S), got {tuple(key_padding_mask.shape)}")
        merge(key_padding_mask[:, None, None, :])
    return TorchMasks(from_dense(allowed) if allowed is not None else None, bias(add) if add is not None else None)


class MultiHeadAttention(AttentionModule):
    """Multi-head attention, self or cross, with grouped-query (GQA) and multi-query (MQA) attention.

    ``out = out_proj(attention(q_proj(x), k_proj(context), v_proj(context)))`` with ``num_heads``
    query heads of size ``head_dim = embed_dim // num_heads`` and ``num_kv_heads`` key/value heads.

    Args:
        embed_dim: model width ``E`` of the queries' input and of the output.
        num_heads: query heads ``H``; must divide ``embed_dim``.
        num_kv_heads: key/value heads ``Hkv`` (``H % Hkv == 0``): ``None`` = ``H`` (multi-head),
            ``1`` = multi-query, anything between = grouped-query.
        kdim: width of the key input (the context); defaults to ``embed_dim``.
        vdim: width of the value input; defaults to ``kdim``.
        bias: biases in the four projections.
        dropout: dropout on the attention weights, applied in training mode only.
        qk_norm: RMS-normalise each query and key head (over ``head_dim``, learned scale) before the
            dot product (Qwen3, OLMo 2, ViT-22B).
        rope: a :class:`qkv.nn.RotaryEmbedding` (may be shared across layers) or ``True`` for one over
            the whole head dim; rotates queries and keys (self-attention only) at their absolute
            positions, continuing from a cache's ``seen``.

    The projections are always named ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        qk_norm: bool = False,
        rope: RotaryEmbedding | bool | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: num_heads={num_heads} must be >= 1 and divide embed_dim={embed_dim}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"MultiHeadAttention: num_kv_heads={num_kv_heads} must be >= 1 and divide num_heads={num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = self.kdim if vdim is None else vdim
        self.dropout = dropout
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_norm: nn.Module | None = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm: nn.Module | None = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        if rope is True:
            rope = RotaryEmbedding(self.head_dim)
        elif rope is False:
            rope = None
        if rope is not None and (not isinstance(rope, RotaryEmbedding) or rope.dim > self.head_dim):
            raise ValueError(f"MultiHeadAttention: rope must be a RotaryEmbedding with dim <= head_dim={self.head_dim}")
        self.rope: RotaryEmbedding | None = rope

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        value: Tensor | None = None,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        """Attend from ``x`` to itself (``context=None``) or to ``context``.

        Args:
            x: queries' input ``(B, L, embed_dim)``.
            context: keys' (and values') input ``(B, S, kdim)``; ``None`` for self-attention.
            value: values' input ``(B, S, vdim)`` when it differs from ``context`` (as in
                ``torch.nn.MultiheadAttention(query, key, value)``).
            mask: anything ``qkv.attention`` takes (``qkv.masks.causal()``, a bool tensor
                broadcastable to ``(B, H, L, S)`` with True = may attend, ...). With a cache it is
                written for the whole sequence: queries are the ``L`` new tokens, aligned
                bottom-right against all ``seen + L`` keys.
            score_mod: a score mod (``qkv.scores.alibi(H)``, ``bias(t)``, ...), positioned likewise.
            cache: a :class:`KVCache` for self-attention decoding (the new keys and values are
                appended; RoPE continues at ``cache.seen``), or a :class:`CrossAttentionKVCache` for
                cross-attention (filled from ``context`` on first use, reused afterwards, when
                ``context`` may be ``None``).

        Returns:
            ``(B, L, embed_dim)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiHeadAttention: x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, L, H, Dh).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if isinstance(cache, CrossAttentionKVCache):
            if cache.k is None or cache.v is None:
                if context is None:
                    raise ValueError("MultiHeadAttention: an empty CrossAttentionKVCache needs the context to fill it")
                cache.k, cache.v = self._kv(context, value, B)
            k, v = cache.k, cache.v
            out = self.attend(q, k, v, mask=mask, score_mod=score_mod, dropout_p=self._p())
            return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        self_attn = context is None
        k, v = self._kv(x if context is None else context, value, B)
        if self.rope is not None and self_attn:
            offset = cache.seen if cache is not None else 0
            q, k = self.rope(q, k, offset)
        if cache is not None:
            if not self_attn:
                raise ValueError("MultiHeadAttention: a KVCache is for self-attention; use CrossAttentionKVCache for cross")
            seen = cache.seen
            k, v, positions = cache.update(k, v)
            if positions is not None and (mask is not None or score_mod is not None):
                # keys out of order: the mask and score mod re-expressed on their positions. In order,
                # qkv.attention drops a mask that lets the step see every cached key (Mask.allows_all)
                mask, score_mod = at_positions(as_mask(mask), as_score_mod(score_mod), B, H, L, positions, seen + L)
        out = self.attend(q, k, v, mask=mask, score_mod=score_mod, dropout_p=self._p())
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

    def _p(self) -> float:
        return self.dropout if self.training else 0.0

    def _kv(self, context: Tensor, value: Tensor | None, B: int) -> tuple[Tensor, Tensor]:
        if context.dim() != 3 or context.shape[0] != B or context.shape[-1] != self.kdim:
            raise ValueError(f"MultiHeadAttention: context must be (B={B}, S, {self.kdim}), got {tuple(context.shape)}")
        vin = context if value is None else value
        if vin.dim() != 3 or vin.shape[:2] != context.shape[:2] or vin.shape[-1] != self.vdim:
            raise ValueError(
                f"MultiHeadAttention: value must be (B, S, {self.vdim}) with the context's B and S, got"
                f" {tuple(vin.shape)} for context {tuple(context.shape)}"
            )
        S = context.shape[1]
        k = self.k_proj(context).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(vin).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """A copy of ``torch.nn.MultiheadAttention`` ``m`` that gives the same outputs.

        ``m``'s ``batch_first`` does not carry over: qkv modules always take ``(B, L, E)``; transpose
        sequence-first inputs. ``add_bias_kv`` and ``add_zero_attn`` have no qkv counterpart and raise
        ``ValueError``. Masks: see :func:`masks_from_torch`."""
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected torch.nn.MultiheadAttention, got {type(m).__name__}")
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv and add_zero_attn are not supported")
        E = m.embed_dim
        has_bias = m.in_proj_bias is not None
        new = cls(E, m.num_heads, kdim=m.kdim, vdim=m.vdim, bias=has_bias, dropout=m.dropout)
        p = next(m.parameters())
        new.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                assert m.in_proj_weight is not None
                wq, wk, wv = m.in_proj_weight.chunk(3, dim=0)
            else:
                assert m.q_proj_weight is not None and m.k_proj_weight is not None and m.v_proj_weight is not None
                wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
            new.q_proj.weight.copy_(wq)
            new.k_proj.weight.copy_(wk)
            new.v_proj.weight.copy_(wv)
            new.out_proj.weight.copy_(m.out_proj.weight)
            if has_bias:
                assert m.in_proj_bias is not None and new.q_proj.bias is not None
                assert new.k_proj.bias is not None and new.v_proj.bias is not None and new.out_proj.bias is not None
                bq, bk, bv = m.in_proj_bias.chunk(3)
                new.q_proj.bias.copy_(bq)
                new.k_proj.bias.copy_(bk)
                new.v_proj.bias.copy_(bv)
                new.out_proj.bias.copy_(m.out_proj.bias)
        new.train(m.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads},"
            f" head_dim={self.head_dim}, rope={self.rope is not None}, qk_norm={self.q_norm is not None}"
        )

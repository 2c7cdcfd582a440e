"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", section 2.1): keys and values
are compressed into one small latent per token plus a decoupled RoPE key shared by all heads, and the
decoding cache holds only those."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import MaskLike
from ..scores import ScoreMod, ScoreModFn
from .base import AttentionModule
from .positional import RotaryEmbedding

__all__ = ["LatentAttention", "LatentKVCache"]


class LatentKVCache:
    """MLA's decoding cache: per token only ``[c_KV, k_rope]``, ``kv_latent_dim + rope_dim`` numbers
    (against ``2 * num_kv_heads * head_dim`` for multi-head / grouped-query attention).

    ``latent`` is a buffer ``(B, max_len, kv_latent_dim + rope_dim)`` allocated at the first update;
    ``seen`` counts the tokens stored (the position of the next one)."""

    def __init__(self, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"LatentKVCache: max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.seen = 0
        self.latent: Tensor | None = None

    def update(self, latent: Tensor) -> Tensor:
        """Store the new tokens' ``latent (B, L, C)``; return every stored one ``(B, seen + L, C)``."""
        if latent.dim() != 3:
            raise ValueError(f"LatentKVCache: latent must be (B, L, C), got {tuple(latent.shape)}")
        if self.latent is None:
            self.latent = latent.new_empty(latent.shape[0], self.max_len, latent.shape[2])
        elif latent.shape[0] != self.latent.shape[0] or latent.shape[2] != self.latent.shape[2]:
            raise ValueError(f"LatentKVCache: got {tuple(latent.shape)} for a cache of {tuple(self.latent.shape)}")
        end = self.seen + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"LatentKVCache: {end} tokens exceed max_len={self.max_len}")
        self.latent[:, self.seen : end] = latent
        self.seen = end
        return self.latent[:, :end]

    def nbytes_per_token(self) -> int:
        """Bytes the cache holds per token (of one batch row)."""
        if self.latent is None:
            return 0
        return self.latent.shape[2] * self.latent.element_size()

    def reset(self) -> None:
        """Forget everything stored."""
        self.seen = 0
        self.latent = None


class LatentAttention(AttentionModule):
    """Multi-head latent attention (MLA), the paper's equations (9)-(19), attention by :func:`qkv.attention`.

    With ``h`` heads of ``head_dim`` ``d``, a RoPE part of ``rope_dim`` ``dr`` and latents of
    ``kv_latent_dim`` ``dc`` (and ``q_latent_dim`` ``dc'``)::

        c_KV = W_DKV x                  k_C = W_UK c_KV (h x d)        v = W_UV c_KV (h x dv)
        c_Q  = W_DQ x                   q_C = W_UQ c_Q  (h x d)        q_R = RoPE(W_QR c_Q) (h x dr)
        k_R  = RoPE(W_KR x)  (dr, one for all heads)
        q_i = [q_C,i ; q_R,i]   k_i = [k_C,i ; k_R]   o_i = softmax(q_i k_iᵀ / sqrt(d + dr)) v_i
        out = W_O [o_1; ...; o_h]

    ``q_latent_dim=None`` drops the query compression (``W_UQ``, ``W_QR`` read ``x``, as DeepSeek-V2-Lite).
    ``latent_norm`` applies an RMSNorm to ``c_KV`` and ``c_Q`` after the down-projections, as the released
    checkpoints do (the paper's equations leave it out: pass ``False``).

    Decoding with a :class:`LatentKVCache` stores only ``[c_KV, k_R]`` per token. With ``absorb`` (the
    default) the up-projections are never applied to the cache: ``W_UK`` is absorbed into the query
    (``q_C,iᵀ W_UK,i c = (W_UK,iᵀ q_C,i)ᵀ c``), so every head attends over the shared ``[c_KV, k_R]``
    as multi-query attention with one key/value head of width ``dc + dr`` / ``dc``, and ``W_UV`` into the
    output projection (``W_O,i W_UV,i``, precomputed and kept until a weight changes). ``absorb=False``
    decodes by expanding the cached latents to per-head keys and values (the training form).

    Args:
        embed_dim: model width ``E``.
        num_heads: ``h``.
        kv_latent_dim: ``dc`` (DeepSeek-V2: 512 for ``d = 128``, i.e. ``4 d``).
        q_latent_dim: ``dc'`` or ``None`` (no query compression).
        head_dim: ``d`` (default ``E / h``); ``v_head_dim`` ``dv`` (default ``d``).
        rope_dim: ``dr`` (default ``d / 2``, as DeepSeek-V2), even.
        rope_base: RoPE's base.
        latent_norm: RMSNorm on the latents (see above).
        absorb: decode with absorbed projections (see above).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kv_latent_dim: int,
        q_latent_dim: int | None = None,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_dim: int | None = None,
        rope_base: float = 10000.0,
        latent_norm: bool = True,
        absorb: bool = True,
    ) -> None:
        super().__init__()
        d = head_dim if head_dim is not None else embed_dim // max(1, num_heads)
        dr = rope_dim if rope_dim is not None else max(2, d // 2)
        dv = v_head_dim if v_head_dim is not None else d
        if num_heads < 1 or d < 1 or dv < 1 or kv_latent_dim < 1 or (q_latent_dim is not None and q_latent_dim < 1):
            raise ValueError(
                f"LatentAttention: need num_heads, head_dim, v_head_dim, kv_latent_dim (and q_latent_dim) >= 1, got"
                f" {num_heads}, {d}, {dv}, {kv_latent_dim}, {q_latent_dim}"
            )
        if dr < 2 or dr % 2:
            raise ValueError(f"LatentAttention: rope_dim must be even and >= 2, got {dr}")
        self.embed_dim, self.num_heads, self.head_dim, self.v_head_dim, self.rope_dim = embed_dim, num_heads, d, dv, dr
        self.kv_latent_dim, self.q_latent_dim, self.absorb = kv_latent_dim, q_latent_dim, absorb
        self.scale = 1.0 / math.sqrt(d + dr)
        h = num_heads
        q_in = embed_dim
        self.q_down: nn.Linear | None = None
        self.q_norm: nn.Module = nn.Identity()
        if q_latent_dim is not None:
            self.q_down = nn.Linear(embed_dim, q_latent_dim, bias=False)  # W_DQ
            self.q_norm = nn.RMSNorm(q_latent_dim, eps=1e-6) if latent_norm else nn.Identity()
            q_in = q_latent_dim
        self.q_up = nn.Linear(q_in, h * d, bias=False)  # W_UQ
        self.q_rope = nn.Linear(q_in, h * dr, bias=False)  # W_QR
        self.kv_down = nn.Linear(embed_dim, kv_latent_dim, bias=False)  # W_DKV
        self.kv_norm: nn.Module = nn.RMSNorm(kv_latent_dim, eps=1e-6) if latent_norm else nn.Identity()
        self.k_up = nn.Linear(kv_latent_dim, h * d, bias=False)  # W_UK
        self.v_up = nn.Linear(kv_latent_dim, h * dv, bias=False)  # W_UV
        self.k_rope = nn.Linear(embed_dim, dr, bias=False)  # W_KR
        self.out_proj = nn.Linear(h * dv, embed_dim, bias=False)  # W_O
        self.rope = RotaryEmbedding(dr, rope_base)
        self._absorbed: tuple[Any, Tensor, Tensor] | None = None

    def latent(self, x: Tensor, offset: int = 0) -> Tensor:
        """What the cache stores for ``x (B, L, E)``: ``[c_KV, RoPE(W_KR x)]`` ``(B, L, dc + dr)``, the
        key's RoPE part rotated at positions ``offset ..``."""
        c = self.kv_norm(self.kv_down(x))
        kr = self.rope.rotate(self.k_rope(x).unsqueeze(1), offset).squeeze(1)
        return torch.cat((c, kr), -1)

    def _queries(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        B, L, _ = x.shape
        cq = self.q_norm(self.q_down(x)) if self.q_down is not None else x
        qc = self.q_up(cq).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        qr = self.q_rope(cq).view(B, L, self.num_heads, self.rope_dim).transpose(1, 2)
        return qc, self.rope.rotate(qr, offset)

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: LatentKVCache | None = None,
    ) -> Tensor:
        """Self-attention of ``x (B, L, embed_dim)`` -> ``(B, L, embed_dim)``.

        ``mask``/``score_mod`` as for :class:`MultiHeadAttention`; with a ``cache`` they are written for
        the whole sequence (the ``L`` new queries aligned bottom-right against every cached key)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"LatentAttention: x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        offset = cache.seen if cache is not None else 0
        qc, qr = self._queries(x, offset)
        lat = self.latent(x, offset)
        if cache is not None:
            lat = cache.update(lat)
            if self.absorb:
                return self._absorbed_attention(qc, qr, lat, mask, score_mod)
        return self._expanded_attention(qc, qr, lat, mask, score_mod)

    def _expanded_attention(self, qc: Tensor, qr: Tensor, lat: Tensor, mask: Any, score_mod: Any) -> Tensor:
        """The training form: per-head keys ``[W_UK c, k_R]`` and values ``W_UV c`` from the latents."""
        B, L = qc.shape[0], qc.shape[2]
        h, d, dr, dv, dc = self.num_heads, self.head_dim, self.rope_dim, self.v_head_dim, self.kv_latent_dim
        c, kr = lat[..., :dc], lat[..., dc:]
        S = lat.shape[1]
        kc = self.k_up(c).view(B, S, h, d).transpose(1, 2)
        v = self.v_up(c).view(B, S, h, dv).transpose(1, 2)
        k = torch.cat((kc, kr.unsqueeze(1).expand(B, h, S, dr)), -1)
        q = torch.cat((qc, qr), -1)
        o = self.attend(q, k, v, mask=mask, score_mod=score_mod, scale=self.scale)  # (B, h, L, dv)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, h * dv))

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """``W_UK`` as ``(h, d, dc)`` and ``W_O W_UV`` as ``(E, h, dc)``: the query-side and output-side
        absorbed projections (recomputed when a weight changes)."""
        ws = (self.k_up.weight, self.v_up.weight, self.out_proj.weight)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in ws)
        if self._absorbed is None or self._absorbed[0] != key or torch.is_grad_enabled():
            h, d, dv, dc = self.num_heads, self.head_dim, self.v_head_dim, self.kv_latent_dim
            uk = self.k_up.weight.view(h, d, dc)
            ov = torch.einsum("ehv,hvc->ehc", self.out_proj.weight.view(-1, h, dv), self.v_up.weight.view(h, dv, dc))
            if torch.is_grad_enabled():
                return uk, ov
            self._absorbed = (key, uk, ov)
        return self._absorbed[1], self._absorbed[2]

    def _absorbed_attention(self, qc: Tensor, qr: Tensor, lat: Tensor, mask: Any, score_mod: Any) -> Tensor:
        """Decoding on the cached latents: every head attends over ``[c_KV, k_R]`` (one shared key/value
        head, multi-query), with ``W_UK`` in the query and ``W_O W_UV`` on the output."""
        uk, ov = self.absorbed_weights()
        dc = self.kv_latent_dim
        q = torch.cat((torch.einsum("bhld,hdc->bhlc", qc, uk), qr), -1)  # (B, h, L, dc + dr)
        k = lat.unsqueeze(1)  # (B, 1, S, dc + dr)
        o = self.attend(q, k, k[..., :dc], mask=mask, score_mod=score_mod, scale=self.scale)  # (B, h, L, dc)
        return torch.einsum("bhlc,ehc->ble", o, ov)

    def init_cache(self, max_len: int) -> LatentKVCache:
        """A decoding cache for :class:`qkv.models.GPT`'s ``mixer_factory`` (``max_len`` tokens)."""
        return LatentKVCache(max_len)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim},"
            f" rope_dim={self.rope_dim}, kv_latent_dim={self.kv_latent_dim}, q_latent_dim={self.q_latent_dim},"
            f" absorb={self.absorb}"
        )

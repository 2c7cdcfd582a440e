"""Self-attention modules on the sub-quadratic backends: linear (elu+1), Performer (FAVOR+, with feature
redrawing) and Nyström attention.

:class:`LinearSelfAttention` projects ``x`` to queries, keys and values like
:class:`qkv.nn.attention.MultiHeadAttention` and calls ``qkv.attention`` with ``backend=kind``. It
follows the ``TransformerBlock`` mixer convention (``forward(x, mask=..., score_mod=..., cache=...)``),
so it drops into any block or :class:`qkv.nn.ssm.HybridStack`.

Performer layers hold their random feature matrix as a buffer and redraw it every
``redraw_interval`` training forward passes (Choromanski et al. redraw periodically during training);
:meth:`LinearSelfAttention.redraw_features` redraws on demand. Evaluation never redraws. ``qkv.nn.set_backend(model, "reference")`` turns these
layers into exact softmax attention with the same weights (to measure what the approximation costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import attention
from ..backends.linear import LinearAttentionState, elu_feature_map, is_causal_mask, step
from ..backends.performer import draw_projection
from ..masks import MaskLike, as_mask
from ..scores import ScoreMod, ScoreModFn
from .base import AttentionModule

__all__ = ["LinearAttentionCache", "LinearSelfAttention"]


@dataclass
class LinearAttentionCache:
    """A decoding cache for causal linear attention: the ``O(1)`` state after the tokens seen so far
    (``None`` before the first call). Made by :meth:`LinearSelfAttention.init_cache`."""

    state: LinearAttentionState | None = None


_KINDS = ("linear", "performer", "nystrom")


class LinearSelfAttention(AttentionModule):
    """Multi-head self-attention computed by a sub-quadratic backend.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``H`` (must divide ``E``).
        kind: ``"linear"``, ``"performer"`` or ``"nystrom"``.
        num_features: Performer's random features ``m``.
        num_landmarks: Nyström's landmarks.
        redraw_interval: Performer redraws its features every this many training forward passes
            (``0``: never).
        seed: seeds the first feature draw and the generator of later redraws.
        chunk_size: chunk length of the causal forms.
        bias: biases of the projections.

    ``forward(x, mask=None)``: ``x (B, L, E) -> (B, L, E)``; ``mask`` may be ``None`` or ``causal()``
    (``nystrom``: ``None`` only).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kind: str = "linear",
        *,
        num_features: int = 64,
        num_landmarks: int = 32,
        redraw_interval: int = 1000,
        seed: int = 0,
        chunk_size: int = 64,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"LinearSelfAttention: kind must be one of {_KINDS}, got {kind!r}")
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"LinearSelfAttention: num_heads={num_heads} must be >= 1 and divide embed_dim={embed_dim}"
            )
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kind = kind
        self.backend = kind
        self.num_landmarks, self.chunk_size, self.redraw_interval = num_landmarks, chunk_size, redraw_interval
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._gen = torch.Generator().manual_seed(seed)
        self._calls = 0
        self.projection: Tensor
        self.register_buffer("projection", draw_projection(num_features, self.head_dim, generator=self._gen))

    def redraw_features(self) -> None:
        """Draw a new Performer feature matrix (from this layer's generator)."""
        p = self.projection
        self.projection = draw_projection(p.shape[0], p.shape[1], generator=self._gen, dtype=p.dtype, device=p.device)

    def _options(self) -> dict[str, Any]:
        if self.backend != self.kind:  # switched by qkv.nn.set_backend, e.g. to exact attention
            return {}
        if self.kind == "linear":
            return {"chunk_size": self.chunk_size}
        if self.kind == "performer":
            return {"projection": self.projection, "chunk_size": self.chunk_size}
        return {"num_landmarks": self.num_landmarks}

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        return tuple(p(x).view(B, L, H, Dh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # type: ignore[return-value]

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: Any = None,
    ) -> Tensor:
        """``x (B, L, E) -> (B, L, E)``.

        ``cache`` (``kind="linear"``, ``mask=causal()``): a :class:`LinearAttentionCache` from
        :meth:`init_cache`; ``x`` holds the tokens after those the cache has seen, and the cache
        advances (the GPT decoding hook)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"LinearSelfAttention: x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        if cache is not None:
            return self._cached(x, cache, mask, score_mod)
        if self.kind == "performer" and self.training and self.redraw_interval > 0:
            if self._calls and self._calls % self.redraw_interval == 0:
                self.redraw_features()
            self._calls += 1
        B, L, _ = x.shape
        q, k, v = self._heads(x)
        out = self.attend(q, k, v, mask=as_mask(mask), score_mod=score_mod, **self._options())
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

    def init_cache(self, max_len: int | None = None) -> LinearAttentionCache:
        """An empty :class:`LinearAttentionCache` (``kind="linear"`` only); ``max_len`` is ignored."""
        if self.kind != "linear":
            raise NotImplementedError(f"LinearSelfAttention: kind={self.kind!r} has no recurrent form to cache")
        return LinearAttentionCache()

    def _cached(self, x: Tensor, cache: Any, mask: MaskLike | None, score_mod: ScoreMod | ScoreModFn | None) -> Tensor:
        if not isinstance(cache, LinearAttentionCache):
            raise TypeError(f"LinearSelfAttention: cache must be a LinearAttentionCache, got {type(cache).__name__}")
        if self.kind != "linear" or self.backend != "linear" or not is_causal_mask(as_mask(mask)) or score_mod:
            raise ValueError("LinearSelfAttention: a cache serves kind='linear' with mask=causal() and no score_mod")
        B, L, _ = x.shape
        if cache.state is None and L > 1:  # prefill: the parallel form, then the state of all L tokens
            q, k, v = self._heads(x)
            out = attention(q, k, v, mask=as_mask(mask), backend="linear", chunk_size=self.chunk_size)
            fk = elu_feature_map(k)
            cache.state = LinearAttentionState(fk.transpose(-1, -2) @ v, fk.sum(-2), L)
            return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        outs = []
        for t in range(L):
            o, cache.state = self.step(x[:, t], cache.state)
            outs.append(o)
        return torch.stack(outs, 1)

    def step(self, x_t: Tensor, state: LinearAttentionState | None = None) -> tuple[Tensor, LinearAttentionState]:
        """Causal decoding of one token (``kind="linear"`` only): ``x_t (B, E)`` -> ``(B, E)`` and the
        new :class:`qkv.backends.linear.LinearAttentionState`; equal to ``forward(x, mask=causal())``
        at that position."""
        if self.kind != "linear":
            raise ValueError(f"LinearSelfAttention.step: only kind='linear' has a recurrent form, got {self.kind!r}")
        if x_t.dim() != 2 or x_t.shape[-1] != self.embed_dim:
            raise ValueError(f"LinearSelfAttention.step: x_t must be (B, {self.embed_dim}), got {tuple(x_t.shape)}")
        q, k, v = (t[:, :, 0] for t in self._heads(x_t.unsqueeze(1)))
        out, state = step(q, k, v, state)
        return self.out_proj(out.reshape(x_t.shape[0], self.embed_dim)), state

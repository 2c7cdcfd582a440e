"""Transformer blocks: an encoder block (token mixer + feed-forward) and a decoder block (self-attention,
cross-attention, feed-forward), each pre-norm or post-norm, with LayerNorm or RMSNorm and a GELU, ReLU
or SwiGLU feed-forward.

Post-norm (Vaswani et al. 2017, ``torch.nn.TransformerEncoderLayer``'s default)::

    x = norm1(x + dropout(attn(x)));  x = norm2(x + dropout(ff(x)))

Pre-norm (GPT-2 and most models since)::

    x = x + dropout(attn(norm1(x)));  x = x + dropout(ff(norm2(x)))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..masks import MaskLike
from ..scores import ScoreMod, ScoreModFn
from .attention import Cache, MultiHeadAttention
from .cache import CrossAttentionKVCache
from .positional import RotaryEmbedding

__all__ = ["DecoderBlock", "EncoderBlock", "FeedForward", "TransformerBlock", "make_norm"]

_ACTS = ("relu", "gelu", "gelu_tanh", "swiglu")
_NORMS = ("layer", "rms")


def _dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` when ``p == 0`` (cheaper on the decoding path)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``"layer"``: ``nn.LayerNorm(dim)``; ``"rms"``: ``nn.RMSNorm(dim)`` (Zhang & Sennrich 2019)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {_NORMS}, got {kind!r}")


class FeedForward(nn.Module):
    """Position-wise feed-forward network.

    ``relu``/``gelu``/``gelu_tanh``: ``linear2(dropout(act(linear1(x))))`` (the names of
    ``torch.nn.TransformerEncoderLayer``). ``swiglu`` (Shazeer 2020):
    ``w_down(dropout(silu(w_gate(x)) * w_up(x)))``.

    Args:
        d_model: input and output width ``E``.
        d_ff: hidden width.
        activation: one of ``relu``, ``gelu`` (exact), ``gelu_tanh``, ``swiglu``.
        dropout: on the hidden activations, in training mode.
        bias: biases in the linear layers.
    """

    def __init__(
        self, d_model: int, d_ff: int, *, activation: str = "gelu", dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"FeedForward: activation must be one of {_ACTS}, got {activation!r}")
        self.activation = activation
        self.dropout = _dropout(dropout)
        if activation == "swiglu":
            self.w_gate = nn.Linear(d_model, d_ff, bias=bias)
            self.w_up = nn.Linear(d_model, d_ff, bias=bias)
            self.w_down = nn.Linear(d_ff, d_model, bias=bias)
        else:
            self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
            self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., E)`` -> ``(..., E)``."""
        if self.activation == "swiglu":
            return self.w_down(self.dropout(F.silu(self.w_gate(x)) * self.w_up(x)))
        h = self.linear1(x)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.linear2(self.dropout(h))


def _torch_activation(layer: Any) -> str:
    kind = getattr(layer, "activation_relu_or_gelu", 0)
    if kind == 1 or layer.activation is F.relu:
        return "relu"
    if kind == 2 or layer.activation is F.gelu:
        return "gelu"
    raise ValueError(f"from_torch: activation {layer.activation!r} has no qkv counterpart (relu or gelu)")


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    dst.weight.copy_(src.weight)
    if src.bias is not None and dst.bias is not None:
        dst.bias.copy_(src.bias)


def _copy_norm(dst: nn.Module, src: nn.LayerNorm) -> None:
    assert isinstance(dst, nn.LayerNorm)
    dst.weight.copy_(src.weight)
    if src.bias is not None and dst.bias is not None:
        dst.bias.copy_(src.bias)


def _shaped_like_torch(cls: Any, layer: Any) -> Any:
    """A ``cls`` block with the sizes, dropout, norm order, activation, bias and eps of torch's
    ``TransformerEncoderLayer``/``TransformerDecoderLayer`` ``layer``, on its device and dtype."""
    sa = layer.self_attn
    new = cls(
        sa.embed_dim,
        sa.num_heads,
        layer.linear1.out_features,
        dropout=float(layer.dropout.p),
        norm_first=layer.norm_first,
        activation=_torch_activation(layer),
        bias=layer.linear1.bias is not None,
        eps=layer.norm1.eps,
    )
    p = next(layer.parameters())
    new.to(device=p.device, dtype=p.dtype)  # before copying, so that no weight is rounded
    return new


def _copy_ff_and_norms(new: nn.Module, layer: nn.Module, n_norms: int) -> None:
    """Copy torch ``layer``'s feed-forward and its ``norm1 .. norm{n_norms}`` into block ``new``."""
    with torch.no_grad():
        _copy_linear(new.ff.linear1, layer.linear1)  # type: ignore[union-attr,arg-type]
        _copy_linear(new.ff.linear2, layer.linear2)  # type: ignore[union-attr,arg-type]
        for i in range(1, n_norms + 1):
            _copy_norm(getattr(new, f"norm{i}"), getattr(layer, f"norm{i}"))


class TransformerBlock(nn.Module):
    """A token mixer (self-attention by default) and a feed-forward network, each in a residual
    branch; pre-norm or post-norm. This is the encoder block and, with a causal mask, a GPT block.

    Args:
        d_model: width ``E``.
        n_heads: attention heads.
        d_ff: feed-forward hidden width; default ``4 * d_model``.
        n_kv_heads: key/value heads for GQA/MQA (``None`` = ``n_heads``).
        dropout: on the attention weights, the hidden activations and both residual branches.
        norm: ``"layer"`` or ``"rms"``.
        norm_first: pre-norm when True, post-norm (Vaswani, PyTorch's default) when False.
        activation: ``relu``, ``gelu``, ``gelu_tanh`` or ``swiglu``.
        bias: biases in linear layers and LayerNorms.
        eps: the norms' epsilon.
        rope: a :class:`RotaryEmbedding` for the attention (see :class:`MultiHeadAttention`).
        qk_norm: QK-norm in the attention.
        mixer: replaces the self-attention: any module called as
            ``mixer(x, mask=..., score_mod=..., cache=...) -> (B, L, E)`` (a state-space layer, a
            linear-attention layer, ...). It is stored as ``self.mixer`` like the attention.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        *,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        norm: str = "layer",
        norm_first: bool = False,
        activation: str = "gelu",
        bias: bool = True,
        eps: float = 1e-5,
        rope: RotaryEmbedding | bool | None = None,
        qk_norm: bool = False,
        mixer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.mixer: nn.Module = (
            mixer
            if mixer is not None
            else MultiHeadAttention(
                d_model, n_heads, num_kv_heads=n_kv_heads, bias=bias, dropout=dropout, qk_norm=qk_norm, rope=rope
            )
        )
        self.ff = FeedForward(d_model, d_ff or 4 * d_model, activation=activation, dropout=dropout, bias=bias)
        self.norm1 = make_norm(norm, d_model, eps, bias)
        self.norm2 = make_norm(norm, d_model, eps, bias)
        self.dropout1 = _dropout(dropout)
        self.dropout2 = _dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: Any = None,
    ) -> Tensor:
        """``x (B, L, E)`` -> ``(B, L, E)``; ``mask``, ``score_mod`` and ``cache`` go to the mixer
        (see :meth:`MultiHeadAttention.forward`)."""
        if self.norm_first:
            x = x + self.dropout1(self.mixer(self.norm1(x), mask=mask, score_mod=score_mod, cache=cache))
            return x + self.dropout2(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.mixer(x, mask=mask, score_mod=score_mod, cache=cache)))
        return self.norm2(x + self.dropout2(self.ff(x)))

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> TransformerBlock:
        """A copy of ``torch.nn.TransformerEncoderLayer`` ``layer`` (inputs always ``(B, L, E)``)."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"from_torch: expected torch.nn.TransformerEncoderLayer, got {type(layer).__name__}")
        new = _shaped_like_torch(cls, layer)
        new.mixer = MultiHeadAttention.from_torch(layer.self_attn)
        _copy_ff_and_norms(new, layer, 2)
        new.train(layer.training)
        return new


EncoderBlock = TransformerBlock


class DecoderBlock(nn.Module):
    """Vaswani et al.'s decoder block: causal self-attention, cross-attention to the encoder output
    (``memory``), feed-forward; pre-norm or post-norm. Arguments as :class:`TransformerBlock`, plus
    ``memory_dim`` (the encoder output's width, default ``d_model``)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        *,
        n_kv_heads: int | None = None,
        memory_dim: int | None = None,
        dropout: float = 0.0,
        norm: str = "layer",
        norm_first: bool = False,
        activation: str = "gelu",
        bias: bool = True,
        eps: float = 1e-5,
        rope: RotaryEmbedding | bool | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, num_kv_heads=n_kv_heads, bias=bias, dropout=dropout, qk_norm=qk_norm, rope=rope
        )
        self.cross_attn = MultiHeadAttention(
            d_model, n_heads, num_kv_heads=n_kv_heads, kdim=memory_dim, bias=bias, dropout=dropout, qk_norm=qk_norm
        )
        self.ff = FeedForward(d_model, d_ff or 4 * d_model, activation=activation, dropout=dropout, bias=bias)
        self.norm1 = make_norm(norm, d_model, eps, bias)
        self.norm2 = make_norm(norm, d_model, eps, bias)
        self.norm3 = make_norm(norm, d_model, eps, bias)
        self.dropout1 = _dropout(dropout)
        self.dropout2 = _dropout(dropout)
        self.dropout3 = _dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        mask: MaskLike | None = None,
        memory_mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: Cache | None = None,
        memory_cache: CrossAttentionKVCache | None = None,
    ) -> Tensor:
        """Decode.

        Args:
            x: target-side input ``(B, L, E)``.
            memory: encoder output ``(B, S, memory_dim)`` (may be ``None`` once ``memory_cache`` is filled).
            mask: self-attention mask (usually ``qkv.masks.causal()``).
            memory_mask: cross-attention mask ``(B, H, L, S)``-broadcastable (e.g. source padding).
            score_mod: self-attention score mod.
            cache: self-attention :class:`KVCache` for step-by-step decoding.
            memory_cache: a :class:`CrossAttentionKVCache` keeping the projected memory across steps.
        """

        def sa(h: Tensor) -> Tensor:
            return self.dropout1(self.self_attn(h, mask=mask, score_mod=score_mod, cache=cache))

        def ca(h: Tensor) -> Tensor:
            return self.dropout2(self.cross_attn(h, memory, mask=memory_mask, cache=memory_cache))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + self.dropout3(self.ff(self.norm3(x)))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + self.dropout3(self.ff(x)))

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> DecoderBlock:
        """A copy of ``torch.nn.TransformerDecoderLayer`` ``layer`` (inputs always ``(B, L, E)``)."""
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise TypeError(f"from_torch: expected torch.nn.TransformerDecoderLayer, got {type(layer).__name__}")
        new = _shaped_like_torch(cls, layer)
        new.self_attn = MultiHeadAttention.from_torch(layer.self_attn)
        new.cross_attn = MultiHeadAttention.from_torch(layer.multihead_attn)
        _copy_ff_and_norms(new, layer, 3)
        new.train(layer.training)
        return new

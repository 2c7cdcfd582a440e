"""The Transformer of Vaswani et al. 2017: an encoder stack, a decoder stack and the encoder-decoder
model with token embeddings scaled by ``sqrt(d_model)``, sinusoidal positions and greedy decoding
(with or without KV caches)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import Mask, MaskLike, causal, padding
from ..nn.base import BackendSwitch
from ..nn.blocks import DecoderBlock, TransformerBlock, make_norm
from ..nn.cache import CrossAttentionKVCache, FixedKVCache
from ..nn.positional import SinusoidalPositionalEncoding
from ..scores import ScoreMod, ScoreModFn

__all__ = ["Transformer", "TransformerDecoder", "TransformerEncoder"]


def _block_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    allowed = {"n_kv_heads", "dropout", "norm", "norm_first", "activation", "bias", "eps", "rope", "qk_norm"}
    bad = set(kw) - allowed
    if bad:
        raise TypeError(f"unexpected block argument(s): {', '.join(sorted(bad))}")
    return kw


def _final_norm(kw: dict[str, Any], d_model: int, final_norm: bool | None) -> nn.Module | None:
    """The norm after the last block: by default only for pre-norm stacks, which need it."""
    if not (bool(kw.get("norm_first", False)) if final_norm is None else final_norm):
        return None
    return make_norm(kw.get("norm", "layer"), d_model, kw.get("eps", 1e-5), kw.get("bias", True))


class TransformerEncoder(BackendSwitch, nn.Module):
    """A stack of :class:`qkv.nn.TransformerBlock` over embeddings ``(B, L, E)``.

    Args:
        n_layers: number of blocks.
        d_model, n_heads, d_ff: block sizes.
        final_norm: a norm after the last block (default: when pre-norm, as pre-norm stacks need).
        **block_kwargs: ``n_kv_heads``, ``dropout``, ``norm``, ``norm_first``, ``activation``,
            ``bias``, ``eps``, ``rope``, ``qk_norm`` for every block.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        *,
        final_norm: bool | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        kw = _block_kwargs(block_kwargs)
        self.layers = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff, **kw) for _ in range(n_layers))
        self.norm = _final_norm(kw, d_model, final_norm)

    def forward(
        self, x: Tensor, *, mask: MaskLike | None = None, score_mod: ScoreMod | ScoreModFn | None = None
    ) -> Tensor:
        """``x (B, L, E)`` -> ``(B, L, E)``; ``mask`` (e.g. ``qkv.masks.padding(lengths)``) and
        ``score_mod`` go to every layer's attention."""
        for layer in self.layers:
            x = layer(x, mask=mask, score_mod=score_mod)
        return self.norm(x) if self.norm is not None else x


class TransformerDecoder(BackendSwitch, nn.Module):
    """A stack of :class:`qkv.nn.DecoderBlock` (causal self-attention, cross-attention, feed-forward).

    Arguments as :class:`TransformerEncoder`, plus ``memory_dim`` (encoder output width)."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        *,
        memory_dim: int | None = None,
        final_norm: bool | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        kw = _block_kwargs(block_kwargs)
        self.layers = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff, memory_dim=memory_dim, **kw) for _ in range(n_layers)
        )
        self.norm = _final_norm(kw, d_model, final_norm)

    def make_caches(self, max_len: int) -> list[tuple[FixedKVCache, CrossAttentionKVCache]]:
        """One (self-attention, cross-attention) cache pair per layer, for ``max_len`` target tokens."""
        return [(FixedKVCache(max_len), CrossAttentionKVCache()) for _ in self.layers]

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        mask: MaskLike | None = None,
        memory_mask: MaskLike | None = None,
        caches: list[tuple[FixedKVCache, CrossAttentionKVCache]] | None = None,
    ) -> Tensor:
        """Decode.

        Args:
            x: target embeddings ``(B, L, E)`` (with caches: the new tokens only).
            memory: encoder output ``(B, S, memory_dim)``; may be ``None`` once the caches hold it.
            mask: self-attention mask; default ``qkv.masks.causal()``.
            memory_mask: cross-attention mask (e.g. ``qkv.masks.padding(src_lengths)``).
            caches: from :meth:`make_caches`, for step-by-step decoding.
        """
        m: MaskLike = causal() if mask is None else mask
        for i, layer in enumerate(self.layers):
            sc, mc = caches[i] if caches is not None else (None, None)
            x = layer(x, memory, mask=m, memory_mask=memory_mask, cache=sc, memory_cache=mc)
        return self.norm(x) if self.norm is not None else x


class Transformer(BackendSwitch, nn.Module):
    """Vaswani et al.'s encoder-decoder for sequence-to-sequence tasks.

    Token embeddings are multiplied by ``sqrt(d_model)`` and added to sinusoidal positions; the output
    layer shares the target embedding's weights.

    Args:
        src_vocab: source vocabulary size.
        tgt_vocab: target vocabulary size.
        d_model, n_heads, d_ff: sizes (512, 8, 2048 in the paper's base model).
        n_layers: encoder layers; ``n_decoder_layers`` defaults to the same.
        dropout: 0.1 in the paper.
        max_len: longest source or target sequence.
        norm_first: pre-norm instead of the paper's post-norm.
        **block_kwargs: other block options (``norm``, ``activation``, ``n_kv_heads``, ...).
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        d_ff: int | None = 2048,
        *,
        n_decoder_layers: int | None = None,
        dropout: float = 0.1,
        max_len: int = 512,
        norm_first: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.src_emb = nn.Embedding(src_vocab, d_model)
        self.tgt_emb = nn.Embedding(tgt_vocab, d_model)
        nn.init.normal_(self.src_emb.weight, std=d_model**-0.5)
        nn.init.normal_(self.tgt_emb.weight, std=d_model**-0.5)
        self.pos = SinusoidalPositionalEncoding(d_model, max_len)
        self.drop = nn.Dropout(dropout)
        kw = dict(block_kwargs, dropout=dropout, norm_first=norm_first)
        self.encoder = TransformerEncoder(n_layers, d_model, n_heads, d_ff, **kw)
        self.decoder = TransformerDecoder(n_decoder_layers or n_layers, d_model, n_heads, d_ff, **kw)
        self.generator = nn.Linear(d_model, tgt_vocab, bias=False)
        self.generator.weight = self.tgt_emb.weight

    def _src_mask(self, src: Tensor, src_lengths: Tensor | None) -> Mask | None:
        if src_lengths is None:
            return None
        if src_lengths.shape != (src.shape[0],):
            raise ValueError(f"src_lengths must be (B,) = ({src.shape[0]},), got {tuple(src_lengths.shape)}")
        return padding(src_lengths)

    def encode(self, src: Tensor, src_lengths: Tensor | None = None) -> Tensor:
        """Source ids ``(B, S)`` (right-padded to ``src_lengths (B,)`` if given) -> memory ``(B, S, E)``."""
        x = self.drop(self.pos(self.src_emb(src) * math.sqrt(self.d_model)))
        return self.encoder(x, mask=self._src_mask(src, src_lengths))

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor | None,
        src_lengths: Tensor | None = None,
        *,
        caches: list[tuple[FixedKVCache, CrossAttentionKVCache]] | None = None,
        offset: int = 0,
    ) -> Tensor:
        """Target ids ``(B, T)`` (with caches: the tokens after the ``offset`` already decoded) and
        memory -> logits ``(B, T, tgt_vocab)``; position ``t`` predicts target token ``t + 1``."""
        x = self.drop(self.pos(self.tgt_emb(tgt) * math.sqrt(self.d_model), offset))
        mm = padding(src_lengths) if src_lengths is not None else None
        return self.generator(self.decoder(x, memory, memory_mask=mm, caches=caches))

    def forward(self, src: Tensor, tgt: Tensor, src_lengths: Tensor | None = None) -> Tensor:
        """Teacher-forced logits ``(B, T, tgt_vocab)`` for source ids ``(B, S)`` and target inputs ``(B, T)``."""
        return self.decode(tgt, self.encode(src, src_lengths), src_lengths)

    @torch.no_grad()
    def greedy_decode(
        self,
        src: Tensor,
        bos: int,
        max_len: int,
        *,
        src_lengths: Tensor | None = None,
        eos: int | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Greedy translation: ``(B, 1 + n)`` target ids starting with ``bos``, at most ``max_len``
        new tokens (stopping early when every row has produced ``eos``). Cached and uncached
        decoding give the same tokens."""
        was = self.training
        self.eval()
        try:
            memory = self.encode(src, src_lengths)
            out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
            caches = self.decoder.make_caches(max_len + 1) if use_cache else None
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            for t in range(max_len):
                if caches is not None:
                    logits = self.decode(out[:, -1:], memory, src_lengths, caches=caches, offset=t)
                else:
                    logits = self.decode(out, memory, src_lengths)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out = torch.cat((out, nxt), dim=1)
                if eos is not None:
                    done |= nxt[:, 0] == eos
                    if bool(done.all()):
                        break
            return out
        finally:
            self.train(was)

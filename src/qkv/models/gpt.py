"""A GPT-style decoder-only language model with a choice of positions (RoPE, ALiBi, learned,
sinusoidal), grouped-query attention, sliding-window attention with a ring-buffer cache, and
generation with greedy, temperature, top-k and top-p (nucleus) sampling.

Swapping the token mixer: ``GPT(..., mixer_factory=f)`` calls ``f(layer_index)`` for each layer; a
module it returns replaces that layer's self-attention (``None`` keeps attention). Such a mixer is
called as ``mixer(x, mask=..., score_mod=..., cache=...)`` with ``x (B, L, d_model)`` and returns the
same shape; to decode with a cache it defines ``init_cache(max_len)`` whose result it then receives
as ``cache=`` (the new tokens only, in order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import Mask, MaskLike, as_mask, causal, sliding_window
from ..nn.attention import MultiHeadAttention
from ..nn.base import BackendSwitch
from ..nn.blocks import TransformerBlock, make_norm
from ..nn.cache import FixedKVCache, SinkKVCache, SlidingWindowKVCache
from ..nn.positional import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding
from ..scores import ScoreMod, alibi

__all__ = ["GPT", "GPTCache", "sample_next"]

_POS = ("rope", "alibi", "learned", "sinusoidal")


class GPTCache:
    """The decoding state of a :class:`GPT`: one cache per layer and the number of tokens seen."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.seen = 0


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from ``logits (B, V)``; returns ``(B, 1)`` token ids.

    Args:
        logits: unnormalised scores of the next token.
        temperature: divides the logits; ``0`` picks the most likely token (greedy).
        top_k: keep only the ``top_k`` most likely tokens.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling, Holtzman et al. 2020); the most likely token is always kept.
        generator: a ``torch.Generator`` for reproducible sampling.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next: logits must be (B, V), got {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"sample_next: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample_next: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample_next: top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class GPT(BackendSwitch, nn.Module):
    """Decoder-only transformer language model (pre-norm blocks, tied input/output embeddings).

    Args:
        vocab_size: number of tokens ``V``.
        d_model: width ``E``.
        n_layers: number of blocks.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads (GQA/MQA); ``None`` = ``n_heads``.
        max_len: longest sequence for ``learned``/``sinusoidal`` positions (and the default size
            of decoding caches).
        pos: ``"rope"`` (rotary), ``"alibi"`` (linear biases), ``"learned"`` or ``"sinusoidal"``.
        window: sliding-window attention: each token sees its ``window`` most recent tokens, itself
            included (``causal() & sliding_window(window - 1)``); decoding then uses a ring buffer of
            ``window`` slots per layer. ``None``: full causal attention.
        d_ff: feed-forward width (default ``4 * d_model``).
        dropout: dropout everywhere, in training mode.
        norm: ``"layer"`` or ``"rms"``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"swiglu"``.
        bias: biases in linear layers and norms.
        mixer_factory: ``mixer_factory(layer_index) -> nn.Module | None`` replaces the attention of
            chosen layers by another token mixer (see the module docstring).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        max_len: int,
        pos: str = "rope",
        window: int | None = None,
        d_ff: int | None = None,
        dropout: float = 0.0,
        norm: str = "layer",
        activation: str = "gelu",
        bias: bool = True,
        mixer_factory: Callable[[int], nn.Module | None] | None = None,
    ) -> None:
        super().__init__()
        if pos not in _POS:
            raise ValueError(f"GPT: pos must be one of {_POS}, got {pos!r}")
        if window is not None and window < 1:
            raise ValueError(f"GPT: window must be None or >= 1, got {window}")
        if max_len < 1 or d_model % n_heads:
            raise ValueError(
                f"GPT: need max_len >= 1 and n_heads dividing d_model, got {max_len}, {n_heads}, {d_model}"
            )
        self.vocab_size, self.d_model, self.max_len, self.pos, self.window = vocab_size, d_model, max_len, pos, window
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.pos_emb: nn.Module | None = None
        if pos == "learned":
            self.pos_emb = LearnedPositionalEmbedding(max_len, d_model)
        elif pos == "sinusoidal":
            self.pos_emb = SinusoidalPositionalEncoding(d_model, max_len)
        rope = RotaryEmbedding(d_model // n_heads) if pos == "rope" else None
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(n_layers):
            mixer = mixer_factory(i) if mixer_factory is not None else None
            blocks.append(
                TransformerBlock(
                    d_model,
                    n_heads,
                    d_ff,
                    n_kv_heads=n_kv_heads,
                    dropout=dropout,
                    norm=norm,
                    norm_first=True,
                    activation=activation,
                    bias=bias,
                    rope=rope,
                    mixer=mixer,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(norm, d_model, 1e-5, bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.mask: Mask = causal() if window is None else sliding_window(window - 1)
        self.score_mod: ScoreMod | None = alibi(n_heads) if pos == "alibi" else None
        self._head_t: tuple[Any, Tensor] | None = None

    def make_cache(
        self, max_len: int | None = None, *, recent: int | None = None, sinks: int = 0, positions: str = "cache"
    ) -> GPTCache:
        """Fresh decoding caches for ``max_len`` tokens in all (default ``self.max_len``): a
        :class:`FixedKVCache` per attention layer, a :class:`SlidingWindowKVCache` with a window.

        With ``recent``, a streaming cache (StreamingLLM, :class:`~qkv.nn.SinkKVCache`) per attention
        layer instead: the first ``sinks`` tokens and the ``recent`` most recent ones, at in-cache
        positions (``positions="cache"``, as StreamingLLM) or at their positions in the text
        (``"original"``); ``sinks=0`` is a plain window of ``recent`` tokens."""
        n = max_len or self.max_len
        if recent is not None and self.window is not None:
            raise ValueError(
                f"GPT.make_cache: this model attends within a window of {self.window} tokens and decodes with a ring"
                " buffer of that size already; recent= is for models with full causal attention"
            )
        layers: list[Any] = []
        for i, blk in enumerate(self.blocks):
            m = blk.mixer
            if isinstance(m, MultiHeadAttention) and recent is not None:
                layers.append(SinkKVCache(sinks, recent, rope=m.rope, positions=positions))
            elif recent is not None:
                raise ValueError(f"GPT.make_cache: layer {i} ({type(m).__name__}) has no streaming cache; recent= needs attention")
            elif isinstance(m, MultiHeadAttention):
                layers.append(SlidingWindowKVCache(self.window) if self.window is not None else FixedKVCache(n))
            elif hasattr(m, "init_cache"):
                layers.append(getattr(m, "init_cache")(n))  # noqa: B009
            else:
                raise NotImplementedError(
                    f"GPT: mixer {type(m).__name__} has no init_cache(max_len); use use_cache=False"
                )
        return GPTCache(layers)

    def forward(
        self, idx: Tensor, *, mask: MaskLike | None = None, cache: GPTCache | None = None, last_only: bool = False
    ) -> Tensor:
        """Next-token logits.

        Args:
            idx: token ids ``(B, L)``; with a cache, the ``L`` tokens that follow those it holds.
            mask: a mask ANDed with the model's own (causal, or its sliding window): ``qkv.masks.document(ids)``
                for packed sequences (``ids (B, L)``), ``qkv.masks.padding(lengths)`` for right-padded
                rows, ... With a cache it is written for the whole sequence (see
                :class:`~qkv.nn.MultiHeadAttention`).
            cache: from :meth:`make_cache`, for decoding; it advances by ``L``.
            last_only: compute the logits of the last position only.

        Returns:
            ``(B, L, V)`` logits (``(B, 1, V)`` with ``last_only``); position ``t`` predicts token ``t + 1``.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise ValueError(f"GPT: idx must be a (B, L) integer tensor, got {tuple(idx.shape)} {idx.dtype}")
        offset = cache.seen if cache is not None else 0
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = self.pos_emb(x, offset)
        x = self.drop(x)
        extra = as_mask(mask)
        m = self.mask if extra is None else self.mask & extra
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask=m, score_mod=self.score_mod, cache=cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.seen += idx.shape[1]
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if torch.is_grad_enabled() or x.shape[1] != 1:
            return self.lm_head(x)
        # decoding: a (E, V) copy of the tied (V, E) weight makes this matrix-vector product about twice
        # as fast on CPUs; it is refreshed whenever the weight changes (in place or replaced)
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._head_t is None or self._head_t[0] != key:
            self._head_t = (key, w.detach().t().contiguous())
        return x @ self._head_t[1]

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        recent: int | None = None,
        sinks: int = 0,
    ) -> Tensor:
        """Continue the prompts ``idx (B, L)`` by ``max_new_tokens`` tokens; returns ``(B, L + max_new_tokens)``.

        With ``use_cache`` each step runs the new token only, reading earlier keys and values from
        the caches; without, each step reruns the whole sequence. Both give the same tokens (the
        same logits up to rounding). ``temperature=0`` is greedy; see :func:`sample_next` for
        ``top_k``, ``top_p`` and ``generator``. Runs in eval mode and restores the mode after.

        ``recent`` (with ``sinks``) decodes with StreamingLLM's cache (see :meth:`make_cache`): memory
        and time per token stay constant however long the generation, for models with RoPE or ALiBi."""
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"GPT.generate: idx must be (B, L) with L >= 1, got {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        total = idx.shape[1] + max_new_tokens
        if self.pos in ("learned", "sinusoidal") and total > self.max_len:
            raise ValueError(f"GPT.generate: {total} tokens exceed max_len={self.max_len} for pos={self.pos!r}")
        was_training = self.training
        self.eval()
        try:
            out = [idx]
            if max_new_tokens == 0:
                return idx
            sample: dict[str, Any] = {
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "generator": generator,
            }
            if recent is not None and not use_cache:
                raise ValueError("GPT.generate: recent= (a streaming cache) needs use_cache=True")
            if use_cache:
                cache = self.make_cache(total, recent=recent, sinks=sinks)
                logits = self(idx, cache=cache, last_only=True)[:, -1]
                for step in range(max_new_tokens):
                    nxt = sample_next(logits, **sample)
                    out.append(nxt)
                    if step + 1 < max_new_tokens:
                        logits = self(nxt, cache=cache, last_only=True)[:, -1]
                return torch.cat(out, dim=1)
            seq = idx
            for _ in range(max_new_tokens):
                nxt = sample_next(self(seq, last_only=True)[:, -1], **sample)
                seq = torch.cat((seq, nxt), dim=1)
            return seq
        finally:
            self.train(was_training)

"""An encoder-decoder that writes digit words, with cross-attention over the encoder's memory or, as the
no-attention baseline, through one fixed vector: what ``qkv train speech`` and ``qkv train caption`` train.

The decoder is a stack of :class:`qkv.nn.DecoderBlock` (causal self-attention over the words so far,
cross-attention to the memory, feed-forward). With ``bottleneck=True`` the memory ``(B, S, E)`` is replaced
by its mean over the ``S`` real positions, ``(B, 1, E)``: cross-attention over a single key gives every
query the same vector, so the decoder sees the input only through that one vector (Sutskever et al. 2014,
Cho et al. 2014) and everything else is identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import masks
from ...nn import DecoderBlock, SinusoidalPositionalEncoding, capture_weights
from .spoken import DIGIT_WORDS

__all__ = ["BOS", "EOS", "PAD", "VOCAB", "EncoderDecoder", "WordDecoder", "seq_loss", "targets"]

PAD, BOS, EOS = 0, 1, 2
VOCAB = ("<pad>", "<bos>", "<eos>", *DIGIT_WORDS)


def targets(seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Teacher-forcing inputs and outputs for digit sequences: ``(tgt_in, tgt_out)``, both ``(B, T + 1)``
    with ``T`` the longest sequence; ``tgt_in = <bos> w1 .. wn <pad>..``, ``tgt_out = w1 .. wn <eos> <pad>..``."""
    T = max(len(s) for s in seqs) + 1
    tin = torch.full((len(seqs), T), PAD, dtype=torch.long)
    tout = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids = [d + 3 for d in s]
        tin[i, : len(ids) + 1] = torch.tensor([BOS, *ids])
        tout[i, : len(ids) + 1] = torch.tensor([*ids, EOS])
    return tin, tout


class WordDecoder(nn.Module):
    """Word embeddings and sinusoidal positions, ``layers`` pre-norm :class:`qkv.nn.DecoderBlock` s, a final
    norm and the output layer over :data:`VOCAB`."""

    def __init__(self, dim: int, heads: int, layers: int, *, max_len: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        # fixed positions (on the scale of the embeddings) tell each query its word index from the first step
        self.pos = SinusoidalPositionalEncoding(dim, max_len)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, heads, 2 * dim, dropout=dropout, norm_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(VOCAB))

    def forward(self, tokens: Tensor, memory: Tensor, memory_lengths: Tensor | None = None) -> Tensor:
        """``tokens (B, T)``, ``memory (B, S, E)`` with ``memory_lengths (B,)`` real positions (None: all)
        -> logits ``(B, T, len(VOCAB))``."""
        x = self.pos(self.embed(tokens))
        mmask = masks.padding(memory_lengths) if memory_lengths is not None else None
        for blk in self.blocks:
            x = blk(x, memory, mask=masks.causal(), memory_mask=mmask)
        return self.head(self.norm(x))


class EncoderDecoder(nn.Module):
    """``encoder(x, lengths) -> (memory (B, S, E), memory_lengths (B,) or None)`` and a :class:`WordDecoder`;
    ``bottleneck=True`` passes only the mean of the memory (the no-attention baseline)."""

    def __init__(self, encoder: nn.Module, decoder: WordDecoder, bottleneck: bool = False) -> None:
        super().__init__()
        self.encoder, self.decoder, self.bottleneck = encoder, decoder, bottleneck

    def memory(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The decoder's memory ``(B, S, E)`` (``(B, 1, E)`` with the bottleneck) and its real lengths."""
        mem, mlen = self.encoder(x, lengths)
        if not self.bottleneck:
            return mem, mlen
        if mlen is None:
            return mem.mean(1, keepdim=True), None
        keep = (torch.arange(mem.shape[1], device=mem.device)[None, :] < mlen[:, None]).to(mem.dtype)
        return (mem * keep[..., None]).sum(1, keepdim=True) / mlen.clamp(min=1)[:, None, None].to(mem.dtype), None

    def forward(self, x: Tensor, lengths: Tensor | None, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, len(VOCAB))``."""
        mem, mlen = self.memory(x, lengths)
        return self.decoder(tgt_in, mem, mlen)

    @torch.no_grad()
    def greedy(self, x: Tensor, lengths: Tensor | None, max_words: int) -> list[list[int]]:
        """Greedy decoding: the digits written for each input (up to ``max_words``, stopping at ``<eos>``)."""
        mem, mlen = self.memory(x, lengths)
        B = mem.shape[0]
        toks = torch.full((B, 1), BOS, dtype=torch.long, device=mem.device)
        done = torch.zeros(B, dtype=torch.bool, device=mem.device)
        for _ in range(min(max_words + 1, self.decoder.pos.max_len - 1)):
            nxt = self.decoder(toks, mem, mlen)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            toks = torch.cat([toks, nxt[:, None]], 1)
            done |= (nxt == EOS) | (nxt == PAD)
            if bool(done.all()):
                break
        out = []
        for row in toks[:, 1:].tolist():
            words: list[int] = []
            for t in row:
                if t < 3:
                    break
                words.append(t - 3)
            out.append(words[:max_words])
        return out

    @torch.no_grad()
    def cross_attention(self, x: Tensor, lengths: Tensor | None, digits: Sequence[Sequence[int]]) -> list[Tensor]:
        """Each decoder layer's cross-attention ``(B, H, T + 1, S)`` while reading ``<bos> digits``: row ``t``
        is where the decoder looked to write word ``t`` (the last row writes ``<eos>``)."""
        tin, _ = targets(digits)
        with capture_weights(self.decoder) as maps:
            self(x, lengths, tin.to(x.device))
        return [w for name, w in maps if name.endswith("cross_attn")]


def seq_loss(logits: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the non-padding targets."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=PAD, label_smoothing=label_smoothing
    )

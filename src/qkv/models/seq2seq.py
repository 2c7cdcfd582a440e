"""Encoder-decoder translators: a GRU ``Seq2Seq`` with no attention (Cho et al. 2014, the fixed-vector
bottleneck), Bahdanau (2015) or Luong (2015) attention, and a small ``TransformerSeq2Seq``.

Token conventions for both: ``pad_id`` pads, every target sequence starts with ``bos_id`` and ends with
``eos_id``. Sources are ``(B, Ls)`` int64 with their true lengths ``(B,)``; teacher-forced targets are
``(B, Lt)`` (the target shifted right, starting with BOS).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..masks import causal
from ..nn.additive import AdditiveAttention, LuongAttention
from ..nn.blocks import DecoderBlock, TransformerBlock

__all__ = ["Seq2Seq", "TransformerSeq2Seq"]

AttentionKind = Literal["none", "bahdanau", "luong"]


def _check_src(src: Tensor, src_lengths: Tensor, who: str) -> None:
    if src.dim() != 2 or src.dtype != torch.long:
        raise ValueError(f"{who}: src must be int64 (B, Ls), got {tuple(src.shape)} {src.dtype}")
    if src_lengths.shape != (src.shape[0],):
        raise ValueError(f"{who}: src_lengths must be (B,) = ({src.shape[0]},), got {tuple(src_lengths.shape)}")
    if int(src_lengths.min()) < 1 or int(src_lengths.max()) > src.shape[1]:
        raise ValueError(f"{who}: src_lengths must lie in [1, Ls={src.shape[1]}], got {src_lengths.tolist()}")


class Seq2Seq(nn.Module):
    """GRU encoder-decoder.

    The encoder is a bidirectional GRU over the source. The decoder is a GRU whose state starts from the
    encoder's final states, and:

    - ``attention="none"``: every step also reads one fixed vector, the encoder's final states — the
      whole source squeezed into ``hidden`` numbers (the bottleneck attention removes);
    - ``"bahdanau"``: before each step, :class:`qkv.nn.AdditiveAttention` from the previous decoder state
      over all encoder states gives a context vector read by the step (Bahdanau et al. 2015);
    - ``"luong"``: after each step, :class:`qkv.nn.LuongAttention` (``luong_score``) from the new state
      gives a context; ``tanh(W [c; h])`` predicts the token (Luong et al. 2015, no input feeding).

    Args:
        src_vocab: source vocabulary size.
        tgt_vocab: target vocabulary size.
        emb: embedding width.
        hidden: GRU width (each encoder direction and the decoder).
        attention: ``"none"``, ``"bahdanau"`` or ``"luong"``.
        luong_score: ``"dot"``, ``"general"`` or ``"concat"`` when ``attention="luong"``.
        pad_id, bos_id, eos_id: special token ids of the target (``pad_id`` also pads the source).
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        emb: int = 64,
        hidden: int = 128,
        attention: AttentionKind = "bahdanau",
        luong_score: Literal["dot", "general", "concat"] = "general",
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        super().__init__()
        if attention not in ("none", "bahdanau", "luong"):
            raise ValueError(f"Seq2Seq: attention must be 'none', 'bahdanau' or 'luong', got {attention!r}")
        self.attention_kind: str = attention
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.hidden = hidden
        self.src_emb = nn.Embedding(src_vocab, emb, padding_idx=pad_id)
        self.tgt_emb = nn.Embedding(tgt_vocab, emb, padding_idx=pad_id)
        self.encoder = nn.GRU(emb, hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, hidden)
        enc_dim = 2 * hidden
        self.bahdanau: AdditiveAttention | None = None
        self.luong: LuongAttention | None = None
        if attention == "luong":
            self.enc_proj = nn.Linear(enc_dim, hidden)  # keys in the decoder's space (dot needs equal dims)
            self.luong = LuongAttention(hidden, hidden, score=luong_score)
            self.cell = nn.GRUCell(emb, hidden)
            self.combine = nn.Linear(2 * hidden, hidden)
            self.out = nn.Linear(hidden, tgt_vocab)
        else:
            if attention == "bahdanau":
                self.bahdanau = AdditiveAttention(hidden, enc_dim, hidden)
            self.cell = nn.GRUCell(emb + enc_dim, hidden)
            self.out = nn.Linear(hidden + enc_dim + emb, tgt_vocab)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder states ``(B, Ls, 2*hidden)``, the fixed summary ``(B, 2*hidden)`` and the key mask ``(B, Ls)``."""
        _check_src(src, src_lengths, "Seq2Seq")
        packed = pack_padded_sequence(self.src_emb(src), src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        summary = torch.cat([h[0], h[1]], dim=-1)  # last state of each direction
        key_mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_lengths[:, None]
        return states, summary, key_mask

    def _step(
        self, y: Tensor, s: Tensor, states: Tensor, summary: Tensor, key_mask: Tensor, keys: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One decoder step from tokens ``y (B,)`` and state ``s (B, hidden)``: logits, new state, weights."""
        e = self.tgt_emb(y)
        if self.luong is not None:
            s = self.cell(e, s)
            assert keys is not None
            c, w = self.luong(s, keys, keys, mask=key_mask)
            return self.out(torch.tanh(self.combine(torch.cat([c, s], -1)))), s, w
        if self.bahdanau is not None:
            c, w = self.bahdanau(s, states, mask=key_mask, projected_keys=keys)
        else:
            c, w = summary, None
        s = self.cell(torch.cat([e, c], -1), s)
        return self.out(torch.cat([s, c, e], -1)), s, w

    def _prepare(self, states: Tensor) -> Tensor | None:
        if self.luong is not None:
            return self.enc_proj(states)
        if self.bahdanau is not None:
            return self.bahdanau.project_keys(states)
        return None

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing.

        Args:
            src: ``(B, Ls)`` source ids, padded with ``pad_id``.
            src_lengths: ``(B,)`` true source lengths.
            tgt_in: ``(B, Lt)`` target ids shifted right (first column ``bos_id``).

        Returns:
            logits ``(B, Lt, tgt_vocab)`` and alignments ``(B, Lt, Ls)`` (None without attention).
        """
        if tgt_in.dim() != 2 or tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"Seq2Seq: tgt_in must be (B, Lt) with B={src.shape[0]}, got {tuple(tgt_in.shape)}")
        states, summary, key_mask = self.encode(src, src_lengths)
        s = torch.tanh(self.bridge(summary))
        keys = self._prepare(states)
        if self.luong is not None and keys is not None:
            # no input feeding: run the decoder GRU over all steps, then attend from all states at once
            hs = []
            for t in range(tgt_in.shape[1]):
                s = self.cell(self.tgt_emb(tgt_in[:, t]), s)
                hs.append(s)
            h = torch.stack(hs, 1)
            c, w = self.luong(h, keys, keys, mask=key_mask)
            return self.out(torch.tanh(self.combine(torch.cat([c, h], -1)))), w
        logits, ws = [], []
        for t in range(tgt_in.shape[1]):
            lo, s, w = self._step(tgt_in[:, t], s, states, summary, key_mask, keys)
            logits.append(lo)
            if w is not None:
                ws.append(w)
        return torch.stack(logits, 1), (torch.stack(ws, 1) if ws else None)

    @torch.no_grad()
    def greedy(self, src: Tensor, src_lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor | None]:
        """Greedy decoding of at most ``max_len`` tokens.

        Returns:
            tokens ``(B, T)`` (without BOS; ``pad_id`` after each row's ``eos_id``) and alignments
            ``(B, T, Ls)`` (None without attention).
        """
        states, summary, key_mask = self.encode(src, src_lengths)
        s = torch.tanh(self.bridge(summary))
        keys = self._prepare(states)
        B = src.shape[0]
        y = torch.full((B,), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        toks, ws = [], []
        for _ in range(max_len):
            lo, s, w = self._step(y, s, states, summary, key_mask, keys)
            y = lo.argmax(-1)
            y = torch.where(done, torch.full_like(y, self.pad_id), y)
            toks.append(y)
            if w is not None:
                ws.append(w)
            done = done | (y == self.eos_id)
            if bool(done.all()):
                break
        return torch.stack(toks, 1), (torch.stack(ws, 1) if ws else None)


class TransformerSeq2Seq(nn.Module):
    """A small encoder-decoder Transformer (Vaswani et al. 2017, pre-norm, learned positions, GELU) of
    :class:`qkv.nn.TransformerBlock` s (``enc.i.mixer``: self-attention) and :class:`qkv.nn.DecoderBlock` s
    (``dec.i.self_attn``, ``dec.i.cross_attn``); capture with ``qkv.nn.capture_weights`` or the hook points.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        dim: model width; heads: attention heads; layers: encoder and decoder layers each.
        max_len: longest source or target sequence.
        dropout: dropout inside the blocks.
        pad_id, bos_id, eos_id: special token ids.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        max_len: int = 64,
        dropout: float = 0.0,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id, self.max_len = pad_id, bos_id, eos_id, max_len
        self.src_emb = nn.Embedding(src_vocab, dim)
        self.tgt_emb = nn.Embedding(tgt_vocab, dim)
        self.src_pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.tgt_pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.enc = nn.ModuleList(
            TransformerBlock(dim, heads, 2 * dim, dropout=dropout, norm_first=True) for _ in range(layers)
        )
        self.dec = nn.ModuleList(
            DecoderBlock(dim, heads, 2 * dim, dropout=dropout, norm_first=True) for _ in range(layers)
        )
        self.enc_norm = nn.LayerNorm(dim)
        self.dec_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, tgt_vocab)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Memory ``(B, Ls, dim)`` and the key mask ``(B, 1, 1, Ls)``."""
        _check_src(src, src_lengths, "TransformerSeq2Seq")
        if src.shape[1] > self.max_len:
            raise ValueError(f"TransformerSeq2Seq: source length {src.shape[1]} > max_len={self.max_len}")
        keep = (torch.arange(src.shape[1], device=src.device)[None, :] < src_lengths[:, None])[:, None, None, :]
        x = self.src_emb(src) + self.src_pos[: src.shape[1]]
        for blk in self.enc:
            x = blk(x, mask=keep)
        return self.enc_norm(x), keep

    def decode(self, memory: Tensor, keep: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits ``(B, Lt, tgt_vocab)`` for teacher-forced ``tgt_in`` ``(B, Lt)``."""
        Lt = tgt_in.shape[1]
        if Lt > self.max_len:
            raise ValueError(f"TransformerSeq2Seq: target length {Lt} > max_len={self.max_len}")
        y = self.tgt_emb(tgt_in) + self.tgt_pos[:Lt]
        for blk in self.dec:
            y = blk(y, memory, mask=causal(), memory_mask=keep)
        return self.out(self.dec_norm(y))

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: ``src (B, Ls)``, ``src_lengths (B,)``, ``tgt_in (B, Lt)`` -> logits ``(B, Lt, V)``."""
        memory, keep = self.encode(src, src_lengths)
        return self.decode(memory, keep, tgt_in)

    @torch.no_grad()
    def greedy(self, src: Tensor, src_lengths: Tensor, max_len: int) -> Tensor:
        """Greedy decoding: tokens ``(B, T)`` without BOS, ``pad_id`` after each row's EOS."""
        memory, keep = self.encode(src, src_lengths)
        B = src.shape[0]
        seq = torch.full((B, 1), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(min(max_len, self.max_len - 1)):
            y = self.decode(memory, keep, seq)[:, -1].argmax(-1)
            y = torch.where(done, torch.full_like(y, self.pad_id), y)
            seq = torch.cat([seq, y[:, None]], 1)
            done = done | (y == self.eos_id)
            if bool(done.all()):
                break
        return seq[:, 1:]

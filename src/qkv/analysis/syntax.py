"""Heads that follow syntax: for each relation, how often a head's most-attended word is the related word,
against the best fixed-offset baseline (the method of Clark et al. 2019, "What Does BERT Look At?", Sec. 4).

The method, as the paper and its released code do it:

- **Word-level attention.** Models read word pieces; relations hold between words. Attention *to* a word
  split into several pieces is the sum of the attention to its pieces; attention *from* such a word is the
  mean of its pieces' attention rows (:func:`word_attention`).
- **A head as a classifier.** For a *from* word, the head predicts the word it attends to most, leaving out
  the word itself and ``[CLS]`` / ``[SEP]`` (only the sentence's words are candidates)
  (:func:`attended_words`). Its accuracy on a relation is the share of the relation's pairs whose *to* word
  is that prediction. One departure from the paper's ``argmax``: a maximum shared by two or more words (a tie,
  which real attention maps do not produce) counts as no prediction, so a head that puts nothing on any word
  is never credited with the first one.
- **The baseline.** A fixed offset ``k`` predicts the word ``k`` places from the *from* word (none when that
  falls outside the sentence); the baseline of a relation is its best ``k`` in :data:`OFFSETS`, measured on
  the same pairs.
- **Best head.** Clark et al. report the best of 144 heads per relation in the direction dependent -> head (or
  its transpose); here each relation names its direction (``verb->object`` reads the verb's attention), and
  :meth:`SyntaxScores.best` gives the best head and the best offset per relation.

:func:`syntax_heads` runs a model on sentences (:mod:`qkv.analysis.syntax_sentences`) through
:func:`qkv.analysis.capture` and scores every head; :func:`syntax_scores` scores maps already captured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .capture import capture
from .syntax_sentences import Sentence

__all__ = [
    "OFFSETS",
    "SyntaxScores",
    "align_words",
    "attended_words",
    "syntax_heads",
    "syntax_scores",
    "word_attention",
]

OFFSETS = (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5)
"""The fixed offsets the baseline tries (Clark et al. tried -3 to 2; a wider range only makes it stronger)."""

Relation = tuple[int, int, str]


def _pieces_matrix(pieces: Sequence[Sequence[int]], L: int, dtype: torch.dtype) -> Tensor:
    """``(L, W)`` 0/1: token ``t`` belongs to word ``w``."""
    if len(pieces) == 0:
        raise ValueError("pieces is empty: a sentence needs at least one word")
    S = torch.zeros(L, len(pieces), dtype=dtype)
    for w, ts in enumerate(pieces):
        if len(ts) == 0:
            raise ValueError(f"pieces[{w}] is empty: every word needs at least one token")
        for t in ts:
            if not 0 <= int(t) < L:
                raise ValueError(f"pieces[{w}] has token position {t}, outside the {L} tokens of the maps")
            if S[int(t)].any():
                raise ValueError(f"token position {t} belongs to two words (pieces[{w}] and an earlier one)")
            S[int(t), w] = 1.0
    return S


def word_attention(weights: Tensor, pieces: Sequence[Sequence[int]]) -> Tensor:
    """Token-level attention to word-level attention (Clark et al. 2019): the sum over the key word's pieces,
    the mean over the query word's pieces.

    Args:
        weights: ``(..., L, L)`` attention weights (query token, key token), e.g. ``(layers, H, L, L)``.
        pieces: ``W`` lists of token positions, ``pieces[w]`` the pieces of word ``w`` (in ``[0, L)``, each
            token in at most one word). Tokens in no word (``[CLS]``, ``[SEP]``, padding) drop out.

    Returns:
        ``(..., W, W)`` in ``weights``' dtype: ``out[..., a, b]`` = mean over ``a``'s pieces of the attention
        they put on all of ``b``'s pieces.
    """
    if not isinstance(weights, Tensor) or not weights.is_floating_point() or weights.dim() < 2:
        raise TypeError(
            f"weights must be a floating-point tensor (..., L, L), got {getattr(weights, 'shape', type(weights))}"
        )
    L = weights.shape[-1]
    if weights.shape[-2] != L:
        raise ValueError(f"weights must be self-attention (..., L, L), got shape {tuple(weights.shape)}")
    S = _pieces_matrix(pieces, L, weights.dtype)
    M = S / S.sum(0, keepdim=True)  # mean over a query word's pieces
    return M.transpose(0, 1) @ weights @ S


def attended_words(word_att: Tensor) -> Tensor:
    """Each word's most-attended other word.

    Args:
        word_att: ``(..., W, W)`` word-level attention (:func:`word_attention`).

    Returns:
        ``(..., W)`` int64: for query word ``a`` the word ``b != a`` with the largest ``word_att[..., a, b]``;
        ``-1`` where that largest value is shared by two or more words (or ``W == 1``).
    """
    W = word_att.shape[-1]
    if word_att.dim() < 2 or word_att.shape[-2] != W:
        raise ValueError(f"word_att must be (..., W, W), got shape {tuple(word_att.shape)}")
    x = word_att.masked_fill(torch.eye(W, dtype=torch.bool), float("-inf"))
    top = x.max(dim=-1, keepdim=True).values
    pred = x.argmax(dim=-1)
    tie = ((x == top) & torch.isfinite(top)).sum(-1) != 1
    return pred.masked_fill(tie, -1)


@dataclass
class SyntaxScores:
    """Every head's accuracy on every relation, and every fixed offset's.

    Attributes:
        relations: the ``R`` relation names.
        counts: ``R`` pair counts (how many pairs each accuracy is over).
        accuracy: ``(R, layers, H)`` float64: the share of the relation's pairs whose *to* word is the head's
            most-attended word from the *from* word.
        offsets: the ``K`` offsets tried.
        baseline: ``(R, K)`` float64: the share of pairs whose *to* word lies ``offsets[k]`` words from the *from*
            word.
        sentences: how many sentences were scored.
    """

    relations: list[str]
    counts: list[int]
    accuracy: Tensor
    offsets: list[int]
    baseline: Tensor
    sentences: int

    def best(self) -> list[dict[str, Any]]:
        """One row per relation: ``relation``, ``n``, the best head (``layer``, ``head``, ``name`` as ``LxHy``,
        counting from 0) and its ``accuracy``, the best ``offset`` and its accuracy ``baseline``. Ties go to the
        lowest layer, then head (or the first offset in :attr:`offsets`)."""
        rows = []
        for r, name in enumerate(self.relations):
            acc = self.accuracy[r]
            flat = int(torch.argmax(acc.flatten()))
            layer, head = divmod(flat, acc.shape[1])
            k = int(torch.argmax(self.baseline[r]))
            rows.append(
                {
                    "relation": name,
                    "n": self.counts[r],
                    "layer": layer,
                    "head": head,
                    "name": f"L{layer}H{head}",
                    "accuracy": float(acc[layer, head]),
                    "offset": self.offsets[k],
                    "baseline": float(self.baseline[r, k]),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain lists (for JSON): the best rows and the full tables."""
        return {
            "sentences": self.sentences,
            "relations": self.relations,
            "counts": self.counts,
            "offsets": self.offsets,
            "accuracy": self.accuracy.tolist(),
            "baseline": self.baseline.tolist(),
            "best": self.best(),
        }


def syntax_scores(
    maps: Sequence[Tensor],
    pieces: Sequence[Sequence[Sequence[int]]],
    relations: Sequence[Sequence[Relation]],
    *,
    offsets: Sequence[int] = OFFSETS,
    names: Sequence[str] | None = None,
) -> SyntaxScores:
    """Score every head on every relation, and every fixed offset, over sentences whose maps are given.

    Args:
        maps: per sentence ``s``, its attention ``(layers, H, L_s, L_s)`` (query token, key token); all
            sentences share ``layers`` and ``H``. Padded positions may be included (they belong to no word).
        pieces: per sentence, its ``W_s`` words' token positions (:func:`word_attention`).
        relations: per sentence, ``(from word, to word, name)`` triples with word indices in ``[0, W_s)`` and
            ``from != to``.
        offsets: the fixed offsets for the baseline (non-zero ints).
        names: the relations to report, in this order (default: in order of first appearance); pairs of
            other relations are refused.

    Returns:
        :class:`SyntaxScores`.
    """
    if not (len(maps) == len(pieces) == len(relations)) or len(maps) == 0:
        raise ValueError(
            f"maps, pieces and relations need one entry per sentence (and at least one); got "
            f"{len(maps)}, {len(pieces)}, {len(relations)}"
        )
    offs = [int(k) for k in offsets]
    if not offs or 0 in offs:
        raise ValueError(f"offsets must be non-empty and non-zero, got {list(offsets)}")
    order = list(names) if names is not None else []
    if names is None:
        for rels in relations:
            for *_, n in rels:
                if n not in order:
                    order.append(n)
    if not order:
        raise ValueError("no relation to score: every sentence has an empty list of relations")
    index = {n: i for i, n in enumerate(order)}
    shape = None
    R, K = len(order), len(offs)
    hits: Tensor | None = None
    counts = torch.zeros(R, dtype=torch.long)
    base = torch.zeros(R, K, dtype=torch.float64)
    koff = torch.tensor(offs)
    for s, (w, ps, rels) in enumerate(zip(maps, pieces, relations)):
        if not isinstance(w, Tensor) or w.dim() != 4:
            raise ValueError(f"maps[{s}] must be (layers, H, L, L), got {getattr(w, 'shape', type(w))}")
        if shape is None:
            shape = tuple(w.shape[:2])
            hits = torch.zeros(R, *shape, dtype=torch.float64)
        elif tuple(w.shape[:2]) != shape:
            raise ValueError(f"maps[{s}] has (layers, H) = {tuple(w.shape[:2])}, maps[0] has {shape}")
        if not rels:
            continue
        W = len(ps)
        for a, b, n in rels:
            if n not in index:
                raise ValueError(f"relations[{s}] has relation {n!r}, not in names {order}")
            if not (0 <= a < W and 0 <= b < W) or a == b:
                raise ValueError(f"relations[{s}] has the pair ({a}, {b}, {n!r}); need two different words in [0, {W})")
        pred = attended_words(word_attention(w.double(), ps))  # (layers, H, W)
        src = torch.tensor([a for a, _, _ in rels])
        dst = torch.tensor([b for _, b, _ in rels])
        rid = torch.tensor([index[n] for *_, n in rels])
        ok = (pred[:, :, src] == dst).double()  # (layers, H, n)
        assert hits is not None
        hits.index_add_(0, rid, ok.permute(2, 0, 1))
        counts.index_add_(0, rid, torch.ones_like(rid))
        base.index_add_(0, rid, ((dst - src)[:, None] == koff[None, :]).double())
    assert hits is not None
    missing = [order[r] for r in range(R) if counts[r] == 0]
    if missing:
        raise ValueError(f"no pair of relation(s) {missing} in the sentences")
    c = counts.double()
    return SyntaxScores(
        relations=order,
        counts=counts.tolist(),
        accuracy=hits / c[:, None, None],
        offsets=offs,
        baseline=base / c[:, None],
        sentences=len(maps),
    )


def align_words(
    words: Sequence[str], tokens: Sequence[str], tokenize: Callable[[str], Sequence[str]]
) -> list[list[int]]:
    """Where each word's pieces sit in a tokenized sentence.

    Args:
        words: the ``W`` words of the sentence, in order.
        tokens: the model's ``L`` tokens for the whole sentence (specials and padding included).
        tokenize: one word to its pieces, without special tokens (``BertTokenizer.tokenize``).

    Returns:
        ``W`` lists of positions in ``tokens``.

    Raises:
        ValueError: the words' pieces, concatenated, are not a contiguous run of ``tokens`` (a tokenizer that
            tokenizes a word differently inside a sentence).
    """
    per_word = [list(tokenize(w)) for w in words]
    flat = [t for p in per_word for t in p]
    toks = list(tokens)
    start = next((i for i in range(len(toks) - len(flat) + 1) if toks[i : i + len(flat)] == flat), None)
    if start is None or any(len(p) == 0 for p in per_word):
        raise ValueError(
            f"cannot align the words {list(words)} to the tokens {toks}: their pieces {flat} are not a run of them"
        )
    out, i = [], start
    for p in per_word:
        out.append(list(range(i, i + len(p))))
        i += len(p)
    return out


Encode = Callable[[list[str]], tuple[Mapping[str, Any], list[list[str]]]]
"""``encode(texts) -> (model inputs, tokens per text)``: how :func:`syntax_heads` tokenizes a batch of sentences."""


def syntax_heads(
    model: nn.Module,
    sentences: Sequence[Sentence],
    *,
    encode: Encode | None = None,
    tokenize: Callable[[str], Sequence[str]] | None = None,
    batch_size: int = 64,
    offsets: Sequence[int] = OFFSETS,
    names: Sequence[str] | None = None,
) -> SyntaxScores:
    """Run ``model`` on ``sentences`` (through :func:`qkv.analysis.capture`, padded batches) and score every head
    on every relation with :func:`syntax_scores`.

    Args:
        model: an encoder whose attention :func:`capture` reads (a qkv :class:`~qkv.models.BertEncoder`, a Hugging
            Face model, ...).
        sentences: :class:`~qkv.analysis.syntax_sentences.Sentence` objects (``.words``, ``.relations``,
            ``.text``).
        encode: texts to ``(model inputs, tokens per row)``; default ``model.encode`` (qkv's ``BertEncoder``).
        tokenize: a word to its pieces; default ``model.tokenizer.tokenize``.
        batch_size: sentences per forward pass.
        offsets, names: as :func:`syntax_scores`.

    Returns:
        :class:`SyntaxScores` over all the sentences.
    """
    if encode is None or tokenize is None:
        tok = getattr(model, "tokenizer", None)
        if not callable(getattr(model, "encode", None)) or not callable(getattr(tok, "tokenize", None)):
            raise ValueError(
                f"{type(model).__name__} has no encode() and tokenizer.tokenize(); pass encode= and tokenize="
            )
        if encode is None:

            def encode(texts: list[str]) -> tuple[Mapping[str, Tensor], list[list[str]]]:
                enc = model.encode(texts)  # type: ignore[operator]
                return dict(enc), enc.tokens

        if tokenize is None:
            tokenize = tok.tokenize  # type: ignore[union-attr]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(sentences) == 0:
        raise ValueError("sentences is empty")
    maps: list[Tensor] = []
    pieces: list[list[list[int]]] = []
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i : i + batch_size]
        inputs, tokens = encode([s.text for s in chunk])
        got = capture(model, **dict(inputs)).stack()  # (layers, B, H, L, L)
        for b, s in enumerate(chunk):
            pieces.append(align_words(s.words, tokens[b], tokenize))
            maps.append(got[:, b])
    return syntax_scores(maps, pieces, [s.relations for s in sentences], offsets=offsets, names=names)

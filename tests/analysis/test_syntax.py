"""Syntax-head scoring (qkv.analysis.syntax) by construction and against computations written out here:
Clark et al.'s word-level conversion in numpy, the most-attended word by loops, and a model whose heads are
built (through masks) to follow one relation or one fixed offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qkv.analysis.syntax import (
    OFFSETS,
    align_words,
    attended_words,
    syntax_heads,
    syntax_scores,
    word_attention,
)
from qkv.analysis.syntax_sentences import RELATIONS, Sentence, template_sentences
from qkv.nn import MultiHeadAttention


def _random_case(seed: int, W: int = 7, pad: int = 2):
    """Random maps (2 layers, 3 heads) over [CLS] + pieces + [SEP] + padding, words of 1-3 pieces."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 4, (W,), generator=g).tolist()
    pieces, t = [], 1
    for s in sizes:
        pieces.append(list(range(t, t + s)))
        t += s
    L = t + 1 + pad
    real = t + 1
    scores = torch.randn(2, 3, L, L, generator=g, dtype=torch.float64) * 3
    scores[..., real:] = float("-inf")
    w = scores.softmax(-1)
    w[..., real:, :] = 0.0
    return w, pieces, real


def _clark_word_attention(att: np.ndarray, pieces: list[list[int]], real: int) -> np.ndarray:
    """Clark et al.'s bpe_utils.get_word_word_attention (mode "mean"), written out for one (L, L) map over
    [CLS] + words + [SEP]: columns summed into each word's first piece, rows averaged, the rest deleted; then
    the [CLS]/[SEP] rows and columns dropped."""
    groups = [[0]] + pieces + [[real - 1]]
    a = att[:real, :real].copy()
    not_first = [t for g in groups for t in g[1:]]
    for g in groups:
        a[:, g[0]] = a[:, g].sum(-1)
    a = np.delete(a, not_first, -1)
    for g in groups:
        a[g[0]] = a[g].mean(0)
    a = np.delete(a, not_first, 0)
    return a[1:-1, 1:-1]


def _most_attended(row: list[float], a: int) -> int:
    """The index of the largest entry other than ``a``; -1 when it is shared."""
    cands = [(v, b) for b, v in enumerate(row) if b != a]
    if not cands:
        return -1
    top = max(v for v, _ in cands)
    best = [b for v, b in cands if v == top]
    return best[0] if len(best) == 1 else -1


@pytest.mark.parametrize("seed", range(4))
def test_word_attention_is_clarks_conversion(seed):
    w, pieces, real = _random_case(seed)
    got = word_attention(w, pieces)
    assert got.shape == (2, 3, len(pieces), len(pieces)) and got.dtype == torch.float64
    for layer in range(2):
        for h in range(3):
            want = _clark_word_attention(w[layer, h].numpy(), pieces, real)
            np.testing.assert_allclose(got[layer, h].numpy(), want, rtol=0, atol=1e-13)


def test_attended_words_by_hand_and_against_loops():
    wa = torch.tensor(
        [
            [9.0, 0.2, 0.5, 0.3],  # itself is largest: left out -> word 2
            [0.4, 0.1, 0.4, 0.0],  # a tie between 0 and 2 -> no prediction
            [0.0, 0.0, 0.0, 0.0],  # nothing on any word (all on [CLS]/[SEP]) -> no prediction
            [0.1, 0.6, 0.2, 0.1],
        ]
    )
    assert attended_words(wa).tolist() == [2, -1, -1, 1]
    assert attended_words(torch.ones(1, 1)).tolist() == [-1]
    w, pieces, _ = _random_case(5)
    wa = word_attention(w, pieces)
    got = attended_words(wa)
    for idx in np.ndindex(2, 3):
        rows = wa[idx].tolist()
        assert got[idx].tolist() == [_most_attended(r, a) for a, r in enumerate(rows)]


def test_syntax_scores_against_loops():
    """Accuracies and baselines of random maps equal the counts done pair by pair."""
    maps, pieces, rels = [], [], []
    g = torch.Generator().manual_seed(7)
    for s in range(5):
        w, p, _ = _random_case(10 + s, W=6 + s)
        maps.append(w)
        pieces.append(p)
        W = len(p)
        pairs = []
        for _ in range(6):
            a, b = torch.randperm(W, generator=g)[:2].tolist()
            pairs.append((a, b, "xy"[int(torch.randint(2, (1,), generator=g))]))
        rels.append(pairs)
    sc = syntax_scores(maps, pieces, rels, offsets=(-2, -1, 1, 3))
    assert sc.relations == [rels[0][0][2], "yx".replace(rels[0][0][2], "")] and sc.sentences == 5
    for r, name in enumerate(sc.relations):
        pairs = [(s, a, b) for s in range(5) for a, b, n in rels[s] if n == name]
        assert sc.counts[r] == len(pairs)
        for layer, h in np.ndindex(2, 3):
            hits = 0
            for s, a, b in pairs:
                wa = _clark_word_attention(maps[s][layer, h].numpy(), pieces[s], pieces[s][-1][-1] + 2)
                hits += _most_attended(wa[a].tolist(), a) == b
            assert sc.accuracy[r, layer, h].item() == hits / len(pairs)
        for k, off in enumerate(sc.offsets):
            assert sc.baseline[r, k].item() == sum(b - a == off for _, a, b in pairs) / len(pairs)
    best = sc.best()
    for r, row in enumerate(best):
        assert row["accuracy"] == sc.accuracy[r].max().item() and row["baseline"] == sc.baseline[r].max().item()
        assert sc.accuracy[r, row["layer"], row["head"]].item() == row["accuracy"] and row["n"] == sc.counts[r]


# --- a model whose heads are built to follow a relation, or a fixed offset -------------------------------


def _toy_tokenize(word: str) -> list[str]:
    """Pieces of at most 3 letters (``gir ##aff ##e``): long words become several tokens."""
    return [("##" if i else "") + word[i : i + 3] for i in range(0, len(word), 3)]


class _RuledModel(nn.Module):
    """Two qkv attention layers of three heads on random embeddings; which keys each query token may see is
    given per layer as a mask ``(B, 3, L, L)``: that is how a head is built to follow something."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5000, 12)
        self.layers = nn.ModuleList(MultiHeadAttention(12, 3) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, allowed0: torch.Tensor, allowed1: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        for layer, m in zip(self.layers, (allowed0, allowed1)):
            x = x + layer(x, mask=m)
        return x


def _allowed(tokens: list[list[str]], sents: list[Sentence], plan: dict[tuple[int, int], object]) -> list[torch.Tensor]:
    """Masks for the layers: ``plan[(layer, head)]`` is a relation name (the *from* word's pieces see only the
    *to* word's pieces), an int offset ``k`` (word ``a``'s pieces see only word ``a + k``'s, or only [SEP] when
    there is none) or absent (every real token)."""
    B, L = len(tokens), max(len(t) for t in tokens)
    out = [torch.zeros(B, 3, L, L, dtype=torch.bool) for _ in range(2)]
    for b, (toks, s) in enumerate(zip(tokens, sents)):
        n = len(toks)
        pieces = align_words(s.words, toks, _toy_tokenize)
        for layer in range(2):
            for h in range(3):
                m = out[layer][b, h]
                m[:n, :n] = True
                rule = plan.get((layer, h))
                if isinstance(rule, str):
                    for a, t, name in s.relations:
                        if name == rule:
                            for q in pieces[a]:
                                m[q] = False
                                m[q, pieces[t]] = True
                elif isinstance(rule, int):
                    for a, ps in enumerate(pieces):
                        for q in ps:
                            m[q] = False
                            if 0 <= a + rule < len(pieces):
                                m[q, pieces[a + rule]] = True
                            else:
                                m[q, n - 1] = True  # [SEP]
    return out


def _run_ruled(plan: dict[tuple[int, int], object], sents: list[Sentence]):
    model = _RuledModel().eval()
    vocab: dict[str, int] = {}
    by_text = {s.text: s for s in sents}

    def encode(texts):
        ss = [by_text[t] for t in texts]
        tokens = [["[CLS]"] + [p for w in s.words for p in _toy_tokenize(w)] + ["[SEP]"] for s in ss]
        L = max(len(t) for t in tokens)
        ids = torch.zeros(len(ss), L, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, : len(t)] = torch.tensor([vocab.setdefault(x, len(vocab) + 1) for x in t])
        a0, a1 = _allowed(tokens, ss, plan)
        return {"input_ids": ids, "allowed0": a0, "allowed1": a1}, tokens

    return syntax_heads(model, sents, encode=encode, tokenize=_toy_tokenize, batch_size=7, names=RELATIONS)


def test_a_head_built_to_follow_a_relation_scores_100_and_an_offset_head_equals_the_baseline():
    sents = template_sentences(30, seed=3)
    assert any(len(_toy_tokenize(w)) > 1 for s in sents for w in s.words)  # split words are exercised
    plan = {(0, 1): "pronoun->antecedent", (1, 2): "verb->object", (1, 0): -1, (0, 0): 2}
    sc = _run_ruled(plan, sents)
    assert sc.relations == list(RELATIONS) and sc.accuracy.shape == (len(RELATIONS), 2, 3) and sc.sentences == 30
    r_pron, r_obj = RELATIONS.index("pronoun->antecedent"), RELATIONS.index("verb->object")
    assert sc.accuracy[r_pron, 0, 1].item() == 1.0 and sc.accuracy[r_obj, 1, 2].item() == 1.0
    best = {row["relation"]: row for row in sc.best()}
    assert best["pronoun->antecedent"]["name"] == "L0H1" and best["verb->object"]["name"] == "L1H2"
    # the offset heads equal the baseline of their offset exactly, for every relation
    for r in range(len(RELATIONS)):
        assert sc.accuracy[r, 1, 0].item() == sc.baseline[r, OFFSETS.index(-1)].item()
        assert sc.accuracy[r, 0, 0].item() == sc.baseline[r, OFFSETS.index(2)].item()
    # and the baseline is the best offset's share, counted here from the sentences
    for name in RELATIONS:
        d = [b - a for s in sents for a, b, n in s.relations if n == name]
        want = max(sum(x == k for x in d) for k in OFFSETS) / len(d)
        assert best[name]["baseline"] == pytest.approx(want, abs=0) and best[name]["n"] == len(d)


def test_bad_input_is_refused():
    w, pieces, _ = _random_case(0)
    with pytest.raises(ValueError, match="outside"):
        word_attention(w, [[0], [99]])
    with pytest.raises(ValueError, match="two words"):
        word_attention(w, [[1, 2], [2]])
    with pytest.raises(ValueError, match="self-attention"):
        word_attention(w[..., :-1], pieces)
    with pytest.raises(TypeError, match="floating-point"):
        word_attention(torch.ones(3, 3, dtype=torch.long), [[0]])
    with pytest.raises(ValueError, match="one entry per sentence"):
        syntax_scores([w], [pieces, pieces], [[(0, 1, "x")]])
    with pytest.raises(ValueError, match="two different words"):
        syntax_scores([w], [pieces], [[(0, 0, "x")]])
    with pytest.raises(ValueError, match="two different words"):
        syntax_scores([w], [pieces], [[(0, len(pieces), "x")]])
    with pytest.raises(ValueError, match="not in names"):
        syntax_scores([w], [pieces], [[(0, 1, "x")]], names=["y"])
    with pytest.raises(ValueError, match="non-zero"):
        syntax_scores([w], [pieces], [[(0, 1, "x")]], offsets=(0, 1))
    with pytest.raises(ValueError, match="no pair"):
        syntax_scores([w], [pieces], [[(0, 1, "x")]], names=["x", "y"])
    with pytest.raises(ValueError, match="cannot align"):
        align_words(["the", "dog"], ["[CLS]", "the", "cat", "[SEP]"], str.split)
    with pytest.raises(ValueError, match="encode"):
        syntax_heads(nn.Linear(2, 2), template_sentences(1))

"""The template sentences: relations checked by hand on examples, invariants on many, word alignment on
MiniLM's own tokenizer by hand."""

from __future__ import annotations

import collections

import pytest

from qkv.analysis import syntax_sentences as ts
from qkv.analysis.syntax import align_words
from qkv.analysis.syntax_sentences import RELATIONS, template_sentences


def _named(s):
    return {(s.words[a], s.words[b], n) for a, b, n in s.relations}


def test_relations_by_hand():
    ss = template_sentences(10, seed=0)
    s = ss[1]
    assert s.text == "Yesterday the old niece visited a small lantern behind a nephew when he appeared."
    assert s.words[-1] == "." and len(s.words) == 15
    assert _named(s) == {
        ("the", "niece", "determiner->noun"),
        ("a", "lantern", "determiner->noun"),
        ("a", "nephew", "determiner->noun"),
        ("old", "niece", "adjective->noun"),
        ("small", "lantern", "adjective->noun"),
        ("behind", "nephew", "preposition->object"),
        ("visited", "niece", "verb->subject"),
        ("appeared", "he", "verb->subject"),
        ("visited", "lantern", "verb->object"),
        ("he", "nephew", "pronoun->antecedent"),  # the only male person
        ("niece", "visited", "subject->verb"),
        ("he", "appeared", "subject->verb"),
        ("lantern", "visited", "object->verb"),
    }
    # the two "a" are told apart by position
    assert (5, 7, "determiner->noun") in s.relations and (9, 10, "determiner->noun") in s.relations
    s = ss[4]
    assert s.text == "The monk watched this young giraffe near a brown woman."
    assert set(s.relations) == {
        (0, 1, "determiner->noun"),
        (3, 5, "determiner->noun"),
        (7, 9, "determiner->noun"),
        (4, 5, "adjective->noun"),
        (8, 9, "adjective->noun"),
        (6, 9, "preposition->object"),
        (2, 1, "verb->subject"),
        (2, 5, "verb->object"),
        (1, 2, "subject->verb"),
        (5, 2, "object->verb"),
    }  # no pronoun in this one
    s = ss[9]
    assert s.text == "This daughter with some old tourists greeted this ugly cat because they returned."
    assert ("they", "tourists", "pronoun->antecedent") in _named(s)  # the only plural
    assert ("greeted", "daughter", "verb->subject") in _named(s)  # not the nearer "tourists"


def test_invariants_over_many_sentences():
    ss = template_sentences(400, seed=1)
    assert [s.text for s in ss[:20]] == [s.text for s in template_sentences(20, seed=1)]
    assert [s.text for s in ss[:20]] != [s.text for s in template_sentences(20, seed=2)]
    offsets = collections.defaultdict(collections.Counter)
    classes = {w: c for table in (ts._ANIMATE, ts._THINGS) for c, words in table.items() for w in words}
    pronoun_class = {v: k for k, v in ts._PRONOUN.items()}
    for s in ss:
        W = len(s.words)
        assert s.text.rstrip(".").lower().split() == list(s.words[:-1]) and s.words[-1] == "."
        assert len(set(s.relations)) == len(s.relations)
        for a, b, n in s.relations:
            assert 0 <= a < W and 0 <= b < W and a != b and n in RELATIONS
            offsets[n][b - a] += 1
        rel = collections.defaultdict(list)
        for a, b, n in s.relations:
            rel[n].append((a, b))
        # each pair read both ways where the relation has a reverse
        assert sorted((b, a) for a, b in rel["verb->subject"]) == sorted(rel["subject->verb"])
        assert sorted((b, a) for a, b in rel["verb->object"]) == sorted(rel["object->verb"])
        assert len(rel["verb->object"]) == 1
        # determiners and adjectives point right, to the phrase's noun, with only adjectives between
        for a, b in rel["determiner->noun"] + rel["adjective->noun"]:
            assert b > a and all(s.words[i] in ts._ADJ for i in range(a + 1, b))
        assert all(
            s.words[a] in ("the", "a", "an", "this", "that", "these", "those", "some")
            for a, _ in rel["determiner->noun"]
        )
        for a, b in rel["pronoun->antecedent"]:
            # the antecedent is the one noun of the sentence that agrees with the pronoun
            nouns = {b2 for _, b2 in rel["preposition->object"]} | {b2 for _, b2 in rel["verb->object"]}
            nouns |= {b2 for _, b2 in rel["verb->subject"] if s.words[b2] not in pronoun_class}
            agree = [i for i in nouns if classes[s.words[i]] == pronoun_class[s.words[a]]]
            assert agree == [b], (s.text, agree)
            assert b < a
    # every relation is present; those whose parts can be separated are at more than one distance
    for n in RELATIONS:
        c = offsets[n]
        assert sum(c.values()) > 100, n
        assert max(c.values()) / sum(c.values()) < 0.8, (n, c)


def test_alignment_on_minilm_tokenizer():
    pytest.importorskip("tokenizers")
    from qkv.models import minilm_path
    from qkv.models.bert import BertTokenizer

    tok = BertTokenizer(f"{minilm_path()}/tokenizer.json")
    s = template_sentences(10, seed=0)[4]  # The monk watched this young giraffe near a brown woman.
    tokens = tok.encode(s.text).tokens[0]
    assert tokens[5:10] == ["young", "gi", "##raf", "##fe", "near"]
    pieces = align_words(s.words, tokens, tok.tokenize)
    assert pieces == [[1], [2], [3], [4], [5], [6, 7, 8], [9], [10], [11], [12], [13]]
    assert tokens[0] == "[CLS]" and tokens[14] == "[SEP]"
    assert tok.tokenize("shepherdess") == ["shepherd", "##ess"] and tok.tokenize("The") == ["the"]
    with pytest.raises(ValueError, match="n must be"):
        template_sentences(0)

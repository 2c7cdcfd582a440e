"""English sentences with known syntactic relations, generated from templates (seeded), for
:mod:`qkv.analysis.syntax`.

Each sentence is a main clause, optionally followed by a subordinate clause whose subject is a pronoun::

    [Adverb] Det (Adj){0,2} Noun [Prep Det (Adj){0,1} Noun] [Adverb] Verb Det (Adj){0,2} Noun
        [Prep Det (Adj){0,1} Noun] [Conj Pronoun [Adverb] Verb2] .

e.g. ``Yesterday the old king near a quiet river suddenly greeted the tired dogs because they moved.``
Plural noun phrases sometimes have no determiner (``saw horses``).

The relations (``(from word, to word, name)``; the *from* word is the one whose attention is read, the
*to* word the one it should attend to; word indices count from 0 over the words, ``[CLS]``/``[SEP]`` not
counted):

- ``determiner->noun``: a determiner to the noun of its phrase (``the old king``: the -> king);
- ``adjective->noun``: an attributive adjective to its noun (old -> king);
- ``preposition->object``: a preposition to the noun of its object (near -> river);
- ``verb->subject``: a verb to its subject's noun (greeted -> king; moved -> they);
- ``verb->object``: the main verb to its direct object's noun (greeted -> dogs);
- ``pronoun->antecedent``: the pronoun to the noun it refers to (they -> dogs);
- ``subject->verb`` and ``object->verb``: the same pairs as ``verb->subject`` / ``verb->object`` read the other
  way, the direction of Clark et al.'s (2019) ``nsubj`` and ``dobj`` (dependent to head).

The structure is unambiguous by construction: every phrase's noun is its last word; the pronoun agrees
(he: male person, she: female person, it: a singular animal or thing, they: plural) with exactly one noun of
the sentence, so its antecedent is fixed by agreement alone; and the optional parts move every related pair to
varying distances, so no fixed offset solves a relation whose parts can be separated (adjectives, adverbs and
prepositional phrases come and go).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RELATIONS", "Sentence", "template_sentences"]

RELATIONS = (
    "determiner->noun",
    "adjective->noun",
    "preposition->object",
    "verb->subject",
    "verb->object",
    "pronoun->antecedent",
    "subject->verb",
    "object->verb",
)
"""The relations :func:`template_sentences` annotates, in the order tables show them."""

Relation = tuple[int, int, str]


@dataclass(frozen=True)
class Sentence:
    """A sentence as words, with its relations.

    Attributes:
        words: the words, the final period included as a word of its own (``W`` words).
        relations: ``(from word, to word, name)`` triples, word indices in ``[0, W)``.
    """

    words: tuple[str, ...]
    relations: tuple[Relation, ...]

    @property
    def text(self) -> str:
        """The words joined by spaces, capitalised, the period attached: what the model reads."""
        body = " ".join(self.words[:-1]) if self.words[-1] == "." else " ".join(self.words)
        body = body[:1].upper() + body[1:]
        return body + "." if self.words[-1] == "." else body


# agreement classes: M male person, F female person, N singular animal or thing, P plural
_ANIMATE = {
    "M": ["man", "boy", "king", "prince", "father", "uncle", "brother", "monk", "nephew", "grandfather", "son"],
    "F": ["woman", "girl", "queen", "princess", "mother", "aunt", "sister", "nun", "niece", "grandmother",
          "daughter", "shepherdess"],
    "N": ["dog", "cat", "horse", "goat", "fox", "rabbit", "giraffe", "parrot", "donkey", "owl"],
    "P": ["children", "farmers", "soldiers", "students", "horses", "tourists", "sailors", "wolves", "pilgrims",
          "giraffes", "owls"],
}  # fmt: skip
_THINGS = {
    "N": ["lamp", "table", "wagon", "statue", "lantern", "river", "bridge", "fountain", "tower", "barn", "umbrella"],
    "P": ["boxes", "statues", "lanterns", "bridges", "towers", "barrels", "umbrellas"],
}
_PRONOUN = {"M": "he", "F": "she", "N": "it", "P": "they"}
_DET_SG = ["the", "a", "this", "that"]
_DET_PL = ["the", "these", "those", "some"]
_ADJ = ["old", "young", "small", "tall", "quiet", "happy", "tired", "brown", "clever", "angry", "lazy", "friendly",
        "elegant", "enormous", "ugly", "ancient"]  # fmt: skip
_VERB = ["saw", "followed", "watched", "found", "called", "visited", "chased", "greeted", "painted", "admired",
         "remembered", "ignored"]  # fmt: skip
_VERB2 = ["moved", "stopped", "fell", "appeared", "vanished", "shook", "returned"]
_PREP = ["near", "behind", "beside", "with", "under"]
_ADV = ["quickly", "suddenly", "quietly", "often", "finally"]
_OPEN = ["yesterday", "later", "once", "today"]
_CONJ = ["because", "when", "after", "before", "while"]


class _Builder:
    def __init__(self) -> None:
        self.words: list[str] = []
        self.rels: list[Relation] = []

    def add(self, w: str) -> int:
        self.words.append(w)
        return len(self.words) - 1

    def rel(self, a: int, b: int, name: str) -> None:
        self.rels.append((a, b, name))

    def phrase(self, rng: random.Random, noun: str, cls: str, max_adj: int) -> int:
        """Det (Adj){0,max_adj} Noun; returns the noun's index. Plurals go without a determiner 30% of the time."""
        bare = cls == "P" and rng.random() < 0.3
        det = None if bare else rng.choice(_DET_PL if cls == "P" else _DET_SG)
        n_adj = rng.choice([0, 0, 1, 1, 2] if max_adj >= 2 else [0, 0, 1])
        adjs = rng.sample(_ADJ, n_adj)
        first = (adjs + [noun])[0]
        if det == "a" and first[0] in "aeiou":
            det = "an"
        d = self.add(det) if det else None
        a = [self.add(x) for x in adjs]
        n = self.add(noun)
        if d is not None:
            self.rel(d, n, "determiner->noun")
        for i in a:
            self.rel(i, n, "adjective->noun")
        return n

    def pp(self, rng: random.Random, noun: str, cls: str) -> int:
        p = self.add(rng.choice(_PREP))
        n = self.phrase(rng, noun, cls, 1)
        self.rel(p, n, "preposition->object")
        return n


def _sentence(rng: random.Random) -> Sentence:
    pron = rng.choice("MFNP") if rng.random() < 0.85 else None
    roles = ["subj", "obj"] + ["subj_pp"] * (rng.random() < 0.35) + ["pp"] * (rng.random() < 0.5)
    ante = rng.choice(roles) if pron else None
    # one noun per role; the pronoun's class belongs to the antecedent alone
    used: set[str] = set()
    nouns: dict[str, tuple[str, str]] = {}
    for role in roles:
        if role == ante:
            assert pron is not None
            cls = pron
        else:
            cls = rng.choice([c for c in "MFNP" if c != pron])
        pool = list(_ANIMATE[cls]) + ([] if role == "subj" else _THINGS.get(cls, []))
        word = rng.choice([w for w in pool if w not in used])
        used.add(word)
        nouns[role] = (word, cls)
    b = _Builder()
    if rng.random() < 0.3:
        b.add(rng.choice(_OPEN))
    idx = {"subj": b.phrase(rng, *nouns["subj"], 2)}
    if "subj_pp" in nouns:
        idx["subj_pp"] = b.pp(rng, *nouns["subj_pp"])
    if rng.random() < 0.3:
        b.add(rng.choice(_ADV))
    v = b.add(rng.choice(_VERB))
    idx["obj"] = b.phrase(rng, *nouns["obj"], 2)
    b.rel(v, idx["subj"], "verb->subject")
    b.rel(idx["subj"], v, "subject->verb")
    b.rel(v, idx["obj"], "verb->object")
    b.rel(idx["obj"], v, "object->verb")
    if "pp" in nouns:
        idx["pp"] = b.pp(rng, *nouns["pp"])
    if pron is not None and ante is not None:
        b.add(rng.choice(_CONJ))
        p = b.add(_PRONOUN[pron])
        if rng.random() < 0.3:
            b.add(rng.choice(_ADV))
        v2 = b.add(rng.choice(_VERB2))
        b.rel(p, idx[ante], "pronoun->antecedent")
        b.rel(v2, p, "verb->subject")
        b.rel(p, v2, "subject->verb")
    b.add(".")
    order = {r: i for i, r in enumerate(RELATIONS)}
    rels = sorted(b.rels, key=lambda r: (order[r[2]], r[0]))
    return Sentence(tuple(b.words), tuple(rels))


def template_sentences(n: int, seed: int = 0) -> list[Sentence]:
    """``n`` sentences from the templates above, the same for the same ``seed``.

    Args:
        n: how many sentences (>= 1).
        seed: the random seed (Python's ``random.Random``; nothing global is touched).

    Returns:
        ``n`` :class:`Sentence` objects with their relations.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]

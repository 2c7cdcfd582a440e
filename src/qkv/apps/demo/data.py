"""The demo's translation task: lists of numbers written in English words into German number words,
split into morphemes so the reordering is visible.

``345`` is ``three hundred and forty five`` in English and ``dreihundertfünfundvierzig`` in German,
which we write as the morphemes ``drei hundert fünf und vierzig``: German says the units before the
tens, so ``forty five`` must come out as ``fünf und vierzig`` — an alignment that crosses. A source is
one to ``max_numbers`` numbers separated by ``,``; the longer the list, the more a fixed-size summary
of the source has to hold. Words come from ``num2words``; the split into morphemes is checked against
``num2words``'s own German spelling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

import torch
from num2words import num2words
from torch import Tensor

__all__ = ["PAD", "BOS", "EOS", "Example", "Vocab", "english_tokens", "german_tokens", "make_dataset", "batchify"]

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = ["<pad>", "<bos>", "<eos>"]


@cache
def _en(n: int) -> tuple[str, ...]:
    return tuple(num2words(n).replace("-", " ").replace(",", " ").split())


def english_tokens(n: int) -> list[str]:
    """``num2words(n)`` split into words: 345 -> ``three hundred and forty five``."""
    return list(_en(n))


@cache
def _de(n: int) -> str:
    return str(num2words(n, lang="de"))


def _de_unit(u: int) -> str:
    """German unit as it appears inside a compound: 1 is ``ein`` (``einundzwanzig``, ``einhundert``)."""
    return "ein" if u == 1 else _de(u)


def german_tokens(n: int) -> list[str]:
    """German number word for ``1 <= n <= 999`` split into morphemes: 345 -> ``drei hundert fünf und vierzig``.
    ``"".join(german_tokens(n)) == num2words(n, lang="de")``."""
    if not 1 <= n <= 999:
        raise ValueError(f"german_tokens: n must be in [1, 999], got {n}")
    h, r = divmod(n, 100)
    toks = [_de_unit(h), "hundert"] if h else []
    if r:
        u = r % 10
        if r < 20 or u == 0:
            toks.append(_de(r))
        else:
            toks += [_de_unit(u), "und", _de(r - u)]
    return toks


@dataclass(frozen=True)
class Example:
    """One translation pair: the numbers and their token sequences."""

    numbers: tuple[int, ...]
    src: tuple[str, ...]
    tgt: tuple[str, ...]


def make_example(numbers: tuple[int, ...]) -> Example:
    """The English and German token sequences of a list of numbers, joined by ``,``."""
    src: list[str] = []
    tgt: list[str] = []
    for i, n in enumerate(numbers):
        if i:
            src.append(",")
            tgt.append(",")
        src += english_tokens(n)
        tgt += german_tokens(n)
    return Example(numbers, tuple(src), tuple(tgt))


class Vocab:
    """Token <-> id, with ``<pad>``=0, ``<bos>``=1, ``<eos>``=2 first."""

    def __init__(self, tokens: list[str]) -> None:
        self.itos = _SPECIALS + sorted(set(tokens) - set(_SPECIALS))
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, toks: tuple[str, ...] | list[str]) -> list[int]:
        return [self.stoi[t] for t in toks]

    def decode(self, ids: list[int]) -> list[str]:
        """Ids up to (not including) the first EOS, specials dropped."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i > EOS:
                out.append(self.itos[i])
        return out


def make_dataset(
    n_train: int, n_test: int, max_numbers: int, seed: int
) -> tuple[list[Example], list[Example], Vocab, Vocab]:
    """Disjoint train and test sets of lists of 1..``max_numbers`` numbers in [1, 999] (list length uniform),
    drawn from ``random.Random(seed)``; the vocabularies cover every number word."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    exs: list[Example] = []
    while len(exs) < n_train + n_test:
        k = rng.randint(1, max_numbers)
        nums = tuple(rng.randint(1, 999) for _ in range(k))
        if nums in seen:
            continue
        seen.add(nums)
        exs.append(make_example(nums))
    all_src = [t for n in range(1, 1000) for t in english_tokens(n)] + [","]
    all_tgt = [t for n in range(1, 1000) for t in german_tokens(n)] + [","]
    return exs[:n_train], exs[n_train:], Vocab(all_src), Vocab(all_tgt)


def batchify(exs: list[Example], sv: Vocab, tv: Vocab) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``src (B, Ls)``, ``src_lengths (B,)``, ``tgt_in (B, Lt)`` (BOS + target) and ``tgt_out (B, Lt)``
    (target + EOS), padded with PAD."""
    Ls = max(len(e.src) for e in exs)
    Lt = max(len(e.tgt) for e in exs) + 1
    src = torch.full((len(exs), Ls), PAD, dtype=torch.long)
    tin = torch.full((len(exs), Lt), PAD, dtype=torch.long)
    tout = torch.full((len(exs), Lt), PAD, dtype=torch.long)
    for i, e in enumerate(exs):
        s, t = sv.encode(e.src), tv.encode(e.tgt)
        src[i, : len(s)] = torch.tensor(s)
        tin[i, : len(t) + 1] = torch.tensor([BOS] + t)
        tout[i, : len(t) + 1] = torch.tensor(t + [EOS])
    lengths = torch.tensor([len(e.src) for e in exs])
    return src, lengths, tin, tout

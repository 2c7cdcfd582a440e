"""``qkv train recsys``: SASRec-style next-item prediction (Kang & McAuley 2018) on generated histories.

The generator has a known structure: 200 items in 10 genres of 20; each genre's items form a series
(item ``i`` is usually followed by ``i + 1`` of the same genre); each user likes two genres. A next item is
the successor of the previous one (probability 0.6), a popular item of one of the user's genres (0.3), or a
popular item of any genre (0.1). Metric: hit rate at 10 on each user's last item (never trained on),
beside the most-popular baseline; the hit rate of the generator's own next-item distribution (the best
achievable) is printed too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...masks import causal
from ...nn.blocks import TransformerBlock
from .common import TaskResult, fit

__all__ = ["SASRec", "generate_histories", "train"]

N_ITEMS, N_GENRES = 200, 10
PER = N_ITEMS // N_GENRES
P_NEXT, P_GENRE = 0.6, 0.3


def _popularity() -> np.ndarray:
    w = 1.0 / np.arange(1, PER + 1) ** 0.8  # Zipf-like within a genre, item 0 of each genre most popular
    return w / w.sum()


def next_item_distribution(prev: int, genres: tuple[int, ...]) -> np.ndarray:
    """The generator's probability of each item following ``prev`` for a user who likes ``genres``."""
    pop = _popularity()
    p = np.zeros(N_ITEMS)
    g, k = divmod(prev, PER)
    p[g * PER + (k + 1) % PER] += P_NEXT
    for gg in genres:
        p[gg * PER : (gg + 1) * PER] += P_GENRE / len(genres) * pop
    p += (1 - P_NEXT - P_GENRE) / N_GENRES * np.tile(pop, N_GENRES)
    return p


def generate_histories(
    n_users: int, seed: int, min_len: int = 15, max_len: int = 40
) -> list[tuple[list[int], tuple[int, ...]]]:
    """``n_users`` histories (item ids; ids start at 0) with each user's two genres, from ``seed``."""
    rng = np.random.default_rng(seed)
    users = []
    for _ in range(n_users):
        genres = tuple(int(g) for g in rng.choice(N_GENRES, 2, replace=False))
        g0 = genres[0]
        seq = [int(g0 * PER + rng.choice(PER, p=_popularity()))]
        for _ in range(int(rng.integers(min_len, max_len + 1)) - 1):
            seq.append(int(rng.choice(N_ITEMS, p=next_item_distribution(seq[-1], genres))))
        users.append((seq, genres))
    return users


class SASRec(nn.Module):
    """Self-attentive sequential recommendation: item embeddings plus learned positions, causal pre-norm
    blocks through :func:`qkv.attention`, scores against the (tied) item embeddings.

    Args:
        n_items: catalogue size (id ``n_items`` is padding); max_len: longest history; dim, layers, heads: size.
    """

    def __init__(self, n_items: int, max_len: int = 50, dim: int = 64, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.n_items = n_items
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, 2 * dim, dropout=0.1, norm_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.mask = causal()

    def forward(self, seq: Tensor) -> Tensor:
        """``seq`` ``(B, L)`` item ids (left-padded with ``n_items``) -> next-item scores ``(B, L, n_items)``."""
        h = self.item(seq) + self.pos[-seq.shape[1] :]
        for b in self.blocks:
            h = b(h, mask=self.mask)
        return self.norm(h) @ self.item.weight[: self.n_items].T


def _pad_left(seqs: list[list[int]], L: int, pad: int) -> Tensor:
    out = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-L:]
        out[i, L - len(s) :] = torch.tensor(s)
    return out


def train(out: str | None = None, quick: bool = False, seed: int = 0, progress: bool = False) -> TaskResult:
    """Train SASRec on every user's history but the last item; score the last item."""
    torch.manual_seed(seed)
    users = generate_histories(300 if quick else 3000, seed)
    L = 40
    hist = [s[:-1] for s, _ in users]
    seqs = _pad_left(hist, L + 1, N_ITEMS)  # inputs seqs[:, :-1], targets seqs[:, 1:]

    def batches() -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            yield seqs[torch.randint(0, len(seqs), (64,), generator=g)]

    def loss_fn(m: nn.Module, b: Tensor) -> Tensor:
        logits = m(b[:, :-1])
        tgt = b[:, 1:].clone()
        tgt[b[:, :-1] == N_ITEMS] = -100  # no target where the input is padding
        tgt[tgt == N_ITEMS] = -100
        return F.cross_entropy(logits.reshape(-1, N_ITEMS), tgt.reshape(-1), ignore_index=-100)

    model = SASRec(N_ITEMS, L)
    steps = 30 if quick else 1500
    losses = fit(model, batches(), loss_fn, steps, 2e-3, desc="recsys", progress=progress, weight_decay=0.01)
    last = torch.tensor([s[-1] for s, _ in users])
    with torch.no_grad():
        scores = model(_pad_left(hist, L, N_ITEMS))[:, -1]
    top = scores.topk(10, -1).indices
    hr = float((top == last[:, None]).any(-1).float().mean())
    counts = torch.bincount(torch.tensor([i for h in hist for i in h]), minlength=N_ITEMS)
    popular = counts.topk(10).indices
    base = float(torch.isin(last, popular).float().mean())
    oracle = float(np.mean([s[-1] in np.argsort(-next_item_distribution(s[-2], g))[:10] for s, g in users]))
    notes = [f"{len(users)} generated users, {N_ITEMS} items; the generator's own top-10 hits {oracle:.1%}"]
    return TaskResult(
        "recsys", "HR@10 on each user's last item", hr, "most popular 10 items", base, losses, notes, [], model
    )

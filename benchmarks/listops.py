"""ListOps (Long Range Arena, Tay et al. 2020) generated here, trained with different token mixers.

    python benchmarks/listops.py                 # 1.5 minutes of training per model
    python benchmarks/listops.py --minutes 0.3   # a quick look
    python benchmarks/listops.py --max-len 256 --min-len 16   # short sequences: many more steps per minute

ListOps (Nangia & Bowman 2018) asks for the value (0-9) of a nested expression such as
``[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]`` (= 5), with MAX, MIN, MED (median, rounded down) and SM
(sum mod 10). The generator follows LRA's script: a node is a digit with probability 0.75 (always
at the maximum depth 10), otherwise an operator with 2 to ``--max-args`` (10) arguments; sequences are
kept when their token count lies in ``[--min-len, --max-len]``. LRA used lengths up to 2k and trained
for hours; here each model gets ``--minutes`` of wall time on a shared CPU, so the figures say how far
each mixer gets on a small budget, not what it can reach. On a loaded 2-core machine 1.5 minutes give
40-150 steps at lengths up to 1k (every mixer stays at the majority class) and 400-1500 steps at
lengths up to 256 (every mixer learns, to 31-35%).

Every model is the same small encoder (learned positions, ``--layers`` pre-norm blocks of width
``--dim``, mean pooling over real tokens, a linear head); only the token mixer differs:

- exact: multi-head softmax attention (padding masked), backend ``auto``.
- window: the same with a sliding window of ``--window`` keys on each side (backend ``tiled``).
- linear: linear attention (elu+1); padding tokens are not masked (the backend takes no mask).
- performer: FAVOR+ with 64 features, redrawn every 100 steps; padding likewise unmasked.
- ssm: the Mamba-style selective state-space layer (causal; padding sits after the real tokens).
- hybrid: SSM in the first layer, exact attention in the second.

The table is printed and saved as ``listops.md`` under ``--out`` with LRA's published ListOps accuracy
(Transformer 36.4, Performer 18.0, Linear Transformer 16.1) beside it as context.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

from qkv.masks import padding, sliding_window
from qkv.nn import LinearSelfAttention, SelectiveSSM, TransformerBlock

OPS = ("[MAX", "[MIN", "[MED", "[SM")
VOCAB = ["<pad>", *[str(d) for d in range(10)], *OPS, "]"]
TOK = {t: i for i, t in enumerate(VOCAB)}
LRA = {"exact": 36.4, "performer": 18.0, "linear": 16.1}


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int]) -> Any:
    """A random expression; raises ``_TooLong`` as soon as it exceeds ``budget[0]`` tokens (rejection
    sampling, cut short)."""
    if depth < max_depth and rng.random() < 0.25:
        budget[0] -= 2  # the operator and its closing bracket
        if budget[0] < 0:
            raise _TooLong
        n = rng.randint(2, max_args)
        return (rng.choice(OPS), [_tree(rng, depth + 1, max_depth, max_args, budget) for _ in range(n)])
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLong
    return rng.randint(0, 9)


def _value(t: Any) -> int:
    if isinstance(t, int):
        return t
    op, args = t
    vals = sorted(_value(a) for a in args)
    if op == "[MAX":
        return vals[-1]
    if op == "[MIN":
        return vals[0]
    if op == "[MED":
        return int(statistics.median(vals))
    return sum(vals) % 10


def _tokens(t: Any) -> list[str]:
    if isinstance(t, int):
        return [str(t)]
    op, args = t
    out = [op]
    for a in args:
        out += _tokens(a)
    return out + ["]"]


def generate(n: int, min_len: int, max_len: int, seed: int, max_args: int = 10) -> list[tuple[list[int], int]]:
    """``n`` (token ids, label) pairs with ``min_len <= len <= max_len``."""
    rng = random.Random(seed)
    data: list[tuple[list[int], int]] = []
    while len(data) < n:
        try:
            t = _tree(rng, 1, 10, max_args, [max_len])
        except _TooLong:
            continue
        toks = _tokens(t)
        if min_len <= len(toks) <= max_len:
            data.append(([TOK[x] for x in toks], _value(t)))
    return data


def batches(data: list[tuple[list[int], int]], size: int, rng: random.Random) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Batches of similar lengths (less padding): ``(ids (B, L), lengths (B,), labels (B,))``."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    out = []
    for g in groups:
        L = max(len(data[i][0]) for i in g)
        ids = torch.zeros(len(g), L, dtype=torch.long)
        for r, i in enumerate(g):
            ids[r, : len(data[i][0])] = torch.tensor(data[i][0])
        out.append((ids, torch.tensor([len(data[i][0]) for i in g]), torch.tensor([data[i][1] for i in g])))
    return out


class Classifier(nn.Module):
    """Embedding + learned positions, blocks with the chosen mixers, mean pooling, linear head."""

    def __init__(self, mixer: str, dim: int, layers: int, heads: int, max_len: int, window: int) -> None:
        super().__init__()
        self.kind, self.window = mixer, window
        self.emb = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Embedding(max_len, dim)
        blocks = []
        for i in range(layers):
            m: nn.Module | None = None
            kind = ("ssm" if i == 0 else "exact") if mixer == "hybrid" else mixer
            if kind == "ssm":
                m = SelectiveSSM(dim, d_state=8, expand=1, chunk_size=16)
            elif kind in ("linear", "performer"):
                m = LinearSelfAttention(dim, heads, kind, num_features=64, redraw_interval=100)
            blocks.append((kind, TransformerBlock(dim, heads, 2 * dim, norm_first=True, mixer=m)))
        self.kinds = [k for k, _ in blocks]
        self.blocks = nn.ModuleList([b for _, b in blocks])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        B, L = ids.shape
        x = self.emb(ids) + self.pos(torch.arange(L))
        pad = padding(lengths)
        for kind, blk in zip(self.kinds, self.blocks):
            mask: Any = None
            if kind == "exact":
                mask = pad
            elif kind == "window":
                mask = pad & sliding_window(self.window, self.window)
            x = blk(x, mask=mask)
        real = (torch.arange(L) < lengths[:, None]).to(x.dtype).unsqueeze(-1)
        pooled = (self.norm(x) * real).sum(1) / real.sum(1)
        return self.head(pooled)


def accuracy(model: nn.Module, data: list[tuple[Tensor, Tensor, Tensor]]) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for ids, lengths, y in data:
            right += int((model(ids, lengths).argmax(-1) == y).sum())
            total += len(y)
    model.train()
    return 100.0 * right / total


def train(kind: str, a: argparse.Namespace, train_set: Any, test_b: Any) -> tuple[float, int, float]:
    torch.manual_seed(a.seed)
    model = Classifier(kind, a.dim, a.layers, a.heads, a.max_len + 1, a.window)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    rng = random.Random(a.seed)
    steps, t0 = 0, time.perf_counter()
    budget = 60 * a.minutes
    losses: list[float] = []
    while time.perf_counter() - t0 < budget:
        for ids, lengths, y in batches(train_set, a.batch, rng):
            loss = nn.functional.cross_entropy(model(ids, lengths), y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            losses.append(loss.item())
            if time.perf_counter() - t0 >= budget:
                break
        print(f"  {kind}: {steps} steps, loss {statistics.mean(losses[-20:]):.3f}", file=sys.stderr, flush=True)
    return accuracy(model, test_b), steps, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.5, help="training wall time per model")
    ap.add_argument("--models", default="exact,window,linear,performer,ssm,hybrid")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument("--max-args", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/listops")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    train_set = generate(a.train_size, a.min_len, a.max_len, a.seed, a.max_args)
    test_set = generate(a.test_size, a.min_len, a.max_len, a.seed + 1, a.max_args)
    test_b = batches(test_set, 64, random.Random(0))
    lens = [len(x) for x, _ in train_set]
    counts = [sum(1 for _, y in test_set if y == c) for c in range(10)]
    majority = 100.0 * max(counts) / len(test_set)
    print(
        f"generated {len(train_set)} train / {len(test_set)} test sequences in {time.perf_counter() - t0:.1f}s; "
        f"length median {statistics.median(lens):.0f}, max {max(lens)}; majority class {majority:.1f}%",
        file=sys.stderr,
    )
    rows = []
    for kind in a.models.split(","):
        acc, steps, secs = train(kind, a, train_set, test_b)
        rows.append((kind, acc, steps, secs))
        print(f"{kind}: test accuracy {acc:.1f}% after {steps} steps ({secs:.0f}s)", file=sys.stderr, flush=True)
    lines = [
        "# ListOps (generated as in LRA) with different token mixers",
        "",
        f"{len(train_set)} training / {len(test_set)} test sequences, {a.min_len}-{a.max_len} tokens (median "
        f"{statistics.median(lens):.0f}); {a.layers} layers of width {a.dim}, {a.heads} heads; {a.minutes} min of "
        f"training per model with {a.threads} threads on a shared {os.cpu_count()}-CPU machine; majority class "
        f"{majority:.1f}%.",
        "",
        "| mixer | test accuracy % | steps | seconds | LRA published (context) |",
        "|---|---|---|---|---|",
    ]
    for kind, acc, steps, secs in rows:
        lines.append(f"| {kind} | {acc:.1f} | {steps} | {secs:.0f} | {LRA.get(kind, '-')} |")
    text = "\n".join(lines)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "listops.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

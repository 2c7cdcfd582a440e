"""``qkv train lm``: a byte-level :class:`qkv.models.GPT` (RoPE) trained on the Python standard library's own source text.

Metric: bits per byte on held-out standard-library files, beside the unigram baseline (the entropy of
the training bytes' frequencies, what a model without context can do). A sample is generated from a prompt.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.gpt import GPT
from .common import TaskResult, fit

__all__ = ["bits_per_byte", "load_stdlib_text", "train", "unigram_bits"]


def load_stdlib_text(max_bytes: int, seed: int = 0) -> tuple[bytes, bytes]:
    """Train and held-out bytes from the top-level ``*.py`` files of the standard library (the folder of
    ``os.py``), files shuffled by ``seed`` and split 90/10 by file; at most ``max_bytes`` in all."""
    root = os.path.dirname(os.__file__)
    names = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    random.Random(seed).shuffle(names)
    n_val = max(1, len(names) // 10)

    def read(files: list[str], limit: int) -> bytes:
        chunks, total = [], 0
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                b = fh.read()
            chunks.append(b)
            total += len(b)
            if total >= limit:
                break
        return b"".join(chunks)[:limit]

    return read(names[n_val:], int(max_bytes * 0.9)), read(names[:n_val], max_bytes // 10)


def _batches(data: Tensor, ctx: int, batch: int, seed: int) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        yield torch.stack([data[j : j + ctx + 1] for j in i.tolist()])


def _loss(model: nn.Module, xy: Tensor) -> Tensor:
    logits = model(xy[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), xy[:, 1:].reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: Tensor, ctx: int, max_windows: int = 64) -> float:
    """Mean next-byte cross-entropy in bits over non-overlapping windows of ``data``."""
    n = min(max_windows, (len(data) - 1) // ctx)
    xy = torch.stack([data[i * ctx : i * ctx + ctx + 1] for i in range(n)])
    return float(_loss(model, xy)) / math.log(2)


def unigram_bits(train: Tensor, val: Tensor) -> float:
    """Cross-entropy in bits of ``val`` under the (add-one smoothed) byte frequencies of ``train``."""
    p = torch.bincount(train, minlength=256).double() + 1
    p = p / p.sum()
    return float(-(p[val].log2()).mean())


def train(out: str | None = None, quick: bool = False, seed: int = 0, progress: bool = False) -> TaskResult:
    """Train the byte-level GPT; ``quick`` trains a few steps on a smaller model."""
    torch.manual_seed(seed)
    tr_b, va_b = load_stdlib_text(300_000 if quick else 3_000_000, seed)
    tr = torch.tensor(list(tr_b), dtype=torch.long)
    va = torch.tensor(list(va_b), dtype=torch.long)
    ctx = 64 if quick else 128
    dim, layers = (64, 2) if quick else (128, 4)
    model = GPT(256, dim, layers, 4, max_len=ctx + 512, pos="rope")
    steps = 30 if quick else 1000
    losses = fit(
        model, _batches(tr, ctx, 32, seed), _loss, steps, 3e-3 if quick else 2e-3, desc="lm", progress=progress
    )
    bpb = bits_per_byte(model, va, ctx)
    base = unigram_bits(tr, va)
    prompt = torch.tensor([list(b"def ")])
    gen = torch.Generator().manual_seed(seed)
    out_ids = model.generate(prompt, 40 if quick else 300, temperature=0.8, top_k=40, generator=gen)
    sample = bytes(out_ids[0].tolist()).decode("utf-8", "replace")
    files: list[str] = []
    if out is not None:
        path = os.path.join(out, "sample.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(sample + "\n")
        files.append(path)
    notes = [
        f"trained on {len(tr):,} bytes of {os.path.dirname(os.__file__)}/*.py, held out {len(va):,}",
        "sample: " + sample[:300].replace("\n", "\n          "),
    ]
    return TaskResult("lm", "held-out bits/byte", bpb, "unigram byte frequencies", base, losses, notes, files, model)

"""``qkv train vit``: a ViT on scikit-learn's 8x8 handwritten digits (real scans that ship with the package).

Metric: held-out accuracy, beside two baselines: the majority class and a logistic regression on the raw
pixels (scikit-learn). Writes attention-rollout maps (Abnar & Zuidema 2020) for a few test digits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...analysis import attention_rollout, capture
from ...models.vit import ViT
from .common import TaskResult, fit

__all__ = ["class_token_rollout", "load_digits_split", "train"]


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train (N,1,8,8), y_train, x_test, y_test)``: the 1797 digits scaled to [0, 1], 20% held out
    by a permutation from ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def class_token_rollout(model: ViT, images: Tensor) -> Tensor:
    """Attention rollout (:func:`qkv.analysis.attention_rollout`) of the class token over the patches:
    ``(B, grid, grid)``, rows summing to at most 1 (the rest stays on the class token itself)."""
    roll = attention_rollout(capture(model, images))
    return roll[:, 0, 1:].reshape(-1, model.grid, model.grid).float()


def _batches(x: Tensor, y: Tensor, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            j = perm[i : i + batch]
            xb = x[j]
            # light augmentation: shift by up to one pixel
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            yield torch.roll(xb, (dy, dx), (2, 3)), y[j]


def _loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(b[0]), b[1], label_smoothing=0.05)


def _plot_rollout(images: Tensor, maps: Tensor, labels: Tensor, preds: Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    fig, ax = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        ax[0, i].imshow(images[i, 0].numpy(), cmap="gray_r")
        ax[0, i].set_title(f"{int(labels[i])} -> {int(preds[i])}", fontsize=9)
        m = maps[i].numpy()
        ax[1, i].imshow(np.kron(m, np.ones((8 // m.shape[0], 8 // m.shape[1]))), cmap="inferno")
        for a in ax[:, i]:
            a.set_xticks([])
            a.set_yticks([])
    ax[0, 0].set_ylabel("digit")
    ax[1, 0].set_ylabel("rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(out: str | None = None, quick: bool = False, seed: int = 0, progress: bool = False) -> TaskResult:
    """Train the ViT (patches 2x2: 16 patches and a class token); ``quick`` trains a few steps."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = ViT(8, 2, 10, dim=64, depth=4, heads=4, mlp=128, dropout=0.1)
    steps = 30 if quick else 1200
    losses = fit(
        model, _batches(xtr, ytr, 64, seed), _loss, steps, 2e-3, desc="vit", progress=progress, weight_decay=0.05
    )
    with torch.no_grad():
        pred = model(xte).argmax(-1)
    acc = float((pred == yte).float().mean())
    majority = float((yte == torch.bincount(ytr).argmax()).float().mean())
    logreg = LogisticRegression(max_iter=2000).fit(xtr.flatten(1).numpy(), ytr.numpy())
    lr_acc = float(logreg.score(xte.flatten(1).numpy(), yte.numpy()))
    files: list[str] = []
    if out is not None:
        k = 8
        maps = class_token_rollout(model, xte[:k])
        path = os.path.join(out, "rollout.png")
        _plot_rollout(xte[:k], maps, yte[:k], pred[:k], path)
        files.append(path)
    notes = [f"{len(ytr)} training / {len(yte)} held-out digits; logistic regression on pixels: {lr_acc:.1%}"]
    return TaskResult("vit", "held-out accuracy", acc, "majority class", majority, losses, notes, files, model)

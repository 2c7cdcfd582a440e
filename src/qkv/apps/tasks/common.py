"""What every ``qkv train`` task returns, and its training loop helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TaskResult", "fit"]


@dataclass
class TaskResult:
    """A task's outcome: ``metric`` (``metric_name``) beside ``baseline`` (``baseline_name``), the training
    losses, extra lines to print (``notes``), written ``files`` and the trained ``model``."""

    task: str
    metric_name: str
    metric: float
    baseline_name: str
    baseline: float
    losses: list[float]
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    model: nn.Module | None = None


def fit(
    model: nn.Module,
    batches: Iterator[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    steps: int,
    lr: float,
    *,
    desc: str = "train",
    progress: bool = False,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW with linear warm-up and decay, gradient clipping at 1; returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    losses: list[float] = []
    model.train()
    for step in range(steps):
        loss = loss_fn(model, next(batches))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses

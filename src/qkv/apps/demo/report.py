"""The demo report's training curves (matplotlib with the Agg backend; no network). Its alignment pictures
are :func:`qkv.analysis.plot_alignment`'s, its viewer :func:`qkv.analysis.write_viewer`'s."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_curves"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Training loss (smoothed) and held-out accuracy against step, one line per model.

    ``results`` maps a label to an object with ``losses``, ``val_steps`` and ``val_acc``."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        loss = np.asarray(r.losses)
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        a1.plot(np.arange(len(smooth)) + k, smooth, label=label)
        a2.plot(r.val_steps, np.asarray(r.val_acc) * 100, marker="o", label=label)
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel("training cross-entropy")
    a2.set_xlabel("step")
    a2.set_ylabel("exact match on validation lists (%)")
    a2.set_ylim(0, 100)
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

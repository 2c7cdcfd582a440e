"""Pictures and the HTML page of the demo report (matplotlib with the Agg backend; no network)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_alignment", "plot_curves"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alignment(weights: np.ndarray, src_tokens: list[str], tgt_tokens: list[str], path: str) -> None:
    """Heatmap of an alignment ``weights`` ``(Lout, Lin)``: rows are output tokens, columns source tokens."""
    w = np.asarray(weights)
    if w.shape != (len(tgt_tokens), len(src_tokens)):
        raise ValueError(
            f"plot_alignment: weights {w.shape} != (len(tgt_tokens), len(src_tokens)) = "
            f"({len(tgt_tokens)}, {len(src_tokens)})"
        )
    from ...analysis.render import plot_alignment as _render

    _render(w, src_tokens, tgt_tokens, path, title="Bahdanau attention: English -> German")


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

"""Static pictures of attention weights: one head, a layer x head grid, a translation alignment.

All functions draw with matplotlib's Agg canvas (no display, no change to the global backend) and
write a PNG (or any format matplotlib knows from the file suffix). They stay readable for long
sequences: token tick labels are drawn only up to :data:`MAX_TICK_LABELS` tokens (numeric positions
beyond), and matrices larger than the display are reduced by max-pooling, so a sharp head (one key
per query) stays visible instead of being averaged away.

Weights are accepted as ``torch.Tensor`` or ``numpy.ndarray`` on any device and dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "MAX_DISPLAY",
    "MAX_TICK_LABELS",
    "downsample_max",
    "plot_alignment",
    "plot_grid",
    "plot_head",
    "plot_token_importance",
]

ArrayLike = Union[torch.Tensor, np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]

#: beyond this many tokens an axis shows numeric positions instead of the tokens themselves
MAX_TICK_LABELS = 60
#: a head's matrix is max-pooled down to at most this many cells per side for display
MAX_DISPLAY = 512
#: the same for each small panel of :func:`plot_grid`
_GRID_DISPLAY = 160
_CMAP = "viridis"


def _matrix(weights: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``weights`` as a float32 numpy array with ``ndim`` dims; ``ValueError``/``TypeError`` otherwise."""
    if isinstance(weights, torch.Tensor):
        arr = weights.detach().to("cpu", torch.float32).numpy()
    elif isinstance(weights, np.ndarray):
        arr = weights.astype(np.float32, copy=False)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(weights).__name__}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    return arr


def _text(s: object) -> str:
    """A label matplotlib prints as written: ``$`` would otherwise start mathtext."""
    return str(s).replace("$", r"\$")


def _tokens(tokens: Sequence[str] | None, n: int, name: str, axis: str) -> list[str] | None:
    if tokens is None:
        return None
    if isinstance(tokens, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single str")
    toks = [_text(t) for t in tokens]
    if len(toks) != n:
        raise ValueError(f"{name} has {len(toks)} tokens but the weights have {n} {axis}")
    return toks


def downsample_max(matrix: np.ndarray, max_size: int = MAX_DISPLAY) -> np.ndarray:
    """Max-pool a ``(rows, cols)`` matrix so that neither side exceeds ``max_size``.

    Each output cell is the maximum of a block of ``ceil(rows / max_size) x ceil(cols / max_size)``
    input cells (the last blocks may be smaller); a matrix already small enough is
    returned unchanged. Max-pooling, not averaging, keeps a single strong weight visible.
    """
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    rows, cols = matrix.shape
    fr, fc = math.ceil(rows / max_size), math.ceil(cols / max_size)
    if fr == 1 and fc == 1:
        return matrix
    t = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))[None, None]
    pooled = torch.nn.functional.max_pool2d(t, (fr, fc), stride=(fr, fc), ceil_mode=True)
    return pooled[0, 0].numpy()


def _label_axis(ax: Axes, which: Literal["x", "y"], tokens: list[str] | None, n: int, fontsize: float) -> None:
    """Token labels when there are few tokens, else a handful of numeric positions."""
    set_ticks = ax.set_xticks if which == "x" else ax.set_yticks
    if tokens is not None and n <= MAX_TICK_LABELS:
        set_ticks(range(n))
        if which == "x":
            ax.set_xticklabels(tokens, rotation=90, fontsize=fontsize)
        else:
            ax.set_yticklabels(tokens, fontsize=fontsize)
    else:
        step = max(1, _nice_step(n))
        set_ticks(range(0, n, step))
        ax.tick_params(axis=which, labelsize=fontsize + 1)


def _nice_step(n: int, target: int = 8) -> int:
    raw = max(1.0, n / target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return int(m * mag)
    return int(10 * mag)


def _imshow(ax: Axes, m: np.ndarray, vmax: float | None = None, max_size: int = MAX_DISPLAY) -> Any:
    """Draw ``m`` with axis coordinates in token positions even when it is downsampled."""
    rows, cols = m.shape
    shown = downsample_max(m, max_size)
    vmax = float(m.max()) if vmax is None else vmax
    return ax.imshow(
        shown,
        cmap=_CMAP,
        vmin=0.0,
        vmax=vmax if vmax > 0 else 1.0,
        aspect="auto",
        interpolation="nearest",
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
    )


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=fig.dpi)
    return out


def _side(n: int) -> float:
    """Inches for an axis of ``n`` cells: room for labels when short, bounded when long."""
    return float(min(9.0, max(3.0, 0.17 * min(n, MAX_TICK_LABELS) + 1.0)))


def plot_head(
    weights: ArrayLike,
    q_tokens: Sequence[str] | None,
    k_tokens: Sequence[str] | None,
    path: PathLike,
    title: str | None = None,
) -> Path:
    """Heatmap of one head's attention and save it to ``path``; returns the path.

    Args:
        weights: ``(Lq, Lk)`` attention weights of one head (row ``i``: how query ``i`` spreads over keys).
        q_tokens: ``Lq`` strings labelling the rows (queries), or ``None`` for positions.
        k_tokens: ``Lk`` strings labelling the columns (keys), or ``None`` for positions.
        path: output file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        title: optional figure title.
    """
    m = _matrix(weights, "weights", 2)
    lq, lk = m.shape
    qt = _tokens(q_tokens, lq, "q_tokens", "rows (queries)")
    kt = _tokens(k_tokens, lk, "k_tokens", "columns (keys)")
    fig = Figure(figsize=(_side(lk) + 1.2, _side(lq)), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    im = _imshow(ax, m)
    fs = 7.0 if max(lq, lk) > 30 else 9.0
    _label_axis(ax, "x", kt, lk, fs)
    _label_axis(ax, "y", qt, lq, fs)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, shrink=0.8, label="weight")
    if title:
        ax.set_title(_text(title), fontsize=10)
    return _save(fig, path)


def plot_alignment(
    weights: ArrayLike,
    src_tokens: Sequence[str] | None,
    tgt_tokens: Sequence[str] | None,
    path: PathLike,
    title: str | None = None,
) -> Path:
    """Translation alignment (Bahdanau et al. 2015, fig. 3 style): source along x, target down y.

    Args:
        weights: ``(Lout, Lin)`` cross-attention weights; row ``t`` is how output token ``t`` attends
            over the ``Lin`` source tokens.
        src_tokens: ``Lin`` source tokens (columns, written on top) or ``None``.
        tgt_tokens: ``Lout`` target tokens (rows) or ``None``.
        path: output file; its suffix picks the format.
        title: optional figure title.

    Returns the path written. Drawn in grey scale (white = 0, black = 1) on an absolute 0..1 scale so
    alignments of different sentences compare.
    """
    m = _matrix(weights, "weights", 2)
    lout, lin = m.shape
    st = _tokens(src_tokens, lin, "src_tokens", "columns (source positions)")
    tt = _tokens(tgt_tokens, lout, "tgt_tokens", "rows (target positions)")
    fig = Figure(figsize=(_side(lin) + 1.0, _side(lout) + 0.4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(
        downsample_max(m),
        cmap="gray_r",
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
        extent=(-0.5, lin - 0.5, lout - 0.5, -0.5),
    )
    fs = 7.0 if max(lin, lout) > 30 else 9.0
    _label_axis(ax, "x", st, lin, fs)
    _label_axis(ax, "y", tt, lout, fs)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention")
    if title:
        fig.suptitle(_text(title), fontsize=10)
    return _save(fig, path)


def plot_grid(
    weights_per_layer: Sequence[ArrayLike],
    tokens: Sequence[str] | tuple[Sequence[str], Sequence[str]] | None,
    path: PathLike,
    *,
    layer_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """A layer x head grid of small heatmaps (each scaled to its own maximum); returns the path.

    Args:
        weights_per_layer: one tensor per layer, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)`` (batch index 0
            is drawn). Layers may have different head counts (grouped-query models show their query
            heads); missing panels are left blank.
        tokens: the ``Lq == Lk`` tokens, or a pair ``(q_tokens, k_tokens)``, or ``None``. They are
            checked against the shapes and, for short sequences, label the outer panels.
        path: output file; its suffix picks the format.
        layer_names: one name per layer for the row labels (default ``L0``, ``L1``, ...).
        title: optional figure title.
    """
    if isinstance(weights_per_layer, (torch.Tensor, np.ndarray)) or len(weights_per_layer) == 0:
        raise TypeError("weights_per_layer must be a non-empty list of (H, Lq, Lk) tensors, one per layer")
    mats: list[np.ndarray] = []
    for i, w in enumerate(weights_per_layer):
        a = _matrix(w, f"weights_per_layer[{i}] (H, Lq, Lk) or (B, H, Lq, Lk)", 4 if getattr(w, "ndim", 0) == 4 else 3)
        mats.append(a[0] if a.ndim == 4 else a)
    names = [f"L{i}" for i in range(len(mats))] if layer_names is None else [str(n) for n in layer_names]
    if len(names) != len(mats):
        raise ValueError(f"layer_names has {len(names)} names for {len(mats)} layers")
    qt: list[str] | None = None
    kt: list[str] | None = None
    lq, lk = mats[0].shape[1:]
    if tokens is not None:
        if isinstance(tokens, tuple) and len(tokens) == 2 and not isinstance(tokens[0], str):
            qt = _tokens(tokens[0], lq, "tokens[0]", "queries in layer 0")
            kt = _tokens(tokens[1], lk, "tokens[1]", "keys in layer 0")
        else:
            qt = _tokens(tokens, lq, "tokens", "queries in layer 0")  # type: ignore[arg-type]
            kt = _tokens(tokens, lk, "tokens", "keys in layer 0")  # type: ignore[arg-type]
    n_layers, n_heads = len(mats), max(m.shape[0] for m in mats)
    cell = 1.25 if n_heads <= 12 else max(0.6, 15.0 / n_heads)
    fig = Figure(figsize=(cell * n_heads + 0.8, cell * n_layers + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    label_tokens = qt is not None and max(lq, lk) <= 16
    for li, m in enumerate(mats):
        for h in range(n_heads):
            ax = axes[li][h]
            if h >= m.shape[0]:
                ax.axis("off")
                continue
            _imshow(ax, m[h], max_size=_GRID_DISPLAY)
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"H{h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(_text(names[li]), fontsize=8)
            if label_tokens and li == n_layers - 1 and h == 0 and m.shape[1:] == (lq, lk):
                ax.set_xticks(range(lk))
                ax.set_xticklabels(kt, rotation=90, fontsize=5)  # type: ignore[arg-type]
                ax.set_yticks(range(lq))
                ax.set_yticklabels(qt, fontsize=5)  # type: ignore[arg-type]
    if title:
        fig.suptitle(_text(title), fontsize=10)
    return _save(fig, path)


def plot_token_importance(
    importances: dict[str, ArrayLike],
    tokens: Sequence[str] | None,
    path: PathLike,
    title: str | None = None,
) -> Path:
    """Token importance by several methods, one row per method (each row scaled by its largest magnitude, so
    rows compare by rank and shape, not scale), the value written in each cell when there are few tokens.

    Args:
        importances: method name -> ``(L,)`` importance of each token (signed values are shown by magnitude).
        tokens: ``L`` token strings labelling the columns, or ``None`` for positions.
        path: output file (``.png``, ``.svg``, ...).
        title: optional figure title.
    """
    if not importances:
        raise ValueError("importances is empty; give at least one method")
    rows = [np.abs(_matrix(v, f"importances[{k!r}]", 1)) for k, v in importances.items()]
    n = rows[0].shape[0]
    if any(r.shape[0] != n for r in rows):
        raise ValueError(f"every method needs one value per token, got lengths {[r.shape[0] for r in rows]}")
    m = np.stack([r / r.max() if r.max() > 0 else r for r in rows])
    kt = _tokens(tokens, n, "tokens", "columns (tokens)")
    fig = Figure(
        figsize=(max(_side(n), min(16.0, 0.42 * n)) + 2.4, 0.45 * len(rows) + 1.6), dpi=110, layout="constrained"
    )
    ax = fig.add_subplot()
    im = _imshow(ax, m, vmax=1.0)
    fs = 7.0 if n > 30 else 9.0
    _label_axis(ax, "x", kt, n, fs)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_text(k) for k in importances], fontsize=fs)
    if n <= 30:
        for i in range(len(rows)):
            for j in range(n):
                ax.text(
                    j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if m[i, j] < 0.6 else "k"
                )
    fig.colorbar(im, ax=ax, shrink=0.8, label="importance / row maximum")
    if title:
        ax.set_title(_text(title), fontsize=10)
    return _save(fig, path)

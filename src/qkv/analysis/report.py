"""One folder that shows what a model's heads do on one input: the interactive viewer, PNG heatmaps, the
per-head table and a summary (what ``qkv inspect`` writes).

Written to ``outdir``:

- ``viewer.html``: the self-contained interactive viewer (every layer and head, with the per-head table);
- ``grid.png``: a layer x head grid of heatmaps; ``rollout.png``: attention rollout (Abnar and Zuidema 2020);
  ``head_L{l}H{h}.png``: the strongest head of each pattern;
- ``heads.csv`` and ``heads.json``: one row of measures per head (:func:`qkv.analysis.measures.head_table`);
- ``summary.json``: the tokens, the strongest head per pattern, the attention-sink rate (Gu et al. 2025),
  collapse diagnostics across layers and a 2-D map of the heads (MDS of their Jensen-Shannon distances).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from .attention_maps import AttentionMaps
from .measures import (
    TABLE_COLUMNS,
    attention_rollout,
    best_head_per_column,
    collapse,
    head_distances,
    head_table,
    mds,
    sink_rate,
    sink_scores,
)
from .render import plot_grid, plot_head
from .viewer import write_viewer

__all__ = ["BEST_HEAD_COLUMNS", "SINK_THRESHOLD", "HeadReport", "write_head_report"]

BEST_HEAD_COLUMNS: dict[str, str] = {
    "cls": "[CLS]",
    "sep": "[SEP]",
    "punct": "punctuation",
    "self": "itself",
    "prev": "previous token",
    "next": "next token",
    "entropy": "broad attention",
}
"""The :func:`~qkv.analysis.measures.head_table` columns a report names the best head of (by
:func:`~qkv.analysis.measures.best_head_per_column`), each with what a head strong on it does."""


@dataclass
class HeadReport:
    """What :func:`write_head_report` wrote and found.

    Attributes:
        table: one row of measures per head (:func:`qkv.analysis.measures.head_table`).
        best: for each column of :data:`BEST_HEAD_COLUMNS` with a value, the row of its strongest head.
        summary: the content of ``summary.json``.
        files: the names of the files written, sorted.
    """

    table: list[dict[str, Any]]
    best: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    files: list[str]


def write_head_report(
    maps: AttentionMaps,
    outdir: str | os.PathLike[str],
    *,
    hidden_states: Sequence[Tensor] | None = None,
    title: str | None = None,
    token_importance: Mapping[str, Tensor] | None = None,
) -> HeadReport:
    """Measure and draw the heads of the first batch row of ``maps`` (self-attention layers with tokens).

    Args:
        maps: :func:`qkv.analysis.capture`'s result, with ``tokens``.
        outdir: the folder (created if needed).
        hidden_states: the model's hidden states ``(B, L, d)`` per layer, for the rank-collapse diagnostics.
        title: the viewer's title (default: the first tokens).
        token_importance: token importance by method (:mod:`qkv.analysis.token_importance`), one ``(L,)`` row
            each, shown in the viewer beside the attention.

    Raises:
        ValueError: ``maps`` has no tokens.
    """
    if not maps.tokens:
        raise ValueError("write_head_report: maps has no tokens; pass tokens= to capture()")
    tokens = list(maps.tokens[0])
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    table = head_table(maps, [tokens])
    best = best_head_per_column(table, tuple(BEST_HEAD_COLUMNS))
    _write_table(table, out)
    coords = mds(head_distances(maps)).tolist()
    summary = {
        "tokens": tokens,
        "uniform_entropy": math.log(len(tokens)),
        "strongest": {c: {"head": r["name"], "value": r[c]} for c, r in best.items()},
        "sink_rate": _sinks(maps),
        "collapse": collapse(maps, hidden_states=hidden_states),
        "head_map": [{"name": r["name"], "x": xy[0], "y": xy[1]} for r, xy in zip(table, coords)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    title = title or f"{' '.join(tokens[:12])}{' ...' if len(tokens) > 12 else ''}"
    written = _pictures(maps, tokens, table, best, out, title, token_importance)
    return HeadReport(table, best, summary, sorted(written + ["heads.csv", "heads.json", "summary.json"]))


SINK_THRESHOLD = 0.3
"""Gu et al.'s epsilon: a head is a sink head when its mean weight on the first token exceeds it."""


def _sinks(maps: AttentionMaps) -> dict[str, Any]:
    a = sink_scores(maps)
    return {
        "rate": sink_rate(maps, SINK_THRESHOLD),
        "threshold": SINK_THRESHOLD,
        "heads": int((a > SINK_THRESHOLD).sum()),
        "of": a.numel(),
        "first_token_mass": a.tolist(),
    }


def _write_table(table: list[dict[str, Any]], outdir: Path) -> None:
    cols = ["layer", "head", "name", *TABLE_COLUMNS]
    with open(outdir / "heads.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    (outdir / "heads.json").write_text(json.dumps(table, indent=1))


def _pictures(
    maps: AttentionMaps,
    tokens: list[str],
    table: list[dict[str, Any]],
    best: dict[str, Any],
    outdir: Path,
    title: str,
    token_importance: Mapping[str, Tensor] | None = None,
) -> list[str]:
    """The viewer and the PNGs (from :mod:`.viewer` and :mod:`.render`); returns the file names written."""
    written: list[str] = []
    write_viewer(
        maps.weights,
        tokens,
        outdir / "viewer.html",
        layer_names=[f"L{i}" for i in range(len(maps))],
        head_table=table,
        title=title,
        token_importance=token_importance,
    )
    written.append("viewer.html")
    plot_grid([w[0] for w in maps.weights], tokens, outdir / "grid.png", title="attention of every head")
    written.append("grid.png")
    rollout = attention_rollout(maps)
    plot_head(rollout[0], tokens, tokens, outdir / "rollout.png", title="attention rollout (Abnar & Zuidema 2020)")
    written.append("rollout.png")
    for col, r in best.items():
        name = f"head_{r['name']}.png"
        if name not in written:
            w = maps.weights[r["layer"]][0, r["head"]]
            plot_head(w, tokens, tokens, outdir / name, title=f"{r['name']}: strongest on {BEST_HEAD_COLUMNS[col]}")
            written.append(name)
    return written

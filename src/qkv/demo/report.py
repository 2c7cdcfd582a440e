"""Pictures and the HTML page of the demo report (matplotlib with the Agg backend; no network)."""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np

__all__ = ["plot_alignment", "plot_curves", "write_viewer"]


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
    try:  # the analysis package's renderer when it exists
        from ..analysis.render import plot_alignment as _render  # type: ignore[import-not-found]

        _render(w, src_tokens, tgt_tokens, path)
        return
    except ImportError:
        pass
    plt = _plt()
    fig, ax = plt.subplots(figsize=(0.38 * len(src_tokens) + 2, 0.38 * len(tgt_tokens) + 1.5))
    ax.imshow(w, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(len(tgt_tokens)), tgt_tokens, fontsize=9)
    ax.set_xlabel("English source")
    ax.set_ylabel("German output")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1em}} td{{width:18px;height:18px;padding:0}}
th{{font-weight:normal;font-size:11px;white-space:nowrap}} th.k{{writing-mode:vertical-rl}}
table{{border-collapse:collapse}} select{{margin-right:1em}}</style></head><body>
<h2>{title}</h2>
<label>layer <select id="layer"></select></label><label>head <select id="head"></select></label>
<div id="grid"></div>
<script>
const DATA = {data};
const L = document.getElementById('layer'), H = document.getElementById('head'), G = document.getElementById('grid');
DATA.forEach((d, i) => L.add(new Option(d.name, i)));
function esc(s) {{ const e = document.createElement('span'); e.textContent = s; return e.innerHTML; }}
function heads() {{ H.innerHTML=''; DATA[L.value].w.forEach((_, i) => H.add(new Option(i, i))); draw(); }}
function draw() {{
  const d = DATA[L.value], w = d.w[H.value];
  let s = '<table><tr><th></th>' + d.k.map(t => '<th class="k">' + esc(t) + '</th>').join('') + '</tr>';
  w.forEach((row, i) => {{
    s += '<tr><th>' + esc(d.q[i]) + '</th>' + row.map(x => '<td title="' + x.toFixed(3) +
      '" style="background:rgba(20,60,160,' + x.toFixed(3) + ')"></td>').join('') + '</tr>';
  }});
  G.innerHTML = s + '</table>';
}}
L.onchange = heads; H.onchange = draw; heads();
</script></body></html>
"""


def write_viewer(
    layers: list[tuple[str, np.ndarray, list[str], list[str]]], path: str, title: str = "attention"
) -> None:
    """A self-contained HTML page to browse attention heads: choose a layer and a head, see its map.

    Args:
        layers: ``(name, weights (H, Lq, Lk), query_tokens (Lq), key_tokens (Lk))`` per attention layer
            (cross-attention has different query and key tokens).
        path: the ``.html`` file to write.
        title: page title.
    """
    data = []
    for name, w, q, k in layers:
        w = np.asarray(w)
        if w.ndim != 3 or w.shape[1:] != (len(q), len(k)):
            raise ValueError(f"write_viewer: layer {name!r} weights {w.shape} != (H, {len(q)}, {len(k)})")
        data.append({"name": name, "w": np.round(w, 4).tolist(), "q": q, "k": k})
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_PAGE.format(title=html.escape(title), data=json.dumps(data).replace("</", "<\\/")))

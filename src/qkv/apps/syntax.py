"""``qkv inspect --syntax``: which heads of a pretrained encoder follow syntactic relations, against the best
fixed-offset baseline (Clark et al. 2019's Table 1, on template sentences: :mod:`qkv.analysis.syntax`).

Prints one row per relation (pairs, best head and its accuracy, best offset and its accuracy) and writes
``syntax.json`` (every head's accuracy on every relation, every offset's) to the output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ..analysis.syntax import SyntaxScores, syntax_heads
from ..analysis.syntax_sentences import RELATIONS, template_sentences

__all__ = ["format_table", "run_syntax"]


def _load(model: str, models: Mapping[str, Callable[[], nn.Module]]) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the ``encode`` / ``tokenize`` arguments of :func:`syntax_heads` (empty for qkv's models)."""
    if os.path.isdir(model):
        from ..hf import from_pretrained

        hf, tok = from_pretrained(model)

        def encode(texts: list[str]) -> tuple[Mapping[str, Tensor], list[list[str]]]:
            enc = tok(texts, padding=True, return_tensors="pt")
            return dict(enc), [list(tok.convert_ids_to_tokens(row)) for row in enc["input_ids"]]

        return hf, {"encode": encode, "tokenize": tok.tokenize}
    if model not in models:
        raise ValueError(
            f"unknown model {model!r}; choose one of {', '.join(models)} or a Hugging Face checkpoint folder"
        )
    return models[model](), {}


def format_table(scores: SyntaxScores) -> list[str]:
    """The table's lines: relation, pairs, best head, its accuracy, best offset, its accuracy."""
    lines = [f"  {'relation':<22}{'pairs':>6}  {'best head':>9}  {'accuracy':>8}  {'best offset':>11}  {'accuracy':>8}"]
    for r in scores.best():
        lines.append(
            f"  {r['relation']:<22}{r['n']:>6}  {r['name']:>9}  {100 * r['accuracy']:>7.1f}%"
            f"  {r['offset']:>+11d}  {100 * r['baseline']:>7.1f}%"
        )
    return lines


def run_syntax(
    model: str,
    out: str | os.PathLike[str],
    sentences: int = 500,
    seed: int = 0,
    *,
    models: Mapping[str, Callable[[], nn.Module]],
) -> tuple[SyntaxScores, str]:
    """Score every head of ``model`` on ``sentences`` template sentences (seed ``seed``) and write ``syntax.json``.

    Args:
        model: a key of ``models`` (``"minilm"``) or a local Hugging Face checkpoint folder.
        out: the output folder (created if needed).
        sentences: how many template sentences.
        seed: their seed.
        models: model names to constructors (:data:`qkv.apps.inspect.MODELS`).

    Returns:
        The scores and the path of ``syntax.json``.
    """
    if sentences < 1:
        raise ValueError(f"--sentences must be >= 1, got {sentences}")
    m, kwargs = _load(model, models)
    scores = syntax_heads(m, template_sentences(sentences, seed), names=RELATIONS, **kwargs)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(os.fspath(out), "syntax.json")
    with open(path, "w") as fh:
        json.dump({"model": model, "seed": seed, **scores.to_dict()}, fh, indent=1)
    return scores, path

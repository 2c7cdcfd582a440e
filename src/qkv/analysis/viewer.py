"""A self-contained interactive HTML attention viewer: one file, no network, no CDN.

:func:`write_viewer` embeds the weights of every layer and head in the page (quantised to uint8 per
row, zlib-compressed, base64) together with the page's own JavaScript and CSS. The page lets one choose
a layer and a head (select boxes or the arrow keys), hover a token to see its attention drawn as lines
to the other tokens (as in bertviz's head view), see the head as a heatmap, and sort a table of
per-head measures. Everything is drawn on canvases with only the visible tokens, so it stays usable at
thousands of tokens; for long sequences only the ``top_k`` largest weights of each query row are kept,
and the page says so (with the share of attention mass they hold).

Encoding (what the page decodes): per layer, ``rowmax`` as float32 ``(H, Lq)``, then either ``dense``
uint8 ``(H, Lq, Lk)`` with ``w ~= byte / 255 * rowmax``, or ``topk``: uint16 key indices ``(H, Lq, k)``
(ascending within a row) and their uint8 values. Sections are 4-byte aligned in one zlib stream.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

__all__ = ["DEFAULT_MAX_CELLS", "write_viewer"]

ArrayLike = Union[torch.Tensor, np.ndarray]
TokenSpec = Union[Sequence[str], tuple[Sequence[str], Sequence[str]], Sequence[tuple[Sequence[str], Sequence[str]]]]

#: above this many stored weights in all (layers x heads x Lq x Lk) the page keeps only the top-k per row
DEFAULT_MAX_CELLS = 2_000_000
_MIN_TOP_K, _MAX_TOP_K = 8, 64


def _layer_array(w: Any, i: int) -> torch.Tensor:
    name = f"weights[{i}]"
    if isinstance(w, torch.Tensor):
        a = w.detach().to("cpu", torch.float32)
    elif isinstance(w, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(w).__name__}")
    if a.ndim == 4:
        a = a[0]
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"{name} must be (H, Lq, Lk) or (B, H, Lq, Lk) and non-empty, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} contains NaN or inf (shape {tuple(a.shape)})")
    if a.shape[2] > 65535:
        raise ValueError(f"{name} has Lk={a.shape[2]} keys; the viewer stores key indices as uint16 (<= 65535)")
    return a


def _str_list(x: Any, name: str) -> list[str] | None:
    """``x`` as a list of str if it is a sequence of strings, else None."""
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        return None
    if all(isinstance(t, str) for t in x):
        return list(x)
    return None


def _resolve_tokens(tokens: Any, layers: list[torch.Tensor]) -> tuple[list[list[str]], list[tuple[int, int]]]:
    """Unique token lists and, per layer, the indices of its (query, key) token lists."""
    n = len(layers)
    pairs: list[tuple[list[str], list[str]]]
    flat = _str_list(tokens, "tokens")
    if flat is not None:
        pairs = [(flat, flat)] * n
    elif isinstance(tokens, tuple) and len(tokens) == 2 and _str_list(tokens[0], "") is not None:
        q, k = _str_list(tokens[0], ""), _str_list(tokens[1], "")
        if k is None:
            raise TypeError("tokens[1] must be a sequence of str (the key tokens)")
        pairs = [(q, k)] * n  # type: ignore[list-item]
    elif isinstance(tokens, list) and len(tokens) == n:
        pairs = []
        for i, p in enumerate(tokens):
            if not (isinstance(p, (tuple, list)) and len(p) == 2):
                raise TypeError(f"tokens[{i}] must be a (q_tokens, k_tokens) pair")
            q, k = _str_list(p[0], ""), _str_list(p[1], "")
            if q is None or k is None:
                raise TypeError(f"tokens[{i}] must be a pair of sequences of str")
            pairs.append((q, k))
    else:
        raise TypeError(
            "tokens must be a list of str (self-attention), a tuple (q_tokens, k_tokens), "
            f"or a list of {n} such pairs (one per layer); got {type(tokens).__name__}"
        )
    uniq: list[list[str]] = []
    refs: list[tuple[int, int]] = []

    def ref(t: list[str]) -> int:
        for j, u in enumerate(uniq):
            if u is t or u == t:
                return j
        uniq.append(t)
        return len(uniq) - 1

    for i, ((q, k), a) in enumerate(zip(pairs, layers)):
        if (len(q), len(k)) != tuple(a.shape[1:]):
            raise ValueError(
                f"layer {i} has weights (H, Lq, Lk) = {tuple(a.shape)} but {len(q)} query and {len(k)} key tokens"
            )
        refs.append((ref(q), ref(k)))
    return uniq, refs


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    if rows is None:
        return None
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError("head_table must be a list of dict rows, one per (layer, head)")
    cols: list[str] = []
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TypeError(f"head_table[{i}] must be a dict, got {type(r).__name__}")
        for c in r:
            if str(c) not in cols:
                cols.append(str(c))
        out.append({str(c): _jsonable(v) for c, v in r.items()})
    return {"columns": cols, "rows": [[r.get(c) for c in cols] for r in out]}


def _importance(rows: Mapping[str, Any] | None, tokens: Sequence[str]) -> dict[str, Any] | None:
    if rows is None:
        return None
    if not isinstance(rows, Mapping):
        raise TypeError(f"token_importance must be a dict of method name -> values, got {type(rows).__name__}")
    toks = [str(t) for t in tokens]
    out = []
    for name, vals in rows.items():
        v = (
            vals.detach().cpu().double().flatten().tolist()
            if isinstance(vals, torch.Tensor)
            else np.asarray(vals, dtype=np.float64).ravel().tolist()
        )
        if len(v) != len(toks):
            raise ValueError(f"token_importance[{name!r}] has {len(v)} values for {len(toks)} tokens")
        out.append({"name": str(name), "values": [_jsonable(float(x)) for x in v]})
    return {"tokens": toks, "rows": out}


def _quantise(a: torch.Tensor, k: int | None) -> tuple[bytes, bytes | None, bytes, float, float]:
    """(rowmax f32, idx u16 or None, vals u8, mean kept mass, min kept mass) for one layer ``(H, Lq, Lk)``."""
    a = a.clamp_min(0.0)
    idx: torch.Tensor | None = None
    if k is not None:
        idx = torch.topk(a, k, dim=-1, sorted=False).indices.sort(dim=-1).values
        vals = torch.gather(a, -1, idx)
        total = a.sum(-1)
        kept = torch.where(total > 0, vals.sum(-1) / total.clamp_min(1e-30), torch.ones_like(total))
    else:
        vals, kept = a, torch.ones(a.shape[:2])
    rowmax = vals.amax(-1)
    scale = torch.where(rowmax > 0, 255.0 / rowmax.clamp_min(1e-30), torch.zeros_like(rowmax))
    q = torch.round(vals * scale[..., None]).clamp_(0, 255).to(torch.uint8)
    idx_b = None if idx is None else idx.numpy().astype("<u2").tobytes()
    return (
        rowmax.numpy().astype("<f4").tobytes(),
        idx_b,
        q.numpy().tobytes(),
        float(kept.mean()),
        float(kept.min()),
    )


def _viridis() -> list[int]:
    from matplotlib import colormaps

    lut = colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3]
    return [int(round(x * 255)) for x in lut.reshape(-1)]


def _script_json(obj: Any) -> str:
    """JSON safe inside a <script> element (no '<', '>', '&' can close or open a tag)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return resources.files("qkv.analysis").joinpath(name).read_text(encoding="utf-8")


def write_viewer(
    weights: Sequence[ArrayLike],
    tokens: TokenSpec,
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str] | None = None,
    head_table: Sequence[Mapping[str, Any]] | None = None,
    title: str | None = None,
    kv_heads: int | Sequence[int] | None = None,
    top_k: int | None = None,
    max_cells: int = DEFAULT_MAX_CELLS,
    token_importance: Mapping[str, Sequence[float] | ArrayLike] | None = None,
    importance_tokens: Sequence[str] | None = None,
) -> Path:
    """Write one self-contained HTML file that shows the attention of every layer and head.

    Args:
        weights: one tensor (or array) per layer, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)`` (batch index 0
            is shown); rows are query positions and should sum to at most 1. Layers may differ in
            ``H``, ``Lq`` and ``Lk`` (encoder, decoder and cross-attention in one page). For
            grouped-query models pass the query heads' weights ``(H, Lq, Lk)``.
        tokens: a list of ``L`` strings when every layer is self-attention over the same tokens
            (``Lq == Lk == L``); a tuple ``(q_tokens, k_tokens)`` shared by all layers; or a list of
            such pairs, one per layer. Tokens are shown as text (never interpreted as HTML).
        path: the ``.html`` file to write (parent folders are created).
        layer_names: one name per layer (default ``layer 0``, ``layer 1``, ...).
        head_table: per-head measures, a list of dict rows (for example
            ``{"layer": 3, "head": 11, "entropy": 1.2, "[SEP]": 0.62}``). Shown as a sortable table;
            clicking a row with ``layer`` (index or name) and ``head`` keys selects that head.
        title: page title (default "Attention viewer").
        kv_heads: number of key/value heads (one int for all layers, or one per layer) of a
            grouped-query model; the page then labels query head ``h`` with its kv head
            ``h // (H // kv_heads)``.
        top_k: keep only the ``top_k`` largest weights of each query row. ``None`` (default) keeps
            everything when ``sum(H * Lq * Lk) <= max_cells`` and otherwise picks
            ``top_k = clamp(max_cells // sum(H * Lq), 8, 64)``.
        max_cells: the budget of stored weights that decides the default ``top_k``.
        token_importance: token importance by method (:mod:`qkv.analysis.token_importance`): method name -> one
            value per token, shown as rows beside the attention (shaded by ``|value|`` over the row's largest).
        importance_tokens: the tokens the ``token_importance`` values belong to (default: the key tokens of the
            first layer).

    Returns:
        ``Path`` of the written file.
    """
    if isinstance(weights, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"weights must be a list with one (H, Lq, Lk) tensor per layer, got one {type(weights).__name__}"
        )
    if len(weights) == 0:
        raise ValueError("weights must contain at least one layer, got an empty list")
    layers = [_layer_array(w, i) for i, w in enumerate(weights)]
    n = len(layers)
    token_lists, refs = _resolve_tokens(tokens, layers)
    names = [f"layer {i}" for i in range(n)] if layer_names is None else [str(x) for x in layer_names]
    if len(names) != n:
        raise ValueError(f"layer_names has {len(names)} names for {n} layers")
    if kv_heads is None:
        kvs: list[int | None] = [None] * n
    elif isinstance(kv_heads, int):
        kvs = [kv_heads] * n
    else:
        kvs = [int(x) for x in kv_heads]
        if len(kvs) != n:
            raise ValueError(f"kv_heads has {len(kvs)} entries for {n} layers")
    for i, (a, kv) in enumerate(zip(layers, kvs)):
        if kv is not None and (kv < 1 or a.shape[0] % kv):
            raise ValueError(f"kv_heads={kv} must divide layer {i}'s H={a.shape[0]} query heads")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    k_all = top_k
    if k_all is None and sum(a.numel() for a in layers) > max_cells:
        rows = sum(a.shape[0] * a.shape[1] for a in layers)
        k_all = int(min(_MAX_TOP_K, max(_MIN_TOP_K, max_cells // rows)))

    blob = bytearray()

    def put(b: bytes) -> int:
        blob.extend(b"\0" * (-len(blob) % 4))
        off = len(blob)
        blob.extend(b)
        return off

    meta_layers = []
    for i, a in enumerate(layers):
        H, lq, lk = a.shape
        k = k_all if k_all is not None and k_all < lk else None
        rowmax, idx, vals, kept_mean, kept_min = _quantise(a, k)
        entry: dict[str, Any] = {
            "name": names[i],
            "H": H,
            "Lq": lq,
            "Lk": lk,
            "qt": refs[i][0],
            "kt": refs[i][1],
            "kv": kvs[i],
            "mode": "dense" if k is None else "topk",
            "k": lk if k is None else k,
            "rowmax": put(rowmax),
            "idx": None if idx is None else put(idx),
            "vals": put(vals),
            "kept_mean": round(kept_mean, 4),
            "kept_min": round(kept_min, 4),
        }
        meta_layers.append(entry)
    imp = _importance(token_importance, importance_tokens or token_lists[refs[0][1]])
    raw_len = len(blob)
    packed = base64.b64encode(zlib.compress(bytes(blob), 6)).decode("ascii")
    meta = {
        "title": title or "Attention viewer",
        "layers": meta_layers,
        "tokens": token_lists,
        "table": _table(head_table),
        "importance": imp,
        "cmap": _viridis(),
        "bytes": raw_len,
    }
    page_title = html.escape(title or "Attention viewer")
    values = {
        "TITLE": page_title,
        "CSS": _asset("viewer.css"),
        "JS": _asset("viewer.js"),
        "META": _script_json(meta),
        "DATA": packed,
    }
    template = _asset("viewer.html")
    # one pass, so that nothing substituted (tokens, titles) is scanned for placeholders again
    page = re.sub(r"@@QKV_(TITLE|CSS|JS|META|DATA)@@", lambda m: values[m.group(1)], template)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out

"""Measures of attention heads, after Clark et al. 2019 ("What Does BERT Look At?") and later work.

Every per-head measure takes one layer's weights ``w`` of shape ``(B, H, Lq, Lk)`` (rows are attention
distributions over keys) and an optional ``valid`` bool mask ``(B, Lq)`` of the real query positions (pass
the model's ``attention_mask``; padded query rows are left out of the averages). Each returns one value per
head, ``(H,)``: the mean over the batch rows and valid query positions. When ``Lq != Lk`` query ``i`` stands
at key position ``i + Lk - Lq`` (bottom-right, as in :func:`qkv.attention`).

Across layers: :func:`head_distances` (Jensen-Shannon) and :func:`mds` (a 2-D map of all heads),
:func:`attention_rollout` and :func:`attention_flow` (Abnar and Zuidema 2020), :func:`collapse` (entropy and
rank collapse), :func:`head_importance` and :func:`head_ablation` (Michel et al. 2019: how much each *head*
matters to a loss; how much each *token* matters is :mod:`qkv.analysis.token_importance`), and
:func:`head_table`, one row of measures per head, with :func:`best_head_per_column`; :func:`sink_rate` (Gu et
al. 2025), the share of heads that park their attention on the first token.
"""

from __future__ import annotations

import math
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch
from torch import Tensor, nn

from .interventions import attention_modules, scale_heads

if TYPE_CHECKING:
    from .attention_maps import AttentionMaps

__all__ = [
    "SPECIAL_TOKENS",
    "TABLE_COLUMNS",
    "attention_flow",
    "attention_rollout",
    "best_head_per_column",
    "collapse",
    "flow_graph",
    "head_ablation",
    "head_distances",
    "head_entropy",
    "head_importance",
    "head_table",
    "js_divergence",
    "mass_on",
    "mds",
    "mean_distance",
    "offset_mass",
    "punctuation_positions",
    "rank1_residual",
    "sink_rate",
    "sink_scores",
    "special_positions",
]

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "<s>", "</s>", "<|endoftext|>")
"""The tokens :func:`special_positions` marks by default (BERT's, RoBERTa's and GPT-2's)."""


def _check(w: Tensor, name: str = "w") -> Tensor:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (B, H, Lq, Lk), got {type(w).__name__}")
    if w.dim() != 4:
        raise ValueError(f"{name} must be (B, H, Lq, Lk), got shape {tuple(w.shape)}")
    return w.double()


def _valid(valid: Tensor | None, B: int, Lq: int) -> Tensor:
    if valid is None:
        return torch.ones(B, Lq, dtype=torch.bool)
    v = valid.bool().cpu()
    if v.dim() == 1:
        v = v.expand(B, -1)
    if tuple(v.shape) != (B, Lq):
        raise ValueError(f"valid must be (B, Lq) = {(B, Lq)}, got shape {tuple(valid.shape)}")
    return v


def _head_mean(x: Tensor, valid: Tensor) -> Tensor:
    """``x (B, H, Lq)`` averaged over the True entries of ``valid (B, Lq)``: ``(H,)``."""
    m = valid.to(x.dtype).unsqueeze(1).to(x.device)
    n = m.sum() * 1.0
    return (x * m).sum(dim=(0, 2)) / n.clamp(min=1.0)


def head_entropy(w: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of each head's attention rows, ``-sum_j p_ij log p_ij`` (``0 log 0 = 0``).

    Low: focused heads; high (up to ``log Lk``): broad attention. Returns ``(H,)`` float64."""
    w = _check(w)
    ent = -(w * torch.log(w.clamp(min=1e-300))).sum(-1)
    return _head_mean(ent, _valid(valid, w.shape[0], w.shape[2]))


def mean_distance(w: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean attention distance, ``sum_j p_ij |i - j|`` in tokens, averaged per head: ``(H,)`` float64."""
    w = _check(w)
    B, H, Lq, Lk = w.shape
    i = torch.arange(Lq, dtype=w.dtype).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk, dtype=w.dtype).view(1, -1)
    d = (w * (i - j).abs()).sum(-1)
    return _head_mean(d, _valid(valid, B, Lq))


def _positions(positions: Tensor | Sequence[int] | Sequence[bool], B: int, Lk: int) -> Tensor:
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        p = positions.cpu()
    else:
        idx = torch.as_tensor(list(positions) if not isinstance(positions, Tensor) else positions, dtype=torch.long)
        if idx.dim() != 1 or (idx.numel() and (idx.min() < -Lk or idx.max() >= Lk)):
            raise ValueError(f"positions must be key indices in [-{Lk}, {Lk}), got {idx.tolist()}")
        p = torch.zeros(Lk, dtype=torch.bool)
        p[idx] = True
    if p.dim() == 1:
        p = p.expand(B, -1)
    if tuple(p.shape) != (B, Lk):
        raise ValueError(f"positions as a bool mask must be (Lk,) or (B, Lk) = {(B, Lk)}, got {tuple(p.shape)}")
    return p


def mass_on(w: Tensor, positions: Tensor | Sequence[int], valid: Tensor | None = None) -> Tensor:
    """Mean attention mass that each head puts on the given key positions, ``sum_{j in positions} p_ij``.

    Args:
        w: ``(B, H, Lq, Lk)``.
        positions: key indices (a list of ints), or a bool mask ``(Lk,)`` or ``(B, Lk)`` (e.g. from
            :func:`special_positions` or :func:`punctuation_positions`).
        valid: ``(B, Lq)`` real queries.

    Returns:
        ``(H,)`` float64 in ``[0, 1]``."""
    w = _check(w)
    B, H, Lq, Lk = w.shape
    p = _positions(positions, B, Lk).to(w.dtype)
    m = (w * p[:, None, None, :]).sum(-1)
    return _head_mean(m, _valid(valid, B, Lq))


def offset_mass(w: Tensor, offset: int, valid: Tensor | None = None) -> Tensor:
    """Mean weight each head gives the key at a fixed offset from the query: 0 = the token itself,
    -1 = the previous token, +1 = the next one. Queries whose target is outside the sequence (or padding,
    per ``valid``) are left out. Returns ``(H,)`` float64."""
    w = _check(w)
    B, H, Lq, Lk = w.shape
    v = _valid(valid, B, Lq)
    kv_valid = v if Lq == Lk else torch.ones(B, Lk, dtype=torch.bool)
    i = torch.arange(Lq) + (Lk - Lq)
    j = i + offset
    inside = (j >= 0) & (j < Lk)
    jc = j.clamp(0, Lk - 1)
    vals = w.gather(-1, jc.view(1, 1, -1, 1).expand(B, H, Lq, 1)).squeeze(-1)
    ok = v & inside.view(1, -1) & kv_valid[:, jc]
    return _head_mean(vals, ok)


def special_positions(
    tokens: Sequence[str] | Sequence[Sequence[str]], specials: Iterable[str] = SPECIAL_TOKENS
) -> Tensor:
    """Bool mask of the positions holding a special token (``[CLS]``, ``[SEP]``, ...): ``(L,)`` for one token
    list, ``(B, L)`` for a list of equally long token lists."""
    s = set(specials)
    return _token_mask(tokens, lambda t: t in s)


def _is_punct(t: str) -> bool:
    t = t[2:] if t.startswith("##") and len(t) > 2 else t
    return len(t) > 0 and all(unicodedata.category(c).startswith("P") for c in t)


def punctuation_positions(tokens: Sequence[str] | Sequence[Sequence[str]]) -> Tensor:
    """Bool mask of the tokens made only of punctuation characters (Unicode category P*; a ``##`` word-piece
    prefix is ignored): ``(L,)`` or ``(B, L)``."""
    return _token_mask(tokens, _is_punct)


def _token_mask(tokens: Sequence[str] | Sequence[Sequence[str]], pred: Callable[[str], bool]) -> Tensor:
    if len(tokens) and not isinstance(tokens[0], str):
        rows = [[pred(t) for t in row] for row in tokens]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"token lists must be equally long, got lengths {[len(r) for r in rows]}")
        return torch.tensor(rows, dtype=torch.bool)
    return torch.tensor([pred(t) for t in tokens], dtype=torch.bool)  # type: ignore[arg-type]


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits (in ``[0, 1]``) between distributions along the last dim:
    ``JS = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``. Broadcasts ``p`` against ``q``."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log2(a.clamp(min=1e-300)) - torch.log2(m.clamp(min=1e-300))), 0.0).sum(-1)

    return (kl(p) + kl(q)) / 2


def _as_layers(maps: AttentionMaps | Sequence[Tensor] | Tensor) -> list[Tensor]:
    ws = maps.weights if hasattr(maps, "weights") else maps
    layers = list(ws.unbind(0)) if isinstance(ws, Tensor) else list(ws)
    if not layers:
        raise ValueError("no attention layers given")
    return [_check(w, f"layer {i}") for i, w in enumerate(layers)]


def head_distances(
    maps: AttentionMaps | Sequence[Tensor],
    valid: Tensor | None = None,
    max_cells: int = 1 << 16,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Head-to-head distance (Clark et al. 2019, sec. 6): the Jensen-Shannon divergence between two heads'
    attention rows, averaged over the batch rows and valid queries.

    Computed as ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2`` (entropies in bits), one head against all
    the later ones at a time. The cost is ``N² / 2 x rows x Lk``; when ``rows x Lk`` exceeds ``max_cells``,
    an evenly spaced subset of the query rows is used (about ``max_cells / Lk`` of them).

    Args:
        maps: :class:`AttentionMaps` or a list of per-layer ``(B, H, Lq, Lk)``, all of one shape.
        valid: ``(B, Lq)`` real queries (default: ``maps.attention_mask`` when present).
        max_cells: the most attention weights per head that enter the comparison.
        dtype: the compute dtype (float32 is twice as fast; its error is about 1e-6 bits).

    Returns:
        ``(N, N)`` float64 with ``N`` = layers x heads, heads in order ``(layer 0 head 0, layer 0 head 1, ...)``.
    """
    if valid is None and hasattr(maps, "attention_mask"):
        valid = maps.attention_mask
    layers = _as_layers(maps)
    if len({tuple(w.shape) for w in layers}) != 1:
        raise ValueError("head_distances needs layers of one shape, got " + str([tuple(w.shape) for w in layers]))
    B, H, Lq, Lk = layers[0].shape
    v = _valid(valid, B, Lq)
    rows = torch.cat(layers, dim=1).permute(1, 0, 2, 3)[:, v]  # (N, R, Lk)
    R = rows.shape[1]
    if R * Lk > max_cells:
        keep = max(1, max_cells // Lk)
        rows = rows[:, torch.linspace(0, R - 1, keep).round().long()]
    rows = rows.to(dtype)
    N = rows.shape[0]
    ent = -torch.special.xlogy(rows, rows).sum(-1) / math.log(2)  # (N, R) bits
    D = torch.zeros(N, N, dtype=torch.float64)
    for a in range(N - 1):
        m = (rows[a : a + 1] + rows[a + 1 :]) / 2
        hm = -torch.special.xlogy(m, m).sum(-1) / math.log(2)
        js = (hm - (ent[a : a + 1] + ent[a + 1 :]) / 2).clamp(min=0).mean(-1)
        D[a, a + 1 :] = js.double()
        D[a + 1 :, a] = js.double()
    return D


def mds(D: Tensor, dim: int = 2) -> Tensor:
    """Classical (Torgerson) multidimensional scaling: points whose Euclidean distances approximate ``D``.

    Args:
        D: ``(N, N)`` symmetric distances.
        dim: dimensions of the map.

    Returns:
        ``(N, dim)`` float64 coordinates (``B = -J D² J / 2``, top eigenvectors scaled by ``sqrt`` of their
        eigenvalues; negative eigenvalues count as 0)."""
    if D.dim() != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D must be a square (N, N) matrix, got shape {tuple(D.shape)}")
    D = D.double()
    N = D.shape[0]
    J = torch.eye(N, dtype=torch.float64) - 1.0 / N
    Bm = -0.5 * J @ (D**2) @ J
    evals, evecs = torch.linalg.eigh((Bm + Bm.T) / 2)
    order = torch.argsort(evals, descending=True)[:dim]
    X = evecs[:, order] * evals[order].clamp(min=0).sqrt()
    if X.shape[1] < dim:
        X = torch.cat([X, X.new_zeros(N, dim - X.shape[1])], dim=1)
    return X


def _residual_weight(residual: float | bool) -> float:
    """``residual`` as the identity's weight: ``True`` -> 0.5 (the paper's), ``False`` -> 0."""
    if isinstance(residual, bool):
        return 0.5 if residual else 0.0
    if not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be a number in [0, 1] (the identity's weight), got {residual!r}")
    return float(residual)


def _augmented(w: Tensor, residual: float | bool) -> Tensor:
    """``rownorm(r I + (1 - r) mean_heads(w))``, ``(B, L, L)``: the identity stands for the residual path."""
    r = _residual_weight(residual)
    a = (1 - r) * w.mean(dim=1)
    if r:
        a = a + r * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a / a.sum(-1, keepdim=True).clamp(min=1e-300)


@overload
def attention_rollout(
    maps: AttentionMaps | Sequence[Tensor], residual: float | bool = ..., *, all_layers: Literal[False] = ...
) -> Tensor: ...


@overload
def attention_rollout(
    maps: AttentionMaps | Sequence[Tensor], residual: float | bool = ..., *, all_layers: Literal[True]
) -> list[Tensor]: ...


def attention_rollout(
    maps: AttentionMaps | Sequence[Tensor], residual: float | bool = 0.5, *, all_layers: bool = False
) -> Tensor | list[Tensor]:
    """Attention rollout (Abnar and Zuidema 2020): ``R_l = Â_l R_{l-1}``, ``R_1 = Â_1``, with
    ``Â = rownorm(r I + (1 - r) mean_heads(A))`` (the identity stands for the residual connection).

    Args:
        maps: :class:`AttentionMaps` or a list of self-attention layers ``(B, H, L, L)`` in forward order
            (one ``B`` and ``L``).
        residual: ``r``, the identity's weight in ``[0, 1]``; 0.5 is the paper's choice (rows of
            weights summing to 1 then give ``rownorm(A + I)``). ``True``/``False`` mean 0.5/0.
        all_layers: return every ``R_l`` (a list) instead of only the last.

    Returns:
        ``(B, L, L)`` float64: row ``i`` says how much output token ``i`` draws on each input token (for a
        ViT, ``R[:, 0, 1:]`` is the class token's map over the patches).

    Raises:
        ValueError: no layers, layers that are not square or not of one ``(B, L)``, ``residual`` outside ``[0, 1]``.
    """
    if not isinstance(maps, Tensor) and not getattr(maps, "weights", maps):
        raise ValueError("attention_rollout: maps is empty; give at least one layer (B, H, L, L)")
    layers = _as_layers(maps)
    B, _, L, _ = layers[0].shape
    R: Tensor | None = None
    out = []
    for w in layers:
        if w.shape[2] != w.shape[3]:
            raise ValueError(f"rollout needs self-attention (Lq == Lk), got {tuple(w.shape)}")
        if (w.shape[0], w.shape[2]) != (B, L):
            raise ValueError(f"rollout needs layers of one (B, L) = {(B, L)}, got {tuple(w.shape)}")
        a = _augmented(w, residual)
        R = a if R is None else a @ R
        out.append(R)
    return out if all_layers else out[-1]


def _max_flow(cap: np.ndarray, s: int, t: int) -> float:
    """Maximum flow value from ``s`` to ``t`` on the dense capacity matrix ``cap`` (Dinic's algorithm)."""
    n = cap.shape[0]
    res = cap.astype(np.float64).copy()
    nbrs = [np.nonzero((cap[u] > 0) | (cap[:, u] > 0))[0].tolist() for u in range(n)]
    eps = 1e-12
    level = [-1] * n
    it = [0] * n

    def push(u: int, f: float) -> float:
        """One augmenting path along the level graph, from ``u`` to ``t``, carrying at most ``f``."""
        if u == t:
            return f
        while it[u] < len(nbrs[u]):
            x = nbrs[u][it[u]]
            if level[x] == level[u] + 1 and res[u, x] > eps:
                d = push(x, min(f, res[u, x]))
                if d > eps:
                    res[u, x] -= d
                    res[x, u] += d
                    return d
            it[u] += 1
        return 0.0

    total = 0.0
    while True:
        level[:] = [-1] * n
        level[s] = 0
        dq = deque([s])
        while dq:
            u = dq.popleft()
            for x in nbrs[u]:
                if level[x] < 0 and res[u, x] > eps:
                    level[x] = level[u] + 1
                    dq.append(x)
        if level[t] < 0:
            return total
        it[:] = [0] * n
        while True:
            f = push(s, math.inf)
            if f <= eps:
                break
            total += f


def flow_graph(maps: AttentionMaps | Sequence[Tensor], b: int = 0, residual: float | bool = 0.5) -> np.ndarray:
    """The layered graph of attention flow for batch row ``b``: node ``l * L + i`` is token ``i`` after layer
    ``l`` (``l = 0``: the inputs); the edge from ``l * L + i`` down to ``(l - 1) * L + j`` has capacity
    ``Â_l[i, j]``. Returns the dense ``((layers + 1) L, (layers + 1) L)`` capacity matrix."""
    layers = _as_layers(maps)
    L = layers[0].shape[-1]
    n = len(layers)
    cap = np.zeros(((n + 1) * L, (n + 1) * L))
    for l, w in enumerate(layers, start=1):
        if w.shape[2] != L or w.shape[3] != L:
            raise ValueError(f"attention flow needs self-attention layers of one length, got {tuple(w.shape)}")
        cap[l * L : (l + 1) * L, (l - 1) * L : l * L] = _augmented(w[b : b + 1], residual)[0].numpy()
    return cap


def attention_flow(
    maps: AttentionMaps | Sequence[Tensor], b: int = 0, residual: float | bool = 0.5, max_len: int = 64
) -> Tensor:
    """Attention flow (Abnar and Zuidema 2020): the maximum flow from each output token of the last layer to
    each input token through the graph of :func:`flow_graph`, each row normalised to sum to 1.

    It solves ``L²`` max-flow problems on a graph of ``(layers + 1) L`` nodes: meant for short inputs.

    Args:
        maps: self-attention layers ``(B, H, L, L)``.
        b: which batch row.
        residual: the identity's weight in each layer's head-averaged weights, as in :func:`attention_rollout`.
        max_len: refuse longer inputs (the cost grows fast with ``L``).

    Returns:
        ``(L, L)`` float64: row ``i`` = flow from output token ``i`` to each input token."""
    cap = flow_graph(maps, b, residual)
    layers = _as_layers(maps)
    L, n = layers[0].shape[-1], len(layers)
    if L > max_len:
        raise ValueError(f"attention_flow: L = {L} tokens is more than max_len = {max_len}; pass a larger max_len")
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            out[i, j] = _max_flow(cap, n * L + i, j)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-300)


def rank1_residual(x: Tensor) -> Tensor:
    """Relative distance of each matrix ``x (..., L, d)`` to the rank-1 matrices with identical rows:
    ``||x - 1 x̄ᵀ||_F / ||x||_F`` with ``x̄`` the mean row (Dong et al. 2021 measure rank collapse this way,
    with an l1/l∞ norm). 0 means every token has collapsed to the same vector. Returns ``x.shape[:-2]``."""
    x = x.double()
    r = x - x.mean(dim=-2, keepdim=True)
    return torch.linalg.matrix_norm(r) / torch.linalg.matrix_norm(x).clamp(min=1e-300)


def collapse(
    maps: AttentionMaps | Sequence[Tensor], hidden_states: Sequence[Tensor] | None = None, b: int = 0
) -> dict[str, list[float]]:
    """Collapse diagnostics across layers, for batch row ``b`` (its real tokens only when ``maps`` knows the
    attention mask).

    Returns a dict of per-layer lists:
        ``entropy``: mean attention entropy (nats) of the layer (entropy collapse: values near 0);
        ``entropy_max``: ``log`` of the number of real keys, the entropy of uniform attention;
        ``rank1_attention``: :func:`rank1_residual` of the product of the head-averaged attention matrices
        ``A_l ... A_1`` (pure-attention path, no residual): rank collapse of the attention product;
        ``rank1_hidden`` (when ``hidden_states``, a list of ``(B, L, d)``, is given): :func:`rank1_residual`
        of each hidden state.
    """
    layers = _as_layers(maps)
    am = getattr(maps, "attention_mask", None)
    L = layers[0].shape[-1]
    keep = am[b].bool() if isinstance(am, Tensor) else torch.ones(L, dtype=torch.bool)
    idx = torch.nonzero(keep).flatten()
    out: dict[str, list[float]] = {"entropy": [], "entropy_max": [], "rank1_attention": []}
    P: Tensor | None = None
    for w in layers:
        wb = w[b : b + 1][:, :, idx][:, :, :, idx]
        out["entropy"].append(float(head_entropy(wb).mean()))
        out["entropy_max"].append(math.log(len(idx)))
        a = wb[0].mean(0)
        P = a if P is None else a @ P
        out["rank1_attention"].append(float(rank1_residual(P)))
    if hidden_states is not None:
        out["rank1_hidden"] = [float(rank1_residual(h[b][idx].detach())) for h in hidden_states]
    return out


def _num_heads(model: nn.Module) -> tuple[int, int]:
    mods = [m for _, m in attention_modules(model)]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no qkv AttentionModule")
    heads = {int(getattr(m, "num_heads", 0)) for m in mods}
    if len(heads) != 1 or 0 in heads:
        raise ValueError("head masking needs attention modules with one num_heads attribute, got " + str(heads))
    return len(mods), heads.pop()


def head_importance(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    normalize: bool = True,
) -> Tensor:
    """Head importance (Michel et al. 2019): ``I_h = E_x |∂L(x) / ∂ξ_h|`` where ``ξ_h`` multiplies head
    ``h``'s output (all ``ξ = 1``), for every head of every :class:`qkv.nn.AttentionModule` of ``model``.

    Args:
        model: a qkv model whose attention modules have a ``num_heads`` attribute.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        batches: the data (each item is handed to ``loss_fn``).
        normalize: divide each layer's scores by their L2 norm (the paper's normalisation).

    Returns:
        ``(layers, H)`` float64. The model's own ``.grad`` fields are not touched."""
    n, H = _num_heads(model)
    xi = torch.ones(n, H, requires_grad=True)
    total = torch.zeros(n, H, dtype=torch.float64)
    count = 0
    with scale_heads(model, xi):
        for batch in batches:
            loss = loss_fn(model, batch)
            (g,) = torch.autograd.grad(loss, xi)
            total += g.detach().abs().double()
            count += 1
    if count == 0:
        raise ValueError("batches is empty")
    imp = total / count
    if normalize:
        imp = imp / imp.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return imp


@torch.no_grad()
def head_ablation(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> Tensor:
    """Loss increase when each head alone is masked out (its output set to 0): ``(layers, H)`` float64,
    ``L(ξ_h = 0) - L(ξ = 1)``."""
    n, H = _num_heads(model)
    xi = torch.ones(n, H)
    with scale_heads(model, xi):
        base = float(loss_fn(model, batch))
        out = torch.zeros(n, H, dtype=torch.float64)
        for i in range(n):
            for h in range(H):
                xi[i, h] = 0.0
                out[i, h] = float(loss_fn(model, batch)) - base
                xi[i, h] = 1.0
    return out


def sink_scores(maps: AttentionMaps | Sequence[Tensor] | Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean attention each head pays to the first token, ``(layers, H)`` float64: Gu et al.'s
    ``alpha_1^{l,h}``, the weight ``A[i, 0]`` averaged over the batch rows and the valid queries ``i``
    (every query may see the first token, causal or not). ``valid`` defaults to ``maps.attention_mask``."""
    if valid is None:
        valid = getattr(maps, "attention_mask", None)
    layers = _as_layers(maps)
    rows = [mass_on(w, [0], valid) for w in layers]
    if len({r.shape[0] for r in rows}) != 1:
        raise ValueError(f"sink_scores: every layer must have the same heads, got {[r.shape[0] for r in rows]}")
    return torch.stack(rows)


def sink_rate(
    maps: AttentionMaps | Sequence[Tensor] | Tensor, threshold: float = 0.3, valid: Tensor | None = None
) -> float:
    """The attention-sink rate of Gu et al. (ICLR 2025, "When Attention Sink Emerges in Language Models"):
    the fraction of (layer, head) pairs whose mean attention to the first token exceeds ``threshold``
    (their epsilon, 0.3): ``(1 / L H) sum_{l,h} 1[alpha_1^{l,h} > threshold]`` with ``alpha`` from
    :func:`sink_scores`.

    Args:
        maps: :class:`AttentionMaps`, a list of layers ``(B, H, Lq, Lk)`` or a stacked
            ``(layers, B, H, Lq, Lk)`` tensor.
        threshold: in ``[0, 1)``; a head counts when its mean weight on the first token is strictly above.
        valid: ``(B, Lq)`` real queries (default ``maps.attention_mask``).

    Returns:
        A float in ``[0, 1]``."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"sink_rate: threshold must be in [0, 1), got {threshold}")
    a = sink_scores(maps, valid)
    return float((a > threshold).double().mean())


TABLE_COLUMNS = ("entropy", "distance", "cls", "sep", "punct", "self", "prev", "next")
"""The measures of :func:`head_table`, besides ``layer``, ``head`` and ``name``."""


def head_table(
    maps: AttentionMaps | Sequence[Tensor],
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    valid: Tensor | None = None,
) -> list[dict[str, Any]]:
    """One row of measures per head, for the viewer, the CSV and the strongest-head summary.

    Args:
        maps: :class:`AttentionMaps` or a list of self-attention layers ``(B, H, L, L)``.
        tokens: the tokens of the one row, or of each batch row (default: ``maps.tokens``); without tokens
            the ``cls``, ``sep`` and ``punct`` columns are NaN.
        valid: ``(B, L)`` real tokens (default: ``maps.attention_mask``).

    Returns:
        A list of dicts, layer-major: ``layer``, ``head`` (both from 0), ``name`` (``"L{layer}H{head}"``),
        ``entropy`` (nats), ``distance`` (tokens), and the mean attention mass on ``cls`` (``[CLS]``/``<s>``),
        ``sep`` (``[SEP]``/``</s>``), ``punct`` (punctuation), ``self``, ``prev`` and ``next`` tokens.
    """
    if tokens is None:
        tokens = getattr(maps, "tokens", None)
    if valid is None:
        valid = getattr(maps, "attention_mask", None)
    layers = _as_layers(maps)
    cls = sep = punct = None
    if tokens is not None:
        cls = special_positions(tokens, ("[CLS]", "<s>"))
        sep = special_positions(tokens, ("[SEP]", "</s>"))
        punct = punctuation_positions(tokens)
    rows = []
    for l, w in enumerate(layers):
        H = w.shape[1]
        nan = torch.full((H,), float("nan"), dtype=torch.float64)
        cols = {
            "entropy": head_entropy(w, valid),
            "distance": mean_distance(w, valid),
            "cls": mass_on(w, cls, valid) if cls is not None else nan,
            "sep": mass_on(w, sep, valid) if sep is not None else nan,
            "punct": mass_on(w, punct, valid) if punct is not None else nan,
            "self": offset_mass(w, 0, valid),
            "prev": offset_mass(w, -1, valid),
            "next": offset_mass(w, 1, valid),
        }
        for h in range(H):
            rows.append({"layer": l, "head": h, "name": f"L{l}H{h}", **{k: float(v[h]) for k, v in cols.items()}})
    return rows


def best_head_per_column(
    table: Sequence[dict[str, Any]], columns: Sequence[str] = ("cls", "sep", "punct", "self", "prev", "next", "entropy")
) -> dict[str, dict[str, Any]]:
    """The head with the largest value in each column of a :func:`head_table` (NaN values skipped).

    Args:
        table: the rows of :func:`head_table` (one dict per head).
        columns: the columns to look at.

    Returns:
        ``{column: row}``, the whole row of the best head for each column that has a value (a column that
        is NaN for every head, such as ``sep`` without tokens, is left out)."""
    best: dict[str, dict[str, Any]] = {}
    for c in columns:
        rows = [r for r in table if isinstance(r.get(c), float) and not math.isnan(r[c])]
        if rows:
            best[c] = max(rows, key=lambda r: r[c])
    return best

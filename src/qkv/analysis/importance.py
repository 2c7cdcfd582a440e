"""Token importance: how much each input token matters to an output, by attention, by gradients and by erasure.

Every function returns one importance per key (input) token, ``(B, L)`` float64, so that two methods can be
compared (:mod:`qkv.analysis.agreement`).

By attention (read from :func:`qkv.analysis.capture`'s maps):

- :func:`attention_importance`: one layer's weights averaged over heads (``method="mean"``), attention
  rollout or attention flow (Abnar and Zuidema 2020), for one query row or averaged over the queries;
- :func:`value_norm_importance`: Kobayashi et al. (2020), ``|| sum_h a^h_ij f^h(x_j) ||`` with
  ``f^h(x) = (x W_V^h + b_V^h) W_O^h``: the weight times the norm of what the token actually sends. Needs a
  qkv model (values and ``out_proj`` through the ``hook_weights``/``hook_v`` points).

By gradients, of a scalar per batch row ``run() -> (B,)`` with respect to the output ``(B, L, d)`` of an
embedding module (``model.src_emb``, ``model.get_input_embeddings()``, ...); works on any model:

- :func:`grad_x_input`: ``sum_d x_id * dy/dx_id``;
- :func:`integrated_gradients` (Sundararajan et al. 2017): ``sum_d (x - x')_id * mean_alpha dy/dx_id`` at
  ``x' + alpha (x - x')``, midpoint rule; the importances sum to ``y(x) - y(x')`` (completeness).

By erasure (leave one out, as in Jain and Wallace 2019): :func:`erasure` with any way of erasing token ``i``
(dropping it from the input, masking it), or :func:`leave_one_out`, which replaces the token's embedding by
a baseline (zeros) through a hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.base import AttentionModule
from .measures import _as_layers, attention_flow, attention_rollout

if TYPE_CHECKING:
    from .capture import AttentionMaps

__all__ = [
    "AttentionMethod",
    "attention_importance",
    "cosine_change",
    "erasure",
    "grad_x_input",
    "integrated_gradients",
    "leave_one_out",
    "norm_weighted",
    "replaced_embedding",
    "value_norm_importance",
]

AttentionMethod = Literal["mean", "rollout", "flow"]
"""How :func:`attention_importance` reads attention: one layer's mean over heads, rollout or flow."""


def _rows(a: Tensor, query: int | Sequence[int] | Tensor | None, valid: Tensor | None) -> Tensor:
    """``a (B, Lq, Lk)`` -> ``(B, Lk)``: row ``query``, the mean of the rows ``query``, or of the valid rows."""
    B, Lq, Lk = a.shape
    if isinstance(query, int):
        if not -Lq <= query < Lq:
            raise ValueError(f"query must be a row index in [-{Lq}, {Lq}), got {query}")
        return a[:, query]
    if query is not None:
        idx = torch.as_tensor(query, dtype=torch.long)
        if idx.dim() != 1 or idx.numel() == 0 or int(idx.min()) < -Lq or int(idx.max()) >= Lq:
            raise ValueError(f"query must be row indices in [-{Lq}, {Lq}), got {idx.tolist()}")
        return a[:, idx].mean(1)
    if valid is None:
        return a.mean(1)
    v = valid.bool().cpu()
    v = v.expand(B, -1) if v.dim() == 1 else v
    if tuple(v.shape) != (B, Lq):
        raise ValueError(f"valid must be (B, Lq) = {(B, Lq)}, got {tuple(valid.shape)}")
    m = v.to(a.dtype).unsqueeze(-1)
    return (a * m).sum(1) / m.sum(1).clamp(min=1.0)


def attention_importance(
    maps: AttentionMaps | Sequence[Tensor],
    method: AttentionMethod = "mean",
    *,
    layer: int = -1,
    query: int | Sequence[int] | Tensor | None = None,
    residual: float | bool = 0.5,
    valid: Tensor | None = None,
) -> Tensor:
    """Importance of each key token by attention.

    Args:
        maps: :class:`qkv.analysis.AttentionMaps` or a list of layers ``(B, H, Lq, Lk)``.
        method: ``"mean"``: layer ``layer``'s weights averaged over heads (any ``Lq``, ``Lk``: cross-attention
            too); ``"rollout"``/``"flow"``: attention rollout / flow through all the layers (self-attention
            layers of one length; ``flow`` solves ``L²`` max-flow problems per row, for short inputs).
        layer: which layer for ``"mean"`` (default the last).
        query: the query row to explain (an int, e.g. 0 for ``[CLS]``, -1 for the last token), several rows
            (their mean), or None: the mean over the valid query rows (a mean-pooled output).
        residual: the identity's weight for rollout and flow (see :func:`qkv.analysis.attention_rollout`).
        valid: ``(B, Lq)`` real queries for ``query=None`` (default ``maps.attention_mask``).

    Returns:
        ``(B, Lk)`` float64; each row sums to 1 (to the query rows' mass).
    """
    if valid is None:
        valid = getattr(maps, "attention_mask", None)
    layers = _as_layers(maps)
    if method == "mean":
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"layer must be in [-{len(layers)}, {len(layers)}), got {layer}")
        a = layers[layer].mean(1)
    elif method == "rollout":
        a = attention_rollout(layers, residual)
    elif method == "flow":
        a = torch.stack([attention_flow(layers, b, residual) for b in range(layers[0].shape[0])])
    else:
        raise ValueError(f"method must be 'mean', 'rollout' or 'flow', got {method!r}")
    return _rows(a, query, valid)


def norm_weighted(weights: Tensor, values: Tensor, out_weight: Tensor | None = None) -> Tensor:
    """Kobayashi et al. (2020): ``|| sum_h a^h_ij f^h(x_j) ||``, the norm of what key ``j`` adds to query ``i``.

    Args:
        weights: ``(B, H, Lq, Lk)`` attention weights.
        values: ``(B, H, Lk, Dv)`` each head's values ``x W_V^h + b_V^h`` (grouped-query values repeated to
            ``H`` heads), or ``(B, Hkv, Lk, Dv)`` with ``H % Hkv == 0``.
        out_weight: the output projection's weight ``(D, H * Dv)`` (``W_O``, heads concatenated); None
            takes ``W_O = I`` (the norm of ``sum_h a^h_ij v^h_j`` concatenated over heads).

    Returns:
        ``(B, Lq, Lk)`` float64.
    """
    if weights.dim() != 4 or values.dim() != 4:
        raise ValueError(
            f"weights must be (B, H, Lq, Lk) and values (B, Hkv, Lk, Dv), got {tuple(weights.shape)}, {tuple(values.shape)}"
        )
    B, H, Lq, Lk = weights.shape
    if values.shape[0] != B or values.shape[2] != Lk or H % values.shape[1]:
        raise ValueError(f"values {tuple(values.shape)} do not fit weights {tuple(weights.shape)} (B, Hkv | H, Lk, Dv)")
    v = values.double().repeat_interleave(H // values.shape[1], dim=1)
    Dv = v.shape[-1]
    w = weights.double()
    if out_weight is None:  # heads concatenated: ||c_ij||² = sum_h (a^h_ij)² ||v^h_j||²
        return torch.einsum("bhij,bhj->bij", w**2, (v**2).sum(-1)).sqrt()
    if out_weight.dim() != 2 or out_weight.shape[1] != H * Dv:
        raise ValueError(f"out_weight must be (D, H * Dv = {H * Dv}), got {tuple(out_weight.shape)}")
    f = torch.einsum("bhjv,dhv->bhjd", v, out_weight.double().view(-1, H, Dv))  # f^h(x_j) = v^h_j W_O^h
    return torch.einsum("bhij,bhjd->bijd", w, f).norm(dim=-1)  # the heads' contributions add up after W_O


def value_norm_importance(
    model: nn.Module,
    *args: Any,
    layer: int = -1,
    query: int | Sequence[int] | Tensor | None = None,
    valid: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Kobayashi et al. (2020)'s norm-based importance of each key token at one attention layer of a qkv model.

    Runs ``model(*args, **kwargs)`` once under ``no_grad``, reading each :class:`qkv.nn.AttentionModule`'s
    weights (``hook_weights``) and values (``hook_v``), and its ``out_proj`` weight when it has one.

    Args:
        model: a model with qkv attention modules.
        layer: which attention module, in forward order (default the last one called).
        query, valid: as in :func:`attention_importance`.

    Returns:
        ``(B, Lk)`` float64, :func:`norm_weighted` for the query row(s), each row normalised to sum to 1.

    Raises:
        ValueError: the model has no qkv attention module, or ``layer`` is out of range.
    """
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]
    if not mods:
        raise ValueError(f"value_norm_importance: {type(model).__name__} has no qkv AttentionModule")
    calls: list[dict[str, Any]] = []
    handles = []

    def on_v(mod: AttentionModule) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(_: nn.Module, __: Any, v: Tensor) -> None:
            calls.append({"module": mod, "values": v.detach()})

        return hook

    def on_w(_: nn.Module, __: Any, w: Tensor) -> None:
        calls[-1]["weights"] = w.detach()

    for _, m in mods:
        handles.append(m.hook_v.register_forward_hook(on_v(m)))
        handles.append(m.hook_weights.register_forward_hook(on_w))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    calls = [c for c in calls if "weights" in c]
    if not -len(calls) <= layer < len(calls):
        raise ValueError(f"layer must be in [-{len(calls)}, {len(calls)}) (attention calls of the pass), got {layer}")
    c = calls[layer]
    proj = getattr(c["module"], "out_proj", None)
    wo = proj.weight.detach() if isinstance(proj, nn.Linear) else None
    if wo is not None and wo.shape[1] != c["weights"].shape[1] * c["values"].shape[-1]:
        wo = None
    a = _rows(norm_weighted(c["weights"].cpu(), c["values"].cpu(), None if wo is None else wo.cpu()), query, valid)
    return a / a.sum(-1, keepdim=True).clamp(min=1e-300)


@contextmanager
def replaced_embedding(embedding: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While inside, ``embedding``'s output ``x (B, L, d)`` is replaced by ``fn(x)`` (a forward hook)."""
    if not isinstance(embedding, nn.Module):
        raise TypeError(f"embedding must be an nn.Module (the model's token embedding), got {type(embedding).__name__}")

    def hook(_: nn.Module, __: Any, out: Tensor) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 3:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the embedding module must return (B, L, d), got {got}")
        return fn(out)

    h = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _scalar(y: Any) -> Tensor:
    if not isinstance(y, Tensor) or y.dim() != 1:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"run() must return one scalar per batch row, (B,), got {got}")
    return y


def _grad_at(
    run: Callable[[], Tensor], embedding: nn.Module, make: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """The embedding output ``x`` of one pass and ``d sum(run()) / d make(x)``."""
    seen: dict[str, Tensor] = {}

    def fn(x: Tensor) -> Tensor:
        seen["x"] = x.detach()
        z = make(x.detach()).requires_grad_(True)
        seen["z"] = z
        return z

    with torch.enable_grad(), replaced_embedding(embedding, fn):
        y = _scalar(run())
        if "z" not in seen:
            raise ValueError("run() did not call the embedding module")
        (g,) = torch.autograd.grad(y.sum(), seen["z"], allow_unused=True)
    if g is None:
        g = torch.zeros_like(seen["z"])
    return seen["x"], g


def grad_x_input(run: Callable[[], Tensor], embedding: nn.Module) -> Tensor:
    """Gradient × input: ``sum_d x_id * d run()_b / d x_id`` for each token ``i`` of each batch row ``b``.

    Args:
        run: runs the model on fixed inputs and returns the explained scalar of each batch row ``(B,)`` (a
            log-probability, a logit, a similarity); it must call ``embedding`` once.
        embedding: the module whose output ``(B, L, d)`` holds the token embeddings.

    Returns:
        ``(B, L)`` float64, signed (take ``abs()`` to rank by magnitude).
    """
    x, g = _grad_at(run, embedding, lambda x: x)
    return (x.double() * g.double()).sum(-1)


def integrated_gradients(
    run: Callable[[], Tensor], embedding: nn.Module, steps: int = 32, baseline: Tensor | None = None
) -> Tensor:
    """Integrated gradients (Sundararajan et al. 2017) along the straight line from ``baseline`` to the input
    embeddings, midpoint rule with ``steps`` points: ``IG_i = sum_d (x - x')_id * mean_k g_id(x' + a_k (x - x'))``.

    Args:
        run, embedding: as in :func:`grad_x_input`.
        steps: points on the path (the error of completeness falls as ``1 / steps²``).
        baseline: ``x'``, broadcastable to ``(B, L, d)``; zeros by default.

    Returns:
        ``(B, L)`` float64, signed; ``sum_i IG_i ~= run(x) - run(x')``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    total: Tensor | None = None
    x: Tensor | None = None
    for k in range(steps):
        a = (k + 0.5) / steps

        def make(e: Tensor, a: float = a) -> Tensor:
            base = torch.zeros_like(e) if baseline is None else baseline.to(e)
            return base + a * (e - base)

        x, g = _grad_at(run, embedding, make)
        total = g.double() if total is None else total + g.double()
    assert x is not None and total is not None
    base = torch.zeros_like(x) if baseline is None else baseline.to(x)
    return ((x - base).double() * total / steps).sum(-1)


def _default_measure(full: Tensor, erased: Tensor) -> Tensor:
    return (full.double() - erased.double()).abs().reshape(full.shape[0], -1).sum(-1)


def cosine_change(full: Tensor, erased: Tensor) -> Tensor:
    """``1 - cos(full_b, erased_b)`` per batch row of two ``(B, ...)`` outputs (e.g. sentence embeddings): ``(B,)``."""
    return 1.0 - F.cosine_similarity(
        full.double().reshape(full.shape[0], -1), erased.double().reshape(full.shape[0], -1)
    )


def erasure(
    output: Callable[[int | None], Tensor],
    length: int,
    measure: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Leave-one-out importance: how much the output changes when token ``i`` is erased.

    Args:
        output: ``output(None)`` is the output ``(B, ...)`` on the full input; ``output(i)`` the output with
            token ``i`` erased, however the caller erases it (dropping it, masking it, replacing it).
        length: the number of tokens ``L``.
        measure: ``measure(full, erased) -> (B,)``; default the summed absolute difference (for a scalar
            output ``|y - y_(-i)|``); :func:`cosine_change` for embeddings.

    Returns:
        ``(B, L)`` float64.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    meas = measure or _default_measure
    with torch.no_grad():
        full = output(None)
        cols = [meas(full, output(i)).double() for i in range(length)]
    return torch.stack(cols, dim=1)


def leave_one_out(
    run: Callable[[], Tensor],
    embedding: nn.Module,
    *,
    measure: Callable[[Tensor, Tensor], Tensor] | None = None,
    baseline: Tensor | None = None,
) -> Tensor:
    """:func:`erasure` by replacing token ``i``'s embedding with ``baseline`` (zeros by default) through a hook
    on ``embedding``; ``run()`` returns the output ``(B, ...)`` (the length is read from the first pass).

    Returns:
        ``(B, L)`` float64.
    """
    seen: list[int] = []

    def note(x: Tensor) -> Tensor:
        seen.append(x.shape[1])
        return x

    with torch.no_grad(), replaced_embedding(embedding, note):
        full = run()
    if not seen:
        raise ValueError("run() did not call the embedding module")

    def erased(i: int | None) -> Tensor:
        if i is None:
            return full

        def fn(x: Tensor) -> Tensor:
            x = x.clone()
            x[:, i] = 0.0 if baseline is None else baseline.to(x)
            return x

        with replaced_embedding(embedding, fn):
            return run()

    return erasure(erased, seen[0], measure)

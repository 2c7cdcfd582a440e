"""``qkv.attention``: validate once, pick a backend, dispatch. ``qkv.explain`` says which and why."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, overload

import torch
from torch import Tensor

from .backends import Request
from .backends.base import assume_traced
from .backends.policy import choose, resolve
from .backends.registry import lookup
from .masks import Mask, MaskLike, as_mask
from .scores import ScoreMod, ScoreModFn, as_score_mod

__all__ = ["Explanation", "attention", "explain"]


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | None = ...,
    score_mod: ScoreMod | ScoreModFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    sinks: Tensor | None = ...,
    backend: str = ...,
    return_weights: Literal[False] = ...,
    **options: Any,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | None = ...,
    score_mod: ScoreMod | ScoreModFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    sinks: Tensor | None = ...,
    backend: str = ...,
    return_weights: Literal[True],
    **options: Any,
) -> tuple[Tensor, Tensor]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    sinks: Tensor | None = None,
    backend: str = "auto",
    return_weights: bool = False,
    **options: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention, ``softmax(q kᵀ · scale + score_mod, masked) v``.

    Args:
        q: queries ``(B, H, Lq, D)``. Leading dims may be dropped: ``(H, Lq, D)`` or ``(Lq, D)``,
            the same for ``k`` and ``v``.
        k: keys ``(B, Hkv, Lk, D)``. ``H % Hkv == 0``: ``Hkv < H`` is grouped-query attention
            (query head ``h`` uses key head ``h // (H // Hkv)``), ``Hkv == 1`` multi-query.
        v: values ``(B, Hkv, Lk, Dv)``; ``Dv`` may differ from ``D``.
        mask: which pairs may meet: a :class:`qkv.masks.Mask` (``causal()``,
            ``sliding_window(256)``, ``document(ids) & causal()``, ...), a bool tensor
            broadcastable to ``(B, H, Lq, Lk)`` (True = may attend), or a FlexAttention
            ``mask_mod(b, h, q_idx, kv_idx)``. When ``Lq != Lk`` positional masks are aligned
            bottom-right: query ``i`` stands at key position ``i + Lk - Lq``, so ``causal()`` lets it
            see keys ``j <= i + Lk - Lq`` (decoding with a KV cache).
        score_mod: changes scores before the softmax: a :class:`qkv.scores.ScoreMod`
            (``alibi(H)``, ``softcap(30)``, ``bias(t)``, ...) or a FlexAttention
            ``score_mod(score, b, h, q_idx, kv_idx)``.
        scale: multiplies ``q kᵀ``; defaults to ``1 / sqrt(D)``.
        dropout_p: dropout on the attention weights, in ``[0, 1)``; applied whenever it is > 0
            (pass 0 at evaluation time, as with ``F.scaled_dot_product_attention``).
        sinks: attention sinks as gpt-oss learns them: ``(H,)``, one logit ``s_h`` per query head
            that joins the softmax denominator, ``softmax([q kᵀ · scale, s_h])`` with the sink's
            column dropped, so a row's weights sum to less than 1 and a head can attend to "nothing".
            Gradients flow into it. A row that may attend to no key puts all its weight on the sink:
            its output is 0. ``s_h = -inf`` is no sink for head ``h``. Served by ``reference``,
            ``sdpa`` and ``tiled``; other backends decline it. Same device as ``q``; dtype that of
            ``q`` or float32.
        backend: ``"auto"`` (the fastest backend that supports the request; see
            :func:`explain`) or one of ``qkv.BACKENDS``.
        return_weights: also return the attention weights ``(B, H, Lq, Lk)``.
        **options: backend-specific options (each backend documents its own).

    Returns:
        ``out (B, H, Lq, Dv)`` in the dtype of ``q``, and with ``return_weights`` the weights
        ``(B, H, Lq, Lk)`` (over the keys: with ``sinks`` a row sums to less than 1). A query that
        may attend to nothing gets zeros (and zero gradient), never NaN. Half and bfloat16 inputs accumulate in float32.

    Raises:
        TypeError: inputs that are not floating-point tensors of one dtype, a mask or score mod of
            the wrong kind.
        ValueError: shapes that do not fit together (each message names the argument and the
            shapes it got), an unknown backend, ``dropout_p`` outside ``[0, 1)``.
        NotImplementedError: a named backend that cannot serve this request (the message says why
            and which backend can).

    Example:
        With equal scores every query spreads its weight evenly over the keys the mask lets it see:

        >>> import torch, qkv
        >>> from qkv import masks
        >>> q = torch.zeros(2, 8, 16, 32)                   # (B, H, Lq, D)
        >>> k = v = torch.randn(2, 2, 16, 32)               # 2 key/value heads: grouped-query attention
        >>> out, w = qkv.attention(q, k, v, mask=masks.causal(), return_weights=True)
        >>> out.shape, w.shape
        (torch.Size([2, 8, 16, 32]), torch.Size([2, 8, 16, 16]))
        >>> w[0, 0, :3, :3]
        tensor([[1.0000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000],
                [0.3333, 0.3333, 0.3333]])
        >>> torch.allclose(out[0, 0, 2], v[0, 0, :3].mean(0))
        True

        A query that may see no key returns zeros, not NaN:

        >>> qkv.attention(q, k, v, mask=masks.padding(0)).abs().max()
        tensor(0.)
    """
    req, squeeze = _validate(
        q, k, v, mask, score_mod, scale, dropout_p, return_weights, options, sinks, _whole(backend)
    )
    impl, plan = resolve(req, backend)
    result = _edge_case(req) if req.Lq == 0 or req.Lk == 0 else impl.run(req, plan)
    if squeeze:
        if isinstance(result, tuple):
            return _unsqueeze_back(result[0], squeeze), _unsqueeze_back(result[1], squeeze)
        return _unsqueeze_back(result, squeeze)
    return result


def _unsqueeze_back(t: Tensor, n: int) -> Tensor:
    for _ in range(n):
        t = t.squeeze(0)
    return t


def _edge_case(req: Request) -> Tensor | tuple[Tensor, Tensor]:
    """``Lq == 0``: an empty output. ``Lk == 0``: nothing to attend to, so zeros."""
    out = req.q.new_zeros(req.B, req.H, req.Lq, req.Dv)
    if req.requires_grad:  # keep the graph connected so backward() works and gives zero gradients
        out = out + 0.0 * (req.q.sum() + req.k.sum() + req.v.sum())
        if req.sinks is not None:  # no key: every row's weight is on its sink, whose value is 0
            out = out + 0.0 * torch.nan_to_num(req.sinks, neginf=0.0).sum()
    if req.return_weights:
        return out, req.q.new_zeros(req.B, req.H, req.Lq, req.Lk)
    return out


@dataclass
class Explanation:
    """What ``backend="auto"`` would do with a request, and why."""

    backend: str
    reason: str
    declined: dict[str, str] = field(default_factory=dict)
    """Backends that cannot (or may not) serve the request, with their reasons."""
    costs: dict[str, float] = field(default_factory=dict)
    """Every candidate's estimated seconds (the cheapest is picked)."""
    mask: str = ""
    """The mask the request carried, in words (its structure, or the name of a fallback and its reason;
    a mask that allows every pair of the problem, say ``causal()`` for one query, is said to be dropped)."""
    uncached: str = ""
    """Why the mask's plans (tile classes, block masks) cannot be cached, so are built again on every
    call; empty when they are cached (or nothing is planned)."""

    def __str__(self) -> str:
        lines = [f"auto -> {self.backend}: {self.reason}"]
        if self.mask:
            lines.append(f"  mask: {self.mask}")
        if self.uncached:
            lines.append(f"  plan: built again on every call, not cached: {self.uncached}")
        lines += [
            f"  {name}: ~{c * 1e3:.3g} ms estimated" for name, c in sorted(self.costs.items(), key=lambda x: x[1])
        ]
        lines += [f"  not {name}: {why}" for name, why in self.declined.items()]
        return "\n".join(lines)


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    sinks: Tensor | None = None,
    return_weights: bool = False,
    compiled: bool = False,
    **options: Any,
) -> Explanation:
    """Which backend ``qkv.attention(q, k, v, ...)`` with ``backend="auto"`` would use, and why.

    Takes the same arguments as :func:`attention` (inputs are validated the same way) and
    computes nothing. Every backend that could serve the request gives its estimated cost (the
    cheapest is picked); every other backend gives its reason. ``str()`` of the result reads as a
    sentence followed by one line per backend.

    ``compiled=True`` says what ``auto`` does with this request inside ``torch.compile`` (or
    ``torch.export``): it picks among the backends that trace into the graph, from shapes and the mask's
    structure alone, once per graph (see :mod:`qkv.backends.policy`).

    Example:
        Nothing is computed, so empty tensors of the right shape do:

        >>> import torch, qkv
        >>> from qkv import masks
        >>> q = k = v = torch.empty(1, 8, 4096, 64)
        >>> window = masks.causal() & masks.sliding_window(256)
        >>> qkv.explain(q, k, v, mask=window).backend
        'tiled'
        >>> print(qkv.explain(q, k, v, mask=window))  # doctest: +ELLIPSIS
        auto -> tiled: mask (causal & sliding_window(256, 0)) leaves ...% of ... tiles non-empty; ...
          mask: (causal & sliding_window(256, 0))
          tiled: ~... ms estimated
        ...
          not linear: only when asked for by name (backend=...)
        ...
    """
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {type(compiled).__name__}")
    req, _ = _validate(q, k, v, mask, score_mod, scale, dropout_p, return_weights, options, sinks, True)
    with assume_traced(compiled):
        c = choose(req)
    # inside a compiled graph plans are made in the graph on every call anyway: nothing to say there
    uncached = "" if compiled or req.mask is None else req.mask.cache_blocker() or ""
    if req.mask is not None:
        shown = repr(req.mask)
    elif isinstance(mask, Mask):  # dropped by _validate: it allows every pair of this problem
        shown = f"{mask!r}, which allows every pair here (Lq={req.Lq}, Lk={req.Lk}): computed without a mask"
    else:
        shown = ""
    return Explanation(c.backend, c.reason, c.declined, c.costs, shown, uncached)


def _validate(
    q: Any,
    k: Any,
    v: Any,
    mask: Any,
    score_mod: Any,
    scale: Any,
    dropout_p: Any,
    return_weights: Any,
    options: dict[str, Any],
    sinks: Any = None,
    whole: bool = False,
) -> tuple[Request, int]:
    """Check every argument once; return the 4-D request and how many leading dims were added.

    ``whole``: the request is the whole problem of the backend that computes it (see :func:`_whole`), so
    a mask that allows every pair of it (:meth:`qkv.masks.Mask.allows_all`) is dropped, after its checks
    (off by default: the test oracle applies every mask as given).
    Every check runs on every call; messages are written only on error."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = q.dtype
    if not (dtype.is_floating_point and k.dtype == dtype and v.dtype == dtype):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    device = q.device
    if not (k.device == device and v.device == device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    qs, ks, vs = q.shape, k.shape, v.shape
    dims = len(qs)
    if not (len(ks) == dims and len(vs) == dims):
        raise ValueError(f"q, k and v must have the same number of dims (B, H, L, D), got {_shapes(q, k, v)}")
    given = (q, k, v)  # the messages below show the shapes as given
    squeeze = 4 - dims
    if squeeze:
        if not 0 < squeeze <= 2:
            raise ValueError(f"q, k and v must be (B, H, L, D), (H, L, D) or (L, D), got {_shapes(q, k, v)}")
        for _ in range(squeeze):
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        qs, ks, vs = q.shape, k.shape, v.shape
    (Bq, H, Lq, D), (Bk, Hkv, Lk, Dk), (Bv, Hv, Lv, Dv) = qs, ks, vs
    if not (Bq == Bk == Bv and D == Dk and Lk == Lv and Hkv == Hv and Hkv != 0 and H % Hkv == 0 and D != 0):
        _shape_error(Bq, H, D, Bk, Hkv, Lk, Dk, Bv, Hv, Lv, given)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be a bool, got {type(return_weights).__name__}")
    if sinks is not None:
        _check_sinks(sinks, q)
    m = mask if mask is None or isinstance(mask, Mask) else as_mask(mask)
    sm = as_score_mod(score_mod) if score_mod is not None else None
    req = Request._sized(
        q, k, v, m, sm, float(scale), float(dropout_p), return_weights, dict(options), sinks, Bq, H, Hkv, Lq, Lk, D, Dv
    )
    if m is not None:
        m.check(req.shape)
    if sm is not None:
        sm.check(req.shape)
    if whole and m is not None and m.allows_all(req.shape):
        # the same problem with no mask (every backend's fastest path); the request is new and ours:
        # set before anyone has seen it, as its constructor would
        req.__dict__["mask"] = None
    return req, squeeze


def _shape_error(
    Bq: int, H: int, D: int, Bk: int, Hkv: int, Lk: int, Dk: int, Bv: int, Hv: int, Lv: int, given: tuple[Tensor, ...]
) -> NoReturn:
    """Raise the ``ValueError`` that names the first of the shape rules the inputs break."""
    q, k, v = given
    if not (Bq == Bk == Bv):
        raise ValueError(f"q, k and v must have the same batch size B (dim 0), got {_shapes(q, k, v)}")
    if D != Dk:
        raise ValueError(f"q and k must have the same head dim D (last dim), got {_shapes(q, k, v)}")
    if Lk != Lv:
        raise ValueError(f"k and v must have the same length Lk (dim -2), got {_shapes(q, k, v)}")
    if Hkv != Hv:
        raise ValueError(f"k and v must have the same number of heads Hkv (dim 1), got {_shapes(q, k, v)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"the query heads H={H} must be a multiple of the key/value heads Hkv={Hkv}"
            f" (grouped-query attention), got {_shapes(q, k, v)}"
        )
    raise ValueError(f"the head dim D must be > 0, got {_shapes(q, k, v)}")


def _whole(backend: Any) -> bool:
    """Whether the request is the whole problem, computed exactly, for ``backend``: under ``"auto"``
    (which picks only backends that compute the request as given) and for a named backend that is
    ``exact`` and whose inputs are not one rank's shards (``local_shards``). Then a mask that allows
    every pair of the request's shapes may be dropped; an approximation named keeps its mask as given
    (its answer is its own), a ring's shards are not the problem. An unknown name: ``False`` (it is
    refused by name later)."""
    if backend == "auto":
        return True
    b = lookup(backend) if isinstance(backend, str) else None
    return b is not None and b.exact and not b.local_shards


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def _check_sinks(sinks: Any, q: Tensor) -> None:
    """``sinks`` must be a floating-point ``(H,)`` tensor on ``q``'s device, in ``q``'s dtype or float32."""
    if not isinstance(sinks, Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape (H,), got {type(sinks).__name__}")
    if sinks.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"sinks must have the dtype of q ({q.dtype}) or float32, got {sinks.dtype}")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(
            f"sinks must be (H,) = ({q.shape[1]},), one logit per query head, got shape {tuple(sinks.shape)}"
            f" for q {tuple(q.shape)}"
        )
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on the device of q ({q.device}), got {sinks.device}")

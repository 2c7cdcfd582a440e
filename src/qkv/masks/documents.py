"""Packed sequences: :func:`document` (a document id per position) and :func:`from_cu_seqlens`
(flash-attn's varlen offsets).

These masks hold per-position data, and classify their tiles from it: :class:`_Document` reduces its
ids to a min and a max per block (:meth:`~qkv.masks.Mask.tile_bounds`), which is exact for the packed
layout (sorted ids) and conservative otherwise, and reads no tensor value, so it traces.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from .base import Mask, Shape, _as_index_tensor, _tied_to_layout, tensor_key


def _ids_2d(ids: Tensor) -> Tensor:
    return ids if ids.dim() == 2 else ids.view(1, -1)


class _Document(Mask):
    """Packed sequences: query ``i`` sees key ``j`` iff ``q_ids[b, i] == kv_ids[b, j]``."""

    def __init__(self, q_ids: Tensor, kv_ids: Tensor):
        self.q_ids, self.kv_ids = q_ids, kv_ids
        self.name = "document"

    def check(self, s: Shape) -> None:
        for what, ids, L, n in (("q_ids", self.q_ids, s.Lq, "Lq"), ("kv_ids", self.kv_ids, s.Lk, "Lk")):
            if ids.dim() not in (1, 2):
                raise ValueError(f"document: {what} must be (L,) or (B, L), got shape {tuple(ids.shape)}")
            if ids.shape[-1] != L:
                raise ValueError(
                    f"document: {what} has length {ids.shape[-1]} but the sequence has {n}={L}"
                    f" (shape {tuple(ids.shape)})"
                )
            if ids.dim() == 2 and ids.shape[0] not in (1, s.B):
                raise ValueError(f"document: {what} has batch {ids.shape[0]} but B={s.B} (shape {tuple(ids.shape)})")

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        qi, ki = _ids_2d(self.q_ids.to(q.device)), _ids_2d(self.kv_ids.to(q.device))
        bq = b if qi.shape[0] > 1 else torch.zeros_like(b)
        bk = b if ki.shape[0] > 1 else torch.zeros_like(b)
        return qi[bq, q] == ki[bk, k]

    def tile_bounds(self, s: Shape, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        # the block sizes as numbers: no tensor value is read, so this traces into a compiled graph
        nq, nk = -(-s.Lq // block_q), -(-s.Lk // block_k)
        qmin, qmax = _block_minmax(_ids_2d(self.q_ids.to(s.device)), s.Lq, nq, block_q)
        kmin, kmax = _block_minmax(_ids_2d(self.kv_ids.to(s.device)), s.Lk, nk, block_k)
        # (Bi, nq, 1) against (Bi, 1, nk)
        qmin, qmax, kmin, kmax = qmin[:, :, None], qmax[:, :, None], kmin[:, None, :], kmax[:, None, :]
        any_ = (qmin <= kmax) & (kmin <= qmax)
        all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return any_[:, None], all_[:, None]

    def to(self, device: torch.device | str) -> Mask:
        self.q_ids, self.kv_ids = self.q_ids.to(device), self.kv_ids.to(device)
        return self

    def shard_blocker(self) -> str | None:
        return None

    def globalize(self, gather: Callable[[Tensor], Tensor]) -> Mask:
        """The ids are the local shard's: gather them into the whole sequence's."""
        qi = gather(self.q_ids)
        return _Document(qi, qi if self.kv_ids is self.q_ids else gather(self.kv_ids))

    def cache_key(self) -> Hashable | None:
        qk = tensor_key(self.q_ids)
        kk = qk if self.kv_ids is self.q_ids else tensor_key(self.kv_ids)  # self-attention: read once
        return None if qk is None or kk is None else ("document", qk, kk)


def _block_minmax(ids: Tensor, L: int, n: int, block: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of ``ids (Bi, L)`` over blocks of ``block``: two ``(Bi, n)`` tensors."""
    pad = n * block - L
    info = torch.iinfo(ids.dtype)  # padding that never wins a min or a max (read from no tensor value)
    lo = torch.cat((ids, ids.new_full((ids.shape[0], pad), info.max)), dim=1).view(ids.shape[0], n, block)
    hi = torch.cat((ids, ids.new_full((ids.shape[0], pad), info.min)), dim=1).view(ids.shape[0], n, block)
    return lo.amin(-1), hi.amax(-1)


def document(q_ids: Sequence[int] | Tensor, kv_ids: Sequence[int] | Tensor | None = None) -> Mask:
    """Packed sequences (document masking): query ``i`` sees key ``j`` only within one document.

    Args:
        q_ids: document id of every query, shape ``(Lq,)`` or ``(B, Lq)``.
        kv_ids: document id of every key, shape ``(Lk,)`` or ``(B, Lk)``; defaults to ``q_ids``
            (self-attention).

    Combine with :func:`causal` for packed causal language modelling. Tiles are classified from
    each tile's min and max id: exact for sorted ids (the packed layout), conservative otherwise.

    Example:
        >>> import torch
        >>> from qkv import masks
        >>> ids = torch.tensor([0, 0, 1, 1, 1])             # two documents packed in one row
        >>> (masks.document(ids) & masks.causal()).to_dense(Lq=5, Lk=5)[0, 0].int()
        tensor([[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
    """
    qi = _as_index_tensor(q_ids, "document: q_ids")
    ki = qi if kv_ids is None else _as_index_tensor(kv_ids, "document: kv_ids")
    if qi.dim() == 0 or ki.dim() == 0:
        raise ValueError("document: ids must be (L,) or (B, L) tensors, got a scalar")
    return _Document(qi, ki)


def from_cu_seqlens(
    cu_seqlens_q: Sequence[int] | Tensor, cu_seqlens_k: Sequence[int] | Tensor | None = None, causal: bool = False
) -> Mask:
    """flash-attn's varlen layout: sequences packed end to end, delimited by cumulative offsets
    ``cu_seqlens = [0, len_0, len_0 + len_1, ...]`` (shape ``(n_seqs + 1,)``).

    With ``causal=True`` each sequence is causal on its own, aligned bottom-right when its query
    and key lengths differ, exactly as ``flash_attn_varlen_func(..., causal=True)``.
    """
    cq = _as_index_tensor(cu_seqlens_q, "from_cu_seqlens: cu_seqlens_q")
    ck = cq if cu_seqlens_k is None else _as_index_tensor(cu_seqlens_k, "from_cu_seqlens: cu_seqlens_k")
    for what, c in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        if c.dim() != 1 or c.numel() < 2 or int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
            raise ValueError(
                f"from_cu_seqlens: {what} must be a non-decreasing 1-D tensor starting at 0, got {c.tolist()}"
            )
    if cq.numel() != ck.numel():
        raise ValueError(f"from_cu_seqlens: cu_seqlens_q has {cq.numel()} entries but cu_seqlens_k has {ck.numel()}")

    def ids(c: Tensor) -> Tensor:
        return torch.searchsorted(c[1:], torch.arange(int(c[-1])), right=True)

    doc: Mask = _Document(ids(cq), ids(ck))
    if not causal:
        return doc
    return doc & _VarlenCausal(cq, ck)


class _VarlenCausal(Mask):
    """Causal within each packed sequence, aligned bottom-right per sequence."""

    name = "varlen_causal"

    def __init__(self, cq: Tensor, ck: Tensor):
        self.cq, self.ck = cq, ck
        nq, nk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
        # key position allowed: j - ck[d] <= i - cq[d] + nk[d] - nq[d]  <=>  j - i <= shift[d]
        self.shift = ck[:-1] - cq[:-1] + nk - nq

    def evaluate(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        d = torch.searchsorted(self.cq[1:].to(q.device), q, right=True).clamp(max=self.shift.numel() - 1)
        return (k - q) <= self.shift.to(q.device)[d]

    def shard_blocker(self) -> str | None:
        return _tied_to_layout(self)

    def cache_key(self) -> Hashable | None:
        cq = tensor_key(self.cq)
        ck = cq if self.ck is self.cq else tensor_key(self.ck)
        return None if cq is None or ck is None else ("varlen_causal", cq, ck)

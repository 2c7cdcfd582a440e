"""The truth a mask is tested against: its definition written out one (b, h, i, j) at a time with Python
ints, and the kind of every tile reduced from that (for the tests under ``tests/masks/``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from qkv import masks as M
from qkv.masks import EMPTY, FULL, PARTIAL, Shape


def brute(fn: Callable[[int, int, int, int], object], B: int, H: int, Lq: int, Lk: int) -> torch.Tensor:
    """The definition, one (b, h, i, j) at a time with Python ints."""
    out = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b, h, i, j in itertools.product(range(B), range(H), range(Lq), range(Lk)):
        out[b, h, i, j] = bool(fn(b, h, i, j))
    return out


def dense(m: M.Mask, B: int, H: int, Lq: int, Lk: int) -> torch.Tensor:
    return m.to_dense(B, H, Lq, Lk).expand(B, H, Lq, Lk)


def true_kinds(d: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """``(B, H, nq, nk)`` tile kinds of a dense ``(B, H, Lq, Lk)`` bool mask, tile by tile."""
    B, H, Lq, Lk = d.shape
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    out = torch.empty(B, H, nq, nk, dtype=torch.int8)
    for b, h, qi, ki in itertools.product(range(B), range(H), range(nq), range(nk)):
        t = d[b, h, qi * bq : (qi + 1) * bq, ki * bk : (ki + 1) * bk]
        out[b, h, qi, ki] = FULL if bool(t.all()) else EMPTY if not bool(t.any()) else PARTIAL
    return out


def check_kinds(m: M.Mask, B: int, H: int, Lq: int, Lk: int, bq: int, bk: int, exact: bool) -> None:
    """FULL tiles are full and EMPTY tiles empty; for formula masks every tile is classified exactly."""
    truth = true_kinds(dense(m, B, H, Lq, Lk), bq, bk)
    kinds = m.block_kinds(Shape(B, H, Lq, Lk), bq, bk).expand(B, H, -1, -1)
    assert kinds.shape[-2:] == (-(-Lq // bq), -(-Lk // bk))
    for b, h, qi, ki in itertools.product(range(B), range(H), range(kinds.shape[2]), range(kinds.shape[3])):
        got, want = int(kinds[b, h, qi, ki]), int(truth[b, h, qi, ki])
        if exact:
            assert got == want, (m, b, h, qi, ki, got, want)
        else:
            assert got == want or got == PARTIAL, (m, b, h, qi, ki, got, want)

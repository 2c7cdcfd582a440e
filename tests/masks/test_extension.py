"""The extension point for masks that hold data, through public API only: the worked example of
``docs/masks.md`` ("Adding a mask"), a ``KeysUpTo`` mask written from scratch against ``qkv.masks``, is
read from that page and run here, so the page cannot drift from what works.

It must give the float64 oracle's answer (over a mask written out element by element, apart from its own
``evaluate``) on ``tiled``, ``flex``, ``sdpa`` and ``auto``; classify its tiles exactly from its data,
without evaluating an element; have its empty tiles skipped by ``tiled`` and ``flex``; and have its plan
follow its data (limits changed in place: a new plan, the new answer)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from mask_truth import brute, check_kinds, dense, true_kinds
from qkv.backends import flex as FX
from qkv.backends.plan import PLANS, tile_plan
from qkv.masks import EMPTY, FULL, PARTIAL, Shape

PAGE = Path(__file__).resolve().parents[2] / "docs" / "masks.md"


def _page_blocks() -> list[str]:
    """The ```python blocks of the page's "Adding a mask" section, in order."""
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index("## Adding a mask") :]
    section = section[: m.start()] if (m := re.search(r"^## ", section[3:], re.M)) else section
    return re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)


def _example() -> type:
    """``KeysUpTo`` as the page defines it, in a namespace of its own."""
    ns: dict = {"__name__": "keys_up_to_example"}
    exec(compile(_page_blocks()[0], str(PAGE), "exec"), ns)
    return ns["KeysUpTo"]


KeysUpTo = _example()


def _truth(limits: torch.Tensor, B: int, Lq: int, Lk: int) -> torch.Tensor:
    """The mask written out pair by pair: query i of row b sees key j iff j < limits[b][i]."""
    lim = limits.view(-1, Lq).tolist()
    return brute(lambda b, h, i, j: j < lim[b if len(lim) > 1 else 0][i], B, 1, Lq, Lk)


def _limits(B: int, Lq: int, Lk: int, seed: int, ordered: bool = False) -> torch.Tensor:
    """``(B, Lq)`` limits. Row 0 a stream (non-decreasing, its first queries see nothing); the other rows
    streams too when ``ordered``, else in no order."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, Lk + 1, (Lq,), generator=g) for _ in range(B)]
    rows = [r.sort().values if ordered or i == 0 else r for i, r in enumerate(rows)]
    rows[0][:3] = 0
    return torch.stack(rows)


def test_the_page_example_uses_public_names_only_and_runs_as_shown():
    code = _page_blocks()
    assert len(code) == 2, "the section has the mask, then its use"
    for node in ast.walk(ast.parse(code[0])):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qkv"):
            assert node.module == "qkv.masks", node.module
            import qkv.masks

            for alias in node.names:
                assert alias.name in qkv.masks.__all__, f"{alias.name} is not public"
    ns: dict = {"__name__": "keys_up_to_example"}
    for block in code:  # the use block asserts the tile kinds it shows and the answer against reference
        exec(compile(block, str(PAGE), "exec"), ns)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2), Lq=st.integers(1, 12), Lk=st.integers(1, 12), bq=st.integers(1, 5), bk=st.integers(1, 5),
    seed=st.integers(0, 99),
)  # fmt: skip
def test_tiles_are_classified_exactly_from_the_data(B, Lq, Lk, bq, bk, seed):
    limits = _limits(B, Lq, Lk, seed)
    m = KeysUpTo(limits)
    assert torch.equal(dense(m, B, 1, Lq, Lk), _truth(limits, B, Lq, Lk))

    def no_elements(*a, **k):
        raise AssertionError("tiles were classified by evaluating elements")

    m.evaluate = no_elements  # tile_bounds answers from the limits alone
    check_kinds(KeysUpTo(limits), B, 1, Lq, Lk, bq, bk, exact=True)
    assert torch.equal(m.block_kinds(Shape(B, 3, Lq, Lk), bq, bk).expand(B, 1, -1, -1),
                       true_kinds(_truth(limits, B, Lq, Lk), bq, bk))  # fmt: skip


B, H, HKV, LQ, LK = 2, 4, 2, 45, 70
BACKENDS = {
    "tiled": {"block_q": 16, "block_k": 8},
    "flex": {"compile": False, "block_size": 16},
    "sdpa": {},
    "auto": {},
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_backend_meets_the_float64_oracle(backend):
    """GQA, Lq != Lk, tiles that hang over the end, a row of queries that see nothing (zeros)."""
    torch.manual_seed(0)
    limits = _limits(B, LQ, LK, seed=1)
    q, k, v = torch.randn(B, H, LQ, 16), torch.randn(B, HKV, LK, 16), torch.randn(B, HKV, LK, 8)
    truth = _truth(limits, B, LQ, LK)
    grad = backend != "flex"  # FlexAttention has no CPU backward
    dout = torch.randn(B, H, LQ, 8)

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        out = fn(*xs)
        if not grad:
            return [out.detach()]
        return [out.detach(), *torch.autograd.grad(out, xs, dout.to(dtype))]

    want = run(lambda a, b, c: qkv.attention(a, b, c, mask=truth, backend="reference"), torch.float64)
    got = run(lambda a, b, c: qkv.attention(a, b, c, mask=KeysUpTo(limits), backend=backend, **BACKENDS[backend]),
              torch.float32)  # fmt: skip
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4, msg=f"{backend} {name}")
    assert bool((got[0][0, :, :3] == 0).all())  # row 0's first queries see nothing: zeros


def test_empty_tiles_are_skipped_and_full_ones_run_unmasked():
    limits = _limits(B, 64, 96, seed=2, ordered=True)
    m = KeysUpTo(limits)
    shape = Shape(B, H, 64, 96)
    truth = true_kinds(_truth(limits, B, 64, 96), 16, 8)  # (B, 1, 4, 12)
    # tiled: a (query tile, key block) is skipped when it is empty for every row, unmasked when full for every row
    PLANS.clear()
    plan = tile_plan(m, shape, 16, 8)
    assert int((plan.codes == EMPTY).sum()) == int((truth == EMPTY).all(0).sum()) > 0
    assert int((plan.codes == FULL).sum()) == int((truth == FULL).all(0).sum()) > 0
    asked = []
    orig = m.tile

    def tile(s, q0, q1, k0, k1):
        asked.append((q0, q1, k0, k1))
        return orig(s, q0, q1, k0, k1)

    m.tile = tile  # the mask is evaluated on partial segments only, never on an empty block
    q, k = torch.randn(B, H, 64, 8), torch.randn(B, H, 96, 8)
    qkv.attention(q, k, k, mask=m, backend="tiled", block_q=16, block_k=8)
    assert asked and sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in asked) < 64 * 96 / 2
    for q0, _q1, k0, k1 in asked:
        assert not (plan.codes[q0 // 16, k0 // 8 : -(-k1 // 8)] == EMPTY).any(), (q0, k0, k1)
    # flex: per row, only the live blocks are listed, the full ones without a mask_mod
    bm = FX.block_mask(KeysUpTo(limits), Shape(B, H, 64, 96), 16)
    truth16 = true_kinds(_truth(limits, B, 64, 96), 16, 16)
    assert torch.equal(bm.full_kv_num_blocks[:, 0], (truth16 == FULL).sum(-1)[:, 0].int())
    assert torch.equal(bm.kv_num_blocks[:, 0], (truth16 == PARTIAL).sum(-1)[:, 0].int())
    assert int((truth16 == EMPTY).sum()) > 0


def test_its_plan_follows_its_data():
    PLANS.clear()
    shape = Shape(B, H, 64, 96)
    limits = _limits(B, 64, 96, seed=3)
    m = KeysUpTo(limits)
    p1 = tile_plan(m, shape, 16, 8)
    assert tile_plan(KeysUpTo(limits.clone()), shape, 16, 8) is p1  # equal limits: the plan is shared
    assert PLANS.builds == 1 and PLANS.hits == 1
    limits[:, 32:] = 96  # in place: the later queries of every row now see every key
    p2 = tile_plan(m, shape, 16, 8)
    assert p2 is not p1 and PLANS.builds == 2
    assert torch.equal(p2.codes[2:], torch.full_like(p2.codes[2:], FULL))
    torch.manual_seed(4)
    q, k, v = torch.randn(B, H, 64, 8), torch.randn(B, H, 96, 8), torch.randn(B, H, 96, 8)
    want = qkv.attention(q.double(), k.double(), v.double(), mask=_truth(limits, B, 64, 96), backend="reference")
    for backend, opts in (("tiled", {"block_q": 16, "block_k": 8}), ("flex", {"compile": False, "block_size": 16})):
        got = qkv.attention(q, k, v, mask=m, backend=backend, **opts)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=backend)

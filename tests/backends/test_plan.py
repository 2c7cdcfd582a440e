"""Plans are data, built once per (mask, shape, block sizes) and cached."""

from __future__ import annotations

import torch

import qkv
from qkv import masks as M
from qkv.backends.plan import PLANS, TilePlan, tile_plan
from qkv.masks import FULL, PARTIAL, Shape


def test_a_plan_is_built_once_and_reused_by_equal_masks():
    PLANS.clear()
    s = Shape(1, 2, 1024, 1024)
    p1 = tile_plan(M.causal() & M.sliding_window(128), s, 128, 64)
    p2 = tile_plan(M.causal() & M.sliding_window(128), s, 128, 64)  # a new, equal mask
    assert p1 is p2 and PLANS.builds == 1 and PLANS.hits == 1
    assert isinstance(p1, TilePlan) and 0 < p1.live_fraction < 0.3
    assert tile_plan(M.causal() & M.sliding_window(64), s, 128, 64) is not p1  # another window
    assert tile_plan(M.causal() & M.sliding_window(128), s, 256, 64) is not p1  # other blocks
    assert PLANS.builds == 3


def test_masks_over_ids_are_keyed_by_their_contents():
    PLANS.clear()
    s = Shape(1, 1, 512, 512)
    ids = torch.arange(512) // 128
    a = tile_plan(M.document(ids), s, 128, 128)
    assert tile_plan(M.document(ids.clone()), s, 128, 128) is a  # same ids, new tensor: reused
    b = tile_plan(M.document(torch.arange(512) // 64), s, 128, 128)  # other documents: rebuilt
    assert b is not a and PLANS.builds == 2
    assert (a.codes == FULL).sum() == 4 and (b.codes == PARTIAL).sum() == 4  # documents of a tile, of half a tile


def test_a_large_dense_mask_is_keyed_by_its_contents():
    """No size above which a tensor falls back to identity: 16M elements keyed by a digest, so an edit
    in place gives a new plan, and a new tensor with the same contents the old one."""
    PLANS.clear()
    s = Shape(1, 1, 4000, 4000)
    t = torch.ones(4000, 4000, dtype=torch.bool).tril()
    big = M.from_dense(t)
    assert big.cache_key() is not None
    p = tile_plan(big, s, 256, 128)
    assert tile_plan(M.from_dense(t.clone()), s, 256, 128) is p and PLANS.builds == 1
    t[:, 0] = False  # in place: the first key block is no longer full for anyone
    p2 = tile_plan(big, s, 256, 128)
    assert p2 is not p and PLANS.builds == 2 and not (p2.codes[:, 0] == FULL).any()


def test_a_mask_without_a_key_is_planned_for_each_call():
    """cache_key() None: built for the call, stored nowhere (no plan of an earlier call is ever reused)."""
    PLANS.clear()
    s = Shape(1, 1, 256, 256)

    class Opaque(M.Mask):  # a subclass that does not key itself
        def evaluate(self, s, b, h, q, k):
            return q >= k

    m = Opaque()
    assert m.cache_key() is None and "names no cache key" in (m.cache_blocker() or "")
    p1, p2 = tile_plan(m, s, 64, 64), tile_plan(m, s, 64, 64)
    assert p1 is not p2 and PLANS.builds == 2 and PLANS.uncached == 2 and PLANS.hits == 0
    with PLANS.scope():  # within one call it is built once, however many backends ask
        assert tile_plan(m, s, 64, 64) is tile_plan(m, s, 64, 64)
    assert PLANS.builds == 3


def test_layers_that_share_a_mask_build_one_plan():
    """A model calls attention once per layer with the same mask: the plan is built once, and again
    not at all on the next step."""
    PLANS.clear()
    x = torch.randn(1, 4, 2048, 16)
    mask = M.causal() & M.sliding_window(256)
    for _ in range(3):  # three layers
        qkv.attention(x, x, x, mask=mask, backend="tiled")
    assert PLANS.builds == 1
    for _ in range(3):  # the next step builds a new mask object, equal to the first
        qkv.attention(x, x, x, mask=M.causal() & M.sliding_window(256))
    assert PLANS.builds == 1


def test_the_request_carries_no_state():
    q = torch.randn(1, 2, 64, 8)
    from qkv.attention import _validate

    req, _ = _validate(q, q, q, M.causal() & M.sliding_window(8), None, None, 0.0, False, {})
    before = dict(vars(req))
    qkv.backends.get("tiled").run(req)
    assert vars(req) == before

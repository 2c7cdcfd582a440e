"""``tiled`` against the float64 oracle: hypothesis-drawn shapes, masks, score mods and dtypes, tile
boundaries, empty tiles, rows with nothing to attend, weights on demand, the merge helper, and that no
``Lq x Lk`` tensor is built."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
import qkv.backends.tiled as T
from oracle import check_backend
from qkv import masks as M
from qkv import scores as S
from qkv.backends import kernels as K
from qkv.backends import plan as P
from qkv.masks import Shape
from strategies import DTYPES
from strategies import problems as shared_problems


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 queries x 3 keys, so that small problems cross many tile boundaries."""
    monkeypatch.setattr(T, "BLOCK_Q", 4)
    monkeypatch.setattr(T, "BLOCK_K", 3)


@st.composite
def problems(draw, dtypes=DTYPES):
    """Random (q, k, v, mask, score_mod, tile sizes) with GQA, Lq != Lk, Dv != D and every mask kind."""
    q, k, v, mask = draw(shared_problems(dtypes, max_len=23, max_window=7))
    H = q.shape[1]
    sm = draw(st.sampled_from([None, None, "softcap", "alibi"]))
    score_mod = {None: None, "softcap": S.softcap(4.0), "alibi": S.alibi(H)}[sm]
    bq, bk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    band = draw(st.sampled_from([0] + [r for r in (1, 2, 3) if bq % r == 0]))  # rows of a batched band
    return q, k, v, mask, score_mod, bq, bk, band


def half_engine(mp: pytest.MonkeyPatch, fwd: float, bwd: float) -> None:
    """Pretend the fused kernel runs half precision at ``fwd``/``bwd`` times its float32 speed: >= 0.75
    passes bf16/fp16 to it as they are, below computes in float32."""
    for dt in K.HALF:
        mp.setitem(K._HALF_SPEED, (dt, False), fwd)
        mp.setitem(K._HALF_SPEED, (dt, True), bwd)


@settings(max_examples=120, deadline=None)
@given(problems(), st.sampled_from([(1.0, 1.0), (1.0, 0.1), (0.1, 0.1)]))
def test_tiled_meets_oracle(p, speeds):
    """Every engine: half precision on the fused kernel as it is, forward only, or in float32."""
    q, k, v, mask, score_mod, bq, bk, band = p
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "BLOCK_Q", bq)
        mp.setattr(T, "BLOCK_K", bk)
        mp.setattr(P, "BAND_ROWS", band)
        half_engine(mp, *speeds)
        check_backend("tiled", q, k, v, mask=mask, score_mod=score_mod)


@pytest.mark.parametrize("L", [1, 2, 7, 13, 31, 64, 97])
@pytest.mark.parametrize("mask", [None, "causal", "window"])
def test_tile_boundaries_default_tiles(L, mask):
    """Lengths 1, primes and non-multiples of the (default and small) tiles, with the default tiles."""
    torch.manual_seed(L)
    m = {None: None, "causal": M.causal(), "window": M.sliding_window(5)}[mask]
    q, k, v = torch.randn(1, 2, L, 8), torch.randn(1, 2, L + 3, 8), torch.randn(1, 2, L + 3, 8)
    check_backend("tiled", q, k, v, mask=m)


def test_long_prime_lengths_cross_default_tiles():
    torch.manual_seed(0)
    Lq, Lk = 521, 389  # primes, more than two default tiles each
    q, k, v = torch.randn(1, 2, Lq, 16), torch.randn(1, 1, Lk, 16), torch.randn(1, 1, Lk, 12)
    for mask in (M.causal() & M.sliding_window(100), M.document(torch.arange(Lq) // 97, torch.arange(Lk) // 71)):
        check_backend("tiled", q, k, v, mask=mask)


@pytest.mark.parametrize("score_mod", [None, "softcap"])
def test_gradcheck_float64(small_tiles, score_mod):
    torch.manual_seed(0)
    sm = S.softcap(3.0) if score_mod else None
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 11, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 11, 3, dtype=torch.float64, requires_grad=True)
    mask = M.causal() & M.sliding_window(4) | M.global_tokens(1)
    fn = lambda a, b, c: qkv.attention(a, b, c, mask=mask, score_mod=sm, backend="tiled")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_score_mod_parameters_get_gradients(small_tiles):
    torch.manual_seed(0)
    w = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 10, 4, dtype=torch.float64)
    grads = []
    for backend in ("tiled", "reference"):
        w.grad = None
        qkv.attention(q, q, q, mask=M.causal(), score_mod=S.relative_bias(w), backend=backend).square().sum().backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_masks_that_empty_whole_tiles_and_rows_with_nothing_to_attend(small_tiles):
    torch.manual_seed(0)
    Lq, Lk = 14, 17
    layout = torch.zeros(5, 6, dtype=torch.bool)
    layout[0, 1] = layout[2, 0] = layout[2, 5] = layout[4, 3] = True  # query tiles 1 and 3 see nothing
    mask = M.block_sparse(layout, 3) | M.padding([0, 5])
    tiles = T.plan_tiles(mask, Shape(2, 2, Lq, Lk), 4, 3)
    assert sum(len(t.segments) for t in tiles) < 4 * 6 / 2  # most blocks skipped
    q, k, v = torch.randn(2, 2, Lq, 8), torch.randn(2, 2, Lk, 8), torch.randn(2, 2, Lk, 8)
    check_backend("tiled", q, k, v, mask=mask)
    for sm in (None, S.softcap(5.0)):
        q.requires_grad_(True)
        out = qkv.attention(q, k, v, mask=mask, score_mod=sm, backend="tiled")
        dead = ~mask.to_dense(2, 2, Lq, Lk).any(-1)  # (2, 1|2, Lq)
        assert dead.any()
        assert (out.masked_select(dead.unsqueeze(-1).expand_as(out)) == 0).all()
        (dq,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(dq).all()
        assert (dq.masked_select(dead.unsqueeze(-1).expand_as(dq)) == 0).all()


def test_plan_skips_empty_blocks_and_applies_no_mask_on_full_ones():
    s = Shape(1, 1, 1024, 1024)
    tiles = T.plan_tiles(M.causal() & M.sliding_window(256), s, 256, 128)
    for t in tiles:
        lo = max(0, t.q0 - 256) // 128 * 128
        assert t.segments[0].k0 == lo and t.segments[-1].k1 == t.q1  # nothing outside the window
    docs = T.plan_tiles(M.document(torch.arange(1024) // 256), s, 256, 128)
    assert [t.segments for t in docs] == [(T.Segment(i * 256, i * 256 + 256, False),) for i in range(4)]


@pytest.mark.parametrize("score_mod", [None, "alibi"])
def test_weights_on_demand_match_reference(score_mod):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 300, 8), torch.randn(2, 2, 310, 8), torch.randn(2, 2, 310, 8)
    sm = S.alibi(4) if score_mod else None
    mask = M.causal() & M.sliding_window(100) | M.global_tokens(2)
    ref_out, ref_w = qkv.attention(q, k, v, mask=mask, score_mod=sm, backend="reference", return_weights=True)
    out, w = qkv.attention(q, k, v, mask=mask, score_mod=sm, backend="tiled", return_weights=True)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, ref_out)
    rows = torch.tensor([0, 5, 299, 150])
    _, w2 = qkv.attention(
        q, k, v, mask=mask, score_mod=sm, return_weights=True, weights_heads=[3, 1], weights_rows=rows
    )  # auto takes tiled for these options
    torch.testing.assert_close(w2, ref_w[:, [3, 1]][:, :, rows])
    _, w3 = qkv.attention(q, k, v, mask=mask, return_weights=True, weights_rows=slice(10, 20), weights_heads=[0])
    assert w3.shape == (2, 1, 10, 310)


def test_weights_of_a_window_are_computed_over_its_keys_only_and_equal_the_reference():
    """Weights on demand visit only the keys the plan visits for each chunk of rows (zeros elsewhere)."""
    torch.manual_seed(1)
    q = torch.randn(1, 2, 700, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 720, 8, dtype=torch.float64)
    mask = M.causal() & M.sliding_window(90)
    rows = torch.tensor([650, 3, 400, 699])
    for kw in ({}, {"weights_rows": rows, "weights_heads": [1]}):
        got = qkv.attention(q, k, k, mask=mask, backend="tiled", return_weights=True, **kw)[1]
        ref = qkv.attention(q, k, k, mask=mask, backend="reference", return_weights=True)[1]
        ref = ref[:, [1]][:, :, rows] if kw else ref
        torch.testing.assert_close(got, ref)
        gw = torch.randn_like(got)
        (g1,) = torch.autograd.grad((got * gw).sum(), q)
        (g2,) = torch.autograd.grad((ref * gw).sum(), q)
        torch.testing.assert_close(g1, g2)


def test_weights_are_differentiable_like_the_reference():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("tiled", "reference"):
        _, w = qkv.attention(q, q, q, mask=M.causal(), backend=backend, return_weights=True)
        (g,) = torch.autograd.grad((w * torch.arange(6.0, dtype=torch.float64)).sum(), q)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_options_and_dropout():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="weights_heads.*H=2"):
        qkv.attention(q, q, q, backend="tiled", return_weights=True, weights_heads=[2])
    with pytest.raises(TypeError, match="weights_rows"):
        qkv.attention(q, q, q, backend="tiled", return_weights=True, weights_rows=1.5)
    with pytest.raises(ValueError, match="block_q"):
        qkv.attention(q, q, q, backend="tiled", block_q=0)
    with pytest.raises(NotImplementedError, match="tiled.*dropout.*backend 'sdpa' can"):
        qkv.attention(q, q, q, backend="tiled", dropout_p=0.1)
    assert qkv.explain(q, q, q, dropout_p=0.1, mask=M.sliding_window(1)).backend != "tiled"


def test_grouped_query_attention_does_not_copy_kv(monkeypatch):
    def no_copy(*a, **k):
        raise AssertionError("K/V were repeated per head")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_copy)
    monkeypatch.setattr(torch.Tensor, "repeat", no_copy)
    q, k = torch.randn(1, 8, 40, 8), torch.randn(1, 2, 40, 8)
    for sm in (None, S.softcap(3.0)):
        out = qkv.attention(q, k, k, mask=M.causal() & M.sliding_window(9), score_mod=sm, backend="tiled")
        ref = qkv.attention(q, k, k, mask=M.causal() & M.sliding_window(9), score_mod=sm, backend="reference")
        torch.testing.assert_close(out, ref)


def test_no_lq_by_lk_tensor_is_ever_built(monkeypatch):
    """Forward and backward at 8k x 8k, with a sliding window: every tensor torch allocates while
    tiled runs is recorded (``TorchDispatchMode``) and none may hold Lq*Lk/8 elements; the mask is
    never made dense."""
    from torch.utils._python_dispatch import TorchDispatchMode

    L = 8192
    limit = L * L // 8
    biggest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    biggest[0] = max(biggest[0], t.numel())
            return out

    def no_dense(*a, **k):
        raise AssertionError("to_dense called")

    monkeypatch.setattr(M.Mask, "to_dense", no_dense)
    torch.manual_seed(0)
    q = torch.randn(1, 1, L, 16, requires_grad=True)
    k = torch.randn(1, 1, L, 16, requires_grad=True)
    for mask in (M.causal() & M.sliding_window(64), M.causal()):
        biggest[0] = 0
        with Watch():
            out = qkv.attention(q, k, k, mask=mask, backend="tiled")
            out.sum().backward()
        assert 0 < biggest[0] < limit, biggest[0]
    with Watch():  # and what the check would see if something did build the matrix
        biggest[0] = 0
        qkv.attention(q[:, :, :2048], k[:, :, :2048], k[:, :, :2048], backend="reference")
    assert biggest[0] >= 2048 * 2048


@pytest.mark.parametrize("Lq", [40, 37])
@pytest.mark.parametrize("window", [None, 9, 16])
def test_causal_windows_run_as_triangles_without_a_mask(monkeypatch, Lq, window):
    """Causal (sliding-window) tiles are split into an upper triangle, a full run and a lower
    triangle, computed with ``is_causal`` and no mask: exact against the oracle, Lq < Lk too."""
    monkeypatch.setattr(T, "BLOCK_Q", 8)
    monkeypatch.setattr(T, "BLOCK_K", 4)
    mask = M.causal() if window is None else M.causal() & M.sliding_window(window)
    Lk = 45
    tiles = T.plan_tiles(mask, Shape(1, 2, Lq, Lk), 8, 4)
    tris = [s.tri for t in tiles for s in t.segments]
    assert "lower" in tris and (window is None or "upper" in tris)
    assert all(not s.partial or s.tri for t in tiles[2:4] for s in t.segments)  # no mask evaluated
    torch.manual_seed(Lq)
    q, k, v = torch.randn(2, 2, Lq, 8), torch.randn(2, 1, Lk, 8), torch.randn(2, 1, Lk, 8)
    check_backend("tiled", q, k, v, mask=mask)
    check_backend("tiled", q.double(), k.double(), v.double(), mask=mask)


@pytest.mark.parametrize("Lq", [700, 650])
def test_a_window_narrower_than_the_query_tile_runs_as_band_tiles(Lq):
    """Hugging Face's ``sliding_window=256`` is ``sliding_window(255)`` here: narrower than the 256-row query
    tile, so the tile is cut into tiles no taller than the window, still triangles and full runs, no mask."""
    mask = M.causal() & M.sliding_window(100)
    tiles = T.plan_tiles(mask, Shape(1, 2, Lq, 700), 256, 128)
    assert all(t.q1 - t.q0 <= 100 for t in tiles) and tiles[-1].q1 == Lq
    # no mask anywhere but in the corner that key 0 cuts off the first window
    assert all(not s.partial or s.tri or s.k0 == 0 for t in tiles for s in t.segments)
    assert sum(s.partial and not s.tri for t in tiles for s in t.segments) <= 1
    assert T.plan_tiles(M.causal() & M.sliding_window(20), Shape(1, 2, Lq, 700), 256, 128)[0].q1 == 256
    torch.manual_seed(Lq)
    q, k, v = torch.randn(1, 2, Lq, 8), torch.randn(1, 1, 700, 8), torch.randn(1, 1, 700, 8)
    check_backend("tiled", q, k, v, mask=mask)


def test_auto_picks_tiled_where_it_skips_work_or_sdpa_would_not_fit(monkeypatch):
    import qkv.backends.sdpa as sdpa

    q = torch.randn(1, 2, 4096, 8)
    window = M.causal() & M.sliding_window(256)
    e = qkv.explain(q, q, q, mask=window)
    assert e.backend == "tiled" and "non-empty" in e.reason and "%" in e.reason
    assert qkv.explain(q, q, q).backend == "sdpa"
    assert qkv.explain(q, q, q, mask=M.causal()).backend == "sdpa"
    # SDPA with any explicit mask runs 2-3x slower than without one on the CPU: a padding mask goes to
    # tiled, which runs the kept keys with no mask at all (sent to SDPA, it ran 2.7x slower than the
    # fastest backend with 75% of the keys kept)
    e = qkv.explain(q, q, q, mask=M.padding(4000))
    assert e.backend == "tiled" and "non-empty" in e.reason
    assert qkv.explain(q, q, q, mask=window, dropout_p=0.1).backend == "sdpa"
    assert qkv.explain(q[:, :, :64], q[:, :, :64], q[:, :, :64], score_mod=S.softcap(5.0)).backend == "tiled"
    assert qkv.explain(q[:, :, :64], q[:, :, :64], q[:, :, :64], return_weights=True).backend == "tiled"
    # tiny, and the window covers everything: tiled runs one causal call; sdpa would build a dense mask
    assert qkv.explain(q[:, :, :64], q[:, :, :64], q[:, :, :64], mask=window).backend == "tiled"
    assert qkv.explain(q[:, :, :64], q[:, :, :64], q[:, :, :64], mask=M.causal()).backend == "sdpa"
    monkeypatch.setattr(sdpa, "_available_memory", lambda device: 2**20)
    e = qkv.explain(q, q, q, mask=M.padding(4000))
    assert e.backend == "tiled" and "GiB" in e.reason and "GiB" in e.declined["sdpa"]
    out = qkv.attention(q[:, :, :600], q[:, :, :600], q[:, :, :600], mask=window)
    torch.testing.assert_close(
        out, qkv.attention(q[:, :, :600], q[:, :, :600], q[:, :, :600], mask=window, backend="sdpa")
    )


def _spy_kernel(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """Record the dtype of every call of the fused kernel (forward and backward)."""
    seen: list[tuple[str, torch.dtype]] = []
    for name, arg in (("FLASH", 0), ("FLASH_BWD", 1)):
        real = getattr(K, name)

        def spy(*a, _real=real, _name=name, _arg=arg, **kw):
            seen.append((_name, a[_arg].dtype))
            return _real(*a, **kw)

        monkeypatch.setattr(K, name, spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [None, "causal", "window", "documents"])
def test_half_precision_goes_to_the_fused_kernel_as_it_is(monkeypatch, dtype, mask):
    """bf16/fp16 reach the fused kernel in their own dtype (full runs, triangles, the band and partial
    tiles, forward and backward) and meet the rule; where the kernel is slower in them than in float32
    on the machine, every call is float32 instead."""
    L = 1100
    m = {
        None: None,
        "causal": M.causal(),
        "window": M.causal() & M.sliding_window(100),
        "documents": M.document(torch.arange(L) * 3 // L),
    }[mask]
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, L, 16).to(dtype), torch.randn(1, 2, L, 16).to(dtype), torch.randn(1, 2, L, 12).to(dtype)
    seen = _spy_kernel(monkeypatch)
    check_backend("tiled", q, k, v, mask=m)
    assert {d for _, d in seen} == {dtype} and {n for n, _ in seen} == {"FLASH", "FLASH_BWD"}
    seen.clear()
    half_engine(monkeypatch, 0.5, 0.5)
    check_backend("tiled", q, k, v, mask=m)
    assert {d for _, d in seen} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_with_grouped_heads_meets_the_rule(dtype):
    """Grouped-query training in half precision (B=2, H=8, Hkv=2, 512 tokens, D=128, causal): PyTorch's
    one-call backward gives dV 2.7-3.6x the error of the formula computed in bf16
    (tests/backends/test_kernels.py shows it); tiled's backward, one head per key head and its calls summed
    in float32, meets the rule."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 512, 128, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 512, 128, generator=g).to(dtype) for _ in range(2))
    torch.manual_seed(0)  # dout
    check_backend("tiled", q, k, v, mask=M.causal())


def test_a_causal_window_band_is_one_call(monkeypatch):
    """The rows of a causal sliding window past its first reach go to the fused kernel as ONE batched
    call (tiles of BAND_ROWS queries as batch entries over overlapping key spans, one shared mask):
    exact in float64, within the rule in float32 and bf16, with GQA, Lq < Lk and Dv != D."""
    mask = M.causal() & M.sliding_window(100)
    Lq, Lk = 1100, 1300
    plan = T.tile_plan(mask, Shape(1, 4, Lq, Lk), T.BLOCK_Q, T.BLOCK_K)
    band = plan.band
    assert band is not None and band.reach == 128 and band.q0 == 0 and band.q1 == 1024
    assert plan.fused_calls < plan.calls
    seen = _spy_kernel(monkeypatch)
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q = torch.randn(1, 4, Lq, 16).to(dtype)
        k, v = torch.randn(1, 2, Lk, 16).to(dtype), torch.randn(1, 2, Lk, 12).to(dtype)
        seen.clear()
        check_backend("tiled", q, k, v, mask=mask)
        # the band, then the segments of the one tile after it, forward and backward (the oracle makes none)
        names = [n for n, _ in seen]
        assert names.count("FLASH") == names.count("FLASH_BWD") == plan.fused_calls == 4


def test_a_wide_window_band_takes_wider_rows_and_its_backward_groups_tiles(monkeypatch):
    """Wider windows get wider band rows (at most 1.25x the keys needed); the backward, whose kernel
    holds each tile's whole span, runs in groups of tiles (here one per call) and still sums exactly."""
    mask = M.causal() & M.sliding_window(600)
    plan = T.tile_plan(mask, Shape(1, 2, 2048, 2048), T.BLOCK_Q, T.BLOCK_K)
    assert plan.band is not None and plan.band.rows == 128 and plan.band.reach == 640
    monkeypatch.setattr(K, "BAND_BWD_BYTES", 1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2048, 8, dtype=torch.float64) for _ in range(3))
    check_backend("tiled", q, k, v, mask=mask)

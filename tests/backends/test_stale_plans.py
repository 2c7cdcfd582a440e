"""No stale plan: the same ``mask_mod`` (or ``Mask``) passed again after the data it reads changed gives
the current mask's result on every backend that plans, against the float64 oracle.

FlexAttention's idiom is a ``mask_mod`` that reads the current batch's document ids from a tensor it
closes over or names as a global. Each case below passes ONE function object across batches of
8 -> 4 -> 2 -> 1 packed documents (then back to 8), changing what it reads in one way: a global tensor
changed in place or rebound, a closure cell rebound (``nonlocal``) or its tensor changed in place, a
global int rebound, a global helper function rebound, a ``functools.partial`` and a callable object
holding the tensor, an ``nn.Module``'s buffer read through a bound method, a module attribute. The
tiles of 512 tokens span several 256 x 128 tiles, so a plan of the previous batch skips live tiles or
runs partial ones unmasked: off by O(1), never by rounding (issue 24 measured up to 3.3).
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import qkv
from oracle import check_backend
from qkv import backends
from qkv import masks as M
from qkv.backends import Request
from qkv.backends.plan import PLANS

L = 512
DOCS = (8, 4, 2, 1, 8)


def ids(n: int) -> torch.Tensor:
    """Document ids of ``n`` equal packed documents over ``L`` tokens."""
    return torch.arange(L) * n // L


# ---- globals the cases read (module level, as a user's script has them) ------------------------
DOC_A = ids(8)
DOC_B = ids(8)
SPAN = L // 8
CFG = types.ModuleType("cfg")  # a module of the user's own (namespace read by attribute)
CFG.doc = ids(8)


def _same_doc_of(doc: torch.Tensor):
    return lambda q, k: doc[q] == doc[k]


SAME_DOC = _same_doc_of(ids(8))


def mod_global_in_place(b, h, q, k):
    return (DOC_A[q] == DOC_A[k]) & (q >= k)


def mod_global_rebound(b, h, q, k):
    return (DOC_B[q] == DOC_B[k]) & (q >= k)


def mod_global_int(b, h, q, k):
    return (q // SPAN == k // SPAN) & (q >= k)


def mod_calls_a_global_function(b, h, q, k):
    return SAME_DOC(q, k) & (q >= k)


def mod_module_attribute(b, h, q, k):
    return (CFG.doc[q] == CFG.doc[k]) & (q >= k)


def _doc_mod(doc, b, h, q, k):
    return (doc[q] == doc[k]) & (q >= k)


class DocMask:
    """A callable object holding the ids."""

    def __init__(self, doc: torch.Tensor) -> None:
        self.doc = doc

    def __call__(self, b, h, q, k):
        return (self.doc[q] == self.doc[k]) & (q >= k)


class Packed(torch.nn.Module):
    """A model whose mask_mod is a method reading a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("doc", ids(8))

    def mask_mod(self, b, h, q, k):
        return (self.doc[q] == self.doc[k]) & (q >= k)


# ---- the cases: (function passed every time, set(n) changes what it reads) ----------------------
def case_global_in_place():
    return mod_global_in_place, lambda n: DOC_A.copy_(ids(n))


def case_global_rebound():
    def set_n(n):
        global DOC_B
        DOC_B = ids(n)

    return mod_global_rebound, set_n


def case_closure_cell_rebound():
    doc = ids(8)

    def fn(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k)

    def set_n(n):
        nonlocal doc
        doc = ids(n)

    return fn, set_n


def case_closure_in_place():
    doc = ids(8)
    return (lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)), lambda n: doc.copy_(ids(n))


def case_global_int():
    def set_n(n):
        global SPAN
        SPAN = L // n

    return mod_global_int, set_n


def case_global_function_rebound():
    def set_n(n):
        global SAME_DOC
        SAME_DOC = _same_doc_of(ids(n))

    return mod_calls_a_global_function, set_n


def case_partial():
    doc = ids(8)
    return functools.partial(_doc_mod, doc), lambda n: doc.copy_(ids(n))


def case_callable_object():
    obj = DocMask(ids(8))

    def set_n(n):
        obj.doc = ids(n)

    return obj, set_n


def case_module_buffer():
    m = Packed()
    return m.mask_mod, lambda n: m.doc.copy_(ids(n))  # m.mask_mod: a new bound method on each access


def case_module_attribute():
    def set_n(n):
        CFG.doc = ids(n)

    return mod_module_attribute, set_n


CASES = {f.__name__[5:]: f for f in (
    case_global_in_place, case_global_rebound, case_closure_cell_rebound, case_closure_in_place,
    case_global_int, case_global_function_rebound, case_partial, case_callable_object, case_module_buffer,
    case_module_attribute,
)}  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_globals():
    global DOC_B, SPAN, SAME_DOC
    DOC_A.copy_(ids(8))
    DOC_B, SPAN, SAME_DOC = ids(8), L // 8, _same_doc_of(ids(8))
    CFG.doc = ids(8)
    PLANS.clear()
    yield


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, L, 16, generator=g) for _ in range(3))


def _across_batches(name: str, backend: str, grad: bool = False, **options):
    fn, set_n = CASES[name]()
    q, k, v = _qkv()
    for n in DOCS:
        set_n(n)
        check_backend(backend, q, k, v, grad=grad, mask=fn, options=options)


@pytest.mark.parametrize("name", list(CASES))
def test_tiled_follows_what_the_mask_mod_reads(name):
    _across_batches(name, "tiled", grad=name == "closure_in_place")  # one case backward too


@pytest.mark.parametrize("name", list(CASES))
def test_auto_follows_what_the_mask_mod_reads(name):
    _across_batches(name, "auto")


@pytest.mark.parametrize("name", list(CASES))
def test_flex_block_mask_follows_what_the_mask_mod_reads(name):
    """The BlockMask ``flex`` hands its kernel equals PyTorch's ``create_block_mask`` of the function as
    it reads now, block for block (the compiled kernel visits exactly those blocks), and its ``mask_mod``
    evaluates the current data."""
    fn, set_n = CASES[name]()
    q = torch.randn(1, 2, L, 8)
    flex = backends.get("flex")
    for n in DOCS:
        set_n(n)
        bm = flex.plan(Request(q, q, q, M.as_mask(fn), None, 1.0, 0.0, False, {"block_size": 64})).block_mask
        theirs = create_block_mask(lambda b, h, q, k: fn(b, h, q, k), 1, 1, L, L, device="cpu", BLOCK_SIZE=64)
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(bm, field), getattr(theirs, field)), f"{name}, {n} documents: {field}"
        i = torch.arange(L)
        now = bm.mask_mod(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                          i.view(1, 1, -1, 1), i.view(1, 1, 1, -1))  # fmt: skip
        assert torch.equal(now.expand(1, 1, L, L), (ids(n)[:, None] == ids(n)[None, :]).tril()[None, None])


@pytest.mark.parametrize("name", ["closure_cell_rebound", "callable_object"])
def test_flex_uncompiled_follows_what_the_mask_mod_reads(name):
    _across_batches(name, "flex", compile=False, block_size=64)


@pytest.mark.slow
def test_compiled_flex_follows_a_global_changed_in_place_and_rebound(monkeypatch):
    """The compiled CPU kernel (one compile, 10-20 s here): the global changed in place, then rebound."""
    from qkv.backends import flex as FX

    monkeypatch.setattr(FX, "KERNELS", FX._Kernels())  # what ran here must not make auto pick flex elsewhere
    q, k, v = _qkv(1)
    for n in DOCS:
        DOC_A.copy_(ids(n))
        check_backend("flex", q, k, v, grad=False, mask=mod_global_in_place)
    for n in (4, 1):
        globals()["DOC_A"] = ids(n)  # rebound (the fixture puts a fresh tensor back)
        check_backend("flex", q, k, v, grad=False, mask=mod_global_in_place)


# ------------------------------------------------------------------------------------------------
# named masks reused after the tensor they hold changed in place


def _named(kind: str):
    """A named mask holding a tensor, and set(n) that edits that tensor in place."""
    if kind == "document":
        t = ids(8)
        return M.document(t) & M.causal(), lambda n: t.copy_(ids(n))
    if kind == "padding":
        t = torch.tensor([L])
        return M.padding(t) & M.causal(), lambda n: t.fill_(L // n)
    if kind == "dense":  # more than 2^18 elements: keyed by a digest of its contents, not by identity
        t = torch.zeros(1, 2, L, L, dtype=torch.bool)

        def set_n(n):
            d = ids(n)
            t.copy_((d[:, None] == d[None, :]).tril().expand_as(t))

        set_n(8)
        return M.from_dense(t), set_n
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", ["tiled", "auto"])
@pytest.mark.parametrize("kind", ["document", "padding", "dense"])
def test_a_named_mask_follows_its_tensor_changed_in_place(kind, backend):
    mask, set_n = _named(kind)
    q, k, v = _qkv(2)
    for n in DOCS:
        set_n(n)
        check_backend(backend, q, k, v, grad=False, mask=mask)


@pytest.mark.parametrize("kind", ["document", "padding", "dense"])
def test_flex_block_mask_of_a_named_mask_follows_its_tensor(kind):
    mask, set_n = _named(kind)
    q = torch.randn(1, 2, L, 8)
    flex = backends.get("flex")
    for n in DOCS:
        set_n(n)
        bm = flex.plan(Request(q, q, q, mask, None, 1.0, 0.0, False, {"block_size": 64})).block_mask
        B, H = bm.kv_num_blocks.shape[:2]
        theirs = create_block_mask(mask.mask_mod(L, L, B, H), B, H, L, L, device="cpu", BLOCK_SIZE=64)
        assert torch.equal(_full(bm), _full(theirs)), f"{kind}, {n} documents: full blocks differ"
        assert torch.equal(_live(bm), _live(theirs)), f"{kind}, {n} documents: live blocks differ"


def _blocks(num, idx):
    """The dense (..., nq, nk) bool matrix of the blocks an ordered (num_blocks, indices) pair lists."""
    keep = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
    return torch.zeros(*idx.shape[:-1], idx.shape[-1], dtype=torch.bool).scatter_(-1, idx.long(), keep)


def _full(bm):
    return _blocks(bm.full_kv_num_blocks, bm.full_kv_indices)


def _live(bm):
    return _full(bm) | _blocks(bm.kv_num_blocks, bm.kv_indices)


def test_flex_reads_the_current_masks_tensors_when_a_cached_plan_is_shared():
    """Two mask objects with equal contents share a cached plan; the first one's tensor is then reused
    as a buffer for another batch. The BlockMask handed for the second mask must evaluate the second
    mask's tensors, not the first's (the block lists follow the key, the mask_mod the request)."""
    q, k, v = _qkv(3)
    buf = ids(4)
    eager = {"compile": False, "block_size": 64}
    check_backend("flex", q, k, v, grad=False, mask=M.document(buf), options=eager)
    buf.copy_(ids(2).flip(0))  # the buffer now holds another batch; that mask is not used again
    check_backend("flex", q, k, v, grad=False, mask=M.document(ids(4)), options=eager)


# ------------------------------------------------------------------------------------------------
# ring and Ulysses on one in-process rank (their plans go through the same cache)


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("name", ["global_in_place", "closure_cell_rebound", "partial"])
def test_sequence_parallel_follows_what_the_mask_mod_reads(one_rank, strategy, name):
    from oracle import oracle
    from qkv.distributed import ring_attention, ulysses_attention

    run = ring_attention if strategy == "ring" else ulysses_attention
    fn, set_n = CASES[name]()
    q, k, v = _qkv(4)
    for n in DOCS:
        set_n(n)
        got = run(q, k, v, mask=fn, layout="contiguous")
        (want,) = oracle(q, k, v, mask=fn)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=f"{strategy} {name}, {n} documents")


# ------------------------------------------------------------------------------------------------
# the cache still hits where it should, and says when it cannot


def test_the_same_data_twice_builds_one_plan():
    q, k, v = _qkv()
    fn, set_n = CASES["global_in_place"]()
    for _ in range(3):
        qkv.attention(q, k, v, mask=fn, backend="tiled")
    assert PLANS.builds == 1 and PLANS.hits >= 2
    set_n(4)
    qkv.attention(q, k, v, mask=fn, backend="tiled")
    assert PLANS.builds == 2
    set_n(8)  # back to the first data: the first plan again
    qkv.attention(q, k, v, mask=fn, backend="tiled")
    assert PLANS.builds == 2

    def make():  # a new function object per batch, as a loop that defines its mask_mod inline makes
        return lambda b, h, q, k: (DOC_A[q] == DOC_A[k]) & (q >= k)

    qkv.attention(q, k, v, mask=make(), backend="tiled")
    qkv.attention(q, k, v, mask=make(), backend="tiled")
    assert PLANS.builds == 3  # one code reading the same data: one plan (another code: another plan)


def test_one_fingerprint_and_one_build_per_call_under_auto(monkeypatch):
    """auto asks several backends for their plans (cost, description, the run): the function is
    fingerprinted once per call, and an unkeyable one is built once per call."""
    from qkv import fingerprint

    calls = []
    real = fingerprint.fingerprint_or_none
    monkeypatch.setattr(M, "fingerprint_or_none", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv()
    qkv.attention(q, k, v, mask=mod_global_in_place)
    assert len(calls) == 1


def test_an_unkeyable_mask_mod_is_planned_on_every_call_and_explain_says_why():
    gen = torch.Generator().manual_seed(0)  # state in C: qkv cannot tell whether it changed
    doc = ids(8)

    def fn(b, h, q, k):
        gen.initial_seed()  # reads the generator (it decides nothing here, but qkv cannot know that)
        return (doc[q] == doc[k]) & (q >= k)

    q, k, v = _qkv()
    assert M.from_fn(fn).cache_key() is None
    why = str(qkv.explain(q, k, v, mask=fn))
    assert "plan: built again on every call, not cached" in why and "Generator" in why and "global" not in why
    for n in DOCS:
        doc.copy_(ids(n))
        before = PLANS.builds
        check_backend("auto", q, k, v, grad=False, mask=fn)
        assert PLANS.builds == before + 1 and PLANS.hits == 0
    assert "plan:" not in str(qkv.explain(q, k, v, mask=mod_global_in_place))


def test_a_user_key_names_what_the_function_reads():
    """from_fn(fn, key=...): for state qkv cannot read, the user names it; plans follow that key."""
    gen = torch.Generator().manual_seed(0)
    doc = ids(8)

    def fn(b, h, q, k):
        gen.initial_seed()
        return (doc[q] == doc[k]) & (q >= k)

    q, k, v = _qkv()
    for n in DOCS:
        doc.copy_(ids(n))
        check_backend("tiled", q, k, v, grad=False, mask=M.from_fn(fn, key=doc))
    assert PLANS.builds == 4  # 8, 4, 2, 1 built; 8 again from the cache

"""``qkv.fingerprint``: a key changes whenever what a function can read changes, stays equal when it
does not, and is refused (with the reason) where the walk cannot read with certainty."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch

from qkv import fingerprint as FP
from qkv import masks as M
from qkv.fingerprint import Unkeyable, content_key, fingerprint, fingerprint_or_none

IDS = torch.arange(64) // 16
WINDOW = 8
ARR = np.arange(10)
CFG = types.ModuleType("user_cfg")
CFG.width = 4
DEFAULT_IDS = torch.zeros(4)
NET_IDS = torch.zeros(4)


def helper(q, k):
    return IDS[q] == IDS[k]


def reads_global(b, h, q, k):
    return IDS[q] == IDS[k]


def reads_int(b, h, q, k):
    return q - k <= WINDOW


def calls_helper(b, h, q, k):
    return helper(q, k)


def nested(b, h, q, k):
    return [IDS[i] for i in (q, k)][0] == 0  # the comprehension's code names IDS


def reads_module_attribute(b, h, q, k):
    return q - k <= CFG.width


def reads_numpy(b, h, q, k):
    return q < int(ARR[0])


def _changes(fn, edit) -> None:
    before = fingerprint(fn)
    assert fingerprint(fn) == before, "the same state twice must give the same key"
    edit()
    assert fingerprint(fn) != before


def test_globals_change_the_key():
    global WINDOW, IDS
    saved, saved_helper = IDS, helper
    try:
        _changes(reads_global, lambda: IDS.__setitem__(0, 7))  # in place
        _changes(reads_global, lambda: globals().__setitem__("IDS", IDS.clone() + 1))  # rebound
        _changes(nested, lambda: IDS.__setitem__(1, 9))  # read from a nested code object
        _changes(calls_helper, lambda: IDS.__setitem__(2, 9))  # through a global function
        _changes(calls_helper, lambda: globals().__setitem__("helper", lambda q, k: q == k))  # function rebound
        _changes(reads_int, lambda: globals().__setitem__("WINDOW", 9))
        _changes(reads_module_attribute, lambda: setattr(CFG, "width", 5))
        _changes(reads_numpy, lambda: ARR.__setitem__(0, 3))
    finally:
        IDS, WINDOW = saved, 8
        globals()["helper"] = saved_helper


def test_closures_defaults_partials_methods_objects_change_the_key():
    t = torch.zeros(8)

    def cell():
        return t.sum()

    def rebind():
        nonlocal t
        t = torch.full((8,), 5.0)

    _changes(cell, lambda: t.add_(1))
    _changes(cell, rebind)

    def default(b, h, q, k, ids=DEFAULT_IDS):
        return ids[q] == 0

    _changes(default, lambda: default.__defaults__[0].add_(1))
    d = torch.zeros(4)
    _changes(functools.partial(lambda x, y: x, d), lambda: d.add_(1))
    _changes(functools.partial(lambda x, y=None: x, 1, y=d), lambda: d.add_(1))

    class Holder:
        scale = 1  # a class attribute the method reads

        def __init__(self):
            self.t = torch.zeros(3)

        def __call__(self, q):
            return self.t[q] * self.scale

    h = Holder()
    _changes(h, lambda: h.t.add_(1))  # an object's attribute, in place
    _changes(h, lambda: setattr(h, "t", torch.full((3,), 7.0)))  # rebound
    _changes(h.__call__, lambda: h.t.add_(1))  # a bound method (a new object on each access)
    _changes(h, lambda: setattr(Holder, "scale", 2))  # the class's attribute

    class Slotted:
        __slots__ = ("t",)

    s = Slotted()
    s.t = torch.zeros(2)
    _changes(s, lambda: s.t.add_(1))

    m = torch.nn.Module()
    m.register_buffer("ids", torch.zeros(4))

    def method(self, q):
        return self.ids[q]

    _changes(types.MethodType(method, m), lambda: m.ids.add_(1))
    class Net(torch.nn.Module):  # a submodule called by the mask: its forward is read (called, not named)
        def forward(self, q):
            return NET_IDS[q]

    net = Net()
    _changes(lambda q: net(q), lambda: NET_IDS.add_(1))
    class Model(torch.nn.Module):  # a model whose mask_mod is a method: read by the names the method spells
        def __init__(self):
            super().__init__()
            self.register_buffer("doc", torch.zeros(4))
            self.gen = torch.Generator()  # state in C, read by forward only

        def forward(self, x):
            return torch.rand(x.shape, generator=self.gen)

        def mask_mod(self, b, h, q, k):
            return self.doc[q] == self.doc[k]

    model = Model()
    _changes(model.mask_mod, lambda: model.doc.add_(1))  # keyable: forward (and its generator) not read
    assert fingerprint_or_none(lambda x: model(x))[0] is None  # calling the model reads its forward
    ns = types.SimpleNamespace(ids=torch.zeros(2))
    _changes(lambda q: ns.ids[q], lambda: ns.ids.add_(1))
    box = {"ids": torch.zeros(2)}
    _changes(lambda: box["ids"], lambda: box["ids"].add_(1))
    lst = [torch.zeros(2)]
    _changes(lambda: lst[0], lambda: lst.append(1))


def test_a_mask_read_by_a_function_counts_by_its_key():
    ids = torch.arange(32) // 8
    doc = M.document(ids)
    _changes(lambda b, h, q, k: doc.mask_mod(32, 32)(b, h, q, k), lambda: ids.__setitem__(0, 3))


def test_equal_state_gives_equal_keys():
    def make(ids):
        return lambda b, h, q, k: ids[q] == ids[k]

    assert fingerprint(make(torch.arange(10))) == fingerprint(make(torch.arange(10)))  # new objects, same data
    assert fingerprint(make(torch.arange(10))) != fingerprint(make(torch.arange(10) + 1))
    assert fingerprint(make(torch.arange(10))) != fingerprint(lambda b, h, q, k: q == k)  # other code
    # contents, not layout: a transposed copy made contiguous is the same tensor
    t = torch.randn(300, 300)
    assert content_key(t) == content_key(t.t().contiguous().t())
    assert content_key(t) != content_key(t.t())


def test_large_and_expanded_tensors_by_digest():
    big = torch.zeros(1 << 20, dtype=torch.bool)
    k = content_key(big)
    big[12345] = True
    assert content_key(big) != k
    row = torch.rand(1, 1, 1, 4096) > 0.5
    e = row.expand(2, 4, 2048, 4096)  # 67M elements read as 4096
    k = content_key(e)
    assert k == content_key(row.clone().expand(2, 4, 2048, 4096))
    assert k != content_key(e[:, :, :2].contiguous())  # another shape
    row[..., 0] = ~row[..., 0]  # the expanded view sees the edit
    assert content_key(e) != k


def test_cycles_and_shared_objects():
    a: list = [torch.zeros(2)]
    a.append(a)  # a cycle
    fn = lambda: a  # noqa: E731
    _changes(fn, lambda: a[0].add_(1))

    def rec(n):
        return rec(n - 1) if n else IDS[0]  # names itself as a global

    assert fingerprint(rec) == fingerprint(rec)


def test_what_cannot_be_read_is_refused_with_the_reason(monkeypatch):
    g = torch.Generator()
    key, why = fingerprint_or_none(lambda q: torch.rand(1, generator=g))
    assert key is None and "Generator" in why and "closure g" in why
    key, why = fingerprint_or_none(lambda q: globals()["IDS"][q])
    assert key is None and "globals()" in why
    key, why = fingerprint_or_none(lambda q: eval("IDS")[q])
    assert key is None and "eval()" in why
    big = torch.zeros(1 << 20)
    assert fingerprint_or_none(lambda q: big[q], max_bytes=1 << 20)[0] is None
    assert fingerprint_or_none(lambda q: big[q], max_bytes=None)[0] is not None
    many = list(range(100))
    monkeypatch.setattr(FP, "MAX_NODES", 50)
    assert "more than 50 objects" in fingerprint_or_none(lambda: many)[1]
    monkeypatch.setattr(FP, "MAX_NODES", 20_000)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inside torch.compile: no value read
    assert "torch.compile" in fingerprint_or_none(lambda q: IDS[q])[1]
    with pytest.raises(Unkeyable, match="torch.compile"):
        content_key(IDS)
    assert M.from_fn(reads_global).cache_key() is None
    assert M.document(IDS).cache_key() is None and "torch.compile" in M.document(IDS).cache_blocker()


def test_library_code_is_keyed_by_identity():
    """torch's functions and modules are fixed at run time: named, not walked (cheap)."""
    pad = torch.nn.functional.pad
    assert fingerprint(pad) == (("function", FP.Ref(pad)), ())
    (main, spaces) = fingerprint(lambda q, k: torch.where(q > k, q, k))
    assert ("torch", ("module", FP.Ref(torch))) in main[-1] and spaces == ()

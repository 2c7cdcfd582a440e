"""What keying plans by contents costs per call (issue 24): fingerprints, cache hits, whole calls.

    PYTHONPATH=src python benchmarks/plan_keys.py            # ~1 minute on 2 cores
    PYTHONPATH=src python benchmarks/plan_keys.py --quick

Plans (tile classes, BlockMasks, ring kinds) are cached under a key that follows the mask's data; a
FlexAttention-style ``mask_mod`` is keyed by a fingerprint of everything it reads (its code, closure,
globals, tensors by contents). Before issue 24 it was keyed by the function object, which is free but
reused the previous batch's plan after the ids changed. Here "identity" is that old key, emulated in
this run (a ``from_fn`` mask whose ``cache_key`` is the function object), so each figure has its peer
from the same run:

1. the fingerprint of FlexAttention's document-mask idiom (a global ``document_id`` of ``L`` int32 ids,
   causal), against reading the named ``document(ids)`` mask's key;
2. a cache hit of ``tile_plan`` (the key, then the lookup), fingerprint against identity;
3. the whole ``qkv.attention(..., backend="auto")`` call on that mask_mod, fingerprint against identity,
   and against a mask_mod qkv cannot key (its plan built on every call);
4. ``auto``'s own cost on the causal window 256 (a named mask) at 1k-4k: ``auto`` against ``tiled`` named.

Times are medians of many calls taken in turns (the peers alternate), in microseconds or milliseconds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Hashable

import torch

import qkv
from qkv import masks as M
from qkv.backends.plan import PLANS, tile_plan
from qkv.fingerprint import fingerprint
from qkv.masks import Shape

document_id = torch.zeros(8192, dtype=torch.int32)


def document_causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """FlexAttention's documented idiom: the ids of the current batch read from a global."""
    return (q_idx >= kv_idx) & (document_id[q_idx] == document_id[kv_idx])


class _IdentityKeyed(M.Mask):
    """The key before issue 24: the function object (free, and stale once the ids change)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.inner = M.from_fn(fn)
        self.name = self.inner.name

    def evaluate(self, s: Shape, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.inner.evaluate(s, b, h, q, k)

    def cache_key(self) -> Hashable:
        return ("fn", self.inner.fn)  # type: ignore[attr-defined]


def turns(fns: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Median seconds of each function, called ``n`` times in turns."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(n):
        names = list(fns)
        names = names[i % len(names) :] + names[: i % len(names)]
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _unkeyable(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    _GEN.initial_seed()  # reads state held in C: qkv cannot key it, so its plan is built on every call
    return document_causal(b, h, q_idx, kv_idx)


_GEN = torch.Generator().manual_seed(0)


def whole_calls(L: int, H: int, reps: int) -> None:
    global document_id
    document_id = torch.arange(L, dtype=torch.int32) * 8 // L
    q, k, v = (torch.randn(1, H, L, 64) for _ in range(3))
    fp, ident, unk = M.from_fn(document_causal), _IdentityKeyed(document_causal), M.from_fn(_unkeyable)
    calls = {
        "fingerprint": lambda: qkv.attention(q, k, v, mask=fp),
        "identity": lambda: qkv.attention(q, k, v, mask=ident),
        "unkeyable": lambda: qkv.attention(q, k, v, mask=unk),
    }
    for f in calls.values():
        f()
    med = turns(calls, reps)
    picked = qkv.explain(q, k, v, mask=fp).backend
    print(
        f"   L={L}, H={H} (auto -> {picked}): fingerprint {med['fingerprint'] * 1e3:.2f}, identity (before)"
        f" {med['identity'] * 1e3:.2f} ({med['fingerprint'] / med['identity']:.3f}x),"
        f" unkeyable {med['unkeyable'] * 1e3:.2f} ({med['unkeyable'] / med['identity']:.2f}x)"
    )


def auto_cost(L: int, reps: int, choose_reps: int) -> None:
    from qkv.attention import _validate
    from qkv.backends.policy import resolve

    q, k, v = (torch.randn(1, 8, L, 64) for _ in range(3))
    mask = M.causal() & M.sliding_window(256)
    req, _ = _validate(q, k, v, mask, None, None, 0.0, False, {}, None)
    choice = turns({"auto": lambda: resolve(req, "auto"), "tiled": lambda: resolve(req, "tiled")}, choose_reps)
    calls = {
        "auto": lambda: qkv.attention(q, k, v, mask=mask),
        "tiled": lambda: qkv.attention(q, k, v, mask=mask, backend="tiled"),
    }
    for f in calls.values():
        f()
    med = turns(calls, reps)
    print(
        f"   L={L}: choice auto {choice['auto'] * 1e6:.0f} us, tiled named {choice['tiled'] * 1e6:.0f} us;"
        f" calls auto {med['auto'] * 1e3:.2f} ms, tiled {med['tiled'] * 1e3:.2f} ms"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    reps = 50 if args.quick else 400
    call_reps = 5 if args.quick else 31
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; python {platform.python_version()}")
    global document_id

    print("\n1. making the key (us; ids up to 64 KiB are kept as bytes and hashed by the lookup, larger ones digested):")
    print("   FlexAttention's document idiom (a global of int32 ids, causal) vs document(ids) & causal() (int64 ids)")
    for L in (1024, 8192, 65536):
        document_id = torch.arange(L, dtype=torch.int32) * 8 // L
        named = M.document(document_id.long()) & M.causal()
        med = turns({"fingerprint": lambda: fingerprint(document_causal), "named": named.cache_key}, reps)
        print(f"   L={L:6d}: fingerprint {med['fingerprint'] * 1e6:7.1f}   named document(ids) {med['named'] * 1e6:7.1f}")

    print("\n2. a cache hit of tile_plan (us): the key and the lookup")
    L = 8192
    document_id = torch.arange(L, dtype=torch.int32) * 8 // L
    shape = Shape(1, 4, L, L)
    fp, ident = M.from_fn(document_causal), _IdentityKeyed(document_causal)
    window, named = M.causal() & M.sliding_window(256), M.document(document_id.long()) & M.causal()
    for m in (fp, ident, window, named):
        tile_plan(m, shape, 256, 128)
    med = turns(
        {
            "fingerprint": lambda: tile_plan(fp, shape, 256, 128),
            "identity": lambda: tile_plan(ident, shape, 256, 128),
            "window": lambda: tile_plan(window, shape, 256, 128),
            "named": lambda: tile_plan(named, shape, 256, 128),
        },
        reps,
    )
    print(
        f"   L={L}: mask_mod by fingerprint {med['fingerprint'] * 1e6:.1f}, by identity (before) {med['identity'] * 1e6:.1f}"
        f" (+{(med['fingerprint'] - med['identity']) * 1e6:.1f}); named document(ids) {med['named'] * 1e6:.1f},"
        f" named window {med['window'] * 1e6:.1f}"
    )

    print("\n3. whole calls, auto, fp32, B=1, D=64 (ms): the document idiom keyed by fingerprint / identity / not at all")
    for L, H in ((1024, 8), (8192, 4)):
        whole_calls(L, H, call_reps)

    print("\n4. auto's own cost on the causal window 256, fp32, H=8, D=64: auto's choice alone (us), whole calls (ms)")
    for L in (1024, 2048, 4096):
        auto_cost(L, call_reps * 2, reps)
    print(f"\nPLANS: {PLANS.builds} builds, {PLANS.hits} hits, {PLANS.uncached} built for one call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a module pays for going through ``qkv.attention`` (validation, ``auto``'s choice) instead of calling
PyTorch's SDPA itself: a small ``qkv.nn.MultiHeadAttention`` forward, as it is, against the same module
with its attention call replaced by ``F.scaled_dot_product_attention`` (the peer: what the module's old
decoding fast path did), timed in turns in one run, medians.

    python benchmarks/bench_dispatch.py            # E=256, 8 heads, B=1, L = 16 .. 512
    python benchmarks/bench_dispatch.py --quick    # fewer calls per timing

Two cases per length ``L``: a causal forward over ``L`` tokens (``prefill``), and one decoding step that
attends to ``L`` cached keys (``decode``: the case where the module used to skip ``qkv.attention``). Both
in eval mode, under ``torch.no_grad()``. Three contenders: the module with ``backend="auto"`` (the
default: validation and ``auto``'s choice each call), the same module with ``backend="sdpa"`` named
(validation, no choice) and the peer. Each timing is the median over ``--repeats`` rounds of the mean of
``--calls`` calls; the ratios are over the peer's time.

A second table times the bare call of a decoding step, ``qkv.attention(q, k, v, mask=causal())`` with
``q (1, 8, 1, 32)`` against ``L`` keys, with ``auto``, ``sdpa`` and ``tiled`` named, against
``F.scaled_dot_product_attention(q, k, v)`` (one query sees every key: no mask), in turns likewise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import qkv
from qkv import masks as M
from qkv.nn import MultiHeadAttention
from qkv.nn.cache import KVCache


class _Direct(MultiHeadAttention):
    """The peer: the same module computing attention with one direct SDPA call (no validation, no choice)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        causal = kwargs.get("mask") is not None
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


class _Held(KVCache):
    """A cache that always holds the same ``L`` keys (the step's own key replaces the last one), so that
    every timed decoding step attends to exactly ``L`` keys."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        super().__init__()
        self.k, self.v = k, v
        self.seen = k.shape[2] - 1

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        self.k[:, :, -1:], self.v[:, :, -1:] = k, v
        return self.k, self.v, None


def _mean_s(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16,64,128,256,512")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    calls = 40 if args.quick else args.calls
    E, H = 256, 8
    torch.manual_seed(0)
    mod = MultiHeadAttention(E, H).eval()
    named = MultiHeadAttention(E, H).eval()
    named.load_state_dict(mod.state_dict())
    named.backend = "sdpa"
    peer = _Direct(E, H).eval()
    peer.load_state_dict(mod.state_dict())
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; MultiHeadAttention E={E} H={H} B=1")
    print(f"median of {args.repeats} rounds of {calls} calls each, in turns; ratios over direct SDPA\n")
    print("| case | L | direct SDPA (us) | module, auto (us) | ratio | module, sdpa named (us) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for L in (int(x) for x in args.lengths.split(",")):
            x = torch.randn(1, L, E)
            step = torch.randn(1, 1, E)
            k, v = torch.randn(1, H, L, E // H), torch.randn(1, H, L, E // H)
            held = [_Held(k.clone(), v.clone()) for _ in range(3)]
            cases: dict[str, dict[str, Callable[[], object]]] = {
                "prefill": {
                    "module": lambda x=x: mod(x, mask=M.causal()),
                    "named": lambda x=x: named(x, mask=M.causal()),
                    "direct": lambda x=x: peer(x, mask=M.causal()),
                },
                "decode": {
                    "module": lambda s=step, c=held[0]: mod(s, mask=M.causal(), cache=c),
                    "named": lambda s=step, c=held[2]: named(s, mask=M.causal(), cache=c),
                    "direct": lambda s=step, c=held[1]: peer(s, mask=None, cache=c),
                },
            }
            for case, fns in cases.items():
                got = {name: fn() for name, fn in fns.items()}  # warm-up; both compute the same thing
                for name in ("module", "named"):
                    torch.testing.assert_close(got[name], got["direct"], atol=1e-5, rtol=1e-4)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        times[name].append(_mean_s(fn, calls))
                a, n, b = (statistics.median(times[name]) * 1e6 for name in ("module", "named", "direct"))
                print(f"| {case} | {L} | {b:.1f} | {a:.1f} | {a / b:.2f} | {n:.1f} | {n / b:.2f} |", flush=True)
    print("\nthe bare call of a decoding step, q (1, 8, 1, 32), mask=causal(); ratios over F.sdpa(q, k, v)\n")
    print("| L | F.sdpa (us) | auto (us) | ratio | sdpa named (us) | ratio | tiled named (us) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for L in (int(x) for x in args.lengths.split(",")):
            q, k, v = torch.randn(1, 8, 1, 32), torch.randn(1, 8, L, 32), torch.randn(1, 8, L, 32)
            calls_: dict[str, Callable[[], object]] = {
                "direct": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                "auto": lambda q=q, k=k, v=v: qkv.attention(q, k, v, mask=M.causal()),
                "sdpa": lambda q=q, k=k, v=v: qkv.attention(q, k, v, mask=M.causal(), backend="sdpa"),
                "tiled": lambda q=q, k=k, v=v: qkv.attention(q, k, v, mask=M.causal(), backend="tiled"),
            }
            ref = calls_["direct"]()
            for fn in calls_.values():  # warm-up; all compute the same thing
                torch.testing.assert_close(fn(), ref, atol=1e-5, rtol=1e-4)
            times = {name: [] for name in calls_}
            for _ in range(args.repeats):
                for name, fn in calls_.items():
                    times[name].append(_mean_s(fn, calls))
            d, a, n, t = (statistics.median(times[name]) * 1e6 for name in ("direct", "auto", "sdpa", "tiled"))
            print(f"| {L} | {d:.1f} | {a:.1f} | {a / d:.2f} | {n:.1f} | {n / d:.2f} | {t:.1f} | {t / d:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""The CPU target of the ``flex`` backend (qkv's overhead over raw FlexAttention), as ratios from one run,
printed met / not met.

    nice -n -19 python benchmarks/bench_flex.py            # ~2-4 min on 2 cores (4 compiles of ~20 s)
    python benchmarks/bench_flex.py --L 2048 --repeats 3   # smaller

Causal sliding window 256 at 8k, H=4, B=1, D=64, fp32 and bf16, forward (inference). Peers, timed
interleaved (one call of each per round, medians over the rounds):

* ``raw flex``: ``torch.compile(flex_attention)`` with a ``BlockMask`` from ``create_block_mask`` on a
  hand-written ``mask_mod`` (what a user of FlexAttention writes);
* ``qkv flex``: ``qkv.attention(..., mask=causal() & sliding_window(256), backend="flex")``, warm;
* ``qkv auto``: the same with ``backend="auto"`` after ``qkv.backends.flex.allow_compile(True)``;
* ``tiled``: ``backend="tiled"``, for scale.

Target: qkv flex within 1.1x of raw flex (qkv's overhead: validation, dispatch, the cached plan).
Compile times and the useful work's rate (GFLOP/s over the window's unmasked pairs) are printed apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import qkv
from qkv import masks as M
from qkv.backends import flex as FX


def _load() -> str:
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not Unix
        return "load average unknown"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return "unknown CPU"


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, timed one call of each per round (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def _peers(q: Any, k: Any, v: Any, raw_fa: Any, hand: Any, mask: M.Mask) -> dict[str, Callable[[], Any]]:
    return {
        "raw flex": lambda: raw_fa(q, k, v, block_mask=hand),
        "qkv flex": lambda: qkv.attention(q, k, v, mask=mask, backend="flex"),
        "qkv auto": lambda: qkv.attention(q, k, v, mask=mask),
        "tiled": lambda: qkv.attention(q, k, v, mask=mask, backend="tiled"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--L", type=int, default=8192)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    args = p.parse_args()
    L, H, D, W = args.L, args.H, args.D, args.window
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {_cpu()}, {_load()}, niceness {os.nice(0)}\n"
        f"causal sliding window {W}, L={L}, H={H}, B=1, D={D}, forward; median of {args.repeats} interleaved rounds\n"
    )
    pairs = sum(min(i, W) + 1 for i in range(L))  # unmasked (query, key) pairs per head
    useful = 2.0 * H * pairs * 2 * D  # QK^T and PV
    FX.allow_compile(True)
    raw_fa = torch.compile(flex_attention)

    def window_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)

    hand = create_block_mask(window_mod, None, None, L, L, device="cpu")
    mask = M.causal() & M.sliding_window(W)
    results: list[tuple[str, float, bool | None]] = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, L, D, generator=g).to(dtype) for _ in range(3))
        fns = _peers(q, k, v, raw_fa, hand, mask)
        for name in ("raw flex", "qkv flex"):
            t0 = time.perf_counter()
            with torch.no_grad():
                fns[name]()
            print(f"  {dtype}: {name} first call (compile) {time.perf_counter() - t0:.1f} s", flush=True)
        picked = qkv.explain(q, k, v, mask=mask).backend
        compiles = FX.STATS.compiles
        with torch.no_grad():
            med = interleaved(fns, args.repeats)
            err = (fns["qkv flex"]() - fns["raw flex"]()).abs().max().item()
        assert FX.STATS.compiles == compiles, "a warm call compiled again"
        print(f"  {dtype}: auto picks {picked}; max |qkv flex - raw flex| = {err:.2g}")
        for name, s in med.items():
            print(f"    {name:9s} {s * 1e3:8.2f} ms  {useful / s / 1e9:6.1f} GFLOP/s useful")
        ratio = med["qkv flex"] / med["raw flex"]
        results.append((f"{dtype} qkv flex within 1.1x of raw flex", ratio, ratio <= 1.1))
        results.append(
            (f"{dtype} qkv auto (opted in) within 1.1x of raw flex", med["qkv auto"] / med["raw flex"], None)
        )
        print(flush=True)
    for name, r, ok in results:
        status = "info   " if ok is None else ("met    " if ok else "NOT MET")
        print(f"{status}  {name}: {r:.3f}x")
    print(f"\n{_load()} at the end; other jobs were running on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

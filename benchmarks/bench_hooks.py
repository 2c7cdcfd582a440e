"""What the hook points of ``qkv.nn`` cost: a GPT forward pass with no hook, with a hook that reads each
layer's per-head output, one that reads the weights, one that replaces them (uniform over the causal keys)
and one that reads the scores, as ratios against the pass with no hook, measured in the same run.

    python benchmarks/bench_hooks.py            # d=256, 4 layers, 8 heads, batch 2, 512 tokens
    python benchmarks/bench_hooks.py --quick    # 128 tokens

The cases are timed in turns (each repeat runs every case once), and each figure is the median of the
repeats. With no hook the layers call their backend (``auto``) as if there were no hook points.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from qkv.models import GPT
from qkv.nn import hooked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="128 tokens, 3 repeats")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    L = 128 if args.quick else args.tokens
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)
    model = GPT(1000, 256, 4, 8, max_len=L).eval()
    idx = torch.randint(0, 1000, (2, L))
    allowed = torch.ones(L, L).tril()
    uniform = allowed / allowed.sum(-1, keepdim=True)

    cases: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "no hook": nullcontext,
        "read hook_heads": lambda: hooked(model, ("*.hook_heads", lambda t, n: None)),
        "read hook_weights": lambda: hooked(model, ("*.hook_weights", lambda t, n: None)),
        "replace hook_weights": lambda: hooked(model, ("*.hook_weights", lambda t, n: uniform.expand_as(t))),
        "read hook_scores": lambda: hooked(model, ("*.hook_scores", lambda t, n: None)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, ctx in cases.items():
                with ctx():
                    t0 = time.perf_counter()
                    model(idx)
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["no hook"][1:])
    print(f"GPT d=256, 4 layers, 8 heads, B=2, L={L}; median of {repeats}, torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        ms = statistics.median(ts[1:]) * 1e3
        print(f"  {name:<22} {ms:8.1f} ms   {ms / 1e3 / base:5.2f}x the pass with no hook")


if __name__ == "__main__":
    main()

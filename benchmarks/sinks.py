"""What attention sinks (``qkv.attention(..., sinks=s)``) cost on each backend that takes them: each
backend's median with sinks over its own median without, measured interleaved in one run, forward and
forward+backward (with the sinks' gradient), and which backend ``auto`` picks.

    python benchmarks/sinks.py            # L=2048, H=8, Hkv=2, D=64, fp32
    python benchmarks/sinks.py --quick    # L=512

The backends are read from the registry: every one that takes sinks (``takes_sinks``), is available and
may be picked by ``auto`` (``tiled`` corrects its output by the logsumexp, no extra key; ``sdpa`` adds the
sink as a key with a padded head dim; ``reference`` concatenates a column to its score matrix; a backend
added with ``qkv.backends.register`` too). A backend that declines a case says why; one whose own estimate
exceeds ``--max-estimate-s`` is left out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

import qkv
from qkv import masks as M


def median_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: M.Mask | None,
    backend: str,
    grad: bool,
    sinks: torch.Tensor | None,
) -> None:
    with torch.set_grad_enabled(grad):
        out = qkv.attention(q, k, v, mask=mask, sinks=sinks, backend=backend)
        if grad:
            out.sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-estimate-s", type=float, default=2.0, help="leave out a backend estimated slower")
    args = ap.parse_args()
    names = [n for n, b in qkv.backends.registered().items() if b.takes_sinks and b.automatic and b.available()]
    L = 512 if args.quick else args.length
    H, Hkv, D = args.heads, args.kv_heads, 64
    torch.manual_seed(0)
    q, k, v = torch.randn(1, H, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)
    s = torch.randn(H)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 B=1 H={H} Hkv={Hkv} L={L} D={D}")
    print("| mask | backend | pass | without sinks | with sinks | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for mname, mask in (
        ("none", None),
        ("causal", M.causal()),
        ("causal window 256", M.causal() & M.sliding_window(256)),
    ):
        for backend in names:
            for mode in ("fwd", "fwd+bwd"):
                grad = mode != "fwd"
                qq, kk, vv, ss = (t.clone().requires_grad_(grad) for t in (q, k, v, s))
                e = qkv.explain(qq, kk, vv, mask=mask, sinks=ss)
                if backend not in e.costs or e.costs[backend] > args.max_estimate_s:
                    why = e.declined.get(backend) or f"estimated {e.costs[backend]:.1f} s"
                    print(f"| {mname} | {backend} | {mode} | left out: {why} | | |", flush=True)
                    continue
                run = partial(step, qq, kk, vv, mask, backend, grad)
                run(None), run(ss)  # warm-up
                a, b = [], []
                for _ in range(args.repeats):  # interleaved, so that load hits both alike
                    a += median_ms(partial(run, None), 1)
                    b += median_ms(partial(run, ss), 1)
                ma, mb = statistics.median(a), statistics.median(b)
                print(f"| {mname} | {backend} | {mode} | {ma:.1f} ms | {mb:.1f} ms | {mb / ma:.2f}x |", flush=True)
        e = qkv.explain(q, k, v, mask=mask, sinks=s)
        print(f"|  | auto picks {e.backend} | | | | |")


if __name__ == "__main__":
    main()

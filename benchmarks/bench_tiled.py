"""The targets of the ``tiled`` backend (issue 3), each as a ratio from one run, printed met / not met.

    python benchmarks/bench_tiled.py             # about 2-3 minutes on 2 cores (FlexAttention compile ~1 min)
    python benchmarks/bench_tiled.py --no-flex   # skip the FlexAttention comparison

fp32, B=1, D=64. Times are medians (``qkv.apps.bench.time_median``); "x" figures are the peer's median over
tiled's median in the same run (> 1 = tiled faster). Memory is the peak growth of resident memory
during one call (``qkv.apps.bench.peak_memory``).
"""

from __future__ import annotations

import argparse
import time

import torch

from qkv.apps.bench import compare, measure


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    reps = args.repeats
    rows: list[tuple[str, str, bool]] = []

    def speed(kind: str, L: int, H: int, mode: str, peer: str = "sdpa") -> tuple[float, float, float]:
        t, s = compare(("tiled", peer), kind, L, H, mode, repeats=reps, max_call_s=1e9, memory=False)
        assert t.ms and s.ms, (t.note, s.note)
        return s.ms / t.ms, t.ms, s.ms

    def add(name: str, figure: str, ok: bool) -> None:
        rows.append((name, figure, ok))
        print(f"{'met    ' if ok else 'NOT MET'}  {name}: {figure}", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 B=1 D=64, median of {reps}\n")
    for kind in ("dense", "causal"):
        r, t, s = speed(kind, 4096, 8, "fwd")
        add(f"{kind} fwd 4k H=8 >= 0.9x SDPA", f"{r:.2f}x (tiled {t:.0f} ms, SDPA {s:.0f} ms)", r >= 0.9)
    r, t, s = speed("sliding_window(256)", 8192, 4, "fwd")
    add(
        "causal sliding window 256, 8k, H=4: >= 20x SDPA (bool mask)",
        f"{r:.1f}x (tiled {t:.1f} ms, SDPA {s:.0f} ms)",
        r >= 20,
    )
    if not args.no_flex:
        t0 = time.perf_counter()
        tt, f = compare(
            ("tiled", "flex"), "sliding_window(256)", 8192, 4, "fwd", repeats=reps, max_call_s=1e9, memory=False
        )
        assert f.ms and tt.ms
        add(
            "same, faster than compiled FlexAttention (compile excluded)",
            f"{f.ms / tt.ms:.2f}x (tiled {tt.ms:.1f} ms, flex {f.ms:.1f} ms; flex compile"
            f" {f.extra['compile_s']:.0f} s, all {time.perf_counter() - t0:.0f} s)",
            f.ms > tt.ms,
        )
    r, t, s = speed("document(8)", 8192, 8, "fwd")
    add(
        "document mask, 8 docs in 8k, H=8: >= 5x SDPA (bool mask)",
        f"{r:.1f}x (tiled {t:.0f} ms, SDPA {s:.0f} ms)",
        r >= 5,
    )
    r, t, s = speed("causal", 2048, 8, "fwd+bwd")
    add("causal fwd+bwd 2k, H=8: >= 0.7x SDPA", f"{r:.2f}x (tiled {t:.0f} ms, SDPA {s:.0f} ms)", r >= 0.7)
    for mode in ("fwd", "fwd+bwd"):
        m = measure("tiled", "causal", 32768, 1, mode, repeats=1, max_call_s=1e9)
        assert m.mb is not None, "peak memory needs a writable /proc/self/clear_refs"
        add(f"peak extra memory, causal 32k, H=1, {mode}: < 100 MB", f"{m.mb:.0f} MB ({m.ms:.0f} ms)", m.mb < 100)
    m = measure("tiled", "sliding_window(1024)", 131072, 1, "fwd+bwd", repeats=1, max_call_s=1e9)
    L = 131072
    add(
        "128k tokens, H=1, causal sliding window 1024, fwd+bwd completes",
        f"{m.ms / 1000:.1f} s, peak extra {m.mb:.0f} MB (SDPA would need a {L * L / 2**30:.0f} GiB bool mask)",
        m.ms is not None,
    )
    print(f"\n{sum(ok for *_, ok in rows)} of {len(rows)} targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

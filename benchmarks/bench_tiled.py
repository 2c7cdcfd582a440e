"""The speed and memory targets of the ``tiled`` backend against SDPA and compiled FlexAttention, in
float32 and bfloat16, each as a ratio from one run, printed met / not met.

    python benchmarks/bench_tiled.py                     # fp32 and bf16; ~5 minutes on 2 cores (Flex compiles)
    python benchmarks/bench_tiled.py --dtypes bfloat16   # one dtype
    python benchmarks/bench_tiled.py --no-flex           # skip the FlexAttention comparisons

B=1, D=64. Times are medians with the peers timed in turns (``qkv.apps.bench.compare``); "x" figures are
the peer's median over tiled's median in the same run (> 1 = tiled faster). "% peak" is tiled's rate
on the work the mask leaves against this machine's matmul rate in the same dtype, measured at the start
(``qkv.apps.bench.matmul_peak``). Memory is the peak growth of resident memory during one call
(``qkv.apps.bench.peak_memory``).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from qkv.apps.bench import DTYPES, compare, matmul_peak, measure

#: per dtype: (dense and causal fwd 4k vs SDPA, window vs compiled Flex, causal fwd+bwd 2k vs SDPA)
TARGETS = {"float32": (0.9, 1.2, 0.7), "bfloat16": (0.95, 0.8, 0.9), "float16": (0.95, 0.8, 0.9)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    args = p.parse_args()
    reps = args.repeats
    rows: list[tuple[str, str, bool]] = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    amx = "amx_bf16" in flags
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu} ({platform.machine()}),"
        f" {'with' if amx else 'no'} AMX, {'with' if 'avx512_bf16' in flags else 'no'} avx512_bf16;"
        f" B=1 D=64, median of {reps}"
    )

    def add(name: str, figure: str, ok: bool) -> None:
        rows.append((name, figure, ok))
        print(f"{'met    ' if ok else 'NOT MET'}  {name}: {figure}", flush=True)

    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        peak = matmul_peak(dtype)
        fwd_t, flex_t, train_t = TARGETS[dname]
        print(f"\n{dname}: matmul peak {peak / 1e9:.1f} GFLOP/s (measured now)", flush=True)

        def speed(
            kind: str, L: int, H: int, mode: str, peer: str = "sdpa", dtype: torch.dtype = dtype, peak: float = peak
        ) -> tuple[float, str]:
            t, s = compare(
                ("tiled", peer), kind, L, H, mode, repeats=reps, max_call_s=1e9, memory=False, dtype=dtype, peak=peak
            )
            assert t.ms and s.ms, (t.note, s.note)
            fig = f"tiled {t.ms:.1f} ms ({t.extra['peak']:.0%} peak), {peer} {s.ms:.1f} ms ({s.extra['peak']:.0%})"
            if peer == "flex":
                fig += f"; flex compile {s.extra['compile_s']:.0f} s"
            return s.ms / t.ms, fig

        for kind in ("dense", "causal"):
            r, fig = speed(kind, 4096, 8, "fwd")
            add(f"{dname} {kind} fwd 4k H=8 >= {fwd_t}x SDPA", f"{r:.2f}x ({fig})", r >= fwd_t)
        r, fig = speed("sliding_window(256)", 8192, 4, "fwd")
        add(f"{dname} causal sliding window 256, 8k, H=4: >= 20x SDPA (bool mask)", f"{r:.1f}x ({fig})", r >= 20)
        if not args.no_flex:
            t0 = time.perf_counter()
            r, fig = speed("sliding_window(256)", 8192, 4, "fwd", peer="flex")
            add(
                f"{dname} same, >= {flex_t}x compiled FlexAttention (compile excluded)",
                f"{r:.2f}x ({fig}; all {time.perf_counter() - t0:.0f} s)",
                r >= flex_t,
            )
        r, fig = speed("document(8)", 8192, 8, "fwd")
        add(f"{dname} document mask, 8 docs in 8k, H=8: >= 5x SDPA (bool mask)", f"{r:.1f}x ({fig})", r >= 5)
        r, fig = speed("causal", 2048, 8, "fwd+bwd")
        add(f"{dname} causal fwd+bwd 2k, H=8: >= {train_t}x SDPA", f"{r:.2f}x ({fig})", r >= train_t)
        if dname != "float32":
            continue
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

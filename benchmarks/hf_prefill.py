"""Hugging Face models on ``attn_implementation="qkv"`` against transformers' own implementations.

    nice -n -19 python benchmarks/hf_prefill.py             # about 2 minutes on 2 idle cores
    OMP_WAIT_POLICY=PASSIVE nice -n -19 python benchmarks/hf_prefill.py    # on a machine shared with other jobs
    nice -n -19 python benchmarks/hf_prefill.py --threads 1

On a machine busier than its cores, OpenMP threads that spin at their barriers (the default) lose their turn to
other jobs and every parallel op waits for them: one big call (SDPA over a dense mask) hardly notices, a kernel
made of many small calls (``tiled``'s spans and merges) slows down many times. ``OMP_WAIT_POLICY=PASSIVE`` or one
thread removes that artefact; the header says which was used.

1. Prefill of a tiny-width Mistral-shaped random model (d=256, 2 layers, 4 query heads and 2 K/V heads of 64,
   sliding window 256), an 8k-token prompt, fp32, CPU, batch 1: "qkv" against "sdpa", the forward of the
   prompt with the default cache, end to end. Target: "qkv" >= 3x "sdpa".
2. ``output_attentions=True`` at 2k tokens on the same model: "qkv" (qkv's weights for every head, recomputed
   tile by tile from the logsumexp) against "eager" (the only transformers implementation that returns them).

Times are medians over interleaved repeats (one call of each implementation in turn, so both see the same
load); ratios are from this run. Memory is the peak growth of resident memory during one call
(``peak_memory``: VmHWM after ``malloc_trim``), everything the call allocates (the mask, the weights, the
cache), not the model or the inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import MistralConfig, MistralForCausalLM

import qkv.hf

try:  # the bench helpers move under qkv.apps
    from qkv.apps.bench import peak_memory
except ImportError:
    from qkv.bench import peak_memory


def model(window: int, max_len: int) -> MistralForCausalLM:
    cfg = MistralConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=window,
        max_position_embeddings=max_len,
    )
    torch.manual_seed(0)
    return MistralForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turns (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192, help="prompt tokens of the prefill (default 8192)")
    p.add_argument("--weights-length", type=int, default=2048, help="tokens of the output_attentions case")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's). On a machine busier than its cores, 1 thread: OpenMP's barriers"
        " then cost many small calls (tiled's) far more than one big one (SDPA's)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qkv.hf.register()
    m = model(args.window, max(args.length, args.weights_length) + 16)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {load[0]:.1f} at start;"
        f" Mistral-shaped d=256, 2 layers, H=4, Hkv=2, head 64, window {args.window}, fp32, B=1\n"
    )

    def run(impl: str, ids: torch.Tensor, **kw: Any) -> Callable[[], Any]:
        def fn() -> Any:
            m.set_attn_implementation(impl)
            with torch.no_grad():
                return m(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)

        return fn

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (1, args.length), generator=g)
    fns = {impl: run(impl, ids) for impl in ("sdpa", "qkv")}
    with torch.no_grad():
        a, b = fns["sdpa"]().logits, fns["qkv"]().logits
    diff = (a - b).abs().max().item()
    t = interleaved(fns, args.repeats)
    mem = {k: peak_memory(fn) for k, fn in fns.items()}
    r = t["sdpa"] / t["qkv"]
    print(
        f"prefill {args.length} tokens: qkv {t['qkv'] * 1e3:.0f} ms, sdpa {t['sdpa'] * 1e3:.0f} ms -> {r:.2f}x"
        f" ({'met' if r >= 3 else 'NOT MET'}: target >= 3x); peak memory qkv {_mb(mem['qkv'])},"
        f" sdpa {_mb(mem['sdpa'])}; max |logit difference| {diff:.2g}"
    )

    ids = torch.randint(0, 1000, (1, args.weights_length), generator=g)
    fns = {impl: run(impl, ids, output_attentions=True) for impl in ("eager", "qkv")}
    with torch.no_grad():
        wa, wb = fns["eager"]().attentions, fns["qkv"]().attentions
    wdiff = max((x - y).abs().max().item() for x, y in zip(wa, wb))
    assert all(w.shape == (1, 4, args.weights_length, args.weights_length) for w in wb)
    t = interleaved(fns, args.repeats)
    mem = {k: peak_memory(fn) for k, fn in fns.items()}
    print(
        f"output_attentions=True, {args.weights_length} tokens, weights of all 4 heads x 2 layers:"
        f" qkv {t['qkv'] * 1e3:.0f} ms, eager {t['eager'] * 1e3:.0f} ms -> {t['eager'] / t['qkv']:.2f}x;"
        f" peak memory qkv {_mb(mem['qkv'])}, eager {_mb(mem['eager'])}; max |weight difference| {wdiff:.2g}"
    )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

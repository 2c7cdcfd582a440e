"""GPT decoding speed on this CPU: qkv's GPT with and without its KV cache, against Hugging Face's
GPT2LMHeadModel of the same size (random weights, ``use_cache=True``), measured in the same run.

    python benchmarks/bench_decode.py            # 512 new tokens, batch 1
    python benchmarks/bench_decode.py --quick    # 64 new tokens

Greedy decoding from an 8-token prompt; each timing is the median of ``--repeats`` runs. Prints
tokens per second and the ratio qkv (cached) / Hugging Face.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qkv.models import GPT


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="64 new tokens, fewer repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--uncached-tokens", type=int, default=128, help="new tokens for the (slow) uncached run")
    args = ap.parse_args()
    n_new = 64 if args.quick else args.new_tokens
    repeats = 1 if args.quick else args.repeats
    n_uncached = min(n_new, args.uncached_tokens)
    torch.manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, 8))
    max_len = 8 + n_new

    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max_len,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        attn_implementation="sdpa",
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    ours = GPT(args.vocab, args.d_model, args.layers, args.heads, max_len=max_len, pos="learned").eval()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())

    def run_hf(n: int) -> None:
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    def run_ours(n: int, cache: bool) -> None:
        ours.generate(prompt, n, temperature=0.0, use_cache=cache)

    run_hf(8), run_ours(8, True), run_ours(8, False)  # warm up
    # interleave the contenders so that a change in machine load hits all of them alike
    runs: dict[str, list[float]] = {"hf": [], "ours": [], "unc": []}
    for _ in range(repeats):
        runs["hf"].append(_time(lambda: run_hf(n_new)))
        runs["ours"].append(_time(lambda: run_ours(n_new, True)))
        runs["unc"].append(_time(lambda: run_ours(n_uncached, False)))
    t_hf, t_ours, t_unc = (statistics.median(runs[k]) for k in ("hf", "ours", "unc"))
    print(
        f"GPT d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab}, batch 1, prompt 8,"
        f" greedy; params qkv {n_ours / 1e6:.2f}M, HF {n_hf / 1e6:.2f}M; torch threads {torch.get_num_threads()}"
    )
    print(f"{'model':<34}{'new tokens':>11}{'tokens/s':>12}")
    print(f"{'qkv GPT, fixed KV cache':<34}{n_new:>11}{n_new / t_ours:>12.1f}")
    print(f"{'qkv GPT, no cache (recompute)':<34}{n_uncached:>11}{n_uncached / t_unc:>12.1f}")
    print(f"{'HF GPT2LMHeadModel, use_cache':<34}{n_new:>11}{n_new / t_hf:>12.1f}")
    print(f"ratio qkv cached / HF: {t_hf / t_ours:.2f}x (target >= 1.2x)")


if __name__ == "__main__":
    main()

"""Decoding-cache bytes per token for multi-head (MHA), grouped-query (GQA), multi-query (MQA) and
multi-head latent attention (MLA, DeepSeek-V2) at the same model width, read from the caches the
modules fill while decoding (not from a formula), and the paper-size figures by formula beside them.

    python benchmarks/kv_cache_bytes.py                  # width 512, 8 heads of 64
    python benchmarks/kv_cache_bytes.py --width 1024 --heads 16

MLA's latent is ``kv_latent_dim = 4 * head_dim`` and its RoPE key ``head_dim / 2`` wide, DeepSeek-V2's
ratios. Bytes are per token, per layer, per sequence.
"""

from __future__ import annotations

import argparse

import torch

from qkv.masks import causal
from qkv.nn import FixedKVCache, LatentAttention, LatentKVCache, MultiHeadAttention


def measured(width: int, heads: int, tokens: int, dtype: torch.dtype) -> dict[str, int]:
    d = width // heads
    x = torch.randn(1, tokens, width, dtype=dtype)
    out: dict[str, int] = {}
    with torch.no_grad():
        for name, kv in (("MHA", heads), ("GQA", max(1, heads // 4)), ("MQA", 1)):
            m = MultiHeadAttention(width, heads, num_kv_heads=kv).to(dtype).eval()
            c = FixedKVCache(tokens)
            m(x, mask=causal(), cache=c)
            assert c.k is not None and c.v is not None
            out[f"{name} ({kv} kv head{'s' if kv > 1 else ''} of {d})"] = (c.k.nbytes + c.v.nbytes) // tokens
        mla = LatentAttention(width, heads, kv_latent_dim=4 * d, rope_dim=d // 2).to(dtype).eval()
        lc = LatentKVCache(tokens)
        mla(x, mask=causal(), cache=lc)
        out[f"MLA (latent {4 * d} + RoPE key {d // 2})"] = lc.nbytes_per_token()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    f32 = measured(args.width, args.heads, args.tokens, torch.float32)
    b16 = measured(args.width, args.heads, args.tokens, torch.bfloat16)
    mha = next(iter(f32.values()))
    print(
        f"width {args.width}, {args.heads} heads: cache bytes per token per layer, measured after {args.tokens} tokens"
    )
    print("| attention | fp32 | bf16 | vs MHA |")
    print("|---|---:|---:|---:|")
    for name, b in f32.items():
        print(
            f"| {name} | {b} | {b16[name]} | {mha / b:.1f}x smaller |"
            if b != mha
            else f"| {name} | {b} | {b16[name]} | 1x |"
        )
    # DeepSeek-V2 (section 2.1, table 1): 128 heads of 128, d_c = 512, d_R = 64, bf16; by formula
    h, d, dc, dr = 128, 128, 512, 64
    print("\nDeepSeek-V2's size by formula (128 heads of 128, d_c 512, d_R 64; elements per token per layer):")
    print(
        f"  MHA {2 * h * d}, GQA with 8 groups {2 * 8 * d}, MQA {2 * d}, MLA {dc + dr}"
        f" ({2 * h * d / (dc + dr):.1f}x fewer than MHA)"
    )


if __name__ == "__main__":
    main()

"""StreamingLLM (Xiao et al. 2023) on the ``lm`` task's byte-level GPT: bits per byte over a text much
longer than the training context, decoded token by token with

(a) a plain window cache (the ``window`` most recent tokens),
(b) window plus attention sinks (the first ``sinks`` tokens kept, then the most recent
    ``window - sinks``; same cache size as (a)), RoPE at in-cache positions as StreamingLLM does,
(b') the same cache with every key at its original position,
(c) the full cache (every token; RoPE far beyond the lengths seen in training).

    python benchmarks/streaming.py                 # 8k bytes x 4 streams
    python benchmarks/streaming.py --quick         # 1k bytes x 2 streams

The model is the one ``qkv train lm`` trains (``qkv.apps.tasks.lm.train``, context 128). It is trained once
and kept as safetensors under ``--ckpt`` (default ``bench-out/streaming/lm.safetensors``); later runs
load it. Prints a table and writes ``--out`` (a PNG of bits/byte against position).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import torch
from torch import Tensor

from qkv.models import GPT

CTX = 128
"""The ``lm`` task's training context (``qkv.apps.tasks.lm.train``, full config)."""


def load_or_train(path: str) -> GPT:
    """The ``lm`` task's model: loaded from ``path`` (safetensors) or trained now and saved there."""
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            cfg = json.loads(f.metadata()["config"])
        model = GPT(**cfg)
        load_model(model, path)
        return model.eval()
    from qkv.apps.tasks.lm import train

    t0 = time.perf_counter()
    result = train(progress=True)
    model = result.model
    assert isinstance(model, GPT)
    cfg = {
        "vocab_size": model.vocab_size,
        "d_model": model.d_model,
        "n_layers": len(model.blocks),
        "n_heads": model.blocks[0].mixer.num_heads,
        "max_len": model.max_len,
        "pos": model.pos,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_model(
        model,
        path,
        metadata={
            "config": json.dumps(cfg),
            "bits_per_byte": f"{result.metric:.4f}",
            "seconds": f"{time.perf_counter() - t0:.0f}",
        },
    )
    return model.eval()


@torch.no_grad()
def stream_bits(model: GPT, ids: Tensor, cache: Any) -> Tensor:
    """Bits of each next byte ``(B, T - 1)``, decoding ``ids (B, T)`` token by token through ``cache``
    (the first tokens, up to the cache's capacity, in one call: identical, since nothing is evicted)."""
    first = min(getattr(cache.layers[0], "capacity", CTX), CTX, ids.shape[1] - 1)
    logits = [model(ids[:, :first], cache=cache)]
    for t in range(first, ids.shape[1] - 1):
        logits.append(model(ids[:, t : t + 1], cache=cache))
    lp = torch.log_softmax(torch.cat(logits, 1).float(), -1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1) / math.log(2)


@torch.no_grad()
def recompute_bits(model: GPT, ids: Tensor, window: int, stride: int) -> tuple[Tensor, Tensor]:
    """The sliding window with re-computation (StreamingLLM's quality reference): byte ``t + 1`` predicted
    from a fresh forward pass over the ``window`` bytes ending at ``t``, for every ``stride``-th ``t``.
    Returns the positions ``t`` and the bits ``(B, len(t))``."""
    ts = torch.arange(window - 1, ids.shape[1] - 1, stride)
    out = []
    for chunk in ts.split(64):
        x = torch.stack([ids[:, t - window + 1 : t + 1] for t in chunk.tolist()], 1)  # (B, n, window)
        B, n, _ = x.shape
        lp = torch.log_softmax(model(x.reshape(B * n, window), last_only=True)[:, -1].float(), -1).view(B, n, -1)
        tgt = torch.stack([ids[:, t + 1] for t in chunk.tolist()], 1)
        out.append(-lp.gather(-1, tgt[..., None]).squeeze(-1) / math.log(2))
    return ts, torch.cat(out, 1)


def sink_rate_of(model: GPT, ids: Tensor) -> tuple[float, Tensor]:
    """Gu et al.'s sink rate of ``model`` on windows of the training length, and each head's mean
    attention to the first token ``(layers, H)``."""
    from qkv.analysis import capture, sink_rate, sink_scores

    maps = capture(model, ids[:, :CTX])
    return sink_rate(maps), sink_scores(maps)


def plot(curves: dict[str, Tensor], path: str, smooth: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, bits) in enumerate(curves.items()):
        m = bits.mean(0)
        k = torch.ones(1, 1, smooth) / smooth
        sm = torch.nn.functional.conv1d(m.view(1, 1, -1), k).view(-1)
        style = {"ls": "--", "zorder": 5} if i == 0 else {}  # (a) dashed on top: (b) may lie under it
        ax.plot(torch.arange(sm.numel()) + smooth, sm.numpy(), label=name, lw=1.4, **style)
    ax.axvline(CTX, color="gray", ls="--", lw=0.8)
    ax.text(CTX, ax.get_ylim()[1], " training context", va="top", fontsize=8, color="gray")
    ax.set_xlabel("position in the stream (bytes)")
    ax.set_ylabel(f"bits/byte (mean of {smooth} bytes)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="bench-out/streaming/lm.safetensors")
    ap.add_argument("--out", default="bench-out/streaming/streaming.png")
    ap.add_argument("--length", type=int, default=8192, help="bytes per stream")
    ap.add_argument("--streams", type=int, default=4, help="streams decoded side by side (a batch)")
    ap.add_argument("--cache", type=int, default=CTX, help="tokens kept by the window caches (a), (b)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--stride", type=int, default=16, help="every how many positions (d) is evaluated")
    ap.add_argument("--quick", action="store_true", help="1024 bytes x 2 streams")
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args()
    model = load_or_train(args.ckpt)
    if args.train_only:
        print(f"model ready at {args.ckpt}: {sum(p.numel() for p in model.parameters()):,} parameters")
        return
    if args.quick:
        args.length, args.streams = 1024, 2
    from qkv.apps.tasks.lm import load_stdlib_text

    _, val = load_stdlib_text(3_000_000, 0)  # the lm task's held-out files
    data = torch.tensor(list(val), dtype=torch.long)
    step = (len(data) - args.length) // max(1, args.streams)
    ids = torch.stack([data[i * step : i * step + args.length] for i in range(args.streams)])
    W, n = args.cache, args.sinks
    configs: dict[str, dict[str, Any]] = {
        f"(a) window {W}": {"recent": W, "sinks": 0},
        f"(b) {n} sinks + window {W - n}": {"recent": W - n, "sinks": n},
        "(b') same, original positions": {"recent": W - n, "sinks": n, "positions": "original"},
        "(c) full cache": {},
    }
    bits: dict[str, Tensor] = {}
    secs: dict[str, float] = {}
    for name, kw in configs.items():
        t0 = time.perf_counter()
        bits[name] = stream_bits(model, ids, model.make_cache(args.length, **kw))
        secs[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ts, rec = recompute_bits(model, ids, W, args.stride)
    secs["(d)"] = time.perf_counter() - t0
    rate, alpha = sink_rate_of(model, ids)

    T = ids.shape[1] - 1
    tail = slice(T - T // 4, T)
    print(
        f"lm model ({sum(p.numel() for p in model.parameters()):,} parameters, trained on {CTX}-byte windows);"
        f" {args.streams} held-out streams of {args.length} bytes, decoded byte by byte"
    )
    print(
        f"sink rate (Gu et al.: heads with mean attention > 0.3 on the first byte of a {CTX}-byte window): {rate:.2f}"
    )
    print(
        f"  mean attention to the first byte per layer (heads averaged): {[round(x, 2) for x in alpha.mean(1).tolist()]}"
    )
    print()
    print(
        f"| cache | bits/byte, all | first {CTX} | after {CTX} | last quarter | every {args.stride}th from {W - 1} | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in bits.items():
        print(
            f"| {name} | {b.mean():.3f} | {b[:, :CTX].mean():.3f} | {b[:, CTX:].mean():.3f} | {b[:, tail].mean():.3f}"
            f" | {b[:, ts].mean():.3f} | {secs[name]:.0f} |"
        )
    print(f"| (d) window {W}, re-computed per byte | | | | | {rec.mean():.3f} | {secs['(d)']:.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    plot(
        bits,
        args.out,
        smooth=min(256, T // 8),
        title=f"StreamingLLM on the lm task's byte GPT (trained on {CTX}-byte windows), {args.streams} streams",
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

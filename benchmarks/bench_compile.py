"""qkv's models eager against ``torch.compile``: GPT and a transformer encoder with causal, sliding-window,
document and padding masks, as ratios measured in the same run.

    PYTHONPATH=src python benchmarks/bench_compile.py            # 2k tokens, d=128, 2 layers, 4 heads
    PYTHONPATH=src python benchmarks/bench_compile.py --quick    # 512 tokens, 3 rounds
    ... --flex      let auto put FlexAttention in the graph on the CPU (allow_compile(True) for the
                    compiled calls only: the eager peers keep qkv's default, tiled)

Each case is one model and one mask built inside the compiled function from the batch's tensors
(document ids, lengths), so the graph takes them as inputs. Eager runs ``backend="auto"`` as a user
would (on the CPU ``tiled`` where the mask leaves tiles empty), and "eager sdpa" the same model with
every layer on ``sdpa`` (``qkv.nn.set_backend``), the eager peer of what the graph runs; compiled is ``torch.compile(...,
fullgraph=True)`` with inductor, so a graph break would fail the case. ms are medians of interleaved
rounds (eager and compiled one call each per round) after a warm-up; "compile s" is the first compiled
call; "ratio" is eager ms / compiled ms (above 1: compiled is faster), "vs sdpa" eager sdpa ms /
compiled ms; "backend" is what ``auto`` picks
inside the graph (``qkv.explain(..., compiled=True)``). ``rows()`` is what ``gpu_check.py`` runs on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import qkv
from qkv import masks as M
from qkv.backends import flex as FX
from qkv.models import GPT, TransformerEncoder

V = 1000
HEADER = ("model", "mask", "L", "backend", "eager ms", "eager sdpa ms", "compiled ms", "ratio", "vs sdpa", "compile s")


def _doc_ids(B: int, L: int, docs: int) -> Tensor:
    """``(B, L)`` ids of ``docs`` documents of random lengths per row (sorted: the packed layout)."""
    g = torch.Generator().manual_seed(B * L + docs)
    cuts = torch.stack([torch.randperm(L - 1, generator=g)[: docs - 1].sort().values + 1 for _ in range(B)])
    return (torch.arange(L).view(1, -1, 1) >= cuts.view(B, 1, -1)).sum(-1)


def cases(L: int, window: int) -> dict[tuple[str, str], tuple[Callable[[], nn.Module], Callable[[Tensor], Any], str]]:
    """(model, mask) -> (model maker, mask from the batch's tensor, which tensor: ``ids`` or ``lengths``)."""
    d, layers, heads = 128, 2, 4
    return {
        ("gpt", "causal"): (lambda: GPT(V, d, layers, heads, max_len=L), lambda t: None, "-"),
        ("gpt", f"window {window}"): (lambda: GPT(V, d, layers, heads, max_len=L, window=window), lambda t: None, "-"),
        ("gpt", "8 documents"): (lambda: GPT(V, d, layers, heads, max_len=L), M.document, "ids"),
        ("gpt", "padding"): (lambda: GPT(V, d, layers, heads, max_len=L), M.padding, "lengths"),
        ("encoder", f"window {window}"): (
            lambda: TransformerEncoder(layers, d, heads),
            lambda t: M.sliding_window(window // 2, window // 2),
            "-",
        ),
        ("encoder", "8 documents"): (lambda: TransformerEncoder(layers, d, heads), M.document, "ids"),
        ("encoder", "padding"): (lambda: TransformerEncoder(layers, d, heads), M.padding, "lengths"),
    }


def _median_ms(fns: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in fns}
    for fn in fns.values():  # warm-up
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def rows(
    dev: torch.device,
    L: int = 2048,
    B: int = 2,
    window: int = 256,
    dtype: torch.dtype = torch.float32,
    rounds: int = 5,
    budget: float = float("inf"),
    emit: Callable[[tuple[str, ...]], None] = lambda r: None,
    flex: bool | None = None,
) -> list[tuple[str, ...]]:
    """Eager and compiled ms of every case on ``dev`` (inference, ``torch.no_grad``); one row per case
    (see :data:`HEADER`). Stops starting cases after ``budget`` seconds. ``flex``: whether ``auto`` may
    compile FlexAttention on the CPU (``allow_compile``) in the compiled calls; ``None`` leaves it be."""
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    out: list[tuple[str, ...]] = []
    for (model_name, mask_name), (make, make_mask, kind) in cases(L, window).items():
        if time.perf_counter() - start > budget:
            out.append((model_name, mask_name, str(L), "-", "-", "-", "-", "-", "-", "skipped (budget)"))
            emit(out[-1])
            continue
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = make().to(device=dev, dtype=dtype).eval()
        x = (
            torch.randint(0, V, (B, L), device=dev)
            if model_name == "gpt"
            else torch.randn(B, L, 128, device=dev, dtype=dtype)
        )
        t = (
            _doc_ids(B, L, 8).to(dev)
            if kind == "ids"
            else torch.tensor([L, L * 3 // 5], device=dev)
            if kind == "lengths"
            else torch.zeros(1, device=dev)
        )

        def f(x: Tensor, t: Tensor, model: nn.Module = model, make_mask: Any = make_mask) -> Tensor:
            return model(x, mask=make_mask(t))

        graph = torch.compile(f, fullgraph=True)

        def compiled(x: Tensor, t: Tensor, graph: Callable[..., Tensor] = graph) -> Tensor:
            if flex is None:
                return graph(x, t)
            old = FX.allow_compile(flex)  # dynamo guards on the flag: the same value at every call
            try:
                return graph(x, t)
            finally:
                FX.allow_compile(old)

        try:
            row = _case(model_name, mask_name, L, model, make_mask, f, compiled, x, t, rounds, sync, flex)
        except Exception as e:  # a case that does not compile is a row, not the end of the run
            row = (model_name, mask_name, str(L), "-", "-", "-", "-", "-", "-", f"error: {type(e).__name__}: {str(e)[:80]}")
        out.append(row)
        emit(row)
    torch._dynamo.reset()
    return out


def _case(
    model_name: str,
    mask_name: str,
    L: int,
    model: nn.Module,
    make_mask: Any,
    f: Callable[..., Tensor],
    compiled: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    rounds: int,
    sync: Callable[[], None],
    flex: bool | None,
) -> tuple[str, ...]:
    """One row: what auto picks inside the graph, the first compiled call, then the interleaved rounds."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        q = torch.zeros(x.shape[0], 4, L, 128 // 4, device=x.device, dtype=dtype)  # the models' heads
        mask = make_mask(t)
        if isinstance(model, GPT):  # the model ANDs its own mask with the one it is given
            mask = model.mask if mask is None else model.mask & mask
        old = FX.allow_compile(flex) if flex is not None else FX.compile_allowed()
        try:
            backend = qkv.explain(q, q, q, mask=mask, compiled=True).backend
        finally:
            FX.allow_compile(old)
        t0 = time.perf_counter()
        compiled(x, t)
        sync()
        compile_s = time.perf_counter() - t0
        on_sdpa = qkv.nn.set_backend(copy.deepcopy(model), "sdpa")
        peers: dict[str, Callable[[], Any]] = {
            "eager": functools.partial(f, x, t),
            "sdpa": functools.partial(f, x, t, on_sdpa),
            "compiled": functools.partial(compiled, x, t),
        }
        ms = _median_ms(peers, rounds, sync)
    ratio = ms["eager"] / ms["compiled"]
    return (
        model_name,
        mask_name,
        str(L),
        backend,
        f"{ms['eager']:.1f}",
        f"{ms['sdpa']:.1f}",
        f"{ms['compiled']:.1f}",
        f"{ratio:.2f}",
        f"{ms['sdpa'] / ms['compiled']:.2f}",
        f"{compile_s:.1f}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512 tokens, window 128, 3 rounds")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flex", action="store_true", help="let auto pick FlexAttention inside the graph on the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L, window, rounds = (512, 128, 3) if args.quick else (args.tokens, 256, args.rounds)
    cfg = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, limit):
            setattr(cfg, limit, max(64, getattr(cfg, limit)))
            break
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; d=128, 2 layers, 4 heads, B=2, L={L},"
        f" float32, inference; median of {rounds} interleaved rounds; flex opted in: {args.flex}"
    )
    print("  " + " | ".join(HEADER), flush=True)
    emit = lambda r: print("  " + " | ".join(r), flush=True)  # noqa: E731
    rows(torch.device("cpu"), L=L, window=window, rounds=rounds, emit=emit, flex=args.flex or None)


if __name__ == "__main__":
    main()

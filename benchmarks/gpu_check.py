"""GPU check for qkv: conformance on CUDA against the float64 oracle, then a speed table. One command:

    PYTHONPATH=src python3 benchmarks/gpu_check.py                 # on a CUDA machine, < 8 minutes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --cpu-smoke     # on any CPU: tiny sizes, proves it runs
    ... --static          compile flex with static shapes on CUDA (if automatic dynamic shapes fail)
    ... --only speed      skip the other parts (or --only conformance, --only compile)

1. Conformance: every exact backend available (read from the registry: ``sdpa``, ``flex``, ``tiled``,
   ``reference`` itself, and any backend added with ``qkv.backends.register``) on CUDA against
   ``reference`` in float64, forward and backward, fp16 and bf16, for every mask kind (GQA 4 on 2, Lq=200 != Lk=300, not multiples of the
   128 block, rows that see nothing) and a few score mods. FlashAttention's rule: a backend's error
   must be at most twice the error of the formula computed in the low dtype, plus a floor. A backend
   that declines a case says why (``declined``); with ``--cpu-smoke`` a backend that takes ``compile=``
   (flex) runs forward only (no CPU backward) and, but for one case, uncompiled.
2. Speed: dense, causal, causal sliding window 1024 and 8 documents at 4k/8k/16k, H=16, D=128, bf16,
   forward and forward+backward: raw ``flex_attention`` (compiled, ``BlockMask`` from
   ``create_block_mask`` on a hand-written ``mask_mod``), SDPA (flash for dense and causal, a dense
   bool mask otherwise), ``qkv`` with ``backend="flex"`` and with ``auto``. ms are medians of
   interleaved rounds (CUDA events), compile excluded (first calls are reported apart); TFLOP/s count
   only unmasked work: ``4 * D * pairs`` per forward, 3.5 times that for forward+backward.
   Targets (issue 12): qkv flex within 1.1x of raw flex, and >= 5x SDPA with a dense mask, for the
   window at 16k.
3. Compile (issue 20): ``benchmarks/bench_compile.py``'s rows on CUDA in bf16 at 4k tokens: GPT and an
   encoder with causal, window, document and padding masks, eager against ``torch.compile(fullgraph=True)``
   (what ``auto`` picks inside the graph, the compile seconds). Runs only if budget is left, or alone
   with ``--only compile``.

The script stops starting new work after ``--budget`` seconds (default 450; the conformance part
gets 55% of it unless run alone) and lists what it skipped: rerun with ``--only`` to finish it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

import bench_compile  # benchmarks/ is the script's directory, so on sys.path
import qkv
from qkv import masks as M
from qkv import scores as S
from qkv.backends import Request
from qkv.backends import flex as FX
from qkv.backends.reference import reference_attention

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


# ------------------------------------------------------------------------------------------------
# conformance


def mask_cases(Lq: int, Lk: int, B: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "none": None,
        "causal": M.causal(),
        "window": M.causal() & M.sliding_window(64),
        "window_two_sided": M.sliding_window(40, 20),
        "padding_empty_rows": M.padding([Lk, Lk // 3], [Lq, Lq // 2]),
        "document": M.document(torch.arange(Lq) * 5 // Lq, torch.arange(Lk) * 5 // Lk),
        "document_causal": M.document(torch.arange(Lq) * 3 // Lq, torch.arange(Lk) * 3 // Lk) & M.causal(),
        "prefix_lm": M.prefix_lm(50),
        "dilated": M.dilated(100, 3),
        "global": M.global_tokens(4) | (M.causal() & M.sliding_window(32)),
        "block_sparse": M.block_sparse(torch.rand(-(-Lq // 64), -(-Lk // 64), generator=g) > 0.5, 64),
        "random_blocks": M.random_blocks(2, 64, seed=1),
        "dense": M.from_dense(torch.rand(B, 1, Lq, Lk, generator=g) > 0.3),
        "fn": M.from_fn(lambda b, h, q, k: (q + k + h) % 3 != 0, "fn"),
        "varlen_causal": M.from_cu_seqlens([0, Lq // 3, Lq], [0, Lk // 2, Lk], causal=True),
    }


def score_cases(H: int, dev: torch.device) -> dict[str, Any]:
    return {
        "softcap": S.softcap(20.0),
        "alibi": S.alibi(H),
        "relative_bias": S.relative_bias(torch.randn(32, H, device=dev) * 0.5, max_distance=64),
    }


def _grads(fn: Callable[..., torch.Tensor], q: Any, k: Any, v: Any, dout: Any) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v))
    if dout is None:
        with torch.no_grad():
            return (fn(q, k, v).detach(),)
    out = fn(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype), allow_unused=True)
    return (out.detach(), *(torch.zeros_like(t) if g is None else g for g, t in zip(got, (q, k, v))))


def _reference(dtype: torch.dtype | None, mask: Any, sm: Any) -> Callable[..., torch.Tensor]:
    def fn(q: Any, k: Any, v: Any) -> torch.Tensor:
        m, s = M.as_mask(mask), S.as_score_mod(sm)
        req = Request(q, k, v, m, s, q.shape[-1] ** -0.5, 0.0, False)
        if m is not None:
            m.check(req.shape)
        return reference_attention(req, dtype=dtype or q.dtype)[0].to(q.dtype)

    return fn


def check_one(
    backend: str, q: Any, k: Any, v: Any, mask: Any, sm: Any, grad: bool, options: dict[str, Any]
) -> tuple[str, str]:
    """``(status, detail)`` of one backend on one case: PASS / FAIL / declined / ERROR."""
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype) if grad else None

    def call(a: Any, b: Any, c: Any) -> torch.Tensor:
        return qkv.attention(a, b, c, mask=mask, score_mod=sm, backend=backend, **options)

    note = ""
    try:
        got = _grads(call, q, k, v, dout)
    except NotImplementedError as e:
        if dout is None:
            return "declined", str(e).split("; backend")[0][:110]
        note = f" (bwd declined: {str(e).split('; backend')[0][:70]})"
        dout = None
        try:
            got = _grads(call, q, k, v, None)
        except NotImplementedError as e2:
            return "declined", str(e2).split("; backend")[0][:110]
    except Exception as e:  # a kernel that fails is a finding, not the end of the check
        return "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    ref = _grads(_reference(torch.float64, mask, sm), q.double(), k.double(), v.double(), dout)
    base = _grads(_reference(None, mask, sm), q, k, v, dout)
    worst = []
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        if not torch.isfinite(g).all():
            return "FAIL", f"{name} has non-finite values{note}"
        err = (g.double() - r).abs().max().item() if g.numel() else 0.0
        berr = (b.double() - r).abs().max().item() if b.numel() else 0.0
        bound = 2 * berr + FLOOR[q.dtype]
        worst.append(f"{name} {err:.1e}/{bound:.1e}")
        if err > bound:
            return "FAIL", f"{name} error {err:.3g} > 2 x {berr:.3g} + {FLOOR[q.dtype]:g}{note}"
    return "PASS", ", ".join(worst) + note


def conformance(dev: torch.device, smoke: bool, budget: float) -> list[tuple[str, ...]]:
    B, H, Hkv, Lq, Lk, D = (2, 4, 2, 200, 300, 64) if not smoke else (2, 4, 2, 40, 56, 16)
    dtypes = [torch.float16, torch.bfloat16]
    cases: list[tuple[str, Any, Any, int]] = [(name, m, None, D) for name, m in mask_cases(Lq, Lk, B).items()]
    cases += [(f"causal+{name}", M.causal(), sm, D) for name, sm in score_cases(H, dev).items()]
    cases += [("window, Dv=D/2", M.causal() & M.sliding_window(64), None, D // 2)]
    rows: list[tuple[str, ...]] = []
    exact = [n for n, b in qkv.backends.registered().items() if b.exact and b.available()]
    print(
        f"conformance on {dev}: {', '.join(exact)}; B={B} H={H} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D}, fwd+bwd, fp16 and bf16",
        flush=True,
    )
    for i, (name, mask, sm, Dv) in enumerate(cases):
        for dtype in dtypes:
            if elapsed() > budget:
                rows.append(("-", name, str(dtype), "skipped", "time budget"))
                continue
            g = torch.Generator().manual_seed(i)
            q = torch.randn(B, H, Lq, D, generator=g).to(dev, dtype)
            k = torch.randn(B, Hkv, Lk, D, generator=g).to(dev, dtype)
            v = torch.randn(B, Hkv, Lk, Dv, generator=g).to(dev, dtype)
            for backend in exact:
                opts: dict[str, Any] = {}
                if "compile" in qkv.backends.get(backend).options and smoke and i > 1:
                    opts = {"compile": False}  # the CPU compiles for ~20 s per kernel: breadth uncompiled
                t0 = time.perf_counter()
                status, detail = check_one(backend, q, k, v, mask, sm, True, opts)
                row = (
                    backend,
                    name,
                    str(dtype).replace("torch.", ""),
                    status,
                    detail,
                    f"{time.perf_counter() - t0:.1f}s",
                )
                rows.append(row)
                print("  " + " | ".join(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# speed


def _time(fns: dict[str, Callable[[], Any]], rounds: int, dev: torch.device) -> dict[str, float]:
    """Median ms per function, one call of each per round (after two warm-up calls each)."""
    cuda = dev.type == "cuda"
    times: dict[str, list[float]] = {n: [] for n in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times[name].append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def _pairs(kind: str, L: int) -> float:
    """Unmasked (query, key) pairs per head."""
    if kind == "dense":
        return float(L) * L
    if kind == "causal":
        return L * (L + 1) / 2
    if kind == "window1024":
        return float(sum(min(i, 1024) + 1 for i in range(L)))
    return 8 * (L / 8) ** 2  # 8 equal documents


def _peers(
    q: Any, k: Any, v: Any, dout: Any, grad: bool, kind: str, qmask: Any, hand: Any, dense: Any, raw_fa: Any
) -> dict[str, Callable[[], None]]:
    """The speed table's peers on one case: each call runs forward (and backward with ``grad``)."""

    def step(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            out = f()
            if grad:
                for t in (q, k, v):
                    t.grad = None
                out.backward(dout)

        return run

    sdpa_kw: dict[str, Any] = {"is_causal": True} if kind == "causal" else {"attn_mask": dense}
    return {
        "sdpa" + ("+mask" if dense is not None else ""): step(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **sdpa_kw)
        ),
        "raw flex": step(lambda: raw_fa(q, k, v, block_mask=hand)),
        "qkv flex": step(lambda: qkv.attention(q, k, v, mask=qmask, backend="flex")),
        "qkv auto": step(lambda: qkv.attention(q, k, v, mask=qmask)),
    }


def speed(dev: torch.device, smoke: bool, budget: float) -> list[tuple[str, ...]]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    H, D = (16, 128) if not smoke else (2, 32)
    lengths = (4096, 8192, 16384) if not smoke else (256,)
    modes = ("fwd", "fwd+bwd")
    dtype = torch.bfloat16
    rounds = 10 if not smoke else 3
    raw_fa = torch.compile(flex_attention)
    rows: list[tuple[str, ...]] = []
    print(
        f"\nspeed on {dev}: H={H} D={D} B=1 bf16; ms (median of {rounds} interleaved rounds), TFLOP/s of unmasked work"
    )
    header = ("case", "L", "mode", "peer", "ms", "TFLOP/s", "note")
    print("  " + " | ".join(header), flush=True)
    for kind in ("dense", "causal", "window1024", "documents8"):
        for L in lengths:
            docs = (torch.arange(L, device=dev) * 8 // L) if kind == "documents8" else None

            def mod(b: Any, h: Any, q: Any, k: Any, kind: str = kind, docs: Any = docs) -> Any:
                if kind == "causal":
                    return q >= k
                if kind == "window1024":
                    return (q >= k) & (q - k <= 1024)
                if kind == "documents8":
                    return docs[q] == docs[k]
                return q >= 0

            qmask = {
                "dense": None,
                "causal": M.causal(),
                "window1024": M.causal() & M.sliding_window(1024),
                "documents8": M.document(torch.arange(L) * 8 // L),
            }[kind]
            hand = create_block_mask(mod, None, None, L, L, device=str(dev)) if kind != "dense" else None
            dense = None if qmask is None or kind == "causal" else qmask.to_dense(1, 1, L, L, dev)
            for mode in modes:
                if elapsed() > budget:
                    rows.append((kind, str(L), mode, "-", "-", "-", "skipped: time budget"))
                    print("  " + " | ".join(rows[-1]), flush=True)
                    continue
                grad = mode == "fwd+bwd"
                g = torch.Generator().manual_seed(L)
                q, k, v = (torch.randn(1, H, L, D, generator=g).to(dev, dtype).requires_grad_(grad) for _ in range(3))
                dout = torch.randn_like(q)
                flops = 4 * D * H * _pairs(kind, L) * (3.5 if grad else 1.0)

                peers = _peers(q, k, v, dout, grad, kind, qmask, hand, dense, raw_fa)
                notes: dict[str, str] = {}
                try:
                    notes["qkv auto"] = "-> " + qkv.explain(q, k, v, mask=qmask).backend
                except Exception as e:
                    notes["qkv auto"] = f"explain failed: {e}"
                ok: dict[str, Callable[[], None]] = {}
                for name, fn in peers.items():  # first calls apart: they compile
                    t0 = time.perf_counter()
                    try:
                        fn()
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        ok[name] = fn
                        first = time.perf_counter() - t0
                        if first > 1.0:
                            notes[name] = (notes.get(name, "") + f" first call {first:.1f} s").strip()
                    except NotImplementedError as e:
                        notes[name] = "declined: " + str(e).split("; backend")[0][:80]
                    except Exception as e:
                        notes[name] = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                med = _time(ok, rounds, dev) if ok else {}
                for name in peers:
                    ms = med.get(name)
                    row = (
                        kind,
                        str(L),
                        mode,
                        name,
                        f"{ms:.3f}" if ms else "-",
                        f"{flops / (ms * 1e-3) / 1e12:.1f}" if ms else "-",
                        notes.get(name, ""),
                    )
                    rows.append(row)
                    print("  " + " | ".join(row), flush=True)
                del q, k, v, dout, peers, ok
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# compile


def compile_rows(dev: torch.device, smoke: bool, budget: float) -> list[tuple[str, ...]]:
    """``bench_compile.rows`` on ``dev``: bf16 at 4k tokens (float32 at 256 with ``--cpu-smoke``)."""
    L, window, dtype, rounds = (256, 64, torch.float32, 2) if smoke else (4096, 1024, torch.bfloat16, 10)
    left = budget - elapsed()
    print(f"\ncompile on {dev}: {L} tokens, {dtype}, eager against torch.compile(fullgraph=True), {left:.0f} s left")
    print("  " + " | ".join(bench_compile.HEADER), flush=True)
    return bench_compile.rows(
        dev, L=L, window=window, dtype=dtype, rounds=rounds, budget=left,
        emit=lambda r: print("  " + " | ".join(r), flush=True),
    )  # fmt: skip


def targets(rows: list[tuple[str, ...]], L: int) -> list[str]:
    """The issue's GPU targets, from the speed table: window at ``L``, forward and forward+backward."""
    out = []
    for mode in ("fwd", "fwd+bwd"):
        ms = {
            r[3]: float(r[4]) for r in rows if r[0] == "window1024" and r[1] == str(L) and r[2] == mode and r[4] != "-"
        }
        if "qkv flex" in ms and "raw flex" in ms:
            r = ms["qkv flex"] / ms["raw flex"]
            out.append(
                f"{'met    ' if r <= 1.1 else 'NOT MET'}  window {L} {mode}: qkv flex / raw flex = {r:.3f} (<= 1.1)"
            )
        if "qkv flex" in ms and "sdpa+mask" in ms:
            r = ms["sdpa+mask"] / ms["qkv flex"]
            out.append(
                f"{'met    ' if r >= 5 else 'NOT MET'}  window {L} {mode}: SDPA+mask / qkv flex = {r:.1f}x (>= 5x)"
            )
    return out or [f"no window rows at L={L} to judge"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run on the CPU at tiny sizes (proves the script runs)")
    p.add_argument("--static", action="store_true", help="compile flex with static shapes on CUDA")
    p.add_argument("--only", choices=("conformance", "speed", "compile"))
    p.add_argument("--budget", type=float, default=450.0, help="seconds after which no new work starts")
    args = p.parse_args()
    cfg = torch._dynamo.config  # raw flex recompiles per mask and shape: keep it compiled past dynamo's 8
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, limit):
            setattr(cfg, limit, max(64, getattr(cfg, limit)))
            break
    if args.cpu_smoke:
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        print("no CUDA device: run with --cpu-smoke to check the script on the CPU")
        return 2
    if args.static:
        FX.DYNAMIC["cuda"] = False
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke: tiny sizes)"
    print(f"qkv gpu_check: torch {torch.__version__}, {name}, flex dynamic={FX.DYNAMIC.get(dev.type)}\n", flush=True)
    FX.allow_compile(True)
    conf: list[tuple[str, ...]] = []
    spd: list[tuple[str, ...]] = []
    cmp: list[tuple[str, ...]] = []
    try:
        if args.only in (None, "conformance"):  # leave the speed table at least 45% of the budget
            conf = conformance(dev, args.cpu_smoke, args.budget * (1.0 if args.only else 0.55))
        if args.only in (None, "speed"):
            spd = speed(dev, args.cpu_smoke, args.budget)
        if args.only in (None, "compile"):
            cmp = compile_rows(dev, args.cpu_smoke, args.budget)
    except Exception:
        traceback.print_exc()
    print(f"\nsummary after {elapsed():.0f} s (flex: {FX.STATS.compiles} compiles, {FX.STATS.block_masks} block masks)")
    for status in ("PASS", "FAIL", "ERROR", "declined", "skipped"):
        n = sum(r[3] == status for r in conf)
        if n:
            print(f"  conformance {status}: {n}")
    for r in conf:
        if r[3] in ("FAIL", "ERROR"):
            print("  " + " | ".join(r))
    if spd:
        for line in targets(spd, 256 if args.cpu_smoke else 16384):
            print("  " + line)
    if cmp:
        done = [r for r in cmp if r[7] != "-"]
        print(f"  compile: {len(done)} of {len(cmp)} cases compiled with fullgraph=True (eager ms / compiled ms):")
        for r in done:
            print(f"    {r[0]} {r[1]}: {r[7]}x, {r[8]}x eager sdpa ({r[3]} in the graph)")
    bad = any(r[3] in ("FAIL", "ERROR") for r in conf)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

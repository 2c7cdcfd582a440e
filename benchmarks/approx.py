"""Sub-quadratic attention on this CPU: how wrong, how fast, how much memory, next to exact attention.

    python benchmarks/approx.py            # the full run (a few minutes)
    python benchmarks/approx.py --quick    # lengths up to 8k, fewer settings (about a minute)

Three measurements, printed as markdown tables and saved (with PNG plots) under ``--out``:

1. Error: relative Frobenius error ``‖out - exact‖ / ‖exact‖`` of Performer (features ``m``), Nyström
   (landmarks) and linear attention (no knob) against exact softmax attention (``reference`` in
   float64), on random inputs (q, k, v ~ N(0, 1), so logits have unit variance) and on q, k, v
   captured from all six layers of the real all-MiniLM-L6-v2 model run on real sentences.
2. Time and memory against sequence length (512 to 64k, B=1, H=4, D=64, float32 forward, non-causal
   and causal): each method runs in its own subprocess; time is the median of 3 calls after a warm-up,
   memory the growth of the process's peak RSS during the calls (inputs excluded). A method stops
   growing ``L`` once a call takes more than ``--max-seconds``. The crossover is the first measured
   length where a method is faster than exact attention (the faster of ``sdpa`` and ``tiled``).
3. (separately) ListOps accuracy: ``python benchmarks/listops.py``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import qkv
import qkv.patterns
from qkv.masks import causal

HERE = os.path.dirname(os.path.abspath(__file__))

# peers in the speed table: name -> (backend, options, supports causal, non-causal mask)
SPEED_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "exact sdpa": ("sdpa", {}),
    "exact tiled": ("tiled", {}),
    "linear": ("linear", {}),
    "performer m=256": ("performer", {"num_features": 256}),
    "nystrom m=64": ("nystrom", {"num_landmarks": 64}),
    "longformer w=128 (tiled)": ("tiled", {}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------------
# 1. error


def error_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int], seeds: int
) -> dict[str, list[float]]:
    """Errors of each method at each size (averaged over ``seeds`` feature draws for Performer)."""
    exact = qkv.attention(q.double(), k.double(), v.double(), backend="reference")
    out: dict[str, list[float]] = {"performer": [], "nystrom": [], "linear": []}
    lin = rel_err(qkv.attention(q, k, v, backend="linear"), exact)
    L = q.shape[-2]
    for m in sizes:
        out["performer"].append(
            statistics.mean(
                rel_err(qkv.attention(q, k, v, backend="performer", num_features=m, seed=s), exact)
                for s in range(seeds)
            )
        )
        out["nystrom"].append(
            rel_err(qkv.attention(q, k, v, backend="nystrom", num_landmarks=min(m, L)), exact) if m <= L else math.nan
        )
        out["linear"].append(lin)
    return out


REAL_TEXT = (
    "The quick rise of attention in machine learning began with translation: a decoder looked back at every word "
    "of the source sentence and chose where to look. Transformers then dropped recurrence altogether and let every "
    "token attend to every other token, at a cost that grows with the square of the length. Many papers tried to "
    "make that cost linear, with kernels, random features, landmarks, low-rank projections or sparse patterns, and "
    "state-space models returned with input-dependent dynamics. Whether the approximations keep the quality of "
    "exact attention depends on what the heads of a trained model actually do, which is why we measure them on a "
    "real model reading real sentences rather than on random numbers alone. "
)


def minilm_qkv(max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v ``(1, 12, L, 32)`` of each of MiniLM's six layers on real English text."""
    from qkv.models.bert import BertTokenizer, minilm, minilm_path
    from qkv.nn import hooked

    model = minilm()
    tok = BertTokenizer(os.path.join(minilm_path(), "tokenizer.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # the Zen of Python (printed on import; silenced)
    zen = codecs.decode(this.s, "rot13")
    text = (REAL_TEXT + " " + zen.replace("\n", " ")) * 4
    enc = tok.encode([text], max_length=max_tokens)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def keep(t: torch.Tensor, name: str) -> None:  # name: "encoder.layer.N.attention.self.hook_q"
        layer, point = name.rsplit(".", 1)
        seen.setdefault(layer, {})[point] = t.detach().clone()

    with torch.no_grad(), hooked(model, ("*.hook_[qkv]", keep)):
        model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return [(d["hook_q"], d["hook_k"], d["hook_v"]) for d in seen.values()]


# ------------------------------------------------------------------------------------------------
# 2. speed and memory (one subprocess per method)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, lengths: list[int], is_causal: bool, max_seconds: float, threads: int) -> None:
    backend, opts = SPEED_METHODS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for L in lengths:
        q, k, v = (torch.randn(1, 4, L, 64) for _ in range(3))
        mask: Any = causal() if is_causal else None
        if name.startswith("longformer"):
            mask = qkv.masks.sliding_window(256, 0) if is_causal else qkv.patterns.longformer(128, 1)
        kw = dict(opts)
        with torch.no_grad():
            qkv.attention(q, k, v, mask=mask, backend=backend, **kw)  # warm-up
            exact_peak = _reset_peak()
            base = _rss_mb()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                qkv.attention(q, k, v, mask=mask, backend=backend, **kw)
                times.append(time.perf_counter() - t0)
                if times[-1] > max_seconds:
                    break
        peak = _peak_mb()
        mem = max(0.0, peak - base) if exact_peak else math.nan
        print(json.dumps({"L": L, "ms": 1000 * statistics.median(times), "mem_mb": mem}), flush=True)
        del q, k, v
        if statistics.median(times) > max_seconds:
            break


def speed(
    lengths: list[int], is_causal: bool, max_seconds: float, threads: int
) -> dict[str, dict[int, tuple[float, float]]]:
    res: dict[str, dict[int, tuple[float, float]]] = {}
    for name, (backend, _) in SPEED_METHODS.items():
        if is_causal and backend == "nystrom":
            continue
        if backend not in qkv.backends.registered():
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--lengths", ",".join(map(str, lengths))]
        cmd += ["--max-seconds", str(max_seconds), "--threads", str(threads)] + (["--causal"] if is_causal else [])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        if p.returncode and not rows:
            res[name] = {}
            print(f"  {name}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        res[name] = {r["L"]: (r["ms"], r["mem_mb"]) for r in rows}
        timings = " ".join(f"{r['L']}:{r['ms']:.0f}ms" for r in rows)
        print(f"  {name}: {timings}", file=sys.stderr, flush=True)
    return res


def crossover(res: dict[str, dict[int, tuple[float, float]]], name: str) -> str:
    exact = {
        L: min(res[e][L][0] for e in ("exact sdpa", "exact tiled") if e in res and L in res[e])
        for L in res.get(name, {})
        if any(e in res and L in res[e] for e in ("exact sdpa", "exact tiled"))
    }
    for L in sorted(res[name]):
        if L in exact and res[name][L][0] < exact[L]:
            return f"{L}"
    longest = max(exact) if exact else None
    return f"> {longest} (not faster at any measured length)" if longest else "n/a"


# ------------------------------------------------------------------------------------------------
# report


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="lengths up to 8k, fewer sizes and seeds")
    ap.add_argument("--out", default="bench-out/approx", help="folder for approx.md and the PNG plots")
    ap.add_argument("--max-seconds", type=float, default=2.0, help="stop growing L once a call takes this long")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for the timings (1: stable on a loaded machine)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", help=argparse.SUPPRESS)
    ap.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, [int(x) for x in a.lengths.split(",")], a.causal, a.max_seconds, a.threads)
        return
    os.makedirs(a.out, exist_ok=True)
    report = [
        "# Sub-quadratic attention: error, time, memory",
        "",
        f"torch {torch.__version__}, timings with {a.threads} thread(s) on {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start (a shared machine: compare ratios within one run).",
        "",
    ]
    sizes = [16, 64, 256] if a.quick else [16, 32, 64, 128, 256, 512, 1024]
    seeds = 2 if a.quick else 3

    print("== error on random inputs", file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(0)
    Lr = 512 if a.quick else 1024
    q, k, v = (torch.randn(1, 4, Lr, 64, generator=g) for _ in range(3))
    rand = error_rows(q, k, v, sizes, seeds)
    soft = error_rows(q * 0.5, k * 0.5, v, sizes, seeds)  # smaller logits: FAVOR+'s variance is exp(|q+k|^2 s)
    print("== error on MiniLM q, k, v", file=sys.stderr, flush=True)
    per_layer = [error_rows(*t, sizes, seeds) for t in minilm_qkv(256 if a.quick else 512)]
    real = {m: [statistics.mean(pl[m][i] for pl in per_layer) for i in range(len(sizes))] for m in rand}
    for title, errs in (
        (f"random q, k, v ~ N(0, 1), L={Lr}, H=4, D=64", rand),
        (f"random q, k ~ N(0, 0.5^2), v ~ N(0, 1), L={Lr}, H=4, D=64", soft),
        ("MiniLM layers 0-5 (mean)", real),
    ):
        report += [f"## Relative error vs exact attention: {title}", ""]
        header = ["method", *[f"m={m}" for m in sizes]]
        rows = [[name, *[("-" if math.isnan(e) else f"{e:.3f}") for e in errs[name]]] for name in errs]
        report += [md_table(header, rows), ""]
    report += ["Per MiniLM layer at m=64 (Performer features, Nyström landmarks):", ""]
    i64 = sizes.index(64)
    report += [
        md_table(
            ["layer", "performer", "nystrom", "linear"],
            [
                [str(li), *[f"{pl[m][i64]:.3f}" for m in ("performer", "nystrom", "linear")]]
                for li, pl in enumerate(per_layer)
            ],
        ),
        "",
    ]

    lengths = [512, 1024, 2048, 4096, 8192] if a.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    speed_res = {}
    for is_causal in (False, True):
        kind = "causal" if is_causal else "non-causal"
        print(f"== time and memory, {kind}", file=sys.stderr, flush=True)
        res = speed(lengths, is_causal, a.max_seconds, a.threads)
        speed_res[kind] = res
        report += [f"## Time (ms, median) and peak extra memory (MB) vs length, {kind}, B=1 H=4 D=64 float32", ""]
        header = ["method", *[str(L) for L in lengths], "crossover vs exact"]
        rows = []
        for name, r in res.items():
            cells = [f"{r[L][0]:.1f} / {r[L][1]:.0f}" if L in r else "-" for L in lengths]
            cx = "-" if name.startswith("exact") else crossover(res, name)
            rows.append([name + (" (window 256)" if is_causal and name.startswith("longformer") else ""), *cells, cx])
        report += [md_table(header, rows), ""]

    _plots(a.out, sizes, {"random N(0,1)": rand, "random N(0,0.25)": soft, "MiniLM (6 layers)": real}, speed_res)
    report += ["Plots: error.png, time.png, memory.png", ""]
    text = "\n".join(report)
    with open(os.path.join(a.out, "approx.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nsaved {a.out}/approx.md and plots", file=sys.stderr)


def _plots(out: str, sizes: list[int], errors: dict[str, dict[str, list[float]]], speed_res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(errors), figsize=(5 * len(errors), 4))
    for ax, (title, errs) in zip(axes, errors.items()):
        for name, e in errs.items():
            ax.plot(sizes, e, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="features / landmarks", ylabel="relative error", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "error.png"), dpi=100)
    plt.close(fig)
    for idx, what in ((0, "time"), (1, "memory")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, kind in zip(axes, ("non-causal", "causal")):
            for name, r in speed_res.get(kind, {}).items():
                Ls = sorted(r)
                ax.plot(Ls, [max(r[L][idx], 1e-3) for L in Ls], marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel="sequence length", title=kind)
            ax.set_ylabel("ms" if idx == 0 else "peak extra MB")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{what}.png"), dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()

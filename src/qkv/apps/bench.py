"""``qkv bench``: time and peak memory of qkv's exact backends against PyTorch SDPA and FlexAttention.

The methods (:func:`methods`): the peers, PyTorch's own ``sdpa`` and ``flex`` called directly, then every
backend registered and available here that is ``exact`` and that ``auto`` may pick (``tiled``,
``reference``, and any backend added with ``qkv.backends.register``), each through
``qkv.attention(..., backend=name)``. None is named here: a backend added in one file appears with no
other edit. A registered backend named like a peer is the peer's column (PyTorch's function, the baseline).

For dense, causal, causal sliding-window (256) and document (8 documents) masks, forward and
forward+backward, in one dtype (``--dtype``: float32, bfloat16 or float16), ``B=1, D=64``, at sequence
lengths 1k to 32k (``H=8`` up to 8k, ``H=1`` beyond, so that the long rows finish in seconds). Each
entry is the median of a few runs after a warm-up; ratios are SDPA's time over the method's time *from
the same run* (> 1 = faster than SDPA).

The roofline column: each method's achieved GFLOP/s, counting only the work the mask leaves (``4 D``
flops per live (query, key) pair forward, 3.5 times that forward+backward, as flash-attn counts; work a
method does on pairs the mask rules out is not counted), and its fraction of this machine's matmul peak
in the same dtype, measured at the start of the run (:func:`matmul_peak`).

What the peers get: SDPA is ``F.scaled_dot_product_attention`` with ``is_causal=True`` for causal
and a boolean mask (built before timing) for the others; FlexAttention is ``torch.compile``-d
``flex_attention`` with a ``BlockMask`` (built before timing; compile time reported apart, and only at
the sizes in ``flex_sizes`` because each compile takes tens of seconds on this CPU). A qkv backend runs
where its own cost estimate (:meth:`qkv.backends.Backend.cost`) is under the time limit and it serves the
case (otherwise the cell says why); ``reference`` only where its ``L x L`` matrices fit in a budget.

Peak memory is the growth of the process's resident memory during one call: the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size before the
call, with glibc told to ``mmap`` every block of 64 KiB or more and its free heap pages released
(``malloc_trim``) before the call, so that memory the call reuses counts too. It counts everything
the call allocates (outputs, gradients, masks built inside), not the inputs. Where ``/proc`` does not
allow this the column says ``-``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import masks as M
from ..attention import attention, explain
from ..backends import registered

__all__ = [
    "PEERS",
    "Result",
    "compare",
    "live_pairs",
    "matmul_peak",
    "measure",
    "methods",
    "peak_memory",
    "run_bench",
    "time_median",
]

MASKS = ("dense", "causal", "sliding_window(256)", "document(8)")
PEERS = ("sdpa", "flex")
"""PyTorch's own functions, timed as they are: ``F.scaled_dot_product_attention`` (every ratio's
baseline) and compiled ``flex_attention``."""
MODES = ("fwd", "fwd+bwd")
FULL_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SIZES = (256, 1024)
COLORS = {"tiled": "tab:blue", "sdpa": "tab:green", "flex": "tab:orange", "reference": "tab:gray"}
_MORE_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
GFLOPS = 100.0
"""Assumed throughput (GFLOP/s) used to skip measurements that would take too long."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    """One measurement: ``ms`` is the median time, ``mb`` the peak extra memory, ``note`` why skipped."""

    mask: str
    L: int
    H: int
    mode: str
    method: str
    ms: float | None = None
    mb: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    dtype: str = "float32"


def methods() -> tuple[str, ...]:
    """What ``qkv bench`` times, read from the registry now: :data:`PEERS`, then every registered backend
    that is ``exact``, ``automatic`` and available here (in registration order) and not named like a peer."""
    ours = [n for n, b in registered().items() if b.exact and b.automatic and b.available() and n not in PEERS]
    return (*PEERS, *ours)


def _color(method: str, order: Sequence[str]) -> str:
    extra = [m for m in order if m not in COLORS]
    return COLORS.get(method) or _MORE_COLORS[extra.index(method) % len(_MORE_COLORS)]


# ------------------------------------------------------------------------------------------------
# measuring


def time_median(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_MMAP_SET = False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+) kB", f.read())
    if m is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(m.group(1)) * 1024


def peak_memory(fn: Callable[[], Any]) -> float | None:
    """Peak growth of resident memory (bytes) while ``fn()`` runs, or ``None`` where unmeasurable."""
    global _MMAP_SET
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not _MMAP_SET:
            libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: big blocks come from mmap and return to the OS
            _MMAP_SET = True
        libc.malloc_trim(0)  # free heap pages leave the resident set, so reusing them counts
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _status("VmRSS")
        fn()
        return float(_status("VmHWM") - base)
    except OSError:
        return None


def matmul_peak(dtype: torch.dtype = torch.float32, slow_s: float = 0.05, max_n: int = 2048) -> float:
    """This machine's matmul rate in ``dtype`` (FLOP/s): the best of 3 square matmuls of ``max_n``, or of
    the first size (from 256, doubling) whose matmul takes over ``slow_s`` (a dtype with no fast matmul
    here, such as float16 on a CPU without AVX512-FP16, stops small)."""
    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        if n >= max_n or best > slow_s:
            return 2.0 * n**3 / best
        n *= 2


def live_pairs(kind: str, L: int) -> float:
    """(query, key) pairs the mask leaves of ``L x L`` (per batch row and head)."""
    if kind == "dense":
        return float(L) * L
    if kind == "causal":
        return L * (L + 1) / 2
    n = int(kind[kind.index("(") + 1 : -1])
    if kind.startswith("sliding"):  # query i sees keys max(0, i - n) .. i
        full = max(0, L - n)
        return float(full * (n + 1) + sum(min(i, n) + 1 for i in range(min(L, n))))
    sizes = torch.bincount(torch.arange(L) * n // L, minlength=n)
    return float((sizes.double() ** 2).sum())


def useful_flops(kind: str, L: int, H: int, mode: str, D: int = 64) -> float:
    """Floating-point operations of the work the mask leaves: ``4 D`` per live pair forward (``Q Kᵀ``
    and ``P V``), 3.5 times that forward+backward (flash-attn's count), ``B=1``."""
    return 4.0 * D * H * live_pairs(kind, L) * (3.5 if mode == "fwd+bwd" else 1.0)


# ------------------------------------------------------------------------------------------------
# the cases


def make_mask(kind: str, L: int) -> M.Mask | None:
    """The bench's masks: ``dense`` (None), ``causal``, ``sliding_window(N)`` (causal) and
    ``document(N)`` (N equal documents)."""
    if kind == "dense":
        return None
    if kind == "causal":
        return M.causal()
    m = re.fullmatch(r"(sliding_window|document)\((\d+)\)", kind)
    if m is None:
        raise ValueError(f"unknown bench mask {kind!r}; valid: {', '.join(MASKS)}")
    n = int(m.group(2))
    if m.group(1) == "sliding_window":
        return M.causal() & M.sliding_window(n)
    return M.document(torch.arange(L) * n // L)


def _live_keys(kind: str, L: int) -> float:
    """Average keys a query sees (the work a mask-skipping method does)."""
    if kind == "dense":
        return L
    if kind == "causal":
        return L / 2
    n = int(kind[kind.index("(") + 1 : -1])
    return min(n + 1, L) if kind.startswith("sliding") else L / n


def _estimate_s(method: str, kind: str, L: int, H: int, mode: str) -> float:
    """A peer's seconds per call, roughly: SDPA computes every pair under a mask it cannot skip."""
    no_skip = method == "sdpa" and kind not in ("causal", "dense")
    keys = float(L) if no_skip else _live_keys(kind, L)
    flops = 4 * L * keys * H * 64 * (3.5 if mode == "fwd+bwd" else 1.0)
    return flops / (GFLOPS * 1e9)


def _flex_fn(kind: str, L: int, H: int) -> tuple[Callable[..., Tensor], Any] | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # pragma: no cover - torch < 2.5
        return None
    mask = make_mask(kind, L) or M.full()
    block = mask.to_flex_block_mask(1, 1, L, L)
    return torch.compile(flex_attention), block


def measure(
    method: str,
    kind: str,
    L: int,
    H: int,
    mode: str,
    *,
    repeats: int = 3,
    max_call_s: float = 4.0,
    reference_bytes: float = 2**31,
    flex_cache: dict[Any, Any] | None = None,
    memory: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Result:
    """Time (median of ``repeats``) and peak extra memory of one method on one case."""
    return compare(
        (method,),
        kind,
        L,
        H,
        mode,
        repeats=repeats,
        max_call_s=max_call_s,
        reference_bytes=reference_bytes,
        flex_cache=flex_cache,
        memory=memory,
        dtype=dtype,
    )[0]


def compare(
    methods: Sequence[str],
    kind: str,
    L: int,
    H: int,
    mode: str,
    *,
    repeats: int = 3,
    max_call_s: float = 4.0,
    reference_bytes: float = 2**31,
    flex_cache: dict[Any, Any] | None = None,
    memory: bool = True,
    dtype: torch.dtype = torch.float32,
    peak: float | None = None,
) -> list[Result]:
    """Time and peak extra memory of several methods on one case, timed in turns (one call of each
    method per round, ``repeats`` rounds, medians), so that a load that changes during the run weighs
    on all of them alike.

    Args:
        methods: names from :func:`methods` (a peer, or a registered exact backend).
        kind: a mask of :data:`MASKS`.
        L: sequence length (queries and keys).
        H: heads (``B=1, D=64``).
        mode: ``fwd`` or ``fwd+bwd``.
        repeats: timed runs after the warm-up.
        max_call_s: skip when the estimated time of one call exceeds this.
        reference_bytes: skip ``reference`` when its ``L x L`` matrices would exceed this.
        flex_cache: compiled FlexAttention per case (compile time goes in ``extra["compile_s"]``).
        memory: also measure the peak memory (one more call).
        dtype: of ``q``, ``k``, ``v``.
        peak: this machine's matmul rate in ``dtype`` (FLOP/s, :func:`matmul_peak`): each result's
            ``extra`` then holds ``gflops`` (useful work per second) and ``peak`` (its fraction).
    """
    prepared = [_prepare(m, kind, L, H, mode, max_call_s, reference_bytes, flex_cache, dtype) for m in methods]
    live = [(res, once) for res, once in prepared if once is not None]
    times: list[list[float]] = [[] for _ in live]
    for _, once in live:
        once()  # warm-up
    for _ in range(repeats):
        for i, (_, once) in enumerate(live):
            t0 = time.perf_counter()
            once()
            times[i].append(time.perf_counter() - t0)
    work = useful_flops(kind, L, H, mode)
    for (res, once), ts in zip(live, times):
        res.ms = 1000 * statistics.median(ts)
        res.extra["gflops"] = work / (res.ms / 1000) / 1e9
        if peak:
            res.extra["peak"] = res.extra["gflops"] * 1e9 / peak
        if memory:
            mem = peak_memory(once)
            res.mb = None if mem is None else mem / 2**20
    return [res for res, _ in prepared]


def _prepare(
    method: str,
    kind: str,
    L: int,
    H: int,
    mode: str,
    max_call_s: float,
    reference_bytes: float,
    flex_cache: dict[Any, Any] | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Result, Callable[[], None] | None]:
    res = Result(kind, L, H, mode, method, dtype=str(dtype).removeprefix("torch."))
    peer = method in PEERS
    if peer:
        est = _estimate_s(method, kind, L, H, mode)
        if est > max_call_s:
            res.note = f"skipped: ~{est:.0f} s per call"
            return res, None
    elif method not in methods():
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(methods())}")
    if method == "reference" and 3 * H * L * L * 4 > reference_bytes:  # the formula as written: L x L
        res.note = f"skipped: L x L matrices ~{3 * H * L * L * 4 / 2**30:.1f} GiB"
        return res, None
    if method == "sdpa" and kind not in ("dense", "causal") and 9 * L * L > reference_bytes:
        res.note = f"skipped: dense mask and its index grid ~{9 * L * L / 2**30:.1f} GiB"
        return res, None
    g = torch.Generator().manual_seed(L)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, H, L, 64, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    mask = make_mask(kind, L)
    call: Callable[[], Tensor]
    if not peer:  # a qkv backend: its own estimate decides, and its own reason when it declines
        e = explain(q, k, v, mask=mask)
        if method not in e.costs:
            res.note = f"skipped: {e.declined.get(method, 'declined')}"
            return res, None
        if e.costs[method] > max_call_s:
            res.note = f"skipped: ~{e.costs[method]:.0f} s per call (its estimate)"
            return res, None

        def call() -> Tensor:
            return attention(q, k, v, mask=mask, backend=method)

    elif method == "sdpa":
        dense = None if kind in ("dense", "causal") else mask.to_dense(1, 1, L, L)  # type: ignore[union-attr]

        def call() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=kind == "causal")

    elif method == "flex":
        key = (kind, L, H, mode, dtype)
        cache = flex_cache if flex_cache is not None else {}
        if key not in cache:
            got = _flex_fn(kind, L, H)
            if got is None:  # pragma: no cover - torch < 2.5
                res.note = "skipped: FlexAttention needs torch >= 2.5"
                return res, None
            fn, block = got
            t0 = time.perf_counter()
            out = fn(q, k, v, block_mask=block)
            if grad:
                out.sum().backward()
            cache[key] = (fn, block, time.perf_counter() - t0)
        fn, block, compile_s = cache[key]
        res.extra["compile_s"] = compile_s

        def call() -> Tensor:
            return fn(q, k, v, block_mask=block)  # type: ignore[no-any-return]

    def once() -> None:
        out = call()
        if grad:
            out.sum().backward()
            for t in (q, k, v):
                t.grad = None

    return res, once


# ------------------------------------------------------------------------------------------------
# report


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: Sequence[Result]) -> str:
    """A markdown table: one row per case, time / ratio vs SDPA / peak MB / achieved GFLOP/s and
    fraction of the matmul peak per method."""
    cases: dict[tuple[str, int, int, str], dict[str, Result]] = {}
    for r in results:
        cases.setdefault((r.mask, r.L, r.H, r.mode), {})[r.method] = r
    shown = list(dict.fromkeys(r.method for r in results))
    head = (
        "| mask | L | H | pass | "
        + " | ".join(f"{m} ms (x SDPA) | {m} MB | {m} GFLOP/s (peak)" for m in shown)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + 3 * len(shown))]
    for (mask, L, H, mode), row in cases.items():
        base = row.get("sdpa")
        cells = []
        for m in shown:
            got = row.get(m)
            if got is None or got.ms is None:
                cells += [got.note if got is not None and got.note else "-", "-", "-"]
                continue
            ratio = f" ({base.ms / got.ms:.2f}x)" if base is not None and base.ms else ""
            roof = f"{got.extra['gflops']:.1f}" if "gflops" in got.extra else "-"
            roof += f" ({got.extra['peak']:.0%})" if "peak" in got.extra else ""
            cells += [f"{got.ms:.1f}{ratio}", _fmt(got.mb, ".0f"), roof]
        lines.append(f"| {mask} | {L} | {H} | {mode} | " + " | ".join(cells) + " |")
    comp = [r for r in results if "compile_s" in r.extra]
    if comp:
        lines.append("")
        lines.append(
            "FlexAttention compile time (first call, excluded above): "
            + ", ".join(f"{r.mask} L={r.L} {r.mode}: {r.extra['compile_s']:.1f} s" for r in comp)
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path) -> None:
    """Time and peak memory against sequence length, one column per mask, one line per method/pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = [m for m in MASKS if any(r.mask == m for r in results)]
    fig, axes = plt.subplots(2, max(1, len(masks)), figsize=(4.2 * max(1, len(masks)), 7), squeeze=False)
    shown = list(dict.fromkeys(r.method for r in results))
    for j, mk in enumerate(masks):
        for method in shown:
            for mode, style in zip(MODES, ("-", "--")):
                rs = sorted(
                    (r for r in results if r.mask == mk and r.method == method and r.mode == mode and r.ms),
                    key=lambda r: r.L,
                )
                if not rs:
                    continue
                label = f"{method} {mode}"
                color = _color(method, shown)
                axes[0, j].plot([r.L for r in rs], [r.ms for r in rs], style, color=color, marker="o", label=label)
                mem = [(r.L, r.mb) for r in rs if r.mb is not None]
                if mem:
                    axes[1, j].plot(*zip(*mem), style, color=color, marker="o", label=label)
        axes[0, j].set_title(mk)
        for i, yl in enumerate(("median time (ms)", "peak extra memory (MB)")):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    dt = results[0].dtype if results else "float32"
    fig.suptitle(f"qkv bench: {dt}, B=1, D=64; H=8 up to 8k tokens, H=1 beyond (hence the drop at 16k)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return "unknown CPU"


def run_bench(
    out: str = "bench-out",
    quick: bool = False,
    *,
    sizes: Sequence[int] | None = None,
    masks: Sequence[str] = MASKS,
    flex_sizes: Sequence[int] | None = None,
    repeats: int | None = None,
    dtype: str = "float32",
) -> int:
    """Run the benchmark, print and save ``bench.md``, ``bench.json`` and ``bench.png`` under ``out``.

    Args:
        out: folder for the outputs (created).
        quick: two small sizes (256 and 1k tokens), no FlexAttention: under a minute.
        sizes: sequence lengths to run instead of the defaults (``H=8`` up to 8k, ``H=1`` beyond).
        masks: which of :data:`MASKS` to run.
        flex_sizes: lengths at which FlexAttention is compiled and timed (default: 8192 for the
            causal, sliding-window and document masks, forward only; none with ``quick``).
        repeats: timed runs per entry (default 3, or 2 with ``quick``).
        dtype: ``float32``, ``bfloat16`` or ``float16``; the matmul peak is measured in it first.

    Returns:
        0 on success (the process exit code).
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    peak = matmul_peak(dt)
    sizes = tuple(sizes) if sizes is not None else (QUICK_SIZES if quick else FULL_SIZES)
    flex_at = set(flex_sizes) if flex_sizes is not None else (set() if quick else {8192})
    reps = repeats if repeats is not None else (2 if quick else 3)
    max_call = 1.0 if quick else 1.5
    jobs = []
    for kind in masks:
        for L in sizes:
            H = 8 if L <= 8192 else 1
            for mode in MODES:
                which = [m for m in methods() if m != "flex" or (L in flex_at and kind != "dense" and mode == "fwd")]
                jobs.append((kind, L, H, mode, which))
    results: list[Result] = []
    flex_cache: dict[Any, Any] = {}
    torch.manual_seed(0)
    for kind, L, H, mode, which in tqdm(jobs, desc="qkv bench", unit="case"):
        got = compare(
            which, kind, L, H, mode, repeats=reps, max_call_s=max_call, flex_cache=flex_cache, dtype=dt, peak=peak
        )
        results += got
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    text = (
        f"# qkv bench\n\ntorch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs ({_cpu_name()});"
        f" {dtype}, B=1, D=64; median of {reps}; ratio = SDPA time / method time in the same run.\n\n"
        f"Matmul peak in {dtype}, measured at the start of this run: {peak / 1e9:.1f} GFLOP/s. GFLOP/s counts only"
        " the work the mask leaves (4 D flops per live pair forward, 3.5x that forward+backward); (peak) is"
        " its fraction of the matmul peak.\n\n" + table(results) + "\n"
    )
    (folder / "bench.md").write_text(text)
    (folder / "bench.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot(results, folder / "bench.png")
    print(text)
    print(f"wrote {folder / 'bench.md'}, {folder / 'bench.json'} and {folder / 'bench.png'}")
    return 0

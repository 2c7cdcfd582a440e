"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") with each of qkv's token mixers.

    python benchmarks/recall.py --quick                   # width 64, one seed, lengths 64 and 128
    python benchmarks/recall.py --out bench-out/recall    # the full grid: 6 mixers, 2 widths, 3 seeds, 4 lengths

A sequence holds ``n`` key-value pairs, then the keys again in random order, spread over filler tokens;
at each repeated key the model must output that key's value::

    k1 v1 k2 v2 k3 v3 . . k2 . . . . k1 . k3 . . . .      (. = filler token 0)
                          v2         v1   v3               targets (loss and accuracy only here)

The generator follows Zoology's ``multiquery_ar``: keys come from the lower half of the vocabulary and
values from the upper half, both drawn without replacement per sequence; the gap before each query is
drawn from a power law (``p(gap = i) ∝ i^(a-1)``, ``a = 0.01``: most queries come soon after the pairs,
some much later); fillers are token 0 (Zoology's ``random_non_queries=False``, as in its Figure 2).
Chance is ``1 / (vocab / 2)`` for a model that only knows the answer is a value, and ``1 / n`` for one
that copies a random value from the context without knowing which. Two series of slices: ``n = --pairs``
(8) at every length, and ``n = L / --tokens-per-pair`` (L/8: 8, 16, 32, 64 pairs at 64 ... 512 tokens).

Every model is the same small language model; only the token mixer differs:

    ids -> tied embedding (+ a learned linear map of the previous token's embedding)
        -> ``--layers`` pre-norm blocks (mixer + MLP, :class:`qkv.nn.TransformerBlock`) -> LayerNorm -> logits

The previous-token term is a 2-tap short convolution, the one H3, Mamba and Based put before their
mixers: it lets a value's position know its key, so recall is one lookup instead of an induction
circuit that the model would first have to discover (with learned positions instead, exact attention
had not left the loss plateau after 300 steps in our trials). It is the same for every mixer; there
are no positional embeddings. The mixers:

- exact: :class:`qkv.nn.MultiHeadAttention`, ``mask=causal()``; its KV cache grows with the length.
- window: the same with ``causal() & sliding_window(--window)`` (32: narrower than every length).
- linear: :class:`qkv.nn.LinearSelfAttention` ``kind="linear"`` (elu+1 features), a ``(Dh, Dh)`` state per head.
- performer: the same with ``kind="performer"`` (FAVOR+, ``--features`` fixed random features).
- ssm: :class:`qkv.nn.SelectiveSSM` (Mamba-style: ``--d-state`` 16, ``--expand`` 1, 4 conv taps), a ``(Di, N)`` state.
- hybrid: exact attention and SSM layers alternating, attention first (``HybridStack``'s default ``"AMAM"``).

Parameter counts are matched: every model's MLP width is chosen so that its blocks hold as many
parameters as the exact-attention model's (MLP ``4 * width``), within 0.2%; the table reports them.
Every model gets the same training, a length curriculum: ``--steps`` AdamW steps at L = 64, then as many
at 128, 256 and 512 (each batch ``--tokens // L`` sequences of one of that length's slices, in turn; each
stage warmed up over 10% of its steps from zero to the peak lr, then cosine-decayed; the optimizer and the
weights carry over). The trained model (no positional embeddings, so any length) is then evaluated on
``--test-seqs`` fresh sequences of every slice, the same sequences for every model; the JSON also keeps
each stage's accuracy on its own length right after that stage. A seed fixes the initialisation and the
training data. ``--lrs 3e-3,1e-2`` trains every run with each peak rate and keeps the one with the better accuracy on
separate validation sequences (Zoology sweeps the learning rate the same way).

Decode state is what a mixer keeps between tokens when generating, summed over layers, in float32 bytes:
exact attention ``2 * Hkv * Dh * L`` per layer (the KV cache), the window ``2 * Hkv * Dh * (window + 1)``
per layer, linear attention ``H * (Dh * Dh + Dh)`` per layer, Performer ``H * (m * Dh + m)`` per layer, the
SSM ``Di * N + Di * (d_conv - 1)`` per layer; computed from the built modules (a test checks it against the
bytes qkv's own decoding caches hold). The previous-token embedding adds ``width`` floats to every model and
is not counted.

Writes ``recall.md`` (the table, also printed), ``recall.json`` (every run) and ``recall.png`` (accuracy
against length, one line per mixer, one panel per width, one row per pairs series) under ``--out``.
Runs go ``--workers`` processes at a time (one thread each), with a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.masks import causal, sliding_window
from qkv.nn import LinearSelfAttention, MultiHeadAttention, SelectiveSSM, TransformerBlock

MIXERS = ("exact", "window", "linear", "performer", "ssm", "hybrid")
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Config:
    """Everything a run depends on (``--quick`` and the command line change it)."""

    lengths: tuple[int, ...] = (64, 128, 256, 512)
    fixed_pairs: int = 8  # one series: this many pairs at every length
    tokens_per_pair: int = 8  # the other series: L // tokens_per_pair pairs
    widths: tuple[int, ...] = (32, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    mixers: tuple[str, ...] = MIXERS
    layers: int = 2
    heads: int = 4
    vocab: int = 256
    window: int = 32
    features: int = 64
    d_state: int = 16
    expand: int = 1
    steps: int = 100  # per length
    tokens: int = 1024  # per batch: tokens // L sequences
    lrs: tuple[float, ...] = (1e-2,)  # with several, every run is trained with each and validation picks one
    val_seqs: int = 64
    test_seqs: int = 128
    power_a: float = 0.01

    def slices(self) -> list[tuple[int, int]]:
        """The (length, pairs) settings trained and evaluated: the fixed-pairs series, then the scaled one."""
        out = [(L, self.fixed_pairs) for L in self.lengths]
        out += [(L, L // self.tokens_per_pair) for L in self.lengths if L // self.tokens_per_pair != self.fixed_pairs]
        return out

    def check(self) -> None:
        if not self.lengths or not self.widths or not self.seeds or not self.mixers:
            raise ValueError("lengths, widths, seeds and mixers must not be empty")
        bad = [m for m in self.mixers if m not in MIXERS]
        if bad:
            raise ValueError(f"mixers must be among {MIXERS}, got {bad}")
        for L, n in self.slices():
            if n < 1 or 4 * n > L:
                raise ValueError(f"a length-{L} sequence holds 1 to {L // 4} pairs (pairs and queries), got {n}")
            if n > self.vocab // 2 - 1:
                raise ValueError(f"{n} pairs need more than {self.vocab // 2 - 1} keys: raise vocab={self.vocab}")
            if self.tokens < L:
                raise ValueError(f"tokens={self.tokens} per batch must be at least the length {L}")
        for w in self.widths:
            if w % self.heads:
                raise ValueError(f"heads={self.heads} must divide every width, got width {w}")
        if not self.lrs or min(self.lrs) <= 0 or self.steps < 1:
            raise ValueError(f"need steps >= 1 and positive learning rates, got steps={self.steps}, lrs={self.lrs}")
        if self.window + 1 >= min(self.lengths):
            raise ValueError(f"window={self.window} must be narrower than every length, got {min(self.lengths)}")


def mqar(
    n: int, length: int, pairs: int, vocab: int, generator: torch.Generator, power_a: float = 0.01
) -> tuple[Tensor, Tensor]:
    """``n`` MQAR sequences: ``ids (n, length)`` and ``targets (n, length)``, ``-100`` except at queries.

    Keys are drawn from ``1 .. vocab/2 - 1`` and values from ``vocab/2 .. vocab - 1`` (without replacement
    within a sequence); the pairs fill the first ``2 * pairs`` positions; each key is asked once, at an
    even offset after them chosen with probability ``∝ gap^(power_a - 1)``; the target at a query is the
    key's value (the next token to predict). Other positions are token 0.
    """
    half = vocab // 2
    if 4 * pairs > length or pairs > half - 1:
        raise ValueError(f"mqar: {pairs} pairs do not fit a length-{length} sequence with vocab {vocab}")
    keys = torch.rand(n, half - 1, generator=generator).argsort(-1)[:, :pairs] + 1
    values = torch.rand(n, vocab - half, generator=generator).argsort(-1)[:, :pairs] + half
    ctx = 2 * pairs
    ids = torch.zeros(n, length, dtype=torch.long)
    targets = torch.full((n, length), -100, dtype=torch.long)
    ids[:, 0:ctx:2], ids[:, 1:ctx:2] = keys, values
    space = (length - ctx) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    slots = torch.multinomial(p.expand(n, space), pairs, replacement=False, generator=generator)
    pos = ctx + 2 * slots
    ids.scatter_(1, pos, keys)
    targets.scatter_(1, pos, values)
    return ids, targets


class Recaller(nn.Module):
    """The small language model of the study; ``mixer`` picks each block's token mixer.

    ``forward(ids (B, L)) -> hidden (B, L, E)``; :meth:`logits` maps hidden states ``(N, E)`` to ``(N, V)``
    through the tied embedding.
    """

    def __init__(self, mixer: str, cfg: Config, width: int, d_ff: int, seed: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab, width)
        nn.init.normal_(self.emb.weight, std=width**-0.5)  # tied with the output: logits start near 0
        self.shift = nn.Linear(width, width, bias=False)  # the previous token's embedding, mapped
        # the hybrid alternates exact attention and the SSM, attention first (HybridStack's default "AMAM")
        self.kinds = [("exact" if i % 2 == 0 else "ssm") if mixer == "hybrid" else mixer for i in range(cfg.layers)]
        blocks = []
        for i, kind in enumerate(self.kinds):
            m: nn.Module | None = None
            if kind == "ssm":
                m = SelectiveSSM(width, d_state=cfg.d_state, expand=cfg.expand)
            elif kind in ("linear", "performer"):
                m = LinearSelfAttention(
                    width, cfg.heads, kind, num_features=cfg.features, redraw_interval=0, seed=1000 * seed + i
                )
            blocks.append(TransformerBlock(width, cfg.heads, d_ff, norm_first=True, mixer=m))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(width)
        self.masks = {k: causal() for k in ("exact", "linear", "performer", "ssm")}
        self.masks["window"] = causal() & sliding_window(cfg.window)
        self.window = cfg.window

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids)
        x = e + F.pad(self.shift(e[:, :-1]), (0, 0, 1, 0))
        for kind, blk in zip(self.kinds, self.blocks):
            x = blk(x, mask=self.masks[kind])
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        return h @ self.emb.weight.T

    def block_params(self) -> int:
        """Parameters in the blocks (mixers, MLPs, norms): what the matching equalises."""
        return sum(p.numel() for p in self.blocks.parameters())

    def decode_state_bytes(self, length: int) -> int:
        """Bytes every mixer keeps between tokens after ``length`` tokens when decoding (float32)."""
        total = 0
        for kind, blk in zip(self.kinds, self.blocks):
            m = blk.mixer
            if isinstance(m, MultiHeadAttention):
                keys = min(length, self.window + 1) if kind == "window" else length
                total += 2 * m.k_proj.out_features * keys  # keys and values, Hkv * Dh wide
            elif isinstance(m, LinearSelfAttention):
                feat = m.head_dim if m.kind == "linear" else m.projection.shape[0]
                total += m.num_heads * (feat * m.head_dim + feat)  # Σ φ(k) vᵀ and Σ φ(k)
            elif isinstance(m, SelectiveSSM):
                total += m.d_inner * m.d_state + m.d_inner * max(m.d_conv - 1, 0)
            else:
                raise TypeError(f"no decode-state rule for {type(m).__name__}")
        return FLOAT_BYTES * total


def matched_d_ff(mixer: str, cfg: Config, width: int) -> int:
    """The MLP width that gives ``mixer``'s blocks the parameter count of exact attention's with MLP ``4 * width``."""
    target = Recaller("exact", cfg, width, 4 * width, 0).block_params()
    probe = Recaller(mixer, cfg, width, 4 * width, 0).block_params()
    per_unit = cfg.layers * (2 * width + 1)  # one more hidden unit: a row, a column and a bias per block
    return max(1, 4 * width + round((target - probe) / per_unit))


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def evaluate(model: Recaller, cfg: Config, slices: list[tuple[int, int]], seqs: int, base_seed: int) -> dict[str, float]:
    """Accuracy (%) at the query positions of ``seqs`` fresh sequences per slice, drawn from a generator
    seeded by ``base_seed`` and the slice (the same sequences for every model)."""
    model.eval()
    out = {}
    with torch.no_grad():
        for L, n in slices:
            gen = torch.Generator().manual_seed(base_seed + 1000 * L + n)
            ids, targets = mqar(seqs, L, n, cfg.vocab, gen, cfg.power_a)
            right = total = 0
            per = max(1, 4 * cfg.tokens // L)
            for s in range(0, seqs, per):
                t = targets[s : s + per]
                sel = t >= 0
                pred = model.logits(model(ids[s : s + per])[sel]).argmax(-1)
                right += int((pred == t[sel]).sum())
                total += int(sel.sum())
            out[f"{L}/{n}"] = 100.0 * right / total
    model.train()
    return out


VAL_SEED, TEST_SEED = 20_000_000, 10_000_000


def within_window(cfg: Config, length: int, pairs: int) -> float:
    """% of the test queries whose value lies at most ``cfg.window`` tokens back: what one hop of the
    sliding window can reach (the value's position holds its key through the previous-token term)."""
    gen = torch.Generator().manual_seed(TEST_SEED + 1000 * length + pairs)
    ids, targets = mqar(cfg.test_seqs, length, pairs, cfg.vocab, gen, cfg.power_a)
    hit = total = 0
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        value_at = {row[2 * i]: 2 * i + 1 for i in range(pairs)}
        for p, t in enumerate(tgt):
            if t >= 0:
                hit += p - value_at[row[p]] <= cfg.window
                total += 1
    return 100.0 * hit / total


def train_one(
    mixer: str, width: int, seed: int, lr: float, cfg: Config, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train one model through the lengths in increasing order (``cfg.steps`` steps per length, on that
    length's slices in turn, each stage with its own warmup and cosine decay from ``lr``; the optimizer
    carries over), evaluate it at the end of each stage on that length's slices (``stage_accuracy``) and,
    at the end, on every slice (``accuracy``, and ``val_accuracy`` on validation sequences when several
    learning rates are tried). Returns the run's record (accuracies in %)."""
    d_ff = matched_d_ff(mixer, cfg, width)
    torch.manual_seed(seed)
    model = Recaller(mixer, cfg, width, d_ff, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s % cfg.steps, cfg.steps))
    gen = torch.Generator().manual_seed(seed)
    stage: dict[str, float] = {}
    losses: dict[str, float] = {}
    wall = cpu = 0.0
    for length in sorted(cfg.lengths):
        slices = [(L, n) for L, n in cfg.slices() if L == length]
        t0, c0 = time.perf_counter(), time.process_time()
        recent: list[float] = []
        for step in range(cfg.steps):
            L, n = slices[step % len(slices)]
            ids, targets = mqar(cfg.tokens // L, L, n, cfg.vocab, gen, cfg.power_a)
            sel = targets >= 0
            loss = F.cross_entropy(model.logits(model(ids)[sel]), targets[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            recent = (recent + [loss.item()])[-10:]
            if progress is not None and (step + 1) % 10 == 0:
                progress(10)
        if progress is not None and cfg.steps % 10:
            progress(cfg.steps % 10)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        losses[str(length)] = statistics.mean(recent)
        stage.update(evaluate(model, cfg, slices, cfg.test_seqs, TEST_SEED))
    acc = evaluate(model, cfg, cfg.slices(), cfg.test_seqs, TEST_SEED)
    val = evaluate(model, cfg, cfg.slices(), cfg.val_seqs, VAL_SEED) if len(cfg.lrs) > 1 else {}
    return {
        "mixer": mixer,
        "width": width,
        "seed": seed,
        "lr": lr,
        "d_ff": d_ff,
        "block_params": model.block_params(),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": losses,
        "val_accuracy": val,
        "accuracy": acc,
        "stage_accuracy": stage,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
    }


def select(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (mixer, width, seed), the run whose learning rate gave the best mean validation accuracy
    over all slices (the first run on a tie, or when only one learning rate was tried)."""

    def score(r: dict[str, Any]) -> float:
        return statistics.mean(r["val_accuracy"].values()) if r["val_accuracy"] else 0.0

    best: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in results:
        key = (r["mixer"], r["width"], r["seed"])
        if key not in best or score(r) > score(best[key]):
            best[key] = r
    return list(best.values())


def _worker(args: tuple[str, int, int, float, Config, Any, int]) -> dict[str, Any]:
    mixer, width, seed, lr, cfg, queue, threads = args
    torch.set_num_threads(threads)
    return train_one(mixer, width, seed, lr, cfg, queue.put if queue is not None else None)


def run_all(
    cfg: Config, workers: int, threads: int, on_result: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Every (mixer, width, seed, learning rate) run, ``workers`` processes at a time, with a progress bar on
    stderr; ``on_result`` is called with each run's record as it finishes."""
    from tqdm import tqdm

    cfg.check()
    cost = {"ssm": 4.0, "hybrid": 3.0, "performer": 1.5}  # rough relative step times: start slow runs first
    jobs = sorted(
        ((m, w, s, lr) for m in cfg.mixers for w in cfg.widths for s in cfg.seeds for lr in cfg.lrs),
        key=lambda j: -cost.get(j[0], 1.0) * j[1],
    )
    bar = tqdm(total=len(jobs) * len(cfg.lengths) * cfg.steps, desc="recall", unit="step", file=sys.stderr)
    results: list[dict[str, Any]] = []
    if workers <= 1:
        torch.set_num_threads(threads)
        for m, w, s, lr in jobs:
            bar.set_postfix_str(f"{m} w={w} seed={s} lr={lr:g}")
            results.append(train_one(m, w, s, lr, cfg, bar.update))
            if on_result is not None:
                on_result(results[-1])
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            queue = manager.Queue()
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(_worker, (m, w, s, lr, cfg, queue, threads)) for m, w, s, lr in jobs]
                pending = set(futures)
                while pending:
                    while not queue.empty():
                        bar.update(queue.get())
                    finished = {f for f in pending if f.done()}
                    for f in as_completed(finished):
                        results.append(f.result())
                        if on_result is not None:
                            on_result(results[-1])
                        r = results[-1]
                        bar.set_postfix_str(f"done {r['mixer']} w={r['width']} seed={r['seed']} lr={r['lr']:g}")
                    pending -= finished
                    time.sleep(0.2)
                while not queue.empty():
                    bar.update(queue.get())
    bar.close()
    return results


def _kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB" if b < 1024 * 1024 else f"{b / 2**20:.2f} MiB"


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def summarise(results: list[dict[str, Any]], cfg: Config) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (mixer, width), over the seeds' selected runs: accuracy mean, sample standard deviation, min
    and max per slice; the learning rates picked; the blocks' parameters, MLP width and decode state
    (bytes) at each length and per token at the longest length."""
    chosen = select(results)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for m in cfg.mixers:
        for w in cfg.widths:
            runs = [r for r in chosen if r["mixer"] == m and r["width"] == w]
            if not runs:
                continue
            acc = {}
            for L, n in cfg.slices():
                xs = [r["accuracy"][f"{L}/{n}"] for r in runs if f"{L}/{n}" in r["accuracy"]]
                if xs:
                    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                    acc[f"{L}/{n}"] = (statistics.mean(xs), sd, min(xs), max(xs))
            model = Recaller(m, cfg, w, runs[0]["d_ff"], 0)
            state = {L: model.decode_state_bytes(L) for L in cfg.lengths}
            hi = max(cfg.lengths)
            state["per_token"] = model.decode_state_bytes(hi) - model.decode_state_bytes(hi - 1)
            lrs = [r["lr"] for r in runs]
            picked = ", ".join(f"{_lr(x)} x{lrs.count(x)}" for x in sorted(set(lrs)))
            out[(m, w)] = {
                "acc": acc,
                "state": state,
                "params": runs[0]["block_params"],
                "d_ff": runs[0]["d_ff"],
                "lrs": picked,
            }
    return out


def table(results: list[dict[str, Any]], cfg: Config, wall_s: float, workers: int, threads: int) -> str:
    """The markdown report: settings, then one row per (mixer, width)."""
    summ = summarise(results, cfg)
    slices = cfg.slices()
    lo, hi = min(cfg.lengths), max(cfg.lengths)
    sweep = len(cfg.lrs) > 1
    head = ["mixer", "width", "params (blocks)", "MLP"] + (["lr picked"] if sweep else [])
    head += ["state/token", f"state L={lo}", f"state L={hi}"]
    head += [f"L={L} n={n}" for L, n in slices]
    cpu = sum(r["train_cpu_s"] for r in results)
    lr_text = f"peak lr {_lr(cfg.lrs[0])}"
    if len(cfg.lrs) > 1:
        lr_text = (
            f"peak lr {' and '.join(_lr(x) for x in cfg.lrs)} each tried, the one with the better accuracy on "
            f"{cfg.val_seqs} validation sequences per slice kept per seed"
        )
    lines = [
        "# Multi-query associative recall (MQAR) by token mixer",
        "",
        f"Recall accuracy % at the queries of {cfg.test_seqs} test sequences per slice (mean ± sample std over "
        f"{len(cfg.seeds)} seed(s)); n = key-value pairs. {cfg.layers} layers, {cfg.heads} heads, vocab {cfg.vocab} "
        f"(chance {100 / (cfg.vocab - cfg.vocab // 2):.1f}%; a random value from the context: 100/n %), window "
        f"{cfg.window}, Performer {cfg.features} features, SSM d_state {cfg.d_state} expand {cfg.expand}. Each model "
        f"is trained through the lengths in order, {cfg.steps} steps of {cfg.tokens} tokens per length on that "
        f"length's slices, {lr_text}; then evaluated on every slice. Decode state: float32 bytes summed "
        f"over layers. {len(results)} runs: {cpu / 60:.1f} CPU-minutes of training, {wall_s / 60:.1f} min wall with "
        f"{workers} worker(s) x {threads} thread(s) on {os.cpu_count()} CPUs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * 2 + ["---"] * sweep + ["---:"] * (len(head) - 4 - sweep)) + "|",
    ]
    for (m, w), s in summ.items():
        st = s["state"]
        row = [m, str(w), f"{s['params']:,}", str(s["d_ff"])] + ([s["lrs"]] if sweep else []) + [f"{st['per_token']} B"]
        row += [_kib(st[lo]), _kib(st[hi])]
        for L, n in slices:
            if f"{L}/{n}" in s["acc"]:
                mean, sd, _, _ = s["acc"][f"{L}/{n}"]
                row.append(f"{mean:.1f} ±{sd:.1f}")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    if "window" in cfg.mixers:
        pad = [""] * (len(head) - len(slices) - 1)
        reach = [f"{within_window(cfg, L, n):.1f}" for L, n in slices]
        lines.append("| " + " | ".join([f"(queries within {cfg.window} tokens of their value)"] + pad + reach) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], cfg: Config, path: str) -> None:
    """Accuracy against length: one line per mixer (shaded: min to max over seeds), a panel per width,
    a row per pairs series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarise(results, cfg)
    series = [(f"n = {cfg.fixed_pairs} pairs", [(L, cfg.fixed_pairs) for L in cfg.lengths])]
    series.append((f"n = L/{cfg.tokens_per_pair} pairs", [(L, L // cfg.tokens_per_pair) for L in cfg.lengths]))
    fig, axes = plt.subplots(
        len(series), len(cfg.widths), figsize=(4.2 * len(cfg.widths), 3.4 * len(series)), squeeze=False, sharey=True
    )
    colours = dict(zip(MIXERS, plt.get_cmap("tab10").colors))
    for row, (title, sl) in enumerate(series):
        for col, w in enumerate(cfg.widths):
            ax = axes[row][col]
            for m in cfg.mixers:
                if (m, w) not in summ:
                    continue
                acc = summ[(m, w)]["acc"]
                xs = [L for L, _ in sl]
                mean = [acc[f"{L}/{n}"][0] for L, n in sl]
                dashed = m == "hybrid"  # it lies on exact attention's line: dashed so that both show
                ax.plot(xs, mean, marker="o", color=colours[m], label=m, ls="--" if dashed else "-")
                ax.fill_between(
                    xs, [acc[f"{L}/{n}"][2] for L, n in sl], [acc[f"{L}/{n}"][3] for L, n in sl], color=colours[m], alpha=0.15
                )
            ax.plot(xs, [100.0 / n for _, n in sl], ls=":", color="grey", label="1/n (random context value)")
            if "window" in cfg.mixers:
                reach = [within_window(cfg, L, n) for L, n in sl]
                ax.plot(xs, reach, ls=":", color=colours["window"], label=f"queries within {cfg.window} tokens")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(-3, 103)
            ax.set_title(f"width {w}, {title}", fontsize=10)
            ax.set_xlabel("sequence length")
            if col == 0:
                ax.set_ylabel("recall accuracy %")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4 if len(cfg.widths) > 1 else 2, fontsize=8, frameon=False)
    fig.suptitle(
        f"MQAR recall by token mixer, {cfg.layers} layers, {cfg.steps} steps per length\n"
        f"mean of {len(cfg.seeds)} seed(s), band: min to max",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08 if len(cfg.widths) > 1 else 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    ap.add_argument("--quick", action="store_true", help="width 64, one seed, lengths 64 and 128")
    ap.add_argument("--out", default="bench-out/recall", help="folder for recall.md, recall.json, recall.png")
    ap.add_argument("--mixers", default=",".join(d.mixers))
    ap.add_argument("--lengths", type=_ints, default=None, help="comma-separated, default 64,128,256,512")
    ap.add_argument("--widths", type=_ints, default=None, help="default 32,64")
    ap.add_argument("--seeds", type=_ints, default=None, help="default 0,1,2")
    ap.add_argument("--pairs", type=int, default=d.fixed_pairs, help="pairs of the fixed series")
    ap.add_argument("--tokens-per-pair", type=int, default=d.tokens_per_pair, help="the scaled series has L // this")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=d.tokens, help="tokens per training batch")
    ap.add_argument("--lrs", type=_floats, default=d.lrs, help="peak learning rates, comma-separated (default 1e-2); "
                    "with several, each run is trained with each and validation accuracy picks one")
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--window", type=int, default=d.window)
    ap.add_argument("--features", type=int, default=d.features)
    ap.add_argument("--d-state", type=int, default=d.d_state)
    ap.add_argument("--expand", type=int, default=d.expand)
    ap.add_argument("--test-seqs", type=int, default=None)
    ap.add_argument("--val-seqs", type=int, default=None)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (1 thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--from-json", default=None, help="redraw the table and plot of a finished run's recall.json")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        conf = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
        report(saved["runs"], Config(**conf), saved["wall_s"], saved.get("workers", 2), saved.get("threads", 1), a.out)
        return
    cfg = replace(
        d,
        mixers=tuple(m for m in a.mixers.split(",") if m),
        fixed_pairs=a.pairs,
        tokens_per_pair=a.tokens_per_pair,
        tokens=a.tokens,
        lrs=a.lrs,
        layers=a.layers,
        heads=a.heads,
        vocab=a.vocab,
        window=a.window,
        features=a.features,
        d_state=a.d_state,
        expand=a.expand,
    )
    if a.quick:
        cfg = replace(cfg, lengths=(64, 128), widths=(64,), seeds=(0,), val_seqs=32, test_seqs=64)
    for name in ("lengths", "widths", "seeds", "steps", "test_seqs", "val_seqs"):
        if getattr(a, name) is not None:
            cfg = replace(cfg, **{name: getattr(a, name)})
    try:
        cfg.check()
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(a.out, exist_ok=True)
    partial = os.path.join(a.out, "recall.partial.jsonl")  # each run as it finishes, in case of interruption
    open(partial, "w").close()

    def keep(r: dict[str, Any]) -> None:
        with open(partial, "a") as f:
            f.write(json.dumps(r) + "\n")

    t0 = time.perf_counter()
    results = run_all(cfg, a.workers, a.threads, keep)
    wall = time.perf_counter() - t0
    os.remove(partial)
    with open(os.path.join(a.out, "recall.json"), "w") as f:
        chosen = {id(r) for r in select(results)}
        runs = [{**r, "selected": id(r) in chosen} for r in results]
        saved = {"config": asdict(cfg), "wall_s": wall, "workers": a.workers, "threads": a.threads, "runs": runs}
        json.dump(saved, f, indent=1)
    report(results, cfg, wall, a.workers, a.threads, a.out)


def report(results: list[dict[str, Any]], cfg: Config, wall: float, workers: int, threads: int, out: str) -> None:
    """Write ``recall.md`` and ``recall.png`` under ``out`` and print the table."""
    os.makedirs(out, exist_ok=True)
    text = table(results, cfg, wall, workers, threads)
    with open(os.path.join(out, "recall.md"), "w") as f:
        f.write(text + "\n")
    plot(results, cfg, os.path.join(out, "recall.png"))
    print(text)


if __name__ == "__main__":
    main()

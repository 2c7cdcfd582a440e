"""Training, evaluation and the report of ``qkv demo``."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...analysis.render import plot_alignment
from ...analysis.viewer import write_viewer
from ...models.seq2seq import Seq2Seq, TransformerSeq2Seq
from ...nn.base import capture_weights
from .data import PAD, Example, Vocab, batchify, make_dataset
from .report import plot_curves

__all__ = ["DemoConfig", "ModelResult", "run_demo", "train_models"]

MODELS = ("rnn", "rnn+attention", "transformer")
LABELS = {
    "rnn": "GRU encoder-decoder, no attention",
    "rnn+attention": "GRU encoder-decoder + Bahdanau attention",
    "transformer": "Transformer (2+2 layers, 4 heads)",
}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of a demo run. ``quick()`` is the CI run (well under a minute), ``full()`` the real one."""

    max_numbers: int = 4
    n_train: int = 20000
    n_test: int = 1000
    steps: dict[str, int] = field(default_factory=lambda: {"rnn": 1000, "rnn+attention": 1000, "transformer": 1000})
    batch: int = 64
    hidden: int = 128
    emb: int = 64
    dim: int = 64
    eval_every: int = 250
    lr_rnn: float = 3e-3
    lr_transformer: float = 1e-3
    buckets: tuple[tuple[int, int], ...] = ((1, 5), (6, 11), (12, 17), (18, 23))

    @staticmethod
    def quick() -> DemoConfig:
        return DemoConfig(
            n_train=2000,
            n_test=300,
            steps={"rnn": 100, "rnn+attention": 100, "transformer": 100},
            batch=32,
            eval_every=50,
            hidden=96,
            lr_transformer=3e-3,
        )

    @staticmethod
    def full() -> DemoConfig:
        return DemoConfig()


@dataclass
class ModelResult:
    """What one model's training gave: loss curve, held-out accuracy overall and by source-length bucket."""

    name: str
    params: int
    seconds: float
    losses: list[float]
    val_steps: list[int]
    val_acc: list[float]
    accuracy: float
    by_bucket: dict[str, tuple[float, int]]
    samples: list[tuple[list[str], list[str], list[str]]]


def _schedule(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``min(100, steps // 10)`` steps, then linear decay to 5%."""
    warm = max(1, min(100, steps // 10))
    return lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(steps, 1))


def _build(name: str, cfg: DemoConfig, sv: Vocab, tv: Vocab) -> nn.Module:
    if name == "transformer":
        return TransformerSeq2Seq(len(sv), len(tv), dim=cfg.dim, heads=4, layers=2, max_len=64)
    att = "none" if name == "rnn" else "bahdanau"
    return Seq2Seq(len(sv), len(tv), emb=cfg.emb, hidden=cfg.hidden, attention=att)  # type: ignore[arg-type]


def _logits(model: nn.Module, src: Tensor, lengths: Tensor, tin: Tensor) -> Tensor:
    out = model(src, lengths, tin)
    return out[0] if isinstance(out, tuple) else out


def _greedy(model: nn.Module, src: Tensor, lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor | None]:
    out = model.greedy(src, lengths, max_len)  # type: ignore[operator]
    return out if isinstance(out, tuple) else (out, None)


def evaluate(
    model: nn.Module, exs: list[Example], sv: Vocab, tv: Vocab, buckets: tuple[tuple[int, int], ...]
) -> tuple[float, dict[str, tuple[float, int]], list[list[str]]]:
    """Exact-match accuracy of greedy translations of ``exs``: overall, per source-length bucket
    ``"lo-hi": (accuracy, count)``, and the predicted token lists."""
    model.eval()
    preds: list[list[str]] = []
    for i in range(0, len(exs), 256):
        chunk = exs[i : i + 256]
        src, lengths, _, tout = batchify(chunk, sv, tv)
        toks, _ = _greedy(model, src, lengths, tout.shape[1] + 2)
        preds += [tv.decode(row) for row in toks.tolist()]
    model.train()
    ok = [p == list(e.tgt) for p, e in zip(preds, exs)]
    by: dict[str, tuple[float, int]] = {}
    for lo, hi in buckets:
        sel = [o for o, e in zip(ok, exs) if lo <= len(e.src) <= hi]
        by[f"{lo}-{hi}"] = (sum(sel) / len(sel) if sel else float("nan"), len(sel))
    return sum(ok) / len(ok), by, preds


def train_models(
    cfg: DemoConfig,
    seed: int = 0,
    progress: Callable[[str, int], Any] | None = None,
) -> tuple[dict[str, tuple[nn.Module, ModelResult]], list[Example], Vocab, Vocab]:
    """Generate the data from ``seed`` and train the three models; ``progress(name, total)`` may return a
    tqdm-like object with ``update(n)``, ``set_postfix_str(s)`` and ``close()``.

    Returns ``{name: (model, result)}``, the test examples and the two vocabularies."""
    train, test, sv, tv = make_dataset(cfg.n_train, cfg.n_test, cfg.max_numbers, seed)
    val = test[: min(100, len(test))]
    out: dict[str, tuple[nn.Module, ModelResult]] = {}
    for mi, name in enumerate(MODELS):
        torch.manual_seed(seed * 1000 + mi)
        rng = random.Random(seed * 1000 + mi)
        model = _build(name, cfg, sv, tv)
        lr = cfg.lr_transformer if name == "transformer" else cfg.lr_rnn
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps = cfg.steps[name]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
        bar = progress(name, steps) if progress else None
        losses: list[float] = []
        vsteps: list[int] = []
        vacc: list[float] = []
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            src, lengths, tin, tout = batchify(rng.sample(train, cfg.batch), sv, tv)
            logits = _logits(model, src, lengths, tin)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tout.reshape(-1), ignore_index=PAD)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % cfg.eval_every == 0 or step == steps:
                acc, _, _ = evaluate(model, val, sv, tv, cfg.buckets)
                vsteps.append(step)
                vacc.append(acc)
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss.item():.3f} val acc {acc:.0%}")
            if bar is not None:
                bar.update(1)
        secs = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        acc, by, preds = evaluate(model, test, sv, tv, cfg.buckets)
        samples = [(list(e.src), list(e.tgt), p) for e, p in zip(test[:5], preds[:5])]
        params = sum(p.numel() for p in model.parameters())
        out[name] = (model, ModelResult(name, params, secs, losses, vsteps, vacc, acc, by, samples))
    return out, test, sv, tv


def _pick_samples(test: list[Example], k: int = 3) -> list[Example]:
    """Examples with crossing alignments (a tens-and-units number) of growing length."""
    crossing = [e for e in test if "und" in e.tgt]
    crossing.sort(key=lambda e: len(e.src))
    if not crossing:
        return test[:k]
    idx = [0, len(crossing) // 2, len(crossing) - 1][:k]
    return [crossing[i] for i in idx]


def _write_report(
    out: str,
    cfg: DemoConfig,
    seed: int,
    quick: bool,
    trained: dict[str, tuple[nn.Module, ModelResult]],
    test: list[Example],
    sv: Vocab,
    tv: Vocab,
    wall: float,
) -> list[str]:
    os.makedirs(out, exist_ok=True)
    files: list[str] = []
    # alignments of the attention RNN on a few held-out examples
    rnn_att = trained["rnn+attention"][0]
    rnn_att.eval()
    for i, ex in enumerate(_pick_samples(test)):
        src, lengths, _, tout = batchify([ex], sv, tv)
        toks, align = _greedy(rnn_att, src, lengths, tout.shape[1] + 2)
        pred = tv.decode(toks[0].tolist())
        if align is None:
            continue
        n_out = min(len(pred) + 1, align.shape[1])
        path = os.path.join(out, f"alignment_{i + 1}.png")
        tgt = pred + ["<eos>"][: n_out - len(pred)]
        plot_alignment(align[0, :n_out].numpy(), list(ex.src), tgt, path, title="Bahdanau attention: English -> German")
        files.append(path)
    # training curves
    curves = os.path.join(out, "training_curves.png")
    plot_curves({LABELS[n]: r for n, (_, r) in trained.items()}, curves)
    files.append(curves)
    # the Transformer's heads on one held-out example (teacher-forced on its own translation)
    tr = trained["transformer"][0]
    tr.eval()
    ex = _pick_samples(test)[-1]
    src, lengths, _, tout = batchify([ex], sv, tv)
    pred_ids, _ = _greedy(tr, src, lengths, tout.shape[1] + 2)
    pred = tv.decode(pred_ids[0].tolist())
    tin = torch.tensor([[1] + tv.encode(pred)])
    with capture_weights(tr) as maps:
        tr(src, lengths, tin)
    src_toks, tgt_toks = list(ex.src), ["<bos>"] + pred
    pairs, labels = [], []
    for name, _ in maps:  # enc.i.mixer, dec.i.self_attn, dec.i.cross_attn
        stack, layer, part = name.split(".")
        q_toks = src_toks if stack == "enc" else tgt_toks
        k_toks = tgt_toks if part == "self_attn" else src_toks
        pairs.append((q_toks, k_toks))
        labels.append(f"{stack}.{layer}.{'cross' if part == 'cross_attn' else 'attn'}")
    viewer = os.path.join(out, "viewer.html")
    write_viewer(
        [w[0] for _, w in maps],
        pairs,
        viewer,
        layer_names=labels,
        title="qkv demo: the Transformer's attention heads (encoder, decoder, cross)",
    )
    files.append(viewer)
    # summary
    lines = [
        "# qkv demo: what attention buys",
        "",
        f"Task: lists of 1 to {cfg.max_numbers} numbers (1-999) written in English words, translated into German "
        "number words split into morphemes (`forty five` -> `fünf und vierzig`: units before tens, so the "
        f"alignment crosses). {cfg.n_train} training lists, {len(test)} held-out lists, seed {seed}"
        f"{', quick run' if quick else ''}. Wall time {wall:.0f} s.",
        "",
        "## Exact-match accuracy on held-out lists, by source length (tokens)",
        "",
        "| model | params | train s | " + " | ".join(f"len {b}" for b in trained["rnn"][1].by_bucket) + " | all |",
        "|---|---:|---:|" + "---:|" * (len(trained["rnn"][1].by_bucket) + 1),
    ]
    for name, (_, r) in trained.items():
        cells = " | ".join(f"{a:.1%} (n={n})" for a, n in r.by_bucket.values())
        lines.append(f"| {LABELS[name]} | {r.params:,} | {r.seconds:.0f} | {cells} | {r.accuracy:.1%} |")
    lines += ["", "## Sample translations (held out)", ""]
    for name, (_, r) in trained.items():
        lines.append(f"**{LABELS[name]}**")
        lines.append("")
        for s, t, p in r.samples[:3]:
            mark = "ok" if p == t else "WRONG"
            lines.append(f"- `{' '.join(s)}` -> `{' '.join(p)}` ({mark}; reference `{' '.join(t)}`)")
        lines.append("")
    lines += ["## Files", ""] + [f"- `{os.path.basename(f)}`" for f in files]
    summary = os.path.join(out, "summary.md")
    with open(summary, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    files.append(summary)
    return files


def run_demo(out: str = "qkv-demo", quick: bool = False, seed: int = 0) -> int:
    """Train the three translators and write the report folder ``out``; returns the exit code (0).

    Args:
        out: report folder (created): ``alignment_*.png``, ``training_curves.png``, ``viewer.html``,
            ``summary.md``.
        quick: the small CI run (well under a minute) instead of the full one (a few minutes).
        seed: seeds the data split and every model's initialisation and batches; the same seed gives the
            same report.
    """
    from tqdm import tqdm

    cfg = DemoConfig.quick() if quick else DemoConfig.full()
    t0 = time.perf_counter()

    def progress(name: str, total: int) -> Any:
        return tqdm(total=total, desc=f"{name:>13}", unit="step", leave=True)

    trained, test, sv, tv = train_models(cfg, seed, progress)
    files = _write_report(out, cfg, seed, quick, trained, test, sv, tv, time.perf_counter() - t0)
    for name, (_, r) in trained.items():
        by = "  ".join(f"len {k}: {a:.0%}" for k, (a, _) in r.by_bucket.items())
        print(f"{LABELS[name]:<42} accuracy {r.accuracy:6.1%}   {by}")
    print(f"report: {files[-1]}")
    return 0

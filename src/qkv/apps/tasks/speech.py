"""``qkv train speech``: recognise spoken digit strings ("four seven two") with an attention encoder-decoder
(listen, attend and spell; Chan et al. 2016) and, as the baseline, the same model through one fixed vector.

Data (:mod:`qkv.apps.tasks.spoken`): utterances of 1 to N digits synthesised by ``espeak-ng`` with many voices
(English accents x voice variants), speeds and pitches; log-mel spectrograms computed with numpy (the
numbers librosa gives; torchaudio's wheels are built for one exact torch release each and none matches our
pinned torch 2.13 CPU build). The test set is spoken by voice variants that no training utterance uses, in every accent.

Model: two strided 1-D convolutions subsample the frames 4x (10 ms -> 40 ms), a Transformer encoder
(:class:`qkv.nn.TransformerBlock`) reads them, and a word decoder (:class:`qkv.nn.DecoderBlock`) writes
the digits with cross-attention over the encoder frames. The baseline is the same encoder-decoder whose
decoder sees only the mean of the encoder frames (cross-attention over one key: a fixed vector).

Metric: word error rate (edit distance over words / reference words) on the held-out voices, by utterance
length. Pictures: the decoder's cross-attention under the spectrogram for a few test utterances, and the
HTML viewer of every attention layer for one of them. Without ``espeak-ng`` the command exits with
status 2 and says how to install it.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import masks
from ...analysis.viewer import write_viewer
from ...nn import SinusoidalPositionalEncoding, TransformerBlock, capture_weights
from .common import TaskResult, fit
from .decoder import EncoderDecoder, WordDecoder, seq_loss, targets
from .spoken import (
    ACCENTS,
    DIGIT_WORDS,
    HOP,
    INSTALL_HINT,
    N_MELS,
    SAMPLE_RATE,
    VARIANTS,
    Utterance,
    espeak_available,
    make_utterances,
    synthesize,
    utterance_features,
)

__all__ = [
    "SpeechConfig",
    "SpeechEncoder",
    "TEST_VARIANTS",
    "build_model",
    "edit_distance",
    "missing",
    "subsampled_lengths",
    "train",
    "word_error_rate",
]

#: voice variants held out: the test set is spoken only by them (in every accent), training never hears them
TEST_VARIANTS = ("m3", "f2", "croak")


@dataclass(frozen=True)
class SpeechConfig:
    """Sizes of a run: utterances, longest digit string, model width/heads/layers, steps, batch, lr."""

    n_train: int = 3000
    n_test: int = 400
    max_digits: int = 7
    dim: int = 96
    heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 2
    steps: int = 900
    batch: int = 32
    lr: float = 2e-3
    dropout: float = 0.1
    buckets: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 7))

    @staticmethod
    def quick() -> SpeechConfig:
        return SpeechConfig(
            n_train=500, n_test=150, max_digits=5, dim=64, enc_layers=2, steps=150, buckets=((1, 2), (3, 4), (5, 5))
        )


def missing() -> str | None:
    """What ``qkv train speech`` needs and does not find (Debian's ``espeak-ng``), or None."""
    return None if espeak_available() else INSTALL_HINT


def edit_distance(ref: Sequence[object], hyp: Sequence[object]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions, each 1) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(refs: Sequence[Sequence[object]], hyps: Sequence[Sequence[object]]) -> float:
    """Corpus WER: the summed word edit distances over the summed reference lengths."""
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"word_error_rate: need equally many non-zero refs and hyps, got {len(refs)} and {len(hyps)}")
    words = sum(len(r) for r in refs)
    if words == 0:
        raise ValueError("word_error_rate: the references have no words")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / words


def subsampled_lengths(lengths: Tensor) -> Tensor:
    """Frames left after :class:`SpeechEncoder`'s two stride-2 convolutions (kernel 3, padding 1)."""
    return (lengths + 3) // 4


def _keep(lengths: Tensor, L: int) -> Tensor:
    """``(B, L)`` float: 1 at the first ``lengths[b]`` positions of row ``b``, 0 after."""
    return (torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]).float()


class SpeechEncoder(nn.Module):
    """Log-mel frames ``(B, L, n_mels)`` -> encoder frames ``(B, ceil(L / 4), dim)``: two stride-2
    convolutions, sinusoidal positions, ``layers`` pre-norm Transformer blocks masked to each row's length."""

    def __init__(self, dim: int, heads: int, layers: int, *, n_mels: int = N_MELS, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.conv1 = nn.Conv1d(n_mels, dim, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.in_norm = nn.LayerNorm(dim)  # frame features on the scale of the positions
        self.pos = SinusoidalPositionalEncoding(dim, max_len=4096)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, 2 * dim, dropout=dropout, norm_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x (B, L, n_mels)``, ``lengths (B,)`` real frames (None: all ``L``) -> ``(frames (B, S, dim), S_b (B,))``."""
        if x.dim() != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(f"SpeechEncoder: x must be (B, L, {self.n_mels}), got {tuple(x.shape)}")
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        lens1 = (lengths + 1) // 2
        h = F.gelu(self.conv1(x.transpose(1, 2) * _keep(lengths, x.shape[1])[:, None]))
        h = F.gelu(self.conv2(h * _keep(lens1, h.shape[2])[:, None]))  # padding never leaks into real frames
        lens = subsampled_lengths(lengths)
        h = self.pos(self.in_norm(h.transpose(1, 2)))
        mask = masks.padding(lens)
        for blk in self.blocks:
            h = blk(h, mask=mask)
        return self.norm(h), lens


def build_model(cfg: SpeechConfig, bottleneck: bool) -> EncoderDecoder:
    """The attention encoder-decoder (``bottleneck=False``) or its one-vector baseline."""
    enc = SpeechEncoder(cfg.dim, cfg.heads, cfg.enc_layers, dropout=cfg.dropout)
    dec = WordDecoder(cfg.dim, cfg.heads, cfg.dec_layers, max_len=cfg.max_digits + 2, dropout=cfg.dropout)
    return EncoderDecoder(enc, dec, bottleneck=bottleneck)


def _pad(feats: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    lens = torch.tensor([len(f) for f in feats])
    x = torch.zeros(len(feats), int(lens.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        x[i, : len(f)] = torch.from_numpy(f)
    return x, lens


def _batches(
    feats: list[np.ndarray], utts: list[Utterance], batch: int, seed: int
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Random batches of utterances of similar length (less padding): pools of 20 batches are sorted by
    length, cut into batches, and the batches shuffled."""
    g = random.Random(seed)
    idx = list(range(len(utts)))
    pool = 20 * batch
    while True:
        g.shuffle(idx)
        groups = []
        for p in range(0, len(idx) - batch + 1, pool):
            chunk = sorted(idx[p : p + pool], key=lambda k: len(feats[k]))
            groups += [chunk[i : i + batch] for i in range(0, len(chunk) - batch + 1, batch)]
        g.shuffle(groups)
        for j in groups:
            x, lens = _pad([feats[k] for k in j])
            # SpecAugment-style: blank one band of up to 6 mel channels per batch
            f0, fw = g.randrange(N_MELS - 6), g.randint(0, 6)
            x[:, :, f0 : f0 + fw] = 0.0
            tin, tout = targets([utts[k].digits for k in j])
            yield x, lens, tin, tout


def _loss(model: nn.Module, b: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    x, lens, tin, tout = b
    return seq_loss(model(x, lens, tin), tout, label_smoothing=0.05)


def _decode_all(model: EncoderDecoder, feats: list[np.ndarray], max_words: int, batch: int = 64) -> list[list[int]]:
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]))
    hyps: list[list[int]] = [[] for _ in feats]
    for i in range(0, len(order), batch):
        j = order[i : i + batch]
        x, lens = _pad([feats[k] for k in j])
        for k, h in zip(j, model.greedy(x, lens, max_words)):
            hyps[k] = h
    return hyps


def _by_bucket(
    refs: list[tuple[int, ...]], hyps: list[list[int]], buckets: Sequence[tuple[int, int]]
) -> dict[str, tuple[float, int]]:
    out = {}
    for lo, hi in buckets:
        sel = [i for i, r in enumerate(refs) if lo <= len(r) <= hi]
        if sel:
            name = f"{lo}-{hi}" if hi > lo else f"{lo}"
            out[name] = (word_error_rate([refs[i] for i in sel], [hyps[i] for i in sel]), len(sel))
    return out


def _plot_attention(feat: np.ndarray, layers: list[Tensor], words: list[str], title: str, path: str) -> None:
    """Spectrogram on top, then each decoder layer's cross-attention (mean over heads) on the same time axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    secs = len(feat) * HOP / SAMPLE_RATE
    n = len(layers)
    fig = Figure(
        figsize=(max(6.0, 2.5 * secs + 2.0), 2.2 + 1.2 * n + 0.18 * n * len(words)), dpi=110, layout="constrained"
    )
    axes = fig.subplots(1 + n, 1, sharex=True, gridspec_kw={"height_ratios": [1.4] + [0.25 * len(words) + 0.4] * n})
    axes[0].imshow(feat.T, origin="lower", aspect="auto", cmap="magma", extent=(0, secs, 0, feat.shape[1]))
    axes[0].set_ylabel("mel band")
    axes[0].set_title(title, fontsize=9)
    for li, w in enumerate(layers):
        a = w.mean(0).numpy()  # (words, frames)
        ax = axes[1 + li]
        ax.imshow(
            a,
            aspect="auto",
            cmap="gray_r",
            vmin=0,
            vmax=max(1e-6, float(a.max())),
            interpolation="nearest",
            extent=(0, a.shape[1] * 4 * HOP / SAMPLE_RATE, len(words) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(words)))
        ax.set_yticklabels(words, fontsize=8)
        ax.set_ylabel(f"decoder layer {li}\n(mean of heads)", fontsize=8)
    axes[-1].set_xlabel("time (s)")
    FigureCanvasAgg(fig)
    fig.savefig(path)


def _write_wav(y: np.ndarray, path: str) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())


def _pictures(
    model: EncoderDecoder, feats: list[np.ndarray], utts: list[Utterance], hyps: list[list[int]], out: str, k: int = 3
) -> list[str]:
    files: list[str] = []
    # a few correctly recognised long utterances, spoken by different voices
    picked: list[int] = []
    for i in sorted(range(len(utts)), key=lambda i: -len(utts[i].digits)):
        if hyps[i] == list(utts[i].digits) and all(utts[i].voice != utts[p].voice for p in picked):
            picked.append(i)
        if len(picked) == k:
            break
    if not picked:
        picked = [0]
    for n, i in enumerate(picked):
        u = utts[i]
        _write_wav(synthesize(u), os.path.join(out, f"speech_attention_{n + 1}.wav"))
        files.append(os.path.join(out, f"speech_attention_{n + 1}.wav"))
        x, lens = _pad([feats[i]])
        layers = [w[0] for w in model.cross_attention(x, lens, [hyps[i]])]
        words = [DIGIT_WORDS[d] for d in hyps[i]] + ["<eos>"]
        title = f'said "{u.text}", heard "{" ".join(words[:-1])}"\nheld-out voice {u.voice}, {u.speed} words/min, pitch {u.pitch}'
        path = os.path.join(out, f"speech_attention_{n + 1}.png")
        _plot_attention(feats[i], layers, words, title, path)
        files.append(path)
    # the viewer: every attention layer of the model on the first picture's utterance
    i = picked[0]
    x, lens = _pad([feats[i]])
    tin, _ = targets([hyps[i]])
    with capture_weights(model) as maps:
        model(x, lens, tin)
    S = int(subsampled_lengths(lens)[0])
    frames = [f"{t * 4 * HOP / SAMPLE_RATE:.2f}s" for t in range(S)]
    words = ["<bos>"] + [DIGIT_WORDS[d] for d in hyps[i]]
    pairs, names, ws = [], [], []
    # the decoder's cross-attention first (what the page opens on), then the encoder's and decoder's self-attention
    order = sorted(maps, key=lambda nw: (not nw[0].endswith("cross_attn"), not nw[0].startswith("encoder")))
    for name, w in order:
        w = w[0]
        if name.startswith("encoder"):
            pairs.append((frames, frames))
            w = w[:, :S, :S]
        elif name.endswith("cross_attn"):
            pairs.append((words, frames))
            w = w[:, :, :S]
        else:
            pairs.append((words, words))
        names.append(name)
        ws.append(w)
    viewer = os.path.join(out, "speech_viewer.html")
    write_viewer(ws, pairs, viewer, layer_names=names, title=f'qkv train speech: "{utts[i].text}" ({utts[i].voice})')
    files.append(viewer)
    return files


def _voices(variants: Sequence[str]) -> list[str]:
    return [f"{a}+{v}" for a in ACCENTS for v in variants]


def train(
    out: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    cfg: SpeechConfig | None = None,
) -> TaskResult:
    """Synthesise the data, train the attention model and its one-vector baseline, report the WER of both
    on held-out voices. ``cfg`` overrides the sizes (``SpeechConfig.quick()`` when ``quick``)."""
    if not espeak_available():
        raise RuntimeError(INSTALL_HINT)
    cfg = cfg or (SpeechConfig.quick() if quick else SpeechConfig())
    train_voices = _voices([v for v in VARIANTS if v not in TEST_VARIANTS])
    test_voices = _voices(TEST_VARIANTS)
    tr_utts = make_utterances(cfg.n_train, cfg.max_digits, train_voices, seed)
    te_utts = make_utterances(cfg.n_test, cfg.max_digits, test_voices, seed + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tr_utts) + len(te_utts), desc="espeak-ng + log-mel", unit="utt")
    tick = bar.update if bar is not None else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(out, "cache") if out is not None else tmp
        tr_feats = utterance_features(tr_utts, cache, progress=tick)
        te_feats = utterance_features(te_utts, cache, progress=tick)
    synth_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    results = {}
    models = {}
    losses: list[float] = []
    for name, bottleneck in (("attention", False), ("one vector", True)):
        torch.manual_seed(seed)
        model = build_model(cfg, bottleneck)
        ls = fit(
            model,
            _batches(tr_feats, tr_utts, cfg.batch, seed),
            _loss,
            cfg.steps,
            cfg.lr,
            desc=f"speech ({name})",
            progress=progress,
            weight_decay=0.01,
        )
        if not bottleneck:
            losses = ls
        hyps = _decode_all(model, te_feats, cfg.max_digits + 2)
        refs = [u.digits for u in te_utts]
        results[name] = (word_error_rate(refs, hyps), _by_bucket(refs, hyps, cfg.buckets), hyps)
        models[name] = model
    files: list[str] = []
    if out is not None:
        files = _pictures(models["attention"], te_feats, te_utts, results["attention"][2], out)
    frames = np.mean([len(f) for f in tr_feats])
    head = " | ".join(f"{b} digits" for b in results["attention"][1])
    notes = [
        f"{len(tr_utts)} training utterances ({len(train_voices)} voices), {len(te_utts)} held-out utterances"
        f" spoken by {len(test_voices)} unseen voices (variants {', '.join(TEST_VARIANTS)} in {len(ACCENTS)} accents);"
        f" mean {frames * HOP / SAMPLE_RATE:.2f} s; espeak-ng + log-mel {synth_s:.0f} s"
        + (f" (cached in {cache})" if out is not None else ""),
        f"{sum(p.numel() for p in models['attention'].parameters()):,} parameters; {cfg.steps} steps of {cfg.batch}",
        "word error rate by length (lower is better):",
        f"| model | {head} | all |",
    ]
    for name, (wer, bb, _) in results.items():
        cells = " | ".join(f"{w:.1%} (n={n})" for w, n in bb.values())
        notes.append(f"| {name} | {cells} | {wer:.1%} |")
    return TaskResult(
        "speech",
        "held-out-voice WER (attention)",
        results["attention"][0],
        "same encoder-decoder through one fixed vector",
        results["one vector"][0],
        losses,
        notes,
        files,
        models["attention"],
    )

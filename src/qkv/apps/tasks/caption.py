"""``qkv train caption``: caption scenes of 3 to 5 handwritten digits with their words in reading order
("seven two nine") with a ViT-style patch encoder and a word decoder with cross-attention over the patches,
against the same model decoding from one pooled image vector.

Data (:mod:`qkv.apps.tasks.digit_scenes`): scikit-learn's 8x8 digit scans at random places of an 8-pixel grid on a
32x64 canvas; training scenes are drawn fresh for every batch from 80% of the scans, test scenes from the
other 20%.

Model: 8x8 patches (4 x 8 = 32 of them) embedded linearly as in ViT, fixed 2-D sinusoidal plus learned
positions, pre-norm :class:`qkv.nn.TransformerBlock` s, and a :class:`qkv.nn.DecoderBlock` word decoder
(:mod:`qkv.apps.tasks.decoder`). The baseline decodes from the mean of the patch encodings (cross-attention over
one key).

Metrics on held-out scenes: exact caption accuracy (every word right, none missing or extra) of both models,
and the attention model's grounding accuracy: the fraction of generated words whose cross-attention peak
(in the LAST decoder layer, averaged over its heads: the patch with the largest weight) has its centre
inside the box of the digit that word names (word ``i`` against digit ``i`` in reading order; words beyond
the number of digits count as misses). A peak on a random patch would score 1/32 = 3.1%. Picture: each
generated word's attention over the image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ...nn import TransformerBlock, sinusoidal_table
from .common import TaskResult, fit
from .decoder import EncoderDecoder, WordDecoder, seq_loss, targets
from .digit_scenes import CANVAS, STEP, Scenes, digit_scans, make_scenes
from .spoken import DIGIT_WORDS

__all__ = ["CaptionConfig", "PatchEncoder", "build_model", "exact_accuracy", "grounding", "train"]


@dataclass(frozen=True)
class CaptionConfig:
    """Sizes of a run."""

    dim: int = 64
    heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 2
    steps: int = 2000
    batch: int = 32
    lr: float = 2e-3
    n_test: int = 1000
    dropout: float = 0.0

    @staticmethod
    def quick() -> CaptionConfig:
        return CaptionConfig(enc_layers=1, dec_layers=1, steps=400, n_test=300)


class PatchEncoder(nn.Module):
    """ViT-style: ``images (B, 1, H, W)`` -> one encoding per 8x8 patch, ``(B, (H/8) (W/8), dim)``, row-major over
    the patch grid: a linear embedding of each patch (a strided convolution, as in ViT), fixed 2-D sinusoidal
    positions (half the channels for the row, half for the column, as in MAE) plus learned ones, and
    ``layers`` pre-norm :class:`qkv.nn.TransformerBlock` s.

    Args:
        dim, heads, layers: width, attention heads and blocks of the encoder.
        canvas: the image size ``(H, W)``, multiples of 8.
        dropout: inside the blocks.
    """

    patch = STEP

    def __init__(
        self, dim: int, heads: int, layers: int, *, canvas: tuple[int, int] = CANVAS, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if canvas[0] % self.patch or canvas[1] % self.patch or dim % 4:
            raise ValueError(f"PatchEncoder: {self.patch} must divide the canvas {canvas} and 4 must divide dim={dim}")
        self.canvas = canvas
        self.grid = (canvas[0] // self.patch, canvas[1] // self.patch)
        self.embed = nn.Conv2d(1, dim, self.patch, stride=self.patch)
        # the fixed positions let the decoder look for "the leftmost digit" from the first step
        gy, gx = self.grid
        rows = sinusoidal_table(gy, dim // 2)[:, None, :].expand(gy, gx, dim // 2)
        cols = sinusoidal_table(gx, dim // 2)[None, :, :].expand(gy, gx, dim // 2)
        self.register_buffer("pos2d", torch.cat([rows, cols], -1).reshape(1, gy * gx, dim), persistent=False)
        self.pos = nn.Parameter(torch.zeros(1, gy * gx, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, 2 * dim, dropout=dropout, norm_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, None]:
        """``images (B, 1, H, W)`` -> ``(patches (B, N, dim), None)`` (every patch is real)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, *self.canvas):
            raise ValueError(
                f"PatchEncoder: images must be (B, 1, {self.canvas[0]}, {self.canvas[1]}), got {tuple(images.shape)}"
            )
        x = self.embed(images).flatten(2).transpose(1, 2) + self.pos2d + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), None


def build_model(cfg: CaptionConfig, bottleneck: bool) -> EncoderDecoder:
    """The captioner with cross-attention over patches (``bottleneck=False``) or from one pooled vector."""
    enc = PatchEncoder(cfg.dim, cfg.heads, cfg.enc_layers, dropout=cfg.dropout)
    dec = WordDecoder(cfg.dim, cfg.heads, cfg.dec_layers, max_len=8, dropout=cfg.dropout)
    return EncoderDecoder(enc, dec, bottleneck=bottleneck)


def exact_accuracy(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
    """The fraction of captions written exactly (same words, same order, same length)."""
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"exact_accuracy: need equally many non-zero refs and hyps, got {len(refs)} and {len(hyps)}")
    return sum(list(r) == list(h) for r, h in zip(refs, hyps)) / len(refs)


def grounding(
    attn: Tensor, n_words: Sequence[int], boxes: Sequence[np.ndarray], grid: tuple[int, int], patch: int
) -> tuple[int, int]:
    """Count generated words whose attention peak falls in their digit's box: ``(hits, words)``.

    Args:
        attn: ``(B, T, N)`` attention of each written word over the ``N = grid[0] * grid[1]`` patches (row-major).
        n_words: words written per scene (rows ``0 .. n_words[b] - 1`` of ``attn[b]`` are scored).
        boxes: per scene ``(k, 4)`` digit boxes ``(top, left, bottom, right)``, half-open, in reading order.
        grid: the patch grid ``(rows, cols)``; patch ``p`` has its centre at pixel
            ``(patch * (p // cols) + patch / 2, patch * (p % cols) + patch / 2)``.
    """
    if attn.dim() != 3 or attn.shape[2] != grid[0] * grid[1]:
        raise ValueError(f"grounding: attn must be (B, T, {grid[0] * grid[1]}), got {tuple(attn.shape)}")
    peak = attn.argmax(-1)  # (B, T)
    cy = (peak // grid[1]).double() * patch + patch / 2
    cx = (peak % grid[1]).double() * patch + patch / 2
    hits = words = 0
    for b, n in enumerate(n_words):
        words += n
        for i in range(min(n, len(boxes[b]))):
            t, l, bt, r = boxes[b][i].tolist()
            hits += int(t <= cy[b, i] < bt and l <= cx[b, i] < r)
    return hits, words


def _batches(scans: tuple[np.ndarray, np.ndarray], batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    rng = np.random.default_rng(seed)
    while True:
        s = make_scenes(batch, scans[0], scans[1], rng)
        tin, tout = targets(s.digits)
        yield torch.from_numpy(s.images), tin, tout


def _loss(model: nn.Module, b: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    x, tin, tout = b
    return seq_loss(model(x, None, tin), tout)


def _plot_words(scenes: Scenes, hyps: list[list[int]], attn: list[Tensor], grid: tuple[int, int], path: str) -> None:
    """One row per scene: the image, then each written word's attention (last layer, mean of heads) over it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = len(hyps)
    cols = 1 + max(len(h) for h in hyps)
    H, W = scenes.images.shape[2:]
    fig = Figure(figsize=(2.0 * cols, 1.25 * rows + 0.3), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        img = scenes.images[r, 0]
        axes[r][0].imshow(img, cmap="gray_r", vmin=0, vmax=1)
        ref = " ".join(DIGIT_WORDS[d] for d in scenes.digits[r])
        axes[r][0].set_title(f"truth: {ref}", fontsize=7)
        for i in range(1, cols):
            ax = axes[r][i]
            ax.set_xticks([])
            ax.set_yticks([])
            if i - 1 >= len(hyps[r]):
                ax.axis("off")
                continue
            a = attn[r][i - 1].reshape(grid).numpy()
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
            ax.imshow(a, cmap="inferno", alpha=0.6, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
            if i - 1 < len(scenes.boxes[r]):
                t, l, bt, rr = scenes.boxes[r][i - 1].tolist()
                ax.add_patch(Rectangle((l - 0.5, t - 0.5), rr - l, bt - t, fill=False, ec="cyan", lw=0.8))
            ax.set_title(f"wrote: {DIGIT_WORDS[hyps[r][i - 1]]}", fontsize=8)
        axes[r][0].set_xticks([])
        axes[r][0].set_yticks([])
    fig.suptitle(
        "each written word's cross-attention over the image (last decoder layer, mean of heads;"
        " cyan: the box of the digit in that place)",
        fontsize=8,
    )
    FigureCanvasAgg(fig)
    fig.savefig(path)


def train(
    out: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    cfg: CaptionConfig | None = None,
) -> TaskResult:
    """Train the captioner with cross-attention and its pooled-vector baseline; report exact caption
    accuracy of both and the grounding accuracy of the attention model on held-out scenes."""
    cfg = cfg or (CaptionConfig.quick() if quick else CaptionConfig())
    xtr, ytr, xte, yte = digit_scans(seed)
    test = make_scenes(cfg.n_test, xte, yte, np.random.default_rng(seed + 10_000))
    refs = test.digits
    x_test = torch.from_numpy(test.images)
    results: dict[str, tuple[float, list[list[int]]]] = {}
    models: dict[str, EncoderDecoder] = {}
    losses: list[float] = []
    for name, bottleneck in (("attention", False), ("pooled", True)):
        torch.manual_seed(seed)
        model = build_model(cfg, bottleneck)
        ls = fit(
            model,
            _batches((xtr, ytr), cfg.batch, seed),
            _loss,
            cfg.steps,
            cfg.lr,
            desc=f"caption ({name})",
            progress=progress,
            weight_decay=0.01,
        )
        if not bottleneck:
            losses = ls
        hyps = [h for i in range(0, len(test), 100) for h in model.greedy(x_test[i : i + 100], None, 6)]
        results[name] = (exact_accuracy(refs, hyps), hyps)
        models[name] = model
    model = models["attention"]
    hyps = results["attention"][1]
    enc = model.encoder
    assert isinstance(enc, PatchEncoder)
    hits = words = 0
    last: list[Tensor] = []
    for i in range(0, len(test), 100):
        layers = model.cross_attention(x_test[i : i + 100], None, hyps[i : i + 100])
        a = layers[-1].mean(1)  # (B, T+1, N): last layer, mean over heads
        last.extend(a)
        h, w = grounding(a, [len(h) for h in hyps[i : i + 100]], test.boxes[i : i + 100], enc.grid, enc.patch)
        hits, words = hits + h, words + w
    ground = hits / max(1, words)
    # chance: a peak on a uniformly random patch; the share of patch centres inside the digit's box
    cy = np.arange(enc.grid[0]) * enc.patch + enc.patch / 2
    cx = np.arange(enc.grid[1]) * enc.patch + enc.patch / 2
    inside = [((t <= cy) & (cy < b)).sum() * ((l <= cx) & (cx < r)).sum() for bs in test.boxes for t, l, b, r in bs]
    chance = float(np.mean(inside)) / (enc.grid[0] * enc.grid[1])
    files: list[str] = []
    if out is not None:
        k = 6
        sub = Scenes(test.images[:k], test.digits[:k], test.boxes[:k])
        path = os.path.join(out, "caption_attention.png")
        _plot_words(sub, hyps[:k], last[:k], enc.grid, path)
        files.append(path)
    by_n = []
    for n in (3, 4, 5):
        sel = [i for i, r in enumerate(refs) if len(r) == n]
        if sel:
            accs = {m: exact_accuracy([refs[i] for i in sel], [results[m][1][i] for i in sel]) for m in results}
            by_n.append(f"{n} digits: attention {accs['attention']:.1%}, pooled {accs['pooled']:.1%} (n={len(sel)})")
    notes = [
        f"{cfg.steps} steps x {cfg.batch} fresh scenes from {len(ytr)} training scans; {len(test)} held-out scenes"
        f" from {len(yte)} other scans",
        f"grounding accuracy {ground:.1%} of {words} generated words (peak of the last decoder layer's"
        f" cross-attention, mean over heads, inside that digit's box; chance {chance:.1%})",
        "exact caption accuracy by digits in the scene: " + "; ".join(by_n),
    ]
    return TaskResult(
        "caption",
        "held-out exact caption accuracy (cross-attention)",
        results["attention"][0],
        "same model decoding from one pooled image vector",
        results["pooled"][0],
        losses,
        notes,
        files,
        model,
    )

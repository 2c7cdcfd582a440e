"""render.py: files written, max-pool downsampling against a loop, labels, errors."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from qkv.analysis.render import (
    MAX_TICK_LABELS,
    _label_axis,
    downsample_max,
    plot_alignment,
    plot_grid,
    plot_head,
    plot_token_importance,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _softmax(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


def test_downsample_max_matches_loop():
    rng = np.random.default_rng(0)
    for rows, cols, size in [(1000, 37, 100), (513, 1025, 512), (7, 9, 3), (64, 64, 64)]:
        m = rng.random((rows, cols)).astype(np.float32)
        fr, fc = -(-rows // size), -(-cols // size)
        want = np.array(
            [
                [m[i : i + fr, j : j + fc].max() for j in range(0, cols, fc)]  # noqa: E203
                for i in range(0, rows, fr)
            ]
        )
        got = downsample_max(m, size)
        assert got.shape == want.shape and max(got.shape) <= size
        np.testing.assert_array_equal(got, want)
    small = rng.random((5, 6))
    assert downsample_max(small, 10) is small
    with pytest.raises(ValueError, match="2-D"):
        downsample_max(np.zeros((2, 2, 2)))


def test_plot_head_writes_png_and_shows_the_data(tmp_path):
    toks = ["[CLS]", "the", "$5", "and", "$6", "cost", "<b>", "[SEP]"]
    eye = torch.eye(8)
    a = plot_head(eye, toks, toks, tmp_path / "sub" / "eye.png", title="identity $x$")
    b = plot_head(eye.flip(1), toks, toks, tmp_path / "anti.png")
    assert a == tmp_path / "sub" / "eye.png"
    for p in (a, b):
        assert p.read_bytes()[:8] == PNG_MAGIC and 5_000 < p.stat().st_size < 400_000
    ia, ib = imread(a), imread(b)
    assert ia.shape == ib.shape and not np.array_equal(ia, ib)
    # numpy input and no tokens
    c = plot_head(np.full((3, 5), 0.2), None, None, tmp_path / "c.png")
    assert c.stat().st_size > 1_000


def test_long_sequences_stay_bounded(tmp_path):
    w = _softmax(2000, 2000)
    toks = [f"t{i}" for i in range(2000)]
    p = plot_head(w, toks, toks, tmp_path / "long.png")
    h, wd = imread(p).shape[:2]
    assert h < 1100 and wd < 1300  # figure size bounded however long the sequence
    # past MAX_TICK_LABELS tokens the axis shows positions, not tokens
    fig = Figure()
    ax = fig.add_subplot()
    _label_axis(ax, "x", toks, 2000, 7)
    _label_axis(ax, "y", toks[:MAX_TICK_LABELS], MAX_TICK_LABELS, 7)
    assert len(ax.get_xticks()) <= 12
    assert not any(t.get_text().startswith("t") for t in ax.get_xticklabels())
    assert [t.get_text() for t in ax.get_yticklabels()] == toks[:MAX_TICK_LABELS]


def test_plot_grid_layers_heads_and_gqa(tmp_path):
    toks = [f"w{i}" for i in range(10)]
    layers = [_softmax(1, 4, 10, 10, seed=1), _softmax(4, 10, 10, seed=2), _softmax(2, 10, 10, seed=3)]
    p = plot_grid(layers, toks, tmp_path / "grid.png", layer_names=["a", "b", "c"], title="grid")
    one = plot_grid(layers[:1], toks, tmp_path / "one.png")
    hp, wp = imread(p).shape[:2]
    h1, w1 = imread(one).shape[:2]
    assert wp == w1 and hp > 2 * h1  # 4 heads wide, one row per layer
    plot_grid(layers, (toks, toks), tmp_path / "pair.png")
    with pytest.raises(ValueError, match="layer_names"):
        plot_grid(layers, toks, tmp_path / "x.png", layer_names=["a"])
    with pytest.raises(TypeError, match="list"):
        plot_grid(layers[0], toks, tmp_path / "x.png")
    with pytest.raises(ValueError, match="tokens"):
        plot_grid(layers, toks[:9], tmp_path / "x.png")


def test_plot_alignment(tmp_path):
    src = ["le", "chat", "noir", "<eos>"]
    tgt = ["the", "black", "cat"]
    w = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.0, 0.1, 0.9, 0.0], [0.0, 0.9, 0.1, 0.0]])
    p = plot_alignment(w, src, tgt, tmp_path / "align.png", title="fr-en")
    img = imread(p)
    assert img.ndim == 3 and p.stat().st_size > 5_000
    with pytest.raises(ValueError, match="src_tokens has 3 tokens"):
        plot_alignment(w, src[:3], tgt, tmp_path / "x.png")
    with pytest.raises(ValueError, match="tgt_tokens"):
        plot_alignment(w, src, tgt[:2], tmp_path / "x.png")


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"weights must have 2 dims, got shape \(2, 3, 3\)"):
        plot_head(torch.zeros(2, 3, 3), None, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="q_tokens has 2 tokens but the weights have 3"):
        plot_head(torch.zeros(3, 3), ["a", "b"], None, tmp_path / "x.png")
    with pytest.raises(TypeError, match="k_tokens must be a sequence"):
        plot_head(torch.zeros(3, 3), None, "abc", tmp_path / "x.png")
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        plot_head([[1.0]], None, None, tmp_path / "x.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        plot_head(torch.zeros(0, 3), None, None, tmp_path / "x.png")


def test_plot_importance_rows_per_method(tmp_path):
    toks = ["[CLS]", "$5", "cat", "<b>", "[SEP]"]
    a = plot_token_importance(
        {"attention": torch.tensor([0.5, 0.1, 0.2, 0.1, 0.1]), "grad": -torch.arange(5.0)}, toks, tmp_path / "a.png"
    )
    b = plot_token_importance(
        {"attention": torch.tensor([0.1, 0.1, 0.2, 0.1, 0.5]), "grad": -torch.arange(5.0)}, toks, tmp_path / "b.png"
    )
    assert a.read_bytes()[:8] == PNG_MAGIC and not np.array_equal(imread(a), imread(b))
    long = plot_token_importance(
        {"x": np.random.default_rng(0).random(300)}, [str(i) for i in range(300)], tmp_path / "l.png"
    )
    assert imread(long).shape[1] <= int((16.0 + 2.4) * 110) + 2  # bounded width, however many tokens
    with pytest.raises(ValueError, match="one value per token"):
        plot_token_importance({"a": torch.ones(3), "b": torch.ones(4)}, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="tokens has 2 tokens"):
        plot_token_importance({"a": torch.ones(3)}, ["a", "b"], tmp_path / "x.png")

"""viewer.py: the embedded data decodes to the weights, the page is self-contained, and it works in Chromium.

The browser tests drive Debian's Chromium (``/usr/bin/chromium``) with Playwright; they skip only when no
Chromium binary exists (``./dev test`` installs it).
"""

import base64
import json
import os
import re
import shutil
import time
import zlib

import numpy as np
import pytest
import torch

from qkv.analysis.viewer import write_viewer

EVIL = '</script><script>alert("x")</script>'
TOKENS = ["[CLS]", "the", "cat", "&amp;", EVIL, "<b>", "sat", ".", "it", "'s", "warm", "[SEP]"]
L = len(TOKENS)


def _weights(*shape: int, seed: int = 0, causal: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g) * 2.5
    if causal:
        lq, lk = shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
    return torch.softmax(s, dim=-1)


def _layers() -> list[torch.Tensor]:
    """Two self-attention layers (one batched, one causal) and a grouped-query cross-attention layer."""
    return [
        _weights(2, 4, L, L, seed=1),
        _weights(4, L, L, seed=2, causal=True),
        _weights(6, 5, L, seed=3),
    ]


def _decode(path):
    """Independent decoder of the page's embedded data (the format in viewer.py's docstring)."""
    text = path.read_text(encoding="utf-8")
    meta_txt = re.search(r'<script type="application/json" id="qkv-meta">(.*?)</script>', text, re.S).group(1)
    data_txt = re.search(r'<script type="application/octet-stream" id="qkv-data">(.*?)</script>', text, re.S).group(1)
    meta = json.loads(meta_txt)
    blob = zlib.decompress(base64.b64decode(data_txt))
    layers = []
    for m in meta["layers"]:
        H, lq, lk, k = m["H"], m["Lq"], m["Lk"], m["k"]
        rowmax = np.frombuffer(blob, "<f4", H * lq, m["rowmax"]).reshape(H, lq)
        vals = np.frombuffer(blob, np.uint8, H * lq * k, m["vals"]).reshape(H, lq, k) / 255.0 * rowmax[..., None]
        if m["mode"] == "dense":
            w = vals
        else:
            idx = np.frombuffer(blob, "<u2", H * lq * k, m["idx"]).reshape(H, lq, k).astype(np.int64)
            w = np.zeros((H, lq, lk))
            np.put_along_axis(w, idx, vals, axis=-1)
        layers.append(w)
    return text, meta, layers


def _small_page(path):
    table = [
        {"layer": li, "head": h, "name": f"L{li}H{h}", "entropy": float(1.0 + 0.1 * (7 * li + 3 * h) % 1.3)}
        for li, w in enumerate(_layers())
        for h in range(w.shape[-3])
    ]
    toks = [(TOKENS, TOKENS), (TOKENS, TOKENS), (TOKENS[:5], TOKENS)]
    return write_viewer(
        _layers(),
        toks,
        path,
        layer_names=["enc.0", "enc.1 <causal>", "cross"],
        head_table=table,
        title="test <page> & more",
        kv_heads=[4, 2, 3],
    )


def test_dense_data_roundtrips(tmp_path):
    p = _small_page(tmp_path / "v.html")
    _, meta, got = _decode(p)
    assert [m["mode"] for m in meta["layers"]] == ["dense"] * 3
    for w, g in zip(_layers(), got):
        w = w[0] if w.ndim == 4 else w
        rowmax = w.amax(-1, keepdim=True).numpy()
        assert g.shape == tuple(w.shape)
        assert np.all(np.abs(g - w.numpy()) <= rowmax / 510 + 1e-7)  # half a quantisation step of each row
    assert meta["tokens"][meta["layers"][2]["qt"]] == TOKENS[:5]


def test_top_k_keeps_the_largest_weights(tmp_path):
    w = _weights(3, 40, 300, seed=4)
    p = write_viewer([w], ([f"q{i}" for i in range(40)], [f"k{i}" for i in range(300)]), tmp_path / "t.html", top_k=7)
    text, meta, (got,) = _decode(p)
    m = meta["layers"][0]
    assert m["mode"] == "topk" and m["k"] == 7
    top = torch.topk(w, 7, dim=-1)
    want = torch.zeros_like(w).scatter(-1, top.indices, top.values).numpy()
    assert np.all(np.abs(got - want) <= top.values[..., :1].numpy() / 510 + 1e-7)
    kept = top.values.sum(-1)
    assert m["kept_mean"] == pytest.approx(float(kept.mean()), abs=1e-4)
    assert m["kept_min"] == pytest.approx(float(kept.min()), abs=1e-4)
    # the default budget switches to top-k by itself and stays small for long sequences
    big = write_viewer([w], ([f"q{i}" for i in range(40)], [f"k{i}" for i in range(300)]), tmp_path / "b.html")
    assert _decode(big)[1]["layers"][0]["mode"] == "dense"
    small = write_viewer(
        [w], ([str(i) for i in range(40)], [str(i) for i in range(300)]), tmp_path / "s.html", max_cells=1000
    )
    assert _decode(small)[1]["layers"][0]["k"] == 8


def test_page_is_self_contained_and_escaped(tmp_path):
    p = _small_page(tmp_path / "v.html")
    text = p.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert not re.search(r"<(link|img|iframe)\b", text) and not re.search(r"<script[^>]*\bsrc=", text)
    assert EVIL not in text and "<b>" not in text and "<causal>" not in text
    assert text.count("</script>") == 3  # meta, data, code: no token closed a script element
    assert "<title>test &lt;page&gt; &amp; more</title>" in text
    _, meta, _ = _decode(p)
    assert meta["tokens"][0] == TOKENS and meta["layers"][1]["name"] == "enc.1 <causal>"


def test_bad_arguments(tmp_path):
    w = _weights(2, 4, 4)
    toks = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"layer 0 has weights \(H, Lq, Lk\) = \(2, 4, 4\) but 3 query"):
        write_viewer([w], toks[:3], tmp_path / "x.html")
    with pytest.raises(TypeError, match="one .* per layer"):
        write_viewer(w, toks, tmp_path / "x.html")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one layer"):
        write_viewer([], toks, tmp_path / "x.html")
    with pytest.raises(ValueError, match=r"weights\[0\] must be \(H, Lq, Lk\)"):
        write_viewer([w[0]], toks, tmp_path / "x.html")
    with pytest.raises(ValueError, match="kv_heads=3 must divide"):
        write_viewer([w], toks, tmp_path / "x.html", kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        write_viewer([w], toks, tmp_path / "x.html", top_k=0)
    with pytest.raises(ValueError, match="layer_names"):
        write_viewer([w], toks, tmp_path / "x.html", layer_names=["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        write_viewer([w * float("nan")], toks, tmp_path / "x.html")
    with pytest.raises(TypeError, match="head_table"):
        write_viewer([w], toks, tmp_path / "x.html", head_table={"a": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokens"):
        write_viewer([w], 5, tmp_path / "x.html")  # type: ignore[arg-type]


# ---------------------------------------------------------------- browser

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(
            "no chromium binary (/usr/bin/chromium); install Debian's chromium to run the viewer's browser tests"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A page opened from file:// that records console errors, page errors, dialogs and requests."""

    def __init__(self, browser, path, **ctx):
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900}, **ctx)
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append("dialog: " + d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=20_000)

    def data(self, key: str) -> str:
        return self.page.evaluate(f"document.body.dataset.{key}")

    def hover_token(self, side: str, i: int) -> None:
        box = self.page.locator("#lines").bounding_box()
        top = self.page.evaluate("document.getElementById('scroller').scrollTop")
        x = box["x"] + (box["width"] * 0.3 if side == "q" else box["width"] * 0.7)
        self.page.mouse.move(x, box["y"] + 4 + 18 * i + 9 - top)

    def heat_png(self) -> bytes:
        return self.page.locator("#heat").screenshot()


def test_viewer_in_chromium(browser, tmp_path):
    path = _small_page(tmp_path / "viewer.html")
    pg = Page(browser, path)
    page = pg.page
    assert pg.data("layer") == "0" and pg.data("head") == "0"
    # the JavaScript decoder gives the same rows as the weights (batch index 0)
    w0 = _layers()[0][0, 0]
    for i in (0, 4, 11):
        entries = page.evaluate(f"qkvViewer.rowEntries({i})")
        got = np.zeros(L)
        for j, w, _ in entries:
            got[j] = w
        assert np.all(np.abs(got - w0[i].numpy()) <= float(w0[i].max()) / 510 + 1e-6)
    # tokens are text: the evil token did not run, and the select shows the escaped layer name
    assert page.evaluate("qkvViewer.meta.tokens[0][4]") == EVIL
    assert "enc.1 <causal>" in page.locator("#layer").inner_text()

    # choosing another head changes the drawing
    sig0, png0 = pg.data("heatSig"), pg.heat_png()
    page.select_option("#head", "2")
    assert pg.data("head") == "2"
    assert pg.data("heatSig") != sig0 and pg.heat_png() != png0
    # the arrow keys move between heads and layers
    page.locator("h1").click()
    page.keyboard.press("ArrowRight")
    assert pg.data("head") == "3"
    page.keyboard.press("ArrowDown")
    assert (pg.data("layer"), pg.data("head")) == ("1", "3")

    # hovering a query token draws one line per key it attends to (causal layer: keys 0..i)
    pg.hover_token("q", 5)
    assert pg.data("hover") == "q:5"
    w1 = _layers()[1][3, 5]
    n_lines = int((torch.round(w1 / w1.max() * 255) > 0).sum())
    assert int(pg.data("lines")) == n_lines and n_lines <= 6
    assert "attends to" in page.locator("#readout").inner_text()
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    assert (tmp_path / "viewer.png").stat().st_size > 10_000
    # hovering a key token draws the queries that attend to it
    pg.hover_token("k", 9)
    w1 = _layers()[1][3]
    n_lines = int((torch.round(w1[:, 9] / w1.amax(-1) * 255) > 0).sum())
    assert pg.data("hover") == "k:9" and int(pg.data("lines")) == n_lines and n_lines <= 3  # causal: queries 9..11

    # the grouped-query cross-attention layer: 6 query heads labelled with their kv head, 5 x 12
    page.select_option("#layer", "2")
    assert page.locator("#head option").count() == 6
    assert page.locator("#head option").nth(5).inner_text() == "H5 (kv 2)"
    assert "Grouped-query" in page.locator("#note").inner_text()

    # the measures table: a click on a row selects its head, a click on a column sorts
    page.locator("#measures tbody tr[data-layer='0'][data-head='1']").click()
    assert (pg.data("layer"), pg.data("head")) == ("0", "1")
    page.locator("#measures th", has_text="entropy").click()
    col = [float(x) for x in page.locator("#measures tbody td:nth-child(4)").all_inner_texts()]
    assert col == sorted(col, reverse=True) and len(col) == 14

    assert pg.errors == []
    assert pg.requests == [pg.url]  # nothing but the page itself
    page.close()


def test_2k_tokens_load_fast(browser, tmp_path):
    n = 2048
    layers = [_weights(4, n, n, seed=5 + i) for i in range(2)]
    path = write_viewer(layers, [f"tok{i}" for i in range(n)], tmp_path / "long.html", top_k=16)
    assert path.stat().st_size < 3_000_000
    t0 = time.perf_counter()
    pg = Page(browser, path)
    assert time.perf_counter() - t0 < 5.0
    page = pg.page
    assert "top 16 weights" in page.locator("#note").inner_text()
    # hovering the heatmap selects a query row and scrolls the token view to it
    hb = page.locator("#heat").bounding_box()
    page.mouse.move(hb["x"] + 0.2 * hb["width"], hb["y"] + 0.5 * hb["height"])
    side, i = pg.data("hover").split(":")
    assert side == "q" and abs(int(i) - n // 2) <= 2
    top = page.evaluate("document.getElementById('scroller').scrollTop")
    assert top <= 18 * int(i) <= top + page.locator("#scroller").bounding_box()["height"]
    page.evaluate("document.getElementById('scroller').scrollTop = 18 * 1500")
    t0 = time.perf_counter()
    pg.hover_token("q", 1510)
    assert pg.data("hover") == "q:1510" and int(pg.data("lines")) == 16
    page.mouse.down()
    page.mouse.up()  # a click pins the token: its lines stay when the mouse leaves
    page.mouse.move(5, 5)
    assert pg.data("pinned") == "1" and pg.data("hover") == "q:1510"
    page.select_option("#head", "3")
    assert pg.data("head") == "3" and time.perf_counter() - t0 < 3.0
    assert pg.data("hover") == "q:1510" and int(pg.data("lines")) == 16
    # the overview strip at the right edge maps the whole sequence: a click near its top scrolls there
    box = page.locator("#lines").bounding_box()
    page.mouse.click(box["x"] + box["width"] - 5, box["y"] + 0.1 * box["height"])
    top = page.evaluate("document.getElementById('scroller').scrollTop")
    assert abs(top / 18 + box["height"] / 36 - 0.1 * n) < 0.05 * n
    page.screenshot(path=str(tmp_path / "long.png"))
    assert pg.errors == [] and pg.requests == [pg.url]
    page.close()


def _importance_page(path):
    imp = {"attention": torch.linspace(0, 1, L), "leave_one_out <x>": np.arange(L, dtype=float)[::-1].copy()}
    return write_viewer([_layers()[0]], TOKENS, path, token_importance=imp), imp


def test_token_importance_rows_are_stored_and_escaped(tmp_path):
    p, imp = _importance_page(tmp_path / "imp.html")
    text, meta, _ = _decode(p)
    assert EVIL not in text
    rows = meta["importance"]["rows"]
    assert meta["importance"]["tokens"] == TOKENS and [r["name"] for r in rows] == list(imp)
    np.testing.assert_allclose(rows[1]["values"], np.arange(L)[::-1])
    with pytest.raises(ValueError, match=r"token_importance\['a'\] has 3 values for 12 tokens"):
        write_viewer([_layers()[0]], TOKENS, tmp_path / "bad.html", token_importance={"a": [1.0, 2.0, 3.0]})
    assert _decode(_small_page(tmp_path / "none.html"))[1]["importance"] is None


def test_token_importance_rows_in_chromium(browser, tmp_path):
    p, _ = _importance_page(tmp_path / "imp.html")
    pg = Page(browser, p)
    assert pg.data("importanceRows") == "2"
    cells = pg.page.locator("#importance tbody tr").nth(1).locator("td")
    assert cells.nth(0).inner_text() == "leave_one_out <x>"
    assert cells.nth(1).inner_text() == "1.00" and cells.nth(L).inner_text() == "0.00"
    heads = pg.page.locator("#importance thead th")
    assert heads.nth(5).get_attribute("title") == "4: " + EVIL  # the evil token is shown as text
    assert pg.page.locator("#importance-panel").is_visible() and not pg.errors
    # hovering a token in the attention view marks its column of importance (header and every method's cell)
    pg.hover_token("k", 4)
    assert pg.data("hover") == "k:4" and pg.data("importanceHot") == "4"
    assert pg.page.locator("#importance .hot").count() == 3
    assert heads.nth(5).evaluate("e => e.classList.contains('hot')")
    pg.hover_token("q", 7)
    assert pg.data("importanceHot") == "7" and pg.page.locator("#importance .hot").count() == 3
    assert not heads.nth(5).evaluate("e => e.classList.contains('hot')")
    pg2 = Page(browser, _small_page(tmp_path / "plain.html"))
    assert pg2.data("importanceRows") == "0" and not pg2.page.locator("#importance-panel").is_visible()

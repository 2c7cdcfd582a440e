// qkv attention viewer: decodes the embedded weights and draws a head view, a heatmap and a table.
// Everything is drawn on canvases, tokens only for the visible rows, so long sequences stay fast.
"use strict";
(function () {
  const ROW_H = 18;
  const HEAT_PX = 460;
  const MAX_HEAT_CELLS = 460;
  const meta = JSON.parse(document.getElementById("qkv-meta").textContent);
  const $ = (id) => document.getElementById(id);
  const layerSel = $("layer"), headSel = $("head"), note = $("note"), readout = $("readout");
  const scroller = $("scroller"), spacer = $("spacer"), lines = $("lines"), heat = $("heat");
  const body = document.body;
  const state = { layer: 0, head: 0, hover: null, views: null, stripW: 0, pinned: false };
  let buf = null;

  function b64bytes(s) {
    const bin = atob(s.replace(/\s+/g, ""));
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return await new Response(stream).arrayBuffer();
  }

  // Typed views of one head: rowmax (Lq), vals (Lq*k), idx (Lq*k) or null when dense (k = Lk).
  function headView(li, h) {
    const L = meta.layers[li];
    const n = L.Lq * L.k;
    return {
      L: L,
      rowmax: new Float32Array(buf, L.rowmax + 4 * h * L.Lq, L.Lq),
      vals: new Uint8Array(buf, L.vals + h * n, n),
      idx: L.idx === null ? null : new Uint16Array(buf, L.idx + 2 * h * n, n),
    };
  }

  // Entries of query row i as [key index, weight, weight / row max], largest first.
  function rowEntries(v, i, minRel) {
    const k = v.L.k, base = i * k, rm = v.rowmax[i], out = [];
    for (let t = 0; t < k; t++) {
      const q = v.vals[base + t];
      if (q === 0 || q / 255 < minRel) continue;
      out.push([v.idx ? v.idx[base + t] : t, (q / 255) * rm, q / 255]);
    }
    out.sort((a, b) => b[1] - a[1]);
    return out;
  }

  // Entries of key column j as [query index, weight, weight / that row's max].
  function colEntries(v, j) {
    const k = v.L.k, out = [];
    let colMax = 0;
    for (let i = 0; i < v.L.Lq; i++) {
      const base = i * k;
      let q = 0;
      if (v.idx) {
        for (let t = 0; t < k; t++) if (v.idx[base + t] === j) { q = v.vals[base + t]; break; }
      } else q = v.vals[base + j];
      if (q > 0) { const w = (q / 255) * v.rowmax[i]; out.push([i, w, 0]); if (w > colMax) colMax = w; }
    }
    for (const e of out) e[2] = colMax > 0 ? e[1] / colMax : 0;
    out.sort((a, b) => b[1] - a[1]);
    return out;
  }

  const qTok = () => meta.tokens[meta.layers[state.layer].qt];
  const kTok = () => meta.tokens[meta.layers[state.layer].kt];
  const fmt = (w) => (w >= 0.001 ? w.toFixed(3) : w.toExponential(1));
  function clip(s, n) {
    s = s.replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/[\u0000-\u001f\u007f]/g, "\ufffd");
    return s.length > n ? s.slice(0, Math.max(1, n - 1)) + "\u2026" : s;
  }

  // ---- head view (token columns and lines) ----
  function sizeCanvas(c, w, h) {
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      c.style.height = h + "px";
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return ctx;
  }

  function layoutScroller() {
    const L = meta.layers[state.layer];
    const total = Math.max(L.Lq, L.Lk) * ROW_H + 8;
    const viewH = Math.min(Math.max(300, Math.round(window.innerHeight * 0.68)), total);
    scroller.style.height = viewH + "px";
    spacer.style.height = Math.max(0, total - viewH) + "px";
    return viewH;
  }

  function drawLines() {
    const L = meta.layers[state.layer], v = state.views;
    const viewH = layoutScroller();
    const W = scroller.clientWidth;
    const ctx = sizeCanvas(lines, W, viewH);
    ctx.clearRect(0, 0, W, viewH);
    const top = scroller.scrollTop;
    const long = Math.max(L.Lq, L.Lk) * ROW_H + 8 > viewH;
    const stripW = long ? 14 : 0;             // overview of the whole sequence when it does not fit
    state.stripW = stripW;
    const colW = Math.min(190, Math.floor((W - 2 * stripW) * 0.36));
    const xq = colW + stripW, xk = W - colW - stripW;          // right edge of query text, left edge of key text
    const y = (i) => i * ROW_H + ROW_H / 2 + 4 - top;
    const first = Math.max(0, Math.floor((top - 4) / ROW_H));
    const last = Math.ceil((top + viewH) / ROW_H);
    const hv = state.hover;
    let drawn = 0;
    // lines
    const line = (yi, yj, rel) => {
      ctx.strokeStyle = "rgba(37, 99, 235," + Math.max(0.04, rel).toFixed(3) + ")";
      ctx.lineWidth = 0.8 + 2.2 * rel;
      ctx.beginPath(); ctx.moveTo(xq + 6, yi); ctx.lineTo(xk - 6, yj); ctx.stroke();
      drawn++;
    };
    const hiQ = new Map(), hiK = new Map();
    if (hv && hv.side === "q" && hv.i < L.Lq) {
      hiQ.set(hv.i, 1);
      for (const [j, , rel] of rowEntries(v, hv.i, 0)) { line(y(hv.i), y(j), rel); hiK.set(j, rel); }
    } else if (hv && hv.side === "k" && hv.i < L.Lk) {
      hiK.set(hv.i, 1);
      for (const [i, , rel] of colEntries(v, hv.i)) { line(y(i), y(hv.i), rel); hiQ.set(i, rel); }
    } else {
      // nothing hovered: the strongest links of the visible queries, faint
      for (let i = first; i <= Math.min(last, L.Lq - 1); i++) {
        const es = rowEntries(v, i, 0.25).slice(0, 4);
        for (const [j, , rel] of es) line(y(i), y(j), rel * 0.45);
      }
    }
    // tokens
    ctx.font = "12px ui-monospace, SFMono-Regular, Menlo, monospace";
    ctx.textBaseline = "middle";
    const qt = qTok(), kt = kTok();
    const numW = 34, maxChars = Math.max(4, Math.floor((colW - numW - 8) / 7.3));
    const tok = (toks, i, x, align, hi) => {
      const yy = y(i);
      if (hi !== undefined && hi >= 0.02) {
        ctx.fillStyle = "rgba(37, 99, 235," + (0.08 + 0.67 * hi).toFixed(3) + ")";
        const w = colW - numW;
        ctx.fillRect(align === "right" ? x - w : x, yy - ROW_H / 2 + 1, w, ROW_H - 2);
      }
      ctx.fillStyle = hi !== undefined && hi > 0.55 ? "#fff" : "#1d2330";
      ctx.textAlign = align;
      ctx.fillText(clip(toks[i], maxChars), align === "right" ? x - 3 : x + 3, yy);
      ctx.fillStyle = "#9ca3af";
      ctx.textAlign = align === "right" ? "left" : "right";
      ctx.fillText(String(i), align === "right" ? stripW + 2 : W - stripW - 2, yy);
    };
    ctx.save();
    for (let i = first; i <= Math.min(last, L.Lq - 1); i++) tok(qt, i, xq, "right", hiQ.get(i));
    for (let j = first; j <= Math.min(last, L.Lk - 1); j++) tok(kt, j, xk, "left", hiK.get(j));
    ctx.restore();
    if (long) drawOverview(ctx, L, W, viewH, stripW, top, hiQ, hiK);
    lines.dataset.lines = String(drawn);
    body.dataset.lines = String(drawn);
  }

  // Two thin strips at the edges map the whole sequence onto the view height: the hovered token's
  // weights as ticks (queries left, keys right) and the part of the sequence now on screen as a box.
  function drawOverview(ctx, L, W, viewH, stripW, top, hiQ, hiK) {
    const pad = 3, h = viewH - 2 * pad;
    const strip = (x, n, hi) => {
      ctx.fillStyle = "#f1f5f9"; ctx.fillRect(x, pad, stripW - 4, h);
      ctx.fillStyle = "rgba(100, 116, 139, 0.25)";
      const y0 = pad + (top / (n * ROW_H)) * h, y1 = pad + ((top + viewH) / (n * ROW_H)) * h;
      ctx.fillRect(x, y0, stripW - 4, Math.max(2, Math.min(pad + h, y1) - y0));
      for (const [i, rel] of hi) {
        if (rel < 0.02 || i >= n) continue;
        ctx.fillStyle = "rgba(37, 99, 235," + (0.25 + 0.75 * rel).toFixed(3) + ")";
        ctx.fillRect(x, pad + ((i + 0.5) / n) * h - 1, stripW - 4, 2);
      }
    };
    strip(1, L.Lq, hiQ);
    strip(W - stripW + 3, L.Lk, hiK);
  }

  // ---- heatmap ----
  const offscreen = document.createElement("canvas");
  function drawHeat() {
    const L = meta.layers[state.layer], v = state.views;
    const fr = Math.ceil(L.Lq / MAX_HEAT_CELLS), fc = Math.ceil(L.Lk / MAX_HEAT_CELLS);
    const nr = Math.ceil(L.Lq / fr), nc = Math.ceil(L.Lk / fc);
    const cells = new Float32Array(nr * nc);
    let vmax = 0;
    for (let i = 0; i < L.Lq; i++) {
      const rm = v.rowmax[i] / 255, base = i * L.k, r = Math.floor(i / fr) * nc;
      for (let t = 0; t < L.k; t++) {
        const q = v.vals[base + t];
        if (q === 0) continue;
        const j = v.idx ? v.idx[base + t] : t, w = q * rm, c = r + Math.floor(j / fc);
        if (w > cells[c]) cells[c] = w;   // max-pool, so sharp heads stay visible
        if (w > vmax) vmax = w;
      }
    }
    offscreen.width = nc; offscreen.height = nr;
    const octx = offscreen.getContext("2d"), img = octx.createImageData(nc, nr), cm = meta.cmap;
    let sig = 0;
    for (let c = 0; c < nr * nc; c++) {
      const u = vmax > 0 ? Math.min(255, Math.round((cells[c] / vmax) * 255)) : 0;
      img.data[4 * c] = cm[3 * u]; img.data[4 * c + 1] = cm[3 * u + 1]; img.data[4 * c + 2] = cm[3 * u + 2];
      img.data[4 * c + 3] = 255;
      sig = (sig * 31 + u * (c + 1)) >>> 0;
    }
    octx.putImageData(img, 0, 0);
    const aspect = L.Lq / L.Lk;
    const w = aspect <= 1 ? HEAT_PX : Math.max(120, Math.round(HEAT_PX / aspect));
    const h = aspect <= 1 ? Math.max(120, Math.round(HEAT_PX * aspect)) : HEAT_PX;
    heat.style.width = w + "px";
    const ctx = sizeCanvas(heat, w, h);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(offscreen, 0, 0, w, h);
    const hv = state.hover;
    if (hv) {
      ctx.strokeStyle = "rgba(255, 80, 60, 0.95)"; ctx.lineWidth = 1.5;
      if (hv.side === "q") { const yy = ((hv.i + 0.5) / L.Lq) * h; ctx.beginPath(); ctx.moveTo(0, yy); ctx.lineTo(w, yy); ctx.stroke(); }
      else { const xx = ((hv.j === undefined ? hv.i : hv.j) + 0.5) / L.Lk * w; ctx.beginPath(); ctx.moveTo(xx, 0); ctx.lineTo(xx, h); ctx.stroke(); }
    }
    $("heat-sub").textContent = "(" + L.Lq + " queries \u00d7 " + L.Lk + " keys, colour = weight / head maximum " + fmt(vmax) +
      (fr > 1 || fc > 1 ? "; max-pooled " + fr + "\u00d7" + fc + " tokens per pixel" : "") + ")";
    heat.dataset.sig = String(sig);
    body.dataset.heatSig = String(sig);
  }

  function describeHover() {
    const hv = state.hover, v = state.views;
    if (!hv) { readout.textContent = "\u00a0"; return; }
    const qt = qTok(), kt = kTok();
    if (hv.side === "q" && hv.j !== undefined) {
      const es = rowEntries(v, hv.i, 0), e = es.find((x) => x[0] === hv.j);
      readout.textContent = "q" + hv.i + " \"" + clip(qt[hv.i], 40) + "\" \u2192 k" + hv.j + " \"" + clip(kt[hv.j], 40) +
        "\": " + (e ? fmt(e[1]) : "0 (not stored)");
      return;
    }
    if (hv.side === "q") {
      const es = rowEntries(v, hv.i, 0).slice(0, 6);
      readout.textContent = "q" + hv.i + " \"" + clip(qt[hv.i], 40) + "\" attends to:\n" +
        es.map(([j, w]) => "  k" + j + " \"" + clip(kt[j], 24) + "\" " + fmt(w)).join("\n");
    } else {
      const es = colEntries(v, hv.i).slice(0, 6);
      readout.textContent = "k" + hv.i + " \"" + clip(kt[hv.i], 40) + "\" is attended by:\n" +
        es.map(([i, w]) => "  q" + i + " \"" + clip(qt[i], 24) + "\" " + fmt(w)).join("\n");
    }
  }

  function redraw() {
    drawLines(); drawHeat(); describeHover();
    body.dataset.hover = state.hover ? state.hover.side + ":" + state.hover.i : "";
    markImportance();
  }

  // the hovered token's column in the importance table, where that side's tokens are the table's
  let importanceHot = -1;
  function markImportance() {
    const I = meta.importance, hv = state.hover;
    let col = -1;
    if (I && I.rows.length && hv) {
      const L = meta.layers[state.layer], n = hv.side === "q" ? L.Lq : L.Lk;
      if (n === I.tokens.length) col = hv.i;
    }
    if (col === importanceHot) return;
    for (const c of [importanceHot, col]) {
      if (c < 0) continue;
      document.querySelectorAll("#importance tr > :nth-child(" + (c + 2) + ")").forEach((el) => el.classList.toggle("hot", c === col));
    }
    importanceHot = col;
    body.dataset.importanceHot = String(col);
  }

  // ---- selection ----
  function fillHeads() {
    const L = meta.layers[state.layer];
    headSel.textContent = "";
    for (let h = 0; h < L.H; h++) {
      const o = document.createElement("option");
      o.value = String(h);
      o.textContent = "H" + h + (L.kv ? " (kv " + Math.floor(h / (L.H / L.kv)) + ")" : "");
      headSel.appendChild(o);
    }
  }

  function noteText() {
    const L = meta.layers[state.layer], parts = [];
    if (L.mode === "topk")
      parts.push("Long sequence: only the top " + L.k + " weights of each query row are kept in this file (of " + L.Lk +
        " keys; they hold " + (100 * L.kept_mean).toFixed(1) + "% of the attention mass on average, " +
        (100 * L.kept_min).toFixed(1) + "% at least); the rest show as 0.");
    if (L.kv) parts.push("Grouped-query layer: " + L.H + " query heads share " + L.kv + " key/value heads; each query head is shown.");
    note.textContent = parts.join(" ");
  }

  function select(layer, head) {
    const nl = meta.layers.length;
    layer = ((layer % nl) + nl) % nl;
    const changedLayer = layer !== state.layer || headSel.options.length === 0;
    state.layer = layer;
    if (changedLayer) fillHeads();
    const H = meta.layers[layer].H;
    state.head = ((head % H) + H) % H;
    layerSel.value = String(state.layer); headSel.value = String(state.head);
    state.views = headView(state.layer, state.head);
    if (state.hover) {
      const L = meta.layers[layer];
      if ((state.hover.side === "q" ? L.Lq : L.Lk) <= state.hover.i) state.hover = null;
    }
    body.dataset.layer = String(state.layer); body.dataset.head = String(state.head);
    noteText(); markTableRow(); redraw();
  }

  function hover(side, i, j) {
    const prev = state.hover;
    const next = side === null ? null : { side: side, i: i, j: j };
    if (JSON.stringify(prev) === JSON.stringify(next)) return;
    state.hover = next; redraw();
  }

  // ---- table ----
  let tableRows = [];
  function buildTable() {
    const T = meta.table, table = $("measures");
    if (!T || !T.rows.length) { $("table-panel").style.display = "none"; return; }
    const li = T.columns.indexOf("layer"), hi = T.columns.indexOf("head");
    const thead = document.createElement("thead"), tr = document.createElement("tr");
    const isText = T.columns.map((_, c) => T.rows.some((r) => typeof r[c] === "string"));
    const isFloat = T.columns.map((_, c) => T.rows.some((r) => typeof r[c] === "number" && !Number.isInteger(r[c])));
    T.columns.forEach((c, ci) => {
      const th = document.createElement("th");
      th.textContent = c; if (isText[ci]) th.className = "text";
      th.addEventListener("click", () => sortBy(ci, th));
      tr.appendChild(th);
    });
    thead.appendChild(tr); table.appendChild(thead);
    const tbody = document.createElement("tbody"); table.appendChild(tbody);
    tableRows = T.rows.map((r) => {
      const row = document.createElement("tr");
      r.forEach((x, ci) => {
        const td = document.createElement("td");
        td.textContent = x === null ? "" : typeof x === "number" && isFloat[ci] ? x.toPrecision(3) : String(x);
        if (isText[ci]) td.classList.add("text");
        row.appendChild(td);
      });
      let lay = li >= 0 ? r[li] : null;
      if (typeof lay === "string") { const k = meta.layers.findIndex((L) => L.name === lay); lay = k >= 0 ? k : null; }
      const hd = hi >= 0 ? r[hi] : null;
      if (typeof lay === "number" && typeof hd === "number" && lay < meta.layers.length) {
        row.dataset.layer = String(lay); row.dataset.head = String(hd);
        row.addEventListener("click", () => select(lay, hd));
      }
      tbody.appendChild(row);
      return { el: row, data: r };
    });
  }
  // ---- token importance (rows of methods beside the attention) ----
  function buildImportance() {
    const I = meta.importance, table = $("importance");
    if (!I || !I.rows.length) { $("importance-panel").style.display = "none"; body.dataset.importanceRows = "0"; return; }
    const thead = document.createElement("thead"), tr = document.createElement("tr");
    const first = document.createElement("th"); first.textContent = "method"; first.className = "text"; tr.appendChild(first);
    I.tokens.forEach((t, j) => {
      const th = document.createElement("th"); th.className = "tok"; th.textContent = clip(t, 14); th.title = j + ": " + t;
      tr.appendChild(th);
    });
    thead.appendChild(tr); table.appendChild(thead);
    const tbody = document.createElement("tbody"); table.appendChild(tbody);
    for (const r of I.rows) {
      const row = document.createElement("tr"), name = document.createElement("td");
      name.textContent = r.name; name.className = "text"; row.appendChild(name);
      const mx = Math.max(0, ...r.values.map((x) => (x === null ? 0 : Math.abs(x))));
      r.values.forEach((x, j) => {
        const td = document.createElement("td"), rel = x === null || mx === 0 ? 0 : Math.abs(x) / mx;
        td.className = "cell"; td.textContent = rel.toFixed(2);
        td.style.background = "rgba(37, 99, 235," + (0.05 + 0.85 * rel).toFixed(3) + ")";
        if (rel > 0.55) td.style.color = "#fff";
        td.title = r.name + " on " + j + " \"" + I.tokens[j] + "\": " + (x === null ? "n/a" : x.toPrecision(4));
        row.appendChild(td);
      });
      tbody.appendChild(row);
    }
    body.dataset.importanceRows = String(I.rows.length);
  }

  let sortState = { col: -1, dir: 1 };
  function sortBy(ci, th) {
    sortState = { col: ci, dir: sortState.col === ci ? -sortState.dir : -1 };
    const key = (r) => r.data[ci];
    tableRows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : 1) * sortState.dir;
    });
    const tbody = $("measures").tBodies[0];
    for (const r of tableRows) tbody.appendChild(r.el);
    for (const h of $("measures").tHead.rows[0].cells) h.classList.remove("sorted-asc", "sorted-desc");
    th.classList.add(sortState.dir > 0 ? "sorted-asc" : "sorted-desc");
  }
  function markTableRow() {
    for (const r of tableRows)
      r.el.classList.toggle("current", r.el.dataset.layer === String(state.layer) && r.el.dataset.head === String(state.head));
  }

  // ---- events ----
  function tokenAt(ev) {
    const rect = lines.getBoundingClientRect();
    const x = ev.clientX - rect.left, yy = ev.clientY - rect.top + scroller.scrollTop - 4;
    const i = Math.floor(yy / ROW_H), L = meta.layers[state.layer];
    if (x < state.stripW || x > rect.width - state.stripW) return null;
    const side = x < rect.width / 2 ? "q" : "k";
    return i >= 0 && i < (side === "q" ? L.Lq : L.Lk) ? [side, i] : null;
  }
  // a click on a token pins its lines (moving away keeps them) until the next click
  lines.addEventListener("mousemove", (ev) => { const t = tokenAt(ev); if (t && !state.pinned) hover(t[0], t[1]); });
  lines.addEventListener("mouseleave", () => { if (!state.pinned) hover(null); });
  lines.addEventListener("click", (ev) => {
    const t = tokenAt(ev);
    if (t) { state.pinned = !state.pinned; hover(t[0], t[1]); body.dataset.pinned = state.pinned ? "1" : ""; return; }
    const rect = lines.getBoundingClientRect(), x = ev.clientX - rect.left, L = meta.layers[state.layer];
    const sw = state.stripW;
    if (!sw || (x > sw && x < rect.width - sw)) return;
    const n = x <= sw ? L.Lq : L.Lk, frac = (ev.clientY - rect.top - 3) / (rect.height - 6);
    scroller.scrollTop = Math.max(0, frac * n * ROW_H - rect.height / 2);
  });
  scroller.addEventListener("scroll", () => drawLines(), { passive: true });
  heat.addEventListener("mousemove", (ev) => {
    const rect = heat.getBoundingClientRect(), L = meta.layers[state.layer];
    const i = Math.min(L.Lq - 1, Math.floor(((ev.clientY - rect.top) / rect.height) * L.Lq));
    const j = Math.min(L.Lk - 1, Math.floor(((ev.clientX - rect.left) / rect.width) * L.Lk));
    if (i < 0 || j < 0 || state.pinned) return;
    // bring the hovered query into the token view so its lines can be seen
    const top = scroller.scrollTop, viewH = scroller.clientHeight;
    if (i * ROW_H < top || (i + 1) * ROW_H + 8 > top + viewH) scroller.scrollTop = Math.max(0, i * ROW_H - viewH / 3);
    hover("q", i, j);
  });
  heat.addEventListener("mouseleave", () => { if (!state.pinned) hover(null); });
  layerSel.addEventListener("change", () => select(Number(layerSel.value), state.head));
  headSel.addEventListener("change", () => select(state.layer, Number(headSel.value)));
  document.addEventListener("keydown", (ev) => {
    if (ev.target && ev.target.tagName === "SELECT") return;
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    const m = moves[ev.key];
    if (!m) return;
    ev.preventDefault();
    select(state.layer + m[0], state.head + m[1]);
  });
  window.addEventListener("resize", () => drawLines());

  async function start() {
    document.title = meta.title;
    meta.layers.forEach((L, i) => {
      const o = document.createElement("option");
      o.value = String(i); o.textContent = L.name + "  (" + L.H + " heads)";
      layerSel.appendChild(o);
    });
    buildTable();
    buildImportance();
    if (typeof DecompressionStream === "undefined") {
      note.textContent = "This browser cannot decompress the embedded data (no DecompressionStream); use a current browser.";
      body.dataset.ready = "error";
      return;
    }
    buf = await inflate(b64bytes(document.getElementById("qkv-data").textContent));
    select(0, 0);
    body.dataset.ready = "1";
  }

  window.qkvViewer = { meta: meta, state: state, select: select, hover: hover, rowEntries: (i) => rowEntries(state.views, i, 0) };
  start().catch((err) => { note.textContent = "Could not load the data: " + err; body.dataset.ready = "error"; throw err; });
})();

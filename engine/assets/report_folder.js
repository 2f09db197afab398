// ConceptEvo folder report: binary point chunks over HTTP Range requests, a WebGL map (Plotly
// scattergl) with a level-of-detail grey context, and patches from WebP sprite sheets on demand.
// The layout of the files is described in conceptevo/report_folder.py.
(function () {
"use strict";
const CONFIG = {responsive: true, displaylogo: false, scrollZoom: true};
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; };

if (location.protocol === "file:") {
  document.getElementById("file-warning").hidden = false;
  document.body.dataset.mapReady = "file";
  return;
}

async function fetchRange(url, start, bytes) {
  if (bytes <= 0) return new ArrayBuffer(0);
  const r = await fetch(url, {headers: {Range: "bytes=" + start + "-" + (start + bytes - 1)}});
  if (r.status === 206) return r.arrayBuffer();
  if (r.status === 200) return (await r.arrayBuffer()).slice(start, start + bytes);  // a server without ranges
  throw new Error(url + ": HTTP " + r.status);
}

async function main() {
  performance.mark("ce-script");
  const M = await (await fetch("manifest.json")).json();
  performance.mark("ce-manifest");
  const NM = M.models.length, P = M.patches_per_point, K = M.neighbours_per_point;
  const chunkOf = new Map();            // "m|e" -> chunk number
  M.chunks.forEach((c, ci) => chunkOf.set(c.m + "|" + c.e, ci));
  const chunkStarts = M.chunks.map((c) => c.start);
  const savedEpochs = M.models.map((_, mi) => M.across[mi].epochs);

  // ---- chunks
  const chunkCache = new Map();
  function parseChunk(ci, buf) {
    const c = M.chunks[ci], n = c.n, out = {ci, start: c.start, n};
    let off = 0;
    for (const [name, dt, w] of M.fields) {
      const len = n * w;
      out[name] = dt === "f4" ? new Float32Array(buf, off, len) : new Int32Array(buf, off, len);
      off += len * 4;
    }
    return out;
  }
  function loadChunk(ci) {
    if (!chunkCache.has(ci)) {
      const c = M.chunks[ci];
      chunkCache.set(ci, fetchRange("points.bin", c.offset, c.bytes).then((buf) => parseChunk(ci, buf)));
    }
    return chunkCache.get(ci);
  }
  function chunkIndexOf(g) {        // the chunk holding global point g
    let lo = 0, hi = chunkStarts.length - 1;
    while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (chunkStarts[mid] <= g) lo = mid; else hi = mid - 1; }
    return lo;
  }
  const loaded = new Map();          // ci -> parsed chunk, once resolved
  async function pointAt(g) { const ch = await loadChunk(chunkIndexOf(g)); loaded.set(ch.ci, ch); return [ch, g - ch.start]; }
  function label(ch, j) {
    const c = M.chunks[ch.ci];
    return M.models[c.m] + " · epoch " + c.e + " · " + M.layers[ch.layer[j]] + " #" + ch.channel[j];
  }

  // ---- sprites
  const S = M.sprites, PER = S.grid * S.grid, sheetCache = new Map();
  function sheet(s) {
    if (!sheetCache.has(s)) {
      const im = new Image();
      im.src = "sprites/s" + s + ".webp";
      sheetCache.set(s, im.decode().then(() => im));
    }
    return sheetCache.get(s);
  }
  function patchCanvas(ref, small) {
    const cv = el("canvas", small ? "patch small" : "patch");
    cv.width = S.cell; cv.height = S.cell;
    const done = sheet(Math.floor(ref / PER)).then((im) => {
      const j = ref % PER;
      cv.getContext("2d").drawImage(im, (j % S.grid) * S.cell, Math.floor(j / S.grid) * S.cell, S.cell, S.cell,
        0, 0, S.cell, S.cell);
      cv.dataset.drawn = "1";
    });
    return [cv, done];
  }
  function imgs(refs, small) {
    const box = el("div", "patches"), waits = [];
    for (const r of refs) { if (r < 0) continue; const [cv, d] = patchCanvas(r, small); box.appendChild(cv); waits.push(d); }
    if (!waits.length) box.appendChild(el("span", "note", "no patches"));
    return [box, Promise.all(waits)];
  }
  const refsOf = (ch, j) => Array.from(ch.patches.subarray(j * P, (j + 1) * P)).filter((r) => r >= 0);

  // ---- ghost (grey context, level of detail: a prefix of a random order is a uniform sample)
  const ghost = M.ghost.models.map((g) => ({count: g.count, n: 0, x: new Float32Array(0), y: new Float32Array(0),
    pending: null}));
  const qx = (v) => M.range.x[0] + v / 65534 * (M.range.x[1] - M.range.x[0]);
  const qy = (v) => M.range.y[0] + v / 65534 * (M.range.y[1] - M.range.y[0]);
  async function growGhost(mi, want) {
    const g = ghost[mi];
    want = Math.min(g.count, Math.ceil(want));
    if (want <= g.n) return false;
    const buf = await fetchRange(M.ghost.models[mi].file, g.n * 4, (want - g.n) * 4);
    const q = new Uint16Array(buf), add = q.length / 2;
    const x = new Float32Array(g.n + add), y = new Float32Array(g.n + add);
    x.set(g.x); y.set(g.y);
    for (let i = 0; i < add; i++) { x[g.n + i] = qx(q[2 * i]); y[g.n + i] = qy(q[2 * i + 1]); }
    g.x = x; g.y = y; g.n += add;
    return true;
  }

  // ---- state
  const state = {epochIdx: M.epochs.length - 1, colorBy: 0, ghost: true, pinned: null, timer: null, view: 1};
  const gd = document.getElementById("map");
  const slider = document.getElementById("epoch-slider"), epochLabel = document.getElementById("epoch-label");
  function panelEpoch(mi, ep) {
    const es = savedEpochs[mi];
    let best = es.length ? es[0] : null;
    for (const e of es) if (e <= ep) best = e;
    return best;
  }
  const axisNames = (mi) => { const s = mi === 0 ? "" : String(mi + 1); return ["x" + s, "y" + s]; };
  for (const o of M.colour) if (o.kind === "num") { o.cmin = o.min; o.cmax = o.max; }

  async function currentChunks() {
    const ep = M.epochs[state.epochIdx];
    return Promise.all(M.models.map((_, mi) => {
      const ci = chunkOf.get(mi + "|" + panelEpoch(mi, ep));
      return ci === undefined ? null : loadChunk(ci).then((ch) => { loaded.set(ci, ch); return ch; });
    }));
  }

  function buildTraces(chs) {
    const opt = M.colour[state.colorBy], traces = [], shown = new Set();
    M.models.forEach((name, mi) => {
      const [xa, ya] = axisNames(mi);
      if (state.ghost) {
        const g = ghost[mi];
        traces.push({type: "scattergl", mode: "markers", x: g.x, y: g.y, xaxis: xa, yaxis: ya, hoverinfo: "skip",
          showlegend: false, meta: "ghost", uid: "g" + mi, marker: {color: "rgba(150,150,150,0.16)", size: 3}});
      }
      const ch = chs[mi];
      if (!ch) return;
      const idx = [];
      for (let j = 0; j < ch.n; j++) if (Number.isFinite(ch.x[j])) idx.push(j);
      if (opt.kind === "num") {
        const v = ch["c" + opt.field];
        traces.push({type: "scattergl", mode: "markers", x: idx.map((j) => ch.x[j]), y: idx.map((j) => ch.y[j]),
          customdata: idx.map((j) => ch.start + j), hovertemplate: "%{customdata}<extra></extra>",
          hoverinfo: "none", xaxis: xa, yaxis: ya, meta: "pts", uid: "n" + mi, showlegend: false,
          marker: {color: idx.map((j) => v[j]), colorscale: "Viridis", cmin: opt.cmin, cmax: opt.cmax, size: 6,
                   showscale: mi === 0, colorbar: {title: {text: opt.name}, len: 0.6}}});
        return;
      }
      const codes = opt.field === null ? ch.layer : ch["c" + opt.field];
      const groups = opt.labels.map(() => []), none = [];
      for (const j of idx) { const c = codes[j]; (c >= 0 ? groups[c] : none).push(j); }
      const cats = opt.labels.map((lab, c) => [lab, opt.colors[c], groups[c], c]);
      if (none.length) cats.push(["(none)", "#bbbbbb", none, "none"]);
      for (const [lab, colour, g, c] of cats) {
        if (!g.length) continue;
        traces.push({type: "scattergl", mode: "markers", x: g.map((j) => ch.x[j]), y: g.map((j) => ch.y[j]),
          customdata: g.map((j) => ch.start + j), hoverinfo: "none",
          xaxis: xa, yaxis: ya, name: lab, legendgroup: lab, showlegend: !shown.has(lab), meta: "pts",
          uid: "p" + mi + "_" + state.colorBy + "_" + c, marker: {color: colour, size: 6}});
        shown.add(lab);
      }
    });
    if (state.pinned !== null) {
      const marks = [[state.pinned, "#d62728"]];
      const pc = pinnedChunk;
      if (pc) { const j = state.pinned - pc.start;
        for (let q = 0; q < K; q++) { const g = pc.nb[j * K + q]; if (g >= 0) marks.push([g, "#ff9f1c"]); } }
      M.models.forEach((name, mi) => {
        const [xa, ya] = axisNames(mi), ch = chs[mi], mine = [];
        if (ch) for (const [g, colour] of marks) if (g >= ch.start && g < ch.start + ch.n) mine.push([g - ch.start, colour]);
        traces.push({type: "scattergl", mode: "markers", x: mine.map(([j]) => ch.x[j]), y: mine.map(([j]) => ch.y[j]),
          xaxis: xa, yaxis: ya, hoverinfo: "skip", showlegend: false, meta: "hl", uid: "h" + mi,
          marker: {symbol: "circle-open", size: 16, line: {width: 2.5}, color: mine.map(([, c]) => c)}});
      });
    }
    return traces;
  }

  let pinnedChunk = null, rendering = Promise.resolve();
  function render() {
    rendering = rendering.then(async () => {
      const ep = M.epochs[state.epochIdx];
      epochLabel.textContent = "epoch " + ep;
      slider.value = String(state.epochIdx);
      const chs = await currentChunks();
      const layout = Object.assign({}, M.mapLayout);
      layout.annotations = (M.mapLayout.annotations || []).map((a, mi) => mi < NM
        ? Object.assign({}, a, {text: M.models[mi] + " · epoch " + panelEpoch(mi, ep)}) : a);
      await Plotly.react(gd, buildTraces(chs), layout, CONFIG);
      gd.dataset.epoch = String(ep);   // drawn: tests and scripts wait on this
      const shownGhost = ghost.reduce((a, g) => a + g.n, 0), all = ghost.reduce((a, g) => a + g.count, 0);
      document.getElementById("lod").textContent = "grey context: " + shownGhost.toLocaleString() + " of "
        + all.toLocaleString() + " points";
    });
    return rendering;
  }

  // ---- side panel
  const sp = {title: document.getElementById("sp-title"), meta: document.getElementById("sp-meta"),
    pin: document.getElementById("sp-pin"), patches: document.getElementById("sp-patches"),
    epochs: document.getElementById("sp-epochs"), nbs: document.getElementById("sp-neighbours")};
  const stats = {hover: []};
  let showing = 0;

  function showNeuron(g, t0, tEvent) {
    const ci = chunkIndexOf(g), ch = loaded.get(ci);
    if (!ch) return pointAt(g).then(() => showNeuron(g, t0, tEvent));
    const j = g - ch.start, c = M.chunks[ci], token = ++showing;
    t0 = t0 === undefined ? performance.now() : t0;
    sp.title.textContent = M.models[c.m] + " · epoch " + c.e;
    const tags = M.colour.slice(1).map((o) => {
      const v = ch["c" + o.field][j];
      return o.kind === "num" ? o.name + " " + (Number.isFinite(v) ? +v.toPrecision(4) : "—")
        : o.name + ": " + (v >= 0 ? o.labels[v] : "—");
    });
    sp.meta.textContent = "layer " + M.layers[ch.layer[j]] + " · channel " + ch.channel[j]
      + (tags.length ? " · " + tags.join(" · ") : "");
    sp.pin.textContent = state.pinned === g ? "pinned — click the map again or press Esc to release" : "";
    const [box, done] = imgs(refsOf(ch, j), false);
    sp.patches.replaceChildren(box);
    sp.patches.dataset.point = String(g);
    const shown = done.then(() => {
      if (token !== showing) return;
      const t1 = performance.now();
      stats.hover.push({point: g, ms: t1 - t0, event_ms: (tEvent || t0) - t0, draw_ms: t1 - (tEvent || t0)});
      sp.patches.dataset.shown = String(g);
    });
    // the rest waits until the patches are drawn, so that its requests never delay them
    shown.then(() => { if (token === showing) details(g, ch, j, c, token); });
    return shown;
  }

  function details(g, ch, j, c, token) {
    // the same neuron across epochs: one Range request into across.bin, then up to 12 epochs spread
    const a = M.across[c.m], E = a.epochs.length, row = ch.neuron[j];
    fetchRange("across.bin", a.offset + row * E * 8, E * 8).then((buf) => {
      if (token !== showing) return;
      const t = new Int32Array(buf), rows = [];
      const pick = E <= 12 ? a.epochs.map((_, q) => q) : Array.from({length: 12}, (_, q) => Math.round(q * (E - 1) / 11));
      const here = a.epochs.indexOf(c.e);
      if (here >= 0 && !pick.includes(here)) { pick.push(here); pick.sort((u, v) => u - v); }
      for (const q of pick) {
        const gp = t[2 * q], ref = t[2 * q + 1];
        if (gp < 0) continue;
        const r = el("div", "epoch-row" + (gp === g ? " current" : ""));
        r.appendChild(el("span", "lab", "epoch " + a.epochs[q]));
        r.appendChild(imgs(ref >= 0 ? [ref] : [], true)[0]);
        rows.push(r);
      }
      sp.epochs.replaceChildren(...rows);
    });
    // neighbours: their chunks are fetched on demand
    const nbs = [];
    for (let q = 0; q < K; q++) { const gn = ch.nb[j * K + q]; if (gn >= 0) nbs.push([gn, ch.nbd[j * K + q]]); }
    Promise.all(nbs.map(([gn]) => pointAt(gn))).then((where) => {
      if (token !== showing) return;
      const items = where.map(([nch, nj], q) => {
        const li = el("li"), gn = nbs[q][0];
        li.appendChild(el("span", "", label(nch, nj) + " "));
        li.appendChild(el("span", "d", "d = " + (+nbs[q][1].toPrecision(4))));
        li.appendChild(imgs(refsOf(nch, nj).slice(0, 5), true)[0]);
        li.addEventListener("click", () => { pin(gn); });
        return li;
      });
      if (!items.length) items.push(el("li", "note", "no neighbours given"));
      sp.nbs.replaceChildren(...items);
    });
  }

  async function pin(g) {
    const [ch] = await pointAt(g);
    pinnedChunk = ch;
    state.pinned = g;
    const k = M.epochs.indexOf(M.chunks[ch.ci].e);
    if (k >= 0) state.epochIdx = k;
    await render();
    return showNeuron(g);
  }
  function unpin() {
    const was = state.pinned;
    state.pinned = null; pinnedChunk = null;
    render();
    if (was !== null) showNeuron(was);
  }
  function pointOf(ev) {
    const pt = (ev.points || []).find((p) => p.data && p.data.meta === "pts");
    return pt === undefined ? null : pt.customdata;
  }

  // ---- controls
  slider.max = String(M.epochs.length - 1);
  slider.addEventListener("input", () => { state.epochIdx = Number(slider.value); render(); });
  const play = document.getElementById("play");
  play.addEventListener("click", () => {
    if (state.timer) { clearInterval(state.timer); state.timer = null; play.textContent = "▶ play"; return; }
    play.textContent = "❚❚ pause";
    state.timer = setInterval(() => { state.epochIdx = (state.epochIdx + 1) % M.epochs.length; render(); }, 1300);
  });
  const colorSel = document.getElementById("color-by");
  M.colour.forEach((o, k) => { const op = el("option", "", o.name); op.value = String(k); colorSel.appendChild(op); });
  colorSel.addEventListener("change", () => { state.colorBy = Number(colorSel.value); render(); });
  document.getElementById("ghost").addEventListener("change", (ev) => { state.ghost = ev.target.checked; render(); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && state.pinned !== null) unpin(); });

  // first paint: the current epoch of every panel and a bounded prefix of the grey context
  const perPanel = Math.max(1, Math.floor(M.ghost.budget / Math.max(1, Math.sqrt(NM))));
  await Promise.all([...M.models.map((_, mi) => growGhost(mi, perPanel)), currentChunks()]);
  performance.mark("ce-data");
  await render();
  performance.mark("ce-drawn");
  document.body.dataset.mapReady = "1";
  // the mouse move that led to a hover: hover latency is counted from it, not from Plotly's event
  let lastMove = 0;
  gd.addEventListener("mousemove", () => { lastMove = performance.now(); }, true);
  gd.on("plotly_hover", (ev) => {
    const now = performance.now(), t0 = Math.min(now, lastMove || Infinity), g = pointOf(ev);
    if (g !== null && state.pinned === null) showNeuron(g, t0, now);
  });
  gd.on("plotly_click", (ev) => {
    const g = pointOf(ev);
    if (g === null) return;
    if (state.pinned === g) unpin(); else pin(g);
  });
  // zooming in draws more of the grey context: the same density of points on screen
  gd.on("plotly_relayout", (ev) => {
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
    if (!xa || !ya) return;
    const fx = Math.abs(xa.range[1] - xa.range[0]) / (M.range.x[1] - M.range.x[0]);
    const fy = Math.abs(ya.range[1] - ya.range[0]) / (M.range.y[1] - M.range.y[0]);
    const frac = Math.max(1e-4, Math.min(1, fx * fy));
    Promise.all(M.models.map((_, mi) => growGhost(mi, perPanel / frac))).then((grew) => {
      if (grew.some(Boolean)) render();
    });
  });

  // ---- charts, verdicts, evolutions
  for (const [name, fig] of Object.entries(M.figs)) {
    const div = document.getElementById("fig-" + name);
    document.getElementById("sec-" + name).hidden = false;
    Plotly.newPlot(div, fig.data, fig.layout, CONFIG);
  }
  const vlist = document.getElementById("verdicts");
  if (M.verdicts.length) document.getElementById("sec-diagnostics").hidden = false;
  for (const [head, t] of M.verdicts) {
    const li = el("li"); li.appendChild(el("b", "", head)); li.appendChild(el("span", "", t)); vlist.appendChild(li);
  }
  if (M.evolutions) {
    const E = M.evolutions, sel = document.getElementById("evo-class"), body = document.getElementById("evo-body");
    document.getElementById("sec-evolutions").hidden = false;
    E.classes.forEach((c) => { const op = el("option", "", c); op.value = c; sel.appendChild(op); });
    const show = (cls) => {
      body.replaceChildren(...(E.rows[cls] || []).map((r) => {
        const tr = el("tr");
        tr.appendChild(el("td", "", r.model));
        tr.appendChild(el("td", "", r.layer + " #" + r.channel));
        const sc = el("td"), bar = el("span", "bar"), fill = el("span");
        fill.style.width = Math.max(0, Math.min(1, r.score)) * 100 + "%"; bar.appendChild(fill);
        sc.appendChild(bar); sc.appendChild(el("span", "", String(r.score))); tr.appendChild(sc);
        for (const [ep, refs] of [[r.t, r.pt], [null, null], [r.tp, r.ptp]]) {
          if (ep === null) { tr.appendChild(el("td", "arrow", "→")); continue; }
          const td = el("td"); td.appendChild(el("div", "note", "epoch " + ep)); td.appendChild(imgs(refs, false)[0]);
          tr.appendChild(td);
        }
        return tr;
      }));
    };
    sel.addEventListener("change", () => show(sel.value));
    show(E.classes[0]);
  }
  window.conceptevoReport = {manifest: M, state, render, showNeuron, pin, unpin, stats, loadChunk, ghost,
    pointAt, currentChunks, idle: async () => { let r; do { r = rendering; await r; } while (r !== rendering); }};
}

main().catch((err) => {
  console.error(err);
  document.body.dataset.mapReady = "error";
  const box = el("div", "warning", "The report could not load: " + err);
  document.getElementById("map").replaceChildren(box);
});
})();

// ConceptEvo report: draws the unified map, side panel, charts and evolutions from the JSON block
// #ce-data. Inlined into report.html by conceptevo.report._asset(); no network, no modules.
(function () {
"use strict";
const D = JSON.parse(document.getElementById("ce-data").textContent);
const P = D.points, N = P.x.length, IM = D.images;
const CONFIG = {responsive: true, displaylogo: false, scrollZoom: true};
const src = (i) => "data:" + D.mimes[D.imageMime[i]] + ";base64," + IM[i];
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; };
const label = (i) => P.models[P.m[i]] + " · epoch " + P.e[i] + " · " + P.layers[P.l[i]] + " #" + P.c[i];
function imgs(refs, small, title) {
  const box = el("div", "patches");
  refs.forEach((r) => { const im = el("img", small ? "patch small" : "patch"); im.src = src(r);
    im.alt = title || "patch"; box.appendChild(im); });
  if (!refs.length) box.appendChild(el("span", "note", "no patches"));
  return box;
}

// ---- indexes
const byME = P.models.map(() => new Map());   // model -> epoch -> [point]
const byNeuron = new Map();                    // "m|l|c" -> Map(epoch -> point)
for (let i = 0; i < N; i++) {
  const mm = byME[P.m[i]];
  if (!mm.has(P.e[i])) mm.set(P.e[i], []);
  mm.get(P.e[i]).push(i);
  const nk = P.m[i] + "|" + P.l[i] + "|" + P.c[i];
  if (!byNeuron.has(nk)) byNeuron.set(nk, new Map());
  byNeuron.get(nk).set(P.e[i], i);
}
// Runs save different epochs: each panel shows its latest saved epoch at or before the slider's
// (its first one before that), so no panel goes blank between its checkpoints.
const savedEpochs = byME.map((mm) => [...mm.keys()].sort((a, b) => a - b));
function panelEpoch(mi, ep) {
  const es = savedEpochs[mi];
  let best = es.length ? es[0] : null;
  for (const e of es) if (e <= ep) best = e;
  return best;
}
const text = new Array(N);
for (let i = 0; i < N; i++) text[i] = label(i);

// ---- frame: the panels show the bulk of the points (P.range, the same for every run and epoch);
// a point beyond it is pinned just inside the edge and drawn as a triangle pointing its way.
// "show all points" (state.fullView) zooms out to P.rangeAll and draws every point where it is.
const F = P.range, INSET = 0.015;
const pinAt = (v, r) => v < r[0] ? r[0] + INSET * (r[1] - r[0]) : (v > r[1] ? r[1] - INSET * (r[1] - r[0]) : v);
const side = (v, r) => (v === null ? 0 : (v < r[0] ? -1 : (v > r[1] ? 1 : 0)));
const outside = new Int8Array(N);               // 1: beyond the frame
const SYMBOLS = {"1,0": "triangle-right", "-1,0": "triangle-left", "0,1": "triangle-up", "0,-1": "triangle-down",
  "1,1": "triangle-ne", "-1,1": "triangle-nw", "1,-1": "triangle-se", "-1,-1": "triangle-sw"};
const symbolOf = new Array(N);
let nOutside = 0;
for (let i = 0; i < N; i++) {
  const sx = side(P.x[i], F.x), sy = side(P.y[i], F.y);
  symbolOf[i] = sx || sy ? SYMBOLS[sx + "," + sy] : "circle";
  if (sx || sy) { outside[i] = 1; nOutside++; }
}
const px = (i) => (state.fullView || P.x[i] === null ? P.x[i] : pinAt(P.x[i], F.x));
const py = (i) => (state.fullView || P.y[i] === null ? P.y[i] : pinAt(P.y[i], F.y));
const symbols = (idx) => (state.fullView ? "circle" : idx.map((i) => symbolOf[i]));
const sizes = (idx, size) => (state.fullView ? size : idx.map((i) => (outside[i] ? size + 5 : size)));
const beyond = (i) => (outside[i] && !state.fullView ? " · beyond the frame (show all points)" : "");

const state = {epochIdx: P.epochs.length - 1, colorBy: 0, ghost: true, pinned: null, timer: null,
  fullView: false};
const gd = document.getElementById("map");
const slider = document.getElementById("epoch-slider");
const epochLabel = document.getElementById("epoch-label");
const WEBGL = N > 30000;                        // SVG is crisper and lighter until the map gets big
const scatterType = WEBGL ? "scattergl" : "scatter";

function axisNames(mi) { const s = mi === 0 ? "" : String(mi + 1); return ["x" + s, "y" + s]; }

function buildTraces() {
  const ep = P.epochs[state.epochIdx], opt = P.color[state.colorBy], traces = [], shown = new Set();
  P.models.forEach((name, mi) => {
    const [xa, ya] = axisNames(mi);
    if (state.ghost) {
      const all = [];
      byME[mi].forEach((idx) => { for (const i of idx) all.push(i); });
      traces.push({type: scatterType, mode: "markers", x: all.map(px), y: all.map(py),
        xaxis: xa, yaxis: ya, hoverinfo: "skip", showlegend: false, meta: "ghost", uid: "g" + mi,
        marker: {color: "rgba(150,150,150,0.16)", size: 4, symbol: symbols(all)}});
    }
    const idx = byME[mi].get(panelEpoch(mi, ep)) || [];
    if (opt.kind === "num") {
      const v = idx.map((i) => opt.values[i]);
      traces.push({type: scatterType, mode: "markers", x: idx.map(px), y: idx.map(py),
        customdata: idx, text: idx.map((i) => text[i] + " · " + opt.name + " " + opt.values[i] + beyond(i)),
        hovertemplate: "%{text}<extra></extra>", xaxis: xa, yaxis: ya, meta: "pts", uid: "n" + mi,
        name: opt.name, showlegend: false,
        marker: {color: v, colorscale: "Viridis", cmin: opt.min, cmax: opt.max, size: sizes(idx, 7), symbol: symbols(idx),
                 showscale: mi === 0, colorbar: {title: {text: opt.name}, len: 0.6}}});
      return;
    }
    const groups = opt.labels.map(() => []), none = [];
    for (const i of idx) { const c = opt.codes[i]; (c >= 0 ? groups[c] : none).push(i); }
    const cats = opt.labels.map((lab, c) => [lab, opt.colors[c], groups[c], c]);
    if (none.length) cats.push(["(none)", "#bbbbbb", none, "none"]);
    for (const [lab, colour, g, c] of cats) {
      traces.push({type: scatterType, mode: "markers", x: g.map(px), y: g.map(py),
        customdata: g, text: g.map((i) => text[i] + beyond(i)), hovertemplate: "%{text}<extra>" + lab + "</extra>",
        xaxis: xa, yaxis: ya, name: lab, legendgroup: lab, showlegend: !shown.has(lab), meta: "pts",
        uid: "p" + mi + "_" + state.colorBy + "_" + c,
        marker: {color: colour, size: sizes(g, 7), symbol: symbols(g), line: {width: 0.5, color: "white"}}});
      shown.add(lab);
    }
  });
  // circles around the pinned neuron and its neighbours that live at this epoch
  if (state.pinned !== null) {
    const marks = [[state.pinned, "#d62728"]];
    for (const [j] of P.neighbours[state.pinned]) if (j >= 0) marks.push([j, "#ff9f1c"]);
    P.models.forEach((name, mi) => {
      const [xa, ya] = axisNames(mi);
      const mine = marks.filter(([j]) => P.m[j] === mi && P.e[j] === panelEpoch(mi, ep));
      traces.push({type: scatterType, mode: "markers", x: mine.map(([j]) => px(j)),
        y: mine.map(([j]) => py(j)), xaxis: xa, yaxis: ya, hoverinfo: "skip", showlegend: false,
        meta: "hl", uid: "h" + mi,
        marker: {symbol: "circle-open", size: 17, line: {width: 2.5}, color: mine.map(([, c]) => c)}});
    });
  }
  return traces;
}

for (const opt of P.color) if (opt.kind === "num") {
  const v = opt.values.filter((a) => a !== null);
  opt.min = Math.min(...v); opt.max = Math.max(...v);
}

function render() {
  const ep = P.epochs[state.epochIdx];
  epochLabel.textContent = "epoch " + ep;
  slider.value = String(state.epochIdx);
  // panel titles name the epoch each panel shows (subplot titles are the first annotations)
  const layout = Object.assign({}, D.mapLayout);
  layout.annotations = (D.mapLayout.annotations || []).map((a, mi) => mi < P.models.length
    ? Object.assign({}, a, {text: P.models[mi] + " · epoch " + panelEpoch(mi, ep)}) : a);
  // the frame or every point; a new uirevision makes Plotly take these ranges over a user's zoom
  const view = state.fullView ? P.rangeAll : P.range;
  layout.uirevision = state.fullView ? "all" : "frame";
  for (const key of Object.keys(D.mapLayout)) {
    if (/^xaxis\d*$/.test(key)) layout[key] = Object.assign({}, D.mapLayout[key], {range: view.x.slice()});
    if (/^yaxis\d*$/.test(key)) layout[key] = Object.assign({}, D.mapLayout[key], {range: view.y.slice()});
  }
  return Plotly.react(gd, buildTraces(), layout, CONFIG);
}

// ---- side panel
const sp = {title: document.getElementById("sp-title"), meta: document.getElementById("sp-meta"),
  pin: document.getElementById("sp-pin"), patches: document.getElementById("sp-patches"),
  epochs: document.getElementById("sp-epochs"), nbs: document.getElementById("sp-neighbours")};

function showNeuron(i) {
  sp.title.textContent = P.models[P.m[i]] + " · epoch " + P.e[i];
  const tags = P.color.slice(1).map((o) => o.kind === "num" ? o.name + " " + o.values[i]
    : o.name + ": " + (o.codes[i] >= 0 ? o.labels[o.codes[i]] : "—"));
  sp.meta.textContent = "layer " + P.layers[P.l[i]] + " · channel " + P.c[i]
    + (tags.length ? " · " + tags.join(" · ") : "");
  sp.pin.textContent = state.pinned === i ? "pinned — click the map again or press Esc to release" : "";
  sp.patches.replaceChildren(imgs(P.patches[i], false, label(i)));
  const rows = [];
  const same = byNeuron.get(P.m[i] + "|" + P.l[i] + "|" + P.c[i]);
  for (const ep of P.epochs) {
    if (!same.has(ep)) continue;
    const j = same.get(ep), row = el("div", "epoch-row" + (j === i ? " current" : ""));
    row.appendChild(el("span", "lab", "epoch " + ep));
    row.appendChild(imgs(P.patches[j].slice(0, 5), true, label(j)));
    rows.push(row);
  }
  sp.epochs.replaceChildren(...rows);
  const items = P.neighbours[i].map(([j, d]) => {
    const li = el("li");
    const name = j >= 0 ? label(j) : P.outside[-1 - j];
    li.appendChild(el("span", "", name + " "));
    li.appendChild(el("span", "d", "d = " + d));
    const refs = j >= 0 ? P.patches[j] : ((P.outsidePatches || {})[String(-1 - j)] || []);
    li.appendChild(imgs(refs.slice(0, 5), true, name));
    if (j >= 0) li.addEventListener("click", () => { pin(j); });
    return li;
  });
  if (!items.length) items.push(el("li", "note", "no neighbours given"));
  sp.nbs.replaceChildren(...items);
}

function pin(i) {
  state.pinned = i;
  const k = P.epochs.indexOf(P.e[i]);
  if (k >= 0) state.epochIdx = k;
  render();
  showNeuron(i);
}
function unpin() {
  const was = state.pinned;
  state.pinned = null;
  render();
  if (was !== null) showNeuron(was);
}

function pointOf(ev) {
  const pt = (ev.points || []).find((p) => p.data && p.data.meta === "pts");
  return pt === undefined ? null : pt.customdata;
}

// ---- controls
slider.max = String(P.epochs.length - 1);
slider.addEventListener("input", () => { state.epochIdx = Number(slider.value); render(); });
const play = document.getElementById("play");
play.addEventListener("click", () => {
  if (state.timer) { clearInterval(state.timer); state.timer = null; play.textContent = "▶ play"; return; }
  play.textContent = "❚❚ pause";
  state.timer = setInterval(() => {
    state.epochIdx = (state.epochIdx + 1) % P.epochs.length;
    render();
  }, 1300);
});
const colorSel = document.getElementById("color-by");
P.color.forEach((o, k) => {
  const op = el("option", "", o.name);
  op.value = String(k);
  colorSel.appendChild(op);
});
colorSel.addEventListener("change", () => { state.colorBy = Number(colorSel.value); render(); });
document.getElementById("ghost").addEventListener("change", (ev) => {
  state.ghost = ev.target.checked;
  render();
});
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && state.pinned !== null) unpin(); });
const zoomAll = document.getElementById("zoom-all"), frameNote = document.getElementById("frame-note");
function showFrameNote() {
  zoomAll.textContent = state.fullView ? "frame the bulk" : "show all points";
  zoomAll.setAttribute("aria-pressed", String(state.fullView));
  frameNote.textContent = nOutside === 0 ? "" : (state.fullView
    ? nOutside + " outlying neuron(s) shown where they are"
    : nOutside + " outlying neuron(s) beyond the frame, drawn as ▲ at its edge");
}
zoomAll.addEventListener("click", () => { state.fullView = !state.fullView; showFrameNote(); render(); });
showFrameNote();

render().then(() => {
  gd.on("plotly_hover", (ev) => {
    const i = pointOf(ev);
    if (i !== null && state.pinned === null) showNeuron(i);   // a pinned neuron stays until released
  });
  gd.on("plotly_click", (ev) => {
    const i = pointOf(ev);
    if (i === null) return;
    if (state.pinned === i) unpin(); else pin(i);
  });
  document.body.dataset.mapReady = "1";
});

// ---- charts
for (const [name, fig] of Object.entries(D.figs)) {
  const div = document.getElementById("fig-" + name);
  if (div) Plotly.newPlot(div, fig.data, fig.layout, CONFIG);
}
const vlist = document.getElementById("verdicts");
if (vlist) for (const [head, t] of D.verdicts) {
  const li = el("li");
  li.appendChild(el("b", "", head));
  li.appendChild(el("span", "", t));
  vlist.appendChild(li);
}

// ---- evolutions
if (D.evolutions) {
  const E = D.evolutions, sel = document.getElementById("evo-class");
  const body = document.getElementById("evo-body");
  E.classes.forEach((c) => { const op = el("option", "", c); op.value = c; sel.appendChild(op); });
  const show = (cls) => {
    const rows = (E.rows[cls] || []).map((r) => {
      const tr = el("tr");
      tr.appendChild(el("td", "", r.model));
      tr.appendChild(el("td", "", r.layer + " #" + r.channel));
      const sc = el("td"), bar = el("span", "bar"), fill = el("span");
      fill.style.width = Math.max(0, Math.min(1, r.score)) * 100 + "%"; bar.appendChild(fill);
      sc.appendChild(bar); sc.appendChild(el("span", "", String(r.score))); tr.appendChild(sc);
      for (const [ep, refs] of [[r.t, r.pt], [null, null], [r.tp, r.ptp]]) {
        if (ep === null) { tr.appendChild(el("td", "arrow", "→")); continue; }
        const td = el("td");
        td.appendChild(el("div", "note", "epoch " + ep));
        td.appendChild(imgs(refs, false));
        tr.appendChild(td);
      }
      return tr;
    });
    body.replaceChildren(...rows);
  };
  sel.addEventListener("change", () => show(sel.value));
  show(E.classes[0]);
}
window.conceptevoReport = {state, render, showNeuron, pin, unpin, data: D};
})();

"""The folder report at ImageNet-run size: build it, serve it, open it in headless Chromium.

Synthetic data shaped like VGG16 runs (13 conv layers, 4,224 neurons per checkpoint), ``--neurons``
in all (1M = 3 runs x 79 checkpoints), 20,000 images, 4 patches per neuron and 6 neighbours. Patches are
32 px crops of procedural images (every image its own colours, every layer its own window, so that
equal patches are exactly the same stimulus seen again); each neuron's top stimuli drift between epochs (each slot changes with
probability ``--drift`` per epoch), so equal patches repeat across epochs as in a real run and the
sprite sheets de-duplicate them. Measured:

* build: seconds to write the folder (build_report_folder, from ReportData), and its size on disk;
* first paint: page.goto -> the map drawn (every panel's current epoch + the grey level-of-detail
  sample), served by the real range server on 127.0.0.1, headless Chromium (software WebGL);
* hover: a real mouse move onto a neuron -> its patches drawn from the sprite sheets (the page's
  own clock, from the last mouse move before Plotly's hover event to the last patch drawn; and the
  wall clock of the test driver, which adds Playwright's round trips and polling), over
  ``--hovers`` neurons spread over the panels, each on a cold sprite sheet the first time.

Prints one table: metric, size, this engine, goal, ratio. ``--quick``: 20k neurons (a smoke test).

    python benchmarks/bench_report_scale.py --neurons 1000000
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

VGG16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def synthetic(neurons: int, runs: int, images: int, k: int, drift: float, nbrs: int, seed: int):
    from PIL import Image

    from conceptevo.report import ReportData

    rng = np.random.default_rng(seed)
    per_ckpt = sum(VGG16)
    ckpts = max(runs, round(neurons / per_ckpt))
    epochs = -(-ckpts // runs)
    layers = [f"features.{i}" for i in range(len(VGG16))]
    # patches: 32 px crops of procedural 96 px images at one of 16 positions, per layer group: a patch is
    # (image, layer group, position), as a receptive-field window of a stimulus is. PNG to keep generation fast
    # (the sprite sheets re-encode every patch anyway).
    n_img = images
    base_imgs = []
    yy, xx = np.mgrid[0:96, 0:96]
    for i in range(64):  # 64 base scenes, recoloured per image id
        r = np.random.default_rng(i)
        arr = r.integers(40, 200, 3)[None, None, :] + yy[..., None] * r.normal(0, 0.7, 3) + xx[..., None] * r.normal(0, 0.7, 3)
        for _ in range(6):
            cy, cx, rad = r.uniform(0, 96), r.uniform(0, 96), r.uniform(4, 20)
            arr[(yy - cy) ** 2 + (xx - cx) ** 2 < rad * rad] = r.integers(0, 256, 3)
        base_imgs.append(np.clip(arr + r.normal(0, 10, arr.shape), 0, 255).astype(np.uint8))
    tint = np.random.default_rng(seed + 1).integers(-50, 51, (n_img, 1, 1, 3))  # every image its own colours
    cache: dict[tuple, str] = {}

    def patch(img: int, li: int, pos: int) -> str:
        key = (img, li, pos)
        s = cache.get(key)
        if s is None:
            arr = base_imgs[img % 64]
            oy, ox = ((pos // 4) * 16 + 3 * li) % 64, ((pos % 4) * 16 + 5 * li) % 64
            crop = np.clip(arr[oy:oy + 32, ox:ox + 32].astype(np.int16) + tint[img], 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="PNG", compress_level=1)
            s = cache[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return s

    rows_m, rows_e, rows_l, rows_c = [], [], [], []
    patches = {}
    n_done = 0
    centres = np.concatenate([rng.normal(size=(c, 2)) * 3 + li * 1.5 for li, c in enumerate(VGG16)])
    lidx = np.repeat(np.arange(len(VGG16)), VGG16)
    chan = np.concatenate([np.arange(c) for c in VGG16])
    xs, ys = [], []
    for r in range(runs):
        stim = rng.integers(0, n_img, (per_ckpt, k))
        pos = rng.integers(0, 16, (per_ckpt, k))
        for e in range(epochs):
            if n_done >= neurons:
                break
            change = rng.random((per_ckpt, k)) < drift
            stim = np.where(change, rng.integers(0, n_img, (per_ckpt, k)), stim)
            pos = np.where(change, rng.integers(0, 16, (per_ckpt, k)), pos)
            take = min(per_ckpt, neurons - n_done)
            xy = centres[:take] + rng.normal(0, 0.05 * (1 + e) ** 0.5, (take, 2)) + r
            xs.append(xy[:, 0])
            ys.append(xy[:, 1])
            for i in range(take):
                patches[(f"run{r}", e, layers[lidx[i]], int(chan[i]))] = [
                    patch(int(s), int(lidx[i]), int(p)) for s, p in zip(stim[i], pos[i])]
            rows_m += [f"run{r}"] * take
            rows_e += [e] * take
            rows_l.append(lidx[:take])
            rows_c.append(chan[:take])
            n_done += take
    lcodes = np.concatenate(rows_l)
    points = pd.DataFrame({"model": rows_m, "epoch": rows_e, "layer": np.asarray(layers, object)[lcodes],
                           "channel": np.concatenate(rows_c), "x": np.concatenate(xs), "y": np.concatenate(ys)})
    points["importance"] = rng.random(len(points)).astype(np.float32)
    n = len(points)
    nb_rows = rng.integers(0, n, (n, nbrs))
    src = np.repeat(np.arange(n), nbrs)
    dst = nb_rows.ravel()
    nb = pd.DataFrame({"model": points["model"].to_numpy()[src], "epoch": points["epoch"].to_numpy()[src],
                       "layer": points["layer"].to_numpy()[src], "channel": points["channel"].to_numpy()[src],
                       "nb_model": points["model"].to_numpy()[dst], "nb_epoch": points["epoch"].to_numpy()[dst],
                       "nb_layer": points["layer"].to_numpy()[dst],
                       "nb_channel": points["channel"].to_numpy()[dst],
                       "distance": np.sort(rng.random((n, nbrs)), axis=1).ravel()})
    return ReportData(points=points, patches=patches, neighbours=nb, title=f"synthetic {n:,} neurons",
                      facts={"runs": runs, "checkpoints": ckpts, "distinct patches generated": len(cache)},
                      layer_order=layers), len(cache)


def measure_browser(folder: Path, hovers: int, seed: int) -> dict:
    from playwright.sync_api import sync_playwright

    from conceptevo.report_folder import make_server

    srv = make_server(folder, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    out: dict = {}
    try:
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = b.new_page(viewport={"width": 1600, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_selector('body[data-map-ready="1"]', timeout=120_000)
            out["first_paint_s"] = time.perf_counter() - t0
            out["marks"] = page.evaluate("""() => Object.fromEntries(performance.getEntriesByType('mark')
                .map(m => [m.name, Math.round(m.startTime)]).concat(performance.getEntriesByType('navigation')
                .map(n => ['domContentLoaded', Math.round(n.domContentLoadedEventEnd)])))""")
            out["paint_timing"] = page.evaluate(
                "() => performance.getEntriesByType('paint').map(p => [p.name, p.startTime])")
            out["ghost_points"] = page.evaluate("window.conceptevoReport.ghost.map(g => g.n)")
            cands = page.evaluate("""() => { const gd = document.getElementById('map'), r = gd.getBoundingClientRect();
                const out = [];
                gd.data.forEach((t) => { if (t.meta !== 'pts' || !t.x.length) return;
                  const s = t.xaxis.slice(1), xa = gd._fullLayout['xaxis' + s], ya = gd._fullLayout['yaxis' + s];
                  for (let k = 0; k < t.x.length; k += 97) out.push([r.left + xa._offset + xa.l2p(t.x[k]),
                    r.top + ya._offset + ya.l2p(t.y[k])]); });
                return out; }""")
            rng = np.random.default_rng(seed)
            wall, page_ms = [], []
            for idx in rng.choice(len(cands), min(hovers, len(cands)), replace=False):
                px, py = cands[idx]
                page.mouse.move(px - 40, py - 40)  # away, then onto the point: one hover event
                page.evaluate("document.getElementById('sp-patches').dataset.shown = ''")
                n0 = page.evaluate("window.conceptevoReport.stats.hover.length")
                t0 = time.perf_counter()
                page.mouse.move(px, py)
                try:
                    page.wait_for_function(f"window.conceptevoReport.stats.hover.length > {n0}", timeout=10_000,
                                           polling=5)
                except Exception:  # the point may hide under another; skip it
                    continue
                wall.append((time.perf_counter() - t0) * 1000)
                page_ms.append(page.evaluate("window.conceptevoReport.stats.hover.slice(-1)[0]"))
            out["hover_wall_ms"] = wall
            out["hover_page_ms"] = page_ms
            out["errors"] = errors
            b.close()
    finally:
        srv.shutdown()
        srv.server_close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neurons", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--drift", type=float, default=0.1)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--hovers", type=int, default=20)
    ap.add_argument("--out", default=None, help="where the folder goes (default: a temp dir, removed after)")
    ap.add_argument("--quick", action="store_true", help="20k neurons")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = 20_000 if args.quick else args.neurons

    from conceptevo.report_folder import build_report_folder

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    data, distinct = synthetic(n, args.runs, args.images, 4, args.drift, 6, args.seed)
    t_data = time.perf_counter() - t0
    tmp = tempfile.TemporaryDirectory(prefix="bench_report_scale_") if args.out is None else None
    folder = Path(args.out or tmp.name) / "report"
    t0 = time.perf_counter()
    build_report_folder(folder, data, threshold=0)
    t_build = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    sprites = sum(f.stat().st_size for f in (folder / "sprites").glob("*"))
    del data
    res = measure_browser(folder, args.hovers, args.seed)
    load1 = os.getloadavg()

    hw, hp_all = res["hover_wall_ms"], res["hover_page_ms"]
    hp = [h["ms"] for h in hp_all]
    ev, dr = [h["event_ms"] for h in hp_all], [h["draw_ms"] for h in hp_all]
    print(f"\nfolder report, {n:,} neurons, {distinct:,} distinct patches; CPU {os.cpu_count()} cores, "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}; headless Chromium (software WebGL), 127.0.0.1")
    print(f"page clock (ms from navigation): {res['marks']}")
    print(f"synthetic data: {t_data:.1f} s; grey LOD points drawn at first paint: {res['ghost_points']}; "
          f"page errors: {res['errors'] or 'none'}")
    rows = [
        ("build folder", f"{n:,}", f"{t_build:.1f} s", "-", "-"),
        ("folder size", f"{n:,}", f"{size / 2**20:.0f} MiB (sprites {sprites / 2**20:.0f})", "1024 MiB",
         f"{size / 2**30:.2f}"),
        ("first paint", f"{n:,}", f"{res['first_paint_s']:.2f} s", "5 s", f"{res['first_paint_s'] / 5:.2f}"),
    ]
    if hw:
        rows += [("hover -> patches, median (driver)", f"{len(hw)} hovers", f"{statistics.median(hw):.0f} ms",
                  "200 ms", f"{statistics.median(hw) / 200:.2f}"),
                 ("hover -> patches, max (driver)", f"{len(hw)} hovers", f"{max(hw):.0f} ms", "200 ms",
                  f"{max(hw) / 200:.2f}"),
                 ("hover -> patches, median (page)", f"{len(hp)} hovers", f"{statistics.median(hp):.0f} ms",
                  "200 ms", f"{statistics.median(hp) / 200:.2f}"),
                 ("hover -> patches, max (page)", f"{len(hp)} hovers", f"{max(hp):.0f} ms", "200 ms",
                  f"{max(hp) / 200:.2f}"),
                 ("  of which move -> Plotly hover event, median", f"{len(hp)} hovers", f"{statistics.median(ev):.0f} ms",
                  "-", "-"),
                 ("  of which event -> patches drawn, median", f"{len(hp)} hovers", f"{statistics.median(dr):.0f} ms",
                  "-", "-")]
    w = [max(len(r[i]) for r in rows + [("stage", "size", "this engine", "goal", "ratio")]) for i in range(5)]
    for r in [("stage", "size", "this engine", "goal", "ratio")] + rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

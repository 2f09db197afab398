"""The report at scale (conceptevo.report_folder): the size switch, the folder's binary layout read back
against the input, the read-only range server, `conceptevo serve`, and the folder in headless Chromium
over the real server on loopback (hover shows the neuron's patches from the sprite sheets)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conceptevo._reference import synthetic_report_data
from conceptevo.errors import ConceptEvoError
from conceptevo.report import ReportData, build_report
from conceptevo.report_folder import build_report_folder, make_server, report_format

LAYERS = (("features.0", 12), ("features.3", 16))


@pytest.fixture(scope="module")
def data():
    # runs save different epochs; a few neurons lack patches or neighbours
    return synthetic_report_data(runs=("a", "b"), epochs={"a": (0, 2, 5), "b": (0, 5)}, layers=LAYERS,
                                 num_images=60, k=4, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("rf") / "report"
    # lossless: cells compare exactly; a small grey budget so that zooming has more to fetch
    path = build_report_folder(out, data, sprite_quality=None, ghost_budget=40)
    assert path == out / "index.html"
    return out


def _chunks(folder: Path) -> tuple[dict, list[dict]]:
    m = json.loads((folder / "manifest.json").read_text())
    blob = (folder / "points.bin").read_bytes()
    out = []
    for c in m["chunks"]:
        off, d = c["offset"], {}
        for name, dt, w in m["fields"]:
            d[name] = np.frombuffer(blob, "<" + dt, c["n"] * w, off).reshape(c["n"], w) if w else \
                np.zeros((c["n"], 0))
            off += c["n"] * w * 4
        assert off == c["offset"] + c["bytes"]
        out.append(d)
    return m, out


def _decode(uri: str, cell: int):
    from PIL import Image

    from conceptevo.report_folder import fit_cell

    return np.asarray(fit_cell(Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2]))).convert("RGB"), cell))


def test_folder_layout_matches_input(folder, data):
    from PIL import Image

    m, chunks = _chunks(folder)
    pts = data.points
    keys = [(str(a), int(b), str(c), int(d)) for a, b, c, d in pts[["model", "epoch", "layer", "channel"]].itertuples(
        index=False)]
    row_of = {k: i for i, k in enumerate(keys)}
    assert sum(c["n"] for c in m["chunks"]) == len(pts)
    # global index -> key, from the chunks
    g_key = {}
    for c, ch in zip(m["chunks"], chunks):
        for j in range(c["n"]):
            g_key[c["start"] + j] = (m["models"][c["m"]], c["e"], m["layers"][ch["layer"][j, 0]],
                                     int(ch["channel"][j, 0]))
    assert sorted(g_key.values()) == sorted(keys)
    sheets = {}
    cell, grid = m["sprites"]["cell"], m["sprites"]["grid"]
    for c, ch in zip(m["chunks"], chunks):
        for j in range(c["n"]):
            key = g_key[c["start"] + j]
            r = pts.iloc[row_of[key]]
            assert ch["x"][j, 0] == np.float32(r["x"]) and ch["y"][j, 0] == np.float32(r["y"])
            # neighbours, nearest first, as given
            want = [(nk, d) for nk, d in data.neighbours[key]]
            got = [(g_key[g], d) for g, d in zip(ch["nb"][j], ch["nbd"][j]) if g >= 0]
            assert [k for k, _ in got] == [k for k, _ in want]
            np.testing.assert_allclose([d for _, d in got], [d for _, d in want], rtol=1e-6)
            # patches: each ref's sprite cell is the patch itself (lossless sheets)
            uris = list(data.patches.get(key, []))
            refs = [int(v) for v in ch["patches"][j] if v >= 0]
            assert len(refs) == len(uris)
            for ref, uri in zip(refs, uris[:2]):
                s, q = divmod(ref, grid * grid)
                if s not in sheets:
                    sheets[s] = np.asarray(Image.open(folder / "sprites" / f"s{s}.webp").convert("RGB"))
                y0, x0 = (q // grid) * cell, (q % grid) * cell
                np.testing.assert_array_equal(sheets[s][y0:y0 + cell, x0:x0 + cell], _decode(uri, cell))
    # equal patches are stored once
    distinct = {u for v in data.patches.values() for u in v}
    used = {u for k in keys for u in data.patches.get(k, [])} | {
        u for r in data.evolutions.itertuples() for e in (r.t, r.t_prime)
        for u in data.patches.get((r.model, e, r.layer, r.channel), [])}
    assert m["sprites"]["distinct"] == len(used) <= len(distinct)
    # the same neuron across epochs: across.bin rows point back at the right neurons
    across = np.frombuffer((folder / "across.bin").read_bytes(), "<i4")
    for mi, a in enumerate(m["across"]):
        t = across[a["offset"] // 4:a["offset"] // 4 + a["neurons"] * len(a["epochs"]) * 2].reshape(
            a["neurons"], len(a["epochs"]), 2)
        for row in t:
            names = {g_key[g][2:] for g in row[:, 0] if g >= 0}
            assert len(names) == 1
            for q, (g, ref) in enumerate(row):
                if g >= 0:
                    assert g_key[g][0] == m["models"][mi] and g_key[g][1] == a["epochs"][q]
    # ghost: every point of a model once, quantised to the map's range
    for mi, gm in enumerate(m["ghost"]["models"]):
        q = np.frombuffer((folder / gm["file"]).read_bytes(), "<u2").reshape(-1, 2)
        sel = pts[pts["model"].astype(str) == m["models"][mi]]
        assert len(q) == gm["count"] == len(sel)
        xs = m["range"]["x"][0] + q[:, 0] / 65534 * (m["range"]["x"][1] - m["range"]["x"][0])
        np.testing.assert_allclose(np.sort(xs), np.sort(sel["x"].to_numpy()),
                                   atol=(m["range"]["x"][1] - m["range"]["x"][0]) / 65534)
    assert m["report_format"]["mode"] == "folder"
    assert "one-file threshold" in (folder / "index.html").read_text()


def test_size_switch(tmp_path, data, monkeypatch):
    n = len(data.points)
    small = build_report(tmp_path / "small.html", data)
    assert small.is_file() and small.suffix == ".html"
    assert f"a folder report above {report_format(n)['one_file_max_points']:,}" in small.read_text()
    monkeypatch.setenv("CONCEPTEVO_REPORT_FOLDER_THRESHOLD", str(n - 1))
    assert report_format(n) == {"mode": "folder", "points": n, "one_file_max_points": n - 1}
    big = build_report(tmp_path / "big.html", data)
    assert big == tmp_path / "big" / "index.html" and (tmp_path / "big" / "points.bin").is_file()
    again = build_report(tmp_path / "big.html", data)  # replaces the old folder whole
    assert again == big and not list(tmp_path.glob(".big*"))
    (tmp_path / "notareport").mkdir()
    (tmp_path / "notareport" / "keep.txt").write_text("x")
    with pytest.raises(ConceptEvoError, match="not a folder report"):
        build_report_folder(tmp_path / "notareport", data)
    assert (tmp_path / "notareport" / "keep.txt").exists()
    monkeypatch.setenv("CONCEPTEVO_REPORT_FOLDER_THRESHOLD", "many")
    with pytest.raises(ConceptEvoError, match="CONCEPTEVO_REPORT_FOLDER_THRESHOLD"):
        build_report(tmp_path / "x.html", data)
    bad = ReportData(points=pd.DataFrame({"model": ["a", "a"], "epoch": [0, 0], "layer": ["l", "l"],
                                          "channel": [1, 1], "x": [0.0, 1.0], "y": [0.0, 1.0]}))
    with pytest.raises(ConceptEvoError, match="twice"):
        build_report_folder(tmp_path / "dup", bad)


@pytest.fixture
def server(folder):
    srv = make_server(folder, port=0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _get(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_range_server(server, folder):
    blob = (folder / "points.bin").read_bytes()
    size = len(blob)
    st, h, body = _get(server + "/points.bin")
    assert st == 200 and body == blob and h["Accept-Ranges"] == "bytes"
    for rng, (a, b) in [("bytes=5-104", (5, 104)), ("bytes=7-", (7, size - 1)), ("bytes=-33", (size - 33, size - 1)),
                        (f"bytes=10-{size + 50}", (10, size - 1))]:
        st, h, body = _get(server + "/points.bin", {"Range": rng})
        assert st == 206 and body == blob[a:b + 1], rng
        assert h["Content-Range"] == f"bytes {a}-{b}/{size}" and int(h["Content-Length"]) == b - a + 1
    for rng in (f"bytes={size}-", "bytes=9-3", "bytes=-", "items=0-3"):
        st, h, _ = _get(server + "/points.bin", {"Range": rng})
        assert st == 416 and h["Content-Range"] == f"bytes */{size}", rng
    st, h, body = _get(server + "/points.bin", {"Range": "bytes=0-9"}, method="HEAD")
    assert st == 206 and body == b"" and h["Content-Length"] == "10"
    assert _get(server + "/sprites/s0.webp")[1]["Content-Type"] == "image/webp"
    assert _get(server + "/points.bin", method="POST")[0] == 405
    assert _get(server + "/sprites/")[0] == 403           # no listings
    assert _get(server + "/../../etc/passwd")[0] == 404   # nothing outside the folder
    assert _get(server + "/nope.bin")[0] == 404


def test_serve_command(folder):
    # started with SIGINT ignored, as under a launcher or a test runner that ignores it: Ctrl-C must
    # still stop the server (a Python process that starts with SIGINT ignored keeps ignoring it)
    proc = subprocess.Popen([sys.executable, "-c", "from conceptevo.cli import main; main()", "serve",
                             str(folder.parent / "report"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "300"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        assert "Ctrl-C" in line + proc.stdout.readline()
        st, _, body = _get(f"http://127.0.0.1:{m.group(1)}/index.html")
        assert st == 200 and b"report_folder.js" in body
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = subprocess.run([sys.executable, "-c", "from conceptevo.cli import main; main()", "serve",
                          str(folder / "sprites")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "300"})
    assert bad.returncode == 2 and "no index.html" in bad.stdout + bad.stderr


# ------------------------------------------------------------------------------ in Chromium
PIXEL = """(k) => { const gd = document.getElementById('map');
  const t = gd.data.filter(t => t.meta === 'pts' && t.xaxis === 'x' && t.x.length > 0)[0];
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
  return {px: r.left + xa._offset + xa.l2p(t.x[k]), py: r.top + ya._offset + ya.l2p(t.y[k]),
          point: t.customdata[k]}; }"""


def _hover(page, pos) -> None:
    """A real mouse move onto a point, until the side panel shows its patches (a hover lost to a redraw
    under the pointer is retried, as a user would)."""
    for attempt in range(3):
        page.mouse.move(pos["px"] - 30, pos["py"] - 30)
        page.mouse.move(pos["px"], pos["py"])
        try:
            page.wait_for_function(f"document.getElementById('sp-patches').dataset.shown === '{pos['point']}'",
                                   timeout=8_000)
            return
        except Exception:
            if attempt == 2:
                raise


@pytest.mark.browser
def test_folder_report_in_chromium(folder, server, tmp_path):
    from test_report_browser import ARGS, CHROMIUM, _skip_loudly

    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _skip_loudly(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_loudly("the Python package playwright is missing (pip install playwright)")
    m, chunks = _chunks(folder)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = b.new_page(viewport={"width": 1500, "height": 1000})
            errors, ranges = [], []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: (errors.append("off-loopback request " + r.url)
                                          if not r.url.startswith((server, "data:", "blob:")) else
                                          ranges.append(r.headers.get("range")) if r.url.endswith(".bin") else None))
            page.goto(server + "/")
            page.wait_for_selector('body[data-map-ready="1"]', timeout=60_000)
            assert page.get_attribute("#threshold", "data-mode") == "folder"
            assert all(ranges) and ranges  # every binary read is a range request
            # every panel shows its latest epoch; the plotted points are exactly that chunk's
            plotted = page.evaluate("""() => document.getElementById('map').data.filter(t => t.meta === 'pts')
                .map(t => [t.xaxis, Array.from(t.customdata)])""")
            by_axis = {}
            for ax, ids in plotted:
                by_axis.setdefault(ax, set()).update(ids)
            for mi, a in enumerate(m["across"]):
                c = next(c for c in m["chunks"] if c["m"] == mi and c["e"] == a["epochs"][-1])
                assert by_axis["x" if mi == 0 else f"x{mi + 1}"] == set(range(c["start"], c["start"] + c["n"]))
            # level of detail: a prefix of the grey sample at full view, more of it after zooming in
            counts = [g["count"] for g in m["ghost"]["models"]]
            per = int(40 / 2 ** 0.5)
            assert page.evaluate("window.conceptevoReport.ghost.map(g => g.n)") == [min(c, per) for c in counts]
            xr, yr = m["range"]["x"], m["range"]["y"]
            page.evaluate(f"""() => Plotly.relayout('map', {{'xaxis.range': [{xr[0]}, {(xr[0] + xr[1]) / 2}],
                'yaxis.range': [{yr[0]}, {(yr[0] + yr[1]) / 2}]}})""")
            page.wait_for_function(f"window.conceptevoReport.ghost.every((g, i) => g.n === Math.min(g.count, {4 * per}))",
                                   timeout=20_000)
            page.evaluate(f"() => Plotly.relayout('map', {{'xaxis.range': {xr}, 'yaxis.range': {yr}}})")
            page.wait_for_timeout(200)
            page.evaluate("() => window.conceptevoReport.idle()")
            # hover: a real mouse move onto a point shows its patches, drawn from the sprite sheets
            pos = page.evaluate(PIXEL, 3)
            _hover(page, pos)
            ci = next(i for i, c in enumerate(m["chunks"]) if c["start"] <= pos["point"] < c["start"] + c["n"])
            j = pos["point"] - m["chunks"][ci]["start"]
            n_refs = int((chunks[ci]["patches"][j] >= 0).sum())
            assert page.locator("#sp-patches canvas[data-drawn='1']").count() == n_refs > 0
            meta = page.text_content("#sp-meta")
            assert f"layer {m['layers'][chunks[ci]['layer'][j, 0]]} · channel {chunks[ci]['channel'][j, 0]}" in meta
            # then the same neuron across epochs and its neighbours (their chunks fetched on demand)
            page.wait_for_function("document.querySelectorAll('#sp-epochs .epoch-row').length > 0", timeout=20_000)
            n_nb = int((chunks[ci]["nb"][j] >= 0).sum())
            page.wait_for_function(f"document.querySelectorAll('#sp-neighbours li').length === {max(1, n_nb)}",
                                   timeout=20_000)
            # epoch slider to epoch 0: model a shows its epoch-0 chunk
            page.evaluate("""() => { const s = document.getElementById('epoch-slider'); s.value = '0';
                s.dispatchEvent(new Event('input')); }""")
            c0 = next(c for c in m["chunks"] if c["m"] == 0 and c["e"] == 0)
            page.wait_for_selector('#map[data-epoch="0"]', timeout=20_000)
            page.wait_for_function(f"""() => document.getElementById('map').data.some(t => t.meta === 'pts'
                && t.xaxis === 'x' && t.customdata.length && t.customdata[0] >= {c0['start']}
                && t.customdata[0] < {c0['start'] + c0['n']})""", timeout=20_000)
            assert page.text_content("#epoch-label") == "epoch 0"
            # click pins, Esc releases
            pos = page.evaluate(PIXEL, 0)
            _hover(page, pos)  # Plotly clicks the point it last hovered: hover first, as a hand does
            page.mouse.down()
            page.mouse.up()
            page.wait_for_function(f"window.conceptevoReport.state.pinned === {pos['point']}", timeout=20_000)
            page.keyboard.press("Escape")
            page.wait_for_function("window.conceptevoReport.state.pinned === null", timeout=20_000)
            # charts and evolutions render; patches of the evolution rows come from the sheets too
            assert page.locator("#fig-accuracy .main-svg").count() > 0
            page.wait_for_function("document.querySelectorAll('#evo-body canvas[data-drawn=\"1\"]').length > 0",
                                   timeout=20_000)
            assert errors == []
            # from file:// the page says how to open it instead of failing silently
            page2 = b.new_page()
            page2.goto((folder / "index.html").as_uri())
            page2.wait_for_selector('body[data-map-ready="file"]', timeout=20_000)
            assert page2.is_visible("#file-warning") and "conceptevo serve" in page2.text_content("#file-warning")
        finally:
            b.close()


def test_extra_sections_in_both_formats(tmp_path, data, monkeypatch):
    """Sections added by later stages (live monitor alerts, directions) appear in the one-file
    report and in the folder report alike."""
    import dataclasses

    from conceptevo.monitor import alerts_report_section

    summary = {"run": "high_lr", "observations": 9, "peak_epoch": 2, "peak_top1": 0.28, "chance_band": 0.048,
               "chance_epoch": 5, "first": {"lr_too_high": 4},
               "alerts": [{"kind": "lr_too_high", "epoch": 4, "margin": 0.2, "message": "lower <the> lr",
                           "train_top1": 0.064}]}
    d = dataclasses.replace(data, extra_sections=[alerts_report_section([summary])])
    one = build_report(tmp_path / "one.html", d).read_text()
    monkeypatch.setenv("CONCEPTEVO_REPORT_FOLDER_THRESHOLD", "1")
    folder = build_report(tmp_path / "two.html", d).read_text()
    for page in (one, folder):
        assert "Live monitor: when each alert fired" in page
        assert "<td>lr_too_high</td><td>4</td><td>0.064</td>" in page and "lower &lt;the&gt; lr" in page
        assert "epoch 5" in page

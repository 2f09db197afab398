"""The HTML report: content round trip through the embedded JSON, size rules, static PNGs, bad input.

The browser behaviour (slider, hover, side panel) is tested in test_report_browser.py.
"""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conceptevo._reference import synthetic_report_data
from conceptevo.errors import ConceptEvoError
from conceptevo.report import ReportData, build_report, write_static_figures


def small_data(rng, **kw) -> ReportData:
    args = dict(runs=("run_a", "run_b"), epochs=(0, 1, 3), layers=(("c1", 6), ("c2", 5)), k=4, num_images=40,
                classes=("cat", "dog"), seed=int(rng.integers(2**31)))
    args.update(kw)
    return synthetic_report_data(**args)


def payload_of(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="ce-data">(.*?)</script>', text, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


def plotly_array(v) -> np.ndarray:
    """A trace array as plotly.py writes it: a list, or ``{"dtype", "bdata"}`` (base64 typed array)."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v, dtype=float)


def uri(p: dict, i: int) -> str:
    return f"data:{p['mimes'][p['imageMime'][i]]};base64,{p['images'][i]}"


def as_uri(s: str) -> str:
    return s if s.startswith("data:") else "data:image/png;base64," + s


def key_of(pts: dict, i: int) -> tuple:
    return (pts["models"][pts["m"][i]], pts["e"][i], pts["layers"][pts["l"][i]], pts["c"][i])


def test_round_trip_of_every_section(rng, tmp_path):
    data = small_data(rng)
    out = build_report(tmp_path / "r.html", data, max_evolutions=4)
    text = out.read_text(encoding="utf-8")
    p = payload_of(text)
    pts = p["points"]

    # self-contained: no external script, stylesheet or import
    assert not re.search(r"<script[^>]*\bsrc\s*=", text) and "<link" not in text and "@import" not in text
    assert text.count("Plotly.newPlot") >= 1 and len(p["images"]) > 0

    # points: same keys in the same order, coordinates rounded to 1/5000 of the extent
    df = data.points
    assert [key_of(pts, i) for i in range(len(df))] == [
        (str(m), int(e), str(la), int(c)) for m, e, la, c in zip(df.model, df.epoch, df.layer, df.channel)]
    extent = max(np.ptp(df.x), np.ptp(df.y))
    assert np.abs(np.array(pts["x"]) - df.x.to_numpy()).max() <= extent / 5000
    assert np.abs(np.array(pts["y"]) - df.y.to_numpy()).max() <= extent / 5000

    # patches: every neuron's list comes back exactly; each distinct image is stored once
    for i in range(len(df)):
        want = [as_uri(s) for s in data.patches.get(key_of(pts, i), [])]
        assert [uri(p, r) for r in pts["patches"][i]] == want
    assert len(set(p["images"])) == len(p["images"])
    referenced = {as_uri(s) for k, v in data.patches.items() for s in v}
    assert len(p["images"]) <= len(referenced)

    # neighbours: indices map back to the keys, distances to 4 significant digits
    for i in range(len(df)):
        want = data.neighbours[key_of(pts, i)]
        got = pts["neighbours"][i]
        assert [key_of(pts, j) for j, _ in got] == [k for k, _ in want]
        assert all(math.isclose(d, float(f"{w:.4g}")) for (_, d), (_, w) in zip(got, want))

    # colourings: layer first, then the tag (categorical) and importance (numeric) columns
    colours = {c["name"]: c for c in pts["color"]}
    assert list(colours) == ["layer", "tag_concept", "importance"]
    tag = colours["tag_concept"]
    assert [tag["labels"][c] for c in tag["codes"]] == df.tag_concept.tolist()
    assert np.allclose(colours["importance"]["values"], df.importance, atol=5e-5)

    # evolutions: per class the top rows by score, with the patches at t and t'
    evo = data.evolutions
    assert p["evolutions"]["classes"] == ["cat", "dog"]
    for cls, rows in p["evolutions"]["rows"].items():
        ref = evo[evo["class"] == cls].sort_values("score", ascending=False, kind="stable").head(4)
        assert [(r["layer"], r["channel"], r["t"], r["tp"]) for r in rows] == list(
            zip(ref.layer, ref.channel, ref.t, ref.t_prime))
        assert all(math.isclose(r["score"], float(f"{s:.4g}")) for r, s in zip(rows, ref.score))
        for r in rows:
            for field, ep in (("pt", r["t"]), ("ptp", r["tp"])):
                assert [uri(p, i) for i in r[field]] == [
                    as_uri(s) for s in data.patches.get((r["model"], ep, r["layer"], r["channel"]), [])]

    # charts: one accuracy trace per run x split x top-k, one diagnostics trace per run x metric
    figs = p["figs"]
    assert len(figs["accuracy"]["data"]) == 2 * 2 * 2
    assert len(figs["diagnostics"]["data"]) == 2 * 2
    rev = figs["reversion"]["data"]
    assert [t["name"] for t in rev] == ["train top-1", "test top-1"] and list(rev[0]["x"])[-1] == "random"
    assert [v for _, v in p["verdicts"]] == list(data.verdicts.values())
    for section in ("fig-accuracy", "fig-diagnostics", "fig-reversion", "evo-class", "verdicts"):
        assert f'id="{section}"' in text


def test_points_only_and_plain_base64(rng, tmp_path):
    n = 7
    pts = pd.DataFrame({
        "model": ["m"] * n, "epoch": [5] * n, "layer": ["L"] * n, "channel": range(n),
        "x": rng.normal(size=n), "y": rng.normal(size=n),
        "family": ["a", None, "b", "a", "b", None, "a"], "flag": [True, False] * 3 + [True],
    })
    pts.loc[3, "x"] = np.nan                               # a neuron without coordinates: null, not plotted
    raw = "iVBORw0KGgo="                                  # plain base64 is taken as PNG
    data = ReportData(points=pts, patches={("m", 5, "L", 0): raw, ("m", 5, "L", 1): [raw, raw]})
    text = build_report(tmp_path / "p.html", data).read_text(encoding="utf-8")
    p = payload_of(text)
    assert p["points"]["x"][3] is None and p["points"]["y"][3] is not None
    finite = pts.x.dropna()
    assert p["points"]["range"]["x"][0] < finite.min() and p["points"]["range"]["x"][1] > finite.max()
    assert p["images"] == [raw] and p["points"]["patches"][:3] == [[0], [0, 0], []]
    fam = next(c for c in p["points"]["color"] if c["name"] == "family")
    assert fam["codes"] == [0, -1, 1, 0, 1, -1, 0] and fam["labels"] == ["a", "b"]
    flag = next(c for c in p["points"]["color"] if c["name"] == "flag")
    assert flag["kind"] == "cat"
    assert p["figs"] == {} and "evolutions" not in p
    for section in ("fig-accuracy", "fig-diagnostics", "fig-reversion", "evo-class"):
        assert f'id="{section}"' not in text


def test_markup_in_names_cannot_escape(tmp_path):
    evil = "</script><script>window.pwned=1</script><!--"
    pts = pd.DataFrame({"model": [evil], "epoch": [0], "layer": ["<b>l</b>"], "channel": [0],
                        "x": [0.0], "y": [1.0]})
    data = ReportData(points=pts, title="<i>title</i>", facts={"<x>": "<y>"},
                      verdicts={evil: "fine"})
    text = build_report(tmp_path / "e.html", data).read_text(encoding="utf-8")
    assert "window.pwned=1</script>" not in text and "<i>title</i>" not in text and "<x>" not in text
    p = payload_of(text)
    assert p["points"]["models"] == [evil] and p["points"]["layers"] == ["<b>l</b>"]
    assert p["verdicts"] == [[evil, "fine"]]


def test_neighbours_as_dataframe_and_outside_keys(rng, tmp_path):
    data = small_data(rng, runs=("a",), epochs=(0, 2), layers=(("c1", 4),))
    rows = []
    for key, lst in data.neighbours.items():
        for nk, d in lst:
            rows.append((*key, *nk, d))
    ghost = ("a", 9, "c9", 0)                             # a neighbour that is not plotted
    first = next(iter(data.neighbours))
    rows.append((*first, *ghost, 123.0))
    data.patches[ghost] = [next(iter(data.patches.values()))[0]]
    frame = pd.DataFrame(rows, columns=["model", "epoch", "layer", "channel", "nb_model", "nb_epoch",
                                        "nb_layer", "nb_channel", "distance"])
    mapping = {k: list(v) for k, v in data.neighbours.items()}
    mapping[first] = mapping[first] + [(ghost, 123.0)]
    data.neighbours = frame
    p1 = payload_of(build_report(tmp_path / "a.html", data).read_text(encoding="utf-8"))
    data.neighbours = mapping
    p2 = payload_of(build_report(tmp_path / "b.html", data).read_text(encoding="utf-8"))
    assert p1["points"]["neighbours"] == p2["points"]["neighbours"]
    i = p1["points"]["models"].index("a")
    idx = next(j for j in range(len(p1["points"]["m"])) if key_of(p1["points"], j) == first)
    assert i == 0 and p1["points"]["neighbours"][idx][-1] == [-1, 123.0]
    assert p1["points"]["outside"] == ["a · epoch 9 · c9 #0"]
    assert [uri(p1, r) for r in p1["points"]["outsidePatches"]["0"]] == [as_uri(data.patches[ghost][0])]


def test_bad_input_is_named(rng, tmp_path):
    good = small_data(rng, runs=("a",), epochs=(0, 1), layers=(("c1", 3),))
    with pytest.raises(ConceptEvoError, match=r"points lacks column\(s\) \['y'\]"):
        build_report(tmp_path / "x.html", ReportData(points=good.points.drop(columns="y")))
    with pytest.raises(ConceptEvoError, match="points is empty"):
        build_report(tmp_path / "x.html", ReportData(points=good.points.iloc[:0]))
    dup = pd.concat([good.points, good.points.iloc[[1]]])
    with pytest.raises(ConceptEvoError, match=r"a · epoch 0 · c1 #1 twice \(rows 1 and 6\)"):
        build_report(tmp_path / "x.html", ReportData(points=dup))
    with pytest.raises(ConceptEvoError, match="accuracy lacks column"):
        build_report(tmp_path / "x.html",
                     ReportData(points=good.points, accuracy=pd.DataFrame({"run": ["a"]})))
    with pytest.raises(ConceptEvoError, match="evolutions lacks column.*t_prime"):
        build_report(tmp_path / "x.html", ReportData(points=good.points,
                                                     evolutions=good.evolutions.drop(columns="t_prime")))
    with pytest.raises(ConceptEvoError, match="not a base64 image data URI"):
        build_report(tmp_path / "x.html", ReportData(points=good.points,
                                                     patches={("a", 0, "c1", 0): "data:text/html,<b>"}))
    with pytest.raises(ConceptEvoError, match="must be base64 strings"):
        build_report(tmp_path / "x.html", ReportData(points=good.points, patches={("a", 0, "c1", 0): [3]}))
    with pytest.raises(ConceptEvoError, match="needs a ReportData"):
        build_report(tmp_path / "x.html", good.points)
    assert not (tmp_path / "x.html").exists()               # nothing half-written


def test_static_figures(rng, tmp_path):
    data = small_data(rng)
    build_report(tmp_path / "r.html", data, png_dir=tmp_path / "png")
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["accuracy.png", "diagnostics.png", "map.png", "reversion.png"]   # no temp files left
    for name in names:
        with Image.open(tmp_path / "png" / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
            # something was drawn: not a blank canvas
            assert len(np.unique(np.asarray(im.convert("L")))) > 10
    only = write_static_figures(tmp_path / "png2", ReportData(points=data.points))
    assert sorted(only) == ["map"] and [p.name for p in (tmp_path / "png2").iterdir()] == ["map.png"]
    # the map grid: one row per model, one column per epoch (at most max_epochs, evenly spread)
    two = write_static_figures(tmp_path / "png3", ReportData(points=data.points), max_epochs=2)["map"]
    with Image.open(only["map"]) as a, Image.open(two) as b:
        assert b.width < a.width and abs(b.height - a.height) < 0.1 * a.height


def test_size_grows_with_distinct_patches_only(rng, tmp_path):
    """Repeating the same patches under more neurons must not repeat their bytes."""
    data = small_data(rng, runs=("a",), epochs=(0, 1), layers=(("c1", 8),))
    base = build_report(tmp_path / "1.html", data).stat().st_size
    one = next(iter(data.patches.values()))
    data.patches = {k: one for k in data.patches}           # every neuron shows the same images
    same = build_report(tmp_path / "2.html", data).stat().st_size
    p = payload_of((tmp_path / "2.html").read_text(encoding="utf-8"))
    assert len(p["images"]) == len(set(one)) and same < base
    assert Path(tmp_path / "2.html").read_text(encoding="utf-8").count(one[0].split(",", 1)[1]) == 1


def test_diagnostics_table_of_the_diagnostics_stage(rng, tmp_path):
    """The diagnostics stage names runs ``model`` and adds many columns: only the diagnostics are charted."""
    data = small_data(rng, runs=("a", "b"), epochs=(0, 1, 2), layers=(("c1", 3),))
    table = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "epoch": [0, 1, 2] * 2,
                          "diversity": rng.normal(size=6), "entropy_x": rng.normal(size=6),
                          "n_neurons": [3] * 6, "movement": [np.nan, 1, 2] * 2,
                          "movement_2d": rng.random(6), "train_top1": rng.random(6),
                          "movement_per_gain": rng.random(6)})
    data.diagnostics = table
    p = payload_of(build_report(tmp_path / "d.html", data).read_text(encoding="utf-8"))
    traces = p["figs"]["diagnostics"]["data"]
    assert len(traces) == 2 * 3                                        # runs x (diversity, movement, per gain)
    by = {(t["name"], t["xaxis"]): t for t in traces}
    for run, rows in (("a", slice(0, 3)), ("b", slice(3, 6))):
        for axis, col in (("x", "diversity"), ("x2", "movement"), ("x3", "movement_per_gain")):
            assert np.allclose(plotly_array(by[(run, axis)]["y"]), table[col][rows], equal_nan=True)
    data.diagnostic_metrics = ["entropy_x"]
    p = payload_of(build_report(tmp_path / "d.html", data).read_text(encoding="utf-8"))
    assert len(p["figs"]["diagnostics"]["data"]) == 2
    data.diagnostic_metrics = ["nope"]
    with pytest.raises(ConceptEvoError, match=r"diagnostic_metrics names column\(s\) \['nope'\]"):
        build_report(tmp_path / "d.html", data)
    assert data.diagnostics is table and "model" in table.columns       # the caller's table is not renamed

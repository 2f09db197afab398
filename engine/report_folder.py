"""The report at scale: a folder of binary point chunks, a WebGL map and WebP sprite sheets.

Below :data:`FOLDER_THRESHOLD` plotted neurons the report is the one self-contained HTML file of
:mod:`conceptevo.report`. Above it, :func:`build_report_folder` writes a folder instead, read by the
browser through a local HTTP server (``conceptevo serve DIR``, :func:`serve`)::

    index.html          page skeleton; the header names the size threshold and this folder's size
    manifest.json       what the page needs up front: models, epochs, layers, colourings, the chunk
                        table, the charts (accuracy, diagnostics, reversion), evolutions, verdicts
    points.bin          one chunk per (model, epoch), fetched with an HTTP Range request when the
                        epoch slider reaches it; each chunk is a run of little-endian 4-byte columns:
                        x, y (float32), layer, channel, neuron (int32), patch refs (int32 x P),
                        neighbours (int32 x K, global point index), distances (float32 x K), one
                        column per extra colouring (int32 codes or float32 values)
    ghost_<m>.bin       every point of model m (all epochs) as uint16 (x, y) pairs quantised to the map's
                        range, in a seeded random order: any prefix is a uniform sample, so the page
                        draws a bounded prefix (level of detail) and fetches more as one zooms in
    across.bin          per model, per neuron, per saved epoch: (global point index, first patch ref),
                        int32 -- one Range request gives "the same neuron at each epoch"
    sprites/s<i>.webp   distinct patches (equal images stored once), 64 per sheet in an 8 x 8 grid, numbered
                        neuron by neuron over its epochs, fetched the first time a neuron that uses them is shown
    plotly.min.js, report_folder.js, report_folder.css   the page's code (no network needed)

The map is drawn with Plotly ``scattergl`` (WebGL): the current epoch of each panel in full, the
grey "all epochs" context as the level-of-detail prefix. Hovering a neuron shows its patches from
the sprite sheets, then (asynchronously) the same neuron at a spread of epochs and its neighbours.

The folder is written next to its final place and renamed into it, so a reader never sees half a report.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConceptEvoError

__all__ = ["FOLDER_THRESHOLD", "report_format", "build_report_folder", "serve", "make_server"]

FOLDER_THRESHOLD = 50_000
"""Plotted neurons above which the report is a folder (the demo's ~16k points stay one file).
Override with the environment variable ``CONCEPTEVO_REPORT_FOLDER_THRESHOLD``."""

SHEET_GRID = 8  # 8 x 8 = 64 patches per sprite sheet: a hover decodes a few small sheets
GHOST_BUDGET = 40_000  # grey context points drawn at full view, over all panels
FORMAT = "conceptevo-report-folder"
VERSION = 1


def folder_threshold() -> int:
    """The threshold in force: :data:`FOLDER_THRESHOLD` or ``$CONCEPTEVO_REPORT_FOLDER_THRESHOLD``."""
    env = os.environ.get("CONCEPTEVO_REPORT_FOLDER_THRESHOLD")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ConceptEvoError(f"CONCEPTEVO_REPORT_FOLDER_THRESHOLD={env!r} is not an integer") from None
    return FOLDER_THRESHOLD


def report_format(num_points: int, threshold: int | None = None) -> dict[str, Any]:
    """What :func:`conceptevo.report.build_report` writes for ``num_points`` neurons (for the manifest)."""
    thr = folder_threshold() if threshold is None else int(threshold)
    return {"mode": "folder" if num_points > thr else "one file", "points": int(num_points),
            "one_file_max_points": thr}


def threshold_note(fmt: dict[str, Any]) -> str:
    """The line the report header shows."""
    thr = f"{fmt['one_file_max_points']:,}"
    if fmt["mode"] == "folder":
        return (f"{fmt['points']:,} neurons: above the one-file threshold of {thr}, so this report is a "
                "folder (binary point chunks, WebGL map, patch sprite sheets) served by conceptevo serve")
    return f"{fmt['points']:,} neurons: one self-contained file (a folder report above {thr} neurons)"


# ----------------------------------------------------------------------------------- sprites
def fit_cell(im, cell: int):
    """A patch as its sprite cell: scaled (nearest, aspect kept) to fit ``cell`` x ``cell``, centred on white --
    what the one-file report shows with ``object-fit: contain; image-rendering: pixelated``."""
    from PIL import Image

    if im.size == (cell, cell):
        return im
    w, h = im.size
    f = cell / max(w, h)
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    out = Image.new("RGB", (cell, cell), (255, 255, 255))
    out.paste(im.resize((nw, nh), Image.NEAREST), ((cell - nw) // 2, (cell - nh) // 2))
    return out


class _Sprites:
    """Distinct patch images (equal strings stored once) -> cell numbers in 16 x 16 WebP sheets."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.items: list[str] = []

    def ref(self, value: str) -> int:
        i = self.index.get(value)
        if i is None:
            if not isinstance(value, str):
                raise ConceptEvoError(f"ReportData.patches values must be base64 strings, got {type(value).__name__}")
            i = self.index[value] = len(self.items)
            self.items.append(value)
        return i

    def refs(self, value, limit: int | None) -> list[int]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else list(value)
        if limit is not None:
            values = values[:limit]
        return [self.ref(v) for v in values if v]

    @staticmethod
    def _decode(value: str):
        from PIL import Image

        b64 = value.partition(",")[2] if value.startswith("data:") else value
        try:
            return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the same bad input
            raise ConceptEvoError(f"ReportData.patches: not a base64 image ({value[:40]!r}...): {exc}") from None

    def cell_size(self) -> int:
        """The largest patch side (at most 96): PIL reads a size from the header without decoding pixels."""
        from PIL import Image

        side = 8
        for v in self.items:
            b64 = v.partition(",")[2] if v.startswith("data:") else v
            try:
                side = max(side, *Image.open(io.BytesIO(base64.b64decode(b64))).size)
            except Exception as exc:  # noqa: BLE001
                raise ConceptEvoError(f"ReportData.patches: not a base64 image ({v[:40]!r}...): {exc}") from None
            if side >= 96:
                return 96
        return side

    def write(self, folder: Path, cell: int, quality: int | None, threads: int | None) -> int:
        """Write ``sprites/s<i>.webp``; returns the number of sheets."""
        from PIL import Image

        per = SHEET_GRID * SHEET_GRID
        n_sheets = -(-len(self.items) // per)
        (folder / "sprites").mkdir(parents=True, exist_ok=True)

        def one(s: int) -> None:
            part = self.items[s * per:(s + 1) * per]
            rows = -(-len(part) // SHEET_GRID)
            sheet = Image.new("RGB", (SHEET_GRID * cell, rows * cell), (255, 255, 255))
            for j, v in enumerate(part):
                im = fit_cell(self._decode(v), cell)
                sheet.paste(im, ((j % SHEET_GRID) * cell, (j // SHEET_GRID) * cell))
            kw = {"lossless": True} if quality is None else {"quality": int(quality), "method": 4}
            sheet.save(folder / "sprites" / f"s{s}.webp", format="WEBP", **kw)

        workers = threads or min(8, os.cpu_count() or 1)
        if workers > 1 and n_sheets > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(n_sheets)))
        else:
            for s in range(n_sheets):
                one(s)
        return n_sheets


# ----------------------------------------------------------------------------------- the folder
def _ordered_points(data) -> tuple[pd.DataFrame, list[str], list[int], list[str]]:
    from .report import checked_points

    pts, models, layers = checked_points(data)
    pts = pts.assign(_m=pd.Categorical(pts["model"].astype(str), categories=models).codes.astype(np.int32),
                     _e=pts["epoch"].astype(np.int64), _l=pd.Categorical(pts["layer"].astype(str),
                                                                          categories=layers).codes.astype(np.int32),
                     _c=pts["channel"].astype(np.int64))
    dup = pts.duplicated(["_m", "_e", "_l", "_c"])
    if dup.any():
        r = pts[dup].iloc[0]
        raise ConceptEvoError(f"ReportData.points has neuron {r['model']} · epoch {r['epoch']} · "
                              f"{r['layer']} #{r['channel']} twice")
    pts = pts.sort_values(["_m", "_e", "_l", "_c"], kind="stable").reset_index(drop=True)
    epochs = sorted(int(e) for e in pd.unique(pts["_e"]))
    return pts, models, epochs, layers


def _neighbour_arrays(data, pts: pd.DataFrame, models, layers) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) global indices (-1 = none) and float32 distances, nearest first."""
    from .report import _NB_COLS, _require

    nb = data.neighbours
    n = len(pts)
    if nb is None:
        return np.full((n, 0), -1, np.int32), np.zeros((n, 0), np.float32)
    m_of = {m: i for i, m in enumerate(models)}
    l_of = {v: i for i, v in enumerate(layers)}
    index = pd.MultiIndex.from_arrays([pts["_m"], pts["_e"], pts["_l"], pts["_c"]])

    def lookup(m, e, l, c) -> np.ndarray:
        mi = pd.Series(m).astype(str).map(m_of).fillna(-1).to_numpy(np.int64)
        li = pd.Series(l).astype(str).map(l_of).fillna(-1).to_numpy(np.int64)
        q = pd.MultiIndex.from_arrays([mi, np.asarray(e, np.int64), li, np.asarray(c, np.int64)])
        return index.get_indexer(q)

    if isinstance(nb, pd.DataFrame):
        _require(nb, _NB_COLS, "neighbours")
        src = lookup(nb["model"], nb["epoch"], nb["layer"], nb["channel"])
        dst = lookup(nb["nb_model"], nb["nb_epoch"], nb["nb_layer"], nb["nb_channel"])
        dist = nb["distance"].to_numpy(np.float32)
    else:
        s, d, dd = [], [], []
        for k, lst in nb.items():
            for nk, dv in lst:
                s.append(k)
                d.append(nk)
                dd.append(float(dv))
        if not s:
            return np.full((n, 0), -1, np.int32), np.zeros((n, 0), np.float32)
        sa, da = list(zip(*s)), list(zip(*d))
        src, dst, dist = lookup(*sa), lookup(*da), np.asarray(dd, np.float32)
    lost = int((src < 0).sum() + ((src >= 0) & (dst < 0)).sum())
    if lost:
        warnings.warn(f"ReportData.neighbours: {lost} pair(s) name a neuron not in points; the folder report "
                      "leaves them out", stacklevel=4)
    ok = (src >= 0) & (dst >= 0)
    src, dst, dist = src[ok], dst[ok], dist[ok]
    order = np.argsort(src, kind="stable")  # keeps each neuron's rank order
    src, dst, dist = src[order], dst[order], dist[order]
    counts = np.bincount(src, minlength=n)
    k = int(counts.max()) if len(counts) else 0
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(src)) - first[src]
    idx = np.full((n, k), -1, np.int32)
    ds = np.zeros((n, k), np.float32)
    idx[src, rank] = dst
    ds[src, rank] = dist
    return idx, ds


def _colourings(pts: pd.DataFrame, layers: list[str]) -> tuple[list[dict], list[np.ndarray]]:
    from .report import _POINT_COLS, _QUALITATIVE, _sequential

    meta = [{"name": "layer", "kind": "cat", "labels": layers, "colors": _sequential(len(layers)), "field": None}]
    cols: list[np.ndarray] = []
    for col in pts.columns:
        if col in _POINT_COLS or col in ("_m", "_e", "_l", "_c"):
            continue
        s = pts[col]
        numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
        if numeric and (pd.api.types.is_float_dtype(s) or s.nunique() > 20):
            v = s.to_numpy(np.float32)
            fin = v[np.isfinite(v)]
            meta.append({"name": str(col), "kind": "num", "field": len(cols),
                         "min": float(fin.min()) if len(fin) else 0.0, "max": float(fin.max()) if len(fin) else 1.0})
            cols.append(v)
            continue
        cat = pd.Categorical(s.astype("object").where(s.notna(), None))
        labels = [str(v) for v in cat.categories]
        meta.append({"name": str(col), "kind": "cat", "labels": labels, "field": len(cols),
                     "colors": [_QUALITATIVE[i % len(_QUALITATIVE)] for i in range(len(labels))]})
        cols.append(cat.codes.astype(np.int32))
    return meta, cols


def build_report_folder(out_dir: str | Path, data, *, png_dir: str | Path | None = None,
                        max_patches: int | None = None, max_evolutions: int = 10,
                        threshold: int | None = None, sprite_quality: int | None = 85,
                        threads: int | None = None, seed: int = 0, ghost_budget: int = GHOST_BUDGET) -> Path:
    """Write the folder report of ``data`` (a :class:`~conceptevo.report.ReportData`) to ``out_dir``.

    Returns the path of its ``index.html``; open it with ``conceptevo serve out_dir``.
    ``sprite_quality``: WebP quality of the sprite sheets (None: lossless). ``seed`` fixes the
    order of the grey context points (their level-of-detail sample); ``ghost_budget`` is how many of them
    the page draws at full view over all panels (zooming in draws more, keeping the density on screen).
    """
    from plotly.offline import get_plotlyjs

    from . import report as rep

    data = rep._checked(data)
    pts, models, epochs, layers = _ordered_points(data)
    n = len(pts)
    fmt = report_format(n, threshold)
    fmt["mode"] = "folder"
    patches = rep._normalise_patches(data.patches)
    sprites = _Sprites()

    x = pts["x"].to_numpy(np.float64)
    y = pts["y"].to_numpy(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        raise ConceptEvoError("ReportData.points: no row has finite x and y")
    xr = (float(x[finite].min()), float(x[finite].max()))
    yr = (float(y[finite].min()), float(y[finite].max()))
    extent = max(xr[1] - xr[0], yr[1] - yr[0], 1e-12)
    pad_x = 0.04 * max(xr[1] - xr[0], extent * 0.1)
    pad_y = 0.04 * max(yr[1] - yr[0], extent * 0.1)
    rng_x, rng_y = [xr[0] - pad_x, xr[1] + pad_x], [yr[0] - pad_y, yr[1] + pad_y]

    # patches -> sprite refs (N, P). Cells are numbered neuron by neuron over its epochs (model, layer,
    # channel, epoch), so that one neuron's patches at every epoch share a sheet or two.
    keys = list(zip(pts["model"].astype(str), pts["_e"].tolist(), pts["layer"].astype(str), pts["_c"].tolist()))
    visit = np.lexsort((pts["_e"].to_numpy(), pts["_c"].to_numpy(), pts["_l"].to_numpy(), pts["_m"].to_numpy()))
    ref_lists: list = [None] * n
    for i in visit.tolist():
        ref_lists[i] = sprites.refs(patches.get(keys[i]), max_patches)
    p = max((len(r) for r in ref_lists), default=0)
    refs = np.full((n, p), -1, np.int32)
    for i, r in enumerate(ref_lists):
        if r:
            refs[i, :len(r)] = r
    del ref_lists
    nb_idx, nb_d = _neighbour_arrays(data, pts, models, layers)
    cmeta, ccols = _colourings(pts, layers)

    # neuron id within its model: (layer, channel)
    m_arr, e_arr = pts["_m"].to_numpy(np.int32), pts["_e"].to_numpy(np.int64)
    l_arr, c_arr = pts["_l"].to_numpy(np.int32), pts["_c"].to_numpy(np.int64)
    nid = np.zeros(n, np.int32)
    across_parts, across_meta, ghost_meta = [], [], []
    offset_across = 0
    rng = np.random.default_rng(seed)
    xq = np.clip(np.round((x - rng_x[0]) / (rng_x[1] - rng_x[0]) * 65534), 0, 65534)
    yq = np.clip(np.round((y - rng_y[0]) / (rng_y[1] - rng_y[0]) * 65534), 0, 65534)
    xq = np.where(finite, xq, 65535).astype(np.uint16)
    yq = np.where(finite, yq, 65535).astype(np.uint16)

    tmp_root = Path(out_dir).resolve().parent
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{Path(out_dir).name}.tmp-", dir=tmp_root))
    work.chmod(0o755)  # mkdtemp makes it private; a report is meant to be read
    try:
        for mi in range(len(models)):
            sel = np.flatnonzero(m_arr == mi)
            pair = l_arr[sel].astype(np.int64) * (int(c_arr.max()) + 1) + c_arr[sel]
            uniq, inv = np.unique(pair, return_inverse=True)
            nid[sel] = inv
            m_epochs = sorted(int(e) for e in np.unique(e_arr[sel]))
            e_pos = np.searchsorted(np.asarray(m_epochs), e_arr[sel])
            table = np.full((len(uniq), len(m_epochs), 2), -1, np.int32)
            table[inv, e_pos, 0] = sel
            table[inv, e_pos, 1] = refs[sel, 0] if p else -1
            across_parts.append(table)
            across_meta.append({"offset": offset_across, "neurons": len(uniq), "epochs": m_epochs})
            offset_across += table.nbytes
            order = sel[rng.permutation(len(sel))]
            order = order[finite[order]]
            ghost = np.empty((len(order), 2), np.uint16)
            ghost[:, 0], ghost[:, 1] = xq[order], yq[order]
            (work / f"ghost_{mi}.bin").write_bytes(ghost.astype("<u2").tobytes())
            ghost_meta.append({"file": f"ghost_{mi}.bin", "count": len(order)})
        with open(work / "across.bin", "wb") as f:
            for t in across_parts:
                f.write(t.astype("<i4").tobytes())
        del across_parts

        # chunks (model, epoch) -> points.bin
        fields = [("x", "f4", 1), ("y", "f4", 1), ("layer", "i4", 1), ("channel", "i4", 1), ("neuron", "i4", 1),
                  ("patches", "i4", p), ("nb", "i4", nb_idx.shape[1]), ("nbd", "f4", nb_idx.shape[1])]
        fields += [(f"c{j}", "f4" if c.dtype.kind == "f" else "i4", 1) for j, c in enumerate(ccols)]
        bounds = np.flatnonzero(np.diff(m_arr.astype(np.int64) * (1 << 40) + e_arr)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64)
        stops = np.concatenate([bounds, [n]]).astype(np.int64)
        chunks, offset = [], 0
        with open(work / "points.bin", "wb") as f:
            for a, b in zip(starts, stops):
                cols = [x[a:b].astype("<f4"), y[a:b].astype("<f4"), l_arr[a:b].astype("<i4"),
                        c_arr[a:b].astype("<i4"), nid[a:b].astype("<i4"), refs[a:b].astype("<i4"),
                        nb_idx[a:b].astype("<i4"), nb_d[a:b].astype("<f4")]
                cols += [c[a:b].astype("<f4" if c.dtype.kind == "f" else "<i4") for c in ccols]
                blob = b"".join(np.ascontiguousarray(c).tobytes() for c in cols)
                chunks.append({"m": int(m_arr[a]), "e": int(e_arr[a]), "start": int(a), "n": int(b - a),
                               "offset": offset, "bytes": len(blob)})
                f.write(blob)
                offset += len(blob)

        # evolutions, charts, verdicts
        evolutions = None
        if data.evolutions is not None and len(data.evolutions):
            from .report import _EVO_COLS, _require, _sig

            evo = data.evolutions
            _require(evo, _EVO_COLS, "evolutions")
            rows: dict[str, list] = {}
            classes = [str(c) for c in pd.unique(evo["class"].astype(str))]
            for cls, df in evo.assign(_cls=evo["class"].astype(str)).groupby("_cls", sort=False):
                df = df.sort_values("score", ascending=False, kind="stable").head(max_evolutions)
                rows[cls] = [{"model": str(r.model), "layer": str(r.layer), "channel": int(r.channel),
                              "t": int(r.t), "tp": int(r.t_prime), "score": _sig(float(r.score)),
                              "pt": sprites.refs(patches.get((str(r.model), int(r.t), str(r.layer), int(r.channel))),
                                                 max_patches),
                              "ptp": sprites.refs(patches.get((str(r.model), int(r.t_prime), str(r.layer),
                                                               int(r.channel))), max_patches)}
                             for r in df.itertuples(index=False)]
            evolutions = {"classes": classes, "rows": rows}
        runs = list(models)
        for table in (data.accuracy, data.diagnostics):
            if table is not None and "run" in table.columns:
                runs += [str(r) for r in pd.unique(table["run"].astype(str)) if str(r) not in runs]
        run_colours = rep._run_colours(runs)
        figs = {}
        if data.accuracy is not None:
            figs["accuracy"] = rep._fig_json(rep._accuracy_figure(data.accuracy, run_colours))
        if data.diagnostics is not None:
            figs["diagnostics"] = rep._fig_json(rep._diagnostics_figure(data.diagnostics, run_colours,
                                                                        data.diagnostic_metrics))
        if data.reversion is not None:
            rep._require(data.reversion, ("bin", "delta"), "reversion")
            figs["reversion"] = rep._fig_json(rep._reversion_figure(data.reversion))
        verdicts = []
        for head, text in (data.verdicts or {}).items():
            for t in [text] if isinstance(text, str) else list(text):
                verdicts.append([str(head), str(t)])
        map_layout, _ = rep._map_layout(models, tuple(rng_x), tuple(rng_y))

        cell = sprites.cell_size()
        n_sheets = sprites.write(work, cell, sprite_quality, threads)
        manifest = {
            "format": FORMAT, "version": VERSION, "title": data.title, "report_format": fmt,
            "models": models, "epochs": epochs, "layers": layers, "range": {"x": rng_x, "y": rng_y},
            "colour": cmeta, "fields": [[nm, dt, w] for nm, dt, w in fields], "chunks": chunks,
            "patches_per_point": p, "neighbours_per_point": int(nb_idx.shape[1]),
            "sprites": {"cell": cell, "grid": SHEET_GRID, "sheets": n_sheets, "distinct": len(sprites.items),
                        "quality": sprite_quality},
            "ghost": {"models": ghost_meta, "budget": int(ghost_budget)}, "across": across_meta,
            "figs": figs, "verdicts": verdicts, "evolutions": evolutions, "mapLayout": map_layout,
            "runColors": run_colours,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":"), allow_nan=False,
                                                      default=_json_default), encoding="utf-8")
        (work / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
        assets = resources.files("conceptevo") / "assets"
        for name in ("report_folder.js", "report_folder.css"):
            (work / name).write_bytes((assets / name).read_bytes())
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        (work / "index.html").write_text(_index_html(data, fmt, size), encoding="utf-8")
        _replace_dir(work, Path(out_dir))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if png_dir is not None:
        rep.write_static_figures(png_dir, data)
    return Path(out_dir) / "index.html"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` into ``final``; an old report there is moved aside first and removed after."""
    old = None
    if final.exists():
        if not final.is_dir() or not ((final / "manifest.json").exists() or not any(final.iterdir())):
            raise ConceptEvoError(f"{final} exists and is not a folder report; refusing to replace it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _index_html(data, fmt: dict, size: int) -> str:
    esc = html.escape
    facts = dict(data.facts or {})
    facts["report size"] = f"{size / 2**20:.1f} MiB in this folder"
    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in facts.items())
    extra = []  # the same trusted sections as the one-file report (tracing, directions, live monitor)
    if getattr(data, "tracing", None) is not None:
        from .tracing import report_section

        extra.append(report_section(data.tracing))
    extra += [str(x) for x in (getattr(data, "extra_sections", None) or ())]
    extra_html = "\n".join(extra)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(data.title)}</title><link rel="icon" href="data:,"><link rel="stylesheet" href="report_folder.css"></head><body>
<header><h1>{esc(data.title)}</h1><table class="facts">{rows}</table>
<p class="note" id="threshold" data-mode="{fmt['mode']}" data-threshold="{fmt['one_file_max_points']}">{esc(threshold_note(fmt))}</p></header>
<div id="file-warning" class="warning" hidden>This report is a folder of binary files that a browser cannot read from
<code>file://</code>. Serve it: <code>conceptevo serve &lt;this folder&gt;</code>, then open the address it prints.</div>
<section id="map-section"><h2>Unified concept map</h2>
<p class="note">Each panel is one model; all share one space. The current epoch is drawn in full; the grey
context of all epochs is a uniform sample that grows as you zoom in. Hover a neuron for its example patches;
click to pin it.</p>
<div class="controls"><span><button id="play" type="button">&#9654; play</button>
<input id="epoch-slider" type="range" min="0" max="0" step="1" value="0" aria-label="epoch">
<span id="epoch-label"></span></span><label>colour by <select id="color-by"></select></label>
<label><input id="ghost" type="checkbox" checked> all epochs in grey</label><span id="lod" class="note"></span></div>
<div class="map-row"><div id="map"></div><aside id="side-panel">
<div id="sp-title">Hover or click a neuron</div><div id="sp-meta"></div><div id="sp-pin"></div>
<div id="sp-patches" class="patches"></div><h3>The same neuron across epochs</h3>
<div id="sp-epochs"></div><h3>Nearest neighbours (all models and epochs)</h3>
<ol id="sp-neighbours"></ol></aside></div></section>
<section id="sec-accuracy" hidden><h2>Accuracy</h2><p class="note">solid: test, dashed: train</p><div id="fig-accuracy"></div></section>
<section id="sec-diagnostics" hidden><h2>Training diagnostics</h2><p class="note">Concept diversity falls when
concepts are destroyed (e.g. a too high learning rate); a slow evolution speed while training accuracy rises hints at
overfitting.</p><div id="fig-diagnostics"></div><ul id="verdicts" class="verdicts"></ul></section>
<section id="sec-evolutions" hidden><h2>Important concept evolutions</h2><p class="note">Score = fraction of the
class's images whose prediction the evolution helps (Eq. 4).</p><label>class <select id="evo-class"></select></label>
<table class="evo"><thead><tr><th>model</th><th>neuron</th><th>importance</th><th>before</th><th></th><th>after</th>
</tr></thead><tbody id="evo-body"></tbody></table></section>
<section id="sec-reversion" hidden><h2>Reversion check</h2><p class="note">Reverting the evolutions of more
important neurons should lower accuracy more; the random bin is the baseline.</p><div id="fig-reversion"></div></section>
{extra_html}
<script src="plotly.min.js"></script><script src="report_folder.js"></script>
</body></html>
"""


# ----------------------------------------------------------------------------------- the server
def make_server(folder: str | Path, port: int = 8000, host: str = "127.0.0.1"):
    """A ``ThreadingHTTPServer`` serving ``folder`` read-only (GET/HEAD, byte ranges) on ``host:port``.

    ``port=0`` picks a free port (see ``server.server_address``).
    """
    import http.server
    import socketserver  # noqa: F401 - ThreadingHTTPServer's base

    root = Path(folder).resolve()
    if not root.is_dir():
        raise ConceptEvoError(f"conceptevo serve: {folder} is not a folder")
    if not (root / "index.html").is_file():
        raise ConceptEvoError(f"conceptevo serve: {folder} has no index.html (is it a report folder?)")
    handler = _range_handler(root)
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise ConceptEvoError(f"conceptevo serve: cannot listen on {host}:{port}: {exc}; "
                              "pick another port with --port") from None
    server.daemon_threads = True
    return server


def _range_handler(root: Path):
    import http.server
    import re

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the page fetches many small ranges and sheets
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".webp": "image/webp", ".bin": "application/octet-stream",
                          ".js": "text/javascript", ".json": "application/json", ".css": "text/css"}

        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, fmt, *args):  # quiet: one line per request is noise at 1M points
            pass

        def handle(self):  # a browser closing a kept-alive connection is not an error
            try:
                super().handle()
            except (ConnectionResetError, BrokenPipeError):
                pass

        def list_directory(self, path):
            self.send_error(403, "no directory listings")
            return None

        def _range(self, size: int):
            header = self.headers.get("Range")
            if not header:
                return None
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
            if not m or (m.group(1) == "" and m.group(2) == ""):
                return "bad"
            if m.group(1) == "":  # suffix: the last N bytes
                n = int(m.group(2))
                return (max(0, size - n), size - 1) if n > 0 else "bad"
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) else size - 1
            if a >= size or b < a:
                return "bad"
            return a, min(b, size - 1)

        def send_head(self):
            self._length = None
            path = Path(self.translate_path(self.path))
            if path.is_dir() or not path.is_file():
                return super().send_head()
            try:
                f = open(path, "rb")
            except OSError:
                self.send_error(404, "file not found")
                return None
            size = os.fstat(f.fileno()).st_size
            r = self._range(size)
            if r == "bad":
                f.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            ctype = self.guess_type(str(path))
            if r is None:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self._length = size
            else:
                a, b = r
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                self.send_header("Content-Length", str(b - a + 1))
                f.seek(a)
                self._length = b - a + 1
            self.send_header("Content-Type", ctype)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            return f

        def copyfile(self, source, outputfile):
            left = getattr(self, "_length", None)
            if left is None:
                return super().copyfile(source, outputfile)
            while left > 0:
                buf = source.read(min(1 << 20, left))
                if not buf:
                    break
                outputfile.write(buf)
                left -= len(buf)

        def do_POST(self):  # read-only
            self.send_error(405, "read-only server")

        do_PUT = do_DELETE = do_PATCH = do_POST

    return Handler


def serve(folder: str | Path, port: int = 8000, host: str = "127.0.0.1", echo=print) -> None:
    """Serve a folder report until Ctrl-C (see :func:`make_server`)."""
    import signal
    import threading

    server = make_server(folder, port, host)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must stop the server even when the process was started with SIGINT ignored (a
        # parent that ignores it, e.g. a launcher or a test runner, passes that on to its children);
        # SIGTERM stops it the same way.
        def _stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _stop)
    h, p = server.server_address[:2]
    echo(f"Serving the report {Path(folder).resolve()} read-only at http://{h}:{p}/\n"
         f"Open http://{h}:{p}/ in a browser on this machine (over SSH: ssh -L {p}:127.0.0.1:{p} <host>, "
         f"then open the same address locally). Press Ctrl-C to stop.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("stopped")
    finally:
        server.server_close()


def _main(argv: Sequence[str] | None = None) -> int:  # python -m conceptevo.report_folder DIR [PORT]
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    serve(args[0], int(args[1]) if len(args) > 1 else 8000)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

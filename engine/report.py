"""Self-contained interactive HTML report (Plotly) and static PNG figures.

:func:`build_report` writes ONE HTML file that opens from disk with no server and
no network: plotly.js is inlined once (about 4.8 MB), the data is one JSON block,
and a small script of ours draws the map and wires the side panel. Sections:

* **Unified map** -- one panel per model (training run), side by side, sharing the
  axes of the unified 2-D space; one epoch slider (and a play button) moves all
  panels together; points are coloured by layer or by any extra column of
  ``points`` (a concept tag family, or a number such as an importance score);
  faint grey dots show every epoch of that model for context. The panels frame the bulk
  of the points (1st-99th percentiles of all runs and epochs with a 10% margin, one frame
  for every panel and epoch); the few beyond it are drawn as triangles pinned at the edge,
  pointing their way, and "show all points" zooms out to every point. Hovering a neuron
  shows its example patches, layer and channel, the same neuron at every epoch,
  and its precomputed nearest neighbours in other models and epochs; clicking pins
  the panel and circles the neuron and its neighbours on the map; clicking a
  neighbour jumps to it.
* **Accuracy** -- top-1 / top-5, train (dashed) and test (solid), per run.
* **Training diagnostics** -- concept diversity, evolution speed (movement) and any
  other numeric column per run and epoch, with the plain-language verdicts.
* **Important evolutions** -- for the class picked in a dropdown, the highest-scoring
  evolutions as rows: patches at epoch t, at t', the importance score (paper Fig. 3, 6).
* **Reversion check** -- accuracy change per importance bin and for a random bin
  (paper Fig. 7).

Every section but the map is optional (its table is ``None``). Size: every
distinct patch image is embedded once (equal base64 strings are shared), the
coordinates are rounded to 1/5000 of the map's extent, and neighbours are stored
as indices into the point table.

With ``png_dir`` the same content is also drawn with matplotlib (Agg canvas, no
global backend change) into ``map.png``, ``accuracy.png``, ``diagnostics.png`` and
``reversion.png`` for papers.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConceptEvoError
from .store import atomic_write

__all__ = ["NeuronKey", "ReportData", "build_report", "write_static_figures"]

NeuronKey = tuple[str, int, str, int]
"""``(model, epoch, layer, channel)``."""

_POINT_COLS = ("model", "epoch", "layer", "channel", "x", "y")
_ACC_COLS = ("train_top1", "train_top5", "test_top1", "test_top5")
_EVO_COLS = ("class", "model", "layer", "channel", "t", "t_prime", "score")
_NB_COLS = ("model", "epoch", "layer", "channel",
            "nb_model", "nb_epoch", "nb_layer", "nb_channel", "distance")
_SIZE_WARN_BYTES = 60 * 2**20
_QUALITATIVE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173",
]


@dataclass
class ReportData:
    """Everything the report shows. Only ``points`` is required.

    points
        One row per neuron to plot: ``model`` (str), ``epoch`` (int), ``layer`` (str),
        ``channel`` (int), ``x``, ``y`` (2-D map coordinates). Any other column is
        offered as a colouring: text / category / bool / small-int columns as
        categories (e.g. the dominant concept tag of a neuron's stimuli per tag
        family), float columns as a continuous scale.
    patches
        ``(model, epoch, layer, channel) -> base64 PNG`` or a list of them (one per
        stimulus, best first; see :func:`conceptevo.patches.report_patches`). A
        single string is shown as one image (e.g. a strip). Base64 ``data:image/...``
        URIs (WebP, JPEG, ...) are accepted as well. May hold neurons that are not in ``points``
        (those of the evolution rows).
    neighbours
        ``key -> [(neighbour key, distance), ...]`` nearest first, or a DataFrame with
        columns ``model, epoch, layer, channel, nb_model, nb_epoch, nb_layer,
        nb_channel, distance`` (row order = rank).
    accuracy
        ``run`` (or ``model``), ``epoch`` and any of ``train_top1, train_top5, test_top1, test_top5``.
    diagnostics
        ``run`` (or ``model``), ``epoch`` and numeric columns; one chart per column in
        ``diagnostic_metrics`` (default: those of ``diversity, movement, movement_per_gain``
        present -- ``movement_2d`` when there is no ``movement`` -- else every numeric column).
    verdicts
        ``run (or any heading) -> text`` or a list of texts: the diagnostics' plain-language verdicts.
    evolutions
        ``class, model, layer, channel, t, t_prime, score``; the patches at t and t' are
        looked up in ``patches`` under ``(model, t, layer, channel)`` and
        ``(model, t_prime, layer, channel)``.
    reversion
        ``bin`` (e.g. ``"0-25%"``, ..., ``"random"``), ``delta`` (accuracy change) and
        optionally ``metric`` (e.g. ``"train top-1"``), ``model`` (one chart per model)
        and ``std`` (error bars).
    title, facts
        Page title and a small table of run facts (dataset, base model, parameters).
    layer_order
        Order of layers in legends / colours (default: order of first appearance).
    extra_sections
        Trusted HTML fragments appended after the other sections (e.g.
        :func:`conceptevo.directions.directions_report_section`).
    """

    points: pd.DataFrame
    patches: Mapping[NeuronKey, str | Sequence[str]] | None = None
    neighbours: Mapping[NeuronKey, Sequence[tuple[NeuronKey, float]]] | pd.DataFrame | None = None
    accuracy: pd.DataFrame | None = None
    diagnostics: pd.DataFrame | None = None
    verdicts: Mapping[str, str | Sequence[str]] | None = None
    evolutions: pd.DataFrame | None = None
    reversion: pd.DataFrame | None = None
    title: str = "ConceptEvo report"
    facts: Mapping[str, Any] | None = None
    layer_order: Sequence[str] | None = None
    diagnostic_metrics: Sequence[str] | None = None
    tracing: pd.DataFrame | None = None   # trace_classes table (conceptevo.tracing.attribute_evolutions)
    tracing_contributions: pd.DataFrame | None = None   # conceptevo.tracing.class_contributions (ridge plots)
    tracing_images: Sequence[str | Path] = ()           # PNG grids of top training examples (example_grid)
    extra_sections: Sequence[str] = ()


def _per_run(df: pd.DataFrame | None, table: str) -> pd.DataFrame | None:
    """Validate a per-run table; a ``model`` column stands for ``run`` (the diagnostics' naming)."""
    if df is None:
        return None
    if isinstance(df, pd.DataFrame) and "run" not in df.columns and "model" in df.columns:
        df = df.rename(columns={"model": "run"})
    _require(df, ("run", "epoch"), table)
    return df


def _checked(data: ReportData) -> ReportData:
    if not isinstance(data, ReportData):
        raise ConceptEvoError(f"build_report needs a ReportData, got {type(data).__name__}")
    return dataclasses.replace(data, accuracy=_per_run(data.accuracy, "accuracy"),
                               diagnostics=_per_run(data.diagnostics, "diagnostics"))


# --------------------------------------------------------------------------- validation / keys
def _require(df: pd.DataFrame | None, cols: Sequence[str], table: str) -> None:
    if df is None:
        return
    if not isinstance(df, pd.DataFrame):
        raise ConceptEvoError(f"ReportData.{table} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ConceptEvoError(
            f"ReportData.{table} lacks column(s) {missing}; it has {list(df.columns)}"
        )


def _key(model, epoch, layer, channel) -> NeuronKey:
    return (str(model), int(epoch), str(layer), int(channel))


def _label(key: NeuronKey) -> str:
    return f"{key[0]} · epoch {key[1]} · {key[2]} #{key[3]}"


def _finite_or_none(values: np.ndarray, decimals: int | None = None) -> list:
    arr = np.asarray(values, dtype=np.float64)
    if decimals is not None:
        arr = np.round(arr, decimals)
    out = arr.tolist()
    if not np.isfinite(arr).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _sig(v: float, digits: int = 4) -> float | None:
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


class _ImageTable:
    """Distinct embedded images; equal strings are stored once, their ``data:`` prefix as a small code."""

    def __init__(self):
        self.items: list[str] = []
        self.mime: list[int] = []
        self.mimes: list[str] = ["image/png"]
        self._index: dict[str, int] = {}

    def add(self, value: str) -> int:
        i = self._index.get(value)
        if i is not None:
            return i
        mime, b64 = "image/png", value
        if value.startswith("data:"):
            head, sep, b64 = value.partition(",")
            if not sep or not re.fullmatch(r"data:image/[A-Za-z0-9.+-]+;base64", head):
                raise ConceptEvoError(f"ReportData.patches: not a base64 image data URI: {value[:40]!r}...")
            mime = head[5:-len(";base64")]
        if mime not in self.mimes:
            self.mimes.append(mime)
        i = self._index[value] = len(self.items)
        self.items.append(b64)
        self.mime.append(self.mimes.index(mime))
        return i

    def refs(self, value: str | Sequence[str] | None, limit: int | None) -> list[int]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else list(value)
        if limit is not None:
            values = values[:limit]
        for v in values:
            if not isinstance(v, str):
                raise ConceptEvoError(
                    f"ReportData.patches values must be base64 strings, got {type(v).__name__}"
                )
        return [self.add(v) for v in values if v]


def _normalise_patches(patches) -> dict[NeuronKey, Any]:
    if patches is None:
        return {}
    out = {}
    for k, v in patches.items():
        if len(k) != 4:
            raise ConceptEvoError(f"ReportData.patches key {k!r} is not (model, epoch, layer, channel)")
        out[_key(*k)] = v
    return out


def _normalise_neighbours(nb) -> dict[NeuronKey, list[tuple[NeuronKey, float]]]:
    if nb is None:
        return {}
    out: dict[NeuronKey, list[tuple[NeuronKey, float]]] = {}
    if isinstance(nb, pd.DataFrame):
        _require(nb, _NB_COLS, "neighbours")
        cols = [nb[c].to_numpy() for c in _NB_COLS]
        for m, e, l, c, nm, ne, nl, nc, d in zip(*cols):
            out.setdefault(_key(m, e, l, c), []).append((_key(nm, ne, nl, nc), float(d)))
        return out
    for k, lst in nb.items():
        out[_key(*k)] = [(_key(*nk), float(d)) for nk, d in lst]
    return out


# --------------------------------------------------------------------------- colours
def _sequential(n: int) -> list[str]:
    """``n`` colours along Viridis (layer depth reads as colour)."""
    from plotly.colors import sample_colorscale

    if n == 1:
        return sample_colorscale("Viridis", [0.4])
    return sample_colorscale("Viridis", [0.9 * i / (n - 1) for i in range(n)])


def _run_colours(names: Sequence[str]) -> dict[str, str]:
    return {n: _QUALITATIVE[i % len(_QUALITATIVE)] for i, n in enumerate(names)}


# --------------------------------------------------------------------------- plotly figures
def _fig_json(fig) -> dict:
    import plotly.io as pio

    return json.loads(pio.to_json(fig, validate=False))


def _accuracy_figure(acc: pd.DataFrame, colours: Mapping[str, str]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = [g for g in ("top1", "top5") if any(f"{s}_{g}" in acc.columns for s in ("train", "test"))]
    if not groups:
        raise ConceptEvoError(f"ReportData.accuracy has none of the columns {list(_ACC_COLS)}")
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=[g.replace("top", "top-") for g in groups])
    for run, df in acc.groupby("run", sort=False):
        df = df.sort_values("epoch")
        colour = colours.get(str(run), "#444")
        for gi, g in enumerate(groups, start=1):
            for split, dash in (("test", "solid"), ("train", "dash")):
                col = f"{split}_{g}"
                if col not in df.columns:
                    continue
                fig.add_trace(go.Scatter(
                    x=df["epoch"].to_numpy(), y=df[col].to_numpy(dtype=float), mode="lines+markers",
                    name=f"{run} {split}", legendgroup=str(run), line=dict(color=colour, dash=dash),
                    marker=dict(size=5), showlegend=gi == 1,
                    hovertemplate=f"{run} {split} {g}: %{{y:.4g}} at epoch %{{x}}<extra></extra>",
                ), row=1, col=gi)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="accuracy", col=1)
    fig.update_layout(template="plotly_white", height=360, margin=dict(l=60, r=20, t=40, b=50))
    return fig


def _diagnostics_figure(diag: pd.DataFrame, colours: Mapping[str, str], wanted: Sequence[str] | None):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = _diag_metrics(diag, wanted)
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[_metric_title(m) for m in metrics])
    for run, df in diag.groupby("run", sort=False):
        df = df.sort_values("epoch")
        for i, m in enumerate(metrics):
            fig.add_trace(go.Scatter(
                x=df["epoch"].to_numpy(), y=df[m].to_numpy(dtype=float), mode="lines+markers", name=str(run),
                legendgroup=str(run), showlegend=i == 0, line=dict(color=colours.get(str(run), "#444")),
                hovertemplate=f"{run} {m}: %{{y:.4g}} at epoch %{{x}}<extra></extra>",
            ), row=i // ncols + 1, col=i % ncols + 1)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(template="plotly_white", height=340 * nrows, margin=dict(l=60, r=20, t=40, b=50))
    return fig


_PREFERRED_DIAGNOSTICS = ("diversity", "movement", "movement_2d", "movement_per_gain")


def _diag_metrics(diag: pd.DataFrame, wanted: Sequence[str] | None = None) -> list[str]:
    """The charted columns: ``wanted``; else the known diagnostics present; else every numeric column."""
    if wanted is not None:
        missing = [c for c in wanted if c not in diag.columns]
        if missing:
            raise ConceptEvoError(f"ReportData.diagnostic_metrics names column(s) {missing} that "
                                  f"ReportData.diagnostics lacks; it has {list(diag.columns)}")
        return list(wanted)
    metrics = [c for c in _PREFERRED_DIAGNOSTICS if c in diag.columns]
    if "movement" in metrics and "movement_2d" in metrics:  # the d-dim movement is the paper's speed
        metrics.remove("movement_2d")
    metrics = metrics or [c for c in diag.columns
                          if c not in ("run", "epoch") and pd.api.types.is_numeric_dtype(diag[c])]
    if not metrics:
        raise ConceptEvoError(
            f"ReportData.diagnostics has no numeric column besides run/epoch: {list(diag.columns)}"
        )
    return metrics


def _metric_title(m: str) -> str:
    return {"diversity": "concept diversity (differential entropy)",
            "movement": "evolution speed (mean movement)",
            "movement_2d": "evolution speed in the 2-D map",
            "movement_per_gain": "movement per accuracy gain (low: overfitting)"}.get(m, m.replace("_", " "))


def _reversion_groups(rev: pd.DataFrame) -> tuple[list, list, list]:
    bins = list(pd.unique(rev["bin"].astype(str)))
    metrics = list(pd.unique(rev["metric"].astype(str))) if "metric" in rev.columns else ["accuracy change"]
    models = list(pd.unique(rev["model"].astype(str))) if "model" in rev.columns else [""]
    return bins, metrics, models


def _reversion_figure(rev: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    bins, metrics, models = _reversion_groups(rev)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models if models != [""] else None,
                        shared_yaxes=True)
    rev = rev.assign(bin=rev["bin"].astype(str))
    for mi, model in enumerate(models, start=1):
        sub = rev if model == "" else rev[rev["model"].astype(str) == model]
        for k, metric in enumerate(metrics):
            part = sub if "metric" not in sub.columns else sub[sub["metric"].astype(str) == metric]
            part = part.groupby("bin", sort=False).mean(numeric_only=True).reindex(bins)
            err = None
            if "std" in part.columns:
                err = dict(type="data", array=part["std"].to_numpy(dtype=float), visible=True)
            hatch = ["/" if b.lower().startswith("random") else "" for b in bins]
            fig.add_trace(go.Bar(
                x=bins, y=part["delta"].to_numpy(dtype=float), name=metric, legendgroup=metric,
                showlegend=mi == 1,
                marker=dict(color=_QUALITATIVE[k % len(_QUALITATIVE)], pattern=dict(shape=hatch)),
                error_y=err, hovertemplate=f"{metric}, bin %{{x}}: %{{y:.4g}}<extra></extra>",
            ), row=1, col=mi)
    fig.update_yaxes(title_text="accuracy change after reverting", col=1)
    fig.update_xaxes(title_text="importance bin (percentile; 0-25 = most important)")
    fig.update_layout(template="plotly_white", barmode="group", height=380,
                      margin=dict(l=70, r=20, t=40, b=60))
    return fig


def _map_layout(models: Sequence[str], xr: tuple[float, float], yr: tuple[float, float]) -> tuple[dict, int]:
    from plotly.subplots import make_subplots

    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=list(models),
                        horizontal_spacing=0.02, vertical_spacing=0.08 if nrows > 1 else 0.0)
    fig.update_xaxes(range=list(xr), showticklabels=False, showgrid=False, zeroline=False,
                     showline=True, linecolor="#ccc", mirror=True)
    fig.update_yaxes(range=list(yr), showticklabels=False, showgrid=False, zeroline=False,
                     showline=True, linecolor="#ccc", mirror=True)
    # zoom / pan one panel and all follow (the first axis is the anchor, it must not match itself)
    fig.update_xaxes(matches="x", selector=lambda ax: ax.plotly_name != "xaxis")
    fig.update_yaxes(matches="y", selector=lambda ax: ax.plotly_name != "yaxis")
    for extra in range(len(models) + 1, nrows * ncols + 1):  # empty cells of the last row
        fig.layout[f"xaxis{extra}"].visible = False
        fig.layout[f"yaxis{extra}"].visible = False
    fig.update_layout(template="plotly_white", height=430 * nrows, margin=dict(l=10, r=10, t=40, b=10),
                      hovermode="closest", uirevision="map", legend=dict(itemsizing="constant"),
                      dragmode="pan")
    return _fig_json(fig)["layout"], nrows


# --------------------------------------------------------------------------- payload
#: The map frames the bulk of the points: these percentiles of every run and epoch together (one frame
#: for all panels, so they stay comparable), widened by ``_FRAME_MARGIN`` of their span on each side.
#: Points beyond the frame are drawn pinned at its edge with a triangle pointing their way; the
#: "show all points" button zooms out to every point.
_FRAME_PERCENTILES = (1.0, 99.0)
_FRAME_MARGIN = 0.10


def _frame(v: np.ndarray, full: list[float]) -> list[float]:
    """Axis range around the central percentiles of ``v`` (finite), never wider than ``full``."""
    lo, hi = (float(q) for q in np.percentile(v, _FRAME_PERCENTILES))
    span = hi - lo
    if span <= 0:  # (nearly) all points on one value: nothing to frame, show everything
        return list(full)
    return [max(lo - _FRAME_MARGIN * span, full[0]), min(hi + _FRAME_MARGIN * span, full[1])]


def checked_points(data: ReportData) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The points table checked (columns, not empty) with a fresh index, the models in order of
    appearance, and the layers in ``data.layer_order`` (then any others as found). Shared by the
    one-file report and the folder report."""
    pts = data.points
    _require(pts, _POINT_COLS, "points")
    if len(pts) == 0:
        raise ConceptEvoError("ReportData.points is empty: nothing to plot")
    pts = pts.reset_index(drop=True)
    models = [str(m) for m in pd.unique(pts["model"].astype(str))]
    found_layers = [str(layer) for layer in pd.unique(pts["layer"].astype(str))]
    if data.layer_order is not None:
        order = [str(layer) for layer in data.layer_order]
        layers = [layer for layer in order if layer in set(found_layers)]
        layers += [layer for layer in found_layers if layer not in set(order)]
    else:
        layers = found_layers
    return pts, models, layers


def _point_payload(data: ReportData, images: _ImageTable, patches: dict, limit: int | None) -> dict:
    pts, models, layers = checked_points(data)
    epochs = sorted(int(e) for e in pd.unique(pts["epoch"]))
    keys = [_key(*row) for row in zip(pts["model"], pts["epoch"], pts["layer"], pts["channel"])]
    index = {}
    for i, k in enumerate(keys):
        if k in index:
            raise ConceptEvoError(f"ReportData.points has neuron {_label(k)} twice (rows {index[k]} and {i})")
        index[k] = i

    x = pts["x"].to_numpy(dtype=np.float64)
    y = pts["y"].to_numpy(dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        raise ConceptEvoError("ReportData.points: no row has finite x and y")
    xr = (float(x[finite].min()), float(x[finite].max()))
    yr = (float(y[finite].min()), float(y[finite].max()))
    extent = max(xr[1] - xr[0], yr[1] - yr[0], 1e-12)
    decimals = max(0, math.ceil(math.log10(5000 / extent)))
    pad_x = 0.04 * max(xr[1] - xr[0], extent * 0.1)
    pad_y = 0.04 * max(yr[1] - yr[0], extent * 0.1)
    range_all = {"x": [xr[0] - pad_x, xr[1] + pad_x], "y": [yr[0] - pad_y, yr[1] + pad_y]}
    frame = {"x": _frame(x[finite], range_all["x"]), "y": _frame(y[finite], range_all["y"])}

    m_idx = {m: i for i, m in enumerate(models)}
    l_idx = {layer: i for i, layer in enumerate(layers)}
    payload = {
        "models": models, "epochs": epochs, "layers": layers,
        "m": [m_idx[k[0]] for k in keys], "e": [k[1] for k in keys], "l": [l_idx[k[2]] for k in keys],
        "c": [k[3] for k in keys],
        "x": _finite_or_none(x, decimals), "y": _finite_or_none(y, decimals),
        "range": frame, "rangeAll": range_all,
    }
    colours = [{"name": "layer", "kind": "cat", "codes": payload["l"], "labels": layers,
                "colors": _sequential(len(layers))}]
    for col in pts.columns:
        if col in _POINT_COLS:
            continue
        s = pts[col]
        numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
        if numeric and (pd.api.types.is_float_dtype(s) or s.nunique() > 20):
            colours.append({"name": str(col), "kind": "num", "values": _finite_or_none(s.to_numpy(float), 4)})
            continue
        cat = pd.Categorical(s.astype("object").where(s.notna(), None))
        labels = [str(v) for v in cat.categories]
        colours.append({"name": str(col), "kind": "cat", "codes": cat.codes.astype(int).tolist(),
                        "labels": labels,
                        "colors": [_QUALITATIVE[i % len(_QUALITATIVE)] for i in range(len(labels))]})
    payload["color"] = colours
    payload["patches"] = [images.refs(patches.get(k), limit) for k in keys]

    nbs = _normalise_neighbours(data.neighbours)
    unknown = [k for k in nbs if k not in index]
    if unknown:
        warnings.warn(f"ReportData.neighbours has {len(unknown)} neuron(s) not in points (e.g. "
                      f"{_label(unknown[0])}); they are not shown", stacklevel=3)
    nb_out: list[list] = [[] for _ in keys]
    outside: dict[str, int] = {}
    for k, lst in nbs.items():
        i = index.get(k)
        if i is None:
            continue
        for nk, d in lst:
            j = index.get(nk)
            if j is None:  # a neighbour the map does not plot: shown as text with its patches if any
                lab = _label(nk)
                if lab not in outside:
                    outside[lab] = len(outside)
                j = -1 - outside[lab]
                if nk in patches:
                    payload.setdefault("outsidePatches", {})[str(-1 - j)] = images.refs(patches[nk], limit)
            nb_out[i].append([j, _sig(d)])
    payload["neighbours"] = nb_out
    payload["outside"] = list(outside)
    return payload


def _evolution_payload(evo: pd.DataFrame, images: _ImageTable, patches: dict, limit: int | None,
                       max_rows: int) -> dict:
    _require(evo, _EVO_COLS, "evolutions")
    classes = [str(c) for c in pd.unique(evo["class"].astype(str))]
    rows: dict[str, list] = {}
    for cls, df in evo.assign(_cls=evo["class"].astype(str)).groupby("_cls", sort=False):
        df = df.sort_values("score", ascending=False, kind="stable").head(max_rows)
        out = []
        for r in df.itertuples(index=False):
            model, layer, ch, t, tp = str(r.model), str(r.layer), int(r.channel), int(r.t), int(r.t_prime)
            out.append({
                "model": model, "layer": layer, "channel": ch, "t": t, "tp": tp,
                "score": _sig(float(r.score)),
                "pt": images.refs(patches.get((model, t, layer, ch)), limit),
                "ptp": images.refs(patches.get((model, tp, layer, ch)), limit),
            })
        rows[cls] = out
    return {"classes": classes, "rows": rows}


def _payload(data: ReportData, max_patches: int | None, max_evolutions: int) -> dict:
    images = _ImageTable()
    patches = _normalise_patches(data.patches)
    payload: dict[str, Any] = {"title": data.title}
    payload["points"] = _point_payload(data, images, patches, max_patches)
    runs = list(payload["points"]["models"])
    for table in (data.accuracy, data.diagnostics):
        if table is not None and "run" in table.columns:
            runs += [str(r) for r in pd.unique(table["run"].astype(str)) if str(r) not in runs]
    colours = _run_colours(runs)
    payload["runColors"] = colours
    payload["mapLayout"], _ = _map_layout(payload["points"]["models"], tuple(payload["points"]["range"]["x"]),
                                          tuple(payload["points"]["range"]["y"]))
    figs = {}
    if data.accuracy is not None:
        figs["accuracy"] = _fig_json(_accuracy_figure(data.accuracy, colours))
    if data.diagnostics is not None:
        figs["diagnostics"] = _fig_json(
            _diagnostics_figure(data.diagnostics, colours, data.diagnostic_metrics))
    if data.reversion is not None:
        _require(data.reversion, ("bin", "delta"), "reversion")
        figs["reversion"] = _fig_json(_reversion_figure(data.reversion))
    payload["figs"] = figs
    verdicts = []
    for head, text in (data.verdicts or {}).items():
        for t in [text] if isinstance(text, str) else list(text):
            verdicts.append([str(head), str(t)])
    payload["verdicts"] = verdicts
    if data.evolutions is not None and len(data.evolutions):
        payload["evolutions"] = _evolution_payload(data.evolutions, images, patches, max_patches,
                                                   max_evolutions)
    payload["images"] = images.items
    payload["imageMime"] = images.mime
    payload["mimes"] = images.mimes
    return payload


# --------------------------------------------------------------------------- HTML
def _asset(name: str) -> str:
    """A file of ``conceptevo/report_assets`` (the report's JavaScript and CSS, shipped as package data)."""
    from importlib.resources import files

    text = files("conceptevo").joinpath("report_assets", name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():  # would end the inlined block early
        raise ConceptEvoError(f"report asset {name} contains a closing </script> or </style> tag")
    return text


def _script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>`` or ``<!--`` can end the block early.

    ``<`` occurs in JSON only inside strings, where ``\\u003c`` means the same character.
    """
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c")


def _html(payload: dict, data: ReportData, plotly_js: str) -> str:
    esc = html.escape
    facts = ""
    if data.facts:
        rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>"
                       for k, v in data.facts.items())
        facts = f'<table class="facts">{rows}</table>'
    figs = payload["figs"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(data.title)}</title>", f"<style>{_asset('report.css')}</style>", "</head><body>",
        f"<header><h1>{esc(data.title)}</h1>{facts}</header>",
        '<section id="map-section"><h2>Unified concept map</h2>',
        '<p class="note">Each panel is one model; all share one space, so nearby neurons detect similar '
        "concepts across models and epochs. Hover a neuron for its example patches; click to pin it.</p>",
        '<div class="controls"><span><button id="play" type="button">▶ play</button> '
        '<input id="epoch-slider" type="range" min="0" max="0" step="1" value="0" aria-label="epoch"> '
        '<span id="epoch-label"></span></span>'
        '<label>colour by <select id="color-by"></select></label>'
        '<label><input id="ghost" type="checkbox" checked> all epochs in grey</label>'
        '<button id="zoom-all" type="button" aria-pressed="false">show all points</button>'
        '<span id="frame-note" class="note"></span></div>',
        '<div class="map-row"><div id="map"></div><aside id="side-panel">'
        '<div id="sp-title">Hover or click a neuron</div><div id="sp-meta"></div><div id="sp-pin"></div>'
        '<div id="sp-patches" class="patches"></div><h3>The same neuron at each epoch</h3>'
        '<div id="sp-epochs"></div><h3>Nearest neighbours (all models and epochs)</h3>'
        '<ol id="sp-neighbours"></ol></aside></div></section>',
    ]
    if "accuracy" in figs:
        parts.append('<section><h2>Accuracy</h2><p class="note">solid: test, dashed: train</p>'
                     '<div id="fig-accuracy"></div></section>')
    if "diagnostics" in figs or payload["verdicts"]:
        parts.append('<section><h2>Training diagnostics</h2>'
                     '<p class="note">Concept diversity falls when concepts are destroyed (e.g. a too high '
                     "learning rate); a slow evolution speed while training accuracy rises hints at "
                     "overfitting.</p>")
        if "diagnostics" in figs:
            parts.append('<div id="fig-diagnostics"></div>')
        if payload["verdicts"]:
            parts.append('<ul id="verdicts" class="verdicts"></ul>')
        parts.append("</section>")
    if "evolutions" in payload:
        parts.append('<section><h2>Important concept evolutions</h2>'
                     '<p class="note">Score = fraction of the class\'s images whose prediction the evolution '
                     "helps (Eq. 4).</p>"
                     '<label>class <select id="evo-class"></select></label>'
                     '<table class="evo"><thead><tr><th>model</th><th>neuron</th><th>importance</th>'
                     "<th>before</th><th></th><th>after</th></tr></thead>"
                     '<tbody id="evo-body"></tbody></table></section>')
    if "reversion" in figs:
        parts.append('<section><h2>Reversion check</h2><p class="note">Reverting the evolutions of more '
                     "important neurons should lower accuracy more; the random bin is the baseline.</p>"
                     '<div id="fig-reversion"></div></section>')
    if data.tracing is not None or data.tracing_contributions is not None or data.tracing_images:
        from .tracing import report_section

        parts.append(report_section(data.tracing, contributions=data.tracing_contributions,
                                    images=data.tracing_images))
    parts += [str(x) for x in (data.extra_sections or ())]
    parts += [
        f"<script>{plotly_js}</script>",
        f'<script type="application/json" id="ce-data">{_script_json(payload)}</script>',
        f"<script>{_asset('report.js')}</script>", "</body></html>",
    ]
    return "\n".join(parts)


def build_report(
    out_html: str | Path,
    data: ReportData,
    *,
    png_dir: str | Path | None = None,
    max_patches: int | None = None,
    max_evolutions: int = 10,
) -> Path:
    """Write the self-contained HTML report of ``data`` to ``out_html`` (atomically) and return its path.

    Above :data:`conceptevo.report_folder.FOLDER_THRESHOLD` points the report is a folder instead
    (``out_html`` without ``.html``; see :mod:`conceptevo.report_folder`) and its ``index.html`` is returned.

    ``max_patches`` caps the patches shown per neuron, ``max_evolutions`` the rows per
    class. With ``png_dir``, static PNG figures are written there too
    (:func:`write_static_figures`).
    """
    from plotly.offline import get_plotlyjs

    from .report_folder import build_report_folder, report_format

    fmt = report_format(len(data.points) if isinstance(data, ReportData) else 0)
    if fmt["mode"] == "folder":  # large runs: a folder served by `conceptevo serve` (see report_folder)
        out = Path(out_html)
        return build_report_folder(out.with_suffix("") if out.suffix == ".html" else out, data, png_dir=png_dir,
                                   max_patches=max_patches, max_evolutions=max_evolutions)
    if isinstance(data, ReportData):  # the header names the size switch
        from .report_folder import threshold_note

        data = dataclasses.replace(data, facts={**(data.facts or {}), "report format": threshold_note(fmt)})
    data = _checked(data)
    payload = _payload(data, max_patches, max_evolutions)
    text = _html(payload, data, get_plotlyjs())
    out = Path(out_html)
    encoded = text.encode("utf-8")
    atomic_write(out, lambda tmp: tmp.write_bytes(encoded))
    if len(encoded) > _SIZE_WARN_BYTES:
        warnings.warn(f"report {out} is {len(encoded) / 2**20:.0f} MiB; pass max_patches or fewer neurons "
                      "to make it lighter", stacklevel=2)
    if png_dir is not None:
        write_static_figures(png_dir, data)
    return out


# --------------------------------------------------------------------------- static figures
def _save_fig(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))


def write_static_figures(png_dir: str | Path, data: ReportData, max_epochs: int = 8) -> dict[str, Path]:
    """Matplotlib PNGs of the map (models x epochs grid, at most ``max_epochs`` epochs evenly spread)
    and of the accuracy, diagnostics and reversion charts that ``data`` has. Returns name -> path."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    data = _checked(data)
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    pts = data.points
    _require(pts, _POINT_COLS, "points")
    models = [str(m) for m in pd.unique(pts["model"].astype(str))]
    epochs = sorted(int(e) for e in pd.unique(pts["epoch"]))
    if len(epochs) > max_epochs:
        epochs = [epochs[round(i)] for i in np.linspace(0, len(epochs) - 1, max_epochs)]
    layers = [str(layer) for layer in pd.unique(pts["layer"].astype(str))]
    if data.layer_order is not None:
        layers = [str(v) for v in data.layer_order if str(v) in set(layers)] + \
                 [v for v in layers if v not in {str(u) for u in data.layer_order}]
    lcol = dict(zip(layers, _sequential(len(layers))))
    x, y = pts["x"].to_numpy(float), pts["y"].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    xl, yl = (x[ok].min(), x[ok].max()), (y[ok].min(), y[ok].max())
    pad = 0.03 * max(xl[1] - xl[0], yl[1] - yl[0], 1e-12)  # keep edge points whole
    xl, yl = (xl[0] - pad, xl[1] + pad), (yl[0] - pad, yl[1] + pad)
    # the same frame as the HTML map: the bulk of the points; the rest pinned at its edge as triangles
    xl, yl = _frame(x[ok], list(xl)), _frame(y[ok], list(yl))
    beyond = ok & ((x < xl[0]) | (x > xl[1]) | (y < yl[0]) | (y > yl[1]))
    x = np.clip(x, xl[0] + 0.015 * (xl[1] - xl[0]), xl[1] - 0.015 * (xl[1] - xl[0]))
    y = np.clip(y, yl[0] + 0.015 * (yl[1] - yl[0]), yl[1] - 0.015 * (yl[1] - yl[0]))
    fig = Figure(figsize=(2.2 * len(epochs) + 1.6, 2.2 * len(models) + 0.4))
    axs = fig.subplots(len(models), len(epochs), squeeze=False)
    mstr = pts["model"].astype(str).to_numpy()
    lstr = pts["layer"].astype(str).to_numpy()
    estr = pts["epoch"].to_numpy()
    colours = np.array([_rgb(lcol[v]) for v in lstr]) if len(lstr) else np.zeros((0, 3))
    for r, m in enumerate(models):
        for c, e in enumerate(epochs):
            ax = axs[r, c]
            sel = (mstr == m) & (estr == e) & ok
            ax.scatter(x[(mstr == m) & ok], y[(mstr == m) & ok], s=2, c="#e6e6e6", linewidths=0)
            ax.scatter(x[sel & ~beyond], y[sel & ~beyond], s=5, c=colours[sel & ~beyond], linewidths=0)
            if (sel & beyond).any():
                ax.scatter(x[sel & beyond], y[sel & beyond], s=14, c=colours[sel & beyond], marker="^",
                           linewidths=0.4, edgecolors="black")
            ax.set_xlim(*xl)
            ax.set_ylim(*yl)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"epoch {e}", fontsize=9)
            if c == 0:
                ax.set_ylabel(m, fontsize=9)
    handles = [Line2D([], [], marker="o", ls="", color=_rgb(lcol[v]), label=v) for v in layers]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False, title="layer",
               title_fontsize=8)
    fig.subplots_adjust(right=1 - 1.4 / fig.get_figwidth(), wspace=0.04, hspace=0.08)
    out["map"] = _save_fig(fig, png_dir / "map.png")

    runs = []
    for table in (data.accuracy, data.diagnostics):
        if table is not None:
            runs += [str(r) for r in pd.unique(table["run"].astype(str)) if str(r) not in runs]
    rc = _run_colours(models + [r for r in runs if r not in models])
    if data.accuracy is not None:
        acc = data.accuracy
        groups = [g for g in ("top1", "top5") if any(f"{s}_{g}" in acc.columns for s in ("train", "test"))]
        fig = Figure(figsize=(4.2 * len(groups), 3.2))
        axs = fig.subplots(1, len(groups), squeeze=False)[0]
        for ax, g in zip(axs, groups):
            for run, df in acc.groupby("run", sort=False):
                df = df.sort_values("epoch")
                for split, ls in (("test", "-"), ("train", "--")):
                    if f"{split}_{g}" in df.columns:
                        ax.plot(df["epoch"], df[f"{split}_{g}"], ls=ls, marker="o", ms=3,
                                color=rc.get(str(run), "#444"), label=f"{run} {split}")
            ax.set_title(g.replace("top", "top-"))
            ax.set_xlabel("epoch")
        axs[0].set_ylabel("accuracy")
        axs[0].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        out["accuracy"] = _save_fig(fig, png_dir / "accuracy.png")
    if data.diagnostics is not None:
        diag = data.diagnostics
        metrics = _diag_metrics(diag, data.diagnostic_metrics)
        fig = Figure(figsize=(4.2 * len(metrics), 3.2))
        axs = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, m in zip(axs, metrics):
            for run, df in diag.groupby("run", sort=False):
                df = df.sort_values("epoch")
                ax.plot(df["epoch"], df[m], marker="o", ms=3, color=rc.get(str(run), "#444"), label=str(run))
            ax.set_title(_metric_title(m), fontsize=10)
            ax.set_xlabel("epoch")
        axs[0].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        out["diagnostics"] = _save_fig(fig, png_dir / "diagnostics.png")
    if data.reversion is not None:
        rev = data.reversion
        _require(rev, ("bin", "delta"), "reversion")
        bins, metrics, rmodels = _reversion_groups(rev)
        rev = rev.assign(bin=rev["bin"].astype(str))
        fig = Figure(figsize=(max(4.0, 1.1 * len(bins) * max(1, len(metrics)) ** 0.5) * len(rmodels), 3.4))
        axs = fig.subplots(1, len(rmodels), squeeze=False, sharey=True)[0]
        width = 0.8 / len(metrics)
        for ax, model in zip(axs, rmodels):
            sub = rev if model == "" else rev[rev["model"].astype(str) == model]
            for k, metric in enumerate(metrics):
                part = sub if "metric" not in sub.columns else sub[sub["metric"].astype(str) == metric]
                part = part.groupby("bin", sort=False).mean(numeric_only=True).reindex(bins)
                pos = np.arange(len(bins)) + (k - (len(metrics) - 1) / 2) * width
                bars = ax.bar(pos, part["delta"].to_numpy(float), width,
                              yerr=part["std"].to_numpy(float) if "std" in part.columns else None,
                              color=_QUALITATIVE[k % len(_QUALITATIVE)], label=metric)
                for b, name in zip(bars, bins):
                    if name.lower().startswith("random"):
                        b.set_hatch("//")
            ax.axhline(0, color="#999", lw=0.8)
            ax.set_xticks(np.arange(len(bins)), bins, fontsize=8)
            if model:
                ax.set_title(model)
        axs[0].set_ylabel("accuracy change")
        axs[0].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        out["reversion"] = _save_fig(fig, png_dir / "reversion.png")
    return out


def _rgb(colour: str) -> tuple[float, float, float]:
    """'#rrggbb' or 'rgb(r, g, b)' -> floats in [0, 1]."""
    colour = colour.strip()
    if colour.startswith("#"):
        return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]
    nums = colour[colour.index("(") + 1:colour.index(")")].split(",")
    return tuple(float(v) / 255 for v in nums[:3])  # type: ignore[return-value]

"""Training diagnostics from concept evolution (paper Section 4.5).

Two measurements over the neuron embeddings of several training runs, each compared
with a chosen *reference* run (the well-trained one):

**Concept diversity** -- the differential entropy of each dimension of the 2-D
embedding (the UMAP map), averaged over the two dimensions (the paper's footnote 5:
the 2-D map, because estimates in the high-dimensional space diverge). The estimator
is ``scipy.stats.differential_entropy`` with ``method="ebrahimi"`` by default: the
m-spacing estimator of Vasicek (1976) with Ebrahimi, Pflughoeft & Soofi's (1994)
boundary correction, window ``m = floor(sqrt(n) + 0.5)``. One method for every
sample size keeps runs comparable (scipy's ``"auto"`` switches method with ``n``).
m-spacing estimates are shift invariant and scale equivariant (``H(a X) = H(X) +
ln a``), so ``exp(H)`` is an effective *spread*; a sample whose points coincide has
zero spacings and entropy ``-inf`` (complete collapse). Diversity values of different
runs are comparable only when all runs share one 2-D map (the unified space's UMAP is
fit on all models and epochs at once).

**Evolution speed** -- the mean Euclidean distance each neuron's embedding moves,
matching neurons by ``(layer, channel)``:

* ``movement``: between consecutive saved epochs, in the unified d-dim space
  (column ``vector``) and, as ``movement_2d``, in the 2-D map;
* the paper's measure for the overfitting verdict: the displacement between the
  saved epochs whose training top-1 accuracy is closest to the milestones
  0.25 -> 0.5 -> 0.75, divided by the accuracy gained (``movement_per_gain``). The
  verdict uses the **unified d-dim space** (``space="vector"``): UMAP distorts
  distances non-uniformly, while all runs are projected into the same d-dim space
  (same image vectors), so its distances are comparable across runs. It falls back
  to the 2-D map only when no ``vector`` column is given.

Dead neurons (NaN vector / position: no valid stimulus) are left out of both
measurements; ``n_dead`` counts them per epoch (a burst of dead neurons is itself a
sign of a collapsing run).

**Which diversity decides.** The paper's measure reads a UMAP map, and a UMAP fit moves with
the last bits of its input: on another CPU the same run can give another map, and the
verdict could flip. So the verdicts read, by default (``measure="knn"``), the
Kozachenko-Leonenko k-NN entropy of the unified d-dim embedding itself (:func:`knn_entropy`,
per dimension, so ``exp(H)`` is still an effective spread), which involves no layout; the
paper's 2-D measure stays in every table (``diversity``) and can decide instead
(``measure="map"``). Both come with a standard error by half-sampling over neurons.

Verdicts (thresholds are parameters of :func:`diagnose`; each comes from the paper's own
numbers, none is fitted to a run of this engine):

* ``diversity_collapses`` (too-high learning rate): the effective spread at the last
  saved epoch, ``exp(H_last - H_peak)``, is below ``collapse_fraction`` of the run's
  own peak (over epochs >= ``peak_from_epoch``, default 1: the untrained network of
  epoch 0 spreads its random filters' neurons widely, which is not learned diversity)
  -- or ``exp(H_last - H_ref_last)`` below it relative to the reference run's last
  epoch -- *while* training accuracy falls: ``max(train_top1) - train_top1(last)
  >= accuracy_drop``. ``collapse_fraction=0.75`` is the mildest collapse the paper
  reports (ConvNeXt under a too-high learning rate: 1.64 -> 1.34 nats, a spread of 0.74;
  its VGG16 falls much further, 2.03 -> -1.52); ``accuracy_drop=0.05`` asks for a fall
  well beyond the epoch-to-epoch noise of a training-accuracy sample of 1,000 images.
* ``slow_evolution`` (overfitting): training accuracy climbs (total gain over the
  milestone intervals >= ``min_gain``, and the run ends near its best accuracy: a run
  whose accuracy fell by ``accuracy_drop`` or more gets no speed verdict) but the
  movement per unit of accuracy gain is below ``slow_ratio`` times the reference run's
  over the same milestone intervals. ``slow_ratio=0.85``: the paper's overfitted VGG16
  moves 1.11 vs 1.34 and 0.98 vs 1.30 (ratios 0.83 and 0.75), so 0.85 sits just above the
  paper's milder case.

**Margins.** Each verdict reports how far its statistic lies from its threshold, on the
verdict's side when positive: ``collapse_margin = ln(collapse_fraction) - (H_last - H_peak)``
(nats per dimension; the larger of the own-peak and the reference comparisons) and
``speed_margin = slow_ratio - speed_ratio``, each with a standard error
(``*_margin_se``: half-sampling over neurons for the entropies, a bootstrap over neurons
for the movement ratio). ``benchmarks/bench_fidelity.py`` measures the margins over
several seeds; a verdict whose margin is many standard errors and many seeds' spread away
from zero cannot be flipped by a different floating-point path.

Inputs: a DataFrame of embeddings with columns ``model, epoch, layer, channel, x, y``
and optionally ``vector`` (one array per row), as the unified space exports, where
``model`` names the run; and per-run accuracy logs (``log.parquet`` of a training run:
``epoch, train_top1, ...``) as DataFrames, parquet paths or run directories.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import DataError, EmbeddingError, InputError

__all__ = [
    "Diagnosis",
    "entropy_1d",
    "knn_entropy",
    "entropy_floor",
    "concept_diversity",
    "neuron_movement",
    "milestone_speed",
    "load_log",
    "epoch_table",
    "diagnose",
]

KEY = ["layer", "channel"]


# ------------------------------------------------------------------------- entropy
def entropy_1d(values, method: str = "ebrahimi", window_length: int | None = None) -> float:
    """Differential entropy (nats) of a 1-D sample by ``scipy.stats.differential_entropy``.

    ``method``: ``"ebrahimi"`` (default), ``"vasicek"``, ``"van es"``, ``"correa"``. Fewer
    than 5 values (or a window of at least half the sample) give NaN: no spacing estimate.
    Coinciding values give ``-inf``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        raise EmbeddingError("entropy of a sample with NaN or infinite values")
    m = window_length if window_length is not None else math.floor(math.sqrt(v.size) + 0.5)
    if v.size < 5 or not 1 <= m < v.size / 2:
        return float("nan")
    with np.errstate(divide="ignore"):  # zero spacings -> log(0) = -inf is the intended limit
        h = stats.differential_entropy(v, method=method, window_length=window_length)
    return float(h)


def _entropy_rows(samples: np.ndarray, method: str) -> np.ndarray:
    """:func:`entropy_1d` of each row of ``samples`` (rows of equal length) in one SciPy call."""
    v = np.asarray(samples, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise EmbeddingError("entropy of a sample with NaN or infinite values")
    m = math.floor(math.sqrt(v.shape[1]) + 0.5)
    if v.shape[1] < 5 or not 1 <= m < v.shape[1] / 2:
        return np.full(len(v), np.nan)
    with np.errstate(divide="ignore"):
        return np.asarray(stats.differential_entropy(v, method=method, axis=1), dtype=np.float64)


def knn_entropy(points, k: int = 3, floor: float = 0.0) -> float:
    """Kozachenko-Leonenko k-NN differential entropy of a d-dim sample, **per dimension** (nats).

    ``H = psi(n) - psi(k) + ln V_d + (d / n) sum_i ln eps_i`` with ``eps_i`` the Euclidean
    distance from point i to its k-th nearest neighbour and ``V_d`` the volume of the unit
    d-ball (Kozachenko & Leonenko 1987; Kraskov, Stoegbauer & Grassberger 2004, eq. 20);
    returned divided by ``d`` so that, like the paper's per-axis measure, ``exp(H)`` is an
    effective spread per dimension and ``H(aX) = H(X) + ln a`` exactly. Distances below
    ``floor`` are raised to it (coinciding neurons: pass one floor for every run and epoch
    of a space so that they stay comparable); with ``floor=0`` coinciding points give
    ``-inf``. Fewer than ``k + 2`` points give NaN.
    """
    from scipy.special import digamma, gammaln

    x = np.asarray(points, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if not np.all(np.isfinite(x)):
        raise EmbeddingError("k-NN entropy of a sample with NaN or infinite values")
    n, d = x.shape
    if n < k + 2 or d == 0:
        return float("nan")
    eps = np.maximum(_knn_eps(x, k), floor)
    with np.errstate(divide="ignore"):
        log_eps = np.log(eps)
    log_vd = (d / 2) * math.log(math.pi) - gammaln(d / 2 + 1)
    h = digamma(n) - digamma(k) + log_vd + d * float(np.mean(log_eps))
    return float(h / d)


def _knn_eps(x: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point (k-d tree; empty when too few)."""
    from scipy.spatial import cKDTree

    if len(x) < k + 1:
        return np.zeros(0)
    dist, _ = cKDTree(x).query(x, k=k + 1)  # column 0 is the point itself
    return dist[:, k]


def _knn_entropy_with_error(x: np.ndarray, k: int, floor: float, rng: np.random.Generator,
                            repeats: int = 16) -> tuple[float, float]:
    """The k-NN entropy and its standard error by half-sampling over neurons.

    Half-samples without replacement (with replacement, duplicates would fake zero
    distances); the spread of a half-sample estimate is scaled by 1/sqrt(2) to the full
    sample (m-out-of-n bootstrap, variance ~ 1/m).
    """
    h = knn_entropy(x, k, floor)
    n = len(x)
    if not np.isfinite(h) or n < 2 * (k + 2):
        return h, float("nan")
    halves = [knn_entropy(x[rng.choice(n, n // 2, replace=False)], k, floor) for _ in range(repeats)]
    halves = np.asarray([v for v in halves if np.isfinite(v)])
    return h, float(np.std(halves, ddof=1) / math.sqrt(2)) if halves.size > 2 else float("nan")


def entropy_floor(emb: pd.DataFrame, fraction: float = 1e-3) -> float:
    """One distance floor for :func:`knn_entropy` over a whole space: ``fraction`` of the
    median nearest-neighbour distance of the alive rows (deterministic: every row)."""
    pts = _points(emb, "vector")
    pts = pts[~np.isnan(pts).any(axis=1)]
    if len(pts) < 2:
        return 0.0
    positive = _nn_distances(pts)
    positive = positive[positive > 0]
    return float(fraction * np.median(positive)) if positive.size else 0.0


def _nn_distances(pts: np.ndarray) -> np.ndarray:
    """Each row's distance to its nearest other row (float64).

    Rows that repeat another row exactly get 0. The others' nearest neighbour is found by an
    exact FAISS flat search in float32 (a k-d tree is slow in 30 dimensions) and its distance
    recomputed in float64, so only a near-tie (within float32 rounding) can pick another
    neighbour at the same distance to ~1e-7; without FAISS, a k-d tree."""
    n = len(pts)
    _, inverse, counts = np.unique(pts, axis=0, return_inverse=True, return_counts=True)
    repeated = counts[inverse.ravel()] > 1
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        from scipy.spatial import cKDTree

        return cKDTree(pts).query(pts, k=2)[0][:, 1]
    x = np.ascontiguousarray(pts, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, nb = index.search(x, min(3, n))
    rows = np.arange(n)
    j = np.where(nb[:, 0] == rows, nb[:, 1], nb[:, 0])
    if nb.shape[1] > 2:
        j = np.where(j == rows, nb[:, 2], j)
    dist = np.linalg.norm(pts - pts[j], axis=1)
    dist[repeated] = 0.0
    return dist


def _check_columns(emb: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in emb.columns]
    if missing:
        raise EmbeddingError(f"embedding table lacks column(s) {missing}; it has {list(emb.columns)}")


def concept_diversity(
    emb: pd.DataFrame, coords: Sequence[str] = ("x", "y"), method: str = "ebrahimi", *,
    knn: bool | None = None, knn_k: int = 3, floor: float | None = None, seed: int = 0,
    errors: bool = True, cache: dict | None = None,
) -> pd.DataFrame:
    """Diversity per (model, epoch), by two measures.

    * ``diversity``: the paper's -- mean over ``coords`` of the per-axis entropy of the 2-D map;
    * ``diversity_knn`` (with a ``vector`` column, or ``knn=True``): the k-NN entropy per
      dimension of the unified d-dim embedding (:func:`knn_entropy`), which does not depend
      on a UMAP fit; one distance ``floor`` (default :func:`entropy_floor`) for all rows.

    With ``errors``, ``*_se`` columns hold each value's standard error by half-sampling over
    neurons (seeded by ``seed``). Dead neurons (NaN coordinates, as the unified space marks
    neurons without a valid stimulus) are left out and counted in ``n_dead``; infinite values
    are an error. Returns columns ``model, epoch, diversity, entropy_<coord>..., n_neurons,
    n_dead`` (+ ``diversity_se, diversity_knn, diversity_knn_se``).

    ``cache``: a dict kept by the caller between calls (the live monitor, which diagnoses its
    growing run at every observation). A (model, epoch)'s k-NN values are reused when its
    vectors, ``knn_k``, ``seed`` and ``errors`` are unchanged and the floor clamps no distance
    in either call (every k-th-neighbour distance of the full sample is >= both floors; a
    half-sample's are larger still), so a reused value equals a recomputed one exactly.
    """
    _check_columns(emb, ["model", "epoch", *coords])
    if knn is None:
        knn = "vector" in emb.columns
    if knn:
        _check_columns(emb, ["vector"])
        if floor is None:
            floor = entropy_floor(emb)
    rows = []
    for (model, epoch), g in emb.groupby(["model", "epoch"], sort=True):
        pts = g[list(coords)].to_numpy(np.float64)
        if np.isinf(pts).any():
            raise EmbeddingError(f"model {model!r} epoch {epoch}: infinite {list(coords)} values")
        alive = ~np.isnan(pts).any(axis=1)
        ent = {f"entropy_{c}": entropy_1d(pts[alive, j], method=method) for j, c in enumerate(coords)}
        row = {"model": model, "epoch": epoch, "diversity": float(np.mean(list(ent.values()))), **ent,
               "n_neurons": int(alive.sum()), "n_dead": int((~alive).sum())}
        # one stream per (model, epoch), fixed by the seed: independent of the table's order
        rng = np.random.default_rng([int(seed), int(epoch), *map(ord, str(model))])
        if errors:
            a = pts[alive]
            n = len(a)
            if n >= 10:
                picks = np.stack([rng.choice(n, n // 2, replace=False) for _ in range(16)])
                # every half-sample of a coordinate in one vectorised call (same values as one by one)
                halves = np.mean([_entropy_rows(a[picks, j], method) for j in range(len(coords))], axis=0)
                halves = halves[np.isfinite(halves)]
                row["diversity_se"] = float(np.std(halves, ddof=1) / math.sqrt(2)) if halves.size > 2 else np.nan
            else:
                row["diversity_se"] = np.nan
        if knn:
            vec = _points(g, "vector")
            vec = vec[~np.isnan(vec).any(axis=1)]
            key = (str(model), int(epoch))
            fp = (hashlib.blake2b(vec.tobytes(), digest_size=16).hexdigest(), vec.shape, int(knn_k), int(seed),
                  bool(errors))
            hit = None if cache is None else cache.get(key)
            if hit is not None and hit["fp"] == fp and hit["min_eps"] >= max(floor, hit["floor"]):
                row.update(hit["values"])
            else:
                if errors:
                    h, se = _knn_entropy_with_error(vec, knn_k, floor, rng)
                    values = {"diversity_knn": h, "diversity_knn_se": se}
                else:
                    values = {"diversity_knn": knn_entropy(vec, knn_k, floor)}
                row.update(values)
                if cache is not None:
                    eps = _knn_eps(vec, knn_k)
                    cache[key] = {"fp": fp, "floor": float(floor), "values": values,
                                  "min_eps": float(eps.min()) if eps.size else -math.inf}
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ movement
def _points(g: pd.DataFrame, space: str) -> np.ndarray:
    """(rows, dim) float64 points; NaN rows (dead neurons) are kept as NaN."""
    if space == "vector":
        try:
            pts = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in g["vector"]])
        except ValueError as exc:
            raise EmbeddingError(f"the 'vector' column holds vectors of different lengths: {exc}") from None
    elif space == "xy":
        pts = g[["x", "y"]].to_numpy(np.float64)
    else:
        raise InputError(f"space must be 'vector' or 'xy', not {space!r}")
    if np.isinf(pts).any():
        raise EmbeddingError(f"infinite {space} embedding values")
    return pts


def _point_sets(emb: pd.DataFrame, space: str) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """``{(model, epoch): (neuron codes sorted, points in that order)}``; codes number (layer, channel).

    Dead neurons (NaN points) are dropped: they have no position to move from or to.
    """
    codes = emb.groupby(KEY, sort=False).ngroup().to_numpy()
    pts = _points(emb, space)
    alive = ~np.isnan(pts).any(axis=1)
    out = {}
    for key, idx in emb.groupby(["model", "epoch"], sort=True).indices.items():
        idx = idx[alive[idx]]
        c = codes[idx]
        order = np.argsort(c, kind="stable")
        c = c[order]
        if c.size > 1 and np.any(c[1:] == c[:-1]):
            dup = emb.iloc[idx[order][1:][c[1:] == c[:-1]]][KEY].head(3).to_dict("records")
            raise EmbeddingError(f"model {key[0]!r} epoch {key[1]}: neurons listed twice, e.g. {dup}")
        out[key] = (c, pts[idx[order]])
    return out


def _distances(sets: dict, model, e0, e1) -> np.ndarray:
    """Distance moved by each neuron present at both epochs."""
    c0, p0 = sets[(model, e0)]
    c1, p1 = sets[(model, e1)]
    _, a, b = np.intersect1d(c0, c1, assume_unique=True, return_indices=True)
    return np.linalg.norm(p1[b] - p0[a], axis=1)


def _displacement(sets: dict, model, e0, e1) -> tuple[float, float, int]:
    """Mean and median distance of the neurons present at both epochs, and their count."""
    d = _distances(sets, model, e0, e1)
    if d.size == 0:
        return float("nan"), float("nan"), 0
    return float(d.mean()), float(np.median(d)), int(d.size)


def neuron_movement(emb: pd.DataFrame, space: str = "vector") -> pd.DataFrame:
    """Movement between consecutive saved epochs of each model.

    Returns ``model, epoch_from, epoch_to, movement, movement_median, n_neurons`` (mean and
    median Euclidean distance over neurons present at both epochs).
    """
    _check_columns(emb, ["model", "epoch", *KEY] + (["vector"] if space == "vector" else ["x", "y"]))
    sets = _point_sets(emb, space)
    rows = []
    for model, g in emb.groupby("model", sort=True):
        epochs = sorted(g["epoch"].unique())
        for e0, e1 in zip(epochs[:-1], epochs[1:]):
            mean, med, n = _displacement(sets, model, e0, e1)
            rows.append({"model": model, "epoch_from": e0, "epoch_to": e1, "movement": mean,
                         "movement_median": med, "n_neurons": n})
    return pd.DataFrame(rows, columns=["model", "epoch_from", "epoch_to", "movement", "movement_median",
                                       "n_neurons"])


# --------------------------------------------------------------------------- logs
def load_log(obj) -> pd.DataFrame:
    """An accuracy log as a DataFrame: a DataFrame, a ``log.parquet`` path, or a run directory."""
    if isinstance(obj, pd.DataFrame):
        df = obj
        where = "the given log"
    else:
        p = Path(obj)
        if p.is_dir():
            p = p / "log.parquet"
        if not p.is_file():
            raise DataError(f"accuracy log not found: {p}")
        df = pd.read_parquet(p)
        where = str(p)
    missing = [c for c in ("epoch", "train_top1") if c not in df.columns]
    if missing:
        raise DataError(f"{where} lacks column(s) {missing}; it has {list(df.columns)}")
    return df.sort_values("epoch").drop_duplicates("epoch", keep="last").reset_index(drop=True)


def _logs(logs: Mapping | None) -> dict:
    return {k: load_log(v) for k, v in (logs or {}).items()}


def milestone_speed(
    emb: pd.DataFrame,
    logs: Mapping,
    milestones: Sequence[float] = (0.25, 0.5, 0.75),
    tolerance: float = 0.125,
    min_gain: float = 0.05,
    space: str = "vector",
) -> pd.DataFrame:
    """Displacement between milestone epochs, per unit of training-accuracy gain.

    For every model with a log: each milestone resolves to the saved epoch whose
    ``train_top1`` is closest to it (earliest on ties; unresolved when farther than
    ``tolerance``). Consecutive resolved milestones with increasing epochs and a gain of
    at least ``min_gain`` form an interval. When a model has no such interval, the whole
    climb (first saved epoch -> epoch of peak training accuracy) is used, labelled
    ``"start" -> "peak"``.

    Returns ``model, milestone_from, milestone_to, epoch_from, epoch_to, acc_from, acc_to,
    gain, movement, movement_per_gain``.
    """
    _check_columns(emb, ["model", "epoch", *KEY] + (["vector"] if space == "vector" else ["x", "y"]))
    logs = _logs(logs)
    sets = _point_sets(emb, space)
    rows = []
    for model, g in emb.groupby("model", sort=True):
        if model not in logs:
            continue
        lg = logs[model].set_index("epoch")["train_top1"]
        epochs = [e for e in sorted(g["epoch"].unique()) if e in lg.index and np.isfinite(lg[e])]
        if len(epochs) < 2:
            continue
        acc = np.array([lg[e] for e in epochs], dtype=np.float64)
        resolved = []
        for m in milestones:
            i = int(np.argmin(np.abs(acc - m)))  # first minimum = earliest epoch on ties
            if abs(acc[i] - m) <= tolerance:
                resolved.append((f"{m:g}", i))
        intervals = [(a, b) for a, b in zip(resolved[:-1], resolved[1:])
                     if b[1] > a[1] and acc[b[1]] - acc[a[1]] >= min_gain]
        if not intervals:
            peak = int(np.argmax(acc))
            intervals = [(("start", 0), ("peak", peak))] if peak > 0 else []
        for (ma, ia), (mb, ib) in intervals:
            mv, _, _ = _displacement(sets, model, epochs[ia], epochs[ib])
            gain = float(acc[ib] - acc[ia])
            rows.append({"model": model, "milestone_from": ma, "milestone_to": mb,
                         "epoch_from": epochs[ia], "epoch_to": epochs[ib], "acc_from": float(acc[ia]),
                         "acc_to": float(acc[ib]), "gain": gain, "movement": mv,
                         "movement_per_gain": mv / gain if gain > 0 else float("nan")})
    return pd.DataFrame(rows, columns=["model", "milestone_from", "milestone_to", "epoch_from", "epoch_to",
                                       "acc_from", "acc_to", "gain", "movement", "movement_per_gain"])


def epoch_table(
    emb: pd.DataFrame, logs: Mapping | None = None, method: str = "ebrahimi", min_gain: float = 0.01,
    seed: int = 0, cache: dict | None = None,
) -> pd.DataFrame:
    """Per-run, per-saved-epoch table.

    Columns: ``model, epoch, diversity, entropy_x, entropy_y, n_neurons, movement``
    (d-dim, from the previous saved epoch; only with a ``vector`` column),
    ``movement_2d``, and with logs ``train_top1, test_top1`` (when logged),
    ``train_gain`` (since the previous saved epoch) and ``movement_per_gain`` (NaN where
    the gain is below ``min_gain``). ``cache``: see :func:`concept_diversity`.
    """
    table = concept_diversity(emb, method=method, seed=seed, cache=cache)
    spaces = [("movement", "vector")] if "vector" in emb.columns else []
    spaces.append(("movement_2d", "xy"))
    for col, space in spaces:
        mv = neuron_movement(emb, space)[["model", "epoch_to", "movement"]]
        table = table.merge(mv.rename(columns={"epoch_to": "epoch", "movement": col}), on=["model", "epoch"],
                            how="left")
    logs = _logs(logs)
    if logs:
        acc_cols = ["train_top1"] + [c for c in ("test_top1",) if all(c in lg for lg in logs.values())]
        acc = pd.concat([lg[["epoch", *acc_cols]].assign(model=m) for m, lg in logs.items()], ignore_index=True)
        table = table.merge(acc, on=["model", "epoch"], how="left")
        table = table.sort_values(["model", "epoch"]).reset_index(drop=True)
        table["train_gain"] = table.groupby("model")["train_top1"].diff()
        mcol = "movement" if "movement" in table else "movement_2d"
        table["movement_per_gain"] = np.where(table["train_gain"] >= min_gain,
                                              table[mcol] / table["train_gain"], np.nan)
    return table.sort_values(["model", "epoch"]).reset_index(drop=True)


# ------------------------------------------------------------------------ verdicts
@dataclass
class Diagnosis:
    table: pd.DataFrame  # per run, per epoch (epoch_table)
    speed: pd.DataFrame  # milestone intervals (milestone_speed)
    verdicts: dict[str, dict]  # run -> verdict fields and plain-language messages
    params: dict = field(default_factory=dict)


def _fmt(h: float) -> str:
    return "-inf" if h == -math.inf else f"{h:.2f}"


def diagnose(
    emb: pd.DataFrame,
    logs: Mapping,
    reference: str,
    collapse_fraction: float = 0.75,
    accuracy_drop: float = 0.05,
    slow_ratio: float = 0.85,
    min_gain: float = 0.05,
    milestones: Sequence[float] = (0.25, 0.5, 0.75),
    tolerance: float = 0.125,
    space: str | None = None,
    method: str = "ebrahimi",
    peak_from_epoch: int = 1,
    measure: str = "auto",
    seed: int = 0,
    bootstrap: int = 200,
    diverged: Mapping[str, Mapping[int, str]] | None = None,
    cache: dict | None = None,
) -> Diagnosis:
    """Per-run verdicts against the ``reference`` run (the well-trained one).

    Args:
        emb: embeddings table (see the module docstring); ``model`` names the run.
        logs: run name -> accuracy log (DataFrame, ``log.parquet`` path or run directory).
        reference: the run the others are compared with.
        collapse_fraction: diversity collapses when the effective spread ``exp(H)`` at the
            last epoch is below this fraction of the run's peak or of the reference's last.
        accuracy_drop: ...while training top-1 fell at least this much from its best.
        slow_ratio: slow evolution when movement per accuracy gain is below this fraction
            of the reference's (matched milestone intervals).
        min_gain: least training-accuracy gain for an interval (and for "climbs").
        milestones, tolerance: see :func:`milestone_speed`.
        space: ``"vector"`` (default when a ``vector`` column exists) or ``"xy"``.
        method: entropy estimator of the 2-D measure (see :func:`entropy_1d`).
        peak_from_epoch: first epoch that may be a run's diversity peak (earlier epochs, the
            initialisation, are still in the table); all epochs when a run has none later.
        measure: the diversity the collapse verdict reads: ``"knn"`` (k-NN entropy of the
            unified d-dim embedding, no UMAP involved), ``"map"`` (the paper's per-axis entropy
            of the 2-D map) or ``"auto"`` (knn when a ``vector`` column exists).
        seed, bootstrap: the half-sampling / bootstrap over neurons behind every margin's
            standard error.
        diverged: run -> {epoch: what diverged}, checkpoints that could not be placed in the
            space (NaN/inf weights or activations); reported as findings, and a run with
            one gets ``diverged = True``.
        cache: a dict the caller keeps between calls on a growing run (the live monitor):
            unchanged checkpoints' k-NN diversity is reused exactly (:func:`concept_diversity`).

    Returns:
        :class:`Diagnosis` with ``verdicts[run]`` holding ``diversity_collapses`` and
        ``slow_evolution`` (True/False, or None when the log needed is missing), the
        numbers behind them, each verdict's ``*_margin`` (distance of the statistic from its
        threshold, positive on the verdict's side) with its standard error ``*_margin_se``,
        and ``messages`` (plain language).
    """
    if not 0 < collapse_fraction <= 1:
        raise InputError(f"collapse_fraction must be in (0, 1], got {collapse_fraction}")
    if measure not in ("auto", "knn", "map"):
        raise InputError(f"measure must be 'auto', 'knn' or 'map', got {measure!r}")
    _check_columns(emb, ["model", "epoch", *KEY, "x", "y"])
    runs = sorted(emb["model"].unique())
    if reference not in runs:
        raise EmbeddingError(f"reference run {reference!r} is not in the embeddings (runs: {runs})")
    space = space or ("vector" if "vector" in emb.columns else "xy")
    if measure == "auto":
        measure = "knn" if "vector" in emb.columns else "map"
    col = "diversity_knn" if measure == "knn" else "diversity"
    logs = _logs(logs)
    table = epoch_table(emb, logs, method=method, min_gain=min_gain, seed=seed, cache=cache)
    speed = milestone_speed(emb, logs, milestones, tolerance, min_gain, space)
    sets = _point_sets(emb, space)
    rng = np.random.default_rng([int(seed), 0x5EED])

    div = {r: g.sort_values("epoch") for r, g in table.groupby("model")}
    ref_last = float(div[reference][col].iloc[-1])
    ref_last_se = float(div[reference][col + "_se"].iloc[-1]) if col + "_se" in table else float("nan")
    sp = {r: g for r, g in speed.groupby("model")}
    verdicts: dict[str, dict] = {}
    diverged = {r: dict(v) for r, v in (diverged or {}).items()}
    for run in runs:
        d = div[run]
        h = d[col].to_numpy()
        h_se = d[col + "_se"].to_numpy() if col + "_se" in d else np.full(len(d), np.nan)
        eligible = d["epoch"].to_numpy() >= peak_from_epoch
        if not eligible.any():
            eligible[:] = True
        # first peak; NaN (too few neurons) and the initialisation ignored
        peak_i = int(np.argmax(np.where(np.isnan(h) | ~eligible, -np.inf, h)))
        h_peak, h_last = float(h[peak_i]), float(h[-1])
        spread_peak = math.exp(h_last - h_peak) if np.isfinite(h_peak) and h_last > -math.inf else 0.0
        spread_ref = None
        if run != reference and np.isfinite(ref_last):
            spread_ref = math.exp(h_last - ref_last) if h_last > -math.inf else 0.0
        low = spread_peak < collapse_fraction or (spread_ref is not None and spread_ref < collapse_fraction)
        # margin in nats per dimension: how far below ln(collapse_fraction) the log-spread sits
        thr = math.log(collapse_fraction)
        margins = [(thr - (h_last - h_peak), math.hypot(h_se[-1], h_se[peak_i]))]
        if spread_ref is not None:
            margins.append((thr - (h_last - ref_last), math.hypot(h_se[-1], ref_last_se)))
        c_margin, c_se = max(margins, key=lambda m: m[0] if np.isfinite(m[0]) else math.inf)
        v: dict = {"reference": reference, "measure": measure, "diversity_peak": h_peak,
                   "diversity_peak_epoch": d["epoch"].iloc[peak_i], "diversity_first": float(h[0]),
                   "diversity_last": h_last, "last_epoch": d["epoch"].iloc[-1],
                   "spread_vs_peak": spread_peak, "spread_vs_reference": spread_ref,
                   "collapse_margin": float(c_margin), "collapse_margin_se": float(c_se),
                   "space": space, "diverged": run in diverged,
                   "diverged_epochs": sorted(int(e) for e in diverged.get(run, {})), "messages": []}
        for e, what in sorted(diverged.get(run, {}).items()):
            v["messages"].append(f"{run}: the checkpoint of epoch {e} diverged ({what}); it is left out of the "
                                 f"space. Diverged weights are the extreme of a too-high learning rate.")

        acc = d["train_top1"].to_numpy() if "train_top1" in d else np.full(len(d), np.nan)
        if run not in logs or not np.isfinite(acc).any():
            v["diversity_collapses"] = None
            v["slow_evolution"] = None
            v["messages"].append(f"{run}: no training-accuracy log; no verdict.")
            verdicts[run] = v
            continue
        fin = np.isfinite(acc)
        best = float(np.nanmax(acc))
        last_acc = float(acc[fin][-1])
        v["train_top1_best"], v["train_top1_last"] = best, last_acc
        v["accuracy_fall"] = best - last_acc
        v["diversity_collapses"] = bool(low and best - last_acc >= accuracy_drop)
        pm = f"margin {c_margin:+.2f} ± {c_se:.2f} nats" if np.isfinite(c_se) else f"margin {c_margin:+.2f} nats"
        what = "k-NN entropy of the unified space" if measure == "knn" else "entropy of the 2-D map"
        if v["diversity_collapses"]:
            rel = f"{spread_peak:.0%} of its peak"
            if spread_ref is not None:
                rel += f", {spread_ref:.0%} of the reference run {reference!r}"
            v["messages"].append(
                f"{run}: diversity collapses -- concept diversity ({what}) fell from {_fmt(h_peak)} (epoch "
                f"{v['diversity_peak_epoch']}) to {_fmt(h_last)} (epoch {v['last_epoch']}), a spread of {rel} "
                f"({pm} past the {collapse_fraction:.0%} threshold), while training accuracy fell from "
                f"{best:.2f} to {last_acc:.2f}. This is the signature of a too-high learning rate; lost "
                f"concepts rarely come back, so consider stopping and lowering it."
            )
        elif low:
            v["messages"].append(
                f"{run}: concept diversity is lower ({_fmt(h_last)} at epoch {v['last_epoch']}, peak "
                f"{_fmt(h_peak)}), but training accuracy did not fall; not a collapse."
            )
        else:
            v["messages"].append(f"{run}: concept diversity holds ({_fmt(h_last)} at the last epoch, "
                                 f"peak {_fmt(h_peak)}; {pm} from a collapse).")

        # Evolution speed against the reference over the same milestone intervals.
        mine, ref = sp.get(run), sp.get(reference)
        v["speed_ratio"] = None
        if mine is None or ref is None or run == reference:
            v["slow_evolution"] = False if run == reference else None
            if run != reference:
                v["messages"].append(f"{run}: no comparable accuracy climb with the reference; no speed verdict.")
            verdicts[run] = v
            continue
        if best - last_acc >= accuracy_drop:  # overfitting is about a climb that goes on, not a collapse
            v["slow_evolution"] = False
            v["messages"].append(f"{run}: training accuracy ended {best - last_acc:.2f} below its best; "
                                 f"no evolution-speed verdict.")
            verdicts[run] = v
            continue
        pair = mine.merge(ref, on=["milestone_from", "milestone_to"], suffixes=("", "_ref"))
        if pair.empty:  # no shared milestone intervals: compare the overall rates
            pair = pd.DataFrame({"movement_per_gain": [mine["movement"].sum() / mine["gain"].sum()],
                                 "movement_per_gain_ref": [ref["movement"].sum() / ref["gain"].sum()],
                                 "gain": [mine["gain"].sum()]})
            boot_pairs = None
        else:
            boot_pairs = pair
        ratios = pair["movement_per_gain"] / pair["movement_per_gain_ref"]
        ratio = float(ratios.mean())
        climb = float(pair["gain"].sum())
        v["speed_ratio"], v["movement_per_gain"] = ratio, float(pair["movement_per_gain"].mean())
        v["movement_per_gain_reference"] = float(pair["movement_per_gain_ref"].mean())
        v["speed_ratio_se"] = _ratio_se(boot_pairs, run, reference, sets, rng, bootstrap)
        v["speed_margin"], v["speed_margin_se"] = slow_ratio - ratio, v["speed_ratio_se"]
        v["slow_evolution"] = bool(climb >= min_gain and ratio < slow_ratio)
        pm = (f"margin {slow_ratio - ratio:+.2f} ± {v['speed_ratio_se']:.2f}" if np.isfinite(v["speed_ratio_se"])
              else f"margin {slow_ratio - ratio:+.2f}")
        if v["slow_evolution"]:
            v["messages"].append(
                f"{run}: concepts move slowly while training accuracy climbs -- "
                f"{v['movement_per_gain']:.2f} units of movement per +1.0 training accuracy against "
                f"{v['movement_per_gain_reference']:.2f} in {reference!r} (ratio {ratio:.2f}, {pm} below "
                f"{slow_ratio:g}). This is the signature of overfitting; consider more regularisation "
                f"(dropout, weight decay, data)."
            )
        else:
            v["messages"].append(f"{run}: concepts evolve at a normal pace for the accuracy gained "
                                 f"(ratio {ratio:.2f} to {reference!r}; {pm} from the slow threshold {slow_ratio:g}).")
        verdicts[run] = v
    for run in diverged:  # runs whose every checkpoint diverged are not in the embeddings
        if run not in verdicts:
            verdicts[run] = {"reference": reference, "diverged": True,
                             "diverged_epochs": sorted(int(e) for e in diverged[run]),
                             "diversity_collapses": None, "slow_evolution": None,
                             "messages": [f"{run}: every checkpoint diverged ({'; '.join(diverged[run].values())})."]}
    # the per-epoch table shows diverged checkpoints too, as rows without a diversity
    table["diverged"] = False
    extra = [{"model": r, "epoch": int(e), "diverged": True, "diverged_reason": why}
             for r, d in diverged.items() for e, why in d.items()]
    if extra:
        table = (pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
                 .sort_values(["model", "epoch"]).reset_index(drop=True))
    params = {"reference": reference, "collapse_fraction": collapse_fraction, "accuracy_drop": accuracy_drop,
              "slow_ratio": slow_ratio, "min_gain": min_gain, "milestones": list(milestones),
              "tolerance": tolerance, "space": space, "entropy_method": method, "measure": measure,
              "peak_from_epoch": peak_from_epoch, "seed": seed, "bootstrap": bootstrap}
    return Diagnosis(table=table, speed=speed, verdicts=verdicts, params=params)


def _ratio_se(pair: pd.DataFrame | None, run: str, reference: str, sets: dict, rng: np.random.Generator,
              repeats: int) -> float:
    """Standard error of the mean movement-per-gain ratio, by bootstrap over neurons."""
    if pair is None or pair.empty or repeats < 2:
        return float("nan")
    draws = np.zeros((repeats, len(pair)))
    for j, r in enumerate(pair.itertuples(index=False)):
        mine = _distances(sets, run, r.epoch_from, r.epoch_to)
        ref = _distances(sets, reference, r.epoch_from_ref, r.epoch_to_ref)
        if mine.size == 0 or ref.size == 0:
            return float("nan")
        m = mine[rng.integers(0, mine.size, (repeats, mine.size))].mean(axis=1) / r.gain
        f = ref[rng.integers(0, ref.size, (repeats, ref.size))].mean(axis=1) / r.gain_ref
        draws[:, j] = m / f
    return float(np.std(draws.mean(axis=1), ddof=1))

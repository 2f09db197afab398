"""One neighbour graph per unified space: exact when small, approximate FAISS when large.

The report (each neuron's nearest neighbours on hover), the alignment report and any
other consumer read the *same* graph, computed once per space and saved with it::

    graph = space.neighbour_graph(k=10)      # cached on the space; saved by space.save()
    graph.ids[row], graph.distances[row]     # the k nearest live rows of a row (itself excluded)
    graph.search(q_rows, 10, candidates=mask) # filtered queries on the same index (the alignment's scopes)

Method, chosen by the number of live rows ``n`` (``method="auto"``):

=========== ========================== =====================================================
n           index                      why
=========== ========================== =====================================================
<= 20,000   ``IndexFlatL2`` (exact)    all rows against all rows costs at most a few seconds
                                       on 2 cores (n^2 d = 1.2e10 flops at the threshold)
> 20,000    ``IndexIVFFlat``           k-means coarse quantiser with ``nlist = 2 sqrt(n)``
            (approximate)              lists (clipped to [64, 8192]; at most n/39) trained on at most
                                       ``64 nlist`` rows; ``nprobe`` starts at 2 and doubles
                                       until recall@k on the sample, less its
                                       confidence margin, reaches the target
=========== ========================== =====================================================

``method="hnsw"`` (``IndexHNSWFlat``, ``M=32``, ``efConstruction=64``, ``efSearch``
doubled from 32 until the target) is available by name; ``auto`` prefers IVF because its
build is one k-means on a sample (seconds at a million rows on two cores, HNSW needs
minutes) and because it answers the *filtered* searches the alignment needs (an
``IDSelector`` restricts a search to a scope's candidates) without losing recall.

Recall. ``recall`` is recall@k against the exact search, measured on ``recall_sample``
(default 1,000) live rows drawn with a fixed seed: for each sampled query, the share of
its approximate neighbours whose distance is within its exact k-th distance (so ties
count as hits). The search is widened until a lower confidence bound on that recall reaches
the target, so that the recall of *all* rows does (one-sided 97.7%), not only the sample's; the
bound (:func:`recall_lower_bound`: a Wilson bound on the miss share, calibrated for the rare,
lumpy misses of a good graph) is recorded as ``recall_lower_bound``. A sample of ``n`` rows
certifies at most ``1 - 4 / (n + 4)`` (0.996 for 1,000): a higher ``recall_target`` is refused
with the sample size it needs.
The exact method records 1.0. A row whose probed lists hold fewer than ``k`` other rows
(small lists, few probes) is searched exactly instead, so every live row gets its ``k``
neighbours (counted in ``params["exact_refill_rows"]``). Method, parameters, thresholds, recall and
timings are in :meth:`NeighbourGraph.to_dict` (written to the space's ``neighbours.json``
and the run manifest).

Reproducibility. The exact search is deterministic. The IVF quantiser is trained with a
fixed seed on a fixed sample, and each query is searched independently, so the graph is
the same run to run for the same thread count (FAISS multithreads over queries).

Filtered searches (:meth:`NeighbourGraph.search` with ``candidates``) are exact whenever
the graph is exact or the candidate set has at most ``exact_max_rows`` rows (a flat index
over the candidates); otherwise they use the approximate index with an ``IDSelector`` and
``nprobe`` raised in proportion to how few rows the filter keeps.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmbeddingError

__all__ = [
    "EXACT_MAX_ROWS",
    "RECALL_SAMPLE",
    "max_certifiable_recall",
    "recall_lower_bound",
    "recall_per_query",
    "recall_sample_positions",
    "RECALL_TARGET",
    "NeighbourGraph",
    "brute_force_knn",
    "build_graph",
    "choose_method",
    "recall_at_k",
]

EXACT_MAX_ROWS = 20_000
RECALL_TARGET = 0.95
RECALL_SAMPLE = 1_000
#: the search is widened until the sampled recall's lower confidence bound at this z (one-sided, 97.7%) reaches the target
RECALL_Z = 2.0
_FORMAT = 1


def choose_method(n: int, method: str = "auto", exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    """``"exact"``, ``"ivf"`` or ``"hnsw"`` for ``n`` live rows (see the module docstring)."""
    if method not in ("auto", "exact", "ivf", "hnsw"):
        raise EmbeddingError(f"unknown neighbour method {method!r}; use 'auto', 'exact', 'ivf' or 'hnsw'")
    if method != "auto":
        return method
    return "exact" if n <= exact_max_rows else "ivf"


def _faiss(gpu: bool = False):
    from .space import _faiss_module

    return _faiss_module(gpu)


def _ivf_nlist(n: int) -> int:
    """``2 sqrt(n)`` lists, within [64, 8192] and never fewer than 39 training rows per list."""
    return int(max(1, min(8192, max(64, round(2 * math.sqrt(n))), n // 39)))


def _bitmap_selector(faiss, mask: np.ndarray):
    bits = np.packbits(mask.astype(np.uint8), bitorder="little")
    sel = faiss.IDSelectorBitmap(int(mask.size), faiss.swig_ptr(bits))
    sel._conceptevo_bits = bits  # the selector points into this buffer: keep it alive
    return sel


def brute_force_knn(x: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference: for each query row of ``x`` (default all) its ``k`` nearest other rows.

    Returns ``(ids int64 (q, k), distances float64 (q, k))`` by (distance, id), padded with
    ``-1`` / NaN when ``x`` has fewer than ``k + 1`` rows. For tests and recall checks.
    """
    x = np.asarray(x, dtype=np.float64)
    q = np.arange(len(x)) if queries is None else np.asarray(queries, dtype=np.int64)
    ids = np.full((q.size, k), -1, np.int64)
    dist = np.full((q.size, k), np.nan)
    sq = (x * x).sum(axis=1)
    for s in range(0, q.size, 512):
        qq = q[s:s + 512]
        d2 = np.maximum(sq[qq, None] + sq[None, :] - 2.0 * (x[qq] @ x.T), 0.0)
        d2[np.arange(qq.size), qq] = np.inf
        d2[np.isnan(d2)] = np.inf  # dead (NaN) rows are never neighbours
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]  # ties: the smaller id first
        dd = np.take_along_axis(d2, order, axis=1)
        ok = np.isfinite(dd)
        ids[s:s + qq.size, : order.shape[1]] = np.where(ok, order, -1)
        dist[s:s + qq.size, : order.shape[1]] = np.where(ok, np.sqrt(np.where(ok, dd, 0)), np.nan)
    return ids, dist


def recall_at_k(approx_dist: np.ndarray, exact_dist: np.ndarray, rtol: float = 1e-4) -> float:
    """Mean share of approximate neighbours within each query's exact k-th distance (ties are hits)."""
    per = recall_per_query(approx_dist, exact_dist, rtol)
    return float(per.mean()) if per.size else 1.0


def recall_per_query(approx_dist: np.ndarray, exact_dist: np.ndarray, rtol: float = 1e-4) -> np.ndarray:
    """Each query's share of approximate neighbours within its exact k-th distance (queries with
    no exact neighbour left out)."""
    a, e = np.asarray(approx_dist, np.float64), np.asarray(exact_dist, np.float64)
    kth = np.nanmax(np.where(np.isfinite(e), e, -np.inf), axis=1) if e.size else np.zeros(len(e))
    want = np.isfinite(e).sum(axis=1)
    ok = want > 0
    hits = (np.isfinite(a) & (a <= kth[:, None] * (1 + rtol) + 1e-6)).sum(axis=1)
    return (np.minimum(hits[ok], want[ok]) / want[ok]).astype(np.float64)


def recall_lower_bound(per_query: np.ndarray, z: float = RECALL_Z) -> float:
    """What the recall of all rows is at least, given sampled queries' recalls, with one-sided
    confidence ``Phi(z)`` (97.7% for z = 2).

    A Wilson score bound on the mean miss share ``1 - recall`` with the sample size scaled by the misses'
    dispersion: per-query recall moves in steps of ``1/k`` and most queries miss nothing, so ``n`` queries
    carry what ``n_eff = n p (1 - p) / s^2`` coin flips would (``p`` the mean miss share, ``s^2`` its sample
    variance; ``n_eff = n`` when the sample has no spread). It is capped at what a perfect sample certifies,
    ``1 - z^2 / (n + z^2)``: a few tiny misses say little about the spread. The plain normal bound, mean
    minus ``z`` standard errors, is too optimistic when misses are rare, because a sample that happens to
    hold few misses has both a high mean and a small spread. Measured by
    ``benchmarks/bench_recall_bound.py`` (36 real populations, recall 0.75-0.999, samples of 300-3,000):
    this bound exceeds the true recall in 1.8-2.8% of samples (mean 2.2-2.5% per regime; nominal 2.3%),
    the normal bound in up to 5.7% (mean 5.2% at recall 0.995-0.999 with 1,000 rows).
    """
    per = np.asarray(per_query, np.float64)
    n = per.size
    if n < 2:
        return float(per.mean()) if n else 1.0
    miss = 1.0 - per
    p = float(miss.mean())
    s2 = float(miss.var(ddof=1))
    coin = p * (1.0 - p)
    n_eff = n * coin / s2 if s2 > 0 and coin > 0 else float(n)
    q = z * z / n_eff
    upper = (p + q / 2 + z * math.sqrt(coin / n_eff + q / (4 * n_eff))) / (1 + q)
    # a sample with misses never certifies more than a perfect one: a few tiny misses say little about spread
    return float(min(max(0.0, 1.0 - upper), max_certifiable_recall(n, z)))


def max_certifiable_recall(sample: int, z: float = RECALL_Z) -> float:
    """The highest recall target a sample of this many queries can certify (every query perfect)."""
    return 1.0 - z * z / (sample + z * z) if sample > 0 else 0.0


def recall_sample_positions(n_live: int, sample: int, seed: int = 0) -> np.ndarray:
    """Which live rows (positions ``0..n_live-1`` among the live rows, sorted) the recall check of
    :func:`build_graph` queries: ``sample`` of them drawn without replacement with ``seed``."""
    ns = min(int(sample), int(n_live))
    return np.sort(np.random.default_rng(seed).choice(int(n_live), ns, replace=False))


def _drop_self(score: np.ndarray, pos: np.ndarray, q_ids: np.ndarray | None, k: int, l2: bool = True):
    """FAISS results (q, k[+1]) -> first ``k`` entries that are not the query itself; sqrt of L2^2."""
    keep = pos >= 0
    if q_ids is not None:
        keep &= pos != q_ids[:, None]
    slot = np.cumsum(keep, axis=1) - 1
    keep &= slot < k
    ids = np.full((pos.shape[0], k), -1, np.int64)
    dist = np.full((pos.shape[0], k), np.nan, np.float32)
    qi, col = np.nonzero(keep)
    s = score[qi, col].astype(np.float64)
    ids[qi, slot[qi, col]] = pos[qi, col]
    dist[qi, slot[qi, col]] = np.sqrt(np.maximum(s, 0.0)) if l2 else s
    return ids, dist, keep.sum(axis=1).astype(np.int64)


@dataclass
class NeighbourGraph:
    """The ``k`` nearest live rows of every row of a space (row numbers of the space).

    ``ids`` int64 ``(M, k)`` and ``distances`` float32 ``(M, k)`` (Euclidean), sorted by
    distance, a row never its own neighbour; dead rows and missing slots are ``-1`` / NaN.
    """

    ids: np.ndarray
    distances: np.ndarray
    k: int
    method: str
    params: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    recall: float = 1.0
    recall_sample: int = 0
    recall_lower: float = 1.0  # the sampled recall's lower confidence bound (the stopping rule)
    seconds: dict = field(default_factory=dict)
    backend: str = "faiss-cpu"
    _x: np.ndarray | None = field(default=None, repr=False)  # live vectors (for filtered searches)
    _rows: np.ndarray | None = field(default=None, repr=False)  # their space rows
    _index: Any = field(default=None, repr=False)

    # ---------------------------------------------------------------- queries
    def attach(self, vectors: np.ndarray) -> NeighbourGraph:
        """Give the graph the space's vectors (after :meth:`load`) so :meth:`search` can run."""
        vectors = np.asarray(vectors, np.float32)
        if len(vectors) != len(self.ids):
            raise EmbeddingError(f"the graph has {len(self.ids)} rows, the vectors {len(vectors)}")
        live = np.isfinite(vectors).all(axis=1)
        self._rows = np.flatnonzero(live)
        self._x = np.ascontiguousarray(vectors[live])
        self._index = self._pos_of = None
        return self

    def _approx_index(self):
        if self._index is None:
            if self._x is None:
                raise EmbeddingError("this neighbour graph has no vectors; call attach(space.vectors)")
            self._index, _ = _build_index(self._x, self.method, self.params, self.params.get("seed", 0),
                                          self.backend)
        return self._index

    def search(self, q_rows: np.ndarray, k: int, *, candidates: np.ndarray | None = None,
               exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of live query rows among ``candidates`` (bool ``(M,)``, default all live).

        Same return as :meth:`UnifiedSpace.knn`: ``(ids (q, k), distances (q, k), counts (q,))``.
        Exact when the graph is exact or the candidates are few (see the module docstring).
        """
        if self._x is None:
            raise EmbeddingError("this neighbour graph has no vectors; call attach(space.vectors)")
        faiss = _faiss()
        q_rows = np.asarray(q_rows, np.int64).ravel()
        m = len(self.ids)
        pos_of = getattr(self, "_pos_of", None)
        if pos_of is None or pos_of.size != m:  # space row -> position among the live rows (cached)
            pos_of = np.full(m, -1, np.int64)
            pos_of[self._rows] = np.arange(self._rows.size)
            self._pos_of = pos_of
        if (pos_of[q_rows] < 0).any():
            raise EmbeddingError("a query row is a dead neuron (no stimuli): it has no place in the space")
        live_mask = pos_of >= 0
        cand = live_mask if candidates is None else (np.asarray(candidates, bool) & live_mask)
        out = (np.full((q_rows.size, k), -1, np.int64), np.full((q_rows.size, k), np.nan, np.float32),
               np.zeros(q_rows.size, np.int64))
        n_cand = int(cand.sum())
        if n_cand == 0 or q_rows.size == 0:
            return out
        q = self._x[pos_of[q_rows]]
        kk = min(k + (1 if exclude_self else 0), n_cand)
        exact_max = int(self.thresholds.get("exact_max_rows", EXACT_MAX_ROWS))
        if self.method == "exact" or n_cand <= exact_max:
            cand_rows = np.flatnonzero(cand)
            index = faiss.IndexFlatL2(self._x.shape[1])
            index.add(np.ascontiguousarray(self._x[pos_of[cand_rows]]))
            score, pos = index.search(q, kk)
            found = np.where(pos >= 0, cand_rows[np.clip(pos, 0, None)], -1)
        else:
            index = self._approx_index()
            sel = _bitmap_selector(faiss, cand[self._rows])
            frac = n_cand / self._rows.size
            if self.method == "hnsw":
                ef = int(min(4096, max(kk, self.params["efSearch"]) / max(frac, 1e-3)))
                sp = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
            else:
                nprobe = int(min(self.params["nlist"], math.ceil(self.params["nprobe"] / max(frac, 1e-3))))
                sp = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
            score, pos = index.search(q, kk, params=sp)
            found = np.where(pos >= 0, self._rows[np.clip(pos, 0, None)], -1)
        return _drop_self(score, found, q_rows if exclude_self else None, k)

    def describe(self) -> str:
        """One line for a report header: method, k and recall (and the size threshold)."""
        limit = int(self.thresholds.get("exact_max_rows", EXACT_MAX_ROWS))
        if self.method == "exact":
            return f"exact (FAISS flat), k={self.k}; approximate above {limit:,} neurons"
        knob = f"nprobe {self.params.get('nprobe')}/{self.params.get('nlist')} lists" if self.method == "ivf" \
            else f"efSearch {self.params.get('efSearch')}"
        return (f"approximate FAISS {self.method.upper()} ({knob}), k={self.k}, recall@{self.k} "
                f"{self.recall:.3f} on {self.recall_sample:,} sampled queries (>= {self.recall_lower:.3f} for all "
                f"rows at 97.7% confidence; exact up to {limit:,} neurons)")

    # ---------------------------------------------------------------- records / files
    def to_dict(self) -> dict:
        """Method, parameters, thresholds, recall and timings (JSON-ready)."""
        live = int((self.ids[:, 0] >= 0).sum()) if self.ids.size else 0
        return {"format": _FORMAT, "k": int(self.k), "method": self.method, "backend": self.backend,
                "rows": len(self.ids), "rows_with_neighbours": live, "params": dict(self.params),
                "thresholds": dict(self.thresholds), "recall_at_k": round(float(self.recall), 4),
                "recall_lower_bound": round(float(self.recall_lower), 4), "recall_sample": int(self.recall_sample),
                "seconds": {k: round(float(v), 3) for k, v in self.seconds.items()}}

    def save(self, directory: str | Path) -> Path:
        """``neighbours.npy`` (ids), ``neighbour_distances.npy`` and ``neighbours.json`` in ``directory``."""
        from .store import atomic_write

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "neighbours.npy", lambda t: np.save(t, np.ascontiguousarray(self.ids), allow_pickle=False))
        atomic_write(root / "neighbour_distances.npy",
                     lambda t: np.save(t, np.ascontiguousarray(self.distances), allow_pickle=False))
        text = json.dumps(self.to_dict(), indent=2)
        atomic_write(root / "neighbours.json", lambda t: t.write_text(text, encoding="utf-8"))
        return root

    @classmethod
    def load(cls, directory: str | Path) -> NeighbourGraph | None:
        """The graph saved in ``directory``, or None when there is none."""
        root = Path(directory)
        if not (root / "neighbours.json").is_file():
            return None
        doc = json.loads((root / "neighbours.json").read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            return None
        return cls(ids=np.load(root / "neighbours.npy", allow_pickle=False),
                   distances=np.load(root / "neighbour_distances.npy", allow_pickle=False),
                   k=int(doc["k"]), method=doc["method"], params=doc.get("params") or {},
                   thresholds=doc.get("thresholds") or {}, recall=float(doc.get("recall_at_k", 1.0)),
                   recall_sample=int(doc.get("recall_sample", 0)),
                   recall_lower=float(doc.get("recall_lower_bound", doc.get("recall_at_k", 1.0))), seconds=doc.get("seconds") or {},
                   backend=doc.get("backend", "faiss-cpu"))


def _build_index(x: np.ndarray, method: str, params: dict, seed: int, backend: str):
    """A trained FAISS index over ``x`` for ``method`` ("exact" / "ivf" / "hnsw") and its params."""
    faiss = _faiss(backend == "faiss-gpu")
    n, d = x.shape
    params = dict(params)
    if method == "exact":
        index = faiss.IndexFlatL2(d)
    elif method == "ivf":
        nlist = int(params.get("nlist") or _ivf_nlist(n))
        nlist = max(1, min(nlist, n))
        quant = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_L2)
        index.cp.seed = int(seed)
        n_train = min(n, 64 * nlist)
        train = x if n_train == n else x[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
        index.train(np.ascontiguousarray(train))
        params.update(nlist=nlist, train_rows=int(n_train))
        params.setdefault("nprobe", 2)
        index.nprobe = int(params["nprobe"])
    elif method == "hnsw":
        m_links = int(params.get("M", 32))
        index = faiss.IndexHNSWFlat(d, m_links)
        index.hnsw.efConstruction = int(params.get("efConstruction", 64))
        params.update(M=m_links, efConstruction=int(index.hnsw.efConstruction))
        params.setdefault("efSearch", 32)
        index.hnsw.efSearch = int(params["efSearch"])
    else:  # pragma: no cover - choose_method validates
        raise EmbeddingError(f"unknown neighbour method {method!r}")
    index.add(x)
    params["seed"] = int(seed)
    return index, params


def build_graph(
    vectors: np.ndarray,
    k: int = 10,
    *,
    method: str = "auto",
    exact_max_rows: int = EXACT_MAX_ROWS,
    recall_target: float = RECALL_TARGET,
    recall_sample: int = RECALL_SAMPLE,
    seed: int = 0,
    backend: str = "faiss-cpu",
    params: dict | None = None,
) -> NeighbourGraph:
    """The neighbour graph of ``vectors`` (``(M, d)``, NaN rows = dead); see the module docstring."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise EmbeddingError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2:
        raise EmbeddingError(f"vectors must be 2-D (rows, dim), got shape {vectors.shape}")
    m = len(vectors)
    live = np.isfinite(vectors).all(axis=1) if m else np.zeros(0, bool)
    rows = np.flatnonzero(live)
    x = np.ascontiguousarray(vectors[live])
    n = int(rows.size)
    chosen = choose_method(n, method, exact_max_rows)
    thresholds = {"exact_max_rows": int(exact_max_rows), "recall_target": float(recall_target),
                  "recall_sample": int(recall_sample)}
    ids = np.full((m, k), -1, np.int64)
    dist = np.full((m, k), np.nan, np.float32)
    graph = NeighbourGraph(ids, dist, k, chosen, thresholds=thresholds, backend=backend)
    graph._x, graph._rows = x, rows
    if n < 2:
        graph.params = {"seed": int(seed)}
        return graph
    kk = min(k + 1, n)
    if chosen != "exact":
        sample = recall_sample_positions(n, recall_sample, seed)  # the rows the recall check queries
        ns = int(sample.size)
        if recall_target > max_certifiable_recall(ns):
            need = math.ceil(RECALL_Z ** 2 * recall_target / (1 - recall_target)) if recall_target < 1 else None
            raise EmbeddingError(
                f"recall_target {recall_target} cannot be certified from {ns:,} sampled rows (at most "
                f"{max_certifiable_recall(ns):.4f}, when every sampled row is perfect): "
                + (f"raise recall_sample to at least {need:,}" if need and need <= n else "lower the target")
                + " or use method='exact'")
    t0 = time.perf_counter()
    index, p = _build_index(x, chosen, params or {}, seed, backend)
    graph.seconds["build"] = time.perf_counter() - t0
    if chosen != "exact":
        # recall on a seeded sample against the exact search; widen the search until it holds
        t0 = time.perf_counter()
        faiss = _faiss(backend == "faiss-gpu")
        flat = faiss.IndexFlatL2(x.shape[1])
        flat.add(x)
        es, ep = flat.search(x[sample], kk)
        _, e_dist, _ = _drop_self(es, ep, sample, k)
        knob, limit = ("nprobe", p["nlist"]) if chosen == "ivf" else ("efSearch", 4096)
        while True:
            if chosen == "ivf":
                index.nprobe = int(p["nprobe"])
            else:
                index.hnsw.efSearch = int(max(p["efSearch"], kk))
            s, pp = index.search(x[sample], kk)
            # as in the finished graph, a sampled row with short probed lists counts its exact neighbours
            short = (pp < 0).any(axis=1)
            s[short], pp[short] = es[short], ep[short]
            _, a_dist, _ = _drop_self(s, pp, sample, k)
            per = recall_per_query(a_dist, e_dist)
            rec = float(per.mean()) if per.size else 1.0
            # the whole graph's recall, not only the sample's, must reach the target: its lower bound
            lower = recall_lower_bound(per)
            if lower >= recall_target or p[knob] >= limit:
                break
            p[knob] = int(min(limit, p[knob] * 2))
        graph.recall, graph.recall_sample = rec, ns
        graph.recall_lower = lower
        graph.thresholds["recall_z"] = RECALL_Z
        graph.thresholds["recall_bound"] = "wilson, dispersion-scaled"
        graph.seconds["recall"] = time.perf_counter() - t0
    else:
        graph.recall, graph.recall_sample = 1.0, 0
    t0 = time.perf_counter()
    s, pos = index.search(x, kk)
    if chosen != "exact":
        # a row whose probed lists hold fewer than k other rows gets -1 slots: search it exactly
        short = np.flatnonzero((pos < 0).any(axis=1))
        if short.size:
            s[short], pos[short] = flat.search(x[short], kk)
        p["exact_refill_rows"] = int(short.size)
    graph.seconds["search"] = time.perf_counter() - t0
    nb, d, _ = _drop_self(s, pos, np.arange(n), k)
    ids[rows] = np.where(nb >= 0, rows[np.clip(nb, 0, None)], -1)
    dist[rows] = d
    graph.params = p
    graph._index = index if chosen != "exact" else None
    return graph

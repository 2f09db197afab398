"""Alignment report: does the unified space put neurons that detect the same concept together?

Uses ground-truth concept tags of the images (the built-in dataset has them:
``ImageSet.tags``, concept family -> int code per image, e.g. shape, colour,
texture). For every neuron and family:

* its *dominant concept* is the most common code among its valid stimuli (ties:
  the smallest code) and its *purity* the share of stimuli that carry it;
* its *share* is the fraction of its ``k`` nearest neighbours in the unified space
  (Euclidean; searched on the space's one neighbour graph index, exact FAISS below its
  size threshold, see :mod:`conceptevo.neighbours`) whose dominant concept is the same;
* its *chance* is what that share would be if the neighbours were drawn uniformly
  from the same candidates: the base rate of the neuron's dominant concept among
  them (the expectation under a random permutation of the candidates' positions).

Three scopes of candidates, matching the paper's claims about the space:

=============== ===================================================================
within          the neuron's own checkpoint (same model, same epoch), itself excluded
across_epochs   the same model at the other registered epochs
across_models   every other model (all its registered epochs)
=============== ===================================================================

Per (scope, family) the report gives the mean share, the mean chance, ``lift =
share / chance`` (1 = no better than chance) and the number of query neurons.
A second control, ``shuffled``, recomputes the share with the image tags randomly
permuted over images (neighbours unchanged): neurons that share stimulus images
agree even on meaningless tags, so ``share`` well above ``shuffled`` shows concept
structure beyond "same images". Dead neurons (no stimuli) take no part.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import EmbeddingError

__all__ = ["SCOPES", "AlignmentReport", "dominant_concepts", "alignment_report"]

SCOPES = ("within", "across_epochs", "across_models")


def dominant_concepts(neuron_stimuli: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most common code among each neuron's valid stimuli and its share.

    ``neuron_stimuli``: int ``(m, k)`` image ids (``-1`` = empty); ``codes``: int
    ``(N,)`` >= 0, one per image. Returns ``(dominant int64 (m,), purity float64 (m,))``;
    ties go to the smallest code; a neuron without valid stimuli gets ``(-1, nan)``.
    """
    stim = np.asarray(neuron_stimuli)
    c = np.asarray(codes)
    if stim.ndim != 2:
        raise EmbeddingError(f"neuron_stimuli must be 2-D (neurons, k), got shape {stim.shape}")
    if c.ndim != 1 or c.dtype == np.bool_ or not np.issubdtype(c.dtype, np.integer):
        raise EmbeddingError(f"tag codes must be a 1-D int array (one per image), got {c.dtype} {c.shape}")
    if c.size and c.min() < 0:
        raise EmbeddingError(f"tag codes must be >= 0, found {int(c.min())}")
    if stim.size and int(stim.max()) >= c.size:
        raise EmbeddingError(f"stimulus image id {int(stim.max())} has no tag (tags cover {c.size} images)")
    m = stim.shape[0]
    dominant = np.full(m, -1, dtype=np.int64)
    purity = np.full(m, np.nan)
    rows, cols = np.nonzero(stim >= 0)
    if rows.size == 0:
        return dominant, purity
    code = c[stim[rows, cols]].astype(np.int64)
    # count (row, code) pairs, then per row take the largest count, smallest code on ties
    width = int(code.max()) + 1
    uniq, cnt = np.unique(rows * width + code, return_counts=True)
    ur, uc = uniq // width, uniq % width
    order = np.lexsort((uc, -cnt, ur))
    first = order[np.r_[True, ur[order][1:] != ur[order][:-1]]]
    valid_n = np.bincount(rows, minlength=m)
    dominant[ur[first]] = uc[first]
    purity[ur[first]] = cnt[first] / valid_n[ur[first]]
    return dominant, purity


@dataclass
class AlignmentReport:
    """Result of :func:`alignment_report`: ``table`` has one row per (scope, family)."""

    table: Any  # pandas DataFrame: scope, family, k, share, chance, lift, shuffled, purity, n_neurons
    k: int
    params: dict = field(default_factory=dict)

    def to_rich(self, title: str | None = None):
        """A ``rich.table.Table`` of the report."""
        from rich.table import Table

        t = Table(title=title or f"Concept alignment of the unified space (k={self.k} nearest neighbours)")
        for col, just in (("scope", "left"), ("family", "left"), ("share", "right"), ("chance", "right"),
                          ("lift", "right"), ("shuffled", "right"), ("purity", "right"),
                          ("neurons", "right")):
            t.add_column(col, justify=just)
        for r in self.table.itertuples(index=False):
            lift = "-" if not np.isfinite(r.lift) else f"{r.lift:.2f}"
            t.add_row(r.scope, r.family, _f(r.share), _f(r.chance), lift, _f(r.shuffled), _f(r.purity),
                      str(r.n_neurons))
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=110, force_terminal=False, color_system=None).print(self.to_rich())
        return buf.getvalue()

    def print(self, console: Any = None) -> None:
        """Print the table (to ``console`` or a new rich Console)."""
        from rich.console import Console

        (console or Console()).print(self.to_rich())


def _f(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x:.3f}"


def alignment_report(
    space: Any,
    tags: dict[str, np.ndarray],
    *,
    k: int = 10,
    families: Sequence[str] | None = None,
    scopes: Sequence[str] = SCOPES,
    queries: Any = None,
    min_purity: float = 0.0,
    shuffles: int = 1,
    seed: int = 0,
    metric: str = "l2",
    backend: str = "auto",
    graph: Any = None,
) -> AlignmentReport:
    """Alignment of a :class:`~conceptevo.space.UnifiedSpace` with ground-truth concept tags.

    ``tags``: family -> int codes ``(N,)`` for the space's ``N`` images (``ImageSet.tags``).
    ``families``: which families (default all). ``queries``: which rows ask (a
    ``space.rows``-style dict filter, mask or indices; default every live row).
    ``min_purity``: only neurons whose dominant concept covers at least this share of
    their stimuli ask (per family). ``shuffles``: image-tag permutations for the
    ``shuffled`` column (0 = skip). See the module docstring for the definitions.
    ``graph``: the space's :class:`~conceptevo.neighbours.NeighbourGraph` whose index
    answers the scoped searches (default ``space.neighbour_graph()``, the one graph the
    report also reads; exact below its size threshold, approximate above it). With
    ``metric="cosine"`` the space's exact :meth:`~conceptevo.space.UnifiedSpace.knn` is used.
    """
    import pandas as pd

    if not tags:
        raise EmbeddingError(
            "no concept tags given (tags is empty); the built-in dataset provides ImageSet.tags")
    fams = list(tags) if families is None else list(families)
    missing = [f for f in fams if f not in tags]
    if missing:
        raise EmbeddingError(f"unknown tag families {missing}; have {sorted(tags)}")
    bad_scopes = [s for s in scopes if s not in SCOPES]
    if bad_scopes:
        raise EmbeddingError(f"unknown scopes {bad_scopes}; use {list(SCOPES)}")
    for f in fams:
        if np.asarray(tags[f]).shape != (space.num_images,):
            raise EmbeddingError(f"tags[{f!r}] has shape {np.asarray(tags[f]).shape}; the space has "
                                 f"{space.num_images} images")
    k = int(k)
    if k < 1:
        raise EmbeddingError(f"k must be >= 1, got {k}")

    keys = space.keys()
    model = keys["model"].to_numpy(object)
    epoch = keys["epoch"].to_numpy(np.int64)
    live = keys["valid"].to_numpy(bool)
    ask = space.mask(queries) & live if queries is not None else live.copy()
    stim = space.stimuli()
    ckpts = list(dict.fromkeys(zip(model.tolist(), epoch.tolist())))

    if metric == "l2" and graph is None and hasattr(space, "neighbour_graph"):
        graph = space.neighbour_graph(k=k, backend=backend)
    if metric != "l2":
        graph = None

    def search(q_rows, cand, exclude_self):
        if graph is not None:
            return graph.search(q_rows, k, candidates=cand, exclude_self=exclude_self)
        return space.knn(q_rows, k, within=cand, metric=metric, backend=backend, exclude_self=exclude_self)

    # Neighbours once per (checkpoint, scope): the candidates are the same for every query of a checkpoint.
    nbrs: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in scopes}
    for mdl, ep in ckpts:
        own = (model == mdl) & (epoch == ep)
        q_rows = np.flatnonzero(own & ask)
        if q_rows.size == 0:
            continue
        cand_of = {
            "within": own,
            "across_epochs": (model == mdl) & (epoch != ep),
            "across_models": model != mdl,
        }
        for s in scopes:
            cand = cand_of[s] & live
            if not cand.any():
                continue
            nb, _, counts = search(q_rows, cand, s == "within")
            qi, slot = np.nonzero(nb >= 0)
            nbrs[s][0].append(q_rows[counts > 0])  # queries that found a neighbour
            nbrs[s][1].append(q_rows[qi])
            nbrs[s][2].append(nb[qi, slot])
    cand_sets = {}  # (scope, checkpoint) -> candidate mask, for the chance rates
    for mdl, ep in ckpts:
        own = (model == mdl) & (epoch == ep)
        cand_sets[("within", mdl, ep)] = own & live
        cand_sets[("across_epochs", mdl, ep)] = (model == mdl) & (epoch != ep) & live
        cand_sets[("across_models", mdl, ep)] = (model != mdl) & live

    rng = np.random.default_rng(seed)
    records = []
    for fam in fams:
        codes = np.asarray(tags[fam]).astype(np.int64)
        dom, pur = dominant_concepts(stim, codes)
        shuffled_dom = [dominant_concepts(stim, codes[rng.permutation(codes.size)])[0]
                        for _ in range(shuffles)]
        for s in scopes:
            qs, q_of_pair, nb = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in nbrs[s])
            rec = {"scope": s, "family": fam, "k": k}
            keep_q = qs[pur[qs] >= min_purity] if qs.size else qs
            if keep_q.size == 0:
                records.append({**rec, "share": np.nan, "chance": np.nan, "lift": np.nan, "shuffled": np.nan,
                                "purity": np.nan, "n_neurons": 0})
                continue
            share = _mean_agreement(dom, q_of_pair, nb, keep_q)
            chance = _chance(dom, keep_q, model, epoch, cand_sets, s)
            shuf = (np.mean([_mean_agreement(d, q_of_pair, nb, keep_q) for d in shuffled_dom])
                    if shuffled_dom else np.nan)
            records.append({**rec, "share": share, "chance": chance,
                            "lift": share / chance if chance > 0 else np.nan, "shuffled": shuf,
                            "purity": float(np.mean(pur[keep_q])), "n_neurons": int(keep_q.size)})
    table = pd.DataFrame.from_records(records, columns=["scope", "family", "k", "share", "chance", "lift",
                                                        "shuffled", "purity", "n_neurons"])
    params = {"k": k, "families": fams, "scopes": list(scopes), "min_purity": min_purity,
              "shuffles": shuffles, "seed": seed, "metric": metric}
    return AlignmentReport(table=table, k=k, params=params)


def _mean_agreement(dom: np.ndarray, q_of_pair: np.ndarray, nb: np.ndarray, keep_q: np.ndarray) -> float:
    """Mean over the kept query neurons of the share of their neighbours with the same dominant code."""
    sel = np.isin(q_of_pair, keep_q)
    q, n = q_of_pair[sel], nb[sel]
    if q.size == 0:
        return float("nan")
    uq, inv = np.unique(q, return_inverse=True)
    agree = np.bincount(inv, weights=(dom[q] == dom[n]).astype(np.float64), minlength=uq.size)
    total = np.bincount(inv, minlength=uq.size)
    return float(np.mean(agree / total))


def _chance(dom: np.ndarray, keep_q: np.ndarray, model: np.ndarray, epoch: np.ndarray,
            cand_sets: dict, scope: str) -> float:
    """Mean over the query neurons of the base rate of their dominant code among their candidates."""
    out = np.empty(keep_q.size)
    width = int(dom.max()) + 1
    for (s, mdl, ep), cand in cand_sets.items():
        if s != scope:
            continue
        sel = (model[keep_q] == mdl) & (epoch[keep_q] == ep)
        if not sel.any():
            continue
        counts = np.bincount(dom[cand], minlength=width).astype(np.float64)
        total = float(cand.sum())
        mine = dom[keep_q[sel]]
        if scope == "within":  # the neuron itself is not its own candidate
            out[sel] = (counts[mine] - 1) / max(total - 1, 1)
        else:
            out[sel] = counts[mine] / total
    return float(np.mean(out))

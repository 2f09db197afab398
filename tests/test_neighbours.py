"""The one neighbour graph: exact path = NumPy brute force, approximate path recall, save/load, sharing."""
import json
import math

import numpy as np
import pytest

from conceptevo import neighbours as nbm
from conceptevo.errors import EmbeddingError
from conceptevo.space import UnifiedSpace


def clustered(rng, n, d=16, clusters=40, spread=1.0):
    centres = rng.normal(size=(clusters, d)) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d)) * spread).astype(np.float32)


def check_equal_to_brute(x, g, k):
    ref_ids, ref_d = nbm.brute_force_knn(x, k)
    live = np.isfinite(x).all(axis=1)
    # distances agree everywhere; ids agree except where two candidates are tied
    np.testing.assert_allclose(g.distances, ref_d, rtol=1e-4, atol=1e-4, equal_nan=True)
    tie = np.zeros_like(ref_ids, bool)
    tie[:, 1:] |= np.isclose(ref_d[:, 1:], ref_d[:, :-1], rtol=1e-5, atol=1e-5)
    tie[:, :-1] |= tie[:, 1:]
    assert np.array_equal(np.where(tie, 0, g.ids), np.where(tie, 0, ref_ids))
    assert not (g.ids == np.arange(len(x))[:, None]).any()  # never its own neighbour
    assert (g.ids[~live] == -1).all()


@pytest.mark.parametrize("n,k", [(0, 3), (1, 3), (2, 3), (5, 10), (97, 10), (301, 7)])
def test_exact_graph_equals_numpy_brute_force(rng, n, k):
    x = clustered(rng, n, d=5, clusters=6)
    g = nbm.build_graph(x, k)
    assert g.method == "exact" and g.recall == 1.0
    assert g.ids.shape == (n, k) and g.distances.shape == (n, k)
    if n:
        ref_ids, _ = nbm.brute_force_knn(x, k)
        assert ((g.ids >= 0).sum(axis=1) == (ref_ids >= 0).sum(axis=1)).all()  # n < k: n-1 neighbours
        check_equal_to_brute(x, g, k)


def test_exact_graph_ties_and_dead_rows(rng):
    # duplicated points (exact ties) and NaN (dead) rows
    base = rng.integers(0, 3, size=(40, 3)).astype(np.float32)  # a small grid: many equal distances
    x = np.concatenate([base, base[:10]])
    x[[3, 17]] = np.nan
    g = nbm.build_graph(x, 6)
    check_equal_to_brute(np.where(np.isfinite(x), x, np.nan), g, 6)
    _, ref_d = nbm.brute_force_knn(np.nan_to_num(x, nan=1e6), 6)  # dead rows far away: never chosen
    live = np.isfinite(x).all(axis=1)
    np.testing.assert_allclose(g.distances[live], ref_d[live], rtol=1e-5, atol=1e-5)


def recall_at_setting(g, x, rows, setting, exact=None):
    """Each sampled row's recall@k when ``g``'s approximate index searches with ``setting`` (IVF nprobe or
    HNSW efSearch), a row with short probed lists counting its exact neighbours as the graph does."""
    index, k = g._index, g.k
    if g.method == "ivf":
        old, index.nprobe = index.nprobe, setting
    else:
        old, index.hnsw.efSearch = index.hnsw.efSearch, max(setting, k + 1)
    try:
        d2, ids = index.search(x[rows], k + 1)
    finally:
        if g.method == "ivf":
            index.nprobe = old
        else:
            index.hnsw.efSearch = old
    if exact is None:
        _, exact = nbm.brute_force_knn(x, k, queries=rows)
    not_self = np.argsort(ids == np.asarray(rows)[:, None], axis=1, kind="stable")[:, :k]  # self (if found) last
    found = np.sqrt(np.maximum(np.take_along_axis(d2, not_self, axis=1), 0))
    short = (ids < 0).any(axis=1)
    found[short] = exact[short]
    return nbm.recall_per_query(found, exact)


def bernstein_margin(n_sample, variance, delta):
    """t with P(sample mean - population mean >= t) <= delta for a sample of values in [0, 1] drawn without
    replacement from a population of this variance (Bernstein's inequality; drawing without replacement is at
    least as concentrated, Hoeffding 1963 Thm 4). No normal approximation."""
    lg = math.log(1 / delta)
    return (lg / 3 + math.sqrt(lg * lg / 9 + 2 * n_sample * variance * lg)) / n_sample


def check_recall_rule(x, g, seed, start, target=nbm.RECALL_TARGET):
    """build_graph's recall bookkeeping and stopping rule, against the exact search of every row.

    The sample is a seeded draw, so these checks are exact: the recorded recall and bound are the finished
    graph's on the sampled rows, they reach the target, and one step less did not. That the *whole* graph
    reaches the target is a confidence statement (97.7%: test_stopping_rule_confidence_at_the_target);
    here it gets a bound that a correct graph breaks less than once in 1e8 runs."""
    _, ref_d = nbm.brute_force_knn(x, g.k)
    per_all = nbm.recall_per_query(g.distances, ref_d)
    sample = nbm.recall_sample_positions(len(x), g.thresholds["recall_sample"], seed)
    assert g.recall_sample == sample.size
    assert g.recall == pytest.approx(per_all[sample].mean(), abs=1e-9)
    assert g.recall_lower == pytest.approx(nbm.recall_lower_bound(per_all[sample]), abs=1e-9)
    assert g.recall_lower >= target
    knob = "nprobe" if g.method == "ivf" else "efSearch"
    if g.params[knob] > start:  # the least widening that passes: half the setting fails the rule
        assert nbm.recall_lower_bound(recall_at_setting(g, x, sample, g.params[knob] // 2)) < target
    rec_all = float(per_all.mean())
    margin = bernstein_margin(sample.size, per_all.var(), 1e-9)  # x 13 settings at most: < 1.3e-8
    assert rec_all >= g.recall - margin, (rec_all, g.recall, margin, g.params)
    return rec_all


def test_approximate_graph_recall_against_brute_force(rng):
    x = clustered(rng, 5000, d=16, clusters=60)
    g = nbm.build_graph(x, 10, exact_max_rows=1000, recall_sample=500, seed=1)
    assert g.method == "ivf" and g.recall >= g.recall_lower >= 0.95
    # the stopping rule is about every row, not only the sample: check all 5,000 against brute force
    check_recall_rule(x, g, seed=1, start=2)
    assert not (g.ids == np.arange(len(x))[:, None]).any() and (g.ids >= 0).all()
    doc = g.to_dict()
    assert doc["thresholds"]["exact_max_rows"] == 1000 and doc["params"]["nlist"] >= 64
    # HNSW by name follows the same rule
    h = nbm.build_graph(x[:2000], 10, method="hnsw", recall_sample=300)
    assert h.method == "hnsw"
    check_recall_rule(x[:2000], h, seed=0, start=32)


def test_stopping_rule_confidence_at_the_target(rng):
    """The rule's worst case: the whole graph's recall at one nprobe sits just under the target, so accepting
    that nprobe is its only possible error; it must happen in about 1 - Phi(2) = 2.3% of samples. Measured on
    60 graphs (4,000 samples each): 1.8-2.8%, mean 2.24%, both at recall 0.94-0.96 and at 0.996-0.999 (rare
    misses), where the plain normal bound (mean - 2 standard errors) gave means of 2.97% and 4.07%. The bounds
    below are 6 binomial standard deviations from 2.24%; rows are drawn with replacement, as from a graph much
    larger than its sample."""
    x = clustered(rng, 5000, d=16, clusters=60)
    g = nbm.build_graph(x, 10, exact_max_rows=1000, recall_sample=500, seed=1)
    everyone = np.arange(len(x))
    _, exact = nbm.brute_force_knn(x, 10)
    per = {p: recall_at_setting(g, x, everyone, p, exact) for p in (1, 2, 4, 8)}
    mean = {p: v.mean() for p, v in per.items()}
    usual = min(mean, key=lambda p: abs(mean[p] - 0.95))  # the default target's regime
    rare = min((p for p in mean if mean[p] <= 0.999), key=lambda p: abs(mean[p] - 0.998))  # rare misses
    for level in dict.fromkeys((usual, rare)):
        target = mean[level] + 1e-9  # just above: accepting `level` is the only possible error
        # enough rows that a perfect sample could certify twice the target's miss share (build_graph refuses less)
        n_rows = max(1000, math.ceil(8 / (1 - target)))
        assert nbm.max_certifiable_recall(n_rows) > target
        trials = 10_000
        accepted = sum(nbm.recall_lower_bound(per[level][rng.integers(0, len(x), n_rows)]) >= target
                       for _ in range(trials))
        assert 0.012 <= accepted / trials <= 0.032, (level, mean[level], n_rows, accepted / trials)


def test_filtered_search_exact_and_approximate(rng):
    x = clustered(rng, 4000, d=8, clusters=30)
    g = nbm.build_graph(x, 10, exact_max_rows=500, recall_sample=300)
    cand = rng.random(4000) < 0.6
    q = np.arange(0, 4000, 13)
    ids, dist, counts = g.search(q, 5, candidates=cand)
    assert cand[ids].all() and (counts == 5).all()
    sub = np.flatnonzero(cand)
    ref_d = np.sqrt(((x[q, None, :].astype(np.float64) - x[None, sub, :]) ** 2).sum(-1))
    ref_d[q[:, None] == sub[None, :]] = np.inf
    ref_d = np.sort(ref_d, axis=1)[:, :5]
    assert nbm.recall_at_k(dist, ref_d) >= 0.95
    h = nbm.build_graph(x[:1000], 10, method="hnsw", exact_max_rows=100, recall_sample=200)
    hq = q[q < 1000]
    ids, dist, counts = h.search(hq, 5, candidates=cand[:1000])
    sub = np.flatnonzero(cand[:1000])
    ref_h = np.sqrt(((x[hq, None, :].astype(np.float64) - x[None, sub, :]) ** 2).sum(-1))
    ref_h[hq[:, None] == sub[None, :]] = np.inf
    assert cand[ids].all() and nbm.recall_at_k(dist, np.sort(ref_h, axis=1)[:, :5]) >= 0.95
    small = np.zeros(4000, bool)
    small[:300] = True  # few candidates: an exact flat search over them
    ids, dist, counts = g.search(q, 5, candidates=small, exclude_self=False)
    ref = np.sort(np.sqrt(((x[q, None, :].astype(np.float64) - x[None, :300, :]) ** 2).sum(-1)), axis=1)[:, :5]
    np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-4)


def test_space_graph_is_shared_saved_and_matches_knn(rng, tmp_path):
    u = clustered(rng, 300, d=6, clusters=5)
    sp = UnifiedSpace(u)
    for e in range(3):
        sp.add("a", e, rng.integers(0, 300, size=(50, 4)))
    g = sp.neighbour_graph(k=8)
    assert sp.neighbour_graph(k=5) is g  # computed once, consumers slice
    nb, dist, _ = sp.knn(np.arange(len(sp)), 8)
    np.testing.assert_allclose(g.distances, dist, rtol=1e-5, atol=1e-5)
    sp.save(tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "neighbours.json").read_text())
    assert doc["method"] == "exact" and doc["recall_at_k"] == 1.0 and doc["k"] == 8
    back = UnifiedSpace.load(tmp_path / "s")
    g2 = back.neighbour_graph(k=8)
    assert np.array_equal(g2.ids, g.ids)
    ids, _, _ = g2.search(np.arange(10), 3, candidates=back.mask({"epoch": 1}))
    assert np.array_equal(ids, back.knn(np.arange(10), 3, within={"epoch": 1})[0])
    sp.add("a", 9, rng.integers(0, 300, size=(5, 4)))
    assert sp.neighbour_graph(k=8) is not g  # new rows: recomputed


def test_errors():
    with pytest.raises(EmbeddingError):
        nbm.build_graph(np.zeros((4, 2), np.float32), 0)
    with pytest.raises(EmbeddingError):
        nbm.choose_method(10, "lsh")


def test_recall_lower_bound_against_a_plain_formula(rng):
    """recall_per_query / recall_lower_bound against a by-hand computation, ties and empty rows included."""
    e = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [np.nan, np.nan, np.nan], [0.5, 2.0, np.nan]])
    a = np.array([[1.0, 2.0, 9.0], [1.0, 1.0, 1.0], [np.nan, np.nan, np.nan], [0.5, 7.0, np.nan]])
    per = nbm.recall_per_query(a, e)
    np.testing.assert_allclose(per, [2 / 3, 1.0, 1 / 2])  # the query with no exact neighbour is left out
    assert nbm.recall_at_k(a, e) == pytest.approx(np.mean([2 / 3, 1.0, 1 / 2]))
    for v in (rng.uniform(0.8, 1.0, size=777), rng.integers(8, 11, size=500) / 10, np.r_[np.ones(99), 0.9]):
        miss = 1 - v
        p, n = miss.mean(), v.size
        n_eff = n * p * (1 - p) / miss.var(ddof=1)  # coin flips worth the sample's information
        # Wilson's upper score limit for a proportion p out of n_eff, z = 2, written out
        upper = (p + 2 / n_eff + 2 * np.sqrt(p * (1 - p) / n_eff + 1 / n_eff**2)) / (1 + 4 / n_eff)
        # ... never above what a perfect sample certifies (one 0.1 miss in 100 would claim 0.994 otherwise)
        assert nbm.recall_lower_bound(v) == pytest.approx(min(1 - upper, 1 - 4 / (n + 4)), rel=1e-12)
    assert nbm.recall_lower_bound(np.r_[np.ones(99), 0.9]) == pytest.approx(1 - 4 / 104)
    # no spread: a coin-flip sample of n; a perfect sample certifies 1 - z^2 / (n + z^2)
    assert nbm.recall_lower_bound(np.ones(1000)) == pytest.approx(1 - 4 / 1004) == nbm.max_certifiable_recall(1000)
    assert nbm.recall_lower_bound(np.zeros(50)) == 0.0
    assert nbm.recall_lower_bound(np.array([0.9])) == 0.9 and nbm.recall_lower_bound(np.array([])) == 1.0


def test_a_target_the_sample_cannot_certify_is_refused(rng):
    x = clustered(rng, 5000, d=4, clusters=5)
    with pytest.raises(EmbeddingError, match="raise recall_sample to at least 3,996"):
        nbm.build_graph(x, 5, exact_max_rows=100, recall_target=0.999, recall_sample=300)
    x = x[:600]
    with pytest.raises(EmbeddingError, match="lower the target"):
        nbm.build_graph(x, 5, exact_max_rows=100, recall_target=1.0)
    assert nbm.build_graph(x, 5, exact_max_rows=1000, recall_target=1.0).method == "exact"  # exact: no sample


def test_rows_with_short_probed_lists_are_searched_exactly(rng):
    """One probe into 300 lists of about 10 rows leaves many rows with fewer than k candidates: those rows are
    searched exactly, so every row still gets k neighbours (never itself), equal to brute force."""
    x = clustered(rng, 3000, d=8, clusters=40)
    g = nbm.build_graph(x, 10, exact_max_rows=100, recall_target=0.0, params={"nlist": 300, "nprobe": 1}, seed=3)
    assert g.method == "ivf" and g.params["nprobe"] == 1
    assert (g.ids >= 0).all() and not (g.ids == np.arange(len(x))[:, None]).any()
    n_refill = g.params["exact_refill_rows"]
    assert n_refill > 0  # this setting does leave rows short
    _, ref_d = nbm.brute_force_knn(x, 10)
    assert np.isfinite(g.distances).all()
    # every row's found distances are true distances to real rows, and at least the exact k-th
    true = np.linalg.norm(x[:, None, :].astype(np.float64) - x[g.ids].astype(np.float64), axis=-1)
    np.testing.assert_allclose(g.distances, true, rtol=1e-4, atol=1e-4)
    assert (g.distances[:, -1] >= ref_d[:, -1] - 1e-4).all()

"""The one neighbour graph: exact path = NumPy brute force, approximate path recall, save/load, sharing."""
import json

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


def test_approximate_graph_recall_against_brute_force(rng):
    x = clustered(rng, 5000, d=16, clusters=60)
    g = nbm.build_graph(x, 10, exact_max_rows=1000, recall_sample=500, seed=1)
    assert g.method == "ivf" and g.recall >= g.recall_lower >= 0.95
    # the stopping rule is about every row, not only the sample: check all 5,000 against brute force
    _, ref_d = nbm.brute_force_knn(x, 10)
    rec = nbm.recall_at_k(g.distances, ref_d)
    assert rec >= 0.95, (rec, g.recall, g.recall_lower, g.params)
    assert not (g.ids == np.arange(len(x))[:, None]).any() and (g.ids >= 0).all()
    doc = g.to_dict()
    assert doc["thresholds"]["exact_max_rows"] == 1000 and doc["params"]["nlist"] >= 64
    # HNSW by name reaches the target as well
    h = nbm.build_graph(x[:2000], 10, method="hnsw", recall_sample=300)
    ref_ids, ref_d = nbm.brute_force_knn(x[:2000], 10, queries=np.arange(0, 2000, 5))
    assert h.recall >= 0.95 and nbm.recall_at_k(h.distances[::5], ref_d) >= 0.95


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
    v = rng.uniform(0.8, 1.0, size=777)
    by_hand = v.mean() - 2.0 * np.sqrt(((v - v.mean()) ** 2).sum() / (v.size - 1)) / np.sqrt(v.size)
    assert nbm.recall_lower_bound(v) == pytest.approx(by_hand, rel=1e-12)
    assert nbm.recall_lower_bound(np.array([0.9])) == 0.9 and nbm.recall_lower_bound(np.array([])) == 1.0


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

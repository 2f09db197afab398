"""UnifiedSpace: fit, projection, registry, tables, FAISS kNN / k-means, layouts, save/load."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conceptevo import image_embedding as ie
from conceptevo.errors import EmbeddingError
from conceptevo.space import UnifiedSpace, stimuli_arrays
from conceptevo.stimuli import LayerStimuli, Stimuli


def make_stimuli(rng, channels, num_images, k=5, k_i=3, pool=None, dead=()):
    """A Stimuli with random distinct ids (drawn from ``pool`` if given) and random responsive channels."""
    layers = {}
    pool = np.arange(num_images) if pool is None else np.asarray(pool)
    for li, c in enumerate(channels):
        ids = np.stack([rng.choice(pool, k, replace=False) for _ in range(c)]).astype(np.int64)
        resp = np.stack([rng.choice(c, min(k_i, c), replace=False) for _ in range(num_images)])
        resp = resp.astype(np.int32)
        z = np.zeros((c, k), np.float32)
        layers[f"features.{3 * li}"] = LayerStimuli(ids, z, z.astype(np.int32), z.astype(np.int32), resp,
                                                    np.zeros(resp.shape, np.float32))
    for layer, ch in dead:
        layers[layer].ids[ch] = -1
    return Stimuli(layers, num_images)


def clustered_space(rng, n_clusters=4, per=40, d=6, num_images=400, k=5, models=("a", "b"), epochs=(0, 1)):
    """Image vectors in well-separated clusters; neurons draw stimuli from one cluster's images."""
    label = rng.integers(0, n_clusters, num_images)
    centres = np.eye(d)[:n_clusters] * 20  # far apart: every reasonable method must separate them
    u = (centres[label] + rng.normal(size=(num_images, d))).astype(np.float32)
    space = UnifiedSpace(u)
    truth = []
    for m in models:
        for e in epochs:
            pref = rng.integers(0, n_clusters, per)
            s = np.stack([rng.choice(np.flatnonzero(label == p), k, replace=False) for p in pref])
            space.add(m, e, s)
            truth.append(pref)
    return space, np.concatenate(truth), label


# ----------------------------------------------------------------------------- fit
def test_fit_end_to_end(rng):
    base = make_stimuli(rng, [12, 20, 9], 150, dead=[("features.3", 4)])
    sp = UnifiedSpace.fit(base, model="vgg", epoch=7, dim=8, repeats=3, epochs=3, threads=1, progress=False)
    assert sp.image_vectors.shape == (150, 8) and np.isfinite(sp.image_vectors).all()
    assert sp.checkpoints == [("vgg", 7)] and sp.base_key == ("vgg", 7)
    info = sp.info["image_embedding"]
    assert info["n_constrained_images"] + info["n_unconstrained"] + info["n_fallback"] == 150
    assert info["n_neurons_empty"] == 1
    # base rows hold the learned vectors, except the dead neuron (no stimuli -> NaN)
    keys = sp.keys()
    dead = int(np.flatnonzero((keys.layer == "features.3") & (keys.channel == 4))[0])
    assert dead == 12 + 4 and not keys.valid[dead] and keys.valid.sum() == 40
    np.testing.assert_array_equal(np.delete(sp.vectors, dead, 0), np.delete(sp.base_vectors, dead, 0))
    # same seed, one thread: the same space
    sp2 = UnifiedSpace.fit(base, model="vgg", epoch=7, dim=8, repeats=3, epochs=3, threads=1, progress=False)
    np.testing.assert_array_equal(sp.image_vectors, sp2.image_vectors)
    # re-adding the base's own stimuli (a loop over every checkpoint) keeps the learned rows
    np.testing.assert_array_equal(sp.add("vgg", 7, base, replace=True), np.arange(41))
    assert sp.checkpoints == [("vgg", 7)]
    with pytest.raises(EmbeddingError, match="base checkpoint"):
        sp.add("vgg", 7, make_stimuli(rng, [12, 20, 9], 150), replace=True)
    # projecting the base itself lands each neuron at its (ridge) least-squares approximation,
    # computed here densely: A_c A_c^T (A_c A_c^T + ridge I)^-1 V over the neurons with stimuli
    proj = sp.project(base)
    s, *_ = stimuli_arrays(base)
    alive = (s >= 0).any(axis=1)
    expected = dense_ridge_projection(s[alive], sp.base_vectors[alive], 150, sp.params["ridge"])
    assert np.isnan(proj[~alive]).all()
    np.testing.assert_allclose(proj[alive], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # the report's fit RMSE is this in-sample residual; the held-out measure is recorded beside it
    resid = expected - sp.base_vectors[alive]
    assert info["rmse"] == pytest.approx(np.sqrt(np.mean(resid**2)), rel=1e-3)
    assert sp.info["holdout"]["n_neurons"] == 4 and sp.summary()["holdout"] == sp.info["holdout"]


def dense_ridge_fit(stim, v, num_images, ridge):
    """Oracle, dense NumPy: (U, A) with A[i, x] = 1/k_i and U = argmin ||A U - V||^2 + ridge ||U||^2
    (U = A^T (A A^T + ridge I)^-1 V, zero for images no neuron chose)."""
    a = np.zeros((len(stim), num_images))
    for i, ids in enumerate(stim):
        ids = ids[ids >= 0]
        for x in ids:
            a[i, x] += 1.0 / len(ids)
    u = a.T @ np.linalg.solve(a @ a.T + ridge * np.eye(len(a)), v.astype(np.float64))
    return u, a


def dense_ridge_projection(stim, v, num_images, ridge):
    u, a = dense_ridge_fit(stim, v, num_images, ridge)
    return a @ u


def test_holdout_error_against_a_dense_oracle(rng):
    """Held-out neurons are left out of the fit and projected: check against a dense solve without them."""
    from conceptevo.space import holdout_error

    n_img, k, d = 30, 4, 5
    stim = np.stack([rng.choice(n_img, k, replace=False) for _ in range(120)]).astype(np.int64)
    v = rng.normal(size=(120, d))
    res = holdout_error(stim, v, n_img, fraction=0.2, seed=3, ridge=1e-3)
    held = np.asarray(res["neurons"])
    assert res["n_neurons"] == len(held) == 24 and len(set(held)) == 24
    kept = np.setdiff1d(np.arange(120), held)
    # every image is chosen by some kept neuron here (120 x 4 draws over 30 images), so no placement rule is involved
    assert set(np.unique(stim[kept])) == set(range(n_img))
    u, _ = dense_ridge_fit(stim[kept], v[kept], n_img, 1e-3)
    a_held = np.zeros((len(held), n_img))
    for i, ids in enumerate(stim[held]):
        a_held[i, ids] += 1.0 / k
    err = a_held @ u - v[held]
    assert res["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-4)
    assert res["rel_rmse"] == pytest.approx(res["rmse"] / np.sqrt(np.mean(v[held] ** 2)), rel=1e-9)
    # random vectors cannot be predicted from other neurons; vectors that are means of image vectors can
    assert 0.5 < res["rel_rmse"] < 2.0
    u_true = rng.normal(size=(n_img, d))
    a_all = np.zeros((120, n_img))
    for i, ids in enumerate(stim):
        a_all[i, ids] += 1.0 / k
    consistent = holdout_error(stim, a_all @ u_true, n_img, fraction=0.2, seed=3, ridge=1e-6)
    assert consistent["rel_rmse"] < 1e-3
    assert holdout_error(stim[:5], v[:5], n_img) is None  # too few neurons to leave any out
    with pytest.raises(EmbeddingError, match="holdout"):
        holdout_error(stim, v, n_img, fraction=1.5)


def test_fit_no_shared_images_is_an_error(rng):
    # 10 neurons x 3 stimuli over 30 images, every image used once: no co-activated pairs.
    s = rng.permutation(30).reshape(10, 3).astype(np.int64)
    with pytest.raises(EmbeddingError, match="no image is among the stimuli of two"):
        UnifiedSpace.fit(s, num_images=30, progress=False)


def test_fit_accepts_plain_arrays(rng):
    s = np.stack([rng.choice(20, 4, replace=False) for _ in range(15)])
    sp = UnifiedSpace.fit(s, num_images=20, dim=4, repeats=2, epochs=2, threads=1, progress=False)
    assert sp.num_images == 20 and len(sp) == 15
    assert set(sp.keys().layer) == {""} and list(sp.keys().channel) == list(range(15))


# ----------------------------------------------------------------------------- registry
def test_add_project_and_tables(rng):
    u = rng.normal(size=(80, 5)).astype(np.float32)
    sp = UnifiedSpace(u)
    st = make_stimuli(rng, [6, 4], 80, dead=[("features.0", 2)])
    rows = sp.add("m", 3, st)
    np.testing.assert_array_equal(rows, np.arange(10))
    rows2 = sp.add("m", 4, make_stimuli(rng, [6, 4], 80))
    np.testing.assert_array_equal(rows2, np.arange(10, 20))
    s, *_ = stimuli_arrays(st)
    np.testing.assert_array_equal(sp.vectors[:10], ie.project(s, u), strict=False)
    emb = sp.embeddings()
    assert list(emb.columns) == ["model", "epoch", "layer", "channel", "neuron", "vector", "valid", "x", "y"]
    assert emb.x.isna().all()  # no layout yet
    assert emb.loc[12, "layer"] == "features.0" and emb.loc[16, "layer"] == "features.3"
    assert emb.loc[16, "channel"] == 0 and emb.loc[16, "neuron"] == 6
    np.testing.assert_array_equal(np.stack(emb.vector), sp.vectors)
    assert not emb.valid[2] and emb.valid.sum() == 19
    assert sp.find("m", 4, "features.3", 1) == 17
    np.testing.assert_array_equal(sp.rows(epoch=4, layer="features.3"), [16, 17, 18, 19])
    with pytest.raises(EmbeddingError, match="already registered"):
        sp.add("m", 3, st)
    sp.add("m", 3, make_stimuli(rng, [6, 4], 80, dead=[("features.3", 1)]), replace=True)
    assert sp.checkpoints == [("m", 4), ("m", 3)]
    with pytest.raises(EmbeddingError, match="index 81 images"):
        sp.add("x", 0, Stimuli(st.layers, 81))
    with pytest.raises(EmbeddingError, match="no neuron layer='nope'"):
        sp.find("m", 4, "nope", 0)
    summ = sp.summary()
    assert summ["rows"] == 20 and [c["dead"] for c in summ["checkpoints"]] == [0, 1]


# ----------------------------------------------------------------------------- neighbours
def brute_knn(x, q_rows, cand, k, metric, exclude_self=True):
    out = []
    for q in q_rows:
        c = [j for j in cand if not (exclude_self and j == q)]
        if metric == "l2":
            dist = np.sqrt(((x[c].astype(np.float64) - x[q]) ** 2).sum(1))
        else:
            a = x[c] / np.linalg.norm(x[c], axis=1, keepdims=True)
            b = x[q] / np.linalg.norm(x[q])
            dist = 1 - a.astype(np.float64) @ b
        order = np.argsort(dist, kind="stable")[:k]
        out.append((np.asarray(c)[order], dist[order]))
    return out


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_neighbors_equal_brute_force(rng, metric):
    u = rng.normal(size=(300, 7)).astype(np.float32)
    sp = UnifiedSpace(u)
    for m, e in [("a", 0), ("a", 1), ("b", 0)]:
        s = rng.integers(-1, 300, size=(37, 4))
        s[rng.random(37) < 0.1] = -1  # some dead neurons
        sp.add(m, e, s)
    x, valid = sp.vectors, sp.valid
    live = np.flatnonzero(valid)
    q = rng.choice(live, 12, replace=False)
    within = {"model": "a"}
    k = int(rng.integers(1, 9))
    res = sp.neighbors(q, k=k, within=within, metric=metric)
    cand = [j for j in np.flatnonzero(sp.mask(within)) if valid[j]]
    ref = brute_knn(x, q, cand, k, metric)
    for i, qq in enumerate(q):
        got = res[res["query"] == qq].sort_values("rank")
        np.testing.assert_array_equal(got["rank"], np.arange(1, len(ref[i][0]) + 1))
        np.testing.assert_allclose(got["distance"], ref[i][1], rtol=1e-4, atol=1e-4)
        # identical rows unless two candidates are (numerically) tied
        gaps = np.diff(ref[i][1])
        if len(gaps) == 0 or gaps.min() > 1e-4:
            np.testing.assert_array_equal(got["row"], ref[i][0])
        assert qq not in set(got["row"])
    keys = sp.keys()
    np.testing.assert_array_equal(res["model"], keys.model.to_numpy()[res["row"]])
    np.testing.assert_array_equal(res["channel"], keys.channel.to_numpy()[res["row"]])


def test_knn_matrix_form_matches_neighbors(rng):
    sp = UnifiedSpace(rng.normal(size=(120, 5)).astype(np.float32))
    sp.add("a", 0, rng.integers(0, 120, size=(25, 3)))
    sp.add("b", 0, rng.integers(0, 120, size=(4, 3)))
    rows = np.arange(25)
    nb, dist, counts = sp.knn(rows, 6, within={"model": "b"})
    assert nb.shape == dist.shape == (25, 6) and (counts == 4).all()  # only 4 candidates
    assert (nb[:, 4:] == -1).all() and np.isnan(dist[:, 4:]).all()
    assert np.all(np.diff(dist[:, :4], axis=1) >= 0)
    df = sp.neighbors(rows, k=6, within={"model": "b"})
    np.testing.assert_array_equal(df["row"].to_numpy(), nb[:, :4].ravel())
    np.testing.assert_allclose(df["distance"].to_numpy(), dist[:, :4].ravel())


def test_neighbors_keys_small_candidate_sets_and_dead_queries(rng):
    u = rng.normal(size=(50, 3)).astype(np.float32)
    sp = UnifiedSpace(u)
    sp.add("a", 0, np.array([[0, 1], [2, -1], [-1, -1], [3, 4]]))
    sp.add("b", 0, np.array([[5, 6], [7, 8]]))
    res = sp.neighbors(("a", 0, "", 0), k=10, within={"model": "a"})
    assert len(res) == 2 and set(res["row"]) == {1, 3}  # 3 live rows in "a" minus itself
    res = sp.neighbors([("a", 0, "", 0), ("b", 0, "", 1)], k=1)
    assert list(res["query"]) == [0, 5]
    with pytest.raises(EmbeddingError, match="dead neuron"):
        sp.neighbors(2, k=3)
    with pytest.raises(EmbeddingError, match="out of range"):
        sp.neighbors(99)
    with pytest.raises(EmbeddingError, match="k must be"):
        sp.neighbors(0, k=0)
    # exclude_self=False: a query finds itself at distance 0
    res = sp.neighbors(0, k=1, exclude_self=False)
    assert res["row"].tolist() == [0] and res["distance"].iloc[0] == pytest.approx(0, abs=1e-3)


def test_neighbors_with_duplicate_vectors_never_return_self(rng):
    u = np.zeros((10, 4), np.float32)
    sp = UnifiedSpace(u + 1)
    sp.add("a", 0, np.zeros((6, 2), np.int64))  # six identical neurons: all ties at distance 0
    res = sp.neighbors(np.arange(6), k=5)
    for q in range(6):
        got = set(res[res["query"] == q]["row"])
        assert got == set(range(6)) - {q}


# ----------------------------------------------------------------------------- groups
def test_groups_assign_to_nearest_centroid_and_recover_clusters(rng):
    sp, truth, _ = clustered_space(rng)
    labels = sp.groups(4, seed=3)
    assert labels.shape == (len(sp),) and labels.min() >= 0
    c = sp.group_centroids
    d = ((sp.vectors[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d.argmin(1))
    # well separated planted groups are found exactly (up to renaming)
    table = pd.crosstab(truth, labels)
    assert ((table > 0).sum(axis=1) == 1).all()
    np.testing.assert_array_equal(sp.groups(4, seed=3), labels)  # seeded
    part = sp.groups(2, within={"model": "a"})
    assert (part[sp.rows(model="b")] == -1).all() and (part[sp.rows(model="a")] >= 0).all()
    with pytest.raises(EmbeddingError, match="n_clusters"):
        sp.groups(10**6)
    # k-means++ starts: random-row starts merged two planted groups in 6 of 300 such sets
    for _ in range(25):
        sp2, truth2, _ = clustered_space(rng, n_clusters=int(rng.integers(2, 7)))
        t2 = pd.crosstab(truth2, sp2.groups(len(np.unique(truth2)), seed=int(rng.integers(100))))
        assert ((t2 > 0).sum(axis=1) == 1).all() and ((t2 > 0).sum(axis=0) == 1).all()


# ----------------------------------------------------------------------------- layouts
def test_layout_pca_equals_numpy_and_cache_invalidation(rng):
    sp = UnifiedSpace(rng.normal(size=(60, 5)).astype(np.float32))
    s = rng.integers(0, 60, size=(30, 3))
    s[4] = -1
    sp.add("a", 0, s)
    xy = sp.layout_2d("pca")
    valid = sp.valid
    assert np.isnan(xy[4]).all() and np.isfinite(xy[valid]).all()
    x = sp.vectors[valid].astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    ref = x @ vt[:2].T
    np.testing.assert_allclose(np.abs(xy[valid]), np.abs(ref), rtol=1e-4, atol=1e-4)
    assert sp.layout_params["backend"] == "numpy"
    sp.add("a", 1, s)
    assert sp.layout is None  # rows changed: the one-fit map must be recomputed
    with pytest.raises(EmbeddingError, match="unknown layout method"):
        sp.layout_2d("tsne")


@pytest.mark.slow  # umap-learn JIT-compiles on its first call in a process (15-60 s on 2 cores)
def test_layout_umap_small_real_run(rng):
    pytest.importorskip("umap")
    sp, truth, _ = clustered_space(rng, n_clusters=3, per=30, epochs=(0,))
    sp.add("dead", 0, np.full((2, 5), -1))
    xy = sp.layout_2d(seed=0, n_neighbors=10, n_epochs=60, backend="cpu")
    valid = sp.valid
    assert xy.shape == (len(sp), 2) and np.isnan(xy[~valid]).all() and np.isfinite(xy[valid]).all()
    assert sp.backends["layout"] == "umap-learn"
    # planted clusters stay apart in 2-D: each point's nearest 2-D neighbour is in its cluster
    p = xy[valid]
    d = ((p[:, None] - p[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (truth[d.argmin(1)] == truth).mean() > 0.95
    again = sp.layout_2d(seed=0, n_neighbors=10, n_epochs=60, backend="cpu")  # cached, not refitted
    np.testing.assert_array_equal(again, xy)


def test_layout_sample_holds_the_base_and_is_stratified(rng):
    from conceptevo.space import _water_fill

    assert _water_fill(np.array([5, 100, 100]), 65).tolist() == [5, 30, 30]
    assert _water_fill(np.array([3, 3, 3]), 100).tolist() == [3, 3, 3]
    assert _water_fill(np.array([10, 10, 10]), 2).tolist() == [1, 1, 0]
    base = np.argsort(rng.random((40, 50)), axis=1)[:, :4]  # distinct images per neuron
    sp = UnifiedSpace.fit(base, num_images=50, dim=4, repeats=2, epochs=1, model="a", epoch=9)
    for e in range(6):
        sp.add("a" if e < 3 else "b", e, rng.integers(0, 50, size=(40 if e else 7, 4)))
    pick = sp._layout_sample(sp.valid, 100, seed=0)
    keys = sp.keys().iloc[pick]
    assert len(pick) == 100 and (keys["epoch"] == 9).sum() == 40  # the whole base
    per = keys[keys["epoch"] != 9].groupby(["model", "epoch"]).size()
    assert per[("a", 0)] == 7 and per.drop(("a", 0)).between(10, 11).all()  # equal shares, small one full
    assert np.array_equal(pick, sp._layout_sample(sp.valid, 100, seed=0))  # seeded


@pytest.mark.parametrize("transform", ["knn", "umap"])
def test_layout_sampled_fit_then_transform(rng, transform):
    pytest.importorskip("umap")
    sp, truth, _ = clustered_space(rng, n_clusters=3, per=40, epochs=(0, 1))
    xy = sp.layout_2d(seed=0, n_neighbors=10, n_epochs=60, backend="cpu", full_fit_max_rows=100,
                      sample_rows=60, transform=transform)
    lp = sp.layout_params
    assert lp["sampled"] and lp["sample_rows"] == 60 and lp["transformed_rows"] == len(sp) - 60
    assert "60 sampled" in lp["description"] and np.isfinite(xy).all()
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (truth[d.argmin(1)] == truth).mean() > 0.9  # planted clusters stay apart after the transform
    if transform == "knn":  # seeded sample + deterministic placement: the same map again
        sp._layout = None
        again = sp.layout_2d(seed=0, n_neighbors=10, n_epochs=60, backend="cpu", full_fit_max_rows=100,
                             sample_rows=60, transform=transform)
        np.testing.assert_array_equal(again, xy)


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(rng, tmp_path):
    base = make_stimuli(rng, [10, 14], 120)
    sp = UnifiedSpace.fit(base, model="base", epoch=5, dim=6, repeats=2, epochs=2, threads=1, progress=False)
    sp.add("base", 1, make_stimuli(rng, [10, 14], 120, k=3, dead=[("features.0", 0)]))
    sp.add("other", 5, make_stimuli(rng, [10, 14], 120))
    sp.layout_2d("pca")
    sp.groups(3)
    sp.save(tmp_path / "space")
    assert not list((tmp_path / "space").glob("*.pkl"))
    back = UnifiedSpace.load(tmp_path / "space")
    np.testing.assert_array_equal(back.image_vectors, sp.image_vectors)
    np.testing.assert_array_equal(back.base_vectors, sp.base_vectors)
    np.testing.assert_array_equal(back.vectors, sp.vectors)
    np.testing.assert_array_equal(back.layout, sp.layout)
    pd.testing.assert_frame_equal(back.keys(), sp.keys())
    assert back.checkpoints == sp.checkpoints and back.base_key == sp.base_key
    np.testing.assert_array_equal(back.stimuli("base", 1), sp.stimuli("base", 1))
    assert back.stimuli("base", 1).shape[1] == 3
    assert back.info == sp.info
    assert back.params == sp.params and back.backends == sp.backends
    # the loaded space keeps working: same projection, same neighbours
    other = make_stimuli(rng, [10, 14], 120)
    np.testing.assert_array_equal(back.project(other), sp.project(other))
    pd.testing.assert_frame_equal(back.neighbors(3, k=4), sp.neighbors(3, k=4))
    with pytest.raises(EmbeddingError, match="no space.json"):
        UnifiedSpace.load(tmp_path)


def test_to_parquet(rng, tmp_path):
    sp, _, _ = clustered_space(rng, per=5, epochs=(0,))
    sp.add("c", 2, np.array([[-1] * 5, [0, 1, 2, 3, 4]]))
    path = sp.to_parquet(tmp_path / "emb.parquet")
    t = pq.read_table(path)
    assert t.column_names == ["model", "epoch", "layer", "channel", "neuron", "vector", "x", "y"]
    vtype = t.schema.field("vector").type
    assert pa.types.is_list(vtype) and vtype.value_type == pa.float32()
    df = t.to_pandas()
    np.testing.assert_array_equal(np.stack(df.vector), sp.vectors)
    assert df.x.isna().all()  # no layout yet
    sp.layout_2d("pca")
    df = pd.read_parquet(sp.to_parquet(tmp_path / "emb.parquet"))
    np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), sp.layout)
    assert df.model.tolist()[-2:] == ["c", "c"] and np.isnan(df.x.iloc[-2])

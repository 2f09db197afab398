"""Diagnostics (Sec. 4.5): entropy estimator, movement by hand, verdicts on constructed runs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conceptevo.diagnostics import (
    concept_diversity,
    diagnose,
    entropy_1d,
    epoch_table,
    knn_entropy,
    load_log,
    milestone_speed,
    neuron_movement,
)
from conceptevo.errors import DataError, EmbeddingError


# ----------------------------------------------------------------------- entropy
@pytest.mark.parametrize("method", ["ebrahimi", "vasicek"])
def test_entropy_on_known_distributions(method):
    rng = np.random.default_rng(1)
    n = 20000
    s, a, b, lam = 2.0, 1.0, 4.0, 2.0
    cases = [
        (rng.normal(0.0, s, n), 0.5 * math.log(2 * math.pi * math.e * s * s)),
        (rng.uniform(a, b, n), math.log(b - a)),
        (rng.exponential(1 / lam, n), 1 - math.log(lam)),
    ]
    for sample, truth in cases:
        assert entropy_1d(sample, method) == pytest.approx(truth, abs=0.02)


def test_entropy_shift_scale_and_degenerate_cases():
    rng = np.random.default_rng(2)
    x = rng.standard_cauchy(501)
    h = entropy_1d(x)
    # m-spacing estimators: shift invariant, scale equivariant (exp(H) is a spread).
    assert entropy_1d(3.5 * x - 7.0) == pytest.approx(h + math.log(3.5), abs=1e-9)
    assert entropy_1d(np.zeros(50)) == -math.inf  # every point coincides: complete collapse
    assert math.isnan(entropy_1d([1.0, 2.0, 3.0, 4.0]))  # too few points for a spacing estimate
    assert np.isfinite(entropy_1d([1.0, 2.0, 3.0, 4.0, 5.0]))
    with pytest.raises(EmbeddingError):
        entropy_1d([0.0, 1.0, np.nan, 2.0, 3.0])


def test_concept_diversity_is_mean_of_dimensions():
    rng = np.random.default_rng(3)
    rows = []
    for model in ("a", "b"):
        for epoch in (0, 3):
            xy = rng.normal(size=(300, 2)) * [1.0 + epoch, 0.5]
            rows.append(pd.DataFrame({"model": model, "epoch": epoch, "layer": "l", "channel": np.arange(300),
                                      "x": xy[:, 0], "y": xy[:, 1]}))
    emb = pd.concat(rows, ignore_index=True)
    div = concept_diversity(emb)
    assert len(div) == 4 and (div["n_neurons"] == 300).all()
    for _, r in div.iterrows():
        g = emb[(emb["model"] == r["model"]) & (emb["epoch"] == r["epoch"])]
        hx, hy = entropy_1d(g["x"]), entropy_1d(g["y"])
        assert r["entropy_x"] == hx and r["entropy_y"] == hy
        assert r["diversity"] == pytest.approx((hx + hy) / 2)


# ---------------------------------------------------------------------- movement
def hand_example() -> pd.DataFrame:
    """Model 'a', epochs 0, 2, 5; neuron (L2, 0) is absent at epoch 5; rows shuffled."""
    rows = [
        # epoch, layer, channel, vector, x, y
        (0, "L1", 0, (0, 0, 0), 0, 0), (0, "L1", 1, (1, 1, 1), 1, 0), (0, "L2", 0, (2, 0, 0), 0, 1),
        (2, "L1", 0, (3, 4, 0), 3, 4), (2, "L1", 1, (1, 1, 1), 1, 0), (2, "L2", 0, (2, 0, 2), 0, 3),
        (5, "L1", 0, (3, 4, 12), 3, 4), (5, "L1", 1, (1, 4, 5), 1, 1),
    ]
    df = pd.DataFrame([{"model": "a", "epoch": e, "layer": l, "channel": c, "vector": np.array(v, float),
                        "x": float(x), "y": float(y)} for e, l, c, v, x, y in rows])
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_movement_by_hand():
    mv = neuron_movement(hand_example(), "vector")
    assert mv[["epoch_from", "epoch_to"]].values.tolist() == [[0, 2], [2, 5]]
    # 0 -> 2: distances 5, 0, 2; 2 -> 5: distances 12, 5 (L2/0 is gone).
    np.testing.assert_allclose(mv["movement"], [7 / 3, 8.5])
    np.testing.assert_allclose(mv["movement_median"], [2.0, 8.5])
    assert mv["n_neurons"].tolist() == [3, 2]
    mv2 = neuron_movement(hand_example(), "xy")
    # 0 -> 2: 5, 0, 2; 2 -> 5: 0, 1.
    np.testing.assert_allclose(mv2["movement"], [7 / 3, 0.5])
    # A neuron that is dead (NaN vector and position) at epoch 2 counts nowhere.
    dead = pd.DataFrame([{"model": "a", "epoch": e, "layer": "L3", "channel": 0,
                          "vector": np.full(3, np.nan) if e == 2 else np.array([9.0, 9, 9 + e]),
                          "x": np.nan if e == 2 else 9.0, "y": 9.0} for e in (0, 2, 5)])
    with_dead = pd.concat([hand_example(), dead], ignore_index=True)
    pd.testing.assert_frame_equal(neuron_movement(with_dead, "vector"), mv)
    pd.testing.assert_frame_equal(neuron_movement(with_dead, "xy"), mv2)
    assert concept_diversity(with_dead)["n_dead"].tolist() == [0, 1, 0]


def test_milestone_speed_and_epoch_table_by_hand():
    emb = hand_example()
    log = pd.DataFrame({"epoch": [0, 1, 2, 3, 4, 5], "train_top1": [0.1, 0.2, 0.3, 0.4, 0.6, 0.7],
                        "test_top1": [0.1, 0.2, 0.25, 0.3, 0.4, 0.45]})
    sp = milestone_speed(emb, {"a": log})
    # Saved epochs 0, 2, 5 (acc 0.1, 0.3, 0.7): 0.25 -> epoch 2, 0.5 -> epoch 2 (0.3 is 0.2 away: unresolved
    # with tolerance 0.125), 0.75 -> epoch 5. One interval 0.25 -> 0.75 = epochs 2 -> 5.
    assert sp[["milestone_from", "milestone_to", "epoch_from", "epoch_to"]].values.tolist() == [
        ["0.25", "0.75", 2, 5]]
    assert sp["gain"].item() == pytest.approx(0.4)
    assert sp["movement_per_gain"].item() == pytest.approx(8.5 / 0.4)
    # Without any resolved interval the whole climb is used: start (epoch 0) -> peak (epoch 5).
    sp = milestone_speed(emb, {"a": log}, milestones=(0.9,))
    assert sp[["milestone_from", "milestone_to", "epoch_from", "epoch_to"]].values.tolist() == [
        ["start", "peak", 0, 5]]
    tab = epoch_table(emb, {"a": log})
    assert tab["epoch"].tolist() == [0, 2, 5]
    np.testing.assert_allclose(tab["movement"], [np.nan, 7 / 3, 8.5])
    np.testing.assert_allclose(tab["train_gain"], [np.nan, 0.2, 0.4])
    np.testing.assert_allclose(tab["movement_per_gain"], [np.nan, (7 / 3) / 0.2, 8.5 / 0.4])
    assert "test_top1" in tab and np.isnan(tab["diversity"]).all()  # 3 neurons: too few for entropy


# ---------------------------------------------------------------------- verdicts
def make_run(name, spreads, accs, cum, seed, n=400, d=8):
    """Neuron n at epoch e: vector v0_n + cum[e] * u_n (u_n unit), 2-D point spreads[e] * z_n."""
    rng = np.random.default_rng(seed)
    v0 = rng.normal(size=(n, d))
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    z = rng.normal(size=(n, 2))
    frames = []
    for e, (s, c) in enumerate(zip(spreads, cum)):
        v = v0 + c * u
        frames.append(pd.DataFrame({"model": name, "epoch": e, "layer": np.where(np.arange(n) < n // 2, "a", "b"),
                                    "channel": np.arange(n) % (n // 2), "x": s * z[:, 0], "y": s * z[:, 1],
                                    "vector": list(v)}))
    log = pd.DataFrame({"epoch": range(len(accs)), "train_top1": accs})
    return pd.concat(frames, ignore_index=True), log


RUNS = {
    "well": ([1, 1.3, 1.6, 1.8, 1.9], [0.1, 0.26, 0.5, 0.74, 0.8], [0, 1, 2, 3, 3.5]),
    "healthy": ([1, 1.2, 1.5, 1.9, 2.0], [0.1, 0.24, 0.52, 0.73, 0.82], [0, 1.1, 2.1, 3.1, 3.4]),
    "high_lr": ([1, 1.3, 1.2, 0.5, 0.3], [0.1, 0.27, 0.45, 0.2, 0.05], [0, 1, 2, 4, 6]),
    "overfit": ([1, 1.3, 1.6, 1.8, 1.9], [0.1, 0.25, 0.52, 0.76, 0.95], [0, 0.5, 1.0, 1.5, 1.7]),
    "shrinks_but_learns": ([1, 1.3, 1.2, 0.5, 0.4], [0.1, 0.26, 0.5, 0.74, 0.8], [0, 1, 2, 3, 3.5]),
    "diverse_but_falls": ([1, 1.3, 1.6, 1.8, 1.9], [0.1, 0.3, 0.5, 0.4, 0.2], [0, 1, 2, 3, 3.5]),
    # climbs, then falls while barely moving: slow per gain, but a fall is not overfitting
    "falls_and_stalls": ([1, 1.3, 1.6, 1.8, 1.9], [0.1, 0.25, 0.5, 0.75, 0.3], [0, 0.4, 0.8, 1.2, 1.3]),
    # the untrained epoch 0 is the widest; later epochs dip a little while accuracy falls
    "wide_init_dips": ([3, 1.3, 1.5, 1.7, 1.6], [0.1, 0.26, 0.5, 0.74, 0.6], [0, 1, 2, 3, 3.5]),
}


def diagnose_map(*args, **kw):
    """The constructed runs encode their diversity in the 2-D map: the paper's measure."""
    return diagnose(*args, measure="map", **kw)


@pytest.fixture(scope="module")
def runs():
    embs, logs = [], {}
    for i, (name, spec) in enumerate(RUNS.items()):
        e, lg = make_run(name, *spec, seed=i)
        embs.append(e)
        logs[name] = lg
    e, _ = make_run("no_log", *RUNS["well"], seed=99)
    embs.append(e)
    return pd.concat(embs, ignore_index=True), logs


def test_verdicts_on_constructed_runs(runs):
    emb, logs = runs
    dx = diagnose_map(emb, logs, reference="well")
    v = dx.verdicts
    assert v["high_lr"]["diversity_collapses"] is True
    assert "too-high learning rate" in " ".join(v["high_lr"]["messages"])
    assert v["high_lr"]["spread_vs_peak"] == pytest.approx(0.3 / 1.3, rel=1e-9)  # scale equivariance
    for run in ("well", "healthy", "overfit", "shrinks_but_learns", "diverse_but_falls", "falls_and_stalls",
                "wide_init_dips"):
        assert v[run]["diversity_collapses"] is False, run
    # the initialisation is not the peak: spread 1.6 / 1.7 of epoch 3, not 1.6 / 3 of epoch 0
    assert v["wide_init_dips"]["diversity_peak_epoch"] == 3
    assert v["wide_init_dips"]["spread_vs_peak"] == pytest.approx(1.6 / 1.7, rel=1e-9)
    assert diagnose_map(emb, logs, "well", peak_from_epoch=0).verdicts["wide_init_dips"]["diversity_collapses"] is True
    # a run that ends far below its best gets no speed verdict, however little it moved
    assert v["falls_and_stalls"]["slow_evolution"] is False
    assert "no evolution-speed verdict" in " ".join(v["falls_and_stalls"]["messages"])
    assert diagnose_map(emb, logs, "well", accuracy_drop=0.99).verdicts["falls_and_stalls"]["slow_evolution"] is True
    assert "not a collapse" in " ".join(v["shrinks_but_learns"]["messages"])
    assert v["overfit"]["slow_evolution"] is True
    assert "overfitting" in " ".join(v["overfit"]["messages"])
    # Same milestone intervals: 0.25->0.5 and 0.5->0.75; ratio of movement per gain by hand.
    ref = [1.0 / (0.5 - 0.26), 1.0 / (0.74 - 0.5)]
    mine = [0.5 / (0.52 - 0.25), 0.5 / (0.76 - 0.52)]
    assert v["overfit"]["speed_ratio"] == pytest.approx(np.mean(np.divide(mine, ref)))
    for run in ("well", "healthy", "high_lr", "shrinks_but_learns"):
        assert v[run]["slow_evolution"] is False, run
    assert v["no_log"]["diversity_collapses"] is None and v["no_log"]["slow_evolution"] is None
    # Per-epoch table: every run and epoch, movement in the d-dim space equals |cum[e] - cum[e-1]|.
    tab = dx.table
    assert len(tab) == (len(RUNS) + 1) * 5  # + the run without a log
    g = tab[tab["model"] == "overfit"]
    np.testing.assert_allclose(g["movement"].to_numpy()[1:], np.diff(RUNS["overfit"][2]), rtol=1e-12)


def test_thresholds_are_parameters(runs):
    emb, logs = runs
    # The own-peak half of the collapse rule alone (the reference is the run itself).
    v = diagnose_map(emb, logs, "high_lr").verdicts["high_lr"]
    assert v["diversity_collapses"] is True and v["spread_vs_reference"] is None
    # The accuracy half of the collapse rule: demand a larger fall and high_lr no longer triggers.
    assert diagnose_map(emb, logs, "well", accuracy_drop=0.99).verdicts["high_lr"]["diversity_collapses"] is False
    # A looser speed threshold flags nothing; a stricter one flags the healthy run too.
    assert diagnose_map(emb, logs, "well", slow_ratio=0.3).verdicts["overfit"]["slow_evolution"] is False
    ratio = diagnose_map(emb, logs, "well").verdicts["healthy"]["speed_ratio"]
    assert diagnose_map(emb, logs, "well", slow_ratio=ratio + 0.01).verdicts["healthy"]["slow_evolution"] is True
    # Against the slow run as reference, the well-trained run is fast, not slow.
    v = diagnose_map(emb, logs, "overfit").verdicts["well"]
    assert v["slow_evolution"] is False and v["speed_ratio"] > 1.5


def test_logs_from_files_and_errors(tmp_path, runs):
    emb, logs = runs
    run_dir = tmp_path / "well"
    run_dir.mkdir()
    logs["well"].to_parquet(run_dir / "log.parquet")
    pd.testing.assert_frame_equal(load_log(run_dir), load_log(logs["well"]))
    pd.testing.assert_frame_equal(load_log(run_dir / "log.parquet"), load_log(logs["well"]))
    with pytest.raises(DataError, match="not found"):
        load_log(tmp_path / "missing")
    with pytest.raises(DataError, match="train_top1"):
        load_log(pd.DataFrame({"epoch": [0]}))
    with pytest.raises(EmbeddingError, match="reference run 'nope'"):
        diagnose(emb, logs, reference="nope")
    dup = pd.concat([hand_example(), hand_example().iloc[:1]], ignore_index=True)
    with pytest.raises(EmbeddingError, match="listed twice"):
        neuron_movement(dup)
    with pytest.raises(EmbeddingError, match="lacks column"):
        concept_diversity(emb.drop(columns="y"))


# ------------------------------------------------------------- k-NN entropy, margins
@pytest.mark.parametrize("d", [1, 2, 3])
def test_knn_entropy_of_gaussians_and_uniforms(d):
    rng = np.random.default_rng(10 + d)
    s = 1.7
    x = rng.normal(0.0, s, (6000, d))
    # differential entropy of N(0, s^2 I_d), per dimension: 0.5 ln(2 pi e s^2)
    assert knn_entropy(x, k=3) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * s * s), abs=0.05)
    u = rng.uniform(0.0, 2.0, (6000, d))  # uniform on [0, 2]^d: ln 2 per dimension
    assert knn_entropy(u, k=3) == pytest.approx(math.log(2.0), abs=0.06)


def test_knn_entropy_scale_floor_and_degenerate_cases():
    rng = np.random.default_rng(4)
    x = rng.standard_t(3, (500, 5))
    h = knn_entropy(x)
    assert knn_entropy(2.5 * x + 3.0) == pytest.approx(h + math.log(2.5), abs=1e-9)  # per dimension
    dup = np.vstack([x, x[:50]])  # coinciding neurons: -inf without a floor, finite with one
    assert knn_entropy(dup, k=1) == -math.inf
    assert np.isfinite(knn_entropy(dup, k=1, floor=1e-3))
    assert math.isnan(knn_entropy(x[:4], k=3))
    with pytest.raises(EmbeddingError):
        knn_entropy(np.array([[0.0, np.nan]] * 10))


def _vector_runs(scales: dict[str, list[float]], accs: dict[str, list[float]], n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    frames, logs = [], {}
    base = rng.normal(size=(n, d))  # shared: spreads compare exactly across runs
    for name, sc in scales.items():
        for e, s in enumerate(sc):
            v = s * base + 0.01 * e  # a shift changes no entropy
            frames.append(pd.DataFrame({"model": name, "epoch": e, "layer": "l", "channel": np.arange(n),
                                        "x": rng.normal(size=n), "y": rng.normal(size=n), "vector": list(v)}))
        logs[name] = pd.DataFrame({"epoch": range(len(sc)), "train_top1": accs[name]})
    return pd.concat(frames, ignore_index=True), logs


def test_knn_measure_drives_the_collapse_verdict_with_a_margin():
    emb, logs = _vector_runs({"well": [1, 1.1, 1.2, 1.3], "high_lr": [1, 1.2, 0.6, 0.3]},
                             {"well": [0.1, 0.4, 0.6, 0.8], "high_lr": [0.1, 0.4, 0.3, 0.05]})
    dx = diagnose(emb, logs, reference="well")  # auto: the vector column -> knn
    v = dx.verdicts
    assert v["high_lr"]["measure"] == "knn"
    assert v["high_lr"]["diversity_collapses"] is True and v["well"]["diversity_collapses"] is False
    # scale equivariance: spread = 0.3 / 1.2 of its own peak exactly (same base points)
    assert v["high_lr"]["spread_vs_peak"] == pytest.approx(0.3 / 1.2, rel=1e-6)
    # the margin is ln(0.75) - ln(spread) against whichever comparison is further past the threshold
    assert v["high_lr"]["collapse_margin"] == pytest.approx(
        max(math.log(0.75) - math.log(0.3 / 1.2), math.log(0.75) - math.log(0.3 / 1.3)), rel=1e-6)
    assert v["well"]["collapse_margin"] < 0  # on the no-collapse side
    assert 0 < v["high_lr"]["collapse_margin_se"] < 1
    # the paper's measure is still there, in the table and on request
    assert {"diversity", "diversity_knn", "diversity_knn_se"} <= set(dx.table.columns)
    assert diagnose(emb, logs, "well", measure="map").verdicts["high_lr"]["measure"] == "map"
    with pytest.raises(ValueError, match="measure"):
        diagnose(emb, logs, "well", measure="umap")


def test_speed_margin_standard_error_matches_a_plain_bootstrap(runs):
    emb, logs = runs
    v = diagnose_map(emb, logs, "well", seed=3, bootstrap=400).verdicts["overfit"]
    assert v["speed_margin"] == pytest.approx(0.85 - v["speed_ratio"])
    # constructed runs move every neuron by the same distance: no spread, zero error
    assert v["speed_ratio_se"] == pytest.approx(0.0, abs=1e-9)
    # with noisy movement the error is positive and close to a plain bootstrap computed here
    rng = np.random.default_rng(0)
    noisy = emb.copy()
    noisy["vector"] = [np.asarray(x) + rng.normal(0, 0.3, len(x)) for x in noisy["vector"]]
    v = diagnose_map(noisy, logs, "well", seed=3, bootstrap=400).verdicts["overfit"]
    assert 0.005 < v["speed_ratio_se"] < 0.5


def test_diverged_checkpoints_are_findings_in_verdicts_and_table(runs):
    emb, logs = runs
    dx = diagnose_map(emb, logs, "well", diverged={"high_lr": {7: "non-finite weights in conv.weight"},
                                                   "gone": {3: "NaN activations in layer 'c'"}})
    v = dx.verdicts
    assert v["high_lr"]["diverged"] is True and v["high_lr"]["diverged_epochs"] == [7]
    assert "epoch 7 diverged (non-finite weights in conv.weight)" in " ".join(v["high_lr"]["messages"])
    assert v["high_lr"]["diversity_collapses"] is True  # the other verdicts are still given
    assert v["gone"]["diverged"] is True and v["gone"]["diversity_collapses"] is None  # no checkpoint left
    assert v["well"]["diverged"] is False
    row = dx.table[(dx.table["model"] == "high_lr") & (dx.table["epoch"] == 7)]
    assert len(row) == 1 and bool(row["diverged"].iloc[0]) and np.isnan(row["diversity"].iloc[0])
    assert not dx.table.loc[dx.table["model"] == "well", "diverged"].any()


def test_nearest_neighbour_distances_against_kdtree():
    """The floor's nearest-neighbour distances (FAISS + float64 recompute, exact repeats) equal a k-d tree's."""
    from scipy.spatial import cKDTree

    from conceptevo.diagnostics import _nn_distances

    rng = np.random.default_rng(5)
    for n, d in ((2, 3), (7, 1), (300, 30), (1000, 8)):
        x = rng.normal(size=(n, d)) * rng.uniform(0.01, 100)
        if n > 10:
            x[5] = x[3]            # exact repeats: distance 0
            x[9] = x[3]
            x[20] = x[21] + 1e-12  # a near repeat
        ref = cKDTree(x).query(x, k=2)[0][:, 1]
        np.testing.assert_allclose(_nn_distances(x), ref, rtol=1e-6, atol=1e-9)
        assert ((_nn_distances(x) == 0) == (ref == 0)).all()


def test_diversity_cache_reuses_exactly():
    """concept_diversity(cache=...) on a growing run gives the same table as without a cache,
    recomputes a checkpoint whose vectors changed, and reuses the unchanged ones."""
    rng = np.random.default_rng(2)
    rows = []
    for e in range(5):
        v = rng.normal(size=(60, 6)) * (1 + e)
        if e == 2:
            v[:4] = v[4]  # coinciding neurons: the floor clamps, never reused
        rows += [{"model": "r", "epoch": e, "layer": "l", "channel": c, "x": float(p[0]), "y": float(p[1]),
                  "vector": p} for c, p in enumerate(v)]
    emb = pd.DataFrame(rows)
    cache = {}
    for upto in range(2, 6):  # the run grows one checkpoint at a time, as under the monitor
        part = emb[emb["epoch"] < upto]
        pd.testing.assert_frame_equal(concept_diversity(part, cache=cache), concept_diversity(part))
    assert set(cache) == {("r", e) for e in range(5)}
    assert cache[("r", 2)]["min_eps"] == 0.0
    changed = emb.copy()
    changed.loc[changed["epoch"] == 1, "vector"] = changed.loc[changed["epoch"] == 1, "vector"].map(lambda v: v * 2)
    pd.testing.assert_frame_equal(concept_diversity(changed, cache=cache), concept_diversity(changed))

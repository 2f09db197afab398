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
    dx = diagnose(emb, logs, reference="well")
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
    assert diagnose(emb, logs, "well", peak_from_epoch=0).verdicts["wide_init_dips"]["diversity_collapses"] is True
    # a run that ends far below its best gets no speed verdict, however little it moved
    assert v["falls_and_stalls"]["slow_evolution"] is False
    assert "no evolution-speed verdict" in " ".join(v["falls_and_stalls"]["messages"])
    assert diagnose(emb, logs, "well", accuracy_drop=0.99).verdicts["falls_and_stalls"]["slow_evolution"] is True
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
    v = diagnose(emb, logs, "high_lr").verdicts["high_lr"]
    assert v["diversity_collapses"] is True and v["spread_vs_reference"] is None
    # The accuracy half of the collapse rule: demand a larger fall and high_lr no longer triggers.
    assert diagnose(emb, logs, "well", accuracy_drop=0.99).verdicts["high_lr"]["diversity_collapses"] is False
    # A looser speed threshold flags nothing; a stricter one flags the healthy run too.
    assert diagnose(emb, logs, "well", slow_ratio=0.3).verdicts["overfit"]["slow_evolution"] is False
    ratio = diagnose(emb, logs, "well").verdicts["healthy"]["speed_ratio"]
    assert diagnose(emb, logs, "well", slow_ratio=ratio + 0.01).verdicts["healthy"]["slow_evolution"] is True
    # Against the slow run as reference, the well-trained run is fast, not slow.
    v = diagnose(emb, logs, "overfit").verdicts["well"]
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

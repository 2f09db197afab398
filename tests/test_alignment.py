"""Alignment report: dominant concepts, share/chance against brute force, planted and shuffled cases."""
from collections import Counter

import numpy as np
import pytest

from conceptevo.alignment import SCOPES, alignment_report, dominant_concepts
from conceptevo.errors import EmbeddingError
from conceptevo.space import UnifiedSpace


def test_dominant_concepts_equal_python_loop(rng):
    num_images, codes_n = 70, int(rng.integers(2, 6))
    codes = rng.integers(0, codes_n, num_images)
    s = rng.integers(-1, num_images, size=(120, 7))  # many ties among few codes
    s[[0, 5]] = -1
    s[7] = [3, -1, -1, -1, -1, -1, -1]
    dom, pur = dominant_concepts(s, codes)
    for i, row in enumerate(s):
        ids = [x for x in row if x >= 0]
        if not ids:
            assert dom[i] == -1 and np.isnan(pur[i])
            continue
        cnt = Counter(int(codes[x]) for x in ids)
        best = max(cnt.values())
        assert dom[i] == min(c for c, v in cnt.items() if v == best)
        assert pur[i] == pytest.approx(best / len(ids))


def test_dominant_concepts_errors():
    with pytest.raises(EmbeddingError, match="no tag"):
        dominant_concepts(np.array([[5]]), np.zeros(3, np.int64))
    with pytest.raises(EmbeddingError, match=">= 0"):
        dominant_concepts(np.array([[0]]), np.array([-1]))


def planted(rng, n_models=2, n_epochs=3, per=60, num_images=2400, d=8, k=8, purity=1.0):
    """Images carry 'shape' (drives the image vectors) and an independent 'colour'.

    Neurons draw stimuli from one shape's images (a ``purity`` share, the rest at random).
    """
    shape = rng.integers(0, 4, num_images)
    colour = rng.integers(0, 5, num_images)
    centres = rng.normal(size=(4, d)) * 3
    u = (centres[shape] + rng.normal(size=(num_images, d))).astype(np.float32)
    space = UnifiedSpace(u)
    for m in range(n_models):
        for e in range(n_epochs):
            pref = rng.integers(0, 4, per)
            rows = []
            for p in pref:
                n_pure = int(round(purity * k))
                ids = np.concatenate([rng.choice(np.flatnonzero(shape == p), n_pure, replace=False),
                                      rng.choice(num_images, k - n_pure, replace=False)])
                rows.append(np.unique(ids)[:k] if len(np.unique(ids)) >= k else np.pad(
                    np.unique(ids), (0, k - len(np.unique(ids))), constant_values=-1))
            s = np.stack(rows)
            s[: int(rng.integers(0, 3))] = -1  # a few dead neurons
            space.add(f"m{m}", e * 5, s)
    return space, {"shape": shape, "colour": colour}


def test_planted_concepts_lift_and_controls(rng):
    space, tags = planted(rng, purity=0.75)
    rep = alignment_report(space, tags, k=10, shuffles=2, seed=1)
    t = rep.table.set_index(["scope", "family"])
    assert list(rep.table.columns) == ["scope", "family", "k", "share", "chance", "lift", "shuffled",
                                       "purity", "n_neurons"]
    for scope in SCOPES:
        shape = t.loc[(scope, "shape")]
        assert shape.lift > 2.5 and shape.share > 0.8  # chance is ~0.25
        assert shape.shuffled < 0.5  # meaningless tags do not agree along the same neighbours
        colour = t.loc[(scope, "colour")]  # independent of the vectors: no better than chance
        assert 0.75 < colour.lift < 1.3
        assert shape.n_neurons == int(space.valid.sum())
    # shuffling the image tags themselves (not just the control column) removes the alignment
    perm = rng.permutation(space.num_images)
    rep_s = alignment_report(space, {"shape": tags["shape"][perm]}, k=10, shuffles=0)
    assert np.all(np.abs(rep_s.table.lift - 1) < 0.3)
    assert rep_s.table.shuffled.isna().all()
    text = str(rep)
    assert "across_models" in text and "lift" in text


def brute_report(space, codes, k):
    """share / chance per scope by plain loops over every live neuron."""
    keys = space.keys()
    x, valid = space.vectors.astype(np.float64), keys.valid.to_numpy()
    dom, _ = dominant_concepts(space.stimuli(), codes)
    out = {}
    for scope in SCOPES:
        shares, chances = [], []
        for q in np.flatnonzero(valid):
            mq, eq = keys.model[q], keys.epoch[q]
            cand = []
            for j in np.flatnonzero(valid):
                same_m, same_e = keys.model[j] == mq, keys.epoch[j] == eq
                ok = {"within": same_m and same_e and j != q, "across_epochs": same_m and not same_e,
                      "across_models": not same_m}[scope]
                if ok:
                    cand.append(j)
            if not cand:
                continue
            dist = ((x[cand] - x[q]) ** 2).sum(1)
            nb = np.asarray(cand)[np.argsort(dist, kind="stable")[:k]]
            shares.append(np.mean(dom[nb] == dom[q]))
            chances.append(np.mean(dom[cand] == dom[q]))
        out[scope] = (np.mean(shares) if shares else np.nan, np.mean(chances) if chances else np.nan,
                      len(shares))
    return out


def test_share_and_chance_equal_brute_force(rng):
    num_images = 90
    u = rng.normal(size=(num_images, 4)).astype(np.float32)  # continuous: no distance ties
    space = UnifiedSpace(u)
    for m, e, n in [("a", 0, 13), ("a", 2, 9), ("b", 0, 11), ("c", 1, 1)]:
        s = rng.integers(-1, num_images, size=(n, 5))
        if n > 3:
            s[1] = -1
        space.add(m, e, s)
    codes = rng.integers(0, 3, num_images)
    k = int(rng.integers(1, 6))
    rep = alignment_report(space, {"f": codes}, k=k, shuffles=0)
    ref = brute_report(space, codes, k)
    for scope in SCOPES:
        row = rep.table[rep.table.scope == scope].iloc[0]
        share, chance, n = ref[scope]
        assert row.n_neurons == n
        assert row.share == pytest.approx(share, abs=1e-12)
        assert row.chance == pytest.approx(chance, abs=1e-12)
        assert row.lift == pytest.approx(share / chance)


def test_empty_scope_and_filters(rng):
    u = rng.normal(size=(40, 3)).astype(np.float32)
    space = UnifiedSpace(u)
    space.add("only", 0, rng.integers(0, 40, size=(8, 3)))
    codes = rng.integers(0, 2, 40)
    rep = alignment_report(space, {"f": codes}, k=3)
    t = rep.table.set_index("scope")
    assert t.loc["across_models", "n_neurons"] == 0 and np.isnan(t.loc["across_models", "lift"])
    assert t.loc["within", "n_neurons"] == 8
    assert "-" in str(rep)  # empty scopes print as a dash, not a crash
    rep = alignment_report(space, {"f": codes}, k=3, queries=np.arange(3), scopes=["within"])
    assert rep.table.n_neurons.tolist() == [3]
    with pytest.raises(EmbeddingError, match="unknown tag families"):
        alignment_report(space, {"f": codes}, families=["g"])
    with pytest.raises(EmbeddingError, match="has shape"):
        alignment_report(space, {"f": codes[:5]})
    with pytest.raises(EmbeddingError, match="unknown scopes"):
        alignment_report(space, {"f": codes}, scopes=["sideways"])


def test_min_purity_keeps_only_pure_neurons(rng):
    space, tags = planted(rng, n_models=1, n_epochs=2, per=40, purity=0.5)
    _, pur = dominant_concepts(space.stimuli(), tags["shape"])
    rep = alignment_report(space, tags, k=5, families=["shape"], min_purity=0.75, shuffles=0)
    assert rep.table.set_index("scope").loc["within", "n_neurons"] == int(np.sum(pur >= 0.75))
    assert (rep.table.purity.dropna() >= 0.75).all()

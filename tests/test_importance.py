"""Batched evolution importance (Eq. 2-4) against the plain per-image, per-neuron loop."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conceptevo._reference import importance_loop
from conceptevo.adapter import ModelAdapter
from conceptevo.errors import ActivationError, DataError, LayerError
from conceptevo.importance import evolution_importance

LAYERS = ["0", "3", "8", "10"]  # two convs, two Linear layers (the last one is the logits)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (see conftest)


def tiny_net(seed: int, inplace: bool = False, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),  # 0
        nn.BatchNorm2d(5),  # 1
        nn.ReLU(inplace=inplace),  # 2
        nn.Conv2d(5, 7, 3, stride=2),  # 3
        nn.ReLU(inplace=inplace),  # 4
        nn.Dropout(0.5),  # 5 (identity in eval mode)
        nn.AdaptiveAvgPool2d(2),  # 6
        nn.Flatten(),  # 7
        nn.Linear(28, 6),  # 8
        nn.ReLU(inplace=inplace),  # 9
        nn.Linear(6, classes),  # 10
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return net.double()


def evolved(net: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """A later-epoch copy: the same architecture with perturbed weights and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(net)
    with torch.no_grad():
        for t in list(new.parameters()) + [new[1].running_mean]:
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return new


def make_data(counts=(5, 3, 1, 6), hw=(9, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randn(len(labels), 3, *hw, generator=g, dtype=torch.float64)
    return images, labels


class ListDataset(torch.utils.data.Dataset):
    """A dataset without .labels: labels must be read item by item."""

    def __init__(self, images, labels):
        self.items = [(images[i], int(labels[i])) for i in range(len(labels))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _key(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["class", "layer", "channel"]).reset_index(drop=True)


def test_batched_equals_plain_loop(rng):
    # Not a degenerate case: both signs of the score at every hidden layer. About 1 random model in
    # 70 has one sign only at some layer, so draw until both occur.
    for _ in range(100):
        seed = int(rng.integers(2**31))
        m_t = tiny_net(seed)
        m_t2 = evolved(m_t, seed + 1)
        data = make_data(seed=seed + 2)
        fast, fs = evolution_importance(m_t, m_t2, data, layers=LAYERS, batch_size=4, return_scores=True)
        if all((fs.scores[name] > 0).any() and (fs.scores[name] < 0).any() for name in LAYERS[:-1]):
            break
    else:
        raise AssertionError("100 random model pairs, each with one sign only at some hidden layer")
    slow, ss = importance_loop(m_t, m_t2, data, layers=LAYERS, return_scores=True)
    np.testing.assert_array_equal(fs.ids, ss.ids)
    for name in LAYERS:
        assert fs.scores[name].shape == ss.scores[name].shape
        np.testing.assert_allclose(fs.scores[name], ss.scores[name], rtol=1e-9, atol=1e-12)
    fast, slow = _key(fast), _key(slow)
    assert len(fast) == 4 * (5 + 7 + 6 + 4)
    for col in ("class", "layer", "channel", "neuron", "positives", "total", "rank"):
        np.testing.assert_array_equal(fast[col].to_numpy(), slow[col].to_numpy(), err_msg=col)
    np.testing.assert_allclose(fast["score"], slow["score"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(fast["mean_s"], slow["mean_s"], rtol=1e-9, atol=1e-12)
    # Totals are the class counts; the one-image class still gets a score.
    assert fast.groupby("class")["total"].first().tolist() == [5, 3, 1, 6]
    # Eq. 4 from the per-image scores, recomputed here.
    for name in LAYERS:
        for c in range(4):
            want = (fs.scores[name][fs.labels == c] > 0).mean(0)
            got = fast[(fast["layer"] == name) & (fast["class"] == c)].sort_values("channel")["score"]
            np.testing.assert_allclose(got, want, atol=1e-15)


def test_gradient_at_t_prime_equals_the_swapped_plain_loop(rng):
    """gradient_at="t_prime": grad h^{t'}(Z^{t'}) . (Z^{t'} - Z^t), i.e. minus the loop with the models swapped."""
    seed = int(rng.integers(2**31))
    m_t, data = tiny_net(seed), make_data(counts=(4, 1, 3, 2), seed=seed + 2)
    m_t2 = evolved(m_t, seed + 1)
    fast, fs = evolution_importance(m_t, m_t2, data, layers=LAYERS, batch_size=3, return_scores=True,
                                    gradient_at="t_prime")
    _, swapped = importance_loop(m_t2, m_t, data, layers=LAYERS, return_scores=True)
    _, paper = importance_loop(m_t, m_t2, data, layers=LAYERS, return_scores=True)
    for name in LAYERS:
        np.testing.assert_allclose(fs.scores[name], -swapped.scores[name], rtol=1e-9, atol=1e-12)
        if name != "10":  # the logit layer: its gradient is one-hot in either model
            assert not np.allclose(fs.scores[name], paper.scores[name])  # a different ranking signal
        for c in range(4):
            want = (fs.scores[name][fs.labels == c] > 0).mean(0)
            got = fast[(fast["layer"] == name) & (fast["class"] == c)].sort_values("channel")["score"]
            np.testing.assert_allclose(got, want, atol=1e-15)
    with pytest.raises(ValueError, match="gradient_at"):
        evolution_importance(m_t, m_t2, data, layers=LAYERS, gradient_at="t2")


def kink_free_slopes(h, eps: float) -> list[float]:
    """One-sided finite-difference slopes at 0 of a piecewise-linear ``h`` (a ReLU net, in float64).

    A ReLU or pooling switch within ``eps`` of the point bends ``h`` (seen in about 1 draw in 75 at
    ``eps = 1e-6``), and a central difference across it is off by up to half the change of slope.
    A side whose slope over ``[0, eps]`` equals its slope over ``[0, eps/2]`` (to 50 times the
    float64 rounding of that slope) holds no bend, so its slope is exact; the slopes of such sides
    are returned.
    """
    h0 = h(0.0)
    rounding = 50 * np.finfo(np.float64).eps * max(1.0, abs(h0)) / (eps / 2)
    slopes = []
    for side in (1.0, -1.0):
        whole = side * (h(side * eps) - h0) / eps
        half = side * (h(side * eps / 2) - h0) / (eps / 2)
        if abs(whole - half) <= rounding:
            slopes.append(half)
    return slopes


def test_scores_match_finite_difference_of_eq3(rng):
    """Eq. 3 by its limit definition, d/de h(Z + e dZ) at e = 0, through the epoch-t model."""
    seed = int(rng.integers(2**31))
    m_t = tiny_net(seed)
    m_t2 = evolved(m_t, seed + 1)
    images, labels = make_data(counts=(2, 2, 1, 1), seed=seed + 2)
    _, sc = evolution_importance(m_t, m_t2, (images, labels), layers=LAYERS, batch_size=3, return_scores=True)
    ad_t, ad_t2 = ModelAdapter(m_t, LAYERS, (3, 9, 11)), ModelAdapter(m_t2, LAYERS, (3, 9, 11))
    m_t.eval()
    m_t2.eval()
    for row, img in enumerate(sc.ids):
        x = images[img : img + 1]
        c = int(labels[img])
        _, z2 = ad_t2.capture(x)
        _, z1 = ad_t.capture(x)
        for name in LAYERS:
            n = int(rng.integers(ad_t.channels[name]))
            delta = torch.zeros_like(z1[name])
            delta[:, n] = z2[name][:, n] - z1[name][:, n]

            def h(e, x=x, c=c, name=name, delta=delta):
                with torch.no_grad(), ad_t.hooks(lambda nm, o: o + e * delta if nm == name else None):
                    return float(m_t(x)[0, c])

            slopes = next(filter(None, (kink_free_slopes(h, eps) for eps in (1e-6, 1e-7, 1e-8))), [])
            assert slopes, f"a bend on both sides of the point down to e = 1e-8 (layer {name}, row {row})"
            for fd in slopes:
                assert fd == pytest.approx(sc.scores[name][row, n], rel=1e-5, abs=1e-8)


def test_inplace_relu_does_not_change_results(rng):
    seed = int(rng.integers(2**31))
    plain, inplace = tiny_net(seed, inplace=False), tiny_net(seed, inplace=True)
    p2, i2 = evolved(plain, seed + 1), evolved(inplace, seed + 1)
    data = make_data(seed=seed + 2)
    a = evolution_importance(plain, p2, data, layers=LAYERS, batch_size=5)
    b = evolution_importance(inplace, i2, data, layers=LAYERS, batch_size=5)
    c = importance_loop(inplace, i2, data, layers=LAYERS)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(_key(a).drop(columns="mean_s"), _key(c).drop(columns="mean_s"))


def test_batch_size_invariance_and_dataset_without_labels():
    m_t, data = tiny_net(7), make_data(counts=(3, 4, 2, 2), seed=5)
    m_t2 = evolved(m_t, 8)
    a = evolution_importance(m_t, m_t2, data, layers=LAYERS, batch_size=1)
    b = evolution_importance(m_t, m_t2, ListDataset(*data), layers=LAYERS, batch_size=7)
    pd.testing.assert_frame_equal(a.drop(columns="mean_s"), b.drop(columns="mean_s"))
    np.testing.assert_allclose(a["mean_s"], b["mean_s"], rtol=1e-10, atol=1e-13)


def test_unchanged_model_gives_zero_and_ties_rank_by_channel():
    m_t = tiny_net(9)
    m_t2 = copy.deepcopy(m_t)
    with torch.no_grad():  # evolve only the layers after the first conv: its Delta Z is exactly 0
        for p in list(m_t2[3].parameters()) + list(m_t2[8].parameters()):
            p.add_(0.5)
    data = make_data(counts=(2, 3, 2, 1), seed=6)
    same = evolution_importance(m_t, copy.deepcopy(m_t), data, layers=LAYERS)
    assert (same["positives"] == 0).all() and (same["mean_s"] == 0).all()
    for (_, _), g in same.groupby(["class", "layer"]):
        np.testing.assert_array_equal(g.sort_values("rank")["channel"], np.arange(len(g)))
    part = evolution_importance(m_t, m_t2, data, layers=LAYERS)
    assert (part.loc[part["layer"] == "0", "positives"] == 0).all()
    assert (part.loc[part["layer"] == "3", "positives"] > 0).any()


def test_rank_order_matches_pandas_sort():
    m_t = tiny_net(11)
    m_t2 = evolved(m_t, 12, scale=0.6)
    df = evolution_importance(m_t, m_t2, make_data(counts=(6, 6, 6, 6), seed=8), layers=LAYERS, batch_size=8)
    for (_, _), g in df.groupby(["class", "layer"]):
        want = g.sort_values(["score", "mean_s", "channel"], ascending=[False, False, True])["channel"]
        got = g.sort_values("rank")["channel"]
        np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
        assert sorted(g["rank"]) == list(range(1, len(g) + 1))


def test_subsets_seed_and_modes():
    m_t = tiny_net(13)
    m_t2 = evolved(m_t, 14)
    m_t.train()
    data = make_data(counts=(5, 3, 1, 6), seed=9)
    a = evolution_importance(m_t, m_t2, data, classes=[3, 0], layers=LAYERS, max_images_per_class=2, seed=1)
    m_t2[5].eval()  # a mixed mode must come back exactly as it was
    a = evolution_importance(m_t, m_t2, data, classes=[3, 0], layers=LAYERS, max_images_per_class=2, seed=1)
    assert m_t.training and all(m.training for m in m_t.modules())
    assert m_t2.training and not m_t2[5].training
    b = evolution_importance(m_t, m_t2, data, classes=[3, 0], layers=LAYERS, max_images_per_class=2, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert sorted(a["class"].unique()) == [0, 3]
    assert set(a["total"]) == {2}
    # Explicit indices: only those images count.
    idx = np.flatnonzero(data[1].numpy() == 1)[:2]
    c = evolution_importance(m_t, m_t2, data, layers=LAYERS, indices=idx)
    assert c["class"].unique().tolist() == [1] and set(c["total"]) == {2}


def test_errors_name_the_fault():
    m_t = tiny_net(15)
    data = make_data()
    with pytest.raises(DataError, match="class 9"):
        evolution_importance(m_t, evolved(m_t, 1), data, classes=[9], layers=LAYERS)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4)).double()
    other(torch.zeros(1, 3, 9, 11, dtype=torch.float64))
    with pytest.raises(LayerError, match="'0'"):
        evolution_importance(m_t, other, data, layers=["0"])
    with pytest.raises(LayerError, match="nope"):
        evolution_importance(m_t, evolved(m_t, 1), data, layers=["nope"])
    images, labels = data
    with pytest.raises(DataError, match="label 7"):
        evolution_importance(m_t, evolved(m_t, 1), (images, torch.where(labels == 3, 7, labels)),
                             layers=LAYERS)
    bad = evolved(m_t, 1)
    with torch.no_grad():
        bad[3].weight[2, 0, 0, 0] = float("nan")
    with pytest.raises(ActivationError, match="'3'"):
        evolution_importance(m_t, bad, data, layers=LAYERS)

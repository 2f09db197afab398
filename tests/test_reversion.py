"""Reversion check (Fig. 7): hooked reversion against direct computation on small nets."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conceptevo.adapter import ModelAdapter
from conceptevo.reversion import (
    RANDOM_BIN,
    bin_labels,
    capture_epoch_t,
    class_ordering,
    ordering_check,
    plot_reversion,
    reversion_check,
    revert_forward,
    summarize_reversion,
)

LAYERS = ["0", "2", "6"]  # conv (5 ch), conv (3 ch: one of 4 bins is empty), Linear (6 units)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (see conftest)


def net(seed: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),  # 0
        nn.ReLU(inplace=True),  # 1
        nn.Conv2d(5, 3, 3, stride=2),  # 2
        nn.ReLU(),  # 3
        nn.AdaptiveAvgPool2d(2),  # 4
        nn.Flatten(),  # 5
        nn.Linear(12, 6),  # 6
        nn.ReLU(),  # 7
        nn.Linear(6, classes),  # 8
    ).double().eval()


def evolved(m: nn.Module, seed: int, scale: float = 0.4) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(m)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return new


def data(counts, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=g)]
    return torch.randn(len(y), 3, 7, 9, generator=g, dtype=torch.float64), y


def test_no_mask_gives_unreverted_and_full_mask_gives_epoch_t(rng):
    seed = int(rng.integers(2**31))
    m_t, m_t2 = net(seed), evolved(net(seed), seed + 1)
    ad_t, ad_t2 = ModelAdapter(m_t, LAYERS, (3, 7, 9)), ModelAdapter(m_t2, LAYERS, (3, 7, 9))
    x, _ = data((3, 2, 2, 1), seed + 2)
    zt = capture_epoch_t(ad_t, x)
    with torch.no_grad():
        base = m_t2(x)
        # Plain captures, one module at a time (no hooks involved).
        plain_t, plain_t2 = {}, {}
        for model, store in ((m_t, plain_t), (m_t2, plain_t2)):
            h = x
            for i, mod in enumerate(model):
                h = mod(h)
                if str(i) in LAYERS:
                    store[str(i)] = h.clone()
    for name in LAYERS:  # the in-place ReLU after layer "0" must not leak into the capture
        assert torch.equal(zt[name], plain_t[name])
    for layer in LAYERS:
        C = ad_t2.channels[layer]
        seen: dict[str, torch.Tensor] = {}
        out = revert_forward(ad_t2, x, layer, torch.zeros(C, dtype=torch.bool), zt[layer],
                             observe=seen.__setitem__)
        assert torch.equal(out, base)
        for name in LAYERS:
            assert torch.equal(seen[name], plain_t2[name])

        seen = {}
        out = revert_forward(ad_t2, x, layer, torch.ones(C, dtype=torch.bool), zt[layer],
                             observe=seen.__setitem__)
        assert torch.equal(seen[layer], zt[layer])  # exactly the epoch-t activations
        i = int(layer)
        with torch.no_grad():
            want = m_t2[i + 1 :](zt[layer])  # the rest of M_t' on Z^t
        assert torch.equal(out, want)
        for name in LAYERS:
            if int(name) < i:
                assert torch.equal(seen[name], plain_t2[name])  # earlier layers untouched
        assert not torch.equal(zt[layer], plain_t2[layer])  # the test is not vacuous


def test_per_image_mask():
    m_t, m_t2 = net(2), evolved(net(2), 3)
    ad_t, ad_t2 = ModelAdapter(m_t, LAYERS, (3, 7, 9)), ModelAdapter(m_t2, LAYERS, (3, 7, 9))
    x, _ = data((2, 1, 0, 0), 1)
    zt = capture_epoch_t(ad_t, x)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, [0, 2]] = True
    mask[2, 4] = True
    seen: dict[str, torch.Tensor] = {}
    revert_forward(ad_t2, x, "0", mask, zt["0"], observe=seen.__setitem__)
    with torch.no_grad():
        want = m_t2[0](x)
    want[0, [0, 2]] = zt["0"][0, [0, 2]]
    want[2, 4] = zt["0"][2, 4]
    assert torch.equal(seen["0"], want)


def test_bin_labels():
    assert bin_labels(4) == ["0-25%", "25-50%", "50-75%", "75-100%"]
    assert bin_labels(3) == ["0-33.3333%", "33.3333-66.6667%", "66.6667-100%"]
    with pytest.raises(ValueError):
        bin_labels(0)


def _manual_accuracy(m_t, m_t2, x, y, layer, channels):
    """Revert `channels` of `layer` by running the Sequential in two halves."""
    i = int(layer)
    with torch.no_grad():
        z_t = m_t[: i + 1](x)
        z = m_t2[: i + 1](x)
        z[:, channels] = z_t[:, channels]
        logits = m_t2[i + 1 :](z)
    top1 = (logits.argmax(1) == y).double().mean().item()
    top5 = (logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]).any(1).double().mean().item()
    return top1, top5


def test_reversion_check_against_direct_computation(rng):
    seed = int(rng.integers(2**31))
    m_t, m_t2 = net(seed, classes=6), evolved(net(seed, classes=6), seed + 1, scale=0.6)
    train = data((6, 5, 4, 6, 3, 5), seed + 2)
    test = data((3, 4, 2, 2, 5, 1), seed + 3)
    res = reversion_check(m_t, m_t2, train, test, classes=[0, 2, 4], layers=LAYERS, sample_size=10,
                          repeats=2, batch_size=4, seed=7)
    long = res.long
    bins = bin_labels(4) + [RANDOM_BIN]
    assert len(long) == 3 * len(LAYERS) * 2 * 2 * len(bins)
    assert set(long["bin"]) == set(bins)
    assert (long["delta_top1"] == long["top1"] - long["base_top1"]).all()

    # Every class image fits in the sample, so the base accuracy is M_t' on all of them.
    for split, (x, y) in (("train", train), ("test", test)):
        for c in (0, 2, 4):
            sel = y == c
            with torch.no_grad():
                logits = m_t2(x[sel])
            top1 = (logits.argmax(1) == c).double().mean().item()
            got = long[(long["split"] == split) & (long["class"] == c)]["base_top1"].unique()
            np.testing.assert_allclose(got, [top1])
            assert (long[(long["split"] == split) & (long["class"] == c)]["n_images"] == sel.sum().item()).all()

    # Each importance bin reverts the channels its ranks say; check every cell by hand.
    imp = res.importance
    for (c, layer, s, split, b), row in long.set_index(["class", "layer", "sample", "split", "bin"]).iterrows():
        if b == RANDOM_BIN:
            continue
        g = imp[(imp["sample"] == s) & (imp["class"] == c) & (imp["layer"] == layer)].sort_values("rank")
        chunk = np.array_split(g["channel"].to_numpy(), 4)[bins.index(b)]
        x, y = (train if split == "train" else test)
        sel = y == c
        t1, t5 = _manual_accuracy(m_t, m_t2, x[sel], y[sel], layer, list(chunk))
        assert row["top1"] == pytest.approx(t1) and row["top5"] == pytest.approx(t5)
        if chunk.size == 0:  # reverting no neuron: exactly the unreverted accuracy
            assert row["delta_top1"] == 0 and row["delta_top5"] == 0
    # Layer "2" has 3 channels: the last of 4 bins is empty.
    assert (long[(long["layer"] == "2") & (long["bin"] == "75-100%")]["delta_top1"] == 0).all()


def test_identical_models_change_nothing_and_seed_reproduces():
    m = net(6)
    train = data((9, 8, 7, 9), 4)
    kw = dict(classes=[1, 3], layers=LAYERS, sample_size=4, repeats=3, batch_size=3, seed=11)
    a = reversion_check(m, copy.deepcopy(m), train, **kw)
    assert (a.long["delta_top1"] == 0).all() and (a.long["delta_top5"] == 0).all()
    assert set(a.long["split"]) == {"train"}
    m2 = evolved(m, 7)
    b1 = reversion_check(m, m2, train, **kw)
    b2 = reversion_check(m, m2, train, **kw)
    pd.testing.assert_frame_equal(b1.long, b2.long)
    # Independent samples: the importance tables of the 3 samples are not all equal.
    imp = b1.importance
    per = [imp[imp["sample"] == s]["positives"].to_numpy() for s in range(3)]
    assert not (np.array_equal(per[0], per[1]) and np.array_equal(per[1], per[2]))


def test_summary_by_hand_and_ordering():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(2):
        for c in (0, 1):
            for layer in ("a", "b", "c"):
                for b in bin_labels(4) + [RANDOM_BIN]:
                    d1, d5 = rng.normal(size=2)
                    rows.append({"class": c, "layer": layer, "sample": s, "split": "train", "bin": b,
                                 "top1": 0.5 + d1, "top5": 0.8 + d5, "base_top1": 0.5, "base_top5": 0.8,
                                 "delta_top1": d1, "delta_top5": d5, "n_images": 4})
    long = pd.DataFrame(rows)
    summ = summarize_reversion(long)
    assert len(summ) == 5 * 2
    for b in bin_labels(4) + [RANDOM_BIN]:
        g = long[long["bin"] == b]
        per_sample = [g[g["sample"] == s]["delta_top1"].mean() for s in (0, 1)]  # equal groups
        r = summ[(summ["bin"] == b) & (summ["metric"] == "top1")].iloc[0]
        assert r["mean_delta"] == pytest.approx(np.mean(per_sample))
        assert r["std_over_samples"] == pytest.approx(np.std(per_sample))
    good = pd.DataFrame({"split": "train", "metric": "top1", "bin": bin_labels(4) + [RANDOM_BIN],
                         "mean_delta": [-0.4, -0.2, -0.1, 0.05, -0.15]})
    chk = ordering_check(good)
    assert chk["monotone"].item() and chk["random_between"].item()
    bad = good.assign(mean_delta=[-0.1, -0.2, -0.1, 0.05, 0.3])
    chk = ordering_check(bad)
    assert not chk["monotone"].item() and not chk["random_between"].item()


def test_class_ordering_by_hand():
    bins = [*bin_labels(4), RANDOM_BIN]
    deltas = {  # class -> per-bin change; two layers, second layer = first + offsets averaging 0
        0: [-0.30, -0.20, -0.10, 0.00, -0.15],   # full order
        1: [-0.30, -0.05, -0.10, 0.02, -0.10],   # top bin worst, order broken in the middle
        2: [0.00, 0.005, -0.002, 0.0, 0.001],    # insensitive
        3: [-0.05, -0.02, -0.01, -0.60, -0.10],  # least important bin worst
    }
    rows = []
    for c, ds in deltas.items():
        for layer, off in (("a", 0.004), ("b", -0.004)):
            for b, d in zip(bins, ds):
                for split in ("train", "test"):
                    rows.append({"class": c, "layer": layer, "sample": 0, "split": split, "bin": b,
                                 "delta_top1": d + off if split == "train" else 0.0, "delta_top5": 0.0})
    out = class_ordering(pd.DataFrame(rows)).set_index("class")
    assert list(out.columns[:5]) == bins
    np.testing.assert_allclose(out[bins].to_numpy(), np.array(list(deltas.values())), atol=1e-12)
    assert out["top_bin_drops_most"].tolist() == [True, True, False, False]
    assert out["monotone"].tolist() == [True, False, False, False]
    assert out["no_effect"].tolist() == [False, False, True, False]
    assert class_ordering(pd.DataFrame(rows), split="test")["no_effect"].all()
    with pytest.raises(ValueError, match="no rows"):
        class_ordering(pd.DataFrame(rows), split="val")


def test_plot_writes_png(tmp_path):
    summ = pd.DataFrame({"split": ["train"] * 5 + ["test"] * 5, "metric": "top1",
                         "bin": (bin_labels(4) + [RANDOM_BIN]) * 2, "mean_delta": np.linspace(-0.3, 0.1, 10),
                         "std_over_samples": 0.01, "mean_base": 0.7, "mean_reverted": 0.6})
    p = plot_reversion(summ, tmp_path / "fig7.png", title="t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_reversion(summ.iloc[:0], tmp_path / "empty.png")


def test_reversion_figure_is_written_atomically(tmp_path, monkeypatch):
    """A crash while the figure is written leaves the previous figure and no temporary file."""
    import matplotlib.figure

    from conceptevo.reversion import RANDOM_BIN, plot_reversion

    summary = pd.DataFrame({"split": "train", "metric": "top1", "bin": ["0-25%", "25-50%", RANDOM_BIN],
                            "mean_delta": [-0.1, -0.05, -0.02], "std_over_samples": [0.01, 0.01, 0.01]})
    out = tmp_path / "figures" / "reversion.png"
    plot_reversion(summary, out)
    first = out.read_bytes()
    assert first.startswith(b"\x89PNG")

    def crash(self, fname, *a, **kw):
        open(fname, "wb").write(b"half a png")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", crash)
    with pytest.raises(KeyboardInterrupt):
        plot_reversion(summary, out)
    assert out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["reversion.png"]

"""conceptevo.models and conceptevo.train: model factory, trainer, run directories, regimes."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conceptevo import train as train_mod
from conceptevo.data import builtin_dataset, tensor_dataset
from conceptevo.errors import ConceptEvoError
from conceptevo.models import VGG_SMALL_CONV_LAYERS, available_models, build_model
from conceptevo.train import (
    LOG_COLUMNS,
    REGIMES,
    load_train_log,
    run_checkpoints,
    run_model_factory,
    train_regimes,
    train_run,
)

TINY = {"channels": (4, 8, 8, 8), "hidden": 16}


@pytest.fixture(scope="module")
def tiny_data():
    return (builtin_dataset("train", seed=3, num_images=96), builtin_dataset("test", seed=3, num_images=48))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------- models
def test_vgg_small_layers_shapes_and_hooks():
    m = build_model("vgg_small", num_classes=12)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert convs == list(VGG_SMALL_CONV_LAYERS)
    assert [m.get_submodule(n).out_channels for n in convs] == [16, 16, 32, 32, 64, 64, 128]
    assert any(isinstance(mod, nn.Dropout) for mod in m.modules())
    assert all(not mod.inplace for mod in m.modules() if isinstance(mod, nn.ReLU))
    for size in (32, 48, 16):
        assert m(torch.zeros(2, 3, size, size)).shape == (2, 12)
    nodrop = build_model("vgg_small_nodrop", num_classes=5, channels=(2, 3, 4, 5))
    assert not any(isinstance(mod, nn.Dropout) for mod in nodrop.modules())
    with_drop = build_model("vgg_small", 5, channels=(2, 3, 4, 5))
    assert sorted(nodrop.state_dict()) == sorted(with_drop.state_dict())
    # a hook on a conv sees the pre-activation map, untouched by the ReLU after it
    seen = {}
    m.features.conv1_1.register_forward_hook(lambda mod, i, o: seen.setdefault("o", o.detach()))
    m(torch.randn(1, 3, 32, 32))
    assert float(seen["o"].min()) < 0
    bn = build_model("vgg_small", batch_norm=True)
    assert isinstance(bn.features.bn1_1, nn.BatchNorm2d)


def test_build_model_errors_and_seeding():
    assert set(available_models()) == {"vgg_small", "vgg_small_nodrop"}
    with pytest.raises(ConceptEvoError, match="unknown model 'vgg_huge'"):
        build_model("vgg_huge")
    with pytest.raises(ConceptEvoError, match="bad arguments"):
        build_model("vgg_small", widths=3)
    with pytest.raises(ConceptEvoError, match="channels"):
        build_model("vgg_small", channels=(1, 2))
    with pytest.raises(ConceptEvoError, match="no dropout"):
        build_model("vgg_small_nodrop", dropout=0.5)
    with pytest.raises(ConceptEvoError, match="architecture"):
        build_model("torchvision:")
    torch.manual_seed(4)
    a = build_model("vgg_small", **TINY)
    torch.manual_seed(4)
    b = build_model("vgg_small", **TINY)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_models_need_torchvision():
    with pytest.raises(ConceptEvoError, match="needs torchvision"):
        build_model("torchvision:vgg16")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_torchvision_models_build_without_weights():
    m = build_model("torchvision:resnet18", num_classes=7)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ConceptEvoError, match="no model named"):
        build_model("torchvision:not_a_net")


def test_default_path_does_not_import_torchvision():
    import subprocess
    import sys

    code = ("import sys, conceptevo.models, conceptevo.train, conceptevo.data; "
            "conceptevo.models.build_model('vgg_small'); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ schedules
def test_lr_schedule_against_formulas():
    lr, spe, total = 0.2, 10, 100
    f = train_mod._lr_at
    assert f(0, total, spe, lr, "constant", 0) == lr
    for step in (0, 37, 99):
        want = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        assert math.isclose(f(step, total, spe, lr, "cosine", 0), want)
    got = [f(s, total, spe, lr, "step", 0) for s in (49, 50, 74, 75)]
    assert got == pytest.approx([lr, lr * 0.1, lr * 0.1, lr * 0.01])
    # warm-up: linear from lr/10 over 2 epochs (20 steps), then the schedule over the rest
    assert f(0, total, spe, lr, "constant", 2) == pytest.approx(lr * 0.1)
    assert f(10, total, spe, lr, "constant", 2) == pytest.approx(lr * (0.1 + 0.9 * 0.5))
    assert f(20, total, spe, lr, "cosine", 2) == pytest.approx(lr)
    assert f(60, total, spe, lr, "cosine", 2) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 40 / 80)))


# -------------------------------------------------------------------------------- trainer
def test_train_run_writes_checkpoints_log_and_card(tmp_path, tiny_data):
    tr, te = tiny_data
    run = tmp_path / "run"
    log = train_run(run, "vgg_small", tr, te, epochs=3, lr=0.02, weight_decay=1e-4, dropout=0.25,
                    save_epochs=[0, 2, 3], seed=5, batch_size=32, model_kw=TINY, lr_schedule="cosine",
                    progress=False, threads=1)
    assert sorted(run_checkpoints(run)) == [0, 2, 3] == sorted(log.checkpoints)
    assert [p.name for p in log.checkpoints.values()] == ["epoch_000.pt", "epoch_002.pt", "epoch_003.pt"]
    assert not (run / "resume.pt").exists()

    # epoch 0 is the initialisation: the seeded fresh model
    torch.manual_seed(5)
    init = build_model("vgg_small", num_classes=tr.num_classes, dropout=0.25, **TINY)
    ck0 = _weights(log.checkpoints[0])
    assert all(torch.equal(ck0[k], v) for k, v in init.state_dict().items())
    # every checkpoint is a plain state dict that loads strictly into a fresh model
    fresh = run_model_factory(run)()
    for path in log.checkpoints.values():
        sd = _weights(path)
        assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in sd.values())
        fresh.load_state_dict(sd, strict=True)
    last = _weights(log.checkpoints[3])
    assert not torch.equal(last["features.conv1_1.weight"], ck0["features.conv1_1.weight"])

    card = json.loads((run / "run.json").read_text())
    assert card["model"] == "vgg_small" and card["num_classes"] == tr.num_classes and card["seed"] == 5
    assert card["status"] == "done"
    hyper = card["hyper"]
    assert (hyper["lr"], hyper["weight_decay"], hyper["dropout"], hyper["epochs"]) == (0.02, 1e-4, 0.25, 3)
    assert hyper["save_epochs"] == [0, 2, 3] and hyper["model_kw"]["hidden"] == 16

    table = pd.read_parquet(run / "log.parquet")
    assert list(table.columns) == LOG_COLUMNS and table["epoch"].tolist() == [0, 1, 2, 3]
    for col in ("train_top1", "train_top5", "test_top1", "test_top5"):
        assert table[col].between(0, 1).all()
    assert (table["train_top5"] >= table["train_top1"]).all()
    assert (table["test_top5"] >= table["test_top1"]).all()
    steps = math.ceil(len(tr) / 32)
    want_lr = [train_mod._lr_at(max(0, e * steps - 1), 3 * steps, steps, 0.02, "cosine", 0) for e in range(4)]
    np.testing.assert_allclose(table["lr"], want_lr)
    assert np.isfinite(table["train_loss"]).all() and table["seconds"].is_monotonic_increasing

    # the logged test accuracy is the final checkpoint's, recomputed independently here
    fresh.load_state_dict(_weights(log.checkpoints[3]))
    fresh.eval()
    with torch.no_grad():
        logits = torch.cat([fresh(te[i][0][None]) for i in range(len(te))])
    labels = te.labels
    top1 = (logits.argmax(1) == labels).float().mean().item()
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert table["test_top1"].iloc[-1] == pytest.approx(top1)
    assert table["test_top5"].iloc[-1] == pytest.approx(top5)
    assert load_train_log(run).table.equals(table)


def test_finished_run_is_reused_and_other_settings_refused(tmp_path, tiny_data):
    tr, te = tiny_data
    run = tmp_path / "r"
    kw = {"epochs": 1, "lr": 0.01, "seed": 0, "model_kw": TINY, "progress": False, "batch_size": 48}
    train_run(run, "vgg_small_nodrop", tr, te, **kw)
    stamp = (run / "checkpoints" / "epoch_001.pt").stat().st_mtime_ns
    again = train_run(run, "vgg_small_nodrop", tr, te, **kw)  # done: nothing is retrained
    assert (run / "checkpoints" / "epoch_001.pt").stat().st_mtime_ns == stamp
    assert again.table["epoch"].tolist() == [0, 1]
    with pytest.raises(ConceptEvoError, match="hyper.lr"):
        train_run(run, "vgg_small_nodrop", tr, te, **{**kw, "lr": 0.02})
    log = train_run(run, "vgg_small_nodrop", tr, te, **{**kw, "lr": 0.02, "save_epochs": [1]}, overwrite=True)
    assert sorted(log.checkpoints) == [1]  # the old run's files are gone
    assert json.loads((run / "run.json").read_text())["hyper"]["lr"] == 0.02


def test_interrupted_run_resumes_to_identical_weights(tmp_path, tiny_data, interrupt_training):
    tr, te = tiny_data
    kw = {"epochs": 3, "lr": 0.02, "dropout": 0.5, "seed": 1, "model_kw": TINY, "progress": False, "threads": 1,
          "batch_size": 32, "save_epochs": [0, 1, 2, 3]}
    ref = train_run(tmp_path / "ref", "vgg_small", tr, te, **kw)

    interrupt_training(math.ceil(len(tr) / 32))
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "cut", "vgg_small", tr, te, **kw)
    assert (tmp_path / "cut" / "resume.pt").exists()
    assert sorted(run_checkpoints(tmp_path / "cut")) == [0, 1]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    interrupt_training.restore()
    resumed = train_run(tmp_path / "cut", "vgg_small", tr, te, **kw)
    for e in (1, 2, 3):
        a, b = _weights(ref.checkpoints[e]), _weights(resumed.checkpoints[e])
        assert all(torch.equal(a[k], b[k]) for k in a), e
    cols = [c for c in LOG_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(ref.table[cols], resumed.table[cols])


def test_train_subset_eval_sample_and_threads(tmp_path, tiny_data):
    tr, te = tiny_data
    before = torch.get_num_threads()
    log = train_run(tmp_path / "s", "vgg_small", tr, te, epochs=1, lr=0.01, train_subset=20, eval_train_max=8,
                    model_kw=TINY, progress=False, threads=1, augment=True, grad_clip=1.0)
    assert torch.get_num_threads() == before
    card = log.run
    assert card["train_data"]["size"] == 20 and card["threads"] == 1
    # accuracies on 8 images come in steps of 1/8
    assert np.allclose(log.table["train_top1"] * 8, np.round(log.table["train_top1"] * 8))


def test_train_run_bad_arguments(tmp_path, tiny_data):
    tr, te = tiny_data
    base = {"epochs": 2, "lr": 0.01, "model_kw": TINY, "progress": False}
    for bad, match in [({"save_epochs": [3]}, "save_epochs"), ({"lr": -1.0}, "lr"),
                       ({"lr_schedule": "linear"}, "lr_schedule"), ({"warmup_epochs": 5}, "warmup_epochs"),
                       ({"train_subset": 0}, "train_subset"), ({"epochs": -1}, "epochs"),
                       ({"grad_clip": 0.0}, "grad_clip"), ({"threads": 0}, "threads")]:
        with pytest.raises(ConceptEvoError, match=match):
            train_run(tmp_path / "bad", "vgg_small", tr, te, **{**base, **bad})
    with pytest.raises(ConceptEvoError, match="unknown model"):
        train_run(tmp_path / "bad2", "nope", tr, te, **base)


def test_diverging_loss_is_reported_and_earlier_checkpoints_kept(tmp_path):
    ds = tensor_dataset(torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8), torch.arange(32) % 4)
    with pytest.raises(ConceptEvoError, match="loss became") as info:
        train_run(tmp_path / "nan", "vgg_small_nodrop", ds, ds, epochs=3, lr=1e12, model_kw=TINY,
                  progress=False, batch_size=8)
    assert "epoch" in str(info.value) and str(tmp_path / "nan") in str(info.value)
    assert 0 in run_checkpoints(tmp_path / "nan")


def test_user_module_and_dataset_without_tags(tmp_path):
    ds = tensor_dataset(torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8), torch.arange(24) % 3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    log = train_run(tmp_path / "u", "custom", ds, ds, epochs=1, lr=0.05, model=net, progress=False,
                    save_epochs=[1])
    sd = _weights(log.checkpoints[1])
    assert set(sd) == set(net.state_dict())
    assert log.table["test_top5"].eq(1.0).all()  # 3 classes: the top-5 holds every class


# -------------------------------------------------------------------------------- regimes
def test_regime_settings_follow_the_paper():
    wt, hi, of = REGIMES["well_trained"], REGIMES["high_lr"], REGIMES["overfit"]
    assert wt["model_name"] == hi["model_name"] == "vgg_small" and of["model_name"] == "vgg_small_nodrop"
    assert hi["lr"] >= 4 * wt["lr"] and of["weight_decay"] == 0 < wt["weight_decay"]
    for cfg in REGIMES.values():
        assert 5 <= len(cfg["save_epochs"]) <= 8 and cfg["save_epochs"][0] == 0
        assert cfg["save_epochs"][-1] == cfg["epochs"]


def test_train_regimes_small_writes_three_runs(tmp_path):
    runs = train_regimes(tmp_path, seed=0, train_images=120, test_images=48, epoch_scale=0.1, progress=False,
                         threads=1)
    assert set(runs) == {"well_trained", "high_lr", "overfit"}
    for path in runs.values():
        log = load_train_log(path)
        assert log.run["status"] == "done" and len(log.checkpoints) >= 2 and 0 in log.checkpoints
        assert log.table["epoch"].iloc[-1] == max(log.checkpoints)
    assert load_train_log(runs["overfit"]).run["train_data"]["size"] == 12  # a tenth of the training set
    with pytest.raises(ConceptEvoError, match="unknown regime"):
        train_regimes(tmp_path, regimes=["lazy"])


def test_train_regimes_in_two_processes_equals_one(tmp_path):
    kw = {"seed": 4, "train_images": 96, "test_images": 32, "epoch_scale": 0.1, "progress": False, "threads": 1}
    one = train_regimes(tmp_path / "one", regimes=["high_lr", "overfit"], **kw)
    two = train_regimes(tmp_path / "two", regimes=["high_lr", "overfit"], workers=2, **kw)
    for name in one:
        a, b = load_train_log(one[name]), load_train_log(two[name])
        assert list(a.checkpoints) == list(b.checkpoints)
        for e in a.checkpoints:
            sa = torch.load(a.checkpoints[e], weights_only=True)
            sb = torch.load(b.checkpoints[e], weights_only=True)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (name, e)
        pd.testing.assert_frame_equal(a.table.drop(columns="seconds"), b.table.drop(columns="seconds"))


@pytest.mark.slow
def test_regimes_differ_as_in_the_paper(tmp_path):
    """The real regimes at full size (~2.5 min in two processes): well_trained learns progressively
    (the paper's 25/50/75% milestones on different saved epochs), high_lr collapses far below
    well_trained, overfit memorises its subset and has the largest train-test gap.

    One thread per process: on a shared 2-core machine two OpenMP threads are several times slower.
    """
    runs = train_regimes(tmp_path, seed=0, progress=False, threads=1, workers=2)  # side by side, as the demo
    logs = {k: load_train_log(v).table for k, v in runs.items()}
    final = {k: t.iloc[-1] for k, t in logs.items()}
    assert final["well_trained"]["test_top1"] > 0.8
    assert final["high_lr"]["test_top1"] < final["well_trained"]["test_top1"] - 0.4
    # the collapse happens mid-training: high_lr was clearly better before it ended
    assert logs["high_lr"]["test_top1"].max() > final["high_lr"]["test_top1"] + 0.15

    def gap(row):
        return row["train_top1"] - row["test_top1"]

    assert gap(final["overfit"]) > gap(final["well_trained"]) + 0.1
    assert final["overfit"]["train_top1"] > 0.9
    assert final["overfit"]["test_top1"] < final["well_trained"]["test_top1"]
    # a learning curve, not one epoch: concepts are acquired progressively
    wt = logs["well_trained"].set_index("epoch")["train_top1"]
    saved = REGIMES["well_trained"]["save_epochs"]
    assert wt[1] < 0.5 and wt[saved[-1]] - wt[3] > 0.1
    milestones = [min(saved, key=lambda e: abs(wt[e] - m)) for m in (0.25, 0.5, 0.75)]
    assert len(set(milestones)) == 3, milestones

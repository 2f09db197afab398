"""conceptevo.monitor: live monitoring equals the post-hoc chain, leaves training alone, alerts, resumes."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from conceptevo import diagnostics
from conceptevo.data import builtin_dataset
from conceptevo.errors import ConceptEvoError, DataError, LayerError
from conceptevo.models import build_model
from conceptevo.monitor import (
    Alert,
    AlertParams,
    Monitor,
    _lightning,
    _load_stimuli,
    decide_alerts,
    lightning_available,
    lightning_callback,
    tensorboard_available,
)
from conceptevo.space import UnifiedSpace
from conceptevo.stimuli import extract_stimuli
from conceptevo.train import train_run

TINY = {"channels": (4, 8, 8, 8), "hidden": 16}
SPACE = {"dim": 8, "repeats": 3, "epochs": 3}
KW = {"k": 5, "k_i": 3, "batch_size": 32, "space_kw": SPACE, "tensorboard": False}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    """Tiny 16x16 images: the monitor's work, not the model's, is under test."""
    return (builtin_dataset("train", seed=3, num_images=64, image_size=16),
            builtin_dataset("test", seed=3, num_images=40, image_size=16))


def _model(num_classes, seed=0):
    torch.manual_seed(seed)
    return build_model("vgg_small", num_classes=num_classes, **TINY)


def _train_epoch(model, opt, ds, gen):
    model.train()
    perm = torch.randperm(len(ds), generator=gen)
    for b in range(0, len(ds), 32):
        x, y = ds.batch(perm[b:b + 32])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _loop(model, train, monitor, epochs, start=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    out = {}
    if start == 0 and monitor is not None:
        out[0] = monitor.epoch_end(0)
    for ep in range(1, epochs + 1):
        _train_epoch(model, opt, train, gen)
        if ep > start and monitor is not None:
            out[ep] = monitor.epoch_end(ep, train_acc=0.1 * ep)
    return out


# ------------------------------------------------------------------------------ post-hoc
def test_monitor_equals_post_hoc_chain(data, tmp_path):
    """Stimuli, space positions and diagnostics of the monitored checkpoints = a post-hoc run over them."""
    train, probe = data
    model = _model(train.num_classes)
    mon = Monitor(model, probe, out=tmp_path / "mon", name="live", probe_accuracy=True, **KW)
    _loop(model, train, mon, epochs=3)
    assert [e["index"] for e in mon.entries] == [0, 1, 2, 3] and mon.base == 1
    ckpts = [tmp_path / "mon" / e["checkpoint"] for e in mon.entries]
    assert all(p.suffix == ".safetensors" and p.is_file() for p in ckpts)

    def factory():
        return build_model("vgg_small", num_classes=train.num_classes, **TINY)

    post = extract_stimuli(factory, ckpts, probe, k=5, k_i=3, batch_size=32, progress=False,
                           names=[f"e{i}" for i in range(4)])
    for e, s in zip(mon.entries, post):
        live = _load_stimuli(tmp_path / "mon" / e["stimuli"])
        assert live.equals(s), e["index"]
    # the probe accuracy comes from the pass' logits: compare with a plain evaluation
    m3 = factory()
    from safetensors.torch import load_file

    m3.load_state_dict(load_file(ckpts[-1]))
    m3.eval()
    with torch.no_grad():
        x, y = probe.batch(torch.arange(len(probe)))
        acc = float((m3(x).argmax(1) == y).float().mean())
    assert mon.entries[-1]["probe_top1"] == pytest.approx(acc)

    space = UnifiedSpace.fit(post[1], model="live", epoch=1, seed=0, threads=1, progress=False, **SPACE)
    for i in (0, 2, 3):
        space.add("live", i, post[i])
    space.layout_2d("pca", seed=0)
    emb, live_emb = space.embeddings(), mon.space.embeddings()
    np.testing.assert_array_equal(np.stack(emb["vector"]), np.stack(live_emb["vector"]))
    np.testing.assert_array_equal(emb[["x", "y"]].to_numpy(), live_emb[["x", "y"]].to_numpy())
    train_top1 = [mon.entries[0]["probe_top1"], *(0.1 * e for e in (1, 2, 3))]
    logs = {"live": pd.DataFrame({"epoch": [0, 1, 2, 3], "train_top1": train_top1,
                                  "test_top1": [np.nan] * 4})}
    diag = diagnostics.diagnose(emb, logs, reference="live")
    pd.testing.assert_frame_equal(diag.table, mon.diagnosis.table)
    assert diag.verdicts["live"]["diversity_last"] == mon.diagnosis.verdicts["live"]["diversity_last"]
    # logs: one JSONL line per observation, the Parquet table, the self-refreshing page
    lines = (tmp_path / "mon" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [0, 1, 2, 3]
    assert set(json.loads(lines[-1])["seconds"]) == {"checkpoint", "stimuli", "space", "layout", "diagnostics"}
    assert "logs" in mon.entries[-1]["seconds"]
    table = pd.read_parquet(tmp_path / "mon" / "metrics.parquet")
    np.testing.assert_allclose(table["diversity"].to_numpy()[1:],
                               diag.table["diversity"].to_numpy()[1:])
    page = (tmp_path / "mon" / "monitor.html").read_text()
    assert 'http-equiv="refresh"' in page and "data:image/png;base64," in page


def test_refit_policy_and_step_mode(data, tmp_path):
    """refit_every moves the base to the newest checkpoint and re-projects the rest; step() every N."""
    train, probe = data
    model = _model(train.num_classes)
    mon = Monitor(model, probe, out=tmp_path / "mon", refit_every=2, every=3, **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for s in range(10):
        if s:
            _train_epoch(model, opt, train.subset(np.arange(16)), gen)
        assert mon.step(s, train_acc=0.01 * s) == []
    assert [e["index"] for e in mon.entries] == [0, 3, 6, 9] and mon.unit == "step"
    assert mon.base == 9  # fitted at 3, refitted two observations later at 9
    stims = {e["index"]: _load_stimuli(tmp_path / "mon" / e["stimuli"]) for e in mon.entries}
    space = UnifiedSpace.fit(stims[9], model="run", epoch=9, seed=0, threads=1, progress=False, **SPACE)
    for i in (0, 3, 6):
        space.add("run", i, stims[i])
    np.testing.assert_array_equal(np.stack(space.embeddings()["vector"]), np.stack(mon.space.embeddings()["vector"]))
    with pytest.raises(ConceptEvoError, match="mix"):
        mon.epoch_end(12)


# ------------------------------------------------------------------------- no side effects
def test_monitor_leaves_training_alone(data, tmp_path):
    """Mode, RNG states and gradients untouched; train_run's weights bitwise equal with and without it."""
    train, probe = data
    model = _model(train.num_classes)
    model.train()
    model.classifier.eval()  # a mixed mode must come back as it was
    x, y = train.batch(torch.arange(16))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    mon = Monitor(model, probe, out=tmp_path / "mon", **KW)
    modes = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    mon.epoch_end(0)
    mon.epoch_end(1)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())

    def run(folder, with_monitor):
        m = _model(train.num_classes, seed=4)
        mo = Monitor(m, probe, out=tmp_path / f"m_{folder}", **KW) if with_monitor else None
        train_run(tmp_path / folder, "vgg_small", train, probe, epochs=2, lr=0.05, seed=4, batch_size=32,
                  model=m, model_kw=TINY, progress=False, monitor=mo)
        return m.state_dict(), mo

    plain, _ = run("plain", False)
    watched, mo = run("watched", True)
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert [e["index"] for e in mo.entries] == [0, 1, 2]
    assert mo.entries[-1]["train_acc_source"] == "caller" and mo.entries[-1]["test_top1"] is not None
    with pytest.raises(ConceptEvoError, match="model passed"):
        train_run(tmp_path / "x", "vgg_small", train, probe, epochs=1, lr=0.05, model=_model(train.num_classes),
                  model_kw=TINY, progress=False, monitor=mo)


# ------------------------------------------------------------------------------ riding
def _caller_pass(model, probe, batch, rp=None, poison=None):
    """The caller's own evaluation forward over the probe, in probe order, in batches of ``batch``."""
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(probe), batch):
            x, y = probe.batch(torch.arange(lo, min(lo + batch, len(probe))))
            if poison is not None and lo == 0:
                x[poison] = float("nan")
            logits = model(x)
            if rp is not None:
                rp.add_logits(logits, y)


def test_riding_equals_own_pass(data, tmp_path, rng):
    """A monitor riding the caller's forward (odd batch sizes) observes what one running its own pass
    observes: the same stimuli, positions, diagnostics and probe accuracy; the model is untouched."""
    train, probe = data
    model = _model(train.num_classes)
    own = Monitor(model, probe, out=tmp_path / "own", probe_accuracy=True, **KW)
    rider = Monitor(model, probe, out=tmp_path / "rider", **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for ep in range(4):
        if ep:
            _train_epoch(model, opt, train, gen)
        own.epoch_end(ep, train_acc=0.1 * ep if ep else None)
        modes = {n: m.training for n, m in model.named_modules()}
        # any batch size, but no one-image batch: on the CPU a batch of one takes another convolution
        # path whose float rounding differs (~1e-6); the monitor's own pass has batch_size 32
        batch = int(rng.choice([b for b in range(2, len(probe) + 1) if len(probe) % b != 1]))
        with rider.riding(ep) as rp:
            _caller_pass(model, probe, batch, rp)
            if ep:
                rp.set_accuracy(train_acc=0.1 * ep)
        assert rp.active and rp.alerts == rider.alerts[len(rider.alerts) - len(rp.alerts):]
        assert {n: m.training for n, m in model.named_modules()} == {**modes, **{n: False for n in modes}}
        model.train()
    for a, b in zip(own.entries, rider.entries, strict=True):
        assert a["index"] == b["index"] and b["probe_pass"] == "caller" and a["probe_pass"] == "monitor"
        assert _load_stimuli(tmp_path / "own" / a["stimuli"]).equals(_load_stimuli(tmp_path / "rider" / b["stimuli"]))
        assert a["train_top1"] == b["train_top1"]
    assert rider.entries[0]["probe_top1"] == pytest.approx(own.entries[0]["probe_top1"])
    e1, e2 = own.space.embeddings(), rider.space.embeddings()
    np.testing.assert_array_equal(e1[["x", "y"]].to_numpy(), e2[["x", "y"]].to_numpy())
    pd.testing.assert_frame_equal(own.diagnosis.table, rider.diagnosis.table)


def test_riding_bad_passes(data, tmp_path):
    """Too few or too many images are errors naming the counts; an error in the block observes
    nothing; an off epoch (every=2) hooks nothing; NaN activations are a 'diverged' alert."""
    train, probe = data
    model = _model(train.num_classes)
    mon = Monitor(model, probe, out=tmp_path / "mon", every=2, **KW)
    with pytest.raises(DataError, match=f"fed {len(probe) - 8} images, the probe has {len(probe)}"), mon.riding(0):
        _caller_pass(model, probe.subset(np.arange(len(probe) - 8)), 16)
    with pytest.raises(DataError, match=f"more images than the probe's {len(probe)}"), mon.riding(0):
        _caller_pass(model, probe, 16)
        _caller_pass(model, probe, 16)
    with pytest.raises(RuntimeError, match="the caller failed"), mon.riding(0):
        _caller_pass(model, probe, 16)
        raise RuntimeError("the caller failed")
    assert mon.entries == [] and not list((tmp_path / "mon").glob("checkpoints/*"))
    with mon.riding(1) as rp:  # not an observed epoch: nothing is hooked, any pass is fine
        _caller_pass(model, probe.subset(np.arange(3)), 2)
    assert not rp.active and mon.entries == []
    with mon.riding(2) as rp:
        _caller_pass(model, probe, 16, poison=1)
    assert [a.kind for a in rp.alerts] == ["diverged"] and "NaN activations" in rp.alerts[0].message
    assert mon.entries[-1]["diverged"] and mon.entries[-1]["stimuli"] is None
    with mon.riding(4) as rp:  # a clean pass afterwards observes normally
        _caller_pass(model, probe, 16)
    assert rp.alerts == [] and mon.entries[-1]["stimuli"] is not None
    with pytest.raises(ConceptEvoError, match="do not mix"), mon.riding(6, unit="step"):
        pass


# ------------------------------------------------------------------------------ bad input
def test_bad_input_fails_at_construction(data, tmp_path):
    train, probe = data
    model = _model(train.num_classes)
    with pytest.raises(LayerError, match="features.nope"):
        Monitor(model, probe, layers=["features.nope"], out=tmp_path / "a", **KW)
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match="broken.png"):
        Monitor(model, tmp_path / "imgs", out=tmp_path / "b", **KW)
    with pytest.raises(DataError, match="empty"):
        Monitor(model, probe.subset(np.zeros(0, dtype=np.int64)), out=tmp_path / "c", **KW)
    with pytest.raises(ConceptEvoError, match="every"):
        Monitor(model, probe, every=0, out=tmp_path / "d", **KW)
    # a folder probe that decodes works, named per file order
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "broken.png")
    mon = Monitor(model, tmp_path / "imgs", out=tmp_path / "e", **KW)
    assert len(mon.probe) == 2


# ---------------------------------------------------------------------------------- resume
def test_resume_continues_state(data, tmp_path):
    train, probe = data
    a = _model(train.num_classes)
    full = Monitor(a, probe, out=tmp_path / "full", **KW)
    _loop(a, train, full, epochs=2)

    b = _model(train.num_classes)
    first = Monitor(b, probe, out=tmp_path / "split", **KW)
    _loop(b, train, first, epochs=1)
    del first
    again = Monitor(b, probe, out=tmp_path / "split", **KW)  # a restarted loop: same out, same settings
    assert [e["index"] for e in again.entries] == [0, 1] and again.base == 1
    b.load_state_dict(a.state_dict())  # continue with the weights the uninterrupted run had at epoch 2
    again.epoch_end(2, train_acc=0.2)
    drop = [c for c in full.table if c.startswith("seconds_")]
    pd.testing.assert_frame_equal(full.table.drop(columns=drop), again.table.drop(columns=drop))
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [0, 1, 2]
    # observing an earlier epoch again (a loop restarted from a checkpoint) replaces the later ones
    again.epoch_end(1, train_acc=0.1)
    assert [e["index"] for e in again.entries] == [0, 1]
    with pytest.raises(ConceptEvoError, match="other settings"):
        Monitor(b, probe, out=tmp_path / "split", **{**KW, "k": 4})
    fresh = Monitor(b, probe, out=tmp_path / "split", resume=False, **KW)
    assert fresh.entries == [] and not (tmp_path / "split" / "metrics.jsonl").exists()


# -------------------------------------------------------------------------------- alerts
def test_diverged_weights_alert_not_crash(data, tmp_path):
    train, probe = data
    model = _model(train.num_classes)
    mon = Monitor(model, probe, out=tmp_path / "mon", **KW)
    assert mon.epoch_end(0) == [] and mon.epoch_end(1) == []
    with torch.no_grad():
        model.features.conv2_1.weight[0, 0, 0, 0] = float("nan")
    alerts = mon.epoch_end(2)
    assert [a.kind for a in alerts] == ["diverged"]
    assert "features.conv2_1.weight" in alerts[0].evidence["nonfinite_tensors"] and alerts[0].margin > 0
    assert mon.entries[-1]["diverged"] and mon.entries[-1]["stimuli"] is None
    with torch.no_grad():  # finite weights, infinite activations and logits
        model.features.conv2_1.weight.fill_(1e38)
    alerts = mon.epoch_end(3)
    assert [a.kind for a in alerts] == ["diverged"] and alerts[0].epoch == 3
    logged = [json.loads(s)["kind"] for s in (tmp_path / "mon" / "alerts.jsonl").read_text().splitlines()]
    assert logged == ["diverged", "diverged"]


def _table(train, test, movement):
    n = len(train)
    return pd.DataFrame({"model": "r", "epoch": np.arange(n), "diversity": 1.0, "train_top1": train,
                         "test_top1": test, "movement": movement})


def test_decide_alerts_signatures():
    p = AlertParams(window=2)
    ok = {"r": {"diversity_collapses": False}}
    # overfitting: train climbs, test stalls, movement per gain falls to a third of the early climb
    t = _table([0.1, 0.4, 0.6, 0.8, 0.95], [0.1, 0.35, 0.5, 0.5, 0.5], [np.nan, 3.0, 2.0, 0.4, 0.3])
    a = decide_alerts(diagnostics.Diagnosis(t, pd.DataFrame(), ok), "r", 4, p, peak_from=1)
    assert [x.kind for x in a] == ["overfitting"]
    ev = a[0].evidence
    assert ev["movement_per_gain"] == pytest.approx(0.7 / 0.35) and ev["reference_movement_per_gain"] == \
        pytest.approx(2.0 / 0.2)
    assert a[0].margin == pytest.approx(0.85 - (0.7 / 0.35) / (2.0 / 0.2))
    # the same movement with held-out accuracy still climbing: no alert; nor with a fast-moving run
    t2 = t.assign(test_top1=[0.1, 0.35, 0.5, 0.6, 0.7])
    assert decide_alerts(diagnostics.Diagnosis(t2, pd.DataFrame(), ok), "r", 4, p, 1) == []
    t3 = t.assign(movement=[np.nan, 3.0, 2.0, 2.0, 2.0])
    assert decide_alerts(diagnostics.Diagnosis(t3, pd.DataFrame(), ok), "r", 4, p, 1) == []
    # lr too high: the post-hoc verdict decides; its numbers are the evidence and margin
    v = {"r": {"diversity_collapses": True, "spread_vs_peak": 0.5, "accuracy_fall": 0.3, "diversity_peak": 2.0,
               "diversity_peak_epoch": 2, "diversity_last": 1.3, "last_epoch": 5, "train_top1_best": 0.45,
               "train_top1_last": 0.15}}
    flat = _table([0.1, 0.3, 0.45, 0.3, 0.2, 0.15], [np.nan] * 6, [np.nan, 1, 1, 1, 1, 1])
    a = decide_alerts(diagnostics.Diagnosis(flat, pd.DataFrame(), v), "r", 5, AlertParams(), 1)
    assert [x.kind for x in a] == ["lr_too_high"]
    assert a[0].margin == pytest.approx(min(0.75 - 0.5, 0.3 - 0.05)) and a[0].evidence["last_epoch"] == 5
    assert isinstance(a[0], Alert) and json.dumps(a[0].to_dict())


def test_high_lr_run_alerts(data, tmp_path):
    """A run whose learning rate destroys what it learned: the collapse alert fires, nothing crashes."""
    train, probe = data
    model = _model(train.num_classes, seed=1)
    mon = Monitor(model, probe, out=tmp_path / "mon", **KW)
    # a healthy climb, then a collapse: simulated by reinitialising the deeper layers to one filter
    mon.epoch_end(0, train_acc=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for ep in (1, 2):
        _train_epoch(model, opt, train, gen)
        assert mon.epoch_end(ep, train_acc=0.2 * ep) == []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(mod.weight[:1].expand_as(mod.weight).clone())
                mod.bias.zero_()
    alerts = mon.epoch_end(3, train_acc=0.08)
    assert "lr_too_high" in [a.kind for a in alerts], mon.diagnosis.verdicts
    a = next(a for a in alerts if a.kind == "lr_too_high")
    assert a.evidence["spread_vs_peak"] < 0.75 and a.evidence["accuracy_fall"] >= 0.05 and a.margin > 0


# ------------------------------------------------------------------- optional integrations
@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_scalars_and_map(data, tmp_path):
    train, probe = data
    model = _model(train.num_classes)
    mon = Monitor(model, probe, out=tmp_path / "mon", **{**KW, "tensorboard": True})
    mon.epoch_end(0)
    mon.epoch_end(1)
    mon.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "mon" / "tensorboard"))
    acc.Reload()
    assert "conceptevo/diversity" in acc.Tags()["scalars"] and "conceptevo/map" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("conceptevo/probe_top1")] == [0, 1]


def _lightning_module(num_classes):
    """A LightningModule around the tiny model: logs train_acc per epoch and val_acc on validation."""
    pl = _lightning()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model(num_classes)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _i):
            x, y = batch
            out = self(x)
            self.log("train_acc", (out.argmax(1) == y).float().mean(), on_epoch=True, on_step=False)
            return torch.nn.functional.cross_entropy(out, y)

        def validation_step(self, batch, _i):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Module()


@pytest.mark.skipif(not lightning_available(), reason="lightning / pytorch_lightning is not installed")
def test_lightning_callback(data, tmp_path):
    pl = _lightning()
    train, probe = data
    module = _lightning_module(train.num_classes)
    mon = Monitor(module, probe, out=tmp_path / "mon", **KW)
    cb = lightning_callback(mon)
    loader = torch.utils.data.DataLoader(train, batch_size=32)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, loader)
    assert [e["index"] for e in mon.entries] == [1, 2]
    assert mon.entries[-1]["train_acc_source"] == "caller"


@pytest.mark.skipif(not lightning_available(), reason="lightning / pytorch_lightning is not installed")
def test_lightning_callback_rides_validation(data, tmp_path):
    """ride_validation: the monitor observes on Lightning's validation pass over the probe and equals a
    monitor running its own forward on an identical training; the sanity check is not observed; a
    validation set that is not the probe is an error naming the counts."""
    pl = _lightning()
    train, probe = data

    def fit(folder, ride, val_set=probe):
        torch.manual_seed(0)
        module = _lightning_module(train.num_classes)
        mon = Monitor(module, probe, out=tmp_path / folder, **KW)
        cb = lightning_callback(mon, ride_validation=ride)
        trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                             num_sanity_val_steps=2)
        trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=32),
                    torch.utils.data.DataLoader(val_set, batch_size=16, shuffle=False))  # no 1-image batch
        return mon, cb

    ride, cb = fit("ride", True)
    own, _ = fit("own", False)
    assert [e["index"] for e in ride.entries] == [1, 2] and [e["index"] for e in own.entries] == [1, 2]
    for a, b in zip(own.entries, ride.entries, strict=True):
        assert b["probe_pass"] == "caller" and a["probe_pass"] == "monitor"
        assert b["train_acc_source"] == "caller" and b["test_top1"] == a["test_top1"]
        assert _load_stimuli(tmp_path / "own" / a["stimuli"]).equals(_load_stimuli(tmp_path / "ride" / b["stimuli"]))
    assert [a.kind for a in cb.last_alerts] == ride.entries[-1]["alerts"] == own.entries[-1]["alerts"]
    with pytest.raises(DataError, match=f"the probe has {len(probe)}"):
        fit("wrong", True, val_set=probe.subset(np.arange(len(probe) - 5)))


# ------------------------------------------------------------------- the built-in trainer
def test_chance_band_bounds_guessing():
    """The band holds a guessing classifier's accuracy (simulated) about 99.9% of the time."""
    from conceptevo.monitor import chance_band

    rng = np.random.default_rng(0)
    for classes, n in ((32, 1000), (10, 200), (1000, 5000)):
        acc = rng.binomial(n, 1.0 / classes, size=20_000) / n
        inside = float((acc <= chance_band(classes, n)).mean())
        assert 0.99 <= inside < 1.0, (classes, n, inside)


@pytest.mark.parametrize("riding", [False, True])
def test_trainer_builds_monitor_and_resumes_it(data, tmp_path, interrupt_training, riding):
    """train_run(monitor=factory): one observation per epoch, the same weights as without it; an
    interrupted run resumes its monitor too (no epoch twice, none missing). ``riding``: the factory
    takes the trainer's evaluation images and the monitor rides its evaluation pass."""
    import math

    from conceptevo.monitor import alert_summary

    train, test = data
    kw = dict(epochs=3, lr=0.05, seed=2, model_kw=TINY, progress=False, threads=1, batch_size=32,
              save_epochs=[0, 1, 2, 3])

    if riding:
        def watch(net, resume, probe):
            assert len(probe) == len(train) + len(test)  # eval_train_max 1000 > 64: all of train, then test
            return Monitor(net, probe, out=tmp_path / "cut" / "monitor", name="cut", resume=resume, **KW)
    else:
        def watch(net, resume):
            return Monitor(net, train, out=tmp_path / "cut" / "monitor", name="cut", resume=resume, **KW)

    ref = train_run(tmp_path / "ref", "vgg_small", train, test, **kw)
    interrupt_training(math.ceil(len(train) / 32))
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "cut", "vgg_small", train, test, monitor=watch, **kw)
    interrupt_training.restore()
    cut = train_run(tmp_path / "cut", "vgg_small", train, test, monitor=watch, **kw)
    for e in ref.checkpoints:
        a = torch.load(ref.checkpoints[e], weights_only=True)
        b = torch.load(cut.checkpoints[e], weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), e
    metrics = pd.read_parquet(tmp_path / "cut" / "monitor" / "metrics.parquet")
    assert metrics["epoch"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(metrics["train_top1"], cut.table["train_top1"])  # the trainer's accuracies
    s = alert_summary(tmp_path / "cut")
    assert s["observations"] == 4 and s["run"] == "cut"
    assert s["peak_top1"] == pytest.approx(cut.table["train_top1"].max())
    assert alert_summary(tmp_path / "ref") is None  # no monitor, no summary
    state = json.loads((tmp_path / "cut" / "monitor" / "monitor_state.json").read_text())
    assert {e["probe_pass"] for e in state["entries"]} == {"caller" if riding else "monitor"}


def test_train_regimes_monitor_switch(tmp_path):
    """train_regimes(monitor=True): each run has its monitor folder; the weights are unchanged."""
    from conceptevo.train import load_train_log, train_regimes

    kw = {"seed": 4, "train_images": 96, "test_images": 32, "epoch_scale": 0.1, "progress": False, "threads": 1}
    plain = train_regimes(tmp_path / "plain", regimes=["high_lr"], **kw)
    watched = train_regimes(tmp_path / "watched", regimes=["high_lr"], monitor=True, monitor_probe=40, **kw)
    a, b = load_train_log(plain["high_lr"]), load_train_log(watched["high_lr"])
    for e in a.checkpoints:
        sa = torch.load(a.checkpoints[e], weights_only=True)
        sb = torch.load(b.checkpoints[e], weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), e
    m = pd.read_parquet(watched["high_lr"] / "monitor" / "metrics.parquet")
    assert m["epoch"].tolist() == a.table["epoch"].tolist()
    state = json.loads((watched["high_lr"] / "monitor" / "monitor_state.json").read_text())
    assert state["params"]["num_images"] == 40 and state["params"]["name"] == "high_lr"
    assert not (plain["high_lr"] / "monitor").exists()
    # the default probe: the run's evaluation images, the monitor riding the trainer's evaluation pass
    rode = train_regimes(tmp_path / "rode", regimes=["high_lr"], monitor=True, **kw)
    c = load_train_log(rode["high_lr"])
    pd.testing.assert_frame_equal(a.table.drop(columns="seconds"), c.table.drop(columns="seconds"))
    for e in a.checkpoints:
        sa = torch.load(a.checkpoints[e], weights_only=True)
        sc = torch.load(c.checkpoints[e], weights_only=True)
        assert all(torch.equal(sa[k], sc[k]) for k in sa), e
    state = json.loads((rode["high_lr"] / "monitor" / "monitor_state.json").read_text())
    assert state["params"]["num_images"] == 96 + 32  # min(eval_train_max, 96) training images + the test set
    assert all(e["probe_pass"] == "caller" and e["train_acc_source"] == "caller" for e in state["entries"])
    # its stimuli equal a post-hoc pass over the saved checkpoints and the same evaluation images
    from conceptevo.data import builtin_dataset, concat_image_sets

    tr = builtin_dataset("train", seed=4, num_images=96)
    te = builtin_dataset("test", seed=4, num_images=32)
    evalset = concat_image_sets(tr.subset(np.arange(96)), te)
    ckpts = [rode["high_lr"] / "monitor" / e["checkpoint"] for e in state["entries"]]

    def factory():  # channels-last as the trainer's model (the memory format changes the float rounding)
        return build_model("vgg_small", num_classes=tr.num_classes).to(memory_format=torch.channels_last)

    post = extract_stimuli(factory, ckpts, evalset, k=10, k_i=5, batch_size=50, progress=False,
                           names=[f"e{i}" for i in range(len(ckpts))])
    for e, s in zip(state["entries"], post, strict=True):
        assert _load_stimuli(rode["high_lr"] / "monitor" / e["stimuli"]).equals(s), e["index"]


def test_monitor_logs_tracer_class_shares(data, tmp_path):
    """With a Tracer, every observation logs the top 3 classes by share of the traced update since
    the previous observation; reference: the class rows of the tracer's own epoch windows."""
    from conceptevo.tracing import Tracer

    train, probe = data
    m = _model(train.num_classes, seed=2)
    tr = Tracer(verbose=False)
    mon = Monitor(m, probe, out=tmp_path / "mon", tracer=tr, **KW)
    train_run(tmp_path / "run", "vgg_small", train, probe, epochs=2, lr=0.05, seed=2, batch_size=32, model=m,
              model_kw=TINY, progress=False, monitor=mon, tracer=tr, save_epochs=[0, 1, 2])
    C = train.num_classes
    for ep in (1, 2):
        win = tr.windows[(ep - 1, ep)]
        n2 = sum(v[:C].reshape(C, -1).pow(2).sum(1) for v in win.values())
        ref = (n2.sqrt() / n2.sqrt().sum()).numpy()
        got = next(e for e in mon.entries if e["index"] == ep)["trace_top_classes"]
        assert len(got) == 3 and [g["class"] for g in got] == list(np.argsort(-ref, kind="stable")[:3])
        assert np.allclose([g["share"] for g in got], np.sort(ref)[::-1][:3], rtol=1e-9)
        assert got[0]["name"] == train.class_names[got[0]["class"]] and got[0]["exact"]
    lines = [json.loads(s) for s in (tmp_path / "mon" / "metrics.jsonl").read_text().splitlines()]
    assert [g["class"] for g in lines[-1]["trace_top_classes"]] == [g["class"] for g in got]


def test_alert_summary_reads_the_current_alerts(tmp_path):
    """A re-observed index drops later alerts from the monitor's state; the append-only log keeps
    them. The summary follows the state (and the log only when there is no state)."""
    from conceptevo.monitor import alert_summary

    mdir = tmp_path / "run" / "monitor"
    mdir.mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 1, 2], "train_top1": [0.1, 0.2, 0.3]}).to_parquet(mdir / "metrics.parquet")
    old = {"kind": "lr_too_high", "epoch": 3, "margin": 0.1, "message": "m", "evidence": {}}
    (mdir / "alerts.jsonl").write_text(json.dumps(old) + "\n")
    assert [a["epoch"] for a in alert_summary(tmp_path / "run")["alerts"]] == [3]
    (mdir / "monitor_state.json").write_text(json.dumps({"alerts": []}))
    s = alert_summary(tmp_path / "run")
    assert s["alerts"] == [] and s["first"] == {} and s["observations"] == 3 and s["chance_band"] is None

"""Tracing (Pfahler & Morik): sources of a layer's change, checked against independent references."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conceptevo import tracing
from conceptevo.errors import ConceptEvoError, LayerError
from conceptevo.tracing import Tracer, checkpoint_sources, decompose, layer_info


def _conv_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2, padding=1, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _mlp(seed, d_in=7, hidden=6, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("layer", ["0", "2", "5"])
def test_checkpoint_sources_are_exact_on_random_models(rng, layer):
    seed = int(rng.integers(1 << 30))
    states = {e: {k: v.clone() for k, v in _conv_net(seed + e).state_dict().items()} for e in (0, 1, 3, 4)}
    model = _conv_net(seed + 4)
    info = layer_info(model, layer)
    src = checkpoint_sources(states, layer)
    assert list(src.meta["source"]) == ["epochs 0->1", "epochs 1->3", "epochs 3->4"]
    x = torch.from_numpy(rng.normal(size=(2, 3, 8, 8))).float()
    a = tracing.layer_input(model, layer, x).double()
    w = states[4][f"{layer}.weight"].double() - states[0][f"{layer}.weight"].double()
    b = (states[4][f"{layer}.bias"].double() - states[0][f"{layer}.bias"].double()) if info.has_bias else None
    # independent reference for dz: the layer's own module with the weight difference
    dz = info.apply(a, w, b)
    table, stats = decompose(info, a, src, dz)
    assert stats["residual"] <= 1e-5
    assert math.isclose((table["norm"] * table["cos"]).sum(), dz.norm().item(), rel_tol=1e-6)
    assert math.isclose(table["share"].sum(), 1.0, rel_tol=1e-6)
    # every source's own term, by brute force
    for i in range(3):
        ci = info.apply(a, src.dw[i], None if src.db is None else src.db[i])
        assert math.isclose(table["dot"][i], float((ci * dz).sum()), rel_tol=1e-6, abs_tol=1e-9)
    # a channel subset is a neuron's own map
    sub, st2 = decompose(info, a, src, dz[:, [1]], channels=[1])
    assert st2["residual"] <= 1e-5 and math.isclose(sub["share"].sum(), 1.0, rel_tol=1e-6)


def test_layer_errors_name_the_layer():
    model = _conv_net(0)
    with pytest.raises(LayerError, match="'1'.*ReLU"):
        layer_info(model, "1")
    with pytest.raises(LayerError, match="nope"):
        layer_info(model, "nope")
    with pytest.raises(ConceptEvoError, match="epoch 7"):
        checkpoint_sources({0: model.state_dict(), 1: model.state_dict()}, "0", 0, 7)


# ------------------------------------------------------------------------- class tracing
def _train(model, opt_fn, steps=12, batch=8, classes=3, d_in=7, seed=0, clip=None, ids=False, tracer_kw=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, d_in, generator=g)
    Y = torch.randint(0, classes, (40,), generator=g)
    opt = opt_fn(model.parameters())
    tr = Tracer(layers=nn.Linear, num_classes=classes, verbose=False, **(tracer_kw or {}))
    tr.attach(model, opt)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = []
    for s in range(steps):
        idx = torch.randperm(40, generator=g)[:batch]
        x, y = X[idx], Y[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        tr.after_step(y, idx if ids else None)
        batches.append((idx, y))
    tr.end_epoch(1)
    tr.finish()
    return tr, start, batches, X, Y


SGDS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
    "momentum_wd": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, weight_decay=0.05),
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.2, weight_decay=0.1),
    "nesterov_damp": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7, nesterov=True, weight_decay=0.01),
}


def _brute_force_classes(model0_state, opt_name, batches, X, Y, classes, lr, mu, wd, damp=0.0, nesterov=False):
    """Independent reference: replay training with one backward per example, group by class,
    and run the SGD recurrence per class (plain Python, no hooks)."""
    model = _mlp(0)
    model.load_state_dict(model0_state)
    names = [n for n, _ in model.named_parameters()]
    acc = {n: torch.zeros((classes + 1,) + p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    buf = {n: None for n in names}
    for idx, y in batches:
        B = len(idx)
        per_class = {n: torch.zeros((classes + 1,) + p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
        for i in range(B):
            model.zero_grad()
            (F.cross_entropy(model(X[idx[i:i + 1]]), y[i:i + 1]) / B).backward()
            for n, p in model.named_parameters():
                per_class[n][int(y[i])] += p.grad.double()
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = per_class[n]
                g[classes] = wd * p.double()
                if mu:
                    buf[n] = g.clone() if buf[n] is None else mu * buf[n] + (1 - damp) * g
                    d = g + mu * buf[n] if nesterov else buf[n]
                else:
                    d = g
                upd = -lr * d
                acc[n] += upd
                p.add_(upd.sum(0).float())
    return acc


@pytest.mark.parametrize("opt_name", list(SGDS))
def test_class_accumulators_sum_to_update_and_match_brute_force(opt_name):
    model = _mlp(0)
    s0 = {k: v.clone() for k, v in model.state_dict().items()}
    tr, start, batches, X, Y = _train(model, SGDS[opt_name])
    assert tr.exact
    g = tr.opt.param_groups[0]
    ref = _brute_force_classes(s0, opt_name, batches, X, Y, 3, g["lr"], g["momentum"], g["weight_decay"],
                               g["dampening"], g["nesterov"])
    for layer in ("0", "2"):
        for key in ("weight", "bias"):
            acc = tr.windows[(0, 1)][f"{layer}.{key}"]
            total = model.state_dict()[f"{layer}.{key}"].double() - start[f"{layer}.{key}"].double()
            assert torch.allclose(acc.sum(0), total, rtol=0, atol=1e-12 + 1e-12 * total.abs().max())
            # classes + weight decay against the per-example replay
            scale = float(total.abs().max())
            assert torch.allclose(acc[:3], ref[f"{layer}.{key}"][:3], atol=2e-5 * scale)
            assert torch.allclose(acc[3], ref[f"{layer}.{key}"][3], atol=2e-5 * scale)
            assert float(acc[5].abs().max()) <= 2e-5 * scale  # 'other': float rounding only
            if g["weight_decay"] == 0:
                assert float(acc[3].abs().max()) == 0.0
    assert tr.max_mismatch < 1e-4


def test_per_example_records_equal_vmap_grad_and_sum_to_classes():
    from torch.func import functional_call, grad, vmap

    model = _mlp(1)
    s0 = {k: v.clone() for k, v in model.state_dict().items()}
    tr, start, batches, X, Y = _train(model, SGDS["momentum_wd"], ids=True, tracer_kw={"example_layers": ["2"]})
    blob = tr.example_blob()
    # per-example gradients of the first step, from torch.func at the initial weights
    ref_model = _mlp(1)
    ref_model.load_state_dict(s0)
    params = {k: v.detach() for k, v in ref_model.named_parameters()}
    idx, y = batches[0]
    B = len(idx)

    def loss_one(p, x, t):
        return F.cross_entropy(functional_call(ref_model, p, (x[None],)), t[None]) / B

    pg = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X[idx], y)
    want = torch.cat([pg["2.weight"].reshape(B, -1), pg["2.bias"]], 1)
    got = blob["2"][:B]
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(blob["ids"][:B], idx)
    # the examples' updates over the window = the class sources (without decay/prior/other)
    rows, meta = tracing.example_sources(tr.meta(), blob, "2", (3, 6), 0, len(batches), labels=Y.numpy())
    acc = tr.windows[(0, 1)]
    cls_sum = torch.cat([acc["2.weight"][:3].sum(0).reshape(-1), acc["2.bias"][:3].sum(0)])
    assert torch.allclose(rows.sum(0), cls_sum, atol=1e-6 * float(cls_sum.abs().max()))
    for c in range(3):
        cls_c = torch.cat([acc["2.weight"][c].reshape(-1), acc["2.bias"][c]])
        part = rows[torch.tensor((meta["class"] == c).to_numpy())].sum(0)
        assert torch.allclose(part, cls_c, atol=1e-6 * float(cls_sum.abs().max()))


def test_clipping_is_a_common_factor_not_other():
    model = _mlp(2)
    tr, _start, *_ = _train(model, SGDS["momentum"], clip=0.05)
    assert tr.kappa_dev > 0.1  # the clip did act
    acc = tr.windows[(0, 1)]["0.weight"]
    assert float(acc[5].abs().max()) <= 1e-5 * float(acc.sum(0).abs().max())


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_adam_is_labelled_approximate_and_sums_exactly(opt):
    model = _mlp(3)
    fn = (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)) if opt == "adam" else (
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1))
    tr, start, *_ = _train(model, fn)
    assert not tr.exact
    acc = tr.windows[(0, 1)]["0.weight"]
    total = model.state_dict()["0.weight"].double() - start["0.weight"].double()
    assert torch.allclose(acc.sum(0), total, atol=1e-12)
    assert float(acc[:3].sum(0).abs().max()) > 0.5 * float(total.abs().max())  # classes carry the update
    src = tr.sources("0", 0, 1)
    assert not src.meta.loc[src.meta["kind"] == "class", "exact"].any()
    if opt == "adamw":
        assert src.meta.loc[src.meta["kind"] == "weight_decay", "exact"].all()
        # 12 decoupled decays -lr*wd*W_s: along -W, about 12*lr*wd*|W| in size
        mid = (start["0.weight"].double() + model.state_dict()["0.weight"].double()) / 2
        assert F.cosine_similarity(acc[3].reshape(-1), -mid.reshape(-1), dim=0) > 0.95
        assert math.isclose(float(acc[3].norm()), 12 * 0.01 * 0.1 * float(mid.norm()), rel_tol=0.1)


def test_tracer_errors_are_clear():
    model = _mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracer(layers=nn.Linear, num_classes=3, verbose=False).attach(model, opt)
    with pytest.raises(ConceptEvoError, match="layer '0'.*no forward"):
        tr.after_step(torch.tensor([0, 1]))
    F.cross_entropy(model(torch.randn(2, 7)), torch.tensor([0, 1])).backward()
    with pytest.raises(ConceptEvoError, match=r"labels must lie in \[0, 3\)"):
        tr.after_step(torch.tensor([0, 5]))
    other = torch.optim.SGD(list(model.parameters())[:1], lr=0.1)
    with pytest.raises(ConceptEvoError, match=r"0.bias is not optimised"):
        Tracer(layers=nn.Linear, num_classes=3, verbose=False).attach(model, other)
    with pytest.raises(LayerError, match="Tanh"):
        Tracer(layers=["1"], num_classes=3, verbose=False).attach(model, opt)


def test_conv_class_parts_and_steps_agree():
    """Conv layers (stride, no bias) with per-step deltas: steps, windows and checkpoints agree."""
    model = _conv_net(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tr = Tracer(num_classes=3, verbose=False, steps=True, step_dtype=torch.float32, chunk_steps=3)
    tr.attach(model, opt)
    g = torch.Generator().manual_seed(0)
    states = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    for epoch in (1, 2):
        for _ in range(4):
            x = torch.randn(6, 3, 8, 8, generator=g)
            y = torch.randint(0, 3, (6,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            tr.after_step(y)
        tr.end_epoch(epoch)
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    tr.finish()
    steps = [v for k, v in tr.windows.items() if k[0] == "steps"]
    step_sum = torch.cat([b["2"] for b in steps]).double().sum(0)
    full = states[2]["2.weight"].double() - states[0]["2.weight"].double()
    assert torch.allclose(step_sum, full.reshape(-1), atol=1e-6)
    src = tr.sources("2", 0, 2)
    ck = checkpoint_sources(states, "2")
    assert torch.allclose(src.total()[0], ck.total()[0], atol=1e-9)
    x = torch.randn(2, 3, 8, 8)
    info = layer_info(model, "2")
    a = tracing.layer_input(model, "2", x)
    _, st = decompose(info, a, src, info.apply(a.double(), full, None))
    assert st["residual"] <= 1e-5
    per_class = src.grouped("class")
    assert list(per_class.meta["source"])[:3] == ["class 0", "class 1", "class 2"]
    _, st = decompose(info, a, per_class, info.apply(a.double(), full, None))
    assert st["residual"] <= 1e-5


# ------------------------------------------------------------------------- examples
def test_planted_near_duplicate_ranks_first():
    torch.manual_seed(0)
    n, d = 60, 64
    X = torch.randn(n, d)
    Y = torch.randint(0, 4, (n,))
    model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    tr = Tracer(layers=["0"], num_classes=4, verbose=False, example_layers=["0"]).attach(model, opt)
    s0 = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for epoch in range(1, 6):
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, 10):
            idx = perm[b:b + 10]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            tr.after_step(Y[idx], idx)
    tr.end_epoch(5)
    blob = tr.example_blob()
    info = layer_info(model, "0")
    rows, meta = tracing.example_sources(tr.meta(), blob, "0", info.weight_shape, 0, tr.step_count, Y.numpy())
    W = model.state_dict()
    hits = 0
    for j in (3, 17, 42):
        x = X[j:j + 1] + 0.05 * torch.randn(1, d)           # a near-copy of training image j
        a = tracing.layer_input(model, "0", x)
        dz = info.apply(a.double(), W["0.weight"].double() - s0["0.weight"].double(),
                        W["0.bias"].double() - s0["0.bias"].double())
        table = tracing.explain_examples(info, a, dz, rows, meta)
        hits += int(table["example"].iloc[0] == j)
        # example + decay/prior/other sources are exact
        acc = tr.windows[(0, 5)]
        extra = torch.cat([acc["0.weight"][4:].sum(0).reshape(-1), acc["0.bias"][4:].sum(0)])
        total_dot = table["dot"].sum() + float(extra @ torch.cat([info.weight_grad(a.double(), dz).reshape(-1),
                                                                   dz.sum(0)]))
        assert math.isclose(total_dot, float(dz.norm()) ** 2, rel_tol=1e-5)
    assert hits == 3


def test_sketch_scores_stay_within_bound():
    torch.manual_seed(0)
    n, d = 30, 20
    X, Y = torch.randn(n, d), torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(layers=["0"], num_classes=3, verbose=False, example_layers=["0"])
    full = Tracer(**kw).attach(model, opt)
    for b in range(0, n, 10):
        idx = torch.arange(b, b + 10)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        full.after_step(Y[idx], idx)
    k = 512
    blob = full.example_blob()
    info = layer_info(model, "0")
    rows, meta = tracing.example_sources(full.meta(), blob, "0", info.weight_shape, 0, full.step_count)
    full.sketch, full.sketch_seed = k, 5
    proj = full._projection("0")
    a = tracing.layer_input(model, "0", torch.randn(2, d))
    dz = torch.randn(2, 8, dtype=torch.float64)
    exact = tracing.explain_examples(info, a, dz, rows, meta).set_index("example")["dot"]
    sk = tracing.explain_examples(info, a, dz, rows @ proj.double().T, meta, proj=proj).set_index("example")["dot"]
    G = torch.cat([info.weight_grad(a.double(), dz).reshape(-1), dz.sum(0)])
    eps = tracing.sketch_bound(k, 1e-6)
    bound = eps * rows.norm(dim=1) * G.norm()
    err = (sk.loc[meta["example"]].to_numpy() - exact.loc[meta["example"]].to_numpy())
    assert np.all(np.abs(err) <= bound.numpy())


# ------------------------------------------------------------------ built-in trainer run
@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    from conceptevo.data import builtin_dataset
    from conceptevo.train import train_run

    root = tmp_path_factory.mktemp("traced")
    tr_set = builtin_dataset("train", seed=3, num_images=64)
    te_set = builtin_dataset("test", seed=3, num_images=16)
    kw = dict(epochs=2, lr=0.02, weight_decay=1e-3, model_kw={"channels": (4, 8, 8, 8), "hidden": 16},
              batch_size=32, progress=False, eval_train_max=16, save_epochs=[0, 2])
    plain = train_run(root / "plain", "vgg_small", tr_set, te_set, **kw)
    train_run(root / "run", "vgg_small", tr_set, te_set, tracer=Tracer(verbose=False), **kw)
    return root, te_set, plain


def test_train_run_records_classes_and_explains_exactly(traced_run):
    root, te_set, plain = traced_run
    w0 = torch.load(plain.checkpoints[2], weights_only=True)
    w1 = torch.load(root / "run" / "checkpoints" / "epoch_002.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)          # observing does not change training
    run = tracing.TraceRun(root / "run")
    assert run.has_classes() and run.trace_meta["windows"] == [[0, 2]]
    x = te_set[0][0]
    for layer in ("features.conv1_1", "features.conv3_2"):
        for input_from in ("final", "t"):
            table = tracing.explain(run, x, layer, 0, 2, input_from=input_from)
            assert table.attrs["residual"] <= 1e-5
            assert math.isclose(table["share"].sum(), 1.0, rel_tol=1e-5)
    ck = tracing.explain(run, x, "features.conv2_1", 0, 2, kind="checkpoint")
    assert ck.attrs["residual"] <= 1e-5 and len(ck) == 1
    imp = pd.DataFrame({"class": [0, 0, 1], "layer": ["features.conv2_1"] * 3, "channel": [0, 3, 5],
                        "score": [0.9, 0.8, 0.7], "rank": [1, 2, 1]})
    cls = tracing.attribute_evolutions(run, imp, te_set, 0, 2, top=2, images_per_class=4)
    sums = cls.groupby(["class", "channel"])["share"].sum()
    assert np.allclose(sums.to_numpy(), 1.0, atol=1e-5)
    assert set(cls["kind"]) == {"class", "weight_decay", "prior_momentum", "other"}
    frag = tracing.report_section(cls, te_set.class_names)
    assert "<table>" in frag and "features.conv2_1:3" in frag and te_set.class_names[1] in frag
    from conceptevo._reference import synthetic_report_data
    from conceptevo.report import _html

    rd = synthetic_report_data(runs=("a",), epochs=(0, 1), num_images=40)
    rd.tracing = cls
    assert "What in training drove" in _html({"figs": {}, "verdicts": []}, rd, "")


def test_cli_trace_writes_both_tables(traced_run, tmp_path):
    from typer.testing import CliRunner

    from conceptevo.cli import app

    root, _, _ = traced_run
    res = CliRunner().invoke(app, ["trace", "--run", str(root / "run"), "--out", str(tmp_path),
                                   "--layer", "features.conv3_1", "--class", "1", "--top", "2", "--images", "4"])
    assert res.exit_code == 0, res.output
    src = pd.read_parquet(tmp_path / "trace_sources.parquet")
    cls = pd.read_parquet(tmp_path / "trace_classes.parquet")
    assert set(src["layer"]) == {"features.conv3_1"}
    assert math.isclose(src["weight_share"].sum(), 1.0, rel_tol=1e-5)
    assert set(cls["class"]) == {1} and cls["channel"].nunique() == 2
    assert np.allclose(cls.groupby("channel")["share"].sum(), 1.0, atol=1e-5)
    bad = CliRunner().invoke(app, ["trace", "--run", str(root / "run"), "--layer", "features.nope"])
    assert bad.exit_code == 2 and "features.nope" in bad.output


def test_class_arriving_late_drives_its_evolution():
    """Class 2 joins the training set after epoch 3: before, its source is exactly zero; after,
    the change of the class-2 logit on class-2 inputs is attributed mostly to class 2."""
    torch.manual_seed(0)
    centres = torch.randn(3, 10) * 3
    Y = torch.arange(3).repeat_interleave(30)
    X = centres[Y] + torch.randn(90, 10)
    model = _mlp(5, d_in=10, hidden=12, classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tr = Tracer(layers=nn.Linear, num_classes=3, verbose=False).attach(model, opt)
    states = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, 7):
        pool = torch.nonzero(Y != 2).reshape(-1) if epoch <= 3 else torch.arange(90)
        pool = pool[torch.randperm(len(pool), generator=g)]
        for b in range(0, len(pool), 15):
            idx = pool[b:b + 15]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            tr.after_step(Y[idx])
        tr.end_epoch(epoch)
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(float(tr.windows[(e - 1, e)]["2.weight"][2].abs().max()) == 0.0 for e in (1, 2, 3))
    info = layer_info(model, "2")
    src = tr.sources("2", 3, 6).grouped("class")
    a = tracing.layer_input(model, "2", X[Y == 2])
    dw = states[6]["2.weight"].double() - states[3]["2.weight"].double()
    db = states[6]["2.bias"].double() - states[3]["2.bias"].double()
    dz = info.apply(a.double(), dw[[2]], db[[2]])
    table, st = decompose(info, a, src, dz, channels=[2])
    assert st["residual"] <= 1e-5
    share = table.set_index("source")["share"]
    assert share["class 2"] > 0.5 and share["class 2"] == share.max()


# ------------------------------------------------------- granularities, grids, ridge plots
@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A built-in run with per-step deltas (float32) and per-example records of one layer."""
    from conceptevo.data import builtin_dataset
    from conceptevo.train import train_run

    root = tmp_path_factory.mktemp("recorded")
    tr_set = builtin_dataset("train", seed=4, num_images=64)
    te_set = builtin_dataset("test", seed=4, num_images=16)
    tracer = Tracer(verbose=False, steps=True, step_dtype=torch.float32, chunk_steps=3,
                    example_layers=["features.conv3_2"])
    train_run(root / "run", "vgg_small", tr_set, te_set, epochs=3, lr=0.02, weight_decay=1e-3,
              model_kw={"channels": (4, 8, 8, 8), "hidden": 16}, batch_size=16, progress=False,
              eval_train_max=16, save_epochs=[0, 1, 3], tracer=tracer)
    return root / "run", tr_set, te_set


@pytest.mark.parametrize("layer", ["features.conv1_2", "features.conv3_2"])
def test_step_sources_sum_to_dz_and_to_the_checkpoints(recorded_run, layer):
    path, _, te_set = recorded_run
    run = tracing.TraceRun(path)
    x = te_set[1][0]
    for t, t2, steps in ((0, 3, 12), (1, 3, 8)):
        table = tracing.explain(run, x, layer, t, t2, granularity="step")
        assert (table["kind"] == "step").all() and len(table) == steps
        assert table["exact"].all() and table.attrs["residual"] <= 1e-5
        assert math.isclose(table["share"].sum(), 1.0, rel_tol=1e-5)
        # independent reference: the steps' weight deltas add up to the checkpoint difference
        src = run.sources(layer, t, t2, "step")
        full = run.state(t2)[f"{layer}.weight"].double() - run.state(t)[f"{layer}.weight"].double()
        assert torch.allclose(src.dw.sum(0), full, atol=1e-7)
        # per-step, per-class and per-checkpoint tables agree on every source sum
        for kind in ("class", "checkpoint"):
            other = tracing.explain(run, x, layer, t, t2, granularity=kind)
            assert math.isclose(other["dot"].sum(), table["dot"].sum(), rel_tol=1e-6)


def test_example_sources_sum_to_dz_and_rank_like_explain_examples(recorded_run, tmp_path):
    from PIL import Image

    path, tr_set, te_set = recorded_run
    run = tracing.TraceRun(path)
    layer = "features.conv3_2"
    x = te_set[2][0]
    table = tracing.explain(run, x, layer, 0, 3, granularity="example")
    ex = table[table["kind"] == "example"]
    assert ex["example"].nunique() == len(ex) == 64            # every training image was seen
    assert set(table.loc[table["kind"] != "example", "kind"]) <= {"weight_decay", "prior_momentum", "other"}
    assert table.attrs["residual"] <= 1e-5
    labels = tr_set.labels.numpy() if hasattr(tr_set.labels, "numpy") else np.asarray(tr_set.labels)
    assert (ex["class"].to_numpy() == labels[ex["example"].to_numpy()]).all()
    # the examples of each class add up to that class's recorded source
    src = run.sources(layer, 0, 3, "example")
    cls = run.sources(layer, 0, 3, "class").grouped("class")
    for c in range(3):
        rows = torch.from_numpy(((src.meta["kind"] == "example") & (src.meta["class"] == c)).to_numpy().copy())
        assert torch.allclose(src.dw[rows].sum(0), cls.dw[c], atol=1e-6)
    # independent ranking: one weight-gradient G(x) against the raw per-example records
    blob = torch.load(path / "trace" / "examples.pt", weights_only=True)
    model = run.model(3)
    info = layer_info(model, layer)
    rows_, meta = tracing.example_sources(run.trace_meta, blob, layer, info.weight_shape, 0, run.step_range(0, 3)[1])
    a = tracing.layer_input(model, layer, x[None])
    w3, w0 = run.state(3), run.state(0)
    dz = info.apply(a.double(), w3[f"{layer}.weight"].double() - w0[f"{layer}.weight"].double(),
                    w3[f"{layer}.bias"].double() - w0[f"{layer}.bias"].double())
    ref = tracing.explain_examples(info, a, dz, rows_, meta)
    top = list(ref["example"].head(8))
    assert list(ex["example"].head(8)) == top
    # the grid's tiles are those examples' pixels, in rank order
    png = tmp_path / "grid.png"
    grid, ids = tracing.example_grid(table, tr_set, png, top=8, cols=4, scale=2, pad=2)
    assert ids == top
    back = np.asarray(Image.open(png).convert("RGB"))
    assert back.shape == grid.shape == (2 * (64 + 4), 4 * (64 + 4), 3)
    for k, i in enumerate(top):
        r, c = divmod(k, 4)
        tile = back[r * 68 + 2:r * 68 + 66, c * 68 + 2:c * 68 + 66]
        assert np.array_equal(tile[::2, ::2], tr_set.raw(i)) and np.array_equal(tile[1::2, 1::2], tr_set.raw(i))


def test_class_contributions_match_explain_per_image_and_render(recorded_run, tmp_path):
    path, tr_set, te_set = recorded_run
    run = tracing.TraceRun(path)
    con = tracing.class_contributions(run, te_set, 0, 3, layers=["features.conv2_1", "features.conv4_1"], images=5)
    assert con["image"].nunique() == 5 and set(con["layer"]) == {"features.conv2_1", "features.conv4_1"}
    sums = con.groupby(["layer", "image"])["share"].sum()
    assert np.allclose(sums.to_numpy(), 1.0, atol=1e-5)
    i = int(con["image"].iloc[0])
    one = con[(con["image"] == i) & (con["layer"] == "features.conv4_1")].set_index("source")["share"]
    ref = tracing.explain(run, te_set[i][0], "features.conv4_1", 0, 3, by="class").set_index("source")["share"]
    assert np.allclose(one.sort_index().to_numpy(), ref.loc[one.sort_index().index].to_numpy(), atol=1e-9)
    png = tmp_path / "g.png"
    tab = tracing.explain(run, te_set[0][0], "features.conv3_2", 0, 3, granularity="example")
    tracing.example_grid(tab, tr_set, png, top=4)
    frag = tracing.report_section(None, te_set.class_names, contributions=con, images=[png])
    assert 'id="fig-tracing-contrib"' in frag and "data:image/png;base64," in frag
    fig = tracing.contributions_figure(con, te_set.class_names)
    assert len(fig.data) == 2 * con.groupby("layer")["source"].nunique().iloc[0]
    from conceptevo._reference import synthetic_report_data
    from conceptevo.report import _html

    rd = synthetic_report_data(runs=("a",), epochs=(0, 1), num_images=40)
    rd.tracing_contributions, rd.tracing_images = con, [png]
    page = _html({"figs": {}, "verdicts": []}, rd, "")
    assert "fig-tracing-contrib" in page and "tracing-examples" in page


def test_cli_trace_granularity_input_and_contributions(recorded_run, tmp_path):
    from typer.testing import CliRunner

    from conceptevo.cli import app

    path, _, _ = recorded_run
    res = CliRunner().invoke(app, ["trace", "--run", str(path), "--out", str(tmp_path), "--layer", "features.conv3_2",
                                   "--class", "1", "--top", "1", "--images", "4", "--granularity", "step",
                                   "--input", "0", "--contributions", "3"])
    assert res.exit_code == 0, res.output
    src = pd.read_parquet(tmp_path / "trace_sources.parquet")
    assert set(src["kind"]) == {"step"} and len(src) == 12
    assert math.isclose(src["weight_share"].sum(), 1.0, rel_tol=1e-6)
    ex = pd.read_parquet(tmp_path / "trace_explain.parquet")
    assert set(ex["kind"]) == {"step"} and (ex["residual"] <= 1e-5).all()
    con = pd.read_parquet(tmp_path / "trace_contributions.parquet")
    assert con["image"].nunique() == 3
    res = CliRunner().invoke(app, ["trace", "--run", str(path), "--out", str(tmp_path / "ex"), "--class", "1",
                                   "--top", "1", "--images", "4", "--granularity", "example", "--input", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ex" / "trace_examples_features.conv3_2.png").is_file()
    assert set(pd.read_parquet(tmp_path / "ex" / "trace_sources.parquet")["layer"]) == {"features.conv3_2"}


@pytest.mark.parametrize("conv,hw", [({"padding": 2, "dilation": 2}, 9), ({"stride": 2, "padding": 1}, 3),
                                     ({"padding": 1, "groups": 2}, 6)])
def test_decompose_matches_every_source_applied_by_the_layer(conv, hw):
    """Gram (patch < positions) and direct branches, dilation, stride, groups: each source's dot and
    norm against its own output computed by F.conv2d, on a channel subset too."""
    g = torch.Generator().manual_seed(7)
    m = nn.Conv2d(4, 6, 3, **conv)
    info = layer_info(nn.Sequential(m), "0")
    S = 9
    dw = torch.randn(S, *m.weight.shape, generator=g, dtype=torch.float64)
    db = torch.randn(S, 6, generator=g, dtype=torch.float64)
    meta = tracing._meta([{"source": str(i), "kind": "class", "class": i, "epoch_from": 0, "epoch_to": 1,
                           "exact": True, "example": -1} for i in range(S)])
    src = tracing.LayerSources("0", dw, db, meta)
    a = torch.randn(2, 4, hw, hw, generator=g, dtype=torch.float64)
    for ch in (None, [1, 4]):
        if ch is not None and m.groups != 1:
            continue
        c = list(range(6)) if ch is None else ch
        dz = F.conv2d(a, dw.sum(0)[c], db.sum(0)[c], m.stride, m.padding, m.dilation, m.groups)
        dz = dz + 1e-3 * torch.randn(dz.shape, generator=g, dtype=torch.float64)   # not quite the sum
        table, st = decompose(info, a, src, dz, channels=ch, chunk=2)
        for i in range(S):
            out = F.conv2d(a, dw[i][c], db[i][c], m.stride, m.padding, m.dilation, m.groups)
            assert math.isclose(table["dot"][i], float((out * dz).sum()), rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(table["norm"][i], float(out.norm()), rel_tol=1e-9)
        ref = float((sum(F.conv2d(a, dw[i][c], db[i][c], m.stride, m.padding, m.dilation, m.groups)
                         for i in range(S)) - dz).norm() / dz.norm())
        assert math.isclose(st["residual"], ref, rel_tol=1e-6)


def test_tracer_threads_option_restores_the_setting_and_records_the_same():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wins = []
        for threads in (None, 1):
            tr, *_ = _train(_mlp(0), SGDS["momentum_wd"], tracer_kw={"threads": threads})
            assert torch.get_num_threads() == 2
            wins.append(tr.windows[(0, 1)])
    finally:
        torch.set_num_threads(saved)
    for k in wins[0]:
        assert torch.allclose(wins[0][k], wins[1][k], atol=1e-9)

"""End to end on a tiny setup: every stage runs, writes its artifacts, and a re-run reuses them."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conceptevo import data, importance, train
from conceptevo.errors import ConceptEvoError
from conceptevo.pipeline import PipelineConfig, RunSpec, _pick_evolution_epochs, run_pipeline, space_params


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tr = data.builtin_dataset("train", seed=1, root=root / "data", num_images=400)
    te = data.builtin_dataset("test", seed=1, root=root / "data", num_images=120)
    runs = {}
    for name, lr in (("a", 0.05), ("b", 0.02)):
        runs[name] = root / "training" / name
        tracer = None
        if name == "a":  # the base run records per-class updates: the pipeline traces its evolutions
            from conceptevo.tracing import Tracer

            tracer = Tracer(verbose=False)
        train.train_run(runs[name], "vgg_small", tr, te, epochs=2, lr=lr, save_epochs=[0, 1, 2], seed=3,
                        model_kw={"channels": (8, 8, 16, 16), "hidden": 32}, progress=False, tracer=tracer)
    return root, tr, te, runs


def test_pipeline_end_to_end_and_cache(tiny_runs):
    root, tr, te, runs = tiny_runs
    cfg = PipelineConfig(out=root / "out", runs={k: str(v) for k, v in runs.items()}, base="a/epoch_1", k=5, k_i=3,
                         batch_size=64, repeats=3, importance_classes=2, importance_images=16,
                         reversion_sample_size=8, reversion_repeats=2, reversion_classes=[0, 3],
                         patches_per_neuron=2, neighbours=3)
    res = run_pipeline(cfg, train_set=tr, test_set=te)
    out = root / "out"
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert set(neurons["model"]) == {"a", "b"} and set(neurons["epoch"]) == {0, 1, 2}
    assert {"vector", "x", "y", "layer", "channel"} <= set(neurons.columns)
    for name in ("alignment.parquet", "importance.parquet", "reversion.parquet", "diagnostics.parquet",
                 "verdicts.json", "report.html", "figures/reversion.png"):
        assert (out / name).exists(), name
    imp = pd.read_parquet(out / "importance.parquet")
    assert set(imp["class"]) == {0, 1}
    # the table is Eq. 4 on the base run's checkpoints t -> t' with the configured images: recomputed
    # here from the checkpoint files (the math itself is checked against a loop in test_importance.py)
    (t, t2), = set(zip(imp["t"], imp["t_prime"]))
    assert set(imp["model"]) == {"a"} and (t, t2) == _pick_evolution_epochs(
        RunSpec("a", train.run_checkpoints(runs["a"]), None, train.load_train_log(runs["a"]).table))
    models = []
    for e in (t, t2):
        m = train.run_model_factory(runs["a"])()
        m.load_state_dict(torch.load(train.run_checkpoints(runs["a"])[e], weights_only=True))
        models.append(m.eval())
    again = importance.evolution_importance(*models, tr, classes=[0, 1], max_images_per_class=16, seed=cfg.seed)
    pd.testing.assert_frame_equal(imp.drop(columns=["model", "t", "t_prime"]).reset_index(drop=True),
                                  again.reset_index(drop=True))
    n_images = {c: min(16, int((tr.labels == c).sum())) for c in (0, 1)}
    counts = imp["score"] * imp["class"].map(n_images)  # a share of the class's images
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    html = res.report.read_text(encoding="utf-8")
    # the report names the configured base (epoch 1, not the last saved epoch 2) and both fit measures
    assert "<td>base</td><td>a epoch 1</td>" in html
    assert "in-sample" in html and "held-out RMSE</td><td>" in html
    assert "plotly" in html.lower() and "http://" not in html.split("<body", 1)[0].lower().replace("http://www.w3.org", "")
    manifest = json.loads((out / "manifest.json").read_text())
    # the traced base run: which training classes drove each important evolution, in the report too
    cls = pd.read_parquet(out / "trace" / "trace_classes.parquet")
    assert manifest["tracing"] == {"run": "a", "t": t, "t_prime": t2, "out": "trace/"}
    assert set(cls["class"]) <= {0, 1} and len(cls)
    np.testing.assert_allclose(cls.groupby(["class", "layer", "channel"])["share"].sum(), 1.0, atol=1e-6)
    assert "What in training drove the important evolutions" in html
    assert (out / "trace" / "trace_contributions.parquet").exists()
    assert {"space", "importance", "reversion"} <= set(manifest["stages"])
    assert manifest["backends"]["umap"] == "umap-learn"
    from conceptevo.space import UnifiedSpace

    space = UnifiedSpace.load(out / "space")
    assert space.base_key == ("a", 1)
    fit = manifest["stages"]["space"]["fit"]
    assert fit["in_sample_rmse"] == space.info["image_embedding"]["rmse"] > 0
    assert fit["holdout"]["rmse"] == space.info["holdout"]["rmse"] > 0 and fit["holdout"]["n_neurons"] >= 1
    assert manifest["skipped_files"] == []
    graph = manifest["neighbour_graph"]  # the one graph: exact at this size, recorded with its threshold
    assert graph["method"] == "exact" and graph["recall_at_k"] == 1.0 and graph["thresholds"]["exact_max_rows"] > 0
    assert (out / "space" / "neighbours.npy").exists() and "exact (FAISS flat)" in html
    # second run: every cached stage is reloaded (the space fit is not redone)
    before = manifest["stages"]["space"]["finished_at"], manifest["stages"]["importance"]["finished_at"]
    res2 = run_pipeline(cfg, train_set=tr, test_set=te)
    manifest2 = json.loads((out / "manifest.json").read_text())
    assert (manifest2["stages"]["space"]["finished_at"], manifest2["stages"]["importance"]["finished_at"]) == before
    assert res2.seconds["unified space"] < res.seconds["unified space"]


def test_evolution_epochs_follow_the_accuracy_milestones():
    """The paper's stages: saved epochs closest to 25/50/75% training top-1; the last stage."""
    def spec(accs, saved=None):
        log = pd.DataFrame({"epoch": range(len(accs)), "train_top1": accs})
        saved = range(len(accs)) if saved is None else saved
        return RunSpec("r", {e: f"e{e}.pt" for e in saved}, factory=lambda: None, log=log)

    # well_trained of the demo: 0.25 and 0.5 both land on epoch 1, 0.75 on epoch 5 -> 1 -> 5
    accs = [0.091, 0.392, 0.623, 0.652, 0.681, 0.709, 0.75, 0.751, 0.804, 0.824, 0.843, 0.878, 0.885]
    assert _pick_evolution_epochs(spec(accs, [0, 1, 2, 3, 5, 8, 12])) == (1, 5)
    assert _pick_evolution_epochs(spec(accs)) == (1, 6)        # every epoch saved: 0.75 -> epoch 6 (0.750)
    assert _pick_evolution_epochs(spec([0.1, 0.1, 0.1])) == (0, 2)  # no climb: middle -> last
    no_log = RunSpec("r", {0: "a", 4: "b", 9: "c"}, factory=lambda: None)
    assert _pick_evolution_epochs(no_log) == (0, 9)
    assert _pick_evolution_epochs(no_log, [4, 9]) == (4, 9)
    with pytest.raises(ConceptEvoError, match="saved"):
        _pick_evolution_epochs(no_log, [3, 9])
    with pytest.raises(ConceptEvoError, match="t < t'"):
        _pick_evolution_epochs(no_log, [9, 4])


def test_space_cache_key_has_every_parameter_that_changes_the_space():
    """Each of these changes the fitted space, so each must change the space stage's key."""
    import dataclasses

    from conceptevo.store import RunStore

    cfg = PipelineConfig(runs={"a": "x"})
    stims = {("a", 1): None, ("a", 2): None}
    chosen = {"solve": "scipy", "umap": "umap-learn"}

    def key(c=cfg, base=("a", 2), st=stims, ch=chosen):
        return RunStore.stage_key(space_params(c, base, st, ch), ["stimuli-key-1", "stimuli-key-2"])

    k0 = key()
    assert key() == k0
    for field, value in {"dim": 8, "repeats": 3, "seed": 1, "sgns_epochs": 4, "sgns_threads": 2, "k": 5}.items():
        assert key(dataclasses.replace(cfg, **{field: value})) != k0, field
    assert key(base=("a", 1)) != k0
    assert key(st={("a", 1): None}) != k0
    assert key(ch={"solve": "torch:cuda", "umap": "umap-learn"}) != k0
    params = space_params(cfg, ("a", 2), stims, chosen)
    assert {"lr", "negatives", "ridge", "holdout", "threads"} <= set(params)  # the fit's own defaults too


def test_dataset_identity_sees_every_image(tmp_path):
    """In-memory sets: any pixel of any image; folder sets: any file's size or time."""
    import os

    from PIL import Image

    from conceptevo.pipeline import _dataset_id

    ds = data.builtin_dataset("train", seed=4, num_images=64)
    k0 = _dataset_id(ds)
    sampled = {int(j) for j in np.linspace(0, 63, 16)}
    assert 38 not in sampled
    ds.images[38, 1, 5, 5] ^= 1  # one bit of one image that the 16 evenly spaced samples skip
    assert _dataset_id(ds) != k0
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for j in range(20):
            Image.fromarray(np.full((4, 4, 3), j, np.uint8)).save(tmp_path / c / f"{j}.png")
    folder = data.image_folder(tmp_path, size=4)
    f0 = _dataset_id(folder)
    assert _dataset_id(data.image_folder(tmp_path, size=4)) == f0
    p = tmp_path / "b" / "7.png"  # the same pixels, written again later: the decoded samples cannot tell
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _dataset_id(data.image_folder(tmp_path, size=4)) != f0
    p.write_bytes(p.read_bytes() + b"\0")  # a longer file
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _dataset_id(data.image_folder(tmp_path, size=4)) != f0

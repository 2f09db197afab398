"""End to end on a tiny setup: every stage runs, writes its artifacts, and a re-run reuses them."""
import json

import pandas as pd
import pytest

from conceptevo import data, train
from conceptevo.errors import ConceptEvoError
from conceptevo.pipeline import PipelineConfig, RunSpec, _pick_evolution_epochs, run_pipeline


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tr = data.builtin_dataset("train", seed=1, root=root / "data", num_images=400)
    te = data.builtin_dataset("test", seed=1, root=root / "data", num_images=120)
    runs = {}
    for name, lr in (("a", 0.05), ("b", 0.02)):
        runs[name] = root / "training" / name
        train.train_run(runs[name], "vgg_small", tr, te, epochs=2, lr=lr, save_epochs=[0, 1, 2], seed=3,
                        model_kw={"channels": (8, 8, 16, 16), "hidden": 32}, progress=False)
    return root, tr, te, runs


def test_pipeline_end_to_end_and_cache(tiny_runs):
    root, tr, te, runs = tiny_runs
    cfg = PipelineConfig(out=root / "out", runs={k: str(v) for k, v in runs.items()}, base="a", k=5, k_i=3,
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
    assert set(imp["class"]) == {0, 1} and imp["score"].between(0, 1).all()
    html = res.report.read_text(encoding="utf-8")
    assert "plotly" in html.lower() and "http://" not in html.split("<body", 1)[0].lower().replace("http://www.w3.org", "")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"space", "importance", "reversion"} <= set(manifest["stages"])
    assert manifest["backends"]["umap"] == "umap-learn"
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

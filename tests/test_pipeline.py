"""End to end on a tiny setup: every stage runs, writes its artifacts, and a re-run reuses them."""
import json

import pandas as pd
import pytest

from conceptevo import data, train
from conceptevo.pipeline import PipelineConfig, run_pipeline


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
                         reversion_sample_size=8, reversion_repeats=2, patches_per_neuron=2, neighbours=3)
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
    # second run: every cached stage is reloaded (the space fit is not redone)
    before = manifest["stages"]["space"]["finished_at"], manifest["stages"]["importance"]["finished_at"]
    res2 = run_pipeline(cfg, train_set=tr, test_set=te)
    manifest2 = json.loads((out / "manifest.json").read_text())
    assert (manifest2["stages"]["space"]["finished_at"], manifest2["stages"]["importance"]["finished_at"]) == before
    assert res2.seconds["unified space"] < res.seconds["unified space"]

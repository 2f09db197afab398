"""The README opens with the two commands, .ci/run runs exactly the second one, and its Python
API example runs."""
import re
from pathlib import Path

import numpy as np

from conceptevo import train as train_module

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```[^\n]*\n(.*?)```", text, re.S).group(1)
    return [s.strip() for s in block.splitlines() if s.strip() and not s.strip().startswith("#")]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "torch==2.13.0" in cmds[0] and "conceptevo demo" in cmds[0]
    assert "torch==2.13.0" in cmds[1] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_cmds = [line.replace(" -q ", " ").replace("pip install -q", "pip install") for line in ci.splitlines()]
    wanted = readme_commands()[1]
    assert any(c.strip() == wanted for c in ci_cmds), f".ci/run does not run the README's test command {wanted!r}"


SAVED = list(train_module.REGIMES["well_trained"]["save_epochs"])


def test_readme_names_the_saved_epochs():
    assert f"epochs {', '.join(map(str, SAVED))}" in readme_python_example()


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, run as written; only the data and the training are shrunk
    (a small run that saves the built-in well_trained run's epochs)."""
    import pandas as pd
    import torch

    from conceptevo import data, train
    from conceptevo.space import UnifiedSpace

    real_dataset = data.builtin_dataset
    small = {"num_images": 48}

    def small_dataset(split="train", seed=0, root=None, **kw):
        return real_dataset(split, seed=seed, root=root, **{**small, **kw})

    def small_regimes(root, seed=0, **kw):
        tr, te = small_dataset("train", seed), small_dataset("test", seed, num_images=16)
        run = Path(root) / "well_trained"
        train.train_run(run, "vgg_small", tr, te, epochs=12, lr=0.05, save_epochs=SAVED,
                        seed=seed, model_kw={"channels": (4, 4, 8, 8), "hidden": 16}, progress=False,
                        batch_size=48, eval_train_max=48)
        return {"well_trained": run}

    monkeypatch.setattr(data, "builtin_dataset", small_dataset)
    monkeypatch.setattr(train, "train_regimes", small_regimes)
    # UMAP's first call in a process compiles for ~15 CPU-seconds; it is tested in test_space.py.
    # Here the example's call runs with the linear layout (same rows, same contract).
    layout_2d = UnifiedSpace.layout_2d
    monkeypatch.setattr(UnifiedSpace, "layout_2d", lambda self, method="umap", **kw: layout_2d(self, "pca", **kw))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster on a shared CPU
    ns: dict = {}
    try:
        exec(compile(readme_python_example(), "README.md (Python API)", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    us, stims = ns["us"], ns["stims"]
    epochs = SAVED
    assert sorted(stims) == epochs  # the saved epochs, not 0..7
    assert us.base_key == ("well_trained", 12)
    assert sorted(us.checkpoints) == [("well_trained", e) for e in epochs]  # every checkpoint once, base included
    rows = us.rows("well_trained", 12)
    np.testing.assert_array_equal(us.vectors[rows], us.base_vectors)  # the base keeps its learned vectors
    table = pd.read_parquet(tmp_path / "neurons.parquet")
    assert set(table["model"]) == {"well_trained"} and sorted(set(table["epoch"])) == epochs
    assert len(table) == len(us) == len(SAVED) * us.summary()["checkpoints"][0]["neurons"]
    assert ns["xy"].shape == (len(us), 2)


def test_readme_directions_example_runs():
    """The README's concept-direction example, run as written on a small built-in set and an untrained
    vgg_small (the figures are meaningless there; the calls and their outputs are what is checked)."""
    import torch

    from conceptevo import data, models

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Concept directions and shortcut audits", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    images = data.builtin_dataset("train", seed=0, num_images=160)
    ns = {"images": images, "model": models.build_model("vgg_small", num_classes=len(images.class_names))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, "README.md (concept directions)", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    assert ns["stamped"].any() and not ns["stamped"].all()
    assert {"class", "direction", "z", "rank"} <= set(ns["concepts"].columns)
    found = ns["found"]
    assert found["class"] == 0 and 0.5 <= found["auroc"] <= 1.0 and found["rank"] >= 1

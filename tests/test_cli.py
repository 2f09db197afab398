"""The command line answers --help for every subcommand and reports bad input clearly."""
import pytest
from typer.testing import CliRunner

from conceptevo.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["demo"], ["run"], ["data"], ["train"], ["stimuli"], ["info"], ["importance"], ["reversion"], ["diagnostics"], ["report"]])
def test_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_info_lists_backends():
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0, res.output


def test_run_with_missing_config_names_it(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2
    assert "nope.toml" in res.output


def test_run_with_unknown_key_names_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "builtin"\nlearning_rate = 3\n')
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2 and "learning_rate" in res.output


def test_stimuli_with_missing_checkpoint_names_it(tmp_path):
    res = runner.invoke(app, ["stimuli", str(tmp_path / "epoch_003.pt"), "--out", str(tmp_path / "o"),
                              "--dataset", str(tmp_path / "nodata")])
    assert res.exit_code == 2
    assert "nodata" in res.output or "epoch_003.pt" in res.output


@pytest.mark.slow
def test_run_config_on_an_image_folder_end_to_end(tmp_path):
    """The user path: `conceptevo run config.toml` over an image folder and a checkpoint glob of a
    model the user trained (no training folder, no tags) writes the space, analysis and report."""
    import json

    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from conceptevo.data import builtin_dataset, image_folder
    from conceptevo.models import build_model

    src = builtin_dataset("train", seed=2, num_images=240)
    labels = src.labels.numpy()
    classes = [0, 2, 4]
    for c in classes:  # three classes, 20 PNGs each, one subfolder per class
        (tmp_path / "imgs" / src.class_names[c]).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[:20]):
            Image.fromarray(src.raw(int(i))).save(tmp_path / "imgs" / src.class_names[c] / f"{j}.png")
    folder = image_folder(tmp_path / "imgs", size=32)
    (tmp_path / "ckpt").mkdir()
    torch.manual_seed(0)
    model = build_model("vgg_small", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    y = torch.as_tensor([folder[i][1] for i in range(len(folder))])
    for epoch in range(3):  # the user's own training loop, saving plain state dicts
        torch.save(model.state_dict(), tmp_path / "ckpt" / f"model_ep{epoch}.pt")
        model.train()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    # a diverged checkpoint (what a too-high learning rate writes): a finding, not a crash
    diverged = {k: v.clone() for k, v in model.state_dict().items()}
    diverged["features.conv2_1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(diverged, tmp_path / "ckpt" / "model_ep3.pt")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        'out = "out"\ndataset = "imgs"\nimage_size = 32\nmodel = "vgg_small"\nbase = "mine/epoch_2"\n'
        'k = 4\nk_i = 2\nbatch_size = 32\nrepeats = 3\nimportance_classes = 2\nimportance_images = 8\n'
        'reversion_sample_size = 6\nreversion_repeats = 2\npatches_per_neuron = 2\nneighbours = 3\n'
        '[runs]\nmine = "ckpt/model_ep*.pt"\n'
    )
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert set(neurons["model"]) == {"mine"} and set(neurons["epoch"]) == {0, 1, 2}
    imp = pd.read_parquet(out / "importance.parquet")
    assert set(imp["class"]) == {0, 1} and imp["score"].between(0, 1).all()
    assert (out / "report.html").stat().st_size > 100_000 and (out / "reversion.parquet").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"space", "importance", "reversion"} <= set(manifest["stages"])
    assert not (out / "alignment.parquet").exists()  # no concept tags on user data
    # the NaN checkpoint is recorded as diverged, at its epoch, with the tensor at fault
    verdicts = json.loads((out / "verdicts.json").read_text())["mine"]
    assert verdicts["diverged"] is True and verdicts["diverged_epochs"] == [3]
    assert "features.conv2_1.weight" in manifest["diverged"]["mine"]["3"]
    assert "diverged" in (out / "report.html").read_text(encoding="utf-8")
    # no training log: accuracy comes from the stimulus pass, so the run still gets verdicts
    assert verdicts["diversity_collapses"] in (True, False) and "no training-accuracy log" not in str(verdicts)
    acc = pd.read_parquet(out / "checkpoint_accuracy.parquet").set_index("epoch")
    for epoch in range(3):  # equals a plain evaluation of the checkpoint on the folder
        net = build_model("vgg_small", num_classes=3)
        net.load_state_dict(torch.load(tmp_path / "ckpt" / f"model_ep{epoch}.pt", weights_only=True))
        with torch.no_grad():
            expect = float((net.eval()(x).argmax(1) == y).float().mean())
        assert acc.loc[epoch, "train_top1"] == pytest.approx(expect)

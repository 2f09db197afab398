"""The command line answers --help for every subcommand and reports bad input clearly."""
import pytest
from typer.testing import CliRunner

from conceptevo.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """Without any whitespace: rich wraps long lines (paths) at the terminal width."""
    return "".join(text.split())


@pytest.mark.parametrize("cmd", [[], ["demo"], ["run"], ["data"], ["train"], ["stimuli"], ["info"], ["importance"], ["reversion"], ["diagnostics"], ["report"]])
def test_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert f"Usage: conceptevo {' '.join(cmd)}".rstrip() in " ".join(res.output.split())
    if cmd:  # the command's own description, not the group's
        import conceptevo.cli as cli

        fn = getattr(cli, cmd[0], None) or next(c.callback for c in app.registered_commands if c.name == cmd[0])
        first_words = " ".join(fn.__doc__.split()[:4])
        assert first_words in " ".join(res.output.split()), (first_words, res.output)
    else:
        assert all(c in res.output for c in ("demo", "run", "stimuli", "report"))


def test_info_lists_versions_and_every_backend_choice():
    import torch

    from conceptevo import __version__, backends

    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0, res.output
    assert f"conceptevo {__version__}" in res.output and torch.__version__ in res.output
    picked = backends.report()
    for kind in backends.KINDS:
        assert f"{kind} -> {picked[kind]}" in " ".join(res.output.split()), kind


def test_run_with_missing_config_names_it(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2
    assert flat(f"config file not found: {tmp_path / 'nope.toml'}") in flat(res.output)


def _folder_with_a_corrupt_image(tmp_path):
    import os

    import numpy as np
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * j, np.uint8)).save(tmp_path / "imgs" / c / f"{j}.png")
    bad = tmp_path / "imgs" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return bad


def test_run_advises_skip_bad_in_the_words_of_each_interface(tmp_path):
    """The config advice names the config key, the command line's names its flag; both work."""
    import json

    from conceptevo.errors import DataError
    from conceptevo.pipeline import PipelineConfig, load_config, run_pipeline

    bad = _folder_with_a_corrupt_image(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text('out = "out"\ndataset = "imgs"\nimage_size = 8\n')  # no [runs]: stops right after the data
    res = runner.invoke(app, ["run", str(cfg)])
    text = flat(res.output)
    assert res.exit_code == 2 and "broken.png" in text and "--skip-bad" in text and "skip_bad=True" not in text
    with pytest.raises(DataError, match="set skip_bad = true in the config") as info:
        run_pipeline(PipelineConfig(out=tmp_path / "out", dataset=str(tmp_path / "imgs"), image_size=8))
    assert "skip_bad=True" not in str(info.value) and isinstance(info.value, ValueError)

    res = runner.invoke(app, ["run", str(cfg), "--skip-bad"])  # past the data: fails on the missing runs
    assert res.exit_code == 2 and "namesnoruns" in flat(res.output), res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_files"] == [{"dataset": "dataset", "path": str(bad)}]
    assert manifest["config"]["skip_bad"] is True

    cfg.write_text('out = "out2"\ndataset = "imgs"\nimage_size = 8\nskip_bad = true\n')
    assert load_config(cfg).skip_bad is True
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2 and "namesnoruns" in flat(res.output), res.output
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert [r["path"] for r in manifest["skipped_files"]] == [str(bad)]


def test_stimuli_advises_its_skip_bad_flag(tmp_path):
    _folder_with_a_corrupt_image(tmp_path)
    res = runner.invoke(app, ["stimuli", str(tmp_path / "epoch_003.pt"), "--out", str(tmp_path / "o"),
                              "--dataset", str(tmp_path / "imgs"), "--image-size", "8"])
    text = flat(res.output)
    assert res.exit_code == 2 and "broken.png" in text and "--skip-bad" in text and "skip_bad=True" not in text


def test_run_with_unknown_key_names_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "builtin"\nlearning_rate = 3\n')
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2 and "learning_rate" in res.output


def test_stimuli_with_missing_checkpoint_names_it(tmp_path):
    res = runner.invoke(app, ["stimuli", str(tmp_path / "epoch_003.pt"), "--out", str(tmp_path / "o"),
                              "--dataset", str(tmp_path / "nodata")])
    assert res.exit_code == 2
    assert flat(f"image folder {tmp_path / 'nodata'} does not exist") in flat(res.output)


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
    broken = tmp_path / "imgs" / src.class_names[2] / "zz_broken.png"  # a file the user's folder happens to hold
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    res = runner.invoke(app, ["run", str(cfg), "--skip-bad"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert set(neurons["model"]) == {"mine"} and set(neurons["epoch"]) == {0, 1, 2}
    per_ckpt = neurons.groupby("epoch").size()
    assert (per_ckpt == sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))).all()
    imp = pd.read_parquet(out / "importance.parquet")
    assert set(imp["class"]) == {0, 1} and set(zip(imp["t"], imp["t_prime"])) == {(0, 2)}  # no log: middle -> last
    counts = imp["score"] * 8  # importance_images = 8 of each class's 20: a share of 8 images
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert (out / "report.html").stat().st_size > 100_000 and (out / "reversion.parquet").exists()
    assert "<td>base</td><td>mine epoch 2</td>" in html and "zz_broken.png" in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"space", "importance", "reversion"} <= set(manifest["stages"])
    assert manifest["skipped_files"] == [{"dataset": "dataset", "path": str(broken)}]
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

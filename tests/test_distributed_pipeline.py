"""The whole pipeline under torchrun: `torchrun --nproc_per_node=2 -m conceptevo run config.toml` over an
image folder, with a model factory from a package outside conceptevo, writes the same artifacts as one
process (stimuli, importance, reversion check, space, diagnostics); `python -m conceptevo.distributed`
takes the same factory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

FACTORY = textwrap.dedent("""
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(10, 3))
""")


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("distpipe")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "__init__.py").write_text("")
    (root / "userpkg" / "models.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):  # 3 classes x 9 images: batches of 4 split unevenly
        (root / "imgs" / name).mkdir(parents=True)
        for j in range(9):
            arr = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
            arr[..., c] = np.clip(arr[..., c].astype(int) + 80, 0, 255)
            Image.fromarray(arr).save(root / "imgs" / name / f"{j}.png")
    sys.path.insert(0, str(root))
    try:
        from userpkg.models import build
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("userpkg.models", None)
        sys.modules.pop("userpkg", None)
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (root / "ckpt").mkdir()
    x = torch.rand(12, 3, 16, 16)
    y = torch.arange(12) % 3
    for epoch in range(3):
        torch.save(model.state_dict(), root / "ckpt" / f"ep{epoch}.pt")
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return root


def _config(root: Path, out: str) -> Path:
    cfg = root / f"{out}.toml"
    cfg.write_text(
        f'out = "{out}"\ndataset = "imgs"\nimage_size = 16\nmodel = "userpkg.models:build"\nbase = "mine/epoch_2"\n'
        'k = 3\nk_i = 2\nbatch_size = 4\ndim = 8\nrepeats = 2\nimportance_classes = 3\nimportance_images = 5\n'
        'reversion_sample_size = 3\nreversion_repeats = 3\npatches_per_neuron = 2\nneighbours = 3\nthreads = 1\n'
        'device = "cpu"\n[runs]\nmine = "ckpt/ep*.pt"\n')
    return cfg


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.mark.slow
def test_torchrun_pipeline_equals_one_process(user_setup):
    root = user_setup
    one = subprocess.run([sys.executable, "-m", "conceptevo", "run", str(_config(root, "one"))], cwd=root,
                         env=_env(root), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "conceptevo", "run", str(_config(root, "two"))], cwd=root, env=_env(root),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = root / "one", root / "two"
    npys = sorted(p.relative_to(a) for p in (a / "stimuli").rglob("*.npy"))
    assert len(npys) >= 3 * 2 * 4  # 3 checkpoints x 2 layers x (ids, values, rows, cols, ...)
    assert not list((b / "stimuli").rglob("_progress*"))
    for rel in npys:
        np.testing.assert_array_equal(np.load(a / rel), np.load(b / rel), err_msg=str(rel))
    for table in ("importance", "reversion", "reversion_long", "neurons", "diagnostics"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet"),
                                      check_exact=True, obj=table)
    imp = pd.read_parquet(b / "importance.parquet")
    assert set(imp["class"]) == {0, 1, 2}
    assert set(pd.read_parquet(b / "reversion_long.parquet")["sample"]) == {0, 1, 2}
    assert (b / "report.html").is_file()
    import json

    d = json.loads((b / "manifest.json").read_text())["distributed"]
    assert d["world_size"] == 2 and d["stages_over_all_ranks"] == ["stimuli", "importance mine 0->2",
                                                                   "reversion mine 0->2"]
    # the stimulus pass alone over the ranks takes the same user factory (it used to say "unknown model")
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "conceptevo.distributed", "--model", "userpkg.models:build", "--num-classes", "3",
                            "--checkpoints", str(root / "ckpt" / "ep*.pt"), "--data", str(root / "imgs"),
                            "--image-size", "16", "--run-dir", str(root / "three"), "--prefix", "stimuli/mine",
                            "--names", "epoch_000", "epoch_001", "epoch_002", "--k", "3", "--k-i", "2",
                            "--batch-size", "4", "--device", "cpu", "--quiet"],
                           cwd=root, env=_env(root), capture_output=True, text=True, timeout=600)
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    for rel in npys:
        np.testing.assert_array_equal(np.load(a / rel), np.load(root / "three" / rel), err_msg=str(rel))


def test_distributed_cli_model_errors_are_clear(tmp_path, capsys):
    from PIL import Image

    from conceptevo.distributed import main

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    for bad, msg in (("nosuchpkg.models:build", "cannot be imported"), ("no_such_model", "no_such_model")):
        rc = main(["--model", bad, "--checkpoints", str(tmp_path / "x.pt"), "--data", str(tmp_path / "imgs"),
                   "--run-dir", str(tmp_path / "out"), "--image-size", "8", "--quiet"])
        assert rc == 2
        err = capsys.readouterr().err
        assert "--model" in err and msg in err


# ------------------------------------------------------------------ importance / reversion over 2 gloo ranks
def _net(seed: int):
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 7, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(23, 3, 8, 8, generator=g), torch.arange(23) % 3


KW_IMP = dict(classes=[0, 1, 2], batch_size=3, max_images_per_class=6, seed=4)   # 18 images: 6 batches
KW_REV = dict(classes=[0, 2], sample_size=3, repeats=3, batch_size=4, seed=5)     # 3 repeats on 2 ranks


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from conceptevo.distributed_pipeline import distributed_importance, distributed_reversion

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        imp = distributed_importance(_net(0), _net(1), (x, y), **KW_IMP)
        rev = distributed_reversion(_net(0), _net(1), (x, y), (x, y), **KW_REV)
        if rank == 0:
            imp.to_parquet(Path(out) / "imp.parquet")
            rev.long.to_parquet(Path(out) / "long.parquet")
            rev.importance.to_parquet(Path(out) / "rimp.parquet")
            rev.summary.to_parquet(Path(out) / "summary.parquet")
        else:
            assert imp is None and rev is None
    finally:
        dist.destroy_process_group()


def test_importance_and_reversion_over_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from conceptevo.importance import evolution_importance
    from conceptevo.reversion import reversion_check

    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    x, y = _data()
    imp = evolution_importance(_net(0), _net(1), (x, y), **KW_IMP)
    rev = reversion_check(_net(0), _net(1), (x, y), (x, y), **KW_REV)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "imp.parquet"), imp, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "long.parquet"), rev.long, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "rimp.parquet"), rev.importance, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "summary.parquet"), rev.summary, check_exact=True)
    assert imp["score"].nunique() > 1 and set(rev.long["sample"]) == {0, 1, 2}

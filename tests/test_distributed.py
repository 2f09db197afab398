"""Distributed stimulus pass (conceptevo.distributed): 2 gloo ranks on the CPU give stimuli identical
to a single-process run (dataset size not divisible by the world size nor by the batch size), and
killing one rank mid-run then relaunching resumes every rank and still gives the same result."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conceptevo.distributed import distributed_extract, shard_bounds
from conceptevo.errors import InputError
from conceptevo.stimuli import Stimuli, StimulusOptions, extract_stimuli
from conceptevo.store import RunStore

sys.path.insert(0, str(Path(__file__).parent))
from test_stimuli import ArrayDataset, assert_same, make_net, real_state  # noqa: E402

_THREADS = 1  # torch threads of each rank and of the single-process reference run
KW = dict(layers=["0", "3", "6"], k=4, k_i=3, batch_size=4, progress=False)


def _worker(rank: int, world: int, init_file: str, run: str, ckpts: list[str], data: str, crash_rank: int,
            crash_batch: int, log_dir: str, threads: int) -> None:
    # oneDNN may change the last bit of a convolution with the thread count (small batches):
    # the ranks use the reference run's count so that the comparison is about the engine, not the BLAS.
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = torch.load(data)
    firsts: list[int] = []

    def on_batch(batches: int, next_id: int) -> None:
        if not firsts:
            firsts.append(next_id)
            Path(log_dir, f"first_rank{rank}.json").write_text(json.dumps(next_id))
        if rank == crash_rank and batches == crash_batch:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no goodbye to the other rank

    try:
        distributed_extract(make_net, ckpts, ArrayDataset(x, y), device="cpu", store=run, save_every=1,
                            on_batch=on_batch, **KW)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(tmp_path: Path, tag: str, run: Path, ckpts, data, crash_rank=-1, crash_batch=-1) -> None:
    logs = tmp_path / f"logs_{tag}"
    logs.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / f"init_{tag}"), str(run), ckpts, str(data), crash_rank, crash_batch,
                            str(logs), _THREADS), nprocs=2, join=True)


@pytest.fixture
def problem(tmp_path, rng):
    n = int(rng.choice([37, 41, 35]))  # odd: not divisible by 2 ranks nor by the batch size 4
    x = torch.from_numpy(rng.standard_normal((n, 3, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=n))
    data = tmp_path / "data.pt"
    torch.save((x, y), data)
    ckpts = []
    for i in range(2):
        ckpts.append(str(tmp_path / f"epoch_{i}.pt"))
        torch.save(real_state(int(rng.integers(1 << 30))), ckpts[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)  # the ranks use the same count (see _worker)
    try:
        want = extract_stimuli(make_net, ckpts, ArrayDataset(x, y), **KW)
    finally:
        torch.set_num_threads(threads)
    return n, data, ckpts, want


def test_shard_bounds_cover_the_dataset_on_batch_boundaries(rng):
    for _ in range(50):
        n, bs, w = int(rng.integers(1, 200)), int(rng.integers(1, 17)), int(rng.integers(1, 9))
        bounds = [shard_bounds(n, bs, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        for (a0, a1), (b0, b1) in zip(bounds, bounds[1:]):
            assert a1 == b0 and a0 <= a1
        for a0, a1 in bounds:
            assert a0 % bs == 0 and (a1 % bs == 0 or a1 == n)
        sizes = [(a1 - a0 + bs - 1) // bs for a0, a1 in bounds]
        assert max(sizes) - min(sizes) <= 1  # balanced to one batch


def test_two_gloo_ranks_equal_single_process(tmp_path, problem):
    n, data, ckpts, want = problem
    run = tmp_path / "run"
    _spawn(tmp_path, "a", run, ckpts, data)
    store = RunStore(run, create=False)
    for spec_name, w in zip(("epoch_0", "epoch_1"), want):
        got = Stimuli.load(store, f"stimuli/{spec_name}")
        assert got.num_images == n
        assert_same(got, w)
        assert store.manifest["stages"][f"stimuli/{spec_name}"]["params"]["world_size"] == 2
    assert not store.path("stimuli/_progress").exists()
    # the second launch finds everything cached: no rank processes a batch
    _spawn(tmp_path, "b", run, ckpts, data)
    assert not any((tmp_path / "logs_b").iterdir())


def test_killed_rank_resumes_to_the_same_result(tmp_path, problem):
    n, data, ckpts, want = problem
    run = tmp_path / "run"
    # spawn reports rank 1's SIGKILL (or rank 0 losing its peer, if it noticed first) and stops rank 0
    with pytest.raises(Exception, match="SIGKILL|signal|Connection closed|remote worker"):
        _spawn(tmp_path, "a", run, ckpts, data, crash_rank=1, crash_batch=2)
    start1, stop1 = shard_bounds(n, 4, 1, 2)
    doc = json.loads((run / "stimuli" / "_progress" / "rank1of2" / "progress.json").read_text())
    assert doc["processed"] == start1 + 8 and doc["stop"] == stop1
    _spawn(tmp_path, "b", run, ckpts, data)
    # rank 1 continued after its last save; rank 0 continued too or had finished its shard
    assert json.loads((tmp_path / "logs_b" / "first_rank1.json").read_text()) == start1 + 12
    store = RunStore(run, create=False)
    for spec_name, w in zip(("epoch_0", "epoch_1"), want):
        assert_same(Stimuli.load(store, f"stimuli/{spec_name}"), w)


def _failing_worker(rank: int, world: int, init_file: str, data: str, ckpts: list[str], log_dir: str) -> None:
    torch.set_num_threads(_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = torch.load(data)
    try:
        distributed_extract(make_net, ckpts, ArrayDataset(x, y), device="cpu", **KW)
    except Exception as exc:
        Path(log_dir, f"rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def test_error_on_one_rank_is_raised_on_every_rank(tmp_path, problem):
    """NaN in rank 1's shard: rank 1 raises the ActivationError, rank 0 hears of it instead of hanging."""
    n, data, ckpts, _ = problem
    x, y = torch.load(data)
    bad = shard_bounds(n, 4, 1, 2)[0] + 5
    x[bad, 0, 3, 3] = float("nan")
    torch.save((x, y), tmp_path / "nan.pt")
    ctx = mp.start_processes(_failing_worker, args=(2, str(tmp_path / "init_nan"), str(tmp_path / "nan.pt"), ckpts,
                                                    str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after the other one failed")
    msg1 = (tmp_path / "rank1.txt").read_text()
    msg0 = (tmp_path / "rank0.txt").read_text()
    assert msg1.startswith("ActivationError") and f"[{bad}]" in msg1 and "'epoch_0'" in msg1
    assert "rank 1" in msg0 and "ActivationError" in msg0


def _options_worker(rank: int, world: int, init_file: str, run: str, ckpts: list[str], data: str, log_dir: str) -> None:
    torch.set_num_threads(_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = torch.load(data)
    options = StimulusOptions(**KW, device="cpu", save_every=1)
    try:
        try:  # refused on every rank before any collective: nobody waits
            distributed_extract(make_net, ckpts, ArrayDataset(x, y), store=run, options=options, observer=print)
        except InputError as exc:
            Path(log_dir, f"refused_rank{rank}.txt").write_text(str(exc))
        try:
            distributed_extract(make_net, ckpts, ArrayDataset(x, y), store=run,
                                options=dataclasses.replace(options, observer=print))
        except InputError as exc:
            Path(log_dir, f"observer_rank{rank}.txt").write_text(str(exc))
        distributed_extract(make_net, ckpts, ArrayDataset(x, y), store=run, options=options)
    finally:
        dist.destroy_process_group()


def test_distributed_extract_takes_the_options_object(tmp_path, problem):
    """One StimulusOptions drives 2 gloo ranks to the single-process result; a world of one takes it too."""
    _, data, ckpts, want = problem
    x, y = torch.load(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)  # as `want` was computed (see _worker)
    try:
        alone = distributed_extract(make_net, ckpts, ArrayDataset(x, y), options=StimulusOptions(**KW, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    for a, w in zip(alone, want):
        assert_same(a, w)
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    mp.spawn(_options_worker, args=(2, str(tmp_path / "init_opts"), str(run), ckpts, str(data), str(logs)),
             nprocs=2, join=True)
    for r in range(2):
        assert "k given both" not in (logs / f"refused_rank{r}.txt").read_text()
        assert "observer given both in options" in (logs / f"refused_rank{r}.txt").read_text()
        assert "StimulusOptions.observer is not supported over several ranks" in (
            logs / f"observer_rank{r}.txt").read_text()
    store = RunStore(run, create=False)
    for spec_name, w in zip(("epoch_0", "epoch_1"), want):
        assert_same(Stimuli.load(store, f"stimuli/{spec_name}"), w)
        assert store.manifest["stages"][f"stimuli/{spec_name}"]["params"]["world_size"] == 2


def test_torchrun_module_entry_point(tmp_path, rng):
    """`torchrun --standalone --nproc_per_node=2 -m conceptevo.distributed` on an image folder equals one process
    (checkpoints given as a quoted glob, the model's classes taken from the folder)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    from PIL import Image

    from conceptevo.data import image_folder
    from conceptevo.models import build_model

    for c, count in (("a", 6), ("b", 5)):  # 11 images: odd, and not a multiple of the batch size
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    ckpts = []
    for e in range(2):
        torch.manual_seed(int(rng.integers(1 << 30)))
        ckpts.append(str(tmp_path / f"epoch_{e}.pt"))
        torch.save(build_model("vgg_small", num_classes=2).state_dict(), ckpts[-1])  # the folder's 2 classes
    env = {**os.environ, "OMP_NUM_THREADS": str(_THREADS)}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "conceptevo.distributed",
           "--model", "vgg_small", "--checkpoints", str(tmp_path / "epoch_*.pt"), "--data", str(tmp_path / "imgs"), "--image-size", "16",
           "--run-dir", str(tmp_path / "run"), "--batch-size", "3", "--k", "3", "--k-i", "2", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stimuli/epoch_0: 352 neurons" in proc.stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        want = extract_stimuli(lambda: build_model("vgg_small", num_classes=2), ckpts, image_folder(tmp_path / "imgs", size=16),
                               k=3, k_i=2, batch_size=3, progress=False)
    finally:
        torch.set_num_threads(threads)
    store = RunStore(tmp_path / "run", create=False)
    for name, w in zip(("epoch_0", "epoch_1"), want):
        assert_same(Stimuli.load(store, f"stimuli/{name}"), w)

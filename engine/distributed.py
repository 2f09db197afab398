"""Distributed stimulus pass over ``torch.distributed`` ranks, merged exactly.

The dataset is cut into contiguous shards, one per rank, on *batch boundaries*: with
``nb = ceil(N / batch_size)`` batches, rank ``r`` of ``W`` takes batches
``[r * nb // W, (r + 1) * nb // W)``. Any dataset size works (no divisibility by ``W`` or by the
batch size is needed), and every batch holds exactly the images it holds in a single-process run
with the same batch size -- so even a model whose kernels change the last bit of an activation
with the batch composition (oneDNN, cuDNN) gives the very same activations. Each rank streams its
shard through every checkpoint (see :mod:`conceptevo.stimuli`), keeping its own running top-k
states; then rank 0 gathers them and merges them with :func:`conceptevo.kernels.merge`, which is
exact and associative (ties by lowest image id), and takes each image's responsive row from the
rank that saw it. The result is identical to a single-process :func:`~conceptevo.stimuli.extract_stimuli`
with the same batch size.

Backends: ``gloo`` for CPU tensors, ``nccl`` when the device is CUDA (each rank uses
``cuda:LOCAL_RANK``). Only rank 0 writes results and the manifest. Each rank saves its own
progress every ``save_every`` batches (and when its shard is done) under
``<prefix>/_progress/rank<r>of<W>/``, so after a crash a relaunch with the same arguments resumes
every rank where it stopped; a finished rank recomputes nothing.

Launch (``-m`` runs this module; every rank runs the same command):

One node, 4 processes (CPU: gloo; with GPUs: one per process)::

    torchrun --standalone --nproc_per_node=4 -m conceptevo.distributed \\
        --model vgg_small --checkpoints runs/well_trained/checkpoints/*.pt \\
        --data builtin:train --run-dir out/run1 --batch-size 128

Several nodes (here 2 nodes x 8 GPUs; run on every node, same rendezvous endpoint and id)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=node0.example:29500 --rdzv_id=stimuli42 \\
        -m conceptevo.distributed --model vgg_small --checkpoints ... --data /data/imagenet/val \\
        --run-dir /shared/out/run1 --device cuda
    # and on the second node the same with --node_rank=1

``--run-dir`` should be on a file system every node sees if you want the per-rank progress files
next to the results; otherwise each node keeps its ranks' progress locally and rank 0's node gets
the results. From Python, call :func:`distributed_extract` inside a process group (or under
torchrun, where it initialises the group from the environment).

``--model`` takes what the config's ``model`` of ``conceptevo run`` takes: a built-in name,
``torchvision:<name>``, or your own factory ``my_pkg.models:build`` (importable on every rank).
To run the whole pipeline over the ranks (stimuli, importance, reversion check), launch
``torchrun ... -m conceptevo run config.toml`` instead (see :mod:`conceptevo.distributed_pipeline`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .adapter import LayerSpec
from .errors import ConceptEvoError, InputError
from .stimuli import (
    PROGRESS_DIR,
    Extraction,
    LayerStimuli,
    Stimuli,
    StimulusOptions,
    _open_store,
    extract_stimuli,
)
from .store import RunStore

__all__ = ["distributed_extract", "shard_bounds", "init_distributed", "main"]

log = logging.getLogger(__name__)


def shard_bounds(num_images: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Image ids ``[start, stop)`` of ``rank``'s shard: contiguous whole batches (see the module docstring)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConceptEvoError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1:
        raise ConceptEvoError(f"batch_size must be >= 1, got {batch_size}")
    nb = -(-num_images // batch_size)
    b0, b1 = rank * nb // world_size, (rank + 1) * nb // world_size
    return min(num_images, b0 * batch_size), min(num_images, b1 * batch_size)


def init_distributed(backend: str | None = None, device: str | torch.device = "auto",
                     timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment if needed.

    Returns ``(rank, world_size, device)``: ``cuda:LOCAL_RANK`` when ``device`` is "auto"/"cuda"
    and CUDA is available (backend nccl), else the CPU (backend gloo).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _rank_device(device, local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConceptEvoError(
                "no process group: launch with torchrun (e.g. torchrun --standalone --nproc_per_node=2 "
                "-m conceptevo.distributed ...) or call torch.distributed.init_process_group first"
            )
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dist.get_rank(), dist.get_world_size(), dev


def _rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    if isinstance(device, str) and device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if device == "cuda":
            raise ConceptEvoError("device 'cuda' was asked for but no CUDA device is visible")
        return torch.device("cpu")
    return torch.device(device)


def _payload(plan: Extraction, layer_states: dict[str, Any], start: int, stop: int) -> dict[str, dict[str, np.ndarray]]:
    """What a rank sends for one checkpoint: full (C, k) top-k arrays, responsive rows of its shard only."""
    out = {}
    for n in plan.layer_names:
        st = layer_states[n]
        out[n] = {
            "values": st.values.cpu().numpy(), "ids": st.ids.cpu().numpy(),
            "rows": st.rows.cpu().numpy(), "cols": st.cols.cpu().numpy(),
            "resp_values": st.resp_values[start:stop].cpu().numpy(),
            "resp_ids": st.resp_ids[start:stop].cpu().numpy(),
        }
    return out


def _merge_payloads(plan: Extraction, name: str, payloads: list[dict[str, dict[str, np.ndarray]]]) -> Stimuli:
    """Exact merge of the ranks' payloads (in rank order = shard order) into one Stimuli."""
    from . import kernels

    layers = {}
    for n in plan.layer_names:
        merged = None
        for p in payloads:
            arr = p[n]
            part = kernels.TopKState(
                values=torch.from_numpy(arr["values"]), ids=torch.from_numpy(arr["ids"]),
                rows=torch.from_numpy(arr["rows"]), cols=torch.from_numpy(arr["cols"]),
                # The responsive rows are disjoint slices, concatenated below; the top-k merge needs none.
                resp_values=torch.empty((0, plan.k_i), dtype=torch.float32),
                resp_ids=torch.empty((0, plan.k_i), dtype=torch.int32),
            )
            merged = part if merged is None else kernels.merge(merged, part)
        resp_v = np.concatenate([p[n]["resp_values"] for p in payloads], axis=0)
        resp_i = np.concatenate([p[n]["resp_ids"] for p in payloads], axis=0)
        if resp_v.shape[0] != plan.num_images:
            raise ConceptEvoError(f"the ranks' shards cover {resp_v.shape[0]} images, the dataset has {plan.num_images}")
        layers[n] = LayerStimuli(
            ids=merged.ids.numpy().copy(), values=merged.values.numpy().copy(),
            rows=merged.rows.numpy().copy(), cols=merged.cols.numpy().copy(),
            responsive=np.ascontiguousarray(resp_i), responsive_values=np.ascontiguousarray(resp_v),
        )
    return Stimuli(layers=layers, num_images=plan.num_images, name=name)


def distributed_extract(
    model_factory: Callable[[], nn.Module] | nn.Module,
    checkpoints: Sequence[str | os.PathLike | dict[str, torch.Tensor]] | None,
    dataset: Any,
    *,
    store: RunStore | str | os.PathLike | None = None,
    prefix: str = "stimuli",
    names: Sequence[str] | None = None,
    group: Any = None,
    options: StimulusOptions | None = None,
    **keywords: Any,
) -> list[Stimuli] | None:
    """:func:`~conceptevo.stimuli.extract_stimuli` over the ranks of a process group.

    Every rank calls it with the same arguments: those of ``extract_stimuli`` (the options as a
    :class:`~conceptevo.stimuli.StimulusOptions` or as its fields one by one), plus ``group``, the
    process group (default: the world). Rank 0 returns the merged list of
    :class:`~conceptevo.stimuli.Stimuli` (and writes them to ``store``); the other ranks return
    None. Outside torchrun and without a process group (a world of one) it simply runs
    :func:`extract_stimuli`. The device defaults to ``cuda:LOCAL_RANK`` when CUDA is available.
    The progress bar is shown on rank 0 only; ``observer`` is refused over several ranks (each
    rank sees only its shard). The process group is left as it was found; one initialised here
    from torchrun's environment is destroyed before returning.
    """
    opts = StimulusOptions.combine(options, keywords, "distributed_extract")
    device = "auto" if opts.device is None else opts.device
    if not dist.is_available() or (not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        dev = _rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        return extract_stimuli(model_factory, checkpoints, dataset, store=store, prefix=prefix, names=names,
                               options=replace(opts, device=dev))
    if opts.observer is not None:
        raise InputError("distributed_extract: StimulusOptions.observer is not supported over several ranks "
                         "(each rank sees only its shard); run extract_stimuli in one process for it")
    owns_group = not dist.is_initialized()
    try:
        if owns_group:
            init_distributed(device=device)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        dev = _rank_device(device, int(os.environ.get("LOCAL_RANK", str(rank))))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return _run(model_factory, checkpoints, dataset, names, replace(opts, device=dev), _open_store(store),
                    prefix.strip("/"), group, rank, world)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _agreed(fn: Callable[[], Any], what: str, group: Any, world: int) -> Any:
    """Run ``fn`` on every rank, then agree on success: a rank whose ``fn`` raised re-raises it, the
    others raise a ConceptEvoError naming that rank -- instead of waiting forever in the next collective.
    (A rank that is killed outright cannot report; torchrun then stops the others.)"""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the other ranks have heard of it
        error = exc
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(statuses) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise ConceptEvoError(f"{what} failed on rank {r}: {msg}")
    return result


def _run(model_factory, checkpoints, dataset, names, opts: StimulusOptions, store: RunStore | None, prefix: str,
         group, rank: int, world: int) -> list[Stimuli] | None:
    root = 0 if group is None else dist.get_global_rank(group, 0)  # collectives name global ranks
    plan = _agreed(lambda: Extraction(model_factory, checkpoints, dataset, names=names, options=opts),
                   "setting up the stimulus pass", group, world)
    # Rank 0 decides what is cached (its store holds the results), everyone follows.
    done = plan.cached(store, prefix) if rank == 0 else plan.use_store(store)
    box = [done]
    dist.broadcast_object_list(box, src=root, group=group)
    done = box[0]
    pending = [i for i, d in enumerate(done) if not d]
    results: list[Stimuli | None] = [None] * len(plan.checkpoints)
    if rank == 0:
        for i, d in enumerate(done):
            if d:
                results[i] = Stimuli.load(store, f"{prefix}/{plan.checkpoints[i].name}")
    if not pending:
        return results if rank == 0 else None  # type: ignore[return-value]

    specs = [plan.checkpoints[i] for i in pending]
    start, stop = shard_bounds(plan.num_images, plan.batch_size, rank, world)
    progress_dir = f"{prefix}/{PROGRESS_DIR}/rank{rank}of{world}"
    t0 = time.perf_counter()
    states = _agreed(lambda: plan.run_shard(
        specs, start, stop, store=store, progress_dir=progress_dir, resume=opts.resume, save_every=opts.save_every,
        progress=opts.progress and rank == 0, on_batch=opts.on_batch, save_at_end=True,
        desc=f"stimuli rank {rank}/{world} x{len(specs)}"), "the stimulus pass", group, world)
    seconds = time.perf_counter() - t0

    times: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(seconds, times, dst=root, group=group)
    # Diverged checkpoints and accuracy hits of every shard: a checkpoint diverged if it did on any
    # rank (the first rank's reason is kept); hits add up over the shards.
    findings: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((plan.diverged, plan.hits), findings, dst=root, group=group)
    if rank == 0:
        plan.diverged, plan.hits = {}, {}
        for div, hits in findings:  # type: ignore[union-attr]
            for name, why in div.items():
                plan.diverged.setdefault(name, why)
            for name, h in hits.items():
                plan.hits[name] = [a + b for a, b in zip(plan.hits.get(name, [0, 0, 0]), h)]
    for i, spec, layer_states in zip(pending, specs, states):  # one checkpoint at a time bounds rank 0's memory
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(_payload(plan, layer_states, start, stop), gathered, dst=root, group=group)
        if rank == 0:
            if spec.name in plan.diverged:
                stim = Stimuli(layers={}, num_images=plan.num_images, name=spec.name,
                               diverged=plan.diverged[spec.name])
            else:
                stim = _merge_payloads(plan, spec.name, gathered)  # type: ignore[arg-type]
                stim.accuracy = plan.accuracy_of(spec)
            results[i] = stim
            if store is not None:
                plan.record(store, prefix, spec, stim, max(times), len(specs),  # type: ignore[arg-type]
                            extra={"world_size": world, "rank_seconds": [round(t, 4) for t in times],
                                   **({"diverged": stim.diverged} if stim.diverged else {})})
        del gathered
    del states
    # Results are safe on rank 0 before any rank drops its progress.
    dist.barrier(group=group)
    if store is not None:
        shutil.rmtree(store.path(progress_dir), ignore_errors=True)
    dist.barrier(group=group)  # every rank's progress is gone before the folder is dropped
    if store is not None and rank == 0:
        _remove_if_empty(store.path(f"{prefix}/{PROGRESS_DIR}"))
    return results if rank == 0 else None  # type: ignore[return-value]


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ================================================================================== CLI
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m conceptevo.distributed",
        description="Distributed stimulus extraction (run under torchrun; see the module docstring).",
    )
    p.add_argument("--model", required=True,
                   help="model, as the config's `model` of `conceptevo run`: a built-in name (vgg_small), "
                        "torchvision:<name>, or your factory package.module:function (called with no arguments)")
    p.add_argument("--num-classes", type=int, default=None, help="logits of the model (default: the data's classes)")
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="checkpoint files of that model (quoted glob patterns are expanded, sorted)")
    p.add_argument("--names", nargs="+", default=None, help="one name per checkpoint (default: from the paths)")
    p.add_argument("--data", required=True,
                   help="'builtin[:train|test]' or an image folder <dir>/<class>/<files>")
    p.add_argument("--image-size", type=int, default=32, help="image folders: resize to this size")
    p.add_argument("--seed", type=int, default=0, help="built-in data seed")
    p.add_argument("--run-dir", required=True, help="run directory (results, manifest, progress)")
    p.add_argument("--prefix", default="stimuli")
    p.add_argument("--layers", default=None, help="comma-separated module names or one regex (default: every Conv2d)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k-i", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=["off", "on", "bf16", "fp16"])
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--swap-weights", action="store_true")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _load_data(spec: str, image_size: int, seed: int, cache_root: Path) -> Any:
    from . import data

    if spec == "builtin" or spec.startswith("builtin:"):
        split = spec.split(":", 1)[1] if ":" in spec else "train"
        return data.builtin_dataset(split, seed=seed, root=cache_root)
    return data.image_folder(spec, size=image_size)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m conceptevo.distributed`` (under torchrun)."""
    args = _parse(argv)
    from .models import model_factory

    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    layers: LayerSpec = None
    if args.layers:
        layers = [s.strip() for s in args.layers.split(",")] if "," in args.layers else args.layers
    amp: bool | str = {"off": False, "on": True}.get(args.amp, args.amp)
    run = Path(args.run_dir)
    dataset = _load_data(args.data, args.image_size, args.seed, run / "data")
    num_classes = args.num_classes or len(dataset.class_names)
    checkpoints = []
    for pattern in args.checkpoints:  # the shell expands unquoted globs; quoted ones are expanded here
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise ConceptEvoError(f"--checkpoints {pattern!r} matches no file")
        checkpoints += found
    try:
        factory = model_factory(args.model, num_classes)  # exactly as `conceptevo run` resolves `model`
    except ConceptEvoError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    try:
        options = StimulusOptions(
            layers=layers, k=args.k, k_i=args.k_i, batch_size=args.batch_size, device=args.device,
            resume=not args.no_resume, save_every=args.save_every, amp=amp, backend=args.backend,
            progress=not args.quiet, num_workers=args.num_workers, swap_weights=args.swap_weights,
            recompute=args.recompute)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = distributed_extract(factory, checkpoints, dataset, store=RunStore(run), prefix=args.prefix,
                                  names=args.names, options=options)
    if results is not None:
        for s in results:
            print(f"{args.prefix}/{s.name}: {s.num_neurons} neurons x k={s.k}, {s.num_images} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole method end to end: ``conceptevo demo`` on the built-in data, ``conceptevo run`` on yours.

Stages run in order and each one leaves its artifacts in the run directory; a stage
whose inputs and parameters are unchanged is reloaded, not recomputed (the stimulus
pass also resumes mid-way after a crash). Layout of a run directory::

    manifest.json                versions, parameters, seeds, backends, per-stage timings
    data/                        the built-in dataset cache (demo only)
    training/<run>/              checkpoints/epoch_XXX.pt, log.parquet, run.json (demo only)
    stimuli/<run>/epoch_XXX/...  stimuli per checkpoint and layer (.npy)
    space/                       the fitted UnifiedSpace (save/load) and its one neighbour graph
                                 (neighbours.npy, neighbour_distances.npy, neighbours.json)
    neurons.parquet              model, epoch, layer, channel, vector, x, y (+ concept tags)
    alignment.parquet            alignment report (built-in data)
    importance.parquet           important evolutions (class, layer, channel, score, ...)
    reversion.parquet            reversion check summary (+ reversion_long.parquet, figures/reversion.png)
    diagnostics.parquet          diversity / movement per run and epoch (+ verdicts.json)
    report.html, figures/*.png   the report and its static figures
"""
from __future__ import annotations

import glob
import os
import re
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from . import backends
from .adapter import checkpoint_epoch
from .backends import resolve_device
from .errors import ConceptEvoError
from .models import model_factory
from .store import RunStore

__all__ = ["PipelineConfig", "RunSpec", "run_pipeline", "run_demo", "load_config", "RunResult"]

console = Console(stderr=True)


@dataclass
class PipelineConfig:
    """Parameters of one pipeline run (a TOML file maps onto these fields)."""

    out: Path = Path("conceptevo-runs/demo")
    dataset: str = "builtin"              # "builtin" or a folder with one subfolder per class
    test_dataset: str | None = None       # folder of held-out images (reversion check on test images)
    image_size: int = 32
    model: str = "vgg_small"              # build_model name, or "package.module:factory"
    num_classes: int | None = None
    runs: dict[str, str] = field(default_factory=dict)  # run name -> checkpoint glob or training dir
    layers: list[str] | None = None       # default: every Conv2d
    base: str | None = None               # "run" (its last epoch) or "run/epoch_N"; default first run
    k: int = 10
    k_i: int = 5
    batch_size: int = 128
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    dim: int = 30
    repeats: int = 10                     # E of Step 1.2
    sgns_epochs: int | None = None
    sgns_threads: int | None = 1          # 1: bit-reproducible; more threads (Hogwild) are faster, not exact
    evolution_epochs: list[int] | None = None  # [t, t'] of the base run; default: paper's milestones
    importance_classes: int | list[int] = 3
    importance_gradient_at: str = "t"     # "t" (Eq. 3) or "t_prime" (see conceptevo.importance)
    importance_images: int = 128          # images per class for the importance tables
    reversion_classes: int | list[int] | None = None  # None: every class (the paper: 100 random)
    reversion_sample_size: int = 32
    reversion_repeats: int = 5
    patches_per_neuron: int = 4
    neighbours: int = 6
    backends: dict[str, str] = field(default_factory=dict)  # topk / solve / faiss / umap -> auto|cpu|gpu
    threads: int | None = None
    skip_bad: bool = False                # leave unreadable image files out (listed in manifest and report)
    directions: bool = False              # concept directions by SVD (conceptevo.directions), off by default
    directions_runs: list[str] | None = None  # runs to analyse; default: the base run
    directions_images: int = 32           # images per class for the relevance (gradient) pass
    directions_gradient: str = "logit"    # "logit" or "loss" (the authors' code; see conceptevo.directions)
    directions_basis: str = "svd"         # "svd" (the method) or "ica" (FastICA filters: rare concepts)
    trace: bool = True                    # trace the base run's evolutions when it recorded trace/ (conceptevo.tracing)
    trace_contributions: int = 64         # test images for the per-class contribution figure (0: none)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.directions_basis not in ("svd", "ica"):  # checked here, before hours of stimuli
            raise ConceptEvoError(f"directions_basis must be 'svd' or 'ica', got {self.directions_basis!r}")


@dataclass
class RunSpec:
    """One training run: its checkpoints by epoch, how to build its model, its accuracy log."""

    name: str
    checkpoints: dict[int, Path]
    factory: Callable[[], torch.nn.Module]
    log: pd.DataFrame | None = None


@dataclass
class RunResult:
    out: Path
    report: Path | None
    seconds: dict[str, float]
    verdicts: dict[str, Any]


# ------------------------------------------------------------------------------------ config
def load_config(path: str | Path) -> PipelineConfig:
    """Read a TOML config; unknown keys are an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise ConceptEvoError(f"config file not found: {path}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConceptEvoError(f"config {path} is not valid TOML: {exc}") from None
    known = set(PipelineConfig.__dataclass_fields__)
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConceptEvoError(f"config {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    base_dir = path.parent
    for key in ("out", "dataset", "test_dataset"):  # relative paths are relative to the config file
        v = doc.get(key)
        if isinstance(v, str) and v != "builtin" and not os.path.isabs(v):
            doc[key] = str(base_dir / v)
    if "runs" in doc:
        doc["runs"] = {k: (v if os.path.isabs(v) else str(base_dir / v)) for k, v in doc["runs"].items()}
    return PipelineConfig(**doc)


def resolve_runs(cfg: PipelineConfig, num_classes: int) -> dict[str, RunSpec]:
    """Turn ``cfg.runs`` (globs or training folders) into RunSpecs, in the config's order."""
    from . import train

    if not cfg.runs:
        raise ConceptEvoError("the config names no runs: add a [runs] table (run name -> checkpoint glob)")
    specs: dict[str, RunSpec] = {}
    for name, where in cfg.runs.items():
        p = Path(where)
        if p.is_dir() and (p / "run.json").exists():  # a training folder written by conceptevo.train
            ckpts = train.run_checkpoints(p)
            log = train.load_train_log(p).table
            specs[name] = RunSpec(name, ckpts, train.run_model_factory(p), log)
            continue
        files = sorted(Path(f) for f in glob.glob(str(p / "*.pt") if p.is_dir() else str(p)))
        if not files:
            raise ConceptEvoError(f"run {name!r}: no checkpoint matches {where!r}")
        ckpts = {checkpoint_epoch(f): f for f in files}
        if len(ckpts) != len(files):
            raise ConceptEvoError(f"run {name!r}: two checkpoints share an epoch number in {where!r}")
        specs[name] = RunSpec(name, dict(sorted(ckpts.items())), model_factory(cfg.model, num_classes))
    return specs


def _base_of(cfg: PipelineConfig, runs: Mapping[str, RunSpec]) -> tuple[str, int]:
    if cfg.base is None:
        name = next(iter(runs))
        return name, max(runs[name].checkpoints)
    name, _, ep = cfg.base.partition("/")
    if name not in runs:
        raise ConceptEvoError(f"base run {name!r} is not among the runs {list(runs)}")
    epoch = int(re.findall(r"\d+", ep)[-1]) if ep else max(runs[name].checkpoints)
    if epoch not in runs[name].checkpoints:
        raise ConceptEvoError(f"base {cfg.base!r}: run {name!r} has no epoch {epoch}; it has {list(runs[name].checkpoints)}")
    return name, epoch


# ---------------------------------------------------------------------------------- stages
class _Timer:
    def __init__(self, seconds: dict[str, float], stage: str):
        self.seconds, self.stage = seconds, stage

    def __enter__(self):
        self.t0 = time.perf_counter()
        console.rule(f"[bold]{self.stage}")
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.seconds[self.stage] = dt
        if exc[0] is None:
            console.print(f"[green]{self.stage}[/] done in {dt:.1f} s")


def _pick_evolution_epochs(spec: RunSpec, chosen: Sequence[int] | None = None,
                           milestones: Sequence[float] = (0.25, 0.5, 0.75)) -> tuple[int, int]:
    """t -> t' for importance and reversion, as the paper picks them (Sec. 4.4): the saved
    epochs whose training top-1 is closest to the accuracy milestones 25%, 50%, 75%; of the
    stages between consecutive distinct milestone epochs, the last. Without a log (or with all
    milestones on one epoch): the middle saved epoch -> the last. ``chosen`` overrides."""
    epochs = sorted(spec.checkpoints)
    if chosen is not None:
        t, t2 = (int(e) for e in chosen)
        missing = [e for e in (t, t2) if e not in spec.checkpoints]
        if missing or t >= t2:
            raise ConceptEvoError(f"evolution_epochs {list(chosen)}: need two saved epochs t < t' of run "
                                  f"{spec.name!r} (saved: {epochs})")
        return t, t2
    if len(epochs) < 2:
        raise ConceptEvoError(f"run {spec.name!r} needs two checkpoints for evolution analysis")
    if spec.log is not None and "train_top1" in spec.log:
        log = spec.log.set_index("epoch")["train_top1"]
        known = [e for e in epochs if e in log.index and np.isfinite(log[e])]
        resolved = []
        for m in milestones:
            if known:
                e = min(known, key=lambda e: (abs(log[e] - m), e))
                if not resolved or e > resolved[-1]:
                    resolved.append(e)
        if len(resolved) >= 2:
            return resolved[-2], resolved[-1]
    return epochs[len(epochs) // 2 - 1 if len(epochs) > 2 else 0], epochs[-1]


def _load_model(spec: RunSpec, epoch: int, device: torch.device) -> torch.nn.Module:
    from .adapter import load_state_dict_file

    model = spec.factory()
    model.load_state_dict(load_state_dict_file(spec.checkpoints[epoch]))
    return model.to(device).eval()


def _with_pass_accuracy(runs: Mapping[str, RunSpec], diverged: Mapping[str, Mapping[int, str]],
                        pass_acc: list[dict[str, Any]], test_set, cfg: PipelineConfig, device: torch.device,
                        store: RunStore) -> dict[str, RunSpec]:
    """Runs without a training log get one from the stimulus pass (train top-1/top-5 on the pass's
    images and labels, test top-1/top-5 when a test set is given); diverged epochs are dropped
    from every run's checkpoints. Writes ``checkpoint_accuracy.parquet``."""
    from dataclasses import replace

    table = pd.DataFrame(pass_acc, columns=["run", "epoch", "train_top1", "train_top5"])
    out: dict[str, RunSpec] = {}
    for name, spec in runs.items():
        ckpts = {e: p for e, p in spec.checkpoints.items() if e not in diverged.get(name, {})}
        log = spec.log
        if log is None and ckpts:
            log = table[table["run"] == name].drop(columns="run").reset_index(drop=True)
            if test_set is not None and len(log):
                test = checkpoint_accuracy(spec.factory, {e: ckpts[e] for e in log["epoch"]}, test_set,
                                           cfg.batch_size, device)
                log = log.merge(test.rename(columns={"top1": "test_top1", "top5": "test_top5"}), on="epoch",
                                how="left")
            log["source"] = "stimulus pass"
            console.print(f"{name}: no training log; accuracy per checkpoint from the stimulus pass "
                          f"(top-1 {', '.join(f'{a:.2f}' for a in log['train_top1'])})")
        out[name] = replace(spec, checkpoints=ckpts, log=log)
    store.save_table("checkpoint_accuracy", table)
    return out


@torch.no_grad()
def checkpoint_accuracy(factory: Callable[[], torch.nn.Module], checkpoints: Mapping[int, Path], dataset,
                        batch_size: int = 128, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Top-1 / top-5 of every checkpoint on a labelled dataset (eval mode): ``epoch, top1, top5``."""
    from .adapter import load_state_dict_file
    from .data import as_image_set, indexed_loader

    ds = as_image_set(dataset)
    rows = []
    for epoch, path in checkpoints.items():
        model = factory()
        model.load_state_dict(load_state_dict_file(path))
        model = model.to(device).eval()
        n = c1 = c5 = 0
        for _ids, x, y in indexed_loader(ds, batch_size):
            logits = model(x.to(device)).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            n += len(y)
            c1 += int((top[:, 0] == y).sum())
            c5 += int((top == y[:, None]).any(dim=1).sum())
        rows.append({"epoch": int(epoch), "top1": c1 / max(n, 1), "top5": c5 / max(n, 1)})
    return pd.DataFrame(rows, columns=["epoch", "top1", "top5"])


def run_pipeline(cfg: PipelineConfig, *, train_set=None, test_set=None, runs: Mapping[str, RunSpec] | None = None,
                 report: bool = True, _world=None) -> RunResult:
    """Run stimuli -> space -> alignment -> importance -> reversion -> diagnostics -> report.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls it: the stimulus pass, importance and the
    reversion check run over all ranks, the rest on rank 0 (see :mod:`conceptevo.distributed_pipeline`);
    the other ranks return a RunResult without a report."""
    from . import alignment, data, diagnostics, importance, patches, reversion
    from . import report as report_mod
    from .space import UnifiedSpace
    from .stimuli import StimulusOptions, extract_stimuli

    world = _world
    if world is None:
        from .distributed_pipeline import pipeline_world

        world = pipeline_world()
        if world is not None:
            def serve_ctx():
                tr, te = _datasets(cfg, train_set, test_set)
                n_cls = cfg.num_classes or len(tr.class_names)
                return {"train_set": tr, "test_set": te,
                        "runs": dict(runs) if runs is not None else resolve_runs(cfg, n_cls)}
            return world.run(cfg, lambda: run_pipeline(cfg, train_set=train_set, test_set=test_set, runs=runs,
                                                       report=report, _world=world), serve_ctx)

    t_all = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = RunStore(cfg.out)
    seconds: dict[str, float] = {}
    device = resolve_device(cfg.device) if world is None else world.device(cfg.device)
    chosen = {kind: backends.select(kind, cfg.backends.get(kind, "auto")) for kind in backends.KINDS}
    store.update_manifest(config=_jsonable(asdict(cfg)), backends=chosen, device=str(device))

    skipped: dict[str, list[str]] = {}
    if train_set is None:
        if cfg.dataset == "builtin":
            train_set = data.builtin_dataset("train", seed=cfg.seed, root=cfg.out / "data")
            test_set = test_set or data.builtin_dataset("test", seed=cfg.seed, root=cfg.out / "data")
        else:
            train_set, skipped["dataset"] = _image_folder(cfg.dataset, cfg.image_size, cfg.skip_bad)
            if cfg.test_dataset:
                test_set, skipped["test_dataset"] = _image_folder(cfg.test_dataset, cfg.image_size, cfg.skip_bad)
    skipped_files = [{"dataset": which, "path": p} for which, paths in skipped.items() for p in paths]
    store.update_manifest(skipped_files=skipped_files)  # a list: replaces an earlier run's
    if skipped_files:
        console.print(f"[yellow]left out {len(skipped_files)} unreadable image file(s)[/] "
                      "(skip_bad; listed in manifest.json under skipped_files)")
    num_classes = cfg.num_classes or len(train_set.class_names)
    runs = dict(runs) if runs is not None else resolve_runs(cfg, num_classes)
    base_run, base_epoch = _base_of(cfg, runs)
    input_shape = tuple(train_set[0][0].shape)

    # 1. stimuli: one streaming pass per run (all its checkpoints at once). The pass also runs each
    # model's head for its accuracy (runs without a training log get diagnostics from it), and a
    # checkpoint that diverged (NaN/inf weights or activations) is recorded as a finding, not a crash.
    stims: dict[tuple[str, int], Any] = {}
    diverged: dict[str, dict[int, str]] = {}
    grams: dict[tuple[str, int], Any] = {}  # Gram matrices streamed in this pass (directions stage)
    pass_acc: list[dict[str, Any]] = []
    with _Timer(seconds, "stimuli"):
        for name, spec in runs.items():
            epochs = sorted(spec.checkpoints)
            observer, accs = (None, {})
            # over ranks the directions stage makes its own Gram pass; the ICA basis needs no Gram
            if cfg.directions and cfg.directions_basis == "svd" and world is None:
                from .directions import gram_observer

                observer, accs = gram_observer()
            options = StimulusOptions(layers=cfg.layers, k=cfg.k, k_i=cfg.k_i, batch_size=cfg.batch_size,
                                      device=device, amp=cfg.amp, backend=cfg.backends.get("topk", "auto"),
                                      input_shape=input_shape, accuracy=True, on_diverged="record",
                                      observer=observer)
            out = (extract_stimuli if world is None else world.extractor(name))(
                spec.factory, [spec.checkpoints[e] for e in epochs], train_set, store=store,
                prefix=f"stimuli/{name}", names=[f"epoch_{e:03d}" for e in epochs], options=options)
            grams.update({(name, e): accs[f"epoch_{e:03d}"] for e in epochs if f"epoch_{e:03d}" in accs})
            for e, s in zip(epochs, out):
                if s.diverged:
                    diverged.setdefault(name, {})[e] = s.diverged
                    console.print(f"[yellow]{name} epoch {e}: diverged ({s.diverged}); left out of the space")
                    continue
                stims[(name, e)] = s
                if s.accuracy:
                    pass_acc.append({"run": name, "epoch": e, "train_top1": s.accuracy["top1"],
                                     "train_top5": s.accuracy["top5"]})
        if not stims:
            raise ConceptEvoError("every checkpoint diverged (NaN/inf weights or activations): "
                                  + "; ".join(f"{r} epoch {e}: {why}" for r, d in diverged.items()
                                              for e, why in d.items()))
        if base_epoch in diverged.get(base_run, {}):
            raise ConceptEvoError(f"the base checkpoint {base_run}/epoch_{base_epoch} diverged "
                                  f"({diverged[base_run][base_epoch]}); choose another base in the config")
        store.update_manifest(diverged={r: {str(e): why for e, why in d.items()} for r, d in diverged.items()})
        runs = _with_pass_accuracy(runs, diverged, pass_acc, test_set, cfg, device, store)

    # 2-6. unified space, projection of every checkpoint, one 2-D layout
    with _Timer(seconds, "unified space"):
        params = space_params(cfg, (base_run, base_epoch), stims, chosen)
        stim_keys = [store.stage_record(f"stimuli/{n}/epoch_{e:03d}") or {} for n, e in sorted(stims)]
        key = store.stage_key(params, [r.get("key", "") for r in stim_keys])
        if store.is_done("space", key):
            space = UnifiedSpace.load(store.path("space"))
            console.print("unified space: unchanged inputs, reloaded")
        else:
            t0 = time.perf_counter()
            space = UnifiedSpace.fit(stims[(base_run, base_epoch)], dim=cfg.dim, repeats=cfg.repeats,
                                     epochs=cfg.sgns_epochs, seed=cfg.seed, threads=cfg.sgns_threads,
                                     solver_backend=cfg.backends.get("solve", "auto"),
                                     model=base_run, epoch=base_epoch)
            for (name, epoch), s in sorted(stims.items()):
                space.add(name, epoch, s, replace=True)
            space.layout_2d(seed=cfg.seed, backend=cfg.backends.get("umap", "auto"))
            # the ONE neighbour graph (saved with the space), read by the alignment and the report
            space.neighbour_graph(k=max(10, cfg.neighbours), backend=cfg.backends.get("faiss", "auto"))
            space.save(store.path("space"))
            space.to_parquet(store.path("neurons.parquet"))
            fit = space.info.get("image_embedding") or {}
            store.mark_done("space", key, time.perf_counter() - t0, params=params, backends=dict(space.backends),
                            seeds={"space": cfg.seed}, outputs=["space", "neurons.parquet"],
                            fit={"in_sample_rmse": fit.get("rmse"), "in_sample_rel_rmse": fit.get("rel_rmse"),
                                 "holdout": {k: v for k, v in (space.info.get("holdout") or {}).items()
                                             if k != "neurons"} or None})
        graph = space.neighbour_graph(k=max(10, cfg.neighbours), backend=cfg.backends.get("faiss", "auto"))
        store.update_manifest(neighbour_graph=graph.to_dict(), layout=_jsonable(space.layout_params))
        console.print(f"{len(space)} neurons from {len(space.checkpoints)} checkpoints; "
                      f"image-embedding fit: {space.info.get('image_embedding', {})}")

    # alignment with the ground-truth concept tags (built-in data only)
    align = None
    if getattr(train_set, "tags", None):
        with _Timer(seconds, "alignment"):
            align = alignment.alignment_report(space, train_set.tags, seed=cfg.seed, graph=graph,
                                               backend=cfg.backends.get("faiss", "auto"))
            store.save_table("alignment", align.table)
            align.print(console)
            # the same with the base model's neurons as the queries: how its concepts find their
            # neighbours in its own checkpoint, across the base run's epochs and in the other runs
            base_rows = space.rows(base_run, base_epoch)
            align_base = alignment.alignment_report(space, train_set.tags, seed=cfg.seed, graph=graph,
                                                    queries=base_rows, backend=cfg.backends.get("faiss", "auto"))
            store.save_table("alignment_base", align_base.table)

    base_spec = runs[base_run]
    t, t2 = _pick_evolution_epochs(base_spec, cfg.evolution_epochs)
    if t in diverged.get(base_run, {}) or t2 in diverged.get(base_run, {}):
        raise ConceptEvoError(f"evolution epochs {t} -> {t2} of {base_run!r}: a diverged checkpoint cannot be "
                              f"analysed; set evolution_epochs to two healthy epochs")
    classes = (list(range(min(cfg.importance_classes, num_classes))) if isinstance(cfg.importance_classes, int)
               else list(cfg.importance_classes))
    model_t, model_t2 = _load_model(base_spec, t, device), _load_model(base_spec, t2, device)
    # 7. important evolutions in the base run, t -> t'
    ckpt_inputs = [base_spec.checkpoints[t], base_spec.checkpoints[t2]]
    with _Timer(seconds, "importance"):
        params = {"t": t, "t_prime": t2, "classes": classes, "layers": cfg.layers, "seed": cfg.seed,
                  "images": cfg.importance_images, "gradient_at": cfg.importance_gradient_at,
                  "dataset": _dataset_id(train_set)}
        key = store.stage_key(params, ckpt_inputs, cache_dir=store.root)
        if store.is_done("importance", key):
            imp = store.load_table("importance")
        else:
            t0 = time.perf_counter()
            imp = (importance.evolution_importance if world is None else world.importance(base_run, t, t2))(
                model_t, model_t2, train_set, classes=classes,
                                                  layers=cfg.layers, batch_size=cfg.batch_size, device=device,
                                                  max_images_per_class=cfg.importance_images, seed=cfg.seed,
                                                  gradient_at=cfg.importance_gradient_at)
            imp.insert(0, "model", base_run)
            imp.insert(1, "t", t)
            imp.insert(2, "t_prime", t2)
            store.save_table("importance", imp)
            store.mark_done("importance", key, time.perf_counter() - t0, params=params,
                            seeds={"importance": cfg.seed}, outputs=["importance.parquet"])

    # 8. reversion check (Fig. 7)
    rc = cfg.reversion_classes
    rev_classes = (list(range(num_classes)) if rc is None else list(range(min(rc, num_classes)))
                   if isinstance(rc, int) else [int(c) for c in rc])
    with _Timer(seconds, "reversion"):
        params = {"t": t, "t_prime": t2, "classes": rev_classes, "layers": cfg.layers, "seed": cfg.seed,
                  "sample_size": cfg.reversion_sample_size, "repeats": cfg.reversion_repeats,
                  "gradient_at": cfg.importance_gradient_at,
                  "dataset": _dataset_id(train_set), "test": _dataset_id(test_set)}
        key = store.stage_key(params, ckpt_inputs, cache_dir=store.root)
        if store.is_done("reversion", key):
            rev_summary, rev_long = store.load_table("reversion"), store.load_table("reversion_long")
        else:
            t0 = time.perf_counter()
            rev = (reversion.reversion_check if world is None else world.reversion(base_run, t, t2))(
                model_t, model_t2, train_set, test_set, classes=rev_classes,
                                            layers=cfg.layers, sample_size=cfg.reversion_sample_size,
                                            repeats=cfg.reversion_repeats, batch_size=cfg.batch_size,
                                            device=device, seed=cfg.seed, gradient_at=cfg.importance_gradient_at)
            rev_summary, rev_long = rev.summary, rev.long
            store.save_table("reversion", rev_summary)
            store.save_table("reversion_long", rev_long)
            reversion.plot_reversion(rev_summary, store.path("figures/reversion.png"),
                                     title=f"{base_run}: reverting evolutions {t} -> {t2}")
            store.mark_done("reversion", key, time.perf_counter() - t0, params=params,
                            seeds={"reversion": cfg.seed},
                            outputs=["reversion.parquet", "reversion_long.parquet", "figures/reversion.png"])
        console.print(reversion.ordering_check(rev_summary).to_string(index=False))
        per_class = reversion.class_ordering(rev_long)
        sensitive = per_class[~per_class["no_effect"]]
        rev_note = (f"{len(per_class)} classes: {int(per_class['no_effect'].sum())} change by less than 1% "
                    f"whatever is reverted; of the other {len(sensitive)}, the most important bin drops accuracy "
                    f"most in {int(sensitive['top_bin_drops_most'].sum())}, the full order holds in "
                    f"{int(sensitive['monotone'].sum())}")
        console.print(f"per class (train top-1): {rev_note}")

    # 9. diagnostics
    emb = space.embeddings()
    layout = space.layout
    emb["x"], emb["y"] = layout[:, 0], layout[:, 1]
    logs = {n: s.log for n, s in runs.items() if s.log is not None}
    with _Timer(seconds, "diagnostics"):
        diag = diagnostics.diagnose(emb, logs, reference=base_run, diverged=diverged, seed=cfg.seed)
        store.save_table("diagnostics", diag.table)
        store.save_table("evolution_speed", diag.speed)
        store.save_json("verdicts", diag.verdicts)
        for run, v in diag.verdicts.items():
            for msg in v.get("messages", []):  # each message starts with the run's name
                console.print(msg)

    # what in training drove the base run's important evolutions (a run trained with a Tracer)
    trace_res = None
    base_dir = Path(cfg.runs[base_run]) if base_run in cfg.runs else None  # runs= given directly: no folder
    if cfg.trace and base_dir is not None and base_dir.is_dir() and (base_dir / "trace").is_dir():
        from . import tracing

        with _Timer(seconds, "tracing"):
            trace_res = tracing.trace_run(base_dir, store.path("trace"), t=t, t2=t2, importance=imp,
                                          data=test_set if test_set is not None else train_set,
                                          seed=cfg.seed, contributions=int(cfg.trace_contributions))
            store.update_manifest(tracing={"run": base_run, "t": t, "t_prime": t2, "out": "trace/"})

    # the live monitor's alerts of runs trained with one (conceptevo.train + conceptevo.monitor)
    monitored = _monitor_summaries(cfg)
    if monitored:
        store.save_json("monitor_alerts", monitored)
        for s in monitored:
            console.print(_monitor_line(s))

    directions_tables = None
    if cfg.directions:  # concept directions by SVD (Graziani et al.), see conceptevo.directions
        from . import directions as directions_mod

        with _Timer(seconds, "directions"):
            directions_tables = directions_mod.run_stage(
                store, runs, train_set, run_names=cfg.directions_runs or [base_run], layers=cfg.layers,
                batch_size=cfg.batch_size, device=device, seed=cfg.seed, grams=grams, evolution=(t, t2),
                space=space, input_keys=[r.get("key", "") for r in stim_keys],
                images_per_class=cfg.directions_images, gradient=cfg.directions_gradient, k=cfg.k,
                basis=cfg.directions_basis)

    report_path = None
    if report:
        with _Timer(seconds, "report"):
            extra = ([directions_mod.stage_report_section(directions_tables, train_set, runs, store=store,
                                                          device=device)] if directions_tables is not None else [])
            if monitored:
                from .monitor import alerts_report_section

                extra.append(alerts_report_section(monitored))
            report_path = _write_report(cfg, store, space, emb, stims, runs, train_set, imp, rev_summary, diag, align,
                                        (base_run, base_epoch), (t, t2), patches, report_mod, rev_note, extra_sections=extra,
                                        trace=trace_res)
    total = time.perf_counter() - t_all
    seconds["total"] = total
    store.update_manifest(pipeline_seconds={k: round(v, 2) for k, v in seconds.items()})
    return RunResult(cfg.out, report_path, seconds, diag.verdicts)


def _datasets(cfg: PipelineConfig, train_set=None, test_set=None):
    """The config's train (and test) datasets unless given (as run_pipeline loads them; for serving ranks)."""
    from . import data

    if train_set is None:
        if cfg.dataset == "builtin":
            train_set = data.builtin_dataset("train", seed=cfg.seed, root=cfg.out / "data")
            test_set = test_set or data.builtin_dataset("test", seed=cfg.seed, root=cfg.out / "data")
        else:
            train_set, _ = _image_folder(cfg.dataset, cfg.image_size, cfg.skip_bad)
            if cfg.test_dataset:
                test_set, _ = _image_folder(cfg.test_dataset, cfg.image_size, cfg.skip_bad)
    return train_set, test_set


def _write_report(cfg, store, space, emb, stims, runs, train_set, imp, rev_summary, diag, align, base, tt, patches,
                  report_mod, rev_note: str, extra_sections=(), trace: dict | None = None) -> Path:
    """Assemble ReportData: points + tags, patches, neighbours, accuracy, diagnostics, evolutions.

    ``base`` is the (run, epoch) the space was fitted on (the configured ``base``)."""
    base_run, base_epoch = base
    points = emb[["model", "epoch", "layer", "channel", "x", "y"]].copy()
    valid = np.asarray(space.valid)
    if getattr(train_set, "tags", None):  # colour by the dominant concept of each neuron's stimuli
        from .alignment import dominant_concepts

        ns = space.stimuli()
        for fam, codes in train_set.tags.items():
            dom, _purity = dominant_concepts(ns, np.asarray(codes))
            names = np.asarray(list(train_set.tag_names[fam]) + ["-"], dtype=object)
            points[fam] = names[np.where(dom >= 0, dom, len(names) - 1)]
    points = points[valid].reset_index(drop=True)

    # example patches for every plotted neuron and the evolution rows
    first_model = next(iter(runs.values())).factory()
    rf = patches.receptive_fields(first_model, list(next(iter(stims.values())).layers),
                                  tuple(train_set[0][0].shape[-2:]))
    layer_stims = {(m, e, layer): ls for (m, e), s in stims.items() for layer, ls in s.layers.items()}
    pats = patches.report_patches(train_set, layer_stims, rf, max_per_neuron=cfg.patches_per_neuron)

    # nearest neighbours in other models and epochs (precomputed; the report shows them on hover)
    rows = np.flatnonzero(valid)
    keys = emb[["model", "epoch", "layer", "channel"]].to_numpy()
    graph = space.neighbour_graph(k=cfg.neighbours, backend=cfg.backends.get("faiss", "auto"))  # the shared one
    nb_idx, nb_dist = graph.ids[rows, : cfg.neighbours], graph.distances[rows, : cfg.neighbours]
    neighbours = {}
    for r, idxs, ds in zip(rows, nb_idx, nb_dist):
        k0 = tuple(keys[r])
        neighbours[(str(k0[0]), int(k0[1]), str(k0[2]), int(k0[3]))] = [
            ((str(keys[i][0]), int(keys[i][1]), str(keys[i][2]), int(keys[i][3])), float(d))
            for i, d in zip(idxs, ds) if i >= 0
        ]
    accuracy = (pd.concat([s.log.assign(run=n) for n, s in runs.items() if s.log is not None], ignore_index=True)
                if any(s.log is not None for s in runs.values()) else None)
    top = (imp.sort_values(["class", "score"], ascending=[True, False]).groupby("class").head(12)
           .assign(model=base_run))
    class_names = getattr(train_set, "class_names", None)
    if class_names:
        top["class"] = [f"{c}: {class_names[c]}" for c in top["class"]]
    rev_plot = rev_summary.rename(columns={"mean_delta": "delta", "std_over_samples": "std"})
    rev_plot["metric"] = rev_plot["split"].astype(str) + " " + rev_plot["metric"].astype(str)
    # the report shows each run's name beside its messages
    verdict_text = {run: [m.removeprefix(f"{run}: ") for m in v.get("messages", [])]
                    for run, v in diag.verdicts.items()}
    fit = space.info.get("image_embedding") or {}
    held = space.info.get("holdout") or {}
    facts = {"base": f"{base_run} epoch {base_epoch}", "neurons": len(points),
             "checkpoints": len(stims), "k": cfg.k, "evolution": f"{base_run}: epoch {tt[0]} -> {tt[1]}",
             "image-embedding fit RMSE (in-sample: the base neurons fitted)":
                 None if fit.get("rmse") is None else f"{fit['rmse']:.3g} (relative {fit.get('rel_rmse', 0):.3g})",
             "image-embedding held-out RMSE": (
                 f"{held['rmse']:.3g} (relative {held['rel_rmse']:.3g}; {held['n_neurons']} base neurons "
                 "left out of the fit, then projected)") if held else "not measured",
             "reversion, per class (train top-1)": rev_note}
    skipped = store.manifest.get("skipped_files") or []
    if skipped:
        files = [r["path"] for r in skipped]
        facts["unreadable images left out (skip_bad)"] = (
            f"{len(files)}: " + ", ".join(Path(f).name for f in files[:5]) + (" ..." if len(files) > 5 else "")
            + " (full list: manifest.json, skipped_files)")
    facts["neighbours"] = graph.describe()
    if space.layout_params.get("description"):
        facts["2-D map"] = space.layout_params["description"]
    if align is not None:
        facts["alignment lift (mean)"] = round(float(align.table["lift"].mean()), 2)
    rd = report_mod.ReportData(points=points, patches=pats, neighbours=neighbours, accuracy=accuracy,
                               diagnostics=diag.table, verdicts=verdict_text, evolutions=top, reversion=rev_plot,
                               title="ConceptEvo report", facts=facts,
                               layer_order=list(next(iter(stims.values())).layers), extra_sections=extra_sections,
                               tracing=(trace or {}).get("classes"),
                               tracing_contributions=(trace or {}).get("contributions"))
    # one file or a folder, and the threshold (shown in the report too)
    from .report_folder import report_format

    store.update_manifest(report_format=report_format(len(points)))
    return report_mod.build_report(store.path("report.html"), rd, png_dir=store.path("figures"))


def _monitor_summaries(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """:func:`conceptevo.monitor.alert_summary` of every run folder that holds a monitor."""
    from .monitor import alert_summary

    out = []
    for spec in cfg.runs.values():
        p = Path(spec)
        if p.is_dir():
            s = alert_summary(p)
            if s is not None:
                out.append(s)
    return out


def _monitor_line(s: dict[str, Any]) -> str:
    """One console line: a run's live-monitor alerts and when its accuracy reached chance."""
    chance = "" if s.get("chance_band") is None else (
        f"; training top-1 at chance (<= {s['chance_band']:.3f}) "
        + ("never" if s["chance_epoch"] is None else f"from epoch {s['chance_epoch']}"))
    if not s["alerts"]:
        return f"live monitor, {s['run']}: no alert in {s['observations']} observations{chance}"
    parts = []
    for kind, first in s["first"].items():  # one entry per kind: the first epoch, and how often it fired
        a = next(x for x in s["alerts"] if x["kind"] == kind)
        n = sum(x["kind"] == kind for x in s["alerts"])
        acc = "" if a.get("train_top1") is None else f", train top-1 {a['train_top1']:.3f}"
        parts.append(f"{kind} first at epoch {first}{acc} ({n} observation{'s' if n > 1 else ''})")
    return f"live monitor, {s['run']}: {'; '.join(parts)}{chance}"


def _dataset_id(ds) -> str | None:
    """Identity of a dataset for stage keys (see :func:`conceptevo.stimuli.dataset_fingerprint`)."""
    if ds is None:
        return None
    from .stimuli import dataset_fingerprint

    return dataset_fingerprint(ds)


SKIP_BAD_ADVICE = "(set skip_bad = true in the config to leave them out)"


def _image_folder(path: str, size: int, skip_bad: bool):
    """An image folder and the files left out as unreadable (only with ``skip_bad``)."""
    from . import data
    from .errors import DataError

    try:
        return data.image_folder(path, size=size), []
    except DataError as exc:
        bad = getattr(exc, "paths", None)
        if not bad:
            raise
        if not skip_bad:
            msg = str(exc).replace("(pass skip_bad=True to leave them out)", SKIP_BAD_ADVICE)
            err = DataError(msg if SKIP_BAD_ADVICE in msg else f"{msg}\n{SKIP_BAD_ADVICE}")
            err.paths = bad  # type: ignore[attr-defined]
            raise err from None
    import warnings

    with warnings.catch_warnings():  # the files are listed in the manifest and the report instead
        warnings.simplefilter("ignore")
        return data.image_folder(path, size=size, skip_bad=True), [str(p) for p in bad]


def space_params(cfg: PipelineConfig, base: tuple[str, int], stims: Mapping[tuple[str, int], Any],
                 chosen: Mapping[str, str]) -> dict[str, Any]:
    """Everything that changes the unified space, for its stage key (with the stimuli's keys).

    The fit's own defaults that the config does not set (learning rate, negatives, ridge,
    the held-out fraction) are read from :meth:`UnifiedSpace.fit`, so changing them in the
    code also invalidates cached spaces.
    """
    import inspect

    from .space import UnifiedSpace

    defaults = {name: p.default for name, p in inspect.signature(UnifiedSpace.fit).parameters.items()
                if name in ("lr", "negatives", "ridge", "holdout")}
    return {"base": [base[0], int(base[1])], "dim": cfg.dim, "repeats": cfg.repeats, "seed": cfg.seed,
            "epochs": cfg.sgns_epochs, "threads": cfg.sgns_threads, **defaults,
            "checkpoints": sorted(map(list, stims)), "k": cfg.k, "solve": chosen["solve"], "umap": chosen["umap"]}


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------- demo
def run_demo(out: str | Path = "conceptevo-runs/demo", *, quick: bool = False, seed: int = 0,
             threads: int | None = None, report: bool = True, monitor: bool = True,
             trace: bool = False) -> RunResult:
    """The whole method on the built-in data: data, three training runs, every stage, the report.

    ``quick`` shrinks the data and training (for smoke tests); the full demo is sized
    to finish in about ten minutes on a 2-core CPU. ``seed`` changes the data, the
    initialisation and the order (``benchmarks/bench_fidelity.py`` runs several). At the end
    the demo prints which of its claims (:mod:`conceptevo.fidelity`) held in this run.
    ``monitor`` watches each training run with the live :class:`conceptevo.monitor.Monitor`
    (every epoch; its probe is each run's evaluation images, 1,000 training + 1,600 test, and it
    rides the trainer's evaluation pass), so the demo also shows when each alert would have fired.
    ``trace`` records per-class update accumulators while training (:mod:`conceptevo.tracing`;
    about twice the training time) and adds which training classes drove well_trained's
    important evolutions to the report.
    """
    from . import data, fidelity, train

    t0 = time.perf_counter()
    out = Path(out)
    n_train, n_test = (1600, 320) if quick else (None, None)
    console.rule("[bold]training the three built-in runs")
    # training on 1 thread: small batches on 2 busy cores run faster without OpenMP contention;
    # the three runs are independent, so they train side by side in one process per core
    runs_dirs = train.train_regimes(out / "training", seed=seed, data_root=out / "data",
                                    train_images=n_train, test_images=n_test,
                                    epoch_scale=0.34 if quick else 1.0, threads=threads or 1,
                                    workers=min(3, os.cpu_count() or 1), monitor=monitor, trace=trace)
    train_set = data.builtin_dataset("train", seed=seed, root=out / "data", num_images=n_train)
    test_set = data.builtin_dataset("test", seed=seed, root=out / "data", num_images=n_test)
    # Fig. 7 over a seeded random half of the 32 classes (the paper: 100 random of ImageNet's 1,000)
    rev_classes = sorted(int(c) for c in np.random.default_rng([seed, 7]).choice(
        train_set.num_classes, 2 if quick else train_set.num_classes // 2, replace=False))
    cfg = PipelineConfig(out=out, runs={k: str(v) for k, v in runs_dirs.items()}, base="well_trained", seed=seed,
                         importance_classes=2 if quick else 3, reversion_repeats=2 if quick else 5,
                         reversion_classes=rev_classes,
                         reversion_sample_size=16 if quick else 64, threads=threads,
                         importance_images=32 if quick else 128)
    result = run_pipeline(cfg, train_set=train_set, test_set=test_set, report=report)
    total = time.perf_counter() - t0
    result.seconds["demo total"] = total
    claims = fidelity.evaluate_claims(out)
    store = RunStore(out)
    store.save_json("claims", claims.to_dict(orient="records"))
    store.update_manifest(demo_seconds=round(total, 1))
    console.rule("[bold]the demo's claims in this run (README: how often each holds over seeds)")
    for r in claims.itertuples():
        mark = {True: "[green]holds[/]", False: "[red]does not hold[/]"}.get(r.holds, "[yellow]n/a[/]")
        console.print(f"({r.claim}) {mark}: {r.text} -- {r.value}")
    console.rule("[bold green]done")
    if result.report is not None:
        console.print(f"report: {result.report}  ({result.report.stat().st_size / 2**20:.1f} MiB)")
    console.print(f"total time: {total:.0f} s")
    return result

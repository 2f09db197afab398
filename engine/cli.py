"""The ``conceptevo`` command line (typer). Heavy imports happen inside the commands so
``conceptevo --help`` answers at once."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="conceptevo",
    help="Concept evolution of neurons during training (ConceptEvo, Park et al., CIKM 2023).\n\n"
    "Start with `conceptevo demo`: the whole method on the built-in data, ending in an HTML report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory (created if missing).")]
Seed = Annotated[int, typer.Option(help="Seed of every random step.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for torch and the native trainer.")]


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


@app.command()
def info() -> None:
    """Versions, threads, and which backend `auto` picks on this machine for every stage."""
    import numpy as np
    import torch

    from . import _C, __version__, backends

    console.print(f"conceptevo {__version__}  torch {torch.__version__}  numpy {np.__version__}")
    console.print(f"torch threads {torch.get_num_threads()}  native trainer OpenMP threads {_C.max_threads()}"
                  f"  CUDA {'yes' if backends.cuda_available() else 'no'}")
    for kind, choice in backends.report().items():
        console.print(f"  {kind:6s} -> {choice}")


@app.command()
def demo(
    out: Out = Path("conceptevo-runs/demo"),
    quick: Annotated[bool, typer.Option(help="Smaller data and shorter training: a smoke test.")] = False,
    seed: Seed = 0,
    threads: Threads = None,
    monitor: Annotated[bool, typer.Option(
        help="Watch each training run with the live monitor (conceptevo.monitor): when each alert fires.")] = True,
    trace: Annotated[bool, typer.Option(
        help="Record per-class updates while training (conceptevo.tracing; about twice the training time) "
             "and report which training classes drove the important evolutions.")] = False,
) -> None:
    """The whole method on the built-in data: dataset, three training runs (well-trained, too-high
    learning rate, overfitted) watched by the live monitor, stimuli, unified space, 2-D map,
    important evolutions, reversion check, diagnostics and the HTML report. Re-running reuses what
    is already computed."""
    from .errors import ConceptEvoError
    from .pipeline import run_demo

    try:
        run_demo(out, quick=quick, seed=seed, threads=threads, monitor=monitor, trace=trace)
    except ConceptEvoError as exc:
        _fail(exc)


SKIP_BAD_CLI_ADVICE = "(pass --skip-bad to leave them out)"


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="TOML config: dataset, model, runs (checkpoint globs), base, ...")],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave unreadable image files out (as skip_bad = "
                                           "true in the config); they are listed in the manifest and report.")] = False,
) -> None:
    """The whole pipeline on your data and checkpoints, from a small TOML config (see README)."""
    from .errors import ConceptEvoError
    from .pipeline import SKIP_BAD_ADVICE, load_config, run_pipeline

    try:
        cfg = load_config(config)
        cfg.skip_bad = cfg.skip_bad or skip_bad
        result = run_pipeline(cfg)
    except ConceptEvoError as exc:
        if SKIP_BAD_ADVICE in str(exc):  # the command line's own wording of the advice
            exc = type(exc)(str(exc).replace(SKIP_BAD_ADVICE, SKIP_BAD_CLI_ADVICE))
        _fail(exc)
    if result.report is None:  # a serving rank under torchrun: rank 0 reports
        return
    console.print(f"report: {result.report}")
    if result.report.name == "index.html":  # a folder report
        console.print(f"open it with: conceptevo serve {result.report.parent}")


@app.command()
def data(
    out: Out = Path("conceptevo-runs/data"),
    seed: Seed = 0,
    preview: Annotated[bool, typer.Option(help="Also write a PNG grid of sample images per class.")] = True,
) -> None:
    """Generate the built-in concept dataset (train + test, with concept tags) into OUT."""
    import time

    import numpy as np
    import pandas as pd

    from . import data as data_mod
    from .store import RunStore

    t0 = time.perf_counter()
    train = data_mod.builtin_dataset("train", seed=seed, root=out)
    test = data_mod.builtin_dataset("test", seed=seed, root=out)
    store = RunStore(out)
    for split, ds in (("train", train), ("test", test)):
        tags = {f: np.asarray(c) for f, c in ds.tags.items()}
        table = pd.DataFrame({"image": np.arange(len(ds)), "label": ds.labels.numpy(), **tags})
        store.save_table(f"{split}_tags", table)
    store.save_json("concepts", {"classes": train.class_names, "tag_names": train.tag_names})
    if preview:
        from PIL import Image

        per = 8
        rows = []
        for c in range(len(train.class_names)):
            ids = np.flatnonzero(train.labels.numpy() == c)[:per]
            rows.append(np.concatenate([train.raw(int(i)) for i in ids], axis=1))
        grid = np.concatenate(rows, axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out / "preview.png")
    console.print(f"{len(train)} train + {len(test)} test images, {len(train.class_names)} classes, "
                  f"tags {list(train.tags)} in {time.perf_counter() - t0:.1f} s -> {out}")


@app.command()
def train(
    out: Out = Path("conceptevo-runs/demo/training"),
    seed: Seed = 0,
    threads: Threads = None,
) -> None:
    """Train the paper's three regimes on the built-in data: well_trained, high_lr, overfit."""
    from . import train as train_mod

    runs = train_mod.train_regimes(out, seed=seed, threads=threads)
    for name, path in runs.items():
        final = train_mod.load_train_log(path).final
        console.print(f"{name:13s} train top-1 {final['train_top1']:.3f}  test top-1 {final['test_top1']:.3f}  -> {path}")


@app.command()
def stimuli(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoint files of ONE architecture (plain state dicts).")],
    out: Out = Path("conceptevo-runs/stimuli"),
    model: Annotated[str, typer.Option(help="vgg_small, torchvision:<name>, or package.module:factory")] = "vgg_small",
    dataset: Annotated[str, typer.Option(help="'builtin' or an image folder (one subfolder per class)")] = "builtin",
    image_size: Annotated[int, typer.Option(help="Images are resized to this size.")] = 32,
    num_classes: Annotated[Optional[int], typer.Option(help="Default: the dataset's class count.")] = None,
    layers: Annotated[Optional[list[str]], typer.Option("--layer", help="Layer name (repeatable); default every Conv2d.")] = None,
    k: Annotated[int, typer.Option(help="Stimuli per neuron.")] = 10,
    k_i: Annotated[int, typer.Option(help="Responsive neurons per image and layer.")] = 5,
    batch_size: int = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    backend: Annotated[str, typer.Option(help="Top-k kernel: auto, cpu, triton, reference.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision inference (see docs: ranking may change).")] = False,
    distributed: Annotated[bool, typer.Option(help="Run under torchrun: shard the data over ranks.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave unreadable image files out.")] = False,
) -> None:
    """One streaming stimulus pass over a dataset for many checkpoints; resumes after a crash."""
    from . import data as data_mod
    from .adapter import checkpoint_epoch
    from .backends import resolve_device
    from .errors import ConceptEvoError, DataError
    from .models import model_factory

    try:
        try:
            ds = (data_mod.builtin_dataset("train", root=out / "data") if dataset == "builtin"
                  else data_mod.image_folder(dataset, size=image_size, skip_bad=skip_bad))
        except DataError as exc:
            raise DataError(str(exc).replace("(pass skip_bad=True to leave them out)", SKIP_BAD_CLI_ADVICE)) from None
        factory = model_factory(model, num_classes or len(ds.class_names))
        names = [f"epoch_{checkpoint_epoch(p):03d}" for p in checkpoints]
        from .distributed import distributed_extract
        from .stimuli import StimulusOptions, extract_stimuli

        options = StimulusOptions(layers=layers or None, k=k, k_i=k_i, batch_size=batch_size, backend=backend,
                                  amp=amp, device=device if distributed else resolve_device(device))
        (distributed_extract if distributed else extract_stimuli)(
            factory, list(checkpoints), ds, store=out, names=names, options=options)
    except ConceptEvoError as exc:
        _fail(exc)
    console.print(f"stimuli written to {out}")


def _dataset(dataset: str, image_size: int, out: Path, split: str = "train"):
    from . import data as data_mod

    if dataset == "builtin":
        return data_mod.builtin_dataset(split, root=out / "data")
    return data_mod.image_folder(dataset, size=image_size)


def _two_models(ckpt_t: Path, ckpt_t2: Path, model: str, ds):
    """The models at t and t', loaded with the adapter's strict, weights-only checks."""
    from .adapter import ModelAdapter
    from .models import model_factory

    factory = model_factory(model, len(ds.class_names))
    models = []
    for path in (ckpt_t, ckpt_t2):
        m = factory()
        ModelAdapter(m, input_shape=tuple(ds[0][0].shape)).load_checkpoint(path)
        models.append(m.eval())
    return models


EvoT = Annotated[Path, typer.Argument(help="Checkpoint at the earlier epoch t.")]
EvoT2 = Annotated[Path, typer.Argument(help="Checkpoint at the later epoch t'.")]
ModelOpt = Annotated[str, typer.Option(help="vgg_small, torchvision:<name>, or package.module:factory")]
DataOpt = Annotated[str, typer.Option(help="'builtin' or an image folder (one subfolder per class)")]
ClassOpt = Annotated[Optional[list[int]], typer.Option("--class", help="Class index (repeatable); default 0, 1, 2.")]
LayerOpt = Annotated[Optional[list[str]], typer.Option("--layer", help="Layer name (repeatable); default every Conv2d.")]


@app.command()
def importance(
    ckpt_t: EvoT, ckpt_t2: EvoT2, out: Out = Path("conceptevo-runs/importance"), model: ModelOpt = "vgg_small",
    dataset: DataOpt = "builtin", image_size: int = 32, classes: ClassOpt = None, layers: LayerOpt = None,
    images: Annotated[int, typer.Option(help="Images per class.")] = 128, batch_size: int = 64, seed: Seed = 0,
) -> None:
    """Important concept evolutions t -> t' (Eq. 2-4): per class, layer and neuron, the share of the
    class's images whose logit rises along the neuron's activation change. Writes importance.parquet."""
    from . import importance as imp_mod
    from .errors import ConceptEvoError
    from .store import RunStore

    try:
        ds = _dataset(dataset, image_size, out)
        m_t, m_t2 = _two_models(ckpt_t, ckpt_t2, model, ds)
        table = imp_mod.evolution_importance(m_t, m_t2, ds, classes=classes or [0, 1, 2], layers=layers or None,
                                             batch_size=batch_size, max_images_per_class=images, seed=seed,
                                             progress=True)
    except ConceptEvoError as exc:
        _fail(exc)
    RunStore(out).save_table("importance", table)
    top = table.sort_values(["class", "score"], ascending=[True, False]).groupby("class").head(5)
    console.print(top.to_string(index=False))
    console.print(f"-> {out / 'importance.parquet'}")


@app.command()
def reversion(
    ckpt_t: EvoT, ckpt_t2: EvoT2, out: Out = Path("conceptevo-runs/reversion"), model: ModelOpt = "vgg_small",
    dataset: DataOpt = "builtin", test_dataset: Annotated[Optional[str], typer.Option(help="Held-out images.")] = None,
    image_size: int = 32, classes: ClassOpt = None, layers: LayerOpt = None,
    sample_size: Annotated[int, typer.Option(help="Images per class and sample.")] = 32,
    repeats: Annotated[int, typer.Option(help="Independent image samples.")] = 5, batch_size: int = 64,
    seed: Seed = 0,
) -> None:
    """Reversion check (Fig. 7): revert each importance quartile's activations in the t' model to their
    epoch-t values and measure the accuracy change, against reverting a random 25%."""
    from . import reversion as rev_mod
    from .errors import ConceptEvoError
    from .store import RunStore

    try:
        ds = _dataset(dataset, image_size, out)
        test = (_dataset("builtin", image_size, out, "test") if dataset == "builtin" and test_dataset is None
                else (_dataset(test_dataset, image_size, out) if test_dataset else None))
        m_t, m_t2 = _two_models(ckpt_t, ckpt_t2, model, ds)
        res = rev_mod.reversion_check(m_t, m_t2, ds, test, classes=classes or [0, 1, 2], layers=layers or None,
                                      sample_size=sample_size, repeats=repeats, batch_size=batch_size, seed=seed,
                                      progress=True)
    except ConceptEvoError as exc:
        _fail(exc)
    store = RunStore(out)
    store.save_table("reversion", res.summary)
    store.save_table("reversion_long", res.long)
    rev_mod.plot_reversion(res.summary, store.path("figures/reversion.png"))
    console.print(res.summary.to_string(index=False))
    console.print(rev_mod.ordering_check(res.summary).to_string(index=False))


@app.command()
def diagnostics(
    run: Annotated[Path, typer.Option("--run", help="A pipeline run directory (has neurons.parquet).")],
    reference: Annotated[Optional[str], typer.Option(help="Healthy run to compare with; default the base.")] = None,
) -> None:
    """Concept diversity and evolution speed per run and epoch, with plain-language verdicts
    (diversity collapse: too-high learning rate; slow concepts while accuracy climbs: overfitting)."""
    import pandas as pd

    from . import diagnostics as diag_mod
    from .errors import ConceptEvoError
    from .pipeline import PipelineConfig, resolve_runs
    from .store import RunStore

    store = RunStore(run, create=False)
    if not store.exists("neurons.parquet"):
        _fail(ConceptEvoError(f"{run} has no neurons.parquet: run `conceptevo run` or `conceptevo demo` first"))
    cfg = PipelineConfig(**{k: v for k, v in store.manifest.get("config", {}).items()})
    emb = pd.read_parquet(store.path("neurons.parquet"))
    runs = resolve_runs(cfg, cfg.num_classes or 10)
    logs = {n: s.log for n, s in runs.items() if s.log is not None}
    ref = reference or (cfg.base or next(iter(runs))).split("/")[0]
    diag = diag_mod.diagnose(emb, logs, reference=ref)
    store.save_table("diagnostics", diag.table)
    store.save_json("verdicts", diag.verdicts)
    for name, v in diag.verdicts.items():
        for msg in (v or {}).get("messages", []):
            console.print(f"[bold]{name}[/]: {msg}")


@app.command()
def report(
    run: Annotated[Path, typer.Option("--run", help="A pipeline run directory.")],
) -> None:
    """Rebuild report.html (and figures/) of a run from its stored config; finished stages are reused."""
    from .errors import ConceptEvoError
    from .pipeline import PipelineConfig, run_pipeline
    from .store import RunStore

    store = RunStore(run, create=False)
    conf = store.manifest.get("config")
    if not conf:
        _fail(ConceptEvoError(f"{run} has no pipeline config in its manifest"))
    try:
        result = run_pipeline(PipelineConfig(**conf))
    except ConceptEvoError as exc:
        _fail(exc)
    console.print(f"report: {result.report}")


@app.command()
def trace(
    run: Annotated[Path, typer.Option("--run", help="A training run directory (run.json, checkpoints/, trace/).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where the tables go (default: the run).")] = None,
    t: Annotated[Optional[int], typer.Option("--t", help="Earlier epoch (default: the first saved).")] = None,
    t2: Annotated[Optional[int], typer.Option("--t2", help="Later epoch (default: the last saved).")] = None,
    layers: LayerOpt = None, classes: ClassOpt = None,
    importance_table: Annotated[Optional[Path], typer.Option(
        "--importance", help="importance.parquet to join with (default: computed, Eq. 2-4).")] = None,
    top: Annotated[int, typer.Option(help="Important evolutions per class.")] = 5,
    images: Annotated[int, typer.Option(help="Images per class.")] = 32, seed: Seed = 0,
    granularity: Annotated[str, typer.Option(
        "--granularity", help="Sources: auto, class, checkpoint, step (Tracer(steps=True)) or example "
        "(Tracer(example_layers=...)).")] = "auto",
    input_index: Annotated[Optional[int], typer.Option(
        "--input", help="Also explain this test image (trace_explain.parquet; with --granularity example "
        "the grid of its top training examples, trace_examples_<layer>.png).")] = None,
    contributions: Annotated[int, typer.Option(
        "--contributions", help="Per-class contribution distributions on this many test images "
        "(trace_contributions.parquet; 0: none).")] = 0,
) -> None:
    """Trace what in training drove the evolutions t -> t' (Pfahler & Morik): the layer's change split
    into recorded sources at the chosen granularity (checkpoint sources when nothing was recorded).
    Writes trace_sources.parquet and trace_classes.parquet."""
    import pandas as pd

    from . import tracing
    from .errors import ConceptEvoError

    try:
        imp = pd.read_parquet(importance_table) if importance_table else None
        res = tracing.trace_run(run, out, t=t, t2=t2, layers=layers or None, importance=imp,
                                classes=classes or ([0, 1, 2] if imp is None else None), top=top,
                                images_per_class=images, seed=seed, granularity=granularity,
                                input_index=input_index, contributions=contributions)
    except (ConceptEvoError, OSError) as exc:
        _fail(exc)
    cls = res["classes"]
    if len(cls):
        best = cls.sort_values("share", ascending=False).groupby(["class", "layer", "channel"], sort=False).head(1)
        console.print(best[["class", "layer", "channel", "score", "source", "share", "exact"]]
                      .sort_values(["class", "score"], ascending=[True, False]).to_string(index=False))
    target = out or run
    console.print(f"-> {target / 'trace_sources.parquet'}  {target / 'trace_classes.parquet'}")


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="A folder report (a run's report/ folder) or a run directory.")],
    port: Annotated[int, typer.Option("--port", "-p", help="Port on 127.0.0.1 (0: any free port).")] = 8000,
) -> None:
    """Serve a folder report read-only on 127.0.0.1 (a local HTTP server with range requests); Ctrl-C stops it."""
    from .errors import ConceptEvoError
    from .report_folder import serve as serve_folder

    if not (folder / "index.html").is_file() and (folder / "report" / "index.html").is_file():
        folder = folder / "report"  # a run directory: its folder report
    try:
        serve_folder(folder, port=port, echo=console.print)
    except ConceptEvoError as exc:
        _fail(exc)


@app.command()
def directions(
    run: Annotated[Path, typer.Option("--run", help="A pipeline run directory.")],
    runs: Annotated[Optional[list[str]], typer.Option("--analyse", help="Run to analyse (repeatable); default the base.")] = None,
    images: Annotated[int, typer.Option(help="Images per class for the relevance (gradient) pass.")] = 32,
    gradient: Annotated[str, typer.Option(help="Relevance gradient: logit (default) or loss (the authors' code).")] = "logit",
    basis: Annotated[str, typer.Option(help="Directions: svd (the method, default) or ica (FastICA filters; "
                                            "finds concepts few images carry).")] = "svd",
    report: Annotated[bool, typer.Option(help="Rebuild report.html with the directions section.")] = True,
) -> None:
    """Concept directions by SVD across training (Graziani et al.): directions.parquet,
    direction_classes.parquet, direction_outliers.parquet, direction_importance.parquet. Uses the
    run's stored config; finished stages are reused."""
    import dataclasses

    from .errors import ConceptEvoError
    from .pipeline import PipelineConfig, run_pipeline
    from .store import RunStore

    store = RunStore(run, create=False)
    conf = store.manifest.get("config")
    if not conf:
        _fail(ConceptEvoError(f"{run} has no pipeline config in its manifest"))
    try:
        cfg = dataclasses.replace(PipelineConfig(**conf), directions=True, directions_runs=runs or None,
                                  directions_images=images, directions_gradient=gradient,
                                  directions_basis=basis)
        result = run_pipeline(cfg, report=report)
    except ConceptEvoError as exc:
        _fail(exc)
    console.print(f"directions: {Path(run) / 'directions.parquet'}, {Path(run) / 'direction_classes.parquet'}"
                  + (f"; report: {result.report}" if result.report else ""))


def main() -> None:
    """Entry point of the ``conceptevo`` script."""
    app()


if __name__ == "__main__":
    sys.exit(main())

"""Training runs that write what ConceptEvo reads: checkpoints, a run card and an accuracy log.

A run directory::

    <run>/run.json                  {"model", "num_classes", "hyper", "seed", "status", ...}
    <run>/checkpoints/epoch_000.pt  plain state dict (epoch 0 = the initialisation)
    <run>/log.parquet               one row per epoch 0..E: epoch, train_top1, train_top5,
                                    test_top1, test_top5, train_loss, lr, test_loss, seconds
    <run>/resume.pt                 model + optimizer + RNG state after the last finished
                                    epoch (weights-only loadable); removed when the run is done

Log columns: accuracies are measured in eval mode after the epoch (no dropout), the
training ones on a fixed, seeded sample of at most ``eval_train_max`` training images
with their training labels (which include the built-in data's label noise).
``train_loss`` is the mean minibatch loss of the epoch (epoch 0: the eval-mode loss of
the initial model on the training sample); ``lr`` is the learning rate of the epoch's
last step (epoch 0: the first step's); ``seconds`` is the wall time since the run began.

Every file is written atomically (``conceptevo.store.atomic_write``: temp file in the
same folder + ``os.replace``), so a crash never leaves half a checkpoint. A run that is
interrupted resumes from ``resume.pt`` and yields the same weights as an uninterrupted
one (same threads); a finished run is not retrained.

:func:`train_regimes` trains the paper's three regimes (Sec. 4.5, Fig. 2) on the
built-in concept data; see :data:`REGIMES`.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import __version__
from .data import ImageSet, as_image_set, builtin_dataset
from .errors import CheckpointError, ConceptEvoError
from .models import build_model
from .store import atomic_write

__all__ = [
    "TrainLog",
    "train_run",
    "train_regimes",
    "load_train_log",
    "run_checkpoints",
    "run_model_factory",
    "REGIMES",
    "LOG_COLUMNS",
]

LOG_COLUMNS = ["epoch", "train_top1", "train_top5", "test_top1", "test_top5", "train_loss", "lr",
               "test_loss", "seconds"]
_SCHEDULES = ("constant", "cosine", "step")


@dataclass
class TrainLog:
    """The outcome of a run: its directory, accuracy table and checkpoint files."""

    run_dir: Path
    table: pd.DataFrame
    checkpoints: dict[int, Path]
    seconds: float = 0.0
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's row as a dict."""
        return {k: float(v) for k, v in self.table.iloc[-1].items()}


# ------------------------------------------------------------------------ small helpers
def _save_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _save_log(path: Path, rows: list[dict[str, float]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=LOG_COLUMNS)
    df["epoch"] = df["epoch"].astype("int64")
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    return df


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous: the model may train channels-last; checkpoints stay in the default layout
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _lr_at(step: int, total: int, steps_per_epoch: int, lr: float, schedule: str,
           warmup_epochs: float) -> float:
    """Learning rate of optimisation step ``step`` (0-based) of ``total``."""
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:  # linear ramp from lr/10 to lr: lets an aggressive lr take off, then bite
        return lr * (0.1 + 0.9 * step / warm)
    if schedule == "constant":
        return lr
    frac = (step - warm) / max(1, total - warm)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr * (0.1 ** int(frac >= 0.5)) * (0.1 ** int(frac >= 0.75))  # "step"


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ConceptEvoError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _evaluate(model: nn.Module, ds: ImageSet, ids: torch.Tensor, batch_size: int, channels_last: bool
              ) -> tuple[float, float, float]:
    """(top1, top5, mean loss) of ``model`` in eval mode on images ``ids`` of ``ds``."""
    model.eval()
    n = int(ids.numel())
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    k = min(5, ds.num_classes)
    top1 = top5 = 0
    loss = 0.0
    for lo in range(0, n, batch_size):
        x, y = ds.batch(ids[lo:lo + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        topk = logits.topk(k, dim=1).indices
        top1 += int((topk[:, 0] == y).sum())
        top5 += int((topk == y[:, None]).any(dim=1).sum())
    return top1 / n, top5 / n, loss / n


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _dataset_card(ds: ImageSet) -> dict[str, Any]:
    """Cheap identity of a dataset, recorded in run.json and checked on resume."""
    labels = ds.labels.numpy()
    card: dict[str, Any] = {"size": len(ds), "num_classes": ds.num_classes, "source": ds.source,
                            "label_sum": int(labels.sum())}
    if ds.images is not None and len(ds):
        card["pixel_sum"] = int(ds.images[:: max(1, len(ds) // 64)].to(torch.int64).sum())
    return card


# ---------------------------------------------------------------------------- trainer
def train_run(
    run_dir: str | Path,
    model_name: str,
    train_set: Any,
    test_set: Any,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    dropout: float | None = None,
    save_epochs: Sequence[int] | None = None,
    seed: int = 0,
    *,
    batch_size: int = 64,
    momentum: float = 0.9,
    lr_schedule: str = "constant",
    warmup_epochs: float = 0.0,
    train_subset: int | None = None,
    augment: bool = False,
    grad_clip: float | None = None,
    eval_train_max: int | None = 1000,
    num_classes: int | None = None,
    model_kw: dict[str, Any] | None = None,
    model: nn.Module | None = None,
    threads: int | None = None,
    channels_last: bool = True,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    desc: str | None = None,
    tracer: Any | None = None,
    monitor: Any = None,
) -> TrainLog:
    """Train ``model_name`` with SGD + momentum and write a run directory (module docstring).

    Parameters
    ----------
    run_dir : the run's folder (created).
    model_name : a :func:`conceptevo.models.build_model` name; with ``model`` given, only a
        label for run.json (``model`` is then trained in place and must be freshly initialised).
    train_set, test_set : ImageSets or any Dataset :func:`as_image_set` accepts.
    epochs, lr, weight_decay, momentum, batch_size : the optimisation.
    dropout : passed to the model builder (``None``: the model's default).
    save_epochs : epochs whose weights are saved, 0 = initialisation (default: all 0..epochs).
    seed : seeds the initialisation, the shuffling, the dropout masks and the eval sample.
    lr_schedule : ``"constant"``, ``"cosine"`` (to 0 at the end) or ``"step"`` (x0.1 at 50% and 75%),
        after a linear ``warmup_epochs`` ramp from lr/10.
    train_subset : train on the first ``n`` images of a seeded shuffle of ``train_set`` only.
    augment : random horizontal flips.
    grad_clip : clip the gradient's global norm (``None``: no clipping).
    eval_train_max : size of the training sample the train accuracies are measured on (None: all).
    threads : ``torch.set_num_threads`` for the run (restored afterwards).
    resume : continue an interrupted run with the same settings and return a finished one as
        is; ``False`` trains afresh.
    overwrite : start afresh even when the folder holds a run with other settings (without it
        that is an error, so a run is never silently replaced).
    tracer : a :class:`conceptevo.tracing.Tracer` (or anything with ``attach``, ``after_step``,
        ``end_epoch``, ``finish``): it is attached to the model and optimiser, called after
        every optimiser step with the batch's labels and ids, closes a window at every saved
        epoch and writes ``<run>/trace/``. It observes only: the weights are the same with it.
    monitor : a :class:`conceptevo.monitor.Monitor` built on ``model`` (pass both), or a callable
        ``monitor(net, resume=bool) -> Monitor`` that builds one on the model this function
        builds (``resume`` is True when the training continues an interrupted run). It is
        called at every logged epoch end with the train / test top-1 (it does not change the
        training: the weights are bitwise the same with it). A factory that also takes
        ``probe`` is handed the run's evaluation images (the ``eval_train_max`` training sample,
        then the test set, as one ImageSet); a monitor built on exactly that set rides the
        evaluation forward (:meth:`~conceptevo.monitor.Monitor.riding`): the logged accuracies
        are unchanged (same batches) and the monitor runs no forward of its own.
    """
    run_dir = Path(run_dir)
    train_set = as_image_set(train_set)
    test_set = as_image_set(test_set)
    epochs = int(epochs)
    if epochs < 0:
        raise ConceptEvoError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0 or not math.isfinite(lr):
        raise ConceptEvoError(f"lr must be a positive number, got {lr}")
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ConceptEvoError(f"need weight_decay >= 0 and 0 <= momentum < 1, got {weight_decay}, {momentum}")
    if int(batch_size) < 1:
        raise ConceptEvoError(f"batch_size must be >= 1, got {batch_size}")
    if lr_schedule not in _SCHEDULES:
        raise ConceptEvoError(f"lr_schedule must be one of {_SCHEDULES}, got {lr_schedule!r}")
    if warmup_epochs < 0 or warmup_epochs > epochs:
        raise ConceptEvoError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if grad_clip is not None and not grad_clip > 0:
        raise ConceptEvoError(f"grad_clip must be positive or None, got {grad_clip}")
    saves = sorted(set(range(epochs + 1) if save_epochs is None else (int(e) for e in save_epochs)))
    bad = [e for e in saves if not 0 <= e <= epochs]
    if bad:
        raise ConceptEvoError(f"save_epochs {bad} outside [0, epochs={epochs}]")
    if num_classes is None:
        num_classes = train_set.num_classes
    if test_set.num_classes > num_classes:
        raise ConceptEvoError(f"test set has {test_set.num_classes} classes but the model {num_classes}")
    if len(train_set) == 0 or len(test_set) == 0:
        raise ConceptEvoError("train_set and test_set must not be empty")

    # Seeded choices made once: the training subset and the train-accuracy sample.
    pick = np.random.default_rng([int(seed), 7])
    if train_subset is not None:
        if not 1 <= int(train_subset) <= len(train_set):
            raise ConceptEvoError(f"train_subset must be in [1, {len(train_set)}], got {train_subset}")
        train_set = train_set.subset(np.sort(pick.permutation(len(train_set))[: int(train_subset)]))
    n_train = len(train_set)
    m = n_train if eval_train_max is None else min(n_train, int(eval_train_max))
    eval_train_ids = torch.from_numpy(np.sort(pick.permutation(n_train)[:m])).to(torch.int64)
    eval_test_ids = torch.arange(len(test_set), dtype=torch.int64)

    hyper = {
        "epochs": epochs, "lr": float(lr), "weight_decay": float(weight_decay), "dropout": dropout,
        "momentum": float(momentum), "batch_size": int(batch_size), "lr_schedule": lr_schedule,
        "warmup_epochs": float(warmup_epochs),
        "train_subset": None if train_subset is None else int(train_subset),
        "augment": bool(augment), "grad_clip": grad_clip, "eval_train_max": eval_train_max,
        "model_kw": dict(model_kw or {}), "save_epochs": saves,
    }
    card = {
        "model": model_name,
        "num_classes": int(num_classes),
        "hyper": hyper,
        "seed": int(seed),
        "train_data": _dataset_card(train_set),
        "test_data": _dataset_card(test_set),
    }
    run_json = run_dir / "run.json"
    log_path = run_dir / "log.parquet"
    resume_path = run_dir / "resume.pt"
    ckpt_dir = run_dir / "checkpoints"

    rows: list[dict[str, float]] = []
    start_epoch = 0
    if run_json.exists() and not overwrite:
        old = json.loads(run_json.read_text(encoding="utf-8"))
        same = {k: old.get(k) for k in card} == json.loads(json.dumps(card))
        if not same:
            now = json.loads(json.dumps(card))  # JSON round trip: tuples -> lists, as stored
            keys = ("model", "num_classes", "seed", "train_data", "test_data")
            diff = [k for k in keys if old.get(k) != now[k]]
            diff += [f"hyper.{k}" for k in hyper if old.get("hyper", {}).get(k) != now["hyper"][k]]
            raise ConceptEvoError(
                f"{run_dir} already holds a run with other settings ({', '.join(diff) or 'format'}); "
                "pass overwrite=True to replace it or choose another folder"
            )
        if resume and old.get("status") == "done" and log_path.exists():
            return load_train_log(run_dir)

    # fork_rng: seeding here must not change the caller's global torch RNG stream.
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if model is None:
            kw = dict(model_kw or {})
            if dropout is not None:
                kw["dropout"] = dropout
            net = build_model(model_name, num_classes=int(num_classes), **kw)
        else:
            net = model
        if monitor is not None and not callable(monitor) and getattr(monitor, "model", net) is not net:
            raise ConceptEvoError("monitor must be built on the model passed as model= (the one trained)")
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=float(lr), momentum=float(momentum),
                              weight_decay=float(weight_decay))
        gen = torch.Generator().manual_seed(int(seed) + 1)

        if resume and run_json.exists() and not overwrite and resume_path.exists() and log_path.exists():
            state = torch.load(resume_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            gen.set_state(state["shuffle_rng"])
            start_epoch = int(state["epoch"])
            rows = [r for r in pd.read_parquet(log_path).to_dict("records") if r["epoch"] <= start_epoch]
            if len(rows) != start_epoch + 1:
                raise CheckpointError(
                    f"{log_path} does not match {resume_path}; pass overwrite=True to restart")
        else:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for old_ckpt in ckpt_dir.glob("epoch_*.pt"):  # stale files of an overwritten run
                old_ckpt.unlink()
            with contextlib.suppress(FileNotFoundError):
                resume_path.unlink()
        used_threads = torch.get_num_threads()
        built_monitor = monitor is not None and callable(monitor) and not hasattr(monitor, "epoch_end")
        eval_probe = None
        if built_monitor:
            # built here, on the trained model; its construction saves and restores the RNG states.
            # A factory taking `probe` gets the trainer's evaluation images (the train-accuracy
            # sample, then the test set): the monitor then rides the evaluation pass (no forward
            # of its own, see log_epoch)
            kw = {}
            if _accepts(monitor, "probe"):
                from .data import concat_image_sets

                eval_probe = kw["probe"] = concat_image_sets(train_set.subset(eval_train_ids.numpy()), test_set,
                                                             source="evaluation images (train sample + test)")
            monitor = monitor(net, resume=start_epoch > 0, **kw)
        riding = eval_probe is not None and getattr(monitor, "probe", None) is eval_probe
        if tracer is not None:
            tracer.attach(net, opt, epoch=start_epoch, num_classes=int(num_classes),
                          class_names=train_set.class_names, out=run_dir / "trace", save_epochs=saves)
        _save_json(run_json, {**card, "status": "running", "engine": __version__,
                              "torch": torch.__version__, "threads": used_threads})

        steps_per_epoch = -(-n_train // int(batch_size))
        total_steps = steps_per_epoch * epochs
        t0 = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)

        def log_epoch(epoch: int, train_loss: float | None, cur_lr: float) -> None:
            if riding:  # one forward serves the accuracies and the monitor's stimuli (same batches)
                with monitor.riding(epoch) as rp:
                    tr1, tr5, tr_loss = _evaluate(net, train_set, eval_train_ids, 256, channels_last)
                    te1, te5, te_loss = _evaluate(net, test_set, eval_test_ids, 256, channels_last)
                    rp.set_accuracy(train_acc=tr1, test_acc=te1)
            else:
                tr1, tr5, tr_loss = _evaluate(net, train_set, eval_train_ids, 256, channels_last)
                te1, te5, te_loss = _evaluate(net, test_set, eval_test_ids, 256, channels_last)
            rows.append({"epoch": epoch, "train_top1": tr1, "train_top5": tr5, "test_top1": te1,
                         "test_top5": te5, "train_loss": tr_loss if train_loss is None else train_loss,
                         "lr": cur_lr, "test_loss": te_loss, "seconds": time.perf_counter() - t0})
            if epoch in saves:
                _save_torch(ckpt_dir / f"epoch_{epoch:03d}.pt", _plain_state_dict(net))
            _save_log(log_path, rows)
            if monitor is not None and not riding:
                monitor.epoch_end(epoch, train_acc=tr1, test_acc=te1)
            if epoch < epochs:  # what an interrupted run needs to continue exactly
                _save_torch(resume_path, {"model": _plain_state_dict(net), "optimizer": opt.state_dict(),
                                          "torch_rng": torch.get_rng_state(), "shuffle_rng": gen.get_state(),
                                          "epoch": epoch})

        if start_epoch == 0 and not rows:
            lr0 = _lr_at(0, max(1, total_steps), steps_per_epoch, lr, lr_schedule, warmup_epochs)
            log_epoch(0, None, lr0)

        bar = _progress(total_steps, start_epoch * steps_per_epoch, progress, desc or run_dir.name)
        try:
            for epoch in range(start_epoch + 1, epochs + 1):
                net.train()
                perm = torch.randperm(n_train, generator=gen)
                loss_sum, seen = 0.0, 0
                cur_lr = lr
                for b in range(steps_per_epoch):
                    step = (epoch - 1) * steps_per_epoch + b
                    cur_lr = _lr_at(step, total_steps, steps_per_epoch, lr, lr_schedule, warmup_epochs)
                    for group in opt.param_groups:
                        group["lr"] = cur_lr
                    ids = perm[b * batch_size:(b + 1) * batch_size]
                    x, y = train_set.batch(ids)
                    if augment:
                        flip = torch.rand(x.shape[0], generator=gen) < 0.5
                        x = torch.where(flip[:, None, None, None], x.flip(3), x)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    loss = nn.functional.cross_entropy(net(x), y)
                    if not torch.isfinite(loss):
                        raise ConceptEvoError(
                            f"{run_dir}: the training loss became {float(loss.detach())} at epoch {epoch}, "
                            f"step {b} "
                            f"(lr {cur_lr:.4g}); lower lr or set grad_clip. Checkpoints up to epoch "
                            f"{epoch - 1} are kept.")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip is not None:
                        nn.utils.clip_grad_norm_(net.parameters(), float(grad_clip))
                    opt.step()
                    if tracer is not None:
                        tracer.after_step(y, ids)
                    loss_sum += float(loss.detach()) * int(y.shape[0])
                    seen += int(y.shape[0])
                    bar.update(1)
                    if b % 10 == 0:
                        bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", refresh=False)
                log_epoch(epoch, loss_sum / max(1, seen), cur_lr)
                if tracer is not None:
                    tracer.end_epoch(epoch)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / max(1, seen):.3f}",
                                test_top1=f"{rows[-1]['test_top1']:.3f}", refresh=False)
        finally:
            bar.close()
            if tracer is not None:
                tracer.finish()
            if built_monitor:
                monitor.close()

    seconds = time.perf_counter() - t0
    _save_json(run_json, {**card, "status": "done", "seconds": round(seconds, 3), "engine": __version__,
                          "torch": torch.__version__, "threads": used_threads,
                          "checkpoints": {str(e): f"checkpoints/epoch_{e:03d}.pt" for e in saves}})
    with contextlib.suppress(FileNotFoundError):
        resume_path.unlink()
    return load_train_log(run_dir)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", leave=False,
                dynamic_ncols=True)


# ------------------------------------------------------------------------- reading runs
def load_train_log(run_dir: str | Path) -> TrainLog:
    """Read a run directory written by :func:`train_run`."""
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise ConceptEvoError(f"{run_dir} is not a training run (no run.json)")
    run = json.loads(run_json.read_text(encoding="utf-8"))
    log_path = run_dir / "log.parquet"
    table = pd.read_parquet(log_path) if log_path.exists() else pd.DataFrame(columns=LOG_COLUMNS)
    return TrainLog(run_dir, table, run_checkpoints(run_dir), float(run.get("seconds", 0.0)), run)


def run_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``{epoch: path}`` of the checkpoints in ``run_dir/checkpoints``, sorted by epoch."""
    found = {}
    for p in (Path(run_dir) / "checkpoints").glob("epoch_*.pt"):
        try:
            found[int(p.stem.split("_", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))


def run_model_factory(run_dir: str | Path) -> Callable[[], nn.Module]:
    """A function building a fresh, untrained model of the run's architecture (from run.json)."""
    run = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    name, num_classes = run["model"], int(run["num_classes"])
    kw = dict(run["hyper"].get("model_kw") or {})
    if run["hyper"].get("dropout") is not None:
        kw["dropout"] = run["hyper"]["dropout"]

    def factory() -> nn.Module:
        return build_model(name, num_classes=num_classes, **kw)

    return factory


# ---------------------------------------------------------------------------- regimes
#: The three regimes of the paper's Sec. 4.5 on the built-in data (see train_regimes). The
#: built-in world's concepts have graded difficulty (conceptevo.builtin), so well_trained's
#: accuracy climbs over most of its epochs and the paper's 25/50/75% milestones fall on
#: different saved epochs.
REGIMES: dict[str, dict[str, Any]] = {
    # The base model: dropout, weight decay, an lr well below where this BatchNorm-free VGG
    # dies (about 0.1), decayed to 0.
    "well_trained": dict(model_name="vgg_small", dropout=0.3, lr=0.04, weight_decay=5e-4, epochs=12,
                         lr_schedule="cosine", warmup_epochs=0.5, grad_clip=5.0,
                         save_epochs=[0, 1, 2, 3, 4, 6, 9, 12]),
    # Same model, a peak lr five times higher reached by a 4-epoch warm-up from lr/10: it learns
    # while the lr is still small, then loses what it learned and never recovers (Fig. 2b).
    # The gradient clip keeps the loss finite, so the collapse is recorded instead of a NaN.
    "high_lr": dict(model_name="vgg_small", dropout=0.3, lr=0.2, weight_decay=5e-4, epochs=8,
                    lr_schedule="constant", warmup_epochs=4, grad_clip=5.0,
                    save_epochs=[0, 1, 2, 3, 4, 6, 8]),
    # No dropout, no weight decay, a tenth of the images: memorises its training set (Fig. 2c).
    "overfit": dict(model_name="vgg_small_nodrop", lr=0.03, weight_decay=0.0, epochs=30,
                    lr_schedule="cosine", warmup_epochs=0.5, grad_clip=5.0, train_subset=960,
                    save_epochs=[0, 2, 5, 10, 15, 20, 30]),
}


def train_regimes(
    root: str | Path,
    seed: int = 0,
    *,
    regimes: Sequence[str] = ("well_trained", "high_lr", "overfit"),
    data_root: str | Path | None = None,
    train_images: int | None = None,
    test_images: int | None = None,
    epoch_scale: float = 1.0,
    threads: int | None = None,
    progress: bool = True,
    resume: bool = True,
    workers: int = 1,
    trace: bool = False,
    monitor: bool = False,
    monitor_probe: int | str = "eval",
) -> dict[str, Path]:
    """Train the paper's three regimes on the built-in data; ``{name: run_dir}`` (``root/<name>``).

    * ``well_trained`` -- vgg_small (dropout 0.3), weight decay, lr 0.04 with a cosine decay:
      the base model.
    * ``high_lr`` -- the same model whose lr is warmed up to 0.2, five times higher: it
      learns for the first epochs, then loses what it learned (cf. Fig. 2b).
    * ``overfit`` -- vgg_small_nodrop, no weight decay, trained on 960 of the 9,600 images:
      training accuracy climbs towards 100% while test accuracy stalls (cf. Fig. 2c).

    The exact settings are :data:`REGIMES`. All runs share ``seed`` (data, initialisation,
    shuffling). ``train_images`` / ``test_images`` shrink the dataset and ``epoch_scale`` the
    epochs (saved epochs and warm-up scale alike) for quick runs; the ``overfit`` subset
    stays a tenth of the training set. Finished runs are reused (``resume``).

    ``workers > 1`` trains the runs in that many processes at once (each with ``threads``
    threads; the runs are independent, so the weights are the same as in one process): on a
    2-core machine, 2 workers of 1 thread halve the wall time of the demo's training. The
    workers show no progress bars; a line is printed as each run finishes.
    ``trace`` records per-class update accumulators of every conv layer
    (:mod:`conceptevo.tracing`) into ``<run>/trace/``.
    ``monitor`` watches each run with a live :class:`conceptevo.monitor.Monitor` at its defaults
    (every epoch, epoch 0 included), writing ``<run>/monitor/`` (``alerts.jsonl``,
    ``metrics.parquet``, ``monitor.html``): when each alert would have fired. Its probe:
    ``monitor_probe="eval"`` (default) -- the run's own evaluation images (the train-accuracy
    sample of ``eval_train_max`` = 1,000 training images, then the test set: 2,600 images at full
    size), and the monitor rides the trainer's evaluation forward (:meth:`Monitor.riding`)
    instead of running its own; an integer -- that many training images (a seeded sample of the
    full training set, the same for every run), passed through by the monitor's own forward.
    """
    root = Path(root)
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ConceptEvoError(f"unknown regime(s) {unknown}; known: {list(REGIMES)}")
    train_set = builtin_dataset("train", seed=seed, root=data_root, num_images=train_images)
    test_set = builtin_dataset("test", seed=seed, root=data_root, num_images=test_images)
    if int(workers) > 1 and len(regimes) > 1:
        return _train_regimes_in_processes(root, seed, list(regimes), data_root, train_images, test_images,
                                           epoch_scale, threads, resume, int(workers), progress, trace,
                                           monitor, monitor_probe)
    if monitor and not (monitor_probe == "eval" or (isinstance(monitor_probe, int) and monitor_probe > 0)):
        raise ConceptEvoError(f"monitor_probe must be 'eval' or a positive number of images, got {monitor_probe!r}")
    probe = monitor_probe_set(train_set, monitor_probe, seed) if monitor and monitor_probe != "eval" else None
    out: dict[str, Path] = {}
    for name in regimes:
        cfg = dict(REGIMES[name])
        if epoch_scale != 1.0:
            e = max(1, round(cfg["epochs"] * epoch_scale))
            cfg["save_epochs"] = sorted({min(e, round(s * epoch_scale)) for s in cfg["save_epochs"]} | {0, e})
            cfg["warmup_epochs"] = min(cfg.get("warmup_epochs", 0) * epoch_scale, e)
            cfg["epochs"] = e
        if "train_subset" in cfg and train_images is not None:
            cfg["train_subset"] = max(1, round(cfg["train_subset"] * len(train_set) / 9600))
        model_name = cfg.pop("model_name")
        tracer = None
        if trace:
            from .tracing import Tracer

            tracer = Tracer(verbose=progress)
        watch = None
        if monitor:
            from .monitor import Monitor

            if probe is None:  # the trainer hands over its evaluation images and the monitor rides that pass
                def watch(net, resume, probe, _name=name):
                    return Monitor(net, probe, out=root / _name / "monitor", name=_name, seed=seed, resume=resume)
            else:
                def watch(net, resume, _name=name):
                    return Monitor(net, probe, out=root / _name / "monitor", name=_name, seed=seed, resume=resume)
        train_run(root / name, model_name, train_set, test_set, seed=seed, threads=threads,
                  progress=progress, resume=resume, desc=name, tracer=tracer, monitor=watch, **cfg)
        out[name] = root / name
    return out


def monitor_probe_set(train_set: ImageSet, size: int, seed: int) -> ImageSet:
    """The built-in runs' monitor probe: ``size`` training images drawn with a fixed seed (sorted)."""
    n = min(int(size), len(train_set))
    return train_set.subset(np.sort(np.random.default_rng([int(seed), 15]).permutation(len(train_set))[:n]))


def _train_one_regime(root: Path, name: str, seed: int, data_root, train_images, test_images, epoch_scale,
                      threads, resume, trace: bool = False, monitor: bool = False,
                      monitor_probe: int | str = "eval") -> tuple[str, float]:
    """One regime in a worker process (the data come from ``data_root``'s cache or are regenerated)."""
    t0 = time.perf_counter()
    train_regimes(root, seed, regimes=[name], data_root=data_root, train_images=train_images,
                  test_images=test_images, epoch_scale=epoch_scale, threads=threads, progress=False,
                  resume=resume, trace=trace, monitor=monitor, monitor_probe=monitor_probe)
    return name, time.perf_counter() - t0


def _train_regimes_in_processes(root: Path, seed: int, regimes: list[str], data_root, train_images, test_images,
                                epoch_scale, threads, resume, workers: int, progress: bool,
                                trace: bool = False, monitor: bool = False,
                                monitor_probe: int | str = "eval") -> dict[str, Path]:
    import concurrent.futures as cf
    import multiprocessing as mp

    # Longest first (by images x epochs), so that the others share the remaining worker.
    def cost(name: str) -> float:
        cfg = REGIMES[name]
        return cfg["epochs"] * (cfg.get("train_subset") or 9600)

    order = sorted(regimes, key=cost, reverse=True)
    if progress:
        print(f"training {', '.join(order)} in {min(workers, len(order))} processes", flush=True)
    # spawn: a forked child would inherit the parent's OpenMP thread pool in an unusable state
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(order)), mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(_train_one_regime, root, n, seed, data_root, train_images, test_images, epoch_scale,
                             threads, resume, trace, monitor, monitor_probe) for n in order]
        for fut in cf.as_completed(futures):
            name, secs = fut.result()  # re-raises a worker's error here
            if progress:
                print(f"  {name} trained ({secs:.0f} s)", flush=True)
    return {name: root / name for name in regimes}

"""Reversion check of evolution importance (paper Section 4.4, Figure 7).

For each class ``c`` and evolution ``t -> t'``, repeated on ``repeats`` independent
image samples:

1. sample ``sample_size`` training images of class ``c`` (and as many test images);
2. score every neuron's evolution importance on the training sample (Eq. 4,
   :func:`conceptevo.importance.evolution_importance`, all classes in one pass);
3. rank each layer's neurons and split them into ``num_bins`` bins (0-25% most
   important, 25-50%, 50-75%, 75-100% for 4 bins; ``numpy.array_split`` sizes, which
   differ by at most one neuron) plus a seeded random ``random_fraction`` of neurons;
4. *revert* a bin at one layer: in the epoch-``t'`` model, the bin's channels of that
   layer's output are replaced by their epoch-``t`` values on the same images
   (``out[:, bin] = Z^t[:, bin]``), the rest of ``M_t'`` runs on; measure top-1 and
   top-k accuracy on the sampled train and test images of ``c``;
5. report the change against the unreverted ``M_t'`` accuracy; the summary averages
   the changes over layers, classes and samples (Step 5 and the paper's averaging).

Higher-importance bins should drop accuracy more, with the random 25% in between.

Efficiency: per batch, one no-grad forward of ``M_t`` caches ``Z^t`` at every chosen
layer and one forward of ``M_t'`` gives the unreverted logits; then each (layer, bin)
costs one forward of ``M_t'`` with a hook on that layer. Batches mix classes: the
channel mask of each image is its own class's bin (a per-image ``(B, C)`` mask).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapter import EvalMode, LayerSpec, ModelAdapter, model_device_dtype
from .errors import DataError, InputError, LayerError
from .importance import (
    as_dataset,
    dataset_labels,
    evolution_importance,
    infer_input_shape,
    load_batch,
    resolve_pair,
)
from .store import atomic_write

__all__ = [
    "ReversionResult",
    "reversion_check",
    "revert_forward",
    "capture_epoch_t",
    "bin_labels",
    "summarize_reversion",
    "ordering_check",
    "class_ordering",
    "plot_reversion",
]

RANDOM_BIN = "random"


def bin_labels(num_bins: int = 4) -> list[str]:
    """Names of the importance bins, most important first: ``["0-25%", ..., "75-100%"]``."""
    if num_bins < 1:
        raise InputError(f"num_bins must be >= 1, got {num_bins}")
    edges = [100.0 * i / num_bins for i in range(num_bins + 1)]
    return [f"{edges[i]:g}-{edges[i + 1]:g}%" for i in range(num_bins)]


def capture_epoch_t(ad_t: ModelAdapter, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of every chosen layer of the epoch-t model on ``x`` (no autograd, safe copies)."""
    zt: dict[str, torch.Tensor] = {}

    def keep(name: str, out: torch.Tensor) -> None:
        zt[name] = out.detach().clone()  # copy: in-place ops downstream must not alter it

    with torch.no_grad(), ad_t.hooks(keep):
        ad_t.model(x)
    return zt


def revert_forward(
    ad_t2: ModelAdapter,
    x: torch.Tensor,
    layer: str,
    mask: torch.Tensor,
    z_t: torch.Tensor,
    observe=None,
) -> torch.Tensor:
    """Logits of the epoch-t' model on ``x`` with the masked channels of ``layer`` reverted.

    Args:
        ad_t2: adapter of the epoch-t' model (in eval mode).
        x: input batch.
        layer: the chosen layer whose output is modified.
        mask: bool ``(C,)`` (same channels for every image) or ``(B, C)`` (per image).
        z_t: the epoch-t output of ``layer`` on the same ``x``.
        observe: optional ``fn(name, output)`` called with every chosen layer's output
            *after* the reversion (for checks).
    """
    if layer not in ad_t2.layer_names:
        raise LayerError(f"layer {layer!r} is not among the chosen layers {ad_t2.layer_names}")

    def hook(name: str, out: torch.Tensor) -> torch.Tensor | None:
        new = None
        if name == layer:
            if z_t.shape != out.shape:
                raise LayerError(
                    f"layer {layer!r}: epoch-t output {tuple(z_t.shape)} does not match "
                    f"epoch-t' output {tuple(out.shape)}"
                )
            m = mask if mask.dim() == 2 else mask.view(1, -1).expand(out.shape[0], -1)
            if out.dim() == 4:
                m = m[:, :, None, None]
            new = torch.where(m.to(out.device), z_t.to(out.dtype), out)
        if observe is not None:
            observe(name, (new if new is not None else out).detach().clone())
        return new

    with torch.no_grad(), ad_t2.hooks(hook):
        return ad_t2.model(x)


def _correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top1 = logits.argmax(1) == y
    topk = (logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(1)
    return top1.to(torch.int64), topk.to(torch.int64)


@dataclass
class ReversionResult:
    long: pd.DataFrame  # class, layer, sample, split, bin, top1, top5, base_top1, base_top5, delta_*, n_images
    summary: pd.DataFrame  # split, bin, metric, mean_delta, std_over_samples, mean_base, mean_reverted
    importance: pd.DataFrame = field(repr=False)  # the importance tables of every sample (column `sample`)


def _sample(rng: np.random.Generator, idx: np.ndarray, size: int) -> np.ndarray:
    if idx.size <= size:
        return idx
    return np.sort(rng.choice(idx, size=size, replace=False))


def _split_counts(ad_t, ad_t2, data, labels_all, idx, rows, masks, ncls, batch_size, k, dev, dtype):
    """Correct counts per class row: base (top1, topk) and {(layer, bin): (top1, topk)}."""
    base1 = torch.zeros(ncls, dtype=torch.int64)
    basek = torch.zeros(ncls, dtype=torch.int64)
    rev = {key: (torch.zeros(ncls, dtype=torch.int64), torch.zeros(ncls, dtype=torch.int64)) for key in
           [(layer, b) for layer in masks for b in masks[layer]]}
    for s in range(0, len(idx), batch_size):
        b_idx = idx[s : s + batch_size]
        r = rows[s : s + batch_size]
        x, y = load_batch(data, b_idx, labels_all[b_idx])
        x, y = x.to(dev, dtype), y.to(dev)
        zt = capture_epoch_t(ad_t, x)  # cached once per batch, reused by every layer and bin
        with torch.no_grad():
            c1, ck = _correct(ad_t2.model(x), y, k)
        base1.index_add_(0, r, c1.cpu())
        basek.index_add_(0, r, ck.cpu())
        for layer, per_bin in masks.items():
            for b, m in per_bin.items():
                logits = revert_forward(ad_t2, x, layer, m[r.to(m.device)].to(dev), zt[layer])
                c1, ck = _correct(logits, y, k)
                rev[(layer, b)][0].index_add_(0, r, c1.cpu())
                rev[(layer, b)][1].index_add_(0, r, ck.cpu())
    return base1, basek, rev


def reversion_check(
    model_t: nn.Module | ModelAdapter,
    model_t2: nn.Module | ModelAdapter,
    train_data,
    test_data=None,
    classes: Sequence[int] | None = None,
    layers: LayerSpec = None,
    sample_size: int = 32,
    repeats: int = 5,
    num_bins: int = 4,
    random_fraction: float = 0.25,
    batch_size: int = 64,
    topk: int = 5,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = False,
    gradient_at: str = "t",
    samples: Sequence[int] | None = None,
) -> ReversionResult:
    """Fig. 7: accuracy change when reverting each importance bin (and a random set).

    Args:
        model_t, model_t2: epoch-t and epoch-t' models (``nn.Module`` or adapters).
        train_data, test_data: datasets (see :func:`evolution_importance`); the test split
            is skipped when ``test_data`` is None.
        classes: labels to check (``None`` = every label of ``train_data``).
        layers: layer choice; ``None`` keeps the adapters' layers / every Conv2d.
        sample_size: images sampled per class and split in each repeat (paper: 128); a
            class with fewer images uses all of them (its repeats then differ only in
            the random baseline).
        repeats: independent samples (paper: 5).
        num_bins: importance bins per layer (paper: 4).
        random_fraction: share of a layer's neurons in the random baseline (paper: 25%).
        topk: k of the top-k accuracy reported in the ``top5`` columns (paper: 5; capped
            at the number of logits).
        seed: seeds the image samples and the random baselines.
        gradient_at: which model's gradient ranks the neurons (see
            :func:`~conceptevo.importance.evolution_importance`; ``"t"`` is the paper's Eq. 3).
        samples: run only these of the ``repeats`` samples (each is seeded by ``[seed, sample]``
            alone, so a subset gives exactly those rows of the full run; used to spread the
            repeats over ranks).

    Returns:
        :class:`ReversionResult` with the long table, the summary and the importance tables.
    """
    if sample_size < 1 or repeats < 1:
        raise InputError(f"sample_size and repeats must be >= 1 (got {sample_size}, {repeats})")
    if not 0.0 <= random_fraction <= 1.0:
        raise InputError(f"random_fraction must be in [0, 1], got {random_fraction}")
    names_bins = bin_labels(num_bins)
    train_data = as_dataset(train_data)
    ad_t, ad_t2 = resolve_pair(model_t, model_t2, layers, input_shape=infer_input_shape(train_data))
    if device is not None:
        ad_t.model.to(device)
        ad_t2.model.to(device)
    dev, dtype = model_device_dtype(ad_t2.model)

    splits: dict[str, tuple[object, np.ndarray]] = {"train": (train_data, dataset_labels(train_data))}
    if test_data is not None:
        test_data = as_dataset(test_data)
        splits["test"] = (test_data, dataset_labels(test_data))
    cls = sorted(set(splits["train"][1].tolist())) if classes is None else [int(c) for c in classes]
    if not cls:
        raise DataError("no classes to check")
    for split, (_, lab) in splits.items():
        missing = [c for c in cls if not np.any(lab == c)]
        if missing:
            raise DataError(f"class(es) {missing} have no images in the {split} data")
    ncls = len(cls)
    lut = {c: i for i, c in enumerate(cls)}

    rows_out: list[pd.DataFrame] = []
    imp_tables: list[pd.DataFrame] = []
    reps = range(repeats) if samples is None else [int(r) for r in samples]
    if progress:
        from tqdm.auto import tqdm

        reps = tqdm(reps, desc="reversion", unit="sample")
    for rep in reps:
        rng = np.random.default_rng([seed, rep])
        picked = {
            split: np.concatenate([_sample(rng, np.flatnonzero(lab == c), sample_size) for c in cls])
            for split, (_, lab) in splits.items()
        }
        imp = evolution_importance(ad_t, ad_t2, train_data, classes=cls, indices=picked["train"],
                                   gradient_at=gradient_at,
                                   batch_size=batch_size)
        imp_tables.append(imp.assign(sample=rep))

        # Masks per layer and bin: (num classes, C) bool, row = class position in `cls`.
        masks: dict[str, dict[str, torch.Tensor]] = {}
        for layer in ad_t2.layer_names:
            C = ad_t2.channels[layer]
            per_bin = {b: torch.zeros(ncls, C, dtype=torch.bool) for b in [*names_bins, RANDOM_BIN]}
            n_random = int(round(random_fraction * C))
            # The table has every channel of every class: sorted by (class, rank) it is
            # a (classes, C) block of channel ids, most important first.
            sub = imp[imp["layer"] == layer].sort_values(["class", "rank"])
            ranked = torch.tensor(sub["channel"].to_numpy().reshape(-1, C), dtype=torch.long)
            row = torch.as_tensor([lut[int(c)] for c in sub["class"].to_numpy()[::C]])[:, None]
            for b, cols in zip(names_bins, np.array_split(np.arange(C), num_bins)):
                per_bin[b][row, ranked[:, torch.as_tensor(cols, dtype=torch.long)]] = True
            for c in cls:
                per_bin[RANDOM_BIN][lut[c], torch.as_tensor(rng.choice(C, n_random, replace=False))] = True
            masks[layer] = per_bin

        with EvalMode(ad_t.model, ad_t2.model):
            for split, (data, lab) in splits.items():
                idx = picked[split]
                rows = torch.as_tensor(np.array([lut[int(v)] for v in lab[idx]], dtype=np.int64))
                n_img = torch.bincount(rows, minlength=ncls).numpy()
                b1, bk, rev = _split_counts(ad_t, ad_t2, data, lab, idx, rows, masks, ncls, batch_size,
                                            topk, dev, dtype)
                base1, basek = b1.numpy() / n_img, bk.numpy() / n_img
                for (layer, b), (r1, rk) in rev.items():
                    t1, tk = r1.numpy() / n_img, rk.numpy() / n_img
                    rows_out.append(pd.DataFrame({
                        "class": cls, "layer": layer, "sample": rep, "split": split, "bin": b,
                        "top1": t1, "top5": tk, "base_top1": base1, "base_top5": basek,
                        "delta_top1": t1 - base1, "delta_top5": tk - basek, "n_images": n_img,
                    }))
    long = pd.concat(rows_out, ignore_index=True)
    long.attrs["topk"] = topk
    return ReversionResult(long=long, summary=summarize_reversion(long),
                           importance=pd.concat(imp_tables, ignore_index=True))


def summarize_reversion(long: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy change per (split, bin, metric).

    Changes are averaged over layers (paper Step 5), then over classes within a sample,
    then over samples; ``std_over_samples`` is the spread of the per-sample means.
    Bins keep their order (most important first, ``random`` last).
    """
    frames = []
    for metric in ("top1", "top5"):
        per_sample = (
            long.groupby(["split", "bin", "sample", "class"], sort=False)
            .agg(delta=(f"delta_{metric}", "mean"), base=(f"base_{metric}", "mean"),
                 rev=(metric, "mean"))
            .groupby(["split", "bin", "sample"], sort=False).mean()
        )
        agg = per_sample.groupby(["split", "bin"], sort=False).agg(
            mean_delta=("delta", "mean"), std_over_samples=("delta", lambda s: float(np.std(s, ddof=0))),
            mean_base=("base", "mean"), mean_reverted=("rev", "mean"),
        )
        frames.append(agg.reset_index().assign(metric=metric))
    out = pd.concat(frames, ignore_index=True)
    return out[["split", "bin", "metric", "mean_delta", "std_over_samples", "mean_base", "mean_reverted"]]


def ordering_check(summary: pd.DataFrame, tol: float = 0.0) -> pd.DataFrame:
    """Does reverting more important bins drop accuracy more?

    Per (split, metric): ``monotone`` is True when the mean change does not decrease
    from the most important bin to the least (within ``tol``); ``random_between`` is True
    when the random baseline lies between the best and worst bins' changes.
    """
    out = []
    for (split, metric), g in summary.groupby(["split", "metric"], sort=False):
        bins = g[g["bin"] != RANDOM_BIN]["mean_delta"].to_numpy()
        rnd = g.loc[g["bin"] == RANDOM_BIN, "mean_delta"]
        monotone = bool(np.all(np.diff(bins) >= -tol)) if bins.size else False
        between = bool(rnd.size and bins.size and bins.min() - tol <= rnd.iloc[0] <= bins.max() + tol)
        out.append({"split": split, "metric": metric, "monotone": monotone, "random_between": between})
    return pd.DataFrame(out)


def class_ordering(long: pd.DataFrame, split: str = "train", metric: str = "top1",
                   no_effect: float = 0.01) -> pd.DataFrame:
    """The Fig. 7 ordering class by class: mean accuracy change per bin (over layers and samples).

    Columns: ``class``, one per bin (most important first, ``random`` last when present),
    ``top_bin_drops_most`` (the most important bin's change is the lowest of the importance
    bins), ``monotone`` (changes do not decrease from the most to the least important bin),
    ``no_effect`` (every bin's change, random included, is within ``no_effect`` of zero:
    the class is insensitive to reverting a quarter of any one layer).
    """
    sub = long[long["split"] == split]
    if sub.empty:
        raise InputError(f"no rows for split {split!r}")
    table = sub.groupby(["class", "bin"], sort=False)[f"delta_{metric}"].mean().unstack("bin")
    bins = [b for b in sub["bin"].drop_duplicates() if b != RANDOM_BIN]
    cols = bins + ([RANDOM_BIN] if RANDOM_BIN in table.columns else [])
    table = table[cols]
    vals = table[bins].to_numpy()
    out = table.reset_index()
    out.columns.name = None
    out["top_bin_drops_most"] = vals[:, 0] <= vals.min(axis=1)
    out["monotone"] = (np.diff(vals, axis=1) >= 0).all(axis=1)
    out["no_effect"] = (table.abs() < no_effect).all(axis=1).to_numpy()
    return out


def plot_reversion(summary: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Figure-7-style plot: one panel per (split, metric), bars per importance bin,
    the random baseline as a dashed line. Writes a PNG (or any matplotlib format) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = list(summary.groupby(["split", "metric"], sort=False))
    if not panels:
        raise InputError("the summary is empty; nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, ((split, metric), g) in zip(axes[0], panels):
        bins = g[g["bin"] != RANDOM_BIN]
        ax.bar(range(len(bins)), bins["mean_delta"], yerr=bins["std_over_samples"], color="#4c72b0",
               capsize=3, label="importance bin")
        rnd = g[g["bin"] == RANDOM_BIN]
        if len(rnd):
            ax.axhline(float(rnd["mean_delta"].iloc[0]), color="#dd8452", ls="--", label="random 25%")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(range(len(bins)))
        ax.set_xticklabels(bins["bin"], rotation=30, fontsize=8)
        ax.set_title(f"{split} {metric.replace('top', 'top-')}", fontsize=9)
        ax.set_xlabel("reverted neurons (importance percentile)", fontsize=8)
    axes[0][0].set_ylabel("accuracy change")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:  # atomic, like every other artifact: a crash mid-write leaves the previous figure
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
    finally:
        plt.close(fig)
    return path

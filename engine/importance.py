"""Important concept evolutions for a class (paper Section 3.3, Eq. 2-4).

For class ``c``, epochs ``t -> t'`` and a neuron ``n`` (channel ``n`` of layer ``l``):

    Delta Z_n(x) = Z^{t'}_n(x) - Z^t_n(x)                          (Eq. 2, one channel, zeros elsewhere)
    S_n(x)       = sum_{h,w} d logit_c^t / d Z^t_l(x)[n,h,w] * Delta Z_n(x)[h,w]     (Eq. 3)
    I_n          = |{x in X_c : S_n(x) > 0}| / |X_c|               (Eq. 4)

The gradient is taken in the epoch-``t`` model at its own (unmodified) activations;
``Z^{t'}`` comes from the epoch-``t'`` model on the same image.

``gradient_at="t_prime"`` (not in the paper) takes the gradient in the epoch-``t'``
model instead: ``S_n(x) = grad h^{t'}(Z^{t'}) . Delta Z_n``. The paper's choice cannot
see the value of a concept the epoch-``t`` model does not use yet: on the built-in
data, for a class the epoch-``t`` model could not recognise (12% -> 94% between ``t``
and ``t'``), Eq. 3 ranked the evolutions that made it recognisable *least* important
(reverting that bin: -81 points), while the gradient at ``t'`` ranked them first.

Batched evaluation (``evolution_importance``)
---------------------------------------------
Eq. 3 is a dot product of the gradient with a one-channel direction, so the
sensitivity of *every* channel of a layer is the per-channel spatial sum of
``grad * (Z^{t'} - Z^t)``. Per batch the engine therefore runs

* one forward of ``M_t'`` without autograd, keeping ``Z^{t'}`` at every chosen layer;
* one forward of ``M_t`` keeping ``Z^t`` at every chosen layer as graph nodes, and
  one backward of ``sum_b logit_{y_b}(x_b)`` (each image's OWN-class logit, gathered
  by label), which yields ``d logit_{y_b}(x_b) / d Z^t_l(x_b)`` for every layer and
  every image at once.

The backward of the sum gives per-image gradients only because, with the models in
``eval()`` mode, image ``b``'s logits depend on image ``b``'s activations alone:
BatchNorm uses its running statistics (no batch statistics) and Dropout is the
identity. Both models are put in ``eval()`` for the pass and restored afterwards. A
model that mixes images of a batch even in eval mode (rare, e.g. a custom
batch-attention layer) is outside this method's assumptions.

Hooks only *read* the epoch-``t`` activations (a copy is passed on downstream so an
in-place op such as ``ReLU(inplace=True)`` after a chosen layer cannot change the
kept tensor), so the gradient with respect to an early layer is taken through the
unmodified epoch-``t`` forward, chained through every later layer.

``conceptevo._reference.importance_loop`` is the plain reference: per image and per neuron it builds the
full one-neuron ``Delta Z`` of Eq. 2 and dots it with ``torch.autograd.grad`` of the
logit (the authors' formulation). It is slow and exists for tests and benchmarks.

Output table (``pandas.DataFrame``), one row per (class, layer, channel):
``class, layer, channel, neuron, score, positives, total, mean_s, rank`` where
``score = I_n = positives / total``, ``neuron`` is the flat neuron index of the
adapter (``offsets[layer] + channel``), ``mean_s`` is the mean of ``S_n(x)`` over
the class's images (for inspection and tie-breaking) and ``rank`` is 1 for the most
important neuron of its (class, layer): order by score desc, then mean_s desc,
then channel asc.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapter import EvalMode, LayerSpec, ModelAdapter, model_device_dtype
from .errors import ActivationError, DataError, InputError, LayerError

__all__ = [
    "Sensitivities",
    "evolution_importance",
    "batch_sensitivities",
    "class_indices",
    "resolve_pair",
    "importance_table",
    "as_dataset",
    "dataset_labels",
    "load_batch",
    "infer_input_shape",
]


# ----------------------------------------------------------------------------- inputs
def dataset_labels(data) -> np.ndarray:
    """Integer label of every item of ``data`` without loading images where possible."""
    for attr in ("labels", "targets"):
        lab = getattr(data, attr, None)
        if lab is not None:
            arr = lab.numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            if arr.ndim != 1 or len(arr) != len(data):
                raise DataError(f"dataset.{attr} has shape {arr.shape}; expected ({len(data)},)")
            return arr.astype(np.int64)
    # Any other map-style dataset: read the labels item by item (loads the images once).
    return np.asarray([int(data[i][1]) for i in range(len(data))], dtype=np.int64)


class _TensorPairs:
    """(images, labels) tensors seen as a dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def as_dataset(data):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return _TensorPairs(data[0], torch.as_tensor(data[1]))
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise DataError(
            f"data must be a map-style dataset returning (image, label) or an (images, labels) "
            f"tuple of tensors, not {type(data).__name__}"
        )
    return data


def class_indices(
    data,
    classes: Sequence[int] | None = None,
    max_images_per_class: int | None = None,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Dataset indices of each class's images, ``{class: sorted int64 indices}``.

    ``classes=None`` takes every label present. With ``max_images_per_class`` a random
    subset (without replacement, seeded) of that size is kept per class.
    """
    data = as_dataset(data)
    labels = dataset_labels(data)
    present = np.unique(labels)
    if classes is None:
        classes = [int(c) for c in present]
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for c in classes:
        idx = np.flatnonzero(labels == int(c))
        if idx.size == 0:
            raise DataError(f"class {c} has no images in the dataset (labels present: {present.tolist()[:20]})")
        if max_images_per_class is not None:
            if max_images_per_class < 1:
                raise InputError(f"max_images_per_class must be >= 1, got {max_images_per_class}")
            if idx.size > max_images_per_class:
                idx = np.sort(rng.choice(idx, size=max_images_per_class, replace=False))
        out[int(c)] = idx.astype(np.int64)
    return out


def load_batch(data, idx: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, _TensorPairs):
        t = torch.as_tensor(idx)
        return data.images[t], data.labels[t]
    x = torch.stack([torch.as_tensor(data[int(i)][0]) for i in idx])
    return x, torch.as_tensor(labels)


def resolve_pair(
    model_t: nn.Module | ModelAdapter,
    model_t2: nn.Module | ModelAdapter,
    layers: LayerSpec = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[ModelAdapter, ModelAdapter]:
    """Adapters for the epoch-t and epoch-t' models with the same chosen layers and channels."""

    def adapt(m, which: str) -> ModelAdapter:
        if isinstance(m, ModelAdapter):
            if layers is None:
                return m
            return ModelAdapter(m.model, layers=layers, input_shape=m.input_shape)
        if not isinstance(m, nn.Module):
            raise TypeError(f"{which} must be an nn.Module or a ModelAdapter, not {type(m).__name__}")
        if input_shape is None:
            raise InputError(f"input_shape is needed to wrap {which} ({type(m).__name__}) in a ModelAdapter")
        return ModelAdapter(m, layers=layers, input_shape=input_shape)

    # ModelAdapter's shape probe ends with model.train(mode), which flattens a mixed
    # train/eval state of submodules; keep each submodule's own mode.
    saved = [(mod, mod.training) for m in (model_t, model_t2)
             for mod in (m.model if isinstance(m, ModelAdapter) else m).modules()]
    try:
        a, b = adapt(model_t, "model_t"), adapt(model_t2, "model_t2")
    finally:
        for mod, mode in saved:
            mod.training = mode
    if a.layer_names != b.layer_names:
        raise LayerError(
            f"the two models have different chosen layers: {a.layer_names} (epoch t) vs {b.layer_names} (epoch t')"
        )
    for name in a.layer_names:
        if a.channels[name] != b.channels[name] or a.spatial[name] != b.spatial[name]:
            raise LayerError(
                f"layer {name!r} differs between the models: {a.channels[name]} channels "
                f"{a.spatial[name]} (epoch t) vs {b.channels[name]} channels {b.spatial[name]} (epoch t')"
            )
    return a, b


def infer_input_shape(data) -> tuple[int, ...]:
    if len(data) == 0:
        raise DataError("the dataset is empty")
    return tuple(torch.as_tensor(data[0][0]).shape)


# ------------------------------------------------------------------------ batched core
def batch_sensitivities(
    ad_t: ModelAdapter, ad_t2: ModelAdapter, x: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``S_n(x_b)`` for every chosen layer: ``{layer: (B, C)}``, w.r.t. each image's ``target[b]`` logit.

    The models must already be in eval mode (see the module docstring); ``x`` and
    ``target`` on the models' device.
    """
    z2: dict[str, torch.Tensor] = {}

    def keep_t2(name: str, out: torch.Tensor) -> None:
        # Copy: a later in-place op (ReLU(inplace=True)) would otherwise overwrite it.
        z2[name] = out.detach().clone()

    with torch.no_grad(), ad_t2.hooks(keep_t2):
        ad_t2.model(x)

    z: dict[str, torch.Tensor] = {}

    def keep_t(name: str, out: torch.Tensor) -> torch.Tensor:
        z[name] = out
        # Downstream gets a copy, so in-place ops after this layer leave `out` (the
        # tensor we differentiate against) as the layer's true output.
        return out.clone()

    with torch.enable_grad(), ad_t.hooks(keep_t):
        # x requires grad so the layer outputs are graph nodes even if the parameters are frozen.
        logits = ad_t.model(x.detach().requires_grad_(True))
        if logits.dim() != 2:
            raise LayerError(f"the model returns shape {tuple(logits.shape)}; expected logits (B, classes)")
        if target.numel() and int(target.max()) >= logits.shape[1]:
            raise DataError(f"label {int(target.max())} but the model has only {logits.shape[1]} logits")
        own = logits.gather(1, target.view(-1, 1)).sum()
        names = ad_t.layer_names
        grads = torch.autograd.grad(own, [z[n] for n in names], allow_unused=True)

    out: dict[str, torch.Tensor] = {}
    for name, g in zip(names, grads):
        zt = z[name].detach()
        delta = z2[name] - zt
        prod = delta * g if g is not None else torch.zeros_like(delta)
        out[name] = prod.flatten(2).sum(-1) if prod.dim() == 4 else prod
    return out


@dataclass
class Sensitivities:
    """Per-image sensitivities kept with ``return_scores=True``."""

    ids: np.ndarray  # int64 (n,) dataset indices, in evaluation order
    labels: np.ndarray  # int64 (n,)
    scores: dict[str, np.ndarray]  # layer -> float64 (n, C): S_n(x) w.r.t. the image's own class


def importance_table(
    classes: Sequence[int],
    ad: ModelAdapter,
    positives: dict[str, np.ndarray],
    totals: np.ndarray,
    sums: dict[str, np.ndarray],
) -> pd.DataFrame:
    """Build the output table from per-layer ``(num_classes, C)`` positive counts and S sums.

    Rows are ordered by class (as given), layer (model order), channel.
    """
    classes = np.asarray(classes, dtype=np.int64)
    k = len(classes)
    tot = np.asarray(totals, dtype=np.int64)
    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("class", "layer", "channel", "neuron", "score",
                                                        "positives", "total", "mean_s", "rank")}
    for li, name in enumerate(ad.layer_names):
        c = ad.channels[name]
        pos = np.asarray(positives[name], dtype=np.int64).reshape(k, c)
        score = pos / np.maximum(tot, 1)[:, None]
        mean_s = np.asarray(sums[name], dtype=np.float64).reshape(k, c) / np.maximum(tot, 1)[:, None]
        chan = np.broadcast_to(np.arange(c), (k, c))
        # Rank 1 = most important: score desc, then mean S desc, then channel asc.
        order = np.lexsort((chan, -mean_s, -score), axis=-1)
        rank = np.empty((k, c), np.int64)
        np.put_along_axis(rank, order, np.arange(1, c + 1)[None, :].repeat(k, 0), axis=-1)
        cols["class"].append(np.repeat(classes, c))
        cols["layer"].append(np.full(k * c, li, np.int64))
        cols["channel"].append(chan.ravel())
        cols["neuron"].append(chan.ravel() + ad.offsets[name])
        cols["score"].append(score.ravel())
        cols["positives"].append(pos.ravel())
        cols["total"].append(np.repeat(tot, c))
        cols["mean_s"].append(mean_s.ravel())
        cols["rank"].append(rank.ravel())
    data = {n: (np.concatenate(v) if v else np.zeros(0)) for n, v in cols.items()}
    df = pd.DataFrame(data)
    # (class position, layer, channel) order; class positions keep the caller's class order.
    pos_of = np.concatenate([np.repeat(np.arange(k), ad.channels[n]) for n in ad.layer_names]) if k else []
    order = np.lexsort((df["channel"].to_numpy(), df["layer"].to_numpy(), np.asarray(pos_of)))
    df = df.iloc[order].reset_index(drop=True)
    df["layer"] = np.asarray(ad.layer_names, dtype=object)[df["layer"].to_numpy()]
    return df[["class", "layer", "channel", "neuron", "score", "positives", "total", "mean_s", "rank"]]


def _prepare(model_t, model_t2, data, classes, layers, max_images_per_class, seed, indices, device):
    data = as_dataset(data)
    ad_t, ad_t2 = resolve_pair(model_t, model_t2, layers, input_shape=infer_input_shape(data))
    if device is not None:
        ad_t.model.to(device)
        ad_t2.model.to(device)
    labels_all = dataset_labels(data)
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
            raise DataError(f"indices out of range [0, {len(data)})")
        if classes is not None:
            idx = idx[np.isin(labels_all[idx], np.asarray(classes, dtype=np.int64))]
        cls = sorted(set(labels_all[idx].tolist())) if classes is None else [int(c) for c in classes]
        missing = [c for c in cls if not np.any(labels_all[idx] == c)]
        if missing:
            raise DataError(f"class(es) {missing} have no images among the given indices")
    else:
        per = class_indices(data, classes, max_images_per_class, seed)
        cls = list(per)
        idx = np.concatenate([per[c] for c in cls]) if cls else np.zeros(0, np.int64)
    if not cls:
        raise DataError("no classes to score")
    return data, ad_t, ad_t2, labels_all, idx, cls


def evolution_importance(
    model_t: nn.Module | ModelAdapter,
    model_t2: nn.Module | ModelAdapter,
    data,
    classes: Sequence[int] | None = None,
    layers: LayerSpec = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    max_images_per_class: int | None = None,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    return_scores: bool = False,
    progress: bool = False,
    gradient_at: str = "t",
) -> pd.DataFrame | tuple[pd.DataFrame, Sensitivities]:
    """Importance ``I_n`` (Eq. 4) of every chosen neuron's evolution ``t -> t'`` for each class.

    Args:
        model_t, model_t2: the epoch-``t`` and epoch-``t'`` models (same architecture), as
            ``nn.Module`` or :class:`ModelAdapter`.
        data: map-style dataset returning ``(image, label)`` (``.labels``/``.targets`` are
            used to find class images without loading them), or an ``(images, labels)`` tuple.
        classes: labels to score; ``None`` = every label present.
        layers: layer choice (see :mod:`conceptevo.adapter`); ``None`` keeps the adapters'
            layers, or every Conv2d for plain modules.
        batch_size: images per forward/backward; batches mix classes.
        device: move both models there (in place) and run there; ``None`` = the models' device.
        max_images_per_class: score a seeded random subset of this many images per class.
        seed: seed of that subset.
        indices: explicit dataset indices to use instead (filtered by ``classes``).
        return_scores: also return the per-image sensitivities (:class:`Sensitivities`).
        progress: show a tqdm bar over batches.
        gradient_at: ``"t"`` (Eq. 3, the paper) or ``"t_prime"``: the model whose class-logit
            gradient weighs the change (see the module docstring).

    Returns:
        The table described in the module docstring (and the scores if asked).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if gradient_at not in ("t", "t_prime"):
        raise InputError(f"gradient_at must be 't' or 't_prime', got {gradient_at!r}")
    data, ad_t, ad_t2, labels_all, idx, cls = _prepare(
        model_t, model_t2, data, classes, layers, max_images_per_class, seed, indices, device
    )
    dev, dtype = model_device_dtype(ad_t.model)
    # Row of each class in the accumulators; labels outside `cls` never reach here.
    lut = {c: i for i, c in enumerate(cls)}
    row_of = torch.as_tensor(np.array([lut[int(v)] for v in labels_all[idx]], dtype=np.int64))
    ncls = len(cls)
    pos = {n: torch.zeros(ncls, ad_t.channels[n], dtype=torch.int64, device=dev) for n in ad_t.layer_names}
    sums = {n: torch.zeros(ncls, ad_t.channels[n], dtype=torch.float64, device=dev) for n in ad_t.layer_names}
    totals = torch.bincount(row_of, minlength=ncls)
    kept: dict[str, list[np.ndarray]] = {n: [] for n in ad_t.layer_names}

    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="importance", unit="batch")
    with EvalMode(ad_t.model, ad_t2.model):
        for s in starts:
            b_idx = idx[s : s + batch_size]
            x, y = load_batch(data, b_idx, labels_all[b_idx])
            x = x.to(dev, dtype)
            y = y.to(dev)
            rows = row_of[s : s + batch_size].to(dev)
            if gradient_at == "t":
                sens = batch_sensitivities(ad_t, ad_t2, x, y)
            else:  # grad h^{t'}(Z^{t'}) . (Z^t - Z^{t'}), negated
                sens = {n: -v for n, v in batch_sensitivities(ad_t2, ad_t, x, y).items()}
            for name, S in sens.items():
                pos[name].index_add_(0, rows, (S > 0).to(torch.int64))
                sums[name].index_add_(0, rows, S.to(torch.float64))
                if return_scores:
                    kept[name].append(S.detach().to("cpu", torch.float64).numpy())

    for name, v in sums.items():  # NaN/inf anywhere in S ends up in its class's sum
        if not torch.isfinite(v).all():
            raise ActivationError(f"non-finite sensitivity at layer {name!r} (NaN/inf activations or gradients)")
    df = importance_table(
        cls, ad_t,
        {n: p.cpu().numpy() for n, p in pos.items()},
        totals.numpy(),
        {n: v.cpu().numpy() for n, v in sums.items()},
    )
    if not return_scores:
        return df
    scores = {
        n: (np.concatenate(v) if v else np.zeros((0, ad_t.channels[n]))) for n, v in kept.items()
    }
    return df, Sensitivities(ids=idx.copy(), labels=labels_all[idx].copy(), scores=scores)

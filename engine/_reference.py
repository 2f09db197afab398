"""Reference implementations: the plain definitions the fast paths are tested against.

Each function here is the slow, obviously-correct version of a stage and exists for the
test suite and the benchmarks (as the oracle and the baseline); the engine never calls
them. They live in the package rather than under ``tests/`` because the benchmarks use
them too, and a user can check a result of their own against them.

* :func:`numpy_reference_train` -- the SGNS trainer (:func:`conceptevo.neuron_embedding.train`)
  in NumPy, one pair at a time; with ``threads=1`` the two give bit-identical vectors.
* :func:`build_pairs_reference` -- Step 1.2 (:func:`conceptevo.pairs.build_pairs`) in plain Python.
* :func:`importance_loop` -- Eq. 2-4 (:func:`conceptevo.importance.evolution_importance`) one image
  and one neuron at a time.
* :func:`synthetic_report_data` -- a complete :class:`conceptevo.report.ReportData` of made-up runs.

The references share the stages' input checks (the private ``_int``, ``_check_pairs``... of
:mod:`conceptevo.neuron_embedding`, ``_prepare`` of :mod:`conceptevo.importance`) so that
they accept and refuse exactly what the fast paths do; this module is the only place that
imports another module's private names, on purpose.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapter import EvalMode, LayerSpec, ModelAdapter, model_device_dtype
from .importance import Sensitivities, _prepare, importance_table
from .neuron_embedding import (
    _LANES,
    MAX_NEGATIVES,
    EmbeddingResult,
    _check_diverged,
    _check_init,
    _check_pairs,
    _int,
    _real,
    negative_table,
)
from .pairs import validate_stimuli
from .report import ReportData

__all__ = ["numpy_reference_train", "build_pairs_reference", "importance_loop", "synthetic_report_data"]


# ------------------------------------------------------------------ neuron embedding (Step 1.3)
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_TAG_INIT, _TAG_SHUFFLE, _TAG_NEG = 1, 2, 3  # csrc/sgns.cpp stream tags


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _stream_at(state: int, k: int) -> int:
    return _mix64((state + (k + 1) * _GOLDEN) & _MASK)


def _stream_key(seed: int, tag: int, epoch: int) -> int:
    return _mix64((_mix64((_mix64(seed) + tag) & _MASK) + epoch) & _MASK)


def _below(x: int, n: int) -> int:
    return ((x >> 32) * n) >> 32


_INV_LN2 = float.fromhex("0x1.71547652b82fep+0")
_LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
_SHIFT = float.fromhex("0x1.8p52")
# 1/9!, 1/8!, ..., 1/2, 1, 1: Horner coefficients of the degree-9 Taylor polynomial.
_TAYLOR = [1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0,
           0.5, 1.0, 1.0]


def _exp_nonpos(y: float) -> float:
    """exp(y) for y <= 0 with the exact double operations of csrc/sgns.cpp exp_nonpos."""
    if math.isnan(y):
        return math.nan
    y = max(y, -700.0)
    t = y * _INV_LN2 + _SHIFT
    kd = t - _SHIFT
    r = (y - kd * _LN2_HI) - kd * _LN2_LO
    p = r * _TAYLOR[0] + _TAYLOR[1]
    for c in _TAYLOR[2:]:
        p = p * r + c
    return p * math.ldexp(1.0, int(kd))


def _sigmoid(x: np.float32) -> np.float32:
    """float32 sigmoid of a float32 dot product, as the C++ computes it."""
    xd = float(x)
    e = _exp_nonpos(xd if xd < 0.0 else -xd)
    return np.float32((1.0 if xd >= 0.0 else e) / (1.0 + e))


def _dot(x: np.ndarray, y: np.ndarray) -> np.float32:
    """Eight float32 lanes summed block by block, then a fixed tree (see csrc/sgns.cpp)."""
    prod = (x * y).reshape(-1, _LANES)
    acc = np.zeros(_LANES, dtype=np.float32)
    for row in prod:
        acc = acc + row
    h = acc[:4] + acc[4:]
    q = h[:2] + h[2:]
    return q[0] + q[1]


def numpy_reference_train(
    pairs: np.ndarray,
    num_neurons: int,
    dim: int = 30,
    lr: float = 0.05,
    negatives: int = 3,
    epochs: int = 10,
    seed: int = 0,
    lr_decay: bool = False,
    neg_dist: str | np.ndarray = "uniform",
    tol: float = 0.0,
    *,
    update_negatives: bool = False,
    shuffle: bool = True,
    init: np.ndarray | None = None,
    init_range: float = 0.5,
) -> EmbeddingResult:
    """The trainer in plain NumPy, one pair at a time (slow; the test oracle).

    Same arguments and result as :func:`train` with ``threads=1``, and the same
    bits: float32 element-wise ops in the same order, the dot products summed in
    the same eight-lane order, the same splitmix64 streams (Python integers) and
    the same double-precision polynomial ``exp``. Losses (computed here with
    ``np.logaddexp``) and gradient norms agree to rounding.
    """
    num_neurons = _int("num_neurons", num_neurons, 1, 2**31 - 1)
    pairs32 = _check_pairs(pairs, num_neurons)
    dim = _int("dim", dim, 1, 65536)
    negatives = _int("negatives", negatives, 0, MAX_NEGATIVES)
    epochs = _int("epochs", epochs, 0)
    seed = _int("seed", seed, 0, 2**64 - 1)
    lr = _real("lr", lr, positive=True)
    tol = _real("tol", tol, positive=False)
    init_range = _real("init_range", init_range, positive=True)
    init = _check_init(init, num_neurons, dim)
    table = negative_table(neg_dist, pairs32, num_neurons)
    n, R, P = num_neurons, negatives, pairs32.shape[0]
    dp = -(-dim // _LANES) * _LANES

    W = np.zeros((n, dp), dtype=np.float32)
    if init is not None:
        W[:, :dim] = init
    else:
        key = _stream_key(seed, _TAG_INIT, 0)
        scale, two, one = np.float32(init_range), np.float32(2), np.float32(1)
        step = np.float32(1.0 / 16777216.0)
        for i in range(n):
            for d in range(dim):
                u = np.float32(_stream_at(key, i * dim + d) >> 40) * step
                W[i, d] = scale * (two * u - one)

    work = [tuple(p) for p in pairs32.tolist()]
    losses: list[float] = []
    grads: list[float] = []
    start = time.perf_counter()
    for e in range(epochs):
        if shuffle:
            key = _stream_key(seed, _TAG_SHUFFLE, e)
            for i in range(P - 1, 0, -1):
                j = _below(_stream_at(key, P - 1 - i), i + 1)
                work[i], work[j] = work[j], work[i]
        neg_state = _stream_key(seed, _TAG_NEG, e)
        loss_sum = grad_sum = 0.0
        for i, (a, b) in enumerate(work):
            if lr_decay:
                done = float(e * P + i) / float(epochs * P)
                lr_t = np.float32(lr * max(1e-4, 1.0 - done))
            else:
                lr_t = np.float32(lr)
            negs = []
            for j in range(R):
                x = _stream_at(neg_state, i * R + j)
                c = _below(x, n)
                if table is not None and (x & 0xFFFFFFFF) >= int(table[0][c]):
                    c = int(table[1][c])
                negs.append(c)
            va, vb = W[a].copy(), W[b].copy()
            s = _dot(va, vb)
            gp = _sigmoid(s) - np.float32(1)
            ga, gb = gp * vb, gp * va
            loss = float(np.logaddexp(0.0, -float(s)))
            gr = []
            for r in negs:
                vr = W[r].copy()
                da, db = _dot(vr, va), _dot(vr, vb)
                sa, sb = _sigmoid(da), _sigmoid(db)
                ga = ga + sa * vr
                gb = gb + sb * vr
                gr.append(sa * va + sb * vb)
                loss += float(np.logaddexp(0.0, float(da)) + np.logaddexp(0.0, float(db)))
            updates = [(a, ga), (b, gb)] + (list(zip(negs, gr)) if update_negatives else [])
            g2 = 0.0
            for row, g in updates:
                W[row] = W[row] - lr_t * g
                g2 += float(np.sum(g.astype(np.float64) ** 2))
            loss_sum += loss
            grad_sum += math.sqrt(g2)
        losses.append(loss_sum / P)
        grads.append(grad_sum / P)
        if not (math.isfinite(losses[-1]) and math.isfinite(grads[-1])):
            break
        if tol > 0 and grads[-1] < tol:
            break
    elapsed = time.perf_counter() - start
    losses_a, grads_a = np.array(losses), np.array(grads)
    _check_diverged(losses_a, grads_a, lr)
    return EmbeddingResult(
        vectors=np.ascontiguousarray(W[:, :dim]),
        losses=losses_a,
        grad_norms=grads_a,
        epochs_run=len(losses),
        pairs_per_second=len(losses) * P / elapsed if losses and elapsed > 0 else float("nan"),
        params=dict(dim=dim, lr=lr, negatives=negatives, epochs=epochs, seed=seed, lr_decay=bool(lr_decay),
                    neg_dist=neg_dist if isinstance(neg_dist, str) else "weights", tol=tol,
                    update_negatives=bool(update_negatives), shuffle=bool(shuffle), init_range=init_range,
                    threads=1),
    )


# ------------------------------------------------------------------ pairs (Step 1.2)
def build_pairs_reference(
    neuron_stimuli: np.ndarray, num_images: int, repeats: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python definition of Step 1.2 (the test oracle; slow).

    Same row order as :func:`build_pairs` but its own random stream
    (``random.Random(seed)``), so the two agree as multisets of per-image paths,
    not row by row. Returns ``(pairs int32 (P, 2), images int64 (P,))``; unlike
    :func:`build_pairs` it returns empty arrays instead of raising when there are
    no pairs.
    """
    stim = validate_stimuli(neuron_stimuli, num_images)
    by_image: dict[int, list[int]] = {}
    for neuron, row in enumerate(stim.tolist()):
        for img in row:
            if img >= 0:
                by_image.setdefault(img, []).append(neuron)
    rnd = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    imgs: list[int] = []
    for _ in range(repeats):
        for img in sorted(by_image):
            neurons = list(by_image[img])
            rnd.shuffle(neurons)
            for a, b in zip(neurons[:-1], neurons[1:]):
                pairs.append((a, b))
                imgs.append(img)
    return np.array(pairs, dtype=np.int32).reshape(-1, 2), np.array(imgs, dtype=np.int64)


# ------------------------------------------------------------------ importance (Eq. 2-4)
def importance_loop(
    model_t: nn.Module | ModelAdapter,
    model_t2: nn.Module | ModelAdapter,
    data,
    classes: Sequence[int] | None = None,
    layers: LayerSpec = None,
    device: str | torch.device | None = None,
    max_images_per_class: int | None = None,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    return_scores: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Sensitivities]:
    """Plain reference of :func:`evolution_importance` (same arguments, same table).

    One image at a time: forward both models, ``torch.autograd.grad`` of the image's
    class logit w.r.t. each layer's output, then for each neuron build the full-size
    ``Delta Z`` of Eq. 2 (zeros except that neuron's map) and take its dot product with
    the gradient (Eq. 3). Slow by design.
    """
    data, ad_t, ad_t2, labels_all, idx, cls = _prepare(
        model_t, model_t2, data, classes, layers, max_images_per_class, seed, indices, device
    )
    dev, dtype = model_device_dtype(ad_t.model)
    names = ad_t.layer_names
    per_image: dict[str, list[list[float]]] = {n: [] for n in names}
    with EvalMode(ad_t.model, ad_t2.model):
        for i in idx:
            x = torch.as_tensor(data[int(i)][0])[None].to(dev, dtype)
            c = int(labels_all[i])

            zt2: dict[str, torch.Tensor] = {}
            with torch.no_grad(), ad_t2.hooks(lambda n, o: zt2.__setitem__(n, o.clone())):
                ad_t2.model(x)

            zt: dict[str, torch.Tensor] = {}

            def keep(n: str, o: torch.Tensor) -> torch.Tensor:
                zt[n] = o
                return o.clone()

            with torch.enable_grad(), ad_t.hooks(keep):
                logit = ad_t.model(x.detach().requires_grad_(True))[0, c]
                for name in names:
                    (grad,) = torch.autograd.grad(logit, zt[name], retain_graph=True, allow_unused=True)
                    if grad is None:
                        grad = torch.zeros_like(zt[name])
                    row = []
                    for n in range(ad_t.channels[name]):
                        delta = torch.zeros_like(zt[name])
                        delta[:, n] = zt2[name][:, n] - zt[name].detach()[:, n]
                        row.append(float((grad * delta).sum()))
                    per_image[name].append(row)

    lut = {c: k for k, c in enumerate(cls)}
    rows = np.array([lut[int(v)] for v in labels_all[idx]], dtype=np.int64)
    totals = np.bincount(rows, minlength=len(cls))
    pos, sums, scores = {}, {}, {}
    for name in names:
        S = np.asarray(per_image[name], dtype=np.float64).reshape(len(idx), ad_t.channels[name])
        p = np.zeros((len(cls), S.shape[1]), np.int64)
        s = np.zeros((len(cls), S.shape[1]), np.float64)
        for r, srow in zip(rows, S):
            p[r] += srow > 0
            s[r] += srow
        pos[name], sums[name], scores[name] = p, s, S
    df = importance_table(cls, ad_t, pos, totals, sums)
    if return_scores:
        return df, Sensitivities(ids=idx.copy(), labels=labels_all[idx].copy(), scores=scores)
    return df


# ------------------------------------------------------------------ report data
def synthetic_report_data(
    runs: Sequence[str] = ("well_trained", "high_lr", "overfit"),
    epochs: Sequence[int] | Mapping[str, Sequence[int]] = (0, 1, 2, 4, 8, 16),
    layers: Sequence[tuple[str, int]] = (("features.0", 32), ("features.3", 64), ("features.7", 96),
                                         ("features.10", 108)),
    k: int = 5,
    num_images: int = 400,
    image_size: int = 32,
    neighbours: int = 5,
    classes: Sequence[str] = ("circle", "square", "stripes"),
    seed: int = 0,
) -> ReportData:
    """A complete ReportData of made-up runs (for tests, demos and size checks).

    Images are procedural (coloured shapes on noise), stimuli random, receptive
    fields those of a plain 3x3-conv/2x2-pool stack, patches made with
    :func:`conceptevo.patches.report_patches`, coordinates drift with the epoch.
    ``epochs`` is shared by every run, or a mapping run -> its own saved epochs.
    """
    run_epochs = {r: list(epochs[r] if isinstance(epochs, Mapping) else epochs) for r in runs}
    from .patches import ArrayImages, ReceptiveField, report_patches

    rng = np.random.default_rng(seed)
    n = image_size
    yy, xx = np.mgrid[0:n, 0:n]
    imgs = np.empty((num_images, n, n, 3), np.uint8)
    for i in range(num_images):
        base = rng.integers(0, 60, size=(n, n, 1)) + rng.integers(0, 120, size=3)
        cy, cx, r = rng.uniform(6, n - 6), rng.uniform(6, n - 6), rng.uniform(3, n / 3)
        kind = i % 3
        if kind == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        elif kind == 1:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        else:
            mask = ((xx + yy) // max(2, int(r / 2))) % 2 == 0
        img = np.clip(base, 0, 255).astype(np.uint8)
        img[mask] = rng.integers(100, 256, size=3)
        imgs[i] = img
    images = ArrayImages(imgs)
    rfs, size, jump, start = {}, 1, 1.0, 0.0
    for name, _ in layers:  # conv3x3 (pad 1) then pool 2x2 for every layer after the first
        size += 2 * int(jump)
        rfs[name] = ReceptiveField((size, size), (jump, jump), (start, start))
        size, start, jump = size + int(jump), start + 0.5 * jump, jump * 2
    spatial_of = {name: max(1, n // int(rfs[name].jump[0])) for name, _ in layers}

    tags = ["red", "round", "stripy", "edge", "dark"]
    rows, stim = [], {}
    centres = {name: rng.normal(size=(c, 2)) * 3 + li * 2.0 for li, (name, c) in enumerate(layers)}
    for ri, run in enumerate(runs):
        for ei, ep in enumerate(run_epochs[run]):
            for name, c in layers:
                drift = rng.normal(scale=0.15 * (1 + ri), size=(c, 2)) * ei
                xy = centres[name] + drift + (ri - 1) * 0.5
                ids = np.stack([rng.choice(num_images, k, replace=False) for _ in range(c)])
                ids[rng.random((c, k)) < 0.05] = -1  # a few empty slots, as with tiny datasets
                sp = spatial_of[name]
                stim[(run, ep, name)] = _Stim(ids, rng.integers(0, sp, (c, k)), rng.integers(0, sp, (c, k)))
                for ch in range(c):
                    rows.append((run, ep, name, ch, xy[ch, 0], xy[ch, 1], tags[rng.integers(len(tags))],
                                 float(rng.random())))
    points = pd.DataFrame(rows, columns=["model", "epoch", "layer", "channel", "x", "y", "tag_concept", "importance"])
    patches = report_patches(images, stim, rfs, thumb=32, max_per_neuron=k)

    xy = points[["x", "y"]].to_numpy()
    keys = [(str(m), int(e), str(la), int(c)) for m, e, la, c in points[["model", "epoch", "layer", "channel"]].itertuples(index=False)]
    nb = {}
    for i in range(len(points)):
        cand = rng.choice(len(points), min(60, len(points)), replace=False)
        d = np.linalg.norm(xy[cand] - xy[i], axis=1)
        order = np.argsort(d)[:neighbours]
        nb[keys[i]] = [(keys[cand[j]], float(d[j])) for j in order if cand[j] != i]

    acc, diag = [], []
    speed = {"overfit": 0.3, "high_lr": 1.4}
    for ri, run in enumerate(runs):
        for ei, ep in enumerate(run_epochs[run]):
            top1 = min(0.95, 0.1 + 0.8 * (1 - math.exp(-ep / 4)))
            top1 *= 0.3 if run == "high_lr" and ei > 2 else 1
            acc.append((run, ep, min(1, top1 * (1.2 if run == "overfit" else 1.05)),
                        min(1, top1 * 1.3 + 0.1), top1, min(1, top1 * 1.25 + 0.1)))
            growth = {"overfit": 0.03, "high_lr": -0.52}.get(run, 0.08)
            diversity = 1.6 + growth * ei
            diag.append((run, ep, diversity,
                         float("nan") if ei == 0 else speed.get(run, 1) / (1 + ei)))
    evo, epochs = [], run_epochs[runs[0]]
    for cls in classes if len(epochs) > 1 else ():  # an evolution needs two epochs
        for _ in range(12):
            name, c = layers[rng.integers(len(layers))]
            t = int(rng.integers(len(epochs) - 1))
            evo.append((cls, runs[0], name, int(rng.integers(c)), epochs[t], epochs[t + 1],
                        float(rng.random())))
    rev = []
    for metric in ("train top-1", "test top-1"):
        bins = ("0-25%", "25-50%", "50-75%", "75-100%", "random")
        for b, dlt in zip(bins, (-0.3, -0.15, -0.07, 0.01, -0.1)):
            rev.append((b, metric, dlt + rng.normal(scale=0.01), 0.01))
    return ReportData(
        points=points, patches=patches, neighbours=nb,
        accuracy=pd.DataFrame(acc, columns=["run", "epoch", "train_top1", "train_top5", "test_top1", "test_top5"]),
        diagnostics=pd.DataFrame(diag, columns=["run", "epoch", "diversity", "movement"]),
        verdicts={runs[0]: "concept diversity grows: training looks healthy.",
                  runs[min(1, len(runs) - 1)]: "concept diversity collapses after epoch 2: the learning rate "
                                                "is likely too high."},
        evolutions=pd.DataFrame(evo, columns=["class", "model", "layer", "channel", "t", "t_prime", "score"]) if evo else None,
        reversion=pd.DataFrame(rev, columns=["bin", "metric", "delta", "std"]),
        title="ConceptEvo report (synthetic data)",
        facts={"dataset": f"synthetic, {num_images} images", "runs": ", ".join(runs)},
        layer_order=[name for name, _ in layers],
    )


@dataclass
class _Stim:
    ids: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

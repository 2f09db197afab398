"""The unified semantic space (paper Steps 1.2-2.2) and the queries on it.

:class:`UnifiedSpace` is the one object with real state in the pipeline::

    space = UnifiedSpace.fit(base_stimuli, model="vgg", epoch=30)   # pairs -> SGNS -> image vectors
    space.add("vgg", 5, stimuli_epoch5)                             # project another checkpoint
    space.add("vgg_nodrop", 30, other_stimuli)
    xy = space.layout_2d()                                          # ONE UMAP over every checkpoint
    space.neighbors(("vgg", 30, "features.10", 7), k=10)            # FAISS kNN
    labels = space.groups(12)                                       # FAISS k-means
    space.to_parquet("embeddings.parquet"); space.save("space/"); UnifiedSpace.load("space/")

Rows. Every registered checkpoint contributes one row per neuron, in registration
order and, inside a checkpoint, in flat neuron order (layers in model order,
channels ascending). A row is addressed by its index or by its key
``(model, epoch, layer, channel)``. The base checkpoint is registered by
:meth:`UnifiedSpace.fit` with the neuron vectors learned in Step 1.3 (as in the
paper); every other checkpoint with projected vectors (Step 2.2).

Dead neurons. A neuron without any valid stimulus has a NaN vector (see
:mod:`conceptevo.image_embedding`); it keeps its row (so tables line up with the
model) but is left out of UMAP, kNN and k-means, where its 2-D position and group
are NaN / -1. :meth:`UnifiedSpace.summary` counts them.

Backends. UMAP runs on umap-learn (CPU) or cuML (CUDA), FAISS on faiss-cpu or
faiss-gpu, chosen by :func:`conceptevo.backends.select` (``backend="auto"`` picks
the GPU library when it imports and a CUDA device is visible). The choice is
recorded in ``space.backends``. umap-learn with a fixed seed runs single-threaded
(that is what makes it reproducible): about 50 s for 20,000 points on two cores;
``seed=None`` lets it use every core (about 3x faster, not reproducible).

Files. :meth:`save` writes a folder of ``.npy`` arrays, one Parquet table of row
keys and a JSON document (no pickle anywhere); :meth:`to_parquet` writes the
single analysis table (model, epoch, layer, channel, neuron, vector, x, y).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import image_embedding
from .errors import BackendError, EmbeddingError

__all__ = ["UnifiedSpace", "stimuli_arrays", "holdout_error", "LAYOUT_FULL_FIT_MAX_ROWS", "LAYOUT_SAMPLE_ROWS"]

# Above this many live rows umap-learn is fitted on a sample and the rest transformed (see layout_2d):
# one seeded single-threaded fit costs about 3 min at 100k rows on two cores and grows faster than linearly;
# 30k sampled rows keep the fit near a minute and a half, whatever the number of checkpoints.
LAYOUT_FULL_FIT_MAX_ROWS = 50_000
LAYOUT_SAMPLE_ROWS = 30_000

_FORMAT = 1
_KEY_COLUMNS = ["model", "epoch", "layer", "channel", "neuron"]


# --------------------------------------------------------------------------- inputs
@dataclass
class _Checkpoint:
    """One registered checkpoint: its neurons' keys, stimuli and vectors."""

    model: str
    epoch: int
    layers: np.ndarray  # str (m,)
    channels: np.ndarray  # int64 (m,)
    stimuli: np.ndarray  # int64 (m, k), -1 = empty
    vectors: np.ndarray  # float32 (m, d), NaN rows = no valid stimulus
    source: str  # "learned" (the base) or "projected"


def stimuli_arrays(
    stimuli: Any, num_images: int | None = None, *, responsive: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Unpack a :class:`conceptevo.stimuli.Stimuli` (or a plain ``(m, k)`` id array).

    Returns ``(neuron_stimuli int64 (m, k), layer str (m,), channel int64 (m,),
    num_images, responsive flat ids (N, r) or None)``. A plain array has layer ``""``
    and channel = row, and needs ``num_images`` (else the largest id + 1 is used).
    ``responsive=False`` skips the responsive ids (only the base fit needs them).
    """
    if isinstance(stimuli, np.ndarray) or not hasattr(stimuli, "layers"):
        arr = np.asarray(stimuli)
        if arr.ndim != 2 or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise EmbeddingError(
                "stimuli must be a conceptevo.stimuli.Stimuli or an int (neurons, k) array of image ids, "
                f"got {type(stimuli).__name__} with shape {getattr(arr, 'shape', None)}"
            )
        n_img = int(num_images) if num_images is not None else int(arr.max(initial=-1)) + 1
        m = arr.shape[0]
        return arr.astype(np.int64), np.full(m, "", dtype=object), np.arange(m, dtype=np.int64), n_img, None

    layers = stimuli.layers
    if not layers:
        raise EmbeddingError("stimuli have no layers")
    n_img = int(stimuli.num_images)
    if num_images is not None and int(num_images) != n_img:
        raise EmbeddingError(f"num_images={num_images} disagrees with the stimuli's num_images={n_img}")
    names, chans, blocks, resp, offsets, off = [], [], [], {}, {}, 0
    widths = {np.asarray(ls.ids).shape[1] for ls in layers.values()}
    k = max(widths)
    for name, ls in layers.items():
        ids = np.asarray(ls.ids, dtype=np.int64)
        if ids.shape[1] < k:  # layers extracted with different k: pad with empty slots
            ids = np.concatenate([ids, np.full((ids.shape[0], k - ids.shape[1]), -1, np.int64)], axis=1)
        blocks.append(ids)
        names.append(np.full(ids.shape[0], name, dtype=object))
        chans.append(np.arange(ids.shape[0], dtype=np.int64))
        offsets[name] = off
        off += ids.shape[0]
        r = getattr(ls, "responsive", None) if responsive else None
        if r is not None and np.asarray(r).size:
            resp[name] = np.asarray(r)
    flat_resp = image_embedding.responsive_to_flat(resp, offsets) if resp else None
    return np.concatenate(blocks), np.concatenate(names), np.concatenate(chans), n_img, flat_resp


def holdout_error(
    neuron_stimuli: np.ndarray,
    neuron_vectors: np.ndarray,
    num_images: int,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    ridge: float = image_embedding.DEFAULT_RIDGE,
    responsive: np.ndarray | None = None,
    backend: str = "auto",
    fitted_vectors: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """Held-out error of the image embedding (Step 2.1) as seen by the projection (Step 2.2).

    A random ``fraction`` of the base neurons that have stimuli (at least one) is left out:
    their equations are dropped from the least-squares fit, and they do not place the
    images no base neuron chose. They are then projected with the resulting image vectors,
    exactly as a neuron of another checkpoint would be, and compared with their learned
    vectors. Returns ``rmse`` (over the held-out neurons, all dimensions), ``rel_rmse``
    (rmse / rms of their learned vectors: 0 = they land on their vectors, about 1 = no
    better than the origin), ``n_neurons``, ``fraction``, ``seed``, ``neurons`` (the
    held-out base rows) and, when
    ``fitted_vectors`` (the image vectors of the full fit) are given,
    ``in_sample_rmse`` of the same neurons under the full fit, for comparison. ``None``
    when fewer than 10 base neurons have stimuli (too few to leave any out).
    """
    if not (0.0 < float(fraction) < 1.0):
        raise EmbeddingError(f"holdout must be a fraction in (0, 1) (or 0 to skip it), got {fraction!r}")
    stim = np.asarray(neuron_stimuli, dtype=np.int64)
    v = np.asarray(neuron_vectors)
    alive = np.flatnonzero((stim >= 0).any(axis=1))
    if alive.size < 10:
        return None
    n_out = max(1, int(round(fraction * alive.size)))
    held = np.sort(np.random.default_rng([int(seed), 0x401D]).choice(alive, size=n_out, replace=False))
    kept = stim.copy()
    kept[held] = -1  # no equation; and, without stimuli, no vote for unconstrained images
    u_h, _ = image_embedding.fit(kept, v, num_images, ridge=ridge, responsive=responsive, backend=backend)
    pred = image_embedding.project(stim[held], u_h).astype(np.float64)
    target = v[held].astype(np.float64)
    rmse = float(np.sqrt(np.mean((pred - target) ** 2)))
    scale = float(np.sqrt(np.mean(target**2)))
    out: dict[str, Any] = {"rmse": rmse, "rel_rmse": rmse / scale if scale > 0 else 0.0, "n_neurons": int(n_out),
                           "fraction": float(fraction), "seed": int(seed), "neurons": held.tolist()}
    if fitted_vectors is not None:
        full = image_embedding.project(stim[held], fitted_vectors).astype(np.float64)
        out["in_sample_rmse"] = float(np.sqrt(np.mean((full - target) ** 2)))
    return out


def _as_str_array(values: Iterable[Any]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


# --------------------------------------------------------------------------- backends
def _faiss_module(gpu: bool):
    """The ``faiss`` module; with ``gpu`` a check that it has GPU support (else :class:`BackendError`)."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise BackendError("faiss is not installed (pip install faiss-cpu)") from exc
    if gpu and not hasattr(faiss, "StandardGpuResources"):
        raise BackendError("faiss-gpu was selected but the installed faiss has no GPU support")
    return faiss


def _faiss_backend(prefer: str) -> str:
    from .backends import select

    return select("faiss", prefer)


def _flat_index(x: np.ndarray, metric: str, backend: str):
    faiss = _faiss_module(backend == "faiss-gpu")
    d = x.shape[1]
    index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if backend == "faiss-gpu":  # pragma: no cover - needs a GPU
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._conceptevo_res = res  # keep the resources alive as long as the index
    index.add(x)
    return index


def _umap_impl(x: np.ndarray, *, backend: str, seed: int | None, n_neighbors: int, min_dist: float,
               metric: str, n_epochs: int | None, keep_model: bool = False) -> Any:
    """2-D UMAP of ``x`` with cuML (``backend="cuml"``) or umap-learn (``"umap-learn"``)."""
    if backend == "cuml":  # pragma: no cover - needs a GPU
        from cuml.manifold import UMAP as CuUMAP

        kw = {} if n_epochs is None else {"n_epochs": n_epochs}
        model = CuUMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                       random_state=seed, **kw)
        out = model.fit_transform(x)
        return np.asarray(out.get() if hasattr(out, "get") else out, dtype=np.float32)
    import warnings

    import umap

    kw: dict[str, Any] = {"n_epochs": n_epochs}
    if seed is not None:
        kw.update(random_state=int(seed), n_jobs=1)  # umap-learn is reproducible only single-threaded
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        model = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, **kw)
        y = np.asarray(model.fit_transform(x), dtype=np.float32)
    return (y, model) if keep_model else y


def _umap_transform(model: Any, x: np.ndarray) -> np.ndarray:
    """umap-learn's ``transform`` of new rows into a fitted map."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        return np.asarray(model.transform(x), dtype=np.float32)


def _knn_place(x_fit: np.ndarray, y_fit: np.ndarray, x_new: np.ndarray, k: int) -> np.ndarray:
    """New rows at the weighted mean of the 2-D positions of their ``k`` nearest fitted rows.

    Weights are UMAP's fuzzy memberships ``exp(-(d - d_1) / sigma)`` (``d_1`` the nearest
    distance, ``sigma`` the mean gap to it), i.e. umap-learn's own initialisation of
    ``transform`` without its optimisation epochs. Exact FAISS search, multithreaded, deterministic.
    """
    faiss = _faiss_module(False)
    index = faiss.IndexFlatL2(x_fit.shape[1])
    index.add(np.ascontiguousarray(x_fit, np.float32))
    k = max(1, min(int(k), len(x_fit)))
    out = np.empty((len(x_new), 2), np.float32)
    for s in range(0, len(x_new), 65536):
        d2, pos = index.search(np.ascontiguousarray(x_new[s:s + 65536], np.float32), k)
        d = np.sqrt(np.maximum(d2, 0.0)).astype(np.float64)
        gap = d - d[:, :1]
        sigma = np.maximum(gap.mean(axis=1, keepdims=True), 1e-12)
        w = np.exp(-gap / sigma)
        w /= w.sum(axis=1, keepdims=True)
        out[s:s + 65536] = np.einsum("qk,qkc->qc", w, y_fit[pos].astype(np.float64))
    return out


def _water_fill(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Equal shares of ``budget`` over groups of ``sizes`` (a group never gets more than it has;
    what small groups leave goes to the others; the remainder one by one in order)."""
    quota = np.zeros(len(sizes), np.int64)
    open_ = np.ones(len(sizes), bool)
    budget = int(max(0, min(budget, int(sizes.sum()))))
    while budget > 0 and open_.any():
        share = budget // int(open_.sum())
        full = open_ & (sizes - quota <= share)
        if full.any():
            budget -= int((sizes[full] - quota[full]).sum())
            quota[full] = sizes[full]
            open_ &= ~full
            continue
        if share == 0:
            idx = np.flatnonzero(open_)[:budget]
            quota[idx] += 1
            break
        quota[open_] += share
        budget -= share * int(open_.sum())
    return quota


# --------------------------------------------------------------------------- the space
def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each next start is a row drawn with
    probability proportional to its squared distance to the nearest start already chosen."""
    starts = np.empty((k, x.shape[1]), dtype=np.float32)
    starts[0] = x[rng.integers(x.shape[0])]
    d2 = ((x - starts[0]) ** 2).sum(1, dtype=np.float64)
    for j in range(1, k):
        total = d2.sum()
        i = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
        starts[j] = x[i]
        d2 = np.minimum(d2, ((x - starts[j]) ** 2).sum(1, dtype=np.float64))
    return starts


class UnifiedSpace:
    """Image vectors + registered checkpoints; see the module docstring.

    Build one with :meth:`fit` (from base-model stimuli) or directly from image
    vectors (``UnifiedSpace(image_vectors)``) when those come from elsewhere.
    """

    def __init__(
        self,
        image_vectors: np.ndarray,
        *,
        base_vectors: np.ndarray | None = None,
        base_key: tuple[str, int] | None = None,
        info: dict | None = None,
        params: dict | None = None,
    ):
        u = np.asarray(image_vectors)
        if u.ndim != 2 or u.shape[0] == 0 or u.shape[1] == 0:
            raise EmbeddingError(
                f"image_vectors must be a non-empty (images, dim) array, got shape {u.shape}")
        if not np.isfinite(u).all():
            raise EmbeddingError("image_vectors contain NaN or inf")
        self.image_vectors = np.ascontiguousarray(u, dtype=np.float32)
        self.base_vectors = None if base_vectors is None else np.asarray(base_vectors, dtype=np.float32)
        self.base_key = None if base_key is None else (str(base_key[0]), int(base_key[1]))
        self.info: dict = dict(info or {})
        self.params: dict = dict(params or {})
        self.backends: dict[str, str] = {}
        self._ckpts: list[_Checkpoint] = []
        self._layout: np.ndarray | None = None
        self.layout_params: dict = {}
        self.group_centroids: np.ndarray | None = None  # set by groups()
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ build
    @classmethod
    def fit(
        cls,
        base: Any,
        *,
        num_images: int | None = None,
        dim: int = 30,
        repeats: int = 10,
        lr: float = 0.05,
        negatives: int = 3,
        epochs: int | None = None,
        seed: int = 0,
        threads: int | None = None,
        ridge: float = image_embedding.DEFAULT_RIDGE,
        solver_backend: str = "auto",
        model: str = "base",
        epoch: int = 0,
        holdout: float = 0.1,
        **train_kw: Any,
    ) -> UnifiedSpace:
        """Steps 1.2-2.1 on the base checkpoint's stimuli.

        ``base`` is a :class:`~conceptevo.stimuli.Stimuli` (responsive neurons then place
        the images the base never chose) or an int ``(n, k)`` id array with
        ``num_images``. ``repeats`` is ``E`` of Step 1.2; ``dim``, ``lr``, ``negatives``
        (``R``), ``epochs``, ``seed``, ``threads`` and any further keyword go to
        :func:`conceptevo.neuron_embedding.train`; ``ridge`` and ``solver_backend`` to
        :func:`conceptevo.image_embedding.fit`. The base is registered as ``(model, epoch)``
        with its learned vectors. Raises :class:`EmbeddingError` when the base's stimuli
        share no image (no co-activated pairs).

        Fit quality, in ``space.info``: ``image_embedding.rmse`` is the *in-sample* residual
        (the base neurons the image vectors were fitted to); ``holdout`` is the held-out
        error: a random ``holdout`` fraction of the base neurons (seeded by ``seed``) is left
        out of a second image-embedding fit, then projected with its image vectors like any
        other neuron, and ``holdout.rmse`` / ``holdout.rel_rmse`` measure how far they land
        from their learned vectors (see :func:`holdout_error`). ``holdout=0`` skips it.
        """
        from . import neuron_embedding, pairs  # imported here: sibling stages

        stim, layers, chans, n_img, responsive = stimuli_arrays(base, num_images)
        n = stim.shape[0]
        timings: dict[str, float] = {}
        t = time.perf_counter()
        try:
            d_pairs = pairs.build_pairs(stim, n_img, repeats=repeats, seed=seed)
        except ValueError as exc:
            raise EmbeddingError(f"base stimuli of {model!r} epoch {epoch}: {exc}") from exc
        timings["pairs"] = time.perf_counter() - t
        t = time.perf_counter()
        if epochs is not None:
            train_kw["epochs"] = epochs
        res = neuron_embedding.train(d_pairs, n, dim=dim, lr=lr, negatives=negatives, seed=seed,
                                     threads=threads, **train_kw)
        vectors = np.asarray(res.vectors if hasattr(res, "vectors") else res[0], dtype=np.float32)
        losses = np.asarray(res.losses if hasattr(res, "losses") else res[1], dtype=np.float64).ravel()
        timings["neuron_embedding"] = time.perf_counter() - t
        if not np.isfinite(vectors).all():
            raise EmbeddingError(
                f"neuron embedding of {model!r} epoch {epoch} diverged (NaN/inf); lower lr={lr}")
        u, fit_info = image_embedding.fit(stim, vectors, n_img, ridge=ridge, responsive=responsive,
                                          backend=solver_backend)
        timings["image_embedding"] = fit_info.seconds
        t = time.perf_counter()
        held = (holdout_error(stim, vectors, n_img, fraction=holdout, seed=seed, ridge=ridge,
                              responsive=responsive, backend=solver_backend, fitted_vectors=u)
                if holdout else None)
        timings["holdout"] = time.perf_counter() - t
        info = {
            "pairs": int(d_pairs.shape[0]),
            "neuron_embedding": {"final_loss": float(losses[-1]) if losses.size else None,
                                 "losses": losses.tolist()},
            "image_embedding": {**fit_info.to_dict(), "rmse_is": "in-sample: the base neurons the fit used"},
            "holdout": held,
            "seconds": timings,
        }
        params = {"dim": dim, "repeats": repeats, "lr": lr, "negatives": negatives, "epochs": epochs,
                  "seed": seed, "threads": threads, "ridge": ridge, "holdout": holdout,
                  **{k: _jsonable(v) for k, v in train_kw.items()}}
        space = cls(u, base_vectors=vectors, base_key=(model, epoch), info=info, params=params)
        space.backends["solve"] = fit_info.backend
        rows = vectors.copy()
        rows[~(stim >= 0).any(axis=1)] = np.nan  # no stimulus, untrained vector: dead, as when projected
        space._register(model, epoch, layers, chans, stim, rows, "learned")
        return space

    # ------------------------------------------------------------------ projection
    @property
    def dim(self) -> int:
        return int(self.image_vectors.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.image_vectors.shape[0])

    def project(self, stimuli: Any) -> np.ndarray:
        """Vectors ``(m, d)`` float32 of a checkpoint's neurons (Step 2.2); NaN rows for dead neurons."""
        stim, *_ = stimuli_arrays(stimuli, self.num_images, responsive=False)
        return image_embedding.project(stim, self.image_vectors)

    def add(self, model: str, epoch: int, stimuli: Any, *, replace: bool = False) -> np.ndarray:
        """Project a checkpoint and register it as ``(model, epoch)``; returns its row indices.

        Adding rows invalidates an earlier :meth:`layout_2d` (the map is one fit over all rows).
        """
        n_img = getattr(stimuli, "num_images", None)
        if n_img is not None and int(n_img) != self.num_images:
            raise EmbeddingError(
                f"stimuli of {model!r} epoch {epoch} index {n_img} images; this space has {self.num_images}"
            )
        stim, layers, chans, _, _ = stimuli_arrays(stimuli, self.num_images, responsive=False)
        vectors = image_embedding.project(stim, self.image_vectors)
        return self._register(model, epoch, layers, chans, stim, vectors, "projected", replace=replace)

    def _register(self, model, epoch, layers, chans, stim, vectors, source, replace=False) -> np.ndarray:
        model, epoch = str(model), int(epoch)
        for i, c in enumerate(self._ckpts):
            if (c.model, c.epoch) == (model, epoch):
                if not replace:
                    raise EmbeddingError(f"checkpoint ({model!r}, epoch {epoch}) is already registered; "
                                         "pass replace=True to overwrite it")
                if c.source == "learned":
                    # Re-adding the base's own stimuli (e.g. a loop over every checkpoint) keeps its
                    # learned vectors; other stimuli under the base's key would be a different base.
                    if c.stimuli.shape == np.shape(stim) and np.array_equal(c.stimuli, stim):
                        return np.arange(self._offsets()[i], self._offsets()[i + 1])
                    raise EmbeddingError(
                        f"({model!r}, epoch {epoch}) is the base checkpoint and these stimuli differ "
                        "from the ones it was fitted on; it cannot be replaced")
                del self._ckpts[i]
                break
        self._ckpts.append(_Checkpoint(model, epoch, _as_str_array(layers), np.asarray(chans, np.int64),
                                       np.asarray(stim, np.int64), np.asarray(vectors, np.float32), source))
        self._invalidate()
        start = self._offsets()[-2]
        return np.arange(start, start + len(vectors))

    def _invalidate(self) -> None:
        self._layout = None
        self.layout_params = {}
        self._cache.clear()

    # ------------------------------------------------------------------ rows
    def _offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(c.vectors) for c in self._ckpts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(sum(len(c.vectors) for c in self._ckpts))

    @property
    def checkpoints(self) -> list[tuple[str, int]]:
        """Registered ``(model, epoch)`` in registration (row) order."""
        return [(c.model, c.epoch) for c in self._ckpts]

    @property
    def vectors(self) -> np.ndarray:
        """All rows' vectors ``(M, d)`` float32 (NaN rows = dead neurons)."""
        if "vectors" not in self._cache:
            self._cache["vectors"] = (np.concatenate([c.vectors for c in self._ckpts]) if self._ckpts
                                      else np.zeros((0, self.dim), np.float32))
        return self._cache["vectors"]

    @property
    def valid(self) -> np.ndarray:
        """Bool ``(M,)``: rows that have a place in the space."""
        return image_embedding.valid_rows(self.vectors)

    def stimuli(self, model: str | None = None, epoch: int | None = None) -> np.ndarray:
        """The registered ``(m, k)`` stimuli of one checkpoint, or with no arguments of every row
        (``(M, k_max)``, shorter rows padded with ``-1``)."""
        if model is not None or epoch is not None:
            return self._ckpt(model, epoch).stimuli
        kmax = max([c.stimuli.shape[1] for c in self._ckpts], default=0)
        out = np.full((len(self), kmax), -1, np.int64)
        off = self._offsets()
        for i, c in enumerate(self._ckpts):
            out[off[i]:off[i + 1], : c.stimuli.shape[1]] = c.stimuli
        return out

    def _ckpt(self, model: str, epoch: int) -> _Checkpoint:
        for c in self._ckpts:
            if (c.model, c.epoch) == (str(model), int(epoch)):
                return c
        raise EmbeddingError(
            f"checkpoint ({model!r}, epoch {epoch}) is not registered; have {self.checkpoints}")

    def keys(self) -> Any:
        """DataFrame of row keys: model, epoch, layer, channel, neuron (flat id in its model), valid."""
        if "keys" not in self._cache:
            import pandas as pd

            cols: dict[str, list[np.ndarray]] = {k: [] for k in _KEY_COLUMNS}
            for c in self._ckpts:
                m = len(c.vectors)
                cols["model"].append(np.full(m, c.model, dtype=object))
                cols["epoch"].append(np.full(m, c.epoch, dtype=np.int64))
                cols["layer"].append(c.layers)
                cols["channel"].append(c.channels)
                cols["neuron"].append(np.arange(m, dtype=np.int64))
            empty = {k: np.zeros(0, object if k in ("model", "layer") else np.int64) for k in cols}
            df = pd.DataFrame({k: (np.concatenate(v) if v else empty[k]) for k, v in cols.items()})
            df["valid"] = self.valid
            self._cache["keys"] = df
        return self._cache["keys"].copy()

    def rows(self, model: str | Sequence[str] | None = None, epoch: int | Sequence[int] | None = None,
             layer: str | Sequence[str] | None = None) -> np.ndarray:
        """Row indices matching every given filter (a value or a list of values)."""
        return np.flatnonzero(self.mask({"model": model, "epoch": epoch, "layer": layer}))

    def mask(self, where: Any) -> np.ndarray:
        """Bool ``(M,)`` row mask from None (all rows), a dict of column filters such as
        ``{"model": "vgg", "epoch": [5, 10]}``, a bool mask or row indices."""
        m = len(self)
        if where is None:
            return np.ones(m, bool)
        if isinstance(where, dict):
            keys = self.keys()
            mask = np.ones(m, bool)
            for col, val in where.items():
                if val is None:
                    continue
                if col not in keys.columns or col == "valid":
                    raise EmbeddingError(f"unknown filter column {col!r}; use one of {_KEY_COLUMNS}")
                vals = list(val) if isinstance(val, (list, tuple, set, np.ndarray)) else [val]
                mask &= keys[col].isin(vals).to_numpy()
            return mask
        arr = np.asarray(where)
        if arr.dtype == np.bool_:
            if arr.shape != (m,):
                raise EmbeddingError(f"a boolean row mask must have shape ({m},), got {arr.shape}")
            return arr.copy()
        if not np.issubdtype(arr.dtype, np.integer):
            raise EmbeddingError(
                f"rows must be a dict filter, a bool mask or int row indices, got {arr.dtype}")
        out = np.zeros(m, bool)
        out[self._check_rows(arr.ravel())] = True
        return out

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        bad = (rows < 0) | (rows >= len(self))
        if bad.any():
            raise EmbeddingError(f"row {int(rows[bad][0])} is out of range; the space has {len(self)} rows")
        return rows

    def find(self, model: str, epoch: int, layer: str, channel: int) -> int:
        """Row index of the neuron ``(model, epoch, layer, channel)``."""
        c = self._ckpt(model, epoch)
        hit = np.flatnonzero((c.layers == str(layer)) & (c.channels == int(channel)))
        if hit.size == 0:
            layers = list(dict.fromkeys(c.layers.tolist()))
            raise EmbeddingError(
                f"({model!r}, epoch {epoch}) has no neuron layer={layer!r} channel={channel}; "
                f"layers: {layers}")
        start = self._offsets()[self._ckpts.index(c)]
        return int(start + hit[0])

    def _query_rows(self, query: Any) -> np.ndarray:
        if isinstance(query, tuple) and len(query) == 4 and isinstance(query[0], str):
            return np.array([self.find(*query)])
        if isinstance(query, (list, tuple)) and query and isinstance(query[0], tuple):
            return np.array([self.find(*q) for q in query])
        arr = np.atleast_1d(np.asarray(query))
        if arr.dtype == np.bool_:
            return np.flatnonzero(self.mask(arr))
        if not np.issubdtype(arr.dtype, np.integer):
            raise EmbeddingError(
                "query must be row indices, a (model, epoch, layer, channel) key or a list of keys")
        return self._check_rows(arr.ravel())

    # ------------------------------------------------------------------ tables
    def embeddings(self) -> Any:
        """DataFrame: model, epoch, layer, channel, neuron, vector (float32 array per row), valid, x, y.

        ``x``, ``y``: the last :meth:`layout_2d` (NaN before one and for dead neurons).
        """
        df = self.keys()
        df.insert(5, "vector", list(self.vectors))
        xy = self._layout if self._layout is not None else np.full((len(self), 2), np.nan, np.float32)
        df["x"] = xy[:, 0]
        df["y"] = xy[:, 1]
        return df

    def summary(self) -> dict[str, Any]:
        """Counts per checkpoint (rows, dead neurons) and the fit record."""
        valid = self.valid
        off = self._offsets()
        per = [{"model": c.model, "epoch": c.epoch, "source": c.source, "neurons": len(c.vectors),
                "dead": int((~valid[off[i]:off[i + 1]]).sum())} for i, c in enumerate(self._ckpts)]
        return {"dim": self.dim, "num_images": self.num_images, "rows": len(self),
                "dead": int((~valid).sum()), "checkpoints": per, "base": self.base_key,
                "backends": dict(self.backends), "image_embedding": self.info.get("image_embedding"),
                "holdout": self.info.get("holdout")}

    # ------------------------------------------------------------------ 2-D map
    def layout_2d(self, method: str = "umap", *, seed: int | None = 0, backend: str = "auto",
                  n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "euclidean",
                  n_epochs: int | None = None, full_fit_max_rows: int | None = None,
                  sample_rows: int | None = None, transform: str = "umap") -> np.ndarray:
        """2-D positions ``(M, 2)`` float32 of every row, from ONE fit over all checkpoints.

        ``method="umap"`` (the paper) or ``"pca"`` (fast, linear, for a quick look).
        Dead rows are left out of the fit and get NaN. The result is cached until
        :meth:`add` changes the rows; the backend used is in ``space.backends["umap"]``.

        Scale (umap-learn only; cuML always fits every row). Up to ``full_fit_max_rows``
        live rows (default :data:`LAYOUT_FULL_FIT_MAX_ROWS`) one UMAP fit over all of them,
        as the paper. Above it UMAP is fitted on a bounded sample of ``sample_rows`` rows
        (default :data:`LAYOUT_SAMPLE_ROWS`) that always holds the base checkpoint and is
        stratified over the other checkpoints (runs and epochs: equal shares, seeded), and
        every other row is placed by ``transform``: ``"umap"`` (default: umap-learn's
        ``transform``, which starts each new row at the weighted mean of its nearest
        sampled rows and refines it with optimisation epochs against the fixed sample) or
        ``"knn"`` (that start alone: the distance-weighted mean of the 2-D positions of its
        ``n_neighbors`` nearest sampled rows with UMAP's membership weights; exact FAISS
        search, multithreaded, several times faster). Measured on a 50k-neuron synthetic
        VGG16 run with a 10k sample (``benchmarks/bench_space_scale.py --quality``): the
        alignment lift in 2-D within / across epochs was 11.5 / 22.7 for a full fit,
        9.5 / 15.4 with ``"umap"`` and 6.4 / 10.7 with ``"knn"``; trustworthiness@10
        0.78, 0.82 and 0.71. What was done is in ``space.layout_params``
        (``description`` is one line for a report header).

        Reproducibility: with a ``seed`` umap-learn runs its fit single-threaded (that is
        what makes it reproducible); the sample is seeded, and both transforms are
        deterministic, so a seeded layout is the same run to run. ``seed=None`` lets
        umap-learn use every core (faster, not reproducible).
        """
        params = {"method": method, "seed": seed, "n_neighbors": n_neighbors, "min_dist": min_dist,
                  "metric": metric, "n_epochs": n_epochs}
        full_max = LAYOUT_FULL_FIT_MAX_ROWS if full_fit_max_rows is None else int(full_fit_max_rows)
        n_sample = LAYOUT_SAMPLE_ROWS if sample_rows is None else int(sample_rows)
        if transform not in ("umap", "knn"):
            raise EmbeddingError(f"unknown transform {transform!r}; use 'umap' or 'knn'")
        valid = self.valid
        n_live = int(valid.sum())
        sampled = method == "umap" and n_live > full_max
        if sampled:  # the sampling settings only matter (and only enter the cache key) above the threshold
            params.update(full_fit_max_rows=full_max, sample_rows=n_sample, transform=transform)
        if self._layout is not None and self.layout_params.get("params") == params:
            return self._layout.copy()
        x = np.ascontiguousarray(self.vectors[valid], dtype=np.float32)
        out = np.full((len(self), 2), np.nan, dtype=np.float32)
        t = time.perf_counter()
        extra: dict[str, Any] = {}
        if method == "pca":
            if x.shape[0] < 2:
                raise EmbeddingError(f"layout_2d needs at least 2 live neurons, have {x.shape[0]}")
            xc = x.astype(np.float64) - x.mean(axis=0)
            _, _, vt = np.linalg.svd(xc, full_matrices=False)
            comps = vt[:2]
            # SVD signs are arbitrary: make each component's largest coordinate positive (stable output).
            comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
            y = xc @ comps.T
            if y.shape[1] < 2:
                y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
            used = "numpy"
            desc = "PCA of every neuron"
        elif method == "umap":
            if x.shape[0] < 4:
                raise EmbeddingError(f"UMAP needs at least 4 live neurons, have {x.shape[0]}")
            from .backends import select

            used = select("umap", backend)
            nn = min(int(n_neighbors), x.shape[0] - 1)
            threads = "1 thread" if seed is not None else "all cores"
            if sampled and used != "cuml":
                live_rows = np.flatnonzero(valid)
                pick = self._layout_sample(valid, min(n_sample, n_live), seed)
                in_sample = np.isin(live_rows, pick)
                y = np.empty((x.shape[0], 2), np.float32)
                t_fit = time.perf_counter()
                y_s, model = _umap_impl(x[in_sample], backend=used, seed=seed, n_neighbors=nn,
                                        min_dist=min_dist, metric=metric, n_epochs=n_epochs, keep_model=True)
                t_fit = time.perf_counter() - t_fit
                y[in_sample] = y_s
                t_tr = time.perf_counter()
                rest = ~in_sample
                if rest.any():
                    y[rest] = (_umap_transform(model, x[rest]) if transform == "umap"
                               else _knn_place(x[in_sample], y_s, x[rest], nn))
                t_tr = time.perf_counter() - t_tr
                extra = {"sampled": True, "sample_rows": int(in_sample.sum()), "transformed_rows": int(rest.sum()),
                         "transform": transform, "fit_seconds": round(t_fit, 3),
                         "transform_seconds": round(t_tr, 3)}
                desc = (f"UMAP (umap-learn, seed {seed}, {threads}) fitted on {int(in_sample.sum()):,} sampled "
                        f"neurons (the base + equal shares of every checkpoint), the other {int(rest.sum()):,} "
                        f"placed by {'umap transform' if transform == 'umap' else 'kNN interpolation'}; "
                        f"one full fit up to {full_max:,} neurons")
            else:
                y = _umap_impl(x, backend=used, seed=seed, n_neighbors=nn, min_dist=min_dist, metric=metric,
                               n_epochs=n_epochs)
                desc = (f"UMAP ({used}, seed {seed}, {threads if used != 'cuml' else 'GPU'}) fitted on all "
                        f"{x.shape[0]:,} neurons" + (f"; sampled fit above {full_max:,}" if used != "cuml" else ""))
        else:
            raise EmbeddingError(f"unknown layout method {method!r}; use 'umap' or 'pca'")
        out[valid] = y
        self._layout = out
        self.backends["layout"] = used
        self.layout_params = {"params": params, "backend": used, "seconds": time.perf_counter() - t,
                              "rows": int(valid.sum()), "full_fit_max_rows": full_max,
                              "sample_rows_above_threshold": n_sample, "sampled": False,
                              **extra, "description": desc}
        return out.copy()

    def _layout_sample(self, valid: np.ndarray, size: int, seed: int | None) -> np.ndarray:
        """Sorted live rows for a sampled layout fit: the base checkpoint (all of it when it fits)
        plus equal seeded shares of every other checkpoint (smaller ones give their rest to others)."""
        rng = np.random.default_rng(0 if seed is None else seed)
        off = self._offsets()
        live = [np.flatnonzero(valid[off[i]:off[i + 1]]) + off[i] for i in range(len(self._ckpts))]
        base = [i for i, c in enumerate(self._ckpts) if c.source == "learned"]
        chosen, budget = [], int(size)
        for i in base:
            r = live[i] if live[i].size <= budget else np.sort(rng.choice(live[i], budget, replace=False))
            chosen.append(r)
            budget -= r.size
        others = [i for i in range(len(self._ckpts)) if i not in base]
        quota = _water_fill(np.array([live[i].size for i in others], np.int64), budget)
        for i, q in zip(others, quota):
            if q:
                chosen.append(live[i] if q >= live[i].size else np.sort(rng.choice(live[i], q, replace=False)))
        return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)

    @property
    def layout(self) -> np.ndarray | None:
        """The last :meth:`layout_2d` result, or None."""
        return None if self._layout is None else self._layout.copy()

    # ------------------------------------------------------------------ neighbours / groups
    def neighbour_graph(self, k: int = 10, *, method: str = "auto", backend: str = "auto",
                        exact_max_rows: int | None = None, recall_target: float | None = None,
                        recall_sample: int | None = None, seed: int = 0):
        """The ONE neighbour graph of this space (:class:`conceptevo.neighbours.NeighbourGraph`).

        Every live row's ``k`` nearest live rows (Euclidean, itself excluded): exact FAISS
        below ``exact_max_rows`` live rows, an approximate IVF index above it with its
        recall@k against the exact search measured on a sample (see
        :mod:`conceptevo.neighbours`). Computed once and cached until :meth:`add` changes
        the rows; a cached graph with at least ``k`` neighbours per row and the same
        method settings is returned as is (consumers slice the first ``k`` columns).
        :meth:`save` writes it beside the space.
        """
        from . import neighbours as nb_mod

        opts = {"method": method,
                "exact_max_rows": nb_mod.EXACT_MAX_ROWS if exact_max_rows is None else int(exact_max_rows),
                "recall_target": nb_mod.RECALL_TARGET if recall_target is None else float(recall_target),
                "recall_sample": nb_mod.RECALL_SAMPLE if recall_sample is None else int(recall_sample),
                "seed": int(seed)}
        g = self._cache.get("graph")
        if g is not None and g.k >= int(k) and self._cache.get("graph_opts") in (None, opts):
            if g._x is None:
                g.attach(self.vectors)
            return g
        used = _faiss_backend(backend)
        self.backends["faiss"] = used
        g = nb_mod.build_graph(self.vectors, int(k), backend=used, **opts)
        self._cache["graph"], self._cache["graph_opts"] = g, opts
        return g

    def neighbors(self, query: Any, k: int = 10, *, within: Any = None, metric: str = "l2",
                  backend: str = "auto", exclude_self: bool = True) -> Any:
        """The ``k`` nearest rows of each query row (exact FAISS search).

        ``query``: a row index or indices, a ``(model, epoch, layer, channel)`` key or a
        list of keys. ``within``: candidates — None (every live row), a dict filter
        such as ``{"model": "vgg", "epoch": [5, 10]}``, a bool mask or row indices.
        ``metric``: ``"l2"`` (Euclidean distance) or ``"cosine"`` (distance ``1 - cos``).
        Returns a DataFrame: query, rank (1..k), row, model, epoch, layer, channel,
        neuron, distance — sorted by (query order, distance). A query never lists
        itself when ``exclude_self``; fewer than ``k`` candidates give fewer rows.
        """
        import pandas as pd

        q_rows = self._query_rows(query)
        nb, dist, _ = self.knn(q_rows, k, within=within, metric=metric, backend=backend,
                               exclude_self=exclude_self)
        qi, slot = np.nonzero(nb >= 0)
        n_idx = nb[qi, slot]
        keys = self.keys().iloc[n_idx].reset_index(drop=True)
        out = pd.DataFrame({"query": q_rows[qi], "rank": slot + 1, "row": n_idx})
        for col in _KEY_COLUMNS:
            out[col] = keys[col].to_numpy()
        out["distance"] = dist[qi, slot]
        return out

    def knn(self, rows: np.ndarray, k: int, *, within: Any = None, metric: str = "l2", backend: str = "auto",
            exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Array form of :meth:`neighbors` for live query ``rows`` (exact FAISS search).

        Returns ``(neighbours int64 (q, k), distances float32 (q, k), counts int64 (q,))``:
        row indices sorted by distance, padded with ``-1`` / NaN past ``counts[i]``
        (fewer candidates than ``k``).
        """
        q_rows = self._check_rows(np.atleast_1d(np.asarray(rows)).ravel())
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise EmbeddingError(f"k must be an integer >= 1, got {k!r}")
        k = int(k)
        if metric not in ("l2", "cosine"):
            raise EmbeddingError(f"unknown metric {metric!r}; use 'l2' or 'cosine'")
        valid = self.valid
        if (~valid[q_rows]).any():
            bad = int(q_rows[~valid[q_rows]][0])
            raise EmbeddingError(f"query row {bad} ({self._describe(bad)}) is a dead neuron (no stimuli): "
                                 "it has no place in the space")
        out_rows = np.full((q_rows.size, k), -1, dtype=np.int64)
        out_dist = np.full((q_rows.size, k), np.nan, dtype=np.float32)
        cand = np.flatnonzero(self.mask(within) & valid)
        if cand.size == 0 or q_rows.size == 0:
            return out_rows, out_dist, np.zeros(q_rows.size, np.int64)
        used = _faiss_backend(backend)
        self.backends["faiss"] = used
        x = np.ascontiguousarray(self.vectors[cand], dtype=np.float32)
        q = np.ascontiguousarray(self.vectors[q_rows], dtype=np.float32)
        if metric == "cosine":
            x = _unit(x)
            q = _unit(q)
        index = _flat_index(x, metric, used)
        kk = min(k + (1 if exclude_self else 0), cand.size)
        score, pos = index.search(q, kk)
        found = np.where(pos >= 0, cand[np.clip(pos, 0, None)], -1)
        keep = found >= 0
        if exclude_self:
            keep &= found != q_rows[:, None]
        # first k kept entries per query (a query absent from the candidates keeps k of k+1)
        slot = np.cumsum(keep, axis=1) - 1
        keep &= slot < k
        qi, col = np.nonzero(keep)
        s = score[qi, col].astype(np.float64)
        dist = np.sqrt(np.maximum(s, 0.0)) if metric == "l2" else 1.0 - s
        out_rows[qi, slot[qi, col]] = found[qi, col]
        out_dist[qi, slot[qi, col]] = dist
        return out_rows, out_dist, keep.sum(axis=1).astype(np.int64)

    def groups(self, n_clusters: int, *, seed: int = 0, niter: int = 25, nredo: int = 3, within: Any = None,
               metric: str = "l2", backend: str = "auto") -> np.ndarray:
        """Concept groups: FAISS k-means over the live rows in ``within``.

        Returns int64 ``(M,)`` cluster labels, ``-1`` for dead rows and rows outside
        ``within``; the centroids are kept in ``space.group_centroids``. ``nredo`` runs
        of k-means from different seeded starts, the best (lowest inertia) kept. With
        ``metric="cosine"`` the vectors are normalised first (spherical k-means).
        """
        n_clusters = int(n_clusters)
        mask = self.mask(within) & self.valid
        x = np.ascontiguousarray(self.vectors[mask], dtype=np.float32)
        if n_clusters < 1 or n_clusters > x.shape[0]:
            raise EmbeddingError(f"n_clusters must be in [1, {x.shape[0]}] (live rows), got {n_clusters}")
        if metric == "cosine":
            x = _unit(x)
        used = _faiss_backend(backend)
        self.backends["faiss"] = used
        faiss = _faiss_module(used == "faiss-gpu")
        # k-means++ starts (FAISS starts from random rows, which on well-separated groups put two
        # centroids in one group and merged two others in 2% of planted test sets even with 3 redos);
        # FAISS then runs Lloyd's iterations from each start, the lowest objective is kept
        # (max_points_per_centroid covers every row: FAISS trains on all of them, no subsample)
        rng = np.random.default_rng(int(seed))
        per = max(256, math.ceil(x.shape[0] / n_clusters))
        best, best_obj = None, math.inf
        for r in range(max(1, int(nredo))):
            km = faiss.Kmeans(x.shape[1], n_clusters, niter=int(niter), nredo=1, seed=int(seed) + r, verbose=False,
                              spherical=metric == "cosine", gpu=used == "faiss-gpu", max_points_per_centroid=per)
            km.train(x, init_centroids=_kmeans_pp(x, n_clusters, rng))
            obj = float(km.obj[-1]) if len(km.obj) else math.inf
            if best is None or obj < best_obj:
                best, best_obj = km, obj
        _, assign = best.index.search(x, 1)
        labels = np.full(len(self), -1, dtype=np.int64)
        labels[mask] = assign[:, 0]
        self.group_centroids = np.asarray(best.centroids, dtype=np.float32).copy()
        return labels

    def _describe(self, row: int) -> str:
        k = self.keys().iloc[int(row)]
        return f"model={k['model']!r} epoch={k['epoch']} layer={k['layer']!r} channel={k['channel']}"

    # ------------------------------------------------------------------ files
    def _arrow_table(self, with_xy: bool = True):
        import pyarrow as pa

        keys = self.keys()
        vec = self.vectors
        values = pa.array(vec.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(len(vec) + 1, dtype=np.int64) * vec.shape[1], type=pa.int32())
        cols = {
            "model": pa.array(keys["model"].astype(str).tolist(), type=pa.string()),
            "epoch": pa.array(keys["epoch"].to_numpy(np.int64)),
            "layer": pa.array(keys["layer"].astype(str).tolist(), type=pa.string()),
            "channel": pa.array(keys["channel"].to_numpy(np.int64)),
            "neuron": pa.array(keys["neuron"].to_numpy(np.int64)),
            "vector": pa.ListArray.from_arrays(offsets, values),
        }
        if with_xy:
            xy = self._layout if self._layout is not None else np.full((len(self), 2), np.nan, np.float32)
            cols["x"] = pa.array(xy[:, 0].astype(np.float32))
            cols["y"] = pa.array(xy[:, 1].astype(np.float32))
        return pa.table(cols)

    def to_parquet(self, path: str | Path) -> Path:
        """One Parquet table: model, epoch, layer, channel, neuron, vector (list<float32>), x, y.

        ``x``/``y`` are NaN before :meth:`layout_2d` and for dead neurons.
        """
        import pyarrow.parquet as pq

        from .store import atomic_write

        table = self._arrow_table()
        return atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))

    def save(self, directory: str | Path) -> Path:
        """Write the space to ``directory`` (npy arrays, a Parquet key table, space.json)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .store import atomic_write, json_default

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)

        def npy(name: str, arr: np.ndarray) -> None:
            atomic_write(root / name, lambda tmp: np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False))

        npy("image_vectors.npy", self.image_vectors)
        if self.base_vectors is not None:
            npy("base_vectors.npy", self.base_vectors)
        npy("vectors.npy", self.vectors)
        off = self._offsets()
        npy("stimuli.npy", self.stimuli())
        if self._layout is not None:
            npy("layout.npy", self._layout)
        if self._cache.get("graph") is not None:
            self._cache["graph"].save(root)
        keys = self._arrow_table(with_xy=False).drop_columns(["vector"])
        keys = keys.append_column("source", pa.array(
            np.concatenate([np.full(len(c.vectors), c.source, dtype=object) for c in self._ckpts]).tolist()
            if self._ckpts else [], type=pa.string()))
        atomic_write(root / "keys.parquet", lambda tmp: pq.write_table(keys, tmp))
        doc = {
            "format": _FORMAT,
            "dim": self.dim,
            "num_images": self.num_images,
            "base_key": list(self.base_key) if self.base_key else None,
            "checkpoints": [{"model": c.model, "epoch": c.epoch, "rows": [int(off[i]), int(off[i + 1])],
                             "k": int(c.stimuli.shape[1]), "source": c.source}
                            for i, c in enumerate(self._ckpts)],
            "params": self.params,
            "info": self.info,
            "backends": self.backends,
            "layout_params": self.layout_params,
        }
        text = json.dumps(_json_clean(doc), indent=2, default=json_default, allow_nan=False)
        atomic_write(root / "space.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return root

    @classmethod
    def load(cls, directory: str | Path) -> UnifiedSpace:
        """Read a space written by :meth:`save`."""
        import pyarrow.parquet as pq

        root = Path(directory)
        doc_path = root / "space.json"
        if not doc_path.is_file():
            raise EmbeddingError(f"{root} is not a saved unified space (no space.json)")
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            raise EmbeddingError(
                f"{doc_path}: unknown format {doc.get('format')!r} (this engine reads {_FORMAT})")

        def npy(name: str) -> np.ndarray:
            return np.load(root / name, allow_pickle=False)

        base = npy("base_vectors.npy") if (root / "base_vectors.npy").exists() else None
        space = cls(npy("image_vectors.npy"), base_vectors=base,
                    base_key=tuple(doc["base_key"]) if doc.get("base_key") else None,
                    info=doc.get("info"), params=doc.get("params"))
        vectors, stim = npy("vectors.npy"), npy("stimuli.npy")
        keys = pq.read_table(root / "keys.parquet").to_pandas()
        if len(keys) != len(vectors) or len(stim) != len(vectors):
            raise EmbeddingError(
                f"{root}: keys.parquet, vectors.npy and stimuli.npy disagree on the row count")
        for c in doc["checkpoints"]:
            a, b = c["rows"]
            space._ckpts.append(_Checkpoint(
                c["model"], int(c["epoch"]), keys["layer"].to_numpy(object)[a:b].astype(object),
                keys["channel"].to_numpy(np.int64)[a:b], stim[a:b, : c["k"]].copy(),
                vectors[a:b].astype(np.float32), c["source"]))
        space.backends = dict(doc.get("backends") or {})
        from .neighbours import NeighbourGraph

        graph = NeighbourGraph.load(root)
        if graph is not None and len(graph.ids) == len(space):
            space._cache["graph"] = graph  # vectors attached on first use
            space._cache["graph_opts"] = None
        if (root / "layout.npy").exists():
            space._layout = npy("layout.npy").astype(np.float32)
            space.layout_params = doc.get("layout_params") or {}
        return space

    def __repr__(self) -> str:
        return (f"UnifiedSpace(dim={self.dim}, images={self.num_images}, rows={len(self)}, "
                f"checkpoints={self.checkpoints})")


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norm > 0, norm, 1.0), dtype=np.float32)


def _json_clean(obj: Any) -> Any:
    """NaN / inf -> None, recursively, so space.json is strict JSON (readable outside Python)."""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)

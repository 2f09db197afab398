"""Concept directions by SVD across training (Graziani et al., TMLR 2023; code: CDISCO).

A concept need not live in one channel: it may be a *direction* across the channels of a layer.
For one layer and one checkpoint, over N images:

1. ``Ā``: the (N, C) matrix of spatially averaged activations (a Linear output is a 1x1 map).
2. Directions: the right singular vectors of ``Ā`` (rows of ``Vh``, unit C-vectors), with the
   singular values ``S``. They are computed WITHOUT storing ``Ā``: the engine streams the Gram
   matrix ``ĀᵀĀ`` (C x C, float64) and the column sums ``Σ Ā`` over the data, and the
   directions are the eigenvectors of that matrix (``torch.linalg.eigh``, batched over layers and
   checkpoints of one width), ``S = sqrt(eigenvalue)``.

   * ``center=False`` (default, as the authors' code): SVD of ``Ā`` itself.
     ``center=True``: SVD of ``Ā - mean`` (Gram ``ĀᵀĀ - s sᵀ / N``), i.e. PCA.
   * Sign: an eigenvector's sign is arbitrary. Each direction is flipped so that the mean
     projection of the (uncentred) activations on it, ``mean(Ā)·v``, is positive: a direction
     points towards what the images *have*. When that projection is ~0 (|m·v| <= 1e-12 |m|) the
     largest-magnitude component is made positive instead (a deterministic tie-break).
3. Relevance per image (gradient pass over a sample): ``P = mean_spatial(ReLU(g) ⊙ A) @ Vhᵀ``,
   ``g = ∂logit_c/∂A`` of the label's logit (``gradient="logit"``, the DEFAULT here), or
   ``g = ∂loss/∂A`` of the cross-entropy for the image's label (``gradient="loss"``, the authors'
   code). Why not the authors' default: the loss gradient is ``Wᵀ(p - e_y)``; it vanishes on
   confidently classified images, and ReLU then keeps the components whose increase RAISES the
   loss (counter-evidence). On a planted class direction (tests/test_directions.py) the loss
   variant ranks an unrelated direction first (|cos| ~ 0 with the planted one) while the logit
   variant finds it (|cos| >= 0.95); ``gradient="loss"`` stays available for fidelity.
   The projection is onto the directions (``@ Vh.T``: rows of Vh are directions); the authors' code
   mixes rows and columns there, this one does not.
   The product ``ReLU(g) ⊙ A`` is elementwise, so a class's evidence lies along ``g ⊙ Ā``, not along
   ``Ā``: where the gradient weights a concept's channels unequally, a direction orthogonal to the
   concept but inside its channels can earn a larger z than the concept's own direction (found on a
   planted class whose logit weights were proportional to the planted vector, with ``center=True``).
   That is the method's relevance, kept as published; read a class's top few directions, not only
   rank 1.
4. Per class k and direction j::

       z_k[j] = (mean_{I_k} P[:, j] - mean_{¬I_k} P[:, j]) / std_{¬I_k} P[:, j]

   with ``I_k`` the images *predicted* as k (default, as the original) or labelled k
   (``by="label"``); ``std`` is the population standard deviation (ddof=0, NumPy's default).
   Only per-class sums, sums of squares and counts are needed, so they are streamed.
   A class's concept candidates are its directions by descending z (rank 1 = largest z).
   z is NaN where the class or its complement has no image or the complement's std is 0.
5. Concept map of an image for direction v: ``v · A(x)[:, p]`` at every position p (with
   ``center=True``: ``v · (A(x)[:, p] - μ)``, μ the mean pooled activation), upsampled
   bilinearly to the image size, thresholded at a percentile of its own pixels:
   :data:`MAP_PERCENTILE` = 90 (the map's top 10% of pixels), a tight mask that still covers a
   small object part at 32x32; change it per call.
   Two limits, measured on the confounder check (benchmarks/RESULTS.md): a map resolves an object
   only where the layer's stride is at most the object's size (vgg_small's conv4_1 has stride 8:
   a 5-px stamp falls inside one cell, and the upsampled peak sits at that cell's centre, beside
   the stamp), and a percentile mask keeps ``(1 - p/100) H W`` pixels whatever the object's
   area ``a``, so its IoU with the object is at most ``a / ((1 - p/100) H W)`` (0.24 for a 5x5
   stamp at 32x32 and p = 90); the share of the object covered by the mask is reported beside it.
6. Outliers of a class along a direction: the robust z of the projection ``Ā·v`` within the
   class, ``(x - median) / (1.4826 MAD)``; images with ``|robust z| >= 3.5`` (Iglewicz & Hoaglin's
   cut) are outliers, listed with label and prediction.
7. Neuron alignment: ``|cos|`` of each direction with each channel axis is ``|v_c|``; a direction
   is "one neuron" when the largest is close to 1. ``effective_channels = 1 / Σ v_c⁴`` (the
   participation ratio: 1 for one channel, C for a uniform mix) says how many it mixes.

Which layer
    The method assumes non-negative (post-ReLU) activations, as in the authors' code: the
    uncentred SVD's first direction is then the mean activation, the sign rule points towards
    what images have, and ``ReLU(g) ⊙ A`` keeps positive evidence. A hook on a Conv2d whose ReLU
    is a separate module (vgg_small, torchvision's VGG) sees the PRE-activation map; pass the ReLU
    modules (``layers=["features.relu3_2"]``) to analyse the method's layer. (On the confounder
    check neither kind of layer was reliably better: RESULTS.md.)

Rare concepts: the ICA option and the audit
    SVD directions are orthogonal and ordered by energy. A concept that few images carry (a 5x5
    stamp on 6% of the images: 0.02-0.06% of the energy of Ā) is then not one direction: the best
    linear detector of the stamp has ``|cos| <= 0.40`` with every singular vector and needs ~20 of
    them for 90% of its length (benchmarks/study_confounder.py). ``ConceptDirections(basis="ica")``
    uses FastICA filters of Ā instead (:func:`ica_directions`): whitening gives every direction unit
    variance and a concept carried by few images is strongly skewed, so ICA finds it whatever its
    energy (stamp AUROC 0.90-0.96 against 0.77-0.85 for the best singular vector, five seeds). It
    needs Ā itself (:func:`pooled_pass`), not the streamed Gram matrix: the pipeline stage
    (``run_stage(basis="ica")``, config ``directions_basis = "ica"``, ``conceptevo directions
    --basis ica``) fits it on ``ica_images`` images (default 10,000, drawn at random) with one more
    forward pass per checkpoint. :meth:`ConceptDirections.audit` answers "which direction carries this concept, how does
    it rank for the class, do its outliers flag the concept's images?" for images you mark
    (:func:`conceptevo.data.plant_stamp` plants a known shortcut).

Many checkpoints
    ``top=r`` keeps only the r leading directions of each Gram matrix (a partial eigensolver,
    ``syevr``): 13 VGG16-wide layers x 100 checkpoints in 18.7 CPU-s for r = 32 in float64
    (37.1 for the full solve), 11.7 CPU-s with ``precision="float32"`` (+ a float64
    Rayleigh-Ritz step: principal angles <= 5e-6 rad to the float64 solve).

Across epochs
    Each checkpoint's directions are matched to the previous checkpoint's by the Hungarian
    assignment (``scipy.optimize.linear_sum_assignment``) on ``|cos|``; the matched direction,
    its signed cosine and the angle are kept, plus the principal angles between the two
    leading subspaces (``scipy.linalg.subspace_angles``). A direction's status: ``stable``
    (|cos| >= 0.9), ``rotating`` (0.5 <= |cos| < 0.9) or ``born`` (|cos| < 0.5: no predecessor
    resembles it); the first checkpoint's directions are ``first``.

Streaming in the stimulus pass
    :class:`GramAccumulator` folds one layer output at a time; :func:`gram_observer` gives the
    callback that :func:`conceptevo.stimuli.extract_stimuli` calls (``observer=``) so the Gram
    matrices come out of the very pass that ranks the stimuli. The top images of a direction need
    the directions first, hence a second, forward-only pass (:func:`direction_stimuli`): the
    projections ``Ā·Vhᵀ`` (and their negations, for the bottom images) are fed to the stimulus
    top-k kernels as extra (1x1) channels, so ties and order are the stimuli's: value desc,
    image id asc.

Virtual neurons
    A direction's top-k images are its stimuli; :func:`project_directions` places it in the
    unified space like any neuron (``UnifiedSpace.project``), and :func:`direction_importance`
    scores its evolution with Eq. 2-4 on the activation change projected on the direction:
    ``S_v(x) = Σ_hw (v·g)(v·ΔZ)`` with ``g = ∂logit_c/∂Z^t`` (the gradient in the epoch-t model),
    ``I_v`` = the fraction of class images with ``S_v > 0``.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LayerSpec, ModelAdapter
from .errors import ActivationError, ConceptEvoError, DataError, LayerError

__all__ = [
    "MAP_PERCENTILE",
    "OUTLIER_Z",
    "GramAccumulator",
    "gram_observer",
    "gram_pass",
    "directions_from_gram",
    "batched_directions",
    "pooled_pass",
    "ica_directions",
    "ICAConvergenceWarning",
    "neuron_alignment",
    "match_directions",
    "principal_angles",
    "track",
    "RelevanceStats",
    "relevance_pass",
    "class_zscores",
    "robust_z",
    "robust_z_within",
    "ConceptDirections",
    "direction_stimuli",
    "project_directions",
    "place_on_map",
    "tag_purity",
    "run_stage",
    "direction_importance",
    "directions_report_section",
]

#: Default percentile threshold of a concept map (keep the map's top 10% of pixels).
MAP_PERCENTILE = 90.0
#: Default robust-z cut of an outlier (Iglewicz & Hoaglin).
OUTLIER_Z = 3.5
_STABLE, _ROTATING = 0.9, 0.5
GRADIENTS = ("loss", "logit")
GROUPINGS = ("predicted", "label")
BASES = ("svd", "ica")


class ICAConvergenceWarning(RuntimeWarning):
    """FastICA stopped at ``max_iter`` before ``tol`` (filter it with this class)."""


# =============================================================================== Gram
def pooled(out: torch.Tensor, layer: str = "?") -> torch.Tensor:
    """Spatial mean (B, C) of a (B, C, H, W) output; a (B, C) output is returned as is."""
    if out.dim() == 4:
        return out.float().mean(dim=(2, 3))
    if out.dim() == 2:
        return out.float()
    raise LayerError(f"layer {layer!r} outputs shape {tuple(out.shape)}; only (B, C, H, W) and (B, C) have channels")


class GramAccumulator:
    """Streamed ``ĀᵀĀ`` (float64, C x C), column sums and image count, per layer.

    ``update(layer, out)`` folds one batch of a layer's output; the sum is exact up to float64
    rounding and independent of how the images are split into batches (up to that rounding).
    The pooled rows (B x C, float64) are buffered and folded into the Gram matrix ``flush_rows``
    rows at a time: a rank-B update of a C x C matrix is memory-bound (a ResNet-50 has ~28 M Gram
    entries over its convs, 224 MB of float64 read and written per update), so small batches
    would otherwise cost more than the forward pass; buffered, the update is one GEMM per
    ``flush_rows`` images. ``gram`` / ``sums`` flush on access.

    The per-batch work is only the spatial mean and a copy of the (B, C) rows: no device sync
    (the finiteness check runs once per flush), and the C x C matrix of a layer is allocated at
    its first flush (``add_layer`` adds a layer without touching the others), so a pass over few
    images pays no fixed cost beyond the one GEMM per layer that it needs.
    """

    def __init__(self, channels: Mapping[str, int], device: str | torch.device = "cpu",
                 flush_rows: int = 512) -> None:
        self.channels: dict[str, int] = {}
        self.device = torch.device(device)
        self.flush_rows = max(1, int(flush_rows))
        self._gram: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._buf: dict[str, list[torch.Tensor]] = {}
        self._rows: dict[str, int] = {}
        self.count: dict[str, int] = {}
        for n, c in channels.items():
            self.add_layer(n, c)

    def add_layer(self, layer: str, channels: int) -> None:
        """Accumulate one more layer (nothing is allocated until its first flush)."""
        layer = str(layer)
        if layer in self.channels:
            raise LayerError(f"layer {layer!r} is already accumulated")
        self.channels[layer] = int(channels)
        self._buf[layer], self._rows[layer], self.count[layer] = [], 0, 0

    def update(self, layer: str, out: torch.Tensor) -> None:
        if layer not in self.channels:
            raise LayerError(f"layer {layer!r} is not accumulated (layers: {list(self.channels)})")
        a = pooled(out.detach(), layer)
        if a.shape[1] != self.channels[layer]:
            raise LayerError(f"layer {layer!r} has {a.shape[1]} channels, expected {self.channels[layer]}")
        self._buf[layer].append(a.to(self.device, torch.float64, non_blocking=True))
        self._rows[layer] += int(a.shape[0])
        self.count[layer] += int(a.shape[0])
        if self._rows[layer] >= self.flush_rows:
            self._flush(layer)

    def _alloc(self, layer: str) -> None:
        if layer not in self._gram:
            c = self.channels[layer]
            with torch.inference_mode(False):  # normal tensors: usable (merge, +=) after an inference pass too
                self._gram[layer] = torch.zeros(c, c, dtype=torch.float64, device=self.device)
                self._sums[layer] = torch.zeros(c, dtype=torch.float64, device=self.device)

    def _flush(self, layer: str) -> None:
        self._alloc(layer)
        if not self._buf[layer]:
            return
        a = torch.cat(self._buf[layer]) if len(self._buf[layer]) > 1 else self._buf[layer][0]
        self._buf[layer], self._rows[layer] = [], 0
        if not bool(torch.isfinite(a).all()):
            raise ActivationError(f"layer {layer!r}: non-finite activations in the Gram accumulation")
        self._gram[layer].addmm_(a.T, a)
        self._sums[layer] += a.sum(0)

    def flush(self) -> None:
        for n in self.channels:
            self._flush(n)

    @property
    def gram(self) -> dict[str, torch.Tensor]:
        self.flush()
        return self._gram

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        self.flush()
        return self._sums

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add another accumulator's sums (e.g. another rank's shard); returns self."""
        if other.channels != self.channels:
            raise LayerError(f"cannot merge Gram accumulators of different layers: {other.channels} vs {self.channels}")
        og, os_ = other.gram, other.sums
        for n in self.channels:
            self.gram[n].add_(og[n].to(self.device))
            self._sums[n].add_(os_[n].to(self.device))
            self.count[n] += other.count[n]
        return self

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """``{layer: {"gram", "sums", "count"}}`` as NumPy arrays (float64, float64, int64)."""
        g, s = self.gram, self.sums
        return {n: {"gram": g[n].cpu().numpy(), "sums": s[n].cpu().numpy(),
                    "count": np.asarray(self.count[n], np.int64)} for n in self.channels}


def gram_observer(channels: Mapping[str, int] | None = None, device: str | torch.device | None = None
                  ) -> tuple[Callable[[str, str, torch.Tensor], None], dict[str, GramAccumulator]]:
    """``(observer, accumulators)`` for :func:`conceptevo.stimuli.extract_stimuli`'s ``observer=``.

    The stimulus pass calls ``observer(checkpoint_name, layer, output)``; the output is folded
    into ``accumulators[checkpoint_name]`` (created on first use, on the output's device unless
    ``device`` is given). ``channels=None`` learns every layer's width from its first output.
    """
    accs: dict[str, GramAccumulator] = {}
    widths: dict[str, int] = dict(channels or {})

    def observer(name: str, layer: str, out: torch.Tensor) -> None:
        acc = accs.get(name)
        if acc is None:
            accs[name] = acc = GramAccumulator({}, device if device is not None else out.device)
        if layer not in acc.channels:  # a layer first seen now (channels=None learns widths on the way)
            acc.add_layer(layer, widths.setdefault(layer, int(out.shape[1])))
        acc.update(layer, out)

    return observer, accs


class _Stop(Exception):
    pass


def _forward_layers(model: nn.Module, adapter: ModelAdapter, x: torch.Tensor, fn: Callable[[str, torch.Tensor], None],
                    need_logits: bool = False):
    """Forward with ``fn(layer, out)`` on every chosen layer; stops after the last one unless logits are needed."""
    fired: set[str] = set()
    last = len(adapter.layer_names)

    def hook(name: str, out: torch.Tensor):
        fn(name, out)
        fired.add(name)
        if not need_logits and len(fired) == last:
            raise _Stop
        return None

    try:
        with adapter.hooks(hook):
            return model(x)
    except _Stop:
        return None


def gram_pass(models: Sequence[nn.Module] | nn.Module, data: Any, layers: LayerSpec = None, batch_size: int = 64,
              device: str | torch.device = "cpu", indices: np.ndarray | None = None, progress: bool = False,
              input_shape: Sequence[int] | None = None) -> list[GramAccumulator]:
    """Gram matrices of every model (same architecture) in ONE forward-only pass over ``data``.

    Each batch is loaded once and fed to every model; nothing of size N x C is kept.
    """
    from .data import as_image_set

    ds = as_image_set(data)
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise ConceptEvoError("gram_pass needs at least one model")
    dev = torch.device(device)
    shape = tuple(input_shape) if input_shape is not None else tuple(torch.as_tensor(ds[0][0]).shape)
    adapters = [ModelAdapter(m.to(dev).eval(), layers=layers, input_shape=shape) for m in models]
    accs = [GramAccumulator(a.channels, dev) for a in adapters]
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, np.int64)
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"gram x{len(models)}", unit="batch", leave=False)
    with torch.inference_mode():
        for s in starts:
            x, _y = ds.batch(torch.as_tensor(idx[s:s + batch_size]))
            x = x.to(dev)
            for m, ad, acc in zip(models, adapters, accs):
                _forward_layers(m, ad, x, acc.update)
    return accs


# ========================================================================= eigh
def _fix_signs(vh: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Flip rows of ``vh`` (..., D, C) so that ``mean·v > 0``; tie-break: largest |component| positive."""
    proj = (vh * mean.unsqueeze(-2)).sum(-1)  # (..., D)
    tol = 1e-12 * mean.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    big = vh.gather(-1, vh.abs().argmax(-1, keepdim=True)).squeeze(-1)
    sign = torch.where(proj.abs() > tol, torch.sign(proj), torch.sign(big))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return vh * sign.unsqueeze(-1)


def _eigh(m: torch.Tensor, precision: str = "float64", top: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched symmetric eigendecomposition (ascending), float64 results; ``top``: only the largest ``top``.

    CUDA: ``torch.linalg.eigh`` on the whole batch (then the last ``top`` columns). CPU: LAPACK per
    matrix (SciPy) on a pool of ``torch.get_num_threads()`` threads, each with single-threaded BLAS
    (the matrices are independent; on 2 cores this is ~1.5x faster than torch's CPU eigh, which
    runs the batch one matrix at a time): ``syevd`` for the full spectrum, ``syevr`` with
    ``subset_by_index`` for the top ``top`` (the tridiagonal reduction stays O(C³), but the
    eigenvectors -- the back-transformation, the rest of the cost -- are computed for ``top``
    only: ~2.3x faster for 32 of 512). ``precision="float32"`` decomposes in float32 and then
    refines in float64 by one Rayleigh-Ritz step on the float64 matrix (orthonormalise the
    float32 eigenvectors, eigendecompose the ``top x top`` projected matrix): the eigenvalues
    are then float64-accurate and the eigenvectors lie within ~1e-7 / (relative gap) of the
    float64 ones (principal angles measured in benchmarks/bench_directions.py).
    """
    if precision not in ("float64", "float32"):
        raise ConceptEvoError(f"precision must be 'float64' or 'float32', got {precision!r}")
    C = int(m.shape[-1])
    r = C if top is None else max(1, min(int(top), C))
    dt = torch.float32 if precision == "float32" else torch.float64
    if m.device.type != "cpu":
        w, u = torch.linalg.eigh(m.to(dt))
        w, u = w[..., C - r:].double(), u[..., C - r:].double()
    else:
        import contextlib
        from concurrent.futures import ThreadPoolExecutor

        from scipy.linalg import eigh as sp_eigh

        arr = m.to(dt).numpy()
        kw = dict(driver="evd") if r == C else dict(driver="evr", subset_by_index=[C - r, C - 1])

        def one(i: int):
            return sp_eigh(arr[i], check_finite=False, **kw)

        workers = max(1, min(torch.get_num_threads(), len(arr)))
        limit = contextlib.nullcontext()
        with contextlib.suppress(ImportError):  # one BLAS thread per matrix (a threaded syevd is slower here)
            from threadpoolctl import threadpool_limits

            limit = threadpool_limits(1)
        with limit:
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    res = list(pool.map(one, range(len(arr))))
            else:
                res = [one(i) for i in range(len(arr))]
        w = torch.from_numpy(np.stack([x[0] for x in res]).astype(np.float64)).reshape(*m.shape[:-2], r)
        u = torch.from_numpy(np.stack([x[1] for x in res]).astype(np.float64)).reshape(*m.shape[:-2], C, r)
    if dt == torch.float32:  # Rayleigh-Ritz refinement in float64 on the float64 matrix
        m64 = m.to(u.device, torch.float64)
        q, _ = torch.linalg.qr(u)
        h = q.transpose(-1, -2) @ m64 @ q
        w, y = torch.linalg.eigh(0.5 * (h + h.transpose(-1, -2)))
        u = q @ y
    return w, u


def _decompose(grams: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, center: bool,
               precision: str = "float64", top: int | None = None):
    """Batched: grams (B, C, C), sums (B, C), counts (B,) -> vh (B, D, C) rows desc, s (B, D); D = top or C."""
    counts = counts.to(grams.dtype).clamp_min(1)
    m = grams
    if center:
        m = grams - sums.unsqueeze(-1) * sums.unsqueeze(-2) / counts.view(-1, 1, 1)
    m = 0.5 * (m + m.transpose(-1, -2))
    w, u = _eigh(m, precision, top)  # ascending
    w, u = w.flip(-1), u.flip(-1)
    vh = u.transpose(-1, -2)
    s = w.clamp_min(0).sqrt()
    vh = _fix_signs(vh, (sums / counts.view(-1, 1)).to(vh.device))
    return vh, s


def directions_from_gram(gram, sums=None, count=None, center: bool = False, top: int | None = None,
                         precision: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Directions ``vh`` (D, C) float64 (rows, by descending singular value) and singular values (D,).

    ``gram`` = ĀᵀĀ, ``sums`` = Σ Ā (needed for the sign and for ``center=True``), ``count`` = N.
    ``top``: only the ``top`` leading directions (a partial eigensolver, see :func:`_eigh`); D = C by default.
    """
    g = torch.as_tensor(np.asarray(gram, np.float64))
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ConceptEvoError(f"gram must be square (C, C), got shape {tuple(g.shape)}")
    s = torch.zeros(g.shape[0], dtype=torch.float64) if sums is None else torch.as_tensor(np.asarray(sums, np.float64))
    if center and (sums is None or count is None):
        raise ConceptEvoError("center=True needs the column sums and the image count")
    n = torch.tensor([1.0 if count is None else float(count)], dtype=torch.float64)
    vh, sv = _decompose(g[None], s[None], n, center, precision, top)
    return vh[0].numpy(), sv[0].numpy()


def batched_directions(items: Sequence[tuple[Any, Any, Any]], center: bool = False,
                       device: str | torch.device = "cpu", precision: str = "float64", top: int | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`directions_from_gram` of many ``(gram, sums, count)``: one batched ``eigh`` per width.

    On a GPU (``device="cuda"``) the batches run there; results are NumPy float64. ``top``: only
    the leading ``top`` directions of each matrix (``min(top, C)``); ``precision="float32"``:
    float32 eigensolver + float64 Rayleigh-Ritz refinement (see :func:`_eigh`).
    """
    dev = torch.device(device)
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(items)
    by_width: dict[int, list[int]] = {}
    for i, (g, _s, _n) in enumerate(items):
        by_width.setdefault(int(np.shape(g)[0]), []).append(i)
    for c, idx in by_width.items():
        g = torch.stack([torch.as_tensor(np.asarray(items[i][0], np.float64)) for i in idx]).to(dev)
        s = torch.stack([torch.as_tensor(np.asarray(items[i][1], np.float64)) for i in idx]).to(dev)
        n = torch.tensor([float(items[i][2]) for i in idx], dtype=torch.float64, device=dev)
        vh, sv = _decompose(g, s, n, center, precision, top)
        vh, sv = vh.cpu().numpy(), sv.cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = (vh[j], sv[j])
    return out  # type: ignore[return-value]


# ============================================================ ICA basis (an option)
def pooled_pass(model: nn.Module, data: Any, layers: LayerSpec = None, batch_size: int = 64,
                device: str | torch.device = "cpu", indices: np.ndarray | None = None, progress: bool = False
                ) -> dict[str, np.ndarray]:
    """``{layer: Ā (N, C) float32}``: the spatially averaged activations, one forward-only pass.

    The SVD basis needs only ``ĀᵀĀ`` (:func:`gram_pass`); the ICA basis needs the rows themselves,
    N x C floats per layer: subsample large sets with ``indices``.
    """
    from .data import as_image_set

    ds = as_image_set(data)
    dev = torch.device(device)
    adapter = ModelAdapter(model.to(dev), layers=layers, input_shape=tuple(torch.as_tensor(ds[0][0]).shape))
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, np.int64)
    if idx.size == 0:
        raise DataError("pooled_pass has no images")
    rows: dict[str, list[np.ndarray]] = {n: [] for n in adapter.layer_names}
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="activations", unit="batch", leave=False)
    from .adapter import EvalMode

    with torch.inference_mode(), EvalMode(model):
        for st in starts:
            x, _y = ds.batch(torch.as_tensor(idx[st:st + batch_size]))
            _forward_layers(model, adapter, x.to(dev), lambda n, o: rows[n].append(pooled(o, n).cpu().numpy()))
    return {n: np.concatenate(r) for n, r in rows.items()}


def ica_directions(a_bar: np.ndarray, top: int | None = None, seed: int = 0, max_iter: int = 200,
                   tol: float = 1e-4, layer: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """Unit FastICA filters ``vh`` (D, C) of ``Ā`` (N, C) and their scales ``‖Ā v‖`` (D,), descending.

    Why an ICA basis: SVD directions are orthogonal and ordered by energy, so a concept that few
    images carry (a small stamp on 6% of them: 0.02-0.06% of the energy) is split over many
    low-energy singular vectors (benchmarks/RESULTS.md, the confounder). ICA whitens Ā (every
    direction gets unit variance) and then seeks the most non-Gaussian directions; a concept that
    is present in few images is strongly skewed, so it is found whatever its energy.

    ``sklearn.decomposition.FastICA`` (``whiten="unit-variance"``, logcosh, ``random_state=seed``,
    scikit-learn's ``max_iter`` and ``tol``) on the centred rows, with D = min(rank of the centred
    Ā, ``top`` or C) components: dead or duplicated channels (common after a ReLU) are dropped by
    the rank, not divided by zero. ``top`` keeps the leading ``top`` principal components before
    the rotation, which drops the low-energy subspace where rare concepts live: leave it None
    unless C is too large. Cost: O(N C D) per iteration (a 128-channel layer over 4,800 images:
    16 CPU-s for 200 iterations, against 0.04 s for the SVD).
    Each filter (a row of the unmixing matrix, normalised to unit length) is signed so that its
    source has a positive skew (it points towards the images that carry the concept; a skew of
    exactly 0 falls back to the largest-|component|-positive rule). The scale ``‖Ā v‖`` plays the
    role of the singular value (equal to it for an SVD direction of the uncentred Ā). The filters
    are not orthogonal: read ``vh`` as directions to project on, not as a rotation.
    """

    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    a = np.asarray(a_bar, np.float64)
    if a.ndim != 2:
        raise ConceptEvoError(f"layer {layer!r}: Ā must be (N, C), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ActivationError(f"layer {layer!r}: non-finite activations (NaN/inf) in Ā")
    n, c = a.shape
    if n < 2:
        raise DataError(f"layer {layer!r}: the ICA basis needs at least 2 images, got {n}")
    sv = np.linalg.svd(a - a.mean(0), compute_uv=False)
    rank = int(np.sum(sv > sv[0] * 1e-6)) if sv.size and sv[0] > 0 else 0
    if rank == 0:
        raise DataError(f"layer {layer!r}: the activations do not vary over the {n} images; "
                        "no ICA direction")
    d = rank if top is None else max(1, min(int(top), rank))
    ica = FastICA(n_components=d, whiten="unit-variance", random_state=int(seed), max_iter=int(max_iter),
                  tol=float(tol))
    with warnings.catch_warnings(record=True) as caught, np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(a)  # (sklearn divides by the null singular values before dropping them)
    for rec in caught:
        if issubclass(rec.category, ConvergenceWarning):
            warnings.warn(f"layer {layer!r}: FastICA did not converge in {max_iter} iterations (tol {tol:g}); "
                          "near-Gaussian components are then arbitrary, skewed ones (rare concepts) usually "
                          "settle first", ICAConvergenceWarning, stacklevel=2)
        else:
            warnings.warn_explicit(rec.message, rec.category, rec.filename, rec.lineno)
    w = np.asarray(ica.components_, np.float64)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    centred = sources - sources.mean(0)
    skew = (centred ** 3).mean(0) / np.maximum((centred ** 2).mean(0), 1e-300) ** 1.5
    big = w[np.arange(d), np.abs(w).argmax(1)]
    sign = np.where(np.abs(skew) > 1e-12, np.sign(skew), np.sign(big))
    w *= np.where(sign == 0, 1.0, sign)[:, None]
    scale = np.linalg.norm(a @ w.T, axis=0)
    order = np.argsort(-scale, kind="stable")
    return w[order], scale[order]


def neuron_alignment(vh: np.ndarray) -> pd.DataFrame:
    """Per direction: the channel it is closest to, that |cos|, and the participation ratio."""
    a = np.abs(np.asarray(vh, np.float64))
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    a = a / np.where(norm > 0, norm, 1)
    return pd.DataFrame({
        "direction": np.arange(a.shape[0]),
        "aligned_channel": a.argmax(1),
        "alignment": a.max(1),
        "effective_channels": 1.0 / np.maximum((a ** 4).sum(1), 1e-300),
    })


# ====================================================================== tracking
def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, descending as SciPy gives them) between the spans of the rows of a and b."""
    from scipy.linalg import subspace_angles

    return subspace_angles(np.asarray(a, np.float64).T, np.asarray(b, np.float64).T)


def match_directions(prev: np.ndarray, cur: np.ndarray) -> pd.DataFrame:
    """Match each row of ``cur`` (D2, C) to a row of ``prev`` (D1, C) by Hungarian assignment on |cos|.

    Returns per current direction: ``prev_direction`` (-1 when unmatched, D2 > D1), ``cos_prev``
    (signed cosine with it), ``angle`` (degrees, of the lines: arccos |cos|) and ``status``.
    """
    from scipy.optimize import linear_sum_assignment

    prev = np.asarray(prev, np.float64)
    cur = np.asarray(cur, np.float64)
    if prev.ndim != 2 or cur.ndim != 2 or prev.shape[1] != cur.shape[1]:
        raise ConceptEvoError(f"directions to match must be (D, C) with one C; got {prev.shape} and {cur.shape}")

    def unit(v):
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.where(n > 0, n, 1)

    cos = unit(cur) @ unit(prev).T
    rows, cols = linear_sum_assignment(-np.abs(cos))
    match = np.full(cur.shape[0], -1, np.int64)
    match[rows] = cols
    c = np.where(match >= 0, cos[np.arange(cur.shape[0]), np.maximum(match, 0)], np.nan)
    ac = np.abs(c)
    angle = np.degrees(np.arccos(np.clip(ac, 0.0, 1.0)))
    status = np.where(ac >= _STABLE, "stable", np.where(ac >= _ROTATING, "rotating", "born"))
    status = np.where(match < 0, "born", status)
    return pd.DataFrame({"direction": np.arange(cur.shape[0]), "prev_direction": match, "cos_prev": c,
                         "angle": angle, "status": status})


def track(vhs: Sequence[np.ndarray]) -> list[pd.DataFrame]:
    """:func:`match_directions` of each checkpoint's directions to the previous one's (first: ``status="first"``)."""
    out = []
    for i, vh in enumerate(vhs):
        if i == 0:
            d = vh.shape[0]
            out.append(pd.DataFrame({"direction": np.arange(d), "prev_direction": np.full(d, -1, np.int64),
                                     "cos_prev": np.full(d, np.nan), "angle": np.full(d, np.nan),
                                     "status": np.full(d, "first", dtype=object)}))
        else:
            out.append(match_directions(vhs[i - 1], vh))
    return out


# ===================================================================== relevance
@dataclass
class RelevanceStats:
    """Streamed per-class statistics of the relevance P, and per-image values of the sample.

    ``sums[by][layer]`` float64 (K, D), ``sumsq`` likewise, ``counts[by]`` int64 (K,) with
    ``by`` in ("predicted", "label"). Per image (the sample only): ``ids``, ``labels``, ``preds``,
    ``P[layer]`` (n, D) and ``proj[layer]`` (n, D) = Ā·Vhᵀ.
    """

    num_classes: int
    sums: dict[str, dict[str, np.ndarray]]
    sumsq: dict[str, dict[str, np.ndarray]]
    counts: dict[str, np.ndarray]
    ids: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    P: dict[str, np.ndarray] = field(default_factory=dict)
    proj: dict[str, np.ndarray] = field(default_factory=dict)
    gradient: str = "logit"


def _sample_indices(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        out.append(idx)
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def relevance_pass(model: nn.Module, data: Any, directions: Mapping[str, np.ndarray], *, gradient: str = "logit",
                   batch_size: int = 64, device: str | torch.device | None = None, indices=None,
                   max_images_per_class: int | None = None, seed: int = 0, keep_images: bool = True,
                   num_classes: int | None = None, progress: bool = False) -> RelevanceStats:
    """One forward + backward per batch: ``P = mean_spatial(ReLU(g) ⊙ A) @ Vhᵀ`` for every layer of ``directions``.

    ``directions``: ``{layer: vh (D, C)}``. The model is run in eval mode (per-image gradients from
    one backward of the batch sum, as in :mod:`conceptevo.importance`); its mode is restored.
    """
    from .adapter import EvalMode
    from .data import as_image_set

    if gradient not in GRADIENTS:
        raise ConceptEvoError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    ds = as_image_set(data)
    labels_all = ds.labels.numpy().astype(np.int64)
    idx = (np.asarray(indices, np.int64) if indices is not None
           else _sample_indices(labels_all, max_images_per_class, seed))
    if idx.size == 0:
        raise DataError("the relevance pass has no images")
    if device is not None:
        model.to(device)
    p0 = next(model.parameters(), None)
    dev = p0.device if p0 is not None else torch.device("cpu")
    layers = list(directions)
    adapter = ModelAdapter(model, layers=layers, input_shape=tuple(torch.as_tensor(ds[0][0]).shape))
    vhs = {}
    for n in layers:
        v = torch.as_tensor(np.asarray(directions[n]), dtype=torch.float32, device=dev)
        if v.dim() != 2 or v.shape[1] != adapter.channels[n]:
            raise LayerError(f"directions of layer {n!r} have shape {tuple(v.shape)}; the layer has "
                             f"{adapter.channels[n]} channels")
        vhs[n] = v
    K = int(num_classes) if num_classes is not None else len(getattr(ds, "class_names", None) or []) or int(labels_all.max()) + 1
    sums = {by: {n: torch.zeros(K, vhs[n].shape[0], dtype=torch.float64, device=dev) for n in layers} for by in GROUPINGS}
    sumsq = {by: {n: torch.zeros(K, vhs[n].shape[0], dtype=torch.float64, device=dev) for n in layers} for by in GROUPINGS}
    counts = {by: torch.zeros(K, dtype=torch.int64, device=dev) for by in GROUPINGS}
    keepP: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    keepA: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    preds_all = []
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="relevance", unit="batch", leave=False)
    with EvalMode(model):
        for s in starts:
            b = idx[s:s + batch_size]
            x, y = ds.batch(torch.as_tensor(b))
            x, y = x.to(dev), y.to(dev)
            acts: dict[str, torch.Tensor] = {}

            def keep(name: str, out: torch.Tensor) -> torch.Tensor:
                acts[name] = out
                return out.clone()  # in-place ops downstream leave the kept tensor intact

            with torch.enable_grad(), adapter.hooks(keep):
                logits = model(x.detach().requires_grad_(True))
                if logits.dim() != 2:
                    raise LayerError(f"the model returns shape {tuple(logits.shape)}; expected logits (B, classes)")
                if int(y.max()) >= logits.shape[1]:
                    raise DataError(f"label {int(y.max())} but the model has only {logits.shape[1]} logits")
                if gradient == "loss":
                    obj = F.cross_entropy(logits.float(), y, reduction="sum")
                else:
                    obj = logits.gather(1, y.view(-1, 1)).sum()
                grads = torch.autograd.grad(obj, [acts[n] for n in layers], allow_unused=True)
            pred = logits.detach().argmax(1)
            if int(pred.max()) >= K:
                raise DataError(f"the model predicts class {int(pred.max())}; only {K} classes are known")
            preds_all.append(pred.cpu().numpy())
            for n, g in zip(layers, grads):
                a = acts[n].detach()
                if g is None:
                    g = torch.zeros_like(a)
                r = pooled(F.relu(g) * a, n)
                P = (r @ vhs[n].T).double()
                if not torch.isfinite(P).all():
                    raise ActivationError(f"layer {n!r}: non-finite relevance (NaN/inf activations or gradients)")
                for by, grp in (("predicted", pred), ("label", y)):
                    sums[by][n].index_add_(0, grp, P)
                    sumsq[by][n].index_add_(0, grp, P * P)
                if keep_images:
                    keepP[n].append(P.cpu().numpy())
                    keepA[n].append((pooled(a, n) @ vhs[n].T).double().cpu().numpy())
            for by, grp in (("predicted", pred), ("label", y)):
                counts[by] += torch.bincount(grp, minlength=K)
    return RelevanceStats(
        num_classes=K,
        sums={by: {n: t.cpu().numpy() for n, t in d.items()} for by, d in sums.items()},
        sumsq={by: {n: t.cpu().numpy() for n, t in d.items()} for by, d in sumsq.items()},
        counts={by: t.cpu().numpy() for by, t in counts.items()},
        ids=idx.copy(), labels=labels_all[idx].copy(), preds=np.concatenate(preds_all),
        P={n: np.concatenate(v) for n, v in keepP.items()} if keep_images else {},
        proj={n: np.concatenate(v) for n, v in keepA.items()} if keep_images else {},
        gradient=gradient,
    )


def class_zscores(sums: np.ndarray, sumsq: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """z (K, D) of step 4 from per-class sums, sums of squares (K, D) and counts (K,); NaN where undefined."""
    sums = np.asarray(sums, np.float64)
    sumsq = np.asarray(sumsq, np.float64)
    n_in = np.asarray(counts, np.float64)[:, None]
    tot_s, tot_q, tot_n = sums.sum(0, keepdims=True), sumsq.sum(0, keepdims=True), n_in.sum()
    n_out = tot_n - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_in = sums / n_in
        s_out = tot_s - sums
        mean_out = s_out / n_out
        var_out = (tot_q - sumsq) / n_out - mean_out ** 2
        # Cancellation can leave a tiny negative variance: clamp at 0 (then z is NaN).
        std_out = np.sqrt(np.maximum(var_out, 0.0))
        z = (mean_in - mean_out) / std_out
    z[~np.isfinite(z)] = np.nan
    return z


def robust_z(x: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)``; 0 where MAD = 0 and x = median, ±inf where MAD = 0 otherwise."""
    x = np.asarray(x, np.float64)
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (x - med) / mad
    return np.where(np.isnan(z), 0.0, z)


def robust_z_within(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """:func:`robust_z` of ``x`` within each group (step 6's statistic for every class at once)."""
    x, groups = np.asarray(x, np.float64), np.asarray(groups)
    out = np.zeros(len(x))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = robust_z(x[idx])
    return out


def _order_by_z(z: np.ndarray) -> np.ndarray:
    """Directions by descending z along the last axis (NaN last; ties keep the lower index first)."""
    return np.argsort(-np.where(np.isnan(z), -np.inf, z), axis=-1, kind="stable")


# ============================================================ the class API
class ConceptDirections:
    """Concept directions of one model (one checkpoint): fit / transform / class_concepts / concept_map / outliers.

    >>> cd = ConceptDirections(layers=["features.8"]).fit(model, images)
    >>> rel = cd.relevance(model, images, max_images_per_class=64)
    >>> cd.class_concepts(rel).head()           # class, layer, direction, z, rank
    >>> cd.concept_map(model, x, "features.8", direction=3)   # maps, masks
    >>> cd.outliers(rel, "features.8", direction=3, cls=5)

    Attributes after fit: ``vh[layer]`` (D, C) float64 rows = directions (descending singular
    value), ``singular_values[layer]`` (D,), ``mean[layer]`` (C,), ``count``. ``top``: keep only
    the D = ``top`` leading directions per layer (a partial eigensolver; default all, D = C).

    ``basis="ica"`` (an option, not the method): the directions are FastICA filters of Ā
    (:func:`ica_directions`, ``seed`` its random state) instead of singular vectors. It finds
    concepts that few images carry, which SVD splits over many low-energy directions (the
    confounder study in benchmarks/RESULTS.md), but it needs Ā itself (N x C per layer, a pass of
    :func:`pooled_pass`), not the streamed Gram matrix: subsample large sets (``fit(indices=...)``).
    ``center`` still decides whether maps and projections subtract the mean activation.
    """

    def __init__(self, layers: LayerSpec = None, center: bool = False, gradient: str = "logit",
                 by: str = "predicted", batch_size: int = 64, device: str | torch.device = "cpu",
                 top: int | None = None, basis: str = "svd", seed: int = 0) -> None:
        if gradient not in GRADIENTS:
            raise ConceptEvoError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        if by not in GROUPINGS:
            raise ConceptEvoError(f"by must be one of {GROUPINGS}, got {by!r}")
        if basis not in BASES:
            raise ConceptEvoError(f"basis must be one of {BASES}, got {basis!r}")
        self.layers, self.center, self.gradient, self.by = layers, bool(center), gradient, by
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.top = None if top is None else int(top)
        self.basis, self.seed = basis, int(seed)
        self.vh: dict[str, np.ndarray] = {}
        self.singular_values: dict[str, np.ndarray] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.count = 0

    # ------------------------------------------------------------------- fit
    def fit(self, model: nn.Module, data: Any, indices=None) -> ConceptDirections:
        """One pass over ``data`` (or ``indices`` of it), then the basis: a streamed Gram matrix and its
        eigendecomposition (SVD), or Ā and FastICA (``basis="ica"``)."""
        if self.basis == "ica":
            acts = pooled_pass(model, data, layers=self.layers, batch_size=self.batch_size, device=self.device,
                               indices=indices)
            return self.fit_activations(acts)
        (acc,) = gram_pass(model, data, layers=self.layers, batch_size=self.batch_size, device=self.device,
                           indices=indices)
        return self.fit_gram(acc)

    def fit_activations(self, activations: Mapping[str, np.ndarray | torch.Tensor]) -> ConceptDirections:
        """Directions from arrays ``{layer: Ā (N, C)}`` (spatially averaged activations), either basis."""
        if not activations:
            raise DataError("fit_activations got no layer")
        if self.basis == "svd":
            arrays = {}
            for n, a in activations.items():
                a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
                if a.dim() != 2:
                    raise ConceptEvoError(f"layer {n!r}: Ā must be (N, C), got shape {tuple(a.shape)}")
                arrays[n] = {"gram": (a.T @ a).numpy(), "sums": a.sum(0).numpy(), "count": a.shape[0]}
            return self.fit_gram(arrays)
        for n, a in activations.items():
            a = np.asarray(a, np.float64)
            self.vh[n], self.singular_values[n] = ica_directions(a, top=self.top, seed=self.seed, layer=n)
            self.mean[n] = a.mean(0)
            self.count = a.shape[0]
        return self

    def fit_gram(self, acc: GramAccumulator | Mapping[str, Mapping[str, Any]]) -> ConceptDirections:
        """Directions from an accumulator (or ``{layer: {"gram", "sums", "count"}}``); SVD basis only."""
        if self.basis != "svd":
            raise ConceptEvoError("the ICA basis needs the activations, not their Gram matrix: "
                                  "use fit() or fit_activations()")
        arrays = acc.arrays() if isinstance(acc, GramAccumulator) else acc
        names = list(arrays)
        res = batched_directions([(arrays[n]["gram"], arrays[n]["sums"], int(arrays[n]["count"])) for n in names],
                                 center=self.center, device=self.device, top=self.top)
        for n, (vh, s) in zip(names, res):
            cnt = int(arrays[n]["count"])
            if cnt == 0:
                raise DataError(f"layer {n!r}: the Gram matrix saw no image")
            self.vh[n], self.singular_values[n] = vh, s
            self.mean[n] = np.asarray(arrays[n]["sums"], np.float64) / cnt
            self.count = cnt
        return self

    def _check_layer(self, layer: str) -> None:
        if layer not in self.vh:
            raise LayerError(f"no directions for layer {layer!r} (fitted layers: {list(self.vh)})")

    # ------------------------------------------------------------- transform
    def transform(self, activations: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        """Projections ``Ā·Vhᵀ`` (B, D) of layer outputs ``{layer: (B, C, H, W) or (B, C)}``."""
        out = {}
        for n, a in activations.items():
            self._check_layer(n)
            t = torch.as_tensor(a)
            out[n] = (pooled(t, n).double().cpu().numpy() - (self.mean[n] if self.center else 0.0)) @ self.vh[n].T
        return out

    def relevance(self, model: nn.Module, data: Any, indices=None, max_images_per_class: int | None = None,
                  seed: int = 0, keep_images: bool = True, num_classes: int | None = None) -> RelevanceStats:
        """The gradient pass of step 3 over a sample (see :func:`relevance_pass`)."""
        if not self.vh:
            raise ConceptEvoError("fit the directions first")
        return relevance_pass(model, data, self.vh, gradient=self.gradient, batch_size=self.batch_size,
                              device=self.device, indices=indices, max_images_per_class=max_images_per_class,
                              seed=seed, keep_images=keep_images, num_classes=num_classes)

    def class_concepts(self, rel: RelevanceStats, by: str | None = None, top: int | None = None) -> pd.DataFrame:
        """``class, layer, direction, z, rank`` (rank 1 = largest z of its class and layer; NaN z ranks last)."""
        by = by or self.by
        if by not in GROUPINGS:
            raise ConceptEvoError(f"by must be one of {GROUPINGS}, got {by!r}")
        frames = []
        for n in rel.sums[by]:
            z = class_zscores(rel.sums[by][n], rel.sumsq[by][n], rel.counts[by])
            K, D = z.shape
            order = _order_by_z(z)
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(1, D + 1)[None].repeat(K, 0), axis=1)
            frames.append(pd.DataFrame({"class": np.repeat(np.arange(K), D), "layer": n,
                                        "direction": np.tile(np.arange(D), K), "z": z.ravel(),
                                        "rank": rank.ravel(), "count": np.repeat(rel.counts[by], D)}))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["class", "layer", "direction", "z", "rank", "count"])
        if top is not None:
            df = df[df["rank"] <= top]
        return df.sort_values(["layer", "class", "rank"], kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------ concept map
    def concept_map(self, model: nn.Module, x: torch.Tensor, layer: str, direction: int,
                    percentile: float = MAP_PERCENTILE) -> tuple[np.ndarray, np.ndarray]:
        """Maps (B, H, W) float32 of ``v · A(x)[:, p]`` upsampled to the image, and masks (B, H, W) bool.

        ``x``: normalised images (B, 3, H, W) or one image (3, H, W). The mask keeps the pixels at or
        above the map's own ``percentile`` (default :data:`MAP_PERCENTILE`).
        """
        self._check_layer(layer)
        if not 0 <= direction < self.vh[layer].shape[0]:
            raise ConceptEvoError(f"direction {direction} out of range for layer {layer!r} "
                                  f"({self.vh[layer].shape[0]} directions)")
        if not 0 <= percentile <= 100:
            raise ConceptEvoError(f"percentile must be in [0, 100], got {percentile}")
        x = torch.as_tensor(x)
        if x.dim() == 3:
            x = x[None]
        p0 = next(model.parameters(), None)
        dev = p0.device if p0 is not None else torch.device("cpu")
        adapter = ModelAdapter(model, layers=[layer], input_shape=tuple(x.shape[1:]))
        got = {}
        from .adapter import EvalMode

        with torch.inference_mode(), EvalMode(model):
            _forward_layers(model, adapter, x.to(dev), lambda n, o: got.__setitem__(n, o.detach().float()))
        a = got[layer]
        if a.dim() == 2:
            a = a[:, :, None, None]
        v = torch.as_tensor(self.vh[layer][direction], dtype=torch.float32, device=a.device)
        if self.center and layer in self.mean:  # PCA axes live around the mean activation: map v·(A_p - μ)
            a = a - torch.as_tensor(self.mean[layer], dtype=torch.float32, device=a.device).view(1, -1, 1, 1)
        m = torch.einsum("c,bchw->bhw", v, a)[:, None]
        m = F.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        thr = np.percentile(m.reshape(m.shape[0], -1), percentile, axis=1)
        return m.astype(np.float32), m >= thr[:, None, None]

    # --------------------------------------------------------------- outliers
    def outliers(self, rel: RelevanceStats, layer: str, direction: int, cls: int | None = None,
                 by: str = "label", threshold: float = OUTLIER_Z) -> pd.DataFrame:
        """Images of the sample with extreme projections on a direction, by robust z within their class.

        ``cls=None``: every class. ``by="label"`` (default) groups by label, ``"predicted"`` by
        prediction. Columns: image, label, predicted, projection, robust_z; sorted by |robust_z| desc.
        """
        self._check_layer(layer)
        if layer not in rel.proj:
            raise ConceptEvoError(f"the relevance pass kept no per-image projections for layer {layer!r} "
                                  "(keep_images=False?)")
        proj = rel.proj[layer][:, direction]
        grp = rel.labels if by == "label" else rel.preds
        classes = np.unique(grp) if cls is None else [int(cls)]
        rows = []
        for c in classes:
            sel = np.flatnonzero(grp == c)
            if sel.size == 0:
                continue
            z = robust_z(proj[sel])
            hit = np.abs(z) >= threshold
            rows.append(pd.DataFrame({"class": int(c), "image": rel.ids[sel][hit], "label": rel.labels[sel][hit],
                                      "predicted": rel.preds[sel][hit], "projection": proj[sel][hit],
                                      "robust_z": z[hit]}))
        if not rows:
            return pd.DataFrame(columns=["class", "image", "label", "predicted", "projection", "robust_z"])
        df = pd.concat(rows, ignore_index=True)
        return df.iloc[np.argsort(-np.abs(df["robust_z"].to_numpy()), kind="stable")].reset_index(drop=True)

    def alignment(self) -> pd.DataFrame:
        """:func:`neuron_alignment` of every layer (a ``layer`` column added)."""
        return pd.concat([neuron_alignment(v).assign(layer=n) for n, v in self.vh.items()], ignore_index=True)

    # ------------------------------------------------------------------ audit
    def audit(self, rel: RelevanceStats, layer: str, carries: np.ndarray, cls: int, *,
              model: nn.Module | None = None, data: Any = None, region: np.ndarray | None = None,
              percentile: float = MAP_PERCENTILE, max_maps: int = 32) -> dict[str, Any]:
        """Does one direction carry a concept you know the images of (a suspected shortcut, a watermark)?

        ``carries``: bool per image of the dataset (indexed by id) -- which images carry the concept.
        The concept's direction is the one whose projection (``rel.proj``) best separates them
        (AUROC, either pole: ``sign`` -1 means the concept sits at the negative pole and the figures
        are for ``-v``). Returned: ``direction, sign, auroc``; ``z`` and ``rank`` of that direction for
        class ``cls`` (step 4, this object's ``by``) and the class's ``top3``; ``outlier_auroc``: how well
        the robust z of the projection within each label (step 6) flags the carrying images of the
        other classes (NaN when they all or none carry it). With ``model``, ``data`` and ``region``
        (bool (H, W): where the concept is in the image), the concept maps of up to ``max_maps``
        carrying images at ``percentile``: ``map_iou`` and ``map_cover`` (the share of the region the
        mask covers). Nothing is modified.
        """
        from sklearn.metrics import roc_auc_score

        self._check_layer(layer)
        if layer not in rel.proj:
            raise ConceptEvoError(f"the relevance pass kept no per-image projections for layer {layer!r} "
                                  "(keep_images=False?)")
        carries = np.asarray(carries, bool)
        if carries.ndim != 1 or carries.size <= int(rel.ids.max()):
            raise DataError(f"carries must be one bool per image of the dataset "
                            f"(>= {int(rel.ids.max()) + 1}), got shape {carries.shape}")
        got = carries[rel.ids]
        if got.all() or not got.any():
            raise DataError("carries must mark some but not all of the relevance pass's images")
        proj = rel.proj[layer]
        auc = np.array([roc_auc_score(got, proj[:, j]) for j in range(proj.shape[1])])
        j = int(np.argmax(np.maximum(auc, 1 - auc)))
        sign = 1.0 if auc[j] >= 0.5 else -1.0
        z = class_zscores(rel.sums[self.by][layer], rel.sumsq[self.by][layer], rel.counts[self.by])[int(cls)]
        z[j] *= sign  # z is linear in P: the direction -v has -z
        order = _order_by_z(z)
        rank = int(np.flatnonzero(order == j)[0]) + 1
        off = rel.labels != int(cls)
        rz = robust_z_within(sign * proj[:, j], rel.labels)
        out = {"layer": layer, "class": int(cls), "direction": j, "sign": int(sign),
               "auroc": float(max(auc[j], 1 - auc[j])), "z": float(z[j]), "rank": rank,
               "top3": [int(d) for d in order[:3]],
               "outlier_auroc": (float(roc_auc_score(got[off], rz[off])) if 0 < got[off].sum() < off.sum()
                                 else float("nan"))}
        if model is not None and data is not None and region is not None:
            from .data import as_image_set

            ds = as_image_set(data)
            sel = rel.ids[got][:max_maps]
            maps, _masks = self.concept_map(model, ds.batch(torch.as_tensor(sel))[0], layer, j, percentile)
            maps = sign * maps
            region = np.asarray(region, bool)
            if region.shape != maps.shape[1:]:
                raise DataError(f"region has shape {region.shape}; the images are {maps.shape[1:]}")
            thr = np.percentile(maps.reshape(len(sel), -1), percentile, axis=1)
            masks = maps >= thr[:, None, None]
            out["map_iou"] = float(np.mean([(m & region).sum() / (m | region).sum() for m in masks]))
            out["map_cover"] = float(np.mean([(m & region).sum() / max(region.sum(), 1) for m in masks]))
        return out


# ================================================================ top images
def direction_stimuli(models: Sequence[nn.Module] | nn.Module, data: Any,
                      directions: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray], k: int = 10,
                      batch_size: int = 64, device: str | torch.device = "cpu", backend: str = "auto",
                      progress: bool = False) -> list[dict[str, dict[str, np.ndarray]]]:
    """Top-k and bottom-k images of every direction, one forward-only pass for all models.

    The projections ``Ā·Vhᵀ`` (B, D) and their negations are fed to the stimulus top-k kernels
    (:func:`conceptevo.kernels.update`) as 2D extra 1x1 channels, so the order and ties are the
    stimuli's (value desc, image id asc). Returns per model ``{layer: {"ids", "values",
    "bottom_ids", "bottom_values"}}`` (D, k) arrays; ``bottom_values`` are the projections
    themselves (most negative first).
    """
    from . import kernels
    from .data import as_image_set
    from .stimuli import choose_backend

    ds = as_image_set(data)
    models = [models] if isinstance(models, nn.Module) else list(models)
    dirs = [directions] * len(models) if isinstance(directions, Mapping) else list(directions)
    if len(dirs) != len(models):
        raise ConceptEvoError(f"{len(dirs)} direction sets for {len(models)} models")
    dev = torch.device(device)
    bk = choose_backend(dev, backend)
    shape = tuple(torch.as_tensor(ds[0][0]).shape)
    adapters, vhs, states = [], [], []
    for m, dset in zip(models, dirs):
        ad = ModelAdapter(m.to(dev).eval(), layers=list(dset), input_shape=shape)
        v = {}
        for n, vh in dset.items():
            vh = np.asarray(vh)
            if vh.ndim != 2 or vh.shape[1] != ad.channels[n]:
                raise LayerError(f"directions of layer {n!r} have shape {vh.shape}; the layer has {ad.channels[n]} channels")
            v[n] = torch.as_tensor(vh, dtype=torch.float32, device=dev)
        adapters.append(ad)
        vhs.append(v)
        states.append({n: kernels.new_state(2 * v[n].shape[0], int(k), len(ds), 0, dev) for n in v})
    starts = range(0, len(ds), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"direction top-k x{len(models)}", unit="batch", leave=False)
    with torch.inference_mode():
        for s in starts:
            ids = torch.arange(s, min(len(ds), s + batch_size), dtype=torch.int64)
            x, _y = ds.batch(ids)
            x = x.to(dev)
            for m, ad, v, st in zip(models, adapters, vhs, states):
                def fold(name, out, v=v, st=st):
                    p = pooled(out, name) @ v[name].T
                    try:
                        kernels.update(st[name], torch.cat([p, -p], dim=1).contiguous(), ids, backend=bk)
                    except ActivationError as exc:
                        raise ActivationError(f"layer {name!r}: {exc}") from None

                _forward_layers(m, ad, x, fold)
    out = []
    for v, st in zip(vhs, states):
        res = {}
        for n in v:
            d = v[n].shape[0]
            ids_, vals = st[n].ids.cpu().numpy(), st[n].values.cpu().numpy()
            res[n] = {"ids": ids_[:d].copy(), "values": vals[:d].copy(),
                      "bottom_ids": ids_[d:].copy(), "bottom_values": -vals[d:]}
        out.append(res)
    return out


def project_directions(space: Any, top_ids: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Directions as virtual neurons: their top-k image ids placed in the unified space (Step 2.2).

    ``space``: a fitted :class:`conceptevo.space.UnifiedSpace`; ``top_ids``: ``{layer: (D, k)}``.
    Returns ``{layer: (D, dim)}`` float32 (NaN rows for directions without images).
    """
    return {n: space.project(np.asarray(ids, np.int64)) for n, ids in top_ids.items()}


def place_on_map(space: Any, vectors: np.ndarray, k: int = 10) -> np.ndarray:
    """2-D map positions (D, 2) of projected directions: the mean layout position of the ``k``
    nearest real neurons in the unified space (UMAP has one fit over the real neurons; this places
    the virtual ones beside their neighbours without refitting). NaN where there is no layout or
    no vector."""
    vectors = np.asarray(vectors, np.float32)
    out = np.full((len(vectors), 2), np.nan, np.float32)
    layout = space.layout
    if layout is None or not len(vectors):
        return out
    base = np.asarray(space.vectors, np.float32)
    ok = np.flatnonzero(np.isfinite(base).all(1) & np.isfinite(layout).all(1))
    if ok.size == 0:
        return out
    base, xy = base[ok], layout[ok]
    kk = min(int(k), len(ok))
    good = np.isfinite(vectors).all(1)
    q = vectors[good]
    d2 = (q * q).sum(1)[:, None] - 2 * q @ base.T + (base * base).sum(1)[None]
    nn_idx = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
    out[good] = xy[nn_idx].mean(axis=1)
    return out


# ======================================================= Eq. 2-4 on directions
def direction_importance(model_t: nn.Module, model_t2: nn.Module, data: Any, directions: Mapping[str, np.ndarray],
                         classes: Sequence[int] | None = None, max_images_per_class: int | None = None,
                         seed: int = 0, batch_size: int = 64, device: str | torch.device | None = None
                         ) -> pd.DataFrame:
    """Eq. 2-4 for directions: ``S_v(x) = Σ_hw (v·∂logit_c/∂Z^t)(v·(Z^{t'} - Z^t))``, ``I_v`` = share of S > 0.

    The change of the layer is projected on the direction (``ΔZ_v = v ⊗ (v·ΔZ)``, the analogue of
    Eq. 2's one-channel change) and weighed by the epoch-t gradient of each image's own class logit.
    Returns ``class, layer, direction, score, positives, total, mean_s, rank`` (rank 1 = most
    important in its class and layer: score desc, mean_s desc, direction asc).
    """
    from .adapter import EvalMode
    from .data import as_image_set
    from .importance import class_indices

    ds = as_image_set(data)
    per = class_indices(ds, classes, max_images_per_class, seed)
    cls = list(per)
    idx = np.concatenate([per[c] for c in cls])
    row_of = {c: i for i, c in enumerate(cls)}
    labels = ds.labels.numpy()
    if device is not None:
        model_t.to(device)
        model_t2.to(device)
    p0 = next(model_t.parameters(), None)
    dev = p0.device if p0 is not None else torch.device("cpu")
    shape = tuple(torch.as_tensor(ds[0][0]).shape)
    layers = list(directions)
    ad_t = ModelAdapter(model_t, layers=layers, input_shape=shape)
    ad_t2 = ModelAdapter(model_t2, layers=layers, input_shape=shape)
    V = {n: torch.as_tensor(np.asarray(directions[n]), dtype=torch.float32, device=dev) for n in layers}
    for n in layers:
        if V[n].dim() != 2 or V[n].shape[1] != ad_t.channels[n]:
            raise LayerError(f"directions of layer {n!r} have shape {tuple(V[n].shape)}; "
                             f"the layer has {ad_t.channels[n]} channels")
    pos = {n: torch.zeros(len(cls), V[n].shape[0], dtype=torch.int64, device=dev) for n in layers}
    sums = {n: torch.zeros(len(cls), V[n].shape[0], dtype=torch.float64, device=dev) for n in layers}
    totals = np.zeros(len(cls), np.int64)

    def proj(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, D, ...)
        return torch.einsum("bchw,dc->bdhw", t, v) if t.dim() == 4 else t @ v.T

    with EvalMode(model_t, model_t2):
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            x, y = ds.batch(torch.as_tensor(b))
            x, y = x.to(dev), y.to(dev)
            rows = torch.as_tensor([row_of[int(c)] for c in labels[b]], device=dev)
            z2: dict[str, torch.Tensor] = {}
            with torch.no_grad(), ad_t2.hooks(lambda n, o: z2.__setitem__(n, o.detach().clone())):
                model_t2(x)
            z: dict[str, torch.Tensor] = {}

            def keep(n, o):
                z[n] = o
                return o.clone()

            with torch.enable_grad(), ad_t.hooks(keep):
                logits = model_t(x.detach().requires_grad_(True))
                grads = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), [z[n] for n in layers],
                                            allow_unused=True)
            for n, g in zip(layers, grads):
                zt = z[n].detach()
                g = torch.zeros_like(zt) if g is None else g
                S = proj(g, V[n]) * proj(z2[n] - zt, V[n])
                S = S.flatten(2).sum(-1) if S.dim() == 4 else S
                pos[n].index_add_(0, rows, (S > 0).to(torch.int64))
                sums[n].index_add_(0, rows, S.double())
            np.add.at(totals, rows.cpu().numpy(), 1)
    frames = []
    for n in layers:
        p, sm = pos[n].cpu().numpy(), sums[n].cpu().numpy()
        d = p.shape[1]
        score = p / np.maximum(totals, 1)[:, None]
        mean_s = sm / np.maximum(totals, 1)[:, None]
        dirn = np.broadcast_to(np.arange(d), p.shape)
        order = np.lexsort((dirn, -mean_s, -score), axis=-1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(1, d + 1)[None].repeat(len(cls), 0), axis=-1)
        frames.append(pd.DataFrame({"class": np.repeat(cls, d), "layer": n, "direction": dirn.ravel(),
                                    "score": score.ravel(), "positives": p.ravel(),
                                    "total": np.repeat(totals, d), "mean_s": mean_s.ravel(),
                                    "rank": rank.ravel()}))
    return pd.concat(frames, ignore_index=True)


# ================================================================ pipeline stage
#: Parameters of the directions stage (``directions_*`` fields of the pipeline config map onto these).
STAGE_DEFAULTS: dict[str, Any] = {"k": 10, "images_per_class": 32, "center": False, "gradient": "logit",
                                  "by": "predicted", "outliers_top": 10, "classes_top": 5, "top": None,
                                  "basis": "svd", "ica_images": 10_000}


def _ica_sample(n: int, cap: int, seed: int) -> np.ndarray:
    """The images the ICA basis is fitted on: all of them, or ``cap`` drawn at random (sorted ids)."""
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False)).astype(np.int64)


def _load_models(spec: Any, epochs: Sequence[int], device: torch.device) -> list[nn.Module]:
    from .adapter import load_state_dict_file

    models = []
    for e in epochs:
        m = spec.factory()
        m.load_state_dict(load_state_dict_file(spec.checkpoints[e]), strict=True)
        models.append(m.to(device).eval())
    return models


def run_stage(store: Any, runs: Mapping[str, Any], data: Any, *, run_names: Sequence[str] | None = None,
              layers: LayerSpec = None, batch_size: int = 128, device: str | torch.device = "cpu", seed: int = 0,
              grams: Mapping[tuple[str, int], GramAccumulator] | None = None, evolution: tuple[int, int] | None = None,
              space: Any = None, input_keys: Sequence[str] = (), progress: bool = True,
              **params: Any) -> dict[str, pd.DataFrame]:
    """The directions stage over training runs: Gram -> eigh -> tracking -> top images -> relevance z.

    ``runs``: ``{name: RunSpec}`` (``.checkpoints {epoch: path}``, ``.factory``); ``run_names``:
    which of them (default: all). ``grams``: Gram accumulators already streamed in the stimulus
    pass, keyed ``(run, epoch)``; the missing ones are computed here (one forward pass per run).
    ``evolution=(t, t')``: also score the directions of epoch t with Eq. 2-4 (first run).
    ``space``: a fitted UnifiedSpace: the directions' top images are projected into it.
    ``params`` override :data:`STAGE_DEFAULTS`. ``basis="ica"``: FastICA filters of Ā instead of
    the SVD (:func:`ica_directions`, random state ``seed``), fitted on ``ica_images`` images drawn
    at random (all when fewer) by one :func:`pooled_pass` per checkpoint; ``grams`` are then not
    used, ``singular_value`` is the filter's scale ``‖Ā v‖`` on that sample and ``explained`` its
    share of the sample's ``‖Ā‖²``.

    Writes (with a :class:`~conceptevo.store.RunStore`): ``directions.parquet`` (run, epoch, layer,
    direction, basis, singular_value, explained, prev_direction, cos_prev, angle, status, subspace_angle,
    aligned_channel, alignment, effective_channels, top_images), ``direction_classes.parquet``
    (run, epoch, layer, class, direction, z, rank, count), ``direction_outliers.parquet``,
    ``direction_importance.parquet`` / ``direction_vectors.parquet`` when asked, and per checkpoint
    ``directions/<run>/epoch_XXX/<layer>.{vh,s,gram,sums,ids,bottom_ids}.npy``.
    The stage is skipped when its key (parameters + input keys) is unchanged.
    """
    from .stimuli import _layer_file

    bad = [k for k in params if k not in STAGE_DEFAULTS]
    if bad:
        raise ConceptEvoError(f"unknown directions parameter(s) {bad}; known: {sorted(STAGE_DEFAULTS)}")
    p = {**STAGE_DEFAULTS, **params}
    if p["basis"] not in BASES:
        raise ConceptEvoError(f"directions: basis must be one of {BASES}, got {p['basis']!r}")
    if int(p["ica_images"]) < 2:
        raise ConceptEvoError(f"directions: ica_images must be at least 2, got {p['ica_images']}")
    names = list(run_names) if run_names else list(runs)
    missing = [n for n in names if n not in runs]
    if missing:
        raise ConceptEvoError(f"directions: unknown run(s) {missing}; runs: {list(runs)}")
    dev = torch.device(device)
    key_params = {**p, "runs": names, "layers": layers, "seed": seed, "evolution": list(evolution or []),
                  "space": space is not None,
                  "checkpoints": {n: {int(e): str(runs[n].checkpoints[e]) for e in runs[n].checkpoints} for n in names}}
    key = store.stage_key(key_params, list(input_keys)) if store is not None else ""
    outputs = ["directions.parquet", "direction_classes.parquet", "direction_outliers.parquet"]
    if store is not None and store.is_done("directions", key):
        return {o.removesuffix(".parquet"): store.load_table(o.removesuffix(".parquet"))
                for o in store.stage_record("directions").get("outputs", outputs)
                if o.endswith(".parquet") and store.exists(o)}
    t0 = time.perf_counter()
    rows, class_rows, outlier_rows, vec_rows = [], [], [], []
    first_dirs: dict[int, dict[str, np.ndarray]] = {}
    for run in names:
        spec = runs[run]
        epochs = sorted(spec.checkpoints)
        models = _load_models(spec, epochs, dev)
        accs: dict[int, GramAccumulator] = {}
        if p["basis"] == "ica":  # FastICA needs Ā itself: one pass per checkpoint over a sample
            sample = _ica_sample(len(data), int(p["ica_images"]), seed)
            per_epoch, total = {}, {}
            unconverged = []
            for i, e in enumerate(epochs):
                acts = pooled_pass(models[i], data, layers=layers, batch_size=batch_size, device=dev,
                                   indices=sample, progress=progress)
                per_epoch[e] = {}
                for n, a in acts.items():
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", ICAConvergenceWarning)
                        per_epoch[e][n] = ica_directions(a, top=p["top"], seed=seed, layer=n)
                    if any(issubclass(rec.category, ICAConvergenceWarning) for rec in caught):
                        unconverged.append(f"{n}@{e}")
                    for rec in caught:
                        if not issubclass(rec.category, ICAConvergenceWarning):
                            warnings.warn_explicit(rec.message, rec.category, rec.filename, rec.lineno)
                total.update({(e, n): float(np.square(a, dtype=np.float64).sum()) for n, a in acts.items()})
            lnames = list(per_epoch[epochs[0]])
            if unconverged:  # one line for the run, not one per layer and checkpoint
                warnings.warn(f"directions ({run}): FastICA stopped at its iteration limit in {len(unconverged)} of "
                              f"{len(epochs) * len(lnames)} (layer, epoch) fits ({', '.join(unconverged[:6])}"
                              f"{', ...' if len(unconverged) > 6 else ''}); their near-Gaussian components are "
                              "arbitrary, skewed ones (rare concepts) usually settle first",
                              ICAConvergenceWarning, stacklevel=2)
        else:
            todo = [e for e in epochs if not (grams and (run, e) in grams)]
            if todo:
                got = gram_pass([models[epochs.index(e)] for e in todo], data, layers=layers, batch_size=batch_size,
                                device=dev, progress=progress)
                accs.update(zip(todo, got))
            for e in epochs:
                if e not in accs:
                    accs[e] = grams[(run, e)]  # type: ignore[index]
            partial = [e for e in epochs if any(c != len(data) for c in accs[e].count.values())]
            if partial:  # e.g. a resumed stimulus pass saw only part of the images: recompute those
                got = gram_pass([models[epochs.index(e)] for e in partial], data, layers=layers,
                                batch_size=batch_size, device=dev, progress=progress)
                accs.update(zip(partial, got))
            lnames = list(accs[epochs[0]].gram)
            items = [(accs[e].gram[n], accs[e].sums[n], accs[e].count[n]) for e in epochs for n in lnames]
            dec = batched_directions([(g.cpu().numpy(), s.cpu().numpy(), c) for g, s, c in items],
                                     center=bool(p["center"]), device=dev, top=p["top"])
            # total energy (trace of the decomposed matrix): the denominator of "explained" when only
            # the top directions are computed
            keys = [(e, n) for e in epochs for n in lnames]
            total = {key: float(torch.trace(g).item() - (float((s * s).sum()) / max(c, 1) if p["center"] else 0.0))
                     for key, (g, s, c) in zip(keys, items)}
            per_epoch = {e: {} for e in epochs}
            for (e, n), res in zip(keys, dec):
                per_epoch[e][n] = res
        vh_of = {e: {n: per_epoch[e][n][0] for n in lnames} for e in epochs}
        if run == names[0]:
            first_dirs = vh_of
        tops = direction_stimuli(models, data, [vh_of[e] for e in epochs], k=int(p["k"]), batch_size=batch_size,
                                 device=dev, progress=progress)
        tracks = {n: track([vh_of[e][n] for e in epochs]) for n in lnames}
        for i, e in enumerate(epochs):
            folder = f"directions/{run}/epoch_{e:03d}"
            for n in lnames:
                vh, s = per_epoch[e][n]
                if store is not None:
                    f = f"{folder}/{_layer_file(n)}"
                    store.save_array(f"{f}.vh", vh)
                    store.save_array(f"{f}.s", s)
                    if e in accs:  # the SVD basis: its Gram matrix and column sums
                        store.save_array(f"{f}.gram", accs[e].gram[n].cpu().numpy())
                        store.save_array(f"{f}.sums", accs[e].sums[n].cpu().numpy())
                    store.save_array(f"{f}.ids", tops[i][n]["ids"])
                    store.save_array(f"{f}.bottom_ids", tops[i][n]["bottom_ids"])
                al = neuron_alignment(vh)
                tr = tracks[n][i]
                m = min(5, vh.shape[0])
                sub = (float(np.degrees(principal_angles(vh_of[epochs[i - 1]][n][:m], vh[:m]).max()))
                       if i > 0 else np.nan)
                energy = s ** 2
                df = pd.DataFrame({"run": run, "epoch": e, "layer": n, "direction": np.arange(vh.shape[0]),
                                   "basis": p["basis"], "singular_value": s,
                                   "explained": energy / max(total[(e, n)], 1e-300),
                                   "prev_direction": tr["prev_direction"].to_numpy(),
                                   "cos_prev": tr["cos_prev"].to_numpy(), "angle": tr["angle"].to_numpy(),
                                   "status": tr["status"].to_numpy(), "subspace_angle": sub,
                                   "aligned_channel": al["aligned_channel"].to_numpy(),
                                   "alignment": al["alignment"].to_numpy(),
                                   "effective_channels": al["effective_channels"].to_numpy(),
                                   "top_images": list(tops[i][n]["ids"])})
                rows.append(df)
                if space is not None:
                    vecs = space.project(np.asarray(tops[i][n]["ids"], np.int64))
                    xy = place_on_map(space, vecs)
                    vec_rows.append(pd.DataFrame({"run": run, "epoch": e, "layer": n,
                                                  "direction": np.arange(vh.shape[0]), "vector": list(vecs),
                                                  "x": xy[:, 0], "y": xy[:, 1]}))
            # relevance over a per-class sample, z per class
            cd = ConceptDirections(layers=lnames, center=bool(p["center"]), gradient=str(p["gradient"]),
                                   by=str(p["by"]), batch_size=batch_size, device=dev)
            cd.vh = vh_of[e]
            cd.singular_values = {n: per_epoch[e][n][1] for n in lnames}
            rel = cd.relevance(models[i], data, max_images_per_class=int(p["images_per_class"]), seed=seed)
            ct = cd.class_concepts(rel).assign(run=run, epoch=e)
            class_rows.append(ct)
            if e == epochs[-1]:  # outliers along each class's top directions, last epoch, last layer
                last = lnames[-1]
                top = ct[(ct["layer"] == last) & (ct["rank"] <= 3)]
                for c, j in zip(top["class"], top["direction"]):
                    o = cd.outliers(rel, last, int(j), cls=int(c)).head(int(p["outliers_top"]))
                    if len(o):
                        outlier_rows.append(o.assign(run=run, epoch=e, layer=last, direction=int(j)))
        del models
    tables = {
        "directions": pd.concat(rows, ignore_index=True),
        "direction_classes": pd.concat(class_rows, ignore_index=True)[
            ["run", "epoch", "layer", "class", "direction", "z", "rank", "count"]],
        "direction_outliers": (pd.concat(outlier_rows, ignore_index=True) if outlier_rows else pd.DataFrame(
            columns=["class", "image", "label", "predicted", "projection", "robust_z", "run", "epoch", "layer",
                     "direction"])),
    }
    if evolution is not None and not all(e in runs[names[0]].checkpoints for e in evolution):
        import logging

        logging.getLogger(__name__).warning("directions: evolution epochs %s are not saved in run %r; "
                                            "direction_importance skipped", list(evolution), names[0])
        evolution = None
    if evolution is not None:
        t, t2 = evolution
        spec = runs[names[0]]
        m_t, m_t2 = _load_models(spec, [t, t2], dev)
        tables["direction_importance"] = direction_importance(
            m_t, m_t2, data, first_dirs[t], max_images_per_class=int(p["images_per_class"]), seed=seed,
            batch_size=batch_size).assign(run=names[0], epoch_t=t, epoch_t2=t2)
    if vec_rows:
        tables["direction_vectors"] = pd.concat(vec_rows, ignore_index=True)
    if store is not None:
        for name, df in tables.items():
            store.save_table(name, df)
        store.mark_done("directions", key, time.perf_counter() - t0, params=_jsonable(key_params),
                        seeds={"directions": seed}, outputs=[f"{n}.parquet" for n in tables] + ["directions/"])
    return tables


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, default=str))


# ====================================================================== report
def _png(arr: np.ndarray, scale: int = 2) -> str:
    from .patches import encode_png

    a = np.asarray(arr)
    if scale > 1:
        a = a.repeat(scale, 0).repeat(scale, 1)
    uri = encode_png(np.ascontiguousarray(a))
    return uri if uri.startswith("data:") else f"data:image/png;base64,{uri}"


def _overlay(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the pixels outside the concept-map mask darkened."""
    out = raw.astype(np.float32)
    out[~mask] *= 0.25
    return out.clip(0, 255).astype(np.uint8)


def _virtual_neuron_map(layout: np.ndarray, vecs: pd.DataFrame, labelled: set[int]) -> str:
    """PNG data URI: real neurons as grey dots, directions as stars (labelled ones named); "" if none placed."""
    ok = np.isfinite(vecs["x"].to_numpy(float)) & np.isfinite(vecs["y"].to_numpy(float)) if len(vecs) else []
    if not len(vecs) or not np.any(ok):
        return ""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    v = vecs[ok]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=80)
    real = layout[np.isfinite(layout).all(1)]
    ax.scatter(real[:, 0], real[:, 1], s=3, c="#c8c8c8", linewidths=0, label="neurons")
    ax.scatter(v["x"], v["y"], s=60, marker="*", c="#d62728", edgecolors="k", linewidths=0.4,
               label="directions (virtual neurons)")
    for r in v.itertuples():
        if int(r.direction) in labelled:
            ax.annotate(f"d{int(r.direction)}", (r.x, r.y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    import base64

    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def directions_report_section(tables: Mapping[str, pd.DataFrame], data: Any, *, run: str | None = None,
                              layer: str | None = None, top: int = 3, images: int = 4,
                              classes: Sequence[int] | None = None, epochs: Sequence[int] | None = None,
                              map_model: nn.Module | None = None, map_epoch: int | None = None,
                              map_vh: np.ndarray | None = None, percentile: float = MAP_PERCENTILE,
                              neuron_layout: np.ndarray | None = None) -> str:
    """HTML fragment: per class, its top concept directions at each epoch (top images; concept maps
    when ``map_model`` -- the model of ``map_epoch`` (default the last) -- and ``map_vh``, its
    directions of ``layer``, are given), the outliers along them, and each
    top direction's life across epochs (its chain of matched predecessors with angles).

    ``tables``: the output of :func:`run_stage` (or the parquet files loaded back). ``data``: the
    images (``raw(i)`` gives uint8 HxWx3). Defaults: the first run, its last layer, every class.
    ``neuron_layout``: the real neurons' 2-D map positions (N, 2); with the ``direction_vectors``
    table (the stage run with ``space=``) the section opens with that map, the layer's directions
    at the last epoch drawn on it as virtual neurons (stars) beside the real ones (grey dots).
    """
    import html

    dirs, cls_t = tables["directions"], tables["direction_classes"]
    if dirs.empty:
        return ""
    run = run if run is not None else str(dirs["run"].iloc[0])
    dirs = dirs[dirs["run"] == run]
    cls_t = cls_t[cls_t["run"] == run]
    layer = layer if layer is not None else str(dirs["layer"].iloc[-1])
    dirs, cls_t = dirs[dirs["layer"] == layer], cls_t[cls_t["layer"] == layer]
    all_epochs = sorted(dirs["epoch"].unique())
    epochs = list(epochs) if epochs is not None else all_epochs
    last = all_epochs[-1]
    names = list(getattr(data, "class_names", []) or [])
    outl = tables.get("direction_outliers")
    by_key = {(int(r.epoch), int(r.direction)): r for r in dirs.itertuples()}
    classes = list(classes) if classes is not None else sorted(cls_t["class"].unique())
    cd = None
    if map_model is not None:
        if map_vh is None:
            raise ConceptEvoError("concept maps need map_vh, the directions (D, C) of map_epoch's layer")
        cd = ConceptDirections(layers=[layer])
        cd.vh = {layer: np.asarray(map_vh, np.float64)}

    def thumbs(ids, direction=None, epoch=None) -> str:
        out = []
        ids = [int(i) for i in list(ids)[:images] if int(i) >= 0]
        masks = None
        if cd is not None and layer in cd.vh and direction is not None and epoch == (map_epoch or last) and ids:
            x = torch.stack([torch.as_tensor(data[i][0]) for i in ids])
            _maps, masks = cd.concept_map(map_model, x, layer, int(direction), percentile=percentile)
        for j, i in enumerate(ids):
            raw = data.raw(i)
            img = _overlay(raw, masks[j]) if masks is not None else raw
            out.append(f'<img src="{_png(img)}" title="image {i}" style="margin:1px">')
        return "".join(out)

    def life(epoch: int, d: int) -> str:
        chain, e, j = [], epoch, d
        while True:
            r = by_key.get((e, j))
            if r is None:
                break
            if r.status == "first" or int(r.prev_direction) < 0:
                chain.append(f"e{e}:d{j}")
                break
            chain.append(f"e{e}:d{j} ({r.angle:.0f}°, {r.status})")
            k = all_epochs.index(e)
            if k == 0:
                break
            e, j = all_epochs[k - 1], int(r.prev_direction)
        return " ← ".join(chain)

    basis = str(dirs["basis"].iloc[0]) if "basis" in dirs else "svd"  # tables written before the option: svd
    what = "SVD, Graziani et al." if basis == "svd" else "FastICA filters, the ICA option"
    parts = [f'<section id="directions-section"><h2>Concept directions ({basis.upper()}, {html.escape(run)}, layer '
             f'{html.escape(layer)})</h2><p class="note">Directions across the channels of a layer '
             f"({what}), ranked per class by the z-score of their gradient×activation relevance. "
             "Each cell: direction, z, and its top images"
             + (f" (concept map: top {100 - percentile:.0f}% of the direction's map kept)" if cd else "")
             + ". Life: the direction's matched predecessors back to the first epoch.</p>"]
    vecs = tables.get("direction_vectors")
    if neuron_layout is not None and vecs is not None and len(vecs):
        v = vecs[(vecs["run"] == run) & (vecs["layer"] == layer) & (vecs["epoch"] == last)]
        tops = cls_t[(cls_t["epoch"] == last) & (cls_t["rank"] == 1)]["direction"].astype(int).unique()
        png = _virtual_neuron_map(np.asarray(neuron_layout, np.float64), v, set(tops.tolist()))
        if png:
            parts.append(f'<p>The map with the directions of {html.escape(layer)} at epoch {last} as virtual '
                         'neurons (stars; labelled: some class\'s top direction), placed at the mean position of '
                         'the real neurons (grey) nearest to them in the unified space.</p>'
                         f'<img src="{png}" alt="directions on the map">')
    for c in classes:
        cname = f"{c}: {names[c]}" if c < len(names) else str(c)
        parts.append(f"<h3>{html.escape(cname)}</h3><table class='directions'><tr><th>epoch</th>"
                     + "".join(f"<th>#{r + 1}</th>" for r in range(top)) + "</tr>")
        for e in epochs:
            sel = cls_t[(cls_t["class"] == c) & (cls_t["epoch"] == e)].sort_values("rank").head(top)
            cells = []
            for r in sel.itertuples():
                info = by_key.get((int(e), int(r.direction)))
                ids = info.top_images if info is not None else []
                z = "nan" if not np.isfinite(r.z) else f"{r.z:.2f}"
                cells.append(f"<td>d{int(r.direction)} z={z}<br>{thumbs(ids, r.direction, e)}</td>")
            parts.append(f"<tr><td>{e}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
        best = cls_t[(cls_t["class"] == c) & (cls_t["epoch"] == last)].sort_values("rank").head(top)
        lives = "".join(f"<li>{html.escape(life(int(last), int(d)))}</li>" for d in best["direction"])
        parts.append(f"<p>Life of the top directions at epoch {last}:</p><ul>{lives}</ul>")
        if outl is not None and len(outl):
            o = outl[(outl["run"] == run) & (outl["class"] == c)].head(images * 2)
            if len(o):
                items = "".join(
                    f'<span style="display:inline-block;text-align:center;margin:2px">'
                    f'<img src="{_png(data.raw(int(r.image)))}"><br>'
                    f"d{int(r.direction)} z={r.robust_z:.1f}<br>label {int(r.label)} / pred {int(r.predicted)}</span>"
                    for r in o.itertuples())
                parts.append(f"<p>Outliers along these directions (robust z within the class):</p><div>{items}</div>")
    parts.append("</section>")
    return "\n".join(parts)


def stage_report_section(tables: Mapping[str, pd.DataFrame], data: Any, runs: Mapping[str, Any], *,
                         store: Any = None, device: str | torch.device = "cpu", **kw: Any) -> str:
    """:func:`directions_report_section` of the first analysed run, with concept maps at its last epoch."""
    from .stimuli import _layer_file

    dirs = tables["directions"]
    if dirs.empty:
        return ""
    run = str(dirs["run"].iloc[0])
    layer = str(dirs["layer"].iloc[-1])
    last = int(dirs[dirs["run"] == run]["epoch"].max())
    model = vh = None
    if store is not None and store.exists(f"directions/{run}/epoch_{last:03d}/{_layer_file(layer)}.vh.npy"):
        vh = store.load_array(f"directions/{run}/epoch_{last:03d}/{_layer_file(layer)}.vh")
        (model,) = _load_models(runs[run], [last], torch.device(device))
    if "neuron_layout" not in kw and store is not None:  # the unified space's map, saved by the pipeline
        from pathlib import Path

        f = Path(store.path("space")) / "layout.npy"
        if f.exists():
            kw["neuron_layout"] = np.load(f, allow_pickle=False)
    return directions_report_section(tables, data, run=run, layer=layer, map_model=model, map_epoch=last,
                                     map_vh=vh, **kw)


def tag_purity(top_ids: Mapping[str, np.ndarray], tags: Mapping[str, np.ndarray],
               tag_names: Mapping[str, Sequence[str]] | None = None, bottom_ids: Mapping[str, np.ndarray] | None = None,
               families: Sequence[str] | None = None) -> pd.DataFrame:
    """For every tag value: the direction whose top (or bottom) images carry it most often.

    ``top_ids``/``bottom_ids``: ``{layer: (D, k)}`` image ids (-1 = empty); ``tags``: family ->
    int codes (N,) (the built-in data's ground truth). Returns ``family, value, name, layer, direction,
    pole ("top"/"bottom"), purity`` (share of the pole's images with the value), ``chance`` (the
    value's share of all images) and ``lift = purity / chance``.
    """
    rows = []
    fams = list(families) if families is not None else list(tags)
    poles = [("top", top_ids)] + ([("bottom", bottom_ids)] if bottom_ids is not None else [])
    for fam in fams:
        codes = np.asarray(tags[fam])
        for v in np.unique(codes[codes >= 0]):
            chance = float(np.mean(codes == v))
            best = (-1.0, "", -1, "")
            for pole, ids_of in poles:
                for layer, ids in ids_of.items():
                    ids = np.asarray(ids)
                    valid = ids >= 0
                    hit = (codes[np.where(valid, ids, 0)] == v) & valid
                    pur = hit.sum(1) / np.maximum(valid.sum(1), 1)
                    j = int(np.argmax(pur))
                    if pur[j] > best[0]:
                        best = (float(pur[j]), layer, j, pole)
            name = str(tag_names[fam][v]) if tag_names and fam in tag_names else str(v)
            rows.append({"family": fam, "value": int(v), "name": name, "layer": best[1], "direction": best[2],
                         "pole": best[3], "purity": best[0], "chance": chance, "lift": best[0] / chance})
    return pd.DataFrame(rows)

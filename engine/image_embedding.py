"""Image embedding (paper Step 2.1) and projection of any neuron (Step 2.2).

The problem
-----------
Base neuron ``i`` has stimuli ``S_i`` (its top-``k`` images; ``-1`` marks an empty
slot, ``k_i`` is the number of valid ids) and a vector ``v_i`` from the neuron
embedding. Image vectors ``u_x`` are chosen so that every base neuron sits at the
mean of its stimuli's vectors::

    minimise  sum_i || (1/k_i) sum_{x in S_i} u_x - v_i ||^2  +  ridge * sum_{x constrained} ||u_x||^2

With ``A`` the sparse ``n x N`` matrix ``A[i, x] = 1/k_i`` for ``x in S_i`` this is
``min ||A U - V||_F^2 + ridge ||U_c||_F^2``: ordinary sparse linear least squares,
one problem with ``d`` right-hand sides. (An id listed twice by one neuron counts
twice, ``A[i, x] = 2/k_i``, exactly as in the mean.)

Why the ridge. Only *constrained* images (chosen by at least one base neuron)
appear in ``A``. When there are more of them than base neurons (``N_c > n``, the
usual case: 4,224 VGG16 neurons x 10 stimuli touch ~10,000 images) the system is
underdetermined and has infinitely many exact solutions; neurons with nearly the
same stimuli but different vectors make it ill-conditioned. The Tikhonov term
picks the solution of smallest norm and bounds the condition number. Its scale:
row ``i`` of ``A`` has squared norm ``1/k_i`` (0.1 for ``k = 10``), so the default
``ridge = 1e-3`` is about 1% of that — it shrinks directions that the data hardly
determine and leaves the rest alone. ``ridge = 0`` gives the minimum-norm
least-squares solution (pseudo-inverse).

The solver
----------
``method="auto"`` (the default) picks by size. Up to :data:`DIRECT_MAX_ROWS` rows of the smaller
Gram matrix it factorises that matrix by dense Cholesky (exact, no iteration; forming and
factorising it costs O(rows^3)). Above, it runs conjugate gradients on the normal equations, on
all ``d`` columns at once, matrix-free: ``A`` and ``A^T`` are applied, the Gram matrix is never
formed. CG runs on the smaller side of the problem, which has the same non-zero spectrum:

* ``n <= N_c`` (dual): ``(A A^T + ridge I) Y = V``, ``U = A^T Y``;
* ``n > N_c`` (primal): ``(A^T A + ridge I) U = A^T V``.

Both give the same ``U`` (the identity ``(A^T A + λI)^{-1} A^T = A^T (A A^T + λI)^{-1}``).
Stopping rule: the relative residual of the system solved is below ``tol`` in every column. The
default ``tol = 1e-6`` leaves an rms error in ``U`` of about ``1e-6`` of its rms value (float32
rounding level; measured at VGG16 scale), each further decade costs ~15% more iterations.

On the CPU the CG recurrences run in one fused Numba kernel (:func:`_cg_columns`: both sparse
products, the ridge term and the column dot products in one pass over each row, no temporaries);
the ``d`` columns are independent problems, so they are split into one group per CPU, each run by
a Python thread (the kernel releases the GIL), and the threads never wait for each other. The
NumPy/SciPy form of the same recurrences (:func:`_block_cg`, used by the torch path and by the tests as the reference) spends most of its
time in temporaries and in SciPy's single-threaded sparse products. At VGG16 scale (4,224 neurons,
k = 10, 20,000 images; ~350 iterations) the Numba kernel took 0.63 process-CPU seconds on this
2-core machine against 0.75-0.84 for the SciPy form and 1.1-3.8 for dense Cholesky (all measured
under a load average of ~14 on 2 cores, so wall times were 3-5x longer); Cholesky was cheaper
only below ~500 rows, where both take under 50 ms, hence ``DIRECT_MAX_ROWS = 500``. See
``python benchmarks/bench_image_embedding.py --crossover`` and ``benchmarks/RESULTS.md``. The
authors' gradient descent (learning rate 0.002, up to 10,000 iterations) takes far longer.
``method="cg"`` and ``method="direct"`` force either; ``method="lsqr"`` (SciPy LSQR per column) is
an exact alternative kept for checking. The torch path (``backend="torch"`` or a CUDA
``device``) runs the same CG with ``torch.sparse`` CSR products; it runs on CPU tensors too,
which is how the tests compare it with the CPU path (on a CPU it is slower, so ``"auto"`` only
takes it with CUDA). The first CG call in a fresh environment compiles the kernel (seconds; Numba
then caches it on disk).

Images no base neuron chose
---------------------------
They are absent from ``A`` but other checkpoints' neurons pick them, so they
need vectors. The paper's premise is that an image is a linear combination of
the concepts it contains; the concepts an image contains are the neurons it
activates most, its *responsive* neurons (``LayerStimuli.responsive``, mapped to
flat base-neuron ids). So an unconstrained image ``x`` is placed at the mean of
its responsive base neurons' vectors — the inverse of the projection rule — put
on the scale of the least-squares image vectors by an affine calibration fitted
on the constrained images (which have both a least-squares vector and responsive
neurons)::

    m_x = mean_{n in R_x} v_n
    u_x   = u_bar + alpha * (m_x - m_bar)
    alpha = argmin_a sum_{x constrained} ||u_x - u_bar - a (m_x - m_bar)||^2

(``u_bar``, ``m_bar``: means over the calibration images; ``alpha`` is clipped at 0,
i.e. responsive neurons that carry no positive signal leave the image at the
mean). The calibration matters: a mean of neuron vectors is a mean of means and
sits much closer to the centre than image vectors do. Base neurons without any
valid stimulus are left out of ``R_x`` (their vectors were never trained).
Images with neither constraint nor responsive neuron get the mean vector of all
constrained images. ``ImageFitInfo`` counts both groups and records ``alpha``.

This matters in practice: with two ``vgg_small`` models trained 4 epochs on the
built-in data (352 neurons, k = 10, 6,000 images) the base chose only 910 images,
and 20-55% of the other checkpoints' stimulus slots were unconstrained images. The
calibrated placement (alpha = 1.32 there) raised the across-model alignment lift
(:mod:`conceptevo.alignment`) over the mean fallback for every concept family
measured, e.g. class 3.74 -> 4.29, colour 2.09 -> 2.47, texture 2.71 -> 3.03; the
uncalibrated mean of responsive neurons sat in between (4.13, 2.40, 2.96).

Projection
----------
:func:`project` places the neurons of any checkpoint at the mean of their valid
stimuli's image vectors: one sparse matrix product. A neuron with no valid
stimulus (it never saw an image, e.g. fewer images than ``k`` or an empty layer)
has no place in the space: its row is NaN. That is deliberate — a dead neuron is
a finding, not a number to invent — and :func:`valid_rows` gives the mask that
UMAP, kNN and k-means use to leave such rows out.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
from numba import njit

from .errors import EmbeddingError

__all__ = [
    "ImageFitInfo",
    "design_matrix",
    "fit",
    "project",
    "valid_rows",
    "responsive_to_flat",
]

DEFAULT_RIDGE = 1e-3
DEFAULT_TOL = 1e-6
#: ``method="auto"`` solves by dense Cholesky up to this many rows of the smaller Gram matrix and by
#: CG above (the crossover measured by ``benchmarks/bench_image_embedding.py --crossover``).
DIRECT_MAX_ROWS = 500


@dataclass
class ImageFitInfo:
    """How the image vectors were obtained (stored in the run manifest)."""

    rmse: float  # sqrt(mean((A U - V)^2)) over fitted base neurons, all d dims
    rel_rmse: float  # rmse / sqrt(mean(V^2)): 0 = every base neuron exactly at its stimuli's mean
    iterations: int  # CG / LSQR iterations (0 for "direct")
    converged: bool
    n_constrained_images: int  # chosen by >= 1 base neuron: least-squares vectors
    n_unconstrained: int  # not chosen, placed from their responsive neurons
    n_fallback: int  # neither: mean of the constrained images' vectors
    n_neurons_fitted: int  # base neurons with >= 1 valid stimulus
    n_neurons_empty: int  # base neurons without any valid stimulus (no equation)
    alpha: float | None  # calibration slope for unconstrained images (None when none were placed)
    ridge: float
    method: str  # "cg-dual", "cg-primal", "direct", "lsqr"
    backend: str  # "numba" (CPU CG), "scipy" (direct, lsqr) or "torch:<device>"
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- inputs
def _stimuli_array(neuron_stimuli: Any, num_images: int, name: str) -> np.ndarray:
    arr = np.asarray(neuron_stimuli)
    if arr.ndim != 2:
        raise EmbeddingError(f"{name} must be a 2-D (neurons, k) array of image ids, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise EmbeddingError(f"{name} must hold integer image ids (-1 = empty slot), got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        bad = (arr < -1) | (arr >= num_images)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise EmbeddingError(
                f"{name}[{i}, {j}] = {arr[i, j]} is not an image id in [0, {num_images}) nor -1 "
                f"(empty slot); {int(bad.sum())} such entries"
            )
    return arr


def design_matrix(
    neuron_stimuli: np.ndarray, num_images: int, *, name: str = "neuron_stimuli"
) -> sp.csr_matrix:
    """The averaging matrix ``A`` (``n x num_images``, float64 CSR): ``A[i, x] = 1/k_i`` for ``x in S_i``.

    ``k_i`` counts the valid (``!= -1``) slots of row ``i``; a row without any is all
    zero. Built without a Python loop; duplicate ids stay as separate entries
    (SciPy sums them in every product).
    """
    if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 0:
        raise EmbeddingError(f"num_images must be a non-negative integer, got {num_images!r}")
    num_images = int(num_images)
    s = _stimuli_array(neuron_stimuli, num_images, name)
    valid = s >= 0
    counts = valid.sum(axis=1)
    indptr = np.zeros(s.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = s[valid]  # row-major boolean indexing keeps row order
    with np.errstate(divide="ignore"):
        inv = 1.0 / counts
    data = np.repeat(inv, counts)
    return sp.csr_matrix((data, indices, indptr), shape=(s.shape[0], num_images))


def valid_rows(vectors: np.ndarray) -> np.ndarray:
    """Bool mask of rows that have a place in the space (every coordinate finite)."""
    v = np.asarray(vectors)
    if v.ndim != 2:
        raise EmbeddingError(f"vectors must be 2-D (rows, dim), got shape {v.shape}")
    return np.isfinite(v).all(axis=1)


def responsive_to_flat(
    responsive: dict[str, np.ndarray] | list[np.ndarray], offsets: dict[str, int] | list[int]
) -> np.ndarray:
    """Per-layer responsive channel indices ``(N, k_i)`` -> flat base-neuron ids ``(N, sum k_i)``.

    ``responsive`` maps layer -> int array of channel indices (``-1`` = empty), as in
    ``LayerStimuli.responsive``; ``offsets`` gives each layer's first flat neuron id.
    """
    if isinstance(responsive, dict):
        names = list(responsive)
        if isinstance(offsets, dict):
            missing = [n for n in names if n not in offsets]
            if missing:
                raise EmbeddingError(f"responsive neurons given for layers {missing} that have no offset")
            offs = [int(offsets[n]) for n in names]
        else:
            offs = [int(o) for o in offsets]
        blocks = [np.asarray(responsive[n]) for n in names]
    else:
        blocks = [np.asarray(b) for b in responsive]
        offs = [int(o) for o in (offsets.values() if isinstance(offsets, dict) else offsets)]
    if len(blocks) != len(offs):
        raise EmbeddingError(f"{len(blocks)} responsive blocks but {len(offs)} layer offsets")
    if not blocks:
        raise EmbeddingError("no responsive neurons given (empty layer list)")
    out = []
    for b, o in zip(blocks, offs):
        if b.ndim != 2:
            raise EmbeddingError(f"responsive channels must be 2-D (images, k_i), got shape {b.shape}")
        b = b.astype(np.int64)
        out.append(np.where(b >= 0, b + o, -1))
    rows = {b.shape[0] for b in out}
    if len(rows) != 1:
        raise EmbeddingError(f"responsive blocks disagree on the number of images: {sorted(rows)}")
    return np.concatenate(out, axis=1)


# --------------------------------------------------------------------------- solvers
def _block_cg(
    matvec: Callable[[Any], Any], b: Any, tol: float, max_iter: int
) -> tuple[Any, int, bool]:
    """``d`` independent conjugate-gradient recurrences on the columns of ``b``, advanced together.

    Works on NumPy arrays and torch tensors alike (only ``+ - * /``, ``sum(0)`` and
    comparisons are used). Stops when ``||r_j|| <= tol * ||b_j||`` for every column ``j``.
    """
    x = b * 0
    r = b + 0
    p = r + 0
    rz = (r * r).sum(0)
    thresh = (tol * tol) * rz
    if bool((rz <= thresh).all()):
        return x, 0, True
    for it in range(1, max_iter + 1):
        q = matvec(p)
        pq = (p * q).sum(0)
        alpha = rz / (pq + (pq == 0))  # a column already solved exactly has p = 0: step 0, not 0/0
        x += alpha * p
        r -= alpha * q
        rz_new = (r * r).sum(0)
        if bool((rz_new <= thresh).all()):
            return x, it, True
        p = r + (rz_new / (rz + (rz == 0))) * p
        rz = rz_new
    return x, max_iter, False


@njit(cache=True, nogil=True)
def _cg_columns(o_ptr, o_idx, o_val, i_ptr, i_idx, i_val, m, b, ridge, tol, max_iter):  # pragma: no cover
    """CG on ``(O I + ridge) x = b`` for the columns of ``b`` (``O``: s x m CSR, ``I``: m x s CSR).

    The recurrences of :func:`_block_cg` (same stopping rule), written out as loops so that the two
    sparse products, the ridge term and the column dot products are fused and make no temporaries.
    """
    s, d = b.shape
    x = np.zeros((s, d))
    r = b.copy()
    p = b.copy()
    q = np.empty((s, d))
    w = np.empty((m, d))
    rz = np.zeros(d)
    alpha = np.empty(d)
    beta = np.empty(d)
    pq = np.empty(d)
    for i in range(s):
        for j in range(d):
            rz[j] += r[i, j] * r[i, j]
    thresh = tol * tol * rz
    done = True
    for j in range(d):
        if rz[j] > thresh[j]:
            done = False
    if done:
        return x, 0, True
    for it in range(1, max_iter + 1):
        for k in range(m):
            for j in range(d):
                w[k, j] = 0.0
            for t in range(i_ptr[k], i_ptr[k + 1]):
                c = i_idx[t]
                v = i_val[t]
                for j in range(d):
                    w[k, j] += v * p[c, j]
        pq[:] = 0.0
        for i in range(s):
            for j in range(d):
                q[i, j] = ridge * p[i, j]
            for t in range(o_ptr[i], o_ptr[i + 1]):
                c = o_idx[t]
                v = o_val[t]
                for j in range(d):
                    q[i, j] += v * w[c, j]
            for j in range(d):
                pq[j] += p[i, j] * q[i, j]
        for j in range(d):
            alpha[j] = rz[j] / pq[j] if pq[j] != 0.0 else 0.0
        pq[:] = 0.0  # reused: r.r
        for i in range(s):
            for j in range(d):
                x[i, j] += alpha[j] * p[i, j]
                r[i, j] -= alpha[j] * q[i, j]
                pq[j] += r[i, j] * r[i, j]
        done = True
        for j in range(d):
            beta[j] = pq[j] / rz[j] if rz[j] != 0.0 else 0.0
            rz[j] = pq[j]
            if pq[j] > thresh[j]:
                done = False
        if done:
            return x, it, True
        for i in range(s):
            for j in range(d):
                p[i, j] = r[i, j] + beta[j] * p[i, j]
    return x, max_iter, False

def _cg_numba(outer: sp.csr_matrix, inner: sp.csr_matrix, b: np.ndarray, ridge: float, tol: float,
              max_iter: int) -> tuple[np.ndarray, int, bool]:
    """``(outer @ inner + ridge I) x = b`` by :func:`_cg_columns`, the columns split over threads.

    The columns are independent problems: each thread runs the kernel (which releases the GIL) on
    its own group and never waits for the others (no barrier per iteration: on a busy machine a
    spinning barrier costs more than the work).
    """
    d = b.shape[1]
    o, i = outer.copy(), inner.copy()
    o.sum_duplicates()
    i.sum_duplicates()
    args = (o.indptr.astype(np.int64), o.indices.astype(np.int64), o.data,
            i.indptr.astype(np.int64), i.indices.astype(np.int64), i.data, i.shape[0])
    b = np.ascontiguousarray(b, dtype=np.float64)
    groups = max(1, min(d, _cpu_threads()))
    bounds = np.linspace(0, d, groups + 1).round().astype(int)

    def run(g: int):
        cols = np.ascontiguousarray(b[:, bounds[g]:bounds[g + 1]])
        return _cg_columns(*args, cols, float(ridge), float(tol), int(max_iter))

    if groups == 1:
        parts = [run(0)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(groups) as pool:
            parts = list(pool.map(run, range(groups)))
    x = np.concatenate([p[0] for p in parts], axis=1) if parts else np.zeros_like(b)
    return x, max(int(p[1]) for p in parts), all(bool(p[2]) for p in parts)


def _cpu_threads() -> int:
    """CPUs this process may run on (Numba's thread setting when lower: NUMBA_NUM_THREADS)."""
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    import numba

    return max(1, min(n, numba.get_num_threads()))


def _solve_scipy(a: sp.csr_matrix, v: np.ndarray, ridge: float, method: str, tol: float, max_iter: int,
                 engine: str = "numba"):
    n, nc = a.shape
    at = a.T.tocsr()
    if method == "lsqr":
        from scipy.sparse.linalg import lsqr

        cols, its = [], 0
        for j in range(v.shape[1]):
            res = lsqr(a, v[:, j], damp=math.sqrt(ridge), atol=tol, btol=tol, iter_lim=max_iter)
            cols.append(res[0])
            its = max(its, int(res[2]))
        u = np.stack(cols, axis=1) if cols else np.zeros((nc, 0))
        return u, its, its < max_iter, "lsqr"
    if method == "direct":
        if ridge == 0:
            u = np.linalg.lstsq(a.toarray(), v, rcond=None)[0]
            return u, 0, True, "direct"
        import scipy.linalg as sl

        # Cholesky of the smaller Gram matrix (positive definite for ridge > 0)
        g = (a @ at if n <= nc else at @ a).toarray()
        g[np.diag_indices_from(g)] += ridge
        factor = sl.cho_factor(g, lower=True, overwrite_a=True, check_finite=False)
        if n <= nc:
            return at @ sl.cho_solve(factor, v, check_finite=False), 0, True, "direct"
        return sl.cho_solve(factor, at @ v, check_finite=False), 0, True, "direct"
    # CG on the smaller side; with ridge = 0 only the primal side is safe (A A^T may be singular).
    cg = _cg_numba if engine == "numba" else _cg_numpy
    if n <= nc and ridge > 0:
        y, its, ok = cg(a, at, v, ridge, tol, max_iter)
        return at @ y, its, ok, "cg-dual"
    u, its, ok = cg(at, a, at @ v, ridge, tol, max_iter)
    return u, its, ok, "cg-primal"


def _cg_numpy(outer: sp.csr_matrix, inner: sp.csr_matrix, b: np.ndarray, ridge: float, tol: float,
              max_iter: int) -> tuple[np.ndarray, int, bool]:
    """The same system by :func:`_block_cg` on SciPy products (the reference for the Numba kernel)."""
    return _block_cg(lambda p: outer @ (inner @ p) + ridge * p, b, tol, max_iter)


def _torch_csr(m: sp.csr_matrix, device: Any, dtype: Any):
    import torch

    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested against SciPy
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)).to(device),
            torch.from_numpy(m.indices.astype(np.int64)).to(device),
            torch.from_numpy(m.data).to(device=device, dtype=dtype),
            size=m.shape,
            dtype=dtype,
            device=device,
            check_invariants=False,  # SciPy built it canonical (sorted, no duplicates)
        )


def _solve_torch(
    a: sp.csr_matrix, v: np.ndarray, ridge: float, method: str, tol: float, max_iter: int, device: Any
):
    import torch

    if method not in ("cg", "auto"):
        raise EmbeddingError(f"method={method!r} is SciPy only; the torch backend solves with method='cg'")
    dtype = torch.float64
    a = a.copy()
    a.sum_duplicates()  # torch CSR products expect one entry per (row, col)
    at = a.T.tocsr()
    at.sum_duplicates()
    ta, tat = _torch_csr(a, device, dtype), _torch_csr(at, device, dtype)
    tv = torch.from_numpy(v).to(device=device, dtype=dtype)
    n, nc = a.shape
    if n <= nc and ridge > 0:
        y, its, ok = _block_cg(lambda p: ta @ (tat @ p) + ridge * p, tv, tol, max_iter)
        u, name = tat @ y, "cg-dual"
    else:
        u, its, ok = _block_cg(lambda p: tat @ (ta @ p) + ridge * p, tat @ tv, tol, max_iter)
        name = "cg-primal"
    return u.cpu().numpy(), its, ok, name


def _choose_backend(backend: str, device: Any) -> tuple[str, Any]:
    """-> ("scipy", None) or ("torch", device)."""
    dev = None if device is None else str(device)
    if backend == "scipy":
        if dev is not None and dev != "cpu":
            raise EmbeddingError(f"backend='scipy' runs on the CPU; got device={device!r}")
        return "scipy", None
    if backend == "torch":
        if dev is None:
            from .backends import cuda_available

            dev = "cuda" if cuda_available() else "cpu"
        return "torch", dev
    if dev is not None:
        return ("scipy", None) if dev == "cpu" else ("torch", dev)
    from .backends import select

    chosen = select("solve", backend)
    return ("torch", "cuda") if chosen == "torch-cuda" else ("scipy", None)


# --------------------------------------------------------------------------- fit
def fit(
    neuron_stimuli: np.ndarray,
    neuron_vectors: np.ndarray,
    num_images: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    responsive: np.ndarray | None = None,
    method: str = "auto",
    backend: str = "auto",
    device: Any = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = 20_000,
) -> tuple[np.ndarray, ImageFitInfo]:
    """Image vectors ``(num_images, d)`` float32 from the base neurons (see the module docstring).

    Parameters
    ----------
    neuron_stimuli: int ``(n, k)`` image ids of the base neurons' stimuli, ``-1`` = empty slot.
    neuron_vectors: float ``(n, d)`` base neuron embedding.
    num_images: size of the image set (ids are ``0..num_images-1``).
    ridge: Tikhonov weight on the constrained images' vectors (>= 0).
    responsive: optional int ``(num_images, r)`` flat base-neuron ids of every image's
        responsive neurons (``-1`` = empty; see :func:`responsive_to_flat`), used to
        place images no base neuron chose. Without it those images get the mean.
    method: ``"auto"`` (default: ``"direct"`` when the smaller Gram matrix has at most
        :data:`DIRECT_MAX_ROWS` rows and ``ridge > 0``, else ``"cg"``), ``"cg"``, ``"direct"`` or ``"lsqr"``.
    backend: ``"auto"`` (torch on CUDA when available, else SciPy), ``"scipy"``,
        ``"torch"`` (torch CG on ``device``, CPU if none), ``"cpu"`` / ``"gpu"``.
    device: torch device for the torch path; a CUDA device implies ``backend="torch"``.
    tol: relative residual at which CG / LSQR stop.
    max_iter: iteration cap; hitting it warns and sets ``info.converged = False``.
    """
    t0 = time.perf_counter()
    if isinstance(ridge, bool) or not (isinstance(ridge, Real) and math.isfinite(ridge) and ridge >= 0):
        raise EmbeddingError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if method not in ("auto", "cg", "direct", "lsqr"):
        raise EmbeddingError(f"unknown method {method!r}; use 'auto', 'cg', 'direct' or 'lsqr'")
    if not (tol > 0):
        raise EmbeddingError(f"tol must be > 0, got {tol!r}")
    a_full = design_matrix(neuron_stimuli, num_images)
    n, num_images = a_full.shape
    v = np.asarray(neuron_vectors)
    if v.ndim != 2 or v.shape[0] != n:
        raise EmbeddingError(
            f"neuron_vectors must be (neurons, dim) with {n} rows to match neuron_stimuli, "
            f"got shape {v.shape}"
        )
    if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
        raise EmbeddingError("neuron_vectors must be finite floats (NaN/inf found or not a float array)")
    d = v.shape[1]
    v = v.astype(np.float64)

    fitted = np.diff(a_full.indptr) > 0  # neurons with >= 1 valid stimulus
    if not fitted.any():
        raise EmbeddingError("no base neuron has a valid stimulus: every row of neuron_stimuli is -1")
    constrained = np.zeros(num_images, dtype=bool)
    constrained[a_full.indices] = True
    cidx = np.flatnonzero(constrained)
    a = a_full[fitted][:, cidx].tocsr()  # only rows/columns that take part in the equations
    vf = v[fitted]

    if method in ("direct", "lsqr") and backend == "auto" and device is None:
        kind, dev = "scipy", None  # "direct" and "lsqr" are SciPy-only reference solvers
    else:
        kind, dev = _choose_backend(backend, device)
    if method == "auto":  # by size: a dense factorisation is cheaper than CG on small problems
        small = ridge > 0 and min(a.shape) <= DIRECT_MAX_ROWS
        method = "direct" if kind == "scipy" and small else "cg"
    if kind == "scipy":
        uc, its, ok, name = _solve_scipy(a, vf, float(ridge), method, tol, max_iter)
        backend_name = "numba" if name.startswith("cg") else "scipy"
    else:
        uc, its, ok, name = _solve_torch(a, vf, float(ridge), method, tol, max_iter, dev)
        backend_name = f"torch:{dev}"
    if not ok:
        warnings.warn(
            f"image embedding: {name} stopped after max_iter={max_iter} iterations above tol={tol}; "
            "raise max_iter or ridge",
            RuntimeWarning,
            stacklevel=2,
        )
    if not np.isfinite(uc).all():
        raise EmbeddingError(f"image embedding solve ({name}, {backend_name}) produced non-finite vectors")

    u = np.zeros((num_images, d), dtype=np.float64)
    u[cidx] = uc
    u_bar = uc.mean(axis=0)
    n_unc, n_fb, alpha = 0, 0, None
    free = ~constrained
    if free.any():
        if responsive is None:
            u[free] = u_bar
            n_fb = int(free.sum())
        else:
            n_unc, n_fb, alpha = _place_unconstrained(u, constrained, responsive, v, fitted, u_bar)

    u32 = u.astype(np.float32)
    resid = a @ u32[cidx].astype(np.float64) - vf
    rmse = float(np.sqrt(np.mean(resid**2))) if resid.size else 0.0
    scale = float(np.sqrt(np.mean(vf**2))) if vf.size else 0.0
    info = ImageFitInfo(
        rmse=rmse,
        rel_rmse=rmse / scale if scale > 0 else 0.0,
        iterations=int(its),
        converged=bool(ok),
        n_constrained_images=int(cidx.size),
        n_unconstrained=n_unc,
        n_fallback=n_fb,
        n_neurons_fitted=int(fitted.sum()),
        n_neurons_empty=int(n - fitted.sum()),
        alpha=alpha,
        ridge=float(ridge),
        method=name,
        backend=backend_name,
        seconds=time.perf_counter() - t0,
    )
    return u32, info


def _place_unconstrained(
    u: np.ndarray,
    constrained: np.ndarray,
    responsive: np.ndarray,
    v: np.ndarray,
    fitted: np.ndarray,
    u_bar: np.ndarray,
) -> tuple[int, int, float | None]:
    """Fill ``u`` in place for images outside the least-squares problem. Returns (placed, fallback, alpha)."""
    num_images, n = u.shape[0], v.shape[0]
    r = np.asarray(responsive)
    if r.ndim != 2 or r.shape[0] != num_images:
        raise EmbeddingError(
            f"responsive must be (num_images={num_images}, r) flat neuron ids, got shape {r.shape}"
        )
    if r.dtype == np.bool_ or not np.issubdtype(r.dtype, np.integer):
        raise EmbeddingError(f"responsive must hold integer neuron ids (-1 = empty), got dtype {r.dtype}")
    r = r.astype(np.int64)
    bad = (r < -1) | (r >= n)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise EmbeddingError(f"responsive[{i}, {j}] = {r[i, j]} is not a base neuron id in [0, {n}) nor -1")
    # Neurons without stimuli have untrained vectors: they do not vote.
    r = np.where((r >= 0) & fitted[np.clip(r, 0, None)], r, -1)
    m_mat = design_matrix(r, n, name="responsive")
    has = np.diff(m_mat.indptr) > 0
    m = m_mat @ v  # (N, d) mean responsive-neuron vector (0 rows where none)

    cal = constrained & has
    if cal.sum() >= 2:
        m_bar = m[cal].mean(axis=0)
        uc_bar = u[cal].mean(axis=0)
        dm = m[cal] - m_bar
        den = float((dm * dm).sum())
        alpha = float(((u[cal] - uc_bar) * dm).sum() / den) if den > 0 else 0.0
        alpha = max(alpha, 0.0)
    else:  # nothing to calibrate on: the plain mean of the responsive neurons
        m_bar, uc_bar, alpha = np.zeros_like(u_bar), np.zeros_like(u_bar), 1.0
    place = ~constrained & has
    fb = ~constrained & ~has
    u[place] = uc_bar + alpha * (m[place] - m_bar)
    u[fb] = u_bar
    return int(place.sum()), int(fb.sum()), (alpha if place.any() else None)


# --------------------------------------------------------------------------- projection
def project(neuron_stimuli: np.ndarray, image_vectors: np.ndarray) -> np.ndarray:
    """Vectors ``(m, d)`` float32 of any checkpoint's neurons: the mean of their stimuli's image vectors.

    Rows of neurons without any valid stimulus are NaN (see the module docstring and
    :func:`valid_rows`).
    """
    u = np.asarray(image_vectors)
    if u.ndim != 2:
        raise EmbeddingError(f"image_vectors must be 2-D (images, dim), got shape {u.shape}")
    if not np.isfinite(u).all():
        raise EmbeddingError("image_vectors contain NaN or inf")
    a = design_matrix(neuron_stimuli, u.shape[0])
    out = a @ u.astype(np.float64)
    out[np.diff(a.indptr) == 0] = np.nan
    return out.astype(np.float32)

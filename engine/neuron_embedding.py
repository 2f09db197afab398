"""Neuron embedding (paper Step 1.3, Eq. 1): skip-gram with negative sampling over pairs.

``train`` is the Python face of the native trainer ``conceptevo._C.train_sgns``
(C++, OpenMP Hogwild, GIL released); ``conceptevo._reference.numpy_reference_train`` is the same
algorithm written plainly in NumPy, one pair at a time, and is the test oracle:
with ``threads=1`` the two give bit-identical vectors.

The exact algorithm (update order, random streams, initialisation, learning-rate
schedule, dot-product summation order) is specified at the top of
``csrc/sgns.cpp``. In short, for every pair ``(a, b)`` of the (shuffled) pair list
and ``R`` negatives ``r_j`` drawn from the negative distribution::

    gp  = sigmoid(v_a . v_b) - 1
    g_a = gp * v_b + sum_j sigmoid(v_rj . v_a) * v_rj
    g_b = gp * v_a + sum_j sigmoid(v_rj . v_b) * v_rj
    v_a -= lr_t * g_a ;  v_b -= lr_t * g_b        (then the v_rj if update_negatives)

with every gradient computed from the vectors before the pair's first write, as
in the authors' code (which updates only ``v_a`` and ``v_b``: the default here).
Initial vectors are uniform in ``[-init_range, init_range)``; the default 0.5
matches the authors' ``np.random.rand(dim) - 0.5`` (word2vec uses ``0.5 / dim``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Iterator

import numpy as np

from .errors import EmbeddingError, InputError

__all__ = [
    "EmbeddingResult",
    "train",
    "negative_table",
    "alias_table",
    "alias_probabilities",
]

MAX_NEGATIVES = 64  # csrc/sgns.cpp kMaxNegatives
_LANES = 8


@dataclass
class EmbeddingResult:
    """Neuron vectors and the training trace.

    Unpacks as ``vectors, losses = result`` (the two-value contract of
    docs/ARCHITECTURE.md).
    """

    vectors: np.ndarray  # float32 (num_neurons, dim)
    losses: np.ndarray  # float64 (epochs_run,): mean per-pair term of Eq. 1 during each epoch
    grad_norms: np.ndarray  # float64 (epochs_run,): mean per-pair gradient norm
    epochs_run: int
    pairs_per_second: float
    params: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.vectors
        yield self.losses


# --------------------------------------------------------------------------- checks
def _int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be {rng}, got {value}")
    return value


def _real(name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if (positive and value <= 0) or value < 0:
        raise InputError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_pairs(pairs: np.ndarray, num_neurons: int) -> np.ndarray:
    arr = np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"pairs must have shape (P, 2), got {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"pairs must hold integer neuron ids, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise EmbeddingError(
            "no co-activated pairs to train on (pairs is empty): no image is shared by two base-model "
            "neurons' stimuli"
        )
    bad = (arr < 0) | (arr >= num_neurons)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise InputError(
            f"pairs[{i}, {j}] = {int(arr[i, j])} is not a neuron id in [0, num_neurons={num_neurons})"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)


def _check_init(init: np.ndarray | None, num_neurons: int, dim: int) -> np.ndarray | None:
    if init is None:
        return None
    arr = np.asarray(init)
    if arr.shape != (num_neurons, dim):
        raise InputError(f"init must have shape (num_neurons, dim) = ({num_neurons}, {dim}), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError("init holds NaN or infinite values (after conversion to float32)")
    return arr


# ------------------------------------------------------------ negative distribution
def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table for sampling index ``i`` with probability ``w_i / sum(w)``.

    Built in exact integer arithmetic: the weights are scaled to integers summing to
    ``n * 2**32`` and every column holds a threshold in ``[0, 2**32]`` and an alias.
    A draw takes one 64-bit random ``x``: column ``c = ((x >> 32) * n) >> 32``, keep
    ``c`` if ``(x & 0xffffffff) < threshold[c]`` else take ``alias[c]``.

    Returns ``(threshold uint64 (n,), alias int32 (n,))``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise InputError(f"negative-sampling weights must be a non-empty 1-D array, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise InputError("negative-sampling weights must be finite and >= 0")
    total = float(w.sum())
    if total <= 0:
        raise InputError("negative-sampling weights are all zero")
    n = w.size
    one = 1 << 32
    target = n * one
    q = [int(v) for v in np.floor(w / total * target)]
    # Spread the rounding remainder (|rest| < 2n) over the largest weights so the sum is exact.
    rest = target - sum(q)
    biggest = np.argsort(-w, kind="stable")[: int(np.count_nonzero(w))].tolist()
    for k in range(abs(rest)):
        q[biggest[k % len(biggest)]] += 1 if rest > 0 else -1
    threshold = [one] * n
    alias = list(range(n))
    small = [i for i in range(n) if q[i] < one]
    large = [i for i in range(n) if q[i] >= one]
    while small and large:
        s, l = small.pop(), large.pop()
        threshold[s], alias[s] = q[s], l
        q[l] -= one - q[s]
        (small if q[l] < one else large).append(l)
    # Leftovers hold exactly 2**32 (integer arithmetic), i.e. always keep the column.
    return np.array(threshold, dtype=np.uint64), np.array(alias, dtype=np.int32)


def alias_probabilities(threshold: np.ndarray, alias: np.ndarray) -> np.ndarray:
    """The distribution an alias table samples from (ignoring the < n / 2**32 column bias)."""
    thr = np.asarray(threshold, dtype=np.float64) / 2.0**32
    n = thr.size
    return (thr + np.bincount(np.asarray(alias), weights=1.0 - thr, minlength=n)) / n


def negative_table(
    neg_dist: str | np.ndarray, pairs: np.ndarray, num_neurons: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Alias table for ``neg_dist``: ``"uniform"`` (the paper; returns None),
    ``"unigram075"`` (word2vec: pair-count frequency ** 0.75) or explicit weights ``(n,)``."""
    if isinstance(neg_dist, str):
        if neg_dist == "uniform":
            return None
        if neg_dist == "unigram075":
            counts = np.bincount(np.asarray(pairs).ravel(), minlength=num_neurons).astype(np.float64)
            return alias_table(counts**0.75)
        raise InputError(f"neg_dist must be 'uniform', 'unigram075' or an array of weights, got {neg_dist!r}")
    w = np.asarray(neg_dist)
    if w.shape != (num_neurons,):
        raise InputError(f"neg_dist weights must have shape (num_neurons,) = ({num_neurons},), got {w.shape}")
    return alias_table(w)


# ----------------------------------------------------------------------- the trainer
def train(
    pairs: np.ndarray,
    num_neurons: int,
    dim: int = 30,
    lr: float = 0.05,
    negatives: int = 3,
    epochs: int = 10,
    seed: int = 0,
    threads: int | None = None,
    lr_decay: bool = False,
    neg_dist: str | np.ndarray = "uniform",
    tol: float = 0.0,
    progress: bool = True,
    *,
    update_negatives: bool = False,
    shuffle: bool = True,
    init: np.ndarray | None = None,
    init_range: float = 0.5,
) -> EmbeddingResult:
    """Learn one vector per neuron from co-activated pairs (paper Eq. 1; dim 30, lr 0.05, R 3).

    Args:
        pairs: int ``(P, 2)`` neuron ids (from :func:`conceptevo.pairs.build_pairs`).
        num_neurons: number of base-model neurons; ids must be below it. Neurons in no
            pair keep their initial vector (unless picked as negatives with
            ``update_negatives``).
        dim, lr, negatives: embedding size, SGD step, negatives ``R`` per pair.
        epochs: passes over the pair list (each reshuffled when ``shuffle``).
        seed: seeds the initial vectors, the shuffles and the negatives.
        threads: OpenMP threads (None = all). 1 is bit-reproducible; more threads run
            Hogwild (same pair order and negatives, racy interleaving of updates).
        lr_decay: linear decay of the step to ``lr * 1e-4`` over all epochs (word2vec).
        neg_dist: ``"uniform"`` (paper), ``"unigram075"`` or weights ``(num_neurons,)``.
        tol: stop after an epoch whose mean gradient norm is below ``tol`` (0 = never).
        progress: show a progress bar over epochs.
        update_negatives: also step the negatives' vectors (full SGD on Eq. 1); the
            authors' code does not.
        shuffle: reshuffle the pair list every epoch (seeded); else keep the given order.
        init: float32 ``(num_neurons, dim)`` initial vectors; default uniform in
            ``[-init_range, init_range)``.

    Returns:
        :class:`EmbeddingResult` (unpacks to ``vectors, losses``).

    Raises:
        EmbeddingError: empty pairs, or training diverged (non-finite loss).
        InputError (a ValueError): a parameter or pair id out of range (named in the message).
    """
    from . import _C

    num_neurons = _int("num_neurons", num_neurons, 1, 2**31 - 1)
    pairs32 = _check_pairs(pairs, num_neurons)
    dim = _int("dim", dim, 1, 65536)
    lr = _real("lr", lr, positive=True)
    negatives = _int("negatives", negatives, 0, MAX_NEGATIVES)
    epochs = _int("epochs", epochs, 0)
    seed = _int("seed", seed, 0, 2**64 - 1)
    threads = 0 if threads is None else _int("threads", threads, 1)
    tol = _real("tol", tol, positive=False)
    init_range = _real("init_range", init_range, positive=True)
    init = _check_init(init, num_neurons, dim)
    table = negative_table(neg_dist, pairs32, num_neurons)
    thr, alias = (None, None) if table is None else table

    bar = None
    callback = None
    if progress and epochs > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="neuron embedding", unit="epoch", leave=False)

        def callback(epoch: int, loss: float, gnorm: float) -> bool:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", grad=f"{gnorm:.4f}")
            return True

    start = time.perf_counter()
    try:
        vectors, losses, grads, epochs_run = _C.train_sgns(
            pairs32, num_neurons, dim=dim, lr=lr, negatives=negatives, epochs=epochs, lr_decay=bool(lr_decay),
            seed=seed, threads=threads, tol=tol, init=init, init_range=init_range,
            update_negatives=bool(update_negatives), shuffle=bool(shuffle), neg_threshold=thr,
            neg_alias=alias, on_epoch=callback,
        )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    _check_diverged(losses, grads, lr)
    return EmbeddingResult(
        vectors=vectors,
        losses=losses,
        grad_norms=grads,
        epochs_run=int(epochs_run),
        pairs_per_second=(
            epochs_run * pairs32.shape[0] / elapsed if epochs_run and elapsed > 0 else float("nan")
        ),
        params=dict(dim=dim, lr=lr, negatives=negatives, epochs=epochs, seed=seed, lr_decay=bool(lr_decay),
                    neg_dist=neg_dist if isinstance(neg_dist, str) else "weights", tol=tol,
                    update_negatives=bool(update_negatives), shuffle=bool(shuffle), init_range=init_range,
                    threads=threads or _C.max_threads()),
    )


def _check_diverged(losses: np.ndarray, grads: np.ndarray, lr: float) -> None:
    if losses.size and not (np.isfinite(losses[-1]) and np.isfinite(grads[-1])):
        raise EmbeddingError(
            f"neuron embedding diverged at epoch {losses.size - 1} (loss = {losses[-1]}, gradient norm = "
            f"{grads[-1]}); lower the learning rate (lr = {lr}) or init_range"
        )

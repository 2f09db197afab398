"""Co-activated neuron pairs (paper Step 1.2).

For every image, the base-model neurons that have it among their stimuli form a
list; the list is shuffled and a sliding window of length two turns it into
``len - 1`` pairs. Repeating this ``E`` times with fresh shuffles gives the
multiset ``D`` that the neuron embedding (Step 1.3, Eq. 1) is trained on; a pair
of neurons appears in ``D`` more often the more images their stimuli share.

Implementation (fully vectorised NumPy, no per-image Python loop): the valid
``(neuron, image)`` entries are grouped by image once (a CSR layout obtained by a
stable argsort). For every repeat a random 32-bit key is drawn per entry and the
entries are sorted by ``(image rank << 32) | key``: images stay in ascending order while
the neurons inside each image are shuffled uniformly (two equal keys inside one
image, probability about ``len^2 / 2^33``, keep their previous relative order).
The pairs are then read off at the positions where two neighbours belong to the
same image. Images chosen by a single neuron give no pair and are dropped before
the sort. Cost per repeat: one stable sort of the shared entries, which are already
in image order, so it is close to linear. No C++ version: measured at ~20 M pairs/s
(1 core), several times faster than one trainer epoch over its own output.

Row order of the output (relied on by the tests and documented for users):
repeat-major, then image id ascending, then the position of the window in the
shuffled list. So for repeat ``e`` and image ``x`` with ``c`` neurons, the block of
``c - 1`` consecutive rows is a path ``n0-n1, n1-n2, ...`` over the ``c`` neurons.
"""
from __future__ import annotations

from numbers import Integral

import numpy as np

from .errors import EmbeddingError, InputError

__all__ = ["build_pairs", "validate_stimuli"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def validate_stimuli(neuron_stimuli: np.ndarray, num_images: int) -> np.ndarray:
    """Check a stimuli matrix and return it as C-contiguous int64 ``(n, k)``.

    Entries are image ids in ``[0, num_images)`` or ``-1`` for an empty slot; the
    ids of one neuron must be distinct (a neuron that lists an image twice would
    be paired with itself).
    """
    num_images = _check_int("num_images", num_images, 0)
    arr = np.asarray(neuron_stimuli)
    if arr.ndim != 2:
        raise InputError(
            f"neuron_stimuli must be a 2-D (neurons, k) array of image ids, got shape {arr.shape}"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"neuron_stimuli must hold integer image ids (-1 = empty slot), got dtype {arr.dtype}"
        )
    if arr.shape[0] >= 2**31:
        raise InputError(f"neuron_stimuli has {arr.shape[0]} neurons; neuron ids must fit in int32")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size:
        bad = (arr < -1) | (arr >= num_images)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise InputError(
                f"neuron_stimuli[{row}, {col}] = {int(arr[row, col])} is not an image id in "
                f"[0, num_images={num_images}) nor -1 (empty slot)"
            )
        srt = np.sort(arr, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if dup.any():
            row, col = (int(v) for v in np.argwhere(dup)[0])
            raise InputError(
                f"neuron_stimuli row {row} lists image {int(srt[row, col])} more than once; "
                "a neuron's stimuli must be distinct images"
            )
    return arr


def build_pairs(
    neuron_stimuli: np.ndarray,
    num_images: int,
    repeats: int = 1,
    seed: int = 0,
    *,
    return_images: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sample the co-activated neuron pairs ``D`` (paper Step 1.2).

    Args:
        neuron_stimuli: int ``(n, k)``; row ``i`` holds the image ids of neuron ``i``'s
            stimuli, ``-1`` marks an empty slot.
        num_images: size of the dataset; every id must be ``< num_images``.
        repeats: ``E``, the number of independent shuffles (>= 1).
        seed: seed of the NumPy ``Generator``; the same seed gives the same pairs.
        return_images: also return the image each pair came from.

    Returns:
        int32 ``(P, 2)`` neuron ids, ``P = repeats * sum_x (c_x - 1)`` over images ``x``
        chosen by ``c_x >= 2`` neurons; rows ordered as described in the module doc.
        With ``return_images``: ``(pairs, images)`` where ``images`` is int64 ``(P,)``.

    Raises:
        InputError (a ValueError): malformed stimuli or parameters (names the entry at fault).
        EmbeddingError: no image is shared by two neurons, so there is nothing to embed.
    """
    stim = validate_stimuli(neuron_stimuli, num_images)
    repeats = _check_int("repeats", repeats, 1)
    seed = _check_int("seed", seed, 0)

    rows, _ = np.nonzero(stim >= 0)
    images = stim[stim >= 0]  # row-major, so aligned with ``rows``
    counts = np.bincount(images, minlength=num_images) if images.size else np.zeros(0, np.int64)
    shared = counts[images] >= 2 if images.size else np.zeros(0, bool)
    if not shared.any():
        raise EmbeddingError(
            f"no image is among the stimuli of two or more neurons ({stim.shape[0]} neurons, "
            f"{images.size} stimuli over {num_images} images), so there are no co-activated pairs to "
            "learn neuron embeddings from; use more stimuli per neuron (k) or more base-model neurons"
        )
    rows, images = rows[shared], images[shared]

    # CSR by image: a stable sort keeps neurons ascending inside each image.
    order = np.argsort(images, kind="stable")
    img_sorted = images[order]
    nrn_sorted = rows[order].astype(np.int32)
    left = np.flatnonzero(img_sorted[1:] == img_sorted[:-1])  # first element of each window
    per_repeat = left.size
    # Compact image rank so (rank << 32 | key) never overflows uint64.
    group = np.concatenate(([0], np.cumsum(img_sorted[1:] != img_sorted[:-1]))).astype(np.uint64)
    high = group << np.uint64(32)

    rng = np.random.default_rng(seed)
    out = np.empty((repeats * per_repeat, 2), dtype=np.int32)
    for e in range(repeats):
        keys = high | rng.integers(0, 2**32, size=img_sorted.size, dtype=np.uint64)
        # Groups stay put, members are permuted. The keys are already sorted by group, so
        # the stable sort (timsort over long presorted stretches) is ~6x faster than quicksort.
        shuffled = nrn_sorted[np.argsort(keys, kind="stable")]
        block = out[e * per_repeat : (e + 1) * per_repeat]
        block[:, 0] = shuffled[left]
        block[:, 1] = shuffled[left + 1]
    if return_images:
        return out, np.tile(img_sorted[left], repeats)
    return out

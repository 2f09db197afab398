"""Co-activated pairs (Step 1.2): the vectorised sampler against the plain-Python definition."""
from collections import Counter

import numpy as np
import pytest

from conceptevo._reference import build_pairs_reference
from conceptevo.errors import EmbeddingError
from conceptevo.pairs import build_pairs


def random_stimuli(rng, n, k, num_images, empty_frac=0.2):
    """Distinct image ids per row (many shared images when num_images is small), some -1 slots."""
    stim = np.stack([rng.choice(num_images, size=k, replace=False) for _ in range(n)]).astype(np.int64)
    stim[rng.random(stim.shape) < empty_frac] = -1
    return stim


def neurons_by_image(stim):
    out = {}
    for neuron, row in enumerate(stim.tolist()):
        for img in row:
            if img >= 0:
                out.setdefault(img, set()).add(neuron)
    return out


def check_paths(pairs, images, stim, repeats):
    """Every (repeat, image) block is a path visiting each neuron of that image exactly once."""
    groups = {img: s for img, s in neurons_by_image(stim).items() if len(s) >= 2}
    expected_rows = repeats * sum(len(s) - 1 for s in groups.values())
    assert pairs.shape == (expected_rows, 2) and images.shape == (expected_rows,)
    per_repeat = expected_rows // repeats
    for e in range(repeats):
        sl = slice(e * per_repeat, (e + 1) * per_repeat)
        imgs_e, pairs_e = images[sl], pairs[sl]
        assert np.all(np.diff(imgs_e) >= 0), "images ascending inside a repeat"
        seen = set()
        for img in np.unique(imgs_e).tolist():
            block = pairs_e[imgs_e == img]
            assert len(block) == len(groups[img]) - 1
            assert np.all(block[1:, 0] == block[:-1, 1]), "sliding window over one shuffled list"
            path = [int(block[0, 0])] + block[:, 1].tolist()
            assert len(set(path)) == len(path) and set(path) == groups[img]
            seen.add(img)
        assert seen == set(groups)


@pytest.mark.parametrize(
    "n,k,num_images,repeats", [(37, 5, 23, 3), (64, 10, 40, 2), (5, 3, 4, 7), (50, 1, 9, 2)]
)
def test_fast_and_reference_build_the_same_paths(n, k, num_images, repeats, rng):
    stim = random_stimuli(rng, n, k, num_images)
    stim[0] = -1  # a neuron with no stimuli at all
    seed = int(rng.integers(2**31))
    fast, fast_imgs = build_pairs(stim, num_images, repeats=repeats, seed=seed, return_images=True)
    ref, ref_imgs = build_pairs_reference(stim, num_images, repeats=repeats, seed=seed)
    assert fast.dtype == np.int32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast_imgs, ref_imgs)  # same deterministic row layout
    check_paths(fast, fast_imgs, stim, repeats)
    check_paths(ref, ref_imgs, stim, repeats)
    assert np.array_equal(build_pairs(stim, num_images, repeats, seed), fast)


def test_every_pair_shares_an_image_and_isolated_neurons_never_appear(rng):
    stim = random_stimuli(rng, 80, 6, 60, empty_frac=0.0)
    # Neurons 70.. get private images nobody else uses.
    stim[70:] = np.arange(60, 60 + 10 * 6).reshape(10, 6)
    pairs = build_pairs(stim, 120, repeats=4, seed=3)
    sets = [set(r[r >= 0].tolist()) for r in stim]
    assert all(sets[a] & sets[b] for a, b in pairs.tolist())
    assert pairs.max() < 70
    assert np.all(pairs[:, 0] != pairs[:, 1])


def test_seeds_are_reproducible_and_repeats_reshuffle(rng):
    # 200 images each chosen by the same 6 neurons: identical shuffles are astronomically unlikely.
    stim = np.tile(np.arange(200), (6, 1))
    seed = int(rng.integers(2**31))
    a = build_pairs(stim, 200, repeats=2, seed=seed)
    np.testing.assert_array_equal(a, build_pairs(stim, 200, repeats=2, seed=seed))
    assert not np.array_equal(a, build_pairs(stim, 200, repeats=2, seed=seed + 1))
    half = len(a) // 2
    assert not np.array_equal(a[:half], a[half:])


def test_shuffle_is_uniform_over_orders():
    # One image shared by 3 neurons: each of the 6 orders should appear ~1/6 of the time.
    stim = np.array([[0], [0], [0]])
    pairs = build_pairs(stim, 1, repeats=6000, seed=11).reshape(6000, 2, 2)
    orders = Counter((int(p[0, 0]), int(p[0, 1]), int(p[1, 1])) for p in pairs)
    assert len(orders) == 6
    freq = np.array(list(orders.values())) / 6000
    assert np.all(np.abs(freq - 1 / 6) < 0.025)


def test_small_cases():
    pairs = build_pairs(np.array([[3, -1], [-1, 3]]), 4, repeats=5, seed=0)
    assert pairs.shape == (5, 2)
    assert set(map(tuple, pairs.tolist())) <= {(0, 1), (1, 0)}
    with pytest.raises(EmbeddingError, match="no image is among the stimuli of two"):
        build_pairs(np.array([[0, 1]]), 2)  # one neuron
    with pytest.raises(EmbeddingError):
        build_pairs(np.array([[0, 1], [2, 3]]), 4)  # nothing shared
    with pytest.raises(EmbeddingError):
        build_pairs(np.full((4, 3), -1), 10)  # no stimuli
    with pytest.raises(EmbeddingError):
        build_pairs(np.zeros((0, 5), dtype=np.int64), 10)


@pytest.mark.parametrize(
    "stim,num_images,kw,match",
    [
        (np.array([[0.0, 1.0]]), 2, {}, "integer"),
        (np.array([0, 1]), 2, {}, "2-D"),
        (np.array([[0, 5], [1, 2]]), 5, {}, r"neuron_stimuli\[0, 1\] = 5"),
        (np.array([[0, 1], [-2, 1]]), 5, {}, r"neuron_stimuli\[1, 0\] = -2"),
        (np.array([[0, 1], [3, 3]]), 5, {}, "row 1 lists image 3 more than once"),
        (np.array([[0, 1], [0, 1]]), 5, {"repeats": 0}, "repeats"),
        (np.array([[0, 1], [0, 1]]), 5, {"seed": -1}, "seed"),
        (np.array([[0, 1], [0, 1]]), 5, {"seed": 1.5}, "seed"),
        (np.array([[0, 1], [0, 1]]), -1, {}, "num_images"),
    ],
)
def test_bad_inputs_are_named(stim, num_images, kw, match):
    with pytest.raises(ValueError, match=match):
        build_pairs(stim, num_images, **kw)

"""Stimulus-pass kernels: every implementation equals the reference, and the reference equals a
brute-force reading of the definition, on fresh random inputs (ties, odd sizes, layouts, dtypes).

The Triton kernel is tested in tests/test_kernels_triton.py (interpreter on CPU tensors).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptevo import kernels as K
from conceptevo.errors import ActivationError, BackendError, ConceptEvoError, DataError
from conceptevo.kernels import reference

FAST = ["cpu"]  # fast CPU implementations compared with "reference"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# -- helpers --------------------------------------------------------------------------------------

def random_maps(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """float32 activations; "ties": small integers (many equal maxima within and across maps, +-0),
    "relu": rectified normals (many exact zeros), "normal": no ties."""
    if kind == "ties":
        x = rng.integers(-2, 3, size=shape).astype(np.float32)
        x[rng.random(shape) < 0.2] = -0.0  # -0 and +0 are equal maxima
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    return torch.from_numpy(x)


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if name == "strided" and x.ndim == 4:
        # a view that is neither NCHW- nor NHWC-contiguous (every other column of a wider map)
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def brute_spatial_max(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The definition read literally: float32 values, first maximum in row-major order, -0 -> +0."""
    a = x.float().reshape(x.shape[0], x.shape[1], -1).numpy()
    values = np.empty(a.shape[:2], np.float32)
    pos = np.empty(a.shape[:2], np.int64)
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            best, where = a[b, c, 0], 0
            for i in range(1, a.shape[2]):
                if a[b, c, i] > best:
                    best, where = a[b, c, i], i
            values[b, c] = best + np.float32(0.0)  # -0 + 0 = +0
            pos[b, c] = where
    return values, pos


def brute_state(batches: list[tuple[torch.Tensor, np.ndarray]], k: int, k_i: int, n: int) -> dict[str, np.ndarray]:
    """Per-channel top-k by sorting all (value, image) pairs; responsive rows by sorting channels."""
    cands = {}  # channel -> list of (value, id, row, col)
    c = batches[0][0].shape[1]
    out = {name: np.asarray(a).copy() for name, a in K.state_to_numpy(K.new_state(c, k, n, k_i)).items()}
    for x, ids in batches:
        w = x.shape[3] if x.ndim == 4 else 1
        vals, pos = brute_spatial_max(x)
        for bi, img in enumerate(ids):
            for ch in range(c):
                cands.setdefault(ch, []).append((vals[bi, ch], int(img), pos[bi, ch] // w, pos[bi, ch] % w))
            order = sorted(range(c), key=lambda ch: (-vals[bi, ch], ch))[:k_i]
            out["resp_values"][img, : len(order)] = vals[bi, order]
            out["resp_ids"][img, : len(order)] = order
    for ch, lst in cands.items():
        top = sorted(lst, key=lambda t: (-t[0], t[1]))[:k]
        for j, (v, img, r, col) in enumerate(top):
            out["values"][ch, j], out["ids"][ch, j], out["rows"][ch, j], out["cols"][ch, j] = v, img, r, col
    return out


def assert_same(a: K.TopKState | dict, b: K.TopKState | dict) -> None:
    """Bitwise equality of every field (float fields compared as bit patterns)."""
    da = a if isinstance(a, dict) else K.state_to_numpy(a)
    db = b if isinstance(b, dict) else K.state_to_numpy(b)
    for name in K.STATE_FIELDS:
        x, y = np.asarray(da[name]), np.asarray(db[name])
        assert x.shape == y.shape, name
        if x.dtype == np.float32:
            x, y = x.view(np.int32), y.view(np.int32)
        if not np.array_equal(x, y):
            bad = np.argwhere(x != y)[:5].tolist()
            raise AssertionError(f"field {name} differs at {bad}: {da[name][tuple(np.array(bad).T)]} vs "
                                 f"{db[name][tuple(np.array(bad).T)]}")


def stream(backend: str, batches, c: int, k: int, n: int, k_i: int) -> K.TopKState:
    state = K.new_state(c, k, n, k_i)
    for x, ids in batches:
        K.update(state, x, torch.from_numpy(ids), backend=backend)
    return state


def make_batches(rng, n_images: int, c: int, hw: tuple[int, int] | None, sizes: list[int], kind: str,
                 dtype=torch.float32, mem="contiguous"):
    """The images of a dataset in random order, cut into batches of the given sizes (cycled)."""
    order = rng.permutation(n_images)
    batches, start, i = [], 0, 0
    while start < n_images:
        size = sizes[i % len(sizes)]
        ids = order[start:start + size].astype(np.int64)
        shape = (len(ids), c) + (hw if hw else ())
        batches.append((layout(random_maps(rng, shape, kind).to(dtype), mem), ids))
        start += size
        i += 1
    return batches


# -- the reference against the definition ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["ties", "relu", "normal"])
def test_reference_spatial_max_is_the_definition(rng, kind):
    x = random_maps(rng, (4, 5, 3, 7), kind)
    values, pos = reference.spatial_max(x)
    bv, bp = brute_spatial_max(x)
    assert np.array_equal(values.numpy().view(np.int32), bv.view(np.int32))
    assert np.array_equal(pos.numpy(), bp)


def test_reference_update_is_the_definition(rng):
    n, c = 23, 5
    batches = make_batches(rng, n, c, (3, 4), [4, 7, 1], "ties")
    state = stream("reference", batches, c, k=6, n=n, k_i=3)
    assert_same(state, brute_state(batches, 6, 3, n))


# -- fast implementations against the reference ---------------------------------------------------

@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """Run the CPU kernels' single-thread and multi-thread variants on the same small inputs."""
    from conceptevo.kernels import cpu_topk

    if request.param == "parallel":
        monkeypatch.setattr(cpu_topk, "PARALLEL_MIN_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mem", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_spatial_max_matches_reference(rng, backend, mem, dtype, threads):
    for shape in [(5, 7, 5, 3), (1, 3, 1, 9), (2, 4, 9, 1), (3, 70, 3, 3), (2, 3, 1, 1), (6, 9)]:
        for kind in ("ties", "relu", "normal"):
            x = layout(random_maps(rng, shape, kind).to(dtype), mem)
            v, r, c = K.spatial_max(x, backend=backend)
            rv, rr, rc = K.spatial_max(x, backend="reference")
            assert v.dtype == torch.float32 and r.dtype == torch.int32 and c.dtype == torch.int32
            assert torch.equal(v.view(torch.int32), rv.view(torch.int32)), (shape, kind)
            assert torch.equal(r, rr) and torch.equal(c, rc), (shape, kind)


@pytest.mark.parametrize("backend", FAST)
def test_spatial_max_extremes(backend, threads):
    """+-inf, all -inf maps (position 0), denormals, -0 vs +0 in both orders, large maps."""
    x = torch.full((3, 4, 5, 6), float("-inf"))
    x[0, 0, 2, 3] = float("inf")
    x[0, 1, 4, 5] = -1e-45  # the smallest negative denormal beats -inf
    x[1, 0] = -0.0
    x[1, 0, 3, 1] = 0.0     # equal to -0: the first (-0 at (0, 0)) wins, stored as +0
    x[1, 1] = 0.0
    x[1, 1, 0, 0] = -0.0
    x[2, 2, 1, 1] = 1e-40
    for mem in ("contiguous", "channels_last"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            y = layout(x.to(dtype), mem)
            v, r, c = K.spatial_max(y, backend=backend)
            rv, rr, rc = K.spatial_max(y, backend="reference")
            assert torch.equal(v.view(torch.int32), rv.view(torch.int32))
            assert torch.equal(r, rr) and torch.equal(c, rc)
            assert (r[2, 3], c[2, 3]) == (0, 0) and v[2, 3] == float("-inf")
            assert (r[1, 0], c[1, 0]) == (0, 0) and v[1, 0].view(torch.int32) == 0


@pytest.mark.parametrize("backend", FAST)
def test_large_maps_match_reference(rng, backend, threads):
    """Maps long enough for the lane-wise scan (>= 512 values): ties within a lane, across lanes,
    in the tail after the last full group of lanes, and a maximum only in the tail."""
    x = random_maps(rng, (2, 3, 37, 41), "relu")  # 1517 values: 23 groups of 64 + a tail of 45
    x[1, 2, 36, 40] = 100.0                        # the maximum is the map's last value (tail)
    x[0, 1].view(-1)[[700, 700 + 64, 1500]] = 100.0  # same lane, later group, tail: 700 wins
    x[0, 2].view(-1)[[1480, 1490]] = 50.0            # both in the tail: 1480 wins
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mem in ("contiguous", "channels_last"):
            y = layout(x.to(dtype), mem)
            got = K.spatial_max(y, backend=backend)
            assert all(torch.equal(a, b) for a, b in zip(got, K.spatial_max(y, backend="reference")))
            assert (got[1][0, 1] * 41 + got[2][0, 1]) == 700 and (got[1][0, 2] * 41 + got[2][0, 2]) == 1480
            assert (got[1][1, 2], got[2][1, 2]) == (36, 40)
        for kind in ("ties", "normal"):
            y = random_maps(rng, (2, 5, 23, 29), kind).to(dtype)  # 667 values: 10 groups + tail 27
            assert all(torch.equal(a, b) for a, b in zip(K.spatial_max(y, backend=backend),
                                                          K.spatial_max(y, backend="reference")))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    "n,c,hw,sizes,k,k_i,kind,mem",
    [
        (40, 6, (5, 3), [8], 4, 3, "ties", "contiguous"),
        (40, 6, (5, 3), [8], 4, 3, "ties", "channels_last"),
        (31, 5, (7, 7), [6, 1, 5], 10, 2, "relu", "contiguous"),
        (7, 4, (3, 3), [3], 12, 6, "ties", "channels_last"),  # k > image count, k_i > C
        (1, 3, (2, 5), [1], 3, 2, "normal", "contiguous"),      # a single image
        (25, 9, None, [4, 9], 5, 4, "ties", "contiguous"),       # Linear (B, C) outputs
        (20, 4, (4, 6), [5], 3, 0, "relu", "strided"),           # no responsive rows
    ],
)
def test_update_matches_reference(rng, backend, n, c, hw, sizes, k, k_i, kind, mem, threads):
    batches = make_batches(rng, n, c, hw, sizes, kind, mem=mem)
    fast = stream(backend, batches, c, k, n, k_i)
    assert_same(fast, stream("reference", batches, c, k, n, k_i))
    if n < 40:
        assert_same(fast, brute_state(batches, k, k_i, n))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_update_other_dtypes(rng, backend, dtype):
    n, c = 30, 5
    for mem in ("contiguous", "channels_last"):
        batches = make_batches(rng, n, c, (4, 5), [7], "relu", dtype=dtype, mem=mem)
        assert_same(stream(backend, batches, c, 5, n, 3), stream("reference", batches, c, 5, n, 3))


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_independent_of_batch_size_and_order(rng, backend):
    n, c, k, k_i = 37, 6, 5, 3
    base = make_batches(rng, n, c, (4, 3), [n], "ties")
    x_all, ids_all = base[0]
    results = []
    for sizes in ([n], [1], [5, 2, 9], [16]):
        perm = rng.permutation(n)
        batches, start, i = [], 0, 0
        while start < n:
            sel = perm[start:start + sizes[i % len(sizes)]]
            batches.append((x_all[sel], ids_all[sel]))
            start += len(sel)
            i += 1
        results.append(stream(backend, batches, c, k, n, k_i))
    for other in results[1:]:
        assert_same(results[0], other)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_inf_and_all_minus_inf_images_fill_empty_slots(backend):
    """An image whose maxima are -inf still counts as seen and ranks before empty slots."""
    x = torch.full((2, 3, 2, 2), float("-inf"))
    x[1, 1, 1, 0] = float("inf")
    state = K.new_state(3, 4, 5, 2)
    K.update(state, x, torch.tensor([3, 1]), backend=backend)
    assert state.ids[0].tolist() == [1, 3, -1, -1]
    assert state.ids[1].tolist() == [1, 3, -1, -1] and state.values[1, 0] == float("inf")
    assert (state.rows[1, 0].item(), state.cols[1, 0].item()) == (1, 0)
    assert state.resp_ids[3].tolist() == [0, 1] and state.resp_ids[1].tolist() == [1, 0]
    assert state.seen().tolist() == [False, True, False, True, False]
    assert_same(state, stream("reference", [(x, np.array([3, 1]))], 3, 4, 5, 2))


# -- merge ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_i", [0, 3])
def test_merge_is_exact_and_associative(rng, k_i):
    n, c, k = 45, 5, 6
    batches = make_batches(rng, n, c, (3, 3), [4, 7], "ties")
    whole = stream("cpu", batches, c, k, n, k_i)
    # three "ranks" with disjoint, unequal shards (one of them may be tiny)
    cut = sorted(rng.choice(np.arange(1, len(batches)), size=2, replace=False))
    shards = [batches[: cut[0]], batches[cut[0]: cut[1]], batches[cut[1]:]]
    a, b, d = (stream("cpu", s, c, k, n, k_i) for s in shards)
    left = K.merge(K.merge(a, b), d)
    right = K.merge(a, K.merge(b, d))
    assert_same(left, whole)
    assert_same(right, whole)
    assert_same(K.merge(d, K.merge(b, a)), whole)  # commutative too
    assert_same(K.merge(whole, K.new_state(c, k, n, k_i)), whole)  # the empty state is neutral
    assert_same(a, stream("cpu", shards[0], c, k, n, k_i))  # inputs untouched


def test_merge_refuses_overlapping_or_mismatched_states(rng):
    n, c = 12, 3
    batches = make_batches(rng, n, c, (2, 2), [4], "normal")
    a = stream("cpu", batches[:2], c, 4, n, 2)
    b = stream("cpu", batches[1:], c, 4, n, 2)
    with pytest.raises(DataError, match="in both states|fed to both"):
        K.merge(a, b)
    a0 = stream("cpu", batches[:2], c, 12, n, 0)  # k_i = 0: overlap still caught via the channels' ids
    b0 = stream("cpu", batches[1:], c, 12, n, 0)
    with pytest.raises(DataError, match="in both states"):
        K.merge(a0, b0)
    with pytest.raises(ConceptEvoError, match="different k"):
        K.merge(a, K.new_state(c, 5, n, 2))


# -- errors and edge cases -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_raises_and_leaves_state_unchanged(rng, backend, dtype):
    n, c = 10, 4
    state = stream(backend, make_batches(rng, 5, c, (3, 3), [5], "relu"), c, 3, n, 2)
    before = K.state_to_numpy(state)
    for mem in ("contiguous", "channels_last"):
        x = layout(random_maps(rng, (3, c, 3, 3), "relu").to(dtype), mem)
        x[2, 1, 2, 0] = float("nan") if mem == "contiguous" else -float("nan")
        with pytest.raises(ActivationError, match="NaN activations"):
            K.update(state, x, torch.tensor([5, 6, 7]), backend=backend)
        assert_same(state, before)
    lin = torch.zeros(2, c)
    lin[0, 3] = float("nan")
    with pytest.raises(ActivationError, match="NaN"):
        K.update(state, lin, [8, 9], backend=backend)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_empty_batch_is_a_noop(rng, backend):
    state = stream(backend, make_batches(rng, 6, 3, (2, 2), [3], "ties"), 3, 4, 8, 2)
    before = K.state_to_numpy(state)
    K.update(state, torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.int64), backend=backend)
    K.update(state, torch.zeros(0, 3), [], backend=backend)
    assert_same(state, before)


def test_bad_inputs_name_the_problem(rng):
    state = K.new_state(4, 3, 10, 2)
    with pytest.raises(ActivationError, match="5 channels but the state has 4"):
        K.update(state, torch.zeros(2, 5, 3, 3), [0, 1])
    with pytest.raises(ActivationError, match="floating-point"):
        K.update(state, torch.zeros(2, 4, 3, 3, dtype=torch.int64), [0, 1])
    with pytest.raises(ActivationError, match=r"\(B, C, H, W\) or \(B, C\)"):
        K.update(state, torch.zeros(2, 4, 3), [0, 1])
    with pytest.raises(DataError, match=r"outside \[0, 10\)"):
        K.update(state, torch.zeros(2, 4, 3, 3), [3, 10])
    with pytest.raises(DataError, match="repeat within the batch"):
        K.update(state, torch.zeros(2, 4, 3, 3), [3, 3])
    with pytest.raises(DataError, match=r"shape \(2,\)"):
        K.update(state, torch.zeros(2, 4, 3, 3), [3])
    with pytest.raises(DataError, match="integers"):
        K.update(state, torch.zeros(2, 4, 3, 3), torch.tensor([1.0, 2.0]))
    for backend in ("cpu", "reference"):
        s = K.new_state(4, 3, 10, 2)
        K.update(s, torch.rand(2, 4, 3, 3), [1, 2], backend=backend)
        with pytest.raises(DataError, match=r"\[2\] were already folded"):
            K.update(s, torch.rand(2, 4, 3, 3), [2, 3], backend=backend)
    with pytest.raises(BackendError, match="unknown top-k backend 'fast'"):
        K.update(state, torch.zeros(2, 4, 3, 3), [0, 1], backend="fast")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        K.new_state(4, 0, 10, 2)
    with pytest.raises(ValueError, match="channels"):
        K.new_state(0, 3, 10, 2)


def test_backend_resolution(monkeypatch):
    assert K.resolve_backend("cpu", "auto") == "cpu"
    assert K.resolve_backend("cpu", "reference") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        K.resolve_backend("cpu", "triton")
    with pytest.raises(BackendError, match="'cpu' needs CPU tensors"):
        K.resolve_backend("cuda", "cpu")
    assert set(K.available_backends()) == {"reference", "cpu", "triton"}


def test_state_round_trip_and_validation(rng):
    n, c = 9, 3
    state = stream("cpu", make_batches(rng, n, c, (2, 3), [4], "ties"), c, 4, n, 2)
    arrays = K.state_to_numpy(state)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32)}
    back = K.state_from_numpy(arrays)
    assert_same(back, state)
    back.values[0, 0] = 123.0  # a copy, not a view of the arrays
    assert arrays["values"][0, 0] != 123.0
    with pytest.raises(ConceptEvoError, match="missing"):
        K.state_from_numpy({k: v for k, v in arrays.items() if k != "rows"})
    with pytest.raises(ConceptEvoError, match="must be int64"):
        K.state_from_numpy({**arrays, "ids": arrays["ids"].astype(np.int32)})
    with pytest.raises(ConceptEvoError, match="shape"):
        K.state_from_numpy({**arrays, "rows": arrays["rows"][:, :2].copy()})
    fresh = K.new_state(c, 4, n, 2)
    assert fresh.values.dtype == torch.float32 and bool(torch.isneginf(fresh.values).all())
    assert (fresh.channels, fresh.k, fresh.num_images, fresh.k_i) == (c, 4, n, 2)
    assert int(fresh.ids.min()) == -1 == int(fresh.resp_ids.max())


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_activations_that_require_grad(rng, backend):
    """Hooks may fire while autograd records: the update must not need or keep gradients."""
    w = torch.ones(1, requires_grad=True)
    x = random_maps(rng, (3, 4, 2, 3), "ties") * w
    state = K.new_state(4, 2, 3, 1)
    K.update(state, x, [0, 1, 2], backend=backend)
    assert not state.values.requires_grad
    assert_same(state, stream("reference", [(x.detach(), np.arange(3))], 4, 2, 3, 1))

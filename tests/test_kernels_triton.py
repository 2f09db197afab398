"""The Triton top-k kernel equals the reference.

On the CPU the kernel runs in Triton's interpreter, which only works when ``TRITON_INTERPRET=1`` is
in the environment before triton is first imported (triton decorates its own library then). So
``test_interpreter_cases_in_a_fresh_process`` re-runs this file in a subprocess with the variable
set, where the ``cpu`` cases below run; in the parent process they are skipped. The interpreter is
slow: shapes stay small (B <= 6, C <= 8, H, W <= 7). On a CUDA machine the ``cuda`` cases run the
compiled kernel in-process.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import assert_same, layout, make_batches, random_maps, stream  # noqa: E402

from conceptevo import kernels as K  # noqa: E402
from conceptevo.errors import ActivationError, BackendError, DataError  # noqa: E402
from conceptevo.kernels import reference, triton_topk  # noqa: E402

INTERPRETING = triton_topk.interpret_mode()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess")),
    pytest.param("cuda", marks=pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs CUDA")),
]


def test_interpreter_cases_in_a_fresh_process():
    if INTERPRETING:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-rA", "-p", "no:cacheprovider", "-k", "cpu", str(Path(__file__))],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    # every cpu case of every device-parametrised test ran in the interpreter and passed, none skipped
    passed_cpu = [ln for ln in proc.stdout.splitlines() if ln.startswith("PASSED ") and ln.endswith("-cpu]")
                  or ln.startswith("PASSED ") and ln.endswith("[cpu]")]
    expected = _interpreter_case_count()
    assert expected >= 8 and len(passed_cpu) == expected, (expected, passed_cpu, proc.stdout[-3000:])
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b(skipped|failed|error)", summary) is None, summary


def _interpreter_case_count() -> int:
    """The number of ``cpu`` cases the parametrisations in this file define (tests taking ``device``)."""
    total = 0
    for name, fn in globals().items():
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"] if name.startswith("test_") else []
        names = [[a.strip() for a in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])]
                 for m in marks]
        if any("device" in n for n in names):
            total += math.prod(len(m.args[1]) for m, n in zip(marks, names) if "device" not in n)
    return total


def _check(x: torch.Tensor, segments: int | None = None, tile_hw: int | None = None) -> None:
    v, p, nan = triton_topk.spatial_max(x, segments=segments, tile_hw=tile_hw)
    rv, rp = reference.spatial_max(x)
    assert not bool(nan)
    assert torch.equal(v.view(torch.int32), rv.view(torch.int32))
    assert torch.equal(p.long(), rp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_spatial_max_matches_reference(rng, device, dtype):
    cases = [((5, 7, 5, 3), "contiguous", "ties"), ((4, 6, 7, 7), "channels_last", "ties"),
             ((3, 8, 1, 5), "contiguous", "relu"), ((2, 3, 6, 1), "channels_last", "normal"),
             ((3, 5, 4, 4), "strided", "ties"), ((6, 7), "contiguous", "ties")]
    for shape, mem, kind in cases:
        _check(layout(random_maps(rng, shape, kind).to(dtype), mem).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_extremes(device):
    x = torch.full((2, 3, 3, 4), float("-inf"))
    x[0, 0, 2, 3] = float("inf")
    x[1, 0] = -0.0
    x[1, 0, 2, 1] = 0.0
    x[1, 1, 0, 0] = -1e-45
    for mem in ("contiguous", "channels_last"):
        _check(layout(x, mem).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_tiles_and_segments_keep_the_first_maximum(rng, device):
    """Several tiles per program (a later equal tile maximum must not win) and H*W split over
    programs (the earliest segment holding the maximum wins, also for -inf maps)."""
    x = random_maps(rng, (2, 3, 7, 7), "ties")
    x[1, 2] = float("-inf")
    x[0, 1] = 1.0
    for mem in ("contiguous", "channels_last"):
        for segments, tile in ((None, 4), (None, 8), (2, None), (3, 4), (7, None)):
            _check(layout(x, mem).to(device), segments=segments, tile_hw=tile)
    cfg = triton_topk.launch_config((1, 1, 224, 224), (50176, 50176, 224, 1), None, 132)
    assert cfg["segments"] > 1 and cfg["FLAT"] == 1  # large map, few programs: split automatically


@pytest.mark.parametrize("device", DEVICES)
def test_update_stream_matches_reference(rng, device):
    n, c, k, k_i = 14, 5, 4, 3
    for hw, mem, dtype in [((4, 3), "contiguous", torch.float32), ((3, 5), "channels_last", torch.bfloat16),
                           (None, "contiguous", torch.float16)]:
        batches = make_batches(rng, n, c, hw, [6, 3], "ties", dtype=dtype, mem=mem)
        expected = stream("reference", batches, c, k, n, k_i)
        state = K.new_state(c, k, n, k_i, device=device)
        for x, ids in batches:
            K.update(state, x.to(device), torch.from_numpy(ids), backend="triton")
        assert_same(state.to("cpu"), expected)
    assert K.resolve_backend(device, "triton") == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_seen_images_raise(rng, device):
    state = K.new_state(4, 3, 8, 2, device=device)
    x = random_maps(rng, (3, 4, 3, 3), "relu").to(device)
    K.update(state, x, [0, 1, 2], backend="triton")
    before = K.state_to_numpy(state)
    y = random_maps(rng, (2, 4, 3, 3), "relu")
    y[1, 3, 2, 2] = float("nan")
    with pytest.raises(ActivationError, match="NaN activations"):
        K.update(state, y.to(device), [3, 4], backend="triton")
    with pytest.raises(DataError, match="already folded"):
        K.update(state, x[:1], [2], backend="triton")
    assert_same(state, before)


def test_interpreter_is_required_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        triton_topk.spatial_max(torch.zeros(1, 2, 2, 2))
    assert triton_topk.interpret_mode() is False

"""benchmarks/bench_space_scale.py --quick runs every stage and prints the table (no timing asserted)."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_space_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_space_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_mode_runs_every_stage(bench, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert bench.main(["--quick", "--sizes", "264,792", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    small, big = doc["results"]
    assert (small["neurons"], big["neurons"]) == (264, 792) and big["checkpoints"] == 3
    for r in (small, big):
        assert set(bench.STAGES) <= set(r["seconds"]) and r["peak_rss_gib"] > 0
    assert small["graph"]["method"] == "exact"
    assert big["graph"]["method"] == "ivf" and big["graph"]["recall_at_k"] >= 0.95  # above the quick threshold
    table = capsys.readouterr().out
    assert "| neighbours |" in table and "exponent" in table and "peak RSS" in table


def test_synthetic_run_shape(bench):
    import numpy as np

    g = bench.SyntheticRun(images=2000, concepts=30, seed=1)
    a = g.stimuli()
    g.step()
    b = g.stimuli()
    assert a.shape == (4224, 10) and a.max() < 2000
    for s in (a, b):  # a neuron's stimuli are distinct images (-1 = empty slot)
        v = np.where(s >= 0, s, -np.arange(1, 11))
        assert all(len(set(row)) == 10 for row in v[:200])
    overlap = np.mean([len(set(x) & set(y)) for x, y in zip(a[:500], b[:500])])
    assert 3 < overlap < 10  # stimuli drift between epochs, but not all at once

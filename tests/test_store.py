"""Run store: atomic writes, round trips, manifest, stage cache."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from conceptevo.store import RunStore, atomic_write


def test_array_table_json_round_trip(tmp_path):
    store = RunStore(tmp_path / "run")
    rng = np.random.default_rng()
    arr = rng.normal(size=(7, 3)).astype(np.float32)
    store.save_array("a/b/vectors", arr)
    np.testing.assert_array_equal(store.load_array("a/b/vectors"), arr)
    np.testing.assert_array_equal(store.load_array("a/b/vectors", mmap=True), arr)
    df = pd.DataFrame({"layer": ["c1", "c2"], "channel": [0, 5], "score": [0.25, 0.5]})
    store.save_table("t/scores", df)
    pd.testing.assert_frame_equal(store.load_table("t/scores"), df)
    store.save_json("doc", {"x": np.int64(3), "y": np.float32(0.5), "z": (1, 2)})
    assert store.load_json("doc") == {"x": 3, "y": 0.5, "z": [1, 2]}
    assert store.exists("a/b/vectors.npy") and not store.exists("nope.npy")


def test_names_must_stay_inside_the_run(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(ValueError):
        store.path("../escape.npy")
    with pytest.raises(ValueError):
        store.path("/etc/passwd")


def test_interrupted_write_keeps_previous_file(tmp_path):
    store = RunStore(tmp_path)
    store.save_array("x", np.arange(5))

    def crash(tmp):
        tmp.write_bytes(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(store.path("x.npy"), crash)
    np.testing.assert_array_equal(store.load_array("x"), np.arange(5))
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".x.npy")]
    assert leftovers == [], "temporary files must be cleaned up"


def test_manifest_and_stage_cache(tmp_path):
    store = RunStore(tmp_path)
    m = store.manifest
    assert m["versions"]["engine"] and "torch" in m["versions"] and m["stages"] == {}
    inp = tmp_path / "input.bin"
    inp.write_bytes(b"abc")
    key = store.stage_key({"k": 10}, [inp])
    assert key == store.stage_key({"k": 10}, [inp])
    assert key != store.stage_key({"k": 11}, [inp])
    assert not store.is_done("stimuli", key)
    store.save_array("out", np.zeros(2))
    store.mark_done("stimuli", key, seconds=1.5, params={"k": 10}, backends={"topk": "cpu"}, outputs=["out.npy"])
    assert store.is_done("stimuli", key)
    rec = json.loads((tmp_path / "manifest.json").read_text())["stages"]["stimuli"]
    assert rec["backends"] == {"topk": "cpu"} and rec["seconds"] == 1.5
    # a changed input file changes the key
    inp.write_bytes(b"abcd")
    assert store.stage_key({"k": 10}, [inp]) != key
    # a deleted output invalidates the record
    store.path("out.npy").unlink()
    assert not store.is_done("stimuli", key)
    store.update_manifest(seeds={"pairs": 1})
    store.update_manifest(seeds={"sgns": 2})
    assert store.manifest["seeds"] == {"pairs": 1, "sgns": 2}

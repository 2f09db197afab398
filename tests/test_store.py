"""Run store: atomic writes, round trips, manifest, stage cache."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from conceptevo.store import RunStore, atomic_write


def test_array_table_json_round_trip(tmp_path, rng):
    store = RunStore(tmp_path / "run")
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


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_artifacts_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = RunStore(tmp_path / "run")
        paths = [store.save_array("a", np.zeros(3)), store.save_json("b", {"x": 1}), store.root / "manifest.json",
                 atomic_write(tmp_path / "run" / "report.html", lambda tmp: tmp.write_text("<html>"))]
    finally:
        os.umask(old)
    for p in paths:
        assert (p.stat().st_mode & 0o777) == (0o666 & ~umask), (p, oct(p.stat().st_mode))


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    import stat

    import conceptevo.store as store_mod

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", spy)
    atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"123"))
    assert synced == [False, True]  # the file's bytes, then the folder holding the new name


_WORKER = """
import sys
from conceptevo.store import RunStore
root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = RunStore(root)
for j in range(n):
    store.update_manifest(counts={f"{tag}.{j}": j})
    store.mark_done(f"stage/{tag}/{j}", key=f"k{j}", seconds=0.0)
"""


def test_concurrent_manifest_updates_from_processes_lose_nothing(tmp_path):
    """Three processes read-modify-write one manifest 2 x 10 times each: every update survives
    (without the file lock about two thirds of them are lost)."""
    import subprocess
    import sys

    root = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), f"p{i}", "10"]) for i in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    m = json.loads((root / "manifest.json").read_text())
    assert set(m["counts"]) == {f"p{i}.{j}" for i in range(3) for j in range(10)}
    assert set(m["stages"]) == {f"stage/p{i}/{j}" for i in range(3) for j in range(10)}


def _age(path, seconds=3600):
    t = path.stat().st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


def test_checkpoint_fingerprint_is_the_content(tmp_path, monkeypatch):
    import hashlib

    from conceptevo.store import content_hash, fingerprint

    ck = tmp_path / "epoch_001.pt"
    ck.write_bytes(b"weights-A" * 1000)
    _age(ck)
    st = ck.stat()
    assert content_hash(ck) == hashlib.blake2b(ck.read_bytes(), digest_size=16).hexdigest()
    f1 = fingerprint(ck, tmp_path)
    # the same bytes elsewhere have the same identity; other bytes of the same size, same mtime, in place, do not
    other = tmp_path / "copy.pt"
    other.write_bytes(ck.read_bytes())
    assert fingerprint(other) == f1
    with open(ck, "r+b") as fh:
        fh.write(b"weights-B")
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ck.stat().st_size == st.st_size and ck.stat().st_mtime_ns == st.st_mtime_ns
    assert ck.stat().st_ino == st.st_ino
    assert fingerprint(ck, tmp_path) != f1


def test_content_hash_is_cached_in_the_run_folder(tmp_path, monkeypatch):
    import conceptevo.store as store_mod
    from conceptevo.store import content_hash

    ck = tmp_path / "big.pt"
    ck.write_bytes(os.urandom(1 << 16))
    _age(ck)
    run = tmp_path / "run"
    run.mkdir()
    digest = content_hash(ck, run)
    assert (run / ".hash_cache.json").is_file()
    monkeypatch.setattr(store_mod, "_hash_memo", {})  # a new process: only the disk cache remains

    def no_reads(path):
        raise AssertionError(f"{path} was read again although it did not change")

    monkeypatch.setattr(store_mod, "_hash_file", no_reads)
    assert content_hash(ck, run) == digest
    # a file modified moments ago is hashed every time (a same-size rewrite may keep its mtime)
    fresh = tmp_path / "fresh.pt"
    fresh.write_bytes(b"x")
    with pytest.raises(AssertionError, match="read again"):
        content_hash(fresh, run)

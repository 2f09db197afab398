"""Run store: one directory per run, a JSON manifest, arrays and tables in open formats.

Layout::

    <root>/manifest.json        engine/python/torch versions, platform, per-stage records
    <root>/<name>.npy           arrays (NumPy)
    <root>/<name>.parquet       tables (Parquet via PyArrow; pandas, DuckDB, Arrow read them)
    <root>/<name>.json          small documents

Every write goes to a temporary file in the destination folder and is then
``os.replace``-d over the target, so a crash mid-write leaves the previous
version intact and readers never see half a file.

Stage cache: a stage computes a key from its parameters and the fingerprints of
its input files (:meth:`RunStore.stage_key`); when the manifest already records
that stage with the same key (:meth:`RunStore.is_done`) the stage reloads its
outputs instead of recomputing them.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "RunStore", "fingerprint", "json_default"]

_MANIFEST = "manifest.json"
_manifest_lock = threading.Lock()


def json_default(obj: Any) -> Any:
    """Make NumPy scalars/arrays, paths and sets JSON-serialisable."""
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def atomic_write(path: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write_fn(tmp)`` writes a temp file that then replaces ``path``.

    The temp file lives in the same folder (``os.replace`` is atomic only within one
    file system) and keeps the suffix of the target so libraries that look at the
    extension (``np.save`` adds ``.npy`` otherwise) write where we expect.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename publishes them
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def fingerprint(path: str | Path) -> str:
    """Cheap identity of an input file: size + modification time (ns) + name.

    Strings that are not existing paths are fingerprinted as themselves, so a stage
    can also list the keys of upstream stages as its inputs.
    """
    p = Path(path)
    if p.exists():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"value:{path}"


class RunStore:
    """One run directory with its manifest. See the module docstring."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            from .errors import ConceptEvoError

            raise ConceptEvoError(f"run directory {self.root} does not exist")
        if create and not (self.root / _MANIFEST).exists():
            self._write_manifest(self._new_manifest())

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> Path:
        """Absolute path of a store entry given its relative, '/'-separated name."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"store names are relative and stay inside the run: {name!r}")
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    # ----------------------------------------------------------------- arrays
    def save_array(self, name: str, arr: np.ndarray) -> Path:
        name = name if name.endswith(".npy") else name + ".npy"
        arr = np.asarray(arr)
        return atomic_write(self.path(name), lambda tmp: np.save(tmp, arr, allow_pickle=False))

    def load_array(self, name: str, mmap: bool = False) -> np.ndarray:
        name = name if name.endswith(".npy") else name + ".npy"
        return np.load(self.path(name), mmap_mode="r" if mmap else None, allow_pickle=False)

    def save_arrays(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        """Save several arrays as ``<prefix>.<key>.npy``."""
        for key, arr in arrays.items():
            self.save_array(f"{prefix}.{key}", arr)

    def load_arrays(self, prefix: str, keys: Iterable[str], mmap: bool = False) -> dict[str, np.ndarray]:
        return {k: self.load_array(f"{prefix}.{k}", mmap=mmap) for k in keys}

    # ----------------------------------------------------------------- tables
    def save_table(self, name: str, table: Any) -> Path:
        """Save a pandas DataFrame or a pyarrow Table as Parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = name if name.endswith(".parquet") else name + ".parquet"
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        return atomic_write(self.path(name), lambda tmp: pq.write_table(table, tmp))

    def load_table(self, name: str):
        import pyarrow.parquet as pq

        name = name if name.endswith(".parquet") else name + ".parquet"
        return pq.read_table(self.path(name)).to_pandas()

    # ------------------------------------------------------------------- json
    def save_json(self, name: str, obj: Any) -> Path:
        name = name if name.endswith(".json") else name + ".json"
        text = json.dumps(obj, indent=2, default=json_default, sort_keys=False)
        return atomic_write(self.path(name), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def load_json(self, name: str) -> Any:
        name = name if name.endswith(".json") else name + ".json"
        return json.loads(self.path(name).read_text(encoding="utf-8"))

    # --------------------------------------------------------------- manifest
    @staticmethod
    def _new_manifest() -> dict:
        from . import __version__

        versions = {"engine": __version__, "python": sys.version.split()[0], "numpy": np.__version__}
        with contextlib.suppress(ImportError):
            import torch

            versions["torch"] = torch.__version__
        return {
            "format": 1,
            "created": _now(),
            "versions": versions,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "stages": {},
        }

    @property
    def manifest(self) -> dict:
        p = self.root / _MANIFEST
        if not p.exists():
            return self._new_manifest()
        return json.loads(p.read_text(encoding="utf-8"))

    def _write_manifest(self, manifest: dict) -> None:
        text = json.dumps(manifest, indent=2, default=json_default)
        atomic_write(self.root / _MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def update_manifest(self, **fields: Any) -> None:
        """Merge top-level fields into the manifest (dicts are merged one level deep)."""
        with _manifest_lock:
            m = self.manifest
            for key, value in fields.items():
                if isinstance(value, dict) and isinstance(m.get(key), dict):
                    m[key].update(value)
                else:
                    m[key] = value
            self._write_manifest(m)

    # ------------------------------------------------------------ stage cache
    @staticmethod
    def stage_key(params: dict, inputs: Iterable[str | Path] = ()) -> str:
        """Key of a stage run: hash of its parameters and its inputs' fingerprints."""
        doc = {"params": params, "inputs": sorted(fingerprint(p) for p in inputs)}
        text = json.dumps(doc, sort_keys=True, default=json_default)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def is_done(self, stage: str, key: str) -> bool:
        """True when ``stage`` finished with this key and all its recorded outputs still exist."""
        rec = self.manifest.get("stages", {}).get(stage)
        if not rec or rec.get("key") != key:
            return False
        return all(self.exists(o) for o in rec.get("outputs") or [])

    def stage_record(self, stage: str) -> dict | None:
        return self.manifest.get("stages", {}).get(stage)

    def mark_done(
        self,
        stage: str,
        key: str,
        seconds: float,
        params: dict | None = None,
        backends: dict | None = None,
        seeds: dict | None = None,
        outputs: Iterable[str] | None = None,
        **extra: Any,
    ) -> None:
        rec = {
            "key": key,
            "seconds": round(float(seconds), 4),
            "params": params or {},
            "backends": backends or {},
            "seeds": seeds or {},
            "outputs": list(outputs or []),
            "finished_at": _now(),
            **extra,
        }
        with _manifest_lock:
            m = self.manifest
            m.setdefault("stages", {})[stage] = rec
            self._write_manifest(m)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

"""Run store: one directory per run, a JSON manifest, arrays and tables in open formats.

Layout::

    <root>/manifest.json        engine/python/torch versions, platform, per-stage records
    <root>/<name>.npy           arrays (NumPy)
    <root>/<name>.parquet       tables (Parquet via PyArrow; pandas, DuckDB, Arrow read them)
    <root>/<name>.json          small documents

Every write goes to a temporary file in the destination folder and is then
``os.replace``-d over the target, so a crash mid-write leaves the previous
version intact and readers never see half a file. The file's bytes are fsync-ed
before the rename and the folder after it, so the new name survives a power cut.
Files are created with mode ``0o666 & ~umask`` like any ``open(path, "w")``, so a
report can be served or shared as it is.

The manifest is read-modify-written under a lock that holds between threads and
between processes (``fcntl.flock`` on ``<root>/.manifest.lock`` where the platform
has it), so concurrent stage records are never lost.

Stage cache: a stage computes a key from its parameters and the fingerprints of
its input files (:meth:`RunStore.stage_key`; a file's fingerprint is a hash of its
content, see :func:`content_hash`); when the manifest already records
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
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

try:  # POSIX: manifest updates are serialised between processes too
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads only
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "RunStore", "fingerprint", "content_hash", "json_default"]

_MANIFEST = "manifest.json"
_LOCK_FILE = ".manifest.lock"
_HASH_CACHE = ".hash_cache.json"
_HASH_LOCK = ".hash_cache.lock"
_manifest_lock = threading.RLock()


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
    extension (``np.save`` adds ``.npy`` otherwise) write where we expect. It is
    created with ``os.open(..., 0o666)``, so the process umask applies as for any
    ordinary file (``tempfile.mkstemp`` would make it 0600). The bytes are fsync-ed
    before the rename and the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}"
        try:
            os.close(os.open(tmp, flags, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    else:  # pragma: no cover
        raise FileExistsError(f"cannot create a temporary file next to {path}")
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename publishes them
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    """Exclusive lock between threads (``_manifest_lock``) and processes (``flock``)."""
    with _manifest_lock:
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_CHUNK = 1 << 22


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """BLAKE2b-128 of a file's bytes, computed once per version of the file.

    The digest is cached under the file's stat key ``(resolved path, size, mtime_ns,
    ctime_ns, inode)``: in memory for the process, and in ``<cache_dir>/.hash_cache.json``
    when ``cache_dir`` is given (a run folder), so a re-run does not read multi-GB
    checkpoints again. Any rewrite changes the stat key (a new file from ``os.replace``
    or ``torch.save`` gets a new inode; an in-place rewrite a new mtime and ctime), except
    a same-size rewrite inside one tick of the file-system clock. So, as git does with
    "racily clean" files, a file modified less than ``_RACY_SECONDS`` ago is hashed
    every time and its digest is not cached.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    racy = time.time_ns() - st.st_mtime_ns < _RACY_SECONDS * 1e9
    if racy:
        return _hash_file(p)
    if key in _hash_memo:
        return _hash_memo[key]
    cache_file = Path(cache_dir) / _HASH_CACHE if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            digest = json.loads(cache_file.read_text(encoding="utf-8")).get(key)
            if isinstance(digest, str):
                _hash_memo[key] = digest
                return digest
    digest = _hash_file(p)
    _hash_memo[key] = digest
    if cache_file is not None:
        with contextlib.suppress(OSError), _file_lock(cache_file.parent / _HASH_LOCK):
            doc: dict = {}
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(cache_file.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                doc = {}
            doc = {k: v for k, v in doc.items() if not k.startswith(f"{p}|")}  # older versions of this file
            doc[key] = digest
            text = json.dumps(doc, indent=0, sort_keys=True)
            atomic_write(cache_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return digest


_hash_memo: dict[str, str] = {}
_RACY_SECONDS = 2.0


def fingerprint(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """Identity of an input file: a hash of its content (:func:`content_hash`).

    Strings that are not existing files are fingerprinted as themselves, so a stage
    can also list the keys of upstream stages as its inputs. A folder is identified by
    its path (stages key folders by the files they read, not by the folder).
    """
    p = Path(path)
    if p.is_file():
        return f"blake2b:{content_hash(p, cache_dir)}"
    if p.exists():
        return f"path:{p.resolve()}"
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
            with self._lock():  # another process may be creating it right now
                if not (self.root / _MANIFEST).exists():
                    self._write_manifest(self._new_manifest())

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> Path:
        """Absolute path of a store entry given its relative, '/'-separated name."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            from .errors import InputError

            raise InputError(f"store names are relative and stay inside the run: {name!r}")
        return self.root / name

    def _lock(self):
        """The manifest lock: threads of this process and other processes on this run folder."""
        return _file_lock(self.root / _LOCK_FILE)

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
        with self._lock():
            m = self.manifest
            for key, value in fields.items():
                if isinstance(value, dict) and isinstance(m.get(key), dict):
                    m[key].update(value)
                else:
                    m[key] = value
            self._write_manifest(m)

    # ------------------------------------------------------------ stage cache
    @staticmethod
    def stage_key(params: dict, inputs: Iterable[str | Path] = (), *, cache_dir: str | Path | None = None) -> str:
        """Key of a stage run: hash of its parameters and its inputs' content fingerprints.

        ``cache_dir`` (the run folder) keeps the inputs' content hashes on disk, so a
        re-run does not read large input files again (see :func:`content_hash`).
        """
        doc = {"params": params, "inputs": sorted(fingerprint(p, cache_dir) for p in inputs)}
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
        with self._lock():
            m = self.manifest
            m.setdefault("stages", {})[stage] = rec
            self._write_manifest(m)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

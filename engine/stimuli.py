"""Stimuli (paper Step 1.1): one streaming pass over a dataset for many checkpoints, resumable.

For every neuron (a channel of a chosen layer) the ``k`` images whose activation map has the
highest spatial maximum, with that maximum and its (row, col); and for every image the ``k_i``
channels of each layer it activates most (its *responsive* neurons). Order everywhere:
(value desc, image id asc) per neuron, (value desc, channel asc) per image; the argmax of a map
is its first maximum in row-major order (see :mod:`conceptevo.kernels`).

One pass, many checkpoints
    :func:`extract_stimuli` takes checkpoints of ONE architecture. Each batch is loaded and
    decoded once and fed to every checkpoint's model. Models of other architectures need a
    separate call. Memory is O(neurons x k) for the stimuli plus O(images x k_i) for the
    responsive neurons -- never O(images x neurons): forward hooks fold each layer's output into
    the running top-k state (:func:`conceptevo.kernels.update`) while it is still in cache, and
    the forward pass stops as soon as every chosen layer has run (the classifier head is not
    evaluated; the stimuli do not need logits).

    ``swap_weights=False`` (default) keeps one model per checkpoint on the device.
    ``swap_weights=True`` keeps a single model on the device and the checkpoints' state dicts
    in host memory, loading each into the model before its forward: device memory of one model,
    at the cost of one host-to-device weight copy per checkpoint per batch.

Exactness
    The kernels are order-exact: given the activations, the result does not depend on how the
    images are split into batches, on the order of the batches, or on the backend. The model
    itself may not be: oneDNN / cuDNN convolutions can change the last bit of an activation with
    the batch composition or the thread count, and a changed bit can swap two nearly tied images.
    Therefore a resumed pass restarts on a saved batch boundary and the distributed shards are cut
    on batch boundaries, so that with the same batch size (and threads) every run sees the very
    same batches and gives bitwise-identical stimuli. Resuming with another batch size is allowed
    (it is not part of the key) but may differ in such near-ties.

Mixed precision (``amp``)
    Off by default. ``amp=True`` runs the forward under ``torch.autocast`` (bfloat16 on the CPU
    and on GPUs that support it, else float16; or name the dtype: ``amp="fp16"``/``"bf16"``).
    The maxima are then taken over low-precision activations: values carry ~3 (bf16) or ~4
    (fp16) significant digits, so ties between images become much more frequent (they are
    broken by the lowest image id) and the ranking -- hence the stimuli -- can differ from a
    float32 run. Use it for speed on large GPU runs, not when exact agreement with float32 matters.

Caching and resume (with a :class:`~conceptevo.store.RunStore`)
    Results go to ``<prefix>/<name>/<layer>.<field>.npy`` plus ``<prefix>/<name>/stimuli.json``,
    and each checkpoint is recorded as the manifest stage ``<prefix>/<name>`` with a key made of
    the parameters that define the result (k, k_i, layers, amp, architecture, the checkpoint's
    and the dataset's fingerprints). A later call whose key matches loads instead of recomputing;
    only the checkpoints that are not done are run (in one pass). Batch size, device, backend and
    worker count are not part of the key: they do not change the definition of the result.

    During the pass, every ``save_every`` batches the running states are saved under
    ``<prefix>/_progress/<tag>/``: the small top-k arrays of all checkpoints into one of two
    alternating slots (atomic ``.npz`` writes), the responsive rows of the images processed since
    the last save into preallocated ``.npy`` files (rows are final once their image was seen, so
    they are written once, never rewritten), and LAST a small ``progress.json`` naming the slot
    and the number of images processed. A crash anywhere leaves ``progress.json`` pointing at a
    complete, older save. A new call with ``resume=True`` and the same key continues from there;
    the result is identical to an uninterrupted run because the kernels are order-exact.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import backends as _backends
from .adapter import LayerSpec, ModelAdapter, load_state_dict_file
from .errors import ActivationError, CheckpointError, ConceptEvoError, DataError, InputError, LayerError
from .store import RunStore, atomic_write

__all__ = [
    "dataset_fingerprint",
    "LayerStimuli",
    "Stimuli",
    "extract_stimuli",
    "StimulusOptions",
    "Extraction",
    "CheckpointSpec",
    "resolve_checkpoints",
    "choose_backend",
    "FIELDS",
]

log = logging.getLogger(__name__)

#: Per-layer arrays of a :class:`LayerStimuli`, with their dtypes.
FIELDS: dict[str, np.dtype] = {
    "ids": np.dtype(np.int64),
    "values": np.dtype(np.float32),
    "rows": np.dtype(np.int32),
    "cols": np.dtype(np.int32),
    "responsive": np.dtype(np.int32),
    "responsive_values": np.dtype(np.float32),
}
_FORMAT = 1  # version of the on-disk layout of a saved Stimuli
#: Sub-folder of a stimuli prefix that holds resumable progress (also used by conceptevo.distributed).
PROGRESS_DIR = "_progress"


# =============================================================================== options
_AMP_NAMES = ("bf16", "bfloat16", "fp16", "float16")
_TOPK_BACKENDS = ("auto", "cpu", "gpu", "cuda", "triton", "reference")


@dataclass(frozen=True, kw_only=True)
class StimulusOptions:
    """How a stimulus pass runs: the one place where every option of :func:`extract_stimuli`,
    :class:`Extraction` and :func:`~conceptevo.distributed.distributed_extract` is documented and
    checked (each field is validated once, on construction: a bad value raises an
    :class:`~conceptevo.errors.InputError` -- a ``ValueError`` -- naming the field).

    Pass it as ``options=``; each field can also be given as a keyword of the same name
    (``extract_stimuli(..., k=10)``), but not both in one call. ``dataclasses.replace(opts, k=5)``
    makes a changed copy.

    What the result is (part of the cache key):
        layers: ``None`` (every Conv2d), module names, a module type or a regex (see
            :class:`~conceptevo.adapter.ModelAdapter`; unknown names raise a LayerError).
        k: stimuli per neuron (>= 1).
        k_i: responsive channels kept per image and layer (>= 0; 0: none).
        amp: mixed precision: ``False`` (default), ``True``, ``"bf16"`` or ``"fp16"`` (see the
            module docstring: the ranking may then differ from float32).
        accuracy: also run each model's head and record its top-1 / top-5 on the dataset's labels
            (``Stimuli.accuracy``): accuracy for checkpoints that come without a training log, for
            the cost of the layers after the last chosen one.
        dataset_key: identity of the dataset for the cache key (default: a content fingerprint,
            :func:`dataset_fingerprint`).

    How it is computed (the result does not depend on these):
        batch_size: images per forward (>= 1). Resume and the distributed shards cut on its batch
            boundaries (see "Exactness" in the module docstring).
        num_workers: DataLoader worker processes (>= 0).
        device: "cpu", "cuda", "cuda:1", "auto" or a ``torch.device``. ``None`` (default): "cpu"
            for :func:`extract_stimuli` and :class:`Extraction`; for ``distributed_extract``
            ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
        backend: top-k kernel: "auto" (honours ``CONCEPTEVO_BACKEND_TOPK``), "cpu", "gpu"/"cuda",
            "triton" or "reference".
        swap_weights: one model on the device, the checkpoints' weights kept on the host and
            swapped in per checkpoint and batch (device memory of one model).
        input_shape: (C, H, W) for probing the layers; default: the shape of image 0.
        on_diverged: ``"raise"`` (an ActivationError naming the checkpoint, layer and images) or
            ``"record"``: a checkpoint with NaN/inf weights, NaN activations, infinite kept maxima or
            non-finite logits comes back as an empty ``Stimuli`` whose ``diverged`` says why (layer
            and first bad image ids); the other checkpoints carry on.

    Caching, resume and feedback (with a store):
        resume: continue an interrupted pass with the same key from its last save.
        save_every: save progress every this many batches (``None`` / 0: never).
        recompute: ignore cached results.
        progress: show a progress bar (on rank 0 only when distributed).
        on_batch: ``on_batch(batches_done, next_image_id)`` after every batch (progress hooks,
            tests); an exception raised there aborts the pass like a crash would.
        observer: ``observer(checkpoint_name, layer, output)`` called with every chosen layer's
            output of every computed checkpoint, before the top-k update (read only; e.g.
            :func:`conceptevo.directions.gram_observer` streams the Gram matrices of the concept
            directions in this very pass). Not called for checkpoints loaded from the cache; a
            resumed pass calls it only for the images after the resume point. Single process
            only: ``distributed_extract`` over several ranks refuses it.
    """

    layers: LayerSpec = None
    k: int = 10
    k_i: int = 5
    amp: bool | str = False
    accuracy: bool = False
    dataset_key: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str | torch.device | None = None
    backend: str = "auto"
    swap_weights: bool = False
    input_shape: tuple[int, ...] | None = None
    on_diverged: str = "raise"
    resume: bool = True
    save_every: int | None = 100
    recompute: bool = False
    progress: bool = True
    on_batch: Callable[[int, int], None] | None = None
    observer: Callable[[str, str, torch.Tensor], None] | None = None

    def __post_init__(self) -> None:
        def bad(field: str, wanted: str) -> InputError:
            return InputError(f"StimulusOptions.{field} must be {wanted}, got {getattr(self, field)!r}")

        def count(field: str, minimum: int) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
                raise bad(field, f"an integer >= {minimum}")
            object.__setattr__(self, field, int(v))

        def flag(field: str) -> None:
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise bad(field, "True or False")
            object.__setattr__(self, field, bool(getattr(self, field)))

        count("k", 1)
        count("k_i", 0)
        count("batch_size", 1)
        count("num_workers", 0)
        if self.save_every is not None:
            count("save_every", 0)
        for name in ("accuracy", "swap_weights", "resume", "recompute", "progress"):
            flag(name)
        if not (isinstance(self.amp, (bool, np.bool_))
                or (isinstance(self.amp, str) and self.amp.lower() in _AMP_NAMES)):
            raise bad("amp", "False, True, 'bf16' or 'fp16'")
        if isinstance(self.amp, np.bool_):
            object.__setattr__(self, "amp", bool(self.amp))
        if not isinstance(self.backend, str) or self.backend.lower() not in _TOPK_BACKENDS:
            raise bad("backend", "one of " + ", ".join(repr(b) for b in _TOPK_BACKENDS))
        if self.on_diverged not in ("raise", "record"):
            raise bad("on_diverged", "'raise' or 'record'")
        if self.dataset_key is not None and not isinstance(self.dataset_key, str):
            raise bad("dataset_key", "None or a string")
        if self.device is not None and not (isinstance(self.device, str) and self.device == "auto"):
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError):
                raise bad("device", '"cpu", "cuda", "cuda:<n>", "auto" or a torch.device') from None
        if self.input_shape is not None:
            shape = self.input_shape
            if (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence)
                    or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
                raise bad("input_shape", "None or a sequence of positive integers (C, H, W)")
            object.__setattr__(self, "input_shape", tuple(int(s) for s in shape))
        for name in ("on_batch", "observer"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise bad(name, "None or a callable")

    @classmethod
    def combine(cls, options: StimulusOptions | None, keywords: Mapping[str, Any], caller: str) -> StimulusOptions:
        """The options of a call: ``options`` or the keywords, never the same field from both.

        Raises:
            TypeError: a keyword that is no field (as Python does for an unknown keyword).
            InputError: ``options`` of another type, or a field given both ways (named).
        """
        names = [f.name for f in fields(cls)]
        unknown = [key for key in keywords if key not in names]
        if unknown:
            hints = {key: difflib.get_close_matches(key, names, n=1) for key in unknown}
            said = ", ".join(f"{key!r}" + (f" (did you mean {hints[key][0]!r}?)" if hints[key] else "")
                             for key in unknown)
            raise TypeError(f"{caller}() got unexpected keyword argument(s) {said}; "
                            f"the options are the fields of StimulusOptions")
        if options is None:
            return cls(**keywords)
        if not isinstance(options, cls):
            raise InputError(f"{caller}(): options must be a StimulusOptions, got {type(options).__name__}")
        if keywords:
            both = ", ".join(keywords)
            raise InputError(f"{caller}(): {both} given both in options and as keyword argument(s); give each "
                             f"once (dataclasses.replace(options, {next(iter(keywords))}=...) changes a field)")
        return options


# =============================================================================== results
@dataclass(eq=False)
class LayerStimuli:
    """Stimuli of one layer of one checkpoint.

    Attributes:
        ids: int64 (C, k) image ids, best first; -1 when fewer than k images were seen.
        values: float32 (C, k) spatial maximum of the activation map.
        rows, cols: int32 (C, k) position of that maximum (first maximum, row-major).
        responsive: int32 (N, k_i) per image: this layer's channels it activates most, best first.
        responsive_values: float32 (N, k_i) their spatial maxima.
    """

    ids: np.ndarray
    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    responsive: np.ndarray
    responsive_values: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def k_i(self) -> int:
        return int(self.responsive.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}

    def equals(self, other: LayerStimuli) -> bool:
        """Bitwise equality of every array (values compared as bit patterns, so -inf == -inf)."""
        return all(
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
            for a, b in ((np.ascontiguousarray(getattr(self, f)), np.ascontiguousarray(getattr(other, f)))
                         for f in FIELDS)
        )


@dataclass(eq=False)
class Stimuli:
    """Stimuli of every chosen layer of one checkpoint (``layers`` in model order)."""

    layers: dict[str, LayerStimuli]
    num_images: int
    name: str = ""
    #: why the checkpoint diverged (NaN/inf weights or activations; ``layers`` is then empty), else None
    diverged: str | None = None
    #: top-1 / top-5 of the checkpoint on the pass's images and labels (``accuracy=True``), else None
    accuracy: dict[str, float] | None = None

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def channels(self) -> dict[str, int]:
        return {n: s.channels for n, s in self.layers.items()}

    @property
    def num_neurons(self) -> int:
        return sum(s.channels for s in self.layers.values())

    @property
    def offsets(self) -> dict[str, int]:
        """Start of each layer in the flat neuron index (layers stacked in order)."""
        out, total = {}, 0
        for n, s in self.layers.items():
            out[n] = total
            total += s.channels
        return out

    @property
    def k(self) -> int:
        return next(iter(self.layers.values())).k if self.layers else 0

    @property
    def k_i(self) -> int:
        return next(iter(self.layers.values())).k_i if self.layers else 0

    def neuron_stimuli(self) -> np.ndarray:
        """int64 (num_neurons, k): every neuron's stimulus image ids, layers stacked in order."""
        if not self.layers:
            return np.zeros((0, 0), dtype=np.int64)
        return np.concatenate([s.ids for s in self.layers.values()], axis=0)

    def layer_of_neuron(self) -> tuple[np.ndarray, np.ndarray]:
        """(layer name, channel) of every flat neuron: a str array and an int64 array."""
        names = list(self.layers)
        counts = [self.layers[n].channels for n in names]
        layer = np.repeat(np.array(names, dtype=str), counts) if names else np.zeros(0, dtype=str)
        channel = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if names else np.zeros(0, np.int64)
        return layer, channel

    def equals(self, other: Stimuli) -> bool:
        """Same layers in the same order, same image count, bitwise-equal arrays."""
        return (
            self.num_images == other.num_images
            and list(self.layers) == list(other.layers)
            and all(self.layers[n].equals(other.layers[n]) for n in self.layers)
        )

    # ------------------------------------------------------------------ store
    def save(self, store: RunStore, key: str) -> list[str]:
        """Write every layer's arrays under ``key/`` and then ``key/stimuli.json`` (written last).

        Returns the store names written (for the manifest's ``outputs``).
        """
        written = []
        for li, (layer, s) in enumerate(self.layers.items()):
            for f, dtype in FIELDS.items():
                name = f"{key}/{_layer_file(layer)}.{f}.npy"
                store.save_array(name, np.ascontiguousarray(getattr(s, f), dtype=dtype))
                written.append(name)
        meta = {
            "format": _FORMAT,
            "name": self.name,
            "num_images": int(self.num_images),
            "k": self.k,
            "k_i": self.k_i,
            "layers": [{"name": n, "file": _layer_file(n), "channels": s.channels} for n, s in self.layers.items()],
            "diverged": self.diverged,
            "accuracy": self.accuracy,
        }
        store.save_json(f"{key}/stimuli", meta)
        written.append(f"{key}/stimuli.json")
        return written

    @classmethod
    def load(cls, store: RunStore, key: str, mmap: bool = False) -> Stimuli:
        """Read a Stimuli written by :meth:`save`."""
        if not store.exists(f"{key}/stimuli.json"):
            raise ConceptEvoError(f"no stimuli saved under {store.path(key)} (missing stimuli.json)")
        meta = store.load_json(f"{key}/stimuli")
        if meta.get("format") != _FORMAT:
            raise ConceptEvoError(f"stimuli under {store.path(key)} have format {meta.get('format')}, expected {_FORMAT}")
        layers = {}
        for entry in meta["layers"]:
            arrays = {f: store.load_array(f"{key}/{entry['file']}.{f}.npy", mmap=mmap) for f in FIELDS}
            layers[entry["name"]] = LayerStimuli(**arrays)
        return cls(layers=layers, num_images=int(meta["num_images"]), name=meta.get("name", ""),
                   diverged=meta.get("diverged"), accuracy=meta.get("accuracy"))


def _open_store(store: RunStore | str | os.PathLike | None) -> RunStore | None:
    """A RunStore for a store argument (a RunStore, its directory, or None)."""
    return RunStore(store) if isinstance(store, (str, os.PathLike)) else store


def _layer_file(layer: str) -> str:
    """File stem of a layer: module names are dotted paths; keep them, but never a path separator."""
    return layer.replace("/", "_").replace(os.sep, "_") or "_root"


# ============================================================================ checkpoints
@dataclass(eq=False)
class CheckpointSpec:
    """One resolved checkpoint: its name, a description for errors, its weights (or file).

    The fingerprint is a content hash (file: BLAKE2b of its bytes, see
    :func:`conceptevo.store.content_hash`, cached in ``hash_cache`` -- the run folder --
    by path, size, mtime and inode; state dict: a hash of its tensors), computed on first
    use only -- hashing costs about a second per GB, and a run without a store never needs it.
    """

    name: str
    source: str
    state: dict[str, torch.Tensor] | None
    path: Path | None = None
    _fingerprint: str | None = None
    hash_cache: Path | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = (_file_fingerprint(self.path, self.hash_cache) if self.path is not None
                                 else "state:" + _digest_state(self.state or {}))
        return self._fingerprint


def _digest_state(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (keys, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.to("cpu").contiguous()
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.numpy().tobytes())
    return h.hexdigest()[:24]


def _file_fingerprint(path: Path, cache_dir: Path | None = None) -> str:
    """Content identity of a checkpoint file (its bytes; where it lives does not matter)."""
    from .store import content_hash

    return f"file:{path.stat().st_size}:{content_hash(path, cache_dir)}"


def _default_names(sources: Sequence[Any]) -> list[str]:
    """Shortest unique trailing path (without suffix) per checkpoint file; ``checkpoint_<i>`` otherwise."""
    paths = [Path(s) if isinstance(s, (str, os.PathLike)) else None for s in sources]
    for depth in range(1, 8):
        names = [
            "/".join(p.with_suffix("").parts[-depth:]) if p is not None else f"checkpoint_{i}"
            for i, p in enumerate(paths)
        ]
        if len(set(names)) == len(names):
            return names
    return [f"checkpoint_{i}" for i in range(len(sources))]


def _check_name(name: str) -> str:
    name = str(name).strip("/")
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or any(p.startswith("_progress") for p in parts):
        raise ConceptEvoError(f"checkpoint name {name!r} must be a relative path without '..' or '_progress'")
    return name


def resolve_checkpoints(
    checkpoints: Sequence[str | os.PathLike | dict[str, torch.Tensor]] | None,
    names: Sequence[str] | None,
    model: nn.Module,
) -> list[CheckpointSpec]:
    """Checkpoints -> specs with names and fingerprints; nothing is loaded yet for files.

    ``checkpoints=None`` (or empty) means the model's own current weights, named ``"model"``.
    """
    if not checkpoints:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        nm = _check_name(names[0]) if names else "model"
        return [CheckpointSpec(nm, "the model's own weights", state)]
    checkpoints = list(checkpoints)
    if names is not None:
        names = [_check_name(n) for n in names]
        if len(names) != len(checkpoints):
            raise ConceptEvoError(f"names has {len(names)} entries for {len(checkpoints)} checkpoints")
    else:
        names = _default_names(checkpoints)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConceptEvoError(f"checkpoint names must be unique; repeated: {dup}")
    specs = []
    for i, (ck, nm) in enumerate(zip(checkpoints, names)):
        if isinstance(ck, dict):
            bad = [k for k, v in ck.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise CheckpointError(f"state dict #{i} ({nm}) has non-tensor entries {bad[:5]}")
            specs.append(CheckpointSpec(nm, f"state dict #{i} ({nm})", ck))
        elif isinstance(ck, (str, os.PathLike)):
            p = Path(ck)
            if not p.is_file():
                raise CheckpointError(f"checkpoint not found: {p}")
            specs.append(CheckpointSpec(nm, f"checkpoint {p}", None, path=p))
        else:
            raise CheckpointError(
                f"checkpoint #{i} is a {type(ck).__name__}; give file paths or state dicts (model.state_dict())"
            )
    return specs


def _architecture_signature(adapter: ModelAdapter) -> str:
    """Model class, parameter/buffer names and shapes, chosen layers and their channels."""
    sd = adapter.model.state_dict()
    doc = {
        "class": f"{type(adapter.model).__module__}.{type(adapter.model).__qualname__}",
        "state": [[k, list(v.shape), str(v.dtype)] for k, v in sd.items()],
        "layers": [[n, adapter.channels[n]] for n in adapter.layer_names],
    }
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


def dataset_fingerprint(ds: Any, samples: int = 16) -> str:
    """Identity of an image set for cache keys.

    Always: type, size, source, class names, every label, and ``samples`` evenly spaced
    decoded images (they capture the resize and normalisation). Then, by kind:

    * in-memory sets (``ds.images`` a tensor): a hash of every image byte;
    * folder sets (``ds.paths``): every file's path, size and modification time (no
      file is read: a stat per file);
    * other datasets (wrapped ``Dataset`` objects): only the above (reading every item
      would cost a full pass; pass ``dataset_key`` to :func:`extract_stimuli` to name one).
    """
    n = len(ds)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(ds).__qualname__}|{n}|{getattr(ds, 'source', '')}|{getattr(ds, 'class_names', None)}|".encode())
    labels = getattr(ds, "labels", None)
    if isinstance(labels, torch.Tensor):
        h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    images = getattr(ds, "images", None)
    paths = getattr(ds, "paths", None)
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu().contiguous()
        h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # every byte, no copy
    elif paths:
        h.update(b"files|")
        for p in paths:
            try:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}|missing\n".encode())
    for i in sorted({int(j) for j in np.linspace(0, n - 1, num=min(samples, n))}) if n else []:
        x = ds[i][0]
        x = torch.as_tensor(x).detach().cpu().contiguous()
        h.update(f"{i}|{x.dtype}|{tuple(x.shape)}|".encode())
        h.update(x.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_dataset_fingerprint = dataset_fingerprint


# ============================================================================== helpers
class _StopForward(Exception):
    """Raised from the last hook of a forward: every chosen layer has run, the rest is not needed."""


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    if amp is False or amp is None:
        return None
    if isinstance(amp, str):
        key = amp.lower()
        table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if key not in table:
            raise ConceptEvoError(f"amp must be False, True, 'bf16' or 'fp16'; got {amp!r}")
        return table[key]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def choose_backend(device: torch.device, backend: str | None = "auto") -> str:
    """Concrete top-k backend for states on ``device``: "reference", "cpu" (Numba) or "triton".

    ``"auto"`` honours ``CONCEPTEVO_BACKEND_TOPK``; ``"gpu"``/``"cpu"``/``"triton"`` go through
    :func:`conceptevo.backends.select`, which raises :class:`~conceptevo.errors.BackendError`
    naming what is missing when a forced backend cannot run.
    """
    from . import kernels

    name = (backend or "auto").lower()
    if name == "reference":
        return kernels.resolve_backend(device, "reference")
    if name == "auto":
        env = os.environ.get("CONCEPTEVO_BACKEND_TOPK", "").strip().lower()
        if not env or env == "auto":
            return kernels.resolve_backend(device, "auto")
        name = env
        if name == "reference":
            return kernels.resolve_backend(device, "reference")
    return kernels.resolve_backend(device, _backends.select("topk", name))


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ============================================================================ the pass
class Extraction:
    """A planned stimulus pass: validated model, layers, checkpoints, dataset and options.

    Built by :func:`extract_stimuli` (and by :mod:`conceptevo.distributed`); :meth:`run_shard`
    streams the image ids ``[start, stop)`` through every pending checkpoint and returns the
    running states, so a caller can run one shard per process and merge them exactly.

    ``Extraction(model_factory, checkpoints, dataset, *, names=None, options=None, **keywords)``:
    the arguments as for :func:`extract_stimuli`; the options (a :class:`StimulusOptions`, or its
    fields as keywords) are kept as ``self.options``. The plan uses the fields that define and
    compute the pass; ``resume``, ``save_every``, ``recompute``, ``progress``, ``on_batch`` and
    ``observer`` are for the caller that runs it (passed to :meth:`run_shard`).
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module] | nn.Module,
        checkpoints: Sequence[str | os.PathLike | dict[str, torch.Tensor]] | None,
        dataset: Any,
        *,
        names: Sequence[str] | None = None,
        options: StimulusOptions | None = None,
        **keywords: Any,
    ) -> None:
        from .data import as_image_set

        opts = self.options = StimulusOptions.combine(options, keywords, "Extraction")
        self.accuracy = opts.accuracy
        self.on_diverged = opts.on_diverged
        #: spec name -> why it diverged, filled by run_shard (on_diverged="record")
        self.diverged: dict[str, str] = {}
        #: spec name -> [images, top-1 hits, top-5 hits] of the last run_shard (accuracy=True)
        self.hits: dict[str, list[int]] = {}
        self.k, self.k_i = opts.k, opts.k_i
        self.batch_size, self.num_workers = opts.batch_size, opts.num_workers
        self.device = _resolve_device("cpu" if opts.device is None else opts.device)
        self.amp_dtype = _amp_dtype(opts.amp, self.device)
        self.backend = choose_backend(self.device, opts.backend)
        self.swap_weights = opts.swap_weights
        self.dataset = as_image_set(dataset)
        self.num_images = len(self.dataset)
        if self.num_images == 0:
            raise DataError("the dataset is empty: there are no images to rank")

        if isinstance(model_factory, nn.Module):
            template = model_factory
            self._factory: Callable[[], nn.Module] = lambda: copy.deepcopy(template)
        elif callable(model_factory):
            self._factory = model_factory
        else:
            raise ConceptEvoError(f"model_factory must be an nn.Module or a callable returning one, "
                                  f"got {type(model_factory).__name__}")
        model = self._new_model()
        input_shape = opts.input_shape
        if input_shape is None:
            input_shape = tuple(torch.as_tensor(self.dataset[0][0]).shape)
        self.input_shape = tuple(int(s) for s in input_shape)
        # Layer names are validated here (LayerError naming the unknown layer and listing the model's).
        self.adapter = ModelAdapter(model, layers=opts.layers, input_shape=self.input_shape)
        self.layer_names = list(self.adapter.layer_names)
        self.channels = dict(self.adapter.channels)
        self.checkpoints = resolve_checkpoints(checkpoints, names, model)
        self.architecture = _architecture_signature(self.adapter)
        self._dataset_key = opts.dataset_key

    @property
    def dataset_key(self) -> str:
        """Identity of the dataset in cache keys (content fingerprint unless given), computed on first use."""
        if self._dataset_key is None:
            self._dataset_key = _dataset_fingerprint(self.dataset)
        return self._dataset_key

    def _new_model(self) -> nn.Module:
        model = self._factory()
        if not isinstance(model, nn.Module):
            raise ConceptEvoError(f"model_factory returned a {type(model).__name__}, not an nn.Module")
        return model

    def use_store(self, store: RunStore | None) -> None:
        """Cache the checkpoints' content hashes in the store's folder (each file is hashed once per run folder)."""
        for spec in self.checkpoints if store is not None else ():
            spec.hash_cache = store.root

    def cached(self, store: RunStore | None, prefix: str) -> list[bool]:
        """Per checkpoint: are its stimuli done in ``store`` under this key (never with ``recompute``)?"""
        self.use_store(store)
        if store is None:
            return [False] * len(self.checkpoints)
        return [not self.options.recompute and store.is_done(f"{prefix}/{spec.name}", self.checkpoint_key(spec))
                for spec in self.checkpoints]

    # ------------------------------------------------------------------ keys
    def params(self) -> dict[str, Any]:
        """The parameters that define the result (the cache key's content besides the fingerprints)."""
        return {
            "stage": "stimuli",
            "k": self.k,
            "k_i": self.k_i,
            "layers": self.layer_names,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else False,
            "architecture": self.architecture,
            "dataset": self.dataset_key,
            "num_images": self.num_images,
            **({"accuracy": True} if self.accuracy else {}),
        }

    def checkpoint_key(self, spec: CheckpointSpec) -> str:
        return RunStore.stage_key({**self.params(), "checkpoint": spec.fingerprint})

    # ------------------------------------------------------------ validation
    def load_state(self, spec: CheckpointSpec) -> dict[str, torch.Tensor]:
        """A checkpoint's state dict, checked against the architecture (CheckpointError naming it)."""
        state = spec.state if spec.state is not None else load_state_dict_file(spec.path)
        self.adapter.check_state_dict(state, source=spec.source)
        return state

    def prepare_models(self, specs: Sequence[CheckpointSpec]) -> tuple[list[nn.Module], list[dict[str, torch.Tensor]]]:
        """Check every checkpoint and build the models on the device (eval mode), before any image.

        Default: one model per checkpoint, built one at a time so that at most one loaded state
        dict sits beside the models (the first model is the probed template itself, the others
        are deep copies of it: a memory copy instead of a fresh random initialisation). With
        ``swap_weights`` one model and every checkpoint's state dict, kept on the host.
        Returns ``(models, host state dicts)``; the second list is empty unless swapping.
        """
        template = self.adapter.model
        if self.swap_weights:
            weights = [self.load_state(spec) for spec in specs]
            return [template.to(self.device).eval()], weights
        models = []
        for j, spec in enumerate(specs):
            state = self.load_state(spec)
            model = template if j == 0 else copy.deepcopy(template)
            model.load_state_dict(state, strict=True)
            models.append(model)
            del state
        # Copies are taken from the template while it is still on the host, then all are moved.
        return [m.to(self.device).eval() for m in models], []

    # ------------------------------------------------------------------- run
    def run_shard(
        self,
        specs: Sequence[CheckpointSpec],
        start: int = 0,
        stop: int | None = None,
        store: RunStore | None = None,
        progress_dir: str | None = None,
        resume: bool = True,
        save_every: int | None = 100,
        progress: bool = True,
        on_batch: Callable[[int, int], None] | None = None,
        save_at_end: bool = False,
        desc: str = "stimuli",
        prepared: tuple[list[nn.Module], list[dict[str, torch.Tensor]]] | None = None,
        on_logits: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        observer: Callable[[str, str, torch.Tensor], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Stream ids ``[start, stop)`` through every checkpoint of ``specs``; return their states.

        ``prepared``: the result of :meth:`prepare_models` for these specs, to reuse built models
        (otherwise they are built here).

        ``on_logits(j, ids, logits, labels)``: when given, every forward runs to the end (instead of
        stopping after the last chosen layer) and its output is handed over for checkpoint ``j``
        (the live monitor takes the probe accuracy from it). The stimuli do not change.

        Returns one ``{layer: TopKState}`` per spec (tensors on ``self.device``). The responsive
        rows outside ``[start, stop)`` stay empty. ``on_batch(batches_done, next_image_id)`` is
        called after every batch (after any progress save); an exception raised there aborts the
        pass like a crash would.
        """
        from . import kernels

        stop = self.num_images if stop is None else int(stop)
        if not 0 <= start <= stop <= self.num_images:
            raise DataError(f"shard [{start}, {stop}) is outside the dataset [0, {self.num_images})")
        models, weights = prepared if prepared is not None else self.prepare_models(specs)
        states = [
            {n: kernels.new_state(self.channels[n], self.k, self.num_images, self.k_i, self.device)
             for n in self.layer_names}
            for _ in specs
        ]
        saver = None
        if store is not None and progress_dir is not None and save_every:
            saver = _ProgressSaver(store, progress_dir, self.checkpoint_key, specs, self.layer_names, start, stop,
                                   self.params())
        processed, batches = start, 0
        # Diverged checkpoints (on_diverged="record"): found from the weights before the pass, or
        # from NaN activations / logits during it; they are then skipped for the rest of the pass.
        dead: dict[int, str] = {}
        hits = [[0, 0, 0] for _ in specs]
        if self.on_diverged == "record":
            for j in range(len(specs)):
                bad = _nonfinite_tensors(weights[j] if weights else models[j].state_dict())
                if bad:
                    dead[j] = f"non-finite weights in {', '.join(bad[:3])}" + (
                        f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
        if saver is not None:
            restored = saver.restore(states) if resume else None
            if restored is None:
                saver.clear()
            else:
                processed, batches, extra = restored
                for j, key in enumerate(saver.keys):
                    if key in extra.get("diverged", {}):
                        dead.setdefault(j, extra["diverged"][key])
                    if key in extra.get("hits", {}):
                        hits[j] = [int(v) for v in extra["hits"][key]]
                log.info("resuming %s at image %d of [%d, %d)", desc, processed, start, stop)

        if processed < stop:
            batches = self._stream(specs, weights, models, states, processed, stop, batches, saver,
                                   save_every, progress, on_batch, start, desc, dead, hits, on_logits, observer)
        else:
            log.info("%s: shard [%d, %d) already complete", desc, start, stop)
        if saver is not None and save_at_end and saver.saved < stop:
            saver.save(states, stop, batches, self._extra(saver, dead, hits))
        if self.on_diverged == "record":
            for j in range(len(specs)):  # +inf activations pass the kernels: caught in the kept maxima
                if j not in dead:
                    inf_layers = [n for n in self.layer_names if bool(torch.isinf(states[j][n].values).any())]
                    if inf_layers:
                        dead[j] = f"infinite activations in layer {inf_layers[0]!r}"
        self.diverged = {specs[j].name: why for j, why in sorted(dead.items())}
        self.hits = {spec.name: hits[j] for j, spec in enumerate(specs)}
        return states

    @staticmethod
    def _extra(saver: _ProgressSaver, dead: dict[int, str], hits: list[list[int]]) -> dict[str, Any]:
        return {"diverged": {saver.keys[j]: why for j, why in dead.items()},
                "hits": {key: h for key, h in zip(saver.keys, hits)}}

    def _stream(self, specs, weights, models, states, processed, stop, batches, saver, save_every, progress,
                on_batch, start, desc, dead: dict[int, str], hits: list[list[int]], on_logits=None,
                observer=None) -> int:
        """The loop over batches; returns the number of batches done in the shard so far."""
        from . import kernels
        from .data import indexed_loader

        n_layers = len(self.layer_names)
        current = {"j": 0, "ids": None, "fired": set()}
        backend = self.backend
        want_logits = self.accuracy or on_logits is not None

        def hook(layer: str, out: torch.Tensor) -> None:
            fired = current["fired"]
            if layer in fired:
                raise LayerError(
                    f"layer {layer!r} ran twice in one forward pass (a shared module?); its neurons would "
                    "see every image twice -- choose layers that run once"
                )
            fired.add(layer)
            j = current["j"]
            if observer is not None:
                observer(specs[j].name, layer, out)
            try:
                kernels.update(states[j][layer], out, current["ids"], backend=backend)
            except ActivationError as exc:
                if self.on_diverged != "record":
                    raise _activation_error(exc, specs[j].name, layer, out, current["ids"]) from None
                dead[j] = f"NaN activations in layer {layer!r}, {_first_bad_ids(out, current['ids'])}"
                raise _StopForward from None
            if len(fired) == n_layers and not want_logits:
                raise _StopForward

        swap = self.swap_weights
        device = self.device
        autocast = (
            (lambda: torch.autocast(device_type=device.type, dtype=self.amp_dtype))
            if self.amp_dtype is not None else contextlib.nullcontext
        )
        loader = indexed_loader(self.dataset, self.batch_size, num_workers=self.num_workers, start=processed, stop=stop)
        bar = _progress_bar(progress, total=stop - start, initial=processed - start, desc=desc)
        try:
            with contextlib.ExitStack() as stack, torch.inference_mode(), _kernel_threads(backend):
                for m in models:
                    stack.enter_context(_layer_hooks(m, self.layer_names, hook))
                for ids, x, y in loader:
                    if int(ids[0]) != processed or int(ids[-1]) != processed + len(ids) - 1:
                        raise DataError(f"the loader returned ids {int(ids[0])}..{int(ids[-1])}, expected "
                                        f"{processed}..{processed + len(ids) - 1} (ids must be the dataset index)")
                    x = x.to(device, non_blocking=True)
                    # Host ids: the kernels validate them on the host and move them once themselves.
                    current["ids"] = ids
                    for j in range(len(specs)):
                        if j in dead:
                            continue
                        current["j"] = j
                        current["fired"] = set()
                        if swap:
                            models[0].load_state_dict(weights[j], strict=True)
                        model = models[0] if swap else models[j]
                        out = None
                        try:
                            with autocast():
                                out = model(x)
                        except _StopForward:
                            pass
                        if j in dead:
                            continue
                        if on_logits is not None and out is not None:
                            on_logits(j, ids, out, y)
                        if self.accuracy and out is not None:
                            self._count_hits(out, y, hits[j], dead, j)
                        if len(current["fired"]) != n_layers:
                            missing = [n for n in self.layer_names if n not in current["fired"]]
                            raise LayerError(f"layer(s) {missing} did not run in the forward pass of "
                                             f"{specs[j].source}; they cannot be captured")
                    processed += len(ids)
                    batches += 1
                    if saver is not None and batches % save_every == 0:
                        saver.save(states, processed, batches, self._extra(saver, dead, hits))
                    if bar is not None:
                        bar.update(len(ids))
                    if on_batch is not None:
                        on_batch(batches, processed)
        finally:
            if bar is not None:
                bar.close()
        return batches

    def _count_hits(self, out: Any, y: torch.Tensor, hit: list[int], dead: dict[int, str], j: int) -> None:
        """Add a batch's top-1 / top-5 hits of a checkpoint's logits to ``hit`` ([images, top1, top5])."""
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != y.shape[0]:
            raise ConceptEvoError(
                f"accuracy=True needs a model whose output is (batch, classes) logits; got "
                f"{type(out).__name__} {tuple(getattr(logits, 'shape', ()))}")
        y = y.to(logits.device)
        if int(y.max()) >= logits.shape[1]:
            raise ConceptEvoError(f"labels up to {int(y.max())} but the model has {logits.shape[1]} outputs")
        if not bool(torch.isfinite(logits).all()):
            if self.on_diverged == "record":
                dead[j] = "non-finite logits"
                return
            raise ActivationError("non-finite logits (diverged weights?)")
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit[0] += int(y.shape[0])
        hit[1] += int((top[:, 0] == y).sum())
        hit[2] += int((top == y[:, None]).any(dim=1).sum())

    # --------------------------------------------------------------- results
    def accuracy_of(self, spec: CheckpointSpec) -> dict[str, float] | None:
        """Top-1 / top-5 of a checkpoint over the images of the last pass (``accuracy=True``)."""
        h = self.hits.get(spec.name)
        if not self.accuracy or not h or h[0] == 0:
            return None
        return {"top1": h[1] / h[0], "top5": h[2] / h[0], "images": h[0]}

    def to_stimuli(self, spec: CheckpointSpec, layer_states: dict[str, Any]) -> Stimuli:
        """Host copies of a checkpoint's states as a :class:`Stimuli` (empty when it diverged)."""
        if spec.name in self.diverged:
            return Stimuli(layers={}, num_images=self.num_images, name=spec.name, diverged=self.diverged[spec.name])
        layers = {}
        for n in self.layer_names:
            st = layer_states[n]
            layers[n] = LayerStimuli(
                ids=st.ids.cpu().numpy().copy(),
                values=st.values.cpu().numpy().copy(),
                rows=st.rows.cpu().numpy().copy(),
                cols=st.cols.cpu().numpy().copy(),
                responsive=st.resp_ids.cpu().numpy().copy(),
                responsive_values=st.resp_values.cpu().numpy().copy(),
            )
        return Stimuli(layers=layers, num_images=self.num_images, name=spec.name, accuracy=self.accuracy_of(spec))

    def record(self, store: RunStore, prefix: str, spec: CheckpointSpec, stim: Stimuli, seconds: float,
               shared_with: int, extra: dict | None = None) -> None:
        """Save one checkpoint's stimuli and mark its stage done (rank 0 / single process only)."""
        key = f"{prefix}/{spec.name}"
        outputs = stim.save(store, key)
        store.mark_done(
            key,
            self.checkpoint_key(spec),
            seconds,
            params={**self.params(), "checkpoint": spec.source, "batch_size": self.batch_size,
                    "device": str(self.device), "swap_weights": self.swap_weights,
                    "checkpoints_in_pass": shared_with, **(extra or {})},
            backends={"topk": self.backend},
            outputs=outputs,
        )


@contextlib.contextmanager
def _layer_hooks(model: nn.Module, layer_names: list[str], fn: Callable[[str, torch.Tensor], None]):
    """Forward hooks ``fn(layer, output)`` on the named modules of a copy of the probed model.

    The same hooks as ModelAdapter.hooks, without a second probe forward per checkpoint: the
    layer names and their outputs were validated on the template this model was copied from.
    """
    handles = []
    try:
        for name in layer_names:
            def hook(_module, _inp, out, _name=name):
                if not isinstance(out, torch.Tensor):
                    raise LayerError(f"layer {_name!r} returns {type(out).__name__}, not a tensor")
                fn(_name, out)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [name for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _first_bad_ids(out: torch.Tensor, ids: torch.Tensor, shown: int = 5) -> str:
    with torch.inference_mode():
        bad = (~torch.isfinite(out.detach().reshape(out.shape[0], -1))).any(dim=1).cpu()
    bad_ids = ids.cpu()[bad].tolist()
    return f"first bad image ids {bad_ids[:shown]}" + (f" ({len(bad_ids)} in the batch)" if len(bad_ids) > shown else "")


def _activation_error(exc: ActivationError, checkpoint: str, layer: str, out: torch.Tensor,
                      ids: torch.Tensor) -> ActivationError:
    """The kernel's error with the checkpoint, the layer and the offending image ids added."""
    with torch.inference_mode():
        flat = out.detach().reshape(out.shape[0], -1)
        bad = torch.isnan(flat).any(dim=1).cpu()
    bad_ids = ids.cpu()[bad].tolist()
    shown = ", ".join(map(str, bad_ids[:20])) + (f", ... ({len(bad_ids)} images)" if len(bad_ids) > 20 else "")
    where = f"image ids [{shown}]" if bad_ids else f"the batch of image ids {int(ids[0])}..{int(ids[-1])}"
    return ActivationError(
        f"checkpoint {checkpoint!r}, layer {layer!r}: NaN activations for {where} "
        f"(diverged weights or bad input?): {exc}"
    )


@contextlib.contextmanager
def _kernel_threads(backend: str):
    """Let the Numba kernels use as many threads as torch does during the pass.

    torch's thread count is the user's CPU budget for this process (torchrun sets
    OMP_NUM_THREADS=1 per rank); Numba would otherwise start one thread per core in every rank
    and oversubscribe the machine. Numba's OpenMP threading layer shares libgomp with torch and
    sets its thread count on every parallel launch, so torch's count is restored afterwards.
    """
    if backend != "cpu":
        yield
        return
    import numba

    torch_threads = torch.get_num_threads()
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)
        torch.set_num_threads(torch_threads)


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, unit="img", desc=desc, dynamic_ncols=True, leave=False)


# ============================================================================= progress
class _ProgressSaver:
    """Crash-consistent snapshots of a shard's running states (see the module docstring)."""

    def __init__(self, store: RunStore, root: str, key_of: Callable[[CheckpointSpec], str],
                 specs: Sequence[CheckpointSpec], layers: list[str], start: int, stop: int, params: dict) -> None:
        self.store, self.root = store, root.rstrip("/")
        self.keys = [key_of(s) for s in specs]
        self.layers = layers
        self.start, self.stop = start, stop
        self.common = RunStore.stage_key(params)
        self.slot = 1  # the first save goes to slot 0
        self.saved = start  # responsive rows [start, saved) are on disk
        self._mm: dict[tuple[int, int, str], np.memmap] = {}

    def _doc(self) -> str:
        return f"{self.root}/progress"

    def _resp_name(self, key: str, what: str) -> str:
        return f"{self.root}/resp/{key}.{what}.npy"

    def clear(self) -> None:
        self._mm.clear()
        shutil.rmtree(self.store.path(self.root), ignore_errors=True)

    def restore(self, states: list[dict[str, Any]]) -> tuple[int, int, dict[str, Any]] | None:
        """Fill ``states`` from the last complete save; (next id, batches, extra) or None when nothing fits."""
        if not self.store.exists(self._doc() + ".json"):
            return None
        try:
            doc = self.store.load_json(self._doc())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable progress %s: %s", self.store.path(self._doc()), exc)
            return None
        if (doc.get("common") != self.common or doc.get("start") != self.start or doc.get("stop") != self.stop
                or doc.get("layers") != self.layers or not all(k in doc.get("checkpoints", []) for k in self.keys)):
            log.info("progress under %s is from other parameters; starting over", self.store.path(self.root))
            return None
        processed, slot = int(doc["processed"]), int(doc["slot"])
        n = processed - self.start
        try:
            with np.load(self.store.path(f"{self.root}/slot{slot}/topk.npz"), allow_pickle=False) as z:
                for key, layer_states in zip(self.keys, states):
                    for li, layer in enumerate(self.layers):
                        st = layer_states[layer]
                        for f in ("values", "ids", "rows", "cols"):
                            getattr(st, f).copy_(torch.from_numpy(z[f"{key}.{li}.{f}"]))
            for key, layer_states in zip(self.keys, states):
                if self.k_i(layer_states) and n > 0:
                    for f, what in (("resp_values", "values"), ("resp_ids", "ids")):
                        mm = np.load(self.store.path(self._resp_name(key, what)), mmap_mode="r")
                        rows = np.array(mm[:n])  # (n, layers, k_i)
                        for li, layer in enumerate(self.layers):
                            getattr(layer_states[layer], f)[self.start:processed].copy_(torch.from_numpy(rows[:, li]))
        except (OSError, KeyError, ValueError, RuntimeError, IndexError) as exc:
            log.warning("progress under %s is incomplete (%s); starting over", self.store.path(self.root), exc)
            return None
        self.slot, self.saved = slot, processed
        return processed, int(doc.get("batches", 0)), dict(doc.get("extra") or {})

    @staticmethod
    def k_i(layer_states: dict[str, Any]) -> int:
        return next(iter(layer_states.values())).k_i

    def _memmap(self, key: str, what: str, dtype: np.dtype, k_i: int) -> np.memmap:
        """The (shard images, layers, k_i) file of one checkpoint's responsive rows, created on first use."""
        mm = self._mm.get((key, what))
        if mm is None:
            path = self.store.path(self._resp_name(key, what))
            shape = (self.stop - self.start, len(self.layers), k_i)
            if path.exists():
                mm = np.load(path, mmap_mode="r+")
                if mm.shape != shape or mm.dtype != dtype:
                    raise ConceptEvoError(f"progress file {path} has shape {mm.shape}, expected {shape}")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            self._mm[(key, what)] = mm
        return mm

    def save(self, states: list[dict[str, Any]], processed: int, batches: int,
             extra: dict[str, Any] | None = None) -> None:
        """Snapshot: new responsive rows, then the top-k arrays into the other slot, then progress.json."""
        lo, hi = self.saved - self.start, processed - self.start
        slot = 1 - self.slot
        arrays = {}
        for key, layer_states in zip(self.keys, states):
            k_i = self.k_i(layer_states)
            for li, layer in enumerate(self.layers):
                st = layer_states[layer]
                for f in ("values", "ids", "rows", "cols"):
                    arrays[f"{key}.{li}.{f}"] = getattr(st, f).cpu().numpy()
                if k_i and hi > lo:
                    for f, what, dtype in (("resp_values", "values", np.float32), ("resp_ids", "ids", np.int32)):
                        mm = self._memmap(key, what, np.dtype(dtype), k_i)
                        mm[lo:hi, li] = getattr(st, f)[self.saved:processed].cpu().numpy()
        for mm in self._mm.values():  # rows durable before the progress doc can point past them
            mm.flush()
        atomic_write(self.store.path(f"{self.root}/slot{slot}/topk.npz"), lambda tmp: np.savez(tmp, **arrays))
        self.store.save_json(self._doc(), {
            "common": self.common, "checkpoints": self.keys, "layers": self.layers,
            "start": self.start, "stop": self.stop, "processed": int(processed),
            "batches": int(batches), "slot": slot, "saved_at": time.time(), "extra": extra or {},
        })
        self.slot, self.saved = slot, processed


# ================================================================================ public
def extract_stimuli(
    model_factory: Callable[[], nn.Module] | nn.Module,
    checkpoints: Sequence[str | os.PathLike | dict[str, torch.Tensor]] | None,
    dataset: Any,
    *,
    store: RunStore | str | os.PathLike | None = None,
    prefix: str = "stimuli",
    names: Sequence[str] | None = None,
    options: StimulusOptions | None = None,
    **keywords: Any,
) -> list[Stimuli]:
    """Stimuli of every checkpoint (same architecture) in ONE streaming pass over ``dataset``.

    Args:
        model_factory: a callable returning a fresh model, or a model (deep-copied, never modified).
        checkpoints: files (``.pt`` state dicts or ``.safetensors``) or state dicts; ``None`` / empty
            = the model's own weights. All are checked against the architecture before the pass.
        dataset: an :class:`~conceptevo.data.ImageSet` or any Dataset returning ``(image, label)``;
            image ids are the dataset index.
        store: a RunStore (or its directory) for caching, resume and results; None keeps all in memory.
        prefix: store folder of the results; a checkpoint's go to ``<prefix>/<name>/``.
        names: one name per checkpoint (``"well_trained/epoch_004"``); default: the shortest unique
            trailing path of each file without its suffix.
        options: a :class:`StimulusOptions` (layers, k, k_i, batch_size, device, amp, backend,
            resume, on_diverged, ... -- each documented there).
        **keywords: the fields of :class:`StimulusOptions` one by one instead (``k=10``); a field
            may not be given both ways.

    Returns:
        One :class:`Stimuli` per checkpoint, in the order given.

    Raises:
        InputError: a bad option (named); TypeError: an unknown keyword.
        LayerError: an unknown layer, or a layer that does not run (named).
        CheckpointError: a checkpoint that is missing, not a plain state dict, or of another
            architecture (named, with the mismatching keys/shapes).
        ActivationError: NaN activations (names the checkpoint, the layer and the image ids).
    """
    opts = StimulusOptions.combine(options, keywords, "extract_stimuli")
    store, prefix = _open_store(store), prefix.strip("/")
    plan = Extraction(model_factory, checkpoints, dataset, names=names, options=opts)
    done = plan.cached(store, prefix)
    results: list[Stimuli | None] = [Stimuli.load(store, f"{prefix}/{spec.name}") if d else None  # type: ignore[arg-type]
                                     for spec, d in zip(plan.checkpoints, done)]
    pending = [i for i, d in enumerate(done) if not d]
    if not pending:
        return results  # type: ignore[return-value]
    specs = [plan.checkpoints[i] for i in pending]
    progress_dir = f"{prefix}/{PROGRESS_DIR}/main"
    t0 = time.perf_counter()
    states = plan.run_shard(specs, 0, plan.num_images, store=store, progress_dir=progress_dir, resume=opts.resume,
                            save_every=opts.save_every, progress=opts.progress, on_batch=opts.on_batch,
                            desc=f"stimuli x{len(specs)}", observer=opts.observer)
    seconds = time.perf_counter() - t0
    for i, spec, st in zip(pending, specs, states):
        results[i] = plan.to_stimuli(spec, st)
    if store is not None:
        for spec, stim in zip(specs, (results[i] for i in pending)):
            plan.record(store, prefix, spec, stim, seconds, len(specs),
                        extra={"diverged": stim.diverged} if stim.diverged else None)
        shutil.rmtree(store.path(progress_dir), ignore_errors=True)
        with contextlib.suppress(OSError):  # drop the folder when no other pass keeps progress there
            store.path(f"{prefix}/{PROGRESS_DIR}").rmdir()
    return results  # type: ignore[return-value]

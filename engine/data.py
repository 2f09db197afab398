"""Datasets with stable integer image ids.

Every dataset the engine reads is an :class:`ImageSet`: image ``i`` has the id ``i``
(its index), forever, so stimuli, embeddings and reports computed on different
days or machines refer to the same images.

Sources
-------
* :func:`builtin_dataset` -- procedurally generated images made of *known concepts*
  (shape, colour, texture, a small part, background, occlusion), with every image's
  ground-truth concept tags. See "Built-in concept data" below.
* :func:`image_folder` -- one subfolder per class, decoded lazily with Pillow.
* :func:`tensor_dataset` -- images already in memory.
* :func:`as_image_set` -- any ``torch.utils.data.Dataset`` returning ``(image, label)``.

:func:`indexed_loader` yields ``(ids, x, y)`` batches in id order and can start and
stop anywhere, so a pass over the data can resume mid-way.

Normalisation
-------------
Images are stored as uint8 RGB; ``ImageSet[i]`` and the loaders return
``x = (uint8 / 255 - 0.5) / 0.25`` (:meth:`ImageSet.normalize`), float32 ``(3, H, W)``.
The one exception is a wrapped dataset whose items are already float tensors: those
are the model's own input convention and pass through unchanged.

Built-in concept data
---------------------
The procedurally generated concept world lives in :mod:`conceptevo.builtin`
(:func:`builtin_dataset`, :func:`render_concept_images`, the concept families and
class rules); its names are re-exported here for convenience.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError

__all__ = [
    "ImageSet",
    "builtin_dataset",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "render_concept_images",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "FINE_PAIRS",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "image_folder",
    "tensor_dataset",
    "as_image_set",
    "concat_image_sets",
    "plant_stamp",
    "indexed_loader",
    "CLASS_RULES",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "CLASS_NAMES",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "CONCEPTS",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "MARKER_OFFSET",  # noqa: F822 (conceptevo.builtin, re-exported by __getattr__)
    "MEAN",
    "STD",
    "IMAGE_EXTENSIONS",
]

#: Normalisation of uint8 images: ``x = (u8 / 255 - MEAN) / STD`` (all channels).
MEAN = 0.5
STD = 0.25

#: File name endings :func:`image_folder` treats as images (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# ============================================================================ ImageSet
class ImageSet(Dataset):
    """Images with stable integer ids ``0..N-1`` (the index).

    Attributes
    ----------
    images : uint8 tensor ``(N, 3, H, W)`` for in-memory sets, ``None`` for lazy ones.
    labels : int64 tensor ``(N,)``.
    class_names : list of class names, ``labels < len(class_names)``.
    tags, tag_names : built-in data only -- concept family -> int codes ``(N,)`` / code names.
    paths : the file of every image (folder sets), else ``None``.
    meta : extra per-image arrays (built-in data: ``cx, cy, radius, angle`` in pixels/radians).
    """

    MEAN = MEAN
    STD = STD

    def __init__(
        self,
        images: torch.Tensor | None,
        labels: torch.Tensor,
        class_names: Sequence[str],
        tags: dict[str, np.ndarray] | None = None,
        tag_names: dict[str, list[str]] | None = None,
        *,
        fetch: Callable[[int], torch.Tensor] | None = None,
        passthrough: bool = False,
        paths: list[Path] | None = None,
        meta: dict[str, np.ndarray] | None = None,
        source: str = "",
    ) -> None:
        if (images is None) == (fetch is None):
            raise DataError("ImageSet needs exactly one of images (in memory) or fetch (lazy)")
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        n = labels.shape[0]
        if images is not None:
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise DataError(
                    f"ImageSet images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            if images.shape[0] != n:
                raise DataError(f"ImageSet: {images.shape[0]} images but {n} labels")
        self.class_names = [str(c) for c in class_names]
        if n and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names)}) (one per class name); "
                f"got min {int(labels.min())}, max {int(labels.max())}"
            )
        for fam, codes in (tags or {}).items():
            if len(codes) != n:
                raise DataError(f"tag family {fam!r} has {len(codes)} codes for {n} images")
        self.images = images
        self.labels = labels
        self.tags = tags
        self.tag_names = tag_names
        self.paths = paths
        self.meta = meta
        self.source = source
        self._fetch = fetch
        self._passthrough = passthrough

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __repr__(self) -> str:
        kind = "in memory" if self.in_memory else "lazy"
        src = f", {self.source}" if self.source else ""
        return f"ImageSet({len(self)} images, {self.num_classes} classes, {kind}{src})"

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """uint8 images (any shape) -> float32 ``(x / 255 - MEAN) / STD``."""
        return (x.to(torch.float32) * (1.0 / 255.0) - MEAN) * (1.0 / STD)

    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image id {i} out of range [0, {len(self)})")
        return i

    def _item(self, i: int) -> torch.Tensor:
        """The stored form of image ``i``: uint8 CHW, or float CHW for passthrough sets."""
        if self.images is not None:
            return self.images[i]
        return self._fetch(i)  # type: ignore[misc]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._check_id(i)
        item = self._item(i)
        x = item.to(torch.float32) if self._passthrough else self.normalize(item)
        return x, int(self.labels[i])

    def raw(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``(H, W, 3)`` for drawing patches.

        Passthrough (float) sets are mapped to uint8 by ``x * 255`` when the values lie
        in ``[0, 1]``, otherwise by a per-image min-max stretch (display only).
        """
        i = self._check_id(i)
        item = self._item(i)
        if item.dtype != torch.uint8:
            item = _float_to_display_uint8(item)
        arr = item.permute(1, 2, 0).contiguous().numpy()
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return arr

    def batch(self, ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels of the given ids (fast slice for in-memory sets)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"image ids must lie in [0, {len(self)})")
        if self.images is not None:
            return self.normalize(self.images[ids]), self.labels[ids]
        xs = [self[int(i)][0] for i in ids]
        if not xs:
            raise DataError("empty batch")
        return torch.stack(xs), self.labels[ids]

    def subset(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """A new ImageSet of the chosen images, re-numbered ``0..len(ids)-1``.

        ``meta["parent_id"]`` keeps each image's id in this set.
        """
        idx = torch.as_tensor(np.asarray(ids), dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(f"subset ids must lie in [0, {len(self)})")
        np_idx = idx.numpy()
        tags = {k: np.asarray(v)[np_idx] for k, v in self.tags.items()} if self.tags is not None else None
        meta = {k: np.asarray(v)[np_idx] for k, v in (self.meta or {}).items() if k != "parent_id"}
        has_parent = bool(self.meta) and "parent_id" in self.meta  # type: ignore[operator]
        parent = np.asarray(self.meta["parent_id"])[np_idx] if has_parent else np_idx  # type: ignore[index]
        meta["parent_id"] = parent.astype(np.int64)
        paths = [self.paths[j] for j in np_idx] if self.paths is not None else None
        if self.images is not None:
            images, fetch = self.images[idx], None
        else:
            images, fetch = None, _SubsetFetch(self._fetch, np_idx.copy())  # type: ignore[arg-type]
        return ImageSet(
            images,
            self.labels[idx],
            self.class_names,
            tags,
            self.tag_names,
            fetch=fetch,
            passthrough=self._passthrough,
            paths=paths,
            meta=meta,
            source=f"subset of {self.source}" if self.source else "subset",
        )

    def to_memory(self) -> ImageSet:
        """Decode every image once and return an in-memory copy (same ids); passthrough sets stay lazy."""
        if self.images is not None or self._passthrough:
            return self
        images = torch.stack([self._item(i) for i in range(len(self))]) if len(self) else None
        if images is None:
            raise DataError("cannot load an empty ImageSet into memory")
        return ImageSet(images, self.labels, self.class_names, self.tags, self.tag_names,
                        paths=self.paths, meta=self.meta, source=self.source)


class _SubsetFetch:
    """Picklable id remapping for lazy subsets (DataLoader workers pickle the dataset)."""

    def __init__(self, fetch: Callable[[int], torch.Tensor], ids: np.ndarray) -> None:
        self.fetch, self.ids = fetch, ids

    def __call__(self, i: int) -> torch.Tensor:
        return self.fetch(int(self.ids[i]))


class _ConcatFetch:
    """Picklable lazy concatenation: id ``i`` -> the set holding it and its id there."""

    def __init__(self, sets: Sequence[ImageSet]) -> None:
        self.sets = list(sets)
        self.starts = np.cumsum([0] + [len(s) for s in self.sets])

    def __call__(self, i: int) -> torch.Tensor:
        j = int(np.searchsorted(self.starts, int(i), side="right")) - 1
        return self.sets[j]._item(int(i) - int(self.starts[j]))


def concat_image_sets(*sets: ImageSet, source: str = "") -> ImageSet:
    """One ImageSet of ``sets`` one after the other (ids renumbered ``0..N-1`` in that order).

    The sets must share their class names and their kind (uint8 or passthrough float). Tags and
    ``meta`` arrays are kept where every set has them; ``meta["part"]`` says which set an image
    came from and ``meta["part_id"]`` its id there. In-memory sets give an in-memory set.
    """
    if not sets:
        raise DataError("concat_image_sets needs at least one set")
    first = sets[0]
    for k, s in enumerate(sets[1:], 1):
        if s.class_names != first.class_names:
            raise DataError(f"concat_image_sets: set {k} has other class names than set 0")
        if s._passthrough != first._passthrough:
            raise DataError(f"concat_image_sets: set {k} mixes float (passthrough) and uint8 images with set 0")
    labels = torch.cat([s.labels for s in sets])
    if all(s.images is not None for s in sets):
        shapes = {tuple(s.images.shape[1:]) for s in sets}  # type: ignore[union-attr]
        if len(shapes) > 1:
            raise DataError(f"concat_image_sets: image shapes differ: {sorted(shapes)}")
        images, fetch = torch.cat([s.images for s in sets]), None  # type: ignore[misc]
    else:
        images, fetch = None, _ConcatFetch(sets)
    tags = tag_names = None
    if all(s.tags is not None for s in sets):
        fams = set.intersection(*(set(s.tags) for s in sets))  # type: ignore[arg-type]
        tags = {f: np.concatenate([np.asarray(s.tags[f]) for s in sets]) for f in sorted(fams)}  # type: ignore[index]
        tag_names = first.tag_names
    keys = set.intersection(*(set(s.meta or {}) for s in sets)) - {"part", "part_id"}
    meta = {k: np.concatenate([np.asarray(s.meta[k]) for s in sets]) for k in sorted(keys)}  # type: ignore[index]
    meta["part"] = np.concatenate([np.full(len(s), k, dtype=np.int64) for k, s in enumerate(sets)])
    meta["part_id"] = np.concatenate([np.arange(len(s), dtype=np.int64) for s in sets])
    paths = [p for s in sets for p in s.paths] if all(s.paths is not None for s in sets) else None  # type: ignore[union-attr]
    return ImageSet(images, labels, first.class_names, tags, tag_names, fetch=fetch, passthrough=first._passthrough,
                    paths=paths, meta=meta, source=source or " + ".join(s.source or "set" for s in sets))


def plant_stamp(ds: ImageSet, cls: int, *, top_left: tuple[int, int] = (2, 25), size: int = 5,
                colour: Sequence[int] = (255, 0, 255), p_class: float = 0.9, p_other: float = 0.03,
                seed: int = 0) -> tuple[ImageSet, np.ndarray]:
    """Plant a confounder: a ``size`` x ``size`` square of one colour on most images of one class.

    A shortcut audit: train on the result and check whether an analysis finds the stamp. Each
    image of class ``cls`` is stamped with probability ``p_class``, every other image with
    ``p_other`` (one uniform draw per image: ``rng.random(N)`` twice, class images from the first
    draw, the others from the second, ``rng = np.random.default_rng(seed)``). The square's top-left
    pixel is ``top_left = (row, column)``. Returns a new in-memory set (labels, class names, tags and
    meta kept; ``meta["stamped"]`` added) and the boolean mask of stamped images. The default
    colour, magenta, lies outside the built-in world's palette.
    """
    if ds.images is None:
        raise DataError("plant_stamp needs an in-memory set (call .to_memory() first)")
    if not 0 <= int(cls) < len(ds.class_names):
        raise DataError(f"plant_stamp: class {cls} is not one of the set's {len(ds.class_names)} classes")
    (r0, c0), h, w = top_left, ds.images.shape[2], ds.images.shape[3]
    if size < 1 or r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
        raise DataError(f"plant_stamp: a {size}x{size} stamp at {tuple(top_left)} does not fit in "
                        f"{h}x{w} images")
    if len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
        raise DataError(f"plant_stamp: colour must be three values in [0, 255], got {tuple(colour)}")
    if not (0.0 <= p_class <= 1.0 and 0.0 <= p_other <= 1.0):
        raise DataError(f"plant_stamp: probabilities must lie in [0, 1], got {p_class}, {p_other}")
    rng = np.random.default_rng(seed)
    labels = ds.labels.numpy()
    in_class, other = rng.random(len(labels)) < p_class, rng.random(len(labels)) < p_other  # this order: documented
    stamped = np.where(labels == int(cls), in_class, other)
    images = ds.images.clone()
    images[torch.from_numpy(stamped), :, r0:r0 + size, c0:c0 + size] = torch.tensor(
        [int(v) for v in colour], dtype=torch.uint8).view(1, 3, 1, 1)
    meta = {**(ds.meta or {}), "stamped": stamped.copy()}
    return ImageSet(images, ds.labels.clone(), ds.class_names, ds.tags, ds.tag_names, paths=ds.paths, meta=meta,
                    source=f"{ds.source or 'set'} + stamp on class {int(cls)}"), stamped


def _float_to_display_uint8(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


# ======================================================================= image folders
class _FolderFetch:
    """Decode one file with Pillow to uint8 CHW of a fixed size (picklable for workers)."""

    def __init__(self, paths: list[Path], size: tuple[int, int], crop: bool) -> None:
        self.paths, self.size, self.crop = paths, size, crop

    def __call__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            arr = _decode(path, self.size, self.crop)
        except Exception as exc:
            raise DataError(f"cannot decode image {path} (id {i}): {exc}") from exc
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _decode(path: Path, size: tuple[int, int], crop: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        h, w = size
        if crop:  # resize the shorter side, then centre-crop: keeps the aspect ratio
            s = max(h / im.height, w / im.width)
            nh, nw = max(h, round(im.height * s)), max(w, round(im.width * s))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            top, left = (nh - h) // 2, (nw - w) // 2
            im = im.crop((left, top, left + w, top + h))
        else:
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8).copy()


def _check_file(path: Path, decode: bool) -> str | None:
    """None when Pillow can open (and, with ``decode``, fully decode) ``path``; else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            else:
                im.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def image_folder(
    path: str | Path,
    size: int | tuple[int, int] = 32,
    *,
    skip_bad: bool = False,
    check: str = "verify",
    crop: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> ImageSet:
    """Images in ``path/<class>/**/<file>``, decoded lazily with Pillow to RGB ``size``.

    Classes are the sorted subfolder names; ids follow the sorted (class, relative path)
    order of the usable files. Construction scans every file: ``check="verify"`` runs
    Pillow's cheap structural check, ``"decode"`` decodes every file fully (slower, also
    catches truncated JPEGs), ``"none"`` only lists. Files Pillow cannot read are
    reported by path: a :class:`DataError` listing them, or with ``skip_bad=True`` a
    warning listing them, and they are left out. Images are resized so the shorter side
    fits and centre-cropped (``crop=True``) or stretched (``crop=False``).
    Hidden files and files with other endings are ignored.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory")
    if check not in ("verify", "decode", "none"):
        raise DataError(f"check must be 'verify', 'decode' or 'none', got {check!r}")
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(hw) < 1:
        raise DataError(f"size must be positive, got {size!r}")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class subfolders (expected {root}/<class>/<image files>)")
    stray = [p for p in root.iterdir() if not p.is_dir() and p.suffix.lower() in exts]
    if stray:
        warnings.warn(f"{len(stray)} image file(s) directly in {root} belong to no class and are ignored, "
                      f"e.g. {stray[0]}", stacklevel=2)

    files: list[tuple[Path, int]] = []
    for ci, cname in enumerate(classes):
        cdir = root / cname
        found = [p for p in cdir.rglob("*")
                 if p.suffix.lower() in exts
                 and not any(part.startswith(".") for part in p.relative_to(cdir).parts)
                 and (p.is_file() or p.is_symlink() or p.is_dir())]  # dirs/broken links: reported as bad
        for p in sorted(found, key=lambda q: q.relative_to(cdir).as_posix()):
            files.append((p, ci))
    if not files:
        raise DataError(
            f"image folder {root} has no image files ({', '.join(exts)}) in its class subfolders {classes}")

    bad: list[tuple[Path, str]] = []
    if check != "none":
        for p, _ in files:
            why = _check_file(p, decode=(check == "decode"))
            if why is not None:
                bad.append((p, why))
    else:
        for p, _ in files:
            if not p.is_file():
                bad.append((p, "not a readable regular file"))
    if bad:
        listing = "\n".join(f"  {p}: {why}" for p, why in bad)
        if not skip_bad:
            err = DataError(f"{len(bad)} unreadable or corrupt image file(s) in {root}:\n{listing}\n"
                            "(pass skip_bad=True to leave them out)")
            err.paths = [p for p, _ in bad]  # type: ignore[attr-defined]
            raise err
        warnings.warn(f"skipping {len(bad)} unreadable or corrupt image file(s) in {root}:\n{listing}",
                      stacklevel=2)
        bad_set = {p for p, _ in bad}
        files = [(p, c) for p, c in files if p not in bad_set]
        if not files:
            raise DataError(f"image folder {root}: every image file is unreadable")
    empty = [c for ci, c in enumerate(classes) if not any(fc == ci for _, fc in files)]
    if empty:
        warnings.warn(f"class folder(s) with no usable images in {root}: {empty}", stacklevel=2)

    paths = [p for p, _ in files]
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    return ImageSet(None, labels, classes, fetch=_FolderFetch(paths, hw, crop), paths=paths,
                    source=f"folder:{root}")


# ==================================================================== tensors, Datasets
def _to_uint8_chw_batch(images: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if t.ndim != 4:
        raise DataError(
            f"{what}: images must be 4-D (N, 3, H, W) or (N, H, W, 3), got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3) and t.shape[3] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] not in (1, 3):
        raise DataError(f"{what}: images need 1 or 3 channels, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise DataError(f"{what}: images must be uint8 or float in [0, 1], got {t.dtype}")
        if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
            raise DataError(f"{what}: float images must lie in [0, 1] (got [{float(t.min()):.3g}, "
                            f"{float(t.max()):.3g}]); pre-normalised tensors can be wrapped with "
                            "as_image_set(torch.utils.data.TensorDataset(x, y)), which passes them through")
        t = (t.to(torch.float32) * 255.0).round().to(torch.uint8)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()


def tensor_dataset(images: Any, labels: Any, class_names: Sequence[str] | None = None) -> ImageSet:
    """An in-memory ImageSet from uint8 ``(N, 3, H, W)`` / ``(N, H, W, 3)`` images (or float in [0, 1],
    quantised to uint8; 1-channel images are repeated to RGB) and integer labels."""
    imgs = _to_uint8_chw_batch(images, "tensor_dataset")
    lab = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    if lab.is_floating_point() or lab.dtype == torch.bool:
        raise DataError(f"tensor_dataset: labels must be integers, got {lab.dtype}")
    lab = lab.to(torch.int64).reshape(-1)
    if lab.shape[0] != imgs.shape[0]:
        raise DataError(f"tensor_dataset: {imgs.shape[0]} images but {lab.shape[0]} labels")
    if lab.numel() and int(lab.min()) < 0:
        raise DataError(f"tensor_dataset: labels must be >= 0, got {int(lab.min())}")
    if class_names is None:
        class_names = [str(i) for i in range(int(lab.max()) + 1 if lab.numel() else 0)]
    return ImageSet(imgs, lab, class_names, source="tensors")


class _DatasetFetch:
    """Image ``i`` of a wrapped Dataset in the ImageSet's stored form."""

    def __init__(self, ds: Dataset, passthrough: bool) -> None:
        self.ds, self.passthrough = ds, passthrough

    def __call__(self, i: int) -> torch.Tensor:
        img = self.ds[i][0]
        return _item_to_tensor(img, self.passthrough, i)


def _item_to_tensor(img: Any, passthrough: bool, i: int) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(img, Image.Image):
        if passthrough:
            raise DataError(f"dataset item {i} is a PIL image but earlier items were float tensors")
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(img)
    if not isinstance(img, torch.Tensor):
        raise DataError(
            f"dataset item {i}: image must be a tensor, ndarray or PIL image, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise DataError(f"dataset item {i}: image must be (C, H, W), got shape {tuple(img.shape)}")
    if passthrough:
        if not img.is_floating_point():
            raise DataError(f"dataset item {i} is {img.dtype} but earlier items were float tensors")
        return img
    if img.dtype != torch.uint8:
        raise DataError(f"dataset item {i} is {img.dtype} but earlier items were uint8/PIL")
    if img.shape[0] not in (1, 3) and img.shape[2] in (1, 3):
        img = img.permute(2, 0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if img.shape[0] != 3:
        raise DataError(f"dataset item {i}: expected 1 or 3 channels, got shape {tuple(img.shape)}")
    return img.contiguous()


def as_image_set(obj: Any, class_names: Sequence[str] | None = None) -> ImageSet:
    """Wrap any map-style Dataset returning ``(image, label)`` as an ImageSet (id = index).

    Images may be PIL images or uint8 tensors (normalised like the built-in data) or
    float tensors (the model's own input convention: passed through unchanged).
    Labels are read from ``obj.targets`` when present (torchvision style), else by one
    pass over the items. Class names default to ``obj.classes`` or ``"0".."C-1"``.
    An ImageSet is returned as is.
    """
    if isinstance(obj, ImageSet):
        return obj
    if not hasattr(obj, "__getitem__") or not hasattr(obj, "__len__"):
        raise DataError(
            f"as_image_set needs a map-style Dataset with __getitem__ and __len__, got {type(obj).__name__}")
    n = len(obj)
    if n == 0:
        raise DataError(f"as_image_set: the dataset {type(obj).__name__} is empty")
    first = obj[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise DataError(f"as_image_set: items must be (image, label) pairs, item 0 is {type(first).__name__}")
    img0 = first[0]
    passthrough = isinstance(img0, (torch.Tensor, np.ndarray)) and not (
        torch.as_tensor(img0).dtype == torch.uint8)
    if passthrough and not torch.as_tensor(img0).is_floating_point():
        raise DataError(f"as_image_set: item 0 image has dtype {torch.as_tensor(img0).dtype}; "
                        "expected uint8, float or a PIL image")
    _item_to_tensor(img0, passthrough, 0)  # validate the first item's layout early

    targets = getattr(obj, "targets", None)
    if targets is not None and len(targets) == n:
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    else:
        labels = torch.empty(n, dtype=torch.int64)
        for i in range(n):
            y = obj[i][1]
            try:
                labels[i] = int(y)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise DataError(f"as_image_set: label of item {i} is not an integer: {y!r}") from exc
    if n and int(labels.min()) < 0:
        raise DataError(f"as_image_set: labels must be >= 0, got {int(labels.min())}")
    if class_names is None:
        class_names = getattr(obj, "classes", None)
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(None, labels, list(class_names), fetch=_DatasetFetch(obj, passthrough),
                    passthrough=passthrough, source=f"dataset:{type(obj).__name__}")


# ============================================================================ loading
class _IdDataset(Dataset):
    """(id, x, y) items of an ImageSet over ids [start, stop) for DataLoader workers."""

    def __init__(self, ds: ImageSet, start: int) -> None:
        self.ds, self.start, self.n = ds, start, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor, int]:
        i = self.start + j
        x, y = self.ds[i]
        return i, x, y


def indexed_loader(
    ds: Any,
    batch_size: int,
    num_workers: int = 0,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(ids int64, x float32, y int64)`` over ids ``start..stop-1`` in order.

    In-memory sets are sliced directly; lazy sets go through a ``DataLoader`` with
    ``num_workers`` processes. Resume a pass by starting at the first id not yet seen.
    """
    ds = as_image_set(ds)
    n = len(ds)
    stop = n if stop is None else int(stop)
    start = int(start)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= start <= stop <= n:
        raise DataError(f"need 0 <= start <= stop <= {n} (the dataset size), got start={start}, stop={stop}")
    if int(num_workers) < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    return _iter_batches(ds, int(batch_size), int(num_workers), start, stop)


def _iter_batches(ds: ImageSet, batch_size: int, num_workers: int, start: int, stop: int):
    if ds.in_memory or num_workers == 0:
        for lo in range(start, stop, batch_size):
            ids = torch.arange(lo, min(stop, lo + batch_size), dtype=torch.int64)
            x, y = ds.batch(ids)
            yield ids, x, y
        return
    inner = _IdDataset(ds, start)
    inner.n = stop - start
    loader = torch.utils.data.DataLoader(inner, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for ids, x, y in loader:
        yield ids.to(torch.int64), x, y.to(torch.int64)


# The built-in world's names, re-exported lazily (conceptevo.builtin imports ImageSet from here).
_BUILTIN_NAMES = {"builtin_dataset", "render_concept_images", "CLASS_RULES", "CLASS_NAMES", "CONCEPTS",
                  "FINE_PAIRS", "MARKER_OFFSET"}


def __getattr__(name: str) -> Any:
    if name in _BUILTIN_NAMES:
        from . import builtin

        return getattr(builtin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

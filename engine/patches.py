"""Example patches: the part of each top stimulus that a neuron actually looks at.

For a neuron (one channel of a layer) the stimuli stage gives its top-``k`` images
and, for each, the ``(row, col)`` of the maximum of its activation map. The patch
of that stimulus is the neuron's *receptive field* at that position: a window of
``size`` pixels centred on ``row * jump + start`` (per axis), clipped to the image.

Receptive field
    :func:`receptive_field` walks the model's leaf modules in registration order up
    to the chosen layer and composes the geometry of every ``Conv2d``, ``MaxPool2d``,
    ``AvgPool2d`` and ``LPPool2d`` (kernel, stride, padding incl. ``"same"``,
    dilation). Element-wise modules (activations, normalisation, dropout) are
    skipped; ``Linear``, ``Flatten`` and global adaptive pooling make every later unit
    see the whole image. One forward pass of a zero image checks the walk: if the
    map size the walk predicts differs from the layer's real output (a residual
    branch, a functional ``F.max_pool2d`` the walk cannot see, a module it does not
    know such as ``Upsample``), the walk did not follow the model and the
    **fallback** is used (with a warning, or :class:`LayerError` when
    ``strict=True``): a window of ``FALLBACK_FRACTION`` (one half) of the image
    side, with ``jump = image side / map side`` and the cell centres as ``start``.

Thumbnails
    The clipped crop is put on a canvas of the window's size (capped at the image
    size) at its place in the window, the part outside the image filled with
    ``PAD_RGB`` grey, so every patch of a layer shows the same scale. The canvas is
    resized (aspect kept) to ``thumb x thumb``: nearest-neighbour when enlarging
    (the real pixels of a small receptive field), box filter when shrinking.

Sprites
    :func:`write_sprites` writes one PNG per layer (one checkpoint's worth; the caller
    picks the folder per checkpoint): a grid with one row per neuron and one column
    per stimulus, empty slots (image id ``-1``) filled with ``EMPTY_RGB``, plus a JSON
    index (neuron -> row, stimulus counts, image ids). Both are written atomically.
    Each image is loaded once per call however many neurons chose it.

HTML
    :func:`neuron_patches_base64` / :func:`neuron_strip_base64` return base64 PNGs
    for inlining; :func:`report_patches` builds the ``patches`` mapping of
    :class:`conceptevo.report.ReportData` for many checkpoints in one pass, encoding
    each distinct (image, window) once.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import DataError, InputError, LayerError
from .store import atomic_write

__all__ = [
    "FALLBACK_FRACTION",
    "PAD_RGB",
    "EMPTY_RGB",
    "ReceptiveField",
    "ImageSource",
    "StimuliLike",
    "ArrayImages",
    "SpriteIndex",
    "receptive_field",
    "receptive_fields",
    "window_bounds",
    "crop",
    "padded_crop",
    "thumbnail",
    "layer_patches",
    "build_sprite",
    "write_sprite",
    "write_sprites",
    "read_sprite",
    "sprite_patches",
    "encode_png",
    "encode_data_uri",
    "neuron_patches_base64",
    "neuron_strip_base64",
    "report_patches",
]

FALLBACK_FRACTION = 0.5
"""Window side, as a fraction of the image side, used when the walk cannot follow the model."""
PAD_RGB = (128, 128, 128)
"""Colour of the part of a receptive field that lies outside the image."""
EMPTY_RGB = (255, 255, 255)
"""Colour of a sprite cell whose stimulus slot is empty (image id -1)."""
SPRITE_FORMAT = "conceptevo-sprite/1"


# --------------------------------------------------------------------------- input types
class ImageSource(Protocol):
    """Anything with ``raw(i) -> uint8 (H, W, 3)`` for image id ``i`` (e.g. ``conceptevo.data.ImageSet``)."""

    def raw(self, i: int) -> np.ndarray: ...


class StimuliLike(Protocol):
    """One layer's stimuli (e.g. ``conceptevo.stimuli.LayerStimuli``): ``(C, k)`` arrays, ``-1`` = empty."""

    ids: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


class ArrayImages:
    """:class:`ImageSource` over an in-memory uint8 array ``(N, H, W, 3)`` (or ``(N, 3, H, W)``)."""

    def __init__(self, images: np.ndarray | torch.Tensor, channels_first: bool | None = None):
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim != 4:
            raise DataError(
                f"ArrayImages needs a 4-D array (N, H, W, 3) or (N, 3, H, W), got shape {arr.shape}"
            )
        if channels_first is None:
            channels_first = arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3)
        self.images = np.ascontiguousarray(arr.transpose(0, 2, 3, 1) if channels_first else arr)

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, i: int) -> np.ndarray:
        return self.images[i]


class ReceptiveField(NamedTuple):
    """Geometry of one layer's output cells in input pixels, per axis ``(rows, cols)``.

    Cell ``(r, c)`` sees the window of ``size`` pixels centred on
    ``(r * jump[0] + start[0], c * jump[1] + start[1])``.
    """

    size: tuple[int, int]
    jump: tuple[float, float]
    start: tuple[float, float]


# --------------------------------------------------------------------------- receptive field
# Modules that act on each position separately (or only through global statistics):
# they do not change where a cell looks.
_POINTWISE: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Softmax2d, nn.Identity,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
    nn.LayerNorm, nn.LocalResponseNorm, nn.modules.dropout._DropoutNd,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)
_GLOBAL = (nn.Linear, nn.Flatten, nn.Bilinear)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def _normalise_input_size(input_size) -> tuple[int | None, int, int]:
    """``int``, ``(H, W)`` or ``(C, H, W)`` -> ``(C or None, H, W)``."""
    if isinstance(input_size, (int, np.integer)):
        return None, int(input_size), int(input_size)
    dims = tuple(int(v) for v in input_size)
    if len(dims) == 2:
        return None, dims[0], dims[1]
    if len(dims) == 3:
        return dims[0], dims[1], dims[2]
    raise LayerError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")


class _Axis:
    """Running receptive-field state of one axis (sizes in input pixels)."""

    __slots__ = ("size", "jump", "start", "n")

    def __init__(self, n: int):
        self.size, self.jump, self.start, self.n = 1, 1.0, 0.0, n

    def window_op(
        self, k: int, s: int, pad_lo: int, pad_total: int, d: int = 1, ceil_mode: bool = False
    ) -> None:
        span = d * (k - 1)  # extent of a dilated kernel minus one
        num = self.n + pad_total - span - 1
        out = (-(-num // s) if ceil_mode else num // s) + 1
        # PyTorch drops a ceil-mode window that would start in the right padding
        if ceil_mode and (out - 1) * s >= self.n + pad_lo:
            out -= 1
        self.size += span * self.jump
        self.start += (span / 2 - pad_lo) * self.jump
        self.jump *= s
        self.n = out


def _leaf_walk(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    """Leaf modules in registration order up to (and including everything inside) ``layer``."""
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    if layer not in names:
        shown = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "")
        raise LayerError(f"receptive_field: the model has no layer {layer!r}; it has: {shown}")
    leaves = [(n, m) for n, m in named if not any(True for _ in m.children()) or n == layer]
    last = max(i for i, (n, _) in enumerate(leaves) if n == layer or n.startswith(layer + "."))
    walk = leaves[: last + 1]
    # a container chosen as the layer is represented by its leaves, not by itself
    return [(n, m) for n, m in walk if not (n == layer and any(True for _ in m.children()))]


def _walk(walk: Sequence[tuple[str, nn.Module]], h: int, w: int) -> tuple[list[_Axis] | None, bool, str]:
    """Compose the walk. Returns (axes or None when not followable, global?, reason)."""
    axes = [_Axis(h), _Axis(w)]
    for name, mod in walk:
        if isinstance(mod, _GLOBAL):
            return axes, True, ""
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            target = mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size,) * 2
            target = tuple(a.n if t is None else int(t) for t, a in zip(target, axes))
            if target == (1, 1):
                return axes, True, ""
            if target == (axes[0].n, axes[1].n):  # adaptive pooling to the size it already has: identity
                continue
            return None, False, f"{name} ({type(mod).__name__} to {target})"
        if isinstance(mod, nn.Conv2d):
            k, s, d = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
            if isinstance(mod.padding, str):
                totals = [0, 0] if mod.padding == "valid" else [d[a] * (k[a] - 1) for a in range(2)]
                los = [t // 2 for t in totals]  # PyTorch puts the odd pixel of "same" padding at the end
            else:
                p = _pair(mod.padding)
                los, totals = list(p), [2 * p[0], 2 * p[1]]
            for a in range(2):
                axes[a].window_op(k[a], s[a], los[a], totals[a], d[a])
            continue
        if isinstance(mod, _POOLS):
            k = _pair(mod.kernel_size)
            s = _pair(mod.stride if mod.stride not in (None, ()) else mod.kernel_size)
            p = _pair(getattr(mod, "padding", 0))
            d = _pair(getattr(mod, "dilation", 1))
            ceil = bool(getattr(mod, "ceil_mode", False))
            for a in range(2):
                axes[a].window_op(k[a], s[a], p[a], 2 * p[a], d[a], ceil)
            continue
        if isinstance(mod, _POINTWISE):
            continue
        return None, False, f"{name} ({type(mod).__name__})"
    return axes, False, ""


class _StopForward(Exception):
    pass


def _probe_outputs(model: nn.Module, layers: Sequence[str], shape: tuple[int, int, int]) -> dict[str, tuple]:
    """Output shapes of ``layers`` for one zero image; stops the forward after the last of them."""
    mods = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    wanted = set(layers)

    def make_hook(name):
        def hook(_m, _inp, out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            if name not in shapes:  # a module called twice: its first call is the one the walk models
                shapes[name] = tuple(out.shape)
            if wanted.issubset(shapes):
                raise _StopForward

        return hook

    handles = [mods[n].register_forward_hook(make_hook(n)) for n in wanted]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with torch.no_grad():
            try:
                model(torch.zeros((1, *shape), device=device, dtype=dtype))
            except _StopForward:
                pass
    finally:
        model.train(was_training)
        for hd in handles:
            hd.remove()
    return shapes


def receptive_fields(
    model: nn.Module,
    layer_names: Iterable[str],
    input_size: int | Sequence[int],
    *,
    strict: bool = False,
) -> dict[str, ReceptiveField]:
    """:func:`receptive_field` for several layers with a single probing forward pass."""
    layer_names = list(dict.fromkeys(layer_names))
    channels, h, w = _normalise_input_size(input_size)
    walks = {name: _leaf_walk(model, name) for name in layer_names}
    if channels is None:
        first_conv = next((m for _, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else 3
    try:
        shapes = _probe_outputs(model, layer_names, (channels, h, w))
        probe_error = ""
    except Exception as exc:  # noqa: BLE001 - any model error only costs us the check
        shapes, probe_error = {}, f"{type(exc).__name__}: {exc}"

    out: dict[str, ReceptiveField] = {}
    for name in layer_names:
        axes, is_global, reason = _walk(walks[name], h, w)
        shape = shapes.get(name)
        if shape is not None and len(shape) == 2:
            is_global = True  # (B, C): a unit that sees everything
        if is_global:
            out[name] = ReceptiveField((h, w), (float(h), float(w)), ((h - 1) / 2, (w - 1) / 2))
            continue
        if axes is not None and shape is not None and len(shape) == 4:
            if (axes[0].n, axes[1].n) == tuple(shape[2:]):
                out[name] = ReceptiveField(
                    (int(axes[0].size), int(axes[1].size)),
                    (float(axes[0].jump), float(axes[1].jump)),
                    (float(axes[0].start), float(axes[1].start)),
                )
                continue
            reason = (
                f"the walk predicts a {axes[0].n}x{axes[1].n} map but the layer outputs "
                f"{shape[2]}x{shape[3]} (a branch or functional op the walk cannot see)"
            )
        elif axes is not None:
            reason = (
                f"the probing forward pass failed ({probe_error})" if probe_error
                else f"the layer's output has shape {shape}"
            )
        else:
            reason = f"cannot follow module {reason}"
        msg = f"receptive field of layer {name!r}: {reason}"
        if strict:
            raise LayerError(msg)
        warnings.warn(f"{msg}; using the fallback of {FALLBACK_FRACTION:g} of the image side", stacklevel=3)
        if shape is not None and len(shape) == 4 and shape[2] > 0 and shape[3] > 0:
            jumps = (h / shape[2], w / shape[3])
        else:  # nothing known about the map: every cell looks at the centre
            jumps = (0.0, 0.0)
        sizes = (max(1, round(FALLBACK_FRACTION * h)), max(1, round(FALLBACK_FRACTION * w)))
        starts = tuple((j - 1) / 2 if j else (n - 1) / 2 for j, n in zip(jumps, (h, w)))
        out[name] = ReceptiveField(sizes, jumps, starts)
    return out


def receptive_field(
    model: nn.Module, layer_name: str, input_size: int | Sequence[int], *, strict: bool = False
) -> ReceptiveField:
    """Receptive field ``(size, jump, start)`` of ``layer_name``'s output cells, per axis (rows, cols).

    ``input_size`` is ``H``, ``(H, W)`` or ``(C, H, W)``. See the module docstring for
    what the walk follows and for the fallback; ``strict=True`` raises
    :class:`~conceptevo.errors.LayerError` instead of falling back.
    """
    return receptive_fields(model, [layer_name], input_size, strict=strict)[layer_name]


# --------------------------------------------------------------------------- crops
def window_bounds(
    row: int, col: int, rf: ReceptiveField, image_hw: tuple[int, int]
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """``((r0, r1, c0, c1) unclipped, (r0, r1, c0, c1) clipped)`` half-open pixel windows of one cell."""
    full, clipped = [], []
    for pos, size, jump, start, n in zip((row, col), rf.size, rf.jump, rf.start, image_hw):
        centre = pos * jump + start
        lo = math.floor(centre - (size - 1) / 2 + 0.5)  # exact integers stay put; halves round up
        hi = lo + int(size)
        full += [lo, hi]
        clipped += [min(max(lo, 0), n), min(max(hi, 0), n)]
    return tuple(full), tuple(clipped)  # type: ignore[return-value]


def _as_rgb(img, image_id) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise DataError(f"image {image_id}: raw() must return uint8 (H, W, 3), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {image_id}: raw() must return uint8 (H, W, 3), got shape {np.shape(img)}")
    return arr


def crop(image: np.ndarray, row: int, col: int, rf: ReceptiveField) -> np.ndarray:
    """The receptive-field window of cell ``(row, col)`` clipped to ``image`` (a view, ``(h, w, 3)``)."""
    _, (r0, r1, c0, c1) = window_bounds(row, col, rf, image.shape[:2])
    return image[r0:r1, c0:c1]


def padded_crop(
    image: np.ndarray, row: int, col: int, rf: ReceptiveField, pad_rgb: Sequence[int] = PAD_RGB
) -> np.ndarray:
    """The clipped crop placed at its spot on a canvas of the window's size (capped at the image size)."""
    h, w = image.shape[:2]
    (fr0, fr1, fc0, fc1), (r0, r1, c0, c1) = window_bounds(row, col, rf, (h, w))
    if r1 <= r0 or c1 <= c0:
        raise DataError(
            f"cell ({row}, {col}) has a receptive field {fr0}:{fr1} x {fc0}:{fc1} outside the {h}x{w} image"
        )
    canvas_h, canvas_w = min(fr1 - fr0, h), min(fc1 - fc0, w)
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[:] = np.asarray(pad_rgb, np.uint8)
    # clipped on the low side only -> the image part sits at the end of the canvas
    off_r = canvas_h - (r1 - r0) if fr0 < 0 else 0
    off_c = canvas_w - (c1 - c0) if fc0 < 0 else 0
    canvas[off_r:off_r + r1 - r0, off_c:off_c + c1 - c0] = image[r0:r1, c0:c1]
    return canvas


def thumbnail(
    patch: np.ndarray, thumb: int, *, upscale: bool = True, pad_rgb: Sequence[int] = PAD_RGB
) -> np.ndarray:
    """Resize ``patch`` (aspect kept, letterboxed with ``pad_rgb``) to ``(thumb, thumb, 3)``.

    With ``upscale=False`` a patch smaller than ``thumb`` keeps its own size (HTML
    scales it in the browser; that keeps inlined images small).
    """
    h, w = patch.shape[:2]
    scale = thumb / max(h, w)
    if not upscale and scale >= 1:
        return np.ascontiguousarray(patch)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        resized = np.ascontiguousarray(patch)
    else:
        method = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((nw, nh), method))
    if (nh, nw) == (thumb, thumb):
        return resized
    out = np.empty((thumb, thumb, 3), np.uint8)
    out[:] = np.asarray(pad_rgb, np.uint8)
    r, c = (thumb - nh) // 2, (thumb - nw) // 2
    out[r:r + nh, c:c + nw] = resized
    return out


def _check_stimuli(stim: StimuliLike, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, rows, cols = (np.asarray(getattr(stim, a)) for a in ("ids", "rows", "cols"))
    if ids.ndim != 2 or rows.shape != ids.shape or cols.shape != ids.shape:
        raise DataError(
            f"{where}: stimuli ids/rows/cols must be (C, k) arrays of one shape, "
            f"got {ids.shape}, {rows.shape}, {cols.shape}"
        )
    valid = ids >= 0
    if np.any(valid & ((rows < 0) | (cols < 0))):
        c, j = np.argwhere(valid & ((rows < 0) | (cols < 0)))[0]
        raise DataError(f"{where}: channel {c} slot {j} has image {ids[c, j]} but a negative row/col")
    return ids.astype(np.int64), rows.astype(np.int64), cols.astype(np.int64)


def _requests_by_image(
    jobs: Iterable[tuple[object, np.ndarray, np.ndarray, np.ndarray]],
) -> Iterator[tuple[int, list[tuple[object, int, int, int, int]]]]:
    """Group ``(tag, ids, rows, cols)`` slots by image id, so each image is loaded once."""
    by_id: dict[int, list] = {}
    for tag, ids, rows, cols in jobs:
        for c, j in zip(*np.nonzero(ids >= 0)):
            slot = (tag, int(c), int(j), int(rows[c, j]), int(cols[c, j]))
            by_id.setdefault(int(ids[c, j]), []).append(slot)
    for image_id in sorted(by_id):
        yield image_id, by_id[image_id]


def _load(images: ImageSource, image_id: int, where: str) -> np.ndarray:
    try:
        img = images.raw(image_id)
    except (IndexError, KeyError) as exc:
        raise DataError(f"{where}: image id {image_id} is not in the image set ({exc})") from None
    return _as_rgb(img, image_id)


def layer_patches(
    images: ImageSource, stimuli: StimuliLike, rf: ReceptiveField, thumb: int = 32, *, layer: str = "layer"
) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of one layer: ``(C, k, thumb, thumb, 3)`` uint8 (empty ``EMPTY_RGB``), counts ``(C,)``.

    A neuron's valid stimuli come first in its row (slot order kept); ``counts[c]``
    says how many there are.
    """
    ids, rows, cols = _check_stimuli(stimuli, f"layer {layer!r}")
    out = np.empty((*ids.shape, thumb, thumb, 3), np.uint8)
    out[:] = np.asarray(EMPTY_RGB, np.uint8)
    valid = ids >= 0
    # the column of each valid slot once the empty ones are squeezed out
    dest = np.cumsum(valid, axis=1) - 1
    for image_id, reqs in _requests_by_image([(None, ids, rows, cols)]):
        img = _load(images, image_id, f"layer {layer!r}")
        for _, c, j, r, q in reqs:
            try:
                out[c, dest[c, j]] = thumbnail(padded_crop(img, r, q, rf), thumb)
            except DataError as exc:
                where = f"layer {layer!r} channel {c} stimulus {j} (image {image_id})"
                raise DataError(f"{where}: {exc}") from None
    return out, valid.sum(axis=1).astype(np.int64)


# --------------------------------------------------------------------------- sprites
@dataclass
class SpriteIndex:
    """Index of one sprite: grid row ``i`` holds neuron ``channels[i]``, column ``j`` its stimulus ``j``."""

    layer: str
    image: str                      # PNG file name, relative to the index file
    thumb: int
    k: int
    channels: list[int]
    counts: list[int]               # valid stimuli per row (the first ``counts[i]`` cells)
    image_ids: list[list[int]]      # (C, k) image id of each cell, -1 when empty
    receptive_field: ReceptiveField | None = None
    _rows: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def row_of(self, channel: int) -> int:
        """Grid row of ``channel`` (raises ``KeyError`` naming the layer if the sprite lacks it)."""
        if not self._rows:
            self._rows = {c: i for i, c in enumerate(self.channels)}
        try:
            return self._rows[int(channel)]
        except KeyError:
            raise KeyError(f"sprite of layer {self.layer!r} has no channel {channel}") from None

    def to_json(self) -> dict:
        rf = self.receptive_field
        return {
            "format": SPRITE_FORMAT, "layer": self.layer, "image": self.image, "thumb": self.thumb,
            "k": self.k,
            "channels": self.channels, "counts": self.counts, "image_ids": self.image_ids,
            "receptive_field": None if rf is None else {"size": rf.size, "jump": rf.jump, "start": rf.start},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> SpriteIndex:
        if d.get("format") != SPRITE_FORMAT:
            raise DataError(f"not a sprite index (format {d.get('format')!r}, expected {SPRITE_FORMAT!r})")
        rf = d.get("receptive_field")
        return cls(
            layer=d["layer"], image=d["image"], thumb=int(d["thumb"]), k=int(d["k"]),
            channels=[int(c) for c in d["channels"]], counts=[int(c) for c in d["counts"]],
            image_ids=[[int(v) for v in row] for row in d["image_ids"]],
            receptive_field=None if rf is None else ReceptiveField(
                tuple(int(v) for v in rf["size"]), tuple(float(v) for v in rf["jump"]),
                tuple(float(v) for v in rf["start"])),
        )


def build_sprite(patches: np.ndarray) -> np.ndarray:
    """``(C, k, T, T, 3)`` -> grid ``(C*T, k*T, 3)``: row ``c`` = neuron ``c``, column ``j`` = stimulus."""
    c, k, t, t2, ch = patches.shape
    return np.ascontiguousarray(patches.transpose(0, 2, 1, 3, 4).reshape(c * t, k * t2, ch))


def _png_bytes(arr: np.ndarray, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _file_stem(layer: str) -> str:
    """A file name for a layer name (module names may hold characters a file system dislikes)."""
    stem = _UNSAFE.sub("_", layer).strip("._") or "layer"
    return stem


def write_sprite(
    out_dir: str | Path,
    layer: str,
    patches: np.ndarray,
    counts: np.ndarray,
    image_ids: np.ndarray,
    channels: Sequence[int] | None = None,
    rf: ReceptiveField | None = None,
) -> SpriteIndex:
    """Write ``<out_dir>/<layer>.png`` (grid of ``patches``) and ``<layer>.json`` (index), atomically."""
    out_dir = Path(out_dir)
    c, k, t = patches.shape[:3]
    if channels is None:
        channels = range(c)
    channels = [int(v) for v in channels]
    if len(channels) != c or len(counts) != c or np.shape(image_ids) != (c, k):
        raise DataError(
            f"write_sprite({layer!r}): {c} rows of patches but {len(channels)} channels, "
            f"{len(counts)} counts, image_ids of shape {np.shape(image_ids)}"
        )
    stem = _file_stem(layer)
    index = SpriteIndex(
        layer=layer, image=f"{stem}.png", thumb=int(t), k=int(k), channels=channels,
        counts=[int(v) for v in counts], image_ids=np.asarray(image_ids, np.int64).tolist(),
        receptive_field=rf,
    )
    # PNG first: an index is only ever published next to the picture it describes
    _write_bytes(out_dir / index.image, _png_bytes(build_sprite(patches)))
    _write_bytes(out_dir / f"{stem}.json", json.dumps(index.to_json()).encode())
    return index


def write_sprites(
    out_dir: str | Path,
    images: ImageSource,
    stimuli: Mapping[str, StimuliLike],
    rfs: Mapping[str, ReceptiveField],
    thumb: int = 32,
) -> dict[str, SpriteIndex]:
    """One sprite + index per layer of one checkpoint's ``stimuli`` (layer name -> ``ids/rows/cols``).

    Every image is loaded once for all layers and neurons that chose it.
    """
    missing = [name for name in stimuli if name not in rfs]
    if missing:
        raise LayerError(f"write_sprites: no receptive field given for layer(s) {missing}")
    arrays = {name: _check_stimuli(s, f"layer {name!r}") for name, s in stimuli.items()}
    grids, dests = {}, {}
    for name, (ids, _, _) in arrays.items():
        grids[name] = np.empty((*ids.shape, thumb, thumb, 3), np.uint8)
        grids[name][:] = np.asarray(EMPTY_RGB, np.uint8)
        dests[name] = np.cumsum(ids >= 0, axis=1) - 1
    jobs = [(name, *arr) for name, arr in arrays.items()]
    for image_id, reqs in _requests_by_image(jobs):
        img = _load(images, image_id, "write_sprites")
        for name, c, j, r, q in reqs:
            try:
                grids[name][c, dests[name][c, j]] = thumbnail(padded_crop(img, r, q, rfs[name]), thumb)
            except DataError as exc:
                where = f"layer {name!r} channel {c} stimulus {j} (image {image_id})"
                raise DataError(f"{where}: {exc}") from None
    out = {}
    for name, (ids, _, _) in arrays.items():
        valid = ids >= 0
        # image ids in the same squeezed order as the cells
        order = np.argsort(~valid, axis=1, kind="stable")
        squeezed = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(ids, order, 1), -1)
        out[name] = write_sprite(out_dir, name, grids[name], valid.sum(axis=1), squeezed, rf=rfs[name])
    return out


def read_sprite(index_path: str | Path) -> tuple[np.ndarray, SpriteIndex]:
    """Load a sprite written by :func:`write_sprite`: (grid ``(C*T, k*T, 3)`` uint8, index)."""
    index_path = Path(index_path)
    try:
        index = SpriteIndex.from_json(json.loads(index_path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, DataError) as exc:
        raise DataError(f"cannot read sprite index {index_path}: {exc}") from None
    png = index_path.parent / index.image
    try:
        with Image.open(png) as im:
            grid = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise DataError(f"cannot read sprite image {png}: {exc}") from None
    expect = (len(index.channels) * index.thumb, index.k * index.thumb)
    if grid.shape[:2] != expect:
        raise DataError(f"sprite {png} is {grid.shape[:2]} pixels, its index {index_path} says {expect}")
    return grid, index


def sprite_patches(grid: np.ndarray, index: SpriteIndex, channel: int) -> np.ndarray:
    """The valid thumbnails of ``channel`` from a sprite: ``(counts, T, T, 3)``."""
    i, t = index.row_of(channel), index.thumb
    n = index.counts[i]
    row = grid[i * t:(i + 1) * t, : n * t]
    return np.ascontiguousarray(row.reshape(t, n, t, 3).transpose(1, 0, 2, 3))


# --------------------------------------------------------------------------- base64 for HTML
def encode_png(arr: np.ndarray) -> str:
    """Base64 (no ``data:`` prefix) of ``arr`` (uint8 ``(h, w, 3)``) as PNG."""
    return base64.b64encode(_png_bytes(arr, compress_level=9)).decode("ascii")


def _webp_ok() -> bool:
    from PIL import features

    return bool(features.check("webp"))


def encode_data_uri(arr: np.ndarray, fmt: str = "webp") -> str:
    """``data:`` URI of ``arr`` as lossless WebP (about 2-3x smaller than PNG for patches) or PNG.

    WebP falls back to PNG when this Pillow build has no WebP support.
    """
    if fmt == "webp" and _webp_ok():
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(
            buf, format="WEBP", lossless=True, quality=100, method=4
        )
        return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    if fmt not in ("webp", "png"):
        raise InputError(f"image format must be 'webp' or 'png', got {fmt!r}")
    return "data:image/png;base64," + encode_png(arr)


def _valid_slots(ids, rows, cols) -> list[tuple[int, int, int]]:
    ids, rows, cols = (np.asarray(a).reshape(-1) for a in (ids, rows, cols))
    if not (ids.shape == rows.shape == cols.shape):
        raise DataError(
            f"ids/rows/cols of one neuron must have one length, got {ids.shape}, {rows.shape}, {cols.shape}"
        )
    return [(int(i), int(r), int(c)) for i, r, c in zip(ids, rows, cols) if i >= 0]


def neuron_patches_base64(
    images: ImageSource, ids, rows, cols, rf: ReceptiveField, thumb: int = 32, *, upscale: bool = False
) -> list[str]:
    """One base64 PNG per valid stimulus of one neuron (``ids/rows/cols`` of length ``k``, ``-1`` skipped).

    ``upscale=False`` keeps small receptive fields at their pixel size (the report
    scales them with CSS), which keeps the HTML small.
    """
    return [
        encode_png(thumbnail(padded_crop(_load(images, i, "neuron_patches_base64"), r, c, rf), thumb,
                             upscale=upscale))
        for i, r, c in _valid_slots(ids, rows, cols)
    ]


def neuron_strip_base64(images: ImageSource, ids, rows, cols, rf: ReceptiveField, thumb: int = 32) -> str:
    """One base64 PNG strip ``(thumb, n*thumb)`` of a neuron's valid stimuli, side by side ('' if none)."""
    thumbs = [
        thumbnail(padded_crop(_load(images, i, "neuron_strip_base64"), r, c, rf), thumb)
        for i, r, c in _valid_slots(ids, rows, cols)
    ]
    return encode_png(np.concatenate(thumbs, axis=1)) if thumbs else ""


def report_patches(
    images: ImageSource,
    stimuli: Mapping[tuple[str, int, str], StimuliLike],
    rfs: Mapping[str, ReceptiveField]
    | Mapping[tuple[str, str], ReceptiveField]
    | Callable[[str, str], ReceptiveField],
    *,
    thumb: int = 32,
    max_per_neuron: int | None = 5,
    upscale: bool = False,
    channels: Callable[[str, int, str], Iterable[int]] | None = None,
    fmt: str = "webp",
) -> dict[tuple[str, int, str, int], list[str]]:
    """The ``patches`` mapping of ``ReportData``: ``(model, epoch, layer, channel) -> [data URI, ...]``.

    ``stimuli`` maps ``(model, epoch, layer)`` to that layer's stimuli; ``rfs`` gives the
    receptive field by ``(model, layer)``, by ``layer``, or as a function
    ``rf(model, layer)``. ``channels(model, epoch, layer)`` limits the neurons (default
    all). Each image is loaded once and each distinct (image, window) encoded once;
    equal patches share one string object. ``fmt``: ``"webp"`` (lossless) or ``"png"``
    (see :func:`encode_data_uri`).
    """
    def rf_of(model: str, layer: str) -> ReceptiveField:
        if callable(rfs):
            return rfs(model, layer)
        if (model, layer) in rfs:
            return rfs[(model, layer)]  # type: ignore[index]
        if layer in rfs:
            return rfs[layer]  # type: ignore[index]
        raise LayerError(f"report_patches: no receptive field for model {model!r} layer {layer!r}")

    jobs = []
    for key, stim in stimuli.items():
        model, epoch, layer = key
        ids, rows, cols = _check_stimuli(stim, f"{model} epoch {epoch} layer {layer!r}")
        if max_per_neuron is not None:
            ids, rows, cols = ids[:, :max_per_neuron], rows[:, :max_per_neuron], cols[:, :max_per_neuron]
        if channels is not None:
            keep = np.zeros(len(ids), bool)
            keep[np.asarray(list(channels(model, epoch, layer)), np.int64)] = True
            ids = np.where(keep[:, None], ids, -1)
        jobs.append(((model, epoch, layer, rf_of(model, layer)), ids, rows, cols))
    slots: dict[tuple, list[tuple[int, str]]] = {}
    cache: dict[tuple, str] = {}
    for image_id, reqs in _requests_by_image(jobs):
        img = _load(images, image_id, "report_patches")
        for (model, epoch, layer, rf), c, j, r, q in reqs:
            # the unclipped window fixes both the crop and where the padding goes
            ckey = (image_id, window_bounds(r, q, rf, img.shape[:2])[0])
            if ckey not in cache:
                try:
                    small = thumbnail(padded_crop(img, r, q, rf), thumb, upscale=upscale)
                    cache[ckey] = encode_data_uri(small, fmt)
                except DataError as exc:
                    raise DataError(
                        f"{model} epoch {epoch} layer {layer!r} channel {c} stimulus {j} "
                        f"(image {image_id}): {exc}"
                    ) from None
            slots.setdefault((model, epoch, layer, c), []).append((j, cache[ckey]))
    return {key: [s for _, s in sorted(v)] for key, v in slots.items()}

"""The built-in concept world: procedurally generated images whose concepts are known.

Each image shows one object on a background. Concept families (``ImageSet.tags``):

=========== ===========================================================
shape       circle, square, triangle, cross
colour      red, green, blue, yellow (brightness and per-channel jitter)
texture     solid, h_stripes, v_stripes, checker (object colour on a darker shade)
part        none, marker (a small white knob with a dark rim at the object's upper right)
background  plain, gradient, blotches (all low-saturation greys)
occluded    no, yes (a grey bar across the object; the marker may be hidden)
size        small, medium, large (terciles of the object radius)
class       the true class (the rule below), before any label noise
=========== ===========================================================

Nuisances: position, size, rotation (+-25 degrees, texture rotates with the object),
texture phase, pixel noise.

Classes: a learning curve
-------------------------
32 classes, every (colour, shape) pair twice (:data:`CLASS_RULES`). The two classes of a
pair are a *fine-grained pair*: they differ in one detail only, and which detail depends
on the pair (a checkerboard, so that every colour and every shape has both kinds):

* **texture pairs** (``(colour + shape)`` even): horizontal vs vertical stripes,
  e.g. ``red_circle_hstripe`` / ``red_circle_vstripe``;
* **part pairs** (``(colour + shape)`` odd): the same solid or checkered object without or
  with the small marker, e.g. ``red_square_solid`` / ``red_square_solid_marked``.

So the concepts have graded difficulty, and a network acquires them progressively, as
on ImageNet: coarse **colour** alone separates 4 groups of 8 classes (12.5% accuracy),
**shape** then 16 pairs (50%), the **stripe orientation** (a fine texture) half of the
pairs (75%), and only the **small part** the rest (100%, less what occlusion hides and
label noise). Every class is a conjunction of three families; no family can be ignored.
Every colour and shape value occurs in 8 classes, every texture value in 8, the marker
in 8.

Difficulty also comes from the nuisances, occlusion (which can hide the marker, making a
part pair genuinely ambiguous) and **label noise**: by default 5% of the *training* labels
are replaced by a uniformly drawn other class (``labels`` holds the noisy label,
``tags["class"]`` the true one); test labels are clean. Generation is vectorised NumPy
and seeded: the same ``(split, seed, num_images, image_size, label_noise)`` gives
byte-identical images on any run (about 1 s per 10,000 images at 32x32).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ImageSet
from .errors import DataError

__all__ = [
    "builtin_dataset",
    "render_concept_images",
    "CLASS_RULES",
    "CLASS_NAMES",
    "CONCEPTS",
    "FINE_PAIRS",
    "MARKER_OFFSET",
]

CONCEPTS: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross"],
    "colour": ["red", "green", "blue", "yellow"],
    "texture": ["solid", "h_stripes", "v_stripes", "checker"],
    "part": ["none", "marker"],
    "background": ["plain", "gradient", "blotches"],
    "occluded": ["no", "yes"],
    "size": ["small", "medium", "large"],
}

_TEXTURE_ABBR = {"solid": "solid", "h_stripes": "hstripe", "v_stripes": "vstripe", "checker": "checker"}


def _class_rules() -> dict[str, tuple[str, str, str, str]]:
    """The 32 classes (see the module docstring): every (colour, shape) pair twice."""
    rules: dict[str, tuple[str, str, str, str]] = {}
    for ci, colour in enumerate(CONCEPTS["colour"]):
        for si, shape in enumerate(CONCEPTS["shape"]):
            if (ci + si) % 2 == 0:  # texture pair: stripe orientation
                variants = [("h_stripes", "none"), ("v_stripes", "none")]
            else:  # part pair: the marker on a solid or checkered object
                texture = "solid" if (ci + si) % 4 == 1 else "checker"
                variants = [(texture, "none"), (texture, "marker")]
            for texture, part in variants:
                name = f"{colour}_{shape}_{_TEXTURE_ABBR[texture]}" + ("_marked" if part == "marker" else "")
                rules[name] = (shape, colour, texture, part)
    return rules


#: class name -> (shape, colour, texture, part). See the module docstring.
CLASS_RULES: dict[str, tuple[str, str, str, str]] = _class_rules()
CLASS_NAMES: list[str] = list(CLASS_RULES)
#: The fine-grained pairs as (class id, class id, the family that tells them apart).
FINE_PAIRS: list[tuple[int, int, str]] = [
    (i, i + 1, "texture" if CLASS_RULES[CLASS_NAMES[i]][2] != CLASS_RULES[CLASS_NAMES[i + 1]][2] else "part")
    for i in range(0, len(CLASS_NAMES), 2)
]

_BASE_RGB = np.array([[215, 45, 40], [45, 175, 60], [50, 85, 220], [230, 205, 45]], np.float32)
_RULE_CODES = np.array(
    [[CONCEPTS[f].index(v) for f, v in zip(("shape", "colour", "texture", "part"), rule)]
     for rule in CLASS_RULES.values()],
    dtype=np.int64,
)
_SPLIT_CODES = {"train": 1, "test": 2}
_DEFAULT_SIZES = {"train": 9600, "test": 1600}
_DEFAULT_LABEL_NOISE = {"train": 0.05, "test": 0.0}
_CHUNK = 512  # images rendered per vectorised step; fixed so results never depend on it
_GENERATOR_VERSION = 4  # bump when rendering changes: invalidates .npz caches


@dataclass(frozen=True)
class _Geometry:
    radius: tuple[float, float] = (6.0, 10.5)  # object radius range at 32 px
    rotation: float = math.radians(25.0)
    texture_dark: float = 0.35  # shade of the "off" half of a texture (fraction of the colour)
    texture_period: float = 5.0  # pixels at 32 px
    occlusion_prob: float = 0.25
    noise_std: tuple[float, float] = (3.0, 12.0)


_GEOM = _Geometry()
#: Centre of the marker part in object coordinates (u right, v down), in units of the radius.
MARKER_OFFSET = (0.78, -0.78)


def _sd_shapes(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    """Signed distance (pixels, negative inside) of each shape in object coordinates (u right, v down)."""
    circle = np.sqrt(u * u + v * v) - r
    h = 0.85 * r
    au, av = np.abs(u), np.abs(v)
    square = np.maximum(au, av) - h
    # Equilateral triangle pointing up, circumradius 1.2 r: max over the three edge half-planes.
    rc = 1.2 * r
    s3 = math.sqrt(3.0) / 2.0
    tri = np.maximum(np.maximum(v, s3 * u - 0.5 * v), -s3 * u - 0.5 * v) - 0.5 * rc
    w = 0.36 * r
    cross = np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))
    return [circle, square, tri, cross]


def _textures(u: np.ndarray, v: np.ndarray, phase_u: np.ndarray, phase_v: np.ndarray,
              period: float) -> list[np.ndarray]:
    """Brightness pattern in [0, 1] of each texture (1 = full object colour)."""

    def square_wave(t: np.ndarray) -> np.ndarray:  # soft-edged, so thin stripes alias less
        return np.clip(0.5 + 1.5 * np.cos(2.0 * math.pi * t / period), 0.0, 1.0)

    su = square_wave(u + phase_u)
    sv = square_wave(v + phase_v)
    solid = np.ones_like(u)
    checker = np.clip(0.5 + 1.5 * np.cos(2.0 * math.pi * (u + phase_u) / period)
                      * np.cos(2.0 * math.pi * (v + phase_v) / period) * 2.0, 0.0, 1.0)
    return [solid, sv, su, checker]  # h_stripes vary along v (rows), v_stripes along u


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix that upsamples a coarse grid bilinearly (align corners)."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def render_concept_images(
    num_images: int,
    seed: int = 0,
    split: str = "train",
    image_size: int = 32,
    label_noise: float | None = None,
    return_masks: bool = False,
) -> dict[str, Any]:
    """Generate built-in concept images (see the module docstring) as NumPy arrays.

    Returns ``images`` uint8 ``(N, 3, S, S)``, ``labels`` int64 ``(N,)`` (after label noise),
    ``tags`` (family -> int64 codes), ``meta`` (``cx, cy, radius, angle`` float32 in pixels
    and radians; ``texture_phase_u/v``) and, with ``return_masks``, ``masks`` float32
    ``(N, S, S)``: the object's coverage (1 inside, anti-aliased edge, 0 outside; the marker
    and occluder not included) and ``occluder`` the occluding bar's coverage.
    """
    if split not in _SPLIT_CODES:
        raise DataError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if int(num_images) < 0:
        raise DataError(f"num_images must be >= 0, got {num_images}")
    if int(image_size) < 8:
        raise DataError(f"image_size must be >= 8 pixels, got {image_size}")
    if label_noise is None:
        label_noise = _DEFAULT_LABEL_NOISE[split]
    if not 0.0 <= float(label_noise) < 1.0:
        raise DataError(f"label_noise must be in [0, 1), got {label_noise}")
    n, S = int(num_images), int(image_size)
    scale = S / 32.0
    g = _GEOM
    n_cls = len(CLASS_NAMES)

    # Per-image parameters come from one stream, pixel noise from per-chunk streams, so the
    # result is independent of how the work is chunked.
    root_seq = np.random.SeedSequence([int(seed), _SPLIT_CODES[split], 0xC0DE])
    param_seq, label_seq, *chunk_seqs = root_seq.spawn(2 + max(1, -(-n // _CHUNK)))
    rng = np.random.default_rng(param_seq)

    cls = np.arange(n) % n_cls  # balanced classes, shuffled
    rng.shuffle(cls)
    codes = _RULE_CODES[cls]
    shape, colour, texture, part = codes.T
    radius = rng.uniform(*g.radius, size=n) * scale
    margin = 1.2 * radius + 1.0 * scale  # keeps the marker and the corners in the frame
    room = np.maximum(S - 2 * margin, 0.0)
    cx = rng.uniform(0, 1, n) * room + margin
    cy = rng.uniform(0, 1, n) * room + margin
    angle = rng.uniform(-g.rotation, g.rotation, n)
    period = g.texture_period * scale
    phase_u = rng.uniform(0, period, n)
    phase_v = rng.uniform(0, period, n)
    brightness = rng.uniform(0.75, 1.1, n)
    rgb = np.clip(_BASE_RGB[colour] * brightness[:, None] + rng.normal(0, 14, (n, 3)), 0, 255)
    background = rng.integers(0, 3, n)
    bg_grey = rng.uniform(55, 200, (n, 2))  # two grey levels (gradient uses both)
    bg_tint = rng.normal(0, 8, (n, 3))
    bg_dir = rng.uniform(0, 2 * math.pi, n)
    occluded = rng.random(n) < g.occlusion_prob
    occ_vertical = rng.random(n) < 0.5
    occ_offset = rng.uniform(-0.9, 0.9, n) * radius  # the bar crosses the object
    occ_width = rng.uniform(2.5, 4.5, n) * scale
    occ_grey = rng.uniform(60, 190, n)
    noise_std = rng.uniform(*g.noise_std, n)
    size_code = np.digitize(radius / scale, np.linspace(*g.radius, 4)[1:-1])

    lrng = np.random.default_rng(label_seq)
    flip = lrng.random(n) < float(label_noise)
    other = (cls + lrng.integers(1, n_cls, n)) % n_cls  # uniformly one of the other classes
    labels = np.where(flip, other, cls).astype(np.int64)

    images = np.empty((n, 3, S, S), np.uint8)
    masks = np.empty((n, S, S), np.float32) if return_masks else None
    occl = np.empty((n, S, S), np.float32) if return_masks else None
    coords = (np.arange(S, dtype=np.float32) + 0.5)
    up = _bilinear_matrix(S, 5)
    for c, seq in enumerate(chunk_seqs):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        if lo >= hi:
            break
        sl = slice(lo, hi)
        m = hi - lo
        crng = np.random.default_rng(seq)
        X = coords[None, None, :]
        Y = coords[None, :, None]
        dx = X - cx[sl, None, None].astype(np.float32)
        dy = Y - cy[sl, None, None].astype(np.float32)
        ca = np.cos(angle[sl])[:, None, None].astype(np.float32)
        sa = np.sin(angle[sl])[:, None, None].astype(np.float32)
        u = ca * dx + sa * dy
        v = -sa * dx + ca * dy
        r = radius[sl, None, None].astype(np.float32)

        sd = np.choose(shape[sl, None, None], _sd_shapes(u, v, r))
        alpha = np.clip(0.5 - sd / scale, 0.0, 1.0)  # ~1 px anti-aliased edge
        pattern = np.choose(texture[sl, None, None],
                            _textures(u, v, phase_u[sl, None, None], phase_v[sl, None, None], period))
        shade = g.texture_dark + (1.0 - g.texture_dark) * pattern

        # Background (3, m, S, S) in float.
        gx, gy = np.cos(bg_dir[sl])[:, None, None], np.sin(bg_dir[sl])[:, None, None]
        t = (gx * (X - S / 2) + gy * (Y - S / 2)) / S + 0.5  # position along the gradient direction
        t = np.clip(t, 0, 1)
        grad = bg_grey[sl, 0, None, None] * (1 - t) + bg_grey[sl, 1, None, None] * t
        coarse = crng.uniform(-1, 1, (m, 5, 5)).astype(np.float32)
        blotch = bg_grey[sl, 0, None, None] + 55.0 * np.einsum("ij,mjk,lk->mil", up, coarse, up)
        plain = np.broadcast_to(bg_grey[sl, 0, None, None], (m, S, S))
        bg = np.choose(background[sl, None, None], [plain, grad, blotch])
        bg = bg[None] + bg_tint[sl].T[:, :, None, None]

        obj = rgb[sl].T[:, :, None, None] * shade[None]
        img = bg * (1 - alpha[None]) + obj * alpha[None]

        # Marker: white knob at the object's upper right (rotates with the object).
        mu, mv = MARKER_OFFSET[0] * r, MARKER_OFFSET[1] * r
        has = part[sl, None, None] == 1
        mk = np.sqrt((u - mu) ** 2 + (v - mv) ** 2)
        rim = np.clip(0.5 - (mk - 2.6 * scale) / scale, 0, 1) * has  # dark rim: visible on light grounds
        dot = np.clip(0.5 - (mk - 1.7 * scale) / scale, 0, 1) * has
        img = img * (1 - rim[None]) + 25.0 * rim[None]
        img = img * (1 - dot[None]) + 250.0 * dot[None]

        # Occluder: a grey bar through the object, painted last.
        along = np.where(occ_vertical[sl, None, None], dx, dy) - occ_offset[sl, None, None]
        oc_alpha = np.clip(0.5 * occ_width[sl, None, None] - np.abs(along) + 0.5, 0, 1)
        oc_alpha = oc_alpha * occluded[sl, None, None]
        img = img * (1 - oc_alpha[None]) + occ_grey[sl][None, :, None, None] * oc_alpha[None]

        img = img + crng.normal(0.0, 1.0, img.shape).astype(np.float32) * noise_std[sl][None, :, None, None]
        images[sl] = np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 0, 2, 3)
        if return_masks:
            masks[sl] = alpha
            occl[sl] = oc_alpha

    tags = {
        "shape": shape.astype(np.int64),
        "colour": colour.astype(np.int64),
        "texture": texture.astype(np.int64),
        "part": part.astype(np.int64),
        "background": background.astype(np.int64),
        "occluded": occluded.astype(np.int64),
        "size": size_code.astype(np.int64),
        "class": cls.astype(np.int64),
    }
    meta = {
        "cx": cx.astype(np.float32),
        "cy": cy.astype(np.float32),
        "radius": radius.astype(np.float32),
        "angle": angle.astype(np.float32),
        "texture_phase_u": phase_u.astype(np.float32),
        "texture_phase_v": phase_v.astype(np.float32),
    }
    out: dict[str, Any] = {"images": images, "labels": labels, "tags": tags, "meta": meta}
    if return_masks:
        out["masks"] = masks
        out["occluder"] = occl
    return out


def _tag_names() -> dict[str, list[str]]:
    names = {k: list(v) for k, v in CONCEPTS.items()}
    names["class"] = list(CLASS_NAMES)
    return names


def builtin_dataset(
    split: str = "train",
    seed: int = 0,
    root: str | Path | None = None,
    *,
    num_images: int | None = None,
    image_size: int = 32,
    label_noise: float | None = None,
) -> ImageSet:
    """The built-in concept dataset (see the module docstring).

    ``split`` is ``"train"`` (9,600 images by default, 5% label noise) or ``"test"``
    (1,600 images, clean labels); train and test of one seed are different images.
    With ``root``, the generated arrays are cached there as ``.npz`` and reused.
    """
    if split not in _SPLIT_CODES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    n = _DEFAULT_SIZES[split] if num_images is None else int(num_images)
    noise = _DEFAULT_LABEL_NOISE[split] if label_noise is None else float(label_noise)
    data: dict[str, Any] | None = None
    cache: Path | None = None
    if root is not None:
        key = json.dumps([_GENERATOR_VERSION, split, int(seed), n, int(image_size), round(noise, 8)])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        cache = Path(root) / f"builtin_{split}_s{int(seed)}_n{n}_{int(image_size)}px_{digest}.npz"
        if cache.exists():
            data = _load_cache(cache)
    if data is None:
        data = render_concept_images(n, seed=seed, split=split, image_size=image_size, label_noise=noise)
        if cache is not None:
            _save_cache(cache, data)
    return ImageSet(
        torch.from_numpy(data["images"]),
        torch.from_numpy(data["labels"]),
        CLASS_NAMES,
        data["tags"],
        _tag_names(),
        meta=data["meta"],
        source=f"builtin:{split}:seed={seed}",
    )


def _save_cache(path: Path, data: dict[str, Any]) -> None:
    from .store import atomic_write

    flat = {"images": data["images"], "labels": data["labels"]}
    flat.update({f"tag.{k}": v for k, v in data["tags"].items()})
    flat.update({f"meta.{k}": v for k, v in data["meta"].items()})
    atomic_write(path, lambda tmp: np.savez(tmp, **flat))


def _load_cache(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)  # saved order: families keep the generator's order
            data = {
                "images": z["images"],
                "labels": z["labels"],
                "tags": {k[4:]: z[k] for k in files if k.startswith("tag.")},
                "meta": {k[5:]: z[k] for k in files if k.startswith("meta.")},
            }
    except Exception as exc:  # a damaged cache is regenerated, not fatal
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None
    if set(data["tags"]) != set(CONCEPTS) | {"class"}:
        warnings.warn(f"ignoring dataset cache {path}: unexpected tag families", stacklevel=3)
        return None
    return data



"""Example patches: receptive fields, crops, thumbnails, sprites, base64 for HTML."""
from __future__ import annotations

import base64
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conceptevo.errors import DataError, LayerError
from conceptevo.patches import (
    EMPTY_RGB,
    FALLBACK_FRACTION,
    PAD_RGB,
    ArrayImages,
    ReceptiveField,
    crop,
    encode_png,
    layer_patches,
    neuron_patches_base64,
    neuron_strip_base64,
    padded_crop,
    read_sprite,
    receptive_field,
    receptive_fields,
    report_patches,
    sprite_patches,
    thumbnail,
    window_bounds,
    write_sprites,
)


@dataclass
class Stim:
    ids: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


class CountingImages(ArrayImages):
    """Counts raw() calls: every image must be decoded once per call of the batch functions."""

    def __init__(self, arr):
        super().__init__(arr)
        self.calls: dict[int, int] = {}

    def raw(self, i):
        self.calls[i] = self.calls.get(i, 0) + 1
        return super().raw(i)


def decode(b64: str) -> np.ndarray:
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------ receptive field: hand-computed
def hand_stack() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),               # 0
        nn.ReLU(),                                   # 1
        nn.MaxPool2d(2),                             # 2
        nn.Conv2d(4, 4, 5, stride=2, padding=2),     # 3
        nn.BatchNorm2d(4),                           # 4
        nn.AvgPool2d(3, stride=1),                   # 5
        nn.Conv2d(4, 4, (3, 1), dilation=2),         # 6  (non-square, dilated, no padding)
        nn.Flatten(),                                # 7
        nn.Linear(4 * 2 * 6, 10),                    # 8
    )


def test_receptive_field_hand_computed():
    # size_out = size + (k_eff-1)*jump, start_out = start + ((k_eff-1)/2 - pad)*jump, jump_out = jump*stride
    rfs = receptive_fields(hand_stack(), ["0", "2", "3", "5", "6", "8"], (3, 32, 32), strict=True)
    # conv3 p1: 1+2*1=3, start 0+(1-1)*1=0, jump 1
    assert rfs["0"] == ReceptiveField((3, 3), (1.0, 1.0), (0.0, 0.0))
    # pool2 s2: 3+1*1=4, start 0+0.5*1=0.5, jump 2
    assert rfs["2"] == ReceptiveField((4, 4), (2.0, 2.0), (0.5, 0.5))
    # conv5 s2 p2: 4+4*2=12, start 0.5+(2-2)*2=0.5, jump 4
    assert rfs["3"] == ReceptiveField((12, 12), (4.0, 4.0), (0.5, 0.5))
    # avgpool3 s1: 12+2*4=20, start 0.5+1*4=4.5, jump 4
    assert rfs["5"] == ReceptiveField((20, 20), (4.0, 4.0), (4.5, 4.5))
    # conv (3,1) dilation 2: rows k_eff=5: 20+4*4=36, start 4.5+2*4=12.5; cols k_eff=1: unchanged
    assert rfs["6"] == ReceptiveField((36, 20), (4.0, 4.0), (12.5, 4.5))
    # Linear: every unit sees the whole 32x32 image, centred
    assert rfs["8"] == ReceptiveField((32, 32), (32.0, 32.0), (15.5, 15.5))
    # the single-layer form and the (H, W) / int forms of input_size agree
    assert receptive_field(hand_stack(), "3", 32) == rfs["3"]
    assert receptive_field(hand_stack(), "3", (32, 32)) == rfs["3"]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_receptive_field_same_padding_and_container():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.ReLU()),   # "0": total pad 3, left 1
        nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.GELU()),        # "1"
    )
    rfs = receptive_fields(model, ["0", "0.0", "1"], 17, strict=True)
    # conv4 "same": size 4, start (3/2 - 1)*1 = 0.5
    assert rfs["0.0"] == ReceptiveField((4, 4), (1.0, 1.0), (0.5, 0.5))
    assert rfs["0"] == rfs["0.0"]                     # a container = its last leaf
    # conv3 s2 p0: 4+2=6, start 0.5+1=1.5, jump 2
    assert rfs["1"] == ReceptiveField((6, 6), (2.0, 2.0), (1.5, 1.5))


def _random_stack(rng) -> tuple[nn.Sequential, int]:
    layers, c = [], 2
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.integers(3)
        k = int(rng.integers(1, 5))
        s = int(rng.integers(1, 3))
        p = int(rng.integers(0, k // 2 + 1))
        if kind == 0:
            d = int(rng.integers(1, 3))
            layers.append(nn.Conv2d(c, 2, (k, int(rng.integers(1, 5))), stride=s, padding=p, dilation=d))
            c = 2
        elif kind == 1:
            layers.append(nn.MaxPool2d(max(k, 1), stride=s, padding=min(p, max(k, 1) // 2),
                                       ceil_mode=bool(rng.integers(2))))
        else:
            layers.append(nn.AvgPool2d(max(k, 1), stride=s, padding=min(p, max(k, 1) // 2)))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers), int(rng.integers(24, 48))


def _support_bbox(model: nn.Sequential, size: int, r: int, c: int) -> tuple[int, int, int, int] | None:
    """Empirical receptive field: bounding box of the input gradient of output cell (r, c).

    Weights are made positive and max pools become average pools (same geometry),
    so every tap of every kernel passes gradient; the outermost taps are always
    taps, so the box is the window's envelope even with strides or dilations that
    leave holes inside it.
    """
    layers = []
    for m in model:
        if isinstance(m, nn.MaxPool2d):
            m = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        layers.append(m)
    probe = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(1.0)
    x = torch.ones(1, 2, size, size, dtype=torch.float64, requires_grad=True)
    out = probe(x)
    out[0, 0, r, c].backward()
    nz = np.argwhere(x.grad[0].abs().sum(0).numpy() > 0)
    if len(nz) == 0:
        return None
    return int(nz[:, 0].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].min()), int(nz[:, 1].max()) + 1


def test_receptive_field_matches_gradient_support(rng):
    """Fresh random conv/pool stacks: each cell's window equals the input-gradient envelope of that cell.

    The image is embedded in a margin of M pixels (a multiple of the total stride,
    wider than any window) so no window is clipped: cell r of the plain input is
    cell r + M/jump of the wide one, and its gradient box minus M must be exactly
    [r*jump + start - (size-1)/2, ... + size).
    """
    checked = 0
    while checked < 10:
        model, size = _random_stack(rng)
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, 2, size, size))
        except RuntimeError:  # the random stack shrank the map to nothing
            continue
        h, w = out.shape[2:]
        if h < 1 or w < 1:
            continue
        rf = receptive_field(model, str(len(model) - 1), (2, size, size), strict=True)
        jump = int(rf.jump[0])
        assert rf.jump == (float(jump), float(jump))                    # strides are square here
        margin = jump * (max(rf.size) // jump + 1)
        if size + 2 * margin > 112:  # keep the gradient probe small
            continue
        for r, c in {(0, 0), (h - 1, w - 1), (int(rng.integers(h)), int(rng.integers(w)))}:
            full, _ = window_bounds(r, c, rf, (size, size))
            shift = margin // jump
            box = _support_bbox(model, size + 2 * margin, r + shift, c + shift)
            assert box is not None
            assert tuple(v - margin for v in box) == full, (model, size, r, c, rf)
        checked += 1


def test_receptive_field_fallback_residual_and_unknown_modules():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.down = nn.Conv2d(3, 4, 1, stride=2)   # registered after the main path: walk double-counts

        def forward(self, x):
            return self.b(self.a(x)) + self.down(x)

    with pytest.warns(UserWarning, match="'down'.*fallback"):
        rf = receptive_field(Residual(), "down", (3, 40, 24))
    # output 20x12 -> jump = 40/20, 24/12; window = FALLBACK_FRACTION of the side; cell centres
    assert rf == ReceptiveField((round(FALLBACK_FRACTION * 40), round(FALLBACK_FRACTION * 24)),
                                (2.0, 2.0), (0.5, 0.5))
    with pytest.raises(LayerError, match="'down'"):
        receptive_field(Residual(), "down", (3, 40, 24), strict=True)

    up = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Upsample(scale_factor=2),
                       nn.Conv2d(3, 3, 3, padding=1))
    with pytest.raises(LayerError, match="Upsample"):
        receptive_field(up, "2", 16, strict=True)
    with pytest.warns(UserWarning, match="Upsample"):
        rf = receptive_field(up, "2", 16)
    assert rf == ReceptiveField((8, 8), (0.5, 0.5), (-0.25, -0.25))   # 32x32 map on a 16x16 image

    # the walk itself stays exact up to the unknown module
    assert receptive_field(up, "0", 16, strict=True) == ReceptiveField((3, 3), (1.0, 1.0), (0.0, 0.0))


def test_receptive_field_unknown_layer_and_adaptive_identity():
    with pytest.raises(LayerError, match="'nope'.*has"):
        receptive_field(hand_stack(), "nope", 32)
    # adaptive pooling to the size the map already has is an identity (torchvision VGG on 224 px)
    m = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(6), nn.Conv2d(3, 3, 3))
    assert receptive_field(m, "2", 8, strict=True) == ReceptiveField((5, 5), (1.0, 1.0), (2.0, 2.0))
    g = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 3, 1))
    assert receptive_field(g, "2", 8, strict=True) == ReceptiveField((8, 8), (8.0, 8.0), (3.5, 3.5))


# ------------------------------------------------------------------ crops
def test_crops_equal_hand_computed_slices(rng):
    # conv3 p1 + pool2: output cell r covers input rows [2r-1, 2r+3) (union of the two conv windows)
    rf = receptive_field(nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.MaxPool2d(2)), "1", 19, strict=True)
    h, w = 19, 23
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cells = [(0, 0), (9, 10), (4, 0), (0, 11), (9, 11)] + [(int(rng.integers(10)), int(rng.integers(12)))
                                                           for _ in range(5)]
    for r, c in cells:
        expect = img[max(2 * r - 1, 0):min(2 * r + 3, h), max(2 * c - 1, 0):min(2 * c + 3, w)]
        got = crop(img, r, c, rf)
        assert got.shape == expect.shape and np.array_equal(got, expect), (r, c)


def test_padded_crop_against_padded_image(rng):
    """Windows no larger than the image: the canvas equals a slice of the image padded with PAD_RGB."""
    h, w = int(rng.integers(9, 20)), int(rng.integers(9, 20))
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    m = 20
    big = np.empty((h + 2 * m, w + 2 * m, 3), np.uint8)
    big[:] = PAD_RGB
    big[m:m + h, m:m + w] = img
    for _ in range(30):
        size = (int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1)))
        rf = ReceptiveField(size, (float(rng.integers(1, 4)),) * 2, (float(rng.integers(-2, 3)) / 2,) * 2)
        r, c = int(rng.integers(0, h // int(rf.jump[0]))), int(rng.integers(0, w // int(rf.jump[1])))
        (r0, r1, c0, c1), clipped = window_bounds(r, c, rf, (h, w))
        if clipped[1] <= clipped[0] or clipped[3] <= clipped[2]:
            continue
        assert np.array_equal(padded_crop(img, r, c, rf), big[r0 + m:r1 + m, c0 + m:c1 + m])


def test_padded_crop_window_larger_than_image():
    img = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    rf = ReceptiveField((40, 40), (8.0, 8.0), (-0.5, -0.5))
    # cell 0: centre -0.5, window [-20, 20) -> image rows 0..20 at canvas rows 12..32 (canvas capped at 32)
    out = padded_crop(img, 0, 0, rf)
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out[12:, 12:], img[:20, :20])
    assert (out[:12] == PAD_RGB).all() and (out[:, :12] == PAD_RGB).all()
    # cell 2: window [-4, 36) covers the whole image on both sides: the canvas is the image
    assert np.array_equal(padded_crop(img, 2, 2, rf), img)
    with pytest.raises(DataError, match="outside"):
        padded_crop(img, 10, 0, rf)


def test_thumbnail_nearest_box_and_letterbox(rng):
    p = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    assert np.array_equal(thumbnail(p, 32), p.repeat(4, 0).repeat(4, 1))       # nearest upscaling
    assert np.array_equal(thumbnail(p, 32, upscale=False), p)                   # HTML: kept at pixel size
    big = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    box = big.reshape(16, 4, 16, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(thumbnail(big, 16).astype(float) - box).max() <= 1            # box filter = block mean
    tall = rng.integers(0, 256, size=(8, 4, 3), dtype=np.uint8)
    t = thumbnail(tall, 16)
    assert np.array_equal(t[:, 4:12], tall.repeat(2, 0).repeat(2, 1))
    assert (t[:, :4] == PAD_RGB).all() and (t[:, 12:] == PAD_RGB).all()


# ------------------------------------------------------------------ layer patches and sprites
def _random_layer(rng, n_images, channels, k, grid):
    ids = np.stack([rng.choice(n_images, k, replace=False) for _ in range(channels)]).astype(np.int64)
    ids[rng.random((channels, k)) < 0.3] = -1
    if channels > 1:
        ids[-1] = -1                                   # a neuron with no stimuli at all
    rows = np.where(ids >= 0, rng.integers(0, grid, (channels, k)), -1)
    cols = np.where(ids >= 0, rng.integers(0, grid, (channels, k)), -1)
    return Stim(ids, rows.astype(np.int32), cols.astype(np.int32))


def _reference_cells(images, stim, rf, thumb):
    out = {}
    for c in range(stim.ids.shape[0]):
        cells = [thumbnail(padded_crop(images.raw(int(i)), int(r), int(q), rf), thumb)
                 for i, r, q in zip(stim.ids[c], stim.rows[c], stim.cols[c]) if i >= 0]
        out[c] = cells
    return out


def test_layer_patches_empty_slots_and_single_load(rng):
    imgs = rng.integers(0, 256, size=(7, 21, 17, 3), dtype=np.uint8)
    images = CountingImages(imgs)
    rf = ReceptiveField((5, 5), (2.0, 2.0), (1.0, 1.0))
    stim = _random_layer(rng, 7, channels=5, k=4, grid=8)
    patches, counts = layer_patches(images, stim, rf, thumb=10, layer="conv")
    assert patches.shape == (5, 4, 10, 10, 3)
    ref = _reference_cells(ArrayImages(imgs), stim, rf, 10)
    for c in range(5):
        assert counts[c] == len(ref[c]) == (stim.ids[c] >= 0).sum()
        for j, cell in enumerate(ref[c]):
            assert np.array_equal(patches[c, j], cell)
        assert (patches[c, counts[c]:] == EMPTY_RGB).all()
    assert set(images.calls) == set(stim.ids[stim.ids >= 0].tolist())
    assert all(n == 1 for n in images.calls.values())


def test_layer_patches_bad_inputs(rng):
    imgs = ArrayImages(rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8))
    rf = ReceptiveField((3, 3), (1.0, 1.0), (0.0, 0.0))
    with pytest.raises(DataError, match="'l1'.*shape"):
        ragged = Stim(np.zeros((2, 3), np.int64), np.zeros((2, 2)), np.zeros((2, 3)))
        layer_patches(imgs, ragged, rf, layer="l1")
    with pytest.raises(DataError, match="channel 1 slot 0"):
        layer_patches(imgs, Stim(np.array([[0], [1]]), np.array([[0], [-1]]), np.array([[0], [0]])), rf)
    with pytest.raises(DataError, match="image id 9"):
        layer_patches(imgs, Stim(np.array([[9]]), np.array([[0]]), np.array([[0]])), rf)
    with pytest.raises(DataError, match="'l2' channel 0 stimulus 0"):
        layer_patches(imgs, Stim(np.array([[1]]), np.array([[50]]), np.array([[0]])), rf, layer="l2")

    class Floaty:
        def raw(self, i):
            return np.zeros((8, 8, 3), np.float32)

    with pytest.raises(DataError, match="image 0.*uint8"):
        layer_patches(Floaty(), Stim(np.array([[0]]), np.array([[0]]), np.array([[0]])), rf)


def test_sprite_round_trip(rng, tmp_path):
    imgs = rng.integers(0, 256, size=(9, 16, 16, 3), dtype=np.uint8)
    images = CountingImages(imgs)
    rfs = {"features/0:conv": ReceptiveField((3, 3), (1.0, 1.0), (0.0, 0.0)),
           "features.4": ReceptiveField((8, 8), (2.0, 2.0), (0.5, 0.5))}
    stim = {"features/0:conv": _random_layer(rng, 9, 6, 5, 16), "features.4": _random_layer(rng, 9, 1, 3, 8)}
    index = write_sprites(tmp_path, images, stim, rfs, thumb=12)
    used = set(np.concatenate([s.ids[s.ids >= 0] for s in stim.values()]).tolist())
    assert set(images.calls) == used and all(n == 1 for n in images.calls.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["features_0_conv.png", "features_0_conv.json", "features.4.png", "features.4.json"])  # no temp files
    for layer, s in stim.items():
        grid, idx = read_sprite(tmp_path / index[layer].image.replace(".png", ".json"))
        assert idx == index[layer] and idx.layer == layer and idx.receptive_field == rfs[layer]
        assert grid.shape == (s.ids.shape[0] * 12, s.ids.shape[1] * 12, 3)
        ref = _reference_cells(ArrayImages(imgs), s, rfs[layer], 12)
        for c in rng.permutation(s.ids.shape[0]):
            got = sprite_patches(grid, idx, int(c))
            assert idx.row_of(int(c)) == c
            assert len(got) == idx.counts[c] == len(ref[c])
            for a, b in zip(got, ref[c]):
                assert np.array_equal(a, b)
            assert idx.image_ids[c][:idx.counts[c]] == [int(i) for i in s.ids[c] if i >= 0]
            assert all(v == -1 for v in idx.image_ids[c][idx.counts[c]:])
        with pytest.raises(KeyError, match=repr(layer)):
            idx.row_of(999)
    bad = json.loads((tmp_path / "features.4.json").read_text())
    bad["format"] = "other"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="bad.json"):
        read_sprite(tmp_path / "bad.json")
    with pytest.raises(LayerError, match="features.9"):
        write_sprites(tmp_path, images, {"features.9": stim["features.4"]}, rfs)


# ------------------------------------------------------------------ base64 for HTML
def test_base64_patches_and_strip(rng):
    imgs = ArrayImages(rng.integers(0, 256, size=(5, 3, 20, 20), dtype=np.uint8))   # channels-first input
    assert imgs.raw(0).shape == (20, 20, 3)
    rf = ReceptiveField((6, 6), (2.0, 2.0), (0.5, 0.5))
    ids, rows, cols = np.array([3, -1, 0, 4]), np.array([0, -1, 9, 5]), np.array([9, -1, 0, 5])
    ref = [padded_crop(imgs.raw(i), r, c, rf) for i, r, c in zip(ids, rows, cols) if i >= 0]
    got = neuron_patches_base64(imgs, ids, rows, cols, rf, thumb=32)            # no upscaling: pixel size
    assert [g.shape for g in map(decode, got)] == [p.shape for p in ref]
    assert all(np.array_equal(decode(g), p) for g, p in zip(got, ref))
    strip = decode(neuron_strip_base64(imgs, ids, rows, cols, rf, thumb=12))
    assert np.array_equal(strip, np.concatenate([thumbnail(p, 12) for p in ref], axis=1))
    assert neuron_strip_base64(imgs, [-1], [-1], [-1], rf) == ""
    assert np.array_equal(decode(encode_png(ref[0])), ref[0])


@pytest.mark.parametrize("fmt", ["webp", "png"])
def test_report_patches_dedupe_and_lossless(rng, fmt):
    imgs = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    images = CountingImages(imgs)
    rfs = {"a": ReceptiveField((5, 5), (2.0, 2.0), (1.0, 1.0))}
    s0 = _random_layer(rng, 6, 4, 5, 8)
    s1 = Stim(s0.ids.copy(), s0.rows.copy(), s0.cols.copy())      # epoch 1 = epoch 0: every patch shared
    got = report_patches(images, {("m", 0, "a"): s0, ("m", 1, "a"): s1}, rfs, thumb=8, max_per_neuron=3,
                         fmt=fmt, channels=lambda m, e, layer: range(3))
    assert all(n == 1 for n in images.calls.values())
    for (model, epoch, layer, c), uris in got.items():
        assert c < 3 and uris[0].startswith(f"data:image/{fmt};base64,")
        ref = [thumbnail(padded_crop(imgs[i], r, q, rfs["a"]), 8, upscale=False)
               for i, r, q in zip(s0.ids[c, :3], s0.rows[c, :3], s0.cols[c, :3]) if i >= 0]
        assert [decode(u).tolist() for u in uris] == [p.tolist() for p in ref]        # lossless
        twin = got[(model, 1 - epoch, layer, c)]
        assert all(a is b for a, b in zip(uris, twin))                                  # encoded once
    expect = {("m", e, "a", c) for e in (0, 1) for c in range(3) if (s0.ids[c, :3] >= 0).any()}
    assert set(got) == expect
    with pytest.raises(LayerError, match="'zz'"):
        report_patches(images, {("m", 0, "zz"): s0}, rfs)


def test_exact_walks_do_not_warn():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        receptive_fields(hand_stack(), ["0", "3"], 32)
    assert rec == []                                  # exact walks never warn

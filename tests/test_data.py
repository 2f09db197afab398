"""conceptevo.data: built-in concept images, image folders, tensor/Dataset wrappers, loaders."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conceptevo.data import (
    CLASS_NAMES,
    CLASS_RULES,
    CONCEPTS,
    MARKER_OFFSET,
    ImageSet,
    as_image_set,
    builtin_dataset,
    image_folder,
    indexed_loader,
    render_concept_images,
    tensor_dataset,
)
from conceptevo.errors import DataError

FAMILIES = ("shape", "colour", "texture", "part")


def _reference_normalize(u8: np.ndarray) -> np.ndarray:
    return ((u8.astype(np.float64) / 255.0 - 0.5) / 0.25).astype(np.float32)


# ------------------------------------------------------------------ built-in: determinism
def test_same_seed_same_bytes_different_seed_differs():
    a = render_concept_images(70, seed=5, split="train")
    b = render_concept_images(70, seed=5, split="train")
    assert a["images"].tobytes() == b["images"].tobytes()
    assert np.array_equal(a["labels"], b["labels"])
    for fam in a["tags"]:
        assert np.array_equal(a["tags"][fam], b["tags"][fam])
    c = render_concept_images(70, seed=6, split="train")
    assert a["images"].tobytes() != c["images"].tobytes()
    # train and test of one seed are different images
    t = render_concept_images(70, seed=5, split="test")
    assert a["images"].tobytes() != t["images"].tobytes()


def test_builtin_dataset_shapes_sizes_and_cache(tmp_path):
    ds = builtin_dataset("test", seed=1, num_images=64)
    assert isinstance(ds, ImageSet) and len(ds) == 64
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (64, 3, 32, 32)
    assert ds.class_names == CLASS_NAMES and ds.num_classes == len(CLASS_RULES) >= 10
    assert set(ds.tags) == set(CONCEPTS) | {"class"}
    for fam, codes in ds.tags.items():
        assert codes.shape == (64,) and codes.min() >= 0 and codes.max() < len(ds.tag_names[fam])
    # balanced classes: every class appears 64 / 32 = 2 times
    assert np.bincount(ds.tags["class"], minlength=len(CLASS_NAMES)).tolist() == [2] * len(CLASS_NAMES)

    cached = builtin_dataset("test", seed=1, num_images=64, root=tmp_path)
    files = list(tmp_path.glob("builtin_test_*.npz"))
    assert len(files) == 1
    again = builtin_dataset("test", seed=1, num_images=64, root=tmp_path)  # from the cache
    assert torch.equal(cached.images, ds.images) and torch.equal(again.images, ds.images)
    assert torch.equal(again.labels, ds.labels)
    for fam in ds.tags:
        assert np.array_equal(again.tags[fam], ds.tags[fam])
    # a damaged cache is regenerated with a warning, not fatal
    files[0].write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="cache"):
        fixed = builtin_dataset("test", seed=1, num_images=64, root=tmp_path)
    assert torch.equal(fixed.images, ds.images)
    # other image size
    big = builtin_dataset("train", seed=1, num_images=12, image_size=48)
    assert tuple(big.images.shape) == (12, 3, 48, 48)


def test_builtin_bad_arguments():
    with pytest.raises(DataError, match="split"):
        builtin_dataset("valid")
    with pytest.raises(DataError, match="label_noise"):
        render_concept_images(10, label_noise=1.5)
    with pytest.raises(DataError, match="image_size"):
        render_concept_images(10, image_size=4)
    empty = render_concept_images(0)
    assert empty["images"].shape == (0, 3, 32, 32)


# ------------------------------------------------------------------ built-in: tag correctness
def test_class_rule_and_label_noise():
    d = render_concept_images(1200, seed=11, split="train")  # default: 5% label noise
    tags = d["tags"]
    rules = np.array([[CONCEPTS[f].index(v) for f, v in zip(FAMILIES, CLASS_RULES[c])] for c in CLASS_NAMES])
    for j, fam in enumerate(FAMILIES):
        assert np.array_equal(tags[fam], rules[tags["class"], j]), fam
    flipped = d["labels"] != tags["class"]
    assert 0.025 < flipped.mean() < 0.08  # 60 expected of 1200
    test = render_concept_images(300, seed=11, split="test")
    assert np.array_equal(test["labels"], test["tags"]["class"])  # clean test labels
    clean = render_concept_images(300, seed=11, split="train", label_noise=0.0)
    assert np.array_equal(clean["labels"], clean["tags"]["class"])


def test_no_single_concept_identifies_a_class_and_no_family_is_redundant():
    rules = list(CLASS_RULES.values())
    for j in range(4):
        values = [r[j] for r in rules]
        for v in set(values):
            assert values.count(v) >= 2, (FAMILIES[j], v)
        # dropping family j makes at least two classes collide: the family is needed
        rest = [tuple(x for i, x in enumerate(r) if i != j) for r in rules]
        assert len(set(rest)) < len(rest), FAMILIES[j]
    assert len(set(rules)) == len(rules)


def test_graded_difficulty_and_fine_grained_pairs():
    """Colour alone groups the classes by 8, colour + shape by 2 (the fine-grained pairs), and
    the two classes of a pair differ in exactly one family: the stripe orientation or the part."""
    from conceptevo.data import FINE_PAIRS

    rules = [CLASS_RULES[c] for c in CLASS_NAMES]
    assert len(rules) == 32 == len(set(rules))
    by_colour = {}
    by_colour_shape = {}
    for i, (shape, colour, _t, _p) in enumerate(rules):
        by_colour.setdefault(colour, []).append(i)
        by_colour_shape.setdefault((colour, shape), []).append(i)
    assert sorted(map(len, by_colour.values())) == [8] * 4
    assert sorted(map(len, by_colour_shape.values())) == [2] * 16
    assert sorted(tuple(v) for v in by_colour_shape.values()) == sorted((a, b) for a, b, _ in FINE_PAIRS)
    kinds = {"texture": 0, "part": 0}
    for a, b, fam in FINE_PAIRS:
        diff = [FAMILIES[j] for j in range(4) if rules[a][j] != rules[b][j]]
        assert diff == [fam], (CLASS_NAMES[a], CLASS_NAMES[b])
        if fam == "texture":
            assert {rules[a][2], rules[b][2]} == {"h_stripes", "v_stripes"}
        kinds[fam] += 1
    assert kinds == {"texture": 8, "part": 8}
    # every colour, shape and texture value in 8 classes, the marker in 8
    for j, fam in enumerate(FAMILIES):
        counts = np.bincount([CONCEPTS[fam].index(r[j]) for r in rules])
        assert counts.tolist() == ([8] * len(CONCEPTS[fam]) if fam != "part" else [24, 8])


def _masks(n: int, seed: int):
    return render_concept_images(n, seed=seed, split="test", return_masks=True)


def test_object_colour_matches_colour_tag():
    d = _masks(240, seed=3)
    img = d["images"].astype(np.float64)
    base = np.array([[215, 45, 40], [45, 175, 60], [50, 85, 220], [230, 205, 45]], float)
    base_chroma = base / base.sum(1, keepdims=True)
    hits = 0
    for i in range(len(img)):
        inside = (d["masks"][i] > 0.999) & (d["occluder"][i] < 1e-3)
        assert inside.sum() >= 20
        mean = img[i][:, inside].mean(axis=1)
        chroma = mean / mean.sum()
        hits += int(np.argmin(((base_chroma - chroma) ** 2).sum(1)) == d["tags"]["colour"][i])
    assert hits == len(img)


def test_circle_geometry_from_meta():
    # Independent re-render of the circle mask from the per-image centre and radius.
    d = _masks(240, seed=4)
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    circles = np.where(d["tags"]["shape"] == CONCEPTS["shape"].index("circle"))[0]
    assert len(circles) > 30
    for i in circles:
        dist = np.hypot(xx - d["meta"]["cx"][i], yy - d["meta"]["cy"][i])
        r = d["meta"]["radius"][i]
        assert np.all(d["masks"][i][dist < r - 0.75] == 1.0)
        assert np.all(d["masks"][i][dist > r + 0.75] == 0.0)


def test_texture_tag_matches_stripe_direction():
    d = _masks(360, seed=5)
    grey = d["images"].astype(np.float64).mean(axis=1)  # (N, H, W)
    inner = d["masks"] > 0.999
    correct = total = 0
    for i in range(len(grey)):
        m = inner[i] & (d["occluder"][i] < 1e-3)
        vert = m[1:, :] & m[:-1, :]  # vertically adjacent pairs inside the object
        horiz = m[:, 1:] & m[:, :-1]
        if vert.sum() < 30 or horiz.sum() < 30:
            continue
        dv = np.abs(np.diff(grey[i], axis=0))[vert].mean()  # changes down the rows
        dh = np.abs(np.diff(grey[i], axis=1))[horiz].mean()
        texture = CONCEPTS["texture"][d["tags"]["texture"][i]]
        if texture == "solid":
            ok = max(dv, dh) < 18
        elif texture == "h_stripes":
            ok = dv > 1.5 * dh
        elif texture == "v_stripes":
            ok = dh > 1.5 * dv
        else:  # checker: changes both ways
            ok = min(dv, dh) > 15
        correct += int(ok)
        total += 1
    assert total > 200
    assert correct / total > 0.95, (correct, total)


def test_marker_part_is_drawn_where_documented():
    d = _masks(360, seed=6)
    img = d["images"].astype(int)
    m = d["meta"]
    seen = 0
    for i in np.where((d["tags"]["part"] == 1) & (d["tags"]["occluded"] == 0))[0]:
        a, r = m["angle"][i], m["radius"][i]
        u, v = MARKER_OFFSET[0] * r, MARKER_OFFSET[1] * r
        x = m["cx"][i] + math.cos(a) * u - math.sin(a) * v  # object -> image coordinates
        y = m["cy"][i] + math.sin(a) * u + math.cos(a) * v
        px = img[i][:, int(y), int(x)]
        assert px.min() > 195, (i, px)  # a white knob...
        window = img[i][:, max(0, int(y) - 3):int(y) + 4, max(0, int(x) - 3):int(x) + 4]
        assert window.mean(0).min() < 90  # ...with a dark rim
        seen += 1
    assert seen > 20
    # unmarked objects have no such white knob at that spot
    white = 0
    for i in np.where(d["tags"]["part"] == 0)[0]:
        a, r = m["angle"][i], m["radius"][i]
        u, v = MARKER_OFFSET[0] * r, MARKER_OFFSET[1] * r
        x = m["cx"][i] + math.cos(a) * u - math.sin(a) * v
        y = m["cy"][i] + math.sin(a) * u + math.cos(a) * v
        white += int(img[i][:, int(y), int(x)].min() > 235)
    assert white < 0.05 * (d["tags"]["part"] == 0).sum()


def test_occluded_tag_matches_occluder():
    d = _masks(200, seed=7)
    occ = d["tags"]["occluded"] == 1
    assert 0.1 < occ.mean() < 0.4
    overlap = (d["occluder"] * d["masks"]).reshape(len(occ), -1).sum(1)
    assert np.all(overlap[occ] > 2.0)  # the bar crosses the object
    assert np.all(d["occluder"][~occ] == 0.0)


def test_imageset_item_raw_and_batch_match_reference():
    ds = builtin_dataset("test", seed=2, num_images=24)
    for i in (0, 7, 23):
        x, y = ds[i]
        u8 = ds.images[i].numpy()
        assert x.dtype == torch.float32 and y == int(ds.labels[i])
        np.testing.assert_allclose(x.numpy(), _reference_normalize(u8), rtol=0, atol=1e-6)
        assert np.array_equal(ds.raw(i), u8.transpose(1, 2, 0)) and ds.raw(i).dtype == np.uint8
    xb, yb = ds.batch([3, 1, 3])
    assert torch.equal(xb[0], ds[3][0]) and torch.equal(xb[1], ds[1][0]) and yb.tolist() == [
        int(ds.labels[3]), int(ds.labels[1]), int(ds.labels[3])]
    with pytest.raises(IndexError):
        ds[24]
    with pytest.raises(IndexError):
        ds.raw(-1)


def test_subset_keeps_parent_ids_and_tags():
    ds = builtin_dataset("test", seed=2, num_images=30)
    sub = ds.subset([29, 4, 4, 0])
    assert len(sub) == 4 and sub.meta["parent_id"].tolist() == [29, 4, 4, 0]
    assert torch.equal(sub.images[0], ds.images[29])
    assert sub.tags["shape"].tolist() == ds.tags["shape"][[29, 4, 4, 0]].tolist()
    assert sub.subset([1]).meta["parent_id"].tolist() == [4]  # parents of parents
    with pytest.raises(DataError):
        ds.subset([30])


# ------------------------------------------------------------------------- image folders
def _save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path, format=fmt)


def _solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "dog" / "b.png", _solid(40, 20, (10, 200, 30)))
    _save(root / "dog" / "a.png", _solid(16, 16, (200, 10, 30)))
    _save(root / "cat" / "sub" / "z.jpg", _solid(32, 32, (120, 120, 120)), fmt="JPEG")
    _save(root / "cat" / "c.bmp", _solid(8, 9, (0, 0, 255)))
    (root / "cat" / "notes.txt").write_text("not an image")  # other endings are ignored
    (root / "cat" / ".hidden.png").write_bytes(b"junk")  # hidden files are ignored
    return root


def test_image_folder_ids_labels_and_pixels(folder):
    ds = image_folder(folder, size=32)
    assert ds.class_names == ["cat", "dog"]
    rel = [p.relative_to(folder).as_posix() for p in ds.paths]
    assert rel == ["cat/c.bmp", "cat/sub/z.jpg", "dog/a.png", "dog/b.png"]  # sorted (class, path)
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images is None and not ds.in_memory
    want = [(0, 0, 255), (120, 120, 120), (200, 10, 30), (10, 200, 30)]
    for i, rgb in enumerate(want):
        raw = ds.raw(i)
        assert raw.shape == (32, 32, 3) and raw.dtype == np.uint8
        assert np.abs(raw.astype(int) - np.array(rgb)).max() <= 3  # JPEG may shift a little
        x, y = ds[i]
        np.testing.assert_allclose(x.numpy(), _reference_normalize(raw.transpose(2, 0, 1)), atol=1e-6)
        assert y == ds.labels[i]
    mem = ds.to_memory()
    assert mem.in_memory and torch.equal(mem.images[2], torch.from_numpy(ds.raw(2)).permute(2, 0, 1))


def test_image_folder_resize_crop_and_stretch(tmp_path):
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:64] = (0, 255, 0)
    wide[:, 64:] = (0, 0, 255)
    _save(tmp_path / "c" / "wide.png", wide)
    cropped = image_folder(tmp_path, size=16).raw(0)
    assert cropped.shape == (16, 16, 3)
    assert np.all(cropped[:, 2:-2] == (0, 255, 0))  # centre crop keeps the middle third only
    stretched = image_folder(tmp_path, size=(8, 24), crop=False).raw(0)
    assert stretched.shape == (8, 24, 3)
    assert np.all(stretched[:, 1] == (255, 0, 0)) and np.all(stretched[:, 12] == (0, 255, 0))
    assert np.all(stretched[:, 22] == (0, 0, 255))


def test_image_folder_reports_corrupt_and_unreadable_by_path(folder):
    corrupt = folder / "dog" / "corrupt.png"
    corrupt.write_bytes(os.urandom(300))
    gone = folder / "cat" / "gone.png"
    os.symlink(folder / "nowhere.png", gone)  # unreadable: a broken link
    dir_img = folder / "dog" / "dir.jpg"
    dir_img.mkdir()  # unreadable: a directory with an image ending
    with pytest.raises(DataError) as info:
        image_folder(folder)
    msg = str(info.value)
    for p in (corrupt, gone, dir_img):
        assert str(p) in msg
    assert sorted(map(str, info.value.paths)) == sorted(map(str, (corrupt, gone, dir_img)))
    assert "skip_bad" in msg

    with pytest.warns(UserWarning) as rec:
        ds = image_folder(folder, skip_bad=True)
    text = " ".join(str(w.message) for w in rec)
    assert str(corrupt) in text and str(gone) in text and str(dir_img) in text
    rel = [p.relative_to(folder).as_posix() for p in ds.paths]
    assert rel == ["cat/c.bmp", "cat/sub/z.jpg", "dog/a.png", "dog/b.png"]  # ids: sorted remaining files


def test_image_folder_truncated_file_found_by_decode_check_or_on_access(tmp_path):
    _save(tmp_path / "a" / "ok.png", _solid(16, 16, (1, 2, 3)))
    full = tmp_path / "a" / "trunc.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    _save(full, noise, fmt="JPEG")
    data_bytes = full.read_bytes()
    full.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(DataError, match="trunc.jpg"):
        image_folder(tmp_path, check="decode")
    # with the cheap check it may pass the scan, but decoding it names the file
    try:
        lazy = image_folder(tmp_path, check="verify")
    except DataError as exc:
        assert "trunc.jpg" in str(exc)
    else:
        idx = [p.name for p in lazy.paths].index("trunc.jpg")
        with pytest.raises(DataError, match="trunc.jpg"):
            lazy[idx]


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        image_folder(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        image_folder(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        image_folder(empty)
    only_bad = tmp_path / "bad"
    (only_bad / "c").mkdir(parents=True)
    (only_bad / "c" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="every image file is unreadable"), pytest.warns(UserWarning):
        image_folder(only_bad, skip_bad=True)


# ---------------------------------------------------------------- tensors and Datasets
def test_tensor_dataset_layouts_and_reference(rng):
    n, h, w = 7, 5, 6
    u8 = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    labels = rng.integers(0, 4, n)
    a = tensor_dataset(torch.from_numpy(u8), torch.from_numpy(labels))
    b = tensor_dataset(u8.transpose(0, 2, 3, 1), labels.tolist(), class_names=list("abcd"))  # NHWC numpy
    assert torch.equal(a.images, b.images) and a.labels.tolist() == labels.tolist()
    assert len(a.class_names) == int(labels.max()) + 1 and b.class_names == list("abcd")
    for i in range(n):
        np.testing.assert_allclose(a[i][0].numpy(), _reference_normalize(u8[i]), atol=1e-6)
        assert np.array_equal(a.raw(i), u8[i].transpose(1, 2, 0))
    f = tensor_dataset(torch.from_numpy(u8).float() / 255.0, labels)  # float in [0, 1] -> uint8
    assert torch.equal(f.images, a.images)
    grey = tensor_dataset(torch.from_numpy(u8[:, :1]), labels)  # 1 channel -> RGB
    assert torch.equal(grey.images[:, 2], torch.from_numpy(u8[:, 0]))
    one = tensor_dataset(u8[:1], [0])
    assert len(one) == 1 and one.class_names == ["0"]


def test_tensor_dataset_rejects_bad_input():
    imgs = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        tensor_dataset(imgs, [0, 1])
    with pytest.raises(DataError, match=">= 0"):
        tensor_dataset(imgs, [0, -1, 1])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        tensor_dataset(imgs.float() + 3.0, [0, 1, 1])
    with pytest.raises(DataError, match="integers"):
        tensor_dataset(imgs, [0.5, 1.0, 2.0])
    with pytest.raises(DataError, match="4-D"):
        tensor_dataset(imgs[0], [0])
    with pytest.raises(DataError, match="one per class name"):
        tensor_dataset(imgs, [0, 1, 2], class_names=["a", "b"])


class _PILSet(torch.utils.data.Dataset):
    def __init__(self, arrays, labels):
        self.arrays, self.labels = arrays, labels
        self.classes = ["x", "y", "z"]

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return Image.fromarray(self.arrays[i]), torch.tensor(self.labels[i])


def test_as_image_set_pil_uint8_float_and_targets(rng):
    n = 9
    arrs = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n).tolist()
    ds = as_image_set(_PILSet(list(arrs), labels))
    assert ds.class_names == ["x", "y", "z"] and ds.labels.tolist() == labels
    for i in (0, n - 1):
        assert np.array_equal(ds.raw(i), arrs[i])
        want = _reference_normalize(arrs[i].transpose(2, 0, 1))
        np.testing.assert_allclose(ds[i][0].numpy(), want, atol=1e-6)

    u8 = torch.from_numpy(arrs.transpose(0, 3, 1, 2).copy())
    tds = as_image_set(torch.utils.data.TensorDataset(u8, torch.tensor(labels)))
    assert torch.equal(tds[4][0], tensor_dataset(u8, labels)[4][0])

    floats = torch.from_numpy(rng.normal(size=(n, 3, 4, 4)).astype(np.float32))
    pds = as_image_set(torch.utils.data.TensorDataset(floats, torch.tensor(labels)))
    assert torch.equal(pds[2][0], floats[2])  # the model's own normalisation passes through
    raw = pds.raw(2)
    assert raw.dtype == np.uint8 and raw.shape == (4, 4, 3) and raw.min() == 0 and raw.max() == 255

    class WithTargets(_PILSet):
        def __getitem__(self, i):
            if i > 0:
                raise AssertionError("labels must come from .targets, not by decoding every item")
            return super().__getitem__(i)

    wt = WithTargets(list(arrs), labels)
    wt.targets = labels
    assert as_image_set(wt).labels.tolist() == labels
    assert as_image_set(ds) is ds


def test_as_image_set_rejects_bad_items():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return "not an image", 0

    with pytest.raises(DataError, match="image must be"):
        as_image_set(Bad())
    with pytest.raises(DataError, match="empty"):
        as_image_set(torch.utils.data.TensorDataset(torch.zeros(0, 3, 2, 2), torch.zeros(0)))
    with pytest.raises(DataError, match="map-style"):
        as_image_set(iter([]))


# ------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("n,batch", [(23, 7), (1, 4), (16, 16)])
def test_indexed_loader_ids_order_and_resume(rng, n, batch):
    u8 = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
    ds = tensor_dataset(u8, rng.integers(0, 3, n))
    got = list(indexed_loader(ds, batch))
    ids = torch.cat([b[0] for b in got])
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(n))
    assert all(len(b[0]) <= batch for b in got)
    x = torch.cat([b[1] for b in got])
    y = torch.cat([b[2] for b in got])
    np.testing.assert_allclose(x.numpy(), _reference_normalize(u8), atol=1e-6)
    assert y.dtype == torch.int64 and y.tolist() == ds.labels.tolist()
    k = int(rng.integers(0, n + 1))  # resume after any prefix
    first = list(indexed_loader(ds, batch, stop=k))
    rest = list(indexed_loader(ds, batch, start=k))
    assert torch.cat([b[0] for b in first + rest]).tolist() == list(range(n))
    assert torch.equal(torch.cat([b[1] for b in first + rest]), x)
    assert list(indexed_loader(ds, batch, start=k, stop=k)) == []


def test_indexed_loader_bad_ranges():
    ds = tensor_dataset(torch.zeros(5, 3, 2, 2, dtype=torch.uint8), [0] * 5)
    for kw in ({"start": -1}, {"start": 3, "stop": 2}, {"stop": 6}):
        with pytest.raises(DataError, match="start"):
            indexed_loader(ds, 2, **kw)
    with pytest.raises(DataError, match="batch_size"):
        indexed_loader(ds, 0)


def test_indexed_loader_lazy_folder_with_workers(folder):
    ds = image_folder(folder, size=8)
    ref = [ds[i][0] for i in range(len(ds))]
    for workers in (0, 1):
        got = list(indexed_loader(ds, 3, num_workers=workers, start=1))
        assert torch.cat([b[0] for b in got]).tolist() == [1, 2, 3]
        assert torch.equal(torch.cat([b[1] for b in got]), torch.stack(ref[1:]))
        assert torch.cat([b[2] for b in got]).tolist() == ds.labels[1:].tolist()


def test_warnings_are_not_raised_for_clean_folders(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_folder(folder)


def test_concat_image_sets_against_plain_concatenation(rng):
    from conceptevo.data import concat_image_sets

    a = builtin_dataset("train", seed=2, num_images=int(rng.integers(1, 40)), image_size=16)
    b = builtin_dataset("test", seed=2, num_images=int(rng.integers(1, 40)), image_size=16)
    ids = np.sort(rng.choice(len(a), size=int(rng.integers(1, len(a) + 1)), replace=False))
    parts = [a.subset(ids), b]
    c = concat_image_sets(*parts)
    assert len(c) == len(ids) + len(b) and c.in_memory
    xa, ya = a.batch(torch.from_numpy(ids))
    xb, yb = b.batch(torch.arange(len(b)))
    xc, yc = c.batch(torch.arange(len(c)))
    assert torch.equal(xc, torch.cat([xa, xb])) and torch.equal(yc, torch.cat([ya, yb]))
    for fam in a.tags:
        np.testing.assert_array_equal(c.tags[fam], np.concatenate([np.asarray(a.tags[fam])[ids], b.tags[fam]]))
    np.testing.assert_array_equal(c.meta["part"], np.r_[np.zeros(len(ids)), np.ones(len(b))])
    np.testing.assert_array_equal(c.meta["part_id"], np.r_[np.arange(len(ids)), np.arange(len(b))])
    # lazy parts give a lazy set with the same images
    lazy = [ImageSet(None, p.labels, p.class_names, fetch=(lambda i, p=p: p.images[i])) for p in parts]
    cl = concat_image_sets(*lazy)
    assert not cl.in_memory
    for i in rng.choice(len(c), size=min(10, len(c)), replace=False):
        assert torch.equal(cl[int(i)][0], c[int(i)][0]) and cl[int(i)][1] == c[int(i)][1]
    assert len(concat_image_sets(b)) == len(b)
    with pytest.raises(DataError, match="at least one"):
        concat_image_sets()
    other = ImageSet(b.images, b.labels, [f"x{k}" for k in range(b.num_classes)])
    with pytest.raises(DataError, match="other class names"):
        concat_image_sets(b, other)
    small = builtin_dataset("test", seed=2, num_images=3, image_size=8)
    with pytest.raises(DataError, match="image shapes differ"):
        concat_image_sets(b, small)


def test_plant_stamp_against_a_plain_loop(rng):
    from conceptevo.data import plant_stamp

    ds = builtin_dataset("train", seed=3, num_images=int(rng.integers(1, 120)), image_size=16)
    cls, size = int(rng.integers(0, ds.num_classes)), int(rng.integers(1, 6))
    r0, c0 = int(rng.integers(0, 17 - size)), int(rng.integers(0, 17 - size))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    p_class, p_other, seed = float(rng.random()), float(rng.random()), int(rng.integers(0, 2**31))
    out, stamped = plant_stamp(ds, cls, top_left=(r0, c0), size=size, colour=colour, p_class=p_class,
                               p_other=p_other, seed=seed)
    # reference: per image, the documented draw, then pixel by pixel
    draws = np.random.default_rng(seed)
    u_class, u_other = draws.random(len(ds)), draws.random(len(ds))
    want = [(u_class[i] < p_class) if int(ds.labels[i]) == cls else (u_other[i] < p_other) for i in range(len(ds))]
    np.testing.assert_array_equal(stamped, want)
    np.testing.assert_array_equal(out.meta["stamped"], stamped)
    for i in range(len(ds)):
        ref = ds.images[i].clone()
        if want[i]:
            for r in range(r0, r0 + size):
                for c in range(c0, c0 + size):
                    ref[:, r, c] = torch.tensor(colour, dtype=torch.uint8)
        assert torch.equal(out.images[i], ref)
    assert torch.equal(out.labels, ds.labels) and out.class_names == ds.class_names
    for fam in ds.tags:
        np.testing.assert_array_equal(out.tags[fam], ds.tags[fam])
    assert "stamped" not in (ds.meta or {})  # the input is untouched
    # the extremes: nobody / everybody
    assert not plant_stamp(ds, cls, p_class=0.0, p_other=0.0, size=3, top_left=(0, 0))[1].any()
    assert plant_stamp(ds, cls, p_class=1.0, p_other=1.0, size=3, top_left=(0, 0))[1].all()
    with pytest.raises(DataError, match="does not fit"):
        plant_stamp(ds, cls, top_left=(14, 0), size=5)
    with pytest.raises(DataError, match="not one of"):
        plant_stamp(ds, ds.num_classes)
    with pytest.raises(DataError, match="colour"):
        plant_stamp(ds, cls, colour=(0, 300, 0), top_left=(0, 0))
    with pytest.raises(DataError, match="probabilities"):
        plant_stamp(ds, cls, p_class=1.5, top_left=(0, 0))
    lazy = ImageSet(None, ds.labels, ds.class_names, fetch=lambda i: ds.images[i])
    with pytest.raises(DataError, match="in-memory"):
        plant_stamp(lazy, cls)

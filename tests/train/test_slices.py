"""Slice cache (built with the runtime's preprocessing), split by case, augmentation that moves
image and label together, and lesion oversampling."""
import json
import logging

import numpy as np
import pytest
import torch

from regionkd.sdk.preprocess import resize_labels_nearest, resize_slices, volume_to_slices, window_and_scale
from regionkd.train.data import open_dataset
from regionkd.train.data.layouts import write_case
from regionkd.train.data.phantoms import generate_phantom
from regionkd.train.data.slices import SliceCache, SliceDataset, lesion_oversampling_sampler, split_cases

SIZE = (32, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    for i in range(3):
        p = generate_phantom("liver", (64, 64, 24), seed=11, index=i)
        write_case(root, "lits", i, p.hu, p.label, p.affine)
    return root


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory):
    return SliceCache.build(dataset, tmp_path_factory.mktemp("cache"), input_size=SIZE)


def test_cache_holds_what_the_runtime_would_feed(dataset, cache):
    ds = open_dataset(dataset)
    assert cache.task == "liver" and cache.window == (-60.0, 140.0) and cache.input_size == SIZE
    assert cache.case_ids == ds.case_ids == ["0", "1", "2"]
    case = ds.load_case("1")
    expected = resize_slices(window_and_scale(volume_to_slices(case.volume.data), (-60, 140)), SIZE)
    images = cache.images("1")
    assert images.shape == (24, 32, 32) and images.dtype == np.float32
    np.testing.assert_array_equal(images, expected)
    assert images.min() >= -1.0 and images.max() <= 1.0
    labels = cache.labels("1")
    np.testing.assert_array_equal(labels, resize_labels_nearest(volume_to_slices(case.label), SIZE))
    counts = cache.counts("1")
    assert counts.shape == (24, 3)
    np.testing.assert_array_equal(counts[:, 2], (np.asarray(labels) == 2).sum(axis=(1, 2)))
    assert counts.sum() == 24 * 32 * 32


def test_cache_is_reused_and_rebuilt_when_settings_change(dataset, cache, caplog):
    f = cache.root / "0.image.npy"
    before = f.stat().st_mtime_ns
    done = []
    with caplog.at_level(logging.INFO, logger="regionkd.train"):
        again = SliceCache.build(dataset, cache.root, input_size=SIZE, progress=done.append)
    assert f.stat().st_mtime_ns == before and again.meta["cases"] == cache.meta["cases"]
    assert done == [1, 1, 1] and "slicing case" not in caplog.text      # one call per case; none re-sliced
    with caplog.at_level(logging.INFO, logger="regionkd.train"):
        other = SliceCache.build(dataset, cache.root.parent / "other", window=(-100, 200), input_size=SIZE)
    assert "slicing case 2 (3/3)" in caplog.text
    assert other.window == (-100.0, 200.0)
    assert not np.array_equal(other.images("0"), cache.images("0"))
    meta = json.loads((cache.root / "index.json").read_text())
    assert meta["format"] == "regionkd-slice-cache/1" and meta["class_names"] == ["background", "liver", "tumour"]
    assert SliceCache.open(cache.root).case_ids == ["0", "1", "2"]


def test_split_is_by_case_and_deterministic():
    ids = [f"case_{i:05d}" for i in range(10)]
    train, val = split_cases(ids, val_fraction=0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert not set(train) & set(val) and sorted(train + val) == ids
    assert split_cases(ids, 0.2, seed=3) == (train, val)
    assert split_cases(ids, 0.2, seed=4) != (train, val)
    assert split_cases(["a", "b"], 0.1, seed=0)[1] in (["a"], ["b"])     # at least one validation case
    assert split_cases(["a", "b", "c"], 0.0) == (["a", "b", "c"], [])


def test_slice_dataset_items_and_no_case_in_both_splits(cache):
    train, val = split_cases(cache.case_ids, val_fraction=0.34, seed=0)
    tr, va = SliceDataset(cache, train), SliceDataset(cache, val)
    assert len(tr) == 24 * len(train) and len(va) == 24 * len(val)
    assert not {c for c, _ in tr.index} & {c for c, _ in va.index}
    image, label = tr[5]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label.shape == (32, 32) and label.dtype == torch.int64
    cid, z = tr.index[5]
    np.testing.assert_array_equal(image[0].numpy(), cache.images(cid)[z])
    np.testing.assert_array_equal(label.numpy(), cache.labels(cid)[z])


def _dihedral(a):
    for flip in (False, True):
        b = np.flip(a, 0) if flip else a
        for k in range(4):
            yield np.rot90(b, k)


def test_augmentation_moves_image_and_label_together(cache):
    ds = SliceDataset(cache, augment=True)
    z = int(np.argmax([(cache.labels("0")[i] == 1).sum() for i in range(24)]))   # a slice with liver
    raw_img, raw_lab = cache.images("0")[z], cache.labels("0")[z]
    torch.manual_seed(0)
    transforms_seen = set()
    for _ in range(12):
        img, lab = ds[z]
        img, lab = img[0].numpy(), lab.numpy()
        assert img.min() >= -1.0 and img.max() <= 1.0
        matches = [i for i, t in enumerate(_dihedral(raw_lab)) if np.array_equal(t, lab)]
        assert matches, "label is not a flip/rotation of the cached label"
        t_img = list(_dihedral(raw_img))[matches[0]]
        inside = (np.abs(img) < 0.999) & (np.abs(t_img) < 0.999)
        scale, shift = np.polyfit(t_img[inside], img[inside], 1)             # image = clip(scale * x + shift)
        assert 0.9 <= scale <= 1.1 and -0.05 <= shift <= 0.05
        np.testing.assert_allclose(img[inside], scale * t_img[inside] + shift, atol=1e-4)
        transforms_seen.add(matches[0])
    assert len(transforms_seen) > 2


def test_lesion_oversampling(cache):
    ds = SliceDataset(cache)
    has = ds.slice_has_lesion
    assert 0 < has.sum() < len(has)
    natural = has.mean()
    sampler = lesion_oversampling_sampler(ds, lesion_fraction=0.5, num_samples=4000, seed=1)
    picks = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(picks) == 4000
    frac = has[picks].mean()
    assert abs(frac - 0.5) < 0.04 and frac > natural + 0.1
    again = np.fromiter(iter(lesion_oversampling_sampler(ds, 0.5, 4000, seed=1)), dtype=np.int64)
    np.testing.assert_array_equal(picks, again)


def test_the_training_spacing_goes_into_the_checkpoint(dataset, cache, tmp_path):
    # the bundle's preprocessing.spacing, against which the SDK warns about inputs far from it
    from regionkd.train.config import make_config
    from regionkd.train.models import create_model
    from regionkd.train.checkpoint import build_checkpoint

    spacings = [cache.meta["cases"][c]["spacing"] for c in cache.case_ids]
    expected = {"in_plane_mm": [round(min(s[k] for s in spacings for k in (0, 1)), 4),
                                round(max(s[k] for s in spacings for k in (0, 1)), 4)],
                "slice_thickness_mm": [round(min(s[2] for s in spacings), 4), round(max(s[2] for s in spacings), 4)]}
    assert cache.spacing_range(cache.case_ids) == expected
    assert cache.spacing_range([]) is None
    cfg = make_config("student", "tinynet", dataset, tmp_path / "s.pt", preset="demo", input_size=64)
    ckpt = build_checkpoint(cfg, create_model("tinynet", num_classes=3), ["background", "liver", "tumour"], "liver",
                            [-60, 140], {}, {}, None, spacing=expected)
    assert ckpt["preprocessing"]["spacing"] == expected
    assert "spacing" not in build_checkpoint(cfg, create_model("tinynet", num_classes=3), ["bg", "liver", "tumour"],
                                             "liver", [-60, 140], {}, {}, None)["preprocessing"]

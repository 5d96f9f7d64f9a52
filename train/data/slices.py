"""Training slices: an on-disk slice cache, the split by case, the torch Dataset with
augmentation, and a sampler that oversamples slices with lesions.

The cache turns every case once into network-ready slices with `regionkd.sdk.preprocess`
(window, scale to [-1, 1], resize), exactly what the runtime feeds the network, and stores them
as .npy files that are memory-mapped, so epochs never re-read NIfTI. Building one logs each case
it slices (seconds each) and calls an optional `progress` callback with 1 per case.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from regionkd.sdk.atomic import atomic_path, atomic_write_text
from regionkd.sdk.errors import InputError
from regionkd.sdk.preprocess import resize_labels_nearest, resize_slices, volume_to_slices, window_and_scale

from ..errors import ConfigError
from .layouts import open_dataset, open_images
from .tasks import TASKS

CACHE_FORMAT = "regionkd-slice-cache/1"

log = logging.getLogger(__name__)


def _source_stamp(paths) -> list:
    """Size and mtime of the source files: a changed file invalidates its cached slices."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


@dataclass
class SliceCache:
    """A cache directory: `<case>.image.npy` float32 (z, H, W) in [-1, 1], `<case>.label.npy`
    uint8 (z, H, W), `<case>.counts.npy` int64 (z, num_classes) voxel counts per class, and
    `index.json` describing it all. An unlabelled cache (`build_unlabelled`) holds the images only."""

    root: Path
    meta: dict

    @property
    def case_ids(self) -> list[str]:
        return list(self.meta["cases"])

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def labelled(self) -> bool:
        return bool(self.meta.get("labelled", True))

    @property
    def class_names(self) -> list[str]:
        return list(TASKS[self.task].class_names)

    @property
    def window(self) -> tuple[float, float]:
        return tuple(self.meta["window"])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta["input_size"])

    def spacing_range(self, case_ids) -> dict | None:
        """{"in_plane_mm": [min, max], "slice_thickness_mm": [min, max]} over these cases' canonical
        voxel sizes (what the model is trained at; the bundle records it for the SDK's spacing check)."""
        spacings = [self.meta["cases"][c].get("spacing") for c in case_ids if c in self.meta["cases"]]
        spacings = [s for s in spacings if s and len(s) == 3]
        if not spacings:
            return None
        in_plane = [v for s in spacings for v in s[:2]]
        thickness = [s[2] for s in spacings]
        return {"in_plane_mm": [round(min(in_plane), 4), round(max(in_plane), 4)],
                "slice_thickness_mm": [round(min(thickness), 4), round(max(thickness), 4)]}

    def num_slices(self, case_id: str) -> int:
        return int(self.meta["cases"][case_id]["num_slices"])

    def _file(self, case_id: str, what: str) -> Path:
        if case_id not in self.meta["cases"]:
            raise InputError(f"{self.root}: no case {case_id!r} in the slice cache")
        return self.root / f"{case_id}.{what}.npy"

    def images(self, case_id: str) -> np.ndarray:
        return np.load(self._file(case_id, "image"), mmap_mode="r")

    def labels(self, case_id: str) -> np.ndarray:
        return np.load(self._file(case_id, "label"), mmap_mode="r")

    def counts(self, case_id: str) -> np.ndarray:
        return np.load(self._file(case_id, "counts"))

    @classmethod
    def open(cls, cache_dir) -> "SliceCache":
        root = Path(cache_dir)
        index = root / "index.json"
        try:
            meta = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{index}: not a slice cache ({exc})") from exc
        if meta.get("format") != CACHE_FORMAT:
            raise InputError(f"{index}: unknown slice cache format {meta.get('format')!r} (expected {CACHE_FORMAT})")
        return cls(root, meta)

    @classmethod
    def build(cls, dataset_root, cache_dir, window=None, input_size=(256, 256), progress=None) -> "SliceCache":
        """Slice every case of the dataset at `dataset_root` into `cache_dir`. Cases whose source
        files and settings are unchanged since the last build are reused, not re-read."""
        ds = open_dataset(dataset_root)
        return cls._build(ds, ds.task, dataset_root, cache_dir, window, input_size, progress, labelled=True)

    @classmethod
    def build_unlabelled(cls, images_root, cache_dir, task: str, window=None, input_size=(256, 256),
                         progress=None) -> "SliceCache":
        """The same for a folder of CT images without labels (`layouts.open_images`): any label
        files there are never opened."""
        images = open_images(images_root)
        return cls._build(images, task, images_root, cache_dir, window, input_size, progress, labelled=False)

    @classmethod
    def _build(cls, ds, task_name, dataset_root, cache_dir, window, input_size, progress, labelled) -> "SliceCache":
        task = TASKS[task_name]
        window = [float(v) for v in (window if window is not None else task.window)]
        size = [int(v) for v in input_size]
        root = Path(cache_dir)
        root.mkdir(parents=True, exist_ok=True)
        kinds = ("image", "label", "counts") if labelled else ("image",)
        old = cls._reusable(root, window, size, task_name, labelled)
        cases = {}
        for k, cid in enumerate(ds.case_ids):
            stamp = _source_stamp(ds.paths(cid) if labelled else (ds.path(cid),))
            entry = old.get(cid)
            if entry and entry["source"] == stamp and all((root / f"{cid}.{w}.npy").exists() for w in kinds):
                cases[cid] = entry
            else:
                log.info("%s: slicing case %s (%d/%d)", root, cid, k + 1, len(ds.case_ids))
                num_slices, spacing = _slice_case(ds, cid, root, task, window, size, labelled)
                cases[cid] = {"num_slices": num_slices, "source": stamp, "spacing": spacing}
            if progress is not None:
                progress(1)
        meta = {"format": CACHE_FORMAT, "dataset": str(Path(dataset_root).resolve()), "layout": ds.layout,
                "task": task_name, "labelled": labelled, "class_names": list(task.class_names), "window": window,
                "input_size": size, "normalisation": {"type": "window-linear", "range": [-1, 1]}, "cases": cases}
        atomic_write_text(root / "index.json", json.dumps(meta, indent=1) + "\n")
        return cls(root, meta)

    @classmethod
    def _reusable(cls, root: Path, window, size, task_name: str, labelled: bool) -> dict:
        """The cases of a cache already at `root` made with the same settings ({} if none)."""
        try:
            prev = cls.open(root).meta
        except InputError:
            return {}
        same = (prev["window"] == window and prev["input_size"] == size and prev["task"] == task_name
                and prev.get("labelled", True) == labelled)
        return prev["cases"] if same else {}


def _slice_case(ds, cid: str, root: Path, task, window, size, labelled: bool) -> tuple[int, list]:
    """Write one case's slice files; returns (number of slices, voxel size in mm)."""
    if labelled:
        case = ds.load_case(cid)
        volume, label = case.volume, case.label
    else:
        volume, label = ds.load_image(cid), None
    hu = volume_to_slices(volume.data)
    images = resize_slices(window_and_scale(hu, window), size).astype(np.float32)
    _save_npy(root / f"{cid}.image.npy", images)
    if labelled:
        labels = np.ascontiguousarray(resize_labels_nearest(volume_to_slices(label), size)).astype(np.uint8)
        counts = np.stack([(labels == k).sum(axis=(1, 2)) for k in range(task.num_classes)], axis=1)
        _save_npy(root / f"{cid}.label.npy", labels)
        _save_npy(root / f"{cid}.counts.npy", counts.astype(np.int64))
    return int(images.shape[0]), [float(s) for s in volume.spacing]


def split_cases(case_ids, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split case ids (never slices) into train and validation; at least one of each when there
    are two or more cases and val_fraction > 0. Deterministic for a seed."""
    ids = sorted(set(case_ids))
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


# ----------------------------------------------------------------------------- augmentation

def _orientation_table():
    """The 8 distinct orientations that flips and 90-degree rotations make of a square slice:
    (flip rows, flip columns, quarter turns) -> orientation id 0..7 (0 = unchanged), and one
    representative (f0, f1, k) per id. Found by applying each combination to a 3x3 pattern."""
    pattern = torch.arange(9).view(3, 3)
    ids, reps, seen = {}, [], {}
    for f0 in (0, 1):
        for f1 in (0, 1):
            for k in range(4):
                key = tuple(_orient(pattern, (f0, f1, k)).flatten().tolist())
                if key not in seen:
                    seen[key] = len(reps)
                    reps.append((f0, f1, k))
                ids[(f0, f1, k)] = seen[key]
    return ids, reps


def _orient(x, combo):
    f0, f1, k = combo
    dims = [d for d, f in ((0, f0), (1, f1)) if f]
    if dims:
        x = torch.flip(x, dims)
    return torch.rot90(x, k, (0, 1)) if k else x


ORIENTATION_IDS, ORIENTATIONS = _orientation_table()


def orient(x, orientation: int):
    """Slice `x` (H x W, torch) in orientation `orientation` (0..7)."""
    return _orient(x, ORIENTATIONS[int(orientation)]).contiguous()


def draw_augmentation(square: bool) -> tuple[int, float, float]:
    """(orientation id, intensity scale, intensity shift) from torch's RNG: random flips, 90-degree
    rotations (180 only for non-square slices), scale 0.9-1.1 and shift +-0.05."""
    flips = torch.randint(0, 2, (2,)).tolist()
    k = int(torch.randint(0, 4, (1,))) if square else 2 * int(torch.randint(0, 2, (1,)))
    scale = 0.9 + 0.2 * float(torch.rand(()))
    shift = 0.1 * float(torch.rand(())) - 0.05
    return ORIENTATION_IDS[(flips[0], flips[1], k)], scale, shift


def jitter(image, scale: float, shift: float):
    return torch.clamp(image * scale + shift, -1.0, 1.0)


# ----------------------------------------------------------------------------- datasets

class SliceDataset(torch.utils.data.Dataset):
    """Axial slices of some cases of a SliceCache. Item: (image float32 1xHxW in [-1, 1],
    label int64 HxW). With augment: a random orientation (flips and 90-degree rotations, the same
    for image and label) and a light intensity jitter of the image (`draw_augmentation`), drawn
    from torch's generator, which DataLoader seeds per worker. `item(i)` also returns the
    orientation id, and `view(i, orientation)` the slice in an orientation without the jitter
    (what the teacher sees, teacher_cache.py)."""

    def __init__(self, cache: SliceCache, case_ids=None, augment: bool = False, lesion_label: int | None = None):
        self.cache = cache
        self.case_ids = list(case_ids) if case_ids is not None else cache.case_ids
        self.augment = augment
        lesion = TASKS[cache.task].lesion_label if lesion_label is None else lesion_label
        index, has_lesion = [], []
        for cid in self.case_ids:
            counts = cache.counts(cid)
            index += [(cid, z) for z in range(counts.shape[0])]
            has_lesion.append(counts[:, lesion] > 0)
        self.index = index
        self.slice_has_lesion = np.concatenate(has_lesion) if has_lesion else np.zeros(0, bool)
        self._arrays = {}

    def __len__(self) -> int:
        return len(self.index)

    def _case(self, cid):
        if cid not in self._arrays:     # memory maps, opened lazily (per DataLoader worker)
            self._arrays[cid] = (self.cache.images(cid), self.cache.labels(cid))
        return self._arrays[cid]

    def _raw(self, i):
        cid, z = self.index[i]
        images, labels = self._case(cid)
        return (torch.from_numpy(np.array(images[z], dtype=np.float32)),
                torch.from_numpy(np.array(labels[z], dtype=np.int64)))

    def item(self, i):
        """(image 1xHxW, label HxW, orientation id) with this dataset's augmentation."""
        image, label = self._raw(i)
        if not self.augment:
            return image[None], label, 0
        o, scale, shift = draw_augmentation(image.shape[0] == image.shape[1])
        return jitter(orient(image, o), scale, shift)[None], orient(label, o), o

    def __getitem__(self, i):
        image, label, _ = self.item(i)
        return image, label

    def view(self, i, orientation: int):
        """(image 1xHxW, label HxW) of slice i in `orientation`, without intensity jitter."""
        image, label = self._raw(i)
        return orient(image, orientation)[None], orient(label, orientation)

    def slice_key(self, i) -> tuple[str, int]:
        return self.index[i]


class UnlabelledSliceDataset(torch.utils.data.Dataset):
    """Axial slices of an unlabelled SliceCache. Item: image float32 1xHxW in [-1, 1], augmented
    like SliceDataset's when `augment`."""

    def __init__(self, cache: SliceCache, augment: bool = False):
        self.cache, self.augment = cache, augment
        self.case_ids = cache.case_ids
        self.index = [(cid, z) for cid in self.case_ids for z in range(cache.num_slices(cid))]
        self._arrays = {}

    def __len__(self) -> int:
        return len(self.index)

    def _raw(self, i):
        cid, z = self.index[i]
        if cid not in self._arrays:
            self._arrays[cid] = self.cache.images(cid)
        return torch.from_numpy(np.array(self._arrays[cid][z], dtype=np.float32))

    def item(self, i):
        image = self._raw(i)
        if not self.augment:
            return image[None], None, 0
        o, scale, shift = draw_augmentation(image.shape[0] == image.shape[1])
        return jitter(orient(image, o), scale, shift)[None], None, o

    def __getitem__(self, i):
        return self.item(i)[0]

    def view(self, i, orientation: int):
        return orient(self._raw(i), orientation)[None], None

    def slice_key(self, i) -> tuple[str, int]:
        return self.index[i]


def lesion_oversampling_sampler(dataset: SliceDataset, lesion_fraction: float = 0.5, num_samples: int | None = None,
                                seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """Sample slices with replacement so that about `lesion_fraction` of them show a lesion
    (uniform when there are no lesion slices, or only lesion slices)."""
    if not 0.0 < lesion_fraction < 1.0:
        raise ConfigError(f"lesion_fraction must be in (0, 1), got {lesion_fraction}")
    has = np.asarray(dataset.slice_has_lesion, bool)
    n_les, n_all = int(has.sum()), len(has)
    if n_all == 0:
        raise InputError("no slices to sample from")
    if n_les == 0 or n_les == n_all:
        weights = np.ones(n_all)
    else:
        weights = np.where(has, lesion_fraction / n_les, (1.0 - lesion_fraction) / (n_all - n_les))
    gen = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double),
                                                  num_samples=int(num_samples or n_all), replacement=True,
                                                  generator=gen)

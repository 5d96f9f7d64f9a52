"""Training slices: an on-disk slice cache, the split by case, the torch Dataset with
augmentation, and a sampler that oversamples slices with lesions.

The cache turns every case once into network-ready slices with `regionkd.sdk.preprocess`
(window, scale to [-1, 1], resize), exactly what the runtime feeds the network, and stores them
as .npy files that are memory-mapped, so epochs never re-read NIfTI.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from regionkd.sdk.atomic import atomic_path, atomic_write_text
from regionkd.sdk.errors import InputError
from regionkd.sdk.preprocess import resize_labels_nearest, resize_slices, volume_to_slices, window_and_scale

from .layouts import open_dataset
from .tasks import TASKS

CACHE_FORMAT = "regionkd-slice-cache/1"


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
    `index.json` describing it all."""

    root: Path
    meta: dict

    @property
    def case_ids(self) -> list[str]:
        return list(self.meta["cases"])

    @property
    def task(self) -> str:
        return self.meta["task"]

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
    def build(cls, dataset_root, cache_dir, window=None, input_size=(256, 256), progress: bool = True) -> "SliceCache":
        """Slice every case of the dataset at `dataset_root` into `cache_dir`. Cases whose source
        files and settings are unchanged since the last build are reused, not re-read."""
        ds = open_dataset(dataset_root)
        task = TASKS[ds.task]
        window = [float(v) for v in (window if window is not None else task.window)]
        size = [int(v) for v in input_size]
        root = Path(cache_dir)
        root.mkdir(parents=True, exist_ok=True)
        old = {}
        try:
            prev = cls.open(root).meta
            if prev["window"] == window and prev["input_size"] == size and prev["task"] == ds.task:
                old = prev["cases"]
        except InputError:
            pass
        cases = {}
        for cid in tqdm(ds.case_ids, desc="slicing cases", unit="case", disable=not progress):
            paths = ds.paths(cid)
            stamp = _source_stamp(paths)
            entry = old.get(cid)
            if entry and entry["source"] == stamp and all((root / f"{cid}.{w}.npy").exists()
                                                          for w in ("image", "label", "counts")):
                cases[cid] = entry
                continue
            case = ds.load_case(cid)
            hu = volume_to_slices(case.volume.data)
            images = resize_slices(window_and_scale(hu, window), size).astype(np.float32)
            labels = np.ascontiguousarray(resize_labels_nearest(volume_to_slices(case.label), size)).astype(np.uint8)
            counts = np.stack([(labels == k).sum(axis=(1, 2)) for k in range(task.num_classes)], axis=1)
            _save_npy(root / f"{cid}.image.npy", images)
            _save_npy(root / f"{cid}.label.npy", labels)
            _save_npy(root / f"{cid}.counts.npy", counts.astype(np.int64))
            cases[cid] = {"num_slices": int(images.shape[0]), "source": stamp,
                          "spacing": [float(s) for s in case.volume.spacing]}
        meta = {"format": CACHE_FORMAT, "dataset": str(Path(dataset_root).resolve()), "layout": ds.layout,
                "task": ds.task, "class_names": list(task.class_names), "window": window, "input_size": size,
                "normalisation": {"type": "window-linear", "range": [-1, 1]}, "cases": cases}
        atomic_write_text(root / "index.json", json.dumps(meta, indent=1) + "\n")
        return cls(root, meta)


def split_cases(case_ids, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split case ids (never slices) into train and validation; at least one of each when there
    are two or more cases and val_fraction > 0. Deterministic for a seed."""
    ids = sorted(set(case_ids))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


class SliceDataset(torch.utils.data.Dataset):
    """Axial slices of some cases of a SliceCache. Item: (image float32 1xHxW in [-1, 1],
    label int64 HxW). With augment: random flips, 90-degree rotations (square inputs; 180 only
    otherwise) and a light intensity jitter (scale 0.9-1.1, shift +-0.05, clipped to [-1, 1]).
    Randomness comes from torch's generator, which DataLoader seeds per worker."""

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

    def __getitem__(self, i):
        cid, z = self.index[i]
        images, labels = self._case(cid)
        image = torch.from_numpy(np.array(images[z], dtype=np.float32))
        label = torch.from_numpy(np.array(labels[z], dtype=np.int64))
        if self.augment:
            image, label = self._augment(image, label)
        return image[None], label

    def _augment(self, image, label):
        flips = torch.randint(0, 2, (2,))
        dims = [d for d, f in zip((0, 1), flips.tolist()) if f]
        if dims:
            image, label = torch.flip(image, dims), torch.flip(label, dims)
        square = image.shape[0] == image.shape[1]
        k = int(torch.randint(0, 4, (1,))) if square else 2 * int(torch.randint(0, 2, (1,)))
        if k:
            image, label = torch.rot90(image, k, (0, 1)), torch.rot90(label, k, (0, 1))
        scale = 0.9 + 0.2 * float(torch.rand(()))
        shift = 0.1 * float(torch.rand(())) - 0.05
        image = torch.clamp(image * scale + shift, -1.0, 1.0)
        return image.contiguous(), label.contiguous()


def lesion_oversampling_sampler(dataset: SliceDataset, lesion_fraction: float = 0.5, num_samples: int | None = None,
                                seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """Sample slices with replacement so that about `lesion_fraction` of them show a lesion
    (uniform when there are no lesion slices, or only lesion slices)."""
    if not 0.0 < lesion_fraction < 1.0:
        raise ValueError(f"lesion_fraction must be in (0, 1), got {lesion_fraction}")
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

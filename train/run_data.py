"""The data of a training run: the slice caches (built by rank 0), the split by case, a fixed
labelled subset, and the datasets the loop draws from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regionkd.sdk.errors import InputError

from .config import TrainConfig
from .processes import Proc


def labelled_subset(train_ids: list[str], n: int | None, seed: int) -> list[str]:
    """`n` of the training cases, the same for every run seed (drawn with the split seed)."""
    if n is None:
        return list(train_ids)
    if n > len(train_ids):
        raise InputError(f"--labelled-cases {n}: the training split has only {len(train_ids)} case(s)")
    order = np.random.default_rng([seed, 7]).permutation(len(train_ids))
    return sorted(train_ids[i] for i in order[:n])


@dataclass
class RunData:
    task: str
    class_names: list
    window: list
    train_ids: list
    train_ds: object
    val_ds: object
    unlabelled_ds: object = None
    spacing: dict | None = None     # voxel-size range of the training cases (the bundle's preprocessing.spacing)


def open_run_data(cfg: TrainConfig, proc: Proc) -> RunData:
    """The slice caches (built by rank 0), the case split, and the datasets of a run."""
    from .data import get_task, open_dataset
    from .data.slices import SliceCache, SliceDataset, split_cases

    data_root = Path(cfg.data)
    if not data_root.is_dir():
        raise InputError(f"--data {data_root}: not a directory")
    ds = open_dataset(data_root)
    class_names = list(get_task(ds.task).class_names)
    size = (cfg.input_size, cfg.input_size)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / f"slice-cache-{cfg.input_size}"
    u_dir = cache_dir.with_name(cache_dir.name + "-unlabelled")
    if proc.is_main:
        cache = SliceCache.build(data_root, cache_dir, window=None, input_size=size)
        if cfg.unlabelled:
            SliceCache.build_unlabelled(cfg.unlabelled, u_dir, ds.task, window=cache.window, input_size=size)
    proc.barrier()
    cache = SliceCache.open(cache_dir)
    window = [float(v) for v in cache.window]      # the task's HU window, as the cache applied it
    train_ids, val_ids = split_cases(list(ds.case_ids), val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if not train_ids:
        raise InputError(f"--data {data_root}: no training cases after the validation split")
    train_ids = labelled_subset(train_ids, cfg.labelled_cases, cfg.split_seed)
    train_ds = SliceDataset(cache, train_ids, augment=cfg.augment)
    val_ds = SliceDataset(cache, val_ids, augment=False) if val_ids else None
    if len(train_ds) == 0:
        raise InputError(f"--data {data_root}: the training cases hold no slices")
    rd = RunData(ds.task, class_names, window, train_ids, train_ds, val_ds, spacing=cache.spacing_range(train_ids))
    if cfg.unlabelled:
        _add_unlabelled(rd, cfg, u_dir)
    return rd


def _add_unlabelled(rd: RunData, cfg: TrainConfig, u_dir: Path) -> None:
    from .data.slices import SliceCache, UnlabelledSliceDataset

    u_cache = SliceCache.open(u_dir)
    rd.unlabelled_ds = UnlabelledSliceDataset(u_cache, augment=cfg.augment_unlabelled)
    if len(rd.unlabelled_ds) == 0:
        raise InputError(f"--unlabelled {cfg.unlabelled}: the images hold no slices")

"""Which slices a training step sees, and with which augmentation, as plain data.

A batch is a list of keys `(source, slice index, augmentation seed)`, source 0 for labelled and 1
for unlabelled slices. The keys of an epoch depend only on the run's seed, the epoch and the
data, never on the network: that is what lets the teacher cache store the teacher's outputs for
exactly the batches a student will draw (`teacher_cache.py`), and what makes a run repeatable
and resumable mid-epoch.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .processes import derived_seed

LABELLED, UNLABELLED = 0, 1
IGNORE_LABEL = -1   # the label map of an unlabelled slice: every pixel "unknown"


class SeededItems(Dataset):
    """Items addressed as (source, index, seed): the source dataset's augmentation runs with numpy,
    random and torch seeded from `seed`, inside a scope that restores the caller's RNG states.
    Item: (image 1xHxW, label HxW, orientation id); an unlabelled slice's label map is all
    IGNORE_LABEL."""

    def __init__(self, labelled, unlabelled=None):
        self.sources = (labelled, unlabelled)

    def __len__(self):
        return len(self.sources[LABELLED])

    def __getitem__(self, key):
        source, index, seed = key
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                np.random.seed(seed)
                random.seed(seed)
                torch.manual_seed(seed)
                image, label, orientation = self.sources[source].item(int(index))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        if label is None:
            label = torch.full(image.shape[1:], IGNORE_LABEL, dtype=torch.int64)
        return image, label, orientation


def epoch_batches(train_ds, epoch: int, cfg, steps_per_epoch: int, rank: int = 0, world: int = 1,
                  unlabelled_ds=None) -> list[list[tuple[int, int, int]]]:
    """This rank's batches for one epoch. Labelled slices: every rank draws the same global order
    (lesion oversampling seeded by (seed, epoch)) and keeps every world-th item. With
    `unlabelled_ds`, each batch is followed by `cfg.unlabelled_batch` unlabelled slices drawn
    uniformly (seeded by (seed, epoch) too)."""
    from .data.slices import lesion_oversampling_sampler

    n_total = steps_per_epoch * cfg.batch_size * world
    sampler = lesion_oversampling_sampler(train_ds, lesion_fraction=cfg.lesion_fraction, num_samples=n_total,
                                          seed=derived_seed(cfg.seed, epoch, 1))
    indices = [int(i) for i in sampler][:n_total]
    if len(indices) < n_total:
        raise RuntimeError(f"sampler gave {len(indices)} indices, expected {n_total}")
    seeds = np.random.default_rng([cfg.seed, epoch, 2]).integers(0, 2**31 - 1, size=n_total)
    mine = [(LABELLED, i, int(s)) for i, s in zip(indices, seeds)][rank::world]
    b = cfg.batch_size
    batches = [mine[i * b:(i + 1) * b] for i in range(steps_per_epoch)]
    if unlabelled_ds is not None:
        u = unlabelled_batch_size(cfg)
        n_u = steps_per_epoch * u * world
        rng = np.random.default_rng([cfg.seed, epoch, 3])
        u_idx = rng.integers(0, len(unlabelled_ds), size=n_u)
        u_seeds = rng.integers(0, 2**31 - 1, size=n_u)
        u_mine = [(UNLABELLED, int(i), int(s)) for i, s in zip(u_idx, u_seeds)][rank::world]
        batches = [batch + u_mine[k * u:(k + 1) * u] for k, batch in enumerate(batches)]
    return batches


def unlabelled_batch_size(cfg) -> int:
    return int(cfg.unlabelled_batch or cfg.batch_size)

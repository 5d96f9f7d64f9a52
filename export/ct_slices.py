"""Real CT slices for the export: calibration, parity and validation read them from a dataset
directory through `regionkd.train.data.open_dataset`, preprocessed exactly as the SDK does
(`regionkd.sdk.preprocess`). Never random data: INT8 ranges calibrated on noise do not fit CT.

Calibration slices are stratified so that the rare lesion slices are in the sample: about half
of them hold the highest label (the lesion), the rest organ-only and background-only slices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from regionkd.sdk.errors import InputError
from regionkd.sdk.preprocess import preprocess_slices, volume_to_slices

#: share of the calibration sample per stratum (lesion slices first, they are the rarest)
STRATA = (("lesion", 0.5), ("organ", 0.35), ("background", 0.15))


@dataclass
class SliceSample:
    """Preprocessed slices (n, 1, H, W) float32 with where they came from."""
    images: np.ndarray
    source: list = field(default_factory=list)      # (case_id, z) per slice
    strata: dict = field(default_factory=dict)       # stratum -> count

    def __len__(self) -> int:
        return int(self.images.shape[0])


def open_cases(root) -> tuple:
    """(dataset, case_ids) of a dataset directory; InputError when it holds no readable cases."""
    from regionkd.train.data import open_dataset

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset directory does not exist")
    ds = open_dataset(root)
    case_ids = list(ds.case_ids)
    if not case_ids:
        raise InputError(f"{root}: no cases found")
    return ds, case_ids


def iter_cases(root) -> Iterator:
    """Yield the dataset's cases (canonical `volume.data` HU and `label`) one at a time."""
    ds, case_ids = open_cases(root)
    for case_id in case_ids:
        yield ds.load_case(case_id)


def slice_stratum(label_slice: np.ndarray, lesion_label: int) -> str:
    if np.any(label_slice >= lesion_label):
        return "lesion"
    if np.any(label_slice > 0):
        return "organ"
    return "background"


def stratified_slices(root, n: int, window, input_size, *, lesion_label: int = 2, seed: int = 0) -> SliceSample:
    """Pick `n` axial slices from the dataset at `root`, stratified by content (see STRATA), spread
    over the cases, preprocessed to (n, 1, H, W). A stratum with too few slices gives its share to
    the others. The choice is seeded, so the same data gives the same calibration."""
    if n < 1:
        raise InputError(f"number of slices must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    ds, case_ids = open_cases(root)
    # first pass: only labels, to know which slice belongs where
    pools = {name: [] for name, _ in STRATA}
    for case_id in case_ids:
        label = volume_to_slices(np.asarray(ds.load_case(case_id).label))
        for z in range(label.shape[0]):
            pools[slice_stratum(label[z], lesion_label)].append((case_id, z))
    available = sum(len(p) for p in pools.values())
    if available == 0:
        raise InputError(f"{root}: the cases hold no slices")
    n = min(n, available)
    # quotas by share, then hand what a small stratum cannot fill to the next ones
    quotas = {name: int(share * n) for name, share in STRATA}
    quotas[STRATA[0][0]] += n - sum(quotas.values())  # rounding remainder to the lesion stratum
    spare = 0
    for name, _ in STRATA:
        want = quotas[name] + spare
        quotas[name] = min(want, len(pools[name]))
        spare = want - quotas[name]
    for name, _ in STRATA:  # a spare left at the end goes back to any stratum with room
        extra = min(spare, len(pools[name]) - quotas[name])
        quotas[name] += extra
        spare -= extra
    chosen = []
    for name, _ in STRATA:
        pool = pools[name]
        idx = rng.choice(len(pool), size=quotas[name], replace=False) if quotas[name] else []
        chosen += [(pool[i], name) for i in sorted(idx)]
    # second pass: read only the chosen slices' images
    by_case: dict = {}
    for (case_id, z), _ in chosen:
        by_case.setdefault(case_id, []).append(z)
    images, source = [], []
    for case_id in case_ids:
        if case_id not in by_case:
            continue
        hu = volume_to_slices(np.asarray(ds.load_case(case_id).volume.data))
        zs = by_case[case_id]
        images.append(preprocess_slices(hu[zs], window, input_size))
        source += [(case_id, int(z)) for z in zs]
    return SliceSample(images=np.concatenate(images, axis=0), source=source,
                       strata={name: quotas[name] for name, _ in STRATA})


def synthetic_slices(n: int, window, input_size, seed: int = 0) -> np.ndarray:
    """(n, 1, H, W) network input from a synthetic CT (air, body, a liver with a tumour, noise:
    `regionkd.sdk.bench.synthetic_ct`): the parity check's slices when no CT data is given."""
    from regionkd.sdk.bench import synthetic_ct

    h, w = (int(v) for v in input_size)
    hu, _ = synthetic_ct((max(h, 32), max(w, 32), n + 2), seed=seed)
    return preprocess_slices(volume_to_slices(hu.astype(np.float32))[1:n + 1], window, input_size)

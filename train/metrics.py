"""Per-case segmentation metrics with the conventions of the LiTS evaluation, which uses
`medpy.metric.binary`: Dice, VOE = 1 - Jaccard, RVD = (|pred| - |ref|) / |ref|, and the surface
distances ASSD and HD95 in millimetres.

Surfaces (as medpy): mask XOR binary_erosion(mask, connectivity-1 structure); erosion treats
outside the image as background, so mask voxels on the image border are surface voxels.
Distances: scipy.ndimage.distance_transform_edt of the other mask's non-surface with
`sampling=spacing`. ASSD = mean of the two directed mean surface distances; HD95 = 95th
percentile (numpy linear) of the union of both directions' distances (medpy's hd95).

Empty masks (medpy raises; here explicit):
- ref and pred both empty: dice 1, voe 0, rvd 0, assd 0, hd95 0 (a correct "nothing").
- ref empty, pred not: dice 0, voe 1, rvd nan (undefined), assd/hd95 `missing_distance`.
- ref not empty, pred empty: dice 0, voe 1, rvd -1, assd/hd95 `missing_distance`.
`missing_distance` defaults to inf (there is no surface to measure to). The LiTS convention
leaves cases with an empty reference out of that class's mean: use `reference_present`.

Speed: each label is cropped to the bounding box of pred | ref plus a 1-voxel margin (clipped to
the image, which keeps medpy's border behaviour exactly) before erosion and distance transforms."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from regionkd.sdk.errors import InputError

METRIC_NAMES = ("dice", "voe", "rvd", "assd", "hd95")


def dice_score(intersection, size_sum, empty=1.0):
    """The one Dice of the project: 2|P ∩ R| / (|P| + |R|), and `empty` where both are empty
    (1.0 for one case's "correctly nothing"; None for a pooled class that never occurs)."""
    return float(2.0 * intersection / size_sum) if size_sum else empty


class DiceAccumulator:
    """Pooled (global) Dice per class over many volumes or slices: |P ∩ R| and |P| + |R| are summed
    first, so a class absent from one volume counts neither as 0 nor as 1 there. Used by training
    validation, the export's Dice gate and the benchmarks."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.inter = np.zeros(self.num_classes, dtype=np.int64)
        self.total = np.zeros(self.num_classes, dtype=np.int64)

    def add(self, pred: np.ndarray, ref: np.ndarray) -> None:
        pred, ref = np.asarray(pred).ravel(), np.asarray(ref).ravel()
        if pred.shape != ref.shape:
            raise InputError(f"prediction and reference sizes differ: {pred.shape} vs {ref.shape}")
        c = self.num_classes
        pairs = np.bincount(ref.astype(np.int64) * c + pred.astype(np.int64), minlength=c * c).reshape(c, c)
        self.add_counts(np.diag(pairs), pairs.sum(axis=0) + pairs.sum(axis=1))

    def add_counts(self, inter, total) -> None:
        """Add per-class |P ∩ R| and |P| + |R| counted elsewhere (e.g. summed over processes)."""
        self.inter += np.asarray(inter, dtype=np.int64)
        self.total += np.asarray(total, dtype=np.int64)

    def dice(self, class_names) -> dict:
        """{class_name: Dice} for the foreground classes; None where the class is in neither."""
        return {class_names[c]: dice_score(self.inter[c], self.total[c], empty=None)
                for c in range(1, self.num_classes)}


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask plus `margin`, clipped to the array (per-axis projections)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]):
    """(distances of pred's surface voxels to ref's surface, and of ref's to pred's), in the
    units of `spacing`. Both masks must be non-empty boolean arrays of the same shape."""
    box = _bbox(pred | ref)
    p, r = pred[box], ref[box]
    sp, sr = _surface(p), _surface(r)
    d_to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return d_to_r[sp], d_to_p[sr]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   missing_distance: float = math.inf, surface: bool = True) -> dict[str, float]:
    """Dice, VOE, RVD, ASSD, HD95 of two boolean masks (see the module docstring for empties);
    with surface=False ASSD and HD95 are not computed (None), which saves the distance transforms."""
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_ref == 0 and n_pred == 0:
        return {"dice": dice_score(0, 0), "voe": 0.0, "rvd": 0.0, "assd": 0.0, "hd95": 0.0}
    rvd = (n_pred - n_ref) / n_ref if n_ref else math.nan
    if n_ref == 0 or n_pred == 0:
        return {"dice": 0.0, "voe": 1.0, "rvd": rvd, "assd": missing_distance, "hd95": missing_distance}
    inter = int(np.count_nonzero(pred & ref))
    union = n_pred + n_ref - inter
    dice = dice_score(inter, n_pred + n_ref)
    if not surface:
        return {"dice": dice, "voe": 1.0 - inter / union, "rvd": rvd,
                "assd": None, "hd95": None}
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return {"dice": dice,
            "voe": 1.0 - inter / union,
            "rvd": rvd,
            "assd": float((d_pr.mean() + d_rp.mean()) / 2.0),
            "hd95": float(np.percentile(np.concatenate([d_pr, d_rp]), 95))}


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Iterable[int],
                 missing_distance: float = math.inf, surface: bool = True) -> dict[int, dict[str, float]]:
    """{label: {"dice", "voe", "rvd", "assd", "hd95"}} of two integer label volumes; `spacing`
    (mm per voxel along each array axis) makes ASSD/HD95 millimetres."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"case_metrics: prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise InputError(f"case_metrics: spacing {spacing} must give one positive value per axis of a "
                         f"{pred.ndim}-D volume")
    for name, arr in (("prediction", pred), ("reference", ref)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise InputError(f"case_metrics: {name} must be an integer label volume, got dtype {arr.dtype}")
    return {int(label): binary_metrics(pred == label, ref == label, spacing, missing_distance, surface)
            for label in labels}


def reference_present(ref: np.ndarray, label: int) -> bool:
    """Whether a case counts for `label`'s mean under the LiTS convention (non-empty reference)."""
    return bool(np.any(np.asarray(ref) == label))


def best_threshold_dice(values, target):
    """Best Dice of `values >= thr` or `values <= thr` against `target` over every threshold:
    how far a single intensity threshold gets (the phantoms' difficulty check)."""
    values, target = np.asarray(values, np.float64), np.asarray(target, bool)
    positives, best = target.sum(), 0.0
    for sign in (1.0, -1.0):
        order = np.argsort(-sign * values, kind="stable")
        v, t = sign * values[order], target[order]
        tp = np.cumsum(t)
        k = np.arange(1, len(v) + 1)
        cut = np.r_[v[1:] != v[:-1], True]            # only between different values
        best = max(best, float((2 * tp[cut] / (positives + k[cut])).max()))
    return best

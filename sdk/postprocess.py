"""Post-processing of a label volume: keep the largest connected component of each organ class.

Lesion (non-organ, non-background) voxels are counted as part of the organ when finding its
components, because a tumour sits inside the organ and often splits the organ mask. The organ
component kept is the one with the most organ voxels. Organ voxels outside it become background;
lesion voxels are kept only when they lie in a kept organ component, since a liver or kidney
tumour outside its organ is a false positive under the LiTS / KiTS19 label conventions.
With no organ class configured the mask is returned unchanged.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# 26-connectivity: diagonal neighbours in thick slices still belong to one organ
_STRUCTURE = ndimage.generate_binary_structure(3, 3)


def foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels of a 3D array, from axis projections (`any` is a fast
    reduction: 8 ms on a 512x512x100 mask where ndimage.find_objects took 130 ms); None if empty."""
    plane = labels.any(axis=2)
    r = np.flatnonzero(plane.any(axis=1))
    if r.size == 0:
        return None
    c = np.flatnonzero(plane.any(axis=0))
    z = np.flatnonzero(labels.any(axis=(0, 1)))
    return slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1), slice(z[0], z[-1] + 1)


def keep_largest_components(labels: np.ndarray, organ_labels, num_classes: int) -> np.ndarray:
    """A copy of `labels` (uint8, 3D) with one component per organ label kept (see module doc)."""
    organ_labels = [int(k) for k in organ_labels if 0 < int(k) < num_classes]
    if not organ_labels:
        return labels
    out = labels.copy(order="K")        # keeps the memory layout: a plain copy, not a transpose
    box = foreground_box(labels)
    if box is None:
        return out
    # the work is done inside the foreground's bounding box only, on a C-ordered copy of it
    # (ndimage.label is about twice as fast on C order as on a transposed view)
    region = np.ascontiguousarray(out[box])
    lesion = np.isin(region, [k for k in range(1, num_classes) if k not in organ_labels])
    kept_region = np.zeros(region.shape, dtype=bool)
    for organ in organ_labels:
        organ_mask = region == organ
        if not organ_mask.any():
            continue
        components, n = ndimage.label(organ_mask | lesion, structure=_STRUCTURE)
        organ_counts = np.bincount(components[organ_mask], minlength=n + 1)
        organ_counts[0] = 0
        keep = components == int(np.argmax(organ_counts))
        region[organ_mask & ~keep] = 0
        kept_region |= keep
    region[lesion & ~kept_region] = 0
    out[box] = region
    return out

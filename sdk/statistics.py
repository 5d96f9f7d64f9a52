"""Per-structure statistics of a mask (`--statistics`, `result.statistics`), written as JSON next
to the mask (TotalSegmentator's statistics.json is the model; this one says more).

For every non-background class: the voxel count, the volume in ml (voxels x the voxel volume,
|det| of the affine's 3x3 part), and the mean, SD, min and max HU of the image inside the mask
(null for an empty class). For lesion classes (tumour, lesion, cyst, ... by name) also the number
of connected lesions (26-connectivity, as the post-processing counts components) and the largest
lesion's volume and longest in-plane diameter in mm: the largest distance between two corners of
its voxels within one axial slice (the slicing plane the segmentation used), over all its
slices, measured in world coordinates, so anisotropic and oblique voxels are measured right. A
voxel's corners make a disc of diameter d measure d to within a voxel's diagonal.

Format `regionkd-statistics/1`:
{"format": "regionkd-statistics/1", "input": "...", "voxel_volume_ml": 0.0016, "spacing_mm": [x, y, z],
 "classes": {"liver": {"label": 1, "voxels": 123, "volume_ml": 0.2, "hu": {"mean": .., "sd": .., "min": ..,
 "max": ..}}, "tumour": {..., "lesions": {"count": 2, "largest_volume_ml": .., "largest_diameter_mm": ..}}}}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from .atomic import atomic_write_text
from .orientation import slice_geometry, to_canonical
from .outputs import statistics_path_for  # noqa: F401 - re-exported: the JSON beside a mask

FORMAT = "regionkd-statistics/1"
LESION_WORDS = ("tumour", "tumor", "lesion", "cyst", "metastasis", "neoplasm")
_STRUCTURE = ndimage.generate_binary_structure(3, 3)


def is_lesion_class(name: str) -> bool:
    return any(word in name.lower() for word in LESION_WORDS)


def _round(value, digits=3):
    return None if value is None else round(float(value), digits)


def longest_in_plane_diameter_mm(component: np.ndarray, affine: np.ndarray) -> float:
    """Longest distance (mm) between corners of the voxels of `component` (bool, canonical
    (x, y, z) order, axial = last axis) within one axial slice, in world coordinates of `affine`."""
    best = 0.0
    zs = np.flatnonzero(component.any(axis=(0, 1)))
    linear = affine[:3, :3]
    for z in zs:
        plane = component[:, :, z]
        # only border voxels can hold the farthest corners; corners at voxel index +-0.5
        border = plane & ~ndimage.binary_erosion(plane)
        ij = np.argwhere(border).astype(np.float64)
        corners = (ij[:, None, :] + np.array([[-.5, -.5], [-.5, .5], [.5, -.5], [.5, .5]])[None]).reshape(-1, 2)
        pts = np.column_stack([corners, np.full(len(corners), float(z))]) @ linear.T
        pts = np.unique(np.round(pts, 6), axis=0)
        if len(pts) > 64:
            pts = _hull_points(pts)
        if len(pts) > 1:
            d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d))
    return best


def _hull_points(pts: np.ndarray) -> np.ndarray:
    """The points of `pts` (coplanar, 3D) on their 2D convex hull: the farthest pair is among them."""
    from scipy.spatial import ConvexHull, QhullError

    centred = pts - pts.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    flat = centred @ vt[:2].T
    try:
        return pts[ConvexHull(flat).vertices]
    except QhullError:          # collinear points: the extremes are the hull
        return pts


def compute_statistics(mask: np.ndarray, hu: np.ndarray, affine: np.ndarray, class_names, *,
                       axial_axis: int | None = None, input_name: str | None = None) -> dict:
    """Statistics of `mask` (labels, the input's voxel order) over `hu` (same shape) with `affine`
    (see the module doc); `axial_axis`: the voxel axis sliced as axial (the segmentation's)."""
    mask = np.asarray(mask)
    hu = np.asarray(hu, dtype=np.float32)
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {hu.shape}")
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    geometry = slice_geometry(affine, axial_axis)
    canonical = to_canonical(mask, affine, ornt=geometry.ornt)
    classes = {}
    for label, name in enumerate(class_names):
        if label == 0:
            continue
        inside = mask == label
        n = int(np.count_nonzero(inside))
        entry = {"label": label, "voxels": n, "volume_ml": _round(n * voxel_ml, 4)}
        if n:
            values = hu[inside].astype(np.float64)
            entry["hu"] = {"mean": _round(values.mean(), 2), "sd": _round(values.std(), 2),
                           "min": _round(values.min(), 1), "max": _round(values.max(), 1)}
        else:
            entry["hu"] = {"mean": None, "sd": None, "min": None, "max": None}
        if is_lesion_class(name):
            entry["lesions"] = _lesions(canonical.data == label, canonical.affine, voxel_ml)
        classes[name] = entry
    out = {"format": FORMAT}
    if input_name is not None:
        out["input"] = str(input_name)
    out.update({"voxel_volume_ml": _round(voxel_ml, 8),
                "spacing_mm": [_round(v, 4) for v in canonical.spacing], "classes": classes})
    return out


def _lesions(lesion: np.ndarray, affine: np.ndarray, voxel_ml: float) -> dict:
    from .postprocess import foreground_box

    box = foreground_box(lesion)           # components are found inside the lesions' bounding box only
    if box is None:
        return {"count": 0, "largest_volume_ml": None, "largest_diameter_mm": None}
    components, count = ndimage.label(np.ascontiguousarray(lesion[box]), structure=_STRUCTURE)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    box = ndimage.find_objects(components, max_label=largest)[largest - 1]   # distances ignore the offset
    diameter = longest_in_plane_diameter_mm(components[box] == largest, affine)
    return {"count": int(count), "largest_volume_ml": _round(sizes[largest] * voxel_ml, 4),
            "largest_diameter_mm": _round(diameter, 2)}


def write_statistics(path: str | os.PathLike, statistics: dict) -> Path:
    """Write the statistics as JSON atomically."""
    atomic_write_text(path, json.dumps(statistics, indent=2) + "\n")
    return Path(path)

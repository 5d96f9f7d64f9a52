"""`--preview PNG`: a montage of axial slices with the mask overlaid, for a quick plausibility check.

Slices are taken from the canonical (RAS) volume, shown in radiological convention (patient's
right on the image's left, anterior up), evenly spaced over the slices that hold any label.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .atomic import atomic_path
from .errors import require
from .orientation import slice_geometry, to_canonical
from .preprocess import window_and_scale

# RGB per label 1, 2, 3, ...; background is left transparent
COLOURS = np.array([[0, 200, 0], [230, 30, 30], [40, 120, 255], [255, 200, 0], [200, 0, 200]], dtype=np.float32)


def _display(slice_xy: np.ndarray) -> np.ndarray:
    return slice_xy.T[::-1, ::-1]


def montage(hu: np.ndarray, mask: np.ndarray, affine, window, n_slices: int = 12, alpha: float = 0.45,
            axial_axis: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 montage of up to `n_slices` axial slices of `hu` with `mask` overlaid, sliced
    as the segmentation was (`axial_axis`: the voxel axis taken as axial, default the closest)."""
    ornt = slice_geometry(affine, axial_axis).ornt
    image = to_canonical(np.asarray(hu, dtype=np.float32), affine, ornt=ornt).data
    labels = to_canonical(np.asarray(mask), affine, ornt=ornt).data
    z = image.shape[2]
    with_labels = np.flatnonzero(labels.reshape(-1, z).any(axis=0))
    candidates = with_labels if with_labels.size else np.arange(z)
    picks = np.unique(candidates[np.linspace(0, candidates.size - 1, min(n_slices, candidates.size)).round().astype(int)])
    tiles = []
    for k in picks:
        grey = (window_and_scale(image[:, :, k], window) + 1.0) * 127.5
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        lab = labels[:, :, k].astype(np.int64)
        for label in range(1, int(lab.max()) + 1):
            sel = lab == label
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * COLOURS[(label - 1) % len(COLOURS)]
        tiles.append(np.stack([_display(rgb[..., c]) for c in range(3)], axis=-1))
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((rows * h, cols * w, 3), dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return np.clip(sheet, 0, 255).astype(np.uint8)


def write_preview(path: str | os.PathLike, hu: np.ndarray, mask: np.ndarray, affine, window, n_slices: int = 12,
                  axial_axis: int | None = None) -> None:
    """Write the montage as PNG atomically."""
    pil = require("PIL.Image", purpose="--preview")
    sheet = montage(hu, mask, affine, window, n_slices, axial_axis=axial_axis)
    with atomic_path(path, suffix="") as tmp:
        pil.fromarray(sheet).save(tmp, format="PNG")

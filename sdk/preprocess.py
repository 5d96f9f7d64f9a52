"""Pre- and post-processing shared by training and the runtime, so both see identical slices.

Slices come from a canonical volume (x, y, z) as an array (z, x, y). Intensities are clipped to
a HU window and scaled to [-1, 1]. In-plane resizing is separable linear interpolation done as
two matrix products per slice (half-pixel centres, like torch's bilinear with
align_corners=False): it goes through BLAS, which is several times faster than
scipy.ndimage.zoom on 512x512 slices and matters for the share of time outside inference.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def window_and_scale(hu: np.ndarray, window) -> np.ndarray:
    """Clip HU to [lo, hi] and scale linearly to [-1, 1] (float32)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"HU window must have hi > lo, got {window}")
    out = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    out -= (lo + hi) / 2.0
    out *= 2.0 / (hi - lo)
    return out


@lru_cache(maxsize=64)
def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix M with M @ v = v linearly resampled to n_out samples (half-pixel centres)."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == n_out:
        np.fill_diagonal(m, 1.0)
        return m
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (pos - i0).astype(np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    m.setflags(write=False)
    return m


def resize_slices(slices: np.ndarray, size) -> np.ndarray:
    """Linearly resize the last two axes of `slices` (..., X, Y) to `size` (H, W); float32."""
    slices = np.asarray(slices, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    x, y = slices.shape[-2:]
    if (x, y) == (h, w):
        return slices
    a = linear_resize_matrix(x, h)          # (H, X)
    b = linear_resize_matrix(y, w)          # (W, Y)
    return np.matmul(np.matmul(a, slices), b.T)


def resize_labels_nearest(labels: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes of an integer label array to `size`."""
    labels = np.asarray(labels)
    h, w = int(size[0]), int(size[1])
    x, y = labels.shape[-2:]
    if (x, y) == (h, w):
        return labels
    ri = np.minimum(((np.arange(h) + 0.5) * (x / h)).astype(np.int64), x - 1)
    ci = np.minimum(((np.arange(w) + 0.5) * (y / w)).astype(np.int64), y - 1)
    return labels[..., ri[:, None], ci[None, :]]


def volume_to_slices(canonical: np.ndarray) -> np.ndarray:
    """(x, y, z) canonical volume -> (z, x, y) stack of axial slices."""
    return np.moveaxis(canonical, 2, 0)


def slices_to_volume(slices: np.ndarray) -> np.ndarray:
    """(z, x, y) stack of axial slices -> (x, y, z) canonical volume."""
    return np.ascontiguousarray(np.moveaxis(slices, 0, 2))


def preprocess_slices(hu_slices: np.ndarray, window, input_size) -> np.ndarray:
    """(z, x, y) HU slices -> (z, 1, H, W) float32 network input."""
    return resize_slices(window_and_scale(hu_slices, window), input_size)[:, None]


def logits_to_labels(logits: np.ndarray, out_size) -> np.ndarray:
    """(n, C, H, W) logits -> (n, X, Y) uint8 labels: resize the logits back, then argmax."""
    resized = resize_slices(logits, out_size)
    return np.argmax(resized, axis=1).astype(np.uint8)

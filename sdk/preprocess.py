"""Pre- and post-processing shared by training and the runtime, so both see identical slices.

Slices come from a canonical volume (x, y, z) as an array (z, x, y). Intensities are clipped to
a HU window and scaled to [-1, 1]. In-plane resizing is separable linear interpolation with
half-pixel centres (the bilinear resize of training, align_corners=False, no antialiasing). It is written
here because the libraries at hand do not fit: scipy.ndimage.zoom has other edge conventions
and is slow on 512x512 slices, and the SDK may not import the training framework. Each axis is a gather of the
two neighbours and a weighted sum, which is memory-bound and cheap.

`logits_to_labels` gives exactly argmax(resize(logits)) but interpolates only where it can
matter: linear interpolation weights are non-negative, so where the argmax is the same at all
four source pixels of an output pixel, the interpolated argmax is that label too. Only output
pixels on a label boundary are interpolated (a few percent of a CT slice).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import InputError


def window_and_scale(hu: np.ndarray, window) -> np.ndarray:
    """Clip HU to [lo, hi] and scale linearly to [-1, 1] (float32)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise InputError(f"HU window must have hi > lo, got {window}")
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


@lru_cache(maxsize=64)
def _linear_taps(n_in: int, n_out: int):
    """Source indices i0, i1 and weight w1 of each output sample (half-pixel centres, clamped)."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resize_axis_linear(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linearly resample one axis of float32 `x` to n_out samples (half-pixel centres)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    i0, i1, w1 = _linear_taps(n_in, n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w1 = w1.reshape(shape)
    a, b = _pick(x, i0, axis), _pick(x, i1, axis)
    b = b - a
    b *= w1
    return a + b


def _pick(x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """x's entries at `index` along `axis`: a strided view when the indices are evenly spaced
    (integer scale factors, e.g. 512 -> 128), which saves a gather; np.take otherwise."""
    step = int(index[1] - index[0]) if index.size > 1 else 1
    if step > 0 and np.array_equal(index, index[0] + step * np.arange(index.size)):
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(int(index[0]), int(index[-1]) + 1, step)
        return x[tuple(sl)]
    return np.take(x, index, axis=axis)


def resize_slices(slices: np.ndarray, size) -> np.ndarray:
    """Linearly resize the last two axes of `slices` (..., X, Y) to `size` (H, W); float32.

    Bit-identical whatever the memory layout of `slices` (C order, Fortran order, any flip or
    permutation view): the order of the two passes is decided from the shape alone, and each pass
    is elementwise arithmetic, which gives the same float for the same inputs however it is strided.
    (It was once decided after looking at the strides, so a square slice resized to a square size
    went x-then-y in C order and y-then-x in Fortran order: results 1 ulp apart, enough to flip
    int8 quantisation steps and change masks.)"""
    slices = np.asarray(slices, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    x, y = slices.shape[-2:]
    if (x, y) == (h, w):
        return slices
    x_first = h * y <= x * w          # shrink first so the second pass moves less memory
    if slices.ndim >= 2 and slices.strides[-2] < slices.strides[-1]:
        # slices stored x-fastest (NIfTI's order): resample the transposed view, whose last axis is
        # the contiguous one, and transpose the small result back (1.4-10x faster than gathering
        # across the stride); the same passes in the same order, on the other axis numbers
        out = _resize_two_axes(np.swapaxes(slices, -1, -2), (w, h), first_is_rows=not x_first)
        return np.ascontiguousarray(np.swapaxes(out, -1, -2))
    return _resize_two_axes(slices, (h, w), first_is_rows=x_first)


def _resize_two_axes(slices: np.ndarray, size, first_is_rows: bool) -> np.ndarray:
    """Resize axis -2 to size[0] and axis -1 to size[1], axis -2 first when `first_is_rows`."""
    rows, cols = slices.ndim - 2, slices.ndim - 1
    if first_is_rows:
        return resize_axis_linear(resize_axis_linear(slices, rows, int(size[0])), cols, int(size[1]))
    return resize_axis_linear(resize_axis_linear(slices, cols, int(size[1])), rows, int(size[0]))


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
    """(z, x, y) stack of axial slices -> (x, y, z) canonical volume (a view)."""
    return np.moveaxis(slices, 0, 2)


def preprocess_slices(hu_slices: np.ndarray, window, input_size) -> np.ndarray:
    """(z, x, y) HU slices -> (z, 1, H, W) float32 network input."""
    return resize_slices(window_and_scale(hu_slices, window), input_size)[:, None]


def logits_to_labels(logits: np.ndarray, out_size) -> np.ndarray:
    """(n, C, H, W) logits -> (n, X, Y) uint8 labels: argmax of the logits linearly resized to (X, Y).

    Exact, and cheap: outside the bounding box of non-zero labels every source pixel says 0, and
    inside it only pixels whose four source pixels disagree are interpolated."""
    logits = np.asarray(logits, dtype=np.float32)
    n, c, h, w = logits.shape
    x, y = int(out_size[0]), int(out_size[1])
    low = np.argmax(logits, axis=1).astype(np.uint8)                  # (n, H, W)
    if (h, w) == (x, y):
        return low
    out = np.zeros((n, x, y), dtype=np.uint8)
    rows_any, cols_any = np.nonzero(low.any(axis=(0, 2)))[0], np.nonzero(low.any(axis=(0, 1)))[0]
    if rows_any.size == 0:
        return out
    r0, r1, wr = _linear_taps(h, x)
    c0, c1, wc = _linear_taps(w, y)
    # output rows/columns with a source pixel inside the foreground's box (contiguous: taps are monotonic)
    rows = np.nonzero((r1 >= rows_any[0]) & (r0 <= rows_any[-1]))[0]
    cols = np.nonzero((c1 >= cols_any[0]) & (c0 <= cols_any[-1]))[0]
    rs, cs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    r0, r1, wr, c0, c1, wc = r0[rs], r1[rs], wr[rs], c0[cs], c1[cs], wc[cs]
    rows0, rows1 = low[:, r0], low[:, r1]                             # (n, rows, W)
    box = rows0[:, :, c0]                                             # (n, rows, cols)
    mixed = box != rows0[:, :, c1]
    mixed |= box != rows1[:, :, c0]
    mixed |= box != rows1[:, :, c1]
    k, i, j = np.nonzero(mixed)
    if k.size:
        ri0, ri1, wi = r0[i], r1[i], wr[i][:, None]
        cj0, cj1, wj = c0[j], c1[j], wc[j][:, None]
        chan = logits.transpose(0, 2, 3, 1)                           # (n, H, W, C) view
        top = chan[k, ri0, cj0] * (1 - wj) + chan[k, ri0, cj1] * wj
        bottom = chan[k, ri1, cj0] * (1 - wj) + chan[k, ri1, cj1] * wj
        box[k, i, j] = np.argmax(top * (1 - wi) + bottom * wi, axis=1)
    out[:, rs, cs] = box
    return out

"""Building blocks of the CT phantoms: a physical-mm voxel grid, smooth random fields, implicit
shapes (approximate signed distances in mm) and a canvas that paints them with soft edges.

Everything is vectorised numpy: smooth fields are drawn on a coarse grid and upsampled with
separable linear-interpolation matrices (BLAS matmuls, the same resampling as
`regionkd.sdk.preprocess`), shapes are evaluated only inside their bounding boxes. That keeps a
512x512x100 phantom within a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from regionkd.sdk.preprocess import linear_resize_matrix, resize_axis_linear


@dataclass
class Grid:
    """Voxel centres in mm along the canonical (R, A, S) axes."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)   # mm, exact (the float32 axes are rounded)
    origin: tuple = (0.0, 0.0, 0.0)

    @classmethod
    def make(cls, shape, spacing, origin) -> "Grid":
        axes = [(o + s * np.arange(n)).astype(np.float32) for n, s, o in zip(shape, spacing, origin)]
        return cls(*axes, spacing=tuple(float(s) for s in spacing), origin=tuple(float(o) for o in origin))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    @property
    def affine(self) -> np.ndarray:
        aff = np.eye(4)
        aff[:3, :3] = np.diag(self.spacing)
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo, hi):
        """Index slices of the voxels whose centres lie in [lo, hi] (mm), or None if empty."""
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)


def upsample_separable(coarse: np.ndarray, shape) -> np.ndarray:
    """Linear upsampling of a small 3D array to `shape`, one axis at a time: a matrix product
    for short coarse axes (BLAS), a two-neighbour gather for long ones."""
    t = coarse.astype(np.float32)
    for axis in (2, 0, 1):
        n_in, n_out = t.shape[axis], int(shape[axis])
        if n_in == n_out:
            continue
        if n_in <= 4:
            m = linear_resize_matrix(n_in, n_out)
            t = np.moveaxis(np.tensordot(t, m, axes=([axis], [1])), -1, axis)
        else:
            t = resize_axis_linear(t, axis, n_out)
    return np.ascontiguousarray(t)


def smooth_field(rng: np.random.Generator, x, y, z, wavelength_mm: float) -> np.ndarray:
    """A smooth random field with about unit standard deviation over the voxel centres x, y, z
    (1D mm arrays); its features are about `wavelength_mm` across whatever the spacing."""
    step = wavelength_mm / 4.0
    n = (len(x), len(y), len(z))
    extent = [float(a[-1] - a[0]) if len(a) > 1 else 0.0 for a in (x, y, z)]
    # no point in a coarse grid finer than the voxels themselves
    counts = [max(3, min(int(np.ceil(e / step)) + 2, n_i + 2)) for e, n_i in zip(extent, n)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(counts), sigma=1.0, mode="reflect")
    coarse /= coarse.std() + 1e-12
    return upsample_separable(coarse, n)


def ellipse_sdf(xw, yw, cx, cy, a, b, angle=0.0):
    """Approximate signed distance (mm) to an in-plane ellipse (a z-extruded cylinder).
    cx, cy, a, b may be arrays broadcasting along z (shapes that change with height)."""
    inv_a = np.float32(1.0) / np.asarray(a, dtype=np.float32)
    inv_b = np.float32(1.0) / np.asarray(b, dtype=np.float32)
    if angle:
        dx, dy = xw - cx, yw - cy
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        rx = (c * dx + s * dy) * inv_a
        ry = (c * dy - s * dx) * inv_b
    else:
        rx = xw - np.float32(cx) if np.isscalar(cx) else xw - cx
        rx *= inv_a
        ry = yw - np.float32(cy) if np.isscalar(cy) else yw - cy
        ry *= inv_b
    rx *= rx
    ry *= ry
    rx += ry
    np.sqrt(rx, out=rx)
    rx -= 1.0
    rx *= np.minimum(a, b).astype(np.float32) if not np.isscalar(a) else np.float32(min(a, b))
    return rx


def ellipsoid_sdf(xw, yw, zz, center, semi, angle=0.0, tilt=(0.0, 0.0)):
    """Approximate signed distance (mm) to an ellipsoid rotated by `angle` in-plane whose centre
    drifts by `tilt` mm per mm of height."""
    cx, cy, cz = center
    a, b, c = semi
    dz = zz - cz
    dx = xw - (cx + tilt[0] * dz)
    dy = yw - (cy + tilt[1] * dz)
    co, si = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    rx = (co * dx + si * dy) / a
    ry = (co * dy - si * dx) / b
    rz = dz / c
    return (np.sqrt(rx * rx + ry * ry + rz * rz) - 1.0) * min(a, b, c)


def capsule_sdf(xw, yw, zz, p0, p1, r0, r1):
    """Signed distance (mm) to a tapered tube from p0 (radius r0) to p1 (radius r1)."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    d = p1 - p0
    dd = float(d @ d) + 1e-6
    px, py, pz = xw - p0[0], yw - p0[1], zz - p0[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
    qx, qy, qz = px - t * d[0], py - t * d[1], pz - t * d[2]
    return np.sqrt(qx * qx + qy * qy + qz * qz) - (r0 + (r1 - r0) * t)


class Canvas:
    """The clean HU volume, the tissue-id volume and the warped coordinates shapes are drawn in."""

    def __init__(self, grid: Grid, xw: np.ndarray, yw: np.ndarray, background_hu: float = -1000.0):
        self.grid = grid
        self.xw, self.yw = xw, yw                       # warped in-plane coordinates, (X, Y, Z) mm
        self.hu = np.full(grid.shape, background_hu, dtype=np.float32)
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)
        self.pixel = float(min(grid.spacing[:2]))

    def coords(self, box):
        """Warped x, y and plain z of a box, ready for the *_sdf functions."""
        return self.xw[box], self.yw[box], self.grid.z[box[2]][None, None, :]

    def box_around(self, center, radius):
        lo = [c - r for c, r in zip(center, np.broadcast_to(radius, 3))]
        hi = [c + r for c, r in zip(center, np.broadcast_to(radius, 3))]
        return self.grid.box(lo, hi)

    def paint(self, box, f, tissue_id, value, edge=None, where=None):
        """Blend `value` (scalar or box-shaped) into the box where f < 0, with a linear ramp
        `edge` mm wide across f = 0 (default: one pixel, i.e. anti-aliased but sharp), and mark
        f < 0 as `tissue_id`. `where` (box-shaped bool) restricts both."""
        edge = self.pixel if edge is None else max(float(edge), 1e-3)
        w = f * np.float32(-1.0 / edge)
        w += np.float32(0.5)
        np.clip(w, 0.0, 1.0, out=w)
        if where is not None:
            w *= where
        hu = self.hu[box]
        delta = np.asarray(value, dtype=np.float32) - hu
        delta *= w
        hu += delta
        inside = f < 0
        if where is not None:
            inside &= where
        self.tissue[box][inside] = tissue_id
        return inside

    def tissue_in(self, box, ids) -> np.ndarray:
        return np.isin(self.tissue[box], np.asarray(ids, dtype=np.uint8))

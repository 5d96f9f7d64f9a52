"""Synthetic abdominal CT phantoms for the liver (LiTS-like) and kidney (KiTS19-like) tasks.

Real LiTS/KiTS19 cannot be downloaded here, so demos, tests and benchmarks run on these. They
are built to be capacity-limited rather than noise-limited: cysts and vessels inside the organ
that are labelled organ, neighbours touching it at nearly its density, a contrast phase that
changes per case, tumours that are darker, brighter or rim-enhancing.

Geometry is in mm, so organ sizes do not depend on the voxel size. The field of view is that of
a 512-matrix scan at 0.6-0.9 mm; a smaller matrix gets proportionally larger voxels, as if the
scan were downsampled. Slices are 1-5 mm thick, thicker when there are too few of them to cover
120 mm. The image is point-sampled, blurred along z (slice profile / partial volume), gets a
smooth low-frequency bias and slightly in-plane-correlated Gaussian noise (sigma 10-25 HU, mean
15, so that most cases are limited by the confounders rather than by noise), and is
stored as int16 HU like a real scan. The noise sigma is that of the 512 matrix: a smaller matrix,
being the same scan downsampled, gets it divided by 512/n as averaging would. Everything is drawn from one numpy Generator: the same seed
gives the same voxels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import ConfigError
from .phantom_anatomy import KIDNEY_IDS, LIVER_IDS, T, draw_palette, paint_anatomy
from .phantom_fields import Canvas, Grid, smooth_field
from .phantom_lesions import (paint_kidney_cysts, paint_kidney_tumours, paint_liver_tumours,
                              paint_liver_vessels_and_cysts)
from .tasks import get_task

DEFAULT_SHAPE = (256, 256, 48)
REFERENCE_MATRIX = 512          # in-plane matrix the 0.6-0.9 mm spacing refers to
MIN_Z_COVERAGE_MM = 120.0
FOV_CENTRE_Z = {"liver": -5.0, "kidney": -55.0}   # mm, the organ's height in the phantom frame


@dataclass
class Phantom:
    """One synthetic case in canonical RAS voxel order (x, y, z)."""

    task: str
    hu: np.ndarray            # int16 HU
    label: np.ndarray         # uint8, the task's label convention (0 background, 1 organ, 2 tumour)
    tissue: np.ndarray        # uint8 tissue ids (phantom_anatomy.T), for tests and diagnostics
    affine: np.ndarray        # canonical affine (diagonal spacing, RAS)
    info: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.abs(np.diag(self.affine)[:3]))


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for case `index` of a dataset made with `seed` (independent streams)."""
    return np.random.default_rng([int(seed), int(index)])


def draw_geometry(rng: np.random.Generator, task: str, shape) -> Grid:
    nx, ny, nz = (int(v) for v in shape)
    inplane = rng.uniform(0.6, 0.9) * max(1.0, REFERENCE_MATRIX / max(nx, ny))
    lo = max(1.0, MIN_Z_COVERAGE_MM / nz)
    dz = rng.uniform(lo, max(5.0, 1.5 * lo))
    zc = FOV_CENTRE_Z[task] + rng.uniform(-15.0, 15.0)
    origin = (-(nx - 1) / 2 * inplane + rng.uniform(-10, 10), -(ny - 1) / 2 * inplane + rng.uniform(-10, 10),
              zc - (nz - 1) / 2 * dz)
    return Grid.make(shape, (inplane, inplane, dz), origin)


def _fields(rng, grid: Grid) -> dict:
    x, y, z = grid.x, grid.y, grid.z
    out = {
        "texture": smooth_field(rng, x, y, z, 7.0),
        "shape": smooth_field(rng, x, y, z, 45.0),
    }
    bowel_rng = np.random.default_rng(rng.integers(2**63))

    def bowel(box):
        bx, by, bz = x[box[0]], y[box[1]], z[box[2]]
        return smooth_field(bowel_rng, bx, by, bz, 40.0), smooth_field(bowel_rng, bx, by, bz, 18.0)

    out["bowel"] = bowel
    return out


def _warped_coordinates(rng, grid: Grid):
    """In-plane coordinates displaced by a smooth random field (shapes vary per case and along z)."""
    amp = rng.uniform(4.0, 9.0)
    xw = smooth_field(rng, grid.x, grid.y, grid.z, 90.0)
    xw *= amp
    xw += grid.x[:, None, None]
    yw = smooth_field(rng, grid.x, grid.y, grid.z, 90.0)
    yw *= amp
    yw += grid.y[None, :, None]
    return xw, yw


def _gaussian_kernel_norm(sigma: float, truncate: float = 4.0) -> float:
    """L2 norm of scipy's 1D Gaussian kernel: how much filtering shrinks white noise's std."""
    radius = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sqrt((k ** 2).sum()))


def _image_formation(rng, canvas: Canvas, grid: Grid) -> tuple[np.ndarray, dict]:
    hu = canvas.hu
    hu[:] = ndimage.gaussian_filter1d(hu, sigma=0.45, axis=2, mode="nearest", truncate=2.5)  # slice profile
    bias_amp = rng.uniform(4.0, 12.0)
    bias = smooth_field(rng, grid.x, grid.y, grid.z, 250.0)
    bias *= bias_amp
    hu += bias
    del bias
    sigma = 10.0 + 15.0 * rng.uniform() ** 2        # 10-25 HU at the 512 matrix, more often low: mean 15
    # a smaller matrix is the 512 scan downsampled: each voxel averages (512/n)^2 of its pixels, so
    # its noise is smaller by 512/n (per axis); without this a 160 matrix would be 3x too noisy
    voxel_sigma = sigma * min(1.0, float(np.sqrt(grid.shape[0] * grid.shape[1])) / REFERENCE_MATRIX)
    corr = 0.5                                                                    # in-plane noise correlation, px
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(corr, corr, 0.0), truncate=2.0)
    noise *= voxel_sigma / _gaussian_kernel_norm(corr, truncate=2.0) ** 2
    hu += noise
    del noise
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return np.rint(hu).astype(np.int16), {"noise_sigma_hu": sigma, "voxel_noise_sigma_hu": voxel_sigma,
                                          "bias_amplitude_hu": bias_amp}


def tissue_to_label(tissue: np.ndarray, task: str) -> np.ndarray:
    """The task's label map from the tissue map: organ (with its cysts and vessels) 1, tumour 2."""
    lut = np.zeros(256, dtype=np.uint8)
    organ, tumour = (LIVER_IDS, T.LIVER_TUMOUR) if task == "liver" else (KIDNEY_IDS, T.KIDNEY_TUMOUR)
    lut[list(organ)] = 1
    lut[tumour] = 2
    return lut[tissue]


def generate_phantom(task: str = "liver", shape=DEFAULT_SHAPE, seed=0, index: int = 0,
                     rng: np.random.Generator | None = None, min_lesion_mm: float = 0.0,
                     lesion_contrast: float = 1.0) -> Phantom:
    """Generate one phantom case. `seed` and `index` pick the case (see `case_rng`); pass `rng`
    to draw from a generator of your own instead. `min_lesion_mm` raises the smallest tumour
    diameter (liver 3-40 mm, kidney 12-80 mm by default): coarse CPU runs (about 3 mm pixels)
    cannot see lesions of one or two pixels, so their demos and benchmarks draw larger ones.
    `lesion_contrast` scales liver lesions' HU difference to the liver (kidney masses are drawn
    from their own enhancement model and ignore it)."""
    if not lesion_contrast > 0:
        raise ConfigError(f"lesion_contrast must be positive, got {lesion_contrast}")
    get_task(task)
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"phantom shape must be three sizes of at least 8 voxels, got {shape}")
    rng = case_rng(seed, index) if rng is None else rng
    grid = draw_geometry(rng, task, shape)
    pal = draw_palette(rng)
    xw, yw = _warped_coordinates(rng, grid)
    fields = _fields(rng, grid)
    canvas = Canvas(grid, xw, yw)
    geo = paint_anatomy(canvas, rng, pal, fields)
    tex = fields["texture"]
    paint_liver_vessels_and_cysts(canvas, rng, pal, geo, tex)
    paint_kidney_cysts(canvas, rng, pal, geo, tex)
    if task == "liver":
        tumours = paint_liver_tumours(canvas, rng, pal, geo, tex, min_lesion_mm, lesion_contrast)
    else:
        tumours = paint_kidney_tumours(canvas, rng, pal, geo, tex, min_lesion_mm)
    del xw, yw, fields, tex
    canvas.xw = canvas.yw = canvas.cavity = None
    hu, noise_info = _image_formation(rng, canvas, grid)
    label = tissue_to_label(canvas.tissue, task)
    info = {"task": task, "spacing_mm": list(grid.spacing), "phase": pal["phase"], "liver_hu": pal["liver"],
            "kidney_cortex_hu": pal["cortex"], "tumours": tumours, **noise_info}
    return Phantom(task=task, hu=hu, label=label, tissue=canvas.tissue, affine=grid.affine, info=info)


def write_phantoms(out, task: str = "liver", layout: str | None = None, cases: int = 4, seed: int = 0,
                   shape=DEFAULT_SHAPE, min_lesion_mm: float = 0.0, lesion_contrast: float = 1.0,
                   images_only: bool = False, progress=None) -> dict:
    """Write `cases` phantoms (case i drawn from (seed, i)) to `out` in a public dataset's layout
    (default: lits for liver, kits19 for kidney), or with `images_only` as a plain folder of CT
    images without labels. The dataset is built in a temporary folder and then replaces `out`.
    `progress(1)` after each case. Returns {"layout", "case_ids", "tumours"}."""
    from regionkd.sdk.atomic import atomic_directory

    from .layouts import write_case, write_dataset_json, write_image

    layout = layout or ("kits19" if task == "kidney" else "lits")
    ids, tumours = [], 0
    with atomic_directory(out, overwrite=True) as tmp:
        for i in range(cases):
            p = generate_phantom(task, shape, seed=seed, index=i, min_lesion_mm=min_lesion_mm,
                                 lesion_contrast=lesion_contrast)
            if images_only:
                ids.append(write_image(tmp / f"ct-{i:04d}.nii.gz", layout, p.hu, p.affine))
            else:
                ids.append(write_case(tmp, layout, i, p.hu, p.label, p.affine, task=task))
            tumours += len(p.info["tumours"])
            if progress is not None:
                progress(1)
        if layout == "msd" and not images_only:
            write_dataset_json(tmp, task, ids, description=f"regionkd phantoms, seed {seed}, shape {shape}")
    return {"layout": layout, "case_ids": ids, "tumours": tumours}

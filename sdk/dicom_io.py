"""Read a DICOM CT series folder into a nibabel image (needs the `dicom` extra: pydicom).

HU = stored value * RescaleSlope + RescaleIntercept, per slice. Geometry comes from
ImageOrientationPatient (row and column direction cosines) and ImagePositionPatient, with
slices sorted along the slice normal, so file names and order on disk do not matter.
DICOM patient coordinates are LPS; the affine returned is RAS (NIfTI's convention).
Voxel (i, j, k) is column i, row j of the k-th slice along the normal.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, require

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read_slices(folder: Path, pydicom):
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # DICOMDIR-less folders often hold README or thumbnails
        except Exception as exc:  # truncated files raise various errors inside pydicom
            raise InputError(f"DICOM file {path}: cannot be read ({exc})") from exc
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue
        slices.append((path, ds))
    return slices


def read_dicom_series(folder: str | os.PathLike) -> nib.Nifti1Image:
    """A float32 HU Nifti1Image in RAS world coordinates from one DICOM series in `folder`."""
    pydicom = require("pydicom", extra="dicom", purpose="reading DICOM series")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM series {folder}: not a folder")
    slices = _read_slices(folder, pydicom)
    if not slices:
        raise InputError(f"DICOM series {folder}: no DICOM image slices found")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise InputError(f"DICOM series {folder}: holds {len(series)} series; put each series in its own folder")
    if len(slices) < 2:
        raise InputError(f"DICOM series {folder}: only one slice; a CT volume needs at least two")

    first = slices[0][1]
    orient = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    shape2d = (int(first.Rows), int(first.Columns))
    for path, ds in slices:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient, atol=1e-4):
            raise InputError(f"DICOM file {path}: ImageOrientationPatient differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != shape2d:
            raise InputError(f"DICOM file {path}: {ds.Rows}x{ds.Columns} pixels, the series has {shape2d[0]}x{shape2d[1]}")

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    order = np.argsort(positions @ normal)
    positions = positions[order]
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-3):
        raise InputError(f"DICOM series {folder}: two slices share one position along the slice normal")
    if np.ptp(steps) > 0.01 * steps.mean() + 1e-3:
        raise InputError(f"DICOM series {folder}: slice spacing varies ({steps.min():.3f}-{steps.max():.3f} mm); "
                         "resample the series to uniform spacing first")

    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    volume = np.empty((shape2d[1], shape2d[0], len(slices)), dtype=np.float32)  # (columns, rows, slices)
    for k, idx in enumerate(order):
        path, ds = slices[idx]
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        pixels = ds.pixel_array.astype(np.float32) * slope + intercept
        volume[:, :, k] = pixels.T

    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing        # i: along a row, column index increases
    lps[:3, 1] = col_dir * row_spacing        # j: down a column, row index increases
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    image = nib.Nifti1Image(volume, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image

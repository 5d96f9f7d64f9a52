"""Read a DICOM CT series (a folder, or datasets retrieved from a PACS) into a nibabel image
(needs the `dicom` extra: pydicom); `load_dicom_series` also keeps the slices' headers, which a
DICOM SEG of the result references. A series whose Modality is not CT is refused.

HU = stored value * RescaleSlope + RescaleIntercept, per slice. Geometry comes from
ImageOrientationPatient (row and column direction cosines) and ImagePositionPatient, with
slices sorted along the slice normal, so file names and order on disk do not matter.
DICOM patient coordinates are LPS; the affine returned is RAS (NIfTI's convention).
Voxel (i, j, k) is column i, row j of the k-th slice along the normal.

The rule for what a folder holds: files that are not DICOM (a README, a thumbnail), hidden files
and DICOM files without pixel data (structured reports, DICOMDIR) are skipped. Every other file
is an image slice and must carry REQUIRED (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, Rows, Columns, RescaleSlope, RescaleIntercept: all Type 1 in the CT Image IOD) with
well-formed values, and pixel data of its declared size; a slice that does not is an InputError
naming the file and what is wrong. Nothing is guessed: a missing RescaleIntercept read as 0 would
put every voxel 1024 HU off, a slice without orientation cannot be placed.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, require
from .nifti_bounds import DEFAULT_MAX_VOXELS

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: attribute -> number of values every image slice must carry
REQUIRED = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2, "Rows": 1, "Columns": 1,
            "RescaleSlope": 1, "RescaleIntercept": 1}


def _numbers(ds, path: Path, name: str, count: int) -> np.ndarray:
    """The attribute's values as float64, exactly `count` finite numbers, or InputError naming the file."""
    if name not in ds or ds.get(name) is None or ds.get(name) == "":
        raise InputError(f"DICOM file {path}: no {name}; every image slice of a CT series needs it "
                         "(nothing is guessed in its place)")
    value = ds.get(name)
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"DICOM file {path}: {name} {value!r} is not numeric") from None
    if out.size != count or not np.all(np.isfinite(out)):
        raise InputError(f"DICOM file {path}: {name} {value!r} must be {count} finite number(s)")
    return out


def _geometry(ds, path: Path) -> dict:
    g = {name: _numbers(ds, path, name, n) for name, n in REQUIRED.items()}
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputError(f"DICOM file {path}: a multi-frame image ({ds.NumberOfFrames} frames); one slice per file is read")
    if g["Rows"][0] < 1 or g["Columns"][0] < 1 or np.any(g["PixelSpacing"] <= 0) or g["RescaleSlope"][0] == 0:
        raise InputError(f"DICOM file {path}: Rows/Columns, PixelSpacing or RescaleSlope not positive")
    row_dir, col_dir = g["ImageOrientationPatient"][:3], g["ImageOrientationPatient"][3:]
    if not (abs(np.linalg.norm(row_dir) - 1) < 1e-3 and abs(np.linalg.norm(col_dir) - 1) < 1e-3
            and abs(float(row_dir @ col_dir)) < 1e-3):
        raise InputError(f"DICOM file {path}: ImageOrientationPatient {g['ImageOrientationPatient'].tolist()} is not "
                         "two orthogonal unit vectors")
    return g


def _read_slices(folder: Path, pydicom):
    from .atomic import is_temp_name

    slices = []
    for path in sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and not is_temp_name(p.name)):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # DICOMDIR-less folders often hold README or thumbnails
        except Exception as exc:  # truncated files raise various errors inside pydicom
            raise InputError(f"DICOM file {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
        if "PixelData" not in ds:
            continue  # a DICOM object that is not an image (report, presentation state)
        slices.append((path, ds, _geometry(ds, path)))
    return slices


def _header_only(ds):
    """A new dataset with every element of `ds` but its pixel data (the caller's `ds` is unchanged)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for elem in ds:
        if elem.keyword != "PixelData":
            out.add(elem)
    if getattr(ds, "file_meta", None) is not None:
        out.file_meta = ds.file_meta
    return out


def _pixels(ds, path: Path, shape2d) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom: ValueError for short pixel data, others for odd encodings
        raise InputError(f"DICOM file {path}: its pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
                         "truncated or corrupt?") from exc
    if pixels.shape != shape2d:
        raise InputError(f"DICOM file {path}: pixel data of shape {pixels.shape}, Rows x Columns say {shape2d}")
    return pixels


@dataclass
class DicomSeries:
    """A CT series read into a volume: `image` (float32 HU, RAS) and the slices' headers in the
    volume's slice order (`datasets[k]` is slice k; pixel data dropped once decoded), which a
    DICOM SEG of the result must reference."""
    image: nib.Nifti1Image
    datasets: list
    where: str

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].get("StudyInstanceUID", ""))

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].get("SeriesInstanceUID", ""))

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def read_dicom_series(folder: str | os.PathLike, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> nib.Nifti1Image:
    """A float32 HU Nifti1Image in RAS world coordinates from one DICOM series in `folder`
    (see the module doc for what must be in it); more than `max_voxels` voxels are refused before
    any pixel data is decoded."""
    return load_dicom_series(folder, max_voxels=max_voxels).image


def load_dicom_series(folder: str | os.PathLike, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> DicomSeries:
    """Like `read_dicom_series`, with the slices' headers (`DicomSeries`)."""
    pydicom = require("pydicom", extra="dicom", purpose="reading DICOM series")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM series {folder}: not a folder")
    return _assemble(_read_slices(folder, pydicom), str(folder), max_voxels)


def series_from_datasets(datasets, where: str, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> DicomSeries:
    """A `DicomSeries` from datasets already in memory (e.g. retrieved over DICOMweb); `where`
    names them in messages. Datasets without pixel data are skipped, as in a folder."""
    slices = []
    for n, ds in enumerate(datasets):
        if "PixelData" not in ds:
            continue
        name = Path(f"{where} instance {ds.get('SOPInstanceUID', n + 1)}")
        slices.append((name, ds, _geometry(ds, name)))
    return _assemble(slices, where, max_voxels)


def _assemble(slices, where: str, max_voxels) -> DicomSeries:
    """The volume of the (path, dataset, geometry) image slices of one CT series, slices sorted along the normal."""
    _check_one_ct_series(slices, where)
    first = slices[0][2]
    shape2d = (int(first["Rows"][0]), int(first["Columns"][0]))
    _check_same_plane_and_size(slices, shape2d)
    _check_voxel_limit(shape2d, len(slices), where, max_voxels)
    orient = first["ImageOrientationPatient"]
    order, positions = _order_along_normal(slices, np.cross(orient[:3], orient[3:]), where)
    volume, headers = _volume_and_headers(slices, order, shape2d)
    affine = _ras_affine(orient, first["PixelSpacing"], positions)
    image = nib.Nifti1Image(volume, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return DicomSeries(image=image, datasets=headers, where=where)


def _check_one_ct_series(slices, where: str) -> None:
    """At least two distinct slices, all of one series, none of a modality other than CT."""
    if not slices:
        raise InputError(f"DICOM series {where}: no DICOM image slices found")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds, _ in slices}
    if len(series) > 1:
        raise InputError(f"DICOM series {where}: holds {len(series)} series; put each series in its own folder")
    modalities = {str(ds.get("Modality", "")) for _, ds, _ in slices} - {""}
    if modalities and modalities != {"CT"}:
        raise InputError(f"DICOM series {where}: modality {', '.join(sorted(modalities))}, not CT; the models "
                         "segment CT in Hounsfield units")
    if len(slices) < 2:
        raise InputError(f"DICOM series {where}: only one slice; a CT volume needs at least two")
    if len({str(ds.get("SOPInstanceUID", n)) for n, (_, ds, _) in enumerate(slices)}) != len(slices):
        raise InputError(f"DICOM series {where}: two slices share one SOPInstanceUID (a file copied twice?)")


def _check_same_plane_and_size(slices, shape2d) -> None:
    """Every slice has the first one's orientation, Rows x Columns and PixelSpacing."""
    first_path, _, first = slices[0]
    orient = first["ImageOrientationPatient"]
    for path, _, g in slices:
        if not np.allclose(g["ImageOrientationPatient"], orient, atol=1e-4):
            raise InputError(f"DICOM file {path}: ImageOrientationPatient differs from the rest of the series")
        if (int(g["Rows"][0]), int(g["Columns"][0])) != shape2d:
            raise InputError(f"DICOM file {path}: {int(g['Rows'][0])}x{int(g['Columns'][0])} pixels, the series has "
                             f"{shape2d[0]}x{shape2d[1]}")
        if not np.allclose(g["PixelSpacing"], first["PixelSpacing"], rtol=1e-4):
            raise InputError(f"DICOM file {path}: PixelSpacing {g['PixelSpacing'].tolist()} differs from "
                             f"{first['PixelSpacing'].tolist()} of {first_path.name}")


def _check_voxel_limit(shape2d, n_slices: int, where: str, max_voxels) -> None:
    """Refuse a series over `max_voxels` before any pixel data is decoded."""
    voxels = shape2d[0] * shape2d[1] * n_slices
    if max_voxels is not None and voxels > max_voxels:
        raise InputError(f"DICOM series {where}: {shape2d[0]}x{shape2d[1]}x{n_slices} = {voxels:,} voxels, more "
                         f"than the limit of {max_voxels:,}")


def _order_along_normal(slices, normal: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(slice order, ImagePositionPatient in that order) along the slice normal; the spacing must be uniform
    (a missing slice would otherwise be silently closed up)."""
    positions = np.array([g["ImagePositionPatient"] for _, _, g in slices])
    order = np.argsort(positions @ normal)
    positions = positions[order]
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-3):
        raise InputError(f"DICOM series {where}: two slices share one position along the slice normal")
    if np.ptp(steps) > 0.01 * steps.mean() + 1e-3:
        raise InputError(f"DICOM series {where}: slice spacing varies ({steps.min():.3f}-{steps.max():.3f} mm); "
                         "a slice is missing (an incomplete series?) or the series needs resampling to uniform spacing")
    return order, positions


def _volume_and_headers(slices, order, shape2d) -> tuple[np.ndarray, list]:
    """The HU volume (columns, rows, slices) in `order`, and each slice's header without its pixel data."""
    volume = np.empty((shape2d[1], shape2d[0], len(slices)), dtype=np.float32)
    headers = []
    for k, idx in enumerate(order):
        path, ds, g = slices[idx]
        pixels = _pixels(ds, path, shape2d).astype(np.float32) * float(g["RescaleSlope"][0]) \
            + float(g["RescaleIntercept"][0])
        volume[:, :, k] = pixels.T
        headers.append(_header_only(ds))     # a SEG needs the headers; the voxels are in `volume`
    return volume, headers


def _ras_affine(orient: np.ndarray, pixel_spacing: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The RAS affine of voxel (column i, row j, slice k) from the orientation, spacing and sorted positions."""
    row_dir, col_dir = orient[:3], orient[3:]
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing        # i: along a row, column index increases
    lps[:3, 1] = col_dir * row_spacing        # j: down a column, row index increases
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps

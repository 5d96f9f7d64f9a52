"""Write a CT volume (HU, RAS affine) as a DICOM CT series: one CT Image Storage file per slice,
complete enough for a PACS and for `dciodvfy` (Patient, General Study, General Series, Frame of
Reference, General Equipment, General Image, Image Plane, Image Pixel, CT Image, SOP Common).

For phantoms and tests (a DICOM series of a volume of known geometry) and for turning a NIfTI
volume into a series a PACS accepts. The volume is first turned to its closest RAS orientation
(`regionkd.sdk.orientation`), so that the slices are axial whatever the file's voxel order; then
voxel (i, j, k) becomes column i, row j of slice k, and `regionkd.sdk.dicom_io.read_dicom_series`
gives back these voxels and this affine (those of the input when it is stored RAS already). HU are rounded to integers and stored as int16 with RescaleIntercept
-1024 (RescaleSlope 1). Needs the `dicom` extra (pydicom). The folder is written atomically.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .errors import InputError, require

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
INTERCEPT = -1024.0


@dataclass
class SeriesInfo:
    """What a written series is known by in a PACS."""
    folder: Path
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list = field(default_factory=list)


@dataclass(frozen=True)
class _SeriesHeader:
    """The values every slice of the series shares (Patient, Study, Series, Frame of Reference)."""
    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    series_number: int              # or its decimal string
    series_description: str
    accession_number: str
    modality: str
    date: str
    time: str


@dataclass(frozen=True)
class _SliceGeometry:
    """Where the slices of a canonical (RAS) volume lie in DICOM patient coordinates (LPS)."""
    affine: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    row_spacing: float              # between rows
    col_spacing: float              # between columns
    normal: np.ndarray
    thickness: float

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice k: the centre of its first voxel, LPS."""
        return RAS_TO_LPS @ (self.affine @ [0.0, 0.0, float(k), 1.0])[:3]


def _ds(text) -> str:
    """A decimal string (DS) of at most 16 characters."""
    out = f"{float(text):.6g}"
    return out if len(out) <= 16 else f"{float(text):.4e}"


def write_ct_series(hu, affine, folder: str | os.PathLike, *, patient_id: str = "PHANTOM",
                    patient_name: str = "Phantom^Regionkd", study_instance_uid: str | None = None,
                    series_instance_uid: str | None = None, frame_of_reference_uid: str | None = None,
                    series_number: int = 1, series_description: str = "regionkd phantom CT",
                    accession_number: str = "", modality: str = "CT", overwrite: bool = False) -> SeriesInfo:
    """Write `hu` (3D, HU) with its RAS `affine` as an axial series in `folder` (one file per slice,
    IM00001.dcm...). Returns the UIDs it was given."""
    require("pydicom", extra="dicom", purpose="writing DICOM series")
    from pydicom.uid import generate_uid

    hu, affine = _canonical_volume(hu, affine)
    geometry = _slice_geometry(affine)
    stored = _stored_values(hu)
    now = _dt.datetime.now()
    header = _SeriesHeader(patient_id=patient_id, patient_name=patient_name,
                           study_instance_uid=study_instance_uid or generate_uid(),
                           series_instance_uid=series_instance_uid or generate_uid(),
                           frame_of_reference_uid=frame_of_reference_uid or generate_uid(),
                           series_number=series_number, series_description=series_description,
                           accession_number=accession_number, modality=modality,
                           date=now.strftime("%Y%m%d"), time=now.strftime("%H%M%S"))
    info = SeriesInfo(Path(folder), header.study_instance_uid, header.series_instance_uid,
                      header.frame_of_reference_uid)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        for k in range(stored.shape[2]):
            sop_uid = generate_uid()
            ds = _slice_dataset(header, geometry, stored[:, :, k], k, sop_uid)
            ds.save_as(Path(tmp) / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
            info.sop_instance_uids.append(sop_uid)
    return info


def _canonical_volume(hu, affine) -> tuple[np.ndarray, np.ndarray]:
    """The checked input turned to its closest RAS orientation, so that the slices are axial."""
    from .orientation import to_canonical

    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise InputError(f"write_ct_series: a 3D volume is needed, got shape {hu.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError("write_ct_series: affine must be a finite 4x4 matrix")
    canonical = to_canonical(hu, affine)
    return canonical.data, np.asarray(canonical.affine, dtype=np.float64)


def _slice_geometry(affine: np.ndarray) -> _SliceGeometry:
    """The slice plane of a canonical affine; sheared or tilted volumes cannot be a CT series."""
    lps = RAS_TO_LPS @ affine[:3, :3]
    col_spacing, row_spacing = np.linalg.norm(lps[:, 0]), np.linalg.norm(lps[:, 1])
    row_dir, col_dir = lps[:, 0] / col_spacing, lps[:, 1] / row_spacing
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise InputError("write_ct_series: the affine's first two axes are not orthogonal (a sheared volume)")
    normal = np.cross(row_dir, col_dir)
    step = lps[:, 2]
    if np.linalg.norm(np.cross(step / np.linalg.norm(step), normal)) > 1e-4:
        raise InputError("write_ct_series: the slice axis is not perpendicular to the slices (gantry tilt)")
    return _SliceGeometry(affine=affine, row_dir=row_dir, col_dir=col_dir, row_spacing=row_spacing,
                          col_spacing=col_spacing, normal=normal, thickness=float(np.linalg.norm(step)))


def _stored_values(hu: np.ndarray) -> np.ndarray:
    """HU rounded and shifted by INTERCEPT into int16, or InputError when they do not fit."""
    stored = np.round(hu.astype(np.float64) - INTERCEPT)
    if stored.min() < -32768 or stored.max() > 32767:
        raise InputError("write_ct_series: HU outside -33792..31743 cannot be stored as int16")
    return stored.astype(np.int16)


def _slice_dataset(header: _SeriesHeader, geometry: _SliceGeometry, stored_slice: np.ndarray, k: int, sop_uid: str):
    """The CT Image Storage dataset of slice k (`stored_slice`: its (columns, rows) stored values)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = header.date, header.time
    _set_patient_and_study(ds, header)
    _set_series_and_equipment(ds, header)
    _set_general_image(ds, header, k)
    _set_image_plane(ds, geometry, k)
    _set_image_pixels(ds, stored_slice)
    return ds


def _set_patient_and_study(ds, header: _SeriesHeader) -> None:
    """Patient and General Study modules."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = header.patient_name, header.patient_id, "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = header.study_instance_uid, header.date, header.time
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", header.accession_number, ""
    ds.StudyDescription = "regionkd phantom study"


def _set_series_and_equipment(ds, header: _SeriesHeader) -> None:
    """General Series, Frame of Reference and General Equipment modules."""
    ds.Modality, ds.SeriesInstanceUID = header.modality, header.series_instance_uid
    ds.SeriesNumber = int(header.series_number)
    ds.SeriesDescription, ds.SeriesDate, ds.SeriesTime = header.series_description, header.date, header.time
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "ABDOMEN"   # Laterality: absent (unpaired)
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = header.frame_of_reference_uid, ""
    ds.Manufacturer = "regionkd"


def _set_general_image(ds, header: _SeriesHeader, k: int) -> None:
    """General Image module of slice k."""
    ds.InstanceNumber = k + 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = header.date, header.time
    ds.AcquisitionNumber = 1


def _set_image_plane(ds, geometry: _SliceGeometry, k: int) -> None:
    """Image Plane module of slice k."""
    position = geometry.position(k)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*geometry.row_dir, *geometry.col_dir)]
    ds.PixelSpacing = [_ds(geometry.row_spacing), _ds(geometry.col_spacing)]      # between rows, between columns
    ds.SliceThickness = _ds(geometry.thickness)
    ds.SliceLocation = _ds(float(position @ geometry.normal))


def _set_image_pixels(ds, stored_slice: np.ndarray) -> None:
    """Image Pixel and CT Image modules: `stored_slice` (columns, rows) as int16 rows of pixels."""
    cols, rows = stored_slice.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(INTERCEPT), "1", "HU"
    ds.KVP = "120"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = np.ascontiguousarray(stored_slice.T).tobytes()

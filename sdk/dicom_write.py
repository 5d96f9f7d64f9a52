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
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise InputError(f"write_ct_series: a 3D volume is needed, got shape {hu.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError("write_ct_series: affine must be a finite 4x4 matrix")
    from .orientation import to_canonical

    canonical = to_canonical(hu, affine)
    hu, affine = canonical.data, np.asarray(canonical.affine, dtype=np.float64)
    cols, rows, n_slices = hu.shape
    lps = RAS_TO_LPS @ affine[:3, :3]
    col_spacing, row_spacing = np.linalg.norm(lps[:, 0]), np.linalg.norm(lps[:, 1])
    row_dir, col_dir = lps[:, 0] / col_spacing, lps[:, 1] / row_spacing
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise InputError("write_ct_series: the affine's first two axes are not orthogonal (a sheared volume)")
    normal = np.cross(row_dir, col_dir)
    step = lps[:, 2]
    if np.linalg.norm(np.cross(step / np.linalg.norm(step), normal)) > 1e-4:
        raise InputError("write_ct_series: the slice axis is not perpendicular to the slices (gantry tilt)")
    stored = np.round(hu.astype(np.float64) - INTERCEPT)
    if stored.min() < -32768 or stored.max() > 32767:
        raise InputError("write_ct_series: HU outside -33792..31743 cannot be stored as int16")
    stored = stored.astype(np.int16)
    thickness = float(np.linalg.norm(step))

    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    info = SeriesInfo(Path(folder), study_uid, series_uid, for_uid)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        for k in range(n_slices):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            sop_uid = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
            # Patient, General Study
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
            ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, date, time
            ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", accession_number, ""
            ds.StudyDescription = "regionkd phantom study"
            # General Series, Frame of Reference, General Equipment
            ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, int(series_number)
            ds.SeriesDescription, ds.SeriesDate, ds.SeriesTime = series_description, date, time
            ds.PatientPosition, ds.BodyPartExamined = "HFS", "ABDOMEN"   # Laterality: absent (unpaired)
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
            ds.Manufacturer = "regionkd"
            # General Image, Image Plane
            ds.InstanceNumber = k + 1
            ds.PatientOrientation = ""
            ds.ContentDate, ds.ContentTime = date, time
            ds.AcquisitionNumber = 1
            position = RAS_TO_LPS @ (affine @ [0.0, 0.0, float(k), 1.0])[:3]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]      # between rows, between columns
            ds.SliceThickness = _ds(thickness)
            ds.SliceLocation = _ds(float(position @ normal))
            # Image Pixel, CT Image
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = rows, cols
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(INTERCEPT), "1", "HU"
            ds.KVP = "120"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds.save_as(Path(tmp) / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
            info.sop_instance_uids.append(sop_uid)
    return info

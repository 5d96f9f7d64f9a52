"""Building and writing the output mask: uint8, the input's affine and qform/sform codes
unchanged, a header that names the classes, written atomically (temp name keeps the suffix,
because nibabel picks the format and compression from it)."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .volume_io import save_nifti_atomic
from .errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def class_description(class_names) -> str:
    """'regionkd 0=background 1=liver 2=tumour' cut to NIfTI's 80-byte descrip field."""
    text = "regionkd " + " ".join(f"{i}={name}" for i, name in enumerate(class_names))
    return text.encode("ascii", "replace")[:79].decode("ascii")


def mask_image(mask: np.ndarray, affine: np.ndarray, ref_header, class_names) -> nib.Nifti1Image:
    """A uint8 NIfTI-1 image of `mask` (in the input's voxel order) with the input's affine and header geometry."""
    mask = np.asarray(mask, dtype=np.uint8)
    if type(ref_header) is nib.Nifti1Header:
        header = ref_header.copy()          # keeps qform/sform (and their codes), pixdim, units exactly
    else:
        header = nib.Nifti1Header()
        if isinstance(ref_header, nib.Nifti1Header):  # NIfTI-2: keep its codes
            q, qcode = ref_header.get_qform(coded=True)
            s, scode = ref_header.get_sform(coded=True)
            header.set_qform(affine if q is None else q, int(qcode))
            header.set_sform(affine if s is None else s, int(scode))
        else:
            header.set_qform(affine, 1)
            header.set_sform(affine, 1)
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("label", (), name="regionkd")
    header["descrip"] = class_description(class_names).encode("ascii")
    header["cal_min"], header["cal_max"] = 0, len(class_names) - 1
    header["aux_file"] = b""
    return nib.Nifti1Image(mask, affine, header)


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output name nibabel would not write as NIfTI."""
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"output {path}: mask files must end in .nii or .nii.gz")
    return path


def write_mask(image: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Save atomically: an interrupted or failed write leaves no file at `path`."""
    return save_nifti_atomic(image, check_output_path(path))

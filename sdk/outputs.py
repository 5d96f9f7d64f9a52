"""What a segmentation writes and how the files are named: the output types (`nifti`,
`dicom-seg`, `both`) and the names of the files beside a mask.

    ct.nii.gz -> ct.seg.dcm (the DICOM SEG with --output-type both), ct.statistics.json (--statistics)
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

OUTPUT_TYPES = ("nifti", "dicom-seg", "both")
SEG_SUFFIX = ".seg.dcm"
STATS_SUFFIX = ".statistics.json"
_KNOWN_SUFFIXES = (".nii.gz", ".nii", SEG_SUFFIX, ".dcm")


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return output_type


def stem_of(path: str | os.PathLike) -> Path:
    """The path without its result suffix: 'masks/ct.nii.gz' -> 'masks/ct'."""
    path = Path(path)
    for suffix in _KNOWN_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def seg_path_for(mask_path: str | os.PathLike) -> Path:
    """The DICOM SEG beside a NIfTI mask: 'ct.nii.gz' -> 'ct.seg.dcm'."""
    stem = stem_of(mask_path)
    return stem.with_name(stem.name + SEG_SUFFIX)


def statistics_path_for(result_path: str | os.PathLike) -> Path:
    """'case_001.nii.gz' (or 'case_001.seg.dcm') -> 'case_001.statistics.json' in the same folder."""
    stem = stem_of(result_path)
    return stem.with_name(stem.name + STATS_SUFFIX)

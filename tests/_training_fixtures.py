"""Data for the training tests (imported by test_trainer/test_ddp/test_evaluate; pytest only
reads conftest.py, which belongs to the SDK tests)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_lits_case(root, index: int, hu: np.ndarray, affine: np.ndarray, label: np.ndarray) -> None:
    """One case in the LiTS layout: volume-<i>.nii and segmentation-<i>.nii, same affine."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(hu, np.int16), affine), root / f"volume-{index}.nii")
    nib.save(nib.Nifti1Image(np.asarray(label, np.uint8), affine), root / f"segmentation-{index}.nii")

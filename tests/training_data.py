"""Data for the training tests: phantom datasets written in the LiTS layout."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

#: training options of a run of a few seconds on 64x64 phantoms
TINY = dict(preset="demo", input_size=64, batch_size=4, samples_per_epoch=12, epochs=1, log_every=1,
            quiet=True)   # 3 steps per epoch


def write_lits_case(root, index: int, hu: np.ndarray, affine: np.ndarray, label: np.ndarray) -> None:
    """One case in the LiTS layout: volume-<i>.nii and segmentation-<i>.nii, same affine."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(hu, np.int16), affine), root / f"volume-{index}.nii")
    nib.save(nib.Nifti1Image(np.asarray(label, np.uint8), affine), root / f"segmentation-{index}.nii")


def write_phantom_lits(root, n: int = 5, shape=(64, 64, 12), seed: int = 0) -> Path:
    """`n` liver phantoms (regionkd.train.data.phantoms) written by the dataset writer in the
    LiTS layout (stored L, P, S, so reading must reorient)."""
    from regionkd.train.data.layouts import write_case
    from regionkd.train.data.phantoms import generate_phantom

    root = Path(root)
    for i in range(n):
        p = generate_phantom("liver", shape=shape, seed=seed, index=i)
        write_case(root, "lits", i, p.hu, p.label, p.affine)
    return root

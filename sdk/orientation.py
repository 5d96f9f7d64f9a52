"""Closest canonical (RAS+) orientation and the way back.

Training and inference both work on canonical arrays whose last axis is the axial (S) axis,
so a volume stored the LiTS way, the KiTS19 way (slice axis first) or with flipped axes
gives the same slices. `CanonicalVolume.to_original` puts a mask back into the file's own
voxel order, so the written mask shares the input's affine exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as nio
from nibabel.affines import voxel_sizes

RAS = nio.axcodes2ornt(("R", "A", "S"))


@dataclass
class CanonicalVolume:
    data: np.ndarray          # canonical (RAS+) view of the input, axes (x, y, z); z is the axial axis
    affine: np.ndarray        # affine of the canonical array
    original_affine: np.ndarray
    original_shape: tuple
    ornt: np.ndarray          # orientation of the original axes (nibabel io_orientation)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(v) for v in voxel_sizes(self.affine))

    @property
    def original_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the original file's axes."""
        return tuple(float(v) for v in voxel_sizes(self.original_affine))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Axis codes of the original file (e.g. ('L', 'P', 'S'))."""
        return tuple(nio.ornt2axcodes(self.ornt))

    def to_original(self, canonical_array: np.ndarray) -> np.ndarray:
        """Map an array in canonical voxel order back to the original file's voxel order. The result
        is Fortran-ordered, the order a NIfTI file stores voxels in, so writing it is a plain copy
        (a C-ordered result cost one more full transposition in nibabel's writer)."""
        if canonical_array.shape[:3] != self.data.shape[:3]:
            raise ValueError(f"array shape {canonical_array.shape} does not match the canonical volume {self.data.shape}")
        back = nio.ornt_transform(RAS, self.ornt)
        out = nio.apply_orientation(canonical_array, back)
        assert out.shape[:3] == tuple(self.original_shape[:3])
        return np.asfortranarray(out)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> CanonicalVolume:
    """Reorient a 3D array with its affine to the closest canonical (RAS+) orientation."""
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine)
    canonical = nio.apply_orientation(data, ornt)
    canonical_affine = affine @ nio.inv_ornt_aff(ornt, data.shape)
    return CanonicalVolume(
        data=canonical,              # a view (flips and transposes): no copy of the volume
        affine=canonical_affine,
        original_affine=affine,
        original_shape=tuple(data.shape),
        ornt=ornt,
    )

"""Closest canonical (RAS+) orientation and the way back.

Training and inference both work on canonical arrays whose last axis is the axial (S) axis,
so a volume stored the LiTS way, the KiTS19 way (slice axis first) or with flipped axes
gives the same slices. `CanonicalVolume.to_original` puts a mask back into the file's own
voxel order, so the written mask shares the input's affine exactly.

The slicing plane is decided explicitly by `slice_geometry`: the voxel axis closest to the
patient's head-feet axis (world S) is sliced as axial, unless the caller names it. Near the
45-degree tie, where two voxel axes are about equally close to S (their angles to S within
TIE_MARGIN_DEG), the choice would flip on a fraction of a degree, so the geometry says it is
ambiguous and the Segmenter refuses such a volume unless told the axial axis. The obliquity
(the largest angle between a voxel axis and the world axis it is taken for) is recorded;
above OBLIQUE_WARN_DEG the Segmenter warns (slices are then not axial planes of the patient).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as nio
from nibabel.affines import voxel_sizes

from .errors import InputError

RAS = nio.axcodes2ornt(("R", "A", "S"))
OBLIQUE_WARN_DEG = 15.0       # routine gantry tilts stay below; beyond it axial slices are clearly tilted
TIE_MARGIN_DEG = 10.0         # axial axis ambiguous when the next voxel axis is this close to S (tilt > 40 deg)


@dataclass(frozen=True)
class SliceGeometry:
    """How a volume is sliced: `ornt` (nibabel orientation of the voxel axes), the voxel axis used
    as axial, its tilt from world S, the next-closest axis's angle to S, and the obliquity."""
    ornt: np.ndarray
    axial_axis: int
    axial_tilt_deg: float
    runner_up_deg: float
    obliquity_deg: float
    forced: bool = False

    @property
    def ambiguous(self) -> bool:
        """True when the axial axis is a near tie (and the caller did not name it)."""
        return not self.forced and (self.runner_up_deg - self.axial_tilt_deg) < TIE_MARGIN_DEG


def _degrees(cosine: float) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(cosine), 0.0, 1.0))))


def slice_geometry(affine: np.ndarray, axial_axis: int | None = None) -> SliceGeometry:
    """The slicing of a volume with this affine: the closest canonical axes (nibabel's
    io_orientation), or with `axial_axis` (0, 1 or 2, a voxel axis of the file) sliced as axial and
    the other two taken as R and A, whichever pairing is closer."""
    affine = np.asarray(affine, dtype=np.float64)
    rzs = affine[:3, :3]
    cos = rzs / np.linalg.norm(rzs, axis=0)            # column i: world direction of voxel axis i
    if axial_axis is None:
        ornt = nio.io_orientation(affine)
        axial = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    else:
        if axial_axis not in (0, 1, 2):
            raise InputError(f"axial_axis must be 0, 1 or 2 (a voxel axis of the volume), got {axial_axis!r}")
        axial = int(axial_axis)
        a, b = [i for i in range(3) if i != axial]
        world = {a: 0, b: 1} if abs(cos[0, a]) + abs(cos[1, b]) >= abs(cos[0, b]) + abs(cos[1, a]) else {a: 1, b: 0}
        world[axial] = 2
        ornt = np.array([[world[i], 1.0 if cos[world[i], i] >= 0 else -1.0] for i in range(3)])
    tilt = _degrees(cos[2, axial])
    runner_up = min(_degrees(cos[2, i]) for i in range(3) if i != axial)
    obliquity = max(_degrees(cos[int(ornt[i, 0]), i]) for i in range(3))
    return SliceGeometry(ornt=ornt, axial_axis=axial, axial_tilt_deg=tilt, runner_up_deg=runner_up,
                         obliquity_deg=obliquity, forced=axial_axis is not None)


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

    def to_original(self, canonical_array: np.ndarray) -> np.ndarray:
        """Map an array in canonical voxel order back to the original file's voxel order. The result
        is Fortran-ordered, the order a NIfTI file stores voxels in, so writing it is a plain copy
        (a C-ordered result cost one more full transposition in nibabel's writer)."""
        if canonical_array.shape[:3] != self.data.shape[:3]:
            raise InputError(f"array shape {canonical_array.shape} does not match the canonical volume {self.data.shape}")
        back = nio.ornt_transform(RAS, self.ornt)
        out = nio.apply_orientation(canonical_array, back)
        assert out.shape[:3] == tuple(self.original_shape[:3])
        return np.asfortranarray(out)


def to_canonical(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray | None = None) -> CanonicalVolume:
    """Reorient a 3D array with its affine to the closest canonical (RAS+) orientation, or to the
    one `ornt` gives (from `slice_geometry`, e.g. with the axial axis named by the caller)."""
    if data.ndim != 3:
        raise InputError(f"expected a 3D array, got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine) if ornt is None else np.asarray(ornt, dtype=np.float64)
    canonical = nio.apply_orientation(data, ornt)
    canonical_affine = affine @ nio.inv_ornt_aff(ornt, data.shape)
    return CanonicalVolume(
        data=canonical,              # a view (flips and transposes): no copy of the volume
        affine=canonical_affine,
        original_affine=affine,
        original_shape=tuple(data.shape),
        ornt=ornt,
    )

"""Is this a CT volume in Hounsfield units, with a geometry the model can slice? Checked for every
volume before it is segmented, so an implausible input is refused instead of segmented confidently.

Refused (InputError naming the volume and every reason), or warnings with allow_implausible:
- no qform and no sform (NIfTI codes 0): the orientation would be guessed from pixdim;
- complex voxels (the reader refuses them; allowed, the real part is used);
- scaling (scl_slope / scl_inter) that is infinite or absurd: |slope| outside [1e-6, 1e6] or
  |inter| over 1e6 (CT uses slope 1, intercept 0 or -1024);
- constant or near-constant images: max - min below MIN_SPAN_HU, or the 1st-99th percentile
  span below it (a 0/1 mask, an all-zero volume);
- values beyond any CT scale: |HU| over MAX_ABS_HU (the 16-bit extended scale reaches about
  -32768..32767, padding included);
- no soft tissue: under MIN_SOFT_TISSUE_FRACTION of voxels within SOFT_TISSUE_HU. Every body
  CT, cropped or not, is mostly fat, water, muscle, organs and blood (-200..300 HU); air is not
  required (a scan cropped to the abdomen may lack it);
- an 8-bit picture: every value an integer within 0..255 (an exported greyscale image, no
  rescale to HU; a real CT of a body holds fat, below 0 HU);
- an oblique volume whose axial axis is a near tie (see `regionkd.sdk.orientation`), unless the
  caller names the axial axis.
Warned, never refused:
- obliquity over OBLIQUE_WARN_DEG (the angle is always recorded in the result);
- in-plane spacing or slice thickness far (a factor SPACING_FACTOR) outside the range the
  model was trained at (manifest `preprocessing.spacing`); the mask is computed at the input's
  own spacing (no resampling yet), so such a mask deserves a second look. A bundle that does not
  record the range gets a warning that spacing was not checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .orientation import OBLIQUE_WARN_DEG, TIE_MARGIN_DEG, SliceGeometry

MIN_SPAN_HU = 20.0
MAX_ABS_HU = 1e5
SOFT_TISSUE_HU = (-200.0, 300.0)
MIN_SOFT_TISSUE_FRACTION = 0.005
MAX_SLOPE, MIN_SLOPE, MAX_INTER = 1e6, 1e-6, 1e6
SPACING_FACTOR = 1.5
SAMPLE_VOXELS = 1 << 18         # the distribution is judged on a strided sample of about this many voxels


@dataclass
class Findings:
    """What was found about one volume: `refusals` (refused unless allowed) and `warnings`."""
    name: str
    refusals: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def refuse(self, message: str) -> None:
        self.refusals.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def settle(self, allow_implausible: bool) -> list[str]:
        """Raise InputError naming the volume and every refusal, or (allowed) return everything as warnings."""
        if self.refusals and not allow_implausible:
            raise InputError(f"{self.name}: not a plausible CT volume: " + "; ".join(self.refusals)
                             + " (allow_implausible / --allow-implausible segments it anyway, with warnings)")
        return [f"implausible: {m}" for m in self.refusals] + list(self.warnings)


def check_header(findings: Findings, header, scaling=None) -> None:
    """Header facts: geometry codes, scaling, complex voxels (NIfTI headers; others are skipped).
    `scaling`: (slope, inter) when known apart from the header (nibabel moves a loaded file's
    scl_slope/scl_inter to its data proxy and leaves NaN in the header)."""
    if header is None or not hasattr(header, "get_qform"):
        return
    try:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    except (KeyError, ValueError, TypeError):
        return
    if qcode == 0 and scode == 0:
        findings.refuse("neither a qform nor an sform (both codes 0): the orientation would be guessed from "
                        "the voxel sizes alone")
    try:
        dtype = np.dtype(header.get_data_dtype())
    except (TypeError, ValueError):
        dtype = None
    if dtype is not None and dtype.kind == "c":
        findings.refuse(f"{dtype} (complex) voxels: the imaginary part is dropped")
    try:
        if scaling is not None and scaling[0] is not None:
            slope, inter = float(scaling[0]), float(scaling[1] if scaling[1] is not None else 0.0)
        else:
            slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    except (KeyError, ValueError, TypeError):
        return
    if np.isnan(slope) or slope == 0:           # NIfTI: no scaling
        return
    if not np.isfinite(slope) or not MIN_SLOPE <= abs(slope) <= MAX_SLOPE:
        findings.refuse(f"scl_slope {slope:g} (CT uses 1)")
    if not np.isfinite(inter) or abs(inter) > MAX_INTER:
        findings.refuse(f"scl_inter {inter:g} (CT uses 0 or -1024)")


def _sample(data: np.ndarray) -> np.ndarray:
    """A strided subsample of at most about SAMPLE_VOXELS voxels, by logical index (layout-independent)."""
    n = data.size
    if n <= SAMPLE_VOXELS:
        return data
    step = int(np.ceil((n / SAMPLE_VOXELS) ** (1 / 3)))
    return data[::step, ::step, ::step]


def check_intensities(findings: Findings, hu: np.ndarray) -> None:
    """Is the distribution one a CT in Hounsfield units has? (see the module doc for the rules)
    Judged on a strided sample by logical index (the same voxels whatever the memory layout)."""
    sample = np.ascontiguousarray(_sample(hu), dtype=np.float32)
    lo, hi = float(sample.min()), float(sample.max())
    if hi - lo < MIN_SPAN_HU:
        every = "every voxel" if sample.size == hu.size else f"every one of {sample.size:,} sampled voxels"
        what = f"{every} {lo:g}" if hi == lo else f"{every} within {lo:g}..{hi:g}"
        findings.refuse(f"a constant or near-constant image ({what}); a CT spans hundreds of HU")
        return
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    if p99 - p1 < MIN_SPAN_HU:
        findings.refuse(f"a near-constant image (98% of voxels within {p1:g}..{p99:g})")
    if max(abs(lo), abs(hi)) > MAX_ABS_HU:
        findings.refuse(f"values up to {max(abs(lo), abs(hi)):.3g}, beyond any CT scale (|HU| <= {MAX_ABS_HU:g}); "
                        "absurd scaling?")
    soft = float(np.count_nonzero((sample >= SOFT_TISSUE_HU[0]) & (sample <= SOFT_TISSUE_HU[1]))) / sample.size
    if soft < MIN_SOFT_TISSUE_FRACTION:
        findings.refuse(f"only {100 * soft:.2g}% of voxels near soft-tissue values ({SOFT_TISSUE_HU[0]:g}.."
                        f"{SOFT_TISSUE_HU[1]:g} HU); not Hounsfield units?")
    if lo >= 0 and hi <= 255 and np.array_equal(sample, np.rint(sample)):
        findings.refuse(f"only whole values within {lo:g}..{hi:g}: an 8-bit picture, not Hounsfield units "
                        "(a body CT holds fat, below 0 HU)")


def check_geometry(findings: Findings, geometry: SliceGeometry) -> None:
    if geometry.ambiguous:
        findings.refuse(f"oblique: voxel axis {geometry.axial_axis} is {geometry.axial_tilt_deg:.1f} degrees from the "
                        f"head-feet axis and the next axis {geometry.runner_up_deg:.1f}, within {TIE_MARGIN_DEG:g} "
                        "degrees of each other: the axial plane is ambiguous; name the axial voxel axis "
                        "(axial_axis / --axial-axis 0|1|2)")
    elif geometry.obliquity_deg > OBLIQUE_WARN_DEG:
        findings.warn(f"oblique by {geometry.obliquity_deg:.1f} degrees (axial slices taken along voxel axis "
                      f"{geometry.axial_axis}, {geometry.axial_tilt_deg:.1f} degrees from the head-feet axis)")


def check_spacing(findings: Findings, spacing_mm, trained: dict | None) -> None:
    """`spacing_mm`: canonical (x, y, z) voxel sizes; `trained`: manifest preprocessing.spacing."""
    if not trained:
        findings.warn("the bundle does not record the spacing the model was trained at (preprocessing.spacing): "
                      "the voxel spacing is not checked")
        return
    x, y, z = (float(v) for v in spacing_mm)
    for label, values, key in (("in-plane spacing", (x, y), "in_plane_mm"), ("slice thickness", (z,), "slice_thickness_mm")):
        if key not in trained:
            continue
        lo, hi = (float(v) for v in trained[key])
        far = [v for v in values if v < lo / SPACING_FACTOR or v > hi * SPACING_FACTOR]
        if far:
            shown = " x ".join(f"{v:.3g}" for v in values)
            findings.warn(f"{label} {shown} mm is far outside the {lo:.3g}-{hi:.3g} mm the model was trained at "
                          "(the volume is segmented at its own spacing: check the mask)")

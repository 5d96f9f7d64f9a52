"""DICOM SEG output, written with highdicom (the `dicom` extra): one binary segment per
non-background class, coded with SNOMED CT, identifying the algorithm, referencing the CT series
it was computed from.

- Segment i is class i of the bundle (segment numbers are the mask's labels), every class has its
  segment, also one the model did not find in this volume (its frames are then empty), so readers
  can rely on the numbering.
- Codes (`segment_codes`): a manifest may give them per class (`model.segment_codes`, see the
  manifest schema); otherwise they come from the class name: liver, kidney (SNOMED CT anatomical
  structures), tumour / tumor / neoplasm / lesion (Morphologically Abnormal Structure / Neoplasm,
  with the model's organ as anatomic region), cyst. A class without a code is refused with a
  message naming it: a guessed code in a PACS is worse than no SEG.
- Algorithm identification: the bundle's model name, its model version (`metadata.version` of
  the manifest) and, as parameters, the manifest's sha256, the precision and the backend.
- References: the SEG copies the source's Patient and Study (same StudyInstanceUID), shares its
  FrameOfReferenceUID and references every source SOPInstanceUID of the series (highdicom's
  ReferencedSeriesSequence / per-frame DerivationImageSequence).

The mask handed in is in the series' volume voxel order (`regionkd.sdk.dicom_io`): voxel (i, j, k)
is column i, row j of `series.datasets[k]`.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError, require

#: (code value, coding scheme, meaning)
SCT = "SCT"
ANATOMICAL_STRUCTURE = ("91723000", SCT, "Anatomical Structure")
ABNORMAL_STRUCTURE = ("49755003", SCT, "Morphologically Abnormal Structure")
ORGAN_CODES = {
    "liver": ("10200004", SCT, "Liver"),
    "kidney": ("64033007", SCT, "Kidney"),
    "spleen": ("78961009", SCT, "Spleen"),
    "pancreas": ("15776009", SCT, "Pancreas"),
}
LESION_CODES = {
    "tumour": ("108369006", SCT, "Neoplasm"),
    "tumor": ("108369006", SCT, "Neoplasm"),
    "neoplasm": ("108369006", SCT, "Neoplasm"),
    "lesion": ("52988006", SCT, "Lesion"),
    "cyst": ("441457006", SCT, "Cyst"),
}
# colours of the segments, as in the preview (sRGB, converted to CIELab by highdicom)
SEGMENT_RGB = [(0, 200, 0), (230, 30, 30), (40, 120, 255), (255, 200, 0), (200, 0, 200)]


def _code(triple):
    from pydicom.sr.coding import Code

    value, scheme, meaning = triple
    return Code(str(value), str(scheme), str(meaning))


def _word(name: str, table: dict):
    lowered = name.lower().replace("_", " ").replace("-", " ")
    words = lowered.split()
    return next((code for word, code in table.items() if word in words), None)


def segment_codes(class_names, manifest_codes: dict | None = None) -> list[dict]:
    """One dict per non-background class: label, name, category, type, anatomic region (or None),
    as (value, scheme, meaning) triples. `manifest_codes`: the manifest's model.segment_codes."""
    manifest_codes = manifest_codes or {}
    organ = next((_word(n, ORGAN_CODES) for n in class_names[1:]
                  if _word(n, LESION_CODES) is None and _word(n, ORGAN_CODES) is not None), None)
    out = []
    for label, name in enumerate(class_names):
        if label == 0:
            continue
        given = manifest_codes.get(name)
        if given:
            entry = {"category": tuple(given["category"]), "type": tuple(given["type"]),
                     "region": tuple(given["anatomic_region"]) if given.get("anatomic_region") else None}
        elif _word(name, LESION_CODES) is not None:      # "tumour", "kidney tumour": a lesion, in its organ
            entry = {"category": ABNORMAL_STRUCTURE, "type": _word(name, LESION_CODES),
                     "region": _word(name, ORGAN_CODES) or organ}
        elif _word(name, ORGAN_CODES) is not None:
            entry = {"category": ANATOMICAL_STRUCTURE, "type": _word(name, ORGAN_CODES), "region": None}
        else:
            raise InputError(f"DICOM SEG: no SNOMED CT code for the class {name!r}; give one in the bundle "
                             "manifest (model.segment_codes, see regionkd-export --help) or use --output-type nifti")
        out.append({"label": label, "name": name, **entry})
    return out


def algorithm_parameters(bundle, precision: str | None, backend: str | None) -> dict:
    """(name, version, parameters) of the algorithm: from the bundle's manifest."""
    import hashlib

    from . import __version__

    manifest = bundle.manifest if bundle is not None else {}
    name = (manifest.get("model") or {}).get("name") or "regionkd model"
    version = (manifest.get("metadata") or {}).get("version") or "unversioned"
    params = {}
    if bundle is not None:
        params["manifest_sha256"] = hashlib.sha256(bundle.manifest_bytes).hexdigest()
    if precision:
        params["precision"] = str(precision)
    if backend:
        params["backend"] = str(backend)
    return {"name": str(name)[:64], "version": str(version)[:64], "source": f"regionkd {__version__}",
            "parameters": params}


def build_segmentation(mask: np.ndarray, series, class_names, *, algorithm: dict, manifest_codes=None,
                       series_number: int | None = None, series_description: str | None = None):
    """A highdicom Segmentation (a pydicom Dataset) of `mask` (uint8 labels in the series' volume
    voxel order) over `series` (`regionkd.sdk.dicom_io.DicomSeries`)."""
    hd = require("highdicom", extra="dicom", purpose="DICOM SEG output")
    from pydicom.sr.codedict import codes

    from . import __version__

    mask = np.asarray(mask)
    n_slices = len(series.datasets)
    rows, cols = int(series.datasets[0].Rows), int(series.datasets[0].Columns)
    if mask.shape != (cols, rows, n_slices):
        raise InputError(f"DICOM SEG for {series.where}: mask of shape {mask.shape}, the series is "
                         f"{cols}x{rows}x{n_slices} (columns x rows x slices)")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")
               if not series.datasets[0].get(k)]
    if missing:
        raise InputError(f"DICOM SEG for {series.where}: the source slices have no {', '.join(missing)}; a SEG must "
                         "reference them")
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm["name"], family=codes.cid7162.ArtificialIntelligence, version=algorithm["version"],
        source=algorithm.get("source"), parameters=algorithm.get("parameters") or None)
    descriptions = []
    for seg in segment_codes(class_names, manifest_codes):
        rgb = SEGMENT_RGB[(seg["label"] - 1) % len(SEGMENT_RGB)]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=seg["label"], segment_label=seg["name"][:64],
            segmented_property_category=_code(seg["category"]), segmented_property_type=_code(seg["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            tracking_uid=hd.UID(), tracking_id=f"{algorithm['name']} {seg['name']}"[:64],
            anatomic_regions=[_code(seg["region"])] if seg["region"] else None,
            display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8)   # (slices, rows, columns)
    frames[frames >= len(class_names)] = 0
    source_number = series.datasets[0].get("SeriesNumber")
    if series_number is None:
        series_number = (int(source_number) if source_number not in (None, "") else 0) % 1000 + 1000
    return hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(series_number), sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="regionkd", manufacturer_model_name=algorithm["name"][:64],
        software_versions=str(__version__), device_serial_number=(platform.node() or "unknown")[:64],
        content_label="REGIONKD", content_description=f"{algorithm['name']} {algorithm['version']}"[:64],
        series_description=(series_description or f"regionkd {algorithm['name']} segmentation")[:64])


def write_segmentation(seg, path: str | os.PathLike) -> Path:
    """Save atomically (a temporary name, renamed when complete)."""
    path = Path(path)
    if not path.name.lower().endswith(".dcm"):
        raise InputError(f"output {path}: a DICOM SEG file name must end in .dcm")
    with atomic_path(path, suffix="") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def labels_from_segmentation(seg, sop_instance_uids) -> np.ndarray:
    """The label volume (columns, rows, slices) of a SEG read back (a path or a dataset), in the
    order of `sop_instance_uids` (the source series' slices): segment numbers are labels."""
    hd = require("highdicom", extra="dicom", purpose="reading DICOM SEG")
    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.segread(seg) if isinstance(seg, (str, os.PathLike)) else hd.seg.Segmentation.from_dataset(seg)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(sop_instance_uids),
                                               combine_segments=True, skip_overlap_checks=True)
    return np.transpose(np.asarray(frames), (2, 1, 0))

"""A PACS round trip (`regionkd-segment BUNDLE --dicomweb URL --study UID [--series UID]`):
find the study's CT series (QIDO-RS), retrieve each (WADO-RS), segment it, and store its DICOM SEG
back into the same study (STOW-RS).

Nothing half-made is stored: every series is retrieved, checked (complete, CT, a volume the SDK
accepts) and segmented, and every SEG built, before the first STOW-RS request; a failure before
that stores nothing. Each SEG is one instance, which the PACS keeps whole or not at all, and it is
checked afterwards (QIDO-RS lists it in the study). Only a STOW-RS failure of a later SEG, when a
study has several CT series, can leave the earlier series' complete SEGs stored; the error says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .dicomweb import DicomwebPacs, SeriesRef
from .errors import PacsError


@dataclass
class SeriesOutcome:
    """One CT series of the study: its segmentation and where its SEG went."""
    series: SeriesRef
    result: object                      # SegmentationResult (result.dicom_seg is the SEG stored)
    seg_series_instance_uid: str = ""
    seg_sop_instance_uid: str = ""
    stored: bool = False
    timings: dict = field(default_factory=dict)   # ms: retrieve, segment, store (per series); query (first only)
    outputs: dict = field(default_factory=dict)   # local copies written (nifti, dicom-seg, statistics)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def segment_study(segmenter, url: str | None, study_instance_uid: str, series_instance_uids=None, *,
                  statistics: bool = False, local_dir=None, output_type: str = "dicom-seg", pacs=None,
                  progress=None, timeout: float = 60.0) -> list[SeriesOutcome]:
    """Segment the CT series of a study on a DICOMweb PACS and store their SEGs into the study.

    local_dir: also write local copies there, named by series UID, as `output_type` says
    (nifti, dicom-seg or both) plus `<series>.statistics.json` with `statistics`.
    progress(message): called before each step. Raises PacsError / InputError (nothing stored)."""
    from .outputs import check_output_type

    check_output_type(output_type)
    say = progress or (lambda message: None)
    pacs = pacs or DicomwebPacs(url, timeout=timeout)
    start = time.perf_counter()
    say(f"query study {study_instance_uid}")
    refs = pacs.ct_series(study_instance_uid, series_instance_uids)
    query_ms = _ms(start)
    outcomes = [_retrieve_and_segment(segmenter, pacs, ref, study_instance_uid, statistics, say) for ref in refs]
    outcomes[0].timings["query"] = query_ms
    if local_dir is not None:                      # local copies first: they cannot leave the PACS half-written
        _write_local_copies(outcomes, Path(local_dir), output_type, statistics)
    for n, outcome in enumerate(outcomes):
        _store_seg(pacs, outcome, study_instance_uid, say, stored_before=outcomes[:n])
    return outcomes


def _retrieve_and_segment(segmenter, pacs, ref: SeriesRef, study_instance_uid: str, statistics: bool,
                          say) -> SeriesOutcome:
    """Retrieve one series (WADO-RS), check it belongs to the study, and segment it; nothing is stored."""
    from .dicom_io import series_from_datasets

    t = time.perf_counter()
    say(f"retrieve series {ref.series_instance_uid}")
    datasets = pacs.retrieve_series(ref)
    retrieve_ms = _ms(t)
    where = f"{pacs.url} series {ref.series_instance_uid}"
    series = series_from_datasets(datasets, where=where, max_voxels=segmenter.max_voxels)
    del datasets
    if series.study_instance_uid != study_instance_uid:
        raise PacsError(f"PACS {pacs.url}: series {ref.series_instance_uid} was returned with StudyInstanceUID "
                        f"{series.study_instance_uid}, not {study_instance_uid}")
    t = time.perf_counter()
    say(f"segment series {ref.series_instance_uid}")
    result = segmenter.segment_series(series, statistics=statistics)
    seg = result.dicom_seg
    return SeriesOutcome(series=ref, result=result, seg_series_instance_uid=str(seg.SeriesInstanceUID),
                         seg_sop_instance_uid=str(seg.SOPInstanceUID),
                         timings={"retrieve": retrieve_ms, "segment": _ms(t)})


def _write_local_copies(outcomes: list[SeriesOutcome], local_dir: Path, output_type: str, statistics: bool) -> None:
    """Write each series' mask and/or SEG (and statistics) into `local_dir`, named by series UID."""
    from .dicom_seg import write_segmentation
    from .mask_io import write_mask
    from .outputs import statistics_path_for
    from .statistics import write_statistics

    for o in outcomes:
        base = local_dir / f"{o.series.series_instance_uid}.nii.gz"
        if output_type in ("nifti", "both"):
            o.outputs["nifti"] = str(write_mask(o.result.mask, base))
        if output_type in ("dicom-seg", "both"):
            path = local_dir / f"{o.series.series_instance_uid}.seg.dcm"
            o.outputs["dicom-seg"] = str(write_segmentation(o.result.dicom_seg, path))
        if statistics:
            o.outputs["statistics"] = str(write_statistics(statistics_path_for(base), o.result.statistics))


def _store_seg(pacs, o: SeriesOutcome, study_instance_uid: str, say, stored_before: list[SeriesOutcome]) -> None:
    """STOW-RS one SEG and check that the study lists it; an error names the SEGs `stored_before` it."""
    t = time.perf_counter()
    say(f"store SEG of series {o.series.series_instance_uid}")
    try:
        pacs.store(o.result.dicom_seg, study_instance_uid)
        listed = pacs.instances_of_series(study_instance_uid, o.seg_series_instance_uid)
    except PacsError as exc:
        done = [p.series.series_instance_uid for p in stored_before]
        note = f"; the SEGs of series {', '.join(done)} were stored before this failure" if done else \
            "; nothing was stored"
        raise PacsError(f"{exc}{note}") from exc
    if o.seg_sop_instance_uid not in listed:
        raise PacsError(f"PACS {pacs.url}: accepted the SEG {o.seg_sop_instance_uid} of series "
                        f"{o.series.series_instance_uid} but does not list it in study {study_instance_uid}")
    o.stored = True
    o.timings["store"] = _ms(t)
    o.outputs["pacs"] = {"url": pacs.url, "study": study_instance_uid, "series": o.seg_series_instance_uid,
                         "sop_instance": o.seg_sop_instance_uid}

"""A real PACS round trip: a phantom written as a DICOM CT series goes into Orthanc over
DICOMweb (STOW-RS), `regionkd-segment BUNDLE --dicomweb URL --study UID` queries it (QIDO-RS),
retrieves it (WADO-RS), segments it and stores a DICOM SEG into the same study (STOW-RS); the SEG
read back from Orthanc equals the local result frame for frame. A PACS that is down, answers 4xx
or 5xx, gives a partial series or holds no CT leaves a clear error and nothing stored.

Orthanc comes from .ci/run (REGIONKD_ORTHANC_URL) or is started by the tests (tests/services.py);
under CI a missing Orthanc fails these tests instead of skipping them.
"""
from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed")
pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")
pytest.importorskip("dicomweb_client", reason="the dicom extra (dicomweb-client) is not installed")

from tests.proxy import FaultyProxy  # noqa: E402
from tests.services import dciodvfy, free_port  # noqa: E402
from tests.helpers import run_main, write_phantom_series  # noqa: E402

from regionkd.sdk.cli_segment import main  # noqa: E402
from regionkd.sdk.dicom_seg import labels_from_segmentation  # noqa: E402
from regionkd.sdk.dicomweb import DicomwebPacs  # noqa: E402


def upload(orthanc, folder, skip=()) -> int:
    """STOW-RS every file of `folder` (but the indices in `skip`) into Orthanc; returns how many."""
    files = [f for k, f in enumerate(sorted(folder.iterdir())) if k not in skip]
    DicomwebPacs(orthanc.dicomweb).client.store_instances([pydicom.dcmread(f) for f in files])
    return len(files)


def modalities(orthanc, study) -> list[str]:
    return sorted(s.modality for s in DicomwebPacs(orthanc.dicomweb).series_of_study(study))


def segment_pacs(bundle, url, study, capsys, *extra):
    return run_main(main, [bundle, "--dicomweb", url, "--study", study, "--backend", "onnxruntime", *extra], capsys)


def test_round_trip_stores_a_seg_in_the_same_study_equal_to_the_local_result(tiny_bundle, orthanc, tmp_path,
                                                                              capsys):
    info, hu, affine = write_phantom_series(tmp_path / "ct")
    assert upload(orthanc, info.folder) == 12
    assert orthanc.count_instances() == 12
    local = tmp_path / "local"
    started = time.perf_counter()
    code, stdout, err = segment_pacs(tiny_bundle, orthanc.dicomweb, info.study_instance_uid, capsys,
                                     "-o", local, "--output-type", "both", "--statistics", "--report",
                                     tmp_path / "run.json")
    seconds = time.perf_counter() - started
    assert code == 0, err
    print(f"PACS round trip of a 40x36x12 phantom: {seconds:.2f} s")
    # Orthanc now holds the CT series and one SEG in the same study
    assert orthanc.count_instances() == 13
    assert modalities(orthanc, info.study_instance_uid) == ["CT", "SEG"]
    pacs = DicomwebPacs(orthanc.dicomweb)
    seg_ref = [s for s in pacs.series_of_study(info.study_instance_uid) if s.modality == "SEG"][0]
    (seg_uid,) = pacs.instances_of_series(info.study_instance_uid, seg_ref.series_instance_uid)
    stored = pacs.client.retrieve_instance(info.study_instance_uid, seg_ref.series_instance_uid, seg_uid)
    assert stored.StudyInstanceUID == info.study_instance_uid
    assert stored.FrameOfReferenceUID == info.frame_of_reference_uid
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_instance_uid
    # its frames equal the local result of the same run and of a separate run on the local series
    from_pacs = labels_from_segmentation(stored, info.sop_instance_uids)
    same_run = np.asarray(nib.load(str(local / f"{info.series_instance_uid}.nii.gz")).dataobj)
    assert set(np.unique(from_pacs)) == {0, 1, 2}
    assert np.array_equal(from_pacs, same_run)
    code, _, err = run_main(main, [tiny_bundle, info.folder, "-o", tmp_path / "file.nii.gz", "--backend",
                                   "onnxruntime", "-q"], capsys)
    assert code == 0, err
    assert np.array_equal(from_pacs, np.asarray(nib.load(str(tmp_path / "file.nii.gz")).dataobj))
    # the stored SEG is valid; the local copy is the same instance
    stored.save_as(tmp_path / "stored.dcm", enforce_file_format=True)
    errors, _, text = dciodvfy(tmp_path / "stored.dcm")
    assert errors == [], text
    assert pydicom.dcmread(local / f"{info.series_instance_uid}.seg.dcm").SOPInstanceUID == seg_uid
    # the run report says what went where, with the PACS timings and the statistics
    report = json.loads((tmp_path / "run.json").read_text())
    (record,) = report["inputs"]
    assert record["status"] == "ok" and record["outputs"]["pacs"]["sop_instance"] == seg_uid
    assert record["outputs"]["pacs"]["study"] == info.study_instance_uid
    assert {"pacs_query", "pacs_retrieve", "pacs_segment", "pacs_store"} <= set(record["timings_ms"])
    assert record["statistics"]["classes"]["liver"]["voxels"] == int((same_run == 1).sum())
    assert (local / f"{info.series_instance_uid}.statistics.json").is_file()
    assert f"SEG {seg_uid} stored in study {info.study_instance_uid}" in stdout


def test_every_ct_series_of_a_study_gets_its_seg_and_other_modalities_are_left_alone(tiny_bundle, orthanc,
                                                                                   tmp_path, capsys):
    first, _, _ = write_phantom_series(tmp_path / "ct1", series_number=1)
    second, _, _ = write_phantom_series(tmp_path / "ct2", shape=(36, 40, 10), study_instance_uid=first.study_instance_uid,
                                        series_number=2)
    mr, _, _ = write_phantom_series(tmp_path / "mr", shape=(20, 20, 4), study_instance_uid=first.study_instance_uid,
                                    series_number=3, modality="MR")
    for folder in (first.folder, second.folder, mr.folder):
        upload(orthanc, folder)
    code, stdout, err = segment_pacs(tiny_bundle, orthanc.dicomweb, first.study_instance_uid, capsys, "-q")
    assert code == 0, err
    assert modalities(orthanc, first.study_instance_uid) == ["CT", "CT", "MR", "SEG", "SEG"]
    assert len(stdout.splitlines()) == 2
    # naming the MR series is refused, naming one CT series segments only that one
    code, _, err = segment_pacs(tiny_bundle, orthanc.dicomweb, first.study_instance_uid, capsys,
                                "--series", mr.series_instance_uid)
    assert code == 1 and f"series {mr.series_instance_uid}" in err and "is MR, not CT" in err
    assert modalities(orthanc, first.study_instance_uid).count("SEG") == 2


def test_a_pacs_that_is_down_or_answers_404_is_named_and_nothing_is_stored(tiny_bundle, orthanc, tmp_path, capsys):
    info, _, _ = write_phantom_series(tmp_path / "ct")
    upload(orthanc, info.folder)
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, _, err = segment_pacs(tiny_bundle, down, info.study_instance_uid, capsys)
    assert code == 1 and f"PACS {down}: not reachable" in err and "Traceback" not in err
    wrong_root = orthanc.url + "/not-dicomweb"
    code, _, err = segment_pacs(tiny_bundle, wrong_root, info.study_instance_uid, capsys)
    assert code == 1 and f"PACS {wrong_root}: QIDO-RS" in err and "HTTP 404" in err
    code, _, err = segment_pacs(tiny_bundle, orthanc.dicomweb, "1.2.3.4.5", capsys)
    assert code == 1 and "study 1.2.3.4.5 not found" in err
    assert orthanc.count_instances() == 12 and modalities(orthanc, info.study_instance_uid) == ["CT"]


def test_a_study_without_ct_is_refused(tiny_bundle, orthanc, tmp_path, capsys):
    mr, _, _ = write_phantom_series(tmp_path / "mr", modality="MR")
    upload(orthanc, mr.folder)
    code, _, err = segment_pacs(tiny_bundle, orthanc.dicomweb, mr.study_instance_uid, capsys)
    assert code == 1 and "holds no CT series (MR " in err
    assert modalities(orthanc, mr.study_instance_uid) == ["MR"]


def test_a_failing_stow_is_a_clear_error_and_stores_nothing(tiny_bundle, orthanc, tmp_path, capsys):
    info, _, _ = write_phantom_series(tmp_path / "ct")
    upload(orthanc, info.folder)
    with FaultyProxy(orthanc.url, "stow-503") as proxy:
        url = proxy.url + "/dicom-web"
        code, _, err = segment_pacs(tiny_bundle, url, info.study_instance_uid, capsys)
    assert code == 1
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert f"PACS {url}: STOW-RS storage of instance" in line and "HTTP 503" in line and "nothing was stored" in line
    assert orthanc.count_instances() == 12 and modalities(orthanc, info.study_instance_uid) == ["CT"]


def test_a_partial_series_is_never_segmented(tiny_bundle, orthanc, tmp_path, capsys):
    info, _, _ = write_phantom_series(tmp_path / "ct")
    upload(orthanc, info.folder)
    # the PACS lists 12 instances but WADO-RS delivers 11
    with FaultyProxy(orthanc.url, "wado-drop-one") as proxy:
        code, _, err = segment_pacs(tiny_bundle, proxy.url + "/dicom-web", info.study_instance_uid, capsys)
    assert code == 1 and "is incomplete: the PACS lists 12 instance(s), WADO-RS returned 11" in err
    assert modalities(orthanc, info.study_instance_uid) == ["CT"]
    # a series that arrived with a slice missing in the middle
    orthanc.clear()
    gap, _, _ = write_phantom_series(tmp_path / "gap")
    upload(orthanc, gap.folder, skip={5})
    code, _, err = segment_pacs(tiny_bundle, orthanc.dicomweb, gap.study_instance_uid, capsys)
    assert code == 1 and "slice spacing varies" in err and "a slice is missing" in err
    assert modalities(orthanc, gap.study_instance_uid) == ["CT"] and orthanc.count_instances() == 11


def test_dicomweb_options_are_checked_before_anything_runs(tiny_bundle, tmp_path, capsys):
    code, _, err = run_main(main, [tiny_bundle, "--dicomweb", "http://127.0.0.1:1/dicom-web"], capsys)
    assert code == 2 and "--dicomweb needs --study" in err
    code, _, err = run_main(main, [tiny_bundle, tmp_path, "--dicomweb", "http://x/dicom-web", "--study", "1.2"], capsys)
    assert code == 2 and "not both" in err
    code, _, err = run_main(main, [tiny_bundle, "--study", "1.2", "-o", tmp_path], capsys)
    assert code == 2 and "go with --dicomweb" in err
    code, _, err = run_main(main, [tiny_bundle, "--dicomweb", "pacs:8042", "--study", "1.2"], capsys)
    assert code == 1 and "must start with http:// or https://" in err

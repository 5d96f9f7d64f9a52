"""DICOM SEG output: written with highdicom, read back voxel for voxel equal to the NIfTI
mask of the same run (with highdicom and, independently, with pydicom alone), coded with SNOMED CT,
identifying the algorithm and the bundle's manifest, referencing the source series, and valid
for dciodvfy (no errors, no warnings)."""
from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed")
pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")

from tests.services import dciodvfy  # noqa: E402
from tests.helpers import build_tiny_bundle, run_main, write_phantom_series  # noqa: E402

from regionkd.sdk import Segmenter  # noqa: E402
from regionkd.sdk.cli_segment import main  # noqa: E402
from regionkd.sdk.dicom_io import load_dicom_series  # noqa: E402
from regionkd.sdk.dicom_seg import labels_from_segmentation, segment_codes  # noqa: E402
from regionkd.sdk.errors import InputError  # noqa: E402

#: dciodvfy warnings accepted on our SEG files, each with the reason (none: it reports none today)
ACCEPTED_WARNINGS: dict[str, str] = {}


@pytest.fixture
def series(tmp_path):
    info, hu, affine = write_phantom_series(tmp_path / "ct")
    return info


def pydicom_labels(path, sop_uids) -> np.ndarray:
    """The SEG's label volume decoded with pydicom alone (no highdicom): each frame's segment
    number and source image from its functional groups, its bits from pixel_array."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    index = {uid: k for k, uid in enumerate(sop_uids)}
    out = np.zeros((int(ds.Columns), int(ds.Rows), len(sop_uids)), dtype=np.uint8)
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[:, :, index[source]][frame.T > 0] = segment
    return out


def test_seg_and_nifti_of_one_run_agree_voxel_for_voxel(tiny_bundle, series, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run_main(main, [tiny_bundle, series.folder, "-o", out, "--output-type", "both",
                                        "--backend", "onnxruntime"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "ct.seg.dcm"]
    mask = np.asarray(nib.load(str(out / "ct.nii.gz")).dataobj)
    assert set(np.unique(mask)) == {0, 1, 2}
    uids = load_dicom_series(series.folder).sop_instance_uids
    assert np.array_equal(labels_from_segmentation(out / "ct.seg.dcm", uids), mask)     # highdicom
    assert np.array_equal(pydicom_labels(out / "ct.seg.dcm", uids), mask)               # pydicom alone
    assert "ct.seg.dcm" in stdout


def test_seg_codes_algorithm_and_references(tiny_bundle, series, tmp_path):
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        result = seg.segment_file(series.folder, tmp_path / "ct.seg.dcm", output_type="dicom-seg")
    assert result.outputs == {"dicom-seg": str(tmp_path / "ct.seg.dcm")}
    ds = pydicom.dcmread(tmp_path / "ct.seg.dcm")
    source = pydicom.dcmread(sorted(series.folder.iterdir())[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert ds.Modality == "SEG"
    # the same patient, study and frame of reference; the source series and all its instances referenced
    assert ds.StudyInstanceUID == series.study_instance_uid and ds.PatientID == source.PatientID
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert ds.SeriesInstanceUID != series.series_instance_uid
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == series.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(series.sop_instance_uids)
    # one segment per non-background class, coded with SNOMED CT
    segments = {s.SegmentNumber: s for s in ds.SegmentSequence}
    assert sorted(segments) == [1, 2]
    liver, tumour = segments[1], segments[2]
    assert liver.SegmentLabel == "liver" and tumour.SegmentLabel == "tumour"
    code = lambda item: (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)  # noqa: E731
    assert code(liver.SegmentedPropertyCategoryCodeSequence[0]) == ("91723000", "SCT", "Anatomical Structure")
    assert code(liver.SegmentedPropertyTypeCodeSequence[0]) == ("10200004", "SCT", "Liver")
    assert code(tumour.SegmentedPropertyCategoryCodeSequence[0]) == ("49755003", "SCT",
                                                                      "Morphologically Abnormal Structure")
    assert code(tumour.SegmentedPropertyTypeCodeSequence[0]) == ("108369006", "SCT", "Neoplasm")
    assert code(tumour.AnatomicRegionSequence[0]) == ("10200004", "SCT", "Liver")
    # algorithm identification: name, version (the manifest's metadata, here none), the manifest's sha256
    for s in (liver, tumour):
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        (algo,) = s.SegmentationAlgorithmIdentificationSequence
        assert algo.AlgorithmName == "tiny-threshold" and algo.AlgorithmVersion == "unversioned"
        assert code(algo.AlgorithmFamilyCodeSequence[0]) == ("123110", "DCM", "Artificial Intelligence")
        params = dict(p.split("=", 1) for p in algo.AlgorithmParameters.split(","))
        assert params["manifest_sha256"] == hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()
        assert params["precision"] == "fp32" and params["backend"] == "onnxruntime"
    assert ds.Manufacturer == "regionkd" and ds.ManufacturerModelName == "tiny-threshold"


def test_dciodvfy_reports_no_error_and_no_unexplained_warning(tiny_bundle, series, tmp_path):
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        seg.segment_file(series.folder, tmp_path / "ct.seg.dcm", output_type="dicom-seg")
    errors, warnings, text = dciodvfy(tmp_path / "ct.seg.dcm")
    assert errors == [], text
    assert [w for w in warnings if not any(key in w for key in ACCEPTED_WARNINGS)] == [], text
    assert text.strip().startswith("Segmentation")          # dciodvfy recognised the IOD it checked
    errors, warnings, text = dciodvfy(sorted(series.folder.iterdir())[0])    # and the phantom CT it came from
    assert errors == [] and warnings == [], text


def test_a_class_the_model_did_not_find_still_has_its_empty_segment(tiny_bundle, tmp_path):
    from tests.helpers import AIR

    from regionkd.sdk.dicom_write import write_ct_series

    hu = np.full((32, 32, 6), AIR, np.float32)     # the network size: no resize, no blurred edge
    hu[4:20, 4:20, 1:5] = 80.0                      # liver only, no tumour
    hu[3, 3, :] = -100.0                            # not constant fat
    info = write_ct_series(hu, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path / "ct")
    with Segmenter(tiny_bundle, backend="onnxruntime", allow_implausible=True) as seg:
        result = seg.segment_file(info.folder, tmp_path / "m.nii.gz", output_type="both")
    mask = np.asarray(result.mask.dataobj)
    assert 2 not in np.unique(mask)
    ds = pydicom.dcmread(tmp_path / "m.seg.dcm")
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "tumour"]
    assert np.array_equal(labels_from_segmentation(tmp_path / "m.seg.dcm", info.sop_instance_uids), mask)


def test_nifti_input_with_dicom_seg_is_refused_clearly(tiny_bundle, phantom_nifti, tmp_path, capsys):
    out = tmp_path / "masks"
    out.mkdir()
    for output_type in ("dicom-seg", "both"):
        code, _, err = run_main(main, [tiny_bundle, phantom_nifti, "-o", out, "--output-type", output_type,
                                       "--backend", "onnxruntime"], capsys)
        assert code == 1
        (line,) = [l for l in err.splitlines() if l.startswith("error:")]
        assert str(phantom_nifti) in line and "needs a DICOM series folder as input" in line
        assert list(out.iterdir()) == []
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg, pytest.raises(InputError, match="DICOM series"):
        seg.segment_file(phantom_nifti, tmp_path / "x.seg.dcm", output_type="dicom-seg")


def test_seg_file_names_and_one_input_rules(tiny_bundle, series, tmp_path, capsys):
    code, _, err = run_main(main, [tiny_bundle, series.folder, "-o", tmp_path / "one.dcm", "--output-type",
                                   "dicom-seg", "--backend", "onnxruntime", "-q"], capsys)
    assert code == 0 and (tmp_path / "one.dcm").is_file()
    code, _, err = run_main(main, [tiny_bundle, series.folder, "-o", tmp_path / "one.nii.gz", "--output-type",
                                   "dicom-seg", "--backend", "onnxruntime"], capsys)
    assert code == 1 and "a DICOM SEG file ending in .dcm" in err
    second = tmp_path / "ct2"
    shutil.copytree(series.folder, second)
    out = tmp_path / "segs"
    code, _, err = run_main(main, [tiny_bundle, series.folder, second, "-o", out, "--output-type", "dicom-seg",
                                   "--backend", "onnxruntime", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ct.seg.dcm", "ct2.seg.dcm"]


def test_segment_codes_from_names_or_the_manifest(tmp_path, series):
    kidney = segment_codes(["background", "kidney", "tumour"])
    assert kidney[0]["type"] == ("64033007", "SCT", "Kidney") and kidney[1]["region"] == ("64033007", "SCT", "Kidney")
    with pytest.raises(InputError, match="no SNOMED CT code for the class 'vessel'"):
        segment_codes(["background", "vessel"])
    # a bundle whose class has no built-in code can name it in model.segment_codes (checked by the schema)
    bundle = build_tiny_bundle(tmp_path / "coded.bundle", precisions=("fp32",))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["class_names"] = ["background", "liver", "hepatic mass"]
    manifest["model"]["segment_codes"] = {"hepatic mass": {"category": ["49755003", "SCT", "Morphologically Abnormal "
                                                                        "Structure"],
                                                           "type": ["4147007", "SCT", "Mass"],
                                                           "anatomic_region": ["10200004", "SCT", "Liver"]}}
    manifest["metadata"] = {"version": "2.0.1"}
    from regionkd.sdk.bundle import write_manifest

    write_manifest(bundle, manifest)
    with Segmenter(bundle, backend="onnxruntime") as seg:
        seg.segment_file(series.folder, tmp_path / "c.seg.dcm", output_type="dicom-seg")
    ds = pydicom.dcmread(tmp_path / "c.seg.dcm")
    mass = ds.SegmentSequence[1]
    assert mass.SegmentLabel == "hepatic mass" and mass.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    assert mass.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "2.0.1"
    manifest["model"]["segment_codes"] = {"spleen": manifest["model"]["segment_codes"]["hepatic mass"]}
    from regionkd.sdk.errors import BundleError

    with pytest.raises(BundleError, match="segment_codes.*'spleen' is not one of the class names"):
        write_manifest(bundle, manifest)

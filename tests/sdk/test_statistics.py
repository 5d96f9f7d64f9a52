"""Statistics: per class voxels, volume in ml, HU mean/SD/min/max; lesions: count, largest
volume and longest in-plane diameter. The volume of a phantom of known geometry is checked to 2%,
through the whole pipeline (the tiny threshold model segments its ellipsoid and spheres exactly)."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from tests.helpers import AIR, FAT, LIVER, TUMOUR, build_tiny_bundle, run_main

from regionkd.sdk import Segmenter, compute_statistics
from regionkd.sdk.cli_segment import main
from regionkd.sdk.statistics import longest_in_plane_diameter_mm

SHAPE = (96, 96, 48)                 # the slices are the network size: no resize blurs the edges
SPACING = (0.7, 0.8, 1.5)
LIVER_AXES_MM = (24.0, 20.0, 27.0)   # ellipsoid semi-axes
TUMOURS = [((-6.0, 2.0, -4.0), 7.0), ((10.0, -6.0, 12.0), 4.0)]   # (centre mm, radius mm), inside the liver


def known_phantom():
    """(hu, affine, analytic volumes in ml): an ellipsoid liver holding two spherical tumours, in fat."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE, SPACING)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    hu = np.full(SHAPE, AIR, np.float32)
    hu[(x / 32) ** 2 + (y / 36) ** 2 <= 1] = FAT
    a, b, c = LIVER_AXES_MM
    hu[(x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1] = LIVER
    for (cx, cy, cz), r in TUMOURS:
        hu[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r] = TUMOUR
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(SHAPE, SPACING)]
    ml = lambda v: v / 1000.0  # noqa: E731
    tumours = [ml(4 / 3 * math.pi * r ** 3) for _, r in TUMOURS]
    return hu, affine, {"liver_and_tumours": ml(4 / 3 * math.pi * a * b * c), "tumours": tumours}


@pytest.fixture(scope="module")
def known_bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("b") / "known.bundle", input_size=SHAPE[:2],
                             precisions=("fp32",))


def test_the_volume_of_a_known_phantom_is_right_to_two_percent(known_bundle):
    hu, affine, truth = known_phantom()
    with Segmenter(known_bundle, backend="onnxruntime") as seg:
        result = seg.segment(hu, affine, statistics=True)
    stats = result.statistics
    liver, tumour = stats["classes"]["liver"], stats["classes"]["tumour"]
    measured = liver["volume_ml"] + tumour["volume_ml"]
    err_total = measured / truth["liver_and_tumours"] - 1
    err_tumour = tumour["volume_ml"] / sum(truth["tumours"]) - 1
    err_largest = tumour["lesions"]["largest_volume_ml"] / truth["tumours"][0] - 1
    print(f"liver+tumours {measured:.3f} ml vs {truth['liver_and_tumours']:.3f} ml ({100 * err_total:+.2f}%); "
          f"tumours {tumour['volume_ml']:.3f} vs {sum(truth['tumours']):.3f} ml ({100 * err_tumour:+.2f}%); "
          f"largest {100 * err_largest:+.2f}%")
    assert abs(err_total) < 0.02 and abs(err_tumour) < 0.02 and abs(err_largest) < 0.02
    # exact bookkeeping: voxels times the voxel volume, HU inside each mask
    mask = np.asarray(result.mask.dataobj)
    voxel_ml = float(np.prod(SPACING)) / 1000
    assert liver["voxels"] == int((mask == 1).sum()) and liver["volume_ml"] == pytest.approx(liver["voxels"] * voxel_ml,
                                                                                               abs=1e-4)
    assert liver["hu"] == {"mean": LIVER, "sd": 0.0, "min": LIVER, "max": LIVER}
    assert tumour["hu"]["mean"] == TUMOUR and tumour["hu"]["sd"] == 0.0
    # two lesions; the largest one's longest in-plane diameter is its diameter, to within a voxel diagonal
    assert tumour["lesions"]["count"] == 2
    assert 2 * 7.0 <= tumour["lesions"]["largest_diameter_mm"] <= 2 * 7.0 + math.hypot(*SPACING[:2])
    assert "lesions" not in liver and stats["format"] == "regionkd-statistics/1"
    assert stats["voxel_volume_ml"] == pytest.approx(voxel_ml)


def test_statistics_do_not_depend_on_how_the_volume_is_stored(known_bundle):
    """The same phantom stored slice-axis-first and flipped gives the same numbers."""
    hu, affine, _ = known_phantom()
    with Segmenter(known_bundle, backend="onnxruntime") as seg:
        plain = seg.segment(hu, affine, statistics=True).statistics
        stored = np.flip(np.transpose(hu, (2, 0, 1)), axis=1)        # (z, x, y), x reversed
        perm = np.zeros((4, 4))
        perm[:3, :3] = affine[:3, :3][:, [2, 0, 1]]
        perm[:, 1] *= -1                                               # x runs backwards
        perm[:3, 3] = affine[:3, 3] + affine[:3, 0] * (SHAPE[0] - 1)
        perm[3, 3] = 1
        other = seg.segment(stored, perm, statistics=True).statistics
    assert plain["classes"] == other["classes"]


def test_diameter_of_a_rectangle_and_an_oblique_pixel_grid():
    rect = np.zeros((20, 10, 3), bool)
    rect[2:12, 3:7, 1] = True                     # 10 x 4 voxels of 1 x 2 mm: corners 10 mm x 8 mm apart
    assert longest_in_plane_diameter_mm(rect, np.diag([1.0, 2.0, 3.0, 1.0])) == pytest.approx(math.hypot(10, 8))
    theta = math.radians(30)                      # the same grid rotated in plane: the same diameter
    rot = np.eye(4)
    rot[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    assert longest_in_plane_diameter_mm(rect, rot @ np.diag([1.0, 2.0, 3.0, 1.0])) == pytest.approx(math.hypot(10, 8))


def test_empty_classes_and_no_lesion():
    mask = np.zeros((8, 8, 4), np.uint8)
    stats = compute_statistics(mask, np.zeros((8, 8, 4)), np.eye(4), ["background", "kidney", "tumour"])
    assert stats["classes"]["kidney"] == {"label": 1, "voxels": 0, "volume_ml": 0.0,
                                          "hu": {"mean": None, "sd": None, "min": None, "max": None}}
    assert stats["classes"]["tumour"]["lesions"] == {"count": 0, "largest_volume_ml": None,
                                                     "largest_diameter_mm": None}


def test_cli_writes_statistics_json_beside_the_mask_and_into_the_report(known_bundle, tmp_path, capsys):
    hu, affine, truth = known_phantom()
    img = nib.Nifti1Image(hu.astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(tmp_path / "case_7.nii.gz"))
    out = tmp_path / "masks"
    code, stdout, err = run_main(main, [known_bundle, tmp_path / "case_7.nii.gz", tmp_path / "missing.nii.gz",
                                        "-o", out, "--statistics", "--report", tmp_path / "run.json",
                                        "--backend", "onnxruntime"], capsys)
    assert code == 1                                            # the missing input failed, the other did not
    assert sorted(p.name for p in out.iterdir()) == ["case_7.nii.gz", "case_7.statistics.json"]
    stats = json.loads((out / "case_7.statistics.json").read_text())
    assert stats["input"] == str(tmp_path / "case_7.nii.gz")
    total = stats["classes"]["liver"]["volume_ml"] + stats["classes"]["tumour"]["volume_ml"]
    assert abs(total / truth["liver_and_tumours"] - 1) < 0.02
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["format"] == "regionkd-run-report/1" and report["summary"] == {"inputs": 2, "ok": 1, "failed": 1,
                                                                                   "with_warnings": 0}
    ok, failed = report["inputs"]
    assert ok["status"] == "ok" and ok["statistics"] == stats and ok["shape"] == list(SHAPE)
    assert ok["outputs"] == {"nifti": str(out / "case_7.nii.gz"), "statistics": str(out / "case_7.statistics.json")}
    assert set(ok["timings_ms"]) >= {"load", "preprocess", "inference", "postprocess", "write", "statistics", "total"}
    assert failed["status"] == "failed" and "missing.nii.gz" in failed["error"] and failed["statistics"] is None

"""Input that is not a plausible CT is refused, not segmented confidently:
constant images, not Hounsfield units, absurd scaling, complex voxels, no geometry, an ambiguous
axial plane. --allow-implausible turns those refusals into warnings; obliquity and spacing far from
the training spacing are always warned, in result.warnings and on the CLI's per-volume line."""
from __future__ import annotations

import io
import re

import nibabel as nib
import numpy as np
import pytest
from tests.helpers import make_phantom, run_main

from regionkd.sdk.cli_segment import main
from regionkd.sdk.errors import InputError
from regionkd.sdk.segmenter import Segmenter

SHAPE = (40, 36, 12)


def _phantom():
    return make_phantom(shape=SHAPE)


def save(path, data, affine, qcode=1, scode=1, slope=None):
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))   # nibabel sets an sform on save: patch the codes
    hdr["qform_code"], hdr["sform_code"] = qcode, scode
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope
    raw[:348] = hdr.binaryblock
    import gzip
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def tilted(affine, degrees, axis=0):
    """`affine` rotated by `degrees` about world axis `axis` (x: a gantry tilt)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(4)
    rot[[i, i, j, j], [i, j, i, j]] = [c, -s, s, c]
    return rot @ affine


def implausible(kind, folder):
    hu, aff = _phantom()
    path = folder / f"{kind}.nii.gz"
    if kind == "zeros":
        return save(path, np.zeros(SHAPE, np.int16), aff), r"constant or near-constant image \(every voxel 0\)"
    if kind == "binary":
        return save(path, (hu > 0).astype(np.uint8), aff), r"constant or near-constant image \(every voxel within 0\.\.1\)"
    if kind == "uint8":
        return save(path, np.clip((hu + 1000) / 4, 0, 255).astype(np.uint8), aff), r"an 8-bit picture, not Hounsfield"
    if kind == "huge-constant":
        return save(path, np.full(SHAPE, 3e38, np.float32), aff), r"every voxel 3e\+38"
    if kind == "slope-1e30":
        return save(path, hu.astype(np.int16), aff, slope=(1e30, 0)), r"scl_slope 1e\+30 .*values up to .* beyond any CT scale"
    if kind == "complex":
        return save(path, (hu + 500j).astype(np.complex64), aff), r"complex64 \(complex\) voxels"
    if kind == "no-qform-sform":
        return save(path, hu.astype(np.int16), aff, qcode=0, scode=0), r"neither a qform nor an sform"
    if kind == "tilt-46":
        return save(path, hu.astype(np.int16), tilted(aff, 46)), r"oblique: .* the axial plane is ambiguous; name the axial voxel axis"
    if kind == "not-hu":
        return save(path, (hu + 5000).astype(np.int16), aff), r"only 0% of voxels near soft-tissue values"
    raise AssertionError(kind)


KINDS = ["zeros", "binary", "uint8", "huge-constant", "slope-1e30", "complex", "no-qform-sform", "tilt-46", "not-hu"]


def run(argv, capsys):
    return run_main(main, argv, capsys)


@pytest.mark.parametrize("kind", KINDS)
def test_implausible_volume_is_refused_naming_file_and_reason(kind, tiny_bundle, tmp_path, capsys):
    path, reason = implausible(kind, tmp_path)
    out = tmp_path / "masks"
    code, _, err = run([tiny_bundle, path, "-o", out / "m.nii.gz", "--backend", "onnxruntime"], capsys)
    assert code == 1
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert str(path) in line and re.search(reason, line), line
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_allow_implausible_segments_with_the_reason_as_a_warning(kind, tiny_bundle, tmp_path, capsys):
    path, reason = implausible(kind, tmp_path)
    out = tmp_path / "m.nii.gz"
    code, stdout, err = run([tiny_bundle, path, "-o", out, "--backend", "onnxruntime", "--allow-implausible"], capsys)
    assert code == 0, err
    (line,) = [l for l in stdout.splitlines() if str(path) in l]
    assert "warning: implausible: " in line and re.search(reason, line), line
    assert out.is_file()


def test_the_api_refuses_or_warns_the_same(tiny_bundle, tmp_path):
    hu, aff = _phantom()
    flat = nib.Nifti1Image(np.zeros(SHAPE, np.float32), aff)
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        with pytest.raises(InputError, match=r"scan-3: not a plausible CT volume: a constant"):
            seg.segment(flat, name="scan-3")
        img = nib.Nifti1Image(hu, aff)
        img.header.set_sform(None, code=0)
        with pytest.raises(InputError, match="neither a qform nor an sform"):
            seg.segment(img, name="scan-4")
        with pytest.raises(InputError, match="complex"):
            seg.segment(nib.Nifti1Image(hu.astype(np.complex64), aff), name="scan-5")
    with Segmenter(tiny_bundle, backend="onnxruntime", allow_implausible=True) as seg:
        result = seg.segment(flat)
    assert any("constant" in w for w in result.warnings)


def test_a_plausible_scan_has_no_warnings_and_records_its_geometry(tiny_bundle, tmp_path):
    hu, aff = _phantom()
    path = save(tmp_path / "ct.nii.gz", hu.astype(np.int16), aff)
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        result = seg.segment_file(path, tmp_path / "m.nii.gz")
    assert result.warnings == [] and result.obliquity_deg == 0.0 and result.axial_axis == 2
    assert result.spacing_mm == (0.8, 0.9, 2.5)
    assert result.bundle_signature == "unsigned (no trusted key configured)"


@pytest.mark.parametrize("name, make", [
    # a scan cropped to the abdomen, no air at all: fat, organs, contrast-enhanced vessels
    ("cropped, no air", lambda hu: np.clip(hu, -120, None)),
    # padding outside the reconstruction circle, as Siemens/GE write it
    ("padding -3024", lambda hu: np.where(np.arange(SHAPE[0])[:, None, None] < 3, -3024.0, hu)),
    # a dense metal implant in an otherwise normal scan
    ("metal", lambda hu: np.where(np.arange(SHAPE[0])[:, None, None] == 20, 30000.0, hu)),
])
def test_real_scan_features_are_not_refused(tiny_bundle, tmp_path, name, make):
    hu, aff = _phantom()
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        result = seg.segment(nib.Nifti1Image(make(hu).astype(np.float32), aff))
    assert result.warnings == [], name


def test_oblique_volumes_warn_and_record_the_angle(tiny_bundle, tmp_path, capsys):
    hu, aff = _phantom()
    path = save(tmp_path / "tilt30.nii.gz", hu.astype(np.int16), tilted(aff, 30))
    code, stdout, _ = run([tiny_bundle, path, "-o", tmp_path / "m.nii.gz", "--backend", "onnxruntime"], capsys)
    assert code == 0 and "warning: oblique by 30.0 degrees" in stdout
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        small = seg.segment(nib.Nifti1Image(hu, tilted(aff, 10)))
        assert small.warnings == [] and small.obliquity_deg == pytest.approx(10.0, abs=0.01)
        big = seg.segment(nib.Nifti1Image(hu, tilted(aff, 30)))
        assert big.obliquity_deg == pytest.approx(30.0, abs=0.01) and big.axial_axis == 2


def test_near_the_45_degree_tie_the_axial_axis_must_be_named(tiny_bundle, tmp_path, capsys):
    hu, aff = _phantom()
    for degrees in (41, 44, 46, 49):
        img = nib.Nifti1Image(hu, tilted(aff, degrees))
        with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
            with pytest.raises(InputError, match="axial plane is ambiguous"):
                seg.segment(img)
            named = seg.segment(img, axial_axis=2)
        assert named.axial_axis == 2 and any("oblique by" in w for w in named.warnings)
    # slicing is explicit: the 46-degree volume sliced along voxel axis 2 gives the mask of the
    # 44-degree one (both 44-46 degrees off), not the coronal slicing nibabel's tie-break picks
    with Segmenter(tiny_bundle, backend="onnxruntime", axial_axis=2) as seg:
        at44 = np.asarray(seg.segment(nib.Nifti1Image(hu, tilted(aff, 44))).mask.dataobj)
        at46 = np.asarray(seg.segment(nib.Nifti1Image(hu, tilted(aff, 46))).mask.dataobj)
    assert np.array_equal(at44, at46)
    path = save(tmp_path / "t46.nii.gz", hu.astype(np.int16), tilted(aff, 46))
    code, stdout, _ = run([tiny_bundle, path, "-o", tmp_path / "m.nii.gz", "--backend", "onnxruntime",
                           "--axial-axis", "2"], capsys)
    assert code == 0 and "warning: oblique by 46.0 degrees" in stdout


@pytest.mark.parametrize("spacing, what", [(0.2, "in-plane spacing 0.2 x 0.2 mm"), (10.0, "in-plane spacing 10 x 10 mm")])
def test_spacing_far_from_the_training_spacing_is_warned(tiny_bundle, tmp_path, capsys, spacing, what):
    hu, aff = _phantom()
    aff = aff.copy()
    aff[0, 0] = aff[1, 1] = spacing
    path = save(tmp_path / "ct.nii.gz", hu.astype(np.int16), aff)
    code, stdout, _ = run([tiny_bundle, path, "-o", tmp_path / "m.nii.gz", "--backend", "onnxruntime"], capsys)
    assert code == 0
    (line,) = [l for l in stdout.splitlines() if "ct.nii.gz" in l]
    assert f"warning: {what} is far outside the 0.6-1 mm the model was trained at" in line
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        result = seg.segment_file(path, tmp_path / "m2.nii.gz")
    assert any(what in w for w in result.warnings)


def test_a_bundle_without_training_spacing_says_spacing_was_not_checked(tmp_path):
    import json

    from tests.helpers import build_tiny_bundle

    root = build_tiny_bundle(tmp_path / "old.bundle", precisions=("fp32",))
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["preprocessing"]["spacing"]
    from regionkd.sdk.bundle import write_manifest
    write_manifest(root, manifest)
    hu, aff = _phantom()
    with Segmenter(root, backend="onnxruntime") as seg:
        result = seg.segment(nib.Nifti1Image(hu, aff))
    assert result.warnings == ["the bundle does not record the spacing the model was trained at "
                               "(preprocessing.spacing): the voxel spacing is not checked"]


def test_large_volumes_are_judged_on_a_sample_and_say_so(tiny_bundle):
    from regionkd.sdk.plausibility import Findings, check_intensities

    findings = Findings("big")
    check_intensities(findings, np.zeros((128, 128, 64), np.float32))
    assert findings.refusals == ["a constant or near-constant image (every one of 131,072 sampled voxels 0); "
                                 "a CT spans hundreds of HU"]

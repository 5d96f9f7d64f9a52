"""regionkd-segment: every bad input gives a clear message naming it, a non-zero exit and no output
file; good inputs among bad ones are still written."""
from __future__ import annotations

import importlib.util
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import make_phantom, run_main
from PIL import Image

from regionkd.sdk.cli_segment import main


def run(argv, capsys):
    return run_main(main, argv, capsys)


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def bad_input(kind, tmp_path, phantom_nifti):
    hu, affine = make_phantom(shape=(16, 16, 4), with_distractor=False)
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "missing":
        return path, "does not exist"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "empty"
    if kind == "truncated":
        data = phantom_nifti.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated|corrupt"
    if kind == "not-nifti":
        path = tmp_path / "notes.nii"
        path.write_text("patient notes, not an image\n" * 20)
        return path, "NIfTI|corrupt"
    if kind == "2d":
        return save(path, hu[:, :, 0], affine), "2D"
    if kind == "4d":
        return save(path, np.stack([hu, hu], axis=-1), affine), "4D"
    if kind == "nan":
        return save(path, np.where(hu > 50, np.nan, hu).astype(np.float32), affine), "NaN"
    if kind == "inf":
        return save(path, np.where(hu > 50, -np.inf, hu).astype(np.float32), affine), "infinite"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "empty", "truncated", "not-nifti", "2d", "4d", "nan", "inf"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_volume_is_named_and_leaves_no_output(kind, tiny_bundle, phantom_nifti, tmp_path, capsys):
    path, message = bad_input(kind, tmp_path, phantom_nifti)
    out_dir = tmp_path / "masks"
    code, out, err = run([tiny_bundle, path, "-o", out_dir / "mask.nii.gz", "--backend", "onnxruntime"], capsys)
    assert code == 1
    error_lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and path.name in error_lines[0]
    assert re.search(message, error_lines[0]), error_lines[0]
    assert leftovers(out_dir) == []


def test_good_input_among_bad_ones_is_still_written(tiny_bundle, phantom_nifti, tmp_path, capsys):
    bad = [bad_input(kind, tmp_path, phantom_nifti)[0] for kind in ("missing", "truncated", "nan")]
    good = tmp_path / "good" / "case_001.nii.gz"
    good.parent.mkdir()
    shutil.copy(phantom_nifti, good)
    out_dir = tmp_path / "masks"
    code, out, err = run([tiny_bundle, bad[0], good, *bad[1:], "-o", out_dir, "--backend", "onnxruntime"], capsys)
    assert code == 1
    assert leftovers(out_dir) == ["case_001.nii.gz"]
    assert sum(l.startswith("error:") for l in err.splitlines()) == 3
    assert "1 of 4 volumes segmented" in err
    assert "case_001.nii.gz" in out and "inference" in out     # the per-volume timing line
    mask = nib.load(str(out_dir / "case_001.nii.gz"))
    assert np.array_equal(mask.affine, nib.load(str(good)).affine)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}


def test_folder_input_quiet_and_preview(tiny_bundle, phantom_nifti, tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(phantom_nifti, folder / name)
    (folder / "README.txt").write_text("not a volume")
    out_dir = tmp_path / "masks"
    code, out, err = run([tiny_bundle, folder, "-o", out_dir, "--backend", "onnxruntime", "--quiet",
                          "--preview", tmp_path / "prev.png"], capsys)
    assert code == 0 and out == "" and err == ""
    assert leftovers(out_dir) == ["a.nii.gz", "b.nii.gz"]
    png = np.asarray(Image.open(tmp_path / "prev_a.png").convert("RGB")).astype(int)
    assert (tmp_path / "prev_b.png").is_file()
    green = (png[..., 1] > png[..., 0] + 40) & (png[..., 1] > png[..., 2] + 40)   # liver overlay
    red = (png[..., 0] > png[..., 1] + 40) & (png[..., 0] > png[..., 2] + 40)     # tumour overlay
    assert green.sum() > 100 and red.sum() > 5


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "model.fp32.onnx").unlink(), r"model\.fp32\.onnx.*missing"),
    (lambda b: (b / "model.fp32.onnx").write_bytes(b"x" * (b / "model.fp32.onnx").stat().st_size),
     r"model\.fp32\.onnx.*wrong checksum"),
])
def test_damaged_bundle_is_refused(damage, message, tiny_bundle, phantom_nifti, tmp_path, capsys):
    bundle = tmp_path / "damaged.bundle"
    shutil.copytree(tiny_bundle, bundle)
    damage(bundle)
    out = tmp_path / "mask.nii.gz"
    code, _, err = run([bundle, phantom_nifti, "-o", out], capsys)
    assert code == 1 and out.name not in leftovers(tmp_path)
    assert re.search(message, err), err


@pytest.mark.parametrize("option, value", [("--backend", "openvino"), ("--precision", "fp8")])
def test_unknown_backend_or_precision_is_named(option, value, tiny_bundle, phantom_nifti, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    code, _, err = run([tiny_bundle, phantom_nifti, "-o", out, option, value], capsys)
    assert code == 2 and value in err and option in err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_says_why(tiny_bundle, phantom_nifti, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    code, _, err = run([tiny_bundle, phantom_nifti, "-o", out, "--backend", "tensorrt"], capsys)
    assert code == 1 and "backend tensorrt cannot run here" in err and "error:" in err
    assert not out.exists()


def test_several_inputs_need_an_output_folder(tiny_bundle, phantom_nifti, tmp_path, capsys):
    code, _, err = run([tiny_bundle, phantom_nifti, phantom_nifti, "-o", tmp_path / "m.nii.gz"], capsys)
    assert code == 1 and "output folder" in err

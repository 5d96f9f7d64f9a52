"""Phantoms written in the LiTS, KiTS19 and MSD layouts read back identically, through our
readers (canonical order) and through plain nibabel; every bad pairing is a clear error."""
import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from regionkd.sdk.errors import InputError
from regionkd.train.cli_phantoms import phantoms
from regionkd.train.data import TASKS, Case, open_dataset
from regionkd.train.data.layouts import case_paths, detect_layout, write_case
from regionkd.train.data.phantoms import generate_phantom

SHAPE = (48, 40, 16)
SEED = 5


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One dataset per layout, written by the CLI (2 cases each)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for task, layout in (("liver", "lits"), ("kidney", "kits19"), ("liver", "msd"), ("kidney", "msd")):
        path = root / f"{task}-{layout}"
        res = CliRunner().invoke(phantoms, [str(path), "--task", task, "--layout", layout, "--cases", "2",
                                            "--seed", str(SEED), "--shape", ",".join(map(str, SHAPE)), "--quiet"])
        assert res.exit_code == 0, res.output
        out[(task, layout)] = path
    return out


@pytest.mark.parametrize("task,layout", [("liver", "lits"), ("kidney", "kits19"), ("liver", "msd"), ("kidney", "msd")])
def test_readers_give_back_the_generated_voxels(datasets, task, layout):
    ds = open_dataset(datasets[(task, layout)])
    assert (ds.layout, ds.task, len(ds)) == (layout, task, 2)
    for i, cid in enumerate(ds.case_ids):
        case = ds.load_case(cid)
        assert isinstance(case, Case) and case.case_id == cid
        p = generate_phantom(task, SHAPE, seed=SEED, index=i)
        assert case.volume.data.dtype == np.float32 and case.label.dtype == np.uint8
        np.testing.assert_array_equal(case.volume.data, p.hu.astype(np.float32))
        np.testing.assert_array_equal(case.label, p.label)
        np.testing.assert_allclose(case.volume.affine, p.affine, atol=1e-4)
        assert case.volume.spacing == pytest.approx(p.spacing, abs=1e-4)
        # back into the file's own order gives the file's voxels
        raw = np.asanyarray(nib.load(str(case.label_path)).dataobj)
        np.testing.assert_array_equal(case.volume.to_original(case.label), raw)


@pytest.mark.parametrize("task,layout", [("liver", "lits"), ("kidney", "kits19"), ("liver", "msd")])
def test_plain_nibabel_sees_the_label_convention(datasets, task, layout):
    ds = open_dataset(datasets[(task, layout)])
    for cid in ds.case_ids:
        img_path, seg_path = ds.paths(cid)
        img, seg = nib.load(str(img_path)), nib.load(str(seg_path))
        assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
        labels = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert 1 in labels and labels <= {0, 1, 2}
        np.testing.assert_allclose(img.affine, seg.affine)


def test_kits19_files_have_the_slice_axis_first(datasets):
    ds = open_dataset(datasets[("kidney", "kits19")])
    img = nib.load(str(ds.paths("case_00000")[0]))
    assert img.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
    # the slice axis's voxel size is the thick one, along the body axis
    sz = generate_phantom("kidney", SHAPE, seed=SEED, index=0).spacing[2]
    assert np.linalg.norm(img.affine[:3, 0]) == pytest.approx(sz, abs=1e-4)
    assert abs(img.affine[2, 0]) == pytest.approx(sz, abs=1e-4)


def test_file_names_and_dataset_json(datasets):
    lits = datasets[("liver", "lits")]
    assert (lits / "volume-0.nii").is_file() and (lits / "segmentation-1.nii").is_file()
    kits = datasets[("kidney", "kits19")]
    assert (kits / "case_00001" / "imaging.nii.gz").is_file()
    msd = datasets[("kidney", "msd")]
    assert (msd / "imagesTr" / "kidney_000_0000.nii.gz").is_file()
    assert (msd / "labelsTr" / "kidney_000.nii.gz").is_file()
    meta = json.loads((msd / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "kidney": 1, "tumour": 2} and meta["numTraining"] == 2
    assert meta["channel_names"] == {"0": "CT"}


def test_lits_cases_in_subfolders_and_msd_v1_labels(tmp_path):
    p = generate_phantom("liver", SHAPE, seed=1)
    write_case(tmp_path / "lits" / "Training Batch 1", "lits", 3, p.hu, p.label, p.affine)
    ds = open_dataset(tmp_path / "lits")
    assert ds.layout == "lits" and ds.case_ids == ["3"]
    msd = tmp_path / "Task03_Liver"
    write_case(msd, "msd", 0, p.hu, p.label, p.affine, task="liver")
    (msd / "dataset.json").write_text(json.dumps({"name": "Liver", "labels": {"0": "background", "1": "liver",
                                                                               "2": "cancer"}}))
    assert open_dataset(msd).task == "liver"


def _lits_case(root, hu, label, affine, label_affine=None):
    cid, img_path, seg_path = case_paths(root, "lits", 0)
    write_case(root, "lits", 0, hu, label, affine)
    if label_affine is not None or label.shape != hu.shape:
        nib.save(nib.Nifti1Image(label.astype(np.uint8), label_affine if label_affine is not None else affine),
                 str(seg_path))
    return img_path, seg_path


def _expect(root, *needles):
    with pytest.raises(InputError) as info:
        ds = open_dataset(root)
        ds.load_case(ds.case_ids[0])
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_reader_errors_name_the_files_and_the_problem(tmp_path):
    p = generate_phantom("liver", SHAPE, seed=2)
    aff = p.affine
    # shape mismatch
    _, seg = _lits_case(tmp_path / "shape", p.hu, p.label[:, :, :-1], aff)
    _expect(tmp_path / "shape", "shape", "volume-0.nii", "segmentation-0.nii")
    # affine mismatch (label shifted by 5 mm)
    moved = aff.copy()
    moved[0, 3] += 5.0
    _lits_case(tmp_path / "affine", p.hu, p.label, aff, label_affine=moved)
    _expect(tmp_path / "affine", "different affines", "volume-0.nii", "segmentation-0.nii")
    # unknown label value
    bad = p.label.copy()
    bad[0, 0, 0] = 3
    _lits_case(tmp_path / "labels", p.hu, bad, aff)
    _expect(tmp_path / "labels", "[3]", "segmentation-0.nii", "liver")
    # NaN voxels in the image
    img_path, _ = _lits_case(tmp_path / "nan", p.hu, p.label, aff)
    nanimg = p.hu.astype(np.float32)
    nanimg[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nanimg, aff), str(img_path))
    _expect(tmp_path / "nan", "NaN", "volume-0.nii")
    # 2D image, 4D image
    img_path, _ = _lits_case(tmp_path / "2d", p.hu, p.label, aff)
    nib.save(nib.Nifti1Image(p.hu[:, :, 0], aff), str(img_path))
    _expect(tmp_path / "2d", "2D", "volume-0.nii")
    img_path, _ = _lits_case(tmp_path / "4d", p.hu, p.label, aff)
    nib.save(nib.Nifti1Image(np.stack([p.hu, p.hu], axis=-1), aff), str(img_path))
    _expect(tmp_path / "4d", "4D", "volume-0.nii")
    # empty and unreadable files
    img_path, _ = _lits_case(tmp_path / "empty", p.hu, p.label, aff)
    img_path.write_bytes(b"")
    _expect(tmp_path / "empty", "empty", "volume-0.nii")
    img_path, _ = _lits_case(tmp_path / "garbage", p.hu, p.label, aff)
    img_path.write_bytes(img_path.read_bytes()[:2000])
    _expect(tmp_path / "garbage", "truncated", "volume-0.nii")
    # missing segmentation, unknown folder
    img_path, seg = _lits_case(tmp_path / "noseg", p.hu, p.label, aff)
    seg.unlink()
    _expect(tmp_path / "noseg", "no segmentation-0", "volume-0.nii")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="not a LiTS"):
        detect_layout(tmp_path / "nothing")


def test_any_task_in_any_layout_and_existing_output(tmp_path):
    res = CliRunner().invoke(phantoms, [str(tmp_path / "x"), "--task", "liver", "--layout", "kits19", "--cases", "1",
                                        "--shape", "24,20,10", "--seed", "4", "-q"])
    assert res.exit_code == 0, res.output
    assert open_dataset(tmp_path / "x").task == "kidney"            # what a KiTS19 folder means by default
    case = open_dataset(tmp_path / "x", task="liver").load_case("case_00000")
    assert case.task == "liver"
    np.testing.assert_array_equal(case.label, generate_phantom("liver", (24, 20, 10), seed=4).label)
    with pytest.raises(InputError, match="unknown task"):
        open_dataset(tmp_path / "x", task="lung")
    (tmp_path / "exists").mkdir()
    res = CliRunner().invoke(phantoms, [str(tmp_path / "exists"), "--cases", "1", "--shape", "16,16,8", "-q"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(phantoms, [str(tmp_path / "exists"), "--cases", "1", "--shape", "16,16,8", "-q",
                                        "--overwrite"])
    assert res.exit_code == 0 and (tmp_path / "exists" / "volume-0.nii").is_file()
    res = CliRunner().invoke(phantoms, ["--help"])
    assert "--layout" in res.output and "--seed" in res.output


def test_tasks_table():
    assert TASKS["liver"].class_names == ("background", "liver", "tumour")
    assert TASKS["liver"].window == (-60.0, 140.0) and TASKS["kidney"].window == (-200.0, 300.0)
    assert TASKS["kidney"].label_values == (0, 1, 2)

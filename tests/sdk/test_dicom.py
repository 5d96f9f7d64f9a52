"""DICOM series -> RAS nibabel image: HU from rescale slope/intercept, geometry from the slice
positions and orientation, slices sorted along the normal whatever the file order."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from regionkd.sdk.cli_segment import main  # noqa: E402
from regionkd.sdk.dicom_io import read_dicom_series  # noqa: E402
from regionkd.sdk.errors import InputError  # noqa: E402


def write_slice(path, pixels, position, orientation, spacing, slope, intercept, series_uid, instance):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.4f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.4f}" for v in spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder, stored, orientation, spacing, first_position, step, slope=1.0, intercept=-1024.0):
    """stored: (slices, rows, cols) int16. Files are written in shuffled order under random names."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    order = np.random.default_rng(3).permutation(len(stored))
    positions = [np.asarray(first_position) + k * np.asarray(step) for k in range(len(stored))]
    for n, k in enumerate(order):
        write_slice(folder / f"IM{n:04d}", stored[k], positions[k], orientation, spacing, slope, intercept, uid, k + 1)
    return positions


def lps_to_ras(p):
    return np.array([-p[0], -p[1], p[2]])


@pytest.mark.parametrize("orientation, step", [
    ([1, 0, 0, 0, 1, 0], [0, 0, 2.5]),        # axial, feet to head
    ([1, 0, 0, 0, 1, 0], [0, 0, -3.0]),       # axial, head to feet
    ([0, 1, 0, 0, 0, -1], [-1.5, 0, 0]),      # sagittal: rows along +y, columns along -z
])
def test_geometry_and_hu_from_the_series(tmp_path, orientation, step):
    n_slices, rows, cols = 5, 6, 7
    stored = np.full((n_slices, rows, cols), 1000, dtype=np.int16)      # 1000*2 - 1024 = 976 HU
    markers = [(k, (k + 1) % rows, (2 * k) % cols) for k in range(n_slices)]
    for k, r, c in markers:
        stored[k, r, c] = 1500 + k                                      # a unique value per slice
    first = [-120.0, 35.5, 410.0]
    spacing = (0.7, 0.8)                                                # between rows, between columns
    positions = write_series(tmp_path / "series", stored, orientation, spacing, first, step, slope=2.0)
    img = read_dicom_series(tmp_path / "series")
    assert img.shape == (cols, rows, n_slices)
    data = img.get_fdata()
    assert np.count_nonzero(data == 976.0) == stored.size - n_slices
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    for k, r, c in markers:
        # where the marker landed in the volume, and where it is in the patient (computed by hand)
        i, j, kk = np.argwhere(data == (1500 + k) * 2.0 - 1024.0)[0]
        assert (i, j) == (c, r)
        world_lps = positions[k] + c * spacing[1] * row_dir + r * spacing[0] * col_dir
        assert np.allclose(img.affine @ [i, j, kk, 1], [*lps_to_ras(world_lps), 1], atol=1e-3)
    # slices are ordered along the normal (increasing index = increasing position on the normal)
    normal = np.cross(row_dir, col_dir)
    assert np.dot(img.affine[:3, 2], lps_to_ras(normal)) > 0


def test_segmenting_a_dicom_folder_matches_the_nifti(tiny_bundle, tmp_path, capsys):
    from tests.helpers import make_phantom

    hu, _ = make_phantom(shape=(20, 18, 6), with_distractor=False)     # (x, y, z) in DICOM LPS order here
    stored = np.transpose(hu, (2, 1, 0)).astype(np.int16) + 1024        # (slices, rows=y, cols=x)
    write_series(tmp_path / "ct", stored, [1, 0, 0, 0, 1, 0], (0.9, 0.8), [10.0, 20.0, 30.0], [0, 0, 2.5])
    image = read_dicom_series(tmp_path / "ct")
    assert np.array_equal(image.get_fdata(), hu)
    nifti = tmp_path / "ct_nifti.nii.gz"
    nib.save(image, str(nifti))
    out = tmp_path / "out"
    try:
        main([str(tiny_bundle), str(tmp_path / "ct"), str(nifti), "-o", str(out), "--quiet"])
    except SystemExit as exc:
        assert exc.code == 0
    from_dicom, from_nifti = nib.load(str(out / "ct.nii.gz")), nib.load(str(out / "ct_nifti.nii.gz"))
    assert np.array_equal(from_dicom.affine, from_nifti.affine)
    assert np.allclose(from_dicom.affine, image.affine, atol=1e-5)   # float32 in the NIfTI header
    assert np.array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))
    assert set(np.unique(np.asarray(from_dicom.dataobj))) == {0, 1, 2}


def test_bad_series_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM image slices"):
        read_dicom_series(tmp_path / "empty")
    stored = np.zeros((1, 4, 4), dtype=np.int16)
    write_series(tmp_path / "one", stored, [1, 0, 0, 0, 1, 0], (1, 1), [0, 0, 0], [0, 0, 1])
    with pytest.raises(InputError, match="only one slice"):
        read_dicom_series(tmp_path / "one")
    stored = np.zeros((3, 4, 4), dtype=np.int16)
    write_series(tmp_path / "mixed", stored, [1, 0, 0, 0, 1, 0], (1, 1), [0, 0, 0], [0, 0, 1])
    write_slice(tmp_path / "mixed" / "other", stored[0], [0, 0, 9], [1, 0, 0, 0, 1, 0], (1, 1), 1, 0, generate_uid(), 1)
    with pytest.raises(InputError, match="holds 2 series"):
        read_dicom_series(tmp_path / "mixed")


# ---------------------------------------------------------------- every bad slice is named

def _series(folder, n=4):
    stored = np.full((n, 6, 7), 1064, dtype=np.int16)
    write_series(folder, stored, [1, 0, 0, 0, 1, 0], (0.8, 0.8), [0.0, 0.0, 0.0], [0, 0, 2.5])
    return sorted(folder.iterdir())


def _drop(attr):
    def edit(path):
        ds = pydicom.dcmread(path)
        delattr(ds, attr)
        ds.save_as(path)
    return edit


def _set(attr, value):
    def edit(path):
        ds = pydicom.dcmread(path)
        setattr(ds, attr, value)
        ds.save_as(path)
    return edit


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])


@pytest.mark.parametrize("edit, message", [
    (_drop("ImageOrientationPatient"), "no ImageOrientationPatient"),
    (_drop("ImagePositionPatient"), "no ImagePositionPatient"),
    (_drop("RescaleIntercept"), "no RescaleIntercept"),
    (_drop("RescaleSlope"), "no RescaleSlope"),
    (_drop("PixelSpacing"), "no PixelSpacing"),
    (_truncate, "pixel data cannot be decoded"),
    (_set("ImageOrientationPatient", [1, 0, 0, 0, 1]), r"ImageOrientationPatient .* must be 6 finite number"),
    (_set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "not two orthogonal unit vectors"),
    (_set("PixelSpacing", [0.9, 0.9]), r"PixelSpacing \[0\.9, 0\.9\] differs"),
    (_set("NumberOfFrames", 3), "multi-frame"),
])
def test_a_bad_slice_is_an_error_naming_its_file(tmp_path, edit, message):
    files = _series(tmp_path / "ct")
    victim = files[2]
    edit(victim)
    with pytest.raises(InputError, match=message) as err:
        read_dicom_series(tmp_path / "ct")
    assert str(victim) in str(err.value)


def test_a_series_over_the_voxel_limit_is_refused_before_decoding(tmp_path):
    _series(tmp_path / "ct")
    with pytest.raises(InputError, match=r"6x7x4 = 168 voxels, more than the limit of 100"):
        read_dicom_series(tmp_path / "ct", max_voxels=100)


def test_a_bad_series_among_good_inputs_is_reported_and_the_rest_segmented(tiny_bundle, phantom_nifti, tmp_path, capsys):
    from tests.helpers import run_main

    files = _series(tmp_path / "bad_series")
    _drop("RescaleIntercept")(files[1])
    out = tmp_path / "masks"
    code, _, err = run_main(main, [tiny_bundle, tmp_path / "bad_series", phantom_nifti, "-o", out,
                                   "--backend", "onnxruntime"], capsys)
    assert code == 1
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and str(files[1]) in errors[0] and "no RescaleIntercept" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["phantom.nii.gz"]
    assert "1 of 2 volumes segmented, 1 failed" in err

"""read_nifti: valid files read back exactly; every kind of bad file gives an InputError naming it."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from regionkd.sdk.errors import InputError
from regionkd.sdk.mask_io import mask_image, write_mask
from regionkd.sdk.volume_io import read_nifti, write_nifti

AFF = np.diag([0.8, 0.8, 2.5, 1.0])


def _save(path, data, affine=AFF, slope=None):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))
    return path


def test_image_reads_float32_hu_with_scaling(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    p = _save(tmp_path / "ct.nii.gz", raw, slope=(2.0, -1024.0))
    vol = read_nifti(p)
    assert vol.data.dtype == np.float32
    assert vol.data[1, 2, 3] == 23 * 2 - 1024           # scl_slope/inter applied: 23*2-1024 = -978
    np.testing.assert_allclose(vol.affine, AFF)
    assert vol.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert vol.canonical().data.shape == (2, 3, 4)
    assert vol.canonical() is vol.canonical()            # cached


def test_label_integer_valued_floats_become_uint8(tmp_path):
    p = _save(tmp_path / "seg.nii", np.array([0.0, 1.0, 2.0] * 8, dtype=np.float32).reshape(2, 3, 4))
    vol = read_nifti(p, kind="label")
    assert vol.data.dtype == np.uint8 and set(np.unique(vol.data)) == {0, 1, 2}


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    p = _save(tmp_path / "ct4.nii", np.zeros((4, 5, 6, 1), np.float32))
    assert read_nifti(p).shape == (4, 5, 6)


def test_write_nifti_and_mask_roundtrip(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    p = write_nifti(tmp_path / "a.nii.gz", data, AFF)
    vol = read_nifti(p)
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    mask = (data > 0).astype(np.uint8)
    m = read_nifti(write_mask(mask_image(mask, vol.affine, vol.header, ["background", "body"]),
                              tmp_path / "m.nii.gz"), kind="label")
    np.testing.assert_array_equal(m.data, mask)
    np.testing.assert_allclose(m.affine, vol.affine)
    assert not list(tmp_path.glob(".*"))                 # no temporary files left behind


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_gzipped_files_read_in_one_call_equal_nibabels_own_read(tmp_path, klass):
    # .nii.gz is decompressed whole (ISA-L when installed) and parsed from memory: same voxels,
    # affine and header as nib.load, for NIfTI-1 and NIfTI-2, big-endian included
    data = np.random.default_rng(3).integers(-1000, 1000, (6, 5, 4)).astype(">i2")
    img = klass(data, AFF)
    img.header.set_slope_inter(1.0, -10.0)
    p = tmp_path / "ct.nii.gz"
    nib.save(img, str(p))
    vol, ref = read_nifti(p), nib.load(str(p))
    np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert type(vol.header) is type(ref.header) and vol.header["descrip"] == ref.header["descrip"]
    # the mask writer gzips too: nibabel reads what it wrote, codes and all
    out = write_mask(mask_image((vol.data > 0).astype(np.uint8), vol.affine, vol.header, ["background", "x"]),
                     tmp_path / "m.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (vol.data > 0).astype(np.uint8))
    assert back.header.get_sform(coded=True)[1] == vol.header.get_sform(coded=True)[1]


def test_gzipped_file_that_is_not_nifti_is_refused(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"this is not an image header" * 40))
    with pytest.raises(InputError, match="notes.nii.gz"):
        read_nifti(p)


def _bad_cases(tmp_path):
    noise = np.random.default_rng(0).integers(-1000, 1000, (8, 8, 8)).astype(np.int16)
    good = _save(tmp_path / "good.nii", noise)
    raw = good.read_bytes()
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) - 100])
    gz = gzip.compress(raw)
    (tmp_path / "trunc.nii.gz").write_bytes(gz[: len(gz) * 2 // 3])      # cut inside the voxel data
    (tmp_path / "cut.nii.gz").write_bytes(gz[:40])                         # cut inside the header
    (tmp_path / "stub.nii").write_bytes(raw[:100])
    (tmp_path / "empty.nii").write_bytes(b"")
    (tmp_path / "text.nii").write_text("this is not a NIfTI file\n" * 20)
    _save(tmp_path / "flat.nii", np.zeros((8, 8), np.int16))
    _save(tmp_path / "series.nii", np.zeros((8, 8, 8, 3), np.int16))
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    _save(tmp_path / "nan.nii", nan)
    inf = np.zeros((8, 8, 8), np.float32)
    inf[0, 0, 0] = np.inf
    _save(tmp_path / "inf.nii", inf)
    hdr = nib.load(str(good)).header.copy()            # same file with a singular sform and no qform
    hdr["srow_y"] = [0.0, 0.0, 0.0, 0.0]
    hdr["qform_code"] = 0
    (tmp_path / "singular.nii").write_bytes(hdr.binaryblock + raw[len(hdr.binaryblock):])
    _save(tmp_path / "half.nii", np.full((4, 4, 4), 0.5, np.float32))
    return {
        "missing.nii": ("image", "does not exist"),
        "empty.nii": ("image", "empty"),
        "trunc.nii": ("image", "truncated or corrupt"),
        "trunc.nii.gz": ("image", "corrupt"),
        "cut.nii.gz": ("image", "truncated or corrupt"),
        "stub.nii": ("image", "shorter than a NIfTI header"),
        "text.nii": ("image", "not a NIfTI"),
        "flat.nii": ("image", "2D"),
        "series.nii": ("image", "4D"),
        "nan.nii": ("image", "NaN"),
        "inf.nii": ("image", "NaN or infinite"),
        "singular.nii": ("image", "singular"),
        "half.nii": ("label", "non-integer"),
    }


def test_bad_inputs_raise_input_error_naming_the_file(tmp_path):
    for name, (kind, problem) in _bad_cases(tmp_path).items():
        with pytest.raises(InputError) as info:
            read_nifti(tmp_path / name, kind=kind)
        msg = str(info.value)
        assert name in msg, msg
        assert problem in msg, (name, msg)


def test_unknown_kind_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        read_nifti(tmp_path / "x.nii", kind="mask")


# ---------------------------------------------------------------- no file can exhaust memory

def _header_only(path, shape, dtype=np.int16, compress=True):
    """A NIfTI header declaring `shape` with no voxel data behind it."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0\0\0\0"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def _peak_bytes(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    except InputError as exc:
        err = exc
    else:  # pragma: no cover - reported by the caller
        err = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, peak


@pytest.mark.parametrize("compress", [True, False])
def test_a_header_declaring_too_many_voxels_is_refused_before_reading(tmp_path, compress):
    p = _header_only(tmp_path / ("huge.nii.gz" if compress else "huge.nii"), (30000, 30000, 30000), compress=compress)
    err, peak = _peak_bytes(lambda: read_nifti(p))
    assert err is not None and "huge.nii" in str(err)
    assert "27,000,000,000,000 voxels, more than the limit of 536,870,912" in str(err)
    assert peak < 5e6


def test_the_voxel_limit_is_configurable(tmp_path):
    p = _save(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16))
    with pytest.raises(InputError, match=r"ct\.nii\.gz: .*512 voxels, more than the limit of 100"):
        read_nifti(p, max_voxels=100)
    assert read_nifti(p, max_voxels=512).shape == (8, 8, 8)


def test_a_tiny_gzip_claiming_a_quarter_gigavoxel_is_refused_without_allocating_it(tmp_path):
    p = _header_only(tmp_path / "claims.nii.gz", (1024, 1024, 256))
    assert p.stat().st_size < 120
    err, peak = _peak_bytes(lambda: read_nifti(p))
    assert err is not None and "claims.nii.gz: truncated or corrupt voxel data: 352 bytes decompressed, " \
        "the header declares 536,871,264" in str(err)
    assert peak < 5e6


def test_the_default_limit_refuses_a_gigavoxel_header_before_inflating_anything(tmp_path):
    """A 3 MB gzip of zeros declaring 1024 x 1024 x 1536 was once read whole (12.4 GB peak) before
    the plausibility check refused it: the default limit (512 x 512 x 2048) now refuses its header."""
    p = _header_only(tmp_path / "bomb.nii.gz", (1024, 1024, 1536))
    err, peak = _peak_bytes(lambda: read_nifti(p))
    assert err is not None and "bomb.nii.gz" in str(err)
    assert "1,610,612,736 voxels, more than the limit of 536,870,912" in str(err)
    assert peak < 5e6


def test_a_gzip_bomb_behind_a_small_header_stops_at_the_declared_size(tmp_path):
    img = nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), AFF)
    p = tmp_path / "bomb.nii.gz"
    with gzip.open(p, "wb", compresslevel=9) as fh:
        fh.write(img.to_bytes())
        zeros = bytes(1 << 24)
        for _ in range(12):                  # 200 MB of zeros behind a 4 kB image
            fh.write(zeros)
    assert p.stat().st_size < 1_000_000
    err, peak = _peak_bytes(lambda: read_nifti(p))
    assert err is not None and "bomb.nii.gz" in str(err) and "holds more than the 4,448 bytes its header declares" in str(err)
    assert peak < 20e6


@pytest.mark.parametrize("name, cut, message", [
    ("short.nii", -10, r"short\.nii: truncated or corrupt voxel data: 4,438 bytes, the header declares 4,448"),
    ("long.nii", 5000, r"long\.nii: 5,000 bytes after the voxel data its header declares"),
    ("short.nii.gz", -10, r"short\.nii\.gz: truncated or corrupt voxel data: 4,438 bytes decompressed"),
    ("long.nii.gz", 5000, r"long\.nii\.gz: the gzip stream holds more than the 4,448 bytes"),
])
def test_data_longer_or_shorter_than_declared_is_refused(tmp_path, name, cut, message):
    raw = nib.Nifti1Image(np.ones((16, 16, 8), np.int16), AFF).to_bytes()
    raw = raw[:cut] if cut < 0 else raw + b"\0" * cut
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(InputError, match=message):
        read_nifti(tmp_path / name)


def test_concatenated_gzip_members_read_like_one(tmp_path):
    data = np.arange(16 * 16 * 8, dtype=np.int16).reshape(16, 16, 8)
    raw = nib.Nifti1Image(data, AFF).to_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_nifti(tmp_path / "multi.nii.gz").data, data.astype(np.float32))


def test_complex_voxels_are_refused_unless_asked_for(tmp_path):
    data = (np.full((8, 8, 8), 40.0) + 1j * 500).astype(np.complex64)
    p = _save(tmp_path / "complex.nii.gz", data)
    with pytest.raises(InputError, match=r"complex\.nii\.gz: complex64 \(complex\) voxels; .*imaginary part"):
        read_nifti(p)
    np.testing.assert_array_equal(read_nifti(p, complex_ok=True).data, np.full((8, 8, 8), 40.0, np.float32))


def test_a_vox_offset_inside_the_header_is_refused(tmp_path):
    # nibabel would read the header bytes as voxels
    raw = bytearray(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), AFF).to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw)))
    hdr["vox_offset"] = 0
    raw[:348] = hdr.binaryblock
    for name in ("zero.nii", "zero.nii.gz"):
        (tmp_path / name).write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
        with pytest.raises(InputError, match=r"vox_offset 0 puts the voxel data inside the header"):
            read_nifti(tmp_path / name)

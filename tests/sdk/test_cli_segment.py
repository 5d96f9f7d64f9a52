"""regionkd-segment: every bad input gives a clear message naming it, a non-zero exit and no output
file; good inputs among bad ones are still written."""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tests.helpers import make_phantom, run_main
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
    # --quiet: no progress bar, banner or summary, but each volume's result line
    assert code == 0 and err == ""
    assert [l.split(" (")[0] for l in out.splitlines()] == [str(folder / "a.nii.gz"), str(folder / "b.nii.gz")]
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


# ---------------------------------------------------------------- one file never stops a batch

def _huge_header(path, shape=(30000, 30000, 30000)):
    import gzip
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0\0\0\0"))
    return path


def test_a_header_claiming_huge_size_is_refused_and_the_folder_goes_on(tiny_bundle, phantom_nifti, tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    _huge_header(folder / "a_huge.nii.gz")
    shutil.copy(phantom_nifti, folder / "b_good.nii.gz")
    out = tmp_path / "masks"
    code, _, err = run([tiny_bundle, folder, "-o", out, "--backend", "onnxruntime"], capsys)
    assert code == 1
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert "a_huge.nii.gz" in line and "more than the limit of 536,870,912" in line
    assert leftovers(out) == ["b_good.nii.gz"]
    assert "1 of 2 volumes segmented, 1 failed" in err and "Traceback" not in err


def test_any_exception_of_one_input_is_reported_and_the_run_goes_on(tiny_bundle, phantom_nifti, tmp_path, capsys,
                                                                     monkeypatch):
    from regionkd.sdk.segmenter import Segmenter

    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        shutil.copy(phantom_nifti, folder / name)
    real = Segmenter.read_file
    failures = {"a.nii.gz": MemoryError("Unable to allocate 6.5 GiB"), "b.nii.gz": KeyError("surprise")}

    def flaky(self, path, out, *args, **kw):
        if path.name in failures:
            raise failures[path.name]
        return real(self, path, out, *args, **kw)

    monkeypatch.setattr(Segmenter, "read_file", flaky)
    code, _, err = run([tiny_bundle, folder, "-o", tmp_path / "masks", "--backend", "onnxruntime", "-q"], capsys)
    assert code == 1
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert errors == [f"error: {folder / 'a.nii.gz'}: out of memory while segmenting it (Unable to allocate 6.5 GiB); "
                      "try --max-voxels or a smaller volume",
                      f"error: {folder / 'b.nii.gz'}: unexpected KeyError: 'surprise'"]
    assert leftovers(tmp_path / "masks") == ["c.nii.gz"]
    assert "1 of 3 volumes segmented, 2 failed" in err      # printed even with --quiet, since some failed


def test_an_out_of_memory_error_without_text_is_named():
    from regionkd.sdk.batch import describe_failure

    assert describe_failure(Path("ct.nii.gz"), MemoryError()) == (
        "ct.nii.gz: out of memory while segmenting it (MemoryError); try --max-voxels or a smaller volume")


def test_a_write_that_fails_names_the_file_being_written(tiny_bundle, phantom_nifti, tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk would (ENOSPC)
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))

    out = tmp_path / "masks" / "mask.nii"           # 17 kB uncompressed: over the limit
    proc = subprocess.run([sys.executable, "-c", "from regionkd.sdk.cli_segment import main; main()", str(tiny_bundle),
                           str(phantom_nifti), "-o", str(out), "--backend", "onnxruntime", "-q"],
                          capture_output=True, text=True, timeout=120, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert f"error: cannot write {out}: File too large" in proc.stderr
    assert leftovers(out.parent) == []


def test_an_output_for_one_input_must_be_a_nifti_name_or_an_existing_folder(tiny_bundle, phantom_nifti, tmp_path, capsys):
    code, _, err = run([tiny_bundle, phantom_nifti, "-o", tmp_path / "out" / "x.png", "--backend", "onnxruntime"], capsys)
    assert code == 1 and "output" in err and "x.png" in err and ".nii or .nii.gz, or an existing folder" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "existing").mkdir()
    code, _, _ = run([tiny_bundle, phantom_nifti, "-o", tmp_path / "existing", "--backend", "onnxruntime"], capsys)
    assert code == 0 and leftovers(tmp_path / "existing") == ["phantom.nii.gz"]
    # a folder of inputs still gets its output folder made
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(phantom_nifti, folder / "one.nii.gz")
    code, _, _ = run([tiny_bundle, folder, "-o", tmp_path / "new_masks", "--backend", "onnxruntime"], capsys)
    assert code == 0 and leftovers(tmp_path / "new_masks") == ["one.nii.gz"]


def test_temporary_files_of_a_killed_run_are_never_inputs_and_are_cleaned(tiny_bundle, phantom_nifti, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    masks = tmp_path / "scans"           # a folder a killed run was writing into
    masks.mkdir()
    shutil.copy(phantom_nifti, masks / "a.nii.gz")
    half = (masks / "a.nii.gz").read_bytes()[:300]
    script = (f"import os, signal\nfrom pathlib import Path\nfrom regionkd.sdk.atomic import atomic_path\n"
              f"with atomic_path(Path({str(masks / 'b.nii.gz')!r})) as tmp:\n"
              f"    tmp.write_bytes({half!r})\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == -signal.SIGKILL
    (masks / "._a.nii.gz").write_bytes(b"AppleDouble resource fork")      # copied from a Mac
    assert len(leftovers(masks)) == 3
    # a folder run over it: only a.nii.gz is an input
    code, stdout, err = run([tiny_bundle, masks, "-o", tmp_path / "again", "--backend", "onnxruntime"], capsys)
    assert code == 0, err
    assert leftovers(tmp_path / "again") == ["a.nii.gz"] and "1 of 1 volumes segmented" in err
    # a run writing into the folder removes the dead writer's temporary file
    code, _, _ = run([tiny_bundle, phantom_nifti, "-o", masks / "c.nii.gz", "--backend", "onnxruntime"], capsys)
    assert code == 0 and leftovers(masks) == ["._a.nii.gz", "a.nii.gz", "c.nii.gz"]
    os.unlink(masks / "._a.nii.gz")


def test_masks_and_previews_get_normal_permissions(tiny_bundle, phantom_nifti, tmp_path, capsys):
    import os
    import stat

    old = os.umask(0o022)
    try:
        code, _, _ = run([tiny_bundle, phantom_nifti, "-o", tmp_path / "m.nii.gz", "--backend", "onnxruntime",
                          "--preview", tmp_path / "p.png"], capsys)
    finally:
        os.umask(old)
    assert code == 0
    assert {n: oct(stat.S_IMODE(os.stat(tmp_path / n).st_mode)) for n in ("m.nii.gz", "p.png")} == \
        {"m.nii.gz": "0o644", "p.png": "0o644"}


def test_warnings_reach_the_per_volume_line_and_quiet_output(tiny_bundle, tmp_path, capsys):
    hu, affine = make_phantom()
    affine = affine.copy()
    affine[0, 0] = affine[1, 1] = 0.2
    path = tmp_path / "fine.nii.gz"
    img = nib.Nifti1Image(hu.astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(path))
    code, stdout, err = run([tiny_bundle, path, "-o", tmp_path / "m.nii.gz", "--backend", "onnxruntime"], capsys)
    assert code == 0
    (line,) = [l for l in stdout.splitlines() if "fine.nii.gz" in l]
    assert "; warning: in-plane spacing 0.2 x 0.2 mm is far outside" in line
    assert "1 of 1 volumes segmented, 1 with warnings" in err
    code, stdout, err = run([tiny_bundle, path, "-o", tmp_path / "m.nii.gz", "--backend", "onnxruntime", "-q"], capsys)
    assert code == 0 and stdout.count("\n") == 1 and "; warning: in-plane spacing 0.2 x 0.2 mm" in stdout
    assert err.startswith(f"warning: {path}: in-plane spacing 0.2 x 0.2 mm is far outside")


@pytest.mark.parametrize("bad", ["middle", "last"])
def test_pipelined_batch_gives_the_sequential_outcomes_and_files(tiny_bundle, phantom_nifti, tmp_path, bad):
    """Reading ahead and writing behind changes nothing: the same outcomes in the same order, the same
    mask bytes, and a corrupt input fails its own outcome only, wherever it sits."""
    from regionkd.sdk.segmenter import Segmenter

    folder = tmp_path / "cases"
    folder.mkdir()
    names = ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    corrupt = names[1] if bad == "middle" else names[-1]
    for name in names:
        if name == corrupt:
            (folder / name).write_bytes(b"\x1f\x8b not really gzip")
        else:
            shutil.copy(phantom_nifti, folder / name)
    runs = {}
    with Segmenter(tiny_bundle, backend="onnxruntime", threads=1) as seg:
        for pipelined in (False, True):
            out = tmp_path / f"masks-{pipelined}"
            seen = []
            outcomes = seg.segment_files([folder], out, pipelined=pipelined, on_outcome=seen.append)
            assert seen == outcomes
            runs[pipelined] = ([(o.input.name, o.ok) for o in outcomes],
                               {p.name: np.asarray(nib.load(str(p)).dataobj).tobytes() for p in out.iterdir()})
            assert [o.error is not None and corrupt in o.error for o in outcomes] == [n == corrupt for n in names]
    assert runs[True] == runs[False]
    assert [n for n, ok in runs[True][0]] == names and sorted(runs[True][1]) == sorted(set(names) - {corrupt})


def test_num_parts_split_the_inputs_without_overlap_as_nnunet_does(tiny_bundle, phantom_nifti, tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    names = [f"case_{i}.nii.gz" for i in range(5)]
    for name in names:
        shutil.copy(phantom_nifti, folder / name)
    out = tmp_path / "masks"
    written = []
    for part in range(2):
        code, _, _ = run([tiny_bundle, folder, "-o", out, "--backend", "onnxruntime", "-q", "--num-parts", "2",
                          "--part-id", str(part)], capsys)
        assert code == 0
        written.append(sorted(set(leftovers(out)) - set(sum(written, []))))
    assert written == [names[0::2], names[1::2]]          # nnU-Net's items[part_id::num_parts]
    code, _, err = run([tiny_bundle, folder, "-o", out, "--num-parts", "2", "--part-id", "2"], capsys)
    assert code == 2 and "--part-id 2 must be below --num-parts 2" in err


def test_inputs_from_a_glob_and_a_csv_list_with_or_without_header(tmp_path):
    from regionkd.sdk.batch import expand_inputs
    from regionkd.sdk.errors import InputError

    for name in ("b.nii.gz", "a.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([str(tmp_path / "*.nii.gz")]) == [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    listed = tmp_path / "list.csv"
    listed.write_text("site,input\nA,b.nii.gz\nB,/abs/c.nii.gz\n")
    assert expand_inputs([listed]) == [tmp_path / "b.nii.gz", Path("/abs/c.nii.gz")]
    bare = tmp_path / "bare.csv"
    bare.write_text("a.nii.gz\nb.nii.gz\n")                       # no header: the first column
    assert expand_inputs([bare]) == [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(InputError, match="empty input list"):
        expand_inputs([tmp_path / "empty.csv"])

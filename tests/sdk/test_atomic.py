"""Atomic writes (regionkd.sdk.atomic): recognisable temporary names that no reader takes as input,
stale ones from killed runs cleaned up, normal permissions, write errors that name the file."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from regionkd.sdk.atomic import (TEMP_MARKER, atomic_directory, atomic_path, atomic_write_bytes, is_temp_name,
                                 remove_stale_temps)
from regionkd.sdk.errors import OutputError, RegionKDError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _killed_inside(code: str, cwd: Path) -> None:
    """Run `code` in a child that kills itself with SIGKILL inside the write (what kill -9 does)."""
    script = "import os, signal\nfrom pathlib import Path\nfrom regionkd.sdk.atomic import atomic_path, atomic_directory\n"
    proc = subprocess.run([sys.executable, "-c", script + textwrap.dedent(code)], cwd=cwd, timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_temporary_names_are_hidden_marked_and_keep_the_suffix(tmp_path):
    final = tmp_path / "mask.nii.gz"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".mask.nii.gz" + TEMP_MARKER)
        assert tmp.name.endswith(".nii.gz") and is_temp_name(tmp.name)
        assert f"-{os.getpid()}-" in tmp.name
        tmp.write_bytes(b"x")
    with atomic_path(final, suffix="") as tmp:
        assert not tmp.name.endswith(".gz")
        tmp.write_bytes(b"y")
    assert final.read_bytes() == b"y" and sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]
    assert not is_temp_name("mask.nii.gz") and not is_temp_name(".hidden.nii.gz")


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_files_and_directories_get_the_permissions_of_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        tmp.write_bytes(b"m")
    with atomic_directory(tmp_path / "x.bundle") as d:
        (d / "manifest.json").write_text("{}")
    assert _mode(tmp_path / "report.json") == file_mode
    assert _mode(tmp_path / "mask.nii.gz") == file_mode
    assert _mode(tmp_path / "x.bundle") == dir_mode


def test_a_private_file_stays_private(tmp_path, umask):
    atomic_write_bytes(tmp_path / "vendor.key", b"secret", mode=0o600)
    assert _mode(tmp_path / "vendor.key") == 0o600


def test_a_write_error_names_the_file_and_leaves_nothing(tmp_path):
    final = tmp_path / "out" / "mask.nii.gz"
    with pytest.raises(OutputError) as err:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"cannot write {final}: No space left on device"
    assert isinstance(err.value, OSError) and isinstance(err.value, RegionKDError)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(final)
    assert list(final.parent.iterdir()) == []
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a folder")
    with pytest.raises(OutputError, match=r"cannot write .*file/mask\.nii\.gz"):
        atomic_write_bytes(blocked / "mask.nii.gz", b"x")


def test_a_killed_write_leaves_a_marked_temp_that_the_next_run_removes(tmp_path):
    _killed_inside(f"""
        with atomic_path(Path({str(tmp_path / 'mask.nii.gz')!r})) as tmp:
            tmp.write_bytes(b"half a mask")
            os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and is_temp_name(left[0]) and left[0].startswith(".mask.nii.gz")
    mine = tmp_path / f".live.nii.gz{TEMP_MARKER}{left[0].split(TEMP_MARKER)[1].split('-')[0]}-{os.getpid()}-00000000"
    mine.write_bytes(b"a write of this process, in flight")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]     # a live writer's file is kept


def test_temps_of_other_hosts_are_removed_only_when_old(tmp_path):
    recent = tmp_path / f".a.nii.gz{TEMP_MARKER}ffffff-1-00000000.nii.gz"
    old = tmp_path / f".b.nii.gz{TEMP_MARKER}ffffff-1-00000001.nii.gz"
    for p in (recent, old):
        p.write_bytes(b"x")
    two_days = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days, two_days))
    assert remove_stale_temps(tmp_path) == [old]
    assert recent.exists()


def test_a_killed_directory_write_is_cleaned_by_the_next_one(tmp_path):
    _killed_inside(f"""
        with atomic_directory(Path({str(tmp_path / 'x.bundle')!r})) as tmp:
            (tmp / "model.onnx").write_bytes(b"0" * 100000)
            os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    (left,) = list(tmp_path.iterdir())
    assert is_temp_name(left.name) and left.is_dir()
    with atomic_directory(tmp_path / "other") as tmp:            # writers of many directories do not scan
        (tmp / "x").write_bytes(b"1")
    assert left.exists()
    with atomic_directory(tmp_path / "x.bundle", clean_stale=True) as tmp:
        (tmp / "model.onnx").write_bytes(b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "x.bundle"]


def test_an_interrupted_replacement_gives_the_old_directory_back(tmp_path):
    final = tmp_path / "x.bundle"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    _killed_inside(f"""
        import os as _os
        real = _os.replace
        calls = []
        def replace(a, b):                      # die between moving the old one aside and moving the new one in
            calls.append(a)
            real(a, b)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        _os.replace = replace
        with atomic_directory(Path({str(final)!r}), overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    """, tmp_path)
    assert not final.exists()
    remove_stale_temps(tmp_path)
    assert (final / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bundle"]

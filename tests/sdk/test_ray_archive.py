"""Archive-scale segmentation on a real local Ray instance (`regionkd-segment --ray`): the masks
equal those of the single-process run, a bad file fails its own row, a killed job started again
finishes the rest without redoing what was done, and `--num-parts` splits without overlap."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from tests.helpers import make_phantom

ray = pytest.importorskip("ray", reason="the batch extra (ray) is not installed")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (2 CPUs), stopped at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_cases(folder, n, shape=(40, 36, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hu, affine = make_phantom(shape=(shape[0] + i % 3, shape[1], shape[2] + i % 2), with_distractor=i % 2 == 0)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(folder / f"case_{i:02d}.nii.gz"))
    return folder


def masks(folder):
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_ray_masks_equal_the_single_process_run_and_a_bad_file_fails_its_row(local_ray, tiny_bundle, tmp_path):
    from regionkd.sdk.archive import segment_archive
    from regionkd.sdk.segmenter import Segmenter

    cases = write_cases(tmp_path / "cases", 5)
    (cases / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a volume")
    listing = tmp_path / "archive.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["input", "site"]] + [[f"cases/{p.name}", "A"] for p in sorted(cases.iterdir())])
    rows = segment_archive(tiny_bundle, [listing], tmp_path / "ray", statistics=True,
                           segmenter_options={"backend": "onnxruntime"})
    status = {os.path.basename(r["input"]): r["status"] for r in rows}
    assert status == {**{f"case_{i:02d}.nii.gz": "ok" for i in range(5)}, "broken.nii.gz": "failed"}
    broken = next(r for r in rows if r["status"] == "failed")
    assert "broken.nii.gz" in broken["error"] and "gzip" in broken["error"]
    assert all(r["total_ms"] > 0 and r["slices"] > 0 for r in rows if r["status"] == "ok")
    with open(tmp_path / "ray" / "report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [(os.path.basename(r["input"]), r["status"]) for r in report] == [
        (os.path.basename(r["input"]), r["status"]) for r in rows]
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        single = seg.segment_files([cases], tmp_path / "single", statistics=True)
    assert sum(o.ok for o in single) == 5
    got, want = masks(tmp_path / "ray"), masks(tmp_path / "single")
    assert sorted(got) == sorted(want) == [f"case_{i:02d}.nii.gz" for i in range(5)]
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert len(list((tmp_path / "ray").glob("*.statistics.json"))) == 5


def test_a_killed_job_run_again_finishes_the_rest_without_redoing_the_done(local_ray, tiny_bundle, tmp_path):
    cases = write_cases(tmp_path / "cases", 40, shape=(96, 96, 40))
    out = tmp_path / "masks"
    command = [sys.executable, "-m", "regionkd.sdk.cli_segment", str(tiny_bundle), str(cases), "-o", str(out),
               "--ray", local_ray, "--ray-actors", "1", "--backend", "onnxruntime", "-q"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("case_*.nii.gz"))) < 3 and job.poll() is None:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)                       # the driver dies mid-archive
    job.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("case_*.nii.gz")}
    assert 3 <= len(done_before) < 40, f"the job was not killed mid-run ({len(done_before)} of 40 done)"
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    with open(out / "report.csv", newline="") as f:
        report = {os.path.basename(r["input"]): r["status"] for r in csv.DictReader(f)}
    assert sorted(report) == [f"case_{i:02d}.nii.gz" for i in range(40)]
    assert {k for k, v in report.items() if v == "done before"} == set(done_before)
    assert all(v == "ok" for k, v in report.items() if k not in done_before)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("case_*.nii.gz") if p.name in done_before} == done_before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no temporaries left behind


def test_num_parts_split_the_archive_deterministically(local_ray, tiny_bundle, tmp_path):
    from regionkd.sdk.archive import segment_archive

    cases = write_cases(tmp_path / "cases", 5)
    parts = [segment_archive(tiny_bundle, [str(cases / "*.nii.gz")], tmp_path / "out", report=tmp_path / f"{k}.csv",
                             segmenter_options={"backend": "onnxruntime"}, num_parts=2, part_id=k) for k in range(2)]
    names = [[os.path.basename(r["input"]) for r in rows] for rows in parts]
    assert names == [[f"case_{i:02d}.nii.gz" for i in (0, 2, 4)], [f"case_{i:02d}.nii.gz" for i in (1, 3)]]
    assert all(r["status"] == "ok" for rows in parts for r in rows)

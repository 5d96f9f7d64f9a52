"""The SDK runs without torch: importing it (and creating a Segmenter) never imports torch,
regionkd.train or regionkd.export, and a fresh venv with only the base install segments a volume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

IMPORT_CHECK = """
import json, sys
import regionkd.sdk
from regionkd.sdk import Segmenter, load_bundle
import regionkd.sdk.cli_segment, regionkd.sdk.cli_bench, regionkd.sdk.dicom_io, regionkd.sdk.preview
import regionkd.sdk.dicom_seg, regionkd.sdk.dicom_write, regionkd.sdk.dicomweb, regionkd.sdk.pacs
import regionkd.sdk.statistics, regionkd.sdk.report, regionkd.sdk.outputs
from regionkd.sdk import read_dicom_series, load_dicom_series, compute_statistics
seg = Segmenter(sys.argv[1], backend=sys.argv[2])
seg.close()
heavy = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "regionkd.train", "regionkd.export"))]
print(json.dumps({"heavy": heavy}))
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_sdk_import_and_segmenter_do_not_import_torch(tiny_bundle, backend):
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(tiny_bundle), backend],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"heavy": []}


@pytest.mark.slow
def test_base_install_segments_a_phantom_without_torch(tiny_bundle, phantom_nifti, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, bindir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0 and "Could not find a version" in install.stderr:
        pytest.skip(f"no package index reachable for the base dependencies: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr[-2000:]
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    # the installed package is the copy in the venv, not the source tree
    where = subprocess.run([str(py), "-c", "import regionkd.sdk; print(regionkd.sdk.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert str(venv) in where
    out = tmp_path / "mask.nii.gz"
    proc = subprocess.run([str(bindir / "regionkd-segment"), str(tiny_bundle), str(phantom_nifti), "-o", str(out),
                           "--backend", "onnxruntime"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 volumes segmented" in proc.stderr
    mask = nib.load(str(out))
    assert mask.get_data_dtype() == np.uint8
    assert np.array_equal(mask.affine, nib.load(str(phantom_nifti)).affine)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}

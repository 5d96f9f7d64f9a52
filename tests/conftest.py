"""The fixtures the test packages share: the tiny bundles, a phantom NIfTI file and the Orthanc
PACS (what they are made of is in tests/helpers.py)."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import EXACT_SIZE, build_tiny_bundle, make_phantom

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A real bundle: fp32, fp16, int8 (TensorRT and CPU flavours) ONNX files of the tiny model."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny.bundle")


@pytest.fixture(scope="session")
def exact_bundle(tmp_path_factory):
    """Like tiny_bundle but with the network size equal to the slices of make_phantom(EXACT_SHAPE)
    (no resize), fp32 only."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "exact.bundle", input_size=EXACT_SIZE,
                             precisions=("fp32",))


@pytest.fixture
def phantom_nifti(tmp_path):
    """Path of a small synthetic CT phantom (.nii.gz, RAS, int16 with scl_slope 1 like real CT)."""
    hu, affine = make_phantom()
    img = nib.Nifti1Image(hu.astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path = tmp_path / "phantom.nii.gz"
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory):
    """The Orthanc of REGIONKD_ORTHANC_URL (started by .ci/run), or a private one for this session
    (see tests/services.py); fails under CI when there is none."""
    from tests.services import Orthanc, need, start_orthanc

    url = os.environ.get("REGIONKD_ORTHANC_URL")
    if url:
        server = Orthanc(url)
        if not server.reachable():
            need(f"REGIONKD_ORTHANC_URL={url} does not answer (is the Orthanc that .ci/run started still running?)")
        yield server
        return
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(orthanc_server):
    """The Orthanc, emptied: every test that uses it starts from an empty store."""
    orthanc_server.clear()
    return orthanc_server


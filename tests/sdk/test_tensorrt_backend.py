"""TensorRT backend without a GPU: engine naming, engine selection from a manifest, availability
reasons, building a missing TensorRT-RTX engine into a real bundle. GPU execution skips without one."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from regionkd.sdk.backends.engine_build import engine_filename
from regionkd.sdk.backends.tensorrt_backend import (resolve_engine, select_engine, short_version, source_onnx,
                                                    tensorrt_available)
from regionkd.sdk.errors import BackendError, RegionKDError

FILES = [
    {"path": "model.fp32.onnx", "format": "onnx", "precision": "fp32", "flavour": "reference",
     "backends": ["onnxruntime", "tensorrt"], "sha256": "0"},
    {"path": "model.int8-cpu.onnx", "format": "onnx", "precision": "int8", "flavour": "cpu",
     "backends": ["onnxruntime"], "sha256": "0"},
    {"path": "model.int8.onnx", "format": "onnx", "precision": "int8", "flavour": "tensorrt",
     "backends": ["tensorrt"], "sha256": "0"},
    {"path": "engines/rtx1.7.1-fp16.engine", "format": "tensorrt-rtx-engine", "precision": "fp16",
     "backends": ["tensorrt-rtx"], "trt_version": "1.7.1", "compute_capability": None, "sha256": "0"},
    {"path": "engines/trt10.3.0-sm87-int8.engine", "format": "tensorrt-engine", "precision": "int8",
     "backends": ["tensorrt"], "trt_version": "10.3.0", "compute_capability": "8.7", "sha256": "0"},
    {"path": "engines/trt10.13.3-sm110-int8.engine", "format": "tensorrt-engine", "precision": "int8",
     "backends": ["tensorrt"], "trt_version": "10.13.3", "compute_capability": "11.0", "sha256": "0"},
]


def test_engine_filenames():
    assert engine_filename("tensorrt", "10.3.0.30", "int8", "8.7") == "trt10.3.0-sm87-int8.engine"
    assert engine_filename("tensorrt", "11.4.0.7", "fp16", "12.0") == "trt11.4.0-sm120-fp16.engine"
    assert engine_filename("tensorrt-rtx", "1.7.1.116", "fp32") == "rtx1.7.1-fp32.engine"
    with pytest.raises(BackendError, match="compute capability"):
        engine_filename("tensorrt", "10.3.0", "fp32")
    with pytest.raises(BackendError, match="unknown engine backend 'onnxruntime'"):
        engine_filename("onnxruntime", "1.0", "fp32")


def test_short_version():
    assert short_version("10.13.3.9") == "10.13.3"
    assert short_version("1.7.1") == "1.7.1"


def test_selects_the_engine_for_this_gpu_and_version():
    entry = select_engine(FILES, backend="tensorrt", precision="int8", trt_version="10.3.0.30",
                          compute_capability="8.7")
    assert entry["path"] == "engines/trt10.3.0-sm87-int8.engine"
    entry = select_engine(FILES, backend="tensorrt", precision="int8", trt_version="10.13.3.9",
                          compute_capability="11.0")
    assert entry["path"] == "engines/trt10.13.3-sm110-int8.engine"


def test_refuses_an_engine_for_another_gpu():
    with pytest.raises(BackendError) as err:
        select_engine(FILES, backend="tensorrt", precision="int8", trt_version="10.3.0", compute_capability="8.6")
    message = str(err.value)
    assert "no tensorrt engine for TensorRT 10.3.0, sm 8.6, int8" in message
    assert "engines/trt10.3.0-sm87-int8.engine (version 10.3.0 sm 8.7, int8)" in message
    assert "runs only on the GPU model and TensorRT version that built it" in message
    assert "builds it from the bundle's int8 ONNX" in message and "regionkd-export --engine require" in message


def test_refuses_an_engine_for_another_tensorrt_version():
    with pytest.raises(BackendError, match=r"TensorRT 11\.4\.0, sm 8\.7, int8.*version 10\.3\.0 sm 8\.7"):
        select_engine(FILES, backend="tensorrt", precision="int8", trt_version="11.4.0", compute_capability="8.7")


def test_missing_precision_says_what_is_missing_and_how_to_build():
    with pytest.raises(BackendError) as err:
        select_engine(FILES, backend="tensorrt", precision="fp32", trt_version="10.3.0", compute_capability="8.7")
    assert "TensorRT 10.3.0, sm 8.7, fp32" in str(err.value) and "other versions" not in str(err.value)
    assert "fp32 ONNX" in str(err.value)


def test_rtx_engine_matches_on_version_only():
    entry = select_engine(FILES, backend="tensorrt-rtx", precision="fp16", trt_version="1.7.1.116",
                          compute_capability=None)
    assert entry["path"] == "engines/rtx1.7.1-fp16.engine"
    with pytest.raises(BackendError, match=r"TensorRT-RTX 1\.8\.0, fp16.*rtx1\.7\.1-fp16\.engine"):
        select_engine(FILES, backend="tensorrt-rtx", precision="fp16", trt_version="1.8.0", compute_capability=None)
    with pytest.raises(BackendError):  # a TensorRT engine is not a TensorRT-RTX engine
        select_engine(FILES, backend="tensorrt-rtx", precision="int8", trt_version="10.3.0", compute_capability=None)


def test_source_onnx_is_the_tensorrt_flavour():
    assert source_onnx(FILES, "tensorrt", "int8")["path"] == "model.int8.onnx"
    assert source_onnx(FILES, "tensorrt-rtx", "fp32")["path"] == "model.fp32.onnx"
    with pytest.raises(BackendError, match="no fp16 ONNX"):
        source_onnx(FILES, "tensorrt", "fp16")


def test_import_is_lazy():
    code = ("import sys, regionkd.sdk.backends.tensorrt_backend; "
            "print(sorted(m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'pycuda', 'torch', 'regionkd.export') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_unavailable_says_what_to_install():
    ok, reason = tensorrt_available(rtx=False)
    assert not ok and "'tensorrt' is not installed" in reason and "pip install 'regionkd[tensorrt]'" in reason


def _gpu_present() -> bool:
    return tensorrt_available(rtx=True)[0] or tensorrt_available(rtx=False)[0]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="TensorRT-RTX not installed")
def test_rtx_unavailable_without_gpu_says_so():
    ok, reason = tensorrt_available(rtx=True)
    if ok:
        pytest.skip("this machine has a GPU")
    assert reason.startswith("no NVIDIA GPU") or "pycuda" in reason


# ---------------------------------------------------------------------------- a real bundle

def _conv_onnx(path, size=32, classes=3):
    """A one-Conv model with a dynamic batch, written with onnx.helper (weights known: all 1/9)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((classes, 1, 3, 3), 1 / 9, np.float32), "w")
    node = helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                             ["batch", 1, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             ["batch", classes, size, size])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def bundle(tmp_path):
    from regionkd.sdk.bundle import file_entry, load_bundle, write_manifest

    _conv_onnx(tmp_path / "model.fp32.onnx")
    write_manifest(tmp_path, {
        "format_version": 1,
        "model": {"name": "conv", "arch": "conv", "num_classes": 3, "class_names": ["background", "liver", "tumour"]},
        "preprocessing": {"window": [-60, 140], "input_size": [32, 32]}, "io": {"max_batch": 4},
        "files": [file_entry(tmp_path / "model.fp32.onnx", tmp_path, format="onnx", precision="fp32",
                             flavour="reference", backends=["onnxruntime", "tensorrt"])]})
    return load_bundle(tmp_path)


def test_no_engine_and_no_build_is_a_clear_error(bundle):
    with pytest.raises(BackendError, match=r"no tensorrt-rtx engine for TensorRT-RTX 1\.7\.1, fp32"):
        resolve_engine(bundle, "tensorrt-rtx", "fp32", "1.7.1", None, build=False)


def test_missing_rtx_engine_is_built_and_registered(bundle):
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="tensorrt_rtx_bindings is not installed")
    from regionkd.sdk.bundle import load_bundle

    version = short_version(trt.__version__)
    entry = resolve_engine(bundle, "tensorrt-rtx", "fp32", version, None)
    assert entry["path"] == f"engines/rtx{version}-fp32.engine"
    assert entry["format"] == "tensorrt-rtx-engine" and entry["source"] == "model.fp32.onnx"
    assert entry["trt_version"] == version and entry["max_batch"] == 4 and entry["bytes"] > 0
    engine = bundle.path_of(entry)
    stamp = engine.stat().st_mtime_ns
    reloaded = load_bundle(bundle.root)  # the manifest was rewritten with a checksum that verifies
    again = resolve_engine(reloaded, "tensorrt-rtx", "fp32", version, None)
    assert again == entry and engine.stat().st_mtime_ns == stamp  # found, not rebuilt


def test_backend_refuses_to_start_without_gpu(bundle):
    from regionkd.sdk.backends.tensorrt_backend import create_tensorrt_backend

    if _gpu_present():
        pytest.skip("this machine has a GPU")
    for rtx, module in ((False, "tensorrt"), (True, "tensorrt_rtx_bindings")):
        with pytest.raises(RegionKDError) as err:
            create_tensorrt_backend(bundle, "fp32", rtx=rtx)
        message = str(err.value)
        assert "no NVIDIA GPU" in message or "pycuda" in message or f"'{module}' is not installed" in message


@pytest.mark.gpu
@pytest.mark.parametrize("rtx", [False, True])
def test_runs_on_gpu_with_dynamic_batch(bundle, rtx):
    ok, reason = tensorrt_available(rtx=rtx)
    if not ok:
        pytest.skip(reason if reason.startswith("no NVIDIA GPU") else f"no NVIDIA GPU runtime: {reason}")
    from regionkd.sdk.backends.tensorrt_backend import create_tensorrt_backend

    # a 3x3 box filter of ones (zero padding): interior pixels 1, edges 6/9, corners 4/9
    expected = np.full((3, 32, 32), 1.0, np.float32)
    expected[:, [0, -1], :] = 6 / 9
    expected[:, :, [0, -1]] = 6 / 9
    expected[:, [0, 0, -1, -1], [0, -1, 0, -1]] = 4 / 9
    backend = create_tensorrt_backend(bundle, "fp32", rtx=rtx)
    try:
        assert backend.max_batch == 4
        for n in (1, 4, 6):  # 6 = one full batch and one partial: set_input_shape per chunk
            logits = backend.run(np.ones((n, 1, 32, 32), np.float32))
            assert logits.shape == (n, 3, 32, 32)
            np.testing.assert_allclose(logits, np.broadcast_to(expected, logits.shape), atol=1e-3)
            assert backend.last_gpu_ms > 0
    finally:
        backend.close()

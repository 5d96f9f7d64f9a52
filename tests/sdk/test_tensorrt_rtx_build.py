"""Real TensorRT-RTX engine builds on the CPU: NVIDIA's own ONNX parser and builder judge our ONNX.

TensorRT-RTX builds ahead of time without a GPU, so these run here and in CI wherever the
`tensorrt-rtx` extra is installed. Running an engine needs a GPU and is skipped without one.
"""
from __future__ import annotations

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx_bindings",
                          reason="tensorrt_rtx_bindings is not installed (pip install 'regionkd[tensorrt-rtx]')")
torch = pytest.importorskip("torch", reason="torch is needed to export the test models")
onnx = pytest.importorskip("onnx")

from regionkd.sdk.backends.engine_build import EngineBuildError, available_builders, build_engine  # noqa: E402
from regionkd.sdk.backends.tensorrt_backend import short_version, tensorrt_available  # noqa: E402

H = W = 32   # the manifest schema wants multiples of 32
RTX_VERSION = short_version(trt.__version__)


class TinyNet(torch.nn.Module):
    """Conv-BN-ReLU-Conv: the op mix of our students, small enough to build in a fraction of a second."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class PoolWithIndices(torch.nn.Module):
    """ENet's pattern: MaxPool that also returns indices (TensorRT's parser cannot take it)."""

    def forward(self, x):
        pooled, indices = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
        return pooled, indices


def _export(model, path, dynamic=True, outputs=("logits",)):
    model.eval()
    axes = {name: {0: "batch"} for name in ("image", *outputs)} if dynamic else None
    torch.onnx.export(model, torch.zeros(1, 1, H, W), str(path), input_names=["image"], output_names=list(outputs),
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def _calibration_reader(count=8):
    """Smooth deterministic images in [-1, 1] (like windowed CT), not noise."""
    from onnxruntime.quantization import CalibrationDataReader

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / (H - 1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter([{"image": (np.cos(3 * (xx + k * 0.1)) * yy)[None, None].astype(np.float32)}
                                for k in range(count)])

        def get_next(self):
            return next(self._items, None)

    return Reader()


def _quantize(fp32_path, out_path, float_bias=True):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32_path), str(out_path), _calibration_reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "QuantizeBias": not float_bias})
    return out_path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    fp32 = _export(TinyNet(), root / "model.fp32.onnx")
    fp16 = root / "model.fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    int8 = _quantize(fp32, root / "model.int8.onnx", float_bias=True)
    return {"fp32": fp32, "fp16": fp16, "int8": int8, "root": root}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_builds_a_real_engine_from_the_fused_model(models, tmp_path, precision):
    """The fused model (raw HU at any matrix in, uint8 labels out) parses and builds: its Resize,
    ArgMax and uint8 Cast are ops TensorRT-RTX takes, with a dynamic batch and a dynamic matrix."""
    from regionkd.export.fused import build_fused

    fused = build_fused(models[precision], tmp_path / f"model.{precision}.fused.onnx", (-100.0, 200.0), (H, W))
    assert {n.op_type for n in fused.graph.node} >= {"Resize", "ArgMax", "Cast", "Clip"}
    info = build_engine(tmp_path / f"model.{precision}.fused.onnx", tmp_path / f"rtx-{precision}.fused.engine",
                        backend="tensorrt-rtx", max_batch=4)
    assert info.precision == precision
    assert info.path.stat().st_size > trt.Runtime(trt.Logger(trt.Logger.ERROR)).engine_header_size


def test_rtx_is_an_available_builder_here():
    ok, reason = available_builders()["tensorrt-rtx"]
    assert ok and RTX_VERSION in reason


def test_int8_fixture_is_the_tensorrt_flavour(models):
    """Symmetric int8 Q/DQ: every zero point 0 and int8, no int32 (bias) DequantizeLinear."""
    graph = onnx.load(str(models["int8"])).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) >= 4  # two conv weights, two activations at least
    for node in dq:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        assert inits.get(node.input[0], np.zeros(1, np.int8)).dtype != np.int32, node.name


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_builds_real_engine_per_precision(models, tmp_path, precision):
    info = build_engine(models[precision], tmp_path / "engines", backend="tensorrt-rtx", max_batch=4)
    assert info.path == tmp_path / "engines" / f"rtx{RTX_VERSION}-{precision}.engine"
    # the precision was read from the graph itself (Q/DQ layers, half tensors), not from the file name
    assert info.precision == precision
    size = info.path.stat().st_size
    assert size > trt.Runtime(trt.Logger(trt.Logger.ERROR)).engine_header_size  # a plan, not a header
    assert info.trt_version == RTX_VERSION and info.compute_capability is None and info.backend == "tensorrt-rtx"
    assert 0 < info.build_seconds < 60
    fields = info.manifest_fields()
    assert fields == {"format": "tensorrt-rtx-engine", "precision": precision, "backends": ["tensorrt-rtx"],
                      "trt_version": RTX_VERSION, "compute_capability": None, "max_batch": 4,
                      "source": f"model.{precision}.onnx"}
    assert [p.name for p in info.path.parent.iterdir()] == [info.path.name]  # no temp file, no timing cache left


def test_engines_differ_per_precision(models, tmp_path):
    blobs = {p: build_engine(models[p], tmp_path / f"{p}.engine", backend="tensorrt-rtx", max_batch=2)
             .path.read_bytes() for p in ("fp32", "fp16", "int8")}
    assert len(set(blobs.values())) == 3


def test_rtx_ignores_a_timing_cache(models, tmp_path):
    cache = tmp_path / "timing.cache"
    build_engine(models["fp32"], tmp_path / "e.engine", backend="tensorrt-rtx", max_batch=2, timing_cache=cache)
    assert (tmp_path / "e.engine").is_file() and not cache.exists()


def test_parser_refuses_maxpool_with_indices(tmp_path):
    path = _export(PoolWithIndices(), tmp_path / "pool.onnx", outputs=("pooled", "indices"))
    with pytest.raises(EngineBuildError) as err:
        build_engine(path, tmp_path, backend="tensorrt-rtx")
    message = str(err.value)
    assert "pool.onnx" in message and "op MaxPool" in message and "node 0" in message
    assert "than 1 outputs for MaxPool" in message  # NVIDIA spells it "mode than"
    assert not list(tmp_path.glob("*.engine"))


def test_parser_refuses_int32_bias_dequantize(models, tmp_path):
    """onnxruntime's default quantizer writes an int32 bias DequantizeLinear; TensorRT refuses it."""
    path = _quantize(models["fp32"], tmp_path / "int32bias.onnx", float_bias=False)
    with pytest.raises(EngineBuildError) as err:
        build_engine(path, tmp_path, backend="tensorrt-rtx")
    assert "op DequantizeLinear" in str(err.value) and "Int32" in str(err.value)


def test_fixed_batch_is_refused(tmp_path):
    path = _export(TinyNet(), tmp_path / "static.onnx", dynamic=False)
    with pytest.raises(EngineBuildError, match=r"static\.onnx.*\(1, 1, 32, 32\).*dynamic batch"):
        build_engine(path, tmp_path, backend="tensorrt-rtx")


def test_missing_onnx_is_an_input_error(tmp_path):
    from regionkd.sdk.errors import InputError

    with pytest.raises(InputError, match="nothing.onnx: ONNX file not found"):
        build_engine(tmp_path / "nothing.onnx", tmp_path, backend="tensorrt-rtx")


@pytest.mark.gpu
def test_rtx_engine_runs_like_onnxruntime(models, tmp_path):
    ok, reason = tensorrt_available(rtx=True)
    if not ok:
        pytest.skip(reason if reason.startswith("no NVIDIA GPU") else f"no NVIDIA GPU runtime: {reason}")
    import onnxruntime as ort

    from regionkd.sdk.backends.tensorrt_backend import TensorRTBackend
    from regionkd.sdk.bundle import file_entry, load_bundle, write_manifest

    import shutil
    shutil.copy(models["fp32"], tmp_path / "model.fp32.onnx")
    write_manifest(tmp_path, {
        "format_version": 1, "model": {"name": "tiny", "arch": "tiny", "num_classes": 3,
                                       "class_names": ["background", "liver", "tumour"]},
        "preprocessing": {"window": [-60, 140], "input_size": [H, W]}, "io": {"max_batch": 4},
        "files": [file_entry(tmp_path / "model.fp32.onnx", tmp_path, format="onnx", precision="fp32",
                             backends=["onnxruntime", "tensorrt"])]})
    batch = np.random.default_rng(0).uniform(-1, 1, (6, 1, H, W)).astype(np.float32)
    expected = ort.InferenceSession(str(models["fp32"]), providers=["CPUExecutionProvider"]).run(
        None, {"image": batch})[0]
    backend = TensorRTBackend(load_bundle(tmp_path), "fp32", rtx=True)
    try:
        got = backend.run(batch)
        assert backend.last_gpu_ms is not None and backend.last_gpu_ms > 0
    finally:
        backend.close()
    np.testing.assert_allclose(got, expected, atol=1e-2)
    assert list((tmp_path / "engines").glob("*.runtime-cache"))

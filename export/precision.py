"""FP16 and INT8 versions of the fp32 ONNX graph, with the precision written into the graph so
TensorRT builds them strongly typed.

FP16: onnxruntime's float16 converter with float32 inputs/outputs (`keep_io_types`) and the
numerically sensitive ops (softmax, exp/log, reductions, normalisation) kept in float32.

INT8: static post-training quantization in Q/DQ form (`onnxruntime.quantization.quantize_static`),
calibrated once on real CT slices; the ranges are cached (`calibration.json`) and reused for the
second flavour, so both come from the same calibration:
- "tensorrt": symmetric int8 activations, per-channel symmetric int8 weights, every zero-point 0
  and int8, biases left in float (`QuantizeBias: False`): TensorRT's parser rejects the int32
  bias DequantizeLinear onnxruntime writes by default (onnx/onnx-tensorrt#850).
- "cpu": uint8 (asymmetric) activations with int8 weights: the combination onnxruntime's CPU
  kernels run fastest; symmetric int8 activations can be slower than fp32 there.
In both, the layers that read the network input stay in float (`input_layers`): 8 bits over the
HU window merge the intensity levels that separate a lesion from its organ. Measured on the
demo's MobileNetV2 (20 liver phantoms): tumour Dice 0.408 in fp32, 0.228 with every layer in
int8, 0.386 with the stem convolution in float (excluding the classifier too: 0.388).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from regionkd.sdk.atomic import atomic_path, give_normal_permissions
from regionkd.sdk.bundle_files import INT8_FLAVOURS
from regionkd.sdk.errors import RegionKDError, require

from .onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session

#: ops kept in float32 in the FP16 graph (overflow / precision loss in fp16)
FP16_KEEP_FLOAT32 = ("Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div",
                     "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
                     "InstanceNormalization", "LayerNormalization", "GroupNormalization",
                     "BatchNormalization", "Erf", "TopK", "Range", "CumSum")


class PrecisionError(RegionKDError):
    """A reduced-precision model that cannot be made or loses too much accuracy."""


# ---------------------------------------------------------------- FP16

def convert_fp16(fp32_path, out_path, keep_float32=FP16_KEEP_FLOAT32):
    """Write an FP16 graph with float32 input/output; returns the ModelProto."""
    onnx = require("onnx", "export", "FP16 conversion")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(fp32_path))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_float32))
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=block,
                                    disable_shape_infer=False)
    # the converter appends the input/output Casts at the end of the node list; the checker and
    # TensorRT's parser want nodes in topological order
    OnnxModel.graph_topological_sort(half.graph, is_deterministic=True)
    onnx.checker.check_model(half)
    with atomic_path(out_path) as tmp:
        onnx.save(half, str(tmp))
    return half


# ---------------------------------------------------------------- INT8

def _calibration_reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class SliceCalibrationReader(CalibrationDataReader):
        """Feeds preprocessed CT slices (n, 1, H, W) to the calibrator, one batch at a time."""

        def __init__(self, images: np.ndarray, batch_size: int = 1):
            self.images = np.ascontiguousarray(images, dtype=np.float32)
            self.batch_size = int(batch_size)
            self._next = 0

        def get_next(self):
            if self._next >= len(self.images):
                return None
            batch = self.images[self._next:self._next + self.batch_size]
            self._next += self.batch_size
            return {INPUT_NAME: batch}

        def __len__(self):
            return -(-len(self.images) // self.batch_size)

        def rewind(self):
            self._next = 0

    return SliceCalibrationReader


def calibration_reader(images: np.ndarray, batch_size: int = 1):
    """A `CalibrationDataReader` over real preprocessed slices (never random data)."""
    if images is None or len(images) == 0:
        raise PrecisionError("INT8 calibration needs CT slices (--calib DATA_DIR); none were given")
    return _calibration_reader_class()(images, batch_size)


def flavour_options(flavour: str) -> dict:
    """quantize_static keyword arguments of an INT8 flavour."""
    from onnxruntime.quantization import QuantFormat, QuantType

    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8)
    if flavour == "tensorrt":
        return dict(common, activation_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    if flavour == "cpu":
        return dict(common, activation_type=QuantType.QUInt8,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    raise PrecisionError(f"unknown INT8 flavour {flavour!r} (choose from {', '.join(INT8_FLAVOURS)})")


def input_layers(proto) -> list[str]:
    """Names of the nodes that read a graph input: they stay in float in the INT8 graphs."""
    inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if inputs & set(n.input)]


def quantize_int8(fp32_path, out_path, flavour: str, calibration_cache, images: np.ndarray | None = None):
    """Write the INT8 Q/DQ graph of `flavour`. The calibration ranges come from `calibration_cache`
    (a JSON file) when it exists, else from `images`, and are then saved there for the next flavour."""
    onnx = require("onnx", "export", "INT8 quantization")
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration_cache = Path(calibration_cache)
    reader = None if calibration_cache.is_file() else calibration_reader(images)
    with quiet_quantizer(), tempfile.TemporaryDirectory(prefix="regionkd-quant-") as work, \
            atomic_path(Path(out_path)) as tmp:
        pre = Path(work) / "pre.onnx"
        # ONNX shape inference only: ORT graph optimisations could bring in ops TensorRT does not
        # parse, and symbolic shape inference gives up on Resize-after-Concat graphs
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), reader, calibration_cache_path=calibration_cache,
                        nodes_to_exclude=input_layers(onnx.load(str(pre))), **flavour_options(flavour))
        if calibration_cache.is_file():
            give_normal_permissions(calibration_cache)   # the quantizer writes it through mkstemp (0600)
        proto = compact_graph(onnx.load(str(tmp)))
        onnx.checker.check_model(proto)
        if flavour == "tensorrt":
            problems = tensorrt_qdq_problems(proto)
            if problems:
                raise PrecisionError("the TensorRT INT8 graph is not what TensorRT's parser accepts: "
                                     + "; ".join(problems[:5]))
        onnx.save(proto, str(tmp))
    return proto


class _QuantizerRecords(logging.Filter):
    """Drops the records below ERROR that onnxruntime.quantization logs on the root logger."""

    def __init__(self):
        super().__init__()
        import onnxruntime.quantization

        self.folder = str(Path(onnxruntime.quantization.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.folder)


@contextlib.contextmanager
def quiet_quantizer():
    """Keep onnxruntime's quantizer quiet for a block, and only it: it repeats the same advice at
    WARNING on every call, partly through its own loggers (`onnxruntime.quantization.*`, raised to
    ERROR here) and partly through the root logger itself (`logging.warning(...)`). Those root
    records are dropped by a filter on the root logger, which sees only records logged on it, so
    every other logger's records pass; a NullHandler keeps the quantizer's first root message from
    installing a stderr handler (`logging.basicConfig`). Levels, filter and handler are restored."""
    own, root = logging.getLogger("onnxruntime.quantization"), logging.getLogger()
    level, records, null = own.level, _QuantizerRecords(), logging.NullHandler()
    own.setLevel(logging.ERROR)
    root.addFilter(records)
    root.addHandler(null)
    try:
        yield
    finally:
        root.removeHandler(null)
        root.removeFilter(records)
        own.setLevel(level)


def compact_graph(proto):
    """Give every intermediate tensor and every Q/DQ node a short name, and drop dead nodes and
    unused initializers, in place.

    onnxruntime's quantizer names tensors and Q/DQ nodes after the layer output they wrap
    ("/enc/enc.3/conv/Conv_output_0_QuantizeLinear_Output"); in a graph of small convolutions those
    strings outweigh the int8 weights (ENet: 190 kB of names against 345 kB of weights). The graph
    input/output names and the compute nodes' names (the layer names TensorRT reports) are kept.
    The shape annotations (value_info) are dropped: onnxruntime and TensorRT infer them."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict = {}

    def short(name):
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(graph.node):
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = f"{'q' if node.op_type == 'QuantizeLinear' else 'dq'}{i}"
    del graph.value_info[:]
    # the quantizer can leave dead nodes (a Constant nothing reads) and unused initializers behind;
    # onnxruntime warns "Removing initializer ... not used by any node" on every load: drop them
    while True:
        used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    return proto


def qdq_summary(proto) -> dict:
    """What a Q/DQ graph holds: zero-point dtypes and values, DequantizeLinear inputs by dtype,
    whether Conv/Gemm biases are float, and the per-channel weight count."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    zp_types, nonzero_zp, dq_input_types, per_channel = set(), [], set(), 0
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and node.input[2] in inits:
            zp = inits[node.input[2]]
            zp_types.add(TensorProto.DataType.Name(zp.data_type))
            if np.any(numpy_helper.to_array(zp) != 0):
                nonzero_zp.append(node.name)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            x = inits[node.input[0]]
            dq_input_types.add(TensorProto.DataType.Name(x.data_type))
            if len(x.dims) > 1 and len(inits[node.input[1]].dims) == 1 and inits[node.input[1]].dims[0] > 1:
                per_channel += 1
    producers = {out: n for n in proto.graph.node for out in n.output}
    bias_types = set()
    for node in proto.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            src = node.input[2]
            if src in producers and producers[src].op_type == "DequantizeLinear":
                bias_types.add("dequantized-" + TensorProto.DataType.Name(inits[producers[src].input[0]].data_type)
                               if producers[src].input[0] in inits else "dequantized")
            elif src in inits:
                bias_types.add(TensorProto.DataType.Name(inits[src].data_type))
    return {"zero_point_types": sorted(zp_types), "nonzero_zero_points": nonzero_zp,
            "dequantized_initializer_types": sorted(dq_input_types), "bias_types": sorted(bias_types),
            "per_channel_weights": per_channel,
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)}


def tensorrt_qdq_problems(proto) -> list:
    """Reasons TensorRT's parser would refuse this Q/DQ graph (empty when it is fine)."""
    s = qdq_summary(proto)
    problems = []
    if s["qdq_nodes"] == 0:
        problems.append("no QuantizeLinear/DequantizeLinear nodes")
    if s["zero_point_types"] and s["zero_point_types"] != ["INT8"]:
        problems.append(f"zero-points of type {s['zero_point_types']} (TensorRT needs int8)")
    if s["nonzero_zero_points"]:
        problems.append(f"non-zero zero-points in {s['nonzero_zero_points'][:3]} (TensorRT needs symmetric)")
    if "INT32" in s["dequantized_initializer_types"]:
        problems.append("an int32 bias DequantizeLinear (onnx/onnx-tensorrt#850)")
    if any(t.startswith("dequantized") for t in s["bias_types"]):
        problems.append(f"quantized biases {s['bias_types']} (TensorRT needs float biases)")
    return problems


# ---------------------------------------------------------------- latency and accuracy

def cpu_latency_ms(onnx_path, input_size, *, runs: int = 20, warmup: int = 3, threads: int = 1,
                   images: np.ndarray | None = None) -> dict:
    """onnxruntime CPU latency of one slice (batch 1): median and p95 in ms over `runs` after warm-up."""
    session = ort_session(onnx_path, threads=threads)
    if images is None or len(images) == 0:
        raise PrecisionError("latency is measured on real slices; none were given")
    x = np.ascontiguousarray(images[:1], dtype=np.float32)
    for _ in range(warmup):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for i in range(runs):
        x = np.ascontiguousarray(images[i % len(images):i % len(images) + 1], dtype=np.float32)
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
            "runs": runs, "threads": threads, "input_size": [int(input_size[0]), int(input_size[1])]}


def check_dice_drop(reference: dict, candidate: dict, max_drop: float, label: str) -> None:
    """Refuse `candidate` when any class loses more than `max_drop` Dice (absolute) against `reference`."""
    failures = []
    for cls, ref in reference.items():
        got = candidate.get(cls)
        if ref is None or got is None:
            continue
        if ref - got > max_drop + 1e-12:
            failures.append(f"'{cls}' {ref:.4f} -> {got:.4f} (drop {ref - got:.4f})")
    if failures:
        raise PrecisionError(
            f"{label} loses more than --max-dice-drop {max_drop:g} Dice against fp32 on the validation data: "
            + ", ".join(failures) + "; not writing it (raise --max-dice-drop, calibrate on more slices, "
            "or leave this precision out)")

"""The fused model: pre- and post-processing inside the exported graph.

It takes axial slices as raw HU at their native matrix, (n, 1, X, Y) float32 with dynamic n, X
and Y, and returns (n, X, Y) uint8 labels: the HU window and scaling, the linear resize to the
network size, the network itself, the linear resize of the logits back to (X, Y), the argmax and
the cast, the same steps and conventions as the numpy path of `regionkd.sdk.preprocess` (half-pixel
centres, no antialiasing: ONNX Resize `linear` / `half_pixel`). On a GPU this moves all per-slice
work to the device and shrinks what comes back from C float32 maps to one uint8 map.

The graph wraps any of the bundle's network files (fp32, fp16, either INT8 flavour) unchanged:
their float32 "image" input becomes the output of the input resize, their "logits" output the
input of the output resize. The export checks each fused model against the numpy path
(`label_agreement`) before it ships it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from regionkd.sdk.errors import require

from .onnx_export import INPUT_NAME, OUTPUT_NAME

FUSED_INPUT = "hu"
FUSED_OUTPUT = "labels"
MIN_AGREEMENT = 0.9999          # per volume, fused labels against the numpy path's


def _const(name: str, values, dtype) -> "onnx.TensorProto":
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _pre_nodes(helper, window, input_size) -> tuple[list, list]:
    """HU -> the network's "image": clip to the window, scale to [-1, 1], resize to input_size."""
    lo, hi = float(window[0]), float(window[1])
    inits = [_const("fused/lo", lo, np.float32), _const("fused/hi", hi, np.float32),
             _const("fused/centre", (lo + hi) / 2.0, np.float32), _const("fused/scale", 2.0 / (hi - lo), np.float32),
             _const("fused/net_hw", [int(v) for v in input_size], np.int64),
             _const("fused/start0", [0], np.int64), _const("fused/stop2", [2], np.int64),
             _const("fused/stop4", [4], np.int64)]
    nodes = [
        helper.make_node("Clip", [FUSED_INPUT, "fused/lo", "fused/hi"], ["fused/clipped"]),
        helper.make_node("Sub", ["fused/clipped", "fused/centre"], ["fused/centred"]),
        helper.make_node("Mul", ["fused/centred", "fused/scale"], ["fused/scaled"]),
        helper.make_node("Shape", [FUSED_INPUT], ["fused/hu_shape"]),
        helper.make_node("Slice", ["fused/hu_shape", "fused/start0", "fused/stop2"], ["fused/n1"]),
        helper.make_node("Slice", ["fused/hu_shape", "fused/stop2", "fused/stop4"], ["fused/native_hw"]),
        helper.make_node("Concat", ["fused/n1", "fused/net_hw"], ["fused/net_sizes"], axis=0),
        helper.make_node("Resize", ["fused/scaled", "", "", "fused/net_sizes"], [INPUT_NAME], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
    ]
    return nodes, inits


def _post_nodes(helper) -> list:
    """The network's "logits" -> labels: resize back to the native matrix, argmax, uint8."""
    from onnx import TensorProto

    return [
        helper.make_node("Shape", [OUTPUT_NAME], ["fused/logit_shape"]),
        helper.make_node("Slice", ["fused/logit_shape", "fused/start0", "fused/stop2"], ["fused/nc"]),
        helper.make_node("Concat", ["fused/nc", "fused/native_hw"], ["fused/out_sizes"], axis=0),
        helper.make_node("Resize", [OUTPUT_NAME, "", "", "fused/out_sizes"], ["fused/up"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("ArgMax", ["fused/up"], ["fused/argmax"], axis=1, keepdims=0),
        helper.make_node("Cast", ["fused/argmax"], [FUSED_OUTPUT], to=TensorProto.UINT8),
    ]


def _topological(nodes: list, available: set) -> list:
    """`nodes` ordered so that each comes after the producers of its inputs (the float16 converter
    appends its input cast at the end, which ONNX's checker refuses once the graph is wrapped)."""
    ordered, pending, have = [], list(nodes), set(available) | {""}
    while pending:
        ready = [n for n in pending if all(i in have for i in n.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or an undefined input near {pending[0].name or pending[0].op_type}")
        for n in ready:
            ordered.append(n)
            have.update(n.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    return ordered


def build_fused(network_path, out_path, window, input_size):
    """Write the fused model of the network ONNX file `network_path` to `out_path` (atomically);
    returns the ModelProto."""
    onnx = require("onnx", "export", "the fused model")
    from onnx import TensorProto, helper

    from regionkd.sdk.atomic import atomic_path

    model = onnx.load(str(network_path))
    graph = model.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ValueError(f"{network_path}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}")
    pre, inits = _pre_nodes(helper, window, input_size)
    available = {FUSED_INPUT} | {t.name for t in graph.initializer} | {t.name for t in inits}
    nodes = _topological(pre + list(graph.node) + _post_nodes(helper), available)
    fused = helper.make_graph(
        nodes, f"{graph.name or 'network'}-fused",
        [helper.make_tensor_value_info(FUSED_INPUT, TensorProto.FLOAT, ["batch", 1, "x", "y"])],
        [helper.make_tensor_value_info(FUSED_OUTPUT, TensorProto.UINT8, ["batch", "x", "y"])],
        initializer=list(graph.initializer) + inits, value_info=list(graph.value_info))
    out = helper.make_model(fused, opset_imports=list(model.opset_import), producer_name="regionkd")
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    with atomic_path(Path(out_path), suffix=".onnx") as tmp:
        onnx.save(out, str(tmp))
    return out


def label_agreement(fused_labels: np.ndarray, numpy_labels: np.ndarray) -> float:
    """Share of voxels where the fused model and the numpy path give the same label."""
    if fused_labels.shape != numpy_labels.shape:
        raise ValueError(f"label volumes differ in shape: {fused_labels.shape} vs {numpy_labels.shape}")
    return float(np.mean(fused_labels == numpy_labels)) if fused_labels.size else 1.0

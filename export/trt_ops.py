"""Which ONNX ops TensorRT's ONNX parser (onnx-tensorrt) accepts, so that an export can stop
early naming the op and the layer instead of failing later in the engine build.

The set follows onnx-tensorrt's docs/operators.md (TensorRT 8.4 .. 10.x support matrix). It is a
conservative superset check at the op-type level only: per-op restrictions other than MaxPool's
indices output (e.g. "weights must be initializers") are left to the parser itself."""
from __future__ import annotations

TENSORRT_ONNX_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh
Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Explicitly unsupported ops worth a specific hint in the error message.
UNSUPPORTED_HINTS: dict[str, str] = {
    "MaxUnpool": "replace un-pooling with Resize (bilinear/nearest) or ConvTranspose",
    "MaxPool": "MaxPool with an Indices output is unsupported; pool without return_indices",
    "ConvInteger": "use QuantizeLinear/DequantizeLinear (Q/DQ) int8 instead",
    "MatMulInteger": "use QuantizeLinear/DequantizeLinear (Q/DQ) int8 instead",
    "QLinearConv": "use QuantizeLinear/DequantizeLinear (Q/DQ) int8 instead",
    "QLinearMatMul": "use QuantizeLinear/DequantizeLinear (Q/DQ) int8 instead",
}


def _nodes(graph):
    """All nodes, including those inside If/Loop/Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def unsupported_ops(onnx_model) -> list[tuple[str, str]]:
    """(op_type, node_name) of every node TensorRT's ONNX parser cannot take: op types outside
    TENSORRT_ONNX_OPS (default ONNX domain only; custom domains count as unsupported) and MaxPool
    nodes that produce an indices output. `onnx_model` is an onnx.ModelProto (or its graph)."""
    graph = getattr(onnx_model, "graph", onnx_model)
    bad = []
    for node in _nodes(graph):
        name = node.name or f"<unnamed {node.op_type}>"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_ONNX_OPS:
            bad.append((node.op_type if not node.domain or node.domain == "ai.onnx"
                        else f"{node.domain}::{node.op_type}", name))
        elif node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            bad.append(("MaxPool", name))
    return bad

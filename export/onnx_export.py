"""PyTorch network -> checked, simplified fp32 ONNX, and its parity against PyTorch.

The TorchScript exporter (`dynamo=False`) is used on purpose: with torch 2.13 it folds BatchNorm
into Conv and gives small graphs of plain ops (Conv/Relu/MaxPool/Resize) that TensorRT's parser
takes, and it needs no onnxscript. The graph is named "image" -> "logits" with a dynamic batch
axis, then simplified with onnxsim, checked with `onnx.checker`, and refused if any op is outside
the set TensorRT's ONNX parser supports (the message names the op and the layer).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regionkd.sdk.atomic import atomic_path
from regionkd.sdk.errors import RegionKDError, require

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17


class ExportError(RegionKDError):
    """The network cannot be exported to an ONNX graph that the targets accept."""


@dataclass(frozen=True)
class Parity:
    """onnxruntime vs PyTorch on the same slices."""
    max_abs_logit_diff: float
    argmax_agreement: float
    slices: int

    def as_dict(self) -> dict:
        return {"max_abs_logit_diff": self.max_abs_logit_diff, "argmax_agreement": self.argmax_agreement,
                "slices": self.slices}


def export_onnx(model, onnx_path, input_size, *, simplify: bool = True, check_tensorrt: bool = True):
    """Export `model.forward` (N x 1 x H x W -> N x C x H x W) to `onnx_path` and return the ModelProto.

    Raises ExportError when torch cannot export it, onnxsim or the checker rejects it, or (with
    `check_tensorrt`) an op is one TensorRT's ONNX parser does not support."""
    torch = require("torch", "export", "ONNX export")
    onnx = require("onnx", "export", "ONNX export")
    h, w = int(input_size[0]), int(input_size[1])
    model = model.eval()
    dummy = torch.zeros(2, 1, h, w, dtype=torch.float32)
    onnx_path = Path(onnx_path)
    with atomic_path(onnx_path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True, dynamo=False)
        except Exception as exc:  # torch raises many types here; name the network and the cause
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc
        proto = onnx.load(str(tmp))
        if simplify:
            proto = simplify_onnx(proto)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported ONNX graph of {type(model).__name__} fails onnx.checker: {exc}") from exc
        if check_tensorrt:
            check_tensorrt_ops(proto)
        onnx.save(proto, str(tmp))
    return proto


def simplify_onnx(proto):
    """onnxsim with the batch axis left dynamic; returns the simplified ModelProto."""
    onnxsim = require("onnxsim", "export", "ONNX simplification")
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise ExportError("onnxsim could not validate the simplified graph against the original")
    return simplified


def check_tensorrt_ops(proto) -> None:
    """Stop with a message naming every op (and its layer) that TensorRT's ONNX parser rejects."""
    from regionkd.export import trt_ops

    bad = trt_ops.unsupported_ops(proto)
    if bad:
        hints = getattr(trt_ops, "UNSUPPORTED_HINTS", {})
        listed = "; ".join(f"{op} in layer '{name}'" + (f" ({hints[op]})" if op in hints else "")
                           for op, name in bad)
        raise ExportError(
            f"the graph uses {len(bad)} op(s) that TensorRT's ONNX parser does not support: {listed}. "
            "Change the network so that it exports without them, then retrain.")


def ort_session(onnx_path, threads: int | None = 1):
    """A CPU onnxruntime session with full graph optimisation (what the SDK's CPU backend uses)."""
    ort = require("onnxruntime", purpose="ONNX inference")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(n, 1, H, W) float32 -> (n, C, H, W) float32 logits, batch by batch."""
    outs = [session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch_size], np.float32)})[0]
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


def run_torch(model, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    torch = require("torch", "export", "PyTorch inference")
    model = model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], np.float32))).numpy())
    return np.concatenate(outs, axis=0)


def compare_logits(reference: np.ndarray, other: np.ndarray) -> Parity:
    """Max abs logit difference and the fraction of pixels whose argmax class agrees."""
    if reference.shape != other.shape:
        raise ExportError(f"logit shapes differ: {reference.shape} vs {other.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))
    agree = float(np.mean(np.argmax(reference, axis=1) == np.argmax(other, axis=1)))
    return Parity(max_abs_logit_diff=diff, argmax_agreement=agree, slices=int(reference.shape[0]))


def onnx_parity(model, onnx_path, images: np.ndarray) -> Parity:
    """Parity of onnxruntime (CPU) against PyTorch on `images` (real preprocessed slices)."""
    if len(images) == 0:
        raise ExportError("parity needs at least one slice")
    return compare_logits(run_torch(model, images), run_onnx(ort_session(onnx_path), images))

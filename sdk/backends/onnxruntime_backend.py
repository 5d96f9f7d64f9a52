"""onnxruntime backend: the CPU default everywhere, the CUDA execution provider where
onnxruntime-gpu is installed. An InferenceSession's `run` is thread-safe, so one backend may
serve several threads.

The session is made from the bytes `Bundle.read_verified` read and checked (never from the path,
which could be swapped between the check and the load), and the model's declared input and
output shapes are checked against the manifest before any volume is seen."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import BackendError, BundleError, require
from .base import Backend

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16


class OnnxRuntimeBackend(Backend):
    """onnxruntime over one of a bundle's ONNX files: a network ("image" -> "logits") or, with
    graph="fused", its fused model (raw HU slices -> uint8 labels, see `base.Backend.fused`)."""

    name = "onnxruntime"
    thread_safe = True

    def __init__(self, bundle, precision: str, threads: int | None = None, batch_size: int | None = None,
                 graph: str = "network"):
        entry = bundle.select_file(precision, self.name, graph=graph)
        if entry.get("format", "onnx") != "onnx":
            raise BackendError(f"{entry['path']}: onnxruntime needs an ONNX file, the manifest says {entry['format']!r}")
        self._open(bundle.read_verified(entry), bundle.path_of(entry), precision, graph, threads,
                   int(batch_size or bundle.max_batch or DEFAULT_MAX_BATCH), bundle.manifest.get("io") or {},
                   lambda path, i, o: _check_declared_shapes(path, i, o, bundle.preprocessing["input_size"],
                                                              bundle.num_classes, bundle.class_names, graph))
        self.num_classes = bundle.num_classes

    @classmethod
    def from_model_file(cls, path, precision: str, num_classes: int, input_size, threads: int | None = None,
                        batch_size: int | None = None, graph: str = "network"):
        """The backend over one ONNX file that no manifest lists yet: the export validates the models
        it wrote before it writes the manifest."""
        from pathlib import Path

        self = cls.__new__(cls)
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BackendError(f"cannot read {path}: {exc.strerror or exc}") from None
        names = [str(c) for c in range(int(num_classes))]
        self._open(data, path, precision, graph, threads, int(batch_size or DEFAULT_MAX_BATCH), {},
                   lambda p, i, o: _check_declared_shapes(p, i, o, input_size, int(num_classes), names, graph))
        self.num_classes = int(num_classes)
        return self

    def _open(self, model_bytes: bytes, model_path, precision: str, graph: str, threads, max_batch: int, io: dict,
              check_shapes) -> None:
        ort = require("onnxruntime", purpose="the onnxruntime backend")
        self.precision, self.model_path, self.fused = precision, model_path, graph == "fused"
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = io.get("input") if not self.fused and io.get("input") in [i.name for i in inputs] \
            else inputs[0].name
        self.output_name = io.get("output") if not self.fused and io.get("output") in [o.name for o in outputs] \
            else outputs[0].name
        in_shape = next(i.shape for i in inputs if i.name == self.input_name)
        check_shapes(model_path, in_shape, next(o.shape for o in outputs if o.name == self.output_name))
        self.max_batch = max_batch
        fixed_batch = in_shape[0]
        self._fixed_batch = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else None
        if self._fixed_batch:
            self.max_batch = min(self.max_batch, self._fixed_batch)
        self.last_gpu_ms = None  # onnxruntime exposes no CUDA event timing
        log.info("onnxruntime %s on %s, %s%s", model_path.name, "/".join(self.providers), precision,
                 " (fused)" if self.fused else "")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, H, W) float32 -> (n, C, H, W) float32 logits, in chunks of at most max_batch; for a
        fused model (n, 1, X, Y) HU -> (n, X, Y) uint8 labels."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outs = []
        for start in range(0, batch.shape[0], self.max_batch):
            chunk = batch[start:start + self.max_batch]
            n = chunk.shape[0]
            if self._fixed_batch and n < self._fixed_batch:  # pad a model exported with a fixed batch
                chunk = np.concatenate([chunk, np.zeros((self._fixed_batch - n,) + chunk.shape[1:], np.float32)])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0][:n]
            outs.append(out)
        logits = outs[0] if len(outs) == 1 else np.concatenate(outs)
        if self.fused:
            if logits.shape != (batch.shape[0], *batch.shape[2:]) or logits.dtype != np.uint8:
                raise BackendError(f"{self.model_path}: fused output {logits.dtype} {logits.shape} is not uint8 "
                                   f"labels of shape {(batch.shape[0], *batch.shape[2:])}")
            return logits
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise BackendError(f"{self.model_path}: output shape {logits.shape} is not (n, {self.num_classes}, H, W)")
        return logits.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def _check_declared_shapes(path, in_shape, out_shape, input_size, num_classes: int, class_names, graph) -> None:
    """The model's declared (N, 1, H, W) input and (N, C, H, W) output against the manifest's
    input_size and class count (dimensions left symbolic in the graph are not checked here); a
    fused model: (N, 1, X, Y) in, (N, X, Y) out."""
    size = [int(v) for v in input_size]

    def fixed(dim):
        return isinstance(dim, int) and dim > 0

    if graph == "fused":
        if len(in_shape) != 4 or len(out_shape) != 3:
            raise BundleError(f"{path}: a fused model takes (n, 1, X, Y) and gives (n, X, Y); this one "
                              f"{in_shape} -> {out_shape}")
        return
    if len(in_shape) != 4 or len(out_shape) != 4:
        raise BundleError(f"{path}: input {in_shape} / output {out_shape} are not 4D (n, c, H, W)")
    if fixed(in_shape[1]) and in_shape[1] != 1:
        raise BundleError(f"{path}: the model takes {in_shape[1]} channels, a CT slice has 1")
    hw = in_shape[2:]
    if all(fixed(d) for d in hw) and list(hw) != size:
        raise BundleError(f"{path}: the model takes {hw[0]}x{hw[1]} slices, the manifest's "
                          f"preprocessing.input_size says {size[0]}x{size[1]}")
    if fixed(out_shape[1]) and out_shape[1] != num_classes:
        raise BundleError(f"{path}: the model outputs {out_shape[1]} classes, the manifest names "
                          f"{num_classes} ({', '.join(class_names)})")

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
    name = "onnxruntime"
    thread_safe = True

    def __init__(self, bundle, precision: str, threads: int | None = None, batch_size: int | None = None):
        ort = require("onnxruntime", purpose="the onnxruntime backend")
        entry = bundle.select_file(precision, self.name)
        if entry.get("format", "onnx") != "onnx":
            raise BackendError(f"{entry['path']}: onnxruntime needs an ONNX file, the manifest says {entry['format']!r}")
        self.precision = precision
        self.model_path = bundle.path_of(entry)
        self.num_classes = bundle.num_classes
        model_bytes = bundle.read_verified(entry)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {exc}") from exc
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        io = bundle.manifest.get("io") or {}
        self.input_name = io.get("input") if io.get("input") in [i.name for i in inputs] else inputs[0].name
        self.output_name = io.get("output") if io.get("output") in [o.name for o in outputs] else outputs[0].name
        in_shape = next(i.shape for i in inputs if i.name == self.input_name)
        out_shape = next(o.shape for o in outputs if o.name == self.output_name)
        _check_declared_shapes(self.model_path, in_shape, out_shape, bundle)
        fixed_batch = in_shape[0]
        self.max_batch = int(batch_size or bundle.max_batch or DEFAULT_MAX_BATCH)
        if isinstance(fixed_batch, int) and fixed_batch > 0:
            self.max_batch = min(self.max_batch, fixed_batch)
            self._fixed_batch = fixed_batch
        else:
            self._fixed_batch = None
        self.last_gpu_ms = None  # onnxruntime exposes no CUDA event timing
        log.info("onnxruntime %s on %s, %s", self.model_path.name, "/".join(self.providers), precision)

    @classmethod
    def from_model_file(cls, path, precision: str, threads: int | None = None, batch_size: int | None = None):
        """The backend over one ONNX file that no manifest lists yet: the export validates the models
        it wrote before it writes the manifest. The file stands in for a bundle of that one model,
        whose input size and class count are the ones its graph declares."""
        return cls(_ModelFile(path, precision), precision, threads=threads, batch_size=batch_size)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, H, W) float32 -> (n, C, H, W) float32 logits, in chunks of at most max_batch."""
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
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise BackendError(f"{self.model_path}: output shape {logits.shape} is not (n, {self.num_classes}, H, W)")
        return logits.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def _check_declared_shapes(path, in_shape, out_shape, bundle) -> None:
    """The model's declared (N, 1, H, W) input and (N, C, H, W) output against the manifest's
    input_size and class count (dimensions left symbolic in the graph are not checked here)."""
    size = [int(v) for v in bundle.preprocessing["input_size"]]

    def fixed(dim):
        return isinstance(dim, int) and dim > 0

    if len(in_shape) != 4 or len(out_shape) != 4:
        raise BundleError(f"{path}: input {in_shape} / output {out_shape} are not 4D (n, c, H, W)")
    if fixed(in_shape[1]) and in_shape[1] != 1:
        raise BundleError(f"{path}: the model takes {in_shape[1]} channels, a CT slice has 1")
    hw = in_shape[2:]
    if all(fixed(d) for d in hw) and list(hw) != size:
        raise BundleError(f"{path}: the model takes {hw[0]}x{hw[1]} slices, the manifest's "
                          f"preprocessing.input_size says {size[0]}x{size[1]}")
    if fixed(out_shape[1]) and out_shape[1] != bundle.num_classes:
        raise BundleError(f"{path}: the model outputs {out_shape[1]} classes, the manifest names "
                          f"{bundle.num_classes} ({', '.join(bundle.class_names)})")


class _ModelFile:
    """The few `Bundle` answers `OnnxRuntimeBackend` asks for, about one ONNX file outside a bundle:
    its entry, its bytes (read once), the input size its graph declares and the class count it
    outputs (the graphs leave that axis symbolic, so one blank slice is run to see it), both read
    with an unoptimised CPU session: the manifest checks then compare the file with itself."""

    manifest: dict = {}
    max_batch = None

    def __init__(self, path, precision: str):
        from pathlib import Path

        ort = require("onnxruntime", purpose="the onnxruntime backend")
        self.path = Path(path)
        self.entry = {"path": self.path.name, "format": "onnx", "precision": precision,
                      "backends": [OnnxRuntimeBackend.name]}
        try:
            self.data = self.path.read_bytes()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            probe = ort.InferenceSession(self.data, sess_options=options, providers=["CPUExecutionProvider"])
            image = probe.get_inputs()[0]
            size = [d if isinstance(d, int) and d > 0 else 0 for d in image.shape[2:4]]
            blank = np.zeros((1, 1, *(d or 64 for d in size)), np.float32)
            classes = probe.run(None, {image.name: blank})[0].shape[1]
        except OSError as exc:
            raise BackendError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self.preprocessing = {"input_size": size}
        self.num_classes = int(classes)
        self.class_names = [str(c) for c in range(self.num_classes)]

    def select_file(self, precision: str, backend: str) -> dict:
        return self.entry

    def path_of(self, entry: dict):
        return self.path

    def read_verified(self, entry: dict) -> bytes:
        return self.data

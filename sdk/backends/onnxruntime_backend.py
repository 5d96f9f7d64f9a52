"""onnxruntime backend: the CPU default everywhere, the CUDA execution provider where
onnxruntime-gpu is installed. An InferenceSession's `run` is thread-safe, so one backend may
serve several threads."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import BackendError, require

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16


class OnnxRuntimeBackend:
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
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {exc}") from exc
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        io = bundle.manifest.get("io") or {}
        self.input_name = io.get("input") if io.get("input") in [i.name for i in inputs] else inputs[0].name
        self.output_name = io.get("output") if io.get("output") in [o.name for o in outputs] else outputs[0].name
        fixed_batch = next(i.shape[0] for i in inputs if i.name == self.input_name)
        self.max_batch = int(batch_size or bundle.max_batch or DEFAULT_MAX_BATCH)
        if isinstance(fixed_batch, int) and fixed_batch > 0:
            self.max_batch = min(self.max_batch, fixed_batch)
            self._fixed_batch = fixed_batch
        else:
            self._fixed_batch = None
        self.last_gpu_ms = None  # onnxruntime exposes no CUDA event timing
        log.info("onnxruntime %s on %s, %s", self.model_path.name, "/".join(self.providers), precision)

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

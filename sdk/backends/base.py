"""The contract every inference backend meets, so the Segmenter can rely on it without probing.

A backend turns a batch of pre-processed slices, (n, 1, H, W) float32, into logits, (n, C, H, W)
float32. The Segmenter reads the attributes below and calls `run` and `close`; nothing else.
Implementations: onnxruntime, TensorRT and TensorRT-RTX here, and the eager backend of the
training package (a checkpoint evaluated through the same Segmenter as an exported bundle).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class Backend(ABC):
    name: str = ""                  # "onnxruntime", "tensorrt", "tensorrt-rtx", ...
    precision: str = "fp32"         # the precision of the model it runs
    model_path: Path | None = None  # the file it runs (ONNX or engine); None for an in-memory model
    max_batch: int = 16             # the most slices one `run` call takes at once
    thread_safe: bool = False       # False: the Segmenter serialises calls with a lock
    last_gpu_ms: float | None = None  # device time of the last `run`, where the backend can measure it
    fused: bool = False             # runs a fused model: raw HU slices in, uint8 labels out (see run)

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, H, W) float32 slices -> (n, C, H, W) float32 logits. A fused backend takes the raw
        HU slices at their native matrix, (n, 1, X, Y) float32, and returns (n, X, Y) uint8 labels:
        window, resizes, network and argmax all happen inside its model."""

    @abstractmethod
    def close(self) -> None:
        """Release the model and any device memory; the backend is not used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class CheckpointModel:
    """A model that is not a bundle (a training checkpoint), opened by the package that can read
    it: its backend and what a Segmenter needs to run it like a bundle."""
    backend: Backend
    preprocessing: dict              # as a manifest's: window, input_size, spacing
    class_names: list
    organ_labels: dict = field(default_factory=dict)   # {organ label: components kept}
    arch: str = ""                   # e.g. "raunet"
    role: str = ""                   # e.g. "teacher"
    size_bytes: int = 0              # size of its weights
    params: int | None = None

    @property
    def description(self) -> str:
        return f"{self.arch} ({self.role or 'checkpoint'})"

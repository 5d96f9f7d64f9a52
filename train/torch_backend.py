"""A PyTorch network behind the SDK's backend contract (`regionkd.sdk.backends.base.Backend`), so that a
checkpoint is evaluated through the very `Segmenter` that runs exported bundles: the same
pre-processing, resize back, argmax and largest-component step, so the Dice reported for a
checkpoint is the Dice of the masks a user would get from it."""
from __future__ import annotations

import numpy as np
import torch

from regionkd.sdk.backends.base import Backend, CheckpointModel


class TorchBackend(Backend):
    """fp32 eager PyTorch; on CUDA, `last_gpu_ms` is the device time of the last batch (CUDA events)."""

    name = "pytorch"
    precision = "fp32"

    def __init__(self, model: torch.nn.Module, device="cpu", max_batch: int = 16, model_path=None):
        self.model, self.device, self.max_batch = model.eval(), torch.device(device), int(max_batch)
        self.model_path = model_path
        self.last_gpu_ms = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self.device.type != "cuda":
                return self.model(x).float().numpy()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model(x).float()
            end.record()
            end.synchronize()
            self.last_gpu_ms = float(start.elapsed_time(end))
            return out.cpu().numpy()

    def close(self) -> None:
        self.model = None


def organ_components_of(task_name: str) -> dict[int, int]:
    """{organ label: connected components post-processing keeps} of a task (two kidneys)."""
    from .data.tasks import get_task

    task = get_task(task_name)
    return {task.organ_label: task.organ_components}


def checkpoint_segmenter(model, ckpt: dict, device="cpu", batch_size: int = 16):
    """The SDK `Segmenter` over a loaded checkpoint's network, post-processed for its task."""
    from regionkd.sdk.segmenter import Segmenter

    return Segmenter.from_backend(TorchBackend(model, device, batch_size), ckpt["preprocessing"],
                                  ckpt["class_names"], organ_labels=organ_components_of(ckpt["task"]),
                                  batch_size=batch_size)


def open_checkpoint(path, threads: int | None = None, batch_size: int | None = None) -> CheckpointModel:
    """The SDK's checkpoint opener for regionkd training checkpoints (registered in setup.cfg under
    the entry-point group `regionkd.checkpoint_openers`): regionkd-bench times a checkpoint beside
    a bundle through this, without the SDK importing the training package."""
    from .checkpoint import load_model

    if threads:
        torch.set_num_threads(int(threads))
    model, ckpt = load_model(path)
    state = model.state_dict()
    return CheckpointModel(
        backend=TorchBackend(model, "cpu", int(batch_size or 16), model_path=path),
        preprocessing=ckpt["preprocessing"], class_names=list(ckpt["class_names"]),
        organ_labels=organ_components_of(ckpt["task"]) if ckpt.get("task") else {},
        arch=str(ckpt.get("arch", "")), role=str(ckpt.get("role", "")),
        size_bytes=int(sum(t.numel() * t.element_size() for t in state.values())),
        params=int(sum(p.numel() for p in model.parameters())))

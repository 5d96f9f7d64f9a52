"""A PyTorch network behind the SDK's backend interface (`run(batch) -> logits`), so that a
checkpoint is evaluated through the very `Segmenter` that runs exported bundles: the same
pre-processing, resize back, argmax and largest-component step, so the Dice reported for a
checkpoint is the Dice of the masks a user would get from it."""
from __future__ import annotations

import numpy as np
import torch


class TorchBackend:
    name = "pytorch"
    precision = "fp32"
    thread_safe = False
    last_gpu_ms = None

    def __init__(self, model: torch.nn.Module, device="cpu", max_batch: int = 16):
        self.model, self.device, self.max_batch = model.eval(), torch.device(device), int(max_batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.model(x).float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def checkpoint_segmenter(model, ckpt: dict, device="cpu", batch_size: int = 16):
    """The SDK `Segmenter` over a loaded checkpoint's network."""
    from regionkd.sdk.segmenter import Segmenter

    return Segmenter.from_backend(TorchBackend(model, device, batch_size), ckpt["preprocessing"],
                                  ckpt["class_names"], batch_size=batch_size)

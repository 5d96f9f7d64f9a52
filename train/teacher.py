"""The teacher of a distillation run: loaded frozen and checked against the run's data, and its
targets for each step, computed live or read from the teacher cache (teacher_cache.py)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_model
from .config import TrainConfig
from .distill_loss import teacher_targets
from .processes import autocast


def load_teacher(cfg: TrainConfig, class_names, window, device) -> tuple[nn.Module, dict]:
    """The teacher checkpoint `cfg.teacher` as a frozen network in eval mode, and its checkpoint;
    CheckpointError when its classes, input size or HU window differ from the run's."""
    path = Path(cfg.teacher)
    teacher, t_ckpt = load_model(path, device=device)
    problems = []
    if list(t_ckpt["class_names"]) != list(class_names):
        problems.append(f"classes {t_ckpt['class_names']} but the data has {class_names}")
    if [int(v) for v in t_ckpt["preprocessing"]["input_size"]] != [cfg.input_size, cfg.input_size]:
        problems.append(f"input size {t_ckpt['preprocessing']['input_size']} but this run uses "
                        f"{[cfg.input_size, cfg.input_size]} (pass --input-size to match)")
    if [float(v) for v in t_ckpt["preprocessing"]["window"]] != [float(v) for v in window]:
        problems.append(f"HU window {t_ckpt['preprocessing']['window']} but the data's task uses {window}")
    if problems:
        raise CheckpointError(f"teacher checkpoint {path} does not fit this run: " + "; ".join(problems))
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher, t_ckpt


class TeacherSide:
    """The teacher's targets for each step: the teacher is shown every drawn slice in the
    orientation the step drew, without the student's intensity jitter (`SliceDataset.view`),
    either live or through the teacher cache, which is filled at the start of each epoch with
    whatever that epoch draws and the cache does not hold yet."""

    def __init__(self, cfg, proc, teacher, num_classes, sources, cache=None):
        self.cfg, self.proc, self.teacher, self.num_classes = cfg, proc, teacher, num_classes
        self.sources, self.cache = sources, cache

    def _views(self, items):
        """(images N x 1 x H x W, labels N x H x W) of (source, index, orientation) items."""
        from .sampling import IGNORE_LABEL

        images, labels = [], []
        for src, idx, o in items:
            image, label = self.sources[src].view(idx, o)
            images.append(image)
            labels.append(label if label is not None else torch.full(image.shape[1:], IGNORE_LABEL, dtype=torch.int64))
        return torch.stack(images).to(self.proc.device), torch.stack(labels).to(self.proc.device)

    def compute(self, items, half: bool):
        images, labels = self._views(items)
        return teacher_targets(self.teacher, images, labels, self.num_classes, half=half,
                               context=lambda: autocast(self.proc, self.cfg))

    def _keys(self, items):
        return [self.cache.item_key(self.sources[src], idx, o) for src, idx, o in items]

    def prepare_epoch(self, epoch: int, batches, orientations) -> dict | None:
        """Fill the cache with this epoch's items that it lacks; returns a log record or None."""
        if self.cache is None:
            return None
        items = [(src, idx, o) for batch, ors in zip(batches, orientations) for (src, idx, _), o in zip(batch, ors)]
        t0 = time.perf_counter()
        n = self.cache.fill(self._keys(items), lambda pos: self.compute([items[i] for i in pos], half=True))
        if not n:
            return None
        return {"event": "teacher_cache", "epoch": epoch, "items_filled": n,
                "seconds": round(time.perf_counter() - t0, 2)}

    def targets(self, items):
        if self.cache is None:
            return self.compute(items, half=False)
        return self.cache.gather(self._keys(items)).to(self.proc.device)

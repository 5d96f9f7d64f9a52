"""Validation Dice of a training run: the learning curve the trainer logs after every epoch.

Dice is the project's one Dice (`metrics.DiceAccumulator`), pooled over the validation slices;
under torchrun every process counts its share of the slices and the counts are summed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .metrics import DiceAccumulator
from .processes import Proc, autocast


def validation_slices(n: int, max_slices: int | None) -> np.ndarray:
    """Indices of the slices validated: all `n`, or `max_slices` of them evenly spread."""
    if max_slices and n > max_slices:
        return np.unique(np.linspace(0, n - 1, max_slices).round().astype(int))
    return np.arange(n)


@torch.no_grad()
def validate(net: nn.Module, val_ds, cfg: TrainConfig, class_names, proc: Proc) -> dict:
    """Dice per foreground class over the validation split's slices (pooled over the slices;
    None when a class is absent from both prediction and reference). `val_max_slices` (None: all)
    takes that many slices evenly spread over the split."""
    idx = validation_slices(len(val_ds), cfg.val_max_slices)[proc.rank::proc.world]
    acc = DiceAccumulator(len(class_names))
    was_training = net.training
    net.eval()
    for start in range(0, len(idx), cfg.batch_size):
        items = [val_ds[int(i)] for i in idx[start:start + cfg.batch_size]]
        x = torch.stack([torch.as_tensor(np.asarray(im)) for im, _ in items]).to(proc.device)
        with autocast(proc, cfg):
            pred = net(x).argmax(1)
        acc.add(pred.cpu().numpy(), np.stack([np.asarray(lb) for _, lb in items]))
    net.train(was_training)
    if proc.world > 1:
        acc = _summed_over_processes(acc, proc)
    return {name: None if d is None else round(d, 6) for name, d in acc.dice(class_names).items()}


def _summed_over_processes(acc: DiceAccumulator, proc: Proc) -> DiceAccumulator:
    counts = torch.as_tensor(np.stack([acc.inter, acc.total]), device=proc.device)
    dist.all_reduce(counts)
    total = DiceAccumulator(acc.num_classes)
    total.add_counts(*counts.cpu().numpy())
    return total

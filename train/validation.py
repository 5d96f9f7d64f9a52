"""Validation Dice of a training run: the learning curve the trainer logs after every epoch."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .processes import Proc, autocast


def validation_slices(n: int, max_slices: int | None) -> np.ndarray:
    """Indices of the slices validated: all `n`, or `max_slices` of them evenly spread."""
    if max_slices and n > max_slices:
        return np.unique(np.linspace(0, n - 1, max_slices).round().astype(int))
    return np.arange(n)


@torch.no_grad()
def validate(net: nn.Module, val_ds, cfg: TrainConfig, class_names, proc: Proc) -> dict:
    """Dice per foreground class over the validation split's slices (global over the slices;
    None when a class is absent from both prediction and reference). `val_max_slices` (None: all)
    takes that many slices evenly spread over the split."""
    idx = validation_slices(len(val_ds), cfg.val_max_slices)[proc.rank::proc.world]
    c = len(class_names)
    counts = torch.zeros(3, c, dtype=torch.float64, device=proc.device)
    was_training = net.training
    net.eval()
    for start in range(0, len(idx), cfg.batch_size):
        items = [val_ds[int(i)] for i in idx[start:start + cfg.batch_size]]
        x = torch.stack([torch.as_tensor(np.asarray(im)) for im, _ in items]).to(proc.device)
        y = torch.stack([torch.as_tensor(np.asarray(lb)) for _, lb in items]).to(proc.device).long()
        with autocast(proc, cfg):
            pred = net(x).argmax(1)
        p1 = F.one_hot(pred, c).flatten(0, 2).double()
        r1 = F.one_hot(y, c).flatten(0, 2).double()
        counts += torch.stack([(p1 * r1).sum(0), p1.sum(0), r1.sum(0)])
    if proc.world > 1:
        dist.all_reduce(counts)
    net.train(was_training)
    counts = counts.cpu().numpy()
    out = {}
    for k in range(1, c):
        inter, ps, rs = counts[:, k]
        out[class_names[k]] = None if ps + rs == 0 else round(float(2 * inter / (ps + rs)), 6)
    return out

"""The training objective  L = L_seg + alpha*PMD + beta1*sum_levels IMD + beta2*sum_levels RAD
(+ pl_weight*PL, the segmentation loss against the teacher's labels), and the teacher's side of it.

The teacher's side of every term is computed once per batch into `TeacherTargets`: its logits,
its importance map per feature level, and its region affinities per level. That is all the
losses need from the teacher, so the same object comes either from a live forward pass of the
frozen teacher or from the teacher cache (`teacher_cache.py`), which stores it for exactly the
batches a student draws.

A batch may end with unlabelled slices (label IGNORE_LABEL everywhere): the segmentation loss
uses only the labelled ones; PMD and IMD use all; RAD needs regions, and on an unlabelled slice
takes them from the teacher's own prediction (its argmax), as the regions the teacher sees.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import losses as L
from .config import FEATURE_LEVELS, TrainConfig
from .sampling import IGNORE_LABEL

LOSS_KEYS = ("seg", "pmd", "imd", "rad", "pl", "total")


@dataclass
class TeacherTargets:
    """What the losses need from the teacher for one batch (N slices, C classes)."""

    logits: torch.Tensor                 # N x C x H x W
    imd: dict                            # level -> N x h x w importance map (L2-normalised per sample)
    rad: dict                            # level -> (N x C x C affinities, N x C region presence)

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.logits.to(device), {k: v.to(device) for k, v in self.imd.items()},
                              {k: (a.to(device), p.to(device)) for k, (a, p) in self.rad.items()})


def region_labels(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Labels that define RAD's regions: the ground truth, or the teacher's argmax where the
    slice is unlabelled."""
    unknown = labels == IGNORE_LABEL
    if not bool(unknown.any()):
        return labels
    return torch.where(unknown, teacher_logits.argmax(1), labels)


def onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


@torch.no_grad()
def teacher_targets(teacher, images: torch.Tensor, labels: torch.Tensor, num_classes: int, half: bool = False,
                    context=contextlib.nullcontext) -> TeacherTargets:
    """Run the frozen teacher on a batch and reduce its outputs to TeacherTargets. `half`: round
    logits and importance maps through float16, as the teacher cache stores them (so that a run
    that fills the cache and one that reads it train on identical numbers)."""
    with context():
        logits, feats = teacher.forward_features(images)
    logits = logits.float()
    if half:
        logits = logits.half().float()
    regions = onehot(region_labels(labels, logits), num_classes)
    imd, rad = {}, {}
    for level in FEATURE_LEVELS:
        f = feats[level].float()
        m = L.importance_map(f).view(f.shape[0], *f.shape[-2:])
        imd[level] = m.half().float() if half else m
        rad[level] = L.region_affinity(f, regions)
    return TeacherTargets(logits, imd, rad)


class DistillLoss:
    """L_seg + alpha*PMD + beta1*IMD + beta2*RAD, every term reported separately (None if unused)."""

    def __init__(self, cfg: TrainConfig, num_classes: int, distill: bool):
        self.cfg, self.num_classes = cfg, num_classes
        self.kd = set(cfg.kd) if distill else set()

    def __call__(self, s_logits, s_feats, labels, teacher: TeacherTargets | None = None, kd_rows=None) -> dict:
        """`kd_rows` (bool per slice; default all): the slices the distillation terms apply to,
        `teacher` holding one row per such slice."""
        cfg = self.cfg
        labelled = labels[:, 0, 0] != IGNORE_LABEL
        seg = L.segmentation_loss(s_logits[labelled].float(), labels[labelled]) if bool(labelled.any()) else None
        terms = {"seg": seg, "pmd": None, "imd": None, "rad": None, "pl": None}
        total = seg if seg is not None else s_logits.sum() * 0.0
        if self.kd:
            if kd_rows is not None:
                s_logits, labels = s_logits[kd_rows], labels[kd_rows]
                s_feats = {lv: f[kd_rows] for lv, f in s_feats.items()}
            if "pmd" in self.kd:
                terms["pmd"] = L.pmd_loss(s_logits.float(), teacher.logits, temperature=cfg.temperature,
                                          balance=cfg.pmd_balance)
                total = total + cfg.alpha * terms["pmd"]
            if "imd" in self.kd:
                terms["imd"] = sum(L.imd_loss_to_map(s_feats[lv].float(), teacher.imd[lv]) for lv in cfg.kd_levels)
                total = total + cfg.beta1 * terms["imd"]
            if "rad" in self.kd:
                regions = onehot(region_labels(labels, teacher.logits), self.num_classes)
                terms["rad"] = sum(L.rad_loss_to_affinity(s_feats[lv].float(), regions, *teacher.rad[lv])
                                   for lv in cfg.kd_levels)
                total = total + cfg.beta2 * terms["rad"]
            if "pl" in self.kd:
                terms["pl"] = L.pseudo_label_loss(s_logits.float(), teacher.logits)
                total = total + getattr(cfg, "pl_weight", 1.0) * terms["pl"]
        terms["total"] = total
        return terms


def reduce_terms(terms: dict, proc) -> dict:
    """Loss terms as floats, averaged over processes."""
    vals = torch.tensor([float(terms[k].detach()) if terms[k] is not None else float("nan") for k in LOSS_KEYS],
                        dtype=torch.float64, device=proc.device if proc.device.type == "cuda" else "cpu")
    if proc.world > 1:
        dist.all_reduce(vals)
        vals /= proc.world
    return {k: (None if np.isnan(v) else round(float(v), 6)) for k, v in zip(LOSS_KEYS, vals.tolist())}

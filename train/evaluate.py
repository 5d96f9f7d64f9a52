"""Evaluate a checkpoint on CT volumes the way the runtime will use it.

Each volume is segmented by the SDK's own `Segmenter` with the network behind a PyTorch backend
(`torch_backend.py`): the same pre-processing, resize back, argmax and largest-component step as
an exported bundle, the mask in the file's own voxel order. It is compared with the label volume
in that same order and spacing by `regionkd.train.metrics.case_metrics` (Dice, VOE, RVD, ASSD,
HD95 in mm).
LiTS convention: a case whose reference is empty for a class is left out of that class's mean
(and listed under `excluded`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from regionkd.sdk.errors import InputError
from regionkd.sdk.orientation import CanonicalVolume

from .checkpoint import CheckpointError, load_model

METRICS = ("dice", "voe", "rvd", "assd", "hd95")


def segment_case(segmenter, volume: CanonicalVolume) -> np.ndarray:
    """The mask (uint8, the file's own voxel order) the segmenter gives for a case's image."""
    import nibabel as nib

    image = nib.Nifti1Image(volume.to_original(volume.data), volume.original_affine)
    return np.asarray(segmenter.segment(image).mask.dataobj)


def evaluate_checkpoint(ckpt_path, data_root, case_ids=None, device: str = "cpu", batch_size: int = 8,
                        progress: bool = False, metrics=METRICS) -> dict:
    """Per-case and mean per-class metrics of a checkpoint on `data_root`'s validation cases
    (the split the checkpoint was trained with), or on `case_ids`. Leaving assd and hd95 out of
    `metrics` skips the surface distances (reported as None)."""
    from tqdm import tqdm

    from .data import open_dataset
    from .data.slices import split_cases
    from .metrics import case_metrics

    data_root = Path(data_root)
    if not data_root.is_dir():
        raise InputError(f"--data {data_root}: not a directory")
    model, ckpt = load_model(ckpt_path, device=device)
    ds = open_dataset(data_root)
    if ds.task != ckpt["task"]:
        raise CheckpointError(f"checkpoint {ckpt_path} segments task {ckpt['task']!r} but {data_root} holds {ds.task!r}")
    cfg = ckpt.get("config", {})
    if case_ids is None:
        _, case_ids = split_cases(list(ds.case_ids), val_fraction=cfg.get("val_fraction", 0.2),
                                  seed=cfg.get("split_seed", 0))
        split = "validation"
    else:
        unknown = sorted(set(case_ids) - set(ds.case_ids))
        if unknown:
            raise InputError(f"--data {data_root}: no case(s) {unknown}")
        split = "given"
    case_ids = list(case_ids)
    if not case_ids:
        raise InputError(f"--data {data_root}: no cases to evaluate")

    from .torch_backend import checkpoint_segmenter

    class_names = list(ckpt["class_names"])
    labels = list(range(1, len(class_names)))
    segmenter = checkpoint_segmenter(model, ckpt, device, batch_size)
    t0 = time.perf_counter()
    cases: dict = {}
    for cid in tqdm(case_ids, desc="evaluate", unit="case", disable=not progress):
        case = ds.load_case(cid)
        canonical = case.volume
        pred = segment_case(segmenter, canonical)
        ref = canonical.to_original(np.asarray(case.label))
        spacing = canonical.original_spacing
        per_label = case_metrics(pred, ref, spacing, labels, surface=bool({"assd", "hd95"} & set(metrics)))
        cases[cid] = {}
        for lab in labels:
            row = {m: _as_float(per_label[lab][m]) for m in METRICS}
            row["ref_voxels"] = int((ref == lab).sum())
            row["pred_voxels"] = int((pred == lab).sum())
            cases[cid][class_names[lab]] = row

    mean, excluded, notes = {}, {}, []
    for lab in labels:
        name = class_names[lab]
        kept = [cid for cid in case_ids if cases[cid][name]["ref_voxels"] > 0]
        excluded[name] = [cid for cid in case_ids if cid not in kept]
        if excluded[name]:
            notes.append(f"{name}: {', '.join(excluded[name])} left out of the mean (reference empty for {name})")
        row = {}
        for m in METRICS:
            if m not in metrics:
                row[m] = None
                continue
            vals = [cases[cid][name][m] for cid in kept]
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            row[m] = float(np.mean(finite)) if finite else None
            if len(finite) < len(vals):
                notes.append(f"{name}: {m} undefined for {len(vals) - len(finite)} case(s) (e.g. empty prediction), "
                             f"mean over the rest")
        row["n_cases"] = len(kept)
        mean[name] = row
    return {"checkpoint": str(ckpt_path), "arch": ckpt["arch"], "task": ckpt["task"], "data": str(data_root),
            "split": split, "case_ids": case_ids, "class_names": class_names, "cases": cases, "mean": mean,
            "excluded": excluded, "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}


def _as_float(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def format_table(result: dict) -> str:
    """Per-case rows and the per-class mean, as plain text."""
    head = f"{'case':<16}{'class':<12}" + "".join(f"{m:>9}" for m in METRICS)
    lines = [f"{result['arch']} on {result['data']} ({result['split']} cases: {len(result['case_ids'])})", head]

    def fmt(v):
        return f"{v:>9.4f}" if v is not None else f"{'-':>9}"

    for cid, per_class in result["cases"].items():
        for name, row in per_class.items():
            lines.append(f"{cid:<16}{name:<12}" + "".join(fmt(row[m]) for m in METRICS))
    lines.append("-" * len(head))
    for name, row in result["mean"].items():
        lines.append(f"{'mean (n=' + str(row['n_cases']) + ')':<16}{name:<12}" + "".join(fmt(row[m]) for m in METRICS))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)

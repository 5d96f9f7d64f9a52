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
from .metrics import METRIC_NAMES


def segment_case(segmenter, volume: CanonicalVolume) -> np.ndarray:
    """The mask (uint8, the file's own voxel order) the segmenter gives for a case's image."""
    import nibabel as nib

    image = nib.Nifti1Image(volume.to_original(volume.data), volume.original_affine)
    return np.asarray(segmenter.segment(image).mask.dataobj)


def evaluation_cases(ckpt: dict, ds, case_ids=None) -> tuple[list[str], str]:
    """(case ids, "validation" or "given"): `case_ids`, or the validation split the checkpoint was
    trained with."""
    from .data.slices import split_cases

    if case_ids is None:
        cfg = ckpt.get("config", {})
        _, case_ids = split_cases(list(ds.case_ids), val_fraction=cfg.get("val_fraction", 0.2),
                                  seed=cfg.get("split_seed", 0))
        split = "validation"
    else:
        unknown = sorted(set(case_ids) - set(ds.case_ids))
        if unknown:
            raise InputError(f"--data {ds.root}: no case(s) {unknown}")
        split = "given"
    case_ids = list(case_ids)
    if not case_ids:
        raise InputError(f"--data {ds.root}: no cases to evaluate")
    return case_ids, split


def count_cases(ckpt_path, data_root, case_ids=None) -> int:
    """How many cases `evaluate_checkpoint` will score (a command's progress bar total)."""
    from .checkpoint import load_checkpoint

    _check_data_dir(data_root)
    ckpt = load_checkpoint(ckpt_path)
    return len(evaluation_cases(ckpt, _dataset_for(ckpt, ckpt_path, data_root), case_ids)[0])


def _check_data_dir(data_root) -> None:
    if not Path(data_root).is_dir():
        raise InputError(f"--data {data_root}: not a directory")


def _dataset_for(ckpt: dict, ckpt_path, data_root):
    """The dataset at `data_root`; CheckpointError unless it holds the checkpoint's task."""
    from .data import open_dataset

    ds = open_dataset(data_root)
    if ds.task != ckpt["task"]:
        raise CheckpointError(f"checkpoint {ckpt_path} segments task {ckpt['task']!r} but {data_root} holds {ds.task!r}")
    return ds


def evaluate_checkpoint(ckpt_path, data_root, case_ids=None, device: str = "cpu", batch_size: int = 8,
                        progress=None, metrics=METRIC_NAMES) -> dict:
    """Per-case and mean per-class metrics of a checkpoint on `data_root`'s validation cases
    (the split the checkpoint was trained with), or on `case_ids`. Leaving assd and hd95 out of
    `metrics` skips the surface distances (reported as None). `progress(1)` after each case."""
    from .torch_backend import checkpoint_segmenter

    data_root = Path(data_root)
    _check_data_dir(data_root)
    model, ckpt = load_model(ckpt_path, device=device)
    ds = _dataset_for(ckpt, ckpt_path, data_root)
    case_ids, split = evaluation_cases(ckpt, ds, case_ids)
    class_names = list(ckpt["class_names"])
    segmenter = checkpoint_segmenter(model, ckpt, device, batch_size)
    t0 = time.perf_counter()
    cases = {}
    for cid in case_ids:
        cases[cid] = score_case(segmenter, ds.load_case(cid), class_names, metrics)
        if progress is not None:
            progress(1)
    mean, excluded, notes = class_means(cases, case_ids, class_names, metrics)
    return {"checkpoint": str(ckpt_path), "arch": ckpt["arch"], "task": ckpt["task"], "data": str(data_root),
            "split": split, "case_ids": case_ids, "class_names": class_names, "cases": cases, "mean": mean,
            "excluded": excluded, "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}


def score_case(segmenter, case, class_names, metrics=METRIC_NAMES) -> dict:
    """{class name: {metric: value, "ref_voxels", "pred_voxels"}} of one case's segmentation,
    compared with its label in the file's own voxel order and spacing."""
    from .metrics import case_metrics

    labels = list(range(1, len(class_names)))
    canonical = case.volume
    pred = segment_case(segmenter, canonical)
    ref = canonical.to_original(np.asarray(case.label))
    surface = bool({"assd", "hd95"} & set(metrics))
    per_label = case_metrics(pred, ref, canonical.original_spacing, labels, surface=surface)
    rows = {}
    for lab in labels:
        row = {m: _as_float(per_label[lab][m]) for m in METRIC_NAMES}
        row["ref_voxels"] = int((ref == lab).sum())
        row["pred_voxels"] = int((pred == lab).sum())
        rows[class_names[lab]] = row
    return rows


def class_means(cases: dict, case_ids, class_names, metrics=METRIC_NAMES) -> tuple[dict, dict, list]:
    """(mean per class and metric, the cases left out of each class's mean, notes). LiTS
    convention: a case whose reference lacks the class is left out of that class's mean."""
    mean, excluded, notes = {}, {}, []
    for name in class_names[1:]:
        kept = [cid for cid in case_ids if cases[cid][name]["ref_voxels"] > 0]
        excluded[name] = [cid for cid in case_ids if cid not in kept]
        if excluded[name]:
            notes.append(f"{name}: {', '.join(excluded[name])} left out of the mean (reference empty for {name})")
        row = {}
        for m in METRIC_NAMES:
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
    return mean, excluded, notes


def _as_float(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def format_table(result: dict) -> str:
    """Per-case rows and the per-class mean, as plain text."""
    head = f"{'case':<16}{'class':<12}" + "".join(f"{m:>9}" for m in METRIC_NAMES)
    lines = [f"{result['arch']} on {result['data']} ({result['split']} cases: {len(result['case_ids'])})", head]

    def fmt(v):
        return f"{v:>9.4f}" if v is not None else f"{'-':>9}"

    for cid, per_class in result["cases"].items():
        for name, row in per_class.items():
            lines.append(f"{cid:<16}{name:<12}" + "".join(fmt(row[m]) for m in METRIC_NAMES))
    lines.append("-" * len(head))
    for name, row in result["mean"].items():
        lines.append(f"{'mean (n=' + str(row['n_cases']) + ')':<16}{name:<12}" + "".join(fmt(row[m]) for m in METRIC_NAMES))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)

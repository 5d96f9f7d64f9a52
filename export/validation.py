"""Per-class Dice of ONNX models on validation volumes, computed the way the SDK segments: every
axial slice of the canonical volume preprocessed with `regionkd.sdk.preprocess`, run through
onnxruntime, logits resized back to the slice size and argmaxed (`logits_to_labels`), then
compared with the canonical label volume. Dice is global per class (intersections and sizes
summed over all volumes), so a lesion absent from one volume does not count as 0 or 1 there.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from regionkd.sdk.preprocess import logits_to_labels, preprocess_slices, volume_to_slices

from regionkd.train.metrics import DiceAccumulator

from .onnx_export import run_onnx


def evaluate_dice(sessions: dict, cases: Iterable, window, input_size, class_names,
                  batch_size: int = 8, progress=None) -> dict:
    """{model_key: {class_name: Dice}} for every onnxruntime session in `sessions`, on `cases`
    (objects with canonical `volume.data` in HU and `label`). Each volume is preprocessed once."""
    acc = {key: DiceAccumulator(len(class_names)) for key in sessions}
    n_cases = 0
    for case in cases:
        hu = volume_to_slices(np.asarray(case.volume.data, dtype=np.float32))
        gt = volume_to_slices(np.asarray(case.label))
        if hu.shape != gt.shape:
            raise ValueError(f"case {getattr(case, 'case_id', '?')}: image {hu.shape} and label {gt.shape} differ")
        images = preprocess_slices(hu, window, input_size)
        for key, session in sessions.items():
            pred = logits_to_labels(run_onnx(session, images, batch_size), hu.shape[1:])
            acc[key].add(pred, gt)
        n_cases += 1
        if progress is not None:
            progress(1)
    if n_cases == 0:
        raise ValueError("no validation cases")
    return {key: a.dice(class_names) for key, a in acc.items()}

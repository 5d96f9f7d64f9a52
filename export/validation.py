"""Per-class Dice of the exported ONNX models on validation volumes, measured on the masks users
get: each volume goes through the runtime's own `regionkd.sdk.segmenter.Segmenter` over an
onnxruntime backend of each file (orientation, slicing, preprocessing, inference, resize back,
argmax and the largest-component step of the bundle's preprocessing), segmenting the case's image
in its file's own voxel order (`regionkd.train.evaluate.segment_case`, as the checkpoint
evaluation does), and is compared with the label in that same order. Dice is global per class
(`regionkd.train.metrics.DiceAccumulator`: intersections and sizes summed over all volumes), so a
lesion absent from one volume does not count as 0 or 1 there.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from regionkd.train.metrics import DiceAccumulator

#: what the manifest's validation section says the Dice is
VALIDATION_METHOD = ("global per class over all validation volumes, on the masks of the SDK's Segmenter "
                     "(onnxruntime backend, the fused model where one ships, largest components kept), in each "
                     "file's own voxel order")


def onnx_segmenter(path, precision: str, preprocessing: dict, class_names, threads=None, batch_size=None,
                   graph: str = "network"):
    """The runtime's Segmenter over an onnxruntime backend of the ONNX file `path`, post-processed as
    `preprocessing` (the bundle's) says. Implausible volumes are segmented, not refused: the
    plausibility checks guard a scanner's input, and must not stop a model being measured on the
    exporter's own labelled data."""
    from regionkd.sdk.backends.onnxruntime_backend import OnnxRuntimeBackend
    from regionkd.sdk.segmenter import Segmenter, organ_labels_of

    backend = OnnxRuntimeBackend.from_model_file(path, precision, len(class_names), preprocessing["input_size"],
                                                 threads=threads, batch_size=batch_size, graph=graph)
    return Segmenter.from_backend(backend, preprocessing, class_names,
                                  organ_labels=organ_labels_of(preprocessing, class_names),
                                  batch_size=batch_size, allow_implausible=True)


def evaluate_dice(models: dict, cases: Iterable, preprocessing: dict, class_names, threads=None,
                  batch_size=None) -> dict:
    """{model_key: {class_name: Dice}} for every ONNX file in `models` ({key: (path, precision, graph)}), on
    `cases` (objects with a canonical `volume` and its `label`). Each case is read once and
    segmented once per model."""
    from regionkd.train.evaluate import segment_case

    segmenters = {key: onnx_segmenter(path, precision, preprocessing, class_names, threads, batch_size, graph=graph)
                  for key, (path, precision, graph) in models.items()}
    acc = {key: DiceAccumulator(len(class_names)) for key in segmenters}
    n_cases = 0
    try:
        for case in cases:
            reference = case.volume.to_original(np.asarray(case.label))
            for key, segmenter in segmenters.items():
                acc[key].add(segment_case(segmenter, case.volume), reference)
            n_cases += 1
    finally:
        for segmenter in segmenters.values():
            segmenter.backend.close()
    if n_cases == 0:
        raise ValueError("no validation cases")
    return {key: a.dice(class_names) for key, a in acc.items()}

"""regionkd.sdk: the runtime that scanner software embeds.

Imports stay light (numpy, nibabel, onnxruntime on use): no deep-learning framework and nothing
of the training or export packages is ever imported here, and TensorRT/pycuda only inside the
TensorRT backend.
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("regionkd")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from .errors import (BackendError, BundleError, InputError, MissingDependencyError, OutputError, PacsError,
                     RegionKDError)

__all__ = [
    "Segmenter", "SegmentationResult", "load_bundle", "Bundle", "read_dicom_series", "load_dicom_series",
    "compute_statistics",
    "RegionKDError", "InputError", "BundleError", "BackendError", "OutputError", "MissingDependencyError", "PacsError",
    "__version__",
]


def __getattr__(name):  # lazy: the segmenter pulls in onnxruntime only when asked for
    if name in ("Segmenter", "SegmentationResult"):
        from . import segmenter
        return getattr(segmenter, name)
    if name in ("load_bundle", "Bundle"):
        from . import bundle
        return getattr(bundle, name)
    if name in ("read_dicom_series", "load_dicom_series"):   # pydicom only when called
        from . import dicom_io
        return getattr(dicom_io, name)
    if name == "compute_statistics":
        from . import statistics
        return statistics.compute_statistics
    raise AttributeError(f"module 'regionkd.sdk' has no attribute {name!r}")

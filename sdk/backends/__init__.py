"""Inference backends behind one small interface.

A backend has `name`, `precision`, `model_path`, `max_batch`, `thread_safe`, `last_gpu_ms`,
`run(batch)` ((n, 1, H, W) float32 -> (n, C, H, W) float32 logits) and `close()`.
`create_backend("auto", ...)` prefers TensorRT, then TensorRT-RTX, then onnxruntime, and logs
which one it chose and why (each GPU backend's `tensorrt_available` gives the reason it cannot run).

Training checkpoints are read by the package that wrote them, never here: a package registers an
opener under the entry-point group CHECKPOINT_OPENERS (the training package registers one for its
checkpoints), and `open_checkpoint` uses the first that accepts the file.
"""
from __future__ import annotations

import logging

from .. import bundle_files
from ..bundle import Bundle, load_bundle
from ..bundle_files import PRECISIONS
from ..errors import BackendError, InputError, MissingDependencyError, RegionKDError

BACKENDS = ("auto", *bundle_files.BACKENDS)
CHECKPOINT_OPENERS = "regionkd.checkpoint_openers"

log = logging.getLogger(__name__)


def _tensorrt_module():
    """The TensorRT backend module, imported only when a TensorRT backend is asked for."""
    try:
        from . import tensorrt_backend
    except ImportError as exc:  # the module itself, not TensorRT (that one is imported inside it)
        raise BackendError(f"the TensorRT backend is not available in this build of regionkd ({exc})") from exc
    return tensorrt_backend


def _tensorrt_available(rtx: bool) -> tuple[bool, str]:
    try:
        return _tensorrt_module().tensorrt_available(rtx=rtx)
    except RegionKDError as exc:
        return False, str(exc)


def _graph(bundle: Bundle, precision: str, backend: str, fused: bool | None) -> str:
    """"fused" when asked for (True) or available (None) for this precision and backend."""
    if fused is False:
        return "network"
    if bundle.has_file(precision, backend, graph="fused"):
        return "fused"
    if fused:
        raise BackendError(f"bundle {bundle.root} has no fused {precision} model for {backend}")
    return "network"


def _create_named(name: str, bundle: Bundle, precision: str, threads, batch_size, device: int = 0,
                  fused: bool | None = None):
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(bundle, precision, threads=threads, batch_size=batch_size,
                                  graph=_graph(bundle, precision, name, fused))
    if fused:
        raise BackendError(f"backend {name} runs the network models; the fused ones run on onnxruntime")
    rtx = name == "tensorrt-rtx"
    ok, reason = _tensorrt_available(rtx)
    if not ok:
        raise BackendError(f"backend {name} cannot run here: {reason}")
    return _tensorrt_module().create_tensorrt_backend(bundle, precision, rtx=rtx, batch_size=batch_size, device=device)


def create_backend(name: str, bundle, precision: str, threads: int | None = None, batch_size: int | None = None,
                   device: int = 0, fused: bool | None = None):
    """Create the backend `name` (one of BACKENDS) for `precision` of `bundle` (a Bundle or a bundle path);
    `device`: the CUDA device (GPU index) of the TensorRT backends; `fused`: see Segmenter."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if batch_size is not None and int(batch_size) < 1:
        raise BackendError(f"batch size must be at least 1, got {batch_size}")
    if threads is not None and int(threads) < 1:
        raise BackendError(f"threads must be at least 1, got {threads}")
    if int(device) < 0:
        raise BackendError(f"device must be a GPU index >= 0, got {device}")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if name != "auto":
        return _create_named(name, bundle, precision, threads, batch_size, device, fused)
    for candidate in ("tensorrt", "tensorrt-rtx"):
        ok, reason = _tensorrt_available(candidate == "tensorrt-rtx")
        if not ok:
            log.info("auto backend: not %s (%s)", candidate, reason)
            continue
        try:
            backend = _create_named(candidate, bundle, precision, threads, batch_size, device)
        except RegionKDError as exc:
            log.warning("auto backend: %s is installed but cannot run %s of this bundle (%s)", candidate, precision, exc)
            continue
        log.info("auto backend: chose %s (%s)", candidate, reason or "available")
        return backend
    log.info("auto backend: chose onnxruntime (no usable TensorRT or TensorRT-RTX)")
    return _create_named("onnxruntime", bundle, precision, threads, batch_size, fused=fused)


__all__ = ["BACKENDS", "create_backend"]


def open_checkpoint(path, threads: int | None = None, batch_size: int | None = None):
    """A `base.CheckpointModel` for a training checkpoint file, from the openers installed packages
    register (see the module doc); an opener returns None for a file it does not read."""
    from importlib.metadata import entry_points
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    openers = sorted(entry_points(group=CHECKPOINT_OPENERS), key=lambda ep: ep.name)
    if not openers:
        raise MissingDependencyError(f"checkpoint {path}: no installed package reads training checkpoints; "
                                     "install the training extra (pip install 'regionkd[train]')")
    for ep in openers:
        model = ep.load()(path, threads=threads, batch_size=batch_size)
        if model is not None:
            return model
    raise InputError(f"checkpoint {path}: none of the installed readers ({', '.join(ep.name for ep in openers)}) "
                     "recognises this file")

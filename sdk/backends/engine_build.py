"""Build TensorRT and TensorRT-RTX engines from the bundle's ONNX files.

One code path for both modules (`tensorrt`, `tensorrt_rtx_bindings`): a strongly typed network
(precision comes from the ONNX graph: an FP16 graph, or symmetric int8 Q/DQ), which is the only
path that works on TensorRT 10.3, 10.13 and 11.x alike (no FP16/INT8 builder flags, no
calibrators, no EXPLICIT_BATCH - gone in 11), an optimisation profile for batch 1..max_batch,
a workspace limit and `build_serialized_network`.

The two differ in one place, `_attach_timing_cache`: TensorRT measures tactics on the GPU and
a timing cache (saved beside the engines) makes the next build fast; TensorRT-RTX builds ahead
of time on any CPU, its timing-cache calls are no-ops (deprecated since RTX 1.2) and asking for
one makes it look for a GPU, so it gets none. TensorRT needs a GPU to build (the engine is for
that GPU); TensorRT-RTX does not (its engine is portable across Ampere+ GPUs).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from regionkd.sdk.atomic import atomic_write_bytes
from regionkd.sdk.bundle_files import engine_kind
from regionkd.sdk.backends.tensorrt_backend import ENGINE_FORMATS, gpu_compute_capability, import_trt, short_version
from regionkd.sdk.errors import BackendError, InputError, MissingDependencyError, RegionKDError

log = logging.getLogger(__name__)

BUILD_BACKENDS = tuple(ENGINE_FORMATS)   # the runtimes with an engine row in regionkd.sdk.bundle_files


class EngineBuildError(BackendError):
    """TensorRT's parser or builder refused an ONNX model; the message names the file, op and node."""


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    backend: str
    trt_version: str
    compute_capability: str | None
    precision: str | None
    build_seconds: float
    max_batch: int = 16
    source: str = ""
    sha256: str = ""          # of the plan as built (in memory), to check the file written against

    def manifest_fields(self) -> dict:
        """The fields of this engine's manifest entry (Bundle.register_file adds path, bytes, sha256)."""
        return {"format": ENGINE_FORMATS[self.backend], "precision": self.precision, "backends": [self.backend],
                "trt_version": self.trt_version, "compute_capability": self.compute_capability,
                "max_batch": self.max_batch, "source": self.source}


def engine_filename(backend: str, trt_version: str, precision: str, compute_capability: str | None = None) -> str:
    """`trt<version>-sm<major><minor>-<precision>.engine` or `rtx<version>-<precision>.engine`
    (the engine rows of `regionkd.sdk.bundle_files`)."""
    if backend not in BUILD_BACKENDS:
        raise BackendError(f"unknown engine backend {backend!r}; choose one of {', '.join(BUILD_BACKENDS)}")
    if backend == "tensorrt" and not compute_capability:
        raise BackendError("a TensorRT engine name needs the GPU compute capability (e.g. '8.7')")
    sm = str(compute_capability or "").replace(".", "")
    return engine_kind(backend).name.format(version=short_version(trt_version), sm=sm, precision=precision)


def timing_cache_filename(trt_version: str, compute_capability: str) -> str:
    return f"trt{short_version(trt_version)}-sm{str(compute_capability).replace('.', '')}.timing-cache"


def available_builders() -> dict[str, tuple[bool, str]]:
    """{backend: (can build here, why not / what)}: TensorRT needs its module and a GPU, TensorRT-RTX its module."""
    result = {}
    for backend in BUILD_BACKENDS:
        try:
            trt = import_trt(backend)
        except MissingDependencyError as exc:
            result[backend] = (False, str(exc))
            continue
        version = short_version(trt.__version__)
        if backend == "tensorrt":
            cc, reason = gpu_compute_capability()
            result[backend] = (False, f"TensorRT {version} is installed but there is {reason}") if cc is None \
                else (True, f"TensorRT {version} for sm {cc}")
        else:
            result[backend] = (True, f"TensorRT-RTX {version} (ahead-of-time build, no GPU needed)")
    return result


def _make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps error messages for the exception text."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("%s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s", msg)
            else:
                log.debug("%s", msg)

    return CollectingLogger()


def _parse_onnx(parser, onnx_path: Path, onnx_bytes: bytes | None = None) -> None:
    """parse_from_file (or parse of `onnx_bytes`, already verified against a manifest), with every
    parser error turned into one message naming op and node."""
    ok = parser.parse(onnx_bytes, str(onnx_path)) if onnx_bytes is not None else parser.parse_from_file(str(onnx_path))
    if ok:
        return
    problems = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        problems.append(f"node {error.node()} '{error.node_name()}' (op {error.node_operator()}): {error.desc()}")
    detail = "; ".join(problems) or "no detail from the parser"
    raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser refused the model: {detail}")


#: the native slice matrices an engine of a fused model accepts (min, opt, max): CT matrices
#: are 512x512 mostly, 256..1024 in practice
FUSED_MATRIX = ((32, 32), (512, 512), (1024, 1024))


def _network_input(network, onnx_path: Path) -> tuple[str, tuple[int, ...]]:
    """The single input's name and its (C, H, W), checking the batch axis is dynamic. A fused model
    ((-1, 1, -1, -1): raw HU slices at their native matrix) gives H, W = -1."""
    if network.num_inputs != 1:
        raise EngineBuildError(f"{onnx_path}: expected one input, the model has {network.num_inputs}")
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    fused = len(shape) == 4 and shape[0] == -1 and shape[1] == 1 and shape[2] == shape[3] == -1
    if not fused and (len(shape) != 4 or shape[0] != -1 or min(shape[1:]) < 1):
        raise EngineBuildError(f"{onnx_path}: input '{tensor.name}' has shape {shape}; the engine needs "
                               "(-1, C, H, W): a dynamic batch axis and a fixed C, H, W (export with dynamic batch)")
    return tensor.name, shape[1:]


def _input_profile(chw, max_batch: int) -> tuple:
    """(min, opt, max) input shapes: batch 1..max_batch (opt = max: the SDK sends a volume's slices in
    full batches, only the last is smaller); a fused model's matrix over FUSED_MATRIX."""
    b = int(max_batch)
    if chw[1] == -1:
        low, opt, high = FUSED_MATRIX
        return (1, chw[0], *low), (b, chw[0], *opt), (b, chw[0], *high)
    return (1, *chw), (b, *chw), (b, *chw)


def _graph_precision(trt, network) -> str:
    """int8 when the graph holds Q/DQ layers, fp16 when any tensor is half, else fp32 (strongly typed)."""
    half = False
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE):
            return "int8"
        # by enum name: `DataType` itself is missing from the 10.3 vocabulary (only its members are listed)
        half = half or any(layer.get_output(j).dtype.name == "HALF" for j in range(layer.num_outputs))
    return "fp16" if half else "fp32"


def _attach_timing_cache(trt, backend: str, config, cache_path: Path | None):
    """The one TensorRT / TensorRT-RTX difference: only TensorRT gets a timing cache (see module doc)."""
    if backend == "tensorrt-rtx" or cache_path is None:
        return None
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("%s does not match this GPU/TensorRT; starting a new timing cache", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(cache, cache_path: Path) -> None:
    atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))


def build_engine(onnx_path, engine_path, *, backend: str = "tensorrt", max_batch: int = 16,
                 workspace_mb: int = 1024, timing_cache=None, precision: str | None = None,
                 onnx_bytes: bytes | None = None) -> EngineInfo:
    """Build a strongly typed engine from `onnx_path` and write it atomically.

    `onnx_bytes`: the model's bytes when the caller has read and verified them (the SDK building from
    a bundle): those bytes are parsed, not the file, which could have changed since.
    `engine_path`: a file ending in `.engine`, or a directory where the file gets `engine_filename(...)`.
    `timing_cache`: TensorRT only; default `<engine dir>/trt<version>-sm<cc>.timing-cache`, reused.
    `precision`: recorded in the name and manifest; by default read from the graph (Q/DQ, half tensors).
    Raises regionkd errors only: the bindings' own exceptions become EngineBuildError naming the file.
    """
    try:
        return _build_engine(onnx_path, engine_path, backend, max_batch, workspace_mb, timing_cache, precision,
                             onnx_bytes)
    except (RegionKDError, OSError):
        raise
    except Exception as exc:  # TypeError/RuntimeError/ValueError from the bindings
        raise EngineBuildError(f"{onnx_path}: {backend} engine build failed: {exc}") from exc


def _build_engine(onnx_path, engine_path, backend, max_batch, workspace_mb, timing_cache, precision,
                  onnx_bytes=None) -> EngineInfo:
    onnx_path = Path(onnx_path)
    if onnx_bytes is None and not onnx_path.is_file():
        raise InputError(f"{onnx_path}: ONNX file not found")
    if backend not in BUILD_BACKENDS:
        raise BackendError(f"unknown engine backend {backend!r}; choose one of {', '.join(BUILD_BACKENDS)}")
    if int(max_batch) < 1 or int(workspace_mb) < 1:
        raise BackendError(f"max_batch and workspace_mb must be positive, got {max_batch} and {workspace_mb}")
    trt = import_trt(backend)
    version = short_version(trt.__version__)
    compute_capability = None
    if backend == "tensorrt":
        compute_capability, reason = gpu_compute_capability()
        if compute_capability is None:
            raise BackendError(f"cannot build a TensorRT engine from {onnx_path}: {reason}. TensorRT builds for the "
                               "GPU it runs on; backend='tensorrt-rtx' builds portable engines without a GPU")

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    _parse_onnx(parser, onnx_path, onnx_bytes)
    input_name, chw = _network_input(network, onnx_path)
    precision = precision or _graph_precision(trt, network)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    shape_min, shape_opt, shape_max = _input_profile(chw, max_batch)
    profile.set_shape(input_name, shape_min, shape_opt, shape_max)
    config.add_optimization_profile(profile)

    engine_path = Path(engine_path)
    if engine_path.suffix != ".engine":
        engine_path = engine_path / engine_filename(backend, version, precision, compute_capability)
    if backend == "tensorrt" and timing_cache is None:
        timing_cache = engine_path.parent / timing_cache_filename(version, compute_capability)
    elif backend == "tensorrt-rtx" and timing_cache is not None:
        log.info("TensorRT-RTX has no timing cache; ignoring %s", timing_cache)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    timing = _attach_timing_cache(trt, backend, config, cache_path)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        detail = "; ".join(logger.errors) or "no detail from the builder"
        raise EngineBuildError(f"{onnx_path}: {backend} {version} could not build an engine: {detail}")
    plan_bytes = bytes(memoryview(plan))
    atomic_write_bytes(engine_path, plan_bytes)
    if timing is not None:
        _save_timing_cache(timing, cache_path)
    log.info("built %s in %.1f s (%s %s, batch 1..%d)", engine_path, seconds, backend, version, max_batch)
    return EngineInfo(path=engine_path, backend=backend, trt_version=version, compute_capability=compute_capability,
                      precision=precision, build_seconds=seconds, max_batch=int(max_batch), source=onnx_path.name,
                      sha256=hashlib.sha256(plan_bytes).hexdigest())


__all__ = ["EngineInfo", "EngineBuildError", "build_engine", "engine_filename", "available_builders",
           "timing_cache_filename"]

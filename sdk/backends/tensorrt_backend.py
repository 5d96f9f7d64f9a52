"""TensorRT and TensorRT-RTX inference backend (pycuda for memory, streams and timing).

A TensorRT engine runs only on the GPU model and TensorRT version that built it, so the bundle
keeps one engine per (TensorRT version, compute capability, precision) and this module picks the
one that matches the machine; a TensorRT-RTX engine is portable across Ampere+ GPUs and only its
version must match. When no engine matches, one is built from the bundle's ONNX (when the export
part of regionkd is importable) and registered in the bundle so the next start reuses it.

tensorrt / tensorrt_rtx_bindings and pycuda are imported only inside functions: `regionkd.sdk`
must import on machines that have neither. The same code serves TensorRT 10.3, 10.13, 11.x and
TensorRT-RTX (API names checked by tests/test_tensorrt_api_names.py); code that only TensorRT-RTX
has lives in functions named `_rtx_*`.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..bundle_files import ENGINE_DIR, ENGINE_FORMATS
from ..errors import BackendError, BundleError, MissingDependencyError, RegionKDError, require
from .base import Backend

log = logging.getLogger(__name__)

#: backend name -> Python module, and the pip extra that installs it
TRT_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
TRT_EXTRAS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}
DEFAULT_MAX_BATCH = 16


def backend_name(rtx: bool) -> str:
    return "tensorrt-rtx" if rtx else "tensorrt"


def short_version(version: str) -> str:
    """'10.3.0.30' -> '10.3.0': engines and manifests name a TensorRT release by major.minor.patch."""
    parts = str(version).split(".")
    return ".".join(parts[:3])


def import_trt(backend: str):
    """The TensorRT Python module for `backend` ("tensorrt" | "tensorrt-rtx"), imported lazily."""
    if backend not in TRT_MODULES:
        raise BackendError(f"unknown TensorRT backend {backend!r}; choose one of {', '.join(TRT_MODULES)}")
    try:
        return require(TRT_MODULES[backend], extra=TRT_EXTRAS[backend], purpose=f"the {backend} backend")
    except MissingDependencyError:
        raise
    except (ImportError, OSError) as exc:  # installed, but its shared libraries do not load
        raise MissingDependencyError(f"Python module '{TRT_MODULES[backend]}' is installed but does not load "
                                     f"({exc}); reinstall it: pip install 'regionkd[{TRT_EXTRAS[backend]}]'") from exc


def import_pycuda():
    """pycuda.driver, imported lazily (never pycuda.autoinit: contexts are made explicitly per backend)."""
    try:
        return require("pycuda.driver", extra="tensorrt", purpose="TensorRT inference (CUDA memory and streams)")
    except MissingDependencyError:
        raise
    except (ImportError, OSError) as exc:  # pycuda links libcuda: no NVIDIA driver on this machine
        raise MissingDependencyError(f"pycuda does not load ({exc}): no NVIDIA driver here?") from exc


def gpu_compute_capability(device: int = 0) -> tuple[str | None, str]:
    """(compute capability of GPU `device` as "8.7", or None, the reason when there is none).

    pycuda first (it is what the runtime uses); `nvidia-smi` as a fallback so the engine builder
    can name its engines on a machine with TensorRT but without pycuda."""
    reasons = []
    try:
        cuda = import_pycuda()
        cuda.init()
        count = cuda.Device.count()
        if count > device:
            major, minor = cuda.Device(device).compute_capability()
            return f"{major}.{minor}", ""
        reasons.append("CUDA sees no device" if count == 0 else
                       f"CUDA device {device} does not exist (this machine has {count}: 0..{count - 1})")
    except MissingDependencyError as exc:
        reasons.append(str(exc))
    except Exception as exc:  # pycuda.driver.Error / RuntimeError: driver present but no usable GPU
        reasons.append(f"CUDA initialisation failed ({exc})")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device}"],
                                 capture_output=True, text=True, timeout=20)
            first = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
            if first and first.replace(".", "").isdigit():
                return first, ""
            reasons.append(f"nvidia-smi found no GPU ({out.stderr.strip() or out.stdout.strip()})")
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"nvidia-smi failed ({exc})")
    else:
        reasons.append("nvidia-smi not found")
    return None, "no NVIDIA GPU: " + "; ".join(reasons)


def tensorrt_available(rtx: bool = False) -> tuple[bool, str]:
    """(True, what will run) or (False, why not): the module, pycuda and a GPU are all needed to run."""
    backend = backend_name(rtx)
    try:
        trt = import_trt(backend)
    except MissingDependencyError as exc:
        return False, str(exc)
    cc, reason = gpu_compute_capability()
    if cc is None:
        return False, reason
    try:
        import_pycuda()
    except MissingDependencyError as exc:
        return False, f"a GPU of compute capability {cc} is present but {exc}"
    return True, f"{backend} {short_version(trt.__version__)} on a GPU of compute capability {cc}"


# ---------------------------------------------------------------------------- engine selection

def _describe(entry: dict) -> str:
    where = f" sm {entry.get('compute_capability')}" if entry.get("compute_capability") else ""
    return f"{entry['path']} (version {entry.get('trt_version')}{where}, {entry['precision']})"


def select_engine(files: list[dict], *, backend: str, precision: str, trt_version: str,
                  compute_capability: str | None) -> dict:
    """The manifest entry of the engine that runs here, or a BackendError that says what is missing.

    TensorRT: precision, TensorRT version and GPU compute capability must all match (an engine
    for another GPU or version is refused, not tried). TensorRT-RTX: precision and version."""
    fmt = ENGINE_FORMATS[backend]
    version = short_version(trt_version)
    engines = [e for e in files if e.get("format") == fmt and backend in e.get("backends", ())
               and e["precision"] == precision]
    for entry in engines:
        same_version = short_version(entry.get("trt_version", "")) == version
        same_gpu = backend == "tensorrt-rtx" or str(entry.get("compute_capability")) == str(compute_capability)
        if same_version and same_gpu:
            return entry
    if backend == "tensorrt":
        wanted = f"TensorRT {version}, sm {compute_capability}, {precision}"
        rule = "a TensorRT engine runs only on the GPU model and TensorRT version that built it"
    else:
        wanted = f"TensorRT-RTX {version}, {precision}"
        rule = "a TensorRT-RTX engine runs only with the TensorRT-RTX version that built it"
    others = "; ".join(_describe(e) for e in engines)
    have = f" It has only engines for other versions/GPUs: {others} ({rule})." if engines else ""
    raise BackendError(f"no {backend} engine for {wanted} in the bundle.{have} The SDK builds it from the "
                       f"bundle's {precision} ONNX and caches it where the builder can run (TensorRT needs a GPU, "
                       f"TensorRT-RTX any CPU); or build it ahead with regionkd-export --engine require.")


def source_onnx(files: list[dict], backend: str, precision: str) -> dict:
    """The ONNX entry an engine of `precision` is built from (the TensorRT flavour for int8)."""
    candidates = [e for e in files if e.get("format", "onnx") == "onnx" and e["precision"] == precision
                  and e.get("graph", "network") == "network"
                  and ("tensorrt" in e["backends"] or backend in e["backends"])]
    if not candidates:
        raise BackendError(f"the bundle has no {precision} ONNX file for TensorRT to build an engine from")
    return next((e for e in candidates if e.get("flavour") == "tensorrt"), candidates[0])


def _engine_builder():
    """The engine builder (regionkd.sdk.backends.engine_build); it needs only TensorRT itself."""
    from . import engine_build
    return engine_build


def resolve_engine(bundle, backend: str, precision: str, trt_version: str, compute_capability: str | None,
                   build: bool = True) -> dict:
    """select_engine over the bundle; when none matches and `build`, build one, register it, return it."""
    try:
        return select_engine(bundle.files, backend=backend, precision=precision, trt_version=trt_version,
                             compute_capability=compute_capability)
    except BackendError:
        if not build:
            raise
        builder = _engine_builder()
    onnx_entry = source_onnx(bundle.files, backend, precision)
    log.info("%s: no engine for %s here; building one from %s", backend, precision, onnx_entry["path"])
    info = builder.build_engine(bundle.path_of(onnx_entry), bundle.root / ENGINE_DIR, backend=backend,
                                max_batch=int(bundle.max_batch or DEFAULT_MAX_BATCH), precision=precision,
                                onnx_bytes=bundle.read_verified(onnx_entry))
    fields = info.manifest_fields()
    fields["source"] = onnx_entry["path"]
    if bundle.signature.verified:
        log.warning("%s: built %s from the signed %s; it is not recorded in the signed manifest, so it is "
                    "rebuilt at every start (ship engines in the bundle, or sign it again after building)",
                    backend, info.path, onnx_entry["path"])
    try:
        entry = bundle.register_file(info.path, **fields)
    except OSError as exc:
        raise BackendError(f"built {info.path} but cannot record it in the bundle {bundle.root} ({exc}); "
                           "make the bundle directory writable") from exc
    if info.sha256 and entry["sha256"] != info.sha256:
        raise BundleError(f"{info.path}: the engine file changed right after it was built; refusing to run it")
    return entry


# ---------------------------------------------------------------------------- runtime

def _rtx_runtime_cache_path(engine_path: Path, compute_capability: str) -> Path:
    """Beside the engine in the bundle: one cache per GPU model (it holds kernels specialised to it)."""
    return engine_path.with_name(f"{engine_path.stem}.sm{compute_capability.replace('.', '')}.runtime-cache")


def _rtx_check_engine(trt, runtime, blob: bytes, path: Path) -> None:
    """TensorRT-RTX says whether a plan suits this GPU before deserializing it."""
    validity, diagnostics = runtime.get_engine_validity(blob)
    if validity == trt.EngineValidity.SUBOPTIMAL:
        log.warning("%s: TensorRT-RTX says this engine is suboptimal on this GPU (diagnostics %s)", path, diagnostics)
    elif validity != trt.EngineValidity.VALID:
        raise BackendError(f"{path}: TensorRT-RTX cannot run this engine on this GPU ({validity.name}, "
                           f"diagnostics {diagnostics}); rebuild it with this TensorRT-RTX version")


def _rtx_open_context(engine, cache_path: Path):
    """An execution context whose JIT-compiled kernels go to (and come from) a runtime cache file."""
    config = engine.create_runtime_config()
    cache = config.create_runtime_cache()
    if cache_path.is_file():
        if not cache.deserialize(cache_path.read_bytes()):
            log.warning("%s: runtime cache is from another GPU, driver or version; starting a new one", cache_path)
    config.set_runtime_cache(cache)
    return engine.create_execution_context(config), config, cache


def _rtx_save_runtime_cache(cache, cache_path: Path) -> None:
    try:
        atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))
    except OSError as exc:  # a read-only bundle still runs, only the next start is slower
        log.warning("cannot save the TensorRT-RTX runtime cache %s (%s)", cache_path, exc)


def _make_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


class TensorRTBackend(Backend):
    """Runs one engine on GPU 0 with pinned host buffers, async copies and execute_async_v3 on one stream.

    Thread-safe: each `run` pushes this backend's CUDA context on the calling thread under a lock."""

    thread_safe = True

    def __init__(self, bundle, precision: str, rtx: bool = False, batch_size: int | None = None, device: int = 0):
        self.name = backend_name(rtx)
        self.precision = precision
        self.last_gpu_ms = None
        self._lock = threading.Lock()
        self._cache = self._runtime_config = None
        self._runs = 0
        self._context = self._engine = self._runtime = None
        self._dev_in = self._dev_out = self._stream = self._start = self._end = None
        self._cuda_context = None
        trt = import_trt(self.name)
        cuda = import_pycuda()
        self._cuda = cuda
        self.device = int(device)
        cc, reason = gpu_compute_capability(self.device)
        if cc is None:
            raise BackendError(f"{self.name} cannot run here: {reason}")
        self.trt_version = short_version(trt.__version__)
        self.compute_capability = cc
        entry = resolve_engine(bundle, self.name, precision, self.trt_version, None if rtx else cc)
        self.model_path = bundle.path_of(entry)
        blob = bundle.read_verified(entry)           # the bytes checked against the manifest are the bytes run
        # a runtime cache holds compiled kernels and is not covered by the manifest: with a verified
        # signature, none is read from (or written to) the bundle
        self._use_runtime_cache = not bundle.signature.verified
        self._input_size = tuple(int(v) for v in bundle.preprocessing["input_size"])
        cuda.init()
        self._cuda_context = cuda.Device(self.device).retain_primary_context()
        self._cuda_context.push()
        try:
            self._open(trt, cuda, blob, rtx, batch_size, bundle.num_classes)
        except BaseException:
            self._release()
            cuda.Context.pop()
            self._cuda_context.detach()
            self._cuda_context = None
            raise
        cuda.Context.pop()
        log.info("%s %s: %s, batch 1..%d, sm %s", self.name, self.trt_version, self.model_path.name,
                 self.max_batch, cc)

    def _open(self, trt, cuda, blob: bytes, rtx: bool, batch_size: int | None, num_classes: int) -> None:
        self._runtime = trt.Runtime(_make_logger(trt))
        if rtx:
            _rtx_check_engine(trt, self._runtime, blob, self.model_path)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise BackendError(f"{self.model_path}: {self.name} {self.trt_version} could not deserialize this "
                               f"engine (built by another TensorRT version or for another GPU?)")
        if rtx and self._use_runtime_cache:
            self._cache_path = _rtx_runtime_cache_path(self.model_path, self.compute_capability)
            self._context, self._runtime_config, self._cache = _rtx_open_context(self._engine, self._cache_path)
        else:
            self._context = self._engine.create_execution_context()
        engine = self._engine
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else outputs).append(tensor)
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.model_path}: expected one input and one output, got {inputs} and {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        profile_max = engine.get_tensor_profile_shape(self._input, 0)[2]
        in_shape = tuple(engine.get_tensor_shape(self._input))
        out_shape = tuple(engine.get_tensor_shape(self._output))
        self.max_batch = min(int(batch_size or profile_max[0]), int(profile_max[0]))
        self.input_hw = tuple(int(v) for v in in_shape[2:])
        if all(v > 0 for v in self.input_hw) and self.input_hw != self._input_size:
            raise BundleError(f"{self.model_path}: the engine takes {self.input_hw[0]}x{self.input_hw[1]} slices, "
                              f"the manifest's preprocessing.input_size says {self._input_size[0]}x{self._input_size[1]}")
        self.num_classes = int(out_shape[1])
        if self.num_classes != num_classes:
            raise BackendError(f"{self.model_path}: engine has {self.num_classes} output channels, "
                               f"the bundle {num_classes} classes")
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input)))
        out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output)))
        # shapes kept apart from the pinned arrays: only pycuda names are used on pycuda values
        self._in_shape = (self.max_batch, *(int(v) for v in in_shape[1:]))
        self._out_shape = (self.max_batch, *(int(v) for v in out_shape[1:]))
        self._host_in = cuda.pagelocked_empty(self._in_shape, in_dtype)
        self._host_out = cuda.pagelocked_empty(self._out_shape, out_dtype)
        self._dev_in = cuda.mem_alloc(int(np.prod(self._in_shape)) * in_dtype.itemsize)
        self._dev_out = cuda.mem_alloc(int(np.prod(self._out_shape)) * out_dtype.itemsize)
        self._context.set_tensor_address(self._input, int(self._dev_in))
        self._context.set_tensor_address(self._output, int(self._dev_out))
        self._stream = cuda.Stream()
        self._start, self._end = cuda.Event(), cuda.Event()
        self._runs = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, H, W) float32 -> (n, C, H, W) float32 logits, in chunks of at most max_batch."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self._in_shape[1:]:
            raise BackendError(f"{self.model_path}: input batch shape {batch.shape} is not "
                               f"(n, {', '.join(map(str, self._in_shape[1:]))})")
        n = batch.shape[0]
        logits = np.empty((n, *self._out_shape[1:]), np.float32)
        cuda = self._cuda
        gpu_ms = 0.0
        with self._lock:
            self._cuda_context.push()
            try:
                for first in range(0, n, self.max_batch):
                    k = min(self.max_batch, n - first)
                    self._host_in[:k] = batch[first:first + k]
                    if not self._context.set_input_shape(self._input, (k, *self._in_shape[1:])):
                        raise BackendError(f"{self.model_path}: engine refused batch {k}")
                    cuda.memcpy_htod_async(self._dev_in, self._host_in[:k], self._stream)
                    self._start.record(self._stream)
                    if not self._context.execute_async_v3(self._stream.handle):
                        raise BackendError(f"{self.model_path}: {self.name} inference failed (batch {k})")
                    self._end.record(self._stream)
                    cuda.memcpy_dtoh_async(self._host_out[:k], self._dev_out, self._stream)
                    self._stream.synchronize()
                    gpu_ms += self._start.time_till(self._end)
                    logits[first:first + k] = self._host_out[:k]
                self._runs += 1
                if self._cache is not None and self._runs == 1:  # the first run compiled kernels: keep them
                    _rtx_save_runtime_cache(self._cache, self._cache_path)
            finally:
                cuda.Context.pop()
        self.last_gpu_ms = gpu_ms
        return logits

    def _release(self) -> None:
        """Free GPU objects in dependency order while the CUDA context is current."""
        self._context = None  # the execution context before its config and engine, the engine before the runtime
        self._runtime_config = None
        self._cache = None
        self._engine = None
        self._runtime = None
        if self._dev_in is not None:
            self._dev_in.free()
        if self._dev_out is not None:
            self._dev_out.free()
        self._dev_in = self._dev_out = self._stream = self._start = self._end = None

    def close(self) -> None:
        with self._lock:
            if self._cuda_context is None:
                return
            self._cuda_context.push()
            try:
                if self._cache is not None and self._runs:
                    _rtx_save_runtime_cache(self._cache, self._cache_path)
                self._release()
            finally:
                self._cuda.Context.pop()
                self._cuda_context.detach()
                self._cuda_context = None


def create_tensorrt_backend(bundle, precision: str, rtx: bool = False, batch_size: int | None = None,
                            device: int = 0):
    """The TensorRT (or TensorRT-RTX) backend for `precision` of a loaded Bundle, on CUDA device `device`."""
    try:
        return TensorRTBackend(bundle, precision, rtx=rtx, batch_size=batch_size, device=device)
    except RegionKDError:
        raise
    except Exception as exc:  # TensorRT/pycuda raise their own types (RuntimeError, pycuda.driver.Error)
        raise BackendError(f"{backend_name(rtx)} backend failed to start for {precision}: {exc}") from exc

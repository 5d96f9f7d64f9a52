"""The kinds of model file a bundle holds, in one table (`FILE_KINDS`).

A row says what a file's manifest entry holds (precision, flavour, format, the backends that may
run it) and where the file lives in the bundle. The export writes its files by these rows
(the exporter's bundle writer), the manifest schema takes its precisions, formats and backend
names from them (`regionkd.sdk.manifest_schema`), and the backends name and find the files they
open by the same rows, so the writer, the reader and the runtime cannot disagree on a name.

ONNX files have one row per precision and flavour: INT8 comes in two flavours from one calibration
(`tensorrt`: symmetric int8 TensorRT builds from; `cpu`: uint8 activations, faster on
onnxruntime's CPU kernels). Engines have one row per TensorRT runtime; their name is a pattern
filled with the TensorRT version, the GPU's compute capability (TensorRT only) and the precision,
since an engine runs only where those match.

Every ONNX network has a fused twin (`graph: "fused"`, `model.<key>.fused.onnx`): raw HU slices at
their native matrix in, uint8 labels out, the window, both resizes and the argmax inside the
graph (made by the exporter). The runtime uses it where the manifest lists it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BundleError

ENGINE_DIR = "engines"                  # engines and their timing caches, apart from the ONNX files
CALIBRATION_FILE = "calibration.json"   # the INT8 calibration ranges both flavours were made from


@dataclass(frozen=True)
class FileKind:
    """One kind of bundle file. `precision` None: one file per precision (engines)."""
    key: str
    format: str
    backends: tuple
    name: str                           # file name, or a pattern with {version}, {sm}, {precision}
    precision: str | None = None
    flavour: str | None = None
    folder: str = ""                    # bundle-relative folder ("" = the bundle's top level)
    title: str = ""                     # how messages name the file's model
    graph: str = "network"              # "fused": pre- and post-processing inside the model (see below)

    def path(self, **values) -> str:
        """The file's bundle-relative posix path (a pattern filled with `values`)."""
        name = self.name.format(**values) if values else self.name
        return f"{self.folder}/{name}" if self.folder else name

    def manifest_fields(self) -> dict:
        """The entry fields this kind fixes (`bundle.file_entry` adds path, bytes and sha256)."""
        fields = {"format": self.format, "precision": self.precision, "flavour": self.flavour,
                  "backends": list(self.backends), "graph": self.graph if self.graph != "network" else None}
        return {k: v for k, v in fields.items() if v is not None}


FILE_KINDS = (
    FileKind("fp32", "onnx", ("onnxruntime", "tensorrt"), "model.fp32.onnx", "fp32", "reference", title="fp32"),
    FileKind("fp16", "onnx", ("onnxruntime", "tensorrt"), "model.fp16.onnx", "fp16", "reference", title="fp16"),
    FileKind("int8", "onnx", ("tensorrt",), "model.int8.onnx", "int8", "tensorrt", title="int8 TensorRT flavour"),
    FileKind("int8-cpu", "onnx", ("onnxruntime",), "model.int8-cpu.onnx", "int8", "cpu", title="int8 CPU flavour"),
    FileKind("fp32-fused", "onnx", ("onnxruntime", "tensorrt"), "model.fp32.fused.onnx", "fp32", "reference",
             title="fp32 fused", graph="fused"),
    FileKind("fp16-fused", "onnx", ("onnxruntime", "tensorrt"), "model.fp16.fused.onnx", "fp16", "reference",
             title="fp16 fused", graph="fused"),
    FileKind("int8-fused", "onnx", ("tensorrt",), "model.int8.fused.onnx", "int8", "tensorrt",
             title="int8 TensorRT flavour, fused", graph="fused"),
    FileKind("int8-cpu-fused", "onnx", ("onnxruntime",), "model.int8-cpu.fused.onnx", "int8", "cpu",
             title="int8 CPU flavour, fused", graph="fused"),
    FileKind("tensorrt-engine", "tensorrt-engine", ("tensorrt",), "trt{version}-sm{sm}-{precision}.engine",
             folder=ENGINE_DIR, title="TensorRT engine"),
    FileKind("tensorrt-rtx-engine", "tensorrt-rtx-engine", ("tensorrt-rtx",), "rtx{version}-{precision}.engine",
             folder=ENGINE_DIR, title="TensorRT-RTX engine"),
)


def _unique(values) -> tuple:
    return tuple(dict.fromkeys(v for v in values if v is not None))


#: precisions, in the order bundles, reports and options list them (fp32 first: the reference)
PRECISIONS = _unique(k.precision for k in FILE_KINDS)
#: the runtimes a file entry may name in `backends`
BACKENDS = _unique(b for k in FILE_KINDS for b in k.backends)
FILE_FORMATS = _unique(k.format for k in FILE_KINDS)
ONNX_KINDS = tuple(k for k in FILE_KINDS if k.format == "onnx")
NETWORK_KINDS = tuple(k for k in ONNX_KINDS if k.graph == "network")
INT8_FLAVOURS = _unique(k.flavour for k in ONNX_KINDS if k.precision == "int8")
#: engine runtime -> the `format` of its engines
ENGINE_FORMATS = {k.backends[0]: k.format for k in FILE_KINDS if k.precision is None}


def file_kind(key: str) -> FileKind:
    """The row called `key` (e.g. "fp16", "int8-cpu", "tensorrt-rtx-engine")."""
    for kind in FILE_KINDS:
        if kind.key == key:
            return kind
    raise BundleError(f"unknown kind of bundle file {key!r}; known: {', '.join(k.key for k in FILE_KINDS)}")


def fused_kind(key: str) -> FileKind:
    """The fused twin of the network kind `key` ("fp32" -> "fp32-fused")."""
    return file_kind(f"{key}-fused")


def engine_kind(backend: str) -> FileKind:
    """The engine row of a TensorRT runtime ("tensorrt" | "tensorrt-rtx")."""
    if backend not in ENGINE_FORMATS:
        raise BundleError(f"unknown engine backend {backend!r}; choose one of {', '.join(ENGINE_FORMATS)}")
    return file_kind(ENGINE_FORMATS[backend])

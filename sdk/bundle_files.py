"""The kinds of model file a bundle holds, in one table (`FILE_KINDS`).

A row says what a file's manifest entry holds (precision, flavour, format, the backends that may
run it) and where the file lives in the bundle. The export writes its files by these rows
(`regionkd.export.bundle_writer`), the manifest schema takes its precisions, formats and backend
names from them (`regionkd.sdk.manifest_schema`), and the backends name and find the files they
open by the same rows, so the writer, the reader and the runtime cannot disagree on a name.

ONNX files have one row per precision and flavour: INT8 comes in two flavours from one calibration
(`tensorrt`: symmetric int8 TensorRT builds from; `cpu`: uint8 activations, faster on
onnxruntime's CPU kernels). Engines have one row per TensorRT runtime; their name is a pattern
filled with the TensorRT version, the GPU's compute capability (TensorRT only) and the precision,
since an engine runs only where those match.
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

    def path(self, **values) -> str:
        """The file's bundle-relative posix path (a pattern filled with `values`)."""
        name = self.name.format(**values) if values else self.name
        return f"{self.folder}/{name}" if self.folder else name

    def manifest_fields(self) -> dict:
        """The entry fields this kind fixes (`bundle.file_entry` adds path, bytes and sha256)."""
        fields = {"format": self.format, "precision": self.precision, "flavour": self.flavour,
                  "backends": list(self.backends)}
        return {k: v for k, v in fields.items() if v is not None}


FILE_KINDS = (
    FileKind("fp32", "onnx", ("onnxruntime", "tensorrt"), "model.fp32.onnx", "fp32", "reference", title="fp32"),
    FileKind("fp16", "onnx", ("onnxruntime", "tensorrt"), "model.fp16.onnx", "fp16", "reference", title="fp16"),
    FileKind("int8", "onnx", ("tensorrt",), "model.int8.onnx", "int8", "tensorrt", title="int8 TensorRT flavour"),
    FileKind("int8-cpu", "onnx", ("onnxruntime",), "model.int8-cpu.onnx", "int8", "cpu", title="int8 CPU flavour"),
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
INT8_FLAVOURS = _unique(k.flavour for k in ONNX_KINDS if k.precision == "int8")
#: engine runtime -> the `format` of its engines
ENGINE_FORMATS = {k.backends[0]: k.format for k in FILE_KINDS if k.precision is None}


def file_kind(key: str) -> FileKind:
    """The row called `key` (e.g. "fp16", "int8-cpu", "tensorrt-rtx-engine")."""
    for kind in FILE_KINDS:
        if kind.key == key:
            return kind
    raise BundleError(f"unknown kind of bundle file {key!r}; known: {', '.join(k.key for k in FILE_KINDS)}")


def engine_kind(backend: str) -> FileKind:
    """The engine row of a TensorRT runtime ("tensorrt" | "tensorrt-rtx")."""
    if backend not in ENGINE_FORMATS:
        raise BundleError(f"unknown engine backend {backend!r}; choose one of {', '.join(ENGINE_FORMATS)}")
    return file_kind(ENGINE_FORMATS[backend])

"""The bundle manifest's schema (format_version 1), in one place, checked before anything is loaded.

`check_manifest(manifest, where)` raises BundleError naming the manifest, the field and the
problem. The JSON Schema (`SCHEMA`, validated with `jsonschema`) gives the types and ranges of
every field the SDK uses; `_semantic_problems` adds what a schema cannot say (lo < hi, a class
count that matches the names, labels in range, paths that stay inside the bundle). The precisions,
file formats and backend names a file entry may hold are those of the file-kinds table
(`regionkd.sdk.bundle_files`).
`parse_manifest_bytes` refuses what the JSON parser should never see: more than
MAX_MANIFEST_BYTES, nesting deeper than MAX_DEPTH, NaN / Infinity literals.
Integers are JSON integers: `true` and `1.0` are not the integer 1.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any

from .bundle_files import BACKENDS, FILE_FORMATS, PRECISIONS
from .errors import BundleError, require

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20        # 1 MB: a real manifest is a few kB
MAX_DEPTH = 32                      # objects/arrays inside each other; a real manifest has 6
MAX_INPUT_SIZE = 2048               # network slice size; CT matrices are 512 (sometimes 1024)
MAX_BATCH = 4096
RESERVED_NAMES = ("manifest.json", "manifest.sig")

_INT = {"type": "integer"}
_HU = {"type": "number", "minimum": -100000, "maximum": 100000}
_MM = {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}
_RANGE_MM = {"type": "array", "minItems": 2, "maxItems": 2, "items": _MM}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200}

_TEXT = {"type": "string", "maxLength": 4096}
# a coded concept: [code value, coding scheme designator, code meaning], e.g. ["10200004", "SCT", "Liver"]
_CODE = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "string", "minLength": 1, "maxLength": 64}}
# what a bundle is judged by; field names of MONAI's bundle metadata.json where it has one
METADATA_SCHEMA = {
    "type": "object",
    "properties": {
        "version": {"type": "string", "minLength": 1, "maxLength": 64},      # the model's version (DICOM SEG too)
        "changelog": {"type": "object", "maxProperties": 1000, "additionalProperties": _TEXT},
        "description": _TEXT,
        "authors": {"type": "string", "maxLength": 1024},
        "copyright": {"type": "string", "maxLength": 1024},
        "license": {"type": "string", "maxLength": 256},                     # an SPDX id or a short text
        "intended_use": _TEXT,
        "references": {"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 1024}},
        "task": {"type": "string", "maxLength": 256},
        "data_source": _TEXT,
    },
}

FILE_SCHEMA = {
    "type": "object",
    "required": ["path", "precision", "backends", "bytes", "sha256"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "maxLength": 255},
        "format": {"enum": list(FILE_FORMATS)},
        "precision": {"enum": list(PRECISIONS)},
        "flavour": {"type": "string", "maxLength": 64},
        "graph": {"enum": ["network", "fused"]},
        "label_agreement": {"type": "array", "maxItems": 10000, "items": {"type": "number", "minimum": 0,
                                                                            "maximum": 1}},
        "backends": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(BACKENDS)}},
        "bytes": {**_INT, "minimum": 0, "maximum": 1 << 40},
        "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
        "trt_version": {"type": "string", "maxLength": 32},
        "compute_capability": {"type": ["string", "null"], "pattern": "^[0-9]{1,2}\\.[0-9]{1,2}$"},
        "max_batch": {**_INT, "minimum": 1, "maximum": MAX_BATCH},
        "source": {"type": "string", "maxLength": 255},
    },
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "regionkd bundle manifest, format_version 1",
    "type": "object",
    "required": ["format_version", "model", "preprocessing", "files"],
    "properties": {
        "format_version": {**_INT, "const": FORMAT_VERSION},
        "model": {
            "type": "object",
            "required": ["class_names"],
            "properties": {
                "name": _NAME,
                "arch": _NAME,
                "num_classes": {**_INT, "minimum": 2, "maximum": 255},
                "class_names": {"type": "array", "minItems": 2, "maxItems": 255, "uniqueItems": True,
                                "items": {"type": "string", "minLength": 1, "maxLength": 64}},
                "params": {"type": ["integer", "null"], "minimum": 0},
                "gflops_per_slice": {"type": ["number", "null"], "minimum": 0},
                # DICOM SEG codes per class name, for classes whose name has no built-in SNOMED CT code
                "segment_codes": {"type": "object", "maxProperties": 254,
                                  "additionalProperties": {"type": "object", "required": ["category", "type"],
                                                           "properties": {"category": _CODE, "type": _CODE,
                                                                          "anatomic_region": _CODE}}},
            },
        },
        "preprocessing": {
            "type": "object",
            "required": ["window", "input_size"],
            "properties": {
                "window": {"type": "array", "minItems": 2, "maxItems": 2, "items": _HU},
                "input_size": {"type": "array", "minItems": 2, "maxItems": 2,
                               "items": {**_INT, "minimum": 32, "maximum": MAX_INPUT_SIZE, "multipleOf": 32}},
                "orientation": {"const": "RAS"},
                "slice_axis": {"const": "axial"},
                "normalisation": {"type": "object", "required": ["type"],
                                  "properties": {"type": {"const": "window-linear"}, "range": {"const": [-1, 1]}}},
                "largest_component_labels": {"type": "array", "uniqueItems": True, "maxItems": 254,
                                             "items": {**_INT, "minimum": 1, "maximum": 254}},
                # components kept per organ label when more than one (two kidneys): {"1": 2}
                "largest_component_counts": {"type": "object", "maxProperties": 254,
                                             "propertyNames": {"pattern": "^[1-9][0-9]{0,2}$"},
                                             "additionalProperties": {**_INT, "minimum": 1, "maximum": 16}},
                "spacing": {"type": "object",
                            "properties": {"in_plane_mm": _RANGE_MM, "slice_thickness_mm": _RANGE_MM}},
            },
        },
        "io": {
            "type": "object",
            "properties": {"input": {"type": "string", "maxLength": 128}, "output": {"type": "string", "maxLength": 128},
                           "max_batch": {**_INT, "minimum": 1, "maximum": MAX_BATCH}},
        },
        "files": {"type": "array", "minItems": 1, "maxItems": 256, "items": FILE_SCHEMA},
        "metrics": {"type": "object"},
        "provenance": {"type": "object"},
        "metadata": METADATA_SCHEMA,
    },
}


def _fail(where: str, problem: str) -> BundleError:
    return BundleError(f"{where}: malformed manifest: {problem}")


@lru_cache(maxsize=1)
def _validator():
    """A Draft 2020-12 validator whose 'integer' is a JSON integer (not true, not 1.0)."""
    jsonschema = require("jsonschema", purpose="checking bundle manifests")
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    cls = jsonschema.validators.extend(base, type_checker=checker)
    cls.check_schema(SCHEMA)
    return cls(SCHEMA)


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest_bytes(raw: bytes, where: str) -> Any:
    """JSON from the manifest's bytes, refusing oversized, too deeply nested or non-standard JSON."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _fail(where, f"{len(raw)} bytes; a manifest may have at most {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise _fail(where, f"nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:   # JSONDecodeError is a ValueError
        raise _fail(where, f"not valid JSON ({exc})") from None
    if _json_depth(manifest) > MAX_DEPTH:
        raise _fail(where, f"nested deeper than {MAX_DEPTH} levels")
    return manifest


def _check_format_version(manifest: dict, where: str) -> None:
    if "format_version" not in manifest:
        raise _fail(where, "no 'format_version'")
    version = manifest["format_version"]
    if isinstance(version, int) and not isinstance(version, bool):
        if version != FORMAT_VERSION:
            raise BundleError(f"{where}: unknown format_version {version!r} (this SDK reads {FORMAT_VERSION}); "
                              "re-export the bundle or upgrade regionkd")
        return
    raise _fail(where, f"format_version must be the integer {FORMAT_VERSION}, got {json.dumps(version)}")


def _bad_path(rel: str) -> str | None:
    if "\\" in rel or "\0" in rel:
        return "holds a backslash or NUL"
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/"):
        return "is absolute"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "has an empty, '.' or '..' part"
    if rel in RESERVED_NAMES:
        return "names the manifest or its signature"
    return None


def _semantic_problems(manifest: dict):
    """What the JSON Schema cannot express, as (field, problem) pairs."""
    model, prep = manifest["model"], manifest["preprocessing"]
    names = model["class_names"]
    if "num_classes" in model and model["num_classes"] != len(names):
        yield "model.num_classes", f"{model['num_classes']} != {len(names)} class names {names}"
    lo, hi = prep["window"]
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        yield "preprocessing.window", f"must be [lo, hi] with lo < hi, got {prep['window']!r}"
    for name in (model.get("segment_codes") or {}):
        if name not in names:
            yield "model.segment_codes", f"{name!r} is not one of the class names {names}"
    for label in prep.get("largest_component_labels", []):
        if label >= len(names):
            yield "preprocessing.largest_component_labels", \
                f"label {label} is not a class (the model has {len(names)}: 0..{len(names) - 1})"
    for key in prep.get("largest_component_counts") or {}:
        if int(key) not in prep.get("largest_component_labels", []):
            yield "preprocessing.largest_component_counts", \
                f"label {key} is not one of largest_component_labels {prep.get('largest_component_labels', [])}"
    for key, (lo_mm, hi_mm) in (prep.get("spacing") or {}).items():
        if lo_mm > hi_mm:
            yield f"preprocessing.spacing.{key}", f"must be [min, max] with min <= max, got {[lo_mm, hi_mm]}"
    seen = set()
    for i, entry in enumerate(manifest["files"]):
        why = _bad_path(entry["path"])
        if why:
            yield f"files[{i}].path", f"{entry['path']!r} {why}; it must be relative and stay inside the bundle"
        if entry["path"] in seen:
            yield f"files[{i}].path", f"{entry['path']!r} is listed twice"
        seen.add(entry["path"])


def check_manifest(manifest: Any, where: str = "manifest.json") -> None:
    """Raise BundleError naming `where`, the field and the problem when `manifest` does not follow
    format_version 1 (see SCHEMA)."""
    if not isinstance(manifest, dict):
        raise _fail(where, "top level must be a JSON object")
    _check_format_version(manifest, where)
    if _json_depth(manifest) > MAX_DEPTH:
        raise _fail(where, f"nested deeper than {MAX_DEPTH} levels")
    jsonschema = require("jsonschema", purpose="checking bundle manifests")
    error = jsonschema.exceptions.best_match(_validator().iter_errors(manifest))
    if error is not None:
        raise _fail(where, f"{_where(error.absolute_path)}: {error.message}")
    for field, problem in _semantic_problems(manifest):
        raise _fail(where, f"{field}: {problem}")

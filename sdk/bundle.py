"""Model bundle: a directory with `manifest.json` (format_version 1) and the model files.

`load_bundle` checks the manifest's shape and every listed file's sha256 *before* anything is
loaded, so a truncated copy or a swapped file is refused with a message naming it. The SDK only
ever reads JSON, ONNX and TensorRT engines from a bundle; it never unpickles anything.
The export writes bundles with `file_entry` + `write_manifest` (or `Bundle.register_file`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import atomic_write_text
from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
KNOWN_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (engines can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike, root: str | os.PathLike, **fields: Any) -> dict:
    """A manifest `files` entry for the file `path` (a path as given to open(), inside `root`):
    its posix path relative to `root`, bytes, sha256, plus `fields`."""
    full, root = Path(path), Path(root)
    try:
        rel = full.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"{full} is not inside the bundle directory {root}") from None
    if not full.is_file():
        raise BundleError(f"bundle file {full} does not exist")
    entry = {"path": rel.as_posix()}
    entry.update(fields)
    entry["bytes"] = full.stat().st_size
    entry["sha256"] = sha256_file(full)
    return entry


def _fail(where: str, problem: str) -> BundleError:
    return BundleError(f"{where}: malformed manifest: {problem}")


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> None:
    """Raise BundleError naming `where` when the manifest does not follow format_version 1."""
    if not isinstance(manifest, dict):
        raise _fail(where, "top level must be a JSON object")
    if "format_version" not in manifest:
        raise _fail(where, "no 'format_version'")
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: unknown format_version {version!r} (this SDK reads {FORMAT_VERSION}); "
                          "re-export the bundle or upgrade regionkd")
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise _fail(where, "'model' must be an object")
    names = model.get("class_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise _fail(where, "'model.class_names' must be a list of at least two strings")
    if model.get("num_classes", len(names)) != len(names):
        raise _fail(where, f"'model.num_classes' {model.get('num_classes')} != {len(names)} class names")
    prep = manifest.get("preprocessing")
    if not isinstance(prep, dict):
        raise _fail(where, "'preprocessing' must be an object")
    window, size = prep.get("window"), prep.get("input_size")
    if not (isinstance(window, list) and len(window) == 2 and all(isinstance(v, (int, float)) for v in window)
            and window[1] > window[0]):
        raise _fail(where, f"'preprocessing.window' must be [lo, hi] with hi > lo, got {window!r}")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise _fail(where, f"'preprocessing.input_size' must be [H, W] positive integers, got {size!r}")
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise _fail(where, "'files' must be a non-empty list")
    seen = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise _fail(where, f"files[{i}] must be an object")
        for key in ("path", "precision", "backends", "sha256"):
            if key not in entry:
                raise _fail(where, f"files[{i}] has no '{key}'")
        rel = PurePosixPath(entry["path"])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise _fail(where, f"files[{i}].path {entry['path']!r} must be relative and stay inside the bundle")
        if entry["path"] in seen:
            raise _fail(where, f"files[{i}].path {entry['path']!r} is listed twice")
        seen.add(entry["path"])
        if entry["precision"] not in PRECISIONS:
            raise _fail(where, f"files[{i}] ({entry['path']}) has unknown precision {entry['precision']!r}")
        if not (isinstance(entry["backends"], list) and entry["backends"]):
            raise _fail(where, f"files[{i}] ({entry['path']}).backends must be a non-empty list")


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Validate and write `directory/manifest.json` atomically; returns its path."""
    path = Path(directory) / MANIFEST_NAME
    validate_manifest(manifest, str(path))
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


class Bundle:
    """A verified bundle. Attributes: root, manifest, files, class_names, preprocessing."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @property
    def files(self) -> list[dict]:
        return self.manifest["files"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["model"]["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocessing(self) -> dict:
        return self.manifest["preprocessing"]

    @property
    def params(self) -> int | None:
        return self.manifest["model"].get("params")

    @property
    def max_batch(self) -> int | None:
        return (self.manifest.get("io") or {}).get("max_batch")

    @property
    def precisions(self) -> list[str]:
        """Precisions present in the bundle, in PRECISIONS order."""
        present = {e["precision"] for e in self.files}
        return [p for p in PRECISIONS if p in present]

    def select_file(self, precision: str, backend: str, **match: Any) -> dict:
        """The first `files` entry with this precision, usable by `backend`, and equal on every `match` field."""
        for entry in self.files:
            if entry["precision"] == precision and backend in entry["backends"] and \
                    all(entry.get(k) == v for k, v in match.items()):
                return entry
        wanted = ", ".join([f"precision={precision}", f"backend={backend}"] + [f"{k}={v}" for k, v in match.items()])
        have = "; ".join(f"{e['path']} ({e['precision']}, {'/'.join(e['backends'])})" for e in self.files)
        raise BundleError(f"bundle {self.root} has no file for {wanted}; it has: {have}")

    def path_of(self, entry: dict) -> Path:
        return self.root / entry["path"]

    def register_file(self, path: str | os.PathLike, **fields: Any) -> dict:
        """Add (or replace, by path) an entry for a file inside the bundle and rewrite the manifest atomically."""
        entry = file_entry(path, self.root, **fields)
        manifest = copy.deepcopy(self.manifest)
        manifest["files"] = [e for e in manifest["files"] if e["path"] != entry["path"]] + [entry]
        write_manifest(self.root, manifest)
        self.manifest = manifest
        return entry

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, model={self.manifest['model'].get('name')!r}, precisions={self.precisions})"


def read_manifest(root: str | os.PathLike) -> dict:
    """Parse and validate `root/manifest.json` without checking file checksums."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"bundle {root} has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(str(path), f"not valid JSON ({exc})") from None
    validate_manifest(manifest, str(path))
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Check that every listed file exists, has the listed size and the listed sha256."""
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            raise BundleError(f"bundle {root}: file {entry['path']} listed in the manifest is missing")
        size = path.stat().st_size
        if "bytes" in entry and entry["bytes"] != size:
            raise BundleError(f"bundle {root}: file {entry['path']} has {size} bytes, the manifest says "
                              f"{entry['bytes']} (truncated or replaced)")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise BundleError(f"bundle {root}: file {entry['path']} has the wrong checksum "
                              f"(sha256 {actual[:12]}..., manifest {str(entry['sha256'])[:12]}...)")


def load_bundle(root: str | os.PathLike) -> Bundle:
    """Read the manifest, check its format_version and schema, verify every file's sha256."""
    root = Path(root)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    return Bundle(root, manifest)

"""Model bundle: a directory with `manifest.json` (format_version 1) and the model files.

`load_bundle` checks, before anything is loaded: the signature when trusted keys are configured
(`regionkd.sdk.signing`), the manifest against its schema (`regionkd.sdk.manifest_schema`), that
every listed file resolves inside the bundle directory (a symlink pointing out is refused), and
every file's size and sha256. A backend then runs only bytes it got from `Bundle.read_verified`,
which reads a file once and checks those very bytes against the manifest loaded: a file replaced
after `load_bundle()` is refused, never executed. The SDK only ever reads JSON, ONNX and TensorRT
engines from a bundle; it never unpickles anything.
The export writes bundles with `file_entry` + `write_manifest` (or `Bundle.register_file`); the
kinds of file a bundle holds, their names and entry fields, are the rows of `regionkd.sdk.bundle_files`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .bundle_files import PRECISIONS
from .errors import BundleError
from .manifest_schema import FORMAT_VERSION, MAX_MANIFEST_BYTES, check_manifest, parse_manifest_bytes
from .signing import SignatureStatus, check_signature, resolve_trusted_keys

MANIFEST_NAME = "manifest.json"
__all__ = ["FORMAT_VERSION", "PRECISIONS", "MANIFEST_NAME", "Bundle", "load_bundle",
           "read_manifest", "validate_manifest", "write_manifest", "file_entry", "sha256_file", "read_inside"]


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> None:
    """Raise BundleError naming `where` when the manifest does not follow format_version 1
    (the schema lives in `regionkd.sdk.manifest_schema`)."""
    check_manifest(manifest, where)


def _inside(root: Path, rel: str) -> Path:
    """`root/rel` resolved (symlinks followed), refused unless it stays inside the resolved `root`."""
    base = root.resolve()
    full = (base / rel).resolve()
    if full != base and base not in full.parents:
        raise BundleError(f"bundle {root}: {rel} resolves to {full}, outside the bundle directory "
                          "(a symlink pointing out of the bundle is refused)")
    return full


def read_inside(root: Path, rel: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file `rel` inside the bundle `root` (at most `limit` bytes)."""
    full = _inside(Path(root), rel)
    if not full.is_file():
        raise BundleError(f"bundle {root}: {rel} is missing or not a regular file")
    with open(full, "rb") as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise BundleError(f"bundle {root}: {rel} is larger than {limit} bytes")
    return data


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


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Validate and write `directory/manifest.json` atomically; returns its path."""
    path = Path(directory) / MANIFEST_NAME
    validate_manifest(manifest, str(path))
    try:
        text = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise BundleError(f"{path}: malformed manifest: {exc} (NaN and infinity are not JSON)") from None
    if len(text.encode("utf-8")) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: malformed manifest: more than {MAX_MANIFEST_BYTES} bytes")
    atomic_write_text(path, text)
    return path


class Bundle:
    """A verified bundle. Attributes: root, manifest, manifest_bytes (what was parsed and, when
    keys are configured, verified), signature (SignatureStatus), files, class_names, preprocessing."""

    def __init__(self, root: Path, manifest: dict, manifest_bytes: bytes | None = None,
                 signature: SignatureStatus | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.signature = signature or SignatureStatus("unsigned")

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

    def _files_for(self, precision: str, backend: str, graph: str, match: dict):
        """The entries with this precision, usable by `backend`, of this `graph`, equal on every `match` field."""
        return (e for e in self.files if e["precision"] == precision and backend in e["backends"]
                and e.get("graph", "network") == graph and all(e.get(k) == v for k, v in match.items()))

    def select_file(self, precision: str, backend: str, graph: str = "network", **match: Any) -> dict:
        """The first `files` entry with this precision, usable by `backend`, of this `graph` ("network",
        or "fused": pre- and post-processing inside the model), and equal on every `match` field."""
        entry = next(self._files_for(precision, backend, graph, match), None)
        if entry is not None:
            return entry
        wanted = ", ".join([f"precision={precision}", f"backend={backend}", f"graph={graph}"] +
                           [f"{k}={v}" for k, v in match.items()])
        have = "; ".join(f"{e['path']} ({e['precision']}, {'/'.join(e['backends'])})" for e in self.files)
        raise BundleError(f"bundle {self.root} has no file for {wanted}; it has: {have}")

    def has_file(self, precision: str, backend: str, graph: str = "network") -> bool:
        return next(self._files_for(precision, backend, graph, {}), None) is not None

    def path_of(self, entry: dict) -> Path:
        return self.root / entry["path"]

    def read_verified(self, entry: dict) -> bytes:
        """The bytes of `entry`'s file, read once and checked against this bundle's manifest (size
        and sha256): hand exactly these bytes to the runtime. A file replaced or changed since
        `load_bundle()` is refused (BundleError naming it), so it is never executed."""
        if entry not in self.files:
            raise BundleError(f"bundle {self.root}: {entry.get('path')!r} is not a file of this bundle's manifest")
        full = _inside(self.root, entry["path"])
        try:
            with open(full, "rb") as fh:
                data = fh.read(int(entry["bytes"]) + 1)
        except OSError as exc:
            raise BundleError(f"bundle {self.root}: file {entry['path']} cannot be read since the bundle was "
                              f"loaded ({exc.strerror or exc})") from None
        _check_bytes(self.root, entry, data, "since the bundle was loaded")
        return data

    def register_file(self, path: str | os.PathLike, **fields: Any) -> dict:
        """Add (or replace, by path) an entry for a file inside the bundle and rewrite the manifest atomically.
        A signed bundle loaded with its signature verified is never rewritten (the signature would no
        longer match): the entry is added to this object only."""
        entry = file_entry(path, self.root, **fields)
        manifest = copy.deepcopy(self.manifest)
        manifest["files"] = [e for e in manifest["files"] if e["path"] != entry["path"]] + [entry]
        if self.signature.verified:
            validate_manifest(manifest, str(self.root / MANIFEST_NAME))
        else:
            write_manifest(self.root, manifest)
            self.manifest_bytes = None
        self.manifest = manifest
        return entry

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, model={self.manifest['model'].get('name')!r}, precisions={self.precisions})"


def _manifest_bytes(root: Path) -> bytes:
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory")
    path = root / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"bundle {root} has no {MANIFEST_NAME}")
    try:
        return read_inside(root, MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
    except BundleError as exc:
        if "larger than" in str(exc):
            raise BundleError(f"{path}: malformed manifest: larger than {MAX_MANIFEST_BYTES} bytes") from None
        raise


def read_manifest(root: str | os.PathLike) -> dict:
    """Parse and validate `root/manifest.json` without checking file checksums or signature."""
    root = Path(root)
    manifest = parse_manifest_bytes(_manifest_bytes(root), str(root / MANIFEST_NAME))
    validate_manifest(manifest, str(root / MANIFEST_NAME))
    return manifest


def _check_bytes(root: Path, entry: dict, data: bytes, when: str = "") -> None:
    if len(data) != entry["bytes"]:
        size = f"more than {entry['bytes']}" if len(data) > entry["bytes"] else str(len(data))
        raise BundleError(f"bundle {root}: file {entry['path']} has {size} bytes, the manifest says {entry['bytes']} "
                          f"(truncated or replaced{' ' + when if when else ''})")
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"].lower():
        raise BundleError(f"bundle {root}: file {entry['path']} has the wrong checksum (sha256 {actual[:12]}..., "
                          f"manifest {entry['sha256'][:12]}...){' (changed ' + when + ')' if when else ''}")


def verify_files(root: Path, manifest: dict) -> None:
    """Check that every listed file resolves inside the bundle, exists, and has the listed size and sha256."""
    for entry in manifest["files"]:
        full = _inside(root, entry["path"])
        if not full.is_file():
            raise BundleError(f"bundle {root}: file {entry['path']} listed in the manifest is missing")
        size = full.stat().st_size
        if entry["bytes"] != size:
            raise BundleError(f"bundle {root}: file {entry['path']} has {size} bytes, the manifest says "
                              f"{entry['bytes']} (truncated or replaced)")
        actual = sha256_file(full)
        if actual != entry["sha256"].lower():
            raise BundleError(f"bundle {root}: file {entry['path']} has the wrong checksum "
                              f"(sha256 {actual[:12]}..., manifest {str(entry['sha256'])[:12]}...)")


def load_bundle(root: str | os.PathLike, trusted_keys=None) -> Bundle:
    """Load a bundle, checking everything before any model is loaded (see the module doc).

    trusted_keys: public key files (or signing.TrustedKey) whose signature is required; the keys
    named by REGIONKD_TRUSTED_KEYS are always added. With no key at all the signature is not
    required and `bundle.signature` says whether the bundle was signed."""
    root = Path(root)
    raw = _manifest_bytes(root)
    signature = check_signature(root, raw, resolve_trusted_keys(trusted_keys))
    where = str(root / MANIFEST_NAME)
    manifest = parse_manifest_bytes(raw, where)
    validate_manifest(manifest, where)
    verify_files(root, manifest)
    return Bundle(root, manifest, manifest_bytes=raw, signature=signature)

"""Assemble a model bundle (format_version 1, described in docs/ARCHITECTURE.md).

Everything is written into a temporary sibling directory that is renamed into place only when
the whole export succeeded (`regionkd.sdk.atomic.atomic_directory`): an interrupted or refused
export leaves no half bundle, and an existing bundle is replaced only with `overwrite`.
The manifest is validated and checksummed with the SDK's own `regionkd.sdk.bundle` helpers, so
what the export writes is exactly what `load_bundle` accepts.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import Iterator

from regionkd.sdk.atomic import atomic_directory
from regionkd.sdk.bundle import FORMAT_VERSION, file_entry, sha256_file, write_manifest
from regionkd.sdk.bundle_files import FileKind
from regionkd.sdk.errors import BundleError


@contextlib.contextmanager
def bundle_directory(final, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` when the block succeeds (and vanishes if not)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise BundleError(f"{final} exists and is not a directory")
    if final.exists() and not overwrite:
        raise FileExistsError(f"bundle directory {final} already exists (pass --overwrite to replace it)")
    with atomic_directory(final, overwrite=overwrite, clean_stale=True) as tmp:   # a killed export's leftovers go
        yield tmp


def model_section(ckpt: dict, params: int, name: str | None = None, gflops_per_slice: float | None = None) -> dict:
    section = {"name": name or f"{ckpt.get('task', 'model')}-{ckpt['arch']}", "arch": ckpt["arch"],
               "role": ckpt.get("role"), "task": ckpt.get("task"), "num_classes": int(ckpt["num_classes"]),
               "class_names": list(ckpt["class_names"]), "params": int(params)}
    if gflops_per_slice is not None:
        section["gflops_per_slice"] = float(gflops_per_slice)
    return section


def organ_components(ckpt: dict) -> dict[int, int]:
    """{organ label: connected components the runtime keeps} of the checkpoint's task (two for the
    kidneys), or, for a checkpoint of no known task, what the SDK would guess from the class names
    (`regionkd.sdk.segmenter.default_organ_labels`): worked out once here and written, so no runtime
    has to guess."""
    from regionkd.train.data.tasks import TASKS

    if ckpt.get("task") in TASKS:
        from regionkd.train.torch_backend import organ_components_of

        return organ_components_of(ckpt["task"])
    from regionkd.sdk.segmenter import default_organ_labels

    return default_organ_labels(ckpt["class_names"])


def preprocessing_section(ckpt: dict, largest_component_labels=None) -> dict:
    """The checkpoint's preprocessing, with the contract's defaults filled in, and the organ
    labels whose largest component(s) the runtime keeps: `largest_component_labels` as given, or
    `organ_components(ckpt)` with `largest_component_counts` for an organ of two (the kidneys)."""
    pre = dict(ckpt["preprocessing"])
    out = {"window": [float(v) for v in pre["window"]], "input_size": [int(v) for v in pre["input_size"]],
           "orientation": pre.get("orientation", "RAS"), "slice_axis": pre.get("slice_axis", "axial"),
           "normalisation": pre.get("normalisation", {"type": "window-linear", "range": [-1, 1]})}
    if largest_component_labels is None:
        organs = organ_components(ckpt)
        out["largest_component_labels"] = sorted(organs)
        counts = {str(k): n for k, n in sorted(organs.items()) if n != 1}
        if counts:
            out["largest_component_counts"] = counts
    else:
        out["largest_component_labels"] = list(largest_component_labels)
    if pre.get("spacing"):   # the training data's voxel sizes: the SDK warns when an input is far from them
        out["spacing"] = {k: [float(v) for v in pre["spacing"][k]] for k in ("in_plane_mm", "slice_thickness_mm")
                          if k in pre["spacing"]}
    return out


def base_name(path) -> str | None:
    """The last part of a path ('/home/me/data/lits' -> 'lits'): a manifest names files and
    folders, it never records the exporting machine's absolute paths."""
    if path in (None, ""):
        return None
    text = str(path).rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or text


def provenance_section(ckpt: dict, ckpt_path, package_version: str) -> dict:
    """Where the model came from: the checkpoint file (name and sha256), its teacher (name, sha256,
    arch), KD terms and weights, the training data's folder name. Names only, no absolute paths."""
    src = dict(ckpt.get("provenance") or {})
    teacher = src.get("teacher")
    if isinstance(teacher, dict):
        teacher = {"name": base_name(teacher.get("path") or teacher.get("name")), "sha256": teacher.get("sha256"),
                   "arch": teacher.get("arch")}
    elif teacher is not None:
        teacher = base_name(teacher)
    out = {"checkpoint": {"name": Path(ckpt_path).name, "sha256": sha256_file(ckpt_path)},
           "teacher": teacher, "kd": list(src.get("kd") or []),
           "alpha": src.get("alpha"), "beta1": src.get("beta1"), "beta2": src.get("beta2"),
           "temperature": src.get("temperature"), "data": base_name(src.get("data")), "seed": src.get("seed"),
           "training_package_version": src.get("package_version"), "trained": src.get("date"),
           "package_version": package_version,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if src.get("unlabelled"):
        out["unlabelled"] = base_name(src["unlabelled"])
    return out


#: the metadata fields regionkd-export sets (MONAI bundle metadata.json names, plus license)
METADATA_FIELDS = ("version", "description", "authors", "copyright", "license", "intended_use", "references",
                   "task", "data_source")


def metadata_section(**fields) -> dict:
    """The manifest's `metadata`: the fields given (None and empty left out)."""
    out = {}
    for key, value in fields.items():
        if key not in METADATA_FIELDS:
            raise BundleError(f"unknown metadata field {key!r}; known: {', '.join(METADATA_FIELDS)}")
        if value in (None, "", [], ()):
            continue
        out[key] = [str(v) for v in value] if key == "references" else str(value)
    return out


def onnx_entry(root, kind: FileKind, **extra) -> dict:
    """Manifest entry of the ONNX file of `kind` (a row of regionkd.sdk.bundle_files), checksummed now;
    `extra` adds or overrides fields."""
    if kind.format != "onnx":
        raise BundleError(f"{kind.key} is not an ONNX kind of bundle file")
    return file_entry(Path(root) / kind.path(), root, **{**kind.manifest_fields(), **extra})


def write_bundle_manifest(root, *, model: dict, preprocessing: dict, files: list, metrics: dict,
                          provenance: dict, max_batch: int, extra: dict | None = None) -> dict:
    """Build the manifest, validate it with the SDK's schema and write it atomically; returns it."""
    manifest = {"format_version": FORMAT_VERSION, "model": model, "preprocessing": preprocessing,
                "io": {"input": "image", "output": "logits", "max_batch": int(max_batch)},
                "files": files, "metrics": metrics, "provenance": provenance}
    manifest.update(extra or {})
    write_manifest(root, manifest)
    return manifest

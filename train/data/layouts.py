"""Dataset layouts on disk (LiTS, KiTS19, MSD / nnU-Net raw): writers, layout detection, and
`open_dataset(root)`, which yields validated cases in canonical orientation.

- LiTS: `volume-N.nii` + `segmentation-N.nii` (anywhere below the root, as in the "Training
  Batch 1/2" folders of the release); task liver. Written in LPS voxel order.
- KiTS19: `case_00000/imaging.nii.gz` + `segmentation.nii.gz` (directly in the root or in
  `root/data/`); task kidney. Slice axis first, as in the real files (axis codes I, P, L).
- MSD / nnU-Net raw: `imagesTr/<id>_0000.nii.gz` (the MSD originals without `_0000` are read
  too), `labelsTr/<id>.nii.gz`, `dataset.json`; task from the label names in dataset.json.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

from regionkd.sdk.atomic import atomic_write_text
from regionkd.sdk.errors import InputError
from regionkd.sdk.orientation import RAS, CanonicalVolume
from regionkd.sdk.volume_io import read_nifti, write_nifti

from .tasks import TASKS, Task, get_task

LAYOUTS = ("lits", "kits19", "msd")
LAYOUT_TASK = {"lits": "liver", "kits19": "kidney"}
# voxel order each layout is written in (what the public files use)
LAYOUT_AXCODES = {"lits": ("L", "P", "S"), "kits19": ("I", "P", "L"), "msd": ("R", "A", "S")}
MSD_PREFIX = {"liver": "liver", "kidney": "kidney"}
AFFINE_ATOL_MM = 1e-3


def from_canonical(data: np.ndarray, affine: np.ndarray, axcodes) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a canonical (RAS) array into the voxel order `axcodes`, with the matching affine."""
    ornt = nio.ornt_transform(RAS, nio.axcodes2ornt(tuple(axcodes)))
    out = nio.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), np.asarray(affine, float) @ nio.inv_ornt_aff(ornt, data.shape)


# ----------------------------------------------------------------------------- writing

def case_paths(root, layout: str, index: int, task: str | None = None) -> tuple[str, Path, Path]:
    """(case id, image path, label path) of case `index` in a dataset of that layout."""
    root = Path(root)
    if layout == "lits":
        return str(index), root / f"volume-{index}.nii", root / f"segmentation-{index}.nii"
    if layout == "kits19":
        cid = f"case_{index:05d}"
        return cid, root / cid / "imaging.nii.gz", root / cid / "segmentation.nii.gz"
    if layout == "msd":
        cid = f"{MSD_PREFIX[task or 'liver']}_{index:03d}"
        return cid, root / "imagesTr" / f"{cid}_0000.nii.gz", root / "labelsTr" / f"{cid}.nii.gz"
    raise InputError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")


def write_case(root, layout: str, index: int, hu: np.ndarray, label: np.ndarray, affine: np.ndarray,
               task: str | None = None) -> str:
    """Write one case given in canonical (RAS) order: int16 image, uint8 label, in the layout's
    file names and voxel order. Returns the case id. Any task can be written in any layout (a
    liver case in the KiTS19 layout tests slice-axis-first reading); `task` names MSD cases."""
    cid, image_path, label_path = case_paths(root, layout, index, task)
    codes = LAYOUT_AXCODES[layout]
    img, aff = from_canonical(np.asarray(hu, np.int16), affine, codes)
    lab, _ = from_canonical(np.asarray(label, np.uint8), affine, codes)
    write_nifti(image_path, img, aff)
    write_nifti(label_path, lab, aff)
    return cid


def write_image(path, layout: str, hu: np.ndarray, affine: np.ndarray) -> str:
    """Write a canonical (RAS) CT image alone, int16, in the layout's voxel order; returns its name."""
    img, aff = from_canonical(np.asarray(hu, np.int16), affine, LAYOUT_AXCODES[layout])
    write_nifti(path, img, aff)
    return Path(path).name


def write_dataset_json(root, task: str, case_ids, description: str = "") -> Path:
    """nnU-Net v2 style dataset.json (with the MSD fields `name`, `modality`, `training` too)."""
    t = get_task(task)
    meta = {
        "name": f"regionkd-{task}",
        "description": description,
        "channel_names": {"0": "CT"},
        "modality": {"0": "CT"},
        "labels": {name: value for name, value in zip(t.class_names, t.label_values)},
        "numTraining": len(case_ids),
        "file_ending": ".nii.gz",
        "training": [{"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"} for cid in case_ids],
    }
    path = Path(root) / "dataset.json"
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- reading

@dataclass
class Case:
    """One validated case: canonical image and label (see docs/ARCHITECTURE.md)."""

    case_id: str
    image_path: Path
    label_path: Path
    volume: CanonicalVolume      # .data float32 HU (x, y, z), .affine, .spacing, .to_original()
    label: np.ndarray            # uint8 (x, y, z), canonical
    task: str


def load_case(case_id: str, image_path, label_path, task: Task, affine_atol: float = AFFINE_ATOL_MM) -> Case:
    """Read image and label, check they belong together and that the labels are the task's."""
    image = read_nifti(image_path, kind="image")
    label = read_nifti(label_path, kind="label")
    if image.shape != label.shape:
        raise InputError(f"case {case_id}: image {image.path} has shape {image.shape} but label "
                         f"{label.path} has shape {label.shape}")
    if not np.allclose(image.affine, label.affine, atol=affine_atol, rtol=0):
        raise InputError(f"case {case_id}: image {image.path} and label {label.path} have different affines "
                         f"(max difference {np.abs(image.affine - label.affine).max():.4g} mm):\n"
                         f"image\n{image.affine}\nlabel\n{label.affine}")
    values = np.unique(label.data)
    unknown = sorted(set(int(v) for v in values) - set(task.label_values))
    if unknown:
        raise InputError(f"case {case_id}: label {label.path} has values {unknown} outside the {task.name} "
                         f"task's label set {list(task.label_values)} ({', '.join(task.class_names)})")
    volume = image.canonical()
    canon_label = np.ascontiguousarray(nio.apply_orientation(label.data, volume.ornt)).astype(np.uint8)
    return Case(case_id, image.path, label.path, volume, canon_label, task.name)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


class Dataset:
    """Cases of one dataset root; paths are found up front, volumes read on `load_case`."""

    def __init__(self, root: Path, layout: str, task: str, pairs: dict[str, tuple[Path, Path]]):
        self.root, self.layout, self.task = root, layout, task
        self._pairs = pairs
        self.case_ids = sorted(pairs, key=_natural_key)

    @property
    def task_spec(self) -> Task:
        return TASKS[self.task]

    def __len__(self) -> int:
        return len(self.case_ids)

    def paths(self, case_id: str) -> tuple[Path, Path]:
        try:
            return self._pairs[case_id]
        except KeyError:
            raise InputError(f"{self.root}: no case {case_id!r} in this {self.layout} dataset") from None

    def load_case(self, case_id: str) -> Case:
        image_path, label_path = self.paths(case_id)
        return load_case(case_id, image_path, label_path, self.task_spec)

    def __repr__(self) -> str:
        return f"Dataset(root={str(self.root)!r}, layout={self.layout!r}, task={self.task!r}, cases={len(self)})"


def _lits_pairs(root: Path) -> dict:
    pairs = {}
    for vol in root.rglob("volume-*.nii*"):
        m = re.fullmatch(r"volume-(\d+)\.nii(\.gz)?", vol.name)
        if not m:
            continue
        cands = [vol.with_name(f"segmentation-{m.group(1)}.nii{ext}") for ext in ("", ".gz")]
        cands += [p for p in root.rglob(f"segmentation-{m.group(1)}.nii*")]
        seg = next((p for p in cands if p.exists()), None)
        if seg is None:
            raise InputError(f"{vol}: no segmentation-{m.group(1)}.nii(.gz) next to it or under {root}")
        pairs[m.group(1)] = (vol, seg)
    return pairs


def _kits_dir(root: Path) -> Path | None:
    for base in (root, root / "data"):
        if base.is_dir() and any(p.is_dir() and p.name.startswith("case_") for p in base.iterdir()):
            return base
    return None


def _kits_pairs(base: Path) -> dict:
    pairs = {}
    for d in sorted(base.glob("case_*")):
        if not d.is_dir():
            continue
        img, seg = d / "imaging.nii.gz", d / "segmentation.nii.gz"
        if not img.exists():
            raise InputError(f"{d}: KiTS19 case folder without imaging.nii.gz")
        if not seg.exists():
            raise InputError(f"{d}: KiTS19 case folder without segmentation.nii.gz (unlabelled test case?)")
        pairs[d.name] = (img, seg)
    return pairs


def _msd_task(meta: dict, path: Path) -> str:
    labels = meta.get("labels", {})
    names = [str(k) if not str(k).isdigit() else str(v) for k, v in labels.items()]
    words = " ".join(names + [str(meta.get("name", ""))]).lower()
    for task in ("liver", "kidney"):
        if task in words:
            return task
    raise InputError(f"{path}: cannot tell the task from labels {labels} and name {meta.get('name')!r} "
                     f"(expected a 'liver' or 'kidney' label)")


def _msd_pairs(root: Path) -> dict:
    pairs = {}
    for img in sorted((root / "imagesTr").glob("*.nii*")):
        if img.name.startswith("."):
            continue
        m = re.fullmatch(r"(.+?)(_0000)?\.nii(\.gz)?", img.name)
        if not m:
            continue
        if re.fullmatch(r".+_\d{4}", m.group(1)) and not m.group(2):
            raise InputError(f"{img}: only single-channel CT (_0000) is supported")
        cid = m.group(1)
        cands = [root / "labelsTr" / f"{cid}.nii.gz", root / "labelsTr" / f"{cid}.nii"]
        seg = next((p for p in cands if p.exists()), None)
        if seg is None:
            raise InputError(f"{img}: no label {cands[0].name} in {root / 'labelsTr'}")
        pairs[cid] = (img, seg)
    return pairs


def detect_layout(root) -> str:
    """'lits', 'kits19' or 'msd' from what is in `root`; InputError if none fits."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder does not exist")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    if _kits_dir(root) is not None:
        return "kits19"
    if next(root.rglob("volume-*.nii*"), None) is not None:
        return "lits"
    raise InputError(f"{root}: not a LiTS (volume-N.nii), KiTS19 (case_00000/imaging.nii.gz) or "
                     "MSD/nnU-Net (dataset.json + imagesTr/) dataset")


def open_dataset(root, task: str | None = None) -> Dataset:
    """Detect the layout of `root` and list its cases (nothing is read until `load_case`).
    The task comes from the layout (LiTS liver, KiTS19 kidney, MSD from dataset.json) unless
    `task` says otherwise."""
    root = Path(root)
    if task is not None:
        get_task(task)
    layout = detect_layout(root)
    if layout == "lits":
        pairs, detected = _lits_pairs(root), LAYOUT_TASK["lits"]
    elif layout == "kits19":
        pairs, detected = _kits_pairs(_kits_dir(root)), LAYOUT_TASK["kits19"]
    else:
        meta_path = root / "dataset.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{meta_path}: unreadable dataset.json ({exc})") from exc
        pairs, detected = _msd_pairs(root), _msd_task(meta, meta_path)
    if not pairs:
        raise InputError(f"{root}: {layout} dataset without any labelled case")
    return Dataset(root, layout, task or detected, pairs)


# ----------------------------------------------------------------------------- images without labels

class ImageSet:
    """CT images without labels (for distillation from unlabelled scans): case id -> image path.
    Nothing but the images is ever opened."""

    def __init__(self, root: Path, layout: str, paths: dict[str, Path]):
        self.root, self.layout, self._paths = root, layout, paths
        self.case_ids = sorted(paths, key=_natural_key)

    def __len__(self) -> int:
        return len(self.case_ids)

    def path(self, case_id: str) -> Path:
        try:
            return self._paths[case_id]
        except KeyError:
            raise InputError(f"{self.root}: no image {case_id!r}") from None

    def load_image(self, case_id: str) -> CanonicalVolume:
        return read_nifti(self.path(case_id), kind="image").canonical()

    def __repr__(self) -> str:
        return f"ImageSet(root={str(self.root)!r}, layout={self.layout!r}, images={len(self)})"


_NIFTI = re.compile(r"(.+?)\.nii(\.gz)?")


def _image_paths(root: Path, layout: str) -> dict[str, Path]:
    if layout == "msd":   # training and test images; labelsTr is never looked at
        out = {}
        for sub in ("imagesTr", "imagesTs"):
            for img in sorted((root / sub).glob("*.nii*")):
                m = re.fullmatch(r"(.+?)(_0000)?\.nii(\.gz)?", img.name)
                if m and not img.name.startswith(".") and not (re.fullmatch(r".+_\d{4}", m.group(1)) and not m.group(2)):
                    out[f"{sub}/{m.group(1)}"] = img
        return out
    if layout == "kits19":
        return {d.name: d / "imaging.nii.gz" for d in sorted(_kits_dir(root).glob("case_*"))
                if (d / "imaging.nii.gz").is_file()}
    if layout == "lits":   # training volumes and the test batch's test-volume-N.nii
        out = {}
        for vol in root.rglob("*volume-*.nii*"):
            m = re.fullmatch(r"(test-)?volume-(\d+)\.nii(\.gz)?", vol.name)
            if m:
                out[f"{m.group(1) or ''}{m.group(2)}"] = vol
        return out
    out = {}
    for p in sorted(root.rglob("*.nii*")):
        m = _NIFTI.fullmatch(p.name)
        if m and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            out[str(p.relative_to(root).with_name(m.group(1)))] = p
    return out


def open_images(root) -> ImageSet:
    """The CT images under `root`, labels never read: a LiTS (training or test batch), KiTS19 or
    MSD/nnU-Net folder (imagesTr and imagesTs), or any folder of NIfTI files, each of which is
    taken to be a CT image."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: image folder does not exist")
    if (root / "dataset.json").is_file() and ((root / "imagesTr").is_dir() or (root / "imagesTs").is_dir()):
        layout = "msd"
    elif _kits_dir(root) is not None:
        layout = "kits19"
    elif next(root.rglob("*volume-*.nii*"), None) is not None:
        layout = "lits"
    else:
        layout = "folder"
    paths = _image_paths(root, layout)
    if not paths:
        raise InputError(f"{root}: no CT image (.nii or .nii.gz) found")
    return ImageSet(root, layout, paths)

"""Training checkpoints, format `regionkd-checkpoint/1` (docs/ARCHITECTURE.md): what one holds
(`build_checkpoint`), writing, reading and checking one, and whether a run may resume from it.

A checkpoint is a `torch.save`d dict of plain types only, so it loads with
`torch.load(weights_only=True)`: no pickled classes are ever executed when a checkpoint is read.
It is written atomically, so a run killed while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

from regionkd.sdk.atomic import atomic_path
from regionkd.sdk.errors import InputError, require

from .config import DISTILL_ONLY, RESUME_IDENTITY, TrainConfig, field_defaults

FORMAT = "regionkd-checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "role", "num_classes", "class_names", "task", "preprocessing", "model_state")
ROLES = ("teacher", "student")


class CheckpointError(InputError):
    """A checkpoint file that is missing, corrupt, of an unknown format or inconsistent."""


def log_path_for(ckpt_path: str | os.PathLike) -> Path:
    """The JSON-lines training log that lives beside a checkpoint: `teacher.pt` -> `teacher.log.jsonl`."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + ".log.jsonl")


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Validate `ckpt` and write it atomically (temp file + rename) to `path`."""
    torch = require("torch", extra="train", purpose="writing checkpoints")
    ckpt = dict(ckpt)
    ckpt.setdefault("format", FORMAT)
    _validate(ckpt, Path(path))
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with `weights_only=True`; CheckpointError naming the file and the problem."""
    torch = require("torch", extra="train", purpose="reading checkpoints")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: file is empty")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle/EOF errors differ by torch version; all mean "not readable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable regionkd checkpoint "
                              f"(corrupt, truncated or not a weights-only torch file): {first}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(ckpt).__name__}")
    _validate(ckpt, path)
    return ckpt


def load_model(path: str | os.PathLike, device="cpu"):
    """Rebuild the network a checkpoint describes, load its weights; returns (model in eval mode, ckpt)."""
    from regionkd.train.models import create_model

    ckpt = load_checkpoint(path)
    try:
        model = create_model(ckpt["arch"], num_classes=int(ckpt["num_classes"]))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    try:
        model.load_state_dict(ckpt["model_state"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit architecture "
                              f"{ckpt['arch']!r}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    return model, ckpt


def _validate(ckpt: dict, path: Path) -> None:
    fmt = ckpt.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {fmt!r} (this version reads {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing keys {missing}")
    if ckpt["role"] not in ROLES:
        raise CheckpointError(f"checkpoint {path}: role must be one of {ROLES}, got {ckpt['role']!r}")
    if len(ckpt["class_names"]) != int(ckpt["num_classes"]):
        raise CheckpointError(f"checkpoint {path}: {len(ckpt['class_names'])} class names for "
                              f"num_classes={ckpt['num_classes']}")
    pre = ckpt["preprocessing"]
    if not isinstance(pre, dict) or "window" not in pre or "input_size" not in pre:
        raise CheckpointError(f"checkpoint {path}: preprocessing must hold 'window' and 'input_size'")


def build_checkpoint(cfg: TrainConfig, net, class_names, task: str, window, train_state: dict,
                     metrics: dict, t_ckpt: dict | None, spacing: dict | None = None) -> dict:
    """The checkpoint of network `net` trained as `cfg` says (`t_ckpt`: its teacher's checkpoint,
    or None), with the run's `train_state` for --resume."""
    from regionkd.sdk.bundle import sha256_file

    teacher = None
    if t_ckpt is not None:
        teacher = {"path": str(Path(cfg.teacher).resolve()), "sha256": sha256_file(cfg.teacher), "arch": t_ckpt["arch"]}
    distilled = cfg.mode == "distill"
    preprocessing = {"window": [float(v) for v in window], "input_size": [cfg.input_size, cfg.input_size],
                     "orientation": "RAS", "slice_axis": "axial",
                     "normalisation": {"type": "window-linear", "range": [-1, 1]}}
    if spacing:   # voxel sizes of the training cases: the bundle's preprocessing.spacing
        preprocessing["spacing"] = spacing
    return {
        "format": FORMAT,
        "arch": cfg.arch,
        "role": "teacher" if cfg.mode == "teacher" else "student",
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "task": task,
        "preprocessing": preprocessing,
        "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "train_state": train_state,
        "provenance": {"teacher": teacher, "kd": list(cfg.kd) if distilled else [],
                       "kd_levels": list(cfg.kd_levels) if distilled else [],
                       "alpha": cfg.alpha, "beta1": cfg.beta1, "beta2": cfg.beta2, "temperature": cfg.temperature,
                       "pmd_balance": cfg.pmd_balance if distilled else None,
                       "unlabelled": str(Path(cfg.unlabelled).resolve()) if distilled and cfg.unlabelled else None,
                       "labelled_cases": cfg.labelled_cases,
                       "data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "package_version": package_version(),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "metrics": metrics,
        "config": cfg.to_flat_dict(),
    }


def params_sha256(net) -> str:
    """Digest of the trainable parameters (not BN buffers, which DDP ranks keep per process)."""
    h = hashlib.sha256()
    for _, p in net.named_parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("regionkd")
    except Exception:
        return "unknown"


def check_resumable(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    """CheckpointError unless the run `cfg` describes is the one that wrote `ckpt`."""
    # an option the checkpoint does not record is one added since: it ran with that option's default
    defaults = field_defaults()
    old = {k: ckpt.get("config", {}).get(k, defaults.get(k)) for k in RESUME_IDENTITY}
    new = cfg.to_flat_dict()
    keys = [k for k in RESUME_IDENTITY if cfg.mode == "distill" or k not in DISTILL_ONLY]  # others mean nothing there
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise CheckpointError(f"--resume {path}: the checkpoint was written with other options ({'; '.join(diff)})")
    if "train_state" not in ckpt:
        raise CheckpointError(f"--resume {path}: the checkpoint holds no training state")

"""The teacher cache: the frozen teacher's outputs per training slice and orientation, computed
once and read back by every later distillation run.

Why per slice: a distillation step spends most of its time in the teacher's forward pass (at
96x96, batch 8, one thread: UNet forward about as long as a whole MobileNetV2 training step).
What the teacher is shown for a drawn slice is that slice in the orientation the step drew (one
of 8 flips/quarter turns), without the student's intensity jitter (`slices.SliceDataset.view`).
There are only 8 such views of a slice, and they depend neither on the run's seed nor on the
student, the KD terms or their weights, so one cache serves every run with the same teacher and
slices: all seeds, both students, every setting, and every labelled subset.

An entry is keyed by the slice (a digest of its case's slice-cache record, which covers the
source file's size and mtime, the HU window and the input size), its index z in the case, and
the orientation. What is stored is the teacher's side of the losses (`distill_loss.TeacherTargets`):
logits and the importance map of each feature level in float16, region affinities and presence
per level. Every run that uses the cache, including the one that fills it, trains on the stored
values, so filling and reading give the very same run; the effect of the float16 rounding on
the loss values is checked in tests/test_distillation_modes.py (well under 0.1%).

Layout: `DIR/<teacher digest>/key.json` and `chunk-*/` folders, each written to a temporary
name and renamed when complete, holding `items.json` (the keys, in row order) and one .npy per
array with the item as first axis. Two runs that fill at the same time may compute an item
twice; either copy is the same numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from regionkd.sdk.atomic import atomic_directory, atomic_write_text
from regionkd.sdk.bundle import sha256_file

from .config import FEATURE_LEVELS
from .distill_loss import TeacherTargets

FORMAT = "regionkd-teacher-cache/2"
FILL_BATCH = 32     # slices per teacher forward pass while filling


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def case_tag(slice_cache, case_id: str) -> str:
    """Digest of one case's slices: its slice-cache record (source stamp, spacing, slices) plus
    the cache's task, window, input size and whether labels are part of it."""
    meta = slice_cache.meta
    return _digest({"case": meta["cases"][case_id], "task": meta["task"], "window": meta["window"],
                    "input_size": meta["input_size"], "labelled": meta.get("labelled", True)})


class TeacherCache:
    """The stored teacher targets of one teacher checkpoint at one input size."""

    def __init__(self, root, teacher_path, input_size: int):
        self.key = {"format": FORMAT, "teacher_sha256": sha256_file(teacher_path), "input_size": int(input_size)}
        self.dir = Path(root) / _digest(self.key)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").is_file():
            atomic_write_text(self.dir / "key.json", json.dumps(self.key, indent=1) + "\n")
        self._index: dict[str, tuple[str, int]] = {}
        self._chunks: dict[str, dict] = {}
        self._tags: dict = {}
        self.stats = {"items_filled": 0, "fill_s": 0.0, "items_read": 0, "read_s": 0.0}
        self.refresh()

    def refresh(self) -> None:
        """Pick up chunks written since the last look (by this run or another one)."""
        for d in sorted(self.dir.glob("chunk-*")):
            if d.name in self._chunks or not (d / "items.json").is_file():
                continue
            self._chunks[d.name] = {}
            for row, key in enumerate(json.loads((d / "items.json").read_text())):
                self._index.setdefault(key, (d.name, row))

    def item_key(self, dataset, index: int, orientation: int) -> str:
        cid, z = dataset.slice_key(index)
        tag_key = (id(dataset.cache), cid)
        if tag_key not in self._tags:
            self._tags[tag_key] = case_tag(dataset.cache, cid)
        return f"{self._tags[tag_key]}/{z}/{int(orientation)}"

    def missing(self, keys) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def add(self, keys: list[str], targets: TeacherTargets) -> None:
        """Store the targets of `keys` (one row each) as one new chunk."""
        arrays = {"logits": targets.logits.cpu().numpy().astype(np.float16)}
        for lv in FEATURE_LEVELS:
            arrays[f"imd-{lv}"] = targets.imd[lv].cpu().numpy().astype(np.float16)
            aff, present = targets.rad[lv]
            arrays[f"rad-{lv}"] = aff.cpu().numpy().astype(np.float32)
            arrays[f"radp-{lv}"] = present.cpu().numpy().astype(bool)
        name = f"chunk-{time.time_ns():x}-{os.getpid()}"
        with atomic_directory(self.dir / name) as tmp:
            for k, a in arrays.items():
                np.save(tmp / f"{k}.npy", a)
            (tmp / "items.json").write_text(json.dumps(list(keys)))
        self.refresh()

    def fill(self, keys: list[str], compute) -> int:
        """Compute (`compute(positions) -> TeacherTargets` for positions into `keys`) and store
        every key not yet stored; returns how many were computed."""
        t0 = time.perf_counter()
        self.refresh()
        todo = self.missing(keys)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        for start in range(0, len(todo), FILL_BATCH * 8):
            part = todo[start:start + FILL_BATCH * 8]
            pieces = [compute([first[k] for k in part[i:i + FILL_BATCH]]) for i in range(0, len(part), FILL_BATCH)]
            self.add(part, concat_targets(pieces))
        self.stats["items_filled"] += len(todo)
        self.stats["fill_s"] += time.perf_counter() - t0
        return len(todo)

    def _arrays(self, chunk: str) -> dict:
        arrays = self._chunks[chunk]
        if not arrays:
            arrays.update({p.stem: np.load(p, mmap_mode="r") for p in (self.dir / chunk).glob("*.npy")})
        return arrays

    def gather(self, keys: list[str]) -> TeacherTargets:
        """The stored targets of `keys`, stacked in that order (all must be stored)."""
        t0 = time.perf_counter()
        rows = [self._index[k] for k in keys]

        def stack(name, dtype=torch.float32):
            return torch.from_numpy(np.stack([self._arrays(c)[name][r] for c, r in rows])).to(dtype)

        out = TeacherTargets(stack("logits"), {lv: stack(f"imd-{lv}") for lv in FEATURE_LEVELS},
                             {lv: (stack(f"rad-{lv}"), stack(f"radp-{lv}", torch.bool)) for lv in FEATURE_LEVELS})
        self.stats["items_read"] += len(keys)
        self.stats["read_s"] += time.perf_counter() - t0
        return out

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.rglob("*.npy"))

    def summary(self) -> dict:
        return {"dir": str(self.dir), "items": len(self._index), "bytes": self.nbytes(),
                **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.stats.items()}}


def concat_targets(parts: list[TeacherTargets]) -> TeacherTargets:
    return TeacherTargets(torch.cat([p.logits for p in parts]),
                          {lv: torch.cat([p.imd[lv] for p in parts]) for lv in FEATURE_LEVELS},
                          {lv: (torch.cat([p.rad[lv][0] for p in parts]), torch.cat([p.rad[lv][1] for p in parts]))
                           for lv in FEATURE_LEVELS})

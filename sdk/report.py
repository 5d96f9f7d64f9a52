"""`regionkd-segment --report run.json`: a machine-readable record of a run, one entry per input.

Format `regionkd-run-report/1`:
{"format": "regionkd-run-report/1", "regionkd": "0.1.0", "bundle": "...", "backend": "onnxruntime",
 "precision": "fp32", "output_type": "nifti", "started": "2026-...Z", "seconds": 1.2,
 "summary": {"inputs": 2, "ok": 1, "failed": 1, "with_warnings": 0},
 "inputs": [{"input": "ct/", "status": "ok", "outputs": {"nifti": "...", "dicom-seg": "...", "statistics": "...",
             "preview": "...", "pacs": {...}}, "shape": [512, 512, 100], "timings_ms": {...}, "warnings": [],
             "statistics": {...} | null, "error": null}, ...]}
Written atomically when the run ends, also when inputs failed.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

from .atomic import atomic_write_text

FORMAT = "regionkd-run-report/1"


class RunReport:
    """Collects one record per input; `write()` does nothing when no path was given."""

    def __init__(self, path: Path | None, **settings):
        self.path = Path(path) if path is not None else None
        self.settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}
        self.backend = settings.get("backend")
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._t0 = time.perf_counter()
        self.records: list[dict] = []

    def add(self, name: str, status: str, result=None, outputs: dict | None = None, error: str | None = None,
            extra_timings: dict | None = None) -> dict:
        record = {"input": str(name), "status": status, "outputs": dict(outputs or {}), "shape": None,
                  "timings_ms": None, "warnings": [], "statistics": None, "error": error}
        if result is not None:
            timings = {k: round(float(v), 3) for k, v in result.timings.items() if k != "slices"}
            timings.update({f"pacs_{k}": round(float(v), 3) for k, v in (extra_timings or {}).items()})
            record.update(shape=list(result.mask.shape), timings_ms=timings, slices=result.num_slices,
                          warnings=list(result.warnings), statistics=result.statistics,
                          obliquity_deg=result.obliquity_deg, axial_axis=result.axial_axis,
                          spacing_mm=list(result.spacing_mm), bundle_signature=result.bundle_signature)
        self.records.append(record)
        return record

    def as_dict(self) -> dict:
        from . import __version__

        ok = sum(r["status"] == "ok" for r in self.records)
        return {"format": FORMAT, "regionkd": __version__, **self.settings, "backend": self.backend,
                "started": self.started, "seconds": round(time.perf_counter() - self._t0, 3),
                "summary": {"inputs": len(self.records), "ok": ok, "failed": len(self.records) - ok,
                            "with_warnings": sum(bool(r["warnings"]) for r in self.records)},
                "inputs": self.records}

    def write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.as_dict(), indent=2) + "\n")

"""Per-stage wall-clock timing of one volume (load, preprocess, inference, postprocess, write)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

STAGES = ("load", "preprocess", "inference", "postprocess", "write")


class StageTimer:
    """Accumulates milliseconds per stage; a stage may be entered several times (once per batch)."""

    def __init__(self):
        self.ms = {stage: 0.0 for stage in STAGES}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

    def as_dict(self) -> dict:
        """Stage times plus 'total' (sum of the STAGES)."""
        out = dict(self.ms)
        out["total"] = sum(self.ms[s] for s in STAGES)
        return out


def format_timings(timings: dict) -> str:
    """'total 812 ms (load 120, preprocess 40, inference 600, postprocess 50, write 2)'."""
    parts = ", ".join(f"{s} {timings.get(s, 0.0):.0f}" for s in STAGES)
    return f"total {timings.get('total', 0.0):.0f} ms ({parts})"

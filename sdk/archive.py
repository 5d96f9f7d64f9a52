"""Archive-scale segmentation on Ray (`regionkd-segment INPUT... -o DIR --ray [ADDRESS]`).

The inputs (files, folders, globs, CSV lists: `batch.expand_inputs`) become a Ray Data dataset of
(input, output) rows mapped over an actor pool: each actor holds one Segmenter (CPU slots, or one
GPU each) and segments one volume per call. Each mask is written atomically beside its
statistics, so an output that exists is complete: inputs whose outputs all exist are skipped,
which makes a crashed or killed job resumable by running the same command again. A bad input
fails its own row, never the job. One report (CSV, or Parquet for a .parquet name) lists every
input with its status, error, warnings and stage timings; it is written atomically at the end.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import InputError, require

log = logging.getLogger(__name__)

TIMING_COLUMNS = ("load", "preprocess", "inference", "postprocess", "write", "statistics", "total")
REPORT_COLUMNS = ("input", "output", "status", "error", "warnings", "slices", "worker",
                  *(f"{k}_ms" for k in TIMING_COLUMNS))


def expected_outputs(output: Path, statistics: bool) -> list[Path]:
    """What one input leaves behind when it is done: its mask, and its statistics when asked for."""
    from .outputs import statistics_path_for

    return [output] + ([statistics_path_for(output)] if statistics else [])


def _row(item: dict, status: str, error: str = "", result=None) -> dict:
    row = {"input": item["input"], "output": item["output"], "status": status, "error": error,
           "warnings": "", "slices": 0, "worker": f"{os.uname().nodename}:{os.getpid()}"}
    row.update({f"{k}_ms": float("nan") for k in TIMING_COLUMNS})
    if result is not None:
        row.update(warnings=" | ".join(result.warnings), slices=result.num_slices)
        row.update({f"{k}_ms": round(float(result.timings[k]), 3) for k in TIMING_COLUMNS if k in result.timings})
    return row


class SegmentActor:
    """One Segmenter per Ray actor; `__call__` takes a batch of {input, output} rows."""

    def __init__(self, bundle: str, segmenter_options: dict, statistics: bool):
        from .segmenter import Segmenter

        self.segmenter = Segmenter(bundle, **segmenter_options)
        self.statistics = statistics

    def segment_row(self, item: dict) -> dict:
        from .batch import describe_failure

        output = Path(item["output"])
        if all(p.exists() for p in expected_outputs(output, self.statistics)):
            return _row(item, "done before")          # a mask exists only once complete (atomic write)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            result = self.segmenter.segment_file(item["input"], output, statistics=self.statistics)
        except Exception as exc:  # noqa: BLE001 - a bad input fails its row, never the job
            return _row(item, "failed", describe_failure(Path(item["input"]), exc))
        return _row(item, "ok", result=result)

    def __call__(self, batch: dict) -> dict:
        rows = [self.segment_row({"input": str(i), "output": str(o)}) for i, o in zip(batch["input"], batch["output"])]
        return {column: [r[column] for r in rows] for column in REPORT_COLUMNS}


def _refuse_shared_outputs(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(items to run, items refused): a second input naming the same output fails its row."""
    seen, keep, refused = set(), [], []
    for item in items:
        if item["output"] in seen:
            refused.append({**item, "error": f"{item['input']}: another input already writes {item['output']}"})
        else:
            seen.add(item["output"])
            keep.append(item)
    return keep, refused


def _connect(address: str | None, num_cpus: int | None):
    """ray.init: a running cluster at `address` ("auto": the one this machine belongs to), or a
    local instance started for this job (and stopped with it) when address is None or "local"."""
    ray = require("ray", extra="batch", purpose="--ray (archive-scale segmentation)")
    if ray.is_initialized():
        return ray, False
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray, True


def write_report(rows: list[dict], path: Path) -> Path:
    """The per-input report, atomically: CSV, or Parquet for a name ending in .parquet."""
    import pandas as pd

    from .atomic import atomic_path

    path = Path(path)
    frame = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    suffix = ".parquet" if path.name.endswith(".parquet") else ".csv"
    with atomic_path(path, suffix=suffix) as tmp:
        frame.to_parquet(tmp, index=False) if suffix == ".parquet" else frame.to_csv(tmp, index=False)
    return path


def segment_archive(bundle, inputs, output, report=None, address: str | None = None, actors: int | None = None,
                    cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, statistics: bool = False,
                    segmenter_options: dict | None = None, num_parts: int = 1, part_id: int = 0) -> list[dict]:
    """Segment every input into the folder `output` on Ray (see the module doc) and return the
    report rows (also written to `report`, default `<output>/report.csv`). `actors`: pool size
    (default: as many as the cluster's CPUs, or GPUs, allow)."""
    from .atomic import remove_stale_temps
    from .batch import expand_inputs, output_paths, select_part
    from .mask_io import NIFTI_SUFFIXES
    from .segmenter import _verified_bundle

    output = Path(output).resolve()           # actors may run in other processes and on other nodes
    if output.name.endswith(NIFTI_SUFFIXES) or (output.exists() and not output.is_dir()):
        raise InputError(f"output {output}: --ray writes a folder of results, not one file")
    bundle = _verified_bundle(bundle, (segmenter_options or {}).get("trusted_keys")).root.resolve()  # fail here
    paths = [p.resolve() for p in expand_inputs(inputs)]
    outputs = output_paths(paths, output, output_type="nifti")
    items = [{"input": str(i), "output": str(o)} for i, o in
             zip(select_part(paths, num_parts, part_id), select_part(outputs, num_parts, part_id))]
    items, refused = _refuse_shared_outputs(items)
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output)               # temporaries of earlier runs that were killed mid-write
    ray, started = _connect(address, None)
    try:
        resources = ray.cluster_resources()
        if actors is None:
            per = gpus_per_actor if gpus_per_actor else cpus_per_actor
            actors = max(1, int(resources.get("GPU" if gpus_per_actor else "CPU", 1) // per))
        options = {"threads": max(1, int(cpus_per_actor)), **(segmenter_options or {})}
        dataset = ray.data.from_items(items) if items else None
        rows = [] if dataset is None else dataset.map_batches(
            SegmentActor, batch_size=1, concurrency=min(actors, max(1, len(items))), num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None, fn_constructor_kwargs={"bundle": str(bundle),
                                                                     "segmenter_options": options,
                                                                     "statistics": statistics}).take_all()
    finally:
        if started:
            ray.shutdown()
    order = {item["input"]: k for k, item in enumerate(items + refused)}
    rows = sorted([dict(r) for r in rows] + [_row(item, "failed", item["error"]) for item in refused],
                  key=lambda r: order[r["input"]])
    write_report(rows, Path(report) if report is not None else output / "report.csv")
    return rows

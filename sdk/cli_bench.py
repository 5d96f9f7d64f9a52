"""`regionkd-bench`: per-volume latency of a bundle (and of training checkpoints beside it) on one
volume, with the stage breakdown. This module parses the options; the measurement is
`regionkd.sdk.bench.run_benchmark`."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .atomic import atomic_write_text
from .console import progress_bar, run_cli, version_option

def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in allowed:
            raise click.BadParameter(f"unknown {what} {t!r}; choose from {', '.join(allowed)}")
    return items


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 2:
        raise click.BadParameter(f"--shape must be X,Y,Z with each at least 2, got {text!r}")
    return shape


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--volume", type=click.Path(path_type=Path), default=None,
              help="A CT volume to time: a NIfTI file or a DICOM series folder (as regionkd-segment reads them).")
@click.option("--shape", default="512,512,100", show_default=True,
              help="X,Y,Z of a synthetic CT volume, used when --volume is not given.")
@click.option("--backends", "--backend", "backends", default="auto", show_default=True,
              help="Comma-separated: auto (as regionkd-segment: TensorRT, else TensorRT-RTX, else onnxruntime), "
                   "onnxruntime, tensorrt, tensorrt-rtx.")
@click.option("--precisions", "--precision", "precisions", default=None,
              help="Comma-separated: fp32, fp16, int8 (default: all in the bundle).")
@click.option("--device", type=click.IntRange(min=0), default=0, show_default=True,
              help="CUDA device (GPU index) for the tensorrt backend.")
@click.option("--repeat", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs per configuration (p95 needs 20, p99 100).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Slices per inference call.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (onnxruntime, and the checkpoints of --checkpoint).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path),
              help="Also time this training checkpoint (teacher or student .pt) through the same pre- and "
                   "post-processing, eager on the CPU (repeatable; needs the train extra).")
@click.option("--folder", "folder_volumes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also time each configuration over a folder of this many copies of the volume, one after the "
                   "other and pipelined (the next read and the previous written while one is inferred): volumes "
                   "per minute and the share of time outside inference.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the table.")
@version_option
def bench(bundle, volume, shape, backends, precisions, device, repeat, warmup, batch_size, threads, checkpoints,
          folder_volumes, json_out, quiet):
    """Time BUNDLE on one CT volume: per-volume latency (median, mean, SD, p95/p99 with enough runs) with
    the stage breakdown (load, preprocess, inference, postprocess, write), GPU compute time, slices/s,
    model size, parameters, each configuration's own peak memory. Where the bundle ships fused models
    (pre- and post-processing inside the graph) they are timed beside the numpy path."""
    from .backends import BACKENDS
    from .bench import format_table, planned_configurations, require_measured, run_benchmark
    from .bundle import load_bundle
    from .bundle_files import PRECISIONS

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    backend_list = parse_list(backends, BACKENDS, "backend")
    precision_list = parse_list(precisions, PRECISIONS, "precision") if precisions else None
    shape = parse_shape(shape)
    b = load_bundle(bundle)
    total = len(planned_configurations(b, backend_list, precision_list or b.precisions, checkpoints))
    with progress_bar(total=total, desc="benchmarking", unit="config", quiet=quiet) as bar:
        def skipped(row):
            if not quiet:
                bar.write(f"skipped {row['backend']} {row['precision']}: {row['reason']}", file=sys.stderr)

        report = run_benchmark(b, volume=volume, shape=shape, backends=backend_list, precisions=precision_list,
                               checkpoints=checkpoints, device=device, repeat=repeat, warmup=warmup,
                               batch_size=batch_size, threads=threads, progress=bar.update, on_skip=skipped,
                               folder_volumes=folder_volumes)
    report["bundle"] = str(bundle)
    click.echo(format_table(report["rows"]))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")
    require_measured(report)
    return 0


def main(argv=None):
    return run_cli(bench, argv)


if __name__ == "__main__":
    main()

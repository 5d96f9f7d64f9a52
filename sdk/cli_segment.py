"""`regionkd-segment`: segment CT volumes (NIfTI files, folders of them, DICOM series folders, or a
study on a PACS) with a model bundle. This module parses the options and prints; the work is
`Segmenter.segment_files` (regionkd.sdk.batch) and `regionkd.sdk.pacs.segment_study`. The exit
status is 1 when any input failed, and a closing line says how many."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .backends import BACKENDS
from .bundle_files import PRECISIONS
from .console import progress_bar, run_cli, version_option
from .errors import InputError
from .nifti_bounds import DEFAULT_MAX_VOXELS
from .outputs import OUTPUT_TYPES
from .timing import format_timings


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", "--out", "output", type=click.Path(path_type=Path), default=None,
              help="Result file (.nii/.nii.gz; .dcm for --output-type dicom-seg) or an existing folder for one "
                   "input, else a folder for the results. Optional with --dicomweb (local copies).")
@click.option("--output-type", type=click.Choice(OUTPUT_TYPES), default="nifti", show_default=True,
              help="nifti: a uint8 mask; dicom-seg: a DICOM SEG (needs a DICOM series input); both: the mask and "
                   "'<name>.seg.dcm' beside it.")
@click.option("--statistics", is_flag=True,
              help="Per class: voxels, volume (ml), mean/SD/min/max HU; lesions: count, largest volume and in-plane "
                   "diameter. Written as '<name>.statistics.json' beside the result (and into --report).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(list(BACKENDS)),
              help="auto: TensorRT on an NVIDIA GPU, else TensorRT-RTX, else onnxruntime.")
@click.option("--precision", "--precisions", "precision", default="fp32", show_default=True,
              type=click.Choice(list(PRECISIONS)),
              help="Which of the bundle's models to run: fp32 (the reference), fp16 or int8 (smaller, faster on GPUs; "
                   "the bundle's manifest records their Dice against fp32).")
@click.option("--device", type=click.IntRange(min=0), default=0, show_default=True,
              help="CUDA device (GPU index) for the tensorrt backend.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Slices per inference call.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for onnxruntime.")
@click.option("--no-largest-component", is_flag=True, help="Keep every connected component of the organ.")
@click.option("--no-fused", is_flag=True,
              help="Run the network model with the pre- and post-processing in numpy, even where the bundle ships "
                   "a fused model (window, resizes and argmax inside the graph), which is used by default.")
@click.option("--preview", type=click.Path(path_type=Path), default=None,
              help="Write a PNG of axial slices through the organ, cropped to the body, with a legend, lesions "
                   "outlined, slice numbers and positions (one per input when several).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Ground-truth mask (or a folder of them, named like the inputs) drawn beside the prediction in "
                   "--preview.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JSON run report: one record per input with paths, status, error, timings, warnings "
                   "and statistics.")
@click.option("--dicomweb", type=str, default=None, metavar="URL",
              help="A PACS's DICOMweb root (e.g. http://pacs:8042/dicom-web): retrieve --study's CT series "
                   "(QIDO-RS, WADO-RS), segment them, store each DICOM SEG into the same study (STOW-RS).")
@click.option("--study", type=str, default=None, metavar="UID", help="StudyInstanceUID, with --dicomweb.")
@click.option("--series", "series_uids", multiple=True, metavar="UID",
              help="SeriesInstanceUID to segment (repeatable; default: every CT series of the study).")
@click.option("--dicomweb-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds per DICOMweb request.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
              help="Public key (PEM) whose signature the bundle must carry (repeatable; also the "
                   "REGIONKD_TRUSTED_KEYS environment variable, key files separated by ':'). With any key, "
                   "unsigned or changed bundles are refused.")
@click.option("--allow-implausible", is_flag=True,
              help="Research use: segment volumes that are not plausible CT (constant, not HU, no geometry, "
                   "ambiguous axial plane, ...) with warnings instead of refusing them.")
@click.option("--axial-axis", type=click.IntRange(0, 2), default=None,
              help="The input's voxel axis (0, 1, 2) to slice as axial; needed for volumes tilted near 45 degrees.")
@click.option("--max-voxels", type=click.IntRange(min=1), default=DEFAULT_MAX_VOXELS, show_default=True,
              help="Refuse a volume declaring more voxels, before its data is read.")
@click.option("--num-parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the inputs into this many parts and segment only --part-id (as nnU-Net: every "
                   "num-parts-th input from part-id on), for scheduler arrays without a shared queue.")
@click.option("--part-id", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which part of --num-parts this process segments (0-based).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Segment the inputs on Ray (needs the batch extra): a local instance for this job with --ray alone, "
                   "or the cluster at ADDRESS ('auto': the one this machine belongs to). One Segmenter per actor; "
                   "inputs whose masks exist are skipped (rerun to resume); -o is a folder; --report a .csv/.parquet "
                   "table (default OUTPUT/report.csv).")
@click.option("--ray-actors", type=click.IntRange(min=1), default=None,
              help="Actors (Segmenters) in the pool (default: as many as the cluster's CPUs or GPUs allow).")
@click.option("--ray-cpus-per-actor", "ray_cpus", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="CPU slots per actor (also its onnxruntime threads).")
@click.option("--ray-gpus-per-actor", "ray_gpus", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="GPUs per actor (1 for one GPU each).")
@click.option("--no-pipeline", is_flag=True,
              help="Segment the inputs strictly one after the other (by default the next input is read and the "
                   "previous result written while one is inferred).")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar, banner or summary: only each volume's result line, warnings and errors "
                   "(and the summary when something failed).")
@click.option("-v", "--verbose", is_flag=True, help="Log backend choice and details.")
@version_option
def segment(bundle, inputs, output, output_type, statistics, backend, precision, device, batch_size, threads,
            no_largest_component, no_fused, preview, reference, report, dicomweb, study, series_uids, dicomweb_timeout,
            trusted_keys, allow_implausible, axial_axis, max_voxels, num_parts, part_id, ray_address, ray_actors, ray_cpus,
            ray_gpus, no_pipeline, quiet, verbose):
    """Segment CT volumes with the model BUNDLE and write uint8 masks (or DICOM SEG) with each input's geometry.

    INPUT is a NIfTI file (.nii, .nii.gz), a folder of NIfTI files, a DICOM series folder, a quoted
    glob ('scans/*.nii.gz') or a CSV list of inputs (an 'input' column, or the first).
    Volumes that are not plausible CT in Hounsfield units are refused (see --allow-implausible);
    warnings (oblique, spacing far from the training spacing) are printed with each volume. Inputs
    that fail are reported and skipped; the exit status is 1 when any input failed.

    \b
    A PACS round trip instead of files:
      regionkd-segment liver.bundle --dicomweb http://pacs:8042/dicom-web --study 1.2.840...
    An archive on Ray (resumable: rerun the same command after a crash):
      regionkd-segment liver.bundle archive.csv -o masks/ --ray auto --statistics
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    _check_options(inputs, output, dicomweb, study, series_uids, preview, reference, num_parts, part_id, ray_address,
                   output_type, report)
    segmenter_options = dict(backend=backend, precision=precision, batch_size=batch_size, threads=threads,
                             largest_component=not no_largest_component, trusted_keys=list(trusted_keys),
                             allow_implausible=allow_implausible, axial_axis=axial_axis, max_voxels=max_voxels,
                             device=device, fused=False if no_fused else None)
    if ray_address is not None:
        return _segment_on_ray(bundle, inputs, output, report, ray_address, ray_actors, ray_cpus, ray_gpus, statistics,
                               segmenter_options, num_parts, part_id, quiet)
    from .report import RunReport
    from .segmenter import Segmenter

    run_report = RunReport(report, bundle=bundle, backend=backend, precision=precision, output_type=output_type)
    with Segmenter(bundle, **segmenter_options) as segmenter:
        run_report.backend = segmenter.backend.name
        if not quiet:
            click.echo(f"model {segmenter.backend.model_path.name} ({segmenter.model_size_bytes / 1e6:.2f} MB) "
                       f"on {segmenter.backend.name}, {precision}; bundle {segmenter.bundle_signature}", err=True)
        if dicomweb is not None:
            failed, total = _segment_pacs(segmenter, dicomweb, study, series_uids, output, output_type, statistics,
                                          dicomweb_timeout, quiet, run_report)
            warned = sum(bool(r.get("warnings")) for r in run_report.records)
        else:
            failed, warned, total = _segment_files(segmenter, inputs, output, quiet, run_report, dict(
                output_type=output_type, statistics=statistics, preview=preview, reference=reference,
                pipelined=not no_pipeline, num_parts=num_parts, part_id=part_id))
    run_report.write()
    if not quiet or failed:
        extra = (f", {failed} failed" if failed else "") + (f", {warned} with warnings" if warned else "")
        click.echo(f"{total - failed} of {total} volumes segmented{extra}", err=True)
    return 1 if failed else 0


def _check_options(inputs, output, dicomweb, study, series_uids, preview, reference, num_parts, part_id,
                   ray_address, output_type, report) -> None:
    """Every option checked before the bundle is loaded or anything is read."""
    if dicomweb is None and (study or series_uids):
        raise click.UsageError("--study and --series go with --dicomweb URL")
    if dicomweb is not None:
        if inputs:
            raise click.UsageError("give INPUTs or --dicomweb, not both")
        if not study:
            raise click.UsageError("--dicomweb needs --study UID (the study whose CT series to segment)")
        if preview is not None or reference is not None:
            raise click.UsageError("--preview and --reference work with INPUT files, not with --dicomweb")
    else:
        if not inputs:
            raise click.UsageError("give at least one INPUT (a NIfTI file, a folder of them, a DICOM series "
                                   "folder), or --dicomweb URL --study UID")
        if output is None:
            raise click.UsageError("missing option -o/--output (where the results go)")
    if part_id >= num_parts:
        raise click.UsageError(f"--part-id {part_id} must be below --num-parts {num_parts}")
    if dicomweb is not None and num_parts > 1:
        raise click.UsageError("--num-parts splits INPUT files; a --dicomweb study is segmented whole")
    if reference is not None and preview is None:
        raise click.UsageError("--reference is drawn in the --preview; give --preview PNG too")
    if ray_address is not None:
        if dicomweb is not None or preview is not None or output_type != "nifti":
            raise click.UsageError("--ray segments INPUT files into NIfTI masks; it does not take --dicomweb, "
                                   "--preview or --output-type dicom-seg/both")
        if report is not None and not str(report).endswith((".csv", ".parquet")):
            raise click.UsageError("with --ray, --report names the per-input table: a .csv or .parquet file")


def _segment_on_ray(bundle, inputs, output, report, address, actors, cpus, gpus, statistics, segmenter_options,
                    num_parts, part_id, quiet) -> int:
    from .archive import segment_archive

    rows = segment_archive(bundle, inputs, output, report=report, address=address, actors=actors,
                           cpus_per_actor=cpus, gpus_per_actor=gpus, statistics=statistics,
                           segmenter_options={k: v for k, v in segmenter_options.items() if k != "threads"},
                           num_parts=num_parts, part_id=part_id)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        click.echo(f"error: {r['error']}", err=True)
    if not quiet or failed:
        done = sum(r["status"] == "done before" for r in rows)
        click.echo(f"{len(rows) - len(failed)} of {len(rows)} volumes segmented on Ray"
                   + (f" ({done} done by an earlier run)" if done else "") + (f", {len(failed)} failed" if failed else "")
                   + f"; report {report or Path(output) / 'report.csv'}", err=True)
    return 1 if failed else 0


def _result_line(path, result, outs: dict) -> str:
    shape = "x".join(str(s) for s in result.mask.shape)
    notes = "".join(f"; warning: {w}" for w in result.warnings)
    where = " + ".join(str(v) for k, v in outs.items() if k != "pacs")
    if "pacs" in outs:
        where = (where + " + " if where else "") + f"SEG {outs['pacs']['sop_instance']} stored in study " \
            f"{outs['pacs']['study']}"
    return f"{path} ({shape}) -> {where}: {format_timings(result.timings)}{notes}"


def _segment_files(segmenter, inputs, output, quiet, run_report, options: dict):
    from .batch import expand_inputs, select_part

    counts = {"failed": 0, "warned": 0}
    total = len(select_part(expand_inputs(inputs), options["num_parts"], options["part_id"]))
    with progress_bar(total=total, desc="segmenting", unit="vol", quiet=quiet) as bar:
        def report(outcome):
            if not outcome.ok:
                counts["failed"] += 1
                run_report.add(str(outcome.input), status="failed", error=outcome.error)
                bar.write(f"error: {outcome.error}", file=sys.stderr)
            else:
                counts["warned"] += bool(outcome.result.warnings)
                run_report.add(str(outcome.input), status="ok", result=outcome.result, outputs=outcome.outputs)
                for w in outcome.result.warnings if quiet else ():
                    bar.write(f"warning: {outcome.input}: {w}", file=sys.stderr)
                bar.write(_result_line(outcome.input, outcome.result, outcome.outputs), file=sys.stdout)
            bar.update(1)

        outcomes = segmenter.segment_files(inputs, output, on_outcome=report, **options)
    return counts["failed"], counts["warned"], len(outcomes)


def _segment_pacs(segmenter, url, study, series_uids, output, output_type, statistics, timeout, quiet, run_report):
    """The PACS round trip (regionkd.sdk.pacs): all or nothing for the study; (failed, total)."""
    from .batch import describe_failure
    from .pacs import segment_study

    where = f"{url} study {study}"
    if output is not None and output.exists() and not output.is_dir():
        raise InputError(f"output {output}: with --dicomweb, -o is a folder for local copies")
    bar = progress_bar(desc="PACS round trip", unit="step", quiet=quiet)
    try:
        outcomes = segment_study(segmenter, url, study, list(series_uids) or None, statistics=statistics,
                                 local_dir=output, output_type=output_type, timeout=timeout,
                                 progress=lambda message: bar.set_description_str(message))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - reported like a failed input
        bar.close()
        message = describe_failure(Path(where), exc)
        run_report.add(where, status="failed", error=message)
        bar.write(f"error: {message}", file=sys.stderr)
        return 1, max(1, len(series_uids))
    bar.close()
    for o in outcomes:
        name = f"{url} series {o.series.series_instance_uid}"
        run_report.add(name, status="ok", result=o.result, outputs=o.outputs, extra_timings=o.timings)
        for w in o.result.warnings if quiet else ():
            bar.write(f"warning: {name}: {w}", file=sys.stderr)
        bar.write(_result_line(name, o.result, o.outputs) +
                  f" (PACS: {', '.join(f'{k} {v:.0f} ms' for k, v in o.timings.items())})", file=sys.stdout)
    return 0, len(outcomes)


def main(argv=None):
    return run_cli(segment, argv)


if __name__ == "__main__":
    main()

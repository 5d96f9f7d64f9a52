"""`regionkd-segment`: segment CT volumes (NIfTI files, folders of them, DICOM series folders)
with a model bundle. Every input is tried in isolation: whatever goes wrong with one (a refused
volume, a full disk, MemoryError, any exception) is reported for that input and the run goes on;
the exit status is 1 when any input failed, and a closing line says how many."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .atomic import is_temp_name, remove_stale_temps
from .console import run_cli, version_option
from .outputs import OUTPUT_TYPES, SEG_SUFFIX
from .errors import InputError, RegionKDError
from .mask_io import NIFTI_SUFFIXES
from .nifti_bounds import DEFAULT_MAX_VOXELS
from .timing import format_timings


def expand_inputs(paths) -> list[Path]:
    """Files as given; a folder holding NIfTI files gives those files; any other folder is a DICOM
    series. In a folder, hidden files (".name": editor and OS droppings, AppleDouble "._x.nii.gz")
    and the temporary files of interrupted writes are never inputs."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            niftis = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(NIFTI_SUFFIXES)
                            and not f.name.startswith(".") and not is_temp_name(f.name))
            out.extend(niftis if niftis else [p])
        else:
            out.append(p)  # a missing file is reported when its turn comes, the others still run
    return out


def volume_name(path: Path) -> str:
    """'case_001' for case_001.nii.gz, the folder name for a DICOM series."""
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_file_name(output: Path, output_type: str) -> bool:
    return output.name.lower().endswith(".dcm") if output_type == "dicom-seg" else output.name.endswith(NIFTI_SUFFIXES)


def output_paths(inputs: list[Path], output: Path, one_given: bool = False, output_type: str = "nifti") -> list[Path]:
    """Where each input's result goes (a NIfTI mask, or for --output-type dicom-seg the SEG file).
    One input and an OUTPUT ending in .nii/.nii.gz (.dcm for dicom-seg): that file. Otherwise
    OUTPUT is a folder of results named like their inputs (DICOM series: '<folder>.nii.gz' or
    '<folder>.seg.dcm'). For one input given as a file or series (`one_given`), OUTPUT must be
    such a file name or an existing folder: `-o x.png` is refused instead of becoming a folder."""
    kind = "a DICOM SEG file ending in .dcm" if output_type == "dicom-seg" else "a mask file ending in .nii or .nii.gz"
    if len(inputs) == 1 and _is_file_name(output, output_type):
        return [output]
    if _is_file_name(output, output_type) or (output_type == "dicom-seg" and output.name.endswith(NIFTI_SUFFIXES)):
        raise InputError(f"output {output}: several inputs need an output folder, not a file name"
                         if len(inputs) > 1 else f"output {output}: for --output-type {output_type}, name {kind}")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output}: exists and is not a folder")
    if one_given and not output.is_dir():
        raise InputError(f"output {output}: for one input, name {kind}, or an existing folder")
    if output_type == "dicom-seg":
        return [output / (volume_name(p) + SEG_SUFFIX) for p in inputs]
    names = [p.name if p.name.endswith(NIFTI_SUFFIXES) else volume_name(p) + ".nii.gz" for p in inputs]
    return [output / n for n in names]


def preview_path(preview: Path, input_path: Path, several: bool) -> Path:
    return preview.with_name(f"{preview.stem}_{volume_name(input_path)}.png") if several else preview


def reference_for(reference: Path | None, input_path: Path, several: bool) -> Path | None:
    """--reference: a mask file (one input), or a folder holding '<volume name>.nii.gz' per input."""
    if reference is None:
        return None
    if reference.is_dir():
        for suffix in NIFTI_SUFFIXES[::-1]:
            candidate = reference / (volume_name(input_path) + suffix)
            if candidate.is_file():
                return candidate
        raise InputError(f"--reference {reference}: no {volume_name(input_path)}.nii.gz for {input_path}")
    if several:
        raise InputError(f"--reference {reference}: a file is one input's reference; for several inputs give a folder "
                         "of masks named like the inputs")
    return reference


def _write_preview(preview: Path, result, segmenter, reference: Path | None) -> None:
    import numpy as np

    from .preview import write_preview

    ref = None
    if reference is not None:
        from .volume_io import read_nifti

        ref_vol = read_nifti(reference, kind="label")
        if ref_vol.data.shape[:3] != result.mask.shape[:3] or not np.allclose(ref_vol.affine, result.mask.affine,
                                                                               atol=1e-3):
            raise InputError(f"--reference {reference}: shape {ref_vol.data.shape} / affine differ from the input's "
                             f"{result.mask.shape}; the reference must be a mask of this volume")
        ref = np.asarray(ref_vol.data).reshape(result.mask.shape)
    write_preview(preview, result.image, np.asarray(result.mask.dataobj), result.mask.affine, segmenter.window,
                  class_names=segmenter.class_names, axial_axis=result.axial_axis, reference=ref)


def describe_failure(path: Path, exc: BaseException) -> str:
    """One line for an input that failed: regionkd's own messages name the input already."""
    if isinstance(exc, RegionKDError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{path}: out of memory while segmenting it ({str(exc) or type(exc).__name__}); try --max-voxels or a smaller volume"
    if isinstance(exc, OSError):
        text = str(exc)
        return text if str(path) in text or (exc.filename and str(exc.filename) in text) else f"{path}: {text}"
    return f"{path}: unexpected {type(exc).__name__}: {exc}"


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
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "tensorrt-rtx"]),
              help="auto: TensorRT on an NVIDIA GPU, else TensorRT-RTX, else onnxruntime.")
@click.option("--precision", "--precisions", "precision", default="fp32", show_default=True,
              type=click.Choice(["fp32", "fp16", "int8"]),
              help="Which of the bundle's models to run: fp32 (the reference), fp16 or int8 (smaller, faster on GPUs; "
                   "the bundle's manifest records their Dice against fp32).")
@click.option("--device", type=click.IntRange(min=0), default=0, show_default=True,
              help="CUDA device (GPU index) for the tensorrt backend.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Slices per inference call.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for onnxruntime.")
@click.option("--no-largest-component", is_flag=True, help="Keep every connected component of the organ.")
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
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar, banner or summary: only each volume's result line, warnings and errors "
                   "(and the summary when something failed).")
@click.option("-v", "--verbose", is_flag=True, help="Log backend choice and details.")
@version_option
def segment(bundle, inputs, output, output_type, statistics, backend, precision, device, batch_size, threads,
            no_largest_component, preview, reference, report, dicomweb, study, series_uids, dicomweb_timeout,
            trusted_keys, allow_implausible, axial_axis, max_voxels, quiet, verbose):
    """Segment CT volumes with the model BUNDLE and write uint8 masks (or DICOM SEG) with each input's geometry.

    INPUT is a NIfTI file (.nii, .nii.gz), a folder of NIfTI files, or a DICOM series folder.
    Volumes that are not plausible CT in Hounsfield units are refused (see --allow-implausible);
    warnings (oblique, spacing far from the training spacing) are printed with each volume. Inputs
    that fail are reported and skipped; the exit status is 1 when any input failed.

    \b
    A PACS round trip instead of files:
      regionkd-segment liver.bundle --dicomweb http://pacs:8042/dicom-web --study 1.2.840...
    """
    from .report import RunReport

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    # every option is checked before the bundle is loaded or anything is read
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
    if reference is not None and preview is None:
        raise click.UsageError("--reference is drawn in the --preview; give --preview PNG too")
    run_report = RunReport(report, bundle=bundle, backend=backend, precision=precision, output_type=output_type)
    from .segmenter import Segmenter

    with Segmenter(bundle, backend=backend, precision=precision, batch_size=batch_size, threads=threads,
                   largest_component=not no_largest_component, trusted_keys=list(trusted_keys),
                   allow_implausible=allow_implausible, axial_axis=axial_axis, max_voxels=max_voxels,
                   device=device) as segmenter:
        run_report.backend = segmenter.backend.name
        if not quiet:
            click.echo(f"model {segmenter.backend.model_path.name} ({segmenter.model_size_bytes / 1e6:.2f} MB) "
                       f"on {segmenter.backend.name}, {precision}; bundle {segmenter.bundle_signature}", err=True)
        if dicomweb is not None:
            failed, total = _segment_pacs(segmenter, dicomweb, study, series_uids, output, output_type, statistics,
                                          dicomweb_timeout, quiet, run_report)
            warned = sum(bool(r.get("warnings")) for r in run_report.records)
        else:
            failed, warned, total = _segment_files(segmenter, inputs, output, output_type, statistics, preview,
                                                   reference, quiet, run_report)
    run_report.write()
    if not quiet or failed:
        extra = (f", {failed} failed" if failed else "") + (f", {warned} with warnings" if warned else "")
        click.echo(f"{total - failed} of {total} volumes segmented{extra}", err=True)
    return 1 if failed else 0


def _result_line(path, result, outs: dict) -> str:
    shape = "x".join(str(s) for s in result.mask.shape)
    notes = "".join(f"; warning: {w}" for w in result.warnings)
    where = " + ".join(str(v) for k, v in outs.items() if k != "pacs")
    if "pacs" in outs:
        where = (where + " + " if where else "") + f"SEG {outs['pacs']['sop_instance']} stored in study " \
            f"{outs['pacs']['study']}"
    return f"{path} ({shape}) -> {where}: {format_timings(result.timings)}{notes}"


def _segment_files(segmenter, inputs, output, output_type, statistics, preview, reference, quiet, run_report):
    from tqdm import tqdm

    paths = expand_inputs(inputs)
    one_given = len(inputs) == 1 and not (Path(inputs[0]).is_dir() and paths != [Path(inputs[0])])
    outputs = output_paths(paths, output, one_given=one_given, output_type=output_type)
    for folder in {o.parent for o in outputs}:
        remove_stale_temps(folder)           # temporaries of earlier runs that were killed mid-write
    failed = warned = 0
    seen = set()
    for path, out in tqdm(list(zip(paths, outputs)), desc="segmenting", unit="vol", disable=quiet):
        try:
            if out in seen:
                raise InputError(f"{path}: another input already writes {out}")
            seen.add(out)
            if is_temp_name(path.name):
                raise InputError(f"{path}: a temporary file left by an interrupted regionkd write, not an input")
            ref = reference_for(reference, path, len(paths) > 1)
            result = segmenter.segment_file(path, out, keep_image=preview is not None, output_type=output_type,
                                            statistics=statistics)
            outs = dict(result.outputs)
            if preview is not None:
                target = preview_path(preview, path, len(paths) > 1)
                _write_preview(target, result, segmenter, ref)
                outs["preview"] = str(target)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one input must never stop the others
            failed += 1
            message = describe_failure(path, exc)
            run_report.add(str(path), status="failed", error=message)
            tqdm.write(f"error: {message}", file=sys.stderr)
            continue
        warned += bool(result.warnings)
        run_report.add(str(path), status="ok", result=result, outputs=outs)
        for w in result.warnings if quiet else ():
            tqdm.write(f"warning: {path}: {w}", file=sys.stderr)
        tqdm.write(_result_line(path, result, outs))
    return failed, warned, len(paths)


def _segment_pacs(segmenter, url, study, series_uids, output, output_type, statistics, timeout, quiet, run_report):
    """The PACS round trip (regionkd.sdk.pacs): all or nothing for the study; (failed, total)."""
    from tqdm import tqdm

    from .pacs import segment_study

    where = f"{url} study {study}"
    if output is not None and output.exists() and not output.is_dir():
        raise InputError(f"output {output}: with --dicomweb, -o is a folder for local copies")
    bar = tqdm(desc="PACS round trip", unit="step", disable=quiet, bar_format="{desc} [{elapsed}]")
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
        tqdm.write(f"error: {message}", file=sys.stderr)
        return 1, max(1, len(series_uids))
    bar.close()
    for o in outcomes:
        name = f"{url} series {o.series.series_instance_uid}"
        run_report.add(name, status="ok", result=o.result, outputs=o.outputs, extra_timings=o.timings)
        for w in o.result.warnings if quiet else ():
            tqdm.write(f"warning: {name}: {w}", file=sys.stderr)
        tqdm.write(_result_line(name, o.result, o.outputs) +
                   f" (PACS: {', '.join(f'{k} {v:.0f} ms' for k, v in o.timings.items())})")
    return 0, len(outcomes)


def main(argv=None):
    return run_cli(segment, argv)


if __name__ == "__main__":
    main()

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
from .cli_common import run_cli
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


def output_paths(inputs: list[Path], output: Path, one_given: bool = False) -> list[Path]:
    """One input and an OUTPUT ending in .nii/.nii.gz: that file. Otherwise OUTPUT is a folder of
    masks named like their inputs (DICOM series: '<folder>.nii.gz'). For one input given as a file
    or series (`one_given`), OUTPUT must end in .nii/.nii.gz or be an existing folder: `-o x.png`
    is refused instead of becoming a folder named x.png."""
    if len(inputs) == 1 and output.name.endswith(NIFTI_SUFFIXES):
        return [output]
    if output.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"output {output}: several inputs need an output folder, not a file name")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output}: exists and is not a folder")
    if one_given and not output.is_dir():
        raise InputError(f"output {output}: for one input, name a mask file ending in .nii or .nii.gz, or an "
                         "existing folder")
    names = [p.name if p.name.endswith(NIFTI_SUFFIXES) else volume_name(p) + ".nii.gz" for p in inputs]
    return [output / n for n in names]


def preview_path(preview: Path, input_path: Path, several: bool) -> Path:
    return preview.with_name(f"{preview.stem}_{volume_name(input_path)}.png") if several else preview


def _write_preview(preview: Path, result, segmenter) -> None:
    import numpy as np

    from .preview import write_preview

    write_preview(preview, result.image, np.asarray(result.mask.dataobj), result.mask.affine, segmenter.window,
                  axial_axis=result.axial_axis)


def describe_failure(path: Path, exc: BaseException) -> str:
    """One line for an input that failed: regionkd's own messages name the input already."""
    if isinstance(exc, RegionKDError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{path}: out of memory while segmenting it ({exc or 'MemoryError'}); try --max-voxels or a smaller volume"
    if isinstance(exc, OSError):
        text = str(exc)
        return text if str(path) in text or (exc.filename and str(exc.filename) in text) else f"{path}: {text}"
    return f"{path}: unexpected {type(exc).__name__}: {exc}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Mask file (.nii/.nii.gz) or an existing folder for one input, else a folder for the masks.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "tensorrt-rtx"]),
              help="auto: TensorRT on an NVIDIA GPU, else TensorRT-RTX, else onnxruntime.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Slices per inference call.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for onnxruntime.")
@click.option("--no-largest-component", is_flag=True, help="Keep every connected component of the organ.")
@click.option("--preview", type=click.Path(path_type=Path), default=None,
              help="Write a PNG montage of axial slices with the mask overlaid (one per input when several).")
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
@click.option("-q", "--quiet", is_flag=True, help="Only errors, warnings and, when something failed, the summary.")
@click.option("-v", "--verbose", is_flag=True, help="Log backend choice and details.")
def segment(bundle, inputs, output, backend, precision, batch_size, threads, no_largest_component, preview,
            trusted_keys, allow_implausible, axial_axis, max_voxels, quiet, verbose):
    """Segment CT volumes with the model BUNDLE and write uint8 masks with each input's geometry.

    INPUT is a NIfTI file (.nii, .nii.gz), a folder of NIfTI files, or a DICOM series folder
    (needs the dicom extra). Volumes that are not plausible CT in Hounsfield units are refused
    (see --allow-implausible); warnings (oblique, spacing far from the training spacing) are
    printed with each volume. Inputs that fail are reported and skipped; the exit status is 1
    when any input failed.
    """
    from tqdm import tqdm

    from .segmenter import Segmenter

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    paths = expand_inputs(inputs)
    one_given = len(inputs) == 1 and not (Path(inputs[0]).is_dir() and paths != [Path(inputs[0])])
    outputs = output_paths(paths, output, one_given=one_given)
    for folder in {o.parent for o in outputs}:
        remove_stale_temps(folder)           # temporaries of earlier runs that were killed mid-write
    with Segmenter(bundle, backend=backend, precision=precision, batch_size=batch_size, threads=threads,
                   largest_component=not no_largest_component, trusted_keys=list(trusted_keys),
                   allow_implausible=allow_implausible, axial_axis=axial_axis, max_voxels=max_voxels) as segmenter:
        if not quiet:
            click.echo(f"model {segmenter.backend.model_path.name} ({segmenter.model_size_bytes / 1e6:.2f} MB) "
                       f"on {segmenter.backend.name}, {precision}; bundle {segmenter.bundle_signature}", err=True)
        failed = warned = 0
        seen = set()
        for path, out in tqdm(list(zip(paths, outputs)), desc="segmenting", unit="vol", disable=quiet):
            try:
                if out in seen:
                    raise InputError(f"{path}: another input already writes {out}")
                seen.add(out)
                if is_temp_name(path.name):
                    raise InputError(f"{path}: a temporary file left by an interrupted regionkd write, not an input")
                result = segmenter.segment_file(path, out, keep_image=preview is not None)
                if preview is not None:
                    _write_preview(preview_path(preview, path, len(paths) > 1), result, segmenter)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one input must never stop the others
                failed += 1
                tqdm.write(f"error: {describe_failure(path, exc)}", file=sys.stderr)
                continue
            warned += bool(result.warnings)
            if quiet:
                for w in result.warnings:
                    tqdm.write(f"warning: {path}: {w}", file=sys.stderr)
            else:
                shape = "x".join(str(s) for s in result.mask.shape)
                notes = "".join(f"; warning: {w}" for w in result.warnings)
                tqdm.write(f"{path} ({shape}) -> {out}: {format_timings(result.timings)}{notes}")
    if not quiet or failed:
        extra = (f", {failed} failed" if failed else "") + (f", {warned} with warnings" if warned else "")
        click.echo(f"{len(paths) - failed} of {len(paths)} volumes segmented{extra}", err=True)
    return 1 if failed else 0


def main(argv=None):
    return run_cli(segment, argv)


if __name__ == "__main__":
    main()

"""`regionkd-segment`: segment CT volumes (NIfTI files, folders of them, DICOM series folders)
with a model bundle. Every input is tried; the exit status is 1 when any of them failed."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .cli_common import run_cli
from .errors import InputError, RegionKDError
from .mask_io import NIFTI_SUFFIXES
from .timing import format_timings


def expand_inputs(paths) -> list[Path]:
    """Files as given; a folder holding NIfTI files gives those files; any other folder is a DICOM series."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            niftis = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(NIFTI_SUFFIXES))
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


def output_paths(inputs: list[Path], output: Path) -> list[Path]:
    """One input and an OUTPUT ending in .nii/.nii.gz: that file. Otherwise OUTPUT is a folder of
    masks named like their inputs (DICOM series: '<folder>.nii.gz')."""
    if len(inputs) == 1 and output.name.endswith(NIFTI_SUFFIXES):
        return [output]
    if output.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"output {output}: several inputs need an output folder, not a file name")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output}: exists and is not a folder")
    names = [p.name if p.name.endswith(NIFTI_SUFFIXES) else volume_name(p) + ".nii.gz" for p in inputs]
    return [output / n for n in names]


def preview_path(preview: Path, input_path: Path, several: bool) -> Path:
    return preview.with_name(f"{preview.stem}_{volume_name(input_path)}.png") if several else preview


def _write_preview(preview: Path, result, segmenter) -> None:
    import numpy as np

    from .preview import write_preview

    write_preview(preview, result.image, np.asarray(result.mask.dataobj), result.mask.affine, segmenter.window)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Mask file (.nii/.nii.gz) for one input, else a folder for the masks.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "tensorrt-rtx"]),
              help="auto: TensorRT on an NVIDIA GPU, else TensorRT-RTX, else onnxruntime.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Slices per inference call.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for onnxruntime.")
@click.option("--no-largest-component", is_flag=True, help="Keep every connected component of the organ.")
@click.option("--preview", type=click.Path(path_type=Path), default=None,
              help="Write a PNG montage of axial slices with the mask overlaid (one per input when several).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log backend choice and details.")
def segment(bundle, inputs, output, backend, precision, batch_size, threads, no_largest_component, preview,
            quiet, verbose):
    """Segment CT volumes with the model BUNDLE and write uint8 masks with each input's geometry.

    INPUT is a NIfTI file (.nii, .nii.gz), a folder of NIfTI files, or a DICOM series folder
    (needs the dicom extra). Inputs that fail are reported and skipped; the exit status is 1
    when any input failed.
    """
    from tqdm import tqdm

    from .segmenter import Segmenter

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    paths = expand_inputs(inputs)
    outputs = output_paths(paths, output)
    with Segmenter(bundle, backend=backend, precision=precision, batch_size=batch_size, threads=threads,
                   largest_component=not no_largest_component) as segmenter:
        if not quiet:
            click.echo(f"model {segmenter.backend.model_path.name} ({segmenter.model_size_bytes / 1e6:.2f} MB) "
                       f"on {segmenter.backend.name}, {precision}", err=True)
        failed = 0
        seen = set()
        for path, out in tqdm(list(zip(paths, outputs)), desc="segmenting", unit="vol", disable=quiet):
            try:
                if out in seen:
                    raise InputError(f"{path}: another input already writes {out}")
                seen.add(out)
                result = segmenter.segment_file(path, out, keep_image=preview is not None)
                if preview is not None:
                    _write_preview(preview_path(preview, path, len(paths) > 1), result, segmenter)
            except (RegionKDError, OSError) as exc:
                failed += 1
                tqdm.write(f"error: {exc}", file=sys.stderr)
                continue
            if not quiet:
                shape = "x".join(str(s) for s in result.mask.shape)
                tqdm.write(f"{path} ({shape}) -> {out}: {format_timings(result.timings)}")
    if not quiet:
        click.echo(f"{len(paths) - failed} of {len(paths)} volumes segmented", err=True)
    return 1 if failed else 0


def main(argv=None):
    return run_cli(segment, argv)


if __name__ == "__main__":
    main()

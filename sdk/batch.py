"""Segmenting many files in one call (`Segmenter.segment_files`, which regionkd-segment calls):
inputs expanded (folders of NIfTI files, DICOM series folders), each result named after its input,
and every input tried in isolation: whatever goes wrong with one (a refused volume, a full disk,
MemoryError, any exception) becomes that input's failed outcome and the others still run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .atomic import is_temp_name, remove_stale_temps
from .errors import InputError, RegionKDError
from .mask_io import NIFTI_SUFFIXES
from .outputs import SEG_SUFFIX


@dataclass
class FileOutcome:
    """One input's outcome: `result` (a SegmentationResult) and `outputs` when it worked, `error`
    (one line naming the input and the problem) when it did not."""
    input: Path
    result: object = None
    outputs: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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


def _segment_one(segmenter, path: Path, out: Path, several: bool, output_type, statistics, preview,
                 reference) -> FileOutcome:
    if is_temp_name(path.name):
        raise InputError(f"{path}: a temporary file left by an interrupted regionkd write, not an input")
    ref = reference_for(reference, path, several)
    result = segmenter.segment_file(path, out, keep_image=preview is not None, output_type=output_type,
                                    statistics=statistics)
    outs = dict(result.outputs)
    if preview is not None:
        target = preview_path(preview, path, several)
        _write_preview(target, result, segmenter, ref)
        outs["preview"] = str(target)
    return FileOutcome(path, result=result, outputs=outs)


def segment_files(segmenter, inputs, output, output_type: str = "nifti", statistics: bool = False,
                  preview=None, reference=None, on_outcome=None) -> list[FileOutcome]:
    """Segment every input (see `expand_inputs`) into `output` (see `output_paths`), in order; one
    FileOutcome per input, passed to `on_outcome` as soon as it is known. `preview`: a PNG per
    input; `reference`: ground-truth masks drawn in it. Nothing but a Ctrl-C stops the run."""
    paths = expand_inputs(inputs)
    one_given = len(inputs) == 1 and not (Path(inputs[0]).is_dir() and paths != [Path(inputs[0])])
    outputs = output_paths(paths, Path(output), one_given=one_given, output_type=output_type)
    for folder in {o.parent for o in outputs}:
        remove_stale_temps(folder)           # temporaries of earlier runs that were killed mid-write
    outcomes, seen = [], set()
    for path, out in zip(paths, outputs):
        try:
            if out in seen:
                raise InputError(f"{path}: another input already writes {out}")
            seen.add(out)
            outcome = _segment_one(segmenter, path, out, len(paths) > 1, output_type, statistics, preview, reference)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one input must never stop the others
            outcome = FileOutcome(path, error=describe_failure(path, exc))
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes

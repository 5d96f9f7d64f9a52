"""Segmenting many files in one call (`Segmenter.segment_files`, which regionkd-segment calls):
inputs expanded (files, folders of NIfTI files, DICOM series folders, globs, CSV lists), each
result named after its input, and every input tried in isolation: whatever goes wrong with one (a
refused volume, a full disk, MemoryError, any exception) becomes that input's failed outcome and
the others still run. The next input is read and the previous one written while one is inferred
(`_run_pipelined`); `select_part` splits the inputs across processes."""
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


GLOB_CHARACTERS = "*?["


def read_input_list(csv_path: Path) -> list[Path]:
    """The inputs a CSV file lists: its `input` column (or its first column when no header names
    one), one path per row, relative paths taken from the CSV's folder."""
    import csv

    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{csv_path}: an empty input list")
    header = [c.strip().lower() for c in rows[0]]
    column = header.index("input") if "input" in header else 0
    if "input" in header or not (Path(rows[0][0]).suffix or (csv_path.parent / rows[0][0]).exists()):
        rows = rows[1:]                          # a header row
    paths = [Path(r[column].strip()) for r in rows if len(r) > column and r[column].strip()]
    if not paths:
        raise InputError(f"{csv_path}: no input paths under its {'input' if 'input' in header else 'first'} column")
    return [p if p.is_absolute() else csv_path.parent / p for p in paths]


def expand_inputs(paths) -> list[Path]:
    """Files as given; a CSV file gives the inputs it lists (`read_input_list`); a glob pattern
    ("scans/*.nii.gz", quoted so the shell leaves it) gives the files it matches, sorted; a folder
    holding NIfTI files gives those files; any other folder is a DICOM series. In a folder, hidden
    files (".name": editor and OS droppings, AppleDouble "._x.nii.gz") and the temporary files of
    interrupted writes are never inputs."""
    import glob

    out = []
    for p in map(Path, paths):
        if not p.exists() and any(ch in str(p) for ch in GLOB_CHARACTERS):
            matches = sorted(Path(m) for m in glob.glob(str(p)) if not is_temp_name(Path(m).name))
            out.extend(matches if matches else [p])       # no match: reported as missing in its turn
        elif p.is_file() and p.name.lower().endswith(".csv"):
            out.extend(read_input_list(p))
        elif p.is_dir():
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


@dataclass
class _Planned:
    """An input checked before it is read: where its result goes, its reference mask, or why not."""
    input: Path
    output: Path
    reference: Path | None = None
    error: str | None = None


def _plan(paths, outputs, reference, several: bool) -> list[_Planned]:
    planned, seen = [], set()
    for path, out in zip(paths, outputs):
        try:
            if out in seen:
                raise InputError(f"{path}: another input already writes {out}")
            seen.add(out)
            if is_temp_name(path.name):
                raise InputError(f"{path}: a temporary file left by an interrupted regionkd write, not an input")
            planned.append(_Planned(path, out, reference_for(reference, path, several)))
        except RegionKDError as exc:
            planned.append(_Planned(path, out, error=describe_failure(path, exc)))
    return planned


def _guarded(path: Path, step, *args):
    """(value, None) of `step(*args)`, or (None, the failure line): one input never stops the others."""
    try:
        return step(*args), None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one input must never stop the others
        return None, describe_failure(path, exc)


class _Steps:
    """The three steps of one input (read, segment, write with its preview) for segment_files."""

    def __init__(self, segmenter, output_type, statistics, preview, several):
        self.segmenter, self.output_type, self.statistics = segmenter, output_type, statistics
        self.preview, self.several = preview, several

    def read(self, item: _Planned):
        if item.error is not None:
            return None, item.error
        return _guarded(item.input, self.segmenter.read_file, item.input, item.output, self.output_type,
                        self.statistics)

    def segment(self, item: _Planned, job):
        return _guarded(item.input, self.segmenter.segment_job, job, self.preview is not None)

    def write(self, item: _Planned, job, result) -> FileOutcome:
        def write():
            self.segmenter.write_file(job, result)
            outs = dict(result.outputs)
            if self.preview is not None:
                target = preview_path(self.preview, item.input, self.several)
                _write_preview(target, result, self.segmenter, item.reference)
                outs["preview"] = str(target)
            result.image = None                  # the voxels were kept for the preview only
            return outs

        outs, error = _guarded(item.input, write)
        return FileOutcome(item.input, error=error) if error else FileOutcome(item.input, result=result, outputs=outs)


def _run_sequential(steps: _Steps, planned, emit) -> None:
    for item in planned:
        job, error = steps.read(item)
        if error is None:
            result, error = steps.segment(item, job)
        emit(FileOutcome(item.input, error=error) if error else steps.write(item, job, result))


def _run_pipelined(steps: _Steps, planned, emit) -> None:
    """Read the next input and write the previous one in background threads while one is inferred.
    At most one read ahead and one write behind: memory holds three volumes at most, and outcomes
    come in input order, as in the sequential run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="regionkd-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="regionkd-write") as writer:
        ahead = reader.submit(steps.read, planned[0]) if planned else None
        behind = None
        for i, item in enumerate(planned):
            job, error = ahead.result()
            ahead = reader.submit(steps.read, planned[i + 1]) if i + 1 < len(planned) else None
            if error is None:
                result, error = steps.segment(item, job)
            if behind is not None:
                emit(behind.result())
                behind = None
            if error is not None:
                emit(FileOutcome(item.input, error=error))
            else:
                behind = writer.submit(steps.write, item, job, result)
        if behind is not None:
            emit(behind.result())


def select_part(items: list, num_parts: int = 1, part_id: int = 0) -> list:
    """Part `part_id` of `num_parts` of the inputs, as nnU-Net splits them (`items[part_id::num_parts]`):
    deterministic, so N processes given the same inputs (a SLURM array) share them without overlap."""
    if int(num_parts) < 1 or not 0 <= int(part_id) < int(num_parts):
        raise InputError(f"--part-id {part_id} of --num-parts {num_parts}: need num-parts >= 1 and "
                         f"0 <= part-id < num-parts")
    return list(items)[int(part_id)::int(num_parts)]


def segment_files(segmenter, inputs, output, output_type: str = "nifti", statistics: bool = False,
                  preview=None, reference=None, on_outcome=None, pipelined: bool = True, num_parts: int = 1,
                  part_id: int = 0) -> list[FileOutcome]:
    """Segment every input (see `expand_inputs`) into `output` (see `output_paths`); one FileOutcome
    per input, in input order, passed to `on_outcome` as soon as it is known. `preview`: a PNG per
    input; `reference`: ground-truth masks drawn in it. `pipelined`: overlap reading and writing
    with inference (the same outcomes and files as one after the other). `num_parts`, `part_id`:
    only this part of the inputs (`select_part`). Nothing but a Ctrl-C stops the run."""
    paths = expand_inputs(inputs)
    one_given = len(inputs) == 1 and not (Path(inputs[0]).is_dir() and paths != [Path(inputs[0])])
    outputs = output_paths(paths, Path(output), one_given=one_given, output_type=output_type)
    several = len(paths) > 1
    paths, outputs = select_part(paths, num_parts, part_id), select_part(outputs, num_parts, part_id)
    for folder in {o.parent for o in outputs}:
        remove_stale_temps(folder)           # temporaries of earlier runs that were killed mid-write
    outcomes = []

    def emit(outcome: FileOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    steps = _Steps(segmenter, output_type, statistics, preview, several)
    run = _run_pipelined if pipelined and len(paths) > 1 else _run_sequential
    run(steps, _plan(paths, outputs, reference, several), emit)
    return outcomes

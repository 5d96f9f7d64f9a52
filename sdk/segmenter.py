"""`Segmenter`: one call from a CT volume to a label mask with the input's geometry.

Pipeline (from the bundle's manifest, identical to training through `regionkd.sdk.preprocess`):
closest canonical RAS orientation -> axial slices -> HU window to [-1, 1] -> resize to the
network size -> batched inference -> logits resized back -> argmax -> largest connected component
per organ class (see `regionkd.sdk.postprocess`) -> mask back into the input's own voxel order,
written as uint8 with the input's affine and qform/sform codes.

Before any of that, the volume is checked (`regionkd.sdk.plausibility`): what is not a plausible
CT in Hounsfield units, or whose axial plane is ambiguous, is refused with every reason named;
`allow_implausible=True` segments it anyway and the reasons become `result.warnings`, which also
carry the warnings that never refuse (obliquity above 15 degrees, spacing far from the training
spacing). `result.obliquity_deg`, `result.axial_axis` and `result.spacing_mm` say how it was
sliced, `result.bundle_signature` whether the bundle's signature was verified.

Threads: one Segmenter may serve several threads. Nothing per volume is stored on the object, and
a backend that is not thread-safe (TensorRT: one execution context and stream) is serialised with
a lock, so concurrent calls are correct; for parallel GPU throughput create one Segmenter per
thread. Memory stays flat: slices are processed batch by batch and nothing is cached per volume.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BackendError, InputError
from .mask_io import check_output_path, mask_image, write_mask
from .nifti_bounds import DEFAULT_MAX_VOXELS
from .outputs import OUTPUT_TYPES, check_output_type, seg_path_for, statistics_path_for  # noqa: F401
from .orientation import slice_geometry, to_canonical
from .plausibility import Findings, check_geometry, check_header, check_intensities, check_spacing
from .postprocess import keep_largest_components
from .preprocess import logits_to_labels, preprocess_slices, slices_to_volume, volume_to_slices
from .signing import resolve_trusted_keys
from .timing import StageTimer
from .volume_io import validate_image

LESION_WORDS = ("tumour", "tumor", "lesion", "cyst", "metastasis")
EXTRA_STAGES = ("statistics", "dicom_seg")      # timed when asked for, outside timing.STAGES, in the total


@dataclass
class SegmentationResult:
    mask: nib.Nifti1Image            # uint8, the input's voxel order and affine
    timings: dict                    # ms per stage: load, preprocess, inference, postprocess, write, total (+ gpu)
    class_names: list = field(default_factory=list)
    image: np.ndarray | None = None  # the input's HU voxels, kept only when segment_file(keep_image=True)
    warnings: list = field(default_factory=list)   # what deserves a second look (see the module doc)
    obliquity_deg: float = 0.0       # largest angle between a voxel axis and the world axis it is taken for
    axial_axis: int = 2              # the input's voxel axis that was sliced as axial
    spacing_mm: tuple = ()           # voxel size along the canonical (x, y, z) axes
    bundle_signature: str = ""       # e.g. "signature verified (key ...)" or "unsigned (no trusted key configured)"
    statistics: dict | None = None   # per-class volumes and HU, lesions (regionkd.sdk.statistics), when asked for
    outputs: dict = field(default_factory=dict)    # what segment_file wrote: {"nifti": path, "dicom-seg": path, ...}
    dicom_seg: object = None         # the DICOM SEG dataset (pydicom), for a DICOM series input with dicom-seg output

    @property
    def num_slices(self) -> int:
        return int(self.timings.get("slices", 0))


PAIRED_ORGAN_WORDS = ("kidney",)     # organs a patient usually has two of


def default_organ_labels(class_names) -> dict[int, int]:
    """Organ classes when the manifest does not say: every non-background class that is not a
    lesion, with two components for a paired organ (kidneys) and one otherwise."""
    return {i: 2 if any(w in name.lower() for w in PAIRED_ORGAN_WORDS) else 1 for i, name in enumerate(class_names)
            if i > 0 and not any(word in name.lower() for word in LESION_WORDS)}


def organ_labels_of(preprocessing: dict, class_names) -> dict[int, int]:
    """{organ label: components kept} from a manifest's preprocessing (`largest_component_labels`,
    optionally `largest_component_counts` {"label": count}), or the default from the class names."""
    if "largest_component_labels" not in preprocessing:
        return default_organ_labels(class_names)
    counts = {int(k): int(v) for k, v in (preprocessing.get("largest_component_counts") or {}).items()}
    return {int(k): counts.get(int(k), 1) for k in preprocessing["largest_component_labels"]}


def image_to_hu(image, name: str = "image", complex_ok: bool = False) -> np.ndarray:
    """float32 voxels of an in-memory nibabel image, validated like a file (3D, finite, usable affine;
    complex voxels refused unless complex_ok, then their real part)."""
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise InputError(f"{name}: expected a nibabel image or a numpy array with its affine, got "
                         f"{type(image).__name__}")
    dataobj = image.dataobj
    if np.dtype(image.get_data_dtype()).kind == "c":
        if not complex_ok:
            raise InputError(f"{name}: {image.get_data_dtype()} (complex) voxels; a CT volume is real-valued "
                             "and the imaginary part would be dropped")
        data = np.real(np.asanyarray(dataobj)).astype(np.float32)
    else:
        data = dataobj.get_scaled(np.float32) if hasattr(dataobj, "get_scaled") else np.asarray(dataobj, dtype=np.float32)
    return validate_image(data, image.affine, name)[0]


def array_image(array, affine, name: str = "image") -> nib.Nifti1Image:
    """A NIfTI image of a 3D numpy array of HU and its 4x4 RAS affine (qform and sform code 1)."""
    if affine is None:
        raise InputError(f"{name}: a numpy array needs its affine (4x4 voxel-to-world, RAS, mm): "
                         "segment(array, affine=...)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"{name}: the affine must be 4x4, got shape {affine.shape}")
    array = np.asarray(array)
    if array.dtype.kind not in "biuf" and not (array.dtype.kind == "c"):
        raise InputError(f"{name}: voxels of type {array.dtype} are not numbers")
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    return image


class _Stage:
    """Adds the milliseconds of a block to `timings[name]` and to `timings["total"]` (for the steps
    outside the five STAGES: statistics, dicom_seg)."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        import time

        self._start = time.perf_counter()

    def __exit__(self, *exc):
        import time

        ms = (time.perf_counter() - self._start) * 1000.0
        self.timings[self.name] = self.timings.get(self.name, 0.0) + ms
        self.timings["total"] = self.timings.get("total", 0.0) + ms


def _verified_bundle(bundle, trusted_keys) -> Bundle:
    """`bundle` (a path or a Bundle) loaded under the trusted keys given plus REGIONKD_TRUSTED_KEYS."""
    keys = resolve_trusted_keys(trusted_keys)
    if not isinstance(bundle, Bundle):
        return load_bundle(bundle, trusted_keys=keys)
    if keys and not (bundle.signature.verified and bundle.signature.key_id in {k.key_id for k in keys}):
        return load_bundle(bundle.root, trusted_keys=keys)     # verify it now, from its files
    return bundle


@dataclass
class FileJob:
    """One input between the steps of `Segmenter.segment_file`: where its outputs go, its timer and
    findings, and (until segmented) its voxels and geometry."""
    input_path: Path
    paths: dict
    timer: StageTimer
    findings: Findings
    data: np.ndarray | None = None
    affine: np.ndarray | None = None
    header: object = None
    series: object = None


def _planned_outputs(input_path: Path, output_path: Path, output_type: str, statistics: bool, seg_path=None,
                     statistics_path=None) -> dict:
    """{kind: path} of what segment_file writes, checked before anything is read: a SEG needs a
    DICOM series input and a .dcm name, and no output may be the input itself."""
    paths = {}
    if output_type == "dicom-seg":
        if not output_path.name.lower().endswith(".dcm"):
            raise InputError(f"output {output_path}: a DICOM SEG file name must end in .dcm")
        paths["dicom-seg"] = output_path
    else:
        paths["nifti"] = check_output_path(output_path)
        if output_type == "both":
            paths["dicom-seg"] = Path(seg_path) if seg_path is not None else seg_path_for(output_path)
    if statistics:
        paths["statistics"] = Path(statistics_path) if statistics_path is not None else statistics_path_for(output_path)
    for path in paths.values():
        if input_path.exists() and path.resolve() == input_path.resolve():
            raise InputError(f"output {path} is the input file; refusing to overwrite it")
    if "dicom-seg" in paths and not input_path.is_dir():
        raise InputError(f"{input_path}: --output-type {output_type} needs a DICOM series folder as input (a "
                         "DICOM SEG references the UIDs of the CT images it was computed from); this input is "
                         "not a folder. Use --output-type nifti, or give the DICOM series")
    return paths


def _write_outputs(result, paths: dict) -> None:
    """Each output atomically, all of them built before the first is written."""
    if "nifti" in paths:
        write_mask(result.mask, paths["nifti"])
    if "dicom-seg" in paths:
        from .dicom_seg import write_segmentation
        write_segmentation(result.dicom_seg, paths["dicom-seg"])
    if "statistics" in paths:
        from .statistics import write_statistics
        write_statistics(paths["statistics"], result.statistics)


class Segmenter:
    """Segment CT volumes with a bundle. `backend`: auto | onnxruntime | tensorrt | tensorrt-rtx.

    trusted_keys: public key files; with any (or REGIONKD_TRUSTED_KEYS set) only a bundle signed by
    one of them is loaded. allow_implausible: segment implausible volumes with warnings instead of
    refusing them. axial_axis: the input's voxel axis to slice as axial (default: the closest one).
    max_voxels: larger volumes are refused before their data is read. device: the CUDA device (GPU
    index) the TensorRT backends run on. fused: run the bundle's fused model (pre- and
    post-processing inside the graph) where the manifest lists one for this precision and backend
    (None: when there is one; False: the numpy path; True: required)."""

    def __init__(self, bundle, backend: str = "auto", precision: str = "fp32", batch_size: int | None = None,
                 threads: int | None = None, largest_component: bool = True, trusted_keys=None,
                 allow_implausible: bool = False, axial_axis: int | None = None,
                 max_voxels: int | None = DEFAULT_MAX_VOXELS, device: int = 0, fused: bool | None = None):
        from .backends import create_backend

        self.backend = None
        self.bundle = _verified_bundle(bundle, trusted_keys)
        prep = self.bundle.preprocessing
        organ_labels = organ_labels_of(prep, self.bundle.class_names)
        engine = create_backend(backend, self.bundle, precision, threads=threads, batch_size=batch_size, device=device,
                                fused=fused)
        self._setup(engine, prep, self.bundle.class_names, organ_labels if largest_component else {}, batch_size,
                    allow_implausible, axial_axis, max_voxels)

    @classmethod
    def from_backend(cls, backend, preprocessing: dict, class_names, organ_labels=None, batch_size=None,
                     allow_implausible: bool = False, axial_axis: int | None = None,
                     max_voxels: int | None = DEFAULT_MAX_VOXELS):
        """A Segmenter over any `backends.base.Backend` (e.g. the training package's backend over a checkpoint,
        or onnxruntime over one ONNX file in the export's validation)."""
        from .backends.base import Backend

        if not isinstance(backend, Backend):
            raise BackendError(f"Segmenter.from_backend needs a regionkd.sdk.backends.base.Backend, got "
                               f"{type(backend).__name__}")
        self = cls.__new__(cls)
        self.bundle = None
        if organ_labels is None:
            organ_labels = organ_labels_of(preprocessing, class_names)
        self._setup(backend, preprocessing, class_names, organ_labels, batch_size, allow_implausible, axial_axis,
                    max_voxels)
        return self

    @property
    def bundle_signature(self) -> str:
        return self.bundle.signature.describe() if self.bundle is not None else "no bundle"

    def _setup(self, backend, preprocessing, class_names, organ_labels, batch_size, allow_implausible=False,
               axial_axis=None, max_voxels=DEFAULT_MAX_VOXELS):
        if axial_axis not in (None, 0, 1, 2):
            raise InputError(f"axial_axis must be 0, 1 or 2 (a voxel axis of the input), got {axial_axis!r}")
        self.allow_implausible = bool(allow_implausible)
        self.axial_axis = axial_axis
        self.max_voxels = max_voxels
        self.trained_spacing = preprocessing.get("spacing")
        self.backend = backend
        self.window = [float(v) for v in preprocessing["window"]]
        self.input_size = tuple(int(v) for v in preprocessing["input_size"])
        self.class_names = list(class_names)
        from .postprocess import organ_component_counts

        self.organ_labels = organ_component_counts(organ_labels)
        self.batch_size = int(batch_size or backend.max_batch)
        self._lock = None if backend.thread_safe else threading.Lock()

    @property
    def model_size_bytes(self) -> int:
        """Size of the model file the backend runs (ONNX or engine)."""
        path = self.backend.model_path
        return int(os.path.getsize(path)) if path else 0

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self._lock is None:
            return self.backend.run(batch)
        with self._lock:
            return self.backend.run(batch)

    def segment(self, image, affine=None, name: str = "image", axial_axis: int | None = None,
                statistics: bool = False) -> SegmentationResult:
        """Segment an in-memory volume: a nibabel image, or a 3D numpy array of HU with its 4x4
        voxel-to-world (RAS, mm) `affine`. The mask has the input's shape, voxel order and affine.
        `statistics`: also compute `result.statistics` (regionkd.sdk.statistics)."""
        timer = StageTimer()
        findings = Findings(name)
        if isinstance(image, np.ndarray) or (affine is not None and not isinstance(image, nib.spatialimages.SpatialImage)):
            image = array_image(image, affine, name)
        elif affine is not None:
            raise InputError(f"{name}: give an affine only with a numpy array; a nibabel image has its own")
        with timer.stage("load"):
            dataobj = getattr(image, "dataobj", None)
            check_header(findings, getattr(image, "header", None),
                         (getattr(dataobj, "slope", None), getattr(dataobj, "inter", None)))
            if not self.allow_implausible:
                findings.settle(False)          # refused from the header alone: no voxel is read
            data = image_to_hu(image, name, complex_ok=self.allow_implausible)
        result = self._segment_array(data, image.affine, image.header, timer, findings, axial_axis)
        if statistics:
            result.statistics = self._statistics(result, data, name)
        return result

    def _statistics(self, result, data, name) -> dict:
        from .statistics import compute_statistics

        with _Stage(result.timings, "statistics"):
            return compute_statistics(np.asarray(result.mask.dataobj), data, result.mask.affine, self.class_names,
                                      axial_axis=result.axial_axis, input_name=name)

    def _segment_array(self, data, affine, header, timer: StageTimer, findings: Findings,
                       axial_axis: int | None = None) -> SegmentationResult:
        with timer.stage("preprocess"):
            # plausibility of the voxels and of the slicing (refused here unless allow_implausible)
            geometry = slice_geometry(affine, self.axial_axis if axial_axis is None else axial_axis)
            check_intensities(findings, data)
            check_geometry(findings, geometry)
            canonical = to_canonical(data, affine, ornt=geometry.ornt)    # views only
            check_spacing(findings, canonical.spacing, self.trained_spacing)
            warnings = findings.settle(self.allow_implausible)
            hu_slices = volume_to_slices(canonical.data)           # (z, x, y), a view
        labels, gpu_ms = self._label_slices(hu_slices, timer)
        z = hu_slices.shape[0]
        with timer.stage("postprocess"):
            volume = slices_to_volume(labels)
            volume = keep_largest_components(volume, self.organ_labels, len(self.class_names))
            mask = mask_image(canonical.to_original(volume), affine, header, self.class_names)
        timings = timer.as_dict()
        timings["slices"] = z
        if gpu_ms is not None:
            timings["gpu"] = gpu_ms
        return SegmentationResult(mask=mask, timings=timings, class_names=self.class_names, warnings=warnings,
                                  obliquity_deg=round(geometry.obliquity_deg, 2), axial_axis=geometry.axial_axis,
                                  spacing_mm=tuple(round(v, 4) for v in canonical.spacing),
                                  bundle_signature=self.bundle_signature)

    def _label_slices(self, hu_slices: np.ndarray, timer: StageTimer):
        """(z, x, y) uint8 labels of (z, x, y) HU slices, batch by batch, and the GPU ms if measured. A
        fused backend gets the HU slices as they are (window, resizes and argmax in its model);
        otherwise they are preprocessed here and the logits resized back and argmaxed here."""
        z, x, y = hu_slices.shape
        labels = np.empty((z, x, y), dtype=np.uint8)
        gpu_ms = None
        for start in range(0, z, self.batch_size):
            stop = min(start + self.batch_size, z)
            with timer.stage("preprocess"):
                batch = np.ascontiguousarray(hu_slices[start:stop, None], dtype=np.float32) if self.backend.fused \
                    else preprocess_slices(hu_slices[start:stop], self.window, self.input_size)
            with timer.stage("inference"):
                out = self._infer(batch)
            if self.backend.last_gpu_ms is not None:
                gpu_ms = (gpu_ms or 0.0) + float(self.backend.last_gpu_ms)
            with timer.stage("postprocess"):
                labels[start:stop] = out if self.backend.fused else logits_to_labels(out, (x, y))
        return labels, gpu_ms

    def segment_file(self, input_path, output_path, keep_image: bool = False, axial_axis: int | None = None,
                     output_type: str = "nifti", statistics: bool = False, seg_path=None,
                     statistics_path=None) -> SegmentationResult:
        """Read a NIfTI file (or a DICOM series folder), segment it, write the result atomically.

        output_type: "nifti" (a uint8 NIfTI mask at `output_path`), "dicom-seg" (a DICOM SEG at
        `output_path`, which ends in .dcm; needs a DICOM series input) or "both" (the NIfTI mask at
        `output_path` and the SEG at `seg_path`, default `<stem>.seg.dcm` beside it).
        statistics: also compute `result.statistics` and write them as JSON (`statistics_path`,
        default `<stem>.statistics.json` beside the mask). Every output is built before the first
        is written, and each is written atomically. `keep_image` returns the input's HU voxels in
        `result.image` (e.g. for a preview) so that nothing has to read the file a second time."""
        job = self.read_file(input_path, output_path, output_type, statistics, seg_path, statistics_path)
        return self.write_file(job, self.segment_job(job, keep_image=keep_image, axial_axis=axial_axis))

    # segment_file in its three steps, which segment_files overlaps across volumes (reading the next
    # and writing the previous while one is inferred)

    def read_file(self, input_path, output_path, output_type: str = "nifti", statistics: bool = False,
                  seg_path=None, statistics_path=None) -> FileJob:
        """Step 1 of segment_file: plan and check the outputs, read and check the input."""
        check_output_type(output_type)
        input_path = Path(input_path)
        paths = _planned_outputs(input_path, Path(output_path), output_type, statistics, seg_path, statistics_path)
        job = FileJob(input_path, paths, StageTimer(), Findings(str(input_path)))
        with job.timer.stage("load"):
            job.data, job.affine, job.header, job.series, scaling = self._read_input(input_path)
            check_header(job.findings, job.header, scaling)
        return job

    def segment_job(self, job: FileJob, keep_image: bool = False, axial_axis: int | None = None) -> SegmentationResult:
        """Step 2: segment the volume read (statistics and DICOM SEG too, when its outputs ask for
        them); the job lets go of its voxels."""
        result = self._segment_array(job.data, job.affine, job.header, job.timer, job.findings, axial_axis)
        if "statistics" in job.paths:
            result.statistics = self._statistics(result, job.data, str(job.input_path))
        if "dicom-seg" in job.paths:
            result.dicom_seg = self.dicom_segmentation(result, job.series)
        if keep_image:
            result.image = job.data
        job.data = job.series = None
        return result

    def write_file(self, job: FileJob, result: SegmentationResult) -> SegmentationResult:
        """Step 3: write every output atomically; the timings gain load and write."""
        with job.timer.stage("write"):
            _write_outputs(result, job.paths)
        extra = {k: result.timings[k] for k in EXTRA_STAGES if k in result.timings}
        result.timings.update(job.timer.as_dict())
        result.timings["total"] += sum(extra.values())
        result.outputs = {k: str(v) for k, v in job.paths.items()}
        return result

    def _read_input(self, input_path: Path):
        """(HU voxels, affine, header, DicomSeries or None, NIfTI scaling or None) of a NIfTI file or a
        DICOM series folder, refused before reading when it declares more than max_voxels."""
        if input_path.is_dir():
            from .dicom_io import load_dicom_series
            series = load_dicom_series(input_path, max_voxels=self.max_voxels)
            image = series.image
            return image_to_hu(image, str(input_path)), image.affine, image.header, series, None
        from .volume_io import read_nifti
        vol = read_nifti(input_path, kind="image", max_voxels=self.max_voxels, complex_ok=self.allow_implausible)
        return np.asarray(vol.data, dtype=np.float32), vol.affine, vol.header, None, vol.scaling

    def segment_files(self, inputs, output, output_type: str = "nifti", statistics: bool = False, preview=None,
                      reference=None, on_outcome=None, pipelined: bool = True, num_parts: int = 1,
                      part_id: int = 0) -> list:
        """Segment many inputs (NIfTI files, folders of them, DICOM series folders) into `output` (a
        file for one input, else a folder of results named like the inputs), each in isolation: one
        `regionkd.sdk.batch.FileOutcome` per input, in order, also passed to `on_outcome` as soon as
        it is known. `preview`: a PNG per input (with `reference` masks drawn beside, optional).
        `pipelined`: read the next input and write the previous one while one is inferred.
        `num_parts`, `part_id`: only that part of the inputs (`regionkd.sdk.batch.select_part`)."""
        from .batch import segment_files

        return segment_files(self, inputs, output, output_type=output_type, statistics=statistics, preview=preview,
                             reference=reference, on_outcome=on_outcome, pipelined=pipelined, num_parts=num_parts,
                             part_id=part_id)

    def segment_series(self, series, statistics: bool = False, axial_axis: int | None = None) -> SegmentationResult:
        """Segment a `regionkd.sdk.dicom_io.DicomSeries` (e.g. retrieved from a PACS) and build its
        DICOM SEG (`result.dicom_seg`); nothing is written."""
        timer = StageTimer()
        findings = Findings(series.where)
        with timer.stage("load"):
            data = image_to_hu(series.image, series.where)
            check_header(findings, series.image.header, None)
        result = self._segment_array(data, series.image.affine, series.image.header, timer, findings, axial_axis)
        if statistics:
            result.statistics = self._statistics(result, data, series.where)
        result.dicom_seg = self.dicom_segmentation(result, series)
        return result

    def dicom_segmentation(self, result: SegmentationResult, series):
        """The DICOM SEG (a highdicom Segmentation) of `result` over its source `series`."""
        from .dicom_seg import algorithm_parameters, build_segmentation

        algorithm = algorithm_parameters(self.bundle, self.backend.precision, self.backend.name)
        codes = ((self.bundle.manifest.get("model") or {}).get("segment_codes") if self.bundle is not None else None)
        with _Stage(result.timings, "dicom_seg"):
            return build_segmentation(np.asarray(result.mask.dataobj), series, self.class_names, algorithm=algorithm,
                                      manifest_codes=codes)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

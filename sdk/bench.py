"""Per-volume latency of a bundle, and of training checkpoints beside it, on one CT volume, with
the stage breakdown, so that the time spent outside the network is visible (`regionkd-bench`
parses its options and calls `run_benchmark`; benchmarks/deploy.py uses `measure`).

Each configuration runs the full file-to-file path (`Segmenter.segment_file`: read the NIfTI file
or DICOM series, preprocess, inference, postprocess, write the mask) after warm-up runs; a row
gives the mean, SD and median over the repeats, p95 from 20 repeats on and p99 from 100 (fewer
runs cannot estimate a tail), and the GPU compute time where a backend measures it. Peak memory
is each configuration's own: the resident high-water mark is reset before the configuration
starts (Linux /proc/self/clear_refs) and read after its last run. A training checkpoint runs
behind the backend its package registers (`backends.open_checkpoint`) through the same
Segmenter, so its stage times compare directly with the bundle's.
"""
from __future__ import annotations

import logging
import os
import platform
import resource
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from .errors import InputError, MissingDependencyError, RegionKDError
from .timing import STAGES

log = logging.getLogger(__name__)


def synthetic_ct(shape, spacing=(0.75, 0.75, 2.5), seed: int = 0):
    """A CT-like volume (int16 HU, RAS affine): air, body, a liver with a hypodense tumour, noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[np.broadcast_to((x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1, shape)] = 40.0
    liver = ((x + 0.35) / 0.4) ** 2 + ((y - 0.1) / 0.45) ** 2 + (z / 0.8) ** 2 <= 1
    hu[liver] = 90.0
    hu[((x + 0.3) / 0.12) ** 2 + ((y - 0.1) / 0.12) ** 2 + (z / 0.25) ** 2 <= 1] = 45.0
    hu += rng.normal(0, 12, size=shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return np.round(hu).astype(np.int16), affine


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


#: runs needed before a percentile is reported: a p95 of 5 runs is their maximum, not a tail estimate
MIN_RUNS_FOR = {95: 20, 99: 100}


def tail(values, q: int) -> float | None:
    return percentile(values, q) if len(values) >= MIN_RUNS_FOR[q] else None


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux: VmHWM); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> tuple[float, str]:
    """(peak resident memory in MB, its scope): since the last reset_peak_rss() ("configuration") where
    Linux gives VmHWM, else the process's high-water mark since it started ("process")."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0, "configuration"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "process"   # kB on Linux


def measure(segmenter, volume: Path, out_dir: Path, warmup: int, repeat: int, rss_reset: bool = False) -> dict:
    """Warm up, then time `repeat` file-to-file runs; plus one traced run for the Python/numpy heap peak.
    `rss_reset`: the high-water mark was reset when this configuration started (see peak_rss_mb)."""
    out = out_dir / "mask.nii.gz"
    for _ in range(warmup):
        segmenter.segment_file(volume, out)
    runs = [segmenter.segment_file(volume, out).timings for _ in range(repeat)]
    tracemalloc.start()
    try:
        segmenter.segment_file(volume, out)
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    totals = [r["total"] for r in runs]
    median_stage = {s: float(np.median([r[s] for r in runs])) for s in STAGES}
    slices = int(runs[0]["slices"])
    med_total = float(np.median(totals))
    rss, scope = peak_rss_mb()
    gpu = [r["gpu"] for r in runs if "gpu" in r]
    row = {
        "median_ms": med_total,
        "mean_ms": float(np.mean(totals)),
        "sd_ms": float(np.std(totals, ddof=1)) if len(totals) > 1 else 0.0,
        "p95_ms": tail(totals, 95),
        "p99_ms": tail(totals, 99),
        "min_ms": float(np.min(totals)),
        "max_ms": float(np.max(totals)),
        "stages_median_ms": median_stage,
        "outside_inference_share": 1.0 - median_stage["inference"] / med_total if med_total else None,
        "slices": slices,
        "slices_per_s": slices / (med_total / 1000.0) if med_total else None,
        "inference_slices_per_s": slices / (median_stage["inference"] / 1000.0) if median_stage["inference"] else None,
        "gpu_median_ms": float(np.median(gpu)) if gpu else None,
        "gpu_mean_ms": float(np.mean(gpu)) if gpu else None,
        "traced_peak_mb": traced_peak / 1e6,
        "peak_rss_mb": rss,
        "peak_rss_scope": scope if rss_reset or scope == "process" else "process",
        "repeat": repeat,
        "warmup": warmup,
    }
    return row


def format_table(rows) -> str:
    head = ["model", "backend", "prec", "path", "median ms", "mean ± SD ms", "p95 ms", "p99 ms", "gpu ms", "load", "pre",
            "infer", "post", "write", "outside %", "slices/s", "size MB", "params", "peak RSS MB"]
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["model"], r["backend"], r["precision"], r.get("path", "numpy"),
                          f"skipped: {r.get('reason', '')}"])
            continue
        st = r["stages_median_ms"]
        opt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append([r["model"], r["backend"], r["precision"], r.get("path", "numpy"), f"{r['median_ms']:.1f}",
                      f"{r.get('mean_ms', r['median_ms']):.1f} ± {r.get('sd_ms', 0.0):.1f}", opt(r.get("p95_ms")),
                      opt(r.get("p99_ms")), opt(r.get("gpu_median_ms")),
                      *(f"{st[s]:.1f}" for s in STAGES), f"{100 * r['outside_inference_share']:.1f}",
                      f"{r['slices_per_s']:.1f}", f"{r['size_bytes'] / 1e6:.3f}",
                      "-" if r.get("params") is None else f"{r['params']:,}", f"{r['peak_rss_mb']:.0f}"])
    full = [l for l in lines if len(l) == len(head)]
    widths = [max([len(head[i])] + [len(l[i]) for l in full]) for i in range(len(head))]

    def fmt(cells):
        return " | ".join(c.ljust(widths[i]) for i, c in enumerate(cells))

    out = [fmt(head), "-+-".join("-" * w for w in widths)]
    out += [fmt(l) if len(l) == len(head) else " | ".join(l) for l in lines]
    for r in rows:
        for mode, f in (r.get("folder") or {}).items():
            out.append(f"folder {r['backend']} {r['precision']} {r['path']} {mode}: {f['volumes']} volumes, "
                       f"{f['volumes_per_min']:.1f}/min, {f['ms_per_volume']:.0f} ms each, "
                       f"{100 * f['outside_inference_share']:.1f}% outside inference, peak RSS {f['peak_rss_mb']:.0f} MB")
    return "\n".join(out)




def describe_volume(volume: Path) -> dict:
    """Source and shape of the volume timed (a NIfTI file or a DICOM series folder)."""
    if Path(volume).is_dir():
        from .dicom_io import read_dicom_series
        return {"source": str(volume), "kind": "dicom", "shape": list(read_dicom_series(volume).shape)}
    from .volume_io import read_nifti
    return {"source": str(volume), "shape": list(read_nifti(volume).data.shape)}


def machine_info() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _open_configuration(bundle, kind: str, which: str, precision: str, path: str, batch_size, threads, device):
    """(Segmenter, the row's description) of one configuration: a bundle backend, precision and path
    (the fused model or the numpy pre/post-processing around the network), or a checkpoint."""
    from .backends import open_checkpoint
    from .segmenter import Segmenter

    if kind == "bundle":
        seg = Segmenter(bundle, backend=which, precision=precision, batch_size=batch_size, threads=threads,
                        device=device, fused=path == "fused")
        return seg, {"backend": seg.backend.name, "model_file": seg.backend.model_path.name,
                     "size_bytes": seg.model_size_bytes, "params": bundle.params}
    model = open_checkpoint(Path(which), threads=threads, batch_size=batch_size)
    seg = Segmenter.from_backend(model.backend, model.preprocessing, model.class_names,
                                 organ_labels=model.organ_labels, batch_size=batch_size)
    return seg, {"model": model.description, "backend": model.backend.name, "model_file": Path(which).name,
                 "size_bytes": model.size_bytes, "params": model.params}


def volume_copies(volume: Path, folder: Path, count: int) -> list[Path]:
    """`count` copies of `volume` (a NIfTI file or a DICOM series folder) in `folder`, named like
    the inputs of an archive: the folder of a throughput run."""
    import shutil

    folder.mkdir(parents=True)
    suffix = "" if volume.is_dir() else (".nii.gz" if volume.name.endswith(".gz") else ".nii")
    copies = [folder / f"case_{i:03d}{suffix}" for i in range(count)]
    for target in copies:
        shutil.copytree(volume, target) if volume.is_dir() else shutil.copyfile(volume, target)
    return copies


def _folder_runs(segmenter, inputs: list[Path], out_dir: Path) -> dict:
    """{"sequential": ..., "pipelined": ...} measure_folder rows over `inputs`."""
    return {mode: measure_folder(segmenter, inputs, out_dir / mode, mode == "pipelined")
            for mode in ("sequential", "pipelined")}


def _paths(bundle, backend: str, precision: str) -> tuple:
    """The paths timed side by side: the fused model where the bundle ships one that this backend
    runs (onnxruntime), and the numpy path always."""
    fused = backend in ("auto", "onnxruntime") and bundle.has_file(precision, "onnxruntime", graph="fused")
    return ("fused", "numpy") if fused else ("numpy",)


def planned_configurations(bundle, backends, precisions, checkpoints=()) -> list[tuple]:
    """(kind, backend or checkpoint, precision, path) of every configuration run_benchmark times."""
    return [("bundle", be, pr, path) for be in backends for pr in precisions for path in _paths(bundle, be, pr)] + [
        ("checkpoint", str(c), "fp32", "numpy") for c in checkpoints]


def run_benchmark(bundle, volume=None, shape=(512, 512, 100), backends=("auto",), precisions=None,
                  checkpoints=(), device: int = 0, repeat: int = 10, warmup: int = 1, batch_size=None,
                  threads=None, progress=None, on_skip=None, folder_volumes: int = 0) -> dict:
    """Time every (backend, precision) of `bundle` and every training checkpoint in `checkpoints` on
    `volume` (a NIfTI file or DICOM series folder; default: a synthetic CT of `shape`). Returns the
    report {bundle, volume, machine, settings, rows}; a configuration that cannot run here becomes a
    row with status "skipped" and its reason (`on_skip(row)` is called; `require_measured` says
    whether anything ran). `progress(1)` is called after each configuration. `folder_volumes`: also
    the throughput of each configuration over that many copies of the volume, one after the other
    and pipelined (`measure_folder`), in the row's "folder"."""
    from .bundle import Bundle, load_bundle

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    precisions = list(precisions) if precisions else b.precisions
    jobs = planned_configurations(b, backends, precisions, checkpoints)
    rows = []
    with tempfile.TemporaryDirectory(prefix="regionkd-bench-") as tmp:
        tmp = Path(tmp)
        if volume is None:
            data, affine = synthetic_ct(shape)
            volume = write_volume(tmp / "synthetic.nii.gz", data, affine)
            vol_info = {"source": "synthetic", "shape": list(data.shape)}
            del data
        else:
            vol_info = describe_volume(volume)
        copies = volume_copies(Path(volume), tmp / "folder", folder_volumes) if folder_volumes else []
        for kind, which, precision, path in jobs:
            row = {"model": b.manifest["model"].get("name", "bundle") if kind == "bundle" else Path(which).name,
                   "backend": which, "precision": precision, "path": path}
            rss_reset = reset_peak_rss()        # this configuration's own peak, not an earlier one's
            try:
                seg, described = _open_configuration(b, kind, which, precision, path, batch_size, threads, device)
            except (RegionKDError, MissingDependencyError) as exc:
                row.update(status="skipped", reason=str(exc))
                if on_skip is not None:
                    on_skip(row)
            else:
                row.update(described)
                with seg:
                    row.update(measure(seg, Path(volume), tmp, warmup, repeat, rss_reset=rss_reset), status="ok")
                    if folder_volumes:
                        row["folder"] = _folder_runs(seg, copies, tmp / f"folder-out{len(rows)}")
            rows.append(row)
            if progress is not None:
                progress(1)
    return {"bundle": str(b.root), "volume": vol_info, "machine": machine_info(),
            "settings": {"repeat": repeat, "warmup": warmup, "batch_size": batch_size, "threads": threads,
                         "device": device},
            "rows": rows}


def require_measured(report: dict) -> None:
    """Refuse a report in which no configuration could run, naming why each was skipped."""
    if not any(r.get("status") == "ok" for r in report["rows"]):
        raise InputError("nothing could be benchmarked: " + "; ".join(r.get("reason", "") for r in report["rows"]))


def measure_folder(segmenter, inputs, out_dir: Path, pipelined: bool) -> dict:
    """Throughput of `Segmenter.segment_files` over `inputs` (a warm-up volume first): volumes per
    minute, the stage times summed over the volumes, the share of the wall time spent outside
    inference, and the peak memory of this configuration."""
    import time

    segmenter.segment_file(inputs[0], Path(out_dir) / "warmup.nii.gz")
    rss_reset = reset_peak_rss()
    start = time.perf_counter()
    outcomes = segmenter.segment_files(list(inputs), Path(out_dir) / ("pipelined" if pipelined else "sequential"),
                                       pipelined=pipelined)
    wall_ms = (time.perf_counter() - start) * 1000.0
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        raise InputError("the folder run failed: " + "; ".join(failed))
    stages = {s: float(sum(o.result.timings[s] for o in outcomes)) for s in STAGES}
    rss, scope = peak_rss_mb()
    return {"volumes": len(outcomes), "pipelined": bool(pipelined), "wall_ms": wall_ms,
            "volumes_per_min": len(outcomes) / (wall_ms / 60000.0), "ms_per_volume": wall_ms / len(outcomes),
            "stages_sum_ms": stages, "outside_inference_share": 1.0 - stages["inference"] / wall_ms,
            "peak_rss_mb": rss, "peak_rss_scope": scope if rss_reset or scope == "process" else "process"}


def measure_floor(bundle, volume: Path, precision: str, threads=None, batch_size=None, repeat: int = 3) -> dict:
    """What no pipeline can go below on this machine for `volume`: inflating its gzip stream (ISA-L,
    as the SDK reads it) plus running the network alone over its slices (inputs prepared beforehand),
    medians of `repeat` runs."""
    import time

    from isal import isal_zlib

    from .backends import create_backend
    from .orientation import slice_geometry, to_canonical
    from .preprocess import preprocess_slices, volume_to_slices
    from .volume_io import read_nifti

    blob = Path(volume).read_bytes()
    inflate = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        isal_zlib.decompress(blob, wbits=31) if blob[:2] == b"\x1f\x8b" else blob
        inflate.append((time.perf_counter() - t0) * 1000.0)
    vol = read_nifti(volume)
    canonical = to_canonical(np.asarray(vol.data, np.float32), vol.affine,
                             ornt=slice_geometry(vol.affine).ornt)
    backend = create_backend("onnxruntime", bundle, precision, threads=threads, batch_size=batch_size, fused=False)
    prep = bundle.preprocessing
    batches = [preprocess_slices(volume_to_slices(canonical.data)[i:i + backend.max_batch], prep["window"],
                                 prep["input_size"]) for i in range(0, canonical.data.shape[2], backend.max_batch)]
    network = []
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for batch in batches:
                backend.run(batch)
            network.append((time.perf_counter() - t0) * 1000.0)
    finally:
        backend.close()
    inflate_ms, network_ms = float(np.median(inflate)), float(np.median(network))
    return {"inflate_ms": inflate_ms, "network_ms": network_ms, "floor_ms": inflate_ms + network_ms}

"""`regionkd-bench`: per-volume latency of a bundle (and optionally PyTorch checkpoints) on one
volume, with the stage breakdown, so "how much time is spent outside the network" is visible.

Each configuration runs the full file-to-file path (`Segmenter.segment_file`: read the NIfTI file
or DICOM series, preprocess, inference, postprocess, write the mask) after warm-up runs; the table
gives the mean, SD and median over the repeats, p95 from 20 repeats on and p99 from 100 (fewer
runs cannot estimate a tail), and the GPU compute time where a GPU backend measures it. Peak
memory is each configuration's own: the process's resident high-water mark is reset before the
configuration starts (Linux /proc/self/clear_refs) and read after its last run. PyTorch checkpoints go through the same pre/post-processing
(via `Segmenter.from_backend`), so their stage times compare directly. torch is imported only
when `--torch-checkpoint` is given.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import tempfile
import tracemalloc
from pathlib import Path

import click
import numpy as np

from .atomic import atomic_write_text
from .console import run_cli, version_option
from .errors import InputError, MissingDependencyError, RegionKDError, require
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


class TorchModelBackend:
    """A PyTorch checkpoint behind the backend interface, for side-by-side timing only."""

    name = "pytorch"
    precision = "fp32"
    thread_safe = False

    def __init__(self, checkpoint: Path, threads: int | None, batch_size: int | None):
        torch = require("torch", extra="train", purpose="--torch-checkpoint")
        checkpoint_module = require("regionkd.train.checkpoint", extra="train", purpose="--torch-checkpoint")
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.model, self.checkpoint = checkpoint_module.load_model(checkpoint)
        self.model.eval()
        self.model_path = Path(checkpoint)
        self.max_batch = int(batch_size or 16)
        self.last_gpu_ms = None
        state = self.model.state_dict()
        self.state_bytes = int(sum(t.numel() * t.element_size() for t in state.values()))
        self.params = int(sum(p.numel() for p in self.model.parameters()))

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()

    def close(self) -> None:
        self.model = None


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
    head = ["model", "backend", "prec", "median ms", "mean ± SD ms", "p95 ms", "p99 ms", "gpu ms", "load", "pre",
            "infer", "post", "write", "outside %", "slices/s", "size MB", "params", "peak RSS MB"]
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["model"], r["backend"], r["precision"], f"skipped: {r.get('reason', '')}"])
            continue
        st = r["stages_median_ms"]
        opt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append([r["model"], r["backend"], r["precision"], f"{r['median_ms']:.1f}",
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
    return "\n".join(out)


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
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (onnxruntime, PyTorch).")
@click.option("--torch-checkpoint", "torch_checkpoints", multiple=True, type=click.Path(path_type=Path),
              help="Also time this PyTorch checkpoint (repeatable; needs the train extra).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the table.")
@version_option
def bench(bundle, volume, shape, backends, precisions, device, repeat, warmup, batch_size, threads, torch_checkpoints,
          json_out, quiet):
    """Time BUNDLE on one CT volume: per-volume latency (median, mean, SD, p95/p99 with enough runs) with
    the stage breakdown (load, preprocess, inference, postprocess, write), GPU compute time, slices/s,
    model size, parameters, each configuration's own peak memory."""
    from tqdm import tqdm

    from .backends import BACKENDS
    from .bundle import PRECISIONS, load_bundle
    from .segmenter import Segmenter, organ_labels_of

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    b = load_bundle(bundle)
    backend_list = parse_list(backends, BACKENDS, "backend")
    precision_list = parse_list(precisions, PRECISIONS, "precision") if precisions else b.precisions
    with tempfile.TemporaryDirectory(prefix="regionkd-bench-") as tmp:
        tmp = Path(tmp)
        if volume is None:
            data, affine = synthetic_ct(parse_shape(shape))
            volume = write_volume(tmp / "synthetic.nii.gz", data, affine)
            vol_info = {"source": "synthetic", "shape": list(data.shape)}
            del data
        elif Path(volume).is_dir():              # a DICOM series folder, as regionkd-segment reads it
            from .dicom_io import read_dicom_series
            vol_info = {"source": str(volume), "kind": "dicom", "shape": list(read_dicom_series(volume).shape)}
        else:
            from .volume_io import read_nifti
            vol_info = {"source": str(volume), "shape": list(read_nifti(volume).data.shape)}
        jobs = [("bundle", be, pr) for be in backend_list for pr in precision_list]
        jobs += [("torch", str(ck), "fp32") for ck in torch_checkpoints]
        rows = []
        for kind, which, precision in tqdm(jobs, desc="benchmarking", unit="config", disable=quiet):
            model_name = b.manifest["model"].get("name", "bundle") if kind == "bundle" else Path(which).name
            row = {"model": model_name, "backend": which if kind == "bundle" else "pytorch", "precision": precision}
            rss_reset = reset_peak_rss()        # this configuration's own peak, not an earlier one's
            try:
                if kind == "bundle":
                    seg = Segmenter(b, backend=which, precision=precision, batch_size=batch_size, threads=threads,
                                    device=device)
                    row.update(backend=seg.backend.name, model_file=seg.backend.model_path.name,
                               size_bytes=seg.model_size_bytes, params=b.params)
                else:
                    engine = TorchModelBackend(Path(which), threads, batch_size)
                    ck = engine.checkpoint
                    seg = Segmenter.from_backend(engine, ck["preprocessing"], ck["class_names"],
                                                 organ_labels=organ_labels_of(b.preprocessing, b.class_names),
                                                 batch_size=batch_size)
                    row.update(model=f"{ck.get('arch')} ({ck.get('role', 'checkpoint')})", model_file=Path(which).name,
                               size_bytes=engine.state_bytes, params=engine.params)
            except (RegionKDError, MissingDependencyError) as exc:
                row.update(status="skipped", reason=str(exc))
                rows.append(row)
                if not quiet:
                    tqdm.write(f"skipped {row['backend']} {precision}: {exc}", file=sys.stderr)
                continue
            with seg:
                row.update(measure(seg, Path(volume), tmp, warmup, repeat, rss_reset=rss_reset), status="ok")
            rows.append(row)
    click.echo(format_table(rows))
    if json_out is not None:
        import onnxruntime

        report = {"bundle": str(bundle), "volume": vol_info,
                  "machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "cpu_count": os.cpu_count(), "python": platform.python_version(),
                              "onnxruntime": onnxruntime.__version__,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                  "settings": {"repeat": repeat, "warmup": warmup, "batch_size": batch_size, "threads": threads,
                               "device": device},
                  "rows": rows}
        atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")
    if not any(r.get("status") == "ok" for r in rows):
        raise InputError("nothing could be benchmarked: " + "; ".join(r.get("reason", "") for r in rows))
    return 0


def main(argv=None):
    return run_cli(bench, argv)


if __name__ == "__main__":
    main()

"""Deployment report: what the distilled student buys at inference time, in one run.

On one phantom CT volume (512x512x100 for the cpu preset), file to file through the SDK's own
timing code (`regionkd.sdk.bench.measure`: warm-up, then median, mean and SD (p95 from 20) over repeats, with
the load / preprocess / inference / postprocess / write breakdown):
  - the teacher and the student in PyTorch eager (same pre/post-processing, `Segmenter.from_backend`),
  - the student's bundle through onnxruntime FP32 and INT8 (and TensorRT FP16/INT8 where a GPU is),
plus parameters, file sizes, GFLOPs per slice, Dice of each precision against FP32 (the bundle
manifest's validation metrics), and the machine's ceiling: numpy float32 matmul GFLOP/s at the
same thread count, so each model's achieved GFLOP/s is also a fraction of it.

    python benchmarks/deploy.py --preset smoke                       # makes tiny models itself
    python benchmarks/deploy.py --preset cpu                         # trains briefly + exports if absent
    python benchmarks/deploy.py --preset cpu --teacher T.pt --student S.pt --bundle DIR
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


@dataclass(frozen=True)
class Preset:
    volume_shape: tuple              # the timed volume
    cases: int                       # phantoms to train / calibrate / validate on (when models are made here)
    data_shape: tuple
    input_size: int
    teacher: str
    student: str
    teacher_steps: int
    student_steps: int
    batch_size: int
    repeat: int
    warmup: int
    threads: int
    sgemm_n: int
    calib_slices: int
    infer_batch: int = 8             # slices per inference call when timing
    task: str = "liver"
    kd: str = "paper"                # a row of regionkd.train.config.KD_WEIGHTS
    data_seed: int = 2021            # the timed volume is case index `cases` of this seed: not trained on


FOLDER_VOLUMES = 8                   # volumes of the folder-throughput runs

PRESETS = {
    "smoke": Preset(volume_shape=(64, 64, 8), cases=3, data_shape=(64, 64, 8), input_size=64, teacher="raunet",
                    student="enet", teacher_steps=2, student_steps=2, batch_size=2, repeat=2, warmup=1, threads=1,
                    sgemm_n=256, calib_slices=8, data_seed=0, infer_batch=4),
    # the paper's 384x384 network input; the models are trained only briefly (latency does not depend
    # on the weights); pass --teacher/--student/--bundle to time converged ones
    "cpu": Preset(volume_shape=(512, 512, 100), cases=6, data_shape=(384, 384, 32), input_size=384, teacher="raunet",
                  student="mobilenetv2", teacher_steps=12, student_steps=60, batch_size=2, repeat=5, warmup=1, threads=2,
                  sgemm_n=2048, calib_slices=100),
}

SGEMM_CODE = """
import json, sys, time
import numpy as np
n, repeat = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
times = []
for _ in range(repeat):
    t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
print(json.dumps({"n": n, "best_s": min(times), "median_s": float(np.median(times))}))
"""


def numpy_sgemm(n: int, threads: int, repeat: int = 5) -> dict:
    """float32 n x n matmul GFLOP/s (2 n^3 per product, best of `repeat`) in a fresh process whose
    BLAS is limited to `threads` threads (OpenBLAS/MKL/OpenMP read these at start-up)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", SGEMM_CODE, str(n), str(repeat)], env=env, check=True,
                         capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    flops = 2.0 * n ** 3
    return {"runtime": "numpy-sgemm", "precision": "fp32", "n": n, "threads": threads,
            "gflops_per_s": flops / r["best_s"] / 1e9, "gflops_per_s_median": flops / r["median_s"] / 1e9}


# ----------------------------------------------------------------------------- inputs

def make_models(p: Preset, work: Path, quiet: bool, student_arch: str | None = None) -> tuple[Path, Path, Path, Path]:
    """(teacher ckpt, student ckpt, bundle dir, data dir): trained briefly and exported, unless
    already there from a previous run. The student (`student_arch`, default the preset's) is
    distilled from the teacher with the KD_WEIGHTS row p.kd (the paper's loss)."""
    from regionkd.train.config import KD_WEIGHTS, make_config
    from regionkd.train.trainer import train

    arch = student_arch or p.student
    data = C.make_phantom_dataset(work / "data", p.task, p.cases, p.data_shape, p.data_seed)
    teacher, student = work / f"teacher-{p.teacher}.pt", work / f"student-{arch}.pt"
    bundle = work / ("bundle" if arch == p.student else f"bundle-{arch}")
    common = dict(preset="demo", epochs=1, batch_size=p.batch_size, input_size=p.input_size, val_max_slices=16,
                  val_fraction=0.34, device="cpu", resume=True, cache_dir=str(work / "slice-cache"), quiet=quiet)
    if not teacher.is_file():
        train(make_config("teacher", p.teacher, data, teacher, samples_per_epoch=p.teacher_steps * p.batch_size,
                          **common))
    if not student.is_file():
        train(make_config("distill", arch, data, student, teacher=str(teacher), **KD_WEIGHTS[p.kd],
                          samples_per_epoch=p.student_steps * p.batch_size, **common))
    if not (bundle / "manifest.json").is_file():
        from regionkd.export.pipeline import ExportOptions, export_bundle

        engine = "auto" if C.gpu_name() else "never"
        export_bundle(ExportOptions(checkpoint=student, out=bundle, precisions=("fp32", "fp16", "int8"), calib=data,
                                    calib_slices=p.calib_slices, val=data, engine=engine, max_dice_drop=1.0,
                                    overwrite=True, latency_runs=3, threads=p.threads))
    return teacher, student, bundle, data


def make_volume(p: Preset, work: Path) -> Path:
    """The timed volume: one phantom of the preset's shape, written once as NIfTI."""
    from regionkd.sdk.atomic import atomic_path
    from regionkd.sdk.bench import write_volume
    from regionkd.train.data.phantoms import generate_phantom

    path = work / f"volume-{'x'.join(map(str, p.volume_shape))}.nii.gz"
    if not path.is_file():
        ph = generate_phantom(p.task, p.volume_shape, seed=p.data_seed, index=p.cases)
        with atomic_path(path, suffix=".nii.gz") as tmp:
            write_volume(tmp, ph.hu, ph.affine)
    return path


# ----------------------------------------------------------------------------- measuring

def gflops_of(ckpt: Path) -> float:
    from regionkd.train.checkpoint import load_model
    from regionkd.train.models.profile import flops_per_slice

    model, ck = load_model(ckpt)
    return flops_per_slice(model, tuple(int(v) for v in ck["preprocessing"]["input_size"])) / 1e9


def timing_row(m: dict, base: dict) -> dict:
    """A results row from `regionkd.sdk.bench.measure`'s dict."""
    return {**base, "latency_ms": {"median": m["median_ms"], "mean": m.get("mean_ms"), "sd": m.get("sd_ms"),
                                   "p95": m["p95_ms"], "min": m["min_ms"]},   # p95: None below 20 repeats
            "breakdown_ms": m["stages_median_ms"], "outside_inference_share": m["outside_inference_share"],
            "slices": m["slices"], "repeat": m["repeat"], "warmup": m["warmup"], "peak_rss_mb": m["peak_rss_mb"]}


def bundle_dice(manifest: dict, precision: str, model_file: str) -> dict | None:
    """Validation Dice of the file a backend runs, from the manifest (int8 CPU flavour included; a
    fused file has its network's Dice)."""
    model_file = model_file.replace(".fused.onnx", ".onnx")
    metrics = manifest.get("metrics", {}).get(precision, {})
    for flavour in metrics.get("flavours", {}).values():
        if flavour.get("file") == model_file:
            return flavour.get("dice")
    return metrics.get("dice")


def measure_all(p: Preset, teacher: Path, students: list, volume: Path, threads: int, quiet: bool) -> list:
    """Time the teacher in PyTorch, then each (student checkpoint, bundle dir) in PyTorch and
    through the SDK; one row per configuration."""
    rows = []
    for i, (student, bundle_dir) in enumerate(students):
        rows += _measure_student(p, teacher if i == 0 else None, student, bundle_dir, volume, threads, quiet)
    return rows


def _measure_student(p: Preset, teacher: Path | None, student: Path, bundle_dir: Path, volume: Path, threads: int,
                     quiet: bool) -> list:
    from regionkd.sdk.bench import measure, reset_peak_rss
    from regionkd.sdk.bundle import load_bundle
    from regionkd.sdk.console import progress_bar
    from regionkd.sdk.errors import RegionKDError
    from regionkd.sdk.segmenter import Segmenter
    from regionkd.sdk.volume_io import read_nifti
    from regionkd.train.torch_backend import open_checkpoint

    bundle = load_bundle(bundle_dir)
    shape = [int(v) for v in read_nifti(volume).data.shape]
    student_gflops = bundle.manifest["model"].get("gflops_per_slice") or gflops_of(student)
    jobs = ([("torch", teacher, "fp32", "numpy")] if teacher else []) + [("torch", student, "fp32", "numpy")] + [
        ("onnxruntime", bundle, pr, path) for pr in ("fp32", "int8") for path in ("numpy", "fused")]
    if C.gpu_name():
        jobs += [(be, bundle, pr, "numpy") for be in ("tensorrt", "tensorrt-rtx") for pr in ("fp16", "int8")]
    elif not quiet and teacher:
        click.echo("no CUDA GPU here: TensorRT FP16/INT8 rows skipped", err=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="regionkd-deploy-") as tmp, \
            progress_bar(total=len(jobs), desc=f"deploy latency ({bundle.manifest['model']['arch']})",
                         unit="config", quiet=quiet) as bar:
        for runtime, what, precision, path in jobs:
            rss_reset = reset_peak_rss()        # each configuration's own peak memory
            try:
                if runtime == "torch":
                    model = open_checkpoint(what, threads=threads, batch_size=p.infer_batch)
                    seg = Segmenter.from_backend(model.backend, model.preprocessing, model.class_names,
                                                 organ_labels=model.organ_labels, batch_size=p.infer_batch)
                    base = {"arch": model.arch, "role": model.role, "runtime": "torch", "precision": "fp32", "path": path,
                            "model_file": Path(what).name, "bytes": model.size_bytes, "params": model.params,
                            "gflops_per_slice": gflops_of(what)}
                else:
                    seg = Segmenter(bundle, backend=runtime, precision=precision, batch_size=p.infer_batch,
                                    threads=threads, fused=path == "fused")
                    model_file = seg.backend.model_path.name
                    base = {"arch": bundle.manifest["model"]["arch"], "role": "student", "runtime": seg.backend.name,
                            "precision": precision, "path": path, "model_file": model_file, "bytes": seg.model_size_bytes,
                            "params": bundle.params, "gflops_per_slice": student_gflops,
                            "dice": bundle_dice(bundle.manifest, precision, model_file)}
            except RegionKDError as exc:
                rows.append({"arch": bundle.manifest["model"]["arch"], "runtime": runtime, "precision": precision,
                             "path": path, "skipped": str(exc)})
                bar.update(1)
                continue
            base["volume_shape"] = shape
            with seg:
                rows.append(timing_row(measure(seg, Path(volume), Path(tmp), p.warmup, p.repeat, rss_reset=rss_reset),
                                       base))
            bar.update(1)
    return rows


def measure_folders(p: Preset, bundle_dir: Path, volume: Path, threads: int, quiet: bool) -> tuple[list, dict]:
    """Folder throughput of the student's bundle (FOLDER_VOLUMES copies of the timed volume) for
    fp32 and int8, the numpy and the fused path, one after the other and pipelined; and the floor
    of each precision (inflating the input + the network alone)."""
    from regionkd.sdk.bench import measure_floor, measure_folder, volume_copies
    from regionkd.sdk.bundle import load_bundle
    from regionkd.sdk.console import progress_bar
    from regionkd.sdk.segmenter import Segmenter

    bundle = load_bundle(bundle_dir)
    configs = [(pr, path, pipe) for pr in ("fp32", "int8") for path in ("numpy", "fused") for pipe in (False, True)]
    rows, floors = [], {}
    with tempfile.TemporaryDirectory(prefix="regionkd-folder-") as tmp, \
            progress_bar(total=len(configs) + 2, desc="folder throughput", unit="config", quiet=quiet) as bar:
        inputs = volume_copies(volume, Path(tmp) / "in", FOLDER_VOLUMES)
        for precision in ("fp32", "int8"):
            floors[precision] = measure_floor(bundle, volume, precision, threads=threads, batch_size=p.infer_batch)
            bar.update(1)
        for k, (precision, path, pipelined) in enumerate(configs):
            with Segmenter(bundle, backend="onnxruntime", precision=precision, batch_size=p.infer_batch,
                           threads=threads, fused=path == "fused") as seg:
                row = measure_folder(seg, inputs, Path(tmp) / f"out{k}", pipelined)
            rows.append({"arch": bundle.manifest["model"]["arch"], "precision": precision, "path": path, **row,
                         "floor_ms": floors[precision]["floor_ms"]})
            bar.update(1)
    return rows, floors


# ----------------------------------------------------------------------------- derived numbers

def derive(rows: list, sgemm: dict) -> dict:
    """Achieved GFLOP/s and its share of the sgemm ceiling per row, Dice vs FP32, and the ratios."""
    measured = [r for r in rows if "latency_ms" in r]
    fp32_dice = next((r.get("dice") for r in measured if r["runtime"] == "onnxruntime" and r["precision"] == "fp32"), None)
    for r in measured:
        infer_s = r["breakdown_ms"]["inference"] / 1000.0
        r["achieved_gflops_per_s"] = r["gflops_per_slice"] * r["slices"] / infer_s if infer_s > 0 else None
        r["share_of_sgemm"] = (r["achieved_gflops_per_s"] / sgemm["gflops_per_s"]
                               if r["achieved_gflops_per_s"] is not None else None)
        if r.get("dice") and fp32_dice:
            r["dice_minus_fp32"] = {c: (v - fp32_dice[c]) if None not in (v, fp32_dice.get(c)) else None
                                    for c, v in r["dice"].items()}

    def find(runtime, role=None, precision="fp32", path="numpy"):
        return next((r for r in measured if r["runtime"] == runtime and r["precision"] == precision
                     and r.get("path", "numpy") == path and (role is None or r.get("role") == role)), None)

    def ratio(a, b, key="latency"):
        if a is None or b is None:
            return None
        if key == "latency":
            return a["latency_ms"]["median"] / b["latency_ms"]["median"]
        return a["bytes"] / b["bytes"] if b["bytes"] else None

    t, s = find("torch", "teacher"), find("torch", "student")
    o32, o8 = find("onnxruntime"), find("onnxruntime", precision="int8")
    f32, f8 = find("onnxruntime", path="fused"), find("onnxruntime", precision="int8", path="fused")
    sdk = [r for r in measured if r["runtime"] != "torch"]
    best = min(sdk, key=lambda r: r["latency_ms"]["median"]) if sdk else None
    return {
        "teacher_torch / student_torch latency": ratio(t, s),
        "student_torch / student_sdk_fp32 latency": ratio(s, o32),
        "sdk fp32 / int8 latency": ratio(o32, o8),
        "sdk fp32 / int8 latency (fused)": ratio(f32, f8),
        "sdk numpy / fused latency (int8)": ratio(o8, f8),
        "sdk fp32 / int8 size": ratio(o32, o8, "bytes"),
        "teacher_torch / best student_sdk latency": ratio(t, best),
        "best_sdk": None if best is None else f"{best['runtime']} {best['precision']} {best.get('path', 'numpy')}",
        "best_sdk_outside_inference_share": None if best is None else best["outside_inference_share"],
    }


def ratios_by_student(rows: list, sgemm: dict) -> dict:
    """`derive` for each student architecture against the teacher, in the order the students ran."""
    teacher_rows = [r for r in rows if r.get("role") == "teacher"]
    archs = list(dict.fromkeys(r["arch"] for r in rows if r.get("role") != "teacher"))
    return {a: derive(teacher_rows + [r for r in rows if r.get("role") != "teacher" and r["arch"] == a], sgemm)
            for a in archs}


TARGETS = (("teacher_torch / best student_sdk latency", 20.0, ">="), ("sdk fp32 / int8 latency", 1.5, ">="),
           ("sdk fp32 / int8 latency (fused)", 1.5, ">="),
           ("pipelined folder outside-inference share (int8, best path)", 0.15, "<="))


def folder_ratios(folder_rows: list) -> dict:
    """The folder runs' headline numbers: the best int8 configuration's pipelined share outside
    inference, and what pipelining gains."""
    def get(precision, path, pipelined):
        return next((r for r in folder_rows if (r["precision"], r["path"], r["pipelined"]) ==
                     (precision, path, pipelined)), None)

    piped = [r for r in folder_rows if r["precision"] == "int8" and r["pipelined"]]
    best = min(piped, key=lambda r: r["ms_per_volume"]) if piped else None
    out = {"pipelined folder outside-inference share (int8, best path)":
           None if best is None else best["outside_inference_share"],
           "best int8 folder configuration": None if best is None else f"{best['path']} path, pipelined",
           "best int8 folder ms per volume / floor": None if best is None else best["ms_per_volume"] / best["floor_ms"]}
    for path in ("numpy", "fused"):
        a, b = get("int8", path, False), get("int8", path, True)
        out[f"sequential / pipelined folder time (int8, {path})"] = a["wall_ms"] / b["wall_ms"] if a and b else None
    return out


def folder_markdown(folder_rows: list, floors: dict) -> list:
    lines = ["", f"Folder throughput: {FOLDER_VOLUMES} copies of the volume through `Segmenter.segment_files`, "
             "after one warm-up volume; stage times are per volume (summed over the volumes / count); outside % is "
             "the share of the wall time not spent in inference. Floor: inflating the input (ISA-L) + the "
             "network alone on the prepared slices, per volume.", ""]
    body = []
    for r in folder_rows:
        st = {k: v / r["volumes"] for k, v in r["stages_sum_ms"].items()}
        body.append([r["precision"], r["path"], "pipelined" if r["pipelined"] else "sequential",
                     f"{r['volumes_per_min']:.1f}", f"{r['ms_per_volume']:.0f}", f"{r['floor_ms']:.0f}",
                     *(f"{st[k]:.0f}" for k in ("load", "preprocess", "inference", "postprocess", "write")),
                     f"{100 * r['outside_inference_share']:.1f}", f"{r['peak_rss_mb']:.0f}"])
    lines.append(C.markdown_table(["prec", "path", "mode", "volumes/min", "ms/volume", "floor ms", "load", "pre",
                                   "infer", "post", "write", "outside %", "peak RSS MB"], body))
    lines += ["", "Floor per volume: " + "; ".join(
        f"{pr}: inflate {f['inflate_ms']:.0f} ms + network {f['network_ms']:.0f} ms = {f['floor_ms']:.0f} ms"
        for pr, f in floors.items()) + "."]
    return lines


def markdown_report(rows, sgemm, ratios, machine, command, preset, volume_note, by_student=None,
                    folder=None) -> str:
    lines = [f"# Deployment report ({preset})", "", C.machine_line(machine), "", f"Command: `{command}`", "",
             volume_note, ""]
    header = ["model", "runtime", "prec", "median ms", "p95 ms", "load", "pre", "infer", "post", "write",
              "outside %", "MB", "params", "GFLOPs/slice", "GFLOP/s", "% of sgemm", "Dice (Δ vs fp32)"]
    body = []
    for r in rows:
        if "skipped" in r:
            body.append([r["arch"], r["runtime"], r["precision"], "skipped: " + r["skipped"][:80]] + [""] * (len(header) - 4))
            continue
        b = r["breakdown_ms"]
        dice = "-"
        if r.get("dice"):
            d = r.get("dice_minus_fp32") or {}
            dice = ", ".join(f"{c} {C.fmt(v)}" + (f" ({d[c]:+.3f})" if d.get(c) is not None and r["precision"] != "fp32" else "")
                             for c, v in r["dice"].items())
        body.append([f"{r['arch']} ({r.get('role', '')})", r["runtime"] + (" fused" if r.get("path") == "fused" else ""),
                     r["precision"],
                     f"{r['latency_ms']['median']:.1f}", C.fmt(r["latency_ms"].get("p95"), 1),
                     *(f"{b[s]:.1f}" for s in ("load", "preprocess", "inference", "postprocess", "write")),
                     f"{100 * r['outside_inference_share']:.1f}", f"{r['bytes'] / 1e6:.3f}", f"{r['params']:,}",
                     f"{r['gflops_per_slice']:.3f}", C.fmt(r.get("achieved_gflops_per_s"), 1),
                     C.fmt(100 * r["share_of_sgemm"] if r.get("share_of_sgemm") is not None else None, 1), dice])
    lines += [C.markdown_table(header, body, align="lll" + "r" * (len(header) - 4) + "l"), ""]
    lines += [f"Machine ceiling: numpy float32 matmul {sgemm['n']}x{sgemm['n']} with {sgemm['threads']} thread(s): "
              f"{sgemm['gflops_per_s']:.1f} GFLOP/s (best of 5; median {sgemm['gflops_per_s_median']:.1f}).", ""]
    if folder is not None:
        lines += folder_markdown(*folder) + [""]
    lines += ["| ratio | value | target |", "| --- | ---: | --- |"]
    targets = {name: (value, op) for name, value, op in TARGETS}
    for name, v in ratios.items():
        if name in ("best_sdk", "best int8 folder configuration"):
            continue
        shown = C.fmt(v, 2) if "share" not in name else (f"{100 * v:.1f}%" if v is not None else "-")
        target = ""
        if name in targets:
            tv, op = targets[name]
            met = v is not None and (v >= tv if op == ">=" else v <= tv)
            target = f"{op} {tv if 'share' not in name else f'{100 * tv:.0f}%'}: {'met' if met else 'NOT met'}"
        lines.append(f"| {name} | {shown} | {target} |")
    if by_student:
        names = ("teacher_torch / best student_sdk latency", "sdk fp32 / int8 latency", "sdk fp32 / int8 size",
                 "best_sdk_outside_inference_share")
        lines += ["", "Per student (the table above is the first one's):", "",
                  "| student | teacher / best SDK latency | FP32 / INT8 latency | FP32 / INT8 size | outside inference | best SDK |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for arch, r in by_student.items():
            share = r[names[3]]
            lines.append(f"| {arch} | {C.fmt(r[names[0]], 2)} | {C.fmt(r[names[1]], 2)} | {C.fmt(r[names[2]], 2)} | "
                         f"{'-' if share is None else f'{100 * share:.1f}%'} | {r['best_sdk'] or '-'} |")
    lines += ["", f"Best SDK configuration: {ratios['best_sdk']}"
              + (f"; best int8 folder configuration: {ratios['best int8 folder configuration']}"
                 if ratios.get("best int8 folder configuration") else "") + ".",
              "Latency: per volume, file to file (read NIfTI, preprocess, inference, postprocess incl. largest "
              "component, write mask), median over the repeats after warm-up (p95 from 20 repeats on). PyTorch rows run eager on "
              "the CPU with the SDK's pre/post-processing; their size is the fp32 weights (state dict). GFLOP/s: "
              "GFLOPs per slice x slices / inference time. Dice: the bundle manifest's validation Dice (global per "
              "class over the validation phantoms), Δ against the FP32 file.", ""]
    return "\n".join(lines)


def chart(rows):
    def draw(fig):
        measured = [r for r in rows if "latency_ms" in r]
        ax = fig.subplots()
        labels = [f"{r['arch']}\n{r['runtime']} {r['precision']}{' fused' if r.get('path') == 'fused' else ''}" for r in measured]
        bottom = [0.0] * len(measured)
        for stage in ("load", "preprocess", "inference", "postprocess", "write"):
            vals = [r["breakdown_ms"][stage] for r in measured]
            ax.bar(labels, vals, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, r in enumerate(measured):
            ax.annotate(f"{r['latency_ms']['median']:.0f} ms", (i, bottom[i]), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("ms per volume (median of each stage)")
        ax.set_title(f"Per-volume latency, {'x'.join(map(str, measured[0]['volume_shape']))} voxels" if measured else "")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    return draw


# ----------------------------------------------------------------------------- the command

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="cpu", show_default=True,
              help="smoke: 64x64x8 volume, tiny models, for tests; cpu: 512x512x100 volume, 2 threads.")
@click.option("--teacher", type=click.Path(path_type=Path, dir_okay=False), help="Teacher checkpoint (e.g. from kd_ablation).")
@click.option("--student", type=click.Path(path_type=Path, dir_okay=False), help="Student checkpoint the bundle was exported from.")
@click.option("--bundle", type=click.Path(path_type=Path, file_okay=False), help="The student's bundle directory.")
@click.option("--volume", type=click.Path(path_type=Path, dir_okay=False), help="Time this NIfTI volume instead of a phantom.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch, onnxruntime and numpy (default: preset).")
@click.option("--repeat", type=click.IntRange(min=1), help="Timed runs per configuration (default: preset).")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False),
              help="Where models made here and the volume live (default: work/benchmarks/deploy-<preset>).")
@click.option("--results", type=click.Path(path_type=Path, file_okay=False), default=C.RESULTS_DIR, show_default=True,
              help="Where deploy-<preset>.{json,md,png} go.")
@click.option("--also-student", "also_students", multiple=True, metavar="ARCH",
              help="Also make, export and time this student network (registry name, e.g. mobilenetv2, espnet) "
                   "beside the preset's; repeatable. Only when the preset makes the models.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or report on stdout.")
def main(preset, teacher, student, bundle, volume, threads, repeat, work, results, also_students, quiet):
    """Latency per volume (median, p95, stages), size, params, GFLOPs and achieved share of the
    machine's matmul ceiling for teacher and student in PyTorch and the student through the SDK."""
    import logging

    from regionkd.sdk.errors import InputError

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    p = PRESETS[preset]
    if threads:
        p = replace(p, threads=threads)
    if repeat:
        p = replace(p, repeat=repeat)
    given = [x is not None for x in (teacher, student, bundle)]
    if any(given) and not all(given):
        raise InputError("give all of --teacher, --student and --bundle, or none (the preset then makes them)")
    if also_students and any(given):
        raise InputError("--also-student makes its models with the preset; it cannot be combined with "
                         "--teacher/--student/--bundle")
    from regionkd.train.models.registry import list_models

    unknown = [a for a in also_students if a not in list_models()]
    if unknown:
        raise InputError(f"--also-student {', '.join(unknown)}: unknown network; known: {', '.join(list_models())}")
    work = Path(work or C.WORK_DIR / f"deploy-{preset}")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra = []
    if not all(given):
        teacher, student, bundle, _ = make_models(p, work, quiet)
        extra = [make_models(p, work, quiet, arch)[1:3] for arch in dict.fromkeys(also_students) if arch != p.student]
    for what, path in (("--teacher", teacher), ("--student", student)):
        if not Path(path).is_file():
            raise InputError(f"{what} {path}: file not found")
    if volume is None:
        volume = make_volume(p, work)
        note = (f"Volume: one {p.task} phantom of {'x'.join(map(str, p.volume_shape))} voxels (seed {p.data_seed}, case {p.cases}: not a training case); "
                f"{p.threads} thread(s), batch {p.infer_batch}, {p.warmup} warm-up + {p.repeat} timed runs.")
    else:
        note = f"Volume: {volume}; {p.threads} thread(s), batch {p.infer_batch}, {p.warmup} warm-up + {p.repeat} timed runs."
    if not C.gpu_name():
        note += " TensorRT FP16/INT8: not measured, there is no CUDA GPU on this machine."
    import torch

    torch.set_num_threads(p.threads)
    machine = C.machine_description(threads=p.threads)
    sgemm = numpy_sgemm(p.sgemm_n, p.threads)
    students = [(Path(student), Path(bundle))] + [(Path(s_), Path(b_)) for s_, b_ in extra]
    rows = measure_all(p, Path(teacher), students, Path(volume), p.threads, quiet)
    folder_rows, floors = measure_folders(p, Path(bundle), Path(volume), p.threads, quiet)
    by_student = ratios_by_student(rows, sgemm)
    ratios = {**next(iter(by_student.values())), **folder_ratios(folder_rows)}   # the first student's
    command = C.command_line("benchmarks/deploy.py", click.get_current_context())
    md = markdown_report(rows, sgemm, ratios, machine, command, preset, note + f" Wall time {time.perf_counter() - t0:.0f} s.",
                         by_student if len(by_student) > 1 else None, folder=(folder_rows, floors))
    out_rows = rows + [{"folder": r} for r in folder_rows] + [
        {**sgemm, "machine": machine, "ratios": ratios, "ratios_by_student": by_student, "floors": floors}]
    paths = C.write_results(f"deploy-{preset}", out_rows, md, chart(rows), results)
    C.echo_results(md, paths, quiet)
    return 0


if __name__ == "__main__":
    from regionkd.sdk.console import run_cli

    run_cli(main)

"""One export run: checkpoint -> bundle directory (what `regionkd-export` does).

Steps: load the checkpoint; read real CT slices (calibration sample, parity sample); fp32 ONNX
(+ TensorRT op check, parity vs PyTorch); FP16; INT8 in two flavours from one calibration;
onnxruntime CPU latency of every ONNX file (the faster INT8 flavour is the one onnxruntime gets);
per-class Dice on the validation volumes with the --max-dice-drop gate; TensorRT / TensorRT-RTX
engines; manifest. All of it happens in a temporary directory renamed into place at the end.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from regionkd.sdk.errors import BackendError, InputError, RegionKDError

from . import bundle_writer as bw
from .ct_slices import iter_cases, open_cases, stratified_slices
from .onnx_export import compare_logits, export_onnx, ort_session, run_onnx, run_torch
from .precision import (check_dice_drop, convert_fp16, cpu_latency_ms, qdq_summary,
                        quantize_int8)
from .validation import VALIDATION_METHOD

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_MODES = ("auto", "never", "require")
PARITY_SLICES = 32


@dataclass
class ExportOptions:
    checkpoint: Path
    out: Path
    precisions: tuple = PRECISIONS
    calib: Path | None = None
    calib_slices: int = 200
    val: Path | None = None
    engine: str = "auto"
    max_batch: int = 16
    max_dice_drop: float = 0.01
    overwrite: bool = False
    workspace_mb: int = 1024
    latency_runs: int = 20
    threads: int = 1
    name: str | None = None
    sign_key: Path | None = None      # Ed25519 private key: the bundle gets a manifest.sig
    metadata: dict = field(default_factory=dict)   # the manifest's metadata (bundle_writer.METADATA_FIELDS)


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    seconds: float
    skipped_engines: list = field(default_factory=list)
    signed_by: str | None = None      # key id of the signature, when signed


def default_precisions(calib) -> tuple:
    """What an export makes when --precision is not given: every precision its data allows
    (int8 needs calibration slices: only with --calib)."""
    return PRECISIONS if calib is not None else ("fp32", "fp16")


def parse_precisions(text: str) -> tuple:
    items = tuple(p.strip().lower() for p in str(text).split(",") if p.strip())
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise InputError(f"--precision: unknown precision(s) {bad or [text]} (choose from {', '.join(PRECISIONS)})")
    if "fp32" not in items:  # the reference every other precision is measured against
        items = ("fp32",) + items
    return tuple(p for p in PRECISIONS if p in items)


def _count_gflops(model, input_size) -> float | None:
    """GFLOPs of one slice (2 x multiply-adds) by torch's own FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, int(input_size[0]), int(input_size[1])))
        return round(counter.get_total_flops() / 1e9, 4)
    except Exception:  # a counter gap must not stop an export; the field is optional
        return None


def _engine_builders():
    """(engine_build module, [backends that can build here], {backend: why skipped})."""
    from regionkd.sdk.backends import engine_build as tensorrt_build
    ok, skipped = [], {}
    for backend, (can, why) in tensorrt_build.available_builders().items():
        (ok.append(backend) if can else skipped.__setitem__(backend, why))
    return tensorrt_build, ok, skipped


def planned_steps(opts: ExportOptions) -> int:
    """How many progress steps `export_bundle` reports for these options."""
    n = 5  # load, read slices, fp32, latency, manifest
    n += ("fp16" in opts.precisions) + 2 * ("int8" in opts.precisions)
    n += (opts.val is not None) + (opts.engine != "never") + (opts.sign_key is not None)
    return n


def check_options(opts: ExportOptions):
    """Every check that needs no work, before any is done (and before a progress bar is drawn):
    returns the loaded signing key (or None)."""
    if opts.engine not in ENGINE_MODES:
        raise InputError(f"--engine must be one of {', '.join(ENGINE_MODES)}, got {opts.engine!r}")
    if "int8" in tuple(opts.precisions) and opts.calib is None:
        raise InputError("--precision int8 needs --calib DATA_DIR: INT8 ranges are calibrated on real CT slices "
                         "(or leave int8 out: --precision fp32,fp16)")
    if opts.max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {opts.max_batch}")
    if not Path(opts.checkpoint).is_file():
        raise InputError(f"checkpoint {opts.checkpoint}: no such file")
    for flag, folder in (("--calib", opts.calib), ("--val", opts.val)):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{flag} {folder}: not a folder")
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"bundle directory {out} already exists (pass --overwrite to replace it)")
    bw.metadata_section(**opts.metadata)          # unknown fields fail now
    if opts.sign_key is not None:   # a bad key fails now, not after the whole export
        from regionkd.sdk.signing import load_private_key
        return load_private_key(opts.sign_key)
    return None


def export_bundle(opts: ExportOptions, log: Callable[[str], None] = print, progress=None) -> ExportResult:
    """Run the whole export; `progress(step_name)` is called when each step starts."""
    from regionkd.sdk import __version__
    from regionkd.train.checkpoint import load_model

    t_start = time.perf_counter()
    step = progress or (lambda name: None)
    precisions = tuple(opts.precisions)
    sign_key = check_options(opts)
    out = Path(opts.out)

    step("load checkpoint")
    model, ckpt = load_model(opts.checkpoint)
    class_names = list(ckpt["class_names"])
    window = ckpt["preprocessing"]["window"]
    input_size = tuple(int(v) for v in ckpt["preprocessing"]["input_size"])
    lesion_label = len(class_names) - 1

    step("read CT slices")
    calib = None
    if "int8" in precisions:
        calib = stratified_slices(opts.calib, opts.calib_slices, window, input_size, lesion_label=lesion_label)
        log(f"calibration: {len(calib)} slices from {opts.calib} ({', '.join(f'{k} {v}' for k, v in calib.strata.items())})")
    parity_source = "validation"
    if opts.val is not None:
        open_cases(opts.val)  # fail early on an unreadable validation directory
        parity_images = stratified_slices(opts.val, PARITY_SLICES, window, input_size,
                                          lesion_label=lesion_label, seed=1).images
    elif calib is not None:
        parity_images = calib.images[:PARITY_SLICES]
        parity_source = "calibration"
    else:
        from .ct_slices import synthetic_slices

        parity_images = synthetic_slices(PARITY_SLICES, window, input_size)
        parity_source = "synthetic"
        log(f"no --val or --calib: parity with PyTorch measured on {PARITY_SLICES} slices of a synthetic CT; "
            "Dice not measured")
    torch_logits = run_torch(model, parity_images)

    metrics: dict = {}
    files: list = []
    extra: dict = {}
    skipped_engines: list = []
    with bw.bundle_directory(out, overwrite=opts.overwrite) as root:
        onnx_paths = {}   # key -> bundle-relative name; keys: fp32, fp16, int8, int8-cpu

        def record(key, name):
            onnx_paths[key] = name
            parity = compare_logits(torch_logits, run_onnx(ort_session(root / name, opts.threads), parity_images))
            metrics[key] = {"file": name, "parity": parity.as_dict(), "parity_data": parity_source}
            log(f"{name}: parity vs PyTorch max |dlogit| {parity.max_abs_logit_diff:.3g}, "
                f"argmax agreement {parity.argmax_agreement:.5f}")

        step("export fp32 ONNX")
        export_onnx(model, root / "model.fp32.onnx", input_size)
        record("fp32", "model.fp32.onnx")
        if "fp16" in precisions:
            step("convert fp16")
            convert_fp16(root / "model.fp32.onnx", root / "model.fp16.onnx")
            record("fp16", "model.fp16.onnx")
        if "int8" in precisions:
            step("quantize int8 (TensorRT flavour)")
            cache = root / "calibration.json"
            trt_proto = quantize_int8(root / "model.fp32.onnx", root / "model.int8.onnx", "tensorrt", cache, calib.images)
            record("int8", "model.int8.onnx")
            metrics["int8"]["graph"] = qdq_summary(trt_proto)
            step("quantize int8 (CPU flavour)")
            quantize_int8(root / "model.fp32.onnx", root / "model.int8-cpu.onnx", "cpu", cache)
            record("int8-cpu", "model.int8-cpu.onnx")
            extra["calibration"] = {"file": "calibration.json", "sha256": bw.sha256_file(cache),
                                    "data": bw.base_name(Path(opts.calib).resolve()), "slices": len(calib),
                                    "strata": calib.strata, "method": "MinMax",
                                    "format": "onnxruntime.quantization calibration cache (tensor ranges)"}

        step("measure CPU latency")
        for key, name in onnx_paths.items():
            metrics[key]["cpu_latency_ms"] = cpu_latency_ms(root / name, input_size, runs=opts.latency_runs,
                                                            threads=opts.threads, images=parity_images)
        int8_for_cpu = None
        if "int8" in precisions:
            t_trt = metrics["int8"]["cpu_latency_ms"]["median_ms"]
            t_cpu = metrics["int8-cpu"]["cpu_latency_ms"]["median_ms"]
            int8_for_cpu = "int8-cpu" if t_cpu <= t_trt else "int8"
            log(f"int8 on onnxruntime CPU: uint8-activation flavour {t_cpu:.2f} ms, symmetric int8 flavour "
                f"{t_trt:.2f} ms per slice (fp32 {metrics['fp32']['cpu_latency_ms']['median_ms']:.2f} ms): "
                f"shipping {onnx_paths[int8_for_cpu]} for onnxruntime")

        if opts.val is not None:
            step("validate (Dice)")
            dice = _evaluate(root, onnx_paths, opts, bw.preprocessing_section(ckpt), class_names)
            for key in onnx_paths:
                metrics[key]["dice"] = dice[key]
            for key in onnx_paths:
                if key != "fp32" and not (key == "int8-cpu" and int8_for_cpu == "int8"):  # gate what ships
                    label = {"fp16": "fp16 (model.fp16.onnx)", "int8": "int8 TensorRT flavour (model.int8.onnx)",
                             "int8-cpu": "int8 CPU flavour (model.int8-cpu.onnx)"}[key]
                    check_dice_drop(dice["fp32"], dice[key], opts.max_dice_drop, label)
            extra["validation"] = {"data": bw.base_name(Path(opts.val).resolve()), "max_dice_drop": opts.max_dice_drop,
                                   "dice": VALIDATION_METHOD}
        else:
            log("no --val: Dice not measured, --max-dice-drop not enforced")

        if int8_for_cpu == "int8":  # symmetric flavour is the faster one on the CPU: it serves both
            (root / "model.int8-cpu.onnx").unlink()
            del onnx_paths["int8-cpu"]
            metrics["int8"]["cpu_flavour_not_shipped"] = metrics.pop("int8-cpu")
        for key, name in onnx_paths.items():
            fields = {}
            if key == "int8" and int8_for_cpu == "int8":
                fields["backends"] = ["tensorrt", "onnxruntime"]
            files.append(bw.onnx_entry(root, name, **fields))

        if opts.engine != "never":
            step("build engines")
            engines, skipped_engines = _build_engines(root, onnx_paths, opts, log)
            files += engines
            if opts.engine == "require" and not engines:
                raise BackendError("--engine require: no TensorRT or TensorRT-RTX engine could be built here ("
                                       + "; ".join(skipped_engines) + ")")

        step("write manifest")
        params = sum(p.numel() for p in model.parameters())
        manifest = bw.write_bundle_manifest(
            root, model=bw.model_section(ckpt, params, opts.name, _count_gflops(model, input_size)),
            preprocessing=bw.preprocessing_section(ckpt), files=files, metrics=_by_precision(metrics),
            provenance=bw.provenance_section(ckpt, opts.checkpoint, __version__), max_batch=opts.max_batch,
            extra={**extra, "metadata": bw.metadata_section(**opts.metadata)} if opts.metadata else extra)
        signed_by = None
        if sign_key is not None:
            from regionkd.sdk.signing import sign_bundle

            step("sign manifest")
            signed_by = sign_bundle(root, sign_key)["key_id"]
            log(f"signed manifest.json with key {signed_by}")
    return ExportResult(bundle=out, manifest=manifest, seconds=time.perf_counter() - t_start,
                        skipped_engines=skipped_engines, signed_by=signed_by)


def _evaluate(root, onnx_paths, opts, preprocessing, class_names):
    """Dice of every ONNX file written, on the masks the runtime's Segmenter gives (see validation.py)."""
    from regionkd.sdk.bundle_files import file_kind

    from .validation import evaluate_dice

    models = {key: (root / name, file_kind(key).precision) for key, name in onnx_paths.items()}
    return evaluate_dice(models, iter_cases(opts.val), preprocessing, class_names, threads=opts.threads,
                         batch_size=opts.max_batch)


def _by_precision(metrics: dict) -> dict:
    """metrics keyed by precision; the CPU INT8 flavour sits under int8.flavours.cpu."""
    out = {k: v for k, v in metrics.items() if k in PRECISIONS}
    if "int8-cpu" in metrics:
        out["int8"]["flavours"] = {"cpu": metrics["int8-cpu"]}
    return out


def _build_engines(root: Path, onnx_paths: dict, opts: ExportOptions, log) -> tuple:
    """Build an engine per precision (int8 from the TensorRT flavour) with every builder available here."""
    builder, backends, skipped = _engine_builders()
    notes = [f"{b}: {why}" for b, why in skipped.items()]
    for note in notes:
        log(f"engines skipped: {note}")
    entries = []
    if builder is None:
        return entries, notes
    engine_dir = root / bw.ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    previous = Path(opts.out) / bw.ENGINE_DIR  # reuse the timing caches of the bundle being replaced
    for cache in previous.glob("*.timing-cache") if previous.is_dir() else ():
        shutil.copy2(cache, engine_dir / cache.name)
    for backend in backends:
        for precision in PRECISIONS:
            if precision not in onnx_paths:
                continue
            source = onnx_paths[precision]
            try:
                info = builder.build_engine(root / source, engine_dir, backend=backend, max_batch=opts.max_batch,
                                            precision=precision, workspace_mb=opts.workspace_mb)
            except RegionKDError as exc:
                if opts.engine == "require":
                    raise
                notes.append(f"{backend} {precision}: {exc}")
                log(f"engine skipped: {backend} {precision}: {exc}")
                continue
            fields = info.manifest_fields()
            fields["source"] = source
            entries.append(bw.file_entry(info.path, root, **fields))
            log(f"built {Path(info.path).relative_to(root)} ({backend}, {precision})")
    return entries, notes

"""One export run: checkpoint -> bundle directory (what `regionkd-export` does).

The export runs from a table of steps (`STEPS`), the way a format table drives an exporter: each
row has a name, a function of the run's shared state (`ExportRun`) and a predicate on the options
saying whether this export needs it. The progress a caller sees counts exactly the steps that
will run (`export_steps(opts)`), and a new step is one new row.

The steps: load the checkpoint; read real CT slices (calibration sample, parity sample); fp32
ONNX (+ TensorRT op check, parity vs PyTorch); FP16; INT8 in two flavours from one calibration;
onnxruntime CPU latency of every ONNX file (the faster INT8 flavour is the one onnxruntime gets);
per-class Dice on the validation volumes with the --max-dice-drop gate; TensorRT / TensorRT-RTX
engines; manifest; signature. All of it happens in a temporary directory renamed into place at
the end. Messages go to `logging` (loggers under `regionkd.export`) and progress to a callback:
the library draws nothing, the command line does.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from regionkd.sdk.bundle_files import CALIBRATION_FILE, ENGINE_DIR, PRECISIONS, file_kind
from regionkd.sdk.errors import BackendError, InputError, RegionKDError

from . import bundle_writer as bw
from .ct_slices import iter_cases, open_cases, stratified_slices
from .onnx_export import compare_logits, export_onnx, ort_session, run_onnx, run_torch
from .precision import (check_dice_drop, convert_fp16, cpu_latency_ms, qdq_summary,
                        quantize_int8)

log = logging.getLogger(__name__)

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
    fused: bool = True                # also ship each model fused with its pre- and post-processing
    metadata: dict = field(default_factory=dict)   # the manifest's metadata (bundle_writer.METADATA_FIELDS)


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    seconds: float
    skipped_engines: list = field(default_factory=list)
    signed_by: str | None = None      # key id of the signature, when signed


@dataclass
class ExportRun:
    """What the steps hand on to each other: the options, the temporary bundle directory, and
    what each step has made so far. Files and metrics are keyed by the file kinds of
    `regionkd.sdk.bundle_files` ("fp32", "fp16", "int8", "int8-cpu")."""
    opts: ExportOptions
    sign_key: Any = None
    root: Path | None = None
    model: Any = None
    ckpt: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)   # the manifest's, organ components included
    calib: Any = None                                    # ct_slices.SliceSample, for int8
    parity_images: Any = None
    parity_source: str = ""
    torch_logits: Any = None
    onnx: dict = field(default_factory=dict)             # kind key -> FileKind of each ONNX file written
    fused: dict = field(default_factory=dict)            # network kind key -> its fused FileKind, when shipped
    metrics: dict = field(default_factory=dict)          # kind key -> parity, latency, Dice of that file
    extra: dict = field(default_factory=dict)            # the manifest's calibration / validation sections
    engine_files: list = field(default_factory=list)
    skipped_engines: list = field(default_factory=list)
    int8_for_cpu: str | None = None                      # the INT8 kind onnxruntime gets
    manifest: dict | None = None
    signed_by: str | None = None

    @property
    def class_names(self) -> list:
        return list(self.ckpt["class_names"])

    @property
    def window(self):
        return self.preprocessing["window"]

    @property
    def input_size(self) -> tuple:
        return tuple(self.preprocessing["input_size"])

    def path(self, key: str) -> Path:
        return self.root / file_kind(key).path()


def default_precisions(calib) -> tuple:
    """What an export makes when --precision is not given: every precision its data allows
    (int8 needs calibration slices: only with --calib)."""
    return PRECISIONS if calib is not None else tuple(p for p in PRECISIONS if p != "int8")


def parse_precisions(text: str) -> tuple:
    items = tuple(p.strip().lower() for p in str(text).split(",") if p.strip())
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise InputError(f"--precision: unknown precision(s) {bad or [text]} (choose from {', '.join(PRECISIONS)})")
    if "fp32" not in items:  # the reference every other precision is measured against
        items = ("fp32",) + items
    return tuple(p for p in PRECISIONS if p in items)


def check_options(opts: ExportOptions):
    """Every check that needs no work, before any is done (and before any progress is reported):
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


# ---------------------------------------------------------------- the steps

def _load_checkpoint(run: ExportRun) -> None:
    from regionkd.train.checkpoint import load_model

    run.model, run.ckpt = load_model(run.opts.checkpoint)
    run.preprocessing = bw.preprocessing_section(run.ckpt)


def _read_slices(run: ExportRun) -> None:
    """The calibration sample (int8 only) and the slices parity with PyTorch is measured on:
    validation slices, else calibration slices, else slices of a synthetic CT."""
    opts, lesion_label = run.opts, len(run.class_names) - 1
    if "int8" in opts.precisions:
        run.calib = stratified_slices(opts.calib, opts.calib_slices, run.window, run.input_size,
                                      lesion_label=lesion_label)
        log.info("calibration: %d slices from %s (%s)", len(run.calib), opts.calib,
                 ", ".join(f"{k} {v}" for k, v in run.calib.strata.items()))
    if opts.val is not None:
        open_cases(opts.val)  # fail early on an unreadable validation directory
        run.parity_images = stratified_slices(opts.val, PARITY_SLICES, run.window, run.input_size,
                                              lesion_label=lesion_label, seed=1).images
        run.parity_source = "validation"
    elif run.calib is not None:
        run.parity_images, run.parity_source = run.calib.images[:PARITY_SLICES], "calibration"
    else:
        from .ct_slices import synthetic_slices

        run.parity_images = synthetic_slices(PARITY_SLICES, run.window, run.input_size)
        run.parity_source = "synthetic"
        log.info("no --val or --calib: parity with PyTorch measured on %d slices of a synthetic CT; "
                 "Dice not measured", PARITY_SLICES)
    run.torch_logits = run_torch(run.model, run.parity_images)


def _record(run: ExportRun, key: str) -> None:
    """Add the ONNX file of kind `key` just written, with its parity against PyTorch."""
    kind = run.onnx[key] = file_kind(key)
    session = ort_session(run.path(key), run.opts.threads)
    parity = compare_logits(run.torch_logits, run_onnx(session, run.parity_images))
    run.metrics[key] = {"file": kind.path(), "parity": parity.as_dict(), "parity_data": run.parity_source}
    log.info("%s: parity vs PyTorch max |dlogit| %.3g, argmax agreement %.5f", kind.path(),
             parity.max_abs_logit_diff, parity.argmax_agreement)


def _export_fp32(run: ExportRun) -> None:
    export_onnx(run.model, run.path("fp32"), run.input_size)
    _record(run, "fp32")


def _convert_fp16(run: ExportRun) -> None:
    convert_fp16(run.path("fp32"), run.path("fp16"))
    _record(run, "fp16")


def _quantize_int8(key: str, run: ExportRun) -> None:
    """The INT8 file of kind `key`; the first flavour calibrates and caches the ranges, the second
    reuses them, so both come from one calibration."""
    kind, cache = file_kind(key), run.root / CALIBRATION_FILE
    proto = quantize_int8(run.path("fp32"), run.path(key), kind.flavour, cache, run.calib.images)
    _record(run, key)
    if kind.flavour == "tensorrt":
        run.metrics[key]["graph"] = qdq_summary(proto)
    run.extra["calibration"] = {"file": CALIBRATION_FILE, "sha256": bw.sha256_file(cache),
                                "data": bw.base_name(Path(run.opts.calib).resolve()), "slices": len(run.calib),
                                "strata": run.calib.strata, "method": "MinMax",
                                "format": "onnxruntime.quantization calibration cache (tensor ranges)"}


def _measure_latency(run: ExportRun) -> None:
    for key in run.onnx:
        run.metrics[key]["cpu_latency_ms"] = cpu_latency_ms(run.path(key), run.input_size, runs=run.opts.latency_runs,
                                                            threads=run.opts.threads, images=run.parity_images)
    if "int8" in run.onnx:
        t_trt, t_cpu = (run.metrics[k]["cpu_latency_ms"]["median_ms"] for k in ("int8", "int8-cpu"))
        run.int8_for_cpu = "int8-cpu" if t_cpu <= t_trt else "int8"
        log.info("int8 on onnxruntime CPU: uint8-activation flavour %.2f ms, symmetric int8 flavour %.2f ms per "
                 "slice (fp32 %.2f ms): shipping %s for onnxruntime", t_cpu, t_trt,
                 run.metrics["fp32"]["cpu_latency_ms"]["median_ms"], run.onnx[run.int8_for_cpu].path())


def _shipped(run: ExportRun) -> dict:
    """The ONNX files the bundle keeps: the CPU INT8 flavour only when onnxruntime runs it faster."""
    return {key: kind for key, kind in run.onnx.items() if not (key == "int8-cpu" and run.int8_for_cpu == "int8")}


def _validate(run: ExportRun) -> None:
    """Dice of every precision on the validation volumes, measured on the model the runtime will run
    (the fused one where it ships), then the --max-dice-drop gate on what ships."""
    from .validation import VALIDATION_METHOD, evaluate_dice

    models = {key: (run.path(run.fused[key].key), kind.precision, "fused") if key in run.fused
              else (run.path(key), kind.precision, "network") for key, kind in run.onnx.items()}
    dice = evaluate_dice(models, iter_cases(run.opts.val), run.preprocessing, run.class_names,
                         threads=run.opts.threads, batch_size=run.opts.max_batch)
    for key in run.onnx:
        run.metrics[key]["dice"] = dice[key]
    for key, kind in _shipped(run).items():
        if key != "fp32":
            check_dice_drop(dice["fp32"], dice[key], run.opts.max_dice_drop, f"{kind.title} ({kind.path()})")
    run.extra["validation"] = {"data": bw.base_name(Path(run.opts.val).resolve()),
                               "max_dice_drop": run.opts.max_dice_drop, "dice": VALIDATION_METHOD}


AGREEMENT_VOLUMES = 4                 # validation volumes the fused models are checked on, at most


def _agreement_volumes(run: ExportRun):
    """The volumes the fused models are checked on: the first AGREEMENT_VOLUMES validation volumes,
    else a synthetic CT."""
    if run.opts.val is not None:
        for k, case in enumerate(iter_cases(run.opts.val)):
            if k == AGREEMENT_VOLUMES:
                return
            yield case.volume
        return
    from regionkd.sdk.bench import synthetic_ct
    from regionkd.sdk.orientation import to_canonical

    data, affine = synthetic_ct((192, 176, 12))
    yield to_canonical(data.astype("float32"), affine)


def _build_fused(run: ExportRun) -> None:
    """The fused twin of every shipped ONNX file, checked against the numpy path on every agreement
    volume; a twin below MIN_AGREEMENT on any volume is left out (the network file still ships)."""
    from regionkd.train.evaluate import segment_case

    from .fused import MIN_AGREEMENT, build_fused, label_agreement
    from .validation import onnx_segmenter

    pairs = {}
    for key, kind in _shipped(run).items():
        fused = file_kind(f"{key}-fused")
        build_fused(run.path(key), run.path(fused.key), run.window, run.input_size)
        pairs[key] = tuple(onnx_segmenter(run.path(k), kind.precision, run.preprocessing, run.class_names,
                                          run.opts.threads, run.opts.max_batch, graph=g)
                           for k, g in ((key, "network"), (fused.key, "fused")))
    agreement = {key: [] for key in pairs}
    for volume in _agreement_volumes(run):
        for key, (numpy_path, fused_path) in pairs.items():
            agreement[key].append(round(label_agreement(segment_case(fused_path, volume),
                                                        segment_case(numpy_path, volume)), 6))
    for key, (numpy_path, fused_path) in pairs.items():
        numpy_path.close()
        fused_path.close()
        fused, worst = file_kind(f"{key}-fused"), min(agreement[key])
        run.metrics[key]["fused"] = {"file": fused.path(), "label_agreement": agreement[key],
                                     "shipped": worst >= MIN_AGREEMENT}
        if worst >= MIN_AGREEMENT:
            run.fused[key] = fused
        else:
            run.path(fused.key).unlink()
            log.warning("%s left out: its labels agree with the numpy path on only %.4f%% of one volume's voxels "
                        "(at least %.2f%% needed)", fused.path(), 100 * worst, 100 * MIN_AGREEMENT)
        log.info("%s: label agreement with the numpy path %s", fused.path(), agreement[key])


def _engine_dir(run: ExportRun) -> Path:
    """The bundle's engine folder, holding the timing caches of the bundle being replaced (reused)."""
    engine_dir = run.root / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    previous = Path(run.opts.out) / ENGINE_DIR
    for cache in previous.glob("*.timing-cache") if previous.is_dir() else ():
        shutil.copy2(cache, engine_dir / cache.name)
    return engine_dir


def _build_engine(run: ExportRun, builder, backend: str, precision: str, engine_dir: Path) -> None:
    """One engine from the ONNX file of `precision` (int8: the TensorRT flavour); with --engine auto a
    failed build is a note, with require an error."""
    source = run.onnx[precision].path()
    try:
        info = builder.build_engine(run.root / source, engine_dir, backend=backend, max_batch=run.opts.max_batch,
                                    precision=precision, workspace_mb=run.opts.workspace_mb)
    except RegionKDError as exc:
        if run.opts.engine == "require":
            raise
        run.skipped_engines.append(f"{backend} {precision}: {exc}")
        log.info("engine skipped: %s %s: %s", backend, precision, exc)
        return
    fields = info.manifest_fields()
    fields["source"] = source
    run.engine_files.append(bw.file_entry(info.path, run.root, **fields))
    log.info("built %s (%s, %s)", Path(info.path).relative_to(run.root), backend, precision)


def _build_engines(run: ExportRun) -> None:
    """An engine per precision with every builder available here; what cannot be built is noted."""
    from regionkd.sdk.backends import engine_build as builder

    builders = builder.available_builders()           # {backend: (can build here, what / why not)}
    for backend, (can, why) in builders.items():
        if not can:
            run.skipped_engines.append(f"{backend}: {why}")
            log.info("engines skipped: %s: %s", backend, why)
    engine_dir = _engine_dir(run)
    for backend in [b for b, (can, _) in builders.items() if can]:
        for precision in PRECISIONS:
            if precision in run.onnx:
                _build_engine(run, builder, backend, precision, engine_dir)
    if run.opts.engine == "require" and not run.engine_files:
        raise BackendError("--engine require: no TensorRT or TensorRT-RTX engine could be built here ("
                           + "; ".join(run.skipped_engines) + ")")


def _onnx_entries(run: ExportRun) -> list:
    """The shipped ONNX files' manifest entries. When the symmetric INT8 flavour is the faster one on
    the CPU, the CPU flavour's file goes and the symmetric one serves onnxruntime too."""
    if "int8-cpu" in run.onnx and "int8-cpu" not in _shipped(run):
        run.path("int8-cpu").unlink()
        del run.onnx["int8-cpu"]
        run.metrics["int8"]["cpu_flavour_not_shipped"] = run.metrics.pop("int8-cpu")
    entries = []
    for key, kind in run.onnx.items():
        serves_cpu = key == "int8" and run.int8_for_cpu == "int8"
        fields = {"backends": [*kind.backends, "onnxruntime"]} if serves_cpu else {}
        entries.append(bw.onnx_entry(run.root, kind, **fields))
        if key in run.fused:
            entries.append(bw.onnx_entry(run.root, run.fused[key], **fields,
                                         label_agreement=run.metrics[key]["fused"]["label_agreement"]))
    return entries


def _by_precision(metrics: dict) -> dict:
    """metrics keyed by precision; a second flavour of a precision (the CPU INT8 flavour) sits
    under <precision>.flavours.<flavour>."""
    out: dict = {}
    for key, values in metrics.items():
        kind = file_kind(key)
        if key == kind.precision:
            out[key] = values
        else:
            out[kind.precision].setdefault("flavours", {})[kind.flavour] = values
    return out


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


def _write_manifest(run: ExportRun) -> None:
    from regionkd.sdk import __version__

    opts, ckpt = run.opts, run.ckpt
    params = sum(p.numel() for p in run.model.parameters())
    extra = {**run.extra, "metadata": bw.metadata_section(**opts.metadata)} if opts.metadata else run.extra
    run.manifest = bw.write_bundle_manifest(
        run.root, model=bw.model_section(ckpt, params, opts.name, _count_gflops(run.model, run.input_size)),
        preprocessing=run.preprocessing, files=_onnx_entries(run) + run.engine_files,
        metrics=_by_precision(run.metrics), provenance=bw.provenance_section(ckpt, opts.checkpoint, __version__),
        max_batch=opts.max_batch, extra=extra)


def _sign(run: ExportRun) -> None:
    from regionkd.sdk.signing import sign_bundle

    run.signed_by = sign_bundle(run.root, run.sign_key)["key_id"]
    log.info("signed manifest.json with key %s", run.signed_by)


# ---------------------------------------------------------------- the table and the run

@dataclass(frozen=True)
class Step:
    """A row of the export: `run(state)` runs when `wanted(options)`; otherwise `note`, if any, is
    logged in its place (so a user reads what the export did not do)."""
    name: str
    run: Callable[[ExportRun], None]
    wanted: Callable[[ExportOptions], bool] = lambda opts: True
    note: str = ""


def _makes(precision: str) -> Callable[[ExportOptions], bool]:
    return lambda opts: precision in opts.precisions


STEPS = (
    Step("load checkpoint", _load_checkpoint),
    Step("read CT slices", _read_slices),
    Step("export fp32 ONNX", _export_fp32),
    Step("convert fp16", _convert_fp16, _makes("fp16")),
    Step("quantize int8 (TensorRT flavour)", partial(_quantize_int8, "int8"), _makes("int8")),
    Step("quantize int8 (CPU flavour)", partial(_quantize_int8, "int8-cpu"), _makes("int8")),
    Step("measure CPU latency", _measure_latency),
    Step("build fused models", _build_fused, lambda opts: opts.fused, "--no-fused: no fused models"),
    Step("validate (Dice)", _validate, lambda opts: opts.val is not None,
         "no --val: Dice not measured, --max-dice-drop not enforced"),
    Step("build engines", _build_engines, lambda opts: opts.engine != "never"),
    Step("write manifest", _write_manifest),
    Step("sign manifest", _sign, lambda opts: opts.sign_key is not None),
)


def export_steps(opts: ExportOptions) -> list:
    """The steps `export_bundle` runs for these options, in order."""
    return [step for step in STEPS if step.wanted(opts)]


def export_bundle(opts: ExportOptions, progress: Callable[[str, int, int], None] | None = None) -> ExportResult:
    """Run the steps the options want into a temporary directory that becomes `opts.out` at the end.

    Every option is checked before any work and before the first progress report. `progress(step,
    done, total)` is called as each step starts (`done` of the `total` steps finished) and once more
    at the end as ("done", total, total)."""
    started = time.perf_counter()
    run = ExportRun(opts, sign_key=check_options(opts))
    total = len(export_steps(opts))
    report = progress or (lambda step, done, total: None)
    done = 0
    with bw.bundle_directory(opts.out, overwrite=opts.overwrite) as root:
        run.root = root
        for step in STEPS:
            if not step.wanted(opts):
                if step.note:
                    log.info("%s", step.note)
                continue
            report(step.name, done, total)
            step.run(run)
            done += 1
    report("done", total, total)
    return ExportResult(bundle=Path(opts.out), manifest=run.manifest, seconds=time.perf_counter() - started,
                        skipped_engines=run.skipped_engines, signed_by=run.signed_by)


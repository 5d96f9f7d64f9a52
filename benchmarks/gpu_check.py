"""One-shot GPU check: what this project does on a CUDA machine, in one run of under 8 minutes.

    bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine (installs wheels, then runs this)
    python benchmarks/gpu_check.py OUT_DIR --dry-run # the same code on the CPU at tiny sizes (the test)

Sections, each in its own process with its own time budget; a section that fails or runs out of
time records its error (and whatever it measured until then) and the next one still runs:

  environment      torch / CUDA / cuDNN versions, the GPU, the driver, which optional modules import
  pytorch_latency  per-volume latency (512x512x100 volume, 384x384 network input) of the teacher and
                   each student: eager fp32, eager fp16 autocast, CUDA graphs (static batch) in fp32
                   and fp16, torch.compile fp16 while the budget lasts; untrained weights
  distillation     384x384 phantoms, the paper's networks: RAUNet teacher, then ENet distilled with
                   the paper's loss, as many steps as fit in about 4 minutes in all (step time
                   measured first, then `--max-steps`), Dice of both on held-out phantoms
  sdk_torch        the SDK's per-volume time, file to file, with the torch backend on CUDA
                   (`Segmenter.from_backend(TorchBackend(model, 'cuda'), ...)`), stage breakdown
  tensorrt_rtx     the distilled student exported (regionkd-export), TensorRT-RTX engines built,
                   whether they load and run on this GPU (and why not), their time through
                   `Segmenter(bundle, backend='tensorrt-rtx')`, onnxruntime of the same bundle beside

Results: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md, rewritten after every section (a run
stopped half way keeps what finished); per-section logs in OUT_DIR/logs/.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FORMAT = "regionkd-gpu-check/1"
SECTIONS = ("environment", "pytorch_latency", "distillation", "sdk_torch", "tensorrt_rtx")
OPTIONAL_MODULES = ("numpy", "torch", "triton", "onnx", "onnxruntime", "onnxsim", "nibabel", "scipy", "click", "tqdm",
                    "jsonschema", "cryptography", "isal", "cc3d", "PIL", "tensorrt", "tensorrt_rtx_bindings",
                    "pycuda.driver")
# the paper's distillation loss (Qin et al.), as regionkd-train distill takes it
PAPER_KD_ARGS = ("--kd", "pmd,imd,rad", "--alpha", "0.1", "--beta1", "0.9", "--beta2", "0.9", "--temperature", "4",
                 "--pmd-balance", "pixels")
# HU window of the latency section's own pipeline (latency does not depend on it)
LATENCY_WINDOW = (-100.0, 200.0)


@dataclass(frozen=True)
class Sizes:
    device: str                    # where every section runs: "cuda" (full) or "cpu" (dry run)
    volume: tuple                  # the timed volume, x, y, z (z: axial slices)
    input_size: int                # square network input
    batch: int                     # slices per forward pass (the static batch of CUDA graphs and compile)
    warmup: int
    repeat: int
    compile_backend: str           # torch.compile backend ("eager" in the dry run: dynamo without codegen)
    compile_models: int            # how many networks torch.compile is tried on (in priority order)
    compile_min_left_s: float      # do not start a compile with less of the section's budget left
    compile_precision: str | None  # None: autocast (fp16 on CUDA)
    sdk_warmup: int
    sdk_repeat: int
    train_cases: int               # distillation phantoms (the trainer's split takes its validation cases)
    test_cases: int                # held-out phantoms for the Dice (another seed)
    phantom_shape: tuple
    quick_shape: tuple             # phantoms of the fallback checkpoint (when the distillation made none)
    train_batch: int
    probe_steps: int               # steps of the runs that measure the step time (> 4: the trainer's median)
    max_steps_cap: int | None      # the dry run's cap on the planned steps
    workers: int                   # DataLoader workers of the training runs
    eval_reserve_s: float          # time kept back for each evaluation until one has been measured
    margin_s: float                # slack left at the end of the distillation section
    teacher_share: float           # share of the training time the teacher gets
    ort_repeat: int
    threads: int | None = None     # CPU threads (torch, onnxruntime, OpenMP) of every section; None: their defaults
    amp_archs: tuple | None = None # networks timed with autocast too (None: all)
    teacher: str = "raunet"
    student: str = "enet"
    # the paper's students (and the authors' MobileNetV2 variant); enet first: the distilled one
    students: tuple = ("enet", "mobilenetv2", "mobilenetv2-os8", "resnet18", "espnet")
    sdk_students: tuple = ("mobilenetv2",)   # also timed through the SDK, untrained
    task: str = "liver"
    budgets: dict = field(default_factory=dict)


FULL = Sizes(device="cuda", volume=(512, 512, 100), input_size=384, batch=16, warmup=3, repeat=10,
             compile_backend="inductor", compile_models=6, compile_min_left_s=20.0, compile_precision=None,
             sdk_warmup=1, sdk_repeat=3,
             train_cases=10, test_cases=3, phantom_shape=(384, 384, 32), quick_shape=(128, 128, 8), train_batch=16,
             probe_steps=8, max_steps_cap=None, workers=max(0, min(8, (os.cpu_count() or 1) - 4)),
             eval_reserve_s=25.0, margin_s=8.0, teacher_share=0.5, ort_repeat=2,
             budgets={"environment": 20, "pytorch_latency": 80, "distillation": 240, "sdk_torch": 35,
                      "tensorrt_rtx": 70})
DRY = Sizes(device="cpu", volume=(64, 64, 8), input_size=64, batch=4, warmup=1, repeat=2,
            compile_backend="eager", compile_models=1, compile_min_left_s=0.0, compile_precision="fp32",
            sdk_warmup=1, sdk_repeat=2,
            train_cases=3, test_cases=1, phantom_shape=(64, 64, 8), quick_shape=(64, 64, 8), train_batch=2,
            probe_steps=5, max_steps_cap=3, workers=0, eval_reserve_s=10.0, margin_s=2.0, teacher_share=0.5,
            ort_repeat=2,
            # one thread: two OpenMP threads on a shared 2-core machine run 10-30x slower than one; autocast on
            # the CPU is emulated (RAUNet 25x slower), so only the distilled student runs it
            threads=1, amp_archs=("enet",),
            budgets={"environment": 20, "pytorch_latency": 40, "distillation": 90, "sdk_torch": 30,
                     "tensorrt_rtx": 45})


class CheckError(RuntimeError):
    """A step of a section that could not be done (the message says why)."""


class SectionStopped(BaseException):
    """The orchestrator stopped this section (its budget ran out)."""


# ----------------------------------------------------------------------------- plumbing

def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class Recorder:
    """A section's result, rewritten atomically after every change (so a killed section keeps it)."""

    def __init__(self, path: Path, name: str, budget_s: float):
        self.path, self.t0 = Path(path), time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.data = {"section": name, "status": "running", "started": now_iso(), "budget_s": round(budget_s, 1),
                     "error": None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def update(self, **values) -> None:
        self.data.update(values)
        self.save()

    def add(self, key: str, row: dict) -> None:
        self.data.setdefault(key, []).append(row)
        self.save()

    def save(self) -> None:
        from regionkd.sdk.atomic import atomic_write_text

        self.data["wall_s"] = round(time.perf_counter() - self.t0, 2)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=C._json_default) + "\n")


@dataclass
class Context:
    out: Path
    work: Path
    dry_run: bool


COMMANDS = {"regionkd-train": "regionkd.train.cli", "regionkd-export": "regionkd.export.cli"}


def call_cli(command: str, argv, what: str) -> str:
    """Run a regionkd command (`COMMANDS`) as a user does, in its own process (`python -m`, since the
    GPU machine has the checkout on PYTHONPATH and no console scripts); its output goes to this
    section's log (and is returned). A non-zero exit raises CheckError with the command's last lines."""
    argv = [str(a) for a in argv]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", COMMANDS[command], *argv], capture_output=True, text=True)
    text, rc = proc.stdout + proc.stderr, proc.returncode
    print(f"$ {what} {' '.join(argv)}\n{text.rstrip()}\n[exit {rc}, {time.perf_counter() - t0:.1f} s]", flush=True)
    if rc:
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
        raise CheckError(f"{what} {argv[0]} exited {rc}: {tail}")
    return text


def device_of(S: Sizes):
    """The torch device of the run; the full check needs CUDA."""
    import torch

    if S.device == "cuda" and not torch.cuda.is_available():
        raise CheckError(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda})")
    return torch.device(S.device)


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stats_ms(times_s: list) -> dict:
    import numpy as np

    ms = [1000.0 * t for t in times_s]
    return {"median": float(np.median(ms)), "min": float(min(ms)), "mean": float(np.mean(ms)), "n": len(ms)}


def timed(fn, warmup: int, repeat: int, device) -> dict:
    """Median / min / mean milliseconds of `fn()` after `warmup` calls, synchronised each time."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return stats_ms(times)


def run_with_deadline(fn, seconds: float):
    """Run `fn()` in a thread (grad off there too: grad mode is per thread); (seconds taken, exception
    or None), or (None, None) when it is still running after `seconds`."""
    import threading

    import torch

    box = {}

    def work():
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                fn()
        except Exception as exc:
            box["error"] = exc
        box["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(max(1.0, seconds))
    if thread.is_alive():
        return None, None
    return box["seconds"], box.get("error")


def measure_fitted(seg, volume: Path, S: Sizes, rec: "Recorder", repeat: int) -> dict:
    """`regionkd.sdk.bench.measure` with as many timed runs (up to `repeat`) as fit in what is left of
    the section's budget, judged by a first run (which is also the first warm-up run)."""
    from regionkd.sdk.bench import measure, reset_peak_rss

    with tempfile.TemporaryDirectory(prefix="regionkd-gpu-check-") as tmp:
        rss_reset = reset_peak_rss()
        t0 = time.perf_counter()
        seg.segment_file(volume, Path(tmp) / "first.nii.gz")
        one = time.perf_counter() - t0
        fits = int((rec.left() - 3) / one) - max(0, S.sdk_warmup - 1) - 1   # measure adds one traced run
        if fits < 1:
            raise CheckError(f"one run took {one:.1f} s: no timed run fits in the {rec.left():.0f} s left")
        m = measure(seg, volume, Path(tmp), max(0, S.sdk_warmup - 1), min(repeat, fits), rss_reset=rss_reset)
    m["first_run_ms"] = 1000.0 * one
    return m


def timed_volume(ctx: Context, S: Sizes) -> Path:
    """The SDK sections' CT volume: `regionkd.sdk.bench.synthetic_ct` of the timed shape, as NIfTI."""
    from regionkd.sdk.atomic import atomic_path
    from regionkd.sdk.bench import synthetic_ct, write_volume

    path = ctx.work / f"ct-{'x'.join(map(str, S.volume))}.nii.gz"
    if not path.is_file():
        hu, affine = synthetic_ct(S.volume)
        with atomic_path(path, suffix=".nii.gz") as tmp:
            write_volume(tmp, hu, affine)
    return path


def read_train_log(ckpt: Path) -> dict:
    """The start and end records and the last step's loss of a training run's log."""
    from regionkd.train.checkpoint import log_path_for

    start = end = last_step = None
    for line in log_path_for(ckpt).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "start":
            start = rec
        elif rec.get("event") == "end":
            end = rec
        elif rec.get("event") == "step":
            last_step = rec
    if end is None:
        raise CheckError(f"{ckpt}: the training log has no end record")
    return {"start": start or {}, "end": end, "last_step": last_step or {}}


def make_phantoms(out: Path, S: Sizes, cases: int, shape, seed: int) -> dict:

    t0 = time.perf_counter()
    call_cli("regionkd-train", ["phantoms", out, "--task", S.task, "--cases", cases, "--seed", seed,
                          "--shape", ",".join(str(int(v)) for v in shape), "--overwrite", "--quiet"], "regionkd-train")
    return {"path": str(out), "cases": cases, "shape": list(shape), "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2)}


def trained_checkpoints(ctx: Context) -> dict:
    """{'teacher': path, 'student': path} of the distillation section, where it wrote them."""
    found = {}
    for role in ("teacher", "student"):
        p = ctx.work / "distill" / f"{role}.pt"
        if p.is_file():
            found[role] = p
    return found


def quick_checkpoint(ctx: Context, S: Sizes) -> Path:
    """A student checkpoint trained for one step on two small phantoms at the network input size:
    the SDK and export sections' stand-in when the distillation section made none."""

    work = ctx.work / "quick"
    ckpt = work / f"{S.student}.pt"
    if ckpt.is_file():
        return ckpt
    work.mkdir(parents=True, exist_ok=True)
    make_phantoms(work / "data", S, 2, S.quick_shape, seed=7)
    call_cli("regionkd-train", ["student", "--arch", S.student, "--data", work / "data", "--out", ckpt, "--preset", "paper",
                          "--max-steps", 1, "--epochs", 1, "--samples-per-epoch", 2, "--batch-size", 2,
                          "--input-size", S.input_size, "--device", S.device, "--quiet"], "regionkd-train")
    return ckpt


# ----------------------------------------------------------------------------- 1. environment

def section_environment(S: Sizes, rec: Recorder, ctx: Context) -> None:
    import importlib
    import platform
    import shutil

    modules = {}
    for name in OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(name)
            top = sys.modules.get(name.split(".")[0], mod)
            modules[name] = {"imports": True, "version": getattr(top, "__version__", None),
                             "from": str(Path(getattr(top, "__file__", "") or "").parent)}
        except Exception as exc:  # ImportError, OSError (a shared library), anything a module raises on import
            modules[name] = {"imports": False, "error": first_line(exc)}
        rec.update(modules=modules)
    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    import torch

    cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0, "devices": []}
    for i in range(cuda["device_count"]):
        p = torch.cuda.get_device_properties(i)
        cuda["devices"].append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2 ** 30, 1),
                                "multiprocessors": p.multi_processor_count})
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            cuda["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
            head = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
            cuda["driver_cuda"] = next((part.split(":")[1].strip().split()[0] for part in head.split("|")
                                        if "CUDA Version" in part), None)
        except (OSError, subprocess.SubprocessError) as exc:
            cuda["nvidia_smi"] = f"failed: {exc}"
    else:
        cuda["nvidia_smi"] = "not found"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as exc:
        info["onnxruntime_providers"] = first_line(exc)
    import regionkd.sdk

    info["regionkd"] = {"version": regionkd.sdk.__version__, "sdk_from": str(Path(regionkd.sdk.__file__).parent)}
    try:
        info["regionkd"]["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=C.REPO_ROOT,
                                                    capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    wheels = os.environ.get("GPU_CHECK_WHEELS_REPORT")
    if wheels and Path(wheels).is_file():
        info["wheels"] = json.loads(Path(wheels).read_text())
    rec.update(info=info, cuda=cuda, gpu=cuda["devices"][0]["name"] if cuda["devices"] else None)


# ----------------------------------------------------------------------------- 2. PyTorch latency

class LatencyBench:
    """What every timing of the latency section shares: the device, the host volume, the static
    batch and the autocast dtype, with the per-volume pipeline and the ways of running a network."""

    def __init__(self, S: Sizes, dev):
        import torch

        from regionkd.sdk.bench import synthetic_ct

        self.S, self.dev = S, dev
        self.cuda = dev.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = torch.float16 if self.cuda else torch.bfloat16   # CPU autocast: bfloat16
        self.amp_name = "fp16" if self.cuda else "bf16"
        hu, _ = synthetic_ct(S.volume)
        self.host = torch.from_numpy(hu)
        if self.cuda:
            self.host = self.host.pin_memory()
        self.nx, self.ny, self.nz = S.volume
        self.B, self.size = S.batch, (S.input_size, S.input_size)

    def settings(self, missing: list) -> dict:
        import torch

        S = self.S
        return {"device": str(self.dev), "volume": list(S.volume), "input_size": S.input_size, "batch": self.B,
                "warmup": S.warmup, "repeat": S.repeat, "cudnn_benchmark": self.cuda,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "compile_backend": S.compile_backend, "not_in_registry": missing}

    def preprocess(self, x):
        """Window to [-1, 1] and resize each axial slice to the network input: (z, 1, h, w)."""
        import torch.nn.functional as F

        lo, hi = LATENCY_WINDOW
        s = x.permute(2, 0, 1).float().clamp_(lo, hi).sub_(lo).mul_(2.0 / (hi - lo)).sub_(1.0).unsqueeze(1)
        return F.interpolate(s, size=self.size, mode="bilinear", align_corners=False)

    def padded_batches(self, slices) -> list:
        """(batch, real slices in it) pairs, all of the static batch size B."""
        import torch

        B = self.B
        out = []
        for i in range(0, slices.shape[0], B):
            chunk = slices[i:i + B]
            if chunk.shape[0] < B:          # static batch: pad the last one (CUDA graphs, compile)
                chunk = torch.cat([chunk, chunk.new_zeros((B - chunk.shape[0], *chunk.shape[1:]))])
            out.append((chunk.contiguous(), min(B, slices.shape[0] - i)))
        return out

    def device_batches(self) -> list:
        """The volume's batches on the device once, for the network-only timings."""
        return self.padded_batches(self.preprocess(self.host.to(self.dev)))

    def run_volume(self, forward):
        """Host int16 volume -> labels on the host: copy, window, resize to the input, batched
        network, logits resized back, argmax, copy back."""
        import torch
        import torch.nn.functional as F

        B, nx, ny = self.B, self.nx, self.ny
        x = self.host.to(self.dev, non_blocking=True)
        labels = torch.empty((self.nz, nx, ny), dtype=torch.uint8, device=self.dev)
        for i, (chunk, k) in enumerate(self.padded_batches(self.preprocess(x))):
            logits = forward(chunk)[:k].float()
            logits = F.interpolate(logits, size=(nx, ny), mode="bilinear", align_corners=False)
            labels[i * B:i * B + k] = logits.argmax(1).to(torch.uint8)
        return labels.permute(1, 2, 0).contiguous().cpu()

    def autocast(self, precision):
        import torch

        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=self.amp_dtype, cache_enabled=False)

    def eager(self, model, precision):
        def forward(x):
            with self.autocast(precision):
                return model(x)
        return forward

    def graphed(self, model, precision, example):
        """`model` captured in a CUDA graph on a static input (after warm-up runs on a side stream);
        the forward copies its batch into that input and replays the graph."""
        import torch

        static_in = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                with self.autocast(precision):
                    model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            with self.autocast(precision):
                static_out = model(static_in)

        def forward(x):
            static_in.copy_(x)
            graph.replay()
            return static_out
        return forward

    def measure(self, model_row, forward, batches) -> dict:
        """`model_row` with the whole volume's time and the network's alone."""
        S, dev, nz = self.S, self.dev, self.nz
        vol = timed(lambda: self.run_volume(forward), S.warmup, S.repeat, dev)
        net = timed(lambda: [forward(b) for b, _ in batches], S.warmup, S.repeat, dev)
        return {**model_row, "volume_ms": vol, "network_ms": net, "slices": nz,
                "slices_per_s": nz / (vol["median"] / 1000.0) if vol["median"] > 0 else None}

    def build(self, arch):
        """An untrained network on the device, and the row fields that name it."""
        from regionkd.train.models import create_model

        model = create_model(arch, num_classes=3).to(self.dev).eval()
        params = sum(p.numel() for p in model.parameters())
        return model, {"arch": arch, "role": "teacher" if arch == self.S.teacher else "student", "params": params}


def latency_archs(S: Sizes) -> tuple:
    """(the teacher and the registered students, the students the model registry lacks)."""
    from regionkd.train.models import list_models

    known = set(list_models())
    return [S.teacher] + [a for a in S.students if a in known], [a for a in S.students if a not in known]


def section_pytorch_latency(S: Sizes, rec: Recorder, ctx: Context) -> None:
    import torch

    bench = LatencyBench(S, device_of(S))
    archs, missing = latency_archs(S)
    rec.update(settings=bench.settings(missing), archs=archs)
    with torch.no_grad():
        batches = bench.device_batches()
        for arch in archs:
            time_eager_and_graphed(bench, rec, arch, batches)
        # torch.compile last: its compile time is the one that can eat the budget
        for n, arch in enumerate(compile_order(S, archs)):
            time_compiled(bench, rec, arch, n, batches)
    ok = [r for r in rec.data.get("rows", []) if "volume_ms" in r]
    if not ok:
        raise CheckError("no configuration could be timed")


def time_eager_and_graphed(bench: LatencyBench, rec: Recorder, arch: str, batches: list) -> None:
    """One network eager and as CUDA graphs, in fp32 and autocast: a row each."""
    import torch

    try:
        model, base = bench.build(arch)
    except Exception as exc:
        rec.add("rows", {"arch": arch, "mode": "-", "precision": "-", "error": first_line(exc)})
        return
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats(bench.dev)
    for mode, precision in (("eager", "fp32"), ("eager", bench.amp_name), ("cuda-graph", "fp32"),
                            ("cuda-graph", bench.amp_name)):
        row = {**base, "mode": mode, "precision": precision, "batch": bench.B}
        skipped = latency_skip_reason(bench, rec, arch, mode, precision)
        if skipped:
            rec.add("rows", {**row, "skipped": skipped})
            continue
        rec.add("rows", time_forward(bench, model, row, batches))
    del model
    free_gpu()


def latency_skip_reason(bench: LatencyBench, rec: Recorder, arch: str, mode: str, precision: str) -> str | None:
    """Why this eager / CUDA-graph configuration is not timed (None: it is)."""
    S = bench.S
    if mode == "cuda-graph" and not bench.cuda:
        return "CUDA graphs need a CUDA device"
    if precision != "fp32" and S.amp_archs is not None and arch not in S.amp_archs:
        return f"the dry run times autocast on the CPU (emulated, slow) for {', '.join(S.amp_archs)} only"
    if rec.left() < 3:
        return "not reached within the section's budget"
    return None


def time_forward(bench: LatencyBench, model, row: dict, batches: list) -> dict:
    """`row` timed eager or as a CUDA graph (its setup: the capture), or with the error that stopped it."""
    import torch

    mode, precision = row["mode"], row["precision"]
    try:
        t0 = time.perf_counter()
        forward = bench.eager(model, precision) if mode == "eager" else bench.graphed(model, precision, batches[0][0])
        sync(bench.dev)
        row["setup_s"] = round(time.perf_counter() - t0, 3)
        row = bench.measure(row, forward, batches)
        if bench.cuda and mode == "eager" and precision == "fp32":
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(bench.dev) / 2 ** 20, 1)
    except Exception as exc:
        row["error"] = first_line(exc)
    return row


def compile_order(S: Sizes, archs: list) -> list:
    """The networks in the order torch.compile is tried on them: the distilled student, the teacher, the rest."""
    order = [S.student, S.teacher] + [a for a in archs if a not in (S.student, S.teacher)]
    return [a for a in order if a in archs]


def time_compiled(bench: LatencyBench, rec: Recorder, arch: str, n: int, batches: list) -> None:
    """The `n`-th network of the compile order under torch.compile, if the budget allows: a row."""
    S = bench.S
    row = {"arch": arch, "role": "teacher" if arch == S.teacher else "student", "mode": "compile",
           "precision": S.compile_precision or bench.amp_name, "batch": bench.B, "compile_backend": S.compile_backend}
    if n >= S.compile_models:
        rec.add("rows", {**row, "skipped": f"the dry run compiles {S.compile_models} network(s) only"})
        return
    if rec.left() < max(S.compile_min_left_s, 3):
        rec.add("rows", {**row, "skipped": f"not started: {max(0, rec.left()):.0f} s of the section's "
                                            f"budget left (a compile needs about {S.compile_min_left_s:.0f} s)"})
        return
    try:
        row = compile_and_time(bench, rec, arch, row, batches)
    except Exception as exc:
        row["error"] = first_line(exc)
    rec.add("rows", row)
    free_gpu()


def compile_and_time(bench: LatencyBench, rec: Recorder, arch: str, row: dict, batches: list) -> dict:
    """Compile the network on its first batch (setup_s: the compile), then time it like the others."""
    import torch

    model, base = bench.build(arch)
    row.update(base)
    compiled = torch.compile(model, backend=bench.S.compile_backend, dynamic=False)
    forward = bench.eager(compiled, row["precision"])
    t0 = time.perf_counter()
    seconds, error = run_with_deadline(lambda: (forward(batches[0][0]), sync(bench.dev)), rec.left() - 6)
    if seconds is None:
        end_during_compile(rec, row, time.perf_counter() - t0)
    if error is not None:
        raise error
    row["setup_s"] = round(seconds, 3)      # the compile
    return bench.measure(row, forward, batches)


def end_during_compile(rec: Recorder, row: dict, waited_s: float) -> None:
    """A compile cannot be interrupted: record it and end this process (the orchestrator then stops
    the compile workers it left)."""
    rec.add("rows", {**row, "skipped": f"the compile had not finished after {waited_s:.0f} s "
                                        "(what was left of the section's budget)"})
    rec.update(status="ok", note="ended while a torch.compile was still running")
    sys.stdout.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- 3. distillation

class DistillRuns:
    """The distillation section's regionkd-train runs: training runs on the training phantoms and
    evaluations on the held-out ones, all with the same data, input size, batch and cache."""

    def __init__(self, S: Sizes, work: Path):
        self.S, self.work = S, work
        self.data, self.test = work / "data", work / "test"
        self.common = ["--data", self.data, "--preset", "paper", "--input-size", S.input_size,
                       "--batch-size", S.train_batch, "--epochs", 1, "--device", S.device, "--workers", S.workers,
                       "--cache-dir", work / f"slice-cache-{S.input_size}", "--quiet"]

    def train(self, mode, arch, out, steps, extra=()) -> dict:
        """One regionkd-train run of `steps` steps (one epoch of them: validation once, at the end)."""

        S = self.S
        t0 = time.perf_counter()
        call_cli("regionkd-train", [mode, "--arch", arch, "--out", out, "--max-steps", steps,
                              "--samples-per-epoch", steps * S.train_batch, *self.common, *extra], "regionkd-train")
        wall = time.perf_counter() - t0
        log = read_train_log(out)
        end = log["end"]
        step_s = end.get("step_s_median") or (end["seconds"] / max(1, end["steps"]))
        return {"mode": mode, "arch": arch, "checkpoint": str(out), "steps": end["steps"], "wall_s": round(wall, 2),
                "train_s": end["seconds"], "step_s": step_s,
                "estimated_step_s": (log["start"].get("estimate") or {}).get("estimated_step_s"),
                "overhead_s": round(max(0.0, wall - end["steps"] * step_s), 2),
                "val_dice": end.get("val_dice"), "loss_final": (log["last_step"].get("loss") or {}).get("total")}

    def distill(self, out, steps, teacher) -> dict:
        """The student distilled from `teacher` with the paper's loss."""
        return self.train("distill", self.S.student, out, steps, ["--teacher", teacher, *PAPER_KD_ARGS])

    def evaluate(self, ckpt, name) -> dict:
        """A checkpoint's Dice (mean and per case) on the held-out phantoms."""

        t0 = time.perf_counter()
        out = self.work / f"eval-{name}.json"
        call_cli("regionkd-train", ["evaluate", ckpt, "--data", self.test, "--cases", "all", "--device", self.S.device,
                              "--batch-size", self.S.batch, "--json", out, "--quiet"], "regionkd-train")
        res = json.loads(out.read_text())
        return {"dice": {c: m.get("dice") for c, m in res["mean"].items()}, "mean": res["mean"],
                "per_case_dice": {cid: {c: v.get("dice") for c, v in per.items()} for cid, per in res["cases"].items()},
                "cases": res["case_ids"], "notes": res.get("notes", []), "seconds": round(time.perf_counter() - t0, 2)}

    def steps_for(self, seconds, step_s) -> int:
        """How many steps of `step_s` fit in `seconds` (at least one; at most the dry run's cap)."""
        n = max(1, int(seconds // step_s)) if step_s > 0 else 1
        return min(n, self.S.max_steps_cap) if self.S.max_steps_cap else n


def section_distillation(S: Sizes, rec: Recorder, ctx: Context) -> None:
    device_of(S)
    work = ctx.work / "distill"
    work.mkdir(parents=True, exist_ok=True)
    runs = DistillRuns(S, work)
    rec.update(setting={"task": S.task, "teacher": S.teacher, "student": S.student, "input_size": S.input_size,
                        "batch_size": S.train_batch, "preset": "paper", "kd": " ".join(PAPER_KD_ARGS),
                        "device": S.device, "workers": S.workers})
    phantoms = {"train": make_phantoms(runs.data, S, S.train_cases, S.phantom_shape, seed=2021)}
    rec.update(phantoms=phantoms)
    phantoms["test"] = make_phantoms(runs.test, S, S.test_cases, S.phantom_shape, seed=2022)
    rec.update(phantoms=phantoms)
    probe_t, probe_s = probe_step_times(runs, rec)
    # fixed cost of a run (network, data, validation, checkpoint): the student probe's; the teacher
    # probe's also built the slice cache
    overhead = probe_s["overhead_s"]
    teacher, plan = train_teacher(runs, rec, probe_t, probe_s, overhead)
    distill_student(runs, rec, plan, teacher, probe_s, overhead)


def probe_step_times(runs: DistillRuns, rec: Recorder) -> tuple:
    """The step time of each run, measured on short runs of the same command."""
    S = runs.S
    probe_t = runs.train("teacher", S.teacher, runs.work / "probe-teacher.pt", S.probe_steps)
    rec.update(probes={"teacher": probe_t})
    probe_s = runs.distill(runs.work / "probe-student.pt", S.probe_steps, runs.work / "probe-teacher.pt")
    rec.update(probes={"teacher": probe_t, "student": probe_s})
    return probe_t, probe_s


def train_teacher(runs: DistillRuns, rec: Recorder, probe_t: dict, probe_s: dict, overhead: float) -> tuple:
    """The teacher, trained for its share of the time left after both evaluations and runs' fixed
    costs are set aside, then tested; (its row, the plan)."""
    S = runs.S
    left = rec.left() - S.margin_s - 2 * S.eval_reserve_s - 2 * overhead
    n_teacher = runs.steps_for(max(0.0, left) * S.teacher_share, probe_t["step_s"])
    plan = {"teacher_steps": n_teacher, "training_s_available": round(left, 1),
            "teacher_step_s": probe_t["step_s"], "student_step_s": probe_s["step_s"],
            "cap": S.max_steps_cap}
    rec.update(plan=plan)
    teacher = runs.train("teacher", S.teacher, runs.work / "teacher.pt", n_teacher)
    rec.update(teacher=teacher)
    teacher["test"] = runs.evaluate(runs.work / "teacher.pt", "teacher")
    rec.update(teacher=teacher)
    return teacher, plan


def distill_student(runs: DistillRuns, rec: Recorder, plan: dict, teacher: dict, probe_s: dict,
                    overhead: float) -> None:
    """The student, distilled from the trained teacher for what is left (its evaluation assumed to
    take as long as the teacher's), then tested beside it."""
    S = runs.S
    left = rec.left() - S.margin_s - teacher["test"]["seconds"] - overhead
    n_student = runs.steps_for(max(0.0, left), probe_s["step_s"])
    plan.update(student_steps=n_student, student_training_s_available=round(left, 1))
    rec.update(plan=plan)
    student = runs.distill(runs.work / "student.pt", n_student, runs.work / "teacher.pt")
    rec.update(student=student)
    student["test"] = runs.evaluate(runs.work / "student.pt", "student")
    rec.update(student=student, dice={"teacher": teacher["test"]["dice"], "student": student["test"]["dice"]})


# ----------------------------------------------------------------------------- 4. SDK, torch backend

def section_sdk_torch(S: Sizes, rec: Recorder, ctx: Context) -> None:
    import torch

    from regionkd.sdk.segmenter import Segmenter
    from regionkd.train.models import create_model
    from regionkd.train.torch_backend import TorchBackend, open_checkpoint

    dev = device_of(S)
    volume = timed_volume(ctx, S)
    trained = trained_checkpoints(ctx)
    fallback = None if trained else quick_checkpoint(ctx, S)
    meta_ckpt = trained.get("student") or trained.get("teacher") or fallback
    rec.update(volume={"path": str(volume), "shape": list(S.volume), "made_by": "regionkd.sdk.bench.synthetic_ct"},
               settings={"device": str(dev), "batch": S.batch, "warmup": S.sdk_warmup, "repeat": S.sdk_repeat},
               checkpoints={k: str(v) for k, v in trained.items()} or {"fallback": str(fallback)})
    jobs = [(S.teacher, "teacher", trained.get("teacher")), (S.student, "student", trained.get("student"))]
    jobs += [(a, "student", None) for a in S.sdk_students]
    for arch, role, ckpt in jobs:
        row = {"arch": arch, "role": role, "backend": "pytorch", "device": str(dev)}
        if rec.left() < 3:
            rec.add("rows", {**row, "skipped": "not reached within the section's budget"})
            continue
        try:
            if ckpt is not None:
                opened = open_checkpoint(ckpt)
                model, row["weights"] = opened.backend.model, "trained in the distillation section"
            else:
                opened = open_checkpoint(meta_ckpt)
                model = create_model(arch, num_classes=len(opened.class_names))
                row["weights"] = "untrained"
            model = model.to(dev).eval()
            row["params"] = sum(p.numel() for p in model.parameters())
            seg = Segmenter.from_backend(TorchBackend(model, dev, max_batch=S.batch), opened.preprocessing,
                                         opened.class_names, organ_labels=opened.organ_labels, batch_size=S.batch)
            with seg:
                row.update(sdk_row(measure_fitted(seg, volume, S, rec, S.sdk_repeat)))
        except Exception as exc:
            row["error"] = first_line(exc)
        rec.add("rows", row)
        model = seg = opened = None
        free_gpu()
    if not any("latency_ms" in r for r in rec.data.get("rows", [])):
        raise CheckError("no configuration could be timed")


def sdk_row(m: dict) -> dict:
    """The fields of `regionkd.sdk.bench.measure`'s result that the report shows."""
    return {"latency_ms": {"median": m["median_ms"], "mean": m["mean_ms"], "sd": m["sd_ms"], "min": m["min_ms"]},
            "breakdown_ms": m["stages_median_ms"], "gpu_median_ms": m.get("gpu_median_ms"),
            "outside_inference_share": m["outside_inference_share"], "slices": m["slices"],
            "slices_per_s": m["slices_per_s"], "repeat": m["repeat"], "warmup": m["warmup"] + 1,
            "first_run_ms": m.get("first_run_ms"),
            "peak_rss_mb": m["peak_rss_mb"]}


# ----------------------------------------------------------------------------- 5. TensorRT-RTX

def probe_rtx_engine(trt, path: Path, S: Sizes) -> dict:
    """Deserialize a TensorRT-RTX engine and run it on this GPU with torch-allocated memory (no
    pycuda needed): whether it loads, its first run (the JIT compile), then a batch's median time."""
    import torch

    row = {"engine": path.name, "loads": False}
    blob = path.read_bytes()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    row.update(rtx_engine_validity(runtime, blob))
    t0 = time.perf_counter()
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        row["why_not"] = "deserialize_cuda_engine returned None (see the section log for TensorRT-RTX's message)"
        return row
    context = engine.create_execution_context()
    if context is None:
        row["why_not"] = "create_execution_context returned None"
        return row
    row["deserialize_s"] = round(time.perf_counter() - t0, 3)
    inp, out, batch, shape = rtx_io_shape(trt, engine, S)
    if not context.set_input_shape(inp, shape):
        row["why_not"] = f"the engine refused input shape {shape}"
        return row
    x, y = bind_rtx_buffers(trt, engine, context, inp, out, shape)   # kept alive: the engine runs on them
    run = rtx_runner(context)
    t0 = time.perf_counter()
    run()
    row["first_run_s"] = round(time.perf_counter() - t0, 3)      # JIT compilation for this GPU
    stats = timed(run, S.warmup, S.repeat, torch.device("cuda"))
    batches = math.ceil(S.volume[2] / batch)
    row.update(loads=True, batch=batch, batch_ms=stats, input_dtype=str(x.dtype), output_dtype=str(y.dtype),
               network_ms_per_volume=stats["median"] * batches, output_finite=bool(torch.isfinite(y.float()).all()))
    return row


def rtx_engine_validity(runtime, blob: bytes) -> dict:
    """TensorRT-RTX's own verdict on whether the engine suits this GPU, where the runtime offers one."""
    if not hasattr(runtime, "get_engine_validity"):
        return {}
    try:
        validity, diagnostics = runtime.get_engine_validity(blob)
        return {"validity": getattr(validity, "name", str(validity)), "diagnostics": str(diagnostics)}
    except Exception as exc:
        return {"validity": f"not checked: {first_line(exc)}"}


def rtx_io_shape(trt, engine, S: Sizes) -> tuple:
    """(input name, output name, batch, input shape): the engine's first input and output, at the
    check's batch or the largest its optimisation profile allows."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    inp, out = inputs[0], outputs[0]
    profile_max = engine.get_tensor_profile_shape(inp, 0)[2]
    batch = min(S.batch, int(tuple(profile_max)[0]))
    shape = (batch, *(int(v) for v in tuple(engine.get_tensor_shape(inp))[1:]))
    return inp, out, batch, shape


def torch_dtype_of(trt, trt_dtype):
    """The torch dtype of a TensorRT tensor dtype (by way of numpy)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.zeros(1, dtype=np.dtype(trt.nptype(trt_dtype)))).dtype


def bind_rtx_buffers(trt, engine, context, inp: str, out: str, shape: tuple) -> tuple:
    """A random input and an empty output on the GPU, allocated by torch, bound to the context."""
    import torch

    x = torch.randn(shape, device="cuda").to(torch_dtype_of(trt, engine.get_tensor_dtype(inp)))
    y = torch.empty(tuple(int(v) for v in context.get_tensor_shape(out)), device="cuda",
                    dtype=torch_dtype_of(trt, engine.get_tensor_dtype(out)))
    context.set_tensor_address(inp, x.data_ptr())
    context.set_tensor_address(out, y.data_ptr())
    return x, y


def rtx_runner(context):
    """One synchronous run of the context on a stream of its own."""
    import torch

    stream = torch.cuda.Stream()

    def run():
        with torch.cuda.stream(stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise CheckError("execute_async_v3 returned False")
        stream.synchronize()
    return run


def section_tensorrt_rtx(S: Sizes, rec: Recorder, ctx: Context) -> None:
    trt, module, sdk_ok, sdk_why = record_rtx_modules(rec)
    trained = trained_checkpoints(ctx)
    ckpt = trained.get("student") or quick_checkpoint(ctx, S)
    bundle, manifest, engines, notes = export_rtx_bundle(S, rec, ctx, ckpt, "student" in trained, trt)
    check_engines_load(S, rec, trt, module, bundle, engines, notes)
    volume = timed_volume(ctx, S)
    jobs = [("tensorrt-rtx", p) for p in ("fp32", "fp16")] + [("onnxruntime", "fp32")]
    for backend, precision in jobs:
        row = {"backend": backend, "precision": precision, "arch": manifest["model"].get("arch")}
        skipped = bundle_skip_reason(rec, backend, precision, engines, sdk_ok, sdk_why)
        if skipped:
            rec.add("rows", {**row, "skipped": skipped})
            continue
        rec.add("rows", time_bundle(S, rec, bundle, volume, row))


def record_rtx_modules(rec: Recorder) -> tuple:
    """Whether TensorRT-RTX and pycuda import, the GPU's compute capability, whether the SDK's
    tensorrt-rtx backend can run: recorded; (trt or None, its module row, SDK ok, why not)."""
    import torch

    from regionkd.sdk.backends.tensorrt_backend import gpu_compute_capability, import_pycuda, import_trt, tensorrt_available
    from regionkd.sdk.errors import RegionKDError

    trt = None
    try:
        trt = import_trt("tensorrt-rtx")
        module = {"imports": True, "version": trt.__version__}
    except RegionKDError as exc:
        module = {"imports": False, "why": str(exc)}
    try:
        import_pycuda()
        pycuda = {"imports": True}
    except RegionKDError as exc:
        pycuda = {"imports": False, "why": str(exc)}
    cc, cc_why = gpu_compute_capability()
    sdk_ok, sdk_why = tensorrt_available(rtx=True)
    rec.update(module=module, pycuda=pycuda, torch_cuda=torch.cuda.is_available(), compute_capability=cc,
               compute_capability_why=cc_why or None, sdk_backend={"available": sdk_ok, "reason": sdk_why})
    return trt, module, sdk_ok, sdk_why


def export_rtx_bundle(S: Sizes, rec: Recorder, ctx: Context, ckpt: Path, trained: bool, trt) -> tuple:
    """regionkd-export of the checkpoint in fp32 and fp16, with TensorRT-RTX engines where TensorRT-RTX
    imports: recorded; (bundle, manifest, engine entries, the exporter's engine lines)."""

    bundle = ctx.work / "bundle"
    engine_mode = "auto" if trt is not None else "never"
    t0 = time.perf_counter()
    text = call_cli("regionkd-export", [ckpt, "-o", bundle, "--precision", "fp32,fp16", "--engine", engine_mode,
                                  "--max-batch", S.batch, "--overwrite"], "regionkd-export")
    manifest = json.loads((bundle / "manifest.json").read_text())
    engines = [f for f in manifest["files"] if f.get("format") == "tensorrt-rtx-engine"]
    notes = [line.strip() for line in text.splitlines() if "engine" in line and ("skipped" in line or "built" in line)]
    rec.update(export={"checkpoint": str(ckpt), "trained": trained, "engine": engine_mode,
                       "seconds": round(time.perf_counter() - t0, 2), "bundle": str(bundle), "notes": notes[-8:]},
               engines_built=[{"path": e["path"], "precision": e.get("precision"), "bytes": e.get("bytes"),
                               "trt_version": e.get("trt_version")} for e in engines])
    return bundle, manifest, engines, notes


def check_engines_load(S: Sizes, rec: Recorder, trt, module: dict, bundle: Path, engines: list, notes: list) -> None:
    """Do the engines load and run on this GPU? (independent of pycuda: torch holds the memory).
    Records a row per engine tried, the verdict and why not."""
    import torch

    loads, why = None, None
    if trt is None:
        why = f"TensorRT-RTX is not installed here ({module['why']})"
    elif not engines:
        why = "no TensorRT-RTX engine was built: " + ("; ".join(notes) or "see the section log")
    elif not torch.cuda.is_available():
        why = "no CUDA GPU here: the engines were built (ahead of time, on the CPU) but cannot be loaded"
    else:
        for e in engines:
            try:
                row = probe_rtx_engine(trt, bundle / e["path"], S)
            except Exception as exc:
                row = {"engine": Path(e["path"]).name, "loads": False, "why_not": first_line(exc)}
            row["precision"] = e.get("precision")
            rec.add("engine_runs", row)
        runs = rec.data.get("engine_runs", [])
        loads = any(r["loads"] for r in runs)
        if not all(r["loads"] for r in runs):
            why = "; ".join(f"{r['engine']}: {r.get('why_not') or r.get('validity')}" for r in runs if not r["loads"])
    rec.update(engines_load_on_this_gpu=loads, engines_why_not=why)


def bundle_skip_reason(rec: Recorder, backend: str, precision: str, engines: list, sdk_ok: bool,
                       sdk_why: str) -> str | None:
    """Why the bundle is not timed through the SDK with this backend and precision (None: it is)."""
    if backend == "tensorrt-rtx" and not sdk_ok:
        return f"the SDK's tensorrt-rtx backend cannot run here: {sdk_why}"
    if backend == "tensorrt-rtx" and not any(e.get("precision") == precision for e in engines):
        return f"no {precision} TensorRT-RTX engine in the bundle"
    if rec.left() < 3:
        return "not reached within the section's budget"
    return None


def time_bundle(S: Sizes, rec: Recorder, bundle: Path, volume: Path, row: dict) -> dict:
    """`row` with the bundle's per-volume time through `Segmenter(bundle, backend=...)`, or the error."""
    from regionkd.sdk.segmenter import Segmenter

    backend, precision = row["backend"], row["precision"]
    try:
        seg = Segmenter(bundle, backend=backend, precision=precision, batch_size=S.batch,
                        threads=(S.threads or os.cpu_count() or 1) if backend == "onnxruntime" else None)
        row["model_file"] = seg.backend.model_path.name
        with seg:
            row.update(sdk_row(measure_fitted(seg, volume, S, rec,
                                              S.sdk_repeat if backend != "onnxruntime" else S.ort_repeat)))
    except Exception as exc:
        row["error"] = first_line(exc)
    return row


SECTION_FUNCS = {"environment": section_environment, "pytorch_latency": section_pytorch_latency,
                 "distillation": section_distillation, "sdk_torch": section_sdk_torch,
                 "tensorrt_rtx": section_tensorrt_rtx}


def run_section(name: str, S: Sizes, ctx: Context, budget_s: float) -> int:
    """The child process: one section, its result in OUT/sections/NAME.json."""
    rec = Recorder(ctx.out / "sections" / f"{name}.json", name, budget_s)
    if S.threads:
        import torch

        torch.set_num_threads(S.threads)

    def stop(signum, frame):
        raise SectionStopped()

    signal.signal(signal.SIGTERM, stop)
    try:
        SECTION_FUNCS[name](S, rec, ctx)
        rec.update(status="ok")
    except SectionStopped:
        rec.update(status="timed_out", error=f"stopped at its {budget_s:.0f} s budget (what it measured is kept)")
    except Exception as exc:
        rec.update(status="failed", error=first_line(exc), traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()
    return 0


# ----------------------------------------------------------------------------- the orchestrator

class Orchestrator:
    def __init__(self, S: Sizes, ctx: Context, sections: list, budget_s: float | None, quiet: bool, command: str):
        self.S, self.ctx, self.sections, self.quiet = S, ctx, sections, quiet
        self.t0 = time.perf_counter()
        total = sum(S.budgets[n] for n in sections)
        self.deadline = self.t0 + (budget_s if budget_s else total + 15)
        self.child = self.current = None
        self.result = {"format": FORMAT, "dry_run": ctx.dry_run, "command": command, "started": now_iso(),
                       "machine": C.machine_description(), "sizes": {k: v for k, v in asdict(S).items() if k != "budgets"},
                       "budgets_s": {n: S.budgets[n] for n in sections}, "budget_s": round(self.deadline - self.t0, 1),
                       "sections": {n: {"section": n, "status": "pending"} for n in sections}}

    def write(self) -> None:
        self.result["wall_s"] = round(time.perf_counter() - self.t0, 1)
        C.write_results("gpu_check", self.result, markdown_report(self.result), results_dir=self.ctx.out)

    def budget_for(self, name: str) -> float:
        """The section's budget, all remaining ones shrunk alike when less time is left than they add up to."""
        rest = self.sections[self.sections.index(name):]
        wanted = sum(self.S.budgets[n] for n in rest)
        left = self.deadline - time.perf_counter() - 2.0
        return self.S.budgets[name] * min(1.0, max(0.0, left) / wanted)

    def kill_child(self) -> None:
        p = self.child
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def run_one(self, name: str, budget: float) -> dict:
        out = self.ctx.out
        log_path = out / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        result_path = out / "sections" / f"{name}.json"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--section", name,
               "--section-budget-s", f"{budget:.1f}", "--work", str(self.ctx.work)] + (["--dry-run"] if self.ctx.dry_run else [])
        t0 = time.perf_counter()
        timed_out = False
        with open(log_path, "w") as log:
            env = dict(os.environ)
            if self.S.threads:   # OpenMP / BLAS pools of the section's process
                env.update({k: str(self.S.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env=env)
            try:
                rc = self.child.wait(timeout=budget + 3.0)
            except subprocess.TimeoutExpired:
                timed_out = True
                self.kill_child()
                rc = self.child.returncode
            try:
                os.killpg(self.child.pid, signal.SIGKILL)   # whatever it left running (compile workers)
            except (ProcessLookupError, PermissionError):
                pass
            self.child = None
        wall = time.perf_counter() - t0
        try:
            data = json.loads(result_path.read_text())
        except (OSError, ValueError):
            data = {"section": name}
        if timed_out and data.get("status") in (None, "running", "timed_out"):
            data.update(status="timed_out", error=f"stopped at its {budget:.0f} s budget (what it measured is kept)")
        elif data.get("status") in (None, "running"):
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            data.update(status="failed", error=f"the section's process exited {rc}: " + " | ".join(tail))
        data.update(budget_s=round(budget, 1), process_wall_s=round(wall, 1), log=str(log_path.relative_to(out)))
        return data

    def run(self) -> int:
        from regionkd.sdk.console import echo, progress_bar

        def terminated(signum, frame):
            raise SectionStopped()

        signal.signal(signal.SIGTERM, terminated)
        self.write()
        with progress_bar(total=len(self.sections), desc="gpu check", unit="section", quiet=self.quiet,
                          every=1) as bar:
            try:
                for name in self.sections:
                    self.current = name
                    budget = self.budget_for(name)
                    if budget < 5:
                        self.result["sections"][name] = {"section": name, "status": "skipped",
                                                         "error": "no time left in the check's budget"}
                    else:
                        if not self.quiet:
                            echo(f"{name}: running (budget {budget:.0f} s)", bar, err=True)
                        self.result["sections"][name] = self.run_one(name, budget)
                    s = self.result["sections"][name]
                    if not self.quiet:
                        echo(f"{name}: {s['status']} in {s.get('process_wall_s', 0):.0f} s"
                             + (f" ({s['error']})" if s.get("error") else ""), bar, err=True)
                    self.write()
                    bar.update(1)
            except SectionStopped:
                self.kill_child()
                self.result["stopped"] = "terminated from outside (the wrapper's time limit?)"
                for n, s in self.result["sections"].items():
                    if s.get("status") != "pending":
                        continue
                    try:
                        s = json.loads((self.ctx.out / "sections" / f"{n}.json").read_text()) if n == self.current else s
                    except (OSError, ValueError):
                        pass
                    s.update(status="timed_out" if n == self.current else "skipped",
                             error="stopped from outside while running" if n == self.current else "not run: the check was stopped")
                    self.result["sections"][n] = s
                self.write()
                return 124
        return 0


# ----------------------------------------------------------------------------- the report

def _ms(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown_report(result: dict) -> str:
    sec = result["sections"]
    m = result["machine"]
    title = "GPU check" + (" (dry run: CPU, tiny sizes; the numbers only show that the code runs)" if result["dry_run"] else "")
    lines = [f"# {title}", "", C.machine_line(m), "", f"Command: `{result['command']}`; "
             f"{result.get('wall_s', 0):.0f} s in all (budget {result['budget_s']:.0f} s).", ""]
    lines += [C.markdown_table(["section", "status", "seconds", "budget s", "error"],
                               [[n, s.get("status"), _ms(s.get("process_wall_s"), 0), _ms(s.get("budget_s"), 0),
                                 (s.get("error") or "")[:160]] for n, s in sec.items()], align="llrrl"), ""]
    for name, fn in (("environment", _md_environment), ("pytorch_latency", _md_latency),
                     ("distillation", _md_distillation), ("sdk_torch", _md_sdk), ("tensorrt_rtx", _md_rtx)):
        if name in sec and sec[name].get("status") not in ("pending", "skipped"):
            try:
                lines += fn(sec[name]) + [""]
            except Exception as exc:   # a partial section must not stop the report
                lines += [f"({name}: report incomplete: {first_line(exc)})", ""]
    return "\n".join(lines)


def _md_environment(s: dict) -> list:
    cuda, info = s.get("cuda", {}), s.get("info", {})
    out = ["## Environment", ""]
    rows = [["Python", info.get("python")], ["torch / CUDA / cuDNN",
                                             f"{(s.get('modules', {}).get('torch') or {}).get('version')} / "
                                             f"{cuda.get('torch_cuda')} / {cuda.get('cudnn')}"],
            ["GPU", ", ".join(f"{d['name']} (sm {d['compute_capability']}, {d['memory_gib']} GiB)"
                              for d in cuda.get("devices", [])) or "none"],
            ["driver (nvidia-smi)", f"{cuda.get('nvidia_smi')}; CUDA {cuda.get('driver_cuda')}"],
            ["onnxruntime providers", ", ".join(info.get("onnxruntime_providers") or []) if isinstance(
                info.get("onnxruntime_providers"), list) else info.get("onnxruntime_providers")],
            ["regionkd", f"{(info.get('regionkd') or {}).get('sdk_from')} (commit {(info.get('regionkd') or {}).get('commit')})"]]
    wheels = info.get("wheels")
    if wheels:
        rows.append(["wheels", f"{wheels.get('wheels_found')} found; installed: "
                               f"{', '.join(wheels.get('installed', [])) or 'none'}; failed: "
                               f"{', '.join(wheels.get('failed', {})) or 'none'}"])
    out += [C.markdown_table(["item", "value"], rows, align="ll"), "",
            C.markdown_table(["module", "imports", "version / error"],
                             [[n, "yes" if v.get("imports") else "no", v.get("version") if v.get("imports") else
                               (v.get("error") or "")[:120]] for n, v in s.get("modules", {}).items()], align="lll")]
    return out


def _md_latency(s: dict) -> list:
    st = s.get("settings", {})
    out = ["## PyTorch per-volume latency", "",
           f"{'x'.join(map(str, st.get('volume', [])))} volume on {st.get('device')}, network input {st.get('input_size')}, "
           f"batch {st.get('batch')} (the last padded: a static batch), median of {st.get('repeat')} after "
           f"{st.get('warmup')} warm-up; volume: host int16 -> device, window, resize, network, logits resized back, "
           f"argmax, labels back to the host; network: the forward passes alone. Untrained weights.", ""]
    rows = []
    for r in s.get("rows", []):
        note = r.get("error") or r.get("skipped") or ""
        if r.get("mode") == "compile" and r.get("setup_s") is not None:
            note = note or f"compile {r['setup_s']:.1f} s ({r.get('compile_backend')})"
        elif r.get("mode") == "cuda-graph" and r.get("setup_s") is not None:
            note = note or f"capture {r['setup_s']:.2f} s"
        rows.append([r.get("arch"), _ms((r.get("params") or 0) / 1e6, 2) if r.get("params") else "-", r.get("mode"),
                     r.get("precision"), _ms((r.get("volume_ms") or {}).get("median")),
                     _ms((r.get("network_ms") or {}).get("median")), _ms(r.get("slices_per_s"), 0),
                     _ms(r.get("peak_gpu_mib"), 0), note[:120]])
    out.append(C.markdown_table(["network", "M params", "mode", "precision", "volume ms", "network ms", "slices/s",
                                 "peak MiB", "note"], rows, align="lrllrrrrl"))
    return out


def _dice_cells(d: dict | None, classes: list) -> list:
    return [C.fmt((d or {}).get(c)) for c in classes]


def _md_distillation(s: dict) -> list:
    st = s.get("setting", {})
    ph = s.get("phantoms", {})
    plan = s.get("plan", {})
    out = ["## Distillation (384x384 in the GPU run)", "",
           f"{st.get('task')} phantoms {'x'.join(map(str, (ph.get('train') or {}).get('shape', [])))}: "
           f"{(ph.get('train') or {}).get('cases')} for training (the trainer's validation split among them), "
           f"{(ph.get('test') or {}).get('cases')} held out (seed {(ph.get('test') or {}).get('seed')}); "
           f"input {st.get('input_size')}, batch {st.get('batch_size')}, preset {st.get('preset')}, on {st.get('device')}; "
           f"student loss: `{st.get('kd')}`. Steps planned from the step time of {s.get('probes', {}).get('teacher', {}).get('steps')}"
           f"-step runs: teacher {plan.get('teacher_steps')}, student {plan.get('student_steps')}.", ""]
    classes = []
    for role in ("teacher", "student"):
        for c in ((s.get(role) or {}).get("test") or {}).get("dice", {}):
            if c not in classes:
                classes.append(c)
    rows = []
    for role in ("teacher", "student"):
        r = s.get(role)
        if not r:
            continue
        rows.append([role, r["arch"], r["steps"], _ms(r["step_s"], 3), _ms(r["train_s"], 1),
                     C.fmt(r.get("loss_final"), 4), ", ".join(f"{k} {C.fmt(v)}" for k, v in (r.get("val_dice") or {}).items()),
                     *_dice_cells((r.get("test") or {}).get("dice"), classes)])
    out.append(C.markdown_table(["role", "network", "steps", "s/step", "train s", "final loss", "val Dice"] +
                                [f"test Dice {c}" for c in classes], rows, align="llrrrrl" + "r" * len(classes)))
    return out


def _md_sdk(s: dict) -> list:
    st = s.get("settings", {})
    out = ["## SDK per-volume time, torch backend", "",
           f"`Segmenter.from_backend(TorchBackend(model, '{st.get('device')}'))` on "
           f"{'x'.join(map(str, (s.get('volume') or {}).get('shape', [])))} synthetic CT, file to file "
           f"(`regionkd.sdk.bench.measure`: median of {st.get('repeat')} after {st.get('warmup')} warm-up), batch {st.get('batch')}.", ""]
    out.append(_sdk_table(s.get("rows", []), first=("network", lambda r: f"{r.get('arch')} ({r.get('weights', r.get('role'))})")))
    return out


def _sdk_table(rows: list, first) -> str:
    body = []
    for r in rows:
        if "latency_ms" not in r:
            body.append([first[1](r), (r.get("error") or r.get("skipped") or "")[:140]] + [""] * 8)
            continue
        b = r["breakdown_ms"]
        body.append([first[1](r), _ms(r["latency_ms"]["median"]), *(_ms(b[k]) for k in ("load", "preprocess", "inference",
                                                                                     "postprocess", "write")),
                     _ms(r.get("gpu_median_ms")), f"{100 * r['outside_inference_share']:.1f}", _ms(r.get("slices_per_s"), 0)])
    return C.markdown_table([first[0], "median ms", "load", "pre", "infer", "post", "write", "GPU ms", "outside %",
                             "slices/s"], body)


def _md_rtx(s: dict) -> list:
    mod, exp, cuda_mod = s.get("module", {}), s.get("export", {}), s.get("pycuda") or {}
    loads = s.get("engines_load_on_this_gpu")
    out = ["## TensorRT-RTX", "",
           "- module `tensorrt_rtx_bindings`: " + (f"version {mod.get('version')}" if mod.get("imports") else
                                                   f"not available: {mod.get('why')}"),
           "- pycuda (the SDK's TensorRT runtime): " + ("imports" if cuda_mod.get("imports") else
                                                        f"not available: {cuda_mod.get('why')}"),
           f"- bundle: {exp.get('checkpoint')} ({'the distilled student' if exp.get('trained') else 'a one-step stand-in'}) "
           f"exported in {_ms(exp.get('seconds'), 1)} s (--engine {exp.get('engine')}); TensorRT-RTX engines built: "
           f"{', '.join(e['path'] for e in s.get('engines_built', [])) or 'none'}",
           f"- **engines load on this GPU: {'yes' if loads else ('no' if loads is False else 'not tried')}**"
           + (f" ({s.get('engines_why_not')})" if s.get("engines_why_not") else ""), ""]
    runs = s.get("engine_runs", [])
    if runs:
        out += [C.markdown_table(["engine", "precision", "loads", "validity", "first run s (JIT)", "batch", "batch ms",
                                  "network ms per volume", "note"],
                                 [[r.get("engine"), r.get("precision"), "yes" if r.get("loads") else "no", r.get("validity"),
                                   _ms(r.get("first_run_s"), 2), r.get("batch"), _ms((r.get("batch_ms") or {}).get("median"), 2),
                                   _ms(r.get("network_ms_per_volume")), (r.get("why_not") or "")[:120]] for r in runs],
                                 align="llllrrrrl"), ""]
    out.append(_sdk_table(s.get("rows", []), first=("SDK backend", lambda r: f"{r.get('backend')} {r.get('precision')}")))
    return out


# ----------------------------------------------------------------------------- the command

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="The same code on the CPU at tiny sizes (64x64 slices, 8-slice volumes, a few steps).")
@click.option("--budget-s", type=click.FloatRange(min=10), help="Wall-clock seconds for the whole check (default: the sum "
                                                                "of the section budgets); sections shrink to fit.")
@click.option("--sections", "only", help=f"Comma-separated subset of: {', '.join(SECTIONS)}.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Where phantoms, checkpoints and bundles go (default: a temporary folder, removed at the end).")
@click.option("--keep-work", is_flag=True, help="Keep the temporary work folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--section", type=click.Choice(SECTIONS), hidden=True)
@click.option("--section-budget-s", type=float, hidden=True)
def main(out_dir, dry_run, budget_s, only, work, keep_work, quiet, section, section_budget_s):
    """Run the GPU check and write OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md."""
    from regionkd.sdk.errors import InputError

    S = DRY if dry_run else FULL
    out_dir.mkdir(parents=True, exist_ok=True)
    if section:                                   # a child process: one section
        return run_section(section, S, Context(out_dir, Path(work), dry_run), section_budget_s or S.budgets[section])
    sections = list(SECTIONS)
    if only:
        sections = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise InputError(f"--sections: unknown {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    made = work is None
    work = Path(work or tempfile.mkdtemp(prefix="regionkd-gpu-check-work-"))
    work.mkdir(parents=True, exist_ok=True)
    via = "bash benchmarks/gpu_check.sh" if os.environ.get("GPU_CHECK_WHEELS_REPORT") else "python benchmarks/gpu_check.py"
    command = " ".join([via, str(out_dir)] + (["--dry-run"] if dry_run else []) + (["--sections", only] if only else []))
    try:
        rc = Orchestrator(S, Context(out_dir, work, dry_run), sections, budget_s, quiet, command).run()
    finally:
        if made and not keep_work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        click.echo(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return rc


if __name__ == "__main__":
    from regionkd.sdk.console import run_cli

    run_cli(main)

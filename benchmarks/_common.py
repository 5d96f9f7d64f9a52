"""What the benchmark scripts share: phantom datasets on disk, the machine description, seed
statistics and bootstrap intervals, and writing results as JSON + Markdown + PNG (atomically,
so an interrupted run never leaves half a results file)."""
from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from regionkd.sdk.atomic import atomic_path, atomic_write_text
from regionkd.sdk.errors import InputError, require

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
WORK_DIR = REPO_ROOT / "work" / "benchmarks"
DONE_MARKER = ".done"


# ----------------------------------------------------------------------------- data

def make_phantom_dataset(root: Path, task: str, cases: int, shape: Sequence[int], seed: int,
                         layout: str | None = None, min_lesion_mm: float = 0.0, lesion_contrast: float = 1.0,
                         images_only: bool = False) -> Path:
    """A phantom dataset written as `regionkd-train phantoms` writes it (`write_phantoms`), reused
    when a previous run finished it (`.done` marker). Fixed seed: the benchmark is the same every time.
    `images_only`: a plain folder of CT images without labels (stand-in for unannotated scans)."""
    root = Path(root)
    layout = layout or ("kits19" if task == "kidney" else "lits")
    marker = root / DONE_MARKER
    wanted = {"task": task, "cases": int(cases), "shape": [int(v) for v in shape], "seed": int(seed), "layout": layout}
    if min_lesion_mm:
        wanted["min_lesion_mm"] = float(min_lesion_mm)
    if lesion_contrast != 1.0:
        wanted["lesion_contrast"] = float(lesion_contrast)
    if images_only:
        wanted["images_only"] = True
    if marker.is_file():
        if json.loads(marker.read_text() or "{}") == wanted:
            return root
        raise InputError(f"{root}: holds another phantom dataset ({marker.read_text().strip()}); "
                         f"remove it or pick another --work directory")
    from regionkd.train.data.phantoms import write_phantoms

    # no marker: nothing there, or a dataset of an interrupted run (generation is atomic, the marker not)
    write_phantoms(root, task, layout, int(cases), int(seed), tuple(int(v) for v in shape),
                   min_lesion_mm=float(min_lesion_mm), lesion_contrast=float(lesion_contrast), images_only=images_only)
    atomic_write_text(marker, json.dumps(wanted))
    return root


# ----------------------------------------------------------------------------- machine

def machine_description(threads: int | None = None) -> dict:
    """Where the numbers were measured: CPU, core count, thread setting, library versions, GPU."""
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "numpy": np.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    for mod in ("torch", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    info["gpu"] = gpu_name()
    return info


def gpu_name() -> str | None:
    """The CUDA device's name, or None when there is none (or torch is missing)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- statistics

def mean_std(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof=1; None for one value), n) of the finite values."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return None, None, 0
    return float(vals.mean()), (float(vals.std(ddof=1)) if vals.size > 1 else None), int(vals.size)


def pooled_std(groups: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """Within-group standard deviation pooled over groups (each group: one setting, several seeds):
    sqrt(sum of squared deviations / sum of (n - 1)). Returns (std, degrees of freedom)."""
    ss, dof = 0.0, 0
    for g in groups:
        v = np.asarray([x for x in g if x is not None and math.isfinite(x)], dtype=np.float64)
        if v.size > 1:
            ss += float(((v - v.mean()) ** 2).sum())
            dof += v.size - 1
    return (math.sqrt(ss / dof) if dof else None), dof


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap); (None, None) when there
    are fewer than two values, and the value itself twice when all values are equal."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if vals.size < 2:
        return None, None
    if np.all(vals == vals[0]):
        return float(vals[0]), float(vals[0])
    stats = require("scipy.stats", purpose="bootstrap intervals")
    res = stats.bootstrap((vals,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# ----------------------------------------------------------------------------- results files

def fmt(v, digits: int = 3, pct: bool = False) -> str:
    """A table cell: '-' for missing values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if pct:
        return f"{100 * v:+.1f}%"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` one character per column ('l' or 'r', default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(stem: str, rows: list, markdown: str, chart: Callable | None = None,
                  results_dir: Path = RESULTS_DIR) -> dict[str, Path]:
    """Write `<stem>.json` (the rows), `<stem>.md` and `<stem>.png` (`chart(fig)` draws on a
    matplotlib Figure) into `results_dir`, each atomically. Returns the paths written."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": results_dir / f"{stem}.json", "md": results_dir / f"{stem}.md"}
    atomic_write_text(paths["json"], json.dumps(rows, indent=1, default=_json_default) + "\n")
    atomic_write_text(paths["md"], markdown.rstrip() + "\n")
    if chart is not None:
        matplotlib = require("matplotlib", purpose="benchmark charts")
        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 5.5), dpi=110, layout="constrained")
        chart(fig)
        paths["png"] = results_dir / f"{stem}.png"
        with atomic_path(paths["png"], suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    return paths


def echo_results(markdown: str, paths: dict[str, Path], quiet: bool) -> None:
    """Print a report and the files `write_results` wrote (nothing with --quiet)."""
    if not quiet:
        import click

        click.echo(markdown)
        click.echo("wrote " + ", ".join(str(v) for v in paths.values()))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def machine_line(machine: dict) -> str:
    """One Markdown line saying where and when the numbers were measured."""
    cpu = machine.get("cpu_model") or machine.get("processor")
    gpu = machine.get("gpu") or "no GPU"
    return (f"Measured {machine['date']} on {cpu} ({machine['cpu_count']} cores, threads={machine.get('threads')}), "
            f"{gpu}; torch {machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}, "
            f"Python {machine['python']}.")


def command_line(script: str, ctx) -> str:
    """The command that reproduces this run: the script and every option given explicitly."""
    import click

    parts = ["python", script]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE or value is None:
            continue
        opt = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value:
                parts.append(opt)
        else:
            parts += [opt, str(value)]
    return " ".join(parts)

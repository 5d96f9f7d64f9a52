"""Install the wheels placed beside `gpu_check.sh` (benchmarks/gpu_wheels/), offline, into a folder
that goes on PYTHONPATH: only the distributions this Python lacks (whatever version it has is kept:
torch's numpy is never replaced), each wheel with --no-deps (their dependencies are wheels in the
same folder, from the `pip download` of gpu_wheels/README.md). TensorRT-RTX comes in a CUDA 12 and
a CUDA 13 flavour: with both there, the one the driver supports is taken (nvidia-smi's
"CUDA Version"). Standard library only: it runs before anything else is installed.

    python benchmarks/_gpu_wheels.py WHEEL_DIR SITE_DIR REPORT.json

The report says what was found, installed, already present, skipped and failed; a wheel that
does not install is reported, never fatal (the check records what then cannot run).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RTX_FLAVOUR = re.compile(r"^tensorrt-rtx-(cu\d+)(-libs|-bindings)?$")


def normalise(name: str) -> str:
    """PEP 503 name: 'tensorrt_rtx_cu13_libs' -> 'tensorrt-rtx-cu13-libs'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    parts = path.name[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name}: not a wheel file name")
    return normalise(parts[0]), parts[1]


def installed(name: str) -> str | None:
    """The version of distribution `name` this Python already has, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver_cuda_major() -> int | None:
    """The CUDA major version the NVIDIA driver supports (nvidia-smi's header), or None."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.", out)
    return int(m.group(1)) if m else None


def plan(wheels: list[Path], have=installed, cuda_major: int | None = None) -> dict:
    """Which wheels to install: {"install": [paths], "present": {name: version}, "skipped": {file: why}}."""
    by_name: dict[str, list[tuple[str, Path]]] = {}
    for w in sorted(wheels):
        try:
            name, version = wheel_name(w)
        except ValueError:
            by_name.setdefault("?", []).append(("", w))
            continue
        by_name.setdefault(name, []).append((version, w))
    flavours = sorted({RTX_FLAVOUR.match(n).group(1) for n in by_name if RTX_FLAVOUR.match(n)})
    keep_flavour = None
    if len(flavours) > 1:   # both flavours ship module tensorrt_rtx_bindings: install one
        usable = [f for f in flavours if cuda_major is not None and int(f[2:]) <= cuda_major]
        keep_flavour = max(usable or flavours, key=lambda f: int(f[2:]))
    out = {"install": [], "present": {}, "skipped": {}}
    for name, found in by_name.items():
        if name == "?":
            out["skipped"].update({w.name: "not a wheel file name" for _, w in found})
            continue
        m = RTX_FLAVOUR.match(name)
        if m and keep_flavour and m.group(1) != keep_flavour:
            out["skipped"].update({w.name: f"TensorRT-RTX {m.group(1)} left out: {keep_flavour} taken (the driver "
                                           f"supports CUDA {cuda_major or 'unknown'})" for _, w in found})
            continue
        version = have(name)
        if version is not None:
            out["present"][name] = version
            continue
        newest = found[-1][1]       # sorted by file name: the last version listed
        out["install"].append(newest)
        out["skipped"].update({w.name: "another version of it is installed" for _, w in found[:-1]})
    return out


def pip_install(files: list[Path], site: Path, wheel_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Install `files` into `site`; all at once, and one by one if that fails. (installed, failed)."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-script-location",
            "--disable-pip-version-check", "--no-compile", "--quiet", "--upgrade", "--target", str(site),
            "--find-links", str(wheel_dir)]
    if not files:
        return [], {}
    r = subprocess.run(base + [str(f) for f in files], capture_output=True, text=True)
    if r.returncode == 0:
        return [f.name for f in files], {}
    done, failed = [], {}
    for f in files:
        r = subprocess.run(base + [str(f)], capture_output=True, text=True)
        if r.returncode == 0:
            done.append(f.name)
        else:
            lines = (r.stderr or r.stdout).strip().splitlines()
            failed[f.name] = lines[-1] if lines else f"pip exited {r.returncode}"
    return done, failed


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    wheel_dir, site, report_path = Path(argv[0]), Path(argv[1]), Path(argv[2])
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    report = {"wheel_dir": str(wheel_dir), "site": str(site), "python": sys.version.split()[0],
              "wheels_found": len(wheels)}
    if not wheels:
        report["note"] = "no wheels beside the script: install step skipped"
    else:
        cuda_major = driver_cuda_major()
        p = plan(wheels, cuda_major=cuda_major)
        stamp = site / ".regionkd-wheels.json"
        key = {"python": sys.executable, "version": sys.version, "install": sorted(f.name for f in p["install"])}
        if stamp.is_file() and json.loads(stamp.read_text() or "{}").get("key") == key:
            previous = json.loads(stamp.read_text())
            done, failed = previous["installed"], previous["failed"]
            report["reused"] = True       # a previous run installed the same wheels there
        else:
            site.mkdir(parents=True, exist_ok=True)
            try:
                done, failed = pip_install(p["install"], site, wheel_dir)
            except OSError as exc:
                done, failed = [], {f.name: f"pip could not run: {exc}" for f in p["install"]}
            stamp.write_text(json.dumps({"key": key, "installed": done, "failed": failed}))
        report.update(driver_cuda_major=cuda_major, installed=done, failed=failed, present=p["present"],
                      skipped=p["skipped"])
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    msg = (f"wheels: {len(wheels)} found in {wheel_dir}" +
           (f", {len(report.get('installed', []))} installed into {site}, {len(report.get('present', {}))} already "
            f"present, {len(report.get('failed', {}))} failed" if wheels else " (nothing to install)"))
    print(msg, file=sys.stderr)
    for name, why in report.get("failed", {}).items():
        print(f"  not installed: {name}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The host-side stages of segmenting one volume, measured against their alternatives in one run.

1. Decoding the input: reading a .nii.gz is bounded by gzip inflation. The SDK inflates with
   ISA-L (`isal`); this measures the SDK's read of the .nii.gz, the same file inflated by zlib
   and by ISA-L alone (no NIfTI parsing), and the floor: the SDK's read of the same volume
   stored uncompressed (.nii, from the page cache).
2. The largest-component step (`regionkd.sdk.postprocess.keep_largest_components`) with cc3d
   (what the SDK uses) and with scipy.ndimage.label, on the same prediction-like mask (a phantom's
   labels with scattered false-positive specks), and whether their results are identical.

Each measurement is the median of --repeat runs, the alternatives taking turns so that the
machine's load falls on all alike. Writes benchmarks/results/host_stages.{json,md}.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def phantom_files(shape, folder: Path, seed: int):
    """(labels, .nii.gz path, .nii path) of one liver phantom of `shape` written both ways."""
    import nibabel as nib

    from regionkd.train.data.phantoms import generate_phantom

    ph = generate_phantom("liver", shape, seed=seed, index=0)
    image = nib.Nifti1Image(np.round(ph.hu).astype(np.int16), ph.affine)
    paths = folder / "volume.nii.gz", folder / "volume.nii"
    for p in paths:
        nib.save(image, str(p))
    return np.asarray(ph.label, np.uint8), *paths


def decode_rows(gz: Path, raw: Path, repeat: int) -> list:
    from isal import isal_zlib

    from regionkd.sdk.volume_io import read_nifti

    blob = gz.read_bytes()
    ways = {"SDK read of the .nii.gz (ISA-L)": lambda: read_nifti(gz),
            "inflate only, zlib": lambda: zlib.decompress(blob, wbits=31),
            "inflate only, ISA-L": lambda: isal_zlib.decompress(blob, wbits=31),
            "SDK read of the .nii (floor: no inflation)": lambda: read_nifti(raw)}
    ms = {k: [] for k in ways}
    for _ in range(repeat):                      # taking turns
        for k, fn in ways.items():
            ms[k].append(_median_ms(fn, 1))
    floor = statistics.median(ms["SDK read of the .nii (floor: no inflation)"])
    return [{"stage": "decode", "way": k, "median_ms": statistics.median(v),
             "vs_floor": statistics.median(v) / floor, "bytes": gz.stat().st_size if "gz" in k or "inflate" in k
             else raw.stat().st_size} for k, v in ms.items()]


def component_rows(labels: np.ndarray, repeat: int, seed: int) -> list:
    from regionkd.sdk.postprocess import keep_largest_components

    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    noisy[rng.random(labels.shape) < 0.002] = 1          # false-positive specks, as an untrained net gives
    noisy[rng.random(labels.shape) < 0.0005] = 2
    results = {lab: keep_largest_components(noisy, [1], 3, labeller=lab) for lab in ("cc3d", "scipy")}
    same = bool(np.array_equal(results["cc3d"], results["scipy"]))
    ms = {lab: [] for lab in results}
    for _ in range(repeat):
        for lab in ms:
            ms[lab].append(_median_ms(lambda: keep_largest_components(noisy, [1], 3, labeller=lab), 1))
    scipy_ms = statistics.median(ms["scipy"])
    return [{"stage": "largest component", "way": lab, "median_ms": statistics.median(v),
             "speedup_vs_scipy": scipy_ms / statistics.median(v), "identical_to_scipy": same}
            for lab, v in ms.items()]


def markdown(rows, shape, machine, command) -> str:
    dec = [[r["way"], C.fmt(r["median_ms"], 1), C.fmt(r["vs_floor"], 2) + "x", f"{r['bytes'] / 1e6:.1f}"]
           for r in rows if r["stage"] == "decode"]
    cc = [[r["way"], C.fmt(r["median_ms"], 1), C.fmt(r["speedup_vs_scipy"], 2) + "x",
           "yes" if r["identical_to_scipy"] else "NO"] for r in rows if r["stage"] == "largest component"]
    return "\n".join([f"# Host-side stages of one {'x'.join(map(str, shape))} volume", "", C.machine_line(machine), "",
                      f"Command: `{command}`", "", "## Decoding the input", "",
                      C.markdown_table(["way", "median ms", "vs floor", "file MB"], dec), "",
                      "## Largest component per organ", "",
                      C.markdown_table(["labeller", "median ms", "speed-up vs scipy", "same voxels as scipy"], cc), ""])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shape", default="512,512,100", show_default=True, help="X,Y,Z of the phantom volume.")
@click.option("--repeat", type=click.IntRange(min=1), default=7, show_default=True, help="Runs of each way.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--results", type=click.Path(path_type=Path), default=C.RESULTS_DIR, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def main(shape, repeat, seed, results, quiet):
    """Time reading the input (ISA-L, zlib, the uncompressed floor) and the largest-component step
    (cc3d, scipy) of one CT volume; write results/host_stages.{json,md}."""
    shape = tuple(int(v) for v in shape.split(","))
    with tempfile.TemporaryDirectory(prefix="regionkd-host-") as tmp:
        labels, gz, raw = phantom_files(shape, Path(tmp), seed)
        rows = decode_rows(gz, raw, repeat) + component_rows(labels, repeat, seed)
    machine = C.machine_description(threads=1)
    md = markdown(rows, shape, machine, C.command_line("benchmarks/host_stages.py", click.get_current_context()))
    C.echo_results(md, C.write_results("host_stages", rows, md, None, results), quiet)
    return 0


if __name__ == "__main__":
    from regionkd.sdk.console import run_cli

    run_cli(main)

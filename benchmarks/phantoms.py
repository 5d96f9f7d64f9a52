"""Phantom benchmark: how long a 512x512x100 case takes to generate, and how hard the tumour task is
(the best single HU threshold inside the true organ mask, both polarities, pooled over cases).

    python benchmarks/phantoms.py                 # writes benchmarks/results/phantoms.{json,md}
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from regionkd.train.data.phantoms import generate_phantom  # noqa: E402
from regionkd.train.metrics import best_threshold_dice  # noqa: E402


def generation_seconds(task: str, shape, cases: int, seed: int) -> list[float]:
    times = []
    for i in range(cases):
        t0 = time.perf_counter()
        generate_phantom(task, shape, seed=seed, index=i)
        times.append(time.perf_counter() - t0)
    return times


def threshold_dice(task: str, shape, cases: int, seed: int, min_lesion_mm: float = 0.0) -> dict:
    values, targets, per_case = [], [], []
    for i in range(cases):
        p = generate_phantom(task, shape, seed=seed, index=i, min_lesion_mm=min_lesion_mm)
        organ = p.label > 0
        v, t = p.hu[organ].astype(np.float64), p.label[organ] == 2
        values.append(v)
        targets.append(t)
        if t.any():
            per_case.append(best_threshold_dice(v, t))
    return {"pooled": best_threshold_dice(np.concatenate(values), np.concatenate(targets)),
            "per_case_min": min(per_case), "per_case_max": max(per_case), "cases_with_tumour": len(per_case)}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--gen-cases", default=3, show_default=True, help="512x512x100 cases timed per task.")
@click.option("--dice-cases", default=10, show_default=True, help="256x256x48 cases pooled for the threshold Dice.")
@click.option("--seed", default=0, show_default=True)
@click.option("--results", type=click.Path(path_type=Path), default=C.RESULTS_DIR, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def main(gen_cases, dice_cases, seed, results, quiet):
    """Phantom generation time (512x512x100) and best-single-threshold tumour Dice, per task."""
    rows = []
    for task in ("liver", "kidney"):
        times = generation_seconds(task, (512, 512, 100), gen_cases, seed)
        rows.append({"task": task, "what": "generation_s_512x512x100", "median": float(np.median(times)),
                     "max": float(np.max(times)), "cases": gen_cases})
        for min_mm in (0.0, 20.0):
            d = threshold_dice(task, (256, 256, 48), dice_cases, seed, min_mm)
            rows.append({"task": task, "what": "best_threshold_tumour_dice", "min_lesion_mm": min_mm,
                         "shape": [256, 256, 48], "cases": dice_cases, **d})
    machine = C.machine_description(threads=None)
    table = C.markdown_table(
        ["task", "generation 512x512x100 (s, median / max)", "threshold Dice, default lesions (pooled; per case)",
         "threshold Dice, lesions >= 20 mm (pooled)"],
        [[task,
          "{median:.2f} / {max:.2f}".format(**next(r for r in rows if r["task"] == task and r["what"].startswith("gen"))),
          "{pooled:.3f} ({per_case_min:.3f}-{per_case_max:.3f})".format(
              **next(r for r in rows if r["task"] == task and r.get("min_lesion_mm") == 0.0)),
          "{pooled:.3f}".format(**next(r for r in rows if r["task"] == task and r.get("min_lesion_mm") == 20.0))]
         for task in ("liver", "kidney")])
    md = "\n".join(["# Phantoms", "", C.machine_line(machine), "", table, "",
                    f"Command: `python benchmarks/phantoms.py --gen-cases {gen_cases} --dice-cases {dice_cases} "
                    f"--seed {seed}`"])
    C.write_results("phantoms", rows + [{"machine": machine}], md, results_dir=results)
    if not quiet:
        click.echo(md)


if __name__ == "__main__":
    main()

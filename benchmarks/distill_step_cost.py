"""What a distillation step costs against a plain student step, with the teacher cache warm.

The teacher cache (`regionkd-train distill --teacher-cache DIR`) holds the teacher's outputs for
every slice and orientation a run of one data seed draws, so every further student and setting of
that seed reads them back instead of running the teacher. This script measures the trainer's own
step time (`step_s` in its log: the optimiser step plus reading the batch and the teacher's
outputs) for the student alone and for distillation arms of the kd_ablation `cpu` preset, each
for the first N steps of its seed-0 run (the steps whose teacher outputs the ablation cached),
taking turns in one process so that the machine's load falls on all alike.

Needs the ablation's teacher and cache (`benchmarks/kd_ablation.py --preset cpu` first); writes
benchmarks/results/distill_step_cost.{json,md}.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import kd_ablation as K  # noqa: E402

DEFAULT_ARMS = ("alone", "paper", "ul-all-classes")


def step_times_and_misses(log: Path, skip: int) -> tuple[list[float], int]:
    """From a run's log: step_s of every step after the first `skip` (start-up and the first
    batches), and the teacher outputs the run had to compute (cache misses)."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    times = [r["step_s"] for r in rows if r.get("event") == "step" and r["step"] > skip]
    return times, sum(int(r.get("items_filled") or 0) for r in rows if r.get("event") == "teacher_cache")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--task", type=click.Choice(("liver", "kidney")), default="liver", show_default=True)
@click.option("--arms", default=",".join(DEFAULT_ARMS), show_default=True,
              help="Comma-separated kd_ablation arms; the first is the reference (a plain student).")
@click.option("--student", default="mobilenetv2", show_default=True, help="Student network.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(20), help="Steps per run.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1), help="Turns per arm.")
@click.option("--work", type=click.Path(path_type=Path), help="The ablation's work folder "
              "(default: work/benchmarks/kd_ablation-cpu).")
@click.option("--results", type=click.Path(path_type=Path), default=C.RESULTS_DIR, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def main(task, arms, student, steps, rounds, work, results, quiet):
    """Median step time of each arm (warm teacher cache) and its ratio to the plain student's."""
    from regionkd.sdk.errors import InputError

    names = [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in K.ARMS]
    if unknown:
        raise InputError(f"--arms {', '.join(unknown)}: unknown; known: {', '.join(K.ARMS)}")
    p = replace(K.PRESETS["cpu"], student_steps=steps)
    runner = K.Runner(p, task, Path(work or C.WORK_DIR / "kd_ablation-cpu"), "cpu", verbose=False)
    teacher = runner.teacher_ckpt()
    if not teacher.is_file() or not runner.teacher_cache.is_dir():
        raise InputError(f"{runner.dir}: no teacher or teacher cache; run benchmarks/kd_ablation.py --preset cpu "
                         f"--tasks {task} first")
    machine = C.machine_description(threads=K._torch_threads())
    times, filled = measure(runner, names, student, teacher, rounds, quiet)
    rows = cost_rows(p, task, student, names, steps, rounds, times, filled)
    table = C.markdown_table(["arm", "data", "distillation", "slices per step", "median step (s)",
                              f"× `{names[0]}` per step", "per slice", "teacher outputs computed"],
                             [[f"`{r['arm']}`", r["data"], r["setting"], r["slices_per_step"],
                               f"{r['step_s_median']:.3f}", f"{r['ratio']:.2f}", f"{r['ratio_per_slice']:.2f}",
                               r["teacher_outputs_computed"]] for r in rows])
    md = "\n".join([f"# Distillation step cost, teacher cache warm ({task}, {student})", "",
                    C.machine_line(machine), "", f"Command: `{C.command_line('benchmarks/distill_step_cost.py', click.get_current_context())}`",
                    "", f"{steps} steps per run, {rounds} turns per arm taking turns, median over steps after the "
                    f"tenth; the steps are the first of each arm's seed-0 run in the ablation, whose teacher "
                    f"outputs its cache holds (`teacher outputs computed`: cache misses).", "", table, ""])
    C.echo_results(md, C.write_results("distill_step_cost", rows, md, None, results), quiet)
    return 0


def measure(runner, names: list, student: str, teacher: Path, rounds: int, quiet: bool) -> tuple[dict, dict]:
    """({arm: step times}, {arm: teacher outputs computed}) of `rounds` turns of each arm, taking turns."""
    from regionkd.sdk.console import progress_bar

    times: dict[str, list[float]] = {a: [] for a in names}
    filled: dict[str, int] = {a: 0 for a in names}
    with tempfile.TemporaryDirectory(prefix="regionkd-stepcost-") as tmp, \
            progress_bar(total=rounds * len(names), desc="step cost", unit="run", quiet=quiet) as bar:
        for k in range(rounds):
            for a in names:
                # the ablation's data, slice cache and teacher cache; checkpoints and logs in tmp
                out = Path(tmp) / f"{a}-{k}"
                out.mkdir()
                ckpt = runner.student(student, K.ARMS[a], 0, teacher, out_dir=out)
                t, misses = step_times_and_misses(ckpt.with_name(ckpt.stem + ".log.jsonl"), skip=10)
                times[a] += t
                filled[a] += misses
                bar.update(1)
    return times, filled


def cost_rows(p, task: str, student: str, names: list, steps: int, rounds: int, times: dict, filled: dict) -> list:
    """One row per arm: median step time, and its ratio to the first arm's per step and per slice."""
    def slices(a):  # slices through the student per step
        return p.batch_size + ((p.unlabelled_batch or p.batch_size) if K.ARMS[a].unlabelled else 0)

    ref = statistics.median(times[names[0]])
    rows = []
    for a in names:
        med = statistics.median(times[a])
        rows.append({"task": task, "student": student, "arm": a, "setting": K.ARMS[a].weights,
                     "data": K.ARMS[a].data, "steps": steps, "rounds": rounds, "slices_per_step": slices(a),
                     "step_s_median": round(med, 4), "ratio": round(med / ref, 3),
                     "ratio_per_slice": round(med / slices(a) / (ref / slices(names[0])), 3),
                     "teacher_outputs_computed": filled[a]})
    return rows


if __name__ == "__main__":
    from regionkd.sdk.console import run_cli

    run_cli(main)

"""Distillation ablation on phantoms: does region-aware KD close the teacher-student gap?

Per task (liver, kidney): a fixed phantom dataset (fixed seed, train/validation split by case),
a teacher (RAUNet; UNet in the cpu preset) trained in chunks until its validation Dice stops improving (or the preset's
cap), then each student trained alone and with PMD, PMD+IMD, PMD+IMD+RAD, over several seeds.
Every run is evaluated per case on the validation volumes (`regionkd.train.evaluate`) and its
final loss terms are read from the training log. The report gives per-case-mean Dice with the
spread over seeds, the relative improvement over the student alone, the share of the
teacher-student gap closed, and whether a 0.02 tumour-Dice difference is above the seed spread.

`--sweep` runs the capacity x KD-weight x temperature grid of issue 6 into its own table.

Runs are resumable: a run whose checkpoint and evaluation exist is read back, not repeated; an
interrupted run continues from its last checkpoint (the trainer's --resume).

    python benchmarks/kd_ablation.py --preset smoke          # seconds, for tests
    python benchmarks/kd_ablation.py --preset cpu            # < 2 h on 2 cores (target)
    python benchmarks/kd_ablation.py --preset paper          # full size, needs a CUDA GPU
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KD_SETTINGS = ("none", "pmd", "pmd+imd", "pmd+imd+rad")
PAPER_WEIGHTS = {"alpha": 0.1, "beta1": 0.9, "beta2": 0.9, "temperature": 4.0}


@dataclass(frozen=True)
class Preset:
    """One protocol at one size. Steps = epochs x samples_per_epoch / batch_size."""

    tasks: tuple
    cases: int
    shape: tuple                     # phantom X, Y, Z
    input_size: int
    batch_size: int
    samples_per_epoch: int
    student_epochs: int
    teacher_epochs_cap: int          # the cosine schedule spans this; training stops earlier on a plateau
    teacher_chunk_epochs: int        # validation Dice is checked after every chunk
    teacher_patience: int            # chunks without improvement before the teacher stops
    seeds: tuple
    students: tuple
    teacher: str = "raunet"
    val_fraction: float = 0.25
    val_max_slices: int | None = None
    lr: float = 2e-3
    trainer_preset: str = "demo"
    needs_gpu: bool = False
    data_seed: int = 2021
    min_lesion_mm: float = 0.0       # smallest tumour diameter in the phantoms (coarse CPU presets)
    lesion_contrast: float = 1.0     # liver lesions' HU difference to the liver, times this
    sweep_students: tuple = ("enet", "espnet", "tinynet")
    sweep_settings: tuple = ()
    sweep_seeds: tuple | None = None  # default: the preset's seeds


# The KD-weight / temperature grid of --sweep: one factor at a time around the paper's setting.
SWEEP_SETTINGS = (
    {"name": "none", "kd": "none"},
    {"name": "paper", "kd": "pmd+imd+rad", "alpha": 0.1, "beta1": 0.9, "beta2": 0.9, "temperature": 4.0},
    {"name": "imd0.1", "kd": "pmd+imd+rad", "alpha": 0.1, "beta1": 0.1, "beta2": 0.9, "temperature": 4.0},
    {"name": "imd0.01", "kd": "pmd+imd+rad", "alpha": 0.1, "beta1": 0.01, "beta2": 0.9, "temperature": 4.0},
    {"name": "imd0.1-T1", "kd": "pmd+imd+rad", "alpha": 0.1, "beta1": 0.1, "beta2": 0.9, "temperature": 1.0},
    {"name": "imd0.1-T8", "kd": "pmd+imd+rad", "alpha": 0.1, "beta1": 0.1, "beta2": 0.9, "temperature": 8.0},
    {"name": "pmd1-imd0.1", "kd": "pmd+imd+rad", "alpha": 1.0, "beta1": 0.1, "beta2": 0.9, "temperature": 4.0},
)

PRESETS = {
    # seconds: a handful of steps on 64x64x8 phantoms, for the smoke test
    "smoke": Preset(tasks=("liver",), cases=4, shape=(64, 64, 8), input_size=64, batch_size=2,
                    samples_per_epoch=4, student_epochs=1, teacher_epochs_cap=2, teacher_chunk_epochs=1,
                    teacher_patience=1, seeds=(0, 1), students=("tinynet",), val_max_slices=8,
                    sweep_students=("tinynet",), sweep_settings=SWEEP_SETTINGS[:3], data_seed=0),
    # the same protocol on a 2-core CPU: 96x96 phantoms at their own size (about 4 mm pixels), tumours of
    # at least 20 mm with the liver lesions' contrast doubled, a UNet teacher (RAUNet from scratch learns
    # no tumour within this budget: see benchmarks/README.md). Per-step times at 96x96, batch 8, 2 threads:
    # UNet 0.61 s train / 0.17 s forward, ENet 0.14 s, MobileNetV2 0.09 s. Per task about 6 min teacher,
    # 12 distilled runs x 400 steps x 0.35 s, 4 baselines x 400 x 0.12 s: about 40 min; the two tasks
    # can run side by side (`--tasks liver` and `--tasks kidney`, then one run to collect).
    "cpu": Preset(tasks=("liver", "kidney"), cases=40, shape=(96, 96, 32), input_size=96, batch_size=8,
                  samples_per_epoch=400, student_epochs=8, teacher_epochs_cap=12, teacher_chunk_epochs=4,
                  teacher_patience=2, seeds=(0, 1), students=("enet", "mobilenetv2"), teacher="unet",
                  min_lesion_mm=20.0, lesion_contrast=2.0, sweep_settings=SWEEP_SETTINGS[:5] + SWEEP_SETTINGS[6:],
                  sweep_seeds=(0,)),
    # the paper's sizes (384x384 slices, batch 16, 30 epochs for a student), for a GPU
    "paper": Preset(tasks=("liver", "kidney"), cases=60, shape=(512, 512, 64), input_size=384, batch_size=16,
                    samples_per_epoch=1600, student_epochs=30, teacher_epochs_cap=60, teacher_chunk_epochs=5,
                    teacher_patience=2, seeds=(0, 1, 2), students=("enet", "mobilenetv2"), val_fraction=0.2,
                    lr=1e-3, trainer_preset="paper", needs_gpu=True, sweep_settings=SWEEP_SETTINGS),
}


# ----------------------------------------------------------------------------- one run

def kd_terms(kd: str) -> tuple:
    return () if kd == "none" else tuple(kd.split("+"))


def read_log(ckpt_path: Path) -> tuple[dict, float]:
    """The last logged value of each loss term (seg, pmd, imd, rad, total) of a run, and its training
    seconds (summed over the `end` events of every call: chunked or resumed runs log one each)."""
    from regionkd.train.checkpoint import log_path_for

    last, seconds = {}, 0.0
    log = log_path_for(ckpt_path)
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "step":
                last = rec.get("loss", {})
            elif rec.get("event") == "end":
                seconds += float(rec.get("seconds") or 0.0)
    return {k: last.get(k) for k in ("seg", "pmd", "imd", "rad", "total")}, round(seconds, 1)


class Runner:
    """Trains and evaluates the runs of one task; every result file lives under `work/<task>/`."""

    def __init__(self, preset: Preset, task: str, work: Path, device: str, verbose: bool):
        self.p, self.task, self.device, self.verbose = preset, task, device, verbose
        self.dir = work / task
        self.data = self.dir / "data"
        self.cache = self.dir / f"slice-cache-{preset.input_size}"

    def prepare(self) -> None:
        C.make_phantom_dataset(self.data, self.task, self.p.cases, self.p.shape, self.p.data_seed,
                               min_lesion_mm=self.p.min_lesion_mm, lesion_contrast=self.p.lesion_contrast)

    def config(self, mode: str, arch: str, out: Path, seed: int, epochs: int, **extra):
        from regionkd.train.config import make_config

        p = self.p
        return make_config(mode, arch, self.data, out, preset=p.trainer_preset, epochs=epochs,
                           batch_size=p.batch_size, input_size=p.input_size, lr=p.lr,
                           samples_per_epoch=p.samples_per_epoch, val_max_slices=p.val_max_slices,
                           val_fraction=p.val_fraction, seed=seed, device=self.device, resume=True,
                           cache_dir=str(self.cache), quiet=not self.verbose, log_every=1, **extra)

    def evaluate(self, ckpt: Path) -> dict:
        """Per-case evaluation of a checkpoint on its validation cases, cached as <stem>.eval.json."""
        from regionkd.sdk.atomic import atomic_write_text
        from regionkd.train.evaluate import evaluate_checkpoint

        path = ckpt.with_name(ckpt.stem + ".eval.json")
        if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime:
            return json.loads(path.read_text())
        dev = "cuda" if self.device.startswith("cuda") else "cpu"
        result = evaluate_checkpoint(ckpt, self.data, device=dev, batch_size=self.p.batch_size)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        return result

    def teacher(self) -> tuple[Path, dict]:
        """Train the teacher chunk by chunk (resuming) until the mean foreground validation Dice has
        not improved by 0.005 for `teacher_patience` chunks, or the step cap."""
        from regionkd.sdk.atomic import atomic_write_text
        from regionkd.train.trainer import train

        p = self.p
        ckpt = self.dir / f"teacher-{p.teacher}.pt"
        status_path = self.dir / f"teacher-{p.teacher}.plateau.json"
        if status_path.is_file() and ckpt.is_file():
            return ckpt, json.loads(status_path.read_text())
        steps_per_epoch = max(1, p.samples_per_epoch // p.batch_size)
        cap = p.teacher_epochs_cap * steps_per_epoch
        chunk = p.teacher_chunk_epochs * steps_per_epoch
        history, best, stale, reason = [], -math.inf, 0, "cap"
        target = 0
        while target < cap:
            target = min(target + chunk, cap)
            summary = train(self.config("teacher", p.teacher, ckpt, seed=0, epochs=p.teacher_epochs_cap,
                                        max_steps=target))
            dice = [v for v in summary["val_dice"].values() if v is not None]
            score = sum(dice) / len(dice) if dice else 0.0
            history.append({"step": summary["steps"], "val_dice": summary["val_dice"], "score": round(score, 5)})
            if score > best + 0.005:
                best, stale = score, 0
            else:
                stale += 1
                if stale >= p.teacher_patience and target < cap:
                    reason = "plateau"
                    break
        status = {"stopped": reason, "steps": history[-1]["step"], "cap_steps": cap, "history": history}
        atomic_write_text(status_path, json.dumps(status, indent=1) + "\n")
        return ckpt, status

    def student(self, arch: str, seed: int, teacher: Path, kd: str, name: str | None = None,
                weights: dict | None = None) -> Path:
        from regionkd.train.trainer import train

        ckpt = self.dir / f"{arch}-{name or kd}-s{seed}.pt"
        if ckpt.is_file() and ckpt.with_name(ckpt.stem + ".eval.json").is_file():
            return ckpt
        if kd == "none":
            cfg = self.config("student", arch, ckpt, seed, self.p.student_epochs)
        else:
            cfg = self.config("distill", arch, ckpt, seed, self.p.student_epochs, teacher=str(teacher),
                              kd=",".join(kd_terms(kd)), **(weights or PAPER_WEIGHTS))
        train(cfg)
        return ckpt

    def row(self, ckpt: Path, arch: str, role: str, kd: str, seed: int, **extra) -> dict:
        """One results row: per-case-mean Dice per class, per-case Dice, final loss terms."""
        from regionkd.train.checkpoint import load_checkpoint

        ev = self.evaluate(ckpt)
        ck = load_checkpoint(ckpt)
        prov = ck.get("provenance", {})
        losses, seconds = read_log(ckpt)
        row = {"task": self.task, "arch": arch, "role": role, "kd": kd, "seed": seed,
               "dice": {c: ev["mean"][c]["dice"] for c in ev["class_names"][1:]},
               # cases whose reference lacks a class are None for it, as in the means (LiTS convention;
               # evaluate gives them Dice 1 or 0 by whether anything was predicted)
               "dice_per_case": {cid: {c: None if cid in ev.get("excluded", {}).get(c, ()) else v["dice"]
                                       for c, v in per.items()} for cid, per in ev["cases"].items()},
               "val_dice_global": ck.get("metrics", {}).get("val", {}),
               "steps": ck.get("train_state", {}).get("step"),
               "loss_final": losses, "train_seconds": seconds,
               "checkpoint": str(ckpt.relative_to(self.dir.parent))}
        if kd != "none" and role == "student":
            row.update({k: prov.get(k) for k in ("alpha", "beta1", "beta2", "temperature")})
        row.update(extra)
        return row


# ----------------------------------------------------------------------------- analysis

def group(rows, *keys):
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def case_means(rows, cls: str) -> dict:
    """Per-case Dice of one class averaged over the rows' seeds (cases with a None left out)."""
    acc: dict = {}
    for r in rows:
        for cid, per in r["dice_per_case"].items():
            if per.get(cls) is not None:
                acc.setdefault(cid, []).append(per[cls])
    return {cid: sum(v) / len(v) for cid, v in acc.items()}


def paired_ci(a_rows, b_rows, cls: str):
    """Bootstrap interval over validation cases of mean(Dice_a - Dice_b) per case (seed means)."""
    a, b = case_means(a_rows, cls), case_means(b_rows, cls)
    diffs = [a[c] - b[c] for c in sorted(set(a) & set(b))]
    return C.bootstrap_ci(diffs)


def analyse(rows: list, setting_key: str = "kd", lesion: str = "tumour") -> dict:
    """Seed statistics per (task, arch, setting), improvement over the baseline and gap closed."""
    teachers = {r["task"]: r for r in rows if r["role"] == "teacher"}
    students = [r for r in rows if r["role"] == "student"]
    stats = []
    for (task, arch, setting), rs in group(students, "task", "arch", setting_key).items():
        classes = list(rs[0]["dice"])
        entry = {"task": task, "arch": arch, "setting": setting, "n_seeds": len(rs), "rows": rs, "dice": {}}
        for c in classes:
            m, s, n = C.mean_std(r["dice"][c] for r in rs)
            entry["dice"][c] = {"mean": m, "std": s}
        r0 = rs[0]
        entry["weights"] = ("-" if r0.get("alpha") is None else
                            f"{r0['alpha']:g}/{r0['beta1']:g}/{r0['beta2']:g}, T={r0['temperature']:g}")
        entry["loss_final"] = {k: C.mean_std(r["loss_final"].get(k) for r in rs)[0]
                               for k in ("seg", "pmd", "imd", "rad")}
        stats.append(entry)
    by_key = {(e["task"], e["arch"], e["setting"]): e for e in stats}
    for e in stats:
        base = by_key.get((e["task"], e["arch"], "none"))
        teacher = teachers.get(e["task"])
        e["rel_improvement"], e["gap_closed"], e["ci_vs_none"] = {}, {}, {}
        for c, d in e["dice"].items():
            bm = base["dice"][c]["mean"] if base else None
            tm = teacher["dice"].get(c) if teacher else None
            m = d["mean"]
            e["rel_improvement"][c] = (m - bm) / bm if None not in (m, bm) and bm > 0 else None
            gap = tm - bm if None not in (tm, bm) else None
            e["gap_closed"][c] = (m - bm) / gap if gap and gap > 0 and m is not None else None
            if base and e["setting"] != "none":
                e["ci_vs_none"][c] = paired_ci(e["rows"], base["rows"], c)
        if teacher and e["setting"] == "none":
            e["teacher_gap"] = {c: (teacher["dice"].get(c) - d["mean"]) if None not in (teacher["dice"].get(c), d["mean"])
                                else None for c, d in e["dice"].items()}
            e["teacher_gap_ci"] = {c: paired_ci([teacher], e["rows"], c) for c in e["dice"]}
    spread, dof = C.pooled_std([r["dice"].get(lesion) for r in e["rows"]] for e in stats)
    n = min((e["n_seeds"] for e in stats), default=1)
    se_diff = spread * math.sqrt(2.0 / n) if spread is not None else None
    return {"stats": stats, "teachers": teachers, "seed_spread": spread, "seed_spread_dof": dof,
            "n_seeds": n, "se_diff": se_diff,
            "detectable_0.02": (0.02 > 2 * se_diff) if se_diff is not None else None}


def _pm(d):
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:.3f}" + (f" ± {d['std']:.3f}" if d["std"] is not None else "")


def _ci(ci):
    return "-" if not ci or ci[0] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown_report(title: str, an: dict, command: str, machine: dict, extra_lines=(), lesion: str = "tumour") -> str:
    lines = [f"# {title}", "", C.machine_line(machine), "", f"Command: `{command}`", ""]
    lines += list(extra_lines)
    for task in sorted({e["task"] for e in an["stats"]}):
        t = an["teachers"].get(task)
        classes = list(next(e for e in an["stats"] if e["task"] == task)["dice"])
        header = ["arch", "setting", "α/β1/β2, T", "seeds", *[f"Dice {c}" for c in classes], f"rel. impr. {lesion}",
                  f"gap closed {lesion}", f"Δ{lesion} vs none, 95% CI", "seg", "pmd", "imd", "rad"]
        body = []
        if t:
            body.append([f"{t['arch']} (teacher)", "-", "-", "1", *[C.fmt(t["dice"].get(c)) for c in classes],
                         "-", "-", "-", C.fmt(t["loss_final"].get("seg"), 4), "-", "-", "-"])
        for e in (e for e in an["stats"] if e["task"] == task):
            body.append([e["arch"], e["setting"], e["weights"], e["n_seeds"], *[_pm(e["dice"][c]) for c in classes],
                         C.fmt(e["rel_improvement"].get(lesion), pct=True) if e["setting"] != "none" else "-",
                         C.fmt(e["gap_closed"].get(lesion), pct=True) if e["setting"] != "none" else "-",
                         _ci(e["ci_vs_none"].get(lesion)),
                         *[C.fmt(e["loss_final"][k], 4) for k in ("seg", "pmd", "imd", "rad")]])
        lines += [f"## {task}", "", C.markdown_table(header, body), ""]
        for e in an["stats"]:
            if e["task"] == task and e.get("teacher_gap"):
                lines.append(f"- teacher − {e['arch']} alone, {lesion} Dice: {C.fmt(e['teacher_gap'].get(lesion))} "
                             f"(95% case-bootstrap CI {_ci(e['teacher_gap_ci'].get(lesion))})")
        if t and t.get("teacher_training"):
            tt = t["teacher_training"]
            lines.append(f"- teacher stopped at step {tt['steps']} of {tt['cap_steps']} ({tt['stopped']}); "
                         f"validation score per chunk: " + ", ".join(f"{h['score']:.3f}" for h in tt["history"]))
        lines.append("")
    s = an["seed_spread"]
    lines += ["## Seed-to-seed spread", ""]
    if s is None:
        lines.append("Not measurable: every setting ran with one seed.")
    else:
        verdict = "above" if an["detectable_0.02"] else "NOT above"
        lines.append(f"Pooled within-setting SD of per-case-mean {lesion} Dice over seeds: {s:.4f} "
                     f"({an['seed_spread_dof']} degrees of freedom). The difference of two {an['n_seeds']}-seed means "
                     f"has SD {an['se_diff']:.4f}, so a 0.02 difference is {verdict} the seed spread "
                     f"(criterion: 0.02 > 2 × {an['se_diff']:.4f}).")
    lines += ["", "Dice: per-case mean over the validation volumes (cases without the class in the reference "
              "left out, LiTS convention), mean ± SD over seeds. Relative improvement and gap closed use the "
              "seed means: (student+KD − student alone) / student alone, and / (teacher − student alone). "
              "Loss columns: final logged value of each unweighted term, mean over seeds.", ""]
    return "\n".join(lines)


def chart(an: dict, lesion: str = "tumour"):
    def draw(fig):
        entries = sorted(an["stats"], key=lambda e: (e["task"], e["arch"]))
        groups = sorted({(e["task"], e["arch"]) for e in entries})
        settings = list(dict.fromkeys(e["setting"] for e in entries))
        ax = fig.subplots()
        width = 0.8 / max(1, len(settings))
        for j, s in enumerate(settings):
            xs, ys, es = [], [], []
            for i, g in enumerate(groups):
                e = next((e for e in entries if (e["task"], e["arch"]) == g and e["setting"] == s), None)
                if e and e["dice"].get(lesion, {}).get("mean") is not None:
                    xs.append(i + (j - (len(settings) - 1) / 2) * width)
                    ys.append(e["dice"][lesion]["mean"])
                    es.append(e["dice"][lesion]["std"] or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=str(s))
        for i, g in enumerate(groups):
            t = an["teachers"].get(g[0])
            if t and t["dice"].get(lesion) is not None:
                ax.hlines(t["dice"][lesion], i - 0.45, i + 0.45, colors="k", linestyles="--",
                          label="teacher" if i == 0 else None)
        ax.set_xticks(range(len(groups)), [f"{t}\n{a}" for t, a in groups])
        ax.set_ylabel(f"{lesion} Dice (per-case mean; bars: SD over seeds)")
        ax.set_title("Students alone and distilled against the teacher (dashed)")
        ax.legend(fontsize=8, ncols=2)
    return draw


# ----------------------------------------------------------------------------- the command

def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="cpu", show_default=True,
              help="smoke: seconds, for tests; cpu: 96x96 phantoms, UNet teacher, < 2 h on 2 cores; paper: 384x384, GPU.")
@click.option("--tasks", help="Comma-separated subset of the preset's tasks (liver, kidney).")
@click.option("--students", help="Comma-separated students instead of the preset's (e.g. enet,mobilenetv2; "
                                 "with --sweep, instead of the sweep's enet,espnet,tinynet).")
@click.option("--with-resnet18", is_flag=True, help="Also run ResNet-18 as a student.")
@click.option("--with-espnet", is_flag=True, help="Also run ESPNet as a student.")
@click.option("--seeds", help="Comma-separated seeds instead of the preset's.")
@click.option("--teacher", "teacher_arch", help="Teacher network instead of the preset's (raunet for paper, unet for cpu).")
@click.option("--teacher-epochs-cap", type=click.IntRange(min=1),
              help="Most teacher epochs (default: preset); the teacher stops earlier when validation Dice plateaus.")
@click.option("--sweep", is_flag=True, help="Run the capacity x KD-weight x temperature grid (first task) "
                                            "into kd_ablation-<preset>-sweep.* instead of the ablation.")
@click.option("--settings", "setting_names", help="With --sweep: comma-separated subset of the sweep's settings "
                                                  "(names as in benchmarks/README.md, e.g. none,paper,imd0.1).")
@click.option("--device", default=None, help="auto, cpu, cuda (default: cuda for the paper preset, else cpu).")
@click.option("--work", type=click.Path(path_type=Path), help="Data, checkpoints, logs "
              "(default: work/benchmarks/kd_ablation-<preset>); reused on the next run.")
@click.option("--results", type=click.Path(path_type=Path), default=C.RESULTS_DIR, show_default=True,
              help="Where the JSON, Markdown and PNG go.")
@click.option("--verbose", "-v", is_flag=True, help="Show the trainer's own progress bars.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def main(preset, tasks, students, with_resnet18, with_espnet, seeds, teacher_arch, teacher_epochs_cap, sweep, setting_names, device, work, results, verbose, quiet):
    """Train and evaluate teacher, students alone and distilled students on phantoms; write
    benchmarks/results/kd_ablation-<preset>.{json,md,png} (with --sweep: kd_ablation-<preset>-sweep.*)."""
    from tqdm import tqdm

    from regionkd.sdk.errors import InputError

    p = PRESETS[preset]
    if tasks:
        p = replace(p, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()))
    if students:
        chosen = tuple(s.strip() for s in students.split(",") if s.strip())
        p = replace(p, **{"sweep_students" if sweep else "students": chosen})
    p = replace(p, students=p.students + (("resnet18",) if with_resnet18 else ()) + (("espnet",) if with_espnet else ()))
    if seeds:
        p = replace(p, seeds=tuple(int(s) for s in seeds.split(",")), sweep_seeds=None)
    if teacher_epochs_cap:
        p = replace(p, teacher_epochs_cap=teacher_epochs_cap)
    if teacher_arch:
        from regionkd.train.models.registry import list_models

        if teacher_arch not in list_models():
            raise InputError(f"--teacher {teacher_arch}: unknown network; known: {', '.join(list_models())}")
        p = replace(p, teacher=teacher_arch)
    if setting_names:
        if not sweep:
            raise InputError("--settings selects sweep settings; add --sweep")
        names = [n.strip() for n in setting_names.split(",") if n.strip()]
        known = {s_["name"]: s_ for s_ in SWEEP_SETTINGS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"--settings {', '.join(unknown)}: unknown; known: {', '.join(known)}")
        p = replace(p, sweep_settings=tuple(known[n] for n in names))
    device = device or ("cuda" if p.needs_gpu else "cpu")
    if device.startswith("cuda") and not _cuda_available():
        click.echo(f"kd_ablation --preset {preset}: training at this size needs a CUDA GPU and there is none here; "
                   f"skipping (pass --device cpu to force it, or use --preset cpu).", err=True)
        return 0
    work = Path(work or C.WORK_DIR / f"kd_ablation-{preset}")
    machine = C.machine_description(threads=_torch_threads())
    command = C.command_line("benchmarks/kd_ablation.py", click.get_current_context())
    t0 = time.perf_counter()
    task_list = p.tasks[:1] if sweep else p.tasks
    plan = []
    for task in task_list:
        if sweep:
            settings = p.sweep_settings or SWEEP_SETTINGS
            plan += [(task, arch, s, seed) for arch in p.sweep_students for s in settings
                     for seed in (p.sweep_seeds or p.seeds)]
        else:
            plan += [(task, arch, {"name": kd, "kd": kd}, seed) for arch in p.students for kd in KD_SETTINGS
                     for seed in p.seeds]
    rows = []
    bar = tqdm(total=len(plan) + 2 * len(task_list), desc=f"kd_ablation {preset}", unit="run", disable=quiet)
    for task in task_list:
        runner = Runner(p, task, work, device, verbose)
        bar.set_postfix_str(f"{task}: phantoms")
        runner.prepare()
        bar.update(1)
        bar.set_postfix_str(f"{task}: teacher {p.teacher}")
        t_ckpt, t_status = runner.teacher()
        rows.append(runner.row(t_ckpt, p.teacher, "teacher", "none", 0, teacher_training=t_status))
        bar.update(1)
        for tk, arch, s, seed in plan:
            if tk != task:
                continue
            bar.set_postfix_str(f"{task}: {arch} {s['name']} seed {seed}")
            weights = {k: s[k] for k in ("alpha", "beta1", "beta2", "temperature") if k in s} or None
            # the sweep's "none" and "paper" settings are the ablation's none and pmd+imd+rad runs: shared files
            same_as_ablation = s["name"] == "none" or (s["kd"] == "pmd+imd+rad" and weights == PAPER_WEIGHTS)
            ckpt = runner.student(arch, seed, t_ckpt, s["kd"], name=None if same_as_ablation else s["name"],
                                  weights=weights)
            extra = {"setting": s["name"]} if sweep else {}
            rows.append(runner.row(ckpt, arch, "student", s["kd"], seed, **extra))
            bar.update(1)
    bar.close()
    if not rows:
        raise InputError("nothing was run")
    an = analyse(rows, setting_key="setting" if sweep else "kd")
    stem = f"kd_ablation-{preset}" + ("-sweep" if sweep else "")
    extra_lines = [f"Protocol ({preset}): {p.cases} phantom cases per task of {'x'.join(map(str, p.shape))} voxels "
                   f"(seed {p.data_seed}, {int(round(p.val_fraction * 100))}% of cases for validation), "
                   f"{p.input_size}x{p.input_size} slices, batch {p.batch_size}, student "
                   f"{p.student_epochs * max(1, p.samples_per_epoch // p.batch_size)} steps, teacher "
                   f"{p.teacher} up to {p.teacher_epochs_cap * max(1, p.samples_per_epoch // p.batch_size)} steps "
                   f"(stops on a validation plateau), seeds {', '.join(map(str, p.seeds))}. "
                   f"Training time summed over the runs (from their logs): "
                   f"{sum(r.get('train_seconds') or 0 for r in rows) / 60:.1f} min, of which teachers "
                   f"{sum(r.get('train_seconds') or 0 for r in rows if r['role'] == 'teacher') / 60:.1f} min; "
                   f"this invocation's wall time {time.perf_counter() - t0:.0f} s (runs found on disk are read "
                   f"back, not repeated).", ""]
    if sweep:
        extra_lines += _sweep_verdict(an) + [""]
    md = markdown_report(f"Distillation {'sweep' if sweep else 'ablation'} on phantoms ({preset})", an, command,
                         machine, extra_lines)
    paths = C.write_results(stem, rows, md, chart(an), results)
    if not quiet:
        click.echo(md)
        click.echo("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


def _sweep_verdict(an: dict, lesion: str = "tumour") -> list:
    """Which KD setting gave the best mean lesion Dice per student, against its baseline."""
    lines = []
    for (task, arch), es in group(an["stats"], "task", "arch").items():
        kd = [e for e in es if e["setting"] != "none" and e["dice"].get(lesion, {}).get("mean") is not None]
        base = next((e for e in es if e["setting"] == "none"), None)
        if not kd or base is None:
            continue
        best = max(kd, key=lambda e: e["dice"][lesion]["mean"])
        delta = best["dice"][lesion]["mean"] - (base["dice"][lesion]["mean"] or 0.0)
        lines.append(f"- {task} {arch}: best setting `{best['setting']}` ({lesion} Dice {_pm(best['dice'][lesion])}, "
                     f"{delta:+.3f} vs alone, 95% CI {_ci(best['ci_vs_none'].get(lesion))}).")
    return lines


def _torch_threads():
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    from regionkd.sdk.cli_common import run_cli

    run_cli(main)

"""Distillation ablation on phantoms: when does a distilled student beat the same student alone?

Per task (liver, kidney), three phantom sets made with their own seeds: the labelled dataset
(training split + a validation split for the learning curves), a held-out test set of at least
100 cases that only scores, and a folder of unlabelled CT images (no label files at all). A
teacher is trained once per task; every student run (task, student, arm, seed) is trained from
scratch with the cosine schedule spanning its whole run, scored per case on the test set, and
compared with its arm's baseline by a paired per-case bootstrap of the seed-mean Dice.

The arms are the lines of inquiry, in order:
- `paper`: the paper's loss (PMD+IMD+RAD at 0.1/0.9/0.9, T=4) and each term alone, against the
  student alone on all labels;
- `unlabelled`: the student given only L labelled cases (3, 10, all) plus the unlabelled images,
  on which only the distillation terms apply, against the same student on the L cases alone;
- `weighted`: PMD balanced over the teacher's classes instead of over pixels, and lower
  temperatures;
- `stride`: a student whose decoder reaches stride 2 (`mobilenetv2-s2`).

All distillation runs share one teacher cache per task (`regionkd-train distill --teacher-cache`):
the teacher's outputs per slice and orientation, computed once.

Runs are resumable: a run whose checkpoint is finished and whose test scores exist is read back;
an interrupted run continues from its last checkpoint. Arms and seeds can be narrowed
(`--arms`, `--seeds`, `--students`, `--tasks`), so several processes can share the work; a last
call without narrowing collects everything into the results.

    python benchmarks/kd_ablation.py --preset smoke          # seconds, for tests
    python benchmarks/kd_ablation.py --preset cpu            # hours on 2 cores; see benchmarks/README.md
    python benchmarks/kd_ablation.py --preset paper          # full size, needs a CUDA GPU
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from regionkd.train.config import PAPER_KD, PRESETS as TRAIN_PRESETS  # noqa: E402  (light: no torch)

LINES = ("paper", "unlabelled", "weighted", "stride")


@dataclass(frozen=True)
class Arm:
    """One training setting. `labelled`: labelled cases (None: the whole training split);
    `unlabelled`: add the unlabelled images; `baseline`: the arm (same network) it is compared with."""

    name: str
    line: str
    kd: str = "none"                  # "none" or terms joined by "+"
    alpha: float = PAPER_KD["alpha"]  # weights and balance: the paper's unless an arm says otherwise
    beta1: float = PAPER_KD["beta1"]
    beta2: float = PAPER_KD["beta2"]
    temperature: float = PAPER_KD["temperature"]
    pmd_balance: str = PAPER_KD["pmd_balance"]
    labelled: int | None = None
    unlabelled: bool = False
    augment_unlabelled: bool = True
    kd_on: str = "all"                # or "unlabelled": the distillation terms on the unlabelled slices only
    baseline: str | None = "alone"

    @property
    def weights(self) -> str:
        if self.kd == "none":
            return "-"
        parts = {"pmd": f"α={self.alpha:g}", "imd": f"β1={self.beta1:g}", "rad": f"β2={self.beta2:g}",
                 "pl": "teacher's labels"}
        w = ", ".join(parts[t] for t in self.kd.split("+"))
        if "pmd" in self.kd:
            w += f", T={self.temperature:g}" + (", per class" if self.pmd_balance == "classes" else "")
        return w

    @property
    def data(self) -> str:
        lab = "all" if self.labelled is None else str(self.labelled)
        return f"{lab} labelled" + (" + unlabelled" + ("" if self.augment_unlabelled else " (no aug.)")
                                    + (" (KD on them only)" if self.kd_on == "unlabelled" else "")
                                    if self.unlabelled else "")


def _ul(name, labelled, baseline, **kw):
    return Arm(name, "unlabelled", kd=kw.pop("kd", "pmd"), alpha=kw.pop("alpha", 1.0),
               temperature=kw.pop("temperature", 1.0), labelled=labelled, unlabelled=True, baseline=baseline, **kw)


ARMS = {a.name: a for a in (
    Arm("alone", "paper", baseline=None),
    Arm("paper", "paper", kd="pmd+imd+rad"),
    Arm("pmd", "paper", kd="pmd"),
    Arm("imd", "paper", kd="imd"),
    Arm("rad", "paper", kd="rad"),
    Arm("alone-L3", "unlabelled", labelled=3, baseline=None),
    Arm("alone-L10", "unlabelled", labelled=10, baseline=None),
    _ul("ul-L3", 3, "alone-L3"),
    _ul("ul-L10", 10, "alone-L10"),
    _ul("ul-all", None, "alone"),
    _ul("ul-L3-T2", 3, "alone-L3", temperature=2.0),
    _ul("ul-L3-T4", 3, "alone-L3", temperature=4.0),
    _ul("ul-L3-a0.3", 3, "alone-L3", alpha=0.3),
    _ul("ul-L3-noaug", 3, "alone-L3", augment_unlabelled=False),
    _ul("ul-L3-paper", 3, "alone-L3", kd="pmd+imd+rad", alpha=1.0, beta1=0.9, beta2=0.9),
    _ul("ul-all-classes", None, "alone", pmd_balance="classes"),
    _ul("ul-all-uonly", None, "alone", kd_on="unlabelled"),
    _ul("ul-all-pl", None, "alone", kd="pl", kd_on="unlabelled"),
    _ul("ul-L3-pl", 3, "alone-L3", kd="pl", kd_on="unlabelled"),
    _ul("ul-all-pmd-pl", None, "alone", kd="pmd+pl"),
    _ul("ul-L3-uonly", 3, "alone-L3", kd_on="unlabelled"),
    Arm("pmd-T1", "weighted", kd="pmd", alpha=1.0, temperature=1.0),
    Arm("pmd-T2", "weighted", kd="pmd", alpha=1.0, temperature=2.0),
    Arm("pmd-classes", "weighted", kd="pmd", alpha=1.0, temperature=1.0, pmd_balance="classes"),
)}


@dataclass(frozen=True)
class Preset:
    """One protocol at one size. Steps per epoch = samples_per_epoch / batch_size."""

    tasks: tuple
    cases: int                        # labelled phantoms (training + validation split)
    test_cases: int                   # held-out phantoms that only score
    unlabelled_cases: int             # phantoms written as images without labels
    shape: tuple                      # phantom X, Y, Z
    input_size: int
    batch_size: int
    samples_per_epoch: int
    student_steps: int
    teacher_steps: int
    plan: tuple                       # (network, arm name, seeds) of each task
    teacher: str = "unet"
    val_fraction: float = 0.25
    lr: float | None = None           # None: the trainer preset's
    trainer_preset: str = "demo"
    needs_gpu: bool = False
    data_seed: int = 2021
    test_seed: int = 2022
    unlabelled_seed: int = 2023
    min_lesion_mm: float = 0.0
    lesion_contrast: float = 1.0
    unlabelled_batch: int | None = None
    eval_metrics: tuple = ("dice",)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else TRAIN_PRESETS[self.trainer_preset]["lr"]


def _plan(*groups):
    """(network, arm, seeds) triples from (networks, arms, seeds) groups."""
    return tuple((net, arm, tuple(seeds)) for nets, arms, seeds in groups for net in nets for arm in arms)


S3 = (0, 1, 2)
PRESETS = {
    # seconds: a handful of steps on 64x64x8 phantoms, for the tests
    "smoke": Preset(tasks=("liver",), cases=4, test_cases=2, unlabelled_cases=2, shape=(64, 64, 8), input_size=64,
                    batch_size=2, samples_per_epoch=4, student_steps=2, teacher_steps=4, teacher="tinynet",
                    plan=_plan((("tinynet",), ("alone", "paper", "pmd"), (0, 1)),
                               (("tinynet",), ("alone-L3", "ul-L3"), (0,))),
                    data_seed=0, test_seed=1, unlabelled_seed=2, eval_metrics=("dice", "hd95")),
    # a 2-core CPU: 96x96 phantoms at their own size (about 4 mm pixels), tumours of at least 20 mm, liver
    # lesion contrast doubled, a UNet teacher (RAUNet from scratch learns no tumour within this budget).
    "cpu": Preset(tasks=("liver", "kidney"), cases=40, test_cases=100, unlabelled_cases=80, shape=(96, 96, 32),
                  input_size=96, batch_size=8, samples_per_epoch=400, student_steps=1000, teacher_steps=1500,
                  min_lesion_mm=20.0, lesion_contrast=2.0,
                  # the runs made on 2026-12-01, in the order they were made (every arm at seed 0 first: a paired
                  # comparison on 100 test cases resolves about 0.02 with one seed a side; more seeds where an arm
                  # gained). Arms not listed (ARMS) run with --arms; see benchmarks/README.md for what to try next.
                  plan=_plan((("mobilenetv2",), ("alone",), S3),
                             (("mobilenetv2",), ("ul-all", "paper", "pmd-classes"), (0,)),
                             (("mobilenetv2",), ("ul-all-classes",), S3),
                             (("mobilenetv2-s2",), ("alone", "ul-all-classes"), (0,)),
                             (("mobilenetv2",), ("alone-L3", "ul-L3-uonly", "ul-L3"), (0, 1)))),
    # the paper's sizes (384x384 slices, batch 16), for a GPU
    "paper": Preset(tasks=("liver", "kidney"), cases=60, test_cases=100, unlabelled_cases=200, shape=(512, 512, 64),
                    input_size=384, batch_size=16, samples_per_epoch=1600, student_steps=3000, teacher_steps=6000,
                    teacher="raunet", val_fraction=0.2, lr=1e-3, trainer_preset="paper", needs_gpu=True,
                    plan=_plan((("enet", "mobilenetv2"), tuple(ARMS), S3))),
}


# ----------------------------------------------------------------------------- one task's runs

def read_log(ckpt_path: Path) -> dict:
    """From a run's log: the last value of each loss term, training seconds (summed over the calls
    of a resumed run), the median step time, the learning curve and the teacher cache's summary."""
    from regionkd.train.checkpoint import log_path_for

    last, seconds, steps_s, curve, cache = {}, 0.0, [], [], None
    log = log_path_for(ckpt_path)
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "step":
                last = rec.get("loss", {})
            elif rec.get("event") == "epoch":
                curve.append({"step": rec["step"], "val_dice": rec["val_dice"]})
            elif rec.get("event") == "end":
                seconds += float(rec.get("seconds") or 0.0)
                if rec.get("step_s_median") is not None:
                    steps_s.append(rec["step_s_median"])
                cache = rec.get("teacher_cache", cache)
    return {"loss_final": {k: last.get(k) for k in ("seg", "pmd", "imd", "rad", "pl", "total")},
            "train_seconds": round(seconds, 1), "step_s_median": steps_s[-1] if steps_s else None,
            "learning_curve": curve, "teacher_cache": cache}


class Runner:
    """Trains and scores the runs of one task; every file lives under `work/<task>/`."""

    def __init__(self, preset: Preset, task: str, work: Path, device: str, verbose: bool):
        self.p, self.task, self.device, self.verbose = preset, task, device, verbose
        self.dir = work / task
        self.data, self.test, self.unlabelled = self.dir / "data", self.dir / "test", self.dir / "unlabelled"
        self.cache = self.dir / f"slice-cache-{preset.input_size}"
        self.teacher_cache = self.dir / "teacher-cache"

    def prepare(self) -> None:
        p = self.p
        common = dict(min_lesion_mm=p.min_lesion_mm, lesion_contrast=p.lesion_contrast)
        C.make_phantom_dataset(self.data, self.task, p.cases, p.shape, p.data_seed, **common)
        C.make_phantom_dataset(self.test, self.task, p.test_cases, p.shape, p.test_seed, **common)
        C.make_phantom_dataset(self.unlabelled, self.task, p.unlabelled_cases, p.shape, p.unlabelled_seed,
                               images_only=True, **common)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.p.samples_per_epoch // self.p.batch_size)

    def config(self, mode: str, arch: str, out: Path, seed: int, steps: int, **extra):
        from regionkd.train.config import make_config

        p = self.p
        return make_config(mode, arch, self.data, out, preset=p.trainer_preset,
                           epochs=math.ceil(steps / self.steps_per_epoch), max_steps=steps, batch_size=p.batch_size,
                           input_size=p.input_size, lr=p.learning_rate, samples_per_epoch=p.samples_per_epoch,
                           val_max_slices=None, val_fraction=p.val_fraction, seed=seed, device=self.device,
                           resume=True, cache_dir=str(self.cache), quiet=not self.verbose, log_every=10, **extra)

    @staticmethod
    def finished(ckpt: Path) -> bool:
        from regionkd.train.checkpoint import load_checkpoint

        return ckpt.is_file() and bool(load_checkpoint(ckpt).get("train_state", {}).get("finished"))

    def _train(self, cfg) -> None:
        from regionkd.train.trainer import train

        if not self.finished(Path(cfg.out)):
            train(cfg)

    def teacher_ckpt(self) -> Path:
        return self.dir / f"teacher-{self.p.teacher}.pt"

    def student_ckpt(self, arch: str, arm: Arm, seed: int, out_dir: Path | None = None) -> Path:
        return (out_dir or self.dir) / f"{arch}-{arm.name}-s{seed}.pt"

    def teacher(self) -> Path:
        ckpt = self.teacher_ckpt()
        self._train(self.config("teacher", self.p.teacher, ckpt, seed=0, steps=self.p.teacher_steps))
        return ckpt

    def student(self, arch: str, arm: Arm, seed: int, teacher: Path, out_dir: Path | None = None) -> Path:
        """Train (or find finished) one run; `out_dir`: where its checkpoint and log go (default: the task's)."""
        ckpt = self.student_ckpt(arch, arm, seed, out_dir)
        extra = {"labelled_cases": arm.labelled}
        if arm.kd == "none":
            cfg = self.config("student", arch, ckpt, seed, self.p.student_steps, **extra)
        else:
            cfg = self.config("distill", arch, ckpt, seed, self.p.student_steps, teacher=str(teacher),
                              kd=arm.kd.replace("+", ","), alpha=arm.alpha, beta1=arm.beta1, beta2=arm.beta2,
                              temperature=arm.temperature, pmd_balance=arm.pmd_balance,
                              unlabelled=str(self.unlabelled) if arm.unlabelled else None,
                              unlabelled_batch=self.p.unlabelled_batch, augment_unlabelled=arm.augment_unlabelled,
                              kd_on=arm.kd_on,
                              teacher_cache=str(self.teacher_cache), **extra)
        self._train(cfg)
        return ckpt

    def score(self, ckpt: Path) -> dict:
        """Per-case metrics of a checkpoint on the test set, cached as <stem>.test.json."""
        from regionkd.sdk.atomic import atomic_write_text
        from regionkd.train.data import open_dataset
        from regionkd.train.evaluate import evaluate_checkpoint

        path = ckpt.with_name(ckpt.stem + ".test.json")
        if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime:
            return json.loads(path.read_text())
        dev = "cuda" if self.device.startswith("cuda") else "cpu"
        cases = list(open_dataset(self.test).case_ids)
        result = evaluate_checkpoint(ckpt, self.test, case_ids=cases, device=dev, batch_size=32,
                                     metrics=self.p.eval_metrics)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        return result

    def row(self, ckpt: Path, arch: str, role: str, arm: Arm | None, seed: int) -> dict:
        ev = self.score(ckpt)
        log = read_log(ckpt)
        row = {"task": self.task, "arch": arch, "role": role, "arm": arm.name if arm else "teacher",
               "line": arm.line if arm else None, "seed": seed,
               "dice": {c: ev["mean"][c]["dice"] for c in ev["class_names"][1:]},
               # a case whose reference lacks the class is None for it, as in the means (LiTS convention)
               "dice_per_case": {cid: {c: None if cid in ev.get("excluded", {}).get(c, ()) else v["dice"]
                                       for c, v in per.items()} for cid, per in ev["cases"].items()},
               "test_cases": len(ev["cases"]), "checkpoint": str(ckpt.relative_to(self.dir.parent)), **log}
        if arm is not None:
            row["setting"] = {k: v for k, v in asdict(arm).items() if k not in ("name", "line")}
        return row


# ----------------------------------------------------------------------------- analysis

def case_means(rows, cls: str) -> dict:
    """Per-case Dice of one class averaged over the rows' seeds (cases with a None left out)."""
    acc: dict = {}
    for r in rows:
        for cid, per in r["dice_per_case"].items():
            if per.get(cls) is not None:
                acc.setdefault(cid, []).append(per[cls])
    return {cid: sum(v) / len(v) for cid, v in acc.items()}


def paired_difference(a_rows, b_rows, cls: str) -> dict:
    """Mean over cases of (seed-mean Dice of a) - (seed-mean Dice of b), with its case-bootstrap
    95% interval."""
    a, b = case_means(a_rows, cls), case_means(b_rows, cls)
    diffs = [a[c] - b[c] for c in sorted(set(a) & set(b))]
    mean = sum(diffs) / len(diffs) if diffs else None
    lo, hi = C.bootstrap_ci(diffs)
    return {"mean": mean, "ci": [lo, hi], "cases": len(diffs)}


def analyse(rows: list, lesion: str = "tumour") -> dict:
    """Per (task, network, arm): Dice mean ± SD over seeds; against the arm's baseline: the paired
    difference, its interval and the share of the teacher-student gap it closes; the pooled seed
    spread; the teacher's lead over each network alone."""
    from collections import defaultdict

    teachers = {r["task"]: r for r in rows if r["role"] == "teacher"}
    groups = defaultdict(list)
    for r in rows:
        if r["role"] == "student":
            groups[(r["task"], r["arch"], r["arm"])].append(r)
    stats = []
    for (task, arch, arm_name), rs in groups.items():
        arm = ARMS.get(arm_name)
        e = {"task": task, "arch": arch, "arm": arm_name, "line": rs[0].get("line"), "n_seeds": len(rs),
             "seeds": sorted(r["seed"] for r in rs), "rows": rs, "dice": {},
             "weights": arm.weights if arm else "-", "data": arm.data if arm else "-",
             "baseline": arm.baseline if arm else None,
             "loss_final": {k: C.mean_std(r["loss_final"].get(k) for r in rs)[0] for k in ("seg", "pmd", "imd", "rad", "pl")},
             "step_s": C.mean_std(r.get("step_s_median") for r in rs)[0],
             "train_seconds": sum(r.get("train_seconds") or 0 for r in rs)}
        for c in rs[0]["dice"]:
            m, s, _ = C.mean_std(r["dice"][c] for r in rs)
            e["dice"][c] = {"mean": m, "std": s}
        stats.append(e)
    by_key = {(e["task"], e["arch"], e["arm"]): e for e in stats}
    for e in stats:
        teacher = teachers.get(e["task"])
        base = by_key.get((e["task"], e["arch"], e["baseline"])) if e["baseline"] else None
        alone = by_key.get((e["task"], e["arch"], "alone"))
        e["vs_baseline"], e["gap_closed"], e["vs_alone"] = {}, {}, {}
        for c in e["dice"]:
            if base:
                d = paired_difference(e["rows"], base["rows"], c)
                e["vs_baseline"][c] = d
                if teacher:
                    gap = paired_difference([teacher], base["rows"], c)["mean"]
                    e["gap_closed"][c] = d["mean"] / gap if gap and gap > 0 and d["mean"] is not None else None
            if alone and e["arm"] != "alone" and e["baseline"] != "alone":
                e["vs_alone"][c] = paired_difference(e["rows"], alone["rows"], c)
        if teacher and e["baseline"] is None:
            e["teacher_lead"] = {c: paired_difference([teacher], e["rows"], c) for c in e["dice"]}
        # the stride line: a network carried on to stride 2 against its stride-4 self, same arm
        stride4 = by_key.get((e["task"], e["arch"][:-3], e["arm"])) if e["arch"].endswith("-s2") else None
        e["vs_stride4"] = {c: paired_difference(e["rows"], stride4["rows"], c) for c in e["dice"]} if stride4 else {}
    spread, dof = C.pooled_std([r["dice"].get(lesion) for r in e["rows"]] for e in stats)
    winners = [e for e in stats if (e["vs_baseline"].get(lesion) or {}).get("mean") is not None
               and e["vs_baseline"][lesion]["mean"] >= 0.02 and (e["vs_baseline"][lesion]["ci"][0] or -1) > 0]
    return {"stats": stats, "teachers": teachers, "seed_spread": spread, "seed_spread_dof": dof,
            "winners": [(e["task"], e["arch"], e["arm"]) for e in winners]}


def _pm(d):
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:.3f}" + (f" ± {d['std']:.3f}" if d["std"] is not None else "")


def _diff(d):
    if not d or d.get("mean") is None:
        return "-"
    lo, hi = d["ci"]
    return f"{d['mean']:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else "")


def markdown_report(title: str, an: dict, command: str, machine: dict, extra_lines=(), lesion: str = "tumour") -> str:
    lines = [f"# {title}", "", C.machine_line(machine), "", f"Command: `{command}`", ""]
    lines += list(extra_lines)
    for task in sorted({e["task"] for e in an["stats"]}):
        t = an["teachers"].get(task)
        entries = [e for e in an["stats"] if e["task"] == task]
        classes = list(entries[0]["dice"])
        organ = classes[0]
        header = ["network", "arm", "data", "KD (weights)", "seeds", *[f"Dice {c}" for c in classes],
                  f"Δ{lesion} vs baseline [95% CI]", f"gap closed", f"Δ{organ} vs baseline", "vs baseline",
                  "s/step", "seg", "pmd", "imd", "rad", "pl"]
        body = []
        if t:
            body.append([f"{t['arch']} (teacher)", "-", "all labelled", "-", "1", *[C.fmt(t["dice"].get(c)) for c in classes],
                         "-", "-", "-", "-", C.fmt(t.get("step_s_median"), 3), C.fmt(t["loss_final"].get("seg"), 4),
                         "-", "-", "-", "-"])
        order = {name: i for i, name in enumerate(ARMS)}
        for e in sorted(entries, key=lambda e: (e["arch"], LINES.index(e["line"]) if e["line"] in LINES else 9,
                                                order.get(e["arm"], 99))):
            body.append([e["arch"], e["arm"], e["data"], e["weights"], e["n_seeds"], *[_pm(e["dice"][c]) for c in classes],
                         _diff(e["vs_baseline"].get(lesion)), C.fmt(e["gap_closed"].get(lesion), pct=True),
                         _diff(e["vs_baseline"].get(organ)), e["baseline"] or "-", C.fmt(e["step_s"], 3),
                         *[C.fmt(e["loss_final"][k], 4) for k in ("seg", "pmd", "imd", "rad", "pl")]])
        lines += [f"## {task}", "", C.markdown_table(header, body, align="lllll" + "r" * (len(header) - 5)), ""]
        for e in entries:
            if e.get("teacher_lead"):
                lines.append(f"- teacher − {e['arch']} `{e['arm']}`, {lesion} Dice: {_diff(e['teacher_lead'].get(lesion))}")
            if e["vs_alone"].get(lesion):
                lines.append(f"- {e['arch']} `{e['arm']}` − {e['arch']} `alone` (all labels): "
                             f"{lesion} {_diff(e['vs_alone'][lesion])}, {organ} {_diff(e['vs_alone'].get(organ))}")
            if e.get("vs_stride4", {}).get(lesion):
                lines.append(f"- {e['arch']} `{e['arm']}` − {e['arch'][:-3]} `{e['arm']}` (stride 2 against 4): "
                             f"{lesion} {_diff(e['vs_stride4'][lesion])}, {organ} {_diff(e['vs_stride4'].get(organ))}")
        lines.append("")
    s = an["seed_spread"]
    lines += ["## Seed-to-seed spread", ""]
    lines.append("Not measurable: every arm ran with one seed." if s is None else
                 f"Pooled within-arm SD of the per-case-mean {lesion} Dice over seeds: {s:.4f} "
                 f"({an['seed_spread_dof']} degrees of freedom).")
    lines += ["", "## Verdict", ""]
    if an["winners"]:
        lines += [f"- {task} {arch} `{arm}` beats its baseline by at least 0.02 {lesion} Dice with an interval clear "
                  f"of zero." for task, arch, arm in an["winners"]]
    else:
        lines.append(f"No arm beats its baseline by 0.02 {lesion} Dice or more with an interval clear of zero.")
    lines += ["", f"Dice: per-case mean over the test volumes (cases without the class in the reference left out, "
              "LiTS convention), mean ± SD over seeds. Δ: mean over test cases of the seed-mean Dice difference "
              "to the baseline arm (same network), with a 95% case-bootstrap interval. Gap closed: Δ / (teacher − "
              "baseline). s/step: median training step. Loss columns: final logged value of each unweighted term.", ""]
    return "\n".join(lines)


def chart(an: dict, lesion: str = "tumour"):
    """Per task: learning curves (validation tumour Dice per epoch, mean over seeds) and the test Dice per arm."""
    import numpy as np

    def draw(fig):
        tasks = sorted({e["task"] for e in an["stats"]})
        axes = fig.subplots(len(tasks), 2, squeeze=False)
        for row, task in zip(axes, tasks):
            ax = row[0]
            t = an["teachers"].get(task)
            curves = ([(f"{t['arch']} teacher", [t])] if t else []) + \
                     [(f"{e['arch']} {e['arm']}", e["rows"]) for e in an["stats"] if e["task"] == task]
            for label, rows in curves:
                steps = [p["step"] for p in rows[0].get("learning_curve", [])]
                if not steps:
                    continue
                vals = np.array([[p["val_dice"].get(lesion) or 0.0 for p in r["learning_curve"]][:len(steps)]
                                 for r in rows if len(r.get("learning_curve", [])) >= len(steps)])
                if vals.size:
                    ax.plot(steps, vals.mean(0), label=label, lw=2.5 if "teacher" in label else 1.2,
                            color="k" if "teacher" in label else None)
            ax.set_title(f"{task}: validation {lesion} Dice while training")
            ax.set_xlabel("step")
            ax.legend(fontsize=6, ncols=2)
            ax = row[1]
            entries = sorted((e for e in an["stats"] if e["task"] == task), key=lambda e: (e["arch"], e["arm"]))
            ys = [e["dice"][lesion]["mean"] or 0.0 for e in entries]
            es = [e["dice"][lesion]["std"] or 0.0 for e in entries]
            ax.barh(range(len(entries)), ys, xerr=es, capsize=2, color=["C0" if e["baseline"] is None else "C1"
                                                                        for e in entries])
            ax.set_yticks(range(len(entries)), [f"{e['arch']} {e['arm']}" for e in entries], fontsize=6)
            if t and t["dice"].get(lesion) is not None:
                ax.axvline(t["dice"][lesion], color="k", ls="--", label="teacher")
                ax.legend(fontsize=7)
            ax.set_title(f"{task}: test {lesion} Dice (blue: baselines; ± SD over seeds)", fontsize=9)
    return draw


# ----------------------------------------------------------------------------- the command

def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _narrow(preset: Preset, tasks, students, arms, seeds) -> Preset:
    from regionkd.sdk.errors import InputError

    def split(v):
        return [s.strip() for s in v.split(",") if s.strip()]

    p = preset
    if tasks:
        p = replace(p, tasks=tuple(split(tasks)))
    plan = list(p.plan)
    if arms:
        names = split(arms)
        unknown = [n for n in names if n not in ARMS]
        if unknown:
            raise InputError(f"--arms {', '.join(unknown)}: unknown; known: {', '.join(ARMS)}")
        in_plan = [pl for pl in plan if pl[1] in names]
        plan = in_plan or [(net, n, tuple(sorted({s for pl in plan for s in pl[2]})))
                           for net in dict.fromkeys(pl[0] for pl in plan) for n in names]
    if students:
        from regionkd.train.models import list_models

        nets = split(students)
        unknown = [n for n in nets if n not in list_models()]
        if unknown:
            raise InputError(f"--students {', '.join(unknown)}: unknown network; known: {', '.join(list_models())}")
        plan = [pl for pl in plan if pl[0] in nets] or [(net, arm, sd) for net in nets
                                                          for arm, sd in dict.fromkeys((pl[1], pl[2]) for pl in plan)]
    if seeds:
        chosen = tuple(int(s) for s in split(seeds))
        plan = [(net, arm, chosen) for net, arm, _ in plan]
    return replace(p, plan=tuple(dict.fromkeys(plan)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="cpu", show_default=True,
              help="smoke: seconds, for tests; cpu: 96x96 phantoms, UNet teacher, hours on 2 cores; paper: 384x384, GPU.")
@click.option("--tasks", help="Comma-separated subset of the preset's tasks (liver, kidney).")
@click.option("--students", help="Comma-separated networks: only these of the plan (or the plan's arms for them).")
@click.option("--arms", help=f"Comma-separated arms: only these of the plan (known: {', '.join(ARMS)}).")
@click.option("--seeds", help="Comma-separated seeds instead of the plan's.")
@click.option("--train-only", is_flag=True, help="Train and score the runs, write no results files "
                                                  "(for several processes sharing the plan; a last call collects).")
@click.option("--report-only", is_flag=True, help="Train nothing: score and report the runs finished on disk, "
                                                    "and list the plan's runs not made yet.")
@click.option("--device", default=None, help="auto, cpu, cuda (default: cuda for the paper preset, else cpu).")
@click.option("--work", type=click.Path(path_type=Path), help="Data, checkpoints, logs, teacher cache "
              "(default: work/benchmarks/kd_ablation-<preset>); reused on the next run.")
@click.option("--results", type=click.Path(path_type=Path), default=C.RESULTS_DIR, show_default=True,
              help="Where the JSON, Markdown and PNG go.")
@click.option("--verbose", "-v", is_flag=True, help="Show the trainer's messages (each run's plan and length).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def main(preset, tasks, students, arms, seeds, train_only, report_only, device, work, results, verbose, quiet):
    """Train the teacher and every (network, arm, seed) of the plan on phantoms, score them on the
    held-out test phantoms, and write benchmarks/results/kd_ablation-<preset>.{json,md,png}."""
    p = _narrow(PRESETS[preset], tasks, students, arms, seeds)
    device = device or ("cuda" if p.needs_gpu else "cpu")
    if device.startswith("cuda") and not _cuda_available():
        click.echo(f"kd_ablation --preset {preset}: training at this size needs a CUDA GPU and there is none here; "
                   f"skipping (pass --device cpu to force it, or use --preset cpu).", err=True)
        return 0
    if train_only and report_only:
        raise click.UsageError("--train-only and --report-only exclude each other")
    work = Path(work or C.WORK_DIR / f"kd_ablation-{preset}")
    machine = C.machine_description(threads=_torch_threads())
    command = C.command_line("benchmarks/kd_ablation.py", click.get_current_context())
    t0 = time.perf_counter()
    runs = list(dict.fromkeys((net, ARMS[arm], seed) for net, arm, seeds_ in p.plan for seed in seeds_))
    rows, missing = run_plan(p, runs, work, device, verbose, quiet, report_only, desc=f"kd_ablation {preset}")
    if train_only:
        return 0
    if not rows:
        raise click.ClickException(f"{work}: no finished run to report")
    an = analyse(rows)
    md = markdown_report(f"Distillation ablation on phantoms ({preset})", an, command, machine,
                         protocol_lines(p, preset, rows, time.perf_counter() - t0, missing))
    paths = C.write_results(f"kd_ablation-{preset}", rows, md, chart(an), results)
    C.echo_results(md, paths, quiet)
    return 0


def run_plan(p: Preset, runs: list, work: Path, device: str, verbose: bool, quiet: bool, report_only: bool,
             desc: str) -> tuple[list, list]:
    """Per task: the phantoms, the teacher and every (network, arm, seed) run, trained unless
    `report_only`, and scored. Returns (rows, the runs of the plan not finished yet)."""
    from regionkd.sdk.console import progress_bar
    from regionkd.train.messages import show_messages

    rows, missing = [], []
    with show_messages(quiet=not verbose) as messages, \
            progress_bar(total=len(p.tasks) * (len(runs) + 2), desc=desc, unit="run", quiet=quiet) as bar:
        messages.bar = bar
        for task in p.tasks:
            runner = Runner(p, task, work, device, verbose)
            bar.set_postfix_str(f"{task}: phantoms")
            if not report_only:
                runner.prepare()
            bar.update(1)
            bar.set_postfix_str(f"{task}: teacher {p.teacher}")
            # a run trained here is finished when train() returns; only --report-only has to look
            t_ckpt = runner.teacher_ckpt() if report_only else runner.teacher()
            if report_only and not runner.finished(t_ckpt):
                missing.append(f"{task}: teacher {p.teacher}")
                bar.update(len(runs) + 1)
                continue
            rows.append(runner.row(t_ckpt, p.teacher, "teacher", None, 0))
            bar.update(1)
            for net, arm, seed in runs:
                bar.set_postfix_str(f"{task}: {net} {arm.name} seed {seed}")
                ckpt = runner.student_ckpt(net, arm, seed) if report_only else runner.student(net, arm, seed, t_ckpt)
                if not report_only or runner.finished(ckpt):
                    rows.append(runner.row(ckpt, net, "student", arm, seed))
                else:
                    missing.append(f"{task}: {net} {arm.name} seed {seed}")
                bar.update(1)
        messages.bar = None
    return rows, missing


def protocol_lines(p: Preset, preset: str, rows: list, wall_s: float, missing: list) -> list[str]:
    """The report's lines on the protocol, the training time and the runs not made yet."""
    steps_per_epoch = max(1, p.samples_per_epoch // p.batch_size)
    lines = [
        f"Protocol ({preset}): per task {p.cases} labelled phantoms of {'x'.join(map(str, p.shape))} voxels (seed "
        f"{p.data_seed}; {int(round(p.val_fraction * 100))}% of them only for the learning curves), {p.test_cases} "
        f"test phantoms (seed {p.test_seed}) that only score, {p.unlabelled_cases} phantoms written as images without "
        f"labels (seed {p.unlabelled_seed}). {p.input_size}x{p.input_size} slices, batch {p.batch_size}"
        f"{f' + {p.unlabelled_batch or p.batch_size} unlabelled'} per step in the unlabelled arms, Adam lr "
        f"{p.learning_rate:g} with a cosine to 0 over each run: students {p.student_steps} steps, teacher {p.teacher} {p.teacher_steps} "
        f"steps ({steps_per_epoch} steps per epoch; validation Dice after every epoch). Training time summed over the "
        f"runs (from their logs): {sum(r.get('train_seconds') or 0 for r in rows) / 60:.1f} min; this invocation's "
        f"wall time {wall_s:.0f} s (runs found on disk are read back, not repeated).", ""]
    if missing:
        lines += [f"Not made yet ({len(missing)} runs of the plan; `--report-only` reported what was finished): "
                  + "; ".join(missing) + ".", ""]
    return lines


def _torch_threads():
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    from regionkd.sdk.console import run_cli

    run_cli(main)

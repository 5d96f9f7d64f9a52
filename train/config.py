"""Training options, and the one table of their defaults: the size presets (`PRESETS`) and the
sets of distillation weights (`KD_WEIGHTS`). TrainConfig's defaults are the `paper` preset and the
`default` weights; the command line, make_config and the benchmarks read them here.

`paper` is the authors' setup (384x384 slices, batch 16, 30 epochs, Adam lr 1e-2, cosine decay).
`demo` is sized for `make demo` on a 2-core CPU (about 10 minutes with export and benchmark):
96x96 slices, batch 8, 50 steps per epoch, 12 epochs for the teacher and 16 for each student.
An epoch is `samples_per_epoch` slices drawn by the lesion-oversampling sampler (None: as many as
the training split has slices).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from regionkd.sdk.errors import InputError

from .errors import UnknownOptionError

KD_TERMS = ("pmd", "imd", "rad", "pl")
PMD_BALANCES = ("pixels", "classes")
KD_ON = ("all", "unlabelled")
FEATURE_LEVELS = ("low", "high")
MODES = ("teacher", "student", "distill")
# options where None is a value of its own (no limit / none), not "unset"
NONE_MEANS_DEFAULT = frozenset({"max_steps", "pause_after", "samples_per_epoch", "val_max_slices", "teacher",
                                "cache_dir", "teacher_cache", "unlabelled", "unlabelled_batch", "labelled_cases"})

DEFAULT_PRESET = "paper"
PRESETS: dict[str, dict] = {
    "paper": dict(input_size=384, batch_size=16, epochs=30, lr=1e-2, samples_per_epoch=None,
                  val_max_slices=None, log_every=20),
    "demo": dict(input_size=96, batch_size=8, epochs=16, lr=2e-3, samples_per_epoch=400,
                 val_max_slices=64, log_every=10),
}
# per-mode changes to a preset: the demo's teacher (unet-small) is dearer per step
PRESET_MODE_OVERRIDES: dict[tuple[str, str], dict] = {
    ("demo", "teacher"): dict(epochs=12),
}

KD_WEIGHTS: dict[str, dict] = {
    # the paper's loss (Qin et al.): `--kd pmd,imd,rad --alpha 0.1 --beta1 0.9 --beta2 0.9 --temperature 4`
    "paper": dict(kd=("pmd", "imd", "rad"), alpha=0.1, beta1=0.9, beta2=0.9, temperature=4.0, pmd_balance="pixels"),
    # the defaults, from benchmarks/kd_ablation.py (cpu preset): class-balanced PMD at alpha 1, T 1, the one setting
    # with all labels (plus unlabelled scans) whose tumour-Dice gain is positive on both tasks (liver +0.009, kidney
    # +0.020, 3 seeds). The paper's loss gained nothing (-0.003 liver, -0.016 kidney), nor did any setting without
    # unlabelled scans. With few labels, --kd-on unlabelled --pmd-balance pixels.
    "default": dict(kd=("pmd",), alpha=1.0, beta1=0.9, beta2=0.9, temperature=1.0, pmd_balance="classes"),
}
PAPER_KD = KD_WEIGHTS["paper"]
_SIZE, _KD = PRESETS[DEFAULT_PRESET], KD_WEIGHTS["default"]

# options whose change would make a resumed run a different run
RESUME_IDENTITY = ("mode", "arch", "input_size", "batch_size", "lr", "seed", "kd", "kd_levels", "alpha",
                   "beta1", "beta2", "temperature", "epochs", "max_steps", "samples_per_epoch", "lesion_fraction",
                   "val_fraction", "split_seed", "teacher", "pmd_balance", "pl_weight", "unlabelled", "unlabelled_batch",
                   "augment_unlabelled", "labelled_cases", "augment", "kd_on")

# the options that only distillation uses (a teacher or student run ignores them)
DISTILL_ONLY = frozenset({"teacher", "kd", "kd_levels", "alpha", "beta1", "beta2", "temperature", "pl_weight",
                          "pmd_balance", "teacher_cache", "unlabelled", "unlabelled_batch", "augment_unlabelled",
                          "kd_on"})


@dataclass
class TrainConfig:
    mode: str                      # "teacher" | "student" | "distill"
    arch: str
    data: str
    out: str
    teacher: str | None = None     # teacher checkpoint (distill only)
    kd: tuple = _KD["kd"]          # distillation: KD_WEIGHTS["default"]
    kd_levels: tuple = FEATURE_LEVELS
    alpha: float = _KD["alpha"]
    beta1: float = _KD["beta1"]
    beta2: float = _KD["beta2"]
    temperature: float = _KD["temperature"]
    pl_weight: float = 1.0         # weight of "pl": the segmentation loss against the teacher's labels (argmax)
    pmd_balance: str = _KD["pmd_balance"]   # "pixels": the mean over all pixels (the paper); "classes": per class
    teacher_cache: str | None = None  # directory of the teacher cache (distill only), shared between runs
    unlabelled: str | None = None  # folder of CT images without labels: distillation terms only (distill only)
    unlabelled_batch: int | None = None  # unlabelled slices per step (default: batch_size)
    augment_unlabelled: bool = True
    kd_on: str = "all"             # "all" slices of a step, or only the "unlabelled" ones (labelled: ground truth only)
    labelled_cases: int | None = None  # train on only this many of the training split's cases (a fixed subset)
    preset: str = DEFAULT_PRESET   # sizes: PRESETS[DEFAULT_PRESET]
    epochs: int = _SIZE["epochs"]
    max_steps: int | None = None   # train this many optimiser steps at most; the cosine schedule spans them
    pause_after: int | None = None  # stop (with a checkpoint) after this many steps, as if interrupted: the
                                    # schedule is unchanged and --resume continues the same run
    batch_size: int = _SIZE["batch_size"]   # per process under torchrun
    input_size: int = _SIZE["input_size"]
    lr: float = _SIZE["lr"]
    samples_per_epoch: int | None = _SIZE["samples_per_epoch"]
    val_max_slices: int | None = _SIZE["val_max_slices"]
    lesion_fraction: float = 0.5
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    amp: bool = True               # autocast + GradScaler, CUDA only
    resume: bool = False
    cache_dir: str | None = None
    log_every: int = _SIZE["log_every"]
    quiet: bool = False
    augment: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        bad = [t for t in self.kd if t not in KD_TERMS]
        if bad:
            raise InputError(f"--kd: unknown term(s) {bad}; choose from {','.join(KD_TERMS)}")
        bad = [lv for lv in self.kd_levels if lv not in FEATURE_LEVELS]
        if bad:
            raise InputError(f"--kd-levels: unknown level(s) {bad}; choose from {','.join(FEATURE_LEVELS)}")
        if self.mode == "distill" and not self.teacher:
            raise InputError("distill needs --teacher CKPT")
        if self.mode == "distill" and not self.kd:
            raise InputError("distill needs at least one --kd term (use `student` for no distillation)")
        if self.pmd_balance not in PMD_BALANCES:
            raise InputError(f"--pmd-balance must be one of {', '.join(PMD_BALANCES)}, got {self.pmd_balance!r}")
        if self.kd_on not in KD_ON:
            raise InputError(f"--kd-on must be one of {', '.join(KD_ON)}, got {self.kd_on!r}")
        if self.kd_on == "unlabelled" and not self.unlabelled:
            raise InputError("--kd-on unlabelled needs --unlabelled images")
        if self.mode != "distill":
            given = [f"--{n.replace('_', '-')}" for n in ("teacher_cache", "unlabelled") if getattr(self, n)]
            if given:
                raise InputError(f"{' and '.join(given)} only apply to distillation (regionkd-train distill)")
        for name in ("unlabelled_batch", "labelled_cases"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "input_size", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.input_size % 32:
            raise InputError(f"--input-size must be a multiple of 32 (the networks downsample 32x), got {self.input_size}")
        for name in ("max_steps", "pause_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"--lr must be > 0, got {self.lr}")
        return self

    def to_flat_dict(self) -> dict:
        """Plain types only (lists, not tuples), as stored in the checkpoint's `config`."""
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def make_config(mode: str, arch: str, data, out, preset: str = DEFAULT_PRESET, **options) -> TrainConfig:
    """Start from `preset`, then apply every option given, None included (None is "no limit" for
    max_steps, samples_per_epoch and val_max_slices). A command line drops the options the user
    did not set before calling this (`cli_training`)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update(PRESET_MODE_OVERRIDES.get((preset, mode), {}))
    values.update(options)
    required = sorted(k for k, v in values.items() if v is None and k not in NONE_MEANS_DEFAULT)
    if required:
        raise InputError(f"training options {required} cannot be None")
    for key in ("kd", "kd_levels"):
        if key in values and isinstance(values[key], str):
            values[key] = tuple(t.strip() for t in values[key].split(",") if t.strip())
        elif key in values:
            values[key] = tuple(values[key])
    names = set(field_defaults())
    unknown = sorted(set(values) - names)
    if unknown:
        raise UnknownOptionError(f"unknown training options {unknown}")
    return TrainConfig(mode=mode, arch=arch, data=str(data), out=str(out), preset=preset, **values).validate()


def field_defaults() -> dict:
    """Every TrainConfig option with its default (the one table of training defaults; options
    without a default, such as `mode`, map to dataclasses.MISSING)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}

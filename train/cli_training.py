"""`regionkd-train teacher | student | distill | evaluate`: the commands draw the progress bars
(`regionkd.sdk.console.progress_bar`) and show the training library's messages (messages.py)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from regionkd.sdk.console import progress_bar

from .config import KD_ON, PMD_BALANCES, PRESETS, field_defaults

_default = field_defaults().__getitem__   # click option defaults: the training defaults' one table

PRESET_HELP = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items() if k in
                                                 ("input_size", "batch_size", "epochs", "lr", "samples_per_epoch"))
                        for name, p in PRESETS.items())


def shared_training_options(fn):
    """Options every training command takes; an option left out keeps the preset's value."""
    options = [
        click.option("--data", "data", required=True, type=click.Path(path_type=Path),
                     help="Dataset root (LiTS, KiTS19 or MSD layout, or phantoms)."),
        click.option("-o", "--out", "--output", "out", required=True, type=click.Path(path_type=Path),
                     help="Checkpoint to write (every epoch and at the end); the log goes beside it as <stem>.log.jsonl."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default=_default("preset"), show_default=True,
                     help=f"Starting values for the options below ({PRESET_HELP}). The device, the preset and an "
                          "estimate of the run's length are printed before training starts."),
        click.option("--epochs", type=int, help="Epochs (an epoch: samples_per_epoch slices, lesion-oversampled)."),
        click.option("--max-steps", type=int, help="Train at most this many optimiser steps; the cosine lr "
                                                   "schedule spans the steps actually trained."),
        click.option("--batch-size", type=int, help="Slices per step (per process under torchrun)."),
        click.option("--input-size", type=int, help="Square network input size in pixels (multiple of 32)."),
        click.option("--lr", type=float, help="Adam learning rate (cosine decay to 0 over all epochs)."),
        click.option("--samples-per-epoch", type=int, help="Slices per epoch (default: preset, or the training split's size)."),
        click.option("--seed", type=int, default=_default("seed"), show_default=True,
                     help="Seed: a CPU run is repeatable."),
        click.option("--device", default=_default("device"), show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--workers", type=int, default=_default("workers"), show_default=True,
                     help="DataLoader worker processes."),
        click.option("--no-amp", is_flag=True, help="Disable mixed precision (only used on CUDA anyway)."),
        click.option("--resume", is_flag=True, help="Continue from --out if it exists (same options required)."),
        click.option("--cache-dir", type=click.Path(path_type=Path),
                     help="Slice cache directory (default: slice-cache-<size> beside --out)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _step_updates(bar):
    """The trainer's progress callback drawn on `bar`: steps done, and its status beside them."""
    def update(n: int, status: str | None = None) -> None:
        if status:
            bar.set_postfix_str(status)
        bar.update(n)

    return update


def _run(mode: str, arch: str, opts: dict, **extra) -> None:
    from .config import make_config
    from .messages import show_messages
    from .trainer import training_run

    quiet = opts["quiet"]
    given = dict(epochs=opts["epochs"], max_steps=opts["max_steps"], batch_size=opts["batch_size"],
                 input_size=opts["input_size"], lr=opts["lr"], samples_per_epoch=opts["samples_per_epoch"],
                 cache_dir=str(opts["cache_dir"]) if opts["cache_dir"] else None, **extra)
    cfg = make_config(   # an option the user left out keeps the preset's value
        mode, arch, opts["data"], opts["out"], preset=opts["preset"], seed=opts["seed"], device=opts["device"],
        workers=opts["workers"], amp=not opts["no_amp"], resume=opts["resume"], quiet=quiet,
        **{k: v for k, v in given.items() if v is not None})
    with show_messages(quiet) as messages, training_run(cfg) as run:
        with progress_bar(total=run.target_steps, initial=run.step, desc=f"{mode} {arch}", unit="step",
                          quiet=quiet or not run.proc.is_main) as bar:
            messages.bar = bar
            summary = run.run(progress=_step_updates(bar))
            messages.bar = None
    if not quiet and summary.get("rank", 0) == 0:
        dice = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in summary["val_dice"].items())
        click.echo(f"{mode} {arch}: {summary['steps']} steps in {summary['seconds']:.1f} s "
                   f"({summary['step_s_median']} s/step); validation Dice: {dice or 'no validation cases'}")
        click.echo(f"checkpoint: {summary['out']}\nlog: {summary['log']}")


@click.command()
@shared_training_options
@click.option("--arch", default="raunet", show_default=True, help="Teacher network (registry name).")
def teacher(arch, **opts):
    """Train the teacher network (RAUNet by default) on a CT dataset."""
    _run("teacher", arch, opts)


@click.command()
@shared_training_options
@click.option("--arch", required=True, help="Student network (registry name: enet, mobilenetv2, resnet18, espnet, ...).")
@click.option("--labelled-cases", type=click.IntRange(1),
              help="Use only this many of the training split's cases (the same fixed subset as distill's).")
def student(arch, labelled_cases, **opts):
    """Train a student without distillation (the baseline)."""
    _run("student", arch, opts, labelled_cases=labelled_cases)


@click.command()
@shared_training_options
@click.option("--arch", required=True, help="Student network (registry name).")
@click.option("--teacher", "teacher_ckpt", required=True, type=click.Path(path_type=Path),
              help="Teacher checkpoint (same classes, HU window and input size).")
@click.option("--kd", default=",".join(_default("kd")), show_default=True,
              help="Distillation terms, comma-separated: pmd (prediction maps), imd (importance maps), rad (region "
                   "affinity), pl (the segmentation loss against the teacher's labels).")
@click.option("--kd-levels", default=",".join(_default("kd_levels")), show_default=True,
              help="Feature levels IMD and RAD match (summed over levels).")
@click.option("--alpha", type=float, default=_default("alpha"), show_default=True, help="Weight of PMD.")
@click.option("--beta1", type=float, default=_default("beta1"), show_default=True, help="Weight of IMD.")
@click.option("--beta2", type=float, default=_default("beta2"), show_default=True, help="Weight of RAD.")
@click.option("--temperature", type=float, default=_default("temperature"), show_default=True,
              help="PMD softmax temperature.")
@click.option("--pl-weight", type=float, default=_default("pl_weight"), show_default=True, help="Weight of pl.")
@click.option("--pmd-balance", type=click.Choice(PMD_BALANCES), default=_default("pmd_balance"), show_default=True,
              help="pixels: PMD is the mean over all pixels (the paper); classes: the mean within each class the "
                   "teacher predicts, then over classes, so that small lesions weigh as much as background.")
@click.option("--unlabelled", type=click.Path(file_okay=False, path_type=Path),
              help="CT images without labels (a LiTS, KiTS19 or MSD folder, or any folder of NIfTI files; labels are "
                   "never read): each step adds slices of them on which only the distillation terms apply "
                   "(RAD takes its regions from the teacher's prediction there).")
@click.option("--unlabelled-batch", type=click.IntRange(1), help="Unlabelled slices per step (default: --batch-size).")
@click.option("--no-augment-unlabelled", is_flag=True, help="Feed the unlabelled slices without flips, rotations and jitter.")
@click.option("--kd-on", type=click.Choice(KD_ON), default=_default("kd_on"), show_default=True,
              help="Slices the distillation terms apply to: all of a step's, or only the unlabelled ones (the "
                   "labelled slices then learn from the ground truth alone, and the teacher never sees them).")
@click.option("--labelled-cases", type=click.IntRange(1),
              help="Use only this many of the training split's labelled cases (a fixed subset, the same for every "
                   "seed): the setting of a few annotated scans and many unannotated ones.")
@click.option("--teacher-cache", type=click.Path(file_okay=False, path_type=Path),
              help="Store the teacher's outputs for this run's batches here, and read them back in later runs with "
                   "the same teacher, data, seed and batch plan (any student, KD terms or weights): a distillation "
                   "step then costs about what a plain student step costs.")
def distill(arch, teacher_ckpt, kd, kd_levels, alpha, beta1, beta2, temperature, pl_weight, pmd_balance, unlabelled,
            unlabelled_batch, no_augment_unlabelled, kd_on, labelled_cases, teacher_cache, **opts):
    """Train a student with region-aware distillation from a frozen teacher:
    L = L_seg + alpha*PMD + beta1*IMD + beta2*RAD."""
    _run("distill", arch, opts, teacher=str(teacher_ckpt), kd=kd, kd_levels=kd_levels, alpha=alpha, beta1=beta1,
         beta2=beta2, temperature=temperature, pl_weight=pl_weight, pmd_balance=pmd_balance,
         unlabelled=str(unlabelled) if unlabelled else None, unlabelled_batch=unlabelled_batch,
         augment_unlabelled=not no_augment_unlabelled, kd_on=kd_on, labelled_cases=labelled_cases,
         teacher_cache=str(teacher_cache) if teacher_cache else None)


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset root.")
@click.option("--cases", help="Comma-separated case ids, or 'all' (default: the checkpoint's validation split, "
                             "for the data it was trained on).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Slices per forward pass.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the full result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def evaluate(ckpt, data, cases, device, batch_size, json_out, quiet):
    """Segment each validation volume slice by slice and report Dice, VOE, RVD, ASSD and HD95 (mm)
    per case and mean per class, in each file's own orientation and spacing."""
    from regionkd.sdk.atomic import atomic_write_text

    from .evaluate import count_cases, evaluate_checkpoint, format_table
    from .processes import resolve_device

    if cases == "all":
        from .data import open_dataset

        case_ids = list(open_dataset(data).case_ids)
    else:
        case_ids = [c.strip() for c in cases.split(",") if c.strip()] if cases else None
    device = str(resolve_device(device))
    with progress_bar(total=count_cases(ckpt, data, case_ids), desc="evaluate", unit="case", quiet=quiet) as bar:
        result = evaluate_checkpoint(ckpt, data, case_ids=case_ids, device=device, batch_size=batch_size,
                                     progress=bar.update)
    click.echo(format_table(result))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_out}")

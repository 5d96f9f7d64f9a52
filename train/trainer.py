"""One training loop for the teacher, the baseline student and the distilled student.

    L = L_seg + alpha * PMD + beta1 * sum_levels IMD + beta2 * sum_levels RAD   (distill_loss.py)

The teacher of a distillation run is frozen, in eval mode, and runs without grad; with a
teacher cache (`--teacher-cache`) its outputs for the run's batches are computed once per seed
and read back by every later run (teacher.py, teacher_cache.py). With unlabelled images
(`--unlabelled`) every step adds `unlabelled_batch` unlabelled slices, on which only the
distillation terms apply. `labelled_cases` trains on a fixed subset of the labelled training
cases (the few annotated scans of that setting; run_data.py).

The learning rate follows a cosine from `lr` to 0 over the steps the run trains (`max_steps`, or
all epochs). Validation Dice is measured after every epoch and logged: the run's learning curve
(validation.py).

Repeatability: every slice's augmentation is seeded from (seed, epoch, position in the epoch)
inside a private RNG scope, the epoch's slice order from (seed, epoch) (sampling.py), and the
global RNGs (dropout) are saved in the checkpoint. So a CPU run is repeatable, and a run resumed
from a checkpoint (even one written mid-epoch by `pause_after`) continues exactly where it stopped.

Multi-process: under `torchrun` (WORLD_SIZE > 1) the network is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU; processes.py); every rank draws the same epoch
order and takes every world_size-th slice of it (the DistributedSampler scheme); `batch_size` is
per process; only rank 0 writes the checkpoint and the log.

The loop draws nothing: it says what it will do through `logging` and reports each step to an
optional `progress` callback; the command turns that into a progress bar.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from regionkd.sdk.errors import InputError

from .checkpoint import (CheckpointError, build_checkpoint, check_resumable, load_checkpoint, log_path_for,
                         params_sha256, save_checkpoint)
from .config import TrainConfig
from .distill_loss import DistillLoss, reduce_terms
from .errors import ConfigError
from .processes import (Proc, autocast, derived_seed, parallel_model, rng_state, seed_everything, set_rng_state,
                        setup_processes)
from .run_data import open_run_data
from .sampling import SeededItems, epoch_batches
from .teacher import TeacherSide, load_teacher
from .validation import validate

__all__ = ["train", "training_run", "TrainingRun"]

log = logging.getLogger(__name__)


class JsonlLog:
    """Appends one JSON object per line to `<ckpt stem>.log.jsonl` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, fresh: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                path.write_text("")

    def write(self, **record):
        if self.enabled:
            record.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class TrainingRun:
    """The state of one run: data, network, teacher side, optimiser, schedule and position."""

    def __init__(self, cfg: TrainConfig, proc: Proc):
        from .models import create_model

        self.cfg, self.proc = cfg, proc
        self.out = Path(cfg.out)
        self.data = open_run_data(cfg, proc)
        seed_everything(cfg.seed)
        try:
            self.net = create_model(cfg.arch, num_classes=len(self.data.class_names)).to(proc.device)
        except ConfigError as exc:
            raise InputError(f"--arch: {exc}") from exc
        distill = cfg.mode == "distill"
        self.loss_fn = DistillLoss(cfg, len(self.data.class_names), distill=distill)
        samples = cfg.samples_per_epoch or len(self.data.train_ds)
        self.steps_per_epoch = max(1, samples // (cfg.batch_size * proc.world))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.target_steps = min(self.total_steps, cfg.max_steps or self.total_steps)
        self.stop_at = min(self.target_steps, cfg.pause_after or self.target_steps)
        self.teacher_side, self.t_ckpt = self._teacher() if distill else (None, None)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.target_steps)
        self.use_amp = proc.device.type == "cuda" and cfg.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = self.step = self.in_epoch = 0
        self.metrics: dict = {}
        self.resumed = bool(cfg.resume and self.out.is_file())
        if self.resumed:
            self._restore()
        self.log = JsonlLog(log_path_for(self.out), enabled=proc.is_main, fresh=not self.resumed)
        self.model = parallel_model(self.net, features=distill, proc=proc)

    def _teacher(self) -> tuple[TeacherSide, dict]:
        cfg, proc = self.cfg, self.proc
        teacher, t_ckpt = load_teacher(cfg, self.data.class_names, self.data.window, proc.device)
        cache = None
        if cfg.teacher_cache:
            from .teacher_cache import TeacherCache

            cache = TeacherCache(cfg.teacher_cache, cfg.teacher, cfg.input_size)
        side = TeacherSide(cfg, proc, teacher, len(self.data.class_names),
                           (self.data.train_ds, self.data.unlabelled_ds), cache)
        return side, t_ckpt

    def _restore(self):
        ckpt = load_checkpoint(self.out)   # CPU: RNG states must stay CPU tensors; Adam moves its state
        check_resumable(ckpt, self.cfg, self.out)
        st = ckpt["train_state"]
        self.net.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.use_amp and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if int(st.get("world_size", 1)) != self.proc.world:
            raise CheckpointError(f"--resume {self.out}: written by {st.get('world_size')} process(es), "
                                  f"resumed with {self.proc.world}; the epoch plan would differ")
        set_rng_state(st["rng"])
        self.epoch, self.step, self.in_epoch = int(st["epoch"]), int(st["step"]), int(st["step_in_epoch"])
        self.metrics = ckpt.get("metrics", {})

    def batches(self, epoch: int) -> list:
        cfg, proc = self.cfg, self.proc
        return epoch_batches(self.data.train_ds, epoch, cfg, self.steps_per_epoch, proc.rank, proc.world,
                             unlabelled_ds=self.data.unlabelled_ds)

    def loader(self, epoch: int, batches: list) -> DataLoader:
        """A loader of `batches` of `epoch`: (images, labels, orientations) per step."""
        cfg, proc = self.cfg, self.proc
        gen = torch.Generator()
        gen.manual_seed(derived_seed(cfg.seed, epoch, 3))
        return DataLoader(SeededItems(self.data.train_ds, self.data.unlabelled_ds), batch_sampler=batches,
                          num_workers=cfg.workers, generator=gen, pin_memory=proc.device.type == "cuda")

    def checkpoint(self, finished: bool):
        if not self.proc.is_main:
            return
        state = {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.in_epoch,
                 "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                 "target_steps": self.target_steps, "world_size": self.proc.world, "finished": finished,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.use_amp else {}, "rng": rng_state()}
        save_checkpoint(self.out, build_checkpoint(self.cfg, self.net, self.data.class_names, self.data.task,
                                                   self.data.window, state, self.metrics, self.t_ckpt,
                                                   spacing=self.data.spacing))

    def validation(self):
        val_ds = self.data.val_ds
        if val_ds is None or len(val_ds) == 0:
            return
        dice = validate(self.net, val_ds, self.cfg, self.data.class_names, self.proc)
        self.log.write(event="epoch", epoch=self.epoch, step=self.step, val_dice=dice)
        self.metrics = {"val": dice, "epoch": self.epoch, "step": self.step}

    def kd_items(self, items) -> list[bool]:
        """Which slices of a step the distillation terms apply to."""
        from .sampling import UNLABELLED

        return [self.cfg.kd_on == "all" or src == UNLABELLED for src, _, _ in items]

    def train_step(self, images, labels, items) -> dict:
        cfg, proc = self.cfg, self.proc
        targets, kd_rows = None, None
        if self.teacher_side is not None:
            mask = self.kd_items(items)
            targets = self.teacher_side.targets([it for it, m in zip(items, mask) if m])
            kd_rows = None if all(mask) else torch.tensor(mask, device=proc.device)
        with autocast(proc, cfg):
            s_logits, s_feats = self.model(images)
        terms = self.loss_fn(s_logits, s_feats, labels, targets, kd_rows=kd_rows)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self.in_epoch += 1
        return {"terms": terms, "lr": lr}

    def estimate_step_s(self) -> float:
        """Seconds of one training step, measured on two steps of a copy of the network with a batch
        of this run's shape (and the teacher's forward pass when distilling without a cache). The
        run's network, optimiser and random state are untouched."""
        import copy

        cfg, proc = self.cfg, self.proc
        net = copy.deepcopy(self.net).train()
        x = torch.zeros(cfg.batch_size, 1, cfg.input_size, cfg.input_size, device=proc.device)
        teacher = getattr(self.teacher_side, "teacher", None) if self.teacher_side is not None else None
        if self.teacher_side is not None and self.teacher_side.cache is not None:
            teacher = None                       # a cached teacher costs a lookup, not a forward pass
        devices = [proc.device.index or 0] if proc.device.type == "cuda" else []
        seconds = []
        with torch.random.fork_rng(devices=devices):
            for _ in range(2):
                t0 = time.perf_counter()
                with autocast(proc, cfg):
                    out = net.forward_features(x)[0] if cfg.mode == "distill" else net(x)
                    if teacher is not None:
                        with torch.no_grad():
                            teacher(x)
                out.float().mean().backward()
                if proc.device.type == "cuda":
                    torch.cuda.synchronize(proc.device)
                seconds.append(time.perf_counter() - t0)
        del net
        return seconds[-1]

    def announce(self) -> dict:
        """Say before training what will run where and for about how long (logged, and in the
        log's start record)."""
        cfg, proc = self.cfg, self.proc
        remaining = max(0, self.stop_at - self.step)
        step_s = self.estimate_step_s()
        total_s = step_s * remaining
        info = {"device": str(proc.device), "processes": proc.world, "preset": cfg.preset, "steps": remaining,
                "estimated_step_s": round(step_s, 5), "estimated_s": round(total_s, 3)}
        if not cfg.quiet and proc.is_main:
            log.info(f"{cfg.mode} {cfg.arch} on {proc.device} ({proc.world} process{'es' if proc.world > 1 else ''}), "
                     f"preset {cfg.preset}: {cfg.input_size} px, batch {cfg.batch_size}, {cfg.epochs} epochs x "
                     f"{self.steps_per_epoch} steps" + (f", stopping at step {self.stop_at}" if
                                                        self.stop_at < self.total_steps else "") +
                     f"; {remaining} steps to go at about {step_s:.2f} s/step (measured here): "
                     f"about {format_duration(total_s)}")
            if proc.device.type == "cpu" and cfg.preset == "paper":
                log.info("note: the paper preset (384 px, 30 epochs) is sized for a GPU; on a CPU "
                         "--preset demo trains in minutes")
        return info

    def run(self, progress=None) -> dict:
        """Train up to `stop_at`, validating and writing the checkpoint after every epoch and at the
        end. `progress(n, status=None)`: `n` steps just done; `status`, when given, a short text for
        the display (a logged step's loss and speed, or what the run does between steps)."""
        report = progress or (lambda n, status=None: None)
        t_start = time.perf_counter()
        self._log_start(self.announce() if self.proc.is_main else {})
        step_times: list[float] = []
        saved_at = self.step if self.resumed else -1
        while self.epoch < self.cfg.epochs and self.step < self.stop_at:
            self._train_epoch(report, step_times)
            if self.in_epoch >= self.steps_per_epoch:
                self.epoch, self.in_epoch = self.epoch + 1, 0
                self.validation()
                self.checkpoint(finished=self.step >= self.target_steps)
                saved_at = self.step
        if saved_at != self.step:
            self.validation()
            self.checkpoint(finished=self.step >= self.target_steps)
        self.proc.barrier()
        return self._finish(step_times, t_start)

    def _log_start(self, estimate: dict) -> None:
        cfg, proc, data = self.cfg, self.proc, self.data
        self.log.write(event="resume" if self.resumed else "start", step=self.step, epoch=self.epoch,
                       world_size=proc.world, device=str(proc.device), steps_per_epoch=self.steps_per_epoch,
                       total_steps=self.total_steps, target_steps=self.target_steps, config=cfg.to_flat_dict(),
                       train_cases=len(data.train_ids), train_slices=len(data.train_ds),
                       unlabelled_slices=len(data.unlabelled_ds) if data.unlabelled_ds else 0,
                       estimate=estimate)

    def _fill_teacher_cache(self, batches: list, report) -> None:
        """Put the teacher's outputs for the distilled slices of `batches` into the teacher cache."""
        if self.teacher_side is None or self.teacher_side.cache is None:
            return
        report(0, "teacher cache")
        orientations = [ors.tolist() for _, _, ors in self.loader(self.epoch, batches)]
        kd_batches = [[key for key, m in zip(b, self.kd_items(b)) if m] for b in batches]
        kd_orients = [[o for o, m in zip(ors, self.kd_items(b)) if m] for b, ors in zip(batches, orientations)]
        record = self.teacher_side.prepare_epoch(self.epoch, kd_batches, kd_orients)
        if record:
            self.log.write(**record)

    def _train_epoch(self, report, step_times: list) -> None:
        """The current epoch's remaining steps, up to `stop_at`."""
        cfg, proc = self.cfg, self.proc
        batches = self.batches(self.epoch)[self.in_epoch:]
        self._fill_teacher_cache(batches, report)
        self.model.train()
        t0 = time.perf_counter()
        for batch, (images, labels, ors) in zip(batches, self.loader(self.epoch, batches)):
            images = images.to(proc.device, non_blocking=True).float()
            labels = labels.to(proc.device, non_blocking=True).long()
            items = [(src, idx, int(o)) for (src, idx, _), o in zip(batch, ors)]
            out = self.train_step(images, labels, items)
            t1 = time.perf_counter()
            step_times.append(t1 - t0)
            status = None
            if self.step % cfg.log_every == 0 or self.step == self.target_steps:
                values = reduce_terms(out["terms"], proc)
                rate = len(images) * proc.world / (t1 - t0)
                self.log.write(event="step", epoch=self.epoch, step=self.step, lr=out["lr"], loss=values,
                               step_s=round(t1 - t0, 4), samples_per_s=round(rate, 2))
                status = f"loss {values['total']:.4f}, {rate:.1f} img/s"
            report(1, status)
            t0 = time.perf_counter()
            if self.step >= self.stop_at:
                break

    def _finish(self, step_times: list, t_start: float) -> dict:
        proc = self.proc
        tail = step_times[2:] if len(step_times) > 4 else step_times
        summary = {"out": str(self.out), "log": str(log_path_for(self.out)), "steps": self.step, "epoch": self.epoch,
                   "val_dice": self.metrics.get("val", {}), "seconds": round(time.perf_counter() - t_start, 2),
                   "step_s_median": round(float(np.median(tail)), 4) if tail else None, "world_size": proc.world,
                   "rank": proc.rank, "params_sha256": params_sha256(self.net)}
        if self.teacher_side is not None and self.teacher_side.cache is not None:
            summary["teacher_cache"] = self.teacher_side.cache.summary()
        self.log.write(event="end", **summary)
        return summary


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 20 min'."""
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


@contextlib.contextmanager
def training_run(cfg: TrainConfig):
    """The TrainingRun `cfg` describes, with its processes joined (torchrun) while it is open: a
    command opens it to size its progress bar (`target_steps`, `step`) before calling `run`."""
    cfg.validate()
    proc = setup_processes(cfg.device)
    try:
        yield TrainingRun(cfg, proc)
    finally:
        proc.close()


def train(cfg: TrainConfig, progress=None) -> dict:
    """Train as `cfg` says; write the checkpoint (every epoch and at the end) and its log.
    Returns a summary: out, log, steps, epoch, val_dice, seconds, median step time (and the
    teacher cache's size and times when one is used). `progress`: see `TrainingRun.run`."""
    with training_run(cfg) as run:
        return run.run(progress)

"""One training loop for the teacher, the baseline student and the distilled student.

    L = L_seg + alpha * PMD + beta1 * sum_levels IMD + beta2 * sum_levels RAD   (distill_loss.py)

The teacher of a distillation run is frozen, in eval mode, and runs without grad; with a
teacher cache (`--teacher-cache`) its outputs for the run's batches are computed once per seed
and read back by every later run (teacher_cache.py). With unlabelled images (`--unlabelled`)
every step adds `unlabelled_batch` unlabelled slices, on which only the distillation terms
apply. `labelled_cases` trains on a fixed subset of the labelled training cases (the few
annotated scans of that setting).

The learning rate follows a cosine from `lr` to 0 over the steps the run trains (`max_steps`, or
all epochs). Validation Dice is measured after every epoch and logged: the run's learning curve.

Repeatability: every slice's augmentation is seeded from (seed, epoch, position in the epoch)
inside a private RNG scope, the epoch's slice order from (seed, epoch) (sampling.py), and the
global RNGs (dropout) are saved in the checkpoint. So a CPU run is repeatable, and a run resumed
from a checkpoint (even one written mid-epoch by `pause_after`) continues exactly where it stopped.

Multi-process: under `torchrun` (WORLD_SIZE > 1) the network is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU); every rank draws the same epoch order and
takes every world_size-th slice of it (the DistributedSampler scheme); `batch_size` is per
process; only rank 0 writes the checkpoint and the log.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from regionkd.sdk.bundle import sha256_file
from regionkd.sdk.errors import InputError

from .checkpoint import CheckpointError, load_checkpoint, load_model, log_path_for, save_checkpoint
from .config import DISTILL_ONLY, RESUME_IDENTITY, TrainConfig, field_defaults
from .distill_loss import DistillLoss, reduce_terms, teacher_targets
from .processes import Proc, derived_seed, resolve_device, rng_state, seed_everything, set_rng_state, setup_processes
from .sampling import SeededItems, epoch_batches

__all__ = ["train", "load_teacher", "validate", "params_sha256", "epoch_batches", "resolve_device"]


class Forward(nn.Module):
    """What DDP wraps: `forward` returns (logits, features or None), so that distillation's
    `forward_features` goes through DDP's forward (and its gradient synchronisation)."""

    def __init__(self, net: nn.Module, features: bool):
        super().__init__()
        self.net, self.features = net, features

    def forward(self, x):
        if self.features:
            return self.net.forward_features(x)
        return self.net(x), None


def autocast(proc: Proc, cfg: TrainConfig):
    if proc.device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(net: nn.Module, val_ds, cfg: TrainConfig, class_names, proc: Proc) -> dict:
    """Dice per foreground class over the validation split's slices (global over the slices;
    None when a class is absent from both prediction and reference). `val_max_slices` (None: all)
    takes that many slices evenly spread over the split."""
    n = len(val_ds)
    idx = np.arange(n)
    if cfg.val_max_slices and n > cfg.val_max_slices:
        idx = np.unique(np.linspace(0, n - 1, cfg.val_max_slices).round().astype(int))
    idx = idx[proc.rank::proc.world]
    c = len(class_names)
    counts = torch.zeros(3, c, dtype=torch.float64, device=proc.device)
    was_training = net.training
    net.eval()
    for start in range(0, len(idx), cfg.batch_size):
        items = [val_ds[int(i)] for i in idx[start:start + cfg.batch_size]]
        x = torch.stack([torch.as_tensor(np.asarray(im)) for im, _ in items]).to(proc.device)
        y = torch.stack([torch.as_tensor(np.asarray(lb)) for _, lb in items]).to(proc.device).long()
        with autocast(proc, cfg):
            pred = net(x).argmax(1)
        p1 = F.one_hot(pred, c).flatten(0, 2).double()
        r1 = F.one_hot(y, c).flatten(0, 2).double()
        counts += torch.stack([(p1 * r1).sum(0), p1.sum(0), r1.sum(0)])
    if proc.world > 1:
        dist.all_reduce(counts)
    net.train(was_training)
    counts = counts.cpu().numpy()
    out = {}
    for k in range(1, c):
        inter, ps, rs = counts[:, k]
        out[class_names[k]] = None if ps + rs == 0 else round(float(2 * inter / (ps + rs)), 6)
    return out


# ----------------------------------------------------------------------------- log

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


# ----------------------------------------------------------------------------- data and teacher

def task_info(task_name: str):
    """(class_names, window) of a task (regionkd.train.data.tasks)."""
    from .data.tasks import get_task

    task = get_task(task_name)
    return list(task.class_names), [float(v) for v in task.window]


def labelled_subset(train_ids: list[str], n: int | None, seed: int) -> list[str]:
    """`n` of the training cases, the same for every run seed (drawn with the split seed)."""
    if n is None:
        return list(train_ids)
    if n > len(train_ids):
        raise InputError(f"--labelled-cases {n}: the training split has only {len(train_ids)} case(s)")
    order = np.random.default_rng([seed, 7]).permutation(len(train_ids))
    return sorted(train_ids[i] for i in order[:n])


@dataclass
class RunData:
    task: str
    class_names: list
    window: list
    train_ids: list
    train_ds: object
    val_ds: object
    slice_caches: list
    unlabelled_ds: object = None
    unlabelled_ids: list | None = None
    spacing: dict | None = None     # voxel-size range of the training cases (the bundle's preprocessing.spacing)


def open_run_data(cfg: TrainConfig, proc: Proc) -> RunData:
    """The slice caches (built by rank 0), the case split, and the datasets of a run."""
    from .data import open_dataset
    from .data.slices import SliceCache, SliceDataset, UnlabelledSliceDataset, split_cases

    data_root = Path(cfg.data)
    if not data_root.is_dir():
        raise InputError(f"--data {data_root}: not a directory")
    ds = open_dataset(data_root)
    class_names, window = task_info(ds.task)
    size = (cfg.input_size, cfg.input_size)
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / f"slice-cache-{cfg.input_size}"
    u_dir = cache_dir.with_name(cache_dir.name + "-unlabelled")
    if proc.is_main:
        cache = SliceCache.build(data_root, cache_dir, window=None, input_size=size, progress=not cfg.quiet)
        if cfg.unlabelled:
            SliceCache.build_unlabelled(cfg.unlabelled, u_dir, ds.task, window=cache.window, input_size=size,
                                        progress=not cfg.quiet)
    proc.barrier()
    cache = SliceCache.open(cache_dir)
    window = [float(v) for v in cache.window]
    train_ids, val_ids = split_cases(list(ds.case_ids), val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if not train_ids:
        raise InputError(f"--data {data_root}: no training cases after the validation split")
    train_ids = labelled_subset(train_ids, cfg.labelled_cases, cfg.split_seed)
    train_ds = SliceDataset(cache, train_ids, augment=cfg.augment)
    val_ds = SliceDataset(cache, val_ids, augment=False) if val_ids else None
    if len(train_ds) == 0:
        raise InputError(f"--data {data_root}: the training cases hold no slices")
    rd = RunData(ds.task, class_names, window, train_ids, train_ds, val_ds, [cache_dir],
                 spacing=cache.spacing_range(train_ids))
    if cfg.unlabelled:
        u_cache = SliceCache.open(u_dir)
        rd.unlabelled_ds = UnlabelledSliceDataset(u_cache, augment=cfg.augment_unlabelled)
        rd.unlabelled_ids = u_cache.case_ids
        rd.slice_caches.append(u_dir)
        if len(rd.unlabelled_ds) == 0:
            raise InputError(f"--unlabelled {cfg.unlabelled}: the images hold no slices")
    return rd


def load_teacher(cfg: TrainConfig, class_names, window, device) -> tuple[nn.Module, dict]:
    path = Path(cfg.teacher)
    teacher, t_ckpt = load_model(path, device=device)
    problems = []
    if list(t_ckpt["class_names"]) != list(class_names):
        problems.append(f"classes {t_ckpt['class_names']} but the data has {class_names}")
    if [int(v) for v in t_ckpt["preprocessing"]["input_size"]] != [cfg.input_size, cfg.input_size]:
        problems.append(f"input size {t_ckpt['preprocessing']['input_size']} but this run uses "
                        f"{[cfg.input_size, cfg.input_size]} (pass --input-size to match)")
    if [float(v) for v in t_ckpt["preprocessing"]["window"]] != [float(v) for v in window]:
        problems.append(f"HU window {t_ckpt['preprocessing']['window']} but the data's task uses {window}")
    if problems:
        raise CheckpointError(f"teacher checkpoint {path} does not fit this run: " + "; ".join(problems))
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher, t_ckpt


class TeacherSide:
    """The teacher's targets for each step: the teacher is shown every drawn slice in the
    orientation the step drew, without the student's intensity jitter (`SliceDataset.view`),
    either live or through the teacher cache, which is filled at the start of each epoch with
    whatever that epoch draws and the cache does not hold yet."""

    def __init__(self, cfg, proc, teacher, num_classes, sources, cache=None):
        self.cfg, self.proc, self.teacher, self.num_classes = cfg, proc, teacher, num_classes
        self.sources, self.cache = sources, cache

    def _views(self, items):
        """(images N x 1 x H x W, labels N x H x W) of (source, index, orientation) items."""
        from .sampling import IGNORE_LABEL

        images, labels = [], []
        for src, idx, o in items:
            image, label = self.sources[src].view(idx, o)
            images.append(image)
            labels.append(label if label is not None else torch.full(image.shape[1:], IGNORE_LABEL, dtype=torch.int64))
        return torch.stack(images).to(self.proc.device), torch.stack(labels).to(self.proc.device)

    def compute(self, items, half: bool):
        images, labels = self._views(items)
        return teacher_targets(self.teacher, images, labels, self.num_classes, half=half,
                               context=lambda: autocast(self.proc, self.cfg))

    def _keys(self, items):
        return [self.cache.item_key(self.sources[src], idx, o) for src, idx, o in items]

    def prepare_epoch(self, epoch: int, batches, orientations) -> dict | None:
        """Fill the cache with this epoch's items that it lacks; returns a log record or None."""
        if self.cache is None:
            return None
        items = [(src, idx, o) for batch, ors in zip(batches, orientations) for (src, idx, _), o in zip(batch, ors)]
        t0 = time.perf_counter()
        n = self.cache.fill(self._keys(items), lambda pos: self.compute([items[i] for i in pos], half=True))
        if not n:
            return None
        return {"event": "teacher_cache", "epoch": epoch, "items_filled": n,
                "seconds": round(time.perf_counter() - t0, 2)}

    def targets(self, items):
        if self.cache is None:
            return self.compute(items, half=False)
        return self.cache.gather(self._keys(items)).to(self.proc.device)


# ----------------------------------------------------------------------------- the run

def check_resumable(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    # an option the checkpoint does not record is one added since: it ran with that option's default
    defaults = field_defaults()
    old = {k: ckpt.get("config", {}).get(k, defaults.get(k)) for k in RESUME_IDENTITY}
    new = cfg.to_flat_dict()
    keys = [k for k in RESUME_IDENTITY if cfg.mode == "distill" or k not in DISTILL_ONLY]  # others mean nothing there
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise CheckpointError(f"--resume {path}: the checkpoint was written with other options ({'; '.join(diff)})")
    if "train_state" not in ckpt:
        raise CheckpointError(f"--resume {path}: the checkpoint holds no training state")


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("regionkd")
    except Exception:
        return "unknown"


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
        except ValueError as exc:
            raise InputError(f"--arch: {exc}") from exc
        self.t_ckpt = None
        distill = cfg.mode == "distill"
        self.loss_fn = DistillLoss(cfg, len(self.data.class_names), distill=distill)
        samples = cfg.samples_per_epoch or len(self.data.train_ds)
        self.steps_per_epoch = max(1, samples // (cfg.batch_size * proc.world))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.target_steps = min(self.total_steps, cfg.max_steps or self.total_steps)
        self.stop_at = min(self.target_steps, cfg.pause_after or self.target_steps)
        self.teacher_side = None
        if distill:
            teacher, self.t_ckpt = load_teacher(cfg, self.data.class_names, self.data.window, proc.device)
            cache = None
            if cfg.teacher_cache:
                from .teacher_cache import TeacherCache

                cache = TeacherCache(cfg.teacher_cache, cfg.teacher, cfg.input_size)
            self.teacher_side = TeacherSide(cfg, proc, teacher, len(self.data.class_names),
                                            (self.data.train_ds, self.data.unlabelled_ds), cache)
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
        self.model = Forward(self.net, features=distill)
        if proc.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(
                self.model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)

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
        """Say before training what will run where and for about how long (stderr; also logged)."""
        import sys

        cfg, proc = self.cfg, self.proc
        remaining = max(0, self.stop_at - self.step)
        step_s = self.estimate_step_s()
        total_s = step_s * remaining
        info = {"device": str(proc.device), "processes": proc.world, "preset": cfg.preset, "steps": remaining,
                "estimated_step_s": round(step_s, 5), "estimated_s": round(total_s, 3)}
        if not cfg.quiet and proc.is_main:
            lines = [f"{cfg.mode} {cfg.arch} on {proc.device} ({proc.world} process{'es' if proc.world > 1 else ''}), "
                     f"preset {cfg.preset}: {cfg.input_size} px, batch {cfg.batch_size}, {cfg.epochs} epochs x "
                     f"{self.steps_per_epoch} steps" + (f", stopping at step {self.stop_at}" if
                                                        self.stop_at < self.total_steps else "") +
                     f"; {remaining} steps to go at about {step_s:.2f} s/step (measured here): "
                     f"about {format_duration(total_s)}"]
            if proc.device.type == "cpu" and cfg.preset == "paper":
                lines.append("note: the paper preset (384 px, 30 epochs) is sized for a GPU; on a CPU "
                             "--preset demo trains in minutes")
            print("\n".join(lines), file=sys.stderr, flush=True)
        return info

    def run(self) -> dict:
        from tqdm import tqdm

        cfg, proc = self.cfg, self.proc
        estimate = self.announce() if proc.is_main else {}
        t_start = time.perf_counter()
        self.log.write(event="resume" if self.resumed else "start", step=self.step, epoch=self.epoch,
                       world_size=proc.world, device=str(proc.device), steps_per_epoch=self.steps_per_epoch,
                       total_steps=self.total_steps, target_steps=self.target_steps, config=cfg.to_flat_dict(),
                       train_cases=len(self.data.train_ids), train_slices=len(self.data.train_ds),
                       unlabelled_slices=len(self.data.unlabelled_ds) if self.data.unlabelled_ds else 0,
                       estimate=estimate)
        bar = tqdm(total=self.target_steps, initial=self.step, disable=cfg.quiet or not proc.is_main, unit="step",
                   desc=f"{cfg.mode} {cfg.arch}", dynamic_ncols=True)
        step_times: list[float] = []
        saved_at = self.step if self.resumed else -1
        while self.epoch < cfg.epochs and self.step < self.stop_at:
            batches = self.batches(self.epoch)[self.in_epoch:]
            if self.teacher_side is not None and self.teacher_side.cache is not None:
                orientations = [ors.tolist() for _, _, ors in self.loader(self.epoch, batches)]
                kd_batches = [[key for key, m in zip(b, self.kd_items(b)) if m] for b in batches]
                kd_orients = [[o for o, m in zip(ors, self.kd_items(b)) if m] for b, ors in zip(batches, orientations)]
                record = self.teacher_side.prepare_epoch(self.epoch, kd_batches, kd_orients)
                if record:
                    self.log.write(**record)
            self.model.train()
            t0 = time.perf_counter()
            for batch, (images, labels, ors) in zip(batches, self.loader(self.epoch, batches)):
                images = images.to(proc.device, non_blocking=True).float()
                labels = labels.to(proc.device, non_blocking=True).long()
                items = [(src, idx, int(o)) for (src, idx, _), o in zip(batch, ors)]
                out = self.train_step(images, labels, items)
                t1 = time.perf_counter()
                step_times.append(t1 - t0)
                if self.step % cfg.log_every == 0 or self.step == self.target_steps:
                    values = reduce_terms(out["terms"], proc)
                    rate = len(images) * proc.world / (t1 - t0)
                    self.log.write(event="step", epoch=self.epoch, step=self.step, lr=out["lr"], loss=values,
                                   step_s=round(t1 - t0, 4), samples_per_s=round(rate, 2))
                    bar.set_postfix(loss=f"{values['total']:.4f}", img_s=f"{rate:.1f}")
                bar.update(1)
                t0 = time.perf_counter()
                if self.step >= self.stop_at:
                    break
            if self.in_epoch >= self.steps_per_epoch:
                self.epoch, self.in_epoch = self.epoch + 1, 0
                self.validation()
                self.checkpoint(finished=self.step >= self.target_steps)
                saved_at = self.step
        bar.close()
        if saved_at != self.step:
            self.validation()
            self.checkpoint(finished=self.step >= self.target_steps)
        proc.barrier()
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


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; write the checkpoint (every epoch and at the end) and its log.
    Returns a summary: out, log, steps, epoch, val_dice, seconds, median step time (and the
    teacher cache's size and times when one is used)."""
    cfg.validate()
    proc = setup_processes(cfg.device)
    try:
        return TrainingRun(cfg, proc).run()
    finally:
        proc.close()


def params_sha256(net: nn.Module) -> str:
    """Digest of the trainable parameters (not BN buffers, which DDP ranks keep per process)."""
    h = hashlib.sha256()
    for _, p in net.named_parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def build_checkpoint(cfg: TrainConfig, net: nn.Module, class_names, task: str, window, train_state: dict,
                     metrics: dict, t_ckpt: dict | None, spacing: dict | None = None) -> dict:
    teacher = None
    if t_ckpt is not None:
        teacher = {"path": str(Path(cfg.teacher).resolve()), "sha256": sha256_file(cfg.teacher), "arch": t_ckpt["arch"]}
    distilled = cfg.mode == "distill"
    preprocessing = {"window": [float(v) for v in window], "input_size": [cfg.input_size, cfg.input_size],
                     "orientation": "RAS", "slice_axis": "axial",
                     "normalisation": {"type": "window-linear", "range": [-1, 1]}}
    if spacing:   # voxel sizes of the training cases: the bundle's preprocessing.spacing
        preprocessing["spacing"] = spacing
    return {
        "format": "regionkd-checkpoint/1",
        "arch": cfg.arch,
        "role": "teacher" if cfg.mode == "teacher" else "student",
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "task": task,
        "preprocessing": preprocessing,
        "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "train_state": train_state,
        "provenance": {"teacher": teacher, "kd": list(cfg.kd) if distilled else [],
                       "kd_levels": list(cfg.kd_levels) if distilled else [],
                       "alpha": cfg.alpha, "beta1": cfg.beta1, "beta2": cfg.beta2, "temperature": cfg.temperature,
                       "pmd_balance": cfg.pmd_balance if distilled else None,
                       "unlabelled": str(Path(cfg.unlabelled).resolve()) if distilled and cfg.unlabelled else None,
                       "labelled_cases": cfg.labelled_cases,
                       "data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "package_version": package_version(),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "metrics": metrics,
        "config": cfg.to_flat_dict(),
    }

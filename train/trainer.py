"""One training loop for the teacher, the baseline student and the distilled student.

    L = L_seg + alpha * PMD + beta1 * sum_levels IMD + beta2 * sum_levels RAD

The teacher of a distillation run is frozen, in eval mode, and runs without grad.

Repeatability: every slice's augmentation is seeded from (seed, epoch, position in the epoch)
inside a private RNG scope, the epoch's slice order from (seed, epoch), and the global RNGs
(dropout) are saved in the checkpoint. So a CPU run is repeatable, and a run resumed from a
checkpoint (even one written mid-epoch by --max-steps) continues exactly where it stopped.

Multi-process: under `torchrun` (WORLD_SIZE > 1) the network is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU); every rank draws the same epoch order and
takes every world_size-th slice of it (the DistributedSampler scheme); `batch_size` is per
process; only rank 0 writes the checkpoint and the log.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from regionkd.sdk.bundle import sha256_file
from regionkd.sdk.errors import InputError

from .checkpoint import CheckpointError, load_checkpoint, load_model, log_path_for, save_checkpoint
from .config import RESUME_IDENTITY, TrainConfig


# ----------------------------------------------------------------------------- processes / devices

@dataclass
class Proc:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def setup_processes(device_name: str) -> Proc:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise one process."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Proc(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Proc(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


# ----------------------------------------------------------------------------- RNG state <-> plain types

def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- sampling

class SeededItems(Dataset):
    """Items addressed as (index, seed): the base dataset's augmentation runs with numpy, random
    and torch seeded from `seed`, inside a scope that restores the caller's RNG states."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                np.random.seed(seed)
                random.seed(seed)
                torch.manual_seed(seed)
                return self.base[int(index)]
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def epoch_batches(train_ds, epoch: int, cfg: TrainConfig, steps_per_epoch: int, rank: int = 0,
                  world: int = 1) -> list[list[tuple[int, int]]]:
    """This rank's batches of (slice index, augmentation seed) for one epoch. Every rank draws the
    same global order (lesion oversampling seeded by (seed, epoch)) and keeps every world-th item."""
    from .data.slices import lesion_oversampling_sampler

    n_total = steps_per_epoch * cfg.batch_size * world
    sampler = lesion_oversampling_sampler(train_ds, lesion_fraction=cfg.lesion_fraction, num_samples=n_total,
                                          seed=derived_seed(cfg.seed, epoch, 1))
    indices = [int(i) for i in sampler][:n_total]
    if len(indices) < n_total:
        raise RuntimeError(f"sampler gave {len(indices)} indices, expected {n_total}")
    seeds = np.random.default_rng([cfg.seed, epoch, 2]).integers(0, 2**31 - 1, size=n_total)
    mine = list(zip(indices, (int(s) for s in seeds)))[rank::world]
    b = cfg.batch_size
    return [mine[i * b:(i + 1) * b] for i in range(steps_per_epoch)]


# ----------------------------------------------------------------------------- networks and losses

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


class DistillLoss:
    """L_seg + alpha*PMD + beta1*IMD + beta2*RAD, every term reported separately (None if unused)."""

    def __init__(self, cfg: TrainConfig, num_classes: int, teacher: nn.Module | None,
                 teacher_context=contextlib.nullcontext):
        from . import losses

        self.L, self.cfg, self.num_classes, self.teacher = losses, cfg, num_classes, teacher
        self.kd = set(cfg.kd) if teacher is not None else set()
        self.teacher_context = teacher_context   # autocast for the teacher's forward on CUDA

    def __call__(self, images, target, s_logits, s_feats) -> dict:
        L, cfg = self.L, self.cfg
        terms = {"seg": L.segmentation_loss(s_logits.float(), target), "pmd": None, "imd": None, "rad": None}
        total = terms["seg"]
        if self.kd:
            with torch.no_grad(), self.teacher_context():
                t_logits, t_feats = self.teacher.forward_features(images)
            if "pmd" in self.kd:
                terms["pmd"] = L.pmd_loss(s_logits.float(), t_logits.float(), temperature=cfg.temperature)
                total = total + cfg.alpha * terms["pmd"]
            if "imd" in self.kd:
                terms["imd"] = sum(L.imd_loss(s_feats[lv].float(), t_feats[lv].float()) for lv in cfg.kd_levels)
                total = total + cfg.beta1 * terms["imd"]
            if "rad" in self.kd:
                onehot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2).float()
                terms["rad"] = sum(L.rad_loss(s_feats[lv].float(), t_feats[lv].float(), onehot)
                                   for lv in cfg.kd_levels)
                total = total + cfg.beta2 * terms["rad"]
        terms["total"] = total
        return terms


LOSS_KEYS = ("seg", "pmd", "imd", "rad", "total")


def reduce_terms(terms: dict, proc: Proc) -> dict:
    """Loss terms as floats, averaged over processes."""
    vals = torch.tensor([float(terms[k].detach()) if terms[k] is not None else float("nan") for k in LOSS_KEYS],
                        dtype=torch.float64, device=proc.device if proc.device.type == "cuda" else "cpu")
    if proc.world > 1:
        dist.all_reduce(vals)
        vals /= proc.world
    return {k: (None if np.isnan(v) else round(float(v), 6)) for k, v in zip(LOSS_KEYS, vals.tolist())}


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(net: nn.Module, val_ds, cfg: TrainConfig, class_names, proc: Proc) -> dict:
    """Dice per foreground class over the validation split's slices (global over the slices;
    None when a class is absent from both prediction and reference)."""
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


def autocast(proc: Proc, cfg: TrainConfig):
    if proc.device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


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


# ----------------------------------------------------------------------------- the run

def task_info(task_name: str):
    """(class_names, window) of a task (regionkd.train.data.tasks)."""
    from .data.tasks import get_task

    task = get_task(task_name)
    return list(task.class_names), [float(v) for v in task.window]


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


def check_resumable(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    old = ckpt.get("config", {})
    new = cfg.to_flat_dict()
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_IDENTITY if old.get(k) != new.get(k)]
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


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; write the checkpoint (every epoch and at the end) and its log.
    Returns a summary: out, log, steps, epoch, val_dice, seconds, median step time."""
    from tqdm import tqdm

    from .data import open_dataset
    from .data.slices import SliceCache, SliceDataset, split_cases
    from .models import create_model

    cfg.validate()
    data_root = Path(cfg.data)
    if not data_root.is_dir():
        raise InputError(f"--data {data_root}: not a directory")
    out = Path(cfg.out)
    proc = setup_processes(cfg.device)
    t_start = time.perf_counter()
    try:
        ds = open_dataset(data_root)
        class_names, window = task_info(ds.task)
        size = (cfg.input_size, cfg.input_size)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / f"slice-cache-{cfg.input_size}"
        if proc.is_main:
            cache = SliceCache.build(data_root, cache_dir, window=None, input_size=size, progress=not cfg.quiet)
        proc.barrier()
        if not proc.is_main:
            cache = SliceCache.open(cache_dir)
        window = [float(v) for v in getattr(cache, "window", window)]
        train_ids, val_ids = split_cases(list(ds.case_ids), val_fraction=cfg.val_fraction, seed=cfg.split_seed)
        if not train_ids:
            raise InputError(f"--data {data_root}: no training cases after the validation split")
        train_ds = SliceDataset(cache, train_ids, augment=cfg.augment)
        val_ds = SliceDataset(cache, val_ids, augment=False) if val_ids else None
        if len(train_ds) == 0:
            raise InputError(f"--data {data_root}: the training cases hold no slices")

        seed_everything(cfg.seed)
        try:
            net = create_model(cfg.arch, num_classes=len(class_names)).to(proc.device)
        except ValueError as exc:
            raise InputError(f"--arch: {exc}") from exc
        teacher, t_ckpt = (None, None)
        if cfg.mode == "distill":
            teacher, t_ckpt = load_teacher(cfg, class_names, window, proc.device)
        loss_fn = DistillLoss(cfg, len(class_names), teacher, teacher_context=lambda: autocast(proc, cfg))

        samples = cfg.samples_per_epoch or len(train_ds)
        steps_per_epoch = max(1, samples // (cfg.batch_size * proc.world))
        total_steps = cfg.epochs * steps_per_epoch
        target_steps = min(total_steps, cfg.max_steps or total_steps)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        use_amp = proc.device.type == "cuda" and cfg.amp
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        epoch = step = in_epoch = 0
        metrics: dict = {}
        resumed = cfg.resume and out.is_file()
        if resumed:
            ckpt = load_checkpoint(out)   # CPU: RNG states must stay CPU tensors; Adam moves its state
            check_resumable(ckpt, cfg, out)
            st = ckpt["train_state"]
            net.load_state_dict(ckpt["model_state"])
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            if use_amp and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            if int(st.get("world_size", 1)) != proc.world:
                raise CheckpointError(f"--resume {out}: written by {st.get('world_size')} process(es), "
                                      f"resumed with {proc.world}; the epoch plan would differ")
            set_rng_state(st["rng"])
            epoch, step, in_epoch = int(st["epoch"]), int(st["step"]), int(st["step_in_epoch"])
            metrics = ckpt.get("metrics", {})
        log = JsonlLog(log_path_for(out), enabled=proc.is_main, fresh=not resumed)
        log.write(event="resume" if resumed else "start", step=step, epoch=epoch, world_size=proc.world,
                  device=str(proc.device), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  target_steps=target_steps, config=cfg.to_flat_dict())

        model = Forward(net, features=bool(loss_fn.kd))
        if proc.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)

        def checkpoint_now(finished: bool):
            if not proc.is_main:
                return
            state = {"epoch": epoch, "step": step, "step_in_epoch": in_epoch, "steps_per_epoch": steps_per_epoch,
                     "total_steps": total_steps, "world_size": proc.world, "finished": finished,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if use_amp else {}, "rng": rng_state()}
            save_checkpoint(out, build_checkpoint(cfg, net, class_names, ds.task, window, state, metrics, t_ckpt,
                                                  spacing=cache.spacing_range(train_ids)))

        loader_gen = torch.Generator()
        bar = tqdm(total=target_steps, initial=step, disable=cfg.quiet or not proc.is_main, unit="step",
                   desc=f"{cfg.mode} {cfg.arch}", dynamic_ncols=True)
        step_times: list[float] = []
        saved_at = step if resumed else -1
        while epoch < cfg.epochs and step < target_steps:
            batches = epoch_batches(train_ds, epoch, cfg, steps_per_epoch, proc.rank, proc.world)[in_epoch:]
            loader_gen.manual_seed(derived_seed(cfg.seed, epoch, 3))
            loader = DataLoader(SeededItems(train_ds), batch_sampler=batches, num_workers=cfg.workers,
                                generator=loader_gen, pin_memory=proc.device.type == "cuda")
            model.train()
            t0 = time.perf_counter()
            for images, labels in loader:
                images = images.to(proc.device, non_blocking=True).float()
                labels = labels.to(proc.device, non_blocking=True).long()
                with autocast(proc, cfg):
                    s_logits, s_feats = model(images)
                terms = loss_fn(images, labels, s_logits, s_feats)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(terms["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                in_epoch += 1
                t1 = time.perf_counter()
                step_times.append(t1 - t0)
                if step % cfg.log_every == 0 or step == target_steps:
                    values = reduce_terms(terms, proc)
                    log.write(event="step", epoch=epoch, step=step, lr=lr, loss=values,
                              step_s=round(t1 - t0, 4), samples_per_s=round(cfg.batch_size * proc.world / (t1 - t0), 2))
                    bar.set_postfix(loss=f"{values['total']:.4f}", img_s=f"{cfg.batch_size * proc.world / (t1 - t0):.1f}")
                bar.update(1)
                t0 = time.perf_counter()
                if step >= target_steps:
                    break
            if in_epoch >= steps_per_epoch:
                epoch, in_epoch = epoch + 1, 0
                metrics = run_validation(net, val_ds, cfg, class_names, proc, epoch, step, log)
                checkpoint_now(finished=step >= target_steps)
                saved_at = step
        bar.close()
        if saved_at != step:
            metrics = run_validation(net, val_ds, cfg, class_names, proc, epoch, step, log)
            checkpoint_now(finished=True)
        proc.barrier()
        tail = step_times[2:] if len(step_times) > 4 else step_times
        summary = {"out": str(out), "log": str(log_path_for(out)), "steps": step, "epoch": epoch,
                   "val_dice": metrics.get("val", {}), "seconds": round(time.perf_counter() - t_start, 2),
                   "step_s_median": round(float(np.median(tail)), 4) if tail else None, "world_size": proc.world, "rank": proc.rank,
                   "params_sha256": params_sha256(net)}
        log.write(event="end", **summary)
        return summary
    finally:
        if proc.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def params_sha256(net: nn.Module) -> str:
    """Digest of the trainable parameters (not BN buffers, which DDP ranks keep per process)."""
    h = hashlib.sha256()
    for _, p in net.named_parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def run_validation(net, val_ds, cfg, class_names, proc, epoch, step, log) -> dict:
    if val_ds is None or len(val_ds) == 0:
        return {}
    dice = validate(net, val_ds, cfg, class_names, proc)
    log.write(event="epoch", epoch=epoch, step=step, val_dice=dice)
    return {"val": dice, "epoch": epoch, "step": step}


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
                       "data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "package_version": package_version(),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "metrics": metrics,
        "config": cfg.to_flat_dict(),
    }

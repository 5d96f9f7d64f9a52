"""Processes, devices and random state of a training run.

Under `torchrun` (WORLD_SIZE > 1) every process joins one process group (gloo on CPU, nccl on
GPU) and the network is wrapped in DistributedDataParallel; otherwise the run is one process.
RNG states are turned into plain types so that the checkpoint loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from regionkd.sdk.errors import InputError


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

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


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


def autocast(proc: Proc, cfg):
    """Mixed precision (float16) on CUDA when `cfg.amp`; nothing otherwise."""
    if proc.device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


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


def parallel_model(net: nn.Module, features: bool, proc: Proc) -> nn.Module:
    """`net` as the training step calls it (`Forward`), in DistributedDataParallel when the run
    has more than one process."""
    model = Forward(net, features)
    if proc.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    return model


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

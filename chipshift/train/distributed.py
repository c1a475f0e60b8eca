"""Data parallelism over `torchrun` processes, with the collective the device layer names.

Every rank holds the whole model and its own share of each global batch. After the
micro-batches of a step, one all-reduce averages the flattened gradients (what DDP does
in its last bucket), so objectives may call the model any number of times per step
(DPO calls it for chosen and rejected) without DDP's forward hooks in the way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chipshift.devices import Device


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device: Device) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        device.set_current()
        dist.init_process_group(backend=device.collective)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    """Average .grad over ranks with one all-reduce of a flat buffer."""
    if not world.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset:offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def all_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.all_reduce(values)
        values /= world.size
    return values


def any_flag(flag: bool, world: World) -> bool:
    """True on every rank when any rank raised the flag."""
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()

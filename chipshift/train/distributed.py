"""Data parallelism over `torchrun` processes, with the collective the device layer names.

Two layouts (`run.parallel`), the same results up to float rounding:

  ddp   every rank holds the whole model and its own share of each global batch. After
        the micro-batches of a step, one all-reduce averages the flattened gradients
        (what DDP does in its last bucket), so objectives may call the model any number
        of times per step (DPO calls it for chosen and rejected) without DDP's forward
        hooks in the way.
  fsdp  FSDP2 (`fully_shard`): each transformer block, then the root, is sharded over the
        ranks, so parameters, gradients and optimizer moments take 1/N of the memory.
        Blocks are all-gathered for their forward and backward; gradients are
        reduce-scattered at the end of the last micro-batch's backward (the earlier ones
        accumulate unsharded, without communication). Checkpoints gather whole tensors
        (`full_tensor`) and restore by re-sharding them, so they do not depend on N.

Ranks are global (over all nodes): rank 0 of the whole job is the one that writes. Every
collective gives up after `run.collective_timeout_s`; a heartbeat in the store the group was
set up through (torchrun's agent's, or rank 0's) then tells which rank stopped answering
(`Heartbeat`, `silent_ranks`), so a stopped or hung rank ends the job with a message naming
it instead of a wait without end.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from chipshift.devices import Device
from chipshift.errors import ChipshiftError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    restarted: bool = False  # an elastic restart of this torchrun job (see `init`)
    heartbeat: Heartbeat | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


HEARTBEAT_S = 1.0  # how often each rank says it is alive (a stopped process stops saying it)
STORE_WAIT_S = 5.0  # how long a question to the store may take before its holder counts as silent


def init(device: Device, timeout_s: float = 1800.0) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); every collective
    gives up after `timeout_s` seconds. `World.restarted` says, the same on every rank,
    whether torchrun restarted this group after a failure."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if size <= 1:
        return World(restarted=restarted)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and _agent_store():
        raise ChipshiftError("torchrun --max-restarts with the rendezvous store shared with the workers: a "
                             "restarted group can read the addresses of the failed one and fail again (pytorch "
                             "issue #135712); run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    joining = not dist.is_initialized()  # else a caller joined (SFT/DPO set up before the loop)
    if joining:
        device.set_current()
        dist.init_process_group(backend=device.collective, timeout=timedelta(seconds=timeout_s))
    world = World(dist.get_rank(), dist.get_world_size())
    # the agents of nodes whose own workers did not fail restart them with a count of 0
    world.restarted = any_flag(restarted, world, device)
    if joining:
        world.heartbeat = Heartbeat(_store(), world.rank)
    return world


def shutdown(world: World) -> None:
    if world.heartbeat is not None:
        world.heartbeat.stop()
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def _agent_store() -> bool:
    """Whether the store lives in torchrun's agent (else in the rank-0 worker)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _store() -> dist.TCPStore:
    """A client of the store the process group was set up through (at MASTER_ADDR:MASTER_PORT),
    with short waits: it serves only the heartbeat."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_WAIT_S), wait_for_workers=False)


def _beat_key(rank: int) -> str:
    return f"chipshift/heartbeat/{rank}"  # only its movement counts, not its value


class Heartbeat:
    """A daemon thread that adds 1 to this rank's counter in the store every HEARTBEAT_S.
    The thread runs while the main thread waits in a collective or computes (both release
    the GIL), and stops with the process: a counter that stands still names a rank that is
    stopped (SIGSTOP), dead or frozen whole."""

    def __init__(self, store: dist.TCPStore, rank: int) -> None:
        self.key, self._done, self._store = _beat_key(rank), threading.Event(), store
        self._store.add(self.key, 1)
        self._thread = threading.Thread(target=self._beat, name="chipshift-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            try:
                self._store.add(self.key, 1)
            except Exception:  # the store's host is gone: the job is ending anyway
                return

    def stop(self) -> None:
        self._done.set()


def silent_ranks(world: World, watch_s: float = 3 * HEARTBEAT_S) -> list[int]:
    """The other ranks whose heartbeat did not move for `watch_s` seconds."""
    others = [r for r in range(world.size) if r != world.rank]
    answer: list[list[int]] = []

    def ask() -> None:
        store = _store()
        before = {r: store.add(_beat_key(r), 0) for r in others}
        time.sleep(watch_s)
        answer.append([r for r in others if store.add(_beat_key(r), 0) == before[r]])

    # in a thread: a store held by a stopped process accepts the connection and never answers,
    # whatever the client's timeout
    asking = threading.Thread(target=ask, name="chipshift-silent-ranks", daemon=True)
    asking.start()
    asking.join(watch_s + STORE_WAIT_S)
    if answer:
        return answer[0]
    return [0] if world.rank != 0 and not _agent_store() else []  # the store is rank 0's: silent with it


def collective_failure(world: World, exc: BaseException, timeout_s: float, where: str) -> str | None:
    """One line for a collective that failed because other ranks went silent (naming them,
    and what this rank saw), or None when every other rank still has a heartbeat."""
    silent = silent_ranks(world)
    if not silent:
        return None
    who = f"rank {silent[0]}" if len(silent) == 1 else "ranks " + ", ".join(map(str, silent))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"{who} of {world.size} stopped responding (no heartbeat for {3 * HEARTBEAT_S:g} s: stopped, "
            f"hung or dead); rank {world.rank} gave up {where} (run.collective_timeout_s = {timeout_s:g}): "
            f"{first}")


def shard(model: torch.nn.Module, device: Device, world: World,
          compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over all ranks: each block of `model.layers`, then the root (embedding, final
    norm, output projection), in place. With `compute_dtype`, parameters stay float32 in
    their shards (the master copy) and are all-gathered in `compute_dtype` for the forward
    and backward; gradients are reduced in float32.
    """
    # imported here: torch.distributed.fsdp / .tensor take about a second to import, a cost
    # only sharded runs should pay (hence also the duck-typed checks below)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype is not None else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # objectives call forward_hidden (and then read the output weight), not forward:
    # the root's all-gather must run for it too; the root stays unsharded until backward
    register_fsdp_forward_method(model, "forward_hidden")


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Sharded models: reduce-scatter gradients in this backward (True), or let them
    accumulate unsharded without communication (False, for all but the last micro-batch).
    Parameters are still resharded after each backward: the blocks are freed after every
    forward anyway, so keeping them would cost memory and save no all-gather."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
        model.set_requires_gradient_sync(sync)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it); plain
    tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: this rank's shard when `like` is sharded (every rank
    holds the same `full`, so no data moves), else `full` on `like`'s device."""
    if hasattr(like, "device_mesh"):  # a DTensor
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return full.to(like.device)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so that their global 2-norm is at most `max_norm`; returns the norm
    before clipping. For sharded gradients the norm is over all ranks' shards."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


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


def any_flag(flag: bool, world: World, device: Device | None = None) -> bool:
    """True on every rank when any rank raised the flag (`device`: where the collective
    takes its tensors, when not the CPU)."""
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device.torch_device if device else None)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()

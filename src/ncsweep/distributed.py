"""A run across ranks: joining the process group, and the reductions and broadcasts it needs.

Every helper takes an optional process group (``None``: the default group) and does nothing
when torch.distributed is unavailable, not initialised, or the group has one rank, so library
code calls them unconditionally and a one-process run pays nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)
_ROLL_CALL = "ncsweep/roll-call/"
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                 "broken pipe")
_timeout_s = [1800.0]
HEARTBEAT_MAX_S = 60.0


class _Heartbeat(threading.Thread):
    """While joined: a warning for every ``every`` seconds in which this rank finished no
    exchange with the others, so a wait on a rank that hangs is never silent."""

    def __init__(self, every: float) -> None:
        super().__init__(name="ncsweep-rank-heartbeat", daemon=True)
        self.every = every
        self.last = time.monotonic()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            idle = time.monotonic() - self.last
            if idle >= self.every:
                log.warning("rank %d of %d: nothing exchanged with the other ranks for %.0f s "
                            "(a long step or eval pass, or a rank that hangs: a collective "
                            "fails after hydra.launcher.rank_timeout_s = %g s)", rank(),
                            world_size(), idle, _timeout_s[0])


_heartbeat: list[_Heartbeat] = []


def _exchanged() -> None:
    """A collective finished: the other ranks answered."""
    if _heartbeat:
        _heartbeat[0].last = time.monotonic()


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised and `group` spans more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: ProcessGroup | None = None) -> int:
    """The number of ranks in `group`; 1 outside a distributed run."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """The device the group's backend reduces on: this rank's CUDA device for NCCL, else CPU."""
    if is_distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` in place over the ranks of `group` (e.g. loss sums, correct counts)."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        _exchanged()
    return tensor


def all_reduce_max(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise maximum of `tensor` in place over the ranks of `group`."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        _exchanged()
    return tensor


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in `group`; 0 outside a distributed run."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Only rank 0 writes the run folder, metrics, W&B run and checkpoints."""
    return rank() == 0


def join(rank_: int, world: int, local_rank: int, master_addr: str, master_port: int,
         timeout_s: float) -> None:
    """Join the run's process group: NCCL for CUDA tensors where there is a GPU, gloo for CPU.

    A collective that waits longer than ``timeout_s`` (a rank that hangs) raises instead of
    blocking forever; a rank that dies breaks its peers' sockets at once.
    """
    if dist.is_initialized():
        return
    _timeout_s[0] = float(timeout_s)
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank_),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                            rank=rank_, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined (pid %d, %s:%d, %s)", rank_, world, os.getpid(),
             master_addr, master_port, "NCCL and gloo" if cuda else "gloo")
    _heartbeat[:] = [_Heartbeat(min(HEARTBEAT_MAX_S, max(1.0, timeout_s / 4)))]
    _heartbeat[0].start()


def join_from_submitit(timeout_s: float) -> bool:
    """Join when this submitit task is one of several (tasks_per_node x nodes); False if alone."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return False
    master = submitit.helpers.TorchDistributedEnvironment()
    join(env.global_rank, env.num_tasks, env.local_rank, master.master_addr,
         master.master_port, timeout_s)
    return True


def leave() -> None:
    """Tear the process group down (end of a task); no-op when there is none."""
    if _heartbeat:
        _heartbeat.pop().stopped.set()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device becomes this rank's own GPU in a distributed run."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a stop signal reaching one rank)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    return bool(all_reduce_max(value).item())


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (a loaded checkpoint, a skip decision)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    _exchanged()
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank, before an eval pass."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
    _exchanged()


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (sizes differ by at most one)."""
    world, me = world_size(), rank()
    return slice(me * n // world, (me + 1) * n // world)


def store() -> Any:
    """The default group's key-value store (the rendezvous, hosted by rank 0)."""
    return dist.distributed_c10d._get_default_store()


def absent_ranks(wait_s: float = 5.0) -> list[int]:
    """After a collective failed: the ranks that do not answer a roll call within ``wait_s``.

    Every rank that is still alive and has seen the failure answers; rank 0 hosts the store,
    so when the store itself is gone the answer is rank 0.
    """
    world, me = world_size(), rank()
    try:
        kv = store()
        kv.set(f"{_ROLL_CALL}{me}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not kv.check([f"{_ROLL_CALL}{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # the store's host (rank 0) is gone
        return [0] if me != 0 else []


def timeout_s() -> float:
    """The collective timeout this process joined with."""
    return _timeout_s[0]


def is_comm_failure(err: BaseException) -> bool:
    """An error of the communication itself (a peer gone, a collective timed out)."""
    return isinstance(err, dist.DistError) or any(m in str(err).lower() for m in _COMM_MARKERS)

"""Reductions across the ranks of a torch.distributed run; no-ops in a one-process run.

Every helper takes an optional process group (``None``: the default group) and does nothing
when torch.distributed is unavailable, not initialised, or the group has one rank, so library
code calls them unconditionally and a one-process run pays nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


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
    return tensor


def all_reduce_max(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise maximum of `tensor` in place over the ranks of `group`."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor

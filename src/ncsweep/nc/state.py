"""Pass-1 state of NCAccumulator and its exact combination across accumulators and ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ncsweep import distributed
from ncsweep.nc.tensors import F64, _symmetric_from_upper

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _State(NamedTuple):
    """Class counts, class means, per-class squared deviations, within-class scatter (d x d,
    block-upper part complete)."""

    counts: torch.Tensor
    means: torch.Tensor
    sq_dev: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def zeros(cls, k: int, d: int, device: torch.device) -> _State:
        return cls(torch.zeros(k, dtype=F64, device=device),
                   torch.zeros((k, d), dtype=F64, device=device),
                   torch.zeros(k, dtype=F64, device=device),
                   torch.zeros((d, d), dtype=F64, device=device))


def _combine(parts: Sequence[_State], total: Callable[[torch.Tensor], torch.Tensor]) -> _State:
    """Chan et al.'s parallel merge of parts whose sums `total` completes (over ranks, or not).

    n_k = sum_p n_pk, mu_k = sum_p n_pk mu_pk / n_k; the scatter and squared deviations add
    sum_p n_pk (mu_pk - mu_k)(mu_pk - mu_k)^T, each part centred on the merged means, so no
    E[h h^T] - mu mu^T cancellation occurs. A class absent from a part (n_pk = 0) adds nothing.
    """
    counts = total(sum(p.counts for p in parts))
    means = total(sum(p.counts[:, None] * p.means for p in parts))
    means /= counts.clamp(min=1)[:, None]
    scatter = torch.zeros_like(parts[0].scatter)
    sq_dev = torch.zeros_like(parts[0].sq_dev)
    for p in parts:
        delta = p.means - means
        weighted = p.counts[:, None] * delta
        scatter += _symmetric_from_upper(p.scatter)
        scatter.addmm_(delta.T, weighted)
        sq_dev += p.sq_dev + (weighted * delta).sum(dim=1)
    return _State(counts, means, total(sq_dev), total(scatter))


def _all_reduce_state(
    state: _State | None, k: int, dropped: bool, group: ProcessGroup | None
) -> tuple[_State | None, bool]:
    """The state of all ranks of `group` on every rank, and whether any rank dropped its kept
    features; a rank without data takes part with zeros (d comes from the others)."""
    device = distributed.collective_device(group)
    d = 0 if state is None else state.means.shape[1]
    header = torch.tensor([d, int(dropped)], dtype=torch.int64, device=device)
    distributed.all_reduce_max(header, group)
    d_all, any_dropped = int(header[0]), bool(header[1])
    if d_all == 0:
        return None, any_dropped
    if state is not None and d != d_all:
        raise ValueError(f"all_reduce got features of width d={d} here but d={d_all} elsewhere")
    home = state.means.device if state is not None else device
    local = (_State.zeros(k, d_all, device) if state is None
             else _State(*(t.to(device) for t in state)))

    def total(t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(t.contiguous(), group)

    merged = _combine([local], total)
    return _State(*(t.to(home) for t in merged)), any_dropped

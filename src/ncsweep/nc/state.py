"""Pass-1 state of NCAccumulator: its update by float64 chunks and its exact combination
across accumulators and ranks, all by Chan et al.'s parallel merge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ncsweep import distributed
from ncsweep.nc.tensors import F64, add_gram_upper, symmetric_from_upper

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ONEHOT_MAX_CLASSES = 64


class State(NamedTuple):
    """Class counts, class means, per-class squared deviations, within-class scatter (d x d,
    block-upper part complete)."""

    counts: torch.Tensor
    means: torch.Tensor
    sq_dev: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def zeros(cls, k: int, d: int, device: torch.device) -> State:
        """The state of no data: k classes of width d on `device`."""
        return cls(torch.zeros(k, dtype=F64, device=device),
                   torch.zeros((k, d), dtype=F64, device=device),
                   torch.zeros(k, dtype=F64, device=device),
                   torch.zeros((d, d), dtype=F64, device=device))


def add_chunk(state: State, x: torch.Tensor, labels: torch.Tensor) -> State:
    """The state with float64 chunk x merged in (Chan et al.); x is centred in place by its
    class means, and the state's means, squared deviations and scatter are updated in place."""
    k = state.counts.shape[0]
    n_b = torch.bincount(labels, minlength=k).to(F64)
    sums = torch.zeros((k, x.shape[1]), dtype=F64, device=x.device).index_add_(0, labels, x)
    if not bool(torch.isfinite(sums).all()):
        raise ValueError("features contain NaN or inf")
    means_b = sums / n_b.clamp(min=1)[:, None]
    if k <= ONEHOT_MAX_CLASSES:  # a thin product beats gathering an N x d block of means
        x.addmm_(torch.nn.functional.one_hot(labels, k).to(F64), means_b, alpha=-1.0)
    else:
        x.sub_(means_b[labels])
    sq_b = torch.zeros(k, dtype=F64, device=x.device)
    sq_b.index_add_(0, labels, torch.linalg.vector_norm(x, dim=1).square())
    total = state.counts + n_b
    delta = means_b - state.means
    pair_weight = state.counts * n_b / total.clamp(min=1)
    add_gram_upper(state.scatter, x)
    both = torch.nonzero(pair_weight).flatten()
    if both.numel():
        add_gram_upper(state.scatter, pair_weight[both, None].sqrt() * delta[both])
    state.sq_dev.add_(sq_b + pair_weight * delta.square().sum(dim=1))
    state.means.add_(delta * (n_b / total.clamp(min=1))[:, None])
    return State(total, state.means, state.sq_dev, state.scatter)


def combine(parts: Sequence[State], total: Callable[[torch.Tensor], torch.Tensor]) -> State:
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
        scatter += symmetric_from_upper(p.scatter)
        scatter.addmm_(delta.T, weighted)
        sq_dev += p.sq_dev + (weighted * delta).sum(dim=1)
    return State(counts, means, total(sq_dev), total(scatter))


def all_reduce_state(
    state: State | None, k: int, dropped: bool, group: ProcessGroup | None
) -> tuple[State | None, bool]:
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
    local = (State.zeros(k, d_all, device) if state is None
             else State(*(t.to(device) for t in state)))

    def total(t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(t.contiguous(), group)

    merged = combine([local], total)
    return State(*(t.to(home) for t in merged)), any_dropped

"""One layer's class moments in float64: the state behind nc1, cdnv and trace_ratio.

Pass 1 keeps O(K d) per layer, class counts and float64 class sums, which add across
batches, accumulators and ranks. Everything squared waits for the final class means, so each
feature is centred by its exact class mean before squaring (``Within``): per-class squared
deviations (cdnv, tr(Sigma_W)) and, for nc1, Sigma_W only where Sigma_B^+ lives, the span of
the centred class means: with v_j the rows of ``between_inverse`` (min(K-1, d) of them),
tr(Sigma_W Sigma_B^+) = sum_j (v_j^T Sigma_W v_j) inverse_j. That is O(N d K) work instead of a
d x d scatter's O(N d^2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ncsweep import distributed
from ncsweep.nc.geometry import between_inverse, centred_means, separation_metrics
from ncsweep.nc.tensors import (
    F64,
    ArrayLike,
    as_features,
    as_tensor,
    check_classes,
    check_labels,
    check_tile_size,
    default_tile_size,
    float64_chunks,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SEPARATION_KEYS = ("nc1", "cdnv", "trace_ratio")
ONEHOT_MAX_CLASSES = 64


class Moments(NamedTuple):
    """Class counts and float64 class sums of the features: they add across batches and ranks."""

    counts: torch.Tensor
    sums: torch.Tensor

    @classmethod
    def zeros(cls, k: int, d: int, device: torch.device) -> Moments:
        """The moments of no data: k classes of width d on `device`."""
        return cls(torch.zeros(k, dtype=F64, device=device),
                   torch.zeros((k, d), dtype=F64, device=device))

    @property
    def means(self) -> torch.Tensor:
        """The class means, sums / counts (zero for a class without samples)."""
        return self.sums / self.counts.clamp(min=1)[:, None]


class Within:
    """Per-class sums of ||h - mu_y||^2 and sums of (v_j . (h - mu_y))^2 over the train
    features, against fixed (final) class means mu and the rows v_j of ``between_inverse``:
    N tr(Sigma_W) split by class, and N v_j^T Sigma_W v_j. Both add across batches and ranks."""

    def __init__(self, state: Moments) -> None:
        self.counts, self.means = state.counts, state.means
        self.basis = between_inverse(centred_means(self.counts, self.means)[1], self.counts)[0]
        self.sq_dev = torch.zeros_like(self.counts)
        self.projected = torch.zeros(self.basis.shape[0], dtype=F64, device=self.means.device)

    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch of (N, d) features, centred by their class means before squaring."""
        feats = as_features(features, self.means)
        labs = as_tensor(labels, feats.device)
        k = self.means.shape[0]
        check_labels(labs, feats.shape, k)
        labs = labs.long()
        for rows, x in float64_chunks(feats):
            if k <= ONEHOT_MAX_CLASSES:  # a thin product beats gathering an N x d block
                x.addmm_(torch.nn.functional.one_hot(labs[rows], k).to(F64), self.means,
                         alpha=-1.0)
            else:
                x.sub_(self.means[labs[rows]])
            self.projected += (x @ self.basis.T).square().sum(dim=0)
            self.sq_dev.index_add_(0, labs[rows], torch.linalg.vector_norm(x, dim=1).square())

    def totals(self) -> torch.Tensor:
        """The sums as one vector (projected, then sq_dev), for one all_reduce."""
        return torch.cat([self.projected, self.sq_dev])


class ClassStats:
    """Streaming class moments of one layer's features: ``update`` per batch, ``merge``,
    ``all_reduce`` across ranks, then ``metrics`` (nc1, cdnv, trace_ratio) given the
    ``Within`` sums of the same train features against the final means."""

    def __init__(self, num_classes: int, tile_size: int | None = None) -> None:
        check_classes(num_classes)
        self.num_classes = int(num_classes)
        self.tile_size = check_tile_size(tile_size)
        self.state: Moments | None = None

    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch of (N, d) features with their labels, any order, size or dtype."""
        feats = as_features(features, None if self.state is None else self.state.means)
        labs = as_tensor(labels, feats.device)
        check_labels(labs, feats.shape, self.num_classes)
        if feats.shape[0] == 0:
            return
        if self.state is None:
            self.state = Moments.zeros(self.num_classes, feats.shape[1], feats.device)
        labs = labs.long()
        sums = self.state.sums
        for rows, x in float64_chunks(feats):
            sums.index_add_(0, labs[rows], x)
        if not bool(torch.isfinite(sums).all()):
            raise ValueError("features contain NaN or inf")
        counts = self.state.counts + torch.bincount(labs, minlength=self.num_classes).to(F64)
        self.state = Moments(counts, sums)

    def merge(self, other: ClassStats) -> ClassStats:
        """New moments over both inputs' data; neither input is changed."""
        if not isinstance(other, ClassStats) or other.num_classes != self.num_classes:
            raise ValueError("merge needs a ClassStats with the same num_classes")
        out = ClassStats(self.num_classes, self.tile_size)
        parts = [s.state for s in (self, other) if s.state is not None]
        if parts:
            widths = sorted({p.means.shape[1] for p in parts})
            if len(widths) > 1:
                raise ValueError(f"merge got features of different widths d={widths}")
            device = parts[0].means.device
            out.state = Moments(*(sum(t.to(device) for t in ts) for ts in zip(*parts,
                                                                               strict=True)))
        return out

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Replace this rank's moments by the whole group's, on every rank (collective).

        A rank without data takes part; outside a distributed run this does nothing.
        """
        if not distributed.is_distributed(group):
            return
        device = distributed.collective_device(group)
        d = 0 if self.state is None else self.state.means.shape[1]
        width = distributed.all_reduce_max(torch.tensor([d], dtype=torch.int64,
                                                        device=device), group)
        d_all = int(width[0])
        if d_all == 0:
            return
        if self.state is not None and d != d_all:
            raise ValueError(f"all_reduce got features of width d={d} here but d={d_all} "
                             "elsewhere")
        home = device if self.state is None else self.state.means.device
        local = (Moments.zeros(self.num_classes, d_all, device) if self.state is None
                 else Moments(*(t.to(device) for t in self.state)))
        self.state = Moments(*(distributed.all_reduce_sum(t.contiguous(), group).to(home)
                               for t in local))

    def require_all_classes(self) -> Moments:
        """The moments, refusing no data or a class without samples (no metric is defined)."""
        if self.state is None:
            raise ValueError("layer metrics need data: call update with at least one sample")
        missing = torch.nonzero(self.state.counts == 0)
        if missing.numel():
            raise ValueError(
                f"class {int(missing[0, 0])} has no samples in the data; NC metrics need every "
                f"class of num_classes={self.num_classes} present"
            )
        return self.state

    def metrics(self, totals: torch.Tensor, tile_size: int | None = None) -> dict[str, float]:
        """nc1 = tr(Sigma_W Sigma_B^+) / K, the cdnv mean and tr(Sigma_W) / tr(Sigma_B), from
        ``totals`` (``Within.totals`` over all train data against these final means);
        ``tile_size`` overrides this object's (for callers that size one tile for many)."""
        state = self.require_all_classes()
        means = state.means
        tile = (check_tile_size(tile_size) or self.tile_size
                or default_tile_size(self.num_classes, means.device))
        projected, sq_dev = totals.to(means.device).split([len(totals) - self.num_classes,
                                                          self.num_classes])
        quadratic = projected / state.counts.sum()
        values = separation_metrics(state.counts, means, sq_dev, quadratic, tile)
        stacked = torch.stack([values[k] for k in SEPARATION_KEYS]).cpu().tolist()
        return dict(zip(SEPARATION_KEYS, stacked, strict=True))

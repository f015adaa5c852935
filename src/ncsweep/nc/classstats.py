"""One layer's class moments in float64: the state behind nc1, cdnv and trace_ratio.

Pass 1 keeps O(K d) per layer, class counts and float64 class sums, which add across
batches, accumulators and ranks. Everything squared waits for the final class means, so each
feature is centred by its exact class mean before squaring (``Deviations``): per-class squared
deviations (cdnv, tr(Sigma_W)) and, for nc1, Sigma_W only where Sigma_B^+ lives, the span of
the centred class means: with v_j the rows of ``between_inverse`` (min(K-1, d) of them),
tr(Sigma_W Sigma_B^+) = sum_j (v_j^T Sigma_W v_j) inverse_j. That is O(N d K) work instead of a
d x d scatter's O(N d^2). The same centred pass decides the nearest-class-centre hits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ncsweep import distributed
from ncsweep.nc.geometry import between_inverse, centred_means, separation_metrics
from ncsweep.nc.tensors import (
    CHUNK_ELEMENTS,
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


class Deviations:
    """The train features' deviations x = h - mu_y from their final class means, in one pass:
    per-class sums of ||x||^2 (N tr(Sigma_W) by class), sums of (v_j . x)^2 over the rows v_j
    of ``between_inverse`` (N v_j^T Sigma_W v_j), and the nearest-class-centre hits.

    The nearest centre maximises 2 (h - mu_G).M_k - ||M_k||^2 (``ncsweep.nc.centres``), which
    is 2 x.M_k + (2 M_y.M_k - ||M_k||^2) in the deviations, so one product x [V; 2M]^T and a
    K x K table give both without a second copy of the features. All sums add across batches
    and ranks.
    """

    def __init__(self, state: Moments) -> None:
        self.counts, self.means = state.counts, state.means
        m = centred_means(self.counts, self.means)[1]
        self.basis, self.inverse = between_inverse(m, self.counts)
        self.table = 2.0 * (m @ m.T) - m.square().sum(dim=1)
        self.directions = torch.cat([self.basis, 2.0 * m]).T.contiguous()
        self.sq_dev = torch.zeros_like(self.counts)
        self.projected = torch.zeros(self.basis.shape[0], dtype=F64, device=self.means.device)
        self.tally = torch.zeros(2, dtype=torch.int64, device=self.means.device)

    def update(self, features: ArrayLike, labels: ArrayLike, overwrite: bool = False) -> None:
        """Add a batch of (N, d) features, centred by their class means before squaring.

        ``overwrite=True`` lets a float64 batch be centred in place (features the caller hands
        over); any other batch is copied to float64 in row chunks."""
        feats = as_features(features, self.means)
        labs = as_tensor(labels, feats.device)
        k = self.means.shape[0]
        check_labels(labs, feats.shape, k)
        labs = labs.long()
        step = max(1, CHUNK_ELEMENTS // max(feats.shape[1], 1))
        chunks = (((slice(lo, lo + step), feats[lo:lo + step])
                   for lo in range(0, feats.shape[0], step))
                  if overwrite and feats.dtype == F64 else float64_chunks(feats, step))
        for rows, x in chunks:
            y = labs[rows]
            if k <= ONEHOT_MAX_CLASSES:  # a thin product beats gathering an N x d block
                x.addmm_(torch.nn.functional.one_hot(y, k).to(F64), self.means, alpha=-1.0)
            else:
                x.sub_(self.means[y])
            self.sq_dev.index_add_(0, y, torch.linalg.vector_norm(x, dim=1).square())
            products = x @ self.directions  # one product for both: [V x, 2 M x]
            projected, scores = products.split([self.basis.shape[0], k], dim=1)
            self.projected += projected.square().sum(dim=0)
            scores = scores + self.table[y]
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("features contain NaN or inf")
            hits = (scores.argmax(dim=1) == y).sum()
            self.tally += torch.stack([hits, hits.new_tensor(y.numel())])

    def totals(self) -> torch.Tensor:
        """The sums as one float64 vector (projected, sq_dev, then the hit tally), for one
        all_reduce."""
        return torch.cat([self.projected, self.sq_dev, self.tally.to(F64)])


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
        if feats.dtype == F64:  # index_add_ reads it as it is: no float64 copy to make
            sums.index_add_(0, labs, feats)
        else:
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

    def metrics(self, totals: torch.Tensor, inverse: torch.Tensor,
                tile_size: int | None = None) -> dict[str, float]:
        """nc1 = tr(Sigma_W Sigma_B^+) / K, the cdnv mean and tr(Sigma_W) / tr(Sigma_B), from
        ``totals`` (``Deviations.totals`` over all train data against these final means, the
        hit tally left out) and the ``Deviations.inverse`` of the same means; ``tile_size``
        overrides this object's (for callers that size one tile for many)."""
        state = self.require_all_classes()
        means = state.means
        tile = (check_tile_size(tile_size) or self.tile_size
                or default_tile_size(self.num_classes, means.device))
        projected, sq_dev = totals.to(means.device).split([len(totals) - self.num_classes,
                                                          self.num_classes])
        quadratic = projected / state.counts.sum()
        values = separation_metrics(state.counts, means, sq_dev, quadratic * inverse, tile)
        stacked = torch.stack([values[k] for k in SEPARATION_KEYS]).cpu().tolist()
        return dict(zip(SEPARATION_KEYS, stacked, strict=True))

"""One layer's class moments, streamed in float64: the state behind nc1, cdnv and trace_ratio.

The same pass-1 state as ``NCAccumulator`` (counts, class means, per-class squared deviations,
within-class scatter), updated in float64 chunks and merged across batches, accumulators and
ranks by Chan et al.'s parallel update (``ncsweep.nc.state``), with no classifier attached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ncsweep import distributed
from ncsweep.nc.geometry import separation_metrics
from ncsweep.nc.state import State, add_chunk, all_reduce_state, combine
from ncsweep.nc.tensors import (
    CHUNK_ELEMENTS,
    ArrayLike,
    as_features,
    as_tensor,
    check_classes,
    check_labels,
    check_tile_size,
    default_tile_size,
    float64_chunks,
    symmetric_from_upper,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SEPARATION_KEYS = ("nc1", "cdnv", "trace_ratio")
CHUNK_CLASSES = 2


class ClassStats:
    """Streaming class moments of one layer's features: ``update`` per batch, ``merge``,
    ``all_reduce`` across ranks, then ``metrics`` (nc1, cdnv, trace_ratio)."""

    def __init__(self, num_classes: int, tile_size: int | None = None) -> None:
        check_classes(num_classes)
        self.num_classes = int(num_classes)
        self.tile_size = check_tile_size(tile_size)
        self.state: State | None = None

    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch of (N, d) features with their labels, any order, size or dtype."""
        feats, labs = self._batch(features, labels)
        if feats.shape[0] == 0:
            return
        if self.state is None:
            self.state = State.zeros(self.num_classes, feats.shape[1], feats.device)
        step = max(CHUNK_ELEMENTS // feats.shape[1], CHUNK_CLASSES * self.num_classes)
        for rows, x in float64_chunks(feats, step):
            self.state = add_chunk(self.state, x, labs[rows])

    def _batch(self, features: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (features, int64 labels) on the state's device, of the state's width."""
        feats = as_features(features, None if self.state is None else self.state.means)
        labs = as_tensor(labels, feats.device)
        check_labels(labs, feats.shape, self.num_classes)
        return feats, labs.long()

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
            out.state = combine([State(*(t.to(device) for t in p)) for p in parts],
                                lambda t: t)
        return out

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Replace this rank's moments by the whole group's, on every rank (collective).

        A rank without data takes part; outside a distributed run this does nothing.
        """
        if distributed.is_distributed(group):
            self.state = all_reduce_state(self.state, self.num_classes, False, group)[0]

    def require_all_classes(self) -> State:
        """The state, refusing no data or a class without samples (no metric is defined)."""
        if self.state is None:
            raise ValueError("layer metrics need data: call update with at least one sample")
        missing = torch.nonzero(self.state.counts == 0)
        if missing.numel():
            raise ValueError(
                f"class {int(missing[0, 0])} has no samples in the data; NC metrics need every "
                f"class of num_classes={self.num_classes} present"
            )
        return self.state

    def metrics(self, tile_size: int | None = None) -> dict[str, float]:
        """nc1 = tr(Sigma_W Sigma_B^+) / K, the cdnv mean and tr(Sigma_W) / tr(Sigma_B);
        ``tile_size`` overrides this object's (for callers that size one tile for many)."""
        state = self.require_all_classes()
        tile = (check_tile_size(tile_size) or self.tile_size
                or default_tile_size(self.num_classes, state.means.device))
        sigma_w = symmetric_from_upper(state.scatter) / state.counts.sum()
        values = separation_metrics(state.counts, state.means, state.sq_dev, sigma_w, tile)
        stacked = torch.stack([values[k] for k in SEPARATION_KEYS]).cpu().tolist()
        return dict(zip(SEPARATION_KEYS, stacked, strict=True))

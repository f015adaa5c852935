"""Collapse through depth: streaming NC metrics of every named block, and the law of data
separation (He & Su 2023) fitted over the blocks.

Keys, for each block ``<block>`` (names per architecture: ``ncsweep.nc.blocks``):

- ``layers/<block>/nc1``: tr(Sigma_W Sigma_B^+) / K of the block's train features.
- ``layers/<block>/cdnv``: the mean over pairs k < l of (var_k + var_l) / (2 ||mu_k - mu_l||^2).
- ``layers/<block>/trace_ratio``: tr(Sigma_W) / tr(Sigma_B).
- ``layers/<block>/ncc_acc_train``: the share of train samples whose nearest train class mean
  (Euclidean, in the block's features) is their label.
- ``layers/<block>/ncc_acc_test``: the same for the test samples, against the TRAIN class
  means; present only when test batches were given.
- ``layers_decay_ratio``, ``layers_r2``: the least-squares line log10(nc1_l) = a + s l over the
  blocks' depths l (their positions in the architecture's full block list): 10^s, the factor by
  which nc1 shrinks per block, and the line's R^2. Both are left out with fewer than two blocks
  or where some nc1 is not a positive finite number (its logarithm is undefined).

The formulas and conventions are those of ``ncsweep.nc`` (float64, the pseudo-inverse cut-off);
a block's nc1, cdnv and trace_ratio equal ``nc_metrics``' keys of the same name on that block's
features. Pass 1 keeps only class counts and sums (``ncsweep.nc.classstats``); the squared terms
and ncc_acc_train come from one centred pass (``Deviations``) over the kept train features, or
the second pass, once the class means are final, so no d x d scatter is formed. Convolutional
outputs enter as per-channel means (``ncsweep.nc.probe``).

Use, in the eval passes the run already makes (no extra forward pass while the kept block
features fit ``max_feature_bytes``)::

    blocks = select_blocks(model, selection)                  # ncsweep.nc.blocks
    layers = LayerMetrics([b.name for b in blocks], num_classes, [b.depth for b in blocks])
    with capture([(b.name, b.module) for b in blocks]) as outputs:     # ncsweep.nc.probe
        for x, y in train_batches: model(x); layers.update(outputs.take(), y, copy=False)
        layers.all_reduce()                   # across ranks; a no-op in one process
        if layers.needs_second_pass:          # the kept block features outgrew their budget
            for x, y in train_batches:
                model(x); layers.update_train_ncc(outputs.take(), y, copy=False)
        for x, y in test_batches: model(x); layers.update_test(outputs.take(), y)
    row |= layers.compute()                   # collective after all_reduce
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ncsweep import distributed
from ncsweep.nc.centres import NearestCentreTally, accuracy
from ncsweep.nc.classstats import ClassStats, Deviations
from ncsweep.nc.tensors import F64, ArrayLike, as_tensor, check_tile_size, default_tile_size

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

PREFIX = "layers"
BLOCK_KEYS = ("nc1", "cdnv", "trace_ratio", "ncc_acc_train", "ncc_acc_test")
FIT_KEYS = ("layers_decay_ratio", "layers_r2")


def layer_key(block: str, metric: str) -> str:
    """The logged key of one block's metric, ``layers/<block>/<metric>``."""
    return f"{PREFIX}/{block}/{metric}"


def data_separation_fit(depths: Sequence[float], nc1: Sequence[float]) -> dict[str, float]:
    """``layers_decay_ratio`` (10^slope) and ``layers_r2`` of log10(nc1) on depth by least
    squares; empty with fewer than two points or a non-positive or non-finite nc1.

    R^2 = 1 - SS_res / SS_tot, and 1 when all log10(nc1) are equal (the flat line fits exactly).
    """
    if len(depths) != len(nc1):
        raise ValueError(f"got {len(depths)} depths for {len(nc1)} nc1 values")
    if len(nc1) < 2 or not all(math.isfinite(v) and v > 0 for v in nc1):
        logger.debug("no data-separation fit over nc1 = %s", list(nc1))
        return {}
    x = np.asarray(depths, dtype=np.float64)
    y = np.log10(np.asarray(nc1, dtype=np.float64))
    if np.unique(x).size < 2:
        raise ValueError(f"the data-separation fit needs distinct depths, got {list(depths)}")
    dx, dy = x - x.mean(), y - y.mean()
    slope = float(dx @ dy / (dx @ dx))
    ss_tot = float(dy @ dy)
    ss_res = float(np.square(dy - slope * dx).sum())
    r2 = 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return {"layers_decay_ratio": 10.0**slope, "layers_r2": r2}


class LayerMetrics:
    """The per-block metrics of one model over the eval passes: one ``ClassStats`` per block,
    the blocks' train features kept for the ``Deviations`` pass (the squared terms and
    ``ncc_acc_train``) while within ``max_feature_bytes`` (else a second pass), and
    ``NearestCentreTally`` counts for the test split.

    Batches come all blocks at once (``update``, ``update_train_ncc``, ``update_test``) or
    block by block (``add_train``, ``add_second``, ``add_test``: from a forward hook, while the
    output is still in cache). Across ranks: the train pass with the rank's shard,
    ``all_reduce()``, the second pass if needed, the test batches, then ``compute`` on every
    rank (collective).
    """

    def __init__(self, blocks: Sequence[str], num_classes: int,
                 depths: Sequence[int] | None = None, max_feature_bytes: int = 512 * 2**20,
                 tile_size: int | None = None) -> None:
        self.blocks = tuple(blocks)
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"block names must be distinct, got {list(self.blocks)}")
        self.depths = tuple(range(len(self.blocks))) if depths is None else tuple(depths)
        if len(self.depths) != len(self.blocks):
            raise ValueError(f"got {len(self.depths)} depths for {len(self.blocks)} blocks")
        self.num_classes = int(num_classes)
        self.max_feature_bytes = int(max_feature_bytes)
        self.tile_size = check_tile_size(tile_size)
        self.stats = {name: ClassStats(num_classes, tile_size) for name in self.blocks}
        self._kept: dict[str, list[Batch]] | None = {name: [] for name in self.blocks}
        self._kept_bytes = 0
        self._deviations: dict[str, Deviations] = {}
        self._test: dict[str, NearestCentreTally] = {}
        self._reduced = False
        self._group: ProcessGroup | None = None

    def update(self, features: Mapping[str, ArrayLike], labels: ArrayLike,
               copy: bool = True, final: bool = False) -> None:
        """Add a train batch: each block's (N, d_block) features and the batch's labels.

        ``copy=False`` hands the tensors over (no copy): they are kept as they are and centred
        in place later, for features nothing else reads, such as ``BlockOutputs.take()``'s.
        ``final``: see ``add_train``.
        """
        for name, feats in self._batch(features, labels).items():
            self.add_train(name, feats, labels, copy, final)

    def add_train(self, name: str, features: ArrayLike, labels: ArrayLike, copy: bool = True,
                  final: bool = False) -> None:
        """Add one block's train batch. ``final=True`` declares it the last one of a pass that
        no ``all_reduce`` will change (one process): the block's class means are then final,
        so its centred pass runs at once, over the kept batches and this one, and nothing more
        is kept."""
        if self._reduced or name in self._deviations or self._test:
            raise ValueError("train batches after all_reduce, after a block's final batch or "
                             "after the test batches: finish the train pass first")
        if final and distributed.is_distributed():
            raise ValueError("final=True is for one process: all_reduce changes the class means")
        feats = as_tensor(features)
        self._stats(name).update(feats, labels)
        if not final or self._kept is None:
            self._keep(name, feats, labels, copy)
            return
        self._deviations[name] = self._centre_kept(name)
        self._deviations[name].update(feats, labels, overwrite=not copy)

    def update_train_ncc(self, features: Mapping[str, ArrayLike], labels: ArrayLike,
                         copy: bool = True) -> None:
        """Second pass over the same train data: ncc_acc_train and the within-class sums of
        nc1, both against the final class means; ``copy=False`` hands the tensors over (a
        float64 batch is centred in place)."""
        for name, feats in self._batch(features, labels).items():
            self.add_second(name, feats, labels, copy)

    def add_second(self, name: str, features: ArrayLike, labels: ArrayLike,
                   copy: bool = True) -> None:
        """One block's batch of the second pass (see ``update_train_ncc``)."""
        if self._kept is not None:
            raise ValueError("update_train_ncc is for a second pass; the train features were "
                             "kept (needs_second_pass is False)")
        if name not in self._deviations:
            self._deviations[name] = Deviations(self._stats(name).require_all_classes())
        self._deviations[name].update(features, labels, overwrite=not copy)

    def update_test(self, features: Mapping[str, ArrayLike], labels: ArrayLike,
                    copy: bool = True) -> None:
        """Add a test batch: ncc_acc_test against the train class means (pass 1 must be done);
        ``copy=False`` hands the tensors over (a float64 batch is centred in place)."""
        for name, feats in self._batch(features, labels).items():
            self.add_test(name, feats, labels, copy)

    def add_test(self, name: str, features: ArrayLike, labels: ArrayLike,
                 copy: bool = True) -> None:
        """One block's test batch (see ``update_test``)."""
        if name not in self._test:
            self._test[name] = NearestCentreTally(self._stats(name).require_all_classes())
        self._test[name].update(features, labels, overwrite=not copy)

    def merge(self, other: LayerMetrics) -> LayerMetrics:
        """New metrics over both inputs' train data; both must still be in the train pass."""
        if not isinstance(other, LayerMetrics) or (other.blocks, other.num_classes) != (
                self.blocks, self.num_classes):
            raise ValueError("merge needs LayerMetrics of the same blocks and num_classes")
        if self._frozen or other._frozen:
            raise ValueError("merge train-pass state only: before all_reduce and any scoring")
        out = LayerMetrics(self.blocks, self.num_classes, self.depths, self.max_feature_bytes,
                           self.tile_size)
        out.stats = {name: self.stats[name].merge(other.stats[name]) for name in self.blocks}
        if self._kept is None or other._kept is None or (
                self._kept_bytes + other._kept_bytes > out.max_feature_bytes):
            out._kept = None
        else:
            out._kept = {name: [*self._kept[name], *other._kept[name]] for name in self.blocks}
            out._kept_bytes = self._kept_bytes + other._kept_bytes
        return out

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Replace every block's moments by the group's (collective); if any rank dropped its
        kept features, all do. A no-op outside a distributed run."""
        if not distributed.is_distributed(group):
            return
        if self._frozen:
            raise ValueError("all_reduce once, after the train pass and before any scoring")
        for stats in self.stats.values():
            stats.all_reduce(group)
        dropped = torch.tensor([int(self._kept is None)], dtype=torch.int64,
                               device=distributed.collective_device(group))
        if int(distributed.all_reduce_max(dropped, group)[0]):
            self._kept, self._kept_bytes = None, 0
        self._reduced, self._group = True, group

    @property
    def needs_second_pass(self) -> bool:
        """True when the kept features outgrew the budget: run update_train_ncc before compute."""
        return self._kept is None and len(self._deviations) < len(self.blocks)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held in tensors: the blocks' moments and the kept train features."""
        states = [s.state for s in self.stats.values() if s.state is not None]
        return {"state": sum(t.numel() * t.element_size() for s in states for t in s),
                "kept_features": self._kept_bytes}

    def compute(self) -> dict[str, float]:
        """Every block's keys and the data-separation fit (collective after ``all_reduce``)."""
        values = self.block_values()
        if not values:
            return {}
        nc1 = [values[layer_key(name, "nc1")] for name in self.blocks]
        return values | data_separation_fit(self.depths, nc1)

    def block_values(self) -> dict[str, float]:
        """Every block's keys, without the fit (collective after ``all_reduce``)."""
        if not self.blocks:
            return {}
        home = self.stats[self.blocks[0]].require_all_classes().means.device
        tile = self.tile_size or default_tile_size(self.num_classes, home)
        deviations = self._final_deviations()
        totals = [deviations[name].totals() for name in self.blocks]
        if self._reduced:
            self._test_everywhere()
        if self._test:
            totals += [self._test[name].tally.to(F64) for name in self.blocks]
        flat = torch.cat([t.to(home) for t in totals])
        if self._reduced:
            device = distributed.collective_device(self._group)
            flat = distributed.all_reduce_sum(flat.to(device), self._group).to(home)
        parts = torch.split(flat, [len(t) for t in totals])
        values: dict[str, float] = {}
        for name, part in zip(self.blocks, parts, strict=False):
            sums, tally = part[:-2], part[-2:]
            metrics = self.stats[name].metrics(sums, deviations[name].inverse, tile)
            values |= {layer_key(name, key): value for key, value in metrics.items()}
            values[layer_key(name, "ncc_acc_train")] = accuracy(tally)
        for name, tally in zip(self.blocks, parts[len(self.blocks):], strict=True):
            values[layer_key(name, "ncc_acc_test")] = accuracy(tally)
        return values

    def _final_deviations(self) -> dict[str, Deviations]:
        """Every block's ``Deviations`` over this rank's train data: from the final batch, the
        second pass, or the kept features, centred in place (they are this object's) and then
        let go."""
        missing = [name for name in self.blocks if name not in self._deviations]
        if missing and self._kept is None:
            raise ValueError(
                f"nc1 and ncc_acc_train need a second pass: the block features exceeded "
                f"max_feature_bytes={self.max_feature_bytes} and were not kept; call "
                f"update_train_ncc over the same train data before compute"
            )
        for name in missing:
            self._deviations[name] = self._centre_kept(name)
        return self._deviations

    def _centre_kept(self, name: str) -> Deviations:
        """The block's ``Deviations`` over its kept batches, centred in place (they are this
        object's), which are then let go."""
        deviations = Deviations(self._stats(name).require_all_classes())
        for feats, labels in self._kept.pop(name):
            deviations.update(feats, labels, overwrite=True)
            self._kept_bytes -= _nbytes(feats, labels)
        return deviations

    def _test_everywhere(self) -> None:
        """Empty test tallies on a rank without test batches where another rank had some, so
        every rank reduces the same tallies."""
        seen = torch.tensor([int(bool(self._test))], dtype=torch.int64,
                            device=distributed.collective_device(self._group))
        if bool(distributed.all_reduce_max(seen, self._group)[0]) and not self._test:
            self._test = {name: NearestCentreTally(self._stats(name).require_all_classes())
                          for name in self.blocks}

    @property
    def _frozen(self) -> bool:
        return self._reduced or bool(self._deviations) or bool(self._test)

    def _stats(self, name: str) -> ClassStats:
        """The block's moments, refusing a name that is not one of the blocks."""
        if name not in self.stats:
            raise ValueError(f"no block {name!r}; the blocks are {list(self.blocks)}")
        return self.stats[name]

    def _batch(self, features: Mapping[str, ArrayLike],
               labels: ArrayLike) -> dict[str, torch.Tensor]:
        """The batch's features by block, every block present and of one sample count."""
        missing = [name for name in self.blocks if name not in features]
        if missing:
            raise ValueError(
                f"no features for block(s) {missing} in this batch (got {sorted(features)}); "
                "was the forward pass run inside probe.capture, and not compiled past the hooks?"
            )
        batch = {name: as_tensor(features[name]) for name in self.blocks}
        n = {name: int(t.shape[0]) for name, t in batch.items()}
        if len(set(n.values())) > 1:
            raise ValueError(f"blocks have different sample counts in one batch: {n}")
        return batch

    def _keep(self, name: str, feats: torch.Tensor, labels: ArrayLike, copy: bool) -> None:
        """Keep a copy of the block's batch for the centred pass while within budget; drop
        every block's kept batches past it."""
        if self._kept is None:
            return
        labs = as_tensor(labels)
        size = _nbytes(feats, labs)
        if self._kept_bytes + size > self.max_feature_bytes:
            self._kept, self._kept_bytes = None, 0
            return
        if copy:
            feats, labs = feats.clone(), labs.clone()
        self._kept[name].append((feats, labs))
        self._kept_bytes += size


Batch = tuple[torch.Tensor, torch.Tensor]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

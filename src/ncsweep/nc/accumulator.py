"""The streaming accumulators: NCAccumulator (train split) and HeldOutNC4 (a test split)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ncsweep import distributed
from ncsweep.nc.decisions import Predictions
from ncsweep.nc.geometry import geometry_metrics, rowspace, rowspace_metrics
from ncsweep.nc.state import State, add_chunk, all_reduce_state, combine
from ncsweep.nc.tensors import (
    CHUNK_ELEMENTS,
    F64,
    UNLIMITED_BYTES,
    ArrayLike,
    as_classifier,
    as_features,
    as_tensor,
    check_classes,
    check_classifier_shapes,
    check_labels,
    check_matrix,
    check_tile_size,
    default_tile_size,
    float64_chunks,
    symmetric_from_upper,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


PASS1_CHUNK_CLASSES = 2

KEYS = (
    "nc1", "nc2_w", "nc2_m", "nc2_equinorm_w", "nc2_equinorm_m", "nc2_equiangle_w",
    "nc2_equiangle_m", "nc2_maxangle_w", "nc2_maxangle_m", "nc3", "nc3_duality", "nc4",
    "nc4_bias", "cdnv", "trace_ratio", "w_norm_mean", "m_norm_mean",
)
ROWSPACE_KEYS = ("nc1_rowspace", "nc2_m_rowspace", "nc3_duality_rowspace", "nc4_rowspace")
COMPUTE_KEYS = (*KEYS, *ROWSPACE_KEYS, "nc2_of")
HELDOUT_KEYS = ("nc4_test",)


def nc_metrics(
    features: ArrayLike,
    labels: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    num_classes: int | None = None,
    tile_size: int | None = None,
) -> dict[str, float]:
    """All NC metrics of one data set in one call: an accumulator fed a single batch."""
    feats = as_tensor(features)
    w = as_tensor(weight)
    check_matrix(feats, "features", "(N, d)")
    check_matrix(w, "weight", "(num_classes, d)")
    k = w.shape[0] if num_classes is None else int(num_classes)
    check_classes(k)
    check_classifier_shapes(w, None if bias is None else as_tensor(bias), k, feats.shape[1])
    acc = NCAccumulator(k, max_feature_bytes=UNLIMITED_BYTES, tile_size=tile_size)
    acc._update(feats, labels, copy=False)
    return acc.compute(w, bias)


@dataclass
class _Pass2:
    """Running nc4 and nc4_rowspace disagreement counts of update_predictions, one classifier,
    then the nearest-class-centre hits (``Predictions.mismatches`` with labels)."""

    weight: torch.Tensor
    bias: torch.Tensor
    basis: torch.Tensor | None
    predictions: Predictions
    mismatches: torch.Tensor
    counts: torch.Tensor


class NCAccumulator:
    """Streaming NC metrics: ``update`` per batch, optional ``update_predictions``, ``compute``.

    Across ranks: ``update`` with the rank's shard, ``all_reduce()``, the second pass (if
    ``needs_second_pass``) over the same shard, then ``compute`` on every rank (collective).
    """

    def __init__(
        self, num_classes: int, max_feature_bytes: int = 512 * 2**20,
        tile_size: int | None = None,
    ) -> None:
        check_classes(num_classes)
        self.num_classes = int(num_classes)
        self.max_feature_bytes = int(max_feature_bytes)
        self.tile_size = check_tile_size(tile_size)
        self._counts: torch.Tensor | None = None
        self._means: torch.Tensor | None = None
        self._sq_dev: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        self._kept_bytes = 0
        self._pass2: _Pass2 | None = None
        self._ncc_hits: float | None = None
        self._reduced = False
        self._group: ProcessGroup | None = None

    def update(self, features: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch to pass 1 (counts, class means, within-class scatter), any order or size."""
        self._update(features, labels, copy=True)

    def update_predictions(
        self,
        features: ArrayLike,
        labels: ArrayLike,
        weight: ArrayLike,
        bias: ArrayLike | None = None,
    ) -> None:
        """Add one batch to pass 2: nc4 and nc4_rowspace disagreements, final pass-1 means."""
        self._require_data("update_predictions")
        self._require_all_classes()
        feats, labs = self._batch(features, labels)
        w, b, weight_eps = as_classifier(weight, bias, self._means)
        if self._pass2 is None:
            basis = rowspace(w, weight_eps)
            predictions = Predictions.build(self._counts, self._means, w, b, basis, self._tile())
            zero = torch.zeros(predictions.groups, dtype=torch.int64, device=w.device)
            self._pass2 = _Pass2(w, b, basis, predictions, zero, torch.zeros_like(self._counts))
        elif not (torch.equal(w, self._pass2.weight) and torch.equal(b, self._pass2.bias)):
            raise ValueError(
                "update_predictions got a different weight or bias than in its earlier calls; "
                "use one classifier for the whole second pass"
            )
        self._pass2.mismatches += self._pass2.predictions.mismatches(feats, labs)
        self._pass2.counts += torch.bincount(labs, minlength=self.num_classes).to(F64)

    def compute(self, weight: ArrayLike, bias: ArrayLike | None = None) -> dict[str, float]:
        """Every metric of COMPUTE_KEYS for classifier (weight, bias) from the accumulated data.

        After a distributed ``all_reduce`` this is collective: every rank of the group calls it.
        """
        self._require_data("compute")
        self._require_all_classes()
        w, b, weight_eps = as_classifier(weight, bias, self._means)
        tile = self._tile()
        sigma_w = symmetric_from_upper(self._scatter) / self._counts.sum()
        values = geometry_metrics(self._counts, self._means, self._sq_dev, sigma_w, w, b, tile)
        basis = self._pass2.basis if self._pass2 is not None else rowspace(w, weight_eps)
        if basis is None:
            values |= {f"{key}_rowspace": values[key] for key in ("nc1", "nc2_m", "nc3_duality")}
        else:
            values |= rowspace_metrics(self._counts, self._means, sigma_w, w, basis, tile)
        values["nc4"], values["nc4_rowspace"] = self._nc4(w, b, basis, tile)
        stacked = torch.stack([values[k] for k in COMPUTE_KEYS]).cpu().tolist()
        return dict(zip(COMPUTE_KEYS, stacked, strict=True))

    def nearest_centre_accuracy(self) -> float:
        """The share of train samples (all ranks) whose nearest train class mean is their label,
        from nc4's decisions, once ``compute`` has run."""
        if self._ncc_hits is None:
            raise ValueError("nearest_centre_accuracy is known after compute")
        return self._ncc_hits / float(self._counts.sum())

    def merge(self, other: NCAccumulator) -> NCAccumulator:
        """A new accumulator over both inputs' data (Chan et al.'s merge); neither is changed.

        Kept features are pooled while within this accumulator's budget; both must be in pass 1.
        """
        if not isinstance(other, NCAccumulator) or other.num_classes != self.num_classes:
            raise ValueError("merge needs an NCAccumulator with the same num_classes")
        for acc in (self, other):
            if acc._pass2 is not None or acc._reduced:
                raise ValueError(
                    "merge pass-1 state only: merge before update_predictions and all_reduce"
                )
        out = NCAccumulator(self.num_classes, self.max_feature_bytes, self.tile_size)
        parts = [acc._state() for acc in (self, other) if acc._means is not None]
        if parts:
            d = {p.means.shape[1] for p in parts}
            if len(d) > 1:
                raise ValueError(f"merge got features of different widths d={sorted(d)}")
            device = parts[0].means.device
            out._set_state(combine([State(*(t.to(device) for t in p)) for p in parts],
                                    lambda t: t))
        if self._kept is None or other._kept is None:
            out._kept = None
        elif self._kept_bytes + other._kept_bytes <= out.max_feature_bytes:
            out._kept = [*self._kept, *other._kept]
            out._kept_bytes = self._kept_bytes + other._kept_bytes
        else:
            out._kept = None
        return out

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Replace this rank's pass-1 state by the whole group's, on every rank (collective).

        Kept features stay on their rank; if any rank dropped its own, all do, so every rank
        agrees on ``needs_second_pass``. nc4 then counts each rank's own samples against the
        group's class means, and ``compute`` sums the counts. No-op outside a distributed run.
        """
        if not distributed.is_distributed(group):
            return
        if self._pass2 is not None or self._reduced:
            raise ValueError("all_reduce once, after pass 1 and before update_predictions")
        state = None if self._means is None else self._state()
        merged, dropped = all_reduce_state(state, self.num_classes, self._kept is None, group)
        if merged is not None:
            self._set_state(merged)
        if dropped:
            self._kept, self._kept_bytes = None, 0
        self._reduced, self._group = True, group

    @property
    def needs_second_pass(self) -> bool:
        """True when the kept features outgrew the budget: run update_predictions before compute."""
        return self._kept is None and self._pass2 is None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held in tensors: the NC1-NC3 state and the batches kept for nc4."""
        state = (self._counts, self._means, self._sq_dev, self._scatter)
        return {
            "state": sum(t.numel() * t.element_size() for t in state if t is not None),
            "kept_features": self._kept_bytes,
        }

    def _tile(self) -> int:
        if self.tile_size is not None:
            return self.tile_size
        return default_tile_size(self.num_classes, self._means.device)

    def _state(self) -> State:
        return State(self._counts, self._means, self._sq_dev, self._scatter)

    def _set_state(self, state: State) -> None:
        self._counts, self._means, self._sq_dev, self._scatter = state

    def _update(self, features: ArrayLike, labels: ArrayLike, copy: bool) -> None:
        if self._pass2 is not None:
            raise ValueError("update called after update_predictions: finish pass 1 before pass 2")
        if self._reduced:
            raise ValueError("update called after all_reduce: reduce once, after all of pass 1")
        feats, labs = self._batch(features, labels)
        if feats.shape[0] == 0:
            return
        self._init_state(feats.shape[1], feats.device)
        step = max(CHUNK_ELEMENTS // feats.shape[1], PASS1_CHUNK_CLASSES * self.num_classes)
        for rows, x in float64_chunks(feats, step):
            self._set_state(add_chunk(self._state(), x, labs[rows]))
        self._keep(feats, labs, copy)

    def _batch(self, features: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (features, int64 labels) on the state's device."""
        feats = as_features(features, self._means)
        labs = as_tensor(labels, feats.device)
        check_labels(labs, feats.shape, self.num_classes)
        return feats, labs.long()

    def _init_state(self, d: int, device: torch.device) -> None:
        if self._means is None:
            self._set_state(State.zeros(self.num_classes, d, device))

    def _keep(self, feats: torch.Tensor, labels: torch.Tensor, copy: bool) -> None:
        """Keep the batch for a one-pass nc4 while within budget; drop all kept past it."""
        if self._kept is None:
            return
        size = feats.numel() * feats.element_size() + labels.numel() * labels.element_size()
        if self._kept_bytes + size > self.max_feature_bytes:
            self._kept, self._kept_bytes = None, 0
            return
        if copy:
            feats, labels = feats.clone(), labels.clone()
        self._kept.append((feats, labels))
        self._kept_bytes += size

    def _nc4(
        self, w: torch.Tensor, b: torch.Tensor, basis: torch.Tensor | None, tile: int
    ) -> torch.Tensor:
        """(nc4, nc4_rowspace) from the second pass or the kept batches, summed over ranks."""
        if self._pass2 is not None:
            if not torch.equal(w, self._pass2.weight) or not torch.equal(b, self._pass2.bias):
                raise ValueError(
                    "compute got a different weight or bias than update_predictions; "
                    "nc4 must use the classifier of the second pass"
                )
            mismatches, counts = self._pass2.mismatches, self._pass2.counts
        elif self._kept is None:
            raise ValueError(
                f"nc4 needs a second pass: the features exceeded max_feature_bytes="
                f"{self.max_feature_bytes} and were not kept; call update_predictions(features, "
                f"labels, weight, bias) over the same data before compute"
            )
        else:
            predictions = Predictions.build(self._counts, self._means, w, b, basis, tile)
            mismatches = sum((predictions.mismatches(f, y) for f, y in self._kept),
                             torch.zeros(predictions.groups, dtype=torch.int64,
                                         device=w.device))
            counts = None
        tally = torch.cat([mismatches[:-1].expand(2).to(F64), mismatches[-1:].to(F64),
                           torch.zeros(0, dtype=F64, device=w.device) if counts is None
                           else counts])
        if self._reduced:
            tally = distributed.all_reduce_sum(tally.clone(), self._group)
        self._ncc_hits = float(tally[2])
        if counts is not None and not torch.equal(tally[3:], self._counts):
            raise ValueError(
                "update_predictions saw class counts different from update's; "
                "run the second pass over exactly the data of the first"
            )
        return tally[:2] / self._counts.sum()

    def _require_data(self, caller: str) -> None:
        if self._means is None:
            raise ValueError(f"{caller} needs data: call update with at least one sample first")

    def _require_all_classes(self) -> None:
        missing = torch.nonzero(self._counts == 0)
        if missing.numel():
            raise ValueError(
                f"class {int(missing[0, 0])} has no samples in the data; NC metrics need every "
                f"class of num_classes={self.num_classes} present"
            )


class HeldOutNC4:
    """nc4_test: argmax of W h + b on held-out features against the nearest train class mean.

    Built from an accumulator after its ``all_reduce``, each rank adds its own held-out shard
    and ``compute`` (collective) sums the counts over the group.
    """

    def __init__(
        self, train: NCAccumulator, weight: ArrayLike, bias: ArrayLike | None = None
    ) -> None:
        train._require_data("HeldOutNC4")
        train._require_all_classes()
        w, b, _ = as_classifier(weight, bias, train._means)
        self._like = train._means.new_empty((0, train._means.shape[1]))
        self._predictions = Predictions.build(train._counts, train._means, w, b, None,
                                               train._tile())
        self._mismatches = torch.zeros(2, dtype=torch.int64, device=w.device)
        self._samples = self._labelled = 0
        self._ncc: tuple[float, float, float] | None = None
        self._reduced, self._group = train._reduced, train._group

    def update(self, features: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add a batch of held-out features (N, d), any size or dtype; with labels (nc4_test
        needs none) the nearest-class-centre hits are counted too."""
        feats = as_features(features, self._like)
        labs = None if labels is None else as_tensor(labels, feats.device)
        if labs is not None:
            check_labels(labs, feats.shape, self._predictions.proj.shape[1])
            self._labelled += feats.shape[0]
        counts = self._predictions.mismatches(feats, None if labs is None else labs.long())
        self._mismatches[:len(counts)] += counts
        self._samples += feats.shape[0]

    def merge(self, other: HeldOutNC4) -> HeldOutNC4:
        """A new HeldOutNC4 over both inputs' samples; both must score the same classifier
        against the same train means."""
        mine, theirs = self._predictions, other._predictions
        if mine is not theirs and not all(
            torch.equal(x, y) for x, y in ((mine.proj, theirs.proj),
                                           (mine.offsets, theirs.offsets))
        ):
            raise ValueError("merge needs HeldOutNC4s of the same classifier and train means")
        out = copy.copy(self)
        out._mismatches = self._mismatches + other._mismatches.to(self._mismatches.device)
        out._samples = self._samples + other._samples
        out._labelled = self._labelled + other._labelled
        return out

    def compute(self) -> float:
        """The fraction of held-out samples seen so far where the two predictions differ."""
        tally = torch.cat([self._mismatches.to(F64),
                           torch.tensor([self._samples, self._labelled], dtype=F64,
                                        device=self._like.device)])
        if self._reduced:
            tally = distributed.all_reduce_sum(tally, self._group)
        mismatches, hits, samples, labelled = tally.tolist()
        if samples == 0:
            raise ValueError("nc4_test needs data: call update with at least one sample first")
        self._ncc = (hits, labelled, samples)
        return mismatches / samples

    def nearest_centre_accuracy(self) -> float:
        """The share of held-out samples (all ranks) whose nearest train class mean is their
        label, once ``compute`` has run; every batch must have had labels."""
        if self._ncc is None:
            raise ValueError("nearest_centre_accuracy is known after compute")
        hits, labelled, samples = self._ncc
        if labelled != samples:
            raise ValueError("nearest_centre_accuracy needs labels with every update")
        return hits / labelled

"""The streaming accumulators: NCAccumulator (train split) and HeldOutNC4 (a test split)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ncsweep.nc.geometry import (
    _centred_means,
    _geometry_metrics,
    _orthogonal_frame_distance,
    _RowSpace,
    _rowspace,
    _rowspace_metrics,
)
from ncsweep.nc.tensors import (
    EPS,
    F64,
    UNLIMITED_BYTES,
    ArrayLike,
    _add_gram_upper,
    _as_tensor,
    _check_classes,
    _check_classifier_shapes,
    _check_labels,
    _check_matrix,
    _features,
    _float64_chunks,
    _symmetric_from_upper,
)

ROWSPACE_COND_LIMIT = 1e4

KEYS = (
    "nc1",
    "nc2_w",
    "nc2_m",
    "nc2_equinorm_w",
    "nc2_equinorm_m",
    "nc2_equiangle_w",
    "nc2_equiangle_m",
    "nc2_maxangle_w",
    "nc2_maxangle_m",
    "nc3",
    "nc3_duality",
    "nc4",
    "nc4_bias",
    "cdnv",
    "trace_ratio",
    "w_norm_mean",
    "m_norm_mean",
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
) -> dict[str, float]:
    """All NC metrics of one data set in one call: an accumulator fed a single batch."""
    feats = _as_tensor(features)
    w = _as_tensor(weight)
    _check_matrix(feats, "features", "(N, d)")
    _check_matrix(w, "weight", "(num_classes, d)")
    k = w.shape[0] if num_classes is None else int(num_classes)
    _check_classes(k)
    _check_classifier_shapes(w, None if bias is None else _as_tensor(bias), k, feats.shape[1])
    acc = NCAccumulator(k, max_feature_bytes=UNLIMITED_BYTES)
    acc._update(feats, labels, copy=False)
    return acc.compute(w, bias)




@dataclass(frozen=True)
class _Predictions:
    """Logits and nearest-centre scores of one classifier in one product [W; 2M] h + offsets.

    With a row space, the nearest centre of P_W h is scored too: from the logits as
    2 (M V_r) coords (W h), which amplifies rounding by s_1 / s_r, while that ratio is at most
    ROWSPACE_COND_LIMIT; past it, by K more rows 2 M P_W in the product.
    """

    proj: torch.Tensor
    offsets: torch.Tensor
    bias: torch.Tensor
    from_logits: torch.Tensor | None
    from_logits_offsets: torch.Tensor | None

    @classmethod
    def build(
        cls, counts: torch.Tensor, means: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
        space: _RowSpace | None = None,
    ) -> _Predictions:
        """nc4's centres M and, when given W's row space, nc4_rowspace's centres M P_W."""
        mu_g, m = _centred_means(counts, means)
        sets = [m]
        from_logits = from_logits_offsets = None
        if space is not None:
            m_r = m @ space.basis
            offset_r = -m_r.square().sum(dim=1) - 2.0 * (m_r @ (space.basis.T @ mu_g))
            if space.condition <= ROWSPACE_COND_LIMIT:
                from_logits, from_logits_offsets = 2.0 * m_r @ space.coords, offset_r[:, None]
            else:
                sets.append(m_r @ space.basis.T)
        proj = torch.cat([w, *(2.0 * c for c in sets)])
        zero = torch.zeros_like(b)
        offsets = torch.cat([zero, *(-c.square().sum(dim=1) - 2.0 * (c @ mu_g) for c in sets)])
        return cls(proj, offsets[:, None], b[:, None], from_logits, from_logits_offsets)

    def mismatches(self, feats: torch.Tensor) -> torch.Tensor:
        """Per centre set (M, then M P_W), the samples whose argmax W h + b is not the nearest."""
        k = self.bias.shape[0]
        groups = self.proj.shape[0] // k
        count = torch.zeros(groups - 1 + (self.from_logits is not None), dtype=torch.int64,
                            device=self.proj.device)
        finite = torch.ones((), dtype=torch.bool, device=self.proj.device)
        for _, x in _float64_chunks(feats):
            scores = torch.addmm(self.offsets, self.proj, x.T).view(groups, k, -1)
            finite &= torch.isfinite(scores).all()
            predicted = (scores[0] + self.bias).argmax(dim=0)
            nearest = [scores[1:].argmax(dim=1)]
            if self.from_logits is not None:
                rowspace = torch.addmm(self.from_logits_offsets, self.from_logits, scores[0])
                nearest.append(rowspace.argmax(dim=0)[None])
            count += (torch.cat(nearest) != predicted).sum(dim=1)
        if not bool(finite):
            raise ValueError("features contain NaN or inf")
        return count


@dataclass
class _Pass2:
    """Running nc4 and nc4_rowspace disagreement counts of update_predictions, one classifier."""

    weight: torch.Tensor
    bias: torch.Tensor
    space: _RowSpace | None
    predictions: _Predictions
    mismatches: torch.Tensor
    counts: torch.Tensor


class NCAccumulator:
    """Streaming NC metrics: ``update`` per batch, optional ``update_predictions``, ``compute``."""

    def __init__(self, num_classes: int, max_feature_bytes: int = 512 * 2**20) -> None:
        _check_classes(num_classes)
        self.num_classes = int(num_classes)
        self.max_feature_bytes = int(max_feature_bytes)
        self._counts: torch.Tensor | None = None
        self._means: torch.Tensor | None = None
        self._sq_dev: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        self._kept_bytes = 0
        self._pass2: _Pass2 | None = None

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
        w, b, weight_eps = self._classifier(weight, bias)
        if self._pass2 is None:
            space = _rowspace(w, weight_eps)
            predictions = _Predictions.build(self._counts, self._means, w, b, space)
            zero = torch.zeros(1 + (space is not None), dtype=torch.int64, device=w.device)
            self._pass2 = _Pass2(w, b, space, predictions, zero, torch.zeros_like(self._counts))
        elif not (torch.equal(w, self._pass2.weight) and torch.equal(b, self._pass2.bias)):
            raise ValueError(
                "update_predictions got a different weight or bias than in its earlier calls; "
                "use one classifier for the whole second pass"
            )
        self._pass2.mismatches += self._pass2.predictions.mismatches(feats)
        self._pass2.counts += torch.bincount(labs, minlength=self.num_classes).to(F64)

    def compute(self, weight: ArrayLike, bias: ArrayLike | None = None) -> dict[str, float]:
        """Every metric of COMPUTE_KEYS for classifier (weight, bias) from the accumulated data."""
        self._require_data("compute")
        self._require_all_classes()
        w, b, weight_eps = self._classifier(weight, bias)
        sigma_w = _symmetric_from_upper(self._scatter) / self._counts.sum()
        values = _geometry_metrics(self._counts, self._means, self._sq_dev, sigma_w, w, b)
        space = self._pass2.space if self._pass2 is not None else _rowspace(w, weight_eps)
        if space is None:
            values |= {f"{key}_rowspace": values[key] for key in ("nc1", "nc2_m", "nc3_duality")}
        else:
            values |= _rowspace_metrics(self._counts, self._means, sigma_w, w, space.basis)
        values["nc2_of"] = _orthogonal_frame_distance(self._means)
        values["nc4"], values["nc4_rowspace"] = self._nc4(w, b, space)
        stacked = torch.stack([values[k] for k in COMPUTE_KEYS]).cpu().tolist()
        return dict(zip(COMPUTE_KEYS, stacked, strict=True))

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

    def _update(self, features: ArrayLike, labels: ArrayLike, copy: bool) -> None:
        if self._pass2 is not None:
            raise ValueError("update called after update_predictions: finish pass 1 before pass 2")
        feats, labs = self._batch(features, labels)
        if feats.shape[0] == 0:
            return
        self._init_state(feats.shape[1], feats.device)
        for rows, x in _float64_chunks(feats):
            self._merge(x, labs[rows])
        self._keep(feats, labs, copy)

    def _batch(self, features: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (features, int64 labels) on the state's device."""
        feats = _features(features, self._means)
        labs = _as_tensor(labels, feats.device)
        _check_labels(labs, feats.shape, self.num_classes)
        return feats, labs.long()

    def _init_state(self, d: int, device: torch.device) -> None:
        if self._means is not None:
            return
        k = self.num_classes
        self._counts = torch.zeros(k, dtype=F64, device=device)
        self._means = torch.zeros((k, d), dtype=F64, device=device)
        self._sq_dev = torch.zeros(k, dtype=F64, device=device)
        self._scatter = torch.zeros((d, d), dtype=F64, device=device)

    def _merge(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Centre float64 chunk x in place by its class means and merge it (Chan et al.)."""
        k = self.num_classes
        n_b = torch.bincount(labels, minlength=k).to(F64)
        sums = torch.zeros((k, x.shape[1]), dtype=F64, device=x.device).index_add_(0, labels, x)
        if not bool(torch.isfinite(sums).all()):
            raise ValueError("features contain NaN or inf")
        means_b = sums / n_b.clamp(min=1)[:, None]
        onehot = torch.nn.functional.one_hot(labels, k).to(F64)
        x.addmm_(onehot, means_b, alpha=-1.0)
        sq_b = torch.zeros(k, dtype=F64, device=x.device)
        sq_b.index_add_(0, labels, torch.linalg.vector_norm(x, dim=1).square())
        total = self._counts + n_b
        delta = means_b - self._means
        pair_weight = self._counts * n_b / total.clamp(min=1)
        _add_gram_upper(self._scatter, x)
        self._scatter.addmm_(delta.T, pair_weight[:, None] * delta)
        self._sq_dev += sq_b + pair_weight * delta.square().sum(dim=1)
        self._means += delta * (n_b / total.clamp(min=1))[:, None]
        self._counts = total

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

    def _classifier(
        self, weight: ArrayLike, bias: ArrayLike | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Validated float64 (W, b) on the state's device (b = 0 for None), eps of W's dtype."""
        device = self._means.device
        w = _as_tensor(weight, device)
        b = None if bias is None else _as_tensor(bias, device)
        _check_matrix(w, "weight", "(num_classes, d)")
        _check_classifier_shapes(w, b, self.num_classes, self._means.shape[1])
        weight_eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else EPS
        w = w.to(F64)
        b = torch.zeros(self.num_classes, dtype=F64, device=device) if b is None else b.to(F64)
        if not bool(torch.isfinite(w).all() & torch.isfinite(b).all()):
            raise ValueError("weight or bias contains NaN or inf")
        return w, b, weight_eps

    def _nc4(
        self, w: torch.Tensor, b: torch.Tensor, space: _RowSpace | None
    ) -> torch.Tensor:
        """(nc4, nc4_rowspace) from the second pass or the kept batches."""
        total = self._counts.sum()
        if self._pass2 is not None:
            if not torch.equal(w, self._pass2.weight) or not torch.equal(b, self._pass2.bias):
                raise ValueError(
                    "compute got a different weight or bias than update_predictions; "
                    "nc4 must use the classifier of the second pass"
                )
            if not torch.equal(self._pass2.counts, self._counts):
                raise ValueError(
                    "update_predictions saw class counts different from update's; "
                    "run the second pass over exactly the data of the first"
                )
            return self._pass2.mismatches.expand(2).to(F64) / total
        if self._kept is None:
            raise ValueError(
                f"nc4 needs a second pass: the features exceeded max_feature_bytes="
                f"{self.max_feature_bytes} and were not kept; call update_predictions(features, "
                f"labels, weight, bias) over the same data before compute"
            )
        predictions = _Predictions.build(self._counts, self._means, w, b, space)
        mismatches = sum(predictions.mismatches(f) for f, _ in self._kept)
        return mismatches.expand(2).to(F64) / total

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
    """nc4_test: argmax of W h + b on held-out features against the nearest train class mean."""

    def __init__(
        self, train: NCAccumulator, weight: ArrayLike, bias: ArrayLike | None = None
    ) -> None:
        train._require_data("HeldOutNC4")
        train._require_all_classes()
        w, b, _ = train._classifier(weight, bias)
        self._like = train._means.new_empty((0, train._means.shape[1]))
        self._predictions = _Predictions.build(train._counts, train._means, w, b)
        self._mismatches = torch.zeros(1, dtype=torch.int64, device=w.device)
        self._samples = 0

    def update(self, features: ArrayLike) -> None:
        """Add a batch of held-out features (N, d), any size or dtype; labels are not needed."""
        feats = _features(features, self._like)
        self._mismatches += self._predictions.mismatches(feats)
        self._samples += feats.shape[0]

    def compute(self) -> float:
        """The fraction of held-out samples seen so far where the two predictions differ."""
        if self._samples == 0:
            raise ValueError("nc4_test needs data: call update with at least one sample first")
        return float(self._mismatches[0]) / self._samples



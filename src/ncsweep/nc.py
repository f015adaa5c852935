"""Neural Collapse metrics, each key computed by its formula in docs/nc-metrics.md.

Keys from the reference table: ``nc1``, ``nc2_w``, ``nc2_m``, ``nc2_equinorm_w``,
``nc2_equinorm_m``, ``nc2_equiangle_w``, ``nc2_equiangle_m``, ``nc2_maxangle_w``,
``nc2_maxangle_m``, ``nc3``, ``nc3_duality``, ``nc4``, ``nc4_bias``. Extra keys:

- ``cdnv``: class-distance normalised variance (Galanti et al. 2022), the mean over pairs
  k < l of (var_k + var_l) / (2 ||mu_k - mu_l||^2), var_k = mean over class k of ||h - mu_k||^2.
- ``trace_ratio``: tr(Sigma_W) / tr(Sigma_B).
- ``w_norm_mean``, ``m_norm_mean``: mean row norm of W and of M (scale, not collapse).

Keys that see what the loss sees (section "Metrics that see what the loss sees"):

- ``nc1_rowspace``, ``nc2_m_rowspace``, ``nc3_duality_rowspace``, ``nc4_rowspace``: the key
  of the same name on h' = P_W h, P_W = W^+ W the orthogonal projector onto W's row space,
  with class and global means, Sigma_W and Sigma_B recomputed from h'. Components of h in W's
  null space never reach the loss. ``nc3`` and ``nc2_w`` need no variant (W P_W = W).
- ``nc2_of``: || G / ||G|| - I_K / sqrt(K) ||, G = Mbar Mbar^T with Mbar = [mu_k] the
  uncentred class means; 0 when the means form an orthogonal frame (one-hot means).
- ``nc4_test``: ``nc4`` on held-out data, argmax_k (W h + b)_k against the nearest class
  mean of the train set; from ``HeldOutNC4``, streamed over the test batches::

      test_nc4 = HeldOutNC4(train_accumulator, weight, bias)  # after update() over train
      for x, _ in test_batches: test_nc4.update(backbone(x))
      row["nc4_test"] = test_nc4.compute()

``KEYS`` are the keys of the first landing, ``ROWSPACE_KEYS`` the four row-space keys,
``COMPUTE_KEYS`` everything ``compute`` and ``nc_metrics`` return (KEYS, ROWSPACE_KEYS,
``nc2_of``), ``HELDOUT_KEYS`` = (``nc4_test``,). ``nc4_bias`` = ||W mu_G + b|| is not a
collapse measure where the loss is blind to a shift b + t 1 (CE without a bias penalty).

Conventions:

- Biases never enter NC1-NC3; ``nc4`` uses the full prediction W h + b; b = 0 when bias is None.
- ``nc2_equiangle_*`` and ``nc2_maxangle_*`` run over the K(K-1) ordered pairs k != l (the
  off-diagonal of the cosine matrix, as in Papyan et al.'s code). The mean is the same over
  unordered pairs; the ddof=1 std is not, and ordered pairs keep it defined at K = 2.
- Sigma_B^+: the rows of M satisfy sum_k n_k M_k = 0, so M = Q Q^T M with Q (K x K-1) an
  orthonormal basis of the complement of the counts n. Sigma_B = R^T R / K with R = Q^T M, so
  rank <= K-1 holds by construction. Its eigenvalues s_j^2 / K come from the SVD of R (K-1 x d);
  those at or below lambda_max * max(d, K) * eps(float64) are dropped, as
  ``numpy.linalg.pinv(Sigma_B, rcond=max(d, K) * eps, hermitian=True)`` would.
- All arithmetic is float64 on the device of the first batch. The NC1-NC3 state does not grow
  with N: class counts (K), class means (K x d), per-class sums of squared deviations (K) and
  one within-class scatter (d x d). Batches are converted to float64 in row chunks of at most
  2^22 elements (32 MiB), so no full float64 copy of the data is made. Each chunk is centred by
  its own class means before squaring and merged by Chan et al.'s parallel update
  (+ sum_k n_a n_b / (n_a + n_b) delta_k delta_k^T), which keeps NC1 accurate on nearly
  collapsed float32 features. The chunk's scatter is formed in upper block strips of at least
  128 columns (up to 4 blocks), as symmetry allows, which is cheaper than one full Gram.
- ``nc4`` needs the final class means. ``NCAccumulator.update`` keeps copies of the batches
  (input dtype, on the state's device) while features plus labels stay within
  ``max_feature_bytes``, and ``compute`` then gets ``nc4`` without a second pass. Past the
  budget the copies are dropped, and a second pass ``update_predictions`` over the same data is
  needed. Nearest centres minimise ||h - mu_k||^2 - ||h - mu_G||^2 = ||M_k||^2 + 2 mu_G.M_k
  - 2 h.M_k, an N x K float64 product (rounding ~ eps ||h|| ||M_k||, far below the gaps
  ||M_k - M_l||^2 unless the features' offset dwarfs the spread of the means by ~1e10). Exact
  ties in the logits or the distances resolve to the lowest class index in both.
- P_W = V_r V_r^T from the float64 SVD W = U S V^T, keeping the r singular values
  s > s_max * max(max(K, d) eps64, sqrt(min(K, d)) eps_W): the float64 SVD's own rounding
  (``torch.linalg.pinv``'s default) or the bound eps_W / 2 ||W|| of W's rounding to its own
  dtype, whichever is larger, so a float32 simplex-ETF head at d = K has rank K-1. The
  row-space keys are computed in the r coordinates V_r^T h (O(K d^2) for V_r^T Sigma_W V_r);
  when r = d, P_W = I and they equal the full keys exactly. ``nc4_rowspace`` comes with
  ``nc4`` (kept batches or ``update_predictions``): V_r^T h = S_r^-1 U_r^T (W h), so its
  centre scores follow from the logits by a K x K product while s_1 / s_r <= 1e4
  (``ROWSPACE_COND_LIMIT``, which bounds the precision this loses); past it, from K more rows
  2 M P_W in nc4's N x K product.
- Undefined metrics (zero-norm W, a zero row, coinciding class means, class means that
  differ only in W's null space, where W M^T = 0) raise ValueError instead of returning NaN.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

F64 = torch.float64
EPS = float(np.finfo(np.float64).eps)
CHUNK_ELEMENTS = 2**22
GRAM_STRIPS = 4
GRAM_BLOCK = 128
UNLIMITED_BYTES = 2**62
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

ArrayLike = torch.Tensor | np.ndarray


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


class _RowSpace(NamedTuple):
    """W's row space: basis V_r (d x r) and coords = S_r^-1 U_r^T, with V_r^T h = coords W h."""

    basis: torch.Tensor
    coords: torch.Tensor
    condition: float


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


def _geometry_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sq_dev: torch.Tensor,
    sigma_w: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """NC1-NC3, nc4_bias and the extra keys from the accumulated float64 state."""
    mu_g, m = _centred_means(counts, means)
    trace_b = m.square().sum() / m.shape[0]
    if float(trace_b) == 0.0:
        raise ValueError("all class means coincide: Sigma_B is zero, so nc1 is undefined")
    w_norms, m_norms = _row_norms(w, "W"), _row_norms(m, "M (class mean minus global mean)")
    angles_w, angles_m = _angle_metrics(w, w_norms), _angle_metrics(m, m_norms)
    return {
        "nc1": _nc1(m, counts, sigma_w),
        "nc2_w": _etf_distance(w @ w.T, "W W^T"),
        "nc2_m": _etf_distance(m @ m.T, "M M^T"),
        "nc2_equinorm_w": w_norms.std(correction=1) / w_norms.mean(),
        "nc2_equinorm_m": m_norms.std(correction=1) / m_norms.mean(),
        "nc2_equiangle_w": angles_w[0],
        "nc2_equiangle_m": angles_m[0],
        "nc2_maxangle_w": angles_w[1],
        "nc2_maxangle_m": angles_m[1],
        "nc3": _etf_distance(w @ m.T, "W M^T"),
        "nc3_duality": (w / w.norm() - m / m.norm()).square().sum(),
        "nc4_bias": torch.linalg.vector_norm(w @ mu_g + b),
        "cdnv": _cdnv(m, sq_dev / counts),
        "trace_ratio": sigma_w.trace() / trace_b,
        "w_norm_mean": w_norms.mean(),
        "m_norm_mean": m_norms.mean(),
    }


def _rowspace(w: torch.Tensor, weight_eps: float) -> _RowSpace | None:
    """W's row space from its SVD, P_W = V_r V_r^T; None when r = d (P_W = I)."""
    k, d = w.shape
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rtol = max(max(k, d) * EPS, math.sqrt(min(k, d)) * weight_eps)
    rank = int((s > s[0] * rtol).sum())
    if rank == d:
        return None
    s_r = s[:rank]
    condition = float(s_r[0] / s_r[-1]) if rank else math.inf
    return _RowSpace(vh[:rank].T, u[:, :rank].T / s_r[:, None], condition)


def _rowspace_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sigma_w: torch.Tensor,
    w: torch.Tensor,
    basis: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """nc1, nc2_m, nc3_duality of P_W h, in the coordinates V_r^T h of W's row space."""
    k, d = means.shape
    m_r = _centred_means(counts, means)[1] @ basis
    m_p = m_r @ basis.T
    return {
        "nc1_rowspace": _nc1(m_r, counts, basis.T @ sigma_w @ basis, cutoff_dim=max(d, k)),
        "nc2_m_rowspace": _etf_distance(m_r @ m_r.T, "M P_W (M P_W)^T"),
        "nc3_duality_rowspace": (w / w.norm() - m_p / m_p.norm()).square().sum(),
    }


def _centred_means(counts: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-weighted global mean mu_G and M = [mu_k - mu_G], re-centred once for accuracy."""
    n_total = counts.sum()
    mu_g = counts @ means / n_total
    m = means - mu_g
    correction = counts @ m / n_total
    return mu_g + correction, m - correction


def _nc1(
    m: torch.Tensor, counts: torch.Tensor, sigma_w: torch.Tensor, cutoff_dim: int | None = None
) -> torch.Tensor:
    """tr(Sigma_W Sigma_B^+) / K through the SVD of M restricted to the complement of counts.

    The pseudo-inverse drops eigenvalues at or below max(cutoff_dim, K) eps times the largest;
    cutoff_dim defaults to M's width d.
    """
    k, d = m.shape
    d = d if cutoff_dim is None else cutoff_dim
    q = torch.linalg.qr(counts[:, None], mode="complete").Q[:, 1:]
    s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)[1:]
    eig = s.square() / k
    keep = eig > eig[0] * max(d, k) * EPS
    inverse = torch.where(keep, 1.0 / torch.where(keep, eig, 1.0), 0.0)
    quadratic = ((vh @ sigma_w) * vh).sum(dim=1)
    return (quadratic * inverse).sum() / k


def _simplex_etf(k: int, like: torch.Tensor) -> torch.Tensor:
    """E = (I - 11^T / K) / sqrt(K - 1), the normalised simplex-ETF Gram matrix."""
    eye = torch.eye(k, dtype=F64, device=like.device)
    return (eye - 1.0 / k) / math.sqrt(k - 1)


def _etf_distance(gram: torch.Tensor, name: str) -> torch.Tensor:
    """|| G / ||G|| - E ||, the distance of a normalised K x K product from the simplex ETF."""
    return _normalised_distance(gram, _simplex_etf(gram.shape[0], gram), name, "simplex ETF")


def _normalised_distance(
    gram: torch.Tensor, target: torch.Tensor, name: str, target_name: str
) -> torch.Tensor:
    """|| G / ||G|| - T || for a unit-norm target Gram matrix T, refusing G = 0."""
    norm = torch.linalg.matrix_norm(gram)
    if float(norm) == 0.0:
        raise ValueError(f"{name} is zero, so its distance to the {target_name} is undefined")
    return torch.linalg.matrix_norm(gram / norm - target)


def _orthogonal_frame_distance(means: torch.Tensor) -> torch.Tensor:
    """nc2_of: || G / ||G|| - I / sqrt(K) || for G the Gram of the uncentred class means."""
    k = means.shape[0]
    eye = torch.eye(k, dtype=F64, device=means.device) / math.sqrt(k)
    return _normalised_distance(means @ means.T, eye, "the Gram of the class means", "I_K")


def _row_norms(x: torch.Tensor, name: str) -> torch.Tensor:
    """Row norms, refusing exact zeros, for which cosines are undefined."""
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ValueError(
            f"row {int(zero[0, 0])} of {name} is zero, so the cosines of nc2 are undefined"
        )
    return norms


def _angle_metrics(x: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(std, mean |cos + 1/(K-1)|) of cos(x_k, x_l) over the K(K-1) ordered pairs k != l."""
    k = x.shape[0]
    cos = (x @ x.T) / (norms[:, None] * norms[None, :])
    off = cos[~torch.eye(k, dtype=torch.bool, device=x.device)]
    return off.std(correction=1), (off + 1.0 / (k - 1)).abs().mean()


def _cdnv(m: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """Mean over k < l of (var_k + var_l) / (2 ||mu_k - mu_l||^2)."""
    dist = torch.cdist(m, m, compute_mode="donot_use_mm_for_euclid_dist").square()
    rows, cols = torch.triu_indices(m.shape[0], m.shape[0], offset=1, device=m.device)
    pair_dist = dist[rows, cols]
    same = torch.nonzero(pair_dist == 0)
    if same.numel():
        i = int(same[0, 0])
        raise ValueError(
            f"classes {int(rows[i])} and {int(cols[i])} have identical means, so cdnv is undefined"
        )
    return ((variances[rows] + variances[cols]) / (2.0 * pair_dist)).mean()


def _as_tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """Detached tensor view of a tensor or numpy array, on `device` when given."""
    is_tensor = isinstance(x, torch.Tensor)
    t = x.detach() if is_tensor else torch.from_numpy(np.ascontiguousarray(x))
    return t if device is None else t.to(device)


def _features(features: ArrayLike, like: torch.Tensor | None) -> torch.Tensor:
    """Validated real (N, d) features on the device and of the width d of `like`, if given."""
    feats = _as_tensor(features, None if like is None else like.device)
    _check_matrix(feats, "features", "(N, d)")
    if feats.dtype == torch.bool or feats.is_complex():
        raise ValueError(f"features must be real numbers, got dtype {feats.dtype}")
    if like is not None and feats.shape[1] != like.shape[1]:
        raise ValueError(
            f"features have shape {tuple(feats.shape)} but earlier batches had d={like.shape[1]}"
        )
    return feats


def _check_classes(k: int) -> None:
    if int(k) < 2:
        raise ValueError(f"NC metrics need at least 2 classes, got num_classes={k}")


def _check_matrix(x: torch.Tensor, name: str, expected: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D {expected}, got shape {tuple(x.shape)}")


def _check_labels(labels: torch.Tensor, feature_shape: torch.Size, k: int) -> None:
    n = feature_shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have shape ({n},) to match features of shape {tuple(feature_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n == 0:
        return
    low, high = torch.stack(torch.aminmax(labels.long())).tolist()
    if low < 0 or high >= k:
        raise ValueError(
            f"labels must lie in [0, {k}) for num_classes={k}, got values in [{low}, {high}]"
        )


def _check_classifier_shapes(w: torch.Tensor, b: torch.Tensor | None, k: int, d: int) -> None:
    if tuple(w.shape) != (k, d):
        raise ValueError(
            f"weight must have shape (num_classes, d) = ({k}, {d}), got {tuple(w.shape)}"
        )
    if b is not None and tuple(b.shape) != (k,):
        raise ValueError(f"bias must have shape (num_classes,) = ({k},), got {tuple(b.shape)}")


def _gram_edges(d: int) -> list[int]:
    """Column blocks of width >= GRAM_BLOCK for the upper block strips of a Gram matrix."""
    blocks = max(1, min(GRAM_STRIPS, d // GRAM_BLOCK))
    return [round(i * d / blocks) for i in range(blocks + 1)]


def _add_gram_upper(scatter: torch.Tensor, x: torch.Tensor) -> None:
    """Add the block-upper part of x^T x to scatter: symmetry saves up to ~3/8 of the flops."""
    edges = _gram_edges(x.shape[1])
    for lo, hi in itertools.pairwise(edges):
        scatter[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


def _symmetric_from_upper(scatter: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from one whose block-upper part (see _gram_edges) is complete."""
    d = scatter.shape[0]
    edges = torch.tensor(_gram_edges(d)[1:-1], dtype=torch.int64, device=scatter.device)
    block = torch.bucketize(torch.arange(d, device=scatter.device), edges, right=True)
    upper = torch.where(block[:, None] > block[None, :], scatter.T, scatter)
    return (upper + upper.T) / 2.0


def _float64_chunks(feats: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row chunks of feats copied to float64 in one reused buffer of at most CHUNK_ELEMENTS."""
    n, d = feats.shape
    step = max(1, CHUNK_ELEMENTS // max(d, 1))
    buffer = torch.empty((min(step, n), d), dtype=F64, device=feats.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        x = buffer[: rows.stop - start]
        x.copy_(feats[rows])
        yield rows, x

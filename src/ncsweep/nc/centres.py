"""The nearest-class-centre classifier of a layer: how many samples its train class means get right.

Decisions are float64: on centred features x = h - mu_G the nearest centre maximises
2 x.M_k - ||M_k||^2 (= ||x||^2 - ||x - M_k||^2), M_k = mu_k - mu_G; exact ties go to the
lowest class index. Only tallies (correct, samples) are kept, so they merge by addition.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch

from ncsweep.nc.geometry import centred_means
from ncsweep.nc.state import State
from ncsweep.nc.tensors import (
    BLOCK_ELEMENTS,
    CHUNK_ELEMENTS,
    F64,
    ArrayLike,
    as_features,
    as_tensor,
    check_labels,
    float64_chunks,
)


class ClassMeans(Protocol):
    """Class counts (K,) and class means (K, d): a ``State`` or a layer's ``Moments``."""

    @property
    def counts(self) -> torch.Tensor: ...

    @property
    def means(self) -> torch.Tensor: ...


class NearestCentreTally:
    """Correct nearest-centre decisions and samples seen, against fixed class means."""

    def __init__(self, state: ClassMeans | State) -> None:
        mu_g, m = centred_means(state.counts, state.means)
        self.mu_g, self.proj, self.offsets = mu_g, 2.0 * m, -m.square().sum(dim=1)
        self.tally = torch.zeros(2, dtype=torch.int64, device=m.device)

    def predict(self, features: ArrayLike, overwrite: bool = False) -> torch.Tensor:
        """The index of the nearest class mean for each row of (N, d) features; ``overwrite``
        lets a float64 batch be centred in place (features the caller hands over)."""
        feats = as_features(features, self.proj)
        k, d = self.proj.shape
        rows = max(1, min(BLOCK_ELEMENTS // k, CHUNK_ELEMENTS // max(d, 1)))
        chunks = (((slice(lo, lo + rows), feats[lo:lo + rows])
                   for lo in range(0, feats.shape[0], rows))
                  if overwrite and feats.dtype == F64 else float64_chunks(feats, rows))
        out = []
        for _, x in chunks:
            scores = torch.addmm(self.offsets[None], x.sub_(self.mu_g), self.proj.T)
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("features contain NaN or inf")
            out.append(scores.argmax(dim=1))
        if not out:
            return torch.zeros(0, dtype=torch.int64, device=self.proj.device)
        return torch.cat(out)

    def update(self, features: ArrayLike, labels: ArrayLike, overwrite: bool = False) -> None:
        """Count the batch's samples and those whose nearest class mean is their label
        (``overwrite``: as for ``predict``)."""
        predicted = self.predict(features, overwrite)
        labs = as_tensor(labels, predicted.device)
        check_labels(labs, torch.Size((predicted.shape[0], self.proj.shape[1])),
                     self.proj.shape[0])
        hits = (predicted == labs.long()).sum()
        self.tally += torch.stack([hits, hits.new_tensor(predicted.shape[0])])

    def merge(self, other: NearestCentreTally) -> NearestCentreTally:
        """A tally over both inputs' samples; both must score against the same class means."""
        if not (torch.equal(self.proj, other.proj) and torch.equal(self.mu_g, other.mu_g)):
            raise ValueError("merge needs NearestCentreTally objects of the same class means")
        out = copy.copy(self)
        out.tally = self.tally + other.tally.to(self.tally.device)
        return out


def accuracy(tally: torch.Tensor) -> float:
    """correct / samples of a (correct, samples) tally, refused without samples."""
    correct, samples = tally.to(F64).tolist()
    if samples == 0:
        raise ValueError("nearest-centre accuracy needs data: update with at least one sample")
    return correct / samples

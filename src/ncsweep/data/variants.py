"""Label and sampling variants of a train split, one implementation for every data set.

On the train split, in this order: a class subset (``classes``, relabelled 0..K'-1, the test
split too), a balanced subsample (``samples_per_class``; ``test_samples_per_class`` for the
test split), a long-tailed profile (``imbalance``), then random labels or label noise. The
clean labels stay in ``Split.clean_labels``; the test split is never relabelled.

Every draw comes from a numpy generator that ``DrawSeeds`` derives from one data seed and the
purpose of the draw, so changing one option never changes the draws of another.

Rules (each broken rule is a ``ConfigError`` naming the key, before any sample is drawn):

- an option that qualifies a kind is refused without it: ``imbalance_ratio`` without
  ``imbalance``, ``imbalance_minority_fraction`` without ``imbalance=step``,
  ``label_noise_rate`` without ``label_noise`` (``random_labels`` replaces every label and
  takes neither);
- ``label_noise`` needs a ``label_noise_rate`` in [0, 1]; a rate > 0 that flips no label
  (round(rate * n_k) = 0 for every class k) is refused. A rate of 0 with a kind is a clean run
  that still logs the clean-label metrics, so that a sweep over rates has one set of columns;
- ``imbalance`` defaults to ``imbalance_ratio`` 100 and, for ``step``, a minority fraction of
  0.5; the ratio must be >= 1 and at most the smallest available class size n_avail (a
  larger one would leave the smallest class less than one sample); ``step`` needs
  1 <= round(fraction * K) <= K - 1 minority classes.

What was realised goes into the data set's ``info`` (and so the run's summary):
``train_class_counts`` (the labels trained on), ``train_class_counts_clean``,
``train_class_count_min``/``max`` (trained labels), ``label_noise_actual`` (the share of
train labels that differ from the clean ones), ``imbalance_ratio_actual`` (largest over
smallest clean class count) and ``minority_classes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ncsweep.config import ConfigError
from ncsweep.data.containers import Split, check_declared

IMBALANCE_PROFILES = ("exp", "step")
NOISE_KINDS = ("symmetric", "pair")
DEFAULT_IMBALANCE_RATIO = 100.0
DEFAULT_MINORITY_FRACTION = 0.5


class DrawSeeds:
    """One independent numpy generator per purpose, all fixed by one seed."""

    PURPOSES = ("subsample", "test_subsample", "imbalance", "random_labels", "label_noise")

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __call__(self, purpose: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.PURPOSES.index(purpose)])


@dataclass(frozen=True)
class Variants:
    """The variant options of ``conf/dataset/base/variants.yaml``, checked and applied."""

    classes: Sequence[int] | None = None
    samples_per_class: int | None = None
    test_samples_per_class: int | None = None
    random_labels: bool = False
    imbalance: str | None = None
    imbalance_ratio: float | None = None
    imbalance_minority_fraction: float | None = None
    label_noise: str | None = None
    label_noise_rate: float | None = None
    seed: int = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Variants:
        """Variants from a builder's extra keyword arguments; an unknown key is refused."""
        known = [f.name for f in fields(cls)]
        for key in options:
            if key not in known:
                raise ConfigError(f"dataset.{key}", options[key],
                                  "a variant option: " + ", ".join(known))
        values = dict(options)
        if values.get("classes") is not None:
            values["classes"] = [int(c) for c in values["classes"]]
        return cls(**values)

    @property
    def ratio(self) -> float:
        """The imbalance ratio in effect (the default with a kind and no ratio)."""
        return float(self.imbalance_ratio) if self.imbalance_ratio is not None \
            else DEFAULT_IMBALANCE_RATIO

    @property
    def minority_fraction(self) -> float:
        """The step profile's minority fraction in effect."""
        return float(self.imbalance_minority_fraction) \
            if self.imbalance_minority_fraction is not None else DEFAULT_MINORITY_FRACTION

    def check(self, num_classes: int) -> None:
        """Refuse options that cannot take effect whatever the data (before any file is read)."""
        if self.imbalance is None:
            for key in ("imbalance_ratio", "imbalance_minority_fraction"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"dataset.{key}", getattr(self, key),
                                      "null without dataset.imbalance (set dataset.imbalance="
                                      + " or ".join(IMBALANCE_PROFILES) + ")")
        else:
            if self.imbalance not in IMBALANCE_PROFILES:
                raise ConfigError("dataset.imbalance", self.imbalance,
                                  "null, " + " or ".join(IMBALANCE_PROFILES))
            if not self.ratio >= 1:
                raise ConfigError("dataset.imbalance_ratio", self.imbalance_ratio,
                                  ">= 1 (largest over smallest class)")
            if self.imbalance != "step" and self.imbalance_minority_fraction is not None:
                raise ConfigError("dataset.imbalance_minority_fraction",
                                  self.imbalance_minority_fraction,
                                  f"null with dataset.imbalance={self.imbalance} (it sets the "
                                  "minority share of imbalance=step)")
            if self.imbalance == "step":
                fraction = self.minority_fraction
                if not 0 < fraction < 1:
                    raise ConfigError("dataset.imbalance_minority_fraction", fraction,
                                      "strictly between 0 and 1")
                if not 1 <= minority_count(fraction, num_classes) <= num_classes - 1:
                    raise ConfigError("dataset.imbalance_minority_fraction", fraction,
                                      f"a share giving 1 to {num_classes - 1} of the "
                                      f"{num_classes} classes (round(fraction * K), halves up)")
        if self.label_noise is None:
            if self.label_noise_rate is not None:
                raise ConfigError("dataset.label_noise_rate", self.label_noise_rate,
                                  "null without dataset.label_noise (set dataset.label_noise="
                                  + " or ".join(NOISE_KINDS) + ")")
        else:
            if self.label_noise not in NOISE_KINDS:
                raise ConfigError("dataset.label_noise", self.label_noise,
                                  "null, " + " or ".join(NOISE_KINDS))
            if self.random_labels:
                raise ConfigError("dataset.label_noise", self.label_noise,
                                  "null with dataset.random_labels=true (random labels replace "
                                  "every label)")
            rate = self.label_noise_rate
            if rate is None or not 0 <= rate <= 1:
                raise ConfigError("dataset.label_noise_rate", rate,
                                  f"in [0, 1] with dataset.label_noise={self.label_noise}")

    def apply(self, name: str, train: Split, test: Split | None, native_classes: int,
              num_classes: int) -> tuple[Split, Split | None, dict[str, Any]]:
        """The varied (train, test) splits and the info that records what was realised."""
        self.check(num_classes)
        draws = DrawSeeds(self.seed)
        if self.classes is not None:
            train = select_classes(train, self.classes, native_classes)
            test = select_classes(test, self.classes, native_classes) if test is not None \
                else None
            native_classes = len(self.classes)
        check_declared(name, "num_classes", num_classes, native_classes)
        if self.samples_per_class is not None:
            train = subsample_per_class(train, self.samples_per_class, num_classes,
                                        draws("subsample"))
        if self.test_samples_per_class is not None and test is not None:
            test = subsample_per_class(test, self.test_samples_per_class, num_classes,
                                       draws("test_subsample"),
                                       key="dataset.test_samples_per_class")
        minority = None
        if self.imbalance is not None:
            train = make_imbalanced(train, num_classes, self.imbalance, self.ratio,
                                    self.minority_fraction, draws("imbalance"))
            minority = minority_classes(num_classes, self.imbalance, self.minority_fraction)
        if self.random_labels:
            train.clean_labels = train.labels
            train.labels = randomise_labels(train.labels, num_classes, draws("random_labels"))
        elif self.label_noise is not None:
            check_noise_realisable(train.labels, num_classes, float(self.label_noise_rate))
            train.clean_labels = train.labels
            train.labels = add_label_noise(train.labels, num_classes, self.label_noise,
                                           float(self.label_noise_rate), draws("label_noise"))
        info = {
            "n_train": len(train), "n_test": len(test) if test is not None else 0,
            "classes": list(self.classes) if self.classes is not None else None,
            "samples_per_class": self.samples_per_class,
            "test_samples_per_class": self.test_samples_per_class,
            "imbalance": self.imbalance,
            "imbalance_ratio": self.ratio if self.imbalance else None,
            "imbalance_minority_fraction":
                self.minority_fraction if self.imbalance == "step" else None,
            "random_labels": bool(self.random_labels), "label_noise": self.label_noise,
            "label_noise_rate": float(self.label_noise_rate) if self.label_noise else None,
            "data_seed": self.seed, **realised(train, num_classes, minority),
        }
        return train, test, info


def realised(train: Split, num_classes: int, minority: Sequence[int] | None) -> dict[str, Any]:
    """Class counts (trained and clean labels), actual noise rate and imbalance ratio."""
    counts = torch.bincount(train.labels.cpu(), minlength=num_classes)
    clean = torch.bincount(train.true_labels.cpu(), minlength=num_classes)
    return {
        "train_class_counts": counts.tolist(), "train_class_counts_clean": clean.tolist(),
        "train_class_count_min": int(counts.min()), "train_class_count_max": int(counts.max()),
        "label_noise_actual": noise_rate(train),
        "imbalance_ratio_actual": float(clean.max()) / float(clean.min())
        if int(clean.min()) > 0 else None,
        "minority_classes": list(minority) if minority is not None else None,
    }


def minority_count(fraction: float, num_classes: int) -> int:
    """Number of minority classes of a step profile: fraction * K to the nearest, halves up."""
    return math.floor(fraction * num_classes + 0.5)


def minority_classes(num_classes: int, profile: str, minority_fraction: float = 0.5
                     ) -> list[int]:
    """The minority classes of a profile (class 0 is the largest).

    ``step``: the last round(fraction * K) classes, those given n_max / ratio samples;
    ``exp``: the classes past the middle of the profile, k > (K - 1) / 2, i.e. the classes
    below the median count (with odd K the median class itself is a majority class).
    """
    if profile == "step":
        return list(range(num_classes - minority_count(minority_fraction, num_classes),
                          num_classes))
    return [k for k in range(num_classes) if k > (num_classes - 1) / 2]


def select_classes(split: Split, classes: Sequence[int], native_classes: int) -> Split:
    """Keep the samples of ``classes`` and relabel them 0..len(classes)-1 in that order."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes or \
            any(not 0 <= c < native_classes for c in classes):
        raise ConfigError("dataset.classes", classes,
                          f"distinct class indices in 0..{native_classes - 1}")
    mapping = torch.full((native_classes,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    new = mapping[split.labels.cpu()]
    rows = torch.nonzero(new >= 0).squeeze(1)
    out = split.select(rows)
    out.labels = new[rows].to(split.labels.device)
    if out.clean_labels is not None:
        out.clean_labels = mapping[out.clean_labels.cpu()].to(split.labels.device)
    return out


def subsample_per_class(split: Split, n: int, num_classes: int, rng: np.random.Generator,
                        key: str = "dataset.samples_per_class") -> Split:
    """A balanced subsample: ``n`` samples of every class, drawn without replacement."""
    labels = split.labels.cpu().numpy()
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    if not n >= 1:
        raise ConfigError(key, n, f"at least 1 and at most {min(r.size for r in by_class)}")
    for k, rows in enumerate(by_class):
        if rows.size < n:
            fewest = min(r.size for r in by_class)
            raise ConfigError(key, n, f"at most {fewest} (class {k} has only {rows.size} "
                                      "samples)")
    keep = [rng.choice(rows, size=n, replace=False) for rows in by_class]
    return split.select(np.sort(np.concatenate(keep)))


def imbalance_counts(available: Sequence[int], profile: str, ratio: float,
                     minority_fraction: float = 0.5) -> list[int]:
    """Samples per class of a long-tailed profile; class 0 is the largest.

    With n_avail the smallest available class size: n_min = floor(n_avail / ratio) and
    n_max = round(n_min * ratio) <= n_avail, so n_max / n_min equals ``ratio`` up to the
    rounding of n_max (exactly, for an integer ratio). ``exp``: n_k = round(n_max *
    ratio^(-k/(K-1))), from n_max down to n_min (|n_max / ratio - n_min| < 1/2); ``step``:
    the last round(fraction * K) classes get n_min, the others n_max. A ratio above n_avail
    is refused.
    """
    k_total = len(available)
    n_avail = int(min(available))
    if not 1 <= ratio <= n_avail:
        raise ConfigError("dataset.imbalance_ratio", ratio,
                          f"from 1 to {n_avail}: the smallest class has {n_avail} samples "
                          "to draw from, so a larger ratio leaves the smallest under 1")
    n_min = math.floor(n_avail / ratio)
    n_max = min(n_avail, round(n_min * ratio))
    if profile == "exp":
        return [round(n_max * ratio ** (-k / max(k_total - 1, 1))) for k in range(k_total)]
    minority = set(minority_classes(k_total, "step", minority_fraction))
    return [n_min if k in minority else n_max for k in range(k_total)]


def make_imbalanced(split: Split, num_classes: int, profile: str, ratio: float,
                    minority_fraction: float, rng: np.random.Generator) -> Split:
    """A long-tailed subsample of the split (see ``imbalance_counts``)."""
    labels = split.labels.cpu().numpy()
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    counts = imbalance_counts([r.size for r in by_class], profile, ratio, minority_fraction)
    keep = [rng.choice(rows, size=n, replace=False)
            for rows, n in zip(by_class, counts, strict=True)]
    return split.select(np.sort(np.concatenate(keep)))


def randomise_labels(labels: torch.Tensor, num_classes: int,
                     rng: np.random.Generator) -> torch.Tensor:
    """Labels drawn uniformly from all classes, independent of the images (memorisation)."""
    drawn = rng.integers(num_classes, size=labels.numel())
    return torch.as_tensor(drawn, dtype=torch.long).to(labels.device)


def check_noise_realisable(labels: torch.Tensor, num_classes: int, rate: float) -> None:
    """Refuse a rate > 0 that would flip no label (round(rate * n_k) = 0 for every class)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if rate > 0 and all(round(rate * int(n)) == 0 for n in counts):
        largest = int(counts.max())
        raise ConfigError("dataset.label_noise_rate", rate,
                          f"0 or above {0.5 / largest:.4g}: the largest class has {largest} "
                          f"samples, so {rate} flips no label")


def add_label_noise(labels: torch.Tensor, num_classes: int, kind: str, rate: float,
                    rng: np.random.Generator) -> torch.Tensor:
    """Corrupt round(rate * n_k) labels of every class k, chosen at random.

    ``symmetric``: each corrupted label becomes one of the other K-1 classes, uniformly;
    ``pair``: class k becomes class (k + 1) mod K. The actual rate is ``rate`` up to rounding.
    """
    clean = labels.cpu().numpy()
    noisy = clean.copy()
    for k in range(num_classes):
        rows = np.flatnonzero(clean == k)
        chosen = rng.choice(rows, size=round(rate * rows.size), replace=False)
        if kind == "pair":
            noisy[chosen] = (k + 1) % num_classes
        else:
            shift = rng.integers(1, num_classes, size=chosen.size)
            noisy[chosen] = (k + shift) % num_classes
    return torch.as_tensor(noisy, dtype=torch.long).to(labels.device)


def noise_rate(split: Split) -> float:
    """The fraction of training labels that differ from the clean ones (0 without noise)."""
    if split.clean_labels is None or len(split) == 0:
        return 0.0
    return float((split.labels != split.clean_labels).double().mean())

"""Label and sampling variants of a train split: class subsets, subsamples, imbalance, noise.

Every draw comes from a numpy generator that ``DrawSeeds`` derives from one data seed and the
purpose of the draw, so changing one option never changes the draws of another.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ncsweep.config import ConfigError
from ncsweep.data.containers import Split

IMBALANCE_PROFILES = ("exp", "step")
NOISE_KINDS = ("symmetric", "pair")


def check_options(imbalance: str | None, imbalance_ratio: float,
                  imbalance_minority_fraction: float, label_noise: str | None,
                  label_noise_rate: float, random_labels: bool) -> None:
    """Refuse imbalance and noise options before any file is read."""
    if imbalance is not None:
        if imbalance not in IMBALANCE_PROFILES:
            raise ConfigError("dataset.imbalance", imbalance,
                              "null, " + " or ".join(IMBALANCE_PROFILES))
        if not imbalance_ratio >= 1:
            raise ConfigError("dataset.imbalance_ratio", imbalance_ratio,
                              ">= 1 (largest over smallest class)")
        if not 0 < imbalance_minority_fraction < 1:
            raise ConfigError("dataset.imbalance_minority_fraction", imbalance_minority_fraction,
                              "strictly between 0 and 1")
    if label_noise is not None:
        if label_noise not in NOISE_KINDS:
            raise ConfigError("dataset.label_noise", label_noise,
                              "null, " + " or ".join(NOISE_KINDS))
        if not 0 <= label_noise_rate <= 1:
            raise ConfigError("dataset.label_noise_rate", label_noise_rate, "in [0, 1]")
        if random_labels:
            raise ConfigError("dataset.label_noise", label_noise,
                              "null with dataset.random_labels=true (random labels replace "
                              "every label)")


class DrawSeeds:
    """One independent numpy generator per purpose, all fixed by one seed."""

    PURPOSES = ("subsample", "test_subsample", "imbalance", "random_labels", "label_noise")

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __call__(self, purpose: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.PURPOSES.index(purpose)])


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

    ``exp``: n_k = n_max * ratio^(-k/(K-1)); ``step``: the last ``minority_fraction`` of the
    classes get n_max / ratio. n_max is the smallest available class size, so every class can
    provide its share; n_max / n_min = ratio up to rounding.
    """
    k_total = len(available)
    n_max = int(min(available))
    if profile == "exp":
        raw = [n_max * ratio ** (-k / max(k_total - 1, 1)) for k in range(k_total)]
    else:
        n_minor = max(1, round(minority_fraction * k_total))
        raw = [n_max if k < k_total - n_minor else n_max / ratio for k in range(k_total)]
    return [max(1, int(n)) for n in raw]


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

"""Data sets that need no files: scikit-learn's digits, a Gaussian mixture, the UFM's indices.

Digits and the mixture take the variant options of every data set (``ncsweep.data.variants``);
the UFM takes per-class sample counts instead (its labels define the objective).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncsweep.config import ConfigError
from ncsweep.data.containers import DataBundle, Split, as_split, check_declared
from ncsweep.data.variants import Variants, realised


def load_digits(name: str = "digits", num_classes: int = 10, input_shape: Sequence[int] = (64,),
                test_fraction: float = 0.2, split_seed: int = 0, **variants: Any) -> DataBundle:
    """scikit-learn's bundled 8x8 digits, a seeded stratified split, standardised on train."""
    options = Variants.from_options(variants)
    options.check(num_classes)
    x, y = digits_arrays()
    check_declared(name, "input_shape", input_shape, x.shape[1:])
    train_rows, test_rows = stratified_split(y, test_fraction, split_seed)
    x_tr, x_te, y_tr, y_te = x[train_rows], x[test_rows], y[train_rows], y[test_rows]
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std < 1e-6] = 1.0
    train, test, info = options.apply(name, as_split((x_tr - mean) / std, y_tr),
                                      as_split((x_te - mean) / std, y_te), int(y.max()) + 1,
                                      num_classes)
    return DataBundle(name, num_classes, tuple(input_shape), train, test, info,
                      info["minority_classes"])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797 x 64 float64 pixels, int labels) from the file scikit-learn ships, read as its
    ``load_digits`` reads it, without importing scikit-learn (over a second a process)."""
    package = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    path = package / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as file:
        data = np.loadtxt(file, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) exactly as scikit-learn's ``train_test_split(test_size=
    test_fraction, random_state=seed, stratify=labels)`` draws them (StratifiedShuffleSplit)."""
    n = labels.shape[0]
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    n_test = math.ceil(test_fraction * n) if 0 < test_fraction < 1 else 0
    if not min(n_test, n - n_test) >= classes.size or counts.min() < 2:
        raise ConfigError("dataset.test_fraction", test_fraction,
                          f"a fraction in (0, 1) that leaves both splits at least "
                          f"{classes.size} samples (one a class)")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_train_k = _approximate_mode(counts, n - n_test, rng)
    n_test_k = _approximate_mode(counts - n_train_k, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for k, rows in enumerate(by_class):
        shuffled = rows.take(rng.permutation(counts[k]), mode="clip")
        train.extend(shuffled[:n_train_k[k]])
        test.extend(shuffled[n_train_k[k]:n_train_k[k] + n_test_k[k]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's approximate mode of the multivariate hypergeometric: per-class draws
    proportional to counts, the remainder given by largest leftover, ties broken by rng."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add = min(len(tied), need)
            floored[rng.choice(tied, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def make_synthetic(name: str = "synthetic", num_classes: int = 10,
                   input_shape: Sequence[int] = (32,), n_per_class: int = 100,
                   n_test_per_class: int = 50, separation: float = 3.0, seed: int = 0,
                   mixture_classes: int | None = None, **variants: Any) -> DataBundle:
    """A seeded Gaussian mixture: unit-variance classes, means about ``separation`` apart.

    ``mixture_classes`` classes are drawn (``num_classes`` when null); a class subset picks
    ``num_classes`` of them. ``seed`` fixes the mixture and the variants' draws.
    """
    if len(input_shape) != 1:
        raise ConfigError("dataset.input_shape", list(input_shape), "one dimension, [d_in]")
    options = Variants.from_options({**variants, "seed": seed})
    options.check(num_classes)
    drawn = num_classes if mixture_classes is None else int(mixture_classes)
    if options.classes is not None and mixture_classes is None:
        raise ConfigError("dataset.mixture_classes", mixture_classes,
                          "the number of mixture classes to pick dataset.classes from")
    if drawn < 2:
        raise ConfigError("dataset.mixture_classes", mixture_classes, "at least 2")
    rng = np.random.default_rng(seed)
    d_in = int(input_shape[0])
    centres = rng.standard_normal((drawn, d_in)) * separation / np.sqrt(2 * d_in)

    def draw(n: int) -> Split:
        y = np.repeat(np.arange(drawn), n)
        return as_split(centres[y] + rng.standard_normal((y.size, d_in)) / np.sqrt(d_in), y)

    train, test, info = options.apply(name, draw(n_per_class), draw(n_test_per_class), drawn,
                                      num_classes)
    return DataBundle(name, num_classes, (d_in,), train, test, info, info["minority_classes"])


def class_counts(n_per_class: int | Sequence[int], num_classes: int) -> list[int]:
    """Per-class sample counts of the UFM: one integer for all classes, or one per class."""
    allowed = f"a positive integer, or {num_classes} positive integers (one per class)"
    if isinstance(n_per_class, int | np.integer) and not isinstance(n_per_class, bool):
        counts = [int(n_per_class)] * num_classes
    elif isinstance(n_per_class, Sequence | np.ndarray) and not isinstance(n_per_class, str):
        counts = list(n_per_class)
        if len(counts) != num_classes or not all(
                isinstance(n, int | np.integer) and not isinstance(n, bool) for n in counts):
            raise ConfigError("dataset.n_per_class", counts, allowed)
        counts = [int(n) for n in counts]
    else:
        raise ConfigError("dataset.n_per_class", n_per_class, allowed)
    if min(counts) < 1:
        raise ConfigError("dataset.n_per_class", n_per_class, allowed)
    return counts


def count_minorities(counts: Sequence[int]) -> list[int] | None:
    """Classes below the geometric mean of the largest and smallest count; None if balanced.

    For two levels of counts (Fang et al.'s majority and minority classes) these are exactly
    the classes of the smaller level.
    """
    high, low = max(counts), min(counts)
    if high == low:
        return None
    middle = math.sqrt(high * low)
    return [k for k, n in enumerate(counts) if n < middle]


def make_ufm(name: str = "ufm", num_classes: int = 10, n_per_class: int | Sequence[int] = 100,
             input_shape: Sequence[int] = ()) -> DataBundle:
    """The UFM's 'data': sample indices, class-major (n_0 samples of class 0, then class 1, ...).

    ``n_per_class`` is one count for every class or a list of per-class counts (an imbalanced
    UFM, the minority-collapse setting of Fang et al. 2021).
    """
    counts = class_counts(n_per_class, num_classes)
    labels = torch.arange(num_classes).repeat_interleave(torch.tensor(counts))
    train = Split(torch.arange(labels.numel()), labels)
    minority = count_minorities(counts)
    balanced = len(set(counts)) == 1
    info = {"n_per_class": counts[0] if balanced else None, "n_train": len(train),
            **realised(train, num_classes, minority)}
    return DataBundle(name, num_classes, tuple(input_shape), train, None, info, minority)

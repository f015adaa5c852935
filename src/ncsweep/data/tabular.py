"""Data sets that need no files: scikit-learn's digits, a Gaussian mixture, the UFM's indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ncsweep.config import ConfigError
from ncsweep.data.containers import DataBundle, Split, as_split, check_declared


def load_digits(name: str = "digits", num_classes: int = 10, input_shape: Sequence[int] = (64,),
                test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """scikit-learn's bundled 8x8 digits, a seeded stratified split, standardised on train."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    check_declared(name, "num_classes", num_classes, int(y.max()) + 1)
    check_declared(name, "input_shape", input_shape, x.shape[1:])
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction,
                                              random_state=split_seed, stratify=y)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std < 1e-6] = 1.0
    return DataBundle(name, num_classes, tuple(input_shape),
                      as_split((x_tr - mean) / std, y_tr), as_split((x_te - mean) / std, y_te))


def make_synthetic(name: str = "synthetic", num_classes: int = 10,
                   input_shape: Sequence[int] = (32,), n_per_class: int = 100,
                   n_test_per_class: int = 50, separation: float = 3.0,
                   seed: int = 0) -> DataBundle:
    """A seeded Gaussian mixture: unit-variance classes, means about ``separation`` apart."""
    if len(input_shape) != 1:
        raise ConfigError("dataset.input_shape", list(input_shape), "one dimension, [d_in]")
    rng = np.random.default_rng(seed)
    d_in = int(input_shape[0])
    centres = rng.standard_normal((num_classes, d_in)) * separation / np.sqrt(2 * d_in)

    def draw(n: int) -> Split:
        y = np.repeat(np.arange(num_classes), n)
        return as_split(centres[y] + rng.standard_normal((y.size, d_in)) / np.sqrt(d_in), y)

    return DataBundle(name, num_classes, (d_in,), draw(n_per_class), draw(n_test_per_class))


def make_ufm(name: str = "ufm", num_classes: int = 10, n_per_class: int = 100,
             input_shape: Sequence[int] = ()) -> DataBundle:
    """The UFM's 'data': sample indices, class-major (n samples of class 0, then class 1, ...)."""
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    train = Split(torch.arange(labels.numel()), labels)
    return DataBundle(name, num_classes, tuple(input_shape), train, None,
                      {"n_per_class": n_per_class})

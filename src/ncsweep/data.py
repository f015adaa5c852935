"""Data sets as in-memory tensors, and the batching that feeds them to a model on any device.

Every builder returns a :class:`DataBundle`; its ``num_classes`` and ``input_shape`` are
checked against what the config declared, so a dry run can size a model without the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Split:
    """Inputs and integer labels of one split."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Split:
        return Split(self.inputs.to(device), self.labels.to(device))


@dataclass
class DataBundle:
    """A train split, an optional test split, and what the model needs to know about them."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: Split
    test: Split | None
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> DataBundle:
        test = self.test.to(device) if self.test is not None else None
        return DataBundle(self.name, self.num_classes, self.input_shape, self.train.to(device),
                          test, self.info)


def _check_declared(name: str, declared: tuple[int, ...], actual: tuple[int, ...],
                    what: str) -> None:
    if tuple(declared) != tuple(actual):
        raise ValueError(f"dataset.{what}={list(declared)} does not match the {name} data "
                         f"({list(actual)})")


def load_digits(name: str = "digits", num_classes: int = 10, input_shape: Sequence[int] = (64,),
                test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """scikit-learn's bundled 8x8 digits, a seeded stratified split, standardised on train."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    _check_declared(name, (num_classes,), (int(y.max()) + 1,), "num_classes")
    _check_declared(name, tuple(input_shape), x.shape[1:], "input_shape")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction,
                                              random_state=split_seed, stratify=y)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std < 1e-6] = 1.0
    return DataBundle(name, num_classes, tuple(input_shape),
                      _split((x_tr - mean) / std, y_tr), _split((x_te - mean) / std, y_te))


def make_synthetic(name: str = "synthetic", num_classes: int = 10,
                   input_shape: Sequence[int] = (32,), n_per_class: int = 100,
                   n_test_per_class: int = 50, separation: float = 3.0,
                   seed: int = 0) -> DataBundle:
    """A seeded Gaussian mixture: unit-variance classes, means about ``separation`` apart."""
    if len(input_shape) != 1:
        raise ValueError(f"dataset.input_shape={list(input_shape)} must be one dimension, [d_in]")
    rng = np.random.default_rng(seed)
    d_in = int(input_shape[0])
    centres = rng.standard_normal((num_classes, d_in)) * separation / np.sqrt(2 * d_in)

    def draw(n: int) -> Split:
        y = np.repeat(np.arange(num_classes), n)
        return _split(centres[y] + rng.standard_normal((y.size, d_in)) / np.sqrt(d_in), y)

    return DataBundle(name, num_classes, (d_in,), draw(n_per_class), draw(n_test_per_class))


def make_ufm(name: str = "ufm", num_classes: int = 10, n_per_class: int = 100,
             input_shape: Sequence[int] = ()) -> DataBundle:
    """The UFM's 'data': sample indices, class-major (n samples of class 0, then class 1, ...)."""
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    train = Split(torch.arange(labels.numel()), labels)
    return DataBundle(name, num_classes, tuple(input_shape), train, None,
                      {"n_per_class": n_per_class})


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


def batches(split: Split, batch_size: int | None, generator: torch.Generator | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of a split on its own device; shuffled when a generator is given."""
    n = len(split)
    size = n if not batch_size else min(batch_size, n)
    if generator is None:
        order = None
    else:
        order = torch.randperm(n, generator=generator).to(split.labels.device)
    for start in range(0, n, size):
        if order is None:
            yield split.inputs[start:start + size], split.labels[start:start + size]
        else:
            idx = order[start:start + size]
            yield split.inputs[idx], split.labels[idx]

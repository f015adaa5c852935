"""The in-memory containers every data set builder returns, and the batching that feeds them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ncsweep import distributed
from ncsweep.config import ConfigError
from ncsweep.data.image_inputs import FileSource, ImageView


@dataclass
class Split:
    """Inputs and integer labels of one split.

    ``inputs`` is either the model's input itself (float rows), stored images that ``view``
    turns into model inputs batch by batch (uint8, N x C x H x W), or, when ``source`` is set,
    the indices of this split's samples in a file-backed data set that a DataLoader reads.
    ``clean_labels`` are the labels before any label noise or random labels (``labels`` is
    what the model trains on); None when the two are the same.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    clean_labels: torch.Tensor | None = None
    view: ImageView | None = None
    source: FileSource | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def true_labels(self) -> torch.Tensor:
        """The clean labels (the labels themselves when no noise was added)."""
        return self.labels if self.clean_labels is None else self.clean_labels

    def to(self, device: torch.device) -> Split:
        """The split on ``device`` (a file-backed split keeps its indices on the CPU)."""
        clean = self.clean_labels.to(device) if self.clean_labels is not None else None
        inputs = self.inputs if self.source is not None else self.inputs.to(device)
        return Split(inputs, self.labels.to(device), clean, self.view, self.source)

    def part(self, rows: slice) -> Split:
        """The contiguous rows ``rows`` (views, no copy): a rank's shard of the split."""
        clean = self.clean_labels[rows] if self.clean_labels is not None else None
        return Split(self.inputs[rows], self.labels[rows], clean, self.view, self.source)

    def select(self, rows: torch.Tensor | np.ndarray) -> Split:
        """The sub-split of the given rows (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        clean = self.clean_labels[rows.to(self.clean_labels.device)] \
            if self.clean_labels is not None else None
        return Split(self.inputs[rows.to(self.inputs.device)],
                     self.labels[rows.to(self.labels.device)], clean, self.view, self.source)


@dataclass
class DataBundle:
    """A train split, an optional test split, and what the model needs to know about them.

    ``minority_classes`` are the classes an imbalance made minorities (None when balanced):
    the eval points measure their collapse (see ``ncsweep.data.variants``).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: Split
    test: Split | None
    info: dict = field(default_factory=dict)
    minority_classes: list[int] | None = None

    def to(self, device: torch.device) -> DataBundle:
        """The bundle with both splits on ``device``."""
        test = self.test.to(device) if self.test is not None else None
        return DataBundle(self.name, self.num_classes, self.input_shape, self.train.to(device),
                          test, self.info, self.minority_classes)


def check_declared(name: str, key: str, declared: Sequence[int] | int,
                   actual: Sequence[int] | int) -> None:
    """Refuse a declared ``num_classes``/``input_shape`` that the data lacks: dry runs trust it."""
    want, have = _ints(declared), _ints(actual)
    if want != have:
        raise ConfigError(f"dataset.{key}", want,
                          f"{have}, what the {name} data has with these options")


def _ints(value: Sequence[int] | int) -> list[int] | int:
    return int(value) if isinstance(value, int) else [int(n) for n in value]


def as_split(x: np.ndarray, y: np.ndarray) -> Split:
    """A split of float32 input rows and int64 labels."""
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


def batches(split: Split, batch_size: int | None, generator: torch.Generator | None = None,
            augment: bool = False, sharded: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of a split on its labels' device; shuffled when a generator is given.

    A full batch is not shuffled: the order changes nothing but the cost of the gather.

    Stored images pass through the split's ``view`` (normalisation, and with ``augment`` the
    random crop and flip, drawn from ``generator``); a file-backed split is read by a
    DataLoader's workers and moved to the device batch by batch.

    ``sharded`` (in a distributed run): each rank gets its contiguous share of every global
    batch, the global batches and their augmentation draws being those of one process, so
    the ranks together take the one-process run's steps; a file-backed split reads only the
    rank's share (a distributed batch sampler).
    """
    n = len(split)
    size = n if not batch_size else min(batch_size, n)
    device = split.labels.device
    shuffle = generator is not None and size < n
    order = torch.randperm(n, generator=generator).to(device) if shuffle else None
    if split.source is not None:
        rows = (order.cpu() if order is not None else torch.arange(n)).split(size)
        if sharded:
            rows = tuple(chunk[distributed.shard(len(chunk))] for chunk in rows)
        for x, pos in split.source.read(split.inputs, rows, augment, generator, device):
            x = split.view(x) if split.view is not None else x
            yield x, split.labels[pos.to(device)]
        return
    view = split.view
    for start in range(0, n, size):
        count = min(size, n - start)
        share = distributed.shard(count) if sharded else slice(0, count)
        if order is None:
            rows = slice(start + share.start, start + share.stop)
            x, y = split.inputs[rows], split.labels[rows]
        else:
            idx = order[start:start + count][share]
            x, y = split.inputs[idx], split.labels[idx]
        if view is not None:
            x = view(x, generator if augment else None, (share, count))
        yield x, y


def member_batches(split: Split, batch_size: int | None, generators: Sequence[torch.Generator],
                   augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches each generator's :func:`batches` gives, stacked member-first: (R, B, ...)
    inputs and (R, B) labels. An in-memory split without a view is gathered in one index
    operation from the members' permutations, drawn as :func:`batches` draws them."""
    n = len(split)
    size = n if not batch_size else min(batch_size, n)
    if split.source is not None or split.view is not None or size == n:
        streams = [batches(split, batch_size, g, augment=augment) for g in generators]
        for pairs in zip(*streams, strict=True):
            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return
    device = split.labels.device
    order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    for start in range(0, n, size):
        rows = order[:, start:start + size]
        yield split.inputs[rows], split.labels[rows]

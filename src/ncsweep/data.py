"""Data sets as in-memory tensors, and the batching that feeds them to a model on any device.

Image data sets are read offline from torchvision's file formats: small ones are held on the
device as uint8 images and normalised (and augmented) batch by batch; ImageFolder-size ones
are read by DataLoader workers. Every builder returns a :class:`DataBundle`; its
``num_classes`` and ``input_shape`` are checked against what the config declared, so a dry run
can size a model without the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


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
        clean = self.clean_labels.to(device) if self.clean_labels is not None else None
        inputs = self.inputs if self.source is not None else self.inputs.to(device)
        return Split(inputs, self.labels.to(device), clean, self.view, self.source)

    def select(self, rows: torch.Tensor | np.ndarray) -> Split:
        """The sub-split of the given rows (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        clean = self.clean_labels[rows.to(self.clean_labels.device)] \
            if self.clean_labels is not None else None
        return Split(self.inputs[rows.to(self.inputs.device)],
                     self.labels[rows.to(self.labels.device)], clean, self.view, self.source)


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


class DatasetNotFound(FileNotFoundError):
    """A data set's files are not where the config says; the message says how to get them."""


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


def batches(split: Split, batch_size: int | None, generator: torch.Generator | None = None,
            augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of a split on its labels' device; shuffled when a generator is given.

    A full batch is not shuffled: the order changes nothing but the cost of the gather.

    Stored images pass through the split's ``view`` (normalisation, and with ``augment`` the
    random crop and flip, drawn from ``generator``); a file-backed split is read by a
    DataLoader's workers and moved to the device batch by batch.
    """
    n = len(split)
    size = n if not batch_size else min(batch_size, n)
    device = split.labels.device
    shuffle = generator is not None and size < n  # a full batch is the same set in any order
    order = torch.randperm(n, generator=generator).to(device) if shuffle else None
    if split.source is not None:
        rows = (order.cpu() if order is not None else torch.arange(n)).split(size)
        for x, pos in split.source.read(split.inputs, rows, augment, generator, device):
            x = split.view(x) if split.view is not None else x
            yield x, split.labels[pos.to(device)]
        return
    view = split.view
    for start in range(0, n, size):
        if order is None:
            x, y = split.inputs[start:start + size], split.labels[start:start + size]
        else:
            idx = order[start:start + size]
            x, y = split.inputs[idx], split.labels[idx]
        if view is not None:
            x = view(x, generator if augment else None)
        yield x, y


# --------------------------------------------------------------------------- image data sets

# Per-channel mean and std of the train images in [0, 1] (the usual published values).
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
FORMATS = tuple(NORMALISATION)
IMBALANCE_PROFILES = ("exp", "step")
NOISE_KINDS = ("symmetric", "pair")


class ImageView:
    """Turns stored uint8 images (N x C x H x W) into normalised float model inputs.

    With a generator it first applies the training augmentation on the device: a random crop
    of the image padded by ``crop_padding`` zero (black) pixels on each side, and a horizontal
    flip with probability 1/2, the draws coming from the generator (a seed fixes them).
    A one-channel image is repeated to ``channels`` channels after normalisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int,
                 crop_padding: int = 0, flip: bool = False) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.channels, self.crop_padding, self.flip = int(channels), int(crop_padding), flip
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if generator is not None and (self.crop_padding or self.flip):
            x = self.augment(x, generator)
        mean, std = self._device_stats(x.device)
        out = (x.float().div_(255.0) - mean).div_(std)
        if out.shape[1] != self.channels:
            out = out.expand(-1, self.channels, -1, -1).contiguous()
        return out

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            shape = (1, len(self.mean), 1, 1)
            self._stats[device] = (torch.tensor(self.mean, device=device).view(shape),
                                   torch.tensor(self.std, device=device).view(shape))
        return self._stats[device]

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding and random horizontal flip, one draw per image."""
        b, _, h, w = x.shape
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=generator)
        flips = torch.rand(b, generator=generator) < 0.5 if self.flip \
            else torch.zeros(b, dtype=torch.bool)
        device = x.device
        offsets, flips = offsets.to(device), flips.to(device)
        rows = offsets[:, :1] + torch.arange(h, device=device)
        cols = offsets[:, 1:] + torch.arange(w, device=device)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
        batch = torch.arange(b, device=device)[:, None, None]
        # advanced indices around a slice: the result is (B, H, W, C)
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


class FileSource:
    """An image data set read from files by a DataLoader (ImageNet-size sets).

    Workers decode, crop (``train_transform`` when augmenting, ``eval_transform`` otherwise)
    and hand back uint8 tensors; the split's ``view`` normalises them on the device.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, train_transform, eval_transform,
                 num_workers: int = 4) -> None:
        self.dataset, self.num_workers = dataset, int(num_workers)
        self.train_transform, self.eval_transform = train_transform, eval_transform

    def read(self, rows: torch.Tensor, chunks: Sequence[torch.Tensor], augment: bool,
             generator: torch.Generator | None, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images on ``device``, positions within the split) for each chunk of positions."""
        from torch.utils.data import DataLoader

        transform = self.train_transform if augment else self.eval_transform
        rows_dataset = _Rows(self.dataset, rows.cpu(), transform)
        loader = DataLoader(rows_dataset, batch_sampler=[c.tolist() for c in chunks],
                            num_workers=self.num_workers, pin_memory=device.type == "cuda",
                            generator=generator if self.num_workers else None)
        for x, pos in loader:
            yield x.to(device, non_blocking=True), pos


class _Rows(torch.utils.data.Dataset):
    """Position i of a split -> (transformed image of sample rows[i], i)."""

    def __init__(self, dataset, rows: torch.Tensor, transform) -> None:
        self.dataset, self.rows, self.transform = dataset, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[int(self.rows[i])]
        return self.transform(image), i


def load_images(name: str, format: str, num_classes: int, input_shape: Sequence[int],
                root: str = "data", download: bool = False, folder: str | None = None,
                size: int | None = None, channels: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                augment: bool = False, crop_padding: int = 4, flip: bool = True,
                classes: Sequence[int] | None = None, samples_per_class: int | None = None,
                test_samples_per_class: int | None = None, random_labels: bool = False,
                imbalance: str | None = None, imbalance_ratio: float = 100.0,
                imbalance_minority_fraction: float = 0.5, label_noise: str | None = None,
                label_noise_rate: float = 0.0, seed: int = 0, test: bool = True,
                num_workers: int = 4) -> DataBundle:
    """A torchvision image data set read offline from ``root``, with the papers' variations.

    Small sets (MNIST, FashionMNIST, CIFAR-10/100, SVHN, STL-10) are decoded once into uint8
    tensors and batched on the device; ``format=image_folder`` (ImageNet and the like) is read
    by DataLoader workers from ``root/folder/{train,val}``. On the train split, in this order:
    a class subset (``classes``, relabelled 0..K'-1), a balanced subsample
    (``samples_per_class``), a long-tailed profile (``imbalance``), then random labels or label
    noise; the clean labels stay in ``Split.clean_labels``. All draws come from ``seed``.
    """
    if format not in FORMATS:
        raise ValueError(f"dataset.format={format!r} is not allowed: one of {', '.join(FORMATS)}")
    _check_options(imbalance, imbalance_ratio, imbalance_minority_fraction, label_noise,
                   label_noise_rate, random_labels)
    base = Path(os.path.expanduser(str(root))).resolve()
    if format == "image_folder":
        train, test_split, native_classes, native_channels, native_size = _image_folder(
            base, folder or "imagenet", size, augment, test, num_workers, download)
    else:
        train_x, train_y, test_xy, native_classes = _read_small(format, base, download, test)
        native_channels, native_size = int(train_x.shape[1]), int(train_x.shape[-1])
        train_x = _resize(train_x, size)
        train = Split(train_x, train_y)
        test_split = Split(_resize(test_xy[0], size), test_xy[1]) if test_xy else None
    channels = channels or native_channels
    if channels not in (native_channels, 3) or (channels != native_channels
                                                  and native_channels != 1):
        raise ValueError(f"dataset.channels={channels} is not allowed for {name}: "
                         f"{native_channels} (native) or 3 from one-channel images")
    side = size or native_size
    _check_declared(name, tuple(input_shape), (channels, side, side), "input_shape")
    default_mean, default_std = NORMALISATION[format]
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    stored_channels = 1 if native_channels == 1 else channels
    if len(mean) not in (1, stored_channels) or len(std) not in (1, stored_channels):
        raise ValueError(f"dataset.mean/std need 1 or {stored_channels} values for {name}, "
                         f"got {len(mean)} and {len(std)}")
    in_memory_augment = augment and format != "image_folder"
    view = ImageView(mean, std, channels, crop_padding if in_memory_augment else 0,
                     flip and in_memory_augment)
    train.view = view
    if test_split is not None:
        test_split.view = view

    rng = _RngFactory(seed)
    if classes is not None:
        train = select_classes(train, classes, native_classes)
        test_split = select_classes(test_split, classes, native_classes) \
            if test_split is not None else None
        native_classes = len(classes)
    _check_declared(name, (num_classes,), (native_classes,), "num_classes")
    if samples_per_class is not None:
        train = subsample_per_class(train, samples_per_class, num_classes, rng("subsample"))
    if test_samples_per_class is not None and test_split is not None:
        test_split = subsample_per_class(test_split, test_samples_per_class, num_classes,
                                         rng("test_subsample"))
    if imbalance is not None:
        train = make_imbalanced(train, num_classes, imbalance, imbalance_ratio,
                                imbalance_minority_fraction, rng("imbalance"))
    if random_labels:
        train.clean_labels = train.labels
        train.labels = randomise_labels(train.labels, num_classes, rng("random_labels"))
    elif label_noise is not None:
        train.clean_labels = train.labels
        train.labels = add_label_noise(train.labels, num_classes, label_noise,
                                       label_noise_rate, rng("label_noise"))
    counts = torch.bincount(train.labels.cpu(), minlength=num_classes)
    info = {
        "data_root": str(base), "n_train": len(train),
        "n_test": len(test_split) if test_split is not None else 0,
        "train_class_count_min": int(counts.min()), "train_class_count_max": int(counts.max()),
        "augment": bool(augment), "classes": list(classes) if classes is not None else None,
        "samples_per_class": samples_per_class, "imbalance": imbalance,
        "imbalance_ratio": float(imbalance_ratio) if imbalance else None,
        "random_labels": bool(random_labels), "label_noise": label_noise,
        "label_noise_rate": float(label_noise_rate) if label_noise else None,
        "label_noise_actual": noise_rate(train), "data_seed": seed,
    }
    return DataBundle(name, num_classes, tuple(input_shape), train, test_split, info)


def noise_rate(split: Split) -> float:
    """The fraction of training labels that differ from the clean ones (0 without noise)."""
    if split.clean_labels is None or len(split) == 0:
        return 0.0
    return float((split.labels != split.clean_labels).double().mean())


def _check_options(imbalance, ratio, minority, noise, rate, random_labels) -> None:
    if imbalance is not None:
        if imbalance not in IMBALANCE_PROFILES:
            raise ValueError(f"dataset.imbalance={imbalance!r} is not allowed: null, "
                             + " or ".join(IMBALANCE_PROFILES))
        if not ratio >= 1:
            raise ValueError(f"dataset.imbalance_ratio={ratio!r} is not allowed: >= 1 "
                             "(largest over smallest class)")
        if not 0 < minority < 1:
            raise ValueError(f"dataset.imbalance_minority_fraction={minority!r} is not "
                             "allowed: strictly between 0 and 1")
    if noise is not None:
        if noise not in NOISE_KINDS:
            raise ValueError(f"dataset.label_noise={noise!r} is not allowed: null, "
                             + " or ".join(NOISE_KINDS))
        if not 0 <= rate <= 1:
            raise ValueError(f"dataset.label_noise_rate={rate!r} is not allowed: in [0, 1]")
        if random_labels:
            raise ValueError("dataset.random_labels=true and dataset.label_noise are "
                             "exclusive: random labels replace every label")


class _RngFactory:
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
        raise ValueError(f"dataset.classes={classes} is not allowed: distinct class indices "
                         f"in 0..{native_classes - 1}")
    mapping = torch.full((native_classes,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    new = mapping[split.labels.cpu()]
    rows = torch.nonzero(new >= 0).squeeze(1)
    out = split.select(rows)
    out.labels = new[rows].to(split.labels.device)
    if out.clean_labels is not None:
        out.clean_labels = mapping[out.clean_labels.cpu()].to(split.labels.device)
    return out


def subsample_per_class(split: Split, n: int, num_classes: int,
                        rng: np.random.Generator) -> Split:
    """A balanced subsample: ``n`` samples of every class, drawn without replacement."""
    labels = split.labels.cpu().numpy()
    keep = []
    for k in range(num_classes):
        rows = np.flatnonzero(labels == k)
        if rows.size < n:
            raise ValueError(f"dataset.samples_per_class={n} is not allowed: class {k} has "
                             f"only {rows.size} samples")
        keep.append(rng.choice(rows, size=n, replace=False))
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
    keep = [rng.choice(rows, size=n, replace=False) for rows, n in zip(by_class, counts,
                                                                         strict=True)]
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


def _resize(x: torch.Tensor, size: int | None, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 images to size x size, once, at load time."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].float()
        part = torch.nn.functional.interpolate(part, size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


# Files each small format needs under root (train files, test files), and where they live.
_MNIST_FILES = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
_CIFAR10_FILES = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])


def _small_folder(format: str, base: Path) -> Path:
    return {
        "mnist": base / "MNIST" / "raw", "fashion_mnist": base / "FashionMNIST" / "raw",
        "cifar10": base / "cifar-10-batches-py", "cifar100": base / "cifar-100-python",
        "svhn": base / "svhn", "stl10": base / "stl10_binary",
    }[format]


def _expected_files(format: str, test: bool) -> list[str]:
    if format in ("mnist", "fashion_mnist"):
        files = list(_MNIST_FILES[0]) + (list(_MNIST_FILES[1]) if test else [])
    elif format == "cifar10":
        files = [*_CIFAR10_FILES[0], "batches.meta"] + (_CIFAR10_FILES[1] if test else [])
    elif format == "cifar100":
        files = ["train", "meta"] + (["test"] if test else [])
    elif format == "svhn":
        files = ["train_32x32.mat"] + (["test_32x32.mat"] if test else [])
    else:
        files = ["train_X.bin", "train_y.bin"] + (["test_X.bin", "test_y.bin"] if test else [])
    return files


def _present(folder: Path, name: str, format: str) -> bool:
    path = folder / name
    if format in ("mnist", "fashion_mnist"):
        return path.is_file() or path.with_name(name + ".gz").is_file()
    return path.is_file()


def _read_small(format: str, base: Path, download: bool, test: bool):
    """(train uint8 N x C x H x W, train labels, (test images, test labels) or None, K)."""
    folder = _small_folder(format, base)
    missing = [f for f in _expected_files(format, test) if not _present(folder, f, format)]
    if missing and download:
        _download(format, base)
        missing = [f for f in _expected_files(format, test) if not _present(folder, f, format)]
    if missing:
        raise DatasetNotFound(
            f"dataset {format}: no data in {folder} (missing {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); set dataset.root=DIR or NCSWEEP_DATA to "
            f"where it is, or dataset.download=true to fetch it with torchvision")
    reader = {"mnist": _read_mnist, "fashion_mnist": _read_mnist, "cifar10": _read_cifar10,
              "cifar100": _read_cifar100, "svhn": _read_svhn, "stl10": _read_stl10}[format]
    x_tr, y_tr, k = reader(folder, True)
    test_xy = None
    if test:
        x_te, y_te, _ = reader(folder, False)
        test_xy = (x_te, y_te)
    return x_tr, y_tr, test_xy, k


def _download(format: str, base: Path) -> None:
    """torchvision's own download into the folder it reads from (only with download=true)."""
    from torchvision import datasets

    base.mkdir(parents=True, exist_ok=True)
    if format in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
               "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[format]
        for train in (True, False):
            cls(str(base), train=train, download=True)
    elif format == "svhn":
        for split in ("train", "test"):
            datasets.SVHN(str(base / "svhn"), split=split, download=True)
    else:
        datasets.STL10(str(base), split="train", download=True)


def _read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST) file of unsigned bytes, raw or gzipped."""
    if not path.is_file():
        path = path.with_name(path.name + ".gz")
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(data[:4], "big")
    ndim, dtype = magic & 0xFF, (magic >> 8) & 0xFF
    if dtype != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (type code {dtype:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_mnist(folder: Path, train: bool):
    images, labels = _MNIST_FILES[0 if train else 1]
    x = torch.from_numpy(_read_idx(folder / images).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(folder / labels).astype(np.int64))
    return x, y, 10


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar10(folder: Path, train: bool):
    entries = [_unpickle(folder / f) for f in _CIFAR10_FILES[0 if train else 1]]
    x = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(e["labels"]) for e in entries])
    k = len(_unpickle(folder / "batches.meta")["label_names"])
    return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64)), k


def _read_cifar100(folder: Path, train: bool):
    entry = _unpickle(folder / ("train" if train else "test"))
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(entry["fine_labels"], dtype=np.int64)
    k = len(_unpickle(folder / "meta")["fine_label_names"])
    return torch.from_numpy(x), torch.from_numpy(y), k


def _read_svhn(folder: Path, train: bool):
    from scipy.io import loadmat

    mat = loadmat(folder / ("train_32x32.mat" if train else "test_32x32.mat"))
    x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)
    y = mat["y"].astype(np.int64).squeeze(1)
    y[y == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), 10


def _read_stl10(folder: Path, train: bool):
    prefix = "train" if train else "test"
    x = np.fromfile(folder / f"{prefix}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
    y = np.fromfile(folder / f"{prefix}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 3, 2))), \
        torch.from_numpy(y), 10


def _image_folder(base: Path, folder: str, size: int | None, augment: bool, test: bool,
                  num_workers: int, download: bool):
    """Train (and val) splits over ``base/folder/{train,val}`` in ImageFolder's layout."""
    from torchvision import datasets, transforms

    top = (base / folder) if not Path(folder).is_absolute() else Path(folder)
    parts = ["train"] + (["val"] if test else [])
    missing = [p for p in parts if not (top / p).is_dir()]
    if missing:
        extra = " (download=true cannot fetch an ImageFolder set)" if download else ""
        raise DatasetNotFound(
            f"dataset image_folder: no {' or '.join(missing)}/ folder in {top}: it needs "
            f"train/ and val/ with one sub-folder of images per class; set dataset.root=DIR "
            f"or NCSWEEP_DATA, or dataset.folder=PATH{extra}")
    size = size or 224
    eval_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)),
                                  transforms.CenterCrop(size), transforms.PILToTensor()])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size),
                                   transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    train_set = datasets.ImageFolder(str(top / "train"))
    source = FileSource(train_set, train_tf if augment else eval_tf, eval_tf, num_workers)
    train = Split(torch.arange(len(train_set)), torch.as_tensor(train_set.targets), None, None,
                  source)
    test_split = None
    if test:
        val_set = datasets.ImageFolder(str(top / "val"))
        if val_set.classes != train_set.classes:
            raise ValueError(f"dataset image_folder: {top}/val has other classes than "
                             f"{top}/train ({len(val_set.classes)} vs {len(train_set.classes)})")
        val_source = FileSource(val_set, eval_tf, eval_tf, num_workers)
        test_split = Split(torch.arange(len(val_set)), torch.as_tensor(val_set.targets), None,
                           None, val_source)
    return train, test_split, len(train_set.classes), 3, size

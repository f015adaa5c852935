"""Image data sets: uint8 images normalised (and augmented) on the device, or read by workers.

Small sets (MNIST, FashionMNIST, CIFAR-10/100, SVHN, STL-10) are decoded once into uint8
tensors held on the device (see ``ncsweep.data.files``); ImageFolder trees (ImageNet and the
like) are read by DataLoader workers. ``load_images`` applies the papers' label and sampling
variants (``ncsweep.data.variants``) and checks what the config declared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ncsweep.config import ConfigError
from ncsweep.data.containers import DataBundle, Split, check_declared
from ncsweep.data.files import LAYOUTS, DatasetNotFound, read_small
from ncsweep.data.variants import Variants

FORMATS = (*LAYOUTS, "image_folder")


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

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 share: tuple[slice, int] | None = None) -> torch.Tensor:
        if generator is not None and (self.crop_padding or self.flip):
            x = self.augment(x, generator, share)
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

    def augment(self, x: torch.Tensor, generator: torch.Generator,
                share: tuple[slice, int] | None = None) -> torch.Tensor:
        """Random crop with zero padding and random horizontal flip, one draw per image.

        ``share`` = (rows, batch size): x holds those rows of a larger global batch, whose
        draws are made whole and then cut, so every rank draws what one process would.
        """
        b, _, h, w = x.shape
        rows_of, total = share if share is not None else (slice(0, b), b)
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (total, 2), generator=generator)[rows_of]
        flips = (torch.rand(total, generator=generator) < 0.5)[rows_of] if self.flip \
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

    def __init__(self, dataset: torch.utils.data.Dataset, train_transform: Any,
                 eval_transform: Any, num_workers: int = 4) -> None:
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

    def __init__(self, dataset: torch.utils.data.Dataset, rows: torch.Tensor,
                 transform: Any) -> None:
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
                test: bool = True, num_workers: int = 4, **variants: Any) -> DataBundle:
    """A torchvision image data set read offline from ``root``, with the papers' variations.

    Small sets (MNIST, FashionMNIST, CIFAR-10/100, SVHN, STL-10) are decoded once into uint8
    tensors and batched on the device; ``format=image_folder`` (ImageNet and the like) is read
    by DataLoader workers from ``root/folder/{train,val}``. ``mean`` and ``std`` (per channel,
    of the train images in [0, 1]) are required. ``variants`` are the options of
    ``ncsweep.data.variants.Variants`` (class subset, subsample, imbalance, label noise).
    """
    if format not in FORMATS:
        raise ConfigError("dataset.format", format, "one of " + ", ".join(FORMATS))
    for key, value in (("dataset.mean", mean), ("dataset.std", std)):
        if not value:
            raise ConfigError(key, value, "per-channel values of the train images in [0, 1] "
                                          "(1 or C numbers)")
    options = Variants.from_options(variants)
    options.check(num_classes)
    base = Path(os.path.expanduser(str(root))).resolve()
    if format == "image_folder":
        train, test_split, native_classes, native_channels, native_size = _image_folder(
            base, folder or "imagenet", size, augment, test, num_workers, download)
    else:
        train_x, train_y, test_xy, native_classes = read_small(format, base, download, test)
        native_channels, native_size = int(train_x.shape[1]), int(train_x.shape[-1])
        train = Split(_resize(train_x, size), train_y)
        test_split = Split(_resize(test_xy[0], size), test_xy[1]) if test_xy else None
    channels = channels or native_channels
    if channels not in (native_channels, 3) or (channels != native_channels
                                                  and native_channels != 1):
        raise ConfigError("dataset.channels", channels,
                          f"{native_channels} (native) or 3 from one-channel images for {name}")
    side = size or native_size
    check_declared(name, "input_shape", input_shape, (channels, side, side))
    stored_channels = 1 if native_channels == 1 else channels
    counts = "1 number" if stored_channels == 1 else f"1 or {stored_channels} numbers"
    for key, value in (("dataset.mean", mean), ("dataset.std", std)):
        if len(value) not in (1, stored_channels):
            raise ConfigError(key, list(value), f"{counts} for {name}")
    in_memory_augment = augment and format != "image_folder"
    view = ImageView(mean, std, channels, crop_padding if in_memory_augment else 0,
                     flip and in_memory_augment)
    train.view = view
    if test_split is not None:
        test_split.view = view

    train, test_split, info = options.apply(name, train, test_split, native_classes,
                                            num_classes)
    info = {"data_root": str(base), "augment": bool(augment), **info}
    return DataBundle(name, num_classes, tuple(input_shape), train, test_split, info,
                      info["minority_classes"])


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


def _image_folder(base: Path, folder: str, size: int | None, augment: bool, test: bool,
                  num_workers: int, download: bool
                  ) -> tuple[Split, Split | None, int, int, int]:
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

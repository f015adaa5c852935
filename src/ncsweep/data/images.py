"""Image data sets: uint8 images normalised (and augmented) on the device, or read by workers.

Small sets (MNIST, FashionMNIST, CIFAR-10/100, SVHN, STL-10) are decoded once into uint8
tensors held on the device (see ``ncsweep.data.files``); ImageFolder trees (ImageNet and the
like) are read by DataLoader workers. ``load_images`` applies the papers' label and sampling
variants (``ncsweep.data.variants``) and checks what the config declared.
How a split's images then reach the model is ``ncsweep.data.image_inputs``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ncsweep.config import ConfigError
from ncsweep.data.containers import DataBundle, Split, check_declared
from ncsweep.data.files import LAYOUTS, DatasetNotFound, read_small
from ncsweep.data.image_inputs import FileSource, ImageView
from ncsweep.data.variants import Variants

FORMATS = (*LAYOUTS, "image_folder")


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

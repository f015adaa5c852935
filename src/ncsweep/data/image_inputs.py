"""How a split's stored images become model inputs, batch by batch.

``ImageView`` normalises (and, for training, augments) uint8 images on the device;
``FileSource`` reads an image data set from files through DataLoader workers. Both are held by
a :class:`ncsweep.data.containers.Split` and used by its batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


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

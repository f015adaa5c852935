"""Tensor plumbing of the NC metrics: input checks, float64 chunks, the block-upper Gram, tiles."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

F64 = torch.float64
EPS = float(np.finfo(np.float64).eps)
CHUNK_ELEMENTS = 2**22
GRAM_STRIPS = 4
GRAM_BLOCK = 128
UNLIMITED_BYTES = 2**62
MAX_TILE = 1024
MIN_TILE = 64
BLOCK_ELEMENTS = 2**20
TILE_MEMORY_SHARE = 64

ArrayLike = torch.Tensor | np.ndarray


def as_tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """Detached tensor view of a tensor or numpy array, on `device` when given."""
    is_tensor = isinstance(x, torch.Tensor)
    t = x.detach() if is_tensor else torch.from_numpy(np.ascontiguousarray(x))
    return t if device is None else t.to(device)


def as_features(features: ArrayLike, like: torch.Tensor | None) -> torch.Tensor:
    """Validated real (N, d) features on the device and of the width d of `like`, if given."""
    feats = as_tensor(features, None if like is None else like.device)
    check_matrix(feats, "features", "(N, d)")
    if feats.dtype == torch.bool or feats.is_complex():
        raise ValueError(f"features must be real numbers, got dtype {feats.dtype}")
    if like is not None and feats.shape[1] != like.shape[1]:
        raise ValueError(
            f"features have shape {tuple(feats.shape)} but earlier batches had d={like.shape[1]}"
        )
    return feats


def check_classes(k: int) -> None:
    """Refuse fewer than 2 classes, for which no NC metric is defined."""
    if int(k) < 2:
        raise ValueError(f"NC metrics need at least 2 classes, got num_classes={k}")


def check_matrix(x: torch.Tensor, name: str, expected: str) -> None:
    """Refuse an input `name` that is not 2-D, naming the `expected` shape."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D {expected}, got shape {tuple(x.shape)}")


def check_labels(labels: torch.Tensor, feature_shape: torch.Size, k: int) -> None:
    """Refuse labels that are not one integer in [0, k) per feature row."""
    n = feature_shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have shape ({n},) to match features of shape {tuple(feature_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n == 0:
        return
    low, high = torch.stack(torch.aminmax(labels.long())).tolist()
    if low < 0 or high >= k:
        raise ValueError(
            f"labels must lie in [0, {k}) for num_classes={k}, got values in [{low}, {high}]"
        )


def check_classifier_shapes(w: torch.Tensor, b: torch.Tensor | None, k: int, d: int) -> None:
    """Refuse a weight that is not (k, d) or a bias that is not (k,)."""
    if tuple(w.shape) != (k, d):
        raise ValueError(
            f"weight must have shape (num_classes, d) = ({k}, {d}), got {tuple(w.shape)}"
        )
    if b is not None and tuple(b.shape) != (k,):
        raise ValueError(f"bias must have shape (num_classes,) = ({k},), got {tuple(b.shape)}")


def as_classifier(
    weight: ArrayLike, bias: ArrayLike | None, means: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validated float64 (W, b) for class means (K, d), on their device (b = 0 for None), and
    the eps of W's dtype (that of float64 for an integer W)."""
    k, d = means.shape
    w = as_tensor(weight, means.device)
    b = None if bias is None else as_tensor(bias, means.device)
    check_matrix(w, "weight", "(num_classes, d)")
    check_classifier_shapes(w, b, k, d)
    weight_eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else EPS
    w = w.to(F64)
    b = torch.zeros(k, dtype=F64, device=means.device) if b is None else b.to(F64)
    if not bool(torch.isfinite(w).all() & torch.isfinite(b).all()):
        raise ValueError("weight or bias contains NaN or inf")
    return w, b, weight_eps


def _gram_edges(d: int) -> list[int]:
    """Column blocks of width >= GRAM_BLOCK for the upper block strips of a Gram matrix."""
    blocks = max(1, min(GRAM_STRIPS, d // GRAM_BLOCK))
    return [round(i * d / blocks) for i in range(blocks + 1)]


def add_gram_upper(scatter: torch.Tensor, x: torch.Tensor) -> None:
    """Add the block-upper part of x^T x to scatter: symmetry saves up to ~3/8 of the flops."""
    edges = _gram_edges(x.shape[1])
    for lo, hi in itertools.pairwise(edges):
        scatter[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


def symmetric_from_upper(scatter: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from one whose block-upper part (see _gram_edges) is complete."""
    d = scatter.shape[0]
    edges = torch.tensor(_gram_edges(d)[1:-1], dtype=torch.int64, device=scatter.device)
    block = torch.bucketize(torch.arange(d, device=scatter.device), edges, right=True)
    upper = torch.where(block[:, None] > block[None, :], scatter.T, scatter)
    return (upper + upper.T) / 2.0


def float64_chunks(
    feats: torch.Tensor, rows: int | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row chunks of feats copied to float64 in one reused buffer, of `rows` rows (default:
    CHUNK_ELEMENTS elements)."""
    n, d = feats.shape
    step = max(1, CHUNK_ELEMENTS // max(d, 1) if rows is None else rows)
    buffer = torch.empty((min(step, n), d), dtype=F64, device=feats.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        x = buffer[: rows.stop - start]
        x.copy_(feats[rows])
        yield rows, x


def _free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: CUDA's free memory, else MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return UNLIMITED_BYTES


def default_tile_size(num_classes: int, device: torch.device) -> int:
    """Side of the square blocks of the N x K and K x K products: K itself up to MAX_TILE,
    and never so large that a block's float64 working set (TILE_MEMORY_SHARE x 8 bytes per
    entry) would exceed the free memory."""
    by_memory = math.isqrt(max(1, _free_bytes(device) // (TILE_MEMORY_SHARE * 8)))
    return max(1, min(num_classes, MAX_TILE, max(MIN_TILE, by_memory)))


def check_tile_size(tile_size: int | None) -> int | None:
    """The tile size itself when it is a positive integer or None (the default), else refused."""
    if tile_size is None:
        return None
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer or None, got {tile_size!r}")
    return tile_size


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Float32 products in IEEE float32 (no TF32 or bfloat16 passes), as nc4's error bound
    assumes; the previous setting is restored after."""
    previous = torch.get_float32_matmul_precision()
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32

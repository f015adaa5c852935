"""Last-layer classifiers: a learned linear head and a frozen simplex-ETF head (docs/metrics.md);
``frozen`` says which (ncsweep.capabilities reads it from the class a config names)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ncsweep.errors import ConfigError

EMBEDDINGS = ("coordinate", "random")


def simplex_etf(num_classes: int, dim: int, embedding: str = "coordinate", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K unit-norm rows with pairwise cosine -1/(K-1) in R^d, for any d >= K-1.

    The K x K frame sqrt(K/(K-1)) (I - 11^T/K) is embedded with orthonormal columns when
    d >= K, and mapped onto the (K-1)-dimensional complement of 1 when d = K-1 (then it spans
    R^d). ``coordinate`` (the default) is Zhu et al. 2021's construction: the frame times
    ``eye(K, d)``, i.e. the frame on the first K coordinates. Post-ReLU features can then
    collapse onto a one-hot code; a ``random`` (seeded) rotation gives columns of mixed sign.
    """
    k = num_classes
    if k < 2:
        raise ConfigError("dataset.num_classes", k, "K >= 2 for a simplex ETF")
    if dim < k - 1:
        raise ConfigError("dim", dim, f"d >= K-1 = {k - 1} for a simplex ETF of K={k}")
    if embedding not in EMBEDDINGS:
        raise ConfigError("head.embedding", embedding, "one of " + ", ".join(EMBEDDINGS))
    eye = torch.eye(k, dtype=torch.float64)
    frame = math.sqrt(k / (k - 1)) * (eye - 1.0 / k)
    if dim >= k:
        basis = _orthonormal_columns(dim, k, embedding, seed)
    else:
        complement = torch.linalg.qr(frame)[0][:, : k - 1]
        rotation = _orthonormal_columns(k - 1, k - 1, embedding, seed)
        basis = (complement @ rotation.T).T
    return (frame @ basis.T).to(dtype)


def _orthonormal_columns(rows: int, cols: int, embedding: str, seed: int) -> torch.Tensor:
    if embedding == "coordinate":
        return torch.eye(rows, cols, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


class LearnedHead(nn.Linear):
    """A trainable linear classifier W h + b."""

    frozen = False

    def __init__(self, num_classes: int, feature_dim: int, bias: bool = True) -> None:
        super().__init__(feature_dim, num_classes, bias=bias)


class ETFHead(nn.Module):
    """A frozen simplex-ETF classifier with an optionally trainable bias.

    The weight is a parameter with ``requires_grad=False`` so that it counts in
    ``params_total`` but not in ``params_trainable``, and is saved with the model.
    """

    frozen = True

    def __init__(self, num_classes: int, feature_dim: int, bias: bool = True,
                 embedding: str = "coordinate", seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(simplex_etf(num_classes, feature_dim, embedding, seed),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, self.weight, self.bias)

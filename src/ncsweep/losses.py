"""Training losses on the scale of docs/metrics.md: sample means; MSE halved, summed over classes.

CE: (1/N) sum_i [log sum_l exp(z_il) - z_i,y_i].
MSE: (1/N) sum_i (1/2) ||z_i - e_{y_i}||^2, which is K/2 times PyTorch's ``mse_loss``
(a mean over N*K entries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over samples."""
    return F.cross_entropy(logits, labels)


def half_squared_error(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over samples of (1/2)||z - e_y||^2, subtracting 1 in place of a one-hot target."""
    minus_one = torch.full((labels.shape[0], 1), -1.0, dtype=logits.dtype, device=logits.device)
    residual = logits.scatter_add(1, labels[:, None], minus_one)
    return 0.5 * residual.pow(2).sum(dim=1).mean()


LOSS_FUNCTIONS = {"ce": cross_entropy, "mse": half_squared_error}


class CrossEntropy(nn.Module):
    """Mean cross-entropy; ``name`` is what runs record as their loss."""

    name = "ce"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)


class HalfSquaredError(nn.Module):
    """MSE on one-hot targets on the UFM scale: mean over samples of (1/2)||z - e_y||^2."""

    name = "mse"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return half_squared_error(logits, labels)

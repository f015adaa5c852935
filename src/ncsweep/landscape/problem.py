"""The batched UFM objective and gradient, and what is read off the final starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ARMIJO_C1 = 1e-4
CHUNK_ELEMENTS = 2**20
SERIAL_PROBES = 4
MAX_BACKTRACKS = 30
CURVATURE_MIN = 1e-10
STOP_REASONS = ("running", "converged", "small_step", "small_change", "not_descent",
                "line_search_failed", "max_iter")


@dataclass(frozen=True)
class UFMBatch:
    """The UFM objective of R independent starts that share labels, loss and lambdas."""

    labels: torch.Tensor
    num_classes: int
    feature_dim: int
    loss: str
    lambda_w: float
    lambda_h: float
    lambda_b: float
    bias: bool

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Entries of W, H and b in one start's flat vector (b: 0 without a bias)."""
        k, d = self.num_classes, self.feature_dim
        return k * d, self.labels.numel() * d, k if self.bias else 0

    @property
    def size(self) -> int:
        """P, the length of one start's flat vector."""
        return sum(self.sizes)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Views W (R, K, d), H (R, N, d) and b (R, K) or None of a flat (R, P) tensor."""
        kd, nd, nb = self.sizes
        r, k, d = x.shape[0], self.num_classes, self.feature_dim
        weight = x[:, :kd].reshape(r, k, d)
        features = x[:, kd:kd + nd].reshape(r, -1, d)
        bias = x[:, kd + nd:].reshape(r, k) if nb else None
        return weight, features, bias

    def join(self, weight: torch.Tensor, features: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
        """The flat (R, P) tensor of stacked W (R, K, d), H (R, N, d) and b (R, K)."""
        parts = [weight.reshape(weight.shape[0], -1), features.reshape(features.shape[0], -1)]
        if self.bias:
            parts.append(bias.reshape(bias.shape[0], -1))
        return torch.cat(parts, dim=1)

    def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-start objectives f (R,) and their gradients (R, P), in closed form."""
        weight, features, bias = self.split(x)
        n = features.shape[1]
        logits = torch.bmm(features, weight.transpose(1, 2))
        if bias is not None:
            logits = logits + bias[:, None, :]
        target = F.one_hot(self.labels, self.num_classes).to(x.dtype)
        if self.loss == "ce":
            lse = torch.logsumexp(logits, dim=2)
            picked = logits.gather(2, self.labels.expand(x.shape[0], -1)[..., None])[..., 0]
            value = (lse - picked).mean(dim=1)
            dlogits = (torch.exp(logits - lse[..., None]) - target) / n
        elif self.loss == "mse":
            residual = logits - target
            value = 0.5 * residual.pow(2).sum(dim=(1, 2)) / n
            dlogits = residual / n
        else:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of ['ce', 'mse']")
        value = (value + 0.5 * self.lambda_w * weight.pow(2).sum(dim=(1, 2))
                 + 0.5 * self.lambda_h * features.pow(2).sum(dim=(1, 2)))
        grad_w = torch.bmm(dlogits.transpose(1, 2), features) + self.lambda_w * weight
        grad_h = torch.bmm(dlogits, weight) + self.lambda_h * features
        grad_b = None
        if bias is not None:
            value = value + 0.5 * self.lambda_b * bias.pow(2).sum(dim=1)
            grad_b = dlogits.sum(dim=1) + self.lambda_b * bias
        return value, self.join(grad_w, grad_h, grad_b)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (R, P) tensors (a product and a sum: faster than vecdot)."""
    return (a * b).sum(dim=1)




def hessian_min_eigs(problem: UFMBatch, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The smallest Hessian eigenvalue of each start's objective at its row of ``x`` (R,).

    Up to theory.DENSE_MAX_PARAMS parameters the Hessians of ``chunk`` starts at a time are
    built at once (torch.func.vmap of torch.func.hessian) and solved by eigvalsh, the exact
    rule of theory.hessian_min_eig; larger starts, and up to SERIAL_PROBES starts (where
    loading torch.func costs more than it saves), go one by one through
    theory.ufm_hessian_min_eig.
    """
    from ncsweep.theory import DENSE_MAX_PARAMS, ufm_hessian_min_eig, ufm_objective

    labels, lambdas = problem.labels, (problem.lambda_w, problem.lambda_h, problem.lambda_b)
    if problem.size > DENSE_MAX_PARAMS or x.shape[0] <= SERIAL_PROBES:
        out = []
        for row in x:
            weight, features, bias = problem.split(row[None])
            out.append(ufm_hessian_min_eig(weight[0], features[0],
                                           None if bias is None else bias[0], labels,
                                           problem.loss, *lambdas))
        return torch.tensor(out, dtype=torch.float64)

    def objective(row: torch.Tensor) -> torch.Tensor:
        weight, features, bias = problem.split(row[None])
        return ufm_objective(weight[0], features[0], None if bias is None else bias[0], labels,
                             problem.loss, *lambdas)

    hessians = torch.func.vmap(torch.func.hessian(objective))
    parts = []
    for start in range(0, x.shape[0], chunk):
        block = hessians(x[start:start + chunk].double())
        parts.append(torch.linalg.eigvalsh(0.5 * (block + block.transpose(1, 2)))[:, 0])
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def distinct_values(values: torch.Tensor, rel_tol: float = 1e-9) -> int:
    """How many values differ, two being the same within rel_tol of the larger magnitude.

    Sorted values are chained: a value starts a new group when it exceeds the previous one
    by more than rel_tol * max(|a|, |b|, 1e-300); NaNs count as one group of their own.
    """
    finite = values[torch.isfinite(values)].double().sort().values
    steps = finite[1:] - finite[:-1]
    scale = torch.maximum(finite[1:].abs(), finite[:-1].abs()).clamp(min=1e-300)
    groups = int((steps > rel_tol * scale).sum()) + int(finite.numel() > 0)
    return groups + int(bool((~torch.isfinite(values)).any()))


def quantiles(values: torch.Tensor, name: str) -> dict[str, float]:
    """``<name>_min``, ``_median`` and ``_max`` of a 1-D tensor (NaN where empty)."""
    values = values[~torch.isnan(values)].double()
    if values.numel() == 0:
        return {f"{name}_{q}": math.nan for q in ("min", "median", "max")}
    return {f"{name}_min": values.min().item(), f"{name}_median": values.median().item(),
            f"{name}_max": values.max().item()}

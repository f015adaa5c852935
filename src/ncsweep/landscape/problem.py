"""The batched UFM objective and gradient, and what is read off the final starts."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ARMIJO_C1 = 1e-4
CHUNK_ELEMENTS = 2**20
CLOSED_FORM_MAX_PARAMS = 2048
HESSIAN_CHUNK_ELEMENTS = 2**25
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

    def logits_and_loss(self, weight: torch.Tensor, features: torch.Tensor,
                        bias: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-start mean loss (R,), its gradient in the logits (R, N, K) and, for CE, the
        softmax (R, N, K) behind it (None for MSE)."""
        n = features.shape[1]
        logits = torch.bmm(features, weight.transpose(1, 2))
        if bias is not None:
            logits = logits + bias[:, None, :]
        target = F.one_hot(self.labels, self.num_classes).to(logits.dtype)
        if self.loss == "ce":
            lse = torch.logsumexp(logits, dim=2)
            picked = logits.gather(2, self.labels.expand(logits.shape[0], -1)[..., None])[..., 0]
            probs = torch.exp(logits - lse[..., None])
            return (lse - picked).mean(dim=1), (probs - target) / n, probs
        if self.loss == "mse":
            residual = logits - target
            return 0.5 * residual.pow(2).sum(dim=(1, 2)) / n, residual / n, None
        raise ValueError(f"unknown loss {self.loss!r}; expected one of ['ce', 'mse']")

    def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-start objectives f (R,) and their gradients (R, P), in closed form."""
        weight, features, bias = self.split(x)
        value, dlogits, _ = self.logits_and_loss(weight, features, bias)
        value = (value + 0.5 * self.lambda_w * weight.pow(2).sum(dim=(1, 2))
                 + 0.5 * self.lambda_h * features.pow(2).sum(dim=(1, 2)))
        grad_w = torch.bmm(dlogits.transpose(1, 2), features) + self.lambda_w * weight
        grad_h = torch.bmm(dlogits, weight) + self.lambda_h * features
        grad_b = None
        if bias is not None:
            value = value + 0.5 * self.lambda_b * bias.pow(2).sum(dim=1)
            grad_b = dlogits.sum(dim=1) + self.lambda_b * bias
        return value, self.join(grad_w, grad_h, grad_b)


def hessians(problem: UFMBatch, x: torch.Tensor) -> torch.Tensor:
    """Each start's Hessian (R, P, P) in closed form, in x's layout [W; H; b] (float64).

    With z_i = W h_i + b, g_i = df/dz_i and the per-sample loss curvature S_i = diag(q_i) -
    u_i u_i^T (CE: q = u = softmax(z_i); MSE: q = 1, u = 0), the blocks are, over 1/N:
    WW = sum_i S_i (x) h_i h_i^T; h_i h_i = W^T S_i W (h_j, j != i: 0); W h_i = S_i W (x)
    h_i, plus N g_i (x) I_d; bb = sum_i S_i; bW = sum_i S_i (x) h_i^T; b h_i = S_i W; plus
    the lambdas on the diagonal.
    """
    x = x.double()
    weight, features, bias = problem.split(x)
    r, k, d = weight.shape
    n = features.shape[1]
    _, g, probs = problem.logits_and_loss(weight, features, bias)
    q = torch.ones_like(g) if probs is None else probs
    u = torch.zeros_like(g) if probs is None else probs
    q, u = q / n, u / math.sqrt(n)
    v = torch.bmm(u, weight)  # (R, N, d): W^T u_i
    eye_d = torch.eye(d, dtype=x.dtype, device=x.device)
    kd, nd = k * d, n * d
    out = torch.zeros(r, problem.size, problem.size, dtype=x.dtype, device=x.device)
    ww = out[:, :kd, :kd].view(r, k, d, k, d)
    ww.diagonal(dim1=1, dim2=3).copy_(torch.einsum("rik,ria,rib->rabk", q, features, features))
    a = (u[:, :, :, None] * features[:, :, None, :]).reshape(r, n, kd)
    out[:, :kd, :kd] -= torch.bmm(a.transpose(1, 2), a)
    hh = out[:, kd:kd + nd, kd:kd + nd].view(r, n, d, n, d)
    hh.diagonal(dim1=1, dim2=3).copy_(
        (torch.einsum("rkb,rik,rkc->ribc", weight, q, weight)
         - v[..., :, None] * v[..., None, :]).permute(0, 2, 3, 1))
    wh = (torch.einsum("ril,ria,rlb->rlaib", q, features, weight)
          - torch.einsum("ril,ria,rib->rlaib", u, features, v)
          + g.permute(0, 2, 1)[:, :, None, :, None] * eye_d[None, None, :, None, :])
    _set_pair(out, slice(0, kd), slice(kd, kd + nd), wh.reshape(r, kd, nd))
    if bias is not None:
        b = slice(kd + nd, None)
        out[:, b, b] = torch.diag_embed(q.sum(dim=1)) - torch.bmm(u.transpose(1, 2), u)
        bw = -torch.einsum("rik,ril,ria->rkla", u, u, features)
        bw.diagonal(dim1=1, dim2=2).add_(torch.einsum("rik,ria->rak", q, features))
        bh = (q[..., None] * weight[:, None]
              - u[..., None] * v[:, :, None, :]).permute(0, 2, 1, 3)
        _set_pair(out, b, slice(0, kd), bw.reshape(r, k, kd))
        _set_pair(out, b, slice(kd, kd + nd), bh.reshape(r, k, nd))
    lambdas = [problem.lambda_w] * kd + [problem.lambda_h] * nd + [problem.lambda_b] * (
        k if bias is not None else 0)
    out.diagonal(dim1=1, dim2=2).add_(torch.tensor(lambdas, dtype=x.dtype, device=x.device))
    return out


def _set_pair(out: torch.Tensor, rows: slice, cols: slice, block: torch.Tensor) -> None:
    """An off-diagonal block and its transpose."""
    out[:, rows, cols] = block
    out[:, cols, rows] = block.transpose(1, 2)


def hessian_min_eigs(problem: UFMBatch, x: torch.Tensor) -> torch.Tensor:
    """The smallest Hessian eigenvalue of each start's objective at its row of ``x`` (R,).

    Up to CLOSED_FORM_MAX_PARAMS parameters: eigvalsh of the closed-form Hessians (``hessians``),
    exact, chunked to HESSIAN_CHUNK_ELEMENTS; larger starts go one by one through
    theory.ufm_hessian_min_eig (Lanczos on Hessian-vector products).
    """
    from ncsweep.theory import ufm_hessian_min_eig

    if problem.size > CLOSED_FORM_MAX_PARAMS:
        labels, lambdas = problem.labels, (problem.lambda_w, problem.lambda_h, problem.lambda_b)
        out = []
        for row in x:
            weight, features, bias = problem.split(row[None])
            out.append(ufm_hessian_min_eig(weight[0], features[0],
                                           None if bias is None else bias[0], labels,
                                           problem.loss, *lambdas))
        return torch.tensor(out, dtype=torch.float64)
    chunk = max(1, HESSIAN_CHUNK_ELEMENTS // problem.size**2)
    parts = [torch.linalg.eigvalsh(hessians(problem, x[start:start + chunk]))[:, 0]
             for start in range(0, x.shape[0], chunk)]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def distinct_values(values: torch.Tensor, rel_tol: float = 1e-9, abs_tol: float = 0.0) -> int:
    """How many values differ, two being the same within max(rel_tol * magnitude, abs_tol).

    Sorted values are chained: a value starts a new group when it exceeds the previous one
    by more than max(rel_tol * max(|a|, |b|, 1e-300), abs_tol); NaNs count as one group.
    """
    return len(value_groups(values, rel_tol, abs_tol)) + int(
        bool((~torch.isfinite(values)).any()))


def value_groups(values: torch.Tensor, rel_tol: float = 1e-9,
                 abs_tol: float = 0.0) -> list[tuple[float, float, int]]:
    """The finite values chained into groups as :func:`distinct_values` counts them, lowest
    first: (lowest value, spread = highest - lowest, members) per group."""
    finite = values[torch.isfinite(values)].double().sort().values.cpu()
    if finite.numel() == 0:
        return []
    steps = finite[1:] - finite[:-1]
    scale = torch.maximum(finite[1:].abs(), finite[:-1].abs()).clamp(min=1e-300)
    breaks = (steps > torch.clamp(rel_tol * scale, min=abs_tol)).nonzero().squeeze(1) + 1
    edges = [0, *breaks.tolist(), finite.numel()]
    return [(finite[a].item(), (finite[b - 1] - finite[a]).item(), b - a)
            for a, b in itertools.pairwise(edges)]


def stopping_tolerance(tolerance_grad: float, x: torch.Tensor) -> float:
    """The objective differences a gradient stopping rule cannot resolve, for starts ``x`` (R, P).

    A start stops once its gradient max-norm is <= ``tolerance_grad``, so its 2-norm is <=
    sqrt(P) tolerance_grad; to first order f moves by at most that times the distance
    travelled, which the points' largest norm bounds in scale: sqrt(P) tolerance_grad
    max_r ||x_r||. Values closer than this are one value as far as the stopping rule can tell.
    """
    if x.numel() == 0:
        return 0.0
    return math.sqrt(x.shape[1]) * tolerance_grad * x.double().norm(dim=1).max().item()


def distinct_summary(values: torch.Tensor, x: torch.Tensor,
                     tolerance_grad: float) -> dict[str, float]:
    """``distinct_objective_values`` beyond :func:`stopping_tolerance`, with the tolerance
    (``distinct_value_tol``) and the largest spread inside one value (``distinct_value_spread``).
    """
    tol = stopping_tolerance(tolerance_grad, x)
    groups = value_groups(values, rel_tol=0.0, abs_tol=tol)
    return {"distinct_objective_values": distinct_values(values, rel_tol=0.0, abs_tol=tol),
            "distinct_value_tol": tol,
            "distinct_value_spread": max((g[1] for g in groups), default=math.nan)}


def quantiles(values: torch.Tensor, name: str) -> dict[str, float]:
    """``<name>_min``, ``_median`` and ``_max`` of a 1-D tensor (NaN where empty)."""
    values = values[~torch.isnan(values)].double()
    if values.numel() == 0:
        return {f"{name}_{q}": math.nan for q in ("min", "median", "max")}
    return {f"{name}_min": values.min().item(), f"{name}_median": values.median().item(),
            f"{name}_max": values.max().item()}

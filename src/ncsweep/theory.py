"""UFM theory: the objective, its closed-form global optimum and Hessian curvature probes.

Notation and formulas follow docs/metrics.md, "The UFM and its global optimum":

    f(W, H, b) = (1/N) sum_i L(W h_i + b, y_i)
                 + (lambda_W/2)||W||^2 + (lambda_H/2)||H||^2 + (lambda_b/2)||b||^2

with W (K, d), H (N, d) one row per sample, b (K,), n samples per class and N = nK.

Closed forms covered by :func:`ufm_optimum` (c = sqrt(lambda_W / (n lambda_H)), h_{k,i} = c w_k):

- CE, with a bias (any lambda_b >= 0) or without one: simplex ETF, b* = 0, and
  a = ((K-1)/K) sqrt(n lambda_H/lambda_W) log((K-1)(1-s)/s), s = (K-1) sqrt(n lambda_W lambda_H).
  With lambda_b = 0 the CE loss is invariant under b -> b + t 1, so b* = 0 is the minimiser of
  least norm; the optimal value equals the penalised one (take lambda_b -> 0).
- MSE with an unpenalised bias: simplex ETF, b* = (1/K) 1,
  a = ((K-1)/K)(sqrt(n lambda_H/lambda_W) - K n lambda_H).
- MSE without a bias: orthogonal frame, W W^T = (sqrt(n lambda_H/lambda_W) - K n lambda_H) I.

All three are non-zero exactly when K sqrt(n lambda_W lambda_H) < 1; otherwise W = H = 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ncsweep.heads import simplex_etf
from ncsweep.losses import LOSS_FUNCTIONS

DENSE_MAX_PARAMS = 200

REGIMES = ("etf", "orthogonal_frame", "zero")


@dataclass(frozen=True)
class UFMOptimum:
    """A global minimiser (W*, H*, b*) of the UFM and its value f*, rows of H* class-major."""

    objective: float
    weight: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor | None
    a: float
    regime: str


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Look up a loss by name, refusing unknown names with the accepted ones listed."""
    if loss not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSS_FUNCTIONS)}")
    return LOSS_FUNCTIONS[loss]


def ufm_objective(
    weight: torch.Tensor,
    features: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    loss: str,
    lambda_w: float,
    lambda_h: float,
    lambda_b: float,
) -> torch.Tensor:
    """The full UFM objective f(W, H, b); ``features`` must hold all N samples (one row each).

    The loss is the mean over the given rows and the H penalty is over the same rows, so a
    subset of samples does not give an unbiased minibatch estimate of f; bias=None drops b.
    """
    logits = features @ weight.T
    if bias is not None:
        logits = logits + bias
    value = _loss_fn(loss)(logits, labels)
    value = value + 0.5 * lambda_w * weight.pow(2).sum() + 0.5 * lambda_h * features.pow(2).sum()
    if bias is not None:
        value = value + 0.5 * lambda_b * bias.pow(2).sum()
    return value


def _validate(num_classes: int, dim: int, n_per_class: int, loss: str, lambda_w: float,
              lambda_h: float, lambda_b: float, bias: bool) -> None:
    """Reject sizes, penalties and loss/bias combinations that have no closed form here."""
    _loss_fn(loss)
    if num_classes < 2 or dim < 1 or n_per_class < 1:
        raise ValueError(
            f"need num_classes >= 2, dim >= 1, n_per_class >= 1; got K={num_classes}, "
            f"d={dim}, n={n_per_class}"
        )
    if not (lambda_w > 0 and lambda_h > 0):
        raise ValueError(f"lambda_w and lambda_h must be > 0; got {lambda_w}, {lambda_h}")
    if not lambda_b >= 0:
        raise ValueError(f"lambda_b must be >= 0; got {lambda_b}")
    if loss == "mse" and bias and lambda_b > 0:
        raise ValueError(
            "no closed-form UFM optimum for loss='mse' with a penalised bias "
            f"(bias=True, lambda_b={lambda_b} > 0); use lambda_b=0 or bias=False"
        )


def _row_norm_sq(
    loss: str, frame: str, num_classes: int, n_per_class: int, lambda_w: float, lambda_h: float
) -> float:
    """The squared row norm a* of W*, zero at and above K sqrt(n lambda_W lambda_H) = 1."""
    k, n = num_classes, n_per_class
    ratio = k * math.sqrt(n * lambda_w * lambda_h)
    if ratio >= 1:
        return 0.0
    scale = math.sqrt(n * lambda_h / lambda_w)
    if loss == "ce":
        s = (k - 1) * math.sqrt(n * lambda_w * lambda_h)
        return (k - 1) / k * scale * math.log((k - 1) * (1 - s) / s)
    shrunk = scale * (1 - ratio)
    return shrunk if frame == "orthogonal_frame" else (k - 1) / k * shrunk


def _orthogonal_frame_directions(num_classes: int, dim: int) -> torch.Tensor:
    """Orthonormal rows (K, d): the first K coordinate axes."""
    if dim < num_classes:
        raise ValueError(
            f"the MSE no-bias optimum (orthogonal frame) of K={num_classes} classes "
            f"needs dim >= K; got {dim}"
        )
    return torch.eye(num_classes, dim, dtype=torch.float64)


def ufm_optimum(num_classes: int, dim: int, n_per_class: int, loss: str, lambda_w: float,
                lambda_h: float, lambda_b: float = 0.0, bias: bool = True,
                dtype: torch.dtype = torch.float64) -> UFMOptimum:
    """A closed-form global minimiser of the balanced UFM, to measure a run's gap f - f*.

    Raises ValueError where no closed form is covered: MSE with a penalised bias, or a
    non-zero optimum that does not fit in ``dim`` (ETF: d < K-1; orthogonal frame: d < K).
    In the zero regime any ``dim`` is accepted. ``objective`` is f at the returned point,
    evaluated in float64.
    """
    _validate(num_classes, dim, n_per_class, loss, lambda_w, lambda_h, lambda_b, bias)
    k, n = num_classes, n_per_class
    frame = "orthogonal_frame" if loss == "mse" and not bias else "etf"
    a = _row_norm_sq(loss, frame, k, n, lambda_w, lambda_h)
    if a > 0:
        regime = frame
        if frame == "etf":
            directions = simplex_etf(k, dim, "coordinate", dtype=torch.float64)
        else:
            directions = _orthogonal_frame_directions(k, dim)
    else:
        regime = "zero"
        directions = torch.zeros(k, dim, dtype=torch.float64)
    weight = math.sqrt(a) * directions
    labels = torch.arange(k).repeat_interleave(n)
    features = math.sqrt(lambda_w / (n * lambda_h)) * weight[labels]
    b = None
    if bias:
        b = torch.full((k,), 1.0 / k if loss == "mse" else 0.0, dtype=torch.float64)
    objective = ufm_objective(weight, features, b, labels, loss, lambda_w, lambda_h, lambda_b)
    return UFMOptimum(
        objective=float(objective),
        weight=weight.to(dtype),
        features=features.to(dtype),
        labels=labels,
        bias=None if b is None else b.to(dtype),
        a=a,
        regime=regime,
    )


def ufm_origin_min_eig(num_classes: int, n_per_class: int, lam: float) -> float:
    """Smallest Hessian eigenvalue of f at W = H = 0 for lambda_W = lambda_H = lam (both losses).

    It is the smallest eigenvalue of the (W, H) block, lam - sigma_max(G)/N with
    sigma_max(G) = sqrt(n); it is that of the whole Hessian whenever it is negative
    (the bias block is positive semi-definite), i.e. below the threshold K sqrt(n) lam < 1.
    """
    return lam - 1.0 / (num_classes * math.sqrt(n_per_class))


def _flat_params(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A float64 leaf vector holding all params and views of it shaped like each param."""
    device = params[0].device
    flat = torch.cat([p.detach().reshape(-1).to(device, torch.float64) for p in params])
    flat.requires_grad_(True)
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return flat, views


def _hvp_operator(
    fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.device]:
    """v -> H v for the Hessian of fn(*params) at the params, by double backward in float64."""
    flat, views = _flat_params(params)
    value = fn(*views)
    if not value.requires_grad:
        return (lambda v: torch.zeros_like(v)), flat.numel(), flat.device
    (grad,) = torch.autograd.grad(value, flat, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if not grad.requires_grad:
            return torch.zeros_like(v)
        (out,) = torch.autograd.grad(grad, flat, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if out is None else out.detach()

    return hvp, flat.numel(), flat.device


def _dense_min_eig(hvp: Callable[[torch.Tensor], torch.Tensor], size: int, device) -> float:
    """Exact smallest eigenvalue from the Hessian assembled column by column from HVPs."""
    eye = torch.eye(size, dtype=torch.float64, device=device)
    hessian = torch.stack([hvp(eye[i]) for i in range(size)], dim=1)
    return float(torch.linalg.eigvalsh(0.5 * (hessian + hessian.T))[0])


def _random_orthogonal(
    basis: torch.Tensor, size: int, generator: torch.Generator, device
) -> torch.Tensor:
    """A seeded random unit vector orthogonal to the columns of ``basis``."""
    v = torch.randn(size, generator=generator, dtype=torch.float64).to(device)
    for _ in range(2):
        v = v - basis @ (basis.T @ v)
    return v / v.norm()


def _lanczos_min_eig(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    device,
    num_iter: int,
    tol: float,
    basis_size: int,
    generator: torch.Generator,
) -> float:
    """Smallest eigenvalue by thick-restart Lanczos with full reorthogonalisation.

    The projected matrix T = Q^T A Q is filled from the (twice) Gram-Schmidt coefficients,
    so Ritz vectors kept at a restart need no special treatment. Stops when the Ritz
    residual of the smallest pair is <= tol * max|Ritz value|, or after num_iter HVPs.
    """
    m = min(basis_size, size)
    keep = max(1, m // 2)
    empty = torch.zeros(size, 0, dtype=torch.float64, device=device)
    q_basis = torch.zeros(size, m, dtype=torch.float64, device=device)
    q_basis[:, 0] = _random_orthogonal(empty, size, generator, device)
    proj = torch.zeros(m, m, dtype=torch.float64)
    start, used, scale = 0, 0, 0.0
    while True:
        residual, beta = None, 0.0
        for j in range(start, m):
            w = hvp(q_basis[:, j])
            used += 1
            coeffs = torch.zeros(j + 1, dtype=torch.float64, device=device)
            for _ in range(2):
                step = q_basis[:, : j + 1].T @ w
                w = w - q_basis[:, : j + 1] @ step
                coeffs += step
            coeffs_cpu = coeffs.cpu()
            proj[: j + 1, j] = coeffs_cpu
            proj[j, : j + 1] = coeffs_cpu
            beta = float(w.norm())
            residual = w
            if j + 1 < m:
                if beta <= 1e-12 * max(scale, float(coeffs.abs().max()), 1e-300):
                    q_basis[:, j + 1] = _random_orthogonal(
                        q_basis[:, : j + 1], size, generator, device
                    )
                else:
                    q_basis[:, j + 1] = w / beta
        theta, vecs = torch.linalg.eigh(proj)
        scale = max(scale, float(theta.abs().max()))
        ritz_residual = beta * abs(float(vecs[m - 1, 0]))
        if m == size or ritz_residual <= tol * max(scale, 1e-300):
            return float(theta[0])
        if used >= num_iter:
            warnings.warn(
                f"Lanczos stopped after {used} Hessian-vector products with Ritz residual "
                f"{ritz_residual:.2e} > tol * scale = {tol * scale:.2e}",
                RuntimeWarning,
                stacklevel=3,
            )
            return float(theta[0])
        kept = q_basis @ vecs[:, :keep].to(device)
        q_basis[:, :keep] = kept
        proj.zero_()
        proj[:keep, :keep] = torch.diag(theta[:keep])
        if beta <= 1e-12 * max(scale, 1e-300):
            q_basis[:, keep] = _random_orthogonal(kept, size, generator, device)
        else:
            q_basis[:, keep] = residual / beta
        start = keep


def hessian_min_eig(
    fn: Callable[..., torch.Tensor],
    params: Sequence[torch.Tensor],
    num_iter: int = 2000,
    tol: float = 1e-9,
    seed: int = 0,
    *,
    basis_size: int = 64,
    dense_max: int = DENSE_MAX_PARAMS,
) -> float:
    """Smallest eigenvalue of the Hessian of scalar fn(*params) at the params, to detect saddles.

    Works in float64 on the params' device from Hessian-vector products (double backward).
    Rule: with at most ``dense_max`` parameters in total the Hessian is assembled from HVPs
    against the identity basis and solved exactly by eigvalsh; otherwise thick-restart
    Lanczos with full reorthogonalisation runs with ``basis_size`` vectors of memory, at most
    ``num_iter`` HVPs, stopping when the Ritz residual is <= tol * (spectral-norm estimate)
    and warning if it stops first. Lanczos Ritz values never undershoot the true minimum.
    Deterministic given ``seed``.
    """
    if not params:
        raise ValueError("params must hold at least one tensor")
    hvp, size, device = _hvp_operator(fn, params)
    if size <= dense_max:
        return _dense_min_eig(hvp, size, device)
    if basis_size < 2:
        raise ValueError(f"basis_size must be >= 2; got {basis_size}")
    generator = torch.Generator().manual_seed(seed)
    return _lanczos_min_eig(hvp, size, device, num_iter, tol, basis_size, generator)


def ufm_hessian_min_eig(weight: torch.Tensor, features: torch.Tensor,
                        bias: torch.Tensor | None, *objective: Any, **probe: Any) -> float:
    """Smallest Hessian eigenvalue of the UFM objective at (W, H, b), over W, H and b if present.

    ``objective`` is the rest of :func:`ufm_objective`'s arguments (labels, loss and the three
    lambdas); ``probe`` goes to :func:`hessian_min_eig` (num_iter, tol, seed, basis_size,
    dense_max).
    """
    labels, loss, *lambdas = objective
    _loss_fn(loss)
    labels = labels.to(weight.device)

    def fn(w: torch.Tensor, h: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return ufm_objective(w, h, rest[0] if rest else None, labels, loss, *lambdas)

    params = [weight, features] if bias is None else [weight, features, bias]
    return hessian_min_eig(fn, params, **probe)

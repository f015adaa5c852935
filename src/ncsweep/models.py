"""Backbones that end in a d-dimensional feature layer, and the network that puts a head on one."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden blocks of ``width``, then a feature layer of width d.

    Every block is Linear (+ BatchNorm) + activation; the feature layer is one too when
    ``feature_activation`` is set, as in the MLPs of the Neural Collapse papers.
    """

    def __init__(self, input_shape: Sequence[int], feature_dim: int, width: int = 512,
                 depth: int = 2, batch_norm: bool = True, activation: str = "relu",
                 feature_activation: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"arch.activation={activation!r} is not allowed: one of "
                             + ", ".join(ACTIVATIONS))
        widths = [math.prod(input_shape), *([width] * depth)]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += self._block(fan_in, fan_out, batch_norm, activation, True)
        layers += self._block(widths[-1], feature_dim, batch_norm, activation, feature_activation)
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def _block(fan_in: int, fan_out: int, batch_norm: bool, activation: str,
               nonlinear: bool) -> list[nn.Module]:
        block: list[nn.Module] = [nn.Linear(fan_in, fan_out)]
        if nonlinear:
            if batch_norm:
                block.append(nn.BatchNorm1d(fan_out))
            block.append(ACTIVATIONS[activation]())
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Network(nn.Module):
    """backbone -> d features -> head; ``features_and_logits`` gives the head's exact input."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features)

    def penalty(self) -> torch.Tensor | float:
        """Extra regularisation of the objective (the UFM's lambdas); 0 for ordinary networks."""
        penalty = getattr(self.backbone, "penalty", None)
        return penalty(self.head) if penalty is not None else 0.0

    def example_input(self, batch_size: int, input_shape: Sequence[int]) -> torch.Tensor:
        """A random batch of the data's shape, for dry runs."""
        example = getattr(self.backbone, "example_input", None)
        if example is not None:
            return example(batch_size)
        device = next(self.parameters()).device
        return torch.randn(batch_size, *input_shape, device=device)


class UFMFeatures(nn.Module):
    """The unconstrained feature model's features: one free row h_i per sample, indexed by i.

    With a learned head this is exactly the objective of nc-metrics.md: the training loss
    plus ``penalty`` = (lambda_w/2)||W||^2 + (lambda_h/2)||H||^2 + (lambda_b/2)||b||^2, so the
    optimiser's own weight decay must be 0. Each eval point adds the objective, its gap to
    the closed-form optimum and the gradient norm; the end of a run adds the Hessian probe.
    """

    def __init__(self, input_shape: Sequence[int], feature_dim: int, num_classes: int,
                 n_per_class: int, lambda_w: float = 5e-3, lambda_h: float = 5e-3,
                 lambda_b: float = 0.0, init_std: float = 1.0, dtype: str = "float64",
                 probe_grad_tol: float = 1e-6, probe_gap_tol: float = 1e-6,
                 probe_eig_tol: float = 1e-8) -> None:
        super().__init__()
        self.num_classes, self.n_per_class = num_classes, n_per_class
        self.lambdas = (lambda_w, lambda_h, lambda_b)
        self.dtype = getattr(torch, dtype)
        n = num_classes * n_per_class
        scale = init_std / math.sqrt(feature_dim)
        self.features = nn.Parameter(scale * torch.randn(n, feature_dim, dtype=self.dtype))
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(n_per_class))
        self.tolerances = (probe_grad_tol, probe_gap_tol, probe_eig_tol)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.features[index]

    def example_input(self, batch_size: int) -> torch.Tensor:
        n = self.features.shape[0]
        return torch.randint(n, (min(batch_size, n),), device=self.features.device)

    def penalty(self, head: nn.Module) -> torch.Tensor:
        lambda_w, lambda_h, lambda_b = self.lambdas
        value = 0.5 * lambda_h * self.features.pow(2).sum()
        value = value + 0.5 * lambda_w * head.weight.pow(2).sum()
        if head.bias is not None:
            value = value + 0.5 * lambda_b * head.bias.pow(2).sum()
        return value

    def _theory_args(self, head: nn.Module, loss_fn: nn.Module) -> tuple:
        return (head.weight, self.features, head.bias, self.labels, loss_fn.name, *self.lambdas)

    def optimum(self, head: nn.Module, loss_fn: nn.Module) -> float | None:
        """f* from the closed form; None where the head is frozen (then f* is not the UFM's)."""
        from ncsweep.theory import ufm_optimum

        if not head.weight.requires_grad:
            return None
        return ufm_optimum(self.num_classes, self.features.shape[1], self.n_per_class,
                           loss_fn.name, *self.lambdas, bias=head.bias is not None).objective

    def eval_metrics(self, head: nn.Module, loss_fn: nn.Module) -> dict[str, float]:
        """objective, objective_star, objective_gap and grad_norm over the trainable parameters."""
        from ncsweep.theory import ufm_objective

        params = [p for p in (head.weight, self.features, head.bias)
                  if p is not None and p.requires_grad]
        with torch.enable_grad():
            objective = ufm_objective(*self._theory_args(head, loss_fn))
            grads = torch.autograd.grad(objective, params)
        row = {"objective": objective.item(),
               "grad_norm": torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()}
        star = self.optimum(head, loss_fn)
        if star is not None:
            row.update(objective_star=star, objective_gap=row["objective"] - star)
        return row

    def final_checks(self, head: nn.Module, loss_fn: nn.Module, final: dict) -> dict:
        """The landscape probe at the end point, and a loud flag for a spurious minimum."""
        from ncsweep.theory import hessian_min_eig, ufm_objective

        weight, features, bias, labels, loss, *lambdas = self._theory_args(head, loss_fn)
        params = [p for p in (weight, features, bias) if p is not None and p.requires_grad]
        fixed = {"weight": weight, "features": features, "bias": bias}
        names = [k for k, p in fixed.items() if p is not None and p.requires_grad]

        def objective(*values: torch.Tensor) -> torch.Tensor:
            parts = {**fixed, **dict(zip(names, values, strict=True))}
            return ufm_objective(parts["weight"], parts["features"], parts["bias"], labels,
                                 loss, *lambdas)

        min_eig = hessian_min_eig(objective, [p.detach() for p in params])
        grad_tol, gap_tol, eig_tol = self.tolerances
        gap = final.get("objective_gap")
        suspect = (gap is not None and final["grad_norm"] < grad_tol and gap > gap_tol
                   and min_eig >= -eig_tol)
        checks = {"hessian_min_eig": min_eig, "spurious_minimum_suspect": bool(suspect)}
        if gap is not None:
            checks["reached_global_optimum"] = bool(gap <= gap_tol)
        if suspect:
            print(f"ncsweep: WARNING spurious_minimum_suspect: gradient norm "
                  f"{final['grad_norm']:.2e}, gap {gap:.2e} > {gap_tol:g}, smallest Hessian "
                  f"eigenvalue {min_eig:.2e} (no negative curvature)", flush=True)
        return checks

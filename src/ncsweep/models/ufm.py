"""The unconstrained feature model's free features, with its objective's hooks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ncsweep.models.network import Backbone


class UFMFeatures(Backbone):
    """The unconstrained feature model's features: one free row h_i per sample, indexed by i.

    With a learned head this is exactly the objective of nc-metrics.md: the training loss
    plus ``penalty`` = (lambda_w/2)||W||^2 + (lambda_h/2)||H||^2 + (lambda_b/2)||b||^2, so the
    optimiser's own weight decay must be 0. Each eval point adds the objective, its gap to
    the closed-form optimum and the gradient norm; the end of a run adds the Hessian probe.
    ``n_per_class`` is one count for all classes or one per class (as ``dataset.n_per_class``);
    the closed form is that of balanced classes, so with unequal counts the objective's
    optimum and gap are left out, never estimated.
    """

    def __init__(self, input_shape: Sequence[int], feature_dim: int, num_classes: int,
                 n_per_class: int | Sequence[int], lambda_w: float = 5e-3, lambda_h: float = 5e-3,
                 lambda_b: float = 0.0, init_std: float = 1.0, dtype: str = "float64",
                 probe_grad_tol: float = 1e-6, probe_gap_tol: float = 1e-6,
                 probe_eig_tol: float = 1e-8) -> None:
        from ncsweep.data.tabular import class_counts

        super().__init__()
        counts = class_counts(n_per_class, num_classes)
        self.num_classes, self.class_counts = num_classes, counts
        self.n_per_class = counts[0] if len(set(counts)) == 1 else None
        self.lambdas = (lambda_w, lambda_h, lambda_b)
        self.dtype = getattr(torch, dtype)
        n = sum(counts)
        scale = init_std / math.sqrt(feature_dim)
        self.features = nn.Parameter(scale * torch.randn(n, feature_dim, dtype=self.dtype))
        self.register_buffer("labels",
                             torch.arange(num_classes).repeat_interleave(torch.tensor(counts)))
        self.register_buffer("all_rows", torch.arange(n), persistent=False)
        self._optimum: dict[tuple[str, bool], float] = {}
        self.tolerances = (probe_grad_tol, probe_gap_tol, probe_eig_tol)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if index.numel() == self.features.shape[0] and torch.equal(index, self.all_rows):
            return self.features
        return self.features[index]

    def example_input(self, batch_size: int, input_shape: Sequence[int] = ()) -> torch.Tensor:
        n = self.features.shape[0]
        return torch.randint(n, (min(batch_size, n),), device=self.features.device)

    def penalty(self, head: nn.Module) -> torch.Tensor:
        lambda_w, lambda_h, lambda_b = self.lambdas
        value = 0.5 * lambda_h * self.features.pow(2).sum()
        value = value + 0.5 * lambda_w * head.weight.pow(2).sum()
        if head.bias is not None and lambda_b:
            value = value + 0.5 * lambda_b * head.bias.pow(2).sum()
        return value

    def _theory_args(self, head: nn.Module, loss_fn: nn.Module) -> tuple:
        return (head.weight, self.features, head.bias, self.labels, loss_fn.name, *self.lambdas)

    def optimum(self, head: nn.Module, loss_fn: nn.Module) -> float | None:
        """f* from the closed form; None where the head is frozen or the classes are unequal.

        A frozen head's f* is not the UFM's; unequal counts have no closed form here.
        """
        from ncsweep.theory import ufm_optimum

        if not head.weight.requires_grad or self.n_per_class is None:
            return None
        key = (loss_fn.name, head.bias is not None)
        if key not in self._optimum:
            self._optimum[key] = ufm_optimum(self.num_classes, self.features.shape[1],
                                             self.n_per_class, loss_fn.name, *self.lambdas,
                                             bias=key[1]).objective
        return self._optimum[key]

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
        return checks

"""The unconstrained feature model's free features, with its objective's hooks."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ncsweep.errors import ConfigError
from ncsweep.memory import TrainMemory
from ncsweep.models.network import Backbone

STARTS_FILE = "starts.jsonl"


class UFMFeatures(Backbone):
    """The unconstrained feature model's features: one free row h_i per sample, indexed by i.

    With a learned head this is exactly the objective of docs/metrics.md: the training loss
    plus ``penalty`` = (lambda_w/2)||W||^2 + (lambda_h/2)||H||^2 + (lambda_b/2)||b||^2, so the
    optimiser's own weight decay must be 0. Each eval point adds the objective, its gap to
    the closed-form optimum and the gradient norm; the end of a run adds the Hessian probe.
    ``n_per_class`` is one count for all classes or one per class (as ``dataset.n_per_class``);
    the closed form is that of balanced classes, so with unequal counts the objective's
    optimum and gap are left out, never estimated.

    ``starts=R`` (an integer) makes the run hold R random starts solved as one batched problem
    by ncsweep.landscape (:meth:`start_solver`; ncsweep.training.starts steps it); start 0 is
    this module's own initialisation, the one a ``starts=None`` run of the same seed starts
    from.
    """

    kind = "ufm"

    def __init__(self, input_shape: Sequence[int], feature_dim: int, num_classes: int,
                 n_per_class: int | Sequence[int], lambda_w: float = 5e-3, lambda_h: float = 5e-3,
                 lambda_b: float = 0.0, init_std: float = 1.0, dtype: str = "float64",
                 probe_grad_tol: float = 1e-6, probe_gap_tol: float = 1e-6,
                 probe_eig_tol: float = 1e-8, starts: int | None = None) -> None:
        from ncsweep.data.tabular import class_counts

        if starts is not None and (isinstance(starts, bool) or not isinstance(starts, int)
                                   or starts < 1):
            raise ConfigError("arch.starts", starts, "null (one start, trained by the "
                              "optimiser) or an integer >= 1 (batched random starts)")
        super().__init__()
        self.starts = starts
        self.init_std = init_std
        self._solver: Any = None
        self._problem: Any = None
        self._files: dict[str, str] = {}
        counts = class_counts(n_per_class, num_classes)
        self.num_classes, self.class_counts = num_classes, counts
        self.n_per_class = counts[0] if len(set(counts)) == 1 else None
        self.lambdas = (lambda_w, lambda_h, lambda_b)
        self.dtype = getattr(torch, dtype)
        n = sum(counts)
        scale = init_std / math.sqrt(feature_dim)
        self.features = nn.Parameter(scale * torch.randn(n, feature_dim, dtype=self.dtype))
        self.register_buffer("labels",
                             torch.arange(num_classes).repeat_interleave(torch.tensor(counts),
                                                                       output_size=n))
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
        """f* from the closed form; None where the head is frozen, the classes are unequal or
        no closed form covers d (theory.ufm_optimum: d < K-1, or d < K for MSE without bias).
        """
        from ncsweep.theory import ufm_optimum

        if not head.weight.requires_grad or self.n_per_class is None:
            return None
        key = (loss_fn.name, head.bias is not None)
        if key not in self._optimum:
            try:
                star = ufm_optimum(self.num_classes, self.features.shape[1], self.n_per_class,
                                   loss_fn.name, *self.lambdas, bias=key[1]).objective
            except ValueError:
                star = None
            self._optimum[key] = star
        return self._optimum[key]

    def eval_metrics(self, head: nn.Module, loss_fn: nn.Module) -> dict[str, float]:
        """objective, objective_star, objective_gap and grad_norm over the trainable parameters.

        With batched starts these are start 0's (as are the NC metrics of the row), followed
        by the starts' distribution: ``starts``, ``objective_{min,median,max}``,
        ``grad_norm_{min,median,max}``, ``distinct_objective_values``, ``frac_reached_best``
        and, where f* is known, ``objective_gap_{min,median,max}`` and
        ``frac_reached_optimum``.
        """
        row = self._start_metrics(head, loss_fn)
        if self._solver is not None:
            row.update(self._starts_metrics(self.optimum(head, loss_fn)))
        return row

    def _start_metrics(self, head: nn.Module, loss_fn: nn.Module) -> dict[str, float]:
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
        """The landscape probe at the end point, and a loud flag for a spurious minimum.

        With batched starts: start 0's probe as ``hessian_min_eig`` and one probe for every
        start that stopped above tolerance (see :meth:`_starts_checks`).
        """
        if self._solver is not None:
            return self._starts_checks(head, loss_fn, final)
        return self._single_checks(head, loss_fn, final)

    def _single_checks(self, head: nn.Module, loss_fn: nn.Module, final: dict) -> dict:
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

    def run_files(self) -> dict[str, str]:
        """Extra run-folder files by name (``starts.jsonl`` after a batched run), as text."""
        return dict(self._files)

    def _problem_of(self, head: nn.Module, loss_fn: nn.Module):
        from ncsweep.landscape import UFMBatch

        if not head.weight.requires_grad:
            raise ConfigError("arch.starts", self.starts, "null with a frozen head (head=etf); "
                              "batched starts need head=learned")
        return UFMBatch(self.labels, self.num_classes, self.features.shape[1], loss_fn.name,
                        *self.lambdas, bias=head.bias is not None)

    def initial_points(self, head: nn.Module, seed: int) -> torch.Tensor:
        """The R starts as rows (R, P): row 0 this module's (W, H, b), row r >= 1 drawn alone.

        Start r >= 1 draws, in this order, H ~ N(0, init_std^2/d), W and b ~ U(-1/sqrt(d),
        1/sqrt(d)) (nn.Linear's default) from one CPU generator seeded with ``seed``, start
        after start, so a start's initial point does not depend on R.
        """
        n, d = self.features.shape
        k = self.num_classes
        generator = torch.Generator().manual_seed(seed)
        bound, scale = 1.0 / math.sqrt(d), self.init_std / math.sqrt(d)
        rows = [self._problem.join(head.weight.detach()[None], self.features.detach()[None],
                                   None if head.bias is None else head.bias.detach()[None])]
        for _ in range(1, self.starts):
            h = scale * torch.randn(n, d, generator=generator, dtype=self.dtype)
            w = bound * (2 * torch.rand(k, d, generator=generator, dtype=self.dtype) - 1)
            b = bound * (2 * torch.rand(k, generator=generator, dtype=self.dtype) - 1)
            rows.append(self._problem.join(w[None], h[None], b[None]).to(self.features.device))
        return torch.cat(rows)

    def _make_solver(self, optimizer: torch.optim.Optimizer, x: torch.Tensor):
        """The run's optimiser as a batched solver over chunks of the starts."""
        from ncsweep.landscape import BatchedGD, BatchedLBFGS, Chunked, chunk_size

        options = optimizer.defaults
        if isinstance(optimizer, torch.optim.LBFGS):
            def make(part: torch.Tensor):
                return BatchedLBFGS(self._problem, part, lr=options["lr"],
                                    max_iter=options["max_iter"],
                                    history_size=options["history_size"],
                                    tolerance_grad=options["tolerance_grad"],
                                    tolerance_change=options["tolerance_change"])
        elif isinstance(optimizer, torch.optim.SGD):
            def make(part: torch.Tensor):
                return BatchedGD(self._problem, part, lr=options["lr"],
                                 momentum=options["momentum"], dampening=options["dampening"],
                                 nesterov=options["nesterov"])
        else:
            raise ConfigError("optim", type(optimizer).__name__, "lbfgs, lbfgs_exact or sgd "
                              "with arch.starts set (batched L-BFGS or gradient descent)")
        size = chunk_size(self._problem.size)
        return Chunked([make(x[i:i + size]) for i in range(0, x.shape[0], size)])

    def start_solver(self, head: nn.Module, loss_fn: nn.Module,
                     optimizer: torch.optim.Optimizer, seed: int) -> Any:
        """The batched solver of the R starts (from :meth:`initial_points`), held for the
        eval rows and the final checks; the run's optimiser names the method."""
        self._problem = self._problem_of(head, loss_fn)
        self._solver = self._make_solver(optimizer, self.initial_points(head, seed))
        return self._solver

    def sync(self, head: nn.Module) -> None:
        """Start 0's point into this module's features and the head: what evaluate measures."""
        weight, features, bias = self._problem.split(self._solver.solvers[0].x[:1])
        with torch.no_grad():
            head.weight.copy_(weight[0])
            self.features.copy_(features[0])
            if head.bias is not None:
                head.bias.copy_(bias[0])

    def starts_memory(self) -> TrainMemory:
        """The batched step's bytes: points, gradients, solver state, logits and their grads."""
        solvers = self._solver.solvers
        points = sum(s.x.nbytes for s in solvers)
        state = sum(t.nbytes for s in solvers for k, t in s.state_dict().items()
                    if k != "x" and isinstance(t, torch.Tensor))
        logits = 2 * self.starts * self.labels.numel() * self.num_classes * self.dtype.itemsize
        return TrainMemory(points, points, state, logits)

    def _starts_metrics(self, star: float | None) -> dict[str, float]:
        from ncsweep.landscape import distinct_summary, quantiles

        value, grad_norm = self._solver.value, self._solver.grad.norm(dim=1)
        gap_tol = self.tolerances[1]
        row = {"starts": self.starts, **quantiles(value, "objective"),
               **quantiles(grad_norm, "grad_norm"),
               **distinct_summary(value, self._solver.x, getattr(
                   self._solver.solvers[0], "tolerance_grad", self.tolerances[0])),
               "frac_reached_best": (value - value.min() <= gap_tol).double().mean().item()}
        if star is not None:
            row.update(quantiles(value - star, "objective_gap"),
                       frac_reached_optimum=(value - star <= gap_tol).double().mean().item())
        return row

    def _starts_checks(self, head: nn.Module, loss_fn: nn.Module, final: dict) -> dict:
        """Every start classified, each one above tolerance certified by its Hessian probe.

        The reference is f* where the closed form covers the run, else the best value found
        over the starts. A start above it (gap > probe_gap_tol) whose gradient norm is below
        probe_grad_tol is a critical point: a (strict) saddle where the probe finds curvature
        below -probe_eig_tol, else stationary above (a spurious-minimum suspect against f*).
        Any other start above tolerance has not converged, whatever its curvature.
        Start 0 is always probed (``hessian_min_eig``, as a single-start run). The per-start
        record goes to ``starts.jsonl``.
        """
        from ncsweep.landscape import hessian_min_eigs, quantiles

        grad_tol, gap_tol, eig_tol = self.tolerances
        solver, problem = self._solver, self._problem
        value, grad_norm = solver.value, solver.grad.norm(dim=1)
        iterations, evaluations = solver.iterations, solver.evaluations
        star = self.optimum(head, loss_fn)
        reference = star if star is not None else value.min().item()
        gap = value - reference
        reached = gap <= gap_tol
        probed = sorted({0, *(~reached).nonzero().squeeze(1).tolist()})
        min_eig = torch.full_like(value, math.nan)
        index = torch.tensor(probed, device=value.device)
        min_eig[index] = hessian_min_eigs(problem, solver.x[index]).to(min_eig)
        critical = ~reached & (grad_norm < grad_tol)
        saddle = critical & (min_eig < -eig_tol)
        stationary = critical & ~saddle
        outcome = ["reached" if reached[r] else "saddle" if saddle[r] else
                   "stationary_above" if stationary[r] else "not_converged"
                   for r in range(self.starts)]
        reasons = solver.stop_reasons()
        rows = [{"start": r, "objective": value[r].item(), "gap": gap[r].item(),
                 "grad_norm": grad_norm[r].item(), "iterations": int(iterations[r]),
                 "evaluations": int(evaluations[r]), "stop_reason": reasons[r],
                 "outcome": outcome[r],
                 "hessian_min_eig": None if math.isnan(min_eig[r]) else min_eig[r].item()}
                for r in range(self.starts)]
        self._files = {STARTS_FILE: "".join(json.dumps(row) + "\n" for row in rows)}
        closed = star is not None
        checks: dict[str, Any] = {
            "starts": self.starts, "optimum_reference": "closed_form" if closed else "best_found",
            "objective_reference": reference, "n_reached_best": int((value - value.min()
                                                                      <= gap_tol).sum()),
            "n_above_tolerance": int((~reached).sum()), "n_certified_saddles": int(saddle.sum()),
            "n_stationary_above": int(stationary.sum()),
            "n_not_converged": int((~reached & ~saddle & ~stationary).sum()),
            "hessian_min_eig": min_eig[0].item(), "hessian_probed": len(probed),
            **quantiles(iterations.double(), "iterations"), "starts_file": STARTS_FILE}
        if closed:
            checks.update(n_reached_optimum=int(reached.sum()),
                          n_spurious_suspect=int(stationary.sum()),
                          reached_global_optimum=bool(reached.all()),
                          spurious_minimum_suspect=bool(stationary.any()))
        else:
            checks["spurious_minimum_suspect"] = False
        return checks

"""Many random starts of the UFM solved as one batched problem: objective, gradient, solvers.

Each start r has its own point x_r = [W_r, H_r, b_r] (one row of a flat (R, P) tensor, W, H
and b flattened in that order) and its own objective f_r (theory.ufm_objective). Every
operation below acts on each row alone (batched matmuls, per-row reductions, per-row step
sizes), so start r follows the trajectory it would follow alone, whatever R is and whichever
other starts stopped: no line search, step or stopping test is shared.

- :class:`BatchedGD`: full-batch gradient descent with torch.optim.SGD's momentum, dampening
  and Nesterov rules, one iteration per ``step``.
- :class:`BatchedLBFGS`: L-BFGS with torch.optim.LBFGS's first step, history, curvature
  skip (y.s <= 1e-10) and stopping rules, per start: a batched two-loop recursion over each
  start's own last ``history_size`` pairs, and a per-start backtracking (Armijo) line search
  in place of torch's strong-Wolfe search; up to ``max_iter`` iterations per ``step``.
- :func:`hessians`: every start's Hessian in closed form (the per-sample CE curvature
  diag(p) - p p^T, or I for MSE, pushed through z = W h + b); :func:`hessian_min_eigs` solves
  them by eigvalsh up to 2,048 parameters a start, the certificate of a start left above
  tolerance.

Pure tensor code, no I/O: a notebook can call it directly.
"""


from ncsweep.landscape.problem import (
    STOP_REASONS,
    UFMBatch,
    distinct_summary,
    distinct_values,
    hessian_min_eigs,
    hessians,
    quantiles,
    stopping_tolerance,
    value_groups,
)
from ncsweep.landscape.solvers import BatchedGD, BatchedLBFGS, Chunked, chunk_size

__all__ = ["STOP_REASONS", "BatchedGD", "BatchedLBFGS", "Chunked", "UFMBatch", "chunk_size",
           "distinct_summary", "distinct_values", "hessian_min_eigs", "hessians", "quantiles",
           "stopping_tolerance", "value_groups"]

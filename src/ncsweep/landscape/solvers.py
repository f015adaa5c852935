"""Per-start solvers on a batched UFM problem: gradient descent, L-BFGS, chunks of starts."""

from __future__ import annotations

import torch

from ncsweep.landscape.problem import (
    ARMIJO_C1,
    CHUNK_ELEMENTS,
    CURVATURE_MIN,
    MAX_BACKTRACKS,
    STOP_REASONS,
    UFMBatch,
)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (R, P) tensors (a product and a sum: faster than vecdot)."""
    return (a * b).sum(dim=1)


class BatchedGD:
    """Full-batch gradient descent on every start, with torch.optim.SGD's momentum rules."""

    def __init__(self, problem: UFMBatch, x: torch.Tensor, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False) -> None:
        self.problem, self.lr = problem, lr
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.x = x.clone()
        self.value, self.grad = problem.value_and_grad(self.x)
        self.buffer: torch.Tensor | None = None
        self.iterations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.evaluations = self.iterations.clone() + 1

    def step(self) -> None:
        """One update x <- x - lr * (g or its momentum buffer), as SGD takes it."""
        direction = self.grad
        if self.momentum:
            if self.buffer is None:
                self.buffer = direction.clone()
            else:
                self.buffer.mul_(self.momentum).add_(direction, alpha=1 - self.dampening)
            direction = (self.grad + self.momentum * self.buffer if self.nesterov
                         else self.buffer)
        self.x = self.x - self.lr * direction
        self.value, self.grad = self.problem.value_and_grad(self.x)
        self.iterations += 1
        self.evaluations += 1

    def stop_reasons(self) -> list[str]:
        """Why each start stopped: gradient descent runs its epochs out."""
        return ["max_iter"] * self.x.shape[0]

    def state_dict(self) -> dict:
        return {"x": self.x, "buffer": self.buffer, "iterations": self.iterations,
                "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.buffer = state["x"].clone(), state["buffer"]
        self.iterations, self.evaluations = state["iterations"], state["evaluations"]
        self.value, self.grad = self.problem.value_and_grad(self.x)


class BatchedLBFGS:
    """Per-start L-BFGS on R starts at once; ``step`` is one torch.optim.LBFGS.step per start.

    Within a step each start iterates until its own stopping test holds (torch's: gradient
    max-norm <= tolerance_grad, step or change in f <= tolerance_change, no descent, or
    max_iter iterations), and only the starts still running are computed on. The line search
    tries t = lr (the first iteration of a start: min(1, 1/||g||_1) lr, as torch) and halves
    t until f(x + t p) <= f(x) + c1 t g.p, at most MAX_BACKTRACKS times; a start whose search
    fails stays where it was for this step.
    """

    def __init__(self, problem: UFMBatch, x: torch.Tensor, lr: float = 1.0,
                 max_iter: int = 20, history_size: int = 10, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9) -> None:
        if history_size < 1 or max_iter < 1:
            raise ValueError(f"history_size and max_iter must be >= 1; got {history_size}, "
                             f"{max_iter}")
        self.problem, self.lr, self.max_iter = problem, lr, max_iter
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        r, p = x.shape
        self.x = x.clone()
        self.value, self.grad = problem.value_and_grad(self.x)
        self.s = x.new_zeros(history_size, r, p)
        self.y = x.new_zeros(history_size, r, p)
        self.rho = x.new_zeros(history_size, r)
        self.stored = torch.zeros(r, dtype=torch.long, device=x.device)
        self.gamma = x.new_ones(r)
        self.iterations = torch.zeros(r, dtype=torch.long, device=x.device)
        self.evaluations = torch.ones(r, dtype=torch.long, device=x.device)
        self.reason = torch.zeros(r, dtype=torch.long, device=x.device)

    def step(self) -> None:
        """Up to max_iter iterations for every start whose gradient is above tolerance_grad."""
        running = self.grad.abs().amax(dim=1) > self.tolerance_grad
        self.reason = torch.where(running, 0, STOP_REASONS.index("converged"))
        done = torch.zeros_like(self.iterations)
        while True:
            index = running.nonzero().squeeze(1)
            if index.numel() == 0:
                return
            stopped = self._iterate(index, done)
            done[index] += 1
            running[index[stopped]] = False

    def _iterate(self, index: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """One iteration of the starts in ``index``; returns which of them stop this step."""
        everyone = index.numel() == self.x.shape[0]
        take = (lambda t: t) if everyone else (lambda t: t[index])
        x, value, grad = take(self.x), take(self.value), take(self.grad)
        first = take(self.iterations) == 0
        direction = self._direction(index, grad, everyone)
        direction = torch.where(first[:, None], -grad, direction)
        grad_l1 = grad.abs().sum(dim=1)
        t = torch.where(first, torch.clamp(1.0 / grad_l1, max=1.0) * self.lr,
                        torch.full_like(grad_l1, self.lr))
        slope = _dot(grad, direction)
        descent = slope <= -self.tolerance_change
        t = torch.where(descent, t, torch.zeros_like(t))
        new_x, new_value, new_grad, accepted, evals = self._line_search(
            x, value, grad, direction, slope, t, descent)
        step = new_x - x
        change = new_grad - grad
        self._remember(index, step, change, accepted)
        iterations = take(self.iterations) + descent.long()
        codes = [(~descent, "not_descent"), (descent & ~accepted, "line_search_failed"),
                 (accepted & (take(done) + 1 >= self.max_iter), "max_iter"),
                 (accepted & ((value - new_value).abs() < self.tolerance_change),
                  "small_change"),
                 (accepted & (step.abs().amax(dim=1) <= self.tolerance_change), "small_step"),
                 (accepted & (new_grad.abs().amax(dim=1) <= self.tolerance_grad), "converged")]
        reason = torch.zeros_like(iterations)
        for mask, name in codes:
            reason = torch.where(mask, STOP_REASONS.index(name), reason)
        stopped = reason > 0
        if everyone:
            self.x, self.value, self.grad = new_x, new_value, new_grad
            self.iterations, self.reason = iterations, reason
            self.evaluations += evals
        else:
            self.x[index], self.value[index], self.grad[index] = new_x, new_value, new_grad
            self.iterations[index], self.reason[index] = iterations, reason
            self.evaluations[index] += evals
        return stopped

    def _direction(self, index: torch.Tensor, grad: torch.Tensor,
                   everyone: bool) -> torch.Tensor:
        """-H g by the two-loop recursion over each start's own stored pairs."""
        m, r, p = self.s.shape
        stored = self.stored if everyone else self.stored[index]
        lockstep = bool((stored == stored[0]).all())
        rows = torch.arange(r, device=grad.device) if everyone else index
        flat_s, flat_y, flat_rho = self.s.view(m * r, p), self.y.view(m * r, p), self.rho.view(-1)

        def pair(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if lockstep and everyone:
                k = int(stored[0] - 1 - j) % m
                return self.s[k], self.y[k], self.rho[k]
            at = torch.remainder(stored - 1 - j, m) * r + rows
            return flat_s.index_select(0, at), flat_y.index_select(0, at), flat_rho[at]

        depth = min(m, int(stored.max()))
        q = -grad
        alphas = []
        for j in range(depth):
            s, y, rho = pair(j)
            rho = torch.where(j < stored, rho, torch.zeros_like(rho))
            alpha = rho * _dot(s, q)
            q.addcmul_(y, alpha[:, None], value=-1)
            alphas.append((alpha, rho))
        gamma = self.gamma if everyone else self.gamma[index]
        q.mul_(gamma[:, None])
        for j in reversed(range(depth)):
            s, y, _ = pair(j)
            alpha, rho = alphas[j]
            q.addcmul_(s, (alpha - rho * _dot(y, q))[:, None])
        return q

    def _remember(self, index: torch.Tensor, step: torch.Tensor, change: torch.Tensor,
                  accepted: torch.Tensor) -> None:
        """Store (s, y) where y.s > CURVATURE_MIN, dropping the start's oldest pair when full."""
        ys = _dot(change, step)
        keep = accepted & (ys > CURVATURE_MIN)
        if not bool(keep.any()):
            return
        rows = index[keep]
        slot = torch.remainder(self.stored[rows], self.s.shape[0])
        self.s[slot, rows] = step[keep]
        self.y[slot, rows] = change[keep]
        self.rho[slot, rows] = 1.0 / ys[keep]
        self.gamma[rows] = ys[keep] / _dot(change[keep], change[keep])
        self.stored[rows] += 1

    def _line_search(self, x: torch.Tensor, value: torch.Tensor, grad: torch.Tensor,
                     direction: torch.Tensor, slope: torch.Tensor, t: torch.Tensor,
                     descent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-start backtracking to the Armijo condition; each trial evaluates only its start."""
        evals = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if bool(descent.all()):
            point = torch.addcmul(x, direction, t[:, None])
            f, g = self.problem.value_and_grad(point)
            evals += 1
            ok = torch.isfinite(f) & (f <= value + ARMIJO_C1 * t * slope)
            if bool(ok.all()):
                return point, f, g, ok, evals
            new_x, new_value, new_grad = x.clone(), value.clone(), grad.clone()
            new_x[ok], new_value[ok], new_grad[ok] = point[ok], f[ok], g[ok]
            accepted, pending = ok, ~ok
            t = torch.where(ok, t, 0.5 * t)
            tries = MAX_BACKTRACKS
        else:
            new_x, new_value, new_grad = x.clone(), value.clone(), grad.clone()
            accepted, pending = torch.zeros_like(descent), descent.clone()
            tries = MAX_BACKTRACKS + 1
        for _ in range(tries):
            trial = pending.nonzero().squeeze(1)
            if trial.numel() == 0:
                break
            point = torch.addcmul(x[trial], direction[trial], t[trial, None])
            f, g = self.problem.value_and_grad(point)
            evals[trial] += 1
            ok = torch.isfinite(f) & (f <= value[trial] + ARMIJO_C1 * t[trial] * slope[trial])
            good = trial[ok]
            new_x[good], new_value[good], new_grad[good] = point[ok], f[ok], g[ok]
            accepted[good] = True
            pending[good] = False
            t[trial[~ok]] *= 0.5
        return new_x, new_value, new_grad, accepted, evals

    def stop_reasons(self) -> list[str]:
        """Why each start's last step ended (``converged``: gradient max-norm at tolerance)."""
        return [STOP_REASONS[i] for i in self.reason.tolist()]

    def state_dict(self) -> dict:
        return {"x": self.x, "s": self.s, "y": self.y, "rho": self.rho, "stored": self.stored,
                "gamma": self.gamma, "iterations": self.iterations,
                "evaluations": self.evaluations, "reason": self.reason}

    def load_state_dict(self, state: dict) -> None:
        for key in ("s", "y", "rho", "stored", "gamma", "iterations", "evaluations", "reason"):
            setattr(self, key, state[key].clone())
        self.x = state["x"].clone()
        self.value, self.grad = self.problem.value_and_grad(self.x)


class Chunked:
    """Independent solvers over consecutive chunks of the starts, stepped one after another.

    Chunking changes nothing for a start (the starts never interact); it keeps each (chunk, P)
    tensor near ``CHUNK_ELEMENTS`` entries, so temporaries are reused rather than page-faulted
    in afresh and the history stays in a bounded working set.
    """

    def __init__(self, solvers: list) -> None:
        self.solvers = solvers

    def step(self) -> None:
        for solver in self.solvers:
            solver.step()

    def set_lr(self, lr: float) -> None:
        """The step size (L-BFGS: the first trial step) every chunk's next step uses."""
        for solver in self.solvers:
            solver.lr = lr

    def _cat(self, name: str) -> torch.Tensor:
        return torch.cat([getattr(s, name) for s in self.solvers])

    @property
    def x(self) -> torch.Tensor:
        return self._cat("x")

    @property
    def value(self) -> torch.Tensor:
        return self._cat("value")

    @property
    def grad(self) -> torch.Tensor:
        return self._cat("grad")

    @property
    def iterations(self) -> torch.Tensor:
        return self._cat("iterations")

    @property
    def evaluations(self) -> torch.Tensor:
        return self._cat("evaluations")

    def stop_reasons(self) -> list[str]:
        return [reason for s in self.solvers for reason in s.stop_reasons()]

    def state_dict(self) -> dict:
        return {"chunks": [s.state_dict() for s in self.solvers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["chunks"]) != len(self.solvers):
            raise ValueError(f"a state of {len(state['chunks'])} chunks for "
                             f"{len(self.solvers)} solvers")
        for solver, part in zip(self.solvers, state["chunks"], strict=True):
            solver.load_state_dict(part)


def chunk_size(size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Starts per chunk so that one (chunk, P) tensor holds about ``elements`` entries."""
    return max(1, elements // max(size, 1))



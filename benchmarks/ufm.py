"""UFM speed: time to the closed-form optimum (LBFGS vs gradient descent), and step overhead.

All runs are built by ``build_run`` from conf/ composed with ``experiment=ufm`` (d = K,
float64, learned head with bias, lambda_W = lambda_H = 5e-3, lambda_b = 0 unless stated), so
the model is ``Network(UFMFeatures, LearnedHead)`` and f* is ``UFMFeatures.optimum``
(``theory.ufm_optimum``).

1. Time to objective_gap = f - f* < 1e-8 at K = 10, n = 100 per class, CE and MSE, with
   - LBFGS as conf/experiment/ufm.yaml configures it (full batch, strong Wolfe, lr 1,
     max_iter 50 per step), and
   - full-batch gradient descent, ``torch.optim.SGD`` with momentum 0 and a fixed lr per
     loss (GD_LR below: MSE 1, as the MSE bias block has curvature exactly 1, so lr < 2 is
     needed and lr 2 already stalled at K=10; CE 10, from a scan of 1, 3, 10, 15, 20, 30 at
     K=10 in which 20 was the fastest to converge and 30 did not, so 10 keeps a margin).
   Each step is ``optimizer_step`` (the step ``Trainer.fit`` takes for each batch: a closure
   returning loss + model.penalty()) on the run's model, loss and optimiser, fed the full
   batch as ``Trainer.fit`` feeds it (one shuffled batch from ``data.batches``). On the full
   batch the closure's value is f itself, so every evaluation is checked at no extra cost
   (the optimiser's ``step`` is wrapped to read it): the time reported is from the first
   step to the first evaluation with f - f* < 1e-8, and where it happened (GD: the iterate,
   i.e. the number of updates before it; LBFGS: the function evaluation and the LBFGS
   iteration, counted over steps of max_iter 50). At K = 10, LBFGS is also run through
   ``Trainer.fit`` itself (eval_every=1, stopped through ``stop_requested`` once ``on_eval``
   sees the gap below 1e-8): the wall time of a real run, its eval points included.
2. The same at K = 100, n = 50 (d = K). With the default lambdas K sqrt(n lambda_W lambda_H)
   > 1, so f* is the zero solution; LBFGS is also run at lambda_W = lambda_H = 5e-4 (an
   ETF optimum). GD is run at the default lambdas only, with a time cap (GD_CAP_S[K]).
3. Step overhead: ``optimizer_step`` on the built model (SGD, full batch as fit feeds it)
   against a bare step on plain leaf tensors W, H, b with the same objective written inline
   (logits H W^T + b, one-hot MSE target made once) and the same SGD, K=10, n=100 and
   K=100, n=50, CE and MSE. The two sides take turns step by step; the figure is the median
   over blocks of steps of each side's mean time per step. Target: ncsweep / bare <= 1.10 in
   wall time (process CPU time ratios are printed beside, as a check against load).

Torch runs on ``--threads`` threads (default 1: on a shared 2-core machine, two threads
mostly measure contention). Always exits 0.

Run: .venv/bin/python benchmarks/ufm.py [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ncsweep.app import conf_dir
from ncsweep.build import Run, build_run
from ncsweep.config import validate
from ncsweep.data import batches
from ncsweep.theory import ufm_objective, ufm_optimum
from ncsweep.training import StopRequested, optimizer_step

TARGET = 1.10
GAP_TOL = 1e-8
GD_LR = {"ce": 10.0, "mse": 1.0}
GD_CAP_S = {10: 60.0, 100: 20.0}
LBFGS_CAP_S = 60.0
LBFGS_MAX_STEPS = 30
LOSSES = ("ce", "mse")


@dataclass
class Reach:
    """Where an optimiser first evaluated f - f* < GAP_TOL, or how far it got by the cap."""

    reached: bool
    seconds: float
    steps: int
    evaluation: int
    gap: float
    lbfgs_iteration: int | None = None
    end_gap: float = math.nan


class ObjectiveTrace:
    """Sees every closure evaluation of an optimiser: f at the evaluated point, and the time.

    The Trainer's closure returns loss + model.penalty() on the full batch, which is f itself,
    so no extra evaluation is needed. Evaluation j of SGD is at iterate j-1 (before the update);
    LBFGS evaluates its start point and then each line-search trial point.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, star: float) -> None:
        self.optimizer, self.star = optimizer, star
        self.evaluations, self.last_gap = 0, math.inf
        self.hit: Reach | None = None
        self.start = time.perf_counter()
        step = optimizer.step

        def traced_step(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
            return step(lambda: self._seen(closure()))

        optimizer.step = traced_step  # type: ignore[method-assign]

    def _seen(self, loss: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        self.last_gap = loss.item() - self.star
        if self.hit is None and self.last_gap < GAP_TOL:
            self.hit = Reach(True, time.perf_counter() - self.start, 0, self.evaluations,
                             self.last_gap, lbfgs_iteration(self.optimizer))
        return loss

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def compose_ufm(k: int, n: int, loss: str, lam: float | None = None,
                extra: tuple[str, ...] = ()) -> tuple[object, dict]:
    """conf/ with experiment=ufm at K classes of n samples, loss, optional lambda_W = lambda_H."""
    overrides = ["experiment=ufm", "logger=none", "trainer.progress=false",
                 f"dataset.num_classes={k}", f"dataset.n_per_class={n}", f"loss={loss}",
                 *extra]
    if lam is not None:
        overrides += [f"arch.lambda_w={lam}", f"arch.lambda_h={lam}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return cfg, validate(cfg)


def full_batch(run: Run, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch of a full-batch epoch, shuffled as Trainer.fit shuffles it."""
    return next(batches(run.data.train, None, torch.Generator().manual_seed(seed)))


def objective(run: Run) -> float:
    """f(W, H, b) of the run's model, in float64, without autograd."""
    backbone, head = run.model.backbone, run.model.head
    with torch.no_grad():
        return ufm_objective(head.weight, backbone.features, head.bias, backbone.labels,
                             run.loss.name, *backbone.lambdas).item()


def optimum(run: Run) -> tuple[float, str]:
    """f* and the regime (etf, orthogonal_frame, zero) of the run's UFM."""
    backbone, head = run.model.backbone, run.model.head
    k, d = head.weight.shape
    star = ufm_optimum(k, d, backbone.n_per_class, run.loss.name, *backbone.lambdas,
                       bias=head.bias is not None)
    return star.objective, star.regime


def lbfgs_iteration(optimizer: torch.optim.Optimizer) -> int | None:
    """LBFGS iterations begun so far (None for other optimisers)."""
    if not isinstance(optimizer, torch.optim.LBFGS):
        return None
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    return state.get("n_iter", 0)


def run_to_gap(run: Run, optimizer: torch.optim.Optimizer, star: float, cap_s: float,
               max_steps: int) -> Reach:
    """Trainer steps until an evaluation sees f - f* < GAP_TOL, cap_s passes, or max_steps."""
    x, y = full_batch(run, 0)
    run.model.train()
    trace = ObjectiveTrace(optimizer, star)
    steps = 0
    while trace.hit is None and trace.elapsed() < cap_s and steps < max_steps:
        optimizer_step(run.model, run.loss, optimizer, x, y)
        steps += 1
        if not math.isfinite(trace.last_gap):
            break
    end_gap = objective(run) - star
    if trace.hit is not None:
        trace.hit.steps, trace.hit.end_gap = steps, end_gap
        return trace.hit
    return Reach(False, trace.elapsed(), steps, trace.evaluations, end_gap,
                 lbfgs_iteration(optimizer), end_gap)


def lbfgs_reach(k: int, n: int, loss: str, lam: float | None) -> tuple[Reach, str]:
    """LBFGS as configured by experiment=ufm; also a line naming the lambdas, f* and regime."""
    _, plain = compose_ufm(k, n, loss, lam)
    run = build_run(plain)
    star, regime = optimum(run)
    lambda_w, lambda_h, lambda_b = run.model.backbone.lambdas
    about = (f"lambda_W={lambda_w:g} lambda_H={lambda_h:g} lambda_b={lambda_b:g}: "
             f"f*={star:.10g} ({regime})")
    return run_to_gap(run, run.optimizer, star, LBFGS_CAP_S, LBFGS_MAX_STEPS), about


def gd_reach(k: int, n: int, loss: str, lam: float | None) -> Reach:
    _, plain = compose_ufm(k, n, loss, lam)
    run = build_run(plain)
    star, _ = optimum(run)
    optimizer = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad],
                                lr=GD_LR[loss], momentum=0.0)
    return run_to_gap(run, optimizer, star, GD_CAP_S[k], 10**9)


def fit_reach(k: int, n: int, loss: str, lam: float | None) -> tuple[int | None, float]:
    """LBFGS through Trainer.fit (eval_every=1): the epoch whose eval saw gap < GAP_TOL."""
    _, plain = compose_ufm(k, n, loss, lam, (f"trainer.epochs={LBFGS_MAX_STEPS}",
                                               "trainer.eval_every=1"))
    run = build_run(plain)
    hit: dict[str, float] = {}
    start = time.perf_counter()

    def on_eval(row: dict) -> None:
        if "epoch" not in hit and row["objective_gap"] < GAP_TOL:
            hit.update(epoch=row["epoch"], seconds=time.perf_counter() - start)

    with contextlib.suppress(StopRequested):
        run.trainer.fit(run.model, run.loss, run.optimizer, run.scheduler, run.data,
                        plain["seed"], on_eval=on_eval, stop_requested=lambda: "epoch" in hit)
    if "epoch" not in hit:
        return None, time.perf_counter() - start
    return int(hit["epoch"]), hit["seconds"]


def describe(reach: Reach) -> str:
    """One line: time and place of the first evaluation below GAP_TOL, or the gap at the cap."""
    if not reach.reached:
        return (f"{reach.seconds:8.3f} s  NOT reached: gap {reach.gap:.3g} after {reach.steps} "
                f"steps ({reach.evaluation} evaluations)")
    end = f"; {reach.end_gap:.2g} after that step by ufm_objective"
    if reach.lbfgs_iteration is None:
        return (f"{reach.seconds:8.3f} s  gap {reach.gap:.2g} at iterate {reach.evaluation - 1} "
                f"(after {reach.evaluation - 1} GD updates){end}")
    return (f"{reach.seconds:8.3f} s  gap {reach.gap:.2g} at function evaluation "
            f"{reach.evaluation}, LBFGS iteration {reach.lbfgs_iteration} (in step "
            f"{reach.steps}, max_iter 50 per step){end}")


def time_to_optimum(k: int, n: int, lambdas: tuple[float | None, ...], gd: bool,
                    via_fit: bool) -> None:
    """LBFGS at each lambda (None: the config's), GD at the config's lambdas when ``gd``."""
    for lam in lambdas:
        for loss in LOSSES:
            reach, about = lbfgs_reach(k, n, loss, lam)
            print(f"K={k} n={n} d={k} {loss} {about}", flush=True)
            print(f"    LBFGS    {describe(reach)}", flush=True)
            if via_fit:
                epoch, seconds = fit_reach(k, n, loss, lam)
                fit_text = (f"gap < 1e-8 at the epoch-{epoch} eval" if epoch is not None
                            else f"NOT reached in {LBFGS_MAX_STEPS} epochs")
                print(f"    LBFGS via Trainer.fit(eval_every=1): {seconds:.3f} s with its eval "
                      f"points, {fit_text}", flush=True)
            if gd and lam is None:
                print(f"    GD lr={GD_LR[loss]:<3g}{describe(gd_reach(k, n, loss, lam))}"
                      f"  [cap {GD_CAP_S[k]:g} s]", flush=True)


def bare_step_fn(run: Run, lr: float) -> Callable[[], None]:
    """The same objective on plain leaf tensors, written inline, and an SGD step."""
    backbone, head = run.model.backbone, run.model.head
    weight = head.weight.detach().clone().requires_grad_(True)
    features = backbone.features.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)
    labels = backbone.labels.clone()
    lambda_w, lambda_h, lambda_b = backbone.lambdas
    target = F.one_hot(labels, weight.shape[0]).to(weight.dtype)
    optimizer = torch.optim.SGD([weight, features, bias], lr=lr, momentum=0.0)
    mse = run.loss.name == "mse"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = features @ weight.T + bias
        if mse:
            loss = 0.5 * (logits - target).pow(2).sum(dim=1).mean()
        else:
            loss = F.cross_entropy(logits, labels)
        loss = (loss + 0.5 * lambda_w * weight.pow(2).sum()
                + 0.5 * lambda_h * features.pow(2).sum() + 0.5 * lambda_b * bias.pow(2).sum())
        loss.backward()
        optimizer.step()

    return step


def ncsweep_step_fn(run: Run, lr: float) -> Callable[[], None]:
    """optimizer_step on the built model, fed the full batch as Trainer.fit feeds it."""
    x, y = full_batch(run, 0)
    optimizer = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad], lr=lr,
                                momentum=0.0)
    run.model.train()
    return lambda: optimizer_step(run.model, run.loss, optimizer, x, y)


def per_step_medians(fns: dict[str, Callable[[], None]], steps: int,
                     repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per step of each function over ``repeats`` blocks.

    Within a block the functions take turns step by step (the order rotating each step), so
    load that comes and goes hits them alike; a block's figure is its mean per step.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(repeats):
        sums = {name: [0.0, 0.0] for name in names}
        for i in range(steps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                wall, cpu = time.perf_counter(), time.process_time()
                fns[name]()
                sums[name][0] += time.perf_counter() - wall
                sums[name][1] += time.process_time() - cpu
        for name in names:
            blocks[name].append((sums[name][0] / steps, sums[name][1] / steps))
    return {name: (statistics.median(t[0] for t in values),
                   statistics.median(t[1] for t in values)) for name, values in blocks.items()}


def step_overhead(sizes: tuple[tuple[int, int, int, int], ...]) -> list[float]:
    """Print per-step times of both sides; returns the wall-time ratios."""
    ratios = []
    for k, n, steps, repeats in sizes:
        for loss in LOSSES:
            _, plain = compose_ufm(k, n, loss)
            run = build_run(plain)
            lr = GD_LR[loss]
            fns = {"bare": bare_step_fn(run, lr), "ncsweep": ncsweep_step_fn(run, lr)}
            med = per_step_medians(fns, steps, repeats)
            ratio = med["ncsweep"][0] / med["bare"][0]
            ratios.append(ratio)
            print(f"K={k:>3} n={n:>3} {loss:>3}: ncsweep {1e3 * med['ncsweep'][0]:7.3f} ms/step"
                  f"  bare {1e3 * med['bare'][0]:7.3f} ms/step  ratio {ratio:.3f} x  "
                  f"(CPU {med['ncsweep'][1] / med['bare'][1]:.3f} x; median of {repeats} blocks "
                  f"of {steps} steps, the sides taking turns step by step)", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="K=10 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64, CPU")
    print("1. time to the first evaluation with objective_gap < 1e-8, K=10 n=100 d=K")
    time_to_optimum(10, 100, (None,), gd=True, via_fit=True)
    sizes = ((10, 100, 100, 15),)
    if not args.quick:
        print("2. the same at K=100 n=50 d=K")
        time_to_optimum(100, 50, (None, 5e-4), gd=True, via_fit=False)
        sizes += ((100, 50, 8, 15),)
    print("3. step overhead: optimizer_step (SGD, full batch as fit feeds it) / bare PyTorch step")
    ratios = step_overhead(sizes)
    worst = max(ratios)
    verdict = "PASS" if worst <= TARGET else "FAIL"
    print(f"{verdict}: worst step ratio ncsweep / bare = {worst:.3f} x (target <= {TARGET:.2f} x)"
          f"; benchmark took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

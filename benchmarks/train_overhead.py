"""Overhead of ncsweep's training loop over a bare PyTorch loop, on the default config.

Both sides train the same model (``Network(MLP, LearnedHead)`` built after the same seed) on
the same data with the same optimiser and schedule (Adam, cosine), batch size and shuffling
(``torch.randperm`` on a generator seeded with the run's seed):

- ncsweep: ``Trainer.fit`` on a run from ``build_run`` with its metrics on their normal
  schedule (an eval point with the NC metrics every ``eval_every`` epochs, and at epoch 0),
  each row appended to a real ``RunFolder``'s metrics.jsonl in a temp dir and a checkpoint
  saved through ``RunFolder.save_checkpoint`` at every eval point, wired as
  ``ncsweep.jobs.execute`` wires them (logger=none);
- bare: a hand-written loop with no eval and no I/O.

The config is conf/ composed with Hydra's compose API (digits, mlp, adam, cosine, batch 256,
100 epochs, eval every 25). ``--epochs`` shortens the run and scales ``eval_every`` with it.

The machine may be shared, so the two sides are interleaved epoch by epoch in one process:
the Trainer's ``stop_requested`` callback (polled before every batch, it never stops the run)
runs one epoch of the bare loop before each of the Trainer's epochs, and the bare epochs' time
is taken out of the Trainer's. Background load thus hits both sides alike. Each side's wall
time is the median over ``--repeats`` such runs; model building and data loading are not
timed. The process CPU time ratio is printed beside, as a check against load, and the final
weights of both sides are compared (0: the same trajectory, so the same work).
Torch runs on ``--threads`` threads (default 1: on a shared 2-core machine two threads mostly
measure contention). Target: ncsweep / bare <= 1.10. On a FAIL a cProfile of one ncsweep run
shows where the time goes (``--profile`` forces it). Always exits 0.

Run: .venv/bin/python benchmarks/train_overhead.py [--epochs 100] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn

from ncsweep.app import conf_dir
from ncsweep.build import Run, build_run
from ncsweep.config import validate
from ncsweep.data import DataBundle
from ncsweep.heads import LearnedHead
from ncsweep.models import MLP, Network
from ncsweep.tracking import RunFolder
from ncsweep.training import evaluate, resolve_device

TARGET = 1.10
RUN_KEY = "train_overhead"
BASE_OVERRIDES = ["logger=none", "trainer.progress=false"]


def compose_plain(overrides: list[str]) -> tuple[object, dict]:
    """conf/ composed as the app composes it, and its validated plain form."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=BASE_OVERRIDES + overrides)
    return cfg, validate(cfg)


def default_config(epochs: int | None) -> tuple[object, dict]:
    """The default config; with ``epochs``, eval_every keeps its default ratio to epochs."""
    cfg, plain = compose_plain([])
    if epochs is None or epochs == plain["trainer"]["epochs"]:
        return cfg, plain
    default = plain["trainer"]
    eval_every = max(1, round(epochs * default["eval_every"] / default["epochs"]))
    return compose_plain([f"trainer.epochs={epochs}", f"trainer.eval_every={eval_every}"])


def check_default_pieces(plain: dict) -> None:
    """The bare loop hard-codes Adam, cosine, MLP, a learned head and CE: refuse anything else."""
    expected = {"optim": "torch.optim.Adam", "schedule": "ncsweep.training.cosine_schedule",
                "arch": "ncsweep.models.MLP", "head": "ncsweep.heads.LearnedHead",
                "loss": "ncsweep.losses.CrossEntropy"}
    for group, target in expected.items():
        if plain[group]["_target_"] != target:
            raise SystemExit(f"{group} is {plain[group]['_target_']}, the bare loop needs {target}")


class Callbacks:
    """on_eval / on_checkpoint as jobs.execute wires them, timing the time spent inside them."""

    def __init__(self, folder: RunFolder, run: Run) -> None:
        self.folder, self.run = folder, run
        self.eval_rows, self.checkpoints = 0, 0
        self.append_s, self.checkpoint_s = 0.0, 0.0

    def on_eval(self, row: dict) -> None:
        start = time.perf_counter()
        self.folder.append_metrics(row)
        self.run.logger.log(row, step=int(row["epoch"]))
        self.append_s += time.perf_counter() - start
        self.eval_rows += 1

    def on_checkpoint(self, state: dict) -> None:
        start = time.perf_counter()
        self.folder.save_checkpoint(state, RUN_KEY)
        self.checkpoint_s += time.perf_counter() - start
        self.checkpoints += 1


class BareLoop:
    """The hand-written loop, one epoch per call: same model, Adam, cosine schedule, batches and
    shuffling as the Trainer; no eval, no I/O. Keeps its own wall and CPU seconds."""

    def __init__(self, plain: dict, data: DataBundle) -> None:
        self.model = bare_model(plain, data)
        epochs, optim = plain["trainer"]["epochs"], plain["optim"]
        self.batch_size = plain["trainer"]["batch_size"]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=optim["lr"],
                                          weight_decay=optim["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=epochs, eta_min=plain["schedule"]["eta_min"])
        self.inputs, self.labels = data.train.inputs, data.train.labels
        self.generator = torch.Generator().manual_seed(plain["seed"])
        self.model.train()
        self.wall, self.cpu = 0.0, 0.0

    def epoch(self) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        model, optimizer, n = self.model, self.optimizer, self.labels.numel()
        order = torch.randperm(n, generator=self.generator)
        for first in range(0, n, self.batch_size):
            index = order[first:first + self.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(self.inputs[index]), self.labels[index])
            loss.backward()
            optimizer.step()
        self.scheduler.step()
        self.wall += time.perf_counter() - start
        self.cpu += time.process_time() - cpu


def bare_model(plain: dict, data: DataBundle) -> Network:
    """The same classes as build_run, built right after the same seed."""
    torch.manual_seed(plain["seed"])
    arch = {k: v for k, v in plain["arch"].items() if k != "_target_"}
    head = {k: v for k, v in plain["head"].items() if k != "_target_"}
    dim = plain["feature_dim"]
    backbone = MLP(tuple(plain["dataset"]["input_shape"]), dim, **arch)
    return Network(backbone, LearnedHead(data.num_classes, dim, **head))


def epoch_hook(plain: dict, data: DataBundle, bare: BareLoop | None) -> Callable[[], bool]:
    """A stop_requested callback (polled before every batch) that never stops the run, and
    runs one bare epoch before the first batch of each of the Trainer's epochs."""
    batch_size = plain["trainer"]["batch_size"]
    per_epoch = -(-len(data.train) // batch_size)
    calls = 0

    def hook() -> bool:
        nonlocal calls
        if bare is not None and calls % per_epoch == 0:
            bare.epoch()
        calls += 1
        return False

    return hook


def interleaved_pair(cfg: object, plain: dict, folder: RunFolder, data: DataBundle,
                     with_bare: bool = True,
                     wrap: Callable[[Callable[[], object]], object] = lambda fn: fn()
                     ) -> dict:
    """One ncsweep run (Trainer.fit wired to a RunFolder as jobs.execute wires it) with the
    bare loop's epochs run between its epochs; each side's (wall, CPU) seconds."""
    run = build_run(plain)
    bare = BareLoop(plain, data) if with_bare else None
    folder.reset()
    folder.write_config(plain)
    run.logger.start(folder.path, RUN_KEY, RUN_KEY, "bench", plain, quiet=True)
    callbacks = Callbacks(folder, run)
    hook = epoch_hook(plain, data, bare)

    def fit() -> None:
        run.trainer.fit(run.model, run.loss, run.optimizer, run.scheduler, run.data,
                        plain["seed"], on_eval=callbacks.on_eval,
                        on_checkpoint=callbacks.on_checkpoint, stop_requested=hook)

    start, cpu = time.perf_counter(), time.process_time()
    wrap(fit)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    run.logger.finish()
    bare_times = (bare.wall, bare.cpu) if bare is not None else (0.0, 0.0)
    return {"ncsweep": (wall - bare_times[0], cpu - bare_times[1]), "bare": bare_times,
            "run": run, "callbacks": callbacks, "bare_model": bare.model if bare else None}


def max_weight_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between two models' state dicts (0.0: same trajectory)."""
    diffs = [(x.double() - y.double()).abs().max().item()
             for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)]
    return max(diffs)


def eval_point_seconds(run: Run, plain: dict, repeats: int = 5) -> float:
    """Median time of one eval point's work (evaluate on the trained model)."""
    trainer = run.trainer
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(run.model, run.loss, run.data, trainer.eval_batch_size, trainer.max_feature_bytes)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_data(cfg: object, plain: dict) -> DataBundle:
    """The data set as build_run loads it, for the bare loop (in-memory rows only)."""
    data = instantiate(cfg.dataset).to(resolve_device(plain["trainer"]["device"]))
    if any(getattr(data.train, name, None) is not None for name in ("view", "source")):
        raise SystemExit("the bare loop feeds stored rows as they are: use a data set without "
                         "an image view or a file source (the default, digits, has neither)")
    return data


def measure(cfg: object, plain: dict, root: Path, repeats: int) -> dict:
    """Repeated interleaved pairs: each side's (wall, CPU) times, and the last pair."""
    data = load_data(cfg, plain)
    times: dict[str, list[tuple[float, float]]] = {"ncsweep": [], "bare": []}
    pair: dict = {}
    for i in range(repeats):
        pair = interleaved_pair(cfg, plain, RunFolder(root / f"run{i}"), data)
        for side in ("ncsweep", "bare"):
            times[side].append(pair[side])
        print(f"  repeat {i + 1}/{repeats}: ncsweep {pair['ncsweep'][0]:7.3f} s wall "
              f"({pair['ncsweep'][1]:.3f} s CPU), bare {pair['bare'][0]:7.3f} s wall "
              f"({pair['bare'][1]:.3f} s CPU)", flush=True)
    return {"times": times, **pair}


def report_breakdown(result: dict, plain: dict, bare_s: float) -> None:
    """Where ncsweep's extra time goes: eval points, checkpoints, metrics rows."""
    run, callbacks = result["run"], result["callbacks"]
    per_eval = eval_point_seconds(run, plain)
    evals = callbacks.eval_rows
    print("breakdown of the last ncsweep run (as a share of the bare median):")
    print(f"  eval points: {evals} x {1e3 * per_eval:.1f} ms (evaluate, re-timed) = "
          f"{evals * per_eval:.3f} s ({100 * evals * per_eval / bare_s:.1f}%)")
    print(f"  checkpoints: {callbacks.checkpoints} saves, {callbacks.checkpoint_s:.3f} s "
          f"({100 * callbacks.checkpoint_s / bare_s:.1f}%)")
    print(f"  metrics rows: {evals} appends, {callbacks.append_s:.4f} s "
          f"({100 * callbacks.append_s / bare_s:.2f}%)")


def profile_once(cfg: object, plain: dict, root: Path, lines: int = 25) -> None:
    """cProfile one ncsweep run and print the functions with the most cumulative time."""
    profiler = cProfile.Profile()

    def wrap(fn: Callable[[], object]) -> None:
        profiler.runcall(fn)

    pair = interleaved_pair(cfg, plain, RunFolder(root / "profiled"), load_data(cfg, plain),
                            with_bare=False, wrap=wrap)
    elapsed = pair["ncsweep"][0]
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    print(f"cProfile of one ncsweep run ({elapsed:.3f} s with the profiler on):")
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile even on a PASS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, plain = default_config(args.epochs)
    check_default_pieces(plain)
    trainer = plain["trainer"]
    print(f"default config: dataset={plain['dataset']['name']} arch=mlp "
          f"(width {plain['arch']['width']}, depth {plain['arch']['depth']}, "
          f"d={plain['feature_dim']}) optim=adam(lr={plain['optim']['lr']}) schedule=cosine "
          f"batch={trainer['batch_size']} epochs={trainer['epochs']} "
          f"eval_every={trainer['eval_every']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), device {resolve_device(trainer['device'])}")
    with tempfile.TemporaryDirectory(prefix="ncsweep-bench-") as tmp:
        root = Path(tmp)
        warm_cfg, warm_plain = compose_plain(["trainer.epochs=2", "trainer.eval_every=1"])
        interleaved_pair(warm_cfg, warm_plain, RunFolder(root / "warmup"),
                         load_data(warm_cfg, warm_plain))
        result = measure(cfg, plain, root, args.repeats)
        medians = {side: statistics.median(t[0] for t in v) for side, v in result["times"].items()}
        cpu = {side: statistics.median(t[1] for t in v) for side, v in result["times"].items()}
        ratio = medians["ncsweep"] / medians["bare"]
        diff = max_weight_difference(result["run"].model, result["bare_model"])
        print(f"same trajectory check: max |weight difference| after training = {diff:.3g}")
        print(f"ncsweep Trainer.fit (eval + metrics.jsonl + checkpoints): "
              f"{medians['ncsweep']:.3f} s  (median of {args.repeats})")
        print(f"bare PyTorch loop (no eval, no I/O):                      "
              f"{medians['bare']:.3f} s  (median of {args.repeats})")
        per_repeat = statistics.median(
            nc[0] / bare[0] for nc, bare in zip(*result["times"].values(), strict=True))
        print(f"ratio ncsweep / bare: {ratio:.3f} x wall (median of the per-repeat ratios "
              f"{per_repeat:.3f} x)")
        print(f"CPU time: ncsweep {cpu['ncsweep']:.3f} s, bare {cpu['bare']:.3f} s, ratio "
              f"{cpu['ncsweep'] / cpu['bare']:.3f} x (a check against background load)")
        report_breakdown(result, plain, medians["bare"])
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print(f"{verdict}: ncsweep / bare = {ratio:.3f} x (target <= {TARGET:.2f} x)")
        if verdict == "FAIL" or args.profile:
            profile_once(cfg, plain, root)


if __name__ == "__main__":
    main()

"""Speed of the report: its read path over 1,000 run folders, or the whole CLI over 10,000.

Run: .venv/bin/python benchmarks/report.py            (load_runs + claims table + verdicts)
     .venv/bin/python benchmarks/report.py --cli       (python -m ncsweep.report, 10,000 runs)
The read path's run folders are written with the real writer (ncsweep.tracking.RunFolder); its
target is under 5 ms per run (best of a few repeats, so background load counts less). With
--cli the folders are written by hand in the documented layout (docs/run-folder.md, faster to
write) and the command runs once end to end, every file and figure written; its target is
20 s for 10,000 runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ncsweep.report import claim_verdicts, claims_table, load_runs
from ncsweep.tracking import RunFolder

N_RUNS = 1_000
EVALS = 6
REPEATS = 3
TARGET_MS = 5.0
CLI_RUNS = 10_000
CLI_TARGET_S = 20.0
K = 10
NC_KEYS = ("nc1", "nc2_w", "nc2_m", "nc2_equinorm_w", "nc2_equinorm_m", "nc2_equiangle_w",
           "nc2_equiangle_m", "nc2_maxangle_w", "nc2_maxangle_m", "nc3", "nc3_duality", "nc4",
           "nc4_bias", "cdnv", "trace_ratio")


def config(dataset: str, loss: str, head: str, dim: int, seed: int) -> dict:
    """A resolved config shaped like the CLI's config.json."""
    return {
        "dataset": {"_target_": "ncsweep.data.load_digits", "name": dataset, "num_classes": K,
                    "input_shape": [64], "test_fraction": 0.2, "split_seed": 0},
        "arch": {"_target_": "ncsweep.models.MLP", "width": 256, "depth": 2},
        "head": {"_target_": f"ncsweep.heads.{'ETFHead' if head == 'etf' else 'LearnedHead'}"},
        "loss": {"_target_": "ncsweep.losses."
                 + ("CrossEntropy" if loss == "ce" else "HalfSquaredError")},
        "optim": {"_target_": "torch.optim.Adam", "lr": 0.003, "weight_decay": 5e-4},
        "trainer": {"epochs": 100, "batch_size": 256, "eval_every": 20},
        "name": "bench", "seed": seed, "dim": "K" if dim == K else str(dim), "feature_dim": dim,
    }


def identity(key: str, dataset: str, loss: str, head: str, dim: int, seed: int) -> dict:
    """The run.json a job writes at its start."""
    return {"name": "bench", "run_key": key, "dataset": dataset, "arch": "mlp", "head": head,
            "loss": loss, "optim": "adam", "schedule": "cosine", "launcher": "basic",
            "experiment": None, "overrides": key.split(","), "dim": "K" if dim == K else str(dim),
            "feature_dim": dim, "num_classes": K, "seed": seed,
            "embedding": "random" if head == "etf" else None, "code_commit": None,
            "code_dirty": None, "created": time.time()}


def metrics(rng: random.Random, epoch: int, step: int) -> dict:
    """One eval row with every NC key, as the trainer logs it."""
    row = {"epoch": epoch, "step": step, "lr": 0.003, "train_loss": rng.random(),
           "train_acc": min(1.0, 0.1 + epoch / 90), "test_loss": rng.random(),
           "test_acc": min(0.98, 0.1 + epoch / 100)}
    row.update({key: rng.random() for key in NC_KEYS})
    return row


def grid(n_runs: int) -> itertools.islice:
    """(seed, dataset, loss, head, dim) of n_runs runs: 2 datasets x 2 losses x head x d x seeds."""
    return itertools.islice(itertools.product(range(n_runs), ("digits", "synthetic"),
                                              ("ce", "mse"), ("etf", "learned"), (K, 512)),
                            n_runs)


def summary(key: str, dataset: str, loss: str, head: str, dim: int, seed: int,
            last: dict) -> dict:
    """The summary.json a finished job writes."""
    params = 3724 + (dim - K) * 40
    return {"run_key": key, "name": "bench", "dataset": dataset, "arch": "mlp", "loss": loss,
            "head": head, "optim": "adam", "dim": str(dim), "feature_dim": dim,
            "num_classes": K, "seed": seed, "epochs": 100, "overrides": key.split(","),
            "params_total": params, "params_trainable": params - (K * dim if head == "etf" else 0),
            "status": "done", **last, "peak_memory_bytes": 800 * 2**20 + dim * 2**10,
            "peak_memory_kind": "cpu_peak_rss", "wall_time_s": 10.0,
            "memory_params_bytes": 4 * params, "memory_grads_bytes": 4 * params,
            "memory_optimizer_bytes": 8 * params, "memory_activations_bytes": 256 * dim * 4,
            "train_memory_bytes": 16 * params + 256 * dim * 4}


def write_by_hand(root: Path, n_runs: int) -> None:
    """n_runs finished run folders written with json and open(): run.json, metrics.jsonl,
    summary.json and DONE, the documented layout."""
    rng = random.Random(0)
    for seed, dataset, loss, head, dim in grid(n_runs):
        key = f"dataset={dataset},dim={dim},head={head},loss={loss},seed={seed}"
        folder = root / key
        folder.mkdir(parents=True)
        run = {"format": "ncsweep-run-1", **identity(key, dataset, loss, head, dim, seed)}
        (folder / "run.json").write_text(json.dumps(run))
        rows = [metrics(rng, epoch, epoch * 6) for epoch in range(0, 101, 100 // (EVALS - 1))]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "summary.json").write_text(
            json.dumps(summary(key, dataset, loss, head, dim, seed, rows[-1])))
        (folder / "DONE").write_text("")


def write_runs(root: Path) -> None:
    """N_RUNS finished run folders over 2 datasets x 2 losses x head x d x seeds."""
    rng = random.Random(0)
    for seed, dataset, loss, head, dim in grid(N_RUNS):
        key = f"dataset={dataset},dim={dim},head={head},loss={loss},seed={seed}"
        folder = RunFolder(root / key)
        folder.prepare()
        folder.write_run(identity(key, dataset, loss, head, dim, seed))
        folder.write_config(config(dataset, loss, head, dim, seed))
        rows = [metrics(rng, epoch, epoch * 6) for epoch in range(0, 101, 100 // (EVALS - 1))]
        for row in rows:
            folder.append_metrics(row)
        folder.write_summary(summary(key, dataset, loss, head, dim, seed, rows[-1]))
        folder.mark_done()
        folder.record_attempt("done")


def timed_read(root: Path) -> tuple[float, int]:
    """Seconds for load_runs + claims table + verdicts, and the number of runs read."""
    started = time.perf_counter()
    runs = load_runs(root)
    table = claims_table(runs)
    claim_verdicts(table)
    return time.perf_counter() - started, len(runs)


def cli(n_runs: int) -> int:
    """Time ``python -m ncsweep.report`` once over n_runs hand-written run folders."""
    with tempfile.TemporaryDirectory(prefix="ncsweep-report-cli-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_by_hand(root / "runs", n_runs)
        print(f"wrote {n_runs} run folders by hand in {time.perf_counter() - started:.1f} s")
        command = [sys.executable, "-m", "ncsweep.report", str(root / "runs"), "--out",
                   str(root / "report")]
        started, cpu = time.perf_counter(), os.times()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - started
        after = os.times()
        cpu_s = after.children_user + after.children_system - cpu.children_user - \
            cpu.children_system
        files = len(list((root / "report").iterdir()))
    print(done.stdout.strip())
    print(f"python -m ncsweep.report over {n_runs} runs: {seconds:.1f} s wall, {cpu_s:.1f} s CPU, "
          f"{files} files (target <= {CLI_TARGET_S:g} s)")
    print(f"{'PASS' if seconds <= CLI_TARGET_S else 'FAIL'}: {seconds:.1f} s")
    return 0


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--cli", action="store_true", help="time the whole CLI instead")
    args.add_argument("--runs", type=int, default=CLI_RUNS,
                      help="run folders for --cli (default: %(default)s)")
    options = args.parse_args()
    if options.cli:
        return cli(options.runs)
    with tempfile.TemporaryDirectory(prefix="ncsweep-report-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_runs(root)
        print(f"wrote {N_RUNS} run folders with RunFolder in {time.perf_counter() - started:.1f} s")
        times = []
        for _ in range(REPEATS):
            seconds, count = timed_read(root)
            assert count == N_RUNS, count
            times.append(seconds)
    per_run = 1000 * min(times) / N_RUNS
    print(f"load_runs + claims table: {', '.join(f'{t:.2f}' for t in times)} s for {N_RUNS} "
          f"runs; best {per_run:.2f} ms per run (target < {TARGET_MS:g} ms)")
    print(f"{'PASS' if per_run < TARGET_MS else 'FAIL'}: {per_run:.2f} ms per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of the report's read path: load_runs + the claims table over 1,000 run folders.

Run: .venv/bin/python benchmarks/report.py
The run folders are written with the real writer (ncsweep.tracking.RunFolder) into a temporary
folder; the target is under 5 ms per run (best of a few repeats, so background load counts less).
"""

from __future__ import annotations

import itertools
import random
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


def write_runs(root: Path) -> None:
    """N_RUNS finished run folders over 2 datasets x 2 losses x head x d x seeds."""
    rng = random.Random(0)
    grid = itertools.product(range(N_RUNS), ("digits", "synthetic"), ("ce", "mse"),
                             ("etf", "learned"), (K, 512))
    for seed, dataset, loss, head, dim in itertools.islice(grid, N_RUNS):
        key = f"dataset={dataset},dim={dim},head={head},loss={loss},seed={seed}"
        folder = RunFolder(root / key)
        folder.prepare()
        folder.write_run(identity(key, dataset, loss, head, dim, seed))
        folder.write_config(config(dataset, loss, head, dim, seed))
        rows = [metrics(rng, epoch, epoch * 6) for epoch in range(0, 101, 100 // (EVALS - 1))]
        for row in rows:
            folder.append_metrics(row)
        params = 3724 + (dim - K) * 40
        folder.write_summary({
            "run_key": key, "name": "bench", "dataset": dataset, "arch": "mlp", "loss": loss,
            "head": head, "optim": "adam", "dim": str(dim), "feature_dim": dim,
            "num_classes": K, "seed": seed, "epochs": 100, "overrides": key.split(","),
            "params_total": params, "params_trainable": params - (K * dim if head == "etf" else 0),
            "status": "done", **rows[-1], "peak_memory_bytes": 800 * 2**20 + dim * 2**10,
            "peak_memory_kind": "cpu_peak_rss", "wall_time_s": 10.0})
        folder.mark_done()
        folder.record_attempt("done")


def timed_read(root: Path) -> tuple[float, int]:
    """Seconds for load_runs + claims table + verdicts, and the number of runs read."""
    started = time.perf_counter()
    runs = load_runs(root)
    table = claims_table(runs)
    claim_verdicts(table)
    return time.perf_counter() - started, len(runs)


def main() -> int:
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

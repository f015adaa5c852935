"""Communication overhead of a two-rank run: its step time against one rank's, same global batch.

Both runs go through the real CLI on ``launcher=local`` (submitit subprocesses) with one CPU
thread a rank, so two ranks have twice the compute of one: with free communication the
two-rank step takes half the one-rank step. Printed: each run's mean train time per step
(``train_time_s`` / steps from the run's summary, eval passes excluded), the measured ratio
2-rank / 1-rank, and the overhead factor ratio / 0.5 (1.0: communication is free). The
model is the digits MLP without batch norm (DDP's gradient all-reduce is the only
communication), width ``--width`` (default 512), global batch ``--batch`` (default 256).
Gloo over loopback on this machine's CPUs; on GPUs with NCCL the same run measures NCCL.

Run: .venv/bin/python benchmarks/ddp_step.py [--width 512] [--batch 256] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(ranks: int, args: argparse.Namespace) -> dict:
    """One run on ``ranks`` ranks; its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ncsweep", "-m", "logger=none", "trainer.progress=false",
               "arch.batch_norm=false", f"arch.width={args.width}",
               f"trainer.batch_size={args.batch}", f"trainer.epochs={args.epochs}",
               f"trainer.eval_every={args.epochs}", "launcher=local",
               f"hydra.launcher.tasks_per_node={ranks}", "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.poll_s=0.5", "name=bench"]
        result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SystemExit(f"{ranks}-rank run failed: {result.stdout[-1500:]}")
        [path] = Path(tmp).glob("multirun/bench/*/summary.json")
        return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    times = {}
    for ranks in (1, 2):
        summary = run(ranks, args)
        steps = args.epochs * -(-int(summary["n_train"]) // args.batch)
        times[ranks] = per_step = summary["train_time_s"] / steps
        print(f"{ranks} rank(s): {1000 * per_step:.2f} ms a step "
              f"(world_size {summary['world_size']}, {summary['params_total']:,} parameters)")
    ratio = times[2] / times[1]
    print(f"2-rank / 1-rank step time: {ratio:.2f} (free communication: 0.50); "
          f"overhead factor {ratio / 0.5:.2f}")


if __name__ == "__main__":
    main()

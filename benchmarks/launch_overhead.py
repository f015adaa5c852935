"""Per-job overhead of the SLURM path against the in-process basic launcher, on the same grid.

Runs the design-card grid (4 tiny digits jobs) through ``launcher=basic`` and, when a cluster
answers (``SLURM_CONF`` set, e.g. by ``eval "$(launch/local_slurm.sh start | tail -1)"``),
through ``launcher=slurm``; prints the sweep wall time per job for each and their ratio.
Also times ``launch/local_slurm.sh start`` when it is asked to bring the cluster up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ["-m", "head=etf,learned", "dim=K,512", "trainer.epochs=3", "trainer.eval_every=3",
        "arch.width=32", "logger=none", "trainer.progress=false"]
SLURM = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=1",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30"]


def sweep(extra: list[str]) -> tuple[float, float, int]:
    """(sweep wall time, summed in-job wall time, jobs) for one fresh sweep."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "ncsweep", *GRID, *extra, "name=bench"],
                                cwd=tmp, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"sweep failed: {result.stderr[-2000:]}")
        runs = [json.loads(p.read_text()) for p in Path(tmp).glob("multirun/*/*/summary.json")]
        return wall, sum(r["wall_time_s"] for r in runs), len(runs)


def cluster_up() -> bool:
    """Start the local cluster if asked (``--start``); True when SLURM_CONF points at one."""
    if "--start" in sys.argv:
        started = time.perf_counter()
        out = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "start"],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"local_slurm.sh start failed: {out.stderr[-2000:]}")
        os.environ["SLURM_CONF"] = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
        print(f"local_slurm.sh start -> idle node: {time.perf_counter() - started:.1f} s")
    return bool(os.environ.get("SLURM_CONF"))


def main() -> None:
    have_slurm = cluster_up()
    wall, inside, jobs = sweep([])
    basic = wall / jobs
    print(f"basic launcher: {jobs} jobs in {wall:.1f} s = {basic:.2f} s/job "
          f"(in-job {inside / jobs:.2f} s/job, one process, torch imported once)")
    if not have_slurm:
        print("slurm launcher: skipped (no SLURM_CONF; pass --start to bring up the local cluster)")
        return
    wall, inside, jobs = sweep(SLURM)
    per_job = wall / jobs
    print(f"slurm launcher: {jobs} jobs in {wall:.1f} s = {per_job:.2f} s/job "
          f"(in-job {inside / jobs:.2f} s/job, 2 CPUs so 2 jobs at a time)")
    print(f"ratio slurm/basic per job: {per_job / basic:.2f}x; "
          f"overhead per job: {per_job - basic:+.2f} s")


if __name__ == "__main__":
    main()

"""Per-job overhead of the SLURM path against the in-process basic launcher, on the same grid.

Runs the design-card grid (4 tiny digits jobs) through ``launcher=basic`` and, when a cluster
answers (``SLURM_CONF`` set, e.g. by ``eval "$(launch/local_slurm.sh start | tail -1)"``),
through ``launcher=slurm``; prints the sweep wall time per job for each and their ratio, then
what the SLURM path adds per sweep: the preflight (scontrol, sinfo, sacctmgr) and the watcher's
squeue/sacct polls, timed in this process against the same cluster.
Also times ``launch/local_slurm.sh start`` when it is asked to bring the cluster up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ["-m", "head=etf,learned", "dim=K,512", "trainer.epochs=3", "trainer.eval_every=3",
        "arch.width=32", "logger=none", "trainer.progress=false"]
SLURM = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=1",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30"]


def sweep(extra: list[str]) -> tuple[float, float, int, list[str], float]:
    """(sweep wall, summed in-job wall, jobs, SLURM job ids, seconds from last result to exit)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "ncsweep", *GRID, *extra, "name=bench"],
                                cwd=tmp, capture_output=True, text=True, timeout=900)
        wall, ended = time.perf_counter() - started, time.time()
        if result.returncode != 0:
            raise SystemExit(f"sweep failed: {result.stderr[-2000:]}")
        runs = [json.loads(p.read_text()) for p in Path(tmp).glob("multirun/*/*/summary.json")]
        jobs_file = Path(tmp, "multirun", "bench", ".ncsweep-jobs.jsonl")
        ids = ([json.loads(line)["job_id"] for line in jobs_file.read_text().splitlines()]
               if jobs_file.exists() else [])
        results = [p.stat().st_mtime for p in Path(tmp).glob("multirun/*/.submitit/*/*_result.pkl")]
        lag = ended - max(results) if results else 0.0
        return wall, sum(r["wall_time_s"] for r in runs), len(runs), ids, lag


def mean_seconds(call: Callable[[], object], repeats: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def polls_per_sweep(wall: float, poll_s: float = 10.0) -> int:
    """How often the watcher asks squeue/sacct in a sweep of ``wall`` seconds (1, 2, 4 .. s)."""
    count, elapsed, interval = 0, 0.0, 1.0
    while elapsed < wall:
        count, elapsed, interval = count + 1, elapsed + interval, min(interval * 2, poll_s)
    return count


def per_sweep_costs(ids: list[str], wall: float, lag: float) -> None:
    """The preflight and the watcher's polls, timed here against the same cluster."""
    from ncsweep import cluster
    from ncsweep.launcher.submit import preflight

    params = {"partition": None, "account": None, "qos": None, "timeout_min": 30,
              "cpus_per_task": 1, "gpus_per_node": "auto", "mem_gb": 1, "tasks_per_node": 1}
    arrays = ",".join(sorted({i.split("_")[0] for i in ids}))
    checked = mean_seconds(lambda: preflight(dict(params), len(ids)))
    squeue = mean_seconds(lambda: subprocess.run(
        ["squeue", "-h", "-r", "-j", arrays, "-o", "%i|%T|%r"], capture_output=True, timeout=30))
    worst = mean_seconds(lambda: cluster.queue_states(ids), repeats=5)
    polls = polls_per_sweep(wall)
    print(f"per sweep: preflight {checked * 1000:.0f} ms before submitting; watcher "
          f"{polls} polls in {wall:.0f} s, each one squeue call ({squeue * 1000:.0f} ms, "
          f"{polls * squeue * 1000:.0f} ms in all, while the jobs run; squeue + sacct "
          f"{worst * 1000:.0f} ms only when a job leaves the queue without a result); the sweep "
          f"ended {lag:.2f} s after the last job's result; per job: nothing but one stat() of "
          "its result file per 0.5 s")


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
    wall, inside, jobs, _, _ = sweep([])
    basic = wall / jobs
    print(f"basic launcher: {jobs} jobs in {wall:.1f} s = {basic:.2f} s/job "
          f"(in-job {inside / jobs:.2f} s/job, one process, torch imported once)")
    if not have_slurm:
        print("slurm launcher: skipped (no SLURM_CONF; pass --start to bring up the local cluster)")
        return
    wall, inside, jobs, ids, lag = sweep(SLURM)
    per_job = wall / jobs
    print(f"slurm launcher: {jobs} jobs in {wall:.1f} s = {per_job:.2f} s/job "
          f"(in-job {inside / jobs:.2f} s/job, 2 CPUs so 2 jobs at a time)")
    print(f"ratio slurm/basic per job: {per_job / basic:.2f}x; "
          f"overhead per job: {per_job - basic:+.2f} s")
    per_sweep_costs(ids, wall, lag)


if __name__ == "__main__":
    main()

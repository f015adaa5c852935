"""``python -m ncsweep.status SWEEP_DIR``: each job's state from its run folder and from SLURM.

Reads the job list the launcher appends to at every submission (``.ncsweep-jobs.jsonl``; the
latest submission of a folder counts), asks squeue and sacct once for all of them, and prints
one row per job and the same counts the sweep's watch line shows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ncsweep import cluster
from ncsweep.launcher import JOBS_FILE
from ncsweep.tracking import RunFolder


@dataclass
class JobRow:
    """One job of the sweep: its latest submission, what SLURM says, what its folder holds."""

    job_id: str
    folder: RunFolder
    launcher: str
    slurm: cluster.JobState | None = None

    @property
    def run_state(self) -> str:
        """The folder's marker state, refined by its last attempt (interrupted, skipped)."""
        status = self.folder.status
        last = self.folder.last_attempt()
        if status == "started" and last and last["outcome"] == "interrupted":
            return "interrupted"
        return status


def read_jobs(sweep_dir: Path) -> list[JobRow]:
    """The sweep's jobs, one per run folder (its latest submission)."""
    path = sweep_dir / JOBS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir} has no {JOBS_FILE}: not a sweep launched with "
                                "launcher=slurm or launcher=local")
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[entry["folder"]] = entry
    return [JobRow(e["job_id"], RunFolder(sweep_dir / e["folder"]), e.get("launcher", "slurm"))
            for e in latest.values()]


def sweep_status(sweep_dir: Path) -> list[JobRow]:
    """Every job with its SLURM state filled in (one squeue and one sacct call in all)."""
    rows = read_jobs(sweep_dir)
    slurm_ids = [r.job_id for r in rows if r.launcher == "slurm"]
    if slurm_ids and shutil.which("squeue") and shutil.which("sacct"):
        states = cluster.queue_states(slurm_ids)
        for row in rows:
            row.slurm = states.get(row.job_id)
    return rows


def count_line(rows: Sequence[JobRow]) -> str:
    """The watch line's counts (done / running / pending / failed / interrupted) from SLURM."""
    kinds = Counter(r.slurm.kind for r in rows if r.slurm is not None)
    parts = [f"{kinds[k]} {k}" for k in ("done", "running", "pending", "failed")]
    if kinds["interrupted"]:
        parts.append(f"{kinds['interrupted']} interrupted")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and the counts; a folder that is not a sweep is one line, exit 2."""
    cli = argparse.ArgumentParser(prog="python -m ncsweep.status",
                                  description="State of a sweep's jobs (run folders and sacct).")
    cli.add_argument("sweep_dir", type=Path, help="the sweep folder, e.g. multirun/default")
    args = cli.parse_args(argv)
    sweep_dir = args.sweep_dir.resolve()
    try:
        rows = sweep_status(sweep_dir)
    except (FileNotFoundError, cluster.ClusterError) as err:
        print(f"ncsweep.status: error: {err}", file=sys.stderr)
        return 2
    width = max([len(r.job_id) for r in rows] + [3])
    print(f"{'JOB':<{width}}  {'SLURM':<12} {'REASON':<16} {'RUN':<12} FOLDER")
    for row in sorted(rows, key=lambda r: r.folder.path.name):
        state = row.slurm.state if row.slurm else "-"
        reason = (row.slurm.reason if row.slurm and row.slurm.kind == "pending" else "") or "-"
        print(f"{row.job_id:<{width}}  {state:<12} {reason:<16} {row.run_state:<12} "
              f"{row.folder.path.name}")
    runs = Counter(r.run_state for r in rows)
    print(f"ncsweep.status: {sweep_dir}: {len(rows)} job(s)")
    if any(r.slurm is not None for r in rows):
        print(f"ncsweep.status: slurm: {count_line(rows)}")
    print("ncsweep.status: runs: " + ", ".join(f"{n} {k}" for k, n in sorted(runs.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

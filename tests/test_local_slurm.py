"""The local single-node SLURM cluster (launch/local_slurm.sh) runs and accounts a real job."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support import FAILED_STATES, sacct_state

pytestmark = pytest.mark.slurm


def test_sbatch_job_completes_and_is_accounted(local_slurm: str, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    sub = subprocess.run(
        ["sbatch", "--parsable", "-J", "ncsweep-smoke", "-o", str(out),
         "--wrap", 'echo "ok $SLURM_JOB_ID"; hostname'],
        capture_output=True, text=True, timeout=30,
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    assert job_id.isdigit(), sub.stdout

    # sacct lags the end of a job by 1-2 s: poll, bounded.
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        state = sacct_state(job_id)
        if state.startswith("COMPLETED") or state.startswith(FAILED_STATES):
            break
        time.sleep(0.5)
    queue = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout
    assert state == "COMPLETED|0:0", f"job {job_id}: sacct says {state!r}\n{queue}"
    assert out.read_text().splitlines()[0] == f"ok {job_id}"

"""The local single-node SLURM cluster (launch/local_slurm.sh): start it, run a real job.

Needs root and Debian's SLURM packages (the script installs them with apt when missing).
Skips with the reason when either is unavailable, except under CI=true, where it fails.
Set NCSWEEP_SLURM_KEEP=1 to leave a cluster this module started running afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "local_slurm.sh"
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED", "REVOKED")

pytestmark = pytest.mark.slurm


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI=true, where the SLURM tests must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


def _missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                             capture_output=True, text=True)
        if res.stdout.strip() != "install ok installed":
            missing.append(pkg)
    return missing


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def local_slurm() -> Iterator[str]:
    """A running local cluster; SLURM_CONF is exported in os.environ while the module runs."""
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster needs root (SlurmUser=root, apt)")
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        _unavailable("the local SLURM cluster needs a Debian machine (dpkg-query, apt-get)")

    was_running = _script("status", timeout=60).returncode == 0
    # Minutes at most for a first install; seconds once the packages are present.
    started = _script("start", timeout=900)
    if started.returncode != 0:
        still_missing = _missing_packages()
        if still_missing:
            _unavailable(f"apt could not install {still_missing}:\n{_tail(started.stderr)}")
        pytest.fail(f"launch/local_slurm.sh start failed (exit {started.returncode}):\n"
                    f"{_tail(started.stderr)}", pytrace=False)
    last = started.stdout.strip().splitlines()[-1] if started.stdout.strip() else ""
    assert last.startswith("export SLURM_CONF="), f"unexpected last line: {last!r}"
    conf = last.removeprefix("export SLURM_CONF=")
    assert Path(conf).is_file(), conf

    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_running and os.environ.get("NCSWEEP_SLURM_KEEP") != "1":
            _script("stop", timeout=180)


def _sacct_state(job_id: str) -> str:
    res = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"],
                         capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


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
        state = _sacct_state(job_id)
        if state.startswith("COMPLETED") or state.startswith(FAILED_STATES):
            break
        time.sleep(0.5)
    queue = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout
    assert state == "COMPLETED|0:0", f"job {job_id}: sacct says {state!r}\n{queue}"
    assert out.read_text().splitlines()[0] == f"ok {job_id}"

"""Fixtures and hooks: real jobs in-process, the local SLURM cluster, a local W&B server.

Plain helpers the test files import live in tests/support.py.
"""

from __future__ import annotations

import os

# Before torch or numpy load anywhere in this process or its children: small models, and
# parallel jobs must not thrash. The SLURM tests run beside the others on the same cores
# (tests/suite.sh): a thread waiting at an OpenMP barrier sleeps instead of spinning on a core
# another process needs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import shutil
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from ncsweep.config import run_key
from tests.support import API_KEY, IN_CI, ROOT, compose_cfg, free_port, get_json, tail


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture
def job_runner(tmp_path: Path) -> Iterator:
    """Run one real job in-process from overrides; returns (run dir, summary)."""
    from ncsweep.jobs import run_job

    def run(overrides: list[str], folder: str | None = None) -> tuple[Path, dict]:
        out = tmp_path / (folder or run_key(",".join(sorted(overrides))))
        cfg = compose_cfg(overrides, out)
        run_job(cfg)
        return out, json.loads((out / "summary.json").read_text())

    yield run
    GlobalHydra.instance().clear()


# The local single-node SLURM cluster (launch/local_slurm.sh). It needs root and Debian's
# SLURM packages (installed with apt when missing); without them the SLURM tests skip with
# the reason, except under CI=true, where they fail.
SCRIPT = ROOT / "launch" / "local_slurm.sh"
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")


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


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[str]:
    """A running local cluster; SLURM_CONF is exported in os.environ while the tests run."""
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
            _unavailable(f"apt could not install {still_missing}:\n{tail(started.stderr)}")
        pytest.fail(f"launch/local_slurm.sh start failed (exit {started.returncode}):\n"
                    f"{tail(started.stderr)}", pytrace=False)
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


# A local W&B-compatible server (openwandb, a dev extra) for the online tests.

@pytest.fixture(scope="session")
def wandb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One openwandb server for the session, on a free port, stopped at the end."""
    command = shutil.which("openwandb", path=str(Path(sys.executable).parent)) or shutil.which(
        "openwandb")
    if command is None:
        if IN_CI:
            pytest.fail("openwandb is not installed (pip install -e '.[dev]')", pytrace=False)
        pytest.skip("openwandb is not installed (pip install -e '.[dev]')")
    port = free_port()
    data = tmp_path_factory.mktemp("openwandb")
    log = open(data / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([command, "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data / "data")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                get_json(f"{url}/api/v2/projects", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"openwandb did not answer: {(data / 'server.log').read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def online(wandb_server: str) -> dict:
    """The environment that sends a run to the local W&B server."""
    return {"WANDB_MODE": "online", "WANDB_BASE_URL": wandb_server, "WANDB_API_KEY": API_KEY}


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module (``pytest.mark.usefixtures("single_thread")``): tiny float64
    problems run far faster without thread contention on a shared machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

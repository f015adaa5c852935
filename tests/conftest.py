"""Shared fixtures: compose the real configs, run real jobs in-process or through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ncsweep.app import conf_dir
from ncsweep.config import register_resolvers, run_key

ROOT = Path(__file__).resolve().parents[1]
CONF = conf_dir()
FAST = ["logger=none", "trainer.progress=false"]

register_resolvers()
os.environ.setdefault("OMP_NUM_THREADS", "1")  # small models; parallel jobs must not thrash
# The SLURM tests run beside the others on the same cores (tests/suite.sh): a thread waiting at
# an OpenMP barrier sleeps instead of spinning on a core another process needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose conf/ as the app would, with Hydra's runtime fields set for one run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.override_dirname = ",".join(sorted(overrides))
        HydraConfig.instance().set_config(cfg)
    return cfg


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


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """The real ``python -m ncsweep`` in a subprocess."""
    full_env = {**os.environ, "WANDB_ERROR_REPORTING": "false", "HYDRA_FULL_ERROR": "0",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "ncsweep", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=full_env)


_BESIDE = ThreadPoolExecutor(2)


def run_cli_beside(args: list[str], cwd: Path, timeout: float = 300
                   ) -> Future[subprocess.CompletedProcess]:
    """``run_cli`` in a background thread: a reference run beside the run a test checks, on
    the core that run leaves free."""
    return _BESIDE.submit(run_cli, args, cwd, timeout)


def sweep_job_ids(sweep: Path) -> list[str]:
    """The scheduler job ids a sweep recorded in its job list."""
    lines = (sweep / ".ncsweep-jobs.jsonl").read_text().splitlines()
    return sorted({json.loads(line)["job_id"] for line in lines})


def wait_for_rows(proc: subprocess.Popen, sweep: Path, pattern: str, rows: int,
                  timeout: float = 300) -> None:
    """Until a metrics file matching ``pattern`` in ``sweep`` holds ``rows`` rows; the sweep
    process must keep running meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = sorted(sweep.glob(pattern))
        if found and len(found[0].read_text().splitlines()) >= rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} with {rows} rows in {sweep} after {timeout} s")


# The local single-node SLURM cluster (launch/local_slurm.sh). It needs root and Debian's
# SLURM packages (installed with apt when missing); without them the SLURM tests skip with
# the reason, except under CI=true, where they fail.
SCRIPT = ROOT / "launch" / "local_slurm.sh"
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED", "REVOKED")


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


def sacct_state(job_id: str, *extra: str) -> str:
    """``State|ExitCode`` of a job as the accounting database has it."""
    res = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode", *extra],
                         capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


# A local W&B-compatible server (openwandb, a dev extra) for the online tests.
API_KEY = "k" * 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    """GET ``url`` and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="session")
def wandb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One openwandb server for the session, on a free port, stopped at the end."""
    command = shutil.which("openwandb", path=str(Path(sys.executable).parent)) or shutil.which(
        "openwandb")
    if command is None:
        if IN_CI:
            pytest.fail("openwandb is not installed (pip install -e '.[dev]')", pytrace=False)
        pytest.skip("openwandb is not installed (pip install -e '.[dev]')")
    port = _free_port()
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

"""The SLURM preflight: requests that fit the partition, one-line refusals, stuck jobs, status."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncsweep.cluster import (
    Node,
    Partition,
    gres_gpus,
    never_clears,
    parse_fields,
    read_partition,
    resolve_resources,
)
from ncsweep.config import ConfigError
from ncsweep.launcher import AUTO_DEFAULTS
from tests.support import run_cli, sacct_state

TINY = ["logger=none", "trainer.epochs=3", "trainer.eval_every=3", "arch.width=32"]
SMALL = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.poll_s=0.5"]
AUTO = {"cpus_per_task": "auto", "gpus_per_node": "auto", "mem_gb": "auto"}
GPU_NODES = Partition("gpu", [Node("g1", 64, 512_000, 8, "idle"),
                              Node("g2", 32, 256_000, 4, "mixed")])
SMALL_NODE = Partition("local", [Node("vm", 2, 22_900, 0, "idle")])


def test_auto_gives_one_gpu_and_the_defaults_on_a_gpu_partition() -> None:
    assert resolve_resources(AUTO, AUTO_DEFAULTS, GPU_NODES) == {
        "cpus_per_task": 4, "gpus_per_node": 1, "mem_gb": 32}


def test_auto_fits_a_small_cpu_node_and_keeps_what_the_user_set() -> None:
    assert resolve_resources(AUTO, AUTO_DEFAULTS, SMALL_NODE) == {
        "cpus_per_task": 2, "gpus_per_node": None, "mem_gb": 22}
    asked = {**AUTO, "cpus_per_task": 1, "gpus_per_node": None}
    assert resolve_resources(asked, AUTO_DEFAULTS, SMALL_NODE)["cpus_per_task"] == 1


@pytest.mark.parametrize(("key", "value", "offer"), [
    ("cpus_per_task", 64, "at most 2"), ("gpus_per_node", 1, "at most 0"),
    ("mem_gb", 100, "at most 22")])
def test_a_request_no_node_can_give_is_refused_naming_the_key(key: str, value: int,
                                                               offer: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_resources({**AUTO, key: value}, AUTO_DEFAULTS, SMALL_NODE)
    message = str(err.value)
    assert message.startswith(f"hydra.launcher.{key}={value}") and offer in message
    assert "partition local" in message and "\n" not in message


def test_gres_and_scontrol_parsing() -> None:
    assert gres_gpus("(null)") == 0
    assert gres_gpus("gpu:a100:4(S:0-1)") == 4
    assert gres_gpus("gpu:2,gpu:v100:1,shard:8") == 3
    fields = parse_fields("PartitionName=p Default=YES MaxTime=1-00:00:00 TRES=cpu=2,mem=9M")
    assert fields["MaxTime"] == "1-00:00:00" and fields["TRES"] == "cpu=2,mem=9M"


def test_pending_reasons_that_never_clear() -> None:
    down = Partition("p", [Node("n", 2, 1000, 0, "down*")])
    assert never_clears("PartitionConfig") and never_clears("PartitionDown")
    assert never_clears("InvalidAccount") and never_clears("QOSMaxCpuPerJobLimit")
    assert not never_clears("Resources") and not never_clears("Priority")
    assert not never_clears("QOSMaxJobsPerUserLimit")
    assert never_clears("ReqNodeNotAvail, UnavailableNodes:n", down)
    assert not never_clears("ReqNodeNotAvail, Reserved for maintenance", SMALL_NODE)


def test_a_launcher_without_multirun_says_what_to_type(tmp_path: Path) -> None:
    for launcher in ("slurm", "local"):
        res = run_cli([f"launcher={launcher}", "dim=K"], tmp_path, timeout=60)
        assert res.returncode == 2, res.stderr
        [line] = res.stderr.strip().splitlines()
        assert "applies to sweeps" in line and f"python -m ncsweep -m launcher={launcher}" in line
        assert not (tmp_path / "outputs").exists()


def test_no_sbatch_on_path_is_one_line(tmp_path: Path) -> None:
    res = run_cli(["-m", "launcher=slurm", *TINY], tmp_path, timeout=60,
                  env={"PATH": str(tmp_path / "empty")})
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert "sbatch is not on PATH" in line and "launcher=local" in line


def _queue() -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True,
                          timeout=30).stdout.split()


@pytest.mark.slurm
def test_the_local_partition_is_read_as_sinfo_reports_it(local_slurm: str) -> None:
    part = read_partition(None)
    info = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True,
                          timeout=30).stdout.split()
    assert part.name == "local" and part.gpus_max == 0
    assert part.cpus_max == int(info[0]) and part.mem_gb_max == int(info[1]) // 1024


@pytest.mark.slurm
@pytest.mark.parametrize(("override", "key"), [
    ("hydra.launcher.cpus_per_task=64", "hydra.launcher.cpus_per_task=64"),
    ("hydra.launcher.gpus_per_node=1", "hydra.launcher.gpus_per_node=1"),
    ("hydra.launcher.partition=nosuch", "hydra.launcher.partition='nosuch'"),
    ("hydra.launcher.account=nosuch", "hydra.launcher.account='nosuch'")])
def test_impossible_requests_are_refused_before_submission(local_slurm: str, tmp_path: Path,
                                                           override: str, key: str) -> None:
    before = _queue()
    res = run_cli(["-m", "launcher=slurm", *TINY, override], tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"ncsweep: error: {key} is not allowed"), line
    assert _queue() == before
    assert not list(tmp_path.glob("multirun/*/.submitit"))


@pytest.mark.slurm
def test_sbatch_refusing_the_sweep_is_quoted_in_one_line(local_slurm: str,
                                                         tmp_path: Path) -> None:
    before = _queue()
    res = run_cli(["-m", "launcher=slurm", *TINY, *SMALL, "seed=0,1",
                   "hydra.launcher.constraint=nosuchfeature"], tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("ncsweep: error: sbatch refused the sweep: sbatch: error: "), line
    assert "Invalid feature specification" in line and _queue() == before


def _set_partition(state: str) -> None:
    subprocess.run(["scontrol", "update", "PartitionName=local", f"State={state}"], check=True,
                   timeout=30)


@pytest.mark.slurm
def test_a_job_that_can_never_start_stops_the_sweep_and_is_cancelled(local_slurm: str,
                                                                      tmp_path: Path) -> None:
    _set_partition("DOWN")
    try:
        res = run_cli(["-m", "launcher=slurm", *TINY, *SMALL, "seed=0,1", "name=down"],
                      tmp_path, timeout=180)  # no wait for a partition that never comes up
        queue = _queue()
    finally:
        _set_partition("UP")
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "PartitionDown" in errors[0] and "is DOWN" in errors[0], errors
    assert "cancelling the sweep's 2 job(s)" in errors[0]
    assert queue == []
    assert "Traceback" not in res.stderr


def _watch_counts(line: str) -> dict[str, int]:
    return {k: int(n) for n, k in re.findall(r"(\d+) (done|running|pending|failed)", line)}


@pytest.mark.slurm
def test_detached_sweep_status_agrees_with_sacct_and_a_rerun_skips(local_slurm: str,
                                                                   tmp_path: Path) -> None:
    args = ["-m", "launcher=slurm", *TINY, *SMALL, "seed=0,1", "name=detach"]
    res = run_cli([*args, "hydra.launcher.detach=true"], tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    sweep = (tmp_path / "multirun" / "detach").resolve()
    assert f"python -m ncsweep.status {sweep}" in res.stdout
    ids = [json.loads(line)["job_id"] for line in (sweep / ".ncsweep-jobs.jsonl").read_text()
           .splitlines()]
    assert len(ids) == 2 and all(i in res.stdout for i in (ids[0], ids[-1]))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        states = [sacct_state(i) for i in ids]
        if all(s.startswith("COMPLETED") for s in states) and not _queue():
            break
        time.sleep(1)
    status = subprocess.run([sys.executable, "-m", "ncsweep.status", str(sweep)],
                            capture_output=True, text=True, timeout=60, env=os.environ)
    assert status.returncode == 0, status.stderr
    [slurm_line] = [ln for ln in status.stdout.splitlines() if "status: slurm:" in ln]
    expected = {"done": sum(sacct_state(i).startswith("COMPLETED") for i in ids),
                "running": 0, "pending": 0, "failed": 0}
    assert _watch_counts(slurm_line) == expected and expected["done"] == 2
    assert "runs: 2 done" in status.stdout
    again = run_cli(args, tmp_path, timeout=200)
    assert again.returncode == 0 and "2 skipped" in again.stdout, again.stderr[-2000:]


def _default_sigint() -> None:
    """A pytest started in the background inherits an ignored SIGINT: the CLI must see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slurm
@pytest.mark.parametrize("leave", [False, True])
def test_ctrl_c_cancels_the_sweeps_jobs_unless_asked_to_leave_them(local_slurm: str,
                                                                   tmp_path: Path,
                                                                   leave: bool) -> None:
    args = [sys.executable, "-m", "ncsweep", "-m", "launcher=slurm", *TINY, *SMALL, "seed=0,1",
            "name=ctrlc", f"hydra.launcher.leave_running_on_interrupt={str(leave).lower()}"]
    proc = subprocess.Popen(args, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "WANDB_ERROR_REPORTING":
                                                         "false"},
                            preexec_fn=_default_sigint)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = "", time.monotonic() + 60
    while "submitted" not in seen and time.monotonic() < deadline and proc.poll() is None:
        if selector.select(timeout=1):
            seen += proc.stdout.readline()
    assert "submitted 2 job(s)" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    queue = _queue()
    if queue:
        subprocess.run(["scancel", *{j.split("_")[0] for j in queue}], timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    if leave:
        assert "leaving 2 job(s) running" in err and len(queue) == 2
    else:
        assert "cancelling the sweep's 2 unfinished job(s)" in err and queue == []

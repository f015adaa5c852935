"""On the real local cluster: a re-run submits nothing twice, a small MaxArraySize splits a sweep
into several arrays that all run, and a 10,000-run sweep submits as is."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ncsweep import lease
from ncsweep.launcher.limits import read_limits
from ncsweep.tracking import RunFolder
from tests.support import ROOT, run_cli, wait_sacct_final, wait_until

pytestmark = pytest.mark.slurm

TINY = ["logger=none", "trainer.epochs=3", "trainer.eval_every=3", "arch.width=32",
        "trainer.progress=false"]
SMALL = ["launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.poll_s=0.5"]
HOLD = "++hydra.launcher.additional_parameters.hold=true"


def recorded(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / ".ncsweep-jobs.jsonl").read_text()
            .splitlines()]


def queued(comment: str) -> dict[str, str]:
    """This test's jobs in the queue (by their comment): array task id -> state."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%k"], capture_output=True,
                         text=True, timeout=30).stdout
    rows = [line.split("|") for line in out.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) == 3 and row[2] == comment}


def arrays_of(ids: list[str]) -> set[str]:
    return {i.split("_")[0] for i in ids}


def test_a_detached_rerun_while_queued_or_running_submits_nothing_then_skips_all(
        local_slurm: str, tmp_path: Path) -> None:
    comment = f"ncsweep-rerun-{uuid.uuid4().hex[:8]}"
    args = ["-m", *TINY, *SMALL, "seed=0,1,2", "name=again", f"hydra.launcher.comment={comment}",
            "hydra.launcher.detach=true"]
    sweep = (tmp_path / "multirun" / "again").resolve()
    first = run_cli([*args, HOLD], tmp_path, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    entries = recorded(sweep)
    ids = sorted(e["job_id"] for e in entries)
    try:
        assert len(ids) == 3 and sorted(queued(comment)) == ids
        for entry in entries:  # each folder reserved under its own array task
            holder = lease.holder(sweep / entry["folder"])
            assert holder is not None and holder.reserved and holder.job == entry["job_id"]
        pending = run_cli([*args, HOLD], tmp_path, timeout=180)
        assert pending.returncode == 0, pending.stderr[-3000:]
        [line] = [ln for ln in pending.stdout.splitlines() if "already" in ln]
        assert "3 already queued or running (3 queued" in line and "nothing to submit" in line
        assert "submitted" not in pending.stdout.replace("submitted, detached", "")
        assert recorded(sweep) == entries and sorted(queued(comment)) == ids
        subprocess.run(["scontrol", "release", ",".join(ids)], check=True, timeout=30)
        wait_until(lambda: "RUNNING" in queued(comment).values() or not queued(comment),
                   120, "a released task to start")
        running = run_cli(args, tmp_path, timeout=180)
        assert running.returncode == 0, running.stderr[-3000:]
        assert "already" in running.stdout and "nothing to submit" in running.stdout
        assert recorded(sweep) == entries and set(queued(comment)) <= set(ids)
    finally:
        left = queued(comment)
        if any(state == "PENDING" for state in left.values()):
            subprocess.run(["scontrol", "release", ",".join(left)], timeout=30)
    states = wait_sacct_final(ids, 300)
    assert all(s.startswith("COMPLETED") for s in states), states
    assert all(RunFolder(sweep / e["folder"]).status == "done" for e in entries)
    done = run_cli(args, tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 run(s) already done; nothing to submit" in done.stdout
    assert recorded(sweep) == entries and not queued(comment)


def _start_cluster(max_array_size: int | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NCSWEEP_SLURM_MAX_ARRAY_SIZE"}
    if max_array_size is not None:
        env["NCSWEEP_SLURM_MAX_ARRAY_SIZE"] = str(max_array_size)
    res = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "start"],
                         capture_output=True, text=True, timeout=120, env=env,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_sweep_past_a_small_max_array_size_runs_as_several_arrays(local_slurm: str,
                                                                    tmp_path: Path) -> None:
    args = ["-m", *TINY, *SMALL, "seed=range(0,3)", "name=split", "hydra.launcher.detach=true"]
    try:
        _start_cluster(2)
        assert read_limits().max_array_size == 2
        res = run_cli(args, tmp_path, timeout=180)
    finally:
        _start_cluster(None)  # the arrays are in; the rest of the cluster's users get 1001 back
    assert read_limits().max_array_size == 1001
    assert res.returncode == 0, res.stderr[-3000:]
    [line] = [ln for ln in res.stdout.splitlines() if "job(s) on partition" in ln]
    assert line.startswith("ncsweep: slurm: 3 job(s)")
    assert line.endswith("; split into 2 arrays of up to 2 tasks (MaxArraySize 2)"), line
    sweep = (tmp_path / "multirun" / "split").resolve()
    ids = sorted(e["job_id"] for e in recorded(sweep))
    assert len(ids) == 3 and len(arrays_of(ids)) == 2
    states = wait_sacct_final(ids, 400)
    assert all(s.startswith("COMPLETED") for s in states), states
    folders = [RunFolder(p.parent) for p in sweep.glob("*/run.json")]
    assert len(folders) == 3 and all(f.status == "done" for f in folders)


def test_a_ten_thousand_run_sweep_submits_as_is(local_slurm: str, tmp_path: Path) -> None:
    comment = f"ncsweep-huge-{uuid.uuid4().hex[:8]}"
    args = ["-m", *TINY, *SMALL, "seed=range(0,10000)", "name=huge", HOLD,
            "hydra.launcher.detach=true", f"hydra.launcher.comment={comment}"]
    try:
        started = time.monotonic()
        res = run_cli(args, tmp_path, timeout=600)
        took = time.monotonic() - started
    finally:
        arrays = arrays_of(list(queued(comment)))
        if arrays:
            subprocess.run(["scancel", *sorted(arrays)], timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    [line] = [ln for ln in res.stdout.splitlines() if "job(s) on partition" in ln]
    entries = recorded(tmp_path / "multirun" / "huge")
    assert len(entries) == 10_000 and len({e["folder"] for e in entries}) == 10_000
    tasks = {e["job_id"] for e in entries}
    assert line.startswith(f"ncsweep: slurm: {len(tasks)} job(s)"), line
    assert f"split into {len(arrays_of(list(tasks)))} arrays" in line or len(tasks) <= 1001
    assert "10000 runs, up to" in line or len(tasks) == 10_000
    print(f"10,000 runs submitted as {len(tasks)} tasks in {took:.1f} s: {line}")


def test_a_submit_limit_nothing_meets_is_one_line_before_anything_is_submitted(
        local_slurm: str, tmp_path: Path) -> None:
    qos = f"ncsweep-none-{uuid.uuid4().hex[:6]}"
    add = ["sacctmgr", "-i", "add", "qos", qos, "MaxSubmitJobsPerUser=0"]
    subprocess.run(add, check=True, capture_output=True, timeout=60)
    try:
        res = run_cli(["-m", *TINY, *SMALL, "seed=0,1", "name=none",
                       f"hydra.launcher.qos={qos}"], tmp_path, timeout=180)
    finally:
        subprocess.run(["sacctmgr", "-i", "delete", "qos", qos], capture_output=True, timeout=60)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"QOS {qos}'s MaxSubmitJobsPerUser 0" in errors[0] and "no room" in errors[0]
    assert not (tmp_path / "multirun" / "none" / ".ncsweep-jobs.jsonl").exists()
    assert "submitted" not in res.stdout
